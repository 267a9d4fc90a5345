//! Live sessions against changing trust: a session established under one trust bundle is
//! checked again when CRLs change or a certificate expires, and new credentials are used
//! by later handshakes without restarting anything.

// Test helpers outside #[test] functions unwrap too (clippy.toml covers only the tests).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use isthmus_identity::{ChannelError, MeshTrust, Refusal};

const DAY: Duration = Duration::from_secs(86_400);

#[test]
fn live_sessions_are_checked_again_for_revocation_and_expiry() {
    let mesh = Mesh::new("mesh.test");
    let trust = mesh.trust();
    let (a, b) = (mesh.cluster("a"), mesh.cluster("b"));
    let now = SystemTime::now();
    let server_leaf = issue_valid(&b, "gw-server", now - DAY, now + 60 * DAY);
    let client_leaf = issue(&a, "gw-client");
    let server = config(&server_leaf, &trust, 2);
    let client = config(&client_leaf, &trust, 1);
    let r = attempt(
        server.clone(),
        vec![mesh.id("a", "gw-client")],
        &client,
        mesh.id("b", "gw-server"),
    );
    let est = r.client.unwrap();
    assert_eq!(
        client.verify_session(&est.session, SystemTime::now()),
        Ok(())
    );

    // Expiry: the session's peer is checked at the time given, and its chain says when
    // it must be checked next.
    let not_after = est.session.peer_not_after().unwrap();
    let leaf_end = now + 60 * DAY;
    assert!(
        not_after <= leaf_end && not_after + Duration::from_secs(2) >= leaf_end,
        "{not_after:?} vs {leaf_end:?}"
    );
    assert_eq!(
        client.verify_session(&est.session, now + 61 * DAY),
        Err(Refusal::Expired)
    );

    // Revocation: a new CRL for cluster b revokes the server's leaf; the live session
    // is refused under the reloaded trust, the other direction is untouched.
    let crl = b
        .crl(
            &[server_leaf.serial().clone()],
            1,
            isthmus_certs::Validity::days(7),
        )
        .unwrap();
    let revoked = MeshTrust {
        roots: trust.roots.clone(),
        crls: vec![crl.der().clone()],
    };
    client.reload_trust(&revoked).unwrap();
    assert_eq!(
        client.verify_session(&est.session, SystemTime::now()),
        Err(Refusal::Revoked)
    );
    // A trust that does not parse is refused and the one in force stays.
    let broken = MeshTrust {
        roots: vec![],
        crls: vec![],
    };
    assert!(matches!(
        client.reload_trust(&broken),
        Err(ChannelError::Trust(_))
    ));
    assert_eq!(
        client.verify_session(&est.session, SystemTime::now()),
        Err(Refusal::Revoked)
    );
    // And a new handshake is refused as well.
    let again = attempt(
        server,
        vec![mesh.id("a", "gw-client")],
        &client,
        mesh.id("b", "gw-server"),
    );
    assert!(matches!(
        again.client,
        Err(ChannelError::Refused(Refusal::Revoked))
    ));
    est.session.close();
}

#[test]
fn new_credentials_serve_later_handshakes() {
    let mesh = Mesh::new("mesh.test");
    let trust = mesh.trust();
    let (a, b) = (mesh.cluster("a"), mesh.cluster("b"));
    let first = issue(&b, "gw-server");
    let server = config(&first, &trust, 2);
    let client = config(&issue(&a, "gw-client"), &trust, 1);
    let dial = || {
        attempt(
            server.clone(),
            vec![mesh.id("a", "gw-client")],
            &client,
            mesh.id("b", "gw-server"),
        )
        .client
        .unwrap()
    };
    let before = dial();
    assert_eq!(before.session.peer_chain()[0], first.chain()[0]);

    let second = issue(&b, "gw-server");
    server
        .reload_credentials(second.credentials().unwrap())
        .unwrap();
    assert_eq!(server.current_leaf().unwrap(), second.chain()[0]);
    let after = dial();
    assert_eq!(after.session.peer_chain()[0], second.chain()[0]);
    // The session made before is still up.
    assert!(!before.session.is_closed());

    // Another gateway's certificate, or a key that does not match, changes nothing.
    let other = issue(&b, "gw-other");
    let err = server
        .reload_credentials(other.credentials().unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("gw-other"), "{err}");
    let mut mismatched = second.credentials().unwrap();
    mismatched.key = other.credentials().unwrap().key;
    assert!(server.reload_credentials(mismatched).is_err());
    assert_eq!(server.current_leaf().unwrap(), second.chain()[0]);
    before.session.close();
    after.session.close();
}
