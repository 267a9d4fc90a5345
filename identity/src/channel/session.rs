//! One established peer session: the TLS connection, the task on the channel runtime
//! that drives its socket, and the handle the application keeps.
//!
//! After the handshake the rustls connection is driven sans-IO: it lives behind a std
//! mutex that is only ever held for short, non-blocking work (queueing a frame, feeding
//! received bytes, exporting keys, a non-blocking socket write). Application threads
//! ([`PeerSession::send`], [`PeerSession::close`], [`PeerSession::esp_keys`]) never touch
//! the socket and never wait on the network: they queue TLS records and wake the session
//! task, which writes them when the socket is writable, reads when it is readable, and
//! runs the liveness timer.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::frame::{encode_frame, ControlMessage, Frame, FrameDecoder, FrameError};
use super::keys::{self, EspKeyBlock, Role, MAX_ESP_KEY_LEN};
use super::timing::{ChannelTiming, Liveness, LivenessAction, RttProbe};
use super::{ChannelError, ChannelEvent};
use crate::spiffe::SpiffeId;

/// Most TLS bytes queued for a slow peer before [`PeerSession::send`] fails.
const SEND_BUFFER_LIMIT: usize = 1024 * 1024;
/// Socket reads per wake-up before the session task yields to others.
const READS_PER_WAKE: usize = 16;
/// How long a closing session waits for its Close frame and close_notify to leave.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Why an established session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LossReason {
    /// The peer closed the session (Close frame, TLS close_notify or TCP FIN).
    #[error("peer closed the session{}", .reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    PeerClosed {
        /// The reason the peer gave, if any.
        reason: Option<String>,
    },
    /// Nothing was heard from the peer for `missed` ping intervals.
    #[error("no sign of life from the peer for {missed} ping intervals")]
    LivenessTimeout {
        /// Intervals waited.
        missed: u32,
    },
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(String),
    /// TLS failed after the handshake (bad record, unexpected alert, ...).
    #[error("TLS error: {0}")]
    Tls(String),
    /// The peer sent a frame we cannot accept.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// This side closed the session.
    #[error("closed locally")]
    LocalClose,
}

/// Non-blocking std I/O over a tokio socket, for rustls's `read_tls` / `write_tls`:
/// `WouldBlock` means "wait for readiness".
struct TryIo<'a>(&'a TcpStream);

impl Read for TryIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for TryIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Queues one frame on the connection (encrypted into TLS records, not yet written).
fn queue_frame(conn: &mut rustls::Connection, frame: &Frame) -> Result<(), ChannelError> {
    let bytes = encode_frame(frame).map_err(ChannelError::Frame)?;
    conn.writer().write_all(&bytes)?;
    Ok(())
}

