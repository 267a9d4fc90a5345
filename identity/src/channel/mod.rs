//! The gateway-to-gateway peer channel: mutually authenticated TLS 1.3 over TCP that binds
//! tunnel parameters and ESP keys to verified gateway identities.
//!
//! # Why TCP (and not QUIC)
//! The channel is a low-rate control session: a hello, periodic pings, rare rekeys. TCP
//! with rustls is one less moving part than QUIC (no connection IDs, no userspace loss
//! recovery, no UDP socket shared with the data plane), its ordered byte stream fits a
//! sequence of control frames directly, and it runs on plain std threads without an async
//! runtime, matching the gateway daemon. Tunnel traffic never flows here. quinn remains
//! available if the channel ever needs to multiplex or migrate.
//!
//! # What is checked
//! Both sides present certificates (client authentication is mandatory) and both verify:
//! the chain to a root of the trust bundle, validity at the current time, the EKU, the
//! CRLs of every issuer in the chain, that a cluster CA only vouches for its own cluster,
//! and then the peer's SPIFFE ID: the dialer expects exactly the ID configured for that
//! endpoint; the acceptor expects one of its configured peers. Session resumption is off,
//! so every connection is verified in full. A refusal is logged with its cause
//! ([`Refusal`]) and produces no [`Established`].
//!
//! # Protocol
//! Once TLS is up, each side sends a [`Frame::Hello`] with its [`TunnelParams`]; a side is
//! established only after it has received the peer's hello (in TLS 1.3 the server checks
//! the client certificate after the client's handshake finished, so the client waits for
//! the server's word). Then pings keep the session alive and [`ControlMessage`]s carry
//! parameter changes and rekeys. ESP keys are never sent: see [`EspKeyBlock`].
//!
//! # Threads and events
//! Everything is blocking std I/O. Each session has one reader thread; events of all
//! sessions go to one `std::sync::mpsc::Sender<ChannelEvent>`. [`PeerChannel::connect`] and
//! [`ChannelListener::accept`] establish one session and return it; [`PeerLink`] (dialer,
//! reconnecting with capped exponential backoff) and [`ListenerHandle`] (accept loop) run
//! in the background and report [`ChannelEvent::Established`] themselves.

mod frame;
mod keys;
pub mod mtls;
mod session;
mod timing;
mod verify;

use std::fmt;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

pub use frame::{
    encode_frame, ControlMessage, Frame, FrameDecoder, FrameError, TunnelParams, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};
pub use keys::{
    EspKeyBlock, Role, DEFAULT_ESP_KEY_LEN, LABEL_CLIENT_TO_SERVER, LABEL_SERVER_TO_CLIENT,
    MAX_ESP_KEY_LEN,
};
pub use mtls::{peer_id, MeshTls, PeerPolicy};
pub use session::{LossReason, PeerSession};
pub use timing::{Backoff, ChannelTiming};
pub use verify::{MeshTrust, Refusal, TrustError};

use session::{SessionIo, SessionStart};
use verify::{PeerClientVerifier, PeerServerVerifier, TrustCore};

use crate::spiffe::SpiffeId;
use crate::svid::{spiffe_id_of, SvidError};

/// ALPN protocol name of the channel.
pub const ALPN: &[u8] = b"isthmus-peer/1";

/// Most handshakes a [`ListenerHandle`] runs at once; further connections are dropped.
const MAX_CONCURRENT_HANDSHAKES: usize = 64;

