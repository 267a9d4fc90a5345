//! Two ESP cores wired together in memory, on a fake clock.

use super::keying::{ManualKeying, SaPair};
use super::sa::{EspCipher, Lifetimes, Limits, SaKeys, ESP_MAX_OVERHEAD};
use super::*;
use std::time::Duration;
use zeroize::Zeroizing;

fn sa(spi: u32, byte: u8, len: usize) -> SaKeys {
    SaKeys {
        spi,
        key: Zeroizing::new(vec![byte; len]),
        salt: [byte, 1, 2, 3],
    }
}

fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

struct Pair {
    a: EspCore,
    b: EspCore,
}

fn pair(cipher: EspCipher, esn: bool, lifetimes: Lifetimes, now: Instant) -> Pair {
    let len = cipher.key_len();
    let (ab, ba) = (sa(0x1000_0001, 0xaa, len), sa(0x2000_0002, 0xbb, len));
    let cfg = |out: &SaKeys, inb: &SaKeys, endpoint: &str, prefix: &str| EspPeerConfig {
        name: None,
        endpoint: endpoint.parse().unwrap(),
        allowed_prefixes: vec![prefix.parse().unwrap()],
        local_prefixes: Vec::new(),
        esn,
        lifetimes,
        keying: Arc::new(ManualKeying::new(
            cipher,
            SaPair {
                outbound: out.clone(),
                inbound: inb.clone(),
            },
        )),
    };
    Pair {
        a: EspCore::new(vec![cfg(&ab, &ba, "192.0.2.2:4500", "100.64.2.0/24")], now).unwrap(),
        b: EspCore::new(vec![cfg(&ba, &ab, "192.0.2.1:4500", "100.64.1.0/24")], now).unwrap(),
    }
}

fn seal(core: &EspCore, packet: &[u8], now: Instant) -> Result<Vec<u8>, DropReason> {
    let set = core.peers();
    let peer = set
        .route(IpAddr::from([100, 64, 2, 2]))
        .or_else(|| set.route(IpAddr::from([100, 64, 1, 2])));
    let mut out = vec![0u8; packet.len() + ESP_MAX_OVERHEAD];
    match core.encapsulate(peer.unwrap(), packet, &mut out, now) {
        Outbound::Send { len, .. } => Ok(out[..len].to_vec()),
        Outbound::Dropped(r) => Err(r),
    }
}

fn open(core: &EspCore, datagram: &[u8], now: Instant) -> Result<Option<Vec<u8>>, DropReason> {
    let mut out = vec![0u8; datagram.len()];
    match core.decapsulate(&core.peers(), datagram, &mut out, now) {
        Inbound::Tun { offset, len } => Ok(Some(out[offset..offset + len].to_vec())),
        Inbound::Consumed => Ok(None),
        Inbound::Dropped(r) => Err(r),
    }
}

fn a_to_b(n: u32) -> Vec<u8> {
    ipv4([100, 64, 1, 2], [100, 64, 2, 2], &n.to_be_bytes())
}

#[test]
fn traffic_flows_and_drops_are_counted_by_reason() {
    let now = Instant::now();
    let p = pair(EspCipher::Aes128Gcm, true, Lifetimes::default(), now);
    let wire = seal(&p.a, &a_to_b(7), now).unwrap();
    assert_eq!(open(&p.b, &wire, now), Ok(Some(a_to_b(7))));
    assert_eq!(open(&p.b, &wire, now), Err(DropReason::Replay));
    let mut flipped = seal(&p.a, &a_to_b(8), now).unwrap();
    flipped[20] ^= 1;
    assert_eq!(open(&p.b, &flipped, now), Err(DropReason::DecryptFailure));
    // A spoofed inner source from an authentic peer.
    let spoof = seal(&p.a, &ipv4([100, 64, 9, 9], [100, 64, 2, 2], b"x"), now).unwrap();
    assert_eq!(open(&p.b, &spoof, now), Err(DropReason::BadSource));
    // Unknown SPI, non-ESP marker, NAT keepalive.
    let mut unknown = wire.clone();
    unknown[..4].copy_from_slice(&0x0bad_beefu32.to_be_bytes());
    assert_eq!(open(&p.b, &unknown, now), Err(DropReason::UnknownPeer));
    assert_eq!(
        open(&p.b, &[0, 0, 0, 0, 1, 2, 3], now),
        Err(DropReason::Malformed)
    );
    assert_eq!(open(&p.b, &[0xff], now), Ok(None));

    let stats = p.b.peers().peers()[0].stats();
    assert_eq!(
        stats.rx_packets, 2,
        "the good packet and the spoofed one authenticated"
    );
    assert_eq!(
        (
            stats.drops.replay,
            stats.drops.decrypt_failure,
            stats.drops.bad_source
        ),
        (1, 1, 1)
    );
    let dev = p.b.counters.snapshot();
    assert_eq!((dev.unknown_peer, dev.malformed), (1, 1));
}

