//! `cargo xtask vm [OPTIONS] -- COMMAND...`: run a command as root inside a throw-away QEMU VM that
//! boots Debian's own kernel (`linux-image-amd64`, 6.1), so IPVS and loadable modules are available
//! even though the host kernel has neither.
//!
//! # Boot chain (for the next engineer)
//!
//! 1. **Kernel.** The newest `/boot/vmlinuz-<rel>` that has `/lib/modules/<rel>/modules.dep`
//!    (override: `LBD_VM_KERNEL=<rel>`). It is a bzImage; under TCG (no usable KVM here) the
//!    in-guest decompression is slow, so we extract the uncompressed ELF `vmlinux` once: the bzImage
//!    header gives the payload offset/length (fallback: scan for the xz/zstd/gzip magic, like the
//!    kernel's `scripts/extract-vmlinux`), and the `xz`/`zstd`/`gzip` CLI decompresses it. QEMU boots
//!    that ELF directly through its PVH entry note (Debian sets `CONFIG_PVH=y`).
//! 2. **Initramfs** (a `newc` cpio written by [`Cpio`] below, uncompressed): `/bin/busybox` from
//!    `busybox-static`, `/init` = `xtask/vm/init.sh`, `/sbin/modprobe` = `xtask/vm/modprobe.sh`,
//!    and the modules needed before the root exists ([`GUEST_MODULES`]: virtio-pci,
//!    virtio-console, 9p, overlay) plus their dependencies from `modules.dep`, decompressed if the
//!    package ships `.ko.xz`/`.ko.zst`, loaded by `insmod` in dependency order (`/modules/order`).
//! 3. **Root.** `/init` mounts the host's `/` read-only over virtio-9p (tag `hostroot`,
//!    `cache=loose`), puts a tmpfs-backed overlayfs on top at `/newroot` (so the guest can write
//!    anywhere; writes vanish with the VM), mounts proc, sysfs, devtmpfs, devpts, /dev/shm, bpffs,
//!    cgroup2, debugfs and tracefs inside it, and mounts the per-run host dir
//!    `target/vm/runs/<id>/` read-write (tag `lbdrun`) at `/run/lbd-vm`.
//! 4. **Command.** The host writes `cmd.sh` into the run dir (clean environment: PATH, HOME=/root,
//!    the [`VmOptions::env`] entries, `cd workdir`, `exec /bin/sh -c COMMAND`); `/init` runs it with
//!    `env -i chroot /newroot /bin/sh /run/lbd-vm/cmd.sh`, stdin `/dev/null`, stdout+stderr on the
//!    virtio-serial port `lbd.out` (a host file the host tails and streams live), writes the exit
//!    status to `/run/lbd-vm/status` (host file `status`), and powers off (`-no-reboot`).
//!    Kernel messages go to ttyS0 = `target/vm/runs/<id>/console.log`, never into the output.
//! 5. **Module autoload.** The kernel's usermode helper runs `/sbin/modprobe` relative to kthreadd's
//!    root, which stays the initramfs; that wrapper chroots into `/newroot` and runs the host's real
//!    `/sbin/modprobe` (kmod), which finds `/lib/modules/<rel>` on the host filesystem. Inside the
//!    chroot `modprobe ip_vs` / `ipvsadm` just use the host's kmod directly.
//!
//! # What the guest sees
//!
//! The whole host filesystem, read-only, through the overlay: `/work/main/target/...` binaries built
//! on the host can be run directly. Writes (including to `target/`) land in guest RAM and are lost
//! when the VM exits; only the run dir `/run/lbd-vm` is written through to the host. No NIC
//! (`-nic none`): networking exists only inside the guest (loopback, namespaces, veth).
//!
//! # QEMU
//!
//! `-machine pc` (`microvm` hangs under TCG), `-accel tcg`, `-cpu qemu64` (`max` makes guest
//! code 2-3x slower under TCG), `-nodefaults -nic none -no-reboot`, kernel parameters
//! `console=ttyS0 panic=-1 oops=panic ...`: a panic reboots, which with `-no-reboot` ends QEMU.
//! QEMU runs under `setpriv --pdeathsig KILL` so it dies with this process. Boot to command takes
//! about 3.5-5 s on the 2-core machine (TCG; more when the host is busy compiling).
//!
//! # Caches and logs
//!
//! `target/vm/<rel>/{vmlinux,initramfs.cpio}` (stamped with the kernel package version, the
//! vmlinuz size/mtime, busybox and the init scripts; rebuilt when any changes) and one dir per run
//! under `target/vm/runs/` (console.log, output.log, qemu.log, cmd.sh, status; the newest 10 kept).
//! `target` honours `CARGO_TARGET_DIR`.
//!
//! # Knobs (environment of the host process)
//!
//! `LBD_VM_VERBOSE=1` (or `--verbose`) echoes the guest console to stderr; `LBD_VM_KERNEL=<rel>`
//! picks the kernel; `LBD_VM_APPEND="..."` adds kernel parameters (e.g. `loglevel=7`, or
//! `LBD_9P_CACHE=cache=none`, which /init reads); `LBD_VM_CPU` / `LBD_VM_ACCEL` override
//! `qemu64` / `tcg` (e.g. `LBD_VM_ACCEL=kvm` on a machine with working KVM).

