//! The etcd source: one cluster's objects kept in etcd (the mesh kvstore), listed and
//! watched into a [`Publisher`]; and [`EtcdObjectWriter`], which writes them there.
//!
//! Layout: one prefix per cluster, one key per object,
//! `<root>/<cluster>/<kind>/<namespace or "->/<name>` (root [`DEFAULT_ROOT`]); the value is
//! the prost-encoded [`pb::Object`](crate::pb::Object). An entry counts only when its
//! etcd key and the key inside its value agree. Its uid comes from etcd's
//! `create_revision` (a key deleted and created again gets a new uid, so uid-checked
//! deletes work) and its revision is etcd's `mod_revision`. The store's epoch is derived
//! from the etcd cluster id and the prefix, so a server restarted against the same etcd
//! keeps its epoch and its clients resume.
//!
//! [`run`] lists the prefix at a revision, marks the publisher synced, then watches from
//! the next revision; on any watch error, compaction or connection loss it reconnects
//! with jittered exponential backoff and lists again (the store diffs the listing, so
//! clients see only real changes). A malformed entry never stops it: it is dropped,
//! counted ([`EtcdSourceStats`]) and logged, and an object whose value turns malformed is
//! withdrawn, exactly as a listing would leave it out.
//!
//! The source reads only its own cluster's prefix (the publisher's store names the
//! cluster); the writer refuses objects of any other cluster. Plain `http://` endpoints
//! only: etcd over TLS is not wired yet.

use super::Publisher;
use crate::model::{check_object, kind_name, Invalid, KeyDisplay};
use crate::pb::{Kind, Object, ObjectKey};
use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, WatchOptions, WatchResponse};
use isthmus_identity::ClusterName;
use prost::Message;
use sha2::{Digest, Sha256};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The default root of the key layout.
pub const DEFAULT_ROOT: &str = "/isthmus/clustermesh/v1";

/// Entries per page when listing a prefix.
pub const LIST_PAGE_SIZE: i64 = 500;

/// Largest gRPC message accepted from etcd (a listing page or one watch response).
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// The namespace segment of a kind without namespaces.
const NO_NAMESPACE: &str = "-";

/// etcd's event types (mvccpb.Event.EventType).
const EVENT_PUT: i32 = 0;
const EVENT_DELETE: i32 = 1;

/// Every kind an object can have, in protocol order.
const KINDS: [Kind; 5] = [
    Kind::Cluster,
    Kind::Gateway,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Identity,
];

