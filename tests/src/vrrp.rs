//! Support for the VRRP tests: an L2 segment of namespaces, Debian's keepalived in one of them,
//! lbd's VRRP runtime in-process in another, and a client that asks who answers for an address
//! (ARP for IPv4, neighbour solicitation for IPv6) from its own `AF_PACKET` socket.
//!
//! Every wait is bounded; namespaces (and with them keepalived and the bridge) go away on drop.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_userspace::vrrp::{VrrpHandle, VrrpInstanceStatus, VrrpSpec, VrrpState};

use crate::netns::Netns;

pub type Mac = [u8; 6];

pub fn mac_string(m: &Mac) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A bridge in namespace `{prefix}-sw` and one namespace per node, each with `eth0` on the
/// bridge: node `i` (0-based) is `10.97.{subnet}.{i+1}/24`, `fd00:97:{subnet}::{i+1}/64`, MAC
/// `02:97:{subnet}:00:00:{i+1}`. IPv6 DAD is off, so link-local addresses are usable at once.
pub struct Segment {
    pub subnet: u8,
    pub nodes: Vec<Netns>,
    pub switch: Netns,
}

impl Segment {
    pub fn new(prefix: &str, subnet: u8, names: &[&str]) -> Result<Segment> {
        let switch = Netns::new(&format!("{prefix}-sw"))?;
        // No multicast snooping: every VRRP/ND multicast frame reaches every port.
        switch.ip(&["link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let mut seg = Segment { subnet, nodes: Vec::new(), switch };
        for (i, name) in names.iter().enumerate() {
            let ns = Netns::new(&format!("{prefix}-{name}"))?;
            let peer = format!("p{i}");
            seg.switch.ip(&["link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns", &ns.name])?;
            seg.switch.ip(&["link", "set", &peer, "master", "br0", "up"])?;
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")?;
            ns.ip(&["link", "set", "eth0", "address", &mac_string(&seg.mac(i))])?;
            ns.ip(&["addr", "add", &format!("{}/24", seg.v4(i)), "dev", "eth0"])?;
            ns.ip(&["addr", "add", &format!("{}/64", seg.v6(i)), "dev", "eth0", "nodad"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            seg.nodes.push(ns);
        }
        Ok(seg)
    }

    pub fn v4(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 97, self.subnet, i as u8 + 1)
    }

    pub fn v6(&self, i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x97, u16::from(self.subnet), 0, 0, 0, 0, i as u16 + 1)
    }

    pub fn mac(&self, i: usize) -> Mac {
        [0x02, 0x97, self.subnet, 0, 0, i as u8 + 1]
    }

    /// The virtual address of the segment (`.100`).
    pub fn vip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 97, self.subnet, 100)
    }

    pub fn vip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x97, u16::from(self.subnet), 0, 0, 0, 0, 0x100)
    }

    /// Cuts node `i` off the segment (its bridge port down: the node sees its carrier go).
    pub fn unplug(&self, i: usize, down: bool) -> Result<()> {
        self.switch.ip(&["link", "set", &format!("p{i}"), if down { "down" } else { "up" }]).map(drop)
    }
}

/// A scratch directory for one test, removed on drop.
pub struct WorkDir(pub PathBuf);

impl WorkDir {
    pub fn new(name: &str) -> Result<WorkDir> {
        let p = std::env::temp_dir().join(format!("lbd-vrrp-{name}"));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(WorkDir(p))
    }

    /// See [`logger_script`].
    pub fn logger_script(&self, name: &str, log: &Path) -> Result<PathBuf> {
        logger_script(&self.0.join(name), log)
    }
}

/// Writes an executable shell script at `path` that appends its arguments (one line per call)
/// to `log`; returns `path`.
pub fn logger_script(path: &Path, log: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\necho \"$*\" >> {}\n", log.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path.to_owned())
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Lines of a file (empty when it does not exist).
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// Polls `f` every 20 ms until it returns `Some`, at most `limit`.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<(T, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok((v, start.elapsed()));
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// keepalived (Debian's), `-n -l -D -P`, in a namespace, with a generic notify script that logs
/// `INSTANCE NAME STATE PRIORITY` lines.
pub struct Keepalived {
    child: Option<Child>,
    pub dir: PathBuf,
    pub state_log: PathBuf,
    conf: PathBuf,
    ns: String,
}

