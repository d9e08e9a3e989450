//! VRRP in namespaces: lbd's VRRP runtime (in-process, its sockets in one namespace) against
//! Debian's keepalived (in another) on one bridge, with a client asking who answers for the
//! virtual address. Run as root by `cargo xtask test` (needs keepalived, nftables,
//! iputils-arping).
//!
//! Each test has its own namespaces (`vrN-*`) and subnet (10.97.N.0/24, fd00:97:N::/64); node 0
//! runs lbd, node 1 keepalived or a real server, the last node is the client.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use lb_tests::{
    netns::{require_root, Netns},
    vrrp::{arping, log_lines, mac_string, spec, wait_for, who_answers, InProcess, Keepalived, KeepalivedConf, Mac, Segment, WorkDir},
};
use lb_userspace::vrrp::VrrpState::{Backup, Fault, Master};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Waits (up to 1 s, probes of 300 ms) until exactly `mac` answers for `vip` at the client.
fn only_answers(seg: &Segment, vip: IpAddr, mac: Mac) -> Result<()> {
    let c = seg.nodes.len() - 1;
    let me = match vip {
        IpAddr::V4(_) => IpAddr::V4(seg.v4(c)),
        IpAddr::V6(_) => IpAddr::V6(seg.v6(c)),
    };
    let mut last = BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        last = who_answers(&seg.nodes[c], vip, seg.mac(c), me)?;
        if last == BTreeSet::from([mac]) {
            return Ok(());
        }
    }
    anyhow::bail!("{vip}: expected exactly {} to answer, saw {:?}", mac_string(&mac), last.iter().map(mac_string).collect::<Vec<_>>())
}

/// Hand-overs between lbd and keepalived are not ARP conflicts (the old master gives the
/// address up while the new one announces it).
fn no_conflict_logged(vip: IpAddr) {
    let logged = log_lines(&["ARP conflict", &vip.to_string()]);
    assert!(logged.is_empty(), "{logged:#?}");
}

fn instance(name: &str, vrid: u8, priority: u8, version: u8, interval: &str, extra: &str, vip: &str) -> String {
    format!(
        "[[vrrp_instance]]\nname = \"{name}\"\ninterface = \"eth0\"\nvirtual_router_id = {vrid}\npriority = {priority}\n\
         version = {version}\nadvert_interval = \"{interval}\"\nvirtual_addresses = [\"{vip}\"]\n{extra}\n"
    )
}

