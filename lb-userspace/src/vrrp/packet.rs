//! VRRP advertisements on the wire: VRRPv2 (RFC 3768) and VRRPv3 (RFC 5798/9568), their
//! checksums, and the IPv4 header lbd writes itself (the socket uses `IP_HDRINCL`, as keepalived
//! does, so that source, TTL and TOS are exactly what the RFCs ask for).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! |Version| Type  | Virtual Rtr ID|   Priority    | Count IP Addrs|
//! v2: |   Auth Type   |   Adver Int   |          Checksum             |
//! v3: |(rsvd) |     Max Adver Int     |          Checksum             |
//! |                 IPv4 or IPv6 address(es) ...                  |
//! v2 only: |                  Authentication Data (8 bytes)                |
//! ```
//!
//! The v2 checksum covers the VRRP message only; the v3 checksum also covers the IP
//! pseudo-header. Some v3 implementations leave the pseudo-header out for IPv4; lbd sends it as
//! the RFC says and accepts both (see [`verify_checksum`]).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

/// IP protocol number of VRRP.
pub const IPPROTO_VRRP: u8 = 112;
/// IPv4 multicast group of VRRP.
pub const MCAST_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// IPv6 multicast group of VRRP.
pub const MCAST_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);
/// The only VRRP packet type.
pub const TYPE_ADVERTISEMENT: u8 = 1;
/// v2 authentication types.
pub const AUTH_NONE: u8 = 0;
pub const AUTH_PASS: u8 = 1;
/// TOS/traffic class lbd sends adverts with (network control, as keepalived).
pub const TOS_NETWORK_CONTROL: u8 = 0xc0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Version {
    V2 = 2,
    V3 = 3,
}

impl Version {
    pub fn number(self) -> u8 {
        self as u8
    }
}

/// A decoded (or to be encoded) advertisement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    pub version: Version,
    pub vrid: u8,
    pub priority: u8,
    /// The advertisement interval in centiseconds: v3's 12-bit field as is; v2's seconds × 100.
    pub interval_cs: u16,
    /// Addresses, all IPv4 or all IPv6 (v2: IPv4 only).
    pub addresses: Vec<IpAddr>,
    /// v2 only: authentication type and data (zero for v3).
    pub auth_type: u8,
    pub auth_data: [u8; 8],
}

/// Why a VRRP message could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its header, or than its address count says.
    Truncated,
    /// The version nibble is neither 2 nor 3 (the value is given).
    Version(u8),
    /// The type nibble is not 1 (advertisement).
    Type(u8),
    /// v2 over IPv6, or a v3 interval of 0.
    Invalid,
}

