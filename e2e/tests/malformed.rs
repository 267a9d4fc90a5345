//! Garbage on the gateway's UDP port is counted and dropped, and the tunnel keeps working.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use isthmus_e2e::mesh::{self, Implementation::Isthmus};
use isthmus_e2e::traffic::{self, random_bytes, random_range, tcp_transfer, Payload};
use isthmus_e2e::{ping, Topology, Underlay, WG_PORT};

/// A WireGuard-looking header of message type `ty` (type byte + 3 reserved zero bytes)
/// followed by random bytes, `len` bytes in all.
fn typed(ty: u8, len: usize) -> Vec<u8> {
    let mut d = random_bytes(len);
    d[..4].copy_from_slice(&[ty, 0, 0, 0]);
    d
}

/// Random bytes that are not a WireGuard message type (types are 1..=4 in a little-endian u32).
fn garbage(len: usize) -> Vec<u8> {
    let mut d = random_bytes(len);
    if d.len() >= 4 && (1..=4).contains(&d[0]) && d[1..4] == [0, 0, 0] {
        d[1] = 0xff;
    }
    d
}

#[test]
fn malformed_datagrams_are_counted_and_ignored() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let mesh = mesh::connected(&topo, &[Isthmus, Isthmus]).expect("isthmus pair");
    let (a, b) = (topo.site(1), topo.site(2));
    let gw_b = mesh.isthmus(2);
    let before = gw_b.status().expect("status");
    let rcvbuf_before = traffic::udp_rcvbuf_errors(&b.gw_ns).expect("snmp");

    let mut malformed = Vec::new();
    malformed.extend((0..100).map(|_| garbage(random_range(1, 200))));
    // Truncated handshake initiation (148 bytes), response (92), cookie reply (64), and data
    // messages shorter than header + tag (32).
    malformed.extend((0..50).map(|_| typed(1, random_range(4, 147))));
    malformed.extend((0..50).map(|_| typed(2, random_range(4, 91))));
    malformed.extend((0..50).map(|_| typed(3, random_range(4, 63))));
    malformed.extend((0..50).map(|_| typed(4, random_range(4, 31))));
    // Well-formed data messages for receiver indexes nobody handed out.
    let unknown: Vec<Vec<u8>> = (0..100).map(|_| typed(4, random_range(32, 200))).collect();
    let (n_malformed, n_unknown) = (malformed.len() as u64, unknown.len() as u64);

    let mut all = malformed;
    all.extend(unknown);
    let target = SocketAddr::new(b.underlay_addr, WG_PORT);
    let sent =
        traffic::udp_send(&a.gw_ns, target, all, Duration::from_micros(100)).expect("send garbage");
    assert_eq!(sent as u64, n_malformed + n_unknown);

    // Datagrams the kernel dropped (full receive buffer on a loaded machine) never reach the
    // gateway; account for them so the check stays exact.
    let kernel_drops = traffic::udp_rcvbuf_errors(&b.gw_ns).expect("snmp") - rcvbuf_before;
    let expected = n_malformed + n_unknown - kernel_drops;
    let total = |s: &isthmus_e2e::Status| s.drops.malformed + s.drops.unknown_peer;
    let base = total(&before);
    let after = gw_b
        .wait_status(Duration::from_secs(5), |s| total(s) >= base + expected)
        .expect("status");
    let d_malformed = after.drops.malformed - before.drops.malformed;
    let d_unknown = after.drops.unknown_peer - before.drops.unknown_peer;
    eprintln!(
        "sent {n_malformed} malformed + {n_unknown} unknown-receiver ({kernel_drops} dropped by the \
         kernel); counted malformed +{d_malformed}, unknown_peer +{d_unknown}"
    );
    assert_eq!(
        d_malformed + d_unknown,
        expected,
        "drop counters did not account for every garbage datagram ({kernel_drops} dropped by the \
         kernel)\nbefore: {:?}\nafter: {:?}",
        before.drops,
        after.drops
    );
    if kernel_drops == 0 {
        assert_eq!(
            d_malformed, n_malformed,
            "malformed classification: {after:#?}"
        );
        assert_eq!(
            d_unknown, n_unknown,
            "unknown_peer classification: {after:#?}"
        );
    } else {
        assert!(
            d_malformed <= n_malformed && d_unknown <= n_unknown,
            "{after:#?}"
        );
    }
    let peer = after.require_peer(mesh.public_key(1)).expect("peer");
    assert_eq!(peer.drops.replay, 0, "{peer:#?}");

    // The gateway is still up and the tunnel still works.
    let mut mesh = mesh;
    assert!(
        mesh.isthmus_mut(2).is_running(),
        "gateway b died\n{}",
        mesh.logs()
    );
    assert!(
        ping(&a.wl_ns, b.workload_addr.into(), 5),
        "wl1 -> wl2 after garbage\n{}",
        mesh.logs()
    );
    assert!(
        ping(&b.wl_ns, a.workload_addr.into(), 5),
        "wl2 -> wl1 after garbage\n{}",
        mesh.logs()
    );
    let report = tcp_transfer(
        &a.wl_ns,
        &b.wl_ns,
        IpAddr::V4(b.workload_addr),
        7401,
        1_000_000,
        Payload::Random,
    )
    .expect("transfer after garbage");
    assert!(report.intact(), "{report:?}");
}
