//! The control socket: a Unix stream socket (mode 0600), one request per connection: a JSON
//! object on one line, answered by one line. `{"cmd":"status"}` → `{"ok":true,"status":{...}}`; `{"cmd":"reload"}` → `{"ok":true}` or
//! `{"ok":false,"error":"..."}` (with `"config_error":true` when the config file has a mistake); `{"cmd":"drain","vip":"10.0.0.1:80","backend":"10.0.0.11"}` and
//! `{"cmd":"enable",...}` (optional `"protocol":"tcp"`).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::UnixStream,
    },
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{config::Protocol, status::Status};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Reload,
    /// Weight 0 for matching real servers (they keep their flows, get no new ones) until
    /// `Enable` or a config change to them (a restart keeps them).
    Drain(BackendSelector),
    Enable(BackendSelector),
}

/// Which real servers a `drain`/`enable` is about, as typed on the command line. A field lbd does
/// not know is refused, not ignored: a misspelt `protocol` would otherwise drain both protocols.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendSelector {
    /// `ADDR:PORT` of the virtual server (`[v6]:port` for IPv6).
    pub vip: String,
    /// `ADDR` or `ADDR:PORT` of the real server.
    pub backend: String,
    /// "tcp" or "udp"; both when absent.
    pub protocol: Option<String>,
}

/// A [`BackendSelector`] read: which virtual servers and real servers it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selection {
    pub vip: VsName,
    /// The real server's address, and its port if given.
    pub backend: (IpAddr, Option<u16>),
    /// Only virtual servers of this protocol; any when `None`.
    pub protocol: Option<Protocol>,
}

/// How a selector names virtual servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VsName {
    /// `ADDR:PORT`.
    Addr(SocketAddr),
    /// `fwmark:N` (both families of the mark), `fwmark:N/ipv4` or `fwmark:N/ipv6`, as status and
    /// the metrics' `virtual_server` label name the IPv6 one.
    Mark { mark: u32, ipv6: Option<bool> },
}

impl BackendSelector {
    /// Reads the selector, with an error naming the argument that is not understood. The CLI
    /// checks it before sending (a usage error), the daemon again when it arrives.
    pub fn parse(&self) -> Result<Selection, String> {
        let vip = match self.vip.strip_prefix("fwmark:") {
            Some(rest) => {
                let bad = || format!("`{}` is not fwmark:N (N from 1), fwmark:N/ipv4 or fwmark:N/ipv6", self.vip);
                let (mark, ipv6) = match rest.split_once('/') {
                    None => (rest, None),
                    Some((m, "ipv4")) => (m, Some(false)),
                    Some((m, "ipv6")) => (m, Some(true)),
                    Some(_) => return Err(bad()),
                };
                let mark = mark.parse().ok().filter(|&m: &u32| m > 0).ok_or_else(bad)?;
                VsName::Mark { mark, ipv6 }
            }
            None => VsName::Addr(self.vip.parse().map_err(|_| {
                format!("`{}` is not ADDR:PORT ([ADDR]:PORT for IPv6) or fwmark:N of a virtual server", self.vip)
            })?),
        };
        let backend = match self.backend.parse::<SocketAddr>() {
            Ok(sa) => (sa.ip(), Some(sa.port())),
            Err(_) => (
                self.backend.parse::<IpAddr>().map_err(|_| {
                    format!("`{}` is not ADDR or ADDR:PORT ([ADDR]:PORT for IPv6) of a real server", self.backend)
                })?,
                None,
            ),
        };
        let protocol = match self.protocol.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("tcp") => Some(Protocol::Tcp),
            Some("udp") => Some(Protocol::Udp),
            Some(_) => return Err(format!("unknown protocol `{}`; expected tcp or udp", self.protocol.as_deref().unwrap_or(""))),
        };
        Ok(Selection { vip, backend, protocol })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// What a command did, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// With `ok: false`: the request was refused for a mistake in the config file (`error` says
    /// where, FILE:LINE:COL), which `lbd reload` reports with exit code 2, as `lbd check` does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub config_error: bool,
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Self { ok: false, error: Some(message.into()), ..Default::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach lbd at {path}: {source} (is `lbd run` running? pass --socket or --config to name its socket)")]
    Connect { path: String, source: std::io::Error },
    #[error("cannot open lbd's socket at {path}: {source} (the socket is mode 0600 and lbd's directory may be closed to others: run this as the user lbd runs as, usually root)")]
    Denied { path: String, source: std::io::Error },
    #[error("lbd at {path} is not taking connections: its queue is full (lbd is stuck, or too many clients wait)")]
    Full { path: String },
    #[error("lbd at {path} closed the connection without answering (is it stopping?)")]
    Closed { path: String },
    #[error("talking to lbd at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("lbd at {path} did not answer within {} s (it may still be working on the request: `lbd status` answers once it is done)", REPLY_TIMEOUT.as_secs())]
    Timeout { path: String },
    #[error("lbd at {path} sent an unreadable reply: {source}")]
    Decode { path: String, source: serde_json::Error },
    #[error("another lbd is already listening on {0}")]
    InUse(String),
    #[error("another lbd runs with control socket {path}: it holds {lock}")]
    Locked { path: String, lock: String },
    #[error("{0} exists and is not a socket: control_socket must name a path of its own")]
    NotASocket(String),
}

impl ControlError {
    /// Nothing listens at the socket: it does not exist, or its lbd is gone. Not a socket that
    /// cannot be opened (no permission) or that did not answer (an lbd busy starting).
    pub fn not_running(&self) -> bool {
        use std::io::ErrorKind::{ConnectionRefused, NotFound};
        matches!(self, ControlError::Connect { source, .. } if matches!(source.kind(), NotFound | ConnectionRefused))
    }
}

/// How long a client waits for lbd's reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request and waits (at most 10 s in all) for the reply.
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    request_raw(path, req).map(|(resp, _)| resp)
}

