//! WireGuard sessions for many peers, without I/O.
//!
//! [`WgCore`] owns the device's static key and the peer set. The driver hands
//! it plaintext packets read from the TUN device ([`WgCore::encapsulate`]) and
//! datagrams read from UDP ([`WgCore::decapsulate`]), and it answers with what
//! to send where. It never touches a socket, so tests wire two cores together
//! in memory. (boringtun's `Tunn` keeps its own monotonic clock for handshake
//! and rekey timers; the driver calls [`WgCore::tick`] every 250 ms.)
//!
//! Cryptokey routing: an outbound packet goes to the peer whose allowed
//! prefixes hold its destination (longest match); an inbound packet is
//! accepted only if its source lies in the allowed prefixes of the peer whose
//! key authenticated it.

use crate::counters::{DeviceCounters, DropReason, PeerCounters, PeerStats};
use crate::key::{PrivateKey, PublicKey};
use crate::prefix::{IpPrefix, PrefixTable};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

/// Bytes a WireGuard data message adds to a packet (header, counter, tag),
/// not counting padding to 16 bytes.
pub const WG_OVERHEAD: usize = 32;
/// Size of a handshake initiation, the largest message that is not data.
pub const WG_HANDSHAKE_INIT_LEN: usize = 148;

/// What one peer is configured with.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: Option<String>,
    pub public_key: PublicKey,
    /// Earlier static keys of the same peer that are still accepted while
    /// it rotates its key (at most [`MAX_PEER_KEYS`]` - 1`). Handshakes go
    /// toward `public_key`; sessions made under these keep working.
    pub previous_keys: Vec<PublicKey>,
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_prefixes: Vec<IpPrefix>,
    /// Seconds between keepalives when idle; `None` or 0 turns them off.
    pub persistent_keepalive: Option<u16>,
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("name", &self.name)
            .field("public_key", &self.public_key)
            .field("previous_keys", &self.previous_keys)
            .field("preshared_key", &self.preshared_key.map(|_| "<redacted>"))
            .field("endpoint", &self.endpoint)
            .field("allowed_prefixes", &self.allowed_prefixes)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .finish()
    }
}

/// Errors from changing the peer set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerSetError {
    #[error("peer {0} is configured twice")]
    DuplicatePeer(PublicKey),
    #[error("peer {0} has this gateway's own public key")]
    OwnKey(PublicKey),
    #[error("prefix {prefix} is claimed by two peers ({first} and {second})")]
    PrefixConflict {
        prefix: IpPrefix,
        first: PublicKey,
        second: PublicKey,
    },
    #[error("too many peers have been created in this process")]
    IndexSpaceExhausted,
    #[error("peer {0} has more than {MAX_PEER_KEYS} static keys")]
    TooManyKeys(PublicKey),
}

/// Errors from changing this device's own static keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyChangeError {
    #[error("key epoch {0} is waiting to be put in force; finish or retire it first")]
    Pending(u64),
    #[error("this key is already one of the device's keys")]
    AlreadyInstalled,
    #[error("this key is a configured peer's key")]
    PeerKey,
    #[error("no key of epoch {0}")]
    NoSuchEpoch(u64),
    #[error("key epoch {0} is the one in force")]
    InForce(u64),
    #[error("key epoch {0} is older than the one in force")]
    NotNewer(u64),
    #[error(
        "key epoch {epoch} would be retired but peer {peer} still uses it; try again in a moment"
    )]
    InUse { epoch: u64, peer: PublicKey },
    #[error(transparent)]
    Peers(#[from] PeerSetError),
}

/// Static keys a peer may have at once (its current key and the ones it
/// is rotating away from).
pub const MAX_PEER_KEYS: usize = 3;
/// Static keys this device holds at once: the one in force, one waiting to
/// be put in force, and the ones still accepted after a rotation.
pub const MAX_LOCAL_KEYS: usize = 3;

/// One of this device's static keys, with the handshake limiter that
/// checks mac1 (which is keyed by the public key) under it.
struct LocalKey {
    epoch: u64,
    secret: boringtun::x25519::StaticSecret,
    public: boringtun::x25519::PublicKey,
    limiter: Arc<RateLimiter>,
}

impl LocalKey {
    fn new(epoch: u64, key: &PrivateKey) -> Self {
        let secret = key.to_secret();
        let public = boringtun::x25519::PublicKey::from(&secret);
        Self {
            epoch,
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
        }
    }
    fn public_key(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }
}

/// The device's static keys, newest first, and the epoch of the one it
/// initiates handshakes with (the key in force). Every key is accepted
/// for handshakes from peers.
#[derive(Clone, Default)]
struct LocalKeys {
    keys: Vec<Arc<LocalKey>>,
    in_force: u64,
}

impl std::fmt::Debug for LocalKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeys")
            .field(
                "epochs",
                &self.keys.iter().map(|k| k.epoch).collect::<Vec<_>>(),
            )
            .field("in_force", &self.in_force)
            .finish()
    }
}

impl LocalKeys {
    fn in_force(&self) -> Option<&Arc<LocalKey>> {
        self.keys.iter().find(|k| k.epoch == self.in_force)
    }
}

/// One of this device's static keys as status shows it (never the
/// private half).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub epoch: u64,
    pub public_key: PublicKey,
    /// The key handshakes are initiated with.
    pub in_force: bool,
}

/// One WireGuard state machine of a peer: for one of this device's keys
/// and one of the peer's keys. A peer has one slot for each pair while
/// either side rotates its static key, so sessions made under an old pair
/// keep working while the new pair comes up (make before break).
struct Slot {
    local: Arc<LocalKey>,
    remote: PublicKey,
    /// boringtun's local index: session indices are `index << 8 | n`.
    index: u32,
    tunn: Tunn,
    /// The [`WgCore::tick`] count when an authenticated datagram last came
    /// in on this slot.
    last_rx_tick: Option<u64>,
}

impl Slot {
    fn has_session(&self) -> bool {
        self.tunn.time_since_last_handshake().is_some()
    }
}

/// The part of a peer's state that changes with every packet or handshake.
struct Session {
    slots: Vec<Slot>,
    /// The slot packets are sent with.
    active: usize,
    /// The slot of the key in force and the peer's newest key: packets move
    /// to it as soon as it has a session.
    preferred: usize,
    endpoint: Option<SocketAddr>,
}

impl Session {
    /// The slot to send with, moving to the preferred one once it has a
    /// session.
    fn sender(&mut self) -> &mut Slot {
        if self.active != self.preferred && self.slots[self.preferred].has_session() {
            self.active = self.preferred;
        }
        &mut self.slots[self.active]
    }
    fn slot_by_index(&mut self, index: u32) -> Option<&mut Slot> {
        self.slots.iter_mut().find(|s| s.index == index)
    }
    fn slot_for(&mut self, local_epoch: u64, remote: &PublicKey) -> Option<&mut Slot> {
        self.slots
            .iter_mut()
            .find(|s| s.local.epoch == local_epoch && s.remote == *remote)
    }
}

/// One configured peer and its live session.
pub struct Peer {
    /// What the session was built with; a change needs a new session.
    preshared_key: Option<[u8; 32]>,
    persistent_keepalive: Option<u16>,
    /// What may change without touching the session.
    meta: Mutex<PeerMeta>,
    session: Mutex<Session>,
    pub counters: PeerCounters,
}

