//! The IPVS generic netlink wire format: constants from `include/uapi/linux/ip_vs.h`, and pure
//! encoders/decoders between the [`super`] types and netlink attributes.
//!
//! Everything here is free of I/O so it can be unit-tested on a host without IPVS. Byte order, as
//! the kernel has it (`net/netfilter/ipvs/ip_vs_ctl.c`):
//!
//! * integers are host order (`nla_put_u16`/`u32`/`u64`), except
//! * ports (`SVC_ATTR_PORT`, `DEST_ATTR_PORT`) are network order (`nla_put_be16`), and
//! * `SVC_ATTR_NETMASK` is a raw `__be32`: for IPv4 the mask's bytes in network order (so
//!   255.255.255.0 is `ff ff ff 00` on the wire), for IPv6 the prefix length as the kernel reads
//!   it, `(__force u32)` of that `__be32`, i.e. host order (what `ipvsadm` sends too);
//! * addresses are a 16-byte `union nf_inet_addr`, IPv4 in the first 4 bytes, the rest zero.

use std::{
    io::Cursor,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use neli::{
    attr::Attribute,
    genl::{AttrTypeBuilder, GenlAttrHandle, Nlattr, NlattrBuilder},
    types::{Buffer, GenlBuffer},
    FromBytesWithInput, ToBytes,
};

use super::{Destination, Family, Forwarding, Info, Protocol, Service, ServiceKey, Stats};

/// Generic netlink family name and version.
pub const IPVS_GENL_NAME: &str = "IPVS";
pub const IPVS_GENL_VERSION: u8 = 1;

/// `IPVS_CMD_*`.
pub mod cmd {
    pub const NEW_SERVICE: u8 = 1;
    pub const SET_SERVICE: u8 = 2;
    pub const DEL_SERVICE: u8 = 3;
    pub const GET_SERVICE: u8 = 4;
    pub const NEW_DEST: u8 = 5;
    pub const SET_DEST: u8 = 6;
    pub const DEL_DEST: u8 = 7;
    pub const GET_DEST: u8 = 8;
    pub const SET_INFO: u8 = 14;
    pub const GET_INFO: u8 = 15;
    pub const ZERO: u8 = 16;
    pub const FLUSH: u8 = 17;

    /// The kernel's name of a command, for messages.
    pub fn name(cmd: u8) -> &'static str {
        match cmd {
            NEW_SERVICE => "IPVS_CMD_NEW_SERVICE",
            SET_SERVICE => "IPVS_CMD_SET_SERVICE",
            DEL_SERVICE => "IPVS_CMD_DEL_SERVICE",
            GET_SERVICE => "IPVS_CMD_GET_SERVICE",
            NEW_DEST => "IPVS_CMD_NEW_DEST",
            SET_DEST => "IPVS_CMD_SET_DEST",
            DEL_DEST => "IPVS_CMD_DEL_DEST",
            GET_DEST => "IPVS_CMD_GET_DEST",
            SET_INFO => "IPVS_CMD_SET_INFO",
            GET_INFO => "IPVS_CMD_GET_INFO",
            ZERO => "IPVS_CMD_ZERO",
            FLUSH => "IPVS_CMD_FLUSH",
            _ => "IPVS_CMD_?",
        }
    }
}

/// `IPVS_CMD_ATTR_*`.
pub mod cmd_attr {
    pub const SERVICE: u16 = 1;
    pub const DEST: u16 = 2;
}

/// `IPVS_SVC_ATTR_*`.
pub mod svc_attr {
    pub const AF: u16 = 1;
    pub const PROTOCOL: u16 = 2;
    pub const ADDR: u16 = 3;
    pub const PORT: u16 = 4;
    pub const FWMARK: u16 = 5;
    pub const SCHED_NAME: u16 = 6;
    pub const FLAGS: u16 = 7;
    pub const TIMEOUT: u16 = 8;
    pub const NETMASK: u16 = 9;
    pub const STATS: u16 = 10;
    pub const PE_NAME: u16 = 11;
    pub const STATS64: u16 = 12;
}

/// `IPVS_DEST_ATTR_*`.
pub mod dest_attr {
    pub const ADDR: u16 = 1;
    pub const PORT: u16 = 2;
    pub const FWD_METHOD: u16 = 3;
    pub const WEIGHT: u16 = 4;
    pub const U_THRESH: u16 = 5;
    pub const L_THRESH: u16 = 6;
    pub const ACTIVE_CONNS: u16 = 7;
    pub const INACT_CONNS: u16 = 8;
    pub const PERSIST_CONNS: u16 = 9;
    pub const STATS: u16 = 10;
    pub const ADDR_FAMILY: u16 = 11;
    pub const STATS64: u16 = 12;
}

