//! What `lbd status` shows: the model sent over the control socket, and its rendering in the
//! spirit of `ipvsadm -Ln --stats`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::health::{state::StateSnapshot, Health};

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub config: String,
    /// "xdp" or "ipvs".
    pub dataplane: String,
    /// For people: "native XDP on eth0", "IPVS 1.2.1".
    pub description: String,
    pub interface: String,
    /// "native" or "generic" with XDP, null with IPVS.
    pub xdp_mode: Option<String>,
    /// Why the dataplane does not forward now, if it knows (XDP: its interface is gone); null
    /// while it does.
    #[serde(default)]
    pub problem: Option<String>,
    pub uptime_secs: u64,
    pub table_size: u32,
    pub conntrack_entries: u64,
    pub virtual_servers: Vec<VirtualServerStatus>,
    /// Packets and bytes per fast-path reason ("new-flow", "conntrack-hit", "not-vip", ...).
    pub reasons: Vec<ReasonStatus>,
    /// The `[[vrrp_instance]]`s (empty without VRRP).
    #[serde(default)]
    pub vrrp: Vec<crate::vrrp::VrrpInstanceStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReasonStatus {
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrafficStatus {
    /// Flows that got a backend from the lookup table.
    pub conns: u64,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VirtualServerStatus {
    pub address: String,
    pub port: u16,
    /// A firewall-mark virtual server's mark (IPVS mode; null for others); `address` is then
    /// `0.0.0.0` or `::` (the family) and `port` 0.
    #[serde(default)]
    pub fwmark: Option<u32>,
    /// "tcp", "udp", or "fwmark" for a firewall-mark virtual server (the mark selects any).
    pub protocol: String,
    pub scheduler: String,
    pub enabled: bool,
    pub traffic: TrafficStatus,
    /// False while the live real servers' weight is below `quorum`.
    #[serde(default = "yes")]
    pub quorum: bool,
    /// The sorry server: state "serving" (without quorum) or "standby".
    #[serde(default)]
    pub sorry_server: Option<RealServerStatus>,
    pub real_servers: Vec<RealServerStatus>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RealServerStatus {
    pub address: String,
    pub port: u16,
    pub weight: u32,
    /// "up" (in the table), "down" (failed its check: out of the table), "inhibited" (failed
    /// with `inhibit_on_failure`: weight 0, keeps its flows), "drained" (weight 0 from the CLI),
    /// "unresolved" (no MAC yet), "standby" (healthy, but the sorry server serves: quorum lost).
    pub state: String,
    /// Held by `lbd backend drain` (until enabled or a config change to it), whatever
    /// `state` says: a drained real server that fails its check reads "down".
    #[serde(default)]
    pub drained: bool,
    pub mac: Option<String>,
    pub interface: String,
    /// Lookup-table slots held, and their share of the table in percent.
    pub slots: Option<u32>,
    pub share_percent: Option<f64>,
    pub traffic: TrafficStatus,
    /// Its health check, if it has one.
    #[serde(default)]
    pub health: Option<HealthStatus>,
}

/// A real server's health check for `lbd status`: its kind and the check's state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HealthStatus {
    /// `tcp`, `http`, ...
    pub kind: String,
    #[serde(flatten)]
    pub state: StateSnapshot,
}

impl From<crate::health::CheckStatus> for HealthStatus {
    fn from(c: crate::health::CheckStatus) -> Self {
        HealthStatus { kind: c.kind.to_string(), state: c.state }
    }
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// `addr:port`, IPv6 in brackets, as `lbd status` (and the metrics' labels) name endpoints.
/// `n` things for people: "1 real server", "2 real servers".
pub fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

pub fn host_port(addr: &str, port: u16) -> String {
    if addr.contains(':') { format!("[{addr}]:{port}") } else { format!("{addr}:{port}") }
}

fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

/// `check http up 2m05s: HTTP 200 in 0.4ms, 12 passes in a row`.
fn check_line(check: &HealthStatus) -> String {
    let h = &check.state;
    let mut line = format!("check {} {} {}", check.kind, h.state.as_str(), human_duration(h.since_secs as u64));
    if h.state == Health::Down {
        if let Some(why) = &h.down_reason {
            let _ = write!(line, " ({why})");
        }
    }
    if let Some(reason) = &h.last_reason {
        let latency = h.last_latency_ms.map_or(String::new(), |ms| format!(" in {ms}ms"));
        let _ = write!(line, ": last {reason}{latency}");
    }
    let (n, what) = if h.consecutive_fails > 0 { (h.consecutive_fails, "fail") } else { (h.consecutive_passes, "pass") };
    if n > 0 {
        let plural = if n == 1 { "" } else if what == "pass" { "es" } else { "s" };
        let _ = write!(line, ", {n} {what}{plural} in a row");
    }
    line
}

/// Text for people: one header, then a block per virtual server, like `ipvsadm -Ln --stats`.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "lbd {} (pid {}), {}, up {}, config {}",
        status.version,
        status.pid,
        status.description,
        human_duration(status.uptime_secs),
        status.config
    );
    if let Some(problem) = &status.problem {
        let _ = writeln!(out, "PROBLEM: {problem}");
    }
    if status.dataplane == "xdp" {
        let _ = writeln!(out, "Lookup table {} slots per VIP, {} tracked connections", status.table_size, status.conntrack_entries);
    } else {
        let _ = writeln!(out, "{} connections", status.conntrack_entries);
    }
    let _ = writeln!(
        out,
        "{:<5}{:<32}{:<11}{:>10}{:>12}{:>14}",
        "Prot", "LocalAddress:Port", "Scheduler", "Conns", "InPkts", "InBytes"
    );
    let _ = writeln!(
        out,
        "  -> {:<29}{:<19}{:>7} {:<11}{:>7}{:>10}{:>12}{:>14}",
        "RemoteAddress:Port", "MAC", "Weight", "State", "Share", "Conns", "InPkts", "InBytes"
    );
    for vs in &status.virtual_servers {
        let sched = if vs.enabled { vs.scheduler.clone() } else { format!("{} (off)", vs.scheduler) };
        let quorum = if vs.quorum { "" } else { "  quorum lost" };
        // ipvsadm's way: `FWM  5`, `FWM  5 IPv6`.
        let (prot, local) = match vs.fwmark {
            Some(mark) if vs.address.contains(':') => ("FWM".to_string(), format!("{mark} IPv6")),
            Some(mark) => ("FWM".to_string(), mark.to_string()),
            None => (vs.protocol.to_uppercase(), host_port(&vs.address, vs.port)),
        };
        let _ = writeln!(
            out,
            "{}{}{}{}{}{}{quorum}",
            left(&prot, 5),
            left(&local, 32),
            left(&sched, 11),
            right(vs.traffic.conns, 10),
            right(vs.traffic.packets, 12),
            right(vs.traffic.bytes, 14)
        );
        let sorry = vs.sorry_server.iter().map(|s| (s, " (sorry server)"));
        for (rs, note) in vs.real_servers.iter().map(|r| (r, "")).chain(sorry) {
            let share = rs.share_percent.map_or("-".to_string(), |p| format!("{p:.1}%"));
            let _ = writeln!(
                out,
                "  -> {}{}{} {}{}{}{}{}",
                left(&host_port(&rs.address, rs.port), 29),
                left(rs.mac.as_deref().unwrap_or("-"), 19),
                right(rs.weight, 7),
                left(&rs.state, 11),
                right(share, 7),
                right(rs.traffic.conns, 10),
                right(rs.traffic.packets, 12),
                right(rs.traffic.bytes, 14)
            );
            if !note.is_empty() {
                out.truncate(out.trim_end().len());
                let _ = writeln!(out, "{note}");
            }
            if let Some(h) = &rs.health {
                let _ = writeln!(out, "       {}", check_line(h));
            }
        }
    }
    // IPVS counts no packets by reason.
    if status.dataplane == "xdp" {
        let active: Vec<String> = status
            .reasons
            .iter()
            .filter(|r| r.packets > 0)
            .map(|r| format!("{} {}", r.reason, r.packets))
            .collect();
        let _ = writeln!(
            out,
            "Fast path packets: {}",
            if active.is_empty() { "none yet".to_string() } else { active.join(", ") }
        );
    }
    out += &crate::vrrp::render_status(&status.vrrp);
    out
}

/// `value` left-aligned in a column of `width`, and followed by a space if it fills it: a long
/// IPv6 address or a long scheduler name must not run into the next column.
fn left(value: &str, width: usize) -> String {
    if value.len() >= width {
        format!("{value} ")
    } else {
        format!("{value:<width$}")
    }
}

/// `value` right-aligned in a column of `width`, after a space if it fills it (a byte count of
/// 14 digits must not join the packet count before it).
fn right(value: impl std::fmt::Display, width: usize) -> String {
    let value = value.to_string();
    if value.len() >= width {
        format!(" {value}")
    } else {
        format!("{value:>width$}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_ipvsadm() {
        let status = Status {
            version: "0.1.0".into(),
            pid: 42,
            config: "rig.toml".into(),
            dataplane: "xdp".into(),
            description: "native XDP on eth0".into(),
            interface: "eth0".into(),
            xdp_mode: Some("native".into()),
            problem: None,
            uptime_secs: 3723,
            table_size: 65537,
            conntrack_entries: 3,
            virtual_servers: vec![VirtualServerStatus {
                address: "10.99.0.100".into(),
                port: 80,
                fwmark: None,
                protocol: "tcp".into(),
                scheduler: "maglev".into(),
                enabled: true,
                traffic: TrafficStatus { conns: 3, packets: 20, bytes: 2000 },
                quorum: true,
                sorry_server: None,
                real_servers: vec![RealServerStatus {
                    address: "10.99.0.11".into(),
                    port: 80,
                    weight: 1,
                    state: "up".into(),
                    drained: false,
                    mac: Some("02:00:00:00:00:0b".into()),
                    interface: "eth0".into(),
                    slots: Some(65537),
                    share_percent: Some(100.0),
                    traffic: TrafficStatus { conns: 3, packets: 20, bytes: 2000 },
                    health: None,
                }],
            }],
            reasons: vec![
                ReasonStatus { reason: "new-flow".into(), packets: 3, bytes: 300 },
                ReasonStatus { reason: "malformed".into(), packets: 0, bytes: 0 },
            ],
            vrrp: vec![],
        };
        let text = render(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "lbd 0.1.0 (pid 42), native XDP on eth0, up 1h02m, config rig.toml");
        assert!(lines[4].starts_with("TCP  10.99.0.100:80"), "{}", lines[4]);
        assert!(lines[4].ends_with("3          20          2000"), "{}", lines[4]);
        assert!(lines[5].starts_with("  -> 10.99.0.11:80"), "{}", lines[5]);
        assert!(lines[5].contains("02:00:00:00:00:0b") && lines[5].contains("100.0%"), "{}", lines[5]);
        assert_eq!(lines[6], "Fast path packets: new-flow 3");
        assert_eq!(lines.len(), 7, "no VRRP lines without VRRP");

        // A dataplane that says it does not forward: right under the header.
        let gone = Status { problem: Some("interface eth0 is gone".into()), ..status };
        let text = render(&gone);
        assert_eq!(text.lines().nth(1), Some("PROBLEM: interface eth0 is gone"), "{text}");

        // IPVS: its connections, no lookup table, no fast path line.
        let ipvs = Status { dataplane: "ipvs".into(), description: "IPVS 1.2.1".into(), problem: None, reasons: vec![], ..gone };
        let text = render(&ipvs);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "3 connections");
        assert_eq!(lines.len(), 6, "{text}");
        assert!(!text.contains("Fast path"), "{text}");
    }

    /// Values wider than their column (a long IPv6 real server, 14-digit byte counts, a disabled
    /// service's scheduler) stay apart from the next column, and every other line keeps its layout.
    #[test]
    fn long_values_do_not_run_into_the_next_column() {
        let rs = |address: &str, traffic: TrafficStatus| RealServerStatus {
            address: address.into(),
            port: 80,
            weight: 1,
            state: "up".into(),
            drained: false,
            mac: Some("02:00:00:00:00:0b".into()),
            interface: "eth0".into(),
            slots: None,
            share_percent: Some(50.0),
            traffic,
            health: None,
        };
        let big = TrafficStatus { conns: 7, packets: 9_000_000_000, bytes: 13_500_000_000_000 };
        let status = Status {
            dataplane: "xdp".into(),
            virtual_servers: vec![VirtualServerStatus {
                address: "2001:db8:85a3:8d3:1319:8a2e:370:7349".into(),
                port: 443,
                fwmark: None,
                protocol: "tcp".into(),
                scheduler: "maglev".into(),
                enabled: false,
                traffic: big,
                quorum: true,
                sorry_server: None,
                real_servers: vec![
                    rs("2001:db8:85a3:8d3:1319:8a2e:370:7349", big),
                    rs("10.99.0.12", TrafficStatus { conns: 1, packets: 2, bytes: 3 }),
                ],
            }],
            ..Default::default()
        };
        let text = render(&status);
        let lines: Vec<&str> = text.lines().collect();
        let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            words(lines[4]),
            ["TCP", "[2001:db8:85a3:8d3:1319:8a2e:370:7349]:443", "maglev", "(off)", "7", "9000000000", "13500000000000"]
        );
        assert_eq!(
            words(lines[5]),
            ["->", "[2001:db8:85a3:8d3:1319:8a2e:370:7349]:80", "02:00:00:00:00:0b", "1", "up", "50.0%", "7", "9000000000", "13500000000000"]
        );
        // A real server that fits keeps the columns of the header.
        assert_eq!(lines[6], format!("  -> {:<29}{:<19}{:>7} {:<11}{:>7}{:>10}{:>12}{:>14}", "10.99.0.12:80", "02:00:00:00:00:0b", 1, "up", "50.0%", 1, 2, 3));
    }
}
