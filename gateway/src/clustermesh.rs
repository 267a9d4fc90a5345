//! The gateway side of the clustermesh API: watches every remote cluster's API server
//! (on a small tokio runtime: the control plane; the data path never runs here), folds
//! the streams into a [`MeshView`], and turns its routes into channel peers, tunnel peers
//! and kernel routes. Remote gateways are authenticated by the peer channel exactly as
//! configured peers are; the API only says *where* and *who*, never a key.

use crate::config::{EspSettings, IdentityConfig, IdentityPeer, MeshConfig, TunnelKind};
use crate::mesh::MeshLinks;
use isthmus_clustermesh_api::client::{self, ClientEvent, ClientOptions, WatchHandle, WatchTarget};
use isthmus_clustermesh_api::reducer::{
    Applied, ClusterRoute, ClusterStatus, MeshView, ReducerConfig, ServiceImport,
};
use isthmus_identity::{MeshTls, PeerPolicy, SpiffeId};
use isthmus_tunnel::esp::sa::EspCipher;
use isthmus_tunnel::IpPrefix;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Where kernel routes for remote prefixes go (the gateway routes them into its TUN).
pub trait RouteSink: Send + Sync {
    /// Routes `prefix` into the tunnel device. Must refuse to replace a route it did
    /// not install (other than its own blackhole for that prefix).
    fn add(&self, prefix: &IpPrefix) -> Result<(), String>;
    /// Takes the prefix out of the tunnel: replaces its route with a blackhole, so that
    /// traffic for a withdrawn cluster is dropped, never sent in clear by another route.
    fn remove(&self, prefix: &IpPrefix) -> Result<(), String>;
}

/// Picks the tunnel kind two gateways use: the first kind in the list of the gateway
/// whose SPIFFE ID sorts first that the other one also offers. Both ends evaluate the
/// same rule on the same two lists, so they agree without a negotiation.
pub fn choose_kind(
    local_id: &SpiffeId,
    local: &[TunnelKind],
    remote_id: &SpiffeId,
    remote: &[TunnelKind],
) -> Option<TunnelKind> {
    let (first, second) = if local_id.to_string() < remote_id.to_string() {
        (local, remote)
    } else {
        (remote, local)
    };
    first.iter().copied().find(|k| second.contains(k))
}

fn parse_kind(name: &str) -> Option<TunnelKind> {
    match name {
        "wireguard" => Some(TunnelKind::Wireguard),
        "esp" => Some(TunnelKind::Esp),
        _ => None,
    }
}

/// Turns the routed remote clusters into peers: per cluster its first gateway (by name)
/// with a tunnel kind in common, carrying the cluster's prefixes. ESP uses the stronger
/// of the two announced ciphers and ESN only if both want it (symmetric, like the kind).
pub fn plan_peers(
    routes: &[ClusterRoute],
    mesh: &MeshConfig,
    local_id: &SpiffeId,
) -> Vec<IdentityPeer> {
    let mut peers = Vec::new();
    for cluster in routes {
        if cluster.prefixes.is_empty() {
            continue;
        }
        let mut chosen = None;
        for gw in &cluster.gateways {
            let kinds: Vec<TunnelKind> = gw.kinds.iter().filter_map(|k| parse_kind(k)).collect();
            if let Some(kind) = choose_kind(local_id, &mesh.kinds, &gw.spiffe_id, &kinds) {
                chosen = Some((gw, kind));
                break;
            }
        }
        let Some((gw, kind)) = chosen else {
            tracing::warn!(cluster = %cluster.name, "no gateway of this cluster shares a tunnel kind with us");
            continue;
        };
        let esp = (kind == TunnelKind::Esp).then(|| {
            let remote_cipher = match gw.esp_cipher.as_deref() {
                Some("aes128-gcm") => EspCipher::Aes128Gcm,
                _ => EspCipher::Aes256Gcm,
            };
            let cipher = if mesh.esp.cipher == EspCipher::Aes256Gcm
                || remote_cipher == EspCipher::Aes256Gcm
            {
                EspCipher::Aes256Gcm
            } else {
                EspCipher::Aes128Gcm
            };
            EspSettings {
                cipher,
                esn: mesh.esp.esn && gw.esn,
                lifetimes: mesh.esp.lifetimes,
            }
        });
        peers.push(IdentityPeer {
            name: Some(format!("{}/{}", cluster.name, gw.name)),
            kind,
            spiffe_id: gw.spiffe_id.clone(),
            channel_endpoint: gw.channel_endpoint,
            allowed_prefixes: cluster.prefixes.clone(),
            persistent_keepalive: mesh.persistent_keepalive,
            esp,
        });
    }
    peers
}

