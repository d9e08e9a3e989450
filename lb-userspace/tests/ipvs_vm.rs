//! The IPVS client (`lb_userspace::ipvs`) against the real kernel, cross-checked with `ipvsadm`.
//!
//! The host kernel has no IPVS, so every test here boots the `cargo xtask vm` guest (Debian's 6.1
//! kernel) and re-runs itself there (see `tests/src/vm.rs`); each costs one boot. Inside, each
//! test works in a network namespace of its own (IPVS state is per namespace), on a thread that
//! has joined it, and the namespace is deleted afterwards.

#[path = "../../tests/src/vm.rs"]
#[allow(dead_code)]
mod vm;

use std::{
    collections::BTreeMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, UdpSocket},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use lb_userspace::ipvs::{
    Destination, Family, Forwarding, IpvsClient, IpvsError, Protocol, Service, ServiceKey, Stats,
    IP_VS_SVC_F_ONEPACKET, IP_VS_SVC_F_PERSISTENT, IP_VS_SVC_F_SCHED1, IP_VS_SVC_F_SCHED2,
    IP_VS_SVC_F_SCHED3,
};

vm_test! {
    /// `connect()` loads ip_vs itself when the kernel cannot (and says `Unavailable` when it
    /// cannot either). Everything lbd writes (TCP edited from rr to persistent wrr with a
    /// netmask, UDP with scheduler flags and one-packet scheduling, IPv6, IPv4 and IPv6 fwmark
    /// with a mixed-family tunnel destination; DR, NAT and tunnel destinations with weights and
    /// thresholds) reads back identically through the client's own dumps and through
    /// `ipvsadm -Ln`, `--thresholds`, `--persistent-conn`, `--stats` and `--rate`; edits,
    /// deletes and flush take effect; dumps spanning several datagrams are complete; `info()`
    /// matches ipvsadm's header.
    fn ipvs_client_round_trip_matches_ipvsadm() {
        Netns::new("rt").run(round_trip);
    }

    /// Services and destinations created by `ipvsadm -A/-a` (every protocol including SCTP,
    /// persistence, masks, sh/mh flags, all forwarding methods, thresholds) are decoded
    /// correctly, and every failure (exists, missing service/real server/scheduler, EINVAL, no
    /// CAP_NET_ADMIN) comes back as the right typed error naming its object.
    fn ipvs_client_reads_ipvsadm_config_and_types_errors() {
        Netns::new("adm").run(reads_ipvsadm_and_types_errors);
    }

    /// Traffic through a UDP service is counted; the client's STATS64 decode (counters and
    /// rates, service and destination) equals `ipvsadm -Ln --stats --exact` / `--rate --exact`,
    /// and `zero()` for one service and for all resets them.
    fn ipvs_client_stats_match_ipvsadm_and_zero_works() {
        Netns::new("st").run(stats_and_zero);
    }
}

// ---------------------------------------------------------------------------------------------
// Test bodies (in the guest, on a thread inside the test's namespace)

/// An IPv4 or IPv6 address.
fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn inet(addr: &str, protocol: Protocol, port: u16) -> ServiceKey {
    ServiceKey::Inet {
        addr: ip(addr),
        protocol,
        port,
    }
}

fn dest(addr: &str, port: u16, fwd: Forwarding, weight: u32, u: u32, l: u32) -> Destination {
    Destination {
        upper_threshold: u,
        lower_threshold: l,
        ..Destination::new(ip(addr), port, fwd, weight)
    }
}

/// The expected state: services with their destinations.
type Config = BTreeMap<ServiceKey, (Service, Vec<Destination>)>;

