//! The probes: one [`probe`] runs one check of one real server (with its retries) and tells
//! whether it passed and why, in words an operator reads in the log and in `lbd status`.
//!
//! | kind | passes | typical reasons |
//! | --- | --- | --- |
//! | `tcp` | the handshake completes | `connected`, `connection refused`, `timeout after 500ms` |
//! | `http`, `https` | the status is expected and the body matches | `HTTP 200`, `HTTP 503`, `body mismatch: "ok" not found`, `digest mismatch: body MD5 is …`, `TLS: certificate not trusted (unknown issuer) …` |
//! | `script` | exit 0 (or 2..=255 with `dynamic_weight`) | `script exit 0`, `script exit 1`, `script exit 5 (weight 3)`, `script exit 127 (not found)`, `script killed by signal 9`, `timeout after 1s` |
//! | `udp` | see [`UdpCheck`] | `reply received`, `reply mismatch: "pong" not found`, `ICMP port unreachable`, `no ICMP error within 500ms` |
//! | `dns` | a NOERROR reply with a record of the type asked | `DNS answer: 1 A record`, `DNS NXDOMAIN`, `DNS reply has no A record` |
//! | `none` | always | `no check` |
//!
//! Every attempt is bounded by `timeout` (the whole exchange: connect, TLS, request, reply and
//! body); a failed attempt is retried `retries` times after `retry_delay`. Each attempt opens its
//! own connection, as keepalived's checkers do.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use md5::{Digest, Md5};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UdpSocket};

use super::config::{
    format_duration, BodyMatch, CommandText, DnsCheck, HealthCheck, HttpCheck, ProbeKind,
    ScriptCheck, Timing, TlsCheck, UdpCheck, Via,
};

/// Largest HTTP body kept for `expect_body` (the `digest` is taken over a body of any size).
pub const MAX_BODY: usize = 1 << 20;
/// Largest UDP reply read.
const MAX_DATAGRAM: usize = 65536;

/// What is checked: a real server, and the VIP path to it for `via = "vip"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The real server's own address.
    pub addr: IpAddr,
    /// The real server's port; the check's `port` overrides it.
    pub port: u16,
    /// The director's address probes leave from (keepalived's `bindto`); `None`: the kernel's
    /// choice. Set it where the director holds VIPs on the interface towards the real servers:
    /// IPv6 source selection may pick a VIP (unless it was added with `preferred_lft 0`), and
    /// the real server would answer the VIP, which it holds itself.
    pub source: Option<IpAddr>,
    /// The DSR path, needed by `via = "vip"` (and given to scripts as `LBD_VIP`).
    pub vip: Option<VipPath>,
}

/// How to reach a real server through the VIP: a frame addressed to the VIP, sent out of
/// `ifindex` to the real server's MAC, as the fast path forwards client traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VipPath {
    /// The virtual server's address.
    pub vip: IpAddr,
    /// Interface the real server is reached through.
    pub ifindex: u32,
    /// That interface's MAC (the frame's source).
    pub src_mac: [u8; 6],
    /// The real server's MAC; `None` while unresolved (a `via = "vip"` probe then fails; the
    /// scheduler skips it for a while, see [`super::scheduler::MAC_GRACE`]).
    pub dst_mac: Option<[u8; 6]>,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    /// Passed.
    pub ok: bool,
    /// Why, in the operator's words: `"HTTP 503"`, `"timeout after 500ms"`, `"connected"`, ...
    pub reason: String,
    /// A weight a `script` check with `dynamic_weight` set (exit code − 2).
    pub weight: Option<u32>,
    /// Duration of the last attempt.
    #[serde(serialize_with = "serialize_latency")]
    pub latency: Duration,
    /// Attempts made (1 + retries used).
    pub attempts: u32,
    /// The check could not run, for want of something of lbd's own (see [`Attempt::not_run`]):
    /// `ok` is false, but the result says nothing of the real server, and the scheduler records
    /// nothing (the real server keeps its state).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_run: bool,
}

fn serialize_latency<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e6).round() / 1e3)
}

/// One attempt's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Passed.
    pub ok: bool,
    /// Why, as in [`ProbeResult::reason`].
    pub reason: String,
    /// As in [`ProbeResult::weight`].
    pub weight: Option<u32>,
    /// The attempt could not be made for a reason of lbd's own, not the real server's: lbd is
    /// out of file descriptors ([`out_of_descriptors`]). `ok` is false.
    pub not_run: bool,
}

