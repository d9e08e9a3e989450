//! Auxiliary XDP programs used around the fast path, not by it:
//! - `xdp_pass`: attached to the *peer* of a veth the director transmits on. The kernel only
//!   schedules a veth's receive NAPI for XDP_TX/XDP_REDIRECT frames when that veth has an XDP
//!   program (`veth_xdp_flush`); with GRO alone the frames wait in its ring for unrelated traffic.
//! - `bench_*`: the benchmark's baselines, sink and generator (`cargo xtask bench`, `benches/`):
//!   - `bench_tx`: returns `XDP_TX` and nothing else (the per-packet floor);
//!   - `bench_swap_tx`: swaps the Ethernet addresses and returns `XDP_TX`;
//!   - `bench_redirect`: `XDP_REDIRECT` through a devmap hash to `BENCH_CFG[CFG_EGRESS]`, no
//!     rewrite (the live path's baseline);
//!   - `bench_sink`: counts packets and bytes in a per-CPU array and drops;
//!   - `bench_gen`: the traffic generator for `BPF_PROG_TEST_RUN` live frames: rewrites the
//!     source address's last 32 bits to `base + (seq mod flows)` from a per-CPU sequence number,
//!     then `XDP_TX` (the kernel transmits the frame on the test run's ingress interface);
//!   - `bench_vary`: the same rewrite, then a tail call to `BENCH_JUMP[0]`, so that every repeat
//!     of a test run sees another flow (test_run reuses one buffer for all repeats);
//!   - `bench_maps_hit`: the kernel map work of an IPv4 connection-table hit when the tables were
//!     LRU hashes (they are set-associative arrays now, see `conntrack.rs`): an LRU hash lookup
//!     with a 16-byte key that hits, then `XDP_TX`. Kept as the comparison;
//!   - `bench_maps_new`: the same for a new flow: an LRU lookup that misses, a hash lookup with a
//!     20-byte key (like `VIPS`) and an LRU insert of a never-seen 16-byte key, then `XDP_TX`;
//!     `bench_maps_new_pcpu` the same on an LRU hash with per-CPU LRU lists.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::{FlowKey4, FlowValue, VipInfo, VipKey};

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark settings, written by the benchmark before it runs anything (host order).
#[map(name = "BENCH_CFG")]
static BENCH_CFG: Array<u32> = Array::with_max_entries(4, 0);
/// ifindex `bench_redirect` sends to (key of `BENCH_PORTS`).
const CFG_EGRESS: u32 = 0;
/// Distinct flows `bench_gen`/`bench_vary` cycle through; 0 = never repeat one (2^32).
const CFG_FLOWS: u32 = 1;
/// First value of the rewritten source address word (host order).
const CFG_BASE: u32 = 2;
/// 6 = rewrite an IPv6 source (bytes 34..38 of an untagged frame), else IPv4 (bytes 26..30).
const CFG_FAMILY: u32 = 3;

/// Egress interfaces of `bench_redirect`, keyed by ifindex like lbd's `TX_PORTS`.
#[map(name = "BENCH_PORTS")]
static BENCH_PORTS: DevMapHash = DevMapHash::with_max_entries(8, 0);

