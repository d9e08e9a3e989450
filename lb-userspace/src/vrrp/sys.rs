//! The sockets and interface queries VRRP needs, over libc: raw IP sockets for protocol 112,
//! `AF_PACKET` sockets for ARP and neighbour discovery, and interface flags/MAC/addresses.
//!
//! Every socket belongs to the network namespace of the thread that creates it, so the
//! runtime creates them all in [`super::VrrpHandle::start`].

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use tracing::debug;

use super::packet::{IPPROTO_VRRP, TOS_NETWORK_CONTROL};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of the given size.
    cvt(unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), size_of::<T>() as libc::socklen_t) }).map(drop)
}

fn socket(domain: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is a new descriptor we own.
    let fd = cvt(unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: fd was just returned by socket().
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind_to_device(fd: RawFd, ifname: &str) -> io::Result<()> {
    // SAFETY: the name buffer is valid for its length.
    cvt(unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_BINDTODEVICE, ifname.as_ptr().cast(), ifname.len() as libc::socklen_t) })
        .map(drop)
}

fn in_addr(a: Ipv4Addr) -> libc::in_addr {
    libc::in_addr { s_addr: u32::from_ne_bytes(a.octets()) }
}

fn in6_addr(a: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr { s6_addr: a.octets() }
}

/// The raw IPv4 socket for VRRP on `ifname`: we write the IP header (`IP_HDRINCL`); receives
/// every protocol-112 packet arriving on the interface, IP header included.
pub fn vrrp_socket_v4(ifname: &str, ifindex: u32) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_INET, libc::c_int::from(IPPROTO_VRRP))?;
    let raw = fd.as_raw_fd();
    setsockopt(raw, libc::IPPROTO_IP, libc::IP_HDRINCL, &1 as &libc::c_int)?;
    bind_to_device(raw, ifname)?;
    setsockopt(raw, libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP, &0 as &libc::c_int)?;
    let mreq = libc::ip_mreqn {
        imr_multiaddr: in_addr(Ipv4Addr::UNSPECIFIED),
        imr_address: in_addr(Ipv4Addr::UNSPECIFIED),
        imr_ifindex: ifindex as i32,
    };
    setsockopt(raw, libc::IPPROTO_IP, libc::IP_MULTICAST_IF, &mreq)?;
    Ok(fd)
}

/// Joins IPv4 group `group` on `ifindex`.
pub fn join_v4(fd: &OwnedFd, group: Ipv4Addr, ifindex: u32) -> io::Result<()> {
    let mreq = libc::ip_mreqn { imr_multiaddr: in_addr(group), imr_address: in_addr(Ipv4Addr::UNSPECIFIED), imr_ifindex: ifindex as i32 };
    setsockopt(fd.as_raw_fd(), libc::IPPROTO_IP, libc::IP_ADD_MEMBERSHIP, &mreq)
}

/// The raw IPv6 socket for VRRP on `ifname` (hop limit 255, traffic class 0xc0; receives hop
/// limit and destination as control messages).
pub fn vrrp_socket_v6(ifname: &str, ifindex: u32) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_INET6, libc::c_int::from(IPPROTO_VRRP))?;
    let raw = fd.as_raw_fd();
    bind_to_device(raw, ifname)?;
    let one: libc::c_int = 1;
    let hops: libc::c_int = 255;
    setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, &hops)?;
    setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &hops)?;
    setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP, &0 as &libc::c_int)?;
    setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_IF, &(ifindex as libc::c_int))?;
    setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, &one)?;
    setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, &one)?;
    setsockopt(raw, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, &libc::c_int::from(TOS_NETWORK_CONTROL))?;
    Ok(fd)
}

/// Joins IPv6 group `group` on `ifindex` (the kernel sends the MLD report and lets the group's
/// frames through the interface's filter).
pub fn join_v6(fd: &OwnedFd, group: Ipv6Addr, ifindex: u32) -> io::Result<()> {
    let mreq = libc::ipv6_mreq { ipv6mr_multiaddr: in6_addr(group), ipv6mr_interface: ifindex };
    setsockopt(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_ADD_MEMBERSHIP, &mreq)
}