#[test]
fn too_old_packets_are_counted_apart_from_replays() {
    let now = Instant::now();
    // Without ESN: with ESN, RFC 4303 Appendix A reads a number below the
    // window as one from the next 2^32 subspace, and the ICV then fails.
    let p = pair(EspCipher::Aes128Gcm, false, Lifetimes::default(), now);
    let first = seal(&p.a, &a_to_b(0), now).unwrap();
    let mut last = Vec::new();
    for i in 1..=(replay::WINDOW as u32 + 5) {
        last = seal(&p.a, &a_to_b(i), now).unwrap();
    }
    open(&p.b, &last, now).unwrap();
    assert_eq!(open(&p.b, &first, now), Err(DropReason::TooOld));
    assert_eq!(p.b.peers().peers()[0].stats().drops.too_old, 1);
}

#[test]
fn soft_lifetime_rekeys_without_losing_or_duplicating_a_packet() {
    let mut now = Instant::now();
    let lifetimes = Lifetimes {
        soft: Limits {
            packets: 100,
            bytes: u64::MAX,
            time: Duration::from_secs(3600),
        },
        hard: Limits {
            packets: 150,
            bytes: u64::MAX,
            time: Duration::from_secs(7200),
        },
        grace: Duration::from_secs(5),
    };
    let p = pair(EspCipher::Aes256Gcm, true, lifetimes, now);
    let mut in_flight = std::collections::VecDeque::new();
    let mut received = Vec::new();
    for i in 0..1000u32 {
        in_flight.push_back(seal(&p.a, &a_to_b(i), now).unwrap());
        // Deliver with a lag of 3 packets and occasional reordering, so
        // packets of an old SA arrive after the new one took over.
        if in_flight.len() > 3 {
            if i % 7 == 0 {
                in_flight.swap(0, 1);
            }
            let dgram = in_flight.pop_front().unwrap();
            received.push(open(&p.b, &dgram, now).unwrap().unwrap());
        }
        now += Duration::from_millis(1);
    }
    for dgram in in_flight {
        received.push(open(&p.b, &dgram, now).unwrap().unwrap());
    }
    let mut numbers: Vec<u32> = received
        .iter()
        .map(|pkt| u32::from_be_bytes(pkt[20..24].try_into().unwrap()))
        .collect();
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (0..1000).collect::<Vec<_>>(),
        "every packet exactly once"
    );

    let status = p.a.peers().peers()[0].status(now);
    assert!(status.rekeys >= 9, "rekeyed {} times", status.rekeys);
    let b_status = p.b.peers().peers()[0].status(now);
    assert!(b_status.inbound.iter().any(|sa| sa.retiring));
    // After the grace period old inbound SAs are gone.
    p.b.tick(now + Duration::from_secs(6));
    let b_status = p.b.peers().peers()[0].status(now);
    assert!(b_status.inbound.iter().all(|sa| !sa.retiring));
    assert!(b_status
        .inbound
        .iter()
        .all(|sa| sa.generation >= status.outbound.generation));
}

