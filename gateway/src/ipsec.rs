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
    cookie_answer, Accepted, ChildSa, Config as IkeConfig, Event, IkeError, Initiator, Prefix,
    Responder,
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use x509_parser::prelude::FromDer as _;
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
    /// The pre-shared key (empty with certificates).
    pub psk: Zeroizing<Vec<u8>>,
    /// Where the pre-shared key came from (mode 0600).
    pub psk_file: PathBuf,
    /// Certificate authentication with `[identity]` (`auth = "certificate"`):
    /// `local_id` is then our certificate's subject DN, `remote_id` the peer's
    /// SPIFFE ID.
    pub certificates: Option<Arc<IkeCertificates>>,
    pub local_id: Identification,
    pub remote_id: Identification,
    /// Diffie-Hellman groups, most preferred first.
    pub groups: Vec<u16>,
    /// AES-GCM-16 key sizes, most preferred first.
    pub key_bits: Vec<u16>,
    pub dpd: Option<Duration>,
    /// Rekey the CHILD_SA ourselves when its SAs are this old (`rekey_seconds`);
    /// without it, at [`REKEY_SHARE`] of the hard limits if the peer did not first.
    pub rekey_after: Option<Duration>,
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
const ID_DER_ASN1_DN: u8 = 9;
/// Not sent (strongSwan's private URI type): how a peer's SPIFFE ID is kept.
const ID_URI: u8 = 201;

/// An identity that is a SPIFFE ID (certificate authentication).
pub fn spiffe_identity(id: &isthmus_identity::SpiffeId) -> Identification {
    Identification {
        id_type: ID_URI,
        data: id.to_string().into_bytes(),
    }
}

/// The SPIFFE ID an identity made by [`spiffe_identity`] holds.
pub fn spiffe_of(id: &Identification) -> Option<isthmus_identity::SpiffeId> {
    if id.id_type != ID_URI {
        return None;
    }
    isthmus_identity::SpiffeId::parse(std::str::from_utf8(&id.data).ok()?).ok()
}

/// Certificate authentication for IKE with this gateway's `[identity]`: our chain and
/// key (ECDSA P-256, RFC 7427 signatures), the peer's chain judged by the mesh trust
/// bundle and CRLs as the peer channel judges it, and then its SPIFFE ID (URI SAN) and
/// the DN it claimed as its identity.
pub struct IkeCertificates {
    /// What is in force now; replaced when the `[identity]` files change.
    state: std::sync::RwLock<Arc<CertState>>,
    remote: isthmus_identity::SpiffeId,
    /// Where it came from, and how the files looked then.
    files: Option<(crate::config::IdentityFiles, Mutex<Vec<FileStamp>>)>,
}

/// Our chain and key, and the trust the peer's chain is judged by.
struct CertState {
    chain: Vec<Vec<u8>>,
    dn: Identification,
    key: ring::signature::EcdsaKeyPair,
    verifier: isthmus_identity::ChainVerifier,
    authorities: Vec<u8>,
}

/// A file's path, size and modification time (or its absence).
type FileStamp = (PathBuf, Option<(u64, std::time::SystemTime)>);

impl std::fmt::Debug for IkeCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IkeCertificates")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

/// DER AlgorithmIdentifier of ecdsa-with-SHA256 (RFC 5758), as RFC 7427 carries it.
const ECDSA_WITH_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];

impl CertState {
    fn new(
        credentials: &isthmus_identity::LocalCredentials,
        trust: &isthmus_identity::MeshTrust,
    ) -> Result<Self, String> {
        let chain: Vec<Vec<u8>> = credentials.chain.iter().map(|c| c.to_vec()).collect();
        let leaf = chain
            .first()
            .ok_or("the certificate file holds no certificate")?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| format!("our certificate does not parse: {e}"))?;
        let dn = Identification {
            id_type: ID_DER_ASN1_DN,
            data: cert.subject().as_raw().to_vec(),
        };
        let rustls_pki_types::PrivateKeyDer::Pkcs8(pkcs8) = &credentials.key else {
            return Err("the private key is not PKCS#8 (IKE signs with ECDSA P-256)".into());
        };
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|_| "the private key is not an ECDSA P-256 key (IKE signs with it)")?;
        let verifier = isthmus_identity::ChainVerifier::new(trust).map_err(|e| e.to_string())?;
        let mut authorities = Vec::new();
        for root in &trust.roots {
            let (_, c) = x509_parser::parse_x509_certificate(root)
                .map_err(|e| format!("a trust bundle root does not parse: {e}"))?;
            let spki = c.tbs_certificate.subject_pki.raw;
            authorities.extend_from_slice(
                ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, spki).as_ref(),
            );
        }
        Ok(Self {
            chain,
            dn,
            key,
            verifier,
            authorities,
        })
    }
}

/// How the `[identity]` files look now (CRL directory entries included).
fn stamps(files: &crate::config::IdentityFiles) -> Vec<FileStamp> {
    let mut paths = vec![
        files.certificate.clone(),
        files.private_key.clone(),
        files.trust_bundle.clone(),
    ];
    paths.extend(files.crls.iter().cloned());
    if let Some(dir) = &files.crls_dir {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        entries.sort();
        paths.push(dir.clone());
        paths.extend(entries);
    }
    paths
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)));
            (p, meta)
        })
        .collect()
}

impl IkeCertificates {
    /// From this gateway's credentials and trust, for the peer `remote`; `files`, when
    /// given, are read again when they change ([`IkeCertificates::refresh`]).
    pub fn new(
        credentials: &isthmus_identity::LocalCredentials,
        trust: &isthmus_identity::MeshTrust,
        remote: isthmus_identity::SpiffeId,
        files: Option<crate::config::IdentityFiles>,
    ) -> Result<Self, String> {
        let state = CertState::new(credentials, trust)?;
        Ok(Self {
            state: std::sync::RwLock::new(Arc::new(state)),
            remote,
            files: files.map(|f| {
                let now = stamps(&f);
                (f, Mutex::new(now))
            }),
        })
    }

    fn current(&self) -> Arc<CertState> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Our identity now: our certificate's subject DN.
    pub fn identity(&self) -> Identification {
        self.current().dn.clone()
    }

