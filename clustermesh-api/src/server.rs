//! The API server: the tonic `ClusterMesh` service over mTLS.
//!
//! Every connection is a TLS 1.3 session whose client certificate must chain to the mesh
//! trust bundle and name a gateway of the trust domain ([`PeerPolicy::AnyGateway`]); the
//! handshake has a deadline and a cap on concurrent handshakes, so slow unauthenticated
//! connections cannot starve real watchers. A watch stream is one ordered sequence:
//! `SnapshotBegin, Upsert…, SnapshotEnd{revision}`, then deltas and jittered bookmarks, or
//! the deltas after a resume point, or `Resync` and a snapshot (see [`crate::store`]).

use crate::pb::cluster_mesh_server::{ClusterMesh, ClusterMeshServer};
use crate::pb::{
    watch_event::Event, Bookmark, ResyncReason, SnapshotBegin, SnapshotEnd, WatchEvent,
    WatchRequest,
};
use crate::source::Publisher;
use crate::store::{Change, ResumeAnswer, Store};
use isthmus_identity::channel::{HandshakeSlots, ListenerLimits};
use isthmus_identity::{peer_id, SpiffeId};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

/// Tunables of the server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Mean interval of progress bookmarks (each one jittered by ±25 %).
    pub bookmark_interval: Duration,
    /// Deadline for TCP accept → TLS established.
    pub handshake_timeout: Duration,
    /// Most TLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// Most TLS handshakes in progress from one source address.
    pub max_handshakes_per_source: usize,
    /// Most concurrent watch streams of one client identity.
    pub max_watchers_per_identity: usize,
    /// A stream whose client has not taken an event for this long is dropped.
    pub send_timeout: Duration,
    /// Most concurrent watch streams.
    pub max_watchers: usize,
    /// Events buffered per stream before the server waits for the client.
    pub stream_buffer: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            max_handshakes: 64,
            max_handshakes_per_source: 8,
            max_watchers_per_identity: 8,
            send_timeout: Duration::from_secs(30),
            max_watchers: 4096,
            stream_buffer: 1024,
        }
    }
}

/// Who is on the other end of a connection (from its verified certificate).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's verified SPIFFE ID.
    pub id: Option<SpiffeId>,
    /// Its address.
    pub remote: SocketAddr,
}

/// An authenticated connection handed to tonic.
#[derive(Debug)]
pub struct MtlsConn {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for MtlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for MtlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for MtlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections refused during the handshake (bad certificate, timeout, over the cap).
    pub refused: AtomicU64,
    /// Watch streams open now.
    pub watchers: AtomicUsize,
    /// Watch streams served so far.
    pub watches: AtomicU64,
    /// Resyncs sent.
    pub resyncs: AtomicU64,
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct ClusterMeshService {
    publisher: Publisher,
    options: ServerOptions,
    stats: Arc<ServerStats>,
    stop: watch::Receiver<bool>,
    per_identity: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl ClusterMeshService {
    /// A service streaming what `publisher` holds.
    pub fn new(publisher: Publisher, options: ServerOptions) -> Self {
        Self {
            publisher,
            options,
            stats: Arc::new(ServerStats::default()),
            stop: watch::channel(false).1,
            per_identity: Arc::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// The tonic service (messages up to 4 MiB).
    pub fn into_server(self) -> ClusterMeshServer<Self> {
        ClusterMeshServer::new(self)
    }
}

fn event(epoch: u64, e: Event) -> WatchEvent {
    WatchEvent {
        epoch,
        event: Some(e),
    }
}

fn change_event(epoch: u64, change: &Change) -> WatchEvent {
    match change {
        Change::Upsert(o) => event(epoch, Event::Upsert(o.clone())),
        Change::Delete(d) => event(epoch, Event::Delete(d.clone())),
    }
}

fn snapshot(store: &Store, out: &mut Vec<WatchEvent>) {
    let epoch = store.epoch();
    out.push(event(epoch, Event::SnapshotBegin(SnapshotBegin {})));
    for o in store.objects() {
        out.push(event(epoch, Event::Upsert(o.clone())));
    }
    out.push(event(
        epoch,
        Event::SnapshotEnd(SnapshotEnd {
            revision: store.revision(),
        }),
    ));
}

/// A delay of `mean` ± 25 %, from the OS RNG.
pub fn jittered(mean: Duration) -> Duration {
    let r = rand_core::RngCore::next_u32(&mut rand_core::OsRng) as f64 / u32::MAX as f64;
    mean.mul_f64(0.75 + 0.5 * r)
}

type Tx = mpsc::Sender<Result<WatchEvent, Status>>;

/// Sends one event; false when the client is gone or has not taken events for
/// `timeout` (a stalled client must not hold its snapshot and slot forever).
async fn send(tx: &Tx, event: WatchEvent, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tx.send(Ok(event))).await,
        Ok(Ok(()))
    )
}

async fn send_all(tx: &Tx, events: Vec<WatchEvent>, timeout: Duration) -> bool {
    for e in events {
        if !send(tx, e, timeout).await {
            return false;
        }
    }
    true
}

/// Runs one watch stream until the client goes away.
async fn stream_watch(
    publisher: Publisher,
    request: WatchRequest,
    tx: Tx,
    options: ServerOptions,
    stats: Arc<ServerStats>,
    mut stop: watch::Receiver<bool>,
) {
    if *stop.borrow() {
        return;
    }
    // The snapshot waits for the source's initial state: an empty "snapshot" sent
    // before that would make every client sweep the cluster away.
    let mut synced = publisher.synced();
    tokio::select! {
        r = synced.wait_for(|s| *s) => if r.is_err() { return },
        _ = tx.closed() => return,
        _ = stop.changed() => return,
    }
    let mut resume = Some((request.epoch, request.revision));
    let mut lagged = false;
    loop {
        let (initial, mut live, epoch, mut last) = {
            let store = publisher.lock();
            let live = publisher.subscribe_locked(&store);
            let mut out = Vec::new();
            if lagged {
                stats.resyncs.fetch_add(1, Ordering::Relaxed);
                out.push(event(
                    store.epoch(),
                    Event::Resync(crate::pb::Resync {
                        reason: ResyncReason::Lagged as i32,
                        detail: "the client fell behind the live stream".into(),
                    }),
                ));
                snapshot(&store, &mut out);
            } else {
                match resume.take() {
                    Some((e, r)) if e != 0 => match store.resume(e, r) {
                        ResumeAnswer::Deltas(d) => {
                            out.extend(d.iter().map(|c| change_event(store.epoch(), c)));
                        }
                        ResumeAnswer::Resync(reason, detail) => {
                            stats.resyncs.fetch_add(1, Ordering::Relaxed);
                            out.push(event(
                                store.epoch(),
                                Event::Resync(crate::pb::Resync {
                                    reason: reason as i32,
                                    detail,
                                }),
                            ));
                            snapshot(&store, &mut out);
                        }
                    },
                    _ => snapshot(&store, &mut out),
                }
            }
            (out, live, store.epoch(), store.revision())
        };
        if !send_all(&tx, initial, options.send_timeout).await {
            return;
        }
        loop {
            let bookmark = tokio::time::sleep(jittered(options.bookmark_interval));
            tokio::select! {
                r = live.recv() => match r {
                    Ok(change) => {
                        // Already covered by the snapshot or deltas just sent.
                        if change.revision() <= last {
                            continue;
                        }
                        last = change.revision();
                        if !send(&tx, change_event(epoch, &change), options.send_timeout).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        lagged = true;
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = bookmark => {
                    let b = event(epoch, Event::Bookmark(Bookmark { revision: last }));
                    if !send(&tx, b, options.send_timeout).await {
                        return;
                    }
                }
                _ = tx.closed() => return,
                _ = stop.changed() => return,
            }
        }
    }
}

struct WatcherGuard {
    stats: Arc<ServerStats>,
    per_identity: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    who: String,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.stats.watchers.fetch_sub(1, Ordering::Relaxed);
        let mut map = self.per_identity.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.who);
            }
        }
    }
}

