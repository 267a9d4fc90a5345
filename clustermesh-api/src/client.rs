//! Watching remote clusters' API servers.
//!
//! One task per remote cluster: connect over mTLS (the server must present a gateway
//! identity of exactly that cluster, so its objects can be authorized against it), send
//! `Watch(epoch, revision)` with the last point this client applied, forward every event
//! in order, and on any failure reconnect with jittered exponential backoff. A stream that
//! is silent for longer than [`ClientOptions::idle_timeout`] (no delta and no bookmark) is
//! treated as dead. The resume point follows what was forwarded: `SnapshotEnd`, deltas and
//! bookmarks advance it; `Resync` clears it until the next `SnapshotEnd`.

use crate::pb::cluster_mesh_client::ClusterMeshClient;
use crate::pb::{watch_event::Event, WatchEvent, WatchRequest};
use hyper_util::rt::TokioIo;
use isthmus_identity::{peer_id, ClusterName, SpiffeId};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Largest watch event a client decodes.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Where a remote cluster's API server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchTarget {
    /// The remote cluster (its server must be one of its gateway identities).
    pub cluster: ClusterName,
    /// host:port of its API server.
    pub endpoint: SocketAddr,
}

/// Client timing.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TCP + TLS + HTTP/2 connection deadline.
    pub connect_timeout: Duration,
    /// A stream with no message for this long is dropped and reconnected.
    pub idle_timeout: Duration,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// What a watch task reports, in order, for one cluster.
// Almost every value is an `Event`: boxing it would add an allocation per event to
// shrink the rare variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// A stream is open to the cluster's server (which presented `server`).
    Connected {
        /// The cluster.
        cluster: ClusterName,
        /// The server's verified identity.
        server: SpiffeId,
    },
    /// An event of that stream.
    Event {
        /// The cluster.
        cluster: ClusterName,
        /// The event.
        event: WatchEvent,
    },
    /// The stream ended or could not be opened.
    Disconnected {
        /// The cluster.
        cluster: ClusterName,
        /// Why.
        reason: String,
    },
}

/// Capped exponential backoff with jitter: each delay is drawn uniformly from
/// [d/2, d] where d doubles from `initial` up to `max`.
#[derive(Debug, Clone)]
pub struct JitteredBackoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl JitteredBackoff {
    /// A backoff starting at `initial`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The next delay; `unit` is a uniform random number in [0, 1].
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// Back to the initial delay (after a healthy stream).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

fn unit_random() -> f64 {
    rand_core::RngCore::next_u32(&mut rand_core::OsRng) as f64 / u32::MAX as f64
}

/// The resume point a watch task keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResumePoint {
    /// 0 when there is none.
    pub epoch: u64,
    /// Last revision applied.
    pub revision: u64,
}

impl ResumePoint {
    /// Advances over one forwarded event.
    pub fn advance(&mut self, event: &WatchEvent) {
        match &event.event {
            Some(Event::SnapshotEnd(end)) => {
                *self = ResumePoint {
                    epoch: event.epoch,
                    revision: end.revision,
                }
            }
            Some(Event::Resync(_)) | Some(Event::SnapshotBegin(_)) => {
                *self = ResumePoint::default()
            }
            Some(Event::Upsert(o)) if self.epoch == event.epoch => {
                self.revision = self.revision.max(o.revision)
            }
            Some(Event::Delete(d)) if self.epoch == event.epoch => {
                self.revision = self.revision.max(d.revision)
            }
            Some(Event::Bookmark(b)) if self.epoch == event.epoch => {
                self.revision = self.revision.max(b.revision)
            }
            _ => {}
        }
    }
}