    /// Reads the `[identity]` files again if they changed (a new CRL, a renewed
    /// certificate, a rotated trust bundle): new exchanges use them. Files that do
    /// not load leave what is in force (said in the log). Returns whether it changed.
    pub fn refresh(&self) -> bool {
        let Some((files, seen)) = &self.files else {
            return false;
        };
        let now = stamps(files);
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == now {
            return false;
        }
        *seen = now;
        let loaded = files
            .load_trust()
            .map_err(|e| e.to_string())
            .and_then(|trust| {
                let credentials = files.load_credentials().map_err(|e| e.to_string())?;
                CertState::new(&credentials, &trust)
            });
        match loaded {
            Ok(state) => {
                *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state);
                tracing::info!(remote = %self.remote, "IKE: certificates and trust read again");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "IKE: [identity] files changed but do not load; keeping those in force");
                false
            }
        }
    }
}

/// A DN's attributes, RDN by RDN, as (type, text): two encodings of one name (string
/// types) compare equal, different structures do not. `None` (never equal) when a value
/// is not text.
fn dn_fields(name: &x509_parser::x509::X509Name<'_>) -> Option<Vec<Vec<(String, String)>>> {
    name.iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|a| Some((a.attr_type().to_id_string(), a.as_str().ok()?.to_string())))
                .collect::<Option<Vec<_>>>()
        })
        .collect::<Option<Vec<_>>>()
        .filter(|rdns| !rdns.is_empty())
}

impl isthmus_ike::sa::Certificates for IkeCertificates {
    fn chain(&self) -> Vec<Vec<u8>> {
        self.current().chain.clone()
    }

    fn sign(&self, octets: &[u8]) -> Result<Vec<u8>, String> {
        let signature = self
            .current()
            .key
            .sign(&ring::rand::SystemRandom::new(), octets)
            .map_err(|_| "signing failed".to_string())?;
        let mut data = vec![ECDSA_WITH_SHA256.len() as u8];
        data.extend_from_slice(ECDSA_WITH_SHA256);
        data.extend_from_slice(signature.as_ref());
        Ok(data)
    }

    fn verify(&self, chain: &[Vec<u8>], id: &Identification) -> Result<Vec<u8>, String> {
        let presented = self
            .current()
            .verifier
            .verify(chain, std::time::SystemTime::now())
            .map_err(|e| e.to_string())?;
        if presented != self.remote {
            return Err(format!(
                "the certificate is {presented}, not {}",
                self.remote
            ));
        }
        let leaf_der = chain.first().ok_or("no certificate")?;
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der)
            .map_err(|e| format!("the certificate does not parse: {e}"))?;
        // The identity claimed is the certificate's subject, compared by value (an
        // implementation may encode the same name with other string types).
        if id.id_type != ID_DER_ASN1_DN {
            return Err(format!(
                "identity of type {}; a certificate's subject DN is expected",
                id.id_type
            ));
        }
        let (rest, claimed) = x509_parser::x509::X509Name::from_der(&id.data)
            .map_err(|_| "the identity is not a DN".to_string())?;
        if !rest.is_empty() {
            return Err("the identity has bytes after its DN".into());
        }
        let same = matches!(
            (dn_fields(&claimed), dn_fields(leaf.subject())),
            (Some(a), Some(b)) if a == b
        );
        if id.data != leaf.subject().as_raw() && !same {
            return Err(format!(
                "the identity {:?} is not the certificate's subject {:?}",
                claimed.to_string(),
                leaf.subject().to_string()
            ));
        }
        Ok(leaf.public_key().subject_public_key.data.to_vec())
    }

    fn authorities(&self) -> Vec<u8> {
        self.current().authorities.clone()
    }
}

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
        (ID_FQDN | ID_RFC822_ADDR | ID_URI, _) => {
            String::from_utf8_lossy(&id.data).escape_debug().to_string()
        }
        (ID_DER_ASN1_DN, _) => x509_parser::x509::X509Name::from_der(&id.data)
            .map(|(_, name)| name.to_string())
            .unwrap_or_else(|_| format!("DN {}", hex::encode(&id.data))),
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
    /// CHILD_SA rekeys installed since start (the peer's and ours).
    pub child_rekeys: u64,
    /// Of those, the ones we started.
    #[serde(default)]
    pub own_rekeys: u64,
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
    stray: Arc<AtomicU64>,
    core: Arc<EspCore>,
}

impl std::fmt::Debug for IkeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IkeService").finish_non_exhaustive()
    }
}

/// Sends one IKE message (without the non-ESP marker) to an address.
pub type SendFn = Arc<dyn Fn(SocketAddr, &[u8]) + Send + Sync>;

/// The IKE port, where peers start IKE_SA_INIT before moving to the ESP port.
pub const IKE_PORT: u16 = 500;
/// Datagrams taken from the IKE port per second at most (it only starts exchanges).
const IKE_PORT_RATE: u32 = 50;

/// Whether the IKE port lets a datagram by: one echoing a valid COOKIE always (a
/// spoofed source never sees one), others while fewer than [`IKE_PORT_RATE`] got by in
/// the current second (`window`: its start and count).
fn ike_port_admits(
    bytes: &[u8],
    from: SocketAddr,
    secret: &[u8; 32],
    window: &mut (Instant, u32),
    now: Instant,
) -> bool {
    let has_cookie = isthmus_ike::wire::Message::decode(bytes)
        .is_ok_and(|m| m.notify(isthmus_ike::sa::notify::COOKIE).is_some());
    if has_cookie && matches!(cookie_answer(secret, from, bytes), Ok(None)) {
        return true;
    }
    if now.saturating_duration_since(window.0) >= Duration::from_secs(1) {
        *window = (now, 0);
    }
    if window.1 >= IKE_PORT_RATE {
        return false;
    }
    window.1 += 1;
    true
}

