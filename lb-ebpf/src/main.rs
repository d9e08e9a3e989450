//! lbd's XDP fast path: find the VIP, pick a backend (connection table, then Maglev table),
//! rewrite the destination MAC and transmit (DSR). Everything that is not VIP traffic passes to the
//! kernel untouched. The entry point is thin: its verdict is the value of `process`.
//!
//! Order of work, cheapest rejection first: Ethernet and IP addresses; the address filter (one
//! array read: most non-VIP traffic stops here); ports; the family's connection table (a hit
//! needs no `VIPS` lookup); and only for a new flow `VIPS`, the flow hash, the lookup table and
//! the connection insert.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod conntrack;
mod maps;
mod parse;
mod rewrite;
mod select;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, maps::Array, programs::XdpContext, Global};
use aya_log_ebpf::debug;
use lb_common::{
    addr_filter_bit_v4, addr_filter_bit_v6, flow_hash, flow_hash_v4, reason, CtKey, CtSet, FlowKey,
    FlowKey4, FAMILY_V4, FAMILY_V6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, VIP_F_ENABLED,
};
use maps::{CONNTRACK4, CONNTRACK6, CT_KEY4, CT_KEY6};
use parse::Parsed;
use select::Choice;

#[xdp]
pub fn lbd_xdp(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (verdict, why) = process(&ctx);
    stats::count_reason(why, bytes);
    verdict
}

/// Returns the verdict and the reason it is counted under.
#[inline(always)]
fn process(ctx: &XdpContext) -> (u32, u32) {
    match parse::parse(ctx) {
        Parsed::NotIp => (xdp_action::XDP_PASS, reason::NOT_IP),
        Parsed::Malformed => (xdp_action::XDP_PASS, reason::MALFORMED),
        Parsed::V4(ip) => v4(ctx, &ip),
        Parsed::V6(ip) => v6(ctx, &ip),
    }
}

const NOT_VIP: (u32, u32) = (xdp_action::XDP_PASS, reason::NOT_VIP);
const MALFORMED: (u32, u32) = (xdp_action::XDP_PASS, reason::MALFORMED);

#[inline(always)]
fn v4(ctx: &XdpContext, ip: &parse::Ip4) -> (u32, u32) {
    if !select::maybe_vip(addr_filter_bit_v4(ip.dst)) {
        return NOT_VIP;
    }
    let key = |sport, dport| FlowKey4 { src: ip.src, dst: ip.dst, sport, dport, proto: ip.proto, _pad0: 0, _pad1: 0 };
    let addr = [ip.dst, 0, 0, 0];
    if !ip.fragment && (ip.proto == PROTO_TCP || ip.proto == PROTO_UDP) {
        // The common case on a path of its own, one test up front: through `flow` it carried
        // "TCP or UDP" and "not a fragment" along as flags to test again (a hit measured 15 ns
        // there, 14 here). `v6` does the same.
        let Some((sport, dport)) = parse::ports(ctx, ip.l4) else {
            return MALFORMED;
        };
        let key = key(sport, dport);
        let probe = conntrack::probe(&CONNTRACK4, &CT_KEY4, &key);
        return with_entry(ctx, probe, &key, (addr, dport, ip.proto, FAMILY_V4), flow_hash_v4);
    }
    let t = parse::Transport { proto: ip.proto, l4: ip.l4, fragment: ip.fragment, later_fragment: ip.later_fragment };
    let icmp = || if ip.proto == PROTO_ICMP { Some(icmp4(ctx, ip)) } else { None };
    flow(ctx, &t, addr, FAMILY_V4, (&CONNTRACK4, &CT_KEY4), key, flow_hash_v4, icmp)
}

#[inline(always)]
fn v6(ctx: &XdpContext, ip: &parse::Ip6) -> (u32, u32) {
    if !select::maybe_vip(addr_filter_bit_v6(&ip.dst)) {
        return NOT_VIP;
    }
    // `ip.next` read through `parse::opaque`: otherwise LLVM merged this test into
    // `v6_transport`'s switch on the extension headers (a range check, a shift and two bit
    // masks, extension headers first, before TCP was known; IPv6 hits 16 ns against 15).
    let next = parse::opaque(ip.next as u64);
    if next == PROTO_TCP as u64 || next == PROTO_UDP as u64 {
        // TCP or UDP right after the fixed header (so not a fragment) on a path of its own, as
        // in `v4`: IPv6 hits 16 ns against 17 through `v6_transport` and `flow` (README, "What
        // the profile showed").
        let Some((sport, dport)) = parse::ports(ctx, ip.after) else {
            return MALFORMED;
        };
        let key = FlowKey { src: ip.src, dst: ip.dst, sport, dport, proto: ip.next, family: FAMILY_V6, _pad: [0; 2] };
        let probe = conntrack::probe(&CONNTRACK6, &CT_KEY6, &key);
        return with_entry(ctx, probe, &key, (ip.dst, dport, ip.next, FAMILY_V6), |k: &FlowKey| flow_hash(k));
    }
    let Some(t) = parse::v6_transport(ctx, ip) else {
        return MALFORMED;
    };
    let key = |sport, dport| FlowKey { src: ip.src, dst: ip.dst, sport, dport, proto: t.proto, family: FAMILY_V6, _pad: [0; 2] };
    let icmp = || if t.proto == PROTO_ICMPV6 { Some(icmp6(ctx, ip, t.l4)) } else { None };
    flow(ctx, &t, ip.dst, FAMILY_V6, (&CONNTRACK6, &CT_KEY6), key, flow_hash, icmp)
}

