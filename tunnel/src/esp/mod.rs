//! IPsec-compatible tunnels: ESP in UDP (RFC 4303, RFC 3948) with AES-GCM
//! (RFC 4106), extended sequence numbers (RFC 4304) and anti-replay.
//!
//! [`EspCore`] is the ESP counterpart of [`crate::wg::WgCore`]: no I/O, the
//! caller passes packets, datagrams and `now`. Each peer has one outbound SA
//! and a few inbound SAs (looked up by SPI):
//!
//! - generation `g` carries traffic; inbound SAs for `g + 1` and `g + 2` are
//!   installed ahead of time, so the receiver accepts a new SPI before the
//!   sender switches to it (make-before-break);
//! - at its soft lifetime the outbound SA is replaced by generation `g + 1`;
//! - when the first packet of a newer generation arrives, older inbound SAs
//!   are kept for a grace period (late, reordered packets) and then removed;
//! - an SA at its hard lifetime is never used: packets are dropped and
//!   counted, never sent in clear.

pub mod keying;
pub mod replay;
pub mod sa;

use crate::counters::{DeviceCounters, DropReason, PeerCounters, PeerStats};
use crate::prefix::{IpPrefix, PrefixTable};
use crate::wg::{Inbound, Outbound};
use keying::{EspKeying, KeyingError, SaPair};
use replay::ReplayError;
use sa::{
    datagram_spi, InboundSa, Lifetimes, OpenError, OutboundSa, SaError, SealError,
    NEXT_HEADER_IPV4, NEXT_HEADER_IPV6, NEXT_HEADER_NONE,
};
use serde::Serialize;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Instant;

/// Default UDP port of ESP-in-UDP (RFC 3948).
pub const DEFAULT_ESP_PORT: u16 = 4500;
/// Inbound SAs installed ahead of the one in use.
const LOOKAHEAD: u64 = 2;
/// Least time an outbound generation is used before an asked-for rotation.
pub const ROTATION_SPACING: std::time::Duration = std::time::Duration::from_millis(100);

/// One ESP peer's configuration.
#[derive(Clone, Debug)]
pub struct EspPeerConfig {
    pub name: Option<String>,
    pub endpoint: SocketAddr,
    pub allowed_prefixes: Vec<IpPrefix>,
    /// Our side's traffic selectors (IKE): decrypted packets to any other
    /// destination are dropped (RFC 4301 §5.2). Empty: not checked (the
    /// peer's routes decide, as for manual keys).
    pub local_prefixes: Vec<IpPrefix>,
    pub esn: bool,
    pub lifetimes: Lifetimes,
    pub keying: Arc<dyn EspKeying>,
}

/// Why [`EspCore::install_pair`] refused an SA pair; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    #[error("{0}")]
    Sa(#[from] SaError),
    #[error("inbound SPI {0:#010x} is already used by another SA")]
    SpiConflict(u32),
    #[error("the peer was removed")]
    Removed,
    #[error("this peer's keys are derived, not pushed")]
    Derived,
}

/// A datagram on the ESP port that carries IKE (non-ESP marker, RFC 3948 §2.2),
/// handed to the control plane with the marker removed.
#[derive(Debug)]
pub struct ControlDatagram {
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
    /// It came to the IKE port (500, no marker), not the ESP port.
    pub via_ike_port: bool,
    /// A new exchange holds one of the [`MAX_QUEUED_INITS`] places until dropped.
    _init: Option<InitSlot>,
}

impl ControlDatagram {
    /// A datagram as the data path hands it over (for tests of the control plane).
    pub fn new(from: SocketAddr, bytes: Vec<u8>) -> Self {
        Self {
            from,
            bytes,
            via_ike_port: false,
            _init: None,
        }
    }

    /// A datagram from the IKE port (500), where IKE starts before it moves to the
    /// ESP port (RFC 3948, NAT traversal).
    pub fn on_ike_port(from: SocketAddr, bytes: Vec<u8>) -> Self {
        Self {
            from,
            bytes,
            via_ike_port: true,
            _init: None,
        }
    }
}