/// VRRPv2 with PASS authentication, 1 s adverts: lbd (150) wins the election against keepalived
/// (100); a clean lbd stop (priority 0) hands over to keepalived in its skew time; lbd back
/// preempts keepalived. Exactly one MAC answers ARP at each step.
#[test]
fn v2_pass_auth_lbd_master_fails_over_to_keepalived_and_back() -> Result<()> {
    require_root()?;
    let seg = Segment::new("vr1", 1, &["lbd", "ka", "cl"])?;
    let work = WorkDir::new("v2")?;
    let vip = seg.vip4();
    let notify_log = work.0.join("lbd-notify");
    let notify = work.logger_script("lbd-notify.sh", &notify_log)?;
    let extra = format!("authentication = {{ auth_type = \"PASS\", auth_pass = \"lbd-pass\" }}\nnotify = \"{}\"", notify.display());
    let text = instance("VI_1", 51, 150, 2, "1s", &extra, &format!("{vip}/24"));
    let conf = KeepalivedConf {
        priority: 100,
        version: 2,
        advert_int: "1",
        vrid: 51,
        vip: &format!("{vip}/24"),
        auth_pass: Some("lbd-pass"),
        unicast: None,
    };
    let ka = Keepalived::start(&seg.nodes[1], &work.0, &conf)?;
    let mut lbd = InProcess::start(&seg.nodes[0], spec(&text)?)?;

    // Both start as backup; lbd's master-down interval (3 s + 106/256 s) runs out first, or it
    // preempts keepalived if that one was quicker.
    lbd.wait_state("VI_1", Master, ms(3414 + 2000))?;
    ka.wait_state("BACKUP", ms(1500))?;
    only_answers(&seg, vip.into(), seg.mac(0))?;
    // The real arping agrees.
    assert_eq!(arping(&seg.nodes[2], vip)?, BTreeSet::from([mac_string(&seg.mac(0))]));

    // A clean stop sends priority 0: keepalived takes over after its skew time (0.61 s) instead
    // of its master-down interval (3.61 s).
    lbd.stop();
    let took = ka.wait_state("MASTER", ms(3000))?;
    ensure!(took < ms(2000), "keepalived took {took:?} to take over after lbd's priority-0 advert");
    only_answers(&seg, vip.into(), seg.mac(1))?;
    let notes = lb_tests::vrrp::lines(&notify_log);
    assert_eq!(notes.first().map(String::as_str), Some("INSTANCE VI_1 BACKUP 150"), "{notes:?}");
    assert!(notes.contains(&"INSTANCE VI_1 MASTER 150".to_string()), "{notes:?}");
    assert_eq!(notes.last().map(String::as_str), Some("INSTANCE VI_1 STOP 150"), "{notes:?}");
    drop(lbd);

    // lbd back with the higher priority: it ignores keepalived's adverts and preempts it.
    let lbd = InProcess::start(&seg.nodes[0], spec(&text)?)?;
    lbd.wait_state("VI_1", Master, ms(3414 + 2000))?;
    ka.wait_state("BACKUP", ms(1500))?;
    only_answers(&seg, vip.into(), seg.mac(0))?;
    let st = &lbd.status()[0];
    assert!(st.counters.adverts_received > 0, "keepalived's PASS adverts are accepted: {st:?}");
    assert!(st.counters.dropped.is_empty(), "nothing dropped: {st:?}");
    assert_eq!(st.master, Some(IpAddr::V4(seg.v4(0))));
    ka.assert_no_complaints()?;
    no_conflict_logged(vip.into());
    Ok(())
}

/// VRRPv3 at 100 ms: keepalived (150) master, lbd (100) backup. keepalived stopping cleanly,
/// coming back (preempting), and vanishing from the segment (no priority 0: lbd waits the
/// master-down interval), then returning.
#[test]
fn v3_keepalived_master_lbd_backup_fail_over_both_ways() -> Result<()> {
    require_root()?;
    let seg = Segment::new("vr2", 2, &["lbd", "ka", "cl"])?;
    let work = WorkDir::new("v3")?;
    let vip = seg.vip4();
    let conf = KeepalivedConf {
        priority: 150,
        version: 3,
        advert_int: "0.1",
        vrid: 52,
        vip: &format!("{vip}/24"),
        auth_pass: None,
        unicast: None,
    };
    let mut ka = Keepalived::start(&seg.nodes[1], &work.0, &conf)?;
    ka.wait_state("MASTER", ms(5000))?;
    let lbd = InProcess::start(&seg.nodes[0], spec(&instance("VI_1", 52, 100, 3, "100ms", "", &vip.to_string()))?)?;
    lbd.wait_state("VI_1", Backup, ms(1000))?;
    std::thread::sleep(ms(1000));
    assert_eq!(lbd.state("VI_1"), Some(Backup), "a lower priority stays backup");
    let st = &lbd.status()[0];
    assert_eq!((st.master, st.master_priority), (Some(IpAddr::V4(seg.v4(1))), Some(150)), "{st:?}");
    assert!(st.counters.adverts_received >= 5 && st.counters.dropped.is_empty(), "{st:?}");
    assert_eq!(st.master_advert_interval_ms, 100);
    only_answers(&seg, vip.into(), seg.mac(1))?;

    // keepalived stops cleanly: priority 0, lbd master after Skew_Time (60 ms).
    ka.stop()?;
    let took = lbd.wait_state("VI_1", Master, ms(2000))?;
    ensure!(took < ms(1000), "lbd took {took:?} after keepalived's priority-0 advert");
    assert_eq!(lbd.status()[0].counters.priority_zero_received, 1);
    only_answers(&seg, vip.into(), seg.mac(0))?;

    // keepalived comes back with the higher priority and preempts lbd.
    ka.restart()?;
    lbd.wait_state("VI_1", Backup, ms(5000))?;
    ka.wait_state("MASTER", ms(2000))?;
    only_answers(&seg, vip.into(), seg.mac(1))?;

    // keepalived's node drops off the segment: no priority 0, lbd takes over once
    // Master_Down_Interval (3 × 100 ms + 60 ms) has passed since the last advert.
    let cut = Instant::now();
    seg.unplug(1, true)?;
    lbd.wait_state("VI_1", Master, ms(2000))?;
    let took = cut.elapsed();
    ensure!(took >= ms(200), "lbd took over after {took:?}, before the master-down interval");
    only_answers(&seg, vip.into(), seg.mac(0))?;

    // Back on the segment, keepalived (out of FAULT) preempts again.
    seg.unplug(1, false)?;
    lbd.wait_state("VI_1", Backup, ms(5000))?;
    ka.wait_state("MASTER", ms(2000))?;
    only_answers(&seg, vip.into(), seg.mac(1))?;
    ka.assert_no_complaints()?;
    no_conflict_logged(vip.into());
    Ok(())
}