struct Shared {
    view: Mutex<MeshView>,
    routed: Mutex<BTreeSet<IpPrefix>>,
}

/// The running watch of the remote clusters; stops when dropped.
pub struct MeshWatch {
    shared: Arc<Shared>,
    _watches: Vec<WatchHandle>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for MeshWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshWatch").finish_non_exhaustive()
    }
}

impl Drop for MeshWatch {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl MeshWatch {
    /// Starts watching every cluster of `mesh`.
    pub fn start(
        mesh: MeshConfig,
        identity: &IdentityConfig,
        links: Arc<MeshLinks>,
        routes: Arc<dyn RouteSink>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mesh-ctl")
            .enable_all()
            .build()
            .context("starting the control-plane runtime")?;
        let tls = MeshTls::new(identity.credentials.clone(), &identity.trust)
            .context("clustermesh client TLS")?;
        let local_id = tls.local_id().clone();
        let td = local_id.trust_domain().clone();
        let now = Instant::now();
        let mut view = MeshView::new(
            mesh.cluster.clone(),
            mesh.local_prefixes.clone(),
            ReducerConfig {
                withdraw_after: mesh.withdraw_after,
                remote_space: mesh.remote_space.clone(),
                ..ReducerConfig::default()
            },
        );
        for c in &mesh.clusters {
            view.add_cluster(c.name.clone(), now);
        }
        let shared = Arc::new(Shared {
            view: Mutex::new(view),
            routed: Mutex::new(BTreeSet::new()),
        });
        let (tx, rx) = mpsc::channel(4096);
        let mut watches = Vec::new();
        {
            let _guard = runtime.enter();
            for c in &mesh.clusters {
                let client_tls = tls
                    .client_config(
                        PeerPolicy::GatewayOfCluster(td.clone(), c.name.clone()),
                        isthmus_clustermesh_api::ALPN,
                    )
                    .context("clustermesh client TLS")?;
                watches.push(client::spawn_watch(
                    WatchTarget {
                        cluster: c.name.clone(),
                        endpoint: c.api,
                    },
                    client_tls,
                    ClientOptions::default(),
                    tx.clone(),
                ));
                tracing::info!(cluster = %c.name, api = %c.api, "watching remote cluster");
            }
        }
        runtime.spawn(consume(rx, shared.clone(), mesh, local_id, links, routes));
        Ok(Self {
            shared,
            _watches: watches,
            runtime: Some(runtime),
        })
    }

    /// Every remote cluster, for `isthmusctl mesh clusters`.
    pub fn clusters(&self) -> Vec<ClusterStatus> {
        self.shared
            .view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clusters(Instant::now())
    }

    /// The services exported to this cluster, for `isthmusctl mesh services`.
    pub fn services(&self) -> Vec<ServiceImport> {
        self.shared
            .view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .services()
    }
}

fn apply_event(shared: &Shared, ev: ClientEvent) -> Applied {
    let now = Instant::now();
    let mut view = shared.view.lock().unwrap_or_else(|e| e.into_inner());
    match ev {
        ClientEvent::Connected { cluster, server } => {
            tracing::info!(%cluster, %server, "clustermesh stream open");
            view.connected(&cluster, server, now)
        }
        ClientEvent::Event { cluster, event } => view.apply(&cluster, event, now),
        ClientEvent::Disconnected { cluster, reason } => {
            tracing::warn!(%cluster, %reason, "clustermesh stream lost; its state keeps serving until the TTL");
            view.disconnected(&cluster, &reason, now)
        }
    }
}

/// Most events applied before the peers and routes are reprogrammed: a burst (a
/// snapshot of every cluster at start) is folded into one reprogramming instead of
/// one per event.
const MAX_BATCH: usize = 4096;

async fn consume(
    mut rx: mpsc::Receiver<ClientEvent>,
    shared: Arc<Shared>,
    mesh: MeshConfig,
    local_id: SpiffeId,
    links: Arc<MeshLinks>,
    routes: Arc<dyn RouteSink>,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    loop {
        let mut changed = tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { return };
                apply_event(&shared, ev).routes_changed
            }
            _ = ticker.tick() => {
                shared.view.lock().unwrap_or_else(|e| e.into_inner()).tick(Instant::now()).routes_changed
            }
        };
        // Whatever else is already queued goes into the same reprogramming.
        for _ in 0..MAX_BATCH {
            match rx.try_recv() {
                Ok(ev) => changed |= apply_event(&shared, ev).routes_changed,
                Err(_) => break,
            }
        }
        if changed {
            reprogram(&shared, &mesh, &local_id, &links, &routes).await;
        }
    }
}

