//! The controller: it owns the authoritative state (config + resolved MACs), derives the desired
//! dataplane state from it and pushes it through the `Dataplane` trait; and the `lbd run` loop
//! around it (signals, neighbour events, control socket).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::Context as _;
use sd_notify::NotifyState;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, watch, Mutex},
};
use tracing::{debug, error, info, warn};

use crate::{
    config::{Config, Director, Mode, Protocol, XdpMode},
    control::{self, BackendSelector, Request, Response, Selection, VsName},
    dataplane::{endpoint_key, BackendSpec, Dataplane, DataplaneStats, IpvsParams, ServiceSpec, VipAddr},
    health::{
        config::Via,
        scheduler::Checkpoint,
        state::{live_weight, table_weight},
        CheckConfig, CheckKey, HealthEvent, ProbeTarget, Quorum, QuorumChange, Scheduler, SchedulerOptions, VipPath,
    },
    links::{LinkWatcher, Links},
    neigh::{Mac, NeighEvent, NeighKey, Resolver, RouteTo},
    status::{format_mac, HealthStatus, RealServerStatus, ReasonStatus, Status, TrafficStatus, VirtualServerStatus},
    ipvs_dataplane::IpvsDataplane,
    vrrp::{VrrpHandle, VrrpSpec, VrrpState},
    xdp::{XdpDataplane, XdpOptions},
};

/// An interface backends are reached through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceInfo {
    pub ifindex: u32,
    pub mac: Mac,
}

/// Looks an interface up by name in `links` (ifindex and MAC from rtnetlink, not `/sys/class/net`,
/// which shows the interfaces of the network namespace `/sys` was mounted in: not lbd's under
/// `nsenter --net`).
fn lookup_iface(links: &crate::links::Links, name: &str) -> anyhow::Result<IfaceInfo> {
    let link = links.get(name).with_context(|| format!("interface {name} not found"))?;
    let mac = link.mac.with_context(|| format!("interface {name} has no Ethernet address"))?;
    Ok(IfaceInfo { ifindex: link.ifindex, mac })
}

pub struct Controller {
    config: Config,
    config_path: PathBuf,
    dataplane: Box<dyn Dataplane>,
    ifaces: HashMap<String, IfaceInfo>,
    /// Last known MAC per backend address; kept when the kernel forgets the entry (the XDP path
    /// bypasses the kernel, so its neighbour entries go stale and get collected).
    macs: HashMap<NeighKey, Mac>,
    /// What is wrong with a backend's neighbour entry, for `lbd status`: it was lost (lbd still
    /// forwards to its last MAC) or never resolved. Until it resolves again.
    neigh_problems: HashMap<NeighKey, String>,
    /// Real servers drained from the CLI: weight 0 until enabled or a config change
    /// to them.
    drained: BTreeSet<(VipAddr, String)>,
    /// Until [`Self::go_live`]: the real servers the fast path an earlier lbd kept serves
    /// ([`Dataplane::kept_real_servers`]). Their checks start up even with `alpha` (see
    /// [`Self::check_configs`]).
    kept_up: HashSet<(VipAddr, String)>,
    started: Instant,
    /// What `lbd status` says about the dataplane ("native XDP on eth0", "IPVS 1.2.1").
    description: String,
    xdp_mode: &'static str,
    /// The health checks, once [`Self::start_health`] ran (inside the tokio runtime). Until then
    /// every real server counts as up.
    health: Option<Scheduler>,
    /// Quorum state per virtual server (kept across reloads for the ones that stay).
    quorums: HashMap<VipAddr, Quorum>,
    /// Quorum changes not yet announced (log line, `quorum_up`/`quorum_down`): announced once
    /// the update that found them was tried on the dataplane, dropped if it was a reload that
    /// the dataplane refused (whose quorums are put back).
    quorum_news: Vec<QuorumNews>,
    /// The addresses of the interfaces real servers are reached through (see
    /// [`Self::probe_source`]).
    addresses: HashMap<String, Vec<IpAddr>>,
    /// The virtual addresses VRRP says are ours (their instance is MASTER), as last synced
    /// from the running [`VrrpHandle`] (see [`Controller::set_vrrp_owned`]).
    vrrp_owned: HashSet<IpAddr>,
    /// Per virtual server and real server of `config`, the key of its check (`None` without
    /// one): formatted once per config rather than on every update (10,000 of them took
    /// milliseconds each time).
    check_keys: Vec<Vec<Option<CheckKey>>>,
    /// What the last successful [`Self::apply`] programmed (in config order), so that a health
    /// event recomputes only its virtual server; `None` after a failed one.
    applied: Option<Vec<ServiceSpec>>,
    /// Where the drains and the real servers that are down are kept for the next lbd (see
    /// [`Held`]), and what was last written there.
    held_file: Option<(PathBuf, Vec<u8>)>,
    /// Until the checks start: the checks the state file says were down when lbd stopped.
    was_down: HashSet<CheckKey>,
}

/// What a restart must not lose that the dataplane does not keep: the drains (`lbd backend
/// drain`) and the real servers whose checks had them down. In a file beside the control socket
/// (`lbd.held.json`), written whenever it changes; `/run` is emptied at boot, and so are they.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Held {
    /// A drain holds again if its real server's configured weight is the same.
    drained: Vec<HeldServer>,
    /// Their checks start down until their first pass.
    down: Vec<HeldServer>,
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct HeldServer {
    /// As [`VipAddr`] writes it: "TCP 10.0.0.100:80".
    virtual_server: String,
    real_server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
}

/// The file [`Held`] is kept in for `control_socket`.
pub fn held_file_for(control_socket: &Path) -> PathBuf {
    control_socket.with_extension("held.json")
}

/// The state a reload replaces: taken by [`Controller::snapshot`], put back by
/// [`Controller::restore`] when the reload is refused or undone.
pub struct Snapshot {
    config: Config,
    check_keys: Vec<Vec<Option<CheckKey>>>,
    ifaces: HashMap<String, IfaceInfo>,
    drained: BTreeSet<(VipAddr, String)>,
    /// The checks' states (`None` before the checks start).
    checks: Option<Checkpoint>,
    quorums: HashMap<VipAddr, Quorum>,
}

/// [`Controller::check_keys`] for `config`.
fn check_keys(config: &Config) -> Vec<Vec<Option<CheckKey>>> {
    config
        .virtual_servers
        .iter()
        .map(|vs| {
            let vip = VipAddr::of(vs);
            vs.real_servers.iter().map(|rs| rs.health_check.as_ref().map(|_| check_key(vip, rs))).collect()
        })
        .collect()
}

impl Controller {
    /// `ifaces` must hold every interface the config names.
    pub fn new(config: Config, config_path: PathBuf, dataplane: Box<dyn Dataplane>, ifaces: HashMap<String, IfaceInfo>) -> Self {
        Self {
            kept_up: dataplane.kept_real_servers().into_iter().collect(),
            check_keys: check_keys(&config),
            config,
            config_path,
            dataplane,
            ifaces,
            macs: HashMap::new(),
            neigh_problems: HashMap::new(),
            drained: BTreeSet::new(),
            started: Instant::now(),
            description: String::new(),
            xdp_mode: "",
            health: None,
            quorums: HashMap::new(),
            quorum_news: Vec::new(),
            held_file: None,
            was_down: HashSet::new(),
            addresses: HashMap::new(),
            vrrp_owned: HashSet::new(),
            applied: None,
        }
    }

    /// Tells the controller the interfaces' addresses (see [`interface_addresses`]); call
    /// [`Self::sync_checks`] after.
    pub fn set_addresses(&mut self, addresses: HashMap<String, Vec<IpAddr>>) {
        self.addresses = addresses;
    }

    /// The source address of checks of `real` through `iface`: the kernel's choice, unless the
    /// interface holds a VIP of that family. The kernel may then pick the VIP (IPv6 prefers the
    /// longest matching prefix) and the real server, which holds the VIP too, answers itself:
    /// probes then leave from the interface's first own (non-VIP, not link-local) address.
    fn probe_source(&self, iface: &str, real: IpAddr) -> Option<IpAddr> {
        let addrs = self.addresses.get(iface)?;
        let vips: BTreeSet<IpAddr> = self.config.virtual_servers.iter().map(|vs| vs.address).collect();
        let same_family = |a: &&IpAddr| a.is_ipv4() == real.is_ipv4();
        if !addrs.iter().filter(same_family).any(|a| vips.contains(a)) {
            return None;
        }
        addrs.iter().filter(same_family).find(|a| !vips.contains(a) && !is_link_local(a)).copied()
    }

    /// Starts the health checks (with `scheduler`, which sends its events to the run loop) and
    /// takes their initial state (`alpha` real servers start down).
    pub fn start_health(&mut self, scheduler: Scheduler) {
        self.health = Some(scheduler);
        self.sync_checks();
        // Those checks started down; from now on the file follows the checks.
        self.was_down.clear();
    }