/// `IPVS_STATS_ATTR_*`.
pub mod stats_attr {
    pub const CONNS: u16 = 1;
    pub const INPKTS: u16 = 2;
    pub const OUTPKTS: u16 = 3;
    pub const INBYTES: u16 = 4;
    pub const OUTBYTES: u16 = 5;
    pub const CPS: u16 = 6;
    pub const INPPS: u16 = 7;
    pub const OUTPPS: u16 = 8;
    pub const INBPS: u16 = 9;
    pub const OUTBPS: u16 = 10;
}

/// `IPVS_INFO_ATTR_*`.
pub mod info_attr {
    pub const VERSION: u16 = 1;
    pub const CONN_TAB_SIZE: u16 = 2;
}

/// `IP_VS_CONN_F_FWD_MASK`.
pub const FWD_MASK: u32 = 0x7;
/// Longest scheduler name the kernel accepts, without the NUL (`IP_VS_SCHEDNAME_MAXLEN - 1`).
pub const SCHED_NAME_MAX: usize = 15;
/// `AF_INET`, `AF_INET6`.
pub const AF_INET: u16 = libc::AF_INET as u16;
pub const AF_INET6: u16 = libc::AF_INET6 as u16;

/// An encoding or decoding problem (becomes [`super::IpvsError::Netlink`] or `Kernel(EINVAL)`).
pub type WireError = String;

/// An attribute with a raw byte payload.
pub fn attr(ty: u16, payload: &[u8]) -> Result<Nlattr<u16, Buffer>, WireError> {
    NlattrBuilder::default()
        .nla_type(
            AttrTypeBuilder::default()
                .nla_type(ty)
                .build()
                .map_err(|e| format!("attribute type {ty}: {e}"))?,
        )
        .nla_payload(Buffer::from(payload))
        .build()
        .map_err(|e| format!("attribute {ty}: {e}"))
}

/// A nested attribute (`NLA_F_NESTED` set) holding `children`.
pub fn nested(ty: u16, children: &[Nlattr<u16, Buffer>]) -> Result<Nlattr<u16, Buffer>, WireError> {
    let mut parent = NlattrBuilder::default()
        .nla_type(
            AttrTypeBuilder::default()
                .nla_type(ty)
                .nla_nested(true)
                .build()
                .map_err(|e| format!("attribute type {ty}: {e}"))?,
        )
        .nla_payload(Buffer::new())
        .build()
        .map_err(|e| format!("attribute {ty}: {e}"))?;
    for child in children {
        parent = parent
            .nest(child)
            .map_err(|e| format!("nesting attribute {ty}: {e}"))?;
    }
    if usize::from(*parent.nla_len()) != 4 + children.iter().map(padded_len).sum::<usize>() {
        return Err(format!("attribute {ty} is too long for netlink"));
    }
    Ok(parent)
}

fn padded_len(a: &Nlattr<u16, Buffer>) -> usize {
    (usize::from(*a.nla_len()) + 3) & !3
}

/// Serialises attributes the way they go on the wire (each padded to 4 bytes).
pub fn to_bytes(attrs: &[Nlattr<u16, Buffer>]) -> Result<Vec<u8>, WireError> {
    let mut cursor = Cursor::new(Vec::new());
    for a in attrs {
        a.to_bytes(&mut cursor)
            .map_err(|e| format!("serialising attribute: {e}"))?;
    }
    Ok(cursor.into_inner())
}

/// Parses a run of attributes (the payload of a nested attribute or of a genl message).
pub fn parse_attrs(bytes: &[u8]) -> Result<GenlBuffer<u16, Buffer>, WireError> {
    GenlBuffer::from_bytes_with_input(&mut Cursor::new(bytes), bytes.len())
        .map_err(|e| format!("malformed attributes: {e}"))
}