// The library-style API (run, VmOutput, prepare) is for other xtask commands; not all are used yet.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

const INIT_SH: &str = include_str!("../vm/init.sh");
const MODPROBE_SH: &str = include_str!("../vm/modprobe.sh");
/// Bump when the initramfs layout changes in a way the stamp would not notice.
const INITRAMFS_FORMAT: u32 = 1;
/// Modules `/init` needs before it can mount the root (dependencies are added from modules.dep).
const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
];
const BUSYBOX: &str = "/bin/busybox";
const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const CONSOLE_TAIL_LINES: usize = 30;
const RUNS_KEPT: usize = 10;

/// How to run a command in the VM. `VmOptions::default()` gives 1 GiB, 2 vCPUs, 300 s, the current
/// directory and no extra environment.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest RAM in MiB; the tmpfs overlay (all guest writes) lives in it too.
    pub memory_mb: u32,
    pub cpus: u32,
    /// Limit for the whole VM run (boot + command + shutdown), not counting the one-time build of
    /// the cached vmlinux/initramfs.
    pub timeout: Duration,
    /// Working directory of the command inside the guest (the host path; the host filesystem is
    /// the guest's root).
    pub workdir: PathBuf,
    /// Extra environment variables for the command (on top of PATH, HOME=/root, USER, LOGNAME).
    pub env: Vec<(String, String)>,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            memory_mb: 1024,
            cpus: 2,
            timeout: Duration::from_secs(300),
            workdir: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            env: Vec::new(),
        }
    }
}

/// Result of a command that ran to completion inside the VM.
#[derive(Debug, Clone)]
pub struct VmOutput {
    /// The guest command's exit code (`/bin/sh` convention: 128+N when killed by signal N).
    pub exit_code: i32,
    /// Combined stdout+stderr of the command (lossy UTF-8).
    pub output: String,
    /// Time from starting QEMU until the guest's `/init` launched the command (informational).
    pub boot_time: Option<Duration>,
    /// The guest kernel console's last lines (an OOM kill or a kernel warning shows there).
    pub console_tail: String,
    /// The whole console log (kept for the newest runs).
    pub console_log: PathBuf,
}

/// The cached boot artifacts.
#[derive(Debug, Clone)]
pub struct VmImages {
    pub kernel_release: String,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
}

/// `cargo xtask vm [--timeout SECS] [--memory MB] [--cpus N] [--workdir DIR] [--env K=V]... -- COMMAND...`
///
/// Streams the command's output and exits the process with the guest command's exit code. A single
/// COMMAND word is a shell script (`vm -- 'echo a | wc -c'`); several words are an argv, quoted.
pub fn main(args: &[String]) -> Result<()> {
    use clap::Parser;

    #[derive(Parser, Debug)]
    #[command(
        name = "cargo xtask vm",
        about = "Run COMMAND as root in a QEMU VM booting Debian's kernel (host / read-only + tmpfs overlay)"
    )]
    struct Cli {
        /// Limit for the whole VM run, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Working directory inside the guest [default: current directory].
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Extra environment variable for the command (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Echo the guest kernel console to stderr.
        #[arg(long, short = 'v')]
        verbose: bool,
        /// Only build/refresh the cached vmlinux and initramfs, run nothing.
        #[arg(long, conflicts_with = "command")]
        prepare: bool,
        /// The command (after `--`).
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            required_unless_present = "prepare"
        )]
        command: Vec<String>,
    }

    fn parse_env(s: &str) -> std::result::Result<(String, String), String> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
        Ok((k.to_string(), v.to_string()))
    }

    let cli = Cli::try_parse_from(
        std::iter::once("cargo xtask vm".to_string()).chain(args.iter().cloned()),
    )
    .unwrap_or_else(|e| e.exit());
    if cli.prepare {
        let images = prepare()?;
        eprintln!(
            "vm: kernel {}: {} + {}",
            images.kernel_release,
            images.vmlinux.display(),
            images.initramfs.display()
        );
        return Ok(());
    }
    let mut opts = VmOptions {
        memory_mb: cli.memory,
        cpus: cli.cpus,
        timeout: Duration::from_secs(cli.timeout),
        env: cli.env,
        ..VmOptions::default()
    };
    if let Some(w) = cli.workdir {
        opts.workdir = w;
    }
    let started = Instant::now();
    let out = run_inner(&opts, &cli.command, cli.verbose || verbose_from_env())?;
    std::io::stdout().flush().ok();
    if out.exit_code != 0 {
        eprintln!(
            "vm: the command failed; last console lines:\n{}\n(full console log: {})",
            out.console_tail,
            out.console_log.display()
        );
    }
    eprintln!(
        "vm: exit code {}; command started {} after QEMU launch; total {:.1} s",
        out.exit_code,
        out.boot_time
            .map_or("?".to_string(), |d| format!("{:.1} s", d.as_secs_f64())),
        started.elapsed().as_secs_f64()
    );
    std::process::exit(out.exit_code);
}

