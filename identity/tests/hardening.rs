//! The channel under hostile or misconfigured peers: link parameters that differ are
//! refused on both ends with both sides' values, and slow unauthenticated connections are
//! capped per source and dropped at the handshake deadline, so they cannot keep a
//! legitimate peer out.

// Test helpers outside #[test] functions unwrap too (clippy.toml covers only the tests).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use isthmus_identity::channel::{encode_frame, Frame, FrameDecoder, ALPN, PROTOCOL_VERSION};
use isthmus_identity::{
    ChannelConfig, ChannelError, ChannelEvent, ChannelListener, ChannelTiming, EspCipher,
    LinkParams, ListenerLimits, PeerChannel, PeerEndpoint, PeerLink, Refusal, Role,
};

const ESP256_ESN: LinkParams = LinkParams::Esp {
    cipher: EspCipher::Aes256Gcm,
    esn: true,
};
const ESP128_ESN: LinkParams = LinkParams::Esp {
    cipher: EspCipher::Aes128Gcm,
    esn: true,
};
const ESP256_NO_ESN: LinkParams = LinkParams::Esp {
    cipher: EspCipher::Aes256Gcm,
    esn: false,
};

struct Ends {
    mesh: Mesh,
    client: Arc<ChannelConfig>,
    server: Arc<ChannelConfig>,
}

fn ends() -> Ends {
    capture_logs();
    let mesh = Mesh::new("mesh.test");
    let trust = mesh.trust();
    let client = config(&issue(&mesh.cluster("a"), "gw-client"), &trust, 1);
    let server = config(&issue(&mesh.cluster("b"), "gw-server"), &trust, 2);
    Ends {
        mesh,
        client,
        server,
    }
}

/// The client dials with `client_link`; the server expects `server_link` for it.
fn dial_with_links(
    e: &Ends,
    client_link: LinkParams,
    server_link: LinkParams,
) -> (
    Result<isthmus_identity::Established, ChannelError>,
    Vec<ChannelEvent>,
    SocketAddr,
) {
    let (stx, srx) = mpsc::channel();
    let listener = ChannelListener::bind(
        e.server.clone(),
        "127.0.0.1:0".parse().unwrap(),
        vec![(e.mesh.id("a", "gw-client"), server_link)],
    )
    .unwrap()
    .spawn(stx)
    .unwrap();
    let addr = listener.local_addr();
    let (ctx, _crx) = mpsc::channel();
    let client = PeerChannel::connect(
        &e.client,
        &PeerEndpoint {
            id: e.mesh.id("b", "gw-server"),
            addr,
            link: client_link,
        },
        ctx,
    );
    let mut server_events = Vec::new();
    if let Ok(ev) = srx.recv_timeout(Duration::from_secs(5)) {
        server_events.push(ev);
    }
    std::thread::sleep(Duration::from_millis(100));
    server_events.extend(srx.try_iter());
    listener.shutdown();
    (client, server_events, addr)
}

#[test]
fn matching_link_params_establish() {
    let e = ends();
    for link in [LinkParams::Wireguard, ESP128_ESN, ESP256_ESN, ESP256_NO_ESN] {
        let (client, server_events, _) = dial_with_links(&e, link, link);
        let client = client.unwrap_or_else(|err| panic!("{link}: {err}"));
        assert!(
            matches!(&server_events[..], [ChannelEvent::Established(_)]),
            "{link}: {server_events:?}"
        );
        client.session.close();
    }
}

#[test]
fn mismatched_kind_cipher_or_esn_is_refused_on_both_sides_with_both_values() {
    let e = ends();
    let cases = [
        (
            LinkParams::Wireguard,
            ESP256_ESN,
            "tunnel mismatch: we use wireguard, peer uses esp/aes256-gcm/esn",
        ),
        (
            ESP256_ESN,
            ESP128_ESN,
            "tunnel mismatch: we use esp/aes256-gcm/esn, peer uses esp/aes128-gcm/esn",
        ),
        (
            ESP256_ESN,
            ESP256_NO_ESN,
            "tunnel mismatch: we use esp/aes256-gcm/esn, peer uses esp/aes256-gcm/no-esn",
        ),
    ];
    for (client_link, server_link, client_says) in cases {
        let (client, server_events, addr) = dial_with_links(&e, client_link, server_link);
        match &client {
            Err(ChannelError::Refused(r @ Refusal::LinkMismatch { ours, theirs })) => {
                assert_eq!((*ours, *theirs), (client_link, server_link));
                assert_eq!(r.to_string(), client_says);
            }
            other => panic!("{client_says}: client got {other:?}"),
        }
        let server_says = format!("tunnel mismatch: we use {server_link}, peer uses {client_link}");
        match &server_events[..] {
            [ChannelEvent::Refused {
                role: Role::Acceptor,
                refusal: r @ Refusal::LinkMismatch { ours, theirs },
                ..
            }] => {
                assert_eq!((*ours, *theirs), (server_link, client_link));
                assert_eq!(r.to_string(), server_says);
            }
            other => panic!("{client_says}: server events {other:?}"),
        }
        // Both ends log the refusal with the reason (the dialer's names the listener).
        let log = captured();
        for (says, role) in [(client_says, "dialer"), (server_says.as_str(), "acceptor")] {
            assert!(
                log.lines().any(|l| l.contains("WARN")
                    && l.contains("peer channel refused")
                    && l.contains(role)
                    && l.contains(&addr.to_string())
                    && l.contains(says)),
                "no {role} log line with {says:?}:\n{log}"
            );
        }
    }
}

