//! The one seam between the controller (authoritative state) and whatever forwards packets: the
//! XDP fast path today, IPVS later, and an in-memory fake for tests without root.
//!
//! The controller always hands over the *whole* desired state; a dataplane reconciles it with what
//! it has programmed, touching only what changed.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use crate::config::{Forwarding, Persistence, Protocol};

/// A virtual service: what the fast path matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VipAddr {
    /// For a firewall-mark service: the unspecified address of its family.
    pub addr: IpAddr,
    /// 0 = every port.
    pub port: u16,
    pub protocol: Protocol,
    /// A firewall-mark service (IPVS only) matches this mark instead of address, port, protocol.
    pub fwmark: Option<u32>,
}

impl VipAddr {
    pub fn new(addr: IpAddr, port: u16, protocol: Protocol) -> Self {
        Self { addr, port, protocol, fwmark: None }
    }

    /// The virtual server's key, firewall mark included.
    pub fn of(vs: &crate::config::VirtualServer) -> Self {
        Self { fwmark: vs.fwmark, ..Self::new(vs.address, vs.port, vs.protocol) }
    }
}

impl fmt::Display for VipAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        };
        match (self.fwmark, self.addr) {
            (Some(mark), IpAddr::V4(_)) => write!(f, "FWM {mark}"),
            (Some(mark), IpAddr::V6(_)) => write!(f, "FWM {mark} IPv6"),
            (None, IpAddr::V4(a)) => write!(f, "{proto} {a}:{}", self.port),
            (None, IpAddr::V6(a)) => write!(f, "{proto} [{a}]:{}", self.port),
        }
    }
}

/// A real server of a VIP, as the controller wants it programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: IpAddr,
    pub port: u16,
    /// Share of table slots; 0 = keeps its established flows but gets no new ones.
    pub weight: u32,
    /// Link-layer address; `None` while unresolved (then it cannot receive traffic).
    pub mac: Option<[u8; 6]>,
    /// Egress interface and its own MAC (the frame's new source address).
    pub ifindex: u32,
    pub src_mac: [u8; 6],
}

impl BackendSpec {
    /// Stable identity, also the Maglev key: identical on every director for the same config.
    pub fn key(&self) -> String {
        endpoint_key(self.addr, self.port)
    }
}

/// A real server's identity within its virtual server: `10.0.0.11:80`, `[fd00::11]:80`.
pub fn endpoint_key(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

/// Desired state of one VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub vip: VipAddr,
    pub backends: Vec<BackendSpec>,
    /// Forward this VIP's traffic (false on a VRRP backup).
    pub enabled: bool,
    /// What only IPVS uses (the XDP fast path is maglev with DSR; the config refuses the rest).
    pub ipvs: IpvsParams,
}

impl ServiceSpec {
    /// An enabled maglev/DSR service.
    pub fn new(vip: VipAddr, backends: Vec<BackendSpec>) -> Self {
        Self { vip, backends, enabled: true, ipvs: IpvsParams::default() }
    }
}

/// A virtual server's IPVS settings, straight from the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsParams {
    /// `maglev` (IPVS `mh`) or an IPVS scheduler name.
    pub scheduler: String,
    pub forwarding: Forwarding,
    pub persistence: Option<Persistence>,
    pub mh_fallback: bool,
    pub mh_port: bool,
}

impl Default for IpvsParams {
    fn default() -> Self {
        Self { scheduler: "maglev".into(), forwarding: Forwarding::Dsr, persistence: None, mh_fallback: true, mh_port: false }
    }
}

/// Traffic counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    /// Flows that got their backend from the lookup table ("Conns" in ipvsadm terms).
    pub new_flows: u64,
}

