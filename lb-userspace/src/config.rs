//! The configuration file: its TOML layout, defaults and validation.
//!
//! ```toml
//! [director]                       # this host
//! interface = "eth0"               # where VIP traffic arrives and leaves again (one-arm DSR)
//!
//! [[virtual_server]]               # like `ipvsadm -A -t 10.99.0.100:80 -s mh`
//! address = "10.99.0.100"
//! port = 80
//! protocol = "tcp"
//!
//! [[virtual_server.real_server]]   # like `ipvsadm -a -t 10.99.0.100:80 -r 10.99.0.11 -g`
//! address = "10.99.0.11"
//! ```
//!
//! `config/example.toml` shows every key with its default. Unknown keys are errors, and every
//! problem is reported as `FILE:LINE:COL: message` (1-based; the column counts characters), one
//! line per problem: syntax and type errors stop at the first, the checks after parsing report
//! all they find.
//!
//! Adding a key: a field in the `Raw*` struct of its table (the file's layout), the field in the
//! public struct, and one line in `Validator` that checks and converts it.

use std::collections::hash_map::{Entry, HashMap};
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use lb_common::{
    DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_TABLE_SIZE,
};
use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use toml::Spanned;

use crate::duration::parse_duration;
use crate::health::config::{CommandText, HealthCheck, HealthCheckSpec, Via};
use crate::vrrp::{
    spec::{locate_key, not_a_host},
    VrrpInstanceSpec, VrrpScriptSpec, VrrpSpec, VrrpSyncGroupSpec,
};

/// Control socket path used when `[director] control_socket` is not set.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lbd/lbd.sock";

/// `[director] control_socket` of the config at `path`, read from its TOML alone (the default if
/// unset), for the CLI: a config with mistakes elsewhere, being edited while lbd runs the one
/// before, still names the socket. `None` if the file is unreadable or not TOML, or the key is
/// not a string.
pub fn control_socket_of(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = text.parse().ok()?;
    match table.get("director").and_then(|d| d.get("control_socket")) {
        None => Some(PathBuf::from(DEFAULT_CONTROL_SOCKET)),
        Some(socket) => socket.as_str().filter(|s| !s.is_empty()).map(PathBuf::from),
    }
}

/// Schedulers accepted in `[[virtual_server]] scheduler`; the first is the default and the only
/// one the XDP fast path has. The others are IPVS's (`mode = "ipvs"`); `maglev` is IPVS's `mh`.
const SCHEDULERS: &[&str] = &["maglev", "rr", "wrr", "lc", "wlc", "sh", "sed", "nq"];

/// A validated configuration.
///
/// Serializes (e.g. to JSON for `lbd status --json`) with the file's key names; positions are
/// left out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// `[director]`: this host.
    pub director: Director,
    /// The `[[virtual_server]]` tables, in file order.
    #[serde(rename = "virtual_server")]
    pub virtual_servers: Vec<VirtualServer>,
    /// `[[vrrp_instance]]`, `[[vrrp_script]]`, `[[vrrp_sync_group]]` (keepalived's names): the
    /// VRRP instances that decide whether this director carries a VIP. Empty: no VRRP, every
    /// VIP always carried. See `crate::vrrp::spec` for the keys.
    pub vrrp: VrrpSpec,
    /// The interfaces the VRRP instances send on and answer for, where the file names them: for
    /// a FILE:LINE:COL when lbd finds one missing.
    #[serde(skip)]
    pub vrrp_interfaces: Vec<VrrpInterfaceUse>,
    /// What is valid but most likely not meant (a VIP no VRRP instance fails over, a quorum no
    /// weights reach): `lbd check` prints these, `lbd run` logs them at each load.
    #[serde(skip)]
    pub warnings: Vec<Diagnostic>,
}

/// An interface a `[[vrrp_instance]]` names: its `interface`, or a `dev` of its
/// `virtual_addresses` (positioned at that key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VrrpInterfaceUse {
    pub instance: String,
    pub interface: String,
    pub span: Span,
}

/// `[director]`: settings of this director host.
///
/// `max_vips`, `max_backends`, `conntrack_size` and `table_size` size the fast path's maps when
/// the XDP program is loaded: changing them takes effect only after a restart of lbd.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Director {
    /// `interface` (required): the interface VIP traffic arrives on and, in one-arm DSR, leaves
    /// from again towards the real servers. At most 15 bytes, no `/`, `:` or whitespace.
    pub interface: String,
    /// `mode`: which dataplane forwards: `"auto"` (default: native XDP, else generic XDP, else
    /// IPVS, saying in one log line what it picked and why), `"xdp"` or `"ipvs"` (forced; fails
    /// plainly when impossible).
    pub mode: Mode,
    /// `xdp_mode`: how the XDP program is attached with `mode = "xdp"`; `"native"` (default) or
    /// `"generic"`.
    pub xdp_mode: XdpMode,
    /// `table_size`: slots in each virtual server's Maglev lookup table (M in the Maglev paper).
    /// Must be prime, 3..=1_000_003; default 65537. Keep it well above the number of real servers
    /// of any virtual server (Maglev suggests 100 times): each VIP holds two tables of
    /// `table_size` 4-byte slots.
    pub table_size: u32,
    /// `control_socket`: Unix socket the `lbd` commands talk to; default `/run/lbd/lbd.sock`.
    pub control_socket: PathBuf,
    /// `conntrack_size`: entries of each connection table (one for IPv4 flows, one for IPv6),
    /// rounded up to a power of two. 8-way set-associative arrays (lb-ebpf/src/conntrack.rs):
    /// a full set replaces a flow that sent one packet only, before established ones. At least
    /// 1024; default 262144.
    pub conntrack_size: u32,
    /// `max_vips`: how many virtual servers the fast path can hold, 1..=1024; default 64.
    pub max_vips: u32,
    /// `max_backends`: how many real servers (sorry servers included) the fast path can hold over
    /// all virtual servers, 1..=65536; default 4096.
    pub max_backends: u32,
    /// `log_level`: the daemon's log level, `"error"`, `"warn"`, `"info"` (default), `"debug"` or
    /// `"trace"`. Also the level the fast path's per-packet logs are loaded with.
    pub log_level: LogLevel,
    /// `metrics_listen`: `address:port` (IPv6 in brackets) where lbd serves Prometheus metrics
    /// at `/metrics`; unset (default): none.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the `interface` value is in the file (the interface is looked up when lbd starts
    /// or reloads, and one that is missing is reported there).
    #[serde(skip)]
    pub interface_span: Span,
}

/// How the XDP program is attached to the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver (`"native"`): fast; the driver must support XDP.
    #[default]
    Native,
    /// In the generic network stack (`"generic"`): works with any driver, much slower.
    Generic,
}

/// Which dataplane forwards VIP traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Native XDP, else generic XDP, else IPVS.
    #[default]
    Auto,
    /// The XDP fast path, attached as `xdp_mode` says.
    Xdp,
    /// The kernel's IPVS, programmed over generic netlink (for kernels without XDP).
    Ipvs,
}

/// How packets reach a real server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Direct server return (`"dsr"`, IPVS "direct routing", `ipvsadm -g`): only the Ethernet
    /// addresses change; the real server answers the client directly.
    #[default]
    Dsr,
    /// Masquerading (`"nat"`, `ipvsadm -m`, IPVS only): the destination address (and port) are
    /// rewritten; replies must come back through the director.
    Nat,
    /// IP-in-IP (`"tunnel"`, `ipvsadm -i`, IPVS only).
    Tunnel,
}

/// `persistence = { timeout = "300s", netmask = "255.255.255.0" }`: like `ipvsadm -p 300 -M ...`,
/// clients (grouped by `netmask`) stick to one real server for `timeout` after their last
/// connection. IPVS only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Persistence {
    /// Seconds, 1..=[`MAX_PERSISTENCE_SECS`].
    pub timeout_secs: u32,
    /// Prefix length of the client netmask (32 or 128 = each client alone).
    pub prefix_len: u8,
}

/// The longest persistence timeout: 31 days, as `ipvsadm -p` allows. The kernel keeps it in jiffies
/// in an unsigned int, so much longer ones wrap (60 days at HZ=1000 becomes about 10).
pub const MAX_PERSISTENCE_SECS: u32 = 31 * 86_400;

/// Log level of the daemon and of the fast path's per-packet logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

/// Transport protocol of a virtual server; `"tcp"` or `"udp"` in the file.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// `[[virtual_server]]`: a VIP, its port and protocol, and the real servers behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VirtualServer {
    /// `address` (required unless `fwmark` is given): the VIP, IPv4 or IPv6. For a firewall-mark
    /// virtual server, the unspecified address of its `family` (`"ipv4"` default, `"ipv6"`).
    pub address: IpAddr,
    /// `port` (required): 0 = every port of the address (with `mode = "ipvs"` only with
    /// `persistence`, as IPVS forwards nothing else). A specific port of the same address and
    /// protocol is allowed beside it and wins in the fast path.
    pub port: u16,
    /// `protocol`: default `"tcp"`.
    pub protocol: Protocol,
    /// `scheduler`: how new flows are spread over the real servers: `"maglev"` (default), or with
    /// `mode = "ipvs"` one of IPVS's `rr`, `wrr`, `lc`, `wlc`, `sh`, `sed`, `nq`.
    pub scheduler: String,
    /// `forwarding`: `"dsr"` (default); `"nat"` and `"tunnel"` need `mode = "ipvs"`.
    pub forwarding: Forwarding,
    /// `persistence`: sticky clients (IPVS only).
    pub persistence: Option<Persistence>,
    /// `fwmark`: a firewall-mark virtual server (keepalived's `virtual_server fwmark N`, IPVS
    /// only): packets carrying this mark, whatever their address, port and protocol.
    pub fwmark: Option<u32>,
    /// `mh_fallback` (default true with `maglev`) / `mh_port` (default false): IPVS `mh` (maglev)
    /// flags: send new connections of a drained (weight 0) real server to another one rather than
    /// refusing them / hash the source port too (`ipvsadm -b mh-fallback,mh-port`). Only with the
    /// `maglev` scheduler.
    pub mh_fallback: bool,
    pub mh_port: bool,
    /// `quorum` (default 1) and `hysteresis` (default 0), as keepalived's: the virtual server
    /// loses quorum when the summed weight of its live real servers drops below
    /// `quorum - hysteresis` (or to 0) and regains it at `quorum + hysteresis`.
    pub quorum: u32,
    pub hysteresis: u32,
    /// `sorry_server = "ADDR[:PORT]"`: served (in DSR, like a real server) instead of the real
    /// servers while the virtual server has no quorum. The port defaults to the virtual server's.
    pub sorry_server: Option<SocketAddr>,
    /// `quorum_up` / `quorum_down`: commands run (detached, with a time limit) when quorum is
    /// regained / lost; a string for `/bin/sh -c` or an argument array.
    pub quorum_up: Option<CommandText>,
    pub quorum_down: Option<CommandText>,
    /// `alpha` (default false): checked real servers start down until their first pass.
    pub alpha: bool,
    /// The `[[virtual_server.real_server]]` tables, in file order. May be empty: the VIP's traffic
    /// is then dropped and counted as no-backend.
    #[serde(rename = "real_server")]
    pub real_servers: Vec<RealServer>,
    /// Where this `[[virtual_server]]` table starts in the file.
    #[serde(skip)]
    pub span: Span,
}

/// `[[virtual_server.real_server]]`: a backend. With DSR it has the VIP on a loopback interface
/// and answers clients directly; the director only rewrites the Ethernet destination.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RealServer {
    /// `address` (required): used to find the real server's MAC address (and for health checks).
    /// With `mode = "ipvs"`, of the virtual server's family unless `forwarding = "tunnel"`.
    pub address: IpAddr,
    /// Where the `address` value is in the file (for mistakes only lbd run finds, such as an
    /// address of the director itself).
    #[serde(skip)]
    pub address_span: Span,
    /// `port`: defaults to the virtual server's port. DSR cannot rewrite ports, so a given port
    /// must equal the virtual server's, unless that is 0 (every port).
    pub port: u16,
    /// `weight`: 0..=65535, default 1. 0 = drained: still configured, keeps its established flows,
    /// gets no new ones.
    pub weight: u32,
    /// `mac`: e.g. `"02:00:00:00:00:01"`; when absent, resolved from the neighbour table.
    #[serde(serialize_with = "serialize_mac")]
    pub mac: Option<[u8; 6]>,
    /// `interface`: when the real server is reached through another interface than
    /// `[director] interface` (frames are then sent there with `XDP_REDIRECT`).
    pub interface: Option<String>,
    /// Where the `interface` value is in the file, with one (see [`Director::interface_span`]).
    #[serde(skip)]
    pub interface_span: Option<Span>,
    /// `health_check`: this real server's own table over its virtual server's `health_check`
    /// (key by key); `None`: not checked, always up.
    pub health_check: Option<HealthCheck>,
    /// `inhibit_on_failure` (default: the virtual server's, else false): when its check fails it
    /// stays with weight 0 (keeps its established flows, gets no new ones) instead of leaving the
    /// table.
    pub inhibit_on_failure: bool,
    /// `notify_up` / `notify_down`: commands run (detached, with a time limit) when its check
    /// brings it up / takes it down.
    pub notify_up: Option<CommandText>,
    pub notify_down: Option<CommandText>,
    /// Where this `[[virtual_server.real_server]]` table starts in the file.
    #[serde(skip)]
    pub span: Span,
}

/// A position in the configuration file, 1-based; `col` counts characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Span {
    pub line: usize,
    pub col: usize,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read configuration: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a valid configuration: one diagnostic per problem, in file order, never
    /// empty. Displayed one per line.
    #[error("{}", one_per_line(.0))]
    Invalid(Vec<Diagnostic>),
}

impl ConfigError {
    /// The problems found in the file; empty for [`ConfigError::Read`].
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid(diagnostics) => diagnostics,
        }
    }
}

/// One problem in a configuration file, displayed as `FILE:LINE:COL: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct Diagnostic {
    /// The file name as given to [`Config::parse`] (the path for [`Config::load`]).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// What is wrong, on one line.
    pub message: String,
}

