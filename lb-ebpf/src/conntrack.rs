//! Connection tables: 8-way set-associative arrays of `CtSet`s, one per family, shared by all
//! CPUs and read and written in place.
//!
//! A flow's set is the top bits of its keyed hash (`CtKey::ct_hash`, `CT_KEY4`/`CT_KEY6`, `CT_SHIFT`).
//! Lookup compares the key with the set's ways; a way holding the flow is a hit if its `check`
//! is intact. An insert goes to the flow's own way if it has one (its backend was removed), else
//! to an empty way, else it replaces a not-recently-used way: the first way without the `used`
//! bit, looking from a way picked by the hash. A hit sets `used` (one store, the first time
//! only); new entries start without it. So flows that never sent a second packet (a SYN flood,
//! a scan) replace each other, and an established flow is only replaced when every way of its
//! set holds one: then that starting way is replaced and every `used` bit of the set is cleared,
//! so flows that are still active set theirs again and finished ones go next.
//!
//! Concurrent writers are not locked out. The entry's `check` is cleared before and written
//! after the other fields, and read against them: a hit on an entry another CPU is rewriting, or
//! that two CPUs wrote at once, reads as a miss (and is rewritten), never as another flow's
//! backend.

use crate::maps::CT_SHIFT;
use aya_ebpf::{maps::Array, Global};
use lb_common::{ct_check, CtEntry, CtKey, CtSet, CT_WAYS};

/// Where a flow is, or would go, in its set.
pub struct Probe<K: CtKey> {
    set: *mut CtSet<K>,
    hash: u32,
    /// Way holding the flow's key, or `CT_WAYS`.
    found: usize,
}

/// Finds `key`'s set (by its hash under `hash_key`, the table's, loaded only here so that its
/// words are not held across the parsing) and the way holding it. Without a set (only if the set
/// index is out of range, never: the loader sizes the array for `CT_SHIFT`) it is
/// [`Probe::none`]. Not an `Option`: LLVM kept the fields of a `None` in registers it then
/// spilled undefined, which the verifier refuses (`R4 !read_ok`), once the ICMP path changed
/// the register allocation around it.
#[inline(always)]
pub fn probe<K: CtKey>(table: &Array<CtSet<K>>, hash_key: &Global<K::HashKey>, key: &K) -> Probe<K> {
    let hash = key.ct_hash(&hash_key.load());
    let Some(set) = table.get_ptr_mut(hash >> CT_SHIFT.load()) else {
        return Probe::none();
    };
    let mut found = CT_WAYS;
    let mut way = 0;
    while way < CT_WAYS {
        // SAFETY: `set` points to a live array element; entries are plain data.
        if unsafe { &(*set).ways[way] }.key.same(key) {
            found = way;
            break;
        }
        way += 1;
    }
    Probe { set, hash, found }
}

impl<K: CtKey> Probe<K> {
    /// No set: no hit, and an insert does nothing (for packets that get no entry).
    #[inline(always)]
    pub fn none() -> Self {
        Probe { set: core::ptr::null_mut(), hash: 0, found: CT_WAYS }
    }

    /// The flow's entry if it holds one: (backend id, generation). Marks the entry used.
    #[inline(always)]
    pub fn hit(&self) -> Option<(u32, u32)> {
        if self.found >= CT_WAYS {
            return None;
        }
        // SAFETY: as in `probe`; `found < CT_WAYS`, so there is a set.
        let entry = unsafe { &mut (*self.set).ways[self.found] };
        let (backend, generation) = (entry.backend, entry.generation);
        if entry.check != ct_check(self.hash, backend, generation) {
            return None;
        }
        if entry.used == 0 {
            entry.used = 1;
        }
        Some((backend, generation))
    }

    /// Records that the flow goes to `backend` (of `generation`).
    #[inline(always)]
    pub fn insert(&self, key: &K, backend: u32, generation: u32) {
        if self.set.is_null() {
            return;
        }
        let way = if self.found < CT_WAYS { self.found } else { self.free().unwrap_or_else(|| self.victim()) };
        // SAFETY: as in `probe`; `way < CT_WAYS`.
        let entry: *mut CtEntry<K> = unsafe { &mut (*self.set).ways[way & (CT_WAYS - 1)] };
        // SAFETY: `entry` is valid for writes; the volatile stores keep `check` cleared while the
        // other fields change and written after them.
        unsafe {
            core::ptr::write_volatile(&mut (*entry).check, 0);
            (*entry).key = *key;
            (*entry).backend = backend;
            (*entry).generation = generation;
            (*entry).used = 0;
            core::ptr::write_volatile(&mut (*entry).check, ct_check(self.hash, backend, generation));
        }
    }

    /// The first empty way. Looked for only here, on an insert: a hit does not pay for it.
    #[inline(always)]
    fn free(&self) -> Option<usize> {
        let mut way = 0;
        while way < CT_WAYS {
            // SAFETY: as in `probe`.
            if unsafe { (*self.set).ways[way].check } == 0 {
                return Some(way);
            }
            way += 1;
        }
        None
    }

    /// The way a flow replaces in a full set (see the module comment).
    #[inline(always)]
    fn victim(&self) -> usize {
        // The index used the top bits of the hash; the bottom ones pick where to start.
        let start = self.hash as usize;
        let mut i = 0;
        while i < CT_WAYS {
            let way = (start + i) & (CT_WAYS - 1);
            // SAFETY: as in `probe`; masked to `< CT_WAYS`.
            if unsafe { (*self.set).ways[way].used } == 0 {
                return way;
            }
            i += 1;
        }
        // Every way was used since the last round: start a new one.
        let mut way = 0;
        while way < CT_WAYS {
            // SAFETY: as in `probe`.
            unsafe { (*self.set).ways[way].used = 0 };
            way += 1;
        }
        start & (CT_WAYS - 1)
    }
}
