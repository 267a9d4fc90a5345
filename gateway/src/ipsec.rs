//! IPsec peers keyed by IKEv2 (`[peers.esp.ike]`): the gateway runs the key
//! exchange itself, with strongSwan, a firewall or a cloud VPN on the other end.
//!
//! One control thread (no tokio, nothing on the packet path) owns every IKE SA.
//! IKE arrives on the ESP port with the non-ESP marker; the data path hands it
//! over through [`EspCore::receive`] and the thread answers from the same port
//! ([`ControlSender`]). Keys go the other way: an established CHILD_SA becomes
//! an ESP peer ([`PushedKeying`]), the peer's rekeys are installed inbound
//! first and switched to outbound once the peer uses them or deletes the old
//! pair, a deleted pair's inbound SA goes at once. With no CHILD_SA the peer's
//! prefixes have no route: packets are dropped and counted, never sent in clear.

use isthmus_ike::sa::{
    Accepted, ChildSa, Config as IkeConfig, Event, IkeError, Initiator, Prefix, Responder,
};
use isthmus_ike::wire::{exchange, Header, Identification};
use isthmus_tunnel::driver::ControlSender;
use isthmus_tunnel::esp::keying::{PushedKeying, SaPair};
use isthmus_tunnel::esp::sa::{EspCipher, Lifetimes, SaKeys};
use isthmus_tunnel::esp::{ControlDatagram, EspCore, EspPeer, EspPeerConfig};
use isthmus_tunnel::IpPrefix;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Which end starts the IKE SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IkeRole {
    /// This gateway initiates, and again after a failure or a delete.
    Initiator,
    /// This gateway waits for the peer (from the endpoint's address).
    Responder,
}

/// One IPsec peer keyed by IKEv2, as the config gives it.
#[derive(Clone)]
pub struct IkePeerConfig {
    pub name: Option<String>,
    /// The peer's address and IKE/ESP port (a responder answers the port the
    /// peer used).
    pub endpoint: SocketAddr,
    /// The peer's side: the most its traffic selectors may claim.
    pub remote_prefixes: Vec<IpPrefix>,
    /// This side's prefixes, offered as our traffic selectors.
    pub local_prefixes: Vec<IpPrefix>,
    pub role: IkeRole,
    pub psk: Zeroizing<Vec<u8>>,
    /// Where the pre-shared key came from (mode 0600).
    pub psk_file: PathBuf,
    pub local_id: Identification,
    pub remote_id: Identification,
    /// Diffie-Hellman groups, most preferred first.
    pub groups: Vec<u16>,
    /// AES-GCM-16 key sizes, most preferred first.
    pub key_bits: Vec<u16>,
    pub dpd: Option<Duration>,
    pub esn: bool,
    /// The ESP SAs' hard limits (the peer's rekeys replace them before).
    pub lifetimes: Lifetimes,
}

impl std::fmt::Debug for IkePeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IkePeerConfig")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("role", &self.role)
            .field("psk_file", &self.psk_file)
            .field("local_id", &display_id(&self.local_id))
            .field("remote_id", &display_id(&self.remote_id))
            .finish_non_exhaustive()
    }
}

/// ID types (RFC 7296 §3.5).
const ID_IPV4_ADDR: u8 = 1;
const ID_FQDN: u8 = 2;
const ID_RFC822_ADDR: u8 = 3;
const ID_IPV6_ADDR: u8 = 5;

/// An identity as written in the config: an IP address, `user@host` (RFC 822)
/// or a host name (FQDN), as strongSwan reads `id = ...`.
pub fn parse_identity(text: &str) -> Result<Identification, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(match ip {
            IpAddr::V4(a) => Identification {
                id_type: ID_IPV4_ADDR,
                data: a.octets().to_vec(),
            },
            IpAddr::V6(a) => Identification {
                id_type: ID_IPV6_ADDR,
                data: a.octets().to_vec(),
            },
        });
    }
    if text.is_empty()
        || text.len() > 253
        || !text.chars().all(|c| c.is_ascii_graphic())
        || text.contains(['=', ','])
    {
        return Err(format!(
            "`{}` is not an IP address, user@host or host name",
            text.escape_debug()
        ));
    }
    let id_type = if text.contains('@') {
        ID_RFC822_ADDR
    } else {
        ID_FQDN
    };
    Ok(Identification {
        id_type,
        data: text.as_bytes().to_vec(),
    })
}

