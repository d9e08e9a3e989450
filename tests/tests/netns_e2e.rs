//! End-to-end tests in a namespace rig: a client, lbd on a director with native XDP, three nginx
//! backends answering the client directly (DSR). Run as root by `cargo xtask test`.

use std::net::{IpAddr, SocketAddr};

use lb_tests::{
    netns::{require_root, Netns},
    rig::{self, backend_name, backend_v4, KeepAlive, Rig, DIRECTOR_V4, VIP_V4, VIP_V6},
};

/// Every backend answered, each about a third. A fair split gives a backend Binomial(total, 1/3)
/// requests (σ = √(2·total)/3: 4.5 of 90, 8.2 of 300); the rig's source ports are fixed, so a
/// given flow hash always gives the same split, and the bound is 4σ (a fair hash misses it about
/// once in 5,000 such checks) rather than a percentage, which at 90 requests was only 1.7σ.
fn assert_spread(counts: &std::collections::BTreeMap<String, usize>, total: usize) {
    let third = total as f64 / 3.0;
    let bound = 4.0 * (2.0 * total as f64).sqrt() / 3.0;
    assert_eq!(counts.len(), 3, "all three backends must answer: {counts:?}");
    for (name, n) in counts {
        let dev = (*n as f64 - third).abs();
        assert!(dev <= bound, "{name} served {n} of {total} requests, more than 4σ ({bound:.1}) off a third: {counts:?}");
    }
}

#[test]
fn http_spreads_over_backends_and_replies_bypass_the_director() -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up("lte1", 3)?;
    rig.start_lbd()?;
    let not_vip_before = rig.reason_packets("not-vip")?;
    let counts = rig.http_batch(IpAddr::V4(VIP_V4), 300)?;
    assert_spread(&counts, 300);

    let st = rig.status()?;
    let http = &st["virtual_servers"][0];
    assert_eq!(http["address"], "10.99.0.100");
    assert_eq!(http["traffic"]["conns"], 300, "one new flow per request: {http}");
    // Each request is at least SYN, ACK, request, FIN/ACK from the client: ≥ 4 packets. The
    // answers (SYN-ACK, response, FIN...) would be counted as not-vip had they crossed the
    // director; only stray ARP/ND may appear there.
    let forwarded = http["traffic"]["packets"].as_u64().unwrap();
    assert!(forwarded >= 1200, "director forwarded {forwarded} packets for 300 requests");
    let not_vip = rig.reason_packets("not-vip")? - not_vip_before;
    assert!(not_vip < 30, "{not_vip} non-VIP packets reached the director: replies must bypass it");
    // One connection-table entry per connection (counted off lbd's run loop; a client port
    // reused within the batch would share one).
    let tracked = st["conntrack_entries"].as_u64().unwrap();
    assert!((280..=300).contains(&tracked), "{tracked} tracked connections after 300 requests");

    // The text view names every backend with its counters.
    let sock = rig.socket.display().to_string();
    let (code, text, _) = rig.lbd_cli(&["status", "--socket", &sock])?;
    assert_eq!(code, 0);
    assert!(text.contains("TCP  10.99.0.100:80"), "{text}");
    for i in 0..3 {
        assert!(text.contains(&format!("-> {}:80", backend_v4(i))), "{text}");
    }

    // A Prometheus scrape (config/rig.toml's metrics_listen, inside the director's namespace)
    // says the same: 300 connections, each real server's packets, all up.
    let metrics = rig.director.exec(&["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9180/metrics"])?;
    let value = |line: &str| -> u64 {
        let found = metrics.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("no {line} in:\n{metrics}"));
        found.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let vs = "virtual_server=\"10.99.0.100:80\",protocol=\"tcp\"";
    assert_eq!(value(&format!("lbd_virtual_server_connections_total{{{vs}}} ")), 300);
    let mut per_backend = 0;
    for i in 0..3 {
        let rs = format!("{vs},real_server=\"{}:80\"", backend_v4(i));
        let packets = value(&format!("lbd_real_server_packets_total{{{rs}}} "));
        assert!(packets > 0, "backend {i} got no packets:\n{metrics}");
        per_backend += packets;
        assert_eq!(value(&format!("lbd_real_server_state{{{rs},state=\"up\"}} ")), 1);
    }
    assert!(per_backend >= forwarded, "real servers' packets {per_backend} < the VIP's {forwarded}");
    Ok(())
}

#[test]
fn udp_and_ipv6_vips_work_the_same_way() -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up("lte2", 3)?;
    rig.start_lbd()?;
    let udp = rig.udp_batch(150)?;
    assert_spread(&udp, 150);
    let v6 = rig.http_batch(IpAddr::V6(VIP_V6), 150)?;
    assert_spread(&v6, 150);
    Ok(())
}

#[test]
fn long_lived_connection_keeps_its_backend_when_another_is_removed() -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up("lte3", 3)?;
    rig.start_lbd()?;
    let vip = SocketAddr::new(IpAddr::V4(VIP_V4), rig::HTTP_PORT);
    let socket = rig.socket.clone();
    let config = rig.config.clone();
    // Open the connection, learn its backend, remove another backend from the config, reload.
    let (mut conn, owner) = rig.client.enter(move || -> anyhow::Result<(KeepAlive, String)> {
        let mut c = KeepAlive::connect(vip)?;
        let owner = c.get()?;
        Ok((c, owner))
    })??;
    let owner_idx = (0..3).find(|&i| backend_name(i) == owner).expect("a backend name");
    let removed = (owner_idx + 1) % 3;
    let reals: Vec<IpAddr> = (0..3).filter(|&i| i != removed).map(|i| IpAddr::V4(backend_v4(i))).collect();
    std::fs::write(&config, rig::custom_config(&socket, "native", &[(IpAddr::V4(VIP_V4), 80, "tcp", reals)]))?;
    let sock = socket.display().to_string();
    let (code, out, err) = rig.lbd_cli(&["reload", "--socket", &sock])?;
    assert_eq!(code, 0, "reload failed: {out}{err}");

    let still = rig.client.enter(move || -> anyhow::Result<Vec<String>> {
        (0..5).map(|_| conn.get()).collect()
    })??;
    assert!(still.iter().all(|b| *b == owner), "the open connection moved: {owner} then {still:?}");
    let after = rig.http_batch(IpAddr::V4(VIP_V4), 60)?;
    assert!(!after.contains_key(&backend_name(removed)), "removed backend still gets new connections: {after:?}");
    assert_eq!(after.len(), 2, "{after:?}");
    Ok(())
}

