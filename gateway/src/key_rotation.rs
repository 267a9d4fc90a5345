//! Bookkeeping of WireGuard static key rotation (no I/O).
//!
//! A rotation runs in three steps. The new key is installed next to the
//! one in force (handshakes under either are accepted) and announced over
//! every live mTLS channel. Each peer answers with an acknowledgement once
//! it accepts the new key and initiates toward it. When every peer that had
//! a live channel has acknowledged (or lost its channel: it learns the key
//! from the next hello), the new key is put in force and the old one is
//! kept for [`PREVIOUS_KEY_GRACE`], so sessions and peers that have not
//! moved yet still work, then retired.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How long a key stays accepted after a newer one is put in force: three
/// times WireGuard's REJECT_AFTER_TIME (180 s: no session lives longer)
/// and half a minute of slack.
pub const PREVIOUS_KEY_GRACE: Duration = Duration::from_secs(3 * 180 + 30);

#[derive(Debug, Default)]
pub struct KeyRotation {
    pending: Option<Pending>,
    /// Keys no longer in force and when they retire.
    retiring: Vec<(u64, Instant)>,
    rotations: u64,
    last_rotation_unix: Option<u64>,
}

#[derive(Debug)]
struct Pending {
    epoch: u64,
    waiting: BTreeSet<String>,
}

/// What `status` shows of the rotation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KeyRotationStatus {
    /// A key announced and not yet in force.
    pub pending_epoch: Option<u64>,
    /// Peers (SPIFFE IDs) that have not acknowledged it yet.
    pub waiting_for: Vec<String>,
    /// Keys put in force since start (not counting the first).
    pub rotations: u64,
    pub last_rotation_unix: Option<u64>,
    /// Earlier keys still accepted, with seconds until they are retired.
    pub retiring: Vec<RetiringKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RetiringKey {
    pub epoch: u64,
    pub retires_in_secs: u64,
}

impl KeyRotation {
    /// The key of `epoch` was announced; `waiting` are the peers to hear
    /// from. Returns whether it can be put in force at once (nobody to wait
    /// for).
    pub fn begin(&mut self, epoch: u64, waiting: impl IntoIterator<Item = String>) -> bool {
        let waiting: BTreeSet<String> = waiting.into_iter().collect();
        let ready = waiting.is_empty();
        self.pending = Some(Pending { epoch, waiting });
        ready
    }

    pub fn pending_epoch(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.epoch)
    }

    /// A peer whose channel came up while a key is pending: it must
    /// acknowledge too.
    pub fn wait_for(&mut self, peer: String) {
        if let Some(p) = &mut self.pending {
            p.waiting.insert(peer);
        }
    }

    /// `peer` acknowledged `epoch`. Returns the epoch to put in force when
    /// it was the last one waited for.
    pub fn acked(&mut self, peer: &str, epoch: u64) -> Option<u64> {
        let p = self.pending.as_mut()?;
        if epoch >= p.epoch {
            p.waiting.remove(peer);
        }
        p.waiting.is_empty().then_some(p.epoch)
    }

    /// `peer` is no longer waited for (its channel is gone: it learns the
    /// key from the next hello). Returns the epoch to put in force when
    /// nobody is left.
    pub fn forget(&mut self, peer: &str) -> Option<u64> {
        let p = self.pending.as_mut()?;
        p.waiting.remove(peer);
        p.waiting.is_empty().then_some(p.epoch)
    }

    pub fn waiting(&self) -> Vec<String> {
        self.pending
            .as_ref()
            .map(|p| p.waiting.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `epoch` was put in force; `previous` (the key it replaces) retires
    /// after the grace.
    pub fn promoted(&mut self, epoch: u64, previous: Option<u64>, now: Instant, unix: u64) {
        if self.pending.as_ref().is_some_and(|p| p.epoch == epoch) {
            self.pending = None;
        }
        if let Some(prev) = previous {
            self.retiring.push((prev, now + PREVIOUS_KEY_GRACE));
        }
        self.rotations += 1;
        self.last_rotation_unix = Some(unix);
    }

    /// The key of `epoch` is gone (retired early to make room, or given up).
    pub fn removed(&mut self, epoch: u64) {
        self.retiring.retain(|(e, _)| *e != epoch);
        if self.pending.as_ref().is_some_and(|p| p.epoch == epoch) {
            self.pending = None;
        }
    }

    /// Keys whose grace is over, taken off the list.
    pub fn due(&mut self, now: Instant) -> Vec<u64> {
        let (due, keep): (Vec<_>, Vec<_>) = self.retiring.drain(..).partition(|(_, t)| *t <= now);
        self.retiring = keep;
        due.into_iter().map(|(e, _)| e).collect()
    }

    pub fn status(&self, now: Instant) -> KeyRotationStatus {
        KeyRotationStatus {
            pending_epoch: self.pending_epoch(),
            waiting_for: self.waiting(),
            rotations: self.rotations,
            last_rotation_unix: self.last_rotation_unix,
            retiring: self
                .retiring
                .iter()
                .map(|(epoch, t)| RetiringKey {
                    epoch: *epoch,
                    retires_in_secs: t.saturating_duration_since(now).as_secs(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_force_after_every_live_peer_acknowledged() {
        let mut r = KeyRotation::default();
        assert!(!r.begin(2, ["a".to_string(), "b".to_string()]));
        assert_eq!(r.acked("a", 2), None);
        // A stale acknowledgement of an older key does not count.
        assert_eq!(r.acked("b", 1), None);
        assert_eq!(r.waiting(), vec!["b".to_string()]);
        // A peer that comes up meanwhile is waited for too.
        r.wait_for("c".into());
        assert_eq!(r.acked("b", 2), None);
        // A peer whose channel went away learns from its next hello.
        assert_eq!(r.forget("c"), Some(2));
        let t0 = Instant::now();
        r.promoted(2, Some(1), t0, 1_000);
        let s = r.status(t0);
        assert_eq!(s.pending_epoch, None);
        assert_eq!((s.rotations, s.last_rotation_unix), (1, Some(1_000)));
        assert_eq!(s.retiring[0].epoch, 1);
        assert!(r.due(t0 + Duration::from_secs(60)).is_empty());
        assert_eq!(r.due(t0 + PREVIOUS_KEY_GRACE), vec![1]);
        assert!(r.status(t0).retiring.is_empty());
    }

    #[test]
    fn nobody_to_wait_for_is_ready_at_once_and_removal_clears() {
        let mut r = KeyRotation::default();
        assert!(r.begin(5, Vec::new()));
        r.promoted(5, Some(4), Instant::now(), 1);
        r.removed(4);
        assert!(r.due(Instant::now() + PREVIOUS_KEY_GRACE).is_empty());
        assert!(!r.begin(6, ["x".to_string()]));
        r.removed(6);
        assert_eq!(r.pending_epoch(), None);
        assert_eq!(r.acked("x", 6), None);
    }
}