    /// Keeps the drains and the real servers that are down in `path` from now on, taking back
    /// first what an earlier lbd left there: its drains of real servers the config still has
    /// with the same weight, and its down real servers, whose checks start down (before
    /// [`Self::start_health`]). A file that cannot be read is logged and replaced.
    pub fn hold_state_in(&mut self, path: PathBuf) {
        let read = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Held::default()),
            read => read.map_err(|e| e.to_string()).and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string())),
        };
        let held = read.unwrap_or_else(|e| {
            warn!(file = %path.display(), "the drains and down real servers an earlier lbd kept cannot be read ({e}); starting without them");
            Held::default()
        });
        let mut drained = 0;
        let mut down = 0;
        for (i, vs) in self.config.virtual_servers.iter().enumerate() {
            let vip = VipAddr::of(vs);
            let name = vip.to_string();
            for (rs, key) in vs.real_servers.iter().zip(&self.check_keys[i]) {
                let rs_name = rs_key(rs);
                let is = |h: &HeldServer| h.virtual_server == name && h.real_server == rs_name;
                if held.drained.iter().any(|h| is(h) && h.weight == Some(rs.weight)) {
                    self.drained.insert((vip, rs_name.clone()));
                    drained += 1;
                }
                if let Some(key) = key.as_ref().filter(|_| held.down.iter().any(is)) {
                    self.was_down.insert(key.clone());
                    down += 1;
                }
            }
        }
        if drained + down > 0 {
            use crate::status::count;
            info!(
                file = %path.display(),
                "as the lbd before: {} drained, {} down until its check passes",
                count(drained, "real server"),
                count(down, "real server")
            );
        }
        self.held_file = Some((path, Vec::new()));
    }

    /// Writes [`Held`] if it changed (see [`Self::hold_state_in`]).
    fn save_held(&mut self) {
        let Some((path, written)) = &self.held_file else { return };
        let mut held = Held::default();
        for (i, vs) in self.config.virtual_servers.iter().enumerate() {
            let vip = VipAddr::of(vs);
            for (rs, key) in vs.real_servers.iter().zip(&self.check_keys[i]) {
                let server = |weight| HeldServer { virtual_server: vip.to_string(), real_server: rs_key(rs), weight };
                if !self.drained.is_empty() && self.drained.contains(&(vip, rs_key(rs))) {
                    held.drained.push(server(Some(rs.weight)));
                }
                let down = match (&self.health, key) {
                    (Some(scheduler), Some(key)) => scheduler.health(key).is_some_and(|(up, _)| !up),
                    (None, Some(key)) => self.was_down.contains(key),
                    _ => false,
                };
                if down {
                    held.down.push(server(None));
                }
            }
        }
        let bytes = serde_json::to_vec(&held).expect("serializes");
        if bytes == *written {
            return;
        }
        let path = path.clone();
        match crate::keep::replace_file(&path, &bytes) {
            Ok(()) => self.held_file = Some((path, bytes)),
            Err(e) => warn!(file = %path.display(), "keeping the drains and down real servers for a restart: {e}"),
        }
    }

    /// Makes the running checks those the config and the resolved MACs call for: new ones
    /// start, removed ones stop, unchanged ones go on with their state.
    pub fn sync_checks(&mut self) {
        // New checks start in their own state: the next update recomputes everything.
        self.applied = None;
        let checks = self.check_configs();
        if let Some(scheduler) = &mut self.health {
            scheduler.set(checks);
        }
    }

    /// One check per real server that has a `health_check`.
    pub fn check_configs(&self) -> Vec<CheckConfig> {
        let mut out = Vec::new();
        for vs in &self.config.virtual_servers {
            let vip = VipAddr::of(vs);
            for rs in &vs.real_servers {
                let Some(check) = &rs.health_check else { continue };
                let iface = self.ifaces[self.iface_of(&rs.interface)];
                // The MAC only matters to `via = "vip"`; leaving it out elsewhere keeps a MAC
                // change from restarting the check.
                let dst_mac = (check.via == Via::Vip).then(|| self.mac_of(iface.ifindex, rs)).flatten();
                out.push(CheckConfig {
                    key: check_key(vip, rs),
                    check: check.clone(),
                    target: ProbeTarget {
                        addr: rs.address,
                        port: rs.port,
                        source: self.probe_source(self.iface_of(&rs.interface), rs.address),
                        vip: (vs.fwmark.is_none()).then_some(VipPath {
                            vip: vs.address,
                            ifindex: iface.ifindex,
                            src_mac: iface.mac,
                            dst_mac,
                        }),
                    },
                    // keepalived's `alpha` keeps an unchecked real server out of a fresh start.
                    // A take-over is no fresh start: the real servers the kept fast path serves
                    // (up when it stopped) stay up until a check says otherwise; down, they would
                    // empty their virtual servers until the first checks, which the warm-up
                    // spreads over the interval. Not with `inhibit_on_failure`, where the kept
                    // fast path also had the failed ones (at weight 0).
                    alpha: vs.alpha && (rs.inhibit_on_failure || !self.kept_up.contains(&(vip, rs_key(rs)))),
                    was_down: self.was_down.contains(&check_key(vip, rs)),
                    notify_up: rs.notify_up.clone(),
                    notify_down: rs.notify_down.clone(),
                });
            }
        }
        out
    }

    /// The health (real servers without a check, and every one before the checks start, are
    /// up) and table weight of the real servers of virtual server `i`: `None` = out of the
    /// table (failed its check), `Some(0)` = kept without new flows (drained, or failed with
    /// `inhibit_on_failure`). Runs on every update: no key is formatted unless a drain needs it.
    fn weights(&self, i: usize) -> Vec<(bool, Option<u32>)> {
        let vs = &self.config.virtual_servers[i];
        let vip = VipAddr::of(vs);
        vs.real_servers
            .iter()
            .zip(&self.check_keys[i])
            .map(|(rs, key)| {
                let (up, dynamic) = match (&self.health, key) {
                    (Some(scheduler), Some(key)) => scheduler.health(key).unwrap_or((true, None)),
                    _ => (true, None),
                };
                let weight = table_weight(up, rs.weight, dynamic, rs.inhibit_on_failure);
                let drained = !self.drained.is_empty() && self.drained.contains(&(vip, rs_key(rs)));
                (up, weight.map(|w| if drained { 0 } else { w }))
            })
            .collect()
    }

    /// Re-evaluates every virtual server's quorum (see [`Self::update_quorum`]).
    fn update_quorums(&mut self) {
        for i in 0..self.config.virtual_servers.len() {
            self.update_quorum(i);
        }
        let config = &self.config;
        self.quorums.retain(|vip, _| config.virtual_servers.iter().any(|vs| VipAddr::of(vs) == *vip));
    }

    /// Re-evaluates virtual server `i`'s quorum; logs a change once and runs its
    /// `quorum_up`/`quorum_down` command (detached).
    fn update_quorum(&mut self, i: usize) {
        let vs = &self.config.virtual_servers[i];
        let vip = VipAddr::of(vs);
        let live = self.live_weight(i);
        let quorum = self.quorums.entry(vip).or_insert_with(|| Quorum::new(vs.quorum, vs.hysteresis));
        quorum.set(vs.quorum, vs.hysteresis);
        let Some(change) = quorum.update(live) else { return };
        self.quorum_news(i, change, live);
    }

    /// Virtual server `i`'s live weight: what its quorum is judged by.
    fn live_weight(&self, i: usize) -> u64 {
        live_weight(self.weights(i).into_iter().map(|(up, w)| (up, w.unwrap_or(0))))
    }

    /// Queues virtual server `i`'s quorum `change` (at `live` weight) for [`Self::announce_quorums`].
    fn quorum_news(&mut self, i: usize, change: QuorumChange, live: u64) {
        let vs = &self.config.virtual_servers[i];
        let vip = VipAddr::of(vs);
        let (what, command) = match change {
            QuorumChange::Gained => ("gained", &vs.quorum_up),
            QuorumChange::Lost => ("lost", &vs.quorum_down),
        };
        let serving = match (change, vs.sorry_server) {
            (QuorumChange::Lost, Some(sorry)) => format!("; sorry server {sorry} serves"),
            (QuorumChange::Gained, Some(_)) => "; real servers serve again".to_string(),
            _ => String::new(),
        };
        self.quorum_news.push(QuorumNews {
            line: format!("{vip}: quorum {what} (live weight {live}, quorum {}, hysteresis {}){serving}", vs.quorum, vs.hysteresis),
            command: command.clone(),
            env: vec![
                ("LBD_VIRTUAL_SERVER".into(), vip.to_string()),
                ("LBD_QUORUM".into(), if change == QuorumChange::Gained { "up" } else { "down" }.into()),
            ],
        });
    }

    /// Logs the quorum changes found since the last time and runs their commands (detached).
    fn announce_quorums(&mut self) {
        for news in std::mem::take(&mut self.quorum_news) {
            warn!("{}", news.line);
            if let (Some(command), Some(scheduler)) = (&news.command, &self.health) {
                scheduler.notify(command, news.env);
            }
        }
    }

    fn serves_sorry(&self, vs: &crate::config::VirtualServer) -> bool {
        let has_quorum = self.quorums.get(&VipAddr::of(vs)).is_none_or(Quorum::has_quorum);
        !has_quorum && vs.sorry_server.is_some()
    }

    /// Health events from the checks (already logged by the scheduler; several when they arrived
    /// together): re-evaluates the quorum and the table of the virtual servers they name, and
    /// programs the dataplane. The others keep what the last `apply` gave them (whose inputs,
    /// other than health, have not changed since: every other change goes through `apply`).
    pub fn on_health<'a>(&mut self, events: impl IntoIterator<Item = &'a HealthEvent>) -> anyhow::Result<()> {
        let start = Instant::now();
        let names: HashSet<&str> = events.into_iter().map(|ev| ev.vip_key.as_str()).collect();
        let Some(mut desired) = self.applied.take() else {
            return self.apply();
        };
        let changed: Vec<usize> = (0..self.config.virtual_servers.len())
            .filter(|&i| names.contains(VipAddr::of(&self.config.virtual_servers[i]).to_string().as_str()))
            .collect();
        for &i in &changed {
            self.update_quorum(i);
            desired[i].backends = self.backends(i);
        }
        let applied = self.dataplane.apply(&desired).context("programming the dataplane");
        self.announce_quorums();
        applied?;
        self.applied = Some(desired);
        self.save_held();
        tracing::debug!(virtual_servers = ?names, "dataplane updated {:?} after the health change", start.elapsed());
        Ok(())
    }

    /// Whether the dataplane carries `vip`: always, unless a `[[vrrp_instance]]` lists it; then
    /// only while VRRP says it is ours. A backup drops the VIP's traffic (it must not forward
    /// what a split view sends it, or clients would get duplicates).
    pub fn vip_enabled(&self, vip: IpAddr) -> bool {
        !self.config.vrrp.covers(vip) || self.vrrp_owned.contains(&vip)
    }

    /// Records which virtual addresses VRRP says are ours; true (after one log line per
    /// virtual server that changes) when the dataplane must be applied again.
    pub fn set_vrrp_owned(&mut self, owned: HashSet<IpAddr>) -> bool {
        if owned == self.vrrp_owned {
            return false;
        }
        let before: Vec<bool> = self.config.virtual_servers.iter().map(|vs| self.vip_enabled(vs.address)).collect();
        self.vrrp_owned = owned;
        for (vs, was) in self.config.virtual_servers.iter().zip(before) {
            let now = self.vip_enabled(vs.address);
            if now != was {
                let what = if now { "carried: VRRP master" } else { "dropped: VRRP backup (not master)" };
                info!(virtual_server = %VipAddr::of(vs), "virtual server {what}");
            }
        }
        true
    }

    /// Sets what `lbd status` says about the dataplane.
    pub fn describe(&mut self, description: String, xdp_mode: &'static str) {
        self.description = description;
        self.xdp_mode = xdp_mode;
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dataplane(&self) -> &dyn Dataplane {
        self.dataplane.as_ref()
    }

    /// See [`Dataplane::go_live`].
    pub fn go_live(&mut self) -> Result<(), crate::dataplane::DataplaneError> {
        // From now on `alpha` is the config's alone: a real server a reload adds starts down.
        // (The running checks go on: `alpha` only says how a check starts.)
        self.kept_up.clear();
        self.dataplane.go_live()
    }

    /// See [`crate::dataplane::Dataplane::taking_over`].
    pub fn taking_over(&self) -> bool {
        self.dataplane.taking_over()
    }

    /// Real servers (and sorry servers) whose MAC the dataplane needs and lbd does not know yet.
    pub fn unresolved(&self) -> Vec<NeighKey> {
        self.neigh_keys().into_iter().map(NeighKey::from).filter(|k| !self.macs.contains_key(k)).collect()
    }

    fn iface_of<'a>(&'a self, rs_iface: &'a Option<String>) -> &'a str {
        rs_iface.as_deref().unwrap_or(&self.config.director.interface)
    }

    /// Backends whose MAC must come from the neighbour table (no `mac` in the config).
    pub fn neigh_keys(&self) -> BTreeSet<NeighKeyOrd> {
        let mut keys = BTreeSet::new();
        let forwarding = self.dataplane.needs_macs();
        let director = self.ifaces[&self.config.director.interface].ifindex;
        for vs in &self.config.virtual_servers {
            // `via = "vip"` checks send frames to the real server's MAC, whatever the dataplane.
            let probed = |rs: &&crate::config::RealServer| rs.health_check.as_ref().is_some_and(|c| c.via == Via::Vip);
            for rs in vs.real_servers.iter().filter(|rs| rs.mac.is_none() && (forwarding || probed(rs))) {
                let ifindex = self.ifaces[self.iface_of(&rs.interface)].ifindex;
                keys.insert(NeighKeyOrd(ifindex, rs.address));
            }
            // Resolved ahead, so that losing quorum switches at once.
            if let (true, Some(sorry)) = (forwarding, vs.sorry_server) {
                keys.insert(NeighKeyOrd(director, sorry.ip()));
            }
        }
        keys
    }

    /// Records a neighbour event; true when a MAC the dataplane uses changed.
    pub fn on_neigh(&mut self, ev: &NeighEvent) -> bool {
        match ev {
            NeighEvent::Reachable { key, mac } => {
                self.neigh_problems.remove(key);
                self.macs.insert(*key, *mac) != Some(*mac)
            }
            // Keep forwarding with the last known MAC; the resolver asks the kernel again.
            NeighEvent::Gone { key } => {
                let problem = match self.macs.get(key) {
                    Some(mac) => format!("neighbour entry failed or deleted; still sending to {}", format_mac(mac)),
                    None => "neighbour entry failed or deleted".to_string(),
                };
                self.neigh_problems.insert(*key, problem);
                false
            }
            NeighEvent::Unresolved { key, route } => {
                let mut problem = unresolved_reason(*key, route, |i| self.iface_name(i));
                if let Some(mac) = self.macs.get(key) {
                    problem = format!("{problem}; still sending to {}", format_mac(mac));
                }
                self.neigh_problems.insert(*key, problem);
                false
            }
        }
    }

    /// The name of interface `ifindex`: one the config names, else the kernel's, else
    /// "ifindex N".
    fn iface_name(&self, ifindex: u32) -> String {
        let configured = self.ifaces.iter().filter(|(_, i)| i.ifindex == ifindex).map(|(name, _)| name).min();
        match configured {
            Some(name) => name.clone(),
            None => nix::net::if_::if_indextoname(ifindex)
                .ok()
                .and_then(|n| n.into_string().ok())
                .unwrap_or_else(|| format!("ifindex {ifindex}")),
        }
    }

    /// "real server" or "sorry server", for log lines about neighbour `key`.
    fn backend_kind(&self, key: &NeighKey) -> &'static str {
        let director = self.ifaces.get(&self.config.director.interface).map(|i| i.ifindex);
        let sorry = self.config.virtual_servers.iter().filter_map(|vs| vs.sorry_server).any(|s| s.ip() == key.addr);
        // The real servers (thousands, maybe) only for a sorry server's address.
        if sorry
            && director == Some(key.ifindex)
            && !self.config.virtual_servers.iter().flat_map(|vs| &vs.real_servers).any(|rs| rs.address == key.addr)
        {
            "sorry server"
        } else {
            "real server"
        }
    }

    /// Follows the kernel's interfaces (see [`crate::links`]): the dataplane attaches again to
    /// an interface that was created again, and the real servers behind an interface whose index
    /// or MAC changed are programmed with the new ones, keeping the MACs they had until their
    /// neighbour entries on the new interface say otherwise. An interface the config names that
    /// is gone keeps its last index until it is back. True if an interface the config names
    /// changed; call [`Self::set_addresses`] before, and follow [`Self::neigh_keys`] after.
    pub fn relink(&mut self, links: &Links) -> anyhow::Result<bool> {
        let mut moved = HashMap::new();
        for (name, iface) in &mut self.ifaces {
            let Some(now) = links.get(name).and_then(|l| Some(IfaceInfo { ifindex: l.ifindex, mac: l.mac? })) else {
                continue;
            };
            if now != *iface {
                info!(interface = %name, ifindex = now.ifindex, mac = %format_mac(&now.mac), "interface changed: its real servers follow it");
                moved.insert(iface.ifindex, now.ifindex);
                *iface = now;
            }
        }
        // Before the apply, so that real servers moved to a new interface find its TX_PORTS entry.
        let followed = self.dataplane.links_changed(links).context("following the interfaces");
        if moved.is_empty() {
            return followed.map(|()| false);
        }
        let carried: Vec<(NeighKey, Mac)> = self
            .macs
            .iter()
            .filter_map(|(k, mac)| moved.get(&k.ifindex).map(|&ifindex| (NeighKey { ifindex, addr: k.addr }, *mac)))
            .collect();
        self.macs.retain(|k, _| !moved.contains_key(&k.ifindex));
        self.macs.extend(carried);
        self.neigh_problems.retain(|k, _| !moved.contains_key(&k.ifindex));
        self.sync_checks();
        let applied = self.apply();
        followed.and(applied).map(|()| true)
    }

    fn mac_of(&self, ifindex: u32, rs: &crate::config::RealServer) -> Option<Mac> {
        rs.mac.or_else(|| self.macs.get(&NeighKey { ifindex, addr: rs.address }).copied())
    }

    /// The dataplane state the config, the resolved MACs, the health checks and the drains call
    /// for. Without quorum (and with a sorry server) a virtual server has the sorry server alone.
    pub fn desired(&self) -> Vec<ServiceSpec> {
        self.config
            .virtual_servers
            .iter()
            .enumerate()
            .map(|(i, vs)| ServiceSpec {
                vip: VipAddr::of(vs),
                enabled: self.vip_enabled(vs.address),
                ipvs: IpvsParams {
                    scheduler: vs.scheduler.clone(),
                    forwarding: vs.forwarding,
                    persistence: vs.persistence,
                    mh_fallback: vs.mh_fallback,
                    mh_port: vs.mh_port,
                },
                backends: self.backends(i),
            })
            .collect()
    }

    /// What a virtual server's table holds: its sorry server while it serves, else the real
    /// servers in the table.
    fn backends(&self, i: usize) -> Vec<BackendSpec> {
        let vs = &self.config.virtual_servers[i];
        if let (true, Some(sorry)) = (self.serves_sorry(vs), vs.sorry_server) {
            let iface = self.ifaces[&self.config.director.interface];
            return vec![BackendSpec {
                addr: sorry.ip(),
                port: sorry.port(),
                weight: 1,
                mac: self.macs.get(&NeighKey { ifindex: iface.ifindex, addr: sorry.ip() }).copied(),
                ifindex: iface.ifindex,
                src_mac: iface.mac,
            }];
        }
        vs.real_servers
            .iter()
            .zip(self.weights(i))
            .filter_map(|(rs, (_, weight))| {
                let iface = self.ifaces[self.iface_of(&rs.interface)];
                Some(BackendSpec {
                    addr: rs.address,
                    port: rs.port,
                    weight: weight?,
                    mac: self.mac_of(iface.ifindex, rs),
                    ifindex: iface.ifindex,
                    src_mac: iface.mac,
                })
            })
            .collect()
    }

    /// Drains (weight 0) or re-enables the real servers `sel` names; returns what it changed, e.g.
    /// `["TCP 10.0.0.1:80 -> 10.0.0.11:80"]`. Unknown names are an error listing what exists.
    pub fn set_drained(&mut self, sel: &BackendSelector, drain: bool) -> anyhow::Result<Vec<String>> {
        // `fwmark:N` names a firewall-mark virtual server (ipvsadm's `-f N`), else ADDR:PORT.
        let Selection { vip, backend: (addr, port), protocol } = sel.parse().map_err(anyhow::Error::msg)?;
        let mut hits = Vec::new();
        let mut known = Vec::new();
        for vs in self.config.virtual_servers.iter().filter(|vs| match vip {
            VsName::Mark { mark, ipv6 } => vs.fwmark == Some(mark) && ipv6.is_none_or(|v6| v6 == vs.address.is_ipv6()),
            VsName::Addr(vip) => {
                vs.fwmark.is_none()
                    && vs.address == vip.ip()
                    && vs.port == vip.port()
                    && protocol.is_none_or(|p| p == vs.protocol)
            }
        }) {
            let v = VipAddr::of(vs);
            for rs in &vs.real_servers {
                // Once each: the TCP and UDP virtual servers of an address list theirs alike.
                if !known.contains(&rs_key(rs)) {
                    known.push(rs_key(rs));
                }
                if rs.address == addr && port.is_none_or(|p| p == rs.port) {
                    hits.push((v, rs_key(rs)));
                }
            }
        }
        if hits.is_empty() {
            if known.is_empty() {
                match protocol {
                    Some(p) => anyhow::bail!("no {} virtual server {}", p.to_string().to_uppercase(), sel.vip),
                    None => anyhow::bail!("no virtual server {}", sel.vip),
                }
            }
            anyhow::bail!("no real server {} in virtual server {} (it has {})", sel.backend, sel.vip, known.join(", "));
        }
        let (old_drained, old_quorums) = (self.drained.clone(), self.quorums.clone());
        for hit in &hits {
            if drain {
                self.drained.insert(hit.clone());
            } else {
                self.drained.remove(hit);
            }
        }
        if let Err(e) = self.try_apply() {
            // Refused: the drain (or enable) did not happen. Kept, status and metrics would show
            // it and the next apply would carry it out though the command failed; its quorum
            // changes are not announced either (as with a refused reload).
            self.quorum_news.clear();
            self.drained = old_drained;
            self.quorums = old_quorums;
            let _ = self.apply();
            return Err(e);
        }
        self.announce_quorums();
        Ok(hits.iter().map(|(v, k)| format!("{v} -> {k}")).collect())
    }

    pub fn apply(&mut self) -> anyhow::Result<()> {
        let applied = self.try_apply();
        self.announce_quorums();
        applied
    }

    /// [`Self::apply`] without announcing the quorum changes it found.
    fn try_apply(&mut self) -> anyhow::Result<()> {
        self.update_quorums();
        let desired = self.desired();
        self.applied = None;
        self.dataplane.apply(&desired).context("programming the dataplane")?;
        self.applied = Some(desired);
        self.save_held();
        Ok(())
    }

    /// Replaces the config. Settings that size or place the dataplane need a restart: a config
    /// changing them is refused and the running state stays as it is. `ifaces` must cover the new
    /// config's interfaces.
    pub fn reload(&mut self, new: Config, ifaces: HashMap<String, IfaceInfo>) -> anyhow::Result<()> {
        restart_only_changes(&self.config.director, &new.director)?;
        let snapshot = self.snapshot();
        self.check_keys = check_keys(&new);
        self.config = new;
        self.ifaces = ifaces;
        // A drain lasts until the config changes that real server (or removes it).
        let weights = |c: &Config| -> HashMap<(VipAddr, String), u32> {
            c.virtual_servers
                .iter()
                .flat_map(|vs| {
                    let v = VipAddr::of(vs);
                    vs.real_servers.iter().map(move |rs| ((v, rs_key(rs)), rs.weight))
                })
                .collect()
        };
        let (before, after) = (weights(&snapshot.config), weights(&self.config));
        self.drained.retain(|k| after.get(k).is_some_and(|w| before.get(k) == Some(w)));
        // Checks that did not change go on with their state; new ones start (down with alpha).
        self.sync_checks();
        if let Err(e) = self.try_apply() {
            // The quorum changes the new config would have made are not announced either.
            self.quorum_news.clear();
            let _ = self.restore(snapshot, false);
            return Err(e);
        }
        self.announce_quorums();
        Ok(())
    }

    /// What [`Self::reload`] replaces, to put back with [`Self::restore`].
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            config: self.config.clone(),
            check_keys: self.check_keys.clone(),
            ifaces: self.ifaces.clone(),
            drained: self.drained.clone(),
            checks: self.health.as_ref().map(Scheduler::checkpoint),
            quorums: self.quorums.clone(),
        }
    }

    /// Puts back the state `snapshot` took and programs it (the dataplane switches tables
    /// atomically per VIP). The drains and the health of the checks and quorums that were
    /// dropped or changed since come back too: a reload of the old config instead would end
    /// the drains of the real servers the new one changed, and start the checks it dropped or
    /// changed over, up.
    ///
    /// `announced`: the quorum changes since the snapshot were announced (their commands ran), as
    /// after a reload that went through; each virtual server whose quorum the restored state
    /// holds otherwise then gets its change back announced, so that a `quorum_down` run for the
    /// reload is followed by the `quorum_up` of going back. Without, nothing since was announced.
    pub fn restore(&mut self, snapshot: Snapshot, announced: bool) -> anyhow::Result<()> {
        let before: HashMap<VipAddr, bool> = match announced {
            true => self.quorums.iter().map(|(vip, q)| (*vip, q.has_quorum())).collect(),
            false => HashMap::new(),
        };
        self.config = snapshot.config;
        self.check_keys = snapshot.check_keys;
        self.ifaces = snapshot.ifaces;
        self.drained = snapshot.drained;
        self.sync_checks();
        if let (Some(scheduler), Some(checks)) = (&mut self.health, snapshot.checks) {
            scheduler.restore(checks);
        }
        self.quorums = snapshot.quorums;
        for i in 0..self.config.virtual_servers.len() {
            let vip = VipAddr::of(&self.config.virtual_servers[i]);
            let (Some(&was), Some(now)) = (before.get(&vip), self.quorums.get(&vip).map(Quorum::has_quorum)) else {
                continue;
            };
            if was != now {
                let live = self.live_weight(i);
                self.quorum_news(i, if now { QuorumChange::Gained } else { QuorumChange::Lost }, live);
            }
        }
        self.apply()
    }

    pub fn status(&self, stats: &DataplaneStats) -> Status {
        let d = &self.config.director;
        let traffic = |t: crate::dataplane::Traffic| TrafficStatus { conns: t.new_flows, packets: t.packets, bytes: t.bytes };
        let table = d.table_size as f64;
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            config: self.config_path.display().to_string(),
            dataplane: self.dataplane.name().to_string(),
            interface: d.interface.clone(),
            xdp_mode: (!self.xdp_mode.is_empty()).then(|| self.xdp_mode.to_string()),
            description: self.description.clone(),
            problem: stats.problem.clone(),
            uptime_secs: self.started.elapsed().as_secs(),
            table_size: d.table_size,
            conntrack_entries: stats.connections,
            // The run loop adds the VRRP instances (`with_vrrp`).
            vrrp: Vec::new(),
            reasons: stats
                .reasons
                .iter()
                .map(|(reason, t)| ReasonStatus { reason: reason.clone(), packets: t.packets, bytes: t.bytes })
                .collect(),
            virtual_servers: self
                .desired()
                .iter()
                .zip(&self.config.virtual_servers)
                .enumerate()
                .map(|(i, (svc, vs))| VirtualServerStatus {
                    address: vs.address.to_string(),
                    port: vs.port,
                    fwmark: vs.fwmark,
                    // A mark selects TCP, UDP and SCTP alike (ipvsadm's `FWM`).
                    protocol: match (vs.fwmark, vs.protocol) {
                        (Some(_), _) => "fwmark",
                        (None, Protocol::Tcp) => "tcp",
                        (None, Protocol::Udp) => "udp",
                    }
                    .to_string(),
                    scheduler: vs.scheduler.clone(),
                    enabled: svc.enabled,
                    traffic: traffic(stats.vips.get(&svc.vip).copied().unwrap_or_default()),
                    quorum: self.quorums.get(&svc.vip).is_none_or(Quorum::has_quorum),
                    sorry_server: vs.sorry_server.map(|sorry| {
                        let serving = self.serves_sorry(vs);
                        let iface = self.ifaces[&self.config.director.interface];
                        let key = endpoint_key(sorry.ip(), sorry.port());
                        let st = stats.backends.get(&(svc.vip, key)).copied().unwrap_or_default();
                        RealServerStatus {
                            address: sorry.ip().to_string(),
                            port: sorry.port(),
                            weight: u32::from(serving),
                            state: if serving { "serving" } else { "standby" }.to_string(),
                            drained: false,
                            mac: self.macs.get(&NeighKey { ifindex: iface.ifindex, addr: sorry.ip() }).map(format_mac),
                            neighbour: self.neigh_problems.get(&NeighKey { ifindex: iface.ifindex, addr: sorry.ip() }).cloned(),
                            interface: self.config.director.interface.clone(),
                            slots: st.slots,
                            share_percent: st.slots.map(|s| (s as f64 * 1000.0 / table).round() / 10.0),
                            active_conns: st.connections.map(|c| c.0),
                            inactive_conns: st.connections.map(|c| c.1),
                            traffic: traffic(st.traffic),
                            health: None,
                        }
                    }),
                    real_servers: vs
                        .real_servers
                        .iter()
                        .zip(self.weights(i))
                        .map(|(rs, (up, weight))| {
                            let key = rs_key(rs);
                            let iface = self.ifaces[self.iface_of(&rs.interface)];
                            let mac = self.mac_of(iface.ifindex, rs);
                            let st = stats.backends.get(&(svc.vip, key.clone())).copied().unwrap_or_default();
                            let health = match (&self.health, &rs.health_check) {
                                (Some(scheduler), Some(_)) => scheduler.status_of(&check_key(svc.vip, rs)).map(HealthStatus::from),
                                _ => None,
                            };
                            let drained = self.drained.contains(&(svc.vip, key.clone()));
                            let state = if !up && weight.is_none() {
                                "down"
                            } else if !up {
                                "inhibited"
                            } else if mac.is_none() && self.dataplane.needs_macs() {
                                "unresolved"
                            } else if drained {
                                "drained"
                            } else if self.serves_sorry(vs) {
                                // Healthy, but the sorry server has the table (quorum lost).
                                "standby"
                            } else {
                                "up"
                            };
                            RealServerStatus {
                                address: rs.address.to_string(),
                                port: rs.port,
                                weight: if state == "standby" { 0 } else { weight.unwrap_or(0) },
                                state: state.to_string(),
                                drained,
                                mac: mac.as_ref().map(format_mac),
                                neighbour: match rs.mac {
                                    Some(_) => None,
                                    None => self.neigh_problems.get(&NeighKey { ifindex: iface.ifindex, addr: rs.address }).cloned(),
                                },
                                interface: self.iface_of(&rs.interface).to_string(),
                                slots: st.slots,
                                share_percent: st.slots.map(|s| (s as f64 * 1000.0 / table).round() / 10.0),
                                active_conns: st.connections.map(|c| c.0),
                                inactive_conns: st.connections.map(|c| c.1),
                                traffic: traffic(st.traffic),
                                health,
                            }
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// The health check of a real server of `vip`.
fn check_key(vip: VipAddr, rs: &crate::config::RealServer) -> CheckKey {
    CheckKey { vip_key: vip.to_string(), real_server_key: rs_key(rs) }
}

/// A real server's identity within its virtual server (also its Maglev key).
fn rs_key(rs: &crate::config::RealServer) -> String {
    endpoint_key(rs.address, rs.port)
}

/// `NeighKey` with an order, so watch sets can be diffed deterministically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NeighKeyOrd(pub u32, pub IpAddr);

impl From<NeighKeyOrd> for NeighKey {
    fn from(k: NeighKeyOrd) -> Self {
        NeighKey { ifindex: k.0, addr: k.1 }
    }
}

/// The `[director]` keys a reload cannot change, each with its old and new value as the file
/// writes them (`mode ("auto" -> "ipvs")`, `metrics_listen (unset -> "127.0.0.1:9180")`).
fn restart_only_changes(old: &Director, new: &Director) -> anyhow::Result<()> {
    let mut changed = Vec::new();
    let shown = |value: serde_json::Value| match value {
        serde_json::Value::Null => "unset".to_string(),
        value => value.to_string(),
    };
    macro_rules! check {
        ($($field:ident),*) => {$(
            if old.$field != new.$field {
                changed.push(format!(
                    "{} ({} -> {})",
                    stringify!($field),
                    shown(serde_json::json!(old.$field)),
                    shown(serde_json::json!(new.$field))
                ));
            }
        )*};
    }
    // IPVS does not read xdp_mode.
    if (old.mode, new.mode) != (Mode::Ipvs, Mode::Ipvs) {
        check!(xdp_mode);
    }
    check!(
        interface,
        mode,
        table_size,
        control_socket,
        conntrack_size,
        max_vips,
        max_backends,
        log_level,
        metrics_listen
    );
    if changed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("[director] {} changed; that needs a restart of lbd", changed.join(", "))
    }
}

fn is_link_local(a: &IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// The addresses of every interface, by name, in the kernel's order.
pub fn interface_addresses() -> HashMap<String, Vec<IpAddr>> {
    let mut out: HashMap<String, Vec<IpAddr>> = HashMap::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return out };
    for ifa in addrs {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        out.entry(ifa.interface_name).or_default().push(ip);
    }
    out
}

/// Resolves every interface a config (read from `file`) names. A failure names the file, line and
/// column of the first `interface` that names the interface, as the config's own errors do.
pub fn resolve_ifaces(config: &Config, file: &Path) -> anyhow::Result<HashMap<String, IfaceInfo>> {
    let d = &config.director;
    let mut names = vec![(&d.interface, d.interface_span)];
    for vs in &config.virtual_servers {
        for rs in &vs.real_servers {
            if let Some(name) = &rs.interface {
                names.push((name, rs.interface_span.unwrap_or(rs.span)));
            }
        }
    }
    let links = crate::links::dump().context("reading the interfaces")?;
    let mut ifaces = HashMap::new();
    for (name, at) in names {
        if ifaces.contains_key(name) {
            continue;
        }
        let iface = lookup_iface(&links, name).map_err(|e| ConfigMistake(format!("{}:{}:{}: {e:#}", file.display(), at.line, at.col)))?;
        ifaces.insert(name.clone(), iface);
    }
    // VRRP's interfaces before anything is attached: a typo there would otherwise stop lbd only
    // once its fast path serves (and stays, pinned), or a reload once the dataplane changed.
    for u in &config.vrrp_interfaces {
        if !links.contains_key(&u.interface) {
            let (line, col) = (u.span.line, u.span.col);
            return Err(ConfigMistake(format!(
                "{}:{line}:{col}: [[vrrp_instance]] {}: interface {} not found",
                file.display(),
                u.instance,
                u.interface
            ))
            .into());
        }
    }
    Ok(ifaces)
}

/// In XDP mode (and `mode = "auto"`, whose config follows XDP's rules) a real server or sorry
/// server must be another host on the director's segment: one at an address of the director
/// itself (`addresses`, see [`interface_addresses`]) never resolves (the director would ARP for
/// itself). Refuses a config naming one, at its `address` in `file` (its virtual server for a
/// sorry server), with the interface that holds the address.
pub fn refuse_own_addresses(config: &Config, file: &Path, addresses: &HashMap<String, Vec<IpAddr>>) -> Result<(), ConfigMistake> {
    let holder = |addr: IpAddr| addresses.iter().filter(|(_, a)| a.contains(&addr)).map(|(name, _)| name).min();
    let refuse = |at: crate::config::Span, what: &str, addr: IpAddr, iface: &String| {
        ConfigMistake(format!(
            "{}:{}:{}: {what} {addr} is an address of this director (on interface {iface}): in XDP mode a real server \
             must be another host on the director's segment, which the director sends frames to by its MAC",
            file.display(),
            at.line,
            at.col
        ))
    };
    for vs in &config.virtual_servers {
        for rs in &vs.real_servers {
            if let Some(iface) = holder(rs.address) {
                return Err(refuse(rs.address_span, "real server", rs.address, iface));
            }
        }
        if let Some((sorry, iface)) = vs.sorry_server.and_then(|s| Some((s.ip(), holder(s.ip())?))) {
            return Err(refuse(vs.span, "sorry server", sorry, iface));
        }
    }
    Ok(())
}

/// A mistake in the config found only when lbd starts (an interface it names is not there):
/// `lbd run` exits 2 for it, as `lbd check` does for the others, so that systemd does not
/// restart it only to find the same mistake (`RestartPreventExitStatus=2`). A reload refused
/// for one (or for any mistake `lbd check` finds) answers with `config_error`, and `lbd reload`
/// exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigMistake(pub String);

fn log_level_number(config: &Config) -> u8 {
    use crate::config::LogLevel::*;
    match config.director.log_level {
        Error => 1,
        Warn => 2,
        Info => 3,
        Debug => 4,
        Trace => 5,
    }
}

type ControlMsg = (Request, oneshot::Sender<Response>);

/// The dataplane `lbd run` picked, and how to describe it.
pub struct Picked {
    pub dataplane: Box<dyn Dataplane>,
    /// "native XDP on eth0", "IPVS 1.2.1", ...
    pub description: String,
    /// "native", "generic" or "" (IPVS).
    pub xdp_mode: &'static str,
}

/// Why a BPF or netlink step failed, in an operator's words where the errno says it all.
fn reason(err: &(dyn std::error::Error + 'static)) -> String {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => return format!("bpf() not permitted ({err})"),
                Some(libc::ENOSYS) => return format!("the kernel has no bpf() system call ({err})"),
                Some(libc::EOPNOTSUPP) => return format!("the driver has no native XDP ({err})"),
                _ => {}
            }
        }
        source = e.source();
    }
    err.to_string()
}

fn xdp(config: &Config, native: bool) -> anyhow::Result<Picked> {
    let d = &config.director;
    let mut xdp = XdpDataplane::load(XdpOptions {
        table_size: d.table_size,
        max_vips: d.max_vips,
        max_backends: d.max_backends,
        conntrack_size: d.conntrack_size,
        log_level: log_level_number(config),
        keep: Some(crate::keep::Keep::for_socket(&d.control_socket)),
    })?;
    xdp.attach(&d.interface, native)?;
    // The program's own log records (only at debug/trace level), kept alive for the whole run:
    // the logger owns the log ring buffer.
    let logger = aya_log::EbpfLogger::init(xdp.ebpf_mut()).context("opening the fast path's log buffer")?;
    tokio::spawn(async move {
        // SAFETY: the AsyncFd owns the logger and with it the ring buffer's fd for its whole life.
        let Ok(mut fd) = (unsafe { tokio::io::unix::AsyncFd::register(logger) }) else {
            return;
        };
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    let mode = if native { "native" } else { "generic" };
    Ok(Picked { dataplane: Box::new(xdp), description: format!("{mode} XDP on {}", d.interface), xdp_mode: mode })
}

fn ipvs(config: &Config) -> anyhow::Result<Picked> {
    let mut dp = IpvsDataplane::new(IpvsDataplane::state_file_for(&config.director.control_socket))?;
    let version = dp.version().map(|(a, b, c)| format!(" {a}.{b}.{c}")).unwrap_or_default();
    Ok(Picked { dataplane: Box::new(dp), description: format!("IPVS{version}"), xdp_mode: "" })
}

/// Builds the dataplane `[director] mode` asks for. Nothing BPF-related runs before this, so lbd
/// starts on kernels without BPF at all (`auto` then ends up with IPVS).
pub fn pick_dataplane(config: &Config) -> anyhow::Result<Picked> {
    let d = &config.director;
    match d.mode {
        Mode::Xdp => xdp(config, d.xdp_mode == XdpMode::Native),
        Mode::Ipvs => ipvs(config).context("IPVS mode"),
        Mode::Auto => {
            let mut failed = Vec::new();
            let native: (&str, &dyn Fn() -> anyhow::Result<Picked>) = ("native XDP", &|| xdp(config, true));
            let generic: (&str, &dyn Fn() -> anyhow::Result<Picked>) = ("generic XDP", &|| xdp(config, false));
            let mut tries = [native, generic, ("IPVS", &|| ipvs(config))];
            if generic_first(config) {
                tries.swap(0, 1);
            }
            for (name, attempt) in tries {
                match attempt() {
                    Ok(picked) => {
                        let why = if failed.is_empty() { String::new() } else { format!(" ({})", failed.join("; ")) };
                        info!("mode auto picked {}{why}", picked.description);
                        return Ok(picked);
                    }
                    Err(e) => failed.push(format!("{name}: {}", reason(e.as_ref()))),
                }
            }
            anyhow::bail!("mode auto found no working dataplane: {}", failed.join("; "))
        }
    }
}

/// Whether `mode = "auto"` tries generic XDP before native: when the fast path an earlier lbd
/// kept (see `crate::keep`) runs in generic mode on the configured interface. An earlier start
/// in this mode picked generic because native failed there (the driver has none, or refuses it:
/// an MTU too large for native XDP, LRO on): native first would detach the kept fast path (the
/// kernel allows one mode per interface) and, failing again, discard its connection tables with
/// it, a restart that drops connections. That holds where the kernel reports native support for
/// the interface too: it reported it when native failed. `lbd detach` before a start has native
/// tried first.
fn generic_first(config: &Config) -> bool {
    let d = &config.director;
    match crate::keep::Keep::for_socket(&d.control_socket).attachment() {
        Some((iface, false)) if iface == d.interface => {}
        _ => return false,
    }
    info!(
        interface = %d.interface,
        "mode auto: the fast path lbd kept runs in generic mode (native XDP failed when it was attached): generic XDP \
         is tried first, to take it over with its connections (run `lbd detach` before a start to have native tried first)"
    );
    true
}

/// An lbd in IPVS mode removes the XDP fast path an earlier lbd with its control socket kept (it
/// ran `mode = "xdp"`, or `auto` picked XDP then): XDP sees packets before IPVS does, so the kept
/// program would go on forwarding the VIPs' traffic from its old tables, without health checks,
/// and drop all of it where VRRP had disabled them at its stop. Done once IPVS serves: the flows
/// established through the fast path are then IPVS's to place.
fn retire_kept_xdp(control_socket: &Path) {
    let keep = crate::keep::Keep::for_socket(control_socket);
    let on = keep.attachment().map(|(iface, _)| format!(" on {iface}")).unwrap_or_default();
    match keep.remove() {
        Ok(removed) if removed.is_empty() => {}
        Ok(removed) => warn!(
            "removed the XDP fast path{on} an earlier lbd in XDP mode kept ({} pins and files under {}): it would handle \
             the VIPs' traffic before IPVS; established flows now go where IPVS sends them",
            removed.len(),
            keep.pin_dir.display()
        ),
        Err(e) => error!(
            "the XDP fast path{on} an earlier lbd in XDP mode kept could not be removed ({}: {e}); it handles the VIPs' \
             traffic before IPVS sees it: stop lbd and run `lbd detach`",
            keep.pin_dir.display()
        ),
    }
}

/// An lbd in XDP mode deletes the IPVS services an earlier lbd with its control socket created in
/// IPVS mode (see [`IpvsDataplane::retire`]). Done once XDP serves, as the other way round.
fn retire_ipvs_services(control_socket: &Path) {
    let state_file = IpvsDataplane::state_file_for(control_socket);
    match IpvsDataplane::retire(state_file.clone()) {
        Ok(deleted) if deleted.is_empty() => {}
        Ok(deleted) => warn!(
            "deleted the IPVS services an earlier lbd in IPVS mode created ({}): IPVS would forward what the fast \
             path passes to the kernel; their connections now go where the fast path sends them",
            deleted.join(", ")
        ),
        Err(e) => error!(
            "the IPVS services an earlier lbd in IPVS mode created (listed in {}) could not be deleted ({e}); IPVS \
             would forward what the fast path passes to the kernel: delete them with ipvsadm -D",
            state_file.display()
        ),
    }
}

/// A quorum change to log, and its command to run.
struct QuorumNews {
    line: String,
    command: Option<crate::health::config::CommandText>,
    env: Vec<(String, String)>,
}

/// [`Controller::on_neigh`], logged: a MAC resolved (info), changed (info, with the old one), a
/// neighbour entry lost (warn, once per loss), a backend unresolved [`crate::neigh::UNRESOLVED_REPORT`]
/// after it was configured or lost (warn, once, with what the kernel's routing says).
fn on_neigh(ctl: &mut Controller, ev: &NeighEvent) -> bool {
    let key = ev.key();
    let (kind, interface) = (ctl.backend_kind(&key), ctl.iface_name(key.ifindex));
    let old = ctl.macs.get(&key).copied();
    let had_problem = ctl.neigh_problems.contains_key(&key);
    match ev {
        NeighEvent::Reachable { mac, .. } => match old {
            None => info!(address = %key.addr, %interface, mac = %format_mac(mac), "{kind} MAC resolved"),
            Some(old) if old != *mac => info!(
                address = %key.addr,
                %interface,
                old_mac = %format_mac(&old),
                mac = %format_mac(mac),
                "{kind} {} on {interface} changed its MAC from {} to {}",
                key.addr,
                format_mac(&old),
                format_mac(mac)
            ),
            Some(_) if had_problem => {
                info!(address = %key.addr, %interface, mac = %format_mac(mac), "{kind} resolved again, same MAC")
            }
            Some(_) => {}
        },
        NeighEvent::Gone { .. } => match old {
            Some(old) => warn!(
                address = %key.addr,
                %interface,
                mac = %format_mac(&old),
                "{kind} {} on {interface}: its neighbour entry failed or was deleted (no ARP/NDP answer?); still \
                 sending to its last MAC {} while resolving it again",
                key.addr,
                format_mac(&old)
            ),
            None => debug!(address = %key.addr, %interface, "neighbour entry of an unresolved {kind} gone"),
        },
        NeighEvent::Unresolved { route, .. } => {
            let why = unresolved_reason(key, route, |i| ctl.iface_name(i));
            let secs = crate::neigh::UNRESOLVED_REPORT.as_secs();
            match old {
                None => warn!(
                    address = %key.addr,
                    %interface,
                    "{kind} {} on {interface} is still unresolved after {secs} s: {why}; it gets no traffic until it \
                     resolves",
                    key.addr
                ),
                Some(old) => warn!(
                    address = %key.addr,
                    %interface,
                    mac = %format_mac(&old),
                    "{kind} {} on {interface} is still unresolved {secs} s after its neighbour entry was lost: {why}; \
                     still sending to its last MAC {}",
                    key.addr,
                    format_mac(&old)
                ),
            }
        }
    }
    ctl.on_neigh(ev)
}

/// Why backend `key` may not resolve, from how the kernel routes its address (`route`); `name`
/// names an interface index. A DSR backend must be on the link of the interface it is reached by.
fn unresolved_reason(key: NeighKey, route: &RouteTo, name: impl Fn(u32) -> String) -> String {
    let (addr, iface) = (key.addr, name(key.ifindex));
    let off_link = "a DSR real server must be on the director's segment";
    match route {
        RouteTo::Direct { ifindex } if *ifindex == key.ifindex => {
            format!("no ARP/NDP answer from {addr} on {iface} (is it up, and is the address right?)")
        }
        RouteTo::Direct { ifindex } => {
            format!("{addr} is not on {iface}'s link: the kernel routes it out of {}; {off_link}", name(*ifindex))
        }
        RouteTo::Gateway { gateway, ifindex } => {
            let out = ifindex.filter(|&i| i != key.ifindex).map(|i| format!(" out of {}", name(i))).unwrap_or_default();
            format!("{addr} is not on {iface}'s link: the kernel routes it via {gateway}{out}; {off_link}")
        }
        RouteTo::Local => format!("{addr} is an address of this director"),
        RouteTo::NoRoute(why) => format!("the kernel has no route to {addr} ({why}); {off_link}"),
        RouteTo::Unknown(why) => format!("no ARP/NDP answer from {addr} on {iface} (its route could not be read: {why})"),
    }
}

/// How long a start that takes over a kept fast path waits for the real servers' MACs (the
/// kernel gives up resolving an address after 3 s). The kept program forwards meanwhile.
const TAKE_OVER_MAC_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Before a take-over: waits until every real server's MAC is known (the resolver reports the
/// ones the kernel has at once), at most [`TAKE_OVER_MAC_WAIT`]. Going live without them, a real
/// server would be out of the tables until its MAC came: its connections' packets would be
/// dropped, or sent to another real server, which resets them, and their entries rewritten.
async fn await_macs(ctl: &mut Controller, rx: &mut tokio::sync::mpsc::UnboundedReceiver<NeighEvent>) {
    let deadline = tokio::time::Instant::now() + TAKE_OVER_MAC_WAIT;
    let mut changed = false;
    let mut missing: HashSet<NeighKey> = ctl.unresolved().into_iter().collect();
    while !missing.is_empty() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) => {
                if let NeighEvent::Reachable { key, .. } = &ev {
                    missing.remove(key);
                }
                changed |= on_neigh(ctl, &ev);
            }
            Ok(None) => break,
            Err(_) => {
                let list: Vec<String> = missing.iter().map(|k| k.addr.to_string()).collect();
                warn!(
                    addresses = %list.join(", "),
                    "taking over the fast path lbd kept without these MACs after {} s: their real servers get traffic once resolved",
                    TAKE_OVER_MAC_WAIT.as_secs()
                );
                break;
            }
        }
    }
    if changed {
        ctl.sync_checks();
    }
}

/// Applies `events` and every health event already waiting: several checks changing at once (a
/// switch port going down) make one update.
fn apply_health(ctl: &mut Controller, mut events: Vec<HealthEvent>, rx: &mut mpsc::Receiver<HealthEvent>) {
    while let Ok(next) = rx.try_recv() {
        events.push(next);
    }
    if events.is_empty() {
        return;
    }
    if let Err(e) = ctl.on_health(&events) {
        error!("{e:#}");
    }
}

/// The config's warnings (see [`Config::warnings`]), one log line each.
fn log_warnings(config: &Config) {
    for w in &config.warnings {
        warn!("{w}");
    }
}

/// `lbd run`: runs until SIGINT/SIGTERM; SIGHUP (or `{"cmd":"reload"}`) reloads the config.
pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    // Signals first: a SIGHUP or SIGTERM during start-up then waits for the loop (a reload, a
    // clean stop) instead of ending lbd half set up (SIGHUP's default action).
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let config = Config::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    log_warnings(&config);
    let d = config.director.clone();
    // The control socket before anything touches the dataplane: it is how a second `lbd run`
    // finds the one already running, and that one's XDP program, IPVS services and drains must
    // not have been changed by then.
    let (listener, mut claim) = control::bind(&d.control_socket)?;
    raise_open_files_limit();
    // The metrics address too: one in use is a plain error before anything else happens.
    let metrics = match d.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("[director] metrics_listen {addr}: cannot listen there"))?,
        ),
        None => None,
    };
    // Before the interfaces are looked up: none can be created again unseen after that.
    let (_links, mut links_rx) = LinkWatcher::start().context("starting the interface watcher")?;
    let ifaces = resolve_ifaces(&config, config_path)?;
    // Before anything is attached: a refused start must not leave a fast path behind.
    if d.mode != Mode::Ipvs {
        refuse_own_addresses(&config, config_path, &interface_addresses())?;
    }
    let picked = pick_dataplane(&config)?;
    info!(
        dataplane = %picked.description,
        virtual_servers = config.virtual_servers.len(),
        real_servers = config.virtual_servers.iter().map(|v| v.real_servers.len()).sum::<usize>(),
        "dataplane ready"
    );

    let (resolver, mut neigh_rx) = Resolver::start().context("starting the neighbour resolver")?;
    let mut ctl = Controller::new(config, config_path.to_path_buf(), picked.dataplane, ifaces);
    ctl.describe(picked.description, picked.xdp_mode);
    ctl.hold_state_in(held_file_for(&d.control_socket));
    let mut watched = ctl.neigh_keys();
    for key in &watched {
        resolver.watch((*key).into());
    }
    let (health_tx, mut health_rx) = mpsc::channel::<HealthEvent>(4096);
    ctl.set_addresses(interface_addresses());
    ctl.start_health(Scheduler::new(health_tx, SchedulerOptions::default()));
    if ctl.taking_over() {
        await_macs(&mut ctl, &mut neigh_rx).await;
    }
    ctl.apply()?;
    ctl.go_live().context("taking over the fast path lbd kept")?;
    match ctl.dataplane().name() {
        "ipvs" => retire_kept_xdp(&ctl.config().director.control_socket),
        _ => retire_ipvs_services(&ctl.config().director.control_socket),
    }
    // After the dataplane: until VRRP says otherwise, the VIPs it lists are dropped.
    let mut vrrp = start_vrrp(&ctl.config().vrrp)?;
    let mut vrrp_ifaces = vrrp_ifindexes_now(&ctl.config().vrrp);

    info!(socket = %d.control_socket.display(), "control socket ready");
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ControlMsg>(16);
    // Scrapes have a queue of their own, served after everything else (see `answer_status`):
    // `lbd status` never waits behind them. Each metrics connection waits for one answer at a
    // time, so the queue holds no more than the metrics connections.
    let (scrape_tx, mut scrape_rx) = mpsc::channel::<ControlMsg>(crate::metrics::MAX_CONNECTIONS);
    if let Some(metrics) = metrics {
        info!(address = %metrics.local_addr()?, "metrics ready at /metrics");
        tokio::spawn(crate::metrics::serve(metrics, scrape_tx));
    }
    let accepting = tokio::spawn(accept_loop(listener, ctl_tx));
    // `Type=notify`: `systemctl start lbd` returns once this is said, and fails if lbd exits first.
    tell_systemd(&[NotifyState::Ready, NotifyState::Status(&serving(&ctl))]);

    let scans = Scans::default();
    loop {
        tokio::select! {
            // Health events before anything else, so that a status request waiting beside one
            // is answered after it was applied (see `Request::Status`).
            biased;
            Some(ev) = health_rx.recv() => apply_health(&mut ctl, vec![ev], &mut health_rx),
            Some(ev) = neigh_rx.recv() => {
                if on_neigh(&mut ctl, &ev) {
                    ctl.sync_checks();
                    if let Err(e) = ctl.apply() {
                        error!("{e:#}");
                    }
                }
            }
            Some(links) = links_rx.recv() => {
                follow_links(&mut ctl, &resolver, &mut watched, &links);
                follow_vrrp_links(&mut ctl, &mut vrrp, &mut vrrp_ifaces, &links).await;
            }
            changed = vrrp_changed(&mut vrrp) => {
                if changed.is_err() {
                    error!("VRRP stopped unexpectedly; the virtual servers it covers are dropped until lbd restarts");
                    vrrp = None;
                }
                sync_vrrp(&mut ctl, vrrp.as_ref());
            }
            _ = sighup.recv() => {
                if let Err(e) = reload_told(&mut ctl, &resolver, &mut watched, &mut vrrp).await {
                    log_reload_failure(&e);
                }
                vrrp_ifaces = vrrp_ifindexes_now(&ctl.config().vrrp);
            }
            Some((req, reply)) = ctl_rx.recv() => {
                let resp = match req {
                    Request::Status => {
                        answer_status(&mut ctl, &mut health_rx, vrrp.as_ref(), reply, &scans, std::time::Duration::ZERO);
                        continue;
                    }
                    Request::Reload => {
                        let done = reload_told(&mut ctl, &resolver, &mut watched, &mut vrrp).await;
                        vrrp_ifaces = vrrp_ifindexes_now(&ctl.config().vrrp);
                        match done {
                            Ok(()) => Response {
                                ok: true,
                                message: Some(format!("reloaded {}", ctl.config_path.display())),
                                ..Default::default()
                            },
                            Err(e) => {
                                log_reload_failure(&e);
                                let config_error = e.chain().any(|c| c.is::<ConfigMistake>());
                                Response { config_error, ..Response::error(format!("{e:#}")) }
                            }
                        }
                    }
                    Request::Drain(sel) => admin(&mut ctl, &sel, true),
                    Request::Enable(sel) => admin(&mut ctl, &sel, false),
                };
                let _ = reply.send(resp);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            // Last: scrapes never hold back a health event, a command or a signal. The metrics
            // endpoint only asks for the status.
            Some((_, reply)) = scrape_rx.recv() => {
                answer_status(&mut ctl, &mut health_rx, vrrp.as_ref(), reply, &scans, SCRAPE_COUNT_AGE);
            }
        }
    }
    tell_systemd(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    // No request is taken any more: one waiting is answered "lbd is shutting down", a new
    // connection is refused, as after the exit. The claim (the lock) stays until lbd exits.
    accepting.abort();
    drop(ctl_rx);
    drop(scrape_rx);
    claim.remove_socket();
    // Before the dataplane goes: masters send priority 0, so the backup takes over at once.
    stop_vrrp(&mut ctl, &mut vrrp).await;
    // The end of the runtime would kill a `notify_down` or quorum command still running.
    if let Some(health) = &ctl.health {
        health.settle_notifies().await;
    }
    let dp = ctl.dataplane();
    match (dp.stays(), dp.name()) {
        (true, "xdp") => info!(
            "shutting down: the fast path stays attached with its last state and connection entries, for the next start \
             to take over (`lbd detach` removes it)"
        ),
        (true, _) => info!("shutting down: the {} services lbd created stay in place, but for those VRRP covers", dp.name()),
        (false, _) => info!("shutting down: detaching the {} fast path", dp.name()),
    }
    drop(ctl); // a dataplane that does not stay is detached when dropped
    Ok(())
}

fn admin(ctl: &mut Controller, sel: &BackendSelector, drain: bool) -> Response {
    let verb = if drain { "drained" } else { "enabled" };
    match ctl.set_drained(sel, drain) {
        Ok(changed) => {
            for c in &changed {
                info!("{verb} {c} (from the control socket)");
            }
            Response { ok: true, message: Some(format!("{verb}: {}", changed.join(", "))), ..Default::default() }
        }
        Err(e) => Response::error(format!("{e:#}")),
    }
}

fn reload(ctl: &mut Controller, resolver: &Resolver, watched: &mut BTreeSet<NeighKeyOrd>) -> anyhow::Result<()> {
    let path = ctl.config_path.clone();
    let new = Config::load(&path).map_err(|e| ConfigMistake(e.to_string()))?;
    log_warnings(&new);
    let ifaces = resolve_ifaces(&new, &path)?;
    let addresses = interface_addresses();
    if ctl.dataplane().needs_macs() {
        refuse_own_addresses(&new, &path, &addresses)?;
    }
    ctl.set_addresses(addresses);
    check_vrrp_ifaces(&new.vrrp)?;
    ctl.reload(new, ifaces)?;
    let now = ctl.neigh_keys();
    for key in now.difference(watched) {
        resolver.watch((*key).into());
    }
    for key in watched.difference(&now) {
        resolver.unwatch((*key).into());
    }
    *watched = now;
    info!(config = %path.display(), "configuration reloaded");
    Ok(())
}

/// The running VRRP instances and the channel their states change on.
struct Vrrp {
    handle: VrrpHandle,
    states: watch::Receiver<BTreeMap<String, VrrpState>>,
}

/// Starts VRRP for `spec`, in this process's network namespace; `None` without instances.
fn start_vrrp(spec: &VrrpSpec) -> anyhow::Result<Option<Vrrp>> {
    if spec.instances.is_empty() {
        return Ok(None);
    }
    check_vrrp_ifaces(spec)?;
    let (handle, states) = VrrpHandle::start(spec.clone()).context("starting VRRP")?;
    Ok(Some(Vrrp { handle, states }))
}

/// [`start_vrrp`] after a reload, the instances named in `masters` MASTER at once
/// ([`VrrpHandle::start_resuming`]); waits (at most a second) until they are, so that the
/// caller's [`sync_vrrp`] finds their addresses owned instead of dropping them for a moment.
async fn start_vrrp_resuming(spec: &VrrpSpec, masters: &BTreeSet<String>) -> anyhow::Result<Option<Vrrp>> {
    if spec.instances.is_empty() {
        return Ok(None);
    }
    check_vrrp_ifaces(spec)?;
    let (handle, mut states) = VrrpHandle::start_resuming(spec.clone(), masters).context("starting VRRP")?;
    if !masters.is_empty() {
        let started = states.wait_for(|s| masters.iter().all(|m| s.get(m).is_none_or(|s| *s != VrrpState::Init)));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), started).await;
    }
    Ok(Some(Vrrp { handle, states }))
}