#[test]
fn bad_reload_is_refused_and_traffic_continues() -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up("lte4", 3)?;
    rig.start_lbd()?;
    let before = rig.status()?["virtual_servers"].clone();
    std::fs::write(&rig.config, "[director]\ninterface = \"eth0\"\ntabel_size = 5\n")?;
    let sock = rig.socket.display().to_string();
    let (code, _, err) = rig.lbd_cli(&["reload", "--socket", &sock])?;
    assert_eq!(code, 2, "a config refused for a mistake in it: exit 2, as lbd check: {err}");
    let want = format!("{}:3:1: unknown key `tabel_size` in [director]", rig.config.display());
    assert!(err.contains(&want), "reload error should point at the key: {err}");
    assert_eq!(rig.status()?["virtual_servers"].as_array().map(Vec::len), before.as_array().map(Vec::len));
    assert_spread(&rig.http_batch(IpAddr::V4(VIP_V4), 90)?, 90);
    Ok(())
}

/// `Type=notify` (config/lbd.service): lbd says READY=1 only once its fast path is attached and
/// its control socket answers (`systemctl start` returns then), RELOADING=1 then READY=1 around
/// a reload, with a refused reload's message in the status line, and STOPPING=1 at a stop.
#[test]
fn systemd_hears_when_lbd_serves_reloads_and_stops() -> anyhow::Result<()> {
    use std::{sync::mpsc, time::Duration};
    require_root()?;
    let mut rig = Rig::up("ltes", 3)?;
    let path = rig.work.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&path)?;
    notify.set_read_timeout(Some(Duration::from_secs(30)))?;
    // Each message, and for the first what is true the moment it arrived: the director's eth0
    // and `lbd status`'s exit code.
    let (tx, rx) = mpsc::channel::<(String, Option<(String, i32)>)>();
    let (ns, sock) = (rig.director.name.clone(), rig.socket.display().to_string());
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut first = true;
        while let Ok(n) = notify.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let seen = first.then(|| {
                let link = lb_tests::netns::run(&["ip", "-n", &ns, "-d", "link", "show", "eth0"]).unwrap_or_default();
                let status = rig::lbd_binary().and_then(|bin| Ok(std::process::Command::new(bin).args(["status", "--socket", &sock]).output()?));
                (link, status.map_or(-1, |s| s.status.code().unwrap_or(-1)))
            });
            first = false;
            if tx.send((msg, seen)).is_err() {
                break;
            }
        }
    });
    let next = || rx.recv_timeout(Duration::from_secs(30)).map_err(|_| anyhow::anyhow!("nothing more from lbd on NOTIFY_SOCKET"));
    rig.start_lbd_with(|cmd| {
        cmd.env("NOTIFY_SOCKET", &path);
    })?;
    let good = std::fs::read_to_string(&rig.config)?;
    let count = |header: &str| good.lines().filter(|l| *l == header).count();
    let serving = format!(
        "STATUS=serving {} virtual servers, {} real servers (native XDP on eth0)",
        count("[[virtual_server]]"),
        count("[[virtual_server.real_server]]")
    );

    let (ready, seen) = next()?;
    let (link, status) = seen.expect("the first message");
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.contains(&format!("{serving}\n")), "{ready:?}");
    assert!(link.contains("prog/xdp id "), "READY=1 before the fast path was attached: {link}");
    assert_eq!(status, 0, "READY=1 before `lbd status` was answered");

    let (code, _, err) = rig.lbd_cli(&["reload", "--socket", &rig.socket.display().to_string()])?;
    assert_eq!(code, 0, "{err}");
    let (reloading, _) = next()?;
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading:?}");
    let (ready, _) = next()?;
    assert!(ready.lines().any(|l| l == "READY=1") && !ready.contains("refused"), "{ready:?}");

    let line = good.lines().position(|l| l == "[director]").expect("a [director] table") + 2;
    std::fs::write(&rig.config, good.replacen("\n[director]\n", "\n[director]\ntabel_size = 5\n", 1))?;
    rig.lbd_cli(&["reload", "--socket", &rig.socket.display().to_string()])?;
    assert!(next()?.0.starts_with("RELOADING=1\n"));
    let (ready, _) = next()?;
    let refused = format!("{serving}; reload refused: {}:{line}:1: unknown key `tabel_size` in [director]", rig.config.display());
    assert!(ready.lines().any(|l| l == "READY=1") && ready.contains(&refused), "{ready:?}");

    rig.stop_lbd();
    let (stopping, _) = next()?;
    assert_eq!(stopping, "STOPPING=1\nSTATUS=stopping\n");
    Ok(())
}

#[test]
fn traffic_to_the_director_itself_is_untouched() -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up("lte5", 3)?;
    rig.start_lbd()?;
    // A service of the director's own, on its own address, and ping.
    let listener = rig.director.enter(|| std::net::TcpListener::bind((DIRECTOR_V4, 8080)))??;
    let server = std::thread::spawn(move || -> anyhow::Result<()> {
        use std::io::Write;
        let (mut s, _) = listener.accept()?;
        s.write_all(b"director\n")?;
        Ok(())
    });
    let got = rig.client.enter(|| -> anyhow::Result<String> {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(DIRECTOR_V4), 8080), std::time::Duration::from_secs(2))?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })??;
    server.join().expect("server thread")?;
    assert_eq!(got, "director\n");
    rig.client.exec(&["ping", "-c", "2", "-W", "1", &DIRECTOR_V4.to_string()])?;
    assert!(rig.reason_packets("not-vip")? > 0, "the director's own traffic passes as not-vip");
    Ok(())
}

