//! Peers configured by identity: the mTLS channel brings their tunnels up.
//!
//! For every peer with a `spiffe_id`, the gateway keeps an authenticated
//! channel (`isthmus-identity`): it dials the peers for which
//! [`should_dial`] says so and accepts the others on its listener. Only a
//! session whose certificate chains to the trust bundle *and* carries
//! exactly the configured SPIFFE ID is [`ChannelEvent::Established`]; the
//! tunnel keys of that peer come from that session and nowhere else:
//!
//! - WireGuard: the peer's static public key from its hello;
//! - ESP: SA keys, salts and SPIs of every generation from the TLS exporter
//!   ([`ChannelKeying`]), so rekeying needs no further message.
//!
//! When the session is lost the tunnel is torn down (its packets are then
//! dropped and counted, never sent in clear) until a new session is up.

use crate::config::{IdentityConfig, IdentityPeer, TunnelKind};
use isthmus_identity::{
    should_dial, ChannelConfig, ChannelError, ChannelEvent, ChannelListener, Established,
    LinkParams, ListenerHandle, PeerEndpoint, PeerLink, PeerSession, SpiffeId, TunnelParams,
};
use isthmus_tunnel::esp::keying::{EspKeying, KeyingError, SaPair};
use isthmus_tunnel::esp::sa::{EspCipher, SaKeys};
use isthmus_tunnel::esp::{EspCore, EspPeer, EspPeerConfig};
use isthmus_tunnel::{PeerConfig, PublicKey, WgCore};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Instant;
use zeroize::Zeroizing;

/// ESP keying from an established channel: generation `g` is the TLS
/// exporter output for context `g`, split into key, salt and SPI. Both
/// ends compute the mirror image, so they agree without another message.
pub struct ChannelKeying {
    session: PeerSession,
    cipher: EspCipher,
    cache: Mutex<HashMap<u64, SaPair>>,
}

impl std::fmt::Debug for ChannelKeying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelKeying")
            .field("peer", &self.session.peer().to_string())
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

/// Generations derived when the channel comes up (at the default soft
/// lifetime, 53 hours' worth), so the data path's rekeys do not wait on the
/// channel; later ones are derived on demand.
const PRECOMPUTED_GENERATIONS: u64 = 64;

impl ChannelKeying {
    pub fn new(session: PeerSession, cipher: EspCipher) -> Result<Self, KeyingError> {
        let keying = Self {
            session,
            cipher,
            cache: Mutex::new(HashMap::new()),
        };
        for generation in 0..PRECOMPUTED_GENERATIONS {
            keying.sa_pair(generation)?;
        }
        Ok(keying)
    }

    fn split(&self, block: &[u8]) -> SaKeys {
        let key_len = self.cipher.key_len();
        let raw_spi = u32::from_be_bytes([
            block[key_len + 4],
            block[key_len + 5],
            block[key_len + 6],
            block[key_len + 7],
        ]);
        SaKeys {
            // Clear of the reserved range 0..=255.
            spi: raw_spi | 0x0100_0000,
            key: Zeroizing::new(block[..key_len].to_vec()),
            salt: [
                block[key_len],
                block[key_len + 1],
                block[key_len + 2],
                block[key_len + 3],
            ],
        }
    }
}

impl EspKeying for ChannelKeying {
    fn cipher(&self) -> EspCipher {
        self.cipher
    }

    fn sa_pair(&self, generation: u64) -> Result<SaPair, KeyingError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pair) = cache.get(&generation) {
            return Ok(pair.clone());
        }
        let block = self
            .session
            .esp_keys(generation, self.cipher.key_len() + 8)
            .map_err(|_| KeyingError::Unavailable(generation))?;
        let pair = SaPair {
            outbound: self.split(&block.outbound),
            inbound: self.split(&block.inbound),
        };
        // Old generations are never asked for again.
        cache.retain(|g, _| *g + 2 >= generation);
        cache.insert(generation, pair.clone());
        Ok(pair)
    }
}

/// What `isthmusctl status` shows of a peer configured by identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChannelStatus {
    pub spiffe_id: String,
    pub name: Option<String>,
    pub kind: String,
    pub channel_endpoint: String,
    /// `up` or `connecting`.
    pub state: String,
    /// Whether this gateway dialed (`dialer`) or accepted (`acceptor`).
    pub role: Option<String>,
    pub up_secs: Option<f64>,
    /// Sessions established since start (a restart of either side adds one).
    pub sessions: u64,
    /// Why the last refused connection attempt was refused, if any.
    pub last_refusal: Option<String>,
}

#[derive(Default)]
struct Link {
    session: Option<PeerSession>,
    role: Option<String>,
    since: Option<Instant>,
    sessions: u64,
    last_refusal: Option<String>,
    wg_key: Option<PublicKey>,
    esp_peer: Option<Arc<EspPeer>>,
}

/// The identity-configured peers of one gateway and their channels.
pub struct MeshLinks {
    wg: Arc<WgCore>,
    esp: Option<Arc<EspCore>>,
    peers: Vec<IdentityPeer>,
    links: Mutex<HashMap<SpiffeId, Link>>,
    /// Dialers and the listener: kept alive as long as the gateway runs.
    _dialers: Mutex<Vec<PeerLink>>,
    _listener: Mutex<Option<ListenerHandle>>,
}