fn round_trip(ns: &Netns) {
    let mut ipvs = connect_through_modprobe_fallback();

    let info = ipvs.info().expect("info");
    assert_eq!(info.version, (1, 2, 1));
    assert!(info.conn_table_size > 0);
    let header = ns.ipvsadm(&["-Ln"]);
    assert_eq!(
        header.lines().next().unwrap(),
        format!(
            "IP Virtual Server version 1.2.1 (size={})",
            info.conn_table_size
        )
    );
    assert_eq!(ipvs.services().expect("services"), vec![]);

    // TCP: added as plain rr, checked, then edited to persistent wrr with a /24 mask.
    let tcp = inet("10.0.0.1", Protocol::Tcp, 80);
    let plain = Service::new(tcp.clone(), "rr");
    ipvs.add_service(&plain).expect("add TCP service");
    assert_eq!(ipvs.service(&tcp).unwrap(), Some(plain.clone()));
    assert_eq!(
        ns.ipvsadm_blocks(&["-Ln"])[0].head,
        "TCP  10.0.0.1:80 rr",
        "ipvsadm sees the new service"
    );
    let tcp_svc = Service {
        scheduler: "wrr".into(),
        flags: IP_VS_SVC_F_PERSISTENT,
        timeout: 300,
        netmask: u32::from(Ipv4Addr::new(255, 255, 255, 0)),
        ..plain
    };
    ipvs.edit_service(&tcp_svc).expect("edit TCP service");
    let tcp_dests = vec![
        dest("10.0.1.1", 80, Forwarding::DirectRoute, 1, 100, 10),
        dest("10.0.1.2", 8080, Forwarding::Masquerade, 5, 0, 0),
    ];

    let udp = inet("10.0.0.1", Protocol::Udp, 53);
    let udp_svc = Service {
        flags: IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2 | IP_VS_SVC_F_ONEPACKET,
        ..Service::new(udp.clone(), "sh")
    };
    let udp_dests = vec![
        dest("10.0.1.3", 53, Forwarding::Tunnel, 1, 50, 5),
        dest("10.0.1.4", 53, Forwarding::DirectRoute, 5, 0, 0),
    ];

    let v6 = ServiceKey::Inet {
        addr: "2001:db8::1".parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 443,
    };
    let v6_svc = Service {
        flags: IP_VS_SVC_F_PERSISTENT,
        timeout: 60,
        netmask: 64,
        ..Service::new(v6.clone(), "wlc")
    };
    let v6_dests = vec![
        dest("2001:db8::2", 443, Forwarding::DirectRoute, 1, 10, 2),
        dest("2001:db8::3", 8443, Forwarding::Masquerade, 5, 0, 0),
    ];

    let fwm = ServiceKey::Fwmark {
        family: Family::V4,
        mark: 5,
    };
    let fwm_svc = Service::new(fwm.clone(), "lc");
    let fwm_dests = vec![
        dest("10.0.1.5", 0, Forwarding::DirectRoute, 1, 0, 0),
        dest("10.0.1.6", 0, Forwarding::Tunnel, 5, 7, 3),
    ];

    let fwm6 = ServiceKey::Fwmark {
        family: Family::V6,
        mark: 6,
    };
    let fwm6_svc = Service {
        flags: IP_VS_SVC_F_SCHED1,
        ..Service::new(fwm6.clone(), "mh")
    };
    // An IPv4 real server behind an IPv6 service: only tunnelling can do that (ADDR_FAMILY).
    let fwm6_dests = vec![
        dest("2001:db8::4", 0, Forwarding::DirectRoute, 1, 0, 0),
        dest("10.0.1.7", 0, Forwarding::Tunnel, 5, 0, 0),
    ];

    for s in [&udp_svc, &v6_svc, &fwm_svc, &fwm6_svc] {
        ipvs.add_service(s)
            .unwrap_or_else(|e| panic!("add {}: {e}", s.key));
    }
    let mut want = Config::new();
    for (s, ds) in [
        (tcp_svc, tcp_dests),
        (udp_svc, udp_dests),
        (v6_svc, v6_dests),
        (fwm_svc, fwm_dests),
        (fwm6_svc, fwm6_dests),
    ] {
        for d in &ds {
            ipvs.add_destination(&s.key, d)
                .unwrap_or_else(|e| panic!("add {} to {}: {e}", d.addr, s.key));
        }
        want.insert(s.key.clone(), (s, ds));
    }
    check_state(ns, &mut ipvs, &want);

    // Edit a destination: weight, thresholds and forwarding method.
    let edited = dest("10.0.1.2", 8080, Forwarding::Tunnel, 3, 30, 4);
    ipvs.edit_destination(&tcp, &edited)
        .expect("edit destination");
    want.get_mut(&tcp).unwrap().1[1] = edited;
    // Edit a service: the flags are replaced, not or-ed (mask ~0).
    let udp_rr = Service::new(udp.clone(), "rr");
    ipvs.edit_service(&udp_rr).expect("edit UDP service");
    want.get_mut(&udp).unwrap().0 = udp_rr;
    // Delete a destination and a service.
    ipvs.del_destination(&tcp, ip("10.0.1.1"), 80)
        .expect("delete destination");
    want.get_mut(&tcp).unwrap().1.remove(0);
    ipvs.del_service(&fwm).expect("delete fwmark service");
    want.remove(&fwm);
    check_state(ns, &mut ipvs, &want);
    assert_eq!(ipvs.service(&fwm).unwrap(), None);

    // Dumps longer than one netlink datagram: 250 more services, 300 real servers on one.
    for i in 0..250u16 {
        let key = ServiceKey::Inet {
            addr: IpAddr::V4(Ipv4Addr::new(10, 2, (i / 200) as u8, (i % 200) as u8 + 1)),
            protocol: Protocol::Tcp,
            port: 8000 + i,
        };
        ipvs.add_service(&Service::new(key, "rr"))
            .expect("add bulk service");
    }
    for i in 0..300u16 {
        let addr = IpAddr::V4(Ipv4Addr::new(10, 3, (i / 250) as u8, (i % 250) as u8 + 1));
        ipvs.add_destination(&v6, &Destination::new(addr, 443, Forwarding::Tunnel, 1))
            .expect("add bulk destination");
    }
    assert_eq!(ipvs.services().unwrap().len(), want.len() + 250);
    assert_eq!(ipvs.destinations(&v6).unwrap().len(), 302);
    let blocks = ns.ipvsadm_blocks(&["-Ln"]);
    assert_eq!(blocks.len(), want.len() + 250);
    assert_eq!(block_for(&blocks, &v6).dests.len(), 302);

    ipvs.flush().expect("flush");
    assert_eq!(ipvs.services().unwrap(), vec![]);
    assert!(
        ns.ipvsadm_blocks(&["-Ln"]).is_empty(),
        "ipvsadm still lists services after flush"
    );
}

