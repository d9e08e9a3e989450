//! The benchmark's own XDP programs (lb-ebpf/src/aux.rs, embedded as `AUX_OBJECT`), and access to
//! the counters of lbd's program.

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, DevMapHash, MapData, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{ProgramFd, Xdp, XdpMode},
    Ebpf,
};
use lb_common::{reason, Counters, FlowKey4, FlowValue, ReasonCounter, VipInfo, VipKey};
use lb_userspace::{dataplane::VipAddr, xdp::{XdpDataplane, AUX_OBJECT}};

pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub const CFG_EGRESS: u32 = 0;
pub const CFG_FLOWS: u32 = 1;
pub const CFG_BASE: u32 = 2;
pub const CFG_FAMILY: u32 = 3;

/// One instance of the auxiliary object (its own maps), with some of its programs loaded.
pub struct Aux {
    ebpf: Ebpf,
}

impl Aux {
    pub fn load(programs: &[&str]) -> Result<Aux> {
        Self::load_sized(programs, 16)
    }

    /// Like `load`, with `BENCH_LRU` sized to `lru` entries.
    pub fn load_sized(programs: &[&str], lru: u32) -> Result<Aux> {
        if AUX_OBJECT.is_empty() {
            bail!("lbd was built without its eBPF objects (AYA_BUILD_SKIP); rebuild without it");
        }
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries("BENCH_LRU", lru)
            .map_max_entries("BENCH_LRU_PCPU", lru)
            .load(AUX_OBJECT)
            .context("loading the auxiliary eBPF object")?;
        for name in programs {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name} in the auxiliary object (stale build?)"))?
                .try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        Ok(Aux { ebpf })
    }

    pub fn prog(&mut self, name: &str) -> &mut Xdp {
        self.ebpf
            .program_mut(name)
            .expect("loaded")
            .try_into()
            .expect("XDP program")
    }

    pub fn prog_fd(&mut self, name: &str) -> Result<ProgramFd> {
        Ok(self.prog(name).fd()?.try_clone()?)
    }

    /// Attaches `name` in native mode to `iface` of the calling thread's namespace; the link
    /// lives as long as this object.
    pub fn attach(&mut self, name: &str, iface: &str) -> Result<()> {
        self.prog(name)
            .attach(iface, XdpMode::Driver)
            .with_context(|| format!("attaching {name} to {iface} (native)"))?;
        Ok(())
    }

    pub fn set_cfg(&mut self, index: u32, value: u32) -> Result<()> {
        let mut cfg: Array<&mut MapData, u32> = Array::try_from(self.ebpf.map_mut("BENCH_CFG").context("BENCH_CFG")?)?;
        cfg.set(index, value, 0)?;
        Ok(())
    }

    pub fn add_port(&mut self, ifindex: u32) -> Result<()> {
        let mut ports: DevMapHash<&mut MapData> =
            DevMapHash::try_from(self.ebpf.map_mut("BENCH_PORTS").context("BENCH_PORTS")?)?;
        ports.insert(ifindex, ifindex, None, 0)?;
        Ok(())
    }

    pub fn set_jump(&mut self, target: &ProgramFd) -> Result<()> {
        let mut jump: ProgramArray<&mut MapData> =
            ProgramArray::try_from(self.ebpf.map_mut("BENCH_JUMP").context("BENCH_JUMP")?)?;
        jump.set(0, target, 0)
            .context("putting the program into the tail-call array")?;
        Ok(())
    }

    fn per_cpu(&mut self, name: &str) -> Result<PerCpuArray<&mut MapData, u64>> {
        Ok(PerCpuArray::try_from(
            self.ebpf.map_mut(name).with_context(|| name.to_string())?,
        )?)
    }

    /// Inserts the all-zero keys `bench_maps_*` look up.
    pub fn fill_bench_maps(&mut self) -> Result<()> {
        let mut hash: aya::maps::HashMap<&mut MapData, VipKey, VipInfo> =
            aya::maps::HashMap::try_from(self.ebpf.map_mut("BENCH_HASH").context("BENCH_HASH")?)?;
        hash.insert(
            VipKey::default(),
            VipInfo { vip_id: 1 },
            0,
        )?;
        let mut lru: aya::maps::HashMap<&mut MapData, FlowKey4, FlowValue> =
            aya::maps::HashMap::try_from(self.ebpf.map_mut("BENCH_LRU").context("BENCH_LRU")?)?;
        lru.insert(
            FlowKey4::default(),
            FlowValue {
                backend: 1,
                generation: 1,
            },
            0,
        )?;
        Ok(())
    }

