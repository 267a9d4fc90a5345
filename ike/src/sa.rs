//! IKE SAs (RFC 7296 §1.2, §2), both ends. [`Initiator`]: IKE_SA_INIT (with COOKIE and
//! INVALID_KE_PAYLOAD retries), IKE_AUTH with a pre-shared key and the first CHILD_SA.
//! [`Responder`]: IKE_SA_INIT (a proposal picked, INVALID_KE_PAYLOAD for another group,
//! retransmitted requests answered again), IKE_AUTH (identity and AUTH checked, ESP
//! proposal picked, traffic selectors narrowed to our prefixes). Established, either end
//! answers the peer's liveness checks and deletes, in order, window size 1. Sans-IO:
//! datagrams and `now` in, [`Event`]s out; the driver owns the socket (always
//! UDP-encapsulated: port 4500 with the non-ESP marker, which it adds and strips).
//!
//! The peer's rekeys of the CHILD_SA (CREATE_CHILD_SA, with or without PFS) are answered
//! with a new SA pair ([`Event::ChildRekeyed`]); the old pair goes when the peer deletes it.
//!
//! Not yet here (see the crate docs): certificate AUTH in the exchange itself, rekeys of
//! the IKE SA (answered NO_ADDITIONAL_SAS), rekeys and
//! deletes of our own and their collisions, and sending fragments. Our own liveness
//! checks are here ([`Config::dpd`]).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use crate::crypto::{self, CryptoError, IkeKeys, KeyExchange, Reassembly, SkCipher};
use crate::wire::{
    self, exchange, flags, Header, Identification, Message, Notify, Payload, Proposal,
    TrafficSelector, Transform, WireError,
};

/// Notify message types used here (RFC 7296 §3.10.1, RFC 7383).
pub mod notify {
    /// The peer does not know a critical payload.
    pub const UNSUPPORTED_CRITICAL_PAYLOAD: u16 = 1;
    /// No proposal was acceptable.
    pub const NO_PROPOSAL_CHOSEN: u16 = 14;
    /// The KE payload's group is not the one the responder wants (data: that group).
    pub const INVALID_KE_PAYLOAD: u16 = 17;
    /// The AUTH payload did not verify.
    pub const AUTHENTICATION_FAILED: u16 = 24;
    /// No CHILD_SA can be added.
    pub const NO_ADDITIONAL_SAS: u16 = 35;
    /// The traffic selectors are not acceptable.
    pub const TS_UNACCEPTABLE: u16 = 38;
    /// Try again later.
    pub const TEMPORARY_FAILURE: u16 = 43;
    /// The sender has no other IKE SA with the receiver.
    pub const INITIAL_CONTACT: u16 = 16384;
    /// NAT detection: hash of the sender's address.
    pub const NAT_DETECTION_SOURCE_IP: u16 = 16388;
    /// NAT detection: hash of the receiver's address.
    pub const NAT_DETECTION_DESTINATION_IP: u16 = 16389;
    /// A stateless cookie to echo.
    pub const COOKIE: u16 = 16390;
    /// RFC 7383 fragmentation supported.
    pub const IKEV2_FRAGMENTATION_SUPPORTED: u16 = 16430;
    /// RFC 7427 §4: the hash algorithms this end takes in digital signature AUTH.
    pub const SIGNATURE_HASH_ALGORITHMS: u16 = 16431;
    /// The CHILD_SA a CREATE_CHILD_SA replaces (its SPI: the sender's inbound one).
    pub const REKEY_SA: u16 = 16393;
    /// The CHILD_SA named is not known.
    pub const CHILD_SA_NOT_FOUND: u16 = 44;
    /// The message is malformed.
    pub const INVALID_SYNTAX: u16 = 7;
}

/// Protocol IDs.
const PROTO_IKE: u8 = 1;
const PROTO_ESP: u8 = 3;
/// Transform types.
const ENCR: u8 = 1;
const PRF: u8 = 2;
const INTEG: u8 = 3;
const DH: u8 = 4;
const ESN: u8 = 5;

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IkeError {
    /// The datagram is not an IKEv2 message.
    #[error("malformed message: {0}")]
    Wire(#[from] WireError),
    /// Its encrypted payload did not open.
    #[error("{0}")]
    Crypto(#[from] CryptoError),
    /// The peer answered with an error notification.
    #[error("the peer refused: {name} ({code})")]
    Refused {
        /// Notify message type.
        code: u16,
        /// Its name.
        name: &'static str,
    },
    /// The peer's answer breaks the protocol or our policy.
    #[error("{0}")]
    Protocol(String),
    /// The peer's AUTH payload does not verify with the pre-shared key.
    #[error("the peer's AUTH does not verify (wrong pre-shared key or identity)")]
    AuthenticationFailed,
    /// The peer did not answer.
    #[error("no answer after {0} transmissions")]
    Timeout(u32),
}

fn notify_name(code: u16) -> &'static str {
    match code {
        notify::UNSUPPORTED_CRITICAL_PAYLOAD => "UNSUPPORTED_CRITICAL_PAYLOAD",
        4 => "INVALID_IKE_SPI",
        5 => "INVALID_MAJOR_VERSION",
        notify::INVALID_SYNTAX => "INVALID_SYNTAX",
        9 => "INVALID_MESSAGE_ID",
        11 => "INVALID_SPI",
        notify::NO_PROPOSAL_CHOSEN => "NO_PROPOSAL_CHOSEN",
        notify::INVALID_KE_PAYLOAD => "INVALID_KE_PAYLOAD",
        notify::AUTHENTICATION_FAILED => "AUTHENTICATION_FAILED",
        34 => "SINGLE_PAIR_REQUIRED",
        notify::NO_ADDITIONAL_SAS => "NO_ADDITIONAL_SAS",
        36 => "INTERNAL_ADDRESS_FAILURE",
        37 => "FAILED_CP_REQUIRED",
        notify::TS_UNACCEPTABLE => "TS_UNACCEPTABLE",
        39 => "INVALID_SELECTORS",
        notify::TEMPORARY_FAILURE => "TEMPORARY_FAILURE",
        44 => "CHILD_SA_NOT_FOUND",
        _ => "error notification",
    }
}

/// An IP prefix (address with its host bits clear, and a length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Prefix {
    fn last(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let host = u32::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) | host).into())
            }
            IpAddr::V6(a) => {
                let host = u128::MAX.checked_shr(u32::from(self.len)).unwrap_or(0);
                IpAddr::V6((u128::from(a) | host).into())
            }
        }
    }

    fn selector(&self) -> TrafficSelector {
        TrafficSelector::Range {
            protocol: 0,
            start_port: 0,
            end_port: 65535,
            start: self.addr,
            end: self.last(),
        }
    }

    /// The prefix a range is, if it is exactly one.
    fn of_range(start: IpAddr, end: IpAddr) -> Option<Self> {
        let (s, e, bits) = match (start, end) {
            (IpAddr::V4(s), IpAddr::V4(e)) => {
                (u128::from(u32::from(s)), u128::from(u32::from(e)), 32)
            }
            (IpAddr::V6(s), IpAddr::V6(e)) => (u128::from(s), u128::from(e), 128),
            _ => return None,
        };
        let span = e.checked_sub(s)?;
        let host_bits = 128 - span.leading_zeros();
        if span.checked_add(1).is_some_and(|n| !n.is_power_of_two()) && span != u128::MAX {
            return None;
        }
        let mask = if host_bits >= 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        if s & mask != 0 {
            return None;
        }
        let len = u8::try_from(bits - host_bits.min(bits)).ok()?;
        Some(Self { addr: start, len })
    }

    fn contains(&self, start: IpAddr, end: IpAddr) -> bool {
        let (lo, hi) = (self.addr, self.last());
        match (lo, hi, start, end) {
            (IpAddr::V4(lo), IpAddr::V4(hi), IpAddr::V4(s), IpAddr::V4(e)) => {
                lo <= s && s <= e && e <= hi
            }
            (IpAddr::V6(lo), IpAddr::V6(hi), IpAddr::V6(s), IpAddr::V6(e)) => {
                lo <= s && s <= e && e <= hi
            }
            _ => false,
        }
    }
}

/// What the initiator needs.
pub struct Config {
    /// This end's identity (sent as IDi).
    pub local_id: Identification,
    /// The identity the peer must present as IDr (also sent, as a hint).
    pub remote_id: Identification,
    /// The pre-shared key (unused when `certificates` is set).
    pub psk: Zeroizing<Vec<u8>>,
    /// Authenticate with certificates (RFC 7427 signatures) instead of the key: this
    /// end's chain and signer, and the judge of the peer's chain and identity.
    /// `local_id` is then our certificate's subject DN.
    pub certificates: Option<std::sync::Arc<dyn Certificates>>,
    /// Diffie-Hellman groups, most preferred first (19, 20, 31).
    pub groups: Vec<u16>,
    /// AES-GCM-16 key sizes in bits, most preferred first (256, 128).
    pub key_bits: Vec<u16>,
    /// Our side's prefixes (TSi).
    pub local_prefixes: Vec<Prefix>,
    /// The peer's side's prefixes (TSr).
    pub remote_prefixes: Vec<Prefix>,
    /// Our address and port as the peer sees them (NAT detection).
    pub local: SocketAddr,
    /// The peer's address and port.
    pub remote: SocketAddr,
    /// Offer extended sequence numbers for the CHILD_SA (both ESN and no ESN are offered,
    /// ESN first, when set; only no ESN otherwise).
    pub esn: bool,
    /// Once established, ask the peer whether it is alive this often (an empty
    /// INFORMATIONAL request, RFC 7296 §2.4); with no answer after [`TRANSMISSIONS`]
    /// transmissions the IKE SA is closed. `None`: never.
    pub dpd: Option<Duration>,
}

