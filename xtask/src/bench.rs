//! `cargo xtask bench [--quick]`: set up, build lbd and the benchmark (`benches/`, crate
//! `lb-bench`) in release mode, and run it as root. The report lands in `target/bench/`
//! (`report.md`, `report.json`, PNG plots); the command fails if the report is missing or the
//! benchmark found a ratio that is not sane. `--quick` is the smoke run CI uses (about 30 s of measuring).

use std::process::Command;

use anyhow::{bail, Context, Result};

pub fn bench(quick: bool) -> Result<()> {
    crate::require_root("cargo xtask bench")?;
    crate::setup::setup()?;
    // lbd itself too: the TCP part starts it in the rig (found next to lb-bench).
    crate::cargo(&["build", "--release", "-p", "lb-userspace", "-p", "lb-bench"])?;
    let bin = crate::target_dir().join("release/lb-bench");
    let out = crate::target_dir().join("bench");
    // The last run's files: a plot this run does not draw must not pass for one of its own.
    for entry in std::fs::read_dir(&out).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "report.md" || name == "report.json" || name.ends_with(".png") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    let mut cmd = Command::new(&bin);
    cmd.arg("--out").arg(&out).current_dir(crate::root());
    if quick {
        cmd.arg("--quick");
    }
    let status = cmd.status().with_context(|| format!("starting {}", bin.display()))?;
    for file in ["report.md", "report.json"] {
        if !out.join(file).is_file() {
            bail!("the benchmark wrote no {} ({status})", out.join(file).display());
        }
    }
    if !status.success() {
        bail!(
            "the benchmark failed ({status}); see {}",
            out.join("report.md").display()
        );
    }
    println!("bench: report in {}", out.join("report.md").display());
    Ok(())
}