impl std::fmt::Debug for MeshLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshLinks")
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

/// The link parameters announced to (and required from) `peer` in the channel hello: a
/// peer configured with another kind, cipher or ESN is refused with both sides' values
/// instead of bringing up a tunnel whose packets fail their integrity checks.
pub fn link_params(peer: &IdentityPeer) -> LinkParams {
    match (peer.kind, peer.esp) {
        (TunnelKind::Wireguard, _) => LinkParams::Wireguard,
        (TunnelKind::Esp, settings) => {
            // Config validation fills ESP settings for every ESP identity peer; the
            // fallback only mirrors the config defaults (AES-128-GCM, ESN on).
            let (cipher, esn) =
                settings.map_or((EspCipher::Aes128Gcm, true), |s| (s.cipher, s.esn));
            LinkParams::Esp {
                cipher: match cipher {
                    EspCipher::Aes128Gcm => isthmus_identity::EspCipher::Aes128Gcm,
                    EspCipher::Aes256Gcm => isthmus_identity::EspCipher::Aes256Gcm,
                },
                esn,
            }
        }
    }
}

fn resolve(advertised: Option<SocketAddr>, remote: SocketAddr) -> Option<SocketAddr> {
    let ep = advertised?;
    if ep.ip().is_unspecified() {
        Some(SocketAddr::new(remote.ip().to_canonical(), ep.port()))
    } else {
        Some(ep)
    }
}

impl MeshLinks {
    fn links(&self) -> MutexGuard<'_, HashMap<SpiffeId, Link>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the listener, the dialers and the thread that turns channel
    /// events into tunnels.
    pub fn start(
        wg: Arc<WgCore>,
        esp: Option<Arc<EspCore>>,
        peers: Vec<IdentityPeer>,
        identity: &IdentityConfig,
        params: TunnelParams,
    ) -> Result<Arc<Self>, ChannelError> {
        let credentials = isthmus_identity::LocalCredentials {
            chain: identity.credentials.chain.clone(),
            key: identity.credentials.key.clone_key(),
        };
        let config = Arc::new(ChannelConfig::new(credentials, &identity.trust, params)?);
        let local = config.local_id().clone();
        let (events_tx, events_rx) = mpsc::channel();
        let allowed: Vec<(SpiffeId, LinkParams)> = peers
            .iter()
            .map(|p| (p.spiffe_id.clone(), link_params(p)))
            .collect();
        let listener = ChannelListener::bind(config.clone(), identity.listen, allowed)?
            .spawn(events_tx.clone())?;
        tracing::info!(listen = %identity.listen, id = %local, "peer channel listening");
        let mut dialers = Vec::new();
        for peer in &peers {
            if should_dial(&local, &peer.spiffe_id) {
                dialers.push(PeerLink::spawn(
                    config.clone(),
                    PeerEndpoint {
                        id: peer.spiffe_id.clone(),
                        addr: peer.channel_endpoint,
                        link: link_params(peer),
                    },
                    events_tx.clone(),
                )?);
            }
        }
        let links = peers
            .iter()
            .map(|p| (p.spiffe_id.clone(), Link::default()))
            .collect();
        let mesh = Arc::new(Self {
            wg,
            esp,
            peers,
            links: Mutex::new(links),
            _dialers: Mutex::new(dialers),
            _listener: Mutex::new(Some(listener)),
        });
        let worker = mesh.clone();
        std::thread::Builder::new()
            .name("mesh-events".into())
            .spawn(move || {
                for event in events_rx {
                    worker.handle(event);
                }
            })?;
        Ok(mesh)
    }

    fn handle(&self, event: ChannelEvent) {
        match event {
            ChannelEvent::Established(e) => self.established(*e),
            ChannelEvent::Lost { peer, reason } => {
                let mut links = self.links();
                let Some(link) = links.get_mut(&peer) else {
                    return;
                };
                // A late notice about a session already replaced.
                if link.session.as_ref().is_some_and(|s| !s.is_closed()) {
                    return;
                }
                self.teardown(link);
                tracing::warn!(%peer, %reason, "peer channel lost; tunnel down until it is back");
            }
            ChannelEvent::Refused {
                remote,
                role,
                refusal,
            } => {
                tracing::warn!(%remote, %role, %refusal, "peer channel refused; no tunnel brought up");
                let mut links = self.links();
                for peer in &self.peers {
                    let matches = peer.channel_endpoint == remote
                        || peer.channel_endpoint.ip() == remote.ip().to_canonical();
                    if matches {
                        if let Some(link) = links.get_mut(&peer.spiffe_id) {
                            link.last_refusal = Some(refusal.to_string());
                        }
                    }
                }
            }
            ChannelEvent::Message { peer, message } => {
                tracing::debug!(%peer, ?message, "peer channel message");
            }
            other => tracing::debug!(?other, "peer channel event"),
        }
    }