/// Run `command` as root inside the VM (see the module docs), streaming its combined output to the
/// host's stdout while capturing it. `Ok` whenever the guest reported an exit status, whatever it
/// is; `Err` for VM-level failures (timeout, kernel panic, QEMU died, missing packages).
pub fn run(opts: &VmOptions, command: &[String]) -> Result<VmOutput> {
    run_inner(opts, command, verbose_from_env())
}

/// Check the prerequisites and build (or reuse) the cached vmlinux and initramfs.
pub fn prepare() -> Result<VmImages> {
    let kernel = find_kernel()?;
    let busybox = check_busybox()?;
    let dir = vm_dir().join(&kernel.release);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let vmlinux = dir.join("vmlinux");
    let vmlinux_key = format!("vmlinux v1\n{}\n", kernel.key);
    if !stamp_ok(&dir.join("vmlinux.stamp"), &vmlinux_key, &vmlinux) {
        eprintln!(
            "vm: extracting {} -> {}",
            kernel.vmlinuz.display(),
            vmlinux.display()
        );
        extract_vmlinux(&kernel.vmlinuz, &vmlinux)?;
        fs::write(dir.join("vmlinux.stamp"), &vmlinux_key)?;
    }

    let initramfs = dir.join("initramfs.cpio");
    let initramfs_key = format!(
        "initramfs v{INITRAMFS_FORMAT}\n{}\n{}\n{:016x}\n{:?}\n",
        kernel.key,
        busybox,
        fnv1a(format!("{INIT_SH}\0{MODPROBE_SH}").as_bytes()),
        GUEST_MODULES
    );
    if !stamp_ok(&dir.join("initramfs.stamp"), &initramfs_key, &initramfs) {
        eprintln!("vm: building {}", initramfs.display());
        build_initramfs(&kernel, &initramfs)?;
        fs::write(dir.join("initramfs.stamp"), &initramfs_key)?;
    }
    Ok(VmImages {
        kernel_release: kernel.release,
        vmlinux,
        initramfs,
    })
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn verbose_from_env() -> bool {
    std::env::var_os("LBD_VM_VERBOSE").is_some_and(|v| !v.is_empty() && v != "0")
}

fn run_inner(opts: &VmOptions, command: &[String], verbose: bool) -> Result<VmOutput> {
    if command.is_empty() {
        bail!("vm: no command given");
    }
    let images = prepare()?;
    let qemu = require_tool("qemu-system-x86_64", "qemu-system-x86")?;

    let runs = vm_dir().join("runs");
    fs::create_dir_all(&runs)?;
    prune_runs(&runs);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let run_dir = runs.join(format!("{}-{}", std::process::id(), nanos));
    fs::create_dir(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;

    let workdir = if opts.workdir.is_absolute() {
        opts.workdir.clone()
    } else {
        std::env::current_dir()?.join(&opts.workdir)
    };
    fs::write(
        run_dir.join("cmd.sh"),
        command_script(&workdir, &opts.env, command)?,
    )?;
    let console_log = run_dir.join("console.log");
    let output_log = run_dir.join("output.log");
    let qemu_log = run_dir.join("qemu.log");
    let status_file = run_dir.join("status");
    File::create(&console_log)?;
    File::create(&output_log)?;

    let cmdline = [
        "console=ttyS0",
        "rdinit=/init",
        "panic=-1",
        "oops=panic",
        "loglevel=4",
        "mitigations=off",
        "i8042.noaux",
        "i8042.nokbd",
        "tsc=reliable",
        "no_timer_check",
    ]
    .join(" ");
    // Debugging knob: extra kernel parameters, e.g. LBD_VM_APPEND=loglevel=7.
    let cmdline = match std::env::var("LBD_VM_APPEND") {
        Ok(extra) if !extra.trim().is_empty() => format!("{cmdline} {}", extra.trim()),
        _ => cmdline,
    };
    let qemu_log_file = File::create(&qemu_log)?;
    // setpriv (util-linux) makes the kernel SIGKILL QEMU if this process dies without cleaning up.
    let mut qemu_cmd = match find_tool("setpriv") {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(&qemu);
            c
        }
        None => Command::new(&qemu),
    };
    // `max` is markedly slower under TCG (AVX2 string functions, bigger XSAVE state): use the
    // baseline model. KVM is off by default: /dev/kvm exists on these machines but hangs the guest.
    let cpu = env_or("LBD_VM_CPU", "qemu64");
    let accel = env_or("LBD_VM_ACCEL", "tcg");
    qemu_cmd
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .args(["-machine", &format!("pc,accel={accel}"), "-cpu", &cpu])
        .args([
            "-smp",
            &opts.cpus.to_string(),
            "-m",
            &opts.memory_mb.to_string(),
        ])
        .arg("-kernel")
        .arg(&images.vmlinux)
        .arg("-initrd")
        .arg(&images.initramfs)
        .args(["-append", &cmdline])
        .args([
            "-chardev",
            &format!("file,id=con,path={}", qemu_path(&console_log)?),
        ])
        .args(["-serial", "chardev:con"])
        .args(["-device", "virtio-serial-pci,id=vser0"])
        .args([
            "-chardev",
            &format!("file,id=out,path={}", qemu_path(&output_log)?),
        ])
        .args([
            "-device",
            "virtserialport,bus=vser0.0,chardev=out,name=lbd.out",
        ])
        .args([
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        ])
        .args([
            "-fsdev",
            &format!(
                "local,id=lbdrun,path={},security_model=none",
                qemu_path(&run_dir)?
            ),
            "-device",
            "virtio-9p-pci,fsdev=lbdrun,mount_tag=lbdrun",
        ])
        .stdin(Stdio::null())
        .stdout(qemu_log_file.try_clone()?)
        .stderr(qemu_log_file);

    let start = Instant::now();
    let child = qemu_cmd
        .spawn()
        .with_context(|| format!("starting {}", qemu.display()))?;
    let mut qemu_proc = KillOnDrop(child);

    let mut out_tail = Tail::new(&output_log);
    let mut con_tail = Tail::new(&console_log);
    let mut console = ConsoleLines::default();
    let mut captured = Vec::new();
    let mut boot_time = None;
    let mut panic_seen: Option<Instant> = None;
    let mut status_seen: Option<Instant> = None;
    let stdout = std::io::stdout();

    let exit: Option<ExitStatus> = loop {
        let exited = qemu_proc.0.try_wait()?;
        // Drain after try_wait so nothing written before QEMU exited is missed.
        let chunk = out_tail.read_new()?;
        if !chunk.is_empty() {
            let mut lock = stdout.lock();
            lock.write_all(&chunk).ok();
            lock.flush().ok();
            captured.extend_from_slice(&chunk);
        }
        for line in console.push(&con_tail.read_new()?) {
            if verbose {
                eprintln!("[vm console] {line}");
            }
            if boot_time.is_none() && line.contains("lbd-vm: running command") {
                boot_time = Some(start.elapsed());
            }
            if panic_seen.is_none() && line.contains("Kernel panic") {
                panic_seen = Some(Instant::now());
            }
        }
        if let Some(st) = exited {
            break Some(st);
        }
        if status_seen.is_none() && status_file.exists() {
            status_seen = Some(Instant::now());
        }
        if status_seen.is_some_and(|t| t.elapsed() > Duration::from_secs(10)) {
            // The command finished but the guest did not power off: not worth failing for.
            qemu_proc.kill();
            break None;
        }
        if panic_seen.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            qemu_proc.kill();
            break None;
        }
        if start.elapsed() > opts.timeout {
            qemu_proc.kill();
            if status_file.exists() {
                // The command finished just in time: its own status says more than a timeout.
                break None;
            }
            bail!(
                "VM timed out after {} s; last console lines:\n{}\n(full console log: {})",
                opts.timeout.as_secs(),
                console.last(CONSOLE_TAIL_LINES),
                console_log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };

    let output = String::from_utf8_lossy(&captured).into_owned();
    match fs::read_to_string(&status_file) {
        Ok(s) => {
            let exit_code = s.trim().parse::<i32>().map_err(|_| {
                anyhow!(
                    "VM wrote a malformed status {s:?} to {}",
                    status_file.display()
                )
            })?;
            Ok(VmOutput {
                exit_code,
                output,
                boot_time,
                console_tail: console.last(CONSOLE_TAIL_LINES),
                console_log,
            })
        }
        Err(_) if panic_seen.is_some() => bail!(
            "kernel panic in the VM; last console lines:\n{}\n(full console log: {})",
            console.panic_context(),
            console_log.display()
        ),
        Err(_) => {
            let qemu_out = fs::read_to_string(&qemu_log).unwrap_or_default();
            bail!(
                "VM exited without the command's status (QEMU {}); last console lines:\n{}\n{}(full console log: {})",
                exit.map_or("killed".to_string(), |s| s.to_string()),
                console.last(CONSOLE_TAIL_LINES),
                if qemu_out.trim().is_empty() {
                    String::new()
                } else {
                    format!("QEMU said:\n{}\n", qemu_out.trim_end())
                },
                console_log.display()
            )
        }
    }
}

/// The script the guest runs (`/bin/sh /run/lbd-vm/cmd.sh` inside the chroot, empty environment).
fn command_script(workdir: &Path, env: &[(String, String)], command: &[String]) -> Result<String> {
    let mut s = String::from("# generated by cargo xtask vm\n");
    let mut vars: Vec<(String, String)> = vec![
        ("PATH".into(), GUEST_PATH.into()),
        ("HOME".into(), "/root".into()),
        ("USER".into(), "root".into()),
        ("LOGNAME".into(), "root".into()),
        ("TERM".into(), "dumb".into()),
        ("LBD_IN_VM".into(), "1".into()),
    ];
    vars.extend(env.iter().cloned());
    for (k, v) in &vars {
        let valid = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            bail!("vm: invalid environment variable name {k:?}");
        }
        s += &format!("export {k}={}\n", sh_quote(v));
    }
    let workdir = workdir
        .to_str()
        .ok_or_else(|| anyhow!("vm: workdir is not UTF-8"))?;
    s += &format!("cd {} || exit 125\n", sh_quote(workdir));
    let script = if command.len() == 1 {
        command[0].clone()
    } else {
        command
            .iter()
            .map(|a| sh_quote(a))
            .collect::<Vec<_>>()
            .join(" ")
    };
    s += &format!("exec /bin/sh -c {}\n", sh_quote(&script));
    Ok(s)
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A path for a QEMU `key=value,...` option (commas are doubled).
fn qemu_path(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .ok_or_else(|| anyhow!("path {} is not UTF-8", p.display()))?;
    Ok(s.replace(',', ",,"))
}

struct KillOnDrop(Child);

impl KillOnDrop {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            self.kill();
        }
    }
}

