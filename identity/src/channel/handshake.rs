//! Setting a session up on the channel runtime: TCP, the TLS handshake (tokio-rustls), and
//! the hello exchange with its checks (protocol version, link parameters), all under one
//! deadline ([`ChannelTiming::handshake_timeout`](super::ChannelTiming)).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};

use super::frame::{self, encode_frame, Frame, FrameDecoder, PROTOCOL_VERSION};
use super::keys::{self, Role};
use super::link::LinkParams;
use super::session::{self, SessionDriver, SessionStart};
use super::verify::{AllowedPeers, Refusal};
use super::{ChannelConfig, ChannelError, Established, PeerEndpoint};
use crate::spiffe::SpiffeId;
use crate::svid::spiffe_id_of;

/// How long a failed handshake drains the socket so the peer reads our alert or Close
/// frame rather than a connection reset.
const ABORT_DRAIN: Duration = Duration::from_millis(250);

/// The stage a handshake is in, for the timeout error.
#[derive(Debug)]
struct Stage(Mutex<&'static str>);

impl Stage {
    fn new(stage: &'static str) -> Self {
        Self(Mutex::new(stage))
    }
    fn set(&self, stage: &'static str) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = stage;
    }
    fn get(&self) -> &'static str {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Maps an I/O error from tokio-rustls back to the TLS error (and refusal) it carries.
fn from_io(err: io::Error) -> ChannelError {
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => ChannelError::from_tls(tls.clone()),
        None => ChannelError::Io(err),
    }
}

/// Dials `peer` (from `config`'s source address, if set) and establishes a session.
pub(crate) async fn dial(
    config: &ChannelConfig,
    peer: &PeerEndpoint,
) -> Result<(Established, SessionDriver), ChannelError> {
    let stage = Stage::new("TCP connect");
    let mut local = None;
    let result = tokio::time::timeout(
        config.timing.handshake_timeout,
        dial_inner(config, peer, &stage, &mut local),
    )
    .await
    .unwrap_or_else(|_| Err(ChannelError::Timeout(stage.get())));
    super::log_outcome(
        Role::Dialer,
        local,
        peer.addr,
        &peer.id.to_string(),
        &result,
    );
    result
}

async fn connect(source: Option<IpAddr>, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

async fn dial_inner(
    config: &ChannelConfig,
    peer: &PeerEndpoint,
    stage: &Stage,
    local: &mut Option<SocketAddr>,
) -> Result<(Established, SessionDriver), ChannelError> {
    // Taken before the handshake: the certificate it presents is this one or a
    // newer one, never an older one (see `PeerSession::local_leaf`).
    let local_leaf = config.current_leaf();
    let sock = connect(config.source_address, peer.addr)
        .await
        .map_err(|source| ChannelError::Connect {
            addr: peer.addr,
            source,
        })?;
    *local = sock.local_addr().ok();
    sock.set_nodelay(true)?;
    stage.set("TLS handshake");
    let connector = TlsConnector::from(config.client_config(&peer.id)?);
    let server_name = ServerName::IpAddress(peer.addr.ip().into());
    let tls = match connector.connect(server_name, sock).into_fallible().await {
        Ok(tls) => tls,
        Err((err, sock)) => {
            drain_and_close(sock).await;
            return Err(from_io(err));
        }
    };
    let presented = presented_id(tls.get_ref().1.peer_certificates())?;
    stage.set("hello exchange");
    hello_exchange(
        config,
        TlsStream::Client(tls),
        presented,
        peer.link,
        peer.addr,
        Role::Dialer,
        local_leaf,
    )
    .await
}

/// Accepts a connection on an accepted socket and establishes a session with one of the
/// `allowed` peers.
pub(crate) async fn accept(
    config: &ChannelConfig,
    tls: Arc<ServerConfig>,
    allowed: &RwLock<AllowedPeers>,
    sock: TcpStream,
    remote: SocketAddr,
) -> Result<(Established, SessionDriver), ChannelError> {
    let local = sock.local_addr().ok();
    let stage = Stage::new("TLS handshake");
    let result = tokio::time::timeout(
        config.timing.handshake_timeout,
        accept_inner(config, tls, allowed, sock, remote, &stage),
    )
    .await
    .unwrap_or_else(|_| Err(ChannelError::Timeout(stage.get())));
    super::log_outcome(Role::Acceptor, local, remote, "a configured peer", &result);
    result
}

async fn accept_inner(
    config: &ChannelConfig,
    tls: Arc<ServerConfig>,
    allowed: &RwLock<AllowedPeers>,
    sock: TcpStream,
    remote: SocketAddr,
    stage: &Stage,
) -> Result<(Established, SessionDriver), ChannelError> {
    let local_leaf = config.current_leaf();
    sock.set_nodelay(true)?;
    let tls = match TlsAcceptor::from(tls).accept(sock).into_fallible().await {
        Ok(tls) => tls,
        Err((err, sock)) => {
            drain_and_close(sock).await;
            return Err(from_io(err));
        }
    };
    let presented = presented_id(tls.get_ref().1.peer_certificates())?;
    // The verifier accepted this identity; the list may have changed since.
    let ours = allowed
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .link(&presented);
    let mut tls = TlsStream::Server(tls);
    let Some(ours) = ours else {
        let refusal = Refusal::UnexpectedPeer {
            presented,
            detail: "no longer a configured peer".into(),
        };
        refuse(&mut tls, &refusal).await;
        return Err(refusal.into());
    };
    stage.set("hello exchange");
    hello_exchange(
        config,
        tls,
        presented,
        ours,
        remote,
        Role::Acceptor,
        local_leaf,
    )
    .await
}

fn presented_id(
    chain: Option<&[rustls::pki_types::CertificateDer<'static>]>,
) -> Result<SpiffeId, ChannelError> {
    let leaf = chain
        .and_then(|chain| chain.first())
        .ok_or(Refusal::NoClientCertificate)?;
    Ok(spiffe_id_of(leaf).map_err(Refusal::NoSpiffeId)?)
}

/// Sends our hello, reads the peer's, checks version and link parameters, and turns the
/// connection into a session.
async fn hello_exchange(
    config: &ChannelConfig,
    mut tls: TlsStream<TcpStream>,
    peer: SpiffeId,
    ours: LinkParams,
    remote: SocketAddr,
    role: Role,
    local_leaf: Option<rustls::pki_types::CertificateDer<'static>>,
) -> Result<(Established, SessionDriver), ChannelError> {
    let mut decoder = FrameDecoder::new();
    let checked = async {
        let hello = encode_frame(&Frame::Hello {
            version: PROTOCOL_VERSION,
            params: config.params(),
            link: Some(ours),
        })
        .map_err(ChannelError::Frame)?;
        tls.write_all(&hello).await.map_err(from_io)?;
        tls.flush().await.map_err(from_io)?;
        let (params, theirs) = read_hello(&mut tls, &mut decoder).await?;
        if theirs != ours {
            return Err(ChannelError::Refused(Refusal::LinkMismatch {
                ours,
                theirs,
            }));
        }
        Ok(params)
    }
    .await;
    let params = match checked {
        Ok(params) => params,
        Err(ChannelError::Refused(refusal @ Refusal::LinkMismatch { .. })) => {
            refuse(&mut tls, &refusal).await;
            return Err(refusal.into());
        }
        Err(e) => {
            let _ = tls.shutdown().await;
            drain(&mut tls).await;
            return Err(e);
        }
    };
    let (sock, conn) = match tls {
        TlsStream::Client(s) => {
            let (sock, conn) = s.into_inner();
            (sock, rustls::Connection::from(conn))
        }
        TlsStream::Server(s) => {
            let (sock, conn) = s.into_inner();
            (sock, rustls::Connection::from(conn))
        }
    };
    let keys = keys::derive(&conn, role, 0, config.esp_key_len).map_err(ChannelError::Tls)?;
    let (session, driver) = session::prepare(SessionStart {
        conn,
        sock,
        decoder,
        peer: peer.clone(),
        remote,
        role,
        local_leaf,
        timing: config.timing,
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
        driver,
    ))
}

async fn read_hello(
    tls: &mut TlsStream<TcpStream>,
    decoder: &mut FrameDecoder,
) -> Result<(super::TunnelParams, LinkParams), ChannelError> {
    let mut buf = [0u8; 4096];
    loop {
        match decoder.next_frame().map_err(ChannelError::Frame)? {
            Some(Frame::Hello {
                version,
                params,
                link,
            }) => {
                if version != PROTOCOL_VERSION {
                    return Err(ChannelError::Version(version));
                }
                let link = link.ok_or_else(|| {
                    ChannelError::Frame(frame::FrameError::Malformed(
                        "hello without link parameters".into(),
                    ))
                })?;
                return Ok((params, link));
            }
            Some(Frame::Close { reason }) => {
                return Err(ChannelError::PeerClosed(frame::printable(&reason)))
            }
            Some(_) => return Err(ChannelError::UnexpectedFrame),
            None => {}
        }
        let n = tls.read(&mut buf).await.map_err(from_io)?;
        if n == 0 {
            return Err(ChannelError::ClosedEarly("hello exchange"));
        }
        decoder.push(&buf[..n]);
    }
}

/// Tells the peer why (Close frame, then close_notify) and closes gracefully.
async fn refuse(tls: &mut TlsStream<TcpStream>, refusal: &Refusal) {
    if let Ok(close) = encode_frame(&Frame::Close {
        reason: refusal.to_string(),
    }) {
        let _ = tls.write_all(&close).await;
    }
    let _ = tls.shutdown().await;
    drain(tls).await;
}

/// Reads and discards for a short while, until the peer closes too.
async fn drain(tls: &mut TlsStream<TcpStream>) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(ABORT_DRAIN, async {
        while matches!(tls.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Half-closes a socket whose TLS failed (the alert is already written) and drains it.
async fn drain_and_close(mut sock: TcpStream) {
    let _ = sock.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(ABORT_DRAIN, async {
        while matches!(sock.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}