/// A peer that checks nothing: authenticates, sends a hello with `link`, and returns the
/// frames the listener sends back until it closes.
fn raw_peer_frames(e: &Ends, addr: SocketAddr, link: LinkParams) -> Vec<Frame> {
    let leaf = issue(&e.mesh.cluster("a"), "gw-client");
    let creds = leaf.credentials().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_client_auth_cert(creds.chain, creds.key)
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let conn = rustls::ClientConnection::new(Arc::new(tls), addr.ip().into()).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, sock);
    let hello = encode_frame(&Frame::Hello {
        version: PROTOCOL_VERSION,
        params: params(7),
        link: Some(link),
    })
    .unwrap();
    stream.write_all(&hello).unwrap();
    let mut decoder = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        decoder.push(&buf[..n]);
        while let Ok(Some(f)) = decoder.next_frame() {
            frames.push(f);
        }
    }
    frames
}

#[test]
fn the_refusing_side_tells_the_peer_why_in_a_close_frame() {
    let e = ends();
    let (stx, srx) = mpsc::channel();
    let listener = ChannelListener::bind(
        e.server.clone(),
        "127.0.0.1:0".parse().unwrap(),
        vec![(e.mesh.id("a", "gw-client"), ESP256_ESN)],
    )
    .unwrap()
    .spawn(stx)
    .unwrap();
    let frames = raw_peer_frames(&e, listener.local_addr(), ESP128_ESN);
    assert!(
        matches!(
            &frames[..],
            [Frame::Hello { link: Some(l), .. }, Frame::Close { reason }]
                if *l == ESP256_ESN
                && reason == "tunnel mismatch: we use esp/aes256-gcm/esn, peer uses esp/aes128-gcm/esn"
        ),
        "{frames:?}"
    );
    assert!(matches!(
        srx.recv_timeout(Duration::from_secs(5)).unwrap(),
        ChannelEvent::Refused {
            refusal: Refusal::LinkMismatch { .. },
            ..
        }
    ));
    listener.shutdown();
}

#[test]
fn a_link_with_mismatched_params_reports_refusals_and_keeps_retrying() {
    let e = ends();
    let (stx, srx) = mpsc::channel();
    let listener = ChannelListener::bind(
        e.server.clone(),
        "127.0.0.1:0".parse().unwrap(),
        vec![(e.mesh.id("a", "gw-client"), LinkParams::Wireguard)],
    )
    .unwrap()
    .spawn(stx)
    .unwrap();
    let (ctx, crx) = mpsc::channel();
    let link = PeerLink::spawn(
        e.client.clone(),
        PeerEndpoint {
            id: e.mesh.id("b", "gw-server"),
            addr: listener.local_addr(),
            link: ESP256_ESN,
        },
        ctx,
    )
    .unwrap();
    for _ in 0..2 {
        match crx.recv_timeout(Duration::from_secs(5)).unwrap() {
            ChannelEvent::Refused {
                role: Role::Dialer,
                refusal: Refusal::LinkMismatch { .. },
                ..
            } => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(link.current().is_none());
    assert!(srx
        .try_iter()
        .all(|ev| matches!(ev, ChannelEvent::Refused { .. })));
    link.shutdown();
    listener.shutdown();
}

/// Opens `n` TCP connections to `addr` from `source` that send nothing.
fn silent_connections(source: &str, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let sock = socket_from(source);
            sock.connect(&addr.into()).unwrap();
            let sock: TcpStream = sock.into();
            sock.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            sock
        })
        .collect()
}

fn socket_from(source: &str) -> socket2::Socket {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&local.into()).unwrap();
    sock
}

/// Waits until the listener closes `sock` (end of stream or reset); how long it took.
fn closed_after(sock: &mut TcpStream, since: Instant) -> Duration {
    let mut buf = [0u8; 64];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("connection still open after {:?}", since.elapsed())
            }
            Err(_) => return since.elapsed(),
        }
    }
}

fn short_deadline() -> ChannelTiming {
    ChannelTiming {
        handshake_timeout: Duration::from_millis(1500),
        ..timing()
    }
}

