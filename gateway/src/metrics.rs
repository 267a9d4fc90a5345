//! Prometheus metrics (`[metrics] listen = "IP:PORT"`, off by default).
//!
//! Every scrape renders the gateway's status document ([`Status`], the same
//! numbers `isthmusctl status` shows) in the OpenMetrics text format with
//! the prometheus-client crate, so the two never disagree and nothing is
//! counted twice on the data path. Per peer: bytes, packets, handshakes,
//! drops by reason; ESP SA generation (the key epoch), rekeys, rotations
//! and the last rotation's time; WireGuard key epoch per peer, the epoch in
//! force, key rotations and the last one's time; per mTLS channel: up,
//! sessions and round-trip time;
//! reloads of the identity files. No key material is ever part of it.
//!
//! The server answers `GET /metrics` only (404 otherwise), one request per
//! connection, with short timeouts; it holds no state a client can grow.

use crate::admin::Status;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn counter(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge<f64, AtomicU64>> {
    let f = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    reg.register(name, help, f.clone());
    f
}

/// The metrics of `status`, in the OpenMetrics text format.
pub fn render(status: &Status) -> String {
    let mut reg = Registry::with_prefix("isthmus");
    let rx_bytes = counter(&mut reg, "peer_rx_bytes", "Bytes received from the peer");
    let tx_bytes = counter(&mut reg, "peer_tx_bytes", "Bytes sent to the peer");
    let rx_packets = counter(
        &mut reg,
        "peer_rx_packets",
        "Packets received from the peer",
    );
    let tx_packets = counter(&mut reg, "peer_tx_packets", "Packets sent to the peer");
    let handshakes = counter(
        &mut reg,
        "peer_handshakes",
        "Completed WireGuard handshakes",
    );
    let peer_drops = counter(
        &mut reg,
        "peer_drops",
        "Packets of the peer dropped, by reason",
    );
    let device_drops = counter(
        &mut reg,
        "device_drops",
        "Packets dropped before a peer was known, by tunnel and reason",
    );
    let generation = gauge(
        &mut reg,
        "esp_sa_generation",
        "ESP outbound SA generation in use (the key epoch)",
    );
    let rekeys = counter(&mut reg, "esp_rekeys", "ESP outbound SA replacements");
    let rotations = counter(
        &mut reg,
        "esp_rotations",
        "ESP SA rotations asked for by an operator and applied",
    );
    let last_rotation = gauge(
        &mut reg,
        "esp_last_rotation_timestamp_seconds",
        "When the last ESP SA rotation was applied",
    );
    let channel_up = gauge(&mut reg, "channel_up", "Whether the mTLS channel is up");
    let channel_rtt = gauge(
        &mut reg,
        "channel_rtt_seconds",
        "Round-trip time of the mTLS channel's last answered liveness ping",
    );
    let wg_epoch = gauge(
        &mut reg,
        "wireguard_key_epoch",
        "Epoch of this gateway's WireGuard key that packets to the peer go out under",
    );
    let wg_in_force = gauge(
        &mut reg,
        "wireguard_key_in_force_epoch",
        "Epoch of this gateway's WireGuard key in force",
    );
    let wg_rotations = counter(
        &mut reg,
        "wireguard_key_rotations",
        "WireGuard static keys put in force since start",
    );
    let wg_last_rotation = gauge(
        &mut reg,
        "wireguard_last_key_rotation_timestamp_seconds",
        "When the last WireGuard static key was put in force",
    );
    let sessions = counter(
        &mut reg,
        "channel_sessions",
        "mTLS channel sessions established",
    );
    let reloads = counter(
        &mut reg,
        "identity_reloads",
        "Changes of the identity files applied without a restart",
    );
    let reload_error = gauge(
        &mut reg,
        "identity_reload_error",
        "1 while identity files on disk cannot be put in force",
    );
    for p in &status.peers {
        let name = p
            .name
            .clone()
            .or_else(|| p.public_key.clone())
            .unwrap_or_default();
        let l = labels(&[("peer", &name), ("kind", &p.kind)]);
        rx_bytes.get_or_create(&l).inc_by(p.rx_bytes);
        tx_bytes.get_or_create(&l).inc_by(p.tx_bytes);
        rx_packets.get_or_create(&l).inc_by(p.rx_packets);
        tx_packets.get_or_create(&l).inc_by(p.tx_packets);
        if p.kind == "wireguard" {
            handshakes.get_or_create(&l).inc_by(p.handshakes);
            if let Some(e) = p.key_epoch {
                wg_epoch
                    .get_or_create(&labels(&[("peer", &name)]))
                    .set(e as f64);
            }
        }
        let d = &p.drops;
        for (reason, n) in [
            ("no_session", d.no_session),
            ("bad_source", d.bad_source),
            ("decrypt_failure", d.decrypt_failure),
            ("replay", d.replay),
            ("too_old", d.too_old),
        ] {
            let l = labels(&[("peer", &name), ("kind", &p.kind), ("reason", reason)]);
            peer_drops.get_or_create(&l).inc_by(n);
        }
        if let Some(esp) = &p.esp {
            let l = labels(&[("peer", &name)]);
            generation
                .get_or_create(&l)
                .set(esp.outbound.generation as f64);
            rekeys.get_or_create(&l).inc_by(esp.rekeys);
            rotations.get_or_create(&l).inc_by(esp.rotations);
            if let Some(t) = esp.last_rotation_unix {
                last_rotation.get_or_create(&l).set(t);
            }
        }
    }
    let device = [
        ("wireguard", Some(&status.drops)),
        ("esp", status.esp_drops.as_ref()),
    ];
    for (tunnel, drops) in device {
        let Some(d) = drops else { continue };
        for (reason, n) in [
            ("no_route", d.no_route),
            ("malformed", d.malformed),
            ("unknown_peer", d.unknown_peer),
        ] {
            let l = labels(&[("tunnel", tunnel), ("reason", reason)]);
            device_drops.get_or_create(&l).inc_by(n);
        }
    }
    for c in &status.channels {
        let l = labels(&[("peer", &c.spiffe_id)]);
        channel_up
            .get_or_create(&l)
            .set(if c.state == "up" { 1.0 } else { 0.0 });
        sessions.get_or_create(&l).inc_by(c.sessions);
        if let Some(ms) = c.rtt_ms {
            channel_rtt.get_or_create(&l).set(ms / 1000.0);
        }
    }
    if let Some(k) = status.wireguard_keys.iter().find(|k| k.in_force) {
        wg_in_force.get_or_create(&vec![]).set(k.epoch as f64);
    }
    if let Some(r) = &status.key_rotation {
        wg_rotations.get_or_create(&vec![]).inc_by(r.rotations);
        if let Some(t) = r.last_rotation_unix {
            wg_last_rotation.get_or_create(&vec![]).set(t as f64);
        }
    }
    if let Some(r) = &status.identity_reload {
        reloads
            .get_or_create(&labels(&[("what", "trust")]))
            .inc_by(r.trust_reloads);
        reloads
            .get_or_create(&labels(&[("what", "certificate")]))
            .inc_by(r.credential_reloads);
        reload_error
            .get_or_create(&vec![])
            .set(if r.last_error.is_some() { 1.0 } else { 0.0 });
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// Serves `/metrics` until the process ends.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
}

/// Scrapes served at once; further connections are closed at once.
pub const MAX_SCRAPERS: usize = 4;
/// Longest time a client has to send its request head, and to take the answer.
pub const SCRAPE_DEADLINE: Duration = Duration::from_secs(3);

impl MetricsServer {
    /// Binds `addr` and answers scrapes on background threads (at most
    /// [`MAX_SCRAPERS`] at once, each bounded by [`SCRAPE_DEADLINE`] as a
    /// whole, so slow clients cannot hold the endpoint).
    pub fn start(
        addr: SocketAddr,
        status: Arc<dyn Fn() -> Status + Send + Sync>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "metrics are served to anyone who can reach this address (peer names, traffic counters; no keys)");
        }
        crate::tcp_service::spawn(
            listener,
            "metrics",
            MAX_SCRAPERS,
            MAX_SCRAPERS,
            Arc::new(move |stream| serve(stream, &*status)),
        )?;
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
        Ok(Self { addr })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;

use crate::tcp_service::left;

fn serve(mut stream: TcpStream, status: &(dyn Fn() -> Status + Send + Sync)) {
    let deadline = Instant::now() + SCRAPE_DEADLINE;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        let Some(t) = left(deadline) else { return };
        let _ = stream.set_read_timeout(Some(t));
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = head
        .split(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim().to_string())
        .unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (code, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(&status()),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "only /metrics is served\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // The whole answer within the deadline too: a client reading slowly is cut off.
    let mut rest = response.as_bytes();
    while !rest.is_empty() {
        let Some(t) = left(deadline) else { return };
        let _ = stream.set_write_timeout(Some(t));
        match stream.write(rest) {
            Ok(0) | Err(_) => return,
            Ok(n) => rest = &rest[n..],
        }
    }
    let _ = stream.flush();
}