/// The interfaces instances send adverts on and answer ARP/NDP on must exist (tracked
/// interfaces may come and go: that is what tracking them is for).
fn check_vrrp_ifaces(spec: &VrrpSpec) -> anyhow::Result<()> {
    for inst in &spec.instances {
        let devs = std::iter::once(&inst.interface).chain(inst.virtual_addresses.iter().filter_map(|a| a.dev.as_ref()));
        for dev in devs {
            nix::net::if_::if_nametoindex(dev.as_str())
                .with_context(|| format!("[[vrrp_instance]] {}: interface {dev} not found", inst.name))?;
        }
    }
    Ok(())
}

/// The indexes of the interfaces VRRP's instances use (those `index` finds).
fn vrrp_ifindexes(spec: &VrrpSpec, index: impl Fn(&str) -> Option<u32>) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for inst in &spec.instances {
        for dev in std::iter::once(&inst.interface).chain(inst.virtual_addresses.iter().filter_map(|a| a.dev.as_ref())) {
            if let Some(ifindex) = index(dev) {
                out.insert(dev.clone(), ifindex);
            }
        }
    }
    out
}

/// [`vrrp_ifindexes`] as the kernel has them now.
fn vrrp_ifindexes_now(spec: &VrrpSpec) -> BTreeMap<String, u32> {
    vrrp_ifindexes(spec, |name| nix::net::if_::if_nametoindex(name).ok())
}

