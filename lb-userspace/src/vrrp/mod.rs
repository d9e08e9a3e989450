//! VRRP in lbd itself, replacing keepalived's `vrrp_instance`s: VRRPv2 (RFC 3768) and VRRPv3
//! (RFC 5798) for IPv4, VRRPv3 for IPv6, multicast or unicast, interoperable with keepalived.
//!
//! - [`spec`]: the `[[vrrp_instance]]`, `[[vrrp_script]]`, `[[vrrp_sync_group]]` tables;
//! - [`packet`]: the advert codec and checksums; [`neighbor`]: ARP/NDP frames;
//! - [`engine`]: the state machines and timers, free of I/O (tests drive it with a fake clock);
//! - this module: [`VrrpHandle`], the tokio runtime around the engine: raw sockets for protocol
//!   112, the ARP/NDP responder, gratuitous ARP bursts, tracking, notify commands.
//!
//! # Who owns a virtual address
//!
//! lbd answers ARP requests and neighbour solicitations for the virtual addresses itself, from
//! an `AF_PACKET` socket on the interface, and only while the instance is MASTER. It never adds
//! them to the kernel (keepalived's way), because:
//! - the director's kernel then never treats a VIP as local: no service of the director (sshd
//!   on 0.0.0.0:22, a resolver, ...) can answer on a VIP port, whatever the fast path passes up,
//!   and the kernel never answers ARP for a VIP on its own, as backup or master;
//! - ownership is one flag per address in this process, flipped in the same step as the state
//!   change: nothing can leave an address behind on the interface after a crash (a `kill -9`ed
//!   keepalived leaves its VIPs configured, and its kernel goes on answering ARP for them);
//! - the XDP fast path passes ARP and ICMPv6 to the kernel, so the packet socket sees them
//!   without the fast path knowing about VRRP; the VIP's traffic itself is steered by the fast
//!   path, which the controller enables for a VIP only while this module says it is master
//!   ([`VrrpHandle::owns`]).
//!
//! The cost: the director does not answer pings to a VIP and cannot originate traffic from it
//! (keepalived masters can), and IPv6 needs the solicited-node groups joined explicitly (done
//! here). Replies carry the interface's own MAC, as keepalived's do without `use_vmac`.
//!
//! Gratuitous ARPs (IPv4) and unsolicited neighbour advertisements (IPv6) go out the same
//! socket, in keepalived's exact format, on becoming master (`garp_master_repeat` of them), again
//! after `garp_master_delay`, and every `garp_master_refresh` if set; and, while master, on
//! hearing a lower-priority master (`garp_lower_prio_repeat`, again after
//! `garp_lower_prio_delay`): after a split view the upstream router may hold the other one's MAC.
//!
//! # ARP conflicts
//!
//! While master, any ARP/NDP packet from another MAC claiming a virtual address (a sender
//! address equal to it: a gratuitous ARP, a reply to our probe, a request sent from it) is a
//! conflict. The usual cause under DSR is a real server holding the VIP on `lo` without
//! `arp_ignore=1`/`arp_announce=2`. To find those that only answer requests, the master sends an
//! ARP probe (RFC 5227, sender 0.0.0.0) / DAD solicitation for each address 1 s after becoming
//! master and every 30 s. A conflict is confirmed only if we still own the address 1 s later
//! (a peer taking over legitimately announces itself while we give the address up), then logged
//! once per (address, MAC) and listed in the status.
//!
//! # What the controller does with it
//!
//! - start it with the config's [`VrrpSpec`] inside the tokio runtime; follow the watch channel
//!   (or [`VrrpHandle::owns`]) and enable a virtual server's VIP in the fast path only while it
//!   is owned (a VIP no instance [covers](VrrpSpec::covers) stays as it is);
//! - never put a VIP of an instance on an interface of the director (the kernel would answer
//!   ARP for it in every state), and let the fast path drop, not pass, traffic of a disabled VIP
//!   (a director with `ip_forward=1` would otherwise route it);
//! - on exit, `shutdown().await` (priority 0, so the backup takes over at once).
//!
//! # Interoperability notes
//!
//! - IPv6 adverts list the configured addresses, as keepalived's do (RFC 5798 wants a
//!   link-local virtual address first; keepalived sends none, and lbd matches keepalived);
//! - a v3 checksum computed without the IPv4 pseudo-header is accepted (logged once);
//! - unicast adverts are accepted from `unicast_peers` only, with any TTL; multicast ones need
//!   TTL/hop limit 255;
//! - a dropped advert (TTL, version, checksum, authentication, v2 interval, not a unicast peer,
//!   address list) is counted by reason and the first of each reason from each sender logged
//!   (at most [`engine::MAX_LOGGED_DROPS`] kinds per instance), as keepalived logs them: its
//!   sender may be a second master;
//! - an address owner's (priority 255) advert whose address list differs from ours is accepted,
//!   as RFC 3768/5798 section 7.1 say, and logged once; keepalived drops it, and would become a
//!   second master for the addresses both list;
//! - `preempt_delay`, sync groups and "answer a lower-priority master at once" follow
//!   keepalived's behaviour (see [`engine`]).

pub mod command;
pub mod engine;
pub mod neighbor;
pub mod packet;
pub mod spec;
mod sys;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv6Addr},
    os::fd::OwnedFd,
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

pub use engine::{Counters, DropReason, VrrpState};
pub use spec::{
    AuthenticationSpec, DurationSpec, TrackInterfaceSpec, TrackScriptSpec, VirtualAddressSpec, VrrpInstanceSpec, VrrpScriptSpec, VrrpSpec,
    VrrpSpecError, VrrpSyncGroupSpec,
};

use command::{NotifyCommands, NotifyMsg};
use engine::{Action, Engine, InstanceParams, Received, Tracker};
use neighbor::{format_mac, Mac};
use packet::{Advert, Version};

/// How often tracked interfaces are looked at.
pub const INTERFACE_POLL: Duration = Duration::from_millis(100);
/// A suspected ARP/NDP conflict is confirmed (and logged) if we still own the address this
/// much later.
pub const CONFLICT_CONFIRM: Duration = Duration::from_secs(1);

/// Why VRRP could not start.
#[derive(Debug, thiserror::Error)]
pub enum VrrpError {
    #[error("invalid VRRP configuration:\n{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<VrrpSpecError>),
    #[error("VRRP instance {instance}: {message}")]
    Instance { instance: String, message: String },
    #[error("VRRP on {interface}: {what}: {source}")]
    Io { interface: String, what: &'static str, source: std::io::Error },
    #[error("VRRP must be started inside a tokio runtime")]
    NoRuntime,
}

/// One virtual address in the status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualAddressStatus {
    pub address: IpAddr,
    /// Interface it is answered on.
    pub dev: String,
    /// Answered by us right now (we are master).
    pub owned: bool,
    pub arp_replies: u64,
    /// Gratuitous ARPs / unsolicited NAs sent.
    pub announcements: u64,
}

/// Another host answering for one of our addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictStatus {
    pub address: IpAddr,
    pub mac: String,
}

