//! A small client for Linux IPVS (the kernel's L4 load balancer, what `ipvsadm` drives) over
//! generic netlink, with typed errors.
//!
//! ```no_run
//! use lb_userspace::ipvs::{Destination, Forwarding, IpvsClient, Protocol, Service, ServiceKey};
//! let mut ipvs = IpvsClient::connect()?;
//! let key = ServiceKey::Inet { addr: "10.0.0.1".parse().unwrap(), protocol: Protocol::Tcp, port: 80 };
//! ipvs.add_service(&Service::new(key.clone(), "wrr"))?;
//! ipvs.add_destination(&key, &Destination::new("10.0.1.1".parse().unwrap(), 80, Forwarding::DirectRoute, 1))?;
//! for s in ipvs.services()? {
//!     println!("{s}: {:?}", ipvs.destinations(&s.key)?);
//! }
//! # Ok::<(), lb_userspace::ipvs::IpvsError>(())
//! ```
//!
//! * IPVS state is per network namespace, and a netlink socket belongs to the namespace of the
//!   thread that created it: [`IpvsClient::connect`] from a thread inside the namespace you mean.
//! * Every command needs `CAP_NET_ADMIN` ([`IpvsError::Permission`] otherwise), reads included.
//! * The wire format (constants, byte order, which attributes each command needs) is in
//!   [`wire`], documented against `include/uapi/linux/ip_vs.h` and `ip_vs_ctl.c`.

pub mod wire;

use std::{fmt, io, net::IpAddr, os::fd::AsRawFd, process::Command, time::Duration};

use neli::{
    consts::{nl::NlmF, socket::NlFamily},
    genl::{Genlmsghdr, GenlmsghdrBuilder, Nlattr},
    nl::{NlPayload, NlmsghdrBuilder},
    socket::synchronous::NlSocketHandle,
    types::{Buffer, GenlBuffer},
    utils::Groups,
    FromBytesWithInput,
};
use tracing::{debug, info};

use wire::cmd;

/// `IP_VS_SVC_F_PERSISTENT`: persistent service (clients stick to a real server for `timeout`).
pub const IP_VS_SVC_F_PERSISTENT: u32 = 0x0001;
/// `IP_VS_SVC_F_HASHED`: kernel bookkeeping; never written, stripped when read.
pub const IP_VS_SVC_F_HASHED: u32 = 0x0002;
/// `IP_VS_SVC_F_ONEPACKET`: one-packet scheduling (UDP), `ipvsadm -o`.
pub const IP_VS_SVC_F_ONEPACKET: u32 = 0x0004;
/// `IP_VS_SVC_F_SCHED1`: scheduler flag 1 (`sh`/`mh`: fallback).
pub const IP_VS_SVC_F_SCHED1: u32 = 0x0008;
/// `IP_VS_SVC_F_SCHED2`: scheduler flag 2 (`sh`/`mh`: include the source port).
pub const IP_VS_SVC_F_SCHED2: u32 = 0x0010;
/// `IP_VS_SVC_F_SCHED3`: scheduler flag 3.
pub const IP_VS_SVC_F_SCHED3: u32 = 0x0020;

/// A transport protocol IPVS balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number (`IPPROTO_*`).
    pub fn number(self) -> u16 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP as u16,
            Protocol::Udp => libc::IPPROTO_UDP as u16,
            Protocol::Sctp => libc::IPPROTO_SCTP as u16,
        }
    }

    pub fn from_number(n: u16) -> Option<Protocol> {
        [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
            .into_iter()
            .find(|p| p.number() == n)
    }

    /// `TCP`, `UDP`, `SCTP`, as ipvsadm prints them.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// An address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of `addr`.
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// What identifies a virtual service: protocol, address and port, or a firewall mark (plus the
/// family of the addresses it balances).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    Inet {
        addr: IpAddr,
        protocol: Protocol,
        port: u16,
    },
    Fwmark {
        family: Family,
        /// Nonzero.
        mark: u32,
    },
}

impl ServiceKey {
    pub fn family(&self) -> Family {
        match self {
            ServiceKey::Inet { addr, .. } => Family::of(*addr),
            ServiceKey::Fwmark { family, .. } => *family,
        }
    }
}

