//! Test frames, built with etherparse (and a little byte surgery for what it has no builder for).

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{
    icmpv4::DestUnreachableHeader, Icmpv4Type, Icmpv6Type, IpFragOffset, IpHeaders, Ipv4Header, PacketBuilder,
    VlanId,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x01];
pub const DIRECTOR_MAC: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x01];

/// One TCP or UDP frame description.
#[derive(Clone, Copy, Debug)]
pub struct Flow4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

pub fn tcp4_syn(f: Flow4) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, DIRECTOR_MAC)
        .ipv4(f.src.octets(), f.dst.octets(), 64)
        .tcp(f.sport, f.dport, 1000, 64240)
        .syn();
    write(b, &[])
}

pub fn tcp4_ack(f: Flow4, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, DIRECTOR_MAC)
        .ipv4(f.src.octets(), f.dst.octets(), 64)
        .tcp(f.sport, f.dport, 1001, 64240)
        .ack(5000);
    write(b, payload)
}

pub fn udp4(f: Flow4, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, DIRECTOR_MAC)
        .ipv4(f.src.octets(), f.dst.octets(), 64)
        .udp(f.sport, f.dport);
    write(b, payload)
}

pub fn tcp4_syn_vlan(f: Flow4, vlan: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, DIRECTOR_MAC)
        .single_vlan(VlanId::try_new(vlan).expect("valid VLAN id"))
        .ipv4(f.src.octets(), f.dst.octets(), 64)
        .tcp(f.sport, f.dport, 1000, 64240)
        .syn();
    write(b, &[])
}

fn ipv4_header(f: Flow4, proto: etherparse::IpNumber) -> Ipv4Header {
    Ipv4Header::new(0, 64, proto, f.src.octets(), f.dst.octets()).expect("valid header")
}

/// TCP SYN whose IPv4 header carries options (IHL 7: seven NOPs and an end-of-options byte).
pub fn tcp4_syn_with_options(f: Flow4) -> Vec<u8> {
    let mut ip = ipv4_header(f, etherparse::IpNumber::TCP);
    ip.options = [1u8, 1, 1, 1, 1, 1, 1, 0].into();
    let b = PacketBuilder::ethernet2(CLIENT_MAC, DIRECTOR_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(f.sport, f.dport, 1000, 64240)
        .syn();
    write(b, &[])
}

/// A UDP datagram as an IPv4 fragment: `offset` in 8-byte units, `more` = MF flag. A later
/// fragment (offset > 0) carries payload bytes where ports would be, never real ports.
pub fn udp4_fragment(f: Flow4, offset: u16, more: bool) -> Vec<u8> {
    let mut ip = ipv4_header(f, etherparse::IpNumber::UDP);
    ip.more_fragments = more;
    ip.fragment_offset = IpFragOffset::try_new(offset).expect("valid offset");
    if offset == 0 {
        let b = PacketBuilder::ethernet2(CLIENT_MAC, DIRECTOR_MAC)
            .ip(IpHeaders::Ipv4(ip, Default::default()))
            .udp(f.sport, f.dport);
        return write(b, &[0xab; 32]);
    }
    let payload = [0x55u8; 32];
    ip.set_payload_len(payload.len()).expect("small payload");
    let mut out = Vec::new();
    etherparse::Ethernet2Header {
        source: CLIENT_MAC,
        destination: DIRECTOR_MAC,
        ether_type: etherparse::EtherType::IPV4,
    }
    .write(&mut out)
    .expect("write to vec");
    ip.write(&mut out).expect("write to vec");
    out.extend_from_slice(&payload);
    out
}

#[derive(Clone, Copy, Debug)]
pub struct Flow6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
}

pub fn tcp6_syn(f: Flow6) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, DIRECTOR_MAC)
        .ipv6(f.src.octets(), f.dst.octets(), 64)
        .tcp(f.sport, f.dport, 1000, 64240)
        .syn();
    write(b, &[])
}

pub fn tcp6_ack(f: Flow6, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, DIRECTOR_MAC)
        .ipv6(f.src.octets(), f.dst.octets(), 64)
        .tcp(f.sport, f.dport, 1001, 64240)
        .ack(5000);
    write(b, payload)
}

/// TCP SYN behind an 8-byte hop-by-hop options header (a PadN option).
pub fn tcp6_syn_hop_by_hop(f: Flow6) -> Vec<u8> {
    let mut p = tcp6_syn(f);
    let ip6 = 14;
    let payload_len = u16::from_be_bytes([p[ip6 + 4], p[ip6 + 5]]) + 8;
    p[ip6 + 4..ip6 + 6].copy_from_slice(&payload_len.to_be_bytes());
    p[ip6 + 6] = 0; // next header: hop-by-hop
    let hbh = [6u8 /* TCP */, 0 /* 8 bytes */, 1 /* PadN */, 4, 0, 0, 0, 0];
    p.splice(ip6 + 40..ip6 + 40, hbh);
    p
}