/// Counters of an instance, for `lbd status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VrrpCounters {
    pub adverts_sent: u64,
    pub adverts_received: u64,
    pub priority_zero_sent: u64,
    pub priority_zero_received: u64,
    pub became_master: u64,
    /// Adverts the kernel refused to send (each destination counts; see `send_error`).
    #[serde(default)]
    pub advert_send_errors: u64,
    /// Dropped adverts by reason: ttl, version, vrid, checksum, auth, address_list, interval,
    /// unknown_peer, malformed, own.
    pub dropped: BTreeMap<String, u64>,
}

/// An instance as `lbd status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VrrpInstanceStatus {
    pub name: String,
    pub interface: String,
    pub virtual_router_id: u8,
    pub version: u8,
    pub state: VrrpState,
    /// Configured priority.
    pub priority: u8,
    /// With the tracking weights applied: what the adverts carry.
    pub effective_priority: u8,
    pub advert_interval_ms: u64,
    /// Master_Adver_Interval (v3: the master's).
    pub master_advert_interval_ms: u64,
    /// Our address in adverts and elections.
    pub source: IpAddr,
    /// The master: our own address while master, the last one heard otherwise.
    pub master: Option<IpAddr>,
    pub master_priority: Option<u8>,
    /// Empty: multicast.
    pub unicast_peers: Vec<IpAddr>,
    pub sync_group: Option<String>,
    pub virtual_addresses: Vec<VirtualAddressStatus>,
    /// Failing tracked interfaces and scripts.
    pub failing: Vec<String>,
    /// Seconds since the last state change.
    pub in_state_secs: f64,
    pub counters: VrrpCounters,
    pub conflicts: Vec<ConflictStatus>,
    /// The last error sending an advert, until a send succeeds.
    pub send_error: Option<String>,
}

/// `lbd status` lines for the instances, e.g.
/// `VRRP VI_1 eth0 vrid 51 v3 MASTER priority 150 (150) master 10.0.0.2 adverts 42/0`.
pub fn render_status(instances: &[VrrpInstanceStatus]) -> String {
    let mut out = String::new();
    for s in instances {
        let master = s.master.map_or("-".to_string(), |m| m.to_string());
        out += &format!(
            "VRRP {} {} vrid {} v{} {:<6} priority {} ({}) master {} adverts sent {} received {}",
            s.name,
            s.interface,
            s.virtual_router_id,
            s.version,
            s.state,
            s.effective_priority,
            s.priority,
            master,
            s.counters.adverts_sent,
            s.counters.adverts_received
        );
        if s.counters.advert_send_errors > 0 {
            out += &format!(" send-errors {}", s.counters.advert_send_errors);
        }
        let dropped: Vec<String> = s.counters.dropped.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !dropped.is_empty() {
            out += &format!(" dropped {}", dropped.join(" "));
        }
        out.push('\n');
        if let Some(e) = &s.send_error {
            out += &format!("  NOT SENDING ADVERTS: {e}\n");
        }
        for a in &s.virtual_addresses {
            out += &format!("  -> {} on {}{} arp-replies {}\n", a.address, a.dev, if a.owned { " (answered)" } else { "" }, a.arp_replies);
        }
        for f in &s.failing {
            out += &format!("  failing: {f}\n");
        }
        for c in &s.conflicts {
            out += &format!("  CONFLICT: {} also answered by {}\n", c.address, c.mac);
        }
    }
    out
}

impl VrrpSpec {
    /// Whether `addr` is a virtual address of some instance (its traffic then depends on the
    /// VRRP state).
    pub fn covers(&self, addr: IpAddr) -> bool {
        self.instances.iter().any(|i| i.virtual_addresses.iter().any(|a| a.address == addr))
    }
}

/// Running VRRP instances. Dropping it stops everything at once (no priority-0 advert): call
/// [`VrrpHandle::shutdown`] for a clean stop.
pub struct VrrpHandle {
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
    main: Option<JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
    notify_tasks: Vec<JoinHandle<()>>,
    notify_limit: Duration,
}

enum Cmd {
    Shutdown(oneshot::Sender<()>),
    /// Stop without a word (see [`VrrpHandle::hand_over`]).
    HandOver(oneshot::Sender<()>),
}

enum Event {
    Packet { sock: usize, src: IpAddr, dst: IpAddr, ttl: u8, data: Vec<u8> },
    Interface { index: usize, up: bool },
    Script { index: usize, ok: bool },
}

struct VrrpSock {
    ifname: String,
    ifindex: u32,
    v6: bool,
    fd: AsyncFd<OwnedFd>,
    instances: Vec<usize>,
    ip_id: AtomicU16,
}

#[derive(Clone, Copy, Default)]
struct AddrStats {
    replies: u64,
    announcements: u64,
}

#[derive(Default)]
struct ResponderState {
    /// Owned addresses and since when.
    owned: HashMap<IpAddr, Instant>,
    stats: HashMap<IpAddr, AddrStats>,
    pending: HashSet<(IpAddr, Mac)>,
    conflicts: Vec<(IpAddr, Mac)>,
}

/// Answers ARP/NDP for the owned addresses of one interface.
struct Responder {
    ifname: String,
    mac: Mac,
    arp: Option<AsyncFd<OwnedFd>>,
    nd: Option<AsyncFd<OwnedFd>>,
    /// Holds the solicited-node memberships of the IPv6 addresses.
    _mld: Option<OwnedFd>,
    state: Mutex<ResponderState>,
}

/// (instance, tracker) pairs following one tracked object.
type Watchers = Vec<(usize, usize)>;

struct InstanceMeta {
    name: String,
    interface: String,
    sock: usize,
    /// Each address with the index of its responder.
    addrs: Vec<(IpAddr, usize)>,
}

struct Shared {
    engine: Mutex<Engine>,
    meta: Vec<InstanceMeta>,
    socks: Vec<VrrpSock>,
    responders: Vec<Arc<Responder>>,
    owned: RwLock<HashSet<IpAddr>>,
    /// Per instance: the last error sending an advert (until a send succeeds) and how many
    /// sends failed.
    send_errors: Mutex<HashMap<usize, (Option<String>, u64)>>,
}

fn io_err<'a>(interface: &'a str, what: &'static str) -> impl FnOnce(std::io::Error) -> VrrpError + 'a {
    move |source| VrrpError::Io { interface: interface.to_owned(), what, source }
}

/// Registers a socket with the runtime for readability.
fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd stays open, and is the same descriptor, for the AsyncFd's whole life.
    Ok(unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?)
}

fn pass_data(auth: &Option<AuthenticationSpec>) -> Option<[u8; 8]> {
    auth.as_ref().map(|a| {
        let mut d = [0u8; 8];
        let n = a.auth_pass.len().min(8);
        d[..n].copy_from_slice(&a.auth_pass.as_bytes()[..n]);
        d
    })
}