fn nft_drop_vrrp_multicast(ns: &Netns) -> Result<()> {
    ns.sh("nft -f - <<'EOF'\ntable ip novrrpmc {\n\
         chain in { type filter hook input priority 0; ip daddr 224.0.0.18 counter drop; }\n\
         chain out { type filter hook output priority 0; ip daddr 224.0.0.18 counter drop; }\n}\nEOF")
        .map(drop)
}

/// Unicast adverts (`unicast_peers`/`unicast_source`, keepalived's `unicast_peer`/
/// `unicast_src_ip`) on a segment where nftables drops all VRRP multicast.
#[test]
fn v3_unicast_works_without_multicast() -> Result<()> {
    require_root()?;
    let seg = Segment::new("vr3", 3, &["lbd", "ka", "cl"])?;
    let work = WorkDir::new("unicast")?;
    let vip = seg.vip4();
    for n in &seg.nodes[..2] {
        nft_drop_vrrp_multicast(n)?;
    }
    let extra = format!("unicast_source = \"{}\"\nunicast_peers = [\"{}\"]", seg.v4(0), seg.v4(1));
    let text = instance("VI_1", 53, 150, 3, "100ms", &extra, &vip.to_string());
    let conf = KeepalivedConf {
        priority: 100,
        version: 3,
        advert_int: "0.1",
        vrid: 53,
        vip: &format!("{vip}/24"),
        auth_pass: None,
        unicast: Some((seg.v4(1).into(), seg.v4(0).into())),
    };
    let ka = Keepalived::start(&seg.nodes[1], &work.0, &conf)?;
    ka.wait_state("MASTER", ms(5000))?;
    let mut lbd = InProcess::start(&seg.nodes[0], spec(&text)?)?;
    lbd.wait_state("VI_1", Master, ms(2000))?;
    ka.wait_state("BACKUP", ms(1000))?;
    only_answers(&seg, vip.into(), seg.mac(0))?;
    let st = &lbd.status()[0];
    assert!(st.counters.adverts_received > 0 && st.counters.dropped.is_empty(), "keepalived's unicast adverts arrive: {st:?}");

    lbd.stop();
    let took = ka.wait_state("MASTER", ms(2000))?;
    ensure!(took < ms(1000), "keepalived took {took:?} after lbd's unicast priority-0 advert");
    only_answers(&seg, vip.into(), seg.mac(1))?;
    drop(lbd);

    // Nothing lbd sent went to the multicast group.
    let out = seg.nodes[0].exec(&["nft", "list", "chain", "ip", "novrrpmc", "out"])?;
    assert!(out.contains("counter packets 0 "), "{out}");
    ka.assert_no_complaints()?;
    no_conflict_logged(vip.into());
    Ok(())
}

