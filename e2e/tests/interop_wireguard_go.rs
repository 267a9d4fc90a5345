//! Interoperability with the reference userspace implementation, wireguard-go.

use std::net::IpAddr;

use isthmus_e2e::mesh::{self, Implementation};
use isthmus_e2e::traffic::{tcp_transfer, Payload};
use isthmus_e2e::{ping, Topology, Underlay};

const TRANSFER_BYTES: u64 = 50 * 1024 * 1024;

/// Site 1 runs `first`, site 2 runs `second`. With `passive_isthmus`, the Isthmus side has no
/// endpoint for its peer, so the reference implementation must initiate and Isthmus must learn
/// the endpoint from the handshake.
fn interop(
    underlay: Underlay,
    first: Implementation,
    second: Implementation,
    passive_isthmus: bool,
) {
    let topo = Topology::two_sites(underlay).expect("topology");
    let isthmus_site = if first == Implementation::Isthmus {
        1
    } else {
        2
    };
    let passive: &[usize] = if passive_isthmus {
        &[isthmus_site]
    } else {
        &[]
    };
    let mesh = mesh::connected_with(&topo, &[first, second], passive).expect("mesh");
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
    for (from, to, port) in [(a, b, 7201), (b, a, 7202)] {
        let report = tcp_transfer(
            &from.wl_ns,
            &to.wl_ns,
            IpAddr::V4(to.workload_addr),
            port,
            TRANSFER_BYTES,
            Payload::Random,
        )
        .unwrap_or_else(|e| {
            panic!(
                "transfer site {} -> site {}: {e:#}\n{}",
                from.index,
                to.index,
                mesh.logs()
            )
        });
        assert!(
            report.intact(),
            "site {} -> site {}: {report:?}",
            from.index,
            to.index
        );
        eprintln!(
            "{} -> {}: {} bytes in {:?} ({:.0} Mbit/s)",
            if from.index == 1 {
                first.label()
            } else {
                second.label()
            },
            if to.index == 1 {
                first.label()
            } else {
                second.label()
            },
            report.received_bytes,
            report.elapsed,
            report.mbit_per_s()
        );
    }
    // Isthmus saw the handshake and the traffic.
    let isthmus_site = if first == Implementation::Isthmus {
        1
    } else {
        2
    };
    let other = 3 - isthmus_site;
    let st = mesh.isthmus(isthmus_site).status().expect("status");
    let peer = st.require_peer(mesh.public_key(other)).expect("peer");
    assert!(peer.handshakes >= 1, "{peer:#?}");
    assert_eq!(
        peer.endpoint,
        Some(topo.site(other).endpoint(isthmus_e2e::WG_PORT).to_string()),
        "{peer:#?}"
    );
    assert!(
        peer.rx_bytes >= TRANSFER_BYTES && peer.tx_bytes >= TRANSFER_BYTES,
        "{peer:#?}"
    );
}

#[test]
fn isthmus_initiates_to_wireguard_go_ipv4() {
    interop(
        Underlay::V4,
        Implementation::Isthmus,
        Implementation::WireguardGo,
        false,
    );
}

#[test]
fn wireguard_go_initiates_to_passive_isthmus_ipv6() {
    interop(
        Underlay::V6,
        Implementation::WireguardGo,
        Implementation::Isthmus,
        true,
    );
}
