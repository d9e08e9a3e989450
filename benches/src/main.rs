//! `lb-bench`: lbd's benchmark (run by `cargo xtask bench`, as root). One run measures the XDP
//! fast path per packet (`BPF_PROG_TEST_RUN`), the live packet path in network namespaces
//! (generator → director → sink), TCP end to end through the rig, and the control plane, each
//! against baselines measured in the same run, and writes `report.md`, `report.json` and PNG
//! plots. It exits non-zero if the report is missing a section or a ratio is not sane.
//!
//! ```text
//! lb-bench [--quick] [--out DIR]        the benchmark (default DIR: target/bench)
//! lb-bench profile CASE SECONDS         loop one per-packet case (for perf / bpftool)
//! lb-bench profile-maglev N SECONDS [M [THREADS]]
//!                                      loop Maglev builds (M = 65537 unless given, on the
//!                                      builder's threads unless given), N weighted backends
//! ```

mod control;
mod fastpath;
mod health;
mod live;
mod plot;
mod progs;
mod report;
mod sys;
mod tcp;

use std::{path::PathBuf, time::Instant};

use anyhow::{bail, Context, Result};
use lb_tests::netns::{require_root, Netns};

use report::Report;

struct Plan {
    fastpath: fastpath::Params,
    live: live::Params,
    tcp: tcp::Params,
    control: control::Params,
    health: health::Params,
}

fn plan(quick: bool) -> Plan {
    if quick {
        Plan {
            fastpath: fastpath::Params {
                rounds: 3,
                repeat: 100_000,
                repeat_new: 20_000,
                setups: vec![(10, 1), (1000, 1), (100, 20)],
                flows: vec![1, 1000, 100_000],
                base_setup: (100, 1),
            },
            live: live::Params {
                packets: 500_000,
                flows: vec![1, 1000],
                sizes: vec![64],
                // Best of 3 each, and 3 rounds' own ratios for the sanity check: with one run
                // each, a change of the VM's speed between lbd's run and the baseline's put lbd at
                // 1.28× the redirect-only baseline in a CI run.
                runs: 3,
            },
            tcp: tcp::Params {
                seconds: 1,
                connections: 16,
            },
            control: control::Params {
                sizes: vec![65537, 655373],
                backends: vec![10, 1000],
                rounds: 5,
                rounds_big: 1,
                apply_vips: vec![1, 20],
                apply_backends: 100,
                apply_rounds: 4,
            },
            health: health::Params {
                backends: vec![1000],
                seconds: 3,
                changes: 2,
            },
        }
    } else {
        Plan {
            fastpath: fastpath::Params {
                rounds: 7,
                repeat: 500_000,
                repeat_new: 50_000,
                setups: vec![(10, 1), (100, 1), (1000, 1), (10, 100), (100, 100), (1000, 100)],
                flows: vec![1, 1000, 10_000, 100_000],
                base_setup: (100, 1),
            },
            live: live::Params {
                packets: 2_000_000,
                flows: vec![1, 1000, 100_000],
                sizes: vec![64, 512, 1500],
                runs: 5,
            },
            tcp: tcp::Params {
                seconds: 5,
                connections: 32,
            },
            control: control::Params {
                sizes: vec![65537, 655373],
                backends: vec![10, 100, 1000],
                rounds: 15,
                rounds_big: 5,
                apply_vips: vec![1, 100],
                apply_backends: 100,
                apply_rounds: 10,
            },
            health: health::Params {
                backends: vec![1000, 10_000],
                seconds: 10,
                changes: 5,
            },
        }
    }
}

fn pktgen() -> String {
    if std::path::Path::new("/proc/net/pktgen").exists() {
        return "loaded (not used: the generator is BPF_PROG_TEST_RUN live frames everywhere)".into();
    }
    let probe = std::process::Command::new("modprobe").args(["-n", "pktgen"]).output();
    match probe {
        Ok(o) if o.status.success() => {
            "module available, not used (the generator is BPF_PROG_TEST_RUN live frames)".into()
        }
        _ => "no pktgen module in this kernel: the generator is BPF_PROG_TEST_RUN live frames".into(),
    }
}

const USAGE: &str = "usage: lb-bench [--quick] [--out DIR] [--only fastpath|live|tcp|control]
       lb-bench profile CASE [SECONDS]
       lb-bench profile-maglev [N [SECONDS [M [THREADS]]]]
