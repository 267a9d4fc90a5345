//! Remote administration over mTLS (`[admin] listen = "IP:PORT"`, off by
//! default).
//!
//! The same commands as the local admin socket, one per connection, over TLS
//! 1.3 with ALPN [`ADMIN_ALPN`]. The gateway presents its own certificate (the
//! one in force, as reloaded); the client must present a certificate that
//! chains to the trust bundle in force, is not revoked by a CRL in force, and
//! carries an administrator identity `spiffe://<td>/cluster/<c>/admin/<name>`
//! of an allowed cluster (by default the gateway's own). Anything else — no
//! certificate, a gateway's certificate, another cluster's or trust domain's
//! administrator — fails the TLS handshake, and no command is read. At most
//! [`MAX_REMOTE_ADMIN_CONNECTIONS`] connections at once, each bounded by
//! [`REMOTE_ADMIN_DEADLINE`] as a whole.

use crate::admin::{serve_one, Handler, ADMIN_ALPN};
use crate::tcp_service::DeadlineStream;
use isthmus_identity::{ChannelConfig, PeerPolicy};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connections served at once; further ones are closed at once.
pub const MAX_REMOTE_ADMIN_CONNECTIONS: usize = 8;
/// Longest time one connection may take, handshake included.
pub const REMOTE_ADMIN_DEADLINE: Duration = Duration::from_secs(10);

/// Serves remote administration until the process ends.
#[derive(Debug)]
pub struct RemoteAdminServer {
    addr: SocketAddr,
}

impl RemoteAdminServer {
    /// Binds `addr` and serves clients allowed by `allowed` (checked against
    /// the trust in `config` at each connection) with `handler`.
    pub fn start(
        addr: SocketAddr,
        config: Arc<ChannelConfig>,
        allowed: PeerPolicy,
        handler: Arc<Handler>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, ?allowed, "serving remote administration (mTLS)");
        crate::tcp_service::spawn(
            listener,
            "remote-admin",
            MAX_REMOTE_ADMIN_CONNECTIONS,
            Arc::new(move |sock| serve(sock, &config, &allowed, &*handler)),
        )?;
        Ok(Self { addr })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

fn serve(sock: TcpStream, config: &ChannelConfig, allowed: &PeerPolicy, handler: &Handler) {
    let remote = sock.peer_addr().ok();
    // Built per connection: a reloaded bundle, CRL or certificate applies to
    // the next client.
    let tls = match config.service_server_config(allowed.clone(), ADMIN_ALPN) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "remote administration: no TLS config");
            return;
        }
    };
    let conn = match rustls::ServerConnection::new(tls) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "remote administration: TLS setup failed");
            return;
        }
    };
    let mut stream = rustls::StreamOwned::new(
        conn,
        DeadlineStream::new(sock, Instant::now() + REMOTE_ADMIN_DEADLINE),
    );
    while stream.conn.is_handshaking() {
        if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
            tracing::warn!(?remote, error = %e, "remote administration refused");
            return;
        }
    }
    let client = isthmus_identity::peer_id(stream.conn.peer_certificates());
    let Some(client) = client else {
        // The verifier accepted a chain, so this cannot happen; refuse anyway.
        return;
    };
    let logged = |command: &str| {
        tracing::info!(?remote, %client, command, "remote admin command");
        handler(command)
    };
    serve_one(&mut stream, &logged);
    stream.conn.send_close_notify();
    let _ = stream.conn.complete_io(&mut stream.sock);
}
