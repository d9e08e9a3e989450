//! The rig: a client, a director and backends on one L2 segment (a bridge in its own namespace).
//! Backends run nginx and a UDP responder, hold the VIPs on `lo` with `arp_ignore=1` and
//! `arp_announce=2` (classic DSR real servers); the director holds the VIPs on its `eth0` so its
//! kernel answers ARP/ND for them, and runs `lbd`. All addresses live inside the rig's namespaces.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
pub const DIRECTOR_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);
/// The second director of [`Rig::up_pair`].
pub const DIRECTOR2_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 20);
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 100);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x100);
pub const HTTP_PORT: u16 = 80;
/// The size of every backend's `/big`.
pub const BIG_BODY: usize = 64 * 1024;
pub const UDP_PORT: u16 = 5353;

pub fn backend_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 11 + i as u8)
}

pub fn backend_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 0x11 + i as u16)
}

/// The name backend `i` answers with (HTTP body and UDP reply).
pub fn backend_name(i: usize) -> String {
    format!("be{}", i + 1)
}

/// `config/rig.toml` with another control socket, for rigs that run side by side.
pub fn rig_config(socket: &Path) -> String {
    let text = include_str!("../../config/rig.toml");
    text.replace("/run/lbd/rig.sock", &socket.display().to_string())
}

/// The VIP (`VIP_V4`, and `VIP_V6` if `v6`) on `ns`'s `lo`, with `eth0` neither answering ARP for
/// it nor using it as a source (`arp_ignore=1`, `arp_announce=2`): a classic DSR real server, or
/// a director in IPVS mode, where the VIP must be local.
pub fn vip_on_lo(ns: &Netns, v6: bool) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])?;
    if v6 {
        ns.ip(&["addr", "add", &format!("{VIP_V6}/128"), "dev", "lo"])?;
    }
    for (k, v) in [("arp_ignore", "1"), ("arp_announce", "2")] {
        ns.sysctl(&format!("net.ipv4.conf.all.{k}"), v)?;
        ns.sysctl(&format!("net.ipv4.conf.eth0.{k}"), v)?;
    }
    Ok(())
}

/// Path of the `lbd` binary next to the running test/xtask binary (built by `cargo xtask`), or
/// `$LBD_BIN`.
pub fn lbd_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LBD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("lbd");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("lbd binary not found near {} (run `cargo build -p lb-userspace` or set LBD_BIN)", exe.display())
}

struct UdpResponder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for UdpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Rig {
    pub work: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    lbd: Option<Child>,
    udp: Vec<UdpResponder>,
    /// Next unused client source port (see `ports`).
    next_port: std::sync::atomic::AtomicU16,
    /// `xdp_pass` on the director's peer port (see `lb_userspace::xdp::attach_pass`).
    _peer_pass: Option<aya::Ebpf>,
    // Namespaces last: dropped after the processes and threads that use them.
    pub client: Netns,
    pub director: Netns,
    pub backends: Vec<Netns>,
    pub switch: Netns,
}