/// This gateway's certificate chain and private key.
pub struct LocalCredentials {
    /// Leaf first, then the cluster intermediate (the root is not needed).
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for LocalCredentials {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for LocalCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCredentials")
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A peer to dial: its channel endpoint and the SPIFFE ID it must present there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEndpoint {
    /// The SPIFFE ID the peer must present (exactly).
    pub id: SpiffeId,
    /// Where its channel listener is.
    pub addr: SocketAddr,
}

/// Why a channel could not be set up or established.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// Authentication failed: we refused the peer, or the peer refused us.
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The endpoint.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The handshake or hello exchange did not finish in time.
    #[error("timed out during the {0}")]
    Timeout(&'static str),
    /// The peer closed the connection before the session was established.
    #[error("connection closed during the {0}")]
    ClosedEarly(&'static str),
    /// Other socket error.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// TLS failed for a reason other than authentication.
    #[error("TLS error: {0}")]
    Tls(rustls::Error),
    /// A malformed or oversized frame.
    #[error("frame error: {0}")]
    Frame(FrameError),
    /// The peer's hello has another protocol version.
    #[error("peer speaks channel protocol version {0}, this gateway speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// The peer sent something other than a hello first.
    #[error("the peer sent another frame before its hello")]
    UnexpectedFrame,
    /// The peer sent a Close frame instead of a hello.
    #[error("the peer closed the channel: {0}")]
    PeerClosed(String),
    /// The trust bundle or CRLs are unusable.
    #[error("trust bundle: {0}")]
    Trust(#[from] TrustError),
    /// The local certificate chain or key is unusable.
    #[error("local credentials: {0}")]
    Credentials(String),
    /// The local certificate has no usable SPIFFE ID.
    #[error("local certificate: {0}")]
    LocalIdentity(#[from] SvidError),
    /// An ESP key length outside 1..=[`MAX_ESP_KEY_LEN`].
    #[error("ESP key length {0} is out of range (1..={MAX_ESP_KEY_LEN})")]
    KeyLength(usize),
    /// The session is closed.
    #[error("the session is closed")]
    Closed,
}

impl ChannelError {
    fn from_tls(err: rustls::Error) -> Self {
        match Refusal::from_tls(&err) {
            Some(refusal) => ChannelError::Refused(refusal),
            None => ChannelError::Tls(err),
        }
    }
}

/// What the channel reports to the daemon.
#[derive(Debug)]
#[non_exhaustive]
pub enum ChannelEvent {
    /// A session is up: the tunnel towards `peer` may be configured.
    Established(Box<Established>),
    /// The peer sent an application message.
    Message {
        /// The sender.
        peer: SpiffeId,
        /// The message.
        message: ControlMessage,
    },
    /// An established session ended: the tunnel keys it carried must be retired.
    Lost {
        /// The peer.
        peer: SpiffeId,
        /// Why.
        reason: LossReason,
    },
    /// A connection was refused during authentication (no tunnel was brought up).
    Refused {
        /// The other end's address.
        remote: SocketAddr,
        /// Whether we dialed or accepted.
        role: Role,
        /// The cause.
        refusal: Refusal,
    },
}

/// An established, mutually authenticated session.
#[derive(Debug)]
pub struct Established {
    /// The peer's verified SPIFFE ID.
    pub peer: SpiffeId,
    /// The peer's address.
    pub remote: SocketAddr,
    /// Whether we dialed or accepted.
    pub role: Role,
    /// The peer's tunnel parameters (from its hello).
    pub params: TunnelParams,
    /// ESP keys of generation 0 ([`ChannelConfig::esp_key_len`] bytes per direction).
    pub keys: EspKeyBlock,
    /// The running session (later generations, messages, close).
    pub session: PeerSession,
}

/// Everything a gateway needs to dial or accept peer channels.
pub struct ChannelConfig {
    local_id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    trust: Arc<TrustCore>,
    provider: Arc<CryptoProvider>,
    params: TunnelParams,
    timing: ChannelTiming,
    esp_key_len: usize,
}

impl fmt::Debug for ChannelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelConfig")
            .field("local_id", &self.local_id.to_string())
            .field("chain_len", &self.chain.len())
            .field("trust", &self.trust)
            .field("params", &self.params)
            .field("timing", &self.timing)
            .field("esp_key_len", &self.esp_key_len)
            .finish_non_exhaustive()
    }
}

impl ChannelConfig {
    /// Checks the credentials (the leaf carries a SPIFFE ID, the key matches it) and
    /// parses the trust bundle and CRLs. Uses rustls's *ring* provider, TLS 1.3 only.
    pub fn new(
        credentials: LocalCredentials,
        trust: &MeshTrust,
        params: TunnelParams,
    ) -> Result<Self, ChannelError> {
        let leaf = credentials
            .chain
            .first()
            .ok_or_else(|| ChannelError::Credentials("the certificate chain is empty".into()))?;
        let local_id = spiffe_id_of(leaf)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let trust = Arc::new(TrustCore::new(
            trust,
            provider.signature_verification_algorithms,
        )?);
        let config = Self {
            local_id,
            chain: credentials.chain,
            key: credentials.key,
            trust,
            provider,
            params,
            timing: ChannelTiming::default(),
            esp_key_len: DEFAULT_ESP_KEY_LEN,
        };
        // Building a server config checks that the key matches the leaf.
        config.server_config(Arc::new(RwLock::new(Vec::new())))?;
        Ok(config)
    }

    /// Replaces the timeouts and intervals.
    pub fn with_timing(mut self, timing: ChannelTiming) -> Self {
        self.timing = timing;
        self
    }

    /// Sets the per-direction length of the generation-0 ESP keys in [`Established`].
    pub fn with_esp_key_len(mut self, len: usize) -> Result<Self, ChannelError> {
        if len == 0 || len > MAX_ESP_KEY_LEN {
            return Err(ChannelError::KeyLength(len));
        }
        self.esp_key_len = len;
        Ok(self)
    }

    /// This gateway's SPIFFE ID (from its certificate).
    pub fn local_id(&self) -> &SpiffeId {
        &self.local_id
    }

    /// The tunnel parameters announced in hellos.
    pub fn params(&self) -> &TunnelParams {
        &self.params
    }

    /// The timeouts and intervals.
    pub fn timing(&self) -> &ChannelTiming {
        &self.timing
    }

    /// Length of the generation-0 ESP keys.
    pub fn esp_key_len(&self) -> usize {
        self.esp_key_len
    }

    fn client_config(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, ChannelError> {
        let verifier = Arc::new(PeerServerVerifier {
            trust: self.trust.clone(),
            expected: expected.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ChannelError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| ChannelError::Credentials(e.to_string()))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_sni = false;
        Ok(Arc::new(config))
    }

    fn server_config(
        &self,
        allowed: Arc<RwLock<Vec<SpiffeId>>>,
    ) -> Result<Arc<ServerConfig>, ChannelError> {
        let verifier = Arc::new(PeerClientVerifier {
            trust: self.trust.clone(),
            allowed,
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ChannelError::Tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| ChannelError::Credentials(e.to_string()))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

/// Which of two gateways dials: the one whose SPIFFE ID sorts first. Both ends evaluate
/// the same rule, so a pair of gateways opens one channel, not two.
pub fn should_dial(local: &SpiffeId, peer: &SpiffeId) -> bool {
    local.to_string() < peer.to_string()
}

/// Dialing side of the channel.
#[derive(Debug, Clone, Copy)]
pub struct PeerChannel;

impl PeerChannel {
    /// Dials `peer`, verifies that it presents exactly `peer.id`, exchanges hellos and
    /// returns the established session. Later events of the session (messages, loss) go
    /// to `events`. Every outcome is logged; a refusal is a [`ChannelError::Refused`].
    pub fn connect(
        config: &ChannelConfig,
        peer: &PeerEndpoint,
        events: Sender<ChannelEvent>,
    ) -> Result<Established, ChannelError> {
        let (established, reader) = dial(config, peer, events)?;
        reader.spawn();
        Ok(established)
    }
}

fn dial(
    config: &ChannelConfig,
    peer: &PeerEndpoint,
    events: Sender<ChannelEvent>,
) -> Result<(Established, session::PendingReader), ChannelError> {
    let mut local = None;
    let result = (|| {
        let sock = TcpStream::connect_timeout(&peer.addr, config.timing.handshake_timeout)
            .map_err(|source| ChannelError::Connect {
                addr: peer.addr,
                source,
            })?;
        local = sock.local_addr().ok();
        let tls = ClientConnection::new(
            config.client_config(&peer.id)?,
            ServerName::IpAddress(peer.addr.ip().into()),
        )
        .map_err(ChannelError::Tls)?;
        establish(config, sock, peer.addr, tls.into(), Role::Dialer, events)
    })();
    log_outcome(
        Role::Dialer,
        local,
        peer.addr,
        &peer.id.to_string(),
        &result,
    );
    result
}

fn log_outcome(
    role: Role,
    local: Option<SocketAddr>,
    remote: SocketAddr,
    expected: &str,
    result: &Result<(Established, session::PendingReader), ChannelError>,
) {
    let local = local.map_or_else(|| "(not connected)".to_string(), |a| a.to_string());
    match result {
        Ok((est, _)) => tracing::info!(
            %role, %local, %remote, peer = %est.peer, "peer channel established"
        ),
        Err(ChannelError::Refused(refusal)) => tracing::warn!(
            %role, %local, %remote, expected = %expected, reason = %refusal, "peer channel refused"
        ),
        Err(e) => tracing::warn!(
            %role, %local, %remote, expected = %expected, error = %e, "peer channel failed"
        ),
    }
}

/// Time left before `deadline`, or the timeout error for `stage`.
fn remaining(deadline: Instant, stage: &'static str) -> Result<Duration, ChannelError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(ChannelError::Timeout(stage))
    } else {
        Ok(left)
    }
}

/// Reads once from the socket into the TLS connection. Returns `false` on end of stream.
fn read_once(
    io: &mut SessionIo,
    reader: &mut TcpStream,
    decoder: &mut FrameDecoder,
    deadline: Instant,
    stage: &'static str,
) -> Result<bool, ChannelError> {
    let mut buf = [0u8; 16 * 1024];
    reader.set_read_timeout(Some(remaining(deadline, stage)?))?;
    let n = match reader.read(&mut buf) {
        Ok(n) => n,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(ChannelError::Timeout(stage))
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
        Err(e) => return Err(e.into()),
    };
    if n == 0 {
        return Ok(false);
    }
    let peer_closed = io
        .receive(&buf[..n], decoder)
        .map_err(ChannelError::from_tls)?;
    Ok(!peer_closed)
}

/// TLS handshake and hello exchange on a connected socket.
fn establish(
    config: &ChannelConfig,
    sock: TcpStream,
    remote: SocketAddr,
    tls: rustls::Connection,
    role: Role,
    events: Sender<ChannelEvent>,
) -> Result<(Established, session::PendingReader), ChannelError> {
    let deadline = Instant::now() + config.timing.handshake_timeout;
    sock.set_nodelay(true)?;
    sock.set_write_timeout(Some(config.timing.handshake_timeout))?;
    let mut reader = sock.try_clone()?;
    let mut io = SessionIo { tls, sock };
    let mut decoder = FrameDecoder::new();

    let handshake = (|| {
        while io.tls.is_handshaking() {
            io.flush()?;
            if !io.tls.is_handshaking() {
                break;
            }
            if !read_once(
                &mut io,
                &mut reader,
                &mut decoder,
                deadline,
                "TLS handshake",
            )? {
                return Err(ChannelError::ClosedEarly("TLS handshake"));
            }
        }
        io.flush()?;
        let peer = io
            .tls
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or(Refusal::NoClientCertificate)?;
        let peer = spiffe_id_of(peer).map_err(Refusal::NoSpiffeId)?;

        io.send_frame(&Frame::Hello {
            version: PROTOCOL_VERSION,
            params: config.params.clone(),
        })?;
        let params = loop {
            match decoder.next_frame().map_err(ChannelError::Frame)? {
                Some(Frame::Hello { version, params }) => {
                    if version != PROTOCOL_VERSION {
                        return Err(ChannelError::Version(version));
                    }
                    break params;
                }
                Some(Frame::Close { reason }) => {
                    return Err(ChannelError::PeerClosed(frame::printable(&reason)))
                }
                Some(_) => return Err(ChannelError::UnexpectedFrame),
                None => {
                    if !read_once(
                        &mut io,
                        &mut reader,
                        &mut decoder,
                        deadline,
                        "hello exchange",
                    )? {
                        return Err(ChannelError::ClosedEarly("hello exchange"));
                    }
                }
            }
        };
        let keys = keys::derive(&io.tls, role, 0, config.esp_key_len).map_err(ChannelError::Tls)?;
        Ok((peer, params, keys))
    })();

    let (peer, params, keys) = match handshake {
        Ok(parts) => parts,
        Err(e) => {
            abort(&mut io, &mut reader);
            return Err(e);
        }
    };
    let (session, reader) = session::prepare(SessionStart {
        io,
        read_sock: reader,
        decoder,
        peer: peer.clone(),
        remote,
        role,
        timing: config.timing,
        events,
    });
    Ok((
        Established {
            peer,
            remote,
            role,
            params,
            keys,
            session,
        },
        reader,
    ))
}

/// Sends what is pending (e.g. the alert), then closes gracefully: half-close and drain
/// briefly, so that the peer reads our alert instead of a connection reset.
fn abort(io: &mut SessionIo, reader: &mut TcpStream) {
    let _ = io.flush();
    let _ = io.sock.shutdown(Shutdown::Write);
    let until = Instant::now() + Duration::from_millis(250);
    let mut sink = [0u8; 4096];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if left.is_zero() || reader.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match reader.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let _ = io.sock.shutdown(Shutdown::Both);
}

/// Accepting side of the channel.
pub struct ChannelListener {
    listener: TcpListener,
    config: Arc<ChannelConfig>,
    tls: Arc<ServerConfig>,
    allowed: Arc<RwLock<Vec<SpiffeId>>>,
}

impl fmt::Debug for ChannelListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelListener")
            .field("local_addr", &self.listener.local_addr().ok())
            .field("local_id", &self.config.local_id.to_string())
            .finish_non_exhaustive()
    }
}

impl ChannelListener {
    /// Binds `addr` and accepts the peers whose SPIFFE IDs are in `allowed_peers`.
    pub fn bind(
        config: Arc<ChannelConfig>,
        addr: SocketAddr,
        allowed_peers: Vec<SpiffeId>,
    ) -> Result<Self, ChannelError> {
        let allowed = Arc::new(RwLock::new(allowed_peers));
        let tls = config.server_config(allowed.clone())?;
        let listener = TcpListener::bind(addr)?;
        Ok(Self {
            listener,
            config,
            tls,
            allowed,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Replaces the set of peers allowed to connect (takes effect for new handshakes).
    pub fn set_allowed_peers(&self, peers: Vec<SpiffeId>) {
        *self.allowed.write().unwrap_or_else(PoisonError::into_inner) = peers;
    }

    /// Accepts one connection and establishes it (blocking, handshake included).
    pub fn accept(&self, events: Sender<ChannelEvent>) -> Result<Established, ChannelError> {
        let (sock, remote) = self.listener.accept()?;
        let (established, reader) = accept_on(&self.config, &self.tls, sock, remote, events)?;
        reader.spawn();
        Ok(established)
    }

    /// Runs the accept loop on a background thread; each handshake runs on its own
    /// thread. Sends [`ChannelEvent::Established`] and [`ChannelEvent::Refused`].
    pub fn spawn(self, events: Sender<ChannelEvent>) -> Result<ListenerHandle, ChannelError> {
        let local_addr = self.listener.local_addr()?;
        self.listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let allowed = self.allowed.clone();
        let thread_stop = stop.clone();
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let thread = std::thread::Builder::new()
            .name(format!("isthmus-listen-{local_addr}"))
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    accept_loop(self, &thread_stop, &events);
                })
            })?;
        Ok(ListenerHandle {
            local_addr,
            stop,
            allowed,
            thread: Some(thread),
        })
    }
}

fn accept_on(
    config: &ChannelConfig,
    tls: &Arc<ServerConfig>,
    sock: TcpStream,
    remote: SocketAddr,
    events: Sender<ChannelEvent>,
) -> Result<(Established, session::PendingReader), ChannelError> {
    let local = sock.local_addr().ok();
    let result = (|| {
        sock.set_nonblocking(false)?;
        let conn = ServerConnection::new(tls.clone()).map_err(ChannelError::Tls)?;
        establish(config, sock, remote, conn.into(), Role::Acceptor, events)
    })();
    log_outcome(Role::Acceptor, local, remote, "a configured peer", &result);
    result
}

fn accept_loop(listener: ChannelListener, stop: &AtomicBool, events: &Sender<ChannelEvent>) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        let (sock, remote) = match listener.listener.accept() {
            Ok(conn) => conn,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a peer channel failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_CONCURRENT_HANDSHAKES {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%remote, "too many peer channel handshakes in flight; dropping connection");
            continue;
        }
        let config = listener.config.clone();
        let tls = listener.tls.clone();
        let events = events.clone();
        let in_flight_done = in_flight.clone();
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("isthmus-accept-{remote}"))
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    match accept_on(&config, &tls, sock, remote, events.clone()) {
                        Ok((established, reader)) => {
                            let _ = events.send(ChannelEvent::Established(Box::new(established)));
                            reader.spawn();
                        }
                        Err(ChannelError::Refused(refusal)) => {
                            let _ = events.send(ChannelEvent::Refused {
                                remote,
                                role: Role::Acceptor,
                                refusal,
                            });
                        }
                        Err(_) => {}
                    }
                });
                in_flight_done.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%remote, error = %e, "cannot start a handshake thread");
        }
    }
}