impl Config {
    fn check(&self) -> Result<(), IkeError> {
        if self.groups.iter().any(|g| !crypto::supported_group(*g)) || self.groups.is_empty() {
            return Err(IkeError::Protocol(
                "Diffie-Hellman groups: 19, 20 or 31".into(),
            ));
        }
        if self.key_bits.is_empty() || self.key_bits.iter().any(|b| !matches!(b, 128 | 256)) {
            return Err(IkeError::Protocol("AES-GCM key sizes: 128 or 256".into()));
        }
        if self.local_prefixes.is_empty() || self.remote_prefixes.is_empty() {
            return Err(IkeError::Protocol(
                "traffic selectors: at least one prefix each".into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("local_id", &self.local_id)
            .field("remote_id", &self.remote_id)
            .field("psk", &"<redacted>")
            .field("certificates", &self.certificates.is_some())
            .field("groups", &self.groups)
            .field("local_prefixes", &self.local_prefixes)
            .field("remote_prefixes", &self.remote_prefixes)
            .finish_non_exhaustive()
    }
}

/// Certificate authentication (RFC 7427 digital signatures): what this end holds and how
/// it judges the peer's certificates. The PKI (chain, validity, revocation, names) stays
/// with the caller; this crate carries the certificates and checks the signature.
pub trait Certificates: Send + Sync {
    /// Our chain, DER, leaf first (sent as CERT payloads).
    fn chain(&self) -> Vec<Vec<u8>>;
    /// Signs `octets`: the AUTH data of method 14 (AlgorithmIdentifier length,
    /// AlgorithmIdentifier, signature).
    fn sign(&self, octets: &[u8]) -> Result<Vec<u8>, String>;
    /// Judges the peer's chain (leaf first) and the identity it claims: on acceptance,
    /// the leaf's public key (an uncompressed EC point).
    fn verify(&self, chain: &[Vec<u8>], id: &Identification) -> Result<Vec<u8>, String>;
    /// CERTREQ data: SHA-1 hashes of our trust anchors' SubjectPublicKeyInfo.
    fn authorities(&self) -> Vec<u8>;
}

/// Our ESP proposal for a CHILD_SA whose inbound SPI is `inbound_spi`.
fn esp_proposal(config: &Config, inbound_spi: u32) -> Proposal {
    let mut transforms: Vec<Transform> = config
        .key_bits
        .iter()
        .map(|b| Transform::with_key_length(ENCR, crypto::ENCR_AES_GCM_16, *b))
        .collect();
    if config.esn {
        transforms.push(Transform::new(ESN, 1));
    }
    transforms.push(Transform::new(ESN, 0));
    Proposal {
        number: 1,
        protocol: PROTO_ESP,
        spi: inbound_spi.to_be_bytes().to_vec(),
        transforms,
    }
}

/// SIGNATURE_HASH_ALGORITHMS data: SHA2-256 and SHA2-384 (RFC 7427 §7), the ones
/// [`crypto::verify_signature_auth`] takes.
const SIGNATURE_HASHES: [u8; 4] = [0, 2, 0, 3];

/// Certificate encoding: X.509 certificate, signature (RFC 7296 §3.6).
const CERT_X509_SIGNATURE: u8 = 4;

/// Our AUTH payload over `octets`, with our CERT payloads before it when we
/// authenticate with certificates.
fn our_auth(config: &Config, octets: &[u8]) -> Result<Vec<Payload>, IkeError> {
    let Some(c) = &config.certificates else {
        return Ok(vec![Payload::Auth {
            method: crypto::AUTH_SHARED_KEY,
            data: crypto::psk_auth(&config.psk, octets).to_vec(),
        }]);
    };
    let mut out: Vec<Payload> = c
        .chain()
        .into_iter()
        .map(|data| Payload::Cert {
            encoding: CERT_X509_SIGNATURE,
            data,
        })
        .collect();
    let data = c.sign(octets).map_err(IkeError::Protocol)?;
    out.push(Payload::Auth {
        method: crypto::AUTH_DIGITAL_SIGNATURE,
        data,
    });
    Ok(out)
}

/// Whether the peer proved the identity `id` over `octets`: with the pre-shared key
/// and the configured identity, or with certificates its caller accepts and a
/// signature by the leaf's key.
fn peer_proved(
    config: &Config,
    payloads: &[Payload],
    id: &Identification,
    method: u8,
    data: &[u8],
    octets: &[u8],
) -> Result<(), String> {
    let Some(c) = &config.certificates else {
        // Identity and key alike, with no short cut: a prober learns nothing of which
        // failed.
        let expected = crypto::psk_auth(&config.psk, octets);
        let ok = (*id == config.remote_id)
            & (method == crypto::AUTH_SHARED_KEY)
            & crypto::equal(&expected, data);
        return if ok {
            Ok(())
        } else {
            Err("wrong pre-shared key or identity".into())
        };
    };
    if method != crypto::AUTH_DIGITAL_SIGNATURE && method != crypto::AUTH_ECDSA_SHA256_P256 {
        return Err(format!("AUTH method {method}, not a digital signature"));
    }
    let chain: Vec<Vec<u8>> = payloads
        .iter()
        .filter_map(|p| match p {
            Payload::Cert {
                encoding: CERT_X509_SIGNATURE,
                data,
            } => Some(data.clone()),
            _ => None,
        })
        .collect();
    if chain.is_empty() {
        return Err("no certificate".into());
    }
    let point = c.verify(&chain, id)?;
    if method == crypto::AUTH_ECDSA_SHA256_P256 {
        return crypto::verify_ecdsa_p256(&point, octets, data).map_err(|e| e.to_string());
    }
    crypto::verify_signature_auth(&point, octets, data).map_err(|e| e.to_string())
}

/// A CHILD_SA's ESP parameters, as the data path takes them.
pub struct ChildSa {
    /// The SPI the peer sends to (ours).
    pub inbound_spi: u32,
    /// The SPI we send to (the peer's).
    pub outbound_spi: u32,
    /// AES-GCM key and 4-byte salt of inbound packets.
    pub inbound_key: Zeroizing<Vec<u8>>,
    /// AES-GCM key and 4-byte salt of outbound packets.
    pub outbound_key: Zeroizing<Vec<u8>>,
    /// Extended sequence numbers negotiated.
    pub esn: bool,
    /// Our side's prefixes, as narrowed by the responder.
    pub local_prefixes: Vec<Prefix>,
    /// The peer's side's prefixes.
    pub remote_prefixes: Vec<Prefix>,
    /// A rekey of ours ([`Initiator::rekey_child`]): the peer has the new pair already,
    /// so it may be used outbound at once.
    pub rekeyed_by_us: bool,
}

impl std::fmt::Debug for ChildSa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSa")
            .field("inbound_spi", &format_args!("{:08x}", self.inbound_spi))
            .field("outbound_spi", &format_args!("{:08x}", self.outbound_spi))
            .field("esn", &self.esn)
            .field("local_prefixes", &self.local_prefixes)
            .field("remote_prefixes", &self.remote_prefixes)
            .finish_non_exhaustive()
    }
}

/// What handling a datagram or a timer gave.
#[derive(Debug)]
pub enum Event {
    /// Send this datagram to the peer.
    Send(Vec<u8>),
    /// The IKE SA and its first CHILD_SA are up.
    Established(ChildSa),
    /// The peer rekeyed the CHILD_SA (CREATE_CHILD_SA): install this one inbound; the
    /// one it replaces goes when the peer deletes it ([`Event::ChildDeleted`]).
    ChildRekeyed(ChildSa),
    /// The peer deleted the CHILD_SA with this inbound SPI of ours.
    ChildDeleted(u32),
    /// The IKE SA is gone (deleted by the peer, or failed); nothing more will be sent.
    Closed(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InitSent,
    AuthSent,
    Established,
    Closed,
}

/// Inner payload bytes per fragment: with the IKE, SKF, IV and ICV overhead and the
/// UDP, IP and non-ESP marker ones, each fragment stays within a 1280-byte IP packet.
pub const FRAGMENT_DATA: usize = 1100;

/// First retransmission delay; doubled each time (RFC 7296 §2.1).
pub const RETRANSMIT_BASE: Duration = Duration::from_millis(500);
/// Transmissions of a request before giving up.
pub const TRANSMISSIONS: u32 = 5;
/// COOKIE and INVALID_KE_PAYLOAD answers followed before giving up.
pub const MAX_INIT_RETRIES: u8 = 3;

/// An IKE SA this end initiates.
pub struct Initiator {
    config: Config,
    rng: ring::rand::SystemRandom,
    state: State,
    spi_i: [u8; 8],
    spi_r: [u8; 8],
    ni: Vec<u8>,
    nr: Vec<u8>,
    ke: Option<KeyExchange>,
    cookie: Option<Vec<u8>>,
    /// IKE_SA_INIT request as last sent (our AUTH signs it).
    init_request: Vec<u8>,
    /// IKE_SA_INIT response as received (the responder's AUTH signs it).
    init_response: Vec<u8>,
    /// COOKIE and INVALID_KE_PAYLOAD retries so far.
    init_retries: u8,
    keys: Option<IkeKeys>,
    keyed: Option<Keyed>,
    key_bytes: usize,
    /// Our next request's Message ID.
    next_id: u32,
    /// The request in flight: (bytes, sent at, transmissions).
    /// The request in flight (one datagram, or its fragments), when sent, transmissions.
    in_flight: Option<(Vec<Vec<u8>>, Instant, u32)>,
    child: Child,
    /// An error the responder sent in clear to our IKE_SA_INIT (see `on_init_response`).
    refused_hint: Option<u16>,
}

impl std::fmt::Debug for Initiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Initiator")
            .field("state", &self.state)
            .field("spi_i", &hex8(&self.spi_i))
            .field("spi_r", &hex8(&self.spi_r))
            .finish_non_exhaustive()
    }
}

fn hex8(b: &[u8; 8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn random<const N: usize>(rng: &dyn SecureRandom) -> Result<[u8; N], IkeError> {
    let mut out = [0u8; N];
    rng.fill(&mut out)
        .map_err(|_| IkeError::Crypto(CryptoError::Random))?;
    Ok(out)
}

/// SHA-1 of SPIi | SPIr | address | port (RFC 7296 §2.23).
fn nat_hash(spi_i: &[u8; 8], spi_r: &[u8; 8], addr: SocketAddr) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(spi_i);
    ctx.update(spi_r);
    match addr.ip() {
        IpAddr::V4(a) => ctx.update(&a.octets()),
        IpAddr::V6(a) => ctx.update(&a.octets()),
    }
    ctx.update(&addr.port().to_be_bytes());
    ctx.finish().as_ref().to_vec()
}

fn status(kind: u16, data: Vec<u8>) -> Payload {
    Payload::Notify(Notify {
        protocol: 0,
        spi: Vec::new(),
        kind,
        data,
    })
}

/// The SA, KE (group, public value) and Nonce of an IKE_SA_INIT `what` (request or
/// response); an unknown critical payload refuses it.
#[allow(clippy::type_complexity)]
fn init_payloads<'m>(
    message: &'m Message,
    what: &str,
) -> Result<(&'m [Proposal], (u16, &'m [u8]), &'m [u8]), IkeError> {
    let mut sa = None;
    let mut ke = None;
    let mut nonce = None;
    for p in &message.payloads {
        match p {
            Payload::Sa(ps) => sa = Some(ps.as_slice()),
            Payload::Ke { group, data } => ke = Some((*group, data.as_slice())),
            Payload::Nonce(n) => nonce = Some(n.as_slice()),
            Payload::Unknown {
                critical: true,
                kind,
                ..
            } => {
                return Err(IkeError::Protocol(format!(
                    "unknown critical payload type {kind}"
                )))
            }
            _ => {}
        }
    }
    let (Some(sa), Some(ke), Some(nonce)) = (sa, ke, nonce) else {
        return Err(IkeError::Protocol(format!(
            "IKE_SA_INIT {what} without SA, KE or Nonce"
        )));
    };
    if !(16..=256).contains(&nonce.len()) {
        return Err(IkeError::Protocol("nonce of a bad length".into()));
    }
    Ok((sa, ke, nonce))
}

fn first_error(payloads: &[Payload]) -> Option<u16> {
    payloads.iter().find_map(|p| match p {
        Payload::Notify(n) if n.kind < 16384 => Some(n.kind),
        _ => None,
    })
}

impl Initiator {
    /// Starts an IKE SA: returns the initiator and the IKE_SA_INIT request to send.
    pub fn start(config: Config, now: Instant) -> Result<(Self, Vec<u8>), IkeError> {
        config.check()?;
        let rng = ring::rand::SystemRandom::new();
        let spi_i = random::<8>(&rng)?;
        let ni = random::<32>(&rng)?.to_vec();
        let inbound_spi = u32::from_be_bytes(random::<4>(&rng)?) | 0x0000_0100;
        let mut this = Self {
            ke: Some(KeyExchange::new(config.groups[0], &rng)?),
            config,
            rng,
            state: State::InitSent,
            spi_i,
            spi_r: [0; 8],
            ni,
            nr: Vec::new(),
            cookie: None,
            init_request: Vec::new(),
            init_response: Vec::new(),
            init_retries: 0,
            keys: None,
            keyed: None,
            key_bytes: 0,
            next_id: 0,
            in_flight: None,
            child: Child {
                inbound_spi,
                ..Child::default()
            },
            refused_hint: None,
        };
        let request = this.init_request()?;
        this.in_flight = Some((vec![request.clone()], now, 1));
        Ok((this, request))
    }

    /// The IKE SA's SPIs (initiator's, responder's; the latter zero until it answered);
    /// after a rekey of the IKE SA, the new one's.
    pub fn spis(&self) -> ([u8; 8], [u8; 8]) {
        match &self.keyed {
            Some(k) if self.state == State::Established => (k.spi_i, k.spi_r),
            _ => (self.spi_i, self.spi_r),
        }
    }

    /// Whether a datagram with these SPIs is for this IKE SA (or the one a rekey
    /// replaced, until it is deleted).
    pub fn owns(&self, spi_i: [u8; 8], spi_r: [u8; 8]) -> bool {
        spi_i == self.spi_i || self.keyed.as_ref().is_some_and(|k| k.owns(spi_i, spi_r))
    }

    /// Whether the IKE SA is established.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Whether the IKE SA is gone (failed, given up or deleted): nothing more will
    /// come of it, and an error it returned was its last word.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Ends the IKE SA from our side: once established, a delete for the peer (sent
    /// once), then [`Event::ChildDeleted`] for each CHILD_SA and [`Event::Closed`].
    pub fn close(&mut self, why: &str) -> Vec<Event> {
        if self.state == State::Closed {
            return Vec::new();
        }
        let mut events = Vec::new();
        if self.state == State::Established {
            if let Some(Ok(bytes)) = self.keyed.as_mut().map(Keyed::delete_request) {
                events.push(Event::Send(bytes));
            }
        }
        self.state = State::Closed;
        self.in_flight = None;
        events.extend(self.child.gone());
        events.push(Event::Closed(why.to_string()));
        events
    }