/// ICMP: a "fragmentation needed" to a VIP about a real server's reply goes to the real server
/// (see `too_big`); anything else passes, as no VIP is ICMP's. A BPF function of its own, as is
/// `icmp6`: inlined, the rare ICMP path added a quarter to the program's instructions.
#[inline(never)]
fn icmp4(ctx: &XdpContext, ip: &parse::Ip4) -> (u32, u32) {
    let Some(q) = parse::too_big_v4(ctx, ip) else {
        return NOT_VIP;
    };
    let key = FlowKey4 { src: q.client, dst: ip.dst, sport: q.client_port, dport: q.vip_port, proto: q.proto, _pad0: 0, _pad1: 0 };
    too_big(ctx, &key, ([ip.dst, 0, 0, 0], q.vip_port, q.proto, FAMILY_V4), (&CONNTRACK4, &CT_KEY4), flow_hash_v4)
}

/// `icmp4` for ICMPv6 at `l4` (not a fragment): a "packet too big" goes to the real server.
#[inline(never)]
fn icmp6(ctx: &XdpContext, ip: &parse::Ip6, l4: usize) -> (u32, u32) {
    let Some(q) = parse::too_big_v6(ctx, ip, l4) else {
        return NOT_VIP;
    };
    let key = FlowKey { src: q.client, dst: ip.dst, sport: q.client_port, dport: q.vip_port, proto: q.proto, family: FAMILY_V6, _pad: [0; 2] };
    // A closure, not `flow_hash` itself: with two callers LLVM made the function item's
    // `call_once` a BPF function of its own, and IPv6 hits took 26 ns instead of 18.
    too_big(ctx, &key, (ip.dst, q.vip_port, q.proto, FAMILY_V6), (&CONNTRACK6, &CT_KEY6), |k: &FlowKey| flow_hash(k))
}

/// An ICMP "fragmentation needed" / ICMPv6 "packet too big" to a VIP: a router on the way to a
/// client found a real server's reply (sent from the VIP, DSR) too big for its next hop. Only
/// that real server can use it (its TCP lowers the path MTU and resends; the director's kernel
/// has no such connection), so it goes where the quoted flow, `key` in the client's direction,
/// goes: its connection entry's real server, else the lookup table's choice, as IPVS does in
/// DR mode. Without it, clients behind a link of a smaller MTU hang on large replies (a path
/// MTU black hole). No connection entry is made; the destination tuple is as in `with_entry`.
#[inline(always)]
fn too_big<K: CtKey>(
    ctx: &XdpContext,
    key: &K,
    (addr, dport, proto, family): ([u32; 4], u16, u8, u8),
    (table, hash_key): (&Array<CtSet<K>>, &Global<K::HashKey>),
    hash: impl FnOnce(&K) -> u32,
) -> (u32, u32) {
    let probe = conntrack::probe(table, hash_key, key);
    if let Some((backend, generation)) = probe.hit() {
        if let Some(c) = select::established(backend, generation, addr, dport, proto, family) {
            return send_too_big(ctx, &c);
        }
    }
    match new_flow(addr, dport, proto, family, false, || hash(key)) {
        Ok(c) => send_too_big(ctx, &c),
        Err(verdict) => verdict,
    }
}

/// `forward` for `too_big`: counted under its reason, not for the real server.
#[inline(always)]
fn send_too_big(ctx: &XdpContext, choice: &Choice) -> (u32, u32) {
    if !choice.enabled {
        return (xdp_action::XDP_DROP, reason::VIP_DISABLED);
    }
    match rewrite::forward(ctx, choice.backend) {
        Ok(verdict) => (verdict, reason::ICMP_TOO_BIG),
        Err(_) => (xdp_action::XDP_ABORTED, reason::REDIRECT_FAILED),
    }
}