impl Advert {
    /// The advertisement interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.interval_cs) * 10)
    }

    /// Length of the encoded message.
    pub fn len(&self) -> usize {
        let per = if self.addresses.first().is_some_and(IpAddr::is_ipv6) { 16 } else { 4 };
        8 + per * self.addresses.len() + if self.version == Version::V2 { 8 } else { 0 }
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The VRRP message with its checksum; `src`/`dst` are the IP addresses it is sent with
    /// (part of the v3 checksum).
    pub fn encode(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.len());
        b.push((self.version.number() << 4) | TYPE_ADVERTISEMENT);
        b.push(self.vrid);
        b.push(self.priority);
        b.push(self.addresses.len() as u8);
        match self.version {
            Version::V2 => {
                b.push(self.auth_type);
                b.push((self.interval_cs / 100) as u8);
            }
            Version::V3 => b.extend_from_slice(&(self.interval_cs & 0x0fff).to_be_bytes()),
        }
        b.extend_from_slice(&[0, 0]);
        for a in &self.addresses {
            match a {
                IpAddr::V4(v4) => b.extend_from_slice(&v4.octets()),
                IpAddr::V6(v6) => b.extend_from_slice(&v6.octets()),
            }
        }
        if self.version == Version::V2 {
            b.extend_from_slice(&self.auth_data);
        }
        let sum = match self.version {
            Version::V2 => checksum(&[&b]),
            Version::V3 => checksum(&[&pseudo_header(src, dst, b.len()), &b]),
        };
        b[6..8].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Decodes a VRRP message (without its IP header). `ipv6`: it came over IPv6. The checksum
    /// is not checked here (see [`verify_checksum`]); bytes past the message are ignored.
    pub fn decode(b: &[u8], ipv6: bool) -> Result<Advert, DecodeError> {
        if b.len() < 8 {
            return Err(DecodeError::Truncated);
        }
        let version = match b[0] >> 4 {
            2 => Version::V2,
            3 => Version::V3,
            v => return Err(DecodeError::Version(v)),
        };
        if b[0] & 0x0f != TYPE_ADVERTISEMENT {
            return Err(DecodeError::Type(b[0] & 0x0f));
        }
        if version == Version::V2 && ipv6 {
            return Err(DecodeError::Invalid);
        }
        let count = usize::from(b[3]);
        let per = if ipv6 { 16 } else { 4 };
        let need = 8 + count * per + if version == Version::V2 { 8 } else { 0 };
        if b.len() < need {
            return Err(DecodeError::Truncated);
        }
        let addresses = b[8..8 + count * per]
            .chunks_exact(per)
            .map(|c| match <[u8; 16]>::try_from(c) {
                Ok(v6) => IpAddr::V6(v6.into()),
                Err(_) => IpAddr::V4(Ipv4Addr::new(c[0], c[1], c[2], c[3])),
            })
            .collect();
        let (auth_type, interval_cs, auth_data) = match version {
            Version::V2 => {
                let at = 8 + count * per;
                (b[4], u16::from(b[5]) * 100, b[at..at + 8].try_into().expect("8 bytes"))
            }
            Version::V3 => (0, u16::from_be_bytes([b[4], b[5]]) & 0x0fff, [0; 8]),
        };
        if version == Version::V3 && interval_cs == 0 {
            return Err(DecodeError::Invalid);
        }
        Ok(Advert { version, vrid: b[1], priority: b[2], interval_cs, addresses, auth_type, auth_data })
    }
}

/// Length of the message `b` starts with, from its version and count (for checksumming exactly
/// the message when the IP payload is longer); `None` when too short.
pub fn message_len(b: &[u8], ipv6: bool) -> Option<usize> {
    if b.len() < 8 {
        return None;
    }
    let per = if ipv6 { 16 } else { 4 };
    let len = 8 + usize::from(b[3]) * per + if b[0] >> 4 == 2 { 8 } else { 0 };
    (len <= b.len()).then_some(len)
}

/// How a received message's checksum was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumKind {
    /// As its version says (v2: message only; v3: with the pseudo-header).
    Standard,
    /// A v3 message checksummed without the pseudo-header (some IPv4 implementations).
    V3WithoutPseudoHeader,
}