/// What the keepalived side of a test is configured with.
pub struct KeepalivedConf<'a> {
    pub priority: u8,
    pub version: u8,
    /// keepalived's `advert_int` as written (`"1"`, `"0.1"`).
    pub advert_int: &'a str,
    pub vrid: u8,
    pub vip: &'a str,
    pub auth_pass: Option<&'a str>,
    /// (unicast_src_ip, unicast_peer).
    pub unicast: Option<(IpAddr, IpAddr)>,
}

impl Keepalived {
    pub fn start(ns: &Netns, dir: &Path, c: &KeepalivedConf) -> Result<Keepalived> {
        let dir = dir.join(format!("keepalived-{}", ns.name));
        std::fs::create_dir_all(&dir)?;
        let state_log = dir.join("states");
        let notify = logger_script(&dir.join("notify.sh"), &state_log).map(|p| p.display().to_string());
        let _ = std::fs::remove_file(&state_log);
        let auth = c.auth_pass.map_or(String::new(), |p| format!("  authentication {{\n    auth_type PASS\n    auth_pass {p}\n  }}\n"));
        let unicast =
            c.unicast.map_or(String::new(), |(src, peer)| format!("  unicast_src_ip {src}\n  unicast_peer {{\n    {peer}\n  }}\n"));
        let conf_text = format!(
            "global_defs {{\n  router_id {ns}\n  script_user root\n  enable_script_security\n}}\n\
             vrrp_instance VI_1 {{\n  state BACKUP\n  interface eth0\n  virtual_router_id {vrid}\n  priority {prio}\n\
             \x20 advert_int {int}\n  version {ver}\n{auth}{unicast}  virtual_ipaddress {{\n    {vip}\n  }}\n  notify {notify}\n}}\n",
            ns = ns.name,
            vrid = c.vrid,
            prio = c.priority,
            int = c.advert_int,
            ver = c.version,
            vip = c.vip,
            notify = notify?,
        );
        let conf = dir.join("keepalived.conf");
        std::fs::write(&conf, conf_text)?;
        let mut k = Keepalived { child: None, dir, state_log, conf, ns: ns.name.clone() };
        k.spawn()?;
        Ok(k)
    }

    fn spawn(&mut self) -> Result<()> {
        let d = &self.dir;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(d.join("keepalived.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "keepalived", "-n", "-l", "-D", "-P", "-f"])
            .arg(&self.conf)
            .arg("-p")
            .arg(d.join("keepalived.pid"))
            .arg("-r")
            .arg(d.join("vrrp.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting keepalived (apt-get install keepalived)")?;
        self.child = Some(child);
        Ok(())
    }

    /// Stops it (if running) and starts it again, with a fresh state log.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let _ = std::fs::remove_file(&self.state_log);
        self.spawn()
    }

    /// The state of its last notification (MASTER, BACKUP, FAULT, STOP), if any.
    pub fn state(&self) -> Option<String> {
        lines(&self.state_log).last().and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
    }

    pub fn wait_state(&self, state: &str, limit: Duration) -> Result<Duration> {
        wait_for(limit, &format!("keepalived in {} to be {state} (log: {})", self.ns, self.log()), || {
            (self.state().as_deref() == Some(state)).then_some(())
        })
        .map(|r| r.1)
    }

    /// Fails if keepalived logged that it dropped or distrusted a VRRP packet (from lbd).
    pub fn assert_no_complaints(&self) -> Result<()> {
        let log = self.log();
        for word in ["bogus", "invalid", "not present", "mismatch", "passwd", "checksum", "ttl"] {
            if let Some(line) = log.lines().find(|l| l.to_lowercase().contains(word)) {
                bail!("keepalived complained: {line}\n{log}");
            }
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("keepalived.log")).unwrap_or_default()
    }

    /// SIGTERM (keepalived sends priority 0 and removes its addresses), waiting up to 5 s.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("keepalived did not stop within 5 s of SIGTERM")
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Parses `[[vrrp_instance]]`/`[[vrrp_script]]`/`[[vrrp_sync_group]]` tables.
pub fn spec(text: &str) -> Result<VrrpSpec> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        vrrp_instance: Vec<lb_userspace::vrrp::VrrpInstanceSpec>,
        #[serde(default)]
        vrrp_script: Vec<lb_userspace::vrrp::VrrpScriptSpec>,
        #[serde(default)]
        vrrp_sync_group: Vec<lb_userspace::vrrp::VrrpSyncGroupSpec>,
    }
    let f: File = toml::from_str(text).context("VRRP test config")?;
    Ok(VrrpSpec { instances: f.vrrp_instance, scripts: f.vrrp_script, sync_groups: f.vrrp_sync_group })
}

/// lbd's VRRP runtime running in-process, its sockets in a namespace (a tokio runtime whose
/// threads were created inside it).
pub struct InProcess {
    handle: Option<VrrpHandle>,
    states: tokio::sync::watch::Receiver<BTreeMap<String, VrrpState>>,
    rt: Option<tokio::runtime::Runtime>,
    pub started: Instant,
}

impl InProcess {
    pub fn start(ns: &Netns, spec: VrrpSpec) -> Result<InProcess> {
        capture_logs();
        let (rt, handle, states) = ns.enter(move || -> Result<_> {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
            let (handle, states) = rt.block_on(async { VrrpHandle::start(spec) })?;
            Ok((rt, handle, states))
        })??;
        Ok(InProcess { handle: Some(handle), states, rt: Some(rt), started: Instant::now() })
    }