    /// Rekeys the CHILD_SA ourselves (RFC 7296 §1.3.3, no PFS): once the peer answers,
    /// [`Event::ChildRekeyed`] (with `rekeyed_by_us`: use it outbound at once), then our
    /// delete of the old pair, whose end gives [`Event::ChildDeleted`]. Nothing (try
    /// later) while another request of ours or a rekey is under way; a refusal (the
    /// peer rekeys at the same time) leaves the pair in force.
    pub fn rekey_child(&mut self, now: Instant) -> Result<Vec<Event>, IkeError> {
        if self.state != State::Established {
            return Ok(Vec::new());
        }
        let (Some(keyed), config) = (self.keyed.as_mut(), &self.config) else {
            return Ok(Vec::new());
        };
        keyed.start_rekey(&mut self.child, config, now)
    }

    /// Authenticated messages from the peer since the IKE SA was keyed (its
    /// requests, and answers to ours such as liveness checks).
    pub fn heard(&self) -> u64 {
        self.keyed.as_ref().map_or(0, |k| k.heard)
    }

    fn ike_proposal(&self) -> Proposal {
        let mut transforms: Vec<Transform> = self
            .config
            .key_bits
            .iter()
            .map(|b| Transform::with_key_length(ENCR, crypto::ENCR_AES_GCM_16, *b))
            .collect();
        transforms.push(Transform::new(PRF, crypto::PRF_HMAC_SHA2_256));
        transforms.extend(self.config.groups.iter().map(|g| Transform::new(DH, *g)));
        Proposal {
            number: 1,
            protocol: PROTO_IKE,
            spi: Vec::new(),
            transforms,
        }
    }

    fn init_request(&mut self) -> Result<Vec<u8>, IkeError> {
        let ke = self
            .ke
            .as_ref()
            .ok_or_else(|| IkeError::Protocol("no key exchange".into()))?;
        let mut payloads = Vec::new();
        if let Some(cookie) = &self.cookie {
            payloads.push(status(notify::COOKIE, cookie.clone()));
        }
        payloads.push(Payload::Sa(vec![self.ike_proposal()]));
        payloads.push(Payload::Ke {
            group: ke.group(),
            data: ke.public_value().to_vec(),
        });
        payloads.push(Payload::Nonce(self.ni.clone()));
        // Always UDP-encapsulated: claim a NAT in front of us (a hash over a random
        // address), as strongSwan does when encapsulation is forced.
        let fake = SocketAddr::new(IpAddr::from(random::<16>(&self.rng)?), 4500);
        payloads.push(status(
            notify::NAT_DETECTION_SOURCE_IP,
            nat_hash(&self.spi_i, &[0; 8], fake),
        ));
        payloads.push(status(
            notify::NAT_DETECTION_DESTINATION_IP,
            nat_hash(&self.spi_i, &[0; 8], self.config.remote),
        ));
        payloads.push(status(notify::IKEV2_FRAGMENTATION_SUPPORTED, Vec::new()));
        // Signatures (method 14) with SHA2-256, -384 or -512 (RFC 7427 §4).
        payloads.push(status(
            notify::SIGNATURE_HASH_ALGORITHMS,
            SIGNATURE_HASHES.to_vec(),
        ));
        let message = Message {
            header: Header {
                spi_i: self.spi_i,
                spi_r: [0; 8],
                next_payload: 0,
                version: wire::IKE_VERSION,
                exchange: exchange::IKE_SA_INIT,
                flags: flags::INITIATOR,
                message_id: 0,
                length: 0,
            },
            payloads,
        };
        let bytes = message.encode()?;
        self.init_request = bytes.clone();
        self.next_id = 1;
        Ok(bytes)
    }

    /// Handles a datagram from the peer (non-ESP marker removed).
    pub fn handle(&mut self, datagram: &[u8], now: Instant) -> Result<Vec<Event>, IkeError> {
        let header = Header::decode(datagram)?;
        if self.state == State::Established {
            return self.on_established(datagram, header, now);
        }
        if header.spi_i != self.spi_i || header.from_initiator() {
            return Err(IkeError::Protocol("not for this IKE SA".into()));
        }
        match self.state {
            State::InitSent => self.on_init_response(datagram, header, now),
            State::AuthSent => self.on_auth_response(datagram, header, now),
            State::Established | State::Closed => Ok(Vec::new()),
        }
    }

    /// Retransmits the request in flight when its time has come; gives up after
    /// [`TRANSMISSIONS`] (`Err(Timeout)` while setting up). Established, sends the
    /// liveness check that is due ([`Config::dpd`]); a peer that stopped answering
    /// closes the IKE SA: [`Event::ChildDeleted`] for each CHILD_SA, then
    /// [`Event::Closed`].
    pub fn on_timer(&mut self, now: Instant) -> Result<Vec<Event>, IkeError> {
        if self.state == State::Established {
            let ticked = self.keyed()?.tick(now);
            return Ok(given_up(ticked, &mut self.state, &mut self.child));
        }
        let Some((bytes, sent, count)) = &mut self.in_flight else {
            return Ok(Vec::new());
        };
        let wait = RETRANSMIT_BASE * 2u32.saturating_pow(count.saturating_sub(1));
        if now.saturating_duration_since(*sent) < wait {
            return Ok(Vec::new());
        }
        if *count >= TRANSMISSIONS {
            let n = *count;
            self.in_flight = None;
            self.state = State::Closed;
            if let Some(code) = self.refused_hint.filter(|_| self.keyed.is_none()) {
                return Err(IkeError::Refused {
                    code,
                    name: notify_name(code),
                });
            }
            return Err(IkeError::Timeout(n));
        }
        *count += 1;
        *sent = now;
        Ok(bytes.iter().cloned().map(Event::Send).collect())
    }

    /// When [`Initiator::on_timer`] next has something to do.
    pub fn next_timer(&self) -> Option<Instant> {
        if self.state == State::Established {
            return self.keyed.as_ref().and_then(Keyed::next_timer);
        }
        self.in_flight.as_ref().map(|(_, sent, count)| {
            *sent + RETRANSMIT_BASE * 2u32.saturating_pow(count.saturating_sub(1))
        })
    }

    fn on_init_response(
        &mut self,
        datagram: &[u8],
        header: Header,
        now: Instant,
    ) -> Result<Vec<Event>, IkeError> {
        if header.exchange != exchange::IKE_SA_INIT
            || !header.is_response()
            || header.message_id != 0
        {
            return Err(IkeError::Protocol(
                "expected the IKE_SA_INIT response".into(),
            ));
        }
        let message = Message::decode(datagram)?;
        if let Some(cookie) = message.notify(notify::COOKIE) {
            if cookie.data.is_empty() || cookie.data.len() > 64 {
                return Err(IkeError::Protocol("COOKIE of a bad length".into()));
            }
            self.cookie = Some(cookie.data.clone());
            return self.resend_init(now);
        }
        if let Some(n) = message.notify(notify::INVALID_KE_PAYLOAD) {
            let group = n
                .data
                .get(..2)
                .map(|g| u16::from_be_bytes([g[0], g[1]]))
                .ok_or_else(|| IkeError::Protocol("INVALID_KE_PAYLOAD without a group".into()))?;
            let current = self.ke.as_ref().map(KeyExchange::group);
            if !self.config.groups.contains(&group) || current == Some(group) {
                return Err(IkeError::Refused {
                    code: notify::INVALID_KE_PAYLOAD,
                    name: "INVALID_KE_PAYLOAD (the group it wants is not offered)",
                });
            }
            self.ke = Some(KeyExchange::new(group, &self.rng)?);
            return self.resend_init(now);
        }
        if let Some(code) = first_error(&message.payloads) {
            // Unprotected: anyone who saw our request could have sent it. Kept as the
            // reason to give if no real answer comes before the retransmissions run out.
            self.refused_hint = Some(code);
            return Ok(Vec::new());
        }
        let (chosen, (group, public), nr) = init_payloads(&message, "response")?;
        let (chosen, public, nr) = (chosen.to_vec(), public.to_vec(), nr.to_vec());
        let key_bits = self.check_ike_choice(&chosen, group)?;
        let ke = self
            .ke
            .take()
            .ok_or_else(|| IkeError::Protocol("no key exchange".into()))?;
        let g_ir = ke.agree(&public)?;
        self.spi_r = header.spi_r;
        self.nr = nr;
        self.init_response = datagram.to_vec();
        self.key_bytes = usize::from(key_bits / 8);
        let keys = IkeKeys::derive(
            &self.ni,
            &self.nr,
            &g_ir,
            &self.spi_i,
            &self.spi_r,
            self.key_bytes,
        );
        // The responder's requests start at Message ID 0.
        let mut keyed = Keyed::new(true, self.spi_i, self.spi_r, &keys, 0)?;
        // Large requests (certificates) go in fragments if the responder takes them.
        keyed.fragments_ok = message
            .notify(notify::IKEV2_FRAGMENTATION_SUPPORTED)
            .is_some();
        self.keyed = Some(keyed);
        self.keys = Some(keys);
        let request = self.auth_request()?;
        self.state = State::AuthSent;
        self.in_flight = Some((request.clone(), now, 1));
        Ok(request.into_iter().map(Event::Send).collect())
    }

    fn resend_init(&mut self, now: Instant) -> Result<Vec<Event>, IkeError> {
        // A peer asking for a cookie or a group again and again gets nowhere.
        self.init_retries += 1;
        if self.init_retries > MAX_INIT_RETRIES {
            self.state = State::Closed;
            self.in_flight = None;
            return Err(IkeError::Protocol(
                "the responder keeps asking for a COOKIE or another group".into(),
            ));
        }
        let request = self.init_request()?;
        self.in_flight = Some((vec![request.clone()], now, 1));
        Ok(vec![Event::Send(request)])
    }

    /// Checks the responder's IKE proposal against ours; returns its key size.
    fn check_ike_choice(&self, chosen: &[Proposal], group: u16) -> Result<u16, IkeError> {
        let [p] = chosen else {
            return Err(IkeError::Protocol(
                "the responder chose more than one proposal".into(),
            ));
        };
        if p.protocol != PROTO_IKE || !p.spi.is_empty() {
            return Err(IkeError::Protocol(
                "the responder's proposal is not an IKE proposal".into(),
            ));
        }
        let mut encr = None;
        let mut prf = false;
        let mut dh = None;
        for t in &p.transforms {
            match t.kind {
                ENCR if t.id == crypto::ENCR_AES_GCM_16
                    && t.key_length()
                        .is_some_and(|b| self.config.key_bits.contains(&b))
                    && encr.is_none() =>
                {
                    encr = t.key_length();
                }
                PRF if t.id == crypto::PRF_HMAC_SHA2_256 && !prf => prf = true,
                DH if self.config.groups.contains(&t.id) && dh.is_none() => dh = Some(t.id),
                INTEG if t.id == 0 => {}
                _ => {
                    return Err(IkeError::Protocol(format!(
                        "the responder chose a transform not offered (type {}, id {})",
                        t.kind, t.id
                    )))
                }
            }
        }
        match (encr, prf, dh) {
            (Some(bits), true, Some(g)) if g == group => Ok(bits),
            _ => Err(IkeError::Protocol(
                "the responder's IKE proposal lacks a transform, or its DH group is not its KE's"
                    .into(),
            )),
        }
    }

    fn esp_proposal(&self) -> Proposal {
        esp_proposal(&self.config, self.child.inbound_spi)
    }

    fn keyed(&mut self) -> Result<&mut Keyed, IkeError> {
        self.keyed
            .as_mut()
            .ok_or_else(|| IkeError::Protocol("no keys yet".into()))
    }

    fn auth_request(&mut self) -> Result<Vec<Vec<u8>>, IkeError> {
        let keys = self
            .keys
            .as_ref()
            .ok_or_else(|| IkeError::Protocol("no keys yet".into()))?;
        let id = self.config.local_id.clone();
        let octets = crypto::signed_octets(&self.init_request, &self.nr, &keys.sk_pi, &id.body());
        let mut auth = our_auth(&self.config, &octets)?;
        let mut payloads = vec![Payload::IdI(id)];
        match &self.config.certificates {
            // CERTs, then what we trust (CERTREQ), then AUTH.
            Some(c) => {
                let signed = auth.pop();
                payloads.extend(auth);
                payloads.push(Payload::CertReq {
                    encoding: CERT_X509_SIGNATURE,
                    data: c.authorities(),
                });
                payloads.extend(signed);
            }
            // The identity we expect, as a hint.
            None => {
                payloads.push(Payload::IdR(self.config.remote_id.clone()));
                payloads.extend(auth);
            }
        }
        payloads.extend([
            status(notify::INITIAL_CONTACT, Vec::new()),
            Payload::Sa(vec![self.esp_proposal()]),
            Payload::TsI(
                self.config
                    .local_prefixes
                    .iter()
                    .map(Prefix::selector)
                    .collect(),
            ),
            Payload::TsR(
                self.config
                    .remote_prefixes
                    .iter()
                    .map(Prefix::selector)
                    .collect(),
            ),
        ]);
        let id = self.next_id;
        self.next_id += 1;
        self.keyed()?
            .seal_all(exchange::IKE_AUTH, false, id, &payloads)
    }

