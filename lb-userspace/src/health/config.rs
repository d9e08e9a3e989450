//! The `health_check` table: what the file says ([`HealthCheckSpec`]), how a real server's table
//! overrides its virtual server's ([`HealthCheckSpec::merge`]), and the checked, complete result
//! with every default filled in ([`HealthCheck`], from [`HealthCheckSpec::validate`]).
//!
//! ```toml
//! [[virtual_server]]
//! address = "10.0.0.100"
//! port = 80
//! health_check = { kind = "http", path = "/healthz", interval = "1s", timeout = "500ms", rise = 2, fall = 2 }
//!
//!   [[virtual_server.real_server]]
//!   address = "10.0.0.11"
//!   health_check = { port = 8080 }          # only the port differs for this one
//!
//!   [[virtual_server.real_server]]
//!   address = "10.0.0.12"
//!   health_check = { kind = "tcp" }         # another kind: only the timing keys are inherited
//! ```
//!
//! # Keys
//!
//! | key | kinds | meaning (keepalived name) | default |
//! | --- | --- | --- | --- |
//! | `kind` | | `tcp`, `http`, `https`, `script`, `udp`, `dns`, `none` | required |
//! | `port` | tcp http https udp dns | port probed (`connect_port`) | the real server's port (dns: 53 when that is 0) |
//! | `via` | tcp | `"real"`: to the real server's address; `"vip"`: to the VIP, delivered to the real server's MAC (DSR path; not for `fwmark`, `nat` or `tunnel` virtual servers) | `"real"` |
//! | `interval` | all | time between checks (`delay_loop`) | `"5s"` |
//! | `timeout` | all | limit of one attempt: connect, TLS, request and reply, or the script's run (`connect_timeout`, `misc_timeout`) | `"5s"`; script: the interval |
//! | `retries` | all | further attempts before a check counts as failed (`retry`, `nb_get_retry`) | `1`; script: `0` |
//! | `retry_delay` | all | pause before each retry (`delay_before_retry`) | `"3s"` for http/https, `"1s"` otherwise |
//! | `rise` | all | consecutive passed checks that bring a down real server up | `2` |
//! | `fall` | all | consecutive failed checks that take an up real server down | `1` |
//! | `warmup` | all | the first check starts after a random delay up to this (`warmup`) | the interval |
//! | `path` | http https | path of the GET (`url { path }`) | `"/"` |
//! | `host` | http https | `Host` header, and the TLS server name (`virtualhost`) | the address |
//! | `expect_status` | http https | passing statuses: `200`, `"200-299"`, or an array of both (`status_code`) | `"200-299"` |
//! | `expect_body` | http https | `"text"`: the body contains it; `{ regex = "^ok" }`: the body matches | none |
//! | `digest` | http https | MD5 of the body, 32 hex digits (`url { digest }`, as `genhash` prints it) | none |
//! | `tls_verify` | https | verify the certificate chain and name | `true` |
//! | `ca_file` | https | PEM file with the CA certificates to trust instead of the system's | system store |
//! | `command` | script | `"shell command line"` (run by `/bin/sh -c`) or `["argv0", "arg", ...]` (`misc_path`) | required |
//! | `dynamic_weight` | script | exit code 2..=255 passes and sets the weight to code − 2 (`misc_dynamic`) | `false` |
//! | `payload` | udp | datagram sent | `""` (an empty datagram) |
//! | `expect_reply` | udp | the reply must contain this; `""` = any reply | absent: passes unless an ICMP error arrives within the timeout (keepalived `UDP_CHECK` without `require_reply`) |
//! | `query_name` | dns | name asked (`name`) | `"."` |
//! | `query_type` | dns | `A`, `AAAA`, `NS`, `CNAME`, `SOA`, `PTR`, `MX`, `TXT`, `SRV` (`type`) | `"SOA"` |
//!
//! Durations are strings of a number and a unit, `ms`, `s`, `m` or `h`, possibly several:
//! `"500ms"`, `"1s"`, `"1.5s"`, `"2m"`, `"1m30s"`.
//!
//! # Defaults, and why
//!
//! keepalived's checkers default to `connect_timeout` 5 s, `retry` 1 and `delay_before_retry` 1 s
//! (3 s for `HTTP_GET`/`SSL_GET`); lbd keeps those. Its `MISC_CHECK` defaults to `retry` 0 and
//! lets a script run up to `delay_loop` when `misc_timeout` is not given; so do lbd's `script`
//! checks (a script that takes its time is not killed at 5 s, nor run twice per failure). keepalived's `delay_loop` defaults to 60 s,
//! which leaves a dead real server in the table for up to a minute: lbd checks every 5 s. keepalived
//! has no `rise`/`fall`: one failed check (after its retries) removes a real server and one pass
//! brings it back. lbd keeps `fall = 1` (the retries already absorb a lost packet) but uses
//! `rise = 2`, so a flapping real server is not put back by a single lucky pass; write `rise = 1`
//! for keepalived's behaviour. `warmup` defaults to the interval, as keepalived's does, so that
//! checks spread over the first interval instead of firing in one burst.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;

pub use crate::duration::{format_duration, parse_duration};

/// Default `interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Default `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `retries`.
pub const DEFAULT_RETRIES: u32 = 1;
/// Default `retry_delay` for http and https (keepalived's `delay_before_retry` for `HTTP_GET`).
pub const DEFAULT_HTTP_RETRY_DELAY: Duration = Duration::from_secs(3);
/// Default `retry_delay` for the other kinds.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Default `rise`.
pub const DEFAULT_RISE: u32 = 2;
/// Default `fall`.
pub const DEFAULT_FALL: u32 = 1;
/// Shortest `interval` accepted.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Longest duration accepted anywhere.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Which probe a check runs (`kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP handshake (keepalived `TCP_CHECK`).
    Tcp,
    /// `GET path` over HTTP/1.1 (`HTTP_GET`).
    Http,
    /// `GET path` over HTTP/1.1 in TLS (`SSL_GET`).
    Https,
    /// A command's exit code (`MISC_CHECK`).
    Script,
    /// A UDP datagram and optionally its reply (`UDP_CHECK`).
    Udp,
    /// A DNS query over UDP (`DNS_CHECK`).
    Dns,
    /// No probe: always up.
    None,
}

