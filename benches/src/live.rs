//! Part 2: the live packet path in network namespaces.
//!
//! ```text
//!  lbdb-gen                  lbdb-dir                                 lbdb-sink
//!  bench_gen ─ lbbg ══ veth ══ lbbi [lbd_xdp | bench_redirect] ─→ lbbo ══ veth ══ lbbs [bench_sink]
//!  (test_run live frames)      native XDP, XDP_REDIRECT through a devmap                count, drop
//! ```
//!
//! The generator is `BPF_PROG_TEST_RUN` in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, the
//! mechanism of xdp-trafficgen; this kernel has no pktgen): the kernel builds real frames from a
//! template, `bench_gen` rewrites each one's source address (`flows` distinct flows) and transmits
//! it with `XDP_TX` on `lbbg`, so it arrives on the director's `lbbi` as from a NIC.
//!
//! Generator, director and sink run in series on one CPU, like pktgen into a veth: the veth
//! receive of `lbbi` (and then of `lbbs`) is a softirq raised by the sending CPU and run when the
//! generator's batch of 64 ends. Nothing is dropped on the way (the veth ring holds 256 frames),
//! so the delivered rate is what one core does for the whole pipeline, and lbd's extra cost per
//! packet over a redirect-only director is `1/rate(lbd) − 1/rate(baseline)`. A director NAPI
//! thread on the other CPU was tried: with interrupt-driven wake-ups the veth ring overflows
//! while the thread wakes (most frames are lost, for any program), and this kernel has no
//! busy-polling NAPI threads.
//!
//! XDP_TX mode (backends behind the ingress interface, the one-arm setup of the rig) runs the
//! same way with the sink program on the generator's `lbbg`, against `bench_swap_tx`.
//!
//! Every run is bounded by its packet count; frames only travel between these namespaces (all
//! addresses in 198.18.0.0/15), which are deleted on drop, and IPv6 is off on their interfaces
//! so that nothing but generated frames reaches the sink.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions};
use lb_common::reason;
use lb_tests::netns::Netns;
use lb_userspace::{
    config::Protocol,
    dataplane::{BackendSpec, Dataplane, ServiceSpec, VipAddr},
    xdp::{XdpDataplane, XdpOptions},
};
use serde::Serialize;

use crate::{
    progs::{Aux, Reasons, CFG_BASE, CFG_EGRESS, CFG_FAMILY, CFG_FLOWS},
    sys::{cpu_time, in_ns, kthreads, thread_cpu_time, Progress, Summary},
};

const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 100);
/// Sources: 198.18.0.0 + flow number (up to 100 000 flows stay inside 198.18.0.0/15).
const SRC_BASE: u32 = 0xc612_0000;
const GEN_MAC: [u8; 6] = [0x02, 0x62, 0, 0, 0, 1];
const DIR_IN_MAC: [u8; 6] = [0x02, 0x62, 0, 0, 0, 2];
const DIR_OUT_MAC: [u8; 6] = [0x02, 0x62, 0, 0, 0, 3];
const SINK_MAC: [u8; 6] = [0x02, 0x62, 0, 0, 0, 4];
const GEN_CPU: usize = 0;