    fn on_auth_response(
        &mut self,
        datagram: &[u8],
        header: Header,
        now: Instant,
    ) -> Result<Vec<Event>, IkeError> {
        if header.exchange != exchange::IKE_AUTH
            || !header.is_response()
            || header.message_id != 1
            || header.spi_r != self.spi_r
        {
            return Err(IkeError::Protocol("expected the IKE_AUTH response".into()));
        }
        let Some(payloads) = self.keyed()?.open(datagram)? else {
            return Ok(Vec::new());
        };
        if let Some(code) = first_error(&payloads) {
            self.state = State::Closed;
            self.in_flight = None;
            return Err(IkeError::Refused {
                code,
                name: notify_name(code),
            });
        }
        let keys = self
            .keys
            .as_ref()
            .ok_or_else(|| IkeError::Protocol("no keys yet".into()))?;
        let id_r = payloads.iter().find_map(|p| match p {
            Payload::IdR(id) => Some(id.clone()),
            _ => None,
        });
        let auth = payloads.iter().find_map(|p| match p {
            Payload::Auth { method, data } => Some((*method, data.clone())),
            _ => None,
        });
        let (Some(id_r), Some((method, data))) = (id_r, auth) else {
            return Err(IkeError::Protocol(
                "IKE_AUTH response without IDr or AUTH".into(),
            ));
        };
        if self.config.certificates.is_none() && id_r != self.config.remote_id {
            return Err(IkeError::Protocol(format!(
                "the responder presents identity type {} {:?}, not the configured one",
                id_r.id_type,
                String::from_utf8_lossy(&id_r.data)
            )));
        }
        // The responder signs its IKE_SA_INIT response as it sent it.
        let first = self.init_response.clone();
        let octets = crypto::signed_octets(&first, &self.ni, &keys.sk_pr, &id_r.body());
        if let Err(why) = peer_proved(&self.config, &payloads, &id_r, method, &data, &octets) {
            self.state = State::Closed;
            self.in_flight = None;
            return Err(match self.config.certificates {
                None => IkeError::AuthenticationFailed,
                Some(_) => IkeError::Protocol(format!("the responder did not authenticate: {why}")),
            });
        }
        self.in_flight = None;
        // A CHILD_SA we cannot take leaves no IKE SA up either.
        let child = match self.child_from(&payloads) {
            Ok(child) => child,
            Err(e) => {
                self.state = State::Closed;
                return Err(e);
            }
        };
        self.state = State::Established;
        let next_id = self.next_id;
        let dpd = self.config.dpd;
        self.keyed()?.established(now, next_id, dpd);
        self.child.outbound_spi = Some(child.outbound_spi);
        self.child.local_prefixes = child.local_prefixes.clone();
        self.child.remote_prefixes = child.remote_prefixes.clone();
        Ok(vec![Event::Established(child)])
    }

    fn child_from(&self, payloads: &[Payload]) -> Result<ChildSa, IkeError> {
        let keys = self
            .keys
            .as_ref()
            .ok_or_else(|| IkeError::Protocol("no keys yet".into()))?;
        Self::chosen_child(
            &self.config,
            &keys.sk_d,
            &self.ni,
            &self.nr,
            self.child.inbound_spi,
            payloads,
        )
    }

    /// The CHILD_SA a responder chose for our proposal (its SA and TS payloads): keys
    /// from `sk_d` and the exchange's nonces, ours first (we initiated the exchange).
    fn chosen_child(
        config: &Config,
        sk_d: &[u8],
        ni: &[u8],
        nr: &[u8],
        inbound_spi: u32,
        payloads: &[Payload],
    ) -> Result<ChildSa, IkeError> {
        let mut sa = None;
        let mut ts_i = None;
        let mut ts_r = None;
        for p in payloads {
            match p {
                Payload::Sa(ps) => sa = Some(ps.clone()),
                Payload::TsI(t) => ts_i = Some(t.clone()),
                Payload::TsR(t) => ts_r = Some(t.clone()),
                _ => {}
            }
        }
        let (Some(sa), Some(ts_i), Some(ts_r)) = (sa, ts_i, ts_r) else {
            return Err(IkeError::Protocol(
                "IKE_AUTH response without SA, TSi or TSr: no CHILD_SA".into(),
            ));
        };
        let [p] = sa.as_slice() else {
            return Err(IkeError::Protocol(
                "the responder chose more than one ESP proposal".into(),
            ));
        };
        let spi: [u8; 4] = p
            .spi
            .as_slice()
            .try_into()
            .map_err(|_| IkeError::Protocol("ESP SPI is not 4 bytes".into()))?;
        let outbound_spi = u32::from_be_bytes(spi);
        if p.protocol != PROTO_ESP || outbound_spi < 256 {
            return Err(IkeError::Protocol(
                "not an ESP proposal, or a reserved SPI".into(),
            ));
        }
        let mut bits = None;
        let mut esn = None;
        for t in &p.transforms {
            match t.kind {
                ENCR if t.id == crypto::ENCR_AES_GCM_16
                    && t.key_length().is_some_and(|b| config.key_bits.contains(&b))
                    && bits.is_none() =>
                {
                    bits = t.key_length();
                }
                ESN if (t.id == 0 || (t.id == 1 && config.esn)) && esn.is_none() => {
                    esn = Some(t.id == 1);
                }
                INTEG if t.id == 0 => {}
                _ => {
                    return Err(IkeError::Protocol(format!(
                        "the responder chose an ESP transform not offered (type {}, id {})",
                        t.kind, t.id
                    )))
                }
            }
        }
        let (Some(bits), Some(esn)) = (bits, esn) else {
            return Err(IkeError::Protocol(
                "the responder's ESP proposal lacks ENCR or ESN".into(),
            ));
        };
        let narrowed =
            |selectors: &[TrafficSelector], ours: &[Prefix]| -> Result<Vec<Prefix>, IkeError> {
                let mut out = Vec::new();
                for ts in selectors {
                    let TrafficSelector::Range {
                        start,
                        end,
                        protocol,
                        start_port,
                        end_port,
                    } = ts
                    else {
                        return Err(IkeError::Protocol(
                            "a traffic selector type not offered".into(),
                        ));
                    };
                    let whole_ports = *protocol == 0 && *start_port == 0 && *end_port == 65535;
                    let inside = ours.iter().any(|p| p.contains(*start, *end));
                    let prefix = Prefix::of_range(*start, *end);
                    match (whole_ports, inside, prefix) {
                        (true, true, Some(prefix)) => out.push(prefix),
                        _ => {
                            return Err(IkeError::Protocol(format!(
                                "traffic selector {start}-{end} (protocol {protocol}, ports \
                             {start_port}-{end_port}) is not a prefix within ours"
                            )))
                        }
                    }
                }
                if out.is_empty() {
                    return Err(IkeError::Protocol("no traffic selectors".into()));
                }
                Ok(out)
            };
        let local_prefixes = narrowed(&ts_i, &config.local_prefixes)?;
        let remote_prefixes = narrowed(&ts_r, &config.remote_prefixes)?;
        let (i2r, r2i) = crypto::child_keymat(sk_d, None, ni, nr, usize::from(bits / 8));
        Ok(ChildSa {
            inbound_spi,
            outbound_spi,
            inbound_key: r2i,
            outbound_key: i2r,
            esn,
            local_prefixes,
            remote_prefixes,
            rekeyed_by_us: false,
        })
    }

    fn on_established(
        &mut self,
        datagram: &[u8],
        header: Header,
        now: Instant,
    ) -> Result<Vec<Event>, IkeError> {
        let Some(keyed) = self.keyed.as_mut() else {
            return Err(IkeError::Protocol("no keys yet".into()));
        };
        let (events, closed) =
            keyed.handle(datagram, &header, &mut self.child, &self.config, now)?;
        if closed {
            self.state = State::Closed;
        }
        Ok(events)
    }
}

/// The CHILD_SA as its IKE SA knows it.
#[derive(Debug, Clone, Default)]
struct Child {
    /// Ours (the peer sends to it).
    inbound_spi: u32,
    /// The peer's, once the CHILD_SA is up.
    outbound_spi: Option<u32>,
    /// Its prefixes once up: ours, the peer's.
    local_prefixes: Vec<Prefix>,
    remote_prefixes: Vec<Prefix>,
    /// The SPIs (inbound, outbound) of the CHILD_SA a rekey replaced, until it is
    /// deleted (by the peer after its rekey, by us after ours).
    replaced: Option<(u32, u32)>,
    /// Our own rekey in flight.
    rekeying: Option<OwnRekey>,
    /// The Message ID of our delete of the pair our rekey replaced, in flight.
    deleting: Option<u32>,
}

/// A CHILD_SA rekey of ours in flight: its Message ID, our nonce, our new inbound SPI.
#[derive(Debug, Clone, Default)]
struct OwnRekey {
    id: u32,
    ni: Vec<u8>,
    inbound_spi: u32,
}

impl Child {
    /// The IKE SA is gone: every CHILD_SA of it goes too (inbound SPIs of ours).
    fn gone(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        if self.outbound_spi.take().is_some() {
            events.push(Event::ChildDeleted(self.inbound_spi));
        }
        if let Some((inbound, _)) = self.replaced.take() {
            events.push(Event::ChildDeleted(inbound));
        }
        events
    }
}

/// The protected half of an IKE SA, the same at both ends once the keys exist: SK
/// payloads sealed and opened (fragments reassembled), and the peer's requests taken in
/// order (window size 1: the request before is answered again from the cache).
struct Keyed {
    initiator: bool,
    spi_i: [u8; 8],
    spi_r: [u8; 8],
    ours: SkCipher,
    theirs: SkCipher,
    iv: u64,
    fragments: Reassembly,
    /// The peer's next request's Message ID, and our response to the one before.
    peer_next_id: u32,
    last_response: Option<(u32, Vec<Vec<u8>>)>,
    /// SHA-256 of the datagram that completed the request answered last: only it gets
    /// the response again, not any datagram that copies its header.
    last_request: Option<[u8; 32]>,
    /// Our next request's Message ID once established, and the one in flight:
    /// (Message ID, bytes, sent at, transmissions).
    own_next_id: u32,
    in_flight: Option<(u32, Vec<u8>, Instant, u32)>,
    /// Liveness checks: how often, and when the next one is due.
    dpd: Option<(Duration, Instant)>,
    /// Authenticated messages from the peer: requests opened, answers to ours.
    heard: u64,
    /// The peer takes fragmented messages (IKEV2_FRAGMENTATION_SUPPORTED both ways).
    fragments_ok: bool,
    /// Derives CHILD_SA keys and the next IKE SA's.
    sk_d: Zeroizing<Vec<u8>>,
    /// The IKE SA a rekey replaced (the peer's, RFC 7296 §2.18), kept to answer on it
    /// (its delete) until the next rekey; its CHILD_SAs moved to this one.
    previous: Option<Box<Keyed>>,
}

fn digest(datagram: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, datagram).as_ref());
    out
}

/// What a request of the peer once established gave: events, whether the IKE SA is gone,
/// and the IKE SA that replaces this one (the peer rekeyed it).
type Answered = (Vec<Event>, bool, Option<Box<Keyed>>);

/// A request of the peer, as [`Keyed::request`] sorts it.
enum Request {
    /// The one answered last, again: send this again (its fragments, if it was).
    Again(Vec<Vec<u8>>),
    /// A fragment of a message not whole yet.
    Partial,
    /// The next request, opened.
    New(Vec<Payload>),
}

impl Keyed {
    fn new(
        initiator: bool,
        spi_i: [u8; 8],
        spi_r: [u8; 8],
        keys: &IkeKeys,
        peer_next_id: u32,
    ) -> Result<Self, IkeError> {
        let (ours, theirs) = if initiator {
            (&keys.sk_ei, &keys.sk_er)
        } else {
            (&keys.sk_er, &keys.sk_ei)
        };
        Ok(Self {
            initiator,
            spi_i,
            spi_r,
            ours: SkCipher::new(ours)?,
            theirs: SkCipher::new(theirs)?,
            iv: 0,
            fragments: Reassembly::default(),
            peer_next_id,
            last_response: None,
            last_request: None,
            own_next_id: 0,
            in_flight: None,
            dpd: None,
            heard: 0,
            fragments_ok: false,
            sk_d: Zeroizing::new(keys.sk_d.to_vec()),
            previous: None,
        })
    }