/// Listens on the IKE port (UDP 500) for peers that start there: a thread hands their
/// datagrams to the control thread (at most [`IKE_PORT_RATE`] a second, from IKE peers'
/// addresses only); the answers leave from the same socket. `None` (said in the log)
/// when the port is taken: peers must then start on the ESP port.
fn ike_port(
    inbox: std::sync::mpsc::SyncSender<ControlDatagram>,
    peers: Vec<IpAddr>,
    cookie_secret: Arc<Mutex<[u8; 32]>>,
) -> Option<SendFn> {
    let bind = || -> std::io::Result<UdpSocket> {
        let sock = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        sock.set_only_v6(false)?;
        let any: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, IKE_PORT).into();
        sock.bind(&any.into())?;
        Ok(sock.into())
    };
    let (sock, v6) = match bind() {
        Ok(s) => (s, true),
        Err(_) => match UdpSocket::bind(("0.0.0.0", IKE_PORT)) {
            Ok(s) => (s, false),
            Err(e) => {
                tracing::warn!(error = %e, "IKE port {IKE_PORT} unavailable: IKE peers must start on the ESP port");
                return None;
            }
        },
    };
    let reader = sock.try_clone().ok()?;
    let spawned = std::thread::Builder::new()
        .name("ike-port".into())
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut window = (Instant::now(), 0u32);
            loop {
                let Ok((n, from)) = reader.recv_from(&mut buf) else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                if !peers.contains(&from.ip()) {
                    continue;
                }
                let secret = *cookie_secret.lock().unwrap_or_else(|e| e.into_inner());
                if !ike_port_admits(&buf[..n], from, &secret, &mut window, Instant::now()) {
                    continue;
                }
                let d = ControlDatagram::on_ike_port(from, buf[..n].to_vec());
                if let Err(std::sync::mpsc::TrySendError::Disconnected(_)) = inbox.try_send(d) {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no IKE port thread");
        return None;
    }
    tracing::info!(port = IKE_PORT, "IKE port listening");
    Some(Arc::new(move |to: SocketAddr, bytes: &[u8]| {
        let to = match (v6, to) {
            (true, SocketAddr::V4(a)) => {
                SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), a.port())
            }
            _ => to,
        };
        if let Err(e) = sock.send_to(bytes, to) {
            tracing::debug!(%to, error = %e, "IKE port send failed");
        }
    }))
}

/// IKE datagrams queued between the data path and the control thread.
const INBOX: usize = 256;
/// An initiator tries again this long after a failure, doubling up to
/// [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// New IKE SAs a responder peer may have half-open (answered, not yet
/// authenticated); a new one beyond evicts the oldest.
const MAX_HALF_OPEN: usize = 4;
/// From this many half-open IKE SAs on, a new IKE_SA_INIT must echo a COOKIE
/// (RFC 7296 §2.6): a spoofed source never sees it, so costs us no key exchange.
const COOKIE_AT: usize = 2;
/// A half-open IKE SA is forgotten after this long.
const HALF_OPEN_TTL: Duration = Duration::from_secs(20);
/// The COOKIE secret changes this often.
const COOKIE_SECRET_LIFE: Duration = Duration::from_secs(300);
/// With no rekey from the peer, the IKE SA is started over when the ESP SA in
/// use has had this share of its hard limits.
const HARD_LIMIT_SHARE: f64 = 0.9;
/// With no rekey from the peer, we rekey the CHILD_SA ourselves at this share of
/// the hard limits (before [`HARD_LIMIT_SHARE`] starts over).
pub const REKEY_SHARE: f64 = 0.8;
/// Our own rekeys are tried at most this often (one refused in a collision is
/// tried again).
const REKEY_RETRY: Duration = Duration::from_secs(2);

/// IKE datagrams dropped, for the status.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct IkeDrops {
    /// From no IKE peer's address, or for no IKE SA of theirs, or unreadable.
    pub stray: u64,
    /// Not queued: the control thread was behind, or too many new exchanges waited.
    pub overflow: u64,
}

impl IkeService {
    /// Starts the control thread for `peers`; IKE on the ESP port from their
    /// addresses goes to it from now on. `esp_port` is this gateway's ESP port
    /// (NAT detection).
    pub fn start(
        core: Arc<EspCore>,
        sender: ControlSender,
        peers: Vec<IkePeerConfig>,
        esp_port: u16,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(INBOX);
        let addresses: Vec<IpAddr> = peers.iter().map(|p| p.endpoint.ip()).collect();
        if !core.set_control_inbox(tx.clone(), addresses.clone()) {
            return Err(std::io::Error::other("IKE runs already on this ESP core"));
        }
        let send: SendFn = Arc::new(move |to, bytes| sender.send(to, bytes));
        let mut control = Control::new(core.clone(), send, peers, esp_port)?;
        control.send_ike_port = ike_port(tx, addresses, control.cookie_secret.clone());
        let (status, stray) = (control.status.clone(), control.stray.clone());
        std::thread::Builder::new()
            .name("ike".into())
            .spawn(move || {
                let run =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| control.run(&rx)));
                if let Err(panic) = run {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    control.failed(&why);
                }
            })?;
        Ok(Self {
            status,
            stray,
            core,
        })
    }

    pub fn status(&self) -> Vec<IkePeerStatus> {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn drops(&self) -> IkeDrops {
        IkeDrops {
            stray: self.stray.load(Ordering::Relaxed),
            overflow: self.core.control_overflow(),
        }
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
    fn close(&mut self, why: &str) -> Vec<Event> {
        match self {
            Sa::I(s) => s.close(why),
            Sa::R(s) => s.close(why),
        }
    }
    fn rekey_child(&mut self, now: Instant) -> Result<Vec<Event>, IkeError> {
        match self {
            Sa::I(s) => s.rekey_child(now),
            Sa::R(s) => s.rekey_child(now),
        }
    }
}

/// Which IKE SA of a peer something came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Slot {
    /// The one in force (or being set up, as initiator).
    Current,
    /// A half-open one the peer started (its initiator SPI): it becomes current
    /// only once authenticated.
    HalfOpen([u8; 8]),
}

struct HalfOpen {
    sa: Sa,
    from: SocketAddr,
    since: Instant,
    /// Started on the IKE port: answered from it until the peer moves to ours.
    via_ike_port: bool,
}