/// `union nf_inet_addr`: 16 bytes, IPv4 in the first four.
pub fn inet_addr(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

fn af(family: Family) -> u16 {
    match family {
        Family::V4 => AF_INET,
        Family::V6 => AF_INET6,
    }
}

fn family_of_af(af: u16) -> Result<Family, WireError> {
    match af {
        AF_INET => Ok(Family::V4),
        AF_INET6 => Ok(Family::V6),
        other => Err(format!("unknown address family {other}")),
    }
}

/// The attributes that identify a service (inside `IPVS_CMD_ATTR_SERVICE`): AF plus FWMARK, or
/// AF, PROTOCOL, ADDR and PORT.
pub fn service_key_attrs(key: &ServiceKey) -> Result<Vec<Nlattr<u16, Buffer>>, WireError> {
    let mut attrs = vec![attr(svc_attr::AF, &af(key.family()).to_ne_bytes())?];
    match *key {
        ServiceKey::Inet {
            addr,
            protocol,
            port,
        } => {
            attrs.push(attr(svc_attr::PROTOCOL, &protocol.number().to_ne_bytes())?);
            attrs.push(attr(svc_attr::ADDR, &inet_addr(addr))?);
            attrs.push(attr(svc_attr::PORT, &port.to_be_bytes())?);
        }
        ServiceKey::Fwmark { mark, .. } => {
            if mark == 0 {
                return Err("firewall mark 0 does not identify a service".into());
            }
            attrs.push(attr(svc_attr::FWMARK, &mark.to_ne_bytes())?);
        }
    }
    Ok(attrs)
}

/// `IPVS_CMD_ATTR_SERVICE` with only the key (GET/DEL_SERVICE, GET_DEST, ZERO, *_DEST).
pub fn service_key_attr(key: &ServiceKey) -> Result<Nlattr<u16, Buffer>, WireError> {
    nested(cmd_attr::SERVICE, &service_key_attrs(key)?)
}

/// The service flags lbd writes: `HASHED` is the kernel's own bookkeeping and must not be sent
/// (a new service carrying it is never hashed into the lookup table).
pub fn writable_flags(flags: u32) -> u32 {
    flags & !super::IP_VS_SVC_F_HASHED
}

/// Raw `__be32` netmask bytes for `family` (see the module docs).
pub fn netmask_bytes(family: Family, netmask: u32) -> [u8; 4] {
    match family {
        Family::V4 => netmask.to_be_bytes(),
        Family::V6 => netmask.to_ne_bytes(),
    }
}

fn netmask_from_bytes(family: Family, bytes: [u8; 4]) -> u32 {
    match family {
        Family::V4 => u32::from_be_bytes(bytes),
        Family::V6 => u32::from_ne_bytes(bytes),
    }
}

/// `IPVS_CMD_ATTR_SERVICE` with everything NEW/SET_SERVICE need: the key, SCHED_NAME, FLAGS
/// (`{flags, mask = ~0}`, like ipvsadm), TIMEOUT and NETMASK.
pub fn service_attr(s: &Service) -> Result<Nlattr<u16, Buffer>, WireError> {
    let name = s.scheduler.as_bytes();
    if name.is_empty() || name.len() > SCHED_NAME_MAX || name.contains(&0) {
        return Err(format!(
            "scheduler name {:?} must be 1 to {SCHED_NAME_MAX} bytes without NUL",
            s.scheduler
        ));
    }
    let mut sched = name.to_vec();
    sched.push(0);
    let mut flags = [0u8; 8];
    flags[..4].copy_from_slice(&writable_flags(s.flags).to_ne_bytes());
    flags[4..].copy_from_slice(&u32::MAX.to_ne_bytes());
    let mut attrs = service_key_attrs(&s.key)?;
    attrs.push(attr(svc_attr::SCHED_NAME, &sched)?);
    attrs.push(attr(svc_attr::FLAGS, &flags)?);
    attrs.push(attr(svc_attr::TIMEOUT, &s.timeout.to_ne_bytes())?);
    attrs.push(attr(
        svc_attr::NETMASK,
        &netmask_bytes(s.key.family(), s.netmask),
    )?);
    nested(cmd_attr::SERVICE, &attrs)
}

/// `IPVS_CMD_ATTR_DEST` identifying a destination (DEL_DEST): ADDR, PORT, ADDR_FAMILY.
pub fn dest_key_attr(addr: IpAddr, port: u16) -> Result<Nlattr<u16, Buffer>, WireError> {
    nested(cmd_attr::DEST, &dest_key_attrs(addr, port)?)
}

fn dest_key_attrs(addr: IpAddr, port: u16) -> Result<Vec<Nlattr<u16, Buffer>>, WireError> {
    Ok(vec![
        attr(dest_attr::ADDR, &inet_addr(addr))?,
        attr(dest_attr::PORT, &port.to_be_bytes())?,
        attr(dest_attr::ADDR_FAMILY, &af(Family::of(addr)).to_ne_bytes())?,
    ])
}

/// `IPVS_CMD_ATTR_DEST` with everything NEW/SET_DEST need: ADDR, PORT, ADDR_FAMILY, FWD_METHOD,
/// WEIGHT, U_THRESH, L_THRESH.
pub fn dest_attr(d: &Destination) -> Result<Nlattr<u16, Buffer>, WireError> {
    let mut attrs = dest_key_attrs(d.addr, d.port)?;
    attrs.push(attr(
        dest_attr::FWD_METHOD,
        &d.forwarding.conn_flags().to_ne_bytes(),
    )?);
    attrs.push(attr(dest_attr::WEIGHT, &d.weight.to_ne_bytes())?);
    attrs.push(attr(dest_attr::U_THRESH, &d.upper_threshold.to_ne_bytes())?);
    attrs.push(attr(dest_attr::L_THRESH, &d.lower_threshold.to_ne_bytes())?);
    nested(cmd_attr::DEST, &attrs)
}

// ---------------------------------------------------------------------------------------------
// Decoding

fn payload(a: &Nlattr<u16, Buffer>) -> &[u8] {
    a.payload().as_ref()
}

fn get<'a>(h: &'a GenlAttrHandle<'_, u16>, ty: u16) -> Option<&'a [u8]> {
    h.get_attribute(ty).map(payload)
}

fn fixed<const N: usize>(
    h: &GenlAttrHandle<'_, u16>,
    ty: u16,
    what: &str,
) -> Result<Option<[u8; N]>, WireError> {
    match get(h, ty) {
        None => Ok(None),
        Some(b) => b
            .get(..N)
            .and_then(|b| <[u8; N]>::try_from(b).ok())
            .map(Some)
            .ok_or_else(|| format!("{what}: expected {N} bytes, got {}", b.len())),
    }
}

fn req<const N: usize>(
    h: &GenlAttrHandle<'_, u16>,
    ty: u16,
    what: &str,
) -> Result<[u8; N], WireError> {
    fixed(h, ty, what)?.ok_or_else(|| format!("{what} missing"))
}

fn u16_ne(h: &GenlAttrHandle<'_, u16>, ty: u16, what: &str) -> Result<u16, WireError> {
    req(h, ty, what).map(u16::from_ne_bytes)
}

fn u32_ne(h: &GenlAttrHandle<'_, u16>, ty: u16, what: &str) -> Result<u32, WireError> {
    req(h, ty, what).map(u32::from_ne_bytes)
}

fn opt_u32(h: &GenlAttrHandle<'_, u16>, ty: u16, what: &str) -> Result<u32, WireError> {
    Ok(fixed(h, ty, what)?.map_or(0, u32::from_ne_bytes))
}

fn ip_from(family: Family, raw: [u8; 16]) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(raw)),
    }
}