    fn seal(
        &mut self,
        exchange: u8,
        response: bool,
        message_id: u32,
        payloads: &[Payload],
    ) -> Result<Vec<u8>, IkeError> {
        let mut inner = Vec::new();
        let first = wire::encode_payloads(payloads, &mut inner)?;
        let mut bits = if response { flags::RESPONSE } else { 0 };
        if self.initiator {
            bits |= flags::INITIATOR;
        }
        let header = Header {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            next_payload: 0,
            version: wire::IKE_VERSION,
            exchange,
            flags: bits,
            message_id,
            length: 0,
        };
        // A counter: unique per key, which is all AES-GCM asks of the IV (RFC 5282 §3.1).
        self.iv += 1;
        Ok(self
            .ours
            .seal(header, first, None, &inner, &[], self.iv.to_be_bytes())?)
    }

    /// Seals a message: in fragments (RFC 7383) when it is larger than
    /// [`FRAGMENT_DATA`] and the peer takes fragments, else as one datagram.
    fn seal_all(
        &mut self,
        exchange: u8,
        response: bool,
        message_id: u32,
        payloads: &[Payload],
    ) -> Result<Vec<Vec<u8>>, IkeError> {
        let mut inner = Vec::new();
        let first = wire::encode_payloads(payloads, &mut inner)?;
        if !self.fragments_ok || inner.len() <= FRAGMENT_DATA {
            return Ok(vec![self.seal(exchange, response, message_id, payloads)?]);
        }
        let chunks: Vec<&[u8]> = inner.chunks(FRAGMENT_DATA).collect();
        let total = u16::try_from(chunks.len())
            .map_err(|_| IkeError::Protocol("a message too large to fragment".into()))?;
        let mut bits = if response { flags::RESPONSE } else { 0 };
        if self.initiator {
            bits |= flags::INITIATOR;
        }
        let header = Header {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            next_payload: 0,
            version: wire::IKE_VERSION,
            exchange,
            flags: bits,
            message_id,
            length: 0,
        };
        let mut out = Vec::with_capacity(chunks.len());
        for (n, chunk) in (1u16..).zip(chunks) {
            self.iv += 1;
            // Only the first fragment names the first inner payload (RFC 7383 §2.5).
            let first_inner = if n == 1 { first } else { 0 };
            out.push(self.ours.seal(
                header,
                first_inner,
                Some((n, total)),
                chunk,
                &[],
                self.iv.to_be_bytes(),
            )?);
        }
        Ok(out)
    }

    /// [`Keyed::respond`] for a response that may need fragments.
    fn respond_all(
        &mut self,
        header: &Header,
        payloads: &[Payload],
    ) -> Result<Vec<Vec<u8>>, IkeError> {
        let response = self.seal_all(header.exchange, true, header.message_id, payloads)?;
        self.last_response = Some((header.message_id, response.clone()));
        self.peer_next_id = self.peer_next_id.wrapping_add(1);
        Ok(response)
    }

    /// Opens an encrypted message from the peer; fragments are collected until the
    /// message is whole (`None` until then).
    fn open(&mut self, datagram: &[u8]) -> Result<Option<Vec<Payload>>, IkeError> {
        let opened = self.theirs.open(datagram)?;
        let (first, bytes) = if opened.fragment.is_some() {
            match self.fragments.add(&opened)? {
                Some(whole) => whole,
                None => return Ok(None),
            }
        } else {
            (opened.first_inner, opened.payloads)
        };
        let payloads = wire::decode_payloads(first, &bytes)?;
        if let Some(kind) = payloads.iter().find_map(|p| match p {
            Payload::Unknown {
                critical: true,
                kind,
                ..
            } => Some(*kind),
            _ => None,
        }) {
            return Err(IkeError::Protocol(format!(
                "unknown critical payload type {kind}"
            )));
        }
        Ok(Some(payloads))
    }

    /// Sorts a request of the peer: the one before is answered from the cache, the next
    /// one is opened, others are refused.
    fn request(&mut self, datagram: &[u8], header: &Header) -> Result<Request, IkeError> {
        let hash = digest(datagram);
        if let Some((id, response)) = &self.last_response {
            if header.message_id == *id {
                if self.last_request == Some(hash) {
                    return Ok(Request::Again(response.clone()));
                }
                return Err(IkeError::Protocol(format!(
                    "a datagram with Message ID {id}, answered already, that is not the \
                     request answered"
                )));
            }
        }
        if header.message_id != self.peer_next_id {
            return Err(IkeError::Protocol(format!(
                "request with Message ID {}, expected {}",
                header.message_id, self.peer_next_id
            )));
        }
        Ok(match self.open(datagram)? {
            // Only the datagram that completed the request gets its answer again: one
            // answer per replayed datagram, whatever the number of fragments.
            Some(payloads) => {
                self.last_request = Some(hash);
                self.heard += 1;
                Request::New(payloads)
            }
            None => Request::Partial,
        })
    }

    /// Starts this end's liveness checks (from `now`), and its own requests at
    /// `next_id`.
    fn established(&mut self, now: Instant, next_id: u32, every: Option<Duration>) {
        self.own_next_id = next_id;
        // An interval too long to add to `now` means never.
        self.dpd = every.and_then(|d| Some((d, now.checked_add(d)?)));
    }

    /// When [`Keyed::tick`] next has something to do.
    fn next_timer(&self) -> Option<Instant> {
        match &self.in_flight {
            Some((_, _, sent, count)) => {
                Some(*sent + RETRANSMIT_BASE * 2u32.saturating_pow(count.saturating_sub(1)))
            }
            None => self.dpd.map(|(_, due)| due),
        }
    }

    /// Retransmits our request in flight, or sends the liveness check that is due.
    /// `Err(Timeout)` when the peer stopped answering.
    fn tick(&mut self, now: Instant) -> Result<Vec<Event>, IkeError> {
        if let Some((_, bytes, sent, count)) = &mut self.in_flight {
            let wait = RETRANSMIT_BASE * 2u32.saturating_pow(count.saturating_sub(1));
            if now.saturating_duration_since(*sent) < wait {
                return Ok(Vec::new());
            }
            if *count >= TRANSMISSIONS {
                return Err(IkeError::Timeout(*count));
            }
            *count += 1;
            *sent = now;
            return Ok(vec![Event::Send(bytes.clone())]);
        }
        let Some((every, due)) = self.dpd else {
            return Ok(Vec::new());
        };
        if now < due {
            return Ok(Vec::new());
        }
        let id = self.own_next_id;
        let request = self.seal(exchange::INFORMATIONAL, false, id, &[])?;
        self.own_next_id = id.wrapping_add(1);
        self.in_flight = Some((id, request.clone(), now, 1));
        self.dpd = now.checked_add(every).map(|due| (every, due));
        Ok(vec![Event::Send(request)])
    }

    /// A response of the peer once established: the answer to our request in flight
    /// (authenticated by opening it) ends it; anything else is dropped.
    fn on_response(
        &mut self,
        datagram: &[u8],
        header: &Header,
    ) -> Result<Option<Vec<Payload>>, IkeError> {
        if self
            .in_flight
            .as_ref()
            .is_some_and(|(id, ..)| *id == header.message_id)
        {
            // A response is never fragmented here (it is small). One that does not open
            // is discarded (RFC 7296 §2.21.2): the Message ID is in clear, so anyone
            // could send it; the request stays in flight.
            let Ok(opened) = self.theirs.open(datagram) else {
                return Ok(None);
            };
            if let Ok(payloads) = wire::decode_payloads(opened.first_inner, &opened.payloads) {
                self.in_flight = None;
                self.heard += 1;
                return Ok(Some(payloads));
            }
        }
        Ok(None)
    }

    /// Starts a rekey of the CHILD_SA (CREATE_CHILD_SA with REKEY_SA, no PFS): nothing
    /// when another request of ours is in flight or a rekey is not finished.
    fn start_rekey(
        &mut self,
        child: &mut Child,
        config: &Config,
        now: Instant,
    ) -> Result<Vec<Event>, IkeError> {
        if self.in_flight.is_some()
            || child.outbound_spi.is_none()
            || child.replaced.is_some()
            || child.rekeying.is_some()
            || child.deleting.is_some()
        {
            return Ok(Vec::new());
        }
        let rng = ring::rand::SystemRandom::new();
        let inbound_spi = u32::from_be_bytes(random::<4>(&rng)?) | 0x0000_0100;
        let ni = random::<32>(&rng)?.to_vec();
        let payloads = vec![
            Payload::Notify(wire::Notify {
                protocol: PROTO_ESP,
                spi: child.inbound_spi.to_be_bytes().to_vec(),
                kind: notify::REKEY_SA,
                data: Vec::new(),
            }),
            Payload::Sa(vec![esp_proposal(config, inbound_spi)]),
            Payload::Nonce(ni.clone()),
            Payload::TsI(child.local_prefixes.iter().map(Prefix::selector).collect()),
            Payload::TsR(child.remote_prefixes.iter().map(Prefix::selector).collect()),
        ];
        let id = self.own_next_id;
        let request = self.seal(exchange::CREATE_CHILD_SA, false, id, &payloads)?;
        self.own_next_id = id.wrapping_add(1);
        self.in_flight = Some((id, request.clone(), now, 1));
        child.rekeying = Some(OwnRekey {
            id,
            ni,
            inbound_spi,
        });
        Ok(vec![Event::Send(request)])
    }

    /// The peer's answer to a request of ours (`id`): our rekey's new pair (then our
    /// delete of the old one), or our delete's end (the old pair goes).
    fn on_own_answer(
        &mut self,
        id: u32,
        payloads: &[Payload],
        child: &mut Child,
        config: &Config,
        now: Instant,
    ) -> Result<Vec<Event>, IkeError> {
        if child.deleting == Some(id) {
            child.deleting = None;
            return Ok(child
                .replaced
                .take()
                .map(|(inbound, _)| Event::ChildDeleted(inbound))
                .into_iter()
                .collect());
        }
        let Some(rekey) = child.rekeying.take_if(|r| r.id == id) else {
            return Ok(Vec::new());
        };
        // Refused (a collision: TEMPORARY_FAILURE) or unreadable: the old pair stays,
        // and a later try may do better.
        let nr = payloads.iter().find_map(|p| match p {
            Payload::Nonce(n) => Some(n.as_slice()),
            _ => None,
        });
        let (None, Some(nr), Some(old_out)) = (first_error(payloads), nr, child.outbound_spi)
        else {
            return Ok(Vec::new());
        };
        if !(16..=256).contains(&nr.len()) {
            return Ok(Vec::new());
        }
        let Ok(mut new) = Initiator::chosen_child(
            config,
            &self.sk_d,
            &rekey.ni,
            nr,
            rekey.inbound_spi,
            payloads,
        ) else {
            return Ok(Vec::new());
        };
        new.rekeyed_by_us = true;
        let old_in = child.inbound_spi;
        child.replaced = Some((old_in, old_out));
        child.inbound_spi = new.inbound_spi;
        child.outbound_spi = Some(new.outbound_spi);
        child.local_prefixes = new.local_prefixes.clone();
        child.remote_prefixes = new.remote_prefixes.clone();
        // The replaced pair is ours to delete now.
        let delete = self.seal(
            exchange::INFORMATIONAL,
            false,
            self.own_next_id,
            &[Payload::Delete {
                protocol: PROTO_ESP,
                spi_size: 4,
                spis: vec![old_in.to_be_bytes().to_vec()],
            }],
        )?;
        let delete_id = self.own_next_id;
        self.own_next_id = delete_id.wrapping_add(1);
        self.in_flight = Some((delete_id, delete.clone(), now, 1));
        child.deleting = Some(delete_id);
        Ok(vec![Event::ChildRekeyed(new), Event::Send(delete)])
    }

    /// Seals the response to the request `header` and keeps it for a retransmission.
    fn respond(&mut self, header: &Header, payloads: &[Payload]) -> Result<Vec<u8>, IkeError> {
        let response = self.seal(header.exchange, true, header.message_id, payloads)?;
        self.last_response = Some((header.message_id, vec![response.clone()]));
        self.peer_next_id = self.peer_next_id.wrapping_add(1);
        Ok(response)
    }