/// IKE_SA_INIT requests queued for the control plane at most.
pub const MAX_QUEUED_INITS: usize = 32;

/// One queued IKE_SA_INIT request's place; freed when its datagram is dropped.
#[derive(Debug)]
struct InitSlot(Arc<AtomicUsize>);

impl Drop for InitSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Errors setting up ESP peers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EspError {
    #[error("peer {peer}: {source}")]
    Sa { peer: usize, source: SaError },
    #[error("peer {peer}: {source}")]
    Keying { peer: usize, source: KeyingError },
    #[error("peer {peer}: inbound SPI {spi:#010x} is already used by another SA")]
    SpiConflict { peer: usize, spi: u32 },
    #[error("prefix {prefix} is claimed by two ESP peers")]
    PrefixConflict { prefix: IpPrefix },
}

struct TxState {
    sa: OutboundSa,
    rekeys: u64,
    /// An operator asked for a new generation ([`EspPeer::request_rotation`]):
    /// the next packet goes out on it.
    rotation_pending: bool,
    /// Rotations asked for by an operator and applied.
    rotations: u64,
    /// When the last one was applied.
    last_rotation: Option<std::time::SystemTime>,
    /// Pushed keys ([`EspCore::install_pair`]): the next outbound SA, used once
    /// the peer is heard on its inbound twin or deletes the pair in use.
    staged: Option<OutboundSa>,
}

struct RxState {
    /// Ordered by generation.
    sas: Vec<InboundSa>,
    /// Newest generation a packet arrived on.
    active: u64,
    /// When the last authentic packet arrived from the peer.
    last_packet: Option<Instant>,
}

/// One ESP peer and its SAs.
pub struct EspPeer {
    config: EspPeerConfig,
    tx: Mutex<TxState>,
    rx: Mutex<RxState>,
    pub counters: PeerCounters,
}

impl std::fmt::Debug for EspPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EspPeer")
            .field("name", &self.config.name)
            .field("endpoint", &self.config.endpoint)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What `isthmusctl status` shows of an ESP peer: SPIs, sequence numbers,