/// Checks the checksum of message `b` (exactly the message: see [`message_len`]) received from
/// `src` to `dst`; `None` if it is wrong.
pub fn verify_checksum(b: &[u8], src: IpAddr, dst: IpAddr) -> Option<ChecksumKind> {
    if b.is_empty() {
        return None;
    }
    match b[0] >> 4 {
        3 => {
            if checksum(&[&pseudo_header(src, dst, b.len()), b]) == 0 {
                Some(ChecksumKind::Standard)
            } else if src.is_ipv4() && checksum(&[b]) == 0 {
                Some(ChecksumKind::V3WithoutPseudoHeader)
            } else {
                None
            }
        }
        _ => (checksum(&[b]) == 0).then_some(ChecksumKind::Standard),
    }
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`: the value to store, so
/// that the sum over data holding it is 0 (what this returns for correct data).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &byte in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, byte])),
                None => odd = Some(byte),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The IPv4 or IPv6 pseudo-header for protocol 112 and a message of `len` bytes.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, len: usize) -> Vec<u8> {
    pseudo_header_proto(src, dst, len, IPPROTO_VRRP)
}

/// The pseudo-header of upper-layer protocol `proto` (112 VRRP, 58 ICMPv6).
pub fn pseudo_header_proto(src: IpAddr, dst: IpAddr, len: usize, proto: u8) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (s, d) => {
            p.extend_from_slice(&to_v6(s).octets());
            p.extend_from_slice(&to_v6(d).octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
    }
    p
}

fn to_v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The IPv4 header lbd sends adverts with: TOS 0xc0, no fragmentation flags, TTL 255,
/// protocol 112 (what keepalived sends).
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, id: u16, payload_len: usize) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[1] = TOS_NETWORK_CONTROL;
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[8] = 255;
    h[9] = IPPROTO_VRRP;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&[&h]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h
}

/// What a raw IPv4 socket hands over: the header fields VRRP checks, and the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub protocol: u8,
}

/// Splits an IPv4 packet into its header fields and payload (trimmed to the total length).
pub fn parse_ipv4(p: &[u8]) -> Option<(Ipv4Info, &[u8])> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if ihl < 20 || total < ihl || p.len() < total {
        return None;
    }
    let info = Ipv4Info {
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        ttl: p[8],
        protocol: p[9],
    };
    Some((info, &p[ihl..total]))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Decodes `tcpdump -xx` hex (whitespace ignored).
    pub(crate) fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits.chunks(2).map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap()).collect()
    }

    // Frames keepalived 2.2.7 (Debian 12) sent in a test namespace, captured once with
    // `tcpdump -xx` on the peer (10.98.0.1 = 02:00:00:00:00:01, fe80::ff:fe00:1):
    //   vrrp_instance VI_2 { interface eth0; virtual_router_id 51; priority 150; advert_int 1
    //     authentication { auth_type PASS; auth_pass secret12 }
    //     virtual_ipaddress { 10.98.0.100/24; 10.98.0.101/24 } }
    pub(crate) const KEEPALIVED_V2_PASS: &str = "0100 5e00 0012 0200 0000 0001 0800 45c0
        002c 0001 0000 ff70 d02b 0a62 0001 e000 0012 2133 9602 0101 c4bd 0a62 0064 0a62
        0065 7365 6372 6574 3132";
    //   vrrp_instance VI_3 { version 3; virtual_router_id 52; priority 200; advert_int 0.1
    //     virtual_ipaddress { 10.98.0.102/24 } }
    pub(crate) const KEEPALIVED_V3_V4: &str = "0100 5e00 0012 0200 0000 0001 0800 45c0
        0020 0001 0000 ff70 d037 0a62 0001 e000 0012 3134 c801 000a 1106 0a62 0066";
    //   vrrp_instance VI_6 { version 3; virtual_router_id 53; priority 100; advert_int 1
    //     virtual_ipaddress { fd00:98::100/64 } }
    pub(crate) const KEEPALIVED_V3_V6: &str = "3333 0000 0012 0200 0000 0001 86dd 6c01
        264e 0018 70ff fe80 0000 0000 0000 0000 00ff fe00 0001 ff02 0000 0000 0000 0000
        0000 0000 0012 3135 6401 0064 6ead fd00 0098 0000 0000 0000 0000 0000 0100";

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap())
    }
    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().unwrap())
    }

    fn pass(p: &str) -> [u8; 8] {
        let mut d = [0u8; 8];
        d[..p.len()].copy_from_slice(p.as_bytes());
        d
    }

    #[test]
    fn v2_with_pass_matches_keepalived_byte_for_byte() {
        let frame = hex(KEEPALIVED_V2_PASS);
        let (ip, payload) = parse_ipv4(&frame[14..]).unwrap();
        assert_eq!((ip.src, ip.dst, ip.ttl, ip.protocol), ("10.98.0.1".parse().unwrap(), MCAST_V4, 255, 112));
        let adv = Advert::decode(payload, false).unwrap();
        let want = Advert {
            version: Version::V2,
            vrid: 51,
            priority: 150,
            interval_cs: 100,
            addresses: vec![v4("10.98.0.100"), v4("10.98.0.101")],
            auth_type: AUTH_PASS,
            auth_data: pass("secret12"),
        };
        assert_eq!(adv, want);
        assert_eq!(verify_checksum(payload, v4("10.98.0.1"), v4("224.0.0.18")), Some(ChecksumKind::Standard));
        // What lbd sends for the same instance: the same IP packet (header included).
        let msg = want.encode(v4("10.98.0.1"), v4("224.0.0.18"));
        let mut packet = ipv4_header("10.98.0.1".parse().unwrap(), MCAST_V4, 1, msg.len()).to_vec();
        packet.extend_from_slice(&msg);
        assert_eq!(packet, &frame[14..]);
    }

    #[test]
    fn v3_ipv4_matches_keepalived_and_uses_the_pseudo_header() {
        let frame = hex(KEEPALIVED_V3_V4);
        let (ip, payload) = parse_ipv4(&frame[14..]).unwrap();
        let adv = Advert::decode(payload, false).unwrap();
        let want = Advert {
            version: Version::V3,
            vrid: 52,
            priority: 200,
            interval_cs: 10,
            addresses: vec![v4("10.98.0.102")],
            auth_type: 0,
            auth_data: [0; 8],
        };
        assert_eq!(adv, want);
        assert_eq!(adv.interval(), Duration::from_millis(100));
        let (src, dst) = (IpAddr::V4(ip.src), IpAddr::V4(ip.dst));
        assert_eq!(verify_checksum(payload, src, dst), Some(ChecksumKind::Standard));
        // keepalived's checksum includes the pseudo-header: the message alone does not sum to 0.
        assert_ne!(checksum(&[payload]), 0);
        let msg = want.encode(src, dst);
        assert_eq!(msg, payload);
        let mut packet = ipv4_header(ip.src, ip.dst, 1, msg.len()).to_vec();
        packet.extend_from_slice(&msg);
        assert_eq!(packet, &frame[14..]);
    }

    #[test]
    fn v3_ipv6_matches_keepalived() {
        let frame = hex(KEEPALIVED_V3_V6);
        let ip6 = &frame[14..54];
        assert_eq!(ip6[6], IPPROTO_VRRP);
        assert_eq!(ip6[7], 255, "hop limit");
        let src = IpAddr::V6(<[u8; 16]>::try_from(&ip6[8..24]).unwrap().into());
        let dst = IpAddr::V6(<[u8; 16]>::try_from(&ip6[24..40]).unwrap().into());
        assert_eq!((src, dst), (v6("fe80::ff:fe00:1"), IpAddr::V6(MCAST_V6)));
        let payload = &frame[54..];
        let adv = Advert::decode(payload, true).unwrap();
        let want = Advert {
            version: Version::V3,
            vrid: 53,
            priority: 100,
            interval_cs: 100,
            // keepalived sends the configured (global) address, not a link-local one first.
            addresses: vec![v6("fd00:98::100")],
            auth_type: 0,
            auth_data: [0; 8],
        };
        assert_eq!(adv, want);
        assert_eq!(verify_checksum(payload, src, dst), Some(ChecksumKind::Standard));
        assert_eq!(want.encode(src, dst), payload);
    }

    /// Vectors built from the RFC layouts by hand, independent of any implementation.
    #[test]
    fn rfc_layouts() {
        // v2, VRID 1, priority 100, one address 192.0.2.1, no auth, 1 s. Checksum by hand:
        // 0x2101 + 0x6401 + 0x0001 + 0xc000 + 0x0201 = 0x14704 -> 0x4705 -> !0x4705 = 0xb8fa.
        let a = Advert {
            version: Version::V2,
            vrid: 1,
            priority: 100,
            interval_cs: 100,
            addresses: vec![v4("192.0.2.1")],
            auth_type: AUTH_NONE,
            auth_data: [0; 8],
        };
        let b = a.encode(v4("192.0.2.10"), v4("224.0.0.18"));
        assert_eq!(b, [0x21, 1, 100, 1, 0, 1, 0xb8, 0xfa, 192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        // The v2 checksum does not depend on the IP addresses.
        assert_eq!(b, a.encode(v4("192.0.2.11"), v4("192.0.2.12")));

        // v3, VRID 1, priority 100, 100 cs, 192.0.2.1, from 192.0.2.10 to 224.0.0.18.
        // Pseudo-header words: c000 020a e000 0012 0070 000c; message: 3101 6401 0064 c000 0201.
        let a3 = Advert { version: Version::V3, interval_cs: 100, ..a.clone() };
        let b3 = a3.encode(v4("192.0.2.10"), v4("224.0.0.18"));
        let words: u32 = [0xc000u32, 0x020a, 0xe000, 0x0012, 0x0070, 0x000c, 0x3101, 0x6401, 0x0064, 0xc000, 0x0201].iter().sum();
        let folded = (words & 0xffff) + (words >> 16);
        assert_eq!(u16::from_be_bytes([b3[6], b3[7]]), !(folded as u16));
        assert_eq!(&b3[..6], [0x31, 1, 100, 1, 0, 100]);
        // The same message checksummed without the pseudo-header is accepted, and told apart.
        let mut plain = b3.clone();
        plain[6..8].copy_from_slice(&[0, 0]);
        let sum = checksum(&[&plain]);
        plain[6..8].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(verify_checksum(&plain, v4("192.0.2.10"), v4("224.0.0.18")), Some(ChecksumKind::V3WithoutPseudoHeader));
        assert_eq!(verify_checksum(&b3, v4("192.0.2.10"), v4("224.0.0.18")), Some(ChecksumKind::Standard));
        // A v3 checksum binds the addresses: from another source it is wrong.
        assert_eq!(verify_checksum(&b3, v4("192.0.2.11"), v4("224.0.0.18")), None);
        // IPv6 messages have no fallback.
        let a6 = Advert { addresses: vec![v6("fe80::1")], ..a3 };
        let mut b6 = a6.encode(v6("fe80::2"), IpAddr::V6(MCAST_V6));
        assert_eq!(verify_checksum(&b6, v6("fe80::2"), IpAddr::V6(MCAST_V6)), Some(ChecksumKind::Standard));
        b6[2] ^= 1;
        assert_eq!(verify_checksum(&b6, v6("fe80::2"), IpAddr::V6(MCAST_V6)), None);
    }

    #[test]
    fn checksum_basics() {
        // RFC 1071's example: 0001 f203 f4f5 f6f7 sums to 0xddf2 -> checksum 0x220d.
        assert_eq!(checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]), 0x220d);
        // Odd lengths pad with a zero byte; splitting the data does not change the sum.
        assert_eq!(checksum(&[&[0x01, 0x02, 0x03]]), checksum(&[&[0x01], &[0x02, 0x03]]));
        assert_eq!(checksum(&[&[0x01, 0x02, 0x03]]), !0x0402);
    }

    #[test]
    fn decode_refuses_malformed_messages() {
        let good = hex("3134c801000a11060a620066");
        assert!(Advert::decode(&good, false).is_ok());
        assert_eq!(Advert::decode(&good[..7], false), Err(DecodeError::Truncated));
        assert_eq!(Advert::decode(&good[..11], false), Err(DecodeError::Truncated), "count says 1 address");
        let mut v4 = good.clone();
        v4[0] = 0x41;
        assert_eq!(Advert::decode(&v4, false), Err(DecodeError::Version(4)));
        let mut t2 = good.clone();
        t2[0] = 0x32;
        assert_eq!(Advert::decode(&t2, false), Err(DecodeError::Type(2)));
        let mut zero = good.clone();
        zero[4..6].copy_from_slice(&[0xf0, 0]);
        assert_eq!(Advert::decode(&zero, false), Err(DecodeError::Invalid), "reserved bits ignored, interval 0 refused");
        let v2 = hex(KEEPALIVED_V2_PASS);
        assert_eq!(Advert::decode(&v2[34..], true), Err(DecodeError::Invalid), "v2 over IPv6");
        assert_eq!(message_len(&v2[34..], false), Some(24));
        assert_eq!(message_len(&good, false), Some(12));
        assert_eq!(message_len(&good[..10], false), None);
    }
}