fn reads_ipvsadm_and_types_errors(ns: &Netns) {
    for cmd in [
        "-A -t 10.1.0.1:80 -s wlc -p 120 -M 255.255.0.0",
        "-a -t 10.1.0.1:80 -r 10.1.1.1:80 -g -w 3 -x 40 -y 4",
        "-a -t 10.1.0.1:80 -r 10.1.1.2:8080 -m -w 0",
        "-A -u 10.1.0.1:53 -s mh -b mh-fallback,mh-port",
        "-a -u 10.1.0.1:53 -r 10.1.1.3:53 -i -w 7",
        "-A --sctp-service 10.1.0.2:9 -s rr -b flag-3",
        "-a --sctp-service 10.1.0.2:9 -r 10.1.1.9:9 -g -w 2",
        "-A -t [2001:db8:1::1]:443 -s lc",
        "-a -t [2001:db8:1::1]:443 -r [2001:db8:1::2]:443 -g -w 2 -x 9 -y 1",
        "-a -t [2001:db8:1::1]:443 -r [2001:db8:1::3]:8443 -m -w 1",
        "-A -f 9 -s sh -b sh-port -p 10",
        "-a -f 9 -r 10.1.1.4:0 -g -w 1",
        "-A -f 10 -6 -s rr -p 30 -M 96",
        "-a -f 10 -6 -r [2001:db8:1::5]:0 -i -w 4",
    ] {
        ns.ipvsadm(&cmd.split_whitespace().collect::<Vec<_>>());
    }
    let tcp = inet("10.1.0.1", Protocol::Tcp, 80);
    let udp = inet("10.1.0.1", Protocol::Udp, 53);
    let sctp = inet("10.1.0.2", Protocol::Sctp, 9);
    let v6 = ServiceKey::Inet {
        addr: "2001:db8:1::1".parse().unwrap(),
        protocol: Protocol::Tcp,
        port: 443,
    };
    let fwm = ServiceKey::Fwmark {
        family: Family::V4,
        mark: 9,
    };
    let fwm6 = ServiceKey::Fwmark {
        family: Family::V6,
        mark: 10,
    };
    let want: Config = [
        (
            Service {
                flags: IP_VS_SVC_F_PERSISTENT,
                timeout: 120,
                netmask: 0xffff_0000,
                ..Service::new(tcp.clone(), "wlc")
            },
            vec![
                dest("10.1.1.1", 80, Forwarding::DirectRoute, 3, 40, 4),
                dest("10.1.1.2", 8080, Forwarding::Masquerade, 0, 0, 0),
            ],
        ),
        (
            Service {
                flags: IP_VS_SVC_F_SCHED1 | IP_VS_SVC_F_SCHED2,
                ..Service::new(udp.clone(), "mh")
            },
            vec![dest("10.1.1.3", 53, Forwarding::Tunnel, 7, 0, 0)],
        ),
        (
            Service {
                flags: IP_VS_SVC_F_SCHED3,
                ..Service::new(sctp.clone(), "rr")
            },
            vec![dest("10.1.1.9", 9, Forwarding::DirectRoute, 2, 0, 0)],
        ),
        (
            Service::new(v6.clone(), "lc"),
            vec![
                dest("2001:db8:1::2", 443, Forwarding::DirectRoute, 2, 9, 1),
                dest("2001:db8:1::3", 8443, Forwarding::Masquerade, 1, 0, 0),
            ],
        ),
        (
            Service {
                flags: IP_VS_SVC_F_SCHED2 | IP_VS_SVC_F_PERSISTENT,
                timeout: 10,
                ..Service::new(fwm.clone(), "sh")
            },
            vec![dest("10.1.1.4", 0, Forwarding::DirectRoute, 1, 0, 0)],
        ),
        (
            Service {
                flags: IP_VS_SVC_F_PERSISTENT,
                timeout: 30,
                netmask: 96,
                ..Service::new(fwm6.clone(), "rr")
            },
            vec![dest("2001:db8:1::5", 0, Forwarding::Tunnel, 4, 0, 0)],
        ),
    ]
    .into_iter()
    .map(|(s, d)| (s.key.clone(), (s, d)))
    .collect();

    let mut ipvs = IpvsClient::connect().expect("IpvsClient::connect");
    check_state(ns, &mut ipvs, &want);

    // Typed errors, each naming what it is about.
    let err = ipvs
        .add_service(&Service::new(tcp.clone(), "rr"))
        .unwrap_err();
    assert!(matches!(err, IpvsError::Exists { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "virtual service TCP  10.1.0.1:80 already exists"
    );

    let err = ipvs
        .add_destination(
            &tcp,
            &dest("10.1.1.1", 80, Forwarding::DirectRoute, 1, 0, 0),
        )
        .unwrap_err();
    assert!(matches!(err, IpvsError::Exists { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "real server 10.1.1.1:80 of virtual service TCP  10.1.0.1:80 already exists"
    );

    let err = ipvs.del_destination(&tcp, ip("10.1.1.99"), 80).unwrap_err();
    assert!(matches!(err, IpvsError::NotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "real server 10.1.1.99:80 of virtual service TCP  10.1.0.1:80 does not exist"
    );
    let err = ipvs
        .edit_destination(
            &tcp,
            &dest("10.1.1.98", 80, Forwarding::DirectRoute, 1, 0, 0),
        )
        .unwrap_err();
    assert!(matches!(err, IpvsError::NotFound { .. }), "{err:?}");

    let missing = inet("10.1.0.77", Protocol::Tcp, 80);
    let missing_name = "virtual service TCP  10.1.0.77:80 does not exist";
    assert_eq!(ipvs.service(&missing).unwrap(), None);
    for (op, err) in [
        ("del_service", ipvs.del_service(&missing).unwrap_err()),
        (
            "edit_service",
            ipvs.edit_service(&Service::new(missing.clone(), "rr"))
                .unwrap_err(),
        ),
        (
            "del_destination",
            ipvs.del_destination(&missing, ip("10.1.1.1"), 80)
                .unwrap_err(),
        ),
        (
            "add_destination",
            ipvs.add_destination(
                &missing,
                &dest("10.1.1.1", 80, Forwarding::DirectRoute, 1, 0, 0),
            )
            .unwrap_err(),
        ),
        ("destinations", ipvs.destinations(&missing).unwrap_err()),
        ("zero", ipvs.zero(Some(&missing)).unwrap_err()),
    ] {
        assert!(matches!(err, IpvsError::NotFound { .. }), "{op}: {err:?}");
        assert_eq!(err.to_string(), missing_name, "{op}");
    }

    let err = ipvs
        .add_service(&Service::new(missing.clone(), "nosuch"))
        .unwrap_err();
    assert!(matches!(err, IpvsError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("scheduler \"nosuch\""), "{err}");

    // An IPv4 real server behind an IPv6 service needs tunnelling: the kernel says EINVAL.
    let err = ipvs
        .add_destination(
            &v6,
            &dest("10.1.1.1", 443, Forwarding::DirectRoute, 1, 0, 0),
        )
        .unwrap_err();
    assert!(
        matches!(&err, IpvsError::Kernel { source, .. } if source.raw_os_error() == Some(libc::EINVAL)),
        "{err:?}"
    );
    assert!(err.to_string().contains("IPVS_CMD_NEW_DEST"), "{err}");
    // Refused before sending, as the kernel would.
    let bad_mask = Service {
        netmask: 0,
        ..Service::new(
            ServiceKey::Inet {
                addr: "2001:db8:1::9".parse().unwrap(),
                protocol: Protocol::Udp,
                port: 1,
            },
            "rr",
        )
    };
    let err = ipvs.add_service(&bad_mask).unwrap_err();
    assert!(
        matches!(&err, IpvsError::Kernel { source, .. } if source.raw_os_error() == Some(libc::EINVAL)),
        "{err:?}"
    );
    let err = ipvs
        .add_service(&Service::new(
            ServiceKey::Fwmark {
                family: Family::V4,
                mark: 0,
            },
            "rr",
        ))
        .unwrap_err();
    assert!(matches!(&err, IpvsError::Kernel { .. }), "{err:?}");

    // Without CAP_NET_ADMIN (capabilities are per thread) every command, reads included, fails.
    let ns_path = format!("/var/run/netns/{}", ns.name);
    let perm = thread::spawn(move || {
        join_netns(&ns_path);
        drop_cap_net_admin();
        let mut c = IpvsClient::connect().expect("connect without CAP_NET_ADMIN");
        c.services().unwrap_err()
    })
    .join()
    .unwrap();
    assert!(matches!(perm, IpvsError::Permission { .. }), "{perm:?}");
    assert!(perm.to_string().contains("CAP_NET_ADMIN"), "{perm}");

    // Nothing above changed anything.
    check_state(ns, &mut ipvs, &want);

    // And what ipvsadm made, the client can remove.
    ipvs.del_service(&sctp).expect("delete SCTP service");
    ipvs.del_destination(&v6, "2001:db8:1::3".parse().unwrap(), 8443)
        .expect("delete IPv6 destination");
    assert!(
        !ns.ipvsadm(&["-Ln"]).contains("SCTP"),
        "ipvsadm still shows the SCTP service"
    );
    let v6_line = ns
        .ipvsadm_blocks(&["-Ln"])
        .into_iter()
        .find(|b| b.head.starts_with("TCP  [2001:db8:1::1]:443 "))
        .expect("IPv6 service");
    assert_eq!(v6_line.dests.len(), 1, "{v6_line:?}");
}

/// VIP and real server of the stats test: both on a dummy interface of the namespace, so the
/// namespace's own UDP packets to the VIP pass IPVS (at LOCAL_OUT) and are NATed to the server.
const STATS_VIP: &str = "10.7.0.1";
const STATS_RS: &str = "10.7.0.2";

fn stats_and_zero(ns: &Netns) {
    ns.ip(&["link", "add", "d0", "type", "dummy"]);
    ns.ip(&["link", "set", "d0", "up"]);
    ns.ip(&["addr", "add", "10.7.0.1/24", "dev", "d0"]);
    ns.ip(&["addr", "add", "10.7.0.2/24", "dev", "d0"]);

    let mut ipvs = IpvsClient::connect().expect("IpvsClient::connect");
    let key = inet(STATS_VIP, Protocol::Udp, 7000);
    ipvs.add_service(&Service::new(key.clone(), "rr"))
        .expect("add service");
    let rs = dest(STATS_RS, 7001, Forwarding::Masquerade, 1, 0, 0);
    ipvs.add_destination(&key, &rs).expect("add destination");
    // A second, idle service, to see zero(Some) leave it alone... and zero(None) reach it.
    let other = inet(STATS_VIP, Protocol::Udp, 7100);
    ipvs.add_service(&Service::new(other.clone(), "rr"))
        .expect("add second service");
    ipvs.add_destination(
        &other,
        &dest(STATS_RS, 7101, Forwarding::Masquerade, 1, 0, 0),
    )
    .expect("add second destination");

    let receiver = UdpSocket::bind((STATS_RS, 7001)).expect("bind real server socket");
    receiver
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let sender = UdpSocket::bind((STATS_VIP, 0)).expect("bind client socket");
    const PAYLOAD: usize = 100;
    let send = |to: u16, n: usize| {
        for _ in 0..n {
            sender
                .send_to(&[0x5a; PAYLOAD], (STATS_VIP, to))
                .expect("send to VIP");
        }
    };
    send(7000, 3);
    send(7100, 2);
    let mut buf = [0u8; 2048];
    let delivered = (0..3)
        .filter(|_| receiver.recv_from(&mut buf).is_ok())
        .count();
    println!("real server received {delivered} of 3 datagrams through IPVS NAT");

    // Counters reach the dump at the next estimator run (every 2 s on 6.1).
    let s = wait_for_stats(&mut ipvs, &key, |s| s.in_packets >= 3);
    assert_eq!(s.conns, 1, "one UDP flow: {s:?}");
    assert_eq!(s.in_packets, 3, "{s:?}");
    assert_eq!(s.in_bytes, 3 * (20 + 8 + PAYLOAD as u64), "{s:?}");
    let d = ipvs.destinations(&key).unwrap();
    assert_eq!(d[0].stats.in_packets, 3, "{:?}", d[0]);
    wait_for_stats(&mut ipvs, &other, |s| s.in_packets >= 2);
    compare_stats_with_ipvsadm(ns, &mut ipvs);

    ipvs.zero(Some(&key)).expect("zero one service");
    let s = ipvs.service(&key).unwrap().unwrap();
    assert_eq!(s.stats, Stats::default(), "zeroed service");
    assert_eq!(
        ipvs.destinations(&key).unwrap()[0].stats,
        Stats::default(),
        "its zeroed destination"
    );
    assert_eq!(
        ipvs.service(&other).unwrap().unwrap().stats.in_packets,
        2,
        "zero(Some) touches only its service"
    );
    compare_stats_with_ipvsadm(ns, &mut ipvs);

    ipvs.zero(None).expect("zero all");
    for k in [&key, &other] {
        assert_eq!(ipvs.service(k).unwrap().unwrap().stats, Stats::default());
        for d in ipvs.destinations(k).unwrap() {
            assert_eq!(d.stats, Stats::default());
        }
    }
    compare_stats_with_ipvsadm(ns, &mut ipvs);

    // Counting resumes from zero.
    send(7000, 1);
    let s = wait_for_stats(&mut ipvs, &key, |s| s.in_packets >= 1);
    assert_eq!(s.in_packets, 1, "{s:?}");
    compare_stats_with_ipvsadm(ns, &mut ipvs);
}

fn wait_for_stats(ipvs: &mut IpvsClient, key: &ServiceKey, done: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = ipvs.service(key).unwrap().expect("service").stats;
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{key}: counters did not arrive: {s:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The client's counters equal `ipvsadm -Ln --stats --exact` and its rates `--rate --exact`, for
/// every service and destination. Rates move at every estimator run, so a snapshot is taken again
/// until client, ipvsadm and client agree.
fn compare_stats_with_ipvsadm(ns: &Netns, ipvs: &mut IpvsClient) {
    /// Every service's key and counters, with its destinations' addresses and counters.
    type Snapshot = Vec<(ServiceKey, Stats, Vec<(String, Stats)>)>;
    let snapshot = |ipvs: &mut IpvsClient| -> Snapshot {
        let mut all = Vec::new();
        for s in ipvs.services().unwrap() {
            let dests = ipvs
                .destinations(&s.key)
                .unwrap()
                .into_iter()
                .map(|d| (sockaddr(d.addr, d.port), d.stats))
                .collect();
            all.push((s.key, s.stats, dests));
        }
        all
    };
    let mut last = String::new();
    for _ in 0..5 {
        let before = snapshot(ipvs);
        let stats = ns.ipvsadm_blocks(&["-Ln", "--stats", "--exact"]);
        let rates = ns.ipvsadm_blocks(&["-Ln", "--rate", "--exact"]);
        let after = snapshot(ipvs);
        if before != after {
            continue;
        }
        let mut mismatch = Vec::new();
        for (key, svc, dests) in &before {
            let counters = |s: &Stats| {
                [
                    s.conns,
                    s.in_packets,
                    s.out_packets,
                    s.in_bytes,
                    s.out_bytes,
                ]
            };
            let rate = |s: &Stats| [s.cps, s.in_pps, s.out_pps, s.in_bps, s.out_bps];
            for (what, blocks, f) in [
                ("--stats", &stats, &counters as &dyn Fn(&Stats) -> [u64; 5]),
                ("--rate", &rates, &rate),
            ] {
                let b = block_for(blocks, key);
                let adm = numbers(&b.rest);
                if adm != f(svc) {
                    mismatch.push(format!(
                        "{what} {key}: ipvsadm {adm:?}, client {:?}",
                        f(svc)
                    ));
                }
                assert_eq!(b.dests.len(), dests.len(), "{what} {key}: {b:?}");
                for (addr, st) in dests {
                    let row = b
                        .dests
                        .iter()
                        .find(|r| &r[0] == addr)
                        .unwrap_or_else(|| panic!("{what}: no {addr} under {key}: {b:?}"));
                    let adm = numbers(&row[1..]);
                    if adm != f(st) {
                        mismatch.push(format!(
                            "{what} {key} -> {addr}: ipvsadm {adm:?}, client {:?}",
                            f(st)
                        ));
                    }
                }
            }
        }
        if mismatch.is_empty() {
            return;
        }
        last = mismatch.join("\n");
    }
    panic!("client stats differ from ipvsadm:\n{last}");
}

fn numbers(cols: &[String]) -> [u64; 5] {
    let v: Vec<u64> = cols
        .iter()
        .map(|c| {
            c.parse()
                .unwrap_or_else(|_| panic!("not a number: {c:?} in {cols:?}"))
        })
        .collect();
    v.try_into()
        .unwrap_or_else(|v| panic!("expected 5 numbers, got {v:?}"))
}

// ---------------------------------------------------------------------------------------------
// Cross-checking a whole configuration

/// Asserts that the client's dumps and ipvsadm (`-Ln`, `--thresholds`, `--persistent-conn`) both
/// show exactly `want` (with zero counters: these tests send no traffic).
fn check_state(ns: &Netns, ipvs: &mut IpvsClient, want: &Config) {
    // The client's view.
    let mut got = ipvs.services().expect("services");
    got.sort_by(|a, b| a.key.cmp(&b.key));
    let want_services: Vec<Service> = want.values().map(|(s, _)| s.clone()).collect();
    assert_eq!(got, want_services, "client services() dump");
    for (key, (svc, dests)) in want {
        assert_eq!(
            ipvs.service(key).expect("service").as_ref(),
            Some(svc),
            "client service({key})"
        );
        let mut got = ipvs.destinations(key).expect("destinations");
        got.sort_by_key(|d| (d.addr, d.port));
        let mut dests = dests.clone();
        dests.sort_by_key(|d| (d.addr, d.port));
        assert_eq!(got, dests, "client destinations({key})");
    }

    // ipvsadm's view.
    let listing = ns.ipvsadm(&["-Ln", "--thresholds"]);
    println!("ipvsadm -Ln --thresholds:\n{listing}");
    let list = ns.ipvsadm_blocks(&["-Ln"]);
    let thresholds = ns.ipvsadm_blocks(&["-Ln", "--thresholds"]);
    let persistent = ns.ipvsadm_blocks(&["-Ln", "--persistent-conn"]);
    assert_eq!(list.len(), want.len(), "ipvsadm -Ln: {list:#?}");
    for (key, (svc, dests)) in want {
        let b = block_for(&list, key);
        assert_eq!(b.head, ipvsadm_line(svc), "ipvsadm -Ln line of {key}");
        assert_eq!(
            b.dests.len(),
            dests.len(),
            "ipvsadm -Ln real servers of {key}: {b:?}"
        );
        let tb = block_for(&thresholds, key);
        let pb = block_for(&persistent, key);
        for d in dests {
            let addr = sockaddr(d.addr, d.port);
            let row = |b: &Block, mode: &str| -> Vec<String> {
                b.dests
                    .iter()
                    .find(|r| r[0] == addr)
                    .unwrap_or_else(|| panic!("ipvsadm {mode}: no {addr} under {key}: {b:?}"))
                    .clone()
            };
            // Forward Weight ActiveConn InActConn
            assert_eq!(
                row(b, "-Ln")[1..],
                [
                    d.forwarding.name().to_string(),
                    d.weight.to_string(),
                    d.active_conns.to_string(),
                    d.inactive_conns.to_string()
                ],
                "ipvsadm -Ln: {addr} under {key}"
            );
            // Uthreshold Lthreshold ActiveConn InActConn
            assert_eq!(
                row(tb, "--thresholds")[1..],
                [
                    d.upper_threshold.to_string(),
                    d.lower_threshold.to_string(),
                    d.active_conns.to_string(),
                    d.inactive_conns.to_string()
                ],
                "ipvsadm --thresholds: {addr} under {key}"
            );
            // Weight PersistConn ActiveConn InActConn
            assert_eq!(
                row(pb, "--persistent-conn")[1..],
                [
                    d.weight.to_string(),
                    d.persistent_conns.to_string(),
                    d.active_conns.to_string(),
                    d.inactive_conns.to_string()
                ],
                "ipvsadm --persistent-conn: {addr} under {key}"
            );
        }
    }
    // And the (zero) counters and rates match `--stats` / `--rate`.
    compare_stats_with_ipvsadm(ns, ipvs);
}

/// Connects while the kernel cannot autoload `ip_vs` (its modprobe helper is pointed at
/// /bin/true), so that only the client's own `modprobe ip_vs` can make IPVS appear; first with no
/// `modprobe` on PATH, which must give [`IpvsError::Unavailable`]. Needs a VM where nothing has
/// loaded ip_vs yet, which a fresh boot is.
fn connect_through_modprobe_fallback() -> IpvsClient {
    assert!(
        !ip_vs_loaded(),
        "ip_vs is loaded already: this test must run first in a fresh VM"
    );
    const HELPER: &str = "/proc/sys/kernel/modprobe";
    let helper = std::fs::read_to_string(HELPER).expect(HELPER);
    std::fs::write(HELPER, "/bin/true").expect(HELPER);
    // The guest runs this test alone on one thread: nothing else reads the environment now.
    let path = std::env::var_os("PATH").expect("PATH");
    std::env::set_var("PATH", "/nonexistent");
    let unavailable = IpvsClient::connect();
    std::env::set_var("PATH", &path);
    let connected = IpvsClient::connect();
    std::fs::write(HELPER, helper.trim()).expect(HELPER);

    match unavailable {
        Err(e @ IpvsError::Unavailable { .. }) => {
            println!("without modprobe: {e}");
            assert!(e.to_string().contains("modprobe ip_vs"), "{e}");
        }
        other => panic!("connect without ip_vs and modprobe: {other:?}"),
    }
    let ipvs = connected.expect("connect with the modprobe fallback");
    assert!(ip_vs_loaded(), "connect() loaded ip_vs");
    ipvs
}

/// The service line `ipvsadm -Ln` prints for `s` (`print_service_entry` in ipvsadm.c).
fn ipvsadm_line(s: &Service) -> String {
    let mut line = format!("{} {}", s.key, s.scheduler);
    // print_sched_flags(): sh and mh name their first two flags.
    let names = match s.scheduler.as_str() {
        "sh" => ["sh-fallback", "sh-port", "flag-3"],
        "mh" => ["mh-fallback", "mh-port", "flag-3"],
        _ => ["flag-1", "flag-2", "flag-3"],
    };
    let sched_flags: Vec<&str> = [IP_VS_SVC_F_SCHED1, IP_VS_SVC_F_SCHED2, IP_VS_SVC_F_SCHED3]
        .into_iter()
        .zip(names)
        .filter(|(bit, _)| s.flags & bit != 0)
        .map(|(_, name)| name)
        .collect();
    if !sched_flags.is_empty() {
        line += &format!(" ({})", sched_flags.join(","));
    }
    if s.flags & IP_VS_SVC_F_PERSISTENT != 0 {
        line += &format!(" persistent {}", s.timeout);
        match s.key.family() {
            Family::V4 if s.netmask != u32::MAX => {
                line += &format!(" mask {}", Ipv4Addr::from(s.netmask));
            }
            Family::V6 if s.netmask != 128 => line += &format!(" mask {}", s.netmask),
            _ => {}
        }
    }
    if s.flags & IP_VS_SVC_F_ONEPACKET != 0 {
        line += " ops";
    }
    line
}

fn sockaddr(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// One service of an ipvsadm listing: its line, the columns after its name, and the columns of
/// each `  -> ` line below it.
#[derive(Debug, Clone)]
struct Block {
    head: String,
    rest: Vec<String>,
    dests: Vec<Vec<String>>,
}

fn parse_ipvsadm(out: &str) -> Vec<Block> {
    let mut blocks: Vec<Block> = Vec::new();
    for line in out.lines() {
        let tokens: Vec<String> = line.split_whitespace().map(String::from).collect();
        if let Some(rest) = line.strip_prefix("  -> ") {
            if rest.starts_with("RemoteAddress") {
                continue;
            }
            blocks
                .last_mut()
                .unwrap_or_else(|| panic!("real server line before any service: {out}"))
                .dests
                .push(tokens[1..].to_vec());
        } else if ["TCP ", "UDP ", "SCTP ", "FWM "]
            .iter()
            .any(|p| line.starts_with(p))
        {
            let name_len = if tokens[0] == "FWM" && tokens.get(2).is_some_and(|t| t == "IPv6") {
                3
            } else {
                2
            };
            blocks.push(Block {
                head: line.trim_end().to_string(),
                rest: tokens[name_len..].to_vec(),
                dests: Vec::new(),
            });
        }
    }
    blocks
}

/// The block of service `key` (its line starts with the key as ipvsadm names it).
fn block_for<'a>(blocks: &'a [Block], key: &ServiceKey) -> &'a Block {
    let name = key.to_string();
    blocks
        .iter()
        .find(|b| {
            b.head
                .strip_prefix(&name)
                .is_some_and(|r| r.is_empty() || (r.starts_with(' ') && !r.starts_with(" IPv6")))
        })
        .unwrap_or_else(|| panic!("ipvsadm does not list {name:?}: {blocks:#?}"))
}

// ---------------------------------------------------------------------------------------------
// Namespaces, commands, capabilities

/// A network namespace (lo up), deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("lbd-ipvs-{tag}-{}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        run(&v)
    }

    /// `ipvsadm ARGS` inside the namespace; panics unless it succeeds.
    fn ipvsadm(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", &self.name, "ipvsadm"];
        v.extend_from_slice(args);
        run(&v)
    }

    fn ipvsadm_blocks(&self, args: &[&str]) -> Vec<Block> {
        parse_ipvsadm(&self.ipvsadm(args))
    }

    /// Runs `f` on a thread that has joined the namespace, so that its sockets (the IPVS
    /// client's included) live there.
    fn run(&self, f: impl FnOnce(&Netns) + Send) {
        let path = format!("/var/run/netns/{}", self.name);
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    join_netns(&path);
                    f(self)
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn join_netns(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("non-UTF-8 output")
}

fn ip_vs_loaded() -> bool {
    std::fs::read_to_string("/proc/modules")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("ip_vs "))
}

/// Removes CAP_NET_ADMIN from the calling thread's effective set (`capset` is per thread).
fn drop_cap_net_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and a two-element data array as capget/capset (v3) expect.
    unsafe {
        assert_eq!(
            libc::syscall(
                libc::SYS_capget,
                &mut header as *mut Header,
                data.as_mut_ptr()
            ),
            0,
            "capget: {}",
            std::io::Error::last_os_error()
        );
        data[0].effective &= !(1 << CAP_NET_ADMIN);
        assert_eq!(
            libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()),
            0,
            "capset: {}",
            std::io::Error::last_os_error()
        );
    }
}
