//! The negative matrix: each case is a real mTLS attempt over loopback TCP that must be
//! refused with the specific, logged reason and bring up no session on either side.

// Test helpers outside #[test] functions unwrap too (clippy.toml covers only the tests).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use isthmus_identity::{ChannelError, ChannelEvent, MeshTrust, Refusal, Role};

/// The server refused the client with a refusal matching `check`; the client was told
/// (TLS alert); neither side established anything.
fn assert_server_refused(a: &Attempt, check: impl Fn(&Refusal) -> bool, logged: &str) {
    match &a.client {
        Err(ChannelError::Refused(Refusal::RejectedByPeer { .. })) => {}
        other => panic!("client should be rejected by the server, got {other:?}"),
    }
    let refusals: Vec<&Refusal> = a
        .server_events
        .iter()
        .map(|ev| match ev {
            ChannelEvent::Refused {
                refusal,
                role: Role::Acceptor,
                ..
            } => refusal,
            other => panic!("unexpected server event {other:?}"),
        })
        .collect();
    assert_eq!(refusals.len(), 1, "{:?}", a.server_events);
    assert!(check(refusals[0]), "server refusal was {:?}", refusals[0]);
    assert_no_client_events(a);
    assert_logged(a, &refusals[0].to_string(), logged);
}

/// The client refused the server with a refusal matching `check`; the server saw the
/// alert; neither side established anything.
fn assert_client_refused(a: &Attempt, check: impl Fn(&Refusal) -> bool, logged: &str) {
    let refusal = match &a.client {
        Err(ChannelError::Refused(r)) => r,
        other => panic!("client should refuse, got {other:?}"),
    };
    assert!(check(refusal), "client refusal was {refusal:?}");
    for ev in &a.server_events {
        assert!(
            matches!(
                ev,
                ChannelEvent::Refused {
                    refusal: Refusal::RejectedByPeer { .. },
                    ..
                }
            ),
            "unexpected server event {ev:?}"
        );
    }
    assert_no_client_events(a);
    assert_logged(a, &refusal.to_string(), logged);
}

fn assert_no_client_events(a: &Attempt) {
    let events: Vec<_> = a.client_events.try_iter().collect();
    assert!(events.is_empty(), "client events: {events:?}");
}

/// A WARN line "peer channel refused" naming this listener and the reason.
fn assert_logged(a: &Attempt, reason: &str, must_contain: &str) {
    let addr = a.listen_addr.to_string();
    let log = captured();
    let found = log.lines().any(|l| {
        l.contains("WARN")
            && l.contains("peer channel refused")
            && l.contains(&addr)
            && l.contains(reason)
            && l.contains(must_contain)
    });
    assert!(
        found,
        "no refusal log for {addr} with {reason:?} / {must_contain:?} in:\n{log}"
    );
}

struct Pair {
    mesh: Mesh,
    trust: MeshTrust,
}

fn pair() -> Pair {
    capture_logs();
    let mesh = Mesh::new("mesh.test");
    let trust = mesh.trust();
    Pair { mesh, trust }
}

#[test]
fn unknown_ca_is_refused_both_ways() {
    let Pair { mesh, trust } = pair();
    let a = mesh.cluster("a");
    let b = mesh.cluster("b");
    let server = config(&issue(&b, "gw-server"), &trust, 2);
    let client = config(&issue(&a, "gw-client"), &trust, 1);

    // A second mesh with the very same names: right SPIFFE IDs, unknown CA. (The rogue
    // side trusts the real root, so only its own certificate is at fault.)
    let rogue = Mesh::new("mesh.test");
    let rogue_client = config(&issue(&rogue.cluster("a"), "gw-client"), &trust, 9);
    let rogue_server = config(&issue(&rogue.cluster("b"), "gw-server"), &trust, 9);

    let r = attempt(
        server.clone(),
        vec![mesh.id("a", "gw-client")],
        &rogue_client,
        mesh.id("b", "gw-server"),
    );
    assert_server_refused(&r, |r| *r == Refusal::UnknownCa, "unknown CA");

    let r = attempt(
        rogue_server,
        vec![mesh.id("a", "gw-client")],
        &client,
        mesh.id("b", "gw-server"),
    );
    assert_client_refused(&r, |r| *r == Refusal::UnknownCa, "unknown CA");
}

