//! Per-CPU counters: every packet is counted once, under its reason (`GLOBAL_STATS`) or, when it
//! is forwarded, for its backend (`BACKEND_STATS`); userspace derives the VIPs' figures and the
//! forwarded reasons from the backends' (`lb_common::Counters::by_reason`).

use crate::maps::{BACKEND_STATS, GLOBAL_STATS};
use lb_common::reason;

/// Counts one packet of `bytes` under `reason` (an `lb_common::reason` index) unless it was
/// forwarded, which `count_forward` counted.
#[inline(always)]
pub fn count_reason(reason: u32, bytes: u64) {
    if reason <= reason::FORWARDED {
        return;
    }
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts one forwarded packet for its backend; `NEW_FLOW`: it got its backend from the lookup
/// table.
#[inline(always)]
pub fn count_forward<const NEW_FLOW: bool>(backend: u32, bytes: u64) {
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if NEW_FLOW {
                (*c).new_flows += 1;
                (*c).new_bytes += bytes;
            }
        }
    }
}
