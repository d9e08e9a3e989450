//! The VRRP part of the configuration, with keepalived's names: `[[vrrp_instance]]`,
//! `[[vrrp_script]]` and `[[vrrp_sync_group]]`.
//!
//! ```toml
//! [[vrrp_instance]]
//! name = "VI_1"
//! interface = "eth0"
//! virtual_router_id = 51
//! priority = 150                       # 1..=255, 255 = address owner; default 100
//! advert_interval = "1s"               # v2: whole seconds; v3: multiples of 10ms ("100ms")
//! version = 2                          # 2 (IPv4 only) or 3; default 2 for IPv4, 3 for IPv6
//! preempt = true                       # keepalived `nopreempt` = `preempt = false`
//! preempt_delay = "0s"
//! virtual_addresses = ["10.0.0.100/24", { address = "10.0.1.100", dev = "eth1", label = "eth1:vip" }]
//! # unicast_source = "10.0.0.2"        # with unicast_peers: adverts by unicast
//! # unicast_peers = ["10.0.0.3"]
//! authentication = { auth_type = "PASS", auth_pass = "secret" }   # v2 only
//! garp_master_delay = "5s"             # second burst of gratuitous ARPs after becoming master
//! garp_master_repeat = 5               # gratuitous ARPs per burst
//! garp_master_refresh = "0s"           # periodic refresh while master; 0 = off
//! garp_lower_prio_repeat = 5           # gratuitous ARPs when a lower-priority master is heard
//! garp_lower_prio_delay = "5s"         # and a second burst after this; both default to garp_master_*
//! track_interface = ["eth1", { name = "eth2", weight = -20 }]      # weight 0 (default) = FAULT
//! track_script = ["chk_nginx", { name = "chk_db", weight = -30 }]
//! notify = "/etc/lbd/notify.sh"        # called with: INSTANCE|GROUP NAME STATE PRIORITY
//! notify_master = "/etc/lbd/master.sh"
//!
//! [[vrrp_script]]
//! name = "chk_nginx"
//! script = "pidof nginx"               # run by /bin/sh -c; exit 0 = good
//! interval = "2s"
//! weight = -20
//!
//! [[vrrp_sync_group]]
//! name = "G1"
//! group = ["VI_1", "VI_2"]
//! ```
//!
//! Durations are strings (`"100ms"`, `"1s"`, `"1.5s"`, `"1m30s"`; units `ms`, `s`, `m`, `h`) or
//! plain numbers of seconds (`1`, `0.1`, as keepalived writes them). Syntax and type errors come
//! from the TOML parser with their position; [`VrrpInstanceSpec::validate`] and
//! [`VrrpSpec::validate`] report the rest by key name, for the caller to position.

use std::{collections::HashMap, fmt, net::IpAddr, time::Duration};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::duration::{format_duration, parse_duration};

/// Default `priority`.
pub const DEFAULT_PRIORITY: i64 = 100;
/// Default `advert_interval`.
pub const DEFAULT_ADVERT_INTERVAL: Duration = Duration::from_secs(1);
/// Default `garp_master_delay` (keepalived's).
pub const DEFAULT_GARP_MASTER_DELAY: Duration = Duration::from_secs(5);
/// Default `garp_master_repeat` (keepalived's).
pub const DEFAULT_GARP_MASTER_REPEAT: i64 = 5;
/// Default `notify_timeout`.
pub const DEFAULT_NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `[[vrrp_script]] interval` (keepalived's).
pub const DEFAULT_SCRIPT_INTERVAL: Duration = Duration::from_secs(1);

/// All VRRP tables of a configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VrrpSpec {
    /// `[[vrrp_instance]]`, in file order.
    pub instances: Vec<VrrpInstanceSpec>,
    /// `[[vrrp_script]]`, in file order.
    pub scripts: Vec<VrrpScriptSpec>,
    /// `[[vrrp_sync_group]]`, in file order.
    pub sync_groups: Vec<VrrpSyncGroupSpec>,
}

/// `[[vrrp_instance]]`: one virtual router (keepalived's `vrrp_instance NAME { ... }`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct VrrpInstanceSpec {
    /// Unique among the instances; shown in logs, status and notify arguments.
    pub name: String,
    /// Interface adverts are sent and received on, and (unless an address says `dev`) where the
    /// virtual addresses are answered for.
    pub interface: String,
    /// VRID, 1..=255; the same on every router of the virtual router.
    pub virtual_router_id: i64,
    /// 1..=254, or 255 for the address owner (becomes master at once). Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    /// Default `"1s"`. VRRPv2 carries whole seconds (1..=255 s); VRRPv3 centiseconds (10ms..=40.95s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advert_interval: Option<DurationSpec>,
    /// 2 or 3; default 2 for IPv4 (keepalived's default), 3 for IPv6 (v2 is IPv4-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// A higher-priority backup takes over from a lower-priority master. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempt: Option<bool>,
    /// Wait this long after start-up (or after first seeing a lower-priority master) before
    /// preempting it. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preempt_delay: Option<DurationSpec>,
    /// The virtual addresses, all of one family; at least one.
    pub virtual_addresses: Vec<VirtualAddressSpec>,
    /// Send adverts by unicast to these routers instead of multicast, and accept adverts only
    /// from them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unicast_peers: Vec<IpAddr>,
    /// Source address of the adverts (and our address in equal-priority elections). Default:
    /// the interface's first address of the family (its link-local address for IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unicast_source: Option<IpAddr>,
    /// VRRPv2 simple password authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthenticationSpec>,
    /// Delay of the second burst of gratuitous ARPs / unsolicited NAs; 0 = none. Default `"5s"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub garp_master_delay: Option<DurationSpec>,
    /// Gratuitous ARPs (unsolicited NAs) per address in a burst. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub garp_master_repeat: Option<i64>,
    /// Repeat gratuitous ARPs this often while master; 0 = never (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub garp_master_refresh: Option<DurationSpec>,
    /// Gratuitous ARPs per address at each refresh. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub garp_master_refresh_repeat: Option<i64>,
    /// Gratuitous ARPs (unsolicited NAs) per address sent at once when a MASTER hears the
    /// advert of a lower-priority master (a split view healing: the upstream router may hold
    /// the other one's MAC); 0 = none. Default `garp_master_repeat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub garp_lower_prio_repeat: Option<i64>,
    /// Delay of the second such burst; 0 = none. Default `garp_master_delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub garp_lower_prio_delay: Option<DurationSpec>,
    /// Interfaces whose state changes the priority (weight ≠ 0) or forces FAULT (weight 0, the
    /// default). The instance's own `interface` is always tracked with weight 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub track_interface: Vec<TrackInterfaceSpec>,
    /// `[[vrrp_script]]`s whose result changes the priority or forces FAULT.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub track_script: Vec<TrackScriptSpec>,
    /// Run (by `/bin/sh -c`) on entering MASTER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_master: Option<String>,
    /// Run on entering BACKUP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_backup: Option<String>,
    /// Run on entering FAULT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_fault: Option<String>,
    /// Run when lbd stops the instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_stop: Option<String>,
    /// Run on every change with keepalived's arguments: `INSTANCE NAME STATE PRIORITY`, STATE
    /// one of MASTER, BACKUP, FAULT, STOP, appended to the end of the line as `"$@"` (so a line
    /// they would not reach is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    /// A notify command still running after this is killed. Default `"10s"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_timeout: Option<DurationSpec>,
}