#[derive(Debug, Clone)]
struct PeerMeta {
    name: Option<String>,
    allowed_prefixes: Vec<IpPrefix>,
    /// The peer's static keys, newest first.
    keys: Vec<PublicKey>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means another thread panicked mid-update; the value is
    // still a valid one, so keep going rather than take the gateway down.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Peer {
    /// The peer's newest static key (handshakes go toward it).
    pub fn public_key(&self) -> PublicKey {
        lock(&self.meta).keys[0]
    }
    /// Every static key of the peer, newest first.
    pub fn public_keys(&self) -> Vec<PublicKey> {
        lock(&self.meta).keys.clone()
    }
    /// The peer's configuration, with the endpoint it was last heard from.
    pub fn config(&self) -> PeerConfig {
        let meta = lock(&self.meta).clone();
        PeerConfig {
            name: meta.name,
            public_key: meta.keys[0],
            previous_keys: meta.keys[1..].to_vec(),
            preshared_key: self.preshared_key,
            endpoint: self.endpoint(),
            allowed_prefixes: meta.allowed_prefixes,
            persistent_keepalive: self.persistent_keepalive,
        }
    }
    fn session(&self) -> MutexGuard<'_, Session> {
        lock(&self.session)
    }
    /// The endpoint the peer was last heard from (or was configured with).
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.session().endpoint
    }
    /// Time of the last completed handshake, if a session is up.
    pub fn last_handshake(&self) -> Option<SystemTime> {
        let mut session = self.session();
        let since = session.sender().tunn.time_since_last_handshake()?;
        SystemTime::now().checked_sub(since)
    }
    /// The epoch of this device's key and the peer key that packets are
    /// sent with now.
    pub fn sending_with(&self) -> (u64, PublicKey) {
        let mut session = self.session();
        let slot = session.sender();
        (slot.local.epoch, slot.remote)
    }
    pub fn stats(&self) -> PeerStats {
        self.counters.snapshot()
    }
}

/// An immutable snapshot of the peers and their routes. The data path takes
/// one snapshot per batch; a configuration change swaps in a new one.
#[derive(Debug, Default)]
pub struct PeerSet {
    peers: Vec<Arc<Peer>>,
    by_key: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: PrefixTable<Arc<Peer>>,
    /// The device's own keys this snapshot's slots were made for.
    local: Arc<LocalKeys>,
}

impl PeerSet {
    pub fn peers(&self) -> &[Arc<Peer>] {
        &self.peers
    }
    pub fn get(&self, key: &PublicKey) -> Option<&Arc<Peer>> {
        self.by_key.get(key)
    }
    /// The peer whose allowed prefixes hold `dst` (longest match).
    pub fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.routes.lookup(dst)
    }
}

/// Outcome of [`WgCore::encapsulate`].
#[derive(Debug)]
pub enum Outbound {
    /// Send `len` bytes from the start of the output buffer to `to`.
    /// `data` is false for a handshake initiation.
    Send {
        to: SocketAddr,
        len: usize,
        data: bool,
    },
    Dropped(DropReason),
}

/// Outcome of [`WgCore::decapsulate`].
#[derive(Debug)]
pub enum Inbound {
    /// A packet of `len` bytes starting at `offset` in the output buffer is
    /// ready for the TUN device.
    Tun {
        offset: usize,
        len: usize,
    },
    /// Handled (handshake, keepalive, cookie); replies, if any, went
    /// through the `send` callback.
    Consumed,
    Dropped(DropReason),
}

/// The WireGuard state of one device: static key and peers.
pub struct WgCore {
    /// Serialises read-modify-write changes of the peer set.
    writer: Mutex<()>,
    /// The device's keys and the peers, swapped together.
    set: RwLock<Arc<PeerSet>>,
    egress: RwLock<Arc<crate::egress::EgressTable>>,
    next_index: AtomicU32,
    /// [`WgCore::tick`] calls so far: a clock for "recently" that costs the
    /// data path nothing.
    ticks: std::sync::atomic::AtomicU64,
    /// Indices of slots that are gone, oldest first.
    free_indices: Mutex<std::collections::VecDeque<u32>>,
    pub counters: DeviceCounters,
}

impl std::fmt::Debug for WgCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgCore")
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

/// The slot of the key in force and the peer's newest key (the first slot
/// if, impossibly, there is none).
fn preferred_slot(slots: &[Slot], local: &LocalKeys, keys: &[PublicKey]) -> usize {
    slots
        .iter()
        .position(|s| s.local.epoch == local.in_force && s.remote == keys[0])
        .unwrap_or(0)
}

/// Handshake messages a second before the device answers with cookies.
const HANDSHAKE_RATE_LIMIT: u64 = 200;

/// Largest peer index boringtun can carry (it shifts the index left by 8).
const MAX_INDEX: u32 = (1 << 24) - 1;

/// A random first peer index in 1..2^23, leaving at least 2^23 indices.
fn random_index_base() -> u32 {
    use rand_core::RngCore as _;
    (rand_core::OsRng.next_u32() & ((1 << 23) - 1)).max(1)
}

impl WgCore {
    pub fn new(private_key: PrivateKey, peers: Vec<PeerConfig>) -> Result<Self, PeerSetError> {
        let core = Self {
            writer: Mutex::new(()),
            set: RwLock::new(Arc::new(PeerSet {
                local: Arc::new(LocalKeys {
                    keys: vec![Arc::new(LocalKey::new(1, &private_key))],
                    in_force: 1,
                }),
                ..PeerSet::default()
            })),
            egress: RwLock::new(Arc::default()),
            // A random base, so session indices on the wire say nothing
            // about how many peers a gateway has or had.
            next_index: AtomicU32::new(random_index_base()),
            ticks: std::sync::atomic::AtomicU64::new(0),
            free_indices: Mutex::new(Default::default()),
            counters: DeviceCounters::default(),
        };
        core.set_peers(peers)?;
        Ok(core)
    }

    /// The public half of the key in force (handshakes are initiated
    /// with it).
    pub fn public_key(&self) -> PublicKey {
        let set = self.peers();
        set.local
            .in_force()
            .map(|k| k.public_key())
            .unwrap_or(PublicKey([0; 32]))
    }

    /// Every static key of this device, newest first (public halves).
    pub fn keys(&self) -> Vec<KeyInfo> {
        let set = self.peers();
        set.local
            .keys
            .iter()
            .map(|k| KeyInfo {
                epoch: k.epoch,
                public_key: k.public_key(),
                in_force: k.epoch == set.local.in_force,
            })
            .collect()
    }

    /// Whether `key` is this device's private key in force (so a request
    /// that restates it changes nothing).
    pub fn is_own_private_key(&self, key: &PrivateKey) -> bool {
        key.public_key() == self.public_key()
    }

    /// X25519 of this device's key `epoch` and `remote` (None: no such key,
    /// or a low-order `remote`).
    pub fn key_agreement(
        &self,
        epoch: u64,
        remote: &PublicKey,
    ) -> Option<zeroize::Zeroizing<[u8; 32]>> {
        let set = self.peers();
        let key = set.local.keys.iter().find(|k| k.epoch == epoch)?;
        let shared = key
            .secret
            .diffie_hellman(&boringtun::x25519::PublicKey::from(remote.0));
        shared
            .was_contributory()
            .then(|| zeroize::Zeroizing::new(shared.to_bytes()))
    }

    /// [`WgCore::key_agreement`] with each of this device's keys, newest
    /// first.
    pub fn key_agreements(&self, remote: &PublicKey) -> Vec<zeroize::Zeroizing<[u8; 32]>> {
        let epochs: Vec<u64> = self.peers().local.keys.iter().map(|k| k.epoch).collect();
        epochs
            .into_iter()
            .filter_map(|e| self.key_agreement(e, remote))
            .collect()
    }

