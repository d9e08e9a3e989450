//! Types shared by the XDP program (`lb-ebpf`) and the controller (`lb-userspace`).
//!
//! Rules for every map key and value here: `#[repr(C)]`, explicit padding fields (zeroed by the
//! writer), no `bool`/enum/`Option`, a compile-time size assertion, and the byte order of every
//! multi-byte field written next to it. "BE" = network byte order, "host" = native order.
#![no_std]

/// Map names, shared so userspace cannot drift from the program.
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const TABLES: &str = "TABLES";
    pub const CONNTRACK4: &str = "CONNTRACK4";
    pub const CONNTRACK6: &str = "CONNTRACK6";
    pub const VIP_FLAGS: &str = "VIP_FLAGS";
    pub const ADDR_FILTER: &str = "ADDR_FILTER";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
}

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "lbd_xdp";

/// Address families as stored in keys (not the kernel's AF_* numbers, to keep them one byte).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Backend id stored in a table slot when the VIP has no usable backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// Default map sizes; the loader overrides them from the config (`map_max_entries`).
pub const DEFAULT_MAX_VIPS: u32 = 64;
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;
pub const DEFAULT_TABLE_SIZE: u32 = 65537;
pub const DEFAULT_CONNTRACK_SIZE: u32 = 262_144;

/// Key of the `VIPS` hash map: which traffic is VIP traffic.
///
/// IPv4 addresses occupy `addr[0]` with `addr[1..4]` zero. A VIP configured with port 0 is stored
/// with `port = 0` and matches every port of its address (looked up after the exact port misses).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    /// Destination address, BE (each u32 holds 4 address bytes in wire order).
    pub addr: [u32; 4],
    /// Destination port, BE; 0 = any port.
    pub port: u16,
    /// IP protocol number (`PROTO_TCP` / `PROTO_UDP`).
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// Value of the `VIPS` hash map.
///
/// The VIP's lookup table is double buffered: `TABLES` holds two tables per VIP id, and `active`
/// says which one readers use. The controller fills the idle table completely, then replaces this
/// whole value with one map update (hash map updates swap the element under RCU, so a reader sees
/// either the old or the new value, never a mix).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    /// Index of this VIP in `VIP_STATS` and in `TABLES` (host order).
    pub vip_id: u32,
    /// Which of the two tables is live: 0 or 1 (host order).
    pub active: u32,
    /// `VIP_F_*` bits (host order).
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 16);

/// Forward this VIP's traffic. Cleared on a backup director (VRRP), which then passes nothing on.
pub const VIP_F_ENABLED: u32 = 1;
/// The VIP has port 0 (every port of its address). In `VIP_FLAGS` only: a connection-table hit
/// on such a VIP checks that no port-specific VIP has since taken the flow's port.
pub const VIP_F_ANY_PORT: u32 = 2;

/// Words (u32) of the `ADDR_FILTER` array: a bitmap of `ADDR_FILTER_WORDS * 32` bits, one set
/// for every VIP address (see [`addr_filter_bit`]). A clear bit proves "not a VIP address" with
/// one array read; a set bit may be a collision, and the `VIPS` lookup decides.
pub const ADDR_FILTER_WORDS: u32 = 1024;
const ADDR_FILTER_SHIFT: u32 = 32 - 15; // 2^15 bits = 1024 words
const _: () = assert!(ADDR_FILTER_WORDS * 32 == 1 << (32 - ADDR_FILTER_SHIFT));

/// Bit of an IPv4 address (BE bytes read as a host u32, like `FlowKey4::dst`) in `ADDR_FILTER`:
/// word `bit / 32`, bit `bit % 32` of that word. Multiplicative (Fibonacci) hashing.
#[inline(always)]
pub fn addr_filter_bit_v4(addr: u32) -> u32 {
    addr.wrapping_mul(0x9e37_79b1) >> ADDR_FILTER_SHIFT
}