/// A running accept loop; stops when shut down or dropped (established sessions stay up).
#[derive(Debug)]
pub struct ListenerHandle {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    allowed: Arc<RwLock<Vec<SpiffeId>>>,
    thread: Option<JoinHandle<()>>,
}

impl ListenerHandle {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the set of peers allowed to connect.
    pub fn set_allowed_peers(&self, peers: Vec<SpiffeId>) {
        *self.allowed.write().unwrap_or_else(PoisonError::into_inner) = peers;
    }

    /// Stops accepting and waits for the accept loop to end.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[derive(Debug, Default)]
struct LinkState {
    stopped: bool,
    current: Option<PeerSession>,
}

#[derive(Debug, Default)]
struct LinkShared {
    state: Mutex<LinkState>,
    wake: Condvar,
}

/// Keeps a channel to one peer up: dials, and after a failure or a lost session dials
/// again with capped exponential backoff (reset once a session is established). Sends
/// [`ChannelEvent::Established`] for every session and [`ChannelEvent::Refused`] for every
/// refused attempt.
#[derive(Debug)]
pub struct PeerLink {
    peer: PeerEndpoint,
    shared: Arc<LinkShared>,
    thread: Option<JoinHandle<()>>,
}

impl PeerLink {
    /// Starts dialing `peer` on a background thread.
    pub fn spawn(
        config: Arc<ChannelConfig>,
        peer: PeerEndpoint,
        events: Sender<ChannelEvent>,
    ) -> Result<Self, ChannelError> {
        let shared = Arc::new(LinkShared::default());
        let thread_shared = shared.clone();
        let thread_peer = peer.clone();
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let thread = std::thread::Builder::new()
            .name(format!("isthmus-link-{}", peer.addr))
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    link_loop(&config, &thread_peer, &thread_shared, &events);
                })
            })?;
        Ok(Self {
            peer,
            shared,
            thread: Some(thread),
        })
    }

    /// The peer this link dials.
    pub fn peer(&self) -> &PeerEndpoint {
        &self.peer
    }

    /// The current session, if one is established.
    pub fn current(&self) -> Option<PeerSession> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .current
            .clone()
    }

    /// Stops reconnecting, closes the current session and waits for the link thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let current = {
            let mut state = self
                .shared
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            state.stopped = true;
            state.current.take()
        };
        self.shared.wake.notify_all();
        if let Some(session) = current {
            session.close();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn jitter() -> u32 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 4];
    match ring::rand::SystemRandom::new().fill(&mut bytes) {
        Ok(()) => u32::from_ne_bytes(bytes),
        Err(_) => u32::MAX,
    }
}