fn one_per_line(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads and validates the configuration file at `path`; diagnostics name the file as `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration `text`; `file_name` is only used in diagnostics.
    pub fn parse(text: &str, file_name: &str) -> Result<Config, ConfigError> {
        let lines = Lines::new(text);
        let raw: RawConfig = toml::from_str(text).map_err(|error| {
            let (at, message) = reword_at(text, error.span().map_or(0, |span| span.start), error.message());
            ConfigError::Invalid(vec![lines.diagnostic(file_name, at, message)])
        })?;
        let mut validator = Validator {
            file: file_name,
            lines,
            problems: Vec::new(),
            macs: HashMap::new(),
        };
        match validator.config(&raw) {
            Some(mut config) if validator.problems.is_empty() => {
                config.warnings = validator.warnings(&raw, &config);
                Ok(config)
            }
            // Every check that yields `None` has recorded a problem.
            _ => {
                let mut problems = validator.problems;
                problems.sort_by_key(|d| (d.line, d.col));
                // A virtual server's health_check is checked with each real server inheriting it.
                problems.dedup();
                Err(ConfigError::Invalid(problems))
            }
        }
    }
}

fn serialize_mac<S: Serializer>(mac: &Option<[u8; 6]>, serializer: S) -> Result<S::Ok, S::Error> {
    match mac {
        Some(mac) => {
            let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
            serializer.serialize_some(&hex.join(":"))
        }
        None => serializer.serialize_none(),
    }
}

// The file's layout. Values that are checked after parsing are `Spanned` so that problems point
// at them; integers are read as i64 so that range errors get our wording.

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawConfig {
    director: RawDirector,
    #[serde(default)]
    virtual_server: Vec<Spanned<RawVirtualServer>>,
    #[serde(default)]
    vrrp_instance: Vec<Spanned<VrrpInstanceSpec>>,
    #[serde(default)]
    vrrp_script: Vec<Spanned<VrrpScriptSpec>>,
    #[serde(default)]
    vrrp_sync_group: Vec<Spanned<VrrpSyncGroupSpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawDirector {
    interface: Spanned<String>,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    xdp_mode: XdpMode,
    table_size: Option<Spanned<i64>>,
    control_socket: Option<Spanned<PathBuf>>,
    conntrack_size: Option<Spanned<i64>>,
    max_vips: Option<Spanned<i64>>,
    max_backends: Option<Spanned<i64>>,
    #[serde(default)]
    log_level: LogLevel,
    metrics_listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawVirtualServer {
    address: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    protocol: Option<Spanned<Protocol>>,
    scheduler: Option<Spanned<String>>,
    forwarding: Option<Spanned<Forwarding>>,
    persistence: Option<Spanned<RawPersistence>>,
    fwmark: Option<Spanned<i64>>,
    family: Option<Spanned<String>>,
    mh_fallback: Option<Spanned<bool>>,
    mh_port: Option<Spanned<bool>>,
    health_check: Option<Spanned<HealthCheckSpec>>,
    inhibit_on_failure: Option<Spanned<bool>>,
    alpha: Option<Spanned<bool>>,
    quorum: Option<Spanned<i64>>,
    hysteresis: Option<Spanned<i64>>,
    sorry_server: Option<Spanned<String>>,
    quorum_up: Option<Spanned<CommandText>>,
    quorum_down: Option<Spanned<CommandText>>,
    #[serde(default)]
    real_server: Vec<Spanned<RawRealServer>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawPersistence {
    timeout: Spanned<Seconds>,
    netmask: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
struct RawRealServer {
    address: Spanned<String>,
    port: Option<Spanned<i64>>,
    weight: Option<Spanned<i64>>,
    mac: Option<Spanned<String>>,
    interface: Option<Spanned<String>>,
    health_check: Option<Spanned<HealthCheckSpec>>,
    inhibit_on_failure: Option<Spanned<bool>>,
    notify_up: Option<Spanned<CommandText>>,
    notify_down: Option<Spanned<CommandText>>,
}

/// A duration written as text (`"300s"`) or, as keepalived writes it, a number of seconds.
#[derive(Deserialize)]
#[serde(untagged, expecting = "invalid persistence timeout: write a duration such as \"300s\" or a whole number of seconds")]
enum Seconds {
    Text(String),
    Number(i64),
}

impl Seconds {
    fn text(&self) -> String {
        match self {
            Seconds::Text(t) => t.clone(),
            Seconds::Number(n) => format!("{n}s"),
        }
    }
}

fn table_of(keys: &[&str]) -> Option<&'static str> {
    [
        ("at the top level", keys_of::<RawConfig>()),
        ("in [director]", keys_of::<RawDirector>()),
        ("in [[virtual_server]]", keys_of::<RawVirtualServer>()),
        (
            "in [[virtual_server.real_server]]",
            keys_of::<RawRealServer>(),
        ),
        ("in persistence", keys_of::<RawPersistence>()),
        ("in health_check", keys_of::<HealthCheckSpec>()),
        ("in [[vrrp_instance]]", keys_of::<VrrpInstanceSpec>()),
        ("in [[vrrp_script]]", keys_of::<VrrpScriptSpec>()),
        ("in [[vrrp_sync_group]]", keys_of::<VrrpSyncGroupSpec>()),
    ]
    .into_iter()
    .find(|(_, accepted)| *accepted == keys)
    .map(|(place, _)| place)
}

/// What a virtual server hands down to its real servers.
struct ServerDefaults<'a> {
    /// The virtual server's address (`None` for a firewall mark).
    vip: Option<IpAddr>,
    /// `mode = "ipvs"`: a real server may be this director itself (IPVS's local node: a
    /// loopback address, or the VIP), which the XDP fast path cannot forward to.
    local_node: bool,
    /// `None` when the virtual server's port is itself invalid.
    vip_port: Option<u16>,
    /// True for NAT, the one forwarding method that may change the destination port.
    rewrites_ports: bool,
    /// With `mode = "ipvs"` and other forwarding than tunnel: the virtual server's address (or
    /// its family's, for a firewall mark), whose family the real servers must share.
    ipvs_family: Option<IpAddr>,
    health_check: Option<&'a Spanned<HealthCheckSpec>>,
    inhibit_on_failure: bool,
    /// Why `via = "vip"` cannot reach this virtual server's real servers, if it cannot.
    no_vip_path: Option<&'static str>,
}

/// Checks the parsed file and converts it, collecting every problem.
struct Validator<'a> {
    file: &'a str,
    lines: Lines<'a>,
    problems: Vec<Diagnostic>,
    /// Each real server address's `mac` and the line it was first given on: one host has one MAC.
    macs: HashMap<IpAddr, ([u8; 6], usize)>,
}

impl Validator<'_> {
    fn config(&mut self, raw: &RawConfig) -> Option<Config> {
        let director = self.director(&raw.director);
        if let Some(director) = &director {
            self.limits(raw, director);
        }
        let mut seen = HashMap::new();
        let mut virtual_servers = Vec::new();
        let mode = director.as_ref().map(|d| d.mode);
        for raw_vs in &raw.virtual_server {
            if let Some(vs) = self.virtual_server(raw_vs, mode) {
                let what = match vs.fwmark {
                    Some(mark) => format!("firewall-mark virtual server {mark}"),
                    None => format!("virtual server {}/{}", SocketAddr::new(vs.address, vs.port), vs.protocol),
                };
                let key = (vs.address, vs.port, vs.protocol, vs.fwmark);
                let at = raw_vs.get_ref().address.as_ref().map_or(raw_vs.span().start, |a| a.span().start);
                self.unique(&mut seen, key, at, what);
                virtual_servers.push(vs);
            }
        }
        let vrrp = self.vrrp(raw);
        let vrrp_interfaces = self.vrrp_interfaces(raw);
        Some(Config {
            director: director?,
            virtual_servers,
            vrrp,
            vrrp_interfaces,
            warnings: Vec::new(),
        })
    }

    /// See [`Config::warnings`]; for a config without problems.
    fn warnings(&self, raw: &RawConfig, config: &Config) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        let mut warn = |at: usize, message: String| out.push(self.lines.diagnostic(self.file, at, message));
        let vrrp_addresses: Vec<(IpAddr, &str, usize)> = config
            .vrrp
            .instances
            .iter()
            .zip(&raw.vrrp_instance)
            .flat_map(|(inst, table)| {
                let at = locate_key(self.lines.text, table.span(), "virtual_addresses");
                inst.virtual_addresses.iter().map(move |a| (a.address, inst.name.as_str(), at))
            })
            .collect();
        let nat = config.virtual_servers.iter().any(|vs| vs.forwarding == Forwarding::Nat);
        for (vs, raw_vs) in config.virtual_servers.iter().zip(&raw.virtual_server) {
            let raw_vs = raw_vs.get_ref();
            let at = raw_vs.address.as_ref().map_or(0, |a| a.span().start);
            if vs.fwmark.is_none() && !vrrp_addresses.is_empty() && !vrrp_addresses.iter().any(|(a, ..)| *a == vs.address) {
                warn(
                    at,
                    format!(
                        "warning: virtual server {} is in no [[vrrp_instance]]'s virtual_addresses: this director \
                         forwards it whatever VRRP decides, on a backup too (list it in an instance to fail it over)",
                        vs.address
                    ),
                );
            }
            let total: u64 = vs.real_servers.iter().map(|rs| u64::from(rs.weight)).sum();
            if let Some(q) = raw_vs.quorum.as_ref().filter(|_| u64::from(vs.quorum) > total) {
                warn(
                    q.span().start,
                    format!(
                        "warning: quorum {} is more than the real servers' weights add up to ({total}): the virtual \
                         server never has its quorum{}",
                        vs.quorum,
                        if vs.sorry_server.is_some() { " and always sends to its sorry server" } else { "" }
                    ),
                );
            }
        }
        // With NAT, a VRRP address is often the real servers' gateway, which has no virtual server.
        if !nat {
            for (addr, instance, at) in &vrrp_addresses {
                if !config.virtual_servers.iter().any(|vs| vs.fwmark.is_none() && vs.address == *addr) {
                    warn(
                        *at,
                        format!(
                            "warning: {addr}, a virtual address of instance `{instance}`, is no virtual server's address: \
                             this director answers ARP for it as master but forwards none of its traffic"
                        ),
                    );
                }
            }
        }
        // keepalived warns at load too. Not an error: the file may be checked on another machine
        // than the director it is for.
        for (at, key, command) in self.commands(raw) {
            let Some(program) = absolute_program(&command) else { continue };
            if let Some(problem) = program_problem(program) {
                warn(at, format!("warning: `{key}` runs {program}, which {problem}: the command will fail"));
            }
        }
        out.sort_by_key(|d| (d.line, d.col));
        out.dedup();
        out
    }

    /// Every command the file configures, with where it is (the value, or the key in the VRRP
    /// tables) and its key: health checks' `command`, `quorum_up`/`quorum_down`,
    /// `notify_up`/`notify_down`, the VRRP notify commands and `[[vrrp_script]] script`.
    fn commands(&self, raw: &RawConfig) -> Vec<(usize, &'static str, CommandText)> {
        let mut out = Vec::new();
        let mut add = |key, command: Option<&Spanned<CommandText>>| {
            if let Some(c) = command {
                out.push((c.span().start, key, c.get_ref().clone()));
            }
        };
        for raw_vs in &raw.virtual_server {
            let raw_vs = raw_vs.get_ref();
            add("quorum_up", raw_vs.quorum_up.as_ref());
            add("quorum_down", raw_vs.quorum_down.as_ref());
            add("command", raw_vs.health_check.as_ref().and_then(|h| h.get_ref().command.as_ref()));
            for raw_rs in &raw_vs.real_server {
                let raw_rs = raw_rs.get_ref();
                add("notify_up", raw_rs.notify_up.as_ref());
                add("notify_down", raw_rs.notify_down.as_ref());
                add("command", raw_rs.health_check.as_ref().and_then(|h| h.get_ref().command.as_ref()));
            }
        }
        let text = self.lines.text;
        let notify = raw.vrrp_instance.iter().map(|t| (t.span(), t.get_ref().notify_fields()));
        let group_notify = raw.vrrp_sync_group.iter().map(|t| (t.span(), t.get_ref().notify_fields()));
        for (span, fields) in notify.chain(group_notify) {
            for (key, command) in fields.commands() {
                if let Some(line) = command {
                    out.push((locate_key(text, span.clone(), key), key, CommandText::Shell(line.clone())));
                }
            }
        }
        for table in &raw.vrrp_script {
            let at = locate_key(text, table.span(), "script");
            out.push((at, "script", CommandText::Shell(table.get_ref().script.clone())));
        }
        out
    }

    /// See [`Config::vrrp_interfaces`].
    fn vrrp_interfaces(&self, raw: &RawConfig) -> Vec<VrrpInterfaceUse> {
        let mut out = Vec::new();
        for table in &raw.vrrp_instance {
            let inst = table.get_ref();
            let at = |key| self.lines.position(locate_key(self.lines.text, table.span(), key));
            let mut uses = vec![(inst.interface.clone(), at("interface"))];
            uses.extend(inst.virtual_addresses.iter().filter_map(|a| a.dev.clone()).map(|dev| (dev, at("virtual_addresses"))));
            for (interface, span) in uses {
                if !out.iter().any(|u: &VrrpInterfaceUse| u.instance == inst.name && u.interface == interface) {
                    out.push(VrrpInterfaceUse { instance: inst.name.clone(), interface, span });
                }
            }
        }
        out
    }

    /// The VRRP tables: [`VrrpSpec::validate`]'s problems, each at the key it names (else at
    /// its table). The instances' interfaces are checked by name here and looked up when lbd
    /// starts them. A virtual server whose VIP no instance lists is carried whatever the VRRP
    /// state; one whose VIP an instance lists only while that instance is MASTER.
    fn vrrp(&mut self, raw: &RawConfig) -> VrrpSpec {
        let spec = VrrpSpec {
            instances: raw.vrrp_instance.iter().map(|t| t.get_ref().clone()).collect(),
            scripts: raw.vrrp_script.iter().map(|t| t.get_ref().clone()).collect(),
            sync_groups: raw.vrrp_sync_group.iter().map(|t| t.get_ref().clone()).collect(),
        };
        for problem in spec.validate() {
            let table = match problem.table {
                "vrrp_script" => raw.vrrp_script.get(problem.index).map(Spanned::span),
                "vrrp_sync_group" => raw.vrrp_sync_group.get(problem.index).map(Spanned::span),
                _ => raw.vrrp_instance.get(problem.index).map(Spanned::span),
            };
            let at = table.map_or(0, |span| match problem.field {
                "" => span.start,
                key => locate_key(self.lines.text, span, key),
            });
            self.error(at, problem.message);
        }
        spec
    }

    fn director(&mut self, raw: &RawDirector) -> Option<Director> {
        let interface = self.check(&raw.interface, |name| interface_name(name));
        let table_size = self.check_or(&raw.table_size, DEFAULT_TABLE_SIZE, table_size);
        let control_socket =
            self.check_or(&raw.control_socket, DEFAULT_CONTROL_SOCKET.into(), |p| {
                socket_path(p)
            });
        let conntrack_size = self.check_or(&raw.conntrack_size, DEFAULT_CONNTRACK_SIZE, |n| {
            int("conntrack_size", 1024..=MAX_CONNTRACK_SIZE)(n).map_err(|e| match *n > MAX_CONNTRACK_SIZE {
                true => format!(
                    "{e}: the connection tables take 88 bytes an entry (the size rounded up to a power of two), \
                     {} GiB at the most",
                    (MAX_CONNTRACK_SIZE * 88) >> 30
                ),
                false => e,
            })
        });
        let max_vips = self.check_or(&raw.max_vips, DEFAULT_MAX_VIPS, int("max_vips", 1..=1024));
        let max_backends = self.check_or(
            &raw.max_backends,
            DEFAULT_MAX_BACKENDS,
            int("max_backends", 1..=65536),
        );
        let metrics_listen = self.check_optional(&raw.metrics_listen, |s| listen_address(s));
        Some(Director {
            interface: interface?,
            mode: raw.mode,
            xdp_mode: raw.xdp_mode,
            table_size: table_size?,
            control_socket: control_socket?,
            conntrack_size: conntrack_size?,
            max_vips: max_vips?,
            max_backends: max_backends?,
            log_level: raw.log_level,
            metrics_listen: metrics_listen?,
            interface_span: self.lines.position(raw.interface.span().start),
        })
    }

    /// The fast path's maps are sized from `max_vips` and `max_backends`: the first table past
    /// either limit is an error.
    fn limits(&mut self, raw: &RawConfig, director: &Director) {
        let vss = &raw.virtual_server;
        if let Some(extra) = vss.get(director.max_vips as usize) {
            let message = format!(
                "too many virtual servers: {} configured, but [director] max_vips is {}",
                vss.len(),
                director.max_vips
            );
            self.error(extra.span().start, message);
        }
        // A sorry server takes a real server's place in the fast path while it serves.
        let rss: Vec<usize> = vss
            .iter()
            .flat_map(|vs| {
                let vs = vs.get_ref();
                let reals = vs.real_server.iter().map(|rs| rs.span().start);
                reals.chain(vs.sorry_server.as_ref().map(|s| s.span().start))
            })
            .collect();
        if let Some(&extra) = rss.get(director.max_backends as usize) {
            let message = format!(
                "too many real servers: {} configured over all virtual servers (sorry servers included), but \
                 [director] max_backends is {}",
                rss.len(),
                director.max_backends
            );
            self.error(extra, message);
        }
    }

    /// `mode` is `None` when `[director]` itself is invalid (IPVS-only checks are then skipped).
    fn virtual_server(&mut self, spanned: &Spanned<RawVirtualServer>, mode: Option<Mode>) -> Option<VirtualServer> {
        let start = spanned.span().start;
        let span = self.lines.position(start);
        let raw = spanned.get_ref();
        let ipvs_only = |what: String| -> Result<(), String> {
            match mode {
                Some(Mode::Xdp | Mode::Auto) => Err(format!(
                    "{what} needs [director] mode = \"ipvs\": the XDP fast path does maglev with DSR only"
                )),
                _ => Ok(()),
            }
        };
        let fwmark = self.check_optional(&raw.fwmark, |m| {
            let mark: u32 = int("fwmark", 1..=i64::from(u32::MAX))(m)?;
            ipvs_only("a firewall-mark virtual server".into()).map(|()| mark)
        });
        // The structure follows what was written, even where the mark itself was refused.
        let (address, port, protocol) = match &raw.fwmark {
            Some(_) => {
                for (key, present) in [
                    ("address", raw.address.as_ref().map(|v| v.span().start)),
                    ("port", raw.port.as_ref().map(|v| v.span().start)),
                    ("protocol", raw.protocol.as_ref().map(|v| v.span().start)),
                ] {
                    if let Some(at) = present {
                        self.error(at, format!("`{key}` does not go with `fwmark`: the mark alone selects the traffic"));
                    }
                }
                let family = self.check_or(&raw.family, IpAddr::from([0u8; 4]), |f| match f.as_str() {
                    "ipv4" => Ok(IpAddr::from([0u8; 4])),
                    "ipv6" => Ok(IpAddr::from([0u16; 8])),
                    other => Err(format!("unknown family `{other}`; expected one of: ipv4, ipv6")),
                });
                (family, Some(0), Protocol::Tcp)
            }
            _ => {
                if let Some(f) = &raw.family {
                    self.error(f.span().start, "`family` only goes with `fwmark`; the address gives the family".into());
                }
                let address = match &raw.address {
                    Some(a) => self.check(a, |a| ip_address(a).and_then(|a| unicast(a, "the virtual server's address"))),
                    None => {
                        self.error(start, "missing required key `address` (or `fwmark`) in [[virtual_server]]".into());
                        None
                    }
                };
                let port = match &raw.port {
                    Some(p) => self.check(p, int("port", 0..=65535)),
                    None => {
                        self.error(start, "missing required key `port` in [[virtual_server]]".into());
                        None
                    }
                };
                let protocol = raw.protocol.as_ref().map_or(Protocol::Tcp, |p| *p.get_ref());
                (address, port, protocol)
            }
        };
        let (valid_address, address) = (address, address.unwrap_or(IpAddr::from([0u8; 4])));
        let scheduler = self.check_or(&raw.scheduler, SCHEDULERS[0].to_owned(), |s| {
            let name = scheduler(s)?;
            if name != SCHEDULERS[0] {
                ipvs_only(format!("scheduler `{name}`"))?;
            }
            Ok(name)
        });
        let forwarding = self.check_or(&raw.forwarding, Forwarding::Dsr, |f| match f {
            Forwarding::Dsr => Ok(Forwarding::Dsr),
            Forwarding::Nat => ipvs_only("forwarding `nat`".into()).map(|()| Forwarding::Nat),
            Forwarding::Tunnel => ipvs_only("forwarding `tunnel`".into()).map(|()| Forwarding::Tunnel),
        });
        let persistence = match &raw.persistence {
            None => Some(None),
            Some(p) => match ipvs_only("persistence".into()) {
                Ok(()) => self.persistence(p.get_ref(), address),
                Err(message) => {
                    self.error(p.span().start, message);
                    None
                }
            },
        };
        // IPVS only, and for mh only (other schedulers read the same flag bits differently): a
        // value other than the default, which is what the XDP fast path does, needs both.
        let other_scheduler = scheduler.as_deref().filter(|&s| s != SCHEDULERS[0]);
        let mh = |flag: &Option<Spanned<bool>>, name: &str, default: bool, v: &mut Self| -> Option<bool> {
            v.check_or(flag, default, |&on| {
                if on != default {
                    ipvs_only(format!("`{name} = {on}`"))?;
                    if let Some(other) = other_scheduler {
                        return Err(format!(
                            "`{name}` is an option of the maglev scheduler (IPVS mh), not of `{other}`; remove it or use \
                             scheduler = \"maglev\""
                        ));
                    }
                }
                Ok(on)
            })
        };
        // Default on: without it IPVS mh refuses new connections that hash to a drained (weight 0)
        // real server instead of sending them to another, unlike the XDP fast path.
        let mh_fallback = mh(&raw.mh_fallback, "mh_fallback", other_scheduler.is_none(), self);
        let mh_port = mh(&raw.mh_port, "mh_port", false, self);
        let rewrites_ports = raw.forwarding.as_ref().is_some_and(|f| *f.get_ref() == Forwarding::Nat);
        let tunnels = raw.forwarding.as_ref().is_some_and(|f| *f.get_ref() == Forwarding::Tunnel);
        let ipvs_family = valid_address.filter(|_| mode == Some(Mode::Ipvs) && !tunnels);
        // IPVS takes a port-0 service that is not persistent and then drops all its traffic.
        if let (Some(Mode::Ipvs), None, Some(p), None) = (mode, &raw.fwmark, &raw.port, &raw.persistence) {
            if *p.get_ref() == 0 {
                self.error(
                    p.span().start,
                    "port 0 (every port) needs `persistence` with mode = \"ipvs\": IPVS forwards a port-0 virtual \
                     server only when it is persistent (ipvsadm refuses it otherwise); add persistence = { timeout = \
                     \"300s\" } or give a port"
                        .into(),
                );
            }
        }
        let quorum = self.check_or(&raw.quorum, 1, int("quorum", 1..=i64::from(u32::MAX)));
        let hysteresis = self.check_or(&raw.hysteresis, 0, int("hysteresis", 0..=i64::from(u32::MAX)));
        let sorry_server = self.check_optional(&raw.sorry_server, |text| {
            let sorry = socket_address(text, port.unwrap_or(0))?;
            // keepalived's `sorry_server 127.0.0.1 80` is IPVS's local node (see `local_node`).
            let local = mode == Some(Mode::Ipvs) && (sorry.ip().is_loopback() || sorry.ip() == address);
            if !local {
                unicast(sorry.ip(), "the sorry server's address")?;
            }
            if sorry.is_ipv4() != address.is_ipv4() {
                return Err(format!("sorry server {sorry} is not of the virtual server's address family"));
            }
            if !rewrites_ports {
                dsr_port(sorry.port(), port).map_err(|_| {
                    format!(
                        "DSR cannot rewrite ports: sorry server port {} differs from virtual server port {}",
                        sorry.port(),
                        port.unwrap_or(0)
                    )
                })?;
            }
            Ok(sorry)
        });
        let quorum_up = self.check_optional(&raw.quorum_up, |c| c.checked("quorum_up"));
        let quorum_down = self.check_optional(&raw.quorum_down, |c| c.checked("quorum_down"));
        let alpha = raw.alpha.as_ref().is_some_and(|a| *a.get_ref());
        let defaults = ServerDefaults {
            vip: raw.fwmark.is_none().then_some(address),
            local_node: mode == Some(Mode::Ipvs),
            vip_port: port,
            rewrites_ports,
            ipvs_family,
            health_check: raw.health_check.as_ref(),
            inhibit_on_failure: raw.inhibit_on_failure.as_ref().is_some_and(|i| *i.get_ref()),
            // A `via = "vip"` probe is a plain frame to the real server's MAC, addressed to the VIP.
            no_vip_path: match (&raw.fwmark, raw.forwarding.as_ref().map(|f| *f.get_ref())) {
                (Some(_), _) => Some(
                    "`via = \"vip\"` needs the virtual server's address, and a firewall-mark virtual server has none: \
                     use `via = \"real\"`",
                ),
                (None, Some(Forwarding::Nat)) => Some(
                    "`via = \"vip\"` checks the DSR path, and with forwarding `nat` real servers do not hold the VIP: \
                     use `via = \"real\"`",
                ),
                (None, Some(Forwarding::Tunnel)) => Some(
                    "`via = \"vip\"` checks the DSR path with plain frames to the real server's MAC, and with forwarding \
                     `tunnel` traffic reaches it encapsulated: use `via = \"real\"`",
                ),
                (None, Some(Forwarding::Dsr) | None) => None,
            },
        };
        if raw.real_server.is_empty() {
            // Nothing inherits the table: check it alone, so its mistakes are not silent.
            if let Some(hc) = &raw.health_check {
                self.health_check(hc.get_ref(), hc.span().start, port.unwrap_or(0), defaults.no_vip_path);
            }
        }
        let mut seen = HashMap::new();
        let mut real_servers = Vec::new();
        // Every port (port 0, or a firewall mark) without NAT: packets keep their ports, so a real
        // server's `port` only names where its checks go, and one address twice is one host twice.
        let any_port = port == Some(0) && !rewrites_ports;
        for raw_rs in &raw.real_server {
            if let Some(rs) = self.real_server(raw_rs, &defaults) {
                let (key, what) = match any_port {
                    true => (
                        (rs.address, 0),
                        format!(
                            "real server {} (this virtual server takes every port and keeps it, so the real server's \
                             port does not tell two apart)",
                            rs.address
                        ),
                    ),
                    false => ((rs.address, rs.port), format!("real server {}", SocketAddr::new(rs.address, rs.port))),
                };
                self.unique(&mut seen, key, raw_rs.get_ref().address.span().start, what);
                real_servers.push(rs);
            }
        }
        Some(VirtualServer {
            address,
            port: port?,
            protocol,
            scheduler: scheduler?,
            forwarding: forwarding?,
            persistence: persistence?,
            fwmark: fwmark?,
            mh_fallback: mh_fallback?,
            mh_port: mh_port?,
            quorum: quorum?,
            hysteresis: hysteresis?,
            sorry_server: sorry_server?,
            quorum_up: quorum_up?,
            quorum_down: quorum_down?,
            alpha,
            real_servers,
            span,
        })
    }

    fn persistence(&mut self, raw: &RawPersistence, vip: IpAddr) -> Option<Option<Persistence>> {
        let timeout_secs = self.check(&raw.timeout, |t| {
            let t = &t.text();
            let d = parse_duration(t).map_err(|e| e.to_string())?;
            if d.subsec_nanos() != 0 {
                return Err(format!("persistence timeout must be whole seconds (IPVS counts in seconds), got `{t}`"));
            }
            u32::try_from(d.as_secs()).ok().filter(|&s| (1..=MAX_PERSISTENCE_SECS).contains(&s)).ok_or_else(|| {
                let why = match d.is_zero() {
                    true => "a persistent service keeps a client's real server for at least a second",
                    false => "the kernel counts it in jiffies in 32 bits, and longer ones wrap",
                };
                format!(
                    "persistence timeout must be between 1s and 744h (31 days, {MAX_PERSISTENCE_SECS}s, as ipvsadm -p \
                     allows): {why}; got `{t}`"
                )
            })
        });
        let max = if vip.is_ipv4() { 32 } else { 128 };
        let prefix_len = self.check_or(&raw.netmask, max, |m| netmask(m, vip));
        Some(Some(Persistence { timeout_secs: timeout_secs?, prefix_len: prefix_len? }))
    }

    fn real_server(&mut self, raw: &Spanned<RawRealServer>, defaults: &ServerDefaults) -> Option<RealServer> {
        let (vip_port, rewrites_ports) = (defaults.vip_port, defaults.rewrites_ports);
        let table_at = raw.span().start;
        let span = self.lines.position(table_at);
        let raw = raw.get_ref();
        let address = self.check(&raw.address, |a| {
            let address = ip_address(a)?;
            if defaults.local_node && (address.is_loopback() || defaults.vip == Some(address)) {
                return Ok(address);
            }
            let address = unicast(address, "a real server's address")?;
            if defaults.vip == Some(address) {
                return Err(format!(
                    "real server {address} is the virtual server's own address: give the real server's own \
                     (in DSR it holds the VIP on a loopback interface besides)"
                ));
            }
            match defaults.ipvs_family {
                Some(vip) if vip.is_ipv4() != address.is_ipv4() => {
                    let family = |a: IpAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
                    Err(format!(
                        "real server {address} is {} but the virtual server is {}: IPVS mixes address families only \
                         with forwarding = \"tunnel\"",
                        family(address),
                        family(vip)
                    ))
                }
                _ => Ok(address),
            }
        });
        let port = match &raw.port {
            Some(port) => self.check(port, |p| {
                int("port", 0..=65535)(p).and_then(|p| if rewrites_ports { Ok(p) } else { dsr_port(p, vip_port) })
            }),
            None => vip_port,
        };
        let weight = self.check_or(&raw.weight, 1, int("weight", 0..=65535));
        let mac = self.check_optional(&raw.mac, |m| mac_address(m));
        if let (Some(addr), Some(Some(mac)), Some(at)) = (address, mac, raw.mac.as_ref().map(|m| m.span().start)) {
            let line = self.lines.position(at).line;
            match self.macs.entry(addr) {
                Entry::Occupied(first) if first.get().0 != mac => {
                    let line = first.get().1;
                    self.error(at, format!("real server {addr} was given another mac at line {line}: one address, one MAC"));
                }
                Entry::Occupied(_) => {}
                Entry::Vacant(slot) => {
                    slot.insert((mac, line));
                }
            }
        }
        let interface = self.check_optional(&raw.interface, |name| interface_name(name));
        let own = raw.health_check.as_ref();
        let merged = HealthCheckSpec::merge(defaults.health_check.map(|h| h.get_ref()), own.map(|h| h.get_ref()));
        let health_check = match (merged, port) {
            (Some(spec), Some(port)) => {
                // Problems of the table as a whole belong where the table was written.
                let at = own.or(defaults.health_check).map_or(table_at, |h| h.span().start);
                self.health_check(&spec, at, port, defaults.no_vip_path).map(Some)
            }
            _ => Some(None),
        };
        let inhibit_on_failure = raw.inhibit_on_failure.as_ref().map_or(defaults.inhibit_on_failure, |i| *i.get_ref());
        let notify_up = self.check_optional(&raw.notify_up, |c| c.checked("notify_up"));
        let notify_down = self.check_optional(&raw.notify_down, |c| c.checked("notify_down"));
        Some(RealServer {
            address: address?,
            address_span: self.lines.position(raw.address.span().start),
            port: port?,
            weight: weight?,
            mac: mac?,
            interface: interface?,
            interface_span: raw.interface.as_ref().map(|i| self.lines.position(i.span().start)),
            health_check: health_check?,
            inhibit_on_failure,
            notify_up: notify_up?,
            notify_down: notify_down?,
            span,
        })
    }

    /// Validates a (merged) `health_check` table; problems of the whole table go to `table_at`.
    /// `no_vip_path`: why `via = "vip"` is refused here, if it is.
    fn health_check(
        &mut self,
        spec: &HealthCheckSpec,
        table_at: usize,
        port: u16,
        no_vip_path: Option<&str>,
    ) -> Option<HealthCheck> {
        let result = spec.validate(port);
        let mut via_refused = false;
        if let (Some(why), Some(via)) = (no_vip_path, spec.via.as_ref().filter(|v| *v.get_ref() == Via::Vip)) {
            // Unless `via` was refused already (for the kind).
            if !result.as_ref().is_err_and(|problems| problems.iter().any(|p| p.key == Some("via"))) {
                self.error(via.span().start, why.to_string());
                via_refused = true;
            }
        }
        match result {
            Ok(check) => (!via_refused).then_some(check),
            Err(problems) => {
                for p in problems {
                    self.error(p.at.unwrap_or(table_at), p.message);
                }
                None
            }
        }
    }

    /// Runs `check` on a value; a failure is recorded at the value's position.
    fn check<T, U>(
        &mut self,
        value: &Spanned<T>,
        check: impl FnOnce(&T) -> Result<U, String>,
    ) -> Option<U> {
        check(value.get_ref())
            .map_err(|message| self.error(value.span().start, message))
            .ok()
    }

    /// [`Self::check`] for an optional key: `Some(None)` when it is absent.
    fn check_optional<T, U>(
        &mut self,
        value: &Option<Spanned<T>>,
        check: impl FnOnce(&T) -> Result<U, String>,
    ) -> Option<Option<U>> {
        match value {
            Some(value) => self.check(value, check).map(Some),
            None => Some(None),
        }
    }

    /// [`Self::check`] for an optional key: `default` when it is absent.
    fn check_or<T, U>(
        &mut self,
        value: &Option<Spanned<T>>,
        default: U,
        check: impl FnOnce(&T) -> Result<U, String>,
    ) -> Option<U> {
        self.check_optional(value, check)
            .map(|value| value.unwrap_or(default))
    }

    /// Remembers where `key` was first defined, or reports `what` at `at` as a duplicate of it.
    fn unique<K: Eq + Hash>(
        &mut self,
        seen: &mut HashMap<K, usize>,
        key: K,
        at: usize,
        what: String,
    ) {
        let line = self.lines.position(at).line;
        match seen.entry(key) {
            Entry::Occupied(first) => {
                self.error(
                    at,
                    format!("duplicate {what} (first defined at line {})", first.get()),
                );
            }
            Entry::Vacant(slot) => {
                slot.insert(line);
            }
        }
    }

    fn error(&mut self, at: usize, message: String) {
        self.problems
            .push(self.lines.diagnostic(self.file, at, message));
    }
}