#[derive(Clone, Debug)]
pub struct Params {
    /// Packets per measured run.
    pub packets: u32,
    pub flows: Vec<u32>,
    pub sizes: Vec<usize>,
    /// Rounds per (flows, size): each an lbd run and a baseline run back to back. Each program's
    /// best run is kept (the generator is the limit when other work shares its CPU).
    pub runs: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct LiveRun {
    /// "lbd" or the baseline's name.
    pub program: String,
    /// "redirect" (separate egress interface) or "tx" (back out of the ingress interface).
    pub mode: String,
    pub flows: u32,
    /// Frame length in bytes (Ethernet header and payload, no FCS).
    pub size: usize,
    pub sent: u64,
    pub delivered: u64,
    pub seconds: f64,
    /// Delivered packets per second, millions.
    pub mpps: f64,
    /// CPU time of the sending core per wall second (1.0 = one core busy): generator, director
    /// and sink together.
    pub cpu: f64,
    /// `cpu` per million packets per second delivered (cores per Mpps, whole pipeline).
    pub cpu_per_mpps: f64,
    /// Nanoseconds of CPU per delivered packet, whole pipeline.
    pub ns_per_packet: f64,
    /// lbd's counters during the run: new flows, connection-table hits, others.
    pub new_flows: u64,
    pub conntrack_hits: u64,
    pub other_reasons: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LivePair {
    pub mode: String,
    pub flows: u32,
    pub size: usize,
    /// lbd's best run and the baseline's (highest delivered rate); the three ratios below are
    /// theirs. A run slowed by other work does not count, but a change of the VM's speed between
    /// the two best runs does: `rounds` holds each round's own ratios.
    pub lbd: LiveRun,
    pub baseline: LiveRun,
    /// lbd's delivered rate / the baseline's.
    pub rate_ratio: f64,
    /// The baseline's CPU per packet / lbd's: lbd's rate as a share of the baseline's on one core.
    pub per_core_ratio: f64,
    /// lbd's CPU per packet minus the baseline's (ns): what lbd's program costs over a
    /// redirect-only director.
    pub extra_ns_per_packet: f64,
    pub rounds: Vec<LiveRound>,
}

impl LivePair {
    /// The median over the rounds of one of their ratios.
    pub fn round_median(&self, f: fn(&LiveRound) -> f64) -> f64 {
        Summary::of(&self.rounds.iter().map(f).collect::<Vec<_>>()).median
    }
}

/// One round: lbd's run and the baseline's, back to back, and their ratios.
#[derive(Clone, Debug, Serialize)]
pub struct LiveRound {
    pub rate_ratio: f64,
    pub per_core_ratio: f64,
    pub extra_ns_per_packet: f64,
    pub lbd: LiveRun,
    pub baseline: LiveRun,
}

impl LivePair {
    /// Every run of the pair, lbd's and the baseline's, in every round.
    pub fn runs(&self) -> impl Iterator<Item = &LiveRun> {
        self.rounds.iter().flat_map(|r| [&r.lbd, &r.baseline])
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Live {
    pub pairs: Vec<LivePair>,
    pub generator: String,
    pub notes: Vec<String>,
}

pub struct Topo {
    gen: Netns,
    dir: Netns,
    sink: Netns,
    gen_if: u32,
    egress_if: u32,
    ingress_if: u32,
}

fn ifindex(ns: &Netns, iface: &str) -> Result<u32> {
    Ok(ns
        .exec(&["cat", &format!("/sys/class/net/{iface}/ifindex")])?
        .trim()
        .parse()?)
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl Topo {
    pub fn up() -> Result<Topo> {
        let gen = Netns::new("lbdb-gen")?;
        let dir = Netns::new("lbdb-dir")?;
        let sink = Netns::new("lbdb-sink")?;
        for ns in [&gen, &dir, &sink] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        gen.ip(&[
            "link", "add", "lbbg", "type", "veth", "peer", "name", "lbbi", "netns", &dir.name,
        ])?;
        dir.ip(&[
            "link", "add", "lbbo", "type", "veth", "peer", "name", "lbbs", "netns", &sink.name,
        ])?;
        for (ns, iface, mac) in [
            (&gen, "lbbg", GEN_MAC),
            (&dir, "lbbi", DIR_IN_MAC),
            (&dir, "lbbo", DIR_OUT_MAC),
            (&sink, "lbbs", SINK_MAC),
        ] {
            ns.ip(&["link", "set", iface, "address", &mac_str(mac)])?;
            ns.ip(&["link", "set", iface, "up"])?;
        }
        Ok(Topo {
            gen_if: ifindex(&gen, "lbbg")?,
            egress_if: ifindex(&dir, "lbbo")?,
            ingress_if: ifindex(&dir, "lbbi")?,
            gen,
            dir,
            sink,
        })
    }
}

/// The frame template: TCP ACK to the VIP, padded to `size` bytes.
fn frame(size: usize) -> Vec<u8> {
    let header = 14 + 20 + 20;
    let payload = vec![0x5au8; size.saturating_sub(header)];
    let b = etherparse::PacketBuilder::ethernet2(GEN_MAC, DIR_IN_MAC)
        .ipv4(Ipv4Addr::from(SRC_BASE).octets(), VIP.octets(), 64)
        .tcp(40000, 80, 1001, 64240)
        .ack(5000);
    let mut out = Vec::with_capacity(size);
    b.write(&mut out, &payload).expect("write to vec");
    out
}

/// xdp_md for test_run's ctx_in: the frames "arrive" on (and XDP_TX leaves by) `ifindex`; the
/// kernel wants `data_end` = the frame's length.
fn xdp_md(ifindex: u32, len: usize) -> [u8; 24] {
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    md
}

/// The generator: `bench_gen` in live-frames mode on `lbbg`.
struct Generator {
    aux: Aux,
    ifindex: u32,
}

impl Generator {
    fn new(gen_if: u32) -> Result<Generator> {
        let mut aux = Aux::load(&["bench_gen"])?;
        aux.set_cfg(CFG_BASE, SRC_BASE)?;
        aux.set_cfg(CFG_FAMILY, 4)?;
        Ok(Generator { aux, ifindex: gen_if })
    }

    /// Sends `n` frames of `template` cycling through `flows` flows; returns the wall time and
    /// the CPU time of the sending thread, which includes the director's and the sink's receive
    /// (softirq on the same CPU). Runs on a thread inside the generator's namespace, pinned to
    /// `GEN_CPU`.
    fn send(&mut self, ns: &str, template: &[u8], flows: u32, n: u32) -> Result<(Duration, Duration)> {
        self.aux.set_cfg(CFG_FLOWS, flows)?;
        self.aux.reset_seq()?;
        let md = xdp_md(self.ifindex, template.len());
        let aux = &mut self.aux;
        let took = in_ns(ns, Some(GEN_CPU), move || -> Result<(Duration, Duration)> {
            let cpu0 = thread_cpu_time()?;
            let start = Instant::now();
            let res = aux
                .prog("bench_gen")
                .test_run(TestRunOptions {
                    data_in: Some(template),
                    ctx_in: Some(&md),
                    repeat: n,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..Default::default()
                })
                .context("BPF_PROG_TEST_RUN in live-frames mode")?;
            let wall = start.elapsed();
            // Live mode reports no return value; the sequence number counts the frames.
            let _ = res;
            Ok((wall, thread_cpu_time()? - cpu0))
        })??;
        let made = self.aux.seq()?;
        if made != n as u64 {
            bail!("the generator made {made} frames, not {n}");
        }
        Ok(took)
    }
}

/// What sits on the director's ingress interface during a run.
enum Director<'a> {
    Lbd(&'a mut XdpDataplane),
    Baseline(Aux),
}

fn lbd_services(topo: &Topo, backends: usize) -> Vec<ServiceSpec> {
    let reals = (0..backends)
        .map(|i| BackendSpec {
            addr: IpAddr::V4(Ipv4Addr::new(198, 19, 254, 1 + i as u8)),
            port: 80,
            weight: 1,
            mac: Some(SINK_MAC),
            ifindex: topo.egress_if,
            src_mac: DIR_OUT_MAC,
        })
        .collect();
    vec![ServiceSpec::new(
        VipAddr::new(IpAddr::V4(VIP), 80, Protocol::Tcp),
        reals,
    )]
}

fn lbd_services_tx(topo: &Topo, backends: usize) -> Vec<ServiceSpec> {
    let mut s = lbd_services(topo, backends);
    for b in &mut s[0].backends {
        b.ifindex = topo.ingress_if;
        b.src_mac = DIR_IN_MAC;
        b.mac = Some(GEN_MAC);
    }
    s
}

struct Measured {
    sent: u64,
    delivered: u64,
    secs: f64,
    cpu: f64,
    reasons: Option<Vec<u64>>,
}

impl Measured {
    /// Delivered packets per second, millions.
    fn mpps(&self) -> f64 {
        self.delivered as f64 / self.secs / 1e6
    }

    /// Nanoseconds of CPU per delivered packet (NaN if none was delivered).
    fn ns_per_packet(&self) -> f64 {
        if self.delivered > 0 {
            self.cpu * self.secs * 1e9 / self.delivered as f64
        } else {
            f64::NAN
        }
    }
}

/// The sink's count once it stopped growing (the frames in flight arrived); at most 5 s.
fn wait_quiet(sink: &mut Aux) -> Result<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = sink.sink()?.0;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = sink.sink()?.0;
        if now == last {
            return Ok(now);
        }
        if std::time::Instant::now() > deadline {
            bail!("the sink still counted new frames 5 s after the generator stopped ({now})");
        }
        last = now;
    }
}

fn measure(
    topo: &Topo,
    gen: &mut Generator,
    sink: &mut Aux,
    reasons: Option<&Reasons>,
    template: &[u8],
    flows: u32,
    packets: u32,
) -> Result<Measured> {
    // Warm-up: every flow once (fills lbd's connection table), then some more.
    gen.send(&topo.gen.name, template, flows, flows.max(1).saturating_add(20_000))?;
    let before = wait_quiet(sink)?;
    let r0 = reasons.map(|r| r.packets()).transpose()?;
    // Softirq work the kernel defers to ksoftirqd is part of the pipeline's CPU too.
    let ksoftirqd = kthreads(&format!("ksoftirqd/{GEN_CPU}")).first().copied();
    let k0 = ksoftirqd.map(cpu_time).transpose()?.unwrap_or_default();
    let (took, thread_cpu) = gen.send(&topo.gen.name, template, flows, packets)?;
    let k1 = ksoftirqd.map(cpu_time).transpose()?.unwrap_or_default();
    let cpu = thread_cpu + (k1 - k0);
    let after = wait_quiet(sink)?;
    let r1 = reasons.map(|r| r.packets()).transpose()?;
    let secs = took.as_secs_f64();
    let reasons = match (r0, r1) {
        (Some(a), Some(b)) => Some(b.iter().zip(&a).map(|(x, y)| x - y).collect()),
        _ => None,
    };
    Ok(Measured {
        sent: packets as u64,
        delivered: after - before,
        secs,
        cpu: cpu.as_secs_f64() / secs,
        reasons,
    })
}

fn to_run(program: &str, mode: &str, flows: u32, size: usize, m: &Measured) -> LiveRun {
    let mpps = m.mpps();
    let (new_flows, hits, other) = match &m.reasons {
        Some(r) => {
            let new = r[reason::NEW_FLOW as usize];
            let hit = r[reason::CONNTRACK_HIT as usize];
            (new, hit, r.iter().sum::<u64>() - new - hit)
        }
        None => (0, 0, 0),
    };
    LiveRun {
        program: program.to_string(),
        mode: mode.to_string(),
        flows,
        size,
        sent: m.sent,
        delivered: m.delivered,
        seconds: m.secs,
        mpps,
        cpu: m.cpu,
        cpu_per_mpps: if mpps > 0.0 { m.cpu / mpps } else { f64::NAN },
        ns_per_packet: m.ns_per_packet(),
        new_flows,
        conntrack_hits: hits,
        other_reasons: other,
    }
}

fn best(runs: Vec<Measured>) -> Measured {
    runs.into_iter()
        .max_by(|a, b| a.mpps().total_cmp(&b.mpps()))
        .expect("one run")
}

/// Runs the whole live matrix.
pub fn run_all(p: &Params, progress: &mut Progress) -> Result<Live> {
    let topo = Topo::up()?;
    let mut notes = Vec::new();

    // lbd, loaded once; attached and detached around its runs.
    let mut dp = XdpDataplane::load(XdpOptions {
        table_size: 65537,
        max_vips: 4,
        max_backends: 64,
        conntrack_size: lb_common::DEFAULT_CONNTRACK_SIZE,
        log_level: 0,
        keep: None,
    })?;
    let services = lbd_services(&topo, 10);
    {
        let (dpr, services) = (&mut dp, services.clone());
        in_ns(&topo.dir.name, None, move || dpr.apply(&services))??;
    }
    let reasons = Reasons::of(&mut dp, &[services[0].vip])?;

    let mut sink = Aux::load(&["bench_sink"])?;
    in_ns(&topo.sink.name, None, || sink.attach("bench_sink", "lbbs"))??;
    let mut gen = Generator::new(topo.gen_if)?;

    let mut pairs = Vec::new();
    for &size in &p.sizes {
        let template = frame(size);
        for &flows in &p.flows {
            progress.step(&format!(
                "live: redirect path, {flows} flows, {size}-byte frames, lbd and redirect-only"
            ))?;
            let pair = measure_pair(&topo, &mut dp, &mut gen, &mut sink, &reasons, "redirect", "bench_redirect", &template, flows, size, p)?;
            let lbd = &pair.lbd;
            if lbd.other_reasons != 0 {
                notes.push(format!(
                    "{flows} flows, {size} B: lbd counted {} packets under other reasons",
                    lbd.other_reasons
                ));
            }
            pairs.push(pair);
        }
    }
    drop(sink);

    // XDP_TX mode: back out of the ingress interface to the generator's side.
    {
        let size = p.sizes[0];
        let flows = p.flows[p.flows.len().min(2) - 1];
        progress.step(&format!(
            "live: XDP_TX path, {flows} flows, {size}-byte frames, lbd and swap-MAC+XDP_TX"
        ))?;
        let services = lbd_services_tx(&topo, 10);
        let dpr = &mut dp;
        in_ns(&topo.dir.name, None, move || dpr.apply(&services))??;
        let mut sink = Aux::load(&["bench_sink"])?;
        in_ns(&topo.gen.name, None, || sink.attach("bench_sink", "lbbg"))??;
        let template = frame(size);
        pairs.push(measure_pair(&topo, &mut dp, &mut gen, &mut sink, &reasons, "tx", "bench_swap_tx", &template, flows, size, p)?);
    }

    Ok(Live {
        pairs,
        generator: format!("BPF_PROG_TEST_RUN live frames (bench_gen, batch 64), {} packets per run, best of {} runs each, in rounds of an lbd run and a baseline run back to back (order swapped each round); generator, director and sink in series on CPU {GEN_CPU}", p.packets, p.runs),
        notes,
    })
}

/// lbd and `baseline` on the director in `mode` ("redirect" or "tx"), `p.runs` rounds of one run
/// each, back to back, the order swapped every round (this VM's speed drifts by ±20 % over seconds:
/// back-to-back blocks of runs put the drift into the ratio). The pair's figures are each
/// program's best run (short stalls, which are frequent here, slow single runs); the rounds'
/// own ratios are kept too (a change of speed between the best runs shows there).
#[allow(clippy::too_many_arguments)]
fn measure_pair(
    topo: &Topo,
    dp: &mut XdpDataplane,
    gen: &mut Generator,
    sink: &mut Aux,
    reasons: &Reasons,
    mode: &str,
    baseline: &str,
    template: &[u8],
    flows: u32,
    size: usize,
    p: &Params,
) -> Result<LivePair> {
    let programs = ["lbd", baseline];
    let mut runs: [Vec<Measured>; 2] = Default::default();
    let mut rounds = Vec::new();
    for round in 0..p.runs {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let which = programs[i];
            let director = attach_director(topo, which, dp, mode)?;
            let r = (which == "lbd").then_some(reasons);
            runs[i].push(measure(topo, gen, sink, r, template, flows, p.packets)?);
            detach_director(topo, director)?;
        }
        let (l, b) = (&runs[0][round], &runs[1][round]);
        rounds.push(LiveRound {
            rate_ratio: l.mpps() / b.mpps(),
            per_core_ratio: b.ns_per_packet() / l.ns_per_packet(),
            extra_ns_per_packet: l.ns_per_packet() - b.ns_per_packet(),
            lbd: to_run("lbd", mode, flows, size, l),
            baseline: to_run(baseline, mode, flows, size, b),
        });
    }
    let [lbd, baseline_runs] = runs;
    let lbd = to_run("lbd", mode, flows, size, &best(lbd));
    let baseline = to_run(baseline, mode, flows, size, &best(baseline_runs));
    Ok(LivePair {
        mode: mode.into(),
        flows,
        size,
        rate_ratio: lbd.mpps / baseline.mpps,
        per_core_ratio: baseline.ns_per_packet / lbd.ns_per_packet,
        extra_ns_per_packet: lbd.ns_per_packet - baseline.ns_per_packet,
        lbd,
        baseline,
        rounds,
    })
}

fn attach_director<'a>(topo: &Topo, which: &str, dp: &'a mut XdpDataplane, mode: &str) -> Result<Director<'a>> {
    if which == "lbd" {
        in_ns(&topo.dir.name, None, || dp.attach("lbbi", true))??;
        return Ok(Director::Lbd(dp));
    }
    let mut aux = Aux::load(&[which])?;
    if mode == "redirect" {
        in_ns(&topo.dir.name, None, || -> Result<()> {
            aux.add_port(topo.egress_if)?;
            aux.set_cfg(CFG_EGRESS, topo.egress_if)?;
            aux.attach(which, "lbbi")
        })??;
    } else {
        in_ns(&topo.dir.name, None, || aux.attach(which, "lbbi"))??;
    }
    Ok(Director::Baseline(aux))
}

fn detach_director(_topo: &Topo, director: Director<'_>) -> Result<()> {
    match director {
        Director::Lbd(dp) => dp.detach().context("detaching lbd")?,
        Director::Baseline(aux) => drop(aux),
    }
    Ok(())
}