#[test]
fn generic_xdp_mode_forwards_too() -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up("lte6", 3)?;
    let reals = (0..3).map(|i| IpAddr::V4(backend_v4(i))).collect();
    std::fs::write(&rig.config, rig::custom_config(&rig.socket, "generic", &[(IpAddr::V4(VIP_V4), 80, "tcp", reals)]))?;
    rig.start_lbd()?;
    assert_eq!(rig.status()?["xdp_mode"], "generic");
    assert_spread(&rig.http_batch(IpAddr::V4(VIP_V4), 90)?, 90);
    Ok(())
}

/// `mode = "auto"` on an interface whose driver has no native XDP (a bridge) runs generic XDP.
/// Its restart takes that fast path over, connection tables and all, instead of trying native
/// first: that would detach it (one XDP mode per interface) and, failing, discard the tables.
#[test]
fn auto_mode_restart_takes_over_generic_xdp() -> anyhow::Result<()> {
    auto_mode_restart_in_generic("lteb", "br9", Some(false))
}

/// The same on a veth whose MTU (9000) is too large for native XDP: the kernel reports native
/// support, but the attach fails, so auto runs generic. Before, a restart tried native first
/// because of that report, detached the kept fast path and dropped its connection tables.
#[test]
fn auto_mode_restart_takes_over_generic_xdp_where_native_was_refused() -> anyhow::Result<()> {
    auto_mode_restart_in_generic("lten", "va", Some(true))
}

/// Two `lbd run` with `mode = "auto"` on interface `dev` (`br9`, a bridge, or `va`, a veth of
/// MTU 9000), which must run generic XDP: the second takes the first one's fast path over. `native`:
/// what the kernel reports of `dev`'s native XDP support.
fn auto_mode_restart_in_generic(prefix: &str, dev: &str, native: Option<bool>) -> anyhow::Result<()> {
    require_root()?;
    let ns = Netns::new(&format!("{prefix}-dir"))?;
    ns.ip(&["link", "add", "br9", "type", "bridge"])?;
    ns.ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"])?;
    for veth in ["va", "vb"] {
        ns.ip(&["link", "set", veth, "mtu", "9000"])?;
    }
    for dev in ["br9", "va", "vb"] {
        ns.ip(&["link", "set", dev, "up"])?;
    }
    let index = |dev: &str| -> anyhow::Result<u32> { Ok(ns.exec(&["cat", &format!("/sys/class/net/{dev}/ifindex")])?.trim().parse()?) };
    let ifindex = index(dev)?;
    assert_eq!(ns.enter(move || lb_userspace::links::native_xdp(ifindex))?, native, "the kernel's XDP features of {dev}");

    let dir = std::env::temp_dir().join(format!("lbd-{prefix}"));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("lbd.sock");
    let guard = rig::KeptFor::fresh(&socket)?;
    let keep = &guard.0;
    let config = dir.join("auto.toml");
    let text = rig::custom_config(&socket, "native", &[(IpAddr::V4(VIP_V4), 80, "tcp", vec![])])
        .replace("interface = \"eth0\"", &format!("interface = \"{dev}\""))
        .replace("mode = \"xdp\"\nxdp_mode = \"native\"\n", "mode = \"auto\"\n");
    std::fs::write(&config, text)?;
    let log = dir.join("lbd.log");
    std::fs::write(&log, "")?;
    let lbd = rig::lbd_binary()?;
    let sock = socket.display().to_string();
    let status = || -> anyhow::Result<serde_json::Value> {
        let out = std::process::Command::new(&lbd).args(["status", "--json", "--socket", &sock]).output()?;
        anyhow::ensure!(out.status.success(), "lbd status: {}", String::from_utf8_lossy(&out.stderr));
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    // Stopped (SIGTERM) when dropped, so that a failed assertion leaves no lbd behind.
    struct Running(std::process::Child);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = self.0.wait();
        }
    }
    let run = || -> anyhow::Result<Running> {
        let mut child = Running(ns.spawn_net_with(&[lbd.to_str().unwrap(), "run", "--config", config.to_str().unwrap()], |cmd| {
            let f = std::fs::OpenOptions::new().append(true).open(&log).expect("log file");
            cmd.stdout(f.try_clone().expect("log file")).stderr(f);
        })?);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while status().is_err() {
            if let Some(code) = child.0.try_wait()? {
                anyhow::bail!("lbd exited ({code}):\n{}", std::fs::read_to_string(&log)?);
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "lbd did not answer:\n{}", std::fs::read_to_string(&log)?);
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(child)
    };
    let conntrack = || -> anyhow::Result<u32> { Ok(aya::maps::MapData::from_pin(keep.map("CONNTRACK4"))?.info()?.id()) };

    let first = run()?;
    assert_eq!(status()?["xdp_mode"], "generic", "{}", std::fs::read_to_string(&log)?);
    drop(first);
    let kept = ns.xdp_program(dev)?.unwrap_or_else(|| panic!("the fast path stays on {dev} while no lbd runs"));
    let tables = conntrack()?;

    let second = run()?;
    let text = std::fs::read_to_string(&log)?;
    assert_eq!(status()?["xdp_mode"], "generic", "{text}");
    assert!(text.contains("the fast path lbd kept runs in generic mode (native XDP failed when it was attached)"), "{text}");
    // Only the second start had something to take over.
    assert!(text.contains("took over the fast path lbd kept"), "{text}");
    assert!(!text.contains("is detached"), "{text}");
    assert_eq!(conntrack()?, tables, "the connection tables were made anew: {text}");
    let now = ns.xdp_program(dev)?.unwrap_or_else(|| panic!("a program on {dev}"));
    assert_ne!(now, kept, "the new lbd's program did not replace the one kept");
    drop(second);
    Ok(())
}

