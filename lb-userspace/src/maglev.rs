//! Weighted, minimally disruptive Maglev-style lookup tables (one per VIP).
//!
//! The fast path indexes a table of `M` slots (`M` prime) with a 5-tuple hash; every slot holds
//! the id of the backend that serves the flows hashing there. [`Maglev::build`] computes that
//! table from the VIP's backend set.
//!
//! # Definition: an exponential race over Maglev permutations
//!
//! Every backend `i` gets Maglev's permutation of the slots, derived from its key alone:
//! `offset_i = h1(key) mod M`, `skip_i = h2(key) mod (M-1) + 1` and
//! `perm_i[k] = (offset_i + k * skip_i) mod M` (a full permutation because `M` is prime).
//! Its `k`-th position scores `E_i(k) = L[k] * (1 / w_i)`, where
//! `L[k] = sum_{j=0..=k} 1/(M-j)` is the expected `(k+1)`-th smallest of `M` independent
//! Exp(1) variables. A slot belongs to the backend with the smallest score there; scores are
//! compared on their 32 most significant bits (relative precision about 10^-6, see
//! `slot_key`), and equal ones go to the backend whose key sorts first (byte order).
//!
//! The score a backend has at a slot depends only on that backend's key and weight, so the
//! owner of a slot is the minimum of a set of per-backend values under a fixed total order.
//! Hence, exactly (not just in expectation):
//! * removing a backend (or setting its weight to 0) changes only the slots it owned;
//! * adding a backend only moves slots to it;
//! * changing one backend's weight only moves slots to or from that backend.
//!
//! Since `L[perm_i^-1(s)]` behaves like an Exp(1) variable for a "random" slot `s`, the score of
//! backend `i` behaves like an Exp(`w_i`) variable and backend `i` wins a slot with probability
//! `w_i / W` (`W` = total weight): that is the weighting.
//!
//! # Determinism
//!
//! The table is a pure function of the set of `(key, weight, id)` triples: the input order does
//! not matter (backends are sorted by key first), the hash is implemented here and frozen, and
//! scores only use IEEE-754 `+`, `*` and `/` on `f64`, which are exactly rounded on every
//! platform Rust supports (no libm, no fused multiply-add: rustc never contracts float
//! operations). Two directors therefore compute bit-identical tables.
//!
//! # Cost
//!
//! Computing all `M * N` scores is unnecessary: scores grow with `k`, so each backend only walks
//! a prefix of its permutation, up to a common score cutoff that is raised in passes; the few
//! slots still empty at the end are computed directly (see [`Maglev::build`]). That is roughly
//! `10 * M` cheap steps, whatever the number of backends. Tables of 16,384 slots or more are
//! built on up to 4 threads (one per CPU; the helpers are started by the first such build and
//! kept by the builder): the walks, and in parts the steps between them (sorting and hashing the
//! keys, merging the threads' offers, the last slots, the table of ids). The table does not
//! depend on the threads.

use std::sync::{
    atomic::{AtomicI32, AtomicUsize, Ordering},
    mpsc, Arc, Mutex,
};
use thiserror::Error;

/// Value of a slot that no backend serves (the VIP has no backend with a positive weight).
pub const NO_BACKEND: u32 = u32::MAX;

/// Table size used when a VIP does not configure one: a prime giving at least 100 slots per
/// backend to up to 655 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// Largest prime that fits in a `u32`, hence the largest valid table size.
const LARGEST_U32_PRIME: u32 = 4_294_967_291;

/// Seed of `h1`, which picks a backend's permutation offset. Frozen: changing it reshuffles
/// every table.
const OFFSET_SEED: u64 = 0x6c62_642d_6f66_6673; // "lbd-offs"
/// Seed of `h2`, which picks a backend's permutation skip. Frozen like [`OFFSET_SEED`].
const SKIP_SEED: u64 = 0x6c62_642d_736b_6970; // "lbd-skip"

/// One backend of a VIP, as the table builder sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Stable identity of the backend, such as `"10.0.0.11:80"`. It alone decides where the
    /// backend's slots lie, so it must not change while the backend stays the same.
    pub key: String,
    /// Relative weight; the backend gets about `weight / total weight` of the slots. A backend
    /// with weight 0 gets no slot.
    pub weight: u32,
    /// Value written into the backend's slots. It should not be [`NO_BACKEND`], which the fast
    /// path reads as "no backend".
    pub id: u32,
}

/// Why a table cannot be built.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum MaglevError {
    /// The table size is below 3 or above the largest prime that fits in a `u32`.
    #[error(
        "table size {size} is out of range; it must be a prime between 3 and {LARGEST_U32_PRIME}"
    )]
    SizeOutOfRange {
        /// The rejected size.
        size: u32,
    },
    /// The table size is not prime, so Maglev permutations would not cover every slot.
    #[error("table size {size} is not prime; the next prime is {next_prime}")]
    NotPrime {
        /// The rejected size.
        size: u32,
        /// The smallest prime above `size`, a suggestion for the user.
        next_prime: u32,
    },
    /// Two backends have the same key.
    #[error("duplicate backend key {key:?}")]
    DuplicateKey {
        /// The repeated key.
        key: String,
    },
}

/// Whether `n` is prime.
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    // Every prime above 3 is 6j ± 1; u64 because d * d overflows u32 near u32::MAX.
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n.is_multiple_of(d) || n.is_multiple_of(d + 2) {
            return false;
        }
        d += 6;
    }
    true
}

/// The smallest prime `>= n`.
///
/// # Panics
///
/// If `n > 4294967291`, the largest prime that fits in a `u32`.
pub fn next_prime(n: u32) -> u32 {
    assert!(n <= LARGEST_U32_PRIME, "no prime >= {n} fits in a u32");
    (n.max(2)..=LARGEST_U32_PRIME)
        .find(|&c| is_prime(c))
        .expect("LARGEST_U32_PRIME is prime")
}

/// Builds tables of one size. It keeps the size-dependent order statistics `L`, and the threads
/// that help walk large tables, so build one `Maglev` per table size and reuse it.
pub struct Maglev {
    size: u32,
    /// `order_stats[k] = L[k] = sum_{j=0..=k} 1/(size-j)`, non-decreasing in `k`.
    order_stats: Arc<[f64]>,
    /// Threads a build runs on, the caller's included (see [`Maglev::with_threads`]).
    threads: usize,
    /// The helper threads, started by the first build that uses them; a build holds the lock
    /// while it uses them (a concurrent build runs alone).
    helpers: Mutex<Vec<Helper>>,
}

impl Clone for Maglev {
    /// The same builder, with helper threads of its own.
    fn clone(&self) -> Self {
        Self {
            size: self.size,
            order_stats: Arc::clone(&self.order_stats),
            threads: self.threads,
            helpers: Mutex::default(),
        }
    }
}