/// [`request`], with the reply also as lbd sent it: `lbd status --json` prints lbd's own
/// object, so that a field this client does not know is not lost.
pub fn request_raw(path: &Path, req: &Request) -> Result<(Response, serde_json::Value), ControlError> {
    let p = path.display().to_string();
    let deadline = std::time::Instant::now() + REPLY_TIMEOUT;
    let stream = connect(path)?;
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ControlError::Timeout { path: p.clone() },
        // Closed before it read the request (which then resets the connection).
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => ControlError::Closed { path: p.clone() },
        _ => ControlError::Io { path: p.clone(), source },
    };
    // One deadline for the whole exchange, however the reply is split into reads.
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ControlError::Timeout { path: p.clone() })
    };
    stream.set_write_timeout(Some(left()?)).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(&stream);
    let mut reply = Vec::new();
    while !reply.ends_with(b"\n") {
        stream.set_read_timeout(Some(left()?)).map_err(io)?;
        let chunk = reader.fill_buf().map_err(io)?;
        if chunk.is_empty() {
            break;
        }
        let take = chunk.iter().position(|&b| b == b'\n').map_or(chunk.len(), |i| i + 1);
        reply.extend_from_slice(&chunk[..take]);
        reader.consume(take);
    }
    if reply.is_empty() {
        return Err(ControlError::Closed { path: p });
    }
    let reply = String::from_utf8_lossy(&reply);
    let decode = |source| ControlError::Decode { path: p.clone(), source };
    let raw: serde_json::Value = serde_json::from_str(&reply).map_err(decode)?;
    Ok((serde_json::from_value(raw.clone()).map_err(decode)?, raw))
}

