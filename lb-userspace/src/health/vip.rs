//! `via = "vip"`: a check along the DSR path (Seesaw calls it a DSR health check).
//!
//! A DSR real server must (1) accept packets addressed to the VIP, which it holds on a loopback
//! interface, and (2) never answer ARP for the VIP (`arp_ignore=1`, `arp_announce=2`), or clients
//! and routers learn its MAC instead of the director's. A check of the real server's own address
//! passes when either is broken. This one goes the way client traffic goes:
//!
//! - A TCP SYN addressed to `VIP:port`, from the director's own address, in an Ethernet frame to
//!   the real server's MAC, is written to an `AF_PACKET` socket on the interface the real server
//!   is reached through (exactly what the fast path's `XDP_TX`/`XDP_REDIRECT` produces). The real
//!   server answers from the VIP to the director's address: a SYN-ACK passes
//!   (`SYN-ACK from VIP 10.0.0.100:80`), a RST fails (`connection refused by VIP 10.0.0.100:80`),
//!   silence fails (`timeout after 500ms (no answer from the VIP: is it on the real server's
//!   loopback?)`). After a SYN-ACK the director resets the half-open connection.
//! - For an IPv4 VIP, an ARP request "who has VIP" goes unicast to the real server's MAC first.
//!   A real server that answers it fails the check (`real server answers ARP for VIP 10.0.0.100:
//!   set arp_ignore=1 and arp_announce=2`), as does one seen sending ARP with the VIP as its
//!   sender address (what `arp_announce=0` does).
//!
//! The source port is reserved by binding an ordinary TCP socket to it (never listening), so the
//! kernel hands it to nobody else while the probe runs. Replies are read from one `AF_PACKET`
//! socket per interface (and network namespace), shared by all probes: a reader thread passes
//! each reply to the probe waiting for it. A socket filter keeps that socket to ARP and to TCP
//! SYN-ACKs and RSTs, so client traffic the kernel sees (IPVS mode) is not copied to it. The director's kernel never completes these
//! handshakes (a SYN-ACK from its own VIP is a martian to it; without the VIP it answers RST).
//! Nothing here depends on the XDP program, so IPVS mode can use it unchanged. In XDP mode the
//! replies are addressed to the director, not to a VIP: the program passes them to the kernel,
//! where the packet socket sees them.
//!
//! Needs `CAP_NET_RAW`. An `http` check through the VIP would need a TCP stack on the raw socket
//! (or a marked socket routed by policy); not done: `via = "vip"` is refused for other kinds.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::check::{fail, io_failed, io_reason, pass, Attempt, VipPath};
use super::config::format_duration;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
/// How long a reader thread with nobody waiting lives on.
const READER_IDLE: Duration = Duration::from_secs(30);

/// What came back for a SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpReply {
    SynAck { ack: u32 },
    Rst,
}

/// (remote address, remote port, local port) of an expected TCP reply.
type TcpKey = (IpAddr, u16, u16);

#[derive(Default)]
struct Waiters {
    /// Probes waiting for the answer to their SYN, which carried the sequence number given.
    tcp: HashMap<TcpKey, (u32, oneshot::Sender<TcpReply>)>,
    /// ARP watches by (VIP, real server MAC): set when that MAC claims the VIP. One per probe:
    /// two virtual servers of one VIP (ports 80 and 443) can probe one real server at once.
    arp: HashMap<(Ipv4Addr, [u8; 6]), Vec<ArpWatch>>,
}

type ArpWatch = Arc<std::sync::atomic::AtomicBool>;

impl Waiters {
    fn watch_arp(&mut self, key: (Ipv4Addr, [u8; 6]), flag: &ArpWatch) {
        self.arp.entry(key).or_default().push(flag.clone());
    }

