//! VRRP failover end to end: two directors on the rig's bridge, each running `lbd run` with a
//! `[[vrrp_instance]]` for the VIP (none holds the VIP on an interface), the rig's client and
//! three nginx backends. Run as root by `cargo xtask test` (needs keepalived, nftables,
//! iputils-arping):
//!
//! ```sh
//! CARGO_TARGET_DIR=... cargo build -p lb-userspace -p lb-tests --bins
//! cargo test -p lb-tests --test vrrp_failover -- --test-threads=1 --nocapture
//! ```
//!
//! Each test has its own namespaces (`vfN-*`). Takeover times are measured from the signal to
//! the moment the new master's VRRP state changed (its status says how long it has been in its
//! state), and printed, as is the number of failed requests of a client loop (a new connection
//! per request, 200 ms connect and 300 ms answer timeouts) across the takeover.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    failover::{client_neigh, director_mac, ClientLoop, Pair, PairOptions, VRID},
    netns::require_root,
    rig::{backend_name, KeepAlive, CLIENT_V4, HTTP_PORT, VIP_V4},
    vrrp::{arping, mac_string, wait_for, who_answers, Keepalived, KeepalivedConf, Mac},
};
use lb_userspace::vrrp::{
    engine::{master_down_interval, skew_time},
    packet::Version,
    VrrpState::{Backup, Master},
};
use nix::sys::signal::Signal;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Waits (up to 2 s, probes of 300 ms) until exactly `mac` answers ARP for the VIP at the client.
fn only_answers(p: &Pair, mac: Mac) -> Result<()> {
    let client_mac = p.rig.client.mac("eth0")?;
    let mut last = BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        last = who_answers(&p.rig.client, IpAddr::V4(VIP_V4), client_mac, IpAddr::V4(CLIENT_V4))?;
        if last == BTreeSet::from([mac]) {
            return Ok(());
        }
    }
    anyhow::bail!("expected exactly {} to answer ARP for the VIP, saw {:?}", mac_string(&mac), last.iter().map(mac_string).collect::<Vec<_>>())
}

/// Both directors up, director 0 MASTER and carrying the VIP, director 1 BACKUP and dropping it.
fn start_pair(p: &mut Pair) -> Result<()> {
    p.start(0)?;
    p.wait_state(0, Master, Duration::from_secs(5))?;
    p.start(1)?;
    p.wait_state(1, Backup, Duration::from_secs(5))?;
    wait_for(Duration::from_secs(2), "director 0 to carry the VIP", || p.carries(0).ok().filter(|c| *c))?;
    ensure!(!p.carries(1)?, "the backup carries the VIP");
    Ok(())
}

/// The v3, 100 ms, priority-100 backup's Master_Down_Interval (360 ms) and Skew_Time (60 ms).
fn backup_timers() -> (Duration, Duration) {
    (master_down_interval(Version::V3, 100, ms(100)), skew_time(Version::V3, 100, ms(100)))
}

/// Packets director `i`'s fast path counted under `reason`.
fn reason_packets(p: &Pair, i: usize, reason: &str) -> Result<u64> {
    let st = p.status(i)?;
    st.reasons.iter().find(|r| r.reason == reason).map(|r| r.packets).with_context(|| format!("no reason {reason}"))
}

/// HTTP requests from the client, each on a new connection; every one must be answered.
fn all_answered(p: &Pair, n: usize) -> Result<()> {
    let counts = p.rig.http_batch(IpAddr::V4(VIP_V4), n)?;
    ensure!(counts.values().sum::<usize>() == n && counts.len() == 3, "answers: {counts:?}");
    Ok(())
}

