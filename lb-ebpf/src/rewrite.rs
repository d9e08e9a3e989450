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
    // Both MACs in two moves, 8 bytes and 4, written in BPF assembly as `parse::word_at` is
    // (LLVM's BPF target splits a misaligned access into bytes; the verifier allows it where the
    // CPU does it efficiently): the frame starts at an even address, `backend` at an 8-byte
    // aligned one (an array element), the MACs at its start.
    let from = backend as *const Backend as usize;
    // SAFETY: the 12 bytes of the two MAC addresses are inside the packet (checked above) and
    // the first 12 of `backend`; the instructions touch only those.
    unsafe {
        let (head, tail): (u64, u64);
        core::arch::asm!(
            "{0} = *(u64 *)({2} + 0)",
            "{1} = *(u32 *)({2} + 8)",
            lateout(reg) head, lateout(reg) tail, in(reg) from,
            options(pure, readonly, nostack, preserves_flags)
        );
        core::arch::asm!(
            "*(u64 *)({0} + 0) = {1}",
            "*(u32 *)({0} + 8) = {2}",
            in(reg) start, in(reg) head, in(reg) tail,
            options(nostack, preserves_flags)
        );
    }
    if backend.ifindex == ctx.ingress_ifindex() as u32 {
        return Ok(xdp_action::XDP_TX);
    }
    TX_PORTS.redirect(backend.ifindex, 0).map_err(|_| ())
}
