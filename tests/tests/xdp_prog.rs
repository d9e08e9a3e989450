//! Table-driven `BPF_PROG_TEST_RUN` tests of the XDP program: each case is a description, an input
//! frame, the expected verdict and the expected output bytes, plus the fast-path reason it must be
//! counted under. Runs as root inside a private network namespace (the redirect case needs a
//! second interface for the devmap).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{ct_sets, ct_shift, flow_hash, table_slot, CtKey, FlowKey, FlowKey4, CT_WAYS, FAMILY_V4, PROTO_TCP};
use lb_tests::{
    netns::{require_root, Netns},
    packets::*,
};
use lb_userspace::{
    config::Protocol,
    dataplane::{BackendSpec, Dataplane, ServiceSpec, VipAddr},
    maglev::{Maglev, MaglevBackend},
    xdp::{addr_words, XdpDataplane, XdpOptions},
};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const VIP_ANY_PORT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);
const VIP_REDIRECT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 40);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x1);
/// A router between the director and the clients, sending ICMP errors.
const ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);

/// `BPF_PROG_TEST_RUN` runs the program as if it arrived on the namespace's loopback (ifindex 1),
/// so backends "on" ifindex 1 are answered with XDP_TX.
const INGRESS: u32 = 1;
const EGRESS_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x01];
const BE_MAC: [[u8; 6]; 3] = [[0x02, 0xbb, 0, 0, 0, 1], [0x02, 0xbb, 0, 0, 0, 2], [0x02, 0xbb, 0, 0, 0, 3]];

fn backend(last: u8, port: u16, mac: [u8; 6], ifindex: u32) -> BackendSpec {
    BackendSpec {
        addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)),
        port,
        weight: 1,
        mac: Some(mac),
        ifindex,
        src_mac: EGRESS_MAC,
    }
}

fn svc(addr: IpAddr, port: u16, protocol: Protocol, backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec::new(VipAddr::new(addr, port, protocol), backends)
}

fn flow(sport: u16, dport: u16) -> Flow4 {
    Flow4 { src: CLIENT, dst: VIP, sport, dport }
}

struct Case {
    what: &'static str,
    input: Vec<u8>,
    verdict: u32,
    /// `None` = the frame must come back unchanged.
    output: Option<Vec<u8>>,
    reason: &'static str,
}

fn tx(what: &'static str, input: Vec<u8>, mac: [u8; 6], reason: &'static str) -> Case {
    let output = Some(rewritten(&input, mac, EGRESS_MAC));
    Case { what, input, verdict: XDP_TX, output, reason }
}

fn unchanged(what: &'static str, input: Vec<u8>, verdict: u32, reason: &'static str) -> Case {
    Case { what, input, verdict, output: None, reason }
}

/// Runs one frame through the program: (verdict, output bytes).
fn run(dp: &mut XdpDataplane, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 256];
    let res = dp
        .program()
        .test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..Default::default() })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

fn reason_packets(dp: &XdpDataplane, reason: &str) -> u64 {
    dp.stats().expect("stats").reasons[reason].packets
}

fn load() -> XdpDataplane {
    load_sized(4096)
}

fn load_sized(conntrack_size: u32) -> XdpDataplane {
    XdpDataplane::load(XdpOptions {
        table_size: 65537,
        max_vips: 16,
        max_backends: 64,
        conntrack_size,
        log_level: 0,
        keep: None,
    })
    .expect("the verifier accepts the program")
}

/// One VIP and two real servers (four backend ids): the limit tests' dataplane.
fn load_at_limits() -> anyhow::Result<XdpDataplane> {
    Ok(XdpDataplane::load(XdpOptions { table_size: 65537, max_vips: 1, max_backends: 2, conntrack_size: 4096, log_level: 0, keep: None })?)
}

/// Runs `test` as root in a namespace of its own, `name` (removed afterwards, also on failure).
fn in_own_netns(name: &str, test: fn() -> anyhow::Result<()>) -> anyhow::Result<()> {
    require_root()?;
    Netns::new(name)?.enter(test)?
}

#[test]
fn xdp_program_cases() -> anyhow::Result<()> {
    require_root()?;
    let ns = Netns::new("lbdt-prog")?;
    ns.ip(&["link", "add", "tp0", "type", "veth", "peer", "name", "tp1"])?;
    ns.ip(&["link", "set", "tp0", "up"])?;
    ns.ip(&["link", "set", "tp1", "up"])?;
    let other_ifindex: u32 = ns.exec(&["cat", "/sys/class/net/tp0/ifindex"])?.trim().parse()?;
    ns.enter(move || cases(other_ifindex))?
}