/// VRRPv3 over IPv6 with keepalived: neighbour solicitations for the VIP are answered by the
/// master only, lbd first, keepalived after lbd's clean stop.
#[test]
fn v3_ipv6_with_keepalived() -> Result<()> {
    require_root()?;
    let seg = Segment::new("vr4", 4, &["lbd", "ka", "cl"])?;
    let work = WorkDir::new("ipv6")?;
    let vip = seg.vip6();
    let conf = KeepalivedConf {
        priority: 100,
        version: 3,
        advert_int: "0.1",
        vrid: 54,
        vip: &format!("{vip}/64"),
        auth_pass: None,
        unicast: None,
    };
    let ka = Keepalived::start(&seg.nodes[1], &work.0, &conf)?;
    ka.wait_state("MASTER", ms(5000))?;
    let mut lbd = InProcess::start(&seg.nodes[0], spec(&instance("VI_6", 54, 150, 3, "100ms", "", &vip.to_string()))?)?;
    lbd.wait_state("VI_6", Master, ms(2000))?;
    ka.wait_state("BACKUP", ms(1000))?;
    only_answers(&seg, vip.into(), seg.mac(0))?;
    let st = &lbd.status()[0];
    assert!(matches!(st.source, IpAddr::V6(a) if a.segments()[0] == 0xfe80), "adverts from the link-local address: {st:?}");
    assert!(st.counters.adverts_received > 0 && st.counters.dropped.is_empty(), "{st:?}");

    lbd.stop();
    ka.wait_state("MASTER", ms(2000))?;
    only_answers(&seg, vip.into(), seg.mac(1))?;
    ka.assert_no_complaints()?;
    no_conflict_logged(vip.into());
    Ok(())
}

/// A real server holding the VIP on `lo` without arp_ignore answers ARP for it (the most common
/// DSR mistake): lbd's probe finds it, the conflict is logged once however often it shows, and
/// the client indeed sees two MACs until the real server is fixed.
#[test]
fn arp_conflict_with_a_misconfigured_real_server_is_logged_once() -> Result<()> {
    require_root()?;
    let seg = Segment::new("vr5", 5, &["lbd", "rs", "cl"])?;
    let vip = seg.vip4();
    let rs = &seg.nodes[1];
    rs.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
    let lbd = InProcess::start(&seg.nodes[0], spec(&instance("VI_1", 55, 100, 3, "100ms", "", &vip.to_string()))?)?;
    lbd.wait_state("VI_1", Master, ms(2000))?;
    // The probe 1 s after becoming master gets the real server's reply, confirmed 1 s later.
    let (conflicts, _) = wait_for(ms(5000), "an ARP conflict in the status", || {
        let c = lbd.status()[0].conflicts.clone();
        (!c.is_empty()).then_some(c)
    })?;
    assert_eq!(conflicts.len(), 1);
    assert_eq!((conflicts[0].address, conflicts[0].mac.as_str()), (IpAddr::V4(vip), mac_string(&seg.mac(1)).as_str()));
    // It keeps claiming the address (gratuitous ARPs from the VIP, as with arp_announce=0).
    for _ in 0..2 {
        rs.sh(&format!("arping -U -c 1 -I eth0 -s {vip} {vip}; true"))?;
    }
    std::thread::sleep(ms(1500));
    let logged = log_lines(&["ARP conflict", &vip.to_string(), &mac_string(&seg.mac(1))]);
    assert_eq!(logged.len(), 1, "logged once: {logged:#?}");
    assert_eq!(lbd.status()[0].conflicts.len(), 1);

    // Why it matters: the client gets two answers.
    let c = seg.nodes.len() - 1;
    let seen = who_answers(&seg.nodes[c], vip.into(), seg.mac(c), seg.v4(c).into())?;
    assert_eq!(seen, BTreeSet::from([seg.mac(0), seg.mac(1)]));
    // Fixed the LVS-DR way, only the master answers.
    for k in ["all", "eth0"] {
        rs.sysctl(&format!("net.ipv4.conf.{k}.arp_ignore"), "1")?;
        rs.sysctl(&format!("net.ipv4.conf.{k}.arp_announce"), "2")?;
    }
    only_answers(&seg, vip.into(), seg.mac(0))?;
    Ok(())
}

