//! The clustermesh API scale benchmark (`isthmus-mesh-bench api`): many clusters, each with
//! its own API server, watched by a few simulated gateways, all in one process.
//!
//! What runs is the real code: one [`Publisher`]/[`Store`] per cluster served by the tonic
//! [`ClusterMeshService`] through [`server::serve`] (TLS 1.3 with client certificates over
//! loopback TCP, from a real mesh PKI made with `isthmus-certs`), and per simulated gateway
//! one [`client::spawn_watch`] per remote cluster feeding one [`MeshView`] — what a gateway
//! that watches every remote cluster does. Nothing is mocked but the sources: the bench
//! writes into the publishers directly.
//!
//! Measured:
//! - the time until every gateway has applied the snapshot of every cluster (then checked:
//!   every cluster routed with its gateway, every service with its endpoints);
//! - then, for `changes` changes spread over random clusters (new endpoints of a service,
//!   a service added, a service removed, a gateway's channel endpoint moved), the time from
//!   the publish until every gateway's reducer has applied it. A change is matched by the
//!   revision the store gave its last write: the feeding task stamps every delta it
//!   applies with `(cluster, revision, time)` right after [`MeshView::apply`]. The tables
//!   are compared with the stores once more at the end;
//! - resident memory and threads of the process (from `/proc/self/status`) before the
//!   servers, after them, after the sync and at the end.
//!
//! Like the gateway's consume loop, a gateway recomputes its route table
//! ([`MeshView::routes`]) whenever an event changed routes (a change is stamped after that);
//! it does not plan or program peers, tunnels, kernel routes or BPF maps, and
//! [`MeshView::services`] is computed only for the two checks. The sources are not run
//! (file, etcd, Kubernetes): the bench writes into the publishers.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use isthmus_certs::{MeshRootCa, Validity};
use isthmus_clustermesh_api::client::{self, ClientEvent, ClientOptions, WatchHandle, WatchTarget};
use isthmus_clustermesh_api::model::key;
use isthmus_clustermesh_api::pb::{self, object::Body, watch_event::Event, Kind, Object};
use isthmus_clustermesh_api::reducer::{Applied, ClusterRoute, MeshView, ReducerConfig};
use isthmus_clustermesh_api::server::{self, ClusterMeshService, ServerOptions};
use isthmus_clustermesh_api::source::Publisher;
use isthmus_clustermesh_api::store::{Store, DEFAULT_HISTORY};
use isthmus_identity::{ClusterName, GatewayName, MeshTls, MeshTrust, PeerPolicy, TrustDomain};
use isthmus_tunnel::IpPrefix;
use serde::Serialize;
use tokio::sync::{mpsc, watch};

/// What the transport is, as the report states it.
pub const TRANSPORT: &str =
    "mTLS (TLS 1.3, rustls/ring, client certificates) over loopback TCP, one tonic server per cluster";

/// Namespace of every published service.
const NAMESPACE: &str = "bench";

/// Largest cluster count: cluster `i` gets `10.0.0.0/8`'s `/22` number `i` for pods and
/// `100.64.0.0/10`'s `/24` number `i` for services.
pub const MAX_CLUSTERS: usize = 16_384;

/// Largest gateway count: gateway `g`'s own cluster has `172.16.0.0/12`'s `/24` number `g`.
pub const MAX_GATEWAYS: usize = 4_096;

/// Tunables of a run.
#[derive(Debug, Clone)]
pub struct ApiBenchOptions {
    /// Clusters, each with its own API server.
    pub clusters: usize,
    /// Services per cluster (each with one EndpointSlice).
    pub services: usize,
    /// Endpoints per EndpointSlice.
    pub endpoints: usize,
    /// Simulated gateways, each watching every cluster.
    pub gateways: usize,
    /// Changes published after the sync.
    pub changes: usize,
    /// Time between two changes.
    pub change_interval: Duration,
    /// Tokio worker threads.
    pub workers: usize,
    /// Seed of the choice of clusters and change kinds.
    pub seed: u64,
    /// Longest wait for the initial sync.
    pub sync_timeout: Duration,
    /// Longest wait, after the last change, for every gateway to apply every change.
    pub settle_timeout: Duration,
    /// Recompute the route table ([`MeshView::routes`]) whenever an event changed routes,
    /// as the gateway's consume loop does before it reprograms peers; a change is stamped
    /// after that.
    pub derive_routes: bool,
}

impl Default for ApiBenchOptions {
    fn default() -> Self {
        Self {
            clusters: 1000,
            services: 100,
            endpoints: 3,
            gateways: 10,
            changes: 200,
            change_interval: Duration::from_millis(20),
            workers: 2,
            seed: 1,
            sync_timeout: Duration::from_secs(600),
            settle_timeout: Duration::from_secs(60),
            derive_routes: true,
        }
    }
}

impl ApiBenchOptions {
    /// Checks the numbers before anything starts.
    pub fn validate(&self) -> Result<(), String> {
        if self.clusters == 0 || self.clusters > MAX_CLUSTERS {
            return Err(format!("clusters must be 1..={MAX_CLUSTERS}"));
        }
        if self.gateways == 0 || self.gateways > MAX_GATEWAYS {
            return Err(format!("gateways must be 1..={MAX_GATEWAYS}"));
        }
        if self.services == 0 {
            return Err("services must be at least 1".into());
        }
        if self.endpoints == 0 || self.endpoints > 512 {
            return Err("endpoints must be 1..=512".into());
        }
        if self.workers == 0 {
            return Err("workers must be at least 1".into());
        }
        Ok(())
    }