async fn reprogram(
    shared: &Arc<Shared>,
    mesh: &MeshConfig,
    local_id: &SpiffeId,
    links: &Arc<MeshLinks>,
    routes: &Arc<dyn RouteSink>,
) {
    let cluster_routes = shared
        .view
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .routes();
    let peers = plan_peers(&cluster_routes, mesh, local_id);
    let wanted: BTreeSet<IpPrefix> = peers
        .iter()
        .flat_map(|p| p.allowed_prefixes.iter().copied())
        .collect();
    let links = links.clone();
    let routes = routes.clone();
    let shared = shared.clone();
    // Stopping a dialer joins its thread and routes are programmed over netlink:
    // both block, so they run off the async workers (one reprogramming at a time: the
    // consume loop awaits this).
    let _ = tokio::task::spawn_blocking(move || {
        links.set_mesh_peers(peers);
        let mut routed = shared.routed.lock().unwrap_or_else(|e| e.into_inner());
        for p in wanted.difference(&routed.clone()) {
            match routes.add(p) {
                Ok(()) => {
                    routed.insert(*p);
                }
                Err(e) => tracing::warn!(prefix = %p, error = %e, "cannot add the route"),
            }
        }
        for p in routed.clone().difference(&wanted) {
            if let Err(e) = routes.remove(p) {
                tracing::warn!(prefix = %p, error = %e, "cannot remove the route");
            }
            routed.remove(p);
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_clustermesh_api::reducer::{GatewayEntry, Liveness};

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("id")
    }

    #[test]
    fn both_ends_choose_the_same_kind() {
        use TunnelKind::*;
        let a = id("spiffe://m/cluster/a/gateway/gw");
        let b = id("spiffe://m/cluster/b/gateway/gw");
        let (la, lb) = (vec![Wireguard, Esp], vec![Esp, Wireguard]);
        assert_eq!(choose_kind(&a, &la, &b, &lb), Some(Wireguard));
        assert_eq!(choose_kind(&b, &lb, &a, &la), Some(Wireguard));
        assert_eq!(choose_kind(&a, &[Esp], &b, &[Wireguard]), None);
    }

    #[test]
    fn plan_takes_the_first_compatible_gateway_and_the_cluster_prefixes() {
        let mesh = MeshConfig {
            cluster: isthmus_identity::ClusterName::new("a").expect("n"),
            clusters: vec![],
            local_prefixes: vec![],
            withdraw_after: Duration::from_secs(30),
            remote_space: vec![],
            kinds: vec![TunnelKind::Esp],
            esp: EspSettings {
                cipher: EspCipher::Aes128Gcm,
                esn: true,
                lifetimes: Default::default(),
            },
            persistent_keepalive: None,
        };
        let gw = |name: &str, kinds: &[&str], cipher: Option<&str>| GatewayEntry {
            name: name.into(),
            spiffe_id: id(&format!("spiffe://m/cluster/c/gateway/{name}")),
            channel_endpoint: "192.0.2.3:7443".parse().expect("ep"),
            kinds: kinds.iter().map(|s| s.to_string()).collect(),
            esp_cipher: cipher.map(str::to_string),
            esn: false,
        };
        let routes = vec![ClusterRoute {
            name: "c".into(),
            id: 3,
            prefixes: vec!["100.64.3.0/24".parse().expect("p")],
            gateways: vec![
                gw("gw1", &["wireguard"], None),
                gw("gw2", &["esp"], Some("aes256-gcm")),
            ],
            liveness: Liveness::Connected,
        }];
        let peers = plan_peers(&routes, &mesh, &id("spiffe://m/cluster/a/gateway/gw"));
        assert_eq!(peers.len(), 1);
        let p = &peers[0];
        assert_eq!(p.name.as_deref(), Some("c/gw2"));
        assert_eq!(p.kind, TunnelKind::Esp);
        let esp = p.esp.expect("esp settings");
        assert_eq!(esp.cipher, EspCipher::Aes256Gcm, "the stronger cipher");
        assert!(!esp.esn, "ESN only when both want it");
        assert_eq!(p.allowed_prefixes, routes[0].prefixes);
    }
}