#[test]
fn sigkill_of_the_master_hands_the_vip_to_the_backup_within_the_master_down_interval() -> Result<()> {
    require_root()?;
    let mut p = Pair::up("vf1", PairOptions::default())?;
    start_pair(&mut p)?;
    // A split view: the client sends to the backup's MAC. The backup drops the VIP's traffic
    // (counted as vip-disabled) instead of forwarding it to a backend.
    let disabled_before = reason_packets(&p, 1, "vip-disabled")?;
    let vip = VIP_V4.to_string();
    p.rig.client.ip(&["neigh", "replace", &vip, "lladdr", &mac_string(&director_mac(1)), "dev", "eth0", "nud", "permanent"])?;
    let addr = SocketAddr::new(IpAddr::V4(VIP_V4), HTTP_PORT);
    let connected = p.rig.client.enter(move || std::net::TcpStream::connect_timeout(&addr, ms(500)).is_ok())?;
    p.rig.client.ip(&["neigh", "del", &vip, "dev", "eth0"])?;
    assert!(!connected, "a connection through the backup succeeded");
    let dropped = reason_packets(&p, 1, "vip-disabled")? - disabled_before;
    assert!(dropped >= 1, "the backup dropped {dropped} VIP packets: the SYN was not seen");
    // Only the master answers ARP (from lbd's own responder: no director has the VIP).
    only_answers(&p, director_mac(0))?;
    let macs = arping(&p.rig.client, VIP_V4)?;
    assert_eq!(macs, BTreeSet::from([mac_string(&director_mac(0))]), "arping saw {macs:?}");
    all_answered(&p, 30)?;
    assert_eq!(client_neigh(&p.rig)?, mac_string(&director_mac(0)));

    let client = ClientLoop::start(&p.rig.client)?;
    std::thread::sleep(ms(1000));
    let killed = p.signal(0, Signal::SIGKILL)?;
    let became = p.wait_state(1, Master, Duration::from_secs(3))?;
    let takeover = became.saturating_duration_since(killed);
    let (mdi, _) = backup_timers();
    wait_for(Duration::from_secs(1), "director 1 to carry the VIP", || p.carries(1).ok().filter(|c| *c))?;
    let carried = Instant::now().saturating_duration_since(killed);
    std::thread::sleep(ms(1500));
    let report = client.stop()?;
    println!(
        "SIGKILL: backup MASTER {takeover:?} after the kill (Master_Down_Interval {mdi:?}), VIP carried by {carried:?}; \
         client loop: {} requests, {} failed, longest gap between answers {:?}",
        report.requests, report.failed, report.longest_gap
    );
    assert!(takeover <= mdi + ms(100), "takeover took {takeover:?}, more than {mdi:?} + 100 ms");
    // The outage is the takeover, plus the client's in-flight attempt timing out (≤ 500 ms).
    assert!(report.longest_gap <= mdi + ms(100) + ms(600), "clients saw no answer for {:?}", report.longest_gap);
    assert!(report.failed <= 6, "{} requests failed across the takeover", report.failed);
    assert_eq!(report.answered_by.len(), 3, "{:?}", report.answered_by);

    // The new master answers ARP, alone; the client's entry followed its gratuitous ARP.
    only_answers(&p, director_mac(1))?;
    assert_eq!(client_neigh(&p.rig)?, mac_string(&director_mac(1)));
    all_answered(&p, 30)?;
    let inst = p.instance(1)?;
    assert_eq!((inst.master, inst.counters.became_master), (Some(inst.source), 1));
    assert!(inst.virtual_addresses[0].owned && inst.virtual_addresses[0].announcements > 0, "{inst:?}");
    // `lbd status` text shows the instance.
    let sock = p.lbd[1].socket.display().to_string();
    let (code, text, _) = p.rig.lbd_cli(&["status", "--socket", &sock])?;
    assert_eq!(code, 0);
    println!("$ lbd status (the new master)\n{text}");
    assert!(text.contains(&format!("VRRP VI_1 eth0 vrid {VRID} v3 MASTER priority 100 (100)")), "{text}");
    assert!(text.contains("-> 10.99.0.100 on eth0 (answered)"), "{text}");
    Ok(())
}

