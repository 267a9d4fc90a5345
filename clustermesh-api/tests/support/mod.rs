//! Shared fixtures: a mesh PKI, an in-process API server on loopback, and event helpers.
#![allow(dead_code)]

use isthmus_certs::{ClusterCa, MeshRootCa, Validity};
use isthmus_clustermesh_api::client::{self, ClientEvent, ClientOptions, WatchHandle, WatchTarget};
use isthmus_clustermesh_api::model::key;
use isthmus_clustermesh_api::pb::{self, object::Body, watch_event::Event, Kind, Object};
use isthmus_clustermesh_api::server::{self, ClusterMeshService, ServerOptions};
use isthmus_clustermesh_api::source::Publisher;
use isthmus_clustermesh_api::store::Store;
use isthmus_identity::{
    ClusterName, GatewayName, LocalCredentials, MeshTls, MeshTrust, PeerPolicy, TrustDomain,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};

pub const DAY: Duration = Duration::from_secs(86_400);

pub struct Pki {
    pub td: TrustDomain,
    pub root: MeshRootCa,
    clusters: std::sync::Mutex<Vec<(String, Arc<ClusterCa>)>>,
}

impl Pki {
    pub fn new(td: &str) -> Self {
        let td = TrustDomain::new(td).expect("td");
        let now = SystemTime::now();
        let root = MeshRootCa::create(&td, Validity::new(now - DAY, now + 30 * DAY).expect("v"))
            .expect("root");
        Self {
            td,
            root,
            clusters: Default::default(),
        }
    }

    fn cluster_ca(&self, cluster: &str) -> Arc<ClusterCa> {
        let mut all = self.clusters.lock().expect("lock");
        if let Some((_, ca)) = all.iter().find(|(n, _)| n == cluster) {
            return ca.clone();
        }
        let now = SystemTime::now();
        let ca = Arc::new(
            self.root
                .issue_cluster_ca(
                    &ClusterName::new(cluster).expect("name"),
                    Validity::new(now - DAY, now + 20 * DAY).expect("v"),
                )
                .expect("cluster ca"),
        );
        all.push((cluster.to_string(), ca.clone()));
        ca
    }

    /// Credentials of `spiffe://<td>/cluster/<cluster>/gateway/<name>`.
    pub fn gateway(&self, cluster: &str, name: &str) -> LocalCredentials {
        let now = SystemTime::now();
        self.cluster_ca(cluster)
            .issue_gateway(
                &GatewayName::new(name).expect("name"),
                Validity::new(now - DAY, now + 10 * DAY).expect("v"),
            )
            .expect("leaf")
            .credentials()
            .expect("creds")
    }

    pub fn trust(&self) -> MeshTrust {
        MeshTrust {
            roots: vec![self.root.certificate().clone()],
            crls: vec![],
        }
    }
}

pub fn cn(s: &str) -> ClusterName {
    ClusterName::new(s).expect("cluster name")
}

pub fn cluster_obj(c: &str, id: u32, prefix: &str) -> Object {
    Object {
        key: Some(key(c, Kind::Cluster, "", c)),
        uid: format!("{c}-cluster"),
        revision: 0,
        body: Some(Body::Cluster(pb::ClusterSpec {
            id,
            pod_prefixes: vec![prefix.into()],
            service_prefixes: vec![],
        })),
    }
}

pub fn gateway_obj(td: &str, c: &str, gw: &str, ep: &str) -> Object {
    Object {
        key: Some(key(c, Kind::Gateway, "", gw)),
        uid: format!("{gw}-uid"),
        revision: 0,
        body: Some(Body::Gateway(pb::Gateway {
            spiffe_id: format!("spiffe://{td}/cluster/{c}/gateway/{gw}"),
            channel_endpoint: ep.into(),
            kinds: vec![pb::TunnelKind::Wireguard as i32],
            ..Default::default()
        })),
    }
}

pub fn service_obj(c: &str, name: &str, uid: &str) -> Object {
    Object {
        key: Some(key(c, Kind::Service, "default", name)),
        uid: uid.into(),
        revision: 0,
        body: Some(Body::Service(pb::Service {
            global: true,
            shared: true,
            ..Default::default()
        })),
    }
}

