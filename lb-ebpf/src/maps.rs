//! Every map the program uses. Sizes here are defaults; the loader sets the real ones from the
//! config (`map_max_entries`) before the maps are created.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
    Global,
};
use lb_common::{
    reason, Backend, Counters, FlowKey, FlowKey4, FlowValue, ReasonCounter, VipInfo, VipKey,
    ADDR_FILTER_WORDS, DEFAULT_CONNTRACK_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS,
    DEFAULT_TABLE_SIZE,
};

/// Lookup table size M (prime), set at load time; read-only for the program so the verifier
/// treats it as a constant.
#[no_mangle]
pub static TABLE_SIZE: Global<u32> = Global::new(DEFAULT_TABLE_SIZE);

/// Which traffic is VIP traffic, and which of its two tables is live.
#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Bitmap over destination addresses (`lb_common::addr_filter_bit_*`): a clear bit means "no VIP
/// has this address", so non-VIP traffic is passed after one array read, without touching L4 or
/// `VIPS`.
#[map(name = "ADDR_FILTER")]
pub static ADDR_FILTER: Array<u32> = Array::with_max_entries(ADDR_FILTER_WORDS, 0);

/// `VIP_F_*` flags by VIP id, for connection-table hits (which never look at `VIPS`).
#[map(name = "VIP_FLAGS")]
pub static VIP_FLAGS: Array<u32> = Array::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Backends by id.
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Lookup tables: `max_vips * 2 * TABLE_SIZE` backend ids. VIP `v`, buffer `b` (0/1) occupies
/// `[(2v + b) * M, (2v + b + 1) * M)`.
/// Memory-mappable (`BPF_F_MMAPABLE`): the controller writes slots with plain stores.
#[map(name = "TABLES")]
pub static TABLES: Array<u32> = Array::with_max_entries(2 * DEFAULT_TABLE_SIZE, BPF_F_MMAPABLE);

/// `BPF_F_MMAPABLE` (uapi/linux/bpf.h).
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Connection tables, one per family: flows keep their backend while the lookup table changes
/// under them. IPv4 has its own map for its 16-byte key (the kernel hashes and compares whole
/// keys: a 40-byte key cost a third more per lookup).
///
/// LRU lists are per CPU (`BPF_F_NO_COMMON_LRU`): an insert takes its free element from its own
/// CPU's list without the shared list's lock (measured: a new flow's map work is 10-20 % cheaper).
/// The table itself is shared, so a flow is found from any CPU; only eviction is per CPU, each
/// CPU evicting its own least recently used flows once it holds `max_entries / CPUs` of them.
#[map(name = "CONNTRACK4")]
pub static CONNTRACK4: LruHashMap<FlowKey4, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, BPF_F_NO_COMMON_LRU);
#[map(name = "CONNTRACK6")]
pub static CONNTRACK6: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, BPF_F_NO_COMMON_LRU);

/// `BPF_F_NO_COMMON_LRU` (uapi/linux/bpf.h).
const BPF_F_NO_COMMON_LRU: u32 = 2;

/// Egress interfaces for backends that are not on the ingress interface, keyed by ifindex.
#[map(name = "TX_PORTS")]
pub static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(64, 0);

/// Per-CPU packets and bytes by reason (`lb_common::reason`).
#[map(name = "GLOBAL_STATS")]
pub static GLOBAL_STATS: PerCpuArray<ReasonCounter> = PerCpuArray::with_max_entries(reason::COUNT, 0);

/// Per-CPU counters by VIP id.
#[map(name = "VIP_STATS")]
pub static VIP_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// Per-CPU counters by backend id.
#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);