/// Reads what was appended to a file since the last call.
struct Tail {
    path: PathBuf,
    pos: u64,
}

impl Tail {
    fn new(path: &Path) -> Self {
        Tail {
            path: path.to_path_buf(),
            pos: 0,
        }
    }

    fn read_new(&mut self) -> Result<Vec<u8>> {
        let mut f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let len = f.metadata()?.len();
        if len < self.pos {
            self.pos = 0; // truncated (QEMU opens chardev files with O_TRUNC)
        }
        f.seek(SeekFrom::Start(self.pos))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        self.pos += buf.len() as u64;
        Ok(buf)
    }
}

/// The last lines of the guest console, kept for error messages.
#[derive(Default)]
struct ConsoleLines {
    partial: Vec<u8>,
    lines: VecDeque<String>,
    panic_context: Option<Vec<String>>,
}

impl ConsoleLines {
    /// Add raw console bytes; returns the lines completed by them.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut done = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.partial.clear();
                if self.lines.len() == 200 {
                    self.lines.pop_front();
                }
                self.lines.push_back(line.clone());
                if self.panic_context.is_none() && line.contains("Kernel panic") {
                    // Keep the oops/backtrace before the panic line; the lines after are added below.
                    let n = self.lines.len();
                    self.panic_context = Some(
                        self.lines
                            .iter()
                            .skip(n.saturating_sub(40))
                            .cloned()
                            .collect(),
                    );
                } else if let Some(ctx) = &mut self.panic_context {
                    if ctx.len() < 80 {
                        ctx.push(line.clone());
                    }
                }
                done.push(line);
            } else {
                self.partial.push(b);
            }
        }
        done
    }

    fn last(&self, n: usize) -> String {
        let mut v: Vec<&str> = self
            .lines
            .iter()
            .skip(self.lines.len().saturating_sub(n))
            .map(String::as_str)
            .collect();
        let partial = String::from_utf8_lossy(&self.partial).to_string();
        if !partial.trim().is_empty() {
            v.push(&partial);
            return indent(&v);
        }
        if v.is_empty() {
            return "  (console empty)".to_string();
        }
        indent(&v)
    }

    fn panic_context(&self) -> String {
        match &self.panic_context {
            Some(ctx) => indent(&ctx.iter().map(String::as_str).collect::<Vec<_>>()),
            None => self.last(CONSOLE_TAIL_LINES),
        }
    }
}

