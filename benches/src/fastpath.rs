//! Part 1: the XDP program's cost per packet with `BPF_PROG_TEST_RUN` and a large repeat count.
//!
//! test_run runs the program `repeat` times on ONE buffer and reports the mean time per run. That
//! is sound for cases whose every run takes the same path on the same input (a connection-table
//! hit, a non-VIP packet), provided the counters prove it: after each run the per-reason counter
//! of the intended case must have grown by exactly `repeat` and no other.
//!
//! It is not sound for a new flow: the first run inserts the connection and every later run is a
//! hit. For those cases each run goes through `bench_vary` (lb-ebpf/src/aux.rs) first, which
//! rewrites the source address from a per-CPU sequence number (a never-seen flow every run) and
//! tail-calls the program under test. The same wrapper tail-calling the `XDP_TX` program is
//! measured in the same round, and the case's cost is `floor + (vary→lbd − vary→XDP_TX)`: the
//! wrapper, the tail call and the harness cancel out. The new-flow counter must grow by exactly
//! `repeat`. The method is checked against the direct one on a case both can measure (hits on one
//! flow), and the report shows both.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::reason;
use lb_tests::packets::{tcp4_ack, tcp4_syn, tcp6_ack, tcp6_syn, udp4, Flow4, Flow6};
use lb_userspace::{
    config::Protocol,
    dataplane::{BackendSpec, Dataplane, ServiceSpec, VipAddr},
    xdp::{XdpDataplane, XdpOptions},
};
use serde::Serialize;

use crate::{
    progs::{check_reason_counts, check_reasons, Aux, Reasons, CFG_BASE, CFG_FAMILY, CFG_FLOWS, XDP_PASS, XDP_TX},
    sys::{Progress, Summary},
};

pub const TABLE_SIZE: u32 = 65537;

/// Addresses of the test_run frames. They are never transmitted (test_run without live frames
/// only runs the program); all are in the benchmarking range 198.18.0.0/15 and 2001:2::/48.
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const UDP_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
const NOT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x100);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
/// Source-address words the varied cases start from (host order); distinct per case so that a
/// "new" flow of one case is never a flow of another.
const BASE_TCP_NEW: u32 = 0x6440_0000; // 100.64.0.0
const BASE_UDP_NEW: u32 = 0x6450_0000; // 100.80.0.0
const BASE_V6_NEW: u32 = 0x0001_0000;
const BASE_HIT: u32 = 0x6460_0000; // 100.96.0.0
const BASE_FULL: u32 = 0x6470_0000; // 100.112.0.0

/// `BPF_PROG_TEST_RUN` runs the program as if the frame arrived on the namespace's loopback
/// (ifindex 1): backends "on" ifindex 1 are answered with `XDP_TX`, like a one-arm director.
const INGRESS: u32 = 1;
const SRC_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 1];

/// The i-th TCP VIP (i < 65 000).
fn tcp_vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 100 + (i / 250) as u8, 1 + (i % 250) as u8)
}

fn backends(n: usize, port: u16) -> Vec<BackendSpec> {
    (0..n)
        .map(|i| BackendSpec {
            addr: IpAddr::V4(Ipv4Addr::new(198, 19, (i / 250) as u8, 1 + (i % 250) as u8)),
            port,
            // Weighted: 1, 2, 3, 4, 1, ...
            weight: 1 + (i % 4) as u32,
            mac: Some([0x02, 0xbe, 0, 0, (i >> 8) as u8, i as u8]),
            ifindex: INGRESS,
            src_mac: SRC_MAC,
        })
        .collect()
}

fn service(addr: IpAddr, port: u16, protocol: Protocol, n: usize) -> ServiceSpec {
    ServiceSpec::new(VipAddr::new(addr, port, protocol), backends(n, port))
}