    pub fn state(&self, name: &str) -> Option<VrrpState> {
        self.states.borrow().get(name).copied()
    }

    /// Waits until instance `name` is in `state`; returns how long that took.
    pub fn wait_state(&self, name: &str, state: VrrpState, limit: Duration) -> Result<Duration> {
        wait_for(limit, &format!("lbd instance {name} to be {state} (now {:?})", self.state(name)), || {
            (self.state(name) == Some(state)).then_some(())
        })
        .map(|r| r.1)
    }

    pub fn status(&self) -> Vec<VrrpInstanceStatus> {
        self.handle.as_ref().map(|h| h.status()).unwrap_or_default()
    }

    pub fn owns(&self, a: IpAddr) -> bool {
        self.handle.as_ref().is_some_and(|h| h.owns(a))
    }

    /// What `lbd reload` does when the VRRP tables changed: the running instances stop without a
    /// word ([`VrrpHandle::hand_over`]) and `spec` starts with those that were MASTER resumed as
    /// MASTER (all of them match by name here), in `ns` as [`Self::start`].
    pub fn reload(&mut self, ns: &Netns, spec: VrrpSpec) -> Result<()> {
        let handle = self.handle.take().context("VRRP is not running")?;
        let rt = self.rt.as_ref().context("no runtime")?.handle().clone();
        let (handle, states) = ns.enter(move || {
            rt.block_on(async {
                let masters = handle.hand_over().await;
                VrrpHandle::start_resuming(spec, &masters)
            })
        })??;
        (self.handle, self.states) = (Some(handle), states);
        Ok(())
    }

    /// Clean shutdown: priority-0 adverts, notify_stop.
    pub fn stop(&mut self) {
        if let (Some(h), Some(rt)) = (self.handle.take(), self.rt.as_ref()) {
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), h.shutdown()).await }).expect("VRRP shutdown within 15 s");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        drop(self.handle.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.get_or_init(Default::default).lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every log record of this process to a buffer (see [`log_lines`]).
pub fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt().with_ansi(false).with_writer(|| LogWriter).with_max_level(tracing::Level::INFO).try_init();
    });
}

/// Captured log lines containing every one of `needles`.
pub fn log_lines(needles: &[&str]) -> Vec<String> {
    let buf = LOGS.get_or_init(Default::default).lock().expect("not poisoned");
    String::from_utf8_lossy(&buf).lines().filter(|l| needles.iter().all(|n| l.contains(n))).map(str::to_owned).collect()
}

