//! ARP (IPv4) and neighbour discovery (IPv6) frames for the virtual addresses: replies,
//! gratuitous ARP / unsolicited neighbour advertisements, conflict probes, and parsing of what
//! the responder receives. Whole Ethernet frames, sent and received on an `AF_PACKET` socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::packet::{checksum, pseudo_header_proto};

pub type Mac = [u8; 6];

pub const BROADCAST: Mac = [0xff; 6];
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;
const ICMPV6: u8 = 58;
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
const NA_FLAG_SOLICITED: u8 = 0x40;
const NA_FLAG_OVERRIDE: u8 = 0x20;
const OPT_SOURCE_LLA: u8 = 1;
const OPT_TARGET_LLA: u8 = 2;
/// All-nodes multicast.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

pub fn format_mac(m: &Mac) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// An ARP packet (Ethernet/IPv4 only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub request: bool,
    /// Ethernet source of the frame.
    pub eth_src: Mac,
    pub sha: Mac,
    pub spa: Ipv4Addr,
    pub tha: Mac,
    pub tpa: Ipv4Addr,
}

fn arp_frame(eth_dst: Mac, eth_src: Mac, op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa.octets());
    f
}

/// Gratuitous ARP for `vip` at `mac`: a broadcast request with sender = target = `vip`, the
/// form keepalived sends (Linux updates existing cache entries from it).
pub fn gratuitous_arp(mac: Mac, vip: Ipv4Addr) -> Vec<u8> {
    arp_frame(BROADCAST, mac, ARPOP_REQUEST, mac, vip, BROADCAST, vip)
}

/// The reply to `req` (a request for `vip`): `vip` is at `mac`.
pub fn arp_reply(mac: Mac, vip: Ipv4Addr, req: &Arp) -> Vec<u8> {
    arp_frame(req.sha, mac, ARPOP_REPLY, mac, vip, req.sha, req.spa)
}

/// An ARP probe (RFC 5227: sender address 0.0.0.0) asking who else has `vip`; a host holding
/// it answers to `mac` without learning anything from the probe.
pub fn arp_probe(mac: Mac, vip: Ipv4Addr) -> Vec<u8> {
    arp_frame(BROADCAST, mac, ARPOP_REQUEST, mac, Ipv4Addr::UNSPECIFIED, [0; 6], vip)
}

pub fn parse_arp(f: &[u8]) -> Option<Arp> {
    if f.len() < 42 || f[12..14] != ETH_P_ARP.to_be_bytes() || f[14..20] != [0, 1, 0x08, 0x00, 6, 4] {
        return None;
    }
    let op = u16::from_be_bytes([f[20], f[21]]);
    if op != ARPOP_REQUEST && op != ARPOP_REPLY {
        return None;
    }
    let mac = |at: usize| -> Mac { f[at..at + 6].try_into().expect("6 bytes") };
    let ip = |at: usize| Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]);
    Some(Arp { request: op == ARPOP_REQUEST, eth_src: mac(6), sha: mac(22), spa: ip(28), tha: mac(32), tpa: ip(38) })
}

/// The solicited-node multicast address of `a` (ff02::1:ffXX:XXXX).
pub fn solicited_node(a: Ipv6Addr) -> Ipv6Addr {
    let o = a.octets();
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(o[13]), u16::from_be_bytes([o[14], o[15]]))
}

