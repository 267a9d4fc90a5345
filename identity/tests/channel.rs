//! Established sessions: parameters, ESP keys, messages, liveness, reconnects.

// Test helpers outside #[test] functions unwrap too (clippy.toml covers only the tests).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use isthmus_identity::channel::{encode_frame, Frame, PROTOCOL_VERSION};
use isthmus_identity::{
    should_dial, ChannelError, ChannelEvent, ChannelListener, ControlMessage, Established,
    LossReason, PeerChannel, PeerEndpoint, PeerLink, Role, SpiffeId,
};

fn next_event(rx: &Receiver<ChannelEvent>) -> ChannelEvent {
    rx.recv_timeout(Duration::from_secs(5))
        .expect("an event within 5 s")
}

fn expect_established(rx: &Receiver<ChannelEvent>) -> Established {
    match next_event(rx) {
        ChannelEvent::Established(est) => *est,
        other => panic!("expected Established, got {other:?}"),
    }
}

fn expect_lost(rx: &Receiver<ChannelEvent>, peer: &SpiffeId) -> LossReason {
    match next_event(rx) {
        ChannelEvent::Lost { peer: p, reason } => {
            assert_eq!(&p, peer);
            reason
        }
        other => panic!("expected Lost, got {other:?}"),
    }
}

#[test]
fn both_sides_establish_with_mirrored_esp_keys() {
    let mesh = Mesh::new("mesh.test");
    let trust = mesh.trust();
    let client_cfg = config(&issue(&mesh.cluster("a"), "gw-client"), &trust, 1);
    let server_cfg = config(&issue(&mesh.cluster("b"), "gw-server"), &trust, 2);
    let (client_id, server_id) = (mesh.id("a", "gw-client"), mesh.id("b", "gw-server"));

    let listener = ChannelListener::bind(
        server_cfg,
        "127.0.0.1:0".parse().unwrap(),
        wg(vec![client_id.clone()]),
    )
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stx, srx) = mpsc::channel();
    let server = std::thread::spawn(move || listener.accept(stx));
    let (ctx, crx) = mpsc::channel();
    let client = PeerChannel::connect(
        &client_cfg,
        &PeerEndpoint {
            id: server_id.clone(),
            addr,
            link: isthmus_identity::LinkParams::Wireguard,
        },
        ctx,
    )
    .unwrap();
    let server = server.join().unwrap().unwrap();

    // Identities and parameters, each side seeing the other's.
    assert_eq!(client.peer, server_id);
    assert_eq!(server.peer, client_id);
    assert_eq!(client.role, Role::Dialer);
    assert_eq!(server.role, Role::Acceptor);
    assert_eq!(client.params, params(2));
    assert_eq!(server.params, params(1));
    assert_eq!(client.remote, addr);

    // Generation 0: mirrored, distinct per direction, of the default length.
    assert_eq!(client.keys.generation, 0);
    assert_eq!(client.keys.outbound.len(), 36);
    assert_eq!(*client.keys.outbound, *server.keys.inbound);
    assert_eq!(*client.keys.inbound, *server.keys.outbound);
    assert_ne!(*client.keys.outbound, *client.keys.inbound);

    // The same generation again gives the same keys; another generation fresh ones.
    let c0 = client.session.esp_keys(0, 36).unwrap();
    assert_eq!(*c0.outbound, *client.keys.outbound);
    let c1 = client.session.esp_keys(1, 36).unwrap();
    let s1 = server.session.esp_keys(1, 36).unwrap();
    assert_eq!(*c1.outbound, *s1.inbound);
    assert_eq!(*c1.inbound, *s1.outbound);
    assert_ne!(*c1.outbound, *c0.outbound);
    assert_ne!(*c1.inbound, *c0.inbound);
    assert_ne!(*c1.outbound, *c1.inbound);
    let long = server.session.esp_keys(7, 64).unwrap();
    assert_eq!(long.inbound.len(), 64);
    assert!(matches!(
        client.session.esp_keys(0, 0),
        Err(ChannelError::KeyLength(0))
    ));

    // Messages both ways.
    client
        .session
        .send(ControlMessage::Rekey { generation: 1 })
        .unwrap();
    match next_event(&srx) {
        ChannelEvent::Message { peer, message, .. } => {
            assert_eq!(peer, client_id);
            assert_eq!(message, ControlMessage::Rekey { generation: 1 });
        }
        other => panic!("{other:?}"),
    }
    server
        .session
        .send(ControlMessage::RekeyAck { generation: 1 })
        .unwrap();
    server
        .session
        .send(ControlMessage::Params(params(3)))
        .unwrap();
    for expected in [
        ControlMessage::RekeyAck { generation: 1 },
        ControlMessage::Params(params(3)),
    ] {
        match next_event(&crx) {
            ChannelEvent::Message { peer, message, .. } => {
                assert_eq!(peer, server_id);
                assert_eq!(message, expected);
            }
            other => panic!("{other:?}"),
        }
    }

    // Liveness: several ping intervals pass and the session stays up.
    std::thread::sleep(Duration::from_millis(450));
    assert!(!client.session.is_closed() && !server.session.is_closed());
    assert!(crx.try_recv().is_err() && srx.try_recv().is_err());

    // A local close is reported on both sides.
    client.session.close();
    assert_eq!(expect_lost(&crx, &server_id), LossReason::LocalClose);
    assert!(matches!(
        expect_lost(&srx, &client_id),
        LossReason::PeerClosed { .. }
    ));
    assert!(matches!(
        client.session.send(ControlMessage::Rekey { generation: 2 }),
        Err(ChannelError::Closed)
    ));
    assert_eq!(
        server.session.wait_closed_timeout(Duration::from_secs(1)),
        Some(LossReason::PeerClosed {
            reason: Some("session closed".into())
        })
    );
}