impl Rig {
    /// Builds the rig with `n` backends; `prefix` (≤ 6 characters) keeps rigs apart.
    pub fn up(prefix: &str, n: usize) -> Result<Rig> {
        assert!(prefix.len() <= 6 && n <= 9);
        let work = std::env::temp_dir().join(format!("lbd-rig-{prefix}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)?;
        let switch = Netns::new(&format!("{prefix}-sw"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::new(&format!("{prefix}-client"))?;
        let director = Netns::new(&format!("{prefix}-dir"))?;
        let mut backends = Vec::new();
        for i in 0..n {
            backends.push(Netns::new(&format!("{prefix}-be{}", i + 1))?);
        }
        let socket = work.join("lbd.sock");
        // What an lbd of an interrupted run kept for its next start (Ctrl-C runs no destructor).
        lb_userspace::keep::Keep::for_socket(&socket).remove()?;
        let config = work.join("rig.toml");
        std::fs::write(&config, rig_config(&socket))?;
        let mut rig = Rig {
            work,
            socket,
            config,
            lbd: None,
            udp: Vec::new(),
            next_port: std::sync::atomic::AtomicU16::new(20000),
            _peer_pass: None,
            client,
            director,
            backends,
            switch,
        };
        rig.wire(&rig.client, "vc", 2)?;
        rig.wire(&rig.director, "vd", 10)?;
        // XDP_TX out of the director's veth is delivered promptly only if its peer runs XDP.
        let pass = rig.switch.enter(|| lb_userspace::xdp::attach_pass("vd"))??;
        rig._peer_pass = Some(pass);
        rig.director.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "eth0"])?;
        rig.director.ip(&["addr", "add", &format!("{VIP_V6}/128"), "dev", "eth0", "nodad"])?;
        for i in 0..n {
            let be = &rig.backends[i];
            rig.wire(be, &format!("vb{}", i + 1), 11 + i as u8)?;
            vip_on_lo(be, true)?;
            rig.start_nginx(i)?;
            rig.start_udp(i)?;
        }
        Ok(rig)
    }

    /// The rig for a VRRP pair: [`Rig::up`] without the VIPs on the director (lbd answers ARP/ND
    /// for them while master and never gives them to the kernel), and a second director
    /// `{prefix}-dir2` ([`DIRECTOR2_V4`], MAC `02:99:00:00:00:14`) on the bridge, wired like the
    /// first. Neither runs lbd yet: `tests/src/failover.rs` starts one on each.
    pub fn up_pair(prefix: &str, n: usize) -> Result<(Rig, SecondDirector)> {
        let rig = Rig::up(prefix, n)?;
        rig.director.ip(&["addr", "del", &format!("{VIP_V4}/32"), "dev", "eth0"])?;
        rig.director.ip(&["addr", "del", &format!("{VIP_V6}/128"), "dev", "eth0"])?;
        let ns = Netns::new(&format!("{prefix}-dir2"))?;
        rig.wire(&ns, "vd2", 20)?;
        let pass = rig.switch.enter(|| lb_userspace::xdp::attach_pass("vd2"))??;
        Ok((rig, SecondDirector { _peer_pass: pass, ns }))
    }

    /// Deletes the director's `eth0` (with its bridge port `vd`) and creates it again as
    /// [`Rig::up`] did, with the VIPs if `vips` ([`Rig::up_pair`]'s directors have none): as
    /// `ifdown`/`ifup` of a VLAN does, or a container runtime re-creating a veth. The new `eth0`
    /// has another index and no XDP program. Returns the old index and the new one.
    pub fn recreate_director_link(&mut self, vips: bool) -> Result<(u32, u32)> {
        let old = self.delete_director_link()?;
        Ok((old, self.create_director_link(vips)?))
    }

    /// The first half of [`Rig::recreate_director_link`]: deletes the director's `eth0`;
    /// returns its index.
    pub fn delete_director_link(&mut self) -> Result<u32> {
        let old = self.director.exec(&["cat", "/sys/class/net/eth0/ifindex"])?.trim().parse()?;
        self._peer_pass = None;
        self.switch.ip(&["link", "del", "vd"])?;
        Ok(old)
    }

    /// The second half: creates it again; returns its index.
    pub fn create_director_link(&mut self, vips: bool) -> Result<u32> {
        self.wire(&self.director, "vd", 10)?;
        let pass = self.switch.enter(|| lb_userspace::xdp::attach_pass("vd"))??;
        self._peer_pass = Some(pass);
        if vips {
            self.director.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "eth0"])?;
            self.director.ip(&["addr", "add", &format!("{VIP_V6}/128"), "dev", "eth0", "nodad"])?;
        }
        Ok(self.director.exec(&["cat", "/sys/class/net/eth0/ifindex"])?.trim().parse()?)
    }