impl std::fmt::Debug for Maglev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maglev")
            .field("size", &self.size)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl Maglev {
    /// A builder for tables of `size` slots.
    ///
    /// # Errors
    ///
    /// [`MaglevError::SizeOutOfRange`] or [`MaglevError::NotPrime`] unless `size` is a prime
    /// `>= 3`.
    pub fn new(size: u32) -> Result<Self, MaglevError> {
        if !(3..=LARGEST_U32_PRIME).contains(&size) {
            return Err(MaglevError::SizeOutOfRange { size });
        }
        if !is_prime(size) {
            return Err(MaglevError::NotPrime {
                size,
                next_prime: next_prime(size),
            });
        }
        // Summed in this exact order so that every machine gets the same bits.
        let order_stats = (0..size)
            .scan(0.0f64, |sum, j| {
                *sum += 1.0 / f64::from(size - j);
                Some(*sum)
            })
            .collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_THREADS);
        Ok(Self {
            size,
            order_stats,
            threads,
            helpers: Mutex::default(),
        })
    }

    /// Threads a large table is built on, at most (the caller's included).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The same builder running on up to `threads` threads (at least 1; the caller's is one of
    /// them). [`Maglev::new`] takes the CPUs this process may run on, at most 4. Only tables of
    /// at least 16,384 slots are built on several threads, and the table never depends on it.
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Number of slots of the tables this builder makes.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The table for `backends`: `size()` slots, each holding the `id` of the backend serving
    /// it, or [`NO_BACKEND`] everywhere when no backend has a positive weight. The result does
    /// not depend on the order of `backends`.
    ///
    /// # Errors
    ///
    /// [`MaglevError::DuplicateKey`] if two backends (even of weight 0) share a key.
    pub fn build(&self, backends: &[MaglevBackend]) -> Result<Vec<u32>, MaglevError> {
        let m = self.size as usize;
        // Large tables are built on several threads: the walks of a pass (see below), and the
        // steps between them split into parts (`run_parts`).
        let mut lock = (m >= PARALLEL_MIN_SIZE && self.threads > 1 && backends.len() > 1)
            .then(|| self.helpers.try_lock().ok())
            .flatten();
        let team: &mut [Helper] = match &mut lock {
            Some(helpers) => {
                let wanted = self.threads.min(backends.len()) - 1;
                while helpers.len() < wanted {
                    // Without another thread (a resource limit), build on those there are.
                    let Ok(helper) = Helper::spawn(Arc::clone(&self.order_stats)) else { break };
                    helpers.push(helper);
                }
                let n = helpers.len().min(wanted);
                &mut helpers[..n]
            }
            None => &mut [],
        };
        let parts = team.len() + 1;

        // Sorted by key bytes: by the first 16 bytes as a number first (cheap to compare), then
        // by the whole key when those are equal. In parts, then merged (the stable sort finds
        // the sorted runs).
        let by_key = |a: &(u128, &MaglevBackend), b: &(u128, &MaglevBackend)| {
            a.0.cmp(&b.0).then_with(|| a.1.key.cmp(&b.1.key))
        };
        let mut sorted: Vec<(u128, &MaglevBackend)> =
            backends.iter().map(|b| (key_prefix(&b.key), b)).collect();
        let runs = split_parts(&mut sorted, 1, parts);
        run_parts(team, &|part| runs[part].lock().expect("parts do not panic").1.sort_unstable_by(by_key));
        drop(runs);
        if parts > 1 {
            sorted.sort_by(by_key);
        }
        if let Some(pair) = sorted
            .windows(2)
            .find(|pair| pair[0].0 == pair[1].0 && pair[0].1.key == pair[1].1.key)
        {
            return Err(MaglevError::DuplicateKey {
                key: pair[0].1.key.clone(),
            });
        }
        let sorted: Vec<&MaglevBackend> = sorted
            .into_iter()
            .map(|(_, b)| b)
            .filter(|b| b.weight > 0)
            .collect();

        if sorted.is_empty() {
            return Ok(vec![NO_BACKEND; m]);
        }
        // Backends of equal weight walk the same positions in every pass (the cutoffs are
        // common): each pass finds where to stop once per distinct weight.
        let mut weights: Vec<u32> = sorted.iter().map(|b| b.weight).collect();
        weights.sort_unstable();
        weights.dedup();
        let mut classes: Vec<Class> = weights
            .iter()
            .map(|&w| Class {
                inv_weight: 1.0 / f64::from(w),
                next: 0,
                end: 0,
                members: 0,
            })
            .collect();
        let modulus = Modulus::new(u64::from(self.size));
        let skip_modulus = Modulus::new(u64::from(self.size) - 1);
        // Hashing the keys is most of the set-up: in parts, each a range of ranks.
        let walkers: Vec<Walker> = map_parts(team, |part| {
            let ranks = part_range(sorted.len(), 1, parts, part);
            sorted[ranks.clone()]
                .iter()
                .zip(ranks)
                .map(|(b, rank)| {
                    let rank = u32::try_from(rank).expect("fewer than 2^32 backends");
                    let class = weights.binary_search(&b.weight).expect("weight listed");
                    Walker::new(b, rank, class, modulus, skip_modulus)
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect();
        for walker in &walkers {
            classes[walker.class].members += 1;
        }
        // Only used to pick cutoffs, so its rounding (if N > 2^21) does not matter.
        let total_weight = sorted.iter().map(|b| f64::from(b.weight)).sum::<f64>();

        // Passes: in each, every backend walks its permutation on up to a common cutoff T,
        // offering itself to the slots it meets; between passes the cutoff is raised. As scores
        // grow with k, after a pass each backend has visited exactly its positions scoring
        // <= T, and any position not visited scores > T and, T being the largest score of its
        // prefix (see `cutoff`), has a larger slot key than any visited one. So a slot filled by
        // then holds its final key, and the slots still empty at the end are computed directly
        // (`Race::finish`), which is exact anyway: the table does not depend on the cutoffs.
        //
        // The cutoffs thus only decide speed. In units x of 1/W, a slot is still empty after
        // cutoff x with probability about e^-x, and the backends have walked about
        // M * (1 - e^(-x * w_i / W)) positions each, at most M * x in all. Filling every slot by
        // walking would take x ~ ln M + 1; finishing the last few empty slots directly, at N
        // score evaluations each, is cheaper. Visits to slots filled in an earlier pass, which
        // are settled (see `Race`), cost only a bit test; that test is worth it once its branch
        // is well predicted, i.e. once most slots are filled, so the first pass goes to x = 3
        // (95% of the slots filled) without it ([`fill`]; the later ones: [`walk_unsettled`]).
        // A later pass is walked only if its visits (known before walking it: see `Class`) cost
        // less than finishing now, a score evaluation costing about `FINISH_COST` visits. The
        // other constants were tuned by measurement.
        let order_stats = &self.order_stats[..];
        // The walks of a pass are independent but for the `min` each offer takes in `best`, so
        // several threads can walk: each claims runs of walkers (so that a slower CPU takes
        // fewer) and walks them into a `best` of its own (the caller into `race.best`); a pass
        // ends once the others' offers are merged in (a `min` too: the same table, whoever
        // walked what).
        let walkers = Arc::new(Walkers::new(walkers, parts));

        let mut x = 3.0f64;
        for class in &mut classes {
            class.reach(cutoff(x / total_weight), order_stats);
        }
        for helper in team.iter_mut() {
            helper.start(&walkers, &classes, None, m);
        }
        // Made while the helpers already walk (they claim what the caller is not ready for).
        let mut race = Race::new(m);
        walkers.walk(&mut race.best, None, &classes, order_stats);
        let mut extras: Vec<Vec<u64>> = team.iter_mut().map(Helper::finish).collect();
        race.settle_all(&extras, team);
        for class in &mut classes {
            class.next = class.end;
        }
        loop {
            // Raise the cutoff by 2 units, or to the lowest score not visited yet if that is
            // higher (with more backends than slots, the first scores can exceed many units).
            let lowest_next = classes
                .iter()
                .filter_map(|class| class.next_score(order_stats))
                .fold(f64::INFINITY, f64::min);
            x = (x + 2.0).max(lowest_next * total_weight);
            let cutoff = cutoff(x / total_weight);
            for class in &mut classes {
                class.reach(cutoff, order_stats);
            }
            let visits: usize = classes.iter().map(|c| c.members * (c.end - c.next)).sum();
            if visits >= race.empty.saturating_mul(sorted.len()).saturating_mul(FINISH_COST) {
                break;
            }
            walkers.next.store(0, Ordering::Relaxed);
            for (helper, best) in team.iter_mut().zip(extras.drain(..)) {
                helper.best = Some(best);
                helper.start(&walkers, &classes, Some(&race.settled), m);
            }
            walkers.walk(&mut race.best, Some(&race.settled), &classes, order_stats);
            extras.extend(team.iter_mut().map(Helper::finish));
            race.settle(&extras, team);
            for class in &mut classes {
                class.next = class.end;
            }
        }
        // The helpers keep their arrays for the next build.
        for (helper, best) in team.iter_mut().zip(extras) {
            helper.best = Some(best);
        }
        let walkers = &walkers.walkers;
        race.finish(walkers, &classes, order_stats, modulus, team);

        // The table of ids, in parts (each a range of slots).
        let ids: Vec<u32> = sorted.iter().map(|b| b.id).collect();
        let mut table = Vec::with_capacity(m);
        let outs = split_parts(&mut table.spare_capacity_mut()[..m], 16, parts);
        run_parts(team, &|part| {
            let (start, out) = &mut *outs[part].lock().expect("parts do not panic");
            let keys = &race.best[*start..*start + out.len()];
            for (id, &key) in out.iter_mut().zip(keys) {
                id.write(ids[rank_of(key)]);
            }
        });
        drop(outs);
        // SAFETY: the parts wrote every one of the first `m` elements (`split_parts` covers
        // them all) with an initialised `u32`.
        unsafe { table.set_len(m) };
        drop(lock);
        Ok(table)
    }
}

/// Cost of a score evaluation in [`Race::finish`] (a modular product and a cache miss), in
/// visits of a later pass; measured.
const FINISH_COST: usize = 5;

/// The first 16 bytes of `key`, zero-padded, as a big-endian number: if two keys' prefixes
/// differ, they order the keys like their bytes do.
fn key_prefix(key: &str) -> u128 {
    let bytes = key.as_bytes();
    let mut prefix = [0u8; 16];
    let len = bytes.len().min(16);
    prefix[..len].copy_from_slice(&bytes[..len]);
    u128::from_be_bytes(prefix)
}

/// Builds the table of `size` slots for `backends` (see [`Maglev::build`]). To build many
/// tables of one size, keep a [`Maglev`] instead: it caches per-size work.
///
/// # Errors
///
/// Those of [`Maglev::new`] and [`Maglev::build`].
pub fn build_table(backends: &[MaglevBackend], size: u32) -> Result<Vec<u32>, MaglevError> {
    Maglev::new(size)?.build(backends)
}

/// What a slot keeps of a backend offered to it: the 32 most significant bits of the score
/// (sign, exponent and 20 mantissa bits, which order non-negative floats like the floats
/// themselves), then the backend's rank in key order. Comparing keys compares scores, then
/// backend keys on ties, and one `u64` per slot holds both the best score and its backend.
/// Scores closer than about one part in a million count as tied; that decides about one slot in
/// a million, which like any tie goes to the smaller backend key.
fn slot_key(score: f64, rank: u32) -> u64 {
    (score.to_bits() >> 32 << 32) | u64::from(rank)
}

/// Key of a slot nobody was offered yet; greater than every real key (scores are finite). It is
/// the bits of +infinity, so that keys also compare as `f64`s (see [`fill`]).
const EMPTY_SLOT: u64 = 0x7ff0_0000_0000_0000;

/// The backend rank held in a slot key.
fn rank_of(key: u64) -> usize {
    (key & u64::from(u32::MAX)) as usize
}

/// The cutoff for a target score `t`: the largest score with the same slot-key prefix as `t`,
/// so that a score is within the cutoff exactly when its prefix is within `t`'s.
fn cutoff(t: f64) -> f64 {
    f64::from_bits(t.to_bits() | u64::from(u32::MAX))
}

/// The state of the slots during [`Maglev::build`].
struct Race {
    /// Key of each slot's best offer so far (see [`slot_key`]), [`EMPTY_SLOT`] if none.
    best: Vec<u64>,
    /// Bitmap of the slots filled in an earlier pass (and of the padding bits past the last
    /// slot). Their holder is final: its score is at most that pass's cutoff, and every later
    /// visit scores more. Testing this small bitmap is far cheaper than reading `best`, which
    /// does not fit in L1.
    settled: Vec<u64>,
    /// Number of slots not settled yet.
    empty: usize,
}

impl Race {
    fn new(size: usize) -> Self {
        let words = size.div_ceil(64);
        let mut settled = vec![0; words];
        if !size.is_multiple_of(64) {
            settled[size / 64] = u64::MAX << (size % 64);
        }
        Self {
            best: vec![EMPTY_SLOT; size],
            settled,
            empty: size,
        }
    }

    /// Ends the first pass: merges the other threads' offers (`extras`, one `best` each) and
    /// settles every slot filled, in parts on `team`.
    fn settle_all(&mut self, extras: &[Vec<u64>], team: &mut [Helper]) {
        self.settle_parts(extras, team, settle_all_words);
    }

    /// Ends a later pass: merges the other threads' offers (`extras`) into the slots the pass
    /// walked, the unsettled ones, and settles those filled, in parts on `team`.
    fn settle(&mut self, extras: &[Vec<u64>], team: &mut [Helper]) {
        self.settle_parts(extras, team, settle_words);
    }

    /// Runs `settle` in parts on `team`, each on a range of bitmap words and their slots, and
    /// counts the slots left empty.
    fn settle_parts(&mut self, extras: &[Vec<u64>], team: &mut [Helper], settle: SettleWords) {
        let parts = team.len() + 1;
        let words = split_parts(&mut self.settled, 1, parts);
        let slots = split_parts(&mut self.best, 64, parts);
        let empty = map_parts(team, |part| {
            let (first, words) = &mut *words[part].lock().expect("parts do not panic");
            let (start, best) = &mut *slots[part].lock().expect("parts do not panic");
            debug_assert_eq!(*first * 64, *start);
            settle(words, best, *start, extras)
        });
        self.empty = empty.into_iter().sum();
    }

    /// Fills the slots still empty after the last settle directly: each gets the smallest
    /// key of all backends there. In parts on `team`, each a range of the walkers.
    fn finish(&mut self, walkers: &[Walker], classes: &[Class], order_stats: &[f64], modulus: Modulus, team: &mut [Helper]) {
        let mut empty = Vec::with_capacity(self.empty);
        for (index, &word) in self.settled.iter().enumerate() {
            let mut unsettled = !word;
            while unsettled != 0 {
                empty.push(index * 64 + unsettled.trailing_zeros() as usize);
                unsettled &= unsettled - 1;
            }
        }
        if empty.is_empty() {
            return;
        }
        let parts = team.len() + 1;
        let found = map_parts(team, |part| {
            let walkers = &walkers[part_range(walkers.len(), 1, parts, part)];
            best_at(&empty, walkers, classes, order_stats, modulus)
        });
        for held in found {
            for (&slot, key) in empty.iter().zip(held) {
                self.best[slot] = self.best[slot].min(key);
            }
        }
    }
}

/// The smallest key `walkers` have at each of the slots `empty` ([`EMPTY_SLOT`] if none).
fn best_at(empty: &[usize], walkers: &[Walker], classes: &[Class], order_stats: &[f64], modulus: Modulus) -> Vec<u64> {
    let mut held = vec![EMPTY_SLOT; empty.len()];
    if walkers.is_empty() {
        return held;
    }
    let m = modulus.m;
    let skips: Vec<u64> = walkers.iter().map(|w| w.skip as u64).collect();
    let inv_skips = mod_inverses(&skips, modulus);
    let mut positions = vec![0; empty.len()];
    for (walker, inv_skip) in walkers.iter().zip(inv_skips) {
        // perm[k] = offset + k * skip (mod m), so k = (slot - offset) / skip (mod m).
        let offset = walker.offset as u64;
        for (k, &slot) in positions.iter_mut().zip(empty) {
            let slot = slot as u64;
            let from_offset = if slot >= offset {
                slot - offset
            } else {
                slot + m - offset
            };
            // Both factors are < m <= u32::MAX, so the product fits in a u64.
            *k = modulus.reduce(from_offset * inv_skip) as usize;
            // Random positions: fetch their order statistics before they are needed.
            prefetch(order_stats, *k);
        }
        let inv_weight = classes[walker.class].inv_weight;
        for (&k, key) in positions.iter().zip(&mut held) {
            *key = (*key).min(slot_key(order_stats[k] * inv_weight, walker.rank));
        }
    }
    held
}

/// A part of [`Race::settle_parts`]: merges `extras` into `best`, the slots from `start` on (a
/// multiple of 64) whose bitmap words are `words`, sets the bits of the slots filled, and
/// returns how many are left empty.
type SettleWords = fn(words: &mut [u64], best: &mut [u64], start: usize, extras: &[Vec<u64>]) -> usize;

/// [`SettleWords`] after the first pass: every slot.
fn settle_all_words(words: &mut [u64], best: &mut [u64], start: usize, extras: &[Vec<u64>]) -> usize {
    let mut empty = 0;
    let chunks = best.chunks_mut(64).zip((start..).step_by(64));
    for (word, (chunk, start)) in words.iter_mut().zip(chunks) {
        let last = chunk.len() - 1;
        let (pairs, rest) = chunk.as_chunks_mut::<2>();
        let mut filled = 0u64;
        for (i, pair) in pairs.iter_mut().enumerate() {
            let slot = start + 2 * i;
            let mut keys = *pair;
            for extra in extras {
                keys = min_pair(keys, [extra[slot], extra[slot + 1]]);
            }
            *pair = keys;
            filled |= filled_pair(keys) << (2 * i);
        }
        if let [held] = rest {
            *held = extras.iter().fold(*held, |key, extra| key.min(extra[start + last]));
            filled |= u64::from(*held != EMPTY_SLOT) << last;
        }
        *word |= filled;
        empty += word.count_zeros() as usize;
    }
    empty
}

/// [`SettleWords`] after a later pass: the slots not settled before, the only ones it walked.
fn settle_words(words: &mut [u64], best: &mut [u64], start: usize, extras: &[Vec<u64>]) -> usize {
    let mut empty = 0;
    for (index, word) in words.iter_mut().enumerate() {
        let mut unsettled = !*word;
        while unsettled != 0 {
            let bit = unsettled.trailing_zeros();
            let slot = index * 64 + bit as usize;
            let key = extras.iter().fold(best[slot], |key, extra| key.min(extra[start + slot]));
            best[slot] = key;
            if key == EMPTY_SLOT {
                empty += 1;
            } else {
                *word |= 1 << bit;
            }
            unsettled &= unsettled - 1;
        }
    }
    empty
}

/// The backends of one weight: how far they have walked their permutations.
#[derive(Clone)]
struct Class {
    /// `1 / weight`: a backend's score at position `k` is `L[k] * inv_weight` (a product with
    /// the reciprocal, cheaper in the hot loops than a division).
    inv_weight: f64,
    /// First position not walked yet.
    next: usize,
    /// End of the positions to walk in the current pass.
    end: usize,
    /// Number of backends of this weight.
    members: usize,
}

impl Class {
    /// Sets `end` past the positions from `next` on that score `<= cutoff`. Scores grow with k,
    /// so these are a prefix of the rest: find its end (binary search on the same products
    /// the walks would compare), and the walks compute a score only for the slots they offer to.
    fn reach(&mut self, cutoff: f64, order_stats: &[f64]) {
        let inv_weight = self.inv_weight;
        self.end =
            self.next + prefix_within(&order_stats[self.next..], |l| l * inv_weight <= cutoff);
    }

    /// The score of the next position to walk, if any is left.
    fn next_score(&self, order_stats: &[f64]) -> Option<f64> {
        order_stats.get(self.next).map(|&l| l * self.inv_weight)
    }
}

/// The smaller key of each lane.
#[inline(always)]
fn min_pair(a: [u64; 2], b: [u64; 2]) -> [u64; 2] {
    #[cfg(target_arch = "x86_64")]
    {
        // Keys order like the floats they are the bits of (see `min_key`): one `minpd`.
        use core::arch::x86_64::*;
        let mut min = [0u64; 2];
        // SAFETY: SSE2 is part of the x86_64 baseline; the loads and the store are of 16 bytes
        // within the arrays (unaligned forms).
        unsafe {
            let (a, b) = (_mm_loadu_pd(a.as_ptr().cast()), _mm_loadu_pd(b.as_ptr().cast()));
            _mm_storeu_pd(min.as_mut_ptr().cast(), _mm_min_pd(a, b));
        }
        min
    }
    #[cfg(not(target_arch = "x86_64"))]
    [a[0].min(b[0]), a[1].min(b[1])]
}

/// Bit 0 set if `keys[0]` holds an offer, bit 1 if `keys[1]` does.
#[inline(always)]
fn filled_pair(keys: [u64; 2]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // `EMPTY_SLOT` is +infinity, and no key is a NaN.
        use core::arch::x86_64::*;
        // SAFETY: as in `min_pair`.
        unsafe {
            let keys = _mm_loadu_pd(keys.as_ptr().cast());
            _mm_movemask_pd(_mm_cmpneq_pd(keys, _mm_set1_pd(f64::INFINITY))) as u64
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    (u64::from(keys[0] != EMPTY_SLOT) | u64::from(keys[1] != EMPTY_SLOT) << 1)
}

/// Most threads [`Maglev::new`] lets a build run on: each helper keeps a `best` array of its
/// own (8 bytes a slot) between builds, and each is merged at the end of every pass.
const MAX_THREADS: usize = 4;

/// Smallest table built on more than one thread: below it, handing a pass to another thread
/// costs more than the share of the work it takes.
const PARALLEL_MIN_SIZE: usize = 16_384;

/// The walkers of one build, shared by the threads walking them. In each pass the threads claim
/// runs of `claim` walkers from `next` until none is left, and walk each from its slot in
/// `slots` (the slot of the next position to walk), which they update.
struct Walkers {
    walkers: Vec<Walker>,
    slots: Vec<AtomicUsize>,
    /// First walker not claimed yet in this pass.
    next: AtomicUsize,
    claim: usize,
}

impl Walkers {
    fn new(walkers: Vec<Walker>, threads: usize) -> Self {
        Self {
            slots: walkers.iter().map(|w| AtomicUsize::new(w.offset)).collect(),
            // About 8 runs a thread: fine enough to even out CPUs of different speeds.
            claim: (walkers.len() / (8 * threads)).max(1),
            walkers,
            next: AtomicUsize::new(0),
        }
    }

    /// Walks runs of walkers into `best` until every walker of the pass is claimed: the first
    /// pass ([`fill`]) when `settled` is `None`, else a later one ([`walk_unsettled`]).
    fn walk(&self, best: &mut [u64], settled: Option<&[u64]>, classes: &[Class], order_stats: &[f64]) {
        loop {
            let first = self.next.fetch_add(self.claim, Ordering::Relaxed);
            let Some(run) = self.walkers.get(first..(first + self.claim).min(self.walkers.len())) else {
                return;
            };
            for (walker, slot) in run.iter().zip(&self.slots[first..]) {
                let class = &classes[walker.class];
                let stats = &order_stats[class.next..class.end];
                // Only the thread that claimed the walker touches its slot during a pass; the
                // passes are ordered by the channels that start and end them.
                let from = slot.load(Ordering::Relaxed);
                let to = match settled {
                    None => fill(best, stats, class.inv_weight, walker.rank, from, walker.skip),
                    Some(settled) => {
                        walk_unsettled(best, settled, stats, class.inv_weight, walker.rank, from, walker.skip)
                    }
                };
                slot.store(to, Ordering::Relaxed);
            }
        }
    }
}

/// A thread that helps [`Maglev::build`]: it walks, a pass at a time, into a `best` array of
/// its own, and takes parts of the steps between passes ([`run_parts`]). The array travels with
/// each pass: the caller gets it back at the end of the pass, merges it, and hands it back with
/// the next. The thread ends when its `Maglev` is dropped.
struct Helper {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Done>,
    cpus: Arc<Cpus>,
    /// The thread's array between passes and between builds (`None` before its first pass).
    best: Option<Vec<u64>>,
}

/// The CPUs a [`Helper`] and the build using it last ran on, as each side noted it when it
/// handed work over or began to wait (`usize::MAX` before). A side waiting for the other only
/// polls while they are apart: when the scheduler has queued both on one CPU (the others busy,
/// or the process confined to one), polling would only delay the other (builds then took 2–3
/// times as long), so it sleeps at once. Also what keeps them apart: the helper's thread id and
/// the CPU its affinity leaves out ([`Helper::send`]).
struct Cpus {
    caller: AtomicUsize,
    helper: AtomicUsize,
    /// The helper thread's id (0 until it has started).
    tid: AtomicI32,
    /// The CPU the helper's affinity leaves out (`usize::MAX`: none), see [`Helper::send`].
    kept_off: AtomicUsize,
}

/// The CPU this thread is running on (`usize::MAX` if unknown).
fn current_cpu() -> usize {
    // SAFETY: no preconditions; it returns a CPU number or -1.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).unwrap_or(usize::MAX)
}

/// Work for a [`Helper`].
enum Job {
    Pass(Pass),
    Part(Part),
}

/// What a [`Helper`] sends back when a job has ended.
enum Done {
    /// The end of a pass: the thread's array.
    Pass(Vec<u64>),
    Part,
}

/// A job split by [`run_parts`], for a helper to claim parts of.
struct Part {
    /// The caller's job and its counter of parts claimed, borrowed: `run_parts` neither returns
    /// nor unwinds before the helper has sent [`Done::Part`] (or ended).
    job: &'static (dyn Fn(usize) + Sync),
    next: &'static AtomicUsize,
    parts: usize,
}

/// One pass for a [`Helper`]: the first if `settled` is `None`.
struct Pass {
    walkers: Arc<Walkers>,
    classes: Vec<Class>,
    settled: Option<Vec<u64>>,
    best: Option<Vec<u64>>,
    size: usize,
}

impl Helper {
    fn spawn(order_stats: Arc<[f64]>) -> std::io::Result<Self> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel();
        let cpus = Arc::new(Cpus {
            caller: AtomicUsize::new(usize::MAX),
            helper: AtomicUsize::new(usize::MAX),
            tid: AtomicI32::new(0),
            kept_off: AtomicUsize::new(usize::MAX),
        });
        let sides = Arc::clone(&cpus);
        std::thread::Builder::new().name("maglev".into()).spawn(move || {
            // SAFETY: no preconditions.
            sides.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
            while let Some(job) = wait(&inbox, &sides.helper, &sides.caller) {
                sides.helper.store(current_cpu(), Ordering::Relaxed);
                let pass = match job {
                    Job::Part(Part { job, next, parts }) => {
                        claim_parts(job, next, parts);
                        if outbox.send(Done::Part).is_err() {
                            break;
                        }
                        continue;
                    }
                    Job::Pass(pass) => pass,
                };
                let Pass {
                    walkers,
                    classes,
                    settled,
                    best,
                    size,
                } = pass;
                let mut best = match best {
                    Some(mut best) if settled.is_none() => {
                        best.fill(EMPTY_SLOT);
                        best
                    }
                    Some(best) => best,
                    None => vec![EMPTY_SLOT; size],
                };
                walkers.walk(&mut best, settled.as_deref(), &classes, &order_stats);
                drop(walkers);
                if outbox.send(Done::Pass(best)).is_err() {
                    break;
                }
            }
        })?;
        Ok(Self {
            jobs,
            done,
            cpus,
            best: None,
        })
    }

    /// Starts a pass over `walkers` (the first if `settled` is `None`) on a table of `size`
    /// slots.
    fn start(&mut self, walkers: &Arc<Walkers>, classes: &[Class], settled: Option<&[u64]>, size: usize) {
        let pass = Pass {
            walkers: Arc::clone(walkers),
            classes: classes.to_vec(),
            settled: settled.map(<[u64]>::to_vec),
            best: self.best.take(),
            size,
        };
        self.send(Job::Pass(pass)).expect("a Maglev helper thread ended early");
    }

    /// Hands `job` to the thread, first keeping it off the caller's CPU.
    ///
    /// Woken by the caller, a helper was often queued on the caller's CPU while the other CPU
    /// idled: it waited there for the caller's time slice (1 ms once in a `perf sched` trace),
    /// and the scheduler tended to leave it there, as it sleeps again before a rebalance, so
    /// builds ran on one CPU at the cost of two threads. At N = 1000 (weighted), 12 processes of
    /// back-to-back builds, alternating with the code before: 0.49–0.51 ms a build against
    /// 0.50–0.96 (10 of 12 at 0.86 or more); with 20 ms between builds, as in the daemon,
    /// 1.00–1.15 ms against 1.70–1.89 (6 each). The affinity is set again only when the caller's
    /// CPU changes (one system call; no migration while the helper sleeps).
    fn send(&self, job: Job) -> Result<(), mpsc::SendError<Job>> {
        let cpu = current_cpu();
        self.cpus.caller.store(cpu, Ordering::Relaxed);
        if self.cpus.kept_off.load(Ordering::Relaxed) != cpu {
            self.keep_off(cpu);
        }
        self.jobs.send(job)
    }

    /// Sets the helper's affinity to the caller's without `cpu`, if that leaves a CPU.
    fn keep_off(&self, cpu: usize) {
        let tid = self.cpus.tid.load(Ordering::Relaxed);
        if tid == 0 || cpu >= libc::CPU_SETSIZE as usize {
            return;
        }
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `cpu_set_t` is plain data; the calls read this thread's affinity (pid 0) and
        // set the helper thread's (`tid`, a thread of this process that lives as long as `self`).
        unsafe {
            let mut allowed: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, size, &mut allowed) != 0 {
                return;
            }
            libc::CPU_CLR(cpu, &mut allowed);
            if libc::CPU_COUNT(&allowed) > 0 && libc::sched_setaffinity(tid, size, &allowed) == 0 {
                self.cpus.kept_off.store(cpu, Ordering::Relaxed);
            }
        }
    }

    /// The thread's next report, `None` if it ended.
    fn done(&self) -> Option<Done> {
        wait(&self.done, &self.cpus.caller, &self.cpus.helper)
    }

    /// Waits for the pass to end: the thread's array.
    fn finish(&mut self) -> Vec<u64> {
        match self.done() {
            Some(Done::Pass(best)) => best,
            Some(Done::Part) => unreachable!("a part ends before its caller returns"),
            None => panic!("a Maglev helper thread ended early"),
        }
    }
}

/// Runs `job(0)` to `job(team.len())` on the caller and the helpers, and returns once every
/// part has ended: a step of [`Maglev::build`] split into parts (each its own range of the
/// work, see [`part_range`]) that may borrow from the caller. The threads claim parts as they
/// come: a helper that is slow to start leaves its part to the caller, and one that last ran on
/// the caller's CPU is not asked.
fn run_parts(team: &mut [Helper], job: &(dyn Fn(usize) + Sync)) {
    /// The helpers handed a part: waits for them (in `drop`, also if the caller's part panics,
    /// as until then they may use the job).
    struct Handed<'a> {
        team: &'a mut [Helper],
        handed: Vec<usize>,
    }
    impl Handed<'_> {
        /// Waits for the helpers handed the job; whether all ended their parts (else a helper
        /// thread died).
        fn wait_all(&mut self) -> bool {
            let handed = std::mem::take(&mut self.handed);
            let ended = handed
                .iter()
                .filter(|&&i| matches!(self.team[i].done(), Some(Done::Part)))
                .count();
            ended == handed.len()
        }
    }
    impl Drop for Handed<'_> {
        fn drop(&mut self) {
            self.wait_all();
        }
    }

    let parts = team.len() + 1;
    let next = AtomicUsize::new(0);
    // SAFETY: only the lifetimes change. The helpers use `job` and `next` between receiving
    // their `Part` and sending `Done::Part` (or ending), and `Handed` waits for that from every
    // helper it handed one before this function returns or unwinds, while both are still
    // borrowed (`next` is dropped after `handed`).
    let (shared_job, shared_next) = unsafe {
        (
            std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(job),
            &*std::ptr::from_ref(&next),
        )
    };
    let mut handed = Handed {
        team,
        handed: Vec::with_capacity(parts),
    };
    let cpu = current_cpu();
    for i in 0..handed.team.len() {
        let helper = &handed.team[i];
        // A helper that last ran on this CPU would mostly cost two switches (see `Cpus`); the
        // passes, which it still takes, note where it runs next.
        if helper.cpus.helper.load(Ordering::Relaxed) == cpu {
            continue;
        }
        let part = Part {
            job: shared_job,
            next: shared_next,
            parts,
        };
        if helper.send(Job::Part(part)).is_err() {
            break;
        }
        handed.handed.push(i);
    }
    claim_parts(job, &next, parts);
    assert!(handed.wait_all(), "a Maglev helper thread ended early");
}

