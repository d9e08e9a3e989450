//! lbd in IPVS mode, end to end: the rig (client, director, three nginx backends) inside the VM
//! that boots Debian's kernel (the host kernel has no IPVS). Each test re-runs itself in the guest
//! (see `tests/src/vm.rs`) and costs one boot. On the host, a companion test checks that
//! `mode = "auto"` picks native XDP where it can.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context, Result};
use lb_tests::{
    failover::{client_neigh, director_mac, Pair, PairOptions},
    netns::{require_root, Netns},
    rig::{self, backend_name, backend_v4, KeepAlive, Rig, VIP_V4},
    seccomp,
    vm::{test_path, vm_test},
    vrrp::{arping, mac_string, wait_for},
};
use lb_userspace::{
    ipvs_dataplane::IpvsDataplane,
    vrrp::VrrpState::{Backup, Master},
};
use nix::sys::signal::Signal;

/// A config for the rig's director in `mode` with one TCP VIP on port 80 over the three backends.
fn config(rig: &Rig, mode: &str, extra_vs: &str) -> String {
    let mut text = format!(
        "[director]\ninterface = \"eth0\"\nmode = \"{mode}\"\ncontrol_socket = \"{}\"\n\n\
         [[virtual_server]]\naddress = \"{VIP_V4}\"\nport = 80\n{extra_vs}\n",
        rig.socket.display()
    );
    for i in 0..3 {
        text += &format!("[[virtual_server.real_server]]\naddress = \"{}\"\n", backend_v4(i));
    }
    text
}

/// `ipvsadm -Ln` in the director's namespace, without the counters (they move).
fn ipvsadm(rig: &Rig) -> Result<String> {
    ipvsadm_in(&rig.director)
}

