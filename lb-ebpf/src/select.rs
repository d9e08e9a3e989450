//! VIP lookup and backend selection: connection table first, then the VIP's live Maglev table.

use crate::maps::{BACKENDS, CONNTRACK, TABLES, TABLE_SIZE, VIPS};
use lb_common::{
    flow_hash, Backend, FlowKey, FlowValue, VipInfo, VipKey, BACKEND_F_ALIVE, NO_BACKEND,
};

/// The VIP a flow is addressed to: exact (address, port, protocol) first, then the address's
/// port-0 ("every port") VIP.
#[inline(always)]
pub fn find_vip(flow: &FlowKey) -> Option<VipInfo> {
    let mut key = VipKey { addr: flow.dst, port: flow.dport, proto: flow.proto, family: flow.family };
    // SAFETY: values are plain data; a concurrent update replaces the element under RCU.
    if let Some(v) = unsafe { VIPS.get(&key) } {
        return Some(*v);
    }
    if key.port == 0 {
        return None;
    }
    key.port = 0;
    unsafe { VIPS.get(&key) }.copied()
}

pub struct Choice {
    pub id: u32,
    pub backend: Backend,
    /// Chosen from the lookup table (a new flow, or one whose backend went away).
    pub new_flow: bool,
}

/// Picks the backend for `flow` of `vip`, or `None` when the VIP has no usable backend.
#[inline(always)]
pub fn choose(vip: &VipInfo, flow: &FlowKey) -> Option<Choice> {
    // SAFETY: plain-data values.
    if let Some(ct) = unsafe { CONNTRACK.get(flow) } {
        let id = ct.backend;
        if let Some(b) = BACKENDS.get(id) {
            if b.flags & BACKEND_F_ALIVE != 0 && b.generation == ct.generation && b.vip_id == vip.vip_id {
                return Some(Choice { id, backend: *b, new_flow: false });
            }
        }
        // The backend was removed (or its id recycled): fall through and choose again.
    }
    let m = TABLE_SIZE.load();
    // `checked_rem` keeps a panic path (division by zero) out of the program; M is never 0.
    let offset = flow_hash(flow).checked_rem(m)?;
    let slot = (vip.vip_id * 2 + (vip.active & 1)) * m + offset;
    let id = *TABLES.get(slot)?;
    if id == NO_BACKEND {
        return None;
    }
    let b = BACKENDS.get(id)?;
    if b.flags & BACKEND_F_ALIVE == 0 {
        return None;
    }
    let _ = CONNTRACK.insert(flow, &FlowValue { backend: id, generation: b.generation }, 0);
    Some(Choice { id, backend: *b, new_flow: true })
}