    /// Adds a new static key, accepted for handshakes from now on but not
    /// yet used to initiate them ([`WgCore::promote_key`] does that once
    /// every peer knows it). Returns its epoch. Past [`MAX_LOCAL_KEYS`], the
    /// oldest key not in force is retired (its epoch is the second value).
    pub fn add_key(&self, key: &PrivateKey) -> Result<(u64, Option<u64>), KeyChangeError> {
        let _writer = lock(&self.writer);
        let set = self.peers();
        let mut local = (*set.local).clone();
        let newest = local.keys.first().map_or(0, |k| k.epoch);
        if newest != local.in_force {
            return Err(KeyChangeError::Pending(newest));
        }
        let public = key.public_key();
        if local.keys.iter().any(|k| k.public_key() == public) {
            return Err(KeyChangeError::AlreadyInstalled);
        }
        if set.by_key.contains_key(&public) {
            return Err(KeyChangeError::PeerKey);
        }
        let epoch = newest + 1;
        local.keys.insert(0, Arc::new(LocalKey::new(epoch, key)));
        let mut retired = None;
        if local.keys.len() > MAX_LOCAL_KEYS {
            if let Some(oldest) = local.keys.last() {
                if let Some(peer) = self.key_in_use(&set, oldest.epoch) {
                    return Err(KeyChangeError::InUse {
                        epoch: oldest.epoch,
                        peer,
                    });
                }
            }
            retired = local.keys.pop().map(|k| k.epoch);
        }
        self.install(self.peer_configs(), Arc::new(local))?;
        Ok((epoch, retired))
    }

    /// A peer that has a session under key `epoch` to send with, or sent a
    /// packet under it within the last four ticks (about a second).
    fn key_in_use(&self, set: &PeerSet, epoch: u64) -> Option<PublicKey> {
        let now = self.ticks.load(Ordering::Relaxed);
        set.peers.iter().find_map(|peer| {
            let session = peer.session();
            let active = session.slots.get(session.active);
            let busy = active.is_some_and(|s| s.local.epoch == epoch && s.has_session())
                || session.slots.iter().any(|s| {
                    s.local.epoch == epoch && s.last_rx_tick.is_some_and(|t| t + 4 >= now)
                });
            drop(session);
            busy.then(|| peer.public_key())
        })
    }

    /// Puts key `epoch` in force: handshakes are initiated with it, and
    /// each peer's packets move to it once its session is up.
    pub fn promote_key(&self, epoch: u64) -> Result<(), KeyChangeError> {
        let _writer = lock(&self.writer);
        let set = self.peers();
        let mut local = (*set.local).clone();
        if !local.keys.iter().any(|k| k.epoch == epoch) {
            return Err(KeyChangeError::NoSuchEpoch(epoch));
        }
        if epoch < local.in_force {
            return Err(KeyChangeError::NotNewer(epoch));
        }
        local.in_force = epoch;
        self.install(self.peer_configs(), Arc::new(local))?;
        Ok(())
    }

    /// Stops accepting key `epoch`; the sessions made under it go with it.
    pub fn retire_key(&self, epoch: u64) -> Result<(), KeyChangeError> {
        let _writer = lock(&self.writer);
        let set = self.peers();
        let mut local = (*set.local).clone();
        if epoch == local.in_force {
            return Err(KeyChangeError::InForce(epoch));
        }
        let before = local.keys.len();
        local.keys.retain(|k| k.epoch != epoch);
        if local.keys.len() == before {
            return Err(KeyChangeError::NoSuchEpoch(epoch));
        }
        self.install(self.peer_configs(), Arc::new(local))?;
        Ok(())
    }

