//! The server's object store (sans-IO): objects by key, a revision that only grows, and a
//! bounded history of changes from which resuming watchers get the deltas they missed.
//!
//! The rules a watcher relies on:
//! - a snapshot is offered only once the source has synced ([`Store::mark_synced`]);
//! - a resume `(epoch, revision)` is served deltas only when the epoch is this store's and
//!   every change after `revision` is still in the history; anything else is a
//!   [`ResumeAnswer::Resync`] with the reason, never a silent partial resume;
//! - a delete names the uid it deletes; a delete of an older uid does not remove a newer
//!   object that reuses the key.

use crate::model::{check_object, Invalid, KeyDisplay};
use crate::pb::{Delete, Object, ObjectKey, ResyncReason};
use isthmus_identity::ClusterName;
use std::collections::{BTreeMap, VecDeque};

/// One change, as the watch stream carries it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Created or updated.
    Upsert(Object),
    /// Deleted.
    Delete(Delete),
}

impl Change {
    /// The revision at which the change happened.
    pub fn revision(&self) -> u64 {
        match self {
            Change::Upsert(o) => o.revision,
            Change::Delete(d) => d.revision,
        }
    }
}

/// What a watch request gets.
#[derive(Debug, Clone, PartialEq)]
pub enum ResumeAnswer {
    /// The changes after the requested revision, in order (possibly none).
    Deltas(Vec<Change>),
    /// The resume point is unusable: a snapshot follows.
    Resync(ResyncReason, String),
}

/// Default number of changes kept for resuming watchers.
pub const DEFAULT_HISTORY: usize = 10_000;

/// The store of one cluster's objects.
#[derive(Debug)]
pub struct Store {
    cluster: ClusterName,
    epoch: u64,
    revision: u64,
    /// Deltas can be served for any resume revision `>= floor`.
    floor: u64,
    objects: BTreeMap<ObjectKey, Object>,
    history: VecDeque<Change>,
    history_limit: usize,
    synced: bool,
    refused: u64,
}

impl Store {
    /// An empty, unsynced store for `cluster` with the given epoch (non-zero).
    pub fn new(cluster: ClusterName, epoch: u64, history_limit: usize) -> Self {
        Self {
            cluster,
            epoch: epoch.max(1),
            revision: 0,
            floor: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            synced: false,
            refused: 0,
        }
    }

    /// The cluster this store publishes.
    pub fn cluster(&self) -> &ClusterName {
        &self.cluster
    }

