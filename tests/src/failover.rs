//! Two lbd directors in one VRRP virtual router on the rig of [`Rig::up_pair`]: their configs,
//! starting and signalling them, their VRRP state as their control sockets report it, and a
//! client loop that counts failed requests across a takeover (`tests/tests/vrrp_failover.rs`).
//!
//! Director 0 is `{prefix}-dir` (10.99.0.10), director 1 `{prefix}-dir2` (10.99.0.20). Both carry
//! the same virtual servers (the VIP's HTTP and UDP services on the rig's three backends) and one
//! `[[vrrp_instance]]` VI_1 (VRID 51) covering the VIP. Every wait is bounded.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Child,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_userspace::{
    control::{self, Request},
    status::Status,
    vrrp::{VrrpInstanceStatus, VrrpState},
};
use nix::sys::signal::Signal;

use crate::{
    netns::Netns,
    rig::{backend_v4, lbd_binary, Rig, SecondDirector, DIRECTOR2_V4, DIRECTOR_V4, HTTP_PORT, UDP_PORT, VIP_V4},
    vrrp::Mac,
};

/// The virtual router id of the pair (and of the keepalived peer in interop tests).
pub const VRID: u8 = 51;

/// How the pair's `[[vrrp_instance]]`s are configured.
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// Of director 0 and director 1.
    pub priorities: [u8; 2],
    pub version: u8,
    pub advert_interval: &'static str,
    pub preempt: bool,
    /// Adverts by unicast to the other director instead of multicast.
    pub unicast: bool,
    pub auth_pass: Option<&'static str>,
    /// The directors' `mode`: `"xdp"` (native) or `"ipvs"` (then the VIP must be local: see
    /// [`Pair::vip_on_lo`]).
    pub mode: &'static str,
}

impl Default for PairOptions {
    /// v3, 100 ms adverts, priorities 150 and 100, preempt, multicast, native XDP.
    fn default() -> Self {
        PairOptions { priorities: [150, 100], version: 3, advert_interval: "100ms", preempt: true, unicast: false, auth_pass: None, mode: "xdp" }
    }
}

/// One `lbd run` on a director.
pub struct Lbd {
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Drop for Lbd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // What it kept for its next start (see `Rig`'s drop).
        let _ = lb_userspace::keep::Keep::for_socket(&self.socket).remove();
    }
}

pub struct Pair {
    /// Dropped first: the daemons, then the second director, then the rig.
    pub lbd: Vec<Lbd>,
    pub second: SecondDirector,
    pub rig: Rig,
    pub opts: PairOptions,
}

/// A director's address on the rig.
pub fn director_v4(i: usize) -> Ipv4Addr {
    [DIRECTOR_V4, DIRECTOR2_V4][i]
}

/// A director's MAC on the rig (set by the rig's wiring).
pub fn director_mac(i: usize) -> Mac {
    [0x02, 0x99, 0, 0, 0, [10, 20][i]]
}

impl Pair {
    /// The rig with two directors, each with its config written (not started).
    pub fn up(prefix: &str, opts: PairOptions) -> Result<Pair> {
        let (rig, second) = Rig::up_pair(prefix, 3)?;
        let mut pair = Pair { lbd: Vec::new(), second, rig, opts };
        for i in 0..2 {
            let lbd = Lbd {
                config: pair.rig.work.join(format!("lbd-{i}.toml")),
                socket: pair.rig.work.join(format!("lbd-{i}.sock")),
                log: pair.rig.work.join(format!("lbd-{i}.log")),
                child: None,
            };
            pair.lbd.push(lbd);
            pair.write_config(i, &pair.opts.clone())?;
        }
        Ok(pair)
    }

    pub fn ns(&self, i: usize) -> &Netns {
        if i == 0 {
            &self.rig.director
        } else {
            &self.second.ns
        }
    }

    /// Writes director `i`'s config with `opts` (used by the next start or reload).
    pub fn write_config(&self, i: usize, opts: &PairOptions) -> Result<()> {
        std::fs::write(&self.lbd[i].config, director_config(&self.lbd[i].socket, i, opts)).context("writing a director config")
    }