    /// Connects `ns` to the bridge: `eth0` inside, `peer` on the bridge, host number `host`.
    fn wire(&self, ns: &Netns, peer: &str, host: u8) -> Result<()> {
        self.switch.ip(&["link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
        self.switch.ip(&["link", "set", peer, "master", "br0", "up"])?;
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")?;
        ns.ip(&["link", "set", "eth0", "address", &format!("02:99:00:00:00:{host:02x}")])?;
        ns.ip(&["addr", "add", &format!("10.99.0.{host}/24"), "dev", "eth0"])?;
        ns.ip(&["addr", "add", &format!("fd00:99::{host}/64"), "dev", "eth0", "nodad"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        // veth leaves checksums to "hardware" (CHECKSUM_PARTIAL) and a frame sent on with XDP_TX
        // loses that state, arriving with a half-done checksum. Real NICs checksum on the wire;
        // here every host computes its own.
        ns.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        Ok(())
    }

    /// Starts nginx on backend `i` (again, after [`Self::stop_nginx`]: retried until the old one
    /// has let go of its ports, at most 5 s).
    pub fn start_nginx(&self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.start_nginx_once(i) {
                Err(e) if Instant::now() < deadline && format!("{e:#}").contains("in use") => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                other => return other,
            }
        }
    }

    /// Makes backend `i`'s `/healthz` answer 200 (`true`) or 404 (`false`); nginx goes on serving
    /// everything else.
    pub fn set_healthz(&self, i: usize, healthy: bool) -> Result<()> {
        let path = self.work.join(format!("nginx-{}", i + 1)).join("healthz");
        if healthy {
            std::fs::write(path, format!("{} ok\n", backend_name(i)))?;
        } else {
            std::fs::remove_file(path)?;
        }
        Ok(())
    }

    fn start_nginx_once(&self, i: usize) -> Result<()> {
        let dir = self.work.join(format!("nginx-{}", i + 1));
        std::fs::create_dir_all(&dir)?;
        let d = dir.display();
        let name = backend_name(i);
        let conf = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             keepalive_timeout 600s;\n  keepalive_requests 100000;\n\
             server {{\n    listen 80;\n    listen [::]:80;\n\
             location / {{ default_type text/plain; return 200 \"{name}\\n\"; }}\n\
             location = /healthz {{ default_type text/plain; alias {d}/healthz; }}\n\
             location = /big {{ default_type application/octet-stream; alias {d}/big; }}\n  }}\n}}\n"
        );
        // /big: BIG_BODY bytes, for replies of full-sized segments.
        std::fs::write(dir.join("big"), vec![b'x'; BIG_BODY])?;
        // Health checks fetch /healthz: 200 while the file exists, 404 once `set_healthz` removes it.
        std::fs::write(dir.join("healthz"), format!("{name} ok\n"))?;
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let conf_arg = conf_path.display().to_string();
        let err_arg = dir.join("error.log").display().to_string();
        // nginx daemonizes; the master stays in the backend's namespace and dies with it.
        self.backends[i]
            .exec(&["nginx", "-e", &err_arg, "-c", &conf_arg])
            .with_context(|| format!("starting nginx on {name}"))?;
        Ok(())
    }

    /// Stops nginx on backend `i` (for health-check style tests) and waits (at most 5 s) until
    /// it is gone.
    pub fn stop_nginx(&self, i: usize) -> Result<()> {
        let pid_file = self.work.join(format!("nginx-{}", i + 1)).join("nginx.pid");
        let pid = std::fs::read_to_string(&pid_file)?.trim().to_string();
        self.backends[i].exec(&["kill", &pid])?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > deadline {
                bail!("nginx {pid} on {} did not stop within 5 s", backend_name(i));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn start_udp(&mut self, i: usize) -> Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = backend_name(i);
        let path = format!("/var/run/netns/{}", self.backends[i].name);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let bind = || -> Result<UdpSocket> {
                let file = std::fs::File::open(&path)?;
                nix::sched::setns(std::os::fd::AsFd::as_fd(&file), nix::sched::CloneFlags::CLONE_NEWNET)?;
                // Bound to the VIP itself, so replies leave with the VIP as their source (DSR).
                let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V4(VIP_V4), UDP_PORT))?;
                sock.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(sock)
            };
            let sock = match bind() {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(name.as_bytes(), from);
                }
            }
        });
        ready_rx.recv().context("UDP responder thread")??;
        self.udp.push(UdpResponder { stop, thread: Some(thread) });
        Ok(())
    }

    /// Uses an existing config file (and the control socket it names) instead of the generated one.
    /// The lbd it starts is a fresh one: what an lbd with that control socket kept at an unclean
    /// end (its fast path, connections and counters; its drains) is removed, as [`Rig::up`] does
    /// for the rig's own socket.
    pub fn use_config(&mut self, path: &Path) -> Result<()> {
        let config = lb_userspace::config::Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let socket = config.director.control_socket;
        lb_userspace::keep::Keep::for_socket(&socket).remove()?;
        match std::fs::remove_file(lb_userspace::daemon::held_file_for(&socket)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).context("removing lbd's held state"),
            _ => {}
        }
        if self.config != path && self.config.starts_with(&self.work) {
            // The rig's own config, not used from now on: not left beside the log to mislead.
            let _ = std::fs::remove_file(&self.config);
        }
        self.config = path.to_path_buf();
        self.socket = socket;
        Ok(())
    }

    /// Starts `lbd run` in the director namespace and waits until every real server is resolved.
    pub fn start_lbd(&mut self) -> Result<()> {
        self.start_lbd_with(|_| {})
    }

    /// [`Self::start_lbd`] with `adjust` applied to the command (e.g. `seccomp::block_bpf`). The
    /// log is appended to, so restarts keep the earlier runs' lines.
    pub fn start_lbd_with(&mut self, adjust: impl FnOnce(&mut Command)) -> Result<()> {
        let bin = lbd_binary()?;
        let log = self.work.join("lbd.log");
        let config = self.config.to_str().expect("UTF-8 path").to_string();
        let child = self.director.spawn_net_with(&[bin.to_str().expect("UTF-8 path"), "run", "--config", &config], |cmd| {
            if let Ok(f) = std::fs::OpenOptions::new().create(true).append(true).open(&log) {
                if let Ok(f2) = f.try_clone() {
                    cmd.stdout(f2).stderr(f);
                }
            }
            adjust(cmd);
        })?;
        self.lbd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(st) = self.status() {
                let vs = st["virtual_servers"].as_array().cloned().unwrap_or_default();
                // Resolved and not failed: up, or drained (`lbd backend drain` before a restart).
                let all_up = vs.iter().all(|v| {
                    v["real_servers"].as_array().is_some_and(|r| r.iter().all(|r| r["state"] == "up" || r["state"] == "drained"))
                });
                if !vs.is_empty() && all_up {
                    return Ok(());
                }
            }
            if let Some(status) = self.lbd.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("lbd exited ({status}) during start-up:\n{}", self.lbd_log());
            }
            if Instant::now() > deadline {
                bail!("lbd did not report all real servers up within 20 s:\n{}", self.lbd_log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn lbd_log(&self) -> String {
        std::fs::read_to_string(self.work.join("lbd.log")).unwrap_or_default()
    }

    /// Runs the `lbd` CLI (status, reload, check ...) on the host; returns (exit code, stdout, stderr).
    pub fn lbd_cli(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let out = Command::new(lbd_binary()?).args(args).output()?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `lbd status --json` of the rig's daemon.
    pub fn status(&self) -> Result<serde_json::Value> {
        let sock = self.socket.display().to_string();
        let (code, out, err) = self.lbd_cli(&["status", "--json", "--socket", &sock])?;
        if code != 0 {
            bail!("lbd status failed ({code}): {err}");
        }
        Ok(serde_json::from_str(&out)?)
    }

    /// Packets the director's fast path counted under `reason`.
    pub fn reason_packets(&self, reason: &str) -> Result<u64> {
        let st = self.status()?;
        st["reasons"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["reason"] == reason))
            .and_then(|r| r["packets"].as_u64())
            .with_context(|| format!("no reason {reason} in status"))
    }

    /// `n` distinct client source ports, never used before by this rig. Chosen rather than
    /// ephemeral, so which backend a request reaches is a function of the test, not of chance.
    fn ports(&self, n: usize) -> Result<std::ops::Range<u16>> {
        let n = u16::try_from(n).context("more requests than the rig has source ports")?;
        let first = self.next_port.fetch_add(n, Ordering::Relaxed);
        match first.checked_add(n) {
            Some(end) => Ok(first..end),
            None => bail!("the rig ran out of client source ports ({n} more wanted after {first})"),
        }
    }

    /// Sends `n` HTTP requests from the client, each on a new connection from its own source port;
    /// counts answers by backend.
    pub fn http_batch(&self, vip: IpAddr, n: usize) -> Result<BTreeMap<String, usize>> {
        let ports = self.ports(n)?;
        self.client.enter(move || -> Result<BTreeMap<String, usize>> {
            let mut counts = BTreeMap::new();
            for port in ports {
                let name = http_get_from(port, SocketAddr::new(vip, HTTP_PORT))?;
                *counts.entry(name).or_insert(0) += 1;
            }
            Ok(counts)
        })?
    }

    /// Starts a client that sends HTTP requests to `vip`, each on a new connection from its own
    /// source port, one after another (at most `max` of them) until [`ClientLoop::stop`].
    pub fn client_loop(&self, vip: IpAddr, max: usize) -> Result<ClientLoop> {
        let ports = self.ports(max)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = self.client.spawn_in(move || -> Result<Vec<Answer>> {
            let mut answers = Vec::new();
            for port in ports {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let sent = Instant::now();
                let result = http_get_from(port, SocketAddr::new(vip, HTTP_PORT)).map_err(|e| format!("{e:#}"));
                answers.push(Answer { sent, result });
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(answers)
        });
        Ok(ClientLoop { stop, thread })
    }

    /// Opens `conns` keep-alive HTTP connections to `vip` and then sends requests on them in
    /// turn, as fast as they are answered, until [`BusyLoop::stop`]: traffic on established
    /// flows at every moment, as a busy director has. Fails if a connection cannot be opened.
    pub fn busy_loop(&self, vip: SocketAddr, conns: usize) -> Result<BusyLoop> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let thread = self.client.spawn_in(move || -> Result<Vec<BusyConn>> {
            let mut open = (0..conns)
                .map(|_| {
                    let mut c = KeepAlive::connect(vip)?;
                    let owner = c.get()?;
                    Ok((c, owner))
                })
                .collect::<Result<Vec<_>>>()?;
            let _ = ready_tx.send(());
            let mut out: Vec<BusyConn> = open.iter().map(|(_, owner)| BusyConn { owner: owner.clone(), answers: 0, wrong: None }).collect();
            while !flag.load(Ordering::Relaxed) {
                for ((conn, owner), rec) in open.iter_mut().zip(&mut out) {
                    if rec.wrong.is_some() {
                        continue;
                    }
                    match conn.get() {
                        Ok(name) if name == *owner => rec.answers += 1,
                        Ok(name) => rec.wrong = Some(format!("answered by {name}")),
                        Err(e) => rec.wrong = Some(format!("{e:#}")),
                    }
                }
            }
            Ok(out)
        });
        if ready_rx.recv().is_err() {
            // The thread ended before its connections were open: its error says why.
            thread.join().map_err(|_| anyhow::anyhow!("busy loop panicked"))??;
            bail!("busy loop ended before its connections were open");
        }
        Ok(BusyLoop { stop, thread })
    }

    /// Sends `n` UDP datagrams from distinct source ports; counts replies by backend and checks
    /// each reply came from the VIP.
    pub fn udp_batch(&self, n: usize) -> Result<BTreeMap<String, usize>> {
        let ports = self.ports(n)?;
        self.client.enter(move || -> Result<BTreeMap<String, usize>> {
            let mut counts = BTreeMap::new();
            let vip = SocketAddr::new(IpAddr::V4(VIP_V4), UDP_PORT);
            for port in ports {
                let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                sock.set_read_timeout(Some(Duration::from_secs(2)))?;
                sock.send_to(b"who", vip)?;
                let mut buf = [0u8; 64];
                let (len, from) = sock.recv_from(&mut buf).context("no UDP reply within 2 s")?;
                if from != vip {
                    bail!("UDP reply came from {from}, not from the VIP {vip}");
                }
                let name = String::from_utf8_lossy(&buf[..len]).into_owned();
                *counts.entry(name).or_insert(0) += 1;
            }
            Ok(counts)
        })?
    }
}

/// One request of a [`ClientLoop`]: when it was sent, and the backend that answered or why it
/// failed.
#[derive(Debug, Clone)]
pub struct Answer {
    pub sent: Instant,
    pub result: std::result::Result<String, String>,
}

/// A client sending requests in the background (see [`Rig::client_loop`]).
pub struct ClientLoop {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<Answer>>>,
}

/// A connection of a [`BusyLoop`]: the real server that answered its first request, how many
/// later requests it answered, and the first thing that went wrong (another real server
/// answered, or the connection failed), after which it is not used again.
#[derive(Debug, Clone)]
pub struct BusyConn {
    pub owner: String,
    pub answers: usize,
    pub wrong: Option<String>,
}

/// Requests on established connections in the background (see [`Rig::busy_loop`]).
pub struct BusyLoop {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<BusyConn>>>,
}

impl BusyLoop {
    /// Stops the requests and returns each connection's record.
    pub fn stop(self) -> Result<Vec<BusyConn>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow::anyhow!("busy loop panicked"))?
    }
}

impl ClientLoop {
    /// Stops the client and returns every answer, in order.
    pub fn stop(self) -> Result<Vec<Answer>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow::anyhow!("client loop panicked"))?
    }
}