#[test]
fn right_ca_but_wrong_trust_domain_is_refused() {
    capture_logs();
    let mesh = Mesh::new("mesh.test");
    let other = Mesh::new("other.test");
    // Both roots are trusted (e.g. a federation or a bundle mid-rotation).
    let trust = MeshTrust {
        roots: vec![
            mesh.root.certificate().clone(),
            other.root.certificate().clone(),
        ],
        crls: vec![],
    };
    let client = config(&issue(&mesh.cluster("a"), "gw-client"), &trust, 1);
    let server = config(&issue(&mesh.cluster("b"), "gw-server"), &trust, 2);
    let other_server = config(&issue(&other.cluster("b"), "gw-server"), &trust, 3);
    let other_client = config(&issue(&other.cluster("a"), "gw-client"), &trust, 4);

    let r = attempt(
        other_server,
        vec![mesh.id("a", "gw-client")],
        &client,
        mesh.id("b", "gw-server"),
    );
    assert_client_refused(
        &r,
        |r| {
            matches!(r, Refusal::WrongTrustDomain { expected, presented }
            if expected == "mesh.test" && presented.trust_domain().as_str() == "other.test")
        },
        "wrong trust domain",
    );

    let r = attempt(
        server,
        vec![mesh.id("a", "gw-client")],
        &other_client,
        mesh.id("b", "gw-server"),
    );
    assert_server_refused(
        &r,
        |r| matches!(r, Refusal::WrongTrustDomain { .. }),
        "wrong trust domain",
    );
}

#[test]
fn right_trust_domain_but_wrong_cluster_is_refused() {
    let Pair { mesh, trust } = pair();
    let client = config(&issue(&mesh.cluster("a"), "gw-client"), &trust, 1);
    let wrong_cluster_server = config(&issue(&mesh.cluster("c"), "gw-server"), &trust, 2);

    let r = attempt(
        wrong_cluster_server,
        vec![mesh.id("a", "gw-client")],
        &client,
        mesh.id("b", "gw-server"),
    );
    assert_client_refused(
        &r,
        |r| {
            matches!(r, Refusal::WrongCluster { expected, presented }
            if expected == "b" && presented == &mesh.id("c", "gw-server"))
        },
        "wrong cluster",
    );

    let server = config(&issue(&mesh.cluster("b"), "gw-server"), &trust, 2);
    let wrong_cluster_client = config(&issue(&mesh.cluster("z"), "gw-client"), &trust, 3);
    let r = attempt(
        server,
        vec![mesh.id("a", "gw-client")],
        &wrong_cluster_client,
        mesh.id("b", "gw-server"),
    );
    assert_server_refused(
        &r,
        |r| matches!(r, Refusal::WrongCluster { expected, .. } if expected == "a"),
        "wrong cluster",
    );
}

#[test]
fn right_cluster_but_wrong_gateway_name_is_refused() {
    let Pair { mesh, trust } = pair();
    let a = mesh.cluster("a");
    let b = mesh.cluster("b");
    let client = config(&issue(&a, "gw-client"), &trust, 1);
    let impostor = config(&issue(&b, "gw-other"), &trust, 2);

    let r = attempt(
        impostor,
        vec![mesh.id("a", "gw-client")],
        &client,
        mesh.id("b", "gw-server"),
    );
    assert_client_refused(
        &r,
        |r| {
            matches!(r, Refusal::WrongGateway { expected, presented }
            if expected == "gw-server" && presented == &mesh.id("b", "gw-other"))
        },
        "wrong gateway",
    );

    let server = config(&issue(&b, "gw-server"), &trust, 2);
    let sibling = config(&issue(&a, "gw-sibling"), &trust, 3);
    let r = attempt(
        server,
        vec![mesh.id("a", "gw-client")],
        &sibling,
        mesh.id("b", "gw-server"),
    );
    assert_server_refused(
        &r,
        |r| matches!(r, Refusal::WrongGateway { .. }),
        "wrong gateway",
    );
}

