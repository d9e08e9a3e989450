//! The control socket: a Unix stream socket (mode 0600) speaking one JSON object per line.
//! `{"cmd":"status"}` → `{"ok":true,"status":{...}}`; `{"cmd":"reload"}` → `{"ok":true}` or
//! `{"ok":false,"error":"..."}` (with `"config_error":true` when the config file has a mistake); `{"cmd":"drain","vip":"10.0.0.1:80","backend":"10.0.0.11"}` and
//! `{"cmd":"enable",...}` (optional `"protocol":"tcp"`).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::UnixStream,
    },
    net::{IpAddr, SocketAddr},
    path::Path,
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

/// Which real servers a `drain`/`enable` is about, as typed on the command line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
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
    #[error("cannot open lbd's socket at {path}: {source} (it is mode 0600: run this as the user lbd runs as, usually root)")]
    Denied { path: String, source: std::io::Error },
    #[error("talking to lbd at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("lbd at {path} did not answer within {} s (it may still be working on the request: `lbd status` answers once it is done)", REPLY_TIMEOUT.as_secs())]
    Timeout { path: String },
    #[error("lbd at {path} sent an unreadable reply: {source}")]
    Decode { path: String, source: serde_json::Error },
    #[error("another lbd is already listening on {0}")]
    InUse(String),
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

/// Sends one request and waits (at most 10 s) for the reply.
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    request_raw(path, req).map(|(resp, _)| resp)
}

/// [`request`], with the reply also as lbd sent it: `lbd status --json` prints lbd's own
/// object, so that a field this client does not know is not lost.
pub fn request_raw(path: &Path, req: &Request) -> Result<(Response, serde_json::Value), ControlError> {
    let p = path.display().to_string();
    let mut stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::PermissionDenied => ControlError::Denied { path: p.clone(), source },
        _ => ControlError::Connect { path: p.clone(), source },
    })?;
    let io = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ControlError::Timeout { path: p.clone() },
        _ => ControlError::Io { path: p.clone(), source },
    };
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    let decode = |source| ControlError::Decode { path: p.clone(), source };
    let raw: serde_json::Value = serde_json::from_str(&reply).map_err(decode)?;
    Ok((serde_json::from_value(raw.clone()).map_err(decode)?, raw))
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

/// Binds the socket: creates the directory, refuses to steal a socket another lbd listens on,
/// replaces a stale one, and restricts it to the owner (0600).
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, ControlError> {
    let p = path.display().to_string();
    let io = |source| ControlError::Io { path: p.clone(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(p));
        }
        // A stale socket is replaced; anything else at that path is not lbd's to delete.
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket(p));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
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
        let listener = bind(&sock).expect("a stale socket is replaced");
        assert!(matches!(bind(&sock), Err(ControlError::InUse(_))));
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
