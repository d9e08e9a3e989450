//! Types shared by the XDP program (`lb-ebpf`) and the controller (`lb-userspace`).
//!
//! Rules for every map key and value here: `#[repr(C)]`, explicit padding fields (zeroed by the
//! writer), no `bool`/enum/`Option`, a compile-time size assertion, and the byte order of every
//! multi-byte field written next to it. "BE" = network byte order, "host" = native order.
#![no_std]

/// Map names, shared so userspace cannot drift from the program.
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const VIP_STATE: &str = "VIP_STATE";
    pub const BACKENDS: &str = "BACKENDS";
    pub const TABLES: &str = "TABLES";
    pub const CONNTRACK4: &str = "CONNTRACK4";
    pub const CONNTRACK6: &str = "CONNTRACK6";
    pub const ADDR_FILTER: &str = "ADDR_FILTER";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
}

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "lbd_xdp";

/// Address families as stored in keys (not the kernel's AF_* numbers, to keep them one byte).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Backend id stored in a table slot when the VIP has no usable backend.
pub const NO_BACKEND: u32 = u32::MAX;

/// Lookup-table slots per `TABLES` element.
pub const TABLE_CHUNK: u32 = 16;

/// An element of `TABLES`: 16 consecutive slots of a lookup table, one 64-byte cache line. The
/// kernel lays array elements out at their value size rounded up to 8 bytes, so a `u32` per
/// element would take 8 bytes per slot; packed, a VIP's table (M = 65537) takes 256 KiB instead
/// of 512 KiB, and a new flow's slot is more often in the cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableChunk {
    /// Backend ids (`NO_BACKEND` if none), host order.
    pub ids: [u32; TABLE_CHUNK as usize],
}
const _: () = assert!(core::mem::size_of::<TableChunk>() == 64);

/// `TABLES` elements one lookup table of `m` slots occupies (each of a VIP's two buffers starts
/// on an element of its own).
#[inline(always)]
pub const fn table_chunks(m: u32) -> u32 {
    m.div_ceil(TABLE_CHUNK)
}

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

/// Value of the `VIPS` hash map: the VIP's id, for as long as its key is in the map.
///
/// Written once, when the VIP first goes live, and never updated in place: in a preallocated
/// hash map an update of an existing key frees the old element at once (it becomes the CPU's
/// spare, reused by the next such update), so a program run between its lookup and its read
/// could read another VIP's id there and pin a flow to that VIP's real server. What changes
/// (which table is live, the flags) is in `VIP_STATE`, written in place. A deleted element is
/// reused by a later insert, so the controller lets an RCU grace period pass between removing a
/// key and inserting any key, and before giving the removed VIP's id out again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    /// Index of this VIP in `VIP_STATE` and `TABLES` (host order).
    pub vip_id: u32,
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 4);

/// Element of the `VIP_STATE` array, indexed by VIP id: what changes while the VIP exists.
///
/// The VIP's lookup table is double buffered: `TABLES` holds two tables per VIP id, and `active`
/// says which one readers use. The controller fills the idle table completely, then stores
/// `active` (the map is memory-mapped: one 4-byte store, release-ordered after the table's), and
/// lets an RCU grace period pass before it writes into the buffer it flipped away from. The two
/// fields are each a whole store, read once by the program; each is valid with any value of the
/// other.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipState {
    /// Which of the two tables is live: 0 or 1 (host order).
    pub active: u32,
    /// `VIP_F_*` bits (host order).
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<VipState>() == 8);

/// Forward this VIP's traffic. Cleared on a backup director (VRRP), which then passes nothing on.
pub const VIP_F_ENABLED: u32 = 1;

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