    fn watch_streams(&self) -> usize {
        self.clusters * self.gateways
    }
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct ApiBenchReport {
    /// How servers and clients are connected.
    pub transport: String,
    /// Clusters (= API servers).
    pub clusters: usize,
    /// Services per cluster at the start.
    pub services_per_cluster: usize,
    /// Endpoints per service.
    pub endpoints_per_service: usize,
    /// Simulated gateways.
    pub gateways: usize,
    /// Watch streams (clusters × gateways).
    pub watch_streams: usize,
    /// Tokio worker threads.
    pub worker_threads: usize,
    /// Objects each gateway holds after the sync.
    pub objects_per_gateway: usize,
    /// PKI, stores and servers.
    pub setup_secs: f64,
    /// The initial sync.
    pub sync: SyncReport,
    /// The changes.
    pub changes: ChangeReport,
    /// Memory and threads.
    pub resources: ResourceReport,
    /// What the watch streams went through (all zero in a healthy run).
    pub streams: StreamReport,
    /// Route-table recomputations on `routes_changed` (all gateways, whole run).
    pub route_derivation: RouteDerivation,
}

/// The route-table recomputations the gateways did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RouteDerivation {
    /// Whether the run recomputed them (`ApiBenchOptions::derive_routes`).
    pub enabled: bool,
    /// How many.
    pub recomputes: u64,
    /// Time spent in them, summed over the gateways.
    pub total_secs: f64,
}

/// The initial sync.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    /// From the start of the watches until every gateway applied every snapshot.
    pub all_gateways_secs: f64,
    /// The fastest gateway.
    pub first_gateway_secs: f64,
    /// Clusters routed per gateway (checked against the stores).
    pub routed_clusters: usize,
    /// Service backends (cluster × service) per gateway (checked against the stores).
    pub service_backends: usize,
    /// Endpoints per gateway (checked against the stores).
    pub endpoints: usize,
}

/// The changes and how long they took.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeReport {
    /// Changes published.
    pub published: usize,
    /// Time between two publishes.
    pub interval_ms: f64,
    /// By kind: new endpoints, service added, service removed, gateway endpoint moved.
    pub by_kind: BTreeMap<String, usize>,
    /// (change, gateway) pairs whose apply was not seen as a delta (0 in a healthy run).
    pub unmatched: usize,
    /// Publish → applied by every gateway (the slowest gateway per change).
    pub latency_all_gateways_ms: Percentiles,
    /// Publish → applied, per (change, gateway).
    pub latency_each_gateway_ms: Percentiles,
    /// The tables still match the stores after the changes.
    pub tables_match_after: bool,
    /// How they differ, when they do.
    pub tables_mismatch: Option<String>,
}

/// Percentiles (nearest rank) in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `samples` (sorted in place).
    pub fn of(samples: &mut [Duration]) -> Self {
        samples.sort_unstable();
        let rank = |p: f64| {
            let n = samples.len();
            let i = ((p * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples[i].as_secs_f64() * 1e3
        };
        if samples.is_empty() {
            return Self::default();
        }
        Self {
            count: samples.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: rank(1.0),
        }
    }
}

/// Process memory and threads.
#[derive(Debug, Clone, Serialize)]
pub struct ResourceReport {
    /// `RLIMIT_NOFILE` during the run.
    pub fd_limit: u64,
    /// Resident memory at the start (runtime up, nothing else).
    pub rss_start_mib: f64,
    /// After the PKI, stores and listening servers.
    pub rss_servers_mib: f64,
    /// After every gateway synced.
    pub rss_synced_mib: f64,
    /// After the changes.
    pub rss_end_mib: f64,
    /// (synced − servers) / (clusters × gateways): one watched remote cluster, both ends of
    /// its stream (the servers run in this process too) plus its share of the reducer.
    pub per_remote_cluster_per_gateway_kib: f64,
    /// (synced − servers) / gateways: one gateway watching every cluster (same caveat).
    pub per_gateway_mib: f64,
    /// After the sync once the allocator returned its free pages (glibc `malloc_trim`):
    /// live memory rather than what the sync burst left mapped. `None` off glibc.
    pub rss_synced_live_mib: Option<f64>,
    /// Like `per_remote_cluster_per_gateway_kib`, from the live figure.
    pub per_remote_cluster_per_gateway_live_kib: Option<f64>,
    /// Like `per_gateway_mib`, from the live figure.
    pub per_gateway_live_mib: Option<f64>,
    /// Threads at the start, after the sync and at the end.
    pub threads_start: u64,
    /// After the sync.
    pub threads_synced: u64,
    /// At the end.
    pub threads_end: u64,
    /// Open file descriptors after the sync (listeners and both ends of every stream).
    pub open_fds_synced: usize,
}

/// Stream events counted by the gateways.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamReport {
    /// Streams opened (one per watch in a healthy run).
    pub connects: u64,
    /// Streams that broke or failed to open.
    pub disconnects: u64,
    /// Resyncs the servers sent.
    pub resyncs: u64,
    /// Objects or announcements the reducers refused.
    pub refusals: usize,
    /// The last disconnect reason, if any.
    pub last_disconnect: Option<String>,
}