/// Bit of an IPv6 address (four words as in `FlowKey::dst`) in `ADDR_FILTER`.
#[inline(always)]
pub fn addr_filter_bit_v6(addr: &[u32; 4]) -> u32 {
    let folded = addr[0] ^ addr[1].rotate_left(8) ^ addr[2].rotate_left(16) ^ addr[3].rotate_left(24);
    addr_filter_bit_v4(folded ^ 0x6666_6666)
}

/// Bit of an address as stored in `VipKey::addr` with its family.
#[inline(always)]
pub fn addr_filter_bit(addr: &[u32; 4], family: u8) -> u32 {
    if family == FAMILY_V4 { addr_filter_bit_v4(addr[0]) } else { addr_filter_bit_v6(addr) }
}

/// Value of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Destination MAC written into forwarded frames (wire order).
    pub dst_mac: [u8; 6],
    /// Source MAC written into forwarded frames: the egress interface's own MAC (wire order).
    pub src_mac: [u8; 6],
    /// Egress interface (host order). Equal to the ingress ifindex → `XDP_TX`, else `XDP_REDIRECT`
    /// through `TX_PORTS`.
    pub ifindex: u32,
    /// VIP this backend serves (host order); a connection entry is only honoured for it.
    pub vip_id: u32,
    /// Bumped each time the id is given to another backend (host order); connection entries carry
    /// the generation they were created with, so a recycled id never inherits old flows.
    pub generation: u32,
    /// `BACKEND_F_*` bits (host order).
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 28);

/// The backend exists and may keep its established flows (it may still have weight 0).
pub const BACKEND_F_ALIVE: u32 = 1;

/// Key of the `CONNTRACK4` LRU hash: one direction of an IPv4 flow as the director sees it.
/// 16 bytes rather than `FlowKey`'s 40: the kernel hashes and compares whole keys, so IPv4 flows
/// cost less with their own map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey4 {
    /// Source address, BE.
    pub src: u32,
    /// Destination address, BE.
    pub dst: u32,
    /// Source port, BE.
    pub sport: u16,
    /// Destination port, BE.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Padding, zero. Two fields rather than `[u8; 3]`, which the BPF target zeroes with a
    /// byte-loop `memset` call.
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey4>() == 16);

/// Key of the `CONNTRACK6` LRU hash (IPv6 flows; IPv4 ones use [`FlowKey4`]), and the input of
/// [`flow_hash`] for both families: one direction of a flow as the director sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source address, BE (IPv4 in `src[0]`).
    pub src: [u32; 4],
    /// Destination address, BE (IPv4 in `dst[0]`).
    pub dst: [u32; 4],
    /// Source port, BE.
    pub sport: u16,
    /// Destination port, BE.
    pub dport: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Value of the `CONNTRACK4` and `CONNTRACK6` LRU hashes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// Backend id (host order).
    pub backend: u32,
    /// `Backend::generation` at creation (host order).
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 8);

/// Per-VIP and per-backend counters (values of per-CPU arrays; userspace sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// Packets forwarded (host order).
    pub packets: u64,
    /// Bytes forwarded, whole frames (host order).
    pub bytes: u64,
    /// Flows that got a backend from the lookup table rather than the connection table (host order).
    pub new_flows: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 24);

/// Reasons counted in `GLOBAL_STATS` (index = reason). Every packet increments exactly one.
pub mod reason {
    /// Forwarded with a connection-table hit.
    pub const CONNTRACK_HIT: u32 = 0;
    /// Forwarded; backend chosen from the lookup table (new flow or re-chosen flow).
    pub const NEW_FLOW: u32 = 1;
    /// Passed: not IPv4/IPv6 (ARP, LLDP, ...).
    pub const NOT_IP: u32 = 2;
    /// Passed: IP but not to a VIP (the director's own traffic, replies, ICMP, ...).
    pub const NOT_VIP: u32 = 3;
    /// Dropped: VIP with no usable backend.
    pub const NO_BACKEND: u32 = 4;
    /// Passed: headers truncated or inconsistent (the kernel decides what to do with it).
    pub const MALFORMED: u32 = 5;
    /// Dropped: IP fragment to a VIP (see lb-ebpf/src/parse.rs for why).
    pub const FRAGMENT: u32 = 6;
    /// Dropped: VIP traffic while this director does not forward it (VRRP backup).
    pub const VIP_DISABLED: u32 = 7;
    /// Aborted: the redirect helper failed (egress interface missing from `TX_PORTS`).
    pub const REDIRECT_FAILED: u32 = 8;
    pub const COUNT: u32 = 9;