fn indent(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Delete old run dirs (keep the newest [`RUNS_KEPT`] and any whose process is still alive).
fn prune_runs(runs: &Path) {
    let Ok(rd) = fs::read_dir(runs) else { return };
    let mut dirs: Vec<(SystemTime, PathBuf)> = rd
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(RUNS_KEPT);
    for (_, dir) in dirs.into_iter().take(excess) {
        let pid = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('-').next())
            .unwrap_or("");
        if !pid.is_empty() && Path::new("/proc").join(pid).exists() {
            continue;
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Host prerequisites and the cache.

fn vm_dir() -> PathBuf {
    crate::target_dir().join("vm")
}

fn stamp_ok(stamp: &Path, key: &str, artifact: &Path) -> bool {
    artifact.exists() && fs::read_to_string(stamp).is_ok_and(|s| s == key)
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn require_tool(name: &str, package: &str) -> Result<PathBuf> {
    find_tool(name).ok_or_else(|| {
        anyhow!(
            "`{name}` not found: install the Debian package {package} (apt-get install {package})"
        )
    })
}

struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    modules_dir: PathBuf,
    /// Identifies this exact kernel build (package version, vmlinuz size and mtime).
    key: String,
}

fn find_kernel() -> Result<Kernel> {
    const HINT: &str =
        "install the Debian package linux-image-amd64 (apt-get install linux-image-amd64)";
    let has_modules = |rel: &str| {
        Path::new("/lib/modules")
            .join(rel)
            .join("modules.dep")
            .is_file()
    };
    // The kernel Debian's linux-image-amd64 stands for (not a backports, rt or cloud one
    // installed beside it), else the newest plain -amd64 one.
    let metapackage = metapackage_kernel().filter(|rel| has_modules(rel));
    let release = match std::env::var("LBD_VM_KERNEL") {
        Ok(rel) if !rel.is_empty() => {
            if !Path::new("/boot").join(format!("vmlinuz-{rel}")).is_file() || !has_modules(&rel) {
                bail!("LBD_VM_KERNEL={rel}: /boot/vmlinuz-{rel} or /lib/modules/{rel}/modules.dep missing");
            }
            rel
        }
        _ if metapackage.is_some() => metapackage.expect("checked"),
        _ => {
            let mut rels: Vec<String> = fs::read_dir("/boot")
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| {
                            e.file_name()
                                .to_str()?
                                .strip_prefix("vmlinuz-")
                                .map(str::to_string)
                        })
                        .filter(|rel| has_modules(rel))
                        .collect()
                })
                .unwrap_or_default();
            rels.sort_by_key(|r| (r.ends_with("-amd64") && r.matches('-').count() == 2, version_key(r), r.clone()));
            rels.pop().ok_or_else(|| {
                anyhow!("no kernel for the VM (need /boot/vmlinuz-<ver> and /lib/modules/<ver>/modules.dep): {HINT}")
            })?
        }
    };
    let vmlinuz = Path::new("/boot").join(format!("vmlinuz-{release}"));
    let meta = fs::metadata(&vmlinuz).with_context(|| format!("{}: {HINT}", vmlinuz.display()))?;
    let pkg_version = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", &format!("linux-image-{release}")])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let key = format!(
        "{release} pkg={pkg_version} size={} mtime={}",
        meta.len(),
        mtime_secs(&meta)
    );
    Ok(Kernel {
        modules_dir: Path::new("/lib/modules").join(&release),
        release,
        vmlinuz,
        key,
    })
}