pub(super) fn pass(reason: impl Into<String>) -> Attempt {
    Attempt {
        ok: true,
        reason: reason.into(),
        weight: None,
        not_run: false,
    }
}

pub(super) fn fail(reason: impl Into<String>) -> Attempt {
    Attempt {
        ok: false,
        reason: reason.into(),
        weight: None,
        not_run: false,
    }
}

/// An attempt that could not be made (see [`Attempt::not_run`]).
pub(super) fn not_run(reason: impl Into<String>) -> Attempt {
    Attempt { not_run: true, ..fail(reason) }
}

/// Whether `e` is lbd's own shortage of file descriptors (EMFILE: its limit; ENFILE: the
/// system's), which says nothing of the real server.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A failed attempt for `e`, said as `reason`; one that [`not_run`] when `e` is
/// [`out_of_descriptors`] (creating the socket failed: the real server was not even asked).
pub(super) fn io_failed(e: &io::Error, reason: impl Into<String>) -> Attempt {
    if out_of_descriptors(e) {
        not_run(reason)
    } else {
        fail(reason)
    }
}

/// Runs one check of `target`: attempts until one passes, at most `1 + retries`, pausing
/// `retry_delay` before each retry. The result is the last attempt's.
pub async fn probe(check: &HealthCheck, target: &ProbeTarget) -> ProbeResult {
    retrying(&check.timing, || timed(attempt(check, target))).await
}

/// [`probe`]'s loop around `one`, which makes one attempt and says how long the attempt itself
/// took ([`timed`]): the scheduler's attempts each take and give back their own probe permit, so
/// that a check waiting to retry does not hold one, and the time spent waiting for a permit is
/// not the real server's latency.
pub async fn retrying<F: Future<Output = (Attempt, Duration)>>(timing: &Timing, mut one: impl FnMut() -> F) -> ProbeResult {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (attempt, latency) = one().await;
        if attempt.ok || attempts > timing.retries {
            return ProbeResult {
                ok: attempt.ok,
                reason: attempt.reason,
                weight: attempt.weight,
                latency,
                attempts,
                not_run: attempt.not_run,
            };
        }
        tokio::time::sleep(timing.retry_delay).await;
    }
}

/// An attempt and how long it took (by tokio's clock: the same as the system's, except in tests
/// that pause it).
pub async fn timed(attempt: impl Future<Output = Attempt>) -> (Attempt, Duration) {
    let start = tokio::time::Instant::now();
    let attempt = attempt.await;
    (attempt, start.elapsed())
}

/// One attempt of `check` on `target`, bounded by the check's timeout.
pub async fn attempt(check: &HealthCheck, target: &ProbeTarget) -> Attempt {
    let timeout = check.timing.timeout;
    let port = check.port.unwrap_or(target.port);
    let addr = SocketAddr::new(target.addr, port);
    match &check.probe {
        ProbeKind::None => pass("no check"),
        ProbeKind::Tcp if check.via == Via::Vip => match &target.vip {
            Some(path) => {
                super::vip::syn_probe(target.addr, target.source, path, port, timeout).await
            }
            None => fail("via = \"vip\" needs the virtual server's address"),
        },
        ProbeKind::Tcp => bounded(timeout, tcp(addr, target.source)).await,
        ProbeKind::Http(http) => bounded(timeout, http_get(addr, target.source, http)).await,
        ProbeKind::Script(script) => run_script(script, target, port, timeout).await,
        ProbeKind::Udp(udp) => udp_check(addr, target.source, udp, timeout).await,
        ProbeKind::Dns(dns) => bounded(timeout, dns_check(addr, target.source, dns)).await,
    }
}

/// `f`, or a failure "timeout after …" when it takes longer than `timeout`.
async fn bounded(timeout: Duration, f: impl Future<Output = Attempt>) -> Attempt {
    tokio::time::timeout(timeout, f)
        .await
        .unwrap_or_else(|_| timed_out(timeout))
}

fn timed_out(timeout: Duration) -> Attempt {
    fail(format!("timeout after {}", format_duration(timeout)))
}