/// Runs `lbd run --config CONFIG` in `ns` until it exits (`nsenter --net`, as the rig starts
/// lbd: the host's bpffs, where a kept fast path is pinned): its exit code, stdout and stderr.
fn lbd_run_once(ns: &Netns, config: &std::path::Path) -> anyhow::Result<(Option<i32>, String)> {
    use std::io::Read;
    let mut child = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", ns.name))
        .arg("--")
        .arg(rig::lbd_binary()?)
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Bounded: an lbd that starts serving instead of exiting is stopped, and the test fails.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            // SIGTERM, so that it removes what it set up.
            let _ = std::process::Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            anyhow::bail!("lbd run --config {} still ran after 30 s (stopped):\n{err}", config.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let (mut out, mut err) = (String::new(), String::new());
    if let (Some(mut o), Some(mut e)) = (child.stdout.take(), child.stderr.take()) {
        let _ = (o.read_to_string(&mut out), e.read_to_string(&mut err));
    }
    Ok((status.code(), out + &err))
}

/// A config with one TCP VIP without real servers, on `lo` (which the netns tests' own
/// namespaces have), in `xdp_mode`.
fn lo_config(socket: &std::path::Path, xdp_mode: &str) -> String {
    rig::custom_config(socket, xdp_mode, &[(IpAddr::V4(VIP_V4), 80, "tcp", vec![])]).replace("interface = \"eth0\"", "interface = \"lo\"")
}

#[test]
fn failed_native_attach_says_so_plainly() -> anyhow::Result<()> {
    require_root()?;
    // `lo` has no native XDP support.
    let ns = Netns::new("lte7-dir")?;
    let dir = std::env::temp_dir().join("lbd-lte7");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("lo.toml");
    std::fs::write(&config, lo_config(&dir.join("lbd.sock"), "native"))?;
    let (code, err) = lbd_run_once(&ns, &config)?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("attaching XDP to lo in native mode failed"), "{err}");
    assert!(err.contains("try xdp_mode = \"generic\""), "{err}");
    Ok(())
}