/// Runs the parts of `job` not claimed yet (`next` counts the claims) until none is left.
fn claim_parts(job: &(dyn Fn(usize) + Sync), next: &AtomicUsize, parts: usize) {
    loop {
        let part = next.fetch_add(1, Ordering::Relaxed);
        if part >= parts {
            return;
        }
        job(part);
    }
}

/// `job(part)` for each part, run as [`run_parts`] does: the results, in part order.
fn map_parts<T: Send>(team: &mut [Helper], job: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let results: Vec<Mutex<Option<T>>> = (0..=team.len()).map(|_| Mutex::new(None)).collect();
    run_parts(team, &|part| *results[part].lock().expect("parts do not panic") = Some(job(part)));
    results
        .into_iter()
        .map(|result| result.into_inner().expect("parts do not panic").expect("every part ran"))
        .collect()
}

/// Part `part` of `0..len` cut into `parts` ranges of about equal length, cut at multiples of
/// `unit`.
fn part_range(len: usize, unit: usize, parts: usize, part: usize) -> std::ops::Range<usize> {
    let units = len.div_ceil(unit);
    let cut = |part: usize| (units * part / parts * unit).min(len);
    cut(part)..cut(part + 1)
}

/// `slice` cut into the `parts` ranges of [`part_range`], each with its start index, for
/// [`run_parts`] (a part locks its own).
fn split_parts<T>(slice: &mut [T], unit: usize, parts: usize) -> Vec<Mutex<(usize, &mut [T])>> {
    let len = slice.len();
    let mut rest = slice;
    (0..parts)
        .map(|part| {
            let range = part_range(len, unit, parts, part);
            let (this, after) = std::mem::take(&mut rest).split_at_mut(range.len());
            rest = after;
            Mutex::new((range.start, this))
        })
        .collect()
}