/// Only the `vips` TCP VIPs (for the control-plane timings).
pub fn tcp_services(n: usize, vips: usize) -> Vec<ServiceSpec> {
    (0..vips)
        .map(|i| service(IpAddr::V4(tcp_vip(i)), 80, Protocol::Tcp, n))
        .collect()
}

/// The services of a setup: `vips` TCP VIPs on port 80, one UDP VIP, one IPv6 VIP, each with
/// `n` weighted backends.
pub fn services(n: usize, vips: usize) -> Vec<ServiceSpec> {
    let mut v: Vec<ServiceSpec> = (0..vips)
        .map(|i| service(IpAddr::V4(tcp_vip(i)), 80, Protocol::Tcp, n))
        .collect();
    v.push(service(IpAddr::V4(UDP_VIP), 53, Protocol::Udp, n));
    v.push(service(IpAddr::V6(VIP6), 443, Protocol::Tcp, n));
    v
}

/// The VIPs the cases send to (of `services(_, vips)`): the last TCP VIP, the UDP VIP and the
/// IPv6 VIP.
fn case_vips(vips: usize) -> [VipAddr; 3] {
    [
        VipAddr::new(IpAddr::V4(tcp_vip(vips - 1)), 80, Protocol::Tcp),
        VipAddr::new(IpAddr::V4(UDP_VIP), 53, Protocol::Udp),
        VipAddr::new(IpAddr::V6(VIP6), 443, Protocol::Tcp),
    ]
}

/// Entries of the connection table in the "new flows into a full table" case (fits in the cache).
const FULL_TABLE: u32 = 65536;
// The full-table cases' labels say these sizes.
const _: () = assert!(FULL_TABLE == 65_536 && lb_common::DEFAULT_CONNTRACK_SIZE == 262_144);

pub fn load(n: usize, vips: usize, conntrack: u32) -> Result<XdpDataplane> {
    let total_vips = vips as u32 + 2;
    XdpDataplane::load(XdpOptions {
        table_size: TABLE_SIZE,
        max_vips: total_vips,
        max_backends: n as u32 * total_vips,
        conntrack_size: conntrack,
        log_level: 0,
        keep: None,
    })
    .context("loading lbd's XDP program")
}

#[derive(Clone, Debug)]
pub struct Params {
    pub rounds: usize,
    /// Repeats per test_run call for direct cases.
    pub repeat: u32,
    /// Repeats per call for cases that insert flows (bounded by the connection table).
    pub repeat_new: u32,
    /// (backends, VIPs) combinations.
    pub setups: Vec<(usize, usize)>,
    /// Flow counts for the connection-table-hit scaling line (on `base_setup`).
    pub flows: Vec<u32>,
    pub base_setup: (usize, usize),
}

#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    /// Machine name: tcp-new, tcp-hit, udp-hit, udp-new, not-vip, v6-new, v6-hit, ...
    pub case: String,
    pub label: String,
    pub backends: usize,
    pub vips: usize,
    /// Distinct flows the repeats cycle through; 0 = every repeat is a new flow.
    pub flows: u64,
    /// "direct" (repeat on one buffer) or "varied" (through bench_vary, see the module doc).
    pub method: String,
    pub repeat: u32,
    pub verdict: u32,
    /// The counter that grew by exactly `repeat` per call.
    pub counted_as: String,
    pub ns: Summary,
    /// Median `XDP_TX` floor of the same setup.
    pub floor_ns: f64,
    /// The `XDP_TX` floor of each round, measured beside the case: `floor_ns` is their median.
    pub floor_rounds_ns: Vec<f64>,
    /// Varied cases, each round: the wrapper → lbd call and the wrapper → `XDP_TX` call beside it
    /// (ns per packet, as test_run gave them); `ns` is the round's floor + (raw − wrapper floor).
    /// Empty for direct cases, whose `ns` samples are test_run's own figures.
    pub raw_ns: Vec<f64>,
    pub vary_floor_ns: Vec<f64>,
    pub ratio: f64,
}