/// Runs the benchmark on a runtime of its own and stops everything it started.
pub fn run(opts: ApiBenchOptions) -> Result<ApiBenchReport> {
    opts.validate().map_err(anyhow::Error::msg)?;
    // Listeners, both ends of every stream, and room for the rest (the runtime, stdio and
    // the /proc reads need a few dozen).
    let fd_limit = raise_fd_limit((opts.clusters + 2 * opts.watch_streams() + 256) as u64)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.workers)
        .thread_name("mesh-bench")
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let result = runtime.block_on(run_on_runtime(opts, fd_limit));
    runtime.shutdown_timeout(Duration::from_secs(10));
    result
}

async fn run_on_runtime(opts: ApiBenchOptions, fd_limit: u64) -> Result<ApiBenchReport> {
    let start_status = ProcStatus::read()?;
    let setup_started = Instant::now();
    let pki = BenchPki::new()?;
    let (stop_servers, stop_rx) = watch::channel(false);
    let mut clusters = Vec::with_capacity(opts.clusters);
    let mut server_tasks = Vec::with_capacity(opts.clusters);
    for i in 0..opts.clusters {
        let (cluster, task) = start_cluster(&pki, i, &opts, stop_rx.clone()).await?;
        clusters.push(cluster);
        server_tasks.push(task);
    }
    let setup_secs = setup_started.elapsed().as_secs_f64();
    let servers_status = ProcStatus::read()?;

    let outcome = measure(&opts, &pki, &mut clusters).await;

    let _ = stop_servers.send(true);
    let all_stopped = async {
        for task in server_tasks {
            let _ = task.await;
        }
    };
    // What is left after this is dropped with the runtime.
    let _ = tokio::time::timeout(Duration::from_secs(10), all_stopped).await;
    let m = outcome?;
    let per_stream_kib = |synced: &ProcStatus| {
        synced.rss_kib.saturating_sub(servers_status.rss_kib) as f64 / opts.watch_streams() as f64
    };
    let live_kib = m.synced_live.as_ref().map(per_stream_kib);
    Ok(ApiBenchReport {
        transport: TRANSPORT.into(),
        clusters: opts.clusters,
        services_per_cluster: opts.services,
        endpoints_per_service: opts.endpoints,
        gateways: opts.gateways,
        watch_streams: opts.watch_streams(),
        worker_threads: opts.workers,
        objects_per_gateway: opts.clusters * (2 + 2 * opts.services),
        setup_secs,
        sync: m.sync,
        changes: m.changes,
        resources: ResourceReport {
            fd_limit,
            rss_start_mib: mib(start_status.rss_kib),
            rss_servers_mib: mib(servers_status.rss_kib),
            rss_synced_mib: mib(m.synced.rss_kib),
            rss_end_mib: mib(m.end.rss_kib),
            per_remote_cluster_per_gateway_kib: per_stream_kib(&m.synced),
            per_gateway_mib: per_stream_kib(&m.synced) * opts.clusters as f64 / 1024.0,
            rss_synced_live_mib: m.synced_live.map(|s| mib(s.rss_kib)),
            per_remote_cluster_per_gateway_live_kib: live_kib,
            per_gateway_live_mib: live_kib.map(|k| k * opts.clusters as f64 / 1024.0),
            threads_start: start_status.threads,
            threads_synced: m.synced.threads,
            threads_end: m.end.threads,
            open_fds_synced: m.open_fds_synced,
        },
        streams: m.streams,
        route_derivation: m.route_derivation,
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

struct Measured {
    sync: SyncReport,
    changes: ChangeReport,
    synced: ProcStatus,
    synced_live: Option<ProcStatus>,
    end: ProcStatus,
    open_fds_synced: usize,
    streams: StreamReport,
    route_derivation: RouteDerivation,
}

async fn measure(
    opts: &ApiBenchOptions,
    pki: &BenchPki,
    clusters: &mut [BenchCluster],
) -> Result<Measured> {
    let client_options = ClientOptions {
        // Ten thousand handshakes share two cores at the start: generous deadlines, so
        // that the storm does not turn into a reconnect storm.
        connect_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(120),
        ..ClientOptions::default()
    };
    let watch_started = Instant::now();
    let mut gateways = Vec::with_capacity(opts.gateways);
    for g in 0..opts.gateways {
        gateways.push(SimulatedGateway::start(
            pki,
            g,
            clusters,
            &client_options,
            opts.derive_routes,
        )?);
    }

    // (a) the initial sync.
    let deadline = watch_started + opts.sync_timeout;
    let synced_at = loop {
        let times: Vec<Option<Instant>> = gateways.iter().map(|g| g.state().synced_at).collect();
        if times.iter().all(Option::is_some) {
            break times.into_iter().flatten().collect::<Vec<_>>();
        }
        if Instant::now() > deadline {
            let counts: Vec<usize> = gateways.iter().map(|g| g.state().synced_count).collect();
            bail!(
                "no full sync within {:?}: clusters synced per gateway {counts:?}, streams {:?}",
                opts.sync_timeout,
                stream_report(&gateways)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = |t: &Instant| t.saturating_duration_since(watch_started).as_secs_f64();
    let all_gateways_secs = synced_at.iter().map(secs).fold(0.0, f64::max);
    let first_gateway_secs = synced_at.iter().map(secs).fold(f64::INFINITY, f64::min);
    let synced = ProcStatus::read()?;
    let synced_live = if release_free_heap() {
        Some(ProcStatus::read()?)
    } else {
        None
    };
    let open_fds_synced = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let tables = check_tables(&gateways, clusters).context("after the sync")?;
    let sync = SyncReport {
        all_gateways_secs,
        first_gateway_secs,
        routed_clusters: tables.routed,
        service_backends: tables.backends,
        endpoints: tables.endpoints,
    };

    // (b) the changes.
    let mut rng = SplitMix64(opts.seed);
    let mut published = Vec::with_capacity(opts.changes);
    let mut by_kind = BTreeMap::new();
    let mut ticks = tokio::time::interval(opts.change_interval.max(Duration::from_micros(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..opts.changes {
        ticks.tick().await;
        let i = rng.below(clusters.len());
        let kind = ChangeKind::ALL[rng.below(ChangeKind::ALL.len())];
        let change = clusters[i].publish(kind, &mut rng, opts);
        *by_kind.entry(change.kind.name().to_string()).or_insert(0) += 1;
        published.push(change);
    }
    let settle_deadline = Instant::now() + opts.settle_timeout;
    loop {
        let pending = gateways
            .iter()
            .map(|g| {
                let s = g.state();
                published
                    .iter()
                    .filter(|c| s.max_revision[c.cluster] < c.revision)
                    .count()
            })
            .sum::<usize>();
        if pending == 0 {
            break;
        }
        if Instant::now() > settle_deadline {
            bail!(
                "{pending} (change, gateway) pairs not applied within {:?} of the last change; streams {:?}",
                opts.settle_timeout,
                stream_report(&gateways)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut slowest = Vec::with_capacity(published.len());
    let mut each = Vec::with_capacity(published.len() * gateways.len());
    let mut unmatched = 0;
    for change in &published {
        let mut worst = Duration::ZERO;
        for g in &gateways {
            match g.state().applied.get(&(change.cluster, change.revision)) {
                Some(at) => {
                    let d = at.saturating_duration_since(change.published_at);
                    worst = worst.max(d);
                    each.push(d);
                }
                None => unmatched += 1,
            }
        }
        slowest.push(worst);
    }
    let tables_mismatch = check_tables(&gateways, clusters)
        .err()
        .map(|e| format!("{e:#}"));
    let end = ProcStatus::read()?;
    let streams = stream_report(&gateways);
    let mut route_derivation = RouteDerivation {
        enabled: opts.derive_routes,
        ..RouteDerivation::default()
    };
    for g in &gateways {
        let s = g.state();
        route_derivation.recomputes += s.route_recomputes;
        route_derivation.total_secs += s.route_time.as_secs_f64();
    }
    drop(gateways);
    Ok(Measured {
        sync,
        changes: ChangeReport {
            published: published.len(),
            interval_ms: opts.change_interval.as_secs_f64() * 1e3,
            by_kind,
            unmatched,
            latency_all_gateways_ms: Percentiles::of(&mut slowest),
            latency_each_gateway_ms: Percentiles::of(&mut each),
            tables_match_after: tables_mismatch.is_none(),
            tables_mismatch,
        },
        synced,
        synced_live,
        end,
        open_fds_synced,
        streams,
        route_derivation,
    })
}

fn stream_report(gateways: &[SimulatedGateway]) -> StreamReport {
    let mut r = StreamReport::default();
    for g in gateways {
        let s = g.state();
        r.connects += s.connects;
        r.disconnects += s.disconnects;
        r.resyncs += s.resyncs;
        r.refusals += s
            .view
            .clusters(Instant::now())
            .iter()
            .map(|c| c.refusals.len())
            .sum::<usize>();
        if s.last_disconnect.is_some() {
            r.last_disconnect = s.last_disconnect.clone();
        }
    }
    r
}

/// What every gateway's tables should show, from the stores.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tables {
    routed: usize,
    /// cluster → the channel endpoints of its gateways.
    gateway_endpoints: BTreeMap<String, Vec<String>>,
    backends: usize,
    endpoints: usize,
}

fn expected_tables(clusters: &[BenchCluster]) -> Tables {
    let mut t = Tables {
        routed: clusters.len(),
        gateway_endpoints: BTreeMap::new(),
        backends: 0,
        endpoints: 0,
    };
    for c in clusters {
        let store = c.publisher.lock();
        let mut services = std::collections::BTreeSet::new();
        for o in store.objects() {
            if let (Some(k), Some(Body::Service(s))) = (&o.key, &o.body) {
                if s.global {
                    services.insert(k.name.clone());
                }
            }
        }
        t.backends += services.len();
        let mut endpoints = Vec::new();
        for o in store.objects() {
            match &o.body {
                Some(Body::Gateway(g)) => endpoints.push(g.channel_endpoint.clone()),
                Some(Body::EndpointSlice(s)) if services.contains(&s.service) => {
                    t.endpoints += s.endpoints.iter().map(|e| e.addresses.len()).sum::<usize>();
                }
                _ => {}
            }
        }
        endpoints.sort();
        t.gateway_endpoints.insert(c.name.to_string(), endpoints);
    }
    t
}

fn view_tables(view: &MeshView) -> Tables {
    let routes = view.routes();
    let mut gateway_endpoints = BTreeMap::new();
    for r in &routes {
        let mut eps: Vec<String> = r
            .gateways
            .iter()
            .map(|g| g.channel_endpoint.to_string())
            .collect();
        eps.sort();
        gateway_endpoints.insert(r.name.clone(), eps);
    }
    let services = view.services();
    Tables {
        routed: routes.len(),
        gateway_endpoints,
        backends: services.iter().map(|s| s.backends.len()).sum(),
        endpoints: services
            .iter()
            .flat_map(|s| &s.backends)
            .map(|b| b.endpoints.len())
            .sum(),
    }
}

fn check_tables(gateways: &[SimulatedGateway], clusters: &[BenchCluster]) -> Result<Tables> {
    let expected = expected_tables(clusters);
    for g in gateways {
        let got = view_tables(&g.state().view);
        if got != expected {
            bail!(
                "gateway {} disagrees with the stores: routed {} (expected {}), backends {} ({}), \
                 endpoints {} ({}), gateway endpoints equal: {}",
                g.index,
                got.routed,
                expected.routed,
                got.backends,
                expected.backends,
                got.endpoints,
                expected.endpoints,
                got.gateway_endpoints == expected.gateway_endpoints
            );
        }
    }
    Ok(expected)
}

/// The mesh PKI: one root, a cluster CA per cluster (made on demand).
struct BenchPki {
    td: TrustDomain,
    root: MeshRootCa,
}

impl BenchPki {
    fn new() -> Result<Self> {
        let td = TrustDomain::new("bench.mesh").context("trust domain")?;
        let root = MeshRootCa::create(&td, validity()?).context("mesh root")?;
        Ok(Self { td, root })
    }

    fn trust(&self) -> MeshTrust {
        MeshTrust {
            roots: vec![self.root.certificate().clone()],
            crls: vec![],
        }
    }

    /// mTLS material of gateway `name` of `cluster`.
    fn tls(&self, cluster: &ClusterName, name: &str) -> Result<MeshTls> {
        let ca = self
            .root
            .issue_cluster_ca(cluster, validity()?)
            .with_context(|| format!("cluster CA of {cluster}"))?;
        let creds = ca
            .issue_gateway(&GatewayName::new(name)?, validity()?)
            .with_context(|| format!("gateway {name} of {cluster}"))?
            .credentials()?;
        Ok(MeshTls::new(creds, &self.trust())?)
    }
}

fn validity() -> Result<Validity> {
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    Ok(Validity::new(now - hour, now + 24 * hour)?)
}

/// Cluster names are `c<index>`.
fn cluster_name(i: usize) -> Result<ClusterName> {
    Ok(ClusterName::new(&format!("c{i:05}"))?)
}

fn cluster_index(name: &ClusterName) -> Option<usize> {
    name.as_str().strip_prefix('c')?.parse().ok()
}

fn pod_base(i: usize) -> u32 {
    u32::from(Ipv4Addr::new(10, 0, 0, 0)) + ((i as u32) << 10)
}

fn service_base(i: usize) -> u32 {
    u32::from(Ipv4Addr::new(100, 64, 0, 0)) + ((i as u32) << 8)
}

/// One cluster: its store and what the bench has published into it.
struct BenchCluster {
    index: usize,
    name: ClusterName,
    publisher: Publisher,
    addr: SocketAddr,
    /// Service ids present now (`svc-<id>`).
    services: Vec<u32>,
    next_service: u32,
    /// Bumped by every change, so that every write changes something.
    version: u32,
    td: TrustDomain,
}

/// A published change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeKind {
    Endpoints,
    AddService,
    RemoveService,
    GatewayEndpoint,
}

impl ChangeKind {
    const ALL: [ChangeKind; 4] = [
        ChangeKind::Endpoints,
        ChangeKind::AddService,
        ChangeKind::RemoveService,
        ChangeKind::GatewayEndpoint,
    ];

    fn name(self) -> &'static str {
        match self {
            ChangeKind::Endpoints => "endpoints",
            ChangeKind::AddService => "add-service",
            ChangeKind::RemoveService => "remove-service",
            ChangeKind::GatewayEndpoint => "gateway-endpoint",
        }
    }
}

struct PublishedChange {
    cluster: usize,
    kind: ChangeKind,
    /// The store's revision after the change's last write.
    revision: u64,
    published_at: Instant,
}

impl BenchCluster {
    fn cluster_obj(&self) -> Object {
        let i = self.index;
        Object {
            key: Some(key(
                self.name.as_str(),
                Kind::Cluster,
                "",
                self.name.as_str(),
            )),
            uid: format!("{}-cluster", self.name),
            revision: 0,
            body: Some(Body::Cluster(pb::ClusterSpec {
                id: i as u32 + 1,
                pod_prefixes: vec![format!("{}/22", Ipv4Addr::from(pod_base(i)))],
                service_prefixes: vec![format!("{}/24", Ipv4Addr::from(service_base(i)))],
            })),
        }
    }

    fn gateway_obj(&self) -> Object {
        let i = self.index;
        let td = &self.td;
        Object {
            key: Some(key(self.name.as_str(), Kind::Gateway, "", "gw1")),
            uid: format!("{}-gw1", self.name),
            revision: 0,
            body: Some(Body::Gateway(pb::Gateway {
                spiffe_id: format!("spiffe://{td}/cluster/{}/gateway/gw1", self.name),
                channel_endpoint: format!(
                    "198.18.{}.{}:{}",
                    (i >> 8) & 0xff,
                    i & 0xff,
                    1024 + self.version % 60_000
                ),
                wireguard_endpoint: format!("198.18.{}.{}:51820", (i >> 8) & 0xff, i & 0xff),
                kinds: vec![pb::TunnelKind::Wireguard as i32, pb::TunnelKind::Esp as i32],
                esp_cipher: "aes256-gcm".into(),
                ..Default::default()
            })),
        }
    }

    fn service_obj(&self, id: u32) -> Object {
        Object {
            key: Some(key(
                self.name.as_str(),
                Kind::Service,
                NAMESPACE,
                &format!("svc-{id}"),
            )),
            uid: format!("{}-svc-{id}", self.name),
            revision: 0,
            body: Some(Body::Service(pb::Service {
                ports: vec![pb::ServicePort {
                    name: "http".into(),
                    port: 80,
                    protocol: "TCP".into(),
                }],
                global: true,
                shared: true,
                affinity: pb::Affinity::None as i32,
                cluster_ips: vec![
                    Ipv4Addr::from(service_base(self.index) + 1 + id % 254).to_string()
                ],
            })),
        }
    }

    fn slice_obj(&self, id: u32, endpoints: usize) -> Object {
        let base = pod_base(self.index);
        let endpoints = (0..endpoints as u32)
            .map(|e| {
                let offset = (id * 7 + e * 13 + self.version * 31) % 1022 + 1;
                pb::Endpoint {
                    addresses: vec![Ipv4Addr::from(base + offset).to_string()],
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: format!("node-{}", e % 8),
                    zone: "zone-a".into(),
                }
            })
            .collect();
        Object {
            key: Some(key(
                self.name.as_str(),
                Kind::EndpointSlice,
                NAMESPACE,
                &format!("svc-{id}-eps"),
            )),
            uid: format!("{}-eps-{id}", self.name),
            revision: 0,
            body: Some(Body::EndpointSlice(pb::EndpointSlice {
                service: format!("svc-{id}"),
                address_type: "IPv4".into(),
                endpoints,
                ports: vec![pb::ServicePort {
                    name: "http".into(),
                    port: 8080,
                    protocol: "TCP".into(),
                }],
            })),
        }
    }

    /// Publishes one change and says at which revision it ended.
    fn publish(
        &mut self,
        kind: ChangeKind,
        rng: &mut SplitMix64,
        opts: &ApiBenchOptions,
    ) -> PublishedChange {
        let kind = if kind == ChangeKind::RemoveService && self.services.is_empty() {
            ChangeKind::AddService
        } else {
            kind
        };
        self.version += 1;
        let published_at = Instant::now();
        // The bench writes objects it built itself: a refusal is a bench bug, and the
        // wait for the change would report it.
        match kind {
            ChangeKind::Endpoints => {
                let id = self.services[rng.below(self.services.len())];
                let _ = self.publisher.upsert(self.slice_obj(id, opts.endpoints));
            }
            ChangeKind::AddService => {
                let id = self.next_service;
                self.next_service += 1;
                self.services.push(id);
                let _ = self.publisher.upsert(self.service_obj(id));
                let _ = self.publisher.upsert(self.slice_obj(id, opts.endpoints));
            }
            ChangeKind::RemoveService => {
                let id = self.services.swap_remove(rng.below(self.services.len()));
                let name = format!("svc-{id}");
                let cluster = self.name.as_str();
                self.publisher.delete(
                    &key(
                        cluster,
                        Kind::EndpointSlice,
                        NAMESPACE,
                        &format!("{name}-eps"),
                    ),
                    None,
                    0,
                );
                self.publisher
                    .delete(&key(cluster, Kind::Service, NAMESPACE, &name), None, 0);
            }
            ChangeKind::GatewayEndpoint => {
                let _ = self.publisher.upsert(self.gateway_obj());
            }
        }
        PublishedChange {
            cluster: self.index,
            kind,
            revision: self.publisher.lock().revision(),
            published_at,
        }
    }
}

async fn start_cluster(
    pki: &BenchPki,
    index: usize,
    opts: &ApiBenchOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<(BenchCluster, tokio::task::JoinHandle<()>)> {
    let name = cluster_name(index)?;
    let publisher = Publisher::new(Store::new(name.clone(), index as u64 + 1, DEFAULT_HISTORY));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("bind an API server")?;
    let addr = listener.local_addr()?;
    let cluster = BenchCluster {
        index,
        name: name.clone(),
        publisher: publisher.clone(),
        addr,
        services: (0..opts.services as u32).collect(),
        next_service: opts.services as u32,
        version: 0,
        td: pki.td.clone(),
    };
    let mut objects = vec![cluster.cluster_obj(), cluster.gateway_obj()];
    for id in 0..opts.services as u32 {
        objects.push(cluster.service_obj(id));
        objects.push(cluster.slice_obj(id, opts.endpoints));
    }
    let refused = publisher.replace_all(objects, 0);
    if let Some(e) = refused.first() {
        bail!("cluster {name}: the store refused {e}");
    }
    publisher.mark_synced(0);
    let tls = pki.tls(&name, "clustermesh-api")?;
    let server_tls = tls.server_config(
        PeerPolicy::AnyGateway(pki.td.clone()),
        isthmus_clustermesh_api::ALPN,
    )?;
    let options = ServerOptions {
        handshake_timeout: Duration::from_secs(60),
        ..ServerOptions::default()
    };
    let service = ClusterMeshService::new(publisher, options);
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = server::serve(listener, server_tls, service, shutdown).await {
            eprintln!("mesh-bench: API server {index} failed: {e}");
        }
    });
    Ok((cluster, task))
}

/// A gateway that watches every cluster: one watch per cluster, one reducer.
struct SimulatedGateway {
    index: usize,
    state: Arc<Mutex<GatewayState>>,
    _watches: Vec<WatchHandle>,
    feeder: tokio::task::JoinHandle<()>,
}

impl Drop for SimulatedGateway {
    fn drop(&mut self) {
        self.feeder.abort();
    }
}

/// The reducer of one gateway and what its feeding task saw.
struct GatewayState {
    view: MeshView,
    clusters: usize,
    /// Per cluster: a SnapshotEnd was applied at least once.
    synced: Vec<bool>,
    synced_count: usize,
    synced_at: Option<Instant>,
    /// Per cluster: between SnapshotBegin and SnapshotEnd.
    in_snapshot: Vec<bool>,
    /// Per cluster: the newest revision applied as a delta.
    max_revision: Vec<u64>,
    /// (cluster, revision) of every delta applied after the cluster's first snapshot.
    applied: HashMap<(usize, u64), Instant>,
    connects: u64,
    disconnects: u64,
    resyncs: u64,
    last_disconnect: Option<String>,
    derive_routes: bool,
    /// The route table as last derived (what the gateway would program).
    routes: Vec<ClusterRoute>,
    route_recomputes: u64,
    route_time: Duration,
}

impl GatewayState {
    /// Recomputes the route table when `applied` says it changed.
    fn derive(&mut self, applied: Applied) {
        if self.derive_routes && applied.routes_changed {
            let started = Instant::now();
            self.routes = self.view.routes();
            self.route_time += started.elapsed();
            self.route_recomputes += 1;
        }
    }

    fn handle(&mut self, event: ClientEvent) {
        match event {
            ClientEvent::Connected { cluster, server } => {
                self.connects += 1;
                let applied = self.view.connected(&cluster, server, Instant::now());
                self.derive(applied);
            }
            ClientEvent::Disconnected { cluster, reason } => {
                self.disconnects += 1;
                let applied = self.view.disconnected(&cluster, &reason, Instant::now());
                self.derive(applied);
                self.last_disconnect = Some(format!("{cluster}: {reason}"));
            }
            ClientEvent::Event { cluster, event } => {
                let Some(i) = cluster_index(&cluster).filter(|i| *i < self.clusters) else {
                    return;
                };
                let delta = match &event.event {
                    Some(Event::Upsert(o)) => Some(o.revision),
                    Some(Event::Delete(d)) => Some(d.revision),
                    Some(Event::SnapshotBegin(_)) => {
                        self.in_snapshot[i] = true;
                        None
                    }
                    Some(Event::Resync(_)) => {
                        self.resyncs += 1;
                        None
                    }
                    _ => None,
                };
                let end = matches!(event.event, Some(Event::SnapshotEnd(_)));
                let applied = self.view.apply(&cluster, event, Instant::now());
                self.derive(applied);
                let now = Instant::now();
                if end {
                    self.in_snapshot[i] = false;
                    if !self.synced[i] {
                        self.synced[i] = true;
                        self.synced_count += 1;
                        if self.synced_count == self.clusters {
                            self.synced_at = Some(now);
                        }
                    }
                }
                if let Some(revision) = delta {
                    if self.synced[i] && !self.in_snapshot[i] {
                        self.applied.insert((i, revision), now);
                        self.max_revision[i] = self.max_revision[i].max(revision);
                    }
                }
            }
        }
    }
}

impl SimulatedGateway {
    fn start(
        pki: &BenchPki,
        index: usize,
        clusters: &[BenchCluster],
        options: &ClientOptions,
        derive_routes: bool,
    ) -> Result<Self> {
        let home = ClusterName::new(&format!("home{index:04}"))?;
        let local_prefix: IpPrefix = format!(
            "{}/24",
            Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + ((index as u32) << 8))
        )
        .parse()
        .context("local prefix")?;
        let mut view = MeshView::new(home.clone(), vec![local_prefix], ReducerConfig::default());
        let now = Instant::now();
        for c in clusters {
            view.add_cluster(c.name.clone(), now);
        }
        let n = clusters.len();
        let state = Arc::new(Mutex::new(GatewayState {
            view,
            clusters: n,
            synced: vec![false; n],
            synced_count: 0,
            synced_at: None,
            in_snapshot: vec![false; n],
            max_revision: vec![0; n],
            applied: HashMap::new(),
            connects: 0,
            disconnects: 0,
            resyncs: 0,
            last_disconnect: None,
            derive_routes,
            routes: Vec::new(),
            route_recomputes: 0,
            route_time: Duration::ZERO,
        }));
        let (tx, mut rx) = mpsc::channel::<ClientEvent>(4096);
        let feeder = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut batch = Vec::with_capacity(256);
                while rx.recv_many(&mut batch, 256).await > 0 {
                    let mut s = lock(&state);
                    for event in batch.drain(..) {
                        s.handle(event);
                    }
                }
            })
        };
        let tls = pki.tls(&home, "gw")?;
        let mut watches = Vec::with_capacity(n);
        for c in clusters {
            let client_tls = tls.client_config(
                PeerPolicy::GatewayOfCluster(pki.td.clone(), c.name.clone()),
                isthmus_clustermesh_api::ALPN,
            )?;
            watches.push(client::spawn_watch(
                WatchTarget {
                    cluster: c.name.clone(),
                    endpoint: c.addr,
                },
                client_tls,
                options.clone(),
                tx.clone(),
            ));
        }
        Ok(Self {
            index,
            state,
            _watches: watches,
            feeder,
        })
    }

    fn state(&self) -> MutexGuard<'_, GatewayState> {
        lock(&self.state)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A small deterministic generator (SplitMix64), so that a seed replays a run's choices.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` for picking (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `VmRSS` and `Threads` of this process.
#[derive(Debug, Clone, Copy)]
struct ProcStatus {
    rss_kib: u64,
    threads: u64,
}

impl ProcStatus {
    fn read() -> Result<Self> {
        let text =
            std::fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
        let field = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} in /proc/self/status"))
        };
        Ok(Self {
            rss_kib: field("VmRSS:")?,
            threads: field("Threads:")?,
        })
    }
}

/// Hands the allocator's free pages back to the kernel, so that RSS shows live memory;
/// false where that is not available (not glibc).
fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointer and only walks glibc's own free lists.
        unsafe { libc::malloc_trim(0) };
        true
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Raises `RLIMIT_NOFILE` to at least `needed` (the hard limit too, which needs
/// `CAP_SYS_RESOURCE`); returns the soft limit in force.
fn raise_fd_limit(needed: u64) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we own and pass by a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= needed {
        return Ok(lim.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: needed,
        rlim_max: lim.rlim_max.max(needed),
    };
    // SAFETY: setrlimit only reads the struct we pass by a valid pointer; a refusal is an
    // error return, not undefined behaviour.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        bail!(
            "this run needs {needed} file descriptors (soft limit {}, hard limit {}): {} — \
             raising the hard limit needs CAP_SYS_RESOURCE; otherwise use fewer clusters × gateways",
            lim.rlim_cur,
            lim.rlim_max,
            std::io::Error::last_os_error()
        );
    }
    Ok(needed)
}

impl fmt::Display for ApiBenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.changes;
        let r = &self.resources;
        let s = &self.streams;
        writeln!(f, "clustermesh API scale benchmark")?;
        writeln!(f, "  transport             {}", self.transport)?;
        writeln!(
            f,
            "  mesh                  {} clusters × {} services ({} endpoints each), {} gateways → {} watch streams, {} objects per gateway",
            self.clusters,
            self.services_per_cluster,
            self.endpoints_per_service,
            self.gateways,
            self.watch_streams,
            self.objects_per_gateway
        )?;
        writeln!(
            f,
            "  runtime               tokio, {} worker threads",
            self.worker_threads
        )?;
        writeln!(
            f,
            "  setup                 {:.2} s (PKI, stores, servers)",
            self.setup_secs
        )?;
        writeln!(
            f,
            "  full sync             {:.2} s all gateways (first gateway {:.2} s): {} clusters routed, {} service backends, {} endpoints per gateway",
            self.sync.all_gateways_secs,
            self.sync.first_gateway_secs,
            self.sync.routed_clusters,
            self.sync.service_backends,
            self.sync.endpoints
        )?;
        let kinds: Vec<String> = c.by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
        writeln!(
            f,
            "  changes               {} every {:.0} ms ({})",
            c.published,
            c.interval_ms,
            kinds.join(", ")
        )?;
        let p = |p: &Percentiles| {
            format!(
                "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n = {})",
                p.p50, p.p99, p.max, p.count
            )
        };
        writeln!(
            f,
            "  change → all gateways {}",
            p(&c.latency_all_gateways_ms)
        )?;
        writeln!(
            f,
            "  change → one gateway  {}",
            p(&c.latency_each_gateway_ms)
        )?;
        writeln!(
            f,
            "  unmatched / tables    {} unmatched (change, gateway) pairs; tables match the stores after the changes: {}",
            c.unmatched,
            if c.tables_match_after { "yes" } else { "NO" }
        )?;
        if let Some(why) = &c.tables_mismatch {
            writeln!(f, "  mismatch              {why}")?;
        }
        writeln!(
            f,
            "  RSS                   start {:.1} MiB, servers up {:.1} MiB, synced {:.1} MiB, end {:.1} MiB",
            r.rss_start_mib, r.rss_servers_mib, r.rss_synced_mib, r.rss_end_mib
        )?;
        writeln!(
            f,
            "  memory per gateway    {:.1} KiB per remote cluster, {:.1} MiB for {} clusters (both stream ends included)",
            r.per_remote_cluster_per_gateway_kib, r.per_gateway_mib, self.clusters
        )?;
        if let (Some(rss), Some(kib), Some(per_gw)) = (
            r.rss_synced_live_mib,
            r.per_remote_cluster_per_gateway_live_kib,
            r.per_gateway_live_mib,
        ) {
            writeln!(
                f,
                "  live after malloc_trim synced {rss:.1} MiB: {kib:.1} KiB per remote cluster, {per_gw:.1} MiB per gateway"
            )?;
        }
        writeln!(
            f,
            "  threads               start {}, synced {}, end {}; open fds {} (limit {})",
            r.threads_start, r.threads_synced, r.threads_end, r.open_fds_synced, r.fd_limit
        )?;
        let d = &self.route_derivation;
        if d.enabled {
            writeln!(
                f,
                "  route table           recomputed {} times on routes_changed, {:.2} s in total over all gateways",
                d.recomputes, d.total_secs
            )?;
        }
        write!(
            f,
            "  streams               {} connects, {} disconnects, {} resyncs, {} refusals",
            s.connects, s.disconnects, s.resyncs, s.refusals
        )?;
        if let Some(reason) = &s.last_disconnect {
            write!(f, "; last disconnect: {reason}")?;
        }
        writeln!(f)
    }
}