    /// Zeroes the generator's sequence number (so the next run starts at flow 0).
    pub fn reset_seq(&mut self) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut seq = self.per_cpu("BENCH_SEQ")?;
        seq.set(0, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
        Ok(())
    }

    /// The generator's sequence number summed over CPUs (frames it rewrote since the reset).
    pub fn seq(&mut self) -> Result<u64> {
        Ok(self.per_cpu("BENCH_SEQ")?.get(&0, 0)?.iter().sum())
    }

    /// Packets and bytes `bench_sink` has counted, summed over CPUs.
    pub fn sink(&mut self) -> Result<(u64, u64)> {
        let map = self.per_cpu("BENCH_SINK")?;
        let p: u64 = map.get(&0, 0)?.iter().sum();
        let b: u64 = map.get(&1, 0)?.iter().sum();
        Ok((p, b))
    }
}

/// Per-reason packet counters of lbd's loaded program, read straight from its maps (found
/// through the program's map ids): `GLOBAL_STATS` for the packets not forwarded, and for the
/// forwarded ones (`conntrack-hit`, `new-flow`) the `BACKEND_STATS` elements of the VIPs the
/// bench sends to, as `XdpDataplane::stats` derives them from every backend's. That call also
/// walks the connection table and every backend id, which is slow with a million entries and
/// 100,000 backends.
pub struct Reasons {
    global: PerCpuArray<MapData, ReasonCounter>,
    backends: PerCpuArray<MapData, Counters>,
    ids: Vec<u32>,
}

impl Reasons {
    /// Reads the reasons of the packets sent to `vips` (programmed in `dp` already).
    pub fn of(dp: &mut XdpDataplane, vips: &[VipAddr]) -> Result<Reasons> {
        let mut ids = Vec::new();
        for vip in vips {
            let of_vip = dp.backend_ids(vip);
            if of_vip.is_empty() {
                bail!("{vip} has no backends programmed");
            }
            ids.extend(of_vip);
        }
        Ok(Reasons {
            global: PerCpuArray::try_from(dp.program_map(lb_common::map_names::GLOBAL_STATS)?)?,
            backends: PerCpuArray::try_from(dp.program_map(lb_common::map_names::BACKEND_STATS)?)?,
            ids,
        })
    }

    /// Packets per reason, in `reason::NAMES` order.
    pub fn packets(&self) -> Result<Vec<u64>> {
        let mut forwarded = Counters::default();
        for id in &self.ids {
            for c in self.backends.get(id, 0)?.iter() {
                forwarded.add(c);
            }
        }
        let by_reason = forwarded.by_reason();
        (0..reason::COUNT)
            .map(|i| match by_reason.get(i as usize) {
                Some(&(packets, _)) => Ok(packets),
                None => Ok(self.global.get(&i, 0)?.iter().map(|c| c.packets).sum()),
            })
            .collect()
    }
}

/// Checks that between `before` and `after` exactly `n` packets were counted, all under `want`.
pub fn check_reasons(before: &[u64], after: &[u64], want: u32, n: u64, what: &str) -> Result<()> {
    check_reason_counts(before, after, &[(want, n)], what)
}

/// Checks that each `(reason, n)` counter grew by exactly `n` and every other counter by nothing.
pub fn check_reason_counts(before: &[u64], after: &[u64], want: &[(u32, u64)], what: &str) -> Result<()> {
    let delta: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let wanted = |i: usize| want.iter().find(|(r, _)| *r as usize == i).map_or(0, |&(_, n)| n);
    if delta.iter().enumerate().all(|(i, &d)| d == wanted(i)) {
        return Ok(());
    }
    let show = |counts: &mut dyn Iterator<Item = (usize, u64)>| {
        let shown: Vec<String> = counts
            .filter(|&(_, d)| d != 0)
            .map(|(i, d)| format!("{} {d}", reason::NAMES[i]))
            .collect();
        if shown.is_empty() {
            "nothing".to_string()
        } else {
            shown.join(", ")
        }
    };
    bail!(
        "{what}: expected {}, the program counted: {}",
        show(&mut want.iter().map(|&(r, n)| (r as usize, n))),
        show(&mut delta.iter().copied().enumerate())
    )
}