/// One of `virtual_addresses`: `"10.0.0.100"`, keepalived's `"10.0.0.100/24 dev eth1 label
/// eth1:1"`, or `{ address = "10.0.0.100/24", dev = "eth1", label = "eth1:1" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VirtualAddressSpec {
    pub address: IpAddr,
    /// Accepted for keepalived compatibility and shown in status; lbd never adds the address to
    /// the kernel, so it has no other effect.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_len: Option<u8>,
    /// Interface the address is answered for (ARP/NDP, gratuitous ARP); default the instance's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    /// Accepted for keepalived compatibility (an `ip addr` label); no effect, see `prefix_len`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// `authentication = { auth_type = "PASS", auth_pass = "..." }` (VRRPv2 only).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct AuthenticationSpec {
    /// Only `"PASS"` (keepalived's `AH` is not supported).
    pub auth_type: String,
    /// 1 to 8 bytes, sent in clear text.
    pub auth_pass: String,
}

/// One of `track_interface`: `"eth1"` or `{ name = "eth1", weight = -20 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrackInterfaceSpec {
    pub name: String,
    /// -253..=253. Positive: added to the priority while the interface is up; negative: added
    /// while it is down; 0 (default): down means FAULT.
    pub weight: i64,
}

/// One of `track_script`: `"chk_nginx"` or `{ name = "chk_nginx", weight = -30 }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrackScriptSpec {
    /// A `[[vrrp_script]]` name.
    pub name: String,
    /// Overrides the script's `weight` for this instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

/// `[[vrrp_script]]`: a check command (keepalived's `vrrp_script NAME { ... }`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct VrrpScriptSpec {
    pub name: String,
    /// Run by `/bin/sh -c`; exit status 0 = good.
    pub script: String,
    /// Default `"1s"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<DurationSpec>,
    /// A run taking longer is killed and counts as failed. Default: the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<DurationSpec>,
    /// -253..=253, as for `track_interface`; default 0 (failure = FAULT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    /// Consecutive good runs that make a failed script good. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<i64>,
    /// Consecutive failed runs that make a good script failed. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<i64>,
    /// Start in the failed state instead of the good one. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_fail: Option<bool>,
}

/// `[[vrrp_sync_group]]`: instances that change state together.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct VrrpSyncGroupSpec {
    pub name: String,
    /// Instance names, at least two; an instance belongs to at most one group.
    pub group: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_master: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_fault: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_stop: Option<String>,
    /// Called with `GROUP NAME STATE PRIORITY` (priority 0 for groups, as keepalived does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify_timeout: Option<DurationSpec>,
}

/// A duration as written: `"100ms"`, `"1s"`, `"1m30s"`, or a number of seconds (`1`, `0.1`).
/// Parsed while deserializing, so a bad one is reported at its position by the TOML parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationSpec(pub Duration);

/// A problem found by [`VrrpSpec::validate`]: `table` is `"vrrp_instance"`, `"vrrp_script"` or
/// `"vrrp_sync_group"`, `index` its position among the tables of that name, `field` the key
/// (empty for the table as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VrrpSpecError {
    pub table: &'static str,
    pub index: usize,
    pub field: &'static str,
    pub message: String,
}

impl fmt::Display for VrrpSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[[{}]] #{}", self.table, self.index + 1)?;
        if !self.field.is_empty() {
            write!(f, " `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

const WEIGHTS: std::ops::RangeInclusive<i64> = -253..=253;

fn check_name(name: &str, errs: &mut Vec<(&'static str, String)>) {
    if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c.is_control()) {
        errs.push(("name", format!("name `{name}` must be non-empty, without whitespace")));
    }
}

fn check_ifname(field: &'static str, name: &str, errs: &mut Vec<(&'static str, String)>) {
    if let [dev, "weight", weight] = name.split_whitespace().collect::<Vec<_>>()[..] {
        // keepalived's `track_interface { eth1 weight -20 }`.
        errs.push((
            field,
            format!("`{name}` is keepalived's way to write it: here it is {{ name = \"{dev}\", weight = {weight} }}"),
        ));
    } else if name.is_empty() || name.len() > 15 || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace()) {
        errs.push((field, format!("invalid interface name `{name}` (1 to 15 bytes, no `/`, `:` or whitespace)")));
    }
}

fn check_command(field: &'static str, cmd: &Option<String>, errs: &mut Vec<(&'static str, String)>) {
    if cmd.as_deref().is_some_and(|c| c.trim().is_empty()) {
        errs.push((field, "the command must not be empty".into()));
    }
}

/// Why keepalived's arguments would not reach the command of a generic `notify` line, if they
/// would not: lbd appends them as ` "$@"` to the line (trailing blanks and newlines trimmed), so
/// the line must end with the command that takes them. Refused: a line ending in `&`, `;`, `|`
/// or `\`, one of several lines, one with a `#` comment (a `#` starting a word outside quotes:
/// a heuristic, as the shell's grammar has more cases).
fn generic_notify_problem(line: &str) -> Option<String> {
    let line = line.trim_end();
    let (what, lost) = if line.contains(['\n', '\r']) {
        ("spans several lines".to_string(), "only the last line's command would get them")
    } else if let Some(last) = line.chars().last().filter(|c| matches!(c, '&' | ';' | '|' | '\\')) {
        (format!("ends in `{last}`"), "they would not reach the command before it")
    } else if has_comment(line) {
        ("has a `#` comment".to_string(), "they would be part of the comment")
    } else {
        return None;
    };
    Some(format!(
        "`notify` {what}: lbd appends the arguments (INSTANCE or GROUP, name, state, priority) to the end of the line \
         as \"$@\", so {lost}; write a line that ends with the command taking them, e.g. notify = \
         \"/etc/lbd/notify.sh\", and put anything more in that script"
    ))
}