impl VrrpHandle {
    /// Validates `spec`, opens every socket (in the calling thread's network namespace) and
    /// starts the instances as tokio tasks; must be called inside a tokio runtime. The receiver
    /// follows the state of every instance by name (all INIT until the first step runs).
    pub fn start(spec: VrrpSpec) -> Result<(VrrpHandle, watch::Receiver<BTreeMap<String, VrrpState>>), VrrpError> {
        Self::start_resuming(spec, &BTreeSet::new())
    }

    /// [`Self::start`] after a reload: the instances named in `masters` (MASTER of the same
    /// virtual router before, see [`Self::hand_over`]) start as MASTER at once, and their
    /// `notify_master` does not run again (their state did not change), nor that of a sync group
    /// all of whose members are in `masters`, as keepalived keeps an instance's state across a
    /// reload.
    pub fn start_resuming(
        spec: VrrpSpec,
        masters: &BTreeSet<String>,
    ) -> Result<(VrrpHandle, watch::Receiver<BTreeMap<String, VrrpState>>), VrrpError> {
        let errors = spec.validate();
        if !errors.is_empty() {
            return Err(VrrpError::Invalid(errors));
        }
        tokio::runtime::Handle::try_current().map_err(|_| VrrpError::NoRuntime)?;
        let ctl = sys::IfCtl::new().map_err(io_err("-", "opening an ioctl socket"))?;

        // Interfaces: index, MAC, addresses; each looked up once.
        let mut iface_info: HashMap<String, (u32, Vec<IpAddr>)> = HashMap::new();
        let mut lookup = |name: &str| -> Result<(u32, Vec<IpAddr>), VrrpError> {
            if let Some(i) = iface_info.get(name) {
                return Ok(i.clone());
            }
            let index = ctl.index(name).map_err(io_err(name, "looking up the interface"))?;
            let addrs = sys::addresses(name).map_err(io_err(name, "reading its addresses"))?;
            iface_info.insert(name.to_owned(), (index, addrs.clone()));
            Ok((index, addrs))
        };

        let mut socks: Vec<VrrpSock> = Vec::new();
        let mut sock_keys: HashMap<(String, bool), usize> = HashMap::new();
        let mut responders: Vec<(String, u32, Vec<IpAddr>)> = Vec::new();
        let mut params = Vec::new();
        let mut meta = Vec::new();
        let mut notify_cmds = Vec::new();
        // Tracked interfaces (name, state, watchers) and scripts (watchers, by script index).
        let mut iface_watch: Vec<(String, bool, Watchers)> = Vec::new();
        let mut script_watch: Vec<Watchers> = vec![Vec::new(); spec.scripts.len()];

        for (i, s) in spec.instances.iter().enumerate() {
            let inst_err = |message: String| VrrpError::Instance { instance: s.name.clone(), message };
            let (ifindex, addrs) = lookup(&s.interface)?;
            let v6 = s.is_ipv6();
            let source = match s.unicast_source {
                Some(a) => a,
                None => addrs
                    .iter()
                    .copied()
                    .find(|a| if v6 { matches!(a, IpAddr::V6(x) if x.segments()[0] & 0xffc0 == 0xfe80) } else { a.is_ipv4() })
                    .ok_or_else(|| {
                        inst_err(format!(
                            "{} has no {} address to send adverts from; add one or set unicast_source",
                            s.interface,
                            if v6 { "IPv6 link-local" } else { "IPv4" }
                        ))
                    })?,
            };
            let multicast = s.unicast_peers.is_empty();
            let key = (s.interface.clone(), v6);
            let sock = match sock_keys.get(&key) {
                Some(&k) => k,
                None => {
                    socks.push(VrrpSock {
                        ifname: s.interface.clone(),
                        ifindex,
                        v6,
                        fd: register(
                            if v6 { sys::vrrp_socket_v6(&s.interface, ifindex) } else { sys::vrrp_socket_v4(&s.interface, ifindex) }
                                .map_err(io_err(&s.interface, "opening the VRRP socket (needs CAP_NET_RAW)"))?,
                        )
                        .map_err(io_err(&s.interface, "registering the VRRP socket"))?,
                        instances: Vec::new(),
                        ip_id: AtomicU16::new(1),
                    });
                    sock_keys.insert(key, socks.len() - 1);
                    socks.len() - 1
                }
            };
            socks[sock].instances.push(i);
            if multicast
                && !socks[sock].instances[..socks[sock].instances.len() - 1].iter().any(|&o| spec.instances[o].unicast_peers.is_empty())
            {
                let fd = socks[sock].fd.get_ref();
                let r = if v6 { sys::join_v6(fd, packet::MCAST_V6, ifindex) } else { sys::join_v4(fd, packet::MCAST_V4, ifindex) };
                r.map_err(io_err(&s.interface, "joining the VRRP multicast group"))?;
            }

            let mut inst_addrs = Vec::new();
            for a in &s.virtual_addresses {
                let dev = a.dev.clone().unwrap_or_else(|| s.interface.clone());
                let r = match responders.iter().position(|r| r.0 == dev) {
                    Some(r) => r,
                    None => {
                        let (index, _) = lookup(&dev)?;
                        responders.push((dev.clone(), index, Vec::new()));
                        responders.len() - 1
                    }
                };
                responders[r].2.push(a.address);
                inst_addrs.push((a.address, r));
            }

            // The instance's own interface is always tracked (weight 0), as keepalived does.
            let mut trackers = Vec::new();
            let mut track_iface = |name: &str, weight: i64, trackers: &mut Vec<Tracker>| {
                // A tracked interface that does not exist (yet) is down, as in keepalived.
                let up = ctl.is_up(name).unwrap_or_else(|e| {
                    warn!(instance = %s.name, interface = name, "tracked interface: {e}; taken as down");
                    false
                });
                let w = match iface_watch.iter().position(|w| w.0 == name) {
                    Some(w) => w,
                    None => {
                        iface_watch.push((name.to_owned(), up, Vec::new()));
                        iface_watch.len() - 1
                    }
                };
                iface_watch[w].2.push((i, trackers.len()));
                trackers.push(Tracker { what: format!("interface {name}"), weight: weight as i32, ok: up });
            };
            track_iface(&s.interface, 0, &mut trackers);
            for t in &s.track_interface {
                if t.name != s.interface || t.weight != 0 {
                    track_iface(&t.name, t.weight, &mut trackers);
                }
            }
            for t in &s.track_script {
                let k = spec.scripts.iter().position(|sc| sc.name == t.name).expect("validated");
                let sc = &spec.scripts[k];
                script_watch[k].push((i, trackers.len()));
                trackers.push(Tracker {
                    what: format!("script {}", sc.name),
                    weight: t.weight.or(sc.weight).unwrap_or(0) as i32,
                    ok: !sc.init_fail.unwrap_or(false),
                });
            }

            let version = if s.effective_version() == 3 { Version::V3 } else { Version::V2 };
            params.push(InstanceParams {
                name: s.name.clone(),
                vrid: s.virtual_router_id as u8,
                version,
                priority: s.priority.unwrap_or(spec::DEFAULT_PRIORITY) as u8,
                advert_interval: s.advert_interval.map_or(spec::DEFAULT_ADVERT_INTERVAL, |d| d.0),
                preempt: s.preempt.unwrap_or(true),
                preempt_delay: s.preempt_delay.map_or(Duration::ZERO, |d| d.0),
                addresses: s.virtual_addresses.iter().map(|a| a.address).collect(),
                source,
                unicast_peers: s.unicast_peers.clone(),
                auth: pass_data(&s.authentication),
                garp_delay: s.garp_master_delay.map_or(spec::DEFAULT_GARP_MASTER_DELAY, |d| d.0),
                garp_repeat: s.garp_master_repeat.unwrap_or(spec::DEFAULT_GARP_MASTER_REPEAT) as u32,
                garp_refresh: s.garp_master_refresh.map_or(Duration::ZERO, |d| d.0),
                garp_refresh_repeat: s.garp_master_refresh_repeat.unwrap_or(1) as u32,
                // Unset: the garp_master_* values (keepalived: its global vrrp_garp_master_*
                // ones, which have the same defaults).
                garp_lower_prio_repeat: s
                    .garp_lower_prio_repeat
                    .or(s.garp_master_repeat)
                    .unwrap_or(spec::DEFAULT_GARP_MASTER_REPEAT) as u32,
                garp_lower_prio_delay: s.garp_lower_prio_delay.or(s.garp_master_delay).map_or(spec::DEFAULT_GARP_MASTER_DELAY, |d| d.0),
                trackers,
            });
            meta.push(InstanceMeta { name: s.name.clone(), interface: s.interface.clone(), sock, addrs: inst_addrs });
            notify_cmds.push(NotifyCommands::new("INSTANCE", &s.name, s.notify_fields()));
        }

        // ARP/NDP responders, one per interface that carries virtual addresses.
        let resp = responders
            .iter()
            .map(|(name, index, addrs)| Responder::open(&ctl, name, *index, addrs).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;

        let groups: Vec<(String, Vec<usize>)> = spec
            .sync_groups
            .iter()
            .map(|g| {
                (g.name.clone(), g.group.iter().map(|m| spec.instances.iter().position(|i| &i.name == m).expect("validated")).collect())
            })
            .collect();
        let group_cmds: Vec<NotifyCommands> = spec
            .sync_groups
            .iter()
            .map(|g| NotifyCommands::new("GROUP", &g.name, g.notify_fields()))
            .collect();
        let notify_limit = notify_cmds.iter().chain(&group_cmds).map(|c| c.timeout).max().unwrap_or_default();

        // Per instance, then per sync group (all of whose members resumed): MASTER before the
        // reload, so its first MASTER is not notified again.
        let mut resumed: Vec<bool> = spec.instances.iter().map(|i| masters.contains(&i.name)).collect();
        let groups_resumed: Vec<bool> = groups.iter().map(|(_, members)| members.iter().all(|&m| resumed[m])).collect();
        resumed.extend(groups_resumed);
        let mut engine = Engine::new(params, groups);
        for (i, _) in resumed[..spec.instances.len()].iter().enumerate().filter(|(_, r)| **r) {
            engine.resume_master(i);
        }
        let shared = Arc::new(Shared {
            engine: Mutex::new(engine),
            meta,
            socks,
            responders: resp,
            owned: RwLock::new(HashSet::new()),
            send_errors: Mutex::new(HashMap::new()),
        });

        let mut tasks = Vec::new();
        let mut notify_tasks = Vec::new();
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        for k in 0..shared.socks.len() {
            tasks.push(tokio::spawn(vrrp_reader(shared.clone(), k, ev_tx.clone())));
        }
        for r in &shared.responders {
            if r.arp.is_some() {
                tasks.push(tokio::spawn(arp_responder(r.clone())));
            }
            if r.nd.is_some() {
                tasks.push(tokio::spawn(nd_responder(r.clone())));
            }
        }
        let iface_targets: Vec<Watchers> = iface_watch.iter().map(|w| w.2.clone()).collect();
        tasks.push(tokio::spawn(watch_interfaces(ctl, iface_watch.iter().map(|w| (w.0.clone(), w.1)).collect(), ev_tx.clone())));
        for (k, watchers) in script_watch.iter().enumerate() {
            if !watchers.is_empty() {
                tasks.push(tokio::spawn(run_script(k, spec.scripts[k].clone(), ev_tx.clone())));
            }
        }
        drop(ev_tx);
        let mut notify_tx = Vec::new();
        for cmds in notify_cmds.into_iter().chain(group_cmds) {
            if cmds.is_empty() {
                notify_tx.push(None);
            } else {
                let (tx, rx) = mpsc::unbounded_channel();
                notify_tasks.push(tokio::spawn(command::notify_queue(cmds, rx)));
                notify_tx.push(Some(tx));
            }
        }

        let names: BTreeMap<String, VrrpState> = spec.instances.iter().map(|i| (i.name.clone(), VrrpState::Init)).collect();
        let (state_tx, state_rx) = watch::channel(names);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let ctx = Ctx {
            shared: shared.clone(),
            state_tx,
            resumed: Mutex::new(resumed),
            notify_tx,
            n_instances: spec.instances.len(),
            iface_targets,
            script_targets: script_watch,
        };
        let main = tokio::spawn(main_loop(ctx, ev_rx, cmd_rx));
        info!(instances = spec.instances.len(), "VRRP started");
        Ok((VrrpHandle { shared, cmd: cmd_tx, main: Some(main), tasks, notify_tasks, notify_limit }, state_rx))
    }

    /// Whether virtual address `addr` is currently ours (its instance is MASTER).
    pub fn owns(&self, addr: IpAddr) -> bool {
        self.shared.owned.read().expect("not poisoned").contains(&addr)
    }

    /// The state of every instance by name.
    pub fn states(&self) -> BTreeMap<String, VrrpState> {
        let e = self.shared.engine.lock().expect("not poisoned");
        (0..e.len()).map(|i| (self.shared.meta[i].name.clone(), e.state(i))).collect()
    }

    /// Every instance, for `lbd status`.
    pub fn status(&self) -> Vec<VrrpInstanceStatus> {
        let e = self.shared.engine.lock().expect("not poisoned");
        let errors = self.shared.send_errors.lock().expect("not poisoned").clone();
        let now = Instant::now();
        (0..e.len())
            .map(|i| {
                let p = e.params(i);
                let m = &self.shared.meta[i];
                let c = e.counters(i);
                let mut addrs = Vec::new();
                let mut conflicts = Vec::new();
                for &(addr, r) in &m.addrs {
                    let resp = &self.shared.responders[r];
                    let st = resp.state.lock().expect("not poisoned");
                    let stats = st.stats.get(&addr).copied().unwrap_or_default();
                    addrs.push(VirtualAddressStatus {
                        address: addr,
                        dev: resp.ifname.clone(),
                        owned: st.owned.contains_key(&addr),
                        arp_replies: stats.replies,
                        announcements: stats.announcements,
                    });
                    conflicts.extend(
                        st.conflicts.iter().filter(|c| c.0 == addr).map(|c| ConflictStatus { address: c.0, mac: format_mac(&c.1) }),
                    );
                }
                VrrpInstanceStatus {
                    name: m.name.clone(),
                    interface: m.interface.clone(),
                    virtual_router_id: p.vrid,
                    version: p.version.number(),
                    state: e.state(i),
                    priority: p.priority,
                    effective_priority: e.effective_priority(i),
                    advert_interval_ms: p.advert_interval.as_millis() as u64,
                    master_advert_interval_ms: e.master_advert_interval(i).as_millis() as u64,
                    source: p.source,
                    master: e.master(i),
                    master_priority: e.master_priority(i),
                    unicast_peers: p.unicast_peers.clone(),
                    sync_group: e.group_of(i).map(str::to_owned),
                    virtual_addresses: addrs,
                    failing: e.failing(i),
                    in_state_secs: e.since(i).map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64()),
                    counters: VrrpCounters {
                        adverts_sent: c.adverts_sent,
                        adverts_received: c.adverts_received,
                        priority_zero_sent: c.priority_zero_sent,
                        priority_zero_received: c.priority_zero_received,
                        became_master: c.became_master,
                        advert_send_errors: errors.get(&i).map_or(0, |e| e.1),
                        dropped: c.dropped.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                    },
                    conflicts,
                    send_error: errors.get(&i).and_then(|e| e.0.clone()),
                }
            })
            .collect()
    }