/// The release `linux-image-amd64` depends on (`linux-image-6.1.0-28-amd64 (= ...)` ->
/// `6.1.0-28-amd64`), if it is installed and its vmlinuz there.
fn metapackage_kernel() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Depends}", "linux-image-amd64"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let depends = String::from_utf8_lossy(&out.stdout).into_owned();
    depends
        .split(|c: char| c == ',' || c == '|' || c.is_whitespace())
        .filter_map(|word| word.strip_prefix("linux-image-"))
        .map(str::to_string)
        .find(|rel| Path::new("/boot").join(format!("vmlinuz-{rel}")).is_file())
}

fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

fn mtime_secs(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// Checks `/bin/busybox` is the static one; returns an identity string for the stamp.
fn check_busybox() -> Result<String> {
    const HINT: &str = "install the Debian package busybox-static (apt-get install busybox-static)";
    let data = fs::read(BUSYBOX).map_err(|e| anyhow!("{BUSYBOX}: {e}: {HINT}"))?;
    if elf_has_interp(&data)? {
        bail!("{BUSYBOX} is dynamically linked (the `busybox` package?): {HINT}");
    }
    Ok(format!(
        "busybox size={} hash={:016x}",
        data.len(),
        fnv1a(&data)
    ))
}

/// Whether an ELF64 little-endian file has a PT_INTERP program header (i.e. is dynamically linked).
fn elf_has_interp(d: &[u8]) -> Result<bool> {
    if d.len() < 64 || &d[..4] != b"\x7fELF" || d[4] != 2 || d[5] != 1 {
        bail!("not an ELF64 little-endian file");
    }
    let u16_at = |o: usize| u16::from_le_bytes([d[o], d[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(d[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > d.len() {
            break;
        }
        if u32::from_le_bytes(d[o..o + 4].try_into().unwrap()) == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Compression formats a Debian kernel/module may use: magic, CLI, package providing it.
const DECOMPRESSORS: &[(&[u8], &str, &[&str], &str)] = &[
    (
        b"\xfd7zXZ\x00",
        "xz",
        &["-dc", "--single-stream"],
        "xz-utils",
    ),
    (b"\x28\xb5\x2f\xfd", "zstd", &["-dc"], "zstd"),
    (b"\x1f\x8b\x08", "gzip", &["-dc"], "gzip"),
];

/// Extract the uncompressed ELF vmlinux from a bzImage (like the kernel's scripts/extract-vmlinux).
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let data = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        if data.starts_with(b"\x7fELF") {
            fs::write(&tmp, &data)?;
            return Ok(());
        }
        // Candidate payloads: the one the bzImage header points at, then every magic found.
        let mut candidates: Vec<(usize, usize)> = Vec::new();
        if data.len() > 0x250 && &data[0x202..0x206] == b"HdrS" {
            let setup_sects = match data[0x1f1] {
                0 => 4,
                n => n as usize,
            };
            let off = (setup_sects + 1) * 512
                + u32::from_le_bytes(data[0x248..0x24c].try_into().unwrap()) as usize;
            let len = u32::from_le_bytes(data[0x24c..0x250].try_into().unwrap()) as usize;
            // The kernel build appends the 4-byte uncompressed size to the payload.
            if len > 4 && off + len <= data.len() {
                candidates.push((off, off + len - 4));
            }
        }
        for (magic, ..) in DECOMPRESSORS {
            let mut from = 0;
            while let Some(i) = find(&data[from..], magic) {
                candidates.push((from + i, data.len()));
                from += i + 1;
                if candidates.len() > 32 {
                    break;
                }
            }
        }
        let mut missing = Vec::new();
        for (start, end) in candidates {
            let payload = &data[start..end];
            let Some((_, tool, args, package)) =
                DECOMPRESSORS.iter().find(|(m, ..)| payload.starts_with(m))
            else {
                continue;
            };
            let Some(tool_path) = find_tool(tool) else {
                missing.push(format!("`{tool}` (Debian package {package})"));
                continue;
            };
            if decompress(&tool_path, args, payload, &tmp).is_ok() && looks_like_vmlinux(&tmp) {
                return Ok(());
            }
        }
        if !missing.is_empty() {
            bail!(
                "cannot decompress {}: missing {}",
                vmlinuz.display(),
                missing.join(", ")
            );
        }
        bail!(
            "found no xz/zstd/gzip payload that decompresses to an ELF vmlinux in {}",
            vmlinuz.display()
        )
    })();
    match result {
        Ok(()) => fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display())),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn looks_like_vmlinux(p: &Path) -> bool {
    let mut head = [0u8; 5];
    File::open(p)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == b"\x7fELF\x02"
        && fs::metadata(p).is_ok_and(|m| m.len() > 4 << 20)
}

/// Pipe `input` through `tool args` into the file `out`.
fn decompress(tool: &Path, args: &[&str], input: &[u8], out: &Path) -> Result<()> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(File::create(out)?)
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", tool.display()))?;
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input); // EPIPE when the tool stops early is fine
    });
    let status = child.wait()?;
    let _ = writer.join();
    if !status.success() {
        bail!("{} {} failed: {status}", tool.display(), args.join(" "));
    }
    Ok(())
}