/// Decodes a nested stats attribute. `wide`: STATS64 (all u64); otherwise STATS (u32 counters and
/// rates, u64 byte counts). Unknown attributes (e.g. `IPVS_STATS_ATTR_PAD`) are skipped.
pub fn parse_stats(nested_payload: &[u8], wide: bool) -> Result<Stats, WireError> {
    let attrs = parse_attrs(nested_payload)?;
    let h = attrs.get_attr_handle();
    let num = |ty: u16, is_u64: bool| -> Result<u64, WireError> {
        if is_u64 {
            Ok(fixed::<8>(&h, ty, "stats counter")?.map_or(0, u64::from_ne_bytes))
        } else {
            Ok(fixed::<4>(&h, ty, "stats counter")?.map_or(0, |b| u32::from_ne_bytes(b).into()))
        }
    };
    use stats_attr::*;
    Ok(Stats {
        conns: num(CONNS, wide)?,
        in_packets: num(INPKTS, wide)?,
        out_packets: num(OUTPKTS, wide)?,
        in_bytes: num(INBYTES, true)?,
        out_bytes: num(OUTBYTES, true)?,
        cps: num(CPS, wide)?,
        in_pps: num(INPPS, wide)?,
        out_pps: num(OUTPPS, wide)?,
        in_bps: num(INBPS, wide)?,
        out_bps: num(OUTBPS, wide)?,
    })
}

/// Stats from STATS64, or from STATS where STATS64 is absent (kernels before 4.1), or zero.
fn stats_of(h: &GenlAttrHandle<'_, u16>, stats64: u16, stats32: u16) -> Result<Stats, WireError> {
    if let Some(b) = get(h, stats64) {
        parse_stats(b, true)
    } else if let Some(b) = get(h, stats32) {
        parse_stats(b, false)
    } else {
        Ok(Stats::default())
    }
}

/// Decodes the payload of an `IPVS_CMD_ATTR_SERVICE` as the kernel fills it in a
/// NEW_SERVICE reply. `HASHED` is stripped from the flags (see [`writable_flags`]).
pub fn parse_service(nested_payload: &[u8]) -> Result<Service, WireError> {
    let attrs = parse_attrs(nested_payload)?;
    let h = attrs.get_attr_handle();
    let family = family_of_af(u16_ne(&h, svc_attr::AF, "service AF")?)?;
    let fwmark = opt_u32(&h, svc_attr::FWMARK, "service FWMARK")?;
    let key = if fwmark != 0 {
        ServiceKey::Fwmark {
            family,
            mark: fwmark,
        }
    } else {
        let proto = u16_ne(&h, svc_attr::PROTOCOL, "service PROTOCOL")?;
        ServiceKey::Inet {
            addr: ip_from(family, req(&h, svc_attr::ADDR, "service ADDR")?),
            protocol: Protocol::from_number(proto)
                .ok_or_else(|| format!("unknown service protocol {proto}"))?,
            port: u16::from_be_bytes(req(&h, svc_attr::PORT, "service PORT")?),
        }
    };
    let scheduler = match get(&h, svc_attr::SCHED_NAME) {
        Some(b) => {
            let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
            String::from_utf8(b[..end].to_vec())
                .map_err(|_| "scheduler name is not UTF-8".to_string())?
        }
        None => return Err("service SCHED_NAME missing".into()),
    };
    let flags: [u8; 8] = req(&h, svc_attr::FLAGS, "service FLAGS")?;
    let flags = u32::from_ne_bytes([flags[0], flags[1], flags[2], flags[3]]);
    Ok(Service {
        key,
        scheduler,
        flags: writable_flags(flags),
        timeout: u32_ne(&h, svc_attr::TIMEOUT, "service TIMEOUT")?,
        netmask: netmask_from_bytes(family, req(&h, svc_attr::NETMASK, "service NETMASK")?),
        stats: stats_of(&h, svc_attr::STATS64, svc_attr::STATS)?,
    })
}

