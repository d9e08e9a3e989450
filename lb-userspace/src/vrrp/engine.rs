//! The VRRP state machine of every instance and sync group, without any I/O: the runtime feeds
//! it received adverts, tracker changes and the time, and carries out the [`Action`]s it
//! returns. Time is always passed in (`now`), never read, so tests drive it with a fake clock.
//!
//! Follows RFC 5798 section 6.4 (and RFC 3768 for v2), with keepalived's choices where the
//! RFCs leave room (so that mixed lbd/keepalived pairs behave the same either way round):
//! - preempt_delay: a backup keeps accepting a lower-priority master until `preempt_delay` has
//!   passed since start-up (or since it first saw that lower-priority master);
//! - a master that hears a lower-priority advert answers at once with its own ("forcing a new
//!   election"), so the other side goes back to backup without waiting an interval, and
//!   announces its addresses again (`garp_lower_prio_repeat` gratuitous ARPs / unsolicited NAs,
//!   again after `garp_lower_prio_delay`), for every member of its sync group: the other side
//!   was master too (a split view healing), and the upstream router may hold its MAC;
//! - FAULT: a tracked interface or script with weight 0 failing; a master entering it sends a
//!   priority-0 advert so the backup takes over after Skew_Time;
//! - sync groups: a member going to BACKUP or FAULT takes the others with it; a member goes to
//!   MASTER only when every other member wants to as well ("prefer backup to avoid
//!   thrashing"), and then takes them all.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::packet::{self, Advert, ChecksumKind, Version};
use crate::duration::format_duration;

/// First ARP/NDP conflict probe this long after becoming master (the old master has given the
/// addresses up by then), then every [`PROBE_INTERVAL`].
pub const PROBE_DELAY: Duration = Duration::from_secs(1);
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// A master re-announces its addresses on hearing a lower-priority master at most this often
/// (a peer that cannot hear us advertises every interval, down to 10 ms with VRRPv3, and every
/// member of a sync group may hear one).
pub const LOWER_PRIO_GARP_GAP: Duration = Duration::from_secs(1);
/// Dropped adverts are logged once per (sender, reason), for at most this many pairs per
/// instance (a flood from forged senders must not fill the log); later ones are only counted.
pub const MAX_LOGGED_DROPS: usize = 32;

/// State of a VRRP instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum VrrpState {
    /// Not running (before start, after stop).
    Init,
    Backup,
    Master,
    /// A tracked interface or script with weight 0 is failing: neither advertising nor
    /// listening, and never owning the addresses.
    Fault,
}

impl VrrpState {
    pub fn as_str(self) -> &'static str {
        match self {
            VrrpState::Init => "INIT",
            VrrpState::Backup => "BACKUP",
            VrrpState::Master => "MASTER",
            VrrpState::Fault => "FAULT",
        }
    }
}

impl std::fmt::Display for VrrpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// What the engine needs to know of an instance (validated, addresses resolved).
#[derive(Clone, Debug)]
pub struct InstanceParams {
    pub name: String,
    pub vrid: u8,
    pub version: Version,
    /// Configured priority, 1..=255.
    pub priority: u8,
    pub advert_interval: Duration,
    pub preempt: bool,
    pub preempt_delay: Duration,
    pub addresses: Vec<IpAddr>,
    /// Our address: source of our adverts, compared in equal-priority elections.
    pub source: IpAddr,
    /// Empty: multicast.
    pub unicast_peers: Vec<IpAddr>,
    /// v2 PASS data (zero-padded), or none.
    pub auth: Option<[u8; 8]>,
    pub garp_delay: Duration,
    pub garp_repeat: u32,
    /// Zero: no refresh.
    pub garp_refresh: Duration,
    pub garp_refresh_repeat: u32,
    /// Gratuitous ARPs on hearing a lower-priority master; 0 = none.
    pub garp_lower_prio_repeat: u32,
    /// Delay of the second such burst; zero = none.
    pub garp_lower_prio_delay: Duration,
    /// Tracked objects with their state at start.
    pub trackers: Vec<Tracker>,
}

/// A tracked interface or script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracker {
    /// e.g. "interface eth1", "script chk_nginx".
    pub what: String,
    /// 0: failing means FAULT; > 0 added while ok; < 0 added while failing.
    pub weight: i32,
    pub ok: bool,
}

/// Why a received advert was dropped (counted per instance, shown by `lbd status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Multicast advert whose TTL/hop limit is not 255 (it crossed a router).
    Ttl,
    /// Another VRRP version than the instance's.
    Version,
    /// No instance with this VRID on the interface.
    Vrid,
    Checksum,
    /// v2 authentication type or password differ.
    Auth,
    /// The advert's address list differs from ours (and it is not from the address owner).
    AddressList,
    /// v2 advert interval differs from ours (RFC 3768 5.3.7).
    Interval,
    /// Unicast mode: the sender is not among `unicast_peers`.
    UnknownPeer,
    /// Too short, wrong type, or inconsistent.
    Malformed,
    /// Sent from our own address.
    Own,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Ttl => "ttl",
            DropReason::Version => "version",
            DropReason::Vrid => "vrid",
            DropReason::Checksum => "checksum",
            DropReason::Auth => "auth",
            DropReason::AddressList => "address_list",
            DropReason::Interval => "interval",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::Malformed => "malformed",
            DropReason::Own => "own",
        }
    }
}

/// Per-instance counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub adverts_sent: u64,
    pub adverts_received: u64,
    pub priority_zero_sent: u64,
    pub priority_zero_received: u64,
    pub became_master: u64,
    /// Dropped adverts by reason (`DropReason::as_str`).
    pub dropped: BTreeMap<&'static str, u64>,
}

/// What the runtime must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send an advert of `instance` with `priority` (0 = leaving).
    Advert { instance: usize, priority: u8 },
    /// Send `repeat` gratuitous ARPs / unsolicited NAs for every address of `instance`.
    Garp { instance: usize, repeat: u32 },
    /// Ask (ARP probe / DAD solicitation) whether another host answers for the addresses.
    Probe { instance: usize },
    /// `instance` changed state: take or give up the addresses, notify.
    State { instance: usize, from: VrrpState, to: VrrpState, priority: u8 },
    /// Every member of sync group `group` is now in `state`.
    Group { group: usize, state: VrrpState },
}

/// A received advert with what the IP layer told about it.
#[derive(Clone, Copy, Debug)]
pub struct Received<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// The IP payload.
    pub vrrp: &'a [u8],
}

struct Instance {
    p: InstanceParams,
    group: Option<usize>,
    state: VrrpState,
    /// Master_Adver_Interval (v3: learnt from the master's adverts).
    mai: Duration,
    adver_at: Option<Instant>,
    down_at: Option<Instant>,
    garp_at: Option<Instant>,
    refresh_at: Option<Instant>,
    probe_at: Option<Instant>,
    /// The second burst after hearing a lower-priority master.
    lower_garp_at: Option<Instant>,
    /// When the last first burst after hearing a lower-priority master went out.
    lower_garp_sent: Option<Instant>,
    preempt_until: Option<Instant>,
    /// Sync groups: this instance's own master-down timer expired (it would be master).
    want_master: bool,
    master: Option<IpAddr>,
    master_priority: Option<u8>,
    since: Option<Instant>,
    counters: Counters,
    drops_logged: DropLog,
    v3_plain_checksum_logged: bool,
    /// Was MASTER before a reload restarted VRRP: [`Engine::start`] makes it MASTER at once
    /// (see [`Engine::resume_master`]).
    resume: bool,
}

struct Group {
    name: String,
    members: Vec<usize>,
    state: VrrpState,
}

/// All instances and sync groups.
pub struct Engine {
    inst: Vec<Instance>,
    groups: Vec<Group>,
}

/// RFC 3768/5798 Skew_Time for `priority` and Master_Adver_Interval `mai`: v2 (256 − p)/256 s
/// (computed in µs), v3 ((256 − p) × mai)/256 in whole centiseconds (RFC 9568's unit).
pub fn skew_time(version: Version, priority: u8, mai: Duration) -> Duration {
    let weight = 256 - u64::from(priority);
    match version {
        Version::V2 => Duration::from_micros(weight * 1_000_000 / 256),
        Version::V3 => {
            let mai_cs = mai.as_millis() as u64 / 10;
            Duration::from_millis(weight * mai_cs / 256 * 10)
        }
    }
}

/// Master_Down_Interval = 3 × Master_Adver_Interval + Skew_Time.
pub fn master_down_interval(version: Version, priority: u8, mai: Duration) -> Duration {
    3 * mai + skew_time(version, priority, mai)
}

