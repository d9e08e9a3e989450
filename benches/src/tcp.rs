//! Part 2b: end-to-end TCP with real sockets. The rig (tests/src/rig.rs: client, director running
//! `lbd`, nginx backends on one bridge, all in namespaces) and wrk from the client: HTTP through
//! the VIP (director, DSR) against the same nginx addressed directly.

use std::{net::IpAddr, process::Command};

use anyhow::{bail, Context, Result};
use lb_tests::rig::{self, Rig};
use serde::Serialize;

use crate::sys::Progress;

#[derive(Clone, Debug)]
pub struct Params {
    pub seconds: u32,
    pub connections: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct WrkRun {
    /// "through the director (VIP)" or "direct to the backend".
    pub path: String,
    pub url: String,
    /// "keep-alive" or "new connection per request".
    pub connections: String,
    pub requests: u64,
    pub requests_per_sec: f64,
    pub latency_p50_ms: f64,
    pub latency_p90_ms: f64,
    pub latency_p99_ms: f64,
    pub socket_errors: String,
    pub non_2xx: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Tcp {
    pub runs: Vec<WrkRun>,
    pub setup: String,
}

fn to_ms(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let x: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => x / 1e3,
        "ms" => x,
        "s" => x * 1e3,
        "m" => x * 60e3,
        _ => return None,
    })
}

fn parse_wrk(out: &str) -> Result<(u64, f64, f64, f64, f64, String, u64)> {
    let mut requests = None;
    let mut rps = None;
    let mut pct = std::collections::HashMap::new();
    let mut errors = "none".to_string();
    let mut non2xx = 0;
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if t.contains(" requests in ") {
            requests = t.split_whitespace().next().and_then(|n| n.parse::<u64>().ok());
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            errors = v.trim().to_string();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            non2xx = v.trim().parse().unwrap_or(0);
        } else if let Some((p, v)) = t.split_once('%') {
            if let (Ok(p), Some(ms)) = (p.trim().parse::<u32>(), to_ms(v)) {
                pct.insert(p, ms);
            }
        }
    }
    let requests = requests.context("no request count in wrk's output")?;
    let rps = rps.context("no Requests/sec in wrk's output")?;
    let get = |p: u32| pct.get(&p).copied().unwrap_or(f64::NAN);
    Ok((requests, rps, get(50), get(90), get(99), errors, non2xx))
}

fn wrk(rig: &Rig, p: &Params, url: &str, close: bool) -> Result<String> {
    let secs = p.seconds.to_string();
    let conns = p.connections.to_string();
    let limit = (p.seconds + 15).to_string();
    let mut args = vec!["timeout", &limit, "wrk", "-t1", "-c", &conns, "-d", &secs, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    rig.client.exec(&args).with_context(|| format!("wrk {url}"))
}

pub fn run_all(p: &Params, progress: &mut Progress) -> Result<Tcp> {
    if Command::new("wrk").arg("--version").output().is_err() {
        bail!("wrk is not installed (cargo xtask setup installs it)");
    }
    progress.step("tcp: rig up (client, director with lbd, 3 nginx backends)")?;
    let mut rig = Rig::up("lbdbr", 3)?;
    // One VIP whose only real server is backend 1, so both paths reach the same nginx.
    let be1 = IpAddr::V4(rig::backend_v4(0));
    let vip = IpAddr::V4(rig::VIP_V4);
    let config = rig.work.join("bench.toml");
    std::fs::write(
        &config,
        rig::custom_config(&rig.socket, "native", &[(vip, rig::HTTP_PORT, "tcp", vec![be1])]),
    )?;
    rig.use_config(&config)?;
    rig.start_lbd()?;
    let mut runs = Vec::new();
    for close in [false, true] {
        for (path, target) in [("through the director (VIP)", vip), ("direct to the backend", be1)] {
            let url = format!("http://{target}/");
            let kind = if close {
                "new connection per request"
            } else {
                "keep-alive"
            };
            progress.step(&format!("tcp: wrk {}s, {kind}, {path}", p.seconds))?;
            let out = wrk(&rig, p, &url, close)?;
            let (requests, rps, p50, p90, p99, errors, non2xx) =
                parse_wrk(&out).with_context(|| format!("parsing wrk's output:\n{out}"))?;
            runs.push(WrkRun {
                path: path.into(),
                url,
                connections: kind.into(),
                requests,
                requests_per_sec: rps,
                latency_p50_ms: p50,
                latency_p90_ms: p90,
                latency_p99_ms: p99,
                socket_errors: errors,
                non_2xx: non2xx,
            });
        }
    }
    Ok(Tcp {
        runs,
        setup: format!(
            "rig namespaces lbdbr-*: wrk -t1 -c{} -d{}s from the client; lbd (native XDP) on the director; nginx (1 worker) on backend 1; the VIP's only real server is backend 1",
            p.connections, p.seconds
        ),
    })
}
