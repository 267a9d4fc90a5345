//! Self-tests of the harness: topologies, namespaces, helpers, cleanup. They need root but not
//! the Isthmus binaries.

use std::net::IpAddr;
use std::time::Duration;

use isthmus_e2e::mesh::{self, Implementation};
use isthmus_e2e::traffic::{self, tcp_transfer, Payload};
use isthmus_e2e::{netns, ping, Capture, ProcessGuard, Topology, Underlay, WG_PORT};

fn assert_gone(names: &[String], run_dir: &std::path::Path) {
    for n in names {
        assert!(!netns::exists(n), "namespace {n} still exists after drop");
    }
    assert!(
        !run_dir.exists(),
        "run dir {} still exists after drop",
        run_dir.display()
    );
}

#[test]
fn two_sites_v4_reachability_and_cleanup() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let (a, b) = (topo.site(1), topo.site(2));
    assert_eq!(a.workload_addr.to_string(), "100.64.1.2");
    assert_eq!(b.underlay_addr.to_string(), "192.0.2.2");
    for name in [&a.tunnel_if, &a.underlay_if, &a.lan_if, &a.wl_if] {
        assert!(name.len() <= 15, "{name} too long");
        assert!(name.starts_with(&format!("is{}", topo.run().id())));
    }
    // Underlay between gateways, and each workload to its own gateway.
    assert!(ping(&a.gw_ns, b.underlay_addr, 2), "gw1 -> gw2 underlay");
    assert!(ping(&a.wl_ns, a.gw_lan_addr.into(), 2), "wl1 -> gw1");
    assert!(ping(&b.wl_ns, b.gw_lan_addr.into(), 2), "wl2 -> gw2");
    // Default route: the workload reaches the gateway's underlay address through forwarding.
    assert!(
        ping(&a.wl_ns, a.underlay_addr, 1),
        "wl1 -> gw1 underlay addr"
    );
    // Without a tunnel the other workload is unreachable (no route on gw1).
    assert!(
        !ping(&a.wl_ns, b.workload_addr.into(), 1),
        "wl1 -> wl2 must not work untunnelled"
    );

    // The TCP helper, from a workload to its gateway.
    let report = tcp_transfer(
        &a.wl_ns,
        &a.gw_ns,
        a.gw_lan_addr.into(),
        7001,
        3_000_000,
        Payload::Random,
    )
    .expect("transfer");
    assert!(report.intact(), "{report:?}");
    assert_eq!(report.received_bytes, 3_000_000);

    // The UDP helper, to a socket bound in the other namespace.
    let bind_addr = std::net::SocketAddr::new(b.underlay_addr, 9999);
    let receiver = netns::spawn_in(&b.gw_ns, move || {
        let sock = std::net::UdpSocket::bind(bind_addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 2048];
        let mut got = 0;
        while got < 3 {
            sock.recv_from(&mut buf)?;
            got += 1;
        }
        Ok(got)
    });
    std::thread::sleep(Duration::from_millis(100));
    let sent = traffic::udp_send(
        &a.gw_ns,
        bind_addr,
        vec![vec![1; 10], vec![2; 20], vec![3; 30]],
        Duration::ZERO,
    )
    .expect("udp send");
    assert_eq!(sent, 3);
    assert_eq!(netns::join(receiver).expect("udp receive"), 3);

    let names = topo.namespace_names();
    let dir = topo.run().dir().to_path_buf();
    assert_eq!(names.len(), 4);
    for n in &names {
        assert!(netns::exists(n));
    }
    drop(topo);
    assert_gone(&names, &dir);
}

#[test]
fn two_sites_v6_underlay() {
    let topo = Topology::two_sites(Underlay::V6).expect("topology");
    let (a, b) = (topo.site(1), topo.site(2));
    assert_eq!(b.underlay_addr.to_string(), "2001:db8::2");
    assert_eq!(b.endpoint(51820).to_string(), "[2001:db8::2]:51820");
    assert!(ping(&a.gw_ns, b.underlay_addr, 2), "gw1 -> gw2 over IPv6");
    assert!(ping(&b.gw_ns, a.underlay_addr, 2), "gw2 -> gw1 over IPv6");
}

#[test]
fn three_sites_share_a_bridge() {
    let topo = Topology::new(3, Underlay::V4).expect("topology");
    for a in topo.sites() {
        for b in topo.sites() {
            if a.index != b.index {
                assert!(
                    ping(&a.gw_ns, b.underlay_addr, 1),
                    "gw{} -> gw{}",
                    a.index,
                    b.index
                );
            }
        }
    }
    assert_eq!(topo.namespace_names().len(), 7);
}

