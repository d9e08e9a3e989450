//! Weighted, minimally disruptive Maglev-style lookup tables (one per VIP).
//!
//! The fast path indexes a table of `M` slots (`M` prime) with a 5-tuple hash; every slot holds
//! the id of the backend that serves the flows hashing there. [`Maglev::build`] computes that
//! table from the VIP's backend set.
//!
//! # Algorithm: an exponential race over Maglev permutations
//!
//! Every backend `i` gets Maglev's permutation of the slots, derived from its key alone:
//! `offset_i = h1(key) mod M`, `skip_i = h2(key) mod (M-1) + 1` and
//! `perm_i[k] = (offset_i + k * skip_i) mod M` (a full permutation because `M` is prime).
//! Its `k`-th position scores `E_i(k) = L[k] / w_i`, where
//! `L[k] = sum_{j=0..=k} 1/(M-j)` is the expected `(k+1)`-th smallest of `M` independent
//! Exp(1) variables. A slot belongs to the backend with the smallest score there; equal scores
//! go to the backend whose key sorts first (byte order).
//!
//! The score a backend has at a slot depends only on that backend's key and weight, so the
//! owner of a slot is the minimum of a set of per-backend values under a fixed total order.
//! Hence, exactly (not just in expectation):
//! * removing a backend (or setting its weight to 0) changes only the slots it owned;
//! * adding a backend only moves slots to it;
//! * changing one backend's weight only moves slots to or from that backend.
//!
//! Since `L[pos_i(s)]` behaves like an Exp(1) variable for a "random" slot `s`, the score of
//! backend `i` behaves like an Exp(`w_i`) variable and backend `i` wins a slot with probability
//! `w_i / W` (`W` = total weight): that is the weighting.
//!
//! # Determinism
//!
//! The table is a pure function of the set of `(key, weight, id)` triples: the input order does
//! not matter (backends are sorted by key first), the hash is implemented here and frozen, and
//! scores only use IEEE-754 `+` and `/` on `f64`, which are exactly rounded on every platform
//! Rust supports (no libm, no fused multiply-add: rustc never contracts float operations). Two
//! directors therefore compute bit-identical tables.
//!
//! # Cost
//!
//! Computing all `M * N` scores is unnecessary: scores grow with `k`, so each backend only walks
//! a prefix of its permutation, up to a common score cutoff that is raised until every slot has
//! an owner (see [`Maglev::build`]). That is about `M * (ln M + 1)` score evaluations in total,
//! whatever the number of backends.

use thiserror::Error;

/// Value of a slot that no backend serves (the VIP has no backend with a positive weight).
pub const NO_BACKEND: u32 = u32::MAX;

/// Table size used when a VIP does not configure one: a prime comfortably above 100 slots per
/// backend for up to 655 backends.
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
    #[error("table size {size} is out of range; it must be a prime between 3 and {LARGEST_U32_PRIME}")]
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
    if n % 2 == 0 || n % 3 == 0 {
        return false;
    }
    // Every prime above 3 is 6j ± 1; u64 because d * d overflows u32 near u32::MAX.
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n % d == 0 || n % (d + 2) == 0 {
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

/// Builds tables of one size. It keeps the size-dependent order statistics `L`, so build one
/// `Maglev` per table size and reuse it.
#[derive(Clone)]
pub struct Maglev {
    size: u32,
    /// `order_stats[k] = L[k] = sum_{j=0..=k} 1/(size-j)`, non-decreasing in `k`.
    order_stats: Vec<f64>,
}

impl std::fmt::Debug for Maglev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maglev").field("size", &self.size).finish_non_exhaustive()
    }
}

impl Maglev {
    /// A builder for tables of `size` slots; `size` must be a prime `>= 3`.
    pub fn new(size: u32) -> Result<Self, MaglevError> {
        if !(3..=LARGEST_U32_PRIME).contains(&size) {
            return Err(MaglevError::SizeOutOfRange { size });
        }
        if !is_prime(size) {
            return Err(MaglevError::NotPrime { size, next_prime: next_prime(size) });
        }
        // Summed in this exact order so that every machine gets the same bits.
        let order_stats = (0..size)
            .scan(0.0f64, |sum, j| {
                *sum += 1.0 / f64::from(size - j);
                Some(*sum)
            })
            .collect();
        Ok(Self { size, order_stats })
    }