    fn established(&self, e: Established) {
        let Some(cfg) = self.peers.iter().find(|p| p.spiffe_id == e.peer) else {
            tracing::warn!(peer = %e.peer, "session from an identity that is not a configured peer; closing");
            e.session.close();
            return;
        };
        let mut links = self.links();
        let link = links.entry(e.peer.clone()).or_default();
        if let Some(old) = link.session.take() {
            old.close();
        }
        self.teardown(link);
        let result = match cfg.kind {
            TunnelKind::Wireguard => self.wireguard_up(cfg, &e, link),
            TunnelKind::Esp => self.esp_up(cfg, &e, link),
        };
        match result {
            Ok(()) => {
                link.session = Some(e.session);
                link.role = Some(e.role.to_string());
                link.since = Some(Instant::now());
                link.sessions += 1;
                link.last_refusal = None;
                tracing::info!(
                    peer = %e.peer,
                    remote = %e.remote,
                    role = %e.role,
                    kind = cfg.kind.name(),
                    "peer channel established; tunnel configured from it"
                );
            }
            Err(why) => {
                tracing::warn!(peer = %e.peer, %why, "cannot configure the tunnel; closing the session");
                e.session.close();
            }
        }
    }

    fn wireguard_up(
        &self,
        cfg: &IdentityPeer,
        e: &Established,
        link: &mut Link,
    ) -> Result<(), String> {
        let key = e
            .params
            .wireguard_public_key
            .ok_or("the peer offered no WireGuard key")?;
        let endpoint = resolve(e.params.wireguard_endpoint, e.remote)
            .ok_or("the peer offered no WireGuard endpoint")?;
        let key = PublicKey(key);
        let mut taken = false;
        self.wg
            .update_peers(|all| {
                // A key that already belongs to another peer (configured, or
                // another identity's) is refused: one authenticated peer must
                // not be able to take over another peer's tunnel.
                if all.iter().any(|c| c.public_key == key) {
                    taken = true;
                    return;
                }
                all.push(PeerConfig {
                    name: cfg.name.clone(),
                    public_key: key,
                    preshared_key: None,
                    endpoint: Some(endpoint),
                    allowed_prefixes: cfg.allowed_prefixes.clone(),
                    persistent_keepalive: cfg.persistent_keepalive,
                });
            })
            .map_err(|e| e.to_string())?;
        if taken {
            return Err(format!(
                "WireGuard key {key} already belongs to another peer"
            ));
        }
        link.wg_key = Some(key);
        Ok(())
    }

    fn esp_up(&self, cfg: &IdentityPeer, e: &Established, link: &mut Link) -> Result<(), String> {
        let (Some(esp), Some(settings)) = (&self.esp, cfg.esp) else {
            return Err("no ESP data path".into());
        };
        let endpoint =
            resolve(e.params.esp_endpoint, e.remote).ok_or("the peer offered no ESP endpoint")?;
        let keying =
            ChannelKeying::new(e.session.clone(), settings.cipher).map_err(|e| e.to_string())?;
        let peer = esp
            .add_peer(
                EspPeerConfig {
                    name: cfg.name.clone(),
                    endpoint,
                    allowed_prefixes: cfg.allowed_prefixes.clone(),
                    esn: settings.esn,
                    lifetimes: settings.lifetimes,
                    keying: Arc::new(keying),
                },
                Instant::now(),
            )
            .map_err(|e| e.to_string())?;
        link.esp_peer = Some(peer);
        Ok(())
    }

    /// Removes the tunnel state a session brought up.
    fn teardown(&self, link: &mut Link) {
        if let Some(key) = link.wg_key.take() {
            if let Err(e) = self
                .wg
                .update_peers(|all| all.retain(|c| c.public_key != key))
            {
                tracing::warn!(error = %e, "removing a WireGuard peer failed");
            }
        }
        if let (Some(esp), Some(peer)) = (&self.esp, link.esp_peer.take()) {
            esp.remove_peer(&peer);
        }
        link.since = None;
    }

    /// The WireGuard keys whose peers this channel set configured (the
    /// UAPI must not remove or replace them).
    pub fn owned_wireguard_keys(&self) -> Vec<PublicKey> {
        self.links().values().filter_map(|l| l.wg_key).collect()
    }

    pub fn status(&self) -> Vec<ChannelStatus> {
        let links = self.links();
        self.peers
            .iter()
            .map(|p| {
                let link = links.get(&p.spiffe_id);
                let up = link
                    .and_then(|l| l.session.as_ref())
                    .is_some_and(|s| !s.is_closed());
                ChannelStatus {
                    spiffe_id: p.spiffe_id.to_string(),
                    name: p.name.clone(),
                    kind: p.kind.name().to_string(),
                    channel_endpoint: p.channel_endpoint.to_string(),
                    state: if up { "up" } else { "connecting" }.to_string(),
                    role: link.filter(|_| up).and_then(|l| l.role.clone()),
                    up_secs: link
                        .filter(|_| up)
                        .and_then(|l| l.since)
                        .map(|t| t.elapsed().as_secs_f64()),
                    sessions: link.map_or(0, |l| l.sessions),
                    last_refusal: link.and_then(|l| l.last_refusal.clone()),
                }
            })
            .collect()
    }
}