/// Bit of an IPv6 address (four words as in `FlowKey::dst`) in `ADDR_FILTER`. The words are
/// folded by XOR alone, which the program does on the two 8-byte halves it loads in three
/// instructions (rotating three of the words first, as this did before, took about 20 more, and
/// IPv6 hits 17 ns against 16); the multiplication then spreads the fold.
#[inline(always)]
pub fn addr_filter_bit_v6(addr: &[u32; 4]) -> u32 {
    let folded = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
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
/// Copies of its VIP's state, so that a connection-table hit reads no VIP element: the VIP
/// forwards (its `VIP_F_ENABLED`; the controller rewrites the VIP's backends when it changes) ...
pub const BACKEND_F_VIP_ENABLED: u32 = 2;
/// ... and the VIP has port 0 (every port of its address): a hit on such a VIP checks that no
/// port-specific VIP has since taken the flow's port.
pub const BACKEND_F_VIP_ANY_PORT: u32 = 4;

/// Key of the `CONNTRACK4` connection table: one direction of an IPv4 flow as the director sees
/// it. 16 bytes rather than `FlowKey`'s 40, so IPv4 entries take 32 bytes; 8-byte aligned so the
/// program compares it as two `u64` words.
#[repr(C, align(8))]
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

/// Key of the `CONNTRACK6` connection table (IPv6 flows; IPv4 ones use [`FlowKey4`]), and the
/// input of [`flow_hash`] for both families: one direction of a flow as the director sees it.
/// 8-byte aligned so the program compares it as five `u64` words.
#[repr(C, align(8))]
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

/// A backend id and the generation it had: value of the benchmark's LRU hash baselines
/// (`bench_maps_*`, the kernel map lbd's connection tables used to be).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    /// Backend id (host order).
    pub backend: u32,
    /// `Backend::generation` at creation (host order).
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 8);

/// Ways (entries) per set of a connection table.
pub const CT_WAYS: usize = 8;

/// Version of what a connection table's contents mean: the entry layout, the set hash (with its
/// mixer) and [`ct_check`]. `lbd` keeps its tables across a restart (pinned), and a table is
/// taken over only by an `lbd` of the same version. Bump it whenever any of them changes.
pub const CT_FORMAT: u32 = 1;

/// Sets of a connection table meant to hold `entries` flows: `entries / CT_WAYS` rounded up to a
/// power of two (the set index is the top bits of [`CtKey::ct_hash`]), at least 2.
pub const fn ct_sets(entries: u32) -> u32 {
    let sets = entries.div_ceil(CT_WAYS as u32);
    if sets <= 2 { 2 } else { sets.next_power_of_two() }
}

/// Shift that turns a [`CtKey::ct_hash`] into a set index for a table of `sets` sets (a power of
/// two, 2..=2^31): `hash >> ct_shift(sets)`.
pub const fn ct_shift(sets: u32) -> u32 {
    32 - sets.trailing_zeros()
}

/// One entry of a connection table (`CONNTRACK4`: `CtEntry<FlowKey4>`, 32 bytes;
/// `CONNTRACK6`: `CtEntry<FlowKey>`, 56 bytes).
///
/// The tables are arrays of [`CtSet`]s that the program reads and writes in place, shared by all
/// CPUs. An entry is valid when `check` equals [`ct_check`] of its key's hash, backend and
/// generation: an all-zero (never written) entry is not, and neither is one that two CPUs wrote
/// at the same time and mixed, which then reads as a miss instead of sending the flow elsewhere.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtEntry<K> {
    pub key: K,
    /// Backend id (host order).
    pub backend: u32,
    /// `Backend::generation` at creation (host order).
    pub generation: u32,
    /// [`ct_check`] (host order); 0 = empty.
    pub check: u32,
    /// Not-recently-used bit (host order): 1 after a hit. An insert into a full set replaces an
    /// entry with 0 here; when all have 1, it replaces one and clears the set's bits. A new entry
    /// starts at 0, so flows that never send a second packet (a SYN flood) are replaced before
    /// established ones.
    pub used: u32,
}
const _: () = assert!(core::mem::size_of::<CtEntry<FlowKey4>>() == 32);
const _: () = assert!(core::mem::size_of::<CtEntry<FlowKey>>() == 56);