/// An identity as the status shows it.
pub fn display_id(id: &Identification) -> String {
    match (id.id_type, id.data.len()) {
        (ID_IPV4_ADDR, 4) => {
            let b: [u8; 4] = id.data[..].try_into().unwrap_or_default();
            IpAddr::from(b).to_string()
        }
        (ID_IPV6_ADDR, 16) => {
            let b: [u8; 16] = id.data[..].try_into().unwrap_or_default();
            IpAddr::from(b).to_string()
        }
        (ID_FQDN | ID_RFC822_ADDR, _) => {
            String::from_utf8_lossy(&id.data).escape_debug().to_string()
        }
        (t, _) => format!("type {t}: {}", hex::encode(&id.data)),
    }
}

/// What `isthmusctl status` shows of one IKE peer (never keys).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IkePeerStatus {
    pub peer: String,
    pub role: IkeRole,
    /// `connecting`, `established`, `waiting` (a responder with no IKE SA) or
    /// `down` (an initiator waiting to try again).
    pub state: String,
    pub endpoint: String,
    pub local_id: String,
    pub remote_id: String,
    /// The IKE SA's SPIs (initiator's, responder's), in hex.
    pub ike_spis: Option<(String, String)>,
    /// Seconds since the IKE SA was established.
    pub established_secs: Option<f64>,
    /// The CHILD_SAs in force, oldest first: (inbound SPI, outbound SPI).
    pub child_sas: Vec<(String, String)>,
    /// CHILD_SA rekeys installed since start.
    pub child_rekeys: u64,
    /// IKE SAs established since start.
    pub established: u64,
    /// Seconds since the peer last sent an authenticated message (a request,
    /// or the answer to one of our liveness checks).
    pub last_heard_secs: Option<f64>,
    pub dpd_secs: Option<u64>,
    /// Seconds an ESP SA may be used at most (the peer rekeys before).
    pub esp_hard_lifetime_secs: u64,
    /// Why the last IKE SA ended or failed.
    pub last_error: Option<String>,
}

/// The gateway's IKE: a control thread and the status it publishes.
pub struct IkeService {
    status: Arc<Mutex<Vec<IkePeerStatus>>>,
    stray: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for IkeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IkeService").finish_non_exhaustive()
    }
}

/// IKE datagrams queued between the data path and the control thread.
const INBOX: usize = 256;
/// An initiator tries again this long after a failure, doubling up to
/// [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

impl IkeService {
    /// Starts the control thread for `peers`; IKE on the ESP port goes to it
    /// from now on. `esp_port` is this gateway's ESP port (NAT detection).
    pub fn start(
        core: Arc<EspCore>,
        sender: ControlSender,
        peers: Vec<IkePeerConfig>,
        esp_port: u16,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(INBOX);
        if !core.set_control_inbox(tx) {
            return Err(std::io::Error::other("IKE runs already on this ESP core"));
        }
        let status = Arc::new(Mutex::new(Vec::new()));
        let stray = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut control = Control {
            peers: peers
                .into_iter()
                .map(|cfg| PeerRun::new(cfg, esp_port))
                .collect(),
            core,
            sender,
            status: status.clone(),
            stray: stray.clone(),
        };
        std::thread::Builder::new()
            .name("ike".into())
            .spawn(move || control.run(&rx))?;
        Ok(Self { status, stray })
    }

