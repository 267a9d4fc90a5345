//! Who may change which WireGuard peer.
//!
//! - [`apply_uapi`]: what a `set=1` request on the UAPI socket may do. The
//!   private key and listen port are fixed at start (a request may only
//!   restate them), fwmark is not supported, and peers brought up by an
//!   mTLS channel (`owned`) belong to their channel: the UAPI can neither
//!   change, remove nor replace them, nor take their prefixes.
//! - [`check_wireguard_claim`]: which static key an authenticated identity
//!   may bring up a tunnel with: not this gateway's own key, not one that
//!   another peer (configured or another identity's) already has, and not a
//!   key without a usable Diffie-Hellman result.

use crate::uapi::{KeyUpdate, PeerUpdate, SetRequest, UapiError};
use isthmus_tunnel::{IpPrefix, PeerConfig, PublicKey};

/// What a UAPI request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct UapiFacts<'a> {
    /// The port the gateway listens on.
    pub listen_port: u16,
    /// Keys of the peers brought up by an mTLS channel.
    pub owned: &'a [PublicKey],
    /// The prefixes of every peer configured by identity (WireGuard or ESP,
    /// its channel up or not): no UAPI peer may claim an overlapping one.
    pub protected: &'a [IpPrefix],
}

/// The peer list after `req`, or why the request is refused (then nothing
/// changes). `restates_own_key` says whether a private key in the request
/// is the one the gateway already has.
pub fn apply_uapi(
    current: &[PeerConfig],
    req: SetRequest,
    facts: UapiFacts<'_>,
    restates_own_key: impl Fn(&[u8; 32]) -> bool,
) -> Result<Vec<PeerConfig>, UapiError> {
    let restated = match &req.private_key {
        None => true,
        Some(KeyUpdate::Set(k)) => restates_own_key(k),
        Some(KeyUpdate::Clear) => false,
    };
    if !restated {
        return Err(UapiError::Rejected(
            "changing the private key at run time is not supported; set private_key_file and restart".into(),
        ));
    }
    if req.listen_port.is_some_and(|p| p != facts.listen_port) {
        return Err(UapiError::Rejected(
            "changing the listen port at run time is not supported; set listen_port and restart"
                .into(),
        ));
    }
    if req.fwmark.is_some_and(|m| m != 0) {
        return Err(UapiError::Rejected("fwmark is not supported".into()));
    }
    let owned = facts.owned;
    if let Some(update) = req
        .peers
        .iter()
        .find(|u| owned.contains(&PublicKey(u.public_key)))
    {
        return Err(UapiError::Rejected(format!(
            "peer {} is configured by its mTLS channel; change it in the config",
            PublicKey(update.public_key)
        )));
    }
    // Peers brought up by identity stay, even with replace_peers.
    let mut peers: Vec<PeerConfig> = if req.replace_peers {
        current
            .iter()
            .filter(|c| owned.contains(&c.public_key))
            .cloned()
            .collect()
    } else {
        current.to_vec()
    };
    apply_updates(&mut peers, req.peers, owned, facts.protected)?;
    Ok(peers)
}

/// Applies UAPI peer updates to a peer list (WireGuard semantics).
fn apply_updates(
    peers: &mut Vec<PeerConfig>,
    updates: Vec<PeerUpdate>,
    owned: &[PublicKey],
    protected: &[IpPrefix],
) -> Result<(), UapiError> {
    for update in updates {
        let key = PublicKey(update.public_key);
        let pos = peers.iter().position(|p| p.public_key == key);
        if update.remove {
            if let Some(i) = pos {
                peers.remove(i);
            }
            continue;
        }
        let i = match pos {
            Some(i) => i,
            None if update.update_only => continue,
            None => {
                peers.push(PeerConfig {
                    name: None,
                    public_key: key,
                    previous_keys: Vec::new(),
                    preshared_key: None,
                    endpoint: None,
                    allowed_prefixes: Vec::new(),
                    persistent_keepalive: None,
                });
                peers.len() - 1
            }
        };
        let to_prefix = |(addr, len): &(std::net::IpAddr, u8)| {
            IpPrefix::new_truncating(*addr, *len).map_err(|e| UapiError::Rejected(e.to_string()))
        };
        let added = update
            .allowed_ips
            .iter()
            .map(to_prefix)
            .collect::<Result<Vec<_>, _>>()?;
        let removed = update
            .remove_allowed_ips
            .iter()
            .map(to_prefix)
            .collect::<Result<Vec<_>, _>>()?;
        // A prefix of a peer brought up by its mTLS channel stays with it.
        if let Some((p, owner)) = added.iter().find_map(|p| {
            peers
                .iter()
                .find(|o| owned.contains(&o.public_key) && o.allowed_prefixes.contains(p))
                .map(|o| (p, o.public_key))
        }) {
            return Err(UapiError::Rejected(format!(
                "prefix {p} belongs to peer {owner}, which is configured by its mTLS channel"
            )));
        }
        // Nor may a UAPI peer route a part of it, or a range around it (WireGuard
        // is routed before ESP, and longest-prefix match takes a more specific one).
        if let Some((p, q)) = added
            .iter()
            .find_map(|p| protected.iter().find(|q| q.overlaps(p)).map(|q| (p, q)))
        {
            return Err(UapiError::Rejected(format!(
                "prefix {p} overlaps {q}, a prefix of a peer configured by its mTLS channel"
            )));
        }
        // WireGuard semantics: a prefix moves to the peer that claims it last.
        for other in peers.iter_mut().filter(|p| p.public_key != key) {
            other.allowed_prefixes.retain(|p| !added.contains(p));
        }
        let peer = &mut peers[i];
        match update.preshared_key {
            Some(KeyUpdate::Set(k)) => peer.preshared_key = Some(k),
            Some(KeyUpdate::Clear) => peer.preshared_key = None,
            None => {}
        }
        if let Some(ep) = update.endpoint {
            peer.endpoint = Some(ep);
        }
        if let Some(k) = update.persistent_keepalive_interval {
            peer.persistent_keepalive = (k > 0).then_some(k);
        }
        if update.replace_allowed_ips {
            peer.allowed_prefixes.clear();
        }
        for p in added {
            if !peer.allowed_prefixes.contains(&p) {
                peer.allowed_prefixes.push(p);
            }
        }
        peer.allowed_prefixes.retain(|p| !removed.contains(p));
    }
    Ok(())
}