#[test]
fn sigterm_of_the_master_hands_over_within_the_skew_time() -> Result<()> {
    require_root()?;
    let mut p = Pair::up("vf2", PairOptions::default())?;
    start_pair(&mut p)?;
    let client = ClientLoop::start(&p.rig.client)?;
    std::thread::sleep(ms(500));
    let stopped = p.signal(0, Signal::SIGTERM)?;
    let became = p.wait_state(1, Master, Duration::from_secs(3))?;
    let takeover = became.saturating_duration_since(stopped);
    p.wait_exit(0, Duration::from_secs(5))?;
    std::thread::sleep(ms(1000));
    let report = client.stop()?;
    let (_, skew) = backup_timers();
    println!(
        "SIGTERM: backup MASTER {takeover:?} after the signal (Skew_Time {skew:?}); client loop: {} requests, {} failed, \
         longest gap {:?}",
        report.requests, report.failed, report.longest_gap
    );
    assert!(takeover <= skew + ms(100), "takeover took {takeover:?}, more than {skew:?} + 100 ms");
    assert!(report.longest_gap <= skew + ms(100) + ms(600), "clients saw no answer for {:?}", report.longest_gap);
    assert!(report.failed <= 4, "{} requests failed", report.failed);
    assert_eq!(p.instance(1)?.counters.priority_zero_received, 1);
    assert!(p.log(0).contains("VRRP stopped"), "{}", p.log(0));
    only_answers(&p, director_mac(1))?;
    all_answered(&p, 30)
}

#[test]
fn preempt_takes_the_vip_back_and_nopreempt_does_not() -> Result<()> {
    require_root()?;
    let mut p = Pair::up("vf3", PairOptions::default())?;
    start_pair(&mut p)?;
    p.signal(0, Signal::SIGTERM)?;
    p.wait_exit(0, Duration::from_secs(5))?;
    p.wait_state(1, Master, Duration::from_secs(1))?;
    // Back with the higher priority: it preempts (after its Master_Down_Interval, 340 ms, as
    // a starting router waits for a master's advert first).
    let restarted = Instant::now();
    p.start(0)?;
    let back = p.wait_state(0, Master, Duration::from_secs(3))?;
    p.wait_state(1, Backup, Duration::from_secs(1))?;
    println!("preempt: director 0 MASTER again {:?} after `lbd run` was started", back.saturating_duration_since(restarted));
    only_answers(&p, director_mac(0))?;
    all_answered(&p, 30)?;

    // Same again with preempt = false on both: the restarted director stays BACKUP.
    for i in 0..2 {
        p.signal(i, Signal::SIGTERM)?;
        p.wait_exit(i, Duration::from_secs(5))?;
    }
    let opts = PairOptions { preempt: false, ..PairOptions::default() };
    for i in 0..2 {
        p.write_config(i, &opts)?;
    }
    start_pair(&mut p)?;
    p.signal(0, Signal::SIGTERM)?;
    p.wait_exit(0, Duration::from_secs(5))?;
    p.wait_state(1, Master, Duration::from_secs(1))?;
    p.start(0)?;
    p.wait_state(0, Backup, Duration::from_secs(2))?;
    // Three times the Master_Down_Interval of the restarted router: it hears the lower master
    // and leaves it be.
    std::thread::sleep(3 * master_down_interval(Version::V3, 150, ms(100)));
    assert_eq!((p.instance(0)?.state, p.instance(1)?.state), (Backup, Master));
    assert_eq!(p.instance(1)?.counters.became_master, 1);
    ensure!(!p.carries(0)? && p.carries(1)?, "only the master carries the VIP");
    only_answers(&p, director_mac(1))?;
    all_answered(&p, 30)?;

    // A reload that leaves the VRRP tables alone keeps VRRP running as it was: the same engine,
    // its time in MASTER and its advert count going on (a new one would start both again).
    let before = p.instance(1)?;
    let text = std::fs::read_to_string(&p.lbd[1].config)?;
    std::fs::write(&p.lbd[1].config, text.replacen("address = \"10.99.0.11\"\n", "address = \"10.99.0.11\"\nweight = 2\n", 1))?;
    p.reload(1)?;
    let after = p.instance(1)?;
    assert!(
        after.state == Master
            && after.in_state_secs >= before.in_state_secs
            && after.counters.adverts_sent >= before.counters.adverts_sent,
        "VRRP was restarted by a reload that did not change it: {} s in {} and {} adverts sent before, {} s in {} and {} after",
        before.in_state_secs,
        before.state,
        before.counters.adverts_sent,
        after.in_state_secs,
        after.state,
        after.counters.adverts_sent
    );
    // ...and a bad VRRP table is refused with the running state kept.
    let text = std::fs::read_to_string(&p.lbd[1].config)?;
    std::fs::write(&p.lbd[1].config, text.replace("priority = 100", "priority = 300"))?;
    let err = p.reload(1).unwrap_err().to_string();
    assert!(err.contains("priority must be between 1 and 255 (255 = address owner), got 300"), "{err}");
    assert_eq!(p.instance(1)?.state, Master);
    assert!(p.carries(1)?);
    Ok(())
}