#[test]
fn cleanup_happens_on_panic() {
    let captured = std::sync::Arc::new(std::sync::Mutex::new(None));
    let captured2 = captured.clone();
    let result = std::panic::catch_unwind(move || {
        let topo = Topology::two_sites(Underlay::V4).expect("topology");
        let mut sleeper = ProcessGuard::spawn(
            topo.run(),
            "sleeper",
            Some(&topo.site(1).gw_ns),
            "sleep",
            &["1000"],
            &[],
        )
        .expect("spawn sleep");
        sleeper.set_print_on_panic(false);
        // A process the harness does not know about, left in a namespace.
        let orphan = std::process::Command::new("ip")
            .args(["netns", "exec", &topo.site(2).wl_ns, "sleep", "1000"])
            .spawn()
            .expect("spawn orphan");
        *captured2.lock().expect("lock") = Some((
            topo.namespace_names(),
            topo.run().dir().to_path_buf(),
            sleeper.pid(),
            orphan.id(),
        ));
        std::mem::forget(orphan);
        panic!("deliberate panic to test cleanup");
    });
    assert!(result.is_err());
    let (names, dir, sleeper_pid, orphan_pid) =
        captured.lock().expect("lock").take().expect("captured");
    for n in &names {
        assert!(!netns::exists(n), "namespace {n} survived the panic");
    }
    // The run dir is kept on panic, for the logs; remove it ourselves.
    assert!(dir.exists());
    let _ = std::fs::remove_dir_all(&dir);
    let alive = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Zombies (state Z) are dead; the orphan's zombie is ours to reap.
        !stat.is_empty() && !stat.contains(") Z ")
    };
    assert!(!alive(sleeper_pid), "guarded process survived");
    // SAFETY: waitpid on our own child with a null status pointer; reaps the killed orphan.
    unsafe {
        libc::waitpid(orphan_pid as i32, std::ptr::null_mut(), 0);
    }
    assert!(!alive(orphan_pid), "process left in a namespace survived");
}

/// The wireguard-go launcher and the capture checks against a known-good implementation: this
/// validates the harness itself, independently of Isthmus.
#[test]
fn wireguard_go_pair_through_topology() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let mesh = mesh::connected(
        &topo,
        &[Implementation::WireguardGo, Implementation::WireguardGo],
    )
    .expect("wireguard-go mesh");
    let (a, b) = (topo.site(1), topo.site(2));
    let canary = b"ISTHMUS-E2E-CLEARTEXT-CANARY-0123456789".to_vec();
    let cap = Capture::start(topo.run(), &a.gw_ns, &a.underlay_if, None).expect("capture");
    let report = tcp_transfer(
        &a.wl_ns,
        &b.wl_ns,
        IpAddr::V4(b.workload_addr),
        7002,
        2_000_000,
        Payload::Pattern(canary.clone()),
    )
    .expect("transfer");
    let pcap = cap.stop().expect("stop capture");
    assert!(report.intact(), "{report:?}");
    assert!(
        !pcap.contains(&canary).expect("read pcap"),
        "canary in the clear on the underlay"
    );
    let packets = pcap.packets(WG_PORT).expect("decode");
    let data: Vec<_> = packets.iter().filter(|p| p.wg_type == Some(4)).collect();
    assert!(
        data.len() > 1000,
        "expected WireGuard data packets, got {}",
        data.len()
    );
    for p in &packets {
        assert!(
            p.is_link_housekeeping()
                || (p.has("wg") && p.udp_src == Some(WG_PORT) && p.udp_dst == Some(WG_PORT)),
            "unexpected frame on the underlay: {p:?}"
        );
    }
    // And the canary check really can see a cleartext pattern: capture on the workload link.
    let cap = Capture::start(topo.run(), &a.gw_ns, &a.lan_if, None).expect("capture lan");
    let report = tcp_transfer(
        &a.wl_ns,
        &b.wl_ns,
        IpAddr::V4(b.workload_addr),
        7003,
        100_000,
        Payload::Pattern(canary.clone()),
    )
    .expect("transfer");
    assert!(report.intact());
    let pcap = cap.stop().expect("stop capture");
    assert!(
        pcap.contains(&canary).expect("read pcap"),
        "canary not seen in cleartext on the LAN side"
    );
    drop(mesh);
}