#[test]
fn expired_leaf_is_refused() {
    let Pair { mesh, trust } = pair();
    let a = mesh.cluster("a");
    let b = mesh.cluster("b");
    let now = SystemTime::now();
    let server = config(&issue(&b, "gw-server"), &trust, 2);
    let expired_client = config(
        &issue_valid(&a, "gw-client", now - 10 * DAY, now - DAY),
        &trust,
        1,
    );
    let r = attempt(
        server,
        vec![mesh.id("a", "gw-client")],
        &expired_client,
        mesh.id("b", "gw-server"),
    );
    assert_server_refused(&r, |r| *r == Refusal::Expired, "expired");

    let client = config(&issue(&a, "gw-client"), &trust, 1);
    let expired_server = config(
        &issue_valid(
            &b,
            "gw-server",
            now - 10 * DAY,
            now - Duration::from_secs(60),
        ),
        &trust,
        2,
    );
    let r = attempt(
        expired_server,
        vec![mesh.id("a", "gw-client")],
        &client,
        mesh.id("b", "gw-server"),
    );
    assert_client_refused(&r, |r| *r == Refusal::Expired, "expired");
}

#[test]
fn not_yet_valid_leaf_is_refused() {
    let Pair { mesh, trust } = pair();
    let now = SystemTime::now();
    let client = config(&issue(&mesh.cluster("a"), "gw-client"), &trust, 1);
    let future_server = config(
        &issue_valid(&mesh.cluster("b"), "gw-server", now + DAY, now + 10 * DAY),
        &trust,
        2,
    );
    let r = attempt(
        future_server,
        vec![mesh.id("a", "gw-client")],
        &client,
        mesh.id("b", "gw-server"),
    );
    assert_client_refused(&r, |r| *r == Refusal::NotYetValid, "not yet valid");
}

#[test]
fn leaf_revoked_by_crl_is_refused() {
    let Pair { mesh, trust } = pair();
    let a = mesh.cluster("a");
    let b = mesh.cluster("b");
    let revoked_leaf = issue(&a, "gw-client");
    let crl = a
        .crl(
            &[revoked_leaf.serial().clone()],
            1,
            isthmus_certs::Validity::days(7),
        )
        .unwrap();
    let trust_with_crl = MeshTrust {
        roots: trust.roots.clone(),
        crls: vec![crl.der().clone()],
    };
    let server = config(&issue(&b, "gw-server"), &trust_with_crl, 2);

    let r = attempt(
        server.clone(),
        vec![mesh.id("a", "gw-client")],
        &config(&revoked_leaf, &trust, 1),
        mesh.id("b", "gw-server"),
    );
    assert_server_refused(&r, |r| *r == Refusal::Revoked, "revoked");

    // A fresh certificate for the same gateway (new serial) is accepted.
    let r = attempt(
        server,
        vec![mesh.id("a", "gw-client")],
        &config(&issue(&a, "gw-client"), &trust, 1),
        mesh.id("b", "gw-server"),
    );
    let est = r.client.expect("re-issued certificate is accepted");
    est.session.close();
}

#[test]
fn intermediate_revoked_by_root_crl_is_refused() {
    let Pair { mesh, trust } = pair();
    let a = mesh.cluster("a");
    let b = mesh.cluster("b");
    // Serial of the cluster CA, as `show` prints it.
    let a_serial = isthmus_certs::CertificateSummary::from_der(a.certificate())
        .unwrap()
        .serial;
    let crl = mesh
        .root
        .crl(&[a_serial], 1, isthmus_certs::Validity::days(7))
        .unwrap();
    let trust_with_crl = MeshTrust {
        roots: trust.roots.clone(),
        crls: vec![crl.der().clone()],
    };
    let server = config(&issue(&b, "gw-server"), &trust_with_crl, 2);
    let r = attempt(
        server,
        vec![mesh.id("a", "gw-client")],
        &config(&issue(&a, "gw-client"), &trust, 1),
        mesh.id("b", "gw-server"),
    );
    assert_server_refused(&r, |r| *r == Refusal::Revoked, "revoked");
}

