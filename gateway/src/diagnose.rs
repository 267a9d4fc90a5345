//! `isthmusctl diagnose PEER`: what is wrong with one peer, in one sentence.
//!
//! The verdict comes from two status documents taken `window` apart (the
//! same numbers `isthmusctl status` shows), checked in the order a packet
//! needs them: the mTLS channel (for peers configured by identity) and its
//! certificate, a tunnel configured with keys, a fresh WireGuard handshake,
//! packets arriving from the peer during the window, and drops that grew
//! during it. The first failing check is the sentence; the others are
//! listed too. Packets arriving during the window prove the path from the
//! peer works with the current keys; a quiet peer (no traffic, no
//! persistent keepalive) cannot show that, and the verdict says so.

use crate::admin::{PeerStatus, Status};
use crate::mesh::ChannelStatus;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// WireGuard's REJECT_AFTER_TIME: a session older than this carries nothing.
const REJECT_AFTER: f64 = 180.0;
/// A peer certificate expiring sooner than this is reported.
const EXPIRY_WARNING: u64 = 7 * 86_400;

/// One check of a diagnosis.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// The verdict on one peer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Diagnosis {
    pub peer: String,
    pub healthy: bool,
    /// What is wrong (or that nothing is), in one sentence.
    pub summary: String,
    pub checks: Vec<Check>,
}

fn find_channel<'a>(s: &'a Status, peer: &str) -> Option<&'a ChannelStatus> {
    s.channels
        .iter()
        .find(|c| c.name.as_deref() == Some(peer) || c.spiffe_id == peer)
}

/// The tunnel of `peer`: for a peer configured by identity the one its
/// channel brought up (by its WireGuard key, or its name and kind), never
/// another peer that merely shares a name.
fn find_peer<'a>(
    s: &'a Status,
    peer: &str,
    channel: Option<&ChannelStatus>,
) -> Option<&'a PeerStatus> {
    match channel {
        Some(c) => match (&c.wireguard_key, &c.name) {
            (Some(key), _) => s.peers.iter().find(|p| p.public_key.as_ref() == Some(key)),
            (None, Some(name)) => s
                .peers
                .iter()
                .find(|p| p.name.as_ref() == Some(name) && p.kind == c.kind),
            (None, None) => None,
        },
        None => s
            .peers
            .iter()
            .find(|p| p.name.as_deref() == Some(peer) || p.public_key.as_deref() == Some(peer)),
    }
}

fn drops_total(p: &PeerStatus) -> u64 {
    let d = &p.drops;
    d.no_session + d.bad_source + d.decrypt_failure + d.replay + d.too_old
}