/// Why an identity may not bring up a tunnel with the key it offered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimRefusal {
    #[error("WireGuard key {0} is this gateway's own key")]
    OwnKey(PublicKey),
    #[error("WireGuard key {0} already belongs to another peer")]
    Taken(PublicKey),
    #[error("WireGuard key {0} is a low-order point (no shared secret)")]
    LowOrder(PublicKey),
}

/// Whether an authenticated identity may bring up a tunnel with `key`, given
/// this gateway's own key and the peers configured now.
pub fn check_wireguard_claim(
    key: &PublicKey,
    own: &PublicKey,
    current: &[PeerConfig],
) -> Result<(), ClaimRefusal> {
    if key == own {
        return Err(ClaimRefusal::OwnKey(*key));
    }
    if current.iter().any(|c| c.public_key == *key) {
        return Err(ClaimRefusal::Taken(*key));
    }
    if key.is_low_order() {
        return Err(ClaimRefusal::LowOrder(*key));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_tunnel::PrivateKey;

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    fn peer(key: PublicKey, prefixes: &[&str]) -> PeerConfig {
        PeerConfig {
            name: None,
            public_key: key,
            previous_keys: Vec::new(),
            preshared_key: None,
            endpoint: None,
            allowed_prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    fn update(key: PublicKey) -> PeerUpdate {
        PeerUpdate {
            public_key: key.0,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive_interval: None,
            replace_allowed_ips: false,
            allowed_ips: vec![],
            remove_allowed_ips: vec![],
        }
    }

    fn request(peers: Vec<PeerUpdate>) -> SetRequest {
        SetRequest {
            private_key: None,
            listen_port: None,
            fwmark: None,
            replace_peers: false,
            peers,
        }
    }

    fn facts(owned: &[PublicKey]) -> UapiFacts<'_> {
        UapiFacts {
            listen_port: 51820,
            owned,
            protected: &[],
        }
    }

    fn rejected(r: Result<Vec<PeerConfig>, UapiError>) -> String {
        match r {
            Err(UapiError::Rejected(why)) => why,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn uapi_may_only_restate_fixed_settings() {
        let current = vec![peer(key(), &["10.1.0.0/16"])];
        let mut req = request(vec![]);
        req.private_key = Some(KeyUpdate::Set([7; 32]));
        assert!(rejected(apply_uapi(&current, req, facts(&[]), |_| false)).contains("private key"));
        let mut req = request(vec![]);
        req.private_key = Some(KeyUpdate::Set([7; 32]));
        assert_eq!(
            apply_uapi(&current, req, facts(&[]), |k| *k == [7; 32]).unwrap(),
            current
        );
        let mut req = request(vec![]);
        req.private_key = Some(KeyUpdate::Clear);
        assert!(rejected(apply_uapi(&current, req, facts(&[]), |_| true)).contains("private key"));
        let mut req = request(vec![]);
        req.listen_port = Some(51821);
        assert!(rejected(apply_uapi(&current, req, facts(&[]), |_| true)).contains("listen port"));
        let mut req = request(vec![]);
        req.listen_port = Some(51820);
        req.fwmark = Some(0);
        assert!(apply_uapi(&current, req, facts(&[]), |_| true).is_ok());
        let mut req = request(vec![]);
        req.fwmark = Some(3);
        assert!(rejected(apply_uapi(&current, req, facts(&[]), |_| true)).contains("fwmark"));
    }

    #[test]
    fn uapi_cannot_touch_peers_of_mtls_channels() {
        let (mesh, plain) = (key(), key());
        let current = vec![peer(mesh, &["10.1.0.0/16"]), peer(plain, &["10.2.0.0/16"])];
        let owned = [mesh];
        // Change or remove it: refused, naming the peer.
        let mut change = update(mesh);
        change.endpoint = Some("192.0.2.9:51820".parse().unwrap());
        let why = rejected(apply_uapi(
            &current,
            request(vec![change]),
            facts(&owned),
            |_| true,
        ));
        assert!(
            why.contains(&mesh.to_string()) && why.contains("mTLS"),
            "{why}"
        );
        let mut remove = update(mesh);
        remove.remove = true;
        rejected(apply_uapi(
            &current,
            request(vec![remove]),
            facts(&owned),
            |_| true,
        ));
        // replace_peers drops the others but keeps it.
        let mut replace = request(vec![]);
        replace.replace_peers = true;
        let after = apply_uapi(&current, replace, facts(&owned), |_| true).unwrap();
        assert_eq!(after, vec![current[0].clone()]);
        // Taking its prefix away (WireGuard's "last claim wins") is refused too.
        let mut steal = update(plain);
        steal.allowed_ips = vec![("10.1.0.0".parse().unwrap(), 16)];
        let why = rejected(apply_uapi(
            &current,
            request(vec![steal]),
            facts(&owned),
            |_| true,
        ));
        assert!(why.contains("10.1.0.0/16") && why.contains("mTLS"), "{why}");
        // Between peers the UAPI owns, the last claim wins as in WireGuard.
        let other = key();
        let mut claim = update(other);
        claim.allowed_ips = vec![("10.2.0.0".parse().unwrap(), 16)];
        let after = apply_uapi(&current, request(vec![claim]), facts(&owned), |_| true).unwrap();
        assert_eq!(after[1].allowed_prefixes, vec![]);
        assert_eq!(
            after[2].allowed_prefixes,
            vec!["10.2.0.0/16".parse().unwrap()]
        );
    }

    /// Found by review: only an exact prefix was protected, and only of WireGuard
    /// peers whose channel was up.
    #[test]
    fn uapi_cannot_route_into_or_around_prefixes_of_identity_peers() {
        let current = vec![peer(key(), &["10.9.0.0/16"])];
        // An ESP identity peer's /24 and a WireGuard identity peer's /16.
        let protected: Vec<IpPrefix> = ["100.64.2.0/24", "10.1.0.0/16"]
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        let facts = UapiFacts {
            listen_port: 51820,
            owned: &[],
            protected: &protected,
        };
        for (prefix, len) in [
            ("100.64.0.0", 16),
            ("10.1.2.0", 24),
            ("0.0.0.0", 0),
            ("100.64.2.0", 24),
        ] {
            let mut u = update(key());
            u.allowed_ips = vec![(prefix.parse().unwrap(), len)];
            let why = rejected(apply_uapi(&current, request(vec![u]), facts, |_| true));
            assert!(why.contains("overlaps"), "{prefix}/{len}: {why}");
        }
        let mut fine = update(key());
        fine.allowed_ips = vec![("10.2.0.0".parse().unwrap(), 16)];
        assert!(apply_uapi(&current, request(vec![fine]), facts, |_| true).is_ok());
    }

    #[test]
    fn uapi_updates_follow_wireguard_semantics() {
        let a = key();
        let current = vec![peer(a, &["10.1.0.0/16", "10.3.0.0/16"])];
        let mut u = update(a);
        u.remove_allowed_ips = vec![("10.3.0.0".parse().unwrap(), 16)];
        u.persistent_keepalive_interval = Some(0);
        u.preshared_key = Some(KeyUpdate::Set([1; 32]));
        let after = apply_uapi(&current, request(vec![u]), facts(&[]), |_| true).unwrap();
        assert_eq!(
            after[0].allowed_prefixes,
            vec!["10.1.0.0/16".parse().unwrap()]
        );
        assert_eq!(after[0].preshared_key, Some([1; 32]));
        let mut only = update(key());
        only.update_only = true;
        assert_eq!(
            apply_uapi(&after, request(vec![only]), facts(&[]), |_| true).unwrap(),
            after
        );
        let mut bad = update(a);
        bad.allowed_ips = vec![("10.0.0.0".parse().unwrap(), 40)];
        rejected(apply_uapi(&after, request(vec![bad]), facts(&[]), |_| true));
    }

    #[test]
    fn an_identity_claims_only_a_fresh_usable_key() {
        let own = key();
        let (taken, fresh) = (key(), key());
        let current = vec![peer(taken, &["10.1.0.0/16"])];
        assert_eq!(check_wireguard_claim(&fresh, &own, &current), Ok(()));
        assert_eq!(
            check_wireguard_claim(&own, &own, &current),
            Err(ClaimRefusal::OwnKey(own))
        );
        assert_eq!(
            check_wireguard_claim(&taken, &own, &current),
            Err(ClaimRefusal::Taken(taken))
        );
        // All zeros and u = 1, two low-order points: no shared secret with anyone.
        for low in [[0u8; 32], {
            let mut p = [0u8; 32];
            p[0] = 1;
            p
        }] {
            let low = PublicKey(low);
            assert_eq!(
                check_wireguard_claim(&low, &own, &current),
                Err(ClaimRefusal::LowOrder(low))
            );
        }
    }
}