#[tonic::async_trait]
impl ClusterMesh for ClusterMeshService {
    type WatchStream = ReceiverStream<Result<WatchEvent, Status>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let who = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.id.clone())
            .map_or_else(|| "unauthenticated".to_string(), |id| id.to_string());
        let open = self.stats.watchers.fetch_add(1, Ordering::Relaxed);
        let mine = {
            let mut map = self.per_identity.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(who.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let guard = WatcherGuard {
            stats: self.stats.clone(),
            per_identity: self.per_identity.clone(),
            who: who.clone(),
        };
        if open >= self.options.max_watchers {
            return Err(Status::resource_exhausted("too many watch streams"));
        }
        if mine > self.options.max_watchers_per_identity {
            return Err(Status::resource_exhausted(
                "too many watch streams from this identity",
            ));
        }
        self.stats.watches.fetch_add(1, Ordering::Relaxed);
        let req = request.into_inner();
        tracing::info!(watcher = %who, epoch = req.epoch, revision = req.revision, "watch");
        let (tx, rx) = mpsc::channel(self.options.stream_buffer.max(16));
        let publisher = self.publisher.clone();
        let options = self.options.clone();
        let stats = self.stats.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let _guard = guard;
            stream_watch(publisher, req, tx, options, stats, stop).await;
            tracing::debug!(watcher = %who, "watch stream ended");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct SlotGuard {
    slots: Arc<std::sync::Mutex<HandshakeSlots>>,
    source: std::net::IpAddr,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(self.source);
    }
}

/// Accepts TCP connections, runs the TLS handshake under a deadline and a concurrency
/// cap (in total and per source address), and yields authenticated connections.
pub fn mtls_incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    options: &ServerOptions,
    stats: Arc<ServerStats>,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<Result<MtlsConn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(std::sync::Mutex::new(HandshakeSlots::new(ListenerLimits {
        max_handshakes: options.max_handshakes.max(1),
        max_handshakes_per_source: options.max_handshakes_per_source.max(1),
    })));
    let timeout = options.handshake_timeout;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.changed() => return,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let admitted = slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .admit(remote.ip());
            if let Err(over) = admitted {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%remote, ?over, "too many handshakes in progress; connection dropped");
                continue;
            }
            let permit = SlotGuard {
                slots: slots.clone(),
                source: remote.ip(),
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let stats = stats.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let id = peer_id(stream.get_ref().1.peer_certificates());
                        let info = PeerInfo { id, remote };
                        let _ = tx.send(Ok(MtlsConn { stream, info })).await;
                    }
                    Ok(Err(e)) => {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%remote, error = %e, "clustermesh client refused");
                    }
                    Err(_) => {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%remote, "TLS handshake deadline passed; connection dropped");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Serves `service` on `listener` with mTLS until `shutdown` completes; then the
/// listener closes and every watch stream ends.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    mut service: ClusterMeshService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (stop_tx, stop_rx) = watch::channel(false);
    service.stop = stop_rx.clone();
    let incoming = mtls_incoming(listener, tls, &service.options, service.stats(), stop_rx);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