/// A peer that completes TLS and its hello, then goes silent.
fn mute_peer(mesh: &Mesh, server_leaf: &isthmus_certs::IssuedCertificate) -> std::net::SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(mesh.root.certificate().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let creds = server_leaf.credentials().unwrap();
    let tls = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(creds.chain, creds.key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let conn = rustls::ServerConnection::new(tls).unwrap();
        let mut stream = rustls::StreamOwned::new(conn, sock);
        let hello = encode_frame(&Frame::Hello {
            version: PROTOCOL_VERSION,
            params: params(5),
            link: Some(isthmus_identity::LinkParams::Wireguard),
        })
        .unwrap();
        stream.write_all(&hello).unwrap();
        let mut sink = [0u8; 1024];
        // Read (and ignore pings) until the client gives up.
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    });
    addr
}

#[test]
fn silent_peer_is_declared_dead_after_missed_pings() {
    let mesh = Mesh::new("mesh.test");
    let trust = mesh.trust();
    let client_cfg = config(&issue(&mesh.cluster("a"), "gw-client"), &trust, 1);
    let server_leaf = issue(&mesh.cluster("b"), "gw-server");
    let addr = mute_peer(&mesh, &server_leaf);
    let (ctx, crx) = mpsc::channel();
    let server_id = mesh.id("b", "gw-server");
    let started = Instant::now();
    let est = PeerChannel::connect(
        &client_cfg,
        &PeerEndpoint {
            id: server_id.clone(),
            addr,
            link: isthmus_identity::LinkParams::Wireguard,
        },
        ctx,
    )
    .unwrap();
    assert_eq!(est.params, params(5));
    assert_eq!(
        expect_lost(&crx, &server_id),
        LossReason::LivenessTimeout { missed: 3 }
    );
    // 3 intervals of 100 ms, with some slack for scheduling.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[test]
fn link_reconnects_after_loss_with_fresh_keys() {
    let mesh = Mesh::new("mesh.test");
    let trust = mesh.trust();
    let client_cfg = config(&issue(&mesh.cluster("a"), "gw-client"), &trust, 1);
    let server_cfg = config(&issue(&mesh.cluster("b"), "gw-server"), &trust, 2);
    let (client_id, server_id) = (mesh.id("a", "gw-client"), mesh.id("b", "gw-server"));
    let (stx, srx) = mpsc::channel();
    let listener = ChannelListener::bind(
        server_cfg,
        "127.0.0.1:0".parse().unwrap(),
        wg(vec![client_id.clone()]),
    )
    .unwrap()
    .spawn(stx)
    .unwrap();
    let (ctx, crx) = mpsc::channel();
    let link = PeerLink::spawn(
        client_cfg,
        PeerEndpoint {
            id: server_id.clone(),
            addr: listener.local_addr(),
            link: isthmus_identity::LinkParams::Wireguard,
        },
        ctx,
    )
    .unwrap();

    let c1 = expect_established(&crx);
    let s1 = expect_established(&srx);
    assert_eq!(*c1.keys.outbound, *s1.keys.inbound);
    assert!(link.current().is_some());

    // The accepting gateway drops the session (e.g. it restarts).
    s1.session.close();
    assert_eq!(expect_lost(&srx, &client_id), LossReason::LocalClose);
    assert!(matches!(
        expect_lost(&crx, &server_id),
        LossReason::PeerClosed { .. }
    ));

    // The link dials again by itself; the new session has new keys.
    let c2 = expect_established(&crx);
    let s2 = expect_established(&srx);
    assert_eq!(*c2.keys.outbound, *s2.keys.inbound);
    assert_ne!(*c2.keys.outbound, *c1.keys.outbound);
    assert_ne!(*c2.keys.inbound, *c1.keys.inbound);

    // Shutting the link down closes its session and stops dialing.
    link.shutdown();
    assert_eq!(expect_lost(&crx, &server_id), LossReason::LocalClose);
    assert!(matches!(
        expect_lost(&srx, &client_id),
        LossReason::PeerClosed { .. }
    ));
    std::thread::sleep(Duration::from_millis(200));
    assert!(crx.try_recv().is_err() && srx.try_recv().is_err());
    listener.shutdown();
}

#[test]
fn link_keeps_trying_until_the_peer_listens() {
    let mesh = Mesh::new("mesh.test");
    let trust = mesh.trust();
    let client_cfg = config(&issue(&mesh.cluster("a"), "gw-client"), &trust, 1);
    let server_cfg = config(&issue(&mesh.cluster("b"), "gw-server"), &trust, 2);
    // Reserve a port, release it, and bring the listener up there a little later.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (ctx, crx) = mpsc::channel();
    let link = PeerLink::spawn(
        client_cfg,
        PeerEndpoint {
            id: mesh.id("b", "gw-server"),
            addr,
            link: isthmus_identity::LinkParams::Wireguard,
        },
        ctx,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(link.current().is_none());
    let (stx, _srx) = mpsc::channel();
    let listener = ChannelListener::bind(server_cfg, addr, wg(vec![mesh.id("a", "gw-client")]))
        .unwrap()
        .spawn(stx)
        .unwrap();
    let est = expect_established(&crx);
    assert_eq!(est.peer, mesh.id("b", "gw-server"));
    link.shutdown();
    listener.shutdown();
}

#[test]
fn exactly_one_side_dials() {
    let a: SpiffeId = "spiffe://td/cluster/a/gateway/g".parse().unwrap();
    let b: SpiffeId = "spiffe://td/cluster/b/gateway/g".parse().unwrap();
    assert!(should_dial(&a, &b) ^ should_dial(&b, &a));
    assert!(!should_dial(&a, &a));
}

#[test]
fn config_refuses_unusable_credentials_and_trust() {
    let mesh = Mesh::new("mesh.test");
    let a = mesh.cluster("a");
    let (one, two) = (issue(&a, "gw-1"), issue(&a, "gw-2"));
    let mismatched = isthmus_identity::LocalCredentials {
        chain: one.chain().to_vec(),
        key: two.private_key_der().unwrap(),
    };
    let err =
        isthmus_identity::ChannelConfig::new(mismatched, &mesh.trust(), params(1)).unwrap_err();
    assert!(matches!(err, ChannelError::Credentials(_)), "{err}");

    let no_roots = isthmus_identity::MeshTrust::default();
    let err =
        isthmus_identity::ChannelConfig::new(one.credentials().unwrap(), &no_roots, params(1))
            .unwrap_err();
    assert!(matches!(err, ChannelError::Trust(_)), "{err}");

    let empty = isthmus_identity::LocalCredentials {
        chain: vec![],
        key: one.private_key_der().unwrap(),
    };
    assert!(matches!(
        isthmus_identity::ChannelConfig::new(empty, &mesh.trust(), params(1)),
        Err(ChannelError::Credentials(_))
    ));
    let cfg =
        isthmus_identity::ChannelConfig::new(one.credentials().unwrap(), &mesh.trust(), params(1))
            .unwrap();
    assert_eq!(cfg.local_id(), &mesh.id("a", "gw-1"));
    assert!(matches!(
        cfg.with_esp_key_len(0),
        Err(ChannelError::KeyLength(0))
    ));
}