/// Decodes the payload of an `IPVS_CMD_ATTR_DEST` as the kernel fills it in a NEW_DEST reply.
/// `service_family` is used when ADDR_FAMILY is absent (kernels before 4.x).
pub fn parse_destination(
    nested_payload: &[u8],
    service_family: Family,
) -> Result<Destination, WireError> {
    let attrs = parse_attrs(nested_payload)?;
    let h = attrs.get_attr_handle();
    let family = match fixed::<2>(&h, dest_attr::ADDR_FAMILY, "destination ADDR_FAMILY")? {
        Some(b) => family_of_af(u16::from_ne_bytes(b))?,
        None => service_family,
    };
    let fwd = u32_ne(&h, dest_attr::FWD_METHOD, "destination FWD_METHOD")?;
    Ok(Destination {
        addr: ip_from(family, req(&h, dest_attr::ADDR, "destination ADDR")?),
        port: u16::from_be_bytes(req(&h, dest_attr::PORT, "destination PORT")?),
        forwarding: Forwarding::from_conn_flags(fwd)
            .ok_or_else(|| format!("unknown forwarding method {}", fwd & FWD_MASK))?,
        weight: u32_ne(&h, dest_attr::WEIGHT, "destination WEIGHT")?,
        upper_threshold: opt_u32(&h, dest_attr::U_THRESH, "destination U_THRESH")?,
        lower_threshold: opt_u32(&h, dest_attr::L_THRESH, "destination L_THRESH")?,
        active_conns: opt_u32(&h, dest_attr::ACTIVE_CONNS, "destination ACTIVE_CONNS")?,
        inactive_conns: opt_u32(&h, dest_attr::INACT_CONNS, "destination INACT_CONNS")?,
        persistent_conns: opt_u32(&h, dest_attr::PERSIST_CONNS, "destination PERSIST_CONNS")?,
        stats: stats_of(&h, dest_attr::STATS64, dest_attr::STATS)?,
    })
}

/// Decodes the top-level attributes of a SET_INFO reply.
pub fn parse_info(attrs: &GenlBuffer<u16, Buffer>) -> Result<Info, WireError> {
    let h = attrs.get_attr_handle();
    let v = u32_ne(&h, info_attr::VERSION, "info VERSION")?;
    Ok(Info {
        version: ((v >> 16) as u8, (v >> 8) as u8, v as u8),
        conn_table_size: u32_ne(&h, info_attr::CONN_TAB_SIZE, "info CONN_TAB_SIZE")?,
    })
}

/// The payload of the top-level attribute `ty` of a reply, if present.
pub fn top_level(attrs: &GenlBuffer<u16, Buffer>, ty: u16) -> Option<&[u8]> {
    AsRef::<[Nlattr<u16, Buffer>]>::as_ref(attrs)
        .iter()
        .find(|a| *a.nla_type().nla_type() == ty)
        .map(payload)
}

#[cfg(test)]
mod tests {
    //! Vectors computed by hand from `include/uapi/linux/ip_vs.h` (see the module docs for byte
    //! order). This machine is little-endian, like every machine lbd targets; host-order fields
    //! are written accordingly.

    use super::*;
    use crate::ipvs::{IP_VS_SVC_F_HASHED, IP_VS_SVC_F_PERSISTENT};

    #[cfg(not(target_endian = "little"))]
    compile_error!("the hand-computed vectors below assume a little-endian host");

