//! Fail-closed behaviour: nothing but WireGuard crosses the underlay, with or without a session.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use isthmus_e2e::mesh::{self, Implementation::Isthmus};
use isthmus_e2e::traffic::{self, tcp_transfer, Payload};
use isthmus_e2e::{Capture, IsthmusGateway, Packet, Pcap, Site, Topology, Underlay, WG_PORT};

const CANARY: &[u8] = b"ISTHMUS-E2E-CLEARTEXT-CANARY-7f3a9c";

fn canary_datagrams(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| [CANARY, format!("#{i}#").as_bytes(), CANARY].concat())
        .collect()
}

/// Sends canary UDP datagrams and a few pings from site `from`'s workload to site `to`'s.
fn workload_noise(from: &Site, to: &Site, datagrams: usize) {
    let dst = SocketAddr::new(IpAddr::V4(to.workload_addr), 9);
    let sent = traffic::udp_send(
        &from.wl_ns,
        dst,
        canary_datagrams(datagrams),
        Duration::from_micros(200),
    )
    .expect("udp send");
    assert_eq!(sent, datagrams);
    // Fails when the tunnel is down; we only want the packets.
    let _ = traffic::ping_stats(&from.wl_ns, to.workload_addr.into(), 3);
}

fn is_wireguard_between_gateways(p: &Packet, a: &Site, b: &Site) -> bool {
    let gws = [a.underlay_addr, b.underlay_addr];
    p.has("udp")
        && p.has("wg")
        && p.udp_src == Some(WG_PORT)
        && p.udp_dst == Some(WG_PORT)
        && p.src.is_some_and(|s| gws.contains(&s))
        && p.dst.is_some_and(|d| gws.contains(&d))
}

fn dump(packets: &[Packet]) -> String {
    packets
        .iter()
        .take(40)
        .map(|p| format!("  {p:?}\n"))
        .collect()
}

fn assert_no_canary(pcap: &Pcap) {
    assert!(
        !pcap.contains(CANARY).expect("read pcap"),
        "cleartext canary found on the underlay ({})",
        pcap.path.display()
    );
}

#[test]
fn underlay_carries_only_wireguard_during_transfer() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let mesh = mesh::connected(&topo, &[Isthmus, Isthmus]).expect("isthmus pair");
    let (a, b) = (topo.site(1), topo.site(2));

    let cap = Capture::start(topo.run(), &a.gw_ns, &a.underlay_if, None).expect("capture");
    let pattern = Payload::Pattern(CANARY.to_vec());
    let r1 = tcp_transfer(
        &a.wl_ns,
        &b.wl_ns,
        IpAddr::V4(b.workload_addr),
        7301,
        8_000_000,
        pattern.clone(),
    )
    .expect("transfer a->b");
    let r2 = tcp_transfer(
        &b.wl_ns,
        &a.wl_ns,
        IpAddr::V4(a.workload_addr),
        7302,
        2_000_000,
        pattern,
    )
    .expect("transfer b->a");
    workload_noise(a, b, 100);
    let pcap = cap.stop().expect("stop capture");
    assert!(r1.intact() && r2.intact(), "{r1:?} {r2:?}");

    assert_no_canary(&pcap);
    let packets = pcap.packets(WG_PORT).expect("decode pcap");
    let bad: Vec<Packet> = packets
        .iter()
        .filter(|p| !p.is_link_housekeeping() && !is_wireguard_between_gateways(p, a, b))
        .cloned()
        .collect();
    assert!(
        bad.is_empty(),
        "non-WireGuard frames on the underlay:\n{}",
        dump(&bad)
    );
    // With UDP GSO/GRO a captured frame may carry many WireGuard messages: count bytes.
    // The capture itself may lose a few frames on a loaded 2-core machine, so ask
    // for most of the 10 MB (the assertions above are the ones about leaks).
    let data_bytes: u64 = packets
        .iter()
        .filter(|p| p.wg_type == Some(4))
        .map(|p| p.len)
        .sum();
    assert!(
        data_bytes > 9_000_000,
        "only {data_bytes} bytes of WireGuard data frames captured for 10 MB of traffic"
    );
    drop(mesh);
}