(normally run through `cargo xtask bench`, which builds and sets up first)";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("profile-maglev") {
        // `lb-bench profile-maglev N SECONDS [M [THREADS]]`: Maglev builds in a loop, for perf.
        let arg = |i: usize| args.get(i).map(String::as_str);
        let n: usize = arg(1).map(str::parse).transpose()?.unwrap_or(1000);
        let secs: f64 = arg(2).map(str::parse).transpose()?.unwrap_or(10.0);
        let m: u32 = arg(3).map(str::parse).transpose()?.unwrap_or(65537);
        let threads: Option<usize> = arg(4).map(str::parse).transpose()?;
        return control::profile_builds(n, secs, m, threads);
    }
    require_root()?;
    if args.first().map(String::as_str) == Some("profile") {
        let case = args.get(1).context("usage: lb-bench profile CASE SECONDS")?.clone();
        let secs: f64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(10.0);
        let ns = Netns::new("lbdb-prof")?;
        return sys::in_ns(&ns.name, Some(1), || fastpath::profile(&case, secs, (100, 1)))?;
    }
    let mut quick = false;
    let mut only: Option<String> = None;
    let mut out = PathBuf::from("target/bench");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = PathBuf::from(it.next().context("--out DIR")?),
            "--only" => {
                let section = it.next().context("--only needs a section: fastpath, live, tcp or control")?;
                if !["fastpath", "live", "tcp", "control"].contains(&section.as_str()) {
                    bail!("--only {section}: no such section (fastpath, live, tcp or control)");
                }
                only = Some(section.clone());
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    // Ctrl-C (or CI's timeout) ends the run through its error paths, which remove the
    // namespaces, lbd and nginx it started.
    lb_tests::rig::stop_on_signals()?;
    let plan = plan(quick);
    let started = Instant::now();
    let mut report = Report {
        mode: if quick { "quick" } else { "full" }.into(),
        command: format!("cargo xtask bench{}", if quick { " --quick" } else { "" }),
        only: only.clone(),
        machine: sys::machine(),
        load_at_start: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
        pktgen: pktgen(),
        seconds: 0.0,
        fastpath: None,
        live: None,
        tcp: None,
        control: None,
        goals: Vec::new(),
        checks: Vec::new(),
        errors: Vec::new(),
        plots: Vec::new(),
    };
    let f = &plan.fastpath;
    let want = |section: &str| only.as_deref().is_none_or(|o| o == section);
    // One step per line the sections print: per packet, a load and a run per setup (the base
    // setup is added when missing) and the full-table run; live, a pair per (flows, size) and the
    // XDP_TX pair; tcp, the rig and four wrk runs; control, the builds, the paper's loop per N,
    // the applies and the health checks.
    let setups = f.setups.len() + usize::from(!f.setups.contains(&f.base_setup));
    let c = &plan.control;
    let steps = [
        ("fastpath", setups * 2 + 1),
        ("live", plan.live.flows.len() * plan.live.sizes.len() + 1),
        ("tcp", 5),
        (
            "control",
            c.sizes.len() * c.backends.len() + c.backends.len() + c.apply_vips.len() + plan.health.backends.len(),
        ),
    ]
    .into_iter()
    .filter(|(section, _)| want(section))
    .map(|(_, n)| n)
    .sum();
    let mut progress = sys::Progress::new(steps);
    eprintln!("bench: {} run, report in {}", report.mode, out.display());

    // 1. Per packet, in a private namespace (lbd's devmap gets that namespace's loopback).
    if want("fastpath") {
        let result = Netns::new("lbdb-prog")
            .and_then(|ns| sys::in_ns(&ns.name, Some(1), || fastpath::run_all(f, &mut progress))?);
        match result {
            Ok(fp) => report.fastpath = Some(fp),
            Err(e) => report.errors.push(format!("per-packet (test_run): {e:#}")),
        }
    }
    // 2. Live path, then TCP through the rig.
    if want("live") {
        match live::run_all(&plan.live, &mut progress) {
            Ok(l) => report.live = Some(l),
            Err(e) => report.errors.push(format!("live path: {e:#}")),
        }
    }
    if want("tcp") {
        match tcp::run_all(&plan.tcp, &mut progress) {
            Ok(t) => report.tcp = Some(t),
            Err(e) => report.errors.push(format!("TCP (wrk): {e:#}")),
        }
    }
    // 3. Control plane.
    if want("control") {
        let control = (|| -> Result<control::Control> {
            let builds = control::builds(&plan.control, &mut progress)?;
            let paper = control::paper_builds(&plan.control, 65537, &mut progress)?;
            let ns = Netns::new("lbdb-ctl")?;
            let applies = sys::in_ns(&ns.name, None, || control::applies(&plan.control, &mut progress))??;
            drop(ns);
            let health_checks = match health::run_all(&plan.health, &mut progress) {
                Ok(h) => Some(h),
                Err(e) => {
                    report.errors.push(format!("health-check load: {e:#}"));
                    None
                }
            };
            Ok(control::Control {
                maglev_threads: lb_userspace::maglev::Maglev::new(65537)?.threads(),
                builds,
                paper,
                applies,
                health_checks,
            })
        })();
        match control {
            Ok(c) => report.control = Some(c),
            Err(e) => report.errors.push(format!("control plane: {e:#}")),
        }
    }

    if lb_tests::rig::stopped() {
        bail!("interrupted: no report written; what the run had set up is removed");
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.judge_goals();
    report.sanity();
    report
        .write(&out)
        .with_context(|| format!("writing the report into {}", out.display()))?;
    eprintln!(
        "bench: done in {:.0} s: {}",
        report.seconds,
        out.join("report.md").display()
    );
    for g in &report.goals {
        eprintln!(
            "bench: goal {}: {} — {} ({})",
            if g.met { "met   " } else { "MISSED" },
            g.goal,
            g.measured,
            g.target
        );
    }
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.ok).collect();
    for c in &failed {
        eprintln!("bench: sanity check FAILED: {} — {}", c.check, c.detail);
    }
    if !failed.is_empty() {
        bail!(
            "{} sanity check(s) failed; see {}",
            failed.len(),
            out.join("report.md").display()
        );
    }
    Ok(())
}