    /// Starts lbd on director `i`; waits until it answers with its VRRP instance and every
    /// real server resolved.
    pub fn start(&mut self, i: usize) -> Result<()> {
        let bin = lbd_binary()?;
        let lbd = &mut self.lbd[i];
        let _ = std::fs::remove_file(&lbd.socket);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&lbd.log)?;
        let config = lbd.config.display().to_string();
        let child = self.ns(i).spawn_net_with(&[bin.to_str().expect("UTF-8 path"), "run", "--config", &config], |cmd| {
            if let Ok(f2) = log.try_clone() {
                cmd.stdout(f2).stderr(log);
            }
        })?;
        self.lbd[i].child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(st) = self.status(i) {
                let resolved = st.virtual_servers.iter().all(|v| v.real_servers.iter().all(|r| r.state == "up"));
                if !st.vrrp.is_empty() && !st.virtual_servers.is_empty() && resolved {
                    return Ok(());
                }
            }
            if let Some(status) = self.lbd[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("lbd on director {i} exited ({status}) during start-up:\n{}", self.log(i));
            }
            if Instant::now() > deadline {
                bail!("lbd on director {i} was not ready within 20 s:\n{}", self.log(i));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `sig` to director `i`'s lbd; returns when it was sent.
    pub fn signal(&mut self, i: usize, sig: Signal) -> Result<Instant> {
        let child = self.lbd[i].child.as_ref().context("lbd is not running")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let at = Instant::now();
        nix::sys::signal::kill(pid, sig)?;
        Ok(at)
    }

    /// Waits (up to `limit`) for director `i`'s lbd to exit.
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> Result<()> {
        let mut child = self.lbd[i].child.take().context("lbd is not running")?;
        let start = Instant::now();
        while start.elapsed() < limit {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("lbd on director {i} did not exit within {limit:?}:\n{}", self.log(i))
    }

    /// `lbd reload` of director `i` (after [`Self::write_config`]).
    pub fn reload(&self, i: usize) -> Result<()> {
        let resp = control::request(&self.lbd[i].socket, &Request::Reload)?;
        if !resp.ok {
            bail!("reload refused: {}", resp.error.unwrap_or_default());
        }
        Ok(())
    }

    pub fn status(&self, i: usize) -> Result<Status> {
        let resp = control::request(&self.lbd[i].socket, &Request::Status)?;
        resp.status.with_context(|| format!("no status: {:?}", resp.error))
    }

    /// Director `i`'s VI_1 as its status shows it.
    pub fn instance(&self, i: usize) -> Result<VrrpInstanceStatus> {
        self.status(i)?.vrrp.into_iter().next().context("no VRRP instance in the status")
    }

    /// Waits until director `i`'s VI_1 is in `state` (polling its control socket every 5 ms);
    /// returns when it entered it: the time in state the status gives, back from when the
    /// answer arrived (so never early; late by the answer's way back, well under a ms).
    pub fn wait_state(&self, i: usize, state: VrrpState, limit: Duration) -> Result<Instant> {
        let start = Instant::now();
        loop {
            if let Ok(inst) = self.instance(i) {
                if inst.state == state {
                    return Ok(Instant::now() - Duration::from_secs_f64(inst.in_state_secs));
                }
            }
            if start.elapsed() > limit {
                let now = self.instance(i).map(|s| s.state.to_string()).unwrap_or_else(|e| e.to_string());
                bail!("director {i} was not {state} within {limit:?} (it is {now}); log:\n{}", self.log(i));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// For `mode = "ipvs"` (IPVS only sees traffic to local addresses): the VIP on both
    /// directors' `lo`, and their `eth0` neither answering ARP for it nor using it as a source,
    /// as README's failover section tells operators (lbd answers ARP while master).
    pub fn vip_on_lo(&self) -> Result<()> {
        (0..2).try_for_each(|i| crate::rig::vip_on_lo(self.ns(i), false))
    }

    /// Whether director `i`'s fast path carries the VIP's HTTP service.
    pub fn carries(&self, i: usize) -> Result<bool> {
        Ok(self.status(i)?.virtual_servers.iter().all(|v| v.enabled))
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.lbd[i].log).unwrap_or_default()
    }
}

/// A director's config: the rig's HTTP and UDP services and VI_1 as `opts` says.
pub fn director_config(socket: &std::path::Path, i: usize, opts: &PairOptions) -> String {
    let xdp_mode = if opts.mode == "xdp" { "xdp_mode = \"native\"\n" } else { "" };
    let mut text = format!(
        "[director]\ninterface = \"eth0\"\nmode = \"{}\"\n{xdp_mode}control_socket = \"{}\"\n",
        opts.mode,
        socket.display()
    );
    for (port, proto) in [(HTTP_PORT, "tcp"), (UDP_PORT, "udp")] {
        text += &format!("\n[[virtual_server]]\naddress = \"{VIP_V4}\"\nport = {port}\nprotocol = \"{proto}\"\n");
        for b in 0..3 {
            text += &format!("[[virtual_server.real_server]]\naddress = \"{}\"\n", backend_v4(b));
        }
    }
    text += &vrrp_instance(i, opts);
    text
}

/// Director `i`'s `[[vrrp_instance]]`.
pub fn vrrp_instance(i: usize, opts: &PairOptions) -> String {
    let mut text = format!(
        "\n[[vrrp_instance]]\nname = \"VI_1\"\ninterface = \"eth0\"\nvirtual_router_id = {VRID}\npriority = {}\n\
         advert_interval = \"{}\"\nversion = {}\npreempt = {}\nvirtual_addresses = [\"{VIP_V4}/24\"]\n\
         garp_master_delay = \"1s\"\n",
        opts.priorities[i], opts.advert_interval, opts.version, opts.preempt
    );
    if opts.unicast {
        text += &format!("unicast_source = \"{}\"\nunicast_peers = [\"{}\"]\n", director_v4(i), director_v4(1 - i));
    }
    if let Some(p) = opts.auth_pass {
        text += &format!("authentication = {{ auth_type = \"PASS\", auth_pass = \"{p}\" }}\n");
    }
    text
}

/// What a [`ClientLoop`] saw.
#[derive(Debug)]
pub struct LoopReport {
    pub requests: usize,
    pub failed: usize,
    /// The longest time between two answered requests (the outage a client saw).
    pub longest_gap: Duration,
    /// The backends that answered.
    pub answered_by: std::collections::BTreeSet<String>,
}

/// HTTP requests from the client to the VIP, back to back, each on a new connection with
/// short timeouts (connect 200 ms, answer 300 ms), so a takeover shows as failed requests.
pub struct ClientLoop {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<LoopReport>>>,
}

impl ClientLoop {
    pub fn start(client: &Netns) -> Result<ClientLoop> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = client.spawn_in(move || -> Result<LoopReport> {
            let vip = SocketAddr::new(IpAddr::V4(VIP_V4), HTTP_PORT);
            let mut report = LoopReport { requests: 0, failed: 0, longest_gap: Duration::ZERO, answered_by: Default::default() };
            let mut last_ok = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                report.requests += 1;
                match one_request(vip) {
                    Ok(name) => {
                        report.longest_gap = report.longest_gap.max(last_ok.elapsed());
                        last_ok = Instant::now();
                        report.answered_by.insert(name);
                    }
                    Err(_) => report.failed += 1,
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            report.longest_gap = report.longest_gap.max(last_ok.elapsed());
            Ok(report)
        });
        Ok(ClientLoop { stop, thread: Some(thread) })
    }

    pub fn stop(mut self) -> Result<LoopReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("running").join().map_err(|_| anyhow::anyhow!("client loop panicked"))?
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn one_request(vip: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    if !resp.starts_with("HTTP/1.1 200") {
        bail!("unexpected response {resp:?}");
    }
    Ok(resp.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).unwrap_or_default())
}

/// The client's neighbour entry for the VIP (`ip neigh`), e.g. `02:99:00:00:00:0a`.
pub fn client_neigh(rig: &Rig) -> Result<String> {
    let out = rig.client.ip(&["neigh", "show", &VIP_V4.to_string(), "dev", "eth0"])?;
    Ok(out.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).unwrap_or("").to_string())
}