    /// Number of slots of the tables this builder makes.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The table for `backends`: `size()` slots, each holding the `id` of the backend serving
    /// it, or [`NO_BACKEND`] everywhere when no backend has a positive weight. The result does
    /// not depend on the order of `backends`.
    ///
    /// Fails with [`MaglevError::DuplicateKey`] if two backends (even of weight 0) share a key.
    pub fn build(&self, backends: &[MaglevBackend]) -> Result<Vec<u32>, MaglevError> {
        let mut sorted: Vec<&MaglevBackend> = backends.iter().collect();
        sorted.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        if let Some(pair) = sorted.windows(2).find(|pair| pair[0].key == pair[1].key) {
            return Err(MaglevError::DuplicateKey { key: pair[0].key.clone() });
        }
        sorted.retain(|b| b.weight > 0);

        let m = self.size as usize;
        if sorted.is_empty() {
            return Ok(vec![NO_BACKEND; m]);
        }
        let mut walkers: Vec<Walker> = sorted
            .iter()
            .enumerate()
            .map(|(rank, b)| Walker::new(b, rank_u32(rank), self.size))
            .collect();
        // Exact (N * u32::MAX < 2^53); only used to pick cutoffs.
        let total_weight = sorted.iter().map(|b| f64::from(b.weight)).sum::<f64>();

        // Passes: in each, every backend walks its permutation on up to a common cutoff T,
        // offering itself to the slots it meets; between passes the cutoff is raised, until
        // every slot has an owner. The result does not depend on the cutoffs chosen: as scores
        // grow with k, after the last pass each backend has visited exactly its positions
        // scoring <= T and every slot holds a key whose score is <= T. Any position not visited
        // scores > T and, T being the largest score of its prefix (see `cutoff`), has a larger
        // score prefix, hence a larger slot key: it can neither beat nor tie the slot's holder.
        //
        // The cutoffs thus only decide speed. In units of 1/W, a slot is still empty after
        // cutoff x with probability about e^-x, so it takes x ~ ln M + 1 to fill them all; then
        // each backend has walked about M * (1 - e^(-w_i x / W)) positions, at most about
        // M * (ln M + 1) visits in all. Most of them meet slots filled in an earlier pass,
        // which are settled (see `Race`) and cost only a bit test. To keep the costlier visits
        // to unsettled slots few, the first passes are short (x = 0.5, 1, 2, 4, 8); later the
        // cutoff aims at ln(empty slots) + 1 beyond the current one, since the best score of a
        // slot still empty at x exceeds x by about an Exp(1) variable (memorylessness).
        let mut race = Race::new(m);
        let mut x = 0.0f64;
        while race.empty > 0 {
            x += x.max(0.5).min(ln_estimate(race.empty) + 1.0);
            let cutoff = cutoff(x / total_weight);
            for walker in &mut walkers {
                walker.advance(cutoff, &self.order_stats, &mut race);
            }
            race.settle();
        }
        Ok(race.best.iter().map(|&key| sorted[rank_of(key)].id).collect())
    }
}

/// Builds the table of `size` slots for `backends` (see [`Maglev::build`]). To build many
/// tables of one size, keep a [`Maglev`] instead: it caches per-size work.
pub fn build_table(backends: &[MaglevBackend], size: u32) -> Result<Vec<u32>, MaglevError> {
    Maglev::new(size)?.build(backends)
}

/// Score of a backend of weight `weight` at a position whose order statistic is `order_stat`.
/// Non-decreasing in `order_stat`, which the cutoff argument in [`Maglev::build`] relies on.
fn score(order_stat: f64, weight: f64) -> f64 {
    order_stat / weight
}

/// What a slot keeps of a backend offered to it: the 32 most significant bits of the score
/// (sign, exponent and 20 mantissa bits, which order positive floats like the floats
/// themselves), then the backend's rank in key order. Comparing keys compares scores, then keys
/// on ties, and one `u64` per slot holds both the best score and its backend. Scores closer than
/// about one part in a million count as tied; that decides about one slot in a million, which
/// like any tie goes to the smaller key.
fn slot_key(score: f64, rank: u32) -> u64 {
    (score.to_bits() >> 32 << 32) | u64::from(rank)
}

/// Key of a slot nobody was offered yet; greater than every real key (scores are finite).
const EMPTY_SLOT: u64 = u64::MAX;

/// The backend rank held in a slot key.
fn rank_of(key: u64) -> usize {
    (key & u64::from(u32::MAX)) as usize
}

/// `rank` as stored in slot keys.
fn rank_u32(rank: usize) -> u32 {
    u32::try_from(rank).expect("fewer than 2^32 backends")
}