impl CheckKind {
    /// The name used in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Https => "https",
            CheckKind::Script => "script",
            CheckKind::Udp => "udp",
            CheckKind::Dns => "dns",
            CheckKind::None => "none",
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a probe is addressed (`via`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// To the real server's own address (`"real"`, the default).
    #[default]
    Real,
    /// To the VIP, in a frame sent to the real server's MAC: the path client traffic takes under
    /// DSR (`"vip"`). Catches a real server that lost the VIP on its loopback or answers ARP for
    /// it. See [`crate::health::vip`].
    Vip,
}

/// A `health_check` table as written, before defaults: every key optional, each value keeps its
/// position in the file (byte offsets, for `FILE:LINE:COL` diagnostics).
///
/// Deserialize it from the file's TOML (as `Option<Spanned<HealthCheckSpec>>` in the virtual
/// server's and the real server's tables), [`merge`](Self::merge) the two, then
/// [`validate`](Self::validate). Unknown keys are refused.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table")]
pub struct HealthCheckSpec {
    pub kind: Option<Spanned<CheckKind>>,
    pub port: Option<Spanned<i64>>,
    pub via: Option<Spanned<Via>>,
    pub interval: Option<Spanned<DurationText>>,
    pub timeout: Option<Spanned<DurationText>>,
    pub retries: Option<Spanned<i64>>,
    pub retry_delay: Option<Spanned<DurationText>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub warmup: Option<Spanned<DurationText>>,
    pub path: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub expect_status: Option<Spanned<StatusText>>,
    pub expect_body: Option<Spanned<BodyText>>,
    pub digest: Option<Spanned<String>>,
    pub tls_verify: Option<Spanned<bool>>,
    pub ca_file: Option<Spanned<PathBuf>>,
    pub command: Option<Spanned<CommandText>>,
    pub dynamic_weight: Option<Spanned<bool>>,
    pub payload: Option<Spanned<String>>,
    pub expect_reply: Option<Spanned<String>>,
    pub query_name: Option<Spanned<String>>,
    pub query_type: Option<Spanned<String>>,
}

/// A duration as written: a string such as `"500ms"`, checked by [`parse_duration`] during
/// validation (so that every bad duration is reported, with the key's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationText(pub String);

/// `expect_status` as written: `200`, `"200-299"`, or an array of those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusText(pub Vec<StatusItem>);

/// One element of `expect_status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusItem {
    Code(i64),
    /// `"200-299"` or `"204"`, parsed during validation.
    Text(String),
}

/// `expect_body` as written: a string (the body must contain it) or a table with one key,
/// `contains` or `regex`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyText {
    Contains(String),
    Regex(String),
}

/// `command` as written: one string for `/bin/sh -c`, or an argument vector run directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CommandText {
    Shell(String),
    Argv(Vec<String>),
}

impl CommandText {
    /// The command if it can run: a non-empty line, or an argument vector naming a program
    /// first; else the message, naming `key`.
    pub fn checked(&self, key: &str) -> Result<CommandText, String> {
        match self {
            CommandText::Shell(s) if s.trim().is_empty() => Err(format!("`{key}` must not be empty")),
            CommandText::Argv(a) if a.is_empty() || a[0].is_empty() => {
                Err(format!("`{key}` must name a program first"))
            }
            c => Ok(c.clone()),
        }
    }
}

/// One problem in a `health_check` table.
///
/// `at` is the byte offset of the offending value in the file when one value is to blame (as
/// `toml::Spanned::span().start`); `None` for problems of the table as a whole (such as a missing
/// key), which belong at the table's own position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    /// The key at fault, if one is.
    pub key: Option<&'static str>,
    /// Byte offset of the value at fault in the file.
    pub at: Option<usize>,
    /// What is wrong, on one line.
    pub message: String,
}

/// A complete, checked health check: every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthCheck {
    /// What is probed, with the kind's own settings.
    pub probe: ProbeKind,
    /// `port`; `None`: the real server's port.
    pub port: Option<u16>,
    /// `via`.
    pub via: Via,
    /// `interval`, `timeout`, `retries`, `retry_delay`, `rise`, `fall`, `warmup`.
    pub timing: Timing,
}

impl HealthCheck {
    /// The kind of probe.
    pub fn kind(&self) -> CheckKind {
        match &self.probe {
            ProbeKind::Tcp => CheckKind::Tcp,
            ProbeKind::Http(h) if h.tls.is_some() => CheckKind::Https,
            ProbeKind::Http(_) => CheckKind::Http,
            ProbeKind::Script(_) => CheckKind::Script,
            ProbeKind::Udp(_) => CheckKind::Udp,
            ProbeKind::Dns(_) => CheckKind::Dns,
            ProbeKind::None => CheckKind::None,
        }
    }

    /// Parses and validates a standalone `health_check` table, one `key = value` per line (tests
    /// and tools); `real_server_port` as for [`HealthCheckSpec::validate`]. Problems are joined
    /// with `; `.
    pub fn from_toml(text: &str, real_server_port: u16) -> Result<HealthCheck, String> {
        let spec: HealthCheckSpec = toml::from_str(text).map_err(|e| e.message().to_string())?;
        spec.validate(real_server_port).map_err(|problems| {
            problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// A check of `kind` with every default (as if only `kind` were written). `script` gets an
    /// empty command; set one.
    pub fn with_defaults(kind: CheckKind) -> HealthCheck {
        let probe = match kind {
            CheckKind::Tcp => ProbeKind::Tcp,
            CheckKind::Http | CheckKind::Https => ProbeKind::Http(HttpCheck {
                path: "/".into(),
                host: None,
                expect_status: vec![200..=299],
                expect_body: None,
                digest: None,
                tls: (kind == CheckKind::Https).then_some(TlsCheck {
                    verify: true,
                    ca_file: None,
                }),
            }),
            CheckKind::Script => ProbeKind::Script(ScriptCheck {
                command: CommandText::Argv(Vec::new()),
                dynamic_weight: false,
            }),
            CheckKind::Udp => ProbeKind::Udp(UdpCheck {
                payload: Vec::new(),
                expect_reply: None,
            }),
            CheckKind::Dns => ProbeKind::Dns(DnsCheck {
                query_name: ".".into(),
                query_type: DnsType::Soa,
            }),
            CheckKind::None => ProbeKind::None,
        };
        HealthCheck {
            probe,
            port: None,
            via: Via::Real,
            timing: Timing {
                interval: DEFAULT_INTERVAL,
                // keepalived's MISC_CHECK: `misc_timeout` is `delay_loop` unless given, `retry` 0.
                timeout: if kind == CheckKind::Script { DEFAULT_INTERVAL } else { DEFAULT_TIMEOUT },
                retries: if kind == CheckKind::Script { 0 } else { DEFAULT_RETRIES },
                retry_delay: default_retry_delay(kind),
                rise: DEFAULT_RISE,
                fall: DEFAULT_FALL,
                warmup: DEFAULT_INTERVAL,
            },
        }
    }
}

fn default_retry_delay(kind: CheckKind) -> Duration {
    match kind {
        CheckKind::Http | CheckKind::Https => DEFAULT_HTTP_RETRY_DELAY,
        _ => DEFAULT_RETRY_DELAY,
    }
}

/// When and how often a check runs, and how many results change the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timing {
    /// Time between the starts of two checks.
    #[serde(serialize_with = "serialize_duration")]
    pub interval: Duration,
    /// Limit of one attempt.
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
    /// Further attempts after a failed one, within one check.
    pub retries: u32,
    /// Pause before each retry.
    #[serde(serialize_with = "serialize_duration")]
    pub retry_delay: Duration,
    /// Consecutive passed checks that bring a down real server up.
    pub rise: u32,
    /// Consecutive failed checks that take an up real server down.
    pub fall: u32,
    /// Upper bound of the random delay before the first check.
    #[serde(serialize_with = "serialize_duration")]
    pub warmup: Duration,
}

/// The probe of a check and its kind's settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProbeKind {
    Tcp,
    /// `http`, or `https` when `tls` is set.
    Http(HttpCheck),
    Script(ScriptCheck),
    Udp(UdpCheck),
    Dns(DnsCheck),
    None,
}

/// Settings of an `http` or `https` check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpCheck {
    /// Path and query of the GET, starting with `/`.
    pub path: String,
    /// `Host` header and TLS server name; `None`: the address probed.
    pub host: Option<String>,
    /// Passing statuses.
    #[serde(serialize_with = "serialize_statuses")]
    pub expect_status: Vec<RangeInclusive<u16>>,
    /// What the body must contain or match.
    pub expect_body: Option<BodyMatch>,
    /// MD5 of the body, lower-case hex.
    pub digest: Option<String>,
    /// Set for `https`.
    pub tls: Option<TlsCheck>,
}