    /// The current peer snapshot.
    pub fn peers(&self) -> Arc<PeerSet> {
        self.set.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The current egress policies.
    pub fn egress(&self) -> Arc<crate::egress::EgressTable> {
        self.egress
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the egress policies (the data path picks the new table up
    /// with its next batch).
    pub fn set_egress(&self, table: crate::egress::EgressTable) {
        *self.egress.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    /// The configuration of every current peer, with learned endpoints.
    pub fn peer_configs(&self) -> Vec<PeerConfig> {
        self.peers().peers.iter().map(|p| p.config()).collect()
    }

    /// Replaces the peer set with `configs`. A peer that keeps one of its
    /// keys, its preshared key and keepalive keeps its sessions and
    /// counters; its endpoint is updated when the new config names one.
    pub fn set_peers(&self, configs: Vec<PeerConfig>) -> Result<(), PeerSetError> {
        let local = self.peers().local.clone();
        self.install(configs, local)
    }

    /// Builds and swaps in a snapshot of `configs` for the keys `local`.
    fn install(&self, configs: Vec<PeerConfig>, local: Arc<LocalKeys>) -> Result<(), PeerSetError> {
        let mut taken = Vec::new();
        let result = self.install_with(configs, local, &mut taken);
        if result.is_err() {
            // Nothing changed: the indices taken for it are free again.
            self.free(taken);
        }
        result
    }

    fn install_with(
        &self,
        configs: Vec<PeerConfig>,
        local: Arc<LocalKeys>,
        taken: &mut Vec<u32>,
    ) -> Result<(), PeerSetError> {
        let mut guard = self.set.write().unwrap_or_else(|e| e.into_inner());
        let old = guard.clone();
        let mut next = PeerSet {
            local: local.clone(),
            ..PeerSet::default()
        };
        let mut updates = Vec::new();
        let mut reused = std::collections::HashSet::new();
        let own: Vec<PublicKey> = local.keys.iter().map(|k| k.public_key()).collect();
        for cfg in configs {
            let mut keys = vec![cfg.public_key];
            for k in &cfg.previous_keys {
                if !keys.contains(k) {
                    keys.push(*k);
                }
            }
            if keys.len() > MAX_PEER_KEYS {
                return Err(PeerSetError::TooManyKeys(cfg.public_key));
            }
            for key in &keys {
                if own.contains(key) {
                    return Err(PeerSetError::OwnKey(*key));
                }
                if next.by_key.contains_key(key) {
                    return Err(PeerSetError::DuplicatePeer(*key));
                }
            }
            let reusable = keys.iter().find_map(|k| old.by_key.get(k)).filter(|p| {
                p.preshared_key == cfg.preshared_key
                    && p.persistent_keepalive == cfg.persistent_keepalive
                    // One old peer carries on as one new peer, at most.
                    && reused.insert(Arc::as_ptr(p))
            });
            let meta = PeerMeta {
                name: cfg.name.clone(),
                allowed_prefixes: cfg.allowed_prefixes.clone(),
                keys: keys.clone(),
            };
            // The slots this peer needs: one per pair of keys. A kept peer
            // keeps the slots (and sessions) of pairs that remain.
            let mut plan = Vec::new();
            {
                let existing = reusable.map(|p| p.session());
                for l in &local.keys {
                    for r in &keys {
                        let kept = existing.as_ref().and_then(|s| {
                            s.slots
                                .iter()
                                .find(|x| x.local.epoch == l.epoch && x.remote == *r)
                                .map(|x| x.index)
                        });
                        let index = match kept {
                            Some(i) => i,
                            None => self.allocate_index(taken)?,
                        };
                        plan.push((l.clone(), *r, index, kept.is_some()));
                    }
                }
            }
            let peer = match reusable {
                Some(p) => {
                    // Same peer: only names, prefixes, keys, slots and
                    // endpoint change, and only once the whole new set is
                    // known to be valid.
                    updates.push((p.clone(), meta, cfg.endpoint, plan.clone()));
                    p.clone()
                }
                None => {
                    let slots: Vec<Slot> = plan
                        .iter()
                        .map(|(l, r, index, _)| self.new_slot(l, *r, &cfg, *index))
                        .collect();
                    let preferred = preferred_slot(&slots, &local, &keys);
                    Arc::new(Peer {
                        preshared_key: cfg.preshared_key,
                        persistent_keepalive: cfg.persistent_keepalive,
                        meta: Mutex::new(meta),
                        session: Mutex::new(Session {
                            slots,
                            active: preferred,
                            preferred,
                            endpoint: cfg.endpoint,
                        }),
                        counters: PeerCounters::default(),
                    })
                }
            };
            for prefix in &cfg.allowed_prefixes {
                if let Some(first) = next.routes.insert(*prefix, peer.clone()) {
                    return Err(PeerSetError::PrefixConflict {
                        prefix: *prefix,
                        first: first.public_key(),
                        second: cfg.public_key,
                    });
                }
            }
            for key in &keys {
                next.by_key.insert(*key, peer.clone());
            }
            for (_, _, index, _) in &plan {
                next.by_index.insert(*index, peer.clone());
            }
            next.peers.push(peer);
        }
        for (peer, meta, endpoint, plan) in updates {
            let cfg = PeerConfig {
                name: None,
                public_key: meta.keys[0],
                previous_keys: Vec::new(),
                preshared_key: peer.preshared_key,
                endpoint: None,
                allowed_prefixes: Vec::new(),
                persistent_keepalive: peer.persistent_keepalive,
            };
            let keys = meta.keys.clone();
            *lock(&peer.meta) = meta;
            let mut session = peer.session();
            let active = session
                .slots
                .get(session.active)
                .map(|s| (s.local.epoch, s.remote));
            let mut old_slots = std::mem::take(&mut session.slots);
            let slots: Vec<Slot> = plan
                .into_iter()
                .map(|(l, r, index, kept)| {
                    let found = kept
                        .then(|| old_slots.iter().position(|x| x.index == index))
                        .flatten();
                    match found {
                        Some(i) => old_slots.swap_remove(i),
                        None => self.new_slot(&l, r, &cfg, index),
                    }
                })
                .collect();
            let preferred = preferred_slot(&slots, &local, &keys);
            session.active = active
                .and_then(|(e, r)| {
                    slots
                        .iter()
                        .position(|s| s.local.epoch == e && s.remote == r)
                })
                .unwrap_or(preferred);
            session.preferred = preferred;
            session.slots = slots;
            if endpoint.is_some() {
                session.endpoint = endpoint;
            }
        }
        let gone: Vec<u32> = old
            .by_index
            .keys()
            .filter(|i| !next.by_index.contains_key(i))
            .copied()
            .collect();
        *guard = Arc::new(next);
        drop(guard);
        self.free(gone);
        Ok(())
    }

    /// A session index no slot uses: a fresh one while any are left, then
    /// the one freed longest ago.
    fn allocate_index(&self, taken: &mut Vec<u32>) -> Result<u32, PeerSetError> {
        let fresh = self
            .next_index
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| {
                (i <= MAX_INDEX).then_some(i + 1)
            })
            .ok();
        let index = match fresh {
            Some(i) => i,
            None => lock(&self.free_indices)
                .pop_front()
                .ok_or(PeerSetError::IndexSpaceExhausted)?,
        };
        taken.push(index);
        Ok(index)
    }

    /// Gives indices back for reuse (after every fresh one is used).
    fn free(&self, indices: impl IntoIterator<Item = u32>) {
        lock(&self.free_indices).extend(indices);
    }

    /// Changes the peer set as a read-modify-write under one lock, so two
    /// writers (the UAPI and the identity channel) never undo each other.
    pub fn update_peers(
        &self,
        change: impl FnOnce(&mut Vec<PeerConfig>),
    ) -> Result<(), PeerSetError> {
        let _writer = lock(&self.writer);
        let mut configs = self.peer_configs();
        change(&mut configs);
        self.set_peers(configs)
    }

    fn new_slot(
        &self,
        local: &Arc<LocalKey>,
        remote: PublicKey,
        cfg: &PeerConfig,
        index: u32,
    ) -> Slot {
        Slot {
            local: local.clone(),
            remote,
            index,
            last_rx_tick: None,
            tunn: Tunn::new(
                local.secret.clone(),
                boringtun::x25519::PublicKey::from(remote.0),
                cfg.preshared_key,
                cfg.persistent_keepalive.filter(|k| *k > 0),
                index,
                Some(local.limiter.clone()),
            ),
        }
    }

    /// Encrypts one packet read from the TUN device into `out`, which must
    /// hold at least `packet.len() + 32` and at least 148 bytes (a larger
    /// buffer is never needed: WireGuard pads to 16 bytes, capped at the
    /// buffer the caller gives, so give exactly `packet.len() + 48`).
    pub fn encapsulate(&self, set: &PeerSet, packet: &[u8], out: &mut [u8]) -> Outbound {
        let Some(dst) = Tunn::dst_address(packet) else {
            self.counters.dropped(DropReason::Malformed);
            return Outbound::Dropped(DropReason::Malformed);
        };
        let Some(peer) = set.route(dst) else {
            self.counters.dropped(DropReason::NoRoute);
            return Outbound::Dropped(DropReason::NoRoute);
        };
        self.encapsulate_to(peer, packet, out)
    }

    /// Encrypts one packet for `peer`, already chosen by routing.
    pub fn encapsulate_to(&self, peer: &Peer, packet: &[u8], out: &mut [u8]) -> Outbound {
        let needed = (packet.len() + WG_OVERHEAD + 15).max(WG_HANDSHAKE_INIT_LEN);
        if out.len() < needed {
            // A caller bug, not network input; refuse rather than panic.
            peer.counters.dropped(DropReason::NoSession);
            return Outbound::Dropped(DropReason::NoSession);
        }
        let mut session = peer.session();
        let Some(to) = session.endpoint else {
            drop(session);
            peer.counters.dropped(DropReason::NoSession);
            return Outbound::Dropped(DropReason::NoSession);
        };
        match session.sender().tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(datagram) => {
                let len = datagram.len();
                let data = datagram.first() == Some(&4);
                drop(session);
                if data {
                    peer.counters.sent(len);
                } else {
                    // No session: the packet was queued and a handshake
                    // initiation is to go out instead.
                    peer.counters.dropped(DropReason::NoSession);
                    peer.counters.sent(len);
                }
                Outbound::Send { to, len, data }
            }
            TunnResult::Err(e) => {
                drop(session);
                tracing::debug!(peer = %peer.public_key(), error = ?e, "encapsulate failed");
                peer.counters.dropped(DropReason::NoSession);
                Outbound::Dropped(DropReason::NoSession)
            }
            // Queued while a handshake is already under way.
            _ => {
                drop(session);
                peer.counters.dropped(DropReason::NoSession);
                Outbound::Dropped(DropReason::NoSession)
            }
        }
    }

    /// Handles one datagram from the network. A packet for the TUN device is
    /// decrypted into `out` (which must be at least as long as `datagram`);
    /// handshake replies and packets released by a new session go to `send`.
    pub fn decapsulate(
        &self,
        set: &PeerSet,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut [u8],
        send: &mut dyn FnMut(SocketAddr, &[u8]),
    ) -> Inbound {
        let parsed = match Tunn::parse_incoming_packet(datagram) {
            Ok(p) => p,
            Err(_) => return self.device_drop(DropReason::Malformed),
        };
        // Handshake messages must carry a valid mac1 (a keyed hash of our
        // public key) before we spend a Diffie-Hellman on them; under a
        // flood the device-wide limiter answers with a cookie instead.
        // mac1 is keyed by the receiver's public key, so it also says which
        // of this device's keys the sender addressed.
        let mut addressed = None;
        if matches!(
            parsed,
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_)
        ) {
            let mut cookie = [0u8; 64];
            for key in &set.local.keys {
                match key
                    .limiter
                    .verify_packet(Some(from.ip()), datagram, &mut cookie)
                {
                    Ok(_) => {
                        addressed = Some(key);
                        break;
                    }
                    Err(TunnResult::WriteToNetwork(reply)) => {
                        send(from, reply);
                        return Inbound::Consumed;
                    }
                    Err(_) => {}
                }
            }
            if addressed.is_none() {
                return self.device_drop(DropReason::Malformed);
            }
        }
        // (peer, slot index or (our key epoch, their key))
        let found = match (&parsed, addressed) {
            (Packet::HandshakeInit(init), Some(key)) => {
                match parse_handshake_anon(&key.secret, &key.public, init) {
                    Ok(half) => {
                        let remote = PublicKey(half.peer_static_public);
                        set.by_key
                            .get(&remote)
                            .map(|p| (p, SlotRef::Pair(key.epoch, remote)))
                    }
                    Err(_) => None,
                }
            }
            (Packet::HandshakeInit(_), None) => None,
            (Packet::HandshakeResponse(r), _) => set
                .by_index
                .get(&(r.receiver_idx >> 8))
                .map(|p| (p, SlotRef::Index(r.receiver_idx >> 8))),
            (Packet::PacketCookieReply(c), _) => set
                .by_index
                .get(&(c.receiver_idx >> 8))
                .map(|p| (p, SlotRef::Index(c.receiver_idx >> 8))),
            (Packet::PacketData(d), _) => set
                .by_index
                .get(&(d.receiver_idx >> 8))
                .map(|p| (p, SlotRef::Index(d.receiver_idx >> 8))),
        };
        let Some((peer, slot_ref)) = found else {
            return self.device_drop(DropReason::UnknownPeer);
        };
        if out.len() < datagram.len() {
            return self.device_drop(DropReason::Malformed);
        }
        let kind = datagram[0];
        let out_start = out.as_ptr() as usize;
        let mut session = peer.session();
        let slot = match slot_ref {
            SlotRef::Index(i) => session.slot_by_index(i),
            SlotRef::Pair(epoch, remote) => session.slot_for(epoch, &remote),
        };
        // The snapshot is older than the peer's slots (a key was retired
        // meanwhile).
        let Some(slot) = slot else {
            drop(session);
            return self.device_drop(DropReason::UnknownPeer);
        };
        let slot_index = slot.index;
        let slot_remote = slot.remote;
        let result = slot.tunn.decapsulate(Some(from.ip()), datagram, out);
        let mut authentic = true;
        let verdict = match result {
            TunnResult::WriteToTunnelV4(packet, src) => Some((
                packet.as_ptr() as usize - out_start,
                packet.len(),
                IpAddr::V4(src),
            )),
            TunnResult::WriteToTunnelV6(packet, src) => Some((
                packet.as_ptr() as usize - out_start,
                packet.len(),
                IpAddr::V6(src),
            )),
            // A keepalive (authentic) or a processed cookie reply (not an
            // authentication of the peer).
            TunnResult::Done => {
                authentic = kind == 4;
                None
            }
            TunnResult::WriteToNetwork(reply) => {
                // A handshake response (to an initiation), a keepalive
                // (completing our initiation), or a cookie reply (we are
                // under load: nothing was authenticated).
                let reply_kind = reply.first().copied();
                authentic = reply_kind != Some(3);
                send(from, reply);
                peer.counters.sent(reply.len());
                if reply_kind == Some(2) || (kind == 2 && reply_kind == Some(4)) {
                    peer.counters.handshake_completed();
                }
                // Packets queued while there was no session go out now.
                // They may be larger than `out`: a rare path, so a buffer
                // of its own.
                let mut scratch = vec![0u8; 65535 + WG_OVERHEAD + 16];
                while let Some(TunnResult::WriteToNetwork(queued)) = session
                    .slot_by_index(slot_index)
                    .map(|s| s.tunn.decapsulate(None, &[], &mut scratch))
                {
                    send(from, queued);
                    peer.counters.sent(queued.len());
                    peer.counters.held_packet_sent();
                }
                None
            }
            TunnResult::Err(e) => {
                drop(session);
                let reason = match e {
                    WireGuardError::DuplicateCounter => DropReason::Replay,
                    WireGuardError::InvalidCounter => DropReason::TooOld,
                    WireGuardError::InvalidMac
                    | WireGuardError::InvalidAeadTag
                    | WireGuardError::NoCurrentSession
                    | WireGuardError::WrongKey
                    | WireGuardError::WrongIndex
                    | WireGuardError::WrongTai64nTimestamp
                    | WireGuardError::InvalidTai64nTimestamp
                    | WireGuardError::UnexpectedPacket
                    | WireGuardError::UnderLoad => DropReason::DecryptFailure,
                    _ => return self.device_drop(DropReason::Malformed),
                };
                peer.counters.dropped(reason);
                return Inbound::Dropped(reason);
            }
        };
        if !authentic {
            return Inbound::Consumed;
        }
        // The datagram authenticated: the peer is at `from` now (roaming).
        session.endpoint = Some(from);
        let now = self.ticks.load(Ordering::Relaxed);
        if let Some(slot) = session.slot_by_index(slot_index) {
            slot.last_rx_tick = Some(now);
        }
        drop(session);
        peer.counters.received(datagram.len());
        match verdict {
            None => Inbound::Consumed,
            Some((offset, len, src)) => {
                // A firewalled endpoint's reply through an egress gateway has
                // the endpoint's source: allowed only as the reply to a flow
                // this device pinned to that very gateway.
                let allowed = set.route(src).is_some_and(|owner| Arc::ptr_eq(owner, peer))
                    || out.get(offset..offset + len).is_some_and(|p| {
                        // By the key that authenticated this very packet.
                        self.egress().allows_reply(p, &slot_remote)
                    });
                if allowed {
                    Inbound::Tun { offset, len }
                } else {
                    peer.counters.dropped(DropReason::BadSource);
                    Inbound::Dropped(DropReason::BadSource)
                }
            }
        }
    }

    /// Counts and reports an outbound packet without a route.
    pub fn no_route(&self) -> Outbound {
        self.counters.dropped(DropReason::NoRoute);
        Outbound::Dropped(DropReason::NoRoute)
    }

    fn device_drop(&self, reason: DropReason) -> Inbound {
        self.counters.dropped(reason);
        Inbound::Dropped(reason)
    }

    /// Runs every peer's timers: handshake retries, keepalives, rekeys.
    /// `scratch` must be at least 148 bytes. Call every 250 ms or so.
    ///
    /// While keys rotate, a peer has several slots: the one packets go out
    /// with and the preferred one (key in force, peer's newest key) may
    /// start handshakes; the others only answer (keepalives) until their
    /// sessions end or their key is retired.
    pub fn tick(&self, scratch: &mut [u8], send: &mut dyn FnMut(SocketAddr, &[u8])) {
        let set = self.peers();
        self.ticks.fetch_add(1, Ordering::Relaxed);
        // The limiters are ours to reset (at most once a second).
        for key in &set.local.keys {
            key.limiter.reset_count();
        }
        for peer in &set.peers {
            let mut session = peer.session();
            let endpoint = session.endpoint;
            let (active, preferred) = (session.active, session.preferred);
            for (i, slot) in session.slots.iter_mut().enumerate() {
                if let TunnResult::WriteToNetwork(datagram) = slot.tunn.update_timers(scratch) {
                    let may_initiate = i == active || i == preferred;
                    if datagram.first() == Some(&1) && !may_initiate {
                        continue;
                    }
                    if let Some(to) = endpoint {
                        send(to, datagram);
                        peer.counters.sent(datagram.len());
                    }
                }
            }
            // A preferred slot without a session: bring it up while the
            // active one still carries the packets.
            if active != preferred {
                if let (Some(to), Some(slot)) = (endpoint, session.slots.get_mut(preferred)) {
                    if !slot.has_session() {
                        if let TunnResult::WriteToNetwork(datagram) =
                            slot.tunn.format_handshake_initiation(scratch, false)
                        {
                            send(to, datagram);
                            peer.counters.sent(datagram.len());
                        }
                    }
                }
            }
        }
    }

    /// Starts a handshake with every peer that has an endpoint and no
    /// session, so tunnels come up before the first packet needs them.
    pub fn initiate_all(&self, scratch: &mut [u8], send: &mut dyn FnMut(SocketAddr, &[u8])) {
        let set = self.peers();
        for peer in &set.peers {
            let mut session = peer.session();
            let Some(to) = session.endpoint else { continue };
            let preferred = session.preferred;
            let Some(slot) = session.slots.get_mut(preferred) else {
                continue;
            };
            if slot.has_session() {
                continue;
            }
            if let TunnResult::WriteToNetwork(datagram) =
                slot.tunn.format_handshake_initiation(scratch, false)
            {
                send(to, datagram);
                peer.counters.sent(datagram.len());
            }
        }
    }
}

/// Which slot of a peer a datagram is for.
#[derive(Clone, Copy)]
enum SlotRef {
    /// By the receiver index it carries.
    Index(u32),
    /// A handshake initiation: by the key it addressed and the key it came
    /// from.
    Pair(u64, PublicKey),
}

#[cfg(test)]
mod tests {
    use super::*;