/// TCP SYN behind an IPv6 fragment header: `offset` in 8-byte units, `more` = M flag. Offset 0
/// without M is an atomic fragment (RFC 6946): the whole packet.
pub fn tcp6_syn_fragment(f: Flow6, offset: u16, more: bool) -> Vec<u8> {
    let mut p = tcp6_syn(f);
    let ip6 = 14;
    let payload_len = u16::from_be_bytes([p[ip6 + 4], p[ip6 + 5]]) + 8;
    p[ip6 + 4..ip6 + 6].copy_from_slice(&payload_len.to_be_bytes());
    p[ip6 + 6] = 44; // next header: fragment
    let [hi, lo] = (offset << 3 | u16::from(more)).to_be_bytes();
    let frag = [6u8 /* TCP */, 0, hi, lo, 0, 0, 0x12, 0x34 /* identification */];
    p.splice(ip6 + 40..ip6 + 40, frag);
    p
}

pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0xff; 6];
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&CLIENT_MAC);
    p.extend_from_slice(&sender.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&target.octets());
    p
}

fn write<B: Writable>(b: B, payload: &[u8]) -> Vec<u8> {
    b.write_to(payload)
}

/// The builder's final steps all have `write` and `size`; this folds them into one call.
trait Writable {
    fn write_to(self, payload: &[u8]) -> Vec<u8>;
}

macro_rules! writable {
    ($($t:ty),*) => {$(
        impl Writable for etherparse::PacketBuilderStep<$t> {
            fn write_to(self, payload: &[u8]) -> Vec<u8> {
                let mut out = Vec::with_capacity(self.size(payload.len()));
                self.write(&mut out, payload).expect("write to vec");
                out
            }
        }
    )*};
}
writable!(etherparse::TcpHeader, etherparse::UdpHeader, etherparse::Icmpv4Header, etherparse::Icmpv6Header);

/// A router's MAC, for ICMP errors it sends.
pub const ROUTER_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];

/// An ICMP "fragmentation needed" (MTU 1400) from `router` to `to`, quoting the first 60 bytes of
/// a reply in `f`'s flow (TCP from `f.dst`:`f.dport` to `f.src`:`f.sport`, 64 bytes of data):
/// what a router sends the VIP when a real server's reply is too big for its next hop.
pub fn icmp4_frag_needed(router: Ipv4Addr, to: Ipv4Addr, f: Flow4) -> Vec<u8> {
    let reply = write(PacketBuilder::ipv4(f.dst.octets(), f.src.octets(), 64).tcp(f.dport, f.sport, 5000, 64240).ack(1001), &[0x42; 64]);
    let kind = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 });
    let b = PacketBuilder::ethernet2(ROUTER_MAC, DIRECTOR_MAC).ipv4(router.octets(), to.octets(), 64).icmpv4(kind);
    write(b, &reply[..60])
}

/// `icmp4_frag_needed` quoting a UDP reply.
pub fn icmp4_frag_needed_udp(router: Ipv4Addr, to: Ipv4Addr, f: Flow4) -> Vec<u8> {
    let reply = write(PacketBuilder::ipv4(f.dst.octets(), f.src.octets(), 64).udp(f.dport, f.sport), &[0x42; 64]);
    let kind = Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 });
    let b = PacketBuilder::ethernet2(ROUTER_MAC, DIRECTOR_MAC).ipv4(router.octets(), to.octets(), 64).icmpv4(kind);
    write(b, &reply[..60])
}

/// An ICMP echo request.
pub fn icmp4_echo(from: Ipv4Addr, to: Ipv4Addr) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, DIRECTOR_MAC).ipv4(from.octets(), to.octets(), 64).icmpv4_echo_request(7, 1);
    write(b, b"ping")
}

/// The ICMPv6 "packet too big" (MTU 1280) of `icmp4_frag_needed`: the quote is the first 80
/// bytes of the reply.
pub fn icmp6_too_big(router: Ipv6Addr, to: Ipv6Addr, f: Flow6) -> Vec<u8> {
    let reply = write(PacketBuilder::ipv6(f.dst.octets(), f.src.octets(), 64).tcp(f.dport, f.sport, 5000, 64240).ack(1001), &[0x42; 64]);
    let b = PacketBuilder::ethernet2(ROUTER_MAC, DIRECTOR_MAC).ipv6(router.octets(), to.octets(), 64).icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 });
    write(b, &reply[..80])
}

/// The frame the director should send for `input`: same bytes, new Ethernet addresses.
pub fn rewritten(input: &[u8], dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let mut out = input.to_vec();
    out[0..6].copy_from_slice(&dst);
    out[6..12].copy_from_slice(&src);
    out
}
