//! A gateway's view of the mesh: the watch streams of every remote cluster folded into
//! tables (sans-IO: events and `now` in, tables out; tested on a fake clock).
//!
//! Rules:
//! - **Mark and sweep at `SnapshotEnd` only.** Objects upserted between `SnapshotBegin`
//!   and `SnapshotEnd` are marked; at `SnapshotEnd` the unmarked ones are removed. A stream
//!   that breaks mid-snapshot removes nothing.
//! - **uid-checked deletes.** A delete removes an entry only when its uid matches, so a late
//!   delete of an old object never removes a newer one under the same key.
//! - **Authorization.** Every object must belong to the cluster whose server sent it
//!   ([`check_object`]); a gateway may not carry the server's own identity; a cluster whose
//!   prefixes overlap this cluster's or another remote cluster's is refused (the first
//!   cluster to announce a prefix keeps it) and the refusal is kept for `isthmusctl`.
//! - **Liveness separate from data.** `Connected` while a stream is open; `Stale` after it
//!   breaks (the last-known state keeps serving); `Withdrawn` once stale for
//!   [`ReducerConfig::withdraw_after`]: its routes leave the tables, its objects are kept so
//!   a resumed stream applies on top of them.

use crate::model::{check_object, parse_endpoint, parse_prefixes, KeyDisplay};
use crate::pb::{self, object::Body, watch_event::Event, Kind, Object, ObjectKey, WatchEvent};
use isthmus_identity::{ClusterName, SpiffeId};
use isthmus_tunnel::IpPrefix;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Tunables.
#[derive(Debug, Clone)]
pub struct ReducerConfig {
    /// How long a cluster stays `Stale` (serving its last-known state) before its routes
    /// are withdrawn.
    pub withdraw_after: Duration,
    /// Refusals remembered per cluster.
    pub max_refusals: usize,
    /// The address space remote clusters may announce; a prefix outside every one of
    /// these is refused. The default is the private, shared (CGNAT) and unique-local
    /// ranges: a remote cluster can never claim public space, the default route,
    /// loopback, link-local or multicast.
    pub remote_space: Vec<IpPrefix>,
    /// Objects held per remote cluster; further new keys are refused.
    pub max_objects_per_cluster: usize,
    /// Largest encoded object accepted.
    pub max_object_bytes: usize,
}

/// The default [`ReducerConfig::remote_space`].
pub fn default_remote_space() -> Vec<IpPrefix> {
    [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "fc00::/7",
    ]
    .iter()
    .filter_map(|p| p.parse().ok())
    .collect()
}

impl Default for ReducerConfig {
    fn default() -> Self {
        Self {
            withdraw_after: Duration::from_secs(300),
            max_refusals: 16,
            remote_space: default_remote_space(),
            max_objects_per_cluster: 100_000,
            max_object_bytes: 64 * 1024,
        }
    }
}

/// A refusal reason safe to store and print: control characters escaped, at most
/// [`MAX_REASON_CHARS`] characters.
pub fn sanitize_reason(reason: &str) -> String {
    let mut out = String::new();
    for c in reason.chars() {
        if out.chars().count() >= MAX_REASON_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Longest refusal reason kept.
pub const MAX_REASON_CHARS: usize = 256;

/// A remote cluster's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Never synced yet.
    Connecting,
    /// A stream is open.
    Connected,
    /// The stream broke; the last-known state keeps serving.
    Stale,
    /// Stale for longer than the TTL: its routes are withdrawn.
    Withdrawn,
}

impl Liveness {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Liveness::Connecting => "connecting",
            Liveness::Connected => "connected",
            Liveness::Stale => "stale",
            Liveness::Withdrawn => "withdrawn",
        }
    }
}

/// A refused object or announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalNote {
    /// What was refused and why.
    pub reason: String,
}

#[derive(Debug)]
struct RemoteCluster {
    liveness: Liveness,
    since: Instant,
    server: Option<SpiffeId>,
    epoch: u64,
    revision: u64,
    last_event: Option<Instant>,
    last_change: Option<Instant>,
    synced: bool,
    objects: BTreeMap<ObjectKey, Object>,
    marks: Option<BTreeSet<ObjectKey>>,
    refusals: VecDeque<RefusalNote>,
    last_disconnect: Option<String>,
    /// The uid of the latest refused version of a key whose older version is kept: a
    /// delete of that uid removes the key.
    refused_uids: BTreeMap<ObjectKey, String>,
}

