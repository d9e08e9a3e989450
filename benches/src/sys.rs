//! Small system helpers: running a closure inside a network namespace, CPU pinning, CPU time of
//! threads, statistics of samples, the machine's description.

use std::{fs::File, os::fd::AsFd, time::Duration};

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// Runs `f` on a scoped thread that entered network namespace `ns` (and, if `cpu` is given, is
/// pinned to that CPU). Borrows are fine: the thread ends before this returns.
pub fn in_ns<R: Send>(ns: &str, cpu: Option<usize>, f: impl FnOnce() -> R + Send) -> Result<R> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<R> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {path}"))?;
            if let Some(cpu) = cpu {
                pin_thread(0, cpu)?;
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in namespace {ns} panicked"))?
    })
}

/// Pins thread `tid` (0 = the calling thread) to `cpu`.
pub fn pin_thread(tid: i32, cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).context("CPU number")?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set)
        .with_context(|| format!("pinning thread {tid} to CPU {cpu}"))
}

/// CPU time of process `pid` (a kernel thread, here) by its CPU-time clock. Not
/// `/proc/PID/schedstat`: the kernel updates that figure at scheduler events and ticks (every
/// 4 ms at HZ=250), so it lags a thread that is running by up to a tick, a tenth of a quick run.
pub fn cpu_time(pid: i32) -> Result<Duration> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid writes the clock id it is given a place for.
    let rc = unsafe { libc::clock_getcpuclockid(pid, &mut clock) };
    if rc != 0 {
        bail!("no CPU-time clock for pid {pid}: {}", std::io::Error::from_raw_os_error(rc));
    }
    clock_time(clock).with_context(|| format!("reading the CPU-time clock of pid {pid}"))
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`, exact where `schedstat` lags: see
/// [`cpu_time`]).
pub fn thread_cpu_time() -> Result<Duration> {
    clock_time(libc::CLOCK_THREAD_CPUTIME_ID).context("reading CLOCK_THREAD_CPUTIME_ID")
}

fn clock_time(clock: libc::clockid_t) -> std::io::Result<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the timespec it is given.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Kernel threads whose name starts with `prefix` (e.g. `napi/lbbd-`): their pids.
pub fn kthreads(prefix: &str) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) {
                if comm.trim_end().starts_with(prefix) {
                    out.push(pid);
                }
            }
        }
    }
    out.sort_unstable();
    out
}

/// Median, minimum and maximum of some samples (the samples are kept for the JSON file).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        let mut v = samples.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = match n {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        };
        Summary {
            median,
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
            samples: samples.to_vec(),
        }
    }
}

/// What the report says about the machine.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub virtualization: String,
    pub bpf_jit: String,
    pub bpf_stats_enabled: String,
    pub date_utc: String,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let hypervisor = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.contains(" hypervisor"));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let uname = nix::sys::utsname::uname().ok();
    let kernel = uname
        .map(|u| {
            format!(
                "{} {} {}",
                u.sysname().to_string_lossy(),
                u.release().to_string_lossy(),
                u.machine().to_string_lossy()
            )
        })
        .unwrap_or_else(|| "?".into());
    let date_utc = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Machine {
        cpu_model,
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel,
        virtualization: if hypervisor {
            "virtual machine (hypervisor flag set)".into()
        } else {
            "bare metal".into()
        },
        bpf_jit: read_trim("/proc/sys/net/core/bpf_jit_enable"),
        bpf_stats_enabled: read_trim("/proc/sys/kernel/bpf_stats_enabled"),
        date_utc,
    }
}

/// Progress on stderr: one line per step, numbered.
pub struct Progress {
    pub done: usize,
    pub total: usize,
    start: std::time::Instant,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Progress {
            done: 0,
            total,
            start: std::time::Instant::now(),
        }
    }
    /// The next step starts; fails once SIGINT or SIGTERM came, so that the run ends through its
    /// error paths and what it set up is removed.
    pub fn step(&mut self, what: &str) -> anyhow::Result<()> {
        if lb_tests::rig::stopped() {
            anyhow::bail!("interrupted");
        }
        self.done += 1;
        self.total = self.total.max(self.done);
        eprintln!(
            "bench [{:>3}/{:<3} {:>5.1}s] {what}",
            self.done,
            self.total,
            self.start.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