/// A reload that changes the VRRP tables keeps the master MASTER, as keepalived's does: no
/// priority-0 advert, no takeover by the backup, no request lost, and no notify (its state did
/// not change). Before, VRRP stopped as at a shutdown: the backup took over, and the master,
/// starting again as BACKUP, preempted it back.
#[test]
fn a_vrrp_reload_keeps_the_master_master() -> Result<()> {
    reload_keeps_the_master_master("vf9", |_, text| Ok(text.to_string()), None)
}

/// A reload whose new VRRP instances cannot start (one is on an interface without an IPv4
/// address to send adverts from: only VRRP's start finds that) is refused and undone, and the
/// way back keeps the master MASTER too: the previous instances resume as they do after a
/// reload that went in.
#[test]
fn a_vrrp_reload_that_cannot_start_puts_the_master_back_as_master() -> Result<()> {
    let add = |p: &Pair, text: &str| -> Result<String> {
        p.ns(0).ip(&["link", "add", "nv0", "type", "veth", "peer", "name", "nv1"])?;
        p.ns(0).ip(&["link", "set", "nv0", "up"])?;
        Ok(format!(
            "{text}\n[[vrrp_instance]]\nname = \"VI_2\"\ninterface = \"nv0\"\nvirtual_router_id = {}\npriority = 100\n\
             virtual_addresses = [\"10.99.0.222/24\"]\n",
            VRID + 1
        ))
    };
    reload_keeps_the_master_master("vfa", add, Some("VRRP instance VI_2: nv0 has no IPv4 address to send adverts from"))
}

/// Director 0's reload changes VI_1 (`garp_master_delay`, and a `notify` that logs), after
/// `change` changed the config further. It is refused with `refused` (and undone) if that is
/// given. Either way the backup must never become master, no client request may fail, and
/// notify must not run.
fn reload_keeps_the_master_master(prefix: &str, change: impl Fn(&Pair, &str) -> Result<String>, refused: Option<&str>) -> Result<()> {
    require_root()?;
    let mut p = Pair::up(prefix, PairOptions::default())?;
    start_pair(&mut p)?;
    let notified = p.rig.work.join("notified");
    let script = p.rig.work.join("notify.sh");
    std::fs::write(&script, format!("#!/bin/sh\necho \"$@\" >> {}\n", notified.display()))?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let client = ClientLoop::start(&p.rig.client)?;
    std::thread::sleep(ms(500));
    let text = std::fs::read_to_string(&p.lbd[0].config)?;
    let changed = text.replace("garp_master_delay = \"1s\"\n", &format!("garp_master_delay = \"2s\"\nnotify = \"{}\"\n", script.display()));
    ensure!(changed != text, "the VRRP table was not changed");
    std::fs::write(&p.lbd[0].config, change(&p, &changed)?)?;
    match (p.reload(0), refused) {
        (Ok(()), None) => {}
        (Err(e), Some(want)) => {
            let e = e.to_string();
            ensure!(e.contains("the new VRRP configuration did not start") && e.contains(want), "{e}");
            ensure!(!e.contains("going back to the previous configuration failed"), "{e}");
        }
        (got, _) => anyhow::bail!("reload: {got:?}, expected it refused with {refused:?}"),
    }
    // Three Master_Down_Intervals of the backup: time enough to take over had it heard nothing.
    let (mdi, _) = backup_timers();
    std::thread::sleep(3 * mdi + ms(500));
    let report = client.stop()?;
    let (a, b) = (p.instance(0)?, p.instance(1)?);
    assert_eq!((a.state, b.state), (Master, Backup), "after the reload");
    assert_eq!(b.counters.became_master, 0, "the backup took over during the reload");
    ensure!(p.carries(0)? && !p.carries(1)?, "only the master carries the VIP");
    assert_eq!(report.failed, 0, "requests lost during the reload: {report:?}");
    assert!(p.log(0).contains("VRRP instance stays MASTER across the reload"), "{}", p.log(0));
    assert!(!notified.exists(), "notify ran: {}", std::fs::read_to_string(&notified).unwrap_or_default());
    let names: Vec<String> = p.status(0)?.vrrp.into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["VI_1"], "the instances running after the reload");
    only_answers(&p, director_mac(0))?;
    Ok(())
}