fn ip_key(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl Instance {
    fn effective_priority(&self) -> u8 {
        if self.p.priority == 255 {
            return 255; // the address owner is not adjusted (keepalived does the same)
        }
        let mut prio = i32::from(self.p.priority);
        for t in &self.p.trackers {
            if (t.weight > 0 && t.ok) || (t.weight < 0 && !t.ok) {
                prio += t.weight;
            }
        }
        prio.clamp(1, 254) as u8
    }

    fn faulted(&self) -> bool {
        self.p.trackers.iter().any(|t| t.weight == 0 && !t.ok)
    }

    fn skew(&self) -> Duration {
        skew_time(self.p.version, self.effective_priority(), self.mai)
    }

    fn down_interval(&self) -> Duration {
        master_down_interval(self.p.version, self.effective_priority(), self.mai)
    }

    fn clear_timers(&mut self) {
        self.adver_at = None;
        self.down_at = None;
        self.garp_at = None;
        self.refresh_at = None;
        self.probe_at = None;
        self.lower_garp_at = None;
        self.lower_garp_sent = None;
    }

    fn drop(&mut self, r: DropReason) -> DropReason {
        *self.counters.dropped.entry(r.as_str()).or_default() += 1;
        r
    }
}

/// The (sender, reason) pairs of an instance whose dropped adverts were logged.
#[derive(Default)]
struct DropLog {
    logged: HashSet<(IpAddr, DropReason)>,
    full: bool,
}

impl DropLog {
    /// Whether a dropped advert of `reason` from `peer` is to be logged: the first of each pair,
    /// for [`MAX_LOGGED_DROPS`] pairs; the first one past those logs that the rest are only
    /// counted.
    fn first(&mut self, instance: &str, peer: IpAddr, reason: DropReason) -> bool {
        if self.logged.contains(&(peer, reason)) {
            return false;
        }
        if self.logged.len() >= MAX_LOGGED_DROPS {
            if !self.full {
                self.full = true;
                warn!(instance, "dropped VRRP adverts of {MAX_LOGGED_DROPS} kinds logged: further kinds are only counted (lbd status)");
            }
            return false;
        }
        self.logged.insert((peer, reason))
    }
}

impl Engine {
    /// `groups`: (name, member indices into `instances`).
    pub fn new(instances: Vec<InstanceParams>, groups: Vec<(String, Vec<usize>)>) -> Engine {
        let mut inst: Vec<Instance> = instances
            .into_iter()
            .map(|p| Instance {
                mai: p.advert_interval,
                p,
                group: None,
                state: VrrpState::Init,
                adver_at: None,
                down_at: None,
                garp_at: None,
                refresh_at: None,
                probe_at: None,
                lower_garp_at: None,
                lower_garp_sent: None,
                preempt_until: None,
                want_master: false,
                master: None,
                master_priority: None,
                since: None,
                counters: Counters::default(),
                drops_logged: DropLog::default(),
                v3_plain_checksum_logged: false,
                resume: false,
            })
            .collect();
        let groups = groups
            .into_iter()
            .enumerate()
            .map(|(g, (name, members))| {
                for &m in &members {
                    inst[m].group = Some(g);
                }
                Group { name, members, state: VrrpState::Init }
            })
            .collect();
        Engine { inst, groups }
    }

    pub fn len(&self) -> usize {
        self.inst.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inst.is_empty()
    }

    pub fn params(&self, i: usize) -> &InstanceParams {
        &self.inst[i].p
    }

    pub fn state(&self, i: usize) -> VrrpState {
        self.inst[i].state
    }

    pub fn effective_priority(&self, i: usize) -> u8 {
        self.inst[i].effective_priority()
    }

    /// The master's address as last seen: ours while master, `None` when unknown (or after the
    /// master left with priority 0).
    pub fn master(&self, i: usize) -> Option<IpAddr> {
        self.inst[i].master
    }

    pub fn master_priority(&self, i: usize) -> Option<u8> {
        self.inst[i].master_priority
    }

    /// Master_Adver_Interval in use.
    pub fn master_advert_interval(&self, i: usize) -> Duration {
        self.inst[i].mai
    }

    pub fn counters(&self, i: usize) -> &Counters {
        &self.inst[i].counters
    }

    /// When the instance last changed state.
    pub fn since(&self, i: usize) -> Option<Instant> {
        self.inst[i].since
    }

    pub fn group_of(&self, i: usize) -> Option<&str> {
        self.inst[i].group.map(|g| self.groups[g].name.as_str())
    }

    pub fn group_name(&self, g: usize) -> &str {
        &self.groups[g].name
    }

    pub fn group_state(&self, g: usize) -> VrrpState {
        self.groups[g].state
    }

    /// The failing tracked objects of instance `i` ("interface eth1", "script chk", ...).
    pub fn failing(&self, i: usize) -> Vec<String> {
        self.inst[i].p.trackers.iter().filter(|t| !t.ok).map(|t| t.what.clone()).collect()
    }

    /// Counts a drop that happened before an instance could be chosen (e.g. unknown VRID).
    pub fn count_drop(&mut self, i: usize, r: DropReason) {
        self.inst[i].drop(r);
    }

    /// The earliest pending timer.
    pub fn next_timer(&self) -> Option<Instant> {
        self.inst.iter().flat_map(|i| [i.adver_at, i.down_at, i.garp_at, i.refresh_at, i.probe_at, i.lower_garp_at]).flatten().min()
    }

    /// Instance `i` was MASTER of the same virtual router before a reload restarted VRRP:
    /// [`Self::start`] makes it MASTER at once, as keepalived keeps an instance's state across a
    /// reload. Starting as BACKUP instead would wait a Master_Down_Interval with nobody sending
    /// adverts; the backup would take over and (with preempt) give the VIPs back later. If the
    /// new config made it lower than a peer, the peer's adverts make it BACKUP as usual.
    pub fn resume_master(&mut self, i: usize) {
        self.inst[i].resume = true;
    }

    /// Leaves INIT: FAULT if a weight-0 tracker fails (for the whole sync group), MASTER for the
    /// address owner and for an instance resumed as MASTER ([`Self::resume_master`]), BACKUP
    /// otherwise.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for i in 0..self.inst.len() {
            if self.inst[i].state != VrrpState::Init {
                continue;
            }
            let group_faulted = self.group_members(i).any(|m| self.inst[m].faulted());
            let resumed = std::mem::take(&mut self.inst[i].resume);
            if group_faulted {
                self.become_fault(now, i, &mut out);
            } else if self.inst[i].effective_priority() == 255 || resumed {
                self.become_master(now, i, &mut out);
                if resumed {
                    // It was MASTER before the reload: not a failover, which the counter counts
                    // (and alerts are made of).
                    self.inst[i].counters.became_master -= 1;
                }
                self.group_follow_master(now, i, &mut out);
            } else {
                self.become_backup(now, i, None, &mut out);
            }
        }
        self.group_states(&mut out);
        out
    }

    /// Stops every instance: a master sends a priority-0 advert (its backup takes over after
    /// Skew_Time); every instance ends in INIT.
    pub fn stop(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for i in 0..self.inst.len() {
            let from = self.inst[i].state;
            if from == VrrpState::Init {
                continue;
            }
            let inst = &mut self.inst[i];
            let priority = inst.effective_priority();
            inst.clear_timers();
            inst.state = VrrpState::Init;
            inst.since = Some(now);
            inst.master = None;
            out.push(Action::State { instance: i, from, to: VrrpState::Init, priority });
            if from == VrrpState::Master {
                self.send(i, 0, &mut out);
            }
        }
        self.group_states(&mut out);
        out
    }

    /// Fires every timer due at `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        for i in 0..self.inst.len() {
            match self.inst[i].state {
                VrrpState::Master => {
                    if due(self.inst[i].adver_at) {
                        let prio = self.inst[i].effective_priority();
                        self.send(i, prio, &mut out);
                        self.inst[i].adver_at = Some(now + self.inst[i].p.advert_interval);
                    }
                    if due(self.inst[i].garp_at) {
                        self.inst[i].garp_at = None;
                        out.push(Action::Garp { instance: i, repeat: self.inst[i].p.garp_repeat });
                    }
                    if due(self.inst[i].lower_garp_at) {
                        self.inst[i].lower_garp_at = None;
                        out.push(Action::Garp { instance: i, repeat: self.inst[i].p.garp_lower_prio_repeat });
                    }
                    if due(self.inst[i].refresh_at) {
                        let inst = &mut self.inst[i];
                        inst.refresh_at = Some(now + inst.p.garp_refresh);
                        out.push(Action::Garp { instance: i, repeat: inst.p.garp_refresh_repeat });
                    }
                    if due(self.inst[i].probe_at) {
                        self.inst[i].probe_at = Some(now + PROBE_INTERVAL);
                        out.push(Action::Probe { instance: i });
                    }
                }
                VrrpState::Backup if due(self.inst[i].down_at) => {
                    self.inst[i].want_master = true;
                    if self.group_can_go_master(i) {
                        let inst = &self.inst[i];
                        match inst.master {
                            Some(m) => info!(instance = %inst.p.name, master = %m, "no advert from the master within the master-down interval"),
                            None => info!(instance = %inst.p.name, "no master heard within the master-down interval (or Skew_Time after a priority-0 advert)"),
                        }
                        self.become_master(now, i, &mut out);
                        self.group_follow_master(now, i, &mut out);
                    } else {
                        // Held in backup until the whole sync group wants to be master.
                        let inst = &mut self.inst[i];
                        inst.down_at = Some(now + inst.down_interval());
                    }
                }
                _ => {}
            }
        }
        self.group_states(&mut out);
        out
    }

    /// Checks a received advert for instance `i` (which has its VRID on the interface it came
    /// from) and counts a drop. The first drop of each reason from each sender is logged
    /// (RFC 3768/5798: the receiver SHOULD log; a peer dropped this way may well be a second
    /// master), as is an address owner whose address list differs from ours.
    pub fn check(&mut self, i: usize, rx: &Received) -> Result<Advert, DropReason> {
        let inst = &mut self.inst[i];
        let p = &inst.p;
        // Counts the drop, logs the first of its kind from this sender, returns it.
        macro_rules! reject {
            ($reason:expr, $($why:tt)+) => {{
                let r: DropReason = $reason;
                *inst.counters.dropped.entry(r.as_str()).or_default() += 1;
                if inst.drops_logged.first(&p.name, rx.src, r) {
                    warn!(
                        instance = %p.name,
                        peer = %rx.src,
                        reason = r.as_str(),
                        "VRRP advert from {} dropped: {} (logged once per sender and reason; lbd status counts them)",
                        rx.src,
                        format_args!($($why)+)
                    );
                }
                return Err(r);
            }};
        }
        if rx.src == p.source {
            return Err(inst.drop(DropReason::Own));
        }
        let multicast = p.unicast_peers.is_empty();
        if multicast && rx.ttl != 255 {
            reject!(DropReason::Ttl, "TTL/hop limit {}, multicast adverts need 255", rx.ttl);
        }
        if rx.vrrp.is_empty() {
            reject!(DropReason::Malformed, "empty");
        }
        if rx.vrrp[0] >> 4 != p.version.number() {
            reject!(DropReason::Version, "VRRP version {}, ours is {}", rx.vrrp[0] >> 4, p.version.number());
        }
        let Some(len) = packet::message_len(rx.vrrp, rx.src.is_ipv6()) else {
            reject!(DropReason::Malformed, "truncated ({} bytes)", rx.vrrp.len());
        };
        let msg = &rx.vrrp[..len];
        match packet::verify_checksum(msg, rx.src, rx.dst) {
            None => reject!(DropReason::Checksum, "bad checksum"),
            Some(ChecksumKind::V3WithoutPseudoHeader) if !inst.v3_plain_checksum_logged => {
                inst.v3_plain_checksum_logged = true;
                info!(instance = %p.name, peer = %rx.src, "peer computes VRRPv3 checksums without the pseudo-header; accepting them");
            }
            Some(_) => {}
        }
        let adv = match Advert::decode(msg, rx.src.is_ipv6()) {
            Ok(a) => a,
            Err(e) => reject!(DropReason::Malformed, "{e:?}"),
        };
        if adv.version == Version::V2 {
            let (want_type, want_data) = match p.auth {
                Some(d) => (packet::AUTH_PASS, d),
                None => (packet::AUTH_NONE, [0; 8]),
            };
            let auth_name = |t: u8| match t {
                packet::AUTH_NONE => "none".to_string(),
                packet::AUTH_PASS => "PASS".to_string(),
                t => format!("type {t}"),
            };
            // Without authentication the data is not looked at (RFC 3768 5.3.6.1).
            if adv.auth_type != want_type {
                reject!(DropReason::Auth, "authentication {}, ours is {}", auth_name(adv.auth_type), auth_name(want_type));
            }
            if want_type == packet::AUTH_PASS && adv.auth_data != want_data {
                reject!(DropReason::Auth, "invalid password (auth_pass)");
            }
            if adv.interval() != p.advert_interval {
                reject!(
                    DropReason::Interval,
                    "advert interval {}, ours is {}: VRRPv2 routers must agree",
                    format_duration(adv.interval()),
                    format_duration(p.advert_interval)
                );
            }
        }
        if !multicast && !p.unicast_peers.contains(&rx.src) {
            reject!(DropReason::UnknownPeer, "not one of unicast_peers {:?}", p.unicast_peers);
        }
        let ours: HashSet<&IpAddr> = p.addresses.iter().collect();
        let theirs: HashSet<&IpAddr> = adv.addresses.iter().collect();
        if ours != theirs {
            if adv.priority != 255 {
                reject!(DropReason::AddressList, "address list {:?}, ours is {:?}", adv.addresses, p.addresses);
            }
            // The address owner's advert is processed all the same (RFC 3768/5798 7.1; keepalived
            // drops it, which would make us a second master for the addresses both list).
            if inst.drops_logged.first(&p.name, rx.src, DropReason::AddressList) {
                let unanswered: Vec<&IpAddr> = p.addresses.iter().filter(|a| !theirs.contains(a)).collect();
                let consequence =
                    if unanswered.is_empty() { String::new() } else { format!("; while it is master nobody answers for {unanswered:?}") };
                warn!(
                    instance = %p.name,
                    peer = %rx.src,
                    "VRRP advert from {} (the address owner, priority 255) with address list {:?}, ours is {:?}: accepted, as the \
                     RFCs want{consequence} (logged once)",
                    rx.src,
                    adv.addresses,
                    p.addresses
                );
            }
        }
        Ok(adv)
    }

    /// Processes a checked advert from `src` for instance `i`.
    pub fn receive(&mut self, now: Instant, i: usize, src: IpAddr, adv: &Advert) -> Vec<Action> {
        let mut out = Vec::new();
        let inst = &mut self.inst[i];
        inst.counters.adverts_received += 1;
        if adv.priority == 0 {
            inst.counters.priority_zero_received += 1;
        }
        let eff = inst.effective_priority();
        match inst.state {
            VrrpState::Init | VrrpState::Fault => {}
            VrrpState::Backup => {
                if adv.priority == 0 {
                    // The master is leaving: take over after Skew_Time only.
                    info!(instance = %inst.p.name, peer = %src, skew = ?inst.skew(), "the master is stopping (priority-0 advert): taking over after Skew_Time unless another master speaks");
                    inst.down_at = Some(now + inst.skew());
                    inst.master = None;
                    inst.master_priority = None;
                } else {
                    let lower = adv.priority < eff;
                    let delaying = !inst.p.preempt_delay.is_zero() && inst.preempt_until.is_none_or(|t| now < t);
                    if !inst.p.preempt || !lower || delaying {
                        if inst.p.version == Version::V3 {
                            inst.mai = adv.interval();
                        }
                        inst.down_at = Some(now + inst.down_interval());
                        inst.want_master = false;
                        if !inst.p.preempt_delay.is_zero() {
                            if !lower {
                                inst.preempt_until = None;
                            } else if inst.preempt_until.is_none() {
                                inst.preempt_until = Some(now + inst.p.preempt_delay);
                            }
                        }
                    }
                    // else: a lower-priority master we preempt: the timer runs out.
                    inst.master = Some(src);
                    inst.master_priority = Some(adv.priority);
                }
            }
            VrrpState::Master => {
                let higher = adv.priority > eff || (adv.priority == eff && ip_key(src) > ip_key(inst.p.source));
                if adv.priority != 0 && higher {
                    info!(instance = %inst.p.name, peer = %src, priority = adv.priority, ours = eff, "advert from a higher-priority master");
                    if inst.p.version == Version::V3 {
                        inst.mai = adv.interval();
                    }
                    self.become_backup(now, i, Some((src, adv.priority)), &mut out);
                    self.group_follow_backup(now, i, &mut out);
                } else {
                    // Priority 0 (the other one left) or a lower priority (it thinks it is
                    // master): advertise at once so it settles as backup.
                    self.send(i, eff, &mut out);
                    let inst = &mut self.inst[i];
                    inst.adver_at = Some(now + inst.p.advert_interval);
                    if adv.priority != 0 {
                        self.lower_priority_master(now, i, src, adv.priority, &mut out);
                    }
                }
            }
        }
        self.group_states(&mut out);
        out
    }

    /// Tracked object `tracker` of instance `i` is now `ok` (or not).
    pub fn track(&mut self, now: Instant, i: usize, tracker: usize, ok: bool) -> Vec<Action> {
        let mut out = Vec::new();
        let inst = &mut self.inst[i];
        let t = &mut inst.p.trackers[tracker];
        if t.ok == ok {
            return out;
        }
        t.ok = ok;
        info!(instance = %inst.p.name, tracked = %inst.p.trackers[tracker].what, ok, weight = inst.p.trackers[tracker].weight, "tracked object changed");
        if self.inst[i].faulted() {
            if self.inst[i].state != VrrpState::Fault && self.inst[i].state != VrrpState::Init {
                for m in self.group_members(i).collect::<Vec<_>>() {
                    self.become_fault(now, m, &mut out);
                }
            }
        } else if self.inst[i].state == VrrpState::Fault && !self.group_members(i).any(|m| self.inst[m].faulted()) {
            // Every member is fine again: leave FAULT together, as from INIT.
            for m in self.group_members(i).collect::<Vec<_>>() {
                if self.inst[m].state == VrrpState::Fault {
                    if self.inst[m].effective_priority() == 255 {
                        self.become_master(now, m, &mut out);
                    } else {
                        self.become_backup(now, m, None, &mut out);
                    }
                }
            }
        }
        self.group_states(&mut out);
        out
    }

    /// `i` and the other members of its sync group.
    fn group_members(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let members: Vec<usize> = match self.inst[i].group {
            Some(g) => self.groups[g].members.clone(),
            None => vec![i],
        };
        members.into_iter()
    }

    fn group_can_go_master(&self, i: usize) -> bool {
        self.group_members(i)
            .filter(|&m| m != i)
            .all(|m| self.inst[m].state == VrrpState::Master || (self.inst[m].state == VrrpState::Backup && self.inst[m].want_master))
    }

    fn group_follow_master(&mut self, now: Instant, i: usize, out: &mut Vec<Action>) {
        for m in self.group_members(i).collect::<Vec<_>>() {
            if m != i && self.inst[m].state == VrrpState::Backup {
                self.become_master(now, m, out);
            }
        }
    }

    fn group_follow_backup(&mut self, now: Instant, i: usize, out: &mut Vec<Action>) {
        for m in self.group_members(i).collect::<Vec<_>>() {
            if m != i && self.inst[m].state == VrrpState::Master {
                self.become_backup(now, m, None, out);
            }
        }
    }

    /// Emits `Group` actions for groups whose members now all share a new state.
    fn group_states(&mut self, out: &mut Vec<Action>) {
        for g in 0..self.groups.len() {
            let first = self.inst[self.groups[g].members[0]].state;
            if self.groups[g].members.iter().all(|&m| self.inst[m].state == first) && self.groups[g].state != first {
                self.groups[g].state = first;
                out.push(Action::Group { group: g, state: first });
            }
        }
    }

    /// Master `i` heard `src` advertise as master with a lower priority: both were master (a
    /// split view healing), and the upstream router may have learnt the other one's MAC for the
    /// addresses last, so announce them again, for the whole sync group (keepalived: "We receive
    /// a lower prio adv we just refresh remote ARP cache"). At most once per
    /// [`LOWER_PRIO_GARP_GAP`] per instance; one second burst pending at a time.
    fn lower_priority_master(&mut self, now: Instant, i: usize, src: IpAddr, priority: u8, out: &mut Vec<Action>) {
        let mut announced = Vec::new();
        for m in self.group_members(i).collect::<Vec<_>>() {
            let inst = &mut self.inst[m];
            if inst.state != VrrpState::Master || inst.p.garp_lower_prio_repeat == 0 {
                continue;
            }
            if inst.lower_garp_sent.is_some_and(|t| now < t + LOWER_PRIO_GARP_GAP) {
                continue;
            }
            inst.lower_garp_sent = Some(now);
            if !inst.p.garp_lower_prio_delay.is_zero() && inst.lower_garp_at.is_none() {
                inst.lower_garp_at = Some(now + inst.p.garp_lower_prio_delay);
            }
            out.push(Action::Garp { instance: m, repeat: inst.p.garp_lower_prio_repeat });
            announced.push(m);
        }
        if !announced.is_empty() {
            let inst = &self.inst[i];
            let announced: Vec<&str> = announced.iter().map(|&m| self.inst[m].p.name.as_str()).collect();
            info!(
                instance = %inst.p.name,
                peer = %src,
                priority,
                ours = inst.effective_priority(),
                announced = ?announced,
                "advert from a lower-priority master (both were master): answering with ours and announcing the addresses again"
            );
        }
    }

    fn send(&mut self, i: usize, priority: u8, out: &mut Vec<Action>) {
        let c = &mut self.inst[i].counters;
        c.adverts_sent += 1;
        if priority == 0 {
            c.priority_zero_sent += 1;
        }
        out.push(Action::Advert { instance: i, priority });
    }

    fn transition(&mut self, now: Instant, i: usize, to: VrrpState, out: &mut Vec<Action>) {
        let inst = &mut self.inst[i];
        let from = inst.state;
        inst.state = to;
        inst.since = Some(now);
        let priority = inst.effective_priority();
        info!(instance = %inst.p.name, from = %from, to = %to, priority, "VRRP state change");
        out.push(Action::State { instance: i, from, to, priority });
    }

    fn become_master(&mut self, now: Instant, i: usize, out: &mut Vec<Action>) {
        self.transition(now, i, VrrpState::Master, out);
        let inst = &mut self.inst[i];
        inst.clear_timers();
        inst.want_master = true;
        inst.preempt_until = None;
        inst.master = Some(inst.p.source);
        inst.master_priority = Some(inst.effective_priority());
        inst.counters.became_master += 1;
        inst.adver_at = Some(now + inst.p.advert_interval);
        if !inst.p.garp_delay.is_zero() {
            inst.garp_at = Some(now + inst.p.garp_delay);
        }
        if !inst.p.garp_refresh.is_zero() {
            inst.refresh_at = Some(now + inst.p.garp_refresh);
        }
        inst.probe_at = Some(now + PROBE_DELAY);
        let prio = inst.effective_priority();
        let repeat = inst.p.garp_repeat;
        self.send(i, prio, out);
        out.push(Action::Garp { instance: i, repeat });
    }

    /// `seen`: the master that made us backup, if any.
    fn become_backup(&mut self, now: Instant, i: usize, seen: Option<(IpAddr, u8)>, out: &mut Vec<Action>) {
        let from = self.inst[i].state;
        self.transition(now, i, VrrpState::Backup, out);
        let inst = &mut self.inst[i];
        inst.clear_timers();
        inst.want_master = false;
        if from != VrrpState::Master || inst.p.version == Version::V2 || seen.is_none() {
            // From INIT/FAULT (or forced by the group): our own interval until a master is heard.
            inst.mai = inst.p.advert_interval;
        }
        inst.down_at = Some(now + inst.down_interval());
        inst.master = seen.map(|s| s.0);
        inst.master_priority = seen.map(|s| s.1);
        // keepalived: the preempt delay runs from start-up (and from leaving FAULT).
        inst.preempt_until = match from {
            VrrpState::Init | VrrpState::Fault if !inst.p.preempt_delay.is_zero() => Some(now + inst.p.preempt_delay),
            _ => None,
        };
    }

    fn become_fault(&mut self, now: Instant, i: usize, out: &mut Vec<Action>) {
        let from = self.inst[i].state;
        if from == VrrpState::Fault {
            return;
        }
        self.transition(now, i, VrrpState::Fault, out);
        let inst = &mut self.inst[i];
        inst.clear_timers();
        inst.want_master = false;
        inst.master = None;
        inst.master_priority = None;
        if from == VrrpState::Master {
            self.send(i, 0, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn params(name: &str, version: Version, priority: u8, interval: Duration, source: &str) -> InstanceParams {
        InstanceParams {
            name: name.into(),
            vrid: 51,
            version,
            priority,
            advert_interval: interval,
            preempt: true,
            preempt_delay: Duration::ZERO,
            addresses: vec!["10.0.0.100".parse().unwrap()],
            source: source.parse().unwrap(),
            unicast_peers: vec![],
            auth: None,
            garp_delay: Duration::from_secs(5),
            garp_repeat: 5,
            garp_refresh: Duration::ZERO,
            garp_refresh_repeat: 1,
            garp_lower_prio_repeat: 5,
            garp_lower_prio_delay: Duration::from_secs(5),
            trackers: vec![],
        }
    }

    fn advert(version: Version, priority: u8, interval: Duration) -> Advert {
        Advert {
            version,
            vrid: 51,
            priority,
            interval_cs: (interval.as_millis() / 10) as u16,
            addresses: vec!["10.0.0.100".parse().unwrap()],
            auth_type: 0,
            auth_data: [0; 8],
        }
    }

    fn peer() -> IpAddr {
        "10.0.0.3".parse().unwrap()
    }

    /// A fake clock: the engine only ever sees the instants we give it.
    struct Clock(Instant, Duration);
    impl Clock {
        fn new() -> Clock {
            Clock(Instant::now(), Duration::ZERO)
        }
        fn at(&self, d: Duration) -> Instant {
            self.0 + d
        }
        fn now(&self) -> Instant {
            self.0 + self.1
        }
    }

    fn states(actions: &[Action]) -> Vec<(usize, VrrpState)> {
        actions.iter().filter_map(|a| if let Action::State { instance, to, .. } = a { Some((*instance, *to)) } else { None }).collect()
    }

    /// Ticks in `step`s until an action matching `pred` appears; returns the time.
    fn run_until(e: &mut Engine, c: &mut Clock, step: Duration, limit: Duration, pred: impl Fn(&Action) -> bool) -> Duration {
        while c.1 <= limit {
            c.1 += step;
            if e.tick(c.now()).iter().any(&pred) {
                return c.1;
            }
        }
        panic!("nothing matched within {limit:?}");
    }

    #[test]
    fn timer_arithmetic() {
        // v2: Skew = (256 - p)/256 s.
        assert_eq!(skew_time(Version::V2, 100, Duration::from_secs(1)), Duration::from_micros(609_375));
        assert_eq!(master_down_interval(Version::V2, 100, Duration::from_secs(1)), Duration::from_micros(3_609_375));
        assert_eq!(skew_time(Version::V2, 255, Duration::from_secs(1)), Duration::from_micros(3_906));
        assert_eq!(skew_time(Version::V2, 1, Duration::from_secs(1)), Duration::from_micros(996_093));
        // v3: Skew = ((256 - p) * MAI)/256 in centiseconds, MAI in centiseconds.
        assert_eq!(skew_time(Version::V3, 100, Duration::from_secs(1)), ms(600)); // 156*100/256 = 60.9 cs
        assert_eq!(skew_time(Version::V3, 100, ms(100)), ms(60)); // 156*10/256 = 6.09 cs
        assert_eq!(master_down_interval(Version::V3, 100, ms(100)), ms(360));
        assert_eq!(master_down_interval(Version::V3, 150, ms(100)), ms(340)); // 106*10/256 = 4.1 cs
        assert_eq!(master_down_interval(Version::V3, 254, ms(10)), ms(30)); // skew rounds to 0
                                                                            // Higher priority always times out first.
        for p in 1..254u8 {
            assert!(
                master_down_interval(Version::V2, p + 1, Duration::from_secs(1))
                    < master_down_interval(Version::V2, p, Duration::from_secs(1))
            );
        }
    }

    #[test]
    fn backup_takes_over_after_master_down_interval_and_advertises() {
        let mut c = Clock::new();
        let mut e = Engine::new(vec![params("VI", Version::V3, 100, ms(100), "10.0.0.2")], vec![]);
        assert_eq!(states(&e.start(c.now())), vec![(0, VrrpState::Backup)]);
        assert_eq!(e.next_timer(), Some(c.at(ms(360))));
        assert!(e.tick(c.at(ms(359))).is_empty());
        let a = e.tick(c.at(ms(360)));
        assert_eq!(
            a,
            vec![
                Action::State { instance: 0, from: VrrpState::Backup, to: VrrpState::Master, priority: 100 },
                Action::Advert { instance: 0, priority: 100 },
                Action::Garp { instance: 0, repeat: 5 },
            ]
        );
        c.1 = ms(360);
        // Adverts every interval, the second GARP burst after garp_master_delay, a probe after 1 s.
        assert_eq!(e.tick(c.at(ms(460))), vec![Action::Advert { instance: 0, priority: 100 }]);
        let mut garps = 0;
        let mut probes = 0;
        for t in (560..=5360).step_by(100) {
            for a in e.tick(c.at(ms(t))) {
                match a {
                    Action::Garp { repeat: 5, .. } => {
                        assert_eq!(t, 5360);
                        garps += 1
                    }
                    Action::Probe { .. } => {
                        assert_eq!(t, 1360);
                        probes += 1
                    }
                    _ => {}
                }
            }
        }
        assert_eq!((garps, probes), (1, 1));
        assert_eq!(e.counters(0).became_master, 1);
    }

    #[test]
    fn adverts_keep_a_backup_and_v3_learns_the_masters_interval() {
        let c = Clock::new();
        let mut e = Engine::new(vec![params("VI", Version::V3, 100, ms(100), "10.0.0.2")], vec![]);
        e.start(c.now());
        // The master advertises every 200 ms: Master_Down = 3*200 + 156*20/256 cs (12 cs).
        for t in (100..2000).step_by(200) {
            assert!(e.tick(c.at(ms(t))).is_empty());
            assert!(e.receive(c.at(ms(t)), 0, peer(), &advert(Version::V3, 200, ms(200))).is_empty());
        }
        assert_eq!(e.master_advert_interval(0), ms(200));
        assert_eq!(e.next_timer(), Some(c.at(ms(1900 + 720))));
        assert_eq!((e.state(0), e.master(0), e.master_priority(0)), (VrrpState::Backup, Some(peer()), Some(200)));
    }

    #[test]
    fn priority_zero_means_takeover_after_skew_time() {
        let c = Clock::new();
        let mut e = Engine::new(vec![params("VI", Version::V2, 100, Duration::from_secs(1), "10.0.0.2")], vec![]);
        e.start(c.now());
        e.receive(c.at(ms(500)), 0, peer(), &advert(Version::V2, 200, Duration::from_secs(1)));
        e.receive(c.at(ms(900)), 0, peer(), &advert(Version::V2, 0, Duration::from_secs(1)));
        assert_eq!(e.next_timer(), Some(c.at(ms(900)) + Duration::from_micros(609_375)));
        assert_eq!(states(&e.tick(c.at(ms(900)) + Duration::from_micros(609_375))), vec![(0, VrrpState::Master)]);
        assert_eq!(e.counters(0).priority_zero_received, 1);
    }

    #[test]
    fn master_yields_to_higher_priority_and_equal_priority_higher_address() {
        let c = Clock::new();
        let p = params("VI", Version::V3, 100, ms(100), "10.0.0.2");
        let mut e = Engine::new(vec![p.with_priority(255)], vec![]);
        assert_eq!(states(&e.start(c.now())), vec![(0, VrrpState::Master)], "the owner is master at once");

        let mut e = Engine::new(vec![p.clone()], vec![]);
        e.start(c.now());
        e.tick(c.at(ms(360)));
        assert_eq!(e.state(0), VrrpState::Master);
        // Lower priority, or equal priority from a lower address: answer with our advert, and
        // announce the addresses again (see master_hearing_a_lower_priority_master_...).
        assert_eq!(
            e.receive(c.at(ms(400)), 0, peer(), &advert(Version::V3, 90, ms(100))),
            vec![Action::Advert { instance: 0, priority: 100 }, Action::Garp { instance: 0, repeat: 5 }]
        );
        let lower_addr: IpAddr = "10.0.0.1".parse().unwrap();
        let mut e2 = Engine::new(vec![p.clone()], vec![]);
        e2.start(c.now());
        e2.tick(c.at(ms(360)));
        assert_eq!(
            e2.receive(c.at(ms(410)), 0, lower_addr, &advert(Version::V3, 100, ms(100))),
            vec![Action::Advert { instance: 0, priority: 100 }, Action::Garp { instance: 0, repeat: 5 }]
        );
        assert_eq!(e2.state(0), VrrpState::Master);
        assert_eq!(e.state(0), VrrpState::Master);
        // Equal priority from a higher address wins.
        let a = e.receive(c.at(ms(420)), 0, peer(), &advert(Version::V3, 100, ms(100)));
        assert_eq!(states(&a), vec![(0, VrrpState::Backup)]);
        assert_eq!(e.master(0), Some(peer()));
        // Higher priority always wins.
        let mut e = Engine::new(vec![p], vec![]);
        e.start(c.now());
        e.tick(c.at(ms(360)));
        assert_eq!(states(&e.receive(c.at(ms(400)), 0, lower_addr, &advert(Version::V3, 101, ms(100)))), vec![(0, VrrpState::Backup)]);
        // And a backup with equal priority accepts the master whatever the addresses.
        e.receive(c.at(ms(450)), 0, lower_addr, &advert(Version::V3, 100, ms(100)));
        assert_eq!(e.next_timer(), Some(c.at(ms(450 + 360))));
    }

    /// An instance that was MASTER before a reload starts as MASTER at once, advertising and
    /// announcing its addresses; a higher-priority peer's advert still makes it BACKUP.
    #[test]
    fn an_instance_resumed_as_master_is_master_at_once() {
        let c = Clock::new();
        let p = params("VI", Version::V3, 100, ms(100), "10.0.0.2");
        let mut e = Engine::new(vec![p.clone(), p.clone()], vec![]);
        e.resume_master(1);
        let a = e.start(c.now());
        assert_eq!(states(&a), vec![(0, VrrpState::Backup), (1, VrrpState::Master)]);
        assert!(a.contains(&Action::Advert { instance: 1, priority: 100 }), "{a:?}");
        assert_eq!(garps(&a), vec![(1, 5)]);
        assert_eq!(e.counters(1).became_master, 0, "resuming is not becoming MASTER");
        let a = e.receive(c.at(ms(50)), 1, peer(), &advert(Version::V3, 101, ms(100)));
        assert_eq!(states(&a), vec![(1, VrrpState::Backup)]);
        // The peer goes silent: MASTER again, and that one counts.
        let a: Vec<Action> = (1..=10).flat_map(|t| e.tick(c.at(ms(50 + 100 * t)))).collect();
        assert!(states(&a).contains(&(1, VrrpState::Master)), "{a:?}");
        assert_eq!(e.counters(1).became_master, 1);
    }

    fn garps(actions: &[Action]) -> Vec<(usize, u32)> {
        actions.iter().filter_map(|a| if let Action::Garp { instance, repeat } = a { Some((*instance, *repeat)) } else { None }).collect()
    }

    /// After a split view heals, the upstream router may hold the other master's MAC for the
    /// addresses (its gratuitous ARPs came last): the master that stays re-announces them when
    /// it hears the other one's lower-priority advert, as keepalived does, instead of leaving
    /// the addresses on a backup (which drops their traffic) until the router's entry expires.
    #[test]
    fn master_hearing_a_lower_priority_master_announces_its_addresses_again() {
        let c = Clock::new();
        let p = InstanceParams {
            garp_lower_prio_repeat: 3,
            garp_lower_prio_delay: Duration::from_secs(2),
            ..params("VI", Version::V3, 100, ms(100), "10.0.0.2")
        };
        let mut e = Engine::new(vec![p.clone()], vec![]);
        e.start(c.now());
        assert_eq!(garps(&e.tick(c.at(ms(360)))), vec![(0, 5)], "becoming master: garp_master_repeat");
        let lower = advert(Version::V3, 90, ms(100));
        assert_eq!(
            e.receive(c.at(ms(1000)), 0, peer(), &lower),
            vec![Action::Advert { instance: 0, priority: 100 }, Action::Garp { instance: 0, repeat: 3 }]
        );
        // The other side goes on advertising until it hears ours: answered, but announced at
        // most once a second.
        assert_eq!(e.receive(c.at(ms(1100)), 0, peer(), &lower), vec![Action::Advert { instance: 0, priority: 100 }]);
        assert_eq!(garps(&e.receive(c.at(ms(2000)), 0, peer(), &lower)), vec![(0, 3)]);
        // The second burst garp_lower_prio_delay after the first (not postponed by the later
        // one), besides the master's own second burst 5 s after becoming master.
        let mut later = Vec::new();
        for t in (2010..=5400).step_by(10) {
            later.extend(garps(&e.tick(c.at(ms(t)))).into_iter().map(|g| (t, g)));
        }
        assert_eq!(later, vec![(3000, (0, 3)), (5360, (0, 5))]);
        // Priority 0 (the other one leaving) is only answered.
        assert_eq!(e.receive(c.at(ms(6000)), 0, peer(), &advert(Version::V3, 0, ms(100))), vec![Action::Advert { instance: 0, priority: 100 }]);
        // A higher priority still wins, and a backup never announces.
        assert_eq!(states(&e.receive(c.at(ms(6100)), 0, peer(), &advert(Version::V3, 200, ms(100)))), vec![(0, VrrpState::Backup)]);
        assert!(garps(&e.receive(c.at(ms(7200)), 0, peer(), &lower)).is_empty());

        // garp_lower_prio_repeat 0: answered only; delay 0: no second burst.
        for (repeat, delay, want) in [(0, Duration::from_secs(2), vec![]), (2, Duration::ZERO, vec![(0, 2)])] {
            let mut e = Engine::new(vec![InstanceParams { garp_lower_prio_repeat: repeat, garp_lower_prio_delay: delay, ..p.clone() }], vec![]);
            e.start(c.now());
            e.tick(c.at(ms(360)));
            assert_eq!(garps(&e.receive(c.at(ms(1000)), 0, peer(), &lower)), want);
            for t in (1010..=5000).step_by(10) {
                assert!(garps(&e.tick(c.at(ms(t)))).is_empty(), "{repeat} {delay:?} at {t} ms");
            }
        }

        // A sync group: every master member announces (each may have been on both sides).
        let mut b = InstanceParams { vrid: 52, addresses: vec!["10.0.0.101".parse().unwrap()], ..p.clone() };
        b.garp_lower_prio_repeat = 4;
        let mut e = Engine::new(vec![p, b], vec![("G".into(), vec![0, 1])]);
        e.start(c.now());
        e.tick(c.at(ms(360)));
        assert_eq!((e.state(0), e.state(1)), (VrrpState::Master, VrrpState::Master));
        let a = e.receive(c.at(ms(1000)), 0, peer(), &lower);
        assert_eq!(a[0], Action::Advert { instance: 0, priority: 100 });
        assert_eq!(garps(&a), vec![(0, 3), (1, 4)]);
        // The other member hearing its own lower-priority advert right after: within the gap.
        let b_lower = Advert { vrid: 52, addresses: vec!["10.0.0.101".parse().unwrap()], ..lower.clone() };
        assert_eq!(e.receive(c.at(ms(1050)), 1, peer(), &b_lower), vec![Action::Advert { instance: 1, priority: 100 }]);
        let mut later = Vec::new();
        for t in (1010..=3000).step_by(10) {
            later.extend(garps(&e.tick(c.at(ms(t)))).into_iter().map(|g| (t, g)));
        }
        assert_eq!(later, vec![(3000, (0, 3)), (3000, (1, 4))]);
    }

    #[test]
    fn preempt_nopreempt_and_preempt_delay() {
        let mut c = Clock::new();
        let step = ms(10);
        // preempt (default): a lower-priority master is preempted after Master_Down_Interval.
        let p = params("VI", Version::V3, 150, ms(100), "10.0.0.2");
        let mut e = Engine::new(vec![p.clone()], vec![]);
        e.start(c.now());
        let lower = advert(Version::V3, 100, ms(100));
        let mut t = ms(0);
        while e.state(0) == VrrpState::Backup {
            t += ms(100);
            e.receive(c.at(t), 0, peer(), &lower);
            e.tick(c.at(t));
        }
        assert_eq!(t, ms(400), "340 ms down interval, checked at the 100 ms adverts");

        // nopreempt: stays backup as long as the lower master advertises.
        let mut e = Engine::new(vec![InstanceParams { preempt: false, ..p.clone() }], vec![]);
        e.start(c.now());
        for t in (100..5000).step_by(100) {
            e.receive(c.at(ms(t)), 0, peer(), &lower);
            assert!(e.tick(c.at(ms(t))).is_empty());
        }
        assert_eq!(e.state(0), VrrpState::Backup);

        // preempt_delay 2 s: accepted until 2 s after start, then preempted.
        let mut e = Engine::new(vec![InstanceParams { preempt_delay: Duration::from_secs(2), ..p }], vec![]);
        e.start(c.now());
        while c.1 < Duration::from_secs(5) && e.state(0) == VrrpState::Backup {
            c.1 += step;
            if c.1.as_millis().is_multiple_of(100) {
                e.receive(c.now(), 0, peer(), &lower);
            }
            e.tick(c.now());
        }
        assert_eq!(e.state(0), VrrpState::Master);
        // Adverts are accepted while less than 2 s have passed since start-up: the last one at
        // 1.9 s sets the master-down timer to 1.9 + 0.34 s; the ones from 2.0 s on are ignored.
        assert_eq!(c.1, ms(2240));
    }

    #[test]
    fn stop_sends_priority_zero_and_the_peer_takes_over_in_skew_time() {
        let c = Clock::new();
        // Two engines talking to each other through the test: A (150) and B (100).
        let a_params = params("A", Version::V3, 150, ms(100), "10.0.0.2");
        let b_params = params("B", Version::V3, 100, ms(100), "10.0.0.3");
        let mut a = Engine::new(vec![a_params], vec![]);
        let mut b = Engine::new(vec![b_params], vec![]);
        a.start(c.now());
        b.start(c.now());
        let mut t = ms(0);
        let mut a_out = Vec::new();
        let mut b_out = Vec::new();
        while t < ms(2000) {
            t += ms(10);
            a_out.extend(a.tick(c.at(t)));
            b_out.extend(b.tick(c.at(t)));
            for act in a_out.drain(..) {
                if let Action::Advert { priority, .. } = act {
                    b_out.extend(b.receive(c.at(t), 0, "10.0.0.2".parse().unwrap(), &advert(Version::V3, priority, ms(100))));
                }
            }
            for act in b_out.drain(..) {
                if let Action::Advert { priority, .. } = act {
                    a_out.extend(a.receive(c.at(t), 0, "10.0.0.3".parse().unwrap(), &advert(Version::V3, priority, ms(100))));
                }
            }
        }
        assert_eq!((a.state(0), b.state(0)), (VrrpState::Master, VrrpState::Backup));
        let stop = a.stop(c.at(t));
        assert_eq!(
            stop,
            vec![
                Action::State { instance: 0, from: VrrpState::Master, to: VrrpState::Init, priority: 150 },
                Action::Advert { instance: 0, priority: 0 },
            ]
        );
        b.receive(c.at(t), 0, "10.0.0.2".parse().unwrap(), &advert(Version::V3, 0, ms(100)));
        assert_eq!(b.next_timer(), Some(c.at(t + ms(60))), "skew time of priority 100 at 100 ms");
        assert_eq!(states(&b.tick(c.at(t + ms(60)))), vec![(0, VrrpState::Master)]);
    }

    #[test]
    fn tracking_weights_and_fault() {
        let c = Clock::new();
        let mut p = params("VI", Version::V3, 100, ms(100), "10.0.0.2");
        p.trackers = vec![
            Tracker { what: "interface eth1".into(), weight: -30, ok: true },
            Tracker { what: "script up".into(), weight: 20, ok: true },
            Tracker { what: "interface eth2".into(), weight: 0, ok: true },
        ];
        let mut e = Engine::new(vec![p], vec![]);
        e.start(c.now());
        assert_eq!(e.effective_priority(0), 120);
        e.track(c.now(), 0, 0, false);
        assert_eq!(e.effective_priority(0), 90);
        e.track(c.now(), 0, 1, false);
        assert_eq!(e.effective_priority(0), 70);
        e.tick(c.at(ms(400)));
        assert_eq!(e.state(0), VrrpState::Master);
        // Weight 0 failing: FAULT, with a priority-0 advert since we were master.
        let a = e.track(c.at(ms(500)), 0, 2, false);
        assert_eq!(
            a,
            vec![
                Action::State { instance: 0, from: VrrpState::Master, to: VrrpState::Fault, priority: 70 },
                Action::Advert { instance: 0, priority: 0 },
            ]
        );
        assert_eq!(e.next_timer(), None, "FAULT neither advertises nor waits");
        assert!(e.receive(c.at(ms(600)), 0, peer(), &advert(Version::V3, 50, ms(100))).is_empty());
        assert_eq!(e.failing(0), vec!["interface eth1", "script up", "interface eth2"]);
        // Recovery: back to BACKUP, as from INIT.
        assert_eq!(states(&e.track(c.at(ms(700)), 0, 2, true)), vec![(0, VrrpState::Backup)]);
        // Clamped to 1..=254.
        let mut p = params("VI", Version::V3, 250, ms(100), "10.0.0.2");
        p.trackers = vec![Tracker { what: "x".into(), weight: 100, ok: true }];
        assert_eq!(Engine::new(vec![p.clone()], vec![]).effective_priority(0), 254);
        p.priority = 5;
        p.trackers[0].weight = -100;
        p.trackers[0].ok = false;
        assert_eq!(Engine::new(vec![p], vec![]).effective_priority(0), 1);
    }

    #[test]
    fn fault_at_start() {
        let c = Clock::new();
        let mut p = params("VI", Version::V3, 100, ms(100), "10.0.0.2");
        p.trackers = vec![Tracker { what: "interface eth0".into(), weight: 0, ok: false }];
        let mut e = Engine::new(vec![p], vec![]);
        assert_eq!(states(&e.start(c.now())), vec![(0, VrrpState::Fault)]);
        assert_eq!(e.next_timer(), None);
    }

    #[test]
    fn sync_group_moves_together() {
        let mut c = Clock::new();
        let mut a = params("A", Version::V3, 100, ms(100), "10.0.0.2");
        a.trackers = vec![Tracker { what: "interface eth1".into(), weight: 0, ok: true }];
        let mut b = params("B", Version::V3, 100, ms(200), "10.0.0.2");
        b.vrid = 52;
        b.addresses = vec!["10.0.0.101".parse().unwrap()];
        let mut e = Engine::new(vec![a, b], vec![("G".into(), vec![0, 1])]);
        let start = e.start(c.now());
        assert_eq!(states(&start), vec![(0, VrrpState::Backup), (1, VrrpState::Backup)]);
        assert!(start.contains(&Action::Group { group: 0, state: VrrpState::Backup }));

        // A's timer (360 ms) expires first but B (720 ms) does not want master yet: A is held.
        assert!(states(&e.tick(c.at(ms(360)))).is_empty());
        assert_eq!(e.state(0), VrrpState::Backup);
        // When B's expires, both become master together.
        let t = run_until(&mut e, &mut c, ms(10), ms(2000), |a| matches!(a, Action::State { to: VrrpState::Master, .. }));
        assert_eq!(t, ms(720));
        assert_eq!((e.state(0), e.state(1)), (VrrpState::Master, VrrpState::Master));
        assert_eq!(e.group_state(0), VrrpState::Master);

        // A higher-priority advert for B takes A to backup as well.
        let acts = e.receive(
            c.now(),
            1,
            peer(),
            &Advert { vrid: 52, addresses: vec!["10.0.0.101".parse().unwrap()], ..advert(Version::V3, 200, ms(200)) },
        );
        assert_eq!(states(&acts), vec![(1, VrrpState::Backup), (0, VrrpState::Backup)]);
        assert!(acts.contains(&Action::Group { group: 0, state: VrrpState::Backup }));

        // A fault of A's tracked interface takes B to FAULT too; recovery brings both back.
        let acts = e.track(c.now(), 0, 0, false);
        assert_eq!(states(&acts), vec![(0, VrrpState::Fault), (1, VrrpState::Fault)]);
        let acts = e.track(c.now(), 0, 0, true);
        assert_eq!(states(&acts), vec![(0, VrrpState::Backup), (1, VrrpState::Backup)]);

        // B hears a master, A's timer expires: A wants master, B does not; A stays backup.
        let b_adv = Advert { vrid: 52, addresses: vec!["10.0.0.101".parse().unwrap()], ..advert(Version::V3, 150, ms(200)) };
        for t in (100..3000).step_by(100) {
            c.1 += ms(100);
            if t % 200 == 0 {
                e.receive(c.now(), 1, peer(), &b_adv);
            }
            e.tick(c.now());
            assert_eq!((e.state(0), e.state(1)), (VrrpState::Backup, VrrpState::Backup), "at {t} ms");
        }
    }

    #[test]
    fn checks_drop_and_count_bad_adverts() {
        let mut p = params("VI", Version::V2, 100, Duration::from_secs(1), "10.0.0.2");
        p.auth = Some(*b"secret\0\0");
        let mut e = Engine::new(vec![p], vec![]);
        let good = Advert { auth_type: packet::AUTH_PASS, auth_data: *b"secret\0\0", ..advert(Version::V2, 100, Duration::from_secs(1)) };
        let dst: IpAddr = "224.0.0.18".parse().unwrap();
        let mut check = |adv: &Advert, src: IpAddr, ttl: u8| {
            let bytes = adv.encode(src, dst);
            e.check(0, &Received { src, dst, ttl, vrrp: &bytes })
        };
        assert_eq!(check(&good, peer(), 255), Ok(good.clone()));
        assert_eq!(check(&good, peer(), 254), Err(DropReason::Ttl));
        assert_eq!(check(&good, "10.0.0.2".parse().unwrap(), 255), Err(DropReason::Own));
        assert_eq!(check(&Advert { version: Version::V3, ..good.clone() }, peer(), 255), Err(DropReason::Version));
        assert_eq!(check(&Advert { auth_data: *b"wrong\0\0\0", ..good.clone() }, peer(), 255), Err(DropReason::Auth));
        assert_eq!(check(&Advert { auth_type: 0, auth_data: [0; 8], ..good.clone() }, peer(), 255), Err(DropReason::Auth));
        assert_eq!(check(&Advert { interval_cs: 200, ..good.clone() }, peer(), 255), Err(DropReason::Interval));
        let other = Advert { addresses: vec!["10.0.0.99".parse().unwrap()], ..good.clone() };
        assert_eq!(check(&other, peer(), 255), Err(DropReason::AddressList));
        assert_eq!(check(&other, peer(), 255), Err(DropReason::AddressList), "counted each time, logged once");
        assert!(check(&Advert { priority: 255, ..other }, peer(), 255).is_ok(), "the owner's list is taken as it is");
        let mut corrupt = good.encode(peer(), dst);
        corrupt[2] ^= 0x10;
        assert_eq!(e.check(0, &Received { src: peer(), dst, ttl: 255, vrrp: &corrupt }), Err(DropReason::Checksum));
        assert_eq!(e.check(0, &Received { src: peer(), dst, ttl: 255, vrrp: &corrupt[..10] }), Err(DropReason::Malformed));
        let d = &e.counters(0).dropped;
        assert_eq!(
            d.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            [("address_list", 2), ("auth", 2), ("checksum", 1), ("interval", 1), ("malformed", 1), ("own", 1), ("ttl", 1), ("version", 1)]
        );
    }

    /// Every line logged (at any level) while `f` runs on this thread, without time or colours.
    fn logged<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
        #[derive(Clone, Default)]
        struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt().with_ansi(false).without_time().with_writer(move || w.clone()).finish();
        let out = tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (out, text.lines().map(str::to_owned).collect())
    }

    /// A peer whose adverts are dropped may be a second master (a split view nobody sees):
    /// the first drop of each reason from each sender is logged, repeats are only counted.
    #[test]
    fn dropped_adverts_are_logged_once_per_sender_and_reason() {
        let mut p = params("VI_1", Version::V2, 100, Duration::from_secs(1), "10.0.0.2");
        p.auth = Some(*b"secret\0\0");
        let mut e = Engine::new(vec![p.clone()], vec![]);
        let good = Advert { auth_type: packet::AUTH_PASS, auth_data: *b"secret\0\0", ..advert(Version::V2, 100, Duration::from_secs(1)) };
        let dst: IpAddr = "224.0.0.18".parse().unwrap();
        let other: IpAddr = "10.0.0.4".parse().unwrap();
        let check = |e: &mut Engine, adv: &Advert, src: IpAddr, ttl: u8, corrupt: bool| {
            let mut bytes = adv.encode(src, dst);
            if corrupt {
                bytes[2] ^= 0x10;
            }
            logged(|| e.check(0, &Received { src, dst, ttl, vrrp: &bytes }))
        };
        let cases: Vec<(Advert, u8, bool, DropReason, &str)> = vec![
            (good.clone(), 64, false, DropReason::Ttl, "TTL/hop limit 64, multicast adverts need 255"),
            (Advert { version: Version::V3, ..good.clone() }, 255, false, DropReason::Version, "VRRP version 3, ours is 2"),
            (good.clone(), 255, true, DropReason::Checksum, "bad checksum"),
            (Advert { auth_data: *b"wrong\0\0\0", ..good.clone() }, 255, false, DropReason::Auth, "invalid password (auth_pass)"),
            (Advert { interval_cs: 200, ..good.clone() }, 255, false, DropReason::Interval, "advert interval 2s, ours is 1s: VRRPv2 routers must agree"),
            (
                Advert { addresses: vec!["10.0.0.99".parse().unwrap()], ..good.clone() },
                255,
                false,
                DropReason::AddressList,
                "address list [10.0.0.99], ours is [10.0.0.100]",
            ),
        ];
        for (adv, ttl, corrupt, reason, why) in &cases {
            let (r, lines) = check(&mut e, adv, peer(), *ttl, *corrupt);
            assert_eq!(r, Err(*reason));
            assert_eq!(lines.len(), 1, "{reason:?}: {lines:#?}");
            assert!(lines[0].starts_with(" WARN"), "{}", lines[0]);
            let want = format!("VRRP advert from 10.0.0.3 dropped: {why} (logged once per sender and reason; lbd status counts them)");
            assert!(lines[0].contains(&want) && lines[0].contains("instance=VI_1"), "{}\nwanted {want}", lines[0]);
            // The same again: counted, not logged.
            let (r, lines) = check(&mut e, adv, peer(), *ttl, *corrupt);
            assert_eq!((r, lines), (Err(*reason), vec![]), "{reason:?} repeated");
        }
        // Another sender, or another reason from the same one (auth type), is logged.
        let (r, lines) = check(&mut e, &cases[0].0, other, 64, false);
        assert_eq!((r, lines.len()), (Err(DropReason::Ttl), 1));
        assert!(lines[0].contains("VRRP advert from 10.0.0.4 dropped: TTL/hop limit 64"), "{lines:?}");
        let (r, lines) = check(&mut e, &Advert { auth_type: 0, auth_data: [0; 8], ..good.clone() }, other, 255, false);
        assert_eq!(r, Err(DropReason::Auth));
        assert!(lines.len() == 1 && lines[0].contains("dropped: authentication none, ours is PASS"), "{lines:?}");
        assert_eq!(e.counters(0).dropped.values().sum::<u64>(), 14);
        // A good advert is not logged.
        assert_eq!(check(&mut e, &good, peer(), 255, false), (Ok(good.clone()), vec![]));

        // Unicast: a sender that is not a peer.
        let mut u = Engine::new(vec![InstanceParams { unicast_peers: vec![peer()], ..p.clone() }], vec![]);
        for want in [1, 0] {
            let (r, lines) = check(&mut u, &good, other, 64, false);
            assert_eq!((r, lines.len()), (Err(DropReason::UnknownPeer), want));
            if want == 1 {
                assert!(lines[0].contains("VRRP advert from 10.0.0.4 dropped: not one of unicast_peers [10.0.0.3]"), "{lines:?}");
            }
        }

        // A flood from forged senders: MAX_LOGGED_DROPS lines (the last says so), then silence.
        let mut f = Engine::new(vec![p], vec![]);
        let mut lines = Vec::new();
        for k in 0..100u8 {
            lines.extend(check(&mut f, &good, IpAddr::from([192, 0, 2, k]), 1, false).1);
        }
        assert_eq!(lines.len(), MAX_LOGGED_DROPS + 1, "{lines:#?}");
        assert!(lines[..MAX_LOGGED_DROPS].iter().all(|l| l.contains("dropped: TTL/hop limit 1")), "{lines:#?}");
        assert!(lines[MAX_LOGGED_DROPS].contains("dropped VRRP adverts of 32 kinds logged: further kinds are only counted"), "{lines:#?}");
        assert_eq!(f.counters(0).dropped["ttl"], 100);
    }

    /// RFC 3768/5798 7.1: an address owner's advert is processed even if its address list
    /// differs (keepalived drops it); lbd follows the RFC, and logs the mismatch once, naming the
    /// addresses nobody answers for while the owner is master.
    #[test]
    fn address_owner_with_another_address_list_is_accepted_and_logged_once() {
        let c = Clock::new();
        let mut p = params("VI_1", Version::V3, 100, ms(100), "10.0.0.2");
        p.addresses = vec!["10.0.0.100".parse().unwrap(), "10.0.0.101".parse().unwrap()];
        let mut e = Engine::new(vec![p], vec![]);
        e.start(c.now());
        let owner = Advert { addresses: vec!["10.0.0.100".parse().unwrap()], ..advert(Version::V3, 255, ms(100)) };
        let dst: IpAddr = "224.0.0.18".parse().unwrap();
        let bytes = owner.encode(peer(), dst);
        let rx = Received { src: peer(), dst, ttl: 255, vrrp: &bytes };
        let (r, lines) = logged(|| e.check(0, &rx));
        assert_eq!(r, Ok(owner.clone()));
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].starts_with(" WARN"), "{}", lines[0]);
        assert!(
            lines[0].contains(
                "VRRP advert from 10.0.0.3 (the address owner, priority 255) with address list [10.0.0.100], ours is \
                 [10.0.0.100, 10.0.0.101]: accepted, as the RFCs want; while it is master nobody answers for [10.0.0.101] \
                 (logged once)"
            ),
            "{}",
            lines[0]
        );
        // Accepted: it is the master, we stay backup.
        e.receive(c.at(ms(100)), 0, peer(), &owner);
        assert_eq!((e.state(0), e.master(0)), (VrrpState::Backup, Some(peer())));
        assert!(e.counters(0).dropped.is_empty());
        let (r, lines) = logged(|| e.check(0, &rx));
        assert_eq!((r, lines), (Ok(owner), vec![]), "logged once");
        // An owner listing more than we do: nothing goes unanswered.
        let addrs = ["10.0.0.100", "10.0.0.101", "10.0.0.102"].map(|a| a.parse().unwrap());
        let more = Advert { addresses: addrs.to_vec(), ..advert(Version::V3, 255, ms(100)) };
        let other: IpAddr = "10.0.0.4".parse().unwrap();
        let bytes = more.encode(other, dst);
        let (r, lines) = logged(|| e.check(0, &Received { src: other, dst, ttl: 255, vrrp: &bytes }));
        assert_eq!(r, Ok(more));
        let want = "10.0.0.102], ours is [10.0.0.100, 10.0.0.101]: accepted, as the RFCs want (logged once)";
        assert!(lines.len() == 1 && lines[0].contains(want), "{lines:#?}");
    }

    #[test]
    fn unicast_mode_accepts_only_peers_and_any_ttl() {
        let mut p = params("VI", Version::V3, 100, ms(100), "10.0.0.2");
        p.unicast_peers = vec![peer()];
        let mut e = Engine::new(vec![p], vec![]);
        let adv = advert(Version::V3, 100, ms(100));
        let me: IpAddr = "10.0.0.2".parse().unwrap();
        let stranger: IpAddr = "10.0.0.9".parse().unwrap();
        let b = adv.encode(peer(), me);
        assert!(e.check(0, &Received { src: peer(), dst: me, ttl: 64, vrrp: &b }).is_ok());
        let b = adv.encode(stranger, me);
        assert_eq!(e.check(0, &Received { src: stranger, dst: me, ttl: 255, vrrp: &b }), Err(DropReason::UnknownPeer));
    }

    impl InstanceParams {
        fn with_priority(&self, p: u8) -> InstanceParams {
            InstanceParams { priority: p, ..self.clone() }
        }
    }
}