/// Sends a whole IPv4 packet (header included) to `dst`.
pub fn send_v4(fd: &OwnedFd, packet: &[u8], dst: Ipv4Addr) -> io::Result<()> {
    // SAFETY: zeroed sockaddr_in is valid; fields set below.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_addr = in_addr(dst);
    // SAFETY: buffer and address are valid for the given lengths.
    cvt_size(unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Sends a VRRP message over IPv6 from `src` (given as packet info) to `dst` on `ifindex`.
pub fn send_v6(fd: &OwnedFd, msg: &[u8], src: Ipv6Addr, dst: Ipv6Addr, ifindex: u32) -> io::Result<()> {
    // SAFETY: zeroed sockaddr_in6 is valid; fields set below.
    let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sa.sin6_addr = in6_addr(dst);
    sa.sin6_scope_id = ifindex;
    let info = libc::in6_pktinfo { ipi6_addr: in6_addr(src), ipi6_ifindex: ifindex };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec { iov_base: msg.as_ptr() as *mut _, iov_len: msg.len() };
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the sendmsg call.
    let mut mh: libc::msghdr = unsafe { zeroed() };
    mh.msg_name = (&mut sa as *mut libc::sockaddr_in6).cast();
    mh.msg_namelen = size_of::<libc::sockaddr_in6>() as u32;
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = space as _;
    // SAFETY: the control buffer has room for one in6_pktinfo message.
    unsafe {
        let cm = libc::CMSG_FIRSTHDR(&mh);
        (*cm).cmsg_level = libc::IPPROTO_IPV6;
        (*cm).cmsg_type = libc::IPV6_PKTINFO;
        (*cm).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<libc::in6_pktinfo>(), info);
    }
    // SAFETY: mh is fully initialised.
    cvt_size(unsafe { libc::sendmsg(fd.as_raw_fd(), &mh, 0) }).map(drop)
}

/// Receives one datagram/frame into `buf`.
pub fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of its length.
    cvt_size(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) })
}

/// What an IPv6 raw socket tells about a received message.
#[derive(Clone, Copy, Debug)]
pub struct RecvV6 {
    pub len: usize,
    pub src: Ipv6Addr,
    pub dst: Option<Ipv6Addr>,
    pub hop_limit: Option<u8>,
}

/// Receives one message on an IPv6 raw socket with its source, destination and hop limit.
pub fn recv_v6(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<RecvV6> {
    // SAFETY: zeroed sockaddr_in6/msghdr are valid; pointers outlive the call.
    let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
    let mut cbuf = [0u8; 128];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut mh: libc::msghdr = unsafe { zeroed() };
    mh.msg_name = (&mut sa as *mut libc::sockaddr_in6).cast();
    mh.msg_namelen = size_of::<libc::sockaddr_in6>() as u32;
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.as_mut_ptr().cast();
    mh.msg_controllen = cbuf.len() as _;
    // SAFETY: mh is fully initialised.
    let len = cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &mut mh, 0) })?;
    let mut out = RecvV6 { len, src: Ipv6Addr::from(sa.sin6_addr.s6_addr), dst: None, hop_limit: None };
    // SAFETY: walking the control messages the kernel wrote, within msg_controllen.
    unsafe {
        let mut cm = libc::CMSG_FIRSTHDR(&mh);
        while !cm.is_null() {
            if (*cm).cmsg_level == libc::IPPROTO_IPV6 {
                let data = libc::CMSG_DATA(cm);
                match (*cm).cmsg_type {
                    libc::IPV6_HOPLIMIT => out.hop_limit = Some(std::ptr::read_unaligned(data.cast::<libc::c_int>()) as u8),
                    libc::IPV6_PKTINFO => {
                        let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                        out.dst = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            cm = libc::CMSG_NXTHDR(&mh, cm);
        }
    }
    Ok(out)
}

/// An `AF_PACKET` socket on `ifindex` receiving frames of EtherType `proto` that arrive (and,
/// before Linux 4.20, the ones this host sends: see [`ignore_outgoing`]), and sending whole
/// frames there.
pub fn packet_socket(ifindex: u32, proto: u16) -> io::Result<OwnedFd> {
    let fd = socket(libc::AF_PACKET, libc::c_int::from(proto.to_be()))?;
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: the address is valid for its length.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), size_of::<libc::sockaddr_ll>() as u32) })?;
    let ignoring = ignore_outgoing(setsockopt(fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &1 as &libc::c_int))?;
    if !ignoring {
        debug!(ifindex, "PACKET_IGNORE_OUTGOING is not known to this kernel (before Linux 4.20): the ARP/NDP socket also reads the frames this host sends, and skips them by their source MAC");
    }
    Ok(fd)
}

