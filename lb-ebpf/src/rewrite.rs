//! DSR rewrite: only the Ethernet addresses change; the IP packet still says "to the VIP", which
//! the backend holds on its loopback, so it answers the client directly.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::Backend;

use crate::maps::TX_PORTS;

/// Rewrites destination and source MAC and returns the verdict: `XDP_TX` when the backend sits
/// behind the ingress interface, else `XDP_REDIRECT` through `TX_PORTS` (`Err` if that failed).
#[inline(always)]
pub fn forward(ctx: &XdpContext, backend: &Backend) -> Result<u32, ()> {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return Err(());
    }
    // Six 16-bit moves: the frame starts at an even address (see `parse::load`) and both MACs sit
    // at even offsets of `Backend` (4-byte aligned); `[u8; 6]` copies would be 12 byte moves.
    let dst = backend.dst_mac.as_ptr() as *const u16;
    let src = backend.src_mac.as_ptr() as *const u16;
    let pkt = start as *mut u16;
    // SAFETY: the 12 bytes of the two MAC addresses are inside the packet (checked above); the
    // reads are inside `backend`; all 2-byte aligned.
    unsafe {
        for i in 0..3 {
            pkt.add(i).write(dst.add(i).read());
            pkt.add(3 + i).write(src.add(i).read());
        }
    }
    if backend.ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(xdp_action::XDP_TX);
    }
    TX_PORTS.redirect(backend.ifindex, 0).map_err(|_| ())
}