/// What a dataplane reports: per reason, per VIP, per (VIP, backend key), and how many lookup
/// table slots each backend holds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DataplaneStats {
    /// Tracked connections: counted by `stats` unless the dataplane offers
    /// [`Dataplane::connection_count`] (XDP: connection-table entries), which the caller then runs.
    pub connections: u64,
    pub reasons: BTreeMap<String, Traffic>,
    pub vips: BTreeMap<VipAddr, Traffic>,
    pub backends: BTreeMap<(VipAddr, String), BackendStats>,
    /// Why the dataplane does not forward now, if it knows (XDP: its interface is gone).
    pub problem: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct BackendStats {
    pub traffic: Traffic,
    /// Lookup-table slots held (XDP); `None` where the dataplane has no table.
    pub slots: Option<u32>,
    /// IPVS's ActiveConn and InActConn (`ipvsadm -Ln`); `None` with XDP, whose connection table
    /// keeps no TCP state.
    pub connections: Option<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{what}: {source}")]
    Map { what: String, source: aya::maps::MapError },
    #[error("too many {what}: the maps were sized for {limit} at start-up (raise it in [director] and restart)")]
    Capacity { what: &'static str, limit: u32 },
    #[error("{0}")]
    Other(String),
}

pub trait Dataplane: Send {
    /// Short name for logs and `lbd status` ("xdp", "ipvs", "fake").
    fn name(&self) -> &'static str;
    /// Whether real servers need a resolved MAC before they get traffic (XDP rewrites MACs; IPVS
    /// leaves that to the kernel).
    fn needs_macs(&self) -> bool {
        true
    }
    /// Programs the whole desired state. On error, what was already applied stays consistent
    /// (each VIP switches tables atomically) and the caller may retry.
    fn apply(&mut self, services: &[ServiceSpec]) -> Result<(), DataplaneError>;
    fn stats(&self) -> Result<DataplaneStats, DataplaneError>;
    /// A count of the tracked connections that takes a while and needs nothing of the caller's
    /// (XDP: a scan of whole connection tables, 50 ms for 4 million empty entries), for the
    /// caller to run off its task. `None`: `stats` counts them.
    fn connection_count(&self) -> Option<ConnectionCount> {
        None
    }
    /// The kernel's interfaces are now `links` (see [`crate::links::LinkWatcher`]): a
    /// dataplane attached to interfaces follows one that was deleted and created again. The real
    /// servers' new interface indexes come with the next [`Self::apply`].
    fn links_changed(&mut self, links: &crate::links::Links) -> Result<(), DataplaneError> {
        let _ = links;
        Ok(())
    }
    /// Called once, after the first [`Self::apply`] of a start: a dataplane that took over what
    /// an earlier lbd left in the kernel (see [`crate::keep`]) switches to its own state now that
    /// it is complete.
    fn go_live(&mut self) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Whether a fast path an earlier lbd kept serves until [`Self::go_live`]: the start can
    /// take its time to make its own state complete (the real servers' MACs) first.
    fn taking_over(&self) -> bool {
        false
    }
    /// While [`Self::taking_over`]: the real servers (virtual server, [`BackendSpec::key`]) the
    /// kept fast path serves.
    fn kept_real_servers(&self) -> Vec<(VipAddr, String)> {
        Vec::new()
    }
    /// Whether what it programmed stays in the kernel, forwarding, when lbd exits (so that a
    /// restart drops no connection).
    fn stays(&self) -> bool {
        false
    }
}

/// See [`Dataplane::connection_count`].
pub type ConnectionCount = Box<dyn FnOnce() -> u64 + Send>;

/// In-memory dataplane for tests without root: records every state it was given. Clones share the
/// record, so a test keeps one clone while the controller owns the other.
#[derive(Clone, Default)]
pub struct FakeDataplane {
    applied: Arc<Mutex<Vec<Vec<ServiceSpec>>>>,
    fail: Arc<Mutex<Option<String>>>,
    count: Arc<Mutex<Option<Arc<CountFn>>>>,
    /// Applies, and the interfaces each `links_changed` was told, in order.
    log: Arc<Mutex<Vec<FakeCall>>>,
    /// Real servers of a kept fast path, until `go_live` (see [`FakeDataplane::keep`]).
    kept: Arc<Mutex<Vec<(VipAddr, String)>>>,
}

/// A call [`FakeDataplane`] recorded.
#[derive(Clone, Debug, PartialEq)]
pub enum FakeCall {
    Apply,
    LinksChanged(crate::links::Links),
}

type CountFn = dyn Fn() -> u64 + Send + Sync;

impl std::fmt::Debug for FakeDataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeDataplane").field("applied", &self.applied).field("fail", &self.fail).finish_non_exhaustive()
    }
}

impl FakeDataplane {
    /// Every state applied so far, oldest first.
    pub fn applied(&self) -> Vec<Vec<ServiceSpec>> {
        self.applied.lock().expect("fake dataplane lock").clone()
    }

    /// The state programmed last.
    pub fn current(&self) -> Option<Vec<ServiceSpec>> {
        self.applied().last().cloned()
    }

    /// Makes the next `apply` fail with `message` (and leave the programmed state alone).
    pub fn fail_next(&self, message: &str) {
        *self.fail.lock().expect("fake dataplane lock") = Some(message.to_string());
    }

    /// The applies and `links_changed` calls so far, oldest first.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.log.lock().expect("fake dataplane lock").clone()
    }

    /// Acts as a dataplane taking over a fast path that serves `real_servers` (virtual server,
    /// real server key) until `go_live`.
    pub fn keep(&self, real_servers: Vec<(VipAddr, String)>) {
        *self.kept.lock().expect("fake dataplane lock") = real_servers;
    }

    /// Makes `connection_count` offer `count` (as an XDP dataplane's table scan).
    pub fn count_connections_with(&self, count: impl Fn() -> u64 + Send + Sync + 'static) {
        *self.count.lock().expect("fake dataplane lock") = Some(Arc::new(count));
    }
}

impl Dataplane for FakeDataplane {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn apply(&mut self, services: &[ServiceSpec]) -> Result<(), DataplaneError> {
        if let Some(message) = self.fail.lock().expect("fake dataplane lock").take() {
            return Err(DataplaneError::Other(message));
        }
        self.applied.lock().expect("fake dataplane lock").push(services.to_vec());
        self.log.lock().expect("fake dataplane lock").push(FakeCall::Apply);
        Ok(())
    }
    fn links_changed(&mut self, links: &crate::links::Links) -> Result<(), DataplaneError> {
        self.log.lock().expect("fake dataplane lock").push(FakeCall::LinksChanged(links.clone()));
        Ok(())
    }
    fn stats(&self) -> Result<DataplaneStats, DataplaneError> {
        Ok(DataplaneStats::default())
    }
    fn connection_count(&self) -> Option<ConnectionCount> {
        let count = self.count.lock().expect("fake dataplane lock").clone()?;
        Some(Box::new(move || count()))
    }
    fn taking_over(&self) -> bool {
        !self.kept.lock().expect("fake dataplane lock").is_empty()
    }
    fn kept_real_servers(&self) -> Vec<(VipAddr, String)> {
        self.kept.lock().expect("fake dataplane lock").clone()
    }
    fn go_live(&mut self) -> Result<(), DataplaneError> {
        self.kept.lock().expect("fake dataplane lock").clear();
        Ok(())
    }
}