#[test]
fn peer_down_leaks_nothing_and_counts_no_session() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let mut mesh = mesh::connected(&topo, &[Isthmus, Isthmus]).expect("isthmus pair");
    let (a, b) = (topo.site(1), topo.site(2));

    // Site B's gateway goes away. A still holds a valid session (WireGuard keeps sending with it
    // until it expires), so A may send data messages and handshake initiations, but no cleartext.
    let st = mesh.isthmus_mut(2).stop().expect("stop b");
    assert!(st.success(), "gateway b exited with {st}");
    let cap = Capture::start(topo.run(), &a.gw_ns, &a.underlay_if, None).expect("capture");
    workload_noise(a, b, 50);
    let pcap = cap.stop().expect("stop capture");
    assert_no_canary(&pcap);
    let packets = pcap.packets(WG_PORT).expect("decode");
    let from_a: Vec<&Packet> = packets
        .iter()
        .filter(|p| p.src == Some(a.underlay_addr))
        .collect();
    let bad: Vec<Packet> = from_a
        .iter()
        .filter(|p| {
            !(is_wireguard_between_gateways(p, a, b) && matches!(p.wg_type, Some(1) | Some(4)))
        })
        .map(|p| (*p).clone())
        .collect();
    assert!(
        bad.is_empty(),
        "A sent non-WireGuard frames with B down:\n{}",
        dump(&bad)
    );
    let others: Vec<Packet> = packets
        .iter()
        .filter(|p| {
            p.src != Some(a.underlay_addr)
                && p.src != Some(b.underlay_addr)
                && !p.is_link_housekeeping()
        })
        .cloned()
        .collect();
    assert!(others.is_empty(), "unexpected frames:\n{}", dump(&others));

    // Now a gateway A without any session (fresh process, B still down): only handshake
    // initiations may leave, and the workload packets are counted as no_session drops.
    // The capture starts before the gateway: a gateway may initiate a handshake as soon as it
    // starts, and then not again for REKEY_TIMEOUT (5 s) whatever the traffic.
    let gw_a = mesh.isthmus_mut(1);
    let st = gw_a.stop().expect("stop a");
    assert!(st.success(), "gateway a exited with {st}");
    let (keys, config) = (gw_a.keys.clone(), gw_a.config.clone());
    let cap = Capture::start(topo.run(), &a.gw_ns, &a.underlay_if, None).expect("capture");
    let fresh = IsthmusGateway::start(topo.run(), &a.gw_ns, &keys, &config).expect("restart a");
    let before = fresh
        .status()
        .expect("status")
        .require_peer(mesh.public_key(2))
        .expect("peer")
        .clone();
    assert_eq!(before.handshakes, 0, "{before:#?}");
    workload_noise(a, b, 300);
    let pcap = cap.stop().expect("stop capture");
    assert_no_canary(&pcap);
    let packets = pcap.packets(WG_PORT).expect("decode");
    let from_a: Vec<&Packet> = packets
        .iter()
        .filter(|p| p.src == Some(a.underlay_addr))
        .collect();
    let bad: Vec<Packet> = from_a
        .iter()
        .filter(|p| !(is_wireguard_between_gateways(p, a, b) && p.wg_type == Some(1)))
        .map(|p| (*p).clone())
        .collect();
    assert!(
        bad.is_empty(),
        "A without a session sent something other than handshake initiations:\n{}",
        dump(&bad)
    );
    assert!(
        !from_a.is_empty(),
        "A sent no handshake initiation at all while B was down\n{}",
        fresh.logs()
    );

    let after_st = fresh
        .wait_status(Duration::from_secs(5), |s| {
            s.peer(mesh.public_key(2))
                .is_some_and(|p| p.drops.no_session > before.drops.no_session)
        })
        .expect("status");
    let after = after_st.require_peer(mesh.public_key(2)).expect("peer");
    assert!(
        after.drops.no_session > before.drops.no_session,
        "drops.no_session did not grow: {} -> {}\n{after_st:#?}",
        before.drops.no_session,
        after.drops.no_session
    );
    drop(fresh);
    drop(mesh);
}
