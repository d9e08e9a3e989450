//! Per-CPU counters: one reason per packet, plus per-VIP and per-backend traffic.

use crate::maps::{BACKEND_STATS, GLOBAL_STATS, VIP_STATS};

/// Counts one packet of `bytes` under `reason` (an `lb_common::reason` index).
#[inline(always)]
pub fn count_reason(reason: u32, bytes: u64) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts one forwarded packet for its VIP and backend.
#[inline(always)]
pub fn count_forward(vip_id: u32, backend: u32, bytes: u64, new_flow: bool) {
    let add = new_flow as u64;
    if let Some(c) = VIP_STATS.get_ptr_mut(vip_id) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += add;
        }
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += add;
        }
    }
}