/// The Ethernet multicast address of IPv6 group `g` (33:33 + its last 32 bits).
pub fn multicast_mac(g: Ipv6Addr) -> Mac {
    let o = g.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

fn icmpv6_frame(eth_dst: Mac, eth_src: Mac, src: Ipv6Addr, dst: Ipv6Addr, mut icmp: Vec<u8>) -> Vec<u8> {
    let sum = checksum(&[&pseudo_header_proto(IpAddr::V6(src), IpAddr::V6(dst), icmp.len(), ICMPV6), &icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Vec::with_capacity(54 + icmp.len());
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.push(ICMPV6);
    f.push(255);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&icmp);
    f
}

fn na(target: Ipv6Addr, flags: u8, mac: Mac) -> Vec<u8> {
    let mut icmp = vec![ND_NEIGHBOR_ADVERT, 0, 0, 0, flags, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[OPT_TARGET_LLA, 1]);
    icmp.extend_from_slice(&mac);
    icmp
}

/// Unsolicited neighbour advertisement for `vip` at `mac` to all nodes, Override set, from
/// `vip` itself (the form keepalived sends).
pub fn unsolicited_na(mac: Mac, vip: Ipv6Addr) -> Vec<u8> {
    icmpv6_frame(multicast_mac(ALL_NODES), mac, vip, ALL_NODES, na(vip, NA_FLAG_OVERRIDE, mac))
}

/// The advertisement answering solicitation `ns` for `vip`: to its sender, or to all nodes
/// when the sender has no address yet (duplicate address detection; RFC 4861 7.2.4).
pub fn na_reply(mac: Mac, vip: Ipv6Addr, ns: &Nd) -> Vec<u8> {
    if ns.src.is_unspecified() {
        icmpv6_frame(multicast_mac(ALL_NODES), mac, vip, ALL_NODES, na(vip, NA_FLAG_OVERRIDE, mac))
    } else {
        let dst_mac = ns.lla.unwrap_or(ns.eth_src);
        icmpv6_frame(dst_mac, mac, vip, ns.src, na(vip, NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE, mac))
    }
}

/// A duplicate-address-detection solicitation for `vip` (from `::`, RFC 4862): whoever holds
/// `vip` answers to all nodes.
pub fn ns_probe(mac: Mac, vip: Ipv6Addr) -> Vec<u8> {
    let group = solicited_node(vip);
    let mut icmp = vec![ND_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&vip.octets());
    icmpv6_frame(multicast_mac(group), mac, Ipv6Addr::UNSPECIFIED, group, icmp)
}

/// A neighbour solicitation or advertisement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nd {
    pub solicit: bool,
    pub eth_src: Mac,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    pub target: Ipv6Addr,
    /// Source (NS) or target (NA) link-layer address option.
    pub lla: Option<Mac>,
}

/// Parses an untagged Ethernet frame holding an NS or NA right after the IPv6 header, with a
/// correct ICMPv6 checksum.
pub fn parse_nd(f: &[u8]) -> Option<Nd> {
    if f.len() < 54 + 24 || f[12..14] != ETH_P_IPV6.to_be_bytes() || f[14] >> 4 != 6 || f[20] != ICMPV6 {
        return None;
    }
    let plen = usize::from(u16::from_be_bytes([f[18], f[19]]));
    if f.len() < 54 + plen || plen < 24 {
        return None;
    }
    let icmp = &f[54..54 + plen];
    let addr = |b: &[u8]| Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes"));
    let (src, dst) = (addr(&f[22..38]), addr(&f[38..54]));
    if checksum(&[&pseudo_header_proto(IpAddr::V6(src), IpAddr::V6(dst), plen, ICMPV6), icmp]) != 0 {
        return None;
    }
    let solicit = match icmp[0] {
        ND_NEIGHBOR_SOLICIT => true,
        ND_NEIGHBOR_ADVERT => false,
        _ => return None,
    };
    let want = if solicit { OPT_SOURCE_LLA } else { OPT_TARGET_LLA };
    let mut lla = None;
    let mut opts = &icmp[24..];
    while opts.len() >= 8 {
        let len = usize::from(opts[1]) * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        if opts[0] == want && len == 8 {
            lla = Some(opts[2..8].try_into().expect("6 bytes"));
        }
        opts = &opts[len..];
    }
    Some(Nd { solicit, eth_src: f[6..12].try_into().expect("6 bytes"), src, dst, hop_limit: f[21], target: addr(&icmp[8..24]), lla })
}

/// Classic BPF for the IPv6 packet socket: only ICMPv6 neighbour solicitations and
/// advertisements directly after the IPv6 header reach userspace.
pub const ND_FILTER: [(u16, u8, u8, u32); 7] = [
    (0x30, 0, 0, 20),  // ldb [20]        next header
    (0x15, 0, 4, 58),  // jeq #58         ICMPv6, else drop
    (0x30, 0, 0, 54),  // ldb [54]        ICMPv6 type
    (0x15, 1, 0, 135), // jeq #135        NS -> accept
    (0x15, 0, 1, 136), // jeq #136        NA -> accept, else drop
    (0x06, 0, 0, 0xffff),
    (0x06, 0, 0, 0),
];

#[cfg(test)]
mod tests {
    use super::super::packet::tests::hex;
    use super::*;

    const MAC: Mac = [2, 0, 0, 0, 0, 1];

    #[test]
    fn gratuitous_arp_matches_keepalived() {
        // keepalived 2.2.7's gratuitous ARP for 10.98.0.102 from 02:00:00:00:00:01 (captured).
        let captured = hex("ffff ffff ffff 0200 0000 0001 0806 0001 0800 0604 0001 0200 0000 0001 0a62 0066 ffff ffff ffff 0a62 0066");
        assert_eq!(gratuitous_arp(MAC, "10.98.0.102".parse().unwrap()), captured);
        let arp = parse_arp(&captured).unwrap();
        assert!(arp.request && arp.spa == arp.tpa);
    }

    #[test]
    fn unsolicited_na_matches_keepalived() {
        // keepalived 2.2.7's unsolicited NA for fd00:98::100 (captured).
        let captured = hex("3333 0000 0001 0200 0000 0001 86dd 6000 0000 0020 3aff fd00 0098 0000 0000 0000 0000 0000 0100
             ff02 0000 0000 0000 0000 0000 0000 0001 8800 576d 2000 0000 fd00 0098 0000 0000 0000 0000 0000
             0100 0201 0200 0000 0001");
        let vip: Ipv6Addr = "fd00:98::100".parse().unwrap();
        assert_eq!(unsolicited_na(MAC, vip), captured);
        let nd = parse_nd(&captured).unwrap();
        assert_eq!((nd.solicit, nd.target, nd.lla, nd.hop_limit), (false, vip, Some(MAC), 255));
    }

    #[test]
    fn arp_request_reply_and_probe() {
        let client: Mac = [2, 0xcc, 0, 0, 0, 1];
        let req = arp_frame(BROADCAST, client, ARPOP_REQUEST, client, "10.0.0.5".parse().unwrap(), [0; 6], "10.0.0.100".parse().unwrap());
        let r = parse_arp(&req).unwrap();
        let reply = arp_reply(MAC, "10.0.0.100".parse().unwrap(), &r);
        let p = parse_arp(&reply).unwrap();
        assert_eq!(&reply[..6], &client, "unicast to the asker");
        assert_eq!((p.request, p.sha, p.spa, p.tha, p.tpa), (false, MAC, r.tpa, client, r.spa));
        let probe = parse_arp(&arp_probe(MAC, "10.0.0.100".parse().unwrap())).unwrap();
        assert_eq!((probe.request, probe.spa, probe.tpa), (true, Ipv4Addr::UNSPECIFIED, "10.0.0.100".parse().unwrap()));
        assert_eq!(parse_arp(&reply[..41]), None);
    }

    #[test]
    fn neighbor_solicitation_and_advertisement() {
        let vip: Ipv6Addr = "fd00:99::100".parse().unwrap();
        assert_eq!(solicited_node(vip), "ff02::1:ff00:100".parse::<Ipv6Addr>().unwrap());
        assert_eq!(multicast_mac(solicited_node(vip)), [0x33, 0x33, 0xff, 0, 0x01, 0]);
        // A DAD probe parses as a solicitation from :: ...
        let probe = parse_nd(&ns_probe(MAC, vip)).unwrap();
        assert_eq!((probe.solicit, probe.src, probe.target, probe.lla), (true, Ipv6Addr::UNSPECIFIED, vip, None));
        // ... answered to all nodes without the solicited flag.
        let to_all = na_reply([2, 0, 0, 0, 0, 2], vip, &probe);
        assert_eq!(&to_all[..6], &[0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(to_all[54 + 4], NA_FLAG_OVERRIDE);
        // A solicitation from a client with its link-layer address gets a unicast, solicited NA.
        let client: Mac = [2, 0xcc, 0, 0, 0, 1];
        let ns = Nd {
            solicit: true,
            eth_src: client,
            src: "fd00:99::5".parse().unwrap(),
            dst: solicited_node(vip),
            hop_limit: 255,
            target: vip,
            lla: Some(client),
        };
        let reply = na_reply(MAC, vip, &ns);
        let na = parse_nd(&reply).unwrap();
        assert_eq!(&reply[..6], &client);
        assert_eq!((na.solicit, na.dst, na.target, na.lla), (false, ns.src, vip, Some(MAC)));
        assert_eq!(reply[54 + 4], NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE);
        // A corrupted checksum is refused.
        let mut bad = reply.clone();
        bad[60] ^= 1;
        assert_eq!(parse_nd(&bad), None);
    }
}