/// Tracking and notify in the runtime: an interface with a weight lowers the priority, a check
/// script with weight 0 forces FAULT, the sync group follows, notify commands get keepalived's
/// arguments, and a FAULT instance never answers ARP.
#[test]
fn tracking_sync_group_and_notify() -> Result<()> {
    require_root()?;
    let seg = Segment::new("vr6", 6, &["lbd", "cl"])?;
    let work = WorkDir::new("track")?;
    let node = &seg.nodes[0];
    // A tracked link: a veth pair (this kernel has no dummy driver); trk0 loses its carrier when
    // trk1 goes down.
    node.ip(&["link", "add", "trk0", "type", "veth", "peer", "name", "trk1"])?;
    node.ip(&["link", "set", "trk0", "up"])?;
    node.ip(&["link", "set", "trk1", "up"])?;
    let flag = work.0.join("healthy");
    std::fs::write(&flag, "")?;
    let log = work.0.join("notify");
    let notify = work.logger_script("notify.sh", &log)?;
    let (vip_a, vip_b) = (seg.vip4(), std::net::Ipv4Addr::new(10, 97, 6, 101));
    let text = format!(
        "[[vrrp_script]]\nname = \"chk_flag\"\nscript = \"test -e {flag}\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 2\nfall = 2\n\n{}\n{}\n\
         [[vrrp_sync_group]]\nname = \"G\"\ngroup = [\"VI_A\", \"VI_B\"]\nnotify = \"{n}\"\n",
        instance("VI_A", 61, 100, 3, "100ms", &format!("track_script = [\"chk_flag\"]\ntrack_interface = [{{ name = \"trk0\", weight = -50 }}]\nnotify = \"{}\"", notify.display()), &vip_a.to_string()),
        instance("VI_B", 62, 100, 3, "100ms", &format!("notify = \"{}\"", notify.display()), &vip_b.to_string()),
        flag = flag.display(),
        n = notify.display(),
    );
    let mut lbd = InProcess::start(node, spec(&text)?)?;
    lbd.wait_state("VI_A", Master, ms(2000))?;
    lbd.wait_state("VI_B", Master, ms(500))?;
    assert!(lbd.owns(vip_a.into()) && lbd.owns(vip_b.into()));
    let count = |line: &str| lb_tests::vrrp::lines(&log).iter().filter(|l| *l == line).count();
    wait_for(ms(2000), "the group's first notify", || (count("GROUP G MASTER 0") == 1).then_some(()))?;

    // A reload that changes the VRRP tables: the instances and their group stay MASTER, and
    // neither the instances' notify nor the group's runs again (keepalived's behaviour).
    let changed = text.replace("[[vrrp_sync_group]]", "garp_master_delay = \"2s\"\n\n[[vrrp_sync_group]]");
    assert_ne!(spec(&changed)?, spec(&text)?, "VI_B's table is changed");
    lbd.reload(node, spec(&changed)?)?;
    // MASTER at its first step (no Master_Down_Interval of BACKUP first).
    lbd.wait_state("VI_A", Master, ms(200))?;
    lbd.wait_state("VI_B", Master, ms(200))?;
    std::thread::sleep(ms(500));
    assert_eq!((count("GROUP G MASTER 0"), count("INSTANCE VI_A MASTER 100"), count("INSTANCE VI_B MASTER 100")), (1, 1, 1));
    assert_eq!(log_lines(&["VRRP sync group stays MASTER across the reload"]).len(), 1);

    // A tracked interface with a weight: the priority drops, the state stays.
    node.ip(&["link", "set", "trk1", "down"])?;
    wait_for(ms(1000), "priority 50", || (lbd.status()[0].effective_priority == 50).then_some(()))?;
    assert_eq!(lbd.state("VI_A"), Some(Master));
    assert_eq!(lbd.status()[0].failing, vec!["interface trk0"]);

    // The script (weight 0) fails twice: FAULT, and the sync group's other member with it.
    std::fs::remove_file(&flag)?;
    lbd.wait_state("VI_A", Fault, ms(2000))?;
    lbd.wait_state("VI_B", Fault, ms(200))?;
    assert!(!lbd.owns(vip_a.into()) && !lbd.owns(vip_b.into()));
    let c = seg.nodes.len() - 1;
    assert!(who_answers(&seg.nodes[c], vip_a.into(), seg.mac(c), seg.v4(c).into())?.is_empty(), "FAULT never answers ARP");

    // Healthy again (two good runs): backup, then master.
    std::fs::write(&flag, "")?;
    lbd.wait_state("VI_A", Master, ms(2000))?;
    lbd.wait_state("VI_B", Master, ms(500))?;
    only_answers(&seg, vip_b.into(), seg.mac(0))?;
    lbd.stop();

    let notes = lb_tests::vrrp::lines(&log);
    for want in [
        "INSTANCE VI_A MASTER 100",
        "INSTANCE VI_A FAULT 50",
        "INSTANCE VI_B FAULT 100",
        "GROUP G MASTER 0",
        "GROUP G FAULT 0",
        "INSTANCE VI_A STOP 50",
        "INSTANCE VI_B STOP 100",
    ] {
        assert!(notes.iter().any(|l| l == want), "missing {want:?} in {notes:#?}");
    }
    let pos = |s: &str| notes.iter().position(|l| l == s).unwrap();
    assert!(pos("INSTANCE VI_A MASTER 100") < pos("INSTANCE VI_A FAULT 50"), "in order: {notes:#?}");
    Ok(())
}