/// An I/O error in few words: `connection refused`, `host unreachable`, ...
pub fn io_reason(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "connection refused".into(),
        ConnectionReset => "connection reset".into(),
        ConnectionAborted => "connection aborted".into(),
        HostUnreachable => "host unreachable".into(),
        NetworkUnreachable => "network unreachable".into(),
        AddrNotAvailable => "address not available".into(),
        UnexpectedEof => "connection closed".into(),
        _ => {
            let text = e.to_string();
            match text.find(" (os error") {
                Some(i) => text[..i].to_lowercase(),
                None => text,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// tcp

/// A TCP connection to `addr`, from `source` if given.
async fn connect_tcp(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    socket.connect(addr).await
}

async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> Attempt {
    match connect_tcp(addr, source).await {
        Ok(stream) => {
            // Close with a RST: no TIME_WAIT on the director for each check (as HAProxy does).
            let _ = stream.set_zero_linger();
            pass("connected")
        }
        Err(e) => io_failed(&e, io_reason(&e)),
    }
}

// ---------------------------------------------------------------------------------------------
// http, https

async fn http_get(addr: SocketAddr, source: Option<IpAddr>, http: &HttpCheck) -> Attempt {
    let stream = match connect_tcp(addr, source).await {
        Ok(s) => s,
        Err(e) => return io_failed(&e, io_reason(&e)),
    };
    let _ = stream.set_nodelay(true);
    // Whoever closes first, the director keeps no TIME_WAIT per check.
    let _ = stream.set_zero_linger();
    match &http.tls {
        None => exchange(stream, addr, http).await,
        Some(tls) => {
            let config = match tls_config(tls) {
                Ok(c) => c,
                Err(e) => return fail(format!("TLS: {e}")),
            };
            let name_text = http.host.as_deref().map(strip_port).unwrap_or_default();
            let name = if name_text.is_empty() {
                ServerName::IpAddress(addr.ip().into())
            } else {
                match ServerName::try_from(name_text.to_owned()) {
                    Ok(n) => n,
                    Err(_) => return fail(format!("TLS: invalid server name {name_text:?}")),
                }
            };
            let shown = if name_text.is_empty() {
                addr.ip().to_string()
            } else {
                name_text.to_owned()
            };
            match tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
            {
                Ok(tls_stream) => exchange(tls_stream, addr, http).await,
                Err(e) => fail(tls_reason(&e, &shown)),
            }
        }
    }
}

/// `host` without a `:port` suffix (IPv6 literals in brackets lose the brackets).
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// One GET over an established connection (plain or TLS).
async fn exchange<S>(stream: S, addr: SocketAddr, http: &HttpCheck) -> Attempt
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io).await {
            Ok(pair) => pair,
            Err(e) => return fail(format!("HTTP: {e}")),
        };
    let default_port = if http.tls.is_some() { 443 } else { 80 };
    let host = match &http.host {
        Some(h) => h.clone(),
        None => match (addr.ip(), addr.port()) {
            (IpAddr::V4(a), p) if p == default_port => a.to_string(),
            (IpAddr::V6(a), p) if p == default_port => format!("[{a}]"),
            (ip, p) => SocketAddr::new(ip, p).to_string(),
        },
    };
    let request = match hyper::Request::get(http.path.as_str())
        .header(hyper::header::HOST, host)
        .header(
            hyper::header::USER_AGENT,
            concat!("lbd-health/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::ACCEPT, "*/*")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
    {
        Ok(r) => r,
        Err(e) => return fail(format!("HTTP: cannot build the request: {e}")),
    };
    let response = async {
        let response = match sender.send_request(request).await {
            Ok(r) => r,
            Err(e) => return fail(hyper_reason(&e)),
        };
        let status = response.status().as_u16();
        if !http.expect_status.iter().any(|r| r.contains(&status)) {
            return fail(format!("HTTP {status}"));
        }
        if http.expect_body.is_none() && http.digest.is_none() {
            return pass(format!("HTTP {status}"));
        }
        // One pass over the body as it arrives: the digest over all of it, whatever its size, as
        // keepalived's HTTP_GET does; for `expect_body`, the first MAX_BODY bytes kept.
        let mut frames = response.into_body();
        let mut md5 = http.digest.as_ref().map(|_| Md5::new());
        let mut body = Vec::new();
        while let Some(frame) = frames.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => return fail(hyper_reason(&e)),
            };
            let Some(data) = frame.data_ref() else { continue };
            if let Some(md5) = &mut md5 {
                md5.update(data);
            }
            if http.expect_body.is_some() {
                if body.len() + data.len() > MAX_BODY {
                    return fail(format!("body larger than {} KiB", MAX_BODY / 1024));
                }
                body.extend_from_slice(data);
            }
        }
        match &http.expect_body {
            Some(BodyMatch::Contains(text)) if !contains(&body, text.as_bytes()) => {
                return fail(format!("body mismatch: {text:?} not found"))
            }
            Some(BodyMatch::Regex(re)) if !re.is_match(&String::from_utf8_lossy(&body)) => {
                return fail(format!("body mismatch: no match for /{}/", re.as_str()))
            }
            _ => {}
        }
        if let (Some(md5), Some(want)) = (md5, &http.digest) {
            let got = hex(&md5.finalize());
            if &got != want {
                return fail(format!("digest mismatch: body MD5 is {got}"));
            }
        }
        pass(format!("HTTP {status}"))
    };
    // The connection is driven here (not spawned) so that a timeout drops it with the attempt.
    let mut conn = std::pin::pin!(conn);
    let mut response = std::pin::pin!(response);
    tokio::select! {
        r = &mut response => r,
        c = &mut conn => match c {
            Ok(()) => response.await,
            Err(e) => fail(hyper_reason(&e)),
        },
    }
}

fn hyper_reason(e: &hyper::Error) -> String {
    // The underlying I/O error (reset, ...) says more than hyper's wrapper.
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return io_reason(io);
        }
        source = s.source();
    }
    format!("HTTP: {e}")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// MD5 of `data` in lower-case hex, as keepalived's `genhash` prints it.
pub fn md5_hex(data: &[u8]) -> String {
    hex(&Md5::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A handshake error in the operator's words.
fn tls_reason(e: &io::Error, name: &str) -> String {
    use rustls::CertificateError as C;
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return format!("TLS: {}", io_reason(e));
    };
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer => {
                "TLS: certificate not trusted (unknown issuer); set `ca_file`, or `tls_verify = false`".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                format!("TLS: certificate not valid for {name}; set `host` to a name it holds, or `tls_verify = false`")
            }
            C::Expired | C::ExpiredContext { .. } => "TLS: certificate expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => "TLS: certificate not valid yet".into(),
            C::Revoked => "TLS: certificate revoked".into(),
            C::BadSignature => "TLS: bad certificate signature".into(),
            other => format!("TLS: invalid certificate: {other:?}"),
        },
        other => format!("TLS: {other}"),
    }
}

/// Reads a PEM file of CA certificates (`ca_file`); the error is a message for the operator.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read `ca_file` {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`ca_file` {} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "`ca_file` {} holds no PEM certificate",
            path.display()
        ));
    }
    let mut store = rustls::RootCertStore::empty();
    for cert in &certs {
        store
            .add(cert.clone())
            .map_err(|e| format!("`ca_file` {}: invalid CA certificate: {e}", path.display()))?;
    }
    Ok(certs)
}

/// TLS client configurations, built once per (`tls_verify`, `ca_file`) and rebuilt when the CA
/// file changes.
type TlsKey = (bool, Option<PathBuf>);
type TlsCache = HashMap<TlsKey, (Option<SystemTime>, Arc<rustls::ClientConfig>)>;
static TLS_CONFIGS: OnceLock<Mutex<TlsCache>> = OnceLock::new();

fn tls_config(tls: &TlsCheck) -> Result<Arc<rustls::ClientConfig>, String> {
    let key = (tls.verify, tls.ca_file.clone());
    let mtime = tls
        .ca_file
        .as_ref()
        .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let cache = TLS_CONFIGS.get_or_init(Default::default);
    if let Some((when, config)) = cache.lock().expect("TLS cache lock").get(&key) {
        if *when == mtime {
            return Ok(config.clone());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let mut config = if !tls.verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca_file {
            Some(path) => {
                for cert in load_ca_file(path)? {
                    roots.add(cert).map_err(|e| e.to_string())?;
                }
            }
            None => {
                roots.add_parsable_certificates(system_roots().iter().cloned());
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every check a full handshake: a resumed session is not verified again
    // (the server sends no certificate), so with resumption a real server whose certificate
    // expired or was replaced by an untrusted one would pass for as long as it took tickets.
    config.resumption = rustls::client::Resumption::disabled();
    let config = Arc::new(config);
    cache
        .lock()
        .expect("TLS cache lock")
        .insert(key, (mtime, config.clone()));
    Ok(config)
}

/// The system's trust store (`/etc/ssl/certs` on Debian), read once.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// `tls_verify = false`: any certificate is accepted; the handshake's signatures are still
/// checked (the connection is encrypted, just not authenticated).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// script

/// Kills a command's whole process group (`sh -c` and whatever it started) unless it finished.
/// Dropping the future of [`run_bounded`] (a check stopped, a VRRP reload, a stop's deadline)
/// drops this guard: tokio's `kill_on_drop` alone would kill the shell and leave its children.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Builds the command of a `script` check or a notify command: a shell line runs under
/// `/bin/sh -c`, an argument vector directly. Standard input is `/dev/null`, output discarded,
/// and the command gets its own process group so that a timeout kills everything it started.
pub fn command(text: &CommandText) -> tokio::process::Command {
    let mut cmd = match text {
        CommandText::Shell(line) => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(line);
            c
        }
        CommandText::Argv(argv) => {
            let mut c = tokio::process::Command::new(argv.first().map_or("", String::as_str));
            c.args(argv.iter().skip(1));
            c
        }
    };
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// How long [`run_bounded`] waits for a command it killed to exit.
const REAP_WAIT: Duration = Duration::from_secs(1);

/// Why [`run_bounded`] has no exit status to give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// It could not be started.
    #[error("cannot run script: {0}")]
    Spawn(String),
    /// Waiting for it failed.
    #[error("script: {0}")]
    Wait(String),
    /// Still running at the timeout: its process group was killed.
    #[error("timeout after {}", format_duration(*.0))]
    Timeout(Duration),
}

/// Runs `cmd` (from [`command`]) for at most `timeout`; on timeout, or when the future is
/// dropped before it ends, its process group is killed.
pub async fn run_bounded(
    mut cmd: tokio::process::Command,
    timeout: Duration,
) -> Result<std::process::ExitStatus, RunError> {
    let mut child = cmd.spawn().map_err(|e| RunError::Spawn(io_reason(&e)))?;
    // Dropped before the end (the check was stopped): the group is killed.
    let mut guard = GroupGuard(child.id().map(|p| p as i32));
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => {
            // Finished: what it left running in the background is its own business, as in keepalived.
            guard.0 = None;
            Ok(status)
        }
        Ok(Err(e)) => Err(RunError::Wait(io_reason(&e))),
        Err(_) => {
            drop(guard); // kills the group
            // Reaped if it dies at once; one that cannot be killed (stuck in uninterruptible
            // sleep, e.g. on a hung NFS mount) must not hold the check, and its script permit,
            // for ever: tokio reaps it in the background once it exits (`kill_on_drop`).
            let _ = tokio::time::timeout(REAP_WAIT, child.wait()).await;
            Err(RunError::Timeout(timeout))
        }
    }
}

/// What `/bin/sh` means by exit status `code`, when it means something of its own: 126 and 127
/// come from the shell when it could not run the command, not from the command.
pub fn shell_exit_words(code: i32) -> Option<&'static str> {
    match code {
        126 => Some("not executable"),
        127 => Some("not found"),
        _ => None,
    }
}

async fn run_script(
    script: &ScriptCheck,
    target: &ProbeTarget,
    port: u16,
    timeout: Duration,
) -> Attempt {
    let mut cmd = command(&script.command);
    cmd.env("LBD_RS_ADDRESS", target.addr.to_string())
        .env("LBD_RS_PORT", port.to_string());
    if let Some(vip) = &target.vip {
        cmd.env("LBD_VIP", vip.vip.to_string());
    }
    match run_bounded(cmd, timeout).await {
        Err(reason) => fail(reason.to_string()),
        Ok(status) => script_outcome(status, script.dynamic_weight, matches!(script.command, CommandText::Shell(_))),
    }
}

/// `shell`: the command was a shell line, so exit 126 and 127 are the shell's (see
/// [`shell_exit_words`]); a program run directly means what it likes by them.
fn script_outcome(status: std::process::ExitStatus, dynamic_weight: bool, shell: bool) -> Attempt {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => pass("script exit 0"),
        (Some(code @ 2..=255), _) if dynamic_weight => {
            let weight = (code - 2) as u32;
            Attempt {
                ok: true,
                reason: format!("script exit {code} (weight {weight})"),
                weight: Some(weight),
                not_run: false,
            }
        }
        (Some(code), _) => match shell_exit_words(code).filter(|_| shell) {
            Some(words) => fail(format!("script exit {code} ({words})")),
            None => fail(format!("script exit {code}")),
        },
        (None, Some(signal)) => fail(format!("script killed by signal {signal}")),
        (None, None) => fail("script ended without an exit code"),
    }
}

// ---------------------------------------------------------------------------------------------
// udp

async fn connected_udp(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<UdpSocket> {
    let local: SocketAddr = match (addr, source) {
        (_, Some(source)) => (source, 0).into(),
        (SocketAddr::V4(_), None) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        (SocketAddr::V6(_), None) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

fn shown(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

async fn udp_check(
    addr: SocketAddr,
    source: Option<IpAddr>,
    udp: &UdpCheck,
    timeout: Duration,
) -> Attempt {
    let socket = match connected_udp(addr, source).await {
        Ok(s) => s,
        Err(e) => return io_failed(&e, io_reason(&e)),
    };
    if let Err(e) = socket.send(&udp.payload).await {
        return fail(udp_io_reason(&e));
    }
    let mut buf = vec![0; MAX_DATAGRAM];
    match tokio::time::timeout(timeout, socket.recv(&mut buf)).await {
        Ok(Ok(n)) => match &udp.expect_reply {
            Some(want) if !contains(&buf[..n], want) => {
                fail(format!("reply mismatch: {} not found", shown(want)))
            }
            _ => pass("reply received"),
        },
        Ok(Err(e)) => fail(udp_io_reason(&e)),
        Err(_) => match &udp.expect_reply {
            None => pass(format!("no ICMP error within {}", format_duration(timeout))),
            Some(_) => timed_out(timeout),
        },
    }
}

fn udp_io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "ICMP port unreachable".into(),
        _ => io_reason(e),
    }
}

// ---------------------------------------------------------------------------------------------
// dns

async fn dns_check(addr: SocketAddr, source: Option<IpAddr>, dns: &DnsCheck) -> Attempt {
    let socket = match connected_udp(addr, source).await {
        Ok(s) => s,
        Err(e) => return io_failed(&e, io_reason(&e)),
    };
    let id = fastrand::u16(..);
    let query = dns_query(id, &dns.query_name, dns.query_type.code());
    if let Err(e) = socket.send(&query).await {
        return fail(udp_io_reason(&e));
    }
    let mut buf = vec![0; MAX_DATAGRAM];
    loop {
        let n = match socket.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => return fail(udp_io_reason(&e)),
        };
        match dns_answer(&buf[..n], &query, dns.query_type.code()) {
            DnsReply::NotOurs => continue,
            DnsReply::Malformed => return fail("DNS reply malformed"),
            DnsReply::Rcode(code) => return fail(format!("DNS {}", rcode_name(code))),
            DnsReply::Records(0) => {
                return fail(format!("DNS reply has no {} record", dns.query_type))
            }
            DnsReply::Records(n) => {
                let s = if n == 1 { "" } else { "s" };
                return pass(format!("DNS answer: {n} {} record{s}", dns.query_type));
            }
        }
    }
}

/// A recursive query for `name`/`qtype`/IN.
pub fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // 1 question
    if name != "." {
        for label in name.trim_end_matches('.').split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    q
}

#[derive(Debug, PartialEq, Eq)]
enum DnsReply {
    /// Another id, or another question: not the answer to this query.
    NotOurs,
    Malformed,
    Rcode(u8),
    Records(usize),
}

/// Reads a reply to `query` (from [`dns_query`]): its id and question, rcode and the answers of
/// type `qtype`.
fn dns_answer(msg: &[u8], query: &[u8], qtype: u16) -> DnsReply {
    if msg.len() < 12 {
        return DnsReply::Malformed;
    }
    let be = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    if msg[..2] != query[..2] {
        return DnsReply::NotOurs;
    }
    let flags = be(2);
    if flags & 0x8000 == 0 {
        return DnsReply::Malformed;
    }
    // The question echoed (names compare without regard to case): a reply with this id to
    // another question is not this query's answer.
    let question = &query[12..];
    if be(4) != 1 || !msg.get(12..12 + question.len()).is_some_and(|q| q.eq_ignore_ascii_case(question)) {
        return DnsReply::NotOurs;
    }
    let rcode = (flags & 0xf) as u8;
    if rcode != 0 {
        return DnsReply::Rcode(rcode);
    }
    let (qd, an) = (be(4) as usize, be(6) as usize);
    let mut at = 12;
    for _ in 0..qd {
        let Some(end) = skip_name(msg, at) else {
            return DnsReply::Malformed;
        };
        at = end + 4;
    }
    let mut found = 0;
    for _ in 0..an {
        let Some(end) = skip_name(msg, at) else {
            return DnsReply::Malformed;
        };
        if end + 10 > msg.len() {
            return DnsReply::Malformed;
        }
        let rtype = be(end);
        let rdlen = be(end + 8) as usize;
        at = end + 10 + rdlen;
        if at > msg.len() {
            return DnsReply::Malformed;
        }
        if rtype == qtype {
            found += 1;
        }
    }
    DnsReply::Records(found)
}

/// The offset after the name at `at` (labels, ending in a zero byte or a compression pointer).
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)? as usize;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => return (at + 2 <= msg.len()).then_some(at + 2),
            l if l & 0xc0 != 0 => return None,
            l => at += 1 + l,
        }
    }
}

fn rcode_name(code: u8) -> String {
    match code {
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("rcode {n}"),
    }
}

/// Helpers for the tests of what commands leave behind.
#[cfg(test)]
pub(crate) mod testing {
    use std::time::Duration;

    /// Whether a `sleep SECONDS` process runs, by its exact command line (a zombie has none).
    pub fn sleep_running(seconds: &str) -> bool {
        let want = format!("sleep\0{seconds}\0");
        let processes = std::fs::read_dir("/proc").unwrap().flatten();
        processes.into_iter().any(|p| std::fs::read(p.path().join("cmdline")).is_ok_and(|c| c == want.as_bytes()))
    }

    /// Waits up to `limit` for `sleep_running(seconds)` to be `want`; true if it was.
    pub async fn sleep_becomes(seconds: &str, want: bool, limit: Duration) -> bool {
        let start = std::time::Instant::now();
        while sleep_running(seconds) != want {
            if start.elapsed() > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_messages() {
        let q = dns_query(0x1234, "www.example.com", 1);
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..], b"\x03www\x07example\x03com\x00\x00\x01\x00\x01");
        assert_eq!(&dns_query(1, ".", 6)[12..], b"\x00\x00\x06\x00\x01");

        // A reply: the question, a CNAME and an A record via compression pointers.
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2; // ANCOUNT
        r.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 16]);
        r.extend_from_slice(&[0xc0, 16, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 0, 0, 1]);
        assert_eq!(dns_answer(&r, &q, 1), DnsReply::Records(1));
        // The CNAME alone: an answer without an A record.
        let mut cname = r[..r.len() - 16].to_vec();
        cname[7] = 1;
        assert_eq!(dns_answer(&cname, &q, 1), DnsReply::Records(0));
        let q28 = dns_query(0x1234, "www.example.com", 28);
        assert_eq!(dns_answer(&r, &q28, 28), DnsReply::NotOurs, "another question's answer");
        assert_eq!(dns_answer(&r, &dns_query(0x9999, "www.example.com", 1), 1), DnsReply::NotOurs);
        assert_eq!(dns_answer(&r, &dns_query(0x1234, "www.example.org", 1), 1), DnsReply::NotOurs);
        assert_eq!(dns_answer(&r, &dns_query(0x1234, "WWW.Example.com", 1), 1), DnsReply::Records(1));
        assert_eq!(
            dns_answer(&r[..r.len() - 2], &q, 1),
            DnsReply::Malformed
        );
        let mut nx = q.clone();
        nx[2] = 0x81;
        nx[3] = 0x83;
        assert_eq!(dns_answer(&nx, &q, 1), DnsReply::Rcode(3));
        assert_eq!(
            dns_answer(&q, &q, 1),
            DnsReply::Malformed,
            "a query is not a reply"
        );
    }

    #[test]
    fn small_helpers() {
        assert_eq!(md5_hex(b"hello"), "5d41402abc4b2a76b9719d911017c592");
        assert_eq!(strip_port("example.com:8443"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[fd00::1]:443"), "fd00::1");
        assert_eq!(strip_port("fd00::1"), "fd00::1");
        assert!(contains(b"all healthy here", b"healthy"));
        assert!(!contains(b"unhealthy", b"fine"));
        use std::os::unix::process::ExitStatusExt;
        let exit = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        assert_eq!(script_outcome(exit(0), false, true), pass("script exit 0"));
        assert_eq!(script_outcome(exit(1), true, true), fail("script exit 1"));
        assert_eq!(script_outcome(exit(5), false, true), fail("script exit 5"));
        // The shell's own codes, in words; a program run directly means what it likes by them.
        assert_eq!(script_outcome(exit(127), false, true), fail("script exit 127 (not found)"));
        assert_eq!(script_outcome(exit(126), false, true), fail("script exit 126 (not executable)"));
        assert_eq!(script_outcome(exit(127), false, false), fail("script exit 127"));
        assert_eq!(
            script_outcome(exit(5), true, true),
            Attempt {
                ok: true,
                reason: "script exit 5 (weight 3)".into(),
                weight: Some(3),
                not_run: false,
            }
        );
        assert_eq!(
            script_outcome(std::process::ExitStatus::from_raw(9), false, true),
            fail("script killed by signal 9")
        );
    }

    /// lbd out of descriptors (its own limit or the system's) did not ask the real server: the
    /// attempt did not run. Any other error is the real server's failure.
    #[test]
    fn out_of_descriptors_is_not_the_real_servers_failure() {
        for errno in [libc::EMFILE, libc::ENFILE] {
            let e = io::Error::from_raw_os_error(errno);
            let attempt = io_failed(&e, io_reason(&e));
            assert!(attempt.not_run && !attempt.ok, "{attempt:?}");
        }
        assert_eq!(io_reason(&io::Error::from_raw_os_error(libc::EMFILE)), "too many open files");
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_failed(&refused, io_reason(&refused)), fail("connection refused"));
    }

    /// A check stopped mid-run (its task aborted, as at a reload) kills what its script
    /// started; so does its timeout.
    #[tokio::test]
    async fn a_script_stopped_or_timed_out_leaves_nothing_behind() {
        use testing::sleep_becomes;
        let seconds = format!("100.{}3", std::process::id());
        let line = CommandText::Shell(format!("sleep {seconds}; true"));
        let cmd = command(&line);
        let run = tokio::spawn(run_bounded(cmd, Duration::from_secs(60)));
        assert!(sleep_becomes(&seconds, true, Duration::from_secs(5)).await, "the script never started");
        run.abort();
        assert!(run.await.unwrap_err().is_cancelled());
        assert!(sleep_becomes(&seconds, false, Duration::from_secs(2)).await, "sleep {seconds} survived its script");

        let start = std::time::Instant::now();
        let timed_out = run_bounded(command(&line), Duration::from_millis(300)).await;
        assert_eq!(timed_out, Err(RunError::Timeout(Duration::from_millis(300))));
        assert_eq!(timed_out.unwrap_err().to_string(), "timeout after 300ms");
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
        assert!(sleep_becomes(&seconds, false, Duration::from_secs(2)).await, "sleep {seconds} survived the timeout");
    }

    fn check(text: &str) -> HealthCheck {
        toml::from_str::<super::super::config::HealthCheckSpec>(&text.replace(", ", "\n"))
            .unwrap()
            .validate(1)
            .unwrap()
    }

    #[tokio::test]
    async fn retries_and_their_delay() {
        // A closed port on loopback: refused at once, retried twice 50 ms apart.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let c = check(r#"kind = "tcp", retries = 2, retry_delay = "50ms", timeout = "1s""#);
        let target = ProbeTarget {
            addr: "127.0.0.1".parse().unwrap(),
            port,
            source: None,
            vip: None,
        };
        let start = std::time::Instant::now();
        let r = probe(&c, &target).await;
        assert_eq!(
            (r.ok, r.reason.as_str(), r.attempts, r.weight),
            (false, "connection refused", 3, None)
        );
        assert!(
            start.elapsed() >= Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );

        let none = probe(&check(r#"kind = "none""#), &target).await;
        assert_eq!(
            (none.ok, none.reason.as_str(), none.attempts),
            (true, "no check", 1)
        );
    }
}