    fn tcp_key() -> ServiceKey {
        ServiceKey::Inet {
            addr: "10.0.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        }
    }

    #[rustfmt::skip]
    const TCP_SERVICE_FULL: &[u8] = &[
        // IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED, len 4 + 8+8+20+8+8+12+8+8 = 84
        84, 0, 0x01, 0x80,
        6, 0, 1, 0,   2, 0, 0, 0,                 // AF = AF_INET (u16) + 2 pad
        6, 0, 2, 0,   6, 0, 0, 0,                 // PROTOCOL = IPPROTO_TCP
        20, 0, 3, 0,  10, 0, 0, 1,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0, // ADDR nf_inet_addr
        6, 0, 4, 0,   0, 80, 0, 0,                // PORT = be16 80
        8, 0, 6, 0,   b'w', b'r', b'r', 0,        // SCHED_NAME "wrr\0"
        12, 0, 7, 0,  1, 0, 0, 0,  0xff, 0xff, 0xff, 0xff, // FLAGS {PERSISTENT, mask ~0}
        8, 0, 8, 0,   0x2c, 0x01, 0, 0,           // TIMEOUT = 300
        8, 0, 9, 0,   255, 255, 255, 0,           // NETMASK 255.255.255.0 (be32)
    ];

    #[test]
    fn encodes_a_full_tcp_service() {
        let s = Service {
            key: tcp_key(),
            scheduler: "wrr".into(),
            // HASHED must never be sent.
            flags: IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_HASHED,
            timeout: 300,
            netmask: 0xffff_ff00,
            stats: Stats::default(),
        };
        assert_eq!(
            to_bytes(&[service_attr(&s).unwrap()]).unwrap(),
            TCP_SERVICE_FULL
        );
    }

    #[test]
    fn encodes_service_keys() {
        #[rustfmt::skip]
        let fwm: &[u8] = &[
            20, 0, 0x01, 0x80,
            6, 0, 1, 0,  10, 0, 0, 0,   // AF_INET6
            8, 0, 5, 0,  5, 0, 0, 0,    // FWMARK 5 (host order)
        ];
        let key = ServiceKey::Fwmark {
            family: Family::V6,
            mark: 5,
        };
        assert_eq!(to_bytes(&[service_key_attr(&key).unwrap()]).unwrap(), fwm);
        assert!(service_key_attr(&ServiceKey::Fwmark {
            family: Family::V4,
            mark: 0
        })
        .is_err());

        let v6 = ServiceKey::Inet {
            addr: "2001:db8::1".parse().unwrap(),
            protocol: Protocol::Udp,
            port: 0x1234,
        };
        #[rustfmt::skip]
        let expected: &[u8] = &[
            48, 0, 0x01, 0x80,
            6, 0, 1, 0,  10, 0, 0, 0,
            6, 0, 2, 0,  17, 0, 0, 0,
            20, 0, 3, 0,  0x20, 0x01, 0x0d, 0xb8,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 1,
            6, 0, 4, 0,  0x12, 0x34, 0, 0,
        ];
        assert_eq!(
            to_bytes(&[service_key_attr(&v6).unwrap()]).unwrap(),
            expected
        );
    }

    #[test]
    fn ipv6_netmask_is_a_host_order_prefix_length() {
        assert_eq!(netmask_bytes(Family::V6, 64), [64, 0, 0, 0]);
        assert_eq!(netmask_bytes(Family::V4, 0xffff_0000), [255, 255, 0, 0]);
    }

    #[rustfmt::skip]
    const DR_DEST: &[u8] = &[
        // IPVS_CMD_ATTR_DEST | NLA_F_NESTED, len 4 + 20+8+8+8+8+8+8 = 72
        72, 0, 0x02, 0x80,
        20, 0, 1, 0,  10, 0, 1, 2,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0, // ADDR
        6, 0, 2, 0,   0x1f, 0x90, 0, 0,           // PORT = be16 8080
        6, 0, 11, 0,  2, 0, 0, 0,                 // ADDR_FAMILY = AF_INET
        8, 0, 3, 0,   3, 0, 0, 0,                 // FWD_METHOD = DROUTE
        8, 0, 4, 0,   5, 0, 0, 0,                 // WEIGHT 5
        8, 0, 5, 0,   0xe8, 0x03, 0, 0,           // U_THRESH 1000
        8, 0, 6, 0,   100, 0, 0, 0,               // L_THRESH 100
    ];

    #[test]
    fn encodes_a_full_destination() {
        let d = Destination {
            upper_threshold: 1000,
            lower_threshold: 100,
            ..Destination::new(
                "10.0.1.2".parse().unwrap(),
                8080,
                Forwarding::DirectRoute,
                5,
            )
        };
        assert_eq!(to_bytes(&[dest_attr(&d).unwrap()]).unwrap(), DR_DEST);
        #[rustfmt::skip]
        let key: &[u8] = &[
            40, 0, 0x02, 0x80,
            20, 0, 1, 0,  10, 0, 1, 2,  0, 0, 0, 0,  0, 0, 0, 0,  0, 0, 0, 0,
            6, 0, 2, 0,   0x1f, 0x90, 0, 0,
            6, 0, 11, 0,  2, 0, 0, 0,
        ];
        assert_eq!(
            to_bytes(&[dest_key_attr("10.0.1.2".parse().unwrap(), 8080).unwrap()]).unwrap(),
            key
        );
    }

    #[test]
    fn forwarding_methods_match_ip_vs_h() {
        for (f, v) in [
            (Forwarding::Masquerade, 0),
            (Forwarding::Local, 1),
            (Forwarding::Tunnel, 2),
            (Forwarding::DirectRoute, 3),
            (Forwarding::Bypass, 4),
        ] {
            assert_eq!(f.conn_flags(), v);
            // The kernel reports only the FWD_MASK bits, but be lenient with the others.
            assert_eq!(Forwarding::from_conn_flags(v | 0x100), Some(f));
        }
        assert_eq!(Forwarding::from_conn_flags(5), None);
    }

    fn u64_attr(ty: u16, v: u64) -> Vec<u8> {
        let mut b = vec![12, 0, ty as u8, 0];
        b.extend_from_slice(&v.to_le_bytes());
        b
    }

    fn u32_attr(ty: u16, v: u32) -> Vec<u8> {
        let mut b = vec![8, 0, ty as u8, 0];
        b.extend_from_slice(&v.to_le_bytes());
        b
    }

    fn nest(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut b = ((body.len() + 4) as u16).to_le_bytes().to_vec();
        b.extend_from_slice(&(ty | 0x8000).to_le_bytes());
        b.extend_from_slice(body);
        b
    }

    /// STATS64 as the kernel fills it: ten u64 (plus a zero-length PAD attribute, which
    /// `nla_put_u64_64bit` adds where u64 alignment needs it).
    fn stats64_body(base: u64) -> Vec<u8> {
        let mut b = vec![4, 0, 11, 0]; // IPVS_STATS_ATTR_PAD
        for ty in 1..=10u16 {
            b.extend(u64_attr(ty, base + u64::from(ty)));
        }
        b
    }

    fn expected_stats(base: u64) -> Stats {
        Stats {
            conns: base + 1,
            in_packets: base + 2,
            out_packets: base + 3,
            in_bytes: base + 4,
            out_bytes: base + 5,
            cps: base + 6,
            in_pps: base + 7,
            out_pps: base + 8,
            in_bps: base + 9,
            out_bps: base + 10,
        }
    }

    #[test]
    fn decodes_a_kernel_service_with_stats64() {
        let mut body = Vec::new();
        body.extend([6, 0, 1, 0, 2, 0, 0, 0]); // AF_INET
        body.extend([6, 0, 2, 0, 17, 0, 0, 0]); // UDP
        body.extend([20, 0, 3, 0, 192, 0, 2, 7]);
        body.extend([0; 12]);
        body.extend([6, 0, 4, 0, 0x14, 0xe9, 0, 0]); // port 5353
        body.extend([7, 0, 6, 0, b's', b'h', 0, 0]); // "sh\0" + pad
        body.extend([12, 0, 7, 0, 0x1a, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]); // HASHED|SCHED1|SCHED2
        body.extend(u32_attr(8, 0));
        body.extend([8, 0, 9, 0, 255, 255, 255, 255]);
        // STATS (u32 counters) with different values: STATS64 must win.
        let mut stats32 = Vec::new();
        for ty in 1..=3u16 {
            stats32.extend(u32_attr(ty, 999));
        }
        body.extend(nest(10, &stats32));
        body.extend(nest(12, &stats64_body(1 << 40)));
        let s = parse_service(&body).unwrap();
        assert_eq!(
            s.key,
            ServiceKey::Inet {
                addr: "192.0.2.7".parse().unwrap(),
                protocol: Protocol::Udp,
                port: 5353
            }
        );
        assert_eq!(s.scheduler, "sh");
        assert_eq!(s.flags, 0x18, "HASHED is stripped");
        assert_eq!(s.netmask, u32::MAX);
        assert_eq!(s.stats, expected_stats(1 << 40));

        // Round trip of what lbd writes.
        let full = to_bytes(&[service_attr(&Service {
            stats: Stats::default(),
            ..s.clone()
        })
        .unwrap()])
        .unwrap();
        let back = parse_service(&full[4..]).unwrap();
        assert_eq!(
            back,
            Service {
                stats: Stats::default(),
                ..s
            }
        );
    }

    #[test]
    fn decodes_fwmark_and_ipv6_services() {
        let mut body = Vec::new();
        body.extend([6, 0, 1, 0, 10, 0, 0, 0]); // AF_INET6
        body.extend(u32_attr(5, 77)); // FWMARK
        body.extend([8, 0, 6, 0, b'r', b'r', 0, 0]);
        body.extend([12, 0, 7, 0, 3, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        body.extend(u32_attr(8, 60));
        body.extend([8, 0, 9, 0, 48, 0, 0, 0]); // prefix length 48, host order
        let s = parse_service(&body).unwrap();
        assert_eq!(
            s.key,
            ServiceKey::Fwmark {
                family: Family::V6,
                mark: 77
            }
        );
        assert_eq!(
            (s.flags, s.timeout, s.netmask),
            (IP_VS_SVC_F_PERSISTENT, 60, 48)
        );
        assert_eq!(s.stats, Stats::default());
    }

    #[test]
    fn decodes_a_kernel_destination_with_stats32_fallback() {
        let mut body = Vec::new();
        body.extend([20, 0, 1, 0]);
        body.extend("2001:db8::9".parse::<Ipv6Addr>().unwrap().octets());
        body.extend([6, 0, 2, 0, 0, 80, 0, 0]);
        body.extend(u32_attr(3, 2)); // TUNNEL
        body.extend(u32_attr(4, 7));
        body.extend([5, 0, 13, 0, 0, 0, 0, 0]); // TUN_TYPE u8 (ignored)
        body.extend(u32_attr(5, 10));
        body.extend(u32_attr(6, 3));
        body.extend(u32_attr(7, 11));
        body.extend(u32_attr(8, 12));
        body.extend(u32_attr(9, 13));
        // STATS only (pre-4.1 kernel): u32 counters and rates, u64 bytes.
        let mut stats = Vec::new();
        for ty in 1..=10u16 {
            if ty == 4 || ty == 5 {
                stats.extend(u64_attr(ty, (1 << 33) + u64::from(ty)));
            } else {
                stats.extend(u32_attr(ty, 100 + u32::from(ty)));
            }
        }
        body.extend(nest(10, &stats));
        body.extend([6, 0, 11, 0, 10, 0, 0, 0]);
        let d = parse_destination(&body, Family::V4).unwrap();
        assert_eq!(d.addr, "2001:db8::9".parse::<IpAddr>().unwrap());
        assert_eq!(d.port, 80);
        assert_eq!(d.forwarding, Forwarding::Tunnel);
        assert_eq!((d.weight, d.upper_threshold, d.lower_threshold), (7, 10, 3));
        assert_eq!(
            (d.active_conns, d.inactive_conns, d.persistent_conns),
            (11, 12, 13)
        );
        assert_eq!(d.stats.conns, 101);
        assert_eq!(d.stats.in_bytes, (1 << 33) + 4);
        assert_eq!(d.stats.out_bytes, (1 << 33) + 5);
        assert_eq!(d.stats.out_bps, 110);

        // ADDR_FAMILY (last, 8 bytes) wins over the service's family; without it (kernels before
        // 4.x) the service's family applies.
        let without_af = parse_destination(&body[..body.len() - 8], Family::V6).unwrap();
        assert_eq!(without_af, d);
        let as_v4 = parse_destination(&body[..body.len() - 8], Family::V4).unwrap();
        assert_eq!(as_v4.addr, "32.1.13.184".parse::<IpAddr>().unwrap());

        // What lbd writes decodes back.
        let written = to_bytes(&[dest_attr(&Destination::new(
            "10.1.1.1".parse().unwrap(),
            443,
            Forwarding::Masquerade,
            1,
        ))
        .unwrap()])
        .unwrap();
        let back = parse_destination(&written[4..], Family::V6).unwrap();
        assert_eq!(
            back,
            Destination::new("10.1.1.1".parse().unwrap(), 443, Forwarding::Masquerade, 1)
        );
    }

    #[test]
    fn decodes_info() {
        let bytes = [u32_attr(1, 0x010201), u32_attr(2, 4096)].concat();
        let attrs = parse_attrs(&bytes).unwrap();
        assert_eq!(
            parse_info(&attrs).unwrap(),
            Info {
                version: (1, 2, 1),
                conn_table_size: 4096
            }
        );
    }

    #[test]
    fn rejects_truncated_and_malformed_attributes() {
        assert!(parse_service(&[6, 0, 1, 0, 2, 0, 0, 0]).is_err(), "no key");
        assert!(
            parse_attrs(&[40, 0, 1, 0, 0, 0]).is_err(),
            "length past the end"
        );
        let mut body = Vec::new();
        body.extend([6, 0, 1, 0, 2, 0, 0, 0]);
        body.extend([6, 0, 2, 0, 6, 0, 0, 0]);
        body.extend([8, 0, 3, 0, 10, 0, 0, 1]); // ADDR too short
        body.extend([6, 0, 4, 0, 0, 80, 0, 0]);
        assert!(parse_service(&body).unwrap_err().contains("ADDR"));
        let long = Service::new(tcp_key(), "a-very-long-scheduler");
        assert!(service_attr(&long).unwrap_err().contains("scheduler"));
    }
}