/// Per-CPU sequence number of `bench_gen`/`bench_vary` (index 0).
#[map(name = "BENCH_SEQ")]
static BENCH_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU packets (index 0) and bytes (index 1) seen by `bench_sink`.
#[map(name = "BENCH_SINK")]
static BENCH_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// The program `bench_vary` hands each frame to (index 0).
#[map(name = "BENCH_JUMP")]
static BENCH_JUMP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `bench_maps_*`: a hash map keyed like `VIPS` and an LRU hash keyed like `CONNTRACK4` was (the
/// benchmark inserts the all-zero key into both, and sizes `BENCH_LRU` like lbd's connection
/// table when it loads them; 16 entries otherwise, so `xdp_pass` users pay nothing).
#[map(name = "BENCH_HASH")]
static BENCH_HASH: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(64, 0);
#[map(name = "BENCH_LRU")]
static BENCH_LRU: LruHashMap<FlowKey4, FlowValue> = LruHashMap::with_max_entries(16, 0);
/// The same with per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`), for `bench_maps_new_pcpu`.
#[map(name = "BENCH_LRU_PCPU")]
static BENCH_LRU_PCPU: LruHashMap<FlowKey4, FlowValue> = LruHashMap::with_max_entries(16, 2);

#[inline(always)]
fn cfg(index: u32) -> u32 {
    BENCH_CFG.get(index).copied().unwrap_or(0)
}

#[xdp]
pub fn bench_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_swap_tx(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // As the kernel's xdp2 sample: six 16-bit moves (frames start 2-byte aligned); a [u8; 6]
    // copy would become a byte-by-byte memcpy call on BPF.
    let p = start as *mut u16;
    // SAFETY: the 12 bytes of the two MAC addresses are inside the packet (checked above).
    unsafe {
        let d = [p.read(), p.add(1).read(), p.add(2).read()];
        p.write(p.add(3).read());
        p.add(1).write(p.add(4).read());
        p.add(2).write(p.add(5).read());
        p.add(3).write(d[0]);
        p.add(4).write(d[1]);
        p.add(5).write(d[2]);
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_redirect(_ctx: XdpContext) -> u32 {
    BENCH_PORTS.redirect(cfg(CFG_EGRESS), 0).unwrap_or(xdp_action::XDP_ABORTED)
}

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if let Some(p) = BENCH_SINK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
    if let Some(b) = BENCH_SINK.get_ptr_mut(1) {
        // SAFETY: as above.
        unsafe { *b += bytes };
    }
    xdp_action::XDP_DROP
}

/// Rewrites the source address word of the frame for the next flow; false if it cannot.
#[inline(always)]
fn next_flow(ctx: &XdpContext) -> bool {
    let Some(seq) = BENCH_SEQ.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    let n = unsafe {
        let n = *seq;
        *seq = n + 1;
        n
    };
    let flows = cfg(CFG_FLOWS) as u64;
    let i = if flows == 0 { n } else { n % flows };
    let word = cfg(CFG_BASE).wrapping_add(i as u32).to_be();
    let off = if cfg(CFG_FAMILY) == 6 { 34 } else { 26 };
    let start = ctx.data();
    if start + off + 4 > ctx.data_end() {
        return false;
    }
    // SAFETY: the 4 bytes are inside the packet (checked above).
    unsafe { core::ptr::write_unaligned((start + off) as *mut u32, word) };
    true
}

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    if next_flow(&ctx) {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_ABORTED
    }
}

#[xdp]
pub fn bench_vary(ctx: XdpContext) -> u32 {
    if !next_flow(&ctx) {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: a tail call never returns on success; on failure we fall through.
    unsafe { BENCH_JUMP.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// The all-zero keys, field by field from a value the compiler cannot see (a zeroed key literal
/// becomes a byte-by-byte `memset` call on BPF, which would dwarf the lookups measured here).
#[inline(always)]
fn zero_keys(src: u32, dst: u32) -> (VipKey, FlowKey4) {
    // SAFETY: reads a local.
    let z: u32 = unsafe { core::ptr::read_volatile(&0u32) };
    let vip = VipKey { addr: [z, z, z, z], port: z as u16, proto: z as u8, family: z as u8 };
    let flow = FlowKey4 {
        src,
        dst,
        sport: z as u16,
        dport: z as u16,
        // Distinct values, or the byte stores merge into a memset call.
        proto: z as u8,
        _pad0: (z >> 8) as u8,
        _pad1: (z >> 16) as u16,
    };
    (vip, flow)
}

#[xdp]
pub fn bench_maps_hit(_ctx: XdpContext) -> u32 {
    let (_, flow) = zero_keys(0, 0);
    // SAFETY: plain-data values, only tested for presence.
    let hit = unsafe { BENCH_LRU.get(&flow).is_some() };
    if hit {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_ABORTED
    }
}

#[xdp]
pub fn bench_maps_new(_ctx: XdpContext) -> u32 {
    maps_new(&BENCH_LRU)
}

/// `bench_maps_new` on an LRU hash with per-CPU LRU lists.
#[xdp]
pub fn bench_maps_new_pcpu(_ctx: XdpContext) -> u32 {
    maps_new(&BENCH_LRU_PCPU)
}

#[inline(always)]
fn maps_new(lru: &LruHashMap<FlowKey4, FlowValue>) -> u32 {
    let Some(seq) = BENCH_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU.
    let n = unsafe {
        let n = *seq;
        *seq = n + 1;
        n
    };
    let (vip, flow) = zero_keys(cfg(CFG_BASE).wrapping_add(n as u32), (n >> 32) as u32 + 1);
    // SAFETY: plain-data values, only tested for presence.
    if unsafe { lru.get(&flow).is_some() } || unsafe { BENCH_HASH.get(&vip).is_none() } {
        return xdp_action::XDP_ABORTED;
    }
    match lru.insert(&flow, &FlowValue { backend: 1, generation: 1 }, 0) {
        Ok(()) => xdp_action::XDP_TX,
        Err(_) => xdp_action::XDP_ABORTED,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