/// The interfaces changed: see [`Controller::relink`].
fn follow_links(ctl: &mut Controller, resolver: &Resolver, watched: &mut BTreeSet<NeighKeyOrd>, links: &Links) {
    ctl.set_addresses(interface_addresses());
    if let Err(e) = ctl.relink(links) {
        error!("{e:#}");
    }
    rewatch(ctl, resolver, watched);
}

/// VRRP's sockets are bound to its interfaces' indexes: when one of them is created again (its
/// index changed), VRRP restarts, as a fresh lbd would start it; and VRRP that is not running
/// (it stopped, or a start failed) is started again then.
async fn follow_vrrp_links(ctl: &mut Controller, vrrp: &mut Option<Vrrp>, known: &mut BTreeMap<String, u32>, links: &Links) {
    if ctl.config().vrrp.instances.is_empty() {
        return;
    }
    let now = vrrp_ifindexes(&ctl.config().vrrp, |name| links.get(name).map(|l| l.ifindex));
    // Moved to another index, or there again after a start that did not find them.
    let changed: Vec<&str> = now.iter().filter(|(name, ifindex)| known.get(*name) != Some(ifindex)).map(|(name, _)| name.as_str()).collect();
    if changed.is_empty() {
        return;
    }
    warn!(interfaces = %changed.join(", "), "VRRP's interfaces were created again: restarting VRRP");
    *known = now;
    stop_vrrp(ctl, vrrp).await;
    match start_vrrp(&ctl.config().vrrp) {
        Ok(v) => *vrrp = v,
        Err(e) => error!("{e:#}; the virtual servers VRRP covers are dropped until its interfaces change again or lbd restarts"),
    }
    sync_vrrp(ctl, vrrp.as_ref());
}