/// One HTTP/1.1 GET on a new connection from source port `port`; returns the body (the
/// backend's name).
pub fn http_get_from(port: u16, addr: SocketAddr) -> Result<String> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, port).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, port).into(),
    };
    sock.bind(&local.into()).with_context(|| format!("binding source port {port}"))?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(2)).with_context(|| format!("connecting to {addr} from port {port}"))?;
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    body_of(&resp)
}

/// A keep-alive HTTP connection (for "long-lived connection" tests).
pub struct KeepAlive {
    stream: TcpStream,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        Ok(Self { stream })
    }

    /// One request on the open connection; returns the backend's name.
    pub fn get(&mut self) -> Result<String> {
        self.stream.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")?;
        let mut buf = vec![0u8; 4096];
        let mut resp = Vec::new();
        loop {
            let n = self.stream.read(&mut buf).context("reading the response on the kept-alive connection")?;
            if n == 0 {
                bail!("connection closed");
            }
            resp.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&resp);
            if let Some(head_end) = text.find("\r\n\r\n") {
                let len: usize = text[..head_end]
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                    .context("no Content-Length")?
                    .parse()?;
                if resp.len() >= head_end + 4 + len {
                    return body_of(&text);
                }
            }
        }
    }
}

fn body_of(resp: &str) -> Result<String> {
    if !resp.starts_with("HTTP/1.1 200") {
        bail!("unexpected response: {resp:?}");
    }
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_string()).context("no body")?;
    Ok(body)
}