#[test]
fn slow_connections_from_one_source_cannot_keep_a_peer_out() {
    let e = ends();
    let trust = e.mesh.trust();
    let server = Arc::new(
        ChannelConfig::new(
            issue(&e.mesh.cluster("b"), "gw-server")
                .credentials()
                .unwrap(),
            &trust,
            params(2),
        )
        .unwrap()
        .with_timing(short_deadline()),
    );
    let (stx, srx) = mpsc::channel();
    let listener = ChannelListener::bind(
        server,
        "127.0.0.1:0".parse().unwrap(),
        wg(vec![e.mesh.id("a", "gw-client")]),
    )
    .unwrap()
    .with_limits(ListenerLimits {
        max_handshakes: 64,
        max_handshakes_per_source: 8,
    })
    .spawn(stx)
    .unwrap();
    let addr = listener.local_addr();

    // The attacker: 100 silent connections from 127.0.0.1, and one from 127.0.0.3 that
    // announces a 16 KiB TLS handshake record and trickles its body a byte every 200 ms.
    let opened = Instant::now();
    let mut silent = silent_connections("127.0.0.1", addr, 100);
    let trickle = silent_connections("127.0.0.3", addr, 1).remove(0);
    let trickler = {
        let mut w = trickle.try_clone().unwrap();
        std::thread::spawn(move || {
            if w.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]).is_err() {
                return;
            }
            for _ in 0..40 {
                if w.write_all(&[0x01]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let stats = listener.stats();
    assert_eq!(stats.over_source_limit, 92, "{stats:?}");
    assert_eq!(stats.in_flight, 9, "{stats:?}");

    // The legitimate peer, from its own address, gets in at once (well before the
    // attacker's handshakes time out).
    let client = ChannelConfig::new(
        issue(&e.mesh.cluster("a"), "gw-client")
            .credentials()
            .unwrap(),
        &trust,
        params(1),
    )
    .unwrap()
    .with_timing(timing())
    .with_source_address("127.0.0.2".parse().unwrap());
    let (ctx, _crx) = mpsc::channel();
    let started = Instant::now();
    let est =
        PeerChannel::connect(&client, &endpoint(e.mesh.id("b", "gw-server"), addr), ctx).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(
        srx.recv_timeout(Duration::from_secs(5)).unwrap(),
        ChannelEvent::Established(_)
    ));

    // Connections over the per-source cap were closed at once; the 8 admitted ones and
    // the trickling one are dropped at the deadline (1.5 s), not later.
    let watchers: Vec<_> = silent
        .drain(..)
        .chain(std::iter::once(trickle))
        .map(|mut sock| std::thread::spawn(move || closed_after(&mut sock, opened)))
        .collect();
    let mut times: Vec<Duration> = watchers.into_iter().map(|w| w.join().unwrap()).collect();
    let trickle_closed = times.pop().unwrap();
    let early = times
        .iter()
        .filter(|t| **t < Duration::from_millis(1000))
        .count();
    let mut at_deadline: Vec<Duration> = times
        .into_iter()
        .filter(|t| *t >= Duration::from_millis(1000))
        .collect();
    at_deadline.push(trickle_closed);
    assert_eq!(early, 92);
    assert_eq!(at_deadline.len(), 9);
    for t in &at_deadline {
        assert!(
            *t >= Duration::from_millis(1400) && *t < Duration::from_millis(3000),
            "dropped after {t:?}"
        );
    }
    let _ = trickler.join();
    std::thread::sleep(Duration::from_millis(100));
    let stats = listener.stats();
    assert_eq!(stats.timed_out, 9, "{stats:?}");
    assert_eq!(stats.established, 1, "{stats:?}");
    assert_eq!(stats.in_flight, 0, "{stats:?}");
    assert!(!est.session.is_closed());
    est.session.close();
    listener.shutdown();
}

#[test]
fn a_full_listener_frees_its_slots_at_the_deadline_and_the_link_gets_in() {
    let e = ends();
    let trust = e.mesh.trust();
    let server = Arc::new(
        ChannelConfig::new(
            issue(&e.mesh.cluster("b"), "gw-server")
                .credentials()
                .unwrap(),
            &trust,
            params(2),
        )
        .unwrap()
        .with_timing(short_deadline()),
    );
    let (stx, _srx) = mpsc::channel();
    let listener = ChannelListener::bind(
        server,
        "127.0.0.1:0".parse().unwrap(),
        wg(vec![e.mesh.id("a", "gw-client")]),
    )
    .unwrap()
    .with_limits(ListenerLimits {
        max_handshakes: 16,
        max_handshakes_per_source: 8,
    })
    .spawn(stx)
    .unwrap();
    let addr = listener.local_addr();
    // Two attacking hosts take all 16 slots.
    let _held: Vec<TcpStream> = ["127.0.1.1", "127.0.1.2"]
        .iter()
        .flat_map(|src| silent_connections(src, addr, 8))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(listener.stats().in_flight, 16);

    let (ctx, crx) = mpsc::channel();
    let started = Instant::now();
    let link = PeerLink::spawn(
        e.client.clone(),
        endpoint(e.mesh.id("b", "gw-server"), addr),
        ctx,
    )
    .unwrap();
    // Dials closed over the limit are failures, not refusals: the first event is the
    // session.
    match crx.recv_timeout(Duration::from_secs(5)).unwrap() {
        ChannelEvent::Established(_) => {}
        other => panic!("{other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let stats = listener.stats();
    assert!(stats.over_total_limit >= 1, "{stats:?}");
    assert_eq!(stats.timed_out, 16, "{stats:?}");
    link.shutdown();
    listener.shutdown();
}

#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