/// Value of the connection-table arrays: the [`CT_WAYS`] entries flows hashing to the set share.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtSet<K> {
    pub ways: [CtEntry<K>; CT_WAYS],
}
const _: () = assert!(core::mem::size_of::<CtSet<FlowKey4>>() == 256);
const _: () = assert!(core::mem::size_of::<CtSet<FlowKey>>() == 448);

/// A connection table's key: compared as whole `u64` words, hashed with a random key per load.
pub trait CtKey: Copy + 'static {
    /// The set hash's random key: two multipliers per 8-byte word of the key (one per 32-bit
    /// half) and an addend, `[u64; 2 * words + 1]`. The loader draws it from `getrandom` at each
    /// load (`CT_KEY4`, `CT_KEY6`).
    type HashKey: Copy;
    /// Whether `self` and `other` are the same flow (every byte equal, padding included).
    fn same(&self, other: &Self) -> bool;
    /// The 32-bit hash whose top bits pick the set: [`multiply_shift`] (with its mixer) of the
    /// key's 32-bit halves under `key`.
    fn ct_hash(&self, key: &Self::HashKey) -> u32;
}

/// Words of [`FlowKey4`]'s hash key (`CT_KEY4`): 2 words, 4 halves, and the addend.
pub const CT_HASH_KEY4: usize = 5;
/// Words of [`FlowKey`]'s hash key (`CT_KEY6`): 5 words, 10 halves, and the addend.
pub const CT_HASH_KEY6: usize = 11;

/// Reads the `N` 8-byte words of a `repr(C, align(8))` key.
#[inline(always)]
fn key_words<K, const N: usize>(key: &K) -> &[u64; N] {
    const { assert!(core::mem::size_of::<K>() == N * 8 && core::mem::align_of::<K>() == 8) };
    // SAFETY: same size, alignment satisfied, every bit pattern is a valid u64, and the keys have
    // no padding the compiler owns (every byte is a named field).
    unsafe { &*(key as *const K as *const [u64; N]) }
}

/// Vector multiply-shift (Dietzfelbinger; Thorup, "High Speed Hashing for Integers and
/// Strings", 2015), then one round of SplitMix64's mixer: with `x_i` the 32-bit halves of `words`
/// and `a_i`, `b` the 64-bit words of a uniformly random `key`, `s = (b + sum a_i * x_i) mod 2^64`,
/// then `s ^= s >> 29; s *= 0xbf58_476d_1ce4_e5b9` (mod 2^64), and the top 32 bits.
///
/// Multiply-shift alone (the top 32 bits of `s`) is strongly universal, so a client that does not
/// know the key cannot aim flows at one set; but it is linear, and pairwise guarantees say
/// nothing of how full the fullest of the 8-way sets gets. Consecutive client addresses form a
/// lattice under it: for about one key in a hundred, 65,536 of them crowded one set of 4,096 with
/// 45 to 1,560 flows (`conntrack_hash_spreads_consecutive_addresses_for_every_key`), and a CI run
/// of the benchmark lost 3,552 of 100,000 established flows to full sets. The mixer, a bijection
/// of `s`, breaks the lattice; the spread is checked over many keys rather than proven. All
/// products of the sum are independent, so the hash stays a multiplication deep before the
/// mixer's shift and multiplication.
#[inline(always)]
pub fn multiply_shift<const N: usize, const M: usize>(words: &[u64; N], key: &[u64; M]) -> u32 {
    const { assert!(M == 2 * N + 1) };
    let mut sum = key[2 * N];
    let mut i = 0;
    while i < N {
        sum = sum
            .wrapping_add((words[i] & 0xffff_ffff).wrapping_mul(key[2 * i]))
            .wrapping_add((words[i] >> 32).wrapping_mul(key[2 * i + 1]));
        i += 1;
    }
    sum ^= sum >> 29;
    sum = sum.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (sum >> 32) as u32
}