/// TLS settings of an `https` check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsCheck {
    /// `tls_verify`: check the certificate chain and the server name.
    pub verify: bool,
    /// `ca_file`: trust these CAs instead of the system's store.
    pub ca_file: Option<PathBuf>,
}

/// What an HTTP body must contain or match.
#[derive(Debug, Clone)]
pub enum BodyMatch {
    Contains(String),
    Regex(regex::Regex),
}

impl PartialEq for BodyMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (BodyMatch::Contains(a), BodyMatch::Contains(b)) => a == b,
            (BodyMatch::Regex(a), BodyMatch::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Serialize for BodyMatch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(1))?;
        match self {
            BodyMatch::Contains(text) => map.serialize_entry("contains", text)?,
            BodyMatch::Regex(re) => map.serialize_entry("regex", re.as_str())?,
        }
        map.end()
    }
}

/// Settings of a `script` check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScriptCheck {
    pub command: CommandText,
    /// keepalived `misc_dynamic`: exit 2..=255 passes with weight = code − 2.
    pub dynamic_weight: bool,
}

/// Settings of a `udp` check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UdpCheck {
    /// The datagram sent.
    pub payload: Vec<u8>,
    /// `None`: pass unless an ICMP error arrives within the timeout; `Some(b"")`: any reply
    /// passes; otherwise the reply must contain these bytes.
    pub expect_reply: Option<Vec<u8>>,
}

/// Settings of a `dns` check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsCheck {
    /// Name asked, without the trailing dot except for the root `"."`.
    pub query_name: String,
    pub query_type: DnsType,
}

/// DNS record types a `dns` check can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DnsType {
    A,
    Ns,
    Cname,
    Soa,
    Ptr,
    Mx,
    Txt,
    Aaaa,
    Srv,
}

impl DnsType {
    /// All types, in the order the error message lists them.
    pub const ALL: [DnsType; 9] = [
        DnsType::A,
        DnsType::Aaaa,
        DnsType::Ns,
        DnsType::Cname,
        DnsType::Soa,
        DnsType::Ptr,
        DnsType::Mx,
        DnsType::Txt,
        DnsType::Srv,
    ];

    /// The record type's number on the wire.
    pub fn code(self) -> u16 {
        match self {
            DnsType::A => 1,
            DnsType::Ns => 2,
            DnsType::Cname => 5,
            DnsType::Soa => 6,
            DnsType::Ptr => 12,
            DnsType::Mx => 15,
            DnsType::Txt => 16,
            DnsType::Aaaa => 28,
            DnsType::Srv => 33,
        }
    }

    /// The type's mnemonic, as written in the file.
    pub fn name(self) -> &'static str {
        match self {
            DnsType::A => "A",
            DnsType::Ns => "NS",
            DnsType::Cname => "CNAME",
            DnsType::Soa => "SOA",
            DnsType::Ptr => "PTR",
            DnsType::Mx => "MX",
            DnsType::Txt => "TXT",
            DnsType::Aaaa => "AAAA",
            DnsType::Srv => "SRV",
        }
    }
}

impl fmt::Display for DnsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Merging

/// Applies `$m!(field)` to every key that belongs to one kind only.
macro_rules! kind_keys {
    ($m:ident) => {
        $m!(path);
        $m!(host);
        $m!(expect_status);
        $m!(expect_body);
        $m!(digest);
        $m!(tls_verify);
        $m!(ca_file);
        $m!(command);
        $m!(dynamic_weight);
        $m!(payload);
        $m!(expect_reply);
        $m!(query_name);
        $m!(query_type);
    };
}

/// Applies `$m!(field)` to every timing key (which every kind accepts).
macro_rules! timing_keys {
    ($m:ident) => {
        $m!(interval);
        $m!(timeout);
        $m!(retries);
        $m!(retry_delay);
        $m!(rise);
        $m!(fall);
        $m!(warmup);
    };
}

/// Applies `$m!(field)` to the keys of where the probe goes, which some kinds accept.
macro_rules! address_keys {
    ($m:ident) => {
        $m!(port);
        $m!(via);
    };
}

