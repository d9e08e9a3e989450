//! `cargo xtask setup`: installs what the build and the tests need, idempotently, one line per
//! item. A second run on a ready machine only checks (seconds).

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Debian packages: the rig and tests (nginx, iproute2, ethtool, ping, curl, wrk, tcpdump), the
/// VM runner (qemu, Debian's kernel, busybox for the initramfs), plot fonts for the bench, and
/// keepalived/nftables/arping for the VRRP tests, ipvsadm for the IPVS tests (inside the VM,
/// whose root is this machine's).
pub const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "procps",
    "ethtool",
    "iputils-ping",
    "nginx",
    "curl",
    "wrk",
    "tcpdump",
    "qemu-system-x86",
    "linux-image-amd64",
    "busybox-static",
    "xz-utils",
    "zstd",
    "fonts-dejavu-core",
    // VRRP interop tests: the real keepalived, nftables to drop multicast, arping.
    "keepalived",
    "nftables",
    "iputils-arping",
    // IPVS tests: the VM checks lbd's services with the real ipvsadm, which it runs from the
    // host's root (a fresh machine does not have it; earlier ones happened to).
    "ipvsadm",
    // The CLI tests verify config/lbd.service with systemd-analyze.
    "systemd",
    // `cargo xtask build --static`: musl-gcc for the C parts of the dependency tree.
    "musl-tools",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn quiet(cmd: &mut Command) -> Result<std::process::Output> {
    cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))
}

fn report(item: &str, state: &str) {
    println!("setup: {item:<28} {state}");
}

pub fn setup() -> Result<()> {
    apt()?;
    nightly_rust_src()?;
    bpf_linker()
}

/// The Rust target of the static build.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Adds the musl target to the stable toolchain (for `cargo xtask build --static`).
pub fn musl_target() -> Result<()> {
    let list = quiet(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if String::from_utf8_lossy(&list.stdout).lines().any(|l| l.trim() == MUSL_TARGET) {
        report("rust target musl", "ok");
        return Ok(());
    }
    report("rust target musl", &format!("adding {MUSL_TARGET}"));
    let out = quiet(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    if !out.status.success() {
        bail!("rustup target add {MUSL_TARGET} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn installed(pkg: &str) -> bool {
    quiet(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        report("debian packages", &format!("ok ({} installed)", APT_PACKAGES.len()));
        return Ok(());
    }
    report("debian packages", &format!("installing {}", missing.join(" ")));
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    let update = quiet(Command::new("apt-get").args(["update", "-o", "DPkg::Lock::Timeout=300"]).envs(env))?;
    if !update.status.success() {
        bail!("apt-get update failed: {}", String::from_utf8_lossy(&update.stderr));
    }
    let out = quiet(Command::new("apt-get").args(["install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300"]).args(&missing).envs(env))?;
    if !out.status.success() {
        bail!("apt-get install {} failed: {}", missing.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    // nginx's and keepalived's packages start system-wide daemons; tests run their own per
    // namespace.
    for unit in ["nginx", "keepalived"] {
        let _ = quiet(Command::new("systemctl").args(["disable", "--now", unit]));
    }
    report("debian packages", "installed");
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = quiet(Command::new("rustup").args(["toolchain", "list"]))?;
    // The undated nightly (`nightly-x86_64-unknown-linux-gnu`), which `+nightly` names; a dated
    // one (`nightly-2024-05-01-...`) is another toolchain.
    let undated = |l: &str| l.strip_prefix("nightly-").is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()));
    if !String::from_utf8_lossy(&toolchains.stdout).lines().any(undated) {
        report("nightly toolchain", "installing");
        let out = quiet(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
        if !out.status.success() {
            bail!("rustup toolchain install nightly failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let list = quiet(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if !list.status.success() {
        bail!("rustup component list --toolchain nightly failed: {}", String::from_utf8_lossy(&list.stderr));
    }
    if String::from_utf8_lossy(&list.stdout).lines().any(|l| l.starts_with("rust-src")) {
        report("rust-src (nightly)", "ok");
        return Ok(());
    }
    report("rust-src (nightly)", "installing");
    let out = quiet(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    if !out.status.success() {
        bail!("rustup component add rust-src failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    report("rust-src (nightly)", "installed");
    Ok(())
}

fn bpf_linker() -> Result<()> {
    // It loads libLLVM from the nightly sysroot, found through the environment `rustup run`
    // sets up, which is also how aya-build runs it.
    if let Ok(out) = quiet(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])) {
        let version = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && version.contains(BPF_LINKER_VERSION) {
            report("bpf-linker", &format!("ok ({})", version.trim()));
            return Ok(());
        }
    }
    // bpf-linker links against LLVM; use the one inside rustc's nightly sysroot so the versions
    // match the bitcode rustc emits. It expects PREFIX/lib/libLLVM.so.
    let sysroot = quiet(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    if !sysroot.status.success() {
        bail!("rustc +nightly --print sysroot failed: {}", String::from_utf8_lossy(&sysroot.stderr));
    }
    let lib = std::path::Path::new(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so")))
        .with_context(|| format!("no libLLVM.so* in {}", lib.display()))?;
    let major = llvm
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLLVM.so."))
        .and_then(|v| v.split('.').next())
        .context("cannot read LLVM's major version from its file name")?
        .to_string();
    let prefix = crate::target_dir().join("llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link).with_context(|| format!("linking {}", link.display()))?;
    report("bpf-linker", &format!("building {BPF_LINKER_VERSION} against LLVM {major} (about 2 minutes)"));
    let out = quiet(
        Command::new("cargo")
            // `--locked`: the dependency versions bpf-linker was released with, not whatever is
            // newest that day. `--force`: reached only when the installed one does not run (say,
            // a new nightly of the same LLVM), which cargo would otherwise call installed.
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--force", "--no-default-features", "--features"])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !out.status.success() {
        bail!("cargo install bpf-linker failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    report("bpf-linker", "installed");
    Ok(())
}
