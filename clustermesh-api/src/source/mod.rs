//! Where a cluster's state comes from. A source feeds a [`Publisher`]; the server streams
//! what the publisher's store holds.
//!
//! - [`file`]: a TOML file, reloaded when it changes (the embedded default of the demo);
//! - [`kubernetes`]: the cluster's own Services and EndpointSlices, published when a
//!   ServiceExport (MCS API) or the `service.isthmus.dev/global` annotation says so;
//! - [`etcd`]: the cluster's prefix in etcd (the mesh kvstore), listed then watched, with
//!   a writer for publishers and lease-held gateways.

pub mod etcd;
pub mod file;
pub mod kubernetes;

use crate::model::{Invalid, KeyDisplay};
use crate::pb::{Object, ObjectKey};
use crate::store::{Change, Store};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{broadcast, watch};

/// Capacity of the live change fan-out; a watcher further behind is resynced.
pub const FANOUT_CAPACITY: usize = 4096;

/// The shared store of a server and the fan-out of its changes. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Mutex<Store>,
    changes: broadcast::Sender<Arc<Change>>,
    synced: watch::Sender<bool>,
}

impl Publisher {
    /// Wraps a store.
    pub fn new(store: Store) -> Self {
        let (changes, _) = broadcast::channel(FANOUT_CAPACITY);
        let (synced, _) = watch::channel(store.is_synced());
        Self {
            inner: Arc::new(Inner {
                store: Mutex::new(store),
                changes,
                synced,
            }),
        }
    }

    /// Locks the store (for reading, or for a watcher that must subscribe atomically
    /// with reading a snapshot: see [`Publisher::subscribe_locked`]).
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.inner.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to live changes. Call it while holding [`Publisher::lock`] so that no
    /// change falls between what the store showed and what the subscription delivers.
    pub fn subscribe_locked(
        &self,
        _held: &MutexGuard<'_, Store>,
    ) -> broadcast::Receiver<Arc<Change>> {
        self.inner.changes.subscribe()
    }

    /// A receiver that turns true once the source has synced.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.inner.synced.subscribe()
    }

    fn emit(&self, change: Change) {
        // No receiver is fine: nobody watches yet.
        let _ = self.inner.changes.send(Arc::new(change));
    }

    /// Sets the epoch (before the first sync).
    pub fn set_epoch(&self, epoch: u64) {
        self.lock().set_epoch(epoch);
    }

    /// Creates or updates one object; a refused object is logged and returned.
    pub fn upsert(&self, obj: Object) -> Result<(), Invalid> {
        let mut store = self.lock();
        match store.upsert(obj) {
            Ok(Some(change)) => {
                self.emit(change);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => {
                tracing::warn!(refused = %e, "object refused");
                Err(e)
            }
        }
    }

    /// Deletes one object (only if its uid matches, when given).
    pub fn delete(&self, key: &ObjectKey, uid: Option<&str>, revision: u64) {
        let mut store = self.lock();
        if let Some(change) = store.delete(key, uid, revision) {
            tracing::debug!(key = %KeyDisplay(key), "deleted");
            self.emit(change);
        }
    }

    /// Replaces the whole state with a full listing; returns the refusals.
    pub fn replace_all(&self, objects: Vec<Object>, revision: u64) -> Vec<Invalid> {
        let mut store = self.lock();
        let (changes, refused) = store.replace_all(objects, revision);
        for e in &refused {
            tracing::warn!(refused = %e, "object refused");
        }
        for c in changes {
            self.emit(c);
        }
        refused
    }

    /// The source has delivered its initial state (as of `revision`, 0 if it has none).
    pub fn mark_synced(&self, revision: u64) {
        let mut store = self.lock();
        store.mark_synced(revision);
        drop(store);
        self.inner.synced.send_replace(true);
    }
}