/// Why a root, a key or an object does not fit the key layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyLayoutError {
    /// The root is not an absolute path without a trailing or doubled `/`.
    #[error(
        "root {0:?}: expected an absolute path such as {DEFAULT_ROOT:?}, without a trailing '/'"
    )]
    BadRoot(String),
    /// The etcd key is not valid UTF-8.
    #[error("etcd key {0:?} is not UTF-8")]
    NotUtf8(String),
    /// The etcd key is outside the cluster's prefix.
    #[error("etcd key {key:?} is not under {prefix:?}")]
    OutsidePrefix {
        /// The etcd key.
        key: String,
        /// The cluster's prefix.
        prefix: String,
    },
    /// The etcd key is not `<kind>/<namespace or ->/<name>` under the prefix.
    #[error("etcd key {key:?}: {reason}")]
    BadKey {
        /// The etcd key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The object key cannot be written as an etcd key.
    #[error("{key}: {reason}")]
    Unrepresentable {
        /// The object key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The key layout under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdKeyLayout {
    root: String,
}

impl EtcdKeyLayout {
    /// Checks a root: absolute, no trailing `/`, no empty segment.
    pub fn new(root: &str) -> Result<Self, KeyLayoutError> {
        let ok = root.len() > 1
            && root.starts_with('/')
            && !root.ends_with('/')
            && !root.contains("//")
            && !root.chars().any(|c| c.is_control());
        if !ok {
            return Err(KeyLayoutError::BadRoot(root.to_string()));
        }
        Ok(Self {
            root: root.to_string(),
        })
    }

    /// The root.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The prefix that holds one cluster's objects (`<root>/<cluster>/`).
    pub fn cluster_prefix(&self, cluster: &ClusterName) -> String {
        format!("{}/{}/", self.root, cluster.as_str())
    }

    /// The etcd key of an object key.
    pub fn etcd_key(&self, key: &ObjectKey) -> Result<String, KeyLayoutError> {
        let unrepresentable = |reason: &str| KeyLayoutError::Unrepresentable {
            key: KeyDisplay(key).to_string(),
            reason: reason.to_string(),
        };
        let cluster = ClusterName::new(&key.cluster)
            .map_err(|_| unrepresentable("the cluster is not a valid cluster name"))?;
        let kind = Kind::try_from(key.kind)
            .ok()
            .filter(|k| *k != Kind::Unspecified)
            .ok_or_else(|| unrepresentable("unknown kind"))?;
        let namespace = if key.namespace.is_empty() {
            NO_NAMESPACE
        } else if key.namespace == NO_NAMESPACE {
            return Err(unrepresentable(
                "namespace \"-\" is reserved for kinds without a namespace",
            ));
        } else {
            key.namespace.as_str()
        };
        for v in [namespace, key.name.as_str()] {
            if v.is_empty() || v.contains('/') {
                return Err(unrepresentable(
                    "a namespace or name is empty or contains '/'",
                ));
            }
        }
        Ok(format!(
            "{}{}/{namespace}/{}",
            self.cluster_prefix(&cluster),
            kind_name(kind),
            key.name
        ))
    }

    /// Parses an etcd key under `cluster`'s prefix back into an object key.
    pub fn parse_etcd_key(
        &self,
        cluster: &ClusterName,
        etcd_key: &[u8],
    ) -> Result<ObjectKey, KeyLayoutError> {
        let text = std::str::from_utf8(etcd_key)
            .map_err(|_| KeyLayoutError::NotUtf8(String::from_utf8_lossy(etcd_key).into()))?;
        let prefix = self.cluster_prefix(cluster);
        let Some(rest) = text.strip_prefix(&prefix) else {
            return Err(KeyLayoutError::OutsidePrefix {
                key: text.to_string(),
                prefix,
            });
        };
        let bad = |reason: String| KeyLayoutError::BadKey {
            key: text.to_string(),
            reason,
        };
        let mut parts = rest.split('/');
        let (Some(kind), Some(namespace), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected <kind>/<namespace or ->/<name>".into()));
        };
        let kind = KINDS
            .into_iter()
            .find(|k| kind_name(*k) == kind)
            .ok_or_else(|| bad(format!("unknown kind {kind:?}")))?;
        if namespace.is_empty() || name.is_empty() {
            return Err(bad("empty namespace or name segment".into()));
        }
        let namespace = if namespace == NO_NAMESPACE {
            ""
        } else {
            namespace
        };
        Ok(crate::model::key(cluster.as_str(), kind, namespace, name))
    }
}

/// The uid of an object whose etcd key was created at `create_revision`.
pub fn uid_of(create_revision: i64) -> String {
    format!("etcd-{create_revision}")
}

/// The store epoch for an etcd cluster and a prefix: stable across server restarts
/// against the same etcd, different for another etcd cluster or another prefix.
pub fn epoch_of(etcd_cluster_id: u64, prefix: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(b"isthmus clustermesh etcd epoch\0");
    h.update(etcd_cluster_id.to_be_bytes());
    h.update(prefix.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first).max(1)
}

/// Why one etcd entry was dropped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The etcd key does not fit the layout.
    #[error(transparent)]
    Key(#[from] KeyLayoutError),
    /// The value is not a protobuf `Object`.
    #[error("{key}: the value is not an encoded Object ({reason})")]
    Undecodable {
        /// The object key (from the etcd key).
        key: String,
        /// The decoder's message.
        reason: String,
    },
    /// The key inside the value is missing or differs from the etcd key.
    #[error("{key}: the value names another key ({value_key})")]
    KeyMismatch {
        /// The object key from the etcd key.
        key: String,
        /// The key inside the value.
        value_key: String,
    },
    /// etcd reported a revision that is not positive.
    #[error("{key}: bad revisions (create {create}, mod {modified})")]
    BadRevision {
        /// The object key.
        key: String,
        /// create_revision.
        create: i64,
        /// mod_revision.
        modified: i64,
    },
}

/// Decodes one etcd entry of `cluster`'s prefix into an object with its uid and revision
/// taken from etcd.
pub fn decode_entry(
    layout: &EtcdKeyLayout,
    cluster: &ClusterName,
    etcd_key: &[u8],
    value: &[u8],
    create_revision: i64,
    mod_revision: i64,
) -> Result<Object, EntryError> {
    let key = layout.parse_etcd_key(cluster, etcd_key)?;
    let shown = || KeyDisplay(&key).to_string();
    let mut obj = Object::decode(value).map_err(|e| EntryError::Undecodable {
        key: shown(),
        reason: e.to_string(),
    })?;
    if obj.key.as_ref() != Some(&key) {
        return Err(EntryError::KeyMismatch {
            key: shown(),
            value_key: obj
                .key
                .as_ref()
                .map_or_else(|| "none".to_string(), |k| KeyDisplay(k).to_string()),
        });
    }
    let revision = u64::try_from(mod_revision).unwrap_or(0);
    if revision == 0 || create_revision <= 0 {
        return Err(EntryError::BadRevision {
            key: shown(),
            create: create_revision,
            modified: mod_revision,
        });
    }
    obj.uid = uid_of(create_revision);
    obj.revision = revision;
    Ok(obj)
}

/// Counters of an etcd source (shared with whoever holds a clone of the `Arc`).
#[derive(Debug, Default)]
pub struct EtcdSourceStats {
    malformed: AtomicU64,
    listings: AtomicU64,
    session_failures: AtomicU64,
    events: AtomicU64,
}

impl EtcdSourceStats {
    /// Entries dropped before the store: keys outside the layout, undecodable values,
    /// values whose key differs from the etcd key. (Objects the store refuses, such as
    /// another cluster's gateway, are counted by [`crate::store::Store::refused`].)
    pub fn malformed(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Completed listings of the prefix (1 after the first sync, +1 per re-list).
    pub fn listings(&self) -> u64 {
        self.listings.load(Ordering::Relaxed)
    }

    /// Connections or watches that failed or ended (each followed by a reconnect).
    pub fn session_failures(&self) -> u64 {
        self.session_failures.load(Ordering::Relaxed)
    }

    /// Watch events received.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }
}

/// How to reach etcd, and how patiently.
#[derive(Debug, Clone)]
pub struct EtcdConnection {
    /// `http://host:port` client URLs of the etcd members.
    pub endpoints: Vec<String>,
    /// Limit for establishing a connection to one member.
    pub connect_timeout: Duration,
    /// Limit for one unary request (get, put, delete, lease grant).
    pub request_timeout: Duration,
    /// HTTP/2 ping interval on the connection (detects a silently dead member).
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection counts as dead.
    pub keepalive_timeout: Duration,
}

impl EtcdConnection {
    /// Defaults for the given endpoints: 5 s connect and request timeouts, pings every
    /// 10 s with a 5 s limit.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
        }
    }

    async fn connect(&self) -> Result<Client, EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(self.keepalive_interval, self.keepalive_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        bounded(
            "connect",
            self.connect_timeout,
            Client::connect(&self.endpoints, Some(options)),
        )
        .await
    }
}