    pub fn status(&self) -> Vec<IkePeerStatus> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// IKE datagrams from addresses of no IKE peer, or for no IKE SA of theirs.
    pub fn stray(&self) -> u64 {
        self.stray.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// An IKE SA of either role.
enum Sa {
    I(Box<Initiator>),
    R(Box<Responder>),
}

impl Sa {
    fn handle(&mut self, d: &[u8], now: Instant) -> Result<Vec<Event>, IkeError> {
        match self {
            Sa::I(s) => s.handle(d, now),
            Sa::R(s) => s.handle(d, now),
        }
    }
    fn on_timer(&mut self, now: Instant) -> Result<Vec<Event>, IkeError> {
        match self {
            Sa::I(s) => s.on_timer(now),
            Sa::R(s) => s.on_timer(now),
        }
    }
    fn next_timer(&self) -> Option<Instant> {
        match self {
            Sa::I(s) => s.next_timer(),
            Sa::R(s) => s.next_timer(),
        }
    }
    fn spis(&self) -> ([u8; 8], [u8; 8]) {
        match self {
            Sa::I(s) => s.spis(),
            Sa::R(s) => s.spis(),
        }
    }
    fn owns(&self, spi_i: [u8; 8], spi_r: [u8; 8]) -> bool {
        match self {
            Sa::I(s) => s.owns(spi_i, spi_r),
            Sa::R(s) => s.owns(spi_i, spi_r),
        }
    }
    fn is_closed(&self) -> bool {
        match self {
            Sa::I(s) => s.is_closed(),
            Sa::R(s) => s.is_closed(),
        }
    }
    fn is_established(&self) -> bool {
        match self {
            Sa::I(s) => s.is_established(),
            Sa::R(s) => s.is_established(),
        }
    }
    fn heard(&self) -> u64 {
        match self {
            Sa::I(s) => s.heard(),
            Sa::R(s) => s.heard(),
        }
    }
}

/// Which IKE SA of a peer an event came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The one in force (or being set up).
    Current,
    /// A new one the peer started while one was up (it restarted).
    Fresh,
}

struct PeerRun {
    cfg: IkePeerConfig,
    /// Our address as the peer sees it (NAT detection).
    local: SocketAddr,
    /// Where the peer's IKE and ESP go (a responder learns the port).
    remote: SocketAddr,
    current: Option<Sa>,
    fresh: Option<(Sa, SocketAddr)>,
    esp: Option<Arc<EspPeer>>,
    /// CHILD_SAs in force, oldest first: (inbound SPI, outbound SPI).
    pairs: Vec<(u32, u32)>,
    retry_at: Instant,
    backoff: Duration,
    established_at: Option<Instant>,
    heard: (u64, Option<Instant>),
    child_rekeys: u64,
    established: u64,
    last_error: Option<String>,
}

/// This gateway's address toward `to` (a routing lookup; nothing is sent).
fn local_toward(to: SocketAddr, port: u16) -> SocketAddr {
    let any: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let ip = UdpSocket::bind(any)
        .and_then(|s| s.connect(to).and_then(|()| s.local_addr()))
        .map_or(any.ip(), |a| a.ip());
    SocketAddr::new(ip, port)
}

fn to_prefix(p: &IpPrefix) -> Prefix {
    Prefix {
        addr: p.addr(),
        len: p.len(),
    }
}

/// A CHILD_SA's keys as the ESP core takes them (AES-GCM key, then the salt).
fn sa_pair(child: &ChildSa) -> Result<(EspCipher, SaPair), String> {
    let cipher = match child.inbound_key.len() {
        20 => EspCipher::Aes128Gcm,
        36 => EspCipher::Aes256Gcm,
        n => return Err(format!("a CHILD_SA key of {n} bytes")),
    };
    let keys = |spi: u32, key: &[u8]| -> Result<SaKeys, String> {
        let (k, salt) = key.split_at(key.len().saturating_sub(4));
        Ok(SaKeys {
            spi,
            key: Zeroizing::new(k.to_vec()),
            salt: salt.try_into().map_err(|_| "a CHILD_SA key too short")?,
        })
    };
    if child.outbound_key.len() != child.inbound_key.len() {
        return Err("CHILD_SA keys of two sizes".into());
    }
    Ok((
        cipher,
        SaPair {
            outbound: keys(child.outbound_spi, &child.outbound_key)?,
            inbound: keys(child.inbound_spi, &child.inbound_key)?,
        },
    ))
}

impl PeerRun {
    fn new(cfg: IkePeerConfig, esp_port: u16) -> Self {
        Self {
            local: local_toward(cfg.endpoint, esp_port),
            remote: cfg.endpoint,
            cfg,
            current: None,
            fresh: None,
            esp: None,
            pairs: Vec::new(),
            retry_at: Instant::now(),
            backoff: FIRST_RETRY,
            established_at: None,
            heard: (0, None),
            child_rekeys: 0,
            established: 0,
            last_error: None,
        }
    }

    fn name(&self) -> String {
        self.cfg
            .name
            .clone()
            .unwrap_or_else(|| self.cfg.endpoint.to_string())
    }

