//! The gateway runs IKEv2 itself (`[peers.esp.ike]`) with a real strongSwan charon
//! (kernel-libipsec) across network namespaces: as initiator and as responder, its ESP
//! keyed by the CHILD_SA; ping and TCP through it; charon's CHILD_SA rekeys while traffic
//! runs both ways lose nothing, and so do its rekeys of the IKE SA and the gateway's own
//! rekeys crossing charon's (collisions: the later one waits); a CHILD_SA deleted
//! alone makes the gateway start over; a killed charon is noticed (DPD) and its prefixes then
//! have no tunnel: packets are dropped and counted, never sent in clear (capture); a
//! restarted charon's new IKE SA replaces the old one; a wrong pre-shared key is refused.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use isthmus_e2e::capture::Capture;
use isthmus_e2e::strongswan::{ike_gateway, psk_conf, udp_flow, wait_ike, Charon};
use isthmus_e2e::traffic::{self, transfer_between, wait_for_ping};
use isthmus_e2e::{IkeStatus, Site, Topology, Underlay};

const PSK: &str = "gw-e2e-psk-7c3e9a1f5b2d4c6e8a0b1d3f5e7c9a2b";

fn spi(text: &str) -> u32 {
    u32::from_str_radix(text.trim_start_matches("0x"), 16).expect("an SPI")
}

/// Asserts that charon lists the gateway's newest CHILD_SA (its SPIs mirrored).
fn charon_has(charon: &Charon, ike: &IkeStatus) {
    let (ours_in, ours_out) = ike.child_sas.last().expect("a CHILD_SA");
    let sas = charon.swanctl(&["--list-sas"]).expect("list-sas");
    assert!(
        sas.contains(&format!("in  {:08x},", spi(ours_out)))
            && sas.contains(&format!("out {:08x},", spi(ours_in))),
        "charon does not list our CHILD_SA {ours_in}/{ours_out}:\n{sas}"
    );
}

/// Both flows (1 -> 2, 2 -> 1) arrived whole: each datagram once.
fn nothing_lost(
    there: std::thread::JoinHandle<anyhow::Result<isthmus_e2e::traffic::SequenceReport>>,
    back: std::thread::JoinHandle<anyhow::Result<isthmus_e2e::traffic::SequenceReport>>,
    logs: &dyn Fn() -> String,
) {
    for (name, flow) in [("1 -> 2", there), ("2 -> 1", back)] {
        let report = flow.join().expect("flow thread").expect("flow");
        assert!(
            report.missing().is_empty() && report.duplicated().is_empty(),
            "{name}: {} of {} lost, {} duplicated across the rekeys\n{}",
            report.missing().len(),
            report.sent,
            report.duplicated().len(),
            logs()
        );
    }
}

fn pings_both_ways(s1: &Site, s2: &Site, logs: &dyn Fn() -> String) {
    for (from, to) in [(s1, s2), (s2, s1)] {
        assert!(
            wait_for_ping(
                &from.wl_ns,
                to.workload_addr.into(),
                Duration::from_secs(10)
            ),
            "workload {} cannot ping workload {}\n{}",
            from.index,
            to.index,
            logs()
        );
    }
}

/// Pings from site `from` to site `to` get no answer, and nothing of them leaves `from`'s
/// gateway in clear (a capture on its underlay holds no packet of the workloads' addresses).
fn dropped_not_clear(topo: &Topology, from: &Site, to: &Site) {
    let cap = Capture::start(topo.run(), &from.gw_ns, &from.underlay_if, None).expect("capture");
    let (sent, received) =
        traffic::ping_stats(&from.wl_ns, to.workload_addr.into(), 3).expect("ping");
    let packets = cap.stop().expect("capture").packets(51820).expect("tshark");
    assert_eq!((sent, received), (3, 0), "pings got through with no tunnel");
    let workloads = [IpAddr::V4(from.workload_addr), IpAddr::V4(to.workload_addr)];
    let clear: Vec<_> = packets
        .iter()
        .filter(|p| p.src.iter().chain(&p.dst).any(|a| workloads.contains(a)))
        .collect();
    assert!(
        clear.is_empty(),
        "workload packets left in clear: {clear:#?}"
    );
}

