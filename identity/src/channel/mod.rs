//! The gateway-to-gateway peer channel: mutually authenticated TLS 1.3 over TCP that binds
//! tunnel parameters and ESP keys to verified gateway identities.
//!
//! # Why TCP (and not QUIC)
//! The channel is a low-rate control session: a hello, periodic pings, rare rekeys. TCP
//! with rustls is one less moving part than QUIC (no connection IDs, no userspace loss
//! recovery, no UDP socket shared with the data plane), its ordered byte stream fits a
//! sequence of control frames directly. Tunnel traffic never flows here. quinn remains
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
//! Once TLS is up, each side sends a [`Frame::Hello`] with its [`TunnelParams`] and the
//! [`LinkParams`] it is configured with for that peer (tunnel kind, ESP cipher, ESN); a
//! side is established only after it has received the peer's hello (in TLS 1.3 the server
//! checks the client certificate after the client's handshake finished, so the client
//! waits for the server's word). Link parameters that differ from ours are refused
//! ([`Refusal::LinkMismatch`]) on both ends, with a Close frame naming both sides' values.
//! Then pings keep the session alive and [`ControlMessage`]s carry parameter changes and
//! rekeys. ESP keys are never sent: see [`EspKeyBlock`].
//!
//! # Tasks, threads and events
//! All channel I/O runs as tasks on one small tokio runtime owned by this module (two
//! worker threads, see [`runtime`]), with tokio-rustls for the handshakes: a gateway holds
//! a thousand sessions without a thread per peer. The API stays blocking and std: events
//! of all sessions go to one `std::sync::mpsc::Sender<ChannelEvent>`, and
//! [`PeerSession`] methods never wait on the network. [`PeerChannel::connect`] and
//! [`ChannelListener::accept`] establish one session and return it (blocking, for tests
//! and tools; not to be called from async code); [`PeerLink`] (dialer, reconnecting with
//! capped, jittered exponential backoff) and [`ListenerHandle`] (accept loop) run in the
//! background and report [`ChannelEvent::Established`] themselves.
//!
//! # Unauthenticated connections
//! Every handshake (TCP accept or connect, TLS, hello) has one deadline,
//! [`ChannelTiming::handshake_timeout`]. A listener runs at most
//! [`ListenerLimits::max_handshakes`] handshakes at once and at most
//! [`ListenerLimits::max_handshakes_per_source`] from one address; a connection over
//! either limit is closed at once and counted ([`ListenerStats`]), so slow or silent
//! connections from one host cannot keep a lost channel down.

mod admission;
mod frame;
mod handshake;
mod keys;
mod link;
pub mod mtls;
pub mod runtime;
mod session;
mod timing;
mod verify;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::NoServerSessionStorage;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;

pub use admission::{HandshakeSlots, ListenerLimits, Overflow};
pub use frame::{
    encode_frame, ControlMessage, Frame, FrameDecoder, FrameError, TunnelParams, WireguardKeys,
    MAX_FRAME_LEN, PROTOCOL_VERSION,
};
pub use keys::{
    EspKeyBlock, Role, DEFAULT_ESP_KEY_LEN, LABEL_CLIENT_TO_SERVER, LABEL_SERVER_TO_CLIENT,
    MAX_ESP_KEY_LEN,
};
pub use link::{EspCipher, LinkParams};
pub use mtls::{peer_id, MeshTls, PeerPolicy};
pub use session::{LossReason, PeerSession};
pub use timing::{Backoff, ChannelTiming};
pub use verify::{ChainVerifier, MeshTrust, Refusal, TrustError};

use admission::Slot;
use runtime::TaskDone;
use session::SessionDriver;
use verify::{AllowedPeers, PeerClientVerifier, PeerServerVerifier, SharedTrust, TrustCore};

use crate::spiffe::SpiffeId;
use crate::svid::{spiffe_id_of, SvidError};

/// ALPN protocol name of the channel.
pub const ALPN: &[u8] = b"isthmus-peer/1";

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