    const A_UNDERLAY: &str = "192.0.2.1:51820";
    const B_UNDERLAY: &str = "192.0.2.2:51820";

    fn ipv4_packet(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let total = 20 + 8 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        p
    }

    struct Pair {
        a: WgCore,
        b: WgCore,
    }

    fn peer(key: PublicKey, endpoint: &str, prefixes: &[&str]) -> PeerConfig {
        PeerConfig {
            name: None,
            public_key: key,
            previous_keys: Vec::new(),
            preshared_key: None,
            endpoint: Some(endpoint.parse().unwrap()),
            allowed_prefixes: prefixes.iter().map(|p| p.parse().unwrap()).collect(),
            persistent_keepalive: None,
        }
    }

    fn pair() -> Pair {
        let ka = PrivateKey::generate();
        let kb = PrivateKey::generate();
        let (pa, pb) = (ka.public_key(), kb.public_key());
        Pair {
            a: WgCore::new(ka, vec![peer(pb, B_UNDERLAY, &["100.64.2.0/24"])]).unwrap(),
            b: WgCore::new(kb, vec![peer(pa, A_UNDERLAY, &["100.64.1.0/24"])]).unwrap(),
        }
    }

    /// Everything one core sent, as (destination, datagram).
    type Wire = Vec<(SocketAddr, Vec<u8>)>;