    /// A request of the peer once the IKE SA is up: liveness checks, deletes and rekeys
    /// of the CHILD_SA are answered (see [`rekey_child`]). Returns the events and whether
    /// the IKE SA is gone.
    fn established_request(
        &mut self,
        datagram: &[u8],
        header: &Header,
        child: &mut Child,
        config: &Config,
    ) -> Result<Answered, IkeError> {
        let payloads = match self.request(datagram, header)? {
            Request::Again(bytes) => {
                return Ok((bytes.into_iter().map(Event::Send).collect(), false, None))
            }
            Request::Partial => return Ok((Vec::new(), false, None)),
            Request::New(payloads) => payloads,
        };
        let mut events = Vec::new();
        let mut closed = false;
        let mut next = None;
        let reply: Vec<Payload> = match header.exchange {
            exchange::INFORMATIONAL => {
                let mut reply = Vec::new();
                for p in &payloads {
                    let Payload::Delete { protocol, spis, .. } = p else {
                        continue;
                    };
                    if *protocol == PROTO_IKE {
                        events.extend(child.gone());
                        events.push(Event::Closed("the peer deleted the IKE SA".into()));
                        closed = true;
                    } else if *protocol == PROTO_ESP {
                        let named: Vec<u32> = spis
                            .iter()
                            .filter_map(|s| <[u8; 4]>::try_from(s.as_slice()).ok())
                            .map(u32::from_be_bytes)
                            .collect();
                        // The SA a rekey replaced, the one in force, or both.
                        let mut gone = Vec::new();
                        if let Some((inbound, outbound)) = child.replaced {
                            if named.contains(&outbound) {
                                child.replaced = None;
                                gone.push(inbound);
                            }
                        }
                        if child.outbound_spi.is_some_and(|s| named.contains(&s)) {
                            child.outbound_spi = None;
                            gone.push(child.inbound_spi);
                        }
                        if !gone.is_empty() {
                            reply.push(Payload::Delete {
                                protocol: PROTO_ESP,
                                spi_size: 4,
                                spis: gone.iter().map(|s| s.to_be_bytes().to_vec()).collect(),
                            });
                            events.extend(gone.into_iter().map(Event::ChildDeleted));
                        }
                    }
                }
                reply
            }
            exchange::CREATE_CHILD_SA if is_ike_rekey(&payloads) => {
                let (reply, new_sa) = rekey_ike(&payloads, config, &self.sk_d)?;
                next = new_sa;
                reply
            }
            exchange::CREATE_CHILD_SA => {
                let (reply, rekeyed) = rekey_child(&payloads, config, &self.sk_d, child)?;
                events.extend(rekeyed.map(Event::ChildRekeyed));
                reply
            }
            other => {
                return Err(IkeError::Protocol(format!(
                    "exchange type {other} after IKE_AUTH"
                )))
            }
        };
        let response = self.respond(header, &reply)?;
        events.insert(0, Event::Send(response));
        Ok((events, closed, next))
    }

    /// Our request deleting this IKE SA (sent once; the SA is gone either way).
    fn delete_request(&mut self) -> Result<Vec<u8>, IkeError> {
        let id = self.own_next_id;
        self.own_next_id = id.wrapping_add(1);
        self.in_flight = None;
        self.dpd = None;
        self.seal(
            exchange::INFORMATIONAL,
            false,
            id,
            &[Payload::Delete {
                protocol: PROTO_IKE,
                spi_size: 0,
                spis: Vec::new(),
            }],
        )
    }

    /// Whether a datagram with these SPIs belongs to this IKE SA or the one it replaced.
    fn owns(&self, spi_i: [u8; 8], spi_r: [u8; 8]) -> bool {
        (self.spi_i == spi_i && self.spi_r == spi_r)
            || self
                .previous
                .as_ref()
                .is_some_and(|p| p.spi_i == spi_i && p.spi_r == spi_r)
    }

    /// A message of the peer once established, on this IKE SA or the one a rekey
    /// replaced. A rekey of the IKE SA by the peer swaps in the new one (Message IDs
    /// from 0, the peer its initiator); the CHILD_SAs stay. Returns the events and
    /// whether the IKE SA is gone.
    fn handle(
        &mut self,
        datagram: &[u8],
        header: &Header,
        child: &mut Child,
        config: &Config,
        now: Instant,
    ) -> Result<(Vec<Event>, bool), IkeError> {
        if (header.spi_i, header.spi_r) != (self.spi_i, self.spi_r) {
            if self.owns(header.spi_i, header.spi_r) {
                return self.on_previous(datagram, header);
            }
            return Err(IkeError::Protocol("not for this IKE SA".into()));
        }
        // The peer's messages carry the flag of its role in this IKE SA.
        if header.from_initiator() == self.initiator {
            return Err(IkeError::Protocol("not for this IKE SA".into()));
        }
        if header.is_response() {
            let events = match self.on_response(datagram, header)? {
                Some(payloads) => {
                    self.on_own_answer(header.message_id, &payloads, child, config, now)?
                }
                None => Vec::new(),
            };
            return Ok((events, false));
        }
        let (events, closed, next) = self.established_request(datagram, header, child, config)?;
        if let Some(mut next) = next {
            next.established(now, 0, self.dpd.map(|(every, _)| every));
            next.heard = self.heard;
            let mut old = std::mem::replace(self, *next);
            old.previous = None;
            old.in_flight = None;
            old.dpd = None;
            self.previous = Some(Box::new(old));
        }
        Ok((events, closed))
    }

    /// A message on the IKE SA a rekey replaced: its delete (or a liveness check) is
    /// answered; nothing else is done on it.
    fn on_previous(
        &mut self,
        datagram: &[u8],
        header: &Header,
    ) -> Result<(Vec<Event>, bool), IkeError> {
        let Some(prev) = self.previous.as_mut() else {
            return Err(IkeError::Protocol("not for this IKE SA".into()));
        };
        if header.from_initiator() == prev.initiator {
            return Err(IkeError::Protocol("not for this IKE SA".into()));
        }
        if header.is_response() {
            let _ = prev.on_response(datagram, header)?;
            return Ok((Vec::new(), false));
        }
        let (reply, deleted) = match prev.request(datagram, header)? {
            Request::Again(bytes) => {
                return Ok((bytes.into_iter().map(Event::Send).collect(), false))
            }
            Request::Partial => return Ok((Vec::new(), false)),
            Request::New(p) if header.exchange == exchange::INFORMATIONAL => {
                let deleted = p.iter().any(
                    |x| matches!(x, Payload::Delete { protocol, .. } if *protocol == PROTO_IKE),
                );
                (Vec::new(), deleted)
            }
            Request::New(_) => (vec![status(notify::TEMPORARY_FAILURE, Vec::new())], false),
        };
        let response = prev.respond(header, &reply)?;
        if deleted {
            // Gone at both ends now: its keys go too.
            self.previous = None;
        }
        Ok((vec![Event::Send(response)], false))
    }
}

/// Whether a CREATE_CHILD_SA request rekeys the IKE SA (RFC 7296 §1.3.2): an SA payload
/// of protocol IKE, no REKEY_SA.
fn is_ike_rekey(payloads: &[Payload]) -> bool {
    payloads.iter().any(|p| match p {
        Payload::Sa(ps) => ps.iter().any(|x| x.protocol == PROTO_IKE),
        _ => false,
    }) && !payloads
        .iter()
        .any(|p| matches!(p, Payload::Notify(n) if n.kind == notify::REKEY_SA))
}

/// Answers the peer's rekey of the IKE SA (RFC 7296 §1.3.2, §2.18): a proposal of ours
/// with our new SPI, a nonce, a KE in the group of the peer's (INVALID_KE_PAYLOAD naming
/// ours otherwise); SKEYSEED = prf(SK_d, g^ir | Ni | Nr). Returns the answer and the new
/// IKE SA, whose initiator is the peer.
fn rekey_ike(
    payloads: &[Payload],
    config: &Config,
    sk_d: &[u8],
) -> Result<(Vec<Payload>, Option<Box<Keyed>>), IkeError> {
    let refuse = |kind: u16, data: Vec<u8>| Ok((vec![status(kind, data)], None));
    let mut offered = None;
    let mut ni = None;
    let mut ke = None;
    for p in payloads {
        match p {
            Payload::Sa(ps) => offered = Some(ps.as_slice()),
            Payload::Nonce(n) => ni = Some(n.as_slice()),
            Payload::Ke { group, data } => ke = Some((*group, data.as_slice())),
            _ => {}
        }
    }
    let (Some(offered), Some(ni), Some((group, public))) = (offered, ni, ke) else {
        return refuse(notify::INVALID_SYNTAX, Vec::new());
    };
    if !(16..=256).contains(&ni.len()) {
        return refuse(notify::INVALID_SYNTAX, Vec::new());
    }
    let Some((number, bits, groups)) = pick_ike(config, offered, 8) else {
        return refuse(notify::NO_PROPOSAL_CHOSEN, Vec::new());
    };
    if !groups.contains(&group) {
        return refuse(notify::INVALID_KE_PAYLOAD, groups[0].to_be_bytes().to_vec());
    }
    if public.len() != crypto::public_value_len(group) {
        return refuse(notify::INVALID_SYNTAX, Vec::new());
    }
    let Some(spi_i) = offered
        .iter()
        .find(|p| p.number == number && p.protocol == PROTO_IKE)
        .and_then(|p| <[u8; 8]>::try_from(p.spi.as_slice()).ok())
        .filter(|s| *s != [0; 8])
    else {
        return refuse(notify::INVALID_SYNTAX, Vec::new());
    };
    let rng = ring::rand::SystemRandom::new();
    let mut spi_r = random::<8>(&rng)?;
    if spi_r == [0; 8] {
        spi_r[7] = 1;
    }
    let nr = random::<32>(&rng)?.to_vec();
    let exchange_key = KeyExchange::new(group, &rng)?;
    let ours = exchange_key.public_value().to_vec();
    let Ok(g_ir) = exchange_key.agree(public) else {
        return refuse(notify::INVALID_SYNTAX, Vec::new());
    };
    let keys = IkeKeys::derive_rekey(sk_d, &g_ir, ni, &nr, &spi_i, &spi_r, usize::from(bits / 8));
    let next = Keyed::new(false, spi_i, spi_r, &keys, 0)?;
    let reply = vec![
        Payload::Sa(vec![Proposal {
            number,
            protocol: PROTO_IKE,
            spi: spi_r.to_vec(),
            transforms: vec![
                Transform::with_key_length(ENCR, crypto::ENCR_AES_GCM_16, bits),
                Transform::new(PRF, crypto::PRF_HMAC_SHA2_256),
                Transform::new(DH, group),
            ],
        }]),
        Payload::Nonce(nr),
        Payload::Ke { group, data: ours },
    ];
    Ok((reply, Some(Box::new(next))))
}

/// What a liveness tick gave: its events, or, once the peer stopped answering (or a
/// request could not be made), the IKE SA closed with every CHILD_SA of it.
fn given_up(
    ticked: Result<Vec<Event>, IkeError>,
    state: &mut State,
    child: &mut Child,
) -> Vec<Event> {
    match ticked {
        Ok(events) => events,
        Err(e) => {
            *state = State::Closed;
            let mut events = child.gone();
            events.push(Event::Closed(format!("the peer is gone: {e}")));
            events
        }
    }
}