struct PeerRun {
    cfg: IkePeerConfig,
    /// Our address as the peer sees it (NAT detection).
    local: SocketAddr,
    /// Where the peer's IKE and ESP go (a responder learns the port).
    remote: SocketAddr,
    current: Option<Sa>,
    half_open: Vec<HalfOpen>,
    esp: Option<Arc<EspPeer>>,
    /// CHILD_SAs in force, oldest first: (inbound SPI, outbound SPI).
    pairs: Vec<(u32, u32)>,
    retry_at: Instant,
    backoff: Duration,
    established_at: Option<Instant>,
    heard: (u64, Option<Instant>),
    child_rekeys: u64,
    own_rekeys: u64,
    /// When we last tried a rekey of our own.
    rekey_tried: Option<Instant>,
    established: u64,
    last_error: Option<String>,
    /// The IKE thread stopped (a bug): nothing is keyed any more.
    failed: bool,
    /// When the peer's recent IKE_SA_INIT requests were taken up (whatever came of
    /// them): from [`COOKIE_AT`] within [`HALF_OPEN_TTL`] on, a COOKIE is asked first.
    attempts: Vec<Instant>,
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
            half_open: Vec::new(),
            esp: None,
            pairs: Vec::new(),
            retry_at: Instant::now(),
            backoff: FIRST_RETRY,
            established_at: None,
            heard: (0, None),
            child_rekeys: 0,
            own_rekeys: 0,
            rekey_tried: None,
            established: 0,
            last_error: None,
            failed: false,
            attempts: Vec::new(),
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
            local_id: match &self.cfg.certificates {
                Some(c) => c.identity(),
                None => self.cfg.local_id.clone(),
            },
            remote_id: self.cfg.remote_id.clone(),
            psk: self.cfg.psk.clone(),
            certificates: self
                .cfg
                .certificates
                .clone()
                .map(|c| c as Arc<dyn isthmus_ike::sa::Certificates>),
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

