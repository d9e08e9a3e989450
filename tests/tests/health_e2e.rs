//! Health checks end to end (issue 3): the namespace rig with lbd's XDP fast path, nginx on the
//! backends, a client sending requests while backends fail and come back.
//!
//! Every check here runs every 500 ms with a 300 ms timeout, `rise = fall = 2`: a failure is acted
//! on within `fall × interval + timeout` = 1.3 s, plus 1 s of slack for scheduling, as the issue
//! allows.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::rig::{backend_name, backend_v4, Answer, KeepAlive, Rig, HTTP_PORT, VIP_V4};

const RISE_FALL: u32 = 2;
/// `fall × interval + timeout + 1 s` (the same for `rise`); the checks make no retries.
const BOUND: Duration = Duration::from_millis(500 * RISE_FALL as u64 + 300 + 1000);
const CHECK: &str = r#"{ kind = "http", path = "/healthz", interval = "500ms", timeout = "300ms", rise = 2, fall = 2, retries = 0 }"#;

fn require_root() -> Result<()> {
    ensure!(nix::unistd::geteuid().is_root(), "these tests need root (network namespaces, XDP): run them through `cargo xtask test`");
    Ok(())
}

fn vip() -> IpAddr {
    IpAddr::V4(VIP_V4)
}

/// The rig's director with one virtual server per `(port, extra keys, real servers)`.
fn config(socket: &Path, servers: &[(u16, &str, &[usize])]) -> String {
    let mut text = format!(
        "[director]\ninterface = \"eth0\"\nmode = \"xdp\"\ncontrol_socket = \"{}\"\n",
        socket.display()
    );
    for (port, extra, reals) in servers {
        text += &format!("\n[[virtual_server]]\naddress = \"{VIP_V4}\"\nport = {port}\n{extra}\n");
        for &i in reals.iter() {
            text += &format!("[[virtual_server.real_server]]\naddress = \"{}\"\n", backend_v4(i));
        }
    }
    text
}

fn start(prefix: &str, servers: &[(u16, &str, &[usize])]) -> Result<Rig> {
    require_root()?;
    let mut rig = Rig::up(prefix, 3)?;
    let path = rig.work.join("health.toml");
    std::fs::write(&path, config(&rig.socket, servers))?;
    rig.use_config(&path)?;
    rig.start_lbd()?;
    Ok(rig)
}

/// The status entry of real server `i` in the virtual server on `port`.
fn real_server(rig: &Rig, port: u16, i: usize) -> Result<serde_json::Value> {
    let st = rig.status()?;
    let vs = st["virtual_servers"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["port"] == port))
        .with_context(|| format!("no virtual server on port {port}"))?;
    let addr = backend_v4(i).to_string();
    vs["real_servers"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["address"] == addr.as_str()))
        .cloned()
        .with_context(|| format!("no real server {addr}"))
}

