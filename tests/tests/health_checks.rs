//! Health checks against real servers, each test in a network namespace of its own (deleted on
//! drop; all traffic stays inside it). The reasons are asserted word for word: they are what
//! operators read in the log and in `lbd status`. Run as root by `cargo xtask test`.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::Result;
use lb_tests::{
    health::{
        dummy_net, run_in, serve_dns, serve_http, serve_udp_echo, serve_udp_silent, test_ca,
        big_page, HELLO_MD5,
    },
    netns::{require_root, Netns},
};
use lb_userspace::health::{
    probe,
    scheduler::{CheckConfig, CheckKey, HealthEvent, Scheduler, SchedulerOptions},
    HealthCheck, ProbeTarget, VipPath,
};

const SERVER: &str = "10.97.0.2";
/// On the namespace's subnet, assigned to nobody: packets to it vanish.
const BLACK_HOLE: &str = "10.97.0.99";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("an IP address")
}

fn target(addr: &str, port: u16) -> ProbeTarget {
    ProbeTarget {
        addr: ip(addr),
        port,
        source: None,
        vip: None,
    }
}

fn check(text: &str, port: u16) -> HealthCheck {
    HealthCheck::from_toml(text, port).unwrap_or_else(|e| panic!("{text}: {e}"))
}

/// Probes `target` with the check `text` and asserts the outcome and its reason exactly.
async fn expect(
    text: &str,
    target: &ProbeTarget,
    ok: bool,
    reason: &str,
) -> lb_userspace::health::ProbeResult {
    let result = probe(&check(text, target.port), target).await;
    assert_eq!(
        (result.ok, result.reason.as_str()),
        (ok, reason),
        "check {text:?} of {}:{}",
        target.addr,
        target.port
    );
    result
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lbd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn tcp_and_http_checks() -> Result<()> {
    require_root()?;
    let ns = dummy_net("lbhc-http", SERVER)?;
    run_in(&ns, || async {
        let server = serve_http(SocketAddr::new(ip(SERVER), 80), None).await?;
        let web = target(SERVER, server.addr.port());
        let closed = target(SERVER, 81);

        // tcp: handshake, refused, silence.
        expect(r#"kind = "tcp""#, &web, true, "connected").await;
        expect(
            "kind = \"tcp\"\nretries = 0",
            &closed,
            false,
            "connection refused",
        )
        .await;
        expect(
            "kind = \"tcp\"\ntimeout = \"300ms\"\nretries = 0",
            &target(BLACK_HOLE, 80),
            false,
            "timeout after 300ms",
        )
        .await;
        // `port` overrides the real server's port.
        expect("kind = \"tcp\"\nport = 80", &closed, true, "connected").await;

        // http: status, body, digest, timeout, Host header.
        expect("kind = \"http\"\npath = \"/ok\"", &web, true, "HTTP 200").await;
        expect(
            "kind = \"http\"\npath = \"/fail\"\nretries = 0",
            &web,
            false,
            "HTTP 503",
        )
        .await;
        expect(
            "kind = \"http\"\npath = \"/fail\"\nexpect_status = [503]",
            &web,
            true,
            "HTTP 503",
        )
        .await;
        expect(
            "kind = \"http\"\npath = \"/nope\"\nexpect_status = \"200-299\"\nretries = 0",
            &web,
            false,
            "HTTP 404",
        )
        .await;
        let slow = expect(
            "kind = \"http\"\npath = \"/slow\"\ntimeout = \"300ms\"\nretries = 1\nretry_delay = \"100ms\"",
            &web,
            false,
            "timeout after 300ms",
        )
        .await;
        assert_eq!(slow.attempts, 2, "one retry");
        expect(
            "kind = \"http\"\npath = \"/ok\"\nexpect_body = \"healthy\"",
            &web,
            true,
            "HTTP 200",
        )
        .await;
        expect(
            "kind = \"http\"\npath = \"/wrong\"\nexpect_body = \"healthy\"\nretries = 0",
            &web,
            false,
            "body mismatch: \"healthy\" not found",
        )
        .await;
        expect(
            "kind = \"http\"\npath = \"/ok\"\nexpect_body = { regex = \"^all h[a-z]+\\n$\" }",
            &web,
            true,
            "HTTP 200",
        )
        .await;
        expect(
            "kind = \"http\"\npath = \"/wrong\"\nexpect_body = { regex = \"^all\" }\nretries = 0",
            &web,
            false,
            "body mismatch: no match for /^all/",
        )
        .await;
        expect(
            &format!("kind = \"http\"\npath = \"/hello\"\ndigest = \"{HELLO_MD5}\""),
            &web,
            true,
            "HTTP 200",
        )
        .await;
        expect(
            &format!("kind = \"http\"\npath = \"/wrong\"\ndigest = \"{HELLO_MD5}\"\nretries = 0"),
            &web,
            false,
            // MD5 of "unexpected page\n"
            &format!(
                "digest mismatch: body MD5 is {}",
                lb_userspace::health::check::md5_hex(b"unexpected page\n")
            ),
        )
        .await;
        // A digest alone takes a body of any size (as keepalived's); `expect_body` reads 1 MiB.
        let big_md5 = lb_userspace::health::check::md5_hex(big_page().as_bytes());
        expect(&format!("kind = \"http\"\npath = \"/big\"\ndigest = \"{big_md5}\""), &web, true, "HTTP 200").await;
        expect(
            &format!("kind = \"http\"\npath = \"/big\"\ndigest = \"{HELLO_MD5}\"\nretries = 0"),
            &web,
            false,
            &format!("digest mismatch: body MD5 is {big_md5}"),
        )
        .await;
        expect("kind = \"http\"\npath = \"/big\"\nexpect_body = \"lbd\"\nretries = 0", &web, false, "body larger than 1024 KiB").await;
        expect(
            "kind = \"http\"\npath = \"/host\"\nhost = \"www.example.test\"\nexpect_body = \"www.example.test\"",
            &web,
            true,
            "HTTP 200",
        )
        .await;
        expect(
            &format!("kind = \"http\"\npath = \"/host\"\nexpect_body = \"{SERVER}\""),
            &web,
            true,
            "HTTP 200",
        )
        .await;
        expect(
            "kind = \"http\"\nretries = 0",
            &closed,
            false,
            "connection refused",
        )
        .await;
        expect("kind = \"none\"", &closed, true, "no check").await;
        Ok(())
    })
}

/// Every HTTPS check verifies the certificate: a check after a successful one does not resume
/// that session (a resumed session brings no certificate to verify). Here a second server, at the
/// same address, presents a certificate of another CA but holds the first one's sessions.
#[test]
fn https_checks_do_not_resume_sessions() -> Result<()> {
    require_root()?;
    let ns = dummy_net("lbhc-tlsres", SERVER)?;
    let dir = temp_dir("hc-tlsres");
    let trusted = test_ca(&dir.join("trusted"), &["www.example.test"], &[ip(SERVER)])?;
    let other = test_ca(&dir.join("other"), &["www.example.test"], &[ip(SERVER)])?;
    let ca_file = trusted.ca_file.display().to_string();
    let result = run_in(&ns, move || async move {
        let mut untrusted = (*other.server).clone();
        untrusted.session_storage = trusted.server.session_storage.clone();
        let good = serve_http(SocketAddr::new(ip(SERVER), 443), Some(trusted.server.clone())).await?;
        let bad = serve_http(SocketAddr::new(ip(SERVER), 8443), Some(Arc::new(untrusted))).await?;
        let https = format!("kind = \"https\"\npath = \"/ok\"\nca_file = \"{ca_file}\"\nretries = 0");
        expect(&https, &target(SERVER, good.addr.port()), true, "HTTP 200").await;
        expect(
            &https,
            &target(SERVER, bad.addr.port()),
            false,
            // Both test CAs have the same name: the trusted one's key does not verify it.
            "TLS: bad certificate signature",
        )
        .await;
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn https_with_a_test_ca() -> Result<()> {
    require_root()?;
    let ns = dummy_net("lbhc-tls", SERVER)?;
    let dir = temp_dir("hc-tls");
    let ca = test_ca(&dir, &["www.example.test"], &[ip(SERVER)])?;
    let ca_file = ca.ca_file.display().to_string();
    let result = run_in(&ns, move || async move {
        let server = serve_http(SocketAddr::new(ip(SERVER), 443), Some(ca.server.clone())).await?;
        let web = target(SERVER, server.addr.port());
        // Verified against the CA file: by IP address, and by name through `host`.
        expect(
            &format!("kind = \"https\"\npath = \"/ok\"\nca_file = \"{ca_file}\""),
            &web,
            true,
            "HTTP 200",
        )
        .await;
        expect(
            &format!("kind = \"https\"\npath = \"/host\"\nhost = \"www.example.test\"\nexpect_body = \"www.example.test\"\nca_file = \"{ca_file}\""),
            &web,
            true,
            "HTTP 200",
        )
        .await;
        expect(
            &format!("kind = \"https\"\npath = \"/fail\"\nca_file = \"{ca_file}\"\nretries = 0"),
            &web,
            false,
            "HTTP 503",
        )
        .await;
        // The system's trust store does not know the test CA.
        expect(
            "kind = \"https\"\npath = \"/ok\"\nretries = 0",
            &web,
            false,
            "TLS: certificate not trusted (unknown issuer); set `ca_file`, or `tls_verify = false`",
        )
        .await;
        // A name the certificate does not hold.
        expect(
            &format!("kind = \"https\"\npath = \"/ok\"\nhost = \"other.test\"\nca_file = \"{ca_file}\"\nretries = 0"),
            &web,
            false,
            "TLS: certificate not valid for other.test; set `host` to a name it holds, or `tls_verify = false`",
        )
        .await;
        // Verification off: any certificate.
        expect(
            "kind = \"https\"\npath = \"/ok\"\ntls_verify = false",
            &web,
            true,
            "HTTP 200",
        )
        .await;
        // Plain HTTP to a TLS port fails as a bad response, not as a pass.
        let plain = probe(
            &check(
                "kind = \"http\"\npath = \"/ok\"\nretries = 0\ntimeout = \"1s\"",
                443,
            ),
            &web,
        )
        .await;
        assert!(!plain.ok, "{plain:?}");
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[test]
fn script_checks() -> Result<()> {
    require_root()?;
    let ns = dummy_net("lbhc-script", SERVER)?;
    run_in(&ns, || async {
        let rs = target(SERVER, 80);
        expect(
            "kind = \"script\"\ncommand = \"exit 0\"",
            &rs,
            true,
            "script exit 0",
        )
        .await;
        expect(
            "kind = \"script\"\ncommand = \"exit 1\"\nretries = 0",
            &rs,
            false,
            "script exit 1",
        )
        .await;
        expect(
            "kind = \"script\"\ncommand = [\"/bin/false\"]\nretries = 0",
            &rs,
            false,
            "script exit 1",
        )
        .await;
        expect(
            "kind = \"script\"\ncommand = [\"/nonexistent/check\"]\nretries = 0",
            &rs,
            false,
            "cannot run script: no such file or directory",
        )
        .await;
        // The real server is passed in the environment.
        expect(
            &format!("kind = \"script\"\ncommand = 'test \"$LBD_RS_ADDRESS:$LBD_RS_PORT\" = {SERVER}:80'"),
            &rs,
            true,
            "script exit 0",
        )
        .await;
        // misc_dynamic: exit 2..=255 passes with weight = code - 2; without it, it fails.
        let dynamic = expect(
            "kind = \"script\"\ncommand = \"exit 5\"\ndynamic_weight = true",
            &rs,
            true,
            "script exit 5 (weight 3)",
        )
        .await;
        assert_eq!(dynamic.weight, Some(3));
        let zero = expect(
            "kind = \"script\"\ncommand = \"exit 2\"\ndynamic_weight = true",
            &rs,
            true,
            "script exit 2 (weight 0)",
        )
        .await;
        assert_eq!(zero.weight, Some(0));
        expect(
            "kind = \"script\"\ncommand = \"exit 1\"\ndynamic_weight = true\nretries = 0",
            &rs,
            false,
            "script exit 1",
        )
        .await;
        expect(
            "kind = \"script\"\ncommand = \"exit 5\"\nretries = 0",
            &rs,
            false,
            "script exit 5",
        )
        .await;
        expect(
            "kind = \"script\"\ncommand = \"kill -9 $$\"\nretries = 0",
            &rs,
            false,
            "script killed by signal 9",
        )
        .await;

        // A script past its timeout is killed with everything it started.
        let pid = std::process::id();
        let marker = format!("/tmp/lbd-hc-script-{pid}");
        let start = Instant::now();
        expect(
            &format!("kind = \"script\"\ncommand = \"sleep 29.{pid} & sleep 29.{pid}; touch {marker}\"\ntimeout = \"300ms\"\nretries = 0"),
            &rs,
            false,
            "timeout after 300ms",
        )
        .await;
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "took {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let leftovers = std::process::Command::new("pgrep")
            .args(["-f", &format!("^sleep 29.{pid}$")])
            .output()?;
        assert!(
            leftovers.stdout.is_empty(),
            "sleep processes survived: {}",
            String::from_utf8_lossy(&leftovers.stdout)
        );
        assert!(!std::path::Path::new(&marker).exists());
        Ok(())
    })
}

#[test]
fn udp_and_dns_checks() -> Result<()> {
    require_root()?;
    let ns = dummy_net("lbhc-udp", SERVER)?;
    run_in(&ns, || async {
        let echo = serve_udp_echo(SocketAddr::new(ip(SERVER), 7)).await?;
        let silent = serve_udp_silent(SocketAddr::new(ip(SERVER), 9)).await?;
        let dns = serve_dns(SocketAddr::new(ip(SERVER), 53)).await?;
        let echo = target(SERVER, echo.port());
        let silent = target(SERVER, silent.port());
        let closed = target(SERVER, 10);
        let dns = target(SERVER, dns.port());

        let udp =
            |extra: &str| format!("kind = \"udp\"\ntimeout = \"300ms\"\nretries = 0\n{extra}");
        expect(
            &udp("payload = \"ping\"\nexpect_reply = \"pong ping\""),
            &echo,
            true,
            "reply received",
        )
        .await;
        expect(
            &udp("payload = \"ping\"\nexpect_reply = \"\""),
            &echo,
            true,
            "reply received",
        )
        .await;
        expect(
            &udp("payload = \"ping\"\nexpect_reply = \"PONG\""),
            &echo,
            false,
            "reply mismatch: \"PONG\" not found",
        )
        .await;
        expect(
            &udp("payload = \"ping\"\nexpect_reply = \"\""),
            &silent,
            false,
            "timeout after 300ms",
        )
        .await;
        expect(
            &udp("payload = \"ping\"\nexpect_reply = \"\""),
            &closed,
            false,
            "ICMP port unreachable",
        )
        .await;
        // Without `expect_reply` (keepalived's UDP_CHECK): only an ICMP error fails.
        expect(
            &udp("payload = \"ping\""),
            &silent,
            true,
            "no ICMP error within 300ms",
        )
        .await;
        expect(
            &udp("payload = \"ping\""),
            &closed,
            false,
            "ICMP port unreachable",
        )
        .await;
        expect(&udp("payload = \"ping\""), &echo, true, "reply received").await;

        let query =
            |extra: &str| format!("kind = \"dns\"\ntimeout = \"300ms\"\nretries = 0\n{extra}");
        expect(
            &query("query_name = \"www.example.test\"\nquery_type = \"A\""),
            &dns,
            true,
            "DNS answer: 1 A record",
        )
        .await;
        expect(
            &query("query_name = \"www.example.test\"\nquery_type = \"AAAA\""),
            &dns,
            false,
            "DNS reply has no AAAA record",
        )
        .await;
        expect(
            &query("query_name = \"missing.example.test\"\nquery_type = \"A\""),
            &dns,
            false,
            "DNS NXDOMAIN",
        )
        .await;
        // keepalived's defaults: the root's SOA.
        expect(&query(""), &dns, true, "DNS answer: 1 SOA record").await;
        expect(&query(""), &silent, false, "timeout after 300ms").await;
        expect(&query(""), &closed, false, "ICMP port unreachable").await;
        Ok(())
    })
}

/// Two namespaces on a veth pair: a director (10.97.1.10) and a DSR real server (10.97.1.11)
/// with the VIP 10.97.1.100 on `lo`, `arp_ignore=1`, `arp_announce=2`, listening on port 80.
struct DsrPair {
    director: Netns,
    real: Netns,
}

const DIR_ADDR: &str = "10.97.1.10";
const REAL_ADDR: &str = "10.97.1.11";
const VIP: &str = "10.97.1.100";
const DIR_ADDR6: &str = "fd00:97:1::10";
const REAL_ADDR6: &str = "fd00:97:1::11";
const VIP6: &str = "fd00:97:1::100";

impl DsrPair {
    fn up() -> Result<DsrPair> {
        let director = Netns::new("lbhc-vip-dir")?;
        let real = Netns::new("lbhc-vip-rs")?;
        // Before the links exist, so that they inherit it: no duplicate address detection, IPv6
        // works at once.
        for ns in [&director, &real] {
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        }
        director.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &real.name,
        ])?;
        director.ip(&["addr", "add", &format!("{DIR_ADDR}/24"), "dev", "eth0"])?;
        real.ip(&["addr", "add", &format!("{REAL_ADDR}/24"), "dev", "eth0"])?;
        real.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        director.ip(&[
            "addr",
            "add",
            &format!("{DIR_ADDR6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        real.ip(&[
            "addr",
            "add",
            &format!("{REAL_ADDR6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        real.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
        real.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
        real.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        director.ip(&["link", "set", "eth0", "up"])?;
        real.ip(&["link", "set", "eth0", "up"])?;
        Ok(DsrPair { director, real })
    }

    fn path(&self, vip: &str) -> Result<VipPath> {
        let ifindex: u32 = self
            .director
            .exec(&["cat", "/sys/class/net/eth0/ifindex"])?
            .trim()
            .parse()?;
        Ok(VipPath {
            vip: ip(vip),
            ifindex,
            src_mac: self.director.mac("eth0")?,
            dst_mac: Some(self.real.mac("eth0")?),
        })
    }
}

/// Waits until `addr` accepts TCP connections from `ns` (a new link's IPv6 can take a second).
fn wait_reachable(ns: &Netns, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = ns.enter(move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })?;
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{addr} not reachable from {} within 10 s", ns.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn via_vip_checks_the_dsr_path() -> Result<()> {
    require_root()?;
    let pair = DsrPair::up()?;
    let _listener = pair
        .real
        .enter(|| std::net::TcpListener::bind("[::]:80"))??; // IPv4 too
    let path = pair.path(VIP)?;
    let path6 = pair.path(VIP6)?;
    wait_reachable(&pair.director, SocketAddr::new(ip(REAL_ADDR6), 80))?;
    let vip_check = "kind = \"tcp\"\nvia = \"vip\"\ntimeout = \"300ms\"\nretries = 0";
    let real_check = "kind = \"tcp\"\ntimeout = \"300ms\"\nretries = 0";
    let at = move |port: u16| ProbeTarget {
        addr: ip(REAL_ADDR),
        port,
        source: None,
        vip: Some(path),
    };

    run_in(&pair.director, move || async move {
        expect(
            vip_check,
            &at(80),
            true,
            &format!("SYN-ACK from VIP {VIP}:80"),
        )
        .await;
        expect(
            vip_check,
            &at(81),
            false,
            &format!("connection refused by VIP {VIP}:81"),
        )
        .await;
        let v6 = ProbeTarget {
            addr: ip(REAL_ADDR6),
            port: 80,
            source: None,
            vip: Some(path6),
        };
        expect(
            vip_check,
            &v6,
            true,
            &format!("SYN-ACK from VIP [{VIP6}]:80"),
        )
        .await;
        let unresolved = ProbeTarget {
            vip: Some(VipPath {
                dst_mac: None,
                ..path
            }),
            ..at(80)
        };
        expect(
            vip_check,
            &unresolved,
            false,
            "real server MAC unresolved: cannot send through the VIP",
        )
        .await;
        Ok(())
    })?;

    // A real server that answers ARP for the VIP passes a check of its own address, not this one.
    pair.real.sysctl("net.ipv4.conf.all.arp_ignore", "0")?;
    run_in(&pair.director, move || async move {
        expect(real_check, &at(80), true, "connected").await;
        expect(
            vip_check,
            &at(80),
            false,
            &format!("real server answers ARP for VIP {VIP}: set arp_ignore=1 and arp_announce=2"),
        )
        .await;
        Ok(())
    })?;
    pair.real.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;

    // Nor does one that lost the VIP from its loopback.
    pair.real
        .ip(&["addr", "del", &format!("{VIP}/32"), "dev", "lo"])?;
    run_in(&pair.director, move || async move {
        expect(real_check, &at(80), true, "connected").await;
        expect(
            vip_check,
            &at(80),
            false,
            "timeout after 300ms (no answer from the VIP: is it on the real server's loopback?)",
        )
        .await;
        Ok(())
    })?;

    // Restored: it passes again.
    pair.real
        .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
    run_in(&pair.director, move || async move {
        expect(
            vip_check,
            &at(80),
            true,
            &format!("SYN-ACK from VIP {VIP}:80"),
        )
        .await;
        Ok(())
    })
}

async fn next_event(rx: &mut tokio::sync::mpsc::Receiver<HealthEvent>) -> HealthEvent {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("an event in time")
        .expect("channel open")
}

#[test]
fn scheduler_reports_changes_and_runs_notify_commands() -> Result<()> {
    require_root()?;
    let ns = dummy_net("lbhc-sched", SERVER)?;
    let dir = temp_dir("hc-sched");
    let log = dir.join("notify.log");
    let log_path = log.clone();
    let result = run_in(&ns, move || async move {
        let server = serve_http(SocketAddr::new(ip(SERVER), 80), None).await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<HealthEvent>(16);
        let mut scheduler = Scheduler::new(tx, SchedulerOptions::default());
        let key = CheckKey {
            vip_key: "TCP 10.97.0.100:80".into(),
            real_server_key: format!("{SERVER}:80"),
        };
        let notify = |state: &str| {
            Some(lb_userspace::health::config::CommandText::Shell(format!(
                "echo {state} \"$LBD_VIP\" \"$LBD_RS\" \"$LBD_REASON\" >> {}",
                log_path.display()
            )))
        };
        scheduler.set([CheckConfig {
            key: key.clone(),
            check: check(
                "kind = \"http\"\npath = \"/toggle\"\ninterval = \"100ms\"\ntimeout = \"500ms\"\nretries = 0\nrise = 2\nfall = 1\nwarmup = \"50ms\"",
                80,
            ),
            target: target(SERVER, 80),
            alpha: true,
            was_down: false,
            notify_up: notify("up"),
            notify_down: notify("down"),
        }]);
        assert_eq!(
            scheduler.health(&key),
            Some((false, None)),
            "alpha: down until the first pass"
        );
        let up = next_event(&mut rx).await;
        assert_eq!(
            (up.up, up.reason.as_str(), up.weight),
            (true, "HTTP 200", None)
        );
        assert_eq!(up.real_server_key, key.real_server_key);
        assert_eq!(scheduler.health(&key), Some((true, None)));

        server.toggle.store(503, Ordering::SeqCst);
        let down = next_event(&mut rx).await;
        assert_eq!((down.up, down.reason.as_str()), (false, "HTTP 503"));
        let status = scheduler.status_of(&key).expect("a status");
        assert_eq!(status.state.state, lb_userspace::health::Health::Down);
        assert_eq!(status.state.down_reason.as_deref(), Some("HTTP 503"));
        assert!(status.state.consecutive_fails >= 1);

        server.toggle.store(200, Ordering::SeqCst);
        let back = next_event(&mut rx).await;
        assert_eq!((back.up, back.reason.as_str()), (true, "HTTP 200"));
        let status = scheduler.status_of(&key).expect("a status");
        assert!(status.state.consecutive_passes >= 2, "rise = 2: {status:?}");

        // Reload without the check: it stops, no more events.
        scheduler.set([]);
        assert!(scheduler.is_empty());
        server.toggle.store(503, Ordering::SeqCst);
        assert!(
            tokio::time::timeout(Duration::from_millis(400), rx.recv())
                .await
                .is_err(),
            "a removed check reported"
        );

        // Notify commands ran detached, in order of the changes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let text = std::fs::read_to_string(&log_path)?;
        let vip = &key.vip_key;
        assert_eq!(
            text,
            format!("up {vip} {SERVER}:80 HTTP 200\ndown {vip} {SERVER}:80 HTTP 503\nup {vip} {SERVER}:80 HTTP 200\n")
        );
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `via = "vip"` in the namespace rig with lbd's XDP fast path attached on the director, which
/// also holds the VIPs on its `eth0` (a SYN-ACK from the VIP is a martian to its kernel, so
/// only the packet socket sees it). IPv4 and IPv6.
///
/// The rig adds the IPv6 VIP to the director's `eth0` as a preferred address, so the kernel
/// picks it as the source towards the real servers (whose replies then stay on the real server,
/// which holds the VIP too): checks of IPv6 real servers there must name their source
/// ([`ProbeTarget::source`]); without it `via = "vip"` says so.
#[test]
fn via_vip_with_the_xdp_fast_path() -> Result<()> {
    use lb_tests::rig::{backend_v4, backend_v6, Rig, VIP_V4, VIP_V6};
    require_root()?;
    let mut rig = Rig::up("lhcv", 3)?; // config/rig.toml names three
    rig.start_lbd()?;
    let ifindex: u32 = rig
        .director
        .exec(&["cat", "/sys/class/net/eth0/ifindex"])?
        .trim()
        .parse()?;
    let path = |vip: IpAddr| -> Result<VipPath> {
        Ok(VipPath {
            vip,
            ifindex,
            src_mac: rig.director.mac("eth0")?,
            dst_mac: Some(rig.backends[0].mac("eth0")?),
        })
    };
    let v4 = ProbeTarget {
        addr: IpAddr::V4(backend_v4(0)),
        port: 80,
        source: None,
        vip: Some(path(IpAddr::V4(VIP_V4))?),
    };
    let v6 = ProbeTarget {
        addr: IpAddr::V6(backend_v6(0)),
        port: 80,
        source: Some(ip("fd00:99::10")), // the director's own address (rig.rs)
        vip: Some(path(IpAddr::V6(VIP_V6))?),
    };
    let vip_check = "kind = \"tcp\"\nvia = \"vip\"\ntimeout = \"500ms\"\nretries = 0";
    let real_check = "kind = \"tcp\"\ntimeout = \"500ms\"\nretries = 0";
    let (a, b) = (v4.clone(), v6.clone());
    run_in(&rig.director, move || async move {
        expect(
            vip_check,
            &a,
            true,
            &format!("SYN-ACK from VIP {VIP_V4}:80"),
        )
        .await;
        expect(
            vip_check,
            &b,
            true,
            &format!("SYN-ACK from VIP [{VIP_V6}]:80"),
        )
        .await;
        expect(real_check, &b, true, "connected").await;
        Ok(())
    })?;
    rig.backends[0].ip(&["addr", "del", &format!("{VIP_V4}/32"), "dev", "lo"])?;
    run_in(&rig.director, move || async move {
        expect(real_check, &v4, true, "connected").await;
        expect(
            vip_check,
            &v4,
            false,
            "timeout after 500ms (no answer from the VIP: is it on the real server's loopback?)",
        )
        .await;
        expect(
            vip_check,
            &v6,
            true,
            &format!("SYN-ACK from VIP [{VIP_V6}]:80"),
        )
        .await;
        Ok(())
    })
}