impl RemoteCluster {
    fn new(now: Instant) -> Self {
        Self {
            liveness: Liveness::Connecting,
            since: now,
            server: None,
            epoch: 0,
            revision: 0,
            last_event: None,
            last_change: None,
            synced: false,
            objects: BTreeMap::new(),
            marks: None,
            refusals: VecDeque::new(),
            last_disconnect: None,
            refused_uids: BTreeMap::new(),
        }
    }

    fn spec(&self, name: &ClusterName) -> Option<&pb::ClusterSpec> {
        let key = crate::model::key(name.as_str(), Kind::Cluster, "", name.as_str());
        match self.objects.get(&key)?.body.as_ref()? {
            Body::Cluster(c) => Some(c),
            _ => None,
        }
    }

    fn routed(&self) -> bool {
        self.synced && self.liveness != Liveness::Withdrawn
    }
}

/// A remote gateway as the tables carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayEntry {
    /// Object name.
    pub name: String,
    /// Its identity (the peer channel must present exactly this).
    pub spiffe_id: SpiffeId,
    /// Its channel listener.
    pub channel_endpoint: SocketAddr,
    /// Tunnel kinds, preferred first (`wireguard`, `esp`).
    pub kinds: Vec<String>,
    /// ESP cipher when ESP is offered.
    pub esp_cipher: Option<String>,
    /// ESN when ESP is offered.
    pub esn: bool,
}

/// A routed remote cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterRoute {
    /// Cluster name.
    pub name: String,
    /// Numeric id.
    pub id: u32,
    /// Pod and service prefixes (routed into the tunnel to its gateway).
    pub prefixes: Vec<IpPrefix>,
    /// Its gateways, by name.
    pub gateways: Vec<GatewayEntry>,
    /// Its liveness (`connected` or `stale`).
    pub liveness: Liveness,
}

/// One remote cluster as `isthmusctl mesh clusters` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Name.
    pub name: String,
    /// Liveness.
    pub state: Liveness,
    /// Seconds in that state.
    pub state_secs: f64,
    /// Verified identity of its API server (last stream).
    pub server: Option<String>,
    /// Epoch and revision applied.
    pub epoch: u64,
    /// Last revision applied.
    pub revision: u64,
    /// Seconds since the last event (delta or bookmark).
    pub last_event_secs: Option<f64>,
    /// Seconds since the last change to its objects.
    pub last_change_secs: Option<f64>,
    /// Objects held.
    pub objects: usize,
    /// Numeric id, when its cluster object is accepted.
    pub id: Option<u32>,
    /// Its prefixes.
    pub prefixes: Vec<String>,
    /// Its gateways.
    pub gateways: Vec<GatewayEntry>,
    /// Recent refusals.
    pub refusals: Vec<RefusalNote>,
    /// Why the last stream ended.
    pub last_disconnect: Option<String>,
    /// Why the cluster is not routed although it is synced (an overlap found now).
    #[serde(default)]
    pub conflict: Option<String>,
}

/// An endpoint of an imported service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointEntry {
    /// Address.
    pub address: String,
    /// Conditions.
    pub ready: bool,
    /// Serving.
    pub serving: bool,
    /// Terminating.
    pub terminating: bool,
}

/// One cluster's part of an imported service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceBackend {
    /// The exporting cluster.
    pub cluster: String,
    /// Its endpoints (empty when it does not share them).
    pub endpoints: Vec<EndpointEntry>,
    /// Whether its endpoints serve other clusters.
    pub shared: bool,
    /// Its cluster IPs.
    pub cluster_ips: Vec<String>,
}

/// A global service exported to this cluster (by one or more clusters).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceImport {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Ports (from the first exporting cluster).
    pub ports: Vec<String>,
    /// Affinity (`none`, `local`, `remote`).
    pub affinity: String,
    /// Per exporting cluster.
    pub backends: Vec<ServiceBackend>,
}

/// What one event changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// The routing tables ([`MeshView::routes`]) may have changed.
    pub routes_changed: bool,
    /// Any object changed.
    pub objects_changed: bool,
}