/// The MAC the client's (node `c`'s) neighbour table holds for `vip`, if any.
fn clients_entry(seg: &Segment, vip: IpAddr) -> Result<Option<String>> {
    let c = seg.nodes.len() - 1;
    let out = seg.nodes[c].ip(&["neigh", "show", &vip.to_string(), "dev", "eth0"])?;
    Ok(out.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).map(str::to_owned))
}

/// A split view: keepalived (100) stops hearing lbd (150) and becomes master too, and its
/// gratuitous ARPs move the client's ARP entry for the VIP to keepalived's MAC; once keepalived
/// leaves the VIP again, nobody would take it back, and the VIP's traffic goes to a backup
/// until the entry expires. lbd, still master, hears keepalived's lower-priority adverts and
/// announces the VIP again at once (garp_lower_prio_repeat), as keepalived would: the client's
/// entry comes back to lbd, and stays there when the view heals.
#[test]
fn split_view_master_hearing_a_lower_priority_master_announces_the_vip_again() -> Result<()> {
    require_root()?;
    let seg = Segment::new("vr7", 7, &["lbd", "ka", "cl"])?;
    let work = WorkDir::new("split")?;
    let vip = seg.vip4();
    let (lbd_mac, ka_mac) = (mac_string(&seg.mac(0)), mac_string(&seg.mac(1)));
    // The client learns from gratuitous ARPs (as routers do), and sends no traffic of its own.
    seg.nodes[2].sysctl("net.ipv4.conf.eth0.arp_accept", "1")?;
    let conf = KeepalivedConf {
        priority: 100,
        version: 3,
        advert_int: "0.1",
        vrid: 57,
        vip: &format!("{vip}/24"),
        auth_pass: None,
        unicast: None,
    };
    let ka = Keepalived::start(&seg.nodes[1], &work.0, &conf)?;
    ka.wait_state("MASTER", ms(5000))?;
    // No second burst after becoming master: every later announcement of lbd's is a
    // lower-priority one.
    let extra = "garp_master_delay = \"0s\"\ngarp_lower_prio_delay = \"0s\"";
    let lbd = InProcess::start(&seg.nodes[0], spec(&instance("VI_1", 57, 150, 3, "100ms", extra, &vip.to_string()))?)?;
    lbd.wait_state("VI_1", Master, ms(2000))?;
    ka.wait_state("BACKUP", ms(1000))?;
    wait_for(ms(1000), "the client's entry on lbd's MAC", || (clients_entry(&seg, vip.into()).ok()? == Some(lbd_mac.clone())).then_some(()))?;
    let announced = |st: &[lb_userspace::vrrp::VrrpInstanceStatus]| st[0].virtual_addresses[0].announcements;
    let before = announced(&lbd.status());

    // keepalived hears nothing from lbd any more (lbd still hears keepalived).
    seg.nodes[1].sh(
        "nft -f - <<'EOF'\ntable ip splitview {\n\
         chain in { type filter hook input priority 0; ip daddr 224.0.0.18 counter drop; }\n}\nEOF",
    )?;
    ka.wait_state("MASTER", ms(2000))?;
    let ka_master = Instant::now();
    // lbd answers keepalived's adverts with a burst (at most one a second).
    wait_for(ms(1500), "the client's entry back on lbd's MAC", || {
        (clients_entry(&seg, vip.into()).ok()? == Some(lbd_mac.clone())).then_some(())
    })?;
    assert_eq!(lbd.state("VI_1"), Some(Master));
    let after = announced(&lbd.status());
    ensure!(after >= before + 5, "lbd announced the VIP {} times since keepalived became master", after - before);
    assert!(!log_lines(&["advert from a lower-priority master", "10.97.7.2"]).is_empty());
    // keepalived's second burst (garp_master_delay, 5 s) takes the entry again; lbd answers its
    // next advert (at most one burst a second).
    std::thread::sleep((ka_master + ms(5300)).saturating_duration_since(Instant::now()));
    wait_for(ms(1500), "the client's entry on lbd's MAC after keepalived's second burst", || {
        (clients_entry(&seg, vip.into()).ok()? == Some(lbd_mac.clone())).then_some(())
    })?;

    // The view heals: keepalived hears lbd again and goes back to backup.
    seg.nodes[1].sh("nft delete table ip splitview")?;
    ka.wait_state("BACKUP", ms(2000))?;
    std::thread::sleep(ms(500));
    assert_eq!(clients_entry(&seg, vip.into())?, Some(lbd_mac.clone()), "not {ka_mac}");
    only_answers(&seg, vip.into(), seg.mac(0))?;
    ka.assert_no_complaints()?;
    Ok(())
}