    /// Stops cleanly: masters send a priority-0 advert (their backups take over after
    /// Skew_Time), every address stops being answered, `notify_stop` and `notify ... STOP` run
    /// (waited for, up to their timeout), then every task ends.
    pub async fn shutdown(mut self) {
        self.end_main(Cmd::Shutdown).await;
        // The queues end once they have run what the stop queued.
        let deadline = tokio::time::Instant::now() + self.notify_limit * 3 + Duration::from_secs(1);
        for t in std::mem::take(&mut self.notify_tasks) {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
        info!("VRRP stopped");
    }

    /// Stops for a restart with a new configuration ([`Self::start_resuming`]): unlike
    /// [`Self::shutdown`], masters send no priority-0 advert, nothing is notified, and commands
    /// already queued run on without being waited for. Returns the instances that were MASTER.
    pub async fn hand_over(mut self) -> BTreeSet<String> {
        self.end_main(Cmd::HandOver).await;
        // Dropping their handles lets the notify queues finish on their own.
        drop(std::mem::take(&mut self.notify_tasks));
        let masters = self.states().into_iter().filter(|(_, s)| *s == VrrpState::Master).map(|(name, _)| name).collect();
        info!("VRRP stopped for a restart");
        masters
    }

    /// Has the main task end with `cmd`, waits for it, and ends the readers and responders.
    async fn end_main(&mut self, cmd: fn(oneshot::Sender<()>) -> Cmd) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(cmd(tx)).is_ok() {
            let _ = rx.await;
        }
        if let Some(main) = self.main.take() {
            let _ = main.await;
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for VrrpHandle {
    fn drop(&mut self) {
        if let Some(m) = &self.main {
            m.abort();
        }
        for t in self.tasks.iter().chain(&self.notify_tasks) {
            t.abort();
        }
    }
}

/// What the main task needs besides the shared state.
struct Ctx {
    shared: Arc<Shared>,
    state_tx: watch::Sender<BTreeMap<String, VrrpState>>,
    /// Per instance, then per sync group: resumed as MASTER, its first transition (INIT →
    /// MASTER) not notified yet.
    resumed: Mutex<Vec<bool>>,
    /// Per instance, then per sync group.
    notify_tx: Vec<Option<mpsc::UnboundedSender<NotifyMsg>>>,
    n_instances: usize,
    iface_targets: Vec<Watchers>,
    script_targets: Vec<Watchers>,
}

async fn main_loop(ctx: Ctx, mut events: mpsc::Receiver<Event>, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
    {
        let mut e = ctx.shared.engine.lock().expect("not poisoned");
        let acts = e.start(Instant::now());
        ctx.perform(&e, acts);
    }
    loop {
        let next = ctx.shared.engine.lock().expect("not poisoned").next_timer();
        let sleep = async move {
            match next {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            cmd = cmds.recv() => {
                if let Some(Cmd::HandOver(done)) = cmd {
                    let _ = done.send(());
                    return;
                }
                let mut e = ctx.shared.engine.lock().expect("not poisoned");
                let acts = e.stop(Instant::now());
                ctx.perform(&e, acts);
                drop(e);
                if let Some(Cmd::Shutdown(done)) = cmd {
                    let _ = done.send(());
                }
                return;
            }
            Some(ev) = events.recv() => {
                let mut e = ctx.shared.engine.lock().expect("not poisoned");
                let acts = ctx.event(&mut e, Instant::now(), ev);
                ctx.perform(&e, acts);
            }
            _ = sleep => {
                let mut e = ctx.shared.engine.lock().expect("not poisoned");
                let acts = e.tick(Instant::now());
                ctx.perform(&e, acts);
            }
        }
    }
}

impl Ctx {
    fn event(&self, e: &mut Engine, now: Instant, ev: Event) -> Vec<Action> {
        let mut acts = Vec::new();
        match ev {
            Event::Packet { sock, src, dst, ttl, data } => {
                let s = &self.shared.socks[sock];
                let vrid = data.get(1).copied();
                let targets: Vec<usize> = s.instances.iter().copied().filter(|&i| Some(e.params(i).vrid) == vrid).collect();
                if targets.is_empty() {
                    for &i in &s.instances {
                        e.count_drop(i, DropReason::Vrid);
                    }
                }
                for i in targets {
                    if let Ok(adv) = e.check(i, &Received { src, dst, ttl, vrrp: &data }) {
                        acts.extend(e.receive(now, i, src, &adv));
                    }
                }
            }
            Event::Interface { index, up } => {
                for &(i, t) in &self.iface_targets[index] {
                    acts.extend(e.track(now, i, t, up));
                }
            }
            Event::Script { index, ok } => {
                for &(i, t) in &self.script_targets[index] {
                    acts.extend(e.track(now, i, t, ok));
                }
            }
        }
        acts
    }

    fn perform(&self, e: &Engine, acts: Vec<Action>) {
        let now = Instant::now();
        for a in acts {
            match a {
                Action::Advert { instance, priority } => self.send_advert(e, instance, priority),
                Action::Garp { instance, repeat } => {
                    for &(addr, r) in &self.shared.meta[instance].addrs {
                        self.shared.responders[r].announce(addr, repeat);
                    }
                }
                Action::Probe { instance } => {
                    for &(addr, r) in &self.shared.meta[instance].addrs {
                        self.shared.responders[r].probe(addr);
                    }
                }
                Action::State { instance, from, to, priority } => {
                    let m = &self.shared.meta[instance];
                    let mut owned = self.shared.owned.write().expect("not poisoned");
                    if to == VrrpState::Master {
                        for &(addr, r) in &m.addrs {
                            self.shared.responders[r].state.lock().expect("not poisoned").owned.insert(addr, now);
                            owned.insert(addr);
                        }
                    } else if from == VrrpState::Master {
                        for &(addr, r) in &m.addrs {
                            self.shared.responders[r].state.lock().expect("not poisoned").owned.remove(&addr);
                            owned.remove(&addr);
                        }
                    }
                    drop(owned);
                    self.state_tx.send_modify(|map| {
                        map.insert(m.name.clone(), to);
                    });
                    let resumed = std::mem::take(&mut self.resumed.lock().expect("not poisoned")[instance]);
                    if resumed && from == VrrpState::Init && to == VrrpState::Master {
                        info!(instance = %m.name, "VRRP instance stays MASTER across the reload");
                    } else if let Some(tx) = &self.notify_tx[instance] {
                        let _ = tx.send((to, priority));
                    }
                }
                Action::Group { group, state } => {
                    let resumed = std::mem::take(&mut self.resumed.lock().expect("not poisoned")[self.n_instances + group]);
                    if resumed && state == VrrpState::Master {
                        info!(group = e.group_name(group), "VRRP sync group stays MASTER across the reload");
                        continue;
                    }
                    info!(group = e.group_name(group), state = %state, "VRRP sync group state");
                    if let Some(tx) = &self.notify_tx[self.n_instances + group] {
                        let _ = tx.send((state, 0));
                    }
                }
            }
        }
    }

    fn send_advert(&self, e: &Engine, i: usize, priority: u8) {
        let p = e.params(i);
        let sock = &self.shared.socks[self.shared.meta[i].sock];
        let (auth_type, auth_data) = match (p.version, p.auth) {
            (Version::V2, Some(d)) => (packet::AUTH_PASS, d),
            _ => (packet::AUTH_NONE, [0; 8]),
        };
        let adv = Advert {
            version: p.version,
            vrid: p.vrid,
            priority,
            interval_cs: (p.advert_interval.as_millis() / 10) as u16,
            addresses: p.addresses.clone(),
            auth_type,
            auth_data,
        };
        let dsts: Vec<IpAddr> = if p.unicast_peers.is_empty() {
            vec![if sock.v6 { IpAddr::V6(packet::MCAST_V6) } else { IpAddr::V4(packet::MCAST_V4) }]
        } else {
            p.unicast_peers.clone()
        };
        let (mut error, mut failed) = (None, 0);
        for dst in dsts {
            let msg = adv.encode(p.source, dst);
            let r = match (p.source, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    let id = sock.ip_id.fetch_add(1, Ordering::Relaxed);
                    let mut pkt = packet::ipv4_header(s, d, id, msg.len()).to_vec();
                    pkt.extend_from_slice(&msg);
                    sys::send_v4(sock.fd.get_ref(), &pkt, d)
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => sys::send_v6(sock.fd.get_ref(), &msg, s, d, sock.ifindex),
                _ => Ok(()), // refused by validation
            };
            if let Err(err) = r {
                error = Some(format!("sending to {dst}: {err}"));
                failed += 1;
            }
        }
        let mut errors = self.shared.send_errors.lock().expect("not poisoned");
        let (last, count) = errors.entry(i).or_default();
        *count += failed;
        match error {
            Some(msg) => {
                if last.as_ref() != Some(&msg) {
                    warn!(instance = %p.name, interface = %sock.ifname, "VRRP advert not sent: {msg}");
                }
                *last = Some(msg);
            }
            None => {
                if last.take().is_some() {
                    info!(instance = %p.name, "VRRP adverts are sent again");
                }
            }
        }
    }
}

impl Responder {
    /// The sockets answering for `addrs` on interface `name`.
    fn open(ctl: &sys::IfCtl, name: &str, index: u32, addrs: &[IpAddr]) -> Result<Responder, VrrpError> {
        let mac = ctl.mac(name).map_err(io_err(name, "reading its MAC address"))?;
        let arp = if addrs.iter().any(IpAddr::is_ipv4) {
            let fd = sys::packet_socket(index, neighbor::ETH_P_ARP).map_err(io_err(name, "opening the ARP socket"))?;
            Some(register(fd).map_err(io_err(name, "registering the ARP socket"))?)
        } else {
            None
        };
        let (nd, mld) = if addrs.iter().any(IpAddr::is_ipv6) {
            let fd = sys::packet_socket(index, neighbor::ETH_P_IPV6).map_err(io_err(name, "opening the NDP socket"))?;
            sys::attach_filter(&fd, &neighbor::ND_FILTER).map_err(io_err(name, "filtering the NDP socket"))?;
            // The kernel does not own the addresses, so it would not join their solicited-node
            // groups: neighbour solicitations for them would not get past the NIC's filter
            // (nor a snooping switch).
            let mld = sys::membership_socket_v6().map_err(io_err(name, "opening an IPv6 socket"))?;
            for a in addrs {
                if let IpAddr::V6(v6) = a {
                    sys::join_v6(&mld, neighbor::solicited_node(*v6), index).map_err(io_err(name, "joining a solicited-node group"))?;
                }
            }
            (Some(register(fd).map_err(io_err(name, "registering the NDP socket"))?), Some(mld))
        } else {
            (None, None)
        };
        Ok(Responder { ifname: name.to_owned(), mac, arp, nd, _mld: mld, state: Mutex::new(ResponderState::default()) })
    }

    fn send(&self, fd: &Option<AsyncFd<OwnedFd>>, frame: &[u8]) {
        if let Some(fd) = fd {
            if let Err(e) = sys::send(fd.get_ref(), frame) {
                debug!(interface = %self.ifname, "sending an ARP/NDP frame: {e}");
            }
        }
    }

    fn is_owned(&self, a: IpAddr) -> bool {
        self.state.lock().expect("not poisoned").owned.contains_key(&a)
    }

    /// Gratuitous ARPs / unsolicited NAs for `addr`.
    fn announce(&self, addr: IpAddr, repeat: u32) {
        for _ in 0..repeat {
            match addr {
                IpAddr::V4(v4) => self.send(&self.arp, &neighbor::gratuitous_arp(self.mac, v4)),
                IpAddr::V6(v6) => self.send(&self.nd, &neighbor::unsolicited_na(self.mac, v6)),
            }
        }
        self.state.lock().expect("not poisoned").stats.entry(addr).or_default().announcements += u64::from(repeat);
    }

    /// Asks whether another host answers for `addr`.
    fn probe(&self, addr: IpAddr) {
        match addr {
            IpAddr::V4(v4) => self.send(&self.arp, &neighbor::arp_probe(self.mac, v4)),
            IpAddr::V6(v6) => self.send(&self.nd, &neighbor::ns_probe(self.mac, v6)),
        }
    }

    fn replied(&self, addr: IpAddr) {
        self.state.lock().expect("not poisoned").stats.entry(addr).or_default().replies += 1;
    }

    /// Another MAC claims owned address `addr`: confirmed if we still own it (since the same
    /// time) after [`CONFLICT_CONFIRM`]; logged once per (address, MAC).
    fn suspect(self: &Arc<Self>, addr: IpAddr, mac: Mac) {
        let since = {
            let mut st = self.state.lock().expect("not poisoned");
            let Some(&since) = st.owned.get(&addr) else { return };
            if st.conflicts.contains(&(addr, mac)) || !st.pending.insert((addr, mac)) {
                return;
            }
            since
        };
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(CONFLICT_CONFIRM).await;
            let mut st = me.state.lock().expect("not poisoned");
            st.pending.remove(&(addr, mac));
            if st.owned.get(&addr) == Some(&since) {
                st.conflicts.push((addr, mac));
                warn!(
                    address = %addr,
                    mac = %format_mac(&mac),
                    interface = %me.ifname,
                    "ARP conflict: another host answers for virtual address {addr} (MAC {}); a real server without arp_ignore=1/arp_announce=2 (or a second master)?",
                    format_mac(&mac)
                );
            }
        });
    }

    fn on_arp(self: &Arc<Self>, frame: &[u8]) {
        let Some(arp) = neighbor::parse_arp(frame) else { return };
        if arp.sha == self.mac || arp.eth_src == self.mac {
            return;
        }
        let (spa, tpa) = (IpAddr::V4(arp.spa), IpAddr::V4(arp.tpa));
        if self.is_owned(spa) {
            self.suspect(spa, arp.sha);
        }
        if arp.request && arp.spa != arp.tpa && self.is_owned(tpa) {
            self.send(&self.arp, &neighbor::arp_reply(self.mac, arp.tpa, &arp));
            self.replied(tpa);
        }
    }

    fn on_nd(self: &Arc<Self>, frame: &[u8]) {
        let Some(nd) = neighbor::parse_nd(frame) else { return };
        if nd.eth_src == self.mac || nd.hop_limit != 255 {
            return;
        }
        let target = IpAddr::V6(nd.target);
        if nd.solicit {
            if self.is_owned(IpAddr::V6(nd.src)) {
                self.suspect(IpAddr::V6(nd.src), nd.eth_src);
            }
            if self.is_owned(target) {
                self.send(&self.nd, &neighbor::na_reply(self.mac, nd.target, &nd));
                self.replied(target);
            }
        } else if self.is_owned(target) {
            let mac = nd.lla.unwrap_or(nd.eth_src);
            if mac != self.mac {
                self.suspect(target, mac);
            }
        }
    }
}

/// Reads frames from `fd` until it fails, handing each to `handle`.
async fn read_frames(fd: &AsyncFd<OwnedFd>, what: &str, mut handle: impl FnMut(&[u8])) {
    let mut buf = vec![0u8; 9216];
    loop {
        let Ok(mut guard) = fd.readable().await else { return };
        loop {
            match guard.try_io(|fd| sys::recv(fd.get_ref(), &mut buf)) {
                Ok(Ok(n)) => handle(&buf[..n]),
                Ok(Err(e)) => {
                    warn!("{what}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
                Err(_would_block) => break,
            }
        }
    }
}

async fn arp_responder(r: Arc<Responder>) {
    let fd = r.arp.as_ref().expect("has an ARP socket");
    read_frames(fd, "ARP socket", |f| r.on_arp(f)).await;
}

async fn nd_responder(r: Arc<Responder>) {
    let fd = r.nd.as_ref().expect("has an NDP socket");
    read_frames(fd, "NDP socket", |f| r.on_nd(f)).await;
}

async fn vrrp_reader(shared: Arc<Shared>, k: usize, tx: mpsc::Sender<Event>) {
    let s = &shared.socks[k];
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok(mut guard) = s.fd.readable().await else { return };
        loop {
            let ev = if s.v6 {
                match guard.try_io(|fd| sys::recv_v6(fd.get_ref(), &mut buf)) {
                    Err(_would_block) => break,
                    Ok(Err(e)) => {
                        warn!(interface = %s.ifname, "VRRP socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                    Ok(Ok(rx)) => Event::Packet {
                        sock: k,
                        src: IpAddr::V6(rx.src),
                        dst: IpAddr::V6(rx.dst.unwrap_or(Ipv6Addr::UNSPECIFIED)),
                        ttl: rx.hop_limit.unwrap_or(0),
                        data: buf[..rx.len].to_vec(),
                    },
                }
            } else {
                match guard.try_io(|fd| sys::recv(fd.get_ref(), &mut buf)) {
                    Err(_would_block) => break,
                    Ok(Err(e)) => {
                        warn!(interface = %s.ifname, "VRRP socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        break;
                    }
                    Ok(Ok(n)) => match packet::parse_ipv4(&buf[..n]) {
                        Some((ip, payload)) if ip.protocol == packet::IPPROTO_VRRP => {
                            Event::Packet { sock: k, src: IpAddr::V4(ip.src), dst: IpAddr::V4(ip.dst), ttl: ip.ttl, data: payload.to_vec() }
                        }
                        _ => continue,
                    },
                }
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}

async fn watch_interfaces(ctl: sys::IfCtl, mut ifaces: Vec<(String, bool)>, tx: mpsc::Sender<Event>) {
    let mut tick = tokio::time::interval(INTERFACE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for (index, (name, up)) in ifaces.iter_mut().enumerate() {
            let now_up = ctl.is_up(name).unwrap_or(false);
            if now_up != *up {
                *up = now_up;
                info!(interface = %name, up = now_up, "tracked interface changed");
                if tx.send(Event::Interface { index, up: now_up }).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// keepalived's `vrrp_script`: run every interval; `rise` good runs in a row make a failed
/// script good, `fall` failed runs make a good one failed. The first run decides at once, as
/// keepalived's does (its script starts in an "init" state): a script that fails from the start
/// is failed after one run, not after `fall`, or a director whose check fails would take the
/// VIPs over for those runs and then give them back.
async fn run_script(index: usize, s: VrrpScriptSpec, tx: mpsc::Sender<Event>) {
    let interval = s.interval.map_or(spec::DEFAULT_SCRIPT_INTERVAL, |d| d.0);
    let timeout = s.timeout.map_or(interval, |d| d.0);
    let (rise, fall) = (s.rise.unwrap_or(1) as u32, s.fall.unwrap_or(1) as u32);
    let mut ok = !s.init_fail.unwrap_or(false);
    let mut first = true;
    let (mut good, mut bad) = (0u32, 0u32);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let outcome = command::run_shell(&s.script, &[], timeout).await;
        let passed = outcome.success();
        if passed {
            (good, bad) = (good + 1, 0);
        } else {
            (good, bad) = (0, bad + 1);
        }
        let now_ok = if ok { bad < fall && (passed || !first) } else { good >= rise };
        first = false;
        if now_ok != ok {
            ok = now_ok;
            info!(script = %s.name, ok, %outcome, "VRRP script changed");
            if tx.send(Event::Script { index, ok }).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A script that fails from the start is failed after its first run, whatever its `fall`
    /// (keepalived's "init" state); later failures need `fall` runs in a row.
    #[tokio::test]
    async fn a_script_failing_from_the_start_fails_at_its_first_run() {
        let dir = std::env::temp_dir().join(format!("lbd-vrrp-script-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let runs = dir.join("runs");
        let script = VrrpScriptSpec {
            name: "chk".into(),
            script: format!("echo run >> {}; exit 1", runs.display()),
            interval: Some(spec::DurationSpec(Duration::from_secs(30))),
            timeout: None,
            weight: None,
            rise: None,
            fall: Some(3),
            init_fail: None,
        };
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(run_script(7, script, tx));
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
        task.abort();
        let runs_seen = std::fs::read_to_string(&runs).unwrap_or_default().lines().count();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(ev, Ok(Some(Event::Script { index: 7, ok: false }))), "no failure after the first run ({runs_seen} runs)");
        assert_eq!(runs_seen, 1);
    }

    fn spec(text: &str) -> VrrpSpec {
        #[derive(Deserialize)]
        struct File {
            vrrp_instance: Vec<VrrpInstanceSpec>,
        }
        let f: File = toml::from_str(text).unwrap();
        VrrpSpec { instances: f.vrrp_instance, ..Default::default() }
    }

    const ONE: &str =
        "[[vrrp_instance]]\nname = \"VI_1\"\ninterface = \"lbdnope0\"\nvirtual_router_id = 51\nvirtual_addresses = [\"10.0.0.100\"]\n";

    #[test]
    fn start_refuses_invalid_specs_missing_interfaces_and_no_runtime() {
        let err = VrrpHandle::start(spec(&ONE.replace("= 51", "= 0"))).err().unwrap();
        assert!(matches!(&err, VrrpError::Invalid(e) if e.len() == 1), "{err}");
        assert_eq!(
            err.to_string(),
            "invalid VRRP configuration:\n[[vrrp_instance]] #1 `virtual_router_id`: virtual_router_id must be between 1 and 255, got 0"
        );
        assert!(matches!(VrrpHandle::start(spec(ONE)), Err(VrrpError::NoRuntime)));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let err = rt.block_on(async { VrrpHandle::start(spec(ONE)).err().unwrap() });
        assert!(err.to_string().starts_with("VRRP on lbdnope0: looking up the interface:"), "{err}");
    }

    /// Before Linux 4.20 the ARP/NDP sockets also read the frames this host sends
    /// (`sys::ignore_outgoing`): every one carries the interface's MAC, and the handlers skip
    /// them, so a kernel without PACKET_IGNORE_OUTGOING neither answers our own (or the
    /// kernel's) requests nor takes our own announcements for a conflict.
    #[test]
    fn responders_skip_the_frames_this_host_sends() {
        const OURS: Mac = [2, 0, 0, 0, 0, 1];
        const OTHER: Mac = [2, 0, 0, 0, 0, 2];
        let (v4, v6): (std::net::Ipv4Addr, Ipv6Addr) = ("10.0.0.100".parse().unwrap(), "fd00::100".parse().unwrap());
        let r = Arc::new(Responder { ifname: "eth0".into(), mac: OURS, arp: None, nd: None, _mld: None, state: Default::default() });
        let now = Instant::now();
        r.state.lock().unwrap().owned.extend([(IpAddr::V4(v4), now), (IpAddr::V6(v6), now)]);
        let replies = |a: IpAddr| r.state.lock().unwrap().stats.get(&a).map_or(0, |s| s.replies);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = rt.enter();

        // What an outgoing copy looks like: our announcements, our replies, requests sent from
        // our MAC (the kernel's own, or our probes).
        r.on_arp(&neighbor::gratuitous_arp(OURS, v4));
        r.on_arp(&neighbor::arp_probe(OURS, v4));
        r.on_nd(&neighbor::unsolicited_na(OURS, v6));
        r.on_nd(&neighbor::ns_probe(OURS, v6));
        let from_peer = neighbor::parse_nd(&neighbor::ns_probe(OTHER, v6)).unwrap();
        r.on_nd(&neighbor::na_reply(OURS, v6, &from_peer));
        assert_eq!((replies(IpAddr::V4(v4)), replies(IpAddr::V6(v6))), (0, 0), "not answered");
        assert!(r.state.lock().unwrap().pending.is_empty(), "not a conflict");

        // The same from another host: answered, or suspected as a conflict.
        r.on_arp(&neighbor::arp_probe(OTHER, v4));
        r.on_nd(&neighbor::ns_probe(OTHER, v6));
        assert_eq!((replies(IpAddr::V4(v4)), replies(IpAddr::V6(v6))), (1, 1));
        r.on_arp(&neighbor::gratuitous_arp(OTHER, v4));
        r.on_nd(&neighbor::unsolicited_na(OTHER, v6));
        assert_eq!(r.state.lock().unwrap().pending.len(), 2);
    }

    #[test]
    fn covers_and_status_text() {
        let s = spec(ONE);
        assert!(s.covers("10.0.0.100".parse().unwrap()));
        assert!(!s.covers("10.0.0.101".parse().unwrap()));
        let st = VrrpInstanceStatus {
            name: "VI_1".into(),
            interface: "eth0".into(),
            virtual_router_id: 51,
            version: 3,
            state: VrrpState::Master,
            priority: 150,
            effective_priority: 130,
            advert_interval_ms: 100,
            master_advert_interval_ms: 100,
            source: "10.0.0.2".parse().unwrap(),
            master: Some("10.0.0.2".parse().unwrap()),
            master_priority: Some(130),
            unicast_peers: vec![],
            sync_group: None,
            virtual_addresses: vec![VirtualAddressStatus {
                address: "10.0.0.100".parse().unwrap(),
                dev: "eth0".into(),
                owned: true,
                arp_replies: 7,
                announcements: 5,
            }],
            failing: vec!["interface eth1".into()],
            in_state_secs: 1.0,
            counters: VrrpCounters {
                adverts_sent: 42,
                advert_send_errors: 2,
                dropped: BTreeMap::from([("vrid".to_string(), 3)]),
                ..Default::default()
            },
            conflicts: vec![ConflictStatus { address: "10.0.0.100".parse().unwrap(), mac: "02:00:00:00:00:0b".into() }],
            send_error: Some("sending to 224.0.0.18: Network is unreachable (os error 101)".into()),
        };
        assert_eq!(
            render_status(std::slice::from_ref(&st)),
            "VRRP VI_1 eth0 vrid 51 v3 MASTER priority 130 (150) master 10.0.0.2 adverts sent 42 received 0 send-errors 2 dropped vrid=3\n\
             \x20 NOT SENDING ADVERTS: sending to 224.0.0.18: Network is unreachable (os error 101)\n\
             \x20 -> 10.0.0.100 on eth0 (answered) arp-replies 7\n\
             \x20 failing: interface eth1\n\
             \x20 CONFLICT: 10.0.0.100 also answered by 02:00:00:00:00:0b\n"
        );
        // The JSON form reads back (the CLI decodes what the daemon sends).
        let json = serde_json::to_string(&st).unwrap();
        assert!(json.contains("\"state\":\"MASTER\""), "{json}");
        assert_eq!(serde_json::from_str::<VrrpInstanceStatus>(&json).unwrap(), st);
    }
}