/// An lbd whose `control_socket` moved meets the fast path the lbd before it kept under the old
/// path, still attached: its start fails saying so and how to remove it (before: "the driver may
/// not support native XDP"), and `lbd detach --socket OLD` frees the interface.
#[test]
fn a_fast_path_kept_under_another_socket_is_named_when_the_attach_fails() -> anyhow::Result<()> {
    require_root()?;
    let ns = Netns::new("lteo-dir")?;
    let dir = std::env::temp_dir().join("lbd-lteo");
    std::fs::create_dir_all(&dir)?;
    let (old, new) = (dir.join("old.sock"), dir.join("new.sock"));
    let _kept = (rig::KeptFor::fresh(&old)?, rig::KeptFor::fresh(&new)?);
    let config = dir.join("lo.toml");
    std::fs::write(&config, lo_config(&old, "generic"))?;
    let lbd = rig::lbd_binary()?;
    let cli = |args: &[&str]| std::process::Command::new(&lbd).args(args).output();
    let mut first = ns.spawn_net_with(&[lbd.to_str().unwrap(), "run", "--config", config.to_str().unwrap()], |cmd| {
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    })?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !cli(&["status", "--socket", old.to_str().unwrap()])?.status.success() {
        if std::time::Instant::now() > deadline || first.try_wait()?.is_some() {
            let _ = first.kill();
            anyhow::bail!("the first lbd did not answer on {}", old.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
    first.wait()?;
    let kept = ns.xdp_program("lo")?;
    assert!(kept.is_some(), "the first lbd's fast path stays on lo");

    std::fs::write(&config, lo_config(&new, "generic"))?;
    let (code, err) = lbd_run_once(&ns, &config)?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("attaching XDP to lo in generic mode failed"), "{err}");
    assert!(err.contains("another XDP program is attached there") && err.contains("`lbd detach --socket OLD_PATH`"), "{err}");
    assert_eq!(ns.xdp_program("lo")?, kept, "the failed start touched the kept fast path");
    let out = cli(&["detach", "--socket", old.to_str().unwrap()])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ns.xdp_program("lo")?, None);
    Ok(())
}

/// A VRRP instance naming an interface that is not there is a mistake in the config: `lbd run`
/// says where (FILE:LINE:COL) and exits 2 (which systemd does not restart) before anything is
/// attached. Before, it was found once the fast path served: lbd exited 1 and left its program
/// attached and pinned, forwarding with no health checks.
#[test]
fn a_missing_vrrp_interface_stops_lbd_before_it_attaches() -> anyhow::Result<()> {
    require_root()?;
    let ns = Netns::new("ltec-dir")?;
    let dir = std::env::temp_dir().join("lbd-ltec");
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("lbd.sock");
    let _kept = rig::KeptFor::fresh(&socket)?;
    let config = dir.join("vrrp.toml");
    let text = lo_config(&socket, "generic")
        + "[[vrrp_instance]]\nname = \"VI_1\"\ninterface = \"eht0\"\nvirtual_router_id = 51\nvirtual_addresses = [\"10.99.0.100\"]\n";
    let line = text.lines().position(|l| l == "interface = \"eht0\"").expect("in the text") + 1;
    std::fs::write(&config, text)?;
    let (code, err) = lbd_run_once(&ns, &config)?;
    assert_eq!(code, Some(2), "{err}");
    let at = format!("{}:{line}:1: [[vrrp_instance]] VI_1: interface eht0 not found", config.display());
    assert!(err.contains(&at), "{err}");
    assert_eq!(ns.xdp_program("lo")?, None, "lbd attached before it found the mistake");
    let keep = lb_userspace::keep::Keep::for_socket(&socket);
    assert!(!keep.link().exists(), "lbd left a pinned link at {}", keep.link().display());
    assert!(!socket.exists(), "lbd left its control socket");
    Ok(())
}

/// A real server at an address of the director itself would never resolve (the director would
/// ARP for itself): in XDP mode `lbd run` refuses it at its address's FILE:LINE:COL, naming the
/// interface that holds it, and exits 2 before anything is attached.
#[test]
fn a_real_server_at_an_own_address_stops_lbd_before_it_attaches() -> anyhow::Result<()> {
    require_root()?;
    let ns = Netns::new("ltex-dir")?;
    ns.ip(&["addr", "add", "10.99.5.1/32", "dev", "lo"])?;
    let dir = std::env::temp_dir().join("lbd-ltex");
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("lbd.sock");
    let _kept = rig::KeptFor::fresh(&socket)?;
    let config = dir.join("own.toml");
    let own: IpAddr = "10.99.5.1".parse()?;
    let text = rig::custom_config(&socket, "generic", &[(IpAddr::V4(VIP_V4), 80, "tcp", vec![own])])
        .replace("interface = \"eth0\"", "interface = \"lo\"");
    let line = text.lines().position(|l| l == "address = \"10.99.5.1\"").expect("in the text") + 1;
    std::fs::write(&config, text)?;
    let (code, err) = lbd_run_once(&ns, &config)?;
    assert_eq!(code, Some(2), "{err}");
    let at = format!("{}:{line}:11: real server 10.99.5.1 is an address of this director (on interface lo)", config.display());
    assert!(err.contains(&at), "{err}");
    assert_eq!(ns.xdp_program("lo")?, None, "lbd attached before it found the mistake");
    assert!(!socket.exists(), "lbd left its control socket");
    Ok(())
}

#[test]
fn a_second_lbd_run_on_the_same_socket_changes_nothing() -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up("lte9", 3)?;
    rig.start_lbd()?;
    // State the config does not hold: a second instance applying the config would undo it.
    let sock = rig.socket.display().to_string();
    let backend = backend_v4(0).to_string();
    let (code, _, err) = rig.lbd_cli(&["backend", "drain", "10.99.0.100:80", &backend, "--socket", &sock])?;
    assert_eq!(code, 0, "{err}");
    let (code, err) = lbd_run_once(&rig.director, &rig.config)?;
    assert_eq!(code, Some(1), "{err}");
    let lock = rig.socket.with_extension("lock").display().to_string();
    assert!(err.contains(&format!("another lbd runs with control socket {sock}: it holds {lock}")), "{err}");
    // Another socket but the same metrics address: refused there, before the dataplane too.
    let other = rig.config.with_file_name("other.toml");
    let other_sock = rig.config.with_file_name("other.sock");
    std::fs::write(&other, rig::rig_config(&other_sock))?;
    let (code, err) = lbd_run_once(&rig.director, &other)?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("[director] metrics_listen 127.0.0.1:9180: cannot listen there"), "{err}");
    assert!(!other_sock.exists(), "the refused lbd left its control socket behind");
    // The first one still answers on its socket, with its drain, and still forwards.
    let st = rig.status()?;
    let row = &st["virtual_servers"][0]["real_servers"][0];
    assert_eq!((row["state"].as_str(), row["weight"].as_u64()), (Some("drained"), Some(0)), "{row}");
    let counts = rig.http_batch(IpAddr::V4(VIP_V4), 60)?;
    assert_eq!(counts.values().sum::<usize>(), 60, "{counts:?}");
    assert!(!counts.contains_key(&backend_name(0)), "the drained backend got new connections: {counts:?}");
    // Its socket file deleted (by hand, by a tmpfiles cleaner): a second lbd is still kept out,
    // by the lock, and takes nothing over from the running one.
    std::fs::remove_file(&rig.socket)?;
    let (code, err) = lbd_run_once(&rig.director, &rig.config)?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("another lbd runs with control socket {sock}: it holds {lock}")), "{err}");
    assert!(!rig.socket.exists(), "the refused lbd left a control socket");
    let counts = rig.http_batch(IpAddr::V4(VIP_V4), 30)?;
    assert!(!counts.contains_key(&backend_name(0)), "the drain was undone: {counts:?}");
    Ok(())
}

#[test]
fn drained_backend_keeps_its_connection_and_gets_no_new_ones() -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up("lte8", 3)?;
    rig.start_lbd()?;
    let vip = SocketAddr::new(IpAddr::V4(VIP_V4), rig::HTTP_PORT);
    let (mut conn, owner) = rig.client.enter(move || -> anyhow::Result<(KeepAlive, String)> {
        let mut c = KeepAlive::connect(vip)?;
        let owner = c.get()?;
        Ok((c, owner))
    })??;
    let idx = (0..3).find(|&i| backend_name(i) == owner).expect("a backend name");
    let sock = rig.socket.display().to_string();
    let backend = backend_v4(idx).to_string();
    let (code, out, err) = rig.lbd_cli(&["backend", "drain", "10.99.0.100:80", &backend, "--protocol", "tcp", "--socket", &sock])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("drained: TCP 10.99.0.100:80 -> {backend}:80"));
    let st = rig.status()?;
    let row = &st["virtual_servers"][0]["real_servers"][idx];
    assert_eq!((row["state"].as_str(), row["weight"].as_u64()), (Some("drained"), Some(0)), "{row}");

    let (still, conn) = rig.client.enter(move || -> anyhow::Result<(Vec<String>, KeepAlive)> {
        let got = (0..3).map(|_| conn.get()).collect::<anyhow::Result<_>>()?;
        Ok((got, conn))
    })??;
    assert!(still.iter().all(|b| *b == owner), "the drained backend lost its connection: {still:?}");
    let after = rig.http_batch(IpAddr::V4(VIP_V4), 60)?;
    assert!(!after.contains_key(&owner), "{owner} is drained but got new connections: {after:?}");
    drop(conn);

    let (code, _, err) = rig.lbd_cli(&["backend", "enable", "10.99.0.100:80", &backend, "--socket", &sock])?;
    assert_eq!(code, 0, "{err}");
    assert!(rig.http_batch(IpAddr::V4(VIP_V4), 60)?.contains_key(&owner), "{owner} enabled again");

    let (code, _, err) = rig.lbd_cli(&["backend", "drain", "10.99.0.100:80", "10.99.0.99", "--socket", &sock])?;
    assert_eq!(code, 1);
    assert!(err.contains("no real server 10.99.0.99 in virtual server 10.99.0.100:80"), "{err}");
    Ok(())
}