/// Polls until real server `i` of the virtual server on `port` is in `state`; returns how long
/// it took. Fails after `limit`.
fn wait_state(rig: &Rig, port: u16, i: usize, state: &str, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let rs = real_server(rig, port, i)?;
        if rs["state"] == state {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!("{} not {state} after {limit:?}: {rs}\n{}", backend_name(i), rig.lbd_log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn counts(answers: &[&Answer]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for a in answers {
        let key = a.result.clone().unwrap_or_else(|_| "failed".into());
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

/// Kept-alive connections from the client until one lands on each backend of `wanted` (each
/// new connection gets an ephemeral port, so it may land anywhere).
fn connections_to(rig: &Rig, wanted: &[usize]) -> Result<BTreeMap<usize, KeepAlive>> {
    let wanted = wanted.to_vec();
    rig.client.enter(move || -> Result<BTreeMap<usize, KeepAlive>> {
        let mut found = BTreeMap::new();
        for _ in 0..60 {
            let mut conn = KeepAlive::connect(SocketAddr::new(vip(), HTTP_PORT))?;
            let name = conn.get()?;
            let i = (0..3).find(|&i| backend_name(i) == name).context("unknown backend")?;
            if wanted.contains(&i) {
                found.entry(i).or_insert(conn);
            }
            if found.len() == wanted.len() {
                return Ok(found);
            }
        }
        bail!("no kept-alive connection reached each of {wanted:?} in 60 tries")
    })?
}

fn batch(rig: &Rig, n: usize) -> Result<BTreeMap<String, usize>> {
    rig.http_batch(vip(), n)
}

/// nginx stops on be2 while a client sends requests: within the bound, no new connection
/// reaches it and no request fails after that; a kept-alive connection to another backend is
/// untouched; nginx back → be2 gets new connections again after `rise`.
#[test]
fn a_failed_backend_leaves_the_table_and_returns() -> Result<()> {
    let rig = start("hcf", &[(80, &format!("health_check = {CHECK}"), &[0, 1, 2])])?;
    let mut kept = connections_to(&rig, &[0, 2])?;
    let client = rig.client_loop(vip(), 3000)?;
    std::thread::sleep(Duration::from_millis(500));

    let stopped = Instant::now();
    rig.stop_nginx(1)?;
    wait_state(&rig, 80, 1, "down", BOUND)?;
    println!("be2 out of the table {:?} after nginx was told to stop (bound {BOUND:?})", stopped.elapsed());
    let rs = real_server(&rig, 80, 1)?;
    assert_eq!(rs["health"]["down_reason"], "connection refused", "{rs}");
    std::thread::sleep(Duration::from_secs(2));
    let (_, text, _) = rig.lbd_cli(&["status", "--socket", &rig.socket.display().to_string()])?;
    println!("$ lbd status\n{text}");

    let restarted = Instant::now();
    rig.start_nginx(1)?;
    wait_state(&rig, 80, 1, "up", BOUND)?;
    println!("be2 back in the table {:?} after nginx was started again", restarted.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    let answers = client.stop()?;

    let during: Vec<&Answer> = answers.iter().filter(|a| a.sent >= stopped && a.sent < stopped + BOUND).collect();
    let after: Vec<&Answer> = answers.iter().filter(|a| a.sent >= stopped + BOUND && a.sent < restarted).collect();
    let back: Vec<&Answer> = answers.iter().filter(|a| a.sent >= restarted + BOUND).collect();
    println!("requests while be2 failed (within the bound): {:?}", counts(&during));
    println!("requests after the bound, before the restart:  {:?}", counts(&after));
    println!("requests after be2 came back:                  {:?}", counts(&back));
    assert!(after.len() >= 20, "too few requests to judge: {}", after.len());
    let after_counts = counts(&after);
    assert_eq!(after_counts.get("failed"), None, "requests failed after the bound: {after:?}");
    assert_eq!(after_counts.get("be2"), None, "be2 got new connections after the bound");
    assert!(counts(&back).get("be2").is_some_and(|&n| n > 0), "be2 got no new connections after it came back: {back:?}");
    assert_eq!(counts(&back).get("failed"), None, "requests failed after be2 came back");

    for (i, conn) in &mut kept {
        assert_eq!(conn.get()?, backend_name(*i), "the kept-alive connection moved");
    }
    let log = rig.lbd_log();
    assert_eq!(log.matches("real server down").count(), 1, "one line per change:\n{log}");
    assert!(log.contains("connection refused"), "{log}");
    Ok(())
}

/// With `inhibit_on_failure`, a failing backend keeps its established connection (weight 0) and
/// gets no new ones; when it passes again it takes new ones.
#[test]
fn inhibit_on_failure_keeps_established_connections() -> Result<()> {
    let rig = start("hci", &[(80, &format!("health_check = {CHECK}\ninhibit_on_failure = true"), &[0, 1, 2])])?;
    let mut kept = connections_to(&rig, &[1])?;
    rig.set_healthz(1, false)?;
    let took = wait_state(&rig, 80, 1, "inhibited", BOUND)?;
    println!("be2 inhibited {took:?} after /healthz failed");
    let rs = real_server(&rig, 80, 1)?;
    assert_eq!((rs["weight"].as_u64(), rs["health"]["down_reason"].as_str()), (Some(0), Some("HTTP 404")), "{rs}");

    let conn = kept.get_mut(&1).expect("connection to be2");
    for _ in 0..5 {
        assert_eq!(conn.get()?, "be2", "the established connection must stay on be2");
    }
    let new = batch(&rig, 60)?;
    assert_eq!(new.get("be2"), None, "new connections reached the inhibited backend: {new:?}");

    rig.set_healthz(1, true)?;
    wait_state(&rig, 80, 1, "up", BOUND)?;
    let new = batch(&rig, 90)?;
    assert!(new.get("be2").is_some_and(|&n| n > 0), "be2 takes no new connections after passing again: {new:?}");
    assert_eq!(conn.get()?, "be2");
    Ok(())
}

/// Fewer live real servers than `quorum`: the sorry server (be3, served in DSR like a real
/// server) answers everything, and the quorum commands run; back above quorum, the real servers
/// serve again.
#[test]
fn losing_quorum_sends_traffic_to_the_sorry_server() -> Result<()> {
    require_root()?;
    let work = std::env::temp_dir().join("lbd-rig-hcq");
    let (down, up) = (work.join("quorum-down"), work.join("quorum-up"));
    let extra = format!(
        "health_check = {CHECK}\nquorum = 2\nsorry_server = \"{}\"\nquorum_down = \"touch {}\"\nquorum_up = \"touch {}\"",
        backend_v4(2),
        down.display(),
        up.display()
    );
    let rig = start("hcq", &[(80, &extra, &[0, 1])])?;
    let before = batch(&rig, 40)?;
    assert_eq!(before.get("be3"), None, "the sorry server serves while there is quorum: {before:?}");

    rig.set_healthz(0, false)?;
    wait_state(&rig, 80, 0, "down", BOUND)?;
    // The check's state shows as soon as the check records it; the quorum once the controller
    // has applied the change (what the traffic below depends on).
    wait_quorum(&rig, false)?;
    let sorry = batch(&rig, 30)?;
    assert_eq!(sorry, BTreeMap::from([("be3".to_string(), 30)]), "without quorum only the sorry server answers");
    wait_file(&down)?;
    let (_, text, _) = rig.lbd_cli(&["status", "--socket", &rig.socket.display().to_string()])?;
    assert!(text.contains("quorum lost") && text.contains("(sorry server)"), "{text}");

    rig.set_healthz(0, true)?;
    wait_state(&rig, 80, 0, "up", BOUND)?;
    wait_quorum(&rig, true)?;
    let after = batch(&rig, 40)?;
    assert_eq!(after.get("be3"), None, "the sorry server still serves after quorum came back: {after:?}");
    assert!(after.contains_key("be1") && after.contains_key("be2"), "{after:?}");
    wait_file(&up)?;
    Ok(())
}

/// Waits until `lbd status` says the first virtual server has (`quorum`) or lacks quorum, with
/// its sorry server standing by or serving accordingly.
fn wait_quorum(rig: &Rig, quorum: bool) -> Result<()> {
    let want = (Some(quorum), Some(if quorum { "standby" } else { "serving" }));
    let start = Instant::now();
    loop {
        let st = rig.status()?;
        let vs = &st["virtual_servers"][0];
        if (vs["quorum"].as_bool(), vs["sorry_server"]["state"].as_str()) == want {
            return Ok(());
        }
        if start.elapsed() > BOUND {
            bail!("quorum not {quorum} after {BOUND:?}: {vs}\n{}", rig.lbd_log());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_file(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} was not created by the quorum command within 5 s", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// be2 loses the VIP from its loopback: its own address still answers, so only the `via = "vip"`
/// check (the virtual server of every port) takes it out; the `via = "real"` one (port 80) keeps
/// it.
#[test]
fn only_a_vip_path_check_sees_a_backend_without_the_vip() -> Result<()> {
    let real = r#"health_check = { kind = "tcp", interval = "500ms", timeout = "300ms", rise = 2, fall = 2, retries = 0 }"#;
    let via_vip = r#"health_check = { kind = "tcp", port = 80, via = "vip", interval = "500ms", timeout = "300ms", rise = 2, fall = 2, retries = 0 }"#;
    let rig = start("hcv", &[(80, real, &[0, 1]), (0, via_vip, &[0, 1])])?;
    // Probes wait for the real server's MAC (a tick before it is resolved gives no result): wait
    // for one through the VIP path.
    let syn_ack = format!("SYN-ACK from VIP {VIP_V4}:80");
    let deadline = Instant::now() + BOUND;
    let mut rs_reason = real_server(&rig, 0, 1)?["health"]["last_reason"].clone();
    while rs_reason != syn_ack.as_str() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        rs_reason = real_server(&rig, 0, 1)?["health"]["last_reason"].clone();
    }
    assert_eq!(rs_reason, syn_ack.as_str());
    assert!(!rig.lbd_log().contains("real server down"), "a healthy real server went down at the start:\n{}", rig.lbd_log());

    rig.backends[1].ip(&["addr", "del", &format!("{VIP_V4}/32"), "dev", "lo"])?;
    let took = wait_state(&rig, 0, 1, "down", BOUND)?;
    println!("the via = \"vip\" check took be2 out {took:?} after it lost the VIP");
    std::thread::sleep(Duration::from_secs(2));
    let vip_check = real_server(&rig, 0, 1)?;
    assert!(
        vip_check["health"]["down_reason"].as_str().is_some_and(|r| r.contains("no answer from the VIP")),
        "{vip_check}"
    );
    let real_check = real_server(&rig, 80, 1)?;
    assert_eq!((real_check["state"].as_str(), real_check["health"]["last_ok"].as_bool()), (Some("up"), Some(true)), "{real_check}");

    Ok(())
}
