//! The IPVS dataplane: the same `Dataplane` trait as XDP, programming the kernel's IPVS over
//! generic netlink (`crate::ipvs`) for kernels without XDP.
//!
//! It reconciles rather than rebuilds: each `apply` reads what the kernel holds, adds what is
//! missing, edits what differs and deletes only what lbd owns. Ownership is the set of services lbd
//! created, kept in a small state file beside the control socket, so that
//! - a restart of lbd finds its services as it left them (a second reconcile changes nothing and
//!   established connections never notice), and
//! - services an operator added by hand with ipvsadm are never touched, flushed or deleted.
//!
//! lbd therefore leaves its IPVS services in place when it stops: connections keep flowing while it
//! restarts. Remove a service by removing it from the config and reloading (or `ipvsadm -D`).
//!
//! Before it changes anything, `apply` refuses what IPVS would take but not forward (a port-0
//! service without persistence, a real server of the other family without tunnelling) and a
//! configured service the kernel already has but lbd did not create: taking it over would rewrite
//! and later delete an operator's service.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Forwarding, Protocol},
    dataplane::{BackendSpec, BackendStats, Dataplane, DataplaneError, DataplaneStats, ServiceSpec, Traffic, VipAddr},
    ipvs::{self, Destination, Family, IpvsClient, IpvsError, Service, ServiceKey},
};

/// What `apply` needs of the kernel's IPVS: [`IpvsClient`], or a fake kernel in tests.
pub trait IpvsOps: Send {
    fn services(&mut self) -> Result<Vec<Service>, IpvsError>;
    fn destinations(&mut self, key: &ServiceKey) -> Result<Vec<Destination>, IpvsError>;
    fn add_service(&mut self, s: &Service) -> Result<(), IpvsError>;
    fn edit_service(&mut self, s: &Service) -> Result<(), IpvsError>;
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), IpvsError>;
    fn add_destination(&mut self, key: &ServiceKey, d: &Destination) -> Result<(), IpvsError>;
    fn edit_destination(&mut self, key: &ServiceKey, d: &Destination) -> Result<(), IpvsError>;
    fn del_destination(&mut self, key: &ServiceKey, addr: IpAddr, port: u16) -> Result<(), IpvsError>;
}

impl IpvsOps for IpvsClient {
    fn services(&mut self) -> Result<Vec<Service>, IpvsError> {
        IpvsClient::services(self)
    }
    fn destinations(&mut self, key: &ServiceKey) -> Result<Vec<Destination>, IpvsError> {
        IpvsClient::destinations(self, key)
    }
    fn add_service(&mut self, s: &Service) -> Result<(), IpvsError> {
        IpvsClient::add_service(self, s)
    }
    fn edit_service(&mut self, s: &Service) -> Result<(), IpvsError> {
        IpvsClient::edit_service(self, s)
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), IpvsError> {
        IpvsClient::del_service(self, key)
    }
    fn add_destination(&mut self, key: &ServiceKey, d: &Destination) -> Result<(), IpvsError> {
        IpvsClient::add_destination(self, key, d)
    }
    fn edit_destination(&mut self, key: &ServiceKey, d: &Destination) -> Result<(), IpvsError> {
        IpvsClient::edit_destination(self, key, d)
    }
    fn del_destination(&mut self, key: &ServiceKey, addr: IpAddr, port: u16) -> Result<(), IpvsError> {
        IpvsClient::del_destination(self, key, addr, port)
    }
}

pub struct IpvsDataplane<K: IpvsOps = IpvsClient> {
    client: K,
    state_file: PathBuf,
    /// Services lbd created (from the state file, then from each apply).
    owned: BTreeSet<ServiceKey>,
    /// The VIPs of the last apply, to map kernel services back for `stats`.
    vips: BTreeMap<ServiceKey, VipAddr>,
}

/// One owned service, as stored in the state file.
#[derive(Serialize, Deserialize)]
struct OwnedKey {
    addr: Option<IpAddr>,
    protocol: Option<String>,
    port: Option<u16>,
    fwmark: Option<u32>,
    ipv6: bool,
}

impl From<&ServiceKey> for OwnedKey {
    fn from(key: &ServiceKey) -> Self {
        match key {
            ServiceKey::Inet { addr, protocol, port } => OwnedKey {
                addr: Some(*addr),
                protocol: Some(protocol.name().to_string()),
                port: Some(*port),
                fwmark: None,
                ipv6: addr.is_ipv6(),
            },
            ServiceKey::Fwmark { family, mark } => {
                OwnedKey { addr: None, protocol: None, port: None, fwmark: Some(*mark), ipv6: *family == Family::V6 }
            }
        }
    }
}

impl OwnedKey {
    fn key(&self) -> Option<ServiceKey> {
        if let Some(mark) = self.fwmark {
            let family = if self.ipv6 { Family::V6 } else { Family::V4 };
            return Some(ServiceKey::Fwmark { family, mark });
        }
        let protocol = match self.protocol.as_deref()? {
            "TCP" => ipvs::Protocol::Tcp,
            "UDP" => ipvs::Protocol::Udp,
            "SCTP" => ipvs::Protocol::Sctp,
            _ => return None,
        };
        Some(ServiceKey::Inet { addr: self.addr?, protocol, port: self.port? })
    }
}

fn kernel_error(e: IpvsError) -> DataplaneError {
    DataplaneError::Other(e.to_string())
}