// Checks of single values: `Err` holds the message.

/// An integer key that must lie in `range` and fit `T`.
fn int<T: TryFrom<i64>>(
    key: &'static str,
    range: RangeInclusive<i64>,
) -> impl Fn(&i64) -> Result<T, String> {
    move |&value| {
        range
            .contains(&value)
            .then(|| T::try_from(value).ok())
            .flatten()
            .ok_or_else(|| {
                format!(
                    "{key} must be between {} and {}, got {value}",
                    range.start(),
                    range.end()
                )
            })
    }
}

/// The largest `conntrack_size`: 2^27 entries, 11 GiB of connection tables in the kernel.
const MAX_CONNTRACK_SIZE: i64 = 1 << 27;

fn table_size(value: &i64) -> Result<u32, String> {
    let size = int("table_size", 3..=1_000_003)(value)?;
    if is_prime(size) {
        return Ok(size);
    }
    let mut next = size + 1;
    while !is_prime(next) {
        next += 1;
    }
    Err(format!(
        "table_size {size} is not prime; the next prime is {next}"
    ))
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// Linux interface names: 1 to 15 bytes (IFNAMSIZ - 1), no `/`, `:` or whitespace, not `.`/`..`.
fn interface_name(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err("interface name must not be empty".into());
    }
    if name.len() > 15 {
        return Err(format!(
            "interface name `{name}` is {} bytes long; Linux allows at most 15",
            name.len()
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!(
            "invalid interface name `{name}`: Linux forbids `/`, `:` and whitespace in it, and the names `.` and `..`"
        ));
    }
    Ok(name.to_owned())
}

/// `metrics_listen`: an `address:port` to listen on.
fn listen_address(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.parse().map_err(|_| match text.parse::<IpAddr>() {
        Ok(_) => format!("metrics_listen `{text}` has no port: give `address:port`, e.g. `127.0.0.1:9180`"),
        Err(_) => format!(
            "invalid metrics_listen `{text}`: expected `address:port`, e.g. `127.0.0.1:9180` or `[::1]:9180`"
        ),
    })?;
    match addr.port() {
        0 => Err(format!("metrics_listen `{text}` has port 0, which would listen on a random port: give one, e.g. 9180")),
        _ => Ok(addr),
    }
}

/// A Unix socket path must fit `sun_path` (108 bytes with its terminating NUL).
fn socket_path(path: &Path) -> Result<PathBuf, String> {
    match path.as_os_str().as_bytes().len() {
        0 => Err("control_socket must not be empty".into()),
        // lbd's working directory is not the CLI's (systemd starts it in `/`), and what a
        // restart takes over is found by this path.
        _ if path.is_relative() => Err(format!(
            "control_socket `{}` must be an absolute path, e.g. `/run/lbd/lbd.sock`",
            path.display()
        )),
        len @ 108.. => Err(format!(
            "control_socket path is {len} bytes long; a Unix socket path may have at most 107"
        )),
        _ => Ok(path.to_owned()),
    }
}

/// `address` if it can be a host's (a VIP, a real server): see [`not_a_host`]. `what` names it in
/// the message.
fn unicast(address: IpAddr, what: &str) -> Result<IpAddr, String> {
    match not_a_host(address) {
        Some(problem) => Err(format!("{what} {address} is {problem}")),
        None => Ok(address),
    }
}

fn ip_address(text: &str) -> Result<IpAddr, String> {
    text.parse().map_err(|_| match text.parse::<SocketAddr>() {
        Ok(_) => format!("invalid IP address `{text}`: give the port in `port`, not in `address`"),
        Err(_) => format!("invalid IP address `{text}`"),
    })
}

fn scheduler(name: &str) -> Result<String, String> {
    if SCHEDULERS.contains(&name) {
        return Ok(name.to_owned());
    }
    let lower = name.to_ascii_lowercase();
    let hint = match lower.as_str() {
        "mh" => " (IPVS's `mh`, Maglev hashing, is `maglev` here)".to_owned(),
        other if SCHEDULERS.contains(&other) => format!(" (write it in lower case, `{other}`)"),
        _ => String::new(),
    };
    Err(format!("unknown scheduler `{name}`{hint}; expected one of: {}", SCHEDULERS.join(", ")))
}

/// A persistence netmask: an IPv4 mask (`"255.255.255.0"`) or a prefix length (`"24"`, `"/64"`).
fn netmask(text: &str, vip: IpAddr) -> Result<u8, String> {
    let max: u8 = if vip.is_ipv4() { 32 } else { 128 };
    if let Ok(len) = text.trim_start_matches('/').parse::<u8>() {
        return match len {
            0 if vip.is_ipv6() => Err("netmask /0 is not allowed for an IPv6 virtual server (IPVS takes 1 to 128)".into()),
            _ if len > max => Err(format!("netmask /{len} is longer than {max} bits")),
            _ => Ok(len),
        };
    }
    match text.parse::<std::net::Ipv4Addr>() {
        Ok(mask) if vip.is_ipv4() => {
            let bits = u32::from(mask);
            if bits.leading_ones() + bits.trailing_zeros() == 32 {
                Ok(bits.leading_ones() as u8)
            } else {
                Err(format!("netmask `{text}` is not contiguous"))
            }
        }
        Ok(_) => Err(format!(
            "netmask `{text}` is an IPv4 mask, and the virtual server is IPv6: write a prefix length like \"64\""
        )),
        Err(_) if vip.is_ipv6() => Err(format!("invalid netmask `{text}`; write a prefix length like \"64\"")),
        Err(_) => Err(format!("invalid netmask `{text}`; write a prefix length like \"24\" or an IPv4 mask like \"255.255.255.0\"")),
    }
}

/// `ADDR`, `ADDR:PORT` or `[V6ADDR]:PORT`; the port defaults to `default_port`.
fn socket_address(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Ok(sa);
    }
    match text.parse::<IpAddr>() {
        Ok(ip) => Ok(SocketAddr::new(ip, default_port)),
        Err(_) => Err(format!("invalid address `{text}`; expected ADDR, ADDR:PORT or [IPV6]:PORT")),
    }
}