    /// Removes `flag`'s watch only: another probe's on the same key stays.
    fn unwatch_arp(&mut self, key: (Ipv4Addr, [u8; 6]), flag: &ArpWatch) {
        if let Some(flags) = self.arp.get_mut(&key) {
            flags.retain(|f| !Arc::ptr_eq(f, flag));
            if flags.is_empty() {
                self.arp.remove(&key);
            }
        }
    }
}

/// One `AF_PACKET` socket on one interface of one network namespace.
struct Link {
    fd: OwnedFd,
    ifindex: u32,
    waiters: Mutex<Waiters>,
}

type LinkKey = (u64, u32);

fn links() -> &'static Mutex<HashMap<LinkKey, Arc<Link>>> {
    static LINKS: OnceLock<Mutex<HashMap<LinkKey, Arc<Link>>>> = OnceLock::new();
    LINKS.get_or_init(Default::default)
}

/// The calling thread's network namespace (its inode number).
fn netns_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0)
}

impl Link {
    /// The shared socket of `ifindex` in the calling thread's namespace; opened (with its reader
    /// thread) on first use.
    fn get(ifindex: u32) -> io::Result<Arc<Link>> {
        let key = (netns_id(), ifindex);
        let mut all = links().lock().expect("links lock");
        if let Some(link) = all.get(&key) {
            return Ok(link.clone());
        }
        let link = Arc::new(Link::open(ifindex)?);
        all.insert(key, link.clone());
        let reader = link.clone();
        std::thread::Builder::new()
            .name(format!("lbd-vip-probe-{ifindex}"))
            .spawn(move || reader.read_loop(key))?;
        Ok(link)
    }

    fn open(ifindex: u32) -> io::Result<Link> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = sockaddr_ll(ifindex, ETH_P_ALL, None);
        // SAFETY: `addr` is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        attach_filter(&fd)?;
        // Wake up once a second to notice idleness.
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Link {
            fd,
            ifindex,
            waiters: Mutex::new(Waiters::default()),
        })
    }

    fn send(&self, frame: &[u8], dst_mac: [u8; 6]) -> io::Result<()> {
        let protocol = u16::from_be_bytes([frame[12], frame[13]]);
        let addr = sockaddr_ll(self.ifindex, protocol, Some(dst_mac));
        // SAFETY: `frame` and `addr` are valid for the given lengths.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn read_loop(self: Arc<Self>, key: LinkKey) {
        let mut buf = vec![0u8; 65536];
        let mut idle_since = Instant::now();
        loop {
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `buf` and `from` are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n >= 0 && from.sll_pkttype != libc::PACKET_OUTGOING {
                self.dispatch(&buf[..n as usize]);
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) {
                    // The interface is gone (ENETDOWN, ENXIO): forget this socket.
                    let mut all = links().lock().expect("links lock");
                    all.remove(&key);
                    return;
                }
            }
            let busy = {
                let w = self.waiters.lock().expect("waiters lock");
                !w.tcp.is_empty() || !w.arp.is_empty()
            };
            if busy {
                idle_since = Instant::now();
            } else if idle_since.elapsed() > READER_IDLE {
                let mut all = links().lock().expect("links lock");
                // Only the registry and this thread hold it: nobody can start waiting now.
                if Arc::strong_count(&self) == 2 {
                    all.remove(&key);
                    return;
                }
            }
        }
    }

    fn dispatch(&self, frame: &[u8]) {
        dispatch(&self.waiters, frame)
    }
}