/// Connects without waiting on a full queue: a blocking connect to a socket whose listen queue
/// is full (an lbd that stopped accepting) would wait for ever.
fn connect(path: &Path) -> Result<UnixStream, ControlError> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let p = path.display().to_string();
    let io = |source: std::io::Error| ControlError::Io { path: p.clone(), source };
    let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| io(e.into()))?;
    let addr = UnixAddr::new(path).map_err(|e| io(e.into()))?;
    match nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) => {}
        // A Unix socket connects at once or not at all: EAGAIN is a full queue.
        Err(nix::errno::Errno::EAGAIN) => return Err(ControlError::Full { path: p }),
        Err(e) => {
            let source = std::io::Error::from(e);
            return Err(match source.kind() {
                std::io::ErrorKind::PermissionDenied => ControlError::Denied { path: p, source },
                _ => ControlError::Connect { path: p, source },
            });
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false).map_err(io)?;
    Ok(stream)
}

/// After a failed `accept` on a listener (the control socket's, the metrics endpoint's): logs it
/// and waits a moment. The usual cause is running out of file descriptors (EMFILE, ENFILE), which
/// the next `accept` hits again at once: retrying without the pause would spin a core and flood
/// the log until a descriptor is freed.
pub async fn accept_failed(what: &str, e: &std::io::Error) {
    tracing::warn!("{what} accept: {e}; retrying in {} ms", ACCEPT_RETRY.as_millis());
    tokio::time::sleep(ACCEPT_RETRY).await;
}

/// The pause of [`accept_failed`].
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// The lock file of a control socket: `lbd.lock` beside `lbd.sock`.
pub fn lock_file_for(control_socket: &Path) -> PathBuf {
    control_socket.with_extension("lock")
}

/// A control socket's path made lbd's alone: an exclusive `flock` on [`lock_file_for`] it,
/// held as long as this value lives (the descriptor is close-on-exec: commands lbd starts do
/// not inherit it). Two lbds started at once, or one started while another's socket file was
/// deleted, cannot both run on it; `lbd detach` takes it too. Dropped, it removes the socket
/// file lbd bound, and only that one: not one a later lbd bound at the same path.
#[derive(Debug)]
pub struct Claim {
    socket: PathBuf,
    _lock: std::fs::File,
    /// Device and inode of the socket file bound under this claim.
    bound: Option<(u64, u64)>,
}