/// The cutoff for a target score `t`: the largest score with the same slot-key prefix as `t`,
/// so that a score is within the cutoff exactly when its prefix is within `t`'s.
fn cutoff(t: f64) -> f64 {
    f64::from_bits(t.to_bits() | u64::from(u32::MAX))
}

/// The largest `l` with `score(l, weight) <= cutoff`. Since `score` is non-decreasing in `l`, an
/// order statistic scores within the cutoff exactly when it is `<=` this limit, which spares a
/// division per visited position. `cutoff * weight` is within an ulp or two of the limit; the
/// loops make it exact.
fn order_stat_limit(cutoff: f64, weight: f64) -> f64 {
    let mut limit = cutoff * weight;
    while score(limit, weight) > cutoff {
        limit = limit.next_down();
    }
    while score(limit.next_up(), weight) <= cutoff {
        limit = limit.next_up();
    }
    limit
}

/// `ln(n)` to within `ln 2` (from below), for `n >= 1`; enough to choose cutoffs.
fn ln_estimate(n: usize) -> f64 {
    f64::from(n.ilog2()) * std::f64::consts::LN_2
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
    /// Number of slots not filled yet.
    empty: usize,
}

impl Race {
    fn new(size: usize) -> Self {
        let mut settled = vec![0; size.div_ceil(64)];
        if size % 64 != 0 {
            settled[size / 64] = u64::MAX << (size % 64);
        }
        Self { best: vec![EMPTY_SLOT; size], settled, empty: size }
    }

    /// Ends a pass: settles the slots it filled. Found by scanning the unsettled slots rather
    /// than recorded during the pass, which would make each visit depend on the previous one.
    fn settle(&mut self) {
        for (index, word) in self.settled.iter_mut().enumerate() {
            let mut unsettled = !*word;
            while unsettled != 0 {
                let bit = unsettled.trailing_zeros();
                let filled = self.best[index * 64 + bit as usize] != EMPTY_SLOT;
                *word |= u64::from(filled) << bit;
                self.empty -= usize::from(filled);
                unsettled &= unsettled - 1;
            }
        }
    }
}

/// One backend's progress along its permutation during [`Maglev::build`].
struct Walker {
    weight: f64,
    rank: u32,
    skip: usize,
    /// Next position `k` to visit.
    next: usize,
    /// The slot at position `next`, `perm[next]`.
    slot: usize,
}

impl Walker {
    fn new(backend: &MaglevBackend, rank: u32, size: u32) -> Self {
        let key = backend.key.as_bytes();
        let m = u64::from(size);
        // Both values are < m <= u32::MAX, so they fit in a usize.
        let offset = (hash64(key, OFFSET_SEED) % m) as usize;
        let skip = (hash64(key, SKIP_SEED) % (m - 1) + 1) as usize;
        Self { weight: f64::from(backend.weight), rank, skip, next: 0, slot: offset }
    }

    /// Visits the positions from `next` on that score `<= cutoff`, offering this backend to
    /// each unsettled slot met: the slot keeps the smaller key.
    fn advance(&mut self, cutoff: f64, order_stats: &[f64], race: &mut Race) {
        // Hot loop: on most visits it only touches locals, `order_stats` in sequence and the
        // small `settled` bitmap. Unsettled slots are updated without branches, which would
        // be mispredicted about half the time.
        let Race { best, settled, .. } = race;
        let m = order_stats.len();
        let limit = order_stat_limit(cutoff, self.weight);
        let mut slot = self.slot;
        let mut visited = 0;
        for &l in &order_stats[self.next..] {
            if l > limit {
                break;
            }
            if settled[slot / 64] & (1 << (slot % 64)) == 0 {
                best[slot] = best[slot].min(slot_key(score(l, self.weight), self.rank));
            }
            visited += 1;
            slot += self.skip;
            if slot >= m {
                slot -= m;
            }
        }
        self.next += visited;
        self.slot = slot;
    }
}

/// The frozen 64-bit hash behind `h1` (seed [`OFFSET_SEED`]) and `h2` (seed [`SKIP_SEED`]).
///
/// `h = seed ^ (len * 0x9E3779B97F4A7C15)`; then for each 8-byte little-endian word of `bytes`
/// (the last one zero-padded) `h = fmix64(h ^ word)`; the result is `fmix64(h)`, where `fmix64`
/// is MurmurHash3's 64-bit finalizer. Never change it: tables would change with it (the tests
/// pin its values).
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