/// ages — never keys.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct EspPeerStatus {
    pub cipher: String,
    pub esn: bool,
    /// Outbound SA replacements, at the soft lifetime or asked for.
    pub rekeys: u64,
    /// Replacements asked for by an operator (`isthmusctl sa rotate`).
    #[serde(default)]
    pub rotations: u64,
    /// A rotation asked for waits for the next packet to this peer.
    #[serde(default)]
    pub rotation_pending: bool,
    /// When the last rotation asked for was applied (Unix seconds).
    #[serde(default)]
    pub last_rotation_unix: Option<f64>,
    pub outbound: OutboundSaStatus,
    pub inbound: Vec<InboundSaStatus>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct OutboundSaStatus {
    pub spi: String,
    pub generation: u64,
    pub last_seq: u64,
    pub age_secs: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct InboundSaStatus {
    pub spi: String,
    pub generation: u64,
    pub highest_seq: u64,
    pub packets: u64,
    pub age_secs: f64,
    /// Replaced by a newer SA; accepts late packets until removed.
    pub retiring: bool,
}

impl EspPeer {
    pub fn config(&self) -> &EspPeerConfig {
        &self.config
    }
    pub fn stats(&self) -> PeerStats {
        self.counters.snapshot()
    }
    /// Asks for the outbound SA to be replaced by the next generation
    /// (instead of at its soft lifetime): a packet to this peer goes out on
    /// it once the generation in use has been out for [`ROTATION_SPACING`]
    /// and the peer was heard from since. The peer accepts it already: its
    /// inbound SAs for the next two generations are installed ahead of use.
    /// Asking again before it happened changes nothing. While the peer is
    /// silent (an outage) a rotation stays pending, so the sender cannot run
    /// past the peer's lookahead; a path that loses only our direction for
    /// two whole generations can still do that. Returns the generation in
    /// use now.
    pub fn request_rotation(&self) -> u64 {
        let mut tx = lock(&self.tx);
        tx.rotation_pending = true;
        tx.sa.generation
    }

    /// Whether the SAs in use have had `share` (0 to 1) of their hard limits
    /// (time, packets or bytes): the outbound one, or the newest inbound one.
    /// For keys pushed by IKE, whose rekeys come from the peer.
    pub fn nears_hard_limit(&self, share: f64, now: Instant) -> bool {
        let hard = self.config.lifetimes.hard;
        let scaled = sa::Limits {
            time: hard.time.mul_f64(share),
            packets: (hard.packets as f64 * share) as u64,
            bytes: (hard.bytes as f64 * share) as u64,
        };
        if lock(&self.tx).sa.reached(&scaled, now) {
            return true;
        }
        let rx = lock(&self.rx);
        rx.sas
            .iter()
            .filter(|sa| sa.retire_at.is_none())
            .max_by_key(|sa| sa.generation)
            .is_some_and(|sa| sa.reached(&scaled, now))
    }

    pub fn status(&self, now: Instant) -> EspPeerStatus {
        let tx = lock(&self.tx);
        let rx = lock(&self.rx);
        EspPeerStatus {
            cipher: self.config.keying.cipher().name().to_string(),
            esn: self.config.esn,
            rekeys: tx.rekeys,
            rotations: tx.rotations,
            rotation_pending: tx.rotation_pending,
            last_rotation_unix: tx.last_rotation.and_then(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs_f64())
            }),
            outbound: OutboundSaStatus {
                spi: format!("{:#010x}", tx.sa.spi),
                generation: tx.sa.generation,
                last_seq: tx.sa.last_seq(),
                age_secs: now.saturating_duration_since(tx.sa.created).as_secs_f64(),
            },
            inbound: rx
                .sas
                .iter()
                .map(|sa| InboundSaStatus {
                    spi: format!("{:#010x}", sa.spi),
                    generation: sa.generation,
                    highest_seq: sa.top(),
                    packets: sa.packets,
                    age_secs: sa
                        .first_used
                        .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64()),
                    retiring: sa.retire_at.is_some(),
                })
                .collect(),
        }
    }
}

/// A snapshot of the ESP peers and their routes.
#[derive(Debug, Default)]
pub struct EspPeerSet {
    peers: Vec<Arc<EspPeer>>,
    routes: PrefixTable<Arc<EspPeer>>,
}

impl EspPeerSet {
    pub fn peers(&self) -> &[Arc<EspPeer>] {
        &self.peers
    }
    pub fn route(&self, dst: IpAddr) -> Option<&Arc<EspPeer>> {
        self.routes.lookup(dst)
    }
}

/// The ESP state of one gateway.
#[derive(Debug)]
pub struct EspCore {
    set: RwLock<Arc<EspPeerSet>>,
    /// Inbound SPI → peer, for every installed inbound SA.
    spis: RwLock<HashMap<u32, Arc<EspPeer>>>,
    pub counters: DeviceCounters,
    /// IKE datagrams go here, when a key exchange runs, from these addresses.
    control: std::sync::OnceLock<(std::sync::mpsc::SyncSender<ControlDatagram>, Vec<IpAddr>)>,
    control_overflow: AtomicU64,
    /// IKE_SA_INIT requests queued for the control plane now.
    control_inits: Arc<AtomicUsize>,
}

