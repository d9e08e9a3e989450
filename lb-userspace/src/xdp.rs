//! The XDP dataplane: loads `lb-ebpf` (embedded from `OUT_DIR`), sizes its maps from the config,
//! attaches it, and reconciles the desired state into the maps.
//!
//! Tables are double buffered per VIP (aya-ebpf has no map-of-maps type for the program): the
//! controller writes the idle buffer completely, then flips the VIP's `VipState::active` with one
//! store into the memory-mapped `VIP_STATE`. A packet therefore sees the old table or the new one,
//! never a mix. Before the buffer flipped away from is written again, an RCU grace period must
//! have passed since the flip (`crate::grace`), so no reader that picked it can still be inside
//! it; so too between removing a VIP from `VIPS` and inserting any, and before a released VIP or
//! backend id is given out again.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use aya::{
    maps::{Array, DevMapHash, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, LinkType, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        Xdp, XdpMode as AyaXdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    addr_filter_bit, ct_sets, ct_shift, CT_FORMAT, CT_HASH_KEY4, CT_HASH_KEY6, map_names, reason, table_chunks, Backend, Counters, CtKey, CtSet, FlowKey, FlowKey4, ReasonCounter,
    TableChunk, VipInfo, VipKey, VipState, ADDR_FILTER_WORDS, BACKEND_F_ALIVE, FAMILY_V4, FAMILY_V6, NO_BACKEND, PROGRAM_NAME,
    PROTO_TCP, PROTO_UDP, TABLE_CHUNK, VIP_F_ENABLED, BACKEND_F_VIP_ANY_PORT, BACKEND_F_VIP_ENABLED,
};

use crate::{
    config::Protocol,
    dataplane::{
        BackendSpec, BackendStats, ConnectionCount, Dataplane, DataplaneError, DataplaneStats, ServiceSpec, Traffic, VipAddr,
    },
    grace::Graces,
    keep::{Keep, KeptBackend, KeptCounters, State, STATE_FORMAT},
    maglev::{Maglev, MaglevBackend},
};

/// The eBPF object built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Auxiliary programs (`xdp_pass` for veth peers, benchmark baselines), see lb-ebpf/src/aux.rs.
pub static AUX_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-aux"));

/// Attaches `xdp_pass` (native mode) to `iface` in the caller's network namespace, so XDP frames
/// transmitted by its veth peer are delivered at once. The program stays attached while the
/// returned object lives.
pub fn attach_pass(iface: &str) -> Result<Ebpf, LoadError> {
    attach_pass_link(iface).map(|(ebpf, _)| ebpf)
}

/// [`attach_pass`], with the id of the link that holds it attached.
fn attach_pass_link(iface: &str) -> Result<(Ebpf, XdpLinkId), LoadError> {
    if AUX_OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    let mut ebpf = Ebpf::load(AUX_OBJECT)?;
    let prog: &mut Xdp = ebpf.program_mut("xdp_pass").ok_or(LoadError::MissingMap("xdp_pass"))?.try_into()?;
    prog.load()?;
    let id = prog.attach(iface, AyaXdpMode::Driver).map_err(|source| LoadError::Attach {
        iface: iface.to_string(),
        mode: "native",
        hint: "",
        source: Box::new(source),
    })?;
    Ok((ebpf, id))
}

/// Pins link `id` of `prog` at `path` (replacing a stale pin there), so that it stays attached
/// when this process exits. On failure the link is gone (detached): where the kernel attached
/// through netlink there is no BPF link to pin. The caller then attaches again, unpinned.
fn pin_link(prog: &mut Xdp, id: XdpLinkId, path: &std::path::Path) -> Result<PinnedLink, String> {
    let link = prog.take_link(id).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(path);
    let fd = FdLink::try_from(link).map_err(|e| format!("the kernel attached it without a BPF link ({e})"))?;
    fd.pin(path).map_err(|e| format!("pinning it at {}: {e}", path.display()))
}

/// The pinned XDP link at `path`, with the id of the program it runs.
fn pinned_program(path: &std::path::Path) -> Result<(PinnedLink, u32), String> {
    let info = FdLink::from(PinnedLink::from_pin(path).map_err(|e| e.to_string())?).info().map_err(|e| e.to_string())?;
    if info.link_type().ok() != Some(LinkType::Xdp) {
        return Err("not an XDP link".into());
    }
    Ok((PinnedLink::from_pin(path).map_err(|e| e.to_string())?, info.program_id()))
}

/// How far a take-over moves the generation of every backend id not reserved (see
/// [`skip_free_generations`]).
const GENERATION_SKIP: u32 = 1 << 10;

/// Moves the generation of every id not `taken` on by [`GENERATION_SKIP`]. The state file is
/// written after an apply's map writes: an lbd killed in between, or whose write failed, gave
/// ids generations the file does not hold, and connection entries name them. Counting on from
/// the file, this run would give such an id's (id, generation) to another real server, maybe of
/// another virtual server, and those entries would send their flows there. An id gets a new
/// generation only when it is handed out again (freed, and a grace period gone by): 1,024 is far
/// more than the applies whose state was not written can have given one id.
fn skip_free_generations(generations: &mut [u32], taken: &std::collections::HashSet<u32>) {
    for (id, g) in generations.iter_mut().enumerate() {
        if !taken.contains(&(id as u32)) {
            *g = g.wrapping_add(GENERATION_SKIP);
        }
    }
}

/// Backend ids the maps hold for `max_backends` real servers: twice as many. An apply gives new
/// real servers their ids before the ones they replace give theirs back (only once their VIP's
/// table no longer names them), so a reload replacing every real server at once needs both.
fn backend_ids(max_backends: u32) -> u32 {
    max_backends.saturating_mul(2)
}