    fn ike_config(&self, remote: SocketAddr) -> IkeConfig {
        IkeConfig {
            local_id: self.cfg.local_id.clone(),
            remote_id: self.cfg.remote_id.clone(),
            psk: self.cfg.psk.clone(),
            groups: self.cfg.groups.clone(),
            key_bits: self.cfg.key_bits.clone(),
            local_prefixes: self.cfg.local_prefixes.iter().map(to_prefix).collect(),
            remote_prefixes: self.cfg.remote_prefixes.iter().map(to_prefix).collect(),
            local: self.local,
            remote,
            esn: self.cfg.esn,
            dpd: self.cfg.dpd,
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let retry = (self.cfg.role == IkeRole::Initiator && self.current.is_none())
            .then_some(self.retry_at);
        [
            self.current.as_ref().and_then(Sa::next_timer),
            self.fresh.as_ref().and_then(|(s, _)| s.next_timer()),
            retry,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn status(&self, now: Instant) -> IkePeerStatus {
        let state = match &self.current {
            Some(sa) if sa.is_established() => "established",
            Some(_) => "connecting",
            None if self.cfg.role == IkeRole::Responder => "waiting",
            None => "down",
        };
        IkePeerStatus {
            peer: self.name(),
            role: self.cfg.role,
            state: state.into(),
            endpoint: self.remote.to_string(),
            local_id: display_id(&self.cfg.local_id),
            remote_id: display_id(&self.cfg.remote_id),
            ike_spis: self
                .current
                .as_ref()
                .map(|sa| sa.spis())
                .map(|(i, r)| (hex::encode(i), hex::encode(r))),
            established_secs: self
                .established_at
                .map(|t| now.saturating_duration_since(t).as_secs_f64()),
            child_sas: self
                .pairs
                .iter()
                .map(|(i, o)| (format!("{i:#010x}"), format!("{o:#010x}")))
                .collect(),
            child_rekeys: self.child_rekeys,
            established: self.established,
            last_heard_secs: self
                .heard
                .1
                .map(|t| now.saturating_duration_since(t).as_secs_f64()),
            dpd_secs: self.cfg.dpd.map(|d| d.as_secs()),
            esp_hard_lifetime_secs: self.cfg.lifetimes.hard.time.as_secs(),
            last_error: self.last_error.clone(),
        }
    }
}

struct Control {
    peers: Vec<PeerRun>,
    core: Arc<EspCore>,
    sender: ControlSender,
    status: Arc<Mutex<Vec<IkePeerStatus>>>,
    stray: Arc<std::sync::atomic::AtomicU64>,
}

impl Control {
    fn run(&mut self, inbox: &Receiver<ControlDatagram>) {
        loop {
            let now = Instant::now();
            self.timers(now);
            self.publish(now);
            let wait = self
                .peers
                .iter()
                .filter_map(PeerRun::next_timer)
                .min()
                .map_or(Duration::from_secs(1), |t| {
                    t.saturating_duration_since(Instant::now())
                })
                .clamp(Duration::from_millis(5), Duration::from_secs(1));
            match inbox.recv_timeout(wait) {
                Ok(d) => {
                    self.datagram(&d, Instant::now());
                    // Drain what else arrived before running timers again.
                    while let Ok(d) = inbox.try_recv() {
                        self.datagram(&d, Instant::now());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn publish(&self, now: Instant) {
        let doc = self.peers.iter().map(|p| p.status(now)).collect();
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = doc;
    }

    fn stray(&self, why: &str, from: SocketAddr) {
        self.stray
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(%from, "IKE datagram dropped: {why}");
    }

    fn timers(&mut self, now: Instant) {
        for i in 0..self.peers.len() {
            let p = &mut self.peers[i];
            if p.cfg.role == IkeRole::Initiator && p.current.is_none() && now >= p.retry_at {
                let config = p.ike_config(p.cfg.endpoint);
                match Initiator::start(config, now) {
                    Ok((sa, first)) => {
                        tracing::info!(peer = %p.name(), endpoint = %p.cfg.endpoint, "IKE: initiating");
                        p.current = Some(Sa::I(Box::new(sa)));
                        p.remote = p.cfg.endpoint;
                        self.sender.send(p.remote, &first);
                    }
                    Err(e) => {
                        p.last_error = Some(e.to_string());
                        p.retry_at = now + MAX_RETRY;
                    }
                }
            }
            for slot in [Slot::Current, Slot::Fresh] {
                let p = &mut self.peers[i];
                let sa = match slot {
                    Slot::Current => p.current.as_mut(),
                    Slot::Fresh => p.fresh.as_mut().map(|(s, _)| s),
                };
                let Some(sa) = sa else { continue };
                if sa.next_timer().is_some_and(|t| t <= now) {
                    let result = sa.on_timer(now);
                    self.outcome(i, slot, result, now);
                }
            }
        }
    }

    fn datagram(&mut self, d: &ControlDatagram, now: Instant) {
        let Some(i) = self
            .peers
            .iter()
            .position(|p| p.cfg.endpoint.ip() == d.from.ip())
        else {
            return self.stray("from no IKE peer's address", d.from);
        };
        let Ok(header) = Header::decode(&d.bytes) else {
            return self.stray("no IKE header", d.from);
        };
        let matches = |sa: &Sa| sa.owns(header.spi_i, header.spi_r);
        let p = &mut self.peers[i];
        let slot = if p.current.as_ref().is_some_and(matches) {
            Slot::Current
        } else if p.fresh.as_ref().is_some_and(|(s, _)| matches(s)) {
            Slot::Fresh
        } else if p.cfg.role == IkeRole::Responder
            && header.exchange == exchange::IKE_SA_INIT
            && header.from_initiator()
            && !header.is_response()
            && header.spi_r == [0; 8]
        {
            return self.accept(i, d);
        } else {
            return self.stray("for no IKE SA of this peer", d.from);
        };
        let p = &mut self.peers[i];
        let sa = match slot {
            Slot::Current => p.current.as_mut(),
            Slot::Fresh => p.fresh.as_mut().map(|(s, _)| s),
        };
        if let Some(sa) = sa {
            let result = sa.handle(&d.bytes, now);
            self.outcome(i, slot, result, now);
        }
    }

    /// A new IKE SA from a responder peer: it becomes current when there is
    /// none up, or replaces the one up once established (the peer restarted).
    fn accept(&mut self, i: usize, d: &ControlDatagram) {
        let p = &mut self.peers[i];
        match Responder::accept(p.ike_config(d.from), &d.bytes) {
            Ok(Accepted::Sa(sa, answer)) => {
                self.sender.send(d.from, &answer);
                let p = &mut self.peers[i];
                let up = p.current.as_ref().is_some_and(Sa::is_established);
                if up {
                    p.fresh = Some((Sa::R(sa), d.from));
                } else {
                    p.current = Some(Sa::R(sa));
                    p.remote = d.from;
                }
            }
            Ok(Accepted::Answer(bytes)) => self.sender.send(d.from, &bytes),
            Err(e) => {
                p.last_error = Some(format!("IKE_SA_INIT refused: {e}"));
                tracing::info!(peer = %p.name(), error = %e, "IKE_SA_INIT refused");
            }
        }
    }

    /// Applies what an IKE SA gave: datagrams out, keys into the ESP core.
    fn outcome(
        &mut self,
        i: usize,
        slot: Slot,
        result: Result<Vec<Event>, IkeError>,
        now: Instant,
    ) {
        let p = &mut self.peers[i];
        let (sa, to) = match slot {
            Slot::Current => (p.current.as_ref(), p.remote),
            Slot::Fresh => match &p.fresh {
                Some((s, to)) => (Some(s), *to),
                None => (None, p.remote),
            },
        };
        let closed = sa.is_some_and(Sa::is_closed);
        let heard = sa.map_or(0, Sa::heard);
        if slot == Slot::Current && heard != p.heard.0 {
            p.heard = (heard, Some(now));
        }
        match result {
            Ok(events) => {
                for event in events {
                    self.event(i, slot, to, event, now);
                }
            }
            Err(e) if closed => self.closed(i, slot, e.to_string(), now),
            Err(e) => {
                self.stray
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(peer = %p.name(), error = %e, "IKE datagram dropped");
            }
        }
        let p = &mut self.peers[i];
        let still = match slot {
            Slot::Current => p.current.as_ref(),
            Slot::Fresh => p.fresh.as_ref().map(|(s, _)| s),
        };
        if still.is_some_and(Sa::is_closed) {
            self.closed(i, slot, "closed".into(), now);
        }
    }

    fn event(&mut self, i: usize, slot: Slot, to: SocketAddr, event: Event, now: Instant) {
        match event {
            Event::Send(bytes) => self.sender.send(to, &bytes),
            Event::Established(child) => self.established(i, slot, to, &child, now),
            Event::ChildRekeyed(child) => self.rekeyed(i, &child, now),
            Event::ChildDeleted(spi) => self.child_deleted(i, spi),
            Event::Closed(why) => self.closed(i, slot, why, now),
        }
    }

    fn established(&mut self, i: usize, slot: Slot, to: SocketAddr, child: &ChildSa, now: Instant) {
        let p = &mut self.peers[i];
        if slot == Slot::Fresh {
            // The peer started over: its new IKE SA replaces the old one, whose
            // state it has lost.
            if let Some((sa, from)) = p.fresh.take() {
                p.current = Some(sa);
                p.remote = from;
            }
            tracing::info!(peer = %p.name(), "IKE: the peer started a new IKE SA; the old one is gone");
        }
        if let Some(old) = p.esp.take() {
            self.core.remove_peer(&old);
        }
        p.pairs.clear();
        let p = &mut self.peers[i];
        let installed = sa_pair(child).and_then(|(cipher, pair)| {
            let allowed_prefixes = child
                .remote_prefixes
                .iter()
                .map(|x| IpPrefix::new_truncating(x.addr, x.len))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            self.core
                .add_peer(
                    EspPeerConfig {
                        name: p.cfg.name.clone(),
                        endpoint: to,
                        allowed_prefixes,
                        esn: child.esn,
                        lifetimes: p.cfg.lifetimes,
                        keying: Arc::new(PushedKeying::new(cipher, pair)),
                    },
                    now,
                )
                .map_err(|e| e.to_string())
        });
        match installed {
            Ok(peer) => {
                tracing::info!(
                    peer = %p.name(),
                    inbound_spi = format_args!("{:#010x}", child.inbound_spi),
                    outbound_spi = format_args!("{:#010x}", child.outbound_spi),
                    "IKE SA and CHILD_SA established"
                );
                p.esp = Some(peer);
                p.pairs.push((child.inbound_spi, child.outbound_spi));
                p.established_at = Some(now);
                p.established += 1;
                p.backoff = FIRST_RETRY;
                p.last_error = None;
            }
            Err(e) => {
                tracing::warn!(peer = %p.name(), error = %e, "CHILD_SA not installed; IKE SA dropped");
                self.closed(
                    i,
                    Slot::Current,
                    format!("CHILD_SA not installed: {e}"),
                    now,
                );
            }
        }
    }

    fn rekeyed(&mut self, i: usize, child: &ChildSa, now: Instant) {
        let p = &mut self.peers[i];
        let Some(esp) = p.esp.clone() else {
            return;
        };
        let installed = sa_pair(child).and_then(|(cipher, pair)| {
            if cipher != esp.config().keying.cipher() {
                return Err("a rekey to another cipher".into());
            }
            self.core
                .install_pair(&esp, &pair, false, now)
                .map_err(|e| e.to_string())
        });
        match installed {
            Ok(generation) => {
                tracing::info!(
                    peer = %p.name(),
                    inbound_spi = format_args!("{:#010x}", child.inbound_spi),
                    outbound_spi = format_args!("{:#010x}", child.outbound_spi),
                    generation,
                    "CHILD_SA rekeyed by the peer"
                );
                p.pairs.push((child.inbound_spi, child.outbound_spi));
                p.child_rekeys += 1;
            }
            Err(e) => {
                tracing::warn!(peer = %p.name(), error = %e, "rekeyed CHILD_SA not installed");
                p.last_error = Some(format!("rekeyed CHILD_SA not installed: {e}"));
            }
        }
    }

    fn child_deleted(&mut self, i: usize, spi: u32) {
        let p = &mut self.peers[i];
        let Some(esp) = p.esp.clone() else {
            return;
        };
        if p.pairs.last().is_some_and(|(inbound, _)| *inbound == spi) {
            // The pair in force is gone: no tunnel until the next CHILD_SA.
            tracing::info!(peer = %p.name(), spi = format_args!("{spi:#010x}"), "the peer deleted the CHILD_SA in force");
            self.core.remove_peer(&esp);
            p.esp = None;
            p.pairs.clear();
        } else {
            self.core.remove_inbound(&esp, spi);
            p.pairs.retain(|(inbound, _)| *inbound != spi);
        }
    }

    fn closed(&mut self, i: usize, slot: Slot, why: String, now: Instant) {
        let p = &mut self.peers[i];
        if slot == Slot::Fresh {
            if p.fresh.take().is_some() {
                tracing::info!(peer = %p.name(), reason = %why, "new IKE SA from the peer failed");
                p.last_error = Some(why);
            }
            return;
        }
        if p.current.is_none() {
            return;
        }
        tracing::info!(peer = %p.name(), reason = %why, "IKE SA closed");
        p.current = None;
        p.established_at = None;
        p.heard = (0, p.heard.1);
        if let Some(old) = p.esp.take() {
            self.core.remove_peer(&old);
        }
        p.pairs.clear();
        p.last_error = Some(why);
        p.retry_at = now + p.backoff;
        p.backoff = (p.backoff * 2).min(MAX_RETRY);
        // A fresh IKE SA the peer started takes over.
        if let Some((sa, from)) = p.fresh.take() {
            p.current = Some(sa);
            p.remote = from;
        }
    }
}