/// The mesh as one gateway sees it.
#[derive(Debug)]
pub struct MeshView {
    local: ClusterName,
    local_prefixes: Vec<IpPrefix>,
    config: ReducerConfig,
    clusters: BTreeMap<ClusterName, RemoteCluster>,
}

fn overlaps(a: &IpPrefix, b: &IpPrefix) -> bool {
    a.contains(b.addr()) || b.contains(a.addr())
}

fn kind_names(kinds: &[i32]) -> Vec<String> {
    kinds
        .iter()
        .filter_map(|k| match pb::TunnelKind::try_from(*k) {
            Ok(pb::TunnelKind::Wireguard) => Some("wireguard".to_string()),
            Ok(pb::TunnelKind::Esp) => Some("esp".to_string()),
            _ => None,
        })
        .collect()
}

impl MeshView {
    /// A view for the gateway of `local`, whose own prefixes no remote cluster may claim.
    pub fn new(local: ClusterName, local_prefixes: Vec<IpPrefix>, config: ReducerConfig) -> Self {
        Self {
            local,
            local_prefixes,
            config,
            clusters: BTreeMap::new(),
        }
    }

    /// Starts tracking `cluster` (it shows as `connecting` until its first snapshot).
    pub fn add_cluster(&mut self, cluster: ClusterName, now: Instant) {
        self.clusters
            .entry(cluster)
            .or_insert_with(|| RemoteCluster::new(now));
    }

    /// Stops tracking `cluster` (its routes go at once).
    pub fn remove_cluster(&mut self, cluster: &ClusterName) -> Applied {
        let routed = self.clusters.remove(cluster).is_some_and(|c| c.routed());
        Applied {
            routes_changed: routed,
            objects_changed: routed,
        }
    }

    fn refuse(&mut self, cluster: &ClusterName, reason: String) {
        let reason = sanitize_reason(&reason);
        tracing::warn!(%cluster, %reason, "clustermesh: refused");
        let max = self.config.max_refusals;
        if let Some(c) = self.clusters.get_mut(cluster) {
            c.refusals.push_back(RefusalNote { reason });
            while c.refusals.len() > max {
                c.refusals.pop_front();
            }
        }
    }

    /// A stream to `cluster` opened; `server` is the identity its server presented.
    pub fn connected(&mut self, cluster: &ClusterName, server: SpiffeId, now: Instant) -> Applied {
        let c = self
            .clusters
            .entry(cluster.clone())
            .or_insert_with(|| RemoteCluster::new(now));
        c.server = Some(server);
        c.last_event = Some(now);
        let was = c.liveness;
        if c.synced && was != Liveness::Connected {
            c.liveness = Liveness::Connected;
            c.since = now;
        }
        Applied {
            routes_changed: was == Liveness::Withdrawn && c.synced,
            objects_changed: false,
        }
    }

    /// The stream to `cluster` broke.
    pub fn disconnected(&mut self, cluster: &ClusterName, reason: &str, now: Instant) -> Applied {
        let Some(c) = self.clusters.get_mut(cluster) else {
            return Applied::default();
        };
        c.last_disconnect = Some(sanitize_reason(reason));
        // A snapshot that did not finish sweeps nothing.
        c.marks = None;
        if c.liveness == Liveness::Connected {
            c.liveness = Liveness::Stale;
            c.since = now;
            return Applied {
                routes_changed: true,
                objects_changed: false,
            };
        }
        Applied::default()
    }

    /// Moves clusters that have been stale for the TTL to `Withdrawn`.
    pub fn tick(&mut self, now: Instant) -> Applied {
        let ttl = self.config.withdraw_after;
        let mut changed = false;
        for (name, c) in &mut self.clusters {
            if c.liveness == Liveness::Stale && now.saturating_duration_since(c.since) >= ttl {
                tracing::warn!(cluster = %name, "clustermesh: stale for {ttl:?}; routes withdrawn");
                c.liveness = Liveness::Withdrawn;
                c.since = now;
                changed = true;
            }
        }
        Applied {
            routes_changed: changed,
            objects_changed: changed,
        }
    }