/// One measurement of a case: ns per packet, and for varied cases the two raw figures it is
/// derived from (wrapper → lbd, wrapper → `XDP_TX`).
struct Measured {
    ns: f64,
    raw: Option<(f64, f64)>,
}

/// A case's rounds, gathered into its [`CaseResult`] figures.
#[derive(Default)]
struct Rounds {
    ns: Vec<f64>,
    raw: Vec<f64>,
    vary_floor: Vec<f64>,
}

impl Rounds {
    fn push(&mut self, m: Measured) {
        self.ns.push(m.ns);
        if let Some((raw, vfloor)) = m.raw {
            self.raw.push(raw);
            self.vary_floor.push(vfloor);
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProgInfo {
    pub verified_insns: Option<u32>,
    pub xlated_bytes: Option<u32>,
    pub jited_bytes: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct FastPath {
    /// `bench_tx` (returns XDP_TX), all rounds of all setups.
    pub floor: Summary,
    /// `bench_swap_tx` (swap MACs, XDP_TX).
    pub swap_mac: Summary,
    /// `bench_vary` + tail call to `bench_tx`: what the varied method subtracts.
    pub vary_floor: Summary,
    /// `bench_maps_hit`: a kernel LRU hash lookup with a 16-byte key that hits (what an IPv4
    /// connection-table hit cost when the tables were LRU hashes).
    pub maps_hit: Summary,
    /// `bench_maps_new`: an LRU miss, a hash lookup and an LRU insert (an IPv4 new flow's map work
    /// with LRU connection tables).
    pub maps_new: Summary,
    /// `bench_maps_new_pcpu`: the same with per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`).
    pub maps_new_pcpu: Summary,
    pub cases: Vec<CaseResult>,
    pub program: ProgInfo,
    pub table_size: u32,
    pub conntrack_size: u32,
}

/// One test_run call: (verdict, ns per run).
fn run(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<(u32, f64)> {
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok((res.return_value, res.duration.as_nanos() as f64))
}

/// A case measured on lbd's program.
struct Case {
    case: &'static str,
    label: &'static str,
    frame: Vec<u8>,
    verdict: u32,
    reason: u32,
    /// None = direct; Some((flows, base, family)) = through bench_vary.
    vary: Option<(u32, u32, u32)>,
    /// Start each round where the previous one stopped (`base + round * repeat`), so that every
    /// repeat of every round is a flow never seen before; otherwise every round cycles through
    /// the same `flows` flows.
    advance: bool,
    repeat: u32,
}

struct Bench {
    aux: Aux,
    /// bench_maps_hit / bench_maps_new, with `BENCH_LRU` sized like lbd's connection table.
    maps: Aux,
    /// bench_vary → lbd (BENCH_JUMP[0] = lbd_xdp).
    vary_lbd: Aux,
    /// bench_vary → bench_tx.
    vary_tx: Aux,
}

impl Bench {
    fn new(dp: &mut XdpDataplane, conntrack: u32) -> Result<Bench> {
        let aux = Aux::load(&["bench_tx", "bench_swap_tx"])?;
        let mut maps = Aux::load_sized(&["bench_maps_hit", "bench_maps_new", "bench_maps_new_pcpu"], conntrack)?;
        maps.fill_bench_maps()?;
        maps.set_cfg(CFG_BASE, 0x1000)?;
        let mut vary_lbd = Aux::load(&["bench_vary"])?;
        let lbd_fd = dp.program().fd()?.try_clone()?;
        vary_lbd.set_jump(&lbd_fd)?;
        let mut vary_tx = Aux::load(&["bench_vary", "bench_tx"])?;
        let tx_fd = vary_tx.prog_fd("bench_tx")?;
        vary_tx.set_jump(&tx_fd)?;
        Ok(Bench {
            aux,
            maps,
            vary_lbd,
            vary_tx,
        })
    }

    /// Sets the wrapper's flow pattern and restarts its sequence at 0.
    fn configure(aux: &mut Aux, flows: u32, base: u32, family: u32) -> Result<()> {
        aux.set_cfg(CFG_FLOWS, flows)?;
        aux.set_cfg(CFG_BASE, base)?;
        aux.set_cfg(CFG_FAMILY, family)?;
        aux.reset_seq()
    }

    /// The floor through the wrapper, configured like `case`.
    fn vary_floor(&mut self, frame: &[u8], vary: (u32, u32, u32), repeat: u32) -> Result<f64> {
        Self::configure(&mut self.vary_tx, vary.0, vary.1, vary.2)?;
        let (v, ns) = run(self.vary_tx.prog("bench_vary"), frame, repeat)?;
        if v != XDP_TX {
            bail!("bench_vary → bench_tx returned {v}, not XDP_TX (tail call failed?)");
        }
        Ok(ns)
    }

    /// Measures `case` once: its cost in ns per packet (derived for varied cases).
    fn measure(
        &mut self,
        dp: &mut XdpDataplane,
        reasons: &Reasons,
        case: &Case,
        floor: f64,
        round: usize,
    ) -> Result<Measured> {
        let before = reasons.packets()?;
        let (verdict, ns, raw) = match case.vary {
            None => {
                let (v, ns) = run(dp.program(), &case.frame, case.repeat)?;
                (v, ns, None)
            }
            Some((flows, mut base, family)) => {
                if case.advance {
                    base += round as u32 * case.repeat;
                }
                Self::configure(&mut self.vary_lbd, flows, base, family)?;
                let (v, ns) = run(self.vary_lbd.prog("bench_vary"), &case.frame, case.repeat)?;
                let vfloor = self.vary_floor(&case.frame, (flows, base, family), case.repeat)?;
                (v, floor + (ns - vfloor), Some((ns, vfloor)))
            }
        };
        if verdict != case.verdict {
            bail!(
                "{}: the program returned {verdict}, expected {}",
                case.label,
                case.verdict
            );
        }
        check_reasons(
            &before,
            &reasons.packets()?,
            case.reason,
            case.repeat as u64,
            case.label,
        )?;
        Ok(Measured { ns, raw })
    }
}

fn floor_once(aux: &mut Aux, name: &str, frame: &[u8], repeat: u32) -> Result<f64> {
    let (v, ns) = run(aux.prog(name), frame, repeat)?;
    if v != XDP_TX {
        bail!("{name} returned {v}, not XDP_TX");
    }
    Ok(ns)
}

fn tcp_flow(vip: Ipv4Addr) -> Flow4 {
    Flow4 {
        src: CLIENT,
        dst: vip,
        sport: 40000,
        dport: 80,
    }
}

/// Runs every setup. Must be called inside a private network namespace (lbd's dataplane adds
/// ifindex 1 to its devmap).
pub fn run_all(p: &Params, progress: &mut Progress) -> Result<FastPath> {
    let mut cases = Vec::new();
    let mut floor_all = Vec::new();
    let mut swap_all = Vec::new();
    let mut vary_all = Vec::new();
    let mut maps_hit_all = Vec::new();
    let mut maps_new_all = Vec::new();
    let mut maps_pcpu_all = Vec::new();
    let mut program = None;
    // Every repeat of a new-flow case inserts a connection: size the table for all of them.
    let new_cases = 3u64;
    // Sets have CT_WAYS ways: a set holding that many established flows loses one to the next
    // new flow that lands in it. 32 entries per established flow keeps about one in four sets
    // with one, so over the run no set should hold eight (expected count of such sets < 1e-4).
    let established = p.flows.iter().map(|&k| k as u64).sum::<u64>();
    let conntrack = ((p.rounds as u64 * p.repeat_new as u64 * new_cases + 200_000)
        .max(established * 32)
        .next_power_of_two())
    .max(1 << 20) as u32;

    let mut setups = p.setups.clone();
    if !setups.contains(&p.base_setup) {
        setups.push(p.base_setup);
    }
    for &(n, vips) in &setups {
        progress.step(&format!(
            "test_run: loading lbd with {n} backends × {} VIPs (M = {TABLE_SIZE})",
            vips + 2
        ))?;
        let mut dp = load(n, vips, conntrack)?;
        dp.apply(&services(n, vips)).context("programming the setup")?;
        let info = dp.program().info()?;
        program.get_or_insert(ProgInfo {
            verified_insns: info.verified_instruction_count(),
            xlated_bytes: info.size_translated(),
            jited_bytes: info.size_jitted(),
        });
        let reasons = Reasons::of(&mut dp, &case_vips(vips))?;
        let mut bench = Bench::new(&mut dp, conntrack)?;

        let vip = tcp_vip(vips - 1);
        let f = tcp_flow(vip);
        let syn = tcp4_syn(f);
        let ack = tcp4_ack(f, b"");
        let udp = udp4(
            Flow4 {
                dst: UDP_VIP,
                dport: 53,
                ..f
            },
            b"0123456789",
        );
        let f6 = Flow6 {
            src: CLIENT6,
            dst: VIP6,
            sport: 40000,
            dport: 443,
        };
        let syn6 = tcp6_syn(f6);
        let not_vip = tcp4_ack(Flow4 { dst: NOT_VIP, ..f }, b"");

        // Establish the flows the direct hit cases repeat.
        for frame in [&syn, &udp, &syn6] {
            let (v, _) = run(dp.program(), frame, 1)?;
            if v != XDP_TX {
                bail!("establishing a flow: verdict {v}");
            }
        }

        let mut list = vec![
            Case {
                case: "tcp-new",
                label: "TCP SYN, new flow (hash, table lookup, connection insert)",
                frame: syn.clone(),
                verdict: XDP_TX,
                reason: reason::NEW_FLOW,
                vary: Some((0, BASE_TCP_NEW, 4)),
                advance: true,
                repeat: p.repeat_new,
            },
            Case {
                case: "tcp-hit",
                label: "TCP ACK, established flow (connection-table hit)",
                frame: ack.clone(),
                verdict: XDP_TX,
                reason: reason::CONNTRACK_HIT,
                vary: None,
                advance: false,
                repeat: p.repeat,
            },
            Case {
                case: "udp-hit",
                label: "UDP to a VIP, known flow",
                frame: udp.clone(),
                verdict: XDP_TX,
                reason: reason::CONNTRACK_HIT,
                vary: None,
                advance: false,
                repeat: p.repeat,
            },
            Case {
                case: "udp-new",
                label: "UDP to a VIP, new flow",
                frame: udp.clone(),
                verdict: XDP_TX,
                reason: reason::NEW_FLOW,
                vary: Some((0, BASE_UDP_NEW, 4)),
                advance: true,
                repeat: p.repeat_new,
            },
            Case {
                case: "not-vip",
                label: "TCP to a non-VIP address (XDP_PASS)",
                frame: not_vip.clone(),
                verdict: XDP_PASS,
                reason: reason::NOT_VIP,
                vary: None,
                advance: false,
                repeat: p.repeat,
            },
            Case {
                case: "v6-new",
                label: "IPv6 TCP SYN to a VIP, new flow",
                frame: syn6.clone(),
                verdict: XDP_TX,
                reason: reason::NEW_FLOW,
                vary: Some((0, BASE_V6_NEW, 6)),
                advance: true,
                repeat: p.repeat_new,
            },
            Case {
                case: "v6-hit",
                label: "IPv6 TCP to a VIP, established flow",
                frame: tcp6_ack(f6, b""),
                verdict: XDP_TX,
                reason: reason::CONNTRACK_HIT,
                vary: None,
                advance: false,
                repeat: p.repeat,
            },
        ];

        if (n, vips) == p.base_setup {
            // Hits spread over K established flows (the flows scaling line); K = 1 through the
            // wrapper is the method check against the direct tcp-hit.
            for &k in &p.flows {
                let label = format!("prefilling {k} flows");
                let before = reasons.packets()?;
                Bench::configure(&mut bench.vary_lbd, k, BASE_HIT + k * 0x10, 4)?;
                // Two packets per flow, as an established flow has seen: the first inserts it, the
                // second marks it used, so the new flows of the other cases replace entries that
                // never saw a second packet first (conntrack.rs) and these flows stay.
                let (v, _) = run(bench.vary_lbd.prog("bench_vary"), &ack, 2 * k)?;
                if v != XDP_TX {
                    bail!("{label}: verdict {v}");
                }
                check_reason_counts(
                    &before,
                    &reasons.packets()?,
                    &[(reason::NEW_FLOW, k as u64), (reason::CONNTRACK_HIT, k as u64)],
                    &label,
                )?;
                list.push(Case {
                    case: "tcp-hit-flows",
                    label: "TCP ACK, established flow, cycling through K flows",
                    frame: ack.clone(),
                    verdict: XDP_TX,
                    reason: reason::CONNTRACK_HIT,
                    vary: Some((k, BASE_HIT + k * 0x10, 4)),
                    advance: false,
                    repeat: p.repeat.max(k),
                });
            }
        }

        let mut samples: Vec<Rounds> = list.iter().map(|_| Rounds::default()).collect();
        let mut floors = Vec::new();
        progress.step(&format!(
            "test_run: {} cases × {} rounds, {n} backends × {vips} VIPs",
            list.len(),
            p.rounds
        ))?;
        for round in 0..p.rounds {
            // Interleaved: the floor of this round, then each case.
            let floor = floor_once(&mut bench.aux, "bench_tx", &ack, p.repeat)?;
            floors.push(floor);
            swap_all.push(floor_once(&mut bench.aux, "bench_swap_tx", &ack, p.repeat)?);
            vary_all.push(bench.vary_floor(&ack, (0, BASE_TCP_NEW, 4), p.repeat)?);
            maps_hit_all.push(floor_once(&mut bench.maps, "bench_maps_hit", &ack, p.repeat)?);
            maps_new_all.push(floor_once(&mut bench.maps, "bench_maps_new", &ack, p.repeat_new)?);
            maps_pcpu_all.push(floor_once(&mut bench.maps, "bench_maps_new_pcpu", &ack, p.repeat_new)?);
            for (i, case) in list.iter().enumerate() {
                samples[i].push(bench.measure(&mut dp, &reasons, case, floor, round)?);
            }
        }
        let floor_med = Summary::of(&floors).median;
        for (case, s) in list.iter().zip(samples) {
            let ns = Summary::of(&s.ns);
            cases.push(CaseResult {
                case: case.case.to_string(),
                label: case.label.to_string(),
                backends: n,
                vips,
                flows: case.vary.map(|v| v.0 as u64).unwrap_or(1),
                method: if case.vary.is_some() { "varied" } else { "direct" }.to_string(),
                repeat: case.repeat,
                verdict: case.verdict,
                counted_as: reason::NAMES[case.reason as usize].to_string(),
                ratio: ns.median / floor_med,
                floor_ns: floor_med,
                floor_rounds_ns: floors.clone(),
                raw_ns: s.raw,
                vary_floor_ns: s.vary_floor,
                ns,
            });
        }
        floor_all.extend(floors);
    }

    // New flows into a full connection table: every insert replaces an entry, as on a busy director.
    // Once in a table that fits in the cache, once in one of the default size (what a director
    // runs with unless configured otherwise).
    let (n, vips) = p.base_setup;
    for (entries, name, label) in [
        (
            FULL_TABLE,
            "tcp-new-full",
            "TCP SYN, new flow, connection table full (65,536 entries; every insert replaces an entry)",
        ),
        (
            lb_common::DEFAULT_CONNTRACK_SIZE,
            "tcp-new-full-default",
            "TCP SYN, new flow, connection table of the default size full (262,144 entries; every insert replaces an entry)",
        ),
    ] {
        progress.step(&format!(
            "test_run: new flows into a full connection table ({entries} entries)"
        ))?;
        let mut dp = load(n, vips, entries)?;
        dp.apply(&services(n, vips))?;
        let reasons = Reasons::of(&mut dp, &case_vips(vips))?;
        let mut bench = Bench::new(&mut dp, entries)?;
        let syn = tcp4_syn(tcp_flow(tcp_vip(vips - 1)));
        Bench::configure(&mut bench.vary_lbd, 0, BASE_FULL, 4)?;
        let before = reasons.packets()?;
        let (v, _) = run(bench.vary_lbd.prog("bench_vary"), &syn, entries * 2)?;
        if v != XDP_TX {
            bail!("filling the connection table: verdict {v}");
        }
        check_reasons(
            &before,
            &reasons.packets()?,
            reason::NEW_FLOW,
            entries as u64 * 2,
            "filling the connection table",
        )?;
        let case = Case {
            case: name,
            label,
            frame: syn,
            verdict: XDP_TX,
            reason: reason::NEW_FLOW,
            vary: Some((0, BASE_FULL + 4 * entries, 4)),
            advance: true,
            repeat: p.repeat_new,
        };
        let mut s = Rounds::default();
        let mut floors = Vec::new();
        for round in 0..p.rounds {
            let floor = floor_once(&mut bench.aux, "bench_tx", &case.frame, p.repeat)?;
            floors.push(floor);
            s.push(bench.measure(&mut dp, &reasons, &case, floor, round)?);
        }
        let floor_med = Summary::of(&floors).median;
        let ns = Summary::of(&s.ns);
        cases.push(CaseResult {
            case: case.case.into(),
            label: case.label.into(),
            backends: n,
            vips,
            flows: 0,
            method: "varied".into(),
            repeat: case.repeat,
            verdict: XDP_TX,
            counted_as: "new-flow".into(),
            ratio: ns.median / floor_med,
            floor_ns: floor_med,
            floor_rounds_ns: floors.clone(),
            raw_ns: s.raw,
            vary_floor_ns: s.vary_floor,
            ns,
        });
        floor_all.extend(floors);
    }

    Ok(FastPath {
        floor: Summary::of(&floor_all),
        swap_mac: Summary::of(&swap_all),
        vary_floor: Summary::of(&vary_all),
        maps_hit: Summary::of(&maps_hit_all),
        maps_new: Summary::of(&maps_new_all),
        maps_new_pcpu: Summary::of(&maps_pcpu_all),
        cases,
        program: program.context("no setup ran")?,
        table_size: TABLE_SIZE,
        conntrack_size: conntrack,
    })
}

/// Runs one case of the base setup in a loop for `secs` seconds (for `perf record` /
/// `bpftool prog profile`): `lb-bench profile CASE SECONDS`. Cases: tcp-new, tcp-new-full (into
/// a full 65,536-entry connection table, as the report's case; the table fills in the first
/// seconds), tcp-new-full-default (the same with a table of the default size), tcp-hit, not-vip, udp-hit,
/// v6-hit, tcp-hit-100k, tcp-hit-100k-live (100k flows in a table of the default size, about
/// three flows per set, as in the live path's run).
pub fn profile(case: &str, secs: f64, setup: (usize, usize)) -> Result<()> {
    let (n, vips) = setup;
    let conntrack = match case {
        "tcp-new-full" => FULL_TABLE,
        "tcp-new-full-default" | "tcp-hit-100k-live" => lb_common::DEFAULT_CONNTRACK_SIZE,
        _ => 1 << 22,
    };
    let mut dp = load(n, vips, conntrack)?;
    dp.apply(&services(n, vips))?;
    let reasons = Reasons::of(&mut dp, &case_vips(vips))?;
    let mut bench = Bench::new(&mut dp, conntrack)?;
    let f = tcp_flow(tcp_vip(vips - 1));
    let (frame, vary, want) = match case {
        "tcp-new" | "tcp-new-full" | "tcp-new-full-default" => (tcp4_syn(f), Some((0, BASE_TCP_NEW, 4)), reason::NEW_FLOW),
        "tcp-hit" => (tcp4_ack(f, b""), None, reason::CONNTRACK_HIT),
        "maps-hit" | "maps-new" | "maps-new_pcpu" => (tcp4_ack(f, b""), None, reason::CONNTRACK_HIT),
        "tcp-hit-100k" | "tcp-hit-100k-live" => {
            (tcp4_ack(f, b""), Some((100_000, BASE_HIT, 4)), reason::CONNTRACK_HIT)
        }
        "not-vip" => (tcp4_ack(Flow4 { dst: NOT_VIP, ..f }, b""), None, reason::NOT_VIP),
        "udp-hit" => (
            udp4(
                Flow4 {
                    dst: UDP_VIP,
                    dport: 53,
                    ..f
                },
                b"0123456789",
            ),
            None,
            reason::CONNTRACK_HIT,
        ),
        "v6-hit" => (
            tcp6_ack(
                Flow6 {
                    src: CLIENT6,
                    dst: VIP6,
                    sport: 40000,
                    dport: 443,
                },
                b"",
            ),
            None,
            reason::CONNTRACK_HIT,
        ),
        other => bail!("unknown case {other}"),
    };
    let prog_id = dp.program().info()?.id();
    eprintln!("lbd_xdp is program id {prog_id}; running {case} for {secs} s");
    let _ = run(dp.program(), &frame, 1)?;
    let start = std::time::Instant::now();
    let mut round = 0u32;
    let mut total = 0u64;
    // Cases run directly on lbd's program are also timed by the wall clock (below), which counts
    // each call's fixed cost of several milliseconds (the kernel switches its XDP dispatcher to
    // the program and back): their calls run 20 M times (about 0.3 s), so that it adds about a
    // nanosecond per run, the same for every build.
    let timed = vary.is_none() && !case.starts_with("maps-");
    let repeat = if timed { 20_000_000u32 } else { 100_000 };
    let before = reasons.packets()?;
    let mut samples = Vec::new();
    // The calls' own wall-clock time per run as well: test_run gives whole nanoseconds (rounded
    // down), this resolves tenths, with the calls' fixed cost in it.
    let mut walls = Vec::new();
    while start.elapsed().as_secs_f64() < secs {
        let call = std::time::Instant::now();
        if let Some(name) = case.strip_prefix("maps-") {
            samples.push(run(bench.maps.prog(&format!("bench_maps_{name}")), &frame, repeat)?.1);
            total += repeat as u64;
            continue;
        }
        let ns = match vary {
            None => run(dp.program(), &frame, repeat)?.1,
            Some((flows, base, family)) => {
                let base = if flows == 0 { base + round * repeat } else { base };
                Bench::configure(&mut bench.vary_lbd, flows, base, family)?;
                run(bench.vary_lbd.prog("bench_vary"), &frame, repeat)?.1
            }
        };
        walls.push(call.elapsed().as_nanos() as f64 / repeat as f64);
        samples.push(ns);
        total += repeat as u64;
        round += 1;
    }
    let after = reasons.packets()?;
    let counted = after[want as usize] - before[want as usize];
    let wall = if timed { format!("; by the wall clock {:.2} ns", Summary::of(&walls).median) } else { String::new() };
    eprintln!(
        "{total} runs, {counted} counted as {}, median {:.1} ns per run (including the wrapper if varied){wall}",
        reason::NAMES[want as usize],
        Summary::of(&samples).median,
    );
    Ok(())
}