/// Answers a CREATE_CHILD_SA request of the peer (RFC 7296 §1.3.3): a rekey of our
/// CHILD_SA (REKEY_SA naming the peer's inbound SPI, which is our outbound one) gets a new
/// SA pair, its keys from SK_d and the exchange's nonces, its selectors those of the SA it
/// replaces; with a KE payload (PFS) in a group of ours, a new Diffie-Hellman exchange
/// too (RFC 7296 §2.17: g^ir before the nonces). Not offered: additional CHILD_SAs
/// (NO_ADDITIONAL_SAS). Rekeys of the IKE SA go to [`rekey_ike`].
fn rekey_child(
    payloads: &[Payload],
    config: &Config,
    sk_d: &[u8],
    child: &mut Child,
) -> Result<(Vec<Payload>, Option<ChildSa>), IkeError> {
    let refuse = |kind: u16| Ok((vec![status(kind, Vec::new())], None));
    let rekeyed = payloads.iter().find_map(|p| match p {
        Payload::Notify(n) if n.kind == notify::REKEY_SA && n.protocol == PROTO_ESP => {
            <[u8; 4]>::try_from(n.spi.as_slice())
                .ok()
                .map(u32::from_be_bytes)
        }
        _ => None,
    });
    let Some(old) = rekeyed else {
        return refuse(notify::NO_ADDITIONAL_SAS);
    };
    if child.outbound_spi != Some(old) {
        return refuse(notify::CHILD_SA_NOT_FOUND);
    }
    // One rekey at a time: the SA replaced last must be deleted first, and while a
    // rekey of ours is in flight, the peer's waits (it tries again later; ours goes on).
    if child.replaced.is_some() || child.rekeying.is_some() {
        return refuse(notify::TEMPORARY_FAILURE);
    }
    let mut offered = None;
    let mut ni = None;
    let mut ke = None;
    for p in payloads {
        match p {
            Payload::Sa(ps) => offered = Some(ps.as_slice()),
            Payload::Nonce(n) => ni = Some(n.as_slice()),
            Payload::Ke { group, data } => ke = Some((*group, data.as_slice())),
            _ => {}
        }
    }
    // A request we cannot read is answered, not left to time out.
    let (Some(offered), Some(ni)) = (offered, ni) else {
        return refuse(notify::INVALID_SYNTAX);
    };
    if !(16..=256).contains(&ni.len()) {
        return refuse(notify::INVALID_SYNTAX);
    }
    let rng = ring::rand::SystemRandom::new();
    let inbound_spi = u32::from_be_bytes(random::<4>(&rng)?) | 0x0000_0100;
    let Some((mut answer, outbound_spi, bits, esn)) = pick_esp(config, inbound_spi, offered) else {
        return refuse(notify::NO_PROPOSAL_CHOSEN);
    };
    // With PFS (a KE payload): a group of ours that the chosen proposal offers.
    let mut pfs = None;
    if let Some((group, public)) = ke {
        let offers = offered.iter().any(|p| {
            p.number == answer.number && p.transforms.iter().any(|t| t.kind == DH && t.id == group)
        });
        if !offers || !config.groups.contains(&group) {
            return refuse(notify::NO_PROPOSAL_CHOSEN);
        }
        let exchange_key = KeyExchange::new(group, &rng)?;
        let ours = exchange_key.public_value().to_vec();
        let Ok(g_ir) = exchange_key.agree(public) else {
            return refuse(notify::INVALID_SYNTAX);
        };
        answer.transforms.push(Transform::new(DH, group));
        pfs = Some((group, ours, g_ir));
    }
    let nr = random::<32>(&rng)?.to_vec();
    // The peer initiated this exchange: its nonce first, and the first keys are its
    // direction (to us); with PFS, g^ir (new) comes before the nonces.
    let (to_us, from_us) = crypto::child_keymat(
        sk_d,
        pfs.as_ref().map(|(_, _, g_ir)| g_ir.as_slice()),
        ni,
        &nr,
        usize::from(bits / 8),
    );
    let mut reply = vec![Payload::Sa(vec![answer]), Payload::Nonce(nr)];
    if let Some((group, data, _)) = pfs {
        reply.push(Payload::Ke { group, data });
    }
    reply.extend([
        Payload::TsI(child.remote_prefixes.iter().map(Prefix::selector).collect()),
        Payload::TsR(child.local_prefixes.iter().map(Prefix::selector).collect()),
    ]);
    child.replaced = Some((child.inbound_spi, old));
    child.inbound_spi = inbound_spi;
    child.outbound_spi = Some(outbound_spi);
    Ok((
        reply,
        Some(ChildSa {
            inbound_spi,
            outbound_spi,
            inbound_key: to_us,
            outbound_key: from_us,
            esn,
            local_prefixes: child.local_prefixes.clone(),
            remote_prefixes: child.remote_prefixes.clone(),
            rekeyed_by_us: false,
        }),
    ))
}

/// Whether `prefix` lies within the range `start`..=`end` (same address family).
fn within(prefix: &Prefix, start: IpAddr, end: IpAddr) -> bool {
    match (prefix.addr, prefix.last(), start, end) {
        (IpAddr::V4(lo), IpAddr::V4(hi), IpAddr::V4(s), IpAddr::V4(e)) => s <= lo && hi <= e,
        (IpAddr::V6(lo), IpAddr::V6(hi), IpAddr::V6(s), IpAddr::V6(e)) => s <= lo && hi <= e,
        _ => false,
    }
}

/// A responder's narrowing (RFC 7296 §2.9): the prefixes of ours that one of the
/// initiator's selectors (any protocol, all ports) covers.
fn narrow_to_ours(offered: &[TrafficSelector], ours: &[Prefix]) -> Vec<Prefix> {
    ours.iter()
        .filter(|p| {
            offered.iter().any(|ts| match ts {
                TrafficSelector::Range {
                    protocol: 0,
                    start_port: 0,
                    end_port: 65535,
                    start,
                    end,
                } => within(p, *start, *end),
                _ => false,
            })
        })
        .copied()
        .collect()
}

/// What a responder makes of a first IKE_SA_INIT request.
#[derive(Debug)]
pub enum Accepted {
    /// A new IKE SA and its IKE_SA_INIT response to send; later datagrams with its SPIs
    /// go to [`Responder::handle`].
    Sa(Box<Responder>, Vec<u8>),
    /// No IKE SA: send this answer (INVALID_KE_PAYLOAD naming the group wanted, or
    /// NO_PROPOSAL_CHOSEN); nothing is kept.
    Answer(Vec<u8>),
}

/// An IKE SA this end responds to: IKE_SA_INIT, IKE_AUTH with a pre-shared key and
/// the first CHILD_SA, then the initiator's liveness checks and deletes.
pub struct Responder {
    config: Config,
    state: State,
    spi_i: [u8; 8],
    spi_r: [u8; 8],
    ni: Vec<u8>,
    nr: Vec<u8>,
    /// IKE_SA_INIT request as received (the initiator's AUTH signs it).
    init_request: Vec<u8>,
    /// IKE_SA_INIT response as sent (our AUTH signs it).
    init_response: Vec<u8>,
    keys: IkeKeys,
    keyed: Keyed,
    child: Child,
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("state", &self.state)
            .field("spi_i", &hex8(&self.spi_i))
            .field("spi_r", &hex8(&self.spi_r))
            .finish_non_exhaustive()
    }
}

/// The largest IKE_SA_INIT request taken (it is kept until IKE_AUTH, and is never
/// fragmented: RFC 7383 §2.5).
pub const MAX_INIT_REQUEST: usize = 3000;

/// A responder's stateless COOKIE check (RFC 7296 §2.6), for a driver that has too many
/// half-open IKE SAs: `None` when the IKE_SA_INIT request `datagram` from `from` echoes
/// the cookie `secret` makes for it (go on with [`Responder::accept`]), else the answer
/// asking for that cookie, to send back and keep nothing. Change `secret` now and then:
/// cookies made with the one before stop working.
pub fn cookie_answer(
    secret: &[u8; 32],
    from: SocketAddr,
    datagram: &[u8],
) -> Result<Option<Vec<u8>>, IkeError> {
    let header = Header::decode(datagram)?;
    let message = Message::decode(datagram)?;
    let ni = message
        .payloads
        .iter()
        .find_map(|p| match p {
            Payload::Nonce(n) => Some(n.as_slice()),
            _ => None,
        })
        .ok_or_else(|| IkeError::Protocol("IKE_SA_INIT request without a Nonce".into()))?;
    let mut ip = match from.ip() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    ip.extend_from_slice(&from.port().to_be_bytes());
    let cookie = crypto::prf(secret, &[ni, &ip, &header.spi_i].concat()).to_vec();
    let echoed = message.notify(notify::COOKIE).map(|n| n.data.as_slice());
    if echoed.is_some_and(|e| crypto::equal(e, &cookie)) {
        return Ok(None);
    }
    Ok(Some(stateless_answer(&header, notify::COOKIE, cookie)?))
}

/// A plaintext IKE_SA_INIT answer that keeps no state (SPIr zero).
fn stateless_answer(request: &Header, kind: u16, data: Vec<u8>) -> Result<Vec<u8>, IkeError> {
    Ok(Message {
        header: Header {
            spi_i: request.spi_i,
            spi_r: [0; 8],
            next_payload: 0,
            version: wire::IKE_VERSION,
            exchange: exchange::IKE_SA_INIT,
            flags: flags::RESPONSE,
            message_id: 0,
            length: 0,
        },
        payloads: vec![status(kind, data)],
    }
    .encode()?)
}

/// The responder's pick of an IKE proposal: (proposal number, key bits, the groups it
/// offers that we take, ours first).
fn pick_ike(config: &Config, offered: &[Proposal], spi_len: usize) -> Option<(u8, u16, Vec<u16>)> {
    offered.iter().find_map(|p| {
        if p.protocol != PROTO_IKE || p.spi.len() != spi_len {
            return None;
        }
        let has = |kind: u8, id: u16| p.transforms.iter().any(|t| t.kind == kind && t.id == id);
        let aead_only = p.transforms.iter().all(|t| t.kind != INTEG || t.id == 0);
        let bits = config.key_bits.iter().copied().find(|b| {
            p.transforms.iter().any(|t| {
                t.kind == ENCR && t.id == crypto::ENCR_AES_GCM_16 && t.key_length() == Some(*b)
            })
        })?;
        let groups: Vec<u16> = config
            .groups
            .iter()
            .copied()
            .filter(|g| has(DH, *g))
            .collect();
        (aead_only && has(PRF, crypto::PRF_HMAC_SHA2_256) && !groups.is_empty())
            .then_some((p.number, bits, groups))
    })
}

/// The responder's pick of an ESP proposal: (our answer, the peer's SPI, key bits, ESN).
fn pick_esp(
    config: &Config,
    inbound_spi: u32,
    offered: &[Proposal],
) -> Option<(Proposal, u32, u16, bool)> {
    offered.iter().find_map(|p| {
        let spi = u32::from_be_bytes(<[u8; 4]>::try_from(p.spi.as_slice()).ok()?);
        if p.protocol != PROTO_ESP || spi < 256 {
            return None;
        }
        if p.transforms.iter().any(|t| t.kind == INTEG && t.id != 0) {
            return None;
        }
        let bits = config.key_bits.iter().copied().find(|b| {
            p.transforms.iter().any(|t| {
                t.kind == ENCR && t.id == crypto::ENCR_AES_GCM_16 && t.key_length() == Some(*b)
            })
        })?;
        let esn_offered = |v: u16| p.transforms.iter().any(|t| t.kind == ESN && t.id == v);
        let esn = if config.esn && esn_offered(1) {
            true
        } else if esn_offered(0) {
            false
        } else {
            return None;
        };
        let answer = Proposal {
            number: p.number,
            protocol: PROTO_ESP,
            spi: inbound_spi.to_be_bytes().to_vec(),
            transforms: vec![
                Transform::with_key_length(ENCR, crypto::ENCR_AES_GCM_16, bits),
                Transform::new(ESN, u16::from(esn)),
            ],
        };
        Some((answer, spi, bits, esn))
    })
}