impl HealthCheckSpec {
    /// Every key a `health_check` table accepts, in the order of the table in the module docs.
    pub const KEYS: &'static [&'static str] = &[
        "kind",
        "port",
        "via",
        "interval",
        "timeout",
        "retries",
        "retry_delay",
        "rise",
        "fall",
        "warmup",
        "path",
        "host",
        "expect_status",
        "expect_body",
        "digest",
        "tls_verify",
        "ca_file",
        "command",
        "dynamic_weight",
        "payload",
        "expect_reply",
        "query_name",
        "query_type",
    ];

    /// The check of a real server: its own table (`real_server`) over its virtual server's
    /// (`virtual_server`), key by key. `None` when neither has one (the real server is not
    /// checked and counts as up).
    ///
    /// When the real server's table names another `kind` than the virtual server's, only the
    /// timing keys are inherited: `path` of an `http` default means nothing to a `tcp` override,
    /// and neither does its `port` (a `script` has none, a `dns` override would probe the web
    /// server's port) or its `via`.
    pub fn merge(
        virtual_server: Option<&HealthCheckSpec>,
        real_server: Option<&HealthCheckSpec>,
    ) -> Option<HealthCheckSpec> {
        let (vs, rs) = match (virtual_server, real_server) {
            (None, None) => return None,
            (Some(one), None) | (None, Some(one)) => return Some(one.clone()),
            (Some(vs), Some(rs)) => (vs, rs),
        };
        let mut merged = rs.clone();
        let kind_changes = match (&vs.kind, &rs.kind) {
            (Some(a), Some(b)) => a.get_ref() != b.get_ref(),
            _ => false,
        };
        if merged.kind.is_none() {
            merged.kind = vs.kind.clone();
        }
        macro_rules! inherit {
            ($field:ident) => {
                if merged.$field.is_none() {
                    merged.$field = vs.$field.clone();
                }
            };
        }
        timing_keys!(inherit);
        if !kind_changes {
            address_keys!(inherit);
            kind_keys!(inherit);
        }
        Some(merged)
    }

    /// Checks the (merged) table and fills in the defaults. `real_server_port` is the port of the
    /// real server checked (0 for a virtual server of every port): checks without `port` probe it.
    ///
    /// Every problem found is returned, in key order.
    pub fn validate(&self, real_server_port: u16) -> Result<HealthCheck, Vec<SpecError>> {
        let mut v = Check::default();
        let Some(kind) = &self.kind else {
            v.table(format!(
                "health_check needs `kind`: one of {}",
                KIND_NAMES.join(", ")
            ));
            return Err(v.problems);
        };
        let kind_at = kind.span().start;
        let kind = *kind.get_ref();
        let mut check = HealthCheck::with_defaults(kind);

        // Keys that do not belong to this kind.
        macro_rules! foreign {
            ($field:ident) => {
                if let Some(value) = &self.$field {
                    let key = stringify!($field);
                    if !key_applies(key, kind) {
                        v.push(
                            key,
                            value.span().start,
                            format!("`{key}` {}, not to kind `{kind}`", applies_to(key)),
                        );
                    }
                }
            };
        }
        kind_keys!(foreign);
        if kind == CheckKind::Script || kind == CheckKind::None {
            foreign!(port);
        }

        // Common keys.
        if let Some(port) = &self.port {
            check.port = v.value("port", port, |&p| {
                (1..=65535)
                    .contains(&p)
                    .then_some(p as u16)
                    .ok_or_else(|| format!("`port` must be between 1 and 65535, got {p}"))
            });
        } else if real_server_port == 0 && needs_port(kind) {
            if kind == CheckKind::Dns {
                check.port = Some(53);
            } else {
                v.table(format!(
                    "kind `{kind}` needs `port`: the real server's port is 0 (every port)"
                ));
            }
        }
        if let Some(via) = &self.via {
            check.via = *via.get_ref();
            if check.via == Via::Vip && !VIA_VIP_KINDS.contains(&kind) {
                v.push(
                    "via",
                    via.span().start,
                    format!(
                        "`via = \"vip\"` works with kind {} only (a handshake addressed to the VIP); kind `{kind}` \
                         must use `via = \"real\"`",
                        VIA_VIP_KINDS.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                    ),
                );
            }
        }
        let t = &mut check.timing;
        let interval = v.duration("interval", &self.interval, MIN_INTERVAL);
        if let Some(d) = interval {
            t.interval = d;
            t.warmup = d;
            if kind == CheckKind::Script {
                t.timeout = d;
            }
        }
        if let Some(d) = v.duration("timeout", &self.timeout, Duration::from_millis(1)) {
            t.timeout = d;
        }
        if let Some(d) = v.duration("retry_delay", &self.retry_delay, Duration::ZERO) {
            t.retry_delay = d;
        }
        if let Some(d) = v.duration("warmup", &self.warmup, Duration::ZERO) {
            t.warmup = d;
        }
        if let Some(n) = v.count("retries", &self.retries, 0..=100) {
            t.retries = n;
        }
        if let Some(n) = v.count("rise", &self.rise, 1..=1000) {
            t.rise = n;
        }
        if let Some(n) = v.count("fall", &self.fall, 1..=1000) {
            t.fall = n;
        }

        // The kind's own keys.
        match &mut check.probe {
            ProbeKind::Http(http) => {
                if let Some(path) = &self.path {
                    http.path = v.value("path", path, |p| {
                        if !p.starts_with('/') {
                            Err(format!("`path` must start with `/`, got {p:?}"))
                        } else if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
                            Err(format!("`path` must not contain spaces or control characters, got {p:?}"))
                        } else {
                            Ok(p.clone())
                        }
                    })
                    .unwrap_or_default();
                }
                if let Some(host) = &self.host {
                    http.host = v.value("host", host, |h| {
                        if h.is_empty()
                            || h.chars()
                                .any(|c| c.is_whitespace() || c.is_control() || c == '/')
                        {
                            Err(format!(
                                "`host` must be a host name (and optional :port), got {h:?}"
                            ))
                        } else {
                            Ok(h.clone())
                        }
                    });
                }
                if let Some(status) = &self.expect_status {
                    if let Some(ranges) = v.value("expect_status", status, |s| statuses(&s.0)) {
                        http.expect_status = ranges;
                    }
                }
                if let Some(body) = &self.expect_body {
                    http.expect_body = v.value("expect_body", body, |b| match b {
                        BodyText::Contains(text) if text.is_empty() => {
                            Err("`expect_body` must not be empty".to_string())
                        }
                        BodyText::Contains(text) => Ok(BodyMatch::Contains(text.clone())),
                        BodyText::Regex(re) => {
                            regex::Regex::new(re).map(BodyMatch::Regex).map_err(|e| {
                                format!(
                                    "`expect_body` regex is invalid: {}",
                                    one_line(&e.to_string())
                                )
                            })
                        }
                    });
                }
                if let Some(digest) = &self.digest {
                    http.digest = v.value("digest", digest, |d| {
                        if d.len() == 32 && d.bytes().all(|b| b.is_ascii_hexdigit()) {
                            Ok(d.to_ascii_lowercase())
                        } else {
                            Err(format!(
                                "`digest` must be 32 hex digits (an MD5 sum), got {d:?}"
                            ))
                        }
                    });
                }
                if let Some(tls) = &mut http.tls {
                    if let Some(verify) = &self.tls_verify {
                        tls.verify = *verify.get_ref();
                    }
                    if let Some(ca) = &self.ca_file {
                        if !tls.verify {
                            let at = self
                                .tls_verify
                                .as_ref()
                                .map_or(ca.span().start, |s| s.span().start);
                            v.push(
                                "ca_file",
                                at,
                                "`ca_file` has no use with `tls_verify = false`".into(),
                            );
                        }
                        tls.ca_file = v.value("ca_file", ca, |path| {
                            crate::health::check::load_ca_file(path).map(|_| path.clone())
                        });
                    }
                }
            }
            ProbeKind::Script(script) => {
                match &self.command {
                    None => v.at_or_table(
                        Some(kind_at),
                        "kind `script` needs `command`: a shell command line, or an array of program and arguments"
                            .into(),
                    ),
                    Some(command) => {
                        if let Some(c) = v.value("command", command, |c| c.checked("command")) {
                            script.command = c;
                        }
                    }
                }
                if let Some(d) = &self.dynamic_weight {
                    script.dynamic_weight = *d.get_ref();
                }
            }
            ProbeKind::Udp(udp) => {
                if let Some(payload) = &self.payload {
                    udp.payload = payload.get_ref().as_bytes().to_vec();
                }
                if let Some(reply) = &self.expect_reply {
                    udp.expect_reply = Some(reply.get_ref().as_bytes().to_vec());
                }
            }
            ProbeKind::Dns(dns) => {
                if let Some(name) = &self.query_name {
                    if let Some(n) = v.value("query_name", name, |n| dns_name(n)) {
                        dns.query_name = n;
                    }
                }
                if let Some(ty) = &self.query_type {
                    if let Some(t) = v.value("query_type", ty, |t| {
                        DnsType::ALL
                            .into_iter()
                            .find(|k| k.name().eq_ignore_ascii_case(t))
                            .ok_or_else(|| {
                                format!(
                                    "unknown `query_type` `{t}`; expected one of: {}",
                                    DnsType::ALL.map(DnsType::name).join(", ")
                                )
                            })
                    }) {
                        dns.query_type = t;
                    }
                }
            }
            ProbeKind::Tcp | ProbeKind::None => {}
        }

        if v.problems.is_empty() {
            Ok(check)
        } else {
            v.problems.sort_by_key(|p| (p.at.is_none(), p.at));
            Err(v.problems)
        }
    }
}

