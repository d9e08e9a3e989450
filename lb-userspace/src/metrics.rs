//! `[director] metrics_listen`: the status as Prometheus metrics over HTTP (`GET /metrics`, text
//! exposition format 0.0.4), for a scraper rather than a person. Every scrape asks the run loop
//! for the same status `lbd status --json` gets, so the two never disagree.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request as HttpRequest, Response as HttpResponse, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::debug;

use crate::control::{Request, Response};
use crate::status::{host_port, RealServerStatus, Status, TrafficStatus, VirtualServerStatus};
use crate::vrrp::VrrpState;

/// Real-server states, each one series (1 for the current state, 0 for the others).
const RS_STATES: [&str; 6] = ["up", "down", "inhibited", "drained", "unresolved", "standby"];
const VRRP_STATES: [VrrpState; 4] = [VrrpState::Init, VrrpState::Backup, VrrpState::Master, VrrpState::Fault];

/// A series' labels, in order.
type Labels = Vec<(&'static str, String)>;

/// A counter family drawn from a struct: (name or suffix, help, the value).
type Field<T> = (&'static str, &'static str, fn(&T) -> u64);

/// The most metrics connections served at once, as on the control socket. One more is answered
/// 503 at once and closed: each connection holds a descriptor, and the health checks need theirs
/// (a thousand idle scrapers once took all 1024, and every check then failed).
pub const MAX_CONNECTIONS: usize = 32;
/// How long a metrics connection may last, whatever it does (hyper only times a request's
/// header: a client that stops reading its answer held its connection for ever). Then a request
/// in flight is finished and the connection closed; an idle one closes at once.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(60);
/// How long a connection past [`CONNECTION_DEADLINE`] may take to finish its answer before it is
/// closed anyway (a client that does not read it).
pub const FINISH_GRACE: Duration = Duration::from_secs(5);

/// The bounds of [`serve`]'s connections.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// [`MAX_CONNECTIONS`].
    connections: usize,
    /// [`CONNECTION_DEADLINE`].
    deadline: Duration,
    /// [`FINISH_GRACE`].
    grace: Duration,
}

const LIMITS: Limits = Limits { connections: MAX_CONNECTIONS, deadline: CONNECTION_DEADLINE, grace: FINISH_GRACE };

/// Serves `GET /metrics` on `listener` until the run loop goes (`tx` closed), at most
/// [`MAX_CONNECTIONS`] connections at once, each for at most [`CONNECTION_DEADLINE`] (and
/// [`FINISH_GRACE`]). A scrape waits for the run loop's answer, so the cap also bounds the status
/// requests scrapes have waiting there at any time.
pub async fn serve(listener: TcpListener, tx: mpsc::Sender<(Request, oneshot::Sender<Response>)>) {
    serve_limited(listener, tx, LIMITS).await
}

async fn serve_limited(listener: TcpListener, tx: mpsc::Sender<(Request, oneshot::Sender<Response>)>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                crate::control::accept_failed("metrics", &e).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // No task and no wait: the descriptor is closed before the next accept. A client
            // that sent its request already may see a reset rather than the 503.
            let _ = stream.try_write(busy(limits.connections).as_bytes());
            debug!("metrics connection refused: {} are open already", limits.connections);
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, tx.clone()));
            // With a timer, hyper closes a connection that takes longer than 30 s to send its
            // request's header (a stalled or idle client does not hold its task forever).
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new());
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let done = match tokio::time::timeout(limits.deadline, conn.as_mut()).await {
                Ok(done) => done,
                Err(_) => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(limits.grace, conn).await {
                        Ok(done) => done,
                        Err(_) => {
                            debug!("metrics connection: closed with its answer unfinished {:?} after its deadline", limits.grace);
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = done {
                debug!("metrics connection: {e}");
            }
            drop(slot);
        });
    }
}