/// The MACs that answer for `target` within 300 ms: three ARP requests (IPv4) or neighbour
/// solicitations (IPv6) 50 ms apart from `ns`'s `eth0`, broadcast / to the solicited-node
/// group. Built by hand here, independent of lbd's own frame code.
pub fn who_answers(ns: &Netns, target: IpAddr, my_mac: Mac, my_ip: IpAddr) -> Result<BTreeSet<Mac>> {
    ns.enter(move || probe(target, my_mac, my_ip))?
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn probe(target: IpAddr, my_mac: Mac, my_ip: IpAddr) -> Result<BTreeSet<Mac>> {
    let (ethertype, frame) = match (target, my_ip) {
        (IpAddr::V4(t), IpAddr::V4(me)) => {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&my_mac);
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
            f.extend_from_slice(&my_mac);
            f.extend_from_slice(&me.octets());
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&t.octets());
            (0x0806u16, f)
        }
        (IpAddr::V6(t), IpAddr::V6(me)) => {
            let o = t.octets();
            let group = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(o[13]), u16::from_be_bytes([o[14], o[15]]));
            let g = group.octets();
            let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
            icmp.extend_from_slice(&o);
            icmp.extend_from_slice(&[1, 1]);
            icmp.extend_from_slice(&my_mac);
            let mut pseudo = me.octets().to_vec();
            pseudo.extend_from_slice(&g);
            pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 58]);
            let sum = fold(sum16(&pseudo) + sum16(&icmp));
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            let mut f = vec![0x33, 0x33, g[12], g[13], g[14], g[15]];
            f.extend_from_slice(&my_mac);
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
            f.extend_from_slice(&[58, 255]);
            f.extend_from_slice(&me.octets());
            f.extend_from_slice(&g);
            f.extend_from_slice(&icmp);
            (0x86ddu16, f)
        }
        _ => bail!("mixed address families"),
    };
    let ifindex = nix::net::if_::if_nametoindex("eth0")?;
    // SAFETY: plain syscall; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::c_int::from(ethertype.to_be())) };
    if fd < 0 {
        bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ethertype.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: valid address of the given size.
    if unsafe { libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as u32) } < 0
    {
        bail!("bind: {}", std::io::Error::last_os_error());
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
    // SAFETY: valid timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let mut seen = BTreeSet::new();
    let start = Instant::now();
    let mut sent = 0;
    let mut buf = [0u8; 2048];
    while start.elapsed() < Duration::from_millis(300) {
        if sent < 3 && start.elapsed() >= Duration::from_millis(50 * sent) {
            // SAFETY: valid buffer.
            unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            sent += 1;
        }
        // SAFETY: valid buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let f = &buf[..n as usize];
        match target {
            // An ARP reply saying `target` is at some MAC.
            IpAddr::V4(t) => {
                if f.len() >= 42 && f[20..22] == [0, 2] && f[28..32] == t.octets() {
                    seen.insert(<Mac>::try_from(&f[22..28]).expect("6 bytes"));
                }
            }
            // A neighbour advertisement for `target`, MAC from its target link-layer option
            // (or the frame's source).
            IpAddr::V6(t) => {
                if f.len() >= 78 && f[20] == 58 && f[54] == 136 && f[62..78] == t.octets() {
                    let mac = if f.len() >= 86 && f[78] == 2 { &f[80..86] } else { &f[6..12] };
                    seen.insert(<Mac>::try_from(mac).expect("6 bytes"));
                }
            }
        }
    }
    Ok(seen)
}

/// Runs iputils `arping -b -c 3 -w 1` in `ns` and returns the MACs it printed.
pub fn arping(ns: &Netns, target: Ipv4Addr) -> Result<BTreeSet<String>> {
    // Exits 1 when nobody answers: read the output either way.
    let out = ns.sh(&format!("arping -b -c 3 -w 1 -I eth0 {target}; true"))?;
    Ok(out.lines().filter(|l| l.contains("reply from")).filter_map(|l| Some(l[l.find('[')? + 1..l.find(']')?].to_lowercase())).collect())
}