const KIND_NAMES: [&str; 7] = ["tcp", "http", "https", "script", "udp", "dns", "none"];

/// Kinds that support `via = "vip"`.
pub const VIA_VIP_KINDS: &[CheckKind] = &[CheckKind::Tcp];

fn needs_port(kind: CheckKind) -> bool {
    matches!(
        kind,
        CheckKind::Tcp | CheckKind::Http | CheckKind::Https | CheckKind::Udp | CheckKind::Dns
    )
}

/// Whether a kind-specific key belongs to `kind`.
fn key_applies(key: &str, kind: CheckKind) -> bool {
    use CheckKind::*;
    match key {
        "path" | "host" | "expect_status" | "expect_body" | "digest" => {
            matches!(kind, Http | Https)
        }
        "tls_verify" | "ca_file" => kind == Https,
        "command" | "dynamic_weight" => kind == Script,
        "payload" | "expect_reply" => kind == Udp,
        "query_name" | "query_type" => kind == Dns,
        "port" => needs_port(kind),
        _ => true,
    }
}

fn applies_to(key: &str) -> &'static str {
    match key {
        "path" | "host" | "expect_status" | "expect_body" | "digest" => {
            "applies to kinds `http` and `https`"
        }
        "tls_verify" | "ca_file" => "applies to kind `https`",
        "command" | "dynamic_weight" => "applies to kind `script`",
        "payload" | "expect_reply" => "applies to kind `udp`",
        "query_name" | "query_type" => "applies to kind `dns`",
        _ => "applies to kinds `tcp`, `http`, `https`, `udp` and `dns`",
    }
}

/// Collects problems while validating.
#[derive(Default)]
struct Check {
    problems: Vec<SpecError>,
}

impl Check {
    fn push(&mut self, key: &'static str, at: usize, message: String) {
        self.problems.push(SpecError {
            key: Some(key),
            at: Some(at),
            message,
        });
    }

    fn table(&mut self, message: String) {
        self.problems.push(SpecError {
            key: None,
            at: None,
            message,
        });
    }

    fn at_or_table(&mut self, at: Option<usize>, message: String) {
        self.problems.push(SpecError {
            key: None,
            at,
            message,
        });
    }

    fn value<T, U>(
        &mut self,
        key: &'static str,
        value: &Spanned<T>,
        check: impl FnOnce(&T) -> Result<U, String>,
    ) -> Option<U> {
        check(value.get_ref())
            .map_err(|m| self.push(key, value.span().start, m))
            .ok()
    }

    fn duration(
        &mut self,
        key: &'static str,
        value: &Option<Spanned<DurationText>>,
        min: Duration,
    ) -> Option<Duration> {
        let value = value.as_ref()?;
        self.value(key, value, |text| {
            let d = parse_duration(&text.0).map_err(|e| format!("`{key}`: {e}"))?;
            // The limit itself, not "more than 0": that was untrue of `timeout = "500us"`,
            // more than 0 and refused all the same.
            if d < min {
                return Err(format!(
                    "`{key}` must be at least {}, got {}",
                    format_duration(min),
                    format_duration(d)
                ));
            }
            if d > MAX_DURATION {
                return Err(format!(
                    "`{key}` must be at most 24h, got {}",
                    format_duration(d)
                ));
            }
            Ok(d)
        })
    }