#[test]
fn unicast_adverts_work_with_multicast_dropped() -> Result<()> {
    require_root()?;
    let opts = PairOptions { unicast: true, ..PairOptions::default() };
    let mut p = Pair::up("vf4", opts)?;
    for i in 0..2 {
        p.ns(i).sh(
            "nft add table ip vf && \
             nft add chain ip vf in '{ type filter hook input priority 0; }' && \
             nft add chain ip vf out '{ type filter hook output priority 0; }' && \
             nft add rule ip vf in ip daddr 224.0.0.18 counter drop && \
             nft add rule ip vf out ip daddr 224.0.0.18 counter drop && \
             nft add rule ip vf in ip protocol vrrp counter accept",
        )?;
    }
    start_pair(&mut p)?;
    // The backup keeps hearing the master (by unicast) well past its Master_Down_Interval.
    std::thread::sleep(ms(1000));
    assert_eq!((p.instance(0)?.state, p.instance(1)?.state), (Master, Backup));
    let unicast_in = p.ns(1).exec(&["nft", "list", "chain", "ip", "vf", "in"])?;
    let accepted: u64 = unicast_in
        .lines()
        .find(|l| l.contains("vrrp"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "packets").nth(1))
        .and_then(|n| n.parse().ok())
        .context("no unicast counter")?;
    assert!(accepted >= 5, "only {accepted} unicast adverts reached the backup:\n{unicast_in}");
    let inst = p.instance(1)?;
    assert_eq!(inst.unicast_peers, vec![IpAddr::V4(lb_tests::failover::director_v4(0))]);

    let killed = p.signal(0, Signal::SIGKILL)?;
    let takeover = p.wait_state(1, Master, Duration::from_secs(3))?.saturating_duration_since(killed);
    let (mdi, _) = backup_timers();
    println!("unicast, multicast dropped: backup MASTER {takeover:?} after SIGKILL of the master");
    assert!(takeover <= mdi + ms(100), "takeover took {takeover:?}");
    only_answers(&p, director_mac(1))?;
    all_answered(&p, 30)
}