/// Hands a frame read from the packet socket to the probe waiting for it, if any.
fn dispatch(waiters: &Mutex<Waiters>, frame: &[u8]) {
    if frame.len() < 14 {
        return;
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype == ETH_P_ARP {
        if let Some((sender_mac, sender_ip)) = arp_sender(&frame[14..]) {
            let w = waiters.lock().expect("waiters lock");
            for flag in w.arp.get(&(sender_ip, sender_mac)).into_iter().flatten() {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        return;
    }
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return;
    }
    let Ok(packet) = etherparse::SlicedPacket::from_ethernet(frame) else {
        return;
    };
    let src = match &packet.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => IpAddr::V4(ip.header().source_addr()),
        Some(etherparse::NetSlice::Ipv6(ip)) => IpAddr::V6(ip.header().source_addr()),
        _ => return,
    };
    let Some(etherparse::TransportSlice::Tcp(tcp)) = &packet.transport else {
        return;
    };
    let reply = if tcp.rst() {
        TcpReply::Rst
    } else if tcp.syn() && tcp.ack() {
        TcpReply::SynAck {
            ack: tcp.acknowledgment_number(),
        }
    } else {
        return;
    };
    let key = (src, tcp.source_port(), tcp.destination_port());
    let mut w = waiters.lock().expect("waiters lock");
    // Only the answer to the probe's own SYN: it acknowledges that SYN's sequence number (a
    // RST without ACK names none). Another segment of the same ports, say of an earlier
    // probe's connection, is not taken for it.
    let Some(&(seq, _)) = w.tcp.get(&key) else { return };
    if tcp.ack() && tcp.acknowledgment_number() != seq.wrapping_add(1) {
        return;
    }
    if let Some((_, tx)) = w.tcp.remove(&key) {
        let _ = tx.send(reply);
    }
}

/// Keeps the socket to what a probe can wait for: ARP, and TCP segments with RST, or with SYN
/// and ACK, over IPv4 (not fragments) or IPv6 (TCP right after the fixed header). Without it,
/// every packet the kernel sees on the interface (all client traffic in IPVS mode) would be
/// copied to the reader.
fn attach_filter(fd: &OwnedFd) -> io::Result<()> {
    const fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter { code, jt, jf, k }
    }
    const LDH: u16 = 0x28; // ld half [k]
    const LDB: u16 = 0x30; // ld byte [k]
    const LDXB_MSH: u16 = 0xb1; // x = 4 * ([k] & 0xf)
    const LDB_IND: u16 = 0x50; // ld byte [x + k]
    const JEQ: u16 = 0x15;
    const JSET: u16 = 0x45;
    const JA: u16 = 0x05;
    const AND: u16 = 0x54;
    const RET: u16 = 0x06;
    let program = [
        /* 0 */ op(LDH, 0, 0, 12), // ethertype
        /* 1 */ op(JEQ, 15, 0, 0x0806), // ARP: accept
        /* 2 */ op(JEQ, 0, 7, 0x0800), // else IPv6 at 10
        /* 3 */ op(LDB, 0, 0, 23), // IPv4 protocol
        /* 4 */ op(JEQ, 0, 13, 6), // not TCP: drop
        /* 5 */ op(LDH, 0, 0, 20), // flags and fragment offset
        /* 6 */ op(JSET, 11, 0, 0x1fff), // a later fragment: drop
        /* 7 */ op(LDXB_MSH, 0, 0, 14), // IPv4 header length
        /* 8 */ op(LDB_IND, 0, 0, 14 + 13), // TCP flags
        /* 9 */ op(JA, 0, 0, 4), // to 14
        /* 10 */ op(JEQ, 0, 7, 0x86dd), // not IPv6: drop
        /* 11 */ op(LDB, 0, 0, 14 + 6), // next header
        /* 12 */ op(JEQ, 0, 5, 6), // not TCP: drop
        /* 13 */ op(LDB, 0, 0, 14 + 40 + 13), // TCP flags
        /* 14 */ op(JSET, 2, 0, 0x04), // RST: accept
        /* 15 */ op(AND, 0, 0, 0x12),
        /* 16 */ op(JEQ, 0, 1, 0x12), // SYN+ACK: accept, else drop
        /* 17 */ op(RET, 0, 0, 0x40000),
        /* 18 */ op(RET, 0, 0, 0),
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `program`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr_ll(ifindex: u32, protocol: u16, mac: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = ifindex as i32;
    if let Some(mac) = mac {
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&mac);
    }
    addr
}

/// Sender MAC and IPv4 address of an ARP packet (request or reply) for IPv4 over Ethernet.
fn arp_sender(arp: &[u8]) -> Option<([u8; 6], Ipv4Addr)> {
    if arp.len() < 28 || arp[0..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    let mac = arp[8..14].try_into().ok()?;
    let ip = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    Some((mac, ip))
}

/// An ARP request "who has `target` tell `sender_ip`", unicast to `dst_mac`.
fn arp_request(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target: Ipv4Addr,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]); // Ethernet, IPv4, request
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// A TCP segment from `src` to `dst` in an Ethernet frame; `syn` or a RST with `seq`.
fn tcp_frame(
    path: &VipPath,
    dst_mac: [u8; 6],
    src: SocketAddr,
    dst: SocketAddr,
    seq: u32,
    syn: bool,
) -> io::Result<Vec<u8>> {
    let eth = etherparse::PacketBuilder::ethernet2(path.src_mac, dst_mac);
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "address families differ",
            ))
        }
    };
    let tcp = ip.tcp(src.port(), dst.port(), seq, 64240);
    let tcp = if syn { tcp.syn() } else { tcp.rst() };
    let mut frame = Vec::with_capacity(tcp.size(0));
    tcp.write(&mut frame, &[])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(frame)
}