#[test]
fn an_sa_at_its_hard_limit_drops_instead_of_sending() {
    let now = Instant::now();
    // A keying source that cannot produce generation 1: rekey fails.
    #[derive(Debug)]
    struct OneGeneration(ManualKeying);
    impl EspKeying for OneGeneration {
        fn cipher(&self) -> EspCipher {
            self.0.cipher()
        }
        fn sa_pair(&self, generation: u64) -> Result<SaPair, KeyingError> {
            if generation > 2 {
                return Err(KeyingError::Unavailable(generation));
            }
            self.0.sa_pair(generation)
        }
    }
    let limits = Limits {
        packets: 3,
        bytes: u64::MAX,
        time: Duration::MAX,
    };
    let keying = OneGeneration(ManualKeying::new(
        EspCipher::Aes128Gcm,
        SaPair {
            outbound: sa(0x3000_0000, 1, 16),
            inbound: sa(0x4000_0000, 2, 16),
        },
    ));
    let core = EspCore::new(
        vec![EspPeerConfig {
            name: None,
            endpoint: "192.0.2.2:4500".parse().unwrap(),
            allowed_prefixes: vec!["100.64.2.0/24".parse().unwrap()],
            local_prefixes: Vec::new(),
            esn: false,
            lifetimes: Lifetimes {
                soft: limits,
                hard: limits,
                grace: Duration::from_secs(1),
            },
            keying: Arc::new(keying),
        }],
        now,
    )
    .unwrap();
    // Generations 1 and 2 exist, so the first rekeys work; the fourth
    // generation does not, so the SA of generation 2 runs into its limit.
    let mut sent = 0;
    let mut dropped = 0;
    for i in 0..20 {
        match seal(&core, &a_to_b(i), now) {
            Ok(_) => sent += 1,
            Err(DropReason::NoSession) => dropped += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sent, 9, "three packets on each of generations 0, 1, 2");
    assert_eq!(dropped, 11);
    assert_eq!(core.peers().peers()[0].stats().drops.no_session, 11);
}

#[test]
fn conflicting_spis_and_reserved_spis_are_refused() {
    let now = Instant::now();
    let keying = |out: u32, inb: u32| -> Arc<dyn EspKeying> {
        Arc::new(ManualKeying::new(
            EspCipher::Aes128Gcm,
            SaPair {
                outbound: sa(out, 1, 16),
                inbound: sa(inb, 2, 16),
            },
        ))
    };
    let cfg = |k: Arc<dyn EspKeying>, prefix: &str| EspPeerConfig {
        name: None,
        endpoint: "192.0.2.2:4500".parse().unwrap(),
        allowed_prefixes: vec![prefix.parse().unwrap()],
        local_prefixes: Vec::new(),
        esn: true,
        lifetimes: Lifetimes::default(),
        keying: k,
    };
    assert!(matches!(
        EspCore::new(
            vec![
                cfg(keying(0x1000, 0x2000), "100.64.2.0/24"),
                cfg(keying(0x1001, 0x2000), "100.64.3.0/24")
            ],
            now
        ),
        Err(EspError::SpiConflict {
            peer: 1,
            spi: 0x2000
        })
    ));
    assert!(matches!(
        EspCore::new(vec![cfg(keying(0x1000, 7), "100.64.2.0/24")], now),
        Err(EspError::Sa { .. })
    ));
}

#[test]
fn peers_come_and_go_at_run_time() {
    let now = Instant::now();
    let p = pair(EspCipher::Aes128Gcm, true, Lifetimes::default(), now);
    let peer = p.b.peers().peers()[0].clone();
    let wire = seal(&p.a, &a_to_b(1), now).unwrap();
    p.b.remove_peer(&peer);
    assert!(p.b.peers().peers().is_empty());
    assert_eq!(open(&p.b, &wire, now), Err(DropReason::UnknownPeer));
    // The same SAs again: accepted, and traffic flows.
    let cfg = peer.config().clone();
    p.b.add_peer(cfg.clone(), now).unwrap();
    assert_eq!(open(&p.b, &wire, now), Ok(Some(a_to_b(1))));
    // A second peer with the same inbound SPIs is refused and changes nothing.
    assert!(matches!(
        p.b.add_peer(cfg, now),
        Err(EspError::SpiConflict { .. })
    ));
    assert_eq!(p.b.peers().peers().len(), 1);
}

#[test]
fn sas_installed_ahead_do_not_age_before_they_are_used() {
    // Defaults: soft 3000 s, hard 3600 s. After 3000 s the sender moves to
    // generation 1; the receiver installed it at t = 0 but it must still
    // work well past 3600 s, since its lifetime starts with its first use.
    let start = Instant::now();
    let p = pair(EspCipher::Aes128Gcm, true, Lifetimes::default(), start);
    let wire = seal(&p.a, &a_to_b(0), start).unwrap();
    assert!(open(&p.b, &wire, start).unwrap().is_some());
    let later = start + Duration::from_secs(3001);
    let wire = seal(&p.a, &a_to_b(1), later).unwrap();
    assert_eq!(p.a.peers().peers()[0].status(later).outbound.generation, 1);
    let much_later = start + Duration::from_secs(4000);
    p.b.tick(much_later);
    assert_eq!(open(&p.b, &wire, much_later), Ok(Some(a_to_b(1))));
    let wire = seal(&p.a, &a_to_b(2), much_later).unwrap();
    assert_eq!(open(&p.b, &wire, much_later), Ok(Some(a_to_b(2))));
}

fn b_to_a(n: u32) -> Vec<u8> {
    ipv4([100, 64, 2, 2], [100, 64, 1, 2], &n.to_be_bytes())
}

/// `sa rotate`: each request moves the sender to the next generation with a packet
/// sent once the peer was heard from on the current one (repeated requests count
/// once); 20 rotations in a row, some packets reordered across a rotation, all open
/// exactly once at the peer, whose inbound SAs follow.
#[test]
fn requested_rotations_apply_with_the_next_packet_and_lose_nothing() {
    let mut now = Instant::now();
    let p = pair(EspCipher::Aes256Gcm, true, Lifetimes::default(), now);
    let peer_a = p.a.peers().peers()[0].clone();
    let mut delivered = Vec::new();
    let mut held_back = None;
    for n in 0..20u32 {
        assert_eq!(peer_a.request_rotation(), u64::from(n));
        assert_eq!(peer_a.request_rotation(), u64::from(n), "asked twice");
        assert!(peer_a.status(now).rotation_pending);
        now += ROTATION_SPACING;
        let reply = seal(&p.b, &b_to_a(n), now).unwrap();
        open(&p.a, &reply, now).unwrap();
        let d = seal(&p.a, &a_to_b(n), now).unwrap();
        let st = peer_a.status(now);
        assert_eq!(st.outbound.generation, u64::from(n) + 1);
        assert!(!st.rotation_pending);
        // Every fifth packet arrives after the next rotation's first packet.
        if n % 5 == 2 {
            held_back = Some(d);
        } else {
            delivered.push(open(&p.b, &d, now).unwrap().unwrap());
            if let Some(late) = held_back.take() {
                delivered.push(open(&p.b, &late, now).unwrap().unwrap());
            }
        }
    }
    let mut got: Vec<u32> = delivered
        .iter()
        .map(|pkt| u32::from_be_bytes(pkt[20..24].try_into().unwrap()))
        .collect();
    got.sort_unstable();
    assert_eq!(got, (0..20).collect::<Vec<_>>());
    let st = peer_a.status(now);
    assert_eq!((st.rotations, st.rekeys), (20, 20));
    let b_status = p.b.peers().peers()[0].status(now);
    let newest = b_status.inbound.iter().map(|s| s.generation).max();
    assert_eq!(newest, Some(22), "{b_status:#?}");
}

/// Found by review: rotations asked for while nothing arrives (an outage) used to
/// move one generation per lost packet, past the two the peer installs ahead, and
/// everything sent after the outage was unreadable. Now a rotation waits until the
/// peer is heard from on the current generation.
#[test]
fn rotations_during_an_outage_do_not_outrun_the_peer() {
    let mut now = Instant::now();
    let p = pair(EspCipher::Aes128Gcm, true, Lifetimes::default(), now);
    let peer_a = p.a.peers().peers()[0].clone();
    // Heard from once, so the first rotation may go.
    let reply = seal(&p.b, &b_to_a(0), now).unwrap();
    open(&p.a, &reply, now).unwrap();
    for n in 0..5u32 {
        peer_a.request_rotation();
        now += ROTATION_SPACING * 3;
        // Lost on the way.
        seal(&p.a, &a_to_b(n), now).unwrap();
    }
    assert!(peer_a.status(now).outbound.generation <= 1);
    // After the outage the peer reads what comes.
    let d = seal(&p.a, &a_to_b(99), now).unwrap();
    assert_eq!(open(&p.b, &d, now).unwrap().unwrap(), a_to_b(99));
}

/// Two cores keyed as IKE keys them: generation 0 pushed, each rekey installed
/// with `install_pair` (`a` initiates the rekeys, so `a` switches at once and `b`
/// once it hears `a` on the new SA).
fn pushed_pair(now: Instant) -> Pair {
    let len = 16;
    let (ab, ba) = (sa(0x1000_0001, 0xaa, len), sa(0x2000_0002, 0xbb, len));
    let cfg = |out: &SaKeys, inb: &SaKeys, endpoint: &str, prefix: &str| EspPeerConfig {
        name: Some("ike".into()),
        endpoint: endpoint.parse().unwrap(),
        allowed_prefixes: vec![prefix.parse().unwrap()],
        local_prefixes: Vec::new(),
        esn: true,
        lifetimes: Lifetimes::default(),
        keying: Arc::new(keying::PushedKeying::new(
            EspCipher::Aes128Gcm,
            SaPair {
                outbound: out.clone(),
                inbound: inb.clone(),
            },
        )),
    };
    Pair {
        a: EspCore::new(vec![cfg(&ab, &ba, "192.0.2.2:4500", "100.64.2.0/24")], now).unwrap(),
        b: EspCore::new(vec![cfg(&ba, &ab, "192.0.2.1:4500", "100.64.1.0/24")], now).unwrap(),
    }
}

fn out_spi(core: &EspCore) -> String {
    core.peers().peers()[0].status(Instant::now()).outbound.spi
}

#[test]
fn pushed_keys_switch_make_before_break_and_never_derive() {
    let now = Instant::now();
    let p = pushed_pair(now);
    let (pa, pb) = (
        p.a.peers().peers()[0].clone(),
        p.b.peers().peers()[0].clone(),
    );
    // Only generation 0 is installed: nothing derived ahead.
    assert_eq!(pb.status(now).inbound.len(), 1);
    // Way past the soft lifetime the data path does not switch on its own (the
    // peer would not know a derived SA).
    let later = now + Duration::from_secs(3300);
    let wire = seal(&p.a, &a_to_b(1), later).unwrap();
    assert_eq!(&wire[..4], &0x1000_0001u32.to_be_bytes());
    assert_eq!(open(&p.b, &wire, later), Ok(Some(a_to_b(1))));

    // A rekey: b (the responder) installs first, a (the initiator) switches at once.
    let (ab1, ba1) = (sa(0x1000_0011, 0xa1, 16), sa(0x2000_0022, 0xb1, 16));
    let gb =
        p.b.install_pair(
            &pb,
            &SaPair {
                outbound: ba1.clone(),
                inbound: ab1.clone(),
            },
            false,
            later,
        )
        .unwrap();
    // b still sends on the old SA: a has not got the new pair yet.
    let old = seal(&p.b, &b_to_a(2), later).unwrap();
    assert_eq!(&old[..4], &0x2000_0002u32.to_be_bytes());
    assert_eq!(open(&p.a, &old, later), Ok(Some(b_to_a(2))));
    let ga =
        p.a.install_pair(
            &pa,
            &SaPair {
                outbound: ab1.clone(),
                inbound: ba1.clone(),
            },
            true,
            later,
        )
        .unwrap();
    assert_eq!((ga, gb), (1, 1));
    let new = seal(&p.a, &a_to_b(3), later).unwrap();
    assert_eq!(&new[..4], &0x1000_0011u32.to_be_bytes());
    // A late packet on the old SA still arrives, then the new one.
    assert_eq!(open(&p.b, &wire, later), Err(DropReason::Replay));
    assert_eq!(open(&p.b, &new, later), Ok(Some(a_to_b(3))));
    // b heard a on the new SA: b switches too.
    let back = seal(&p.b, &b_to_a(4), later).unwrap();
    assert_eq!(&back[..4], &0x2000_0022u32.to_be_bytes());
    assert_eq!(open(&p.a, &back, later), Ok(Some(b_to_a(4))));
    assert_eq!(out_spi(&p.b), "0x20000022");

    // The old pair's delete removes its inbound SA at once.
    assert!(p.a.remove_inbound(&pa, 0x2000_0002));
    assert!(!p.a.remove_inbound(&pa, 0x2000_0002), "gone already");
    assert_eq!(open(&p.a, &old, later), Err(DropReason::UnknownPeer));
    // The same SPI cannot be installed twice, and nothing changes then.
    let clash = SaPair {
        outbound: sa(0x3000_0003, 1, 16),
        inbound: ab1.clone(),
    };
    assert_eq!(
        p.b.install_pair(&pb, &clash, true, later),
        Err(InstallError::SpiConflict(0x1000_0011))
    );
    assert_eq!(out_spi(&p.b), "0x20000022");
    // Derived keys take no pushed pairs; a removed peer takes none either.
    let manual = pair(EspCipher::Aes128Gcm, true, Lifetimes::default(), now);
    let mp = manual.a.peers().peers()[0].clone();
    assert_eq!(
        manual.a.install_pair(&mp, &clash, true, now),
        Err(InstallError::Derived)
    );
    p.a.remove_peer(&pa);
    let fresh = SaPair {
        outbound: sa(0x4000_0004, 2, 16),
        inbound: sa(0x5000_0005, 3, 16),
    };
    assert_eq!(
        p.a.install_pair(&pa, &fresh, true, later),
        Err(InstallError::Removed)
    );
}

#[test]
fn a_responder_switches_when_the_peer_deletes_the_old_pair() {
    let now = Instant::now();
    let p = pushed_pair(now);
    let pb = p.b.peers().peers()[0].clone();
    let next = SaPair {
        outbound: sa(0x2000_0022, 0xb1, 16),
        inbound: sa(0x1000_0011, 0xa1, 16),
    };
    p.b.install_pair(&pb, &next, false, now).unwrap();
    assert_eq!(out_spi(&p.b), "0x20000002", "staged, not in use");
    // a deleted the old pair without sending on the new one yet.
    assert!(p.b.remove_inbound(&pb, 0x1000_0001));
    assert_eq!(out_spi(&p.b), "0x20000022");
}

#[test]
fn ike_on_the_esp_port_goes_to_the_control_inbox() {
    let now = Instant::now();
    let p = pushed_pair(now);
    let from: SocketAddr = "192.0.2.2:4500".parse().unwrap();
    let mut out = vec![0u8; 64];
    let ike = [0, 0, 0, 0, 0x11, 0x22];
    // No key exchange: dropped and counted as before.
    assert!(matches!(
        p.b.receive(&p.b.peers(), from, &ike, &mut out, now),
        Inbound::Dropped(DropReason::Malformed)
    ));
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    assert!(p.b.set_control_inbox(tx, vec![from.ip()]));
    assert!(matches!(
        p.b.receive(&p.b.peers(), from, &ike, &mut out, now),
        Inbound::Consumed
    ));
    let got = rx.try_recv().unwrap();
    assert_eq!((got.from, got.bytes), (from, vec![0x11, 0x22]));
    // A full inbox loses the datagram (IKE retransmits) and counts it.
    p.b.receive(&p.b.peers(), from, &ike, &mut out, now);
    p.b.receive(&p.b.peers(), from, &ike, &mut out, now);
    assert_eq!(p.b.control_overflow(), 1);
    // ESP still goes to the data path.
    let wire = seal(&p.a, &a_to_b(9), now).unwrap();
    assert!(matches!(
        p.b.receive(&p.b.peers(), from, &wire, &mut out, now),
        Inbound::Tun { .. }
    ));
}

#[test]
fn ike_from_other_addresses_and_floods_of_new_exchanges_are_not_queued() {
    let now = Instant::now();
    let p = pushed_pair(now);
    let peer: SocketAddr = "192.0.2.2:4500".parse().unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(256);
    assert!(p.b.set_control_inbox(tx, vec![peer.ip()]));
    let mut out = vec![0u8; 64];
    // IKE header after the marker: SPIi, SPIr (zero: a new exchange), the rest.
    let ike = |spi_r: u8| {
        let mut d = vec![0u8; 4 + 28];
        d[4..12].copy_from_slice(&[7; 8]);
        d[19] = spi_r;
        d
    };
    let stranger: SocketAddr = "198.51.100.9:4500".parse().unwrap();
    assert!(matches!(
        p.b.receive(&p.b.peers(), stranger, &ike(0), &mut out, now),
        Inbound::Dropped(DropReason::UnknownPeer)
    ));
    assert!(rx.try_recv().is_err(), "nothing queued from a stranger");
    for _ in 0..MAX_QUEUED_INITS + 8 {
        p.b.receive(&p.b.peers(), peer, &ike(0), &mut out, now);
    }
    assert_eq!(p.b.control_overflow(), 8);
    // An established exchange's datagram still gets in.
    p.b.receive(&p.b.peers(), peer, &ike(1), &mut out, now);
    let queued: Vec<_> = rx.try_iter().collect();
    assert_eq!(queued.len(), MAX_QUEUED_INITS + 1);
    // Handled (dropped) requests free their places.
    drop(queued);
    p.b.receive(&p.b.peers(), peer, &ike(0), &mut out, now);
    assert_eq!(p.b.control_overflow(), 8);
    assert_eq!(rx.try_iter().count(), 1);
}

#[test]
fn a_pushed_peer_may_only_send_to_our_side_of_its_selectors() {
    let now = Instant::now();
    let len = 16;
    let (ab, ba) = (sa(0x1000_0001, 0xaa, len), sa(0x2000_0002, 0xbb, len));
    let cfg = |out: &SaKeys, inb: &SaKeys, remote: &str, local: Vec<IpPrefix>| EspPeerConfig {
        name: None,
        endpoint: "192.0.2.9:4500".parse().unwrap(),
        allowed_prefixes: vec![remote.parse().unwrap()],
        local_prefixes: local,
        esn: true,
        lifetimes: Lifetimes::default(),
        keying: Arc::new(keying::PushedKeying::new(
            EspCipher::Aes128Gcm,
            SaPair {
                outbound: out.clone(),
                inbound: inb.clone(),
            },
        )),
    };
    let a = EspCore::new(vec![cfg(&ab, &ba, "100.64.2.0/24", Vec::new())], now).unwrap();
    let b = EspCore::new(
        vec![cfg(
            &ba,
            &ab,
            "100.64.1.0/24",
            vec!["100.64.2.0/24".parse().unwrap()],
        )],
        now,
    )
    .unwrap();
    let p = Pair { a, b };
    assert_eq!(
        open(&p.b, &seal(&p.a, &a_to_b(1), now).unwrap(), now),
        Ok(Some(a_to_b(1)))
    );
    // Authentic, from an allowed source, but to an address outside our selectors.
    let elsewhere = ipv4([100, 64, 1, 2], [10, 0, 0, 1], b"x");
    let wire = seal(&p.a, &elsewhere, now).unwrap();
    assert_eq!(open(&p.b, &wire, now), Err(DropReason::BadSource));
}

#[test]
fn pushed_keys_tell_when_they_near_their_hard_limits() {
    let now = Instant::now();
    let p = pushed_pair(now);
    let (pa, pb) = (
        p.a.peers().peers()[0].clone(),
        p.b.peers().peers()[0].clone(),
    );
    assert!(!pa.nears_hard_limit(0.9, now));
    // Time: 90 % of the hour is near.
    let hard = Lifetimes::default().hard.time;
    assert!(pa.nears_hard_limit(0.9, now + hard.mul_f64(0.91)));
    // Bytes, out and in: the hard byte limit scaled down to what these packets carry.
    let mut sent = 0u64;
    for n in 0..200u32 {
        let wire = seal(
            &p.a,
            &ipv4([100, 64, 1, 2], [100, 64, 2, 2], &vec![n as u8; 1000]),
            now,
        )
        .unwrap();
        sent += wire.len() as u64;
        open(&p.b, &wire, now).unwrap();
    }
    let limit = Lifetimes::default().hard.bytes;
    // With a share just below what was sent, both directions are near; twice it, neither.
    let near = (sent as f64 * 0.9) / limit as f64;
    assert!(pa.nears_hard_limit(near, now), "outbound bytes");
    assert!(pb.nears_hard_limit(near, now), "inbound bytes");
    let far = (sent as f64 * 2.0) / limit as f64;
    assert!(!pa.nears_hard_limit(far, now) && !pb.nears_hard_limit(far, now));
}