#[test]
fn long_lived_connections_survive_a_failover() -> Result<()> {
    require_root()?;
    let mut p = Pair::up("vf5", PairOptions::default())?;
    start_pair(&mut p)?;
    // Both directors computed the same lookup tables: the same slots for every real server.
    let slots = |i: usize| -> Result<Vec<(String, Option<u32>)>> {
        Ok(p.status(i)?
            .virtual_servers
            .iter()
            .flat_map(|v| v.real_servers.iter().map(move |r| (format!("{}:{} {}", v.address, v.port, r.address), r.slots)))
            .collect())
    };
    let (a, b) = (slots(0)?, slots(1)?);
    assert!(a.iter().all(|(_, s)| s.is_some_and(|s| s > 0)), "{a:?}");
    assert_eq!(a, b, "the directors' tables differ");

    // Kept-alive connections through the master until every backend holds at least two.
    let vip = SocketAddr::new(IpAddr::V4(VIP_V4), HTTP_PORT);
    let mut conns = p.rig.client.enter(move || -> Result<Vec<(KeepAlive, String)>> {
        let mut conns: Vec<(KeepAlive, String)> = Vec::new();
        for _ in 0..60 {
            let mut c = KeepAlive::connect(vip)?;
            let name = c.get()?;
            conns.push((c, name));
            if (0..3).all(|b| conns.iter().filter(|(_, n)| *n == backend_name(b)).count() >= 2) {
                break;
            }
        }
        Ok(conns)
    })??;
    let per_backend: Vec<usize> = (0..3).map(|b| conns.iter().filter(|(_, n)| *n == backend_name(b)).count()).collect();
    assert!(per_backend.iter().all(|&n| n >= 2), "connections per backend: {per_backend:?}");

    p.signal(0, Signal::SIGKILL)?;
    p.wait_state(1, Master, Duration::from_secs(3))?;
    wait_for(Duration::from_secs(1), "director 1 to carry the VIP", || p.carries(1).ok().filter(|c| *c))?;
    // Every connection goes on, on its backend, through a director that never saw its start.
    let n = conns.len();
    conns = p.rig.client.enter(move || -> Result<Vec<(KeepAlive, String)>> {
        for (c, name) in &mut conns {
            for _ in 0..3 {
                let again = c.get().with_context(|| format!("a connection to {name} after the failover"))?;
                ensure!(again == *name, "a connection to {name} was answered by {again}");
            }
        }
        Ok(conns)
    })??;
    println!("{n} kept-alive connections ({per_backend:?} per backend) survived the failover");
    drop(conns);
    let fast_path = p.status(1)?;
    let http = &fast_path.virtual_servers[0];
    assert!(http.traffic.packets >= 3 * n as u64, "director 1 forwarded {} packets", http.traffic.packets);
    Ok(())
}

/// keepalived on director 1 (VRRP only: it holds the VIP on its eth0 while master, and serves
/// nothing), lbd on director 0.
fn keepalived(p: &Pair, priority: u8, version: u8, advert_int: &str, auth_pass: Option<&str>) -> Result<Keepalived> {
    let vip = format!("{VIP_V4}/24");
    Keepalived::start(
        p.ns(1),
        &p.rig.work,
        &KeepalivedConf { priority, version, advert_int, vrid: VRID, vip: &vip, auth_pass, unicast: None },
    )
}

#[test]
fn interop_lbd_master_keepalived_backup_v2_pass() -> Result<()> {
    require_root()?;
    let opts = PairOptions { priorities: [150, 100], version: 2, advert_interval: "1s", auth_pass: Some("s3cret"), ..Default::default() };
    let mut p = Pair::up("vf6", opts)?;
    let ka = keepalived(&p, 100, 2, "1", Some("s3cret"))?;
    p.start(0)?;
    p.wait_state(0, Master, Duration::from_secs(6))?;
    ka.wait_state("BACKUP", Duration::from_secs(6))?;
    wait_for(Duration::from_secs(2), "lbd to carry the VIP", || p.carries(0).ok().filter(|c| *c))?;
    only_answers(&p, director_mac(0))?;
    all_answered(&p, 30)?;

    // lbd stops cleanly: keepalived takes over after its Skew_Time (610 ms).
    let stopped = p.signal(0, Signal::SIGTERM)?;
    let took = ka.wait_state("MASTER", Duration::from_secs(3))?;
    let since = Instant::now().saturating_duration_since(stopped);
    println!("v2 PASS: keepalived MASTER {since:?} after lbd's SIGTERM (seen {took:?} into the wait)");
    assert!(since <= skew_time(Version::V2, 100, ms(1000)) + ms(400), "keepalived took {since:?}");
    p.wait_exit(0, Duration::from_secs(5))?;
    only_answers(&p, director_mac(1))?;

    // lbd back with the higher priority preempts keepalived.
    p.start(0)?;
    p.wait_state(0, Master, Duration::from_secs(6))?;
    ka.wait_state("BACKUP", Duration::from_secs(3))?;
    only_answers(&p, director_mac(0))?;
    all_answered(&p, 30)?;
    ka.assert_no_complaints()
}

