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
//! When the session is lost the tunnel keeps the keys it has (the data path
//! outlives the control plane: WireGuard rekeys with the static keys it was
//! given, ESP has 64 SA generations derived ahead) for
//! [`MeshLinks::keep_tunnel`]; after that it is torn down (its packets are
//! then dropped and counted, never sent in clear) until a new session is up.
//! Peers come from the config (static) and from the clustermesh API
//! ([`MeshLinks::set_mesh_peers`]); a peer removed from the mesh is torn
//! down at once.

use crate::config::{IdentityConfig, IdentityPeer, TunnelKind};
use isthmus_identity::{
    should_dial, ChannelConfig, ChannelError, ChannelEvent, ChannelListener, ControlMessage,
    Established, LinkParams, ListenerHandle, PeerEndpoint, PeerLink, PeerSession, SpiffeId,
    TunnelParams, WireguardKeys,
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
    cache: Mutex<GenerationCache>,
}

/// The SA pairs of the generations derived so far: the ones precomputed
/// when the channel came up, and later ones down to two below the newest
/// request (the data path keeps a lookahead of two past the one in use).
#[derive(Default)]
struct GenerationCache {
    pairs: std::collections::BTreeMap<u64, SaPair>,
}

impl GenerationCache {
    /// Derives generations `0..count` ahead of use.
    fn precompute(
        &mut self,
        count: u64,
        mut derive: impl FnMut(u64) -> Result<SaPair, KeyingError>,
    ) -> Result<(), KeyingError> {
        for generation in 0..count {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.pairs.entry(generation) {
                slot.insert(derive(generation)?);
            }
        }
        Ok(())
    }

    fn get(
        &mut self,
        generation: u64,
        derive: impl FnOnce(u64) -> Result<SaPair, KeyingError>,
    ) -> Result<SaPair, KeyingError> {
        let pair = match self.pairs.get(&generation) {
            Some(pair) => pair.clone(),
            None => {
                let pair = derive(generation)?;
                self.pairs.insert(generation, pair.clone());
                pair
            }
        };
        // The precomputed generations stay: the two directions move through
        // generations independently (an operator may rotate one far ahead),
        // and the data path should not have to derive them again.
        self.pairs
            .retain(|g, _| *g + 2 >= generation || *g < PRECOMPUTED_GENERATIONS);
        Ok(pair)
    }
}

impl std::fmt::Debug for ChannelKeying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelKeying")
            .field("peer", &self.session.peer().to_string())
            .field("cipher", &self.cipher)
            .finish_non_exhaustive()
    }
}

/// How often lost channels and expiring peer certificates are looked at.
pub const CHECK_TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// Generations derived when the channel comes up (at the default soft
/// lifetime, 53 hours' worth), so the data path's rekeys do not wait on the
/// channel; later ones are derived on demand.
const PRECOMPUTED_GENERATIONS: u64 = 64;

impl ChannelKeying {
    pub fn new(session: PeerSession, cipher: EspCipher) -> Result<Self, KeyingError> {
        let keying = Self {
            session,
            cipher,
            cache: Mutex::new(GenerationCache::default()),
        };
        keying
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .precompute(PRECOMPUTED_GENERATIONS, |g| keying.derive(g))?;
        Ok(keying)
    }

    fn derive(&self, generation: u64) -> Result<SaPair, KeyingError> {
        let block = self
            .session
            .esp_keys(generation, self.cipher.key_len() + 8)
            .map_err(|_| KeyingError::Unavailable(generation))?;
        Ok(SaPair {
            outbound: self.split(&block.outbound),
            inbound: self.split(&block.inbound),
        })
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
        cache.get(generation, |g| self.derive(g))
    }
}

/// What `isthmusctl status` shows of a peer configured by identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChannelStatus {
    pub spiffe_id: String,
    pub name: Option<String>,
    pub kind: String,
    pub channel_endpoint: String,
    /// `up`, `connecting`, or `down` (the channel was lost; the tunnel
    /// keeps its keys until `tunnel_expires_secs`).
    pub state: String,
    /// Whether a tunnel is configured for this peer now.
    #[serde(default)]
    pub tunnel: bool,
    /// Seconds until a kept tunnel is torn down (state `down`).
    #[serde(default)]
    pub tunnel_expires_secs: Option<f64>,
    /// Learnt from the clustermesh API (else from the config).
    #[serde(default)]
    pub from_mesh: bool,
    /// Whether this gateway dialed (`dialer`) or accepted (`acceptor`).
    pub role: Option<String>,
    pub up_secs: Option<f64>,
    /// Sessions established since start (a restart of either side adds one).
    pub sessions: u64,
    /// Why the last refused connection attempt was refused, if any.
    pub last_refusal: Option<String>,
    /// Serial of the certificate the peer presented in the session its
    /// tunnel came from.
    #[serde(default)]
    pub peer_serial: Option<String>,
    /// When the first certificate of that chain expires (Unix seconds).
    #[serde(default)]
    pub peer_cert_expires_unix: Option<u64>,
    /// Serial of this gateway's certificate in the channel's live session (after a
    /// certificate rotation, the new serial once the channel is renewed).
    #[serde(default)]
    pub local_serial: Option<String>,
    /// The WireGuard key of the tunnel this channel brought up (a public key).
    #[serde(default)]
    pub wireguard_key: Option<String>,
    /// The epoch of that key, as the peer announced it.
    #[serde(default)]
    pub peer_key_epoch: Option<u64>,
    /// Round-trip time of the channel's last answered liveness ping, in
    /// milliseconds.
    #[serde(default)]
    pub rtt_ms: Option<f64>,
    /// The newest of this gateway's WireGuard key epochs the peer has
    /// acknowledged over this channel (it accepts and initiates toward it).
    #[serde(default)]
    pub key_epoch_acked: Option<u64>,
}

#[derive(Default)]
struct Link {
    session: Option<PeerSession>,
    /// When the last session was lost (its tunnel is kept for a while).
    lost_at: Option<Instant>,
    role: Option<String>,
    since: Option<Instant>,
    sessions: u64,
    last_refusal: Option<String>,
    wg_key: Option<PublicKey>,
    /// The key (and endpoint) a first session's hello named, waiting for the
    /// proof of possession that follows in its Params before it is taken.
    pending_wg: Option<(PublicKey, SocketAddr)>,
    /// Whether the peer's hello carried key epochs (it can rotate its key
    /// and prove keys in session).
    peer_rotates: bool,
    /// The epoch the peer gave `wg_key` (0: it cannot rotate its key).
    peer_key_epoch: u64,
    /// Our newest key epoch the peer acknowledged.
    acked_epoch: Option<u64>,
    /// How many new keys the peer may still announce (see
    /// [`crate::key_rotation::AnnounceBudget`]).
    announce_budget: Option<crate::key_rotation::AnnounceBudget>,
    esp_peer: Option<Arc<EspPeer>>,
    /// What the peer presented in the session its tunnel came from, and our
    /// role in it: checked again when the trust changes
    /// ([`MeshLinks::recheck`]), even after the session is gone while the
    /// tunnel is kept.
    peer_chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    our_role: Option<isthmus_identity::Role>,
    /// When the first certificate of that chain expires.
    not_after: Option<std::time::SystemTime>,
}

fn same_peer(a: &IdentityPeer, b: &IdentityPeer) -> bool {
    a.name == b.name
        && a.kind == b.kind
        && a.channel_endpoint == b.channel_endpoint
        && a.allowed_prefixes == b.allowed_prefixes
        && a.persistent_keepalive == b.persistent_keepalive
        && a.esp.map(|e| (e.cipher, e.esn)) == b.esp.map(|e| (e.cipher, e.esn))
}

/// The WireGuard keys a hello or announcement carries, newest first.
fn announced_keys(params: &TunnelParams) -> Vec<PublicKey> {
    let mut keys: Vec<PublicKey> = params
        .wireguard_public_key
        .map(PublicKey)
        .into_iter()
        .collect();
    if let Some(k) = &params.wireguard_keys {
        for prev in &k.previous {
            if !keys.contains(&PublicKey(*prev)) {
                keys.push(PublicKey(*prev));
            }
        }
    }
    keys
}