/// The next message of `inbox`, `None` once its sender is gone, for a thread that notes its CPU
/// in `me` and waits for one whose CPU is noted in `other` (see [`Cpus`]). A pass lasts tens of
/// microseconds, and waking a sleeping thread costs several here, so this polls for about as
/// long before it sleeps, unless both are on one CPU.
fn wait<T>(inbox: &mpsc::Receiver<T>, me: &AtomicUsize, other: &AtomicUsize) -> Option<T> {
    let cpu = current_cpu();
    me.store(cpu, Ordering::Relaxed);
    let start = std::time::Instant::now();
    while start.elapsed() < SPIN && other.load(Ordering::Relaxed) != cpu {
        match inbox.try_recv() {
            Ok(message) => return Some(message),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
    inbox.recv().ok()
}

/// How long [`wait`] polls before it sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// One backend's permutation during [`Maglev::build`] (how far it has walked is in
/// [`Walkers`]).
struct Walker {
    /// Position of the backend's key among the backends' keys.
    rank: u32,
    /// Index of the backend's weight in the classes.
    class: usize,
    offset: usize,
    skip: usize,
}

impl Walker {
    fn new(backend: &MaglevBackend, rank: u32, class: usize, modulus: Modulus, skip_modulus: Modulus) -> Self {
        let key = backend.key.as_bytes();
        // Both values are < m <= u32::MAX, so they fit in a usize.
        let (h1, h2) = hash64_pair(key, OFFSET_SEED, SKIP_SEED);
        let offset = modulus.reduce(h1) as usize;
        let skip = (skip_modulus.reduce(h2) + 1) as usize;
        Self {
            rank,
            class,
            offset,
            skip,
        }
    }
}

/// Division-free reduction modulo a fixed `m` in `2..2^32` (Barrett), exact for every `u64`.
#[derive(Clone, Copy)]
struct Modulus {
    m: u64,
    /// `floor((2^64 - 1) / m)`.
    mu: u64,
}

impl Modulus {
    fn new(m: u64) -> Self {
        debug_assert!((2..=u64::from(u32::MAX)).contains(&m));
        Self { m, mu: u64::MAX / m }
    }

    /// `x mod m`.
    #[inline(always)]
    fn reduce(self, x: u64) -> u64 {
        // mu > 2^64 / m - 1, so q > x / m - 1 - 1: q is floor(x / m) or one less, and q * m <= x.
        let q = ((u128::from(x) * u128::from(self.mu)) >> 64) as u64;
        let r = x - q * self.m;
        if r >= self.m {
            r - self.m
        } else {
            r
        }
    }
}

/// The inverses modulo the prime `modulus.m` of `values`, each in `1..m` (one extended Euclid
/// for all of them, Montgomery's trick).
fn mod_inverses(values: &[u64], modulus: Modulus) -> Vec<u64> {
    // prefix[i] = values[0] * ... * values[i - 1] (mod m); every product is < m^2 <= 2^64.
    let mut prefix = Vec::with_capacity(values.len());
    let mut product = 1;
    for &value in values {
        prefix.push(product);
        product = modulus.reduce(product * value);
    }
    // inverse = 1 / (values[0] * ... * values[i]), from i = len - 1 down.
    let mut inverse = mod_inverse(product, modulus.m);
    let mut out = vec![0; values.len()];
    for i in (0..values.len()).rev() {
        out[i] = modulus.reduce(inverse * prefix[i]);
        inverse = modulus.reduce(inverse * values[i]);
    }
    out
}

/// The inverse of `a` modulo the prime `m`, for `0 < a < m` (extended Euclid).
fn mod_inverse(a: u64, m: u64) -> u64 {
    // Invariants: r0 = t0 * a and r1 = t1 * a (mod m); every value stays within ±m.
    let (mut r0, mut r1) = (m as i64, a as i64);
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(m as i64) as u64
}

/// Hints the CPU to fetch `values[index]`, which will soon be read.
#[inline(always)]
fn prefetch<T>(values: &[T], index: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch has no observable effect, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
            values.as_ptr().wrapping_add(index).cast(),
        )
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (values, index);
}

/// Walk of one backend in the first pass: from `slot` on (stepping by `skip`), offers the
/// backend to one slot per element of `order_stats`, the order statistics of the positions
/// walked. Returns the slot of the next position.
///
/// Every visit reads and writes a random slot of `best`, which does not fit in L1/L2. The slots
/// to come are known, so they are prefetched `PREFETCH` visits ahead: the loop is then bound by
/// throughput, not memory latency. (A function of its own: inlined, it gets fewer registers.)
#[inline(never)]
fn fill(best: &mut [u64], order_stats: &[f64], inv_weight: f64, rank: u32, mut slot: usize, skip: usize) -> usize {
    const PREFETCH: usize = 8;
    // `slot + skip` wraps exactly when `slot >= back`; deciding from `slot` alone keeps the
    // loop-carried dependency down to a compare and a conditional move.
    let back = best.len() - skip;
    let step = |slot: usize| if slot >= back { slot - back } else { slot + skip };
    let mut ahead = slot;
    for _ in 0..PREFETCH.min(order_stats.len()) {
        ahead = step(ahead);
    }
    for &l in order_stats {
        prefetch(best, ahead);
        ahead = step(ahead);
        best[slot] = min_key(best[slot], l, inv_weight, rank);
        slot = step(slot);
    }
    slot
}

/// `held.min(slot_key(order_stat * inv_weight, rank))`.
#[inline(always)]
fn min_key(held: u64, order_stat: f64, inv_weight: f64, rank: u32) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // The same in SSE2 registers, fewer instructions: keys are the bits of positive floats
        // (or +infinity), which order like the floats, and `minsd` keeps the smaller.
        use core::arch::x86_64::*;
        // SAFETY: SSE2 is part of the x86_64 baseline; these intrinsics touch no memory.
        unsafe {
            let high = _mm_castsi128_pd(_mm_cvtsi64_si128(!i64::from(u32::MAX)));
            let rank = _mm_castsi128_pd(_mm_cvtsi64_si128(i64::from(rank)));
            let score = _mm_mul_sd(_mm_set_sd(order_stat), _mm_set_sd(inv_weight));
            let key = _mm_or_pd(_mm_and_pd(score, high), rank);
            _mm_cvtsd_f64(_mm_min_sd(key, _mm_set_sd(f64::from_bits(held)))).to_bits()
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    held.min(slot_key(order_stat * inv_weight, rank))
}

/// Walk of one backend in a later pass, like [`fill`] but skipping settled slots.
///
/// Hot loop of the later passes: mostly settled slots, i.e. a bit test in the small `settled`
/// bitmap (L1). Walking is a chain of dependent steps (compare, select, add: 3 cycles), so
/// positions walk as four chains (position mod 4), each stepping by `4 * skip mod m`, which the
/// CPU runs side by side, with one loop iteration every four visits.
#[inline(never)]
fn walk_unsettled(
    best: &mut [u64],
    settled: &[u64],
    order_stats: &[f64],
    inv_weight: f64,
    rank: u32,
    slot: usize,
    skip: usize,
) -> usize {
    let m = best.len();
    // `skip * 2^i mod m`, and the step by it.
    let double = |skip: usize| if 2 * skip >= m { 2 * skip - m } else { 2 * skip };
    let stepper = |skip: usize| {
        let back = m - skip;
        move |slot: usize| if slot >= back { slot - back } else { slot + skip }
    };
    let step = stepper(skip);
    let step4 = stepper(double(double(skip)));
    let mut visit = |slot: usize, l: f64| {
        if settled[slot / 64] & (1 << (slot % 64)) == 0 {
            let held = &mut best[slot];
            *held = (*held).min(slot_key(l * inv_weight, rank));
        }
    };
    let mut chains = [slot, 0, 0, 0];
    for i in 1..4 {
        chains[i] = step(chains[i - 1]);
    }
    let mut quads = order_stats.chunks_exact(4);
    for quad in &mut quads {
        for i in 0..4 {
            visit(chains[i], quad[i]);
        }
        for chain in &mut chains {
            *chain = step4(*chain);
        }
    }
    let rest = quads.remainder();
    for (i, &l) in rest.iter().enumerate() {
        visit(chains[i], l);
    }
    chains[rest.len()]
}

/// The length of the prefix of `values` whose elements satisfy `within` (which must hold for a
/// prefix and fail after it). Galloping from the start, then bisecting: the prefixes asked for
/// are short and `values` (the order statistics) is large, so this stays near the start, in
/// cache, where a plain binary search would jump across the whole slice.
fn prefix_within(values: &[f64], within: impl Fn(f64) -> bool) -> usize {
    // Invariant: values[..lo] are within; values[hi..] are not (or hi = len).
    let mut lo = 0;
    let mut step = 1;
    let mut hi = loop {
        let probe = lo + step;
        if probe > values.len() {
            break values.len();
        }
        if !within(values[probe - 1]) {
            break probe - 1;
        }
        lo = probe;
        step *= 2;
    };
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if within(values[mid]) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// The frozen 64-bit hash behind `h1` (seed [`OFFSET_SEED`]) and `h2` (seed [`SKIP_SEED`]), for
/// two seeds at once (the two chains of multiplications run side by side).
///
/// `h = seed ^ (len * 0x9E3779B97F4A7C15)`; then for each 8-byte little-endian word of `bytes`
/// (the last one zero-padded) `h = fmix64(h ^ word)`; the result is `fmix64(h)`, where `fmix64`
/// is MurmurHash3's 64-bit finalizer. Never change it: tables would change with it (the tests
/// pin its values).
fn hash64_pair(bytes: &[u8], seed_a: u64, seed_b: u64) -> (u64, u64) {
    let len = (bytes.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (mut a, mut b) = (seed_a ^ len, seed_b ^ len);
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        (a, b) = (fmix64(a ^ word), fmix64(b ^ word));
    }
    (fmix64(a), fmix64(b))
}

/// The same hash for one seed, written plainly (the tests check one against the other).
#[cfg(test)]
fn hash64(bytes: &[u8], seed: u64) -> u64 {
    let mut h = seed ^ (bytes.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = fmix64(h ^ u64::from_le_bytes(word));
    }
    fmix64(h)
}

/// MurmurHash3's 64-bit finalizer: a bijection in which every input bit affects every output
/// bit.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Backend `i`: key `10.0.x.y:80`, id `1000 + i` (distinct from `i` to catch rank/id mixups).
    fn backend(i: u32, weight: u32) -> MaglevBackend {
        MaglevBackend {
            key: format!("10.0.{}.{}:80", i / 256, i % 256),
            weight,
            id: 1000 + i,
        }
    }

    fn backends(weights: &[u32]) -> Vec<MaglevBackend> {
        (0u32..).zip(weights).map(|(i, &w)| backend(i, w)).collect()
    }

    /// `n` weights cycling through 1, 2, 3, 5, 10 and 100.
    fn mixed(n: usize) -> Vec<u32> {
        [1, 2, 3, 5, 10, 100].into_iter().cycle().take(n).collect()
    }

    /// Slot count per backend id.
    fn counts(table: &[u32]) -> std::collections::BTreeMap<u32, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for &id in table {
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    /// The table straight from the definition: every score of every backend at every slot.
    /// Also returns how many slots were decided by a tie.
    fn brute_force(maglev: &Maglev, backends: &[MaglevBackend]) -> (Vec<u32>, usize) {
        let m = u64::from(maglev.size());
        let mut live: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
        live.sort_by(|a, b| a.key.cmp(&b.key));
        let mut best = vec![(EMPTY_SLOT, NO_BACKEND, 0); m as usize]; // (key, id, prefix ties)
        for (rank, b) in (0u32..).zip(&live) {
            let offset = hash64(b.key.as_bytes(), OFFSET_SEED) % m;
            let skip = hash64(b.key.as_bytes(), SKIP_SEED) % (m - 1) + 1;
            for k in 0..m {
                let slot = ((offset + k * skip) % m) as usize;
                let score = maglev.order_stats[k as usize] * (1.0 / f64::from(b.weight));
                let key = slot_key(score, rank);
                let (held, id, ties) = &mut best[slot];
                if key >> 32 == *held >> 32 {
                    *ties += 1;
                } else if key < *held {
                    *ties = 0;
                }
                if key < *held {
                    (*held, *id) = (key, b.id);
                }
            }
        }
        let ties = best.iter().filter(|&&(_, _, ties)| ties > 0).count();
        (best.into_iter().map(|(_, id, _)| id).collect(), ties)
    }

    #[test]
    fn prefix_within_is_partition_point() {
        let values: Vec<f64> = (0..200).map(|i| f64::from(i / 3)).collect();
        for len in 0..values.len() {
            for t in -1..70 {
                let t = f64::from(t);
                let v = &values[..len];
                assert_eq!(prefix_within(v, |x| x <= t), v.partition_point(|&x| x <= t), "len {len}, t {t}");
            }
        }
    }

    /// A small deterministic generator for the randomized tests.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 17
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn modulus_reduces_exactly() {
        let mut rng = Lcg(7);
        for m in [2u64, 3, 4, 13, 65536, 65537, 655_373, 1 << 31, LARGEST_U32_PRIME.into(), u32::MAX.into()] {
            let modulus = Modulus::new(m);
            let mut values = vec![0, 1, m - 1, m, m + 1, 2 * m - 1, 2 * m, u64::MAX, u64::MAX - 1, (m - 1) * (m - 1)];
            values.extend((0..2000).map(|_| rng.next() << 17 | rng.next()));
            values.extend((0..2000).map(|_| rng.below(m) * rng.below(m)));
            for x in values {
                assert_eq!(modulus.reduce(x), x % m, "{x} mod {m}");
            }
        }
    }

    #[test]
    fn batch_inverses_match_single_ones() {
        let mut rng = Lcg(11);
        for m in [3u64, 13, 65537, 655_373, LARGEST_U32_PRIME.into()] {
            let modulus = Modulus::new(m);
            for len in [1, 2, 5, 100] {
                let values: Vec<u64> = (0..len).map(|_| 1 + rng.below(m - 1)).collect();
                let inverses = mod_inverses(&values, modulus);
                for (&value, &inverse) in values.iter().zip(&inverses) {
                    assert_eq!(inverse, mod_inverse(value, m));
                    assert_eq!(value * inverse % m, 1, "{value} * {inverse} mod {m}");
                }
            }
        }
    }

    #[test]
    fn key_prefix_orders_like_bytes() {
        let keys = [
            "", "\0", "a", "a\0", "a\0\0", "a\0b", "a\u{1}", "ab", "abcdefghijklmnop",
            "abcdefghijklmnop\0", "abcdefghijklmnopq", "abcdefghijklmnoq", "abcdefghijklmnp",
            "[2001:db8::1]:443", "[2001:db8::1]:80", "[2001:db8::10]:80", "10.0.0.1:80",
            "10.0.0.10:80", "10.0.0.1:8080", "\u{ff}", "é",
        ];
        for a in keys {
            for b in keys {
                let (pa, pb) = (key_prefix(a), key_prefix(b));
                if pa != pb {
                    assert_eq!(pa.cmp(&pb), a.as_bytes().cmp(b.as_bytes()), "{a:?} vs {b:?}");
                }
            }
        }
    }

    /// Large tables are built on several threads (walks claimed as they go, the other steps in
    /// parts): whatever the number of threads (more than the backends included), with backends
    /// of weight 0 among them, and with two builds sharing one builder at once, the table is
    /// the one the definition gives, and a duplicate key is still an error.
    #[test]
    fn threads_do_not_change_tables() {
        let mut rng = Lcg(0x7ead);
        let size = 16411;
        assert!(size as usize >= PARALLEL_MIN_SIZE && is_prime(size));
        for round in 0..8 {
            let n = [1, 2, 3, 40, 200, 1000, 3, 50][round];
            let list: Vec<MaglevBackend> = (0..n)
                .map(|i| MaglevBackend {
                    key: format!("10.{}.{}.{}:80", rng.below(256), rng.below(256), i),
                    weight: match round {
                        // One backend of weight 1 among backends of weight 0, then some of each.
                        6 => u32::from(i == 1),
                        7 => rng.below(2) as u32,
                        _ => [1, 1 + rng.below(4) as u32, 1 + rng.below(1000) as u32][round % 3],
                    },
                    id: i as u32,
                })
                .collect();
            let serial = Maglev::new(size).unwrap().with_threads(1);
            let expected = serial.build(&list).unwrap();
            if n <= 200 {
                assert_eq!(expected, brute_force(&serial, &list).0, "round {round}: {n} backends");
            }
            for threads in 2..=5 {
                let maglev = Maglev::new(size).unwrap().with_threads(threads);
                assert_eq!(maglev.build(&list).unwrap(), expected, "round {round}: {threads} threads");
                // Again, with the helpers started and their arrays left from the last build.
                assert_eq!(maglev.build(&list).unwrap(), expected, "round {round}: {threads} threads, again");
                let (a, b) = std::thread::scope(|scope| {
                    let a = scope.spawn(|| maglev.build(&list).unwrap());
                    let b = scope.spawn(|| maglev.build(&list).unwrap());
                    (a.join().unwrap(), b.join().unwrap())
                });
                assert!(
                    a == expected && b == expected,
                    "round {round}: {threads} threads, two builds at once"
                );
                let mut twice = list.clone();
                twice.push(MaglevBackend { id: 9999, ..list[n / 2].clone() });
                assert!(
                    matches!(maglev.build(&twice), Err(MaglevError::DuplicateKey { key }) if key == list[n / 2].key),
                    "round {round}: {threads} threads, a duplicate key"
                );
            }
        }
    }

    /// The affinity of `tid` (0: this thread).
    fn affinity(tid: libc::pid_t) -> libc::cpu_set_t {
        // SAFETY: plain data, and a thread of this process.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
                0,
                "sched_getaffinity({tid})"
            );
            set
        }
    }

    /// A helper is kept off the CPU the build's caller ran on when it handed the helper work (its
    /// affinity is the caller's without that CPU), and the caller's own affinity is left as it
    /// was. Needs 2 CPUs (a helper).
    #[test]
    fn helpers_keep_off_the_callers_cpu_and_leave_its_affinity() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(cpus >= 2, "this test needs 2 CPUs for a helper thread; this machine lets it use {cpus}");
        let before = affinity(0);
        let maglev = Maglev::new(65537).unwrap().with_threads(2);
        let list = backends(&[1; 200]);
        // The first build starts the helper (its thread id is known from its first job on).
        for _ in 0..3 {
            maglev.build(&list).unwrap();
        }
        assert!(affinity(0) == before, "the caller's affinity changed");
        let helpers = maglev.helpers.lock().unwrap();
        let cpus = &helpers[0].cpus;
        let (tid, kept_off) = (cpus.tid.load(Ordering::Relaxed), cpus.kept_off.load(Ordering::Relaxed));
        assert_ne!(tid, 0, "the helper never noted its thread id");
        // (`cpus.caller` may have changed since: the caller notes its CPU when it waits too.)
        assert!(kept_off < libc::CPU_SETSIZE as usize, "the helper was never kept off the caller's CPU");
        let mut expected = before;
        // SAFETY: `kept_off` is a CPU number below `CPU_SETSIZE` (`keep_off` stores no other).
        unsafe { libc::CPU_CLR(kept_off, &mut expected) };
        assert!(affinity(tid) == expected, "the helper's affinity is not the caller's without CPU {kept_off}");
    }

    /// Random backend sets (keys of many lengths and shared prefixes, weights from few distinct
    /// values to all different, some zero) against the definition.
    #[test]
    fn matches_brute_force_on_random_sets() {
        let mut rng = Lcg(0x5eed);
        let mut total_ties = 0;
        for round in 0..60 {
            let size = [3, 5, 13, 101, 211, 1009, 4099, 10007][round % 8];
            let n = 1 + rng.below([3, 20, 100, 400][round % 4]) as usize;
            let max_weight = [1, 4, 1000, u64::from(u32::MAX)][round / 4 % 4];
            let mut list: Vec<MaglevBackend> = Vec::new();
            while list.len() < n {
                let key = match rng.below(4) {
                    0 => format!("10.{}.{}.{}:80", rng.below(3), rng.below(256), rng.below(256)),
                    1 => format!("[2001:db8::{:x}]:{}", rng.below(1 << 16), 80 + rng.below(3)),
                    2 => format!("backend-with-a-long-shared-prefix-{}", rng.below(10_000)),
                    _ => (0..rng.below(20)).map(|_| char::from(b'a' + rng.below(3) as u8)).collect(),
                };
                if list.iter().any(|b| b.key == key) {
                    continue;
                }
                let weight = if rng.below(10) == 0 { 0 } else { 1 + rng.below(max_weight) as u32 };
                let id = list.len() as u32;
                list.push(MaglevBackend { key, weight, id });
            }
            let maglev = Maglev::new(size).unwrap();
            let (expected, ties) = brute_force(&maglev, &list);
            assert_eq!(maglev.build(&list).unwrap(), expected, "round {round}: size {size}, {list:?}");
            list.reverse();
            assert_eq!(maglev.build(&list).unwrap(), expected, "round {round} reversed");
            total_ties += ties;
        }
        assert!(total_ties > 0);
    }

    #[test]
    fn hash_pair_matches_hash() {
        let mut rng = Lcg(3);
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let (a, b) = (rng.next(), rng.next());
            assert_eq!(hash64_pair(&bytes, a, b), (hash64(&bytes, a), hash64(&bytes, b)));
        }
    }

    #[test]
    fn hash_is_pinned() {
        assert_eq!(
            hash64_pair(b"10.0.0.11:80", OFFSET_SEED, SKIP_SEED),
            (0x859c_da79_fadc_7a50, 0x3d13_cca0_2aca_c1ec)
        );
        assert_eq!(hash64(b"10.0.0.11:80", OFFSET_SEED), 0x859c_da79_fadc_7a50);
        assert_eq!(hash64(b"10.0.0.11:80", SKIP_SEED), 0x3d13_cca0_2aca_c1ec);
        assert_eq!(hash64(b"", OFFSET_SEED), 0xc783_c0fb_af79_f357);
        assert_eq!(
            hash64(b"[2001:db8::1]:443", SKIP_SEED),
            0xd874_32a6_3b6d_2fb0
        );
    }

    #[test]
    fn primes() {
        let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537));
        assert!(!is_prime(65536));
        assert!(is_prime(LARGEST_U32_PRIME));
        assert!(!is_prime(u32::MAX));
        assert!(!is_prime(3 * 65521));
        assert!(!is_prime(65521 * 65521)); // the largest square of a prime below 2^32
        assert_eq!(next_prime(0), 2);
        assert_eq!(next_prime(24), 29);
        assert_eq!(next_prime(65536), 65537);
        assert_eq!(next_prime(65537), 65537);
        assert_eq!(next_prime(LARGEST_U32_PRIME - 3), LARGEST_U32_PRIME);
    }

    #[test]
    fn size_validation() {
        let err = Maglev::new(65536).unwrap_err();
        assert_eq!(
            err,
            MaglevError::NotPrime {
                size: 65536,
                next_prime: 65537
            }
        );
        assert_eq!(
            err.to_string(),
            "table size 65536 is not prime; the next prime is 65537"
        );
        for size in [0, 1, 2, LARGEST_U32_PRIME + 1, u32::MAX] {
            let err = Maglev::new(size).unwrap_err();
            assert_eq!(err, MaglevError::SizeOutOfRange { size });
            assert!(
                err.to_string()
                    .contains("must be a prime between 3 and 4294967291"),
                "{err}"
            );
        }
        assert_eq!(
            build_table(&backends(&[1]), 100),
            Err(MaglevError::NotPrime {
                size: 100,
                next_prime: 101
            })
        );
        assert_eq!(Maglev::new(3).unwrap().size(), 3);
        assert_eq!(Maglev::new(DEFAULT_TABLE_SIZE).unwrap().size(), 65537);
    }

    #[test]
    fn no_backends_means_no_backend_everywhere() {
        let maglev = Maglev::new(101).unwrap();
        assert_eq!(maglev.build(&[]).unwrap(), vec![NO_BACKEND; 101]);
        assert_eq!(
            maglev.build(&backends(&[0, 0, 0])).unwrap(),
            vec![NO_BACKEND; 101]
        );
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let mut list = backends(&[1, 2, 3]);
        list.push(MaglevBackend {
            weight: 0,
            id: 7,
            ..list[1].clone()
        });
        let err = build_table(&list, 101).unwrap_err();
        assert_eq!(
            err,
            MaglevError::DuplicateKey {
                key: "10.0.0.1:80".into()
            }
        );
        assert_eq!(err.to_string(), r#"duplicate backend key "10.0.0.1:80""#);
    }

    #[test]
    fn single_backend_takes_every_slot() {
        assert_eq!(
            build_table(&backends(&[5]), 65537).unwrap(),
            vec![1000; 65537]
        );
        assert_eq!(build_table(&backends(&[0, 1]), 3).unwrap(), vec![1001; 3]);
    }

    #[test]
    fn matches_brute_force() {
        let mut total_ties = 0;
        for (size, weights) in [
            (3, vec![1; 50]),
            (3, mixed(7)),
            (13, vec![1, 1]),
            (211, vec![1; 60]),
            (211, mixed(30)),
            (1009, vec![1; 20]),
            (1009, mixed(300)),
            (1009, vec![u32::MAX, 1, 1, u32::MAX - 1, 0, 7]),
            (10007, mixed(100)),
            (65537, vec![3; 1000]),
        ] {
            let maglev = Maglev::new(size).unwrap();
            let list = backends(&weights);
            let (expected, ties) = brute_force(&maglev, &list);
            assert_eq!(
                maglev.build(&list).unwrap(),
                expected,
                "size {size}, weights {weights:?}"
            );
            assert!(!expected.contains(&NO_BACKEND));
            total_ties += ties;
        }
        // Equal weights make ties common (two backends at the same position of one slot), so
        // the tie rule was exercised.
        assert!(total_ties > 10, "{total_ties} ties");
    }

    #[test]
    fn shares_match_weights() {
        for (size, weights) in [
            (65537, vec![1; 10]),
            (65537, (1..=10).collect()),
            (65537, vec![1; 100]),
            (65537, mixed(100)),
            (65537, vec![1; 655]),
            (65537, mixed(655)),
            (100003, vec![1; 1000]),
            (100003, mixed(1000)),
        ] {
            let list = backends(&weights);
            let table = build_table(&list, size).unwrap();
            let counts = counts(&table);
            let total_weight: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            let (mut worst_abs, mut worst_rel, mut worst_sigmas) = (0.0f64, 0.0f64, 0.0f64);
            for b in &list {
                let expected = f64::from(b.weight) / total_weight;
                let got = counts.get(&b.id).copied().unwrap_or(0) as f64 / f64::from(size);
                let deviation = (got - expected).abs();
                // Standard deviation of the share if every slot were an independent draw.
                let sigma = (expected * (1.0 - expected) / f64::from(size)).sqrt();
                worst_abs = worst_abs.max(deviation);
                worst_rel = worst_rel.max(deviation / expected);
                worst_sigmas = worst_sigmas.max(deviation / sigma);
            }
            println!(
                "M={size} N={} weights {}..={}: worst deviation {:.4} pp, {:.1}% relative, {:.1} sigma",
                weights.len(),
                weights.iter().min().unwrap(),
                weights.iter().max().unwrap(),
                worst_abs * 100.0,
                worst_rel * 100.0,
                worst_sigmas,
            );
            assert!(
                worst_abs <= 0.01,
                "a share is off by {:.3} pp",
                worst_abs * 100.0
            );
            // Much tighter than 1 pp: no worse than independent draws would plausibly be.
            assert!(
                worst_sigmas <= 5.0,
                "a share is off by {worst_sigmas:.1} sigma"
            );
        }
    }

    /// Asserts that every slot that differs between `before` and `after` went from a backend
    /// in `from` to one in `to` (`None`: any).
    fn assert_moves(before: &[u32], after: &[u32], from: Option<u32>, to: Option<u32>) -> usize {
        let mut moved = 0;
        for (slot, (&b, &a)) in before.iter().zip(after).enumerate() {
            if a != b {
                moved += 1;
                assert!(
                    from.is_none_or(|id| b == id) && to.is_none_or(|id| a == id),
                    "slot {slot}: {b} -> {a}"
                );
                assert_ne!(a, NO_BACKEND);
            }
        }
        moved
    }

    fn mixed_weights() -> Vec<MaglevBackend> {
        backends(&[
            1, 2, 3, 4, 5, 10, 1, 1, 7, 20, 3, 3, 3, 3, 50, 1, 2, 2, 9, 4,
        ])
    }

    #[test]
    fn removing_a_backend_moves_only_its_slots() {
        let maglev = Maglev::new(65537).unwrap();
        let list = mixed_weights();
        let before = maglev.build(&list).unwrap();
        let counts = counts(&before);
        for removed in [0, 5, 9, 14, 19] {
            let mut smaller = list.clone();
            let gone = smaller.remove(removed);
            let after = maglev.build(&smaller).unwrap();
            assert_eq!(
                assert_moves(&before, &after, Some(gone.id), None),
                counts[&gone.id]
            );
            // Weight 0 is the same as absence.
            let mut zeroed = list.clone();
            zeroed[removed].weight = 0;
            assert_eq!(maglev.build(&zeroed).unwrap(), after);
        }
    }

    #[test]
    fn adding_a_backend_only_takes_slots() {
        let maglev = Maglev::new(65537).unwrap();
        let list = mixed_weights();
        let before = maglev.build(&list).unwrap();
        for (i, weight) in [(100, 1), (101, 7), (102, 60)] {
            let mut bigger = list.clone();
            bigger.push(backend(i, weight));
            let after = maglev.build(&bigger).unwrap();
            let moved = assert_moves(&before, &after, None, Some(1000 + i));
            assert_eq!(moved, counts(&after)[&(1000 + i)]);
        }
    }

    #[test]
    fn changing_a_weight_moves_slots_only_to_or_from_that_backend() {
        let maglev = Maglev::new(65537).unwrap();
        let list = mixed_weights();
        let before = maglev.build(&list).unwrap();
        for (changed, weight) in [(0, 5), (5, 1), (14, 51), (14, 49), (19, 1000)] {
            let mut other = list.clone();
            other[changed].weight = weight;
            let id = other[changed].id;
            let after = maglev.build(&other).unwrap();
            let (from, to) = if weight > list[changed].weight {
                (None, Some(id))
            } else {
                (Some(id), None)
            };
            assert!(assert_moves(&before, &after, from, to) > 0);
        }
    }

    #[test]
    fn input_order_does_not_matter() {
        let maglev = Maglev::new(65537).unwrap();
        let list = mixed_weights();
        let table = maglev.build(&list).unwrap();
        let mut reversed = list.clone();
        reversed.reverse();
        assert_eq!(maglev.build(&reversed).unwrap(), table);
        let mut shuffled = list.clone();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for i in (1..shuffled.len()).rev() {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            shuffled.swap(i, (state >> 33) as usize % (i + 1));
        }
        assert_ne!(shuffled, list);
        assert_eq!(maglev.build(&shuffled).unwrap(), table);
    }

    #[test]
    fn tables_are_pinned() {
        // Catches any change of the algorithm, the hash or the float arithmetic: tables must
        // not change between versions or machines.
        let small = build_table(&backends(&[1, 2, 3]), 13).unwrap();
        // Checked against an independent implementation of the definition.
        assert_eq!(
            small,
            [1002, 1002, 1001, 1001, 1001, 1001, 1000, 1002, 1000, 1002, 1000, 1001, 1002]
        );
        let list = vec![
            MaglevBackend {
                key: "10.0.0.11:80".into(),
                weight: 1,
                id: 0,
            },
            MaglevBackend {
                key: "10.0.0.12:80".into(),
                weight: 2,
                id: 1,
            },
            MaglevBackend {
                key: "10.0.0.13:80".into(),
                weight: 3,
                id: 2,
            },
            MaglevBackend {
                key: "[2001:db8::1]:80".into(),
                weight: 10,
                id: 3,
            },
            MaglevBackend {
                key: "backend-e".into(),
                weight: 100,
                id: 4,
            },
        ];
        let table = build_table(&list, DEFAULT_TABLE_SIZE).unwrap();
        let bytes: Vec<u8> = table.iter().flat_map(|id| id.to_le_bytes()).collect();
        let by_id: Vec<usize> = counts(&table).into_values().collect();
        assert_eq!(by_id, [565, 1125, 1699, 5651, 56497]);
        assert_eq!(hash64(&bytes, 0), 0xbedf_35de_f39b_302b);
    }

    /// The fast path indexes tables with `lb_common::flow_hash`: consecutive client ports (what a
    /// client's ephemeral ports look like) must spread evenly over the backends.
    #[test]
    fn flow_hash_spreads_consecutive_ports_evenly() {
        let backends: Vec<MaglevBackend> =
            (0..3).map(|i| MaglevBackend { key: format!("10.0.0.{}:80", 11 + i), weight: 1, id: i }).collect();
        let table = build_table(&backends, 65537).unwrap();
        let mut counts = [0u32; 3];
        for sport in 30000u16..33000 {
            let key = lb_common::FlowKey {
                src: [u32::from_ne_bytes([10, 0, 0, 2]), 0, 0, 0],
                dst: [u32::from_ne_bytes([10, 0, 0, 100]), 0, 0, 0],
                sport: sport.to_be(),
                dport: 80u16.to_be(),
                proto: lb_common::PROTO_TCP,
                family: lb_common::FAMILY_V4,
                _pad: [0; 2],
            };
            counts[table[lb_common::table_slot(lb_common::flow_hash(&key), 65537) as usize] as usize] += 1;
        }
        // 3000 flows: a fair split is 1000 ± 26 (1σ); allow 4σ.
        assert!(counts.iter().all(|&n| (896..=1104).contains(&n)), "{counts:?}");
    }
}