//! Running a `#[test]` inside the `cargo xtask vm` guest (Debian's kernel under QEMU, the host's
//! filesystem read-only plus a tmpfs overlay; see `xtask/src/vm.rs`), for what the host kernel
//! cannot do (IPVS).
//!
//! A VM test is an ordinary `#[test]` that behaves differently on either side:
//!
//! * **On the host** (`LBD_IN_VM` unset) it boots the VM once and runs *its own test binary* there
//!   (`std::env::current_exe()`), filtered to exactly itself: `xtask vm --timeout 240 -- EXE NAME
//!   --exact --nocapture --test-threads=1`. It passes only if the guest command exits 0 *and* the
//!   guest harness really ran that one test (a filter that matches nothing also exits 0). On
//!   failure the panic message carries the guest output. A missing prerequisite (QEMU, Debian's
//!   kernel, busybox-static, the xtask binary) fails the test; nothing is ever skipped.
//! * **In the guest** (`LBD_IN_VM=1`, which the VM runner exports) it runs the real body, as root.
//!
//! ```text
//! lb_tests::vm_test! {
//!     /// Doc comments and attributes are kept.
//!     fn ipvs_works() {
//!         assert!(std::path::Path::new("/proc/net/ip_vs").exists());
//!     }
//! }
//! ```
//!
//! Each such test costs one boot (about 5-10 s under TCG), so group assertions into few tests.
//!
//! The xtask binary is taken from `LBD_XTASK` if set, else from the profile directory the test
//! binary was built in (`target/debug/xtask` next to `target/debug/deps/<test>`), else
//! `target/debug/xtask`; if there is none it is built with `cargo build -p xtask` (into
//! `target/vm-xtask/`, so as not to wait for the lock of the `cargo test` that runs us).
//!
//! This file uses only `std` and `anyhow`, so crates that cannot depend on `lb-tests` can include
//! it with `#[path = "../../tests/src/vm.rs"] mod vm;` (at their crate root, for `vm_test!`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

/// Set (to `1`) by the VM runner in the guest command's environment.
pub const IN_VM_ENV: &str = "LBD_IN_VM";
/// Limit for one VM run: boot, the test, shutdown.
pub const VM_TIMEOUT_SECS: u64 = 240;

/// Whether we are the guest side of a VM test.
pub fn in_vm() -> bool {
    std::env::var_os(IN_VM_ENV).is_some_and(|v| !v.is_empty() && v != "0")
}

/// What a successful VM run printed.
#[derive(Debug, Clone)]
pub struct VmRun {
    /// The guest test binary's combined stdout and stderr.
    pub output: String,
    /// Wall time of the whole VM run.
    pub elapsed: Duration,
}

/// Boots the VM and runs test `test_name` (its full path inside the test crate, e.g.
/// `round_trip` or `module::round_trip`) of the current test binary there. `Err` (with the guest
/// output) unless it ran and passed.
pub fn run_test_in_vm(test_name: &str) -> Result<VmRun> {
    if in_vm() {
        bail!("run_test_in_vm({test_name:?}) called inside the VM");
    }
    let exe = std::env::current_exe().context("locating the test binary")?;
    let xtask = xtask_binary(&exe)?;
    let mut cmd = Command::new(&xtask);
    cmd.args(["vm", "--timeout", &VM_TIMEOUT_SECS.to_string()]);
    cmd.args(["--env", "RUST_BACKTRACE=1"]);
    for var in ["RUST_LOG", "LBD_TEST_VERBOSE", "LBD_BIN"] {
        if let Ok(v) = std::env::var(var) {
            cmd.args(["--env", &format!("{var}={v}")]);
        }
    }
    cmd.arg("--")
        .arg(&exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .stdin(Stdio::null());
    // Killed, the test takes its VM with it (the runner kills QEMU when it dies).
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let started = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("running {}", xtask.display()))?;
    let elapsed = started.elapsed();
    let output = String::from_utf8_lossy(&out.stdout).into_owned();
    let runner = String::from_utf8_lossy(&out.stderr).into_owned();
    // With --nocapture the test's own output may come between "test NAME ... " and "ok".
    let ran_one = output.contains("running 1 test")
        && output.contains(&format!("test {test_name} ... "))
        && output.contains("test result: ok. 1 passed");
    if out.status.success() && ran_one {
        return Ok(VmRun { output, elapsed });
    }
    let why = if out.status.success() {
        format!("the guest did not run exactly the test {test_name:?} (wrong name?)")
    } else {
        match out.status.code() {
            Some(code) => format!("exit code {code}"),
            None => format!("{}", out.status),
        }
    };
    Err(anyhow!(
        "VM test {test_name} failed after {:.1} s: {why}\n\
         ---- guest output ----\n{}\n---- VM runner ({}) ----\n{}",
        elapsed.as_secs_f64(),
        output.trim_end(),
        xtask.display(),
        runner.trim_end()
    ))
}

