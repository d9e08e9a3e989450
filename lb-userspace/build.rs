//! Builds `lb-ebpf` for the BPF target with aya-build (aya-template's shape) and leaves the object in
//! `OUT_DIR/lb-ebpf`, where `xdp.rs` embeds it with `include_bytes_aligned!`.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build (for fast unit-test builds of the controller); an empty
//! object is left in its place and loading it fails with a clear error at run time.

use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-changed=../lb-common/src");
    if skip {
        for object in ["lb-ebpf", "lb-aux"] {
            std::fs::write(out_dir.join(object), b"").context("writing placeholder eBPF object")?;
        }
        return Ok(());
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("lb-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
