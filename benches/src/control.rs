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
    /// VIPs whose backend set changed in the update.
    pub changed_vips: usize,
    pub backends_per_vip: usize,
    /// Milliseconds for `apply` (whole desired state in, kernel maps updated, tables flipped).
    pub ms: Summary,
    /// Time of the first `apply` of the whole setup (every table slot written once), ms.
    pub initial_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Control {
    pub builds: Vec<BuildTime>,
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
            progress.step(&format!("control: Maglev build, M = {m}, N = {n} (weighted)"));
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

/// Builds the M = 65537 table for `n` weighted backends in a loop for `secs` seconds (for perf).
pub fn profile_builds(n: usize, secs: f64) -> Result<()> {
    let maglev = Maglev::new(65537)?;
    let backends = members(n);
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        std::hint::black_box(maglev.build(&backends)?);
        samples.push(ms(t.elapsed()));
    }
    eprintln!("{} builds, median {:.3} ms", samples.len(), Summary::of(&samples).median);
    Ok(())
}

/// Must run inside a private network namespace (the dataplane adds ifindex 1 to its devmap).
pub fn applies(p: &Params, progress: &mut Progress) -> Result<Vec<ApplyTime>> {
    let mut out = Vec::new();
    let n = p.apply_backends;
    for &vips in &p.apply_vips {
        progress.step(&format!(
            "control: apply, {vips} VIPs × {n} backends, first install and backend changes"
        ));
        let mut dp = fastpath::load(n, vips, 65536)?;
        let full = fastpath::tcp_services(n, vips);
        let t = Instant::now();
        dp.apply(&full)?;
        let initial_ms = ms(t.elapsed());
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
                // Past FLIP_GRACE (20 ms) since the last flip, so apply never waits for it.
                std::thread::sleep(Duration::from_millis(25));
                let t = Instant::now();
                dp.apply(&state)?;
                samples.push(ms(t.elapsed()));
            }
            out.push(ApplyTime {
                vips,
                changed_vips: changed,
                backends_per_vip: n,
                ms: Summary::of(&samples),
                initial_ms,
            });
        }
    }
    Ok(out)
}
