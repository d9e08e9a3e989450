//! `cargo xtask`: set-up, build, the namespace rig, the test suite and the VM runner.

mod bench;
mod setup;
mod vm;

use std::{
    os::unix::process::{CommandExt, ExitStatusExt},
    path::PathBuf,
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (Debian packages, rust-src, bpf-linker); idempotent.
    Setup,
    /// Set up, then build lbd (the eBPF program is built by lb-userspace/build.rs).
    Build {
        #[arg(long)]
        release: bool,
        /// A statically linked release binary for any x86-64 Linux, old C libraries included
        /// (musl): target/x86_64-unknown-linux-musl/release/lbd.
        #[arg(long = "static")]
        static_: bool,
    },
    /// Build, bring up the namespace rig with lbd (config/rig.toml), send requests and show which
    /// backend served how many; keeps the rig up until Ctrl-C.
    Run {
        /// Exit (tearing the rig down) after the batch.
        #[arg(long)]
        once: bool,
        /// HTTP requests in the batch (1 to 20000; UDP and IPv6 get a fifth as many each).
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u16).range(1..=20000))]
        requests: u16,
    },
    /// Set up, build and run every test: unit, prog-test-run, netns end-to-end and the IPVS tests
    /// in a VM (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmark the fast path, the live packet path and the controller (needs root); report in
    /// target/bench/report.md.
    Bench {
        /// The one-minute smoke run (CI).
        #[arg(long)]
        quick: bool,
    },
    /// Boot Debian's kernel under qemu and run a command there: `cargo xtask vm -- COMMAND`.
    Vm {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// The workspace root (xtask lives one level below it). xtask depends on nothing of lbd's own, so
/// it builds on a fresh machine before `setup` has installed the eBPF toolchain.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Where cargo puts its output: `$CARGO_TARGET_DIR` (a relative one taken from the workspace
/// root, where [`cargo`] runs) or `target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root().join(dir),
        _ => root().join("target"),
    }
}

/// Runs cargo with `args` in the workspace root; fails if it fails.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (network namespaces, XDP, BPF); run it as root");
    }
    Ok(())
}

/// `cargo xtask build --static`: lbd linked statically against musl, checked to need no dynamic
/// loader and to run.
fn build_static() -> Result<()> {
    setup::setup()?;
    setup::musl_target()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = setup::MUSL_TARGET;
    let status = Command::new(&cargo)
        .args(["build", "--release", "--target", target, "-p", "lb-userspace", "--bin", "lbd"])
        .env(format!("CC_{}", target.replace('-', "_")), "musl-gcc")
        .current_dir(root())
        .status()
        .context("running cargo build --target musl")?;
    if !status.success() {
        bail!("the static build failed ({status})");
    }
    let bin = target_dir().join(target).join("release/lbd");
    let file = Command::new("file").arg(&bin).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let ldd = Command::new("ldd").arg(&bin).output().context("running ldd")?;
    let ldd_text = String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    if !(ldd_text.contains("statically linked") || ldd_text.contains("not a dynamic executable")) {
        bail!("{} is not statically linked: ldd says {}", bin.display(), ldd_text.trim());
    }
    let version = Command::new(&bin).arg("--version").output().context("running the static lbd")?;
    if !version.status.success() {
        bail!("{} --version failed", bin.display());
    }
    let size = std::fs::metadata(&bin)?.len();
    println!(
        "static: {} ({:.1} MB, {}): {}",
        bin.display(),
        size as f64 / 1e6,
        file.ok().and_then(|f| f.split(", ").find(|p| p.contains("static")).map(str::to_string)).unwrap_or_else(|| "static".into()),
        String::from_utf8_lossy(&version.stdout).trim()
    );
    Ok(())
}

/// Who [`pass_on`] passes SIGINT/SIGTERM to: the rig's pid, or minus the process group of the
/// test run.
static PASS_TO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn pass_on(signal: libc::c_int) {
    let pid = PASS_TO.load(std::sync::atomic::Ordering::SeqCst);
    if pid != 0 {
        // SAFETY: kill(2) on the rig's pid or the test run's group.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Passes this process's SIGINT and SIGTERM on to `pid` (negative: a process group).
fn pass_signals_to(pid: i32) {
    PASS_TO.store(pid, std::sync::atomic::Ordering::SeqCst);
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only calls kill(2), which is async-signal-safe.
        unsafe { libc::signal(signal, pass_on as extern "C" fn(libc::c_int) as libc::sighandler_t) };
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Build { static_: true, .. } => build_static(),
        Cmd::Build { release, .. } => {
            setup::setup()?;
            let mut args = vec!["build", "-p", "lb-userspace"];
            if release {
                args.push("--release");
            }
            cargo(&args)
        }
        Cmd::Run { once, requests } => {
            require_root("cargo xtask run")?;
            setup::setup()?;
            cargo(&["build", "-p", "lb-userspace", "-p", "lb-tests", "--bins"])?;
            let mut rig = Command::new(target_dir().join("debug/lbd-rig"));
            rig.arg("--requests").arg(requests.to_string()).arg(root().join("config/rig.toml"));
            if once {
                rig.arg("--once");
            }
            let mut child = rig.spawn().context("starting lbd-rig")?;
            // SIGINT (Ctrl-C, which the terminal sends the rig too) and SIGTERM are passed on to
            // the rig, which tears down; we wait for it instead of dying first. Killed outright,
            // we leave the rig its SIGTERM from the kernel (PR_SET_PDEATHSIG).
            pass_signals_to(child.id() as i32);
            let status = child.wait()?;
            match status.code() {
                Some(0) => Ok(()),
                Some(130) => Ok(()), // interrupted; the rig said so
                _ => bail!("the rig failed ({status})"),
            }
        }
        Cmd::Test { args } => {
            require_root("cargo xtask test")?;
            setup::setup()?;
            cargo(&["build", "-p", "lb-userspace", "-p", "lb-tests", "--bins"])?;
            let mut test = vec!["test", "-p", "lb-common", "-p", "lb-userspace", "-p", "lb-tests", "-p", "lb-bench", "-p", "xtask"];
            test.extend(args.iter().map(String::as_str));
            if !args.iter().any(|a| a == "--") {
                test.push("--");
            }
            // Namespace tests share the CPU with lbd and nginx: one at a time keeps them honest.
            test.push("--test-threads=1");
            // In a process group of its own, which a SIGINT or SIGTERM to us reaches whole (cargo,
            // the test binaries, a VM's runner and QEMU), as Ctrl-C in a terminal does: signalled
            // alone, cargo would die and leave the tests running.
            let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut child = Command::new(&cargo_bin)
                .args(&test)
                .current_dir(root())
                .process_group(0)
                .spawn()
                .with_context(|| format!("running cargo {}", test.join(" ")))?;
            pass_signals_to(-(child.id() as i32));
            let status = child.wait()?;
            match (status.success(), status.signal()) {
                (true, _) => Ok(()),
                (false, Some(signal)) => bail!("cargo {} ended by signal {signal}", test.join(" ")),
                (false, None) => bail!("cargo {} failed ({status})", test.join(" ")),
            }
        }
        Cmd::Bench { quick } => bench::bench(quick),
        Cmd::Vm { args } => vm::main(&args),
    }
}