/// The director's interface deleted and created again (another index, no XDP program): lbd
/// attaches to the new one and its real servers follow. Without that, the VIP's traffic went to
/// the director's kernel, which has nothing listening on the VIP's port, until lbd restarted.
#[test]
fn an_interface_created_again_is_served_again() -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up("ltea", 3)?;
    rig.start_lbd()?;
    assert_spread(&rig.http_batch(IpAddr::V4(VIP_V4), 90)?, 90);
    let conns = |rig: &Rig, i: usize| -> anyhow::Result<u64> {
        rig.status()?["virtual_servers"][i]["traffic"]["conns"].as_u64().ok_or_else(|| anyhow::anyhow!("no conns"))
    };
    // While it is gone, status and metrics say so.
    let old = rig.delete_director_link()?;
    let gone = "interface eth0 is gone: its traffic is not balanced until it is back";
    let scrape = |rig: &Rig| rig.director.exec(&["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9180/metrics"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while rig.status()?["problem"] != gone {
        assert!(std::time::Instant::now() < deadline, "status: {}", rig.status()?);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(scrape(&rig)?.lines().any(|l| l == "lbd_dataplane_ok 0"));
    let sock = rig.socket.display().to_string();
    let (_, text, _) = rig.lbd_cli(&["status", "--socket", &sock])?;
    assert!(text.contains(&format!("PROBLEM: {gone}")), "{text}");
    let new = rig.create_director_link(true)?;
    assert_ne!(old, new, "the rig must give eth0 another index");

    // lbd's program is on the new eth0 once the interface watcher's dump (50 ms after the last
    // notification) has been followed, and lbd says so (its log line follows the attach).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let link = rig.director.ip(&["-d", "link", "show", "dev", "eth0"])?;
        let log = rig.lbd_log();
        if link.contains("prog/xdp") && log.contains("interface created again: XDP attached to it again") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no XDP program on the new eth0, or no log line, after 5 s:\n{link}\n{log}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // Every request is forwarded by lbd (its counters grow by one connection a request), over
    // IPv4 and IPv6, whose real servers' MACs were resolved on the old index.
    let (v4, v6) = (conns(&rig, 0)?, conns(&rig, 2)?);
    assert_spread(&rig.http_batch(IpAddr::V4(VIP_V4), 90)?, 90);
    assert_spread(&rig.http_batch(IpAddr::V6(VIP_V6), 90)?, 90);
    assert_eq!((conns(&rig, 0)? - v4, conns(&rig, 2)? - v6), (90, 90));
    let st = rig.status()?;
    for rs in st["virtual_servers"][0]["real_servers"].as_array().unwrap() {
        assert_eq!(rs["state"], "up", "{rs}");
    }
    assert!(st["problem"].is_null(), "{st}");
    assert!(scrape(&rig)?.lines().any(|l| l == "lbd_dataplane_ok 1"));
    Ok(())
}

/// Path MTU discovery through the director: a client two hops away, behind a router whose link
/// towards it has an MTU of 1000 (the client's own is 1500, so it asks for 1460-byte segments).
/// A real server's full-sized reply makes the router send "fragmentation needed" to the reply's
/// source, the VIP, which reaches the director; lbd passes it to that real server, whose TCP
/// then sends smaller segments. Before, the director's kernel dropped it, and the download hung.
#[test]
fn path_mtu_discovery_works_through_the_director() -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up("ltei", 3)?;
    rig.start_lbd()?;
    let router = Netns::new("ltei-rtr")?;
    let far = Netns::new("ltei-far")?;
    rig.switch.ip(&["link", "add", "vr", "type", "veth", "peer", "name", "eth0", "netns", &router.name])?;
    rig.switch.ip(&["link", "set", "vr", "master", "br0", "up"])?;
    router.ip(&["link", "add", "rc", "type", "veth", "peer", "name", "eth0", "netns", &far.name])?;
    router.ip(&["addr", "add", "10.99.0.1/24", "dev", "eth0"])?;
    router.ip(&["addr", "add", "10.98.0.1/24", "dev", "rc"])?;
    router.ip(&["link", "set", "rc", "mtu", "1000"])?;
    far.ip(&["addr", "add", "10.98.0.2/24", "dev", "eth0"])?;
    for (ns, dev) in [(&router, "eth0"), (&router, "rc"), (&far, "eth0")] {
        ns.ip(&["link", "set", dev, "up"])?;
        ns.exec(&["ethtool", "-K", dev, "tx", "off"])?;
    }
    far.ip(&["route", "add", "default", "via", "10.98.0.1"])?;
    router.sysctl("net.ipv4.ip_forward", "1")?;
    for be in &rig.backends {
        be.ip(&["route", "add", "10.98.0.0/24", "via", "10.99.0.1"])?;
    }

    let too_big = rig.reason_packets("icmp-too-big")?;
    for _ in 0..3 {
        let url = format!("http://{VIP_V4}/big");
        let got = far.exec(&["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{size_download}", &url])?;
        assert_eq!(got.trim(), rig::BIG_BODY.to_string(), "download through the 1000-byte link");
    }
    let passed = rig.reason_packets("icmp-too-big")? - too_big;
    assert!(passed >= 1, "no ICMP fragmentation-needed went through lbd");
    Ok(())
}

/// A restart of lbd drops no connection, as in IPVS mode: the stopped lbd leaves its program
/// serving (a pinned BPF link) with its connection tables, and the next start sets up its own
/// program and maps, then replaces the program in the link in one step, with the same tables and
/// backend ids. Checked with a connection whose real server the restart's config drains (only its
/// connection entry still sends it there), and a client opening a new connection every 10 ms
/// throughout, none of which may fail. Before, lbd detached when it stopped: the director's
/// kernel, which holds the VIP, answered the connections with resets until lbd was back, and the
/// drained real server's connection was sent elsewhere after it.
#[test]
fn a_restart_drops_no_connection() -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up("ltek", 3)?;
    rig.start_lbd()?;
    let vip = SocketAddr::new(IpAddr::V4(VIP_V4), rig::HTTP_PORT);
    let (conn, owner) = rig.client.enter(move || -> anyhow::Result<(KeepAlive, String)> {
        let mut c = KeepAlive::connect(vip)?;
        let owner = c.get()?;
        Ok((c, owner))
    })??;
    let idx = (0..3).find(|&i| backend_name(i) == owner).expect("a backend name");
    // The config the next start reads: the real servers listed in another order (rotated), so
    // that they would get other backend ids than in this run, and the connection's real server
    // drained (weight 0) in the HTTP virtual server.
    let text = std::fs::read_to_string(&rig.config)?;
    let line = |i: usize| format!("address = \"{}\"", backend_v4(i));
    let text = text.replace(&line(0), "@0").replace(&line(1), "@1").replace(&line(2), "@2");
    let text = text.replace("@0", &line(1)).replace("@1", &line(2)).replace("@2", &line(0));
    let at = text.find(&format!("address = \"{}\"", backend_v4(idx))).expect("the owner in the config");
    let weight = at + text[at..].find("weight = 1").expect("its weight");
    let drained = format!("{}weight = 0{}", &text[..weight], &text[weight + "weight = 1".len()..]);
    std::fs::write(&rig.config, drained)?;
    // Another real server drained from the CLI: the restart keeps that drain too.
    let other = (idx + 1) % 3;
    let sock = rig.socket.display().to_string();
    let (code, _, err) = rig.lbd_cli(&["backend", "drain", &vip.to_string(), &backend_v4(other).to_string(), "--socket", &sock])?;
    assert_eq!(code, 0, "{err}");

    let clients = rig.client_loop(IpAddr::V4(VIP_V4), 3000)?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = rig.director.xdp_program("eth0")?.expect("lbd's program on eth0");
    let forwarded = |st: &serde_json::Value| st["virtual_servers"][0]["traffic"]["packets"].as_u64().unwrap_or(0);
    let counted = forwarded(&rig.status()?);
    assert!(counted > 0, "{}", rig.status()?);
    rig.stop_lbd();
    assert!(rig.lbd_log().contains("the fast path stays attached"), "{}", rig.lbd_log());
    // No lbd runs: the program it kept serves on, the connection included.
    assert_eq!(rig.director.xdp_program("eth0")?, Some(before), "lbd's program left eth0 when lbd stopped");
    let (conn, during) = rig.client.enter(move || -> anyhow::Result<(KeepAlive, String)> {
        let mut conn = conn;
        let got = conn.get()?;
        Ok((conn, got))
    })??;
    assert_eq!(during, owner, "while no lbd ran");
    std::thread::sleep(std::time::Duration::from_millis(500));
    rig.start_lbd()?;
    let after = rig.director.xdp_program("eth0")?.expect("a program on eth0");
    assert_ne!(after, before, "the new lbd's program did not replace the one kept");
    assert!(rig.lbd_log().contains("took over the fast path lbd kept"), "{}", rig.lbd_log());
    // The counters went on: the new lbd counts what the one before had, and what was forwarded
    // while none ran.
    let st = rig.status()?;
    assert!(forwarded(&st) > counted, "{counted} packets forwarded before the restart, {} after: {st}", forwarded(&st));
    let started = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let answers = clients.stop()?;

    let failed: Vec<_> = answers.iter().filter_map(|a| a.result.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} of {} requests failed across the restart: {failed:?}", failed.len(), answers.len());
    assert!(answers.len() >= 50, "only {} requests across the restart", answers.len());
    let new_owner: Vec<_> = answers.iter().filter(|a| a.sent > started && a.result.as_deref() == Ok(owner.as_str())).collect();
    assert!(new_owner.is_empty(), "{owner} is drained by the new config but got new connections: {new_owner:?}");
    let to_other: Vec<_> = answers.iter().filter(|a| a.sent > started && a.result.as_deref() == Ok(backend_name(other).as_str())).collect();
    assert!(to_other.is_empty(), "{} was drained from the CLI before the restart but got new connections: {to_other:?}", backend_name(other));
    let st = rig.status()?;
    let rs = st["virtual_servers"][0]["real_servers"].as_array().cloned().unwrap_or_default();
    let held = rs.iter().find(|r| r["address"] == backend_v4(other).to_string());
    assert!(held.is_some_and(|r| r["drained"] == true && r["state"] == "drained"), "{st}");
    assert!(rig.lbd_log().contains("as the lbd before: 1 real server drained, 0 real servers down"), "{}", rig.lbd_log());
    // The connection stays with its drained real server: its entry, and its backend id, came
    // through the restart.
    let still = rig.client.enter(move || -> anyhow::Result<Vec<String>> {
        let mut conn = conn;
        (0..3).map(|_| conn.get()).collect()
    })??;
    assert!(still.iter().all(|b| *b == owner), "the connection moved from {owner} across the restart: {still:?}");
    let st = rig.status()?;
    assert!(st["conntrack_entries"].as_u64() >= Some(1), "{st}");

    // `lbd detach` is refused while lbd runs; after it stopped, it removes what was kept.
    let (code, _, err) = rig.lbd_cli(&["detach", "--socket", &sock])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("an lbd is running on {sock}; stop it first")), "{err}");
    rig.stop_lbd();
    let (code, out, err) = rig.lbd_cli(&["detach", "--socket", &sock])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("detached: the fast path kept for {sock} is gone")), "{out}");
    assert!(out.contains("/link\n") && out.contains("CONNTRACK4") && out.contains("xdp-state.json"), "{out}");
    assert_eq!(rig.director.xdp_program("eth0")?, None, "a program is left on eth0 after lbd detach");
    let (code, out, _) = rig.lbd_cli(&["detach", "--socket", &sock])?;
    assert_eq!(code, 0);
    assert!(out.starts_with(&format!("no XDP fast path kept for {sock} ")), "{out}");
    Ok(())
}