    /// Applies one event of `cluster`'s stream.
    pub fn apply(&mut self, cluster: &ClusterName, event: WatchEvent, now: Instant) -> Applied {
        let Some(c) = self.clusters.get_mut(cluster) else {
            return Applied::default();
        };
        c.last_event = Some(now);
        let Some(ev) = event.event else {
            return Applied::default();
        };
        match ev {
            Event::SnapshotBegin(_) => {
                c.marks = Some(BTreeSet::new());
                c.epoch = event.epoch;
                Applied::default()
            }
            Event::Resync(r) => {
                tracing::info!(%cluster, reason = r.reason, detail = %r.detail, "clustermesh: resync");
                c.marks = None;
                Applied::default()
            }
            Event::Bookmark(b) => {
                if c.epoch == event.epoch {
                    c.revision = c.revision.max(b.revision);
                }
                Applied::default()
            }
            Event::SnapshotEnd(end) => self.snapshot_end(cluster, event.epoch, end.revision, now),
            Event::Upsert(obj) => self.upsert(cluster, event.epoch, obj, now),
            Event::Delete(d) => {
                let Some(key) = d.key else {
                    return Applied::default();
                };
                c.revision = c.revision.max(d.revision);
                let refused_version = c.refused_uids.get(&key) == Some(&d.uid);
                let matches =
                    refused_version || c.objects.get(&key).is_some_and(|o| o.uid == d.uid);
                c.refused_uids.remove(&key);
                if !matches {
                    tracing::debug!(%cluster, key = %KeyDisplay(&key), "delete of another uid ignored");
                    return Applied::default();
                }
                c.objects.remove(&key);
                if let Some(m) = c.marks.as_mut() {
                    m.remove(&key);
                }
                c.last_change = Some(now);
                Applied {
                    routes_changed: c.routed() && routing_kind(&key),
                    objects_changed: true,
                }
            }
        }
    }

    fn snapshot_end(
        &mut self,
        cluster: &ClusterName,
        epoch: u64,
        revision: u64,
        now: Instant,
    ) -> Applied {
        let Some(c) = self.clusters.get_mut(cluster) else {
            return Applied::default();
        };
        let Some(marks) = c.marks.take() else {
            // An end without a begin on this stream: nothing to sweep safely.
            return Applied::default();
        };
        let before = c.objects.len();
        let mut routes_changed = false;
        c.objects.retain(|k, _| {
            let keep = marks.contains(k);
            if !keep && routing_kind(k) {
                routes_changed = true;
            }
            keep
        });
        let swept = before != c.objects.len();
        c.epoch = epoch;
        c.revision = revision;
        let was_routed = c.routed();
        c.synced = true;
        if c.liveness != Liveness::Connected {
            c.liveness = Liveness::Connected;
            c.since = now;
        }
        if swept {
            c.last_change = Some(now);
        }
        Applied {
            routes_changed: routes_changed || !was_routed,
            objects_changed: swept || !was_routed,
        }
    }

    fn upsert(&mut self, cluster: &ClusterName, epoch: u64, obj: Object, now: Instant) -> Applied {
        let size = prost::Message::encoded_len(&obj);
        if size > self.config.max_object_bytes {
            self.refuse(
                cluster,
                format!(
                    "an object of {size} bytes (limit {})",
                    self.config.max_object_bytes
                ),
            );
            return Applied::default();
        }
        if let Err(e) = check_object(cluster, &obj) {
            self.refuse(cluster, e.to_string());
            return Applied::default();
        }
        let Some(key) = obj.key.clone() else {
            return Applied::default();
        };
        let held = self.clusters.get(cluster).map_or(0, |c| c.objects.len());
        let known = self
            .clusters
            .get(cluster)
            .is_some_and(|c| c.objects.contains_key(&key));
        if !known && held >= self.config.max_objects_per_cluster {
            let first = self.clusters.get(cluster).is_some_and(|c| {
                !c.refusals
                    .iter()
                    .any(|r| r.reason.starts_with("object limit"))
            });
            if first {
                self.refuse(
                    cluster,
                    format!(
                        "object limit: the cluster holds {held} objects (limit {}); new ones are refused",
                        self.config.max_objects_per_cluster
                    ),
                );
            }
            return Applied::default();
        }
        if let Some(reason) = self.authorize(cluster, &obj) {
            self.refuse(cluster, reason);
            // Still marked: a refused update must not sweep the accepted version; but a
            // delete of the refused version's uid removes the key.
            if let Some(c) = self.clusters.get_mut(cluster) {
                if c.objects.contains_key(&key) {
                    c.refused_uids.insert(key.clone(), obj.uid.clone());
                }
                if let Some(m) = c.marks.as_mut() {
                    m.insert(key);
                }
            }
            return Applied::default();
        }
        let Some(c) = self.clusters.get_mut(cluster) else {
            return Applied::default();
        };
        c.refused_uids.remove(&key);
        if epoch == c.epoch {
            c.revision = c.revision.max(obj.revision);
        }
        if let Some(m) = c.marks.as_mut() {
            m.insert(key.clone());
        }
        let routing = routing_kind(&key);
        if c.objects.get(&key) == Some(&obj) {
            return Applied::default();
        }
        c.objects.insert(key, obj);
        c.last_change = Some(now);
        Applied {
            routes_changed: routing && c.routed(),
            objects_changed: true,
        }
    }

