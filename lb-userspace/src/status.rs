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
    /// What is wrong with its neighbour (ARP/NDP) entry, if anything: lost (lbd still sends to
    /// the last MAC) or never resolved, and why if the kernel's routing tells. Null otherwise.
    #[serde(default)]
    pub neighbour: Option<String>,
    pub interface: String,
    /// Lookup-table slots held, and their share of the table in percent.
    pub slots: Option<u32>,
    pub share_percent: Option<f64>,
    /// IPVS mode: its ActiveConn and InActConn as `ipvsadm -Ln` shows them (null with XDP).
    #[serde(default)]
    pub active_conns: Option<u64>,
    #[serde(default)]
    pub inactive_conns: Option<u64>,
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

/// `n` things for people: "1 real server", "2 real servers".
pub fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// `addr:port`, IPv6 in brackets, as `lbd status` (and the metrics' labels) name endpoints.
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

/// Text for people: one header, then a block per virtual server, like `ipvsadm -Ln --stats`:
/// columns as wide as their widest value (a long IPv6 address moves them all, never one line),
/// and the virtual servers' counters under the real servers'. In IPVS mode a real server shows
/// IPVS's ActiveConn and InActConn where XDP shows its MAC and table share.
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
    let xdp = status.dataplane == "xdp";
    if xdp {
        let _ = writeln!(out, "Lookup table {} slots per VIP, {} tracked connections", status.table_size, status.conntrack_entries);
    } else {
        let _ = writeln!(out, "{} connections", status.conntrack_entries);
    }

    // A real server's middle columns: heading and right alignment.
    let middle: &[(&str, bool)] = match xdp {
        true => &[("MAC", false), ("Weight", true), ("State", false), ("Share", true)],
        false => &[("Weight", true), ("State", false), ("ActiveConn", true), ("InActConn", true)],
    };
    let counters = |t: &TrafficStatus| [t.conns.to_string(), t.packets.to_string(), t.bytes.to_string()];
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let mut table = Table { middle, rows: Vec::new() };
    table.head(
        "Prot LocalAddress:Port",
        "Scheduler",
        "  -> RemoteAddress:Port",
        middle.iter().map(|(h, _)| h.to_string()).collect(),
        ["Conns", "InPkts", "InBytes"].map(String::from),
    );
    for vs in &status.virtual_servers {
        let sched = if vs.enabled { vs.scheduler.clone() } else { format!("{} (off)", vs.scheduler) };
        // ipvsadm's way: `FWM  5`, `FWM  5 IPv6`.
        let (prot, local) = match vs.fwmark {
            Some(mark) if vs.address.contains(':') => ("FWM".to_string(), format!("{mark} IPv6")),
            Some(mark) => ("FWM".to_string(), mark.to_string()),
            None => (vs.protocol.to_uppercase(), host_port(&vs.address, vs.port)),
        };
        let quorum = if vs.quorum { "" } else { "  quorum lost" };
        table.rows.push(Row::Vs(format!("{prot:<5}{local}"), sched, counters(&vs.traffic), quorum));
        let sorry = vs.sorry_server.iter().map(|s| (s, " (sorry server)"));
        for (rs, note) in vs.real_servers.iter().map(|r| (r, "")).chain(sorry) {
            // A drain holds whatever the check says: `down (drained)` comes back drained.
            let state = match rs.drained && rs.state != "drained" {
                true => format!("{} (drained)", rs.state),
                false => rs.state.clone(),
            };
            let cells = match xdp {
                true => vec![
                    rs.mac.clone().unwrap_or_else(|| "-".into()),
                    rs.weight.to_string(),
                    state,
                    rs.share_percent.map_or("-".to_string(), |p| format!("{p:.1}%")),
                ],
                false => vec![rs.weight.to_string(), state, opt(rs.active_conns), opt(rs.inactive_conns)],
            };
            let mut under: Vec<String> = rs.health.as_ref().map(check_line).into_iter().collect();
            under.extend(rs.neighbour.as_ref().map(|n| format!("neighbour: {n}")));
            let first = format!("  -> {}", host_port(&rs.address, rs.port));
            table.rows.push(Row::Rs(first, cells, counters(&rs.traffic), note, under));
        }
    }
    out += &table.render();
    // IPVS counts no packets by reason.
    if xdp {
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

/// One line of [`Table`].
enum Row {
    /// First column, scheduler, counters, note after them.
    Vs(String, String, [String; 3], &'static str),
    /// First column, middle cells, counters, note after them, lines under it (its check, its
    /// neighbour entry's problem).
    Rs(String, Vec<String>, [String; 3], &'static str, Vec<String>),
}

/// `lbd status`'s virtual and real server lines, laid out once every value is known.
struct Table {
    middle: &'static [(&'static str, bool)],
    rows: Vec<Row>,
}

impl Table {
    /// The narrowest the counters are, as `ipvsadm --stats` prints them.
    const COUNTER_WIDTHS: [usize; 3] = [10, 12, 14];
    /// The narrowest the first column is: an IPv4 real server with its port fits.
    const FIRST_WIDTH: usize = 33;

    /// The narrowest a middle column is: what it usually holds fits, so that a state changing
    /// from `up` to `unresolved` does not move the columns after it between two looks.
    fn min_width(heading: &str) -> usize {
        match heading {
            "MAC" => 17,
            "State" => 10,
            "Share" => 6,
            other => other.len(),
        }
    }

    fn head(&mut self, vs_first: &str, sched: &str, rs_first: &str, middle: Vec<String>, counters: [String; 3]) {
        self.rows.push(Row::Vs(vs_first.into(), sched.into(), counters.clone(), ""));
        self.rows.push(Row::Rs(rs_first.into(), middle, counters, "", Vec::new()));
    }

    fn render(&self) -> String {
        let firsts = self.rows.iter().map(|r| match r {
            Row::Vs(f, ..) | Row::Rs(f, ..) => f.len(),
        });
        let first_width = firsts.max().unwrap_or(0).max(Self::FIRST_WIDTH) + 1;
        let mut cell_widths: Vec<usize> = self.middle.iter().map(|(h, _)| Self::min_width(h)).collect();
        let mut counter_widths = Self::COUNTER_WIDTHS;
        let mut sched_width = 0;
        for row in &self.rows {
            let counters = match row {
                Row::Vs(_, sched, counters, _) => {
                    sched_width = sched_width.max(sched.len() + 1);
                    counters
                }
                Row::Rs(_, cells, counters, ..) => {
                    for (w, c) in cell_widths.iter_mut().zip(cells) {
                        *w = (*w).max(c.len());
                    }
                    counters
                }
            };
            for (w, c) in counter_widths.iter_mut().zip(counters) {
                *w = (*w).max(c.len() + 1);
            }
        }
        let middle_width = (cell_widths.iter().sum::<usize>() + cell_widths.len()).max(sched_width);
        let mut out = String::new();
        for row in &self.rows {
            let (first, middle, counters, note) = match row {
                Row::Vs(first, sched, counters, note) => (first, sched.clone(), counters, *note),
                Row::Rs(first, cells, counters, note, _) => {
                    let cells = cells.iter().zip(&cell_widths).zip(self.middle).map(|((c, &w), (_, right))| match right {
                        true => format!("{c:>w$}"),
                        false => format!("{c:<w$}"),
                    });
                    (first, cells.collect::<Vec<_>>().join(" "), counters, *note)
                }
            };
            let mut line = format!("{first:<first_width$}{middle:<middle_width$}");
            for (c, &w) in counters.iter().zip(&counter_widths) {
                let _ = write!(line, "{c:>w$}");
            }
            let _ = writeln!(out, "{}{note}", line.trim_end());
            if let Row::Rs(.., under) = row {
                for line in under {
                    let _ = writeln!(out, "       {line}");
                }
            }
        }
        out
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
                    neighbour: None,
                    interface: "eth0".into(),
                    slots: Some(65537),
                    share_percent: Some(100.0),
                    active_conns: None,
                    inactive_conns: None,
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

    /// A real server's neighbour problem goes on a line of its own under it (after its check),
    /// and into the JSON as `neighbour`.
    #[test]
    fn a_neighbour_problem_is_shown_under_its_real_server() {
        let problem = "10.98.0.5 is not on eth0's link: the kernel routes it via 10.99.0.254";
        let status = Status {
            dataplane: "xdp".into(),
            virtual_servers: vec![VirtualServerStatus {
                address: "10.99.0.100".into(),
                port: 80,
                protocol: "tcp".into(),
                scheduler: "maglev".into(),
                enabled: true,
                quorum: true,
                real_servers: vec![
                    RealServerStatus {
                        address: "10.98.0.5".into(),
                        port: 80,
                        state: "unresolved".into(),
                        neighbour: Some(problem.into()),
                        ..Default::default()
                    },
                    RealServerStatus { address: "10.99.0.12".into(), port: 80, state: "up".into(), ..Default::default() },
                ],
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render(&status);
        let lines: Vec<&str> = text.lines().collect();
        let at = lines.iter().position(|l| l.starts_with("  -> 10.98.0.5:80")).expect(&text);
        assert_eq!(lines[at + 1], format!("       neighbour: {problem}"));
        assert!(lines[at + 2].starts_with("  -> 10.99.0.12:80"), "{text}");
        assert_eq!(text.matches("neighbour:").count(), 1, "{text}");
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["virtual_servers"][0]["real_servers"][0]["neighbour"], problem);
        assert!(json["virtual_servers"][0]["real_servers"][1]["neighbour"].is_null());
    }

    /// IPVS mode shows ipvsadm's ActiveConn and InActConn where XDP has a MAC and a table share,
    /// and a drain held under a failed check says so.
    #[test]
    fn ipvs_shows_active_and_inactive_connections_and_drains_under_a_failure() {
        let rs = |address: &str, state: &str, drained: bool, conns: (u64, u64)| RealServerStatus {
            address: address.into(),
            port: 80,
            weight: u32::from(state == "up"),
            state: state.into(),
            drained,
            active_conns: Some(conns.0),
            inactive_conns: Some(conns.1),
            ..Default::default()
        };
        let status = Status {
            dataplane: "ipvs".into(),
            virtual_servers: vec![VirtualServerStatus {
                address: "10.99.0.100".into(),
                port: 80,
                protocol: "tcp".into(),
                scheduler: "wlc".into(),
                enabled: true,
                quorum: true,
                real_servers: vec![rs("10.99.0.11", "up", false, (12, 340)), rs("10.99.0.12", "down", true, (0, 2))],
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render(&status);
        let lines: Vec<&str> = text.lines().collect();
        let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            words(lines[3]),
            ["->", "RemoteAddress:Port", "Weight", "State", "ActiveConn", "InActConn", "Conns", "InPkts", "InBytes"]
        );
        assert_eq!(words(lines[5]), ["->", "10.99.0.11:80", "1", "up", "12", "340", "0", "0", "0"]);
        assert_eq!(words(lines[6]), ["->", "10.99.0.12:80", "0", "down", "(drained)", "0", "2", "0", "0", "0"]);
        assert_eq!(lines[3].find("InActConn").map(|i| i + "InActConn".len()), lines[5].find("340").map(|i| i + 3));
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
            mac: Some("02:00:00:00:00:0b".into()),
            interface: "eth0".into(),
            share_percent: Some(50.0),
            traffic,
            ..Default::default()
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
        // Every line keeps the same columns: the long address widens the first for all of them.
        assert!(lines[2..=6].iter().all(|l| l.len() == lines[2].len()), "{text}");
        assert_eq!(lines[5].find("02:00"), lines[6].find("02:00"), "{text}");
        assert_eq!(lines[3].find("MAC"), lines[6].find("02:00"), "{text}");
        assert_eq!(lines[2].find("Scheduler"), lines[4].find("maglev (off)"), "{text}");
    }
}