impl Claim {
    /// Takes the lock, without waiting: [`ControlError::Locked`] while an lbd holds it. The
    /// socket's directory must exist.
    pub fn take(socket: &Path) -> Result<Claim, ControlError> {
        use std::os::{fd::AsRawFd, unix::fs::OpenOptionsExt};
        let lock = lock_file_for(socket);
        let l = lock.display().to_string();
        let io = |source| ControlError::Io { path: l.clone(), source };
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&lock).map_err(io)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.kind() {
                std::io::ErrorKind::WouldBlock => ControlError::Locked { path: socket.display().to_string(), lock: l },
                _ => io(e),
            });
        }
        Ok(Claim { socket: socket.to_path_buf(), _lock: file, bound: None })
    }

    /// Removes the socket file now if it is still the one bound under this claim (the lock is
    /// kept until the claim is dropped).
    pub fn remove_socket(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if let Some(id) = self.bound.take() {
            if std::fs::symlink_metadata(&self.socket).is_ok_and(|m| (m.dev(), m.ino()) == id) {
                let _ = std::fs::remove_file(&self.socket);
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.remove_socket();
    }
}

/// Binds the socket: claims it ([`Claim`]), creates the directory (0700), refuses to steal a
/// socket another lbd listens on, replaces a stale one, and restricts it to the owner (0600)
/// from the start (no moment in which others could connect).
pub fn bind(path: &Path) -> Result<(tokio::net::UnixListener, Claim), ControlError> {
    use std::os::unix::fs::MetadataExt;
    let p = path.display().to_string();
    let io = |source| ControlError::Io { path: p.clone(), source };
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        // A directory lbd creates is its own (0700): it holds the socket and lbd's state.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    }
    let mut claim = Claim::take(path)?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Something listens (an lbd from before the lock file, or not lbd at all).
        if matches!(connect(path), Ok(_) | Err(ControlError::Full { .. })) {
            return Err(ControlError::InUse(p));
        }
        // A stale socket is replaced; anything else at that path is not lbd's to delete.
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket(p));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    // The socket is created 0600 (0777 less the umask), not made so a moment later. lbd creates
    // no other file meanwhile: this runs before any task that could.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    claim.bound = Some((meta.dev(), meta.ino()));
    Ok((listener, claim))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stale socket (its lbd gone) is replaced; a file that is not a socket is left alone,
    /// however `control_socket` came to name it.
    #[tokio::test]
    async fn bind_replaces_a_stale_socket_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("lbd-bind-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lbd.toml");
        std::fs::write(&file, "[director]\n").unwrap();
        let err = bind(&file).unwrap_err();
        assert_eq!(err.to_string(), format!("{} exists and is not a socket: control_socket must name a path of its own", file.display()));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "[director]\n");

        let sock = dir.join("lbd.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let stale = request(&sock, &Request::Status).unwrap_err();
        assert!(stale.not_running(), "{stale}");
        assert!(request(&dir.join("none.sock"), &Request::Status).unwrap_err().not_running());
        let (listener, claim) = bind(&sock).expect("a stale socket is replaced");
        let again = bind(&sock).unwrap_err();
        assert_eq!(again.to_string(), format!("another lbd runs with control socket {}: it holds {}", sock.display(), dir.join("lbd.lock").display()));
        drop((listener, claim));
        assert!(!sock.exists(), "the socket file goes with its claim");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A second lbd cannot start on a socket path whose file was deleted under the first, and
    /// the first, stopping, leaves the socket file of an lbd that bound the path after it alone.
    #[tokio::test]
    async fn the_lock_not_the_socket_file_keeps_a_second_lbd_out() {
        let dir = std::env::temp_dir().join(format!("lbd-claim-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let sock = dir.join("lbd.sock");
        let (first, claim) = bind(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_file(&sock).unwrap();
        assert!(matches!(bind(&sock), Err(ControlError::Locked { .. })));
        // Someone else's socket at the path now (bound without the lock, as an lbd from before it).
        let other = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        drop((first, claim));
        assert!(sock.exists(), "the first lbd removed a socket file that was not its own");
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A misspelt field is refused (a `protcol` ignored would drain both protocols).
    #[test]
    fn unknown_fields_of_a_drain_are_refused() {
        let ok = r#"{"cmd":"drain","vip":"10.0.0.1:80","backend":"10.0.0.11","protocol":"udp"}"#;
        assert!(matches!(serde_json::from_str::<Request>(ok), Ok(Request::Drain(_))));
        let typo = ok.replace("protocol", "protcol");
        let err = serde_json::from_str::<Request>(&typo).unwrap_err().to_string();
        assert!(err.contains("unknown field `protcol`"), "{err}");
    }

    /// A listener that takes no connections and whose queue is full: the client says so at once
    /// instead of waiting for ever. One that closes without a reply is named as such.
    #[test]
    fn a_full_queue_and_a_closed_connection_are_told_apart() {
        use nix::sys::socket::{bind as sbind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
        let dir = std::env::temp_dir().join(format!("lbd-full-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("stuck.sock");
        let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::empty(), None).unwrap();
        sbind(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(&sock).unwrap()).unwrap();
        listen(&fd, Backlog::new(0).unwrap()).unwrap();
        let started = std::time::Instant::now();
        let mut held = Vec::new();
        let full = loop {
            match connect(&sock) {
                Ok(s) => held.push(s),
                Err(e) => break e,
            }
            assert!(held.len() < 10, "the queue of a listener with backlog 0 never filled");
        };
        assert!(matches!(full, ControlError::Full { .. }), "{full}");
        let err = request(&sock, &Request::Status).unwrap_err();
        assert!(err.to_string().contains("is not taking connections: its queue is full"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop((held, fd));

        let closes = dir.join("closes.sock");
        let listener = std::os::unix::net::UnixListener::bind(&closes).unwrap();
        let server = std::thread::spawn(move || drop(listener.accept().unwrap()));
        let err = request(&closes, &Request::Status).unwrap_err();
        server.join().unwrap();
        assert_eq!(err.to_string(), format!("lbd at {} closed the connection without answering (is it stopping?)", closes.display()));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