/// Read a module file, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz`.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let Some((_, tool, args, package)) = DECOMPRESSORS.iter().find(|(m, ..)| data.starts_with(m))
    else {
        return Ok(data);
    };
    let tool_path = find_tool(tool).ok_or_else(|| {
        anyhow!(
            "{} is compressed: install `{tool}` (Debian package {package})",
            path.display()
        )
    })?;
    // Through a pipe: no file to leave behind, or to find planted in a shared directory.
    let mut child = Command::new(&tool_path)
        .args(*args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("running {}", tool_path.display()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data); // EPIPE when the tool stops early is fine
    });
    let out = child.wait_with_output()?;
    let _ = writer.join();
    if !out.status.success() {
        bail!("{} {} failed on {}: {}", tool_path.display(), args.join(" "), path.display(), out.status);
    }
    Ok(out.stdout)
}

/// `foo-bar.ko.xz` -> `foo_bar` (module names treat `-` and `_` alike).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The modules to insmod (relative paths under the modules dir), dependencies first.
fn module_load_order(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    let dep_path = modules_dir.join("modules.dep");
    let dep_text =
        fs::read_to_string(&dep_path).with_context(|| format!("reading {}", dep_path.display()))?;
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep_text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            module_name(module),
            (
                module.to_string(),
                rest.split_whitespace().map(module_name).collect(),
            ),
        );
    }
    let builtin: HashSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(module_name)
        .collect();

    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        builtin: &HashSet<String>,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
        modules_dir: &Path,
    ) -> Result<()> {
        if builtin.contains(name) || !seen.insert(name.to_string()) {
            return Ok(());
        }
        let (path, ds) = deps.get(name).ok_or_else(|| {
            anyhow!(
                "module {name} is neither built in nor listed in {}/modules.dep",
                modules_dir.display()
            )
        })?;
        for d in ds {
            visit(d, deps, builtin, seen, order, modules_dir)?;
        }
        order.push(path.clone());
        Ok(())
    }

    let (mut seen, mut order) = (HashSet::new(), Vec::new());
    for w in wanted {
        visit(
            &w.replace('-', "_"),
            &deps,
            &builtin,
            &mut seen,
            &mut order,
            modules_dir,
        )?;
    }
    Ok(order)
}

