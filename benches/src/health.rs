//! Part 3 (continued): the health-check load. lbd's own controller (config, scheduler with the
//! real probes, the XDP dataplane's maps) checks N real servers: loopback aliases inside a private
//! namespace, every one answered by one nginx there, TCP checks every second. Measured: checks per
//! second, the CPU the bench process spends on them (the controller's share: nginx runs in its own
//! process), and the time from a check's state change reaching the controller to the dataplane
//! holding the new table.

use std::{
    collections::HashMap,
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_tests::netns::Netns;
use lb_userspace::{
    config::Config,
    daemon::{Controller, IfaceInfo},
    dataplane::DataplaneStats,
    health::{Health, HealthEvent, Scheduler, SchedulerOptions},
    xdp::{XdpDataplane, XdpOptions},
};
use serde::Serialize;

use crate::sys::{Progress, Summary};

#[derive(Clone, Debug)]
pub struct Params {
    /// Real servers checked, one run each.
    pub backends: Vec<usize>,
    /// Seconds of steady checking measured per run.
    pub seconds: u64,
    /// State changes (down, then up again) timed per run.
    pub changes: usize,
}

/// Real servers per virtual server.
const PER_VIP: usize = 100;

#[derive(Clone, Debug, Serialize)]
pub struct HealthRun {
    pub backends: usize,
    pub virtual_servers: usize,
    pub interval_ms: u64,
    pub seconds: f64,
    /// Checks completed per second (all passed: see `failed`).
    pub checks_per_s: f64,
    /// Real servers down at the end of the steady part, when nothing had been changed (should be 0).
    pub failed: u64,
    /// CPU of the bench process (controller, scheduler, probes) per wall second: 1.0 = one core.
    pub cpu_cores: f64,
    /// From the controller receiving a state change to `apply` returning (table rebuilt, maps
    /// written, VIP flipped), ms.
    pub change_to_dataplane_ms: Summary,
    /// The controller thread's CPU time over the same span, ms: the work itself, without the
    /// time the thread waited for a core (the probes, nginx and the rest of the machine share
    /// two).
    pub change_cpu_ms: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct HealthLoad {
    pub runs: Vec<HealthRun>,
}

fn alias(i: usize) -> String {
    format!("10.77.{}.{}", i / 250, 1 + i % 250)
}

/// CPU time of the calling thread, seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn ip_batch(ns: &Netns, lines: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", &ns.name, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    child.stdin.take().context("stdin")?.write_all(lines.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("ip -batch failed ({status})");
    }
    Ok(())
}