impl Responder {
    /// Takes a first IKE_SA_INIT request (non-ESP marker removed): a new IKE SA and its
    /// response, or a stateless answer (another group wanted, nothing acceptable).
    ///
    /// It costs a key pair and a Diffie-Hellman computation and keeps the request: a
    /// driver under load asks for a COOKIE first ([`cookie_answer`]), and forgets
    /// responders that stay half-open ([`Responder::is_established`]) after a while.
    pub fn accept(config: Config, datagram: &[u8]) -> Result<Accepted, IkeError> {
        config.check()?;
        if datagram.len() > MAX_INIT_REQUEST {
            return Err(IkeError::Protocol(format!(
                "an IKE_SA_INIT request of {} bytes (at most {MAX_INIT_REQUEST})",
                datagram.len()
            )));
        }
        let header = Header::decode(datagram)?;
        if header.exchange != exchange::IKE_SA_INIT
            || !header.from_initiator()
            || header.is_response()
            || header.message_id != 0
            || header.spi_r != [0; 8]
        {
            return Err(IkeError::Protocol("expected an IKE_SA_INIT request".into()));
        }
        let message = Message::decode(datagram)?;
        let (offered, (group, public), ni) = init_payloads(&message, "request")?;
        let ni = ni.to_vec();
        let Some((number, bits, groups)) = pick_ike(&config, offered, 0) else {
            return Ok(Accepted::Answer(stateless_answer(
                &header,
                notify::NO_PROPOSAL_CHOSEN,
                Vec::new(),
            )?));
        };
        if !groups.contains(&group) {
            return Ok(Accepted::Answer(stateless_answer(
                &header,
                notify::INVALID_KE_PAYLOAD,
                groups[0].to_be_bytes().to_vec(),
            )?));
        }
        // Checked before any key is made for it.
        if public.len() != crypto::public_value_len(group) {
            return Err(IkeError::Protocol(format!(
                "a KE payload of {} bytes for group {group}",
                public.len()
            )));
        }
        let rng = ring::rand::SystemRandom::new();
        let mut spi_r = random::<8>(&rng)?;
        if spi_r == [0; 8] {
            spi_r[7] = 1;
        }
        let nr = random::<32>(&rng)?.to_vec();
        let inbound_spi = u32::from_be_bytes(random::<4>(&rng)?) | 0x0000_0100;
        let exchange_key = KeyExchange::new(group, &rng)?;
        let our_public = exchange_key.public_value().to_vec();
        let g_ir = exchange_key.agree(public)?;
        let keys = IkeKeys::derive(
            &ni,
            &nr,
            &g_ir,
            &header.spi_i,
            &spi_r,
            usize::from(bits / 8),
        );
        let mut payloads = vec![
            Payload::Sa(vec![Proposal {
                number,
                protocol: PROTO_IKE,
                spi: Vec::new(),
                transforms: vec![
                    Transform::with_key_length(ENCR, crypto::ENCR_AES_GCM_16, bits),
                    Transform::new(PRF, crypto::PRF_HMAC_SHA2_256),
                    Transform::new(DH, group),
                ],
            }]),
            Payload::Ke {
                group,
                data: our_public,
            },
            Payload::Nonce(nr.clone()),
        ];
        // Always UDP-encapsulated: claim a NAT in front of us, as the initiator does.
        let fake = SocketAddr::new(IpAddr::from(random::<16>(&rng)?), 4500);
        payloads.push(status(
            notify::NAT_DETECTION_SOURCE_IP,
            nat_hash(&header.spi_i, &spi_r, fake),
        ));
        payloads.push(status(
            notify::NAT_DETECTION_DESTINATION_IP,
            nat_hash(&header.spi_i, &spi_r, config.remote),
        ));
        // What we trust, so that the initiator sends its certificate.
        if let Some(c) = &config.certificates {
            payloads.push(Payload::CertReq {
                encoding: CERT_X509_SIGNATURE,
                data: c.authorities(),
            });
        }
        if message
            .notify(notify::IKEV2_FRAGMENTATION_SUPPORTED)
            .is_some()
        {
            payloads.push(status(notify::IKEV2_FRAGMENTATION_SUPPORTED, Vec::new()));
        }
        if message.notify(notify::SIGNATURE_HASH_ALGORITHMS).is_some() {
            payloads.push(status(
                notify::SIGNATURE_HASH_ALGORITHMS,
                SIGNATURE_HASHES.to_vec(),
            ));
        }
        let init_response = Message {
            header: Header {
                spi_i: header.spi_i,
                spi_r,
                next_payload: 0,
                version: wire::IKE_VERSION,
                exchange: exchange::IKE_SA_INIT,
                flags: flags::RESPONSE,
                message_id: 0,
                length: 0,
            },
            payloads,
        }
        .encode()?;
        // The initiator's IKE_AUTH is its request 1.
        let mut keyed = Keyed::new(false, header.spi_i, spi_r, &keys, 1)?;
        // Both said they take fragments (we answer FRAG_SUP when the request had it).
        keyed.fragments_ok = message
            .notify(notify::IKEV2_FRAGMENTATION_SUPPORTED)
            .is_some();
        let responder = Self {
            config,
            state: State::InitSent,
            spi_i: header.spi_i,
            spi_r,
            ni,
            nr,
            init_request: datagram.to_vec(),
            init_response: init_response.clone(),
            keys,
            keyed,
            child: Child {
                inbound_spi,
                ..Child::default()
            },
        };
        Ok(Accepted::Sa(Box::new(responder), init_response))
    }

    /// The IKE SA's SPIs (initiator's, responder's); after a rekey of the IKE SA, the
    /// new one's.
    pub fn spis(&self) -> ([u8; 8], [u8; 8]) {
        (self.keyed.spi_i, self.keyed.spi_r)
    }

    /// Whether a datagram with these SPIs is for this IKE SA (or the one a rekey
    /// replaced, until it is deleted).
    pub fn owns(&self, spi_i: [u8; 8], spi_r: [u8; 8]) -> bool {
        spi_i == self.spi_i || self.keyed.owns(spi_i, spi_r)
    }

    /// Whether the IKE SA is established.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// Whether the IKE SA is gone (refused, given up or deleted).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Ends the IKE SA from our side: once established, a delete for the peer (sent
    /// once), then [`Event::ChildDeleted`] for each CHILD_SA and [`Event::Closed`].
    pub fn close(&mut self, why: &str) -> Vec<Event> {
        if self.state == State::Closed {
            return Vec::new();
        }
        let mut events = Vec::new();
        if self.state == State::Established {
            if let Ok(bytes) = self.keyed.delete_request() {
                events.push(Event::Send(bytes));
            }
        }
        self.state = State::Closed;
        events.extend(self.child.gone());
        events.push(Event::Closed(why.to_string()));
        events
    }

    /// Rekeys the CHILD_SA ourselves: see [`Initiator::rekey_child`].
    pub fn rekey_child(&mut self, now: Instant) -> Result<Vec<Event>, IkeError> {
        if self.state != State::Established {
            return Ok(Vec::new());
        }
        self.keyed.start_rekey(&mut self.child, &self.config, now)
    }

    /// Authenticated messages from the initiator after IKE_SA_INIT (its requests,
    /// and answers to ours such as liveness checks).
    pub fn heard(&self) -> u64 {
        self.keyed.heard
    }

    /// Sends the liveness check that is due ([`Config::dpd`]) or retransmits it; an
    /// initiator that stopped answering closes the IKE SA: [`Event::ChildDeleted`] for
    /// each CHILD_SA, then [`Event::Closed`].
    pub fn on_timer(&mut self, now: Instant) -> Result<Vec<Event>, IkeError> {
        if self.state != State::Established {
            return Ok(Vec::new());
        }
        let ticked = self.keyed.tick(now);
        Ok(given_up(ticked, &mut self.state, &mut self.child))
    }

    /// When [`Responder::on_timer`] next has something to do.
    pub fn next_timer(&self) -> Option<Instant> {
        (self.state == State::Established)
            .then(|| self.keyed.next_timer())
            .flatten()
    }

    /// Handles a datagram from the initiator (non-ESP marker removed).
    pub fn handle(&mut self, datagram: &[u8], now: Instant) -> Result<Vec<Event>, IkeError> {
        let header = Header::decode(datagram)?;
        if self.state == State::Established && header.exchange != exchange::IKE_SA_INIT {
            let (events, closed) =
                self.keyed
                    .handle(datagram, &header, &mut self.child, &self.config, now)?;
            if closed {
                self.state = State::Closed;
            }
            return Ok(events);
        }
        if header.spi_i != self.spi_i || !header.from_initiator() {
            return Err(IkeError::Protocol("not for this IKE SA".into()));
        }
        if header.exchange == exchange::IKE_SA_INIT {
            // The request we answered, again: its answer was lost.
            if datagram == self.init_request.as_slice() {
                return Ok(vec![Event::Send(self.init_response.clone())]);
            }
            return Ok(Vec::new());
        }
        if header.spi_r != self.spi_r {
            return Err(IkeError::Protocol("not for this IKE SA".into()));
        }
        if self.state == State::Closed {
            return Ok(Vec::new());
        }
        if header.is_response() {
            return Ok(Vec::new());
        }
        if header.exchange != exchange::IKE_AUTH {
            return Err(IkeError::Protocol("expected the IKE_AUTH request".into()));
        }
        let payloads = match self.keyed.request(datagram, &header)? {
            Request::Again(bytes) => return Ok(bytes.into_iter().map(Event::Send).collect()),
            Request::Partial => return Ok(Vec::new()),
            Request::New(payloads) => payloads,
        };
        self.on_auth_request(&header, &payloads, now)
    }

    fn refuse(&mut self, header: &Header, kind: u16, why: String) -> Result<Vec<Event>, IkeError> {
        let response = self.keyed.respond(header, &[status(kind, Vec::new())])?;
        self.state = State::Closed;
        Ok(vec![Event::Send(response), Event::Closed(why)])
    }

    fn on_auth_request(
        &mut self,
        header: &Header,
        payloads: &[Payload],
        now: Instant,
    ) -> Result<Vec<Event>, IkeError> {
        let mut id_i = None;
        let mut auth = None;
        let mut offered = None;
        let mut ts_i = None;
        let mut ts_r = None;
        for p in payloads {
            match p {
                Payload::IdI(id) => id_i = Some(id),
                Payload::Auth { method, data } => auth = Some((*method, data.as_slice())),
                Payload::Sa(ps) => offered = Some(ps.as_slice()),
                Payload::TsI(t) => ts_i = Some(t.as_slice()),
                Payload::TsR(t) => ts_r = Some(t.as_slice()),
                _ => {}
            }
        }
        let (Some(id_i), Some((method, data))) = (id_i, auth) else {
            return self.refuse(
                header,
                notify::AUTHENTICATION_FAILED,
                "IKE_AUTH request without IDi or AUTH".into(),
            );
        };
        // Who it claims to be, then whether it holds the key: the same answer either
        // way, so a prober learns nothing of which identities are configured.
        let octets =
            crypto::signed_octets(&self.init_request, &self.nr, &self.keys.sk_pi, &id_i.body());
        if let Err(why) = peer_proved(&self.config, payloads, id_i, method, data, &octets) {
            return self.refuse(
                header,
                notify::AUTHENTICATION_FAILED,
                format!("the initiator's identity or AUTH did not verify ({why})"),
            );
        }
        let id_r = self.config.local_id.clone();
        let octets = crypto::signed_octets(
            &self.init_response,
            &self.ni,
            &self.keys.sk_pr,
            &id_r.body(),
        );
        let mut answer_auth = vec![Payload::IdR(id_r)];
        answer_auth.extend(our_auth(&self.config, &octets)?);
        let picked = offered.and_then(|o| pick_esp(&self.config, self.child.inbound_spi, o));
        let remote = ts_i.map(|t| narrow_to_ours(t, &self.config.remote_prefixes));
        let local = ts_r.map(|t| narrow_to_ours(t, &self.config.local_prefixes));
        let failure = match (&picked, &remote, &local) {
            (None, _, _) => Some((notify::NO_PROPOSAL_CHOSEN, "no acceptable ESP proposal")),
            (_, Some(r), Some(l)) if !r.is_empty() && !l.is_empty() => None,
            _ => Some((
                notify::TS_UNACCEPTABLE,
                "the traffic selectors cover none of our prefixes",
            )),
        };
        if let Some((kind, why)) = failure {
            // Authenticated, but no CHILD_SA: say why, then close.
            answer_auth.push(status(kind, Vec::new()));
            // It holds our certificates: fragments, as the full answer would be.
            let response = self.keyed.respond_all(header, &answer_auth)?;
            self.state = State::Closed;
            let mut events: Vec<Event> = response.into_iter().map(Event::Send).collect();
            events.push(Event::Closed(format!("no CHILD_SA: {why}")));
            return Ok(events);
        }
        let (Some((answer, outbound_spi, bits, esn)), Some(remote), Some(local)) =
            (picked, remote, local)
        else {
            return Err(IkeError::Protocol("no CHILD_SA".into()));
        };
        let mut reply = answer_auth;
        reply.extend([
            Payload::Sa(vec![answer]),
            Payload::TsI(remote.iter().map(Prefix::selector).collect()),
            Payload::TsR(local.iter().map(Prefix::selector).collect()),
        ]);
        let response = self.keyed.respond_all(header, &reply)?;
        let (i2r, r2i) = crypto::child_keymat(
            &self.keys.sk_d,
            None,
            &self.ni,
            &self.nr,
            usize::from(bits / 8),
        );
        self.child.outbound_spi = Some(outbound_spi);
        self.child.local_prefixes = local.clone();
        self.child.remote_prefixes = remote.clone();
        self.state = State::Established;
        // Our own requests (liveness checks) start at Message ID 0.
        self.keyed.established(now, 0, self.config.dpd);
        let mut events: Vec<Event> = response.into_iter().map(Event::Send).collect();
        events.push(Event::Established(ChildSa {
            inbound_spi: self.child.inbound_spi,
            outbound_spi,
            inbound_key: i2r,
            outbound_key: r2i,
            esn,
            local_prefixes: local,
            remote_prefixes: remote,
            rekeyed_by_us: false,
        }));
        Ok(events)
    }
}