#[test]
fn cluster_ca_cannot_vouch_for_another_cluster() {
    let Pair { mesh, trust } = pair();
    let a = mesh.cluster("a");
    // Cluster a's CA key signs a certificate claiming to be cluster b's gateway.
    let dir = std::env::temp_dir().join(format!(
        "isthmus-forge-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    a.save(&dir.join("a.pem"), &dir.join("a.key")).unwrap();
    let ca_key_pem = isthmus_certs::read_private_key_pem(&dir.join("a.key")).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(a.certificate(), ca_key).unwrap();
    let forged_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        mesh.id("b", "gw-server").to_string().try_into().unwrap(),
    )];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = SystemTime::now();
    params.not_before = (now - DAY).into();
    params.not_after = (now + DAY).into();
    params.use_authority_key_identifier_extension = true;
    let forged = params.signed_by(&forged_key, &issuer).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    let forged_server = Arc::new(
        isthmus_identity::ChannelConfig::new(
            isthmus_identity::LocalCredentials {
                chain: vec![forged.der().clone(), a.certificate().clone()],
                key: rustls::pki_types::PrivateKeyDer::Pkcs8(forged_key.serialize_der().into()),
            },
            &trust,
            params_for_forgery(),
        )
        .unwrap()
        .with_timing(timing()),
    );
    let client = config(&issue(&a, "gw-client"), &trust, 1);
    let r = attempt(
        forged_server,
        vec![mesh.id("a", "gw-client")],
        &client,
        mesh.id("b", "gw-server"),
    );
    assert_client_refused(
        &r,
        |r| {
            matches!(r, Refusal::IssuerClusterMismatch { issuer, .. }
            if issuer.to_string() == "spiffe://mesh.test/cluster/a")
        },
        "was issued by the CA of",
    );
}

fn params_for_forgery() -> isthmus_identity::TunnelParams {
    params(66)
}

#[derive(Debug)]
struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
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

#[test]
fn client_without_certificate_is_refused() {
    use std::io::{Read, Write};
    let Pair { mesh, trust } = pair();
    let server = config(&issue(&mesh.cluster("b"), "gw-server"), &trust, 2);
    let (stx, srx) = std::sync::mpsc::channel();
    let listener = isthmus_identity::ChannelListener::bind(
        server,
        "127.0.0.1:0".parse().unwrap(),
        wg(vec![mesh.id("a", "gw-client")]),
    )
    .unwrap()
    .spawn(stx)
    .unwrap();
    let addr = listener.local_addr();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_no_client_auth();
    tls.alpn_protocols = vec![isthmus_identity::channel::ALPN.to_vec()];
    let conn = rustls::ClientConnection::new(Arc::new(tls), addr.ip().into()).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, sock);
    // The client's handshake completes (TLS 1.3); the server's refusal arrives as an alert.
    let _ = stream.write_all(b"\0\0\0\x02{}");
    let mut buf = [0u8; 64];
    let read = stream.read(&mut buf);
    assert!(
        matches!(&read, Err(e) if e.to_string().contains("CertificateRequired")),
        "{read:?}"
    );

    let ev = srx.recv_timeout(Duration::from_secs(5)).unwrap();
    match &ev {
        ChannelEvent::Refused { refusal, .. } => {
            assert_eq!(*refusal, Refusal::NoClientCertificate)
        }
        other => panic!("unexpected {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(srx.try_iter().next().is_none());
    listener.shutdown();
    let log = captured();
    assert!(
        log.lines().any(|l| l.contains("peer channel refused")
            && l.contains(&addr.to_string())
            && l.contains("no client certificate")),
        "{log}"
    );
}

#[test]
fn key_file_with_mode_0644_is_refused_at_load() {
    let Pair { mesh, .. } = pair();
    let leaf = issue(&mesh.cluster("a"), "gw-client");
    let dir = std::env::temp_dir().join(format!(
        "isthmus-keymode-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (chain, key) = (dir.join("gw.pem"), dir.join("gw.key"));
    leaf.save(&chain, &key).unwrap();
    assert!(isthmus_certs::load_credentials(&chain, &key).is_ok());
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = isthmus_certs::load_credentials(&chain, &key).unwrap_err();
    assert!(
        matches!(
            err,
            isthmus_certs::CertError::KeyFileTooOpen { mode: 0o644, .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("0644"));
    std::fs::remove_dir_all(dir).unwrap();
}