/// A hash key expanded from `seed` by SplitMix64: for tests, and for the loader when the kernel
/// gives no random bytes (then warned about: such a key is predictable).
#[cfg(any(test, feature = "user"))]
pub fn splitmix_key<const M: usize>(seed: u64) -> [u64; M] {
    let mut state = seed;
    core::array::from_fn(|_| {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

impl CtKey for FlowKey4 {
    type HashKey = [u64; CT_HASH_KEY4];

    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        let (a, b) = (key_words::<_, 2>(self), key_words::<_, 2>(other));
        a[0] == b[0] && a[1] == b[1]
    }

    #[inline(always)]
    fn ct_hash(&self, key: &Self::HashKey) -> u32 {
        multiply_shift(key_words::<_, 2>(self), key)
    }
}

impl CtKey for FlowKey {
    type HashKey = [u64; CT_HASH_KEY6];

    #[inline(always)]
    fn same(&self, other: &Self) -> bool {
        let (a, b) = (key_words::<_, 5>(self), key_words::<_, 5>(other));
        a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4]
    }

    #[inline(always)]
    fn ct_hash(&self, key: &Self::HashKey) -> u32 {
        multiply_shift(key_words::<_, 5>(self), key)
    }
}

/// The `check` of an entry whose key hashes to `hash` (see [`CtEntry`]); never 0.
#[inline(always)]
pub fn ct_check(hash: u32, backend: u32, generation: u32) -> u32 {
    ((hash ^ generation.wrapping_mul(0x9e37_79b1)).wrapping_add(backend.wrapping_mul(0x85eb_ca6b))) | 1
}

impl<K: CtKey> CtEntry<K> {
    /// Whether the entry holds a flow (see [`CtEntry`]), given the table's hash key.
    #[inline(always)]
    pub fn is_valid(&self, key: &K::HashKey) -> bool {
        self.check != 0 && self.check == ct_check(self.key.ct_hash(key), self.backend, self.generation)
    }
}

/// Per-backend counters (values of `BACKEND_STATS`, a per-CPU array; userspace sums the CPUs).
/// They are the only count of a forwarded packet: a VIP's figures are its backends' sums, and
/// the reasons `conntrack-hit` and `new-flow` are every backend's (see [`reason`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// Packets forwarded (host order).
    pub packets: u64,
    /// Bytes forwarded, whole frames (host order).
    pub bytes: u64,
    /// Flows that got a backend from the lookup table rather than the connection table (host order).
    pub new_flows: u64,
    /// Bytes of the packets counted in `new_flows` (host order).
    pub new_bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 32);

impl Counters {
    /// Adds `other` field by field (wrapping, like the program's counters).
    pub fn add(&mut self, other: &Counters) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
        self.new_bytes = self.new_bytes.wrapping_add(other.new_bytes);
    }

    /// Adds one CPU's copy of a backend's counters as userspace read it: the program on that CPU
    /// may have been between `packets` and `new_flows` (a copy then holds a new flow's
    /// `new_flows` without its `packets`), so a new-flow figure is taken as at most its total.
    /// Without this, `by_reason`'s connection-table hits could read one below zero, as 2^64 − 1.
    pub fn add_read(&mut self, cpu: &Counters) {
        self.add(&Counters {
            new_flows: cpu.new_flows.min(cpu.packets),
            new_bytes: cpu.new_bytes.min(cpu.bytes),
            ..*cpu
        });
    }

    /// `self - other` field by field (wrapping): what was counted since `other` was read.
    pub fn since(&self, other: &Counters) -> Counters {
        Counters {
            packets: self.packets.wrapping_sub(other.packets),
            bytes: self.bytes.wrapping_sub(other.bytes),
            new_flows: self.new_flows.wrapping_sub(other.new_flows),
            new_bytes: self.new_bytes.wrapping_sub(other.new_bytes),
        }
    }

    /// The packets and bytes of the reasons `conntrack-hit` and `new-flow`, in that order.
    pub fn by_reason(&self) -> [(u64, u64); 2] {
        [
            (self.packets.saturating_sub(self.new_flows), self.bytes.saturating_sub(self.new_bytes)),
            (self.new_flows, self.new_bytes),
        ]
    }
}

