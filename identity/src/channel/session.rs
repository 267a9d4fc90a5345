//! One established peer session: the TLS connection over its TCP socket, the thread that
//! reads from it, and the handle the application keeps.
//!
//! Socket reads happen without holding the connection lock; TLS processing and writes
//! (from any thread) happen under it, so sends never wait for a read timeout.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::frame::{encode_frame, ControlMessage, Frame, FrameDecoder, FrameError};
use super::keys::{self, EspKeyBlock, Role, MAX_ESP_KEY_LEN};
use super::timing::{ChannelTiming, Liveness, LivenessAction};
use super::{ChannelError, ChannelEvent};
use crate::spiffe::SpiffeId;

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

/// The TLS state and the socket it writes to; always used under the lock.
pub(crate) struct SessionIo {
    pub(crate) tls: rustls::Connection,
    pub(crate) sock: TcpStream,
}

impl SessionIo {
    /// Writes all pending TLS records to the socket.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.sock)?;
        }
        self.sock.flush()
    }

    pub(crate) fn send_frame(&mut self, frame: &Frame) -> Result<(), ChannelError> {
        let bytes = encode_frame(frame).map_err(ChannelError::Frame)?;
        self.tls.writer().write_all(&bytes)?;
        self.flush()?;
        Ok(())
    }

    /// Feeds received ciphertext to rustls and moves the plaintext into `decoder`.
    /// Returns `Ok(true)` once the peer has sent close_notify.
    pub(crate) fn receive(
        &mut self,
        mut ciphertext: &[u8],
        decoder: &mut FrameDecoder,
    ) -> Result<bool, rustls::Error> {
        let mut peer_closed = false;
        while !ciphertext.is_empty() {
            let before = ciphertext.len();
            // Fails only when rustls's buffers are full; processing below drains them.
            let read = self.tls.read_tls(&mut ciphertext);
            let state = match self.tls.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    // Send the alert rustls queued for the peer.
                    let _ = self.flush();
                    return Err(e);
                }
            };
            let readable = state.plaintext_bytes_to_read();
            if readable > 0 {
                let mut plain = vec![0u8; readable];
                match self.tls.reader().read_exact(&mut plain) {
                    Ok(()) => decoder.push(&plain),
                    Err(_) => peer_closed = true,
                }
            }
            if state.peer_has_closed() {
                peer_closed = true;
            }
            if read.is_err() && ciphertext.len() == before && readable == 0 {
                // No progress possible: never spin.
                return Err(rustls::Error::General("TLS receive buffer stuck".into()));
            }
        }
        // Alerts, key updates and the like produced by processing.
        let _ = self.flush();
        Ok(peer_closed)
    }
}

pub(crate) struct SessionState {
    pub(crate) io: Mutex<SessionIo>,
    pub(crate) peer: SpiffeId,
    pub(crate) remote: SocketAddr,
    pub(crate) role: Role,
    closing: AtomicBool,
    ended: Mutex<Option<LossReason>>,
    ended_cv: Condvar,
}

impl SessionState {
    fn lock_io(&self) -> std::sync::MutexGuard<'_, SessionIo> {
        self.io.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// ESP keys of `generation`, `len` bytes per direction (1..=[`MAX_ESP_KEY_LEN`]).
    /// The peer derives the mirror image: its `inbound` is our `outbound`.
    pub fn esp_keys(&self, generation: u64, len: usize) -> Result<EspKeyBlock, ChannelError> {
        if len == 0 || len > MAX_ESP_KEY_LEN {
            return Err(ChannelError::KeyLength(len));
        }
        let io = self.state.lock_io();
        keys::derive(&io.tls, self.state.role, generation, len).map_err(ChannelError::Tls)
    }

    /// Sends an application message to the peer.
    pub fn send(&self, message: ControlMessage) -> Result<(), ChannelError> {
        if self.is_closed() {
            return Err(ChannelError::Closed);
        }
        self.state.lock_io().send_frame(&Frame::Control(message))
    }