/// Whether a `#` starts a word outside quotes in shell `line` (where the shell starts a comment).
fn has_comment(line: &str) -> bool {
    let (mut quote, mut escaped, mut word_start) = (None, false, true);
    for c in line.chars() {
        let starts_word = std::mem::replace(&mut word_start, false);
        if std::mem::replace(&mut escaped, false) {
            continue;
        }
        match quote {
            Some(q) if c == q => quote = None,
            Some(q) => escaped = q == '"' && c == '\\',
            None => match c {
                '\\' => escaped = true,
                '\'' | '"' => quote = Some(c),
                '#' if starts_word => return true,
                c => word_start = c.is_whitespace() || matches!(c, ';' | '&' | '|' | '(' | ')'),
            },
        }
    }
    false
}

/// The notify options an instance and a sync group share, borrowed from either (serde cannot
/// flatten them into both tables and still refuse unknown keys).
pub struct NotifyFields<'a> {
    pub master: &'a Option<String>,
    pub backup: &'a Option<String>,
    pub fault: &'a Option<String>,
    pub stop: &'a Option<String>,
    /// `notify`.
    pub generic: &'a Option<String>,
    pub timeout: &'a Option<DurationSpec>,
}

/// `notify_fields()` for the tables that have the notify options.
macro_rules! notify_fields {
    ($($table:ty),*) => {$(
        impl $table {
            pub fn notify_fields(&self) -> NotifyFields<'_> {
                NotifyFields {
                    master: &self.notify_master,
                    backup: &self.notify_backup,
                    fault: &self.notify_fault,
                    stop: &self.notify_stop,
                    generic: &self.notify,
                    timeout: &self.notify_timeout,
                }
            }
        }
    )*};
}
notify_fields!(VrrpInstanceSpec, VrrpSyncGroupSpec);

impl<'a> NotifyFields<'a> {
    /// The commands, each with its key.
    pub fn commands(&self) -> [(&'static str, &'a Option<String>); 5] {
        [
            ("notify_master", self.master),
            ("notify_backup", self.backup),
            ("notify_fault", self.fault),
            ("notify_stop", self.stop),
            ("notify", self.generic),
        ]
    }

    /// Commands not blank, a generic one its arguments reach; a timeout more than 0 and at most
    /// an hour.
    fn check(&self, errs: &mut Vec<(&'static str, String)>) {
        for (field, cmd) in self.commands() {
            check_command(field, cmd, errs);
        }
        if let Some(problem) = self.generic.as_deref().and_then(generic_notify_problem) {
            errs.push(("notify", problem));
        }
        check_duration("notify_timeout", self.timeout, Duration::from_secs(3600), errs);
        if self.timeout.is_some_and(|d| d.0.is_zero()) {
            errs.push(("notify_timeout", "notify_timeout must be more than 0".into()));
        }
    }
}

fn check_duration(field: &'static str, d: &Option<DurationSpec>, max: Duration, errs: &mut Vec<(&'static str, String)>) {
    if let Some(DurationSpec(d)) = d {
        if *d > max {
            errs.push((field, format!("{field} must be at most {}", format_duration(max))));
        }
    }
}

/// Why `a` cannot be a host's address (a VIP, a real server's, a director's), if it cannot: the
/// unspecified, a multicast, the broadcast or a loopback address, or IPv4 written as IPv6 (an
/// IPv4-mapped IPv6 address, which no IPv4 packet matches).
pub(crate) fn not_a_host(a: IpAddr) -> Option<String> {
    Some(match a {
        a if a.is_unspecified() => "the unspecified address".into(),
        a if a.is_multicast() => "a multicast address".into(),
        a if a.is_loopback() => "a loopback address, which never reaches the director's interface".into(),
        IpAddr::V4(v4) if v4.is_broadcast() => "the broadcast address".into(),
        IpAddr::V6(v6) => format!("an IPv4-mapped IPv6 address: write it as IPv4, {}", v6.to_ipv4_mapped()?),
        IpAddr::V4(_) => return None,
    })
}