/// Reasons of a packet (index = reason). Every packet has exactly one. The forwarded ones
/// (`CONNTRACK_HIT`, `NEW_FLOW`, the indices up to [`FORWARDED`]) are counted in `BACKEND_STATS`
/// only ([`Counters::by_reason`]); the others in `GLOBAL_STATS`, whose first two elements stay
/// zero. A forwarded packet thus pays for one counter update, not three.
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
    /// Forwarded: an ICMP "fragmentation needed" / ICMPv6 "packet too big" about a real
    /// server's reply, sent to the real server of the flow it quotes (counted here only, not as
    /// the real server's traffic).
    pub const ICMP_TOO_BIG: u32 = 9;
    pub const COUNT: u32 = 10;
    /// The last reason of a forwarded packet: `reason <= FORWARDED` is counted per backend.
    pub const FORWARDED: u32 = NEW_FLOW;
    // `Counters::by_reason` gives these two in this order.
    const _: () = assert!(CONNTRACK_HIT == 0 && NEW_FLOW == 1 && FORWARDED == 1);

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
        "icmp-too-big",
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

/// The flow hash that indexes lookup tables (see [`table_slot`]). Shared so that tests and tools
/// can predict which slot a flow lands in. It is part of the contract between two directors (both
/// must pick the same backend for a flow): never change it without changing both.
///
/// IPv6: Bob Jenkins' lookup3 `final` mix applied four times, each after adding one word of the
/// source and one of the destination address; the ports and protocol seed it. Addresses and ports
/// are hashed exactly as they sit in `FlowKey` (BE bytes read as host-order u32). An IPv4 flow
/// (`family` `FAMILY_V4`) hashes like [`flow_hash_v4`].
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    if key.family == FAMILY_V4 {
        return jhash_3words(key.proto, key.sport, key.dport, key.src[0], key.dst[0]);
    }
    let mut a: u32 = 0xdead_beef ^ (key.proto as u32);
    let mut b: u32 = 0x9e37_79b9;
    let mut c: u32 = (key.sport as u32) << 16 | key.dport as u32;
    let mut i = 0;
    while i < 4 {
        a = a.wrapping_add(key.src[i]);
        b = b.wrapping_add(key.dst[i]);
        jhash_final(&mut a, &mut b, &mut c);
        i += 1;
    }
    c
}

/// [`flow_hash`] of an IPv4 flow: one lookup3 `final` mix of its three words (source, destination,
/// ports), like the kernel's `jhash_3words`. Every input bit reaches every output bit; the BPF
/// target has no rotate instruction, so each mix is about 45 instructions in one dependency chain,
/// and an IPv4 flow needs one where the IPv6 hash takes four.
#[inline(always)]
pub fn flow_hash_v4(key: &FlowKey4) -> u32 {
    jhash_3words(key.proto, key.sport, key.dport, key.src, key.dst)
}

#[inline(always)]
fn jhash_3words(proto: u8, sport: u16, dport: u16, src: u32, dst: u32) -> u32 {
    let mut a: u32 = (0xdead_beef ^ (proto as u32)).wrapping_add(src);
    let mut b: u32 = 0x9e37_79b9u32.wrapping_add(dst);
    let mut c: u32 = (sport as u32) << 16 | dport as u32;
    jhash_final(&mut a, &mut b, &mut c);
    c
}