/// Configuration of [`run`].
#[derive(Debug, Clone)]
pub struct EtcdSourceConfig {
    /// The etcd members.
    pub connection: EtcdConnection,
    /// Root of the key layout ([`DEFAULT_ROOT`]).
    pub root: String,
    /// First reconnect delay (doubled per failure, with jitter).
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Counters; keep a clone to read them.
    pub stats: Arc<EtcdSourceStats>,
}

impl EtcdSourceConfig {
    /// Defaults for the given endpoints: [`DEFAULT_ROOT`], backoff from 200 ms to 10 s.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            connection: EtcdConnection::new(endpoints),
            root: DEFAULT_ROOT.to_string(),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            stats: Arc::default(),
        }
    }
}

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    /// No endpoint configured.
    #[error("no etcd endpoints configured")]
    NoEndpoints,
    /// An etcd request failed.
    #[error("etcd {op}: {source}")]
    Request {
        /// The operation.
        op: &'static str,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd request took too long.
    #[error("etcd {op}: no answer within {timeout:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// An etcd response lacked its header (cluster id and revision).
    #[error("etcd {op}: the response has no header")]
    NoHeader {
        /// The operation.
        op: &'static str,
    },
}

/// Why the etcd source stopped (a bad configuration) or reconnected (everything else;
/// logged, then retried).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdSourceError {
    /// The root is not a valid layout root.
    #[error("etcd source: {0}")]
    Layout(#[from] KeyLayoutError),
    /// No endpoint configured.
    #[error("etcd source: no etcd endpoints configured")]
    NoEndpoints,
    /// Talking to etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The watch's start revision was compacted away.
    #[error(
        "the watch start revision was compacted (etcd keeps revisions from {compact_revision})"
    )]
    Compacted {
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
    /// etcd canceled the watch.
    #[error("etcd canceled the watch: {reason}")]
    WatchCanceled {
        /// etcd's reason.
        reason: String,
    },
    /// The watch stream ended.
    #[error("the etcd watch stream ended")]
    WatchEnded,
}

async fn bounded<T>(
    op: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(EtcdError::Request { op, source }),
        Err(_) => Err(EtcdError::Timeout { op, timeout }),
    }
}

/// Attempts of a writer request that no member could take (unreachable, or no leader
/// yet): a put, delete, lease grant or revoke gives the same result when repeated.
const WRITE_ATTEMPTS: u32 = 3;

/// Pause between two such attempts.
const WRITE_RETRY_PAUSE: Duration = Duration::from_millis(100);

fn is_unavailable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