    /// Cross-cluster rules a single object cannot check on its own.
    fn authorize(&self, cluster: &ClusterName, obj: &Object) -> Option<String> {
        match obj.body.as_ref()? {
            Body::Cluster(spec) => {
                let mut prefixes = parse_prefixes(&spec.pod_prefixes).ok()?;
                prefixes.extend(parse_prefixes(&spec.service_prefixes).ok()?);
                for p in &prefixes {
                    let inside = self
                        .config
                        .remote_space
                        .iter()
                        .any(|space| space.len() <= p.len() && space.contains(p.addr()));
                    if !inside {
                        return Some(format!(
                            "cluster {cluster} announces {p}, outside the space remote clusters may use"
                        ));
                    }
                }
                for (other, oc) in &self.clusters {
                    let same_id = oc.spec(other).is_some_and(|os| os.id == spec.id);
                    if other != cluster && oc.liveness != Liveness::Withdrawn && same_id {
                        return Some(format!(
                            "cluster {cluster} announces cluster id {}, which cluster {other} has",
                            spec.id
                        ));
                    }
                }
                for p in &prefixes {
                    if let Some(l) = self.local_prefixes.iter().find(|l| overlaps(p, l)) {
                        return Some(format!(
                            "cluster {cluster} announces {p}, which overlaps this cluster's ({}) {l}",
                            self.local
                        ));
                    }
                    for (other, oc) in &self.clusters {
                        if other == cluster || oc.liveness == Liveness::Withdrawn {
                            continue;
                        }
                        let Some(os) = oc.spec(other) else { continue };
                        let theirs = parse_prefixes(&os.pod_prefixes)
                            .into_iter()
                            .chain(parse_prefixes(&os.service_prefixes))
                            .flatten();
                        for q in theirs {
                            if overlaps(p, &q) {
                                return Some(format!(
                                    "cluster {cluster} announces {p}, which overlaps cluster {other}'s {q}"
                                ));
                            }
                        }
                    }
                }
                None
            }
            Body::Identity(i) => {
                // A numeric identity carries its cluster id in its upper bits: a cluster
                // may publish only identities of its own id.
                let c = self.clusters.get(cluster)?;
                let own = c.spec(cluster).map(|s| s.id);
                let claimed = isthmus_identity::SecurityIdentity::from_u64(i.id)
                    .ok()
                    .map(|s| s.cluster().get());
                match (own, claimed) {
                    (Some(own), Some(claimed)) if own == claimed => None,
                    (None, _) => Some(format!(
                        "cluster {cluster} publishes identity {} before its cluster object",
                        i.id
                    )),
                    (Some(own), _) => Some(format!(
                        "cluster {cluster} (id {own}) publishes identity {} of another cluster id",
                        i.id
                    )),
                }
            }
            Body::Gateway(g) => {
                let c = self.clusters.get(cluster)?;
                if c.server
                    .as_ref()
                    .is_some_and(|s| s.to_string() == g.spiffe_id)
                {
                    return Some(format!(
                        "cluster {cluster}'s API server announces its own identity {} as a gateway",
                        g.spiffe_id
                    ));
                }
                None
            }
            _ => None,
        }
    }