/// The whole answer to a connection beyond `max`.
fn busy(max: usize) -> String {
    let body = format!("lbd is busy: {max} metrics connections are open already; try again\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         connection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    )
}

async fn answer(
    req: HttpRequest<Incoming>,
    tx: mpsc::Sender<(Request, oneshot::Sender<Response>)>,
) -> Result<HttpResponse<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(plain(StatusCode::NOT_FOUND, "lbd serves its metrics at /metrics\n".into()));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into());
        resp.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    let (otx, orx) = oneshot::channel();
    let status = match tx.send((Request::Status, otx)).await {
        Ok(()) => orx.await.ok(),
        Err(_) => None,
    };
    Ok(match status {
        Some(Response { status: Some(status), .. }) => {
            let mut resp = plain(StatusCode::OK, render(&status));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        Some(Response { error: Some(e), .. }) => plain(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        _ => plain(StatusCode::SERVICE_UNAVAILABLE, "lbd is shutting down\n".into()),
    })
}

fn plain(code: StatusCode, body: String) -> HttpResponse<Full<Bytes>> {
    let mut resp = HttpResponse::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = code;
    resp
}

/// The metrics of `status`, in the Prometheus text format.
pub fn render(status: &Status) -> String {
    let mut m = Metrics::default();
    m.family("lbd_info", "gauge", "lbd's version, dataplane and XDP mode (always 1; xdp_mode \"generic\" is the slow one).");
    m.sample(
        "lbd_info",
        &[
            ("version", &status.version),
            ("dataplane", &status.dataplane),
            ("interface", &status.interface),
            ("xdp_mode", status.xdp_mode.as_deref().unwrap_or("")),
        ],
        1,
    );
    m.family("lbd_dataplane_ok", "gauge", "Whether the dataplane forwards (0: it says it does not, and `lbd status` says why).");
    m.sample("lbd_dataplane_ok", &[], u64::from(status.problem.is_none()));
    m.family("lbd_uptime_seconds", "gauge", "Seconds since lbd started.");
    m.sample("lbd_uptime_seconds", &[], status.uptime_secs);
    m.family("lbd_conntrack_entries", "gauge", "Flows held in the fast path's connection tables (IPVS: connections).");
    m.sample("lbd_conntrack_entries", &[], status.conntrack_entries);

    m.family("lbd_packets_total", "counter", "Packets the fast path saw, by what it did with them.");
    for r in &status.reasons {
        m.sample("lbd_packets_total", &[("reason", &r.reason)], r.packets);
    }
    m.family("lbd_bytes_total", "counter", "Bytes the fast path saw, by what it did with them.");
    for r in &status.reasons {
        m.sample("lbd_bytes_total", &[("reason", &r.reason)], r.bytes);
    }

    let vss: Vec<(Labels, &VirtualServerStatus)> =
        status.virtual_servers.iter().map(|vs| (vs_labels(vs), vs)).collect();
    traffic(&mut m, "lbd_virtual_server", "virtual server", vss.iter().map(|(l, vs)| (l.clone(), vs.traffic)));
    m.family("lbd_virtual_server_enabled", "gauge", "1 while the virtual server forwards (VRRP master or no VRRP).");
    for (l, vs) in &vss {
        m.sample("lbd_virtual_server_enabled", &refs(l), vs.enabled as u64);
    }
    m.family("lbd_virtual_server_quorum", "gauge", "1 while the live real servers' weight reaches the quorum.");
    for (l, vs) in &vss {
        m.sample("lbd_virtual_server_quorum", &refs(l), vs.quorum as u64);
    }

    // (labels, real server, is the sorry server)
    let rss: Vec<(Labels, &RealServerStatus, bool)> = vss
        .iter()
        .flat_map(|(l, vs)| {
            let sorry = vs.sorry_server.iter().map(move |rs| (rs_labels(l, rs, true), rs, true));
            vs.real_servers.iter().map(move |rs| (rs_labels(l, rs, false), rs, false)).chain(sorry)
        })
        .collect();
    traffic(&mut m, "lbd_real_server", "real server", rss.iter().map(|(l, rs, _)| (l.clone(), rs.traffic)));
    m.family("lbd_real_server_weight", "gauge", "The real server's weight now (0 when down, inhibited, drained or standby).");
    for (l, rs, _) in &rss {
        m.sample("lbd_real_server_weight", &refs(l), rs.weight as u64);
    }
    m.family(
        "lbd_real_server_state",
        "gauge",
        "1 for the real server's state (up, down, inhibited, drained, unresolved, standby: healthy while the sorry server \
         serves; a sorry server: serving, standby).",
    );
    for (l, rs, sorry) in &rss {
        let mut states: Vec<&str> = if *sorry {
            vec!["serving", "standby"]
        } else {
            RS_STATES.to_vec()
        };
        if !states.contains(&rs.state.as_str()) {
            states.push(&rs.state);
        }
        for s in states {
            let mut labels = refs(l);
            labels.push(("state", s));
            m.sample("lbd_real_server_state", &labels, (rs.state == s) as u64);
        }
    }
    m.family(
        "lbd_real_server_drained",
        "gauge",
        "1 while `lbd backend drain` holds the real server, whatever its state says (down outranks drained).",
    );
    for (l, rs, _) in &rss {
        m.sample("lbd_real_server_drained", &refs(l), rs.drained as u64);
    }
    m.family("lbd_real_server_slots", "gauge", "Lookup-table slots the real server holds (XDP).");
    for (l, rs, _) in &rss {
        if let Some(slots) = rs.slots {
            m.sample("lbd_real_server_slots", &refs(l), slots as u64);
        }
    }
    let ipvs_connections = [
        ("lbd_real_server_active_connections", "IPVS mode: the real server's active connections (ipvsadm's ActiveConn).", true),
        ("lbd_real_server_inactive_connections", "IPVS mode: the real server's other connections (ipvsadm's InActConn).", false),
    ];
    for (name, help, active) in ipvs_connections {
        m.family(name, "gauge", help);
        for (l, rs, _) in &rss {
            if let Some(n) = if active { rs.active_conns } else { rs.inactive_conns } {
                m.sample(name, &refs(l), n);
            }
        }
    }

    if !status.vrrp.is_empty() {
        m.family("lbd_vrrp_state", "gauge", "1 for the VRRP instance's state (INIT, BACKUP, MASTER, FAULT).");
        for v in &status.vrrp {
            for s in VRRP_STATES {
                m.sample("lbd_vrrp_state", &[("instance", &v.name), ("state", s.as_str())], (v.state == s) as u64);
            }
        }
        m.family("lbd_vrrp_priority", "gauge", "The priority the instance advertises (tracking applied).");
        for v in &status.vrrp {
            m.sample("lbd_vrrp_priority", &[("instance", &v.name)], v.effective_priority as u64);
        }
        let counters: [Field<crate::vrrp::VrrpCounters>; 4] = [
            ("lbd_vrrp_adverts_sent_total", "Adverts sent (queued; failed sends count here and in lbd_vrrp_advert_send_errors_total).", |c| c.adverts_sent),
            ("lbd_vrrp_advert_send_errors_total", "Adverts the kernel refused to send (a master that cannot send loses its backups to MASTER).", |c| c.advert_send_errors),
            ("lbd_vrrp_adverts_received_total", "Adverts received and accepted.", |c| c.adverts_received),
            ("lbd_vrrp_became_master_total", "Transitions to MASTER.", |c| c.became_master),
        ];
        for (name, help, get) in counters {
            m.family(name, "counter", help);
            for v in &status.vrrp {
                m.sample(name, &[("instance", &v.name)], get(&v.counters));
            }
        }
        m.family("lbd_vrrp_adverts_dropped_total", "counter", "Adverts dropped, by reason.");
        for v in &status.vrrp {
            for (reason, n) in &v.counters.dropped {
                m.sample("lbd_vrrp_adverts_dropped_total", &[("instance", &v.name), ("reason", reason)], *n);
            }
        }
    }
    m.out
}

/// A virtual server's labels: `virtual_server` as the CLI names it ("10.0.0.1:80",
/// "[fd00::1]:443", "fwmark:5", and "fwmark:5/ipv6" for the IPv6 one of a mark, which IPVS keeps
/// apart from the IPv4 one) and `protocol`.
fn vs_labels(vs: &VirtualServerStatus) -> Labels {
    let name = match vs.fwmark {
        Some(mark) if vs.address.contains(':') => format!("fwmark:{mark}/ipv6"),
        Some(mark) => format!("fwmark:{mark}"),
        None => host_port(&vs.address, vs.port),
    };
    vec![("virtual_server", name), ("protocol", vs.protocol.to_lowercase())]
}

fn rs_labels(vs: &[(&'static str, String)], rs: &RealServerStatus, sorry: bool) -> Labels {
    let mut l = vs.to_vec();
    l.push(("real_server", host_port(&rs.address, rs.port)));
    if sorry {
        l.push(("sorry", "true".into()));
    }
    l
}

fn refs<'a>(labels: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    labels.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// `<prefix>_{connections,packets,bytes}_total` for each labelled traffic.
fn traffic(
    m: &mut Metrics,
    prefix: &str,
    what: &str,
    rows: impl Iterator<Item = (Labels, TrafficStatus)> + Clone,
) {
    let kinds: [Field<TrafficStatus>; 3] = [
        ("connections", "Flows the {} got from the lookup table (IPVS: connections scheduled).", |t| t.conns),
        ("packets", "Packets forwarded to the {}.", |t| t.packets),
        ("bytes", "Bytes forwarded to the {}.", |t| t.bytes),
    ];
    for (kind, help, get) in kinds {
        let name = format!("{prefix}_{kind}_total");
        m.family(&name, "counter", &help.replace("{}", what));
        for (labels, t) in rows.clone() {
            m.sample(&name, &refs(&labels), get(&t));
        }
    }
}

#[derive(Default)]
struct Metrics {
    out: String,
}

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A label value with `\`, `"` and newlines escaped, as the text format wants.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ReasonStatus;
    use std::time::Duration;

    fn rs(address: &str, state: &str, weight: u32, packets: u64) -> RealServerStatus {
        RealServerStatus {
            address: address.into(),
            port: 80,
            weight,
            state: state.into(),
            slots: Some(100),
            traffic: TrafficStatus { conns: 3, packets, bytes: packets * 60 },
            ..Default::default()
        }
    }

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            dataplane: "xdp".into(),
            interface: "eth0".into(),
            uptime_secs: 42,
            conntrack_entries: 7,
            reasons: vec![ReasonStatus { reason: "conntrack-hit".into(), packets: 10, bytes: 600 }],
            virtual_servers: vec![
                VirtualServerStatus {
                    address: "10.0.0.100".into(),
                    port: 80,
                    protocol: "TCP".into(),
                    enabled: true,
                    quorum: true,
                    traffic: TrafficStatus { conns: 6, packets: 20, bytes: 1200 },
                    real_servers: vec![rs("10.0.0.1", "up", 1, 12), RealServerStatus { drained: true, ..rs("10.0.0.2", "down", 0, 8) }],
                    sorry_server: Some(RealServerStatus { state: "standby".into(), ..rs("10.0.0.9", "standby", 1, 0) }),
                    ..Default::default()
                },
                VirtualServerStatus {
                    address: "fd00::100".into(),
                    port: 443,
                    protocol: "TCP".into(),
                    real_servers: vec![rs("fd00::1", "drained", 0, 0)],
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn a_scrape_shows_every_server_with_its_counters_and_state() {
        let text = render(&status());
        for line in [
            "lbd_dataplane_ok 1",
            "lbd_uptime_seconds 42",
            "lbd_conntrack_entries 7",
            "lbd_packets_total{reason=\"conntrack-hit\"} 10",
            "lbd_bytes_total{reason=\"conntrack-hit\"} 600",
            "lbd_virtual_server_packets_total{virtual_server=\"10.0.0.100:80\",protocol=\"tcp\"} 20",
            "lbd_virtual_server_enabled{virtual_server=\"[fd00::100]:443\",protocol=\"tcp\"} 0",
            "lbd_real_server_packets_total{virtual_server=\"10.0.0.100:80\",protocol=\"tcp\",real_server=\"10.0.0.1:80\"} 12",
            "lbd_real_server_bytes_total{virtual_server=\"10.0.0.100:80\",protocol=\"tcp\",real_server=\"10.0.0.2:80\"} 480",
            "lbd_real_server_state{virtual_server=\"10.0.0.100:80\",protocol=\"tcp\",real_server=\"10.0.0.2:80\",state=\"down\"} 1",
            "lbd_real_server_state{virtual_server=\"10.0.0.100:80\",protocol=\"tcp\",real_server=\"10.0.0.2:80\",state=\"up\"} 0",
            "lbd_real_server_state{virtual_server=\"[fd00::100]:443\",protocol=\"tcp\",real_server=\"[fd00::1]:80\",state=\"drained\"} 1",
            "lbd_real_server_state{virtual_server=\"10.0.0.100:80\",protocol=\"tcp\",real_server=\"10.0.0.9:80\",sorry=\"true\",state=\"standby\"} 1",
            "lbd_real_server_weight{virtual_server=\"10.0.0.100:80\",protocol=\"tcp\",real_server=\"10.0.0.2:80\"} 0",
            // Drained and down: the state says down, the drain is not lost.
            "lbd_real_server_drained{virtual_server=\"10.0.0.100:80\",protocol=\"tcp\",real_server=\"10.0.0.2:80\"} 1",
            "lbd_real_server_drained{virtual_server=\"10.0.0.100:80\",protocol=\"tcp\",real_server=\"10.0.0.1:80\"} 0",
            "# TYPE lbd_real_server_packets_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing line {line:?} in:\n{text}");
        }
        // No VRRP configured: no VRRP families.
        assert!(!text.contains("lbd_vrrp"));
        // Each family is announced once, before its samples.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let mut unique = types.clone();
        unique.dedup();
        assert_eq!(types.len(), unique.len());
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let at = text.find(&format!("# TYPE {name} ")).unwrap_or_else(|| panic!("{name} has no TYPE"));
            assert!(at < text.find(l).unwrap(), "{name}'s sample before its TYPE");
        }
        let gone = Status { problem: Some("interface eth0 is gone".into()), ..status() };
        assert!(render(&gone).lines().any(|l| l == "lbd_dataplane_ok 0"));
    }

    /// VRRP's families: one series per instance and state, and the send errors of a master
    /// whose adverts the kernel refuses.
    #[test]
    fn a_scrape_shows_vrrp_instances_and_their_send_errors() {
        let vrrp: crate::vrrp::VrrpInstanceStatus = serde_json::from_value(serde_json::json!({
            "name": "VI_1", "interface": "eth0", "virtual_router_id": 51, "version": 3, "state": "MASTER",
            "priority": 150, "effective_priority": 140, "advert_interval_ms": 1000, "master_advert_interval_ms": 1000,
            "source": "10.0.0.2", "master": "10.0.0.2", "master_priority": 140, "unicast_peers": [],
            "sync_group": null, "virtual_addresses": [], "failing": [], "in_state_secs": 3.0,
            "counters": {"adverts_sent": 30, "adverts_received": 0, "priority_zero_sent": 0, "priority_zero_received": 0,
                         "became_master": 1, "advert_send_errors": 12, "dropped": {"vrid": 2}},
            "conflicts": [], "send_error": "sending to 224.0.0.18: Operation not permitted (os error 1)",
        }))
        .unwrap();
        let text = render(&Status { vrrp: vec![vrrp], ..status() });
        for line in [
            "lbd_vrrp_state{instance=\"VI_1\",state=\"MASTER\"} 1",
            "lbd_vrrp_state{instance=\"VI_1\",state=\"BACKUP\"} 0",
            "lbd_vrrp_priority{instance=\"VI_1\"} 140",
            "lbd_vrrp_adverts_sent_total{instance=\"VI_1\"} 30",
            "# TYPE lbd_vrrp_advert_send_errors_total counter",
            "lbd_vrrp_advert_send_errors_total{instance=\"VI_1\"} 12",
            "lbd_vrrp_became_master_total{instance=\"VI_1\"} 1",
            "lbd_vrrp_adverts_dropped_total{instance=\"VI_1\",reason=\"vrid\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing line {line:?} in:\n{text}");
        }
    }

    /// Sends `request` to `addr` and returns the whole answer (the server closes after it).
    async fn http(addr: std::net::SocketAddr, request: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_endpoint_answers_a_scrape_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::channel::<(Request, oneshot::Sender<Response>)>(4);
        // The run loop's part: answer status requests, then go away.
        let answers = tokio::spawn(async move {
            let (req, reply) = rx.recv().await.unwrap();
            assert!(matches!(req, Request::Status));
            reply.send(Response { ok: true, status: Some(status()), ..Default::default() }).unwrap();
            let (_, reply) = rx.recv().await.unwrap();
            reply.send(Response::error("reading counters: boom")).unwrap();
        });
        tokio::spawn(serve(listener, tx));
        let close = "Connection: close\r\n\r\n";

        let ok = http(addr, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{ok}");
        assert!(ok.contains("\r\n\r\n# HELP lbd_info "), "{ok}");
        assert!(ok.contains("\nlbd_uptime_seconds 42\n"), "{ok}");

        let failed = http(addr, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(failed.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{failed}");
        assert!(failed.ends_with("\r\n\r\nreading counters: boom\n"), "{failed}");
        answers.await.unwrap();

        let gone = http(addr, &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(gone.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{gone}");
        assert!(gone.ends_with("lbd is shutting down\n"), "{gone}");
        let elsewhere = http(addr, &format!("GET / HTTP/1.1\r\nHost: x\r\n{close}")).await;
        assert!(elsewhere.starts_with("HTTP/1.1 404 Not Found\r\n"), "{elsewhere}");
        let post = http(addr, &format!("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{close}")).await;
        assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{post}");
        assert!(post.contains("\r\nallow: GET, HEAD\r\n"), "{post}");
    }

    /// The run loop's part for tests that only scrape: every status request gets [`status`].
    fn answer_every_status(mut rx: mpsc::Receiver<(Request, oneshot::Sender<Response>)>) {
        tokio::spawn(async move {
            while let Some((_, reply)) = rx.recv().await {
                let _ = reply.send(Response { ok: true, status: Some(status()), ..Default::default() });
            }
        });
    }

    /// With [`MAX_CONNECTIONS`] connections open (idle), one more is answered 503 and closed at
    /// once, while those open are still served; once one of them closes, a new one is served.
    #[tokio::test]
    async fn a_connection_beyond_the_cap_is_answered_503_and_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(MAX_CONNECTIONS);
        answer_every_status(rx);
        tokio::spawn(serve(listener, tx));
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(2), extra.read_to_string(&mut out))
            .await
            .expect("the connection beyond the cap was kept open")
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nlbd is busy: 32 metrics connections are open already; try again\n"), "{out}");

        // The connections held are served; this one closes after its answer, freeing its slot.
        let mut first = held.swap_remove(0);
        first.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut ok = String::new();
        first.read_to_string(&mut ok).await.unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let start = std::time::Instant::now();
        loop {
            // The slot is given back when the server has seen the close: until then, 503 (or
            // a reset: the server closes with the request unread).
            let scrape = async {
                let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.ok()?;
                let mut got = String::new();
                s.read_to_string(&mut got).await.ok()?;
                Some(got)
            };
            match tokio::time::timeout(Duration::from_secs(2), scrape).await {
                Ok(Some(got)) if got.starts_with("HTTP/1.1 200 OK\r\n") => break,
                _ => assert!(start.elapsed() < Duration::from_secs(2), "no slot freed after a connection closed"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A client that asks for scrapes without reading the answers (the server's writes stall
    /// once the socket buffers are full) is closed after the deadline and its grace.
    #[tokio::test]
    async fn a_client_that_does_not_read_is_closed_after_the_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::channel(4);
        answer_every_status(rx);
        let limits = Limits { connections: 4, deadline: Duration::from_millis(300), grace: Duration::from_millis(200) };
        tokio::spawn(serve_limited(listener, tx, limits));
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let (mut read, mut write) = socket.connect(addr).await.unwrap().into_split();
        // Pipelined: answered one after the other, more than any socket buffer holds.
        const SCRAPES: usize = 3000;
        let requests = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(SCRAPES);
        let writer = tokio::spawn(async move {
            let _ = write.write_all(requests.as_bytes()).await;
            // Kept open: no end of requests for the server to see.
            std::future::pending::<()>().await
        });
        let start = std::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Without a deadline this read would take the stalled answers, and then wait on an
        // idle connection that stays open.
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), read.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "still open {:?} after it was opened", start.elapsed());
        assert!(out.len() < SCRAPES * render(&status()).len(), "every answer was written: the writes never stalled");
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_nothing_is_dropped_after_30_s() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _rx) = mpsc::channel::<(Request, oneshot::Sender<Response>)>(1);
        tokio::spawn(serve(listener, tx));
        let start = tokio::time::Instant::now();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut out = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(120), s.read_to_end(&mut out)).await;
        assert!(closed.is_ok(), "the connection was still open after 120 s");
        assert!(start.elapsed() >= Duration::from_secs(30), "closed after {:?}", start.elapsed());
    }

    /// A listener whose `accept` keeps failing (here: shut down, so every call returns EINVAL at
    /// once, as EMFILE does while the process is out of descriptors) costs a pause per failure,
    /// not a core: without the pause the loop spins for the whole half second.
    #[test]
    fn a_failing_accept_does_not_spin() {
        use std::os::fd::AsRawFd;
        let thread_cpu = || {
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: `usage` is a valid rusage to fill.
            assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) }, 0);
            Duration::from_secs(usage.ru_utime.tv_sec as u64 + usage.ru_stime.tv_sec as u64)
                + Duration::from_micros(usage.ru_utime.tv_usec as u64 + usage.ru_stime.tv_usec as u64)
        };
        // One thread runs the loop and this test, so the thread's CPU time is the loop's.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let used = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            // SAFETY: a valid socket; shutting it down only makes its accept fail.
            assert_eq!(unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) }, 0);
            let (tx, _rx) = mpsc::channel::<(Request, oneshot::Sender<Response>)>(1);
            let before = thread_cpu();
            let task = tokio::spawn(serve(listener, tx));
            tokio::time::sleep(Duration::from_millis(500)).await;
            task.abort();
            thread_cpu() - before
        });
        assert!(used < Duration::from_millis(100), "the accept loop used {used:?} of CPU in 500 ms");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let mut s = status();
        s.version = "1.0 \"dev\"".into();
        assert!(render(&s).contains("lbd_info{version=\"1.0 \\\"dev\\\"\",dataplane=\"xdp\",interface=\"eth0\",xdp_mode=\"\"} 1"));
    }

    /// IPVS mode: ipvsadm's ActiveConn and InActConn per real server, and the XDP mode in
    /// `lbd_info` where there is one.
    #[test]
    fn ipvs_connections_and_the_xdp_mode() {
        let mut s = status();
        s.xdp_mode = Some("generic".into());
        assert!(render(&s).contains("dataplane=\"xdp\",interface=\"eth0\",xdp_mode=\"generic\"} 1"));
        assert!(!render(&s).contains("lbd_real_server_active_connections{"), "no samples in XDP mode");
        s.dataplane = "ipvs".into();
        let rs = &mut s.virtual_servers[0].real_servers[0];
        (rs.active_conns, rs.inactive_conns) = (Some(4), Some(17));
        let text = render(&s);
        let label = "{virtual_server=\"10.0.0.100:80\",protocol=\"tcp\",real_server=\"10.0.0.1:80\"}";
        assert!(text.contains(&format!("lbd_real_server_active_connections{label} 4\n")), "{text}");
        assert!(text.contains(&format!("lbd_real_server_inactive_connections{label} 17\n")), "{text}");
    }

    /// The IPv4 and the IPv6 virtual server of one firewall mark are two series, not one twice.
    #[test]
    fn both_families_of_a_mark_are_told_apart() {
        let mark = |address: &str| VirtualServerStatus {
            address: address.into(),
            fwmark: Some(5),
            protocol: "fwmark".into(),
            traffic: TrafficStatus { conns: 1, packets: 2, bytes: 3 },
            ..Default::default()
        };
        let text = render(&Status { virtual_servers: vec![mark("0.0.0.0"), mark("::")], ..status() });
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).map(|l| l.rsplit_once(' ').unwrap().0).collect();
        let unique: std::collections::BTreeSet<&&str> = samples.iter().collect();
        assert_eq!(unique.len(), samples.len(), "a series appears twice:\n{text}");
        for line in [
            "lbd_virtual_server_packets_total{virtual_server=\"fwmark:5\",protocol=\"fwmark\"} 2",
            "lbd_virtual_server_packets_total{virtual_server=\"fwmark:5/ipv6\",protocol=\"fwmark\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing line {line:?} in:\n{text}");
        }
    }
}