impl Rig {
    /// Stops lbd with SIGTERM (as an operator would), waiting up to 5 s.
    pub fn stop_lbd(&mut self) {
        if let Some(mut child) = self.lbd.take() {
            // SIGTERM to `nsenter` reaches lbd (exec replaces it), which stops cleanly.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The second director of [`Rig::up_pair`].
pub struct SecondDirector {
    /// `xdp_pass` on its bridge port (see [`Rig::up`]).
    _peer_pass: aya::Ebpf,
    pub ns: Netns,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop_lbd();
        self.udp.clear();
        // What the stopped lbd kept for its next start (pinned link, connection tables): the
        // rig's interfaces go with it, the pins would stay.
        let _ = lb_userspace::keep::Keep::for_socket(&self.socket).remove();
    }
}

/// What an lbd on a control socket keeps when it stops (`lb_userspace::keep`): removed when made
/// (a failed run before may have left it) and when dropped, so that a failing test leaves no
/// pinned program or tables behind.
pub struct KeptFor(pub lb_userspace::keep::Keep);

impl KeptFor {
    pub fn fresh(socket: &Path) -> Result<Self> {
        let keep = lb_userspace::keep::Keep::for_socket(socket);
        keep.remove()?;
        Ok(Self(keep))
    }
}

impl Drop for KeptFor {
    fn drop(&mut self) {
        let _ = self.0.remove();
    }
}

/// A config for the rig's director with just the given virtual servers:
/// `(address, port, protocol, real server addresses)`, with `mode = "xdp"` in `xdp_mode`
/// ("native" or "generic"), and `config/rig.toml`'s metrics address (a reload from that file to
/// this one changes no restart-only key).
pub fn custom_config(socket: &Path, xdp_mode: &str, vips: &[(IpAddr, u16, &str, Vec<IpAddr>)]) -> String {
    let mut text = format!(
        "[director]\ninterface = \"eth0\"\nmode = \"xdp\"\nxdp_mode = \"{xdp_mode}\"\ncontrol_socket = \"{}\"\n\
         metrics_listen = \"127.0.0.1:9180\"\n",
        socket.display()
    );
    for (addr, port, proto, reals) in vips {
        text += &format!("\n[[virtual_server]]\naddress = \"{addr}\"\nport = {port}\nprotocol = \"{proto}\"\n");
        for r in reals {
            text += &format!("[[virtual_server.real_server]]\naddress = \"{r}\"\n");
        }
    }
    text
}

fn summary(label: &str, counts: &BTreeMap<String, usize>) {
    let total: usize = counts.values().sum();
    let per: Vec<String> = counts.iter().map(|(b, n)| format!("{b} {n:>4}")).collect();
    println!("  {label:<34} {total:>4} answered: {}", per.join("   "));
}

/// The most requests `cargo xtask run --requests` takes: each is a client source port of its own
/// (from 20000 up), and the UDP and IPv6 batches take a fifth as many again.
pub const MAX_REQUESTS: u16 = 20_000;

/// Set by SIGINT or SIGTERM (see [`stop_on_signals`]).
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM only set [`stopped`], so that what was set up is torn down on
/// the way out (a signal's default action runs no destructor: namespaces, lbd and nginx stay).
pub fn stop_on_signals() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    // A handler, not a blocked mask: children inherit the mask, and lbd must see its SIGTERM.
    // Exec resets handlers, so they get the default action.
    let action = SigAction::new(SigHandler::Handler(on_stop_signal), SaFlags::SA_RESTART, SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM came since [`stop_on_signals`].
pub fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Fails once SIGINT or SIGTERM came, so the rig is torn down without finishing what it was
/// setting up or sending.
fn not_stopped() -> Result<()> {
    match stopped() {
        true => bail!("interrupted"),
        false => Ok(()),
    }
}

/// The lock a running rig holds (with its pid inside): a second rig would take over the first
/// one's namespaces, and the first one's teardown would then delete the second one's.
fn lock_rig(prefix: &str) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = PathBuf::from(format!("/run/{prefix}.lock"));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        bail!(
            "another rig is up (lbd-rig pid {}, lock {}): stop it first (Ctrl-C where it runs, or kill {})",
            pid.trim(),
            path.display(),
            pid.trim()
        );
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// `cargo xtask run`: the rig with `config`, a batch of requests, a summary, then (unless `once`)
/// wait for SIGINT or SIGTERM (also sent by `cargo xtask run` when it is stopped, or dies).
/// Everything is torn down on the way out, also when a signal comes during the set-up or the
/// batch.
pub fn run_interactive(config: &Path, requests: usize, once: bool) -> Result<()> {
    if requests == 0 || requests > usize::from(MAX_REQUESTS) {
        bail!("--requests must be between 1 and {MAX_REQUESTS}, got {requests}");
    }
    stop_on_signals()?;
    // The rig goes when `cargo xtask run` goes, even by SIGKILL.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        bail!("the process that started the rig is gone");
    }
    let _lock = lock_rig("lbd-rig-lbdrig")?;
    println!("rig: namespaces lbdrig-{{sw,client,dir,be1,be2,be3}} on bridge br0, 10.99.0.0/24 and fd00:99::/64");
    let mut rig = Rig::up("lbdrig", 3)?;
    not_stopped()?;
    rig.use_config(config)?;
    println!("rig: starting lbd run --config {} in lbdrig-dir", config.display());
    rig.start_lbd()?;
    not_stopped()?;
    println!("rig: requests from the client (10.99.0.2) to the VIPs, each on a new connection:");
    summary(&format!("HTTP {VIP_V4}:{HTTP_PORT}"), &rig.http_batch(IpAddr::V4(VIP_V4), requests)?);
    not_stopped()?;
    summary(&format!("UDP  {VIP_V4}:{UDP_PORT}"), &rig.udp_batch(requests / 5)?);
    not_stopped()?;
    summary(&format!("HTTP [{VIP_V6}]:{HTTP_PORT}"), &rig.http_batch(IpAddr::V6(VIP_V6), requests / 5)?);
    not_stopped()?;
    let sock = rig.socket.display().to_string();
    let (_, text, _) = rig.lbd_cli(&["status", "--socket", &sock])?;
    println!("\n$ lbd status --socket {sock}\n{text}");
    let log = rig.work.join("lbd.log");
    if once {
        println!("rig: --once given, tearing down (lbd's log stays in {} until the next rig)", log.display());
        return Ok(());
    }
    println!("rig: up. Try:");
    println!("  ip netns exec lbdrig-client curl -s http://{VIP_V4}/");
    println!("  {} status --socket {sock}", lbd_binary()?.display());
    let metrics = lb_userspace::config::Config::load(config).ok().and_then(|c| c.director.metrics_listen);
    if let Some(addr) = metrics {
        println!("  ip netns exec lbdrig-dir curl -s http://{addr}/metrics");
    }
    println!("  lbd log: {}", log.display());
    println!("rig: Ctrl-C (or kill {}) tears it down.", std::process::id());
    while !stopped() {
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("rig: tearing down (lbd's log stays in {} until the next rig)", log.display());
    Ok(())
}