/// A restart under load: connections that send all the time keep their real servers while the
/// new lbd takes over. The new lbd must not go live with real servers it has not resolved yet
/// (it would drop their packets, or send them to the real servers it had, which reset them).
#[test]
fn busy_connections_keep_their_real_servers_across_a_restart() -> anyhow::Result<()> {
    busy_restart("ltel", |text| text)
}

/// [`busy_connections_keep_their_real_servers_across_a_restart`] with keepalived's `alpha`: the
/// checked real servers of a fresh start are down until their first check passes, but at a
/// take-over those the kept fast path served start up, or their virtual servers would have no
/// real server until the first checks (the warm-up spreads them over the interval).
#[test]
fn alpha_checks_do_not_empty_virtual_servers_at_a_restart() -> anyhow::Result<()> {
    busy_restart("ltem", |text| {
        // TCP virtual servers: alpha, and a TCP check on each real server.
        text.split("[[virtual_server]]")
            .map(|block| {
                if !block.contains("protocol = \"tcp\"") {
                    return block.to_string();
                }
                block
                    .replacen("protocol = \"tcp\"\n", "protocol = \"tcp\"\nalpha = true\n", 1)
                    .replace("weight = 1\n", "weight = 1\nhealth_check = { kind = \"tcp\", interval = \"3s\" }\n")
            })
            .collect::<Vec<_>>()
            .join("[[virtual_server]]")
    })
}