fn build_initramfs(kernel: &Kernel, out: &Path) -> Result<()> {
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "sbin", "dev", "proc", "sys", "tmp", "lower", "rw", "newroot", "modules",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    cpio.entry("dev/console", 0o020600, (5, 1), &[]);
    cpio.file("init", 0o755, INIT_SH.as_bytes());
    cpio.file("sbin/modprobe", 0o755, MODPROBE_SH.as_bytes());
    cpio.file("bin/busybox", 0o755, &fs::read(BUSYBOX)?);
    let mut order = String::new();
    for rel in module_load_order(&kernel.modules_dir, GUEST_MODULES)? {
        let name = module_name(&rel);
        cpio.file(
            &format!("modules/{name}.ko"),
            0o644,
            &read_module(&kernel.modules_dir.join(&rel))?,
        );
        order += &name;
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes());
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, cpio.finish()).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))
}

/// Minimal writer for the `newc` cpio format the kernel unpacks as initramfs.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_script_quotes_argv() {
        let dir = std::env::temp_dir();
        let argv: Vec<String> = ["printf", "%s|", "a b", "c'd", "$HOME", "$FOO"]
            .map(String::from)
            .to_vec();
        let script = command_script(&dir, &[("FOO".into(), "x 'y'".into())], &argv).unwrap();
        let path = dir.join(format!("lbd-vm-test-{}.sh", std::process::id()));
        fs::write(&path, script).unwrap();
        let out = Command::new("/bin/sh")
            .arg(&path)
            .env_clear()
            .output()
            .unwrap();
        let _ = fs::remove_file(&path);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b|c'd|$HOME|$FOO|");
        // One word is a shell script.
        let script = command_script(&dir, &[], &["echo $HOME".into()]).unwrap();
        assert!(script.ends_with("exec /bin/sh -c 'echo $HOME'\n"));
        assert!(command_script(&dir, &[("A-B".into(), String::new())], &argv).is_err());
    }

    /// Boots the real VM (a few seconds; `cargo xtask test` runs it, so CI does): output, the
    /// environment and the exit code come back, and IPVS works inside (which the host lacks).
    #[test]
    fn run_reports_output_env_and_exit_code_and_has_ipvs() {
        let opts = VmOptions {
            timeout: Duration::from_secs(180),
            env: vec![("LBD_X".into(), "y z".into())],
            ..VmOptions::default()
        };
        let script = "uname -r; echo \"$LBD_X\" >&2; modprobe ip_vs && ipvsadm -Ln | head -1; exit 3";
        let argv = ["sh", "-c", script].map(String::from);
        let out = run(&opts, &argv).unwrap();
        assert_eq!(out.exit_code, 3);
        let release = prepare().unwrap().kernel_release;
        assert_eq!(out.output, format!("{release}\ny z\nIP Virtual Server version 1.2.1 (size=4096)\n"));
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/net/9p/9pnet_virtio.ko"), "9pnet_virtio");
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz"),
            "virtio_rng"
        );
    }
}