/// Makes the dataplane carry exactly the virtual servers whose VIPs VRRP owns now (all
/// covered ones dropped without VRRP).
fn sync_vrrp(ctl: &mut Controller, vrrp: Option<&Vrrp>) {
    let owned = match vrrp {
        Some(v) => {
            let addrs = ctl.config().vrrp.instances.iter().flat_map(|i| &i.virtual_addresses).map(|a| a.address);
            addrs.filter(|a| v.handle.owns(*a)).collect()
        }
        None => HashSet::new(),
    };
    if ctl.set_vrrp_owned(owned) {
        if let Err(e) = ctl.apply() {
            error!("{e:#}");
        }
    }
}

/// Stops VRRP cleanly (priority-0 adverts, notify_stop) and drops the VIPs it covered.
async fn stop_vrrp(ctl: &mut Controller, vrrp: &mut Option<Vrrp>) {
    if let Some(v) = vrrp.take() {
        v.handle.shutdown().await;
    }
    sync_vrrp(ctl, None);
}

/// The next VRRP state change (`Err` if VRRP died); pending forever without VRRP.
async fn vrrp_changed(vrrp: &mut Option<Vrrp>) -> Result<(), watch::error::RecvError> {
    match vrrp {
        Some(v) => v.states.changed().await,
        None => std::future::pending().await,
    }
}

/// How old a connection count a metrics scrape takes rather than scanning again. A scan of the
/// XDP connection tables takes 15-18 ms at a million entries: scrapers asking back to back would
/// keep one running all the time, and `lbd status` would wait behind them.
const SCRAPE_COUNT_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// The last connection count a status request scanned: when the scan started, and what it found.
/// Its lock is held for a whole scan: one scan at a time (see [`answer_status`]).
type Scans = Arc<Mutex<Option<(tokio::time::Instant, u64)>>>;

/// Answers a status request. The counters and the controller's state are read here; a connection
/// count that scans whole tables (XDP: 50 ms for 4 million empty entries, 200 ms for 16 million)
/// runs on a blocking thread, one scan at a time (`scans`), and the answer goes out when it is
/// done. Meanwhile the run loop goes on applying health events and VRRP transitions, which a
/// scan on the loop held back for its whole length at every status request.
///
/// Requests waiting for the scan in progress share the next one: a scan that started after a
/// request arrived counts what a scan of its own would, so it is taken rather than run again
/// (a request waits for two scans at most, however many wait with it). A scrape also takes a
/// count that started at most `reuse` before it arrived ([`SCRAPE_COUNT_AGE`]; `lbd status`
/// passes zero, and always gets a count that started after it asked): scrapes scan at most
/// about once per `reuse`, whatever their number, and never keep `lbd status` waiting for long.
fn answer_status(
    ctl: &mut Controller,
    health_rx: &mut mpsc::Receiver<HealthEvent>,
    vrrp: Option<&Vrrp>,
    reply: oneshot::Sender<Response>,
    scans: &Scans,
    reuse: std::time::Duration,
) {
    let asked = tokio::time::Instant::now();
    let stats = match ctl.dataplane().stats() {
        Ok(stats) => stats,
        Err(e) => {
            let _ = reply.send(Response::error(format!("reading counters: {e}")));
            return;
        }
    };
    // The status reads the checks' states as they are now: apply the events that arrived while
    // the counters were read, so that what it says about real servers and quorum is what the
    // dataplane has.
    apply_health(ctl, Vec::new(), health_rx);
    let mut status = with_vrrp(ctl.status(&stats), vrrp);
    let answer = |status| Response { ok: true, status: Some(status), ..Default::default() };
    let Some(count) = ctl.dataplane().connection_count() else {
        let _ = reply.send(answer(status));
        return;
    };
    let scans = scans.clone();
    tokio::spawn(async move {
        let mut last = scans.lock().await;
        let counted = match *last {
            Some((started, n)) if asked.saturating_duration_since(started) <= reuse => Ok(n),
            _ => {
                let started = tokio::time::Instant::now();
                let counted = tokio::task::spawn_blocking(count).await;
                if let Ok(n) = counted {
                    *last = Some((started, n));
                }
                counted
            }
        };
        drop(last);
        let resp = match counted {
            Ok(n) => {
                status.conntrack_entries = n;
                answer(status)
            }
            Err(e) => Response::error(format!("counting connections: {e}")),
        };
        let _ = reply.send(resp);
    });
}

fn with_vrrp(mut status: Status, vrrp: Option<&Vrrp>) -> Status {
    status.vrrp = vrrp.map(|v| v.handle.status()).unwrap_or_default();
    status
}

/// [`reload`], then VRRP restarted if (and only if) its tables changed: the old instances stop
/// without a word and the new ones start, those that were MASTER of the same virtual router
/// (name, interface and VRID) as MASTER at once, so that the backup does not take over for the
/// reload (see [`VrrpHandle::start_resuming`]); the others as a fresh lbd would. The virtual
/// servers VRRP covers are not dropped in between. If the new instances cannot start, the
/// previous state is put back as it was before the reload (see [`Controller::restore`]) and
/// VRRP runs it again; if that fails too, the error is a [`RollbackFailed`].
async fn reload_all(
    ctl: &mut Controller,
    resolver: &Resolver,
    watched: &mut BTreeSet<NeighKeyOrd>,
    vrrp: &mut Option<Vrrp>,
) -> anyhow::Result<()> {
    let snapshot = ctl.snapshot();
    reload(ctl, resolver, watched)?;
    if ctl.config().vrrp == snapshot.config.vrrp {
        sync_vrrp(ctl, vrrp.as_ref());
        return Ok(());
    }
    info!("VRRP configuration changed: restarting VRRP");
    let masters = match vrrp.take() {
        Some(v) => v.handle.hand_over().await,
        None => BTreeSet::new(),
    };
    let router = |spec: &VrrpSpec, name: &String| {
        spec.instances.iter().find(|i| &i.name == name).map(|i| (i.interface.clone(), i.virtual_router_id))
    };
    let carried: BTreeSet<String> = masters
        .iter()
        .filter(|n| router(&ctl.config().vrrp, n).is_some_and(|r| Some(r) == router(&snapshot.config.vrrp, n)))
        .cloned()
        .collect();
    let err = match start_vrrp_resuming(&ctl.config().vrrp, &carried).await {
        Ok(v) => {
            *vrrp = v;
            sync_vrrp(ctl, vrrp.as_ref());
            return Ok(());
        }
        Err(e) => e,
    };
    let err = err.context("the new VRRP configuration did not start");
    // Every step is tried, whatever failed before it: as much of the previous state as can be
    // runs again.
    let mut rollback = Vec::new();
    if let Err(e) = ctl.restore(snapshot, true) {
        rollback.push(e.context("programming the previous configuration"));
    }
    rewatch(ctl, resolver, watched);
    match start_vrrp_resuming(&ctl.config().vrrp, &masters).await {
        Ok(v) => *vrrp = v,
        Err(e) => {
            rollback.push(e.context("restarting the previous VRRP instances (the virtual servers they cover stay dropped)"))
        }
    }
    sync_vrrp(ctl, vrrp.as_ref());
    if rollback.is_empty() {
        Err(err)
    } else {
        Err(RollbackFailed { failed: err, rollback }.into())
    }
}

/// A reload undone (its new VRRP did not start) whose way back failed too: lbd does not run
/// the previous configuration as it did before the reload.
#[derive(Debug, thiserror::Error)]
#[error("{failed:#}; going back to the previous configuration failed too: {}", one_line(.rollback))]
struct RollbackFailed {
    failed: anyhow::Error,
    rollback: Vec<anyhow::Error>,
}

fn one_line(errors: &[anyhow::Error]) -> String {
    errors.iter().map(|e| format!("{e:#}")).collect::<Vec<_>>().join("; ")
}

/// Raises the soft limit on open files to the hard one (systemd's default soft limit is 1024):
/// health checks of many real servers, metrics scrapes and control connections each hold one.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!("cannot raise the open-files limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => warn!("cannot read the open-files limit: {e}"),
    }
}

/// Tells systemd (`Type=notify`, `NOTIFY_SOCKET` set) what lbd is doing; nothing without it.
fn tell_systemd(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        let to = std::env::var("NOTIFY_SOCKET").unwrap_or_default();
        warn!("cannot tell systemd (NOTIFY_SOCKET={to}): {e}");
    }
}

/// The line `systemctl status lbd` shows while lbd serves.
fn serving(ctl: &Controller) -> String {
    let vs = &ctl.config().virtual_servers;
    let rs: usize = vs.iter().map(|v| v.real_servers.len()).sum();
    format!("serving {} virtual servers, {rs} real servers ({})", vs.len(), ctl.description)
}

/// [`reload_all`] between systemd's RELOADING=1 and READY=1; a refused reload's message goes into
/// the status line (`systemctl status lbd`), beside what is still served.
async fn reload_told(
    ctl: &mut Controller,
    resolver: &Resolver,
    watched: &mut BTreeSet<NeighKeyOrd>,
    vrrp: &mut Option<Vrrp>,
) -> anyhow::Result<()> {
    // systemd takes a RELOADING=1 only with the time it was sent.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => tell_systemd(&[NotifyState::Reloading, now]),
        Err(e) => warn!("cannot tell systemd of the reload: reading CLOCK_MONOTONIC: {e}"),
    }
    let done = reload_all(ctl, resolver, watched, vrrp).await;
    let status = match &done {
        Ok(()) => serving(ctl),
        Err(e) => format!("{}; reload refused: {}", serving(ctl), format!("{e:#}").lines().next().unwrap_or("")),
    };
    tell_systemd(&[NotifyState::Ready, NotifyState::Status(&status)]);
    done
}

/// Logs a failed reload, saying what lbd runs now.
fn log_reload_failure(e: &anyhow::Error) {
    if e.downcast_ref::<RollbackFailed>().is_some() {
        error!("reload failed, and so did going back: the previous configuration is not fully running: {e:#}");
    } else {
        error!("reload failed, still running the previous configuration: {e:#}");
    }
}

/// Follows the neighbour entries the controller's config needs now.
fn rewatch(ctl: &Controller, resolver: &Resolver, watched: &mut BTreeSet<NeighKeyOrd>) {
    let now = ctl.neigh_keys();
    for key in now.difference(watched) {
        resolver.watch((*key).into());
    }
    for key in watched.difference(&now) {
        resolver.unwatch((*key).into());
    }
    *watched = now;
}

/// The most control connections served at once: a runaway script opening connections must not
/// take the descriptors the health checks need.
const MAX_CONNECTIONS: usize = 32;

async fn accept_loop(listener: tokio::net::UnixListener, tx: mpsc::Sender<ControlMsg>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                crate::control::accept_failed("control socket", &e).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    serve_request(stream, tx).await;
                    drop(slot);
                });
            }
            Err(_) => {
                let busy = Response::error(format!(
                    "lbd is busy: {MAX_CONNECTIONS} control connections are open already; try again"
                ));
                tokio::spawn(reply(stream.into_split().1, busy));
            }
        }
    }
}

/// Writes a reply; a client that does not read it is left after [`REQUEST_TIMEOUT`].
async fn reply(mut write: tokio::net::unix::OwnedWriteHalf, resp: Response) {
    let mut out = serde_json::to_string(&resp).expect("responses serialize");
    out.push('\n');
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(out.as_bytes())).await;
}