/// Diagnoses `peer` (its name, SPIFFE ID or WireGuard public key) from a
/// status taken before and one taken `window` later; `now_unix` is the time
/// of `after`. `None` when no such peer exists.
pub fn diagnose(
    before: &Status,
    after: &Status,
    peer: &str,
    window: Duration,
    now_unix: u64,
) -> Option<Diagnosis> {
    let channel = find_channel(after, peer);
    let tunnel = find_peer(after, peer, channel);
    if channel.is_none() && tunnel.is_none() {
        return None;
    }
    let mut checks = Vec::new();
    let mut check = |name: &str, ok: bool, detail: String| {
        checks.push(Check {
            name: name.into(),
            ok,
            detail,
        })
    };
    if let Some(c) = channel {
        let detail = match (c.state.as_str(), &c.last_refusal) {
            ("up", _) => format!("up with {} ({} session(s))", c.spiffe_id, c.sessions),
            (state, Some(why)) => format!(
                "{state}: the last attempt was refused: {why}"
            ),
            ("down", None) => format!(
                "down (lost); the tunnel is kept for {:.0} s more",
                c.tunnel_expires_secs.unwrap_or(0.0)
            ),
            (state, None) => format!(
                "{state}: no session with {} at {} yet (is it reachable, is its channel port open?)",
                c.spiffe_id, c.channel_endpoint
            ),
        };
        check("channel", c.state == "up", detail);
        if let Some(expires) = c.peer_cert_expires_unix {
            let left = expires.saturating_sub(now_unix);
            check(
                "certificate",
                left > EXPIRY_WARNING,
                if left == 0 {
                    "the peer's certificate has expired".into()
                } else {
                    format!(
                        "the peer's certificate (serial {}) expires in {:.1} days",
                        c.peer_serial.as_deref().unwrap_or("?"),
                        left as f64 / 86_400.0
                    )
                },
            );
        }
    }
    let Some(p) = tunnel else {
        check(
            "tunnel",
            false,
            "no tunnel is configured for this peer: its channel has not keyed one".into(),
        );
        return Some(verdict(peer, checks));
    };
    check(
        "tunnel",
        true,
        format!(
            "{} tunnel to {}",
            p.kind,
            p.endpoint.as_deref().unwrap_or("(no endpoint yet)")
        ),
    );
    if p.kind == "wireguard" {
        let (ok, detail) = match p.last_handshake_secs_ago {
            None => (false, "no WireGuard handshake has completed: the peer does not answer on its endpoint, or the keys do not match".to_string()),
            Some(age) if age >= REJECT_AFTER => (false, format!("the last handshake was {age:.0} s ago: the session has expired and no new one completed")),
            Some(age) => (true, format!("last handshake {age:.0} s ago")),
        };
        check("handshake", ok, detail);
    }
    if let Some(esp) = &p.esp {
        check(
            "sa",
            !esp.rotation_pending,
            format!(
                "outbound SPI {} generation {}{}",
                esp.outbound.spi,
                esp.outbound.generation,
                if esp.rotation_pending {
                    ", a rotation waits for traffic to the peer"
                } else {
                    ""
                }
            ),
        );
    }
    let earlier = find_peer(before, peer, find_channel(before, peer));
    let received = earlier.map_or(0, |e| p.rx_packets.saturating_sub(e.rx_packets));
    let secs = window.as_secs_f64();
    check(
        "packets",
        received > 0,
        if received > 0 {
            format!("{received} packet(s) arrived from the peer in {secs:.1} s")
        } else {
            format!(
                "no packet arrived from the peer in {secs:.1} s (sent {} meanwhile); a quiet peer \
                 without persistent_keepalive also shows this",
                earlier.map_or(0, |e| p.tx_packets.saturating_sub(e.tx_packets))
            )
        },
    );
    let dropped = earlier.map_or(0, |e| drops_total(p).saturating_sub(drops_total(e)));
    check(
        "drops",
        dropped == 0,
        if dropped == 0 {
            "no packet of the peer dropped".into()
        } else {
            format!(
                "{dropped} packet(s) of the peer dropped in {secs:.1} s (now: {:?})",
                p.drops
            )
        },
    );
    Some(verdict(peer, checks))
}