/// The IPVS key of a VIP.
pub fn service_key(vip: &VipAddr) -> ServiceKey {
    match vip.fwmark {
        Some(mark) => ServiceKey::Fwmark { family: Family::of(vip.addr), mark },
        None => ServiceKey::Inet {
            addr: vip.addr,
            protocol: match vip.protocol {
                Protocol::Tcp => ipvs::Protocol::Tcp,
                Protocol::Udp => ipvs::Protocol::Udp,
            },
            port: vip.port,
        },
    }
}

/// The IPVS service for a spec: `maglev` is IPVS's `mh`; persistence and mh flags map to the
/// service flags ipvsadm sets for `-p`, `-M` and `-b mh-fallback,mh-port`. The mh flags go to `mh`
/// only: the same bits mean other things to other schedulers (`sh`: sh-fallback, sh-port).
pub fn service_of(spec: &ServiceSpec) -> Service {
    let p = &spec.ipvs;
    let scheduler = if p.scheduler == "maglev" { "mh" } else { p.scheduler.as_str() };
    let mut svc = Service::new(service_key(&spec.vip), scheduler);
    if let Some(pers) = p.persistence {
        svc.flags |= ipvs::IP_VS_SVC_F_PERSISTENT;
        svc.timeout = pers.timeout_secs;
        svc.netmask = match svc.key.family() {
            Family::V4 => u32::MAX.checked_shl(32 - u32::from(pers.prefix_len)).unwrap_or(0),
            Family::V6 => u32::from(pers.prefix_len),
        };
    }
    if scheduler == "mh" && p.mh_fallback {
        svc.flags |= ipvs::IP_VS_SVC_F_SCHED1;
    }
    if scheduler == "mh" && p.mh_port {
        svc.flags |= ipvs::IP_VS_SVC_F_SCHED2;
    }
    svc
}

/// Why IPVS would accept `spec` but not forward it as configured, if it would not: the kernel takes
/// a port-0 service without persistence and then drops its traffic (`ip_vs_schedule`: "port zero
/// only supported in persistent services"), and refuses (EINVAL) a real server of the other address
/// family unless it is tunnelled.
fn unsupported(spec: &ServiceSpec) -> Option<String> {
    let vip = &spec.vip;
    if vip.fwmark.is_none() && vip.port == 0 && spec.ipvs.persistence.is_none() {
        return Some(format!(
            "virtual server {vip}: IPVS forwards port 0 (every port) only for a persistent service (ipvsadm refuses \
             it too): give it a port, or persistence (mode = \"ipvs\")"
        ));
    }
    let family = |a: IpAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
    let other = spec.backends.iter().find(|b| b.addr.is_ipv4() != vip.addr.is_ipv4());
    match other {
        Some(b) if spec.ipvs.forwarding != Forwarding::Tunnel => Some(format!(
            "virtual server {vip}: real server {} is {}, the virtual server {}: IPVS mixes address families only \
             with forwarding = \"tunnel\"",
            b.addr,
            family(b.addr),
            family(vip.addr)
        )),
        _ => None,
    }
}

/// The ipvsadm command that deletes `vip`'s service: `ipvsadm -D -t 10.0.0.1:80`.
fn ipvsadm_delete(vip: &VipAddr) -> String {
    let addr = std::net::SocketAddr::new(vip.addr, vip.port);
    match (vip.fwmark, vip.protocol) {
        (Some(mark), _) if vip.addr.is_ipv6() => format!("ipvsadm -D -6 -f {mark}"),
        (Some(mark), _) => format!("ipvsadm -D -f {mark}"),
        (None, Protocol::Tcp) => format!("ipvsadm -D -t {addr}"),
        (None, Protocol::Udp) => format!("ipvsadm -D -u {addr}"),
    }
}

pub fn destination_of(b: &BackendSpec, forwarding: Forwarding) -> Destination {
    let fwd = match forwarding {
        Forwarding::Dsr => ipvs::Forwarding::DirectRoute,
        Forwarding::Nat => ipvs::Forwarding::Masquerade,
        Forwarding::Tunnel => ipvs::Forwarding::Tunnel,
    };
    Destination::new(b.addr, b.port, fwd, b.weight)
}

fn traffic(s: &ipvs::Stats) -> Traffic {
    Traffic { packets: s.in_packets, bytes: s.in_bytes, new_flows: s.conns }
}

impl IpvsDataplane {
    /// Connects to IPVS (loading `ip_vs` if needed) and reads which services lbd owns from
    /// `state_file`.
    pub fn new(state_file: PathBuf) -> Result<Self, IpvsError> {
        Ok(Self::with_client(IpvsClient::connect()?, state_file))
    }

    /// At a start in XDP mode: deletes the IPVS services an earlier lbd in IPVS mode created
    /// under `state_file` (the one [`IpvsDataplane::state_file_for`] this control socket), and
    /// the file. Left in place they would go on forwarding what XDP passes to the kernel: the
    /// VIPs a VRRP backup's fast path passes, with the old config's real servers, unchecked.
    /// Loads nothing: a kernel without `ip_vs` loaded holds no services. Returns the services
    /// deleted, as `ipvsadm -Ln` names them.
    pub fn retire(state_file: PathBuf) -> Result<Vec<String>, DataplaneError> {
        if !state_file.exists() {
            return Ok(Vec::new());
        }
        match IpvsClient::connect_if_loaded().map_err(kernel_error)? {
            Some(client) => Self::with_client(client, state_file).retire_owned(),
            None => remove_state_file(&state_file).map(|()| Vec::new()),
        }
    }

