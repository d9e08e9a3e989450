//! VIP lookup and backend selection: the address filter, connection-table hits, and the VIP's
//! live Maglev table for new flows.

use crate::maps::{ADDR_FILTER, BACKENDS, TABLES, TABLE_SIZE, VIPS, VIP_STATE};
use lb_common::{
    table_chunks, table_slot, Backend, VipKey, VipState, BACKEND_F_ALIVE, BACKEND_F_VIP_ANY_PORT, BACKEND_F_VIP_ENABLED,
    NO_BACKEND, TABLE_CHUNK,
};

/// Whether some VIP may have the address whose filter bit is `bit` (false: certainly none).
#[inline(always)]
pub fn maybe_vip(bit: u32) -> bool {
    match ADDR_FILTER.get(bit >> 5) {
        Some(word) => *word & (1 << (bit & 31)) != 0,
        None => true,
    }
}

/// The VIP a flow is addressed to (exact address, port and protocol first, then the address's
/// port-0, "every port", VIP): its id and state.
#[inline(always)]
pub fn find_vip(addr: [u32; 4], port: u16, proto: u8, family: u8) -> Option<(u32, &'static VipState)> {
    let mut key = VipKey { addr, port, proto, family };
    // SAFETY: a `VIPS` value is one `u32`, never updated in place (see `VipInfo`), read at once.
    let id = match unsafe { VIPS.get(&key) } {
        Some(v) => v.vip_id,
        None if key.port == 0 => return None,
        None => {
            key.port = 0;
            unsafe { VIPS.get(&key) }?.vip_id
        }
    };
    Some((id, VIP_STATE.get(id)?))
}

pub struct Choice {
    pub vip_id: u32,
    pub id: u32,
    /// The `BACKENDS` element itself (no copy): valid for the whole run of the program.
    pub backend: &'static Backend,
    /// The VIP forwards (`VIP_F_ENABLED`, `BACKEND_F_VIP_ENABLED`); always true for a choice from
    /// the lookup table.
    pub enabled: bool,
}

/// A connection-table entry's backend (`id`, `generation`), if the entry still holds: the backend
/// is alive and is the one the entry was made for (same generation, so same VIP: backends never
/// change VIP, and removing a VIP kills its backends). The VIP then still exists, so `VIPS` is not consulted,
/// except for a port-0 VIP: a port-specific VIP added since on the flow's port takes the flow.
#[inline(always)]
pub fn established(id: u32, generation: u32, addr: [u32; 4], port: u16, proto: u8, family: u8) -> Option<Choice> {
    let b = BACKENDS.get(id)?;
    if b.flags & BACKEND_F_ALIVE == 0 || b.generation != generation {
        return None;
    }
    // The VIP's flags are copied into its backends: no VIP element is read.
    if b.flags & BACKEND_F_VIP_ANY_PORT != 0 && port != 0 {
        let key = VipKey { addr, port, proto, family };
        // SAFETY: only tested for presence.
        if unsafe { VIPS.get(&key) }.is_some() {
            return None;
        }
    }
    Some(Choice { vip_id: b.vip_id, id, backend: b, enabled: b.flags & BACKEND_F_VIP_ENABLED != 0 })
}

/// The backend of VIP `vip_id`'s lookup table `active` for a flow hashing to `hash`, or `None`
/// when the VIP has no usable backend. A slot naming another VIP's backend is not followed: the
/// controller gives a freed id out again only after an RCU grace period, so a reader still in a
/// buffer it just flipped away from should never find one there, but the flow would otherwise be
/// forwarded, and pinned by its connection entry, to a real server of the wrong service.
#[inline(always)]
pub fn from_table(vip_id: u32, active: u32, hash: u32) -> Option<Choice> {
    let m = TABLE_SIZE.load();
    let offset = table_slot(hash, m);
    let chunk = (vip_id * 2 + (active & 1)) * table_chunks(m) + offset / TABLE_CHUNK;
    let id = TABLES.get(chunk)?.ids[(offset % TABLE_CHUNK) as usize];
    if id == NO_BACKEND {
        return None;
    }
    let b = BACKENDS.get(id)?;
    if b.flags & BACKEND_F_ALIVE == 0 || b.vip_id != vip_id {
        return None;
    }
    Some(Choice { vip_id, id, backend: b, enabled: true })
}
