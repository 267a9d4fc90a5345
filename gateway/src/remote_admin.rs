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
//! [`MAX_REMOTE_ADMIN_CONNECTIONS`] connections at once and
//! [`MAX_REMOTE_ADMIN_PER_SOURCE`] from one address, each bounded by
//! [`REMOTE_ADMIN_HANDSHAKE`] to authenticate and [`REMOTE_ADMIN_DEADLINE`]
//! as a whole.

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
/// Connections from one IP address at once.
pub const MAX_REMOTE_ADMIN_PER_SOURCE: usize = 2;
/// Longest time the TLS handshake may take (a client that does not
/// authenticate gives its slot back soon).
pub const REMOTE_ADMIN_HANDSHAKE: Duration = Duration::from_secs(3);

/// Commands served remotely (each, or its first word); the others only on
/// the local socket.
pub const REMOTE_COMMANDS: &[&str] = &["status", "keys-rotate", "sa-rotate"];

fn remote_command(command: &str) -> bool {
    let verb = command.split(' ').next().unwrap_or("");
    REMOTE_COMMANDS.contains(&verb)
}

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
            MAX_REMOTE_ADMIN_PER_SOURCE,
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
    let start = Instant::now();
    let mut stream = rustls::StreamOwned::new(
        conn,
        DeadlineStream::new(sock, start + REMOTE_ADMIN_HANDSHAKE),
    );
    while stream.conn.is_handshaking() {
        if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
            tracing::warn!(?remote, error = %e, "remote administration refused");
            return;
        }
    }
    stream.sock.set_deadline(start + REMOTE_ADMIN_DEADLINE);
    let client = isthmus_identity::peer_id(stream.conn.peer_certificates());
    let Some(client) = client else {
        // The verifier accepted a chain, so this cannot happen; refuse anyway.
        return;
    };
    if stream.conn.alpn_protocol() != Some(ADMIN_ALPN) {
        tracing::warn!(?remote, %client, "remote administration refused: no isthmus-admin ALPN");
        return;
    }
    let logged = |command: &str| {
        tracing::info!(?remote, %client, command, "remote admin command");
        if !remote_command(command) {
            return Some(format!(
                "error: `{}` is not served remotely (remote: {})",
                command.escape_debug(),
                REMOTE_COMMANDS.join(", ")
            ));
        }
        handler(command)
    };
    serve_one(&mut stream, &logged);
    stream.conn.send_close_notify();
    let _ = stream.conn.complete_io(&mut stream.sock);
}