    /// The kernel's IPVS version.
    pub fn version(&mut self) -> Result<(u8, u8, u8), IpvsError> {
        self.client.info().map(|i| i.version)
    }

    /// The state file lbd keeps for a given control socket (`/run/lbd/lbd.sock` →
    /// `/run/lbd/lbd.ipvs-owned.json`).
    pub fn state_file_for(control_socket: &Path) -> PathBuf {
        control_socket.with_extension("ipvs-owned.json")
    }
}

impl<K: IpvsOps> IpvsDataplane<K> {
    fn with_client(client: K, state_file: PathBuf) -> Self {
        let owned = read_owned(&state_file);
        Self { client, state_file, owned, vips: BTreeMap::new() }
    }

    /// Refuses a configured service (carried or not) that the kernel has but lbd did not create:
    /// an operator's, left alone as README promises, or lbd's own if its state file was lost.
    fn refuse_foreign(&self, services: &[ServiceSpec], kernel: &BTreeMap<ServiceKey, Service>) -> Result<(), DataplaneError> {
        let foreign: Vec<&VipAddr> = services
            .iter()
            .map(|s| &s.vip)
            .filter(|vip| {
                let key = service_key(vip);
                kernel.contains_key(&key) && !self.owned.contains(&key)
            })
            .collect();
        if foreign.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = foreign.iter().map(ToString::to_string).collect();
        let commands: Vec<String> = foreign.iter().map(|vip| ipvsadm_delete(vip)).collect();
        let (what, them, their) = match foreign.len() {
            1 => ("a virtual service", "it", "its"),
            _ => ("virtual services", "them", "their"),
        };
        Err(DataplaneError::Other(format!(
            "IPVS already has {}, {what} lbd did not create (not in {}), and lbd does not take over services made \
             by hand: delete {them} ({}) or remove {them} from the config. If an earlier lbd created {them} and \
             that state file was lost, deleting {them} lets lbd create {them} again ({their} open connections are lost)",
            names.join(", "),
            self.state_file.display(),
            commands.join("; "),
        )))
    }

    /// Adds what is missing, edits what differs, deletes what lbd owns and no longer wants.
    fn reconcile(&mut self, services: &[ServiceSpec], kernel: &BTreeMap<ServiceKey, Service>) -> Result<(), DataplaneError> {
        let mut wanted = BTreeSet::new();
        for spec in services.iter().filter(|s| s.enabled) {
            let svc = service_of(spec);
            let key = svc.key.clone();
            match kernel.get(&key) {
                None => {
                    // Recorded before it exists: lbd killed in between leaves a state file naming a
                    // service the kernel lacks (created at the next start), never one lbd created
                    // and, reading the file, takes for made by hand (and refuses to start over).
                    let listed = self.owned.insert(key.clone());
                    if listed {
                        if let Err(e) = self.save_owned() {
                            // Not recorded: the next apply must try recording it again first.
                            self.owned.remove(&key);
                            return Err(e);
                        }
                    }
                    if let Err(e) = self.client.add_service(&svc) {
                        if listed {
                            self.owned.remove(&key);
                            let _ = self.save_owned();
                        }
                        return Err(kernel_error(e));
                    }
                }
                Some(have) if !same_service(have, &svc) => self.client.edit_service(&svc).map_err(kernel_error)?,
                Some(_) => {}
            }
            // Owned from the moment it exists, so a failure further down still cleans it up later;
            // and counted (`stats`) from then on, so a failed apply does not hide it.
            self.owned.insert(key.clone());
            self.vips.insert(key.clone(), spec.vip);
            let have = match kernel.contains_key(&key) {
                true => self.client.destinations(&key).map_err(kernel_error)?,
                false => Vec::new(),
            };
            let dests: Vec<Destination> =
                spec.backends.iter().map(|b| destination_of(b, spec.ipvs.forwarding)).collect();
            for d in &dests {
                match have.iter().find(|h| h.addr == d.addr && h.port == d.port) {
                    None => self.client.add_destination(&key, d).map_err(kernel_error)?,
                    // lbd sets no thresholds: one set by hand (`ipvsadm -e ... -x N`) is cleared.
                    Some(h)
                        if h.weight != d.weight
                            || h.forwarding != d.forwarding
                            || (h.upper_threshold, h.lower_threshold) != (d.upper_threshold, d.lower_threshold) =>
                    {
                        self.client.edit_destination(&key, d).map_err(kernel_error)?
                    }
                    Some(_) => {}
                }
            }
            for h in have.iter().filter(|h| !dests.iter().any(|d| d.addr == h.addr && d.port == h.port)) {
                self.client.del_destination(&key, h.addr, h.port).map_err(kernel_error)?;
            }
            wanted.insert(key);
        }
        let stale: Vec<ServiceKey> = self.owned.iter().filter(|k| !wanted.contains(*k)).cloned().collect();
        for key in stale {
            if kernel.contains_key(&key) {
                self.client.del_service(&key).map_err(kernel_error)?;
            }
            self.owned.remove(&key);
            self.vips.remove(&key);
        }
        Ok(())
    }

    /// [`IpvsDataplane::retire`] once connected.
    fn retire_owned(&mut self) -> Result<Vec<String>, DataplaneError> {
        let kernel = self.client.services().map_err(kernel_error)?;
        // `TCP  10.0.0.1:80` as one log line has it: `TCP 10.0.0.1:80`.
        let name = |key: &ServiceKey| key.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        let deleted = kernel.iter().filter(|s| self.owned.contains(&s.key)).map(|s| name(&s.key)).collect();
        self.apply(&[])?;
        remove_state_file(&self.state_file)?;
        Ok(deleted)
    }

