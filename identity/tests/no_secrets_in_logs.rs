//! Key material never reaches the logs: a full session (handshake, rekey messages, key
//! derivation, loss, reconnect, refusals) runs under a TRACE-level subscriber, and the
//! captured text is searched for every secret in every common encoding.

// Test helpers outside #[test] functions unwrap too (clippy.toml covers only the tests).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use isthmus_identity::{ChannelEvent, ChannelListener, ControlMessage, PeerEndpoint, PeerLink};

fn encodings(secret: &[u8]) -> Vec<String> {
    let hex_lower: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let hex_upper = hex_lower.to_uppercase();
    let colon: Vec<String> = secret.iter().map(|b| format!("{b:02x}")).collect();
    let decimal: Vec<String> = secret.iter().map(|b| b.to_string()).collect();
    vec![
        hex_lower,
        hex_upper,
        colon.join(":"),
        // Debug of a byte slice / Vec<u8>.
        format!("{:?}", secret),
        decimal.join(", "),
        base64_std(secret),
    ]
}

fn base64_std(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn key_material_never_appears_in_logs() {
    capture_logs();
    let mesh = Mesh::new("mesh.test");
    let trust = mesh.trust();
    let client_leaf = issue(&mesh.cluster("a"), "gw-client");
    let server_leaf = issue(&mesh.cluster("b"), "gw-server");
    let client_cfg = config(&client_leaf, &trust, 1);
    let server_cfg = config(&server_leaf, &trust, 2);

    let (stx, srx) = mpsc::channel();
    let listener = ChannelListener::bind(
        server_cfg.clone(),
        "127.0.0.1:0".parse().unwrap(),
        wg(vec![mesh.id("a", "gw-client")]),
    )
    .unwrap()
    .spawn(stx)
    .unwrap();
    let (ctx, crx) = mpsc::channel();
    let link = PeerLink::spawn(
        client_cfg.clone(),
        PeerEndpoint {
            id: mesh.id("b", "gw-server"),
            addr: listener.local_addr(),
            link: isthmus_identity::LinkParams::Wireguard,
        },
        ctx,
    )
    .unwrap();

    let mut secrets: Vec<Vec<u8>> = Vec::new();
    let mut debug_dumps = String::new();
    let next = |rx: &mpsc::Receiver<ChannelEvent>| rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let ChannelEvent::Established(client) = next(&crx) else {
        panic!("client not established")
    };
    let ChannelEvent::Established(server) = next(&srx) else {
        panic!("server not established")
    };
    debug_dumps.push_str(&format!(
        "{client:?}\n{server:?}\n{client_cfg:?}\n{link:?}\n"
    ));
    for generation in 0..4 {
        let keys = client.session.esp_keys(generation, 36).unwrap();
        debug_dumps.push_str(&format!("{keys:?}\n"));
        secrets.push(keys.outbound.to_vec());
        secrets.push(keys.inbound.to_vec());
        client
            .session
            .send(ControlMessage::Rekey { generation })
            .unwrap();
    }
    secrets.push(server.keys.outbound.to_vec());
    // Let pings and messages flow, then lose and re-establish the session.
    std::thread::sleep(Duration::from_millis(250));
    server.session.close();
    let reconnected = loop {
        if let ChannelEvent::Established(est) = next(&crx) {
            break est;
        }
    };
    secrets.push(reconnected.keys.outbound.to_vec());
    secrets.push(reconnected.keys.inbound.to_vec());
    link.shutdown();
    listener.shutdown();

    // Private keys: DER, and each base64 line of the PEM body.
    let mut pem_lines = Vec::new();
    for leaf in [&client_leaf, &server_leaf] {
        let der = leaf.private_key_der().unwrap();
        secrets.push(der.secret_der().to_vec());
        debug_dumps.push_str(&format!("{leaf:?}\n{:?}\n", leaf.credentials().unwrap()));
        pem_lines.extend(
            leaf.private_key_pem()
                .lines()
                .filter(|l| !l.starts_with("-----") && l.len() > 16)
                .map(str::to_owned),
        );
    }

    let log = captured();
    assert!(
        log.contains("peer channel established"),
        "capture works:\n{log}"
    );
    assert!(log.contains("TRACE"), "TRACE events are captured:\n{log}");
    for haystack in [&log, &debug_dumps] {
        for secret in &secrets {
            for encoded in encodings(secret) {
                assert!(!haystack.contains(&encoded), "secret found: {encoded}");
            }
            // Also any 12-byte window, hex-encoded (catches partial dumps).
            for window in secret.windows(12) {
                let hex: String = window.iter().map(|b| format!("{b:02x}")).collect();
                assert!(!haystack.contains(&hex), "partial secret found: {hex}");
            }
        }
        for line in &pem_lines {
            assert!(
                !haystack.contains(line.as_str()),
                "private key PEM line found"
            );
        }
    }
}