/// Like ipvsadm: `TCP  10.0.0.1:80`, `UDP  [2001:db8::1]:53`, `SCTP 10.0.0.1:9`, `FWM  5`,
/// `FWM  5 IPv6`.
impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceKey::Inet {
                addr: IpAddr::V4(a),
                protocol,
                port,
            } => write!(f, "{:<4} {a}:{port}", protocol.name()),
            ServiceKey::Inet {
                addr: IpAddr::V6(a),
                protocol,
                port,
            } => write!(f, "{:<4} [{a}]:{port}", protocol.name()),
            ServiceKey::Fwmark {
                family: Family::V4,
                mark,
            } => write!(f, "FWM  {mark}"),
            ServiceKey::Fwmark {
                family: Family::V6,
                mark,
            } => write!(f, "FWM  {mark} IPv6"),
        }
    }
}

/// Traffic counters and rate estimates (`struct ip_vs_stats64`). Rates are the kernel's
/// estimates: per second, bytes/s for the `*_bps` fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stats {
    pub conns: u64,
    pub in_packets: u64,
    pub out_packets: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    pub cps: u64,
    pub in_pps: u64,
    pub out_pps: u64,
    pub in_bps: u64,
    pub out_bps: u64,
}

/// A virtual service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    pub key: ServiceKey,
    /// Scheduler name (`rr`, `wrr`, `mh`, ...), 1 to 15 bytes.
    pub scheduler: String,
    /// `IP_VS_SVC_F_*` bits. [`IP_VS_SVC_F_HASHED`] is never written and never reported.
    pub flags: u32,
    /// Persistence timeout in seconds (meaningful with [`IP_VS_SVC_F_PERSISTENT`]).
    pub timeout: u32,
    /// Persistence granularity. IPv4: the mask as a number, `u32::from(Ipv4Addr)`, so
    /// 255.255.255.0 is `0xffff_ff00` (it goes on the wire big-endian, `ff ff ff 00`). IPv6: the
    /// prefix length, 1 to 128.
    pub netmask: u32,
    /// Counters; ignored when writing.
    pub stats: Stats,
}

impl Service {
    /// A service with `scheduler`, no flags, no persistence and ipvsadm's default netmask
    /// (255.255.255.255, or /128).
    pub fn new(key: ServiceKey, scheduler: impl Into<String>) -> Service {
        let netmask = match key.family() {
            Family::V4 => u32::MAX,
            Family::V6 => 128,
        };
        Service {
            key,
            scheduler: scheduler.into(),
            flags: 0,
            timeout: 0,
            netmask,
            stats: Stats::default(),
        }
    }

    /// Whether [`IP_VS_SVC_F_PERSISTENT`] is set.
    pub fn persistent(&self) -> bool {
        self.flags & IP_VS_SVC_F_PERSISTENT != 0
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.key, self.scheduler)?;
        if self.persistent() {
            write!(f, " persistent {}", self.timeout)?;
        }
        Ok(())
    }
}

/// How packets reach a real server (`IP_VS_CONN_F_*` forwarding methods).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Forwarding {
    /// NAT (`-m`, "Masq").
    Masquerade,
    /// Local node ("Local"); the kernel picks it for local addresses.
    Local,
    /// IP-in-IP tunnelling (`-i`, "Tunnel").
    Tunnel,
    /// Direct routing / DSR (`-g`, "Route").
    DirectRoute,
    /// Bypass ("Bypass").
    Bypass,
}

impl Forwarding {
    /// The `IP_VS_CONN_F_*` value.
    pub fn conn_flags(self) -> u32 {
        match self {
            Forwarding::Masquerade => 0,
            Forwarding::Local => 1,
            Forwarding::Tunnel => 2,
            Forwarding::DirectRoute => 3,
            Forwarding::Bypass => 4,
        }
    }

    /// The method in the `IP_VS_CONN_F_FWD_MASK` bits of `flags`.
    pub fn from_conn_flags(flags: u32) -> Option<Forwarding> {
        Some(match flags & wire::FWD_MASK {
            0 => Forwarding::Masquerade,
            1 => Forwarding::Local,
            2 => Forwarding::Tunnel,
            3 => Forwarding::DirectRoute,
            4 => Forwarding::Bypass,
            _ => return None,
        })
    }