/// A running watch of one cluster; stops when dropped.
#[derive(Debug)]
pub struct WatchHandle {
    task: JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching `target` on the current tokio runtime.
pub fn spawn_watch(
    target: WatchTarget,
    tls: Arc<rustls::ClientConfig>,
    options: ClientOptions,
    events: mpsc::Sender<ClientEvent>,
) -> WatchHandle {
    WatchHandle {
        task: tokio::spawn(watch_loop(target, tls, options, events)),
    }
}

async fn watch_loop(
    target: WatchTarget,
    tls: Arc<rustls::ClientConfig>,
    options: ClientOptions,
    events: mpsc::Sender<ClientEvent>,
) {
    let mut backoff = JitteredBackoff::new(options.backoff_initial, options.backoff_max);
    let mut resume = ResumePoint::default();
    loop {
        let healthy = match watch_once(&target, &tls, &options, &events, &mut resume).await {
            Ok(healthy) => healthy,
            Err(reason) => {
                if events
                    .send(ClientEvent::Disconnected {
                        cluster: target.cluster.clone(),
                        reason,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                false
            }
        };
        if events.is_closed() {
            return;
        }
        if healthy {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay(unit_random())).await;
    }
}

/// One connection. `Ok(true)`: the stream delivered at least a snapshot or resumed.
/// Returns `Err(reason)` for the disconnect report.
async fn watch_once(
    target: &WatchTarget,
    tls: &Arc<rustls::ClientConfig>,
    options: &ClientOptions,
    events: &mpsc::Sender<ClientEvent>,
    resume: &mut ResumePoint,
) -> Result<bool, String> {
    let server_id: Arc<Mutex<Option<SpiffeId>>> = Arc::default();
    let connector = {
        let tls = tokio_rustls::TlsConnector::from(tls.clone());
        let addr = target.endpoint;
        let server_id = server_id.clone();
        tower::service_fn(move |_uri: http::Uri| {
            let tls = tls.clone();
            let server_id = server_id.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let stream = tls.connect(name, tcp).await?;
                *server_id.lock().unwrap_or_else(|e| e.into_inner()) =
                    peer_id(stream.get_ref().1.peer_certificates());
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        })
    };
    let uri = format!("http://{}", target.endpoint);
    let endpoint = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| e.to_string())?
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    let channel = tokio::time::timeout(
        options.connect_timeout,
        endpoint.connect_with_connector(connector),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect failed: {}", error_chain(&e)))?;
    let server = server_id
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .ok_or("the server presented no SPIFFE ID")?;
    // One event is one object (the reducer refuses objects over 64 KiB anyway).
    let mut client = ClusterMeshClient::new(channel).max_decoding_message_size(MAX_EVENT_BYTES);
    let request = WatchRequest {
        epoch: resume.epoch,
        revision: resume.revision,
    };
    let mut stream = tokio::time::timeout(options.connect_timeout, client.watch(request))
        .await
        .map_err(|_| "watch request timed out".to_string())?
        .map_err(|s| format!("watch refused: {}", s.message()))?
        .into_inner();
    if events
        .send(ClientEvent::Connected {
            cluster: target.cluster.clone(),
            server,
        })
        .await
        .is_err()
    {
        return Ok(false);
    }
    let mut healthy = false;
    loop {
        let next = tokio::time::timeout(options.idle_timeout, stream.message()).await;
        let event = match next {
            Err(_) => return Err(format!("no message for {:?}", options.idle_timeout)),
            Ok(Err(status)) => return Err(format!("stream failed: {}", status.message())),
            Ok(Ok(None)) => return Err("the server closed the stream".into()),
            Ok(Ok(Some(e))) => e,
        };
        resume.advance(&event);
        if matches!(event.event, Some(Event::SnapshotEnd(_)))
            || (resume.epoch != 0 && resume.epoch == event.epoch)
        {
            healthy = true;
        }
        if events
            .send(ClientEvent::Event {
                cluster: target.cluster.clone(),
                event,
            })
            .await
            .is_err()
        {
            return Ok(healthy);
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{Bookmark, Resync, SnapshotEnd};

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = JitteredBackoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let hi: Vec<_> = (0..6).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(
            hi.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
            [100, 200, 400, 800, 800, 800]
        );
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }

    #[test]
    fn resume_point_follows_the_stream() {
        let ev = |epoch, e| WatchEvent {
            epoch,
            event: Some(e),
        };
        let mut r = ResumePoint::default();
        r.advance(&ev(5, Event::Bookmark(Bookmark { revision: 3 })));
        assert_eq!(
            r,
            ResumePoint::default(),
            "no resume point before a snapshot"
        );
        r.advance(&ev(5, Event::SnapshotEnd(SnapshotEnd { revision: 10 })));
        r.advance(&ev(5, Event::Bookmark(Bookmark { revision: 12 })));
        assert_eq!(
            r,
            ResumePoint {
                epoch: 5,
                revision: 12
            }
        );
        r.advance(&ev(6, Event::Resync(Resync::default())));
        assert_eq!(r, ResumePoint::default());
    }
}
