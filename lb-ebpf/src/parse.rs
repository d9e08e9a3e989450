//! Header parsing: Ethernet (one optional 802.1Q tag), IPv4, IPv6, TCP and UDP ports.
//!
//! Decisions, on purpose:
//! - IPv4 with options (IHL > 5): the ports are read after the options and the packet is
//!   forwarded like any other. DSR never touches the IP header, so options travel untouched.
//! - IPv6 extension headers: hop-by-hop, routing and destination options are walked (up to
//!   `MAX_EXT_HEADERS`) to reach TCP/UDP; anything else (ESP, AH, a longer chain) leaves the
//!   packet without ports and it is passed to the kernel as "unsupported", never guessed at.
//! - Fragments: a first fragment carries ports but the later ones do not, so they would hash
//!   differently from the first and could reach another backend. lbd therefore never forwards a
//!   fragment (Katran's choice): a first fragment to a VIP is dropped and counted as `fragment`;
//!   later fragments carry no ports, so they only match port-0 VIPs (dropped the same way) and are
//!   otherwise passed to the kernel, whose reassembly never completes without the first one.
//! - Anything truncated or inconsistent is `Malformed` and passed to the kernel unchanged.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use lb_common::{FlowKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPV6_HLEN: usize = 40;
const MAX_EXT_HEADERS: usize = 4;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

/// What the parser found.
pub enum Parsed {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp,
    /// Truncated or inconsistent headers.
    Malformed,
    /// An IP packet; `flow` has addresses and protocol, and ports for TCP/UDP that is not a later
    /// fragment (zero otherwise).
    Ip(IpPacket),
}

pub struct IpPacket {
    pub flow: FlowKey,
    /// Any fragment, first or later.
    pub fragment: bool,
}

/// Reads a `T` at `off` bytes into the packet, bounds-checked for the verifier.
///
/// `T` is made of bytes or 16-bit words (alignment ≤ 2, checked at compile time) and every
/// offset read here is even (Ethernet 14, VLAN 4, IPv4 IHL × 4, IPv6 40 and 8-byte extension
/// headers), while XDP frames start at an even address (the driver's headroom), so the read is
/// aligned: it compiles to 16-bit loads. An unaligned read would be byte loads plus shifts, as
/// the BPF target has no misaligned access (measured: about a sixth of the hit path's
/// instructions went there).
#[inline(always)]
pub fn load<T: Copy>(ctx: &XdpContext, off: usize) -> Option<T> {
    const { assert!(core::mem::align_of::<T>() <= 2) };
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    // SAFETY: checked above that the bytes lie inside the packet; aligned as explained above.
    Some(unsafe { core::ptr::read((start + off) as *const T) })
}

/// The address word (wire-order bytes in a host u32, as `FlowKey` holds them) made of two
/// consecutive 16-bit words read from the packet.
#[inline(always)]
fn word(hi_addr_first: u16, second: u16) -> u32 {
    let [a, b] = hi_addr_first.to_ne_bytes();
    let [c, d] = second.to_ne_bytes();
    u32::from_ne_bytes([a, b, c, d])
}

#[inline(always)]
fn load_be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    load::<u16>(ctx, off).map(u16::from_be)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(mut ethertype) = load_be16(ctx, 12) else {
        return Parsed::Malformed;
    };
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q {
        let Some(inner) = load_be16(ctx, ETH_HLEN + 2) else {
            return Parsed::Malformed;
        };
        ethertype = inner;
        l3 += VLAN_HLEN;
    }
    match ethertype {
        ETH_P_IP => parse_v4(ctx, l3),
        ETH_P_IPV6 => parse_v6(ctx, l3),
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize) -> Parsed {
    let Some(h) = load::<[u16; 10]>(ctx, l3) else {
        return Parsed::Malformed;
    };
    let b0 = h[0].to_ne_bytes()[0];
    let ihl = ((b0 & 0x0f) as usize) * 4;
    if b0 >> 4 != 4 || ihl < 20 {
        return Parsed::Malformed;
    }
    let frag = u16::from_be(h[3]);
    let more_fragments = frag & 0x2000 != 0;
    let offset = frag & 0x1fff;
    let proto = h[4].to_ne_bytes()[1];
    let mut flow = FlowKey {
        src: [word(h[6], h[7]), 0, 0, 0],
        dst: [word(h[8], h[9]), 0, 0, 0],
        proto,
        family: FAMILY_V4,
        ..FlowKey::default()
    };
    let fragment = more_fragments || offset != 0;
    if offset != 0 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Parsed::Ip(IpPacket { flow, fragment });
    }
    match ports(ctx, l3 + ihl, &mut flow) {
        true => Parsed::Ip(IpPacket { flow, fragment }),
        false => Parsed::Malformed,
    }
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize) -> Parsed {
    let Some(h) = load::<[u16; 20]>(ctx, l3) else {
        return Parsed::Malformed;
    };
    if h[0].to_ne_bytes()[0] >> 4 != 6 {
        return Parsed::Malformed;
    }
    let mut next = h[3].to_ne_bytes()[0];
    let mut flow = FlowKey {
        src: [word(h[4], h[5]), word(h[6], h[7]), word(h[8], h[9]), word(h[10], h[11])],
        dst: [word(h[12], h[13]), word(h[14], h[15]), word(h[16], h[17]), word(h[18], h[19])],
        family: FAMILY_V6,
        ..FlowKey::default()
    };
    let mut l4 = l3 + IPV6_HLEN;
    let mut fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let Some([nh, len]) = load::<[u8; 2]>(ctx, l4) else {
                    return Parsed::Malformed;
                };
                next = nh;
                l4 += (len as usize + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let Some(frag) = load::<[u8; 4]>(ctx, l4) else {
                    return Parsed::Malformed;
                };
                fragment = true;
                next = frag[0];
                let offset = u16::from_be_bytes([frag[2], frag[3]]) >> 3;
                if offset != 0 {
                    flow.proto = next;
                    return Parsed::Ip(IpPacket { flow, fragment });
                }
                l4 += 8;
            }
            _ => break,
        }
    }
    flow.proto = next;
    if next != PROTO_TCP && next != PROTO_UDP {
        return Parsed::Ip(IpPacket { flow, fragment });
    }
    match ports(ctx, l4, &mut flow) {
        true => Parsed::Ip(IpPacket { flow, fragment }),
        false => Parsed::Malformed,
    }
}

/// Fills source and destination port (both BE) from the first 4 bytes of TCP/UDP.
#[inline(always)]
fn ports(ctx: &XdpContext, l4: usize, flow: &mut FlowKey) -> bool {
    match load::<[u16; 2]>(ctx, l4) {
        Some([sport, dport]) => {
            flow.sport = sport;
            flow.dport = dport;
            true
        }
        None => false,
    }
}