/// The director's address the kernel would use towards `dest`.
fn source_towards(dest: IpAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = match dest {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect((dest, 9))?;
    Ok(socket.local_addr()?.ip())
}

/// Binds a TCP socket to `addr:0` (no listen) so the kernel lends its port to nobody else.
fn reserve_port(addr: IpAddr) -> io::Result<(std::net::TcpListener, u16)> {
    // A listener would accept connections; a bound socket is what we want, and std has none:
    // bind through socket(2) and keep it as a TcpListener that never listens.
    let domain = match addr {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2); owned right away.
    let raw = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sa = nix::sys::socket::SockaddrStorage::from(SocketAddr::new(addr, 0));
    nix::sys::socket::bind(fd.as_raw_fd(), &sa).map_err(io::Error::from)?;
    let bound: nix::sys::socket::SockaddrStorage =
        nix::sys::socket::getsockname(fd.as_raw_fd()).map_err(io::Error::from)?;
    let port = bound
        .as_sockaddr_in()
        .map(|s| s.port())
        .or_else(|| bound.as_sockaddr_in6().map(|s| s.port()))
        .unwrap_or(0);
    Ok((std::net::TcpListener::from(fd), port))
}

/// Removes a probe's waiters however it ends.
struct Registration<'a> {
    link: &'a Link,
    tcp: TcpKey,
    arp: Option<((Ipv4Addr, [u8; 6]), ArpWatch)>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut w = self.link.waiters.lock().expect("waiters lock");
        w.tcp.remove(&self.tcp);
        if let Some((k, flag)) = &self.arp {
            w.unwatch_arp(*k, flag);
        }
    }
}