    fn count(
        &mut self,
        key: &'static str,
        value: &Option<Spanned<i64>>,
        range: RangeInclusive<i64>,
    ) -> Option<u32> {
        let value = value.as_ref()?;
        self.value(key, value, |&n| {
            range.contains(&n).then_some(n as u32).ok_or_else(|| {
                format!(
                    "`{key}` must be between {} and {}, got {n}",
                    range.start(),
                    range.end()
                )
            })
        })
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `expect_status` items to ranges.
fn statuses(items: &[StatusItem]) -> Result<Vec<RangeInclusive<u16>>, String> {
    if items.is_empty() {
        return Err("`expect_status` must list at least one status".into());
    }
    let code = |n: i64| -> Result<u16, String> {
        if (100..=599).contains(&n) {
            Ok(n as u16)
        } else {
            Err(format!(
                "`expect_status` {n} is not an HTTP status (100 to 599)"
            ))
        }
    };
    let mut ranges = Vec::new();
    for item in items {
        match item {
            StatusItem::Code(n) => {
                let c = code(*n)?;
                ranges.push(c..=c);
            }
            StatusItem::Text(text) => {
                let bad = || {
                    format!("`expect_status` {text:?} is neither a status like 200 nor a range like \"200-299\"")
                };
                let number = |s: &str| -> Result<i64, String> {
                    let s = s.trim();
                    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 6 {
                        return Err(bad());
                    }
                    s.parse().map_err(|_| bad())
                };
                let (lo, hi) = match text.split_once('-') {
                    Some((lo, hi)) => (code(number(lo)?)?, code(number(hi)?)?),
                    None => {
                        let c = code(number(text)?)?;
                        (c, c)
                    }
                };
                if lo > hi {
                    return Err(format!("`expect_status` range \"{lo}-{hi}\" is empty: write the lower status first"));
                }
                ranges.push(lo..=hi);
            }
        }
    }
    Ok(ranges)
}

/// A DNS name in text: labels of 1..=63 bytes, at most 253 bytes; a trailing dot is dropped.
fn dns_name(name: &str) -> Result<String, String> {
    if name == "." {
        return Ok(".".into());
    }
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || trimmed.len() > 253 {
        return Err(format!("`query_name` {name:?} is not a DNS name"));
    }
    for label in trimmed.split('.') {
        if label.is_empty()
            || label.len() > 63
            || !label.is_ascii()
            || label.contains(char::is_whitespace)
        {
            return Err(format!(
                "`query_name` {name:?} is not a DNS name: labels must be 1 to 63 ASCII characters without spaces"
            ));
        }
    }
    Ok(trimmed.to_owned())
}

fn serialize_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

fn serialize_statuses<S: Serializer>(
    ranges: &[RangeInclusive<u16>],
    s: S,
) -> Result<S::Ok, S::Error> {
    let items: Vec<String> = ranges
        .iter()
        .map(|r| {
            if r.start() == r.end() {
                r.start().to_string()
            } else {
                format!("{}-{}", r.start(), r.end())
            }
        })
        .collect();
    items.serialize(s)
}

// ---------------------------------------------------------------------------------------------
// Deserializing the written forms

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string like \"1s\" or \"500ms\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationText, E> {
                Err(E::custom(format!(
                    "a duration is a string with a unit: write \"{v}s\" or \"{v}ms\", not {v}"
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationText, E> {
                self.visit_i64(v as i64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<DurationText, E> {
                Err(E::custom(format!(
                    "a duration is a string with a unit: write \"{v}s\", not {v}"
                )))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for StatusText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StatusText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a status like 200, a range like \"200-299\", or an array of those")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StatusText, E> {
                Ok(StatusText(vec![StatusItem::Code(v)]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StatusText, E> {
                Ok(StatusText(vec![StatusItem::Code(
                    v.min(i64::MAX as u64) as i64
                )]))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StatusText, E> {
                Ok(StatusText(vec![StatusItem::Text(v.to_owned())]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StatusText, A::Error> {
                let mut items = Vec::new();
                while let Some(StatusText(mut one)) = seq.next_element::<StatusText>()? {
                    if one.len() != 1 {
                        return Err(de::Error::custom(
                            "`expect_status` arrays hold statuses and ranges, not arrays",
                        ));
                    }
                    items.push(one.remove(0));
                }
                Ok(StatusText(items))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for BodyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BodyText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, or a table { regex = \"...\" } or { contains = \"...\" }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<BodyText, E> {
                Ok(BodyText::Contains(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<BodyText, A::Error> {
                let mut found = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    let body = match key.as_str() {
                        "regex" => BodyText::Regex(value),
                        "contains" => BodyText::Contains(value),
                        other => {
                            return Err(de::Error::custom(format!(
                                "unknown key `{other}` in `expect_body`; expected one of: regex, contains"
                            )))
                        }
                    };
                    if found.replace(body).is_some() {
                        return Err(de::Error::custom(
                            "`expect_body` takes one of `regex` or `contains`, not both",
                        ));
                    }
                }
                found.ok_or_else(|| de::Error::custom("`expect_body` needs `regex` or `contains`"))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for CommandText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CommandText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a command line string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CommandText, E> {
                Ok(CommandText::Shell(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CommandText, A::Error> {
                let mut argv = Vec::new();
                while let Some(arg) = seq.next_element::<String>()? {
                    argv.push(arg);
                }
                Ok(CommandText::Argv(argv))
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> HealthCheckSpec {
        toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[derive(Debug, Deserialize)]
    struct Inline {
        hc: HealthCheckSpec,
    }

    /// The keys of `text` as one inline table (`kind = "tcp", port = 80`).
    fn inline(text: &str) -> HealthCheckSpec {
        toml::from_str::<Inline>(&format!("hc = {{ {text} }}"))
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .hc
    }

    /// Validation messages of the keys in `text` (as for [`inline`]), each prefixed with the
    /// 1-based column of its value in `text` (0 for problems of the whole table).
    fn problems(text: &str, port: u16) -> Vec<String> {
        inline(text)
            .validate(port)
            .expect_err("should be refused")
            .into_iter()
            .map(|p| format!("{}: {}", p.at.map_or(0, |a| a + 1 - 7), p.message))
            .collect()
    }

    fn ok(text: &str) -> HealthCheck {
        spec(text)
            .validate(80)
            .unwrap_or_else(|e| panic!("{text}: {e:?}"))
    }


    #[test]
    fn defaults() {
        let http = ok(r#"kind = "http""#);
        assert_eq!(
            http.timing,
            Timing {
                interval: DEFAULT_INTERVAL,
                timeout: Duration::from_secs(5),
                retries: 1,
                retry_delay: Duration::from_secs(3),
                rise: 2,
                fall: 1,
                warmup: DEFAULT_INTERVAL,
            }
        );
        let ProbeKind::Http(h) = &http.probe else {
            panic!()
        };
        assert_eq!(
            (h.path.as_str(), &h.expect_status, h.tls.is_none()),
            ("/", &vec![200..=299], true)
        );
        assert_eq!((http.port, http.via), (None, Via::Real));
        // Other kinds retry after 1 s; warmup follows the interval.
        let tcp = ok(r#"kind = "tcp"
interval = "1s""#);
        assert_eq!(
            (tcp.timing.retry_delay, tcp.timing.warmup),
            (Duration::from_secs(1), Duration::from_secs(1))
        );
        assert_eq!((tcp.timing.timeout, tcp.timing.retries), (Duration::from_secs(5), 1));
        // Scripts as keepalived's MISC_CHECK: no retry, and they may run for the whole interval
        // (a 60 s check script is not killed at 5 s); a `timeout` given still counts.
        let script = |extra: &str| ok(&format!("kind = \"script\"\ncommand = \"true\"\n{extra}")).timing;
        assert_eq!((script("").timeout, script("").retries), (DEFAULT_INTERVAL, 0));
        let slow = script("interval = \"60s\"");
        assert_eq!((slow.timeout, slow.retries, slow.retry_delay), (Duration::from_secs(60), 0, Duration::from_secs(1)));
        let given = script("interval = \"60s\"\ntimeout = \"10s\"\nretries = 2");
        assert_eq!((given.timeout, given.retries), (Duration::from_secs(10), 2));
        let https = ok(r#"kind = "https""#);
        assert_eq!(https.kind(), CheckKind::Https);
        let ProbeKind::Http(h) = &https.probe else {
            panic!()
        };
        assert_eq!(
            h.tls,
            Some(TlsCheck {
                verify: true,
                ca_file: None
            })
        );
        let dns = ok(r#"kind = "dns""#);
        assert_eq!(
            dns.probe,
            ProbeKind::Dns(DnsCheck {
                query_name: ".".into(),
                query_type: DnsType::Soa
            })
        );
        let udp = ok(r#"kind = "udp""#);
        assert_eq!(
            udp.probe,
            ProbeKind::Udp(UdpCheck {
                payload: vec![],
                expect_reply: None
            })
        );
        assert_eq!(ok(r#"kind = "none""#).probe, ProbeKind::None);
    }

    #[test]
    fn the_issue_example_and_every_key() {
        let check = ok(r#"kind = "http"
path = "/healthz"
interval = "1s"
timeout = "500ms"
rise = 2
fall = 2"#);
        assert_eq!(check.timing.interval, Duration::from_secs(1));
        assert_eq!(check.timing.timeout, Duration::from_millis(500));
        assert_eq!((check.timing.rise, check.timing.fall), (2, 2));

        let check = ok(r#"kind = "http"
port = 8080
path = "/status?full=1"
host = "www.example.com"
expect_status = [200, "301-302"]
expect_body = { regex = "^ok( |$)" }
digest = "5D41402ABC4B2A76B9719D911017C592"
interval = "2s"
timeout = "1s"
retries = 3
retry_delay = "100ms"
warmup = "0s""#);
        let ProbeKind::Http(h) = &check.probe else {
            panic!()
        };
        assert_eq!(check.port, Some(8080));
        assert_eq!(h.expect_status, vec![200..=200, 301..=302]);
        assert_eq!(
            h.expect_body,
            Some(BodyMatch::Regex(regex::Regex::new("^ok( |$)").unwrap()))
        );
        assert_eq!(
            h.digest.as_deref(),
            Some("5d41402abc4b2a76b9719d911017c592")
        );
        assert_eq!(h.host.as_deref(), Some("www.example.com"));
        assert_eq!(
            (
                check.timing.retries,
                check.timing.retry_delay,
                check.timing.warmup
            ),
            (3, Duration::from_millis(100), Duration::ZERO)
        );
        let body = ok(r#"kind = "http"
expect_body = "healthy"
expect_status = "204""#);
        let ProbeKind::Http(h) = &body.probe else {
            panic!()
        };
        assert_eq!(
            (h.expect_body.clone(), h.expect_status.clone()),
            (Some(BodyMatch::Contains("healthy".into())), vec![204..=204])
        );

        let script = ok(r#"kind = "script"
command = ["/usr/local/bin/check", "--fast"]
dynamic_weight = true"#);
        assert_eq!(
            script.probe,
            ProbeKind::Script(ScriptCheck {
                command: CommandText::Argv(vec!["/usr/local/bin/check".into(), "--fast".into()]),
                dynamic_weight: true
            })
        );
        let udp = ok(r#"kind = "udp"
payload = "ping"
expect_reply = "pong""#);
        assert_eq!(
            udp.probe,
            ProbeKind::Udp(UdpCheck {
                payload: b"ping".to_vec(),
                expect_reply: Some(b"pong".to_vec())
            })
        );
        let dns = ok(r#"kind = "dns"
query_name = "www.example.com."
query_type = "aaaa""#);
        assert_eq!(
            dns.probe,
            ProbeKind::Dns(DnsCheck {
                query_name: "www.example.com".into(),
                query_type: DnsType::Aaaa
            })
        );
        let vip = ok(r#"kind = "tcp"
via = "vip""#);
        assert_eq!(vip.via, Via::Vip);
        let https = ok(r#"kind = "https"
tls_verify = false"#);
        let ProbeKind::Http(h) = &https.probe else {
            panic!()
        };
        assert_eq!(
            h.tls,
            Some(TlsCheck {
                verify: false,
                ca_file: None
            })
        );
    }

    #[test]
    fn validation_messages() {
        assert_eq!(
            problems(r#"port = 80"#, 80),
            ["0: health_check needs `kind`: one of tcp, http, https, script, udp, dns, none"]
        );
        assert_eq!(
            problems(r#"kind = "http", expect_status = 99"#, 80),
            ["32: `expect_status` 99 is not an HTTP status (100 to 599)"]
        );
        assert_eq!(
            problems(r#"kind = "http", expect_status = ["200-2x"]"#, 80),
            ["32: `expect_status` \"200-2x\" is neither a status like 200 nor a range like \"200-299\""]
        );
        assert_eq!(
            problems(r#"kind = "http", expect_status = "299-200""#, 80),
            ["32: `expect_status` range \"299-200\" is empty: write the lower status first"]
        );
        assert_eq!(
            problems(r#"kind = "http", digest = "abc""#, 80),
            ["25: `digest` must be 32 hex digits (an MD5 sum), got \"abc\""]
        );
        assert_eq!(
            problems(r#"kind = "script""#, 80),
            ["8: kind `script` needs `command`: a shell command line, or an array of program and arguments"]
        );
        assert_eq!(
            problems(r#"kind = "script", command = """#, 80),
            ["28: `command` must not be empty"]
        );
        assert_eq!(
            problems(r#"kind = "tcp", interval = "5", timeout = "1x", rise = 0, retries = -1"#, 80),
            [
                "26: `interval`: duration \"5\" needs a unit: write \"5s\" or \"5ms\"",
                "41: `timeout`: invalid duration \"1x\": expected a number and a unit (us, ms, s, m or h), like \"1s\", \
                 \"500ms\" or \"1m30s\"",
                "54: `rise` must be between 1 and 1000, got 0",
                "67: `retries` must be between 0 and 100, got -1",
            ]
        );
        assert_eq!(
            problems(r#"kind = "tcp", interval = "1ms""#, 80),
            ["26: `interval` must be at least 10ms, got 1ms"]
        );
        assert_eq!(
            problems(r#"kind = "tcp", timeout = "0s""#, 80),
            ["25: `timeout` must be at least 1ms, got 0s"]
        );
        // Under 1ms is refused for what it is, not as if it were 0.
        for (timeout, got) in [("500us", "500us"), ("0.999ms", "999us"), ("1.5us", "1.5us")] {
            assert_eq!(
                problems(&format!(r#"kind = "tcp", timeout = "{timeout}""#), 80),
                [format!("25: `timeout` must be at least 1ms, got {got}")]
            );
        }
        assert_eq!(
            problems(r#"kind = "tcp", interval = "25h""#, 80),
            ["26: `interval` must be at most 24h, got 90000s"]
        );
        assert_eq!(
            problems(r#"kind = "tcp", path = "/""#, 80),
            ["22: `path` applies to kinds `http` and `https`, not to kind `tcp`"]
        );
        assert_eq!(
            problems(r#"kind = "http", tls_verify = false"#, 80),
            ["29: `tls_verify` applies to kind `https`, not to kind `http`"]
        );
        assert_eq!(problems(r#"kind = "script", command = "true", port = 1"#, 80), ["43: `port` applies to kinds `tcp`, `http`, `https`, `udp` and `dns`, not to kind `script`"]);
        assert_eq!(
            problems(r#"kind = "tcp", port = 0"#, 80),
            ["22: `port` must be between 1 and 65535, got 0"]
        );
        assert_eq!(
            problems(r#"kind = "tcp""#, 0),
            ["0: kind `tcp` needs `port`: the real server's port is 0 (every port)"]
        );
        assert_eq!(
            inline(r#"kind = "dns""#).validate(0).unwrap().port,
            Some(53)
        );
        assert_eq!(
            problems(r#"kind = "http", path = "healthz""#, 80),
            ["23: `path` must start with `/`, got \"healthz\""]
        );
        assert_eq!(
            problems(r#"kind = "http", expect_body = { regex = "(" }"#, 80),
            ["30: `expect_body` regex is invalid: regex parse error: ( ^ error: unclosed group"]
        );
        assert_eq!(
            problems(r#"kind = "http", via = "vip""#, 80),
            ["22: `via = \"vip\"` works with kind `tcp` only (a handshake addressed to the VIP); kind `http` must use `via = \"real\"`"]
        );
        assert_eq!(
            problems(r#"kind = "dns", query_type = "ANY""#, 80),
            ["28: unknown `query_type` `ANY`; expected one of: A, AAAA, NS, CNAME, SOA, PTR, MX, TXT, SRV"]
        );
        assert_eq!(
            problems(r#"kind = "https", ca_file = "/nonexistent/ca.pem""#, 80),
            ["27: cannot read `ca_file` /nonexistent/ca.pem: No such file or directory (os error 2)"]
        );
    }

    #[test]
    fn type_errors_come_from_the_parser() {
        let err = |text: &str| {
            toml::from_str::<Inline>(&format!("hc = {{ {text} }}"))
                .unwrap_err()
                .message()
                .to_string()
        };
        assert_eq!(err(r#"kind = "htp""#), "unknown variant `htp`, expected one of `tcp`, `http`, `https`, `script`, `udp`, `dns`, `none`");
        assert_eq!(
            err(r#"interval = 5"#),
            "a duration is a string with a unit: write \"5s\" or \"5ms\", not 5"
        );
        assert!(err(r#"kind = "tcp", intervall = "1s""#)
            .starts_with("unknown field `intervall`, expected one of `kind`, `port`"));
        assert_eq!(
            err(r#"expect_body = { regexp = "x" }"#),
            "unknown key `regexp` in `expect_body`; expected one of: regex, contains"
        );
        assert_eq!(
            err(r#"via = "lo""#),
            "unknown variant `lo`, expected `real` or `vip`"
        );
    }

    #[test]
    fn merge_overrides_key_by_key() {
        let vs = spec(
            r#"kind = "http"
path = "/healthz"
interval = "1s"
timeout = "500ms"
rise = 3"#,
        );
        let rs = spec(
            r#"port = 8080
rise = 1"#,
        );
        let merged = HealthCheckSpec::merge(Some(&vs), Some(&rs)).unwrap();
        let check = merged.validate(80).unwrap();
        let ProbeKind::Http(h) = &check.probe else {
            panic!()
        };
        assert_eq!(
            (check.port, h.path.as_str(), check.timing.rise),
            (Some(8080), "/healthz", 1)
        );
        assert_eq!(check.timing.interval, Duration::from_secs(1));
        // Values keep their own table's position.
        assert_eq!(
            merged.rise.as_ref().unwrap().span(),
            rs.rise.as_ref().unwrap().span()
        );
        assert_eq!(
            merged.path.as_ref().unwrap().span(),
            vs.path.as_ref().unwrap().span()
        );

        // Another kind inherits the timing keys only.
        let tcp = HealthCheckSpec::merge(Some(&vs), Some(&spec(r#"kind = "tcp""#))).unwrap();
        assert_eq!(tcp.path, None);
        let check = tcp.validate(80).unwrap();
        assert_eq!(
            (check.kind(), check.timing.timeout, check.timing.rise),
            (CheckKind::Tcp, Duration::from_millis(500), 3)
        );

        assert_eq!(HealthCheckSpec::merge(None, None), None);
        assert_eq!(HealthCheckSpec::merge(Some(&vs), None), Some(vs.clone()));
        assert_eq!(HealthCheckSpec::merge(None, Some(&rs)), Some(rs.clone()));
        // A real server with only `port` and no virtual server default has no kind.
        assert_eq!(
            rs.validate(80).unwrap_err()[0].message,
            "health_check needs `kind`: one of tcp, http, https, script, udp, dns, none"
        );
    }

    #[test]
    fn another_kind_inherits_neither_port_nor_via() {
        let vs = spec(
            r#"kind = "tcp"
port = 8080
via = "vip"
interval = "2s"
fall = 3"#,
        );
        let merged = |rs: &str| HealthCheckSpec::merge(Some(&vs), Some(&spec(rs))).unwrap();
        // A script has no port: the virtual server's is not held against it.
        let script = merged(r#"kind = "script"
command = "true""#);
        assert_eq!((&script.port, &script.via), (&None, &None));
        let check = script.validate(53).unwrap();
        assert_eq!(
            (check.kind(), check.timing.interval, check.timing.fall),
            (CheckKind::Script, Duration::from_secs(2), 3)
        );
        // A dns check probes the real server's port, through its own address.
        let dns = merged(r#"kind = "dns""#).validate(53).unwrap();
        assert_eq!((dns.port, dns.via), (None, Via::Real));
        // An http check may not go through the VIP, but it was not asked to.
        assert_eq!(merged(r#"kind = "http""#).validate(53).unwrap().via, Via::Real);
        // The same kind inherits them.
        let tcp = merged(r#"rise = 1"#).validate(53).unwrap();
        assert_eq!((tcp.port, tcp.via), (Some(8080), Via::Vip));
    }

    #[test]
    fn keys_are_listed() {
        // Keep KEYS in step with the struct (serde's own list, in field order).
        let err = toml::from_str::<HealthCheckSpec>("nope = 1")
            .unwrap_err()
            .message()
            .to_string();
        let expected: Vec<String> = HealthCheckSpec::KEYS
            .iter()
            .map(|k| format!("`{k}`"))
            .collect();
        assert_eq!(
            err,
            format!(
                "unknown field `nope`, expected one of {}",
                expected.join(", ")
            )
        );
    }

    #[test]
    fn serializes_for_status() {
        let check = ok(r#"kind = "http"
expect_status = [200, "301-302"]
timeout = "500ms""#);
        let json = serde_json::to_value(&check).unwrap();
        assert_eq!(json["probe"]["kind"], "http");
        assert_eq!(
            json["probe"]["expect_status"],
            serde_json::json!(["200", "301-302"])
        );
        assert_eq!(json["timing"]["timeout"], "500ms");
    }
}