    fn send_packet(from: &WgCore, packet: &[u8]) -> Result<(SocketAddr, Vec<u8>), DropReason> {
        let mut out = vec![0u8; packet.len() + 64 + 148];
        match from.encapsulate(&from.peers(), packet, &mut out) {
            Outbound::Send { to, len, .. } => Ok((to, out[..len].to_vec())),
            Outbound::Dropped(r) => Err(r),
        }
    }

    /// Delivers a datagram; returns the inner packet (if any) and replies.
    fn deliver(
        to: &WgCore,
        from: &str,
        datagram: &[u8],
    ) -> (Result<Option<Vec<u8>>, DropReason>, Wire) {
        let mut out = vec![0u8; datagram.len().max(148)];
        let mut wire = Wire::new();
        let r = to.decapsulate(
            &to.peers(),
            from.parse().unwrap(),
            datagram,
            &mut out,
            &mut |dst, bytes| wire.push((dst, bytes.to_vec())),
        );
        let r = match r {
            Inbound::Tun { offset, len } => Ok(Some(out[offset..offset + len].to_vec())),
            Inbound::Consumed => Ok(None),
            Inbound::Dropped(reason) => Err(reason),
        };
        (r, wire)
    }

    /// Runs the handshake that the first packet triggers; returns the packet
    /// as B received it (it was queued on A during the handshake).
    fn handshake(p: &Pair, first: &[u8]) -> Vec<u8> {
        let (to, init) = send_packet(&p.a, first).expect("handshake initiation");
        assert_eq!(to, B_UNDERLAY.parse().unwrap());
        assert_eq!(init[0], 1, "first datagram is a handshake initiation");
        let (r, wire) = deliver(&p.b, A_UNDERLAY, &init);
        assert_eq!(r, Ok(None));
        assert_eq!(wire.len(), 1);
        assert_eq!(wire[0].1[0], 2, "B answers with a handshake response");
        let (r, wire) = deliver(&p.a, B_UNDERLAY, &wire[0].1);
        assert_eq!(r, Ok(None));
        // A keepalive confirming the session, then the queued packet.
        assert_eq!(wire.len(), 2);
        let (r, _) = deliver(&p.b, A_UNDERLAY, &wire[0].1);
        assert_eq!(r, Ok(None));
        let (r, _) = deliver(&p.b, A_UNDERLAY, &wire[1].1);
        r.unwrap().expect("queued packet delivered")
    }

    #[test]
    fn handshake_then_data_both_ways_with_counters() {
        let p = pair();
        let first = ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], b"hello");
        assert_eq!(handshake(&p, &first), first);

        let back = ipv4_packet([100, 64, 2, 2], [100, 64, 1, 2], b"world");
        let (to, dgram) = send_packet(&p.b, &back).unwrap();
        assert_eq!(to, A_UNDERLAY.parse().unwrap());
        assert_eq!(dgram[0], 4);
        assert!(
            !dgram.windows(5).any(|w| w == b"world"),
            "payload is encrypted"
        );
        let (r, _) = deliver(&p.a, B_UNDERLAY, &dgram);
        assert_eq!(r, Ok(Some(back)));

