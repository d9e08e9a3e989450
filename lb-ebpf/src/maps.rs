//! Every map the program uses. Sizes here are defaults; the loader sets the real ones from the
//! config (`map_max_entries`) before the maps are created.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, PerCpuArray},
    Global,
};
use lb_common::{
    reason, table_chunks, Backend, Counters, CtSet, FlowKey, FlowKey4, ReasonCounter, TableChunk, VipInfo, VipKey, VipState,
    ADDR_FILTER_WORDS, CT_HASH_KEY4, CT_HASH_KEY6, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_TABLE_SIZE,
};

/// Lookup table size M (prime), set at load time; read-only for the program so the verifier
/// treats it as a constant.
#[no_mangle]
pub static TABLE_SIZE: Global<u32> = Global::new(DEFAULT_TABLE_SIZE);

/// Which traffic is VIP traffic: the VIP's id (never updated in place, see `VipInfo`).
#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// By VIP id: which of its two tables is live, and its flags. Memory-mappable: the controller
/// flips a table and sets the flags with one store each (see `VipState`).
#[map(name = "VIP_STATE")]
pub static VIP_STATE: Array<VipState> = Array::with_max_entries(DEFAULT_MAX_VIPS, BPF_F_MMAPABLE);

/// Bitmap over destination addresses (`lb_common::addr_filter_bit_*`): a clear bit means "no VIP
/// has this address", so non-VIP traffic is passed after one array read, without touching L4 or
/// `VIPS`.
#[map(name = "ADDR_FILTER")]
pub static ADDR_FILTER: Array<u32> = Array::with_max_entries(ADDR_FILTER_WORDS, 0);

/// Backends by id.
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Lookup tables, 16 slots per element (`TableChunk`): `max_vips * 2 * C` elements with
/// `C = table_chunks(M)`. VIP `v`, buffer `b` (0/1) occupies elements `[(2v + b) * C, (2v + b + 1) * C)`,
/// slot `s` of it is `ids[s % 16]` of element `(2v + b) * C + s / 16`.
/// Memory-mappable (`BPF_F_MMAPABLE`): the controller writes slots with plain stores.
#[map(name = "TABLES")]
pub static TABLES: Array<TableChunk> =
    Array::with_max_entries(2 * table_chunks(DEFAULT_TABLE_SIZE), BPF_F_MMAPABLE);

/// `BPF_F_MMAPABLE` (uapi/linux/bpf.h).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Connection tables, one per family: flows keep their backend while the lookup table changes
/// under them. Each is an array of `CtSet`s (8-way set-associative, see `conntrack.rs`) read and
/// written in place: a hit is one inlined array access and a few compares, an insert a few
/// stores, where the kernel's LRU hash cost 58 ns per hit and 400 ns per insert (hashing, bucket
/// locks, LRU lists). Sized by the loader (`ct_sets`), memory-mappable so that `lbd status`
/// counts the flows without a system call per set.
#[map(name = "CONNTRACK4")]
pub static CONNTRACK4: Array<CtSet<FlowKey4>> = Array::with_max_entries(2, BPF_F_MMAPABLE);
#[map(name = "CONNTRACK6")]
pub static CONNTRACK6: Array<CtSet<FlowKey>> = Array::with_max_entries(2, BPF_F_MMAPABLE);

/// Keys of the connection tables' set hash (`CtKey::ct_hash`), random per load (set by the
/// loader).
#[no_mangle]
pub static CT_KEY4: Global<[u64; CT_HASH_KEY4]> = Global::new([0; CT_HASH_KEY4]);
#[no_mangle]
pub static CT_KEY6: Global<[u64; CT_HASH_KEY6]> = Global::new([0; CT_HASH_KEY6]);
/// `32 - log2(sets)`: the set of a flow is `ct_hash >> CT_SHIFT` (set by the loader).
#[no_mangle]
pub static CT_SHIFT: Global<u32> = Global::new(31);

/// Egress interfaces for backends that are not on the ingress interface, keyed by ifindex.
#[map(name = "TX_PORTS")]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// Per-CPU packets and bytes by reason (`lb_common::reason`) of the packets not forwarded.
#[map(name = "GLOBAL_STATS")]
pub static GLOBAL_STATS: PerCpuArray<ReasonCounter> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Per-CPU counters by backend id: the only count of a forwarded packet (see `stats.rs`).
#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
