//! Per-peer and per-device counters, updated lock-free on the data path.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a packet was dropped. Every drop on the data path has exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DropReason {
    /// Outbound: no peer's allowed prefixes contain the destination.
    NoRoute,
    /// Outbound: the peer has no established session or no known
    /// endpoint. Never sent in clear. (A WireGuard packet that waits for a
    /// handshake in progress counts here until the handshake completes and
    /// it is sent; see [`PeerDrops::no_session`].)
    NoSession,
    /// Inbound: the decrypted packet's source is not in the sending peer's
    /// allowed prefixes.
    BadSource,
    /// Inbound: authentication failed (bad AEAD tag or MAC, unknown session).
    DecryptFailure,
    /// Inbound: the counter was already seen (a replayed packet).
    Replay,
    /// Inbound: the counter is older than the replay window.
    TooOld,
    /// Not a well-formed WireGuard datagram, or not an IP packet.
    Malformed,
    /// Well-formed, but for no configured peer (unknown receiver index or
    /// handshake from an unknown key).
    UnknownPeer,
}

/// Counters kept for one peer. Transmit and receive sides sit on separate
/// cache lines, because different threads update them.
#[derive(Debug, Default)]
pub struct PeerCounters {
    tx: TxSide,
    rx: RxSide,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct TxSide {
    bytes: AtomicU64,
    packets: AtomicU64,
    no_session: AtomicU64,
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct RxSide {
    bytes: AtomicU64,
    packets: AtomicU64,
    handshakes: AtomicU64,
    bad_source: AtomicU64,
    decrypt_failure: AtomicU64,
    replay: AtomicU64,
    too_old: AtomicU64,
}

impl PeerCounters {
    /// A datagram of `bytes` (UDP payload) was sent to the peer.
    pub(crate) fn sent(&self, bytes: usize) {
        self.tx.bytes.fetch_add(bytes as u64, Relaxed);
        self.tx.packets.fetch_add(1, Relaxed);
    }
    /// An authenticated datagram of `bytes` (UDP payload) came from the peer.
    pub(crate) fn received(&self, bytes: usize) {
        self.rx.bytes.fetch_add(bytes as u64, Relaxed);
        self.rx.packets.fetch_add(1, Relaxed);
    }
    pub(crate) fn handshake_completed(&self) {
        self.rx.handshakes.fetch_add(1, Relaxed);
    }
    /// A packet held for a handshake in progress was sent after all.
    pub(crate) fn held_packet_sent(&self) {
        let _ = self
            .tx
            .no_session
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }
    pub(crate) fn dropped(&self, reason: DropReason) {
        let counter = match reason {
            DropReason::NoSession => &self.tx.no_session,
            DropReason::BadSource => &self.rx.bad_source,
            DropReason::DecryptFailure => &self.rx.decrypt_failure,
            DropReason::Replay => &self.rx.replay,
            DropReason::TooOld => &self.rx.too_old,
            // Device-level reasons are never attributed to a peer.
            DropReason::NoRoute | DropReason::Malformed | DropReason::UnknownPeer => return,
        };
        counter.fetch_add(1, Relaxed);
    }
    pub fn snapshot(&self) -> PeerStats {
        PeerStats {
            rx_bytes: self.rx.bytes.load(Relaxed),
            tx_bytes: self.tx.bytes.load(Relaxed),
            rx_packets: self.rx.packets.load(Relaxed),
            tx_packets: self.tx.packets.load(Relaxed),
            handshakes: self.rx.handshakes.load(Relaxed),
            drops: PeerDrops {
                no_session: self.tx.no_session.load(Relaxed),
                bad_source: self.rx.bad_source.load(Relaxed),
                decrypt_failure: self.rx.decrypt_failure.load(Relaxed),
                replay: self.rx.replay.load(Relaxed),
                too_old: self.rx.too_old.load(Relaxed),
            },
        }
    }
}

/// A point-in-time copy of a peer's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeerStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub handshakes: u64,
    pub drops: PeerDrops,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeerDrops {
    /// Packets not sent for lack of a session: dropped, or held (at most
    /// 256 per peer) for a handshake that has not completed.
    pub no_session: u64,
    pub bad_source: u64,
    pub decrypt_failure: u64,
    pub replay: u64,
    pub too_old: u64,
}

/// Drops that belong to no peer.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    no_route: AtomicU64,
    malformed: AtomicU64,
    unknown_peer: AtomicU64,
}

impl DeviceCounters {
    pub(crate) fn dropped(&self, reason: DropReason) {
        let counter = match reason {
            DropReason::NoRoute => &self.no_route,
            DropReason::Malformed => &self.malformed,
            DropReason::UnknownPeer => &self.unknown_peer,
            _ => return,
        };
        counter.fetch_add(1, Relaxed);
    }
    pub fn snapshot(&self) -> DeviceDrops {
        DeviceDrops {
            no_route: self.no_route.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            unknown_peer: self.unknown_peer.load(Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeviceDrops {
    pub no_route: u64,
    pub malformed: u64,
    pub unknown_peer: u64,
}