/// The slot of a table of `size` slots that a flow with [`flow_hash`] `hash` uses:
/// `hash * size / 2^32`, which spreads the hashes evenly (at most one hash more in some slots) and
/// costs a multiplication where `hash % size` would cost a division. Part of the same contract.
#[inline(always)]
pub fn table_slot(hash: u32, size: u32) -> u32 {
    ((hash as u64 * size as u64) >> 32) as u32
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
    unsafe impl aya::Pod for VipState {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for ReasonCounter {}
    unsafe impl aya::Pod for TableChunk {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP-only director forwards new flows only: a CPU's copy read between the program's
    /// `packets` and `new_flows` updates must not make the hits 2^64 − 1.
    #[test]
    fn hits_of_a_copy_read_mid_update_are_not_below_zero() {
        let settled = Counters { packets: 5, bytes: 500, new_flows: 5, new_bytes: 500 };
        let mid_update = Counters { packets: 5, bytes: 500, new_flows: 6, new_bytes: 600 };
        let mut total = Counters::default();
        total.add_read(&settled);
        total.add_read(&mid_update);
        assert_eq!(total.by_reason(), [(0, 0), (10, 1000)]);
        assert_eq!(Counters { new_flows: 1, new_bytes: 9, ..Counters::default() }.by_reason()[0], (0, 0));
    }

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
            // The same words as an IPv6 flow hash differently (four mixes).
            assert_ne!(flow_hash(&FlowKey { family: FAMILY_V6, ..k }), flow_hash(&k));
        }
    }

    /// Frozen values: a change here changes which backend every flow goes to, and a director
    /// running the new version disagrees with one running the old.
    #[test]
    fn flow_hash_values_are_frozen() {
        let k = FlowKey {
            src: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
            dst: [u32::from_ne_bytes([10, 0, 0, 100]), 0, 0, 0],
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        let v6 = FlowKey { src: [0x20010db8u32.to_be(), 0, 0, 2u32.to_be()], dst: [0x20010db8u32.to_be(), 0, 0, 0x100u32.to_be()], family: FAMILY_V6, ..k };
        assert_eq!((flow_hash(&k), flow_hash(&v6)), (FROZEN_V4, FROZEN_V6));
        assert_eq!(table_slot(FROZEN_V4, 65537), FROZEN_SLOT);
    }
    const FROZEN_V4: u32 = 0xcab5_6d3a;
    const FROZEN_V6: u32 = 0xc662_1569;
    const FROZEN_SLOT: u32 = 51_894;

    #[test]
    fn table_slot_spreads_hashes_evenly() {
        for size in [3u32, 251, 65537, 655_373, 1_000_003] {
            assert_eq!(table_slot(0, size), 0);
            assert_eq!(table_slot(u32::MAX, size), size - 1);
            // Every slot gets floor(2^32 / size) or one more hashes: the first hash of slot s is
            // ceil(s * 2^32 / size).
            let first = |s: u64| (s << 32).div_ceil(u64::from(size));
            for s in [0u64, 1, u64::from(size / 2), u64::from(size) - 1] {
                let f = first(s);
                assert_eq!(table_slot(f as u32, size) as u64, s, "size {size} slot {s}");
                if f > 0 {
                    assert_eq!(table_slot((f - 1) as u32, size) as u64, s - 1, "size {size} slot {s}");
                }
                let width = first(s + 1) - f;
                let even = (1u64 << 32) / u64::from(size);
                assert!(width == even || width == even + 1, "size {size} slot {s}: {width} hashes");
            }
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

    #[test]
    fn conntrack_geometry() {
        assert_eq!(ct_sets(1024), 128);
        assert_eq!(ct_sets(262_144), 32_768);
        assert_eq!(ct_sets(1000), 128, "rounded up to a power of two");
        assert_eq!(ct_sets(1), 2);
        assert_eq!(ct_shift(128), 25);
        assert_eq!(ct_shift(2), 31);
        for sets in [2u32, 256, 65_536, 1 << 30] {
            assert_eq!(u32::MAX >> ct_shift(sets), sets - 1, "every hash indexes a set");
        }
    }

    fn entry(src: u32, backend: u32, generation: u32, key: &[u64; CT_HASH_KEY4]) -> CtEntry<FlowKey4> {
        let flow = FlowKey4 { src, dst: 0x0a00_0001, sport: 1234, dport: 80u16.to_be(), proto: PROTO_TCP, _pad0: 0, _pad1: 0 };
        CtEntry { key: flow, backend, generation, check: ct_check(flow.ct_hash(key), backend, generation), used: 0 }
    }

    #[test]
    fn conntrack_entries_validate_their_fields() {
        let key = splitmix_key(0x1234_5678);
        let other_load = splitmix_key(0x1234_5679);
        assert!(!CtEntry::<FlowKey4>::default().is_valid(&key), "an empty entry is no flow");
        assert!(!CtEntry::<FlowKey>::default().is_valid(&splitmix_key(1)));
        for i in 0..10_000u32 {
            let a = entry(i, i % 7, i / 7, &key);
            let b = entry(i + 1, (i + 3) % 7, i / 7 + 1, &key);
            assert!(a.is_valid(&key) && b.is_valid(&key));
            assert!(!a.is_valid(&other_load), "another load's key");
            // Two writers mixed: one's key (and check) with the other's backend, or the check
            // of the other.
            assert!(!CtEntry { backend: b.backend, generation: b.generation, ..a }.is_valid(&key), "{i}");
            assert!(!CtEntry { check: b.check, ..a }.is_valid(&key), "{i}");
            assert!(!CtEntry { key: b.key, ..a }.is_valid(&key), "{i}");
        }
    }

    #[test]
    fn conntrack_keys_compare_every_byte() {
        let k = FlowKey4 { src: 1, dst: 2, sport: 3, dport: 4, proto: 6, _pad0: 0, _pad1: 0 };
        assert!(k.same(&k));
        for other in [FlowKey4 { src: 9, ..k }, FlowKey4 { dst: 9, ..k }, FlowKey4 { sport: 9, ..k }, FlowKey4 { dport: 9, ..k }, FlowKey4 { proto: 17, ..k }] {
            assert!(!k.same(&other), "{other:?}");
        }
        let k6 = FlowKey { src: [1, 2, 3, 4], dst: [5, 6, 7, 8], sport: 9, dport: 10, proto: 6, family: FAMILY_V6, _pad: [0; 2] };
        assert!(k6.same(&k6));
        for w in 0..4 {
            let mut other = k6;
            other.src[w] ^= 1;
            assert!(!k6.same(&other));
            other = k6;
            other.dst[w] ^= 1;
            assert!(!k6.same(&other));
        }
        assert!(!k6.same(&FlowKey { proto: 17, ..k6 }));
    }

    /// Consecutive client ports from one address (what a busy client or a proxy sends), or
    /// consecutive addresses, spread over the sets about as a random hash would: no set far above
    /// the mean, for any key.
    #[test]
    fn conntrack_hash_spreads_consecutive_ports() {
        let sets = 4096u32;
        let shift = ct_shift(sets);
        let spread = |hashes: &mut dyn Iterator<Item = u32>| {
            let mut load = [0u32; 4096];
            for h in hashes {
                load[(h >> shift) as usize] += 1;
            }
            *load.iter().max().unwrap()
        };
        for seed in [0u64, 1, 0xdead_beef] {
            let (k4, k6) = (splitmix_key(seed), splitmix_key(seed));
            let key4 = |port: u16, src: u32| FlowKey4 { src, dst: 0x0a64_33c6, sport: port.to_be(), dport: 443u16.to_be(), proto: PROTO_TCP, _pad0: 0, _pad1: 0 };
            // Mean 16; a Poisson(16) maximum over 4096 sets is about 33.
            let max = spread(&mut (0..=u16::MAX).map(|port| key4(port, 0x0102_000a).ct_hash(&k4)));
            assert!(max <= 40, "seed {seed:#x}: a set got {max} of 65536 flows (mean 16)");
            let max = spread(&mut (0..=u16::MAX).map(|i| key4(40000, (0x0a00_0000 + u32::from(i)).to_be()).ct_hash(&k4)));
            assert!(max <= 40, "seed {seed:#x}: consecutive addresses, a set got {max} of 65536 flows (mean 16)");
            let max6 = spread(&mut (0..=u16::MAX).map(|port| {
                FlowKey { src: [0x0db8_0120, 0, 0, port as u32], dst: [0x0db8_0120, 0, 0, 0x1000_0000], sport: 40000u16.to_be(), dport: 443u16.to_be(), proto: PROTO_TCP, family: FAMILY_V6, _pad: [0; 2] }
                    .ct_hash(&k6)
            }));
            assert!(max6 <= 40, "seed {seed:#x}: IPv6, a set got {max6} of 65536 flows (mean 16)");
        }
    }

    /// Consecutive client addresses (a NAT pool, a test client), 65,536 of them into 4,096 sets,
    /// for 2,000 keys: no set above 48 (mean 16; a Poisson(16) maximum over 4,096 sets is about
    /// 33, and 48 is a one-in-millions event per key). Without the mixer, the keys of seeds 24,
    /// 40, 70, 113, 143 and 214 among the first 215 put 1,560, 57, 48, 45, 91 and 62 flows in
    /// one set.
    #[test]
    fn conntrack_hash_spreads_consecutive_addresses_for_every_key() {
        let shift = ct_shift(4096);
        for seed in 0..2000u64 {
            let k4: [u64; CT_HASH_KEY4] = splitmix_key(seed);
            let mut load = [0u16; 4096];
            for i in 0..=u16::MAX {
                let f = FlowKey4 { src: (0x0a00_0000 + u32::from(i)).to_be(), dst: 0x0a64_33c6, sport: 40000u16.to_be(), dport: 443u16.to_be(), proto: PROTO_TCP, _pad0: 0, _pad1: 0 };
                load[(f.ct_hash(&k4) >> shift) as usize] += 1;
            }
            let max = *load.iter().max().unwrap();
            assert!(max <= 48, "seed {seed}: a set got {max} of 65536 consecutive addresses (mean 16)");
        }
    }

    /// The hash is the formula in `multiply_shift`'s documentation, over the key's 32-bit halves
    /// (checked against a plain 128-bit computation).
    #[test]
    fn multiply_shift_is_the_documented_formula() {
        let key: [u64; CT_HASH_KEY4] = splitmix_key(7);
        let flow = FlowKey4 { src: 0x0102_000a, dst: 0x0a64_33c6, sport: 40000u16.to_be(), dport: 443u16.to_be(), proto: PROTO_TCP, _pad0: 0, _pad1: 0 };
        let words = key_words::<_, 2>(&flow);
        let halves = [words[0] & 0xffff_ffff, words[0] >> 32, words[1] & 0xffff_ffff, words[1] >> 32];
        let sum: u128 = u128::from(key[4]) + halves.iter().zip(key).map(|(&x, a)| u128::from(x) * u128::from(a)).sum::<u128>();
        let mut s = (sum % (1u128 << 64)) as u64;
        s ^= s >> 29;
        let mixed = (u128::from(s) * 0xbf58_476d_1ce4_e5b9) % (1u128 << 64);
        assert_eq!(flow.ct_hash(&key), (mixed >> 32) as u32);
        assert_eq!(halves, [flow.src as u64, flow.dst as u64, u64::from(flow.sport) | u64::from(flow.dport) << 16, u64::from(flow.proto)]);
    }
}
