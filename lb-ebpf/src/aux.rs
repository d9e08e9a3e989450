//! Auxiliary XDP programs used around the fast path, not by it:
//! - `xdp_pass`: attached to the *peer* of a veth the director transmits on. The kernel only
//!   schedules a veth's receive NAPI for XDP_TX/XDP_REDIRECT frames when that veth has an XDP
//!   program (`veth_xdp_flush`); with GRO alone the frames wait in its ring for unrelated traffic.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
