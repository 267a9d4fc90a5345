//! Isthmus ↔ Isthmus over IPv4 and IPv6 underlays; `wg show` and `isthmusctl status`.

use std::net::IpAddr;

use isthmus_e2e::mesh::{self, Implementation::Isthmus};
use isthmus_e2e::traffic::{tcp_transfer, transfer_between, Payload};
use isthmus_e2e::userspace_wg::{uapi_socket, wg_show_dump};
use isthmus_e2e::{netns, ping, Topology, Underlay};

const TRANSFER_BYTES: u64 = 50 * 1024 * 1024;

fn transfer_both_ways(topo: &Topology) {
    let (a, b) = (topo.site(1), topo.site(2));
    for (from, to, port) in [(a, b, 7101), (b, a, 7102)] {
        if let Err(e) = transfer_between(from, to, port, TRANSFER_BYTES) {
            panic!("{e:#}");
        }
    }
}

fn pair(underlay: Underlay) {
    let topo = Topology::two_sites(underlay).expect("topology");
    let mut mesh = mesh::connected(&topo, &[Isthmus, Isthmus]).expect("isthmus pair");
    let (a, b) = (topo.site(1), topo.site(2));
    assert!(
        ping(&a.wl_ns, b.workload_addr.into(), 5),
        "wl1 -> wl2\n{}",
        mesh.logs()
    );
    assert!(
        ping(&b.wl_ns, a.workload_addr.into(), 5),
        "wl2 -> wl1\n{}",
        mesh.logs()
    );
    transfer_both_ways(&topo);

    // Clean shutdown: exit 0, TUN device and sockets removed.
    for i in [1, 2] {
        let site = topo.site(i);
        let gw = mesh.isthmus_mut(i);
        let status = gw.stop().expect("stop");
        assert!(
            status.success(),
            "gateway {i} exited with {status} on SIGTERM\n{}",
            gw.logs()
        );
        let links = netns::ip(&site.gw_ns, &["-o", "link", "show"]).expect("ip link");
        assert!(
            !links.contains(&site.tunnel_if),
            "TUN {} still present after exit:\n{links}",
            site.tunnel_if
        );
        assert!(
            !uapi_socket(&site.tunnel_if).exists(),
            "UAPI socket left behind"
        );
        assert!(
            !gw.admin_socket.exists(),
            "admin socket {} left behind",
            gw.admin_socket.display()
        );
    }
}

#[test]
fn isthmus_pair_ipv4_underlay() {
    pair(Underlay::V4);
}

#[test]
fn isthmus_pair_ipv6_underlay() {
    pair(Underlay::V6);
}

#[test]
fn wg_show_reports_handshake_and_growing_counters() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let mesh = mesh::connected(&topo, &[Isthmus, Isthmus]).expect("isthmus pair");
    let (a, b) = (topo.site(1), topo.site(2));
    let ifname = &mesh.isthmus(1).ifname;

    let text = netns::exec(&a.gw_ns, "wg", &["show", ifname]).expect("wg show");
    assert!(text.contains(&format!("interface: {ifname}")), "{text}");
    assert!(
        text.contains(&format!("peer: {}", mesh.public_key(2))),
        "{text}"
    );
    assert!(
        text.contains("latest handshake:"),
        "no handshake in wg show:\n{text}"
    );
    assert!(
        text.contains("transfer:"),
        "no transfer line in wg show:\n{text}"
    );
    assert!(text.contains("listening port: 51820"), "{text}");
    assert!(
        text.contains("100.64.2.0/24"),
        "allowed ips missing:\n{text}"
    );
    // Isthmus deliberately never sends key material over UAPI (so `wg` cannot derive and show
    // the interface's public key); make sure the private key is not there.
    let dump = netns::exec(&a.gw_ns, "wg", &["show", ifname, "dump"]).expect("wg show dump");
    let private = &mesh.keys[0].private;
    assert!(
        !text.contains(private.as_str()) && !dump.contains(private.as_str()),
        "private key exposed by UAPI"
    );

    let peer_of = |dump: Vec<isthmus_e2e::userspace_wg::WgPeerDump>| {
        dump.into_iter()
            .find(|p| p.public_key == mesh.public_key(2))
            .expect("peer in wg show dump")
    };
    let before = peer_of(wg_show_dump(&a.gw_ns, ifname).expect("dump"));
    assert!(before.latest_handshake > 0, "{before:?}");
    assert_eq!(before.endpoint, b.endpoint(51820).to_string());
    let report = tcp_transfer(
        &a.wl_ns,
        &b.wl_ns,
        IpAddr::V4(b.workload_addr),
        7103,
        5_000_000,
        Payload::Random,
    )
    .expect("transfer");
    assert!(report.intact());
    let after = peer_of(wg_show_dump(&a.gw_ns, ifname).expect("dump"));
    assert!(
        after.tx_bytes >= before.tx_bytes + 5_000_000,
        "tx did not grow by the transfer: {before:?} -> {after:?}"
    );
    assert!(
        after.rx_bytes > before.rx_bytes,
        "rx (ACKs) did not grow: {before:?} -> {after:?}"
    );
}

