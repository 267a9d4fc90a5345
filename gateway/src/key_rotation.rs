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

/// How long a new key waits for acknowledgements. Past it, the peers still
/// silent have their channel closed (they learn the key from the hello of
/// the next session) and the key is put in force: one peer that never
/// answers cannot keep a possibly compromised key in force.
pub const ACK_DEADLINE: Duration = Duration::from_secs(10);

/// What to do with a peer's announcement of its WireGuard keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement<K> {
    /// The same keys as now: acknowledge, change nothing.
    Unchanged,
    /// Take these keys (newest first).
    Apply(Vec<K>),
    /// Ignore it (and do not acknowledge), for this reason.
    Refuse(String),
}

/// Judges a peer's announcement (`epoch`, `keys` newest first) against
/// what it announced before. A new key needs a higher epoch; of the earlier
/// keys it lists only those it had are kept (a peer cannot slip in a key it
/// never used, such as another peer's); at the same epoch it may only drop
/// earlier keys (a retirement).
pub fn judge_announcement<K: PartialEq + Clone>(
    known_epoch: u64,
    known: &[K],
    epoch: u64,
    keys: &[K],
) -> Announcement<K> {
    let Some(newest) = keys.first() else {
        return Announcement::Refuse("no key".into());
    };
    if epoch < known_epoch {
        return Announcement::Refuse(format!("epoch {epoch} is older than {known_epoch}"));
    }
    if epoch == known_epoch && known.first() != Some(newest) {
        return Announcement::Refuse(format!("a new key needs an epoch above {known_epoch}"));
    }
    let mut take = vec![newest.clone()];
    take.extend(
        keys[1..]
            .iter()
            .filter(|k| known.contains(k) && *k != newest)
            .cloned(),
    );
    if take == known {
        Announcement::Unchanged
    } else {
        Announcement::Apply(take)
    }
}

/// How many new keys a peer may announce in a burst, and how fast the
/// allowance comes back: enough for back-to-back rotations, too little for
/// a peer to make this gateway build WireGuard state for keys in a loop.
#[derive(Debug, Clone)]
pub struct AnnounceBudget {
    tokens: f64,
    last: Instant,
}

impl AnnounceBudget {
    const BURST: f64 = 5.0;
    const PER_SEC: f64 = 2.0;

    pub fn new(now: Instant) -> Self {
        Self {
            tokens: Self::BURST,
            last: now,
        }
    }

    /// Takes one new key from the allowance, if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * Self::PER_SEC;
        self.tokens = (self.tokens + refill).min(Self::BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

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
    since: Instant,
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
    pub fn begin(
        &mut self,
        epoch: u64,
        waiting: impl IntoIterator<Item = String>,
        now: Instant,
    ) -> bool {
        let waiting: BTreeSet<String> = waiting.into_iter().collect();
        let ready = waiting.is_empty();
        self.pending = Some(Pending {
            epoch,
            waiting,
            since: now,
        });
        ready
    }

    /// Whether the pending key has waited longer than [`ACK_DEADLINE`].
    pub fn overdue(&self, now: Instant) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| now.saturating_duration_since(p.since) >= ACK_DEADLINE)
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
        assert!(!r.begin(2, ["a".to_string(), "b".to_string()], Instant::now()));
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
        assert!(r.begin(5, Vec::new(), Instant::now()));
        r.promoted(5, Some(4), Instant::now(), 1);
        r.removed(4);
        assert!(r.due(Instant::now() + PREVIOUS_KEY_GRACE).is_empty());
        let t = Instant::now();
        assert!(!r.begin(6, ["x".to_string()], t));
        assert!(!r.overdue(t + Duration::from_secs(1)));
        assert!(r.overdue(t + ACK_DEADLINE));
        r.removed(6);
        assert_eq!(r.pending_epoch(), None);
        assert_eq!(r.acked("x", 6), None);
    }

    #[test]
    fn announcements_need_a_new_epoch_for_a_new_key_and_only_list_keys_held() {
        use Announcement::*;
        let known = ["k1", "k0"];
        assert_eq!(judge_announcement(3, &known, 3, &known), Unchanged);
        assert_eq!(
            judge_announcement(3, &known, 4, &["k2", "k1", "k0"]),
            Apply(vec!["k2", "k1", "k0"])
        );
        // A retirement: same epoch, an earlier key dropped.
        assert_eq!(judge_announcement(3, &known, 3, &["k1"]), Apply(vec!["k1"]));
        // An earlier key it never had (here: another peer's) is not taken.
        assert_eq!(
            judge_announcement(3, &known, 4, &["k2", "stolen", "k1"]),
            Apply(vec!["k2", "k1"])
        );
        assert_eq!(
            judge_announcement(3, &known, 3, &["k1", "stolen", "k0"]),
            Unchanged
        );
        for (epoch, keys) in [
            (3, &["k2", "k1"][..]), // a new key at the same epoch
            (2, &["k1"][..]),       // an older epoch
            (4, &[][..]),
        ] {
            assert!(
                matches!(judge_announcement(3, &known, epoch, keys), Refuse(_)),
                "{epoch} {keys:?}"
            );
        }
    }

    #[test]
    fn the_new_key_allowance_refills_slowly() {
        let t = Instant::now();
        let mut b = AnnounceBudget::new(t);
        let burst = (0..100).filter(|_| b.allow(t)).count();
        assert_eq!(burst, 5);
        assert!(!b.allow(t + Duration::from_millis(100)));
        assert!(b.allow(t + Duration::from_millis(600)));
        // Ten seconds of trying every millisecond: about two a second.
        let later = (1..10_000)
            .filter(|ms| b.allow(t + Duration::from_millis(600 + ms)))
            .count();
        assert!((18..=22).contains(&later), "{later}");
    }
}