fn is_link_local_v6(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

impl VrrpInstanceSpec {
    /// The VRRP version in effect (the default depends on the family).
    pub fn effective_version(&self) -> u8 {
        match self.version {
            Some(3) => 3,
            Some(_) => 2,
            None if self.virtual_addresses.first().is_some_and(|a| a.address.is_ipv6()) => 3,
            None => 2,
        }
    }

    /// Whether the virtual addresses (hence the adverts) are IPv6.
    pub fn is_ipv6(&self) -> bool {
        self.virtual_addresses.first().is_some_and(|a| a.address.is_ipv6())
    }

    /// The semantic checks of one table (types and unknown keys are the parser's): one
    /// `(key, message)` per problem, in key order; empty when valid.
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut errs = Vec::new();
        check_name(&self.name, &mut errs);
        check_ifname("interface", &self.interface, &mut errs);
        if !(1..=255).contains(&self.virtual_router_id) {
            errs.push(("virtual_router_id", format!("virtual_router_id must be between 1 and 255, got {}", self.virtual_router_id)));
        }
        let priority = self.priority.unwrap_or(DEFAULT_PRIORITY);
        if !(1..=255).contains(&priority) {
            errs.push(("priority", format!("priority must be between 1 and 255 (255 = address owner), got {priority}")));
        }
        let version_ok = match self.version {
            None | Some(2) | Some(3) => true,
            Some(v) => {
                errs.push(("version", format!("version must be 2 or 3, got {v}")));
                false
            }
        };
        let version = self.effective_version();
        let interval = self.advert_interval.map_or(DEFAULT_ADVERT_INTERVAL, |d| d.0);
        if version_ok {
            if version == 2 {
                if interval.subsec_nanos() != 0 || !(1..=255).contains(&interval.as_secs()) {
                    errs.push((
                        "advert_interval",
                        format!(
                            "VRRPv2 carries whole seconds: advert_interval must be between 1s and 255s, got {}; use version = 3 for shorter intervals",
                            format_duration(interval)
                        ),
                    ));
                }
            } else if !interval.as_nanos().is_multiple_of(10_000_000)
                || interval < Duration::from_millis(10)
                || interval > Duration::from_millis(40_950)
            {
                errs.push((
                    "advert_interval",
                    format!(
                        "VRRPv3 carries centiseconds: advert_interval must be a multiple of 10ms between 10ms and 40.95s, got {}",
                        format_duration(interval)
                    ),
                ));
            }
        }
        check_duration("preempt_delay", &self.preempt_delay, Duration::from_secs(1000), &mut errs);

        if self.virtual_addresses.is_empty() {
            errs.push(("virtual_addresses", "at least one virtual address is needed".into()));
        }
        let v6 = self.is_ipv6();
        for (i, a) in self.virtual_addresses.iter().enumerate() {
            if a.address.is_ipv6() != v6 {
                errs.push((
                    "virtual_addresses",
                    format!(
                        "virtual address #{} ({}) is not of the same family as the first; use one instance per family",
                        i + 1,
                        a.address
                    ),
                ));
            }
            if let Some(problem) = not_a_host(a.address) {
                errs.push(("virtual_addresses", format!("{} cannot be a virtual address: it is {problem}", a.address)));
            }
            let max = if a.address.is_ipv4() { 32 } else { 128 };
            if a.prefix_len.is_some_and(|p| p > max) {
                errs.push(("virtual_addresses", format!("prefix length of {} must be at most {max}", a.address)));
            }
            if let Some(dev) = &a.dev {
                check_ifname("virtual_addresses", dev, &mut errs);
            }
            if self.virtual_addresses[..i].iter().any(|b| b.address == a.address) {
                errs.push(("virtual_addresses", format!("{} is listed twice", a.address)));
            }
        }
        if v6 && version_ok && version == 2 {
            errs.push(("version", "VRRPv2 is IPv4-only; IPv6 virtual addresses need version = 3".into()));
        }
        // The count is one byte, and an advert must fit one unfragmented 1500-byte frame.
        let max = if v6 { 85 } else { 255 };
        if self.virtual_addresses.len() > max {
            errs.push(("virtual_addresses", format!("an advert carries at most {max} addresses of this family")));
        }

        for (i, p) in self.unicast_peers.iter().enumerate() {
            if p.is_ipv6() != v6 && !self.virtual_addresses.is_empty() {
                errs.push(("unicast_peers", format!("unicast peer {p} is not of the virtual addresses' family")));
            }
            if let Some(problem) = not_a_host(*p) {
                errs.push(("unicast_peers", format!("unicast peer {p} must be another director's address, not {problem}")));
            }
            if self.unicast_peers[..i].contains(p) {
                errs.push(("unicast_peers", format!("unicast peer {p} is listed twice")));
            }
            if self.unicast_source == Some(*p) {
                errs.push(("unicast_peers", format!("unicast peer {p} is this director's own unicast_source")));
            }
        }
        if let Some(src) = &self.unicast_source {
            if src.is_ipv6() != v6 && !self.virtual_addresses.is_empty() {
                errs.push(("unicast_source", format!("unicast_source {src} is not of the virtual addresses' family")));
            }
            if let Some(problem) = not_a_host(*src) {
                errs.push(("unicast_source", format!("unicast_source {src} must be an address of this director, not {problem}")));
            }
            if v6 && self.unicast_peers.is_empty() && !is_link_local_v6(src) {
                errs.push(("unicast_source", "multicast IPv6 adverts are sent from a link-local address".into()));
            }
        }

        if let Some(auth) = &self.authentication {
            if version_ok && version != 2 {
                errs.push(("authentication", "authentication exists in VRRPv2 only (RFC 5798 removed it)".into()));
            }
            if !auth.auth_type.eq_ignore_ascii_case("PASS") {
                errs.push(("auth_type", format!("auth_type `{}` is not supported; only PASS", auth.auth_type)));
            }
            if auth.auth_pass.is_empty() {
                errs.push(("auth_pass", "auth_pass must be 1 to 8 bytes, got 0".into()));
            } else if auth.auth_pass.len() > 8 {
                // keepalived cuts a longer one to 8 bytes with a warning; its peers send those.
                let cut = auth.auth_pass.char_indices().map(|(i, c)| i + c.len_utf8()).take_while(|&end| end <= 8).last();
                let hint = match cut {
                    Some(end) => format!(": keepalived sends only the first 8, so write auth_pass = \"{}\" to speak with it", &auth.auth_pass[..end]),
                    None => String::new(),
                };
                errs.push(("auth_pass", format!("auth_pass must be 1 to 8 bytes, got {}{hint}", auth.auth_pass.len())));
            }
        }

        check_duration("garp_master_delay", &self.garp_master_delay, Duration::from_secs(3600), &mut errs);
        check_duration("garp_master_refresh", &self.garp_master_refresh, Duration::from_secs(86400), &mut errs);
        check_duration("garp_lower_prio_delay", &self.garp_lower_prio_delay, Duration::from_secs(3600), &mut errs);
        if let Some(d) = self.garp_master_refresh {
            if !d.0.is_zero() && d.0 < Duration::from_millis(100) {
                errs.push(("garp_master_refresh", "garp_master_refresh must be 0 (off) or at least 100ms".into()));
            }
        }
        for (field, v) in [
            ("garp_master_repeat", self.garp_master_repeat),
            ("garp_master_refresh_repeat", self.garp_master_refresh_repeat),
            ("garp_lower_prio_repeat", self.garp_lower_prio_repeat),
        ] {
            if let Some(v) = v {
                if !(0..=255).contains(&v) {
                    errs.push((field, format!("{field} must be between 0 and 255, got {v}")));
                }
            }
        }

        for (i, t) in self.track_interface.iter().enumerate() {
            check_ifname("track_interface", &t.name, &mut errs);
            if self.track_interface[..i].iter().any(|o| o.name == t.name) {
                errs.push(("track_interface", format!("interface {} is tracked twice", t.name)));
            }
            if !WEIGHTS.contains(&t.weight) {
                errs.push(("track_interface", format!("weight of {} must be between -253 and 253, got {}", t.name, t.weight)));
            }
        }
        for (i, t) in self.track_script.iter().enumerate() {
            if let Some(w) = t.weight {
                if !WEIGHTS.contains(&w) {
                    errs.push(("track_script", format!("weight of {} must be between -253 and 253, got {w}", t.name)));
                }
            }
            if self.track_script[..i].iter().any(|o| o.name == t.name) {
                errs.push(("track_script", format!("script {} is tracked twice", t.name)));
            }
        }
        self.notify_fields().check(&mut errs);
        errs
    }
}

