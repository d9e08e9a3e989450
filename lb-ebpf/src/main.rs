//! lbd's XDP fast path: find the VIP, pick a backend (connection table, then Maglev table),
//! rewrite the destination MAC and transmit (DSR). Everything that is not VIP traffic passes to the
//! kernel untouched. The entry point is thin: its verdict is the value of `process`.
#![no_std]
#![no_main]

mod maps;
mod parse;
mod rewrite;
mod select;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use aya_log_ebpf::debug;
use lb_common::{reason, VIP_F_ENABLED};
use parse::Parsed;

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
    let pkt = match parse::parse(ctx) {
        Parsed::NotIp => return (xdp_action::XDP_PASS, reason::NOT_IP),
        Parsed::Malformed => return (xdp_action::XDP_PASS, reason::MALFORMED),
        Parsed::Ip(p) => p,
    };
    // Only TCP/UDP VIPs exist, so ICMP, ESP, ... to a VIP address miss here and pass, as does a
    // later fragment (no ports) unless its address has a port-0 VIP.
    let Some(vip) = select::find_vip(&pkt.flow) else {
        return (xdp_action::XDP_PASS, reason::NOT_VIP);
    };
    if vip.flags & VIP_F_ENABLED == 0 {
        // A backup director never forwards (and, dropping, never lets its kernel answer either).
        return (xdp_action::XDP_DROP, reason::VIP_DISABLED);
    }
    if pkt.fragment {
        return (xdp_action::XDP_DROP, reason::FRAGMENT);
    }
    let Some(choice) = select::choose(&vip, &pkt.flow) else {
        return (xdp_action::XDP_DROP, reason::NO_BACKEND);
    };
    debug!(ctx, "vip {} -> backend {} new={}", vip.vip_id, choice.id, choice.new_flow as u8);
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    stats::count_forward(vip.vip_id, choice.id, bytes, choice.new_flow);
    match rewrite::forward(ctx, &choice.backend) {
        Ok(verdict) if choice.new_flow => (verdict, reason::NEW_FLOW),
        Ok(verdict) => (verdict, reason::CONNTRACK_HIT),
        Err(()) => (xdp_action::XDP_ABORTED, reason::REDIRECT_FAILED),
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
