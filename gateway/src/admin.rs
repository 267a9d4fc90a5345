//! The gateway's local admin socket and the status document it serves.
//!
//! Protocol: a client connects to the unix socket (mode 0600, so only root
//! or the gateway's user), writes one command line (`status`), and reads one
//! JSON document until the server closes the connection. Key material is
//! never part of any answer: only public keys appear.

use isthmus_tunnel::esp::EspPeerStatus;
use isthmus_tunnel::{DeviceDrops, IpPrefix, PeerDrops};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What `isthmusctl status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub interface: String,
    pub public_key: String,
    pub listen_port: u16,
    pub mtu: u16,
    /// Whether the TUN device runs with virtio-net offloads (TSO/GRO).
    pub offload: bool,
    /// WireGuard datagrams that belong to no peer or do not parse.
    pub drops: DeviceDropsDoc,
    /// The ESP-in-UDP port, when ESP peers are configured.
    pub esp_listen_port: Option<u16>,
    /// ESP datagrams with an unknown SPI or that do not parse.
    pub esp_drops: Option<DeviceDropsDoc>,
    /// IKEv2 with the peers of `[peers.esp.ike]`: IKE SA state, CHILD_SA SPIs,
    /// liveness. Their ESP SAs are in `peers` under the same name.
    #[serde(default)]
    pub ike: Vec<crate::ipsec::IkePeerStatus>,
    /// IKE datagrams dropped before reaching an IKE SA.
    #[serde(default)]
    pub ike_drops: Option<crate::ipsec::IkeDrops>,
    pub peers: Vec<PeerStatus>,
    /// mTLS channels to the peers configured by identity.
    #[serde(default)]
    pub channels: Vec<crate::mesh::ChannelStatus>,
    /// Reloading of the `[identity]` files (certificate, key, trust bundle, CRLs).
    #[serde(default)]
    pub identity_reload: Option<crate::reload::ReloadStatus>,
    /// Remote clusters learnt from the clustermesh API (details: `isthmusctl mesh clusters`).
    #[serde(default)]
    pub clusters: Vec<ClusterSummary>,
    /// Steering of workload traffic into the tunnel (`[steering]`), with counters.
    #[serde(default)]
    pub steering: Option<isthmus_ebpf_redirect::SteeringStatus>,
    /// Node mode (`[node]`): the other nodes and strict mode.
    #[serde(default)]
    pub node: Option<crate::node::NodeStatus>,
    /// Egress policies (`[[egress]]`): gateways, health, pinned flows.
    #[serde(default)]
    pub egress: Vec<crate::egress::EgressPolicyView>,
    /// This gateway as an egress gateway (`[egress_gateway]`).
    #[serde(default)]
    pub egress_gateway: Option<crate::egress::EgressGatewayStatus>,
    /// This gateway's WireGuard static keys (public halves), newest first.
    #[serde(default)]
    pub wireguard_keys: Vec<WireguardKeyDoc>,
    /// Rotation of those keys (gateways with peers configured by identity).
    #[serde(default)]
    pub key_rotation: Option<crate::key_rotation::KeyRotationStatus>,
}

/// One of this gateway's WireGuard static keys in `isthmusctl status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireguardKeyDoc {
    pub epoch: u64,
    pub public_key: String,
    /// The key handshakes are initiated with; the others are still accepted.
    pub in_force: bool,
}

/// One remote cluster in `isthmusctl status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterSummary {
    pub name: String,
    /// `connecting`, `connected`, `stale` or `withdrawn`.
    pub state: String,
    pub revision: u64,
    /// Seconds in that state.
    pub state_secs: f64,
    pub gateways: usize,
    pub refusals: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceDropsDoc {
    pub no_route: u64,
    pub malformed: u64,
    pub unknown_peer: u64,
}