fn cases(other_ifindex: u32) -> anyhow::Result<()> {
    let mut dp = load();
    dp.apply(&[
        svc(IpAddr::V4(VIP), 80, Protocol::Tcp, vec![backend(11, 80, BE_MAC[0], INGRESS)]),
        svc(IpAddr::V4(VIP), 53, Protocol::Udp, vec![backend(12, 53, BE_MAC[1], INGRESS)]),
        svc(IpAddr::V4(VIP_ANY_PORT), 0, Protocol::Tcp, vec![backend(13, 0, BE_MAC[2], INGRESS)]),
        svc(IpAddr::V4(VIP_ANY_PORT), 0, Protocol::Udp, vec![backend(13, 0, BE_MAC[2], INGRESS)]),
        svc(IpAddr::V4(VIP_EMPTY), 80, Protocol::Tcp, vec![]),
        svc(IpAddr::V4(VIP_REDIRECT), 80, Protocol::Tcp, vec![backend(14, 80, BE_MAC[0], other_ifindex)]),
        svc(IpAddr::V6(VIP6), 443, Protocol::Tcp, vec![backend(15, 443, BE_MAC[1], INGRESS)]),
    ])?;

    let f = flow(40000, 80);
    let f6 = Flow6 { src: CLIENT6, dst: VIP6, sport: 40001, dport: 443 };
    let redirect_in = tcp4_syn(Flow4 { dst: VIP_REDIRECT, ..f });
    let mut qinq = tcp4_syn_vlan(flow(40013, 80), 42);
    qinq[12..14].copy_from_slice(&0x88a8u16.to_be_bytes());
    let table = vec![
        tx("TCP SYN to a VIP: new flow, destination MAC rewritten", tcp4_syn(f), BE_MAC[0], "new-flow"),
        tx("TCP ACK of the same flow: connection-table hit", tcp4_ack(f, b"GET / HTTP/1.1\r\n\r\n"), BE_MAC[0], "conntrack-hit"),
        tx("UDP to a UDP VIP", udp4(flow(40002, 53), b"query"), BE_MAC[1], "new-flow"),
        tx("TCP SYN to an IPv6 VIP", tcp6_syn(f6), BE_MAC[1], "new-flow"),
        tx("IPv6 with a hop-by-hop header before TCP", tcp6_syn_hop_by_hop(Flow6 { sport: 40003, ..f6 }), BE_MAC[1], "new-flow"),
        tx("IPv6 atomic fragment (offset 0, no more fragments): a whole packet", tcp6_syn_fragment(Flow6 { sport: 40009, ..f6 }, 0, false), BE_MAC[1], "new-flow"),
        tx("port-0 VIP matches any TCP port", tcp4_syn(Flow4 { dst: VIP_ANY_PORT, dport: 8443, ..f }), BE_MAC[2], "new-flow"),
        tx("port-0 VIP matches any UDP port", udp4(Flow4 { dst: VIP_ANY_PORT, dport: 9999, ..f }, b"x"), BE_MAC[2], "new-flow"),
        tx("802.1Q-tagged frame keeps its tag", tcp4_syn_vlan(flow(40004, 80), 42), BE_MAC[0], "new-flow"),
        tx("IPv4 with options: ports read after the options", tcp4_syn_with_options(flow(40005, 80)), BE_MAC[0], "new-flow"),
        Case {
            what: "backend behind another interface: XDP_REDIRECT",
            output: Some(rewritten(&redirect_in, BE_MAC[0], EGRESS_MAC)),
            input: redirect_in,
            verdict: XDP_REDIRECT,
            reason: "new-flow",
        },
        unchanged("TCP to the VIP address on a port that is no VIP", tcp4_syn(flow(40006, 22)), XDP_PASS, "not-vip"),
        unchanged("TCP to a non-VIP address", tcp4_syn(Flow4 { dst: Ipv4Addr::new(192, 0, 2, 99), ..f }), XDP_PASS, "not-vip"),
        unchanged("UDP to the TCP VIP's port", udp4(flow(40007, 80), b"x"), XDP_PASS, "not-vip"),
        unchanged("ARP request for the VIP", arp_request(CLIENT, VIP), XDP_PASS, "not-ip"),
        unchanged("truncated IPv4 header", tcp4_syn(f)[..14 + 12].to_vec(), XDP_PASS, "malformed"),
        unchanged("truncated TCP header", tcp4_syn(f)[..14 + 20 + 2].to_vec(), XDP_PASS, "malformed"),
        unchanged("Ethernet header only", tcp4_syn(f)[..14].to_vec(), XDP_PASS, "malformed"),
        unchanged("truncated IPv6 header", tcp6_syn(f6)[..14 + 36].to_vec(), XDP_PASS, "malformed"),
        unchanged("truncated TCP header after IPv6", tcp6_syn(f6)[..14 + 40 + 2].to_vec(), XDP_PASS, "malformed"),
        unchanged("VIP without backends: dropped", tcp4_syn(Flow4 { dst: VIP_EMPTY, ..f }), XDP_DROP, "no-backend"),
        unchanged("first fragment to a VIP: dropped", udp4_fragment(flow(40008, 53), 0, true), XDP_DROP, "fragment"),
        unchanged("later fragment to a port-specific VIP: no ports, passed", udp4_fragment(flow(40008, 53), 4, false), XDP_PASS, "not-vip"),
        unchanged("IPv6 first fragment to a VIP: dropped", tcp6_syn_fragment(Flow6 { sport: 40010, ..f6 }, 0, true), XDP_DROP, "fragment"),
        unchanged("IPv6 later fragment to a port-specific VIP: no ports, passed", tcp6_syn_fragment(Flow6 { sport: 40012, ..f6 }, 4, true), XDP_PASS, "not-vip"),
        unchanged("truncated IPv6 extension header", tcp6_syn_hop_by_hop(f6)[..14 + 40 + 4].to_vec(), XDP_PASS, "malformed"),
        unchanged("802.1ad (QinQ) service tag: not parsed, passed to the kernel", qinq, XDP_PASS, "not-ip"),
        unchanged("later fragment to a port-0 VIP: dropped", udp4_fragment(Flow4 { dst: VIP_ANY_PORT, ..f }, 4, true), XDP_DROP, "fragment"),
        tx("ICMP fragmentation needed about a TCP VIP's reply: to the flow's real server", icmp4_frag_needed(ROUTER, VIP, f), BE_MAC[0], "icmp-too-big"),
        tx("ICMP fragmentation needed about a UDP VIP's reply", icmp4_frag_needed_udp(ROUTER, VIP, flow(40002, 53)), BE_MAC[1], "icmp-too-big"),
        tx("ICMPv6 packet too big about an IPv6 VIP's reply", icmp6_too_big(ROUTER6, VIP6, f6), BE_MAC[1], "icmp-too-big"),
        unchanged("ICMP echo request to a VIP: passed", icmp4_echo(CLIENT, VIP), XDP_PASS, "not-vip"),
        unchanged(
            "ICMP fragmentation needed quoting a packet from another address: passed",
            icmp4_frag_needed(ROUTER, VIP, Flow4 { dst: Ipv4Addr::new(192, 0, 2, 99), ..f }),
            XDP_PASS,
            "not-vip",
        ),
        unchanged("ICMP fragmentation needed quoting a port that is no VIP: passed", icmp4_frag_needed(ROUTER, VIP, flow(40006, 22)), XDP_PASS, "not-vip"),
        unchanged("ICMP fragmentation needed about a VIP without backends: dropped", icmp4_frag_needed(ROUTER, VIP_EMPTY, Flow4 { dst: VIP_EMPTY, ..f }), XDP_DROP, "no-backend"),
        unchanged("ICMP fragmentation needed quoting too little: passed", icmp4_frag_needed(ROUTER, VIP, f)[..14 + 20 + 8 + 20 + 2].to_vec(), XDP_PASS, "not-vip"),
    ];

    let mut failures = Vec::new();
    for case in &table {
        let before = reason_packets(&dp, case.reason);
        let (verdict, out) = run(&mut dp, &case.input);
        let expected = case.output.clone().unwrap_or_else(|| case.input.clone());
        let counted = reason_packets(&dp, case.reason) - before;
        if verdict != case.verdict || out != expected || counted != 1 {
            failures.push(format!(
                "{}: verdict {verdict} (want {}), output {} (want {}), counted {counted} under {} (want 1)",
                case.what,
                case.verdict,
                if out == expected { "as expected".into() } else { format!("{out:02x?}") },
                if out == expected { String::new() } else { format!("{expected:02x?}") },
                case.reason
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), table.len(), failures.join("\n"));

    // A redirect the kernel refuses (the egress interface missing from TX_PORTS, as when its
    // entry could not be written): aborted and counted as redirect-failed, and not as traffic
    // of the VIP or of its real server, which `lbd status` would show as forwarded.
    let vip = VipAddr::new(IpAddr::V4(VIP_REDIRECT), 80, Protocol::Tcp);
    let forwarded = |dp: &XdpDataplane| {
        let st = dp.stats().expect("stats");
        (st.vips[&vip].packets, st.backends[&(vip, "192.0.2.14:80".to_string())].traffic.packets)
    };
    let mut tx_ports = aya::maps::DevMapHash::try_from(dp.program_map(lb_common::map_names::TX_PORTS)?)?;
    tx_ports.remove(other_ifindex)?;
    let before = (forwarded(&dp), reason_packets(&dp, "redirect-failed"));
    let (verdict, _) = run(&mut dp, &tcp4_syn(Flow4 { dst: VIP_REDIRECT, sport: 40011, ..f }));
    assert_eq!(verdict, XDP_ABORTED);
    assert_eq!(reason_packets(&dp, "redirect-failed"), before.1 + 1);
    assert_eq!(forwarded(&dp), before.0, "(VIP, real server) packets after a failed redirect");
    Ok(())
}

/// Backend choice in the program matches the userspace Maglev table indexed by `flow_hash`, so a
/// second director computing the same table sends every flow to the same backend; flows keep their
/// backend when another one is removed (connection table) and move when theirs is removed.
#[test]
fn choice_matches_userspace_table_and_survives_changes() -> anyhow::Result<()> {
    in_own_netns("lbdt-prog2", choice_inner)
}

fn choice_inner() -> anyhow::Result<()> {
    let mut dp = load();
    let three: Vec<BackendSpec> = (0..3).map(|i| backend(11 + i as u8, 80, BE_MAC[i], INGRESS)).collect();
    dp.apply(&[svc(IpAddr::V4(VIP), 80, Protocol::Tcp, three.clone())])?;

    let maglev = Maglev::new(65537)?;
    let members = |bs: &[BackendSpec]| -> Vec<MaglevBackend> {
        bs.iter()
            .enumerate()
            .map(|(i, b)| MaglevBackend { key: b.key(), weight: b.weight, id: i as u32 })
            .collect()
    };
    let table = maglev.build(&members(&three))?;
    // `lbd status` shows each backend's share of the live table.
    let stats = dp.stats()?;
    for (i, b) in three.iter().enumerate() {
        let want = table.iter().filter(|&&id| id == i as u32).count() as u32;
        let got = stats.backends[&(VipAddr::new(IpAddr::V4(VIP), 80, Protocol::Tcp), b.key())].slots;
        assert_eq!(got, Some(want), "slots of backend {i}");
    }
    let predicted = |sport: u16| -> [u8; 6] {
        let key = FlowKey {
            src: addr_words(IpAddr::V4(CLIENT)).0,
            dst: addr_words(IpAddr::V4(VIP)).0,
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        three[table[table_slot(flow_hash(&key), 65537) as usize] as usize].mac.expect("resolved")
    };

    let mut owner = std::collections::HashMap::new();
    let mut per_backend = [0u32; 3];
    for sport in 20000..20300u16 {
        let (verdict, out) = run(&mut dp, &tcp4_syn(flow(sport, 80)));
        assert_eq!(verdict, XDP_TX, "sport {sport}");
        let mac: [u8; 6] = out[0..6].try_into()?;
        assert_eq!(mac, predicted(sport), "sport {sport}: program and userspace table disagree");
        per_backend[BE_MAC.iter().position(|m| *m == mac).expect("a backend MAC")] += 1;
        owner.insert(sport, mac);
    }
    assert!(per_backend.iter().all(|&n| n > 60), "300 flows spread over 3 backends: {per_backend:?}");

    // Remove backend 3: flows of backends 1 and 2 stay put; flows of backend 3 move elsewhere.
    dp.apply(&[svc(IpAddr::V4(VIP), 80, Protocol::Tcp, three[..2].to_vec())])?;
    for (sport, mac) in &owner {
        let (verdict, out) = run(&mut dp, &tcp4_ack(flow(*sport, 80), b"data"));
        assert_eq!(verdict, XDP_TX);
        let now: [u8; 6] = out[0..6].try_into()?;
        if *mac == BE_MAC[2] {
            assert_ne!(now, BE_MAC[2], "sport {sport}: flow of a removed backend must be re-chosen");
        } else {
            assert_eq!(now, *mac, "sport {sport}: flow moved although its backend stayed");
        }
    }

    // Weight 0 (drain): established flows stay, new flows avoid it.
    let mut drained = three[..2].to_vec();
    drained[0].weight = 0;
    dp.apply(&[svc(IpAddr::V4(VIP), 80, Protocol::Tcp, drained)])?;
    for (sport, mac) in owner.iter().filter(|(_, m)| **m == BE_MAC[0]) {
        let (_, out) = run(&mut dp, &tcp4_ack(flow(*sport, 80), b"data"));
        assert_eq!(out[0..6], *mac, "sport {sport}: drained backend lost an established flow");
    }
    for sport in 30000..30100u16 {
        let (_, out) = run(&mut dp, &tcp4_syn(flow(sport, 80)));
        assert_eq!(out[0..6], BE_MAC[1], "sport {sport}: new flow went to the drained backend");
    }
    Ok(())
}

/// Connection-table hits skip the `VIPS` lookup, so they must still honour what it would say: a
/// port-specific VIP added on a port-0 VIP's address takes that port's established flows, a
/// disabled VIP drops its established flows, and a removed VIP's flows pass to the kernel.
#[test]
fn established_flows_follow_vip_changes() -> anyhow::Result<()> {
    in_own_netns("lbdt-prog3", established_inner)
}

fn established_inner() -> anyhow::Result<()> {
    let mut dp = load();
    let any = svc(IpAddr::V4(VIP_ANY_PORT), 0, Protocol::Tcp, vec![backend(13, 0, BE_MAC[2], INGRESS)]);
    let f = Flow4 { dst: VIP_ANY_PORT, ..flow(41000, 8080) };
    let other = Flow4 { dport: 9090, ..f };
    dp.apply(std::slice::from_ref(&any))?;
    for fl in [f, other] {
        let (verdict, out) = run(&mut dp, &tcp4_syn(fl));
        assert_eq!((verdict, &out[0..6]), (XDP_TX, &BE_MAC[2][..]), "new flow to the port-0 VIP");
    }

    // A port-8080 VIP on the same address: its port's established flow moves, the other stays.
    let exact = svc(IpAddr::V4(VIP_ANY_PORT), 8080, Protocol::Tcp, vec![backend(14, 8080, BE_MAC[0], INGRESS)]);
    dp.apply(&[any.clone(), exact.clone()])?;
    let before = reason_packets(&dp, "new-flow");
    let (verdict, out) = run(&mut dp, &tcp4_ack(f, b"x"));
    assert_eq!((verdict, &out[0..6]), (XDP_TX, &BE_MAC[0][..]), "flow now belongs to the port VIP");
    assert_eq!(reason_packets(&dp, "new-flow") - before, 1, "re-chosen from the port VIP's table");
    let (verdict, out) = run(&mut dp, &tcp4_ack(other, b"x"));
    assert_eq!((verdict, &out[0..6]), (XDP_TX, &BE_MAC[2][..]), "other port stays with the port-0 VIP");

    // Disabled (VRRP backup): established flows are dropped, counted as vip-disabled.
    let mut disabled = any.clone();
    disabled.enabled = false;
    dp.apply(&[disabled, exact.clone()])?;
    let before = reason_packets(&dp, "vip-disabled");
    let (verdict, _) = run(&mut dp, &tcp4_ack(other, b"x"));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(reason_packets(&dp, "vip-disabled") - before, 1);
    // So is a new flow, without a connection entry: its next packet, once the VIP is enabled
    // again, is a new flow (a backup keeps no flows it never forwarded).
    let fresh = Flow4 { dport: 7070, ..f };
    let (verdict, _) = run(&mut dp, &tcp4_syn(fresh));
    assert_eq!(verdict, XDP_DROP, "new flow to a disabled VIP");
    assert_eq!(reason_packets(&dp, "vip-disabled") - before, 2);

    // Enabled again (MASTER), nothing else changed: the established flow is a hit again, on
    // its real server (hits read the VIP's state from the real server's element).
    dp.apply(&[any.clone(), exact.clone()])?;
    let before = reason_packets(&dp, "conntrack-hit");
    let (verdict, out) = run(&mut dp, &tcp4_ack(other, b"x"));
    assert_eq!((verdict, &out[0..6]), (XDP_TX, &BE_MAC[2][..]), "re-enabled VIP forwards its flow");
    assert_eq!(reason_packets(&dp, "conntrack-hit") - before, 1);
    let before = reason_packets(&dp, "new-flow");
    let (verdict, out) = run(&mut dp, &tcp4_ack(fresh, b"x"));
    assert_eq!((verdict, &out[0..6]), (XDP_TX, &BE_MAC[2][..]));
    assert_eq!(reason_packets(&dp, "new-flow") - before, 1, "the flow dropped while disabled left no entry");

    // Removed: the address keeps the port VIP, but port 9090 is no VIP any more.
    dp.apply(&[exact])?;
    let before = reason_packets(&dp, "not-vip");
    let (verdict, out) = run(&mut dp, &tcp4_ack(other, b"x"));
    assert_eq!((verdict, out), (XDP_PASS, tcp4_ack(other, b"x")), "removed VIP's flow passes untouched");
    assert_eq!(reason_packets(&dp, "not-vip") - before, 1);
    Ok(())
}

/// The program counts a forwarded packet once, for its real server; a virtual server's figures
/// and the reasons `conntrack-hit` and `new-flow` are sums over real servers. They must not drop
/// when a real server or a virtual server is removed, and a virtual server that gets a freed id
/// must not inherit what it counted.
#[test]
fn forwarded_counts_survive_removed_and_reused_backends() -> anyhow::Result<()> {
    in_own_netns("lbdt-prog6", counts_inner)
}

fn counts_inner() -> anyhow::Result<()> {
    use lb_userspace::dataplane::Traffic;
    let mut dp = load();
    let a = VipAddr::new(IpAddr::V4(VIP), 80, Protocol::Tcp);
    let b = VipAddr::new(IpAddr::V4(VIP_EMPTY), 80, Protocol::Tcp);
    let two = vec![backend(11, 80, BE_MAC[0], INGRESS), backend(12, 80, BE_MAC[1], INGRESS)];
    let third = backend(13, 80, BE_MAC[2], INGRESS);
    dp.apply(&[ServiceSpec::new(a, two.clone())])?;

    // 40 flows to A, a SYN and an ACK each: 40 new flows and 40 hits over both real servers.
    let (mut syn_bytes, mut ack_bytes) = (0, 0);
    for i in 0..40 {
        let f = flow(42000 + i, 80);
        let (syn, ack) = (tcp4_syn(f), tcp4_ack(f, b"x"));
        assert_eq!(run(&mut dp, &syn).0, XDP_TX, "SYN {i}");
        assert_eq!(run(&mut dp, &ack).0, XDP_TX, "ACK {i}");
        syn_bytes += syn.len() as u64;
        ack_bytes += ack.len() as u64;
    }
    let of_a = Traffic { packets: 80, bytes: syn_bytes + ack_bytes, new_flows: 40 };
    let reasons = |dp: &XdpDataplane| -> anyhow::Result<[(u64, u64); 2]> {
        let s = dp.stats()?;
        Ok(["conntrack-hit", "new-flow"].map(|r| (s.reasons[r].packets, s.reasons[r].bytes)))
    };
    let s = dp.stats()?;
    assert_eq!(s.vips[&a], of_a);
    let per_real: Vec<u64> = two.iter().map(|r| s.backends[&(a, r.key())].traffic.packets).collect();
    assert!(per_real.iter().all(|&p| p > 0) && per_real.iter().sum::<u64>() == 80, "per real server: {per_real:?}");
    assert_eq!(reasons(&dp)?, [(40, ack_bytes), (40, syn_bytes)]);

    // A's first real server goes: A keeps what it forwarded, and so do the reasons.
    let freed = dp.backend_ids(&a);
    dp.apply(&[ServiceSpec::new(a, vec![two[1].clone()])])?;
    assert_eq!(dp.stats()?.vips[&a], of_a, "A after removing a real server");
    assert_eq!(reasons(&dp)?, [(40, ack_bytes), (40, syn_bytes)]);

    // B's real server gets the freed id (once it may be reused): B starts from zero, A keeps its
    // figures.
    dp.settle();
    dp.apply(&[ServiceSpec::new(a, vec![two[1].clone()]), ServiceSpec::new(b, vec![third.clone()])])?;
    let reused = dp.backend_ids(&b);
    assert!(reused.iter().all(|id| freed.contains(id)), "B's real server reuses an id A freed: {reused:?} of {freed:?}");
    let s = dp.stats()?;
    assert_eq!((s.vips[&a], s.vips[&b]), (of_a, Traffic::default()), "A and B after the reuse");
    assert_eq!(s.backends[&(b, third.key())].traffic, Traffic::default());
    let f = Flow4 { dst: VIP_EMPTY, ..flow(43000, 80) };
    let (verdict, out) = run(&mut dp, &tcp4_syn(f));
    assert_eq!((verdict, &out[0..6]), (XDP_TX, &BE_MAC[2][..]));
    let syn_b = tcp4_syn(f).len() as u64;
    let s = dp.stats()?;
    assert_eq!((s.vips[&a], s.vips[&b]), (of_a, Traffic { packets: 1, bytes: syn_b, new_flows: 1 }));
    assert_eq!(reasons(&dp)?, [(40, ack_bytes), (41, syn_bytes + syn_b)]);

    // A goes, and comes back: the reasons keep everything, the new A starts from zero.
    dp.apply(&[ServiceSpec::new(b, vec![third.clone()])])?;
    assert_eq!(reasons(&dp)?, [(40, ack_bytes), (41, syn_bytes + syn_b)], "after removing A");
    dp.settle();
    dp.apply(&[ServiceSpec::new(a, two.clone()), ServiceSpec::new(b, vec![third])])?;
    let s = dp.stats()?;
    assert_eq!(s.vips[&a], Traffic::default(), "A again, with ids of the old A");
    assert_eq!(reasons(&dp)?, [(40, ack_bytes), (41, syn_bytes + syn_b)], "after A's ids were reused");
    Ok(())
}

/// A connection entry names a backend id and its generation: once the id is freed and given to
/// another real server (a new generation), the old entries are not honoured, whether the id went
/// to another virtual server or to the same one. Their flows are chosen again from their own
/// virtual server's table, as new flows.
#[test]
fn a_reused_backend_id_takes_none_of_the_old_flows() -> anyhow::Result<()> {
    in_own_netns("lbdt-prog7", reused_inner)
}

fn reused_inner() -> anyhow::Result<()> {
    let mut dp = load();
    let a = VipAddr::new(IpAddr::V4(VIP), 80, Protocol::Tcp);
    let b = VipAddr::new(IpAddr::V4(VIP_EMPTY), 80, Protocol::Tcp);
    let two = vec![backend(11, 80, BE_MAC[0], INGRESS), backend(12, 80, BE_MAC[1], INGRESS)];
    dp.apply(&[ServiceSpec::new(a, two.clone())])?;
    let (mut on_first, mut on_second) = (Vec::new(), Vec::new());
    for i in 0..60 {
        let f = flow(44000 + i, 80);
        let (verdict, out) = run(&mut dp, &tcp4_syn(f));
        assert_eq!(verdict, XDP_TX, "SYN {i}");
        if out[0..6] == BE_MAC[0] { on_first.push(f) } else { on_second.push(f) }
    }
    assert!(!on_first.is_empty() && !on_second.is_empty(), "60 flows over two real servers");
    // A's first real server goes; B's real server (another MAC) gets its id.
    let before_ids = dp.backend_ids(&a);
    dp.apply(&[ServiceSpec::new(a, vec![two[1].clone()])])?;
    let kept = dp.backend_ids(&a);
    let freed: Vec<u32> = before_ids.iter().copied().filter(|id| !kept.contains(id)).collect();
    dp.settle();
    let third = backend(13, 80, BE_MAC[2], INGRESS);
    dp.apply(&[ServiceSpec::new(a, vec![two[1].clone()]), ServiceSpec::new(b, vec![third.clone()])])?;
    assert!(dp.backend_ids(&b).iter().all(|id| freed.contains(id)), "B reuses {freed:?}: {:?}", dp.backend_ids(&b));
    let before = reason_packets(&dp, "new-flow");
    for f in &on_first {
        let (verdict, out) = run(&mut dp, &tcp4_ack(*f, b"x"));
        assert_eq!((verdict, &out[0..6]), (XDP_TX, &BE_MAC[1][..]), "{f:?}: not to B's real server, to A's");
    }
    assert_eq!(reason_packets(&dp, "new-flow") - before, on_first.len() as u64, "chosen again, as new flows");

    // A's second real server goes and a new one of A gets its id: the same virtual server, so
    // only the generation tells the old entries from the new real server's.
    dp.apply(&[ServiceSpec::new(b, vec![third.clone()])])?;
    let freed = kept;
    dp.settle();
    dp.apply(&[ServiceSpec::new(a, vec![backend(14, 80, BE_MAC[0], INGRESS)]), ServiceSpec::new(b, vec![third])])?;
    assert!(dp.backend_ids(&a).iter().all(|id| freed.contains(id)), "A's new real server reuses {freed:?}: {:?}", dp.backend_ids(&a));
    let (hits, new) = (reason_packets(&dp, "conntrack-hit"), reason_packets(&dp, "new-flow"));
    for f in &on_second {
        let (verdict, out) = run(&mut dp, &tcp4_ack(*f, b"x"));
        assert_eq!((verdict, &out[0..6]), (XDP_TX, &BE_MAC[0][..]), "{f:?}");
    }
    assert_eq!(reason_packets(&dp, "conntrack-hit"), hits, "an old entry was honoured for the id's new real server");
    assert_eq!(reason_packets(&dp, "new-flow") - new, on_second.len() as u64);
    Ok(())
}

/// The connection table is a fixed-size cache: a flood of one-packet flows (a SYN flood, a scan)
/// four times its size must not push out established flows (those that sent a second packet),
/// which keep their backend although a backend added since would take a quarter of them.
#[test]
fn conntrack_keeps_established_flows_under_a_flood() -> anyhow::Result<()> {
    in_own_netns("lbdt-prog4", flood_inner)
}

fn flood_inner() -> anyhow::Result<()> {
    const SIZE: u32 = 1024;
    let mut dp = load_sized(SIZE);
    let three: Vec<BackendSpec> = (0..3).map(|i| backend(11 + i as u8, 80, BE_MAC[i], INGRESS)).collect();
    dp.apply(&[svc(IpAddr::V4(VIP), 80, Protocol::Tcp, three.clone())])?;

    // 64 established flows, at most CT_WAYS - 1 in a set (a set full of established flows
    // replaces one of them by design, see lb-ebpf/src/conntrack.rs).
    let (hash_key, shift) = (dp.conntrack_hash_keys().0, ct_shift(ct_sets(SIZE)));
    let set_of = |f: &Flow4| {
        let key = FlowKey4 {
            src: addr_words(IpAddr::V4(f.src)).0[0],
            dst: addr_words(IpAddr::V4(f.dst)).0[0],
            sport: f.sport.to_be(),
            dport: f.dport.to_be(),
            proto: PROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        };
        key.ct_hash(&hash_key) >> shift
    };
    let mut per_set = std::collections::HashMap::new();
    let mut established = Vec::new();
    for sport in 20000u16.. {
        let f = flow(sport, 80);
        let n = per_set.entry(set_of(&f)).or_insert(0usize);
        if *n == CT_WAYS - 1 {
            continue;
        }
        *n += 1;
        let (verdict, out) = run(&mut dp, &tcp4_syn(f));
        assert_eq!(verdict, XDP_TX);
        let (verdict, again) = run(&mut dp, &tcp4_ack(f, b"GET /"));
        assert_eq!((verdict, &again[0..6]), (XDP_TX, &out[0..6]), "sport {sport}: second packet");
        established.push((f, <[u8; 6]>::try_from(&out[0..6])?));
        if established.len() == 64 {
            break;
        }
    }
    assert_eq!(dp.conntrack_len(), 64);

    // The flood: 4096 one-packet flows from another client.
    let before = reason_packets(&dp, "new-flow");
    for sport in 1..=4096u16 {
        let f = Flow4 { src: Ipv4Addr::new(192, 0, 2, 77), ..flow(sport, 80) };
        let (verdict, _) = run(&mut dp, &tcp4_syn(f));
        assert_eq!(verdict, XDP_TX);
        *per_set.entry(set_of(&f)).or_insert(0) += 1;
    }
    assert_eq!(reason_packets(&dp, "new-flow") - before, 4096, "every flood packet is a new flow");
    // Nothing is ever deleted and an insert takes an empty way first, so each set holds all of
    // its flows or is full. (Not simply "full": the flood varies the source port only, and with
    // some hash keys a few sets get fewer than CT_WAYS of its 4096 flows; seen: 989 of 1024.)
    let held = dp.conntrack_len();
    let expected: usize = per_set.values().map(|&n| n.min(CT_WAYS)).sum();
    assert_eq!(held, expected, "flows held after the flood (table of {SIZE})");
    assert!(held > SIZE as usize * 9 / 10, "the flood filled the table: {held} flows of {SIZE}");

    // A fourth backend takes about a quarter of the lookup table; established flows stay put.
    let mut four = three.clone();
    four.push(backend(20, 80, [0x02, 0xbb, 0, 0, 0, 4], INGRESS));
    dp.apply(&[svc(IpAddr::V4(VIP), 80, Protocol::Tcp, four)])?;
    let hits = reason_packets(&dp, "conntrack-hit");
    let mut moved = Vec::new();
    for (f, mac) in &established {
        let (verdict, out) = run(&mut dp, &tcp4_ack(*f, b"more"));
        assert_eq!(verdict, XDP_TX);
        if out[0..6] != mac[..] {
            moved.push(f.sport);
        }
    }
    assert!(moved.is_empty(), "established flows moved after the flood: sports {moved:?}");
    assert_eq!(reason_packets(&dp, "conntrack-hit") - hits, 64, "every established flow hit its entry");
    Ok(())
}

/// A SYN of a flow that already has a connection entry (a retransmitted SYN whose SYN-ACK was
/// lost, or a client reusing its port) keeps the flow's backend, for both families, after a
/// backend added since would take about a quarter of the flows: the connection table decides for
/// every packet of a known flow, a SYN included, so a retransmitted SYN reaches the backend that
/// holds the half-open connection (Katran instead re-chooses on every SYN).
#[test]
fn syn_of_an_established_flow_keeps_its_backend() -> anyhow::Result<()> {
    in_own_netns("lbdt-prog5", syn_again_inner)
}

fn syn_again_inner() -> anyhow::Result<()> {
    let mut dp = load();
    let services = |n: usize| {
        let bs: Vec<BackendSpec> = (0..n)
            .map(|i| backend(11 + i as u8, 0, [0x02, 0xbb, 0, 0, 0, i as u8 + 1], INGRESS))
            .collect();
        vec![
            svc(IpAddr::V4(VIP), 80, Protocol::Tcp, bs.iter().map(|b| BackendSpec { port: 80, ..b.clone() }).collect()),
            svc(IpAddr::V6(VIP6), 443, Protocol::Tcp, bs.iter().map(|b| BackendSpec { port: 443, ..b.clone() }).collect()),
        ]
    };
    dp.apply(&services(3))?;
    let frames = |sport: u16| {
        [("IPv4", tcp4_syn(flow(sport, 80))), ("IPv6", tcp6_syn(Flow6 { src: CLIENT6, dst: VIP6, sport, dport: 443 }))]
    };
    let mut owner = Vec::new();
    for sport in 20000..20200u16 {
        for (family, syn) in frames(sport) {
            let (verdict, out) = run(&mut dp, &syn);
            assert_eq!(verdict, XDP_TX, "{family} sport {sport}");
            owner.push((format!("{family} {sport}"), syn, <[u8; 6]>::try_from(&out[0..6])?));
        }
    }
    assert_eq!(reason_packets(&dp, "new-flow"), 400);

    dp.apply(&services(4))?;
    let mut moved = Vec::new();
    for (flow, syn, mac) in &owner {
        let (verdict, out) = run(&mut dp, syn);
        assert_eq!(verdict, XDP_TX);
        if out[0..6] != mac[..] {
            moved.push(flow);
        }
    }
    assert!(moved.is_empty(), "{} SYNs of established flows moved to the new backend: {moved:?}", moved.len());
    assert_eq!(reason_packets(&dp, "conntrack-hit"), 400, "every second SYN found its flow's entry");
    // New flows do use the new backend.
    let mut fourth = 0;
    for sport in 30000..30200u16 {
        let (_, out) = run(&mut dp, &tcp4_syn(flow(sport, 80)));
        fourth += (out[0..6] == [0x02, 0xbb, 0, 0, 0, 4]) as u32;
    }
    assert!((20..=90).contains(&fourth), "new flows on the fourth backend: {fourth} of 200");
    Ok(())
}

/// `max_backends` counts real servers, not ids: new real servers get their ids before the ones
/// they replace give theirs back (after the flip), so a reload replacing every real server at
/// once needs both, and the maps hold twice as many.
#[test]
fn every_real_server_replaced_at_once_at_the_limit() -> anyhow::Result<()> {
    in_own_netns("lbdt-limit", limit_inner)
}

fn limit_inner() -> anyhow::Result<()> {
    let mut dp = load_at_limits()?;
    let pair = |a: u8, b: u8| svc(IpAddr::V4(VIP), 80, Protocol::Tcp, vec![backend(a, 80, BE_MAC[0], INGRESS), backend(b, 80, BE_MAC[1], INGRESS)]);
    dp.apply(&[pair(11, 12)])?;
    dp.apply(&[pair(21, 22)]).map_err(|e| anyhow::anyhow!("replacing both real servers: {e}"))?;
    let counts = dp.stats()?;
    let reals: Vec<&String> = counts.backends.keys().map(|(_, k)| k).collect();
    assert_eq!(reals, ["192.0.2.21:80", "192.0.2.22:80"], "the replaced real servers are gone");
    let (verdict, out) = run(&mut dp, &tcp4_syn(flow(40000, 80)));
    assert_eq!(verdict, XDP_TX);
    assert!(out[0..6] == BE_MAC[0] || out[0..6] == BE_MAC[1], "{:02x?}", &out[0..6]);
    // And back, through the ids freed by the first replacement.
    dp.apply(&[pair(11, 12)])?;
    Ok(())
}

/// An apply that fails on a new real server (here: its interface is gone, so it cannot join
/// TX_PORTS) gives its id back: failing again and again does not use up `max_backends`.
#[test]
fn a_failed_apply_gives_back_its_new_real_servers_ids() -> anyhow::Result<()> {
    in_own_netns("lbdt-ids", ids_inner)
}

fn ids_inner() -> anyhow::Result<()> {
    let mut dp = load_at_limits()?;
    let gone = svc(IpAddr::V4(VIP), 80, Protocol::Tcp, vec![backend(31, 80, BE_MAC[2], 999_999)]);
    for attempt in 0..6 {
        let err = dp.apply(std::slice::from_ref(&gone)).expect_err("an interface that does not exist");
        assert!(err.to_string().contains("adding ifindex 999999 to TX_PORTS"), "attempt {attempt}: {err}");
    }
    let pair = svc(IpAddr::V4(VIP), 80, Protocol::Tcp, vec![backend(11, 80, BE_MAC[0], INGRESS), backend(12, 80, BE_MAC[1], INGRESS)]);
    dp.apply(&[pair]).map_err(|e| anyhow::anyhow!("two real servers after six failed applies: {e}"))?;
    let (verdict, out) = run(&mut dp, &tcp4_syn(flow(40000, 80)));
    assert_eq!(verdict, XDP_TX);
    assert!(out[0..6] == BE_MAC[0] || out[0..6] == BE_MAC[1], "{:02x?}", &out[0..6]);
    Ok(())
}

/// An apply that fails part way through a VIP's real servers has already rewritten the ones
/// before the failure; applying the previous services again (what a refused reload does) must
/// rewrite them back, not take the VIP for unchanged.
#[test]
fn a_failed_apply_is_undone_by_applying_the_previous_services() -> anyhow::Result<()> {
    in_own_netns("lbdt-undo", undo_inner)
}

fn undo_inner() -> anyhow::Result<()> {
    let mut dp = load();
    let before = svc(IpAddr::V4(VIP), 80, Protocol::Tcp, vec![backend(11, 80, BE_MAC[0], INGRESS), backend(12, 80, BE_MAC[1], INGRESS)]);
    dp.apply(std::slice::from_ref(&before))?;
    // .11 gets a new MAC, then the new .31 fails: its interface does not exist.
    let failing = svc(
        IpAddr::V4(VIP),
        80,
        Protocol::Tcp,
        vec![backend(11, 80, BE_MAC[2], INGRESS), backend(12, 80, BE_MAC[1], INGRESS), backend(31, 80, BE_MAC[2], 999_999)],
    );
    dp.apply(&[failing]).expect_err("an interface that does not exist");
    dp.apply(std::slice::from_ref(&before))?;
    let mut seen = [0; 2];
    for sport in 40000..40100 {
        let (verdict, out) = run(&mut dp, &tcp4_syn(flow(sport, 80)));
        assert_eq!(verdict, XDP_TX, "flow from port {sport}");
        let i = BE_MAC.iter().position(|m| out[0..6] == *m).expect("a real server's MAC");
        assert!(i < 2, "flow from port {sport} went to {:02x?}, the failed apply's MAC for .11", BE_MAC[i]);
        seen[i] += 1;
    }
    assert!(seen[0] > 0 && seen[1] > 0, "both real servers get flows: {seen:?}");
    Ok(())
}

/// Ids released by an apply are not given out again before an RCU grace period has passed, so a
/// VIP that replaces another in one apply shares neither its VIP id nor a backend id with it (a
/// program run still reading the old VIP could otherwise forward to the new one's real servers);
/// at the limits, the apply waits for the grace period instead of failing.
#[test]
fn released_ids_are_not_reused_at_once() -> anyhow::Result<()> {
    in_own_netns("lbdt-reuse", reuse_inner)
}

fn reuse_inner() -> anyhow::Result<()> {
    let two = |vip: Ipv4Addr, a: u8, b: u8| svc(IpAddr::V4(vip), 80, Protocol::Tcp, vec![backend(a, 80, BE_MAC[0], INGRESS), backend(b, 80, BE_MAC[1], INGRESS)]);
    let (a, b) = (two(VIP, 11, 12), two(VIP_EMPTY, 21, 22));
    let mut dp = load();
    dp.apply(std::slice::from_ref(&a))?;
    let ids_a = dp.backend_ids(&a.vip);
    dp.apply(std::slice::from_ref(&b))?;
    let ids_b = dp.backend_ids(&b.vip);
    assert!(ids_a.iter().all(|id| !ids_b.contains(id)), "{ids_a:?} reused for {ids_b:?}");

    // One VIP and four backend ids: every id B takes was just released or is the last spare.
    let mut dp = load_at_limits()?;
    for (i, services) in [&a, &b, &a, &b].into_iter().enumerate() {
        dp.apply(std::slice::from_ref(services)).map_err(|e| anyhow::anyhow!("apply {i} at the limits: {e}"))?;
        let dst = if let IpAddr::V4(v) = services.vip.addr { v } else { unreachable!() };
        let (verdict, _) = run(&mut dp, &tcp4_syn(Flow4 { src: CLIENT, dst, sport: 40000 + i as u16, dport: 80 }));
        assert_eq!(verdict, XDP_TX, "apply {i}: a new flow to {dst}");
    }
    Ok(())
}

/// The kernel drops an interface's `TX_PORTS` entry when the interface leaves the namespace; if
/// it comes back with the same index, its real servers, written again once resolved, must be
/// reachable through it again.
#[test]
fn an_interface_that_comes_back_is_put_back_into_tx_ports() -> anyhow::Result<()> {
    require_root()?;
    let ns = Netns::new("lbdt-back")?;
    let away = Netns::new("lbdt-away")?;
    ns.ip(&["link", "add", "tg0", "type", "veth", "peer", "name", "tg1"])?;
    ns.ip(&["link", "set", "tg0", "up"])?;
    ns.ip(&["link", "set", "tg1", "up"])?;
    let ifindex: u32 = ns.exec(&["cat", "/sys/class/net/tg0/ifindex"])?.trim().parse()?;
    let behind = move |mac: Option<[u8; 6]>| {
        let mut b = backend(11, 80, BE_MAC[0], ifindex);
        b.mac = mac;
        vec![svc(IpAddr::V4(VIP), 80, Protocol::Tcp, vec![b])]
    };
    let redirect = |dp: &mut XdpDataplane, sport: u16| run(dp, &tcp4_syn(flow(sport, 80))).0;
    let dp = ns.enter(move || -> anyhow::Result<XdpDataplane> {
        let mut dp = load();
        dp.apply(&behind(Some(BE_MAC[0])))?;
        assert_eq!(redirect(&mut dp, 40000), XDP_REDIRECT);
        Ok(dp)
    })??;
    // Away and back: lbd sees its neighbours go (the real server unresolved) and come back.
    ns.ip(&["link", "set", "tg0", "netns", &away.name])?;
    away.ip(&["link", "set", "tg0", "netns", &ns.name])?;
    ns.ip(&["link", "set", "tg0", "up"])?;
    let back: u32 = ns.exec(&["cat", "/sys/class/net/tg0/ifindex"])?.trim().parse()?;
    assert_eq!(back, ifindex, "the interface kept its index");
    ns.enter(move || -> anyhow::Result<()> {
        let mut dp = dp;
        dp.apply(&behind(None))?;
        dp.apply(&behind(Some(BE_MAC[0])))?;
        let verdict = redirect(&mut dp, 40001);
        assert_eq!(verdict, XDP_REDIRECT, "redirect-failed: {}", reason_packets(&dp, "redirect-failed"));
        Ok(())
    })??;
    Ok(())
}

/// An ICMP "fragmentation needed" about a real server's reply goes to that real server: the one
/// the quoted flow's connection entry names (here a drained one, no longer in the lookup table),
/// else the lookup table's choice; it makes no connection entry, and is counted as
/// `icmp-too-big`, not as the real server's traffic.
#[test]
fn too_big_goes_to_the_quoted_flows_real_server() -> anyhow::Result<()> {
    in_own_netns("lbdt-icmp", || {
        let mut dp = load();
        let backends = |weights: [u32; 3]| -> Vec<BackendSpec> {
            (0..3).map(|i| BackendSpec { weight: weights[i], ..backend(11 + i as u8, 80, BE_MAC[i], INGRESS) }).collect()
        };
        dp.apply(&[svc(IpAddr::V4(VIP), 80, Protocol::Tcp, backends([1, 1, 1]))])?;
        let dst_mac = |out: &[u8]| <[u8; 6]>::try_from(&out[..6]).unwrap();
        let mut owners = Vec::new();
        for sport in 41000..41030 {
            let (verdict, out) = run(&mut dp, &tcp4_syn(flow(sport, 80)));
            assert_eq!(verdict, XDP_TX);
            owners.push((sport, dst_mac(&out)));
        }
        assert!(owners.iter().any(|(_, mac)| *mac == BE_MAC[0]), "no flow went to the first real server: {owners:?}");
        // Drained: established flows keep it, the table no longer has it.
        dp.apply(&[svc(IpAddr::V4(VIP), 80, Protocol::Tcp, backends([0, 1, 1]))])?;
        let forwarded = |dp: &XdpDataplane| dp.stats().expect("stats").vips.values().map(|v| v.packets).sum::<u64>();
        let (mut entries, packets) = (dp.conntrack_len(), forwarded(&dp));
        for (sport, owner) in &owners {
            let input = icmp4_frag_needed(ROUTER, VIP, flow(*sport, 80));
            let (verdict, out) = run(&mut dp, &input);
            assert_eq!((verdict, out), (XDP_TX, rewritten(&input, *owner, EGRESS_MAC)), "flow from port {sport}");
        }
        // Flows without an entry: where their next packet will go, and no entry is made.
        for sport in 42000..42010 {
            let (verdict, out) = run(&mut dp, &icmp4_frag_needed(ROUTER, VIP, flow(sport, 80)));
            assert_eq!(verdict, XDP_TX);
            assert_eq!(dp.conntrack_len(), entries, "an ICMP error made a connection entry");
            let (_, syn) = run(&mut dp, &tcp4_syn(flow(sport, 80)));
            assert_eq!(dst_mac(&out), dst_mac(&syn), "flow from port {sport}");
            assert_ne!(dst_mac(&out), BE_MAC[0], "to the drained real server");
            entries += 1;
        }
        assert_eq!(reason_packets(&dp, "icmp-too-big"), 40);
        assert_eq!(forwarded(&dp) - packets, 10, "only the SYNs count as the VIP's traffic");
        Ok(())
    })
}

/// Veth pairs in `ns`, both ends up.
fn veth_pairs(ns: &Netns, pairs: &[(&str, &str)]) -> anyhow::Result<()> {
    for (a, b) in pairs {
        ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b])?;
        for dev in [a, b] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
    }
    Ok(())
}

/// Whether `dev` in `ns` has an XDP program attached.
fn xdp_on(ns: &Netns, dev: &str) -> anyhow::Result<bool> {
    Ok(ns.xdp_program(dev)?.is_some())
}

/// Interfaces deleted and created again with the same index (so nothing but the missing programs
/// tells): told the interfaces (`links_changed`, as the daemon's watcher does), the dataplane
/// attaches lbd's program to its own interface again, and `xdp_pass` and the `TX_PORTS` entry to
/// the egress interface, without an apply: the real server's redirect works again.
#[test]
fn interfaces_created_again_get_their_programs_and_ports_back() -> anyhow::Result<()> {
    require_root()?;
    let ns = Netns::new("lbdt-again")?;
    veth_pairs(&ns, &[("tc0", "tc1"), ("td0", "td1")])?;
    let index = |dev: &str| -> anyhow::Result<u32> { Ok(ns.exec(&["cat", &format!("/sys/class/net/{dev}/ifindex")])?.trim().parse()?) };
    let xdp_on = |dev: &str| xdp_on(&ns, dev);
    let (director, egress) = (index("tc0")?, index("td0")?);
    let redirect = |dp: &mut XdpDataplane, sport: u16| run(dp, &tcp4_syn(flow(sport, 80))).0;
    let mut dp = ns.enter(move || -> anyhow::Result<XdpDataplane> {
        let mut dp = load();
        dp.attach("tc0", true)?;
        dp.apply(&[svc(IpAddr::V4(VIP), 80, Protocol::Tcp, vec![backend(11, 80, BE_MAC[0], egress)])])?;
        assert_eq!(redirect(&mut dp, 40000), XDP_REDIRECT);
        // Told the interfaces as they are, it changes nothing.
        dp.links_changed(&lb_userspace::links::dump()?)?;
        Ok(dp)
    })??;
    assert!(xdp_on("tc0")? && xdp_on("td0")?);

    let recreate = |a: &str, b: &str, ifindex: u32| -> anyhow::Result<()> {
        ns.ip(&["link", "del", a])?;
        ns.ip(&["link", "add", a, "index", &ifindex.to_string(), "type", "veth", "peer", "name", b])?;
        for dev in [a, b] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        assert_eq!(index(a)?, ifindex);
        assert!(!xdp_on(a)?, "{a} was created without programs");
        Ok(())
    };
    // td0 without its TX_PORTS entry fails the real server's redirect until the dataplane is told
    // the interfaces; then it works again.
    let egress_followed = |mut dp: XdpDataplane, sport: u16| {
        ns.enter(move || -> anyhow::Result<XdpDataplane> {
            assert_eq!(redirect(&mut dp, sport), XDP_ABORTED, "TX_PORTS lost td0's entry");
            dp.links_changed(&lb_userspace::links::dump()?)?;
            let verdict = redirect(&mut dp, sport + 1);
            assert_eq!(verdict, XDP_REDIRECT, "redirect-failed: {}", reason_packets(&dp, "redirect-failed"));
            Ok(dp)
        })?
    };
    // The egress interface first, then the director's: each is followed on its own.
    recreate("td0", "td1", egress)?;
    dp = egress_followed(dp, 40001)?;
    assert!(xdp_on("td0")?, "xdp_pass is not on td0 again");
    recreate("tc0", "tc1", director)?;
    dp = ns.enter(move || -> anyhow::Result<XdpDataplane> {
        dp.links_changed(&lb_userspace::links::dump()?)?;
        assert_eq!(redirect(&mut dp, 40003), XDP_REDIRECT);
        Ok(dp)
    })??;
    // Away to another namespace, followed while away, and back with its index: no apply (the
    // real server did not change), yet its port and xdp_pass are back.
    let away = Netns::new("lbdt-again2")?;
    ns.ip(&["link", "set", "td0", "netns", &away.name])?;
    dp = ns.enter(move || -> anyhow::Result<XdpDataplane> {
        dp.links_changed(&lb_userspace::links::dump()?)?;
        Ok(dp)
    })??;
    away.ip(&["link", "set", "td0", "netns", &ns.name])?;
    ns.ip(&["link", "set", "td0", "up"])?;
    assert_eq!(index("td0")?, egress);
    assert!(!xdp_on("td0")?, "td0 came back with its program");
    dp = egress_followed(dp, 40004)?;
    assert!(xdp_on("td0")?, "xdp_pass is not on td0 again after it came back");
    assert!(xdp_on("tc0")?, "lbd's program is not on tc0 again");
    drop(dp);
    assert!(!xdp_on("tc0")? && !xdp_on("td0")?, "programs outlived lbd");
    Ok(())
}

/// In native mode a real server behind another interface gets `xdp_pass` on that interface: many
/// drivers send redirected XDP frames only while a program is attached there. Gone with lbd.
#[test]
fn native_mode_puts_xdp_pass_on_other_egress_interfaces() -> anyhow::Result<()> {
    require_root()?;
    let ns = Netns::new("lbdt-egress")?;
    veth_pairs(&ns, &[("te0", "te1"), ("tf0", "tf1")])?;
    let egress: u32 = ns.exec(&["cat", "/sys/class/net/tf0/ifindex"])?.trim().parse()?;
    let xdp_on = |dev: &str| xdp_on(&ns, dev);
    let dp = ns.enter(move || -> anyhow::Result<XdpDataplane> {
        let mut dp = load();
        dp.attach("te0", true)?;
        dp.apply(&[svc(IpAddr::V4(VIP), 80, Protocol::Tcp, vec![backend(11, 80, BE_MAC[0], egress)])])?;
        Ok(dp)
    })??;
    assert!(xdp_on("tf0")?, "no XDP program on the egress interface");
    assert!(!xdp_on("te1")? && !xdp_on("tf1")?, "only the director's own interfaces");
    let dp = ns.enter(move || -> anyhow::Result<XdpDataplane> {
        let mut dp = dp;
        dp.detach()?;
        Ok(dp)
    })??;
    assert!(!xdp_on("tf0")?, "xdp_pass outlived lbd's attachment");
    drop(dp);
    Ok(())
}

/// A kept dataplane (`XdpOptions::keep`, as `lbd run` loads it) that goes while attached leaves
/// its program on its interface, `xdp_pass` on the egress interface, its connection tables and
/// its state file; the next load takes them over: the same hash keys and tables, each real server
/// its old backend id (here listed in another order and drained, so only its connection entry
/// still sends the flow there), and its program replaces the old one only at `go_live`. A
/// detached one leaves nothing; so does a load whose tables cannot be taken over (another
/// `conntrack_size`), which starts with empty ones.
#[test]
fn a_kept_dataplane_is_taken_over_with_its_flows() -> anyhow::Result<()> {
    require_root()?;
    let ns = Netns::new("lbdt-keep")?;
    veth_pairs(&ns, &[("tk0", "tk1"), ("tl0", "tl1")])?;
    let egress: u32 = ns.exec(&["cat", "/sys/class/net/tl0/ifindex"])?.trim().parse()?;
    let dir = std::env::temp_dir().join("lbd-lbdt-keep");
    std::fs::create_dir_all(&dir)?;
    let removed = lb_tests::rig::KeptFor::fresh(&dir.join("lbd.sock"))?;
    let keep = removed.0.clone();
    let opts = move |conntrack_size| XdpOptions {
        table_size: 65537,
        max_vips: 16,
        max_backends: 64,
        conntrack_size,
        log_level: 0,
        keep: Some(keep.clone()),
    };
    let load_kept = move |conntrack_size| {
        let opts = opts.clone();
        move || XdpDataplane::load(opts(conntrack_size))
    };
    let reals = [backend(11, 80, BE_MAC[0], egress), backend(12, 80, BE_MAC[1], egress)];
    let f = flow(40000, 80);
    let (load, first_reals) = (load_kept.clone()(4096), reals.to_vec());
    let first = ns.enter(move || -> anyhow::Result<_> {
        let mut dp = load()?;
        dp.attach("tk0", true)?;
        dp.apply(&[svc(IpAddr::V4(VIP), 80, Protocol::Tcp, first_reals)])?;
        let (verdict, out) = run(&mut dp, &tcp4_syn(f));
        assert_eq!(verdict, XDP_REDIRECT, "the flow's SYN");
        Ok((dp.conntrack_hash_keys(), out[0..6].to_vec(), dp))
    })??;
    let (keys, owner, dp) = first;
    let program = ns.xdp_program("tk0")?.expect("the program on tk0");
    drop(dp);
    let keep = removed.0.clone();
    assert_eq!(ns.xdp_program("tk0")?, Some(program), "the program left tk0 with the dataplane");
    assert!(xdp_on(&ns, "tl0")?, "xdp_pass left the egress interface with the dataplane");
    for path in [keep.link(), keep.map("CONNTRACK4"), keep.map("CONNTRACK6"), keep.map("BACKEND_STATS"), keep.state_file.clone()] {
        assert!(path.exists(), "{} is not kept", path.display());
    }

    // The next load: the real servers in the other order, the flow's own drained.
    let owner_index = BE_MAC.iter().position(|m| m[..] == owner[..]).expect("a real server's MAC");
    let mut next: Vec<BackendSpec> = reals.iter().rev().cloned().collect();
    next.iter_mut().filter(|b| b.mac.is_some_and(|m| m == BE_MAC[owner_index])).for_each(|b| b.weight = 0);
    let services = [svc(IpAddr::V4(VIP), 80, Protocol::Tcp, next)];
    let load = load_kept.clone()(4096);
    let mut dp = ns.enter(move || -> anyhow::Result<_> {
        let mut dp = load()?;
        dp.attach("tk0", true)?;
        dp.apply(&services)?;
        Ok(dp)
    })??;
    assert_eq!(ns.xdp_program("tk0")?, Some(program), "the kept program serves until go_live");
    assert_eq!(dp.conntrack_hash_keys(), keys, "the connection tables' hash keys");
    assert_eq!(dp.conntrack_len(), 1, "the flow's entry");
    // The counters go on from where they were: the SYN of the run before is counted.
    let stats = dp.stats()?;
    assert_eq!(stats.reasons["new-flow"].packets, 1, "the kept new-flow count");
    assert_eq!(stats.vips.values().map(|v| v.packets).sum::<u64>(), 1, "the virtual server's kept count");
    let (verdict, out) = run(&mut dp, &tcp4_ack(f, b"x"));
    assert_eq!((verdict, &out[0..6]), (XDP_REDIRECT, &owner[..]), "the established flow stays with its drained real server");
    assert_eq!(reason_packets(&dp, "conntrack-hit"), 1);
    let (_, out) = run(&mut dp, &tcp4_syn(flow(40001, 80)));
    assert_ne!(&out[0..6], &owner[..], "a new flow went to the drained real server");
    dp.go_live()?;
    let now = ns.xdp_program("tk0")?.expect("a program on tk0");
    assert_ne!(now, program, "go_live did not put the new program in");
    assert!(xdp_on(&ns, "tl0")?, "xdp_pass on the egress interface");

    // Detached: nothing is left.
    dp.detach()?;
    drop(dp);
    assert!(!xdp_on(&ns, "tk0")? && !xdp_on(&ns, "tl0")?, "programs left after detach");
    assert!(!keep.exists(), "pins or state file left after detach");

    // Kept again, then loaded with another conntrack_size: new, empty tables and keys.
    let reals2 = reals.to_vec();
    let load = load_kept.clone()(4096);
    let dp = ns.enter(move || -> anyhow::Result<_> {
        let mut dp = load()?;
        dp.attach("tk0", true)?;
        dp.apply(&[svc(IpAddr::V4(VIP), 80, Protocol::Tcp, reals2)])?;
        run(&mut dp, &tcp4_syn(f));
        assert_eq!(dp.conntrack_len(), 1);
        Ok(dp)
    })??;
    let keys = dp.conntrack_hash_keys();
    drop(dp);
    let dp = ns.enter(load_kept(8192))??;
    assert_ne!(dp.conntrack_hash_keys(), keys, "keys of tables that were not taken over");
    assert_eq!(dp.conntrack_len(), 0, "tables of another size were taken over");
    assert_eq!(reason_packets(&dp, "new-flow"), 0, "counters of backend ids that were not taken over");
    // Its start fails before it attaches: the kept program still serves, and stays kept.
    drop(dp);
    assert!(xdp_on(&ns, "tk0")? && keep.link().exists(), "a failed start took the kept program away");
    Ok(())
}