    /// Closes the session: a Close frame and close_notify go to the peer, the reader
    /// thread ends, and a [`ChannelEvent::Lost`] with [`LossReason::LocalClose`] follows.
    pub fn close(&self) {
        if self.state.closing.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut io = self.state.lock_io();
        let _ = io.send_frame(&Frame::Close {
            reason: "session closed".into(),
        });
        io.tls.send_close_notify();
        let _ = io.flush();
        let _ = io.sock.shutdown(Shutdown::Both);
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
    pub(crate) io: SessionIo,
    pub(crate) read_sock: TcpStream,
    pub(crate) decoder: FrameDecoder,
    pub(crate) peer: SpiffeId,
    pub(crate) remote: SocketAddr,
    pub(crate) role: Role,
    pub(crate) timing: ChannelTiming,
    pub(crate) events: Sender<ChannelEvent>,
}

/// A session whose reader thread has not started yet: the caller first hands out the
/// [`PeerSession`] (e.g. in an `Established` event), so that the session's `Lost` event can
/// never overtake it.
pub(crate) struct PendingReader {
    state: Arc<SessionState>,
    read_sock: TcpStream,
    decoder: FrameDecoder,
    timing: ChannelTiming,
    events: Sender<ChannelEvent>,
}

/// Wraps a freshly established connection into a session handle and its pending reader.
pub(crate) fn prepare(start: SessionStart) -> (PeerSession, PendingReader) {
    let SessionStart {
        io,
        read_sock,
        decoder,
        peer,
        remote,
        role,
        timing,
        events,
    } = start;
    let state = Arc::new(SessionState {
        io: Mutex::new(io),
        peer,
        remote,
        role,
        closing: AtomicBool::new(false),
        ended: Mutex::new(None),
        ended_cv: Condvar::new(),
    });
    let session = PeerSession {
        state: state.clone(),
    };
    let pending = PendingReader {
        state,
        read_sock,
        decoder,
        timing,
        events,
    };
    (session, pending)
}

impl PendingReader {
    /// Starts the reader thread (liveness, incoming frames, the final `Lost` event).
    pub(crate) fn spawn(self) {
        let PendingReader {
            state,
            read_sock,
            decoder,
            timing,
            events,
        } = self;
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let thread_state = state.clone();
        let thread_events = events.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("isthmus-peer-{}", state.remote))
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    let reason =
                        read_loop(&thread_state, read_sock, decoder, timing, &thread_events);
                    end_session(&thread_state, reason, &thread_events);
                })
            });
        if let Err(e) = spawned {
            end_session(
                &state,
                LossReason::Io(format!("cannot start the session thread: {e}")),
                &events,
            );
        }
    }
}

fn end_session(state: &SessionState, reason: LossReason, events: &Sender<ChannelEvent>) {
    state.finish(reason.clone());
    {
        let io = state.lock_io();
        let _ = io.sock.shutdown(Shutdown::Both);
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

fn read_loop(
    state: &SessionState,
    mut sock: TcpStream,
    mut decoder: FrameDecoder,
    timing: ChannelTiming,
    events: &Sender<ChannelEvent>,
) -> LossReason {
    let mut liveness = Liveness::new(Instant::now(), timing.ping_interval, timing.missed_pings);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Frames already received (including any that arrived with the peer's hello).
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Some(reason) = handle_frame(state, frame, events) {
                        return reason;
                    }
                }
                Ok(None) => break,
                Err(e) => return LossReason::Protocol(e.to_string()),
            }
        }
        if state.closing.load(Ordering::SeqCst) {
            return LossReason::LocalClose;
        }
        let now = Instant::now();
        match liveness.poll(now) {
            LivenessAction::Wait => {}
            LivenessAction::SendPing(seq) => {
                if let Err(e) = state.lock_io().send_frame(&Frame::Ping { seq }) {
                    return closing_or(state, LossReason::Io(e.to_string()));
                }
            }
            LivenessAction::Dead => {
                return LossReason::LivenessTimeout {
                    missed: timing.missed_pings,
                }
            }
        }
        let wait = liveness
            .next_deadline()
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if let Err(e) = sock.set_read_timeout(Some(wait)) {
            return closing_or(state, LossReason::Io(e.to_string()));
        }
        match sock.read(&mut buf) {
            Ok(0) => return closing_or(state, LossReason::PeerClosed { reason: None }),
            Ok(n) => {
                liveness.on_frame(Instant::now());
                let received = state.lock_io().receive(&buf[..n], &mut decoder);
                match received {
                    Ok(false) => {}
                    Ok(true) => {
                        // Deliver what came before close_notify, then stop.
                        while let Ok(Some(frame)) = decoder.next_frame() {
                            if let Some(reason) = handle_frame(state, frame, events) {
                                return reason;
                            }
                        }
                        return closing_or(state, LossReason::PeerClosed { reason: None });
                    }
                    Err(e) => return closing_or(state, LossReason::Tls(e.to_string())),
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return closing_or(state, LossReason::Io(e.to_string())),
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
            if let Err(e) = state.lock_io().send_frame(&Frame::Pong { seq }) {
                return Some(closing_or(state, LossReason::Io(e.to_string())));
            }
        }
        Frame::Pong { seq } => tracing::trace!(peer = %state.peer, seq, "pong"),
        Frame::Control(message) => {
            tracing::debug!(peer = %state.peer, kind = control_kind(&message), "control message");
            let _ = events.send(ChannelEvent::Message {
                peer: state.peer.clone(),
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
    }
}