/// A real server's port under DSR: the packet keeps its destination port.
fn dsr_port(port: u16, vip_port: Option<u16>) -> Result<u16, String> {
    match vip_port {
        Some(vip_port) if vip_port != 0 && port != vip_port => Err(format!(
            "DSR cannot rewrite ports: real server port {port} differs from virtual server port {vip_port}"
        )),
        _ => Ok(port),
    }
}

/// Six two-digit hex bytes separated by colons.
fn mac_address(text: &str) -> Result<[u8; 6], String> {
    let invalid =
        || format!("invalid MAC address `{text}`; expected six hex bytes like 02:00:00:00:00:01");
    let mut parts = text.split(':');
    let mut mac = [0; 6];
    for byte in &mut mac {
        *byte = parts
            .next()
            .filter(|part| part.len() == 2 && part.bytes().all(|c| c.is_ascii_hexdigit()))
            .and_then(|part| u8::from_str_radix(part, 16).ok())
            .ok_or_else(invalid)?;
    }
    match parts.next() {
        Some(_) => Err(invalid()),
        None if mac == [0; 6] => Err(format!("MAC address `{text}` is all zeros: give the real server's own")),
        // The I/G bit: broadcast and multicast frames would go to every port of the segment.
        None if mac[0] & 1 == 1 => Err(format!(
            "MAC address `{text}` is a {} address (the first byte is odd): give the real server's own, a unicast one",
            if mac == [0xff; 6] { "broadcast" } else { "multicast" }
        )),
        None => Ok(mac),
    }
}

/// The program `command` runs when the file names it by an absolute path: the first element of
/// an argument vector, or the first word of a shell line (which may also be a builtin, a
/// variable, ...: only one starting with `/` is a path for sure).
fn absolute_program(command: &CommandText) -> Option<&str> {
    let program = match command {
        CommandText::Shell(line) => line.split(|c: char| c.is_whitespace() || ";&|<>()".contains(c)).find(|w| !w.is_empty())?,
        CommandText::Argv(argv) => argv.first()?,
    };
    program.starts_with('/').then_some(program)
}

/// Why `program` cannot run on this machine, if it cannot: missing, not a regular file, or
/// without any execute bit (which root needs too). An error that only says the user checking
/// may not look (a directory of root's) says nothing: root, running lbd, may.
fn program_problem(program: &str) -> Option<&'static str> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(program) {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
            Some("does not exist on this machine")
        }
        Err(_) => None,
        Ok(m) if !m.is_file() => Some("is not a regular file"),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Some("is not executable (no x permission bit)"),
        Ok(_) => None,
    }
}

// Messages of toml (syntax) and serde (types, keys), reworded for operators, on one line.

/// What lbd calls a keepalived option an operator moving a keepalived.conf over may type, in a
/// table that accepts `expected`.
fn keepalived_hint(key: &str, expected: &[&str]) -> Option<&'static str> {
    Some(match key {
        "delay_loop" => "is `interval` in `health_check`",
        "lb_algo" | "lvs_sched" => "is `scheduler`",
        "lb_kind" | "lvs_method" => "is `forwarding` (\"dsr\", or \"nat\"/\"tunnel\" with IPVS)",
        "persistence_timeout" => "is `persistence = { timeout = \"360s\" }`",
        "virtualhost" => "is `host` in `health_check`",
        "connect_timeout" | "misc_timeout" => "is `timeout` in `health_check`",
        "retry" | "nb_get_retry" => "is `retries` in `health_check`",
        "delay_before_retry" => "is `retry_delay` in `health_check`",
        "connect_port" => "is `port` in `health_check`",
        "url" => "is `path`, `expect_status` and `digest` in `health_check`",
        "status_code" => "is `expect_status` in `health_check`",
        "misc_path" => "is `command` in `health_check = { kind = \"script\" }`",
        "misc_dynamic" => "is `dynamic_weight` in `health_check`",
        "TCP_CHECK" => "is `health_check = { kind = \"tcp\" }`",
        "HTTP_GET" => "is `health_check = { kind = \"http\" }`",
        "SSL_GET" => "is `health_check = { kind = \"https\" }`",
        "MISC_CHECK" => "is `health_check = { kind = \"script\" }`",
        "DNS_CHECK" => "is `health_check = { kind = \"dns\" }`",
        "UDP_CHECK" => "is `health_check = { kind = \"udp\" }`",
        "advert_int" => "is `advert_interval`",
        "virtual_ipaddress" => "is `virtual_addresses`",
        "unicast_src_ip" => "is `unicast_source`",
        "unicast_peer" => "is `unicast_peers`",
        "nopreempt" => "is `preempt = false`",
        "state" if expected.contains(&"priority") => "is not needed: the priority decides which director is master (255: the address owner)",
        "omega" => {
            "is not supported: a stopping lbd leaves its fast path (XDP) or its services (IPVS) serving, so its real \
             servers do not go down"
        }
        "use_vmac" => "is not supported: lbd answers ARP for the VIPs itself, with the interface's MAC",
        "uthreshold" | "lthreshold" => "is not supported: lbd sets no connection thresholds (IPVS: ipvsadm -x/-y)",
        "ha_suspend" => "is not needed: a backup's lbd goes on checking, so a new master starts with current states",
        "script_user" | "enable_script_security" => {
            "is not supported: lbd runs notify, check and quorum commands as the user lbd runs as (root under the \
             shipped unit); a command that should run as another user can switch itself (runuser -u USER -- ...)"
        }
        "PING_CHECK" | "ICMP_CHECK" | "SMTP_CHECK" | "BFD_CHECK" | "FILE_CHECK" => {
            "has no counterpart: lbd's checks are `kind` = \"tcp\", \"http\", \"https\", \"udp\", \"dns\" or \"script\" (a \
             script can ping)"
        }
        "type" if expected.contains(&"query_type") => "is `query_type` in `health_check = { kind = \"dns\" }`",
        "name" if expected.contains(&"query_name") => "is `query_name` in `health_check = { kind = \"dns\" }`",
        _ => return None,
    })
}

/// [`reword`], with what the text at `at` tells: the key whose value was refused, a value that
/// needs quotes (then at the value), a sub-table's header without its array's entry.
fn reword_at(text: &str, at: usize, message: &str) -> (usize, String) {
    let message = reword(message);
    let at = at.min(text.len());
    let line_start = text[..at].rfind('\n').map_or(0, |n| n + 1);
    let line = &text[line_start..text[at..].find('\n').map_or(text.len(), |n| at + n)];
    if message.starts_with("unknown value") || message.starts_with("invalid type") {
        if let Some(key) = key_before(&text[..at]) {
            return (at, format!("`{key}`: {message}"));
        }
    }
    if message.starts_with("expected an array of tables") {
        // `[[virtual_server.real_server]]` with no `[[virtual_server]]` before it.
        let header = line.trim().trim_start_matches('[').trim_end_matches(']');
        if let Some((array, sub)) = header.split_once('.') {
            let message = format!(
                "`[[{line}]]` has no `[[{array}]]` before it to belong to: write the `[[{array}]]` table first, then its \
                 `[[{array}.{sub}]]` entries",
                line = line.trim().trim_matches(['[', ']'])
            );
            return (at, message);
        }
    }
    if message.starts_with("invalid") || message.starts_with("expected") {
        // keepalived writes `virtual_server 10.0.0.1 80`: TOML strings need quotes.
        if let Some((key, after)) = line.split_once('=') {
            let value = after.split('#').next().unwrap_or("").trim();
            let bare = !value.is_empty()
                && !value.starts_with(['"', '\'', '[', '{'])
                && !matches!(value, "true" | "false")
                && value.parse::<f64>().is_err();
            if bare {
                let value_at = line_start + key.len() + 1 + (after.len() - after.trim_start().len());
                return (value_at, format!("`{}`: the value `{value}` needs quotes: {} = \"{value}\"", key.trim(), key.trim()));
            }
        }
    }
    (at, message)
}

/// The key of the value that ends `before` (the text up to the value): the name before the
/// last `=`.
fn key_before(before: &str) -> Option<&str> {
    let head = before[..before.rfind('=')?].trim_end();
    let start = head.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-')).map_or(0, |n| n + 1);
    Some(&head[start..]).filter(|key| !key.is_empty())
}

/// What keepalived (or another spelling) calls a value lbd spells `expected` lists.
fn value_hint(value: &str, expected: &[&str]) -> Option<String> {
    let lower = value.to_ascii_lowercase();
    let ours = match lower.as_str() {
        "dr" | "direct" | "route" | "gatewaying" if expected.contains(&"dsr") => "dsr",
        "tun" | "ipip" if expected.contains(&"tunnel") => "tunnel",
        // keepalived's checker names, as a `kind`.
        "tcp_check" if expected.contains(&"tcp") => "tcp",
        "http_get" if expected.contains(&"http") => "http",
        "ssl_get" if expected.contains(&"https") => "https",
        "misc_check" if expected.contains(&"script") => "script",
        "udp_check" if expected.contains(&"udp") => "udp",
        "dns_check" if expected.contains(&"dns") => "dns",
        "warning" if expected.contains(&"warn") => "warn",
        "masq" | "masquerading" if expected.contains(&"nat") => "nat",
        other => expected.iter().find(|e| **e == other)?,
    };
    Some(match lower == ours {
        true => format!("write it in lower case, `{ours}`"),
        false => format!("`{value}` is `{ours}` here"),
    })
}