        let a_stats = p.a.peers().peers()[0].stats();
        let b_stats = p.b.peers().peers()[0].stats();
        assert_eq!(a_stats.handshakes, 1);
        assert_eq!(b_stats.handshakes, 1);
        assert_eq!(a_stats.rx_packets, 2, "handshake response and data");
        assert!(a_stats.tx_bytes > 0 && b_stats.rx_bytes > 0);
        assert_eq!(
            a_stats.drops.no_session, 0,
            "the first packet waited for the handshake, then went out"
        );
        assert!(p.a.peers().peers()[0].last_handshake().is_some());
    }

    #[test]
    fn a_full_size_packet_queued_during_the_handshake_is_delivered() {
        // The receive path decrypts into a buffer sized for the incoming
        // handshake response; the queued packet is much larger.
        let p = pair();
        let big = ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], &[0x5a; 1372]);
        assert_eq!(handshake(&p, &big), big);
    }

    #[test]
    fn replayed_initiations_from_elsewhere_never_move_the_endpoint() {
        // Someone on the path copies A's handshake initiation and floods B
        // with it from another address: past the rate limit B answers with
        // cookies, but nothing was authenticated, so A's endpoint stays.
        let p = pair();
        let (_, init) =
            send_packet(&p.a, &ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], b"x")).unwrap();
        let (r, _) = deliver(&p.b, A_UNDERLAY, &init);
        assert_eq!(r, Ok(None));
        let mut cookies = 0;
        for _ in 0..(2 * HANDSHAKE_RATE_LIMIT + 50) {
            let (_, wire) = deliver(&p.b, "203.0.113.66:4444", &init);
            cookies += wire.iter().filter(|(_, d)| d[0] == 3).count();
        }
        assert!(cookies > 0, "the flood was answered with cookies");
        let peer = p.b.peers().peers()[0].clone();
        assert_eq!(peer.endpoint(), Some(A_UNDERLAY.parse().unwrap()));
        assert_eq!(peer.stats().handshakes, 1);
    }

    #[test]
    fn replayed_and_tampered_datagrams_are_dropped_by_reason() {
        let p = pair();
        handshake(&p, &ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], b"x"));
        let (_, dgram) =
            send_packet(&p.a, &ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], b"y")).unwrap();

        let mut tampered = dgram.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(
            deliver(&p.b, A_UNDERLAY, &tampered).0,
            Err(DropReason::DecryptFailure)
        );

        assert!(deliver(&p.b, A_UNDERLAY, &dgram).0.unwrap().is_some());
        assert_eq!(deliver(&p.b, A_UNDERLAY, &dgram).0, Err(DropReason::Replay));

        let drops = p.b.peers().peers()[0].stats().drops;
        assert_eq!((drops.decrypt_failure, drops.replay), (1, 1));
        // The session still works.
        let (_, next) =
            send_packet(&p.a, &ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], b"z")).unwrap();
        assert!(deliver(&p.b, A_UNDERLAY, &next).0.unwrap().is_some());
    }

    #[test]
    fn inner_source_outside_allowed_prefixes_is_dropped() {
        let p = pair();
        handshake(&p, &ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], b"x"));
        // A claims a source that belongs to nobody it may speak for.
        let spoofed = ipv4_packet([100, 64, 9, 9], [100, 64, 2, 2], b"spoof");
        let (_, dgram) = send_packet(&p.a, &spoofed).unwrap();
        assert_eq!(
            deliver(&p.b, A_UNDERLAY, &dgram).0,
            Err(DropReason::BadSource)
        );
        assert_eq!(p.b.peers().peers()[0].stats().drops.bad_source, 1);
    }

    #[test]
    fn garbage_and_strangers_are_counted_on_the_device() {
        let p = pair();
        for bad in [&b""[..], b"\x01", b"\x04\0\0\0short", &[0xffu8; 200]] {
            assert_eq!(deliver(&p.b, A_UNDERLAY, bad).0, Err(DropReason::Malformed));
        }
        // A well-formed data header with a receiver index nobody owns.
        let mut data = vec![0u8; 64];
        data[0] = 4;
        data[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        assert_eq!(
            deliver(&p.b, A_UNDERLAY, &data).0,
            Err(DropReason::UnknownPeer)
        );
        // A real handshake from a key B does not know.
        let stranger = WgCore::new(
            PrivateKey::generate(),
            vec![peer(p.b.public_key(), B_UNDERLAY, &["100.64.2.0/24"])],
        )
        .unwrap();
        let (_, init) = send_packet(
            &stranger,
            &ipv4_packet([100, 64, 7, 2], [100, 64, 2, 2], b"hi"),
        )
        .unwrap();
        assert_eq!(
            deliver(&p.b, "192.0.2.7:51820", &init).0,
            Err(DropReason::UnknownPeer)
        );
        let d = p.b.counters.snapshot();
        assert_eq!((d.malformed, d.unknown_peer), (4, 2));
    }

    #[test]
    fn packets_held_for_a_handshake_that_never_completes_stay_counted() {
        let p = pair();
        for i in 0..3u8 {
            send_packet(&p.a, &ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], &[i])).ok();
        }
        // B never answers: all three are counted as not sent.
        assert_eq!(p.a.peers().peers()[0].stats().drops.no_session, 3);
    }

    #[test]
    fn outbound_without_route_or_endpoint_is_dropped() {
        let p = pair();
        let nowhere = ipv4_packet([100, 64, 1, 2], [198, 51, 100, 1], b"x");
        assert_eq!(
            send_packet(&p.a, &nowhere).unwrap_err(),
            DropReason::NoRoute
        );
        assert_eq!(
            send_packet(&p.a, b"not ip").unwrap_err(),
            DropReason::Malformed
        );

        let key = PrivateKey::generate();
        let mut cfg = peer(p.a.public_key(), A_UNDERLAY, &["100.64.1.0/24"]);
        cfg.endpoint = None;
        let silent = WgCore::new(key, vec![cfg]).unwrap();
        let to_a = ipv4_packet([100, 64, 2, 2], [100, 64, 1, 2], b"x");
        assert_eq!(
            send_packet(&silent, &to_a).unwrap_err(),
            DropReason::NoSession
        );
        assert_eq!(silent.peers().peers()[0].stats().drops.no_session, 1);
        assert_eq!(p.a.counters.snapshot().no_route, 1);
    }

    /// Delivers datagrams back and forth between A and B until both are
    /// quiet; returns the inner packets each received.
    fn pump(p: &Pair, from_a: Wire, from_b: Wire) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let (mut to_b, mut to_a) = (from_a, from_b);
        let (mut at_a, mut at_b) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            if to_a.is_empty() && to_b.is_empty() {
                break;
            }
            let mut next_a = Wire::new();
            let mut next_b = Wire::new();
            for (_, d) in to_b.drain(..) {
                let (r, wire) = deliver(&p.b, A_UNDERLAY, &d);
                if let Ok(Some(inner)) = r {
                    at_b.push(inner);
                }
                next_a.extend(wire);
            }
            for (_, d) in to_a.drain(..) {
                let (r, wire) = deliver(&p.a, B_UNDERLAY, &d);
                if let Ok(Some(inner)) = r {
                    at_a.push(inner);
                }
                next_b.extend(wire);
            }
            to_a = next_a;
            to_b = next_b;
        }
        (at_a, at_b)
    }

    fn tick(core: &WgCore) -> Wire {
        let mut wire = Wire::new();
        let mut scratch = [0u8; 256];
        core.tick(&mut scratch, &mut |to, d| wire.push((to, d.to_vec())));
        wire
    }

    /// Sends `n` numbered packets A→B and B→A; returns what arrived.
    fn exchange(p: &Pair, tag: u8) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let ab = ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], &[tag, 1]);
        let ba = ipv4_packet([100, 64, 2, 2], [100, 64, 1, 2], &[tag, 2]);
        let from_a = vec![send_packet(&p.a, &ab).unwrap()];
        let from_b = vec![send_packet(&p.b, &ba).unwrap()];
        let (at_a, at_b) = pump(p, from_a, from_b);
        assert_eq!(at_b, vec![ab], "A→B packet {tag} arrived once");
        assert_eq!(at_a, vec![ba], "B→A packet {tag} arrived once");
        (at_a, at_b)
    }

    #[test]
    fn static_key_rotation_moves_sessions_without_losing_a_packet() {
        let p = pair();
        handshake(&p, &ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], b"x"));
        exchange(&p, 0);
        let a0 = p.a.public_key();

        // A installs its next key: accepted, not yet used to initiate.
        let k1 = PrivateKey::generate();
        assert_eq!(p.a.add_key(&k1).unwrap(), (2, None));
        assert_eq!(p.a.public_key(), a0, "the old key stays in force");
        assert!(matches!(
            p.a.add_key(&PrivateKey::generate()),
            Err(KeyChangeError::Pending(2))
        ));
        exchange(&p, 1);

        // B learns it (over the mTLS channel, in the gateway) and keeps A0.
        p.b.update_peers(|all| {
            all[0].previous_keys = vec![all[0].public_key];
            all[0].public_key = k1.public_key();
        })
        .unwrap();
        exchange(&p, 2);
        // B brings the new pair up on its tick while the old one carries on.
        let init = tick(&p.b);
        assert!(init.iter().any(|(_, d)| d[0] == 1), "B initiates toward A1");
        pump(&p, Wire::new(), init);
        exchange(&p, 3);
        let b_peer = p.b.peers().peers()[0].clone();
        assert_eq!(b_peer.sending_with(), (1, k1.public_key()));
        assert_eq!(b_peer.public_keys(), vec![k1.public_key(), a0]);

        // A puts the key in force: its packets move to the new pair.
        p.a.promote_key(2).unwrap();
        assert_eq!(p.a.public_key(), k1.public_key());
        exchange(&p, 4);
        let a_peer = p.a.peers().peers()[0].clone();
        assert_eq!(a_peer.sending_with().0, 2);

        // A retires the old key and B forgets it: traffic goes on.
        p.a.retire_key(1).unwrap();
        p.b.update_peers(|all| all[0].previous_keys.clear())
            .unwrap();
        exchange(&p, 5);
        assert_eq!(p.a.keys().len(), 1);
        let drops = |c: &WgCore| c.peers().peers()[0].stats().drops;
        assert_eq!(drops(&p.a).decrypt_failure + drops(&p.b).decrypt_failure, 0);
        assert_eq!(p.a.counters.snapshot().unknown_peer, 0);
        assert_eq!(p.b.counters.snapshot().unknown_peer, 0);
        assert!(matches!(p.a.retire_key(2), Err(KeyChangeError::InForce(2))));
    }

    #[test]
    fn a_new_key_the_peer_does_not_know_never_breaks_the_session() {
        let p = pair();
        handshake(&p, &ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], b"x"));
        p.a.add_key(&PrivateKey::generate()).unwrap();
        p.a.promote_key(2).unwrap();
        // A tries the new pair; B does not know the key and drops it.
        let init = tick(&p.a);
        assert!(init.iter().any(|(_, d)| d[0] == 1));
        pump(&p, init, Wire::new());
        assert!(p.b.counters.snapshot().unknown_peer >= 1);
        // The old pair still carries everything, both ways.
        for tag in 0..5 {
            exchange(&p, tag);
        }
        assert_eq!(p.a.peers().peers()[0].sending_with().0, 1);
    }

    #[test]
    fn announcing_keys_over_and_over_never_runs_out_of_session_indices() {
        // A peer that announces one new key after another (each a new pair
        // of keys, a new slot) must not use up the index space: slots that
        // are gone give their index back.
        let p = pair();
        p.a.next_index.store(MAX_INDEX - 20, Ordering::Relaxed);
        for _ in 0..200 {
            let fresh = PrivateKey::generate().public_key();
            p.a.update_peers(|all| {
                all[0].previous_keys = vec![all[0].public_key];
                all[0].public_key = fresh;
            })
            .unwrap();
        }
        let set = p.a.peers();
        assert_eq!(set.peers().len(), 1);
        // Every index in use belongs to exactly one live slot.
        assert_eq!(set.by_index.len(), 2);
        // A refused change gives its indices back too.
        let many: Vec<PublicKey> = (0..3)
            .map(|_| PrivateKey::generate().public_key())
            .collect();
        for _ in 0..50 {
            let fresh = PrivateKey::generate().public_key();
            let _ = p.a.update_peers(|all| {
                all.push(peer(fresh, "192.0.2.9:1", &["100.64.9.0/24"]));
                all.last_mut().unwrap().previous_keys = many.clone();
            });
        }
        p.a.update_peers(|all| all[0].public_key = PrivateKey::generate().public_key())
            .unwrap();
    }

    #[test]
    fn local_keys_are_bounded_and_peer_keys_checked() {
        let p = pair();
        handshake(&p, &ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], b"x"));
        for epoch in 2..=3 {
            p.a.add_key(&PrivateKey::generate()).unwrap();
            p.a.promote_key(epoch).unwrap();
        }
        // Key 1 still carries A's packets (B knows no newer key): it is
        // not retired early to make room for a fourth.
        assert!(matches!(
            p.a.add_key(&PrivateKey::generate()),
            Err(KeyChangeError::InUse { epoch: 1, .. })
        ));
        assert_eq!(p.a.keys().len(), 3);
        let p = pair();
        for epoch in 2..=5 {
            let (e, retired) = p.a.add_key(&PrivateKey::generate()).unwrap();
            assert_eq!(e, epoch);
            // Three keys at most: the oldest goes first.
            assert_eq!(retired, (epoch > 3).then(|| epoch - 3));
            p.a.promote_key(e).unwrap();
        }
        assert_eq!(p.a.keys().len(), MAX_LOCAL_KEYS);
        assert_eq!(p.a.keys().iter().filter(|k| k.in_force).count(), 1);
        // A peer key equal to any of A's keys, or a fourth peer key, is refused.
        let old_own = p.a.keys()[2].public_key;
        assert!(matches!(
            p.a.update_peers(|all| all[0].previous_keys = vec![old_own]),
            Err(PeerSetError::OwnKey(_))
        ));
        let many: Vec<PublicKey> = (0..3)
            .map(|_| PrivateKey::generate().public_key())
            .collect();
        assert!(matches!(
            p.a.update_peers(|all| all[0].previous_keys = many.clone()),
            Err(PeerSetError::TooManyKeys(_))
        ));
        // A second peer may not take a key the first still has as previous.
        let b_new = PrivateKey::generate().public_key();
        let b_old = p.a.peer_configs()[0].public_key;
        p.a.update_peers(|all| {
            all[0].previous_keys = vec![all[0].public_key];
            all[0].public_key = b_new;
        })
        .unwrap();
        let thief = peer(b_old, "192.0.2.9:1", &["100.64.9.0/24"]);
        assert!(matches!(
            p.a.update_peers(|all| all.push(thief.clone())),
            Err(PeerSetError::DuplicatePeer(_))
        ));
        p.a.add_key(&PrivateKey::generate()).unwrap();
        assert!(matches!(
            p.a.add_key(&PrivateKey::generate()),
            Err(KeyChangeError::Pending(6))
        ));
    }

    #[test]
    fn peer_set_changes_keep_sessions_and_refuse_conflicts() {
        let p = pair();
        handshake(&p, &ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], b"x"));
        let mut cfgs = p.a.peer_configs();
        cfgs[0]
            .allowed_prefixes
            .push("fd00:2::/64".parse().unwrap());
        p.a.set_peers(cfgs.clone()).unwrap();
        // The session survived: data flows without a new handshake.
        let (_, dgram) =
            send_packet(&p.a, &ipv4_packet([100, 64, 1, 2], [100, 64, 2, 2], b"y")).unwrap();
        assert_eq!(dgram[0], 4);
        assert_eq!(p.a.peers().peers()[0].stats().handshakes, 1);

        let other = peer(
            PrivateKey::generate().public_key(),
            B_UNDERLAY,
            &["100.64.2.0/24"],
        );
        let mut conflicting = cfgs.clone();
        conflicting.push(other);
        assert!(matches!(
            p.a.set_peers(conflicting),
            Err(PeerSetError::PrefixConflict { .. })
        ));
        let mut dup = cfgs.clone();
        dup.push(cfgs[0].clone());
        assert!(matches!(
            p.a.set_peers(dup),
            Err(PeerSetError::DuplicatePeer(_))
        ));
        let own = peer(p.a.public_key(), B_UNDERLAY, &["100.64.5.0/24"]);
        assert!(matches!(
            p.a.set_peers(vec![own]),
            Err(PeerSetError::OwnKey(_))
        ));
        // Refused changes left the set as it was, endpoints included.
        assert_eq!(p.a.peer_configs().len(), 1);
        let mut moved = cfgs.clone();
        moved[0].endpoint = Some("203.0.113.9:1".parse().unwrap());
        moved.push(peer(p.a.public_key(), B_UNDERLAY, &["100.64.6.0/24"]));
        assert!(p.a.set_peers(moved).is_err());
        assert_eq!(
            p.a.peers().peers()[0].endpoint(),
            Some(B_UNDERLAY.parse().unwrap())
        );
        p.a.set_peers(vec![]).unwrap();
        assert!(p.a.peers().route("100.64.2.2".parse().unwrap()).is_none());
    }
}