#[test]
fn isthmusctl_status_reports_peer_counters() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let mesh = mesh::connected(&topo, &[Isthmus, Isthmus]).expect("isthmus pair");
    let (a, b) = (topo.site(1), topo.site(2));
    let gw = mesh.isthmus(1);

    let report = tcp_transfer(
        &a.wl_ns,
        &b.wl_ns,
        IpAddr::V4(b.workload_addr),
        7104,
        2_000_000,
        Payload::Random,
    )
    .expect("transfer");
    assert!(report.intact());
    let st = gw.status().expect("status");
    assert_eq!(st.interface, gw.ifname);
    assert_eq!(st.public_key, mesh.public_key(1));
    assert_eq!(st.listen_port, 51820);
    assert_eq!(st.mtu, 1420);
    assert_eq!(st.peers.len(), 1, "{st:#?}");
    let peer = st.require_peer(mesh.public_key(2)).expect("peer");
    assert_eq!(peer.name.as_deref(), Some("site-2"));
    assert_eq!(peer.allowed_prefixes, vec!["100.64.2.0/24".to_string()]);
    assert_eq!(peer.endpoint.as_deref(), Some("192.0.2.2:51820"));
    assert!(peer.handshakes >= 1, "{peer:#?}");
    let ago = peer
        .last_handshake_secs_ago
        .expect("last_handshake_secs_ago after a handshake");
    assert!((0.0..60.0).contains(&ago), "{peer:#?}");
    assert!(peer.tx_bytes >= 2_000_000, "{peer:#?}");
    assert!(
        peer.rx_bytes > 0 && peer.rx_packets > 0 && peer.tx_packets > 0,
        "{peer:#?}"
    );
    assert_eq!(peer.drops.decrypt_failure, 0, "{peer:#?}");
    assert_eq!(peer.drops.replay, 0, "{peer:#?}");
    assert_eq!(peer.drops.bad_source, 0, "{peer:#?}");
    assert_eq!(st.drops.malformed, 0, "{st:#?}");

    // The receiving side counts the same traffic the other way round.
    let st_b = mesh.isthmus(2).status().expect("status b");
    let peer_b = st_b.require_peer(mesh.public_key(1)).expect("peer a at b");
    assert!(peer_b.rx_bytes >= 2_000_000, "{peer_b:#?}");

    // --interface NAME means the default admin socket path; the table output names the peer.
    let ifname = gw.ifname.clone();
    let out =
        isthmus_e2e::isthmus::isthmusctl(&["status", "--interface", &ifname]).expect("isthmusctl");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "isthmusctl status --interface failed: {out:?}"
    );
    assert!(
        table.contains(&ifname),
        "table output lacks the interface:\n{table}"
    );
    assert!(
        table.contains("site-2") || table.contains(mesh.public_key(2)),
        "table output lacks the peer:\n{table}"
    );
    let out =
        isthmus_e2e::isthmus::isthmusctl(&["status", "--interface", &ifname, "--output", "json"])
            .expect("isthmusctl json");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from --interface");
    assert_eq!(v["interface"], ifname.as_str());

    // Counters keep growing with more traffic.
    assert!(ping(&a.wl_ns, b.workload_addr.into(), 3));
    let st2 = gw.status().expect("status");
    let peer2 = st2.require_peer(mesh.public_key(2)).expect("peer");
    assert!(
        peer2.tx_packets >= peer.tx_packets + 3,
        "{peer:#?} -> {peer2:#?}"
    );
    assert!(
        peer2.rx_packets >= peer.rx_packets + 3,
        "{peer:#?} -> {peer2:#?}"
    );
}

/// Three gateways in a full mesh over a bridged underlay: routing by prefix picks the right peer.
#[test]
fn isthmus_three_site_mesh() {
    let topo = Topology::new(3, Underlay::V4).expect("topology");
    let mesh = mesh::connected(&topo, &[Isthmus, Isthmus, Isthmus]).expect("isthmus mesh");
    for from in topo.sites() {
        for to in topo.sites() {
            if from.index == to.index {
                continue;
            }
            let port = 7110 + (from.index * 3 + to.index) as u16;
            if let Err(e) = transfer_between(from, to, port, 2_000_000) {
                panic!("{e:#}");
            }
        }
    }
    for i in 1..=3 {
        let st = mesh.isthmus(i).status().expect("status");
        assert_eq!(st.peers.len(), 2, "{st:#?}");
        for p in &st.peers {
            assert!(
                p.handshakes >= 1 && p.rx_bytes > 0 && p.tx_bytes > 0,
                "site {i}: {p:#?}"
            );
        }
    }
}