/// Either family once its transport header is found: ports, the family's connection table
/// (`table` with its hash key, entries keyed by `key(sport, dport)`), else a new flow chosen by
/// `hash` of the key; ICMP that is not a fragment goes to `icmp` (`None`: not ICMP).
#[inline(always)]
fn flow<K: CtKey>(
    ctx: &XdpContext,
    t: &parse::Transport,
    addr: [u32; 4],
    family: u8,
    (table, hash_key): (&Array<CtSet<K>>, &Global<K::HashKey>),
    key: impl FnOnce(u16, u16) -> K,
    hash: impl FnOnce(&K) -> u32,
    icmp: impl FnOnce() -> Option<(u32, u32)>,
) -> (u32, u32) {
    let l4 = t.proto == PROTO_TCP || t.proto == PROTO_UDP;
    let (sport, dport) = if l4 && !t.later_fragment {
        match parse::ports(ctx, t.l4) {
            Some(p) => p,
            None => return MALFORMED,
        }
    } else {
        // ICMP is the family's `icmp` (`icmp4`, `icmp6`): tested for here, off the TCP and UDP
        // paths. Tested for in `v6` or `process` instead, it made IPv6 hits slower (README).
        if !t.fragment {
            if let Some(verdict) = icmp() {
                return verdict;
            }
        }
        (0, 0)
    };
    let key = key(sport, dport);
    let probe = if l4 && !t.fragment { conntrack::probe(table, hash_key, &key) } else { conntrack::Probe::none() };
    if let Some((backend, generation)) = probe.hit() {
        if let Some(c) = select::established(backend, generation, addr, dport, t.proto, family) {
            return forward::<false>(ctx, &c);
        }
        // The backend was removed (or its id recycled): choose again.
    }
    let choice = match new_flow(addr, dport, t.proto, family, t.fragment, || hash(&key)) {
        Ok(c) => c,
        Err(verdict) => return verdict,
    };
    probe.insert(&key, choice.id, choice.backend.generation);
    forward::<true>(ctx, &choice)
}

/// `flow` for a TCP or UDP packet that is not a fragment, its connection-table `probe` done:
/// the entry's backend, else a new flow chosen by `hash` of `key` and recorded. The tuple is
/// the destination: address, port, protocol and family.
#[inline(always)]
fn with_entry<K: CtKey>(
    ctx: &XdpContext,
    probe: conntrack::Probe<K>,
    key: &K,
    (addr, dport, proto, family): ([u32; 4], u16, u8, u8),
    hash: impl FnOnce(&K) -> u32,
) -> (u32, u32) {
    if let Some((backend, generation)) = probe.hit() {
        if let Some(c) = select::established(backend, generation, addr, dport, proto, family) {
            return forward::<false>(ctx, &c);
        }
    }
    let choice = match new_flow(addr, dport, proto, family, false, || hash(key)) {
        Ok(c) => c,
        Err(verdict) => return verdict,
    };
    probe.insert(key, choice.id, choice.backend.generation);
    forward::<true>(ctx, &choice)
}

/// A flow without a (valid) connection entry: its VIP and a backend from the VIP's lookup table,
/// or the verdict if there is none. Only TCP/UDP VIPs exist, so ICMP, ESP, ... to a VIP address
/// miss here and pass, as does a later fragment (no ports) unless its address has a port-0 VIP.
#[inline(always)]
fn new_flow(
    addr: [u32; 4],
    dport: u16,
    proto: u8,
    family: u8,
    fragment: bool,
    hash: impl FnOnce() -> u32,
) -> Result<Choice, (u32, u32)> {
    let Some((vip_id, state)) = select::find_vip(addr, dport, proto, family) else {
        return Err(NOT_VIP);
    };
    // Each field read once (the controller stores them while this runs, see `VipState`).
    // SAFETY: fields of a map element, valid for the whole run.
    let (active, flags) = unsafe { (core::ptr::read_volatile(&state.active), core::ptr::read_volatile(&state.flags)) };
    if flags & VIP_F_ENABLED == 0 {
        // A backup director never forwards (and, dropping, never lets its kernel answer either).
        return Err((xdp_action::XDP_DROP, reason::VIP_DISABLED));
    }
    if fragment {
        return Err((xdp_action::XDP_DROP, reason::FRAGMENT));
    }
    select::from_table(vip_id, active, hash()).ok_or((xdp_action::XDP_DROP, reason::NO_BACKEND))
}

/// Forwards a packet to `choice` (dropping it if the VIP is disabled) and counts it for its
/// backend once the redirect was accepted: a failed one is `redirect-failed` only. `NEW_FLOW` is
/// a constant so that a hit does not carry the new-flow counting as a runtime flag.
#[inline(always)]
fn forward<const NEW_FLOW: bool>(ctx: &XdpContext, choice: &Choice) -> (u32, u32) {
    if !choice.enabled {
        return (xdp_action::XDP_DROP, reason::VIP_DISABLED);
    }
    debug!(ctx, "vip {} -> backend {} new={}", choice.vip_id, choice.id, NEW_FLOW as u8);
    let Ok(verdict) = rewrite::forward(ctx, choice.backend) else {
        return (xdp_action::XDP_ABORTED, reason::REDIRECT_FAILED);
    };
    stats::count_forward::<NEW_FLOW>(choice.id, (ctx.data_end() - ctx.data()) as u64);
    (verdict, if NEW_FLOW { reason::NEW_FLOW } else { reason::CONNTRACK_HIT })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