#[test]
fn interop_keepalived_master_lbd_backup_v3() -> Result<()> {
    require_root()?;
    let opts = PairOptions { priorities: [100, 150], ..Default::default() };
    let mut p = Pair::up("vf7", opts)?;
    let mut ka = keepalived(&p, 150, 3, "0.1", None)?;
    ka.wait_state("MASTER", Duration::from_secs(5))?;
    p.start(0)?;
    p.wait_state(0, Backup, Duration::from_secs(3))?;
    std::thread::sleep(ms(500));
    assert_eq!(p.instance(0)?.state, Backup);
    ensure!(!p.carries(0)?, "lbd carries the VIP as backup");
    only_answers(&p, director_mac(1))?;

    // keepalived stops (priority 0): lbd takes over in its Skew_Time.
    let stopped = Instant::now();
    ka.stop()?;
    let became = p.wait_state(0, Master, Duration::from_secs(3))?;
    let takeover = became.saturating_duration_since(stopped);
    let skew = skew_time(Version::V3, 100, ms(100));
    println!("v3: lbd MASTER {takeover:?} after keepalived's SIGTERM (Skew_Time {skew:?})");
    assert!(takeover <= skew + ms(300), "lbd took {takeover:?}");
    assert_eq!(p.instance(0)?.counters.priority_zero_received, 1);
    wait_for(Duration::from_secs(1), "lbd to carry the VIP", || p.carries(0).ok().filter(|c| *c))?;
    only_answers(&p, director_mac(0))?;
    all_answered(&p, 30)?;

    // keepalived back with the higher priority takes the VIP; lbd drops it again.
    ka.restart()?;
    p.wait_state(0, Backup, Duration::from_secs(3))?;
    ka.wait_state("MASTER", Duration::from_secs(3))?;
    wait_for(Duration::from_secs(1), "lbd to drop the VIP", || p.carries(0).ok().filter(|c| !*c))?;
    only_answers(&p, director_mac(1))?;
    ka.assert_no_complaints()
}

/// The master's interface deleted and created again (another index): lbd restarts VRRP there, so
/// the higher-priority director is heard again and takes the VIP back (preempt), answering ARP
/// and forwarding on the new interface. Before, its VRRP sockets stayed bound to the old index:
/// it went on calling itself MASTER, sending nothing and answering no ARP, while the backup was
/// master too.
#[test]
fn a_master_whose_interface_is_created_again_takes_the_vip_back() -> Result<()> {
    require_root()?;
    let mut p = Pair::up("vf8", PairOptions::default())?;
    start_pair(&mut p)?;
    let (old, new) = p.rig.recreate_director_link(false)?;
    ensure!(old != new, "the rig must give eth0 another index");
    // A restarted instance starts as BACKUP (and director 1, not hearing director 0 while its
    // interface was away, may have become master meanwhile): wait until the restarted one is
    // master (its state before the restart said MASTER too).
    wait_for(Duration::from_secs(5), "director 0 to restart VRRP and become master", || {
        let log = p.log(0);
        let after = log.split("VRRP's interfaces were created again: restarting VRRP").nth(1)?;
        after.contains("to=MASTER").then_some(())
    })?;
    p.wait_state(0, Master, Duration::from_secs(5))?;
    p.wait_state(1, Backup, Duration::from_secs(3))?;
    only_answers(&p, director_mac(0))?;
    all_answered(&p, 30)?;
    ensure!(p.carries(0)? && !p.carries(1)?, "only the master carries the VIP");
    Ok(())
}