    fn sa_mut(&mut self, slot: Slot) -> Option<(&mut Sa, SocketAddr)> {
        match slot {
            Slot::Current => {
                let to = self.remote;
                self.current.as_mut().map(|sa| (sa, to))
            }
            Slot::HalfOpen(spi) => self
                .half_open
                .iter_mut()
                .find(|h| h.sa.spis().0 == spi)
                .map(|h| (&mut h.sa, h.from)),
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let retry = (self.cfg.role == IkeRole::Initiator && self.current.is_none())
            .then_some(self.retry_at);
        self.current
            .as_ref()
            .and_then(Sa::next_timer)
            .into_iter()
            .chain(self.half_open.iter().map(|h| h.since + HALF_OPEN_TTL))
            .chain(retry)
            .min()
    }

    fn status(&self, now: Instant) -> IkePeerStatus {
        let state = match &self.current {
            _ if self.failed => "failed",
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
            own_rekeys: self.own_rekeys,
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

    /// Whether to rekey the CHILD_SA ourselves now: its SAs are `rekey_after` old, or
    /// near their hard limits, and no try was made just before.
    fn rekey_due(&self, now: Instant) -> bool {
        let (Some(esp), Some(sa)) = (&self.esp, &self.current) else {
            return false;
        };
        if !sa.is_established()
            || self
                .rekey_tried
                .is_some_and(|t| now.saturating_duration_since(t) < REKEY_RETRY)
        {
            return false;
        }
        let aged = self
            .cfg
            .rekey_after
            .is_some_and(|after| esp.status(now).outbound.age_secs >= after.as_secs_f64());
        aged || esp.nears_hard_limit(REKEY_SHARE, now)
    }

    /// Whether the ESP SA in use has had most of its hard limits with no rekey
    /// from the peer.
    fn near_hard_limit(&self, now: Instant) -> bool {
        self.esp
            .as_ref()
            .is_some_and(|esp| esp.nears_hard_limit(HARD_LIMIT_SHARE, now))
    }
}

struct Control {
    peers: Vec<PeerRun>,
    core: Arc<EspCore>,
    send: SendFn,
    /// Sends from the IKE port (500), when it is ours.
    send_ike_port: Option<SendFn>,
    status: Arc<Mutex<Vec<IkePeerStatus>>>,
    stray: Arc<AtomicU64>,
    /// Shared with the IKE port's thread, which lets requests with a valid COOKIE by.
    cookie_secret: Arc<Mutex<[u8; 32]>>,
    cookie_since: Instant,
    /// When the `[identity]` files were last looked at.
    files_checked: Instant,
}

/// How often certificate peers' `[identity]` files are looked at for changes.
const FILES_CHECK: Duration = Duration::from_secs(1);

fn cookie_secret() -> std::io::Result<[u8; 32]> {
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| std::io::Error::other("no randomness for the COOKIE secret"))?;
    Ok(secret)
}

impl Control {
    fn new(
        core: Arc<EspCore>,
        send: SendFn,
        peers: Vec<IkePeerConfig>,
        esp_port: u16,
    ) -> std::io::Result<Self> {
        Ok(Self {
            peers: peers
                .into_iter()
                .map(|cfg| PeerRun::new(cfg, esp_port))
                .collect(),
            core,
            send,
            send_ike_port: None,
            status: Arc::new(Mutex::new(Vec::new())),
            stray: Arc::default(),
            cookie_secret: Arc::new(Mutex::new(cookie_secret()?)),
            cookie_since: Instant::now(),
            files_checked: Instant::now(),
        })
    }

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
                    // What else arrived, up to a queue's worth: timers run in between
                    // even while a flood keeps the queue full.
                    for d in inbox.try_iter().take(INBOX) {
                        self.datagram(&d, Instant::now());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// The thread stopped on a bug: no SA of ours stays keyed (fail closed), and the
    /// status says so.
    fn failed(&mut self, why: &str) {
        tracing::error!(error = %why, "the IKE thread failed; IKE-keyed tunnels are down");
        for p in &mut self.peers {
            if let Some(esp) = p.esp.take() {
                self.core.remove_peer(&esp);
            }
            p.pairs.clear();
            p.failed = true;
            p.last_error = Some(format!("the IKE thread failed: {why}"));
        }
        self.publish(Instant::now());
    }

    fn publish(&self, now: Instant) {
        let doc = self.peers.iter().map(|p| p.status(now)).collect();
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = doc;
    }

    fn stray(&self, why: &str, from: SocketAddr) {
        self.stray.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%from, "IKE datagram dropped: {why}");
    }

    fn timers(&mut self, now: Instant) {
        if now.saturating_duration_since(self.cookie_since) >= COOKIE_SECRET_LIFE {
            if let Ok(secret) = cookie_secret() {
                *self.cookie_secret.lock().unwrap_or_else(|e| e.into_inner()) = secret;
                self.cookie_since = now;
            }
        }
        if now.saturating_duration_since(self.files_checked) >= FILES_CHECK {
            self.files_checked = now;
            for p in &self.peers {
                if let Some(c) = &p.cfg.certificates {
                    c.refresh();
                }
            }
        }
        for i in 0..self.peers.len() {
            let p = &mut self.peers[i];
            p.half_open
                .retain(|h| now.saturating_duration_since(h.since) < HALF_OPEN_TTL);
            if p.cfg.role == IkeRole::Initiator && p.current.is_none() && now >= p.retry_at {
                let config = p.ike_config(p.cfg.endpoint);
                match Initiator::start(config, now) {
                    Ok((sa, first)) => {
                        tracing::info!(peer = %p.name(), endpoint = %p.cfg.endpoint, "IKE: initiating");
                        p.current = Some(Sa::I(Box::new(sa)));
                        p.remote = p.cfg.endpoint;
                        (self.send)(p.remote, &first);
                    }
                    Err(e) => {
                        p.last_error = Some(e.to_string());
                        p.retry_at = now + MAX_RETRY;
                    }
                }
            }
            if self.peers[i].rekey_due(now) {
                self.peers[i].rekey_tried = Some(now);
                if let Some(sa) = self.peers[i].current.as_mut() {
                    let result = sa.rekey_child(now);
                    self.outcome(i, Slot::Current, result, now);
                }
            }
            if self.peers[i].near_hard_limit(now) {
                self.close_current(
                    i,
                    "the ESP SA neared its hard limit with no rekey from the peer; starting over",
                    now,
                );
            }
            let p = &mut self.peers[i];
            let due: Vec<Slot> = p
                .current
                .iter()
                .filter(|sa| sa.next_timer().is_some_and(|t| t <= now))
                .map(|_| Slot::Current)
                .collect();
            for slot in due {
                if let Some((sa, _)) = self.peers[i].sa_mut(slot) {
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
        let p = &self.peers[i];
        let owns = |sa: &Sa| sa.owns(header.spi_i, header.spi_r);
        let slot = if p.current.as_ref().is_some_and(owns) {
            Slot::Current
        } else if let Some(h) = p.half_open.iter().find(|h| owns(&h.sa)) {
            Slot::HalfOpen(h.sa.spis().0)
        } else if p.cfg.role == IkeRole::Responder
            && header.exchange == exchange::IKE_SA_INIT
            && header.from_initiator()
            && !header.is_response()
            && header.spi_r == [0; 8]
        {
            return self.accept(i, d, now);
        } else {
            return self.stray("for no IKE SA of this peer", d.from);
        };
        if let Some((sa, _)) = self.peers[i].sa_mut(slot) {
            let heard = sa.heard();
            let result = sa.handle(&d.bytes, now);
            let authentic = sa.heard() != heard;
            if let (Slot::HalfOpen(spi), Ok(_), true) = (slot, &result, authentic) {
                // An authenticated message of the exchange that opened: the peer is where
                // it came from (it moves from the IKE port to ours after IKE_SA_INIT).
                if let Some(h) = self.peers[i]
                    .half_open
                    .iter_mut()
                    .find(|h| h.sa.spis().0 == spi)
                {
                    h.from = d.from;
                    h.via_ike_port = d.via_ike_port;
                }
            }
            self.outcome(i, slot, result, now);
        }
    }

    /// Sends `bytes` to `to` from the IKE port if `via_ike_port` (and it is ours), else
    /// from the ESP port.
    fn send_via(&self, via_ike_port: bool, to: SocketAddr, bytes: &[u8]) {
        match (&self.send_ike_port, via_ike_port) {
            (Some(send), true) => send(to, bytes),
            _ => (self.send)(to, bytes),
        }
    }

    /// A new IKE SA from a responder peer: half-open until authenticated (a spoofed
    /// request can make one, never replace the SA in force). With a few half-open
    /// already, the request must echo a COOKIE first.
    fn accept(&mut self, i: usize, d: &ControlDatagram, now: Instant) {
        // Counted by requests taken up, not SAs made: a request whose key exchange
        // fails (a bad KE) costs as much and leaves nothing half-open.
        let p = &mut self.peers[i];
        p.attempts
            .retain(|t| now.saturating_duration_since(*t) < HALF_OPEN_TTL);
        if p.attempts.len() >= COOKIE_AT {
            let secret = *self.cookie_secret.lock().unwrap_or_else(|e| e.into_inner());
            match cookie_answer(&secret, d.from, &d.bytes) {
                Ok(None) => {}
                Ok(Some(ask)) => return self.send_via(d.via_ike_port, d.from, &ask),
                Err(_) => return self.stray("unreadable IKE_SA_INIT", d.from),
            }
        }
        let p = &mut self.peers[i];
        p.attempts.push(now);
        match Responder::accept(p.ike_config(d.from), &d.bytes) {
            Ok(Accepted::Sa(sa, answer)) => {
                if p.half_open.len() >= MAX_HALF_OPEN {
                    p.half_open.remove(0);
                }
                p.half_open.push(HalfOpen {
                    sa: Sa::R(sa),
                    from: d.from,
                    since: now,
                    via_ike_port: d.via_ike_port,
                });
                self.send_via(d.via_ike_port, d.from, &answer);
            }
            Ok(Accepted::Answer(bytes)) => self.send_via(d.via_ike_port, d.from, &bytes),
            Err(e) => {
                tracing::debug!(peer = %p.name(), error = %e, "IKE_SA_INIT refused");
                self.stray("IKE_SA_INIT refused", d.from);
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
        let Some((sa, to)) = p.sa_mut(slot) else {
            return;
        };
        let closed = sa.is_closed();
        let heard = sa.heard();
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
                self.stray.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %p.name(), error = %e, "IKE datagram dropped");
            }
        }
        if self.peers[i]
            .sa_mut(slot)
            .is_some_and(|(sa, _)| sa.is_closed())
        {
            self.closed(i, slot, "closed".into(), now);
        }
    }

    fn event(&mut self, i: usize, slot: Slot, to: SocketAddr, event: Event, now: Instant) {
        match event {
            Event::Send(bytes) => {
                let via_ike_port = match slot {
                    Slot::HalfOpen(spi) => self.peers[i]
                        .half_open
                        .iter()
                        .any(|h| h.sa.spis().0 == spi && h.via_ike_port),
                    Slot::Current => false,
                };
                self.send_via(via_ike_port, to, &bytes);
            }
            Event::Established(child) => self.established(i, slot, &child, now),
            Event::ChildRekeyed(child) if slot == Slot::Current => self.rekeyed(i, &child, now),
            Event::ChildDeleted(spi) if slot == Slot::Current => self.child_deleted(i, spi, now),
            Event::ChildRekeyed(_) | Event::ChildDeleted(_) => {}
            Event::Closed(why) => self.closed(i, slot, why, now),
        }
    }

    /// Ends the IKE SA in force from our side (a delete for the peer): an initiator
    /// starts over, a responder waits for the peer.
    fn close_current(&mut self, i: usize, why: &str, now: Instant) {
        let p = &mut self.peers[i];
        let (to, name) = (p.remote, p.name());
        let Some(sa) = p.current.as_mut() else {
            return;
        };
        tracing::info!(peer = %name, reason = %why, "closing the IKE SA");
        for event in sa.close(why) {
            self.event(i, Slot::Current, to, event, now);
        }
    }

    fn established(&mut self, i: usize, slot: Slot, child: &ChildSa, now: Instant) {
        let p = &mut self.peers[i];
        if let Slot::HalfOpen(spi) = slot {
            // Authenticated: it replaces whatever was in force (the peer started
            // over, its old state lost).
            let Some(at) = p.half_open.iter().position(|h| h.sa.spis().0 == spi) else {
                return;
            };
            let h = p.half_open.remove(at);
            if p.current.as_ref().is_some_and(Sa::is_established) {
                tracing::info!(peer = %p.name(), "IKE: the peer started a new IKE SA; it replaces ours");
            }
            p.current = Some(h.sa);
            p.remote = h.from;
        }
        if let Some(old) = p.esp.take() {
            self.core.remove_peer(&old);
        }
        p.pairs.clear();
        let to = p.remote;
        let installed = sa_pair(child).and_then(|(cipher, pair)| {
            // Our selectors bound where the peer may send: none would mean anywhere.
            let local_prefixes = child
                .local_prefixes
                .iter()
                .map(|x| IpPrefix::new_truncating(x.addr, x.len))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            if local_prefixes.is_empty() {
                return Err("a CHILD_SA with no selectors of ours".into());
            }
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
                        local_prefixes,
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
                tracing::warn!(peer = %p.name(), error = %e, "CHILD_SA not installed");
                self.close_current(i, &format!("CHILD_SA not installed: {e}"), now);
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
                .install_pair(&esp, &pair, child.rekeyed_by_us, now)
                .map_err(|e| e.to_string())
        });
        match installed {
            Ok(generation) => {
                tracing::info!(
                    peer = %p.name(),
                    inbound_spi = format_args!("{:#010x}", child.inbound_spi),
                    outbound_spi = format_args!("{:#010x}", child.outbound_spi),
                    generation,
                    "CHILD_SA rekeyed by {}",
                    if child.rekeyed_by_us { "us" } else { "the peer" }
                );
                p.pairs.push((child.inbound_spi, child.outbound_spi));
                p.child_rekeys += 1;
                if child.rekeyed_by_us {
                    p.own_rekeys += 1;
                }
            }
            Err(e) => {
                // The peer has the new pair and we cannot use it: start over rather
                // than keep an IKE SA whose CHILD_SA goes nowhere.
                tracing::warn!(peer = %p.name(), error = %e, "rekeyed CHILD_SA not installed");
                self.close_current(i, &format!("rekeyed CHILD_SA not installed: {e}"), now);
            }
        }
    }

    fn child_deleted(&mut self, i: usize, spi: u32, now: Instant) {
        let p = &mut self.peers[i];
        let Some(esp) = p.esp.clone() else {
            return;
        };
        if p.pairs.last().is_some_and(|(inbound, _)| *inbound == spi) {
            // The pair in force is gone: no tunnel is left, and one IKE SA carries one
            // CHILD_SA here, so it is started over (the peer is told).
            self.core.remove_peer(&esp);
            p.esp = None;
            p.pairs.clear();
            if p.current.as_ref().is_some_and(|sa| !sa.is_closed()) {
                self.close_current(i, "the peer deleted the CHILD_SA in force", now);
            }
        } else {
            self.core.remove_inbound(&esp, spi);
            p.pairs.retain(|(inbound, _)| *inbound != spi);
        }
    }

    fn closed(&mut self, i: usize, slot: Slot, why: String, now: Instant) {
        let p = &mut self.peers[i];
        if let Slot::HalfOpen(spi) = slot {
            let before = p.half_open.len();
            p.half_open.retain(|h| h.sa.spis().0 != spi);
            if p.half_open.len() < before {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use isthmus_ike::sa::notify;
    use isthmus_ike::wire::Message;

    const PSK: &str = "a-test-pre-shared-key-of-length";

    fn fqdn(name: &str) -> Identification {
        Identification {
            id_type: ID_FQDN,
            data: name.as_bytes().to_vec(),
        }
    }

    fn prefix(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    /// Site 1's gateway: its IKE peer, site 2, at 192.0.2.2.
    fn peer_cfg(role: IkeRole) -> IkePeerConfig {
        IkePeerConfig {
            name: Some("site-2".into()),
            endpoint: "192.0.2.2:4500".parse().unwrap(),
            remote_prefixes: vec![prefix("100.64.2.0/24")],
            local_prefixes: vec![prefix("100.64.1.0/24")],
            role,
            psk: Zeroizing::new(PSK.as_bytes().to_vec()),
            psk_file: PathBuf::from("/dev/null"),
            certificates: None,
            local_id: fqdn("gw1.test"),
            remote_id: fqdn("gw2.test"),
            groups: vec![19],
            key_bits: vec![256],
            dpd: None,
            rekey_after: None,
            esn: true,
            lifetimes: Lifetimes::default(),
        }
    }

    /// Site 2's side, initiating toward site 1.
    fn site2() -> IkeConfig {
        IkeConfig {
            local_id: fqdn("gw2.test"),
            remote_id: fqdn("gw1.test"),
            psk: Zeroizing::new(PSK.as_bytes().to_vec()),
            certificates: None,
            groups: vec![19],
            key_bits: vec![256],
            local_prefixes: vec![to_prefix(&prefix("100.64.2.0/24"))],
            remote_prefixes: vec![to_prefix(&prefix("100.64.1.0/24"))],
            local: "192.0.2.2:4500".parse().unwrap(),
            remote: "192.0.2.1:4500".parse().unwrap(),
            esn: true,
            dpd: None,
        }
    }

    type Wire = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

    fn control(role: IkeRole) -> (Control, Wire, Arc<EspCore>) {
        let core = Arc::new(EspCore::new(Vec::new(), Instant::now()).unwrap());
        let wire: Wire = Arc::default();
        let w = wire.clone();
        let send: SendFn = Arc::new(move |to, bytes| w.lock().unwrap().push((to, bytes.to_vec())));
        let control = Control::new(core.clone(), send, vec![peer_cfg(role)], 4500).unwrap();
        (control, wire, core)
    }

    fn sent(wire: &Wire) -> Vec<Vec<u8>> {
        wire.lock().unwrap().drain(..).map(|(_, b)| b).collect()
    }

    fn sends(events: Vec<Event>) -> Vec<Vec<u8>> {
        events
            .into_iter()
            .filter_map(|e| match e {
                Event::Send(b) => Some(b),
                _ => None,
            })
            .collect()
    }

    const PEER: &str = "192.0.2.2:4500";

    fn from_peer(bytes: Vec<u8>) -> ControlDatagram {
        ControlDatagram::new(PEER.parse().unwrap(), bytes)
    }

    /// Runs site 2's initiator against the control thread until it is up.
    fn bring_up(c: &mut Control, wire: &Wire, mut sa: Initiator, first: Vec<u8>) -> bool {
        let now = Instant::now();
        let mut to_us = vec![first];
        for _ in 0..6 {
            for d in to_us.drain(..) {
                c.datagram(&from_peer(d), now);
            }
            for answer in sent(wire) {
                let Ok(events) = sa.handle(&answer, now) else {
                    continue;
                };
                if events.iter().any(|e| matches!(e, Event::Established(_))) {
                    return true;
                }
                to_us.extend(sends(events));
            }
        }
        false
    }

    #[test]
    fn a_spoofed_ike_sa_init_does_not_displace_the_real_peers_exchange() {
        let now = Instant::now();
        let (mut c, wire, core) = control(IkeRole::Responder);
        let (mut real, first) = Initiator::start(site2(), now).unwrap();
        c.datagram(&from_peer(first), now);
        let answer = sent(&wire).pop().expect("IKE_SA_INIT answered");
        // Someone spoofing the peer's address starts another exchange.
        let (_, spoofed) = Initiator::start(site2(), now).unwrap();
        c.datagram(&from_peer(spoofed), now);
        sent(&wire);
        // The real peer goes on with IKE_AUTH, and gets its answer.
        let auth = sends(real.handle(&answer, now).unwrap());
        c.datagram(&from_peer(auth[0].clone()), now);
        let response = sent(&wire).pop().expect("IKE_AUTH answered");
        let events = real.handle(&response, now).unwrap();
        assert!(events.iter().any(|e| matches!(e, Event::Established(_))));
        c.publish(now);
        let status = c.status.lock().unwrap()[0].clone();
        assert_eq!(
            (status.state.as_str(), status.established),
            ("established", 1)
        );
        assert_eq!(core.peers().peers().len(), 1, "the CHILD_SA is keyed");
    }

    #[test]
    fn a_flood_of_new_exchanges_gets_cookie_requests_not_key_exchanges() {
        let now = Instant::now();
        let (mut c, wire, core) = control(IkeRole::Responder);
        let cookie_asked =
            |bytes: &[u8]| Message::decode(bytes).is_ok_and(|m| m.notify(notify::COOKIE).is_some());
        let mut answers = Vec::new();
        for _ in 0..20 {
            let (_, spoofed) = Initiator::start(site2(), now).unwrap();
            c.datagram(&from_peer(spoofed), now);
            answers.extend(sent(&wire));
        }
        // A few were taken half-open; every other one only got a COOKIE request.
        assert_eq!(c.peers[0].half_open.len(), COOKIE_AT);
        assert_eq!(
            answers.iter().filter(|a| cookie_asked(a)).count(),
            20 - COOKIE_AT
        );
        // The real peer echoes its cookie and gets in.
        let (real, first) = Initiator::start(site2(), now).unwrap();
        assert!(bring_up(&mut c, &wire, real, first));
        assert_eq!(core.peers().peers().len(), 1);
    }

    #[test]
    fn requests_with_bad_key_exchanges_also_get_cookie_requests() {
        let now = Instant::now();
        let (mut c, wire, _core) = control(IkeRole::Responder);
        // Each makes us generate a key pair, then fails: no half-open SA is left.
        let bad_ke = || {
            let (_, first) = Initiator::start(site2(), now).unwrap();
            let mut m = Message::decode(&first).unwrap();
            for p in &mut m.payloads {
                if let isthmus_ike::wire::Payload::Ke { data, .. } = p {
                    data.iter_mut().for_each(|b| *b = 0xff);
                }
            }
            m.encode().unwrap()
        };
        let mut cookies = 0;
        for _ in 0..20 {
            c.datagram(&from_peer(bad_ke()), now);
            cookies += sent(&wire)
                .iter()
                .filter(|a| Message::decode(a).is_ok_and(|m| m.notify(notify::COOKIE).is_some()))
                .count();
        }
        assert!(c.peers[0].half_open.is_empty());
        assert_eq!(
            cookies,
            20 - COOKIE_AT,
            "key exchanges were made for a flood"
        );
    }

    #[test]
    fn an_unauthenticated_replay_does_not_move_a_half_open_ike_sa() {
        let now = Instant::now();
        let (mut c, wire, _core) = control(IkeRole::Responder);
        let (_, first) = Initiator::start(site2(), now).unwrap();
        c.datagram(&from_peer(first.clone()), now);
        sent(&wire);
        // The same request again, from another port of the peer's address, to port 500.
        let elsewhere: SocketAddr = "192.0.2.2:9999".parse().unwrap();
        c.datagram(&ControlDatagram::on_ike_port(elsewhere, first), now);
        let h = &c.peers[0].half_open[0];
        assert_eq!((h.from, h.via_ike_port), (PEER.parse().unwrap(), false));
    }

    #[test]
    fn a_wrong_key_leaves_the_ike_sa_in_force() {
        let now = Instant::now();
        let (mut c, wire, core) = control(IkeRole::Responder);
        let (real, first) = Initiator::start(site2(), now).unwrap();
        assert!(bring_up(&mut c, &wire, real, first));
        let mut wrong = site2();
        wrong.psk = Zeroizing::new(b"another-key-entirely-000000".to_vec());
        let (bad, first) = Initiator::start(wrong, now).unwrap();
        assert!(!bring_up(&mut c, &wire, bad, first));
        c.publish(now);
        let status = c.status.lock().unwrap()[0].clone();
        assert_eq!(status.state, "established");
        assert!(status.last_error.is_some(), "{status:?}");
        assert_eq!(core.peers().peers().len(), 1);
    }
}

#[cfg(test)]
mod dn_tests {
    use super::*;

    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        assert!(body.len() < 128);
        [&[tag, body.len() as u8][..], body].concat()
    }

    /// A DN of one RDN holding one attribute (OID 2.5.4.x, UTF8String).
    fn one_rdn(attr: u8, value: &str) -> Vec<u8> {
        let oid = tlv(0x06, &[0x55, 0x04, attr]);
        let atv = tlv(0x30, &[oid, tlv(0x0c, value.as_bytes())].concat());
        tlv(0x30, &tlv(0x31, &atv))
    }

    #[test]
    fn a_claimed_dn_must_have_the_subjects_structure_not_just_its_text() {
        let td = isthmus_identity::TrustDomain::new("dn.test").unwrap();
        let root =
            isthmus_certs::MeshRootCa::create(&td, isthmus_certs::Validity::days(2)).unwrap();
        let cluster = root
            .issue_cluster_ca(
                &isthmus_identity::ClusterName::new("c").unwrap(),
                isthmus_certs::Validity::days(1),
            )
            .unwrap();
        let leaf = cluster
            .issue_gateway(
                &isthmus_identity::GatewayName::new("gw2").unwrap(),
                isthmus_certs::Validity::days(1),
            )
            .unwrap();
        let der = leaf.chain()[0].to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let subject = cert.subject();
        let text = subject.to_string();
        // "O=Isthmus mesh, CN=gw2..." as one RDN whose O value holds ", CN=...".
        let (o, rest) = text.split_once(", ").unwrap();
        let forged = one_rdn(10, &format!("{}, {rest}", o.trim_start_matches("O=")));
        let (_, forged_name) = x509_parser::x509::X509Name::from_der(&forged).unwrap();
        assert_eq!(forged_name.to_string(), text, "the same text");
        assert_ne!(dn_fields(&forged_name), dn_fields(subject));
        let (_, same) = x509_parser::x509::X509Name::from_der(subject.as_raw()).unwrap();
        assert_eq!(dn_fields(&same), dn_fields(subject));
        assert!(dn_fields(subject).is_some());
    }
}

#[cfg(test)]
mod ike_port_tests {
    use super::*;
    use isthmus_ike::wire::Message;

    #[test]
    fn a_flood_on_the_ike_port_does_not_keep_out_a_request_with_its_cookie() {
        let now = Instant::now();
        let secret = [7u8; 32];
        let peer: SocketAddr = "192.0.2.2:500".parse().unwrap();
        let config = || IkeConfig {
            local_id: Identification {
                id_type: ID_FQDN,
                data: b"gw2.test".to_vec(),
            },
            remote_id: Identification {
                id_type: ID_FQDN,
                data: b"gw1.test".to_vec(),
            },
            psk: Zeroizing::new(b"a-test-pre-shared-key-of-length".to_vec()),
            certificates: None,
            groups: vec![19],
            key_bits: vec![256],
            local_prefixes: vec![to_prefix(&"100.64.2.0/24".parse().unwrap())],
            remote_prefixes: vec![to_prefix(&"100.64.1.0/24".parse().unwrap())],
            local: peer,
            remote: "192.0.2.1:500".parse().unwrap(),
            esn: true,
            dpd: None,
        };
        let mut window = (now, 0);
        let mut admitted = 0;
        for _ in 0..200 {
            let (_, spoofed) = Initiator::start(config(), now).unwrap();
            admitted += usize::from(ike_port_admits(&spoofed, peer, &secret, &mut window, now));
        }
        assert_eq!(
            admitted, IKE_PORT_RATE as usize,
            "the rest of the flood waits"
        );
        // The real peer was asked for a cookie and echoes it: it gets by all the same.
        let (mut real, first) = Initiator::start(config(), now).unwrap();
        assert!(!ike_port_admits(&first, peer, &secret, &mut window, now));
        let ask = cookie_answer(&secret, peer, &first)
            .unwrap()
            .expect("a COOKIE asked");
        let again = real.handle(&ask, now).unwrap();
        let Some(Event::Send(with_cookie)) = again.into_iter().next() else {
            panic!("no retry with the cookie");
        };
        assert!(Message::decode(&with_cookie).is_ok());
        assert!(ike_port_admits(
            &with_cookie,
            peer,
            &secret,
            &mut window,
            now
        ));
        // A cookie made with another secret does not.
        let (mut other, first) = Initiator::start(config(), now).unwrap();
        let ask = cookie_answer(&[9u8; 32], peer, &first)
            .unwrap()
            .expect("asked");
        let again = other.handle(&ask, now).unwrap();
        let Some(Event::Send(bad_cookie)) = again.into_iter().next() else {
            panic!("no retry with the cookie");
        };
        assert!(!ike_port_admits(
            &bad_cookie,
            peer,
            &secret,
            &mut window,
            now
        ));
    }
}
