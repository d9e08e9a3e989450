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
    // SAFETY: the 12 bytes of the two MAC addresses are inside the packet (checked above).
    unsafe {
        core::ptr::write_unaligned(start as *mut [u8; 6], backend.dst_mac);
        core::ptr::write_unaligned((start + 6) as *mut [u8; 6], backend.src_mac);
    }
    if backend.ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(xdp_action::XDP_TX);
    }
    TX_PORTS.redirect(backend.ifindex, 0).map_err(|_| ())
}