/// An API server running in this process until dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub publisher: Publisher,
    stop: Option<oneshot::Sender<()>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl TestServer {
    /// Serves `publisher` for cluster `cluster` as `<cluster>/gateway/clustermesh-api`.
    pub async fn start(pki: &Pki, publisher: Publisher, addr: Option<SocketAddr>) -> Self {
        let cluster = publisher.lock().cluster().to_string();
        let tls =
            MeshTls::new(pki.gateway(&cluster, "clustermesh-api"), &pki.trust()).expect("tls");
        let server_tls = tls
            .server_config(
                PeerPolicy::AnyGateway(pki.td.clone()),
                isthmus_clustermesh_api::ALPN,
            )
            .expect("server config");
        let mut listener = None;
        for _ in 0..50 {
            match tokio::net::TcpListener::bind(addr.unwrap_or(([127, 0, 0, 1], 0).into())).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                // A restart on the same port may race the old socket's close.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let listener = listener.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let options = ServerOptions {
            bookmark_interval: Duration::from_millis(200),
            ..ServerOptions::default()
        };
        let service = ClusterMeshService::new(publisher.clone(), options);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = server::serve(listener, server_tls, service, async {
                let _ = stopped.await;
            })
            .await;
        });
        Self {
            addr,
            publisher,
            stop: Some(stop),
            _task: task,
        }
    }
}

pub fn publisher(cluster: &str, epoch: u64) -> Publisher {
    Publisher::new(Store::new(cn(cluster), epoch, 1000))
}

/// A watch of `cluster` at `addr` from a gateway of cluster `me`.
pub fn watch(
    pki: &Pki,
    me: &str,
    cluster: &str,
    addr: SocketAddr,
) -> (WatchHandle, mpsc::Receiver<ClientEvent>) {
    let tls = MeshTls::new(pki.gateway(me, "gw"), &pki.trust()).expect("tls");
    let client_tls = tls
        .client_config(
            PeerPolicy::GatewayOfCluster(pki.td.clone(), cn(cluster)),
            isthmus_clustermesh_api::ALPN,
        )
        .expect("client config");
    let (tx, rx) = mpsc::channel(1024);
    let options = ClientOptions {
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(2),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
    };
    let handle = client::spawn_watch(
        WatchTarget {
            cluster: cn(cluster),
            endpoint: addr,
        },
        client_tls,
        options,
        tx,
    );
    (handle, rx)
}

/// The next event that is not a bookmark, within `secs`.
pub async fn next(rx: &mut mpsc::Receiver<ClientEvent>, secs: u64) -> ClientEvent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let ev = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("an event in time")
            .expect("watch running");
        if let ClientEvent::Event { event, .. } = &ev {
            if matches!(event.event, Some(Event::Bookmark(_))) {
                continue;
            }
        }
        return ev;
    }
}

/// Short description of an event for assertions: "connected", "begin", "upsert <name>",
/// "delete <name>", "end <rev>", "resync <reason>", "disconnected".
pub fn describe(ev: &ClientEvent) -> String {
    match ev {
        ClientEvent::Connected { .. } => "connected".into(),
        ClientEvent::Disconnected { .. } => "disconnected".into(),
        ClientEvent::Event { event, .. } => match &event.event {
            Some(Event::SnapshotBegin(_)) => "begin".into(),
            Some(Event::SnapshotEnd(e)) => format!("end {}", e.revision),
            Some(Event::Upsert(o)) => format!("upsert {}", o.key.as_ref().map_or("", |k| &k.name)),
            Some(Event::Delete(d)) => format!("delete {}", d.key.as_ref().map_or("", |k| &k.name)),
            Some(Event::Bookmark(b)) => format!("bookmark {}", b.revision),
            Some(Event::Resync(r)) => format!(
                "resync {}",
                pb::ResyncReason::try_from(r.reason)
                    .map_or("?".into(), |r| r.as_str_name().to_string())
            ),
            None => "empty".into(),
        },
    }
}

/// Collects `n` described events.
pub async fn take(rx: &mut mpsc::Receiver<ClientEvent>, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(describe(&next(rx, 10).await));
    }
    out
}