/// A master whose adverts the kernel refuses (nftables dropping VRRP on output, so `sendto`
/// fails with EPERM) says so: its backups would take over while it stays MASTER. Status shows
/// the error and a count that grows, and the error clears once adverts go out again.
#[test]
fn a_master_that_cannot_send_its_adverts_says_so() -> Result<()> {
    require_root()?;
    let seg = Segment::new("vr8", 8, &["lbd"])?;
    let vip = seg.vip4();
    let lbd = InProcess::start(&seg.nodes[0], spec(&instance("VI_1", 58, 150, 3, "100ms", "", &vip.to_string()))?)?;
    lbd.wait_state("VI_1", Master, ms(2000))?;
    assert_eq!(lbd.status()[0].counters.advert_send_errors, 0);
    seg.nodes[0].sh(
        "nft -f - <<'EOF'\ntable ip novrrpout {\n chain out { type filter hook output priority 0; ip protocol vrrp drop; }\n}\nEOF",
    )?;
    let (st, _) = wait_for(ms(3000), "failed sends in status", || {
        let st = lbd.status().remove(0);
        (st.counters.advert_send_errors >= 3).then_some(st)
    })?;
    let error = st.send_error.clone().unwrap_or_default();
    assert_eq!(error, "sending to 224.0.0.18: Operation not permitted (os error 1)");
    let text = lb_userspace::vrrp::render_status(&[st]);
    assert!(text.contains("\n  NOT SENDING ADVERTS: sending to 224.0.0.18: Operation not permitted (os error 1)\n"), "{text}");
    assert!(text.lines().next().unwrap_or_default().contains(" send-errors "), "{text}");

    seg.nodes[0].sh("nft delete table ip novrrpout")?;
    wait_for(ms(3000), "the error to clear", || lbd.status()[0].send_error.is_none().then_some(()))?;
    let after = lbd.status().remove(0);
    assert!(after.counters.advert_send_errors >= 3 && after.state == Master, "{after:?}");
    Ok(())
}