/// What a proof of possession of `key` signs.
fn proof_message(context: &[u8; 32], key: &PublicKey) -> Vec<u8> {
    let mut m = context.to_vec();
    m.extend_from_slice(&key.0);
    m
}

fn proof_tag(shared: &[u8; 32], context: &[u8; 32], key: &PublicKey) -> [u8; 32] {
    let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, shared);
    let tag = ring::hmac::sign(&hmac, &proof_message(context, key));
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Every peer's keys as configs of their own (a peer's earlier keys count
/// as taken too), leaving out peer `except`.
fn aliases(all: &[PeerConfig], except: Option<usize>) -> Vec<PeerConfig> {
    all.iter()
        .enumerate()
        .filter(|(j, _)| Some(*j) != except)
        .flat_map(|(_, c)| {
            std::iter::once(c.clone()).chain(c.previous_keys.iter().map(|k| {
                let mut alias = c.clone();
                alias.public_key = *k;
                alias
            }))
        })
        .collect()
}

/// Whether a peer may claim `keys`: none is one of ours (`own`: every key
/// this gateway holds), another peer's (`others`), or a low-order point.
fn claimable(keys: &[PublicKey], own: &[PublicKey], others: &[PeerConfig]) -> Result<(), String> {
    for key in keys {
        if own.contains(key) {
            return Err(crate::rules::ClaimRefusal::OwnKey(*key).to_string());
        }
        if let Some(mine) = own.first() {
            crate::rules::check_wireguard_claim(key, mine, others).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The identity-configured peers of one gateway and their channels.
pub struct MeshLinks {
    wg: Arc<WgCore>,
    esp: Option<Arc<EspCore>>,
    /// Static peers first, then the ones learnt from the mesh.
    peers: Mutex<Vec<IdentityPeer>>,
    mesh_ids: Mutex<std::collections::HashSet<SpiffeId>>,
    links: Mutex<HashMap<SpiffeId, Link>>,
    config: Arc<ChannelConfig>,
    events: Mutex<mpsc::Sender<ChannelEvent>>,
    /// How long a tunnel outlives its lost channel.
    keep_tunnel: std::time::Duration,
    dialers: Mutex<HashMap<SpiffeId, PeerLink>>,
    listener: Mutex<Option<ListenerHandle>>,
    reloader: Mutex<crate::reload::IdentityReloader>,
    /// What the last poll of `reloader` left (read without waiting on a poll).
    reload_status: Mutex<crate::reload::ReloadStatus>,
    /// WireGuard static key rotation (lock order: links, then this).
    rotation: Mutex<crate::key_rotation::KeyRotation>,
    /// Held through a whole `rotate_wireguard_key`, so two never interleave.
    rotating: Mutex<()>,
    /// Where the WireGuard private key is kept: a rotated key is written
    /// there, so a restart keeps it.
    key_file: Mutex<Option<std::path::PathBuf>>,
}

/// What `keys-rotate` answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyRotationStarted {
    /// The new key's epoch.
    pub epoch: u64,
    /// Its public half.
    pub public_key: String,
    /// Peers it was announced to, whose acknowledgement it waits for.
    pub waiting_for: Vec<String>,
    /// Put in force at once (no peer to wait for).
    pub in_force: bool,
    /// An earlier key retired to make room, if any.
    pub retired_early: Option<u64>,
}

/// What [`MeshLinks::set_mesh_peers`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeerChanges {
    pub added: Vec<SpiffeId>,
    pub removed: Vec<SpiffeId>,
    pub changed: Vec<SpiffeId>,
}

impl std::fmt::Debug for MeshLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshLinks")
            .field("peers", &self.peers().len())
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

    fn peers(&self) -> MutexGuard<'_, Vec<IdentityPeer>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dialers(&self) -> MutexGuard<'_, HashMap<SpiffeId, PeerLink>> {
        self.dialers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mesh_ids(&self) -> MutexGuard<'_, std::collections::HashSet<SpiffeId>> {
        self.mesh_ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start_dialer(&self, peer: &IdentityPeer) -> Result<(), ChannelError> {
        if !should_dial(self.config.local_id(), &peer.spiffe_id) {
            return Ok(());
        }
        let events = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let link = PeerLink::spawn(
            self.config.clone(),
            PeerEndpoint {
                id: peer.spiffe_id.clone(),
                addr: peer.channel_endpoint,
                link: link_params(peer),
            },
            events,
        )?;
        self.dialers().insert(peer.spiffe_id.clone(), link);
        Ok(())
    }

    fn update_allowed(&self, peers: &[IdentityPeer]) {
        let allowed: Vec<(SpiffeId, LinkParams)> = peers
            .iter()
            .map(|p| (p.spiffe_id.clone(), link_params(p)))
            .collect();
        if let Some(l) = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            l.set_allowed_peers(allowed);
        }
    }

    /// Replaces the peers learnt from the clustermesh API: new ones get a
    /// channel (dialed or accepted), removed ones are torn down at once
    /// (channel closed, tunnel and keys removed), changed ones are replaced.
    /// A mesh peer that collides with a static peer (same identity) is
    /// ignored: the config wins.
    pub fn set_mesh_peers(&self, wanted: Vec<IdentityPeer>) -> PeerChanges {
        let mut changes = PeerChanges::default();
        let mut to_stop = Vec::new();
        let mut to_start = Vec::new();
        {
            let mut peers = self.peers();
            let mut mesh_ids = self.mesh_ids();
            let statics: Vec<SpiffeId> = peers
                .iter()
                .filter(|p| !mesh_ids.contains(&p.spiffe_id))
                .map(|p| p.spiffe_id.clone())
                .collect();
            let wanted: Vec<IdentityPeer> = wanted
                .into_iter()
                .filter(|p| !statics.contains(&p.spiffe_id))
                .collect();
            // Removed or changed.
            let current: Vec<IdentityPeer> = peers
                .iter()
                .filter(|p| mesh_ids.contains(&p.spiffe_id))
                .cloned()
                .collect();
            for old in &current {
                match wanted.iter().find(|w| w.spiffe_id == old.spiffe_id) {
                    None => {
                        changes.removed.push(old.spiffe_id.clone());
                        to_stop.push(old.spiffe_id.clone());
                    }
                    Some(new) if !same_peer(old, new) => {
                        changes.changed.push(old.spiffe_id.clone());
                        to_stop.push(old.spiffe_id.clone());
                        to_start.push(new.clone());
                    }
                    Some(_) => {}
                }
            }
            for new in &wanted {
                if !current.iter().any(|c| c.spiffe_id == new.spiffe_id) {
                    changes.added.push(new.spiffe_id.clone());
                    to_start.push(new.clone());
                }
            }
            peers.retain(|p| !to_stop.contains(&p.spiffe_id));
            for id in &to_stop {
                mesh_ids.remove(id);
            }
            for p in &to_start {
                mesh_ids.insert(p.spiffe_id.clone());
                peers.push(p.clone());
            }
            self.update_allowed(&peers);
        }
        for id in &to_stop {
            if let Some(dialer) = self.dialers().remove(id) {
                dialer.shutdown();
            }
            let mut links = self.links();
            if let Some(mut link) = links.remove(id) {
                if let Some(s) = link.session.take() {
                    s.close();
                }
                self.teardown(&mut link);
            }
        }
        for p in &to_start {
            self.links().entry(p.spiffe_id.clone()).or_default();
            if let Err(e) = self.start_dialer(p) {
                tracing::warn!(peer = %p.spiffe_id, error = %e, "cannot start the peer channel dialer");
            }
        }
        if changes != PeerChanges::default() {
            tracing::info!(
                added = changes.added.len(),
                removed = changes.removed.len(),
                changed = changes.changed.len(),
                "mesh peers updated"
            );
        }
        changes
    }

    /// Tears down tunnels whose channel has been lost for longer than
    /// [`MeshLinks::keep_tunnel`]. Called periodically.
    pub fn expire_lost(&self, now: Instant) {
        let mut links = self.links();
        for (id, link) in links.iter_mut() {
            let expired = link
                .lost_at
                .is_some_and(|t| now.saturating_duration_since(t) >= self.keep_tunnel);
            let has_tunnel = link.wg_key.is_some() || link.esp_peer.is_some();
            if expired && has_tunnel {
                tracing::warn!(peer = %id, "peer channel down for {:?}; tunnel torn down", self.keep_tunnel);
                self.teardown(link);
            }
        }
    }

    /// Checks the peers with a tunnel against the trust in force at `now`:
    /// every one when `all` (the trust changed), else those whose
    /// certificate chain has expired by now. A peer that fails (revoked,
    /// expired, no longer chaining to the bundle) loses its session and its
    /// tunnel at once, without the grace a lost channel gets: its packets
    /// are dropped and counted from then on. Returns the peers cut.
    pub fn recheck(&self, now: std::time::SystemTime, all: bool) -> Vec<SpiffeId> {
        let mut cut = Vec::new();
        let mut links = self.links();
        for (id, link) in links.iter_mut() {
            let has_tunnel = link.wg_key.is_some() || link.esp_peer.is_some();
            if !(has_tunnel || link.session.is_some()) {
                continue;
            }
            if !(all || link.not_after.is_some_and(|t| now >= t)) {
                continue;
            }
            let Some(role) = link.our_role else { continue };
            if let Err(refusal) = self.config.verify_peer(&link.peer_chain, role, id, now) {
                tracing::warn!(peer = %id, %refusal, "peer no longer trusted: channel closed, tunnel torn down");
                if let Some(session) = link.session.take() {
                    session.close();
                }
                self.teardown(link);
                link.peer_chain.clear();
                link.not_after = None;
                link.last_refusal = Some(refusal.to_string());
                cut.push(id.clone());
            }
        }
        cut
    }

    /// Reads the `[identity]` files again if they changed (trust, then
    /// certificate and key) and re-checks every peer when the trust did.
    pub fn reload(&self, now: std::time::SystemTime) -> crate::reload::Reloaded {
        let mut reloader = self.reloader.lock().unwrap_or_else(|e| e.into_inner());
        let leaf_before = self.config.current_leaf();
        let done = reloader.poll(&self.config, now);
        *self.reload_status.lock().unwrap_or_else(|e| e.into_inner()) = reloader.status();
        drop(reloader);
        if done.trust {
            self.recheck(now, true);
        }
        // Only a certificate that changed renews sessions (not the first poll, which
        // reads again the files start-up read).
        if done.credentials && self.config.current_leaf() != leaf_before {
            self.renew_sessions();
        }
        done
    }

    /// After this gateway's certificate changed: closes the live session of
    /// every WireGuard peer by identity so that a new one, authenticated with
    /// the new certificate, replaces it within a reconnect (the dialer side
    /// dials again at once). The tunnel keeps its keys meanwhile (a lost
    /// channel's grace) and the new session keeps the tunnel, so no packet is
    /// lost; and once every peer holds a session under the new certificate,
    /// the old one (or its CA, or its root) can be revoked or retired without
    /// cutting anyone. ESP peers keep their session: a new one would re-key
    /// their SAs at once on both sides, which can drop packets in flight.
    /// Returns the peers whose session was renewed.
    pub fn renew_sessions(&self) -> Vec<SpiffeId> {
        let wireguard: Vec<SpiffeId> = self
            .peers()
            .iter()
            .filter(|p| p.kind == TunnelKind::Wireguard)
            .map(|p| p.spiffe_id.clone())
            .collect();
        let mut renewed = Vec::new();
        let current = self.config.current_leaf();
        let links = self.links();
        for id in &wireguard {
            let Some(session) = links.get(id).and_then(|l| l.session.as_ref()) else {
                continue;
            };
            if session.is_closed() || session.local_leaf() == current.as_ref() {
                continue;
            }
            tracing::info!(peer = %id, "renewing the peer channel under the new certificate");
            session.close();
            renewed.push(id.clone());
        }
        renewed
    }

    /// Reloading as `isthmusctl status` shows it.
    pub fn reload_status(&self) -> crate::reload::ReloadStatus {
        let mut status = self
            .reload_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        status.local_id = Some(self.config.local_id().to_string());
        if let Some(leaf) = self
            .config
            .current_leaf()
            .and_then(|c| isthmus_certs::CertificateSummary::from_der(&c).ok())
        {
            status.certificate_serial = Some(leaf.serial.to_string());
            status.certificate_expires_unix = leaf
                .not_after
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
        }
        status
    }

    /// Starts the listener, the dialers and the thread that turns channel
    /// events into tunnels.
    pub fn start(
        wg: Arc<WgCore>,
        esp: Option<Arc<EspCore>>,
        peers: Vec<IdentityPeer>,
        identity: &IdentityConfig,
        params: TunnelParams,
        keep_tunnel: std::time::Duration,
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
        let links = peers
            .iter()
            .map(|p| (p.spiffe_id.clone(), Link::default()))
            .collect();
        let mesh = Arc::new(Self {
            wg,
            esp,
            peers: Mutex::new(peers.clone()),
            mesh_ids: Mutex::new(Default::default()),
            links: Mutex::new(links),
            config,
            events: Mutex::new(events_tx),
            keep_tunnel,
            dialers: Mutex::new(HashMap::new()),
            listener: Mutex::new(Some(listener)),
            reloader: Mutex::new(crate::reload::IdentityReloader::new(
                identity.files.clone(),
                &identity.trust,
            )),
            reload_status: Mutex::new(Default::default()),
            rotation: Mutex::new(Default::default()),
            rotating: Mutex::new(()),
            key_file: Mutex::new(None),
        });
        mesh.announced_params();
        for peer in &peers {
            mesh.start_dialer(peer)?;
        }
        let ticker = Arc::downgrade(&mesh);
        std::thread::Builder::new()
            .name("mesh-expiry".into())
            .spawn(move || loop {
                std::thread::sleep(CHECK_TICK);
                let Some(m) = ticker.upgrade() else { return };
                m.expire_lost(Instant::now());
                m.recheck(std::time::SystemTime::now(), false);
                m.rotation_tick(Instant::now());
            })?;
        // File I/O on a thread of its own: a slow or stuck file system never
        // delays the expiry checks above.
        let reloading = Arc::downgrade(&mesh);
        let reload_every = identity.reload_interval;
        std::thread::Builder::new()
            .name("identity-reload".into())
            .spawn(move || loop {
                std::thread::sleep(reload_every);
                let Some(m) = reloading.upgrade() else { return };
                m.reload(std::time::SystemTime::now());
            })?;
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
                link.lost_at = Some(Instant::now());
                tracing::warn!(%peer, %reason, keep = ?self.keep_tunnel, "peer channel lost; the tunnel keeps its keys until the channel is back or the grace ends");
            }
            ChannelEvent::Refused {
                remote,
                role,
                refusal,
            } => {
                tracing::warn!(%remote, %role, %refusal, "peer channel refused; no tunnel brought up");
                let peers = self.peers().clone();
                let mut links = self.links();
                for peer in &peers {
                    let matches = peer.channel_endpoint == remote
                        || peer.channel_endpoint.ip() == remote.ip().to_canonical();
                    if matches {
                        if let Some(link) = links.get_mut(&peer.spiffe_id) {
                            link.last_refusal = Some(refusal.to_string());
                        }
                    }
                }
            }
            ChannelEvent::Message {
                peer,
                session,
                message,
            } => match message {
                ControlMessage::Params(params) => self.peer_params(&peer, session, &params),
                ControlMessage::ParamsAck {
                    wireguard_key_epoch,
                } => self.key_acked(&peer, session, wireguard_key_epoch),
                other => tracing::debug!(%peer, ?other, "peer channel message"),
            },
            other => tracing::debug!(?other, "peer channel event"),
        }
    }

    fn established(&self, e: Established) {
        let Some(cfg) = self.peers().iter().find(|p| p.spiffe_id == e.peer).cloned() else {
            tracing::warn!(peer = %e.peer, "session from an identity that is not a configured peer; closing");
            e.session.close();
            return;
        };
        let cfg = &cfg;
        let mut links = self.links();
        // The peer set may have changed between reading it and taking the links
        // (set_mesh_peers): a removed or changed peer gets no tunnel.
        let still = self
            .peers()
            .iter()
            .any(|p| p.spiffe_id == e.peer && same_peer(p, cfg));
        if !still {
            tracing::info!(peer = %e.peer, "session for a peer removed or changed meanwhile; closing");
            e.session.close();
            return;
        }
        let link = links.entry(e.peer.clone()).or_default();
        // The peer's chain was checked during its TLS handshake, against the
        // trust of that moment; the trust may have changed since (a CRL
        // reloaded while the hello was pending). Check it again now, under
        // the links lock that recheck() also takes, so no session slips
        // between a reload and its recheck.
        if let Err(refusal) = self
            .config
            .verify_session(&e.session, std::time::SystemTime::now())
        {
            tracing::warn!(peer = %e.peer, %refusal, "session refused: its peer is no longer trusted");
            e.session.close();
            link.last_refusal = Some(refusal.to_string());
            return;
        }
        // A session whose handshake began before this gateway's certificate
        // changed may hold the peer to the old one, after renew_sessions() ran:
        // renew it too (the dialer dials again at once).
        let current = self.config.current_leaf();
        if cfg.kind == TunnelKind::Wireguard && e.session.local_leaf() != current.as_ref() {
            tracing::info!(peer = %e.peer, "session made under the previous certificate; renewing it");
            e.session.close();
            return;
        }
        if let Some(old) = link.session.take() {
            old.close();
        }
        // A WireGuard peer that comes back with one of the static keys it
        // had keeps its tunnel (and its sessions); a key it rotated to
        // meanwhile is taken over in place.
        let known_keys = link
            .wg_key
            .and_then(|k| self.wg.peers().get(&k).map(|p| p.public_keys()))
            .unwrap_or_default();
        let offered = announced_keys(&e.params);
        let same_wg_key = cfg.kind == TunnelKind::Wireguard
            && !known_keys.is_empty()
            && offered.iter().any(|k| known_keys.contains(k));
        // The hello's newest key is not taken when it is new to this gateway
        // (see below): its epoch is not either, so the proven announcement
        // of that key at that epoch that follows counts as new.
        let hello_epoch = e.params.wireguard_keys.as_ref().map_or(0, |k| k.epoch);
        let newest_waits = if same_wg_key {
            offered.first().is_some_and(|k| !known_keys.contains(k))
        } else {
            cfg.kind == TunnelKind::Wireguard && e.params.wireguard_keys.is_some()
        };
        let taken_epoch = if newest_waits {
            hello_epoch.saturating_sub(1)
        } else {
            hello_epoch
        };
        let result = if same_wg_key {
            // From a hello, only keys this gateway knew already (the ones the
            // peer dropped go); a new one comes with its proof in the
            // Params that follows.
            let kept: Vec<PublicKey> = offered
                .iter()
                .filter(|k| known_keys.contains(k))
                .copied()
                .collect();
            if kept == known_keys {
                Ok(())
            } else {
                self.take_peer_keys(link, &kept)
            }
        } else {
            self.teardown(link);
            match cfg.kind {
                TunnelKind::Wireguard => self.wireguard_up(cfg, &e, link),
                TunnelKind::Esp => self.esp_up(cfg, &e, link),
            }
        };
        match result {
            Ok(()) => {
                link.lost_at = None;
                link.peer_key_epoch = taken_epoch;
                link.peer_rotates = e.params.wireguard_keys.is_some();
                // Our keys again, with a proof of possession bound to this
                // session: a key the hello named but this peer did not know
                // yet is taken from this message only. A key of ours still
                // waiting for acknowledgements is acknowledged this way too.
                if cfg.kind == TunnelKind::Wireguard && link.peer_rotates {
                    let mut rotation = self.rotation();
                    if rotation.pending_epoch().is_some() {
                        rotation.wait_for(e.peer.to_string());
                    }
                    drop(rotation);
                    let params = self.params_for(link, &e.session);
                    let _ = e.session.send(ControlMessage::Params(params));
                }
                link.peer_chain = e.session.peer_chain();
                link.our_role = Some(e.role);
                link.not_after = e.session.peer_not_after();
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
        // A first session brings up the peer's newest key only: earlier
        // keys it lists are taken later only if this gateway knew them.
        let key = PublicKey(key);
        if e.params.wireguard_keys.is_some() {
            // A peer that can prove its key does so in the Params that
            // follows the hello: nobody can take a key it does not hold.
            link.pending_wg = Some((key, endpoint));
            return Ok(());
        }
        self.add_wireguard_peer(cfg, key, endpoint, link)
    }

    /// Configures the WireGuard peer of `cfg` with `key`, unless the key is
    /// ours, another peer's or a low-order point.
    fn add_wireguard_peer(
        &self,
        cfg: &IdentityPeer,
        key: PublicKey,
        endpoint: SocketAddr,
        link: &mut Link,
    ) -> Result<(), String> {
        let own: Vec<PublicKey> = self.wg.keys().iter().map(|k| k.public_key).collect();
        let mut refused = None;
        self.wg
            .update_peers(|all| {
                // One authenticated peer must not be able to take over
                // another peer's tunnel (or one of this gateway's keys).
                if let Err(why) = claimable(&[key], &own, &aliases(all, None)) {
                    refused = Some(why);
                    return;
                }
                all.push(PeerConfig {
                    name: cfg.name.clone(),
                    public_key: key,
                    previous_keys: Vec::new(),
                    preshared_key: None,
                    endpoint: Some(endpoint),
                    allowed_prefixes: cfg.allowed_prefixes.clone(),
                    persistent_keepalive: cfg.persistent_keepalive,
                });
            })
            .map_err(|e| e.to_string())?;
        if let Some(why) = refused {
            return Err(why);
        }
        link.wg_key = Some(key);
        link.pending_wg = None;
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
                    local_prefixes: Vec::new(),
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

    /// The mTLS configuration in force (credentials and trust, as reloaded).
    pub fn channel_config(&self) -> Arc<ChannelConfig> {
        self.config.clone()
    }

    fn rotation(&self) -> MutexGuard<'_, crate::key_rotation::KeyRotation> {
        self.rotation.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where a rotated WireGuard private key is written (the interface's
    /// `private_key_file`).
    pub fn set_key_file(&self, path: Option<std::path::PathBuf>) {
        *self.key_file.lock().unwrap_or_else(|e| e.into_inner()) = path;
    }

    /// Puts this gateway's WireGuard keys into what hellos announce, and
    /// returns the parameters.
    fn announced_params(&self) -> TunnelParams {
        let mut params = self.config.params();
        if params.wireguard_public_key.is_some() {
            let keys = self.wg.keys();
            if let Some(newest) = keys.first() {
                params.wireguard_public_key = Some(newest.public_key.0);
                params.wireguard_keys = Some(WireguardKeys {
                    epoch: newest.epoch,
                    previous: keys[1..].iter().map(|k| k.public_key.0).collect(),
                    proof: None,
                });
            }
        }
        self.config.set_params(params.clone());
        params
    }

    /// Our parameters for the peer of `link` over `session`, with the proof
    /// of possession of our newest key.
    fn params_for(&self, link: &Link, session: &PeerSession) -> TunnelParams {
        let mut params = self.announced_params();
        params.wireguard_keys = params.wireguard_keys.map(|mut k| {
            k.proof = self.key_proof(link, session, k.epoch);
            k
        });
        params
    }

    /// Proof that this gateway holds its newest WireGuard key (`epoch`):
    /// HMAC-SHA256 keyed by X25519(that key, the peer's newest key) over the
    /// session's key context for `epoch` and our public key. Only the holder
    /// of either private key can make it; the peer checks it with its own.
    fn key_proof(&self, link: &Link, session: &PeerSession, epoch: u64) -> Option<[u8; 32]> {
        let theirs = link.wg_key.or(link.pending_wg.map(|(k, _)| k))?;
        let ours = self.wg.keys().into_iter().find(|k| k.epoch == epoch)?;
        let shared = self.wg.key_agreement(epoch, &theirs)?;
        let context = session.wireguard_key_context(epoch).ok()?;
        let tag = proof_tag(&shared, &context, &ours.public_key);
        Some(tag)
    }

    /// Sends our parameters to every peer with a live channel and a
    /// WireGuard tunnel; returns those peers.
    fn announce(&self, links: &HashMap<SpiffeId, Link>) -> Vec<String> {
        let params = self.announced_params();
        let mut told = Vec::new();
        for (id, link) in links {
            let Some(session) = link.session.as_ref().filter(|s| !s.is_closed()) else {
                continue;
            };
            if link.wg_key.is_none() && link.pending_wg.is_none() {
                continue;
            }
            if !link.peer_rotates {
                // It cannot take a new key over this session (an older
                // build): a new session's hello carries it.
                tracing::info!(peer = %id, "peer cannot rotate keys in session; closing its channel so the next hello carries the new key");
                session.close();
                continue;
            }
            let mut params = params.clone();
            params.wireguard_keys = params.wireguard_keys.map(|mut k| {
                k.proof = self.key_proof(link, session, k.epoch);
                k
            });
            match session.send(ControlMessage::Params(params)) {
                Ok(()) => told.push(id.to_string()),
                Err(e) => {
                    tracing::warn!(peer = %id, error = %e, "cannot announce the WireGuard key")
                }
            }
        }
        told
    }

    /// Starts a rotation of this gateway's WireGuard static key: a new key
    /// is accepted at once, announced to every peer over its channel, and
    /// put in force when all have acknowledged it ([`KeyRotationStarted`]).
    pub fn rotate_wireguard_key(&self) -> Result<KeyRotationStarted, String> {
        let _one_at_a_time = self.rotating.lock().unwrap_or_else(|e| e.into_inner());
        {
            let links = self.links();
            // A peer that did not learn this gateway's key over a channel
            // (static config, UAPI) cannot learn a new one either.
            let owned: Vec<PublicKey> = links.values().filter_map(|l| l.wg_key).collect();
            if let Some(other) = self
                .wg
                .peer_configs()
                .iter()
                .find(|c| !owned.contains(&c.public_key))
            {
                return Err(format!(
                    "WireGuard peer {} is not configured by identity and cannot learn a new key; remove it or restart with a new private_key_file instead",
                    other.name.clone().unwrap_or_else(|| other.public_key.to_base64())
                ));
            }
        }
        let (pending, waiting) = {
            let rotation = self.rotation();
            (rotation.pending_epoch(), rotation.waiting())
        };
        if let Some(epoch) = pending {
            return Err(format!(
                "key epoch {epoch} is still waiting for acknowledgements from {}",
                waiting.join(", ")
            ));
        }
        let key = isthmus_tunnel::PrivateKey::generate();
        let (epoch, retired_early) = self.wg.add_key(&key).map_err(|e| e.to_string())?;
        // File I/O without the links lock: a slow disk must not hold up
        // channel events or revocation checks.
        let file = self
            .key_file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(path) = file {
            let text = Zeroizing::new(format!("{}\n", key.to_base64_secret().as_str()));
            if let Err(e) = isthmus_certs::files::replace_private_key(&path, &text) {
                let _ = self.wg.retire_key(epoch);
                return Err(format!(
                    "cannot write the new key to {}: {e}; nothing changed",
                    path.display()
                ));
            }
        }
        let links = self.links();
        let mut rotation = self.rotation();
        if let Some(early) = retired_early {
            rotation.removed(early);
        }
        let told = self.announce(&links);
        let ready = rotation.begin(epoch, told.clone(), Instant::now());
        drop(rotation);
        drop(links);
        tracing::info!(epoch, public_key = %key.public_key(), peers = told.len(), "WireGuard key rotation started");
        if ready {
            self.promote(epoch);
        }
        Ok(KeyRotationStarted {
            epoch,
            public_key: key.public_key().to_base64(),
            waiting_for: told,
            in_force: ready,
            retired_early,
        })
    }

    fn promote(&self, epoch: u64) {
        let previous = self
            .wg
            .keys()
            .into_iter()
            .find(|k| k.in_force)
            .map(|k| k.epoch);
        if let Err(e) = self.wg.promote_key(epoch) {
            tracing::warn!(epoch, error = %e, "cannot put the new WireGuard key in force");
            return;
        }
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.rotation().promoted(
            epoch,
            previous.filter(|p| *p != epoch),
            Instant::now(),
            unix,
        );
        tracing::info!(epoch, "WireGuard key in force: every peer acknowledged it");
    }

    /// A peer acknowledged one of our key epochs.
    fn key_acked(&self, peer: &SpiffeId, session: u64, epoch: u64) {
        let mut links = self.links();
        let Some(link) = links.get_mut(peer) else {
            return;
        };
        if link.session.as_ref().map(|s| s.id()) != Some(session) {
            return;
        }
        link.acked_epoch = Some(link.acked_epoch.map_or(epoch, |e| e.max(epoch)));
        drop(links);
        let ready = self.rotation().acked(&peer.to_string(), epoch);
        if let Some(epoch) = ready {
            self.promote(epoch);
        }
    }

    /// Once in a while: stops waiting for peers whose channel is gone, and
    /// retires keys whose grace is over.
    pub fn rotation_tick(&self, now: Instant) {
        let links = self.links();
        let mut rotation = self.rotation();
        let mut ready = None;
        if rotation.overdue(now) {
            // Peers that did not acknowledge in time: their channel is
            // closed (the next hello carries the key) and the key goes in
            // force without them.
            for peer in rotation.waiting() {
                tracing::warn!(%peer, "no acknowledgement of the new WireGuard key in time; closing its channel");
                if let Some(session) = links
                    .iter()
                    .find(|(id, _)| id.to_string() == peer)
                    .and_then(|(_, l)| l.session.as_ref())
                {
                    session.close();
                }
                ready = rotation.forget(&peer).or(ready);
            }
        }
        for peer in rotation.waiting() {
            let live = links.iter().any(|(id, l)| {
                id.to_string() == peer
                    && l.session.as_ref().is_some_and(|s| !s.is_closed())
                    && (l.wg_key.is_some() || l.pending_wg.is_some())
            });
            if !live {
                ready = rotation.forget(&peer).or(ready);
            }
        }
        let due = rotation.due(now);
        drop(rotation);
        if let Some(epoch) = ready {
            self.promote(epoch);
        }
        if !due.is_empty() {
            for epoch in due {
                if let Err(e) = self.wg.retire_key(epoch) {
                    tracing::warn!(epoch, error = %e, "cannot retire a WireGuard key");
                } else {
                    tracing::info!(epoch, "earlier WireGuard key retired");
                }
            }
            self.announce(&links);
        }
    }

    /// The rotation as `status` shows it.
    pub fn rotation_status(&self) -> crate::key_rotation::KeyRotationStatus {
        self.rotation().status(Instant::now())
    }

    /// A peer announced new tunnel parameters over its current session:
    /// judge its WireGuard keys ([`crate::key_rotation::judge_announcement`],
    /// at most a few new keys a second), take them and acknowledge.
    fn peer_params(&self, peer: &SpiffeId, session: u64, params: &TunnelParams) {
        use crate::key_rotation::{judge_announcement, AnnounceBudget, Announcement};
        let mut links = self.links();
        let Some(link) = links.get_mut(peer) else {
            return;
        };
        // Only the session the link runs on speaks for the peer now.
        let Some(current) = link.session.clone().filter(|s| s.id() == session) else {
            return;
        };
        let Some(epoch) = params.wireguard_keys.as_ref().map(|k| k.epoch) else {
            return;
        };
        let known = match (link.wg_key, link.pending_wg) {
            (Some(key), _) => self
                .wg
                .peers()
                .get(&key)
                .map(|p| p.public_keys())
                .unwrap_or_default(),
            // A first session's key, to be proven.
            (None, Some(_)) => Vec::new(),
            (None, None) => return,
        };
        let keys = announced_keys(params);
        let proven = |new: &PublicKey| {
            let Some(proof) = params.wireguard_keys.as_ref().and_then(|k| k.proof) else {
                return false;
            };
            let Ok(context) = current.wireguard_key_context(epoch) else {
                return false;
            };
            self.wg.key_agreements(new).iter().any(|shared| {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &shared[..]);
                ring::hmac::verify(&key, &proof_message(&context, new), &proof).is_ok()
            })
        };
        let verdict = match judge_announcement(link.peer_key_epoch, &known, epoch, &keys) {
            Announcement::Apply(take) if !known.contains(&take[0]) && !proven(&take[0]) => {
                Announcement::Refuse("no valid proof of possession of the new key".into())
            }
            Announcement::Apply(take) if !known.contains(&take[0]) => {
                let now = Instant::now();
                let budget = link
                    .announce_budget
                    .get_or_insert_with(|| AnnounceBudget::new(now));
                if budget.allow(now) {
                    Announcement::Apply(take)
                } else {
                    Announcement::Refuse("new keys announced too fast".into())
                }
            }
            other => other,
        };
        let result = match verdict {
            Announcement::Unchanged => Ok(()),
            Announcement::Apply(take) => match link.pending_wg {
                Some((_, endpoint)) if link.wg_key.is_none() => {
                    let cfg = self.peers().iter().find(|p| &p.spiffe_id == peer).cloned();
                    match cfg {
                        Some(cfg) => self.add_wireguard_peer(&cfg, take[0], endpoint, link),
                        None => Err("no longer a configured peer".into()),
                    }
                }
                _ => self.take_peer_keys(link, &take),
            },
            Announcement::Refuse(why) => Err(why),
        };
        match result {
            Ok(()) => {
                link.peer_key_epoch = epoch;
                let _ = current.send(ControlMessage::ParamsAck {
                    wireguard_key_epoch: epoch,
                });
                tracing::info!(%peer, epoch, "peer's WireGuard keys taken");
            }
            Err(why) => {
                // A peer can send these in a loop: say it in status, log
                // quietly.
                tracing::debug!(%peer, epoch, %why, "peer's WireGuard key announcement refused");
                link.last_refusal = Some(format!("WireGuard key announcement refused: {why}"));
            }
        }
    }

    /// Replaces the keys of the WireGuard peer `link` brought up with `keys`
    /// (newest first), keeping its sessions. The same rules as for a first
    /// key: not ours, not another peer's, not a low-order point.
    fn take_peer_keys(&self, link: &mut Link, keys: &[PublicKey]) -> Result<(), String> {
        let current = link.wg_key.ok_or("no WireGuard tunnel from this peer")?;
        let Some(primary) = keys.first().copied() else {
            return Err("the peer offered no WireGuard key".into());
        };
        if keys.len() > isthmus_tunnel::wg::MAX_PEER_KEYS {
            return Err(format!(
                "{} keys announced; at most {} are kept",
                keys.len(),
                isthmus_tunnel::wg::MAX_PEER_KEYS
            ));
        }
        let own: Vec<PublicKey> = self.wg.keys().iter().map(|k| k.public_key).collect();
        let mut refused = None;
        self.wg
            .update_peers(|all| {
                let Some(i) = all
                    .iter()
                    .position(|c| c.public_key == current || c.previous_keys.contains(&current))
                else {
                    refused = Some("the peer's tunnel is gone".to_string());
                    return;
                };
                if let Err(why) = claimable(keys, &own, &aliases(all, Some(i))) {
                    refused = Some(why);
                    return;
                }
                all[i].public_key = primary;
                all[i].previous_keys = keys[1..].to_vec();
            })
            .map_err(|e| e.to_string())?;
        if let Some(why) = refused {
            return Err(why);
        }
        link.wg_key = Some(primary);
        Ok(())
    }

    /// Removes the tunnel state a session brought up.
    fn teardown(&self, link: &mut Link) {
        link.pending_wg = None;
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
        link.lost_at = None;
    }

    /// Runs `f` with the WireGuard keys of the peers brought up by a channel
    /// and the prefixes of every peer configured by identity, holding the
    /// links lock throughout: no channel can bring a peer up or down while
    /// `f` changes the WireGuard peer set (links, then the WireGuard writer:
    /// the lock order used here everywhere).
    pub fn with_owned<R>(
        &self,
        f: impl FnOnce(&[PublicKey], &[isthmus_tunnel::IpPrefix]) -> R,
    ) -> R {
        let links = self.links();
        let mut owned: Vec<PublicKey> = links
            .values()
            .filter_map(|l| l.wg_key.or(l.pending_wg.map(|(k, _)| k)))
            .collect();
        // With the keys those peers still accept from a rotation.
        let configs = self.wg.peer_configs();
        let previous: Vec<PublicKey> = configs
            .iter()
            .filter(|c| owned.contains(&c.public_key))
            .flat_map(|c| c.previous_keys.iter().copied())
            .collect();
        owned.extend(previous);
        let protected: Vec<isthmus_tunnel::IpPrefix> = self
            .peers()
            .iter()
            .flat_map(|p| p.allowed_prefixes.iter().copied())
            .collect();
        let result = f(&owned, &protected);
        drop(links);
        result
    }

    pub fn status(&self) -> Vec<ChannelStatus> {
        let peers = self.peers().clone();
        let mesh_ids = self.mesh_ids().clone();
        let links = self.links();
        let now = Instant::now();
        peers
            .iter()
            .map(|p| {
                let link = links.get(&p.spiffe_id);
                let up = link
                    .and_then(|l| l.session.as_ref())
                    .is_some_and(|s| !s.is_closed());
                let tunnel = link.is_some_and(|l| l.wg_key.is_some() || l.esp_peer.is_some());
                let lost_at = link.and_then(|l| l.lost_at).filter(|_| !up && tunnel);
                let state = if up {
                    "up"
                } else if lost_at.is_some() {
                    "down"
                } else {
                    "connecting"
                };
                ChannelStatus {
                    spiffe_id: p.spiffe_id.to_string(),
                    name: p.name.clone(),
                    kind: p.kind.name().to_string(),
                    channel_endpoint: p.channel_endpoint.to_string(),
                    state: state.to_string(),
                    tunnel,
                    tunnel_expires_secs: lost_at.map(|t| {
                        self.keep_tunnel
                            .saturating_sub(now.saturating_duration_since(t))
                            .as_secs_f64()
                    }),
                    from_mesh: mesh_ids.contains(&p.spiffe_id),
                    role: link.filter(|_| up).and_then(|l| l.role.clone()),
                    up_secs: link
                        .filter(|_| up)
                        .and_then(|l| l.since)
                        .map(|t| t.elapsed().as_secs_f64()),
                    sessions: link.map_or(0, |l| l.sessions),
                    last_refusal: link.and_then(|l| l.last_refusal.clone()),
                    peer_serial: link
                        .and_then(|l| l.peer_chain.first())
                        .and_then(|c| isthmus_certs::CertificateSummary::from_der(c).ok())
                        .map(|s| s.serial.to_string()),
                    wireguard_key: link.and_then(|l| l.wg_key).map(|k| k.to_base64()),
                    peer_key_epoch: link
                        .filter(|l| l.wg_key.is_some() && l.peer_key_epoch > 0)
                        .map(|l| l.peer_key_epoch),
                    key_epoch_acked: link.and_then(|l| l.acked_epoch),
                    rtt_ms: link
                        .filter(|_| up)
                        .and_then(|l| l.session.as_ref())
                        .and_then(|s| s.rtt())
                        .map(|d| d.as_secs_f64() * 1000.0),
                    local_serial: link
                        .filter(|_| up)
                        .and_then(|l| l.session.as_ref())
                        .and_then(|s| s.local_leaf())
                        .and_then(|c| isthmus_certs::CertificateSummary::from_der(c).ok())
                        .map(|s| s.serial.to_string()),
                    peer_cert_expires_unix: link.and_then(|l| l.not_after).and_then(|t| {
                        t.duration_since(std::time::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_secs())
                    }),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(generation: u64) -> SaPair {
        let keys = |spi: u32| SaKeys {
            spi,
            key: Zeroizing::new(vec![generation as u8; 16]),
            salt: [0; 4],
        };
        SaPair {
            outbound: keys(0x0100_0000 + generation as u32 * 2),
            inbound: keys(0x0100_0001 + generation as u32 * 2),
        }
    }

    /// The generations derived when the channel comes up serve the data
    /// path's later rekeys without deriving anything again (the review found
    /// all but the last three thrown away); old ones are still dropped.
    #[test]
    fn precomputed_generations_serve_later_rekeys() {
        let derived = std::cell::Cell::new(0u64);
        let derive = |g: u64| {
            derived.set(derived.get() + 1);
            Ok(pair(g))
        };
        let mut cache = GenerationCache::default();
        cache.precompute(PRECOMPUTED_GENERATIONS, derive).unwrap();
        assert_eq!(derived.get(), PRECOMPUTED_GENERATIONS);
        // As the ESP core asks: generations 0..=2 at setup, then one more
        // lookahead generation at every rekey.
        for g in 0..PRECOMPUTED_GENERATIONS {
            let got = cache.get(g, derive).unwrap();
            assert_eq!(got.outbound.spi, pair(g).outbound.spi);
        }
        assert_eq!(
            derived.get(),
            PRECOMPUTED_GENERATIONS,
            "a precomputed generation was derived again"
        );
        // Past the precomputed ones, generations are derived on demand and
        // the cache stays small.
        cache.get(PRECOMPUTED_GENERATIONS + 40, derive).unwrap();
        assert_eq!(derived.get(), PRECOMPUTED_GENERATIONS + 1);
        let newest = PRECOMPUTED_GENERATIONS + 40;
        cache.get(newest + 3, derive).unwrap();
        assert!(
            cache
                .pairs
                .keys()
                .all(|g| *g < PRECOMPUTED_GENERATIONS || *g + 2 >= newest + 3),
            "{:?}",
            cache.pairs.keys().collect::<Vec<_>>()
        );
        // The other direction, far behind, still finds its generations.
        cache
            .get(5, |_| panic!("generation 5 was dropped"))
            .unwrap();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod live_trust_tests {
    use super::*;
    use isthmus_identity::{LinkParams, PeerChannel, PeerEndpoint};
    use isthmus_tunnel::PrivateKey;

    fn params(wg: &PublicKey) -> TunnelParams {
        TunnelParams {
            wireguard_public_key: Some(wg.0),
            wireguard_endpoint: Some("127.0.0.1:51999".parse().unwrap()),
            esp_endpoint: None,
            esp_inbound_spi: None,
            mtu: 1420,
            wireguard_keys: None,
        }
    }

    /// A gateway A with peer B by identity, and A's half of a session with B made
    /// with B's hello carrying `b_params`.
    struct WithB {
        pki: crate::test_pki::Pki,
        wg: Arc<WgCore>,
        mesh: Arc<MeshLinks>,
        listener: isthmus_identity::ListenerHandle,
        /// B's side: its hellos carry what this says when a session is made.
        b_cfg: Arc<ChannelConfig>,
        _b_events: mpsc::Receiver<ChannelEvent>,
    }

    impl WithB {
        fn new(name: &str) -> Self {
            let pki = crate::test_pki::Pki::new(name);
            let identity = pki.identity();
            let wg = Arc::new(WgCore::new(PrivateKey::generate(), vec![]).unwrap());
            let peer_b = IdentityPeer {
                name: Some("b".into()),
                kind: TunnelKind::Wireguard,
                spiffe_id: pki.id("b"),
                // Nobody listens there: the mesh's own dialer gets nowhere.
                channel_endpoint: "127.0.0.1:9".parse().unwrap(),
                allowed_prefixes: vec!["100.64.2.0/24".parse().unwrap()],
                persistent_keepalive: None,
                esp: None,
            };
            let mesh = MeshLinks::start(
                wg.clone(),
                None,
                vec![peer_b],
                &identity,
                params(&wg.public_key()),
                std::time::Duration::from_secs(60),
            )
            .unwrap();
            let b_cfg = Arc::new(
                ChannelConfig::new(
                    pki.leaf_b.credentials().unwrap(),
                    &identity.trust,
                    params(&PrivateKey::generate().public_key()),
                )
                .unwrap(),
            );
            let (btx, _brx) = mpsc::channel();
            let listener = ChannelListener::bind(
                b_cfg.clone(),
                "127.0.0.1:0".parse().unwrap(),
                vec![(pki.id("a"), LinkParams::Wireguard)],
            )
            .unwrap()
            .spawn(btx)
            .unwrap();
            Self {
                pki,
                wg,
                mesh,
                listener,
                b_cfg,
                _b_events: _brx,
            }
        }

        /// A's half of a new session with B, B's hello carrying `b_params`.
        fn session(&self, b_params: TunnelParams) -> Established {
            let identity = self.pki.identity();
            self.b_cfg.set_params(b_params);
            let a_cfg = ChannelConfig::new(
                identity.credentials.clone(),
                &identity.trust,
                params(&self.wg.public_key()),
            )
            .unwrap();
            let (atx, _arx) = mpsc::channel();
            PeerChannel::connect(
                &a_cfg,
                &PeerEndpoint {
                    id: self.pki.id("b"),
                    addr: self.listener.local_addr(),
                    link: LinkParams::Wireguard,
                },
                atx,
            )
            .unwrap()
        }

        fn b_keys(&self) -> Vec<PublicKey> {
            self.wg
                .peers()
                .peers()
                .first()
                .map(|p| p.public_keys())
                .unwrap_or_default()
        }
    }

    fn keys_params(keys: &[PublicKey], epoch: u64) -> TunnelParams {
        let mut p = params(&keys[0]);
        p.wireguard_keys = Some(WireguardKeys {
            epoch,
            previous: keys[1..].iter().map(|k| k.0).collect(),
            proof: None,
        });
        p
    }

    /// B's announcement of `new` (then `previous`) at `epoch` over `session`, with a
    /// proof made with `signer`'s private key (B's own: `new`).
    fn proven_params(
        t: &WithB,
        session: &PeerSession,
        new: &PrivateKey,
        previous: &[PublicKey],
        epoch: u64,
        signer: &PrivateKey,
    ) -> TunnelParams {
        let mut keys = vec![new.public_key()];
        keys.extend_from_slice(previous);
        let mut p = keys_params(&keys, epoch);
        let shared = signer.key_agreement(&t.wg.public_key()).unwrap();
        let context = session.wireguard_key_context(epoch).unwrap();
        if let Some(k) = &mut p.wireguard_keys {
            k.proof = Some(proof_tag(&shared, &context, &new.public_key()));
        }
        p
    }

    /// A first session with B under `b`'s key at `epoch`, brought up by B's proven
    /// announcement: (session id, A's half of the session).
    fn up(t: &WithB, b: &PrivateKey, epoch: u64) -> (u64, PeerSession) {
        let est = t.session(keys_params(&[b.public_key()], epoch));
        let (sid, session) = (est.session.id(), est.session.clone());
        t.mesh.established(est);
        let p = proven_params(t, &session, b, &[], epoch, b);
        t.mesh.peer_params(&t.pki.id("b"), sid, &p);
        (sid, session)
    }

    /// A first session brings up the peer's newest key only; an earlier key it
    /// lists that could never be taken (a low-order point) neither leaves a tunnel
    /// without its channel nor spoils the session.
    #[test]
    fn a_first_session_takes_the_newest_key_only() {
        let t = WithB::new("mesh-first-keys");
        let b0 = PrivateKey::generate();
        let est = t.session(keys_params(&[b0.public_key(), PublicKey([0; 32])], 1));
        let (sid, session) = (est.session.id(), est.session.clone());
        t.mesh.established(est);
        // The hello alone brings no tunnel: the key must be proven first, and
        // a proof by someone else does not count.
        let status = t.mesh.status();
        assert_eq!(status[0].state, "up", "{status:?}");
        assert!(!status[0].tunnel, "{status:?}");
        let stranger = PrivateKey::generate();
        let forged = proven_params(&t, &session, &b0, &[], 1, &stranger);
        t.mesh.peer_params(&t.pki.id("b"), sid, &forged);
        assert!(t.b_keys().is_empty());
        let p = proven_params(&t, &session, &b0, &[], 1, &b0);
        t.mesh.peer_params(&t.pki.id("b"), sid, &p);
        let status = t.mesh.status();
        assert!(status[0].tunnel, "{status:?}");
        assert_eq!(t.b_keys(), vec![b0.public_key()]);
    }

    #[test]
    fn key_announcements_are_judged_and_bounded() {
        let t = WithB::new("mesh-announce");
        let b0_key = PrivateKey::generate();
        let b0 = b0_key.public_key();
        let (sid, session) = up(&t, &b0_key, 1);
        assert_eq!(t.b_keys(), vec![b0]);
        let b1 = PrivateKey::generate();
        let stranger = PrivateKey::generate();
        let b = t.pki.id("b");
        let announce = |p: &TunnelParams| t.mesh.peer_params(&b, sid, p);
        let proven = |new: &PrivateKey, prev: &[PublicKey], epoch: u64, signer: &PrivateKey| {
            proven_params(&t, &session, new, prev, epoch, signer)
        };
        // Same epoch, new key; no proof; a proof by someone who does not hold the
        // key; another session.
        announce(&proven(&b1, &[b0], 1, &b1));
        announce(&keys_params(&[b1.public_key(), b0], 2));
        announce(&proven(&b1, &[b0], 2, &stranger));
        t.mesh
            .peer_params(&b, sid + 1_000, &proven(&b1, &[b0], 2, &b1));
        assert_eq!(t.b_keys(), vec![b0]);
        // A real rotation is taken, but not an earlier key it never had.
        announce(&proven(&b1, &[stranger.public_key(), b0], 2, &b1));
        assert_eq!(t.b_keys(), vec![b1.public_key(), b0]);
        // A loop of new keys: only a few get in.
        let mut last = b1.public_key();
        for epoch in 3..60 {
            let next = PrivateKey::generate();
            announce(&proven(&next, &[last], epoch, &next));
            if t.b_keys()[0] == next.public_key() {
                last = next.public_key();
            }
        }
        let epoch = t.mesh.status()[0].peer_key_epoch.unwrap();
        assert!((3..=7).contains(&epoch), "{epoch}");
        t.listener.shutdown();
    }

    /// A peer that rotated its key while its channel was down comes back with the new
    /// key in its hello: the hello alone does not make it this gateway's, the proven
    /// announcement that follows on the new session does.
    #[test]
    fn a_key_rotated_while_away_is_taken_from_the_next_session() {
        let t = WithB::new("mesh-away");
        let b0 = PrivateKey::generate();
        up(&t, &b0, 1);
        assert_eq!(t.b_keys(), vec![b0.public_key()]);
        let b1 = PrivateKey::generate();
        let est = t.session(keys_params(&[b1.public_key(), b0.public_key()], 2));
        let (sid, session) = (est.session.id(), est.session.clone());
        t.mesh.established(est);
        assert_eq!(
            t.b_keys(),
            vec![b0.public_key()],
            "not from the hello alone"
        );
        let p = proven_params(&t, &session, &b1, &[b0.public_key()], 2, &b1);
        t.mesh.peer_params(&t.pki.id("b"), sid, &p);
        assert_eq!(t.b_keys(), vec![b1.public_key(), b0.public_key()]);
        t.listener.shutdown();
    }

    /// A peer that never acknowledges a new key cannot hold the old one in force:
    /// past the deadline its channel is closed (the next hello carries the key) and
    /// the key goes in force. A peer that cannot rotate keys in session (no key
    /// epoch in its hello) has its channel closed at once.
    #[test]
    fn a_silent_or_old_peer_does_not_stall_a_rotation() {
        let t = WithB::new("mesh-silent");
        let (_, session) = up(&t, &PrivateKey::generate(), 1);
        let started = t.mesh.rotate_wireguard_key().unwrap();
        assert!(!started.in_force);
        assert_eq!(started.waiting_for, vec![t.pki.id("b").to_string()]);
        let in_force = || t.wg.keys().into_iter().find(|k| k.in_force).unwrap().epoch;
        t.mesh.rotation_tick(Instant::now());
        assert_eq!(in_force(), 1, "B said nothing yet");
        assert!(
            t.mesh.rotate_wireguard_key().is_err(),
            "one rotation at a time"
        );
        t.mesh.rotation_tick(
            Instant::now() + crate::key_rotation::ACK_DEADLINE + std::time::Duration::from_secs(1),
        );
        assert_eq!(in_force(), started.epoch);
        assert!(session.is_closed());

        let t = WithB::new("mesh-old-peer");
        let est = t.session(params(&PrivateKey::generate().public_key()));
        let session = est.session.clone();
        t.mesh.established(est);
        let started = t.mesh.rotate_wireguard_key().unwrap();
        assert!(
            started.in_force && started.waiting_for.is_empty(),
            "{started:?}"
        );
        assert!(session.is_closed());
    }

    /// Found by the third review: the first reload after start (files unchanged)
    /// closed every WireGuard peer's session, and a new certificate that the
    /// gateway's own trust refuses was put in force, every session renewed onto it.
    #[test]
    fn sessions_are_renewed_only_under_a_new_trusted_certificate() {
        let t = WithB::new("mesh-renew");
        let (_, session) = up(&t, &PrivateKey::generate(), 1);
        let now = std::time::SystemTime::now();
        t.mesh.reload(now);
        assert!(!session.is_closed(), "renewed by the first reload");
        let serial = |m: &MeshLinks| m.reload_status().certificate_serial.unwrap();
        let in_force = serial(&t.mesh);

        // A certificate for this gateway from a root its bundle does not hold.
        let gw = isthmus_identity::GatewayName::new("gw").unwrap();
        let stranger =
            isthmus_certs::MeshRootCa::create(&t.pki.td, isthmus_certs::Validity::days(30))
                .unwrap()
                .issue_cluster_ca(
                    &isthmus_identity::ClusterName::new("a").unwrap(),
                    isthmus_certs::Validity::days(30),
                )
                .unwrap()
                .issue_gateway(&gw, isthmus_certs::Validity::days(30))
                .unwrap();
        let files = &t.pki.files;
        stranger
            .replace(&files.certificate, &files.private_key)
            .unwrap();
        assert!(!t.mesh.reload(now).credentials);
        assert!(
            !session.is_closed(),
            "renewed under an untrusted certificate"
        );
        assert_eq!(serial(&t.mesh), in_force);
        let error = t.mesh.reload_status().last_error.unwrap();
        assert!(error.contains("own trust"), "{error}");

        // A new certificate of its own CA renews the session.
        let renewed = t
            .pki
            .ca_a
            .issue_gateway(&gw, isthmus_certs::Validity::days(30))
            .unwrap();
        renewed
            .replace(&files.certificate, &files.private_key)
            .unwrap();
        assert!(t.mesh.reload(now).credentials);
        assert!(session.is_closed());
        assert_ne!(serial(&t.mesh), in_force);
        t.listener.shutdown();
    }

    /// Found by the third review: a session whose handshake was made under the old
    /// certificate but reached the mesh after the renewal was kept, holding the
    /// peer to the old certificate. It is renewed too, and `status` shows which
    /// certificate of ours each channel's session was made under.
    #[test]
    fn a_session_made_under_the_previous_certificate_is_renewed() {
        let t = WithB::new("mesh-stale");
        let (_, live) = up(&t, &PrivateKey::generate(), 1);
        let ours = t.mesh.reload_status().certificate_serial;
        assert_eq!(t.mesh.status()[0].local_serial, ours);
        let pending = t.session(params(&PrivateKey::generate().public_key()));
        let gw = isthmus_identity::GatewayName::new("gw").unwrap();
        let files = &t.pki.files;
        t.pki
            .ca_a
            .issue_gateway(&gw, isthmus_certs::Validity::days(30))
            .unwrap()
            .replace(&files.certificate, &files.private_key)
            .unwrap();
        let now = std::time::SystemTime::now();
        assert!(t.mesh.reload(now).credentials);
        assert!(live.is_closed());
        let stale = pending.session.clone();
        t.mesh.established(pending);
        assert!(
            stale.is_closed(),
            "a session under the old certificate was kept"
        );
        t.listener.shutdown();
    }

    /// A session whose peer was trusted during its TLS handshake but is revoked by
    /// the time it is handed over (a peer that stalls its hello across a CRL reload)
    /// brings up no tunnel.
    #[test]
    fn a_session_revoked_before_it_is_installed_gets_no_tunnel() {
        let t = WithB::new("mesh-live");
        let est = t.session(params(&PrivateKey::generate().public_key()));
        // B is revoked and the gateway reloads its trust before the session reaches it.
        t.pki.revoke_b(1);
        assert!(t.mesh.reload(std::time::SystemTime::now()).trust);
        t.mesh.established(est);

        assert!(t.wg.peers().peers().is_empty(), "a tunnel came up");
        let status = t.mesh.status();
        assert!(!status[0].tunnel, "{status:?}");
        assert!(
            status[0]
                .last_refusal
                .as_deref()
                .is_some_and(|r| r.contains("revoked")),
            "{status:?}"
        );
        t.listener.shutdown();
    }
}