impl From<DeviceDrops> for DeviceDropsDoc {
    fn from(d: DeviceDrops) -> Self {
        Self {
            no_route: d.no_route,
            malformed: d.malformed,
            unknown_peer: d.unknown_peer,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: Option<String>,
    /// `wireguard` or `esp`.
    pub kind: String,
    /// The WireGuard public key (none for ESP peers).
    pub public_key: Option<String>,
    pub endpoint: Option<String>,
    pub allowed_prefixes: Vec<String>,
    /// Seconds since the last completed handshake; `None` before the first.
    pub last_handshake_secs_ago: Option<f64>,
    pub handshakes: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub drops: PeerDropsDoc,
    /// SPIs, sequence numbers and SA ages of an ESP peer (never keys).
    pub esp: Option<EspPeerStatus>,
    /// WireGuard: the epoch of this gateway's key that packets to the peer
    /// go out under (see `wireguard_keys`).
    #[serde(default)]
    pub key_epoch: Option<u64>,
    /// WireGuard: earlier keys of the peer still accepted while it rotates.
    #[serde(default)]
    pub previous_keys: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerDropsDoc {
    pub no_session: u64,
    pub bad_source: u64,
    pub decrypt_failure: u64,
    pub replay: u64,
    pub too_old: u64,
}

impl From<PeerDrops> for PeerDropsDoc {
    fn from(d: PeerDrops) -> Self {
        Self {
            no_session: d.no_session,
            bad_source: d.bad_source,
            decrypt_failure: d.decrypt_failure,
            replay: d.replay,
            too_old: d.too_old,
        }
    }
}

/// What `sa-rotate` answers: the ESP peers asked to move to a new SA
/// generation, each with the generation in use when asked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SaRotation {
    pub peers: Vec<SaRotated>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SaRotated {
    pub peer: String,
    pub generation: u64,
}

/// Asks ESP peers for a new outbound SA generation (`selector`: a peer's
/// name, or `*` for all). The new generation is already installed inbound
/// at the peer; it is used from the next packet on.
pub fn rotate_sas(
    esp: Option<&isthmus_tunnel::esp::EspCore>,
    selector: &str,
) -> Result<SaRotation, String> {
    let set = esp.map(|e| e.peers());
    let peers = set.as_ref().map(|s| s.peers()).unwrap_or_default();
    if peers.is_empty() {
        return Err("this gateway has no ESP peers".into());
    }
    let name = |p: &isthmus_tunnel::esp::EspPeer| {
        p.config()
            .name
            .clone()
            .unwrap_or_else(|| p.config().endpoint.to_string())
    };
    // SAs keyed by IKE are replaced by the key exchange, not derived here.
    if let Some(p) = peers
        .iter()
        .find(|p| selector != "*" && name(p) == selector && !p.config().keying.derives_ahead())
    {
        return Err(format!(
            "ESP peer `{}` is keyed by IKE: its SAs are replaced by the peer's rekeys",
            name(p).escape_debug()
        ));
    }
    let chosen: Vec<_> = peers
        .iter()
        .filter(|p| p.config().keying.derives_ahead())
        .filter(|p| selector == "*" || name(p) == selector)
        .collect();
    if chosen.is_empty() {
        let known: Vec<String> = peers.iter().map(|p| name(p)).collect();
        return Err(format!(
            "no ESP peer named `{}` (known: {})",
            selector.escape_debug(),
            known.join(", ")
        ));
    }
    Ok(SaRotation {
        peers: chosen
            .into_iter()
            .map(|p| SaRotated {
                peer: name(p),
                generation: p.request_rotation(),
            })
            .collect(),
    })
}

/// Formats allowed prefixes for the status document.
pub fn prefixes(list: &[IpPrefix]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

/// Errors reaching a gateway's admin socket.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot connect to {path}: {source} (is the gateway running? are you root?)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the gateway at {path} answered: {message}")]
    Refused { path: PathBuf, message: String },
    #[error("unreadable answer from {path}: {source}")]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Where admin commands go: anything that opens a connection to a gateway's
/// admin service (its local socket path, or [`RemoteTarget`]).
pub trait AdminEndpoint {
    /// A connection, with read and write timeouts set.
    fn open(&self) -> Result<Box<dyn ReadWrite>, AdminError>;
    /// How errors name it.
    fn describe(&self) -> PathBuf;
}

/// A byte stream both ways.
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

impl AdminEndpoint for Path {
    fn open(&self) -> Result<Box<dyn ReadWrite>, AdminError> {
        let stream = UnixStream::connect(self).map_err(|source| AdminError::Connect {
            path: self.to_path_buf(),
            source,
        })?;
        let io_err = |source| AdminError::Io {
            path: self.to_path_buf(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io_err)?;
        Ok(Box::new(stream))
    }
    fn describe(&self) -> PathBuf {
        self.to_path_buf()
    }
}

impl AdminEndpoint for PathBuf {
    fn open(&self) -> Result<Box<dyn ReadWrite>, AdminError> {
        self.as_path().open()
    }
    fn describe(&self) -> PathBuf {
        self.clone()
    }
}

/// ALPN of remote administration.
pub const ADMIN_ALPN: &[u8] = b"isthmus-admin/1";

/// A gateway's remote admin port (`[admin] listen`), reached over mTLS with an
/// administrator's certificate; the gateway must present a gateway identity of
/// the trust domain (or exactly `server_id`).
pub struct RemoteTarget {
    pub addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for RemoteTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTarget")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RemoteTarget {
    /// Loads the administrator's chain and key and the trust (bundle, CRLs).
    pub fn new(
        addr: std::net::SocketAddr,
        credentials: isthmus_identity::LocalCredentials,
        trust: &isthmus_identity::MeshTrust,
        server_id: Option<isthmus_identity::SpiffeId>,
    ) -> Result<Self, isthmus_identity::ChannelError> {
        let tls = isthmus_identity::MeshTls::new(credentials, trust)?;
        // By default a gateway of the administrator's own cluster only.
        let policy = match (server_id, tls.local_id().as_admin()) {
            (Some(id), _) => isthmus_identity::PeerPolicy::Exact(vec![id]),
            (None, Some((cluster, _))) => isthmus_identity::PeerPolicy::GatewayOfCluster(
                tls.local_id().trust_domain().clone(),
                cluster,
            ),
            (None, None) => {
                return Err(isthmus_identity::ChannelError::Credentials(format!(
                    "{} is not an administrator identity (spiffe://<td>/cluster/<c>/admin/<name>)",
                    tls.local_id()
                )))
            }
        };
        Ok(Self {
            addr,
            tls: tls.client_config(policy, ADMIN_ALPN)?,
        })
    }
}

impl AdminEndpoint for RemoteTarget {
    fn open(&self) -> Result<Box<dyn ReadWrite>, AdminError> {
        let connect_err = |source| AdminError::Connect {
            path: self.describe(),
            source,
        };
        let sock = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
            .map_err(connect_err)?;
        let io_err = |source| AdminError::Io {
            path: self.describe(),
            source,
        };
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io_err)?;
        sock.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(io_err)?;
        // The name is not used: the verifier checks the SPIFFE ID.
        let name = rustls::pki_types::ServerName::IpAddress(self.addr.ip().into());
        let conn =
            rustls::ClientConnection::new(self.tls.clone(), name).map_err(|e| AdminError::Io {
                path: self.describe(),
                source: std::io::Error::other(e),
            })?;
        Ok(Box::new(rustls::StreamOwned::new(conn, sock)))
    }
    fn describe(&self) -> PathBuf {
        PathBuf::from(format!("tls://{}", self.addr))
    }
}

/// The local socket or a remote admin port.
#[derive(Debug)]
pub enum AdminTarget {
    Socket(PathBuf),
    Remote(RemoteTarget),
}

impl AdminEndpoint for AdminTarget {
    fn open(&self) -> Result<Box<dyn ReadWrite>, AdminError> {
        match self {
            AdminTarget::Socket(p) => p.open(),
            AdminTarget::Remote(r) => r.open(),
        }
    }
    fn describe(&self) -> PathBuf {
        match self {
            AdminTarget::Socket(p) => p.clone(),
            AdminTarget::Remote(r) => r.describe(),
        }
    }
}

/// Asks the gateway at `to` for its status.
pub fn fetch_status(to: &(impl AdminEndpoint + ?Sized)) -> Result<Status, AdminError> {
    fetch(to, "status")
}

/// Sends `command` to the gateway at `to` and decodes its JSON answer.
pub fn fetch<T: serde::de::DeserializeOwned>(
    to: &(impl AdminEndpoint + ?Sized),
    command: &str,
) -> Result<T, AdminError> {
    let path = to.describe();
    let io_err = |source| AdminError::Io {
        path: path.clone(),
        source,
    };
    let mut stream = to.open()?;
    // A server that refuses this client answers before it reads, then
    // closes: its answer is read even when our write found it gone.
    let written = stream
        .write_all(format!("{command}\n").as_bytes())
        .and_then(|()| stream.flush());
    let mut answer = String::new();
    let read = (&mut stream).take(16 << 20).read_to_string(&mut answer);
    if !answer.starts_with("error: ") {
        written.map_err(io_err)?;
        read.map_err(io_err)?;
    }
    if let Some(message) = answer.strip_prefix("error: ") {
        return Err(AdminError::Refused {
            path: path.clone(),
            message: message.trim().to_string(),
        });
    }
    serde_json::from_str(&answer).map_err(|source| AdminError::Decode { path, source })
}

/// Connections the admin socket serves at once; further ones are closed.
pub const MAX_ADMIN_CONNECTIONS: usize = 8;

/// Serves the admin socket until dropped; the socket file is removed then
/// (if it is still ours). A [`crate::socket::PrivateSocket`]: mode 0600 from
/// the start, root or the gateway's user only, at most
/// [`MAX_ADMIN_CONNECTIONS`] at once.
#[derive(Debug)]
pub struct AdminServer {
    socket: crate::socket::PrivateSocket,
}

impl AdminServer {
    /// Binds `path` (parent created 0755) and answers requests on a
    /// background thread with what `status` returns.
    pub fn bind(
        path: &Path,
        status: Arc<dyn Fn() -> Status + Send + Sync>,
    ) -> std::io::Result<Self> {
        Self::bind_with(
            path,
            Arc::new(move |command: &str| match command {
                "status" => Some(
                    serde_json::to_string_pretty(&status())
                        .unwrap_or_else(|e| format!("error: cannot encode status: {e}")),
                ),
                _ => None,
            }),
        )
    }

    /// Like [`AdminServer::bind`], with a handler that answers each command
    /// line (`None`: unknown command).
    pub fn bind_with(path: &Path, handler: Arc<Handler>) -> std::io::Result<Self> {
        let socket = crate::socket::PrivateSocket::bind(
            path,
            "admin",
            MAX_ADMIN_CONNECTIONS,
            "error: refused: only root or the gateway's own user may use this socket\n",
            Arc::new(move |stream| serve(stream, &*handler)),
        )?;
        Ok(Self { socket })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        self.socket.path()
    }
}

/// Answers one admin command line; `None` for an unknown command.
pub type Handler = dyn Fn(&str) -> Option<String> + Send + Sync;

fn serve(stream: UnixStream, handler: &Handler) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut stream = stream;
    serve_one(&mut stream, handler);
}

/// Reads one command line (at most 1 KiB) from `stream` and writes the
/// handler's answer.
pub fn serve_one(stream: &mut dyn ReadWrite, handler: &dyn Fn(&str) -> Option<String>) {
    let mut line = String::new();
    let mut reader = BufReader::new((&mut *stream).take(1024));
    if reader.read_line(&mut line).is_err() {
        return;
    }
    drop(reader);
    let command = line.trim();
    let answer = handler(command).unwrap_or_else(|| {
        format!(
            "error: unknown command `{}` (known: status, keys-rotate, sa-rotate, mesh-clusters, mesh-services, egress-drain, egress-resume)",
            command.escape_debug()
        )
    });
    let _ = stream.write_all(answer.as_bytes());
    let _ = stream.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn sample() -> Status {
        Status {
            interface: "ist0".into(),
            public_key: "pub".into(),
            listen_port: 51820,
            mtu: 1420,
            offload: true,
            drops: DeviceDropsDoc {
                no_route: 1,
                malformed: 2,
                unknown_peer: 3,
            },
            esp_listen_port: None,
            ike: Vec::new(),
            ike_drops: None,
            esp_drops: None,
            peers: vec![],
            channels: vec![],
            identity_reload: None,
            clusters: vec![],
            steering: None,
            node: None,
            egress: vec![],
            egress_gateway: None,
            wireguard_keys: Vec::new(),
            key_rotation: None,
        }
    }

    #[test]
    fn status_round_trips_over_a_real_socket_and_file_is_private() {
        let path = std::env::temp_dir().join(format!("isthmus-admin-{}.sock", std::process::id()));
        let server = AdminServer::bind(&path, Arc::new(sample)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fetch_status(&path).unwrap(), sample());
        // A second gateway must not steal a live socket.
        assert_eq!(
            AdminServer::bind(&path, Arc::new(sample))
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::AddrInUse
        );
        drop(server);
        assert!(!path.exists(), "socket removed on drop");
        assert!(matches!(
            fetch_status(&path),
            Err(AdminError::Connect { .. })
        ));
    }
}