/// `ipvsadm -Ln` in `ns`, without the counters.
fn ipvsadm_in(ns: &Netns) -> Result<String> {
    let out = ns.exec(&["ipvsadm", "-Ln"])?;
    Ok(out
        .lines()
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // "  -> RemoteAddress:Port Forward Weight ActiveConn InActConn": drop the last two.
            if cols.first() == Some(&"->") && cols.len() == 6 && cols[1] != "RemoteAddress:Port" {
                cols[..4].join(" ")
            } else {
                cols.join(" ")
            }
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Every backend answered, none with less than 15 % of the requests (IPVS's mh hashes with a key
/// chosen at boot, so the exact split differs between runs; 15 % is > 6σ below a third).
fn assert_spread(counts: &std::collections::BTreeMap<String, usize>, total: usize) {
    assert_eq!(counts.len(), 3, "all three backends must answer: {counts:?}");
    assert!(counts.values().all(|&n| n * 100 >= total * 15), "uneven spread: {counts:?}");
}

fn open_connection(rig: &Rig) -> Result<(KeepAlive, String)> {
    let vip = SocketAddr::new(IpAddr::V4(VIP_V4), rig::HTTP_PORT);
    rig.client.enter(move || -> Result<(KeepAlive, String)> {
        let mut c = KeepAlive::connect(vip)?;
        let owner = c.get()?;
        Ok((c, owner))
    })?
}

fn still_served(rig: &Rig, mut conn: KeepAlive, owner: &str) -> Result<KeepAlive> {
    let (got, conn) = rig.client.enter(move || -> Result<(Vec<String>, KeepAlive)> {
        let got = (0..3).map(|_| conn.get()).collect::<Result<_>>()?;
        Ok((got, conn))
    })??;
    if got.iter().any(|b| b != owner) {
        bail!("the open connection moved from {owner}: {got:?}");
    }
    Ok(conn)
}

#[test]
fn ipvs_dsr_drain_restart_and_hand_added_services() {
    vm_test(&test_path(module_path!(), "ipvs_dsr_drain_restart_and_hand_added_services"), || {
        dsr_drain_restart().unwrap()
    })
}

fn dsr_drain_restart() -> Result<()> {
    let mut rig = Rig::up("ipv1", 3)?;
    // The director ran XDP mode before: the fast path that lbd kept at its stop would see the
    // VIP's packets before IPVS. The IPVS start removes it once IPVS serves.
    std::fs::write(&rig.config, config(&rig, "xdp", ""))?;
    rig.start_lbd()?;
    assert_eq!(rig.status()?["dataplane"], "xdp");
    rig.stop_lbd();
    assert!(rig.director.xdp_program("eth0")?.is_some(), "the XDP fast path is kept at the stop");
    // A service an operator added by hand: lbd must leave it alone.
    rig.director.exec(&["ipvsadm", "-A", "-t", "10.99.0.200:8080", "-s", "rr"])?;
    std::fs::write(&rig.config, config(&rig, "ipvs", "mh_port = true"))?;
    rig.start_lbd()?;
    let st = rig.status()?;
    assert_eq!(st["dataplane"], "ipvs", "{st}");
    assert_eq!(rig.director.xdp_program("eth0")?, None, "{}", rig.lbd_log());
    assert!(rig.lbd_log().contains("removed the XDP fast path on eth0 an earlier lbd in XDP mode kept"), "{}", rig.lbd_log());
    assert!(!lb_userspace::keep::Keep::for_socket(&rig.socket).pin_dir.exists());

    let table = ipvsadm(&rig)?;
    assert!(table.contains("TCP 10.99.0.100:80 mh (mh-fallback,mh-port)"), "{table}");
    for i in 0..3 {
        assert!(table.contains(&format!("-> {}:80 Route 1", backend_v4(i))), "{table}");
    }
    assert!(table.contains("TCP 10.99.0.200:8080 rr"), "{table}");
    assert_spread(&rig.http_batch(IpAddr::V4(VIP_V4), 150)?, 150);

    // Drain: weight 0 in IPVS, the open connection stays, new ones avoid the backend.
    let (conn, owner) = open_connection(&rig)?;
    let idx = (0..3).find(|&i| backend_name(i) == owner).context("a backend name")?;
    // `lbd status` shows IPVS's ActiveConn of the connection's real server, as ipvsadm -Ln does.
    let st = rig.status()?;
    let owner_rs = st["virtual_servers"][0]["real_servers"]
        .as_array()
        .and_then(|rss| rss.iter().find(|rs| rs["address"] == backend_v4(idx).to_string()))
        .context("the owner in lbd status")?
        .clone();
    assert!(owner_rs["active_conns"].as_u64() >= Some(1), "{owner_rs}");
    let sock = rig.socket.display().to_string();
    let backend = backend_v4(idx).to_string();
    let (code, _, err) = rig.lbd_cli(&["backend", "drain", "10.99.0.100:80", &backend, "--socket", &sock])?;
    assert_eq!(code, 0, "{err}");
    assert!(ipvsadm(&rig)?.contains(&format!("-> {backend}:80 Route 0")), "{}", ipvsadm(&rig)?);
    let conn = still_served(&rig, conn, &owner)?;
    let after = rig.http_batch(IpAddr::V4(VIP_V4), 60)?;
    assert!(!after.contains_key(&owner), "{owner} is drained but got new connections: {after:?}");
    rig.lbd_cli(&["backend", "enable", "10.99.0.100:80", &backend, "--socket", &sock])?;

    // Restart lbd: the connection survives, IPVS is unchanged, the hand-made service too.
    let before = ipvsadm(&rig)?;
    rig.stop_lbd();
    let conn = still_served(&rig, conn, &owner)?;
    rig.start_lbd()?;
    assert_eq!(ipvsadm(&rig)?, before, "a restart must not change IPVS");
    let conn = still_served(&rig, conn, &owner)?;

    // Removing the VIP from the config removes lbd's service, and only that.
    std::fs::write(&rig.config, config(&rig, "ipvs", "mh_port = true").split("[[virtual_server]]").next().unwrap())?;
    let (code, _, err) = rig.lbd_cli(&["reload", "--socket", &sock])?;
    assert_eq!(code, 0, "{err}");
    let table = ipvsadm(&rig)?;
    assert!(!table.contains("10.99.0.100:80"), "{table}");
    assert!(table.contains("TCP 10.99.0.200:8080 rr"), "{table}");
    drop(conn);

    // A service made by hand with the key of a configured one is not taken over: the reload is
    // refused, naming it as ipvsadm does, and IPVS stays as it was. Once it is deleted by hand,
    // the same config goes in.
    rig.director.exec(&["ipvsadm", "-A", "-t", "10.99.0.100:80", "-s", "rr"])?;
    rig.director.exec(&["ipvsadm", "-a", "-t", "10.99.0.100:80", "-r", "10.99.0.99", "-g"])?;
    let by_hand = ipvsadm(&rig)?;
    std::fs::write(&rig.config, config(&rig, "ipvs", "mh_port = true"))?;
    let (code, _, err) = rig.lbd_cli(&["reload", "--socket", &sock])?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("IPVS already has TCP 10.99.0.100:80, a virtual service lbd did not create")
            && err.contains("delete it (ipvsadm -D -t 10.99.0.100:80) or remove it from the config"),
        "{err}"
    );
    assert_eq!(ipvsadm(&rig)?, by_hand, "the hand-made service must stay as it was");
    rig.director.exec(&["ipvsadm", "-D", "-t", "10.99.0.100:80"])?;
    let (code, _, err) = rig.lbd_cli(&["reload", "--socket", &sock])?;
    assert_eq!(code, 0, "{err}");
    let table = ipvsadm(&rig)?;
    assert!(table.contains("TCP 10.99.0.100:80 mh (mh-fallback,mh-port)") && !table.contains("10.99.0.99"), "{table}");

    // With bpf() blocked (a kernel without BPF), mode = "auto" starts and picks IPVS.
    rig.stop_lbd();
    std::fs::write(&rig.config, config(&rig, "auto", ""))?;
    rig.start_lbd_with(seccomp::block_bpf)?;
    let st = rig.status()?;
    assert_eq!(st["dataplane"], "ipvs", "{st}");
    let log = rig.lbd_log();
    assert!(
        log.contains("mode auto picked IPVS") && log.contains("native XDP: the kernel has no bpf() system call"),
        "one line saying what auto picked and why: {log}"
    );
    // Plain mh hashes the client address only: one client lands on one real server.
    assert_eq!(rig.http_batch(IpAddr::V4(VIP_V4), 30)?.values().sum::<usize>(), 30);

    // Back to XDP: lbd's IPVS service goes once the fast path serves (IPVS would forward what the
    // fast path passes to the kernel, a VRRP backup's VIPs), the hand-made one stays.
    rig.stop_lbd();
    std::fs::write(&rig.config, config(&rig, "xdp", ""))?;
    rig.start_lbd()?;
    assert_eq!(rig.status()?["dataplane"], "xdp");
    let table = ipvsadm(&rig)?;
    assert!(!table.contains("10.99.0.100:80") && table.contains("TCP 10.99.0.200:8080 rr"), "{table}");
    assert!(
        rig.lbd_log().contains("deleted the IPVS services an earlier lbd in IPVS mode created (TCP 10.99.0.100:80)"),
        "{}",
        rig.lbd_log()
    );
    assert!(!IpvsDataplane::state_file_for(&rig.socket).exists());
    assert_spread(&rig.http_batch(IpAddr::V4(VIP_V4), 150)?, 150);
    Ok(())
}

#[test]
fn ipvs_nat_forwards_and_rewrites_back() {
    vm_test(&test_path(module_path!(), "ipvs_nat_forwards_and_rewrites_back"), || nat().unwrap())
}

fn nat() -> Result<()> {
    let mut rig = Rig::up("ipv2", 3)?;
    // NAT: replies must return through the director, which rewrites them back to the VIP.
    rig.director.sysctl("net.ipv4.ip_forward", "1")?;
    for key in ["all", "eth0"] {
        rig.director.sysctl(&format!("net.ipv4.conf.{key}.send_redirects"), "0")?;
    }
    for be in &rig.backends {
        be.ip(&["route", "add", &format!("{}/32", rig::CLIENT_V4), "via", &rig::DIRECTOR_V4.to_string()])?;
        // The VIP must not be local on a NAT real server: they answer as themselves.
        be.ip(&["addr", "del", &format!("{VIP_V4}/32"), "dev", "lo"])?;
    }
    std::fs::write(&rig.config, config(&rig, "ipvs", "forwarding = \"nat\"\nscheduler = \"rr\""))?;
    rig.start_lbd()?;
    let table = ipvsadm(&rig)?;
    assert!(table.contains("TCP 10.99.0.100:80 rr"), "{table}");
    assert!(table.contains(&format!("-> {}:80 Masq 1", backend_v4(0))), "{table}");
    let counts = rig.http_batch(IpAddr::V4(VIP_V4), 60)?;
    // rr over three: exactly a third each.
    assert!(counts.values().all(|&n| n == 20), "{counts:?}");
    Ok(())
}

#[test]
fn ipvs_health_check_failure_removes_the_backend() {
    vm_test(&test_path(module_path!(), "ipvs_health_check_failure_removes_the_backend"), || {
        health_check().unwrap()
    })
}

/// The same checks and bound as the XDP mode's (`tests/tests/health_e2e.rs`): every 500 ms, 300 ms
/// timeout, no retries, fall = rise = 2: acted on within `fall × interval + timeout + 1 s`.
fn health_check() -> Result<()> {
    use std::time::{Duration, Instant};
    const BOUND: Duration = Duration::from_millis(2 * 500 + 300 + 1000);
    let check = r#"health_check = { kind = "http", path = "/healthz", interval = "500ms", timeout = "300ms", rise = 2, fall = 2, retries = 0 }"#;
    let mut rig = Rig::up("ipv4", 3)?;
    std::fs::write(&rig.config, config(&rig, "ipvs", &format!("scheduler = \"rr\"\n{check}")))?;
    rig.start_lbd()?;
    let be2 = format!("-> {}:80 Route 1", backend_v4(1));
    assert!(ipvsadm(&rig)?.contains(&be2), "{}", ipvsadm(&rig)?);

    let wait = |present: bool| -> Result<()> {
        let start = Instant::now();
        while ipvsadm(&rig)?.contains(&be2) != present {
            if start.elapsed() > BOUND {
                bail!("be2 still {} IPVS after {BOUND:?}:\n{}\n{}", if present { "missing from" } else { "in" }, ipvsadm(&rig)?, rig.lbd_log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    };
    rig.stop_nginx(1)?;
    wait(false)?;
    let st = rig.status()?;
    assert_eq!(st["virtual_servers"][0]["real_servers"][1]["state"], "down", "{st}");
    // rr over the two left: every request answered, none by be2.
    let counts = rig.http_batch(IpAddr::V4(VIP_V4), 40)?;
    assert_eq!(counts, [("be1".to_string(), 20), ("be3".to_string(), 20)].into(), "{counts:?}");

    rig.start_nginx(1)?;
    wait(true)?;
    let counts = rig.http_batch(IpAddr::V4(VIP_V4), 30)?;
    assert!(counts.values().all(|&n| n == 10), "{counts:?}");
    Ok(())
}

#[test]
fn ipvs_vrrp_failover_moves_the_services_and_the_vip() {
    vm_test(&test_path(module_path!(), "ipvs_vrrp_failover_moves_the_services_and_the_vip"), || {
        ipvs_vrrp_failover().unwrap()
    })
}

/// Two directors in `mode = "ipvs"` with one `[[vrrp_instance]]` each, set up as README's failover
/// section says (the VIP on `lo`, `arp_ignore`/`arp_announce` on `eth0`): only the MASTER has the
/// services in IPVS and answers ARP for the VIP; when it is killed, the backup takes the VIP (its
/// gratuitous ARP moves the client), installs the services and serves new connections; when the
/// first comes back it preempts and the other withdraws its services again.
fn ipvs_vrrp_failover() -> Result<()> {
    use std::time::Duration;
    const LIMIT: Duration = Duration::from_secs(15);
    // 1 s adverts (Master_Down_Interval about 3.6 s): the guest is emulated, 100 ms timers could
    // flap under its load.
    let mut p = Pair::up("ivr", PairOptions { mode: "ipvs", advert_interval: "1s", ..Default::default() })?;
    p.vip_on_lo()?;
    fn has_service(p: &Pair, i: usize) -> Result<bool> {
        Ok(ipvsadm_in(p.ns(i))?.contains(&format!("TCP {VIP_V4}:80 mh")))
    }
    /// Every request answered (IPVS's plain mh hashes the client address only, so one client's
    /// requests all go to one real server).
    fn serves(p: &Pair, who: &str) -> Result<()> {
        let counts = p.rig.http_batch(IpAddr::V4(VIP_V4), 30)?;
        if counts.values().sum::<usize>() != 30 {
            bail!("through {who}, answers: {counts:?}");
        }
        Ok(())
    }

    p.start(0)?;
    p.wait_state(0, Master, LIMIT)?;
    p.start(1)?;
    p.wait_state(1, Backup, LIMIT)?;
    wait_for(LIMIT, "the master's IPVS service", || has_service(&p, 0).ok().filter(|&h| h))?;
    assert!(!has_service(&p, 1)?, "the backup has the service:\n{}", ipvsadm_in(p.ns(1))?);
    let table = ipvsadm_in(p.ns(0))?;
    for i in 0..3 {
        assert!(table.contains(&format!("-> {}:80 Route 1", backend_v4(i))), "{table}");
    }
    assert_eq!(arping(&p.rig.client, VIP_V4)?, [mac_string(&director_mac(0))].into(), "only the master answers ARP");
    serves(&p, "the master")?;
    assert_eq!(client_neigh(&p.rig)?, mac_string(&director_mac(0)));

    p.signal(0, Signal::SIGKILL)?;
    p.wait_exit(0, LIMIT)?;
    p.wait_state(1, Master, LIMIT)?;
    wait_for(LIMIT, "the new master's IPVS service", || has_service(&p, 1).ok().filter(|&h| h))?;
    let director1 = mac_string(&director_mac(1));
    wait_for(LIMIT, "the client's ARP entry to follow the gratuitous ARP", || {
        client_neigh(&p.rig).ok().filter(|mac| *mac == director1)
    })?;
    assert_eq!(arping(&p.rig.client, VIP_V4)?, [director1.clone()].into(), "only the new master answers ARP");
    serves(&p, "the new master")?;

    // Director 0 back, with the higher priority: it preempts, director 1 withdraws its service.
    p.start(0)?;
    p.wait_state(0, Master, LIMIT)?;
    p.wait_state(1, Backup, LIMIT)?;
    wait_for(LIMIT, "the backup to withdraw its IPVS service", || has_service(&p, 1).ok().filter(|&h| !h))?;
    assert!(has_service(&p, 0)?, "{}", ipvsadm_in(p.ns(0))?);
    assert_eq!(arping(&p.rig.client, VIP_V4)?, [mac_string(&director_mac(0))].into(), "only the master answers ARP");
    serves(&p, "the master again")
}

#[test]
fn auto_mode_picks_native_xdp_on_the_host() -> Result<()> {
    if lb_tests::vm::in_vm() {
        return Ok(()); // this one is about the host
    }
    require_root()?;
    let mut rig = Rig::up("ipv3", 3)?;
    std::fs::write(&rig.config, config(&rig, "auto", ""))?;
    rig.start_lbd()?;
    let st = rig.status()?;
    assert_eq!((st["dataplane"].as_str(), st["description"].as_str()), (Some("xdp"), Some("native XDP on eth0")), "{st}");
    assert!(rig.lbd_log().contains("mode auto picked native XDP on eth0"), "{}", rig.lbd_log());
    assert_eq!(rig.http_batch(IpAddr::V4(VIP_V4), 30)?.len(), 3);
    Ok(())
}