    fn save_owned(&self) -> Result<(), DataplaneError> {
        let keys: Vec<OwnedKey> = self.owned.iter().map(OwnedKey::from).collect();
        let text = serde_json::to_string_pretty(&keys).expect("owned keys serialize");
        crate::keep::replace_file(&self.state_file, text.as_bytes())
            .map_err(|e| DataplaneError::Other(format!("writing {}: {e}", self.state_file.display())))
    }
}

fn remove_state_file(path: &Path) -> Result<(), DataplaneError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(DataplaneError::Other(format!("removing {}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

fn read_owned(path: &Path) -> BTreeSet<ServiceKey> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeSet::new();
    };
    match serde_json::from_str::<Vec<OwnedKey>>(&text) {
        Ok(keys) => keys.iter().filter_map(OwnedKey::key).collect(),
        Err(e) => {
            tracing::warn!("ignoring unreadable {}: {e}", path.display());
            BTreeSet::new()
        }
    }
}

/// Service settings IPVS reports back as they were written (stats and the kernel-internal
/// HASHED flag aside).
fn same_service(a: &Service, b: &Service) -> bool {
    a.scheduler == b.scheduler
        && a.flags & !ipvs::IP_VS_SVC_F_HASHED == b.flags & !ipvs::IP_VS_SVC_F_HASHED
        && (a.flags & ipvs::IP_VS_SVC_F_PERSISTENT == 0 || (a.timeout == b.timeout && a.netmask == b.netmask))
}

impl<K: IpvsOps> Dataplane for IpvsDataplane<K> {
    fn name(&self) -> &'static str {
        "ipvs"
    }

    fn stays(&self) -> bool {
        true
    }

    fn needs_macs(&self) -> bool {
        false
    }

    /// A disabled service (a VRRP backup's) is withdrawn from IPVS: deleted if lbd created it,
    /// added again when enabled. IPVS only sees traffic to addresses local to the director, and
    /// a backup's kernel must not hand VIP traffic to IPVS, which would forward it (with a
    /// split view the client would get duplicates); with the service gone it never does.
    fn apply(&mut self, services: &[ServiceSpec]) -> Result<(), DataplaneError> {
        // Everything that can be refused is refused before the kernel changes.
        let unsupported: Vec<String> = services.iter().filter_map(unsupported).collect();
        if !unsupported.is_empty() {
            return Err(DataplaneError::Other(unsupported.join("; ")));
        }
        let kernel: BTreeMap<ServiceKey, Service> =
            self.client.services().map_err(kernel_error)?.into_iter().map(|s| (s.key.clone(), s)).collect();
        self.refuse_foreign(services, &kernel)?;
        // The state file records every service created, whatever fails after it: lbd knows its own
        // services only from that file.
        let before = self.owned.clone();
        let result = self.reconcile(services, &kernel);
        if result.is_err() && self.owned == before {
            return result;
        }
        match (result, self.save_owned()) {
            (Err(DataplaneError::Other(e)), Err(save)) => Err(DataplaneError::Other(format!("{e}; then {save}"))),
            (Err(e), _) | (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    fn stats(&self) -> Result<DataplaneStats, DataplaneError> {
        // Dumps need `&mut` on the socket; a second short-lived client keeps `stats` read-only.
        let mut client = IpvsClient::connect().map_err(kernel_error)?;
        let mut out = DataplaneStats::default();
        for svc in client.services().map_err(kernel_error)? {
            let Some(vip) = self.vips.get(&svc.key) else { continue };
            out.vips.insert(*vip, traffic(&svc.stats));
            for d in client.destinations(&svc.key).map_err(kernel_error)? {
                out.connections += u64::from(d.active_conns) + u64::from(d.inactive_conns);
                let key = match d.addr {
                    IpAddr::V4(a) => format!("{a}:{}", d.port),
                    IpAddr::V6(a) => format!("[{a}]:{}", d.port),
                };
                let connections = Some((u64::from(d.active_conns), u64::from(d.inactive_conns)));
                out.backends.insert((*vip, key), BackendStats { traffic: traffic(&d.stats), slots: None, connections });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Persistence;
    use crate::dataplane::{endpoint_key, IpvsParams};

    fn spec(ipvs: IpvsParams, fwmark: Option<u32>) -> ServiceSpec {
        let mut vip = VipAddr::new("10.0.0.1".parse().unwrap(), 80, Protocol::Tcp);
        vip.fwmark = fwmark;
        ServiceSpec { ipvs, ..ServiceSpec::new(vip, vec![]) }
    }

    #[test]
    fn config_maps_to_ipvs_like_ipvsadm() {
        let s = service_of(&spec(IpvsParams::default(), None));
        assert_eq!((s.key.to_string(), s.scheduler.as_str()), ("TCP  10.0.0.1:80".into(), "mh"));
        assert_eq!(s.flags, ipvs::IP_VS_SVC_F_SCHED1, "mh-fallback by default");
        let mh = IpvsParams { mh_fallback: true, mh_port: true, ..IpvsParams::default() };
        assert_eq!(service_of(&spec(mh, None)).flags, ipvs::IP_VS_SVC_F_SCHED1 | ipvs::IP_VS_SVC_F_SCHED2);
        let p = IpvsParams {
            scheduler: "wlc".into(),
            persistence: Some(Persistence { timeout_secs: 300, prefix_len: 24 }),
            ..IpvsParams::default()
        };
        let s = service_of(&spec(p, Some(7)));
        assert_eq!(s.key, ServiceKey::Fwmark { family: Family::V4, mark: 7 });
        assert_eq!((s.scheduler.as_str(), s.timeout, s.netmask), ("wlc", 300, 0xffff_ff00));
        assert_eq!(s.flags, ipvs::IP_VS_SVC_F_PERSISTENT);
    }

    #[test]
    fn mh_flags_go_to_mh_only() {
        // The config's mh_fallback default (true) and mh_port reach no other scheduler: SCHED1 would
        // make sh sh-fallback and show as (flag-1) on rr in `ipvsadm -Ln`.
        for scheduler in ["rr", "wrr", "lc", "wlc", "sh", "sed", "nq"] {
            let p = IpvsParams { scheduler: scheduler.into(), mh_fallback: true, mh_port: true, ..IpvsParams::default() };
            let s = service_of(&spec(p, None));
            assert_eq!((s.scheduler.as_str(), s.flags), (scheduler, 0));
        }
    }

    #[test]
    fn owned_keys_round_trip_through_the_state_file_format() {
        let keys = [
            ServiceKey::Inet { addr: "2001:db8::1".parse().unwrap(), protocol: ipvs::Protocol::Udp, port: 53 },
            ServiceKey::Fwmark { family: Family::V6, mark: 9 },
        ];
        for key in keys {
            let json = serde_json::to_string(&OwnedKey::from(&key)).unwrap();
            assert_eq!(serde_json::from_str::<OwnedKey>(&json).unwrap().key(), Some(key));
        }
    }

    /// A kernel's IPVS in memory, answering like the real one (EEXIST, ESRCH), recording every
    /// write; `fail` makes the first write whose record starts with it fail with EINVAL.
    #[derive(Default)]
    struct FakeKernel {
        services: BTreeMap<ServiceKey, (Service, Vec<Destination>)>,
        writes: Vec<String>,
        fail: Option<String>,
        /// A state file to read at each `add_service`, into `owned_at_add`.
        watch: Option<PathBuf>,
        owned_at_add: Vec<BTreeSet<ServiceKey>>,
    }

    impl FakeKernel {
        fn write(&mut self, record: String) -> Result<(), IpvsError> {
            if self.fail.as_ref().is_some_and(|f| record.starts_with(f.as_str())) {
                self.fail = None;
                let source = std::io::Error::from_raw_os_error(libc::EINVAL);
                return Err(IpvsError::Kernel { what: record, source });
            }
            self.writes.push(record);
            Ok(())
        }

        fn get(&mut self, key: &ServiceKey) -> Result<&mut (Service, Vec<Destination>), IpvsError> {
            self.services.get_mut(key).ok_or_else(|| IpvsError::NotFound { what: format!("virtual service {key}") })
        }

        /// Whether service `key` has the real server; `Err` as [`Self::get`]. What the kernel
        /// answers otherwise: EEXIST to adding one it has, ENOENT to editing or removing one it
        /// lacks.
        fn holds(&mut self, key: &ServiceKey, addr: IpAddr, port: u16) -> Result<bool, IpvsError> {
            Ok(self.get(key)?.1.iter().any(|h| h.addr == addr && h.port == port))
        }

        fn real_server(key: &ServiceKey, addr: IpAddr, port: u16) -> String {
            format!("real server {} of {key}", endpoint_key(addr, port))
        }
    }

    impl IpvsOps for FakeKernel {
        fn services(&mut self) -> Result<Vec<Service>, IpvsError> {
            Ok(self.services.values().map(|(s, _)| s.clone()).collect())
        }
        fn destinations(&mut self, key: &ServiceKey) -> Result<Vec<Destination>, IpvsError> {
            Ok(self.get(key)?.1.clone())
        }
        fn add_service(&mut self, s: &Service) -> Result<(), IpvsError> {
            if let Some(path) = &self.watch {
                self.owned_at_add.push(read_owned(path));
            }
            if self.services.contains_key(&s.key) {
                return Err(IpvsError::Exists { what: format!("virtual service {}", s.key) });
            }
            self.write(format!("-A {s}"))?;
            self.services.insert(s.key.clone(), (s.clone(), Vec::new()));
            Ok(())
        }
        fn edit_service(&mut self, s: &Service) -> Result<(), IpvsError> {
            self.get(&s.key)?;
            self.write(format!("-E {s}"))?;
            self.get(&s.key)?.0 = s.clone();
            Ok(())
        }
        fn del_service(&mut self, key: &ServiceKey) -> Result<(), IpvsError> {
            self.get(key)?;
            self.write(format!("-D {key}"))?;
            self.services.remove(key);
            Ok(())
        }
        fn add_destination(&mut self, key: &ServiceKey, d: &Destination) -> Result<(), IpvsError> {
            if self.holds(key, d.addr, d.port)? {
                return Err(IpvsError::Exists { what: Self::real_server(key, d.addr, d.port) });
            }
            self.write(format!("-a {key} -r {}", endpoint_key(d.addr, d.port)))?;
            self.get(key)?.1.push(d.clone());
            Ok(())
        }
        fn edit_destination(&mut self, key: &ServiceKey, d: &Destination) -> Result<(), IpvsError> {
            if !self.holds(key, d.addr, d.port)? {
                return Err(IpvsError::NotFound { what: Self::real_server(key, d.addr, d.port) });
            }
            self.write(format!("-e {key} -r {}", endpoint_key(d.addr, d.port)))?;
            for h in self.get(key)?.1.iter_mut().filter(|h| h.addr == d.addr && h.port == d.port) {
                *h = d.clone();
            }
            Ok(())
        }
        fn del_destination(&mut self, key: &ServiceKey, addr: IpAddr, port: u16) -> Result<(), IpvsError> {
            if !self.holds(key, addr, port)? {
                return Err(IpvsError::NotFound { what: Self::real_server(key, addr, port) });
            }
            self.write(format!("-d {key} -r {}", endpoint_key(addr, port)))?;
            self.get(key)?.1.retain(|h| !(h.addr == addr && h.port == port));
            Ok(())
        }
    }

    /// A state file of this test's own, removed when dropped.
    struct StateDir(PathBuf);

    impl StateDir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("lbd-ipvs-dp-{}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            StateDir(dir)
        }
        fn file(&self) -> PathBuf {
            self.0.join("lbd.ipvs-owned.json")
        }
        fn dataplane(&self, kernel: FakeKernel) -> IpvsDataplane<FakeKernel> {
            IpvsDataplane::with_client(kernel, self.file())
        }
        /// The services the state file lists.
        fn owned(&self) -> BTreeSet<ServiceKey> {
            read_owned(&self.file())
        }
    }

    impl Drop for StateDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn backend(addr: &str, port: u16) -> BackendSpec {
        BackendSpec { addr: addr.parse().unwrap(), port, weight: 1, mac: None, ifindex: 1, src_mac: [0; 6] }
    }

    /// An enabled TCP virtual server with real servers, default (maglev, DSR) IPVS settings.
    fn vs(addr: &str, port: u16, backends: &[&str]) -> ServiceSpec {
        let vip = VipAddr::new(addr.parse().unwrap(), port, Protocol::Tcp);
        ServiceSpec::new(vip, backends.iter().map(|b| backend(b, port)).collect())
    }

    fn key(addr: &str, port: u16) -> ServiceKey {
        ServiceKey::Inet { addr: addr.parse().unwrap(), protocol: ipvs::Protocol::Tcp, port }
    }

    fn error(r: Result<(), DataplaneError>) -> String {
        r.expect_err("apply must fail").to_string()
    }

    #[test]
    fn port_zero_needs_persistence_and_is_refused_before_any_change() {
        let dir = StateDir::new("port0");
        let mut dp = dir.dataplane(FakeKernel::default());
        let web = vs("10.0.0.2", 80, &["10.0.0.11"]);
        let all_ports = vs("10.0.0.1", 0, &["10.0.0.11"]);
        assert_eq!(
            error(dp.apply(&[web.clone(), all_ports.clone()])),
            "virtual server TCP 10.0.0.1:0: IPVS forwards port 0 (every port) only for a persistent service \
             (ipvsadm refuses it too): give it a port, or persistence (mode = \"ipvs\")"
        );
        assert_eq!(dp.client.writes, Vec::<String>::new(), "nothing written, not even the valid service");
        assert!(!dir.file().exists());

        // Persistent, or a firewall-mark service (which has no port): accepted.
        let mut persistent = all_ports.clone();
        persistent.ipvs.persistence = Some(Persistence { timeout_secs: 300, prefix_len: 32 });
        let mut fwmark = vs("0.0.0.0", 0, &["10.0.0.12"]);
        fwmark.vip.fwmark = Some(5);
        dp.apply(&[web, persistent, fwmark]).unwrap();
        assert_eq!(dp.client.services.len(), 3);
    }

    #[test]
    fn real_server_of_the_other_family_needs_tunnel_and_is_refused_before_any_change() {
        let dir = StateDir::new("family");
        let mut dp = dir.dataplane(FakeKernel::default());
        let mixed = vs("10.0.0.1", 80, &["10.0.0.11", "fd00::12"]);
        assert_eq!(
            error(dp.apply(&[vs("10.0.0.2", 80, &["10.0.0.11"]), mixed.clone()])),
            "virtual server TCP 10.0.0.1:80: real server fd00::12 is IPv6, the virtual server IPv4: IPVS mixes \
             address families only with forwarding = \"tunnel\""
        );
        assert_eq!(dp.client.writes, Vec::<String>::new());

        let mut tunnelled = mixed;
        tunnelled.ipvs.forwarding = Forwarding::Tunnel;
        dp.apply(&[tunnelled]).unwrap();
        assert_eq!(
            dp.client.writes,
            ["-A TCP  10.0.0.1:80 mh", "-a TCP  10.0.0.1:80 -r 10.0.0.11:80", "-a TCP  10.0.0.1:80 -r [fd00::12]:80"]
        );
    }

    #[test]
    fn services_created_by_a_failed_apply_are_in_the_state_file() {
        let dir = StateDir::new("partial");
        let kernel = FakeKernel { fail: Some("-a TCP  10.0.0.2:80".into()), ..FakeKernel::default() };
        let mut dp = dir.dataplane(kernel);
        let (a, b) = (vs("10.0.0.1", 80, &["10.0.0.11"]), vs("10.0.0.2", 80, &["10.0.0.12"]));
        let e = error(dp.apply(&[a.clone(), b.clone()]));
        assert!(e.starts_with("-a TCP  10.0.0.2:80 -r 10.0.0.12:80: "), "{e}");
        // Both services exist now (the second without its real server), and the file says so;
        // `stats` counts both (it reports the kernel's services that `vips` names).
        assert_eq!(dp.client.services.len(), 2);
        assert_eq!(dir.owned(), [key("10.0.0.1", 80), key("10.0.0.2", 80)].into());
        assert_eq!(dp.vips, [(key("10.0.0.1", 80), a.vip), (key("10.0.0.2", 80), b.vip)].into());

        // A later lbd (restarted after the failure) reads them as its own: it completes the second
        // and deletes both when the config no longer has them.
        let kernel = std::mem::take(&mut dp.client);
        let mut dp = dir.dataplane(kernel);
        dp.apply(&[a, b]).unwrap();
        assert_eq!(dp.client.services[&key("10.0.0.2", 80)].1.len(), 1);
        dp.apply(&[]).unwrap();
        assert!(dp.client.services.is_empty());
        assert_eq!(dir.owned(), BTreeSet::new());
        assert!(dp.vips.is_empty());
    }

    #[test]
    fn retiring_deletes_lbds_services_only_and_the_state_file() {
        let dir = StateDir::new("retire");
        let mut dp = dir.dataplane(FakeKernel::default());
        let mut disabled = vs("10.0.0.3", 80, &["10.0.0.13"]);
        disabled.enabled = false;
        dp.apply(&[vs("10.0.0.1", 80, &["10.0.0.11"]), vs("fd00::1", 443, &["fd00::11"]), disabled]).unwrap();
        let mut kernel = std::mem::take(&mut dp.client);
        let by_hand = service_of(&vs("10.0.0.2", 80, &[]));
        kernel.add_service(&by_hand).unwrap();
        kernel.writes.clear();

        // The next lbd, in XDP mode, knows them from the state file only.
        let mut dp = dir.dataplane(kernel);
        assert_eq!(dp.retire_owned().unwrap(), ["TCP 10.0.0.1:80", "TCP [fd00::1]:443"]);
        assert_eq!(dp.client.writes, ["-D TCP  10.0.0.1:80", "-D TCP  [fd00::1]:443"]);
        assert_eq!(dp.client.services.keys().collect::<Vec<_>>(), [&by_hand.key], "the hand-made one stays");
        assert!(!dir.file().exists(), "the state file goes with the services");
    }

    #[test]
    fn a_failed_apply_that_created_nothing_lists_nothing() {
        let dir = StateDir::new("nochange");
        let kernel = FakeKernel { fail: Some("-A".into()), ..FakeKernel::default() };
        let mut dp = dir.dataplane(kernel);
        assert!(error(dp.apply(&[vs("10.0.0.1", 80, &[])])).starts_with("-A TCP  10.0.0.1:80 mh: "));
        // Listed while it was being created, and no longer.
        assert_eq!(dir.owned(), BTreeSet::new());
    }

    /// An operator's `ipvsadm -A -t 10.0.0.1:80 -s rr` + `ipvsadm -a -t 10.0.0.1:80 -r 10.0.0.99 -g`.
    fn hand_made() -> FakeKernel {
        let mut kernel = FakeKernel::default();
        let k = key("10.0.0.1", 80);
        let dest = Destination::new("10.0.0.99".parse().unwrap(), 80, ipvs::Forwarding::DirectRoute, 1);
        kernel.services.insert(k.clone(), (Service::new(k, "rr"), vec![dest]));
        kernel
    }

    #[test]
    fn a_hand_made_service_with_a_configured_key_is_refused_and_left_alone() {
        let dir = StateDir::new("foreign");
        let mut dp = dir.dataplane(hand_made());
        let before = dp.client.services.clone();
        let config = [vs("10.0.0.2", 80, &["10.0.0.12"]), vs("10.0.0.1", 80, &["10.0.0.11"])];
        let expected = format!(
            "IPVS already has TCP 10.0.0.1:80, a virtual service lbd did not create (not in {}), and lbd does not \
             take over services made by hand: delete it (ipvsadm -D -t 10.0.0.1:80) or remove it from the config. \
             If an earlier lbd created it and that state file was lost, deleting it lets lbd create it again \
             (its open connections are lost)",
            dir.file().display()
        );
        assert_eq!(error(dp.apply(&config)), expected);
        assert_eq!(dp.client.writes, Vec::<String>::new(), "nothing written, not even the other service");
        assert_eq!(dp.client.services, before);
        assert!(!dir.file().exists());

        // Also while the virtual server is not carried (a VRRP backup): it would be refused the
        // moment it is.
        let mut backup = config.clone();
        backup[1].enabled = false;
        assert_eq!(error(dp.apply(&backup)), expected);
        // Several are named together.
        let mut kernel = std::mem::take(&mut dp.client);
        let udp = ServiceKey::Inet { addr: "fd00::1".parse().unwrap(), protocol: ipvs::Protocol::Udp, port: 53 };
        let mark = ServiceKey::Fwmark { family: Family::V6, mark: 5 };
        for k in [udp, mark] {
            kernel.services.insert(k.clone(), (Service::new(k, "rr"), vec![]));
        }
        let mut dp = dir.dataplane(kernel);
        let dns = ServiceSpec::new(VipAddr::new("fd00::1".parse().unwrap(), 53, Protocol::Udp), vec![]);
        let mut fwm = vs("::", 0, &[]);
        fwm.vip.fwmark = Some(5);
        let e = error(dp.apply(&[config[1].clone(), dns, fwm]));
        assert!(
            e.starts_with("IPVS already has TCP 10.0.0.1:80, UDP [fd00::1]:53, FWM 5 IPv6, virtual services lbd did not create"),
            "{e}"
        );
        assert!(
            e.contains("delete them (ipvsadm -D -t 10.0.0.1:80; ipvsadm -D -u [fd00::1]:53; ipvsadm -D -6 -f 5) or remove them"),
            "{e}"
        );

        // Without it in the config, lbd works beside it and never touches it.
        let mut dp = dir.dataplane(hand_made());
        dp.apply(&config[..1]).unwrap();
        dp.apply(&[]).unwrap();
        assert_eq!(dp.client.services, before);
    }

    #[test]
    fn its_own_services_are_recognised_after_a_restart_but_not_without_the_state_file() {
        let dir = StateDir::new("restart");
        let config = [vs("10.0.0.1", 80, &["10.0.0.11"])];
        let mut dp = dir.dataplane(FakeKernel::default());
        dp.apply(&config).unwrap();
        // A restart reads the state file: its service is its own, nothing changes.
        let kernel = FakeKernel { writes: vec![], ..std::mem::take(&mut dp.client) };
        let mut dp = dir.dataplane(kernel);
        dp.apply(&config).unwrap();
        assert_eq!(dp.client.writes, Vec::<String>::new());
        // The state file lost: lbd's own service looks hand-made, and the error says what to do.
        std::fs::remove_file(dir.file()).unwrap();
        let mut dp = dir.dataplane(std::mem::take(&mut dp.client));
        let e = error(dp.apply(&config));
        assert!(e.starts_with("IPVS already has TCP 10.0.0.1:80, a virtual service lbd did not create"), "{e}");
        assert!(e.contains("If an earlier lbd created it and that state file was lost, deleting it lets lbd create it again"), "{e}");
    }

    /// A service lbd creates is in its state file before it is in the kernel: killed in between,
    /// the next lbd must not find its own service unlisted (and refuse to start).
    #[test]
    fn a_service_is_in_the_state_file_before_it_is_created() {
        let dir = StateDir::new("before");
        let config = [vs("10.0.0.1", 80, &["10.0.0.11"])];
        let mut dp = dir.dataplane(FakeKernel { watch: Some(dir.file()), ..Default::default() });
        dp.apply(&config).unwrap();
        let key = service_of(&config[0]).key;
        assert_eq!(dp.client.owned_at_add, vec![BTreeSet::from([key])]);
    }

    /// A state file that cannot be written refuses the apply before the service is created, and
    /// the next apply records it first again.
    #[test]
    fn a_service_not_recorded_is_recorded_at_the_next_apply() {
        let dir = StateDir::new("unrecorded");
        // A file where the state file's directory should be: writing it fails.
        std::fs::write(&dir.0, b"").unwrap();
        let config = [vs("10.0.0.1", 80, &["10.0.0.11"])];
        let mut dp = dir.dataplane(FakeKernel { watch: Some(dir.file()), ..Default::default() });
        let e = error(dp.apply(&config));
        assert!(e.starts_with(&format!("writing {}", dir.file().display())), "{e}");
        assert!(dp.client.services.is_empty(), "created without being recorded");
        std::fs::remove_file(&dir.0).unwrap();
        dp.apply(&config).unwrap();
        let key = service_of(&config[0]).key;
        assert_eq!(dp.client.owned_at_add, vec![BTreeSet::from([key])]);
    }

    /// The fake answers as the kernel does a real server added twice, or edited or removed
    /// without being there.
    #[test]
    fn the_fake_kernel_refuses_what_the_kernel_refuses() {
        let mut k = FakeKernel::default();
        let config = [vs("10.0.0.1", 80, &["10.0.0.11"])];
        let svc = service_of(&config[0]);
        k.add_service(&svc).unwrap();
        let d = Destination::new("10.0.0.11".parse().unwrap(), 80, ipvs::Forwarding::DirectRoute, 1);
        assert!(matches!(k.edit_destination(&svc.key, &d), Err(IpvsError::NotFound { .. })));
        assert!(matches!(k.del_destination(&svc.key, d.addr, d.port), Err(IpvsError::NotFound { .. })));
        k.add_destination(&svc.key, &d).unwrap();
        assert!(matches!(k.add_destination(&svc.key, &d), Err(IpvsError::Exists { .. })));
        k.edit_destination(&svc.key, &d).unwrap();
        k.del_destination(&svc.key, d.addr, d.port).unwrap();
    }

    /// Thresholds set by hand on a real server lbd owns (`ipvsadm -e ... -x 1`) are cleared, like
    /// a weight changed by hand: lbd's config has none.
    #[test]
    fn thresholds_set_by_hand_are_cleared() {
        let dir = StateDir::new("thresholds");
        let config = [vs("10.0.0.1", 80, &["10.0.0.11"])];
        let mut dp = dir.dataplane(FakeKernel::default());
        dp.apply(&config).unwrap();
        let key = service_of(&config[0]).key;
        dp.client.services.get_mut(&key).unwrap().1[0].upper_threshold = 1;
        dp.client.writes.clear();
        dp.apply(&config).unwrap();
        assert_eq!(dp.client.writes, [format!("-e {key} -r 10.0.0.11:80")]);
        assert_eq!(dp.client.services[&key].1[0].upper_threshold, 0);
    }
}