    /// The routed remote clusters (synced, not withdrawn, with an accepted cluster
    /// object), minus every cluster in conflict (see [`MeshView::conflicts`]).
    pub fn routes(&self) -> Vec<ClusterRoute> {
        let candidates = self.candidates();
        let conflicts = conflicts_of(&candidates, &self.local_prefixes);
        candidates
            .into_iter()
            .filter(|r| !conflicts.contains_key(&r.name))
            .collect()
    }

    fn candidates(&self) -> Vec<ClusterRoute> {
        let mut out = Vec::new();
        for (name, c) in &self.clusters {
            if !c.routed() {
                continue;
            }
            let Some(spec) = c.spec(name) else { continue };
            let mut prefixes = parse_prefixes(&spec.pod_prefixes).unwrap_or_default();
            prefixes.extend(parse_prefixes(&spec.service_prefixes).unwrap_or_default());
            out.push(ClusterRoute {
                name: name.to_string(),
                id: spec.id,
                prefixes,
                gateways: gateways(c),
                liveness: c.liveness,
            });
        }
        out
    }

    /// Routed clusters that are left out of [`MeshView::routes`], with the reason: two
    /// clusters whose prefixes or ids overlap (both are left out: traffic for contested
    /// space is dropped rather than sent to whoever announced last or first), a prefix
    /// overlapping this cluster's, or a prefix that holds a gateway's channel endpoint
    /// (its tunnel would carry itself). Checked on every call, so a cluster that comes
    /// back from `withdrawn` is checked against what was accepted meanwhile.
    pub fn conflicts(&self) -> BTreeMap<String, String> {
        conflicts_of(&self.candidates(), &self.local_prefixes)
    }

    /// Every tracked cluster, for status output.
    pub fn clusters(&self, now: Instant) -> Vec<ClusterStatus> {
        let age = |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t).as_secs_f64());
        let conflicts = self.conflicts();
        self.clusters
            .iter()
            .map(|(name, c)| {
                let spec = c.spec(name);
                let mut prefixes: Vec<String> = Vec::new();
                if let Some(s) = spec {
                    prefixes.extend(s.pod_prefixes.iter().cloned());
                    prefixes.extend(s.service_prefixes.iter().cloned());
                }
                ClusterStatus {
                    conflict: conflicts.get(name.as_str()).cloned(),
                    name: name.to_string(),
                    state: c.liveness,
                    state_secs: now.saturating_duration_since(c.since).as_secs_f64(),
                    server: c.server.as_ref().map(|s| s.to_string()),
                    epoch: c.epoch,
                    revision: c.revision,
                    last_event_secs: age(c.last_event),
                    last_change_secs: age(c.last_change),
                    objects: c.objects.len(),
                    id: spec.map(|s| s.id),
                    prefixes,
                    gateways: gateways(c),
                    refusals: c.refusals.iter().cloned().collect(),
                    last_disconnect: c.last_disconnect.clone(),
                }
            })
            .collect()
    }

    /// Global services exported to this cluster by routed clusters, with the endpoints of
    /// the clusters that share them.
    pub fn services(&self) -> Vec<ServiceImport> {
        let mut imports: BTreeMap<(String, String), ServiceImport> = BTreeMap::new();
        let conflicts = self.conflicts();
        for (name, c) in &self.clusters {
            if !c.routed() || conflicts.contains_key(name.as_str()) {
                continue;
            }
            for obj in c.objects.values() {
                let (Some(key), Some(Body::Service(svc))) = (&obj.key, &obj.body) else {
                    continue;
                };
                if !svc.global {
                    continue;
                }
                let entry = imports
                    .entry((key.namespace.clone(), key.name.clone()))
                    .or_insert_with(|| ServiceImport {
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                        ports: svc
                            .ports
                            .iter()
                            .map(|p| format!("{}/{}", p.port, p.protocol))
                            .collect(),
                        affinity: match pb::Affinity::try_from(svc.affinity) {
                            Ok(pb::Affinity::Local) => "local",
                            Ok(pb::Affinity::Remote) => "remote",
                            _ => "none",
                        }
                        .to_string(),
                        backends: Vec::new(),
                    });
                let mut endpoints = Vec::new();
                if svc.shared {
                    for o in c.objects.values() {
                        let (Some(k), Some(Body::EndpointSlice(slice))) = (&o.key, &o.body) else {
                            continue;
                        };
                        if k.namespace != key.namespace || slice.service != key.name {
                            continue;
                        }
                        for e in &slice.endpoints {
                            for a in &e.addresses {
                                endpoints.push(EndpointEntry {
                                    address: a.clone(),
                                    ready: e.ready,
                                    serving: e.serving,
                                    terminating: e.terminating,
                                });
                            }
                        }
                    }
                }
                entry.backends.push(ServiceBackend {
                    cluster: name.to_string(),
                    endpoints,
                    shared: svc.shared,
                    cluster_ips: svc.cluster_ips.clone(),
                });
            }
        }
        imports.into_values().collect()
    }
}