/// A peer to dial: its channel endpoint, the SPIFFE ID it must present there, and the
/// link we are configured with for it (announced in our hello, required in its).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEndpoint {
    /// The SPIFFE ID the peer must present (exactly).
    pub id: SpiffeId,
    /// Where its channel listener is.
    pub addr: SocketAddr,
    /// The tunnel kind, ESP cipher and ESN of the link to this peer.
    pub link: LinkParams,
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
        /// The session it came over ([`PeerSession::id`]): a message from a session
        /// that is no longer the peer's current one can be told apart.
        session: u64,
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
    /// This gateway's chain and key: replaced as a whole by
    /// [`ChannelConfig::reload_credentials`]; every handshake uses the one in force.
    credentials: CurrentCredentials,
    trust: SharedTrust,
    provider: Arc<CryptoProvider>,
    /// What the hello announces; replaced by [`ChannelConfig::set_params`]
    /// (a rotated WireGuard key).
    params: RwLock<TunnelParams>,
    timing: ChannelTiming,
    esp_key_len: usize,
    source_address: Option<IpAddr>,
}

impl fmt::Debug for ChannelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelConfig")
            .field("local_id", &self.local_id.to_string())
            .field("chain_len", &self.credentials.current().cert.len())
            .field("trust", &self.trust.current())
            .field("params", &self.params())
            .field("timing", &self.timing)
            .field("esp_key_len", &self.esp_key_len)
            .field("source_address", &self.source_address)
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
        let trust = SharedTrust::new(TrustCore::new(
            trust,
            provider.signature_verification_algorithms,
        )?);
        let certified = certified_key(credentials, &provider)?;
        let config = Self {
            local_id,
            credentials: CurrentCredentials(Arc::new(RwLock::new(Arc::new(certified)))),
            trust,
            provider,
            params: RwLock::new(params),
            timing: ChannelTiming::default(),
            esp_key_len: DEFAULT_ESP_KEY_LEN,
            source_address: None,
        };
        // Building a server config checks that the key matches the leaf.
        config.server_config(Arc::new(RwLock::new(AllowedPeers::default())))?;
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

    /// Dials from this local address (port chosen by the system) instead of the one the
    /// routing table picks.
    pub fn with_source_address(mut self, ip: IpAddr) -> Self {
        self.source_address = Some(ip);
        self
    }

    /// This gateway's SPIFFE ID (from its certificate).
    pub fn local_id(&self) -> &SpiffeId {
        &self.local_id
    }

    /// The tunnel parameters announced in hellos.
    pub fn params(&self) -> TunnelParams {
        self.params
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces what later hellos announce (sessions already up learn a change from a
    /// [`ControlMessage::Params`] the application sends).
    pub fn set_params(&self, params: TunnelParams) {
        *self.params.write().unwrap_or_else(|e| e.into_inner()) = params;
    }

    /// The timeouts and intervals.
    pub fn timing(&self) -> &ChannelTiming {
        &self.timing
    }

    /// Length of the generation-0 ESP keys.
    pub fn esp_key_len(&self) -> usize {
        self.esp_key_len
    }

    /// Replaces the trust bundle and CRLs for every later handshake and
    /// [`ChannelConfig::verify_session`]. On error the trust in force stays.
    pub fn reload_trust(&self, trust: &MeshTrust) -> Result<(), ChannelError> {
        let core = TrustCore::new(trust, self.provider.signature_verification_algorithms)?;
        self.trust.replace(core);
        Ok(())
    }

    /// Replaces this gateway's certificate chain and key for every later handshake
    /// (sessions up now keep theirs). The new leaf must carry this gateway's SPIFFE ID,
    /// match the key, and be valid now under this gateway's own trust in force (bundle,
    /// CRLs: what its peers check it against); otherwise nothing changes.
    pub fn reload_credentials(&self, credentials: LocalCredentials) -> Result<(), ChannelError> {
        let leaf = credentials
            .chain
            .first()
            .ok_or_else(|| ChannelError::Credentials("the certificate chain is empty".into()))?;
        let id = spiffe_id_of(leaf)?;
        if id != self.local_id {
            return Err(ChannelError::Credentials(format!(
                "the new certificate is for {id}, this gateway is {}",
                self.local_id
            )));
        }
        // Peers would refuse it: keep the certificate that works.
        for role in [Role::Dialer, Role::Acceptor] {
            self.verify_peer(&credentials.chain, role, &id, std::time::SystemTime::now())
                .map_err(|refusal| {
                    ChannelError::Credentials(format!(
                        "the new certificate is not valid under this gateway's own trust \
                         bundle and CRLs ({refusal})"
                    ))
                })?;
        }
        let certified = certified_key(credentials, &self.provider)?;
        self.credentials.replace(certified);
        Ok(())
    }

    /// The leaf certificate in use now (for status: serial, validity).
    pub fn current_leaf(&self) -> Option<CertificateDer<'static>> {
        self.credentials.current().cert.first().cloned()
    }

    /// Checks a live session's peer again, as a new handshake would be checked now: its
    /// chain against the trust in force (CRLs, validity at `now`, cluster CAs) and its
    /// SPIFFE ID. A revoked or expired peer gets its [`Refusal`].
    pub fn verify_session(
        &self,
        session: &PeerSession,
        now: std::time::SystemTime,
    ) -> Result<(), Refusal> {
        self.verify_peer(&session.peer_chain(), session.role(), session.peer(), now)
    }

    /// [`ChannelConfig::verify_session`] on a chain kept from a session that may be gone
    /// (`role`: ours in that session).
    pub fn verify_peer(
        &self,
        chain: &[CertificateDer<'static>],
        role: Role,
        peer: &SpiffeId,
        now: std::time::SystemTime,
    ) -> Result<(), Refusal> {
        let (leaf, intermediates) = chain.split_first().ok_or(Refusal::NoClientCertificate)?;
        // The dialer verified the acceptor as a TLS server and vice versa.
        let usage = match role {
            Role::Dialer => webpki::KeyUsage::server_auth(),
            Role::Acceptor => webpki::KeyUsage::client_auth(),
        };
        let now = UnixTime::since_unix_epoch(
            now.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        let presented = self.trust.verify_chain(leaf, intermediates, now, usage)?;
        verify::check_identity(&presented, std::slice::from_ref(peer))
    }

    /// A server config for another mTLS service of this gateway (remote administration):
    /// this gateway's credentials and the trust (bundle and CRLs) in force now, clients
    /// allowed by `policy`, TLS 1.3 only, ALPN `alpn`. Build one per connection to follow
    /// reloads.
    pub fn service_server_config(
        &self,
        policy: mtls::PeerPolicy,
        alpn: &[u8],
    ) -> Result<Arc<ServerConfig>, ChannelError> {
        let verifier = Arc::new(mtls::PolicyClientVerifier {
            trust: self.trust.current(),
            policy,
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ChannelError::Tls)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(self.credentials.clone()));
        config.alpn_protocols = vec![alpn.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
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
            .with_client_cert_resolver(Arc::new(self.credentials.clone()));
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_sni = false;
        Ok(Arc::new(config))
    }

    fn server_config(
        &self,
        allowed: Arc<RwLock<AllowedPeers>>,
    ) -> Result<Arc<ServerConfig>, ChannelError> {
        let verifier = Arc::new(PeerClientVerifier {
            trust: self.trust.clone(),
            allowed,
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ChannelError::Tls)?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(self.credentials.clone()));
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

fn certified_key(
    credentials: LocalCredentials,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, ChannelError> {
    let certified = CertifiedKey::from_der(credentials.chain, credentials.key, provider)
        .map_err(|e| ChannelError::Credentials(e.to_string()))?;
    certified
        .keys_match()
        .map_err(|e| ChannelError::Credentials(format!("the key does not match the leaf: {e}")))?;
    Ok(certified)
}

/// This gateway's chain and key in force, for both TLS roles.
#[derive(Debug, Clone)]
struct CurrentCredentials(Arc<RwLock<Arc<CertifiedKey>>>);

impl CurrentCredentials {
    fn current(&self) -> Arc<CertifiedKey> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, certified: CertifiedKey) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(certified);
    }
}

impl rustls::client::ResolvesClientCert for CurrentCredentials {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for CurrentCredentials {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
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
    /// returns the established session; its later events go to `events`. Blocks the
    /// calling thread (never call it from async code).
    pub fn connect(
        config: &ChannelConfig,
        peer: &PeerEndpoint,
        events: Sender<ChannelEvent>,
    ) -> Result<Established, ChannelError> {
        let (established, driver) = runtime::block_on(handshake::dial(config, peer))??;
        runtime::spawn(driver.run(events))?;
        Ok(established)
    }
}

fn log_outcome(
    role: Role,
    local: Option<SocketAddr>,
    remote: SocketAddr,
    expected: &str,
    result: &Result<(Established, SessionDriver), ChannelError>,
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

/// What a listener has seen since it started (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ListenerStats {
    /// TCP connections accepted.
    pub accepted: u64,
    /// Sessions established.
    pub established: u64,
    /// Handshakes refused (authentication or link parameters).
    pub refused: u64,
    /// Connections closed at once: [`ListenerLimits::max_handshakes`] in flight.
    pub over_total_limit: u64,
    /// Connections closed at once: [`ListenerLimits::max_handshakes_per_source`] in
    /// flight from that address.
    pub over_source_limit: u64,
    /// Handshakes dropped at [`ChannelTiming::handshake_timeout`].
    pub timed_out: u64,
    /// Handshakes that failed otherwise (connection closed, protocol error, ...).
    pub failed: u64,
    /// Handshakes in flight now.
    pub in_flight: usize,
}

#[derive(Debug, Default)]
struct ListenerCounters {
    accepted: AtomicU64,
    established: AtomicU64,
    refused: AtomicU64,
    over_total_limit: AtomicU64,
    over_source_limit: AtomicU64,
    timed_out: AtomicU64,
    failed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What the accept loop and its handshake tasks share with the handle.
#[derive(Debug)]
struct ListenerShared {
    config: Arc<ChannelConfig>,
    tls: Arc<ServerConfig>,
    allowed: Arc<RwLock<AllowedPeers>>,
    slots: Arc<Mutex<HandshakeSlots>>,
    counters: ListenerCounters,
}

impl ListenerShared {
    fn stats(&self) -> ListenerStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ListenerStats {
            accepted: get(&c.accepted),
            established: get(&c.established),
            refused: get(&c.refused),
            over_total_limit: get(&c.over_total_limit),
            over_source_limit: get(&c.over_source_limit),
            timed_out: get(&c.timed_out),
            failed: get(&c.failed),
            in_flight: self
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .in_flight(),
        }
    }

    fn set_allowed_peers(&self, peers: Vec<(SpiffeId, LinkParams)>) {
        *self.allowed.write().unwrap_or_else(PoisonError::into_inner) = AllowedPeers::new(peers);
    }
}

/// Accepting side of the channel.
pub struct ChannelListener {
    listener: TcpListener,
    shared: Arc<ListenerShared>,
}

impl fmt::Debug for ChannelListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelListener")
            .field("local_addr", &self.listener.local_addr().ok())
            .field("local_id", &self.shared.config.local_id.to_string())
            .finish_non_exhaustive()
    }
}

impl ChannelListener {
    /// Binds `addr` and accepts the peers whose SPIFFE IDs are listed in `allowed_peers`,
    /// each with the link this gateway is configured with for it.
    pub fn bind(
        config: Arc<ChannelConfig>,
        addr: SocketAddr,
        allowed_peers: Vec<(SpiffeId, LinkParams)>,
    ) -> Result<Self, ChannelError> {
        let allowed = Arc::new(RwLock::new(AllowedPeers::new(allowed_peers)));
        let tls = config.server_config(allowed.clone())?;
        let listener = TcpListener::bind(addr)?;
        Ok(Self {
            listener,
            shared: Arc::new(ListenerShared {
                config,
                tls,
                allowed,
                slots: Arc::new(Mutex::new(HandshakeSlots::new(ListenerLimits::default()))),
                counters: ListenerCounters::default(),
            }),
        })
    }

    /// Replaces the handshake limits (before [`ChannelListener::spawn`]).
    pub fn with_limits(self, limits: ListenerLimits) -> Self {
        *self
            .shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = HandshakeSlots::new(limits);
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Replaces the set of peers allowed to connect (takes effect for new handshakes).
    pub fn set_allowed_peers(&self, peers: Vec<(SpiffeId, LinkParams)>) {
        self.shared.set_allowed_peers(peers);
    }

    /// Accepts one connection and establishes it (blocking, handshake included; never
    /// call it from async code). No handshake limits apply here.
    pub fn accept(&self, events: Sender<ChannelEvent>) -> Result<Established, ChannelError> {
        let (sock, remote) = self.listener.accept()?;
        sock.set_nonblocking(true)?;
        let shared = &self.shared;
        let (established, driver) = runtime::block_on(async {
            let sock = tokio::net::TcpStream::from_std(sock)?;
            handshake::accept(
                &shared.config,
                shared.tls.clone(),
                &shared.allowed,
                sock,
                remote,
            )
            .await
        })??;
        runtime::spawn(driver.run(events))?;
        Ok(established)
    }

    /// Runs the accept loop on the channel runtime; each handshake and then its session
    /// is a task there. Sends [`ChannelEvent::Established`] and [`ChannelEvent::Refused`].
    pub fn spawn(self, events: Sender<ChannelEvent>) -> Result<ListenerHandle, ChannelError> {
        let local_addr = self.listener.local_addr()?;
        self.listener.set_nonblocking(true)?;
        let handle = runtime::handle()?;
        let listener = {
            let _entered = handle.enter();
            tokio::net::TcpListener::from_std(self.listener)?
        };
        let (stop, stop_rx) = watch::channel(false);
        let shared = self.shared.clone();
        let done = runtime::spawn(accept_loop(listener, shared, events, stop_rx))?;
        Ok(ListenerHandle {
            local_addr,
            shared: self.shared,
            stop,
            done: Some(done),
        })
    }
}

/// At most one warning per interval about connections closed over the limits.
const OVERFLOW_LOG_INTERVAL: Duration = Duration::from_secs(1);

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<ListenerShared>,
    events: Sender<ChannelEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_overflow_log: Option<Instant> = None;
    let mut unlogged_overflows = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            accepted = listener.accept() => accepted,
        };
        let (sock, remote) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a peer channel failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        bump(&shared.counters.accepted);
        let slot = match Slot::take(&shared.slots, remote.ip()) {
            Ok(slot) => slot,
            Err(overflow) => {
                // Closed at once: no TLS work for a connection over the limits.
                drop(sock);
                let limit = match overflow {
                    Overflow::Total => {
                        bump(&shared.counters.over_total_limit);
                        "handshakes in flight"
                    }
                    Overflow::Source => {
                        bump(&shared.counters.over_source_limit);
                        "handshakes in flight from this address"
                    }
                };
                unlogged_overflows += 1;
                let now = Instant::now();
                if last_overflow_log.is_none_or(|t| now.duration_since(t) >= OVERFLOW_LOG_INTERVAL)
                {
                    tracing::warn!(%remote, limit, dropped = unlogged_overflows, "too many peer channel handshakes; connection closed");
                    last_overflow_log = Some(now);
                    unlogged_overflows = 0;
                }
                continue;
            }
        };
        let shared = shared.clone();
        let events = events.clone();
        let task = async move {
            let result = handshake::accept(
                &shared.config,
                shared.tls.clone(),
                &shared.allowed,
                sock,
                remote,
            )
            .await;
            drop(slot);
            match result {
                Ok((established, driver)) => {
                    bump(&shared.counters.established);
                    let _ = events.send(ChannelEvent::Established(Box::new(established)));
                    driver.run(events).await;
                }
                Err(ChannelError::Refused(refusal)) => {
                    bump(&shared.counters.refused);
                    let _ = events.send(ChannelEvent::Refused {
                        remote,
                        role: Role::Acceptor,
                        refusal,
                    });
                }
                Err(ChannelError::Timeout(_)) => bump(&shared.counters.timed_out),
                Err(_) => bump(&shared.counters.failed),
            }
        };
        if let Err(e) = runtime::spawn(task) {
            tracing::warn!(%remote, error = %e, "cannot start a handshake task");
        }
    }
}

/// How long [`ListenerHandle::shutdown`] waits for the accept loop to end.
const LISTENER_STOP_WAIT: Duration = Duration::from_secs(5);

/// A running accept loop; stops when shut down or dropped (established sessions and
/// handshakes already under way go on).
#[derive(Debug)]
pub struct ListenerHandle {
    local_addr: SocketAddr,
    shared: Arc<ListenerShared>,
    stop: watch::Sender<bool>,
    done: Option<TaskDone>,
}

impl ListenerHandle {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the set of peers allowed to connect, each with its link.
    pub fn set_allowed_peers(&self, peers: Vec<(SpiffeId, LinkParams)>) {
        self.shared.set_allowed_peers(peers);
    }

    /// Connections, handshakes and drops so far.
    pub fn stats(&self) -> ListenerStats {
        self.shared.stats()
    }

    /// Stops accepting and waits for the accept loop to end (the socket is closed then).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let _ = self.stop.send(true);
        if let Some(done) = self.done.take() {
            done.wait(LISTENER_STOP_WAIT);
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

/// Keeps a channel to one peer up: dials, and after a failure or a lost session dials
/// again with capped, jittered exponential backoff (reset once a session is
/// established). Sends [`ChannelEvent::Established`] for every session and
/// [`ChannelEvent::Refused`] for every refused attempt. A task on the channel runtime.
#[derive(Debug)]
pub struct PeerLink {
    peer: PeerEndpoint,
    state: Arc<Mutex<LinkState>>,
    stop: watch::Sender<bool>,
    stop_wait: Duration,
    done: Option<TaskDone>,
}

impl PeerLink {
    /// Starts dialing `peer` in the background.
    pub fn spawn(
        config: Arc<ChannelConfig>,
        peer: PeerEndpoint,
        events: Sender<ChannelEvent>,
    ) -> Result<Self, ChannelError> {
        let state = Arc::new(Mutex::new(LinkState::default()));
        let (stop, stop_rx) = watch::channel(false);
        // Long enough for a session to flush its Close frame.
        let stop_wait = config.timing.handshake_timeout + Duration::from_secs(2);
        let done = runtime::spawn(link_loop(
            config,
            peer.clone(),
            state.clone(),
            events,
            stop_rx,
        ))?;
        Ok(Self {
            peer,
            state,
            stop,
            stop_wait,
            done: Some(done),
        })
    }

    /// The peer this link dials.
    pub fn peer(&self) -> &PeerEndpoint {
        &self.peer
    }

    /// The current session, if one is established.
    pub fn current(&self) -> Option<PeerSession> {
        self.lock().current.clone()
    }

    /// Stops reconnecting, closes the current session and waits for the link task.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stop_and_join(&mut self) {
        let current = {
            let mut state = self.lock();
            state.stopped = true;
            state.current.take()
        };
        let _ = self.stop.send(true);
        if let Some(session) = current {
            session.close();
        }
        if let Some(done) = self.done.take() {
            done.wait(self.stop_wait);
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

async fn link_loop(
    config: Arc<ChannelConfig>,
    peer: PeerEndpoint,
    state: Arc<Mutex<LinkState>>,
    events: Sender<ChannelEvent>,
    mut stop: watch::Receiver<bool>,
) {
    let lock = || state.lock().unwrap_or_else(PoisonError::into_inner);
    let mut backoff = Backoff::new(config.timing.backoff_initial, config.timing.backoff_max);
    loop {
        if lock().stopped {
            return;
        }
        let attempt = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            attempt = handshake::dial(&config, &peer) => attempt,
        };
        match attempt {
            Ok((established, driver)) => {
                backoff.reset();
                let session = established.session.clone();
                let stopped = {
                    let mut state = lock();
                    if !state.stopped {
                        state.current = Some(session.clone());
                    }
                    state.stopped
                };
                if stopped {
                    session.close();
                    driver.run(events.clone()).await;
                    return;
                }
                let _ = events.send(ChannelEvent::Established(Box::new(established)));
                driver.run(events.clone()).await;
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
        tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}