/// [`bounded`], repeated up to [`WRITE_ATTEMPTS`] times while etcd is unavailable (the
/// balanced channel may first pick a member that just went down).
async fn retried<T, Fut>(
    op: &'static str,
    timeout: Duration,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, EtcdError>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tries = 1;
    loop {
        match bounded(op, timeout, attempt()).await {
            Err(EtcdError::Request { source, .. })
                if tries < WRITE_ATTEMPTS && is_unavailable(&source) =>
            {
                tracing::debug!(op, error = %source, "etcd unavailable: trying again");
                tries += 1;
                tokio::time::sleep(WRITE_RETRY_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// Jittered exponential backoff: each delay is drawn from `[d/2, d]`, `d` doubling from
/// the initial delay up to the maximum.
#[derive(Debug, Clone)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(Duration::from_millis(1));
        let max = max.max(initial);
        Self {
            initial,
            max,
            next: initial,
        }
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }

    fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        let mut bytes = [0u8; 8];
        let r = match rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut bytes) {
            Ok(()) => u64::from_le_bytes(bytes),
            Err(_) => u64::MAX,
        };
        // u64::MAX as f64 rounds up to 2^64: the fraction stays within [0, 1].
        let fraction = r as f64 / u64::MAX as f64;
        d / 2 + (d / 2).mul_f64(fraction.clamp(0.0, 1.0))
    }
}

/// Runs the etcd source for the publisher's cluster until the task is dropped. Returns
/// only on a bad configuration; etcd failures are logged and retried.
pub async fn run(publisher: Publisher, config: EtcdSourceConfig) -> Result<(), EtcdSourceError> {
    let layout = EtcdKeyLayout::new(&config.root)?;
    if config.connection.endpoints.is_empty() {
        return Err(EtcdSourceError::NoEndpoints);
    }
    let cluster = publisher.lock().cluster().clone();
    let mut source = SourceSession {
        prefix: layout.cluster_prefix(&cluster),
        layout,
        cluster,
        publisher,
        config,
    };
    let mut backoff = Backoff::new(source.config.backoff_initial, source.config.backoff_max);
    loop {
        let err = source.session(&mut backoff).await;
        source
            .config
            .stats
            .session_failures
            .fetch_add(1, Ordering::Relaxed);
        let delay = backoff.delay();
        tracing::warn!(
            prefix = %source.prefix,
            error = %err,
            retry_in = ?delay,
            "etcd source: reconnecting"
        );
        tokio::time::sleep(delay).await;
    }
}

struct SourceSession {
    layout: EtcdKeyLayout,
    cluster: ClusterName,
    prefix: String,
    publisher: Publisher,
    config: EtcdSourceConfig,
}

impl SourceSession {
    /// One connection: list, sync, watch. Returns why it ended.
    async fn session(&mut self, backoff: &mut Backoff) -> EtcdSourceError {
        let client = match self.config.connection.connect().await {
            Ok(c) => c,
            Err(e) => return e.into(),
        };
        let revision = match self.list(&client).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        backoff.reset();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_prev_key()
            .with_start_revision(revision.saturating_add(1));
        let mut watch = match bounded(
            "watch",
            self.config.connection.request_timeout,
            client
                .watch_client()
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .watch(self.prefix.as_bytes(), Some(opts)),
        )
        .await
        {
            Ok(w) => w,
            Err(e) => return e.into(),
        };
        loop {
            match watch.message().await {
                Ok(Some(resp)) => {
                    if let Some(end) = self.apply_watch_response(&resp) {
                        return end;
                    }
                }
                Ok(None) => return EtcdSourceError::WatchEnded,
                Err(source) => {
                    return EtcdError::Request {
                        op: "watch",
                        source,
                    }
                    .into();
                }
            }
        }
    }

    /// Lists the prefix page by page at one revision, replaces the store's content with
    /// it and marks the publisher synced. Returns the listing's revision.
    async fn list(&mut self, client: &Client) -> Result<i64, EtcdSourceError> {
        let timeout = self.config.connection.request_timeout;
        let mut kv = client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut prefix_end = self.prefix.clone().into_bytes();
        // The prefix ends with '/', whose successor '0' ends the range.
        if let Some(last) = prefix_end.last_mut() {
            *last += 1;
        }
        let mut start = self.prefix.clone().into_bytes();
        let mut revision: Option<i64> = None;
        let mut etcd_cluster_id = 0;
        let mut objects = Vec::new();
        loop {
            let mut opts = GetOptions::new()
                .with_range(prefix_end.clone())
                .with_limit(LIST_PAGE_SIZE);
            if let Some(r) = revision {
                opts = opts.with_revision(r);
            }
            let mut resp = bounded("list", timeout, kv.get(start.clone(), Some(opts))).await?;
            let header = resp.header().ok_or(EtcdError::NoHeader { op: "list" })?;
            if revision.is_none() {
                revision = Some(header.revision());
                etcd_cluster_id = header.cluster_id();
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            if let Some(last) = kvs.last() {
                start = last.key().to_vec();
                start.push(0);
            }
            for kv in &kvs {
                match decode_entry(
                    &self.layout,
                    &self.cluster,
                    kv.key(),
                    kv.value(),
                    kv.create_revision(),
                    kv.mod_revision(),
                ) {
                    Ok(obj) => objects.push(obj),
                    Err(e) => self.malformed(&e),
                }
            }
            if !more || kvs.is_empty() {
                break;
            }
        }
        let revision = revision.unwrap_or(0);
        let epoch = epoch_of(etcd_cluster_id, &self.prefix);
        let old_epoch = self.publisher.lock().epoch();
        if old_epoch != epoch {
            if self.config.stats.listings() > 0 {
                tracing::warn!(
                    prefix = %self.prefix,
                    etcd_cluster_id = format_args!("{etcd_cluster_id:x}"),
                    "etcd source: a different etcd cluster answers; new epoch"
                );
            }
            self.publisher.set_epoch(epoch);
        }
        let count = objects.len();
        let at = u64::try_from(revision).unwrap_or(0);
        self.publisher.replace_all(objects, at);
        self.publisher.mark_synced(at);
        self.config.stats.listings.fetch_add(1, Ordering::Relaxed);
        tracing::info!(prefix = %self.prefix, objects = count, revision, "etcd source: listed");
        Ok(revision)
    }

    /// Applies one watch response; returns why the watch ended, if it did.
    fn apply_watch_response(&self, resp: &WatchResponse) -> Option<EtcdSourceError> {
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Some(EtcdSourceError::Compacted {
                    compact_revision: resp.compact_revision(),
                });
            }
            return Some(EtcdSourceError::WatchCanceled {
                reason: resp.cancel_reason().to_string(),
            });
        }
        for event in resp.events() {
            self.config.stats.events.fetch_add(1, Ordering::Relaxed);
            // The raw event: `Event::event_type` panics on a type it does not know.
            let event = &event.0;
            let Some(kv) = event.kv.as_ref() else {
                tracing::warn!(prefix = %self.prefix, "etcd source: watch event without a key");
                continue;
            };
            let key = match self.layout.parse_etcd_key(&self.cluster, &kv.key) {
                Ok(k) => k,
                Err(e) => {
                    self.malformed(&EntryError::Key(e));
                    continue;
                }
            };
            let revision = u64::try_from(kv.mod_revision).unwrap_or(0);
            match event.r#type {
                EVENT_PUT => {
                    let uid = uid_of(kv.create_revision);
                    let obj = match decode_entry(
                        &self.layout,
                        &self.cluster,
                        &kv.key,
                        &kv.value,
                        kv.create_revision,
                        kv.mod_revision,
                    ) {
                        Ok(obj) => obj,
                        Err(e) => {
                            self.malformed(&e);
                            // The key no longer holds a valid object: withdraw the last
                            // good version, as a listing would.
                            self.publisher.delete(&key, Some(&uid), revision);
                            continue;
                        }
                    };
                    if self.publisher.upsert(obj).is_err() {
                        // Refused (and counted) by the store: withdraw the old version.
                        self.publisher.delete(&key, Some(&uid), revision);
                    }
                }
                EVENT_DELETE => {
                    // In one ordered stream the deleted version is the one the store
                    // holds; prev_kv names its uid when etcd still has it.
                    let uid = event.prev_kv.as_ref().map(|p| uid_of(p.create_revision));
                    self.publisher.delete(&key, uid.as_deref(), revision);
                }
                other => {
                    tracing::warn!(
                        key = %KeyDisplay(&key),
                        event_type = other,
                        "etcd source: unknown watch event type ignored"
                    );
                }
            }
        }
        None
    }

    fn malformed(&self, e: &EntryError) {
        self.config.stats.malformed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(prefix = %self.prefix, dropped = %e, "etcd source: malformed entry");
    }
}