    /// The epoch: changes when the store (or its source) starts over.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Replaces the epoch (a source with persistent revisions, such as etcd, sets one
    /// derived from its own identity before it syncs, so revisions stay comparable across
    /// server restarts).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch.max(1);
    }

    /// The newest revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether the source has delivered its initial state.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Objects refused so far (foreign cluster or malformed).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The current objects, in key order.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values()
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    fn next_revision(&mut self, proposed: u64) -> u64 {
        self.revision = if proposed > self.revision {
            proposed
        } else {
            self.revision + 1
        };
        self.revision
    }

    fn record(&mut self, change: Change) -> Change {
        self.history.push_back(change.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.floor = self.floor.max(old.revision());
            }
        }
        change
    }

    /// Creates or updates an object. `obj.revision` may carry the source's own revision
    /// (used when it is newer than the store's; otherwise the next one is assigned).
    /// Returns the change, or `None` when nothing changed.
    pub fn upsert(&mut self, mut obj: Object) -> Result<Option<Change>, Invalid> {
        if let Err(e) = check_object(&self.cluster, &obj) {
            self.refused += 1;
            return Err(e);
        }
        let Some(key) = obj.key.clone() else {
            return Ok(None);
        };
        if let Some(old) = self.objects.get(&key) {
            if old.uid == obj.uid && old.body == obj.body {
                return Ok(None);
            }
        }
        obj.revision = self.next_revision(obj.revision);
        self.objects.insert(key, obj.clone());
        Ok(Some(self.record(Change::Upsert(obj))))
    }

    /// Deletes the object under `key` if its uid is `uid` (or any uid when `None`).
    pub fn delete(&mut self, key: &ObjectKey, uid: Option<&str>, revision: u64) -> Option<Change> {
        let current = self.objects.get(key)?;
        if uid.is_some_and(|u| u != current.uid) {
            tracing::debug!(key = %KeyDisplay(key), "delete of an older uid ignored");
            return None;
        }
        let removed = self.objects.remove(key)?;
        let revision = self.next_revision(revision);
        Some(self.record(Change::Delete(Delete {
            key: Some(key.clone()),
            uid: removed.uid,
            revision,
        })))
    }

    /// Makes the store hold exactly `objects` (a source's full listing): upserts what is
    /// new or changed, deletes what is gone. Refused objects are skipped and returned.
    pub fn replace_all(
        &mut self,
        objects: Vec<Object>,
        revision: u64,
    ) -> (Vec<Change>, Vec<Invalid>) {
        let mut changes = Vec::new();
        let mut refused = Vec::new();
        let mut keep = std::collections::BTreeSet::new();
        for mut obj in objects {
            if let Some(k) = &obj.key {
                keep.insert(k.clone());
            }
            if obj.revision == 0 {
                obj.revision = revision;
            }
            match self.upsert(obj) {
                Ok(Some(c)) => changes.push(c),
                Ok(None) => {}
                Err(e) => refused.push(e),
            }
        }
        let gone: Vec<ObjectKey> = self
            .objects
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(c) = self.delete(&k, None, revision) {
                changes.push(c);
            }
        }
        if revision > self.revision {
            self.revision = revision;
        }
        (changes, refused)
    }

    /// The source has delivered its initial state as of `revision`. The first call sets
    /// the resume floor there: a watcher from an earlier revision may have missed deletes
    /// the store never saw.
    pub fn mark_synced(&mut self, revision: u64) {
        if revision > self.revision {
            self.revision = revision;
        }
        if !self.synced {
            self.floor = self.revision;
            self.synced = true;
        }
    }

    /// Answers a watch request's resume point.
    pub fn resume(&self, epoch: u64, revision: u64) -> ResumeAnswer {
        if epoch == 0 {
            return ResumeAnswer::Resync(ResyncReason::Unspecified, "fresh watch".into());
        }
        if epoch != self.epoch {
            return ResumeAnswer::Resync(
                ResyncReason::EpochChanged,
                format!("epoch {epoch:x} is not the store's ({:x})", self.epoch),
            );
        }
        if revision > self.revision {
            return ResumeAnswer::Resync(
                ResyncReason::FutureRevision,
                format!(
                    "revision {revision} is ahead of the store's {}",
                    self.revision
                ),
            );
        }
        if revision < self.floor {
            return ResumeAnswer::Resync(
                ResyncReason::Compacted,
                format!(
                    "revision {revision} was compacted (oldest resumable: {})",
                    self.floor
                ),
            );
        }
        ResumeAnswer::Deltas(
            self.history
                .iter()
                .filter(|c| c.revision() > revision)
                .cloned()
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::key;
    use crate::pb::{object::Body, ClusterSpec, Kind, Service};

    fn svc(name: &str, uid: &str, global: bool) -> Object {
        Object {
            key: Some(key("a", Kind::Service, "default", name)),
            uid: uid.into(),
            revision: 0,
            body: Some(Body::Service(Service {
                global,
                ..Default::default()
            })),
        }
    }

    fn store() -> Store {
        Store::new(ClusterName::new("a").expect("name"), 7, 4)
    }

    #[test]
    fn revisions_grow_and_unchanged_objects_make_no_change() {
        let mut s = store();
        let c1 = s
            .upsert(svc("web", "u1", true))
            .expect("ok")
            .expect("change");
        assert_eq!(c1.revision(), 1);
        assert_eq!(s.upsert(svc("web", "u1", true)).expect("ok"), None);
        let c2 = s
            .upsert(svc("web", "u1", false))
            .expect("ok")
            .expect("change");
        assert_eq!(c2.revision(), 2);
        // A source revision ahead of the store's is taken as is.
        let mut o = svc("db", "u2", true);
        o.revision = 100;
        assert_eq!(s.upsert(o).expect("ok").expect("c").revision(), 100);
        assert_eq!(s.revision(), 100);
    }

    #[test]
    fn a_delete_of_an_older_uid_keeps_the_newer_object() {
        let mut s = store();
        s.upsert(svc("web", "u1", true)).expect("ok");
        s.upsert(svc("web", "u2", true)).expect("ok");
        let k = key("a", Kind::Service, "default", "web");
        assert_eq!(s.delete(&k, Some("u1"), 0), None);
        assert_eq!(s.len(), 1);
        let d = s.delete(&k, Some("u2"), 0).expect("deleted");
        assert!(matches!(d, Change::Delete(ref d) if d.uid == "u2"));
        assert!(s.is_empty());
    }

    #[test]
    fn resume_serves_deltas_or_says_why_not() {
        let mut s = store();
        s.upsert(svc("web", "u1", true)).expect("ok");
        s.mark_synced(0);
        assert_eq!(s.revision(), 1);
        s.upsert(svc("db", "u2", true)).expect("ok");
        match s.resume(7, 1) {
            ResumeAnswer::Deltas(d) => assert_eq!(d.len(), 1),
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.resume(7, 2), ResumeAnswer::Deltas(d) if d.is_empty()));
        assert!(matches!(
            s.resume(8, 2),
            ResumeAnswer::Resync(ResyncReason::EpochChanged, _)
        ));
        assert!(matches!(
            s.resume(7, 99),
            ResumeAnswer::Resync(ResyncReason::FutureRevision, _)
        ));
        // Before the sync point: deletes may have been missed.
        assert!(matches!(
            s.resume(7, 0),
            ResumeAnswer::Resync(ResyncReason::Compacted, _)
        ));
        // The history holds 4 changes: older ones are compacted away.
        for i in 0..6 {
            s.upsert(svc(&format!("s{i}"), "u", true)).expect("ok");
        }
        assert!(matches!(
            s.resume(7, 2),
            ResumeAnswer::Resync(ResyncReason::Compacted, _)
        ));
        assert!(matches!(s.resume(7, s.revision() - 2), ResumeAnswer::Deltas(d) if d.len() == 2));
    }

    #[test]
    fn replace_all_deletes_what_is_gone_and_refuses_foreign_objects() {
        let mut s = store();
        s.upsert(svc("web", "u1", true)).expect("ok");
        s.upsert(svc("old", "u9", true)).expect("ok");
        let foreign = Object {
            key: Some(key("b", Kind::Cluster, "", "b")),
            uid: "x".into(),
            revision: 0,
            body: Some(Body::Cluster(ClusterSpec {
                id: 2,
                ..Default::default()
            })),
        };
        let (changes, refused) = s.replace_all(vec![svc("web", "u1", true), foreign], 0);
        assert_eq!(refused.len(), 1);
        assert_eq!(changes.len(), 1);
        assert!(matches!(&changes[0], Change::Delete(d) if d.uid == "u9"));
        assert_eq!(s.len(), 1);
        assert_eq!(s.refused(), 1);
    }
}
