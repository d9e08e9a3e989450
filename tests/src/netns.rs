//! Network namespaces for tests and the rig. Every namespace is deleted on drop (processes in it are
//! killed first), so a failing test leaves nothing behind.

use std::{
    fs::File,
    os::fd::AsFd,
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// How long a command [`run`] starts may take before it is killed: nothing the tests run takes
/// more than seconds, so a hang fails its test instead of holding up the whole run.
pub const COMMAND_LIMIT_SECS: u32 = 120;

/// Runs a host command (killed after [`COMMAND_LIMIT_SECS`]); fails with its stderr.
pub fn run(args: &[&str]) -> Result<String> {
    let limit = COMMAND_LIMIT_SECS.to_string();
    let out = Command::new("timeout")
        .args(["--kill-after=5", &limit])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if out.status.code() == Some(124) || out.status.code() == Some(137) {
        bail!("{args:?} did not finish in {COMMAND_LIMIT_SECS} s (killed): {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    if !out.status.success() {
        bail!("{args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails loudly unless we are root: netns tests must never be skipped silently.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("this test needs root (network namespaces, XDP); run it through `cargo xtask test` as root");
    }
    Ok(())
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates (or recreates, if a previous run left it) the namespace, with `lo` up. What an
    /// interrupted run left in it (Ctrl-C runs no destructor: nginx, lbd) is killed first, or it
    /// would live on in the deleted namespace.
    pub fn new(name: &str) -> Result<Self> {
        remove(name);
        run(&["ip", "netns", "add", name])?;
        let ns = Self { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    /// Runs a command inside the namespace and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    /// `sh -c CMD` inside the namespace.
    pub fn sh(&self, cmd: &str) -> Result<String> {
        self.exec(&["sh", "-c", cmd])
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]).map(drop)
    }

    /// Starts a long-running process inside the namespace.
    pub fn spawn(&self, args: &[&str], log: Option<&std::path::Path>) -> Result<Child> {
        self.spawn_with(args, log, |_| {})
    }

    /// [`Self::spawn`], letting `adjust` change the command first (e.g. a seccomp filter).
    pub fn spawn_with(&self, args: &[&str], log: Option<&std::path::Path>, adjust: impl FnOnce(&mut Command)) -> Result<Child> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args).stdin(Stdio::null());
        if let Some(path) = log {
            let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
            cmd.stdout(f.try_clone()?).stderr(f);
        }
        adjust(&mut cmd);
        cmd.spawn().with_context(|| format!("starting {args:?} in {}", self.name))
    }

    /// [`Self::spawn_with`] entering only the network namespace (`nsenter --net`), not a mount
    /// namespace of its own as `ip netns exec` does, whose fresh `/sys` hides the host's bpffs at
    /// `/sys/fs/bpf`: for `lbd run`, which keeps its fast path there across a restart.
    pub fn spawn_net_with(&self, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Result<Child> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.name)).arg("--").args(args).stdin(Stdio::null());
        adjust(&mut cmd);
        cmd.spawn().with_context(|| format!("starting {args:?} in {}", self.name))
    }

    /// The id of the XDP program attached to `dev` here, if any (`ip -d link show`).
    pub fn xdp_program(&self, dev: &str) -> Result<Option<u32>> {
        let link = self.exec(&["ip", "-d", "link", "show", dev])?;
        Ok(link.split_once("prog/xdp id ").and_then(|(_, rest)| rest.split_whitespace().next()).and_then(|id| id.parse().ok()))
    }

    /// Runs `f` on a thread that has entered this namespace (its sockets live there).
    pub fn enter<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.spawn_in(move || Ok(f())).join().map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }

    /// Runs `f` on a new thread that has entered this namespace first, without waiting for it;
    /// the thread's result is `f`'s, or why it could not enter.
    pub fn spawn_in<F, R>(&self, f: F) -> std::thread::JoinHandle<Result<R>>
    where
        F: FnOnce() -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || -> Result<R> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {path}"))?;
            f()
        })
    }

    /// Reads an interface's MAC inside the namespace.
    pub fn mac(&self, iface: &str) -> Result<[u8; 6]> {
        let text = self.exec(&["cat", &format!("/sys/class/net/{iface}/address")])?;
        parse_mac(text.trim())
    }
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s:?}"))?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s:?}"))
}

/// Kills the processes in namespace `name`, if there is one, and deletes it.
fn remove(name: &str) {
    if let Ok(pids) = run(&["ip", "netns", "pids", name]) {
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove(&self.name);
    }
}