/// Configuration of an [`EtcdObjectWriter`].
#[derive(Debug, Clone)]
pub struct EtcdWriterConfig {
    /// The etcd members.
    pub connection: EtcdConnection,
    /// Root of the key layout ([`DEFAULT_ROOT`]).
    pub root: String,
    /// The only cluster this writer writes.
    pub cluster: ClusterName,
}

impl EtcdWriterConfig {
    /// Defaults for the given cluster and endpoints.
    pub fn new(cluster: ClusterName, endpoints: Vec<String>) -> Self {
        Self {
            connection: EtcdConnection::new(endpoints),
            root: DEFAULT_ROOT.to_string(),
            cluster,
        }
    }
}

/// Why a write was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdWriteError {
    /// The object is another cluster's, or malformed.
    #[error("refused: {0}")]
    Refused(#[from] Invalid),
    /// The object key does not fit the layout (or the root is bad).
    #[error("refused: {0}")]
    Layout(#[from] KeyLayoutError),
    /// `register_gateway` was given an object of another kind.
    #[error("{key}: only gateways are registered under a lease")]
    NotAGateway {
        /// The object.
        key: String,
    },
    /// Talking to etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// What a write produced: the etcd revision of the write and the uid watchers see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The etcd revision of the write.
    pub revision: u64,
    /// The object's uid (from the key's create revision).
    pub uid: String,
}

/// Writes one cluster's objects into etcd, for publishers (a controller, the demo,
/// tests). Refuses objects of any other cluster and objects that
/// [`check_object`] refuses, before anything reaches etcd.
#[derive(Clone, Debug)]
pub struct EtcdObjectWriter {
    client: ClientHandle,
    layout: EtcdKeyLayout,
    cluster: ClusterName,
    request_timeout: Duration,
}

impl EtcdObjectWriter {
    /// Connects (lazily: the first request reaches a member).
    pub async fn connect(config: EtcdWriterConfig) -> Result<Self, EtcdWriteError> {
        let layout = EtcdKeyLayout::new(&config.root)?;
        let client = config.connection.connect().await?;
        Ok(Self {
            client: client.into(),
            layout,
            cluster: config.cluster,
            request_timeout: config.connection.request_timeout,
        })
    }

    /// The cluster this writer writes.
    pub fn cluster(&self) -> &ClusterName {
        &self.cluster
    }

    /// The key layout.
    pub fn layout(&self) -> &EtcdKeyLayout {
        &self.layout
    }

    /// Checks an object (this writer's cluster, well formed) and encodes it: returns the
    /// etcd key and the value (uid and revision cleared: etcd assigns them).
    fn encode(&self, obj: &Object) -> Result<(ObjectKey, String, Vec<u8>), EtcdWriteError> {
        let mut stored = obj.clone();
        // check_object wants a uid; etcd assigns the real one.
        stored.uid = "etcd-unassigned".into();
        check_object(&self.cluster, &stored)?;
        let Some(key) = stored.key.clone() else {
            return Err(Invalid::Malformed {
                key: "?".into(),
                reason: "no key".into(),
            }
            .into());
        };
        let etcd_key = self.layout.etcd_key(&key)?;
        stored.uid.clear();
        stored.revision = 0;
        Ok((key, etcd_key, stored.encode_to_vec()))
    }

    /// Creates or replaces an object.
    pub async fn put(&self, obj: &Object) -> Result<Written, EtcdWriteError> {
        let (_, etcd_key, value) = self.encode(obj)?;
        put_value(&self.client.0, self.request_timeout, etcd_key, value, None).await
    }

    /// Deletes the object under `key`; returns whether there was one.
    pub async fn delete(&self, key: &ObjectKey) -> Result<bool, EtcdWriteError> {
        if key.cluster != self.cluster.as_str() {
            return Err(Invalid::ForeignCluster {
                key: KeyDisplay(key).to_string(),
                publisher: self.cluster.to_string(),
                claimed: key.cluster.clone(),
            }
            .into());
        }
        let etcd_key = self.layout.etcd_key(key)?;
        let resp = retried("delete", self.request_timeout, || {
            let mut client = self.client.0.clone();
            let etcd_key = etcd_key.clone();
            async move { client.delete(etcd_key, None).await }
        })
        .await?;
        // (A retried delete whose first attempt went through reports false.)
        Ok(resp.deleted() > 0)
    }

    /// Deletes every key of this writer's cluster whose object is not in `keep` (a
    /// publisher making etcd match its full listing); returns how many it deleted.
    pub async fn prune_except(&self, keep: &[ObjectKey]) -> Result<usize, EtcdWriteError> {
        let prefix = self.layout.cluster_prefix(&self.cluster);
        let resp = retried("list", self.request_timeout, || {
            let mut client = self.client.0.clone();
            let prefix = prefix.clone();
            async move {
                client
                    .get(
                        prefix,
                        Some(
                            etcd_client::GetOptions::new()
                                .with_prefix()
                                .with_keys_only(),
                        ),
                    )
                    .await
            }
        })
        .await?;
        let mut pruned = 0;
        for kv in resp.kvs() {
            let Ok(key) = self.layout.parse_etcd_key(&self.cluster, kv.key()) else {
                continue;
            };
            if !keep.contains(&key) && self.delete(&key).await? {
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    /// Writes a gateway under a lease of `ttl` (whole seconds, at least 1; etcd may raise
    /// it to its minimum) and keeps the lease alive from a task. When the handle is
    /// dropped or the process dies, the keepalives stop, the lease expires and etcd
    /// deletes the gateway (watchers see a delete). If the lease is lost while the task
    /// runs (etcd unreachable for longer than the TTL), the task registers the gateway
    /// again under a new lease.
    pub async fn register_gateway(
        &self,
        gateway: &Object,
        ttl: Duration,
    ) -> Result<GatewayRegistration, EtcdWriteError> {
        let (key, etcd_key, value) = self.encode(gateway)?;
        if key.kind != Kind::Gateway as i32 {
            return Err(EtcdWriteError::NotAGateway {
                key: KeyDisplay(&key).to_string(),
            });
        }
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let lease = Lease {
            client: self.client.0.clone(),
            request_timeout: self.request_timeout,
            etcd_key,
            value,
            ttl_secs,
        };
        let (lease_id, granted) = lease.register().await?;
        let current = Arc::new(AtomicI64::new(lease_id));
        let task = tokio::spawn(lease.clone().keep_alive(lease_id, granted, current.clone()));
        Ok(GatewayRegistration {
            key,
            lease_id: current,
            task,
            client: self.client.clone(),
            request_timeout: self.request_timeout,
        })
    }
}

async fn put_value(
    client: &Client,
    timeout: Duration,
    etcd_key: String,
    value: Vec<u8>,
    lease: Option<i64>,
) -> Result<Written, EtcdWriteError> {
    let mut opts = PutOptions::new().with_prev_key();
    if let Some(id) = lease {
        opts = opts.with_lease(id);
    }
    let resp = retried("put", timeout, || {
        let mut client = client.clone();
        let (etcd_key, value, opts) = (etcd_key.clone(), value.clone(), opts.clone());
        async move { client.put(etcd_key, value, Some(opts)).await }
    })
    .await?;
    let revision = resp
        .header()
        .ok_or(EtcdError::NoHeader { op: "put" })?
        .revision();
    // An existing key keeps its create revision; a new one is created by this write.
    let created = resp
        .prev_key()
        .map_or(revision, |prev| prev.create_revision());
    Ok(Written {
        revision: u64::try_from(revision).unwrap_or(0),
        uid: uid_of(created),
    })
}

/// A gateway written under a lease.
#[derive(Clone)]
struct Lease {
    client: Client,
    request_timeout: Duration,
    etcd_key: String,
    value: Vec<u8>,
    ttl_secs: i64,
}

impl Lease {
    /// Grants a lease and writes the gateway under it: returns the lease id and its TTL.
    async fn register(&self) -> Result<(i64, i64), EtcdWriteError> {
        let grant = retried("lease grant", self.request_timeout, || {
            let mut client = self.client.clone();
            let ttl = self.ttl_secs;
            async move { client.lease_grant(ttl, None).await }
        })
        .await?;
        put_value(
            &self.client,
            self.request_timeout,
            self.etcd_key.clone(),
            self.value.clone(),
            Some(grant.id()),
        )
        .await?;
        Ok((grant.id(), grant.ttl().max(1)))
    }

    /// Sends keepalives every third of the TTL until aborted; re-registers after the
    /// lease is lost.
    async fn keep_alive(self, mut lease_id: i64, mut ttl: i64, current: Arc<AtomicI64>) {
        let retry = Duration::from_millis(500);
        loop {
            let period =
                Duration::from_millis(u64::try_from(ttl).unwrap_or(1).saturating_mul(1000) / 3);
            match self.keep_alive_stream(lease_id, period).await {
                KeepAliveEnd::Expired => {
                    tracing::warn!(key = %self.etcd_key, lease_id, "gateway lease lost: registering again");
                    loop {
                        match self.register().await {
                            Ok((id, granted)) => {
                                lease_id = id;
                                ttl = granted;
                                current.store(id, Ordering::Relaxed);
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(key = %self.etcd_key, error = %e, "gateway registration failed");
                                tokio::time::sleep(retry).await;
                            }
                        }
                    }
                }
                KeepAliveEnd::Failed(e) => {
                    tracing::warn!(key = %self.etcd_key, lease_id, error = %e, "gateway keepalive failed: retrying");
                    tokio::time::sleep(retry.min(period)).await;
                }
            }
        }
    }

    async fn keep_alive_stream(&self, lease_id: i64, period: Duration) -> KeepAliveEnd {
        let mut client = self.client.clone();
        let (mut keeper, mut stream) = match bounded(
            "lease keepalive",
            self.request_timeout,
            client.lease_keep_alive(lease_id),
        )
        .await
        {
            Ok(pair) => pair,
            Err(e) => return KeepAliveEnd::Failed(e),
        };
        loop {
            if let Err(source) = keeper.keep_alive().await {
                return KeepAliveEnd::Failed(EtcdError::Request {
                    op: "lease keepalive",
                    source,
                });
            }
            match bounded("lease keepalive", self.request_timeout, stream.message()).await {
                Ok(Some(resp)) if resp.ttl() > 0 => {}
                Ok(Some(_)) => return KeepAliveEnd::Expired,
                Ok(None) => {
                    return KeepAliveEnd::Failed(EtcdError::NoHeader {
                        op: "lease keepalive (stream ended)",
                    })
                }
                Err(e) => return KeepAliveEnd::Failed(e),
            }
            tokio::time::sleep(period).await;
        }
    }
}

enum KeepAliveEnd {
    Expired,
    Failed(EtcdError),
}

/// A gateway registered under a lease. Dropping it stops the keepalives: the gateway
/// disappears when the lease expires. [`GatewayRegistration::revoke`] withdraws it at once.
#[derive(Debug)]
pub struct GatewayRegistration {
    key: ObjectKey,
    lease_id: Arc<AtomicI64>,
    task: tokio::task::JoinHandle<()>,
    client: ClientHandle,
    request_timeout: Duration,
}

/// An etcd client in a struct that derives Debug.
#[derive(Clone)]
struct ClientHandle(Client);

impl fmt::Debug for ClientHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("etcd_client::Client")
    }
}

impl From<Client> for ClientHandle {
    fn from(c: Client) -> Self {
        Self(c)
    }
}

impl GatewayRegistration {
    /// The gateway's key.
    pub fn key(&self) -> &ObjectKey {
        &self.key
    }

    /// The lease currently holding the gateway.
    pub fn lease_id(&self) -> i64 {
        self.lease_id.load(Ordering::Relaxed)
    }

    /// Stops the keepalives and revokes the lease: etcd deletes the gateway now (a lease
    /// that already expired counts as revoked).
    pub async fn revoke(self) -> Result<(), EtcdWriteError> {
        self.task.abort();
        let id = self.lease_id();
        let result = retried("lease revoke", self.request_timeout, || {
            let mut client = self.client.0.clone();
            async move { client.lease_revoke(id).await }
        })
        .await;
        match result {
            Ok(_) => Ok(()),
            // Already expired (or revoked by an earlier attempt): the gateway is gone.
            Err(EtcdError::Request {
                source: etcd_client::Error::GRpcStatus(s),
                ..
            }) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for GatewayRegistration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::key;
    use crate::pb::{object::Body, Service};

    fn cluster(name: &str) -> ClusterName {
        ClusterName::new(name).expect("cluster name")
    }

    #[test]
    fn keys_round_trip_through_the_layout() {
        let layout = EtcdKeyLayout::new(DEFAULT_ROOT).expect("root");
        let a = cluster("a");
        for k in [
            key("a", Kind::Service, "default", "web"),
            key("a", Kind::Gateway, "", "gw-1"),
            key("a", Kind::Cluster, "", "a"),
            key("a", Kind::EndpointSlice, "prod", "web-x1"),
            key("a", Kind::Identity, "", "65537"),
        ] {
            let path = layout.etcd_key(&k).expect("representable");
            assert!(path.starts_with("/isthmus/clustermesh/v1/a/"), "{path}");
            assert_eq!(layout.parse_etcd_key(&a, path.as_bytes()), Ok(k));
        }
        assert_eq!(
            layout
                .etcd_key(&key("a", Kind::Gateway, "", "gw"))
                .expect("key"),
            "/isthmus/clustermesh/v1/a/gateway/-/gw"
        );
    }

    #[test]
    fn keys_outside_the_layout_are_refused() {
        let layout = EtcdKeyLayout::new("/r").expect("root");
        let a = cluster("a");
        for bad in [
            &b"/r/ab/service/ns/x"[..],
            b"/r/b/service/ns/x",
            b"/r/a/service/ns",
            b"/r/a/service/ns/x/y",
            b"/r/a/unicorn/ns/x",
            b"/r/a/service//x",
            b"/r/a/service/ns/",
            b"/r/a/\xff/ns/x",
        ] {
            assert!(
                layout.parse_etcd_key(&a, bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(layout
            .etcd_key(&key("a", Kind::Service, "-", "web"))
            .is_err());
        assert!(layout
            .etcd_key(&key("a", Kind::Service, "ns", "a/b"))
            .is_err());
        assert!(layout
            .etcd_key(&key("a", Kind::Unspecified, "", "x"))
            .is_err());
        for root in ["", "/", "r", "/r/", "//r", "/a//b"] {
            assert!(EtcdKeyLayout::new(root).is_err(), "{root:?}");
        }
    }

    #[test]
    fn an_entry_counts_only_when_its_etcd_key_and_its_value_agree() {
        let layout = EtcdKeyLayout::new(DEFAULT_ROOT).expect("root");
        let a = cluster("a");
        let obj = Object {
            key: Some(key("a", Kind::Service, "default", "web")),
            uid: "ignored".into(),
            revision: 99,
            body: Some(Body::Service(Service::default())),
        };
        let path = layout
            .etcd_key(&key("a", Kind::Service, "default", "web"))
            .expect("key");
        let got = decode_entry(&layout, &a, path.as_bytes(), &obj.encode_to_vec(), 5, 9)
            .expect("decoded");
        assert_eq!(got.uid, "etcd-5");
        assert_eq!(got.revision, 9);
        let other = layout
            .etcd_key(&key("a", Kind::Service, "default", "db"))
            .expect("key");
        assert!(matches!(
            decode_entry(&layout, &a, other.as_bytes(), &obj.encode_to_vec(), 5, 9),
            Err(EntryError::KeyMismatch { .. })
        ));
        assert!(matches!(
            decode_entry(&layout, &a, path.as_bytes(), b"\xff\xff\xff", 5, 9),
            Err(EntryError::Undecodable { .. })
        ));
        assert!(matches!(
            decode_entry(&layout, &a, path.as_bytes(), &obj.encode_to_vec(), 0, 9),
            Err(EntryError::BadRevision { .. })
        ));
    }

    #[test]
    fn the_epoch_depends_on_the_etcd_cluster_and_the_prefix_only() {
        let e = epoch_of(0x1234, "/r/a/");
        assert_eq!(e, epoch_of(0x1234, "/r/a/"));
        assert_ne!(e, epoch_of(0x1235, "/r/a/"));
        assert_ne!(e, epoch_of(0x1234, "/r/b/"));
        assert_ne!(e, 0);
    }

    #[test]
    fn backoff_grows_with_jitter_up_to_its_maximum() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut ceiling = Duration::from_millis(100);
        for _ in 0..8 {
            let d = b.delay();
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
            ceiling = (ceiling * 2).min(Duration::from_millis(1000));
        }
        b.reset();
        assert!(b.delay() <= Duration::from_millis(100));
    }
}