/// See [`MeshView::conflicts`].
fn conflicts_of(candidates: &[ClusterRoute], local: &[IpPrefix]) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut mark = |name: &str, why: String| {
        out.entry(name.to_string()).or_insert(why);
    };
    // Sort every (prefix, owner) by family and address: a prefix overlaps another only
    // if one contains the other, so a stack of the prefixes that contain the current
    // one finds every overlap in one pass.
    let mut all: Vec<(IpPrefix, Option<usize>)> = local.iter().map(|p| (*p, None)).collect();
    for (i, r) in candidates.iter().enumerate() {
        all.extend(r.prefixes.iter().map(|p| (*p, Some(i))));
    }
    let sort_key = |p: &IpPrefix| {
        let (v6, bits) = match p.addr() {
            std::net::IpAddr::V4(a) => (false, u128::from(u32::from(a))),
            std::net::IpAddr::V6(a) => (true, u128::from(a)),
        };
        (v6, bits, p.len())
    };
    all.sort_by_key(|(p, _)| sort_key(p));
    let name = |o: Option<usize>| {
        o.map_or_else(
            || "this cluster".to_string(),
            |i| format!("cluster {}", candidates[i].name),
        )
    };
    let mut open: Vec<(IpPrefix, Option<usize>)> = Vec::new();
    for (p, owner) in all {
        while open
            .last()
            .is_some_and(|(q, _)| !q.contains(p.addr()) || q.addr().is_ipv4() != p.addr().is_ipv4())
        {
            open.pop();
        }
        for (q, other) in &open {
            if *other == owner {
                continue;
            }
            let why = format!("{p} ({}) overlaps {q} ({})", name(owner), name(*other));
            for o in [owner, *other].into_iter().flatten() {
                mark(&candidates[o].name, why.clone());
            }
        }
        open.push((p, owner));
    }
    for (i, a) in candidates.iter().enumerate() {
        for b in &candidates[i + 1..] {
            if a.id == b.id {
                let why = format!(
                    "clusters {} and {} both announce cluster id {}",
                    a.name, b.name, a.id
                );
                mark(&a.name, why.clone());
                mark(&b.name, why);
            }
        }
        for r in candidates {
            for g in &r.gateways {
                if let Some(p) = a
                    .prefixes
                    .iter()
                    .find(|p| p.contains(g.channel_endpoint.ip()))
                {
                    mark(
                        &a.name,
                        format!(
                            "{p} of cluster {} holds the channel endpoint of {}",
                            a.name, g.spiffe_id
                        ),
                    );
                }
            }
        }
    }
    out
}

fn routing_kind(key: &ObjectKey) -> bool {
    key.kind == Kind::Cluster as i32 || key.kind == Kind::Gateway as i32
}

fn gateways(c: &RemoteCluster) -> Vec<GatewayEntry> {
    c.objects
        .values()
        .filter_map(|o| {
            let (Some(key), Some(Body::Gateway(g))) = (&o.key, &o.body) else {
                return None;
            };
            Some(GatewayEntry {
                name: key.name.clone(),
                spiffe_id: SpiffeId::parse(&g.spiffe_id).ok()?,
                channel_endpoint: parse_endpoint(&g.channel_endpoint).ok()?,
                kinds: kind_names(&g.kinds),
                esp_cipher: (!g.esp_cipher.is_empty()).then(|| g.esp_cipher.clone()),
                esn: g.esn,
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "reducer_tests.rs"]
mod tests;