#[test]
fn the_gateway_initiates_ike_and_carries_traffic_through_strongswan_rekeys() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let (s1, s2) = (topo.site(1), topo.site(2));
    let mut charon =
        Charon::start(topo.run(), &s2.gw_ns, "g2", "", &psk_conf(s2, s1, PSK)).expect("charon");
    let gw = ike_gateway(&topo, s1, s2, "initiator", PSK, 2).expect("gateway");
    let logs = || format!("{}\n{}", gw.logs(), charon.log());
    let ike = wait_ike(&gw, |k| k.state == "established", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!((ike.role.as_str(), ike.established), ("initiator", 1));
    charon_has(&charon, &ike);
    let first_spis = ike.ike_spis.clone();
    pings_both_ways(s1, s2, &logs);
    transfer_between(s1, s2, 5301, 4 << 20).expect("TCP through the tunnel");

    // charon rekeys the CHILD_SA and the IKE SA, twice each, while datagrams flow both
    // ways; the CHILD_SA's second rekey runs on the rekeyed IKE SA.
    let (there, back) = (
        udp_flow(s1, s2, 7101, 6_000, 1_500),
        udp_flow(s2, s1, 7102, 6_000, 1_500),
    );
    std::thread::sleep(Duration::from_millis(500));
    for what in [["--child", "net"], ["--ike", "lab"]].repeat(2) {
        charon
            .swanctl(&["--rekey", what[0], what[1]])
            .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        std::thread::sleep(Duration::from_secs(1));
    }
    nothing_lost(there, back, &logs);
    // The old pairs were deleted by charon; ours sends on the newest.
    let ike = wait_ike(
        &gw,
        |k| k.child_rekeys == 2 && k.child_sas.len() == 1,
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    charon_has(&charon, &ike);
    // The IKE SA in force is the rekeyed one charon lists (the first had our SPI as
    // the initiator's; the peer's rekeys made charon the initiator of the new ones).
    let (spi_i, spi_r) = ike.ike_spis.clone().expect("IKE SPIs");
    assert_ne!(
        Some((spi_i.clone(), spi_r.clone())),
        first_spis,
        "the IKE SA was not rekeyed"
    );
    let sas = charon.swanctl(&["--list-sas"]).expect("list-sas");
    assert!(
        sas.contains(&format!("{spi_i}_i")) && sas.contains(&format!("{spi_r}_r")),
        "charon does not list the IKE SA {spi_i}/{spi_r}:\n{sas}"
    );
    assert_eq!(ike.established, 1, "no new IKE_SA_INIT: {ike:#?}");
    let status = gw.status().expect("status");
    let esp = status
        .peer_named("site-2")
        .and_then(|p| p.esp.clone())
        .expect("the ESP peer");
    assert_eq!(esp.outbound.spi, ike.child_sas[0].1, "{status:#?}");
    assert_eq!(esp.inbound.len(), 1, "old inbound SAs removed: {status:#?}");
    pings_both_ways(s1, s2, &logs);

    // charon deletes the CHILD_SA alone: an IKE SA without one carries nothing, so the
    // gateway deletes it too and starts over; traffic flows again.
    charon
        .swanctl(&["--terminate", "--child", "net"])
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let ike = wait_ike(
        &gw,
        |k| k.established == 2 && k.state == "established",
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    charon_has(&charon, &ike);
    pings_both_ways(s1, s2, &logs);

    // charon vanishes: liveness checks (every 2 s, then 5 transmissions) give it up, the
    // ESP peer goes, and packets toward its side are dropped, never sent in clear.
    charon.kill();
    let ike = wait_ike(&gw, |k| k.state != "established", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.logs()));
    assert!(
        ike.last_error
            .as_deref()
            .is_some_and(|e| e.contains("gone")),
        "{ike:#?}"
    );
    let status = gw.status().expect("status");
    assert!(status.peer_named("site-2").is_none(), "{status:#?}");
    let before = status.drops.no_route;
    dropped_not_clear(&topo, s1, s2);
    let after = gw.status().expect("status").drops.no_route;
    assert!(
        after >= before + 3,
        "drops not counted: {before} -> {after}"
    );
}

#[test]
fn strongswan_initiates_to_the_gateway_restarts_and_a_wrong_key_is_refused() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let (s1, s2) = (topo.site(1), topo.site(2));
    let gw = ike_gateway(&topo, s1, s2, "responder", PSK, 30).expect("gateway");
    // No IKE SA yet: nothing is sent in clear.
    let ike = wait_ike(&gw, |k| k.state == "waiting", Duration::from_secs(5)).expect("waiting");
    assert_eq!(ike.role, "responder");
    dropped_not_clear(&topo, s1, s2);

    let start = |label: &str, psk: &str| {
        let charon = Charon::start(topo.run(), &s2.gw_ns, label, "", &psk_conf(s2, s1, psk))
            .expect("charon");
        let initiated = charon.swanctl(&["--initiate", "--child", "net", "--timeout", "10"]);
        (charon, initiated)
    };
    let (mut first, initiated) = start("g2a", PSK);
    initiated.unwrap_or_else(|e| panic!("{e}\n{}\n{}", gw.logs(), first.log()));
    let ike = wait_ike(&gw, |k| k.state == "established", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.logs()));
    charon_has(&first, &ike);
    pings_both_ways(s1, s2, &|| format!("{}\n{}", gw.logs(), first.log()));
    transfer_between(s2, s1, 5302, 4 << 20).expect("TCP through the tunnel");

    // charon restarts, its state lost: its new IKE SA replaces the one we had.
    first.kill();
    let (mut second, initiated) = start("g2b", PSK);
    initiated.unwrap_or_else(|e| panic!("{e}\n{}\n{}", gw.logs(), second.log()));
    let ike = wait_ike(
        &gw,
        |k| k.established == 2 && k.state == "established",
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.logs()));
    assert_eq!(ike.child_sas.len(), 1, "{ike:#?}");
    charon_has(&second, &ike);
    pings_both_ways(s1, s2, &|| format!("{}\n{}", gw.logs(), second.log()));

    // A peer with the wrong key is refused; the IKE SA in force stays.
    second.kill();
    let (third, initiated) = start("g2c", "a-wrong-key-of-a-decent-length-0000");
    assert!(initiated.is_err(), "charon with a wrong key got in");
    let ike = wait_ike(&gw, |k| k.last_error.is_some(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", gw.logs(), third.log()));
    assert_eq!(
        (ike.state.as_str(), ike.established),
        ("established", 2),
        "{ike:#?}"
    );
    assert!(
        third.log().contains("AUTHENTICATION_FAILED"),
        "{}",
        third.log()
    );
}

#[test]
fn strongswan_starting_on_the_ike_port_moves_to_ours() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let (s1, s2) = (topo.site(1), topo.site(2));
    let gw = ike_gateway(&topo, s1, s2, "responder", PSK, 30).expect("gateway");
    // charon as configured by default: IKE_SA_INIT to port 500, then NAT-T to 4500.
    let conf = psk_conf(s2, s1, PSK).replace("local_port = 4500\n    remote_port = 4500\n    ", "");
    assert!(!conf.contains("port"), "{conf}");
    let charon = Charon::start(topo.run(), &s2.gw_ns, "g2", "", &conf).expect("charon");
    let logs = || format!("{}\n{}", gw.logs(), charon.log());
    charon
        .swanctl(&["--initiate", "--child", "net", "--timeout", "10"])
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let ike = wait_ike(&gw, |k| k.state == "established", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(ike.ike_spis.is_some());
    // It started on 500 and went on at our ESP port, where the tunnel runs.
    let log = charon.log();
    assert!(
        log.contains("to 192.0.2.1[500]") && log.contains("to 192.0.2.1[4500]"),
        "{}",
        logs()
    );
    charon_has(&charon, &ike);
    pings_both_ways(s1, s2, &logs);
}

#[test]
fn a_restarted_gateway_replaces_its_old_ike_sa_at_strongswan() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let (s1, s2) = (topo.site(1), topo.site(2));
    let charon =
        Charon::start(topo.run(), &s2.gw_ns, "g2", "", &psk_conf(s2, s1, PSK)).expect("charon");
    let ike_sas = || {
        let sas = charon.swanctl(&["--list-sas"]).expect("list-sas");
        sas.lines().filter(|l| l.starts_with("lab: #")).count()
    };
    let mut first = ike_gateway(&topo, s1, s2, "initiator", PSK, 30).expect("gateway");
    let before = wait_ike(
        &first,
        |k| k.state == "established",
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", first.logs(), charon.log()));
    assert_eq!(ike_sas(), 1);
    // The gateway goes away without a word (its state lost), then comes back: its
    // IKE_AUTH carries INITIAL_CONTACT, so charon drops the IKE SA it still had.
    first.process().signal(libc::SIGKILL);
    let _ = first.stop();
    let second = ike_gateway(&topo, s1, s2, "initiator", PSK, 30).expect("gateway again");
    let logs = || format!("{}\n{}", second.logs(), charon.log());
    let after = wait_ike(
        &second,
        |k| k.state == "established",
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_ne!(before.ike_spis, after.ike_spis);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ike_sas() != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ike_sas(), 1, "charon kept the old IKE SA\n{}", logs());
    charon_has(&charon, &after);
    pings_both_ways(s1, s2, &logs);
}

#[test]
fn the_gateways_own_rekeys_and_collisions_with_strongswans_lose_nothing() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let (s1, s2) = (topo.site(1), topo.site(2));
    let charon =
        Charon::start(topo.run(), &s2.gw_ns, "g2", "", &psk_conf(s2, s1, PSK)).expect("charon");
    // The gateway rekeys its CHILD_SA once it is a second old (tries 2 s apart).
    let gw = isthmus_e2e::strongswan::ike_gateway_with(
        &topo,
        s1,
        s2,
        "initiator",
        PSK,
        30,
        &["rekey_seconds = 1"],
    )
    .expect("gateway");
    let logs = || format!("{}\n{}", gw.logs(), charon.log());
    wait_ike(&gw, |k| k.state == "established", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    pings_both_ways(s1, s2, &logs);
    // Of our CREATE_CHILD_SA requests (non-ESP marker, exchange 36, not a response),
    // two of every three transmissions are lost: each of our rekeys is in flight for
    // 1.5 s, and charon's rekeys (every 1.2-1.8 s, ours a second after each) cross it.
    let table = [
        "add table inet ikelab",
        "add chain inet ikelab out { type filter hook output priority 0; }",
        "add rule inet ikelab out udp dport 4500 @th,64,32 0 @th,240,8 36 \
         @th,248,8 & 0x20 == 0 numgen inc mod 3 != 2 drop",
    ];
    for rule in table {
        let args: Vec<&str> = rule.split_whitespace().collect();
        isthmus_e2e::netns::exec(&s1.gw_ns, "nft", &args).expect("nft");
    }
    let (there, back) = (
        udp_flow(s1, s2, 7201, 13_000, 1_000),
        udp_flow(s2, s1, 7202, 13_000, 1_000),
    );
    // Meanwhile charon rekeys too, at moments that fall on ours now and then.
    for n in 0..8u64 {
        std::thread::sleep(Duration::from_millis(1200 + (n * 211) % 600));
        let _ = charon.swanctl(&["--rekey", "--child", "net"]);
    }
    nothing_lost(there, back, &logs);
    let ike = wait_ike(
        &gw,
        |k| k.child_sas.len() == 1 && k.state == "established",
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(ike.own_rekeys >= 2, "{ike:#?}");
    // Crossed rekeys: charon's was refused while ours was in flight, and it tried again.
    assert!(
        charon.log().contains("received TEMPORARY_FAILURE notify"),
        "no rekeys crossed\n{}",
        logs()
    );
    let log = charon.log();
    eprintln!(
        "own rekeys {}, charon's {}, charon's refused by us {}, charon answered {}",
        ike.own_rekeys,
        ike.child_rekeys - ike.own_rekeys,
        log.matches("received TEMPORARY_FAILURE notify").count(),
        log.matches("generating CREATE_CHILD_SA response").count()
    );
    assert!(
        ike.child_rekeys > ike.own_rekeys,
        "charon's rekeys too: {ike:#?}"
    );
    assert_eq!(ike.established, 1, "no start-over: {ike:#?}");
    charon_has(&charon, &ike);
    pings_both_ways(s1, s2, &logs);
}