impl VrrpScriptSpec {
    /// The semantic checks of one `[[vrrp_script]]`, as [`VrrpInstanceSpec::validate`].
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut errs = Vec::new();
        check_name(&self.name, &mut errs);
        if self.script.trim().is_empty() {
            errs.push(("script", "the command must not be empty".into()));
        }
        for (field, d) in [("interval", self.interval), ("timeout", self.timeout)] {
            if let Some(DurationSpec(d)) = d {
                if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
                    errs.push((field, format!("{field} must be between 10ms and 1h, got {}", format_duration(d))));
                }
            }
        }
        if let Some(w) = self.weight {
            if !WEIGHTS.contains(&w) {
                errs.push(("weight", format!("weight must be between -253 and 253, got {w}")));
            }
        }
        for (field, v) in [("rise", self.rise), ("fall", self.fall)] {
            if let Some(v) = v {
                if !(1..=1000).contains(&v) {
                    errs.push((field, format!("{field} must be between 1 and 1000, got {v}")));
                }
            }
        }
        errs
    }
}

impl VrrpSyncGroupSpec {
    /// The semantic checks of one `[[vrrp_sync_group]]` on its own.
    pub fn validate(&self) -> Vec<(&'static str, String)> {
        let mut errs = Vec::new();
        check_name(&self.name, &mut errs);
        if self.group.len() < 2 {
            errs.push(("group", "a sync group needs at least two instances".into()));
        }
        self.notify_fields().check(&mut errs);
        errs
    }
}

impl VrrpSpec {
    /// Every table's own checks plus the ones across tables: unique names, one instance per
    /// (interface, VRID, family), a virtual address in one instance only, tracked scripts and
    /// sync group members that exist, an instance in at most one group.
    pub fn validate(&self) -> Vec<VrrpSpecError> {
        let mut out = Vec::new();
        let mut push = |table, index, field, message: String| out.push(VrrpSpecError { table, index, field, message });
        for (i, inst) in self.instances.iter().enumerate() {
            for (field, message) in inst.validate() {
                push("vrrp_instance", i, field, message);
            }
        }
        for (i, s) in self.scripts.iter().enumerate() {
            for (field, message) in s.validate() {
                push("vrrp_script", i, field, message);
            }
        }
        for (i, g) in self.sync_groups.iter().enumerate() {
            for (field, message) in g.validate() {
                push("vrrp_sync_group", i, field, message);
            }
        }

        let mut names = HashMap::new();
        let mut routers = HashMap::new();
        let mut addresses = HashMap::new();
        for (i, inst) in self.instances.iter().enumerate() {
            if let Some(first) = names.insert(inst.name.as_str(), i) {
                push(
                    "vrrp_instance",
                    i,
                    "name",
                    format!("instance name `{}` is already used by [[vrrp_instance]] #{}", inst.name, first + 1),
                );
            }
            let key = (inst.interface.as_str(), inst.virtual_router_id, inst.is_ipv6());
            if let Some(first) = routers.insert(key, i) {
                push(
                    "vrrp_instance",
                    i,
                    "virtual_router_id",
                    format!(
                        "virtual_router_id {} on {} is already used by instance `{}`",
                        inst.virtual_router_id, inst.interface, self.instances[first].name
                    ),
                );
            }
            for a in &inst.virtual_addresses {
                if let Some(first) = addresses.insert(a.address, i) {
                    if first != i {
                        push(
                            "vrrp_instance",
                            i,
                            "virtual_addresses",
                            format!("{} is already a virtual address of instance `{}`", a.address, self.instances[first].name),
                        );
                    }
                }
            }
            for t in &inst.track_script {
                if !self.scripts.iter().any(|s| s.name == t.name) {
                    push("vrrp_instance", i, "track_script", format!("no [[vrrp_script]] named `{}`", t.name));
                }
            }
        }
        let mut scripts = HashMap::new();
        for (i, s) in self.scripts.iter().enumerate() {
            if let Some(first) = scripts.insert(s.name.as_str(), i) {
                push("vrrp_script", i, "name", format!("script name `{}` is already used by [[vrrp_script]] #{}", s.name, first + 1));
            }
        }
        let mut groups = HashMap::new();
        let mut member_of: HashMap<&str, &str> = HashMap::new();
        for (i, g) in self.sync_groups.iter().enumerate() {
            if let Some(first) = groups.insert(g.name.as_str(), i) {
                push(
                    "vrrp_sync_group",
                    i,
                    "name",
                    format!("sync group name `{}` is already used by [[vrrp_sync_group]] #{}", g.name, first + 1),
                );
            }
            for (j, m) in g.group.iter().enumerate() {
                if !names.contains_key(m.as_str()) {
                    push("vrrp_sync_group", i, "group", format!("no [[vrrp_instance]] named `{m}`"));
                } else if g.group[..j].contains(m) {
                    push("vrrp_sync_group", i, "group", format!("instance `{m}` is listed twice"));
                } else if let Some(other) = member_of.insert(m, &g.name) {
                    push("vrrp_sync_group", i, "group", format!("instance `{m}` is already in sync group `{other}`"));
                }
            }
        }
        out
    }
}