    /// `Masq`, `Local`, `Tunnel`, `Route`, `Bypass`, as ipvsadm prints them.
    pub fn name(self) -> &'static str {
        match self {
            Forwarding::Masquerade => "Masq",
            Forwarding::Local => "Local",
            Forwarding::Tunnel => "Tunnel",
            Forwarding::DirectRoute => "Route",
            Forwarding::Bypass => "Bypass",
        }
    }
}

/// A real server of a service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
    pub forwarding: Forwarding,
    pub weight: u32,
    /// Upper connection threshold, 0 = none.
    pub upper_threshold: u32,
    /// Lower connection threshold, 0 = none.
    pub lower_threshold: u32,
    /// Read-only (ignored when writing).
    pub active_conns: u32,
    /// Read-only.
    pub inactive_conns: u32,
    /// Read-only.
    pub persistent_conns: u32,
    /// Read-only.
    pub stats: Stats,
}

impl Destination {
    /// A destination without thresholds.
    pub fn new(addr: IpAddr, port: u16, forwarding: Forwarding, weight: u32) -> Destination {
        Destination {
            addr,
            port,
            forwarding,
            weight,
            upper_threshold: 0,
            lower_threshold: 0,
            active_conns: 0,
            inactive_conns: 0,
            persistent_conns: 0,
            stats: Stats::default(),
        }
    }
}

/// What `IPVS_CMD_GET_INFO` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Info {
    /// IPVS version, e.g. (1, 2, 1).
    pub version: (u8, u8, u8),
    /// Size of the connection hash table (`ip_vs_conn_tab_size`).
    pub conn_table_size: u32,
}

/// Why an IPVS request failed.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// EEXIST: what was to be added is there already.
    #[error("{what} already exists")]
    Exists { what: String },
    /// ESRCH / ENOENT: what the request refers to is not there.
    #[error("{what} does not exist")]
    NotFound { what: String },
    /// EPERM / EACCES.
    #[error("{what}: permission denied (IPVS needs CAP_NET_ADMIN)")]
    Permission { what: String },
    /// No IPVS generic netlink family, even after `modprobe ip_vs`.
    #[error("IPVS is not available: {reason}")]
    Unavailable { reason: String },
    /// Any other errno from the kernel (EINVAL for a bad request, ...).
    #[error("{what}: {source}")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
    /// Socket I/O or message decoding failed.
    #[error("{what}: netlink: {detail}")]
    Netlink { what: String, detail: String },
}

/// How long a reply may take before a request fails (the kernel answers at once; this only keeps
/// a wedged socket from hanging the caller forever).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// `GENL_ID_CTRL`, `CTRL_CMD_GETFAMILY`, `CTRL_ATTR_FAMILY_ID`, `CTRL_ATTR_FAMILY_NAME`.
const GENL_ID_CTRL: u16 = libc::GENL_ID_CTRL as u16;
const CTRL_CMD_GETFAMILY: u8 = libc::CTRL_CMD_GETFAMILY as u8;
const CTRL_ATTR_FAMILY_ID: u16 = libc::CTRL_ATTR_FAMILY_ID as u16;
const CTRL_ATTR_FAMILY_NAME: u16 = libc::CTRL_ATTR_FAMILY_NAME as u16;

type GenlMsg = Genlmsghdr<u8, u16>;

/// What a request is about, to turn an errno into a typed error naming the right object.
struct Ctx<'a> {
    /// e.g. "adding".
    verb: &'static str,
    cmd: u8,
    /// The command's name, e.g. `IPVS_CMD_NEW_DEST`.
    op: &'static str,
    service: Option<&'a ServiceKey>,
    dest: Option<(IpAddr, u16)>,
    scheduler: Option<&'a str>,
}