fn reword(message: &str) -> String {
    let message = message.trim_end().replace('\n', ": ");
    if let Some(rest) = message.strip_prefix("unknown field ") {
        // "unknown field `k`, expected one of `a`, `b`" (or "expected `a` or `b`")
        let names = backticked(rest);
        if let Some((key, expected)) = names.split_first() {
            let place = table_of(expected).map_or(String::new(), |place| format!(" {place}"));
            let hint = keepalived_hint(key, expected).map_or(String::new(), |hint| format!(": keepalived's `{key}` {hint}"));
            return format!(
                "unknown key `{key}`{place}{hint}; expected one of: {}",
                expected.join(", ")
            );
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let names = backticked(rest);
        if let Some((value, expected)) = names.split_first() {
            let hint = value_hint(value, expected).map_or(String::new(), |hint| format!(" ({hint})"));
            return format!("unknown value `{value}`{hint}; expected one of: {}", expected.join(", "));
        }
    }
    if let Some(key) = message.strip_prefix("missing field ") {
        return format!("missing required key {key}");
    }
    if message == "invalid type: map, expected a sequence" {
        return "expected an array of tables: write [[...]] (double brackets), once per entry"
            .into();
    }
    message.replace("expected i64", "expected an integer")
}

/// The names quoted in backticks, in order.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The keys that serde accepts in the table deserialized as `T`: its derived `deserialize_struct`
/// is handed them, and this probe deserializer catches them.
fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe;

    #[derive(Debug)]
    struct Keys(&'static [&'static str]);

    impl fmt::Display for Keys {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "keys {:?}", self.0)
        }
    }

    impl std::error::Error for Keys {}

    impl serde::de::Error for Keys {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Keys(&[])
        }
    }

    impl<'de> Deserializer<'de> for Probe {
        type Error = Keys;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Keys> {
            Err(Keys(&[]))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Keys> {
            Err(Keys(fields))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    T::deserialize(Probe).err().map_or(&[], |Keys(keys)| keys)
}

/// Byte offsets in the text to 1-based lines and columns (in characters).
struct Lines<'a> {
    text: &'a str,
    /// Byte offset of the start of each line.
    starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Lines { text, starts }
    }

    fn position(&self, offset: usize) -> Span {
        let line = self.starts.partition_point(|&start| start <= offset);
        let start = self.starts[line - 1];
        let col = self.text[start..]
            .char_indices()
            .take_while(|&(i, _)| start + i < offset)
            .count()
            + 1;
        Span { line, col }
    }

    fn diagnostic(&self, file: &str, offset: usize, message: String) -> Diagnostic {
        let Span { line, col } = self.position(offset);
        Diagnostic {
            file: file.to_owned(),
            line,
            col,
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// Lines 1 and 2 of most test files.
    const DIRECTOR: &str = "[director]\ninterface = \"eth0\"\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "t.toml")
    }

    /// The diagnostics for `text`, as displayed.
    fn errors(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(error) => error
                .diagnostics()
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }

    /// The diagnostics for `text` after the `[director]` table, with a virtual server 10.0.0.1:80
    /// on lines 3 to 5 when `vs` is set.
    fn errors_after(vs: bool, rest: &str) -> Vec<String> {
        let vs = if vs {
            "[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n"
        } else {
            ""
        };
        errors(&format!("{DIRECTOR}{vs}{rest}"))
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        Ipv4Addr::new(a, b, c, d).into()
    }

    fn v6(text: &str) -> IpAddr {
        text.parse::<Ipv6Addr>().unwrap().into()
    }

    /// `[director]` with `interface` alone, written as in [`DIRECTOR`].
    fn default_director(interface: &str) -> Director {
        Director {
            interface: interface.into(),
            mode: Mode::Auto,
            xdp_mode: XdpMode::Native,
            table_size: 65537,
            control_socket: "/run/lbd/lbd.sock".into(),
            conntrack_size: 262_144,
            max_vips: 64,
            max_backends: 4096,
            log_level: LogLevel::Info,
            metrics_listen: None,
            interface_span: Span { line: 2, col: 13 },
        }
    }

    fn workspace_file(name: &str) -> PathBuf {
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../config")).join(name)
    }

    #[test]
    fn full_config() {
        let text = r#"[director]
interface = "eth1"
xdp_mode = "generic"
table_size = 251
control_socket = "/tmp/lbd.sock"
conntrack_size = 1024
max_vips = 2
max_backends = 3
log_level = "debug"

[[virtual_server]]
address = "192.0.2.10"
port = 443
protocol = "udp"
scheduler = "maglev"

[[virtual_server.real_server]]
address = "192.0.2.21"
port = 443
weight = 0
mac = "02:00:00:AB:cd:01"
interface = "eth2"

[[virtual_server.real_server]]
address = "192.0.2.22"

  [[virtual_server]]
address = "2001:db8::10"
port = 0

[[virtual_server.real_server]]
address = "2001:db8::21"
port = 8080
"#;
        let expected = Config {
            director: Director {
                interface: "eth1".into(),
                mode: Mode::Auto,
                xdp_mode: XdpMode::Generic,
                table_size: 251,
                control_socket: "/tmp/lbd.sock".into(),
                conntrack_size: 1024,
                max_vips: 2,
                max_backends: 3,
                log_level: LogLevel::Debug,
                metrics_listen: None,
                interface_span: Span { line: 2, col: 13 },
            },
            virtual_servers: vec![
                VirtualServer {
                    address: v4(192, 0, 2, 10),
                    port: 443,
                    protocol: Protocol::Udp,
                    scheduler: "maglev".into(),
                    forwarding: Forwarding::Dsr,
                    persistence: None,
                    fwmark: None,
                    mh_fallback: true,
                    mh_port: false,
                    quorum: 1,
                    hysteresis: 0,
                    sorry_server: None,
                    quorum_up: None,
                    quorum_down: None,
                    alpha: false,
                    real_servers: vec![
                        RealServer {
                            address: v4(192, 0, 2, 21),
                            address_span: Span { line: 18, col: 11 },
                            port: 443,
                            weight: 0,
                            mac: Some([0x02, 0, 0, 0xab, 0xcd, 0x01]),
                            interface: Some("eth2".into()),
                            interface_span: Some(Span { line: 22, col: 13 }),
                            health_check: None,
                            inhibit_on_failure: false,
                            notify_up: None,
                            notify_down: None,
                            span: Span { line: 17, col: 1 },
                        },
                        RealServer {
                            address: v4(192, 0, 2, 22),
                            address_span: Span { line: 25, col: 11 },
                            port: 443,
                            weight: 1,
                            mac: None,
                            interface: None,
                            interface_span: None,
                            health_check: None,
                            inhibit_on_failure: false,
                            notify_up: None,
                            notify_down: None,
                            span: Span { line: 24, col: 1 },
                        },
                    ],
                    span: Span { line: 11, col: 1 },
                },
                VirtualServer {
                    address: v6("2001:db8::10"),
                    port: 0,
                    protocol: Protocol::Tcp,
                    scheduler: "maglev".into(),
                    forwarding: Forwarding::Dsr,
                    persistence: None,
                    fwmark: None,
                    mh_fallback: true,
                    mh_port: false,
                    quorum: 1,
                    hysteresis: 0,
                    sorry_server: None,
                    quorum_up: None,
                    quorum_down: None,
                    alpha: false,
                    real_servers: vec![RealServer {
                        address: v6("2001:db8::21"),
                        address_span: Span { line: 32, col: 11 },
                        port: 8080,
                        weight: 1,
                        mac: None,
                        interface: None,
                        interface_span: None,
                        health_check: None,
                        inhibit_on_failure: false,
                        notify_up: None,
                        notify_down: None,
                        span: Span { line: 31, col: 1 },
                    }],
                    span: Span { line: 27, col: 3 },
                },
            ],
            vrrp: VrrpSpec::default(),
            vrrp_interfaces: vec![],
            warnings: vec![],
        };
        assert_eq!(parse(text).unwrap(), expected);
    }

    #[test]
    fn defaults() {
        let config = parse(DIRECTOR).unwrap();
        assert_eq!(
            config,
            Config {
                director: default_director("eth0"),
                virtual_servers: vec![],
                vrrp: VrrpSpec::default(),
                vrrp_interfaces: vec![],
                warnings: vec![],
            }
        );

        let config = parse(&format!(
            "{DIRECTOR}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 53\n"
        ))
        .unwrap();
        let vs = &config.virtual_servers[0];
        assert_eq!(
            (vs.protocol, vs.scheduler.as_str()),
            (Protocol::Tcp, "maglev")
        );
        // No real servers is allowed: the VIP's traffic is dropped.
        assert!(vs.real_servers.is_empty());
    }

    #[test]
    fn rig_config() {
        let config = Config::load(&workspace_file("rig.toml")).unwrap();
        let director = Director {
            mode: Mode::Xdp,
            control_socket: "/run/lbd/rig.sock".into(),
            metrics_listen: Some("127.0.0.1:9180".parse().unwrap()),
            interface_span: config.director.interface_span,
            ..default_director("eth0")
        };
        assert_eq!(config.director, director);
        let vss: Vec<_> = config
            .virtual_servers
            .iter()
            .map(|vs| (vs.address, vs.port, vs.protocol))
            .collect();
        let vip = v4(10, 99, 0, 100);
        assert_eq!(
            vss,
            [
                (vip, 80, Protocol::Tcp),
                (vip, 5353, Protocol::Udp),
                (v6("fd00:99::100"), 80, Protocol::Tcp)
            ]
        );
        let backends = |vs: &VirtualServer| -> Vec<(IpAddr, u16, u32)> {
            vs.real_servers
                .iter()
                .map(|rs| (rs.address, rs.port, rs.weight))
                .collect()
        };
        let v4_backends = |port| {
            (11..=13)
                .map(|i| (v4(10, 99, 0, i), port, 1))
                .collect::<Vec<_>>()
        };
        assert_eq!(backends(&config.virtual_servers[0]), v4_backends(80));
        assert_eq!(backends(&config.virtual_servers[1]), v4_backends(5353));
        let v6_backends: Vec<_> = ["fd00:99::11", "fd00:99::12", "fd00:99::13"]
            .map(|a| (v6(a), 80, 1))
            .into();
        assert_eq!(backends(&config.virtual_servers[2]), v6_backends);
    }

    #[test]
    fn example_config_shows_the_defaults() {
        let config = Config::load(&workspace_file("example.toml")).unwrap();
        let director = Director { interface_span: config.director.interface_span, ..default_director("eth0") };
        assert_eq!(config.director, director);
        let vs = &config.virtual_servers[0];
        assert_eq!(
            (vs.protocol, vs.scheduler.as_str()),
            (Protocol::default(), SCHEDULERS[0])
        );
        let rs = &vs.real_servers[0];
        assert_eq!(
            (rs.port, rs.weight, rs.mac, &rs.interface),
            (vs.port, 1, None, &None)
        );
        assert_eq!((vs.quorum, vs.hysteresis, vs.alpha, rs.inhibit_on_failure), (1, 0, false, false));
        assert_eq!((&vs.sorry_server, &rs.health_check), (&None, &None));
    }

    #[test]
    fn ipv6_and_port_zero() {
        let text = format!(
            "{DIRECTOR}{}",
            r#"[[virtual_server]]
address = "fd00::100"
port = 0
[[virtual_server.real_server]]
address = "fd00::11"
[[virtual_server.real_server]]
address = "fd00::12"
port = 8080
[[virtual_server]]
address = "fd00::100"
port = 80
[[virtual_server]]
address = "fd00::100"
port = 0
protocol = "udp"
"#
        );
        let config = parse(&text).unwrap();
        let [all_ports, http, udp] = &config.virtual_servers[..] else {
            panic!("{config:?}")
        };
        assert_eq!((all_ports.address, all_ports.port), (v6("fd00::100"), 0));
        // A port-0 VIP may overlap specific ports; its real servers' ports are kept as given.
        let ports: Vec<_> = all_ports
            .real_servers
            .iter()
            .map(|rs| (rs.address, rs.port))
            .collect();
        assert_eq!(ports, [(v6("fd00::11"), 0), (v6("fd00::12"), 8080)]);
        assert_eq!(
            (http.port, http.protocol, udp.port, udp.protocol),
            (80, Protocol::Tcp, 0, Protocol::Udp)
        );
    }

    #[test]
    fn health_checks_are_inherited_and_overridden() {
        let config = parse(&format!(
            r#"{DIRECTOR}[[virtual_server]]
address = "10.0.0.1"
port = 80
health_check = {{ kind = "http", path = "/healthz", interval = "1s", timeout = "500ms", rise = 2, fall = 3 }}
inhibit_on_failure = true
quorum = 2
hysteresis = 1
sorry_server = "10.0.0.9"
quorum_down = "logger quorum lost"
alpha = true
[[virtual_server.real_server]]
address = "10.0.0.2"
notify_down = ["/usr/bin/logger", "down"]
[[virtual_server.real_server]]
address = "10.0.0.3"
inhibit_on_failure = false
health_check = {{ fall = 1 }}
[[virtual_server.real_server]]
address = "10.0.0.4"
health_check = {{ kind = "tcp", port = 22 }}
"#
        ))
        .unwrap();
        let vs = &config.virtual_servers[0];
        assert_eq!((vs.quorum, vs.hysteresis, vs.alpha), (2, 1, true));
        assert_eq!(vs.sorry_server, Some("10.0.0.9:80".parse().unwrap()));
        assert_eq!(vs.quorum_down, Some(CommandText::Shell("logger quorum lost".into())));
        let [a, b, c] = &vs.real_servers[..] else { panic!() };
        let (ha, hb, hc) = (a.health_check.as_ref().unwrap(), b.health_check.as_ref().unwrap(), c.health_check.as_ref().unwrap());
        assert_eq!((ha.kind().as_str(), ha.timing.fall, ha.timing.rise), ("http", 3, 2));
        assert_eq!(a.notify_down, Some(CommandText::Argv(vec!["/usr/bin/logger".into(), "down".into()])));
        // Key by key: only `fall` changes.
        assert_eq!((hb.kind().as_str(), hb.timing.fall, hb.timing.interval), ("http", 1, std::time::Duration::from_secs(1)));
        // Another kind inherits only the timing.
        assert_eq!((hc.kind().as_str(), hc.port, hc.timing.fall), ("tcp", Some(22), 3));
        assert_eq!((a.inhibit_on_failure, b.inhibit_on_failure, c.inhibit_on_failure), (true, false, true));
        assert_eq!(parse(&format!("{DIRECTOR}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n[[virtual_server.real_server]]\naddress = \"10.0.0.2\"\n")).unwrap().virtual_servers[0].real_servers[0].health_check, None);
    }

    #[test]
    fn another_kind_of_check_inherits_only_the_timing() {
        // A DNS service whose real servers report their health on a web port; one is checked
        // with a script, one with DNS itself.
        let text = format!(
            r#"{DIRECTOR}[[virtual_server]]
address = "10.0.0.1"
port = 53
protocol = "udp"
health_check = {{ kind = "http", port = 8080, path = "/health", interval = "2s" }}
[[virtual_server.real_server]]
address = "10.0.0.2"
health_check = {{ kind = "script", command = "/usr/local/bin/check-dns" }}
[[virtual_server.real_server]]
address = "10.0.0.3"
health_check = {{ kind = "dns" }}
[[virtual_server.real_server]]
address = "10.0.0.4"
"#
        );
        let config = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        let [script, dns, http] = &config.virtual_servers[0].real_servers[..] else { panic!() };
        let (script, dns, http) =
            (script.health_check.as_ref().unwrap(), dns.health_check.as_ref().unwrap(), http.health_check.as_ref().unwrap());
        assert_eq!((script.kind().as_str(), script.port), ("script", None));
        assert_eq!((dns.kind().as_str(), dns.port), ("dns", None), "probes the real server's port 53");
        assert_eq!((http.kind().as_str(), http.port), ("http", Some(8080)));
        let two = std::time::Duration::from_secs(2);
        assert_eq!((script.timing.interval, dns.timing.interval), (two, two));
        // A problem of the override is reported at the override.
        assert_eq!(
            errors_after(
                true,
                "health_check = { kind = \"tcp\", port = 8080 }\n[[virtual_server.real_server]]\naddress = \"10.0.0.2\"\n\
                 health_check = { kind = \"script\", port = 22, command = \"true\" }\n"
            ),
            ["t.toml:9:42: `port` applies to kinds `tcp`, `http`, `https`, `udp` and `dns`, not to kind `script`"]
        );
    }

    #[test]
    fn via_vip_needs_a_dsr_virtual_server_with_an_address() {
        let ipvs = "[director]\ninterface = \"eth0\"\nmode = \"ipvs\"\n";
        let dsr = "[[virtual_server]]\naddress = \"10.0.0.3\"\nport = 80\nhealth_check = { kind = \"tcp\", via = \"vip\" }\n\
                   [[virtual_server.real_server]]\naddress = \"10.0.0.13\"\n";
        let config = parse(&format!("{ipvs}{dsr}")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.virtual_servers[0].real_servers[0].health_check.as_ref().unwrap().via, Via::Vip);
        parse(&format!("{DIRECTOR}{dsr}")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            errors(&format!(
                "{ipvs}[[virtual_server]]\nfwmark = 5\nhealth_check = {{ kind = \"tcp\", port = 80, via = \"vip\" }}\n\
                 [[virtual_server.real_server]]\naddress = \"10.0.0.11\"\n[[virtual_server.real_server]]\naddress = \"10.0.0.12\"\n\
                 [[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\nforwarding = \"nat\"\n\
                 [[virtual_server.real_server]]\naddress = \"10.0.0.11\"\nhealth_check = {{ kind = \"tcp\", via = \"vip\" }}\n\
                 [[virtual_server.real_server]]\naddress = \"10.0.0.12\"\nhealth_check = {{ kind = \"http\", via = \"vip\" }}\n\
                 [[virtual_server]]\naddress = \"10.0.0.2\"\nport = 80\nforwarding = \"tunnel\"\n\
                 health_check = {{ kind = \"tcp\", via = \"vip\" }}\n"
            )),
            [
                // Once, however many real servers inherit it.
                "t.toml:6:49: `via = \"vip\"` needs the virtual server's address, and a firewall-mark virtual server has \
                 none: use `via = \"real\"`",
                "t.toml:17:38: `via = \"vip\"` checks the DSR path, and with forwarding `nat` real servers do not hold \
                 the VIP: use `via = \"real\"`",
                // One reason is enough.
                "t.toml:20:39: `via = \"vip\"` works with kind `tcp` only (a handshake addressed to the VIP); kind `http` \
                 must use `via = \"real\"`",
                // Also without real servers.
                "t.toml:25:38: `via = \"vip\"` checks the DSR path with plain frames to the real server's MAC, and with \
                 forwarding `tunnel` traffic reaches it encapsulated: use `via = \"real\"`",
            ]
        );
    }

    #[test]
    fn health_check_problems_point_at_the_value() {
        // A mistake in the virtual server's table is reported once, however many inherit it.
        assert_eq!(
            errors_after(
                true,
                "health_check = { kind = \"http\", interval = \"1 sec\" }\n[[virtual_server.real_server]]\naddress = \"10.0.0.2\"\n\
                 [[virtual_server.real_server]]\naddress = \"10.0.0.3\"\n"
            ),
            ["t.toml:6:44: `interval`: invalid duration \"1 sec\": expected a number and a unit (us, ms, s, m or h), like \"1s\", \"500ms\" or \"1m30s\""]
        );
        assert_eq!(
            errors_after(true, "[[virtual_server.real_server]]\naddress = \"10.0.0.2\"\nhealth_check = { path = \"/\" }\n"),
            ["t.toml:8:16: health_check needs `kind`: one of tcp, http, https, script, udp, dns, none"]
        );
        assert_eq!(
            errors_after(true, "health_check = { kind = \"tcp\", rise = 0 }\n"),
            ["t.toml:6:39: `rise` must be between 1 and 1000, got 0"]
        );
        assert_eq!(
            errors_after(true, "health_check = { kind = \"tcp\", tries = 3 }\n"),
            ["t.toml:6:32: unknown key `tries` in health_check; expected one of: kind, port, via, interval, timeout, \
              retries, retry_delay, rise, fall, warmup, path, host, expect_status, expect_body, digest, tls_verify, \
              ca_file, command, dynamic_weight, payload, expect_reply, query_name, query_type"]
        );
        assert_eq!(
            errors_after(true, "sorry_server = \"10.0.0.9:8080\"\nquorum = 0\nquorum_up = \" \"\n"),
            [
                "t.toml:6:16: DSR cannot rewrite ports: sorry server port 8080 differs from virtual server port 80",
                "t.toml:7:10: quorum must be between 1 and 4294967295, got 0",
                "t.toml:8:13: `quorum_up` must not be empty",
            ]
        );
        assert_eq!(
            errors_after(true, "sorry_server = \"fd00::9\"\n"),
            ["t.toml:6:16: sorry server [fd00::9]:80 is not of the virtual server's address family"]
        );
    }

    #[test]
    fn unknown_keys() {
        assert_eq!(
            errors(&format!("{DIRECTOR}tabel_size = 3\n")),
            ["t.toml:3:1: unknown key `tabel_size` in [director]; expected one of: interface, mode, xdp_mode, \
              table_size, control_socket, conntrack_size, max_vips, max_backends, log_level, metrics_listen"]
        );
        assert_eq!(
            errors(&format!("bogus = 1\n{DIRECTOR}")),
            ["t.toml:1:1: unknown key `bogus` at the top level; expected one of: director, virtual_server, \
              vrrp_instance, vrrp_script, vrrp_sync_group"]
        );
        assert_eq!(
            errors_after(true, "weight = 1\n"),
            ["t.toml:6:1: unknown key `weight` in [[virtual_server]]; expected one of: address, port, protocol, \
              scheduler, forwarding, persistence, fwmark, family, mh_fallback, mh_port, health_check, \
              inhibit_on_failure, alpha, quorum, hysteresis, sorry_server, quorum_up, quorum_down, real_server"]
        );
        assert_eq!(
            errors_after(true, "[[virtual_server.real_server]]\naddress = \"10.0.0.2\"\n  wieght = 2\n"),
            ["t.toml:8:3: unknown key `wieght` in [[virtual_server.real_server]]; expected one of: address, port, \
              weight, mac, interface, health_check, inhibit_on_failure, notify_up, notify_down"]
        );
        // Dotted keys and inline tables are placed by their table too.
        let inline = errors("director = { interface = \"eth0\", modus = \"xdp\" }\n");
        assert!(
            inline[0].starts_with("t.toml:1:34: unknown key `modus` in [director]; "),
            "{inline:?}"
        );
        // keepalived's names say what they are called here.
        assert_eq!(
            errors_after(true, "lb_kind = \"DR\"\n"),
            ["t.toml:6:1: unknown key `lb_kind` in [[virtual_server]]: keepalived's `lb_kind` is `forwarding` (\"dsr\", \
              or \"nat\"/\"tunnel\" with IPVS); expected one of: address, port, protocol, scheduler, forwarding, \
              persistence, fwmark, family, mh_fallback, mh_port, health_check, inhibit_on_failure, alpha, quorum, \
              hysteresis, sorry_server, quorum_up, quorum_down, real_server"]
        );
        let misc = errors_after(true, "[[virtual_server.real_server]]\naddress = \"10.0.0.2\"\nhealth_check = { kind = \"script\", misc_path = \"/x\" }\n");
        assert!(
            misc[0].starts_with("t.toml:8:35: unknown key `misc_path` in health_check: keepalived's `misc_path` is `command` in \
                                 `health_check = { kind = \"script\" }`; expected one of: kind, "),
            "{misc:?}"
        );
        let dotted = errors(&format!("{DIRECTOR}health.port = 1\n"));
        assert!(
            dotted[0].starts_with("t.toml:3:1: unknown key `health` in [director]; "),
            "{dotted:?}"
        );
    }

    #[test]
    fn syntax_and_type_errors() {
        assert_eq!(
            errors("[director]\ninterface = \"eth0\n"),
            ["t.toml:2:18: invalid basic string"]
        );
        assert_eq!(
            errors("[director\n"),
            ["t.toml:1:10: invalid table header: expected `.`, `]`"]
        );
        assert_eq!(
            errors(&format!("{DIRECTOR}interface = \"eth1\"\n")),
            ["t.toml:3:1: duplicate key `interface` in table `director`"]
        );
        assert_eq!(
            errors("[director]\ninterface = 5\n"),
            ["t.toml:2:13: `interface`: invalid type: integer `5`, expected a string"]
        );
        assert_eq!(
            errors(&format!("{DIRECTOR}table_size = 1.5\n")),
            ["t.toml:3:14: `table_size`: invalid type: floating point `1.5`, expected an integer"]
        );
        assert_eq!(
            errors("director = \"eth0\"\n"),
            ["t.toml:1:12: `director`: invalid type: string \"eth0\", expected a table"]
        );
        assert_eq!(
            errors(&format!("{DIRECTOR}xdp_mode = \"fast\"\n")),
            ["t.toml:3:12: `xdp_mode`: unknown value `fast`; expected one of: native, generic"]
        );
        assert_eq!(
            errors_after(true, "protocol = \"sctp\"\n"),
            ["t.toml:6:12: `protocol`: unknown value `sctp`; expected one of: tcp, udp"]
        );
        assert_eq!(errors(""), ["t.toml:1:1: missing required key `director`"]);
        assert_eq!(
            errors("[director]\n"),
            ["t.toml:1:1: missing required key `interface`"]
        );
        assert_eq!(
            errors_after(false, "[[virtual_server]]\nport = 80\n"),
            ["t.toml:3:1: missing required key `address` (or `fwmark`) in [[virtual_server]]"]
        );
        assert_eq!(
            errors_after(false, "[virtual_server]\naddress = \"10.0.0.1\"\n"),
            ["t.toml:3:1: expected an array of tables: write [[...]] (double brackets), once per entry"]
        );
    }

    /// What someone used to keepalived.conf (or ipvsadm) writes gets a pointer to lbd's spelling.
    #[test]
    fn keepalived_habits_get_a_hint() {
        assert_eq!(
            errors_after(true, "protocol = \"TCP\"\n"),
            ["t.toml:6:12: `protocol`: unknown value `TCP` (write it in lower case, `tcp`); expected one of: tcp, udp"]
        );
        assert_eq!(
            errors_after(true, "forwarding = \"DR\"\n"),
            ["t.toml:6:14: `forwarding`: unknown value `DR` (`DR` is `dsr` here); expected one of: dsr, nat, tunnel"]
        );
        assert_eq!(
            errors_after(true, "scheduler = \"mh\"\n"),
            ["t.toml:6:13: unknown scheduler `mh` (IPVS's `mh`, Maglev hashing, is `maglev` here); expected one of: \
              maglev, rr, wrr, lc, wlc, sh, sed, nq"]
        );
        assert_eq!(
            errors_after(false, "[[virtual_server]]\naddress = 10.0.0.1\nport = 80\n"),
            ["t.toml:4:11: `address`: the value `10.0.0.1` needs quotes: address = \"10.0.0.1\""]
        );
        assert_eq!(
            errors_after(false, "[[virtual_server.real_server]]\naddress = \"10.0.0.2\"\n"),
            ["t.toml:3:3: `[[virtual_server.real_server]]` has no `[[virtual_server]]` before it to belong to: write the \
              `[[virtual_server]]` table first, then its `[[virtual_server.real_server]]` entries"]
        );
        let hint = |key: &str| errors_after(true, &format!("{key} = 1\n"));
        assert!(hint("uthreshold")[0].contains("keepalived's `uthreshold` is not supported: lbd sets no connection thresholds"));
        assert!(hint("ha_suspend")[0].contains("keepalived's `ha_suspend` is not needed"));
        assert!(hint("PING_CHECK")[0].contains("keepalived's `PING_CHECK` has no counterpart"));
        // keepalived's global_defs: lbd runs every command as the user it runs as.
        let user = errors(&format!("{DIRECTOR}script_user = \"nobody\"\n"));
        assert!(
            user[0].starts_with("t.toml:3:1: unknown key `script_user` in [director]: keepalived's `script_user` is not \
                                 supported: lbd runs notify, check and quorum commands as the user lbd runs as (root under \
                                 the shipped unit)"),
            "{user:?}"
        );
        let security = errors(&format!("enable_script_security = true\n{DIRECTOR}"));
        assert!(security[0].contains("keepalived's `enable_script_security` is not supported: lbd runs"), "{security:?}");
        let dns = errors_after(true, "health_check = { kind = \"dns\", type = \"A\" }\n");
        assert!(dns[0].contains("keepalived's `type` is `query_type`"), "{dns:?}");
        // keepalived's persistence_timeout is a number of seconds.
        let ipvs = |rest: &str| {
            errors(&format!(
                "[director]\ninterface = \"eth0\"\nmode = \"ipvs\"\n[[virtual_server]]\naddress = \"fd00::1\"\nport = 80\n\
                 {rest}[[virtual_server.real_server]]\naddress = \"fd00::2\"\n"
            ))
        };
        let seconds = parse(
            "[director]\ninterface = \"eth0\"\nmode = \"ipvs\"\n[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n\
             persistence = { timeout = 300 }\n",
        )
        .unwrap();
        assert_eq!(seconds.virtual_servers[0].persistence.map(|p| p.timeout_secs), Some(300));
        assert_eq!(
            ipvs("persistence = { timeout = 300.5 }\n"),
            ["t.toml:7:27: invalid persistence timeout: write a duration such as \"300s\" or a whole number of seconds"]
        );
        assert_eq!(
            ipvs("persistence = { timeout = 0 }\n"),
            ["t.toml:7:27: persistence timeout must be between 1s and 744h (31 days, 2678400s, as ipvsadm -p allows): a \
              persistent service keeps a client's real server for at least a second; got `0s`"]
        );
        // keepalived's checker and log level names, as values.
        assert_eq!(
            errors_after(true, "health_check = { kind = \"TCP_CHECK\" }\n"),
            ["t.toml:6:25: `kind`: unknown value `TCP_CHECK` (`TCP_CHECK` is `tcp` here); expected one of: tcp, http, \
              https, script, udp, dns, none"]
        );
        let level = errors("[director]\ninterface = \"eth0\"\nlog_level = \"warning\"\n");
        assert!(level[0].starts_with("t.toml:3:13: `log_level`: unknown value `warning` (`warning` is `warn` here)"), "{level:?}");
        assert_eq!(
            ipvs("persistence = { timeout = 300, netmask = \"255.255.255.0\" }\n"),
            ["t.toml:7:42: netmask `255.255.255.0` is an IPv4 mask, and the virtual server is IPv6: write a prefix length \
              like \"64\""]
        );
    }

    #[test]
    fn director_values() {
        let director = |line: &str| errors(&format!("{DIRECTOR}{line}\n"));
        assert_eq!(
            director("conntrack_size = 4294967295"),
            ["t.toml:3:18: conntrack_size must be between 1024 and 134217728, got 4294967295: the connection tables take \
              88 bytes an entry (the size rounded up to a power of two), 11 GiB at the most"]
        );
        assert_eq!(
            director("metrics_listen = \"0.0.0.0:0\""),
            ["t.toml:3:18: metrics_listen `0.0.0.0:0` has port 0, which would listen on a random port: give one, e.g. 9180"]
        );
        assert_eq!(
            director("table_size = 65536"),
            ["t.toml:3:14: table_size 65536 is not prime; the next prime is 65537"]
        );
        assert_eq!(
            director("table_size = 2"),
            ["t.toml:3:14: table_size must be between 3 and 1000003, got 2"]
        );
        assert_eq!(
            director("table_size = 1000033"),
            ["t.toml:3:14: table_size must be between 3 and 1000003, got 1000033"]
        );
        assert_eq!(
            director("conntrack_size = 1000"),
            ["t.toml:3:18: conntrack_size must be between 1024 and 134217728, got 1000"]
        );
        assert_eq!(
            director("max_vips = 0"),
            ["t.toml:3:12: max_vips must be between 1 and 1024, got 0"]
        );
        assert_eq!(
            director("max_backends = 65537"),
            ["t.toml:3:16: max_backends must be between 1 and 65536, got 65537"]
        );
        assert_eq!(
            director("control_socket = \"\""),
            ["t.toml:3:18: control_socket must not be empty"]
        );
        assert_eq!(
            director("control_socket = \"lbd.sock\""),
            ["t.toml:3:18: control_socket `lbd.sock` must be an absolute path, e.g. `/run/lbd/lbd.sock`"]
        );
        assert_eq!(
            director("metrics_listen = \"127.0.0.1\""),
            ["t.toml:3:18: metrics_listen `127.0.0.1` has no port: give `address:port`, e.g. `127.0.0.1:9180`"]
        );
        assert_eq!(
            director("metrics_listen = \"localhost:9180\""),
            ["t.toml:3:18: invalid metrics_listen `localhost:9180`: expected `address:port`, e.g. `127.0.0.1:9180` or `[::1]:9180`"]
        );
        let long = format!("control_socket = \"/{}\"", "s".repeat(107));
        assert_eq!(
            director(&long),
            ["t.toml:3:18: control_socket path is 108 bytes long; a Unix socket path may have at most 107"]
        );
        assert_eq!(
            errors("[director]\ninterface = \"\"\n"),
            ["t.toml:2:13: interface name must not be empty"]
        );
        assert_eq!(
            errors("[director]\ninterface = \"enp0s31f6-uplink0\"\n"),
            ["t.toml:2:13: interface name `enp0s31f6-uplink0` is 17 bytes long; Linux allows at most 15"]
        );
        assert_eq!(
            errors("[director]\ninterface = \"eth0:1\"\n"),
            ["t.toml:2:13: invalid interface name `eth0:1`: Linux forbids `/`, `:` and whitespace in it, and the \
              names `.` and `..`"]
        );
        // Columns count characters, not bytes.
        assert_eq!(
            errors("director = { interface = \"é\", table_size = 4 }\n"),
            ["t.toml:1:44: table_size 4 is not prime; the next prime is 5"]
        );
    }

    #[test]
    fn virtual_server_values() {
        let vs = |lines: &str| errors_after(false, &format!("[[virtual_server]]\n{lines}\n"));
        // Addresses no host can have: refused, not left to match nothing.
        for (address, problem) in [
            ("0.0.0.0", "is the unspecified address"),
            ("::", "is the unspecified address"),
            ("224.0.0.18", "is a multicast address"),
            ("ff02::12", "is a multicast address"),
            ("255.255.255.255", "is the broadcast address"),
            ("127.0.0.1", "is a loopback address, which never reaches the director's interface"),
            ("::1", "is a loopback address, which never reaches the director's interface"),
            ("::ffff:10.0.0.1", "is an IPv4-mapped IPv6 address: write it as IPv4, 10.0.0.1"),
        ] {
            assert_eq!(
                vs(&format!("address = \"{address}\"\nport = 80")),
                [format!("t.toml:4:11: the virtual server's address {address} {problem}")]
            );
        }
        let table = |address: &str| format!("sorry_server = \"10.0.0.9\"\n[[virtual_server.real_server]]\naddress = \"{address}\"\n");
        let rs = |address: &str| errors_after(true, &table(address));
        parse(&format!("{DIRECTOR}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n{}", table("10.0.0.11"))).unwrap();
        assert_eq!(rs("0.0.0.0"), ["t.toml:8:11: a real server's address 0.0.0.0 is the unspecified address"]);
        assert_eq!(rs("127.0.0.2"), ["t.toml:8:11: a real server's address 127.0.0.2 is a loopback address, which never reaches the director's interface"]);
        assert_eq!(
            rs("10.0.0.1"),
            ["t.toml:8:11: real server 10.0.0.1 is the virtual server's own address: give the real server's own (in DSR it \
              holds the VIP on a loopback interface besides)"]
        );
        // IPVS's local node: the director itself, as a loopback address or the VIP.
        for local in ["127.0.0.1", "10.0.0.1"] {
            let text = format!("{DIRECTOR}mode = \"ipvs\"\n[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n{}", table(local));
            parse(&text).unwrap();
            parse(&text.replace("sorry_server = \"10.0.0.9\"", "sorry_server = \"127.0.0.1\"")).unwrap();
        }
        assert_eq!(
            errors_after(true, "sorry_server = \"224.0.0.1\"\n"),
            ["t.toml:6:16: the sorry server's address 224.0.0.1 is a multicast address"]
        );
        assert_eq!(
            vs("address = \"10.0.0.256\"\nport = 80"),
            ["t.toml:4:11: invalid IP address `10.0.0.256`"]
        );
        assert_eq!(
            vs("address = \"10.0.0.1:80\"\nport = 80"),
            ["t.toml:4:11: invalid IP address `10.0.0.1:80`: give the port in `port`, not in `address`"]
        );
        assert_eq!(
            vs("address = \"10.0.0.1\"\nport = 65536"),
            ["t.toml:5:8: port must be between 0 and 65535, got 65536"]
        );
        assert_eq!(
            vs("address = \"10.0.0.1\"\nport = 80\nscheduler = \"wrr\""),
            ["t.toml:6:13: scheduler `wrr` needs [director] mode = \"ipvs\": the XDP fast path does maglev with DSR only"]
        );
    }

    #[test]
    fn ipvs_only_features() {
        let ipvs = "[director]\ninterface = \"eth0\"\nmode = \"ipvs\"\n";
        let text = format!(
            "{ipvs}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\nscheduler = \"wlc\"\nforwarding = \"nat\"\n\
             persistence = {{ timeout = \"5m\", netmask = \"255.255.255.0\" }}\n\
             [[virtual_server.real_server]]\naddress = \"10.0.0.11\"\nport = 8080\n\
             [[virtual_server]]\nfwmark = 7\nfamily = \"ipv6\"\nmh_port = true\n"
        );
        let config = parse(&text).expect("valid in IPVS mode");
        assert_eq!(config.director.mode, Mode::Ipvs);
        let (web, mark) = (&config.virtual_servers[0], &config.virtual_servers[1]);
        assert_eq!((web.scheduler.as_str(), web.forwarding), ("wlc", Forwarding::Nat));
        assert_eq!(web.persistence, Some(Persistence { timeout_secs: 300, prefix_len: 24 }));
        assert_eq!(web.real_servers[0].port, 8080, "NAT may change the port");
        assert_eq!((mark.fwmark, mark.address, mark.mh_port), (Some(7), v6("::"), true));

        // The same file without mode = "ipvs" is refused, feature by feature, at each key.
        let xdp = text.replace("mode = \"ipvs\"\n", "");
        assert_eq!(
            errors(&xdp),
            [
                "t.toml:6:13: scheduler `wlc` needs [director] mode = \"ipvs\": the XDP fast path does maglev with DSR only",
                "t.toml:7:14: forwarding `nat` needs [director] mode = \"ipvs\": the XDP fast path does maglev with DSR only",
                "t.toml:8:15: persistence needs [director] mode = \"ipvs\": the XDP fast path does maglev with DSR only",
                "t.toml:13:10: a firewall-mark virtual server needs [director] mode = \"ipvs\": the XDP fast path does maglev with DSR only",
                "t.toml:15:11: `mh_port = true` needs [director] mode = \"ipvs\": the XDP fast path does maglev with DSR only",
            ]
        );
        // mh_fallback's default is what the fast path does: written out, it is accepted anywhere;
        // plain mh (no fallback) is IPVS's only.
        let flag = |value: &str| format!("{DIRECTOR}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\nmh_fallback = {value}\n");
        assert!(parse(&flag("true")).expect("the default").virtual_servers[0].mh_fallback);
        assert_eq!(
            errors(&flag("false")),
            ["t.toml:6:15: `mh_fallback = false` needs [director] mode = \"ipvs\": the XDP fast path does maglev with DSR only"]
        );
        let bad = format!("{ipvs}[[virtual_server]]\nfwmark = 7\nport = 80\npersistence = {{ timeout = \"soon\" }}\n");
        assert_eq!(
            errors(&bad),
            [
                "t.toml:6:8: `port` does not go with `fwmark`: the mark alone selects the traffic",
                "t.toml:7:27: invalid duration \"soon\": expected a number and a unit (us, ms, s, m or h), like \"1s\", \"500ms\" or \"1m30s\"",
            ]
        );
        assert_eq!(
            errors(&format!("{ipvs}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\npersistence = {{ timeout = \"1.5s\" }}\n")),
            ["t.toml:7:27: persistence timeout must be whole seconds (IPVS counts in seconds), got `1.5s`"]
        );
        assert_eq!(
            errors(&format!("{ipvs}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\npersistence = {{ timeout = \"1s\", netmask = \"255.0.255.0\" }}\n")),
            ["t.toml:7:43: netmask `255.0.255.0` is not contiguous"]
        );
        // IPVS refuses /0 for IPv6 (EINVAL, part way through an apply); for IPv4 it takes it.
        assert_eq!(
            errors(&format!("{ipvs}[[virtual_server]]\naddress = \"2001:db8::1\"\nport = 80\npersistence = {{ timeout = \"1s\", netmask = \"0\" }}\n")),
            ["t.toml:7:43: netmask /0 is not allowed for an IPv6 virtual server (IPVS takes 1 to 128)"]
        );
        parse(&format!("{ipvs}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\npersistence = {{ timeout = \"1s\", netmask = \"0\" }}\n")).unwrap();
    }

    /// `[director]` with mode = "ipvs": lines 1 to 3.
    const IPVS: &str = "[director]\ninterface = \"eth0\"\nmode = \"ipvs\"\n";

    #[test]
    fn ipvs_port_zero_needs_persistence() {
        let vs = |rest: &str| format!("{IPVS}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 0\n{rest}");
        assert_eq!(
            errors(&vs("[[virtual_server.real_server]]\naddress = \"10.0.0.11\"\n")),
            ["t.toml:6:8: port 0 (every port) needs `persistence` with mode = \"ipvs\": IPVS forwards a port-0 \
              virtual server only when it is persistent (ipvsadm refuses it otherwise); add persistence = { timeout = \
              \"300s\" } or give a port"]
        );
        let persistent = parse(&vs("persistence = { timeout = \"300s\" }\n")).expect("persistent port 0");
        assert_eq!(persistent.virtual_servers[0].port, 0);
        // A firewall mark has no port; the XDP fast path (and mode = "auto") forwards port 0 as is.
        parse(&format!("{IPVS}[[virtual_server]]\nfwmark = 5\n")).expect("fwmark");
        parse(&format!("{DIRECTOR}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 0\n")).expect("auto mode");
    }

    #[test]
    fn ipvs_persistence_timeout_is_at_most_31_days() {
        let timeout = |t: &str| {
            format!("{IPVS}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\npersistence = {{ timeout = \"{t}\" }}\n")
        };
        let longest = parse(&timeout("744h")).expect("31 days");
        assert_eq!(longest.virtual_servers[0].persistence.map(|p| p.timeout_secs), Some(2_678_400));
        for t in ["744h1s", "1440h"] {
            assert_eq!(
                errors(&timeout(t)),
                [format!(
                    "t.toml:7:27: persistence timeout must be between 1s and 744h (31 days, 2678400s, as ipvsadm -p \
                     allows): the kernel counts it in jiffies in 32 bits, and longer ones wrap; got `{t}`"
                )]
            );
        }
    }

    #[test]
    fn ipvs_real_servers_of_the_other_family_need_tunnel() {
        let vs = |head: &str, forwarding: &str, rs: &str| {
            format!("{head}[[virtual_server]]\n{forwarding}\n[[virtual_server.real_server]]\naddress = \"{rs}\"\n")
        };
        let message = |rs: &str, rs_family: &str, vs_family: &str| {
            format!(
                "real server {rs} is {rs_family} but the virtual server is {vs_family}: IPVS mixes address families only \
                 with forwarding = \"tunnel\""
            )
        };
        let v4 = "address = \"10.0.0.1\"\nport = 80";
        assert_eq!(errors(&vs(IPVS, v4, "fd00::11")), [format!("t.toml:8:11: {}", message("fd00::11", "IPv6", "IPv4"))]);
        let nat6 = "address = \"fd00::1\"\nport = 80\nforwarding = \"nat\"";
        assert_eq!(errors(&vs(IPVS, nat6, "10.0.0.11")), [format!("t.toml:9:11: {}", message("10.0.0.11", "IPv4", "IPv6"))]);
        let mark = "fwmark = 5\nfamily = \"ipv6\"";
        assert_eq!(errors(&vs(IPVS, mark, "10.0.0.11")), [format!("t.toml:8:11: {}", message("10.0.0.11", "IPv4", "IPv6"))]);
        // Tunnelled: IPVS takes it (the sorry server keeps its own check).
        let tunnel = parse(&vs(IPVS, &format!("{v4}\nforwarding = \"tunnel\""), "fd00::11")).expect("tunnel");
        assert_eq!(tunnel.virtual_servers[0].real_servers[0].address, v6("fd00::11"));
        // Outside IPVS mode this check is not IPVS's to make.
        parse(&vs(DIRECTOR, v4, "fd00::11")).expect("auto mode");
    }

    #[test]
    fn ipvs_mh_flags_only_with_maglev() {
        let vs = |rest: &str| format!("{IPVS}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n{rest}");
        assert_eq!(
            errors(&vs("scheduler = \"sh\"\nmh_fallback = true\nmh_port = true\n")),
            [
                "t.toml:8:15: `mh_fallback` is an option of the maglev scheduler (IPVS mh), not of `sh`; remove it or use \
                 scheduler = \"maglev\"",
                "t.toml:9:11: `mh_port` is an option of the maglev scheduler (IPVS mh), not of `sh`; remove it or use \
                 scheduler = \"maglev\"",
            ]
        );
        // mh_fallback is on by default for maglev only; turning a flag off says nothing wrong.
        let rr = parse(&vs("scheduler = \"rr\"\nmh_port = false\nmh_fallback = false\n")).unwrap();
        assert_eq!((rr.virtual_servers[0].mh_fallback, rr.virtual_servers[0].mh_port), (false, false));
        let rr = parse(&vs("scheduler = \"rr\"\n")).unwrap();
        assert!(!rr.virtual_servers[0].mh_fallback);
        let maglev = parse(&vs("mh_port = true\n")).unwrap();
        assert_eq!((maglev.virtual_servers[0].mh_fallback, maglev.virtual_servers[0].mh_port), (true, true));
    }

    #[test]
    fn duplicate_virtual_servers() {
        let text = r#"[[virtual_server]]
address = "10.0.0.1"
port = 80
[[virtual_server]]
address = "10.0.0.1"
port = 80
protocol = "udp"
[[virtual_server]]
address = "10.0.0.1"
port = 80
protocol = "tcp"
[[virtual_server]]
address = "fd00::1"
port = 0
[[virtual_server]]
address = "fd00:0::1"
port = 0
"#;
        assert_eq!(
            errors_after(false, text),
            [
                "t.toml:11:11: duplicate virtual server 10.0.0.1:80/tcp (first defined at line 4)",
                "t.toml:18:11: duplicate virtual server [fd00::1]:0/tcp (first defined at line 15)",
            ]
        );
    }

    /// Valid, but most likely not meant: a VIP VRRP does not fail over (a typo in either list),
    /// a quorum the weights never reach. The config loads, with a warning at the key.
    #[test]
    fn warnings_for_what_is_valid_but_likely_a_mistake() {
        let text = format!(
            "{DIRECTOR}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\nquorum = 3\n\
             [[virtual_server.real_server]]\naddress = \"10.0.0.2\"\nweight = 2\n\
             [[vrrp_instance]]\nname = \"VI_1\"\ninterface = \"eth0\"\nvirtual_router_id = 51\n\
             virtual_addresses = [\"10.0.0.10\"]\n"
        );
        let warnings: Vec<String> = parse(&text).unwrap().warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [
                "t.toml:4:11: warning: virtual server 10.0.0.1 is in no [[vrrp_instance]]'s virtual_addresses: this \
                 director forwards it whatever VRRP decides, on a backup too (list it in an instance to fail it over)",
                "t.toml:6:10: warning: quorum 3 is more than the real servers' weights add up to (2): the virtual server \
                 never has its quorum",
                "t.toml:14:1: warning: 10.0.0.10, a virtual address of instance `VI_1`, is no virtual server's address: \
                 this director answers ARP for it as master but forwards none of its traffic",
            ]
        );
        let fixed = text.replace("10.0.0.10", "10.0.0.1").replace("quorum = 3", "quorum = 2");
        assert_eq!(parse(&fixed).unwrap().warnings, []);
        // No VRRP: every VIP is this director's, nothing to warn about.
        assert_eq!(parse(fixed.split("[[vrrp_instance]]").next().unwrap()).unwrap().warnings, []);
    }

    /// keepalived's generic `notify` gets its arguments appended to the line: a line they would
    /// not reach is refused, at its key, saying why and what to write.
    #[test]
    fn a_notify_line_the_arguments_would_not_reach_is_refused() {
        let vs = "[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n";
        let vrrp = |notify: &str| errors(&format!("{DIRECTOR}{VRRP}notify = {notify}\n{vs}"));
        assert_eq!(
            vrrp(r#""/etc/lbd/notify.sh &""#),
            ["t.toml:8:1: `notify` ends in `&`: lbd appends the arguments (INSTANCE or GROUP, name, state, priority) to \
              the end of the line as \"$@\", so they would not reach the command before it; write a line that ends with \
              the command taking them, e.g. notify = \"/etc/lbd/notify.sh\", and put anything more in that script"]
        );
        for (line, why) in [
            (r#""/etc/lbd/notify.sh;""#, "ends in `;`"),
            (r#""logger -t lbd |""#, "ends in `|`"),
            (r#""/etc/lbd/notify.sh \\""#, "ends in `\\`"),
            (r#""/etc/lbd/notify.sh # move the address""#, "has a `#` comment: "),
            ("\"\"\"\n/etc/lbd/a.sh\n/etc/lbd/b.sh\n\"\"\"", "spans several lines: "),
        ] {
            let found = vrrp(line);
            assert!(found.len() == 1 && found[0].starts_with(&format!("t.toml:8:1: `notify` {why}")), "{line}: {found:?}");
        }
        // A sync group's too, at its key.
        let group = errors(&format!(
            "{DIRECTOR}{VRRP}{}[[vrrp_sync_group]]\nname = \"G\"\ngroup = [\"VI_1\", \"VI_2\"]\nnotify = \"/bin/true &\"\n{vs}",
            VRRP.replace("VI_1", "VI_2").replace("51", "52").replace("10.0.0.1", "10.0.0.2")
        ));
        assert!(group.len() == 1 && group[0].starts_with("t.toml:16:1: `notify` ends in `&`"), "{group:?}");

        // Trailing blanks and newlines are trimmed; a `#` in quotes or inside a word is no
        // comment; a pipe's last command gets the arguments.
        for line in [
            "\"\"\"\n/bin/true\n\"\"\"",
            r#""/bin/true  ""#,
            r#""/bin/true '# 1' a#b""#,
            r#""/bin/true \"x # y\"""#,
            r#""/bin/true | /bin/cat""#,
        ] {
            let config = parse(&format!("{DIRECTOR}{VRRP}notify = {line}\n[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n"));
            assert_eq!(config.map(|c| c.warnings).map_err(|e| e.to_string()), Ok(vec![]), "{line}");
        }
        // The specific commands get no arguments: they may end as they like.
        let master = parse(&format!("{DIRECTOR}{VRRP}notify_master = \"/bin/true &\"\n{vs}"));
        assert!(master.is_ok(), "{master:?}");
    }

    /// A command whose program (an absolute path) is missing or not executable loads, with a
    /// warning at the command: the file may be checked on another machine than the director.
    #[test]
    fn commands_whose_program_is_missing_are_warned_about() {
        let text = format!(
            "{DIRECTOR}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n\
             quorum_up = \"/nonexistent/quorum.sh up\"\nquorum_down = [\"/bin/true\"]\n\
             health_check = {{ kind = \"script\", command = [\"/nonexistent/check\", \"-x\"] }}\n\
             [[virtual_server.real_server]]\naddress = \"10.0.0.2\"\n\
             notify_up = \"logger up\"\nnotify_down = \"/etc down\"\n\
             [[virtual_server.real_server]]\naddress = \"10.0.0.3\"\n\
             health_check = {{ command = \"/etc/passwd\" }}\n\
             {VRRP}notify = \"/nonexistent/notify.sh\"\nnotify_master = \"/bin/true\"\n\
             [[vrrp_script]]\nname = \"chk\"\nscript = \"/nonexistent/chk --quick\"\n"
        );
        let warnings: Vec<String> = parse(&text).unwrap().warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [
                "t.toml:6:13: warning: `quorum_up` runs /nonexistent/quorum.sh, which does not exist on this machine: \
                 the command will fail",
                "t.toml:8:45: warning: `command` runs /nonexistent/check, which does not exist on this machine: the \
                 command will fail",
                "t.toml:12:15: warning: `notify_down` runs /etc, which is not a regular file: the command will fail",
                "t.toml:15:28: warning: `command` runs /etc/passwd, which is not executable (no x permission bit): the \
                 command will fail",
                "t.toml:21:1: warning: `notify` runs /nonexistent/notify.sh, which does not exist on this machine: the \
                 command will fail",
                "t.toml:25:1: warning: `script` runs /nonexistent/chk, which does not exist on this machine: the \
                 command will fail",
            ]
        );
    }

    #[test]
    fn macs_are_unicast_and_one_per_address() {
        let rs = |mac: &str| errors_after(true, &format!("[[virtual_server.real_server]]\naddress = \"10.0.0.2\"\nmac = \"{mac}\"\n"));
        assert_eq!(
            rs("ff:ff:ff:ff:ff:ff"),
            ["t.toml:8:7: MAC address `ff:ff:ff:ff:ff:ff` is a broadcast address (the first byte is odd): give the real \
              server's own, a unicast one"]
        );
        assert!(rs("01:00:5e:00:00:01")[0].contains("is a multicast address"));
        assert_eq!(rs("00:00:00:00:00:00"), ["t.toml:8:7: MAC address `00:00:00:00:00:00` is all zeros: give the real server's own"]);
        let two = |second: &str| {
            format!(
                "{DIRECTOR}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n\
                 [[virtual_server.real_server]]\naddress = \"10.0.0.2\"\nmac = \"02:00:00:00:00:02\"\n\
                 [[virtual_server]]\naddress = \"10.0.0.1\"\nport = 443\n\
                 [[virtual_server.real_server]]\naddress = \"10.0.0.2\"\nmac = \"{second}\"\n"
            )
        };
        assert!(parse(&two("02:00:00:00:00:02")).is_ok());
        assert_eq!(
            errors(&two("02:00:00:00:00:03")),
            ["t.toml:14:7: real server 10.0.0.2 was given another mac at line 8: one address, one MAC"]
        );
    }

    /// A virtual server of every port keeps the packets' ports: one address twice is one host
    /// with twice its weight, whatever ports the two entries give (for their checks).
    #[test]
    fn every_port_takes_a_real_server_once() {
        let text = format!(
            "{DIRECTOR}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 0\n\
             [[virtual_server.real_server]]\naddress = \"10.0.0.2\"\nport = 80\n\
             [[virtual_server.real_server]]\naddress = \"10.0.0.2\"\nport = 443\n"
        );
        assert_eq!(
            errors(&text),
            ["t.toml:10:11: duplicate real server 10.0.0.2 (this virtual server takes every port and keeps it, so the real \
              server's port does not tell two apart) (first defined at line 7)"]
        );
        // With a port, two ports of one address are two real servers only under NAT, and DSR
        // refuses the second port anyway; with NAT and every port they stay apart.
        let nat = text.replace("[director]\ninterface = \"eth0\"\n", "[director]\ninterface = \"eth0\"\nmode = \"ipvs\"\n")
            .replace("port = 0\n", "port = 0\nforwarding = \"nat\"\npersistence = { timeout = \"60s\" }\n");
        assert_eq!(parse(&nat).unwrap().virtual_servers[0].real_servers.len(), 2);
    }

    #[test]
    fn real_server_values() {
        let rs =
            |lines: &str| errors_after(true, &format!("[[virtual_server.real_server]]\n{lines}\n"));
        assert_eq!(
            rs("address = \"10.0.0.2\"\nport = 8080"),
            ["t.toml:8:8: DSR cannot rewrite ports: real server port 8080 differs from virtual server port 80"]
        );
        let same_port = format!("{DIRECTOR}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n\
                                 [[virtual_server.real_server]]\naddress = \"10.0.0.2\"\nport = 80\n");
        assert_eq!(
            parse(&same_port).unwrap().virtual_servers[0].real_servers[0].port,
            80
        );
        assert_eq!(
            rs("address = \"fd00::1::2\""),
            ["t.toml:7:11: invalid IP address `fd00::1::2`"]
        );
        assert_eq!(
            rs("address = \"10.0.0.2\"\nweight = 65536"),
            ["t.toml:8:10: weight must be between 0 and 65535, got 65536"]
        );
        assert_eq!(
            rs("address = \"10.0.0.2\"\nweight = -1"),
            ["t.toml:8:10: weight must be between 0 and 65535, got -1"]
        );
        for mac in [
            "02:00:00:00:01",
            "02:00:00:00:00:01:02",
            "02-00-00-00-00-01",
            "2:00:00:00:00:01",
            "+2:00:00:00:00:01",
            "02:00:00:00:00:0g",
        ] {
            assert_eq!(
                rs(&format!("address = \"10.0.0.2\"\nmac = \"{mac}\"")),
                [format!("t.toml:8:7: invalid MAC address `{mac}`; expected six hex bytes like 02:00:00:00:00:01")]
            );
        }
        assert_eq!(
            rs("address = \"10.0.0.2\"\ninterface = \"\""),
            ["t.toml:8:13: interface name must not be empty"]
        );
        assert_eq!(
            rs("address = \"10.0.0.2\"\ninterface = \"a/b\""),
            ["t.toml:8:13: invalid interface name `a/b`: Linux forbids `/`, `:` and whitespace in it, and the names \
              `.` and `..`"]
        );
    }

    #[test]
    fn duplicate_real_servers() {
        let text = r#"[[virtual_server.real_server]]
address = "10.0.0.2"
[[virtual_server.real_server]]
address = "10.0.0.3"
[[virtual_server.real_server]]
address = "10.0.0.2"
port = 80
[[virtual_server]]
address = "10.0.0.1"
port = 443
[[virtual_server.real_server]]
address = "10.0.0.2"
"#;
        assert_eq!(
            errors_after(true, text),
            ["t.toml:11:11: duplicate real server 10.0.0.2:80 (first defined at line 7)"]
        );
    }

    #[test]
    fn limits() {
        let text = r#"[director]
interface = "eth0"
max_vips = 2
max_backends = 2
[[virtual_server]]
address = "10.0.0.1"
port = 80
[[virtual_server.real_server]]
address = "10.0.0.2"
[[virtual_server]]
address = "10.0.0.1"
port = 81
[[virtual_server.real_server]]
address = "10.0.0.2"
[[virtual_server.real_server]]
address = "10.0.0.3"
[[virtual_server]]
address = "10.0.0.1"
port = 82
"#;
        assert_eq!(
            errors(text),
            [
                "t.toml:15:1: too many real servers: 3 configured over all virtual servers (sorry servers \
                 included), but [director] max_backends is 2",
                "t.toml:17:1: too many virtual servers: 3 configured, but [director] max_vips is 2",
            ]
        );
        // A sorry server counts: it takes a real server's place while it serves.
        let sorry = r#"[director]
interface = "eth0"
max_backends = 2
[[virtual_server]]
address = "10.0.0.1"
port = 80
sorry_server = "10.0.0.9"
[[virtual_server.real_server]]
address = "10.0.0.2"
[[virtual_server.real_server]]
address = "10.0.0.3"
"#;
        assert_eq!(
            errors(sorry),
            ["t.toml:7:16: too many real servers: 3 configured over all virtual servers (sorry servers included), \
              but [director] max_backends is 2"]
        );
    }

    #[test]
    fn all_problems_are_reported_in_file_order() {
        let text = r#"[[virtual_server]]
address = "10.0.0.x"
port = 80
[[virtual_server.real_server]]
address = "10.0.0.2"
weight = 70000
mac = "nope"
"#;
        let error = Config::parse(
            &format!("[director]\ninterface = \"\"\ntable_size = 9\n{text}"),
            "rig.toml",
        )
        .unwrap_err();
        let expected = "rig.toml:2:13: interface name must not be empty
rig.toml:3:14: table_size 9 is not prime; the next prime is 11
rig.toml:5:11: invalid IP address `10.0.0.x`
rig.toml:9:10: weight must be between 0 and 65535, got 70000
rig.toml:10:7: invalid MAC address `nope`; expected six hex bytes like 02:00:00:00:00:01";
        assert_eq!(error.to_string(), expected);
        let d = &error.diagnostics()[1];
        assert_eq!((d.file.as_str(), d.line, d.col), ("rig.toml", 3, 14));
        assert_eq!(d.message, "table_size 9 is not prime; the next prime is 11");
    }

    #[test]
    fn load_names_the_file() {
        let missing = Path::new("/nonexistent/lbd.toml");
        let error = Config::load(missing).unwrap_err();
        assert!(matches!(&error, ConfigError::Read { path, .. } if path == missing));
        assert!(
            error
                .to_string()
                .starts_with("/nonexistent/lbd.toml: cannot read configuration: "),
            "{error}"
        );

        let path =
            std::env::temp_dir().join(format!("lbd-config-test-{}.toml", std::process::id()));
        std::fs::write(&path, "[director]\ninterface = 1\n").unwrap();
        let error = Config::load(&path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            error.to_string(),
            format!(
                "{}:2:13: `interface`: invalid type: integer `1`, expected a string",
                path.display()
            )
        );
    }

    /// The `[[vrrp_instance]]` of most VRRP tests: lines 3 to 7 after `DIRECTOR`.
    const VRRP: &str = "[[vrrp_instance]]\nname = \"VI_1\"\ninterface = \"eth0\"\nvirtual_router_id = 51\n\
                        virtual_addresses = [\"10.0.0.1\"]\n";

    #[test]
    fn vrrp_tables() {
        let text = format!(
            "{DIRECTOR}{VRRP}priority = 150\nadvert_interval = \"100ms\"\nversion = 3\npreempt = false\n\
             unicast_source = \"10.0.0.2\"\nunicast_peers = [\"10.0.0.3\"]\ntrack_script = [\"chk\"]\n\
             [[vrrp_script]]\nname = \"chk\"\nscript = \"true\"\n\
             [[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n[[virtual_server]]\naddress = \"10.0.0.9\"\nport = 80\n"
        );
        let config = parse(&text).unwrap();
        let [vi] = &config.vrrp.instances[..] else { panic!("{:?}", config.vrrp) };
        assert_eq!((vi.name.as_str(), vi.interface.as_str(), vi.virtual_router_id), ("VI_1", "eth0", 51));
        assert_eq!((vi.priority, vi.effective_version(), vi.preempt), (Some(150), 3, Some(false)));
        assert_eq!(vi.advert_interval.map(|d| d.0), Some(std::time::Duration::from_millis(100)));
        assert_eq!((vi.unicast_source, &vi.unicast_peers[..]), (Some(v4(10, 0, 0, 2)), &[v4(10, 0, 0, 3)][..]));
        assert_eq!(config.vrrp.scripts[0].name, "chk");
        // The first virtual server follows VI_1's state, the second is always carried.
        assert!(config.vrrp.covers(config.virtual_servers[0].address));
        assert!(!config.vrrp.covers(config.virtual_servers[1].address));
        // `lbd status --json` / the config as JSON carry the VRRP tables.
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["vrrp"]["instances"][0]["advert_interval"], "100ms");
        assert_eq!(json["vrrp"]["instances"][0]["virtual_addresses"][0]["address"], "10.0.0.1");

        // No VRRP tables: nothing covered.
        assert_eq!(parse(DIRECTOR).unwrap().vrrp, VrrpSpec::default());
    }

    #[test]
    fn vrrp_problems_are_reported_at_their_key() {
        let vrrp = |rest: &str| errors(&format!("{DIRECTOR}{VRRP}{rest}"));
        assert_eq!(vrrp("priority = 300\n"), ["t.toml:8:1: priority must be between 1 and 255 (255 = address owner), got 300"]);
        assert_eq!(
            vrrp("track_interface = [\"eth1 weight -20\"]\n"),
            ["t.toml:8:1: `eth1 weight -20` is keepalived's way to write it: here it is { name = \"eth1\", weight = -20 }"]
        );
        assert_eq!(
            vrrp("advert_interval = \"100ms\"\n"),
            ["t.toml:8:1: VRRPv2 carries whole seconds: advert_interval must be between 1s and 255s, got 100ms; use version = 3 \
              for shorter intervals"]
        );
        assert_eq!(
            vrrp("version = 3\nauthentication = { auth_type = \"PASS\", auth_pass = \"secret\" }\n"),
            ["t.toml:9:1: authentication exists in VRRPv2 only (RFC 5798 removed it)"]
        );
        // Keys written inline are found too; problems come in file order.
        assert_eq!(
            errors(&format!(
                "{DIRECTOR}[[vrrp_instance]]\nname = \"VI 1\"\ninterface = \"eth0\"\n  virtual_router_id = 0\n\
                 virtual_addresses = [\"10.0.0.1\", \"fd00::1\"]\n"
            )),
            [
                "t.toml:4:1: name `VI 1` must be non-empty, without whitespace",
                "t.toml:6:3: virtual_router_id must be between 1 and 255, got 0",
                "t.toml:7:1: virtual address #2 (fd00::1) is not of the same family as the first; use one instance per family",
            ]
        );
        // Across tables: at the second instance's key, at the tracking instance, at the group.
        assert_eq!(
            vrrp(&format!("track_script = [\"nope\"]\n{VRRP}")),
            [
                "t.toml:8:1: no [[vrrp_script]] named `nope`",
                "t.toml:10:1: instance name `VI_1` is already used by [[vrrp_instance]] #1",
                "t.toml:12:1: virtual_router_id 51 on eth0 is already used by instance `VI_1`",
                "t.toml:13:1: 10.0.0.1 is already a virtual address of instance `VI_1`",
            ]
        );
        assert_eq!(
            vrrp("[[vrrp_sync_group]]\nname = \"G\"\ngroup = [\"VI_1\", \"VI_9\"]\n"),
            ["t.toml:10:1: no [[vrrp_instance]] named `VI_9`"]
        );
        assert_eq!(
            vrrp("[[vrrp_script]]\nname = \"chk\"\nscript = \" \"\nfall = 0\n"),
            ["t.toml:10:1: the command must not be empty", "t.toml:11:1: fall must be between 1 and 1000, got 0"]
        );
        // Types, syntax, unknown and missing keys come from the parser, at the value.
        assert_eq!(
            vrrp("nopreempt = true\n"),
            ["t.toml:8:1: unknown key `nopreempt` in [[vrrp_instance]]: keepalived's `nopreempt` is `preempt = false`; \
              expected one of: name, interface, \
              virtual_router_id, priority, advert_interval, version, preempt, preempt_delay, virtual_addresses, \
              unicast_peers, unicast_source, authentication, garp_master_delay, garp_master_repeat, \
              garp_master_refresh, garp_master_refresh_repeat, garp_lower_prio_repeat, garp_lower_prio_delay, \
              track_interface, track_script, notify_master, notify_backup, notify_fault, notify_stop, notify, \
              notify_timeout"]
        );
        let bad_duration = vrrp("preempt_delay = \"5 seconds\"\n");
        assert!(bad_duration[0].starts_with("t.toml:8:17: invalid duration \"5 seconds\""), "{bad_duration:?}");
        assert_eq!(
            errors(&format!("{DIRECTOR}[[vrrp_instance]]\nname = \"VI_1\"\n")),
            ["t.toml:3:1: missing required key `interface`"]
        );
    }

    #[test]
    fn example_vrrp_section_is_valid() {
        // The commented-out VRRP keys of example.toml, uncommented, form a valid configuration.
        let text = std::fs::read_to_string(workspace_file("example.toml")).unwrap();
        let vrrp: String = text
            .lines()
            .skip_while(|l| *l != "# [[vrrp_instance]]")
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with("[[") || l.split_once(" = ").is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_')))
            .map(|l| format!("{l}\n"))
            .collect();
        let config = parse(&format!("{DIRECTOR}{vrrp}")).unwrap_or_else(|e| panic!("{e}\n{vrrp}"));
        let names: Vec<_> = config.vrrp.instances.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["VI_1", "VI_2"]);
        assert_eq!((config.vrrp.scripts.len(), config.vrrp.sync_groups.len()), (1, 1));
        assert!(config.vrrp.instances[0].authentication.is_some() && !config.vrrp.instances[0].unicast_peers.is_empty());
        // ... and VI_1 covers the example's virtual server.
        let example = Config::load(&workspace_file("example.toml")).unwrap();
        assert!(example.vrrp.instances.is_empty(), "VRRP is off by default");
        assert!(config.vrrp.covers(example.virtual_servers[0].address));
    }

    #[test]
    fn serializes_with_the_file_keys() {
        let text = format!(
            "{DIRECTOR}[[virtual_server]]\naddress = \"10.0.0.1\"\nport = 80\n\
             [[virtual_server.real_server]]\naddress = \"10.0.0.2\"\nmac = \"02:00:00:00:00:0A\"\n"
        );
        let json = serde_json::to_value(parse(&text).unwrap()).unwrap();
        assert_eq!(json["director"]["xdp_mode"], "native");
        assert_eq!(json["director"]["control_socket"], "/run/lbd/lbd.sock");
        let vs = &json["virtual_server"][0];
        assert_eq!(
            (&vs["address"], &vs["protocol"], vs.get("span")),
            (&"10.0.0.1".into(), &"tcp".into(), None)
        );
        assert_eq!(vs["real_server"][0]["mac"], "02:00:00:00:00:0a");
        assert_eq!(vs["real_server"][0]["interface"], serde_json::Value::Null);
    }
}