/// Writes queued TLS records until done or the socket would block; `Ok(true)` if some are
/// still waiting.
fn write_pending(conn: &mut rustls::Connection, sock: &TcpStream) -> io::Result<bool> {
    while conn.wants_write() {
        match conn.write_tls(&mut TryIo(sock)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// What one round of reading produced.
struct Received {
    /// Some bytes arrived (a sign of life).
    any: bool,
    /// The peer is done sending (close_notify or end of stream).
    finished: bool,
}

/// Reads what the socket has, feeds it to rustls and moves the plaintext into `decoder`.
fn receive(
    conn: &mut rustls::Connection,
    sock: &TcpStream,
    decoder: &mut FrameDecoder,
) -> Result<Received, LossReason> {
    let mut any = false;
    for _ in 0..READS_PER_WAKE {
        match conn.read_tls(&mut TryIo(sock)) {
            Ok(0) => {
                return Ok(Received {
                    any,
                    finished: true,
                })
            }
            Ok(_) => any = true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LossReason::Io(e.to_string())),
        }
        let state = match conn.process_new_packets() {
            Ok(state) => state,
            Err(e) => {
                // Send the alert rustls queued for the peer.
                let _ = write_pending(conn, sock);
                return Err(LossReason::Tls(e.to_string()));
            }
        };
        let readable = state.plaintext_bytes_to_read();
        if readable > 0 {
            let mut plain = vec![0u8; readable];
            match conn.reader().read_exact(&mut plain) {
                Ok(()) => decoder.push(&plain),
                Err(e) => return Err(LossReason::Tls(e.to_string())),
            }
        }
        if state.peer_has_closed() {
            return Ok(Received {
                any,
                finished: true,
            });
        }
    }
    Ok(Received {
        any,
        finished: false,
    })
}

pub(crate) struct SessionState {
    conn: Mutex<rustls::Connection>,
    /// Wakes the session task: records to write, or closing.
    wake: Notify,
    pub(crate) peer: SpiffeId,
    pub(crate) remote: SocketAddr,
    pub(crate) role: Role,
    local_leaf: Option<rustls::pki_types::CertificateDer<'static>>,
    closing: AtomicBool,
    /// A frame could not be queued whole (the peer does not read): the stream is no
    /// longer well framed and the session must end.
    broken: AtomicBool,
    ended: Mutex<Option<LossReason>>,
    ended_cv: Condvar,
    rtt: Mutex<RttProbe>,
    id: u64,
}

/// Numbers sessions within this process.
static NEXT_SESSION_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl SessionState {
    fn lock_conn(&self) -> MutexGuard<'_, rustls::Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn rtt(&self) -> MutexGuard<'_, RttProbe> {
        self.rtt.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn queue(&self, frame: &Frame) -> Result<(), ChannelError> {
        let queued = queue_frame(&mut self.lock_conn(), frame);
        if queued.is_err() {
            self.broken.store(true, Ordering::SeqCst);
        }
        self.wake.notify_one();
        queued
    }

    fn finish(&self, reason: LossReason) {
        let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        if ended.is_none() {
            *ended = Some(reason);
        }
        self.ended_cv.notify_all();
    }
}

/// Handle to an established session (cheap to clone). The session runs until the peer
/// goes away or [`PeerSession::close`] is called; dropping handles does not close it.
#[derive(Clone)]
pub struct PeerSession {
    pub(crate) state: Arc<SessionState>,
}

impl fmt::Debug for PeerSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerSession")
            .field("peer", &self.state.peer.to_string())
            .field("remote", &self.state.remote)
            .field("role", &self.state.role)
            .finish_non_exhaustive()
    }
}

impl PeerSession {
    /// The peer's verified SPIFFE ID.
    pub fn peer(&self) -> &SpiffeId {
        &self.state.peer
    }

    /// The peer's socket address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.state.remote
    }

    /// Whether this side dialed or accepted.
    pub fn role(&self) -> Role {
        self.state.role
    }

    /// This side's leaf certificate in force when the session's handshake began. The
    /// handshake presented this one or, if a reload came in between, a newer one: a
    /// session whose `local_leaf` is not the certificate in force now may still hold
    /// the peer to an older certificate, and is renewed.
    pub fn local_leaf(&self) -> Option<&rustls::pki_types::CertificateDer<'static>> {
        self.state.local_leaf.as_ref()
    }

    /// The certificate chain the peer presented (leaf first).
    pub fn peer_chain(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        self.state
            .lock_conn()
            .peer_certificates()
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    /// When the first certificate of the peer's chain expires (its leaf or a CA above
    /// it): the session must be checked again then.
    pub fn peer_not_after(&self) -> Option<std::time::SystemTime> {
        self.peer_chain()
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .min()
            .map(|t| std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64))
    }

    /// ESP keys of `generation`, `len` bytes per direction (1..=[`MAX_ESP_KEY_LEN`]).
    /// The peer derives the mirror image: its `inbound` is our `outbound`.
    pub fn esp_keys(&self, generation: u64, len: usize) -> Result<EspKeyBlock, ChannelError> {
        if len == 0 || len > MAX_ESP_KEY_LEN {
            return Err(ChannelError::KeyLength(len));
        }
        let conn = self.state.lock_conn();
        keys::derive(&conn, self.state.role, generation, len).map_err(ChannelError::Tls)
    }

    /// 32 bytes both ends of this session derive alike from its TLS exporter for the
    /// WireGuard key announced with `epoch`: what a proof of possession of that key is
    /// bound to, so a proof cannot be replayed in another session or for another epoch.
    pub fn wireguard_key_context(&self, epoch: u64) -> Result<[u8; 32], ChannelError> {
        let conn = self.state.lock_conn();
        let mut out = [0u8; 32];
        conn.export_keying_material(
            &mut out,
            b"EXPORTER-isthmus-wireguard-key-proof",
            Some(&epoch.to_be_bytes()),
        )
        .map_err(ChannelError::Tls)?;
        Ok(out)
    }

    /// Sends an application message to the peer. Never waits on the network: the message
    /// is queued and the session task writes it; fails if more than a megabyte is already
    /// waiting for a peer that does not read.
    pub fn send(&self, message: ControlMessage) -> Result<(), ChannelError> {
        if self.is_closed() {
            return Err(ChannelError::Closed);
        }
        self.state.queue(&Frame::Control(message))
    }

    /// Closes the session: a Close frame and close_notify go to the peer, the session
    /// task ends, and a [`ChannelEvent::Lost`] with [`LossReason::LocalClose`] follows.
    pub fn close(&self) {
        if self.state.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        {
            let mut conn = self.state.lock_conn();
            let _ = queue_frame(
                &mut conn,
                &Frame::Close {
                    reason: "session closed".into(),
                },
            );
            conn.send_close_notify();
        }
        self.state.wake.notify_one();
    }

    /// This session's number, unique within the process (see
    /// [`ChannelEvent::Message`]).
    pub fn id(&self) -> u64 {
        self.state.id
    }

    /// The round-trip time of the last answered liveness ping.
    pub fn rtt(&self) -> Option<Duration> {
        self.state.rtt().last()
    }

    /// Whether the session has ended (or is closing).
    pub fn is_closed(&self) -> bool {
        self.state.closing.load(Ordering::SeqCst)
            || self
                .state
                .ended
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some()
    }

    /// Blocks until the session has ended, and says why.
    pub fn wait_closed(&self) -> LossReason {
        let mut ended = self
            .state
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(reason) = ended.as_ref() {
                return reason.clone();
            }
            ended = self
                .state
                .ended_cv
                .wait(ended)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Like [`PeerSession::wait_closed`], giving up after `timeout`.
    pub fn wait_closed_timeout(&self, timeout: Duration) -> Option<LossReason> {
        let ended = self
            .state
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (ended, _) = self
            .state
            .ended_cv
            .wait_timeout_while(ended, timeout, |e| e.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        ended.clone()
    }
}

/// Everything a freshly established session is made of.
pub(crate) struct SessionStart {
    pub(crate) conn: rustls::Connection,
    pub(crate) sock: TcpStream,
    pub(crate) decoder: FrameDecoder,
    pub(crate) peer: SpiffeId,
    pub(crate) remote: SocketAddr,
    pub(crate) role: Role,
    /// This side's leaf certificate in force when the handshake began.
    pub(crate) local_leaf: Option<rustls::pki_types::CertificateDer<'static>>,
    pub(crate) timing: ChannelTiming,
}

/// The part of a session that runs on the channel runtime. It is started only after the
/// caller has handed out the [`PeerSession`] (e.g. in an `Established` event), so that the
/// session's `Lost` event can never overtake it.
pub(crate) struct SessionDriver {
    state: Arc<SessionState>,
    sock: TcpStream,
    decoder: FrameDecoder,
    timing: ChannelTiming,
}

/// Wraps a freshly established connection into a session handle and its driver.
pub(crate) fn prepare(start: SessionStart) -> (PeerSession, SessionDriver) {
    let SessionStart {
        mut conn,
        sock,
        decoder,
        peer,
        remote,
        role,
        local_leaf,
        timing,
    } = start;
    conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
    let state = Arc::new(SessionState {
        conn: Mutex::new(conn),
        wake: Notify::new(),
        peer,
        remote,
        role,
        local_leaf,
        closing: AtomicBool::new(false),
        broken: AtomicBool::new(false),
        ended: Mutex::new(None),
        ended_cv: Condvar::new(),
        rtt: Mutex::new(RttProbe::default()),
        id: NEXT_SESSION_ID.fetch_add(1, Ordering::Relaxed),
    });
    let session = PeerSession {
        state: state.clone(),
    };
    let driver = SessionDriver {
        state,
        sock,
        decoder,
        timing,
    };
    (session, driver)
}

impl SessionDriver {
    /// Runs the session until it ends, then reports [`ChannelEvent::Lost`].
    pub(crate) async fn run(self, events: Sender<ChannelEvent>) {
        let SessionDriver {
            state,
            sock,
            decoder,
            timing,
        } = self;
        let reason = drive(&state, &sock, decoder, timing, &events).await;
        state.finish(reason.clone());
        if let Ok(sock) = sock.into_std() {
            let _ = sock.shutdown(Shutdown::Both);
        }
        match &reason {
            LossReason::LocalClose | LossReason::PeerClosed { .. } => {
                tracing::info!(peer = %state.peer, remote = %state.remote, reason = %reason, "peer session closed");
            }
            other => {
                tracing::warn!(peer = %state.peer, remote = %state.remote, reason = %other, "peer session lost");
            }
        }
        let _ = events.send(ChannelEvent::Lost {
            peer: state.peer.clone(),
            reason,
        });
    }
}

async fn drive(
    state: &SessionState,
    sock: &TcpStream,
    mut decoder: FrameDecoder,
    timing: ChannelTiming,
    events: &Sender<ChannelEvent>,
) -> LossReason {
    let mut liveness = Liveness::new(Instant::now(), timing.ping_interval, timing.missed_pings);
    loop {
        // Frames already received (including any that arrived with the peer's hello).
        if let Some(reason) = deliver(state, &mut decoder, events) {
            return reason;
        }
        if state.closing.load(Ordering::SeqCst) {
            flush_before_close(state, sock).await;
            return LossReason::LocalClose;
        }
        if state.broken.load(Ordering::SeqCst) {
            return LossReason::Io(format!(
                "more than {SEND_BUFFER_LIMIT} bytes wait for a peer that does not read"
            ));
        }
        match liveness.poll(Instant::now()) {
            LivenessAction::Wait => {}
            LivenessAction::SendPing(seq) => {
                state.rtt().sent(seq, Instant::now());
                if let Err(e) = state.queue(&Frame::Ping { seq }) {
                    return closing_or(state, LossReason::Io(e.to_string()));
                }
            }
            LivenessAction::Dead => {
                return LossReason::LivenessTimeout {
                    missed: timing.missed_pings,
                }
            }
        }
        let blocked = match write_pending(&mut state.lock_conn(), sock) {
            Ok(blocked) => blocked,
            Err(e) => return closing_or(state, LossReason::Io(e.to_string())),
        };
        let deadline = tokio::time::Instant::from_std(liveness.next_deadline());
        tokio::select! {
            ready = sock.readable() => {
                if let Err(e) = ready {
                    return closing_or(state, LossReason::Io(e.to_string()));
                }
                let received = receive(&mut state.lock_conn(), sock, &mut decoder);
                match received {
                    Ok(Received { any, finished }) => {
                        if any {
                            liveness.on_frame(Instant::now());
                        }
                        if finished {
                            // Deliver what came before close_notify / end of stream, then stop.
                            if let Some(reason) = deliver(state, &mut decoder, events) {
                                return reason;
                            }
                            return closing_or(state, LossReason::PeerClosed { reason: None });
                        }
                    }
                    Err(reason) => return closing_or(state, reason),
                }
            }
            ready = sock.writable(), if blocked => {
                if let Err(e) = ready {
                    return closing_or(state, LossReason::Io(e.to_string()));
                }
            }
            () = state.wake.notified() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Handles every complete frame in `decoder`; the loss reason if one ends the session.
fn deliver(
    state: &SessionState,
    decoder: &mut FrameDecoder,
    events: &Sender<ChannelEvent>,
) -> Option<LossReason> {
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => {
                if let Some(reason) = handle_frame(state, frame, events) {
                    return Some(reason);
                }
            }
            Ok(None) => return None,
            Err(e) => return Some(LossReason::Protocol(e.to_string())),
        }
    }
}

/// Gives the Close frame and close_notify a bounded chance to leave.
async fn flush_before_close(state: &SessionState, sock: &TcpStream) {
    let until = tokio::time::Instant::now() + CLOSE_FLUSH;
    loop {
        match write_pending(&mut state.lock_conn(), sock) {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
        if tokio::time::timeout_at(until, sock.writable())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn closing_or(state: &SessionState, reason: LossReason) -> LossReason {
    if state.closing.load(Ordering::SeqCst) {
        LossReason::LocalClose
    } else {
        reason
    }
}

fn handle_frame(
    state: &SessionState,
    frame: Frame,
    events: &Sender<ChannelEvent>,
) -> Option<LossReason> {
    match frame {
        Frame::Ping { seq } => {
            tracing::trace!(peer = %state.peer, seq, "ping");
            if let Err(e) = state.queue(&Frame::Pong { seq }) {
                return Some(closing_or(state, LossReason::Io(e.to_string())));
            }
        }
        Frame::Pong { seq } => {
            let rtt = state.rtt().answered(seq, Instant::now());
            tracing::trace!(peer = %state.peer, seq, ?rtt, "pong");
        }
        Frame::Control(message) => {
            tracing::debug!(peer = %state.peer, kind = control_kind(&message), "control message");
            let _ = events.send(ChannelEvent::Message {
                peer: state.peer.clone(),
                session: state.id,
                message,
            });
        }
        Frame::Close { reason } => {
            return Some(closing_or(
                state,
                LossReason::PeerClosed {
                    reason: Some(super::frame::printable(&reason)),
                },
            ))
        }
        Frame::Hello { .. } => {
            return Some(LossReason::Protocol(
                FrameError::Malformed("second hello".into()).to_string(),
            ))
        }
    }
    None
}

fn control_kind(message: &ControlMessage) -> &'static str {
    match message {
        ControlMessage::Params(_) => "params",
        ControlMessage::Rekey { .. } => "rekey",
        ControlMessage::RekeyAck { .. } => "rekey-ack",
        ControlMessage::ParamsAck { .. } => "params-ack",
    }
}