/// The destination of an inner packet whose version matched.
fn inner_destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let b: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        Some(6) => {
            let b: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

fn version_matches(next_header: u8, packet: &[u8]) -> Option<IpAddr> {
    match (next_header, packet.first().map(|b| b >> 4)) {
        (NEXT_HEADER_IPV4, Some(4)) if packet.len() >= 20 => {
            let b: [u8; 4] = packet[12..16].try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        (NEXT_HEADER_IPV6, Some(6)) if packet.len() >= 40 => {
            let b: [u8; 16] = packet[8..24].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

impl EspCore {
    /// Builds the peers; every SA of generations 0 to 2 is checked here,
    /// before any socket exists.
    pub fn new(configs: Vec<EspPeerConfig>, now: Instant) -> Result<Self, EspError> {
        let core = Self {
            set: RwLock::new(Arc::default()),
            spis: RwLock::new(HashMap::new()),
            counters: DeviceCounters::default(),
            control: std::sync::OnceLock::new(),
            control_overflow: AtomicU64::new(0),
            control_inits: Arc::default(),
        };
        for (i, cfg) in configs.into_iter().enumerate() {
            core.add_peer_indexed(i, cfg, now)?;
        }
        Ok(core)
    }

    /// Adds a peer at run time (e.g. when its authenticated channel comes
    /// up). Refused, changing nothing, if an SPI or prefix clashes.
    pub fn add_peer(&self, cfg: EspPeerConfig, now: Instant) -> Result<Arc<EspPeer>, EspError> {
        let index = self.peers().peers.len();
        self.add_peer_indexed(index, cfg, now)
    }

    fn add_peer_indexed(
        &self,
        i: usize,
        cfg: EspPeerConfig,
        now: Instant,
    ) -> Result<Arc<EspPeer>, EspError> {
        let cipher = cfg.keying.cipher();
        let sa_err = |source| EspError::Sa { peer: i, source };
        let key_err = |source| EspError::Keying { peer: i, source };
        let first = cfg.keying.sa_pair(0).map_err(key_err)?;
        let tx = OutboundSa::new(cipher, &first.outbound, cfg.esn, 0, now).map_err(sa_err)?;
        let ahead = if cfg.keying.derives_ahead() {
            LOOKAHEAD
        } else {
            0
        };
        let mut sas = Vec::new();
        for generation in 0..=ahead {
            let pair = cfg.keying.sa_pair(generation).map_err(key_err)?;
            sas.push(InboundSa::new(cipher, &pair.inbound, cfg.esn, generation).map_err(sa_err)?);
        }
        let peer = Arc::new(EspPeer {
            tx: Mutex::new(TxState {
                sa: tx,
                rekeys: 0,
                rotation_pending: false,
                rotations: 0,
                last_rotation: None,
                staged: None,
            }),
            rx: Mutex::new(RxState {
                sas,
                active: 0,
                last_packet: None,
            }),
            counters: PeerCounters::default(),
            config: cfg,
        });
        // Both locks, in a fixed order (set, then SPIs), for an atomic swap.
        let mut set_guard = self.set.write().unwrap_or_else(|e| e.into_inner());
        let mut spis = self.spis.write().unwrap_or_else(|e| e.into_inner());
        let inbound: Vec<u32> = lock(&peer.rx).sas.iter().map(|sa| sa.spi).collect();
        for (k, spi) in inbound.iter().enumerate() {
            if spis.contains_key(spi) || inbound[..k].contains(spi) {
                return Err(EspError::SpiConflict { peer: i, spi: *spi });
            }
        }
        let mut routes = set_guard.routes.clone();
        for prefix in &peer.config.allowed_prefixes {
            if routes.insert(*prefix, peer.clone()).is_some() {
                return Err(EspError::PrefixConflict { prefix: *prefix });
            }
        }
        for spi in inbound {
            spis.insert(spi, peer.clone());
        }
        let mut peers = set_guard.peers.clone();
        peers.push(peer.clone());
        *set_guard = Arc::new(EspPeerSet { peers, routes });
        Ok(peer)
    }

    /// Removes a peer: its SAs stop at once (packets to its prefixes are
    /// then dropped as having no route).
    pub fn remove_peer(&self, peer: &Arc<EspPeer>) {
        let mut set_guard = self.set.write().unwrap_or_else(|e| e.into_inner());
        let mut spis = self.spis.write().unwrap_or_else(|e| e.into_inner());
        spis.retain(|_, p| !Arc::ptr_eq(p, peer));
        let peers: Vec<_> = set_guard
            .peers
            .iter()
            .filter(|p| !Arc::ptr_eq(p, peer))
            .cloned()
            .collect();
        let mut routes = PrefixTable::new();
        for p in &peers {
            for prefix in &p.config.allowed_prefixes {
                routes.insert(*prefix, p.clone());
            }
        }
        *set_guard = Arc::new(EspPeerSet { peers, routes });
    }

    pub fn peers(&self) -> Arc<EspPeerSet> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn register_spi(&self, spi: u32, peer: &Arc<EspPeer>) {
        // Lock order everywhere: the set, then the SPI map.
        let set = self.set.read().unwrap_or_else(|e| e.into_inner());
        let mut spis = self.spis.write().unwrap_or_else(|e| e.into_inner());
        // A peer removed meanwhile does not come back through a rekey.
        let live = set.peers.iter().any(|p| Arc::ptr_eq(p, peer));
        if live {
            match spis.get(&spi) {
                None => {
                    spis.insert(spi, peer.clone());
                }
                Some(owner) if Arc::ptr_eq(owner, peer) => {}
                Some(_) => tracing::warn!(
                    spi = format_args!("{spi:#010x}"),
                    "derived inbound SPI collides with another peer's; that SA stays unreachable"
                ),
            }
        }
    }

    /// Removes `spi` if it still maps to `peer` (never another peer's).
    fn unregister_spi(&self, spi: u32, peer: &Arc<EspPeer>) {
        let mut spis = self.spis.write().unwrap_or_else(|e| e.into_inner());
        if spis.get(&spi).is_some_and(|p| Arc::ptr_eq(p, peer)) {
            spis.remove(&spi);
        }
    }

    /// Encrypts one packet for `peer` into `out` (which needs
    /// `packet.len() + ESP_MAX_OVERHEAD` bytes). Rekeys at the soft lifetime.
    pub fn encapsulate(
        &self,
        peer: &EspPeer,
        packet: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Outbound {
        let lifetimes = &peer.config.lifetimes;
        let derives = peer.config.keying.derives_ahead();
        let mut tx = lock(&peer.tx);
        if !derives {
            let heard = tx
                .staged
                .as_ref()
                .is_some_and(|next| lock(&peer.rx).active >= next.generation);
            if heard {
                Self::switch_staged(peer, &mut tx, "the peer sends on its twin");
            }
        }
        // An asked-for rotation waits until the generation in use has been
        // out for ROTATION_SPACING and the peer was heard from since it took
        // over: rotating on and on while nothing comes back (an outage)
        // would run past the peer's lookahead and leave it unable to read
        // anything we send.
        let rotating = derives
            && tx.rotation_pending
            && now.saturating_duration_since(tx.sa.created) >= ROTATION_SPACING
            && lock(&peer.rx)
                .last_packet
                .is_some_and(|t| t >= tx.sa.created);
        if rotating || (derives && tx.sa.reached(&lifetimes.soft, now)) {
            let next = tx.sa.generation + 1;
            let cipher = peer.config.keying.cipher();
            match peer
                .config
                .keying
                .sa_pair(next)
                .map_err(|e| e.to_string())
                .and_then(|pair| {
                    OutboundSa::new(cipher, &pair.outbound, peer.config.esn, next, now)
                        .map_err(|e| e.to_string())
                }) {
                Ok(sa) => {
                    tracing::info!(
                        peer = ?peer.config.name,
                        old_spi = format_args!("{:#010x}", tx.sa.spi),
                        new_spi = format_args!("{:#010x}", sa.spi),
                        generation = next,
                        "ESP outbound SA replaced {}",
                        if rotating { "as asked" } else { "at its soft lifetime" }
                    );
                    tx.sa = sa;
                    tx.rekeys += 1;
                    if rotating {
                        tx.rotation_pending = false;
                        tx.rotations += 1;
                        tx.last_rotation = Some(std::time::SystemTime::now());
                    }
                }
                // Keep using the old SA until its hard limit.
                Err(e) => tracing::warn!(peer = ?peer.config.name, error = %e, "ESP rekey failed"),
            }
        }
        match tx.sa.seal(packet, out, &lifetimes.hard, now) {
            Ok(len) => {
                drop(tx);
                peer.counters.sent(len);
                Outbound::Send {
                    to: peer.config.endpoint,
                    len,
                    data: true,
                }
            }
            Err(SealError::NotIp) => {
                drop(tx);
                self.counters.dropped(DropReason::Malformed);
                Outbound::Dropped(DropReason::Malformed)
            }
            Err(SealError::Expired | SealError::BufferTooSmall) => {
                drop(tx);
                peer.counters.dropped(DropReason::NoSession);
                Outbound::Dropped(DropReason::NoSession)
            }
        }
    }

    /// Handles one UDP datagram from the ESP port. The inner packet, if
    /// any, is decrypted into `out` (at least as long as the datagram).
    pub fn decapsulate(
        &self,
        set: &EspPeerSet,
        datagram: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Inbound {
        let Some(spi) = datagram_spi(datagram) else {
            if datagram == [0xff] {
                // NAT keepalive (RFC 3948 §2.3).
                return Inbound::Consumed;
            }
            // Zero non-ESP marker (IKE) with no key exchange running
            // ([`Self::receive`] hands it over when one runs).
            return self.device_drop(DropReason::Malformed);
        };
        let peer = {
            let spis = self.spis.read().unwrap_or_else(|e| e.into_inner());
            match spis.get(&spi) {
                Some(p) => p.clone(),
                None => return self.device_drop(DropReason::UnknownPeer),
            }
        };
        let lifetimes = peer.config.lifetimes;
        let mut rx = lock(&peer.rx);
        let Some(index) = rx.sas.iter().position(|sa| sa.spi == spi) else {
            drop(rx);
            return self.device_drop(DropReason::UnknownPeer);
        };
        let opened = match rx.sas[index].open(datagram, out, &lifetimes.hard, now) {
            Ok(o) => o,
            Err(e) => {
                drop(rx);
                let reason = match e {
                    OpenError::Replay(ReplayError::Duplicate) => DropReason::Replay,
                    OpenError::Replay(_) => DropReason::TooOld,
                    OpenError::Icv => DropReason::DecryptFailure,
                    OpenError::Malformed => DropReason::Malformed,
                    OpenError::Expired => DropReason::NoSession,
                };
                if reason == DropReason::Malformed {
                    self.counters.dropped(reason);
                } else {
                    peer.counters.dropped(reason);
                }
                return Inbound::Dropped(reason);
            }
        };
        let generation = rx.sas[index].generation;
        if generation > rx.active {
            self.promote(&peer, &mut rx, generation, now);
        }
        rx.last_packet = Some(now);
        drop(rx);
        peer.counters.received(datagram.len());
        if opened.next_header == NEXT_HEADER_NONE {
            return Inbound::Consumed;
        }
        let packet = &out[..opened.len];
        let Some(src) = version_matches(opened.next_header, packet) else {
            self.counters.dropped(DropReason::Malformed);
            return Inbound::Dropped(DropReason::Malformed);
        };
        let local = &peer.config.local_prefixes;
        let to_us = local.is_empty()
            || inner_destination(packet).is_some_and(|dst| local.iter().any(|p| p.contains(dst)));
        if to_us
            && set
                .route(src)
                .is_some_and(|owner| std::ptr::eq(&**owner, &*peer))
        {
            Inbound::Tun {
                offset: 0,
                len: opened.len,
            }
        } else {
            peer.counters.dropped(DropReason::BadSource);
            Inbound::Dropped(DropReason::BadSource)
        }
    }

    /// The peer started sending on a newer generation: retire older
    /// inbound SAs after the grace period and install the next ones.
    fn promote(&self, peer: &Arc<EspPeer>, rx: &mut RxState, generation: u64, now: Instant) {
        let retire_at = now + peer.config.lifetimes.grace;
        for sa in rx.sas.iter_mut().filter(|sa| sa.generation < generation) {
            sa.retire_at.get_or_insert(retire_at);
        }
        rx.active = generation;
        let cipher = peer.config.keying.cipher();
        let have = rx.sas.iter().map(|sa| sa.generation).max().unwrap_or(0);
        let ahead = if peer.config.keying.derives_ahead() {
            LOOKAHEAD
        } else {
            0
        };
        for next in have + 1..=generation + ahead {
            let installed = peer
                .config
                .keying
                .sa_pair(next)
                .map_err(|e| e.to_string())
                .and_then(|pair| {
                    InboundSa::new(cipher, &pair.inbound, peer.config.esn, next)
                        .map_err(|e| e.to_string())
                });
            match installed {
                Ok(sa) => {
                    self.register_spi(sa.spi, peer);
                    rx.sas.push(sa);
                }
                Err(e) => {
                    tracing::warn!(peer = ?peer.config.name, error = %e, "cannot install next inbound SA")
                }
            }
        }
        tracing::info!(peer = ?peer.config.name, generation, "ESP peer switched to a new SA");
    }

    /// Installs the next SA pair of a peer whose keys are pushed (IKE, a
    /// [`keying::PushedKeying`]): the inbound SA at once; the outbound one now
    /// if `switch_now` (we initiated the rekey, so the peer has the pair),
    /// otherwise once the peer sends on the new inbound SA or deletes the pair
    /// in use ([`Self::remove_inbound`]). Returns the pair's generation.
    pub fn install_pair(
        &self,
        peer: &Arc<EspPeer>,
        pair: &SaPair,
        switch_now: bool,
        now: Instant,
    ) -> Result<u64, InstallError> {
        if peer.config.keying.derives_ahead() {
            return Err(InstallError::Derived);
        }
        let cipher = peer.config.keying.cipher();
        let esn = peer.config.esn;
        // Lock order everywhere: tx, rx, the set, the SPI map.
        let mut tx = lock(&peer.tx);
        let mut rx = lock(&peer.rx);
        let newest = rx
            .sas
            .iter()
            .map(|sa| sa.generation)
            .chain([tx.sa.generation])
            .chain(tx.staged.as_ref().map(|sa| sa.generation))
            .max()
            .unwrap_or(0);
        let generation = newest + 1;
        let inbound = InboundSa::new(cipher, &pair.inbound, esn, generation)?;
        let outbound = OutboundSa::new(cipher, &pair.outbound, esn, generation, now)?;
        {
            let set = self.set.read().unwrap_or_else(|e| e.into_inner());
            let mut spis = self.spis.write().unwrap_or_else(|e| e.into_inner());
            if !set.peers.iter().any(|p| Arc::ptr_eq(p, peer)) {
                return Err(InstallError::Removed);
            }
            if spis.contains_key(&inbound.spi) {
                return Err(InstallError::SpiConflict(inbound.spi));
            }
            spis.insert(inbound.spi, peer.clone());
        }
        rx.sas.push(inbound);
        drop(rx);
        tx.staged = Some(outbound);
        if switch_now {
            Self::switch_staged(peer, &mut tx, "we rekeyed");
        }
        Ok(generation)
    }

    /// Puts the staged outbound SA in use.
    fn switch_staged(peer: &EspPeer, tx: &mut TxState, why: &str) {
        if let Some(next) = tx.staged.take() {
            tracing::info!(
                peer = ?peer.config.name,
                old_spi = format_args!("{:#010x}", tx.sa.spi),
                new_spi = format_args!("{:#010x}", next.spi),
                generation = next.generation,
                "ESP outbound SA replaced: {why}"
            );
            tx.sa = next;
            tx.rekeys += 1;
        }
    }

    /// Removes the inbound SA `spi` of `peer` at once (the key exchange deleted
    /// its pair). A staged outbound SA newer than it goes in use: a peer that
    /// deletes the old pair has the new one. Returns whether it was installed.
    pub fn remove_inbound(&self, peer: &Arc<EspPeer>, spi: u32) -> bool {
        let mut tx = lock(&peer.tx);
        let mut rx = lock(&peer.rx);
        let Some(index) = rx.sas.iter().position(|sa| sa.spi == spi) else {
            return false;
        };
        let removed = rx.sas.remove(index);
        drop(rx);
        if tx
            .staged
            .as_ref()
            .is_some_and(|next| next.generation > removed.generation)
        {
            Self::switch_staged(peer, &mut tx, "the peer deleted the pair in use");
        }
        drop(tx);
        self.unregister_spi(spi, peer);
        true
    }

    /// Where IKE datagrams arriving on the ESP port go ([`Self::receive`]):
    /// only those from `peers` (the addresses of the IKE peers), and at most
    /// [`MAX_QUEUED_INITS`] IKE_SA_INIT requests queued at a time, so a flood of
    /// new exchanges leaves room for the established ones. Set once; returns
    /// false if one was set before.
    pub fn set_control_inbox(
        &self,
        inbox: std::sync::mpsc::SyncSender<ControlDatagram>,
        peers: Vec<IpAddr>,
    ) -> bool {
        self.control.set((inbox, peers)).is_ok()
    }

    /// Handles one datagram from the ESP port: IKE (non-ESP marker) goes to the
    /// control inbox if there is one, the rest to [`Self::decapsulate`].
    pub fn receive(
        &self,
        set: &EspPeerSet,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Inbound {
        if let (Some([0, 0, 0, 0]), Some((inbox, peers))) = (datagram.get(..4), self.control.get())
        {
            if !peers.contains(&from.ip()) {
                return self.device_drop(DropReason::UnknownPeer);
            }
            let bytes = &datagram[4..];
            // A new exchange (responder's SPI zero) takes one of a few places.
            let init = match bytes.get(8..16) {
                Some(spi_r) if spi_r == [0; 8] => {
                    let queued = self.control_inits.fetch_add(1, Ordering::Relaxed);
                    if queued >= MAX_QUEUED_INITS {
                        self.control_inits.fetch_sub(1, Ordering::Relaxed);
                        self.control_overflow.fetch_add(1, Ordering::Relaxed);
                        return Inbound::Consumed;
                    }
                    Some(InitSlot(self.control_inits.clone()))
                }
                _ => None,
            };
            let d = ControlDatagram {
                from,
                bytes: bytes.to_vec(),
                via_ike_port: false,
                _init: init,
            };
            if inbox.try_send(d).is_err() {
                // The control plane is behind (or gone): IKE retransmits.
                self.control_overflow.fetch_add(1, Ordering::Relaxed);
            }
            return Inbound::Consumed;
        }
        self.decapsulate(set, datagram, out, now)
    }

    /// IKE datagrams dropped because the control inbox (or its room for new
    /// exchanges) was full.
    pub fn control_overflow(&self) -> u64 {
        self.control_overflow.load(Ordering::Relaxed)
    }

    fn device_drop(&self, reason: DropReason) -> Inbound {
        self.counters.dropped(reason);
        Inbound::Dropped(reason)
    }

    /// Removes inbound SAs whose grace period or hard lifetime is over.
    /// Call every few hundred milliseconds.
    pub fn tick(&self, now: Instant) {
        for peer in self.peers().peers() {
            let hard = peer.config.lifetimes.hard;
            let mut rx = lock(&peer.rx);
            let mut removed = Vec::new();
            rx.sas.retain(|sa| {
                let done = sa.retire_at.is_some_and(|t| now >= t) || sa.reached(&hard, now);
                if done {
                    removed.push(sa.spi);
                }
                !done
            });
            drop(rx);
            for spi in removed {
                tracing::debug!(spi = format_args!("{spi:#010x}"), "inbound SA removed");
                self.unregister_spi(spi, peer);
            }
        }
    }
}

#[cfg(test)]
mod tests;
