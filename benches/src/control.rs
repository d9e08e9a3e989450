//! Part 3: the control plane. Maglev table build time, and the time `XdpDataplane::apply` takes
//! to put a backend change into the kernel (table slots rewritten in the idle buffer, then the
//! atomic flip of the VIP's entry).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lb_userspace::{
    dataplane::{Dataplane, ServiceSpec},
    maglev::{Maglev, MaglevBackend},
};
use serde::Serialize;

use crate::{
    fastpath,
    sys::{Progress, Summary},
};

#[derive(Clone, Debug)]
pub struct Params {
    pub sizes: Vec<u32>,
    pub backends: Vec<usize>,
    /// Rounds per (M, N); fewer for the big table.
    pub rounds: usize,
    pub rounds_big: usize,
    pub apply_vips: Vec<usize>,
    pub apply_backends: usize,
    pub apply_rounds: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BuildTime {
    pub m: u32,
    pub n: usize,
    /// Milliseconds per table.
    pub ms: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct ApplyTime {
    /// VIPs programmed.
    pub vips: usize,
    /// VIPs changed by the update.
    pub changed_vips: usize,
    /// What changed: one backend removed or put back, or the VIPs' `enabled` flipped (a VRRP
    /// state change, which rewrites every backend of the changed VIPs).
    pub change: &'static str,
    pub backends_per_vip: usize,
    /// Milliseconds for `apply` (whole desired state in, kernel maps updated, tables flipped).
    pub ms: Summary,
    /// Time of the first `apply` of the whole setup (every table slot written once), ms.
    pub initial_ms: f64,
}

/// `Maglev::build` against the Maglev paper's population loop ([`paper_table`]) on the same
/// backends, all of weight 1, their rounds interleaved so that all see the same machine.
#[derive(Clone, Debug, Serialize)]
pub struct PaperBuild {
    pub m: u32,
    pub n: usize,
    /// lbd's build (on `Control::maglev_threads` threads), milliseconds per table.
    pub lbd_ms: Summary,
    /// lbd's build on one thread, milliseconds per table.
    pub lbd_one_thread_ms: Summary,
    /// The paper's loop, milliseconds per table.
    pub paper_ms: Summary,
}

#[derive(Clone, Debug, Serialize)]
pub struct Control {
    /// Threads `Maglev::build` builds large tables on here (`Maglev::threads`).
    pub maglev_threads: usize,
    pub builds: Vec<BuildTime>,
    /// The same-run baseline of the build times.
    pub paper: Vec<PaperBuild>,
    pub applies: Vec<ApplyTime>,
    /// `None` when that part failed (the error is in the report's errors).
    pub health_checks: Option<crate::health::HealthLoad>,
}

fn members(n: usize) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend {
            key: format!("198.19.{}.{}:80", i / 250, 1 + i % 250),
            weight: 1 + (i % 4) as u32,
            id: i as u32,
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn builds(p: &Params, progress: &mut Progress) -> Result<Vec<BuildTime>> {
    let mut out = Vec::new();
    for &m in &p.sizes {
        let maglev = Maglev::new(m).with_context(|| format!("table size {m}"))?;
        for &n in &p.backends {
            progress.step(&format!("control: Maglev build, M = {m}, N = {n} (weighted)"))?;
            let backends = members(n);
            let rounds = if m > 100_000 { p.rounds_big } else { p.rounds };
            // One untimed build first (page faults of the first allocation of this size).
            let table = maglev.build(&backends)?;
            assert_eq!(table.len(), m as usize);
            let mut samples = Vec::new();
            for _ in 0..rounds {
                let t = Instant::now();
                let table = maglev.build(&backends)?;
                samples.push(ms(t.elapsed()));
                std::hint::black_box(table);
            }
            out.push(BuildTime {
                m,
                n,
                ms: Summary::of(&samples),
            });
        }
    }
    Ok(out)
}

/// The Maglev paper's table population (Eisenbud et al., "Maglev: A Fast and Reliable Software
/// Network Load Balancer", NSDI 2016, Pseudocode 1): the backends take turns, each claiming the
/// next slot of its permutation (`offset + k * skip mod m`) that no backend holds yet, until
/// every slot is held. Unweighted, and each permutation entry is computed when it is needed
/// rather than stored (N × M of them). The baseline of the build times, not what lbd runs: lbd
/// weighs backends, and its tables only move the slots a change must move
/// (`lb_userspace::maglev`). `keys` must not be empty; `m` must be prime.
pub fn paper_table(keys: &[String], m: u32) -> Vec<u32> {
    use std::hash::{Hash, Hasher};
    let hash = |key: &str, seed: u64| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (seed, key).hash(&mut h);
        h.finish()
    };
    let m64 = u64::from(m);
    // Per backend: the slot of its next permutation entry, and its skip.
    let mut next: Vec<u64> = keys.iter().map(|k| hash(k, 0) % m64).collect();
    let skip: Vec<u64> = keys.iter().map(|k| hash(k, 1) % (m64 - 1) + 1).collect();
    let step = |slot: u64, skip: u64| if slot + skip >= m64 { slot + skip - m64 } else { slot + skip };
    let mut entry = vec![u32::MAX; m as usize];
    let mut filled = 0;
    'fill: loop {
        for (i, (slot, &skip)) in next.iter_mut().zip(&skip).enumerate() {
            let mut c = *slot;
            while entry[c as usize] != u32::MAX {
                c = step(c, skip);
            }
            entry[c as usize] = i as u32;
            *slot = step(c, skip);
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

/// Times `Maglev::build` (on its threads, then on one) and [`paper_table`] on `n` backends of
/// weight 1, M = `m`, alternating.
pub fn paper_builds(p: &Params, m: u32, progress: &mut Progress) -> Result<Vec<PaperBuild>> {
    let maglev = Maglev::new(m).with_context(|| format!("table size {m}"))?;
    let one_thread = maglev.clone().with_threads(1);
    let mut out = Vec::new();
    for &n in &p.backends {
        progress.step(&format!("control: Maglev build against the paper's loop, M = {m}, N = {n}"))?;
        let backends: Vec<MaglevBackend> =
            members(n).into_iter().map(|b| MaglevBackend { weight: 1, ..b }).collect();
        let keys: Vec<String> = backends.iter().map(|b| b.key.clone()).collect();
        // Untimed first builds, checked: lbd's table does not depend on its threads, and the
        // baseline is the paper's (every backend claims one slot a turn, so the counts differ
        // by at most one).
        anyhow::ensure!(
            maglev.build(&backends)? == one_thread.build(&backends)?,
            "Maglev tables on {} threads and on one differ (M = {m}, N = {n})",
            maglev.threads()
        );
        let mut counts = vec![0usize; n];
        for &b in &paper_table(&keys, m) {
            counts[b as usize] += 1;
        }
        let (lo, hi) = (counts.iter().min(), counts.iter().max());
        anyhow::ensure!(
            hi.zip(lo).is_some_and(|(hi, lo)| hi - lo <= 1),
            "the paper's loop gave uneven counts ({lo:?}..{hi:?} slots a backend)"
        );
        let (mut lbd, mut lbd_one, mut paper) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..p.rounds {
            let t = Instant::now();
            std::hint::black_box(maglev.build(&backends)?);
            lbd.push(ms(t.elapsed()));
            let t = Instant::now();
            std::hint::black_box(one_thread.build(&backends)?);
            lbd_one.push(ms(t.elapsed()));
            let t = Instant::now();
            std::hint::black_box(paper_table(&keys, m));
            paper.push(ms(t.elapsed()));
        }
        out.push(PaperBuild {
            m,
            n,
            lbd_ms: Summary::of(&lbd),
            lbd_one_thread_ms: Summary::of(&lbd_one),
            paper_ms: Summary::of(&paper),
        });
    }
    Ok(out)
}

/// Builds the table of `m` slots for `n` weighted backends in a loop for `secs` seconds (for
/// perf), on `threads` threads if given.
pub fn profile_builds(n: usize, secs: f64, m: u32, threads: Option<usize>) -> Result<()> {
    let maglev = Maglev::new(m).with_context(|| format!("table size {m}"))?;
    let maglev = match threads {
        Some(t) => maglev.with_threads(t),
        None => maglev,
    };
    let backends = members(n);
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        std::hint::black_box(maglev.build(&backends)?);
        samples.push(ms(t.elapsed()));
    }
    eprintln!(
        "{} builds, median {:.3} ms (M = {m}, N = {n}, {} threads)",
        samples.len(),
        Summary::of(&samples).median,
        maglev.threads()
    );
    Ok(())
}

/// Must run inside a private network namespace (the dataplane adds ifindex 1 to its devmap).
pub fn applies(p: &Params, progress: &mut Progress) -> Result<Vec<ApplyTime>> {
    let mut out = Vec::new();
    let n = p.apply_backends;
    for &vips in &p.apply_vips {
        progress.step(&format!(
            "control: apply, {vips} VIPs × {n} backends, first install and backend changes"
        ))?;
        let mut dp = fastpath::load(n, vips, 65536)?;
        let full = fastpath::tcp_services(n, vips);
        let t = Instant::now();
        dp.apply(&full)?;
        let initial_ms = ms(t.elapsed());
        let row = |changed_vips, change, samples: &[f64]| ApplyTime {
            vips,
            changed_vips,
            change,
            backends_per_vip: n,
            ms: Summary::of(samples),
            initial_ms,
        };
        let changes = if vips == 1 { vec![1] } else { vec![1, vips] };
        for changed in changes {
            let mut samples = Vec::new();
            for round in 0..p.apply_rounds {
                // Odd rounds remove one backend (a different one each time) from `changed` VIPs,
                // even rounds put it back: every apply changes ~M/N slots of those VIPs.
                let victim = (round / 2 * 7 + 3) % n;
                let state: Vec<ServiceSpec> = if round % 2 == 0 {
                    full.iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let mut s = s.clone();
                            if i < changed {
                                s.backends.remove(victim);
                            }
                            s
                        })
                        .collect()
                } else {
                    full.clone()
                };
                // A grace period past since the last flip (it runs in the background), so apply
                // never waits for it.
                dp.settle();
                let t = Instant::now();
                dp.apply(&state)?;
                samples.push(ms(t.elapsed()));
            }
            out.push(row(changed, "a backend", &samples));
        }
        // A VRRP state change: every VIP disabled (to backup), then enabled again. The tables
        // stay; the VIPs and, for connection-table hits, all their backends are rewritten.
        let mut samples = Vec::new();
        for round in 0..p.apply_rounds {
            let mut state = full.clone();
            for s in &mut state {
                s.enabled = round % 2 == 1;
            }
            let t = Instant::now();
            dp.apply(&state)?;
            samples.push(ms(t.elapsed()));
        }
        out.push(row(vips, "enabled (VRRP)", &samples));
    }
    Ok(out)
}