/// A TCP handshake with `VIP:port` through the real server's MAC (see the module docs).
/// `real_addr` is the real server's own address, used to find the director's source address.
pub(super) async fn syn_probe(
    real_addr: IpAddr,
    source: Option<IpAddr>,
    path: &VipPath,
    port: u16,
    timeout: Duration,
) -> Attempt {
    let vip = SocketAddr::new(path.vip, port);
    let Some(dst_mac) = path.dst_mac else {
        return fail("real server MAC unresolved: cannot send through the VIP");
    };
    let src_ip = match source.filter(|s| s.is_ipv4() == path.vip.is_ipv4()) {
        Some(a) => a,
        None => {
            let towards = if real_addr.is_ipv4() == path.vip.is_ipv4() {
                real_addr
            } else {
                path.vip
            };
            match source_towards(towards) {
                Ok(a) => a,
                Err(e) => {
                    return io_failed(&e, format!(
                        "no source address towards {towards}: {}",
                        io_reason(&e)
                    ))
                }
            }
        }
    };
    if src_ip.is_ipv4() != path.vip.is_ipv4() {
        return fail(format!(
            "no {} source address to reach VIP {}",
            if path.vip.is_ipv4() { "IPv4" } else { "IPv6" },
            path.vip
        ));
    }
    if src_ip == path.vip {
        return fail(format!(
            "the director's source address towards {real_addr} is the VIP itself: set the source address, \
             or add the VIP with preferred_lft 0"
        ));
    }
    let (_reservation, src_port) = match reserve_port(src_ip) {
        Ok(r) => r,
        Err(e) => {
            return io_failed(&e, format!(
                "cannot reserve a source port on {src_ip}: {}",
                io_reason(&e)
            ))
        }
    };
    let src = SocketAddr::new(src_ip, src_port);
    let link = match Link::get(path.ifindex) {
        Ok(l) => l,
        Err(e) => {
            return io_failed(&e, format!(
                "cannot open a packet socket on interface {}: {}",
                path.ifindex,
                io_reason(&e)
            ))
        }
    };

    let (tx, rx) = oneshot::channel();
    let seq = fastrand::u32(..);
    let tcp_key = (path.vip, port, src_port);
    let claims_vip = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let arp_key = match (path.vip, src_ip) {
        (IpAddr::V4(v), IpAddr::V4(_)) => Some((v, dst_mac)),
        _ => None,
    };
    {
        let mut w = link.waiters.lock().expect("waiters lock");
        w.tcp.insert(tcp_key, (seq, tx));
        if let Some(k) = arp_key {
            w.watch_arp(k, &claims_vip);
        }
    }
    let _registration = Registration {
        link: &link,
        tcp: tcp_key,
        arp: arp_key.map(|k| (k, claims_vip.clone())),
    };

    if let (Some((vip4, _)), IpAddr::V4(src4)) = (arp_key, src_ip) {
        if let Err(e) = link.send(&arp_request(path.src_mac, dst_mac, src4, vip4), dst_mac) {
            return fail(format!("sending an ARP probe: {}", io_reason(&e)));
        }
    }
    let start = Instant::now();
    let syn = match tcp_frame(path, dst_mac, src, vip, seq, true) {
        Ok(f) => f,
        Err(e) => return fail(format!("building the SYN: {e}")),
    };
    if let Err(e) = link.send(&syn, dst_mac) {
        return fail(format!("sending the SYN: {}", io_reason(&e)));
    }
    let reply = tokio::time::timeout(timeout, rx).await;
    let rtt = start.elapsed();
    let outcome = match reply {
        Ok(Ok(TcpReply::SynAck { ack })) => {
            if let Ok(rst) = tcp_frame(path, dst_mac, src, vip, ack, false) {
                let _ = link.send(&rst, dst_mac);
            }
            pass(format!("SYN-ACK from VIP {vip}"))
        }
        Ok(Ok(TcpReply::Rst)) => fail(format!("connection refused by VIP {vip}")),
        Ok(Err(_)) => fail("packet socket closed"),
        Err(_) => fail(format!(
            "timeout after {} (no answer from the VIP: is it on the real server's loopback?)",
            format_duration(timeout)
        )),
    };
    // An ARP answer left before the SYN-ACK; give it the round trip again to arrive.
    if arp_key.is_some() && outcome.ok && !claims_vip.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(rtt.clamp(Duration::from_millis(2), Duration::from_millis(50))).await;
    }
    if claims_vip.load(std::sync::atomic::Ordering::SeqCst) {
        return fail(format!(
            "real server answers ARP for VIP {}: set arp_ignore=1 and arp_announce=2",
            path.vip
        ));
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames() {
        let path = VipPath {
            vip: "10.0.0.100".parse().unwrap(),
            ifindex: 1,
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: Some([2, 0, 0, 0, 0, 2]),
        };
        let src: SocketAddr = "10.0.0.10:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.100:80".parse().unwrap();
        let f = tcp_frame(&path, [2, 0, 0, 0, 0, 2], src, dst, 7, true).unwrap();
        let p = etherparse::SlicedPacket::from_ethernet(&f).unwrap();
        let Some(etherparse::TransportSlice::Tcp(tcp)) = p.transport else {
            panic!()
        };
        assert!(tcp.syn() && !tcp.ack());
        assert_eq!(
            (
                tcp.source_port(),
                tcp.destination_port(),
                tcp.sequence_number()
            ),
            (40000, 80, 7)
        );
        assert_eq!(&f[..6], &[2, 0, 0, 0, 0, 2]);

        let arp = arp_request(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            Ipv4Addr::new(10, 0, 0, 10),
            Ipv4Addr::new(10, 0, 0, 100),
        );
        assert_eq!(arp.len(), 42);
        assert_eq!(
            arp_sender(&arp[14..]),
            Some(([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 0, 0, 10)))
        );
    }

    /// A SYN-ACK is the probe's answer only if it acknowledges the probe's SYN.
    #[test]
    fn only_the_answer_to_the_probes_own_syn_counts() {
        let vip: IpAddr = "10.0.0.100".parse().unwrap();
        let waiters = Mutex::new(Waiters::default());
        let (tx, mut rx) = oneshot::channel();
        waiters.lock().unwrap().tcp.insert((vip, 80, 40000), (7, tx));
        let reply = |ack: u32, rst: bool| {
            let tcp = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
                .ipv4([10, 0, 0, 100], [10, 0, 0, 10], 64)
                .tcp(80, 40000, 1000, 64240);
            let tcp = if rst { tcp.rst().ack(ack) } else { tcp.syn().ack(ack) };
            let mut frame = Vec::new();
            tcp.write(&mut frame, &[]).unwrap();
            frame
        };
        dispatch(&waiters, &reply(1234, false));
        dispatch(&waiters, &reply(1234, true));
        assert!(rx.try_recv().is_err(), "a segment acknowledging another SYN was taken for the answer");
        dispatch(&waiters, &reply(8, false));
        assert_eq!(rx.try_recv().unwrap(), TcpReply::SynAck { ack: 8 });
        assert!(waiters.lock().unwrap().tcp.is_empty());
    }

    /// Two probes of one real server through one VIP (the VIP's port 80 and 443 virtual servers)
    /// at once: the one that ends first leaves the other's ARP watch in place, so a real server
    /// that claims the VIP is caught by both. Before, the second watch replaced the first, and
    /// the first probe's end removed the second's.
    #[test]
    fn overlapping_probes_each_keep_their_arp_watch() {
        let (vip, rs_mac) = (Ipv4Addr::new(10, 0, 0, 100), [2, 0, 0, 0, 0, 2]);
        let waiters = Mutex::new(Waiters::default());
        let (first, second) = (ArpWatch::default(), ArpWatch::default());
        waiters.lock().unwrap().watch_arp((vip, rs_mac), &first);
        waiters.lock().unwrap().watch_arp((vip, rs_mac), &second);
        waiters.lock().unwrap().unwatch_arp((vip, rs_mac), &first);
        // The real server answers ARP for the VIP (sender = VIP, its own MAC).
        dispatch(&waiters, &arp_request(rs_mac, [2, 0, 0, 0, 0, 1], vip, Ipv4Addr::new(10, 0, 0, 10)));
        assert!(second.load(std::sync::atomic::Ordering::SeqCst), "the running probe missed the claim");
        assert!(!first.load(std::sync::atomic::Ordering::SeqCst));
        waiters.lock().unwrap().unwatch_arp((vip, rs_mac), &second);
        assert!(waiters.lock().unwrap().arp.is_empty());
    }
}