/// Busy keep-alive connections to the IPv4 HTTP VIP through a stop and a start of lbd with the
/// rig's config changed by `config`: none may fail or reach another real server.
fn busy_restart(prefix: &str, config: impl FnOnce(String) -> String) -> anyhow::Result<()> {
    require_root()?;
    let mut rig = Rig::up(prefix, 3)?;
    let text = config(std::fs::read_to_string(&rig.config)?);
    std::fs::write(&rig.config, text)?;
    rig.start_lbd()?;
    let busy = rig.busy_loop(SocketAddr::new(IpAddr::V4(VIP_V4), rig::HTTP_PORT), 24)?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    rig.stop_lbd();
    std::thread::sleep(std::time::Duration::from_millis(300));
    rig.start_lbd()?;
    assert!(rig.lbd_log().contains("took over the fast path lbd kept"), "{}", rig.lbd_log());
    std::thread::sleep(std::time::Duration::from_millis(500));
    let conns = busy.stop()?;
    let owners: std::collections::BTreeSet<&str> = conns.iter().map(|c| c.owner.as_str()).collect();
    assert_eq!(owners.len(), 3, "the connections should reach every real server: {conns:?}");
    let hurt: Vec<_> = conns.iter().filter(|c| c.wrong.is_some()).collect();
    assert!(hurt.is_empty(), "{} of {} busy connections were hurt by the restart: {hurt:?}\n{}", hurt.len(), conns.len(), rig.lbd_log());
    assert!(conns.iter().all(|c| c.answers >= 10), "too few requests to tell: {conns:?}");
    Ok(())
}

/// `cargo xtask run`'s rig program: its lbd gets the SIGTERM of the teardown (a signal mask
/// blocked in the rig was once inherited by every child, and lbd was killed after 5 s instead),
/// a second rig is refused while one is up, and a SIGTERM tears everything down.
#[test]
fn the_rig_stops_its_lbd_cleanly_and_runs_alone() -> anyhow::Result<()> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    require_root()?;
    let rig_bin = env!("CARGO_BIN_EXE_lbd-rig");
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/rig.toml");
    let mut first = Command::new(rig_bin)
        .args(["--requests", "10"])
        .arg(&config)
        .stdout(Stdio::piped())
        .spawn()?;
    // Killed whatever happens below, so a failure tears the rig down too.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let _ = self.0.wait();
        }
    }
    let stdout = first.stdout.take().expect("piped");
    let mut first = Reap(first);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut seen = Vec::new();
    while !seen.last().is_some_and(|l: &String| l.contains("tears it down")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => anyhow::bail!("the rig did not come up within 60 s:\n{}", seen.join("\n")),
        }
    }
    let second = Command::new(rig_bin).args(["--once", "--requests", "10"]).arg(&config).output()?;
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second rig ran");
    assert!(err.contains(&format!("another rig is up (lbd-rig pid {}", first.0.id())), "{err}");
    let exists = |ns: &str| std::path::Path::new("/run/netns").join(ns).exists();
    assert!(exists("lbdrig-dir"), "the second rig touched the first one's namespaces");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.0.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
    let started = std::time::Instant::now();
    let status = first.0.wait()?;
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string("/tmp/lbd-rig-lbdrig/lbd.log")?;
    assert!(log.contains("shutting down"), "lbd did not get the teardown's SIGTERM:\n{log}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "teardown took {:?}", started.elapsed());
    for ns in ["sw", "client", "dir", "be1", "be2", "be3"] {
        assert!(!exists(&format!("lbdrig-{ns}")), "lbdrig-{ns} is left");
    }
    Ok(())
}