/// The longest request line the control socket reads (the longest real one, a `drain` of an
/// IPv6 real server, is under 200 bytes).
const MAX_REQUEST: u64 = 64 * 1024;
/// How long the control socket waits for a connection's request line.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads one request line from a control connection, has the controller answer it and writes
/// the reply. A line longer than [`MAX_REQUEST`] is refused with an error reply, and a connection
/// that sends no complete line within [`REQUEST_TIMEOUT`] is closed: neither holds memory or a
/// task for longer.
async fn serve_request(stream: tokio::net::UnixStream, tx: mpsc::Sender<ControlMsg>) {
    use tokio::io::AsyncReadExt;
    let (read, write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST + 1));
    let resp = match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await {
        Err(_) => Response::error(format!("no request line within {} s", REQUEST_TIMEOUT.as_secs())),
        Ok(Err(e)) => Response::error(format!("bad request: {e}")),
        Ok(Ok(_)) if line.len() as u64 > MAX_REQUEST => {
            Response::error(format!("bad request: longer than {MAX_REQUEST} bytes"))
        }
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let (otx, orx) = oneshot::channel();
                match tx.send((req, otx)).await {
                    Ok(()) => orx.await.unwrap_or_else(|_| Response::error("lbd is shutting down")),
                    Err(_) => Response::error("lbd is shutting down"),
                }
            }
            Err(e) => Response::error(format!("bad request: {e}")),
        },
    };
    reply(write, resp).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::FakeDataplane;

    const ETH0: IfaceInfo = IfaceInfo { ifindex: 2, mac: [2, 0, 0, 0, 0, 0xd] };

    fn config(extra_director: &str, reals: &[&str]) -> Config {
        let mut text = format!("[director]\ninterface = \"eth0\"\n{extra_director}\n[[virtual_server]]\naddress = \"10.0.0.100\"\nport = 80\n");
        for r in reals {
            text += &format!("[[virtual_server.real_server]]\n{r}\n");
        }
        Config::parse(&text, "test.toml").expect("valid config")
    }

    fn controller(cfg: Config) -> (Controller, FakeDataplane) {
        let fake = FakeDataplane::default();
        let ifaces = HashMap::from([("eth0".to_string(), ETH0)]);
        (Controller::new(cfg, "test.toml".into(), Box::new(fake.clone()), ifaces), fake)
    }

    fn key(addr: &str) -> NeighKey {
        NeighKey { ifindex: ETH0.ifindex, addr: addr.parse().unwrap() }
    }

    #[test]
    fn desired_state_uses_static_and_resolved_macs() {
        let cfg = config("", &["address = \"10.0.0.11\"\nmac = \"02:00:00:00:00:0b\"", "address = \"10.0.0.12\"\nweight = 3"]);
        let (mut ctl, fake) = controller(cfg);
        // Only the real server without a configured MAC is resolved through the neighbour table.
        assert_eq!(ctl.neigh_keys().into_iter().map(NeighKey::from).collect::<Vec<_>>(), vec![key("10.0.0.12")]);
        ctl.apply().unwrap();
        let svc = &fake.current().unwrap()[0];
        assert_eq!(svc.vip.to_string(), "TCP 10.0.0.100:80");
        assert_eq!(svc.backends[0].mac, Some([2, 0, 0, 0, 0, 0xb]));
        assert_eq!(svc.backends[1].mac, None, "unresolved until the neighbour table answers");
        assert_eq!((svc.backends[1].weight, svc.backends[1].ifindex, svc.backends[1].src_mac), (3, 2, ETH0.mac));

        assert!(ctl.on_neigh(&NeighEvent::Reachable { key: key("10.0.0.12"), mac: [2, 0, 0, 0, 0, 0xc] }));
        assert!(!ctl.on_neigh(&NeighEvent::Reachable { key: key("10.0.0.12"), mac: [2, 0, 0, 0, 0, 0xc] }), "same MAC: no change");
        // The kernel forgetting the entry keeps the last known MAC in use.
        assert!(!ctl.on_neigh(&NeighEvent::Gone { key: key("10.0.0.12") }));
        ctl.apply().unwrap();
        assert_eq!(fake.current().unwrap()[0].backends[1].mac, Some([2, 0, 0, 0, 0, 0xc]));
    }

    /// An interface deleted and created again (another index, here another MAC too): the real
    /// servers behind it are programmed with the new ones, keep their resolved MACs, and their
    /// neighbour entries are followed on the new index. The dataplane hears of every change of
    /// the interfaces, before the apply that uses the new index.
    #[test]
    fn real_servers_follow_an_interface_created_again() {
        use crate::{dataplane::FakeCall, links::Link};
        let cfg = config("", &["address = \"10.0.0.11\"", "address = \"10.0.0.12\"\nmac = \"02:00:00:00:00:0c\""]);
        let (mut ctl, fake) = controller(cfg);
        let resolved = [2, 0, 0, 0, 0, 0xb];
        ctl.on_neigh(&NeighEvent::Reachable { key: key("10.0.0.11"), mac: resolved });
        ctl.apply().unwrap();
        let links = |ifindex: u32, mac: Mac| {
            let lo = Link { ifindex: 1, mac: Some([0; 6]), xdp_programs: vec![] };
            Links::from([("lo".to_string(), lo), ("eth0".to_string(), Link { ifindex, mac: Some(mac), xdp_programs: vec![7] })])
        };

        // Unchanged, or gone: nothing is programmed again.
        assert!(!ctl.relink(&links(ETH0.ifindex, ETH0.mac)).unwrap());
        assert!(!ctl.relink(&Links::new()).unwrap());
        assert_eq!(fake.applied().len(), 1);
        assert_eq!(ctl.ifaces["eth0"], ETH0, "a missing interface keeps its last index");

        let new_mac = [2, 0, 0, 0, 0, 0xe];
        assert!(ctl.relink(&links(9, new_mac)).unwrap());
        let calls = fake.calls();
        assert_eq!(calls[calls.len() - 2..], [FakeCall::LinksChanged(links(9, new_mac)), FakeCall::Apply]);
        let svc = &fake.current().unwrap()[0];
        for b in &svc.backends {
            assert_eq!((b.ifindex, b.src_mac), (9, new_mac), "{b:?}");
        }
        assert_eq!(svc.backends[0].mac, Some(resolved), "the resolved MAC is kept");
        let moved = NeighKey { ifindex: 9, addr: "10.0.0.11".parse().unwrap() };
        assert_eq!(ctl.neigh_keys().into_iter().map(NeighKey::from).collect::<Vec<_>>(), vec![moved]);
        assert!(!ctl.on_neigh(&NeighEvent::Reachable { key: moved, mac: resolved }), "the same MAC, now on the new index");
        assert!(ctl.on_neigh(&NeighEvent::Reachable { key: moved, mac: [2, 0, 0, 0, 0, 0xf] }));
        assert_eq!(fake.calls().iter().filter(|c| matches!(c, FakeCall::LinksChanged(_))).count(), 3);
    }

    /// A lost neighbour entry (lbd still sends to the last MAC) and a real server that does not
    /// resolve show in the status, until they resolve.
    #[test]
    fn status_shows_a_lost_or_unresolved_neighbour_until_it_resolves() {
        let (mut ctl, _) = controller(config("", &["address = \"10.0.0.11\"", "address = \"10.0.0.12\""]));
        let seen = |ctl: &Controller| -> Vec<(String, Option<String>, Option<String>)> {
            let st = ctl.status(&DataplaneStats::default());
            st.virtual_servers[0].real_servers.iter().map(|r| (r.state.clone(), r.mac.clone(), r.neighbour.clone())).collect()
        };
        let mac = [2, 0, 0, 0, 0, 0xb];
        assert!(ctl.on_neigh(&NeighEvent::Reachable { key: key("10.0.0.11"), mac }));
        assert!(!ctl.on_neigh(&NeighEvent::Gone { key: key("10.0.0.11") }), "the last MAC stays in use");
        let route = RouteTo::Gateway { gateway: "10.0.9.254".parse().unwrap(), ifindex: Some(ETH0.ifindex) };
        assert!(!ctl.on_neigh(&NeighEvent::Unresolved { key: key("10.0.0.12"), route }));
        let lost = "neighbour entry failed or deleted; still sending to 02:00:00:00:00:0b";
        let off_link = "10.0.0.12 is not on eth0's link: the kernel routes it via 10.0.9.254; a DSR real server must be on \
                        the director's segment";
        let mac_text = Some("02:00:00:00:00:0b".to_string());
        assert_eq!(
            seen(&ctl),
            [("up".into(), mac_text.clone(), Some(lost.into())), ("unresolved".into(), None, Some(off_link.into()))]
        );
        // Still unresolved 5 s after the loss: why, and the MAC still used.
        let route = RouteTo::Direct { ifindex: ETH0.ifindex };
        ctl.on_neigh(&NeighEvent::Unresolved { key: key("10.0.0.11"), route });
        let silent = "no ARP/NDP answer from 10.0.0.11 on eth0 (is it up, and is the address right?); still sending to \
                      02:00:00:00:00:0b";
        assert_eq!(seen(&ctl)[0].2.as_deref(), Some(silent));
        assert!(!ctl.on_neigh(&NeighEvent::Reachable { key: key("10.0.0.11"), mac }), "back with the same MAC");
        assert!(ctl.on_neigh(&NeighEvent::Reachable { key: key("10.0.0.12"), mac: [2, 0, 0, 0, 0, 0xc] }));
        assert!(seen(&ctl).iter().all(|(state, _, neighbour)| state == "up" && neighbour.is_none()), "{:?}", seen(&ctl));
    }

    /// What the warning about a real server still unresolved says, from the kernel's route to it.
    #[test]
    fn an_unresolved_real_server_is_explained_by_its_route() {
        let name = |i: u32| match i {
            2 => "eth0".to_string(),
            3 => "eth1".to_string(),
            i => format!("ifindex {i}"),
        };
        let k = key("10.98.0.5");
        let why = |route: RouteTo| unresolved_reason(k, &route, name);
        let gateway = "10.99.0.254".parse().unwrap();
        assert_eq!(
            why(RouteTo::Gateway { gateway, ifindex: Some(2) }),
            "10.98.0.5 is not on eth0's link: the kernel routes it via 10.99.0.254; a DSR real server must be on the \
             director's segment"
        );
        assert_eq!(
            why(RouteTo::Gateway { gateway, ifindex: Some(3) }),
            "10.98.0.5 is not on eth0's link: the kernel routes it via 10.99.0.254 out of eth1; a DSR real server must \
             be on the director's segment"
        );
        assert_eq!(
            why(RouteTo::Direct { ifindex: 3 }),
            "10.98.0.5 is not on eth0's link: the kernel routes it out of eth1; a DSR real server must be on the \
             director's segment"
        );
        assert_eq!(why(RouteTo::Direct { ifindex: 2 }), "no ARP/NDP answer from 10.98.0.5 on eth0 (is it up, and is the address right?)");
        assert_eq!(why(RouteTo::Local), "10.98.0.5 is an address of this director");
        assert_eq!(
            why(RouteTo::NoRoute("Network is unreachable (os error 101)".into())),
            "the kernel has no route to 10.98.0.5 (Network is unreachable (os error 101)); a DSR real server must be on \
             the director's segment"
        );
        assert!(why(RouteTo::Unknown("EBUSY".into())).starts_with("no ARP/NDP answer from 10.98.0.5 on eth0"));
    }

    /// In XDP mode a real server or sorry server at an address of the director is refused where
    /// the file names it, with the interface that holds the address.
    #[test]
    fn a_real_server_at_an_own_address_is_refused() {
        let ip = |a: &str| -> IpAddr { a.parse().unwrap() };
        let addresses = HashMap::from([
            ("eth0".to_string(), vec![ip("10.0.0.1"), ip("10.0.0.12"), ip("fe80::1")]),
            ("lo".to_string(), vec![ip("127.0.0.1"), ip("::1")]),
        ]);
        let file = Path::new("/etc/lbd/lbd.toml");
        let cfg = config("", &["address = \"10.0.0.11\"", "address = \"10.0.0.12\""]);
        let err = refuse_own_addresses(&cfg, file, &addresses).unwrap_err().to_string();
        assert!(
            err.starts_with("/etc/lbd/lbd.toml:10:11: real server 10.0.0.12 is an address of this director (on interface eth0): "),
            "{err}"
        );
        let cfg = config("", &["address = \"10.0.0.11\""]);
        assert!(refuse_own_addresses(&cfg, file, &addresses).is_ok());

        let text = "[director]\ninterface = \"eth0\"\n\n[[virtual_server]]\naddress = \"10.0.0.100\"\nport = 80\n\
                    sorry_server = \"10.0.0.1:80\"\n";
        let cfg = Config::parse(text, "test.toml").expect("valid config");
        let err = refuse_own_addresses(&cfg, file, &addresses).unwrap_err().to_string();
        assert!(err.starts_with("/etc/lbd/lbd.toml:4:1: sorry server 10.0.0.1 is an address of this director (on interface eth0)"), "{err}");
    }

    /// A status whose connection count scans tables is answered off the run loop: the call
    /// returns while the count still runs (the loop could apply a health event or a failover
    /// meanwhile), and the answer, sent when the count is done, carries it.
    #[tokio::test]
    async fn status_counts_connections_off_the_run_loop() {
        let (mut ctl, fake) = controller(config("", &["address = \"10.0.0.11\"\nmac = \"02:00:00:00:00:0b\""]));
        ctl.apply().unwrap();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = std::sync::Mutex::new(released);
        fake.count_connections_with(move || {
            // Counted on the caller's thread, this would hold the call for 5 s and answer
            // u64::MAX before the test releases it.
            match released.lock().unwrap().recv_timeout(std::time::Duration::from_secs(5)) {
                Ok(()) => 1234,
                Err(_) => u64::MAX,
            }
        });
        let (_health_tx, mut health_rx) = mpsc::channel(1);
        let scans = Scans::default();
        let (reply, mut answer) = oneshot::channel();
        answer_status(&mut ctl, &mut health_rx, None, reply, &scans, std::time::Duration::ZERO);
        assert!(
            matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "answered before the count was done: the count ran on the loop"
        );
        // The loop's work goes on meanwhile.
        let sel = BackendSelector { vip: "10.0.0.100:80".into(), backend: "10.0.0.11".into(), protocol: None };
        assert_eq!(ctl.set_drained(&sel, true).unwrap(), vec!["TCP 10.0.0.100:80 -> 10.0.0.11:80"]);
        release.send(()).unwrap();
        let resp = tokio::time::timeout(std::time::Duration::from_secs(10), answer).await.unwrap().unwrap();
        assert!(resp.ok, "{resp:?}");
        assert_eq!(resp.status.unwrap().conntrack_entries, 1234);
    }

    /// Status requests waiting for a scan share the next one, and a scrape takes a count up to
    /// its `reuse` old: many scrapes do not queue one scan each in front of `lbd status`.
    #[tokio::test]
    async fn status_requests_share_connection_counts() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::time::Duration;
        let (mut ctl, fake) = controller(config("", &["address = \"10.0.0.11\"\nmac = \"02:00:00:00:00:0b\""]));
        ctl.apply().unwrap();
        // Each scan answers its own number; the first waits to be released.
        let scans_run = Arc::new(AtomicU64::new(0));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = std::sync::Mutex::new(released);
        let run = scans_run.clone();
        fake.count_connections_with(move || {
            let n = run.fetch_add(1, Ordering::SeqCst) + 1;
            if n == 1 {
                let _ = released.lock().unwrap().recv_timeout(Duration::from_secs(5));
            }
            n
        });
        let (_health_tx, mut health_rx) = mpsc::channel(1);
        let scans = Scans::default();
        let mut ask = |reuse: Duration| {
            let (reply, answer) = oneshot::channel();
            answer_status(&mut ctl, &mut health_rx, None, reply, &scans, reuse);
            async move {
                let resp = tokio::time::timeout(Duration::from_secs(10), answer).await.unwrap().unwrap();
                resp.status.as_ref().unwrap_or_else(|| panic!("{resp:?}")).conntrack_entries
            }
        };
        let first = ask(Duration::ZERO);
        let first = tokio::spawn(first);
        while scans_run.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Three ask while scan 1 runs: none takes it (it started before they asked); the first of
        // them to get the lock runs scan 2, which the others take.
        let waiting = [ask(Duration::ZERO), ask(Duration::ZERO), ask(SCRAPE_COUNT_AGE)];
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), 1);
        for w in waiting {
            assert_eq!(w.await, 2);
        }
        assert_eq!(scans_run.load(Ordering::SeqCst), 2);
        // A scrape takes a recent count; `lbd status` scans again, and a scrape after it takes its.
        assert_eq!(ask(SCRAPE_COUNT_AGE).await, 2);
        assert_eq!(ask(Duration::ZERO).await, 3);
        assert_eq!(ask(SCRAPE_COUNT_AGE).await, 3);
        // A count older than `reuse` is scanned again.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(ask(Duration::from_millis(50)).await, 4);
        assert_eq!(scans_run.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn reload_applies_changes_and_refuses_restart_only_settings() {
        let (mut ctl, fake) = controller(config("", &["address = \"10.0.0.11\"", "address = \"10.0.0.12\""]));
        ctl.apply().unwrap();
        let ifaces = || HashMap::from([("eth0".to_string(), ETH0)]);

        ctl.reload(config("", &["address = \"10.0.0.11\""]), ifaces()).unwrap();
        assert_eq!(fake.current().unwrap()[0].backends.len(), 1);

        let err = ctl.reload(config("table_size = 131071", &["address = \"10.0.0.13\""]), ifaces()).unwrap_err();
        assert_eq!(err.to_string(), "[director] table_size (65537 -> 131071) changed; that needs a restart of lbd");
        let err = ctl
            .reload(config("mode = \"ipvs\"\nmetrics_listen = \"127.0.0.1:9180\"", &["address = \"10.0.0.13\""]), ifaces())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "[director] mode (\"auto\" -> \"ipvs\"), metrics_listen (unset -> \"127.0.0.1:9180\") changed; that needs a \
             restart of lbd"
        );
        assert_eq!(fake.applied().len(), 2, "nothing was programmed");
        assert_eq!(ctl.config().virtual_servers[0].real_servers[0].address.to_string(), "10.0.0.11");
    }

    /// Firewall-mark virtual servers read as ipvsadm shows them (`FWM  5`), and `fwmark:N` drains a
    /// real server of that one only.
    #[test]
    fn firewall_mark_virtual_servers_are_named_by_their_mark() {
        let text = "[director]\ninterface = \"eth0\"\nmode = \"ipvs\"\n\
                    [[virtual_server]]\nfwmark = 5\n[[virtual_server.real_server]]\naddress = \"10.0.0.11\"\n\
                    [[virtual_server]]\nfwmark = 6\n[[virtual_server.real_server]]\naddress = \"10.0.0.11\"\n\
                    [[virtual_server]]\nfwmark = 6\nfamily = \"ipv6\"\nforwarding = \"tunnel\"\n[[virtual_server.real_server]]\naddress = \"10.0.0.11\"\n";
        let (mut ctl, fake) = controller(Config::parse(text, "test.toml").expect("valid config"));
        ctl.apply().unwrap();
        let st = ctl.status(&DataplaneStats::default());
        assert_eq!(st.virtual_servers.iter().map(|v| v.fwmark).collect::<Vec<_>>(), [Some(5), Some(6), Some(6)]);
        // The mark selects any protocol: JSON and metrics say so rather than "tcp".
        assert!(st.virtual_servers.iter().all(|v| v.protocol == "fwmark"), "{:?}", st.virtual_servers);
        let text = crate::status::render(&st);
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("FWM")).collect();
        assert_eq!(rows.len(), 3, "{text}");
        assert!(rows[0].starts_with("FWM  5 ") && rows[1].starts_with("FWM  6 ") && rows[2].starts_with("FWM  6 IPv6"), "{text}");

        let sel = |vip: &str| BackendSelector { vip: vip.into(), backend: "10.0.0.11".into(), protocol: None };
        let weights = || fake.current().unwrap().iter().map(|s| s.backends[0].weight).collect::<Vec<u32>>();
        // As the metrics' `virtual_server` label names it: the IPv6 one of mark 6 only.
        assert_eq!(ctl.set_drained(&sel("fwmark:6/ipv6"), true).unwrap(), vec!["FWM 6 IPv6 -> 10.0.0.11:0"]);
        assert_eq!(weights(), [1, 1, 0]);
        assert_eq!(ctl.set_drained(&sel("fwmark:6/ipv6"), false).unwrap().len(), 1);
        assert_eq!(ctl.set_drained(&sel("fwmark:6/ipv4"), true).unwrap(), vec!["FWM 6 -> 10.0.0.11:0"]);
        assert_eq!(weights(), [1, 0, 1]);
        // Both families of the mark.
        assert_eq!(ctl.set_drained(&sel("fwmark:6"), true).unwrap().len(), 2);
        assert_eq!(weights(), [1, 0, 0]);
        let err = ctl.set_drained(&sel("0.0.0.0:0"), true).unwrap_err();
        assert_eq!(err.to_string(), "no virtual server 0.0.0.0:0");
        for bad in ["fwmark:x", "fwmark:0", "fwmark:6/v6"] {
            let err = ctl.set_drained(&sel(bad), true).unwrap_err();
            assert_eq!(err.to_string(), format!("`{bad}` is not fwmark:N (N from 1), fwmark:N/ipv4 or fwmark:N/ipv6"));
        }
    }

    #[test]
    fn drain_sets_weight_zero_until_enabled_or_the_config_changes_it() {
        let (mut ctl, fake) = controller(config("", &["address = \"10.0.0.11\"", "address = \"10.0.0.12\"\nweight = 2"]));
        ctl.apply().unwrap();
        let sel = |b: &str| BackendSelector { vip: "10.0.0.100:80".into(), backend: b.into(), protocol: None };
        assert_eq!(ctl.set_drained(&sel("10.0.0.12"), true).unwrap(), vec!["TCP 10.0.0.100:80 -> 10.0.0.12:80"]);
        assert_eq!(fake.current().unwrap()[0].backends[1].weight, 0);
        // Status says so whatever the state reads (here "unresolved": the fake has no MACs).
        let st = ctl.status(&DataplaneStats::default());
        assert_eq!(st.virtual_servers[0].real_servers.iter().map(|r| r.drained).collect::<Vec<_>>(), [false, true]);
        let err = ctl.set_drained(&sel("10.0.0.13:80"), true).unwrap_err();
        assert_eq!(err.to_string(), "no real server 10.0.0.13:80 in virtual server 10.0.0.100:80 (it has 10.0.0.11:80, 10.0.0.12:80)");
        let err = ctl.set_drained(&BackendSelector { vip: "10.0.0.100:81".into(), ..sel("10.0.0.12") }, true).unwrap_err();
        assert_eq!(err.to_string(), "no virtual server 10.0.0.100:81");
        // `--protocol` as status writes it, or as the config does; the error names the filter.
        let proto = |p: &str| BackendSelector { protocol: Some(p.into()), ..sel("10.0.0.12") };
        assert_eq!(ctl.set_drained(&proto("TCP"), true).unwrap(), vec!["TCP 10.0.0.100:80 -> 10.0.0.12:80"]);
        let err = ctl.set_drained(&proto("udp"), true).unwrap_err();
        assert_eq!(err.to_string(), "no UDP virtual server 10.0.0.100:80");
        let err = ctl.set_drained(&proto("sctp"), true).unwrap_err();
        assert_eq!(err.to_string(), "unknown protocol `sctp`; expected tcp or udp");

        // A reload that leaves the real server alone keeps the drain...
        let ifaces = || HashMap::from([("eth0".to_string(), ETH0)]);
        ctl.reload(config("", &["address = \"10.0.0.11\"\nweight = 3", "address = \"10.0.0.12\"\nweight = 2"]), ifaces()).unwrap();
        assert_eq!(fake.current().unwrap()[0].backends[1].weight, 0);
        // ...one that changes it ends the drain.
        ctl.reload(config("", &["address = \"10.0.0.11\"", "address = \"10.0.0.12\"\nweight = 4"]), ifaces()).unwrap();
        assert_eq!(fake.current().unwrap()[0].backends[1].weight, 4);

        ctl.set_drained(&sel("10.0.0.11"), true).unwrap();
        ctl.set_drained(&sel("10.0.0.11:80"), false).unwrap();
        assert_eq!(fake.current().unwrap()[0].backends[0].weight, 1);
    }

    /// A drain (or enable) the dataplane refuses did not happen: the status does not show it,
    /// and the next apply does not carry it out.
    #[test]
    fn a_refused_drain_is_undone() {
        let (mut ctl, fake) = controller(config("", &["address = \"10.0.0.11\"\nmac = \"02:00:00:00:00:0b\"\nweight = 2"]));
        ctl.apply().unwrap();
        let sel = BackendSelector { vip: "10.0.0.100:80".into(), backend: "10.0.0.11".into(), protocol: None };
        let state = |ctl: &Controller| {
            let st = ctl.status(&DataplaneStats::default());
            let rs = &st.virtual_servers[0].real_servers[0];
            (rs.state.clone(), rs.weight)
        };
        fake.fail_next("map full");
        let err = ctl.set_drained(&sel, true).unwrap_err();
        assert!(format!("{err:#}").contains("map full"), "{err:#}");
        assert_eq!(state(&ctl), ("up".to_string(), 2), "the refused drain shows");
        ctl.apply().unwrap();
        assert_eq!(fake.current().unwrap()[0].backends[0].weight, 2, "a later apply carried out the refused drain");

        ctl.set_drained(&sel, true).unwrap();
        fake.fail_next("map full");
        ctl.set_drained(&sel, false).unwrap_err();
        assert_eq!(state(&ctl), ("drained".to_string(), 0), "the refused enable shows");
        ctl.apply().unwrap();
        assert_eq!(fake.current().unwrap()[0].backends[0].weight, 0, "a later apply carried out the refused enable");
    }

    /// Probes that pass or fail as the test says, per real server address.
    #[derive(Clone, Default)]
    struct Switchboard(std::sync::Arc<std::sync::Mutex<HashMap<IpAddr, bool>>>);

    impl Switchboard {
        fn set(&self, addr: &str, ok: bool) {
            self.0.lock().unwrap().insert(addr.parse().unwrap(), ok);
        }
    }

    impl crate::health::scheduler::Prober for Switchboard {
        fn attempt<'a>(
            &'a self,
            _: &'a crate::health::HealthCheck,
            target: &'a ProbeTarget,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = crate::health::check::Attempt> + Send + 'a>> {
            let ok = self.0.lock().unwrap().get(&target.addr).copied().unwrap_or(true);
            Box::pin(async move {
                crate::health::check::Attempt {
                    ok,
                    reason: if ok { "connected" } else { "connection refused" }.into(),
                    weight: None,
                    not_run: false,
                }
            })
        }
    }

    fn table(fake: &FakeDataplane) -> Vec<(String, u32)> {
        fake.current().unwrap()[0].backends.iter().map(|b| (b.key(), b.weight)).collect()
    }

    /// A controller of `cfg` with its checks running on switchboard probes, applied once:
    /// (controller, its fake dataplane, the probes, the health events).
    fn checked(cfg: Config) -> (Controller, FakeDataplane, Switchboard, mpsc::Receiver<HealthEvent>) {
        let (mut ctl, fake) = controller(cfg);
        let probes = Switchboard::default();
        let (tx, rx) = mpsc::channel(16);
        ctl.start_health(Scheduler::with_prober(tx, SchedulerOptions::default(), probes.clone()));
        ctl.apply().unwrap();
        (ctl, fake, probes, rx)
    }

    /// Waits (in paused time) for the next health event and hands it to the controller.
    async fn next_event(ctl: &mut Controller, rx: &mut mpsc::Receiver<HealthEvent>) -> HealthEvent {
        let ev = rx.recv().await.expect("health event");
        ctl.on_health([&ev]).unwrap();
        assert_eq!(ctl.applied.as_ref(), Some(&ctl.desired()), "the update of the event's virtual server differs from a full one");
        ev
    }

    #[tokio::test(start_paused = true)]
    async fn failed_checks_leave_the_table_and_quorum_brings_the_sorry_server() {
        let cfg = config(
            "",
            &[
                "address = \"10.0.0.11\"\nhealth_check = { kind = \"tcp\", interval = \"1s\", rise = 2, fall = 2 }",
                "address = \"10.0.0.12\"\nmac = \"02:00:00:00:00:0c\"\nhealth_check = { kind = \"tcp\", interval = \"1s\", rise = 2, fall = 2 }",
                "address = \"10.0.0.13\"\ninhibit_on_failure = true\nhealth_check = { kind = \"tcp\", interval = \"1s\", rise = 2, fall = 2 }",
            ],
        );
        let mut cfg = cfg;
        cfg.virtual_servers[0].quorum = 2;
        cfg.virtual_servers[0].sorry_server = Some("10.0.0.99:80".parse().unwrap());
        let (mut ctl, fake, probes, mut rx) = checked(cfg);
        assert_eq!(table(&fake), [("10.0.0.11:80".into(), 1), ("10.0.0.12:80".into(), 1), ("10.0.0.13:80".into(), 1)]);

        // Out of the table after `fall` failures; the others stay.
        probes.set("10.0.0.11", false);
        let ev = next_event(&mut ctl, &mut rx).await;
        assert_eq!((ev.real_server_key.as_str(), ev.up, ev.reason.as_str()), ("10.0.0.11:80", false, "connection refused"));
        assert_eq!(table(&fake), [("10.0.0.12:80".into(), 1), ("10.0.0.13:80".into(), 1)]);
        let st = ctl.status(&DataplaneStats::default());
        let rs = &st.virtual_servers[0].real_servers;
        assert_eq!((rs[0].state.as_str(), rs[0].weight), ("down", 0));
        let h = &rs[0].health.as_ref().unwrap().state;
        assert_eq!((h.state.as_str(), h.consecutive_fails, h.down_reason.as_deref()), ("down", 2, Some("connection refused")));

        // inhibit_on_failure: kept with weight 0. Live weight 1 < quorum 2: the sorry server alone.
        probes.set("10.0.0.13", false);
        next_event(&mut ctl, &mut rx).await;
        assert_eq!(table(&fake), [("10.0.0.99:80".into(), 1)]);
        let st = ctl.status(&DataplaneStats::default());
        assert!(!st.virtual_servers[0].quorum);
        assert_eq!(st.virtual_servers[0].sorry_server.as_ref().unwrap().state, "serving");
        assert_eq!(st.virtual_servers[0].real_servers[2].state, "inhibited");
        // Healthy, but out of the table while the sorry server serves.
        let rs = &st.virtual_servers[0].real_servers[1];
        assert_eq!((rs.state.as_str(), rs.weight), ("standby", 0));

        // Back after `rise` passes: quorum again, the sorry server goes.
        probes.set("10.0.0.11", true);
        let ev = next_event(&mut ctl, &mut rx).await;
        assert_eq!((ev.real_server_key.as_str(), ev.up), ("10.0.0.11:80", true));
        assert_eq!(table(&fake), [("10.0.0.11:80".into(), 1), ("10.0.0.12:80".into(), 1), ("10.0.0.13:80".into(), 0)]);
        let st = ctl.status(&DataplaneStats::default());
        assert_eq!(st.virtual_servers[0].sorry_server.as_ref().unwrap().state, "standby");
        let rs = &st.virtual_servers[0].real_servers[1];
        assert_eq!((rs.state.as_str(), rs.weight), ("up", 1));
    }

    /// A restart takes back what the lbd before it held beyond the dataplane: its drains (of real
    /// servers with the same configured weight) and its real servers that were down, whose checks
    /// start down until they pass. Before, a restart put a dead real server back into the table
    /// until its checks failed again (`fall` of them), and forgot every drain.
    #[tokio::test(start_paused = true)]
    async fn a_restart_takes_back_the_drains_and_the_real_servers_that_were_down() {
        let dir = std::env::temp_dir().join(format!("lbd-held-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lbd.held.json");
        let _ = std::fs::remove_file(&file);
        let check = "health_check = { kind = \"tcp\", interval = \"1s\", rise = 2, fall = 2 }";
        let reals = [format!("address = \"10.0.0.11\"\n{check}"), format!("address = \"10.0.0.12\"\n{check}"), "address = \"10.0.0.13\"\nweight = 2".into()];
        // An lbd of `reals` whose probes pass but where `failing` says.
        let start = |reals: &[String], failing: &[&str]| {
            let (mut ctl, fake) = controller(config("", &reals.iter().map(String::as_str).collect::<Vec<_>>()));
            ctl.hold_state_in(file.clone());
            let probes = Switchboard::default();
            for addr in failing {
                probes.set(addr, false);
            }
            let (tx, rx) = mpsc::channel(16);
            ctl.start_health(Scheduler::with_prober(tx, SchedulerOptions::default(), probes));
            ctl.apply().unwrap();
            (ctl, fake, rx)
        };

        let (mut ctl, fake, mut rx) = start(&reals, &["10.0.0.11"]);
        next_event(&mut ctl, &mut rx).await;
        let sel = BackendSelector { vip: "10.0.0.100:80".into(), backend: "10.0.0.13".into(), protocol: None };
        ctl.set_drained(&sel, true).unwrap();
        assert_eq!(table(&fake), [("10.0.0.12:80".into(), 1), ("10.0.0.13:80".into(), 0)]);
        drop(ctl);

        // The next lbd, same config: its first table is the one the lbd before left.
        let (mut ctl, fake, mut rx) = start(&reals, &[]);
        assert_eq!(table(&fake), [("10.0.0.12:80".into(), 1), ("10.0.0.13:80".into(), 0)]);
        let st = ctl.status(&DataplaneStats::default());
        let rs = &st.virtual_servers[0].real_servers;
        let health = rs[0].health.as_ref().unwrap();
        assert_eq!((rs[0].state.as_str(), health.state.down_reason.as_deref()), ("down", Some("down when lbd stopped: not checked since")));
        assert!(rs[2].drained, "{rs:?}");
        // Its check passes now: back after `rise`, and no longer down for the next lbd.
        let ev = next_event(&mut ctl, &mut rx).await;
        assert_eq!((ev.real_server_key.as_str(), ev.up), ("10.0.0.11:80", true));
        assert_eq!(table(&fake), [("10.0.0.11:80".into(), 1), ("10.0.0.12:80".into(), 1), ("10.0.0.13:80".into(), 0)]);
        drop(ctl);

        // A config that changed the drained real server's weight ends its drain, as a reload does.
        let changed = [reals[0].clone(), reals[1].clone(), "address = \"10.0.0.13\"\nweight = 3".into()];
        let (ctl, fake, _) = start(&changed, &[]);
        assert_eq!(table(&fake), [("10.0.0.11:80".into(), 1), ("10.0.0.12:80".into(), 1), ("10.0.0.13:80".into(), 3)]);
        drop(ctl);
        // A file that is not lbd's: logged, and started without it.
        std::fs::write(&file, "{not json").unwrap();
        let (_ctl, fake, _) = start(&reals, &[]);
        assert_eq!(table(&fake), [("10.0.0.11:80".into(), 1), ("10.0.0.12:80".into(), 1), ("10.0.0.13:80".into(), 2)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Events that arrive together are handled as one update of every virtual server they name;
    /// the others keep their table.
    #[tokio::test(start_paused = true)]
    async fn events_together_update_each_virtual_server_they_name() {
        let hc = "health_check = { kind = \"tcp\", interval = \"1s\", rise = 1, fall = 1 }";
        let mut cfg = config("", &[&format!("address = \"10.0.0.11\"\n{hc}"), &format!("address = \"10.0.0.12\"\n{hc}")]);
        for port in [81, 82] {
            let mut vs = cfg.virtual_servers[0].clone();
            vs.port = port;
            if port == 82 {
                vs.real_servers.retain(|rs| rs.address.to_string() == "10.0.0.12");
            }
            cfg.virtual_servers.push(vs);
        }
        let (mut ctl, fake, probes, mut rx) = checked(cfg);
        let tables = |fake: &FakeDataplane| -> Vec<Vec<String>> {
            fake.current().unwrap().iter().map(|s| s.backends.iter().map(BackendSpec::key).collect()).collect()
        };
        let all = vec!["10.0.0.11:80".to_string(), "10.0.0.12:80".to_string()];
        assert_eq!(tables(&fake), [all.clone(), all.clone(), vec!["10.0.0.12:80".to_string()]]);

        // 10.0.0.11 serves ports 80 and 81: two events, one update.
        probes.set("10.0.0.11", false);
        let events = [rx.recv().await.unwrap(), rx.recv().await.unwrap()];
        let mut named: Vec<&str> = events.iter().map(|e| e.vip_key.as_str()).collect();
        named.sort();
        assert_eq!(named, ["TCP 10.0.0.100:80", "TCP 10.0.0.100:81"]);
        let updates = fake.applied().len();
        ctl.on_health(&events).unwrap();
        assert_eq!(fake.applied().len(), updates + 1);
        let rest = vec!["10.0.0.12:80".to_string()];
        assert_eq!(tables(&fake), [rest.clone(), rest.clone(), rest.clone()]);
        assert_eq!(ctl.applied.as_ref(), Some(&ctl.desired()));
    }

    #[tokio::test(start_paused = true)]
    async fn reload_keeps_check_state_and_alpha_starts_down() {
        let hc = "health_check = { kind = \"tcp\", interval = \"1s\", rise = 1, fall = 1 }";
        let (mut ctl, fake, probes, mut rx) = checked(config("", &[&format!("address = \"10.0.0.11\"\n{hc}"), "address = \"10.0.0.12\""]));
        probes.set("10.0.0.11", false);
        next_event(&mut ctl, &mut rx).await;
        assert_eq!(table(&fake), [("10.0.0.12:80".into(), 1)]);

        // A reload that leaves the check alone keeps it down; a new checked real server with
        // alpha starts down until its first pass.
        let ifaces = HashMap::from([("eth0".to_string(), ETH0)]);
        let mut new = config("", &[&format!("address = \"10.0.0.11\"\n{hc}"), "address = \"10.0.0.12\"", &format!("address = \"10.0.0.13\"\n{hc}")]);
        new.virtual_servers[0].alpha = true;
        ctl.reload(new, ifaces).unwrap();
        assert_eq!(table(&fake), [("10.0.0.12:80".into(), 1)]);
        let ev = next_event(&mut ctl, &mut rx).await;
        assert_eq!((ev.real_server_key.as_str(), ev.up), ("10.0.0.13:80", true));
        assert_eq!(table(&fake), [("10.0.0.12:80".into(), 1), ("10.0.0.13:80".into(), 1)]);
    }

    /// `alpha` at a take-over: the real servers the kept fast path serves start up (their virtual
    /// server would be empty until the first checks otherwise), the others down; after it, a real
    /// server a reload adds starts down again, and the running checks go on.
    #[tokio::test(start_paused = true)]
    async fn alpha_at_a_take_over_starts_the_kept_real_servers_up() {
        let hc = "health_check = { kind = \"tcp\", interval = \"1s\", rise = 1, fall = 1 }";
        let reals = |n: u8| -> Vec<String> { (11..11 + n).map(|i| format!("address = \"10.0.0.{i}\"\nmac = \"02:00:00:00:00:{i:02x}\"\n{hc}")).collect() };
        let mut cfg = config("", &reals(2).iter().map(String::as_str).collect::<Vec<_>>());
        cfg.virtual_servers[0].alpha = true;
        let vip = VipAddr::of(&cfg.virtual_servers[0]);
        let fake = FakeDataplane::default();
        fake.keep(vec![(vip, "10.0.0.11:80".into())]);
        let ifaces = HashMap::from([("eth0".to_string(), ETH0)]);
        let mut ctl = Controller::new(cfg.clone(), "test.toml".into(), Box::new(fake.clone()), ifaces.clone());
        let (tx, mut rx) = mpsc::channel(16);
        let probes = Switchboard::default();
        ctl.start_health(Scheduler::with_prober(tx, SchedulerOptions::default(), probes.clone()));
        assert!(ctl.taking_over());
        ctl.apply().unwrap();
        assert_eq!(table(&fake), [("10.0.0.11:80".into(), 1)], "the kept real server is up, the other waits for its check");
        ctl.go_live().unwrap();
        assert!(!ctl.taking_over());

        // A reload that adds a real server: it starts down (alpha); the running checks go on.
        let mut new = config("", &reals(3).iter().map(String::as_str).collect::<Vec<_>>());
        new.virtual_servers[0].alpha = true;
        ctl.reload(new, ifaces).unwrap();
        assert_eq!(table(&fake), [("10.0.0.11:80".into(), 1)]);
        let mut up = BTreeSet::new();
        while up.len() < 2 {
            let ev = next_event(&mut ctl, &mut rx).await;
            assert!(ev.up && ev.real_server_key != "10.0.0.11:80", "{ev:?}");
            up.insert(ev.real_server_key);
        }
        assert_eq!(table(&fake), [("10.0.0.11:80".into(), 1), ("10.0.0.12:80".into(), 1), ("10.0.0.13:80".into(), 1)]);
    }

    /// A refused reload leaves the health as it was, also of the checks the new config dropped or
    /// changed (and so stopped): a real server that was down stays out of the table.
    #[tokio::test(start_paused = true)]
    async fn a_refused_reload_keeps_the_health_of_checks_it_dropped_or_changed() {
        let hc = "health_check = { kind = \"tcp\", interval = \"1s\", rise = 1, fall = 1 }";
        let old = config("", &[&format!("address = \"10.0.0.11\"\n{hc}"), &format!("address = \"10.0.0.12\"\n{hc}"), &format!("address = \"10.0.0.13\"\n{hc}")]);
        let (mut ctl, fake, probes, mut rx) = checked(old);
        for down in ["10.0.0.11", "10.0.0.12"] {
            probes.set(down, false);
            next_event(&mut ctl, &mut rx).await;
        }
        assert_eq!(table(&fake), [("10.0.0.13:80".into(), 1)]);

        // The new config drops 10.0.0.11 and changes 10.0.0.12's check; the dataplane refuses it.
        let changed = "health_check = { kind = \"tcp\", interval = \"2s\", rise = 1, fall = 1 }";
        let new = config("", &[&format!("address = \"10.0.0.12\"\n{changed}"), &format!("address = \"10.0.0.13\"\n{hc}")]);
        fake.fail_next("map full");
        let ifaces = HashMap::from([("eth0".to_string(), ETH0)]);
        // As `reload` does: the interfaces' addresses read again, changed since (the VIP put on
        // eth0): the checks' source changes, and with it their configs.
        ctl.set_addresses(HashMap::from([("eth0".to_string(), vec!["10.0.0.100".parse().unwrap(), "10.0.0.5".parse().unwrap()])]));
        assert!(ctl.reload(new, ifaces).is_err());
        assert_eq!(table(&fake), [("10.0.0.13:80".into(), 1)], "the refused reload brought failed real servers back");
        let st = ctl.status(&DataplaneStats::default());
        let states: Vec<&str> = st.virtual_servers[0].real_servers.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, ["down", "down", "unresolved"], "unresolved: up, its MAC not yet known");
    }

    /// A restored snapshot (what a reload whose new VRRP did not start goes back to) is the
    /// state as it was, not a reload of the old config: a real server the new config dropped is
    /// down again (its check does not start over, up), one it re-weighted is drained again, and
    /// the quorum lost stays lost.
    #[tokio::test(start_paused = true)]
    async fn a_restored_snapshot_keeps_health_drains_and_quorum() {
        let hc = "health_check = { kind = \"tcp\", interval = \"1s\", rise = 1, fall = 1 }";
        let rs = |n: u8, rest: &str| format!("address = \"10.0.0.{n}\"\nmac = \"02:00:00:00:00:{n:02x}\"\n{rest}");
        let mut old = config("", &[&rs(11, hc), &rs(12, ""), &rs(13, "")]);
        old.virtual_servers[0].quorum = 2;
        old.virtual_servers[0].sorry_server = Some("10.0.0.99:80".parse().unwrap());
        let (mut ctl, fake, probes, mut rx) = checked(old);
        probes.set("10.0.0.11", false);
        next_event(&mut ctl, &mut rx).await;
        let sel = BackendSelector { vip: "10.0.0.100:80".into(), backend: "10.0.0.12".into(), protocol: None };
        ctl.set_drained(&sel, true).unwrap();
        // Live weight 1 (10.0.0.13) < quorum 2.
        assert_eq!(table(&fake), [("10.0.0.99:80".into(), 1)]);

        let snapshot = ctl.snapshot();
        let mut new = config("", &[&rs(12, "weight = 3"), &rs(13, "")]);
        new.virtual_servers[0].quorum = 2;
        new.virtual_servers[0].sorry_server = Some("10.0.0.99:80".parse().unwrap());
        ctl.reload(new, HashMap::from([("eth0".to_string(), ETH0)])).unwrap();
        assert_eq!(table(&fake), [("10.0.0.12:80".into(), 3), ("10.0.0.13:80".into(), 1)]);

        ctl.restore(snapshot, true).unwrap();
        assert_eq!(table(&fake), [("10.0.0.99:80".into(), 1)]);
        let st = ctl.status(&DataplaneStats::default());
        let states: Vec<&str> = st.virtual_servers[0].real_servers.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, ["down", "drained", "standby"], "standby: up, but the sorry server serves");
        assert!(!st.virtual_servers[0].quorum);
        assert_eq!(ctl.applied.as_ref(), Some(&ctl.desired()));
    }

    /// A reload the dataplane refuses announces no quorum change it would have made (no
    /// `quorum_down` run); the same reload accepted does.
    #[tokio::test]
    async fn a_refused_reload_runs_no_quorum_command() {
        let dir = std::env::temp_dir().join(format!("lbd-quorum-news-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ran = dir.join("quorum-down-ran");
        let reals = ["address = \"10.0.0.11\"", "address = \"10.0.0.12\""];
        let (mut ctl, fake, _probes, _rx) = checked(config("", &reals));
        // Quorum 3 of a live weight of 2: lost under the new config.
        let mut new = config("", &reals);
        new.virtual_servers[0].quorum = 3;
        new.virtual_servers[0].quorum_down =
            Some(crate::health::config::CommandText::Argv(vec!["touch".into(), ran.display().to_string()]));
        let ifaces = || HashMap::from([("eth0".to_string(), ETH0)]);
        fake.fail_next("map full");
        assert!(ctl.reload(new.clone(), ifaces()).is_err());
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(!ran.exists(), "a refused reload ran quorum_down");
        ctl.reload(new, ifaces()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !ran.exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(ran.exists(), "the accepted reload did not run quorum_down");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A reload undone after it went through (its new VRRP did not start) announces the quorum
    /// it goes back to: the reload's `quorum_down` ran, so the restored config's `quorum_up` runs.
    #[tokio::test]
    async fn an_undone_reload_announces_the_quorum_it_restores() {
        let dir = std::env::temp_dir().join(format!("lbd-quorum-back-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (down, up) = (dir.join("quorum-down-ran"), dir.join("quorum-up-ran"));
        let touch = |f: &std::path::Path| Some(crate::health::config::CommandText::Argv(vec!["touch".into(), f.display().to_string()]));
        let reals = ["address = \"10.0.0.11\"", "address = \"10.0.0.12\""];
        let mut old = config("", &reals);
        old.virtual_servers[0].quorum_up = touch(&up);
        let (mut ctl, _fake, _probes, _rx) = checked(old);
        ctl.apply().unwrap();
        let snapshot = ctl.snapshot();
        // Quorum 3 of a live weight of 2: lost under the new config.
        let mut new = config("", &reals);
        new.virtual_servers[0].quorum = 3;
        new.virtual_servers[0].quorum_down = touch(&down);
        ctl.reload(new, HashMap::from([("eth0".to_string(), ETH0)])).unwrap();
        let appears = |f: std::path::PathBuf| async move {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !f.exists() && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            f.exists()
        };
        assert!(appears(down.clone()).await, "the reload did not run quorum_down");
        ctl.restore(snapshot, true).unwrap();
        assert!(ctl.status(&DataplaneStats::default()).virtual_servers[0].quorum);
        assert!(appears(up.clone()).await, "going back did not run quorum_up");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_real_server_switched_to_kind_none_serves_again() {
        let rs = "address = \"10.0.0.11\"\nmac = \"02:00:00:00:00:0b\"";
        let tcp = format!("{rs}\nhealth_check = {{ kind = \"tcp\", interval = \"1s\", rise = 1, fall = 1 }}");
        let (mut ctl, fake, probes, mut rx) = checked(config("", &[&tcp, "address = \"10.0.0.12\""]));
        probes.set("10.0.0.11", false);
        next_event(&mut ctl, &mut rx).await;
        assert_eq!(table(&fake), [("10.0.0.12:80".into(), 1)]);
        // `none`: not checked any more, so up, at the reload itself.
        let ifaces = HashMap::from([("eth0".to_string(), ETH0)]);
        let none = format!("{rs}\nhealth_check = {{ kind = \"none\" }}");
        ctl.reload(config("", &[&none, "address = \"10.0.0.12\""]), ifaces).unwrap();
        assert_eq!(table(&fake), [("10.0.0.11:80".into(), 1), ("10.0.0.12:80".into(), 1)]);
        let status = ctl.status(&DataplaneStats::default());
        assert_eq!(status.virtual_servers[0].real_servers[0].state, "up");
    }

    #[test]
    fn checks_leave_from_an_own_address_where_the_interface_holds_a_vip() {
        let (mut ctl, _) = controller(config("", &["address = \"10.0.0.11\"\nhealth_check = { kind = \"tcp\" }"]));
        let addrs = |list: &[&str]| HashMap::from([("eth0".to_string(), list.iter().map(|a| a.parse().unwrap()).collect())]);
        ctl.set_addresses(addrs(&["169.254.0.1", "10.0.0.100", "10.0.0.5", "fd00::5"]));
        assert_eq!(ctl.check_configs()[0].target.source, Some("10.0.0.5".parse().unwrap()));
        // Without a VIP on the interface, the kernel chooses.
        ctl.set_addresses(addrs(&["10.0.0.5", "fd00::5"]));
        assert_eq!(ctl.check_configs()[0].target.source, None);
        let check = &ctl.check_configs()[0];
        assert_eq!((check.key.vip_key.as_str(), check.key.real_server_key.as_str()), ("TCP 10.0.0.100:80", "10.0.0.11:80"));
        assert_eq!(check.target.vip.map(|p| (p.vip, p.dst_mac)), Some(("10.0.0.100".parse().unwrap(), None)));
    }

    /// VIP 10.0.0.100 (covered by VI_1 when `vrrp` says so) and 10.0.0.200 (never covered).
    fn vrrp_config(vrrp: &str) -> Config {
        let text = format!(
            "[director]\ninterface = \"eth0\"\n[[virtual_server]]\naddress = \"10.0.0.100\"\nport = 80\n\
             [[virtual_server.real_server]]\naddress = \"10.0.0.11\"\n\
             [[virtual_server]]\naddress = \"10.0.0.200\"\nport = 80\n{vrrp}"
        );
        Config::parse(&text, "test.toml").expect("valid config")
    }

    const VI_1: &str =
        "[[vrrp_instance]]\nname = \"VI_1\"\ninterface = \"eth0\"\nvirtual_router_id = 51\nvirtual_addresses = [\"10.0.0.100\"]\n";

    fn enabled(fake: &FakeDataplane) -> Vec<(String, bool)> {
        fake.current().unwrap().iter().map(|s| (s.vip.addr.to_string(), s.enabled)).collect()
    }

    fn owned(addrs: &[&str]) -> HashSet<IpAddr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn vrrp_ownership_enables_only_the_vips_it_covers() {
        let (mut ctl, fake) = controller(vrrp_config(VI_1));
        ctl.apply().unwrap();
        // Until VRRP says we are master, the covered VIP is dropped; the other is always carried.
        let dropped = vec![("10.0.0.100".to_string(), false), ("10.0.0.200".to_string(), true)];
        let carried = vec![("10.0.0.100".to_string(), true), ("10.0.0.200".to_string(), true)];
        assert_eq!(enabled(&fake), dropped);
        assert!(!ctl.status(&DataplaneStats::default()).virtual_servers[0].enabled);

        assert!(ctl.set_vrrp_owned(owned(&["10.0.0.100"])));
        ctl.apply().unwrap();
        assert_eq!(enabled(&fake), carried);
        assert!(ctl.status(&DataplaneStats::default()).virtual_servers[0].enabled);
        assert!(!ctl.set_vrrp_owned(owned(&["10.0.0.100"])), "no change, nothing to apply");
        // Owning an address no virtual server has changes nothing in the dataplane.
        assert!(ctl.set_vrrp_owned(owned(&["10.0.0.100", "10.0.0.7"])));
        ctl.apply().unwrap();
        assert_eq!(enabled(&fake), carried);

        // Back to backup (what the run loop does on a state change): dropped again at once.
        ctl.set_vrrp_owned(owned(&["10.0.0.100"]));
        let before = fake.applied().len();
        sync_vrrp(&mut ctl, None);
        assert_eq!(fake.applied().len(), before + 1, "applied once");
        assert_eq!(enabled(&fake), dropped);
        sync_vrrp(&mut ctl, None);
        assert_eq!(fake.applied().len(), before + 1, "nothing changed, nothing applied");

        // A reload without VRRP carries every VIP; one that covers the VIP again drops it.
        let ifaces = || HashMap::from([("eth0".to_string(), ETH0)]);
        ctl.reload(vrrp_config(""), ifaces()).unwrap();
        assert_eq!(enabled(&fake), carried);
        ctl.reload(vrrp_config(VI_1), ifaces()).unwrap();
        assert_eq!(enabled(&fake), dropped);
    }

    #[test]
    fn vrrp_interfaces_must_exist() {
        let cfg = vrrp_config(&VI_1.replace("\"eth0\"", "\"nosuch0\""));
        let err = check_vrrp_ifaces(&cfg.vrrp).unwrap_err();
        assert_eq!(err.to_string(), "[[vrrp_instance]] VI_1: interface nosuch0 not found");
        let cfg = vrrp_config(&VI_1.replace("interface = \"eth0\"", "interface = \"lo\"").replace(
            "[\"10.0.0.100\"]",
            "[{ address = \"10.0.0.100\", dev = \"nosuch1\" }]",
        ));
        let err = check_vrrp_ifaces(&cfg.vrrp).unwrap_err();
        assert_eq!(err.to_string(), "[[vrrp_instance]] VI_1: interface nosuch1 not found");
        check_vrrp_ifaces(&vrrp_config(&VI_1.replace("\"eth0\"", "\"lo\"")).vrrp).unwrap();
    }

    /// A missing interface is reported at the `interface` naming it, as config errors are.
    #[test]
    fn a_missing_interface_is_reported_where_the_config_names_it() {
        // Lines 1-3 [director], 4-6 the virtual server, 7 the real server's table, 9 its interface.
        let cfg = config("", &["address = \"10.0.0.11\"\ninterface = \"nosuch0\""]);
        let err = resolve_ifaces(&cfg, Path::new("test.toml")).unwrap_err().to_string();
        assert!(err.starts_with("test.toml:9:13: interface nosuch0 not found"), "{err}");
        let text = "[director]\ninterface = \"nosuch1\"\n";
        let err = resolve_ifaces(&Config::parse(text, "test.toml").unwrap(), Path::new("test.toml")).unwrap_err();
        assert!(err.to_string().starts_with("test.toml:2:13: interface nosuch1 not found"), "{err}");
        assert!(err.chain().any(|c| c.is::<ConfigMistake>()), "lbd run exits 2 for it");
        // VRRP's interfaces too, before anything is attached (lines 11-15 are VI_1's table).
        let err = resolve_ifaces(&vrrp_config(&VI_1.replace("\"eth0\"", "\"nosuch2\"")), Path::new("test.toml")).unwrap_err();
        assert_eq!(err.to_string(), "test.toml:13:1: [[vrrp_instance]] VI_1: interface nosuch2 not found");
        assert!(err.chain().any(|c| c.is::<ConfigMistake>()));
        let vi = VI_1.replace("[\"10.0.0.100\"]", "[{ address = \"10.0.0.100\", dev = \"nosuch3\" }]");
        let err = resolve_ifaces(&vrrp_config(&vi), Path::new("test.toml")).unwrap_err();
        assert_eq!(err.to_string(), "test.toml:15:1: [[vrrp_instance]] VI_1: interface nosuch3 not found");
        resolve_ifaces(&vrrp_config(VI_1), Path::new("test.toml")).unwrap();
    }

    #[test]
    fn failed_reload_restores_the_running_config() {
        let (mut ctl, fake) = controller(config("", &["address = \"10.0.0.11\""]));
        ctl.apply().unwrap();
        fake.fail_next("map full");
        let ifaces = HashMap::from([("eth0".to_string(), ETH0)]);
        let err = ctl.reload(config("", &["address = \"10.0.0.12\""]), ifaces).unwrap_err();
        assert!(format!("{err:#}").contains("map full"), "{err:#}");
        assert_eq!(ctl.config().virtual_servers[0].real_servers[0].address.to_string(), "10.0.0.11");
        let last = fake.current().unwrap();
        assert_eq!(last[0].backends[0].addr.to_string(), "10.0.0.11", "old state programmed again");
    }

    /// A control connection served by [`serve_request`] with a controller that answers every
    /// request `ok`; returns the client's end and the requests the controller received.
    fn control_connection() -> (tokio::net::UnixStream, std::sync::Arc<std::sync::Mutex<Vec<Request>>>) {
        let (client, server) = tokio::net::UnixStream::pair().unwrap();
        let (tx, mut rx) = mpsc::channel::<ControlMsg>(1);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                log.lock().unwrap().push(req);
                let _ = reply.send(Response { ok: true, ..Default::default() });
            }
        });
        tokio::spawn(serve_request(server, tx));
        (client, seen)
    }

    /// The reply line, read as the CLI reads it (after an over-long request the connection is
    /// then reset: the server closed it with the rest of the request unread).
    async fn reply(client: &mut tokio::net::UnixStream) -> Response {
        let mut out = String::new();
        BufReader::new(client).read_line(&mut out).await.unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("reply {out:?}: {e}"))
    }

    #[tokio::test]
    async fn a_control_request_is_answered() {
        let (mut client, seen) = control_connection();
        client.write_all(b"{\"cmd\":\"status\"}\n").await.unwrap();
        assert!(reply(&mut client).await.ok);
        assert_eq!(*seen.lock().unwrap(), vec![Request::Status]);
    }

    #[tokio::test]
    async fn an_overlong_control_request_is_refused_without_reading_it_all() {
        let (mut client, seen) = control_connection();
        // A valid request padded past the limit: refused, and never handed to the controller.
        let mut line = b"{\"cmd\":\"status\"".to_vec();
        line.resize(MAX_REQUEST as usize + 100, b' ');
        line.extend_from_slice(b"}\n");
        client.write_all(&line).await.unwrap();
        let resp = reply(&mut client).await;
        assert!(!resp.ok);
        assert_eq!(resp.error.as_deref(), Some("bad request: longer than 65536 bytes"));
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_control_connection_is_closed() {
        let (mut client, seen) = control_connection();
        client.write_all(b"{\"cmd\":").await.unwrap();
        let start = tokio::time::Instant::now();
        let resp = reply(&mut client).await;
        assert_eq!(resp.error.as_deref(), Some("no request line within 10 s"));
        assert_eq!(start.elapsed(), REQUEST_TIMEOUT);
        assert!(seen.lock().unwrap().is_empty());
    }
}