    /// Names in index order, as shown by `lbd status`.
    pub const NAMES: [&str; COUNT as usize] = [
        "conntrack-hit",
        "new-flow",
        "not-ip",
        "not-vip",
        "no-backend",
        "malformed",
        "fragment",
        "vip-disabled",
        "redirect-failed",
    ];
}

/// Per-CPU global counter: packets and bytes for one reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReasonCounter {
    /// Packets (host order).
    pub packets: u64,
    /// Bytes (host order).
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<ReasonCounter>() == 16);

/// The flow hash that indexes lookup tables. Shared so that tests and tools can predict which
/// slot a flow lands in. It is part of the on-wire contract between two directors (both must pick
/// the same backend for a flow): never change it without changing both.
///
/// jhash-style final mix (Bob Jenkins' lookup3 `final`) over the 5-tuple words; the addresses and
/// ports are hashed exactly as they sit in `FlowKey` (BE bytes read as host-order u32).
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    flow_hash_parts(key.proto, key.sport, key.dport, &key.src, &key.dst)
}

/// [`flow_hash`] of the `FlowKey` an IPv4 flow would have (addresses in word 0, the rest zero).
#[inline(always)]
pub fn flow_hash_v4(key: &FlowKey4) -> u32 {
    flow_hash_parts(key.proto, key.sport, key.dport, &[key.src, 0, 0, 0], &[key.dst, 0, 0, 0])
}

#[inline(always)]
fn flow_hash_parts(proto: u8, sport: u16, dport: u16, src: &[u32; 4], dst: &[u32; 4]) -> u32 {
    let mut a: u32 = 0xdead_beef ^ (proto as u32);
    let mut b: u32 = 0x9e37_79b9;
    let mut c: u32 = (sport as u32) << 16 | dport as u32;
    let mut i = 0;
    while i < 4 {
        a = a.wrapping_add(src[i]);
        b = b.wrapping_add(dst[i]);
        jhash_final(&mut a, &mut b, &mut c);
        i += 1;
    }
    c
}

#[inline(always)]
fn jhash_final(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for ReasonCounter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_hash_v4_is_flow_hash_of_the_long_key() {
        for i in 0u32..1000 {
            let k4 = FlowKey4 {
                src: i.wrapping_mul(0x0101_0301),
                dst: 0x0102_a8c0 ^ i,
                sport: (i as u16).wrapping_mul(7),
                dport: 80u16.to_be(),
                proto: if i % 2 == 0 { PROTO_TCP } else { PROTO_UDP },
                _pad0: 0,
                _pad1: 0,
            };
            let k = FlowKey {
                src: [k4.src, 0, 0, 0],
                dst: [k4.dst, 0, 0, 0],
                sport: k4.sport,
                dport: k4.dport,
                proto: k4.proto,
                family: FAMILY_V4,
                _pad: [0; 2],
            };
            assert_eq!(flow_hash_v4(&k4), flow_hash(&k));
        }
    }

    #[test]
    fn addr_filter_bits_are_in_range() {
        for i in 0u32..100_000 {
            let w = i.wrapping_mul(0x9e37_79b9);
            assert!(addr_filter_bit_v4(w) < ADDR_FILTER_WORDS * 32);
            assert!(addr_filter_bit_v6(&[w, !w, i, 7]) < ADDR_FILTER_WORDS * 32);
        }
    }
}