fn link_loop(
    config: &ChannelConfig,
    peer: &PeerEndpoint,
    shared: &LinkShared,
    events: &Sender<ChannelEvent>,
) {
    let lock = || shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    let mut backoff = Backoff::new(config.timing.backoff_initial, config.timing.backoff_max);
    loop {
        if lock().stopped {
            return;
        }
        match dial(config, peer, events.clone()) {
            Ok((established, reader)) => {
                backoff.reset();
                let session = established.session.clone();
                {
                    let mut state = lock();
                    if state.stopped {
                        drop(state);
                        reader.spawn();
                        session.close();
                        return;
                    }
                    state.current = Some(session.clone());
                }
                let _ = events.send(ChannelEvent::Established(Box::new(established)));
                reader.spawn();
                session.wait_closed();
                lock().current = None;
            }
            Err(ChannelError::Refused(refusal)) => {
                let _ = events.send(ChannelEvent::Refused {
                    remote: peer.addr,
                    role: Role::Dialer,
                    refusal,
                });
            }
            Err(_) => {}
        }
        let delay = backoff.next_delay(jitter());
        tracing::debug!(peer = %peer.id, remote = %peer.addr, delay_ms = delay.as_millis() as u64, "peer channel reconnect scheduled");
        let state = lock();
        let (state, _) = shared
            .wake
            .wait_timeout_while(state, delay, |s| !s.stopped)
            .unwrap_or_else(PoisonError::into_inner);
        if state.stopped {
            return;
        }
    }
}