/// The body of a VM test: in the guest, runs `body`; on the host, runs the test `test_name` in the
/// VM and panics with the guest output unless it passed.
pub fn vm_test(test_name: &str, body: impl FnOnce()) {
    if in_vm() {
        body();
        return;
    }
    match run_test_in_vm(test_name) {
        Ok(run) => println!(
            "VM test {test_name} passed in {:.1} s; guest output:\n{}",
            run.elapsed.as_secs_f64(),
            run.output
        ),
        Err(e) => panic!("{e:#}"),
    }
}

/// The libtest name of test `fn_name` declared in module `module_path` (`module_path!()`): the
/// module path without the crate name, then the function.
pub fn test_path(module_path: &str, fn_name: &str) -> String {
    match module_path.split_once("::") {
        Some((_crate, rest)) => format!("{rest}::{fn_name}"),
        None => fn_name.to_string(),
    }
}

/// Declares `#[test]` functions that run in the VM (see the module docs).
#[macro_export]
macro_rules! vm_test {
    ($($(#[$meta:meta])* fn $name:ident() $body:block)*) => {$(
        $(#[$meta])*
        #[test]
        fn $name() {
            $crate::vm::vm_test(
                &$crate::vm::test_path(module_path!(), stringify!($name)),
                || $body,
            )
        }
    )*};
}

/// Finds (or builds) the xtask binary that runs the VM; see the module docs.
pub fn xtask_binary(test_exe: &Path) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LBD_XTASK").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("LBD_XTASK={} is not a file", p.display());
        }
        return Ok(p);
    }
    // EXE = <target>/<profile>/deps/<name>-<hash>
    let profile_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test binary path {}", test_exe.display()))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| anyhow!("unexpected test binary path {}", test_exe.display()))?;
    for candidate in [profile_dir.join("xtask"), target_dir.join("debug/xtask")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let build_dir = target_dir.join("vm-xtask");
    let built = build_dir.join("debug/xtask");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root above {}", env!("CARGO_MANIFEST_DIR")))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!(
        "vm test: no xtask binary in {}; building it: {cargo} build -p xtask (target dir {})",
        profile_dir.display(),
        build_dir.display()
    );
    let status = Command::new(&cargo)
        .args(["build", "--quiet", "-p", "xtask"])
        .env("CARGO_TARGET_DIR", &build_dir)
        .current_dir(workspace)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {cargo} build -p xtask"))?;
    if !status.success() || !built.is_file() {
        bail!(
            "building xtask failed ({status}); build it yourself with `cargo build -p xtask` or \
             point LBD_XTASK at it"
        );
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_paths_drop_the_crate_name() {
        assert_eq!(test_path("ipvs_vm", "round_trip"), "round_trip");
        assert_eq!(
            test_path("ipvs_vm::group", "round_trip"),
            "group::round_trip"
        );
    }
}