fn start_nginx(ns: &Netns, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{ listen 80 backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let conf_arg = dir.join("nginx.conf").display().to_string();
    let err_arg = dir.join("error.log").display().to_string();
    ns.exec(&["nginx", "-e", &err_arg, "-c", &conf_arg]).context("starting nginx")?;
    Ok(())
}

fn config_text(n: usize) -> String {
    let vips = n.div_ceil(PER_VIP);
    let mut text = format!(
        "[director]\ninterface = \"lo\"\nmode = \"xdp\"\ncontrol_socket = \"/tmp/lbd-bench-health.sock\"\n\
         max_vips = {vips}\nmax_backends = {n}\ntable_size = 65537\n"
    );
    for v in 0..vips {
        text += &format!(
            "\n[[virtual_server]]\naddress = \"10.78.{}.{}\"\nport = 80\n\
             health_check = {{ kind = \"tcp\", interval = \"1s\", timeout = \"1s\", rise = 1, fall = 1, retries = 0 }}\n",
            v / 250,
            1 + v % 250
        );
        for i in v * PER_VIP..((v + 1) * PER_VIP).min(n) {
            text += &format!("[[virtual_server.real_server]]\naddress = \"{}\"\nmac = \"02:00:00:00:00:01\"\n", alias(i));
        }
    }
    text
}

/// Checks done and failed so far, over every real server.
fn totals(ctl: &Controller) -> (u64, u64) {
    let st = ctl.status(&DataplaneStats::default());
    let mut checks = 0;
    let mut down = 0;
    for vs in &st.virtual_servers {
        for rs in &vs.real_servers {
            if let Some(h) = &rs.health {
                checks += h.state.checks;
                down += u64::from(h.state.state != Health::Up);
            }
        }
    }
    (checks, down)
}

fn one(n: usize, p: &Params, progress: &mut Progress) -> Result<HealthRun> {
    progress.step(&format!("control: health checks of {n} real servers (tcp, every second)"))?;
    let ns = Netns::new("lbdb-hc")?;
    ns.ip(&["link", "set", "lo", "up"])?;
    let lines: String = (0..n).map(|i| format!("address add {}/32 dev lo\n", alias(i))).collect();
    ip_batch(&ns, &lines)?;
    let dir = std::env::temp_dir().join("lbd-bench-health");
    let _ = std::fs::remove_dir_all(&dir);
    start_nginx(&ns, &dir)?;
    let name = ns.name.clone();
    // Dropping the namespace afterwards kills nginx with it.
    crate::sys::in_ns(&name, None, || measure(n, p, &ns))?
}

fn measure(n: usize, p: &Params, ns: &Netns) -> Result<HealthRun> {
    let config = Config::parse(&config_text(n), "bench.toml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let d = &config.director;
    let dp = XdpDataplane::load(XdpOptions {
        table_size: d.table_size,
        max_vips: d.max_vips,
        max_backends: d.max_backends,
        conntrack_size: 1024,
        log_level: 0,
        keep: None,
    })?;
    let ifaces = HashMap::from([("lo".to_string(), IfaceInfo { ifindex: 1, mac: [0; 6] })]);
    let mut ctl = Controller::new(config, "bench.toml".into(), Box::new(dp), ifaces);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<HealthEvent>(4096);
        ctl.start_health(Scheduler::new(tx, SchedulerOptions::default()));
        ctl.apply()?;
        // Past the warm-up (a random start within the first interval) and one more round.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (c0, _) = totals(&ctl);
        let (cpu0, t0) = (cpu_seconds(), Instant::now());
        tokio::time::sleep(Duration::from_secs(p.seconds)).await;
        let (c1, down) = totals(&ctl);
        let (cpu1, wall) = (cpu_seconds(), t0.elapsed().as_secs_f64());
        if c1 <= c0 {
            bail!("no checks ran ({c0} → {c1})");
        }

        let mut samples = Vec::new();
        let mut cpu_samples = Vec::new();
        for k in 0..p.changes {
            let victim = (k * 37 + 11) % n;
            for (verb, up) in [("del", false), ("add", true)] {
                ns.ip(&["address", verb, &format!("{}/32", alias(victim)), "dev", "lo"])?;
                let ev = loop {
                    let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                        .await
                        .with_context(|| format!("no health event within 5 s after `ip address {verb}`"))?
                        .context("scheduler gone")?;
                    if ev.up == up && ev.real_server_key == format!("{}:80", alias(victim)) {
                        break ev;
                    }
                };
                let (t, cpu) = (Instant::now(), thread_cpu_seconds());
                ctl.on_health([&ev])?;
                samples.push(t.elapsed().as_secs_f64() * 1e3);
                cpu_samples.push((thread_cpu_seconds() - cpu) * 1e3);
                let vs = &ctl.desired()[victim / PER_VIP];
                let present = vs.backends.iter().any(|b| b.key() == ev.real_server_key);
                if present != up {
                    bail!("the dataplane state does not follow the check of {}", ev.real_server_key);
                }
            }
        }
        Ok(HealthRun {
            backends: n,
            virtual_servers: n.div_ceil(PER_VIP),
            interval_ms: 1000,
            seconds: wall,
            checks_per_s: (c1 - c0) as f64 / wall,
            failed: down,
            cpu_cores: (cpu1 - cpu0) / wall,
            change_to_dataplane_ms: Summary::of(&samples),
            change_cpu_ms: Summary::of(&cpu_samples),
        })
    })
}

pub fn run_all(p: &Params, progress: &mut Progress) -> Result<HealthLoad> {
    let mut runs = Vec::new();
    for &n in &p.backends {
        runs.push(one(n, p, progress).with_context(|| format!("{n} real servers"))?);
    }
    Ok(HealthLoad { runs })
}
