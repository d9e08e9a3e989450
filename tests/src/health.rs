//! Servers for the health-check tests (`tests/tests/health_checks.rs`): a small HTTP(S) server
//! with one path per behaviour, a test CA, a UDP echo and a tiny DNS server. Everything runs on
//! the current tokio runtime and binds addresses inside the test's own network namespace.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{body::Bytes, Request, Response};
use tokio::net::{TcpListener, UdpSocket};
use tokio_rustls::rustls;

use crate::netns::Netns;

/// What `/hello` answers; its MD5 is [`HELLO_MD5`].
pub const HELLO: &str = "hello";
pub const HELLO_MD5: &str = "5d41402abc4b2a76b9719d911017c592";

/// What `/big` answers: 3 MiB, beyond what a check reads for `expect_body`.
pub fn big_page() -> String {
    "lbd health check body\n".repeat(3 << 20).chars().take(3 << 20).collect()
}
/// How long `/slow` takes to answer.
pub const SLOW: Duration = Duration::from_secs(3);

/// Runs `f` to completion on a single-threaded tokio runtime, on a thread inside `ns` (every
/// socket it opens lives there).
pub fn run_in<F, Fut>(ns: &Netns, f: F) -> Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>> + 'static,
{
    ns.enter(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })?
}

/// A namespace with `addr/24` on `d0`, one end of a veth pair whose other end `d1` has no
/// address: nothing else answers on that subnet, its other addresses are black holes. (A veth
/// pair rather than a dummy interface: not every kernel has the dummy module.)
pub fn dummy_net(name: &str, addr: &str) -> Result<Netns> {
    let ns = Netns::new(name)?;
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])?;
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "d0"])?;
    ns.ip(&["link", "set", "d0", "up"])?;
    ns.ip(&["link", "set", "d1", "up"])?;
    Ok(ns)
}

/// A running test HTTP server.
pub struct HttpServer {
    pub addr: SocketAddr,
    /// Status `/toggle` answers with (200 at first).
    pub toggle: Arc<AtomicU16>,
}

/// Serves, on `addr` (plain, or TLS with `tls`):
///
/// | path | answer |
/// | --- | --- |
/// | `/ok` | 200 `all healthy` |
/// | `/fail` | 503 `down for maintenance` |
/// | `/slow` | 200 after [`SLOW`] |
/// | `/wrong` | 200 `unexpected page` |
/// | `/hello` | 200 [`HELLO`] |
/// | `/host` | 200 with the request's `Host` header as body |
/// | `/toggle` | the status in [`HttpServer::toggle`], body `toggle` |
/// | other | 404 |
pub async fn serve_http(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<HttpServer> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let addr = listener.local_addr()?;
    let toggle = Arc::new(AtomicU16::new(200));
    let status = toggle.clone();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let status = status.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| respond(req, status.clone()));
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    }
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        }
                    }
                }
            });
        }
    });
    Ok(HttpServer { addr, toggle })
}

async fn respond(
    req: Request<hyper::body::Incoming>,
    toggle: Arc<AtomicU16>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (status, body): (u16, String) = match req.uri().path() {
        "/ok" => (200, "all healthy\n".into()),
        "/fail" => (503, "down for maintenance\n".into()),
        "/slow" => {
            tokio::time::sleep(SLOW).await;
            (200, "finally\n".into())
        }
        "/wrong" => (200, "unexpected page\n".into()),
        "/hello" => (200, HELLO.into()),
        "/big" => (200, big_page()),
        "/host" => {
            let host = req
                .headers()
                .get(hyper::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            (200, host.to_string())
        }
        "/toggle" => (toggle.load(Ordering::SeqCst), "toggle\n".into()),
        _ => (404, "not found\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).expect("valid status");
    Ok(response)
}

/// A CA made for one test, and a server certificate it signed.
pub struct TestCa {
    /// The CA certificate, PEM (for `ca_file`).
    pub ca_file: PathBuf,
    /// A server configuration presenting the signed certificate.
    pub server: Arc<rustls::ServerConfig>,
}

/// Creates a CA in `dir` and a server certificate for `names` (DNS names) and `ips`.
pub fn test_ca(dir: &Path, names: &[&str], ips: &[IpAddr]) -> Result<TestCa> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "lbd health-check test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    leaf.subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("server"),
    );
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    std::fs::create_dir_all(dir)?;
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem())?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![leaf_cert.der().clone()], key)?;
    Ok(TestCa {
        ca_file,
        server: Arc::new(server),
    })
}

/// A UDP socket bound to `addr`, and the address it got (port 0: an ephemeral one).
async fn bind_udp(addr: SocketAddr) -> Result<(UdpSocket, SocketAddr)> {
    let socket = UdpSocket::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let addr = socket.local_addr()?;
    Ok((socket, addr))
}

/// A UDP server answering each datagram with `pong ` and the datagram.
pub async fn serve_udp_echo(addr: SocketAddr) -> Result<SocketAddr> {
    let (socket, addr) = bind_udp(addr).await?;
    tokio::spawn(async move {
        let mut buf = vec![0; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut reply = b"pong ".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
    Ok(addr)
}

/// A UDP socket that reads and never answers.
pub async fn serve_udp_silent(addr: SocketAddr) -> Result<SocketAddr> {
    let (socket, addr) = bind_udp(addr).await?;
    tokio::spawn(async move {
        let mut buf = vec![0; 65536];
        while socket.recv_from(&mut buf).await.is_ok() {}
    });
    Ok(addr)
}

/// The A record [`serve_dns`] gives `www.example.test`.
pub const DNS_A: [u8; 4] = [192, 0, 2, 80];

/// A tiny authoritative DNS server: `www.example.test` has one A record ([`DNS_A`]) and no AAAA;
/// the root `.` has an SOA; every other name is NXDOMAIN.
pub async fn serve_dns(addr: SocketAddr) -> Result<SocketAddr> {
    let (socket, addr) = bind_udp(addr).await?;
    tokio::spawn(async move {
        let mut buf = vec![0; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            if let Some(reply) = dns_reply(&buf[..n]) {
                let _ = socket.send_to(&reply, from).await;
            }
        }
    });
    Ok(addr)
}

fn dns_reply(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // The question: name labels, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let name = labels.join(".");
    let (rcode, answers): (u8, Vec<(u16, Vec<u8>)>) = match (name.as_str(), qtype) {
        ("www.example.test", 1) => (0, vec![(1, DNS_A.to_vec())]),
        ("www.example.test", _) => (0, vec![]),
        ("", 6) => {
            let mut soa = vec![0, 0]; // mname ".", rname "."
            for v in [1u32, 1800, 900, 604800, 86400] {
                soa.extend_from_slice(&v.to_be_bytes());
            }
            (0, vec![(6, soa)])
        }
        ("", _) => (0, vec![]),
        _ => (3, vec![]),
    };
    let mut r = Vec::new();
    r.extend_from_slice(&query[0..2]);
    r.extend_from_slice(&[0x85, 0x80 | rcode]); // QR, AA, RD; RA
    r.extend_from_slice(&[0, 1]);
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(query.get(12..question_end)?);
    for (rtype, rdata) in answers {
        r.extend_from_slice(&[0xc0, 12]);
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(&rdata);
    }
    Some(r)
}