/// Sizes and load-time settings.
#[derive(Clone, Debug)]
pub struct XdpOptions {
    pub table_size: u32,
    pub max_vips: u32,
    /// Real servers over all VIPs (the maps hold `backend_ids` of it).
    pub max_backends: u32,
    /// Entries of each connection table: IPv4 and IPv6 flows have one each.
    pub conntrack_size: u32,
    /// aya-log level for the program's per-packet logs (0 = off, 1 error .. 5 trace). The
    /// verifier prunes every log statement above it.
    pub log_level: u8,
    /// Keep the attachment and the connection tables when this dataplane goes, and take over
    /// what an earlier one kept there (see `crate::keep`). `None`: detach when dropped.
    pub keep: Option<Keep>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("this lbd was built without its eBPF program (AYA_BUILD_SKIP was set)")]
    NoObject,
    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("loading the XDP program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("{0}")]
    Table(#[from] crate::maglev::MaglevError),
    #[error("mapping the {name} map into memory: {source}")]
    Mmap { name: &'static str, source: std::io::Error },
    #[error("attaching XDP to {iface} in {mode} mode failed: {source}{hint}")]
    Attach { iface: String, mode: &'static str, hint: &'static str, source: Box<aya::programs::ProgramError> },
}

/// What an attach refused because the interface has an XDP program already says.
const OCCUPIED_HINT: &str = " (another XDP program is attached there: an lbd whose control_socket was another path keeps its \
     fast path, which `lbd detach --socket OLD_PATH` removes; `ip link set dev IFACE xdp off` removes another one)";

/// Whether an attach failed because the interface already has an XDP program (the kernel's
/// EBUSY for a link where one is attached, EEXIST for the other mode than the one attached).
fn occupied(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EBUSY) | Some(libc::EEXIST)) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// A released VIP id; its buffers keep their known contents.
struct FreeVip {
    id: u32,
    tables: [Vec<u32>; 2],
    /// The change (`Graces::mark`) that released it: it is given out again once a grace period
    /// has passed since. Until then a program run that read the VIP before it was removed may
    /// still be using the id: a new VIP would otherwise write its first table into the buffer such
    /// a run is reading and give it backends that pass its checks (same VIP id), and a packet of
    /// the removed service could be forwarded, and pinned, to the new one's real server.
    freed: u64,
}

struct VipSlot {
    id: u32,
    active: u32,
    /// What each buffer holds in the kernel (the map is zero-filled when created).
    tables: [Vec<u32>; 2],
    /// The change (`Graces::mark`) of the last flip: the buffer flipped away from is written
    /// again only once a grace period has passed since.
    last_flip: u64,
    enabled: bool,
    /// A table has been made live at least once (until then the VIP is not in `VIPS`).
    installed: bool,
    /// The backends last applied completely (an unchanged service is skipped; `None` while an
    /// apply of the VIP is under way or after one failed part way, when some of its backends may
    /// already be written) and the Maglev members its live table was built from (an unchanged
    /// member set is not rebuilt).
    applied: Option<Vec<BackendSpec>>,
    members: Vec<MaglevBackend>,
    /// Keys of the backends programmed for this VIP (entries of `XdpDataplane::backends`).
    backend_keys: std::collections::BTreeSet<String>,
    /// What the VIP's removed backends had forwarded: the program counts forwarded packets per
    /// backend only, so the VIP's figures are this plus its backends' counters.
    retired: Counters,
    /// Tells this VIP from a later one at the same address (`Retired::serial`).
    serial: u64,
}

/// A freed backend id whose counters were added to its VIP's `retired` when it was freed. Its
/// `BACKEND_STATS` element keeps counting whatever a program run that saw it alive still forwards;
/// when the id is reused, that remainder goes to the VIP too before the element is zeroed.
struct Retired {
    vip: VipAddr,
    serial: u64,
    counted: Counters,
}

/// A `BPF_F_MMAPABLE` array mapped into this process (shared: it is the map's memory).
struct Mapping {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; writes go through `&mut XdpDataplane`.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of array `name`, for reading and, if `write`, writing.
    fn new(ebpf: &mut Ebpf, name: &'static str, len: usize, write: bool) -> Result<Self, LoadError> {
        use std::os::fd::{AsFd, AsRawFd};
        let map = ebpf.map(name).ok_or(LoadError::MissingMap(name))?;
        let aya::maps::Map::Array(data) = map else {
            return Err(LoadError::Map { name, source: aya::maps::MapError::InvalidName { name: name.into() } });
        };
        let prot = if write { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: maps a BPF array (created BPF_F_MMAPABLE) shared; checked for failure below.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, data.fd().as_fd().as_raw_fd(), 0) };
        let mmap_err = |source| LoadError::Mmap { name, source };
        if ptr == libc::MAP_FAILED {
            return Err(mmap_err(std::io::Error::last_os_error()));
        }
        let ptr = std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| mmap_err(std::io::Error::other("null mapping")))?;
        Ok(Self { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `TABLES` mapped into this process: the map is `BPF_F_MMAPABLE`, so slots are written with
/// plain stores rather than one `bpf()` call each (the first install of 100 VIPs made 6.5 million
/// of them). Elements are `TableChunk`s of 16 slots (64 bytes, so laid out without gaps); each
/// buffer starts on an element of its own. The stores only ever go to a VIP's idle buffer; the
/// release store that flips to it (`MappedVipState::set`) orders them before the flip.
struct MappedTables {
    map: Mapping,
    /// Buffers (two per VIP id) and elements per buffer.
    buffers: u32,
    chunks: u32,
}

impl MappedTables {
    fn new(ebpf: &mut Ebpf, buffers: u32, table_size: u32) -> Result<Self, LoadError> {
        let chunks = table_chunks(table_size);
        let len = buffers as usize * chunks as usize * std::mem::size_of::<TableChunk>();
        Ok(Self { map: Mapping::new(ebpf, map_names::TABLES, len, true)?, buffers, chunks })
    }

    /// Sets slot `slot` of buffer `buffer` (`2 * vip_id + 0/1`).
    fn set(&self, buffer: u32, slot: u32, value: u32) {
        assert!(buffer < self.buffers && slot < self.chunks * TABLE_CHUNK, "table slot {buffer}/{slot} out of range");
        let index = (buffer as usize * self.chunks as usize) * TABLE_CHUNK as usize + slot as usize;
        // SAFETY: inside the mapping (checked above: chunks are 16 dense u32s), 4-byte aligned
        // (page-aligned base).
        let slot = unsafe { &*(self.map.ptr.as_ptr().cast::<std::sync::atomic::AtomicU32>().add(index)) };
        slot.store(value, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `VIP_STATE` mapped into this process: a VIP's live table and its flags are set with one store
/// each (see `VipState`).
struct MappedVipState {
    map: Mapping,
    vips: u32,
}

impl MappedVipState {
    fn new(ebpf: &mut Ebpf, vips: u32) -> Result<Self, LoadError> {
        // Array elements are laid out at their value size rounded up to 8.
        const { assert!(std::mem::size_of::<VipState>() == 8) };
        let len = vips as usize * std::mem::size_of::<VipState>();
        Ok(Self { map: Mapping::new(ebpf, map_names::VIP_STATE, len, true)?, vips })
    }

    /// Stores VIP `id`'s state: `flags`, then `active`, each one store, release-ordered after
    /// every store before it (the idle table's slots).
    fn set(&self, id: u32, state: VipState) {
        use std::sync::atomic::{AtomicU32, Ordering};
        assert!(id < self.vips, "VIP id {id} out of range");
        // SAFETY: inside the mapping (checked above), 4-byte aligned (page-aligned base, 8-byte
        // elements of two u32 fields).
        let field = |i: usize| unsafe { &*self.map.ptr.as_ptr().cast::<AtomicU32>().add(id as usize * 2 + i) };
        const { assert!(std::mem::offset_of!(VipState, active) == 0 && std::mem::offset_of!(VipState, flags) == 4) };
        field(1).store(state.flags, Ordering::Release);
        field(0).store(state.active, Ordering::Release);
    }
}

/// A connection table (`CONNTRACK4` or `CONNTRACK6`) mapped read-only, to count its flows.
struct MappedConntrack<K> {
    map: Mapping,
    sets: u32,
    _key: std::marker::PhantomData<K>,
}

impl<K: CtKey> MappedConntrack<K> {
    fn new(ebpf: &mut Ebpf, name: &'static str, sets: u32) -> Result<Self, LoadError> {
        // Array elements are laid out at their value size rounded up to 8; sets are 256 and 448.
        const { assert!(std::mem::size_of::<CtSet<K>>().is_multiple_of(8)) };
        let len = sets as usize * std::mem::size_of::<CtSet<K>>();
        Ok(Self { map: Mapping::new(ebpf, name, len, false)?, sets, _key: std::marker::PhantomData })
    }

    /// Valid entries (see `lb_common::CtEntry`). Reads race with the program's writes; an entry
    /// being rewritten may be missed or counted, never misread as valid (its `check` is verified).
    fn count(&self, hash_key: &K::HashKey) -> usize {
        let base = self.map.ptr.as_ptr() as *const CtSet<K>;
        (0..self.sets as usize)
            .map(|i| {
                // SAFETY: inside the mapping, aligned (page-aligned base, 8-byte multiple sizes);
                // a volatile copy because the program writes concurrently (plain data, any bits
                // are a valid value).
                let set = unsafe { std::ptr::read_volatile(base.add(i)) };
                set.ways.iter().filter(|e| e.is_valid(hash_key)).count()
            })
            .sum()
    }
}

/// A random hash key from the kernel (`getrandom`), for `CT_KEY4`/`CT_KEY6`. If the kernel
/// cannot give one, a fixed key with a warning: the key only keeps set collisions unpredictable
/// (a client that knows it can aim new flows at one set and push out its established flows).
fn random_key<const M: usize>() -> [u64; M] {
    let mut buf = [[0u8; 8]; M];
    let len = M * 8;
    let mut filled = 0;
    while filled < len {
        // SAFETY: writes at most `len - filled` bytes into `buf` from offset `filled`.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast::<u8>().add(filled).cast(), len - filled, 0) };
        if n > 0 {
            filled += n as usize;
            continue;
        }
        let err = std::io::Error::last_os_error();
        if n < 0 && err.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        tracing::warn!(
            "getrandom failed ({err}); the connection tables use a fixed hash key, so their set collisions are predictable"
        );
        return lb_common::splitmix_key(0x6c62_6473);
    }
    buf.map(u64::from_ne_bytes)
}

struct BackendSlot {
    id: u32,
    entry: Backend,
}

pub struct XdpDataplane {
    ebpf: Ebpf,
    opts: XdpOptions,
    maglev: Maglev,
    vips_map: BpfHashMap<MapData, VipKey, VipInfo>,
    backends_map: Array<MapData, Backend>,
    /// `TABLES`, kept open; written through `tables`.
    _tables_map: Array<MapData, TableChunk>,
    tables: MappedTables,
    vip_state: MappedVipState,
    /// Grace periods since changes programs may still see the state before of (see the module's
    /// comment).
    graces: Graces,
    /// The change that last removed a `VIPS` key: the element it freed is reused by the next
    /// insert, so no key is inserted until a grace period has passed since.
    vips_removed: u64,
    addr_filter_map: Array<MapData, u32>,
    /// What `ADDR_FILTER` holds.
    addr_filter: Vec<u32>,
    /// Mapped from the maps, which stay in `ebpf`; shared with the counts `connection_count`
    /// hands out.
    conntrack4: Arc<MappedConntrack<FlowKey4>>,
    conntrack6: Arc<MappedConntrack<FlowKey>>,
    /// `CT_KEY4` and `CT_KEY6`, the hash keys the program was loaded with.
    ct_keys: ([u64; CT_HASH_KEY4], [u64; CT_HASH_KEY6]),
    tx_ports: DevMapHash<MapData>,
    global_stats: PerCpuArray<MapData, ReasonCounter>,
    backend_stats: PerCpuArray<MapData, Counters>,
    /// Freed backend ids not reused yet.
    retired: HashMap<u32, Retired>,
    /// Everything reused backend ids had counted before they were zeroed: with the ids' current
    /// counters, the forwarded reasons' totals since load (since the first load, when the
    /// counters were kept across restarts).
    zeroed: Counters,
    /// The `conntrack-hit` packets and bytes last reported: derived (`Counters::by_reason`), they
    /// could go back by a packet when a copy read mid-update put one on the other side; reported
    /// as at least these, a counter to Prometheus never does.
    hits_reported: std::sync::Mutex<(u64, u64)>,
    /// What the removed real servers of each virtual server had forwarded, as the run before
    /// left it (`KeptCounters::retired`), until the virtual server is set up again.
    kept_retired: HashMap<VipAddr, Counters>,
    next_vip_serial: u64,
    vips: BTreeMap<VipAddr, VipSlot>,
    /// (VIP, backend key) → id and what is programmed.
    backends: HashMap<(VipAddr, String), BackendSlot>,
    /// Released VIP ids, oldest first.
    free_vip_ids: std::collections::VecDeque<FreeVip>,
    next_vip_id: u32,
    /// Released backend ids and the change that released them (`Graces::mark`), oldest first.
    free_backend_ids: std::collections::VecDeque<(u32, u64)>,
    next_backend_id: u32,
    /// Last generation handed out per backend id.
    generations: Vec<u32>,
    tx_ifindexes: Vec<u32>,
    /// The interfaces the current apply has put into `TX_PORTS` (see `ensure_tx_port`).
    tx_written: Vec<u32>,
    link: Option<(Attachment, String)>,
    /// Where the attachment, the connection tables and the state file are kept (see `crate::keep`).
    keep: Option<Keep>,
    /// The link an earlier lbd pinned, with the program it runs, the interface and the mode it
    /// was attached in: `attach` takes it over if they are the ones asked for.
    adoptable: Option<(PinnedLink, u32, String, bool)>,
    /// Backend ids of the run before, for the first apply to give the same real servers (their
    /// connection entries name them): (VIP, backend key) → id.
    reserved: HashMap<(VipAddr, String), u32>,
    /// Sets of each connection table.
    ct_sets: u32,
    /// The state file no longer says what this dataplane holds.
    state_dirty: bool,
    /// Attached in native mode (see `prepare_egress`).
    native: bool,
    /// `xdp_pass` on the other interfaces real servers sit behind, attached while this lives.
    egress_pass: Vec<EgressPass>,
    /// Interfaces whose `xdp_pass` went with them, to attach it again when they are back.
    egress_lost: Vec<u32>,
    /// The kernel's id of the loaded program (to tell whether an interface still runs it).
    program_id: u32,
    /// The interface lbd serves, from `attach` to `detach`, whether or not the program is on it
    /// now (see `follow_links`).
    serving: Option<String>,
    /// That interface is gone (warned once; see `follow_links`).
    link_lost: bool,
}

/// `xdp_pass` attached to an interface real servers sit behind (see `prepare_egress`).
struct EgressPass {
    ifindex: u32,
    program_id: u32,
    /// Holds the program (with its link, unless pinned) while this lives; `None` for one an
    /// earlier lbd left, kept by its pin.
    _ebpf: Option<Ebpf>,
    /// Its link pinned at `Keep::pass`: it stays when lbd exits.
    pin: Option<PinnedLink>,
}

impl EgressPass {
    /// Detaches it (pinned: removes the pin, which held it attached).
    fn release(self) {
        if let Some(pin) = self.pin {
            let _ = pin.unpin();
        }
    }
}

/// How the program is attached to the interface lbd serves.
enum Attachment {
    /// Held by this process: detached when the dataplane goes.
    Managed(XdpLinkId),
    /// A BPF link pinned at `Keep::link`: stays attached when lbd exits.
    Pinned(PinnedLink),
    /// The link an earlier lbd pinned, and the program it still runs until `take_over` puts
    /// this one in.
    Adopted(PinnedLink, u32),
}

/// Map flag of an array that can be mapped into memory.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// What an earlier lbd kept (see `crate::keep`), as far as this load takes it over.
#[derive(Default)]
struct Kept {
    /// The state file, if the pinned connection tables it describes are taken over.
    state: Option<State>,
    /// Its pinned link: see `XdpDataplane::adoptable`.
    link: Option<(PinnedLink, u32, String, bool)>,
}

impl Kept {
    /// Reads what `keep` holds. Connection tables that cannot be taken over (another size,
    /// another lbd version, no state file naming their keys) are unpinned, so that the load
    /// creates new ones, and so are the counters then (their backend ids are not kept), or if
    /// they are of another size (`max_backends` changed); the link is kept for `attach` to
    /// decide.
    fn take(keep: &Keep, ct_sets: u32, backend_ids: u32) -> Kept {
        let state = keep.read().unwrap_or_else(|e| {
            tracing::warn!("{e}: ignored");
            None
        });
        let link = match (keep.link().exists(), &state) {
            (false, _) => None,
            (true, Some(State { interface: Some(iface), native, .. })) => match pinned_program(&keep.link()) {
                Ok((link, program)) => Some((link, program, iface.clone(), *native)),
                Err(e) => {
                    tracing::warn!("{}: {e}; removed", keep.link().display());
                    let _ = std::fs::remove_file(keep.link());
                    None
                }
            },
            (true, _) => {
                // Without the state file its mode is unknown: it goes (and its program with it).
                tracing::warn!("{}: no state file beside it; the earlier program is detached", keep.link().display());
                let _ = std::fs::remove_file(keep.link());
                None
            }
        };
        let tables = [map_names::CONNTRACK4, map_names::CONNTRACK6].map(|n| keep.map(n));
        let usable = match &state {
            Some(s) => Self::tables_usable(keep, s, ct_sets),
            None => Err("no state file names their hash keys".to_string()),
        };
        let counters = [map_names::GLOBAL_STATS, map_names::BACKEND_STATS].map(|n| keep.map(n));
        let counters_usable = match &usable {
            Ok(()) => Self::counters_usable(keep, backend_ids),
            Err(_) => Err("the connection tables are not taken over, nor the backend ids".to_string()),
        };
        if let Err(why) = counters_usable {
            if counters.iter().any(|c| c.exists()) {
                tracing::warn!("the counters lbd kept are not taken over ({why}): they start from zero");
            }
            for c in &counters {
                let _ = std::fs::remove_file(c);
            }
        }
        match usable {
            Ok(()) => Kept { state, link },
            Err(why) => {
                if tables.iter().any(|t| t.exists()) {
                    tracing::warn!(
                        "the connection tables lbd kept are not taken over ({why}): established connections go to the \
                         lookup tables' choice, which is their real server unless the real servers changed"
                    );
                }
                for t in &tables {
                    let _ = std::fs::remove_file(t);
                }
                Kept { state: None, link }
            }
        }
    }

    /// Whether the pinned counters (if any) fit this load: per-CPU arrays of lbd's counters with
    /// `backend_ids` elements for the backends.
    fn counters_usable(keep: &Keep, backend_ids: u32) -> Result<(), String> {
        let maps = [
            (map_names::GLOBAL_STATS, std::mem::size_of::<ReasonCounter>(), reason::COUNT),
            (map_names::BACKEND_STATS, std::mem::size_of::<Counters>(), backend_ids),
        ];
        for (name, value_size, entries) in maps {
            let path = keep.map(name);
            if path.exists() && !pinned_fits(&path, aya::maps::MapType::PerCpuArray, value_size, entries, 0)? {
                return Err(format!("{} is of another size (max_backends changed?)", path.display()));
            }
        }
        Ok(())
    }

    /// Whether the pinned tables are the ones `state` describes and fit this load.
    fn tables_usable(keep: &Keep, state: &State, ct_sets: u32) -> Result<(), String> {
        if state.format != STATE_FORMAT || state.ct_format != CT_FORMAT {
            return Err("they were written by another version of lbd".into());
        }
        if state.ct_sets != ct_sets {
            return Err(format!(
                "conntrack_size changed: they hold {} entries each, the config asks for {}",
                state.ct_sets as usize * lb_common::CT_WAYS,
                ct_sets as usize * lb_common::CT_WAYS
            ));
        }
        if state.ct_key4.len() != CT_HASH_KEY4 || state.ct_key6.len() != CT_HASH_KEY6 {
            return Err("the state file's hash keys are of another size".into());
        }
        let sizes = [
            (map_names::CONNTRACK4, std::mem::size_of::<CtSet<FlowKey4>>()),
            (map_names::CONNTRACK6, std::mem::size_of::<CtSet<FlowKey>>()),
        ];
        for (name, value_size) in sizes {
            let path = keep.map(name);
            if !path.exists() {
                return Err(format!("{} is gone", path.display()));
            }
            if !pinned_fits(&path, aya::maps::MapType::Array, value_size, ct_sets, BPF_F_MMAPABLE)? {
                return Err(format!("{} is not a connection table of this lbd", path.display()));
            }
        }
        Ok(())
    }
}

/// Whether the map pinned at `path` is of `map_type` with values of `value_size` bytes,
/// `max_entries` of them and the `flags` set: aya reuses a pinned map by name without checking.
fn pinned_fits(path: &std::path::Path, map_type: aya::maps::MapType, value_size: usize, max_entries: u32, flags: u32) -> Result<bool, String> {
    let info = MapData::from_pin(path).and_then(|m| m.info()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(info.map_type().is_ok_and(|t| t == map_type)
        && info.value_size() as usize == value_size
        && info.max_entries() == max_entries
        && info.map_flags() & flags == flags)
}

/// The kernel's id of program `name` of `ebpf` (0 if it cannot say).
fn program_id(ebpf: &Ebpf, name: &str) -> u32 {
    let prog: Option<&Xdp> = ebpf.program(name).and_then(|p| p.try_into().ok());
    prog.and_then(|p| p.info().ok()).map_or(0, |i| i.id())
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoadError::Map { name, source })
}

impl XdpDataplane {
    /// Loads the program and creates its maps (not attached yet).
    pub fn load(opts: XdpOptions) -> Result<Self, LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        let maglev = Maglev::new(opts.table_size)?;
        let table_buffers = opts.max_vips * 2;
        let ct_sets = ct_sets(opts.conntrack_size);
        let mut keep = opts.keep.clone();
        if let Some(k) = &keep {
            if let Err(why) = k.prepare() {
                tracing::warn!("{why}: the fast path cannot be kept when lbd stops, so a restart drops connections");
                keep = None;
            }
        }
        let kept = keep.as_ref().map(|k| Kept::take(k, ct_sets, backend_ids(opts.max_backends))).unwrap_or_default();
        let ct_keys = match &kept.state {
            Some(s) => (
                s.ct_key4.as_slice().try_into().expect("length checked"),
                s.ct_key6.as_slice().try_into().expect("length checked"),
            ),
            None => (random_key(), random_key()),
        };
        let mut loader = EbpfLoader::new();
        if let Some(k) = &keep {
            // Created and pinned there, or the kept ones (see `Kept::take`).
            loader.map_pin_path(map_names::CONNTRACK4, k.map(map_names::CONNTRACK4));
            loader.map_pin_path(map_names::CONNTRACK6, k.map(map_names::CONNTRACK6));
            loader.map_pin_path(map_names::GLOBAL_STATS, k.map(map_names::GLOBAL_STATS));
            loader.map_pin_path(map_names::BACKEND_STATS, k.map(map_names::BACKEND_STATS));
        }
        let mut ebpf = loader
            .override_global("TABLE_SIZE", &opts.table_size, true)
            .override_global("CT_KEY4", &ct_keys.0, true)
            .override_global("CT_KEY6", &ct_keys.1, true)
            .override_global("CT_SHIFT", &ct_shift(ct_sets), true)
            .override_global(aya_log::LEVEL, &opts.log_level, false)
            .map_max_entries(map_names::VIPS, opts.max_vips)
            .map_max_entries(map_names::VIP_STATE, opts.max_vips)
            .map_max_entries(map_names::BACKENDS, backend_ids(opts.max_backends))
            .map_max_entries(map_names::BACKEND_STATS, backend_ids(opts.max_backends))
            .map_max_entries(map_names::TABLES, table_buffers * table_chunks(opts.table_size))
            .map_max_entries(map_names::CONNTRACK4, ct_sets)
            .map_max_entries(map_names::CONNTRACK6, ct_sets)
            .load(OBJECT)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(LoadError::MissingMap(PROGRAM_NAME))?
            .try_into()?;
        prog.load()?;
        let program_id = program_id(&ebpf, PROGRAM_NAME);
        let mut dp = Self {
            vips_map: take(&mut ebpf, map_names::VIPS)?,
            backends_map: take(&mut ebpf, map_names::BACKENDS)?,
            tables: MappedTables::new(&mut ebpf, table_buffers, opts.table_size)?,
            vip_state: MappedVipState::new(&mut ebpf, opts.max_vips)?,
            graces: Graces::new(),
            vips_removed: 0,
            _tables_map: take(&mut ebpf, map_names::TABLES)?,
            addr_filter_map: take(&mut ebpf, map_names::ADDR_FILTER)?,
            addr_filter: vec![0; ADDR_FILTER_WORDS as usize],
            conntrack4: Arc::new(MappedConntrack::new(&mut ebpf, map_names::CONNTRACK4, ct_sets)?),
            conntrack6: Arc::new(MappedConntrack::new(&mut ebpf, map_names::CONNTRACK6, ct_sets)?),
            ct_keys,
            tx_ports: take(&mut ebpf, map_names::TX_PORTS)?,
            global_stats: take(&mut ebpf, map_names::GLOBAL_STATS)?,
            backend_stats: take(&mut ebpf, map_names::BACKEND_STATS)?,
            retired: HashMap::new(),
            zeroed: Counters::default(),
            hits_reported: Default::default(),
            kept_retired: HashMap::new(),
            next_vip_serial: 0,
            ebpf,
            maglev,
            vips: BTreeMap::new(),
            backends: HashMap::new(),
            free_vip_ids: Default::default(),
            next_vip_id: 0,
            free_backend_ids: Default::default(),
            next_backend_id: 0,
            generations: vec![0; backend_ids(opts.max_backends) as usize],
            tx_ifindexes: Vec::new(),
            tx_written: Vec::new(),
            link: None,
            native: false,
            egress_pass: Vec::new(),
            egress_lost: Vec::new(),
            program_id,
            serving: None,
            link_lost: false,
            keep,
            adoptable: kept.link,
            reserved: HashMap::new(),
            ct_sets,
            state_dirty: true,
            opts,
        };
        if let Some(state) = &kept.state {
            dp.reserve_ids(state);
            dp.zeroed = counters(state.counters.zeroed);
            dp.kept_retired = state.counters.retired.iter().map(|(vip, c)| (*vip, counters(*c))).collect();
        }
        Ok(dp)
    }

    /// Takes the backend ids of `state` (the run before): each id's generation, and the ids in
    /// use reserved for their real servers (see `reserved`); the others are free.
    fn reserve_ids(&mut self, state: &State) {
        let n = state.generations.len().min(self.generations.len());
        self.generations[..n].copy_from_slice(&state.generations[..n]);
        self.next_backend_id = n as u32;
        for b in state.backends.iter().filter(|b| (b.id as usize) < n) {
            self.reserved.insert((b.vip, b.backend.clone()), b.id);
        }
        let taken: std::collections::HashSet<u32> = self.reserved.values().copied().collect();
        skip_free_generations(&mut self.generations, &taken);
        // Freed before this program was loaded: no run of it ever saw them.
        self.free_backend_ids.extend((0..n as u32).filter(|id| !taken.contains(id)).map(|id| (id, 0)));
    }

    /// Writes the state file if it is out of date (kept dataplanes only). A failure is logged:
    /// the next restart then does not keep connections, nothing else changes.
    fn save_state(&mut self) {
        let Some(keep) = &self.keep else { return };
        if !std::mem::take(&mut self.state_dirty) {
            return;
        }
        let in_use = self.backends.iter().map(|((vip, key), b)| (vip, key, b.id));
        let mut backends: Vec<KeptBackend> = in_use
            .chain(self.reserved.iter().map(|((vip, key), &id)| (vip, key, id)))
            .map(|(vip, key, id)| KeptBackend { vip: *vip, backend: key.clone(), id })
            .collect();
        backends.sort_by_key(|b| b.id);
        let state = State {
            format: STATE_FORMAT,
            ct_format: CT_FORMAT,
            ct_sets: self.ct_sets,
            ct_key4: self.ct_keys.0.to_vec(),
            ct_key6: self.ct_keys.1.to_vec(),
            interface: self.serving.clone(),
            native: self.native,
            generations: self.generations[..self.next_backend_id as usize].to_vec(),
            backends,
            counters: KeptCounters {
                zeroed: words(&self.zeroed),
                retired: self.vips.iter().map(|(vip, slot)| (*vip, words(&slot.retired))).collect(),
            },
        };
        if let Err(e) = keep.write(&state) {
            self.state_dirty = true;
            tracing::warn!("writing {}: {e}; a restart of lbd would not keep connections", keep.state_file.display());
        }
    }

    /// The loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM_NAME)
            .expect("program present since load")
            .try_into()
            .expect("program is XDP")
    }

    /// A second handle on one of the loaded program's maps (`lb_common::map_names`), found
    /// through the program's map ids: for tests and the benchmark, which read or change a map
    /// this dataplane keeps to itself.
    pub fn program_map(&mut self, name: &str) -> Result<aya::maps::Map, DataplaneError> {
        let other = |e: &dyn std::fmt::Display| DataplaneError::Other(format!("finding map {name}: {e}"));
        let ids = self.program().info().and_then(|i| i.map_ids()).map_err(|e| other(&e))?;
        for id in ids.ok_or_else(|| other(&"the kernel does not list the program's maps"))? {
            let data = MapData::from_id(id).map_err(|e| other(&e))?;
            if data.info().map_err(|e| other(&e))?.name_as_str() == Some(name) {
                return aya::maps::Map::from_map_data(data).map_err(|e| other(&e));
            }
        }
        Err(other(&"not among the program's maps"))
    }

    /// The eBPF object, for taking the log ring buffer (`aya_log::EbpfLogger::init`).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches to `iface`, native (driver) or generic (skb) mode.
    pub fn attach(&mut self, iface: &str, native: bool) -> Result<(), LoadError> {
        let (mode, name, hint) = if native {
            (AyaXdpMode::Driver, "native", " (the driver may not support native XDP; try xdp_mode = \"generic\")")
        } else {
            (AyaXdpMode::Skb, "generic", "")
        };
        let attach_err = |source: aya::programs::ProgramError| {
            // EBUSY/EEXIST: another XDP program holds the interface, not a driver's limit.
            let hint = if occupied(&source) { OCCUPIED_HINT } else { hint };
            LoadError::Attach { iface: iface.to_string(), mode: name, hint, source: Box::new(source) }
        };
        let attachment = match self.adopt(iface, native) {
            Some((link, program)) => Attachment::Adopted(link, program),
            None => {
                let id = self.program().attach(iface, mode).map_err(attach_err)?;
                match self.keep.as_ref().map(Keep::link) {
                    None => Attachment::Managed(id),
                    Some(path) => match pin_link(self.program(), id, &path) {
                        Ok(pinned) => Attachment::Pinned(pinned),
                        Err(e) => {
                            tracing::warn!(
                                interface = iface,
                                "the fast path cannot be kept when lbd stops ({e}), so a restart drops connections"
                            );
                            Attachment::Managed(self.program().attach(iface, mode).map_err(attach_err)?)
                        }
                    },
                }
            }
        };
        self.link = Some((attachment, iface.to_string()));
        self.serving = Some(iface.to_string());
        self.native = native;
        self.link_lost = false;
        for ifindex in self.tx_ifindexes.clone() {
            self.prepare_egress(ifindex);
        }
        self.state_dirty = true;
        self.save_state();
        Ok(())
    }

    /// The link an earlier lbd kept, with its program id, if it serves `iface` in this mode: it
    /// goes on serving until `go_live` puts this program in. Otherwise it is let go (its program
    /// detached).
    fn adopt(&mut self, iface: &str, native: bool) -> Option<(PinnedLink, u32)> {
        let (link, program, old_iface, old_native) = self.adoptable.take()?;
        let mode = |native| if native { "native" } else { "generic" };
        let serves = crate::links::dump().ok().and_then(|l| l.get(iface).map(|l| l.xdp_programs.contains(&program)));
        let why = if old_iface != iface {
            format!("it serves {old_iface}, the config names {iface}")
        } else if old_native != native {
            format!("it is attached in {} mode, this start asks for {}", mode(old_native), mode(native))
        } else if serves != Some(true) {
            format!("{iface} no longer runs it")
        } else {
            tracing::info!(interface = iface, "the fast path lbd kept serves on until this start has set up its own");
            return Some((link, program));
        };
        tracing::info!(interface = %old_iface, "the fast path lbd kept is detached: {why}");
        let _ = link.unpin();
        None
    }

    /// Puts this program into the link an earlier lbd kept (see `adopt`), now that its maps hold
    /// the whole config: one atomic replacement, so no packet meets neither program. If that
    /// fails, the old link goes and the program is attached anew.
    fn take_over(&mut self) -> Result<(), DataplaneError> {
        let (pinned, iface) = match self.link.take() {
            Some((Attachment::Adopted(pinned, _), iface)) => (pinned, iface),
            other => {
                self.link = other;
                return Ok(());
            }
        };
        let path = self.keep.as_ref().map(Keep::link).expect("adopted only when kept");
        let replaced = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|e| e.to_string())
            .and_then(|link| self.program().attach_to_link(link).map_err(|e| e.to_string()))
            .and_then(|id| {
                // The link stays the same object, held by its pin; this process keeps it through
                // the pin only.
                drop(self.program().take_link(id));
                PinnedLink::from_pin(&path).map_err(|e| e.to_string())
            });
        match replaced {
            Ok(pinned) => {
                self.link = Some((Attachment::Pinned(pinned), iface.clone()));
                tracing::info!(
                    interface = %iface,
                    connections = self.conntrack_len(),
                    "took over the fast path lbd kept: this program replaced the earlier one in place, with the \
                     connection entries"
                );
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                tracing::warn!(interface = %iface, "replacing the program lbd kept failed ({e}); attaching anew");
                self.attach(&iface, self.native).map_err(|e| DataplaneError::Other(e.to_string()))
            }
        }
    }

    /// Lets go of the attachment: the program leaves the interface (a pinned link loses its pin).
    fn release_link(&mut self) -> Result<(), DataplaneError> {
        match self.link.take() {
            None => Ok(()),
            Some((Attachment::Managed(id), _)) => {
                self.program().detach(id).map_err(|e| DataplaneError::Other(format!("detaching: {e}")))
            }
            Some((Attachment::Pinned(p) | Attachment::Adopted(p, _), _)) => {
                p.unpin().map(drop).map_err(|e| DataplaneError::Other(format!("removing the pinned link: {e}")))
            }
        }
    }

    /// The program that serves the interface: this one, or the one an adopted link still runs.
    fn serving_program(&self) -> u32 {
        match &self.link {
            Some((Attachment::Adopted(_, program), _)) => *program,
            _ => self.program_id,
        }
    }

    /// Attaches again to the interface, in the same mode, if `links` shows it without the
    /// program: deleted and created again (the program went with the old device, and the new one
    /// has another index, or by chance the same). Interfaces real servers sit behind that were
    /// created again get their `TX_PORTS` entry and, in native mode, `xdp_pass` back.
    fn follow_links(&mut self, told: &crate::links::Links) -> Result<(), DataplaneError> {
        // `told` may be older than this dataplane's own last attachments (the watcher's first
        // dump can be taken before `attach`): where it disagrees with them, a dump taken now
        // decides, so that a stale one never detaches what was attached since.
        let fresh;
        let links = if self.agrees(told) {
            told
        } else {
            fresh = crate::links::dump().map_err(|e| DataplaneError::Other(format!("reading the interfaces: {e}")))?;
            &fresh
        };
        // Egress first: once the program is back, its redirects must find their ports.
        // Only the interfaces real servers use now: an index that comes back may be another
        // interface's.
        let in_use: Vec<u32> = self.backends.values().map(|b| b.entry.ifindex).collect();
        let present = |ifindex: u32| links.values().any(|l| l.ifindex == ifindex);
        let (kept, lost): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.egress_pass).into_iter().partition(|p| crate::links::runs(links, p.ifindex, p.program_id));
        self.egress_pass = kept;
        for pass in lost {
            self.egress_lost.push(pass.ifindex);
            pass.release();
        }
        self.egress_lost.retain(|i| in_use.contains(i));
        self.tx_ifindexes.retain(|i| in_use.contains(i));
        for ifindex in self.tx_ifindexes.clone() {
            if !present(ifindex) {
                continue;
            }
            // Upserts: the kernel dropped the entry of an interface that went away (deleted and
            // created again with the same index, or moved to another namespace and back).
            self.write_tx_port(ifindex)?;
        }
        // `xdp_pass` again where it went with its interface, once the interface is back: tried
        // once, so one that cannot be attached is not tried (and warned about) again at every
        // change of any interface.
        for ifindex in self.egress_lost.clone() {
            if present(ifindex) {
                self.egress_lost.retain(|i| *i != ifindex);
                self.prepare_egress(ifindex);
            }
        }
        let Some(name) = self.serving.clone() else { return Ok(()) };
        match links.get(&name) {
            None => {
                if !std::mem::replace(&mut self.link_lost, true) {
                    tracing::error!(
                        interface = %name,
                        "the interface lbd is attached to is gone: its traffic is not balanced until an interface of that \
                         name is back, and lbd attaches to it again"
                    );
                }
                Ok(())
            }
            Some(link) if link.xdp_programs.contains(&self.serving_program()) => {
                self.link_lost = false;
                Ok(())
            }
            Some(link) => {
                let (ifindex, native) = (link.ifindex, self.native);
                self.link_lost = false;
                // The old device took the attachment with it; this only lets go of the link.
                let _ = self.release_link();
                self.attach(&name, native).map_err(|e| {
                    DataplaneError::Other(format!(
                        "attaching to {name} again: {e}; its traffic is not balanced until the next change of the \
                         interfaces or a restart"
                    ))
                })?;
                tracing::warn!(interface = %name, ifindex, "interface created again: XDP attached to it again");
                Ok(())
            }
        }
    }

    /// Whether `links` shows every program this dataplane attached on its interface.
    fn agrees(&self, links: &crate::links::Links) -> bool {
        let serving =
            self.serving.as_ref().is_none_or(|name| links.get(name).is_some_and(|l| l.xdp_programs.contains(&self.serving_program())));
        serving && self.egress_pass.iter().all(|p| crate::links::runs(links, p.ifindex, p.program_id))
    }

    /// Detaches from the interface, and `xdp_pass` from the others (also happens when the
    /// dataplane is dropped, unless it is kept: see `XdpOptions::keep`).
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        self.serving = None;
        self.release_link()?;
        for pass in self.egress_pass.drain(..) {
            pass.release();
        }
        self.state_dirty = true;
        self.save_state();
        Ok(())
    }

    pub fn attached_interface(&self) -> Option<&str> {
        self.link.as_ref().map(|(_, iface)| iface.as_str())
    }

    /// The connection tables' hash keys, IPv4 and IPv6 (with `lb_common::ct_sets` of
    /// `conntrack_size` and `CtKey::ct_hash`, they tell which set a flow is in: for tests).
    pub fn conntrack_hash_keys(&self) -> ([u64; CT_HASH_KEY4], [u64; CT_HASH_KEY6]) {
        self.ct_keys
    }

    /// The ids of `vip`'s backends, whose `BACKEND_STATS` elements count what it forwards.
    pub fn backend_ids(&self, vip: &VipAddr) -> Vec<u32> {
        self.backends.iter().filter(|((v, _), _)| v == vip).map(|(_, b)| b.id).collect()
    }

    /// Number of flows in the connection tables (reads both tables, as `connection_count` does for
    /// `lbd status`: for tests and the benchmark).
    pub fn conntrack_len(&self) -> usize {
        self.conntrack4.count(&self.ct_keys.0) + self.conntrack6.count(&self.ct_keys.1)
    }

    /// Makes `ADDR_FILTER` hold the bits of `addrs` (only words that change are written). Bits
    /// are set before the VIPs they stand for appear in `VIPS` and cleared after they left it,
    /// so the filter never hides a VIP.
    fn write_addr_filter<'a>(&mut self, addrs: impl Iterator<Item = &'a VipAddr>, keep_old: bool) -> Result<(), DataplaneError> {
        let mut want = if keep_old { self.addr_filter.clone() } else { vec![0; ADDR_FILTER_WORDS as usize] };
        for vip in addrs {
            let (addr, family) = addr_words(vip.addr);
            let bit = addr_filter_bit(&addr, family);
            want[(bit / 32) as usize] |= 1 << (bit % 32);
        }
        for (i, (&w, have)) in want.iter().zip(self.addr_filter.iter_mut()).enumerate() {
            if w != *have {
                self.addr_filter_map.set(i as u32, w, 0).map_err(Self::map_err("writing the address filter"))?;
                *have = w;
            }
        }
        Ok(())
    }

    /// A VIP id: a released one once a grace period has passed since (waiting for it if no id
    /// was never used), else one never used.
    fn alloc_vip(&mut self) -> Result<(u32, [Vec<u32>; 2]), DataplaneError> {
        let spare = self.next_vip_id < self.opts.max_vips;
        if let Some(freed) = self.free_vip_ids.front().map(|v| v.freed).filter(|&f| self.graces.passed(f) || !spare) {
            self.graces.wait(freed);
            let v = self.free_vip_ids.pop_front().expect("listed");
            return Ok((v.id, v.tables));
        }
        if !spare {
            return Err(DataplaneError::Capacity { what: "virtual servers", limit: self.opts.max_vips });
        }
        let id = self.next_vip_id;
        self.next_vip_id += 1;
        let zero = vec![0; self.opts.table_size as usize];
        Ok((id, [zero.clone(), zero]))
    }

    /// A backend id, its counters zero: a released one (whose counters are moved aside) once a
    /// grace period has passed since (waiting for it if no id was never used), else one never
    /// used (zero since the map was created).
    fn alloc_backend(&mut self) -> Result<u32, DataplaneError> {
        let spare = self.next_backend_id < backend_ids(self.opts.max_backends);
        if let Some((id, freed)) = self.free_backend_ids.front().copied().filter(|&(_, f)| self.graces.passed(f) || !spare) {
            self.graces.wait(freed);
            self.free_backend_ids.pop_front();
            if let Err(e) = self.reuse_counters(id) {
                self.free_backend_ids.push_front((id, 0));
                return Err(e);
            }
            return Ok(id);
        }
        if !spare {
            return Err(DataplaneError::Capacity { what: "real servers", limit: self.opts.max_backends });
        }
        self.next_backend_id += 1;
        Ok(self.next_backend_id - 1)
    }

    /// Returns once a grace period has passed since every change made so far: no program run
    /// sees anything released or flipped away from (tests and benchmarks, to reuse ids at once).
    pub fn settle(&self) {
        self.graces.wait(self.graces.last());
    }

    fn map_err(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
        let what = what.into();
        move |source| DataplaneError::Map { what, source }
    }

    /// Makes `table` and `enabled` live for `vip`: a changed table is written into the idle buffer
    /// (only the slots that differ) and the buffers flip with one store into `VIP_STATE`, as the
    /// flags are set. A VIP not in `VIPS` yet is inserted then (the only step that can fail).
    fn install(&mut self, vip: &VipAddr, table: Vec<u32>, enabled: bool) -> Result<(), DataplaneError> {
        let slot = self.vips.get_mut(vip).expect("vip allocated");
        let new_table = !slot.installed || slot.tables[slot.active as usize] != table;
        if !new_table && slot.enabled == enabled {
            return Ok(());
        }
        if new_table {
            // A reader that picked the idle buffer before the last flip may still be in it.
            self.graces.wait(slot.last_flip);
            let idle = 1 - slot.active;
            let buffer = slot.id * 2 + idle;
            for (i, (&new, old)) in table.iter().zip(slot.tables[idle as usize].iter_mut()).enumerate() {
                if new != *old {
                    self.tables.set(buffer, i as u32, new);
                    *old = new;
                }
            }
            slot.active = idle;
        }
        slot.enabled = enabled;
        let (id, installed) = (slot.id, slot.installed);
        self.vip_state.set(id, VipState { active: slot.active, flags: vip_flags(enabled) });
        if new_table {
            let flip = self.graces.mark();
            self.vips.get_mut(vip).expect("vip allocated").last_flip = flip;
        }
        if !installed {
            // The element a removal freed is reused by this insert: a run that found the removed
            // VIP there would read this one's id.
            self.graces.wait(self.vips_removed);
            self.vips_map
                .insert(vip_key(vip), VipInfo { vip_id: id }, 0)
                .map_err(Self::map_err(format!("adding {vip}")))?;
            self.vips.get_mut(vip).expect("vip allocated").installed = true;
        }
        Ok(())
    }

    /// Writes backend `backend_key` of `vip` dead, then forgets it and frees its id: a failed
    /// write leaves it programmed and listed, for the next apply to retire.
    fn retire_backend(&mut self, vip: VipAddr, backend_key: String) -> Result<(), DataplaneError> {
        let key = (vip, backend_key);
        let id = self.backends[&key].id;
        self.write_backend(id, Backend::default(), &key.1)?;
        self.backends.remove(&key);
        self.vips.get_mut(&vip).expect("listed").backend_keys.remove(&key.1);
        self.free_backend(vip, id)
    }

    /// Frees backend `id` of `vip` (already written dead): the id goes to the free list, and what
    /// it forwarded becomes the VIP's `retired`. The id is freed first: if its counters cannot
    /// be read, its figures are lost from the VIP's, but the id is not (it was leaked for good).
    fn free_backend(&mut self, vip: VipAddr, id: u32) -> Result<(), DataplaneError> {
        self.state_dirty = true;
        let freed = self.graces.mark();
        self.free_backend_ids.push_back((id, freed));
        let counted = Self::sum(&self.backend_stats, id, Counters::add_read)?;
        let serial = match self.vips.get_mut(&vip) {
            Some(slot) => {
                slot.retired.add(&counted);
                slot.serial
            }
            None => u64::MAX,
        };
        self.retired.insert(id, Retired { vip, serial, counted });
        Ok(())
    }

    /// Zeroes the counters of backend id `id` before it is given to a new backend, keeping their
    /// value in `zeroed`, and what the old backend forwarded after it was freed in its VIP's.
    fn reuse_counters(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.state_dirty = true;
        let now = Self::sum(&self.backend_stats, id, Counters::add_read)?;
        if let Some(r) = self.retired.remove(&id) {
            if let Some(slot) = self.vips.get_mut(&r.vip).filter(|s| s.serial == r.serial) {
                slot.retired.add(&now.since(&r.counted));
            }
        }
        self.zeroed.add(&now);
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Other(format!("counting CPUs: {e}")))?;
        let zero = PerCpuValues::try_from(vec![Counters::default(); cpus])
            .map_err(|e| DataplaneError::Other(format!("per-CPU values: {e}")))?;
        self.backend_stats.set(id, zero, 0).map_err(Self::map_err("zeroing counters"))
    }

    /// Writes backend `id` (of `key`, egress `ifindex`) as `entry` if it is not so already, and
    /// records it. The egress port first: a backend already in the live table (or pinned by
    /// connection entries) that moved to another interface is used by the next packet, and a
    /// redirect to a port not yet in TX_PORTS fails.
    fn program_backend(&mut self, key: &(VipAddr, String), id: u32, entry: Backend, ifindex: u32) -> Result<(), DataplaneError> {
        if self.backends.get(key).map(|s| s.entry) != Some(entry) {
            if ifindex != 0 {
                self.ensure_tx_port(ifindex)?;
            }
            self.write_backend(id, entry, &key.1)?;
            self.backends.insert(key.clone(), BackendSlot { id, entry });
            self.vips.get_mut(&key.0).expect("allocated").backend_keys.insert(key.1.clone());
        }
        Ok(())
    }

    fn write_backend(&mut self, id: u32, entry: Backend, what: &str) -> Result<(), DataplaneError> {
        self.backends_map.set(id, entry, 0).map_err(Self::map_err(format!("programming {what}")))
    }

    /// Puts `ifindex` into `TX_PORTS` in every apply that writes a real server behind it (once
    /// per apply: `tx_written`): the kernel deletes an interface's entry when the interface goes
    /// away (or moves to another network namespace), and one that comes back with the same index
    /// (moved back, `ip link add ... index N`) would otherwise never be added again. Its real
    /// servers are written again when they are resolved again, since the neighbour entries went
    /// with the interface.
    fn ensure_tx_port(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        if self.tx_written.contains(&ifindex) {
            return Ok(());
        }
        self.write_tx_port(ifindex)?;
        self.tx_written.push(ifindex);
        if !self.tx_ifindexes.contains(&ifindex) {
            self.tx_ifindexes.push(ifindex);
            self.prepare_egress(ifindex);
        }
        Ok(())
    }

    fn write_tx_port(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| DataplaneError::Other(format!("adding ifindex {ifindex} to TX_PORTS: {e}")))
    }

    /// In native mode a frame redirected to another interface is sent by that interface's driver
    /// (`ndo_xdp_xmit`), and many drivers (ixgbe, i40e, ice, ...) set up their XDP send queues
    /// only while an XDP program is attached to that interface: without one they drop the frame
    /// after lbd's program returned, where no counter of lbd's sees it. So `xdp_pass` goes on
    /// every such interface (a veth peer needs one too, see `attach_pass`). Generic mode sends
    /// through the network stack and needs none.
    fn prepare_egress(&mut self, ifindex: u32) {
        let Some((_, attached)) = &self.link else { return };
        if !self.native {
            return;
        }
        let Ok(name) = nix::net::if_::if_indextoname(ifindex) else {
            tracing::warn!(ifindex, "real servers behind an interface that is gone: frames sent there are dropped");
            return;
        };
        let name = name.to_string_lossy().into_owned();
        if name == *attached || self.egress_pass.iter().any(|p| p.ifindex == ifindex) {
            return;
        }
        if let Some(pass) = self.adopt_pass(ifindex) {
            self.egress_pass.push(pass);
            return;
        }
        match self.pass_on(&name, ifindex) {
            Ok(pass) => {
                tracing::info!(interface = %name, "xdp_pass attached, so that its driver sends the frames lbd redirects there");
                self.egress_pass.push(pass);
            }
            Err(e) => tracing::warn!(
                interface = %name,
                "attaching xdp_pass failed ({e}); unless the interface has an XDP program of its own, drivers that send \
                 XDP frames only then drop what lbd redirects there (xdp_mode = \"generic\" avoids that)"
            ),
        }
    }

    /// `xdp_pass` attached to `name` (index `ifindex`), its link pinned if this dataplane is kept.
    fn pass_on(&self, name: &str, ifindex: u32) -> Result<EgressPass, LoadError> {
        let (mut ebpf, id) = attach_pass_link(name)?;
        let program_id = program_id(&ebpf, "xdp_pass");
        let Some(keep) = &self.keep else { return Ok(EgressPass { ifindex, program_id, _ebpf: Some(ebpf), pin: None }) };
        let prog: &mut Xdp = ebpf.program_mut("xdp_pass").ok_or(LoadError::MissingMap("xdp_pass"))?.try_into()?;
        match pin_link(prog, id, &keep.pass(ifindex)) {
            Ok(pin) => Ok(EgressPass { ifindex, program_id, _ebpf: Some(ebpf), pin: Some(pin) }),
            Err(e) => {
                tracing::warn!(interface = name, "xdp_pass cannot be kept when lbd stops ({e})");
                let (ebpf, _) = attach_pass_link(name)?;
                let again = self::program_id(&ebpf, "xdp_pass");
                Ok(EgressPass { ifindex, program_id: again, _ebpf: Some(ebpf), pin: None })
            }
        }
    }

    /// The `xdp_pass` an earlier lbd kept on interface `ifindex`, if it is still attached there;
    /// a stale pin is removed.
    fn adopt_pass(&self, ifindex: u32) -> Option<EgressPass> {
        let path = self.keep.as_ref()?.pass(ifindex);
        if !path.exists() {
            return None;
        }
        let attached = |program| crate::links::dump().is_ok_and(|l| crate::links::runs(&l, ifindex, program));
        match pinned_program(&path) {
            Ok((pin, program_id)) if attached(program_id) => Some(EgressPass { ifindex, program_id, _ebpf: None, pin: Some(pin) }),
            _ => {
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn sum<T: aya::Pod + Default>(
        map: &PerCpuArray<MapData, T>,
        index: u32,
        add: impl Fn(&mut T, &T),
    ) -> Result<T, DataplaneError> {
        let values = map.get(&index, 0).map_err(Self::map_err("reading counters"))?;
        let mut total = T::default();
        for v in values.iter() {
            add(&mut total, v);
        }
        Ok(total)
    }
}

impl Drop for XdpDataplane {
    /// A kept dataplane that is not attached through a pin leaves nothing behind (its start
    /// failed before it attached, or it was detached): its pinned tables and state file would
    /// only hold kernel memory until the next start. Unless an earlier lbd's program still serves
    /// (this start failed before `take_over`): what was kept stays for the next start.
    fn drop(&mut self) {
        let unattached = matches!(self.link, None | Some((Attachment::Managed(_), _)));
        if let Some(keep) = self.keep.as_ref().filter(|_| unattached && self.adoptable.is_none()) {
            let _ = keep.remove();
        }
    }
}

fn vip_flags(enabled: bool) -> u32 {
    if enabled { VIP_F_ENABLED } else { 0 }
}

/// A backend's `BACKEND_F_*` flags: its own state and copies of its VIP's.
fn backend_flags(alive: bool, vip: &VipAddr, enabled: bool) -> u32 {
    let mut flags = 0;
    if alive {
        flags |= BACKEND_F_ALIVE;
    }
    if enabled {
        flags |= BACKEND_F_VIP_ENABLED;
    }
    if vip.port == 0 {
        flags |= BACKEND_F_VIP_ANY_PORT;
    }
    flags
}

/// Address words as the program reads them: wire-order bytes in each u32.
pub fn addr_words(addr: IpAddr) -> ([u32; 4], u8) {
    match addr {
        IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(a) => {
            let o = a.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

pub fn vip_key(vip: &VipAddr) -> VipKey {
    let (addr, family) = addr_words(vip.addr);
    let proto = match vip.protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    };
    VipKey { addr, port: vip.port.to_be(), proto, family }
}

/// `Counters` as the state file holds them (`KeptCounters`), and back.
fn words(c: &Counters) -> [u64; 4] {
    [c.packets, c.bytes, c.new_flows, c.new_bytes]
}

fn counters([packets, bytes, new_flows, new_bytes]: [u64; 4]) -> Counters {
    Counters { packets, bytes, new_flows, new_bytes }
}

fn traffic(c: Counters) -> Traffic {
    Traffic { packets: c.packets, bytes: c.bytes, new_flows: c.new_flows }
}

impl Dataplane for XdpDataplane {
    fn name(&self) -> &'static str {
        "xdp"
    }

    fn apply(&mut self, services: &[ServiceSpec]) -> Result<(), DataplaneError> {
        let applied = self.apply_services(services);
        if applied.is_ok() && !self.reserved.is_empty() {
            // Real servers of the run before that this config does not have: their ids are free
            // (reused with a new generation, so their connection entries are not honoured), and
            // what they forwarded stays their virtual server's, as after a reload.
            for ((vip, _), id) in std::mem::take(&mut self.reserved) {
                if let Err(e) = self.free_backend(vip, id) {
                    tracing::warn!("reading the counters of backend id {id}: {e}; its figures leave its virtual server's");
                }
            }
        }
        if applied.is_ok() {
            // Virtual servers of the run before that this config does not have.
            self.kept_retired.clear();
        }
        self.save_state();
        applied
    }

    fn go_live(&mut self) -> Result<(), DataplaneError> {
        self.take_over()
    }

    fn taking_over(&self) -> bool {
        matches!(self.link, Some((Attachment::Adopted(..), _)))
    }

    fn kept_real_servers(&self) -> Vec<(VipAddr, String)> {
        if !self.taking_over() {
            return Vec::new();
        }
        self.reserved.keys().cloned().collect()
    }

    fn stays(&self) -> bool {
        matches!(self.link, Some((Attachment::Pinned(_), _)))
    }

    fn stats(&self) -> Result<DataplaneStats, DataplaneError> {
        self.dataplane_stats()
    }

    fn links_changed(&mut self, links: &crate::links::Links) -> Result<(), DataplaneError> {
        self.follow_links(links)
    }

    fn connection_count(&self) -> Option<ConnectionCount> {
        let (v4, v6, keys) = (self.conntrack4.clone(), self.conntrack6.clone(), self.ct_keys);
        Some(Box::new(move || (v4.count(&keys.0) + v6.count(&keys.1)) as u64))
    }
}

impl XdpDataplane {
    /// `Dataplane::apply` without the state file.
    fn apply_services(&mut self, services: &[ServiceSpec]) -> Result<(), DataplaneError> {
        self.tx_written.clear();
        // 1. VIPs that are gone stop matching first; their backends die with them.
        let wanted: std::collections::BTreeSet<VipAddr> = services.iter().map(|s| s.vip).collect();
        // New addresses enter the filter before their VIPs do; old ones leave it at the end.
        self.write_addr_filter(wanted.iter(), true)?;
        let gone: Vec<VipAddr> = self.vips.keys().filter(|v| !wanted.contains(v)).copied().collect();
        for vip in gone {
            match self.vips_map.remove(&vip_key(&vip)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(Self::map_err(format!("removing {vip}"))(e)),
            }
            self.vips_removed = self.graces.mark();
            // Out of `VIPS`: should it come back (a reload rolled back after a failure below), it
            // is installed again.
            let slot = self.vips.get_mut(&vip).expect("listed");
            (slot.installed, slot.applied) = (false, None);
            for backend_key in slot.backend_keys.clone() {
                self.retire_backend(vip, backend_key)?;
            }
            let slot = self.vips.remove(&vip).expect("listed");
            self.free_vip_ids.push_back(FreeVip { id: slot.id, tables: slot.tables, freed: self.vips_removed });
        }

        for svc in services {
            // 2. Allocate the VIP; a new one is not visible until its first table is complete.
            if !self.vips.contains_key(&svc.vip) {
                let (id, tables) = self.alloc_vip()?;
                self.next_vip_serial += 1;
                let slot = VipSlot {
                    id,
                    active: 1,
                    tables,
                    last_flip: 0,
                    enabled: svc.enabled,
                    installed: false,
                    applied: None,
                    members: Vec::new(),
                    backend_keys: Default::default(),
                    retired: self.kept_retired.remove(&svc.vip).unwrap_or_default(),
                    serial: self.next_vip_serial,
                };
                self.vips.insert(svc.vip, slot);
            }
            let slot = self.vips.get_mut(&svc.vip).expect("allocated");
            let vip_id = slot.id;
            if slot.installed && slot.applied.as_ref() == Some(&svc.backends) && slot.enabled == svc.enabled {
                // Same as last time: nothing to rebuild or rewrite. (A changed `enabled` goes on:
                // the backends carry it for connection-table hits and are rewritten, the table
                // stays, and `install` writes the VIP.)
                continue;
            }
            // Until step 5 completes, the next apply must not take this VIP for unchanged: rolling
            // back a reload that failed half way through its backends rewrites them.
            slot.applied = None;

            // 3. Backends: new ones get an id and a fresh generation; changed ones are rewritten.
            let mut members = Vec::new();
            for b in &svc.backends {
                let key = (svc.vip, b.key());
                let alive = b.mac.is_some();
                let mut entry = Backend {
                    dst_mac: b.mac.unwrap_or_default(),
                    src_mac: b.src_mac,
                    ifindex: b.ifindex,
                    vip_id,
                    generation: 0,
                    flags: backend_flags(alive, &svc.vip, svc.enabled),
                };
                let (id, fresh, kept) = match self.backends.get(&key) {
                    Some(slot) => {
                        entry.generation = slot.entry.generation;
                        (slot.id, false, false)
                    }
                    // Its id and generation in the run before: the connection entries that name
                    // them stay its own.
                    None => match self.reserved.remove(&key) {
                        Some(id) => {
                            entry.generation = self.generations[id as usize];
                            (id, true, true)
                        }
                        None => {
                            let id = self.alloc_backend()?;
                            self.generations[id as usize] = self.generations[id as usize].wrapping_add(1);
                            entry.generation = self.generations[id as usize];
                            (id, true, false)
                        }
                    },
                };
                self.state_dirty |= fresh;
                if let Err(e) = self.program_backend(&key, id, entry, b.ifindex) {
                    if kept {
                        self.reserved.insert(key, id);
                    } else if fresh {
                        // Never written: the id goes back (its counters are zero), reusable at once.
                        self.free_backend_ids.push_front((id, 0));
                    }
                    return Err(e);
                }
                if alive && b.weight > 0 {
                    members.push(MaglevBackend { key: key.1, weight: b.weight, id });
                }
            }

            // 4. The new table (unless the members are unchanged), then the atomic flip (also
            //    carries the enabled flag).
            let slot = &self.vips[&svc.vip];
            let table = if slot.installed && slot.members == members {
                slot.tables[slot.active as usize].clone()
            } else {
                self.maglev.build(&members).map_err(|e| DataplaneError::Other(format!("{}: {e}", svc.vip)))?
            };
            self.install(&svc.vip, table, svc.enabled)?;

            // 5. Backends no longer configured: only now that no table references them, mark them
            //    dead so their flows are re-chosen on the next packet.
            let keep: std::collections::HashSet<String> = svc.backends.iter().map(|b| b.key()).collect();
            let slot = self.vips.get_mut(&svc.vip).expect("allocated");
            let dropped: Vec<String> = slot.backend_keys.iter().filter(|k| !keep.contains(*k)).cloned().collect();
            slot.members = members;
            for backend_key in dropped {
                self.retire_backend(svc.vip, backend_key)?;
            }
            self.vips.get_mut(&svc.vip).expect("allocated").applied = Some(svc.backends.clone());
        }
        self.write_addr_filter(wanted.iter(), false)?;
        Ok(())
    }

    fn dataplane_stats(&self) -> Result<DataplaneStats, DataplaneError> {
        // `connections` is `connection_count`'s.
        let mut out = DataplaneStats::default();
        if let Some(name) = &self.serving {
            if self.link_lost {
                out.problem = Some(format!("interface {name} is gone: its traffic is not balanced until it is back"));
            } else if self.link.is_none() {
                out.problem = Some(format!("not attached to {name}: attaching again failed (see the log)"));
            }
        }
        // Forwarded packets are counted per backend only: every id ever handed out (in use, or
        // freed and not reused yet) plus what reused ids had counted.
        let mut counters = Vec::with_capacity(self.next_backend_id as usize);
        let mut forwarded = self.zeroed;
        for id in 0..self.next_backend_id {
            let c = Self::sum(&self.backend_stats, id, Counters::add_read)?;
            forwarded.add(&c);
            counters.push(c);
        }
        let mut by_reason = forwarded.by_reason();
        {
            let mut last = self.hits_reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *last = (last.0.max(by_reason[0].0), last.1.max(by_reason[0].1));
            by_reason[0] = *last;
        }
        for (i, name) in reason::NAMES.iter().enumerate() {
            let (packets, bytes) = match by_reason.get(i) {
                Some(&figures) => figures,
                None => {
                    let c = Self::sum(&self.global_stats, i as u32, |t, v| {
                        t.packets += v.packets;
                        t.bytes += v.bytes;
                    })?;
                    (c.packets, c.bytes)
                }
            };
            out.reasons.insert((*name).to_string(), Traffic { packets, bytes, new_flows: 0 });
        }
        let counted = |id: u32| counters.get(id as usize).copied().unwrap_or_default();
        // Slots per backend id, one pass over each live table (not one per backend).
        let mut slots = vec![0u32; backend_ids(self.opts.max_backends) as usize];
        for (vip, slot) in &self.vips {
            slots.fill(0);
            for &id in slot.tables[slot.active as usize].iter().filter(|&&id| id != NO_BACKEND) {
                if let Some(n) = slots.get_mut(id as usize) {
                    *n += 1;
                }
            }
            // The VIP's figures: its backends' and what its removed ones had forwarded.
            let mut total = slot.retired;
            for key in &slot.backend_keys {
                let key = (*vip, key.clone());
                let Some(b) = self.backends.get(&key) else { continue };
                let c = counted(b.id);
                total.add(&c);
                let slots = slots.get(b.id as usize).copied().unwrap_or(0);
                out.backends.insert(key, BackendStats { traffic: traffic(c), slots: Some(slots), connections: None });
            }
            out.vips.insert(*vip, traffic(total));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids reserved for their real servers keep their generation (their connection entries name
    /// it); every other id, also one past what the state file lists, moves on by the skip.
    #[test]
    fn a_take_over_skips_the_generations_of_free_ids() {
        let mut generations = vec![3, 7, 0, 0];
        skip_free_generations(&mut generations, &std::collections::HashSet::from([1]));
        assert_eq!(generations, [3 + GENERATION_SKIP, 7, GENERATION_SKIP, GENERATION_SKIP]);
    }
}