/// The outcome of setting `PACKET_IGNORE_OUTGOING` (Linux 4.20 on): whether the socket now
/// ignores the frames this host sends. Older kernels answer `ENOPROTOOPT`, which is no error:
/// the socket then also reads those frames (our own gratuitous ARPs and replies, the kernel's
/// ARP requests and neighbour solicitations), which all carry the interface's MAC as their
/// source, and the ARP/NDP handlers skip every frame from that MAC before looking at it.
/// Any other error is one.
pub fn ignore_outgoing(set: io::Result<()>) -> io::Result<bool> {
    match set {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Attaches a classic BPF program (code, jt, jf, k) to a socket.
pub fn attach_filter(fd: &OwnedFd, prog: &[(u16, u8, u8, u32)]) -> io::Result<()> {
    let mut insns: Vec<libc::sock_filter> = prog.iter().map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k }).collect();
    let fprog = libc::sock_fprog { len: insns.len() as u16, filter: insns.as_mut_ptr() };
    setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
}

/// Sends a whole frame on a bound packet socket.
pub fn send(fd: &OwnedFd, frame: &[u8]) -> io::Result<()> {
    // SAFETY: the buffer is valid for its length.
    cvt_size(unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) }).map(drop)
}

/// A socket for interface ioctls, in the namespace it was created in.
pub struct IfCtl(OwnedFd);

impl IfCtl {
    pub fn new() -> io::Result<IfCtl> {
        // SAFETY: plain syscall.
        let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: fd was just returned by socket().
        Ok(IfCtl(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ifreq(&self, name: &str, request: libc::c_ulong) -> io::Result<libc::ifreq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
        }
        // SAFETY: zeroed ifreq is valid; the name is NUL-terminated by the zeroing.
        let mut req: libc::ifreq = unsafe { zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: req is a valid ifreq for these requests.
        cvt(unsafe { libc::ioctl(self.0.as_raw_fd(), request as _, &mut req) })?;
        Ok(req)
    }

    pub fn index(&self, name: &str) -> io::Result<u32> {
        // SAFETY: SIOCGIFINDEX fills ifru_ifindex.
        Ok(unsafe { self.ifreq(name, libc::SIOCGIFINDEX as _)?.ifr_ifru.ifru_ifindex } as u32)
    }

    /// Up and running (IFF_UP and IFF_RUNNING: administratively up, with carrier).
    pub fn is_up(&self, name: &str) -> io::Result<bool> {
        // SAFETY: SIOCGIFFLAGS fills ifru_flags.
        let flags = unsafe { self.ifreq(name, libc::SIOCGIFFLAGS as _)?.ifr_ifru.ifru_flags } as libc::c_int;
        Ok(flags & libc::IFF_UP != 0 && flags & libc::IFF_RUNNING != 0)
    }

    pub fn mac(&self, name: &str) -> io::Result<[u8; 6]> {
        // SAFETY: SIOCGIFHWADDR fills ifru_hwaddr.
        let sa = unsafe { self.ifreq(name, libc::SIOCGIFHWADDR as _)?.ifr_ifru.ifru_hwaddr };
        if sa.sa_family != libc::ARPHRD_ETHER {
            return Err(io::Error::new(io::ErrorKind::Unsupported, format!("{name} is not an Ethernet interface")));
        }
        let mut mac = [0u8; 6];
        for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
            *m = *b as u8;
        }
        Ok(mac)
    }
}

/// The addresses of interface `name`, in the kernel's order (the primary IPv4 address first).
pub fn addresses(name: &str) -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        if ifa.interface_name != name {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            out.push(IpAddr::V4(v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            out.push(IpAddr::V6(v6.ip()));
        }
    }
    Ok(out)
}

/// A UDP/IPv6 socket that holds multicast memberships (solicited-node groups of the IPv6
/// virtual addresses) for as long as it is open.
pub fn membership_socket_v6() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket().
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packet_ignore_outgoing_unknown_to_old_kernels_is_not_an_error() {
        assert!(ignore_outgoing(Ok(())).unwrap());
        // Linux < 4.20: packet_setsockopt() answers ENOPROTOOPT for an option it does not know.
        assert!(!ignore_outgoing(Err(io::Error::from_raw_os_error(libc::ENOPROTOOPT))).unwrap());
        let err = ignore_outgoing(Err(io::Error::from_raw_os_error(libc::EPERM))).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }
}