/// Where `key` is written inside the table that spans `table` in `text` (byte offsets, as
/// `toml::Spanned` gives them): the offset of the key (`key = ...`, also inside an inline table),
/// or of a sub-table's header (`[vrrp_instance.key]`), or of the table when it is not there
/// (defaults, or errors about the table as a whole). Strings and comments are skipped, so a
/// `priority =` inside a notify command is not taken for the key. Lets the caller turn the key
/// names of [`VrrpInstanceSpec::validate`] into `FILE:LINE:COL`.
pub fn locate_key(text: &str, table: std::ops::Range<usize>, key: &str) -> usize {
    let start = table.start.min(text.len());
    let end = with_sub_tables(text, start, table.end.min(text.len()));
    let body = &text[start..end];
    let b = body.as_bytes();
    // `at_key`: only blanks since a newline, `{` or `,` (where a key may begin); `at_line`: since a newline.
    let (mut i, mut at_key, mut at_line) = (0, true, true);
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'') => {
                let triple = if q == b'"' { "\"\"\"" } else { "\'\'\'" };
                if body[i..].starts_with(triple) {
                    i += 3;
                    while i < b.len() && !body[i..].starts_with(triple) {
                        i += if q == b'"' && b[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 3;
                } else {
                    i += 1;
                    while i < b.len() && b[i] != q && b[i] != b'\n' {
                        i += if q == b'"' && b[i] == b'\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
                (at_key, at_line) = (false, false);
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'\n' => {
                (at_key, at_line) = (true, true);
                i += 1;
            }
            b' ' | b'\t' | b'\r' => i += 1,
            b'{' | b',' => {
                (at_key, at_line) = (true, false);
                i += 1;
            }
            b'[' if at_line => {
                let line_end = body[i..].find('\n').map_or(body.len(), |n| i + n);
                let header = body[i..line_end].split('#').next().unwrap_or("").trim().trim_matches(['[', ']']);
                if header.rsplit('.').next().map(str::trim) == Some(key) {
                    return start + i;
                }
                i = line_end;
            }
            _ => {
                let after = body.get(i + key.len()..).unwrap_or("");
                if at_key && body[i..].starts_with(key) && after.trim_start_matches([' ', '\t']).starts_with('=') {
                    return start + i;
                }
                (at_key, at_line) = (false, false);
                i += 1;
            }
        }
    }
    table.start
}

/// The end of the table that starts at `start` (its header) and whose span ends at `end`, with the
/// sub-tables written after it (`[vrrp_instance.authentication]`), which its span leaves out.
fn with_sub_tables(text: &str, start: usize, mut end: usize) -> usize {
    let name = text[start..].trim_start().trim_start_matches('[').split(']').next().unwrap_or("").trim();
    let is_header = |line: &str| line.trim_start().starts_with('[');
    let ours = |line: &str| {
        let header = line.trim_start().trim_start_matches('[').trim_start();
        header.strip_prefix(name).is_some_and(|rest| rest.trim_start().starts_with('.'))
    };
    let mut at = end;
    let mut sub = false;
    for line in text[end..].split_inclusive('\n') {
        if is_header(line) {
            sub = ours(line);
        }
        at += line.len();
        if sub {
            end = at;
        } else if is_header(line) {
            break;
        }
    }
    end
}

// --- deserialization of the flexible forms -------------------------------------------------

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = DurationSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"100ms\", \"1s\" or \"1m30s\", or a number of seconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationSpec, E> {
                parse_duration(v).map(DurationSpec).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationSpec, E> {
                u64::try_from(v).map(|s| DurationSpec(Duration::from_secs(s))).map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationSpec, E> {
                Ok(DurationSpec(Duration::from_secs(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<DurationSpec, E> {
                // Through the decimal text, so that 0.1 is exactly 100ms.
                parse_duration(&format!("{v}s")).map(DurationSpec).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl Serialize for DurationSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for VirtualAddressSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            address: String,
            dev: Option<String>,
            label: Option<String>,
        }
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = VirtualAddressSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an address (\"10.0.0.100/24 dev eth1 label eth1:1\") or a table { address, dev, label }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<VirtualAddressSpec, E> {
                parse_virtual_address(v).map_err(E::custom)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<VirtualAddressSpec, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let mut spec = parse_virtual_address(&t.address).map_err(de::Error::custom)?;
                if spec.dev.is_some() || spec.label.is_some() {
                    return Err(de::Error::custom("in table form, give `dev` and `label` as keys"));
                }
                spec.dev = t.dev;
                spec.label = t.label;
                Ok(spec)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// keepalived's `virtual_ipaddress` line: `ADDR[/LEN] [dev IF] [label LABEL]`.
pub fn parse_virtual_address(text: &str) -> Result<VirtualAddressSpec, String> {
    let mut words = text.split_whitespace();
    let first = words.next().ok_or("empty virtual address")?;
    let (addr, len) = match first.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u8>().map_err(|_| format!("invalid prefix length in `{first}`"))?)),
        None => (first, None),
    };
    let address: IpAddr = addr.parse().map_err(|_| format!("invalid IP address `{addr}`"))?;
    let mut spec = VirtualAddressSpec { address, prefix_len: len, dev: None, label: None };
    while let Some(word) = words.next() {
        let value = words.next().ok_or_else(|| format!("`{word}` needs a value in `{text}`"))?;
        match word {
            "dev" => spec.dev = Some(value.to_owned()),
            "label" => spec.label = Some(value.to_owned()),
            // keepalived's other options change how the kernel holds the address; lbd never
            // gives it to the kernel.
            other => return Err(format!("unsupported option `{other}` in virtual address `{text}`; lbd accepts dev and label")),
        }
    }
    Ok(spec)
}

macro_rules! name_or_table {
    ($ty:ident, $what:literal, $weight_default:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Table {
                    name: String,
                    weight: Option<i64>,
                }
                struct V;
                impl<'de> de::Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str(concat!("a ", $what, " name or a table { name, weight }"))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        Ok($ty { name: v.to_owned(), weight: $weight_default(None) })
                    }
                    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<$ty, A::Error> {
                        let t = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                        Ok($ty { name: t.name, weight: $weight_default(t.weight) })
                    }
                }
                deserializer.deserialize_any(V)
            }
        }
    };
}
name_or_table!(TrackInterfaceSpec, "interface", |w: Option<i64>| w.unwrap_or(0));
name_or_table!(TrackScriptSpec, "script", |w: Option<i64>| w);

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        #[serde(default)]
        vrrp_instance: Vec<VrrpInstanceSpec>,
        #[serde(default)]
        vrrp_script: Vec<VrrpScriptSpec>,
        #[serde(default)]
        vrrp_sync_group: Vec<VrrpSyncGroupSpec>,
    }

    fn spec(text: &str) -> VrrpSpec {
        let f: File = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        VrrpSpec { instances: f.vrrp_instance, scripts: f.vrrp_script, sync_groups: f.vrrp_sync_group }
    }

    fn problems(text: &str) -> Vec<String> {
        spec(text).validate().iter().map(ToString::to_string).collect()
    }

    const MINIMAL: &str =
        "[[vrrp_instance]]\nname = \"VI_1\"\ninterface = \"eth0\"\nvirtual_router_id = 51\nvirtual_addresses = [\"10.0.0.100\"]\n";

    #[test]
    fn every_key_in_its_forms() {
        let s = spec(
            r#"
            [[vrrp_instance]]
            name = "VI_1"
            interface = "eth0"
            virtual_router_id = 51
            priority = 150
            advert_interval = 0.1
            version = 3
            preempt = false
            preempt_delay = "2s"
            virtual_addresses = ["10.0.0.100/24 dev eth1 label eth1:vip", { address = "10.0.0.101", dev = "eth2" }, "10.0.0.102"]
            unicast_source = "10.0.0.2"
            unicast_peers = ["10.0.0.3", "10.0.0.4"]
            garp_master_delay = "0s"
            garp_master_repeat = 3
            garp_master_refresh = "1m"
            garp_master_refresh_repeat = 2
            garp_lower_prio_repeat = 2
            garp_lower_prio_delay = "1s"
            track_interface = ["eth1", { name = "eth2", weight = -20 }]
            track_script = ["chk", { name = "chk2", weight = 10 }]
            notify_master = "/bin/true master"
            notify_backup = "/bin/true backup"
            notify_fault = "/bin/true fault"
            notify_stop = "/bin/true stop"
            notify = "/bin/true"
            notify_timeout = "3s"

            [[vrrp_script]]
            name = "chk"
            script = "true"
            interval = 2
            timeout = "500ms"
            weight = -10
            rise = 2
            fall = 3
            init_fail = true

            [[vrrp_script]]
            name = "chk2"
            script = "true"

            [[vrrp_instance]]
            name = "VI_2"
            interface = "eth0"
            virtual_router_id = 52
            virtual_addresses = ["fd00::100"]
            authentication = { auth_type = "PASS", auth_pass = "x" }

            [[vrrp_sync_group]]
            name = "G"
            group = ["VI_1", "VI_2"]
            notify = "/bin/true"
            "#,
        );
        let i = &s.instances[0];
        assert_eq!(i.advert_interval, Some(DurationSpec(Duration::from_millis(100))));
        assert_eq!(
            i.virtual_addresses[0],
            VirtualAddressSpec {
                address: "10.0.0.100".parse().unwrap(),
                prefix_len: Some(24),
                dev: Some("eth1".into()),
                label: Some("eth1:vip".into())
            }
        );
        assert_eq!(i.virtual_addresses[1].dev.as_deref(), Some("eth2"));
        assert_eq!(
            i.track_interface,
            vec![TrackInterfaceSpec { name: "eth1".into(), weight: 0 }, TrackInterfaceSpec { name: "eth2".into(), weight: -20 }]
        );
        assert_eq!(i.track_script[1], TrackScriptSpec { name: "chk2".into(), weight: Some(10) });
        assert_eq!(s.scripts[0].interval, Some(DurationSpec(Duration::from_secs(2))));
        assert_eq!(s.instances[1].effective_version(), 3, "IPv6 defaults to v3");
        // The only problem: authentication on a v3 instance.
        assert_eq!(
            problems_of(&s),
            vec!["[[vrrp_instance]] #2 `authentication`: authentication exists in VRRPv2 only (RFC 5798 removed it)"]
        );
        // Serializes back with the same names (for `lbd status --json`).
        let json = serde_json::to_value(&s.instances[0]).unwrap();
        assert_eq!(json["advert_interval"], "100ms");
        assert_eq!(json["virtual_addresses"][0]["dev"], "eth1");
    }

    fn problems_of(s: &VrrpSpec) -> Vec<String> {
        s.validate().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn minimal_instance_is_valid_with_keepalived_defaults() {
        let s = spec(MINIMAL);
        assert!(problems_of(&s).is_empty(), "{:?}", problems_of(&s));
        assert_eq!(s.instances[0].effective_version(), 2);
    }

    #[test]
    fn semantic_problems_name_their_key() {
        let errs = spec(
            r#"
            [[vrrp_instance]]
            name = "VI_1"
            interface = "eth0/x"
            virtual_router_id = 0
            priority = 256
            advert_interval = "1.5s"
            virtual_addresses = ["10.0.0.100", "fd00::1", "10.0.0.100", "224.0.0.1"]
            authentication = { auth_type = "AH", auth_pass = "123456789" }
            track_interface = [{ name = "eth1", weight = 300 }]
            track_script = ["nope"]
            unicast_peers = ["fd00::2"]
            "#,
        )
        .instances[0]
            .validate();
        let fields: Vec<&str> = errs.iter().map(|e| e.0).collect();
        assert_eq!(
            fields,
            [
                "interface",
                "virtual_router_id",
                "priority",
                "advert_interval",
                "virtual_addresses",
                "virtual_addresses",
                "virtual_addresses",
                "unicast_peers",
                "auth_type",
                "auth_pass",
                "track_interface",
            ],
            "{errs:#?}"
        );
        assert!(errs[3].1.contains("VRRPv2 carries whole seconds"), "{}", errs[3].1);
        assert_eq!(
            errs[9].1,
            "auth_pass must be 1 to 8 bytes, got 9: keepalived sends only the first 8, so write auth_pass = \"12345678\" to speak with it"
        );

        let v3 = "[[vrrp_instance]]\nname = \"a\"\ninterface = \"eth0\"\nvirtual_router_id = 1\nversion = 3\nadvert_interval = \"105ms\"\nvirtual_addresses = [\"10.0.0.1\"]\n";
        assert_eq!(problems(v3), vec!["[[vrrp_instance]] #1 `advert_interval`: VRRPv3 carries centiseconds: advert_interval must be a multiple of 10ms between 10ms and 40.95s, got 105ms"]);
        let v2v6 = "[[vrrp_instance]]\nname = \"a\"\ninterface = \"eth0\"\nvirtual_router_id = 1\nversion = 2\nvirtual_addresses = [\"fd00::1\"]\n";
        assert_eq!(problems(v2v6), vec!["[[vrrp_instance]] #1 `version`: VRRPv2 is IPv4-only; IPv6 virtual addresses need version = 3"]);
    }

    #[test]
    fn cross_table_problems() {
        let text = format!(
            "{MINIMAL}{}{}",
            "track_script = [\"missing\"]\n[[vrrp_instance]]\nname = \"VI_1\"\ninterface = \"eth0\"\nvirtual_router_id = 51\nvirtual_addresses = [\"10.0.0.100\"]\n",
            "[[vrrp_sync_group]]\nname = \"G\"\ngroup = [\"VI_1\", \"VI_9\"]\n[[vrrp_script]]\nname = \"s\"\nscript = \"true\"\nrise = 0\n"
        );
        assert_eq!(
            problems(&text),
            vec![
                "[[vrrp_script]] #1 `rise`: rise must be between 1 and 1000, got 0",
                "[[vrrp_instance]] #1 `track_script`: no [[vrrp_script]] named `missing`",
                "[[vrrp_instance]] #2 `name`: instance name `VI_1` is already used by [[vrrp_instance]] #1",
                "[[vrrp_instance]] #2 `virtual_router_id`: virtual_router_id 51 on eth0 is already used by instance `VI_1`",
                "[[vrrp_instance]] #2 `virtual_addresses`: 10.0.0.100 is already a virtual address of instance `VI_1`",
                "[[vrrp_sync_group]] #1 `group`: no [[vrrp_instance]] named `VI_9`",
            ]
        );
    }

    #[test]
    fn notify_options_are_checked_alike_in_instances_and_sync_groups() {
        let bad = "notify_master = \" \"\nnotify = \"\"\nnotify_timeout = \"0s\"\n";
        let long = "notify_timeout = \"2h\"\n";
        let group = |extra: &str| {
            format!(
                "{MINIMAL}{}[[vrrp_sync_group]]\nname = \"G\"\ngroup = [\"VI_1\", \"VI_2\"]\n{extra}",
                MINIMAL.replace("VI_1", "VI_2").replace("= 51", "= 52").replace("10.0.0.100", "10.0.0.101")
            )
        };
        assert_eq!(problems(&group("")), Vec::<String>::new());
        for (table, text) in [("vrrp_instance", format!("{MINIMAL}{bad}")), ("vrrp_sync_group", group(bad))] {
            assert_eq!(
                problems(&text),
                vec![
                    format!("[[{table}]] #1 `notify_master`: the command must not be empty"),
                    format!("[[{table}]] #1 `notify`: the command must not be empty"),
                    format!("[[{table}]] #1 `notify_timeout`: notify_timeout must be more than 0"),
                ]
            );
        }
        for (table, text) in [("vrrp_instance", format!("{MINIMAL}{long}")), ("vrrp_sync_group", group(long))] {
            assert_eq!(problems(&text), vec![format!("[[{table}]] #1 `notify_timeout`: notify_timeout must be at most 3600s")]);
        }
    }

    #[test]
    fn keys_are_located_in_their_table() {
        #[derive(Deserialize)]
        struct F {
            vrrp_instance: Vec<toml::Spanned<VrrpInstanceSpec>>,
        }
        let text = format!(
            "{MINIMAL}priority = 300\n\n{}authentication = {{ auth_type = \"AH\", auth_pass = \"x\" }}\n",
            MINIMAL.replace("VI_1", "VI_2")
        );
        let f: F = toml::from_str(&text).unwrap();
        let second = &f.vrrp_instance[1];
        let errs = second.get_ref().validate();
        assert_eq!(errs[0].0, "auth_type");
        let at = locate_key(&text, second.span(), errs[0].0);
        assert!(text[at..].starts_with("auth_type = \"AH\""), "{}", &text[at..]);
        // The first table's key, not the second's.
        let at = locate_key(&text, f.vrrp_instance[0].span(), "priority");
        assert!(text[at..].starts_with("priority = 300"));
        // Inside an inline table, and absent keys fall back to the table.
        assert!(text[locate_key(&text, second.span(), "auth_type")..].starts_with("auth_type = \"AH\""));
        assert_eq!(locate_key(&text, second.span(), "preempt"), second.span().start);
        // Not inside a string or a comment; a sub-table at its header.
        let text = format!(
            "{MINIMAL}# priority = 1\nnotify = \"/bin/logger a,priority = 3\"\npriority = 0\n\
             [vrrp_instance.authentication]\nauth_type = \"PASS\"\nauth_pass = \"x\"\n"
        );
        let f: F = toml::from_str(&text).unwrap();
        let span = f.vrrp_instance[0].span();
        assert!(text[locate_key(&text, span.clone(), "priority")..].starts_with("priority = 0"));
        assert!(text[locate_key(&text, span.clone(), "authentication")..].starts_with("[vrrp_instance.authentication]"));
        assert!(text[locate_key(&text, span, "auth_type")..].starts_with("auth_type = \"PASS\""));
    }

    #[test]
    fn addresses_are_hosts_and_lists_hold_each_once() {
        let errs = spec(&format!(
            "{}unicast_source = \"10.0.0.2\"\n\
             unicast_peers = [\"127.0.0.1\", \"255.255.255.255\", \"10.0.0.2\", \"10.0.0.3\", \"10.0.0.3\"]\n\
             track_interface = [\"eth1\", \"eth1\"]\n",
            MINIMAL.replace("[\"10.0.0.100\"]", "[\"10.0.0.100\", \"::ffff:10.0.0.101\"]")
        ))
        .instances[0]
            .validate();
        let messages: Vec<&str> = errs.iter().map(|e| e.1.as_str()).collect();
        assert_eq!(
            messages,
            [
                "virtual address #2 (::ffff:10.0.0.101) is not of the same family as the first; use one instance per family",
                "::ffff:10.0.0.101 cannot be a virtual address: it is an IPv4-mapped IPv6 address: write it as IPv4, \
                 10.0.0.101",
                "unicast peer 127.0.0.1 must be another director's address, not a loopback address, which never reaches \
                 the director's interface",
                "unicast peer 255.255.255.255 must be another director's address, not the broadcast address",
                "unicast peer 10.0.0.2 is this director's own unicast_source",
                "unicast peer 10.0.0.3 is listed twice",
                "interface eth1 is tracked twice",
            ]
        );
    }

    #[test]
    fn parser_reports_bad_forms() {
        let err = |text: &str| toml::from_str::<File>(text).err().map(|e| e.message().to_owned()).unwrap_or_default();
        assert!(err(&MINIMAL.replace("[\"10.0.0.100\"]", "[\"10.0.0.300\"]")).contains("invalid IP address `10.0.0.300`"));
        assert!(err(&format!("{MINIMAL}advert_interval = \"fast\"\n")).contains("invalid duration \"fast\""));
        assert!(err(&format!("{MINIMAL}nopreempt = true\n")).contains("unknown field `nopreempt`"));
        assert!(err(&format!("{MINIMAL}track_interface = [{{ name = \"x\", wieght = 1 }}]\n")).contains("unknown field `wieght`"));
        assert!(err(&MINIMAL.replace("[\"10.0.0.100\"]", "[\"10.0.0.100 brd 10.0.0.255\"]")).contains("unsupported option `brd`"));
    }
}