impl<'a> Ctx<'a> {
    fn new(verb: &'static str, cmd: u8) -> Ctx<'a> {
        Ctx {
            verb,
            cmd,
            op: cmd::name(cmd),
            service: None,
            dest: None,
            scheduler: None,
        }
    }

    fn service(mut self, key: &'a ServiceKey) -> Self {
        self.service = Some(key);
        self
    }

    fn dest(mut self, addr: IpAddr, port: u16) -> Self {
        self.dest = Some((addr, port));
        self
    }

    fn service_name(&self) -> String {
        self.service.map_or_else(
            || "virtual service".into(),
            |k| format!("virtual service {k}"),
        )
    }

    /// The object the request is about: the destination if any, else the service.
    fn object(&self) -> String {
        match self.dest {
            Some((addr, port)) => format!(
                "real server {} of {}",
                sockaddr(addr, port),
                self.service_name()
            ),
            None => self.service_name(),
        }
    }

    /// "adding real server 10.0.0.2:80 of virtual service TCP  10.0.0.1:80 (IPVS_CMD_NEW_DEST)"
    fn describe(&self) -> String {
        let object = match (self.service, self.dest) {
            (None, None) => String::new(),
            _ => format!(" {}", self.object()),
        };
        format!("{}{object} ({})", self.verb, self.op)
    }

    fn errno(&self, errno: i32) -> IpvsError {
        match errno {
            libc::EEXIST => IpvsError::Exists {
                what: self.object(),
            },
            // The kernel says ESRCH for a missing service.
            libc::ESRCH => IpvsError::NotFound {
                what: self.service_name(),
            },
            // ENOENT: a missing destination, or for NEW/SET_SERVICE an unknown scheduler (no
            // module ip_vs_NAME) or persistence engine.
            libc::ENOENT => match (self.scheduler, self.dest) {
                (Some(name), None) => IpvsError::NotFound {
                    what: format!(
                        "scheduler {name:?} for {} (no kernel module ip_vs_{name})",
                        self.service_name()
                    ),
                },
                _ => IpvsError::NotFound {
                    what: self.object(),
                },
            },
            libc::EPERM | libc::EACCES => IpvsError::Permission {
                what: self.describe(),
            },
            _ => IpvsError::Kernel {
                what: self.describe(),
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }

    fn netlink(&self, detail: impl fmt::Display) -> IpvsError {
        IpvsError::Netlink {
            what: self.describe(),
            detail: detail.to_string(),
        }
    }

    /// An argument the kernel would refuse with EINVAL, refused before sending.
    fn invalid(&self, why: impl fmt::Display) -> IpvsError {
        IpvsError::Kernel {
            what: format!("{}: {why}", self.describe()),
            source: io::Error::from_raw_os_error(libc::EINVAL),
        }
    }
}

fn sockaddr(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// Why a transaction failed, before the context is attached.
enum Failure {
    Errno(i32),
    Netlink(String),
}

/// A blocking IPVS generic netlink client, bound to the network namespace of the thread that
/// called [`connect`](IpvsClient::connect).
pub struct IpvsClient {
    socket: NlSocketHandle,
    family: u16,
    seq: u32,
}

impl fmt::Debug for IpvsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpvsClient")
            .field("family", &self.family)
            .field("pid", &self.socket.pid())
            .finish()
    }
}

impl IpvsClient {
    /// Opens a generic netlink socket and resolves the `IPVS` family. If the family is unknown,
    /// runs `modprobe ip_vs` once (saying so at info level) and tries again.
    pub fn connect() -> Result<IpvsClient, IpvsError> {
        let mut client = Self::open()?;
        let family = match client.resolve_family()? {
            Some(id) => id,
            None => {
                info!("generic netlink family IPVS is not registered: running `modprobe ip_vs`");
                let modprobe = match Command::new("modprobe").arg("ip_vs").output() {
                    Ok(out) if out.status.success() => None,
                    Ok(out) => Some(format!(
                        "`modprobe ip_vs` failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )),
                    Err(e) => Some(format!("cannot run `modprobe ip_vs`: {e}")),
                };
                match client.resolve_family()? {
                    Some(id) => id,
                    None => {
                        return Err(IpvsError::Unavailable {
                            reason: format!(
                                "the kernel has no generic netlink family \"IPVS\" even after \
                                 trying to load ip_vs ({}); IPVS needs a kernel with \
                                 CONFIG_IP_VS and its ip_vs module",
                                modprobe.unwrap_or_else(|| {
                                    "`modprobe ip_vs` succeeded but did not register it".into()
                                })
                            ),
                        })
                    }
                }
            }
        };
        debug!(family, "resolved generic netlink family IPVS");
        client.family = family;
        Ok(client)
    }

    /// Like [`IpvsClient::connect`], but `None` where the kernel has no IPVS loaded (no
    /// `modprobe`): then it holds no services either.
    pub fn connect_if_loaded() -> Result<Option<IpvsClient>, IpvsError> {
        let mut client = Self::open()?;
        Ok(client.resolve_family()?.map(|family| {
            client.family = family;
            client
        }))
    }

    /// A generic netlink socket, the family not yet resolved.
    fn open() -> Result<IpvsClient, IpvsError> {
        let open_err = |e: &dyn fmt::Display| IpvsError::Netlink {
            what: "opening a generic netlink socket".into(),
            detail: e.to_string(),
        };
        let socket = NlSocketHandle::connect(NlFamily::Generic, None, Groups::empty())
            .map_err(|e| open_err(&e))?;
        set_recv_timeout(&socket, REPLY_TIMEOUT).map_err(|e| open_err(&e))?;
        Ok(IpvsClient { socket, family: 0, seq: 0 })
    }

    /// The generic netlink id of `IPVS`, `None` if the kernel does not know the family.
    fn resolve_family(&mut self) -> Result<Option<u16>, IpvsError> {
        let mut ctx = Ctx::new(
            "resolving the generic netlink family IPVS",
            CTRL_CMD_GETFAMILY,
        );
        ctx.op = "CTRL_CMD_GETFAMILY";
        let name = wire::attr(CTRL_ATTR_FAMILY_NAME, b"IPVS\0").map_err(|e| ctx.netlink(e))?;
        match self.transact(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, false, vec![name]) {
            Ok(replies) => {
                let id = replies
                    .iter()
                    .find_map(|m| wire::top_level(m.attrs(), CTRL_ATTR_FAMILY_ID))
                    .and_then(|b| <[u8; 2]>::try_from(b).ok())
                    .map(u16::from_ne_bytes)
                    .ok_or_else(|| ctx.netlink("reply without CTRL_ATTR_FAMILY_ID"))?;
                Ok(Some(id))
            }
            Err(Failure::Errno(libc::ENOENT)) => Ok(None),
            Err(Failure::Errno(e)) => Err(IpvsError::Kernel {
                what: ctx.describe(),
                source: io::Error::from_raw_os_error(e),
            }),
            Err(Failure::Netlink(d)) => Err(ctx.netlink(d)),
        }
    }

    /// The IPVS version and connection table size.
    pub fn info(&mut self) -> Result<Info, IpvsError> {
        let ctx = Ctx::new("reading IPVS info", cmd::GET_INFO);
        let replies = self.request(&ctx, false, vec![])?;
        let reply = expect_cmd(&ctx, &replies, cmd::SET_INFO)?
            .next()
            .ok_or_else(|| ctx.netlink("no SET_INFO reply"))?;
        wire::parse_info(reply.attrs()).map_err(|e| ctx.netlink(e))
    }

    /// Every virtual service (dump).
    pub fn services(&mut self) -> Result<Vec<Service>, IpvsError> {
        let ctx = Ctx::new("listing virtual services", cmd::GET_SERVICE);
        let replies = self.request(&ctx, true, vec![])?;
        let services = expect_cmd(&ctx, &replies, cmd::NEW_SERVICE)?
            .map(|m| service_of(&ctx, m))
            .collect();
        services
    }

    /// The service `key`, `None` if there is none.
    pub fn service(&mut self, key: &ServiceKey) -> Result<Option<Service>, IpvsError> {
        let ctx = Ctx::new("reading", cmd::GET_SERVICE).service(key);
        let attrs = vec![wire::service_key_attr(key).map_err(|e| ctx.invalid(e))?];
        let replies = match self.request(&ctx, false, attrs) {
            Ok(r) => r,
            Err(IpvsError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut found = expect_cmd(&ctx, &replies, cmd::NEW_SERVICE)?;
        found.next().map(|m| service_of(&ctx, m)).transpose()
    }

    /// The real servers of service `key` (dump). [`IpvsError::NotFound`] if there is no such
    /// service (the kernel answers that dump with nothing; an empty answer is double-checked).
    pub fn destinations(&mut self, key: &ServiceKey) -> Result<Vec<Destination>, IpvsError> {
        let ctx = Ctx::new("listing real servers of", cmd::GET_DEST).service(key);
        let attrs = vec![wire::service_key_attr(key).map_err(|e| ctx.invalid(e))?];
        let replies = self.request(&ctx, true, attrs)?;
        let dests = expect_cmd(&ctx, &replies, cmd::NEW_DEST)?
            .map(|m| {
                wire::top_level(m.attrs(), wire::cmd_attr::DEST)
                    .ok_or_else(|| "NEW_DEST without IPVS_CMD_ATTR_DEST".to_string())
                    .and_then(|b| wire::parse_destination(b, key.family()))
                    .map_err(|e| ctx.netlink(e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if dests.is_empty() && self.service(key)?.is_none() {
            return Err(IpvsError::NotFound {
                what: ctx.service_name(),
            });
        }
        Ok(dests)
    }

    /// Adds service `s` (its `stats` are ignored). [`IpvsError::Exists`] if it is there already.
    pub fn add_service(&mut self, s: &Service) -> Result<(), IpvsError> {
        self.write_service("adding", cmd::NEW_SERVICE, s)
    }

    /// Changes scheduler, flags, timeout and netmask of the existing service `s.key`.
    pub fn edit_service(&mut self, s: &Service) -> Result<(), IpvsError> {
        self.write_service("editing", cmd::SET_SERVICE, s)
    }

    fn write_service(&mut self, verb: &'static str, cmd: u8, s: &Service) -> Result<(), IpvsError> {
        let mut ctx = Ctx::new(verb, cmd).service(&s.key);
        ctx.scheduler = Some(&s.scheduler);
        if s.key.family() == Family::V6 && !(1..=128).contains(&s.netmask) {
            return Err(ctx.invalid(format!(
                "IPv6 netmask must be a prefix length from 1 to 128, not {}",
                s.netmask
            )));
        }
        let attrs = vec![wire::service_attr(s).map_err(|e| ctx.invalid(e))?];
        self.request(&ctx, false, attrs).map(drop)
    }

    /// Deletes service `key` with its real servers.
    pub fn del_service(&mut self, key: &ServiceKey) -> Result<(), IpvsError> {
        let ctx = Ctx::new("deleting", cmd::DEL_SERVICE).service(key);
        let attrs = vec![wire::service_key_attr(key).map_err(|e| ctx.invalid(e))?];
        self.request(&ctx, false, attrs).map(drop)
    }

    /// Adds real server `d` to service `key` (counters in `d` are ignored).
    pub fn add_destination(&mut self, key: &ServiceKey, d: &Destination) -> Result<(), IpvsError> {
        self.write_destination("adding", cmd::NEW_DEST, key, d)
    }

    /// Changes forwarding, weight and thresholds of real server `d.addr:d.port` of `key`.
    pub fn edit_destination(&mut self, key: &ServiceKey, d: &Destination) -> Result<(), IpvsError> {
        self.write_destination("editing", cmd::SET_DEST, key, d)
    }

    fn write_destination(
        &mut self,
        verb: &'static str,
        cmd: u8,
        key: &ServiceKey,
        d: &Destination,
    ) -> Result<(), IpvsError> {
        let ctx = Ctx::new(verb, cmd).service(key).dest(d.addr, d.port);
        let attrs = vec![
            wire::service_key_attr(key).map_err(|e| ctx.invalid(e))?,
            wire::dest_attr(d).map_err(|e| ctx.invalid(e))?,
        ];
        self.request(&ctx, false, attrs).map(drop)
    }

    /// Removes real server `addr:port` from service `key`.
    pub fn del_destination(
        &mut self,
        key: &ServiceKey,
        addr: IpAddr,
        port: u16,
    ) -> Result<(), IpvsError> {
        let ctx = Ctx::new("deleting", cmd::DEL_DEST)
            .service(key)
            .dest(addr, port);
        let attrs = vec![
            wire::service_key_attr(key).map_err(|e| ctx.invalid(e))?,
            wire::dest_key_attr(addr, port).map_err(|e| ctx.invalid(e))?,
        ];
        self.request(&ctx, false, attrs).map(drop)
    }

    /// Zeroes the counters of service `key` and its real servers, or of everything (`None`).
    pub fn zero(&mut self, key: Option<&ServiceKey>) -> Result<(), IpvsError> {
        let mut ctx = Ctx::new("zeroing counters of", cmd::ZERO);
        let mut attrs = Vec::new();
        if let Some(key) = key {
            ctx = ctx.service(key);
            attrs.push(wire::service_key_attr(key).map_err(|e| ctx.invalid(e))?);
        } else {
            ctx.verb = "zeroing all counters";
        }
        self.request(&ctx, false, attrs).map(drop)
    }

    /// Deletes every service of this network namespace.
    pub fn flush(&mut self) -> Result<(), IpvsError> {
        let ctx = Ctx::new("flushing all virtual services", cmd::FLUSH);
        self.request(&ctx, false, vec![]).map(drop)
    }

    /// Sends an IPVS command and collects its replies, turning failures into typed errors.
    fn request(
        &mut self,
        ctx: &Ctx<'_>,
        dump: bool,
        attrs: Vec<Nlattr<u16, Buffer>>,
    ) -> Result<Vec<GenlMsg>, IpvsError> {
        self.transact(self.family, ctx.cmd, wire::IPVS_GENL_VERSION, dump, attrs)
            .map_err(|f| match f {
                Failure::Errno(e) => ctx.errno(e),
                Failure::Netlink(d) => ctx.netlink(d),
            })
    }

    /// Sends one generic netlink request (`NLM_F_REQUEST | NLM_F_ACK`, plus `NLM_F_DUMP`) and
    /// reads until its ACK, error or `NLMSG_DONE`, returning the generic netlink messages that
    /// answered it.
    fn transact(
        &mut self,
        nl_type: u16,
        cmd: u8,
        version: u8,
        dump: bool,
        attrs: Vec<Nlattr<u16, Buffer>>,
    ) -> Result<Vec<GenlMsg>, Failure> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let genl = GenlmsghdrBuilder::<u8, u16>::default()
            .cmd(cmd)
            .version(version)
            .attrs(attrs.into_iter().collect::<GenlBuffer<u16, Buffer>>())
            .build()
            .map_err(|e| Failure::Netlink(format!("building the request: {e}")))?;
        let mut flags = NlmF::REQUEST | NlmF::ACK;
        if dump {
            flags |= NlmF::DUMP;
        }
        let msg = NlmsghdrBuilder::default()
            .nl_type(nl_type)
            .nl_flags(flags)
            .nl_seq(seq)
            .nl_payload(NlPayload::Payload(genl))
            .build()
            .map_err(|e| Failure::Netlink(format!("building the request: {e}")))?;
        self.socket
            .send(&msg)
            .map_err(|e| Failure::Netlink(format!("send: {e}")))?;
        let mut replies = Vec::new();
        loop {
            let (msgs, _) = self
                .socket
                .recv::<u16, Buffer>()
                .map_err(|e| Failure::Netlink(format!("receive: {e}")))?;
            for msg in msgs {
                let msg = msg.map_err(|e| Failure::Netlink(format!("malformed reply: {e}")))?;
                if *msg.nl_seq() != seq {
                    // Left over from an earlier request that failed half-way.
                    continue;
                }
                match msg.nl_payload() {
                    NlPayload::Payload(buf) => {
                        if *msg.nl_type() != nl_type {
                            return Err(Failure::Netlink(format!(
                                "reply of netlink type {} to a request of type {nl_type}",
                                msg.nl_type()
                            )));
                        }
                        let bytes: &[u8] = buf.as_ref();
                        let genl = GenlMsg::from_bytes_with_input(
                            &mut std::io::Cursor::new(bytes),
                            bytes.len(),
                        )
                        .map_err(|e| Failure::Netlink(format!("malformed reply: {e}")))?;
                        replies.push(genl);
                    }
                    NlPayload::Err(err) => return Err(Failure::Errno(-*err.error())),
                    NlPayload::DumpExtAck(done) if *done.error() != 0 => {
                        return Err(Failure::Errno(-*done.error()))
                    }
                    NlPayload::Ack(_) | NlPayload::DumpExtAck(_) | NlPayload::Empty => {
                        return Ok(replies)
                    }
                }
            }
        }
    }
}

/// The replies with command `want`; any other command is a protocol error.
fn expect_cmd<'m>(
    ctx: &Ctx<'_>,
    replies: &'m [GenlMsg],
    want: u8,
) -> Result<impl Iterator<Item = &'m GenlMsg>, IpvsError> {
    if let Some(other) = replies.iter().find(|m| *m.cmd() != want) {
        return Err(ctx.netlink(format!(
            "reply with command {} ({}), expected {} ({want})",
            cmd::name(*other.cmd()),
            other.cmd(),
            cmd::name(want),
        )));
    }
    Ok(replies.iter())
}

fn service_of(ctx: &Ctx<'_>, m: &GenlMsg) -> Result<Service, IpvsError> {
    wire::top_level(m.attrs(), wire::cmd_attr::SERVICE)
        .ok_or_else(|| "NEW_SERVICE without IPVS_CMD_ATTR_SERVICE".to_string())
        .and_then(wire::parse_service)
        .map_err(|e| ctx.netlink(e))
}

fn set_recv_timeout(socket: &NlSocketHandle, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as _,
        tv_usec: timeout.subsec_micros() as _,
    };
    // SAFETY: a valid socket fd and a timeval that outlives the call, with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_keys_display_like_ipvsadm() {
        let tcp = ServiceKey::Inet {
            addr: "10.0.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        };
        assert_eq!(tcp.to_string(), "TCP  10.0.0.1:80");
        let udp6 = ServiceKey::Inet {
            addr: "2001:db8::1".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 53,
        };
        assert_eq!(udp6.to_string(), "UDP  [2001:db8::1]:53");
        let sctp = ServiceKey::Inet {
            addr: "192.0.2.1".parse().unwrap(),
            protocol: Protocol::Sctp,
            port: 9,
        };
        assert_eq!(sctp.to_string(), "SCTP 192.0.2.1:9");
        assert_eq!(
            ServiceKey::Fwmark {
                family: Family::V4,
                mark: 5
            }
            .to_string(),
            "FWM  5"
        );
        assert_eq!(
            ServiceKey::Fwmark {
                family: Family::V6,
                mark: 5
            }
            .to_string(),
            "FWM  5 IPv6"
        );
    }

    #[test]
    fn errors_name_the_object() {
        let key = ServiceKey::Inet {
            addr: "10.0.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        };
        let ctx = Ctx::new("adding", cmd::NEW_SERVICE).service(&key);
        assert_eq!(
            ctx.errno(libc::EEXIST).to_string(),
            "virtual service TCP  10.0.0.1:80 already exists"
        );
        let e = ctx.errno(libc::EPERM);
        assert!(matches!(e, IpvsError::Permission { .. }));
        assert_eq!(
            e.to_string(),
            "adding virtual service TCP  10.0.0.1:80 (IPVS_CMD_NEW_SERVICE): permission denied \
             (IPVS needs CAP_NET_ADMIN)"
        );
        let mut ctx = Ctx::new("adding", cmd::NEW_SERVICE).service(&key);
        ctx.scheduler = Some("nope");
        assert_eq!(
            ctx.errno(libc::ENOENT).to_string(),
            "scheduler \"nope\" for virtual service TCP  10.0.0.1:80 (no kernel module \
             ip_vs_nope) does not exist"
        );
        let ctx = Ctx::new("deleting", cmd::DEL_DEST)
            .service(&key)
            .dest("10.0.0.2".parse().unwrap(), 8080);
        assert_eq!(
            ctx.errno(libc::ENOENT).to_string(),
            "real server 10.0.0.2:8080 of virtual service TCP  10.0.0.1:80 does not exist"
        );
        assert_eq!(
            ctx.errno(libc::ESRCH).to_string(),
            "virtual service TCP  10.0.0.1:80 does not exist"
        );
        let e = ctx.errno(libc::EINVAL);
        assert!(
            matches!(&e, IpvsError::Kernel { source, .. } if source.raw_os_error() == Some(libc::EINVAL))
        );
    }
}