fn verdict(peer: &str, checks: Vec<Check>) -> Diagnosis {
    let summary = match checks.iter().find(|c| !c.ok) {
        None => format!("{peer} is healthy: channel, keys and traffic from it are fine"),
        Some(c) => format!("{peer}: {}: {}", c.name, c.detail),
    };
    Diagnosis {
        peer: peer.to_string(),
        healthy: checks.iter().all(|c| c.ok),
        summary,
        checks,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(
        rx: u64,
        handshake: Option<f64>,
        decrypt_failures: u64,
        channel: serde_json::Value,
    ) -> Status {
        serde_json::from_value(json!({
            "interface": "ist0", "public_key": "pub", "listen_port": 51820, "mtu": 1420,
            "offload": false, "drops": {"no_route": 0, "malformed": 0, "unknown_peer": 0},
            "peers": [{
                "name": "b", "kind": "wireguard", "public_key": "KEY", "endpoint": "192.0.2.2:51820",
                "allowed_prefixes": [], "last_handshake_secs_ago": handshake, "handshakes": 1,
                "rx_bytes": rx * 100, "tx_bytes": 0, "rx_packets": rx, "tx_packets": 5,
                "drops": {"no_session": 0, "bad_source": 0, "decrypt_failure": decrypt_failures,
                          "replay": 0, "too_old": 0},
                "esp": null
            }],
            "channels": [channel],
        }))
        .unwrap()
    }

    fn channel(state: &str, refusal: Option<&str>, expires: u64) -> serde_json::Value {
        json!({
            "spiffe_id": "spiffe://td/cluster/b/gateway/gw", "name": "b", "kind": "wireguard",
            "channel_endpoint": "192.0.2.2:7443", "state": state, "tunnel": true,
            "role": "dialer", "up_secs": 5.0, "sessions": 1, "last_refusal": refusal,
            "peer_serial": "01:02", "peer_cert_expires_unix": expires, "wireguard_key": "KEY"
        })
    }

    const NOW: u64 = 1_800_000_000;
    const W: Duration = Duration::from_secs(3);

    #[test]
    fn a_working_peer_is_healthy_by_name_id_or_key() {
        let up = channel("up", None, NOW + 90 * 86_400);
        let (before, after) = (
            status(10, Some(5.0), 0, up.clone()),
            status(14, Some(8.0), 0, up),
        );
        for who in ["b", "spiffe://td/cluster/b/gateway/gw", "KEY"] {
            let d = diagnose(&before, &after, who, W, NOW).unwrap();
            assert!(d.healthy, "{d:#?}");
            assert!(d.summary.contains("healthy"), "{}", d.summary);
        }
        assert!(diagnose(&before, &after, "nobody", W, NOW).is_none());
    }

    /// Found by review: a channel was matched to a tunnel by name only, so a
    /// static peer of the same name could stand in for it.
    #[test]
    fn a_channel_is_matched_to_its_own_tunnel() {
        let mut ch = channel("up", None, NOW + 90 * 86_400);
        ch["wireguard_key"] = json!("OTHER");
        let (before, after) = (
            status(10, Some(5.0), 0, ch.clone()),
            status(14, Some(8.0), 0, ch),
        );
        let d = diagnose(&before, &after, "spiffe://td/cluster/b/gateway/gw", W, NOW).unwrap();
        assert!(!d.healthy, "{d:#?}");
        assert!(d.summary.contains("no tunnel"), "{}", d.summary);
    }

    #[test]
    fn the_first_broken_step_is_the_sentence() {
        let up = channel("up", None, NOW + 90 * 86_400);
        let cases = [
            (
                status(
                    10,
                    Some(5.0),
                    0,
                    channel("connecting", Some("certificate revoked by a CRL"), NOW),
                ),
                status(
                    10,
                    Some(5.0),
                    0,
                    channel("connecting", Some("certificate revoked by a CRL"), NOW),
                ),
                "channel: connecting: the last attempt was refused: certificate revoked",
            ),
            (
                status(10, Some(5.0), 0, channel("up", None, NOW + 86_400)),
                status(11, Some(6.0), 0, channel("up", None, NOW + 86_400)),
                "certificate: the peer's certificate (serial 01:02) expires in 1.0 days",
            ),
            (
                status(0, None, 0, up.clone()),
                status(0, None, 0, up.clone()),
                "handshake: no WireGuard handshake has completed",
            ),
            (
                status(10, Some(500.0), 0, up.clone()),
                status(10, Some(503.0), 0, up.clone()),
                "handshake: the last handshake was 503 s ago",
            ),
            (
                status(10, Some(5.0), 0, up.clone()),
                status(10, Some(8.0), 0, up.clone()),
                "packets: no packet arrived from the peer in 3.0 s",
            ),
            (
                status(10, Some(5.0), 2, up.clone()),
                status(12, Some(8.0), 9, up),
                "drops: 7 packet(s) of the peer dropped",
            ),
        ];
        for (before, after, want) in cases {
            let d = diagnose(&before, &after, "b", W, NOW).unwrap();
            assert!(!d.healthy, "{d:#?}");
            assert!(
                d.summary.starts_with(&format!("b: {want}")),
                "{}",
                d.summary
            );
        }
    }
}
