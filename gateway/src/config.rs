//! The gateway's configuration file: read once, validated completely, and
//! turned into typed values before any socket or device exists.
//!
//! Every error names the field it is about (`interface.mtu`,
//! `peers[1].allowed_prefixes[0]`), so an operator can fix it without
//! reading code. Key material never appears in an error.

use isthmus_tunnel::esp::keying::{EspKeying, ManualKeying, SaPair};
use isthmus_tunnel::esp::sa::{EspCipher, Lifetimes, Limits, SaKeys};
use isthmus_tunnel::esp::{EspPeerConfig, DEFAULT_ESP_PORT};
use isthmus_tunnel::{IpPrefix, PeerConfig, PrivateKey, PublicKey, WgCore};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const DEFAULT_LISTEN_PORT: u16 = 51820;
/// Default TUN MTU with only WireGuard peers: 1500 minus IPv6 (40),
/// UDP (8) and WireGuard (32) headers.
pub const DEFAULT_MTU: u16 = 1420;
/// Default TUN MTU when ESP peers exist: ESP in UDP over IPv6 adds up to 85
/// bytes (IPv6 40, UDP 8, SPI/sequence/IV 16, padding and trailer up to 5,
/// ICV 16), so 1414 is the most that fits a 1500-byte underlay; 1400 is the
/// customary IPsec value.
pub const DEFAULT_MTU_WITH_ESP: u16 = 1400;
/// Largest inner packet that ESP in UDP over IPv6 fits in 1500 bytes.
const MAX_ESP_MTU_ON_1500: u16 = 1414;
pub const MIN_MTU: u16 = 1280;
pub const MAX_MTU: u16 = 9000;
/// Where admin sockets live unless `interface.admin_socket` says otherwise.
pub const ADMIN_SOCKET_DIR: &str = "/var/run/isthmus";

/// A configuration error: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: Option<RawInterface>,
    identity: Option<RawIdentity>,
    mesh: Option<RawMesh>,
    steering: Option<RawSteering>,
    node: Option<RawNode>,
    #[serde(default)]
    egress: Vec<RawEgress>,
    /// A file of IsthmusEgressPolicy resources (YAML), added to `egress`.
    egress_policies: Option<PathBuf>,
    egress_gateway: Option<RawEgressGateway>,
    metrics: Option<RawMetrics>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    peers: Vec<RawPeer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    clusters: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    name: Option<String>,
    #[serde(default)]
    sources: Vec<String>,
    #[serde(default)]
    destinations: Vec<String>,
    #[serde(default)]
    gateways: Vec<RawEgressRef>,
    probe_interval_ms: Option<u64>,
    probe_multiplier: Option<u32>,
    probe_source: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgressRef {
    peer: Option<String>,
    probe: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgressGateway {
    uplink: Option<String>,
    egress_ip: Option<String>,
    #[serde(default)]
    sources: Vec<String>,
    #[serde(default)]
    destinations: Vec<String>,
    #[serde(default)]
    endpoint_probes: Vec<String>,
    endpoint_probe_interval_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    table: Option<u32>,
    rule_priority: Option<u32>,
    pod_prefixes: Option<Vec<String>>,
    cluster_prefixes: Option<Vec<String>>,
    strict: Option<bool>,
    nodes_file: Option<PathBuf>,
}

/// The nodes file of node mode: the cluster's nodes (this one may be listed
/// too; it is skipped).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodesFile {
    #[serde(default)]
    nodes: Vec<RawNodeEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeEntry {
    name: Option<String>,
    spiffe_id: Option<String>,
    channel_endpoint: Option<String>,
    #[serde(default)]
    pod_prefixes: Vec<String>,
    kind: Option<String>,
    persistent_keepalive: Option<u16>,
    esp: Option<RawEsp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSteering {
    mode: Option<String>,
    interfaces: Option<Vec<String>>,
    fwmark: Option<u32>,
    fwmark_mask: Option<u32>,
    table: Option<u32>,
    rule_priority: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMesh {
    #[serde(default)]
    clusters: Vec<RawMeshCluster>,
    #[serde(default)]
    local_prefixes: Vec<String>,
    withdraw_after_secs: Option<u64>,
    remote_space: Option<Vec<String>>,
    kinds: Option<Vec<String>>,
    esp_cipher: Option<String>,
    esn: Option<bool>,
    persistent_keepalive: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeshCluster {
    name: Option<String>,
    api: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    trust_bundle: Option<PathBuf>,
    certificate: Option<PathBuf>,
    private_key: Option<PathBuf>,
    #[serde(default)]
    crls: Vec<PathBuf>,
    /// Every `*.crl.pem` in this directory is loaded too.
    crls_dir: Option<PathBuf>,
    listen: Option<String>,
    advertise_address: Option<String>,
    reload_interval_ms: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: Option<String>,
    private_key_file: Option<PathBuf>,
    listen_port: Option<u16>,
    mtu: Option<i64>,
    #[serde(default)]
    addresses: Vec<String>,
    admin_socket: Option<PathBuf>,
    uapi: Option<bool>,
    offload: Option<bool>,
    esp_listen_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<String>,
    kind: Option<String>,
    public_key: Option<String>,
    endpoint: Option<String>,
    #[serde(default)]
    allowed_prefixes: Vec<String>,
    persistent_keepalive: Option<u16>,
    spiffe_id: Option<String>,
    channel_endpoint: Option<String>,
    esp: Option<RawEsp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEsp {
    sa_file: Option<PathBuf>,
    cipher: Option<String>,
    esn: Option<bool>,
    soft_lifetime_seconds: Option<u64>,
    soft_lifetime_packets: Option<u64>,
    soft_lifetime_bytes: Option<u64>,
    hard_lifetime_seconds: Option<u64>,
    hard_lifetime_packets: Option<u64>,
    hard_lifetime_bytes: Option<u64>,
    rekey_grace_seconds: Option<u64>,
    ike: Option<RawIke>,
}

/// `[peers.esp.ike]`: the peer's SAs come from IKEv2, which this gateway runs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIke {
    role: Option<String>,
    auth: Option<String>,
    psk_file: Option<PathBuf>,
    local_id: Option<String>,
    remote_id: Option<String>,
    #[serde(default)]
    local_prefixes: Vec<String>,
    groups: Option<Vec<u16>>,
    key_bits: Option<Vec<u16>>,
    dpd_seconds: Option<u64>,
    rekey_seconds: Option<u64>,
}

/// The manual-keying SA file of one ESP peer (mode 0600): generation 0 of
/// both directions. `isthmusctl esp-keygen` writes a mirrored pair.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSaFile {
    cipher: String,
    outbound_spi: SpiValue,
    outbound_key: String,
    inbound_spi: SpiValue,
    inbound_key: String,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SpiValue {
    Number(u32),
    Text(String),
}

/// A validated gateway configuration.
#[derive(Debug)]
pub struct GatewayConfig {
    pub interface: InterfaceConfig,
    /// WireGuard peers keyed in the config (public key).
    pub peers: Vec<PeerConfig>,
    /// ESP peers keyed in the config (`kind = "esp"`, SA file).
    pub esp_peers: Vec<EspPeerConfig>,
    /// The SA files of those peers, in the same order.
    pub sa_files: Vec<PathBuf>,
    /// ESP peers keyed by IKEv2 (`[peers.esp.ike]`), which this gateway runs.
    pub ike_peers: Vec<crate::ipsec::IkePeerConfig>,
    /// This gateway's certificate and the mesh trust, when peers are
    /// configured by identity.
    pub identity: Option<IdentityConfig>,
    /// Peers configured by SPIFFE ID: their tunnel keys arrive over the
    /// mTLS channel, never from the config.
    pub identity_peers: Vec<IdentityPeer>,
    /// The clustermesh API servers to learn remote clusters from.
    pub mesh: Option<MeshConfig>,
    /// Steering of workload traffic into the tunnel (`[steering]`).
    pub steering: Option<isthmus_ebpf_redirect::SteeringConfig>,
    /// Node mode (`[node]`): transparent encryption between the nodes of a cluster.
    pub node: Option<NodeConfig>,
    /// Egress policies (`[[egress]]`): selected workloads leave through egress gateways.
    pub egress: Vec<EgressConfig>,
    /// This gateway as an egress gateway (`[egress_gateway]`).
    pub egress_gateway: Option<EgressGatewayConfig>,
    /// Where Prometheus metrics are served (`[metrics] listen`); off when absent.
    pub metrics: Option<SocketAddr>,
    /// Remote administration over mTLS (`[admin]`); off when absent.
    pub remote_admin: Option<RemoteAdminConfig>,
}

/// `[admin]`: remote administration over mTLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteAdminConfig {
    pub listen: SocketAddr,
    /// Clusters whose administrators (`spiffe://<td>/cluster/<c>/admin/<name>`)
    /// are let in; by default this gateway's own.
    pub clusters: Vec<isthmus_identity::ClusterName>,
    pub trust_domain: isthmus_identity::TrustDomain,
}

/// Routing table of node mode (`[node] table`).
pub const DEFAULT_NODE_TABLE: u32 = 4954;
/// Priority of node mode's first rule (`[node] rule_priority`).
pub const DEFAULT_NODE_RULE_PRIORITY: u32 = 4950;

/// UDP port of the egress health responder (reached through the tunnel only).
pub const EGRESS_PROBE_PORT: u16 = 7445;

/// One `[[egress]]` policy.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    pub name: String,
    pub sources: Vec<IpPrefix>,
    pub destinations: Vec<IpPrefix>,
    /// Most preferred first.
    pub gateways: Vec<EgressGatewayRef>,
    pub probe_interval: std::time::Duration,
    pub probe_multiplier: u32,
    /// Source address of the probes (inside this gateway's prefixes as the
    /// egress gateways know them).
    pub probe_source: IpAddr,
}

/// An egress gateway of a policy: a WireGuard peer and the address its
/// health responder answers on (inside that peer's allowed prefixes).
#[derive(Debug, Clone)]
pub struct EgressGatewayRef {
    pub peer: String,
    pub public_key: PublicKey,
    pub probe: IpAddr,
}

/// `[egress_gateway]`.
#[derive(Debug, Clone)]
pub struct EgressGatewayConfig {
    /// Interface toward the firewalled endpoints.
    pub uplink: String,
    /// The address selected traffic leaves with (SNAT); put on the uplink.
    pub egress_ip: IpAddr,
    /// Inner sources allowed to leave (others are not translated).
    pub sources: Vec<IpPrefix>,
    /// The only destinations tunnel traffic may leave for through the uplink
    /// (no open relay for a peer).
    pub destinations: Vec<IpPrefix>,
    /// TCP endpoints probed through the uplink; when all fail three times in a
    /// row this gateway reports its uplink down and sources stop using it.
    pub endpoint_probes: Vec<SocketAddr>,
    pub endpoint_probe_interval: std::time::Duration,
}

/// `[node]`: this gateway runs on a node and encrypts pod traffic to the other
/// nodes of its cluster, listed in `nodes_file`.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's pod prefixes: traffic to them is never steered.
    pub pod_prefixes: Vec<IpPrefix>,
    /// The cluster's pod space.
    pub cluster_prefixes: Vec<IpPrefix>,
    /// Strict mode: pod traffic into `cluster_prefixes` that has no tunnel is
    /// dropped (steered into the tunnel device, which has no peer for it).
    pub strict: bool,
    /// The nodes file (reloaded when it changes).
    pub nodes_file: PathBuf,
    /// Routing table of node mode.
    pub table: u32,
    /// Priority of its first rule (the second is one more).
    pub rule_priority: u32,
    /// The other nodes as read at start.
    pub nodes: Vec<IdentityPeer>,
}

/// A remote cluster's API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshCluster {
    pub name: isthmus_identity::ClusterName,
    pub api: SocketAddr,
}

/// The `[mesh]` table: where remote clusters are learnt and how their
/// gateways become peers.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// This gateway's cluster (from its certificate).
    pub cluster: isthmus_identity::ClusterName,
    pub clusters: Vec<MeshCluster>,
    /// This cluster's own prefixes: no remote cluster may announce them.
    pub local_prefixes: Vec<IpPrefix>,
    /// A cluster whose API stream is lost keeps its routes (stale) this long.
    pub withdraw_after: std::time::Duration,
    /// The address space remote clusters may announce.
    pub remote_space: Vec<IpPrefix>,
    /// Tunnel kinds this gateway uses with mesh peers, preferred first.
    pub kinds: Vec<TunnelKind>,
    /// ESP settings for mesh peers (when ESP is chosen).
    pub esp: EspSettings,
    pub persistent_keepalive: Option<u16>,
}

/// Default TCP port of a clustermesh API server.
pub const DEFAULT_MESH_API_PORT: u16 = 7444;

/// Default TCP port of the mTLS peer channel.
pub const DEFAULT_CHANNEL_PORT: u16 = 7443;

/// The `[identity]` table, loaded.
pub struct IdentityConfig {
    pub credentials: isthmus_identity::LocalCredentials,
    pub trust: isthmus_identity::MeshTrust,
    /// Where credentials and trust come from; read again while running
    /// (see [`crate::reload`]).
    pub files: IdentityFiles,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
    /// Where the peer channel listens (TCP).
    pub listen: SocketAddr,
    /// The underlay address peers should send tunnel traffic to; by
    /// default they use the address the channel connected from/to.
    pub advertise_address: Option<IpAddr>,
}

impl std::fmt::Debug for IdentityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityConfig")
            .field("chain_len", &self.credentials.chain.len())
            .field("roots", &self.trust.roots.len())
            .field("crls", &self.trust.crls.len())
            .field("listen", &self.listen)
            .field("advertise_address", &self.advertise_address)
            .finish_non_exhaustive()
    }
}

/// Default of `[identity] reload_interval_ms`.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The files of `[identity]`: this gateway's certificate and key, the trust
/// bundle and the CRLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    pub trust_bundle: PathBuf,
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub crls: Vec<PathBuf>,
    pub crls_dir: Option<PathBuf>,
}

impl IdentityFiles {
    /// Reads the trust bundle and every CRL; errors name the field.
    pub fn load_trust(&self) -> Result<isthmus_identity::MeshTrust, ConfigError> {
        let roots = isthmus_certs::files::load_certificates(&self.trust_bundle)
            .map_err(|e| ConfigError::new("identity.trust_bundle", e.to_string()))?;
        if roots.is_empty() {
            return Err(ConfigError::new(
                "identity.trust_bundle",
                "holds no certificate",
            ));
        }
        let mut crls = Vec::new();
        for (i, path) in self.crls.iter().enumerate() {
            crls.extend(
                isthmus_certs::files::load_crls(path)
                    .map_err(|e| ConfigError::new(format!("identity.crls[{i}]"), e.to_string()))?,
            );
        }
        if let Some(dir) = &self.crls_dir {
            crls.extend(
                isthmus_certs::files::load_crl_dir(dir)
                    .map_err(|e| ConfigError::new("identity.crls_dir", e.to_string()))?,
            );
        }
        // Only the newest CRL of each issuer counts (see newest_per_issuer).
        let crls = crate::reload::newest_per_issuer(crls);
        Ok(isthmus_identity::MeshTrust { roots, crls })
    }

    /// Reads this gateway's certificate chain and private key (mode 0600).
    pub fn load_credentials(&self) -> Result<isthmus_identity::LocalCredentials, ConfigError> {
        let chain = isthmus_certs::files::load_certificates(&self.certificate)
            .map_err(|e| ConfigError::new("identity.certificate", e.to_string()))?;
        let key = isthmus_certs::files::load_private_key(&self.private_key)
            .map_err(|e| ConfigError::new("identity.private_key", e.to_string()))?;
        Ok(isthmus_identity::LocalCredentials { chain, key })
    }
}

/// The tunnel kind of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelKind {
    Wireguard,
    Esp,
}

impl TunnelKind {
    pub fn name(self) -> &'static str {
        match self {
            TunnelKind::Wireguard => "wireguard",
            TunnelKind::Esp => "esp",
        }
    }
}

/// ESP settings of a peer keyed over the channel.
#[derive(Debug, Clone, Copy)]
pub struct EspSettings {
    pub cipher: EspCipher,
    pub esn: bool,
    pub lifetimes: Lifetimes,
}

/// A peer configured by identity.
#[derive(Debug, Clone)]
pub struct IdentityPeer {
    pub name: Option<String>,
    pub kind: TunnelKind,
    pub spiffe_id: isthmus_identity::SpiffeId,
    /// Where its peer channel listens.
    pub channel_endpoint: SocketAddr,
    pub allowed_prefixes: Vec<IpPrefix>,
    pub persistent_keepalive: Option<u16>,
    /// For `kind = "esp"`.
    pub esp: Option<EspSettings>,
}

#[derive(Debug)]
pub struct InterfaceConfig {
    pub name: String,
    /// From `private_key_file`; generated fresh at every start when the
    /// file is not given (only peers configured by identity can learn it).
    pub private_key: PrivateKey,
    /// Whether `private_key` came from a file.
    pub private_key_from_file: bool,
    /// That file (a rotated key is written back to it).
    pub private_key_file: Option<PathBuf>,
    pub listen_port: u16,
    pub mtu: u16,
    /// Whether `mtu` was set in the file (else it depends on the peer kinds).
    pub mtu_given: bool,
    /// Addresses put on the TUN device, with their prefix length.
    pub addresses: Vec<(IpAddr, u8)>,
    pub admin_socket: PathBuf,
    /// Serve the WireGuard UAPI at /var/run/wireguard/<name>.sock.
    pub uapi: bool,
    /// Ask for TUN offloads (TSO/GRO through the virtio-net header).
    pub offload: bool,
    /// UDP port for ESP-in-UDP, used when ESP peers exist.
    pub esp_listen_port: u16,
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("config", format!("cannot read {}: {e}", path.display())))?;
    parse(&text)
}

/// Validates configuration text.
pub fn parse(text: &str) -> Result<GatewayConfig, ConfigError> {
    let de = toml::Deserializer::new(text);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "config".to_string()
        } else {
            path
        };
        // toml's message carries a source excerpt after the first line.
        let inner = e.into_inner();
        let message = inner
            .message()
            .lines()
            .next()
            .unwrap_or("invalid")
            .to_string();
        ConfigError::new(field, message)
    })?;
    let iface = raw
        .interface
        .ok_or_else(|| ConfigError::new("interface", "missing [interface] table"))?;
    let interface = interface(iface)?;
    let mut peers = Vec::new();
    let mut esp_peers = Vec::new();
    // Original index of every peer of each kind, for error messages.
    let (mut wg_index, mut esp_index) = (Vec::new(), Vec::new());
    let mut identity_peers = Vec::new();
    let mut sa_files = Vec::new();
    let mut ike_peers: Vec<crate::ipsec::IkePeerConfig> = Vec::new();
    let mut ike_index = Vec::new();
    let mut kinds: Vec<(usize, TunnelKind, Vec<IpPrefix>)> = Vec::new();
    for (i, p) in raw.peers.into_iter().enumerate() {
        if p.spiffe_id.is_some() {
            let peer = identity_peer(i, p)?;
            if let Some(first) = identity_peers
                .iter()
                .position(|q: &IdentityPeer| q.spiffe_id == peer.spiffe_id)
            {
                // Only identity peers are in `kinds` so far, in order.
                let first = kinds.get(first).map_or(first, |(idx, _, _)| *idx);
                return Err(ConfigError::new(
                    format!("peers[{i}].spiffe_id"),
                    format!("same identity as peers[{first}]"),
                ));
            }
            kinds.push((i, peer.kind, peer.allowed_prefixes.clone()));
            identity_peers.push(peer);
            continue;
        }
        if p.channel_endpoint.is_some() {
            return Err(ConfigError::new(
                format!("peers[{i}].channel_endpoint"),
                "only for peers configured by identity (set spiffe_id)",
            ));
        }
        match p.kind.as_deref().unwrap_or("wireguard") {
            "wireguard" => {
                peers.push(peer(i, p)?);
                wg_index.push(i);
            }
            "esp" if p.esp.as_ref().is_some_and(|e| e.ike.is_some()) => {
                let peer = ike_peer(i, p)?;
                // IKE arrives by source address: one IKE peer per address.
                if ike_peers
                    .iter()
                    .any(|q| q.endpoint.ip() == peer.endpoint.ip())
                {
                    return Err(ConfigError::new(
                        format!("peers[{i}].endpoint"),
                        format!(
                            "another IKE peer has the address {}: one IKE peer per address",
                            peer.endpoint.ip()
                        ),
                    ));
                }
                kinds.push((i, TunnelKind::Esp, peer.remote_prefixes.clone()));
                ike_peers.push(peer);
                ike_index.push(i);
            }
            "esp" => {
                sa_files.push(
                    p.esp
                        .as_ref()
                        .and_then(|e| e.sa_file.clone())
                        .unwrap_or_default(),
                );
                esp_peers.push(esp_peer(i, p)?);
                esp_index.push(i);
            }
            other => {
                return Err(ConfigError::new(
                    format!("peers[{i}].kind"),
                    format!("`{other}` is not a tunnel kind (expected wireguard or esp)"),
                ))
            }
        }
    }
    check_peers(&interface, &peers, &wg_index)?;
    check_esp_peers(&esp_peers, &esp_index)?;
    for (p, &i) in peers.iter().zip(&wg_index) {
        kinds.push((i, TunnelKind::Wireguard, p.allowed_prefixes.clone()));
    }
    for (p, &i) in esp_peers.iter().zip(&esp_index) {
        kinds.push((i, TunnelKind::Esp, p.allowed_prefixes.clone()));
    }
    kinds.sort_by_key(|(i, _, _)| *i);
    check_prefixes(&kinds)?;
    if !peers.is_empty() && !interface.private_key_from_file {
        return Err(ConfigError::new(
            "interface.private_key_file",
            "required when WireGuard peers are keyed in the config (they need this gateway's public key)",
        ));
    }
    let identity = match raw.identity {
        Some(raw) => Some(identity(raw)?),
        None if !identity_peers.is_empty() => {
            return Err(ConfigError::new(
                "identity",
                "required: peers configured by spiffe_id need this gateway's certificate ([identity] table)",
            ))
        }
        None => None,
    };
    for (peer, &i) in ike_peers.iter_mut().zip(&ike_index) {
        let Some(remote) = crate::ipsec::spiffe_of(&peer.remote_id) else {
            continue;
        };
        let field = format!("peers[{i}].esp.ike.auth");
        let Some(identity) = identity.as_ref() else {
            return Err(ConfigError::new(
                field,
                "\"certificate\" needs the [identity] table: this gateway's certificate, key and trust bundle",
            ));
        };
        let certificates = crate::ipsec::IkeCertificates::new(
            &identity.credentials,
            &identity.trust,
            remote,
            Some(identity.files.clone()),
        )
        .map_err(|m| ConfigError::new(field, m))?;
        peer.local_id = certificates.identity();
        peer.certificates = Some(Arc::new(certificates));
    }
    let mesh = match raw.mesh {
        None => None,
        Some(raw_mesh) => {
            let Some(identity) = identity.as_ref() else {
                return Err(ConfigError::new(
                    "mesh",
                    "requires the [identity] table (API servers and peers are reached over mTLS)",
                ));
            };
            let configured: Vec<IpPrefix> = kinds.iter().flat_map(|(_, _, p)| p.clone()).collect();
            Some(mesh(raw_mesh, identity, &configured)?)
        }
    };
    let has_esp = !esp_peers.is_empty()
        || !ike_peers.is_empty()
        || identity_peers.iter().any(|p| p.kind == TunnelKind::Esp)
        || mesh
            .as_ref()
            .is_some_and(|m| m.kinds.contains(&TunnelKind::Esp));
    let mut interface = interface;
    if has_esp && !interface.mtu_given {
        interface.mtu = DEFAULT_MTU_WITH_ESP;
    } else if has_esp && interface.mtu > MAX_ESP_MTU_ON_1500 {
        tracing::warn!(
            mtu = interface.mtu,
            "interface.mtu is above {MAX_ESP_MTU_ON_1500}: full-size ESP packets only fit an underlay with an MTU above 1500"
        );
    }
    if has_esp && interface.esp_listen_port == interface.listen_port {
        return Err(ConfigError::new(
            "interface.esp_listen_port",
            "must differ from interface.listen_port",
        ));
    }
    let steering = match raw.steering {
        None => None,
        Some(raw) => Some(steering(raw, &interface.name)?),
    };
    let node = match raw.node {
        None => None,
        Some(raw_node) => {
            let Some(identity) = identity.as_ref() else {
                return Err(ConfigError::new(
                    "node",
                    "requires the [identity] table (node tunnels are keyed over mTLS)",
                ));
            };
            if steering.is_none() {
                return Err(ConfigError::new(
                    "node",
                    "requires the [steering] table (the pod interfaces whose traffic is encrypted)",
                ));
            }
            if mesh.is_some() {
                return Err(ConfigError::new(
                    "node",
                    "cannot be combined with [mesh] yet: run node mode and the cluster gateway as separate gateways",
                ));
            }
            let n = node(raw_node, identity)?;
            if let Some(st) = &steering {
                if n.table == st.policy.table {
                    return Err(ConfigError::new(
                        "node.table",
                        "must differ from steering.table",
                    ));
                }
                let ours = [n.rule_priority, n.rule_priority + 1];
                if ours.contains(&st.policy.priority) {
                    return Err(ConfigError::new(
                        "node.rule_priority",
                        format!(
                            "its rules ({} and {}) collide with steering.rule_priority",
                            ours[0], ours[1]
                        ),
                    ));
                }
            }
            Some(n)
        }
    };
    if node
        .as_ref()
        .is_some_and(|n| n.nodes.iter().any(|p| p.kind == TunnelKind::Esp))
        && !interface.mtu_given
    {
        interface.mtu = DEFAULT_MTU_WITH_ESP;
    }
    let mut egress = Vec::new();
    // [[egress]] tables, then the resources of the egress_policies file; each
    // with the label its errors name.
    let mut all_egress: Vec<(String, RawEgress)> = raw
        .egress
        .into_iter()
        .enumerate()
        .map(|(i, e)| (format!("egress[{i}]"), e))
        .collect();
    if let Some(path) = &raw.egress_policies {
        all_egress.extend(egress_policy_resources(path)?);
    }
    for (label, raw_egress) in all_egress {
        if steering.is_none() {
            return Err(ConfigError::new(
                label,
                "requires the [steering] table (it selects the workloads' packets)",
            ));
        }
        let e = egress_policy(&label, raw_egress, &peers, &interface)?;
        // A destination that is also a peer's prefix would let that peer's
        // traffic pass as an endpoint's reply (and vice versa).
        let peer_prefixes = peers
            .iter()
            .flat_map(|p| &p.allowed_prefixes)
            .chain(esp_peers.iter().flat_map(|p| &p.allowed_prefixes))
            .chain(identity_peers.iter().flat_map(|p| &p.allowed_prefixes))
            .chain(node.iter().flat_map(|n| &n.cluster_prefixes));
        for p in peer_prefixes {
            if let Some(d) = e.destinations.iter().find(|d| overlaps(d, p)) {
                return Err(ConfigError::new(
                    format!("{label}.destinations"),
                    format!("{d} overlaps {p}, a prefix of a peer or node (endpoints must lie outside the mesh)"),
                ));
            }
        }
        if let Some((j, d)) =
            egress
                .iter()
                .enumerate()
                .find_map(|(j, o): (usize, &EgressConfig)| {
                    o.destinations
                        .iter()
                        .find(|d| e.destinations.iter().any(|x| overlaps(x, d)))
                        .map(|d| (j, *d))
                })
        {
            return Err(ConfigError::new(
                format!("{label}.destinations"),
                format!("overlap {d} of policy {:?}", egress[j].name),
            ));
        }
        if egress.iter().any(|o: &EgressConfig| o.name == e.name) {
            return Err(ConfigError::new(format!("{label}.name"), "used twice"));
        }
        egress.push(e);
    }
    let egress_gateway = match raw.egress_gateway {
        None => None,
        Some(raw) => Some(egress_gateway(raw, &interface.name)?),
    };
    let metrics = raw
        .metrics
        .map(|m| {
            let text = m.listen.ok_or_else(|| {
                ConfigError::new("metrics.listen", "required (IP:PORT to serve /metrics on)")
            })?;
            text.parse::<SocketAddr>()
                .map_err(|_| ConfigError::new("metrics.listen", format!("`{text}` is not IP:PORT")))
        })
        .transpose()?;
    let remote_admin = raw
        .admin
        .map(|a| remote_admin(a, identity.as_ref()))
        .transpose()?;
    Ok(GatewayConfig {
        interface,
        peers,
        esp_peers,
        sa_files,
        ike_peers,
        identity,
        identity_peers,
        mesh,
        steering,
        node,
        egress,
        egress_gateway,
        metrics,
        remote_admin,
    })
}

fn remote_admin(
    raw: RawAdmin,
    identity: Option<&IdentityConfig>,
) -> Result<RemoteAdminConfig, ConfigError> {
    let text = raw.listen.ok_or_else(|| {
        ConfigError::new(
            "admin.listen",
            "required (IP:PORT to serve remote administration on)",
        )
    })?;
    let listen = text
        .parse::<SocketAddr>()
        .map_err(|_| ConfigError::new("admin.listen", format!("`{text}` is not IP:PORT")))?;
    let identity = identity.ok_or_else(|| {
        ConfigError::new(
            "admin",
            "requires the [identity] section (the gateway's certificate and the trust bundle authenticate both ends)",
        )
    })?;
    let own = identity
        .credentials
        .chain
        .first()
        .and_then(|leaf| isthmus_identity::spiffe_id_of(leaf).ok())
        .and_then(|id| id.as_gateway())
        .ok_or_else(|| {
            ConfigError::new(
                "admin",
                "the [identity] certificate carries no gateway identity",
            )
        })?;
    let clusters = match raw.clusters {
        None => vec![own.cluster.clone()],
        Some(list) if list.is_empty() => {
            return Err(ConfigError::new(
                "admin.clusters",
                "empty: name at least one cluster, or leave it out for this gateway's own",
            ))
        }
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, c)| {
                isthmus_identity::ClusterName::new(c)
                    .map_err(|e| ConfigError::new(format!("admin.clusters[{i}]"), e.to_string()))
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(RemoteAdminConfig {
        listen,
        clusters,
        trust_domain: own.trust_domain,
    })
}

/// Reads a file of IsthmusEgressPolicy resources into `[[egress]]` tables, each
/// labelled `egress_policies[<name>]` (its fields are named as in the resource).
fn egress_policy_resources(path: &Path) -> Result<Vec<(String, RawEgress)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            "egress_policies",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let policies = crate::crd::parse_egress_policies(&text).map_err(|e| {
        if e.field.starts_with('[') {
            ConfigError::new(format!("egress_policies{}", e.field), e.message)
        } else {
            ConfigError::new("egress_policies", format!("{}: {}", e.field, e.message))
        }
    })?;
    Ok(policies
        .into_iter()
        .map(|p| {
            let name = p.metadata.name.unwrap_or_default();
            let s = p.spec;
            (
                format!("egress_policies[{name}]"),
                RawEgress {
                    name: Some(name),
                    sources: s.sources,
                    destinations: s.destinations,
                    gateways: s
                        .gateways
                        .into_iter()
                        .map(|g| RawEgressRef {
                            peer: Some(g.peer),
                            probe: Some(g.probe),
                        })
                        .collect(),
                    probe_interval_ms: s.probe_interval_ms,
                    probe_multiplier: s.probe_multiplier,
                    probe_source: s.probe_source,
                },
            )
        })
        .collect())
}

fn egress_policy(
    label: &str,
    raw: RawEgress,
    peers: &[PeerConfig],
    interface: &InterfaceConfig,
) -> Result<EgressConfig, ConfigError> {
    // A resource's fields are named as in the resource (spec.probeIntervalMs).
    let resource = label.starts_with("egress_policies");
    let field = |f: &str| {
        if resource {
            format!(
                "{label}.spec.{}",
                isthmus_clustermesh_api::crd::camel_case(f)
            )
        } else {
            format!("{label}.{f}")
        }
    };
    let name = raw.name.unwrap_or_default();
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ConfigError::new(
            if resource {
                format!("{label}.metadata.name")
            } else {
                field("name")
            },
            "required: 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    let sources = prefix_list(&field("sources"), &raw.sources)?;
    if sources.is_empty() {
        return Err(ConfigError::new(
            field("sources"),
            "required: the selected workloads' prefixes",
        ));
    }
    let destinations = prefix_list(&field("destinations"), &raw.destinations)?;
    if destinations.is_empty() {
        return Err(ConfigError::new(
            field("destinations"),
            "required: the firewalled endpoints' prefixes",
        ));
    }
    if raw.gateways.is_empty() {
        return Err(ConfigError::new(
            field("gateways"),
            "required: one or more egress gateways",
        ));
    }
    let mut gateways: Vec<EgressGatewayRef> = Vec::new();
    for (j, g) in raw.gateways.into_iter().enumerate() {
        let gf = |f: &str| field(&format!("gateways[{j}].{f}"));
        let peer_name = g.peer.unwrap_or_default();
        let Some(peer) = peers
            .iter()
            .find(|p| p.name.as_deref() == Some(peer_name.as_str()))
        else {
            return Err(ConfigError::new(
                gf("peer"),
                format!("`{peer_name}`: no WireGuard peer of that name in [[peers]]"),
            ));
        };
        if gateways.iter().any(|o| o.peer == peer_name) {
            return Err(ConfigError::new(gf("peer"), "listed twice"));
        }
        let probe_text = g.probe.unwrap_or_default();
        let probe: IpAddr = probe_text.parse().map_err(|_| {
            ConfigError::new(gf("probe"), format!("`{probe_text}`: required, the gateway's address for health probes (inside its allowed prefixes)"))
        })?;
        // The probe must reach that peer: the longest allowed prefix holding
        // it must be this peer's, not a more specific one of another peer.
        let owner = peers
            .iter()
            .flat_map(|p| p.allowed_prefixes.iter().map(move |a| (a, p)))
            .filter(|(a, _)| a.contains(probe))
            .max_by_key(|(a, _)| a.len())
            .map(|(_, p)| p.public_key);
        if owner != Some(peer.public_key) {
            return Err(ConfigError::new(
                gf("probe"),
                format!("{probe} is not routed to peer {peer_name} (not inside its allowed prefixes, or another peer's prefix is more specific)"),
            ));
        }
        gateways.push(EgressGatewayRef {
            peer: peer_name,
            public_key: peer.public_key,
            probe,
        });
    }
    let interval = raw.probe_interval_ms.unwrap_or(200);
    if !(50..=1000).contains(&interval) {
        return Err(ConfigError::new(
            field("probe_interval_ms"),
            format!("{interval}: must be 50 to 1000"),
        ));
    }
    let multiplier = raw.probe_multiplier.unwrap_or(3);
    if !(2..=10).contains(&multiplier) {
        return Err(ConfigError::new(
            field("probe_multiplier"),
            format!("{multiplier}: must be 2 to 10"),
        ));
    }
    let probe_source = match raw.probe_source {
        Some(t) => t.parse().map_err(|_| ConfigError::new(field("probe_source"), format!("`{t}` is not an IP address")))?,
        None => interface.addresses.first().map(|(a, _)| *a).ok_or_else(|| {
            ConfigError::new(field("probe_source"), "required when interface.addresses is empty (the probes' source address, inside this gateway's prefixes at the egress gateways)")
        })?,
    };
    Ok(EgressConfig {
        name,
        sources,
        destinations,
        gateways,
        probe_interval: std::time::Duration::from_millis(interval),
        probe_multiplier: multiplier,
        probe_source,
    })
}

fn egress_gateway(raw: RawEgressGateway, tunnel: &str) -> Result<EgressGatewayConfig, ConfigError> {
    let uplink = raw.uplink.unwrap_or_default();
    if uplink.is_empty()
        || uplink.len() > 15
        || uplink == tunnel
        || uplink.contains(|c: char| {
            c == '/' || c == '"' || c == '\\' || c.is_whitespace() || c.is_control()
        })
    {
        return Err(ConfigError::new("egress_gateway.uplink", format!("`{uplink}`: required, the interface toward the firewalled endpoints (not the tunnel)")));
    }
    let ip_text = raw.egress_ip.unwrap_or_default();
    let egress_ip: IpAddr = ip_text.parse().map_err(|_| {
        ConfigError::new(
            "egress_gateway.egress_ip",
            format!("`{ip_text}`: required, the address selected traffic leaves with"),
        )
    })?;
    let sources = prefix_list("egress_gateway.sources", &raw.sources)?;
    if sources.is_empty() {
        return Err(ConfigError::new(
            "egress_gateway.sources",
            "required: the workload prefixes allowed to leave through this gateway",
        ));
    }
    let destinations = prefix_list("egress_gateway.destinations", &raw.destinations)?;
    if destinations.is_empty() {
        return Err(ConfigError::new(
            "egress_gateway.destinations",
            "required: the firewalled endpoints' prefixes (tunnel traffic to anything else is not forwarded)",
        ));
    }
    let mut endpoint_probes = Vec::new();
    for (j, t) in raw.endpoint_probes.iter().enumerate() {
        endpoint_probes.push(parse_endpoint(
            format!("egress_gateway.endpoint_probes[{j}]"),
            t,
        )?);
    }
    let interval = raw.endpoint_probe_interval_ms.unwrap_or(1000);
    if !(100..=60_000).contains(&interval) {
        return Err(ConfigError::new(
            "egress_gateway.endpoint_probe_interval_ms",
            format!("{interval}: must be 100 to 60000"),
        ));
    }
    Ok(EgressGatewayConfig {
        uplink,
        egress_ip,
        sources,
        destinations,
        endpoint_probes,
        endpoint_probe_interval: std::time::Duration::from_millis(interval),
    })
}

fn prefix_list(field: &str, list: &[String]) -> Result<Vec<IpPrefix>, ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    for (j, p) in list.iter().enumerate() {
        let prefix: IpPrefix = p
            .parse()
            .map_err(|e| ConfigError::new(format!("{field}[{j}]"), format!("`{p}`: {e}")))?;
        if prefix.len() == 0 {
            return Err(ConfigError::new(
                format!("{field}[{j}]"),
                "a default prefix cannot be a pod prefix",
            ));
        }
        out.push(prefix);
    }
    Ok(out)
}

/// Whether two prefixes share any address.
pub fn overlaps(a: &IpPrefix, b: &IpPrefix) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.addr()) || b.contains(a.addr()))
}

/// Whether `inner` lies inside `outer`.
pub fn within(inner: &IpPrefix, outer: &IpPrefix) -> bool {
    inner.is_ipv4() == outer.is_ipv4() && outer.len() <= inner.len() && outer.contains(inner.addr())
}

fn node(raw: RawNode, identity: &IdentityConfig) -> Result<NodeConfig, ConfigError> {
    let pod_prefixes = prefix_list("node.pod_prefixes", &raw.pod_prefixes.unwrap_or_default())?;
    if pod_prefixes.is_empty() {
        return Err(ConfigError::new(
            "node.pod_prefixes",
            "required: this node's pod prefixes",
        ));
    }
    let cluster_prefixes = prefix_list(
        "node.cluster_prefixes",
        &raw.cluster_prefixes.unwrap_or_default(),
    )?;
    if cluster_prefixes.is_empty() {
        return Err(ConfigError::new(
            "node.cluster_prefixes",
            "required: the cluster's pod space (strict mode covers it)",
        ));
    }
    for (j, p) in pod_prefixes.iter().enumerate() {
        if !cluster_prefixes.iter().any(|c| within(p, c)) {
            return Err(ConfigError::new(
                format!("node.pod_prefixes[{j}]"),
                format!("{p} is not inside node.cluster_prefixes"),
            ));
        }
    }
    let nodes_file = raw.nodes_file.ok_or_else(|| {
        ConfigError::new(
            "node.nodes_file",
            "required: the file listing the cluster's nodes",
        )
    })?;
    let table = raw.table.unwrap_or(DEFAULT_NODE_TABLE);
    if table == 0 || (253..=255).contains(&table) {
        return Err(ConfigError::new(
            "node.table",
            format!("{table} is reserved (0, default 253, main 254, local 255)"),
        ));
    }
    let rule_priority = raw.rule_priority.unwrap_or(DEFAULT_NODE_RULE_PRIORITY);
    if rule_priority == 0 || rule_priority >= 32765 {
        return Err(ConfigError::new(
            "node.rule_priority",
            format!("{rule_priority} must be between 1 and 32764 (its rules come before the main table's)"),
        ));
    }
    let mut cfg = NodeConfig {
        pod_prefixes,
        cluster_prefixes,
        strict: raw.strict.unwrap_or(true),
        nodes_file,
        table,
        rule_priority,
        nodes: Vec::new(),
    };
    let own = own_id(identity)?;
    cfg.nodes = load_nodes(&cfg, &own).map_err(|e| {
        ConfigError::new(
            "node.nodes_file",
            format!("{}: {}: {}", cfg.nodes_file.display(), e.field, e.message),
        )
    })?;
    Ok(cfg)
}

/// This gateway's own SPIFFE ID (from its certificate).
pub fn own_id(identity: &IdentityConfig) -> Result<isthmus_identity::SpiffeId, ConfigError> {
    let leaf = identity
        .credentials
        .chain
        .first()
        .ok_or_else(|| ConfigError::new("identity.certificate", "holds no certificate"))?;
    isthmus_identity::spiffe_id_of(leaf)
        .map_err(|e| ConfigError::new("identity.certificate", e.to_string()))
}

/// Reads and checks the nodes file of `cfg`: every other node of this
/// gateway's cluster, as identity peers whose allowed prefixes are the node's
/// pod prefixes. This node's own entry (same SPIFFE ID) is skipped.
pub fn load_nodes(
    cfg: &NodeConfig,
    own: &isthmus_identity::SpiffeId,
) -> Result<Vec<IdentityPeer>, ConfigError> {
    // The file maps pod prefixes to identities: only its owner may write it.
    // Checked on the open file, which is then what is read.
    let cannot = |e: std::io::Error| ConfigError::new("nodes", format!("cannot read: {e}"));
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&cfg.nodes_file)
            .map_err(cannot)?
    };
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(ConfigError::new("nodes", "not a regular file"));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(ConfigError::new(
            "nodes",
            format!(
                "writable by group or others (mode {:o}): chmod go-w",
                meta.permissions().mode() & 0o777
            ),
        ));
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(cannot)?;
    parse_nodes(&text, cfg, own)
}

/// [`load_nodes`] on the file's text.
pub fn parse_nodes(
    text: &str,
    cfg: &NodeConfig,
    own: &isthmus_identity::SpiffeId,
) -> Result<Vec<IdentityPeer>, ConfigError> {
    let de = toml::Deserializer::new(text);
    let raw: RawNodesFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::new(
            if path == "." {
                "nodes".to_string()
            } else {
                path
            },
            e.inner().message().to_string(),
        )
    })?;
    let Some(own_gw) = own.as_gateway() else {
        return Err(ConfigError::new(
            "identity.certificate",
            "this gateway's certificate is not a gateway identity",
        ));
    };
    let mut nodes: Vec<IdentityPeer> = Vec::new();
    for (i, entry) in raw.nodes.into_iter().enumerate() {
        let field = |f: &str| format!("nodes[{i}].{f}");
        let pods = prefix_list(&field("pod_prefixes"), &entry.pod_prefixes)?;
        let raw_peer = RawPeer {
            name: entry.name,
            kind: entry.kind,
            public_key: None,
            endpoint: None,
            allowed_prefixes: entry.pod_prefixes,
            persistent_keepalive: entry.persistent_keepalive,
            spiffe_id: entry.spiffe_id,
            channel_endpoint: entry.channel_endpoint,
            esp: entry.esp,
        };
        let mut peer = identity_peer(i, raw_peer).map_err(|e| ConfigError {
            field: e
                .field
                .replacen("peers[", "nodes[", 1)
                .replace("allowed_prefixes", "pod_prefixes"),
            message: e.message,
        })?;
        peer.allowed_prefixes = pods;
        if &peer.spiffe_id == own {
            continue;
        }
        match peer.spiffe_id.as_gateway() {
            Some(g) if g.trust_domain == own_gw.trust_domain && g.cluster == own_gw.cluster => {}
            _ => {
                return Err(ConfigError::new(
                    field("spiffe_id"),
                    format!(
                        "{} is not a gateway of this node's cluster {}",
                        peer.spiffe_id, own_gw.cluster
                    ),
                ))
            }
        }
        if peer.allowed_prefixes.is_empty() {
            return Err(ConfigError::new(
                field("pod_prefixes"),
                "required: the node's pod prefixes",
            ));
        }
        for (j, p) in peer.allowed_prefixes.iter().enumerate() {
            let f = format!("nodes[{i}].pod_prefixes[{j}]");
            if !cfg.cluster_prefixes.iter().any(|c| within(p, c)) {
                return Err(ConfigError::new(
                    f,
                    format!("{p} is not inside node.cluster_prefixes"),
                ));
            }
            if let Some(mine) = cfg.pod_prefixes.iter().find(|m| overlaps(p, m)) {
                return Err(ConfigError::new(
                    f,
                    format!("{p} overlaps this node's pod prefix {mine}"),
                ));
            }
            for (k, other) in nodes.iter().enumerate() {
                if let Some(q) = other.allowed_prefixes.iter().find(|q| overlaps(p, q)) {
                    return Err(ConfigError::new(
                        f,
                        format!("{p} overlaps {q} of nodes[{k}]"),
                    ));
                }
            }
        }
        if nodes.iter().any(|n| n.spiffe_id == peer.spiffe_id) {
            return Err(ConfigError::new(field("spiffe_id"), "listed twice"));
        }
        // The key channel runs outside the pod space (strict mode steers it).
        let ep = peer.channel_endpoint.ip();
        if cfg
            .cluster_prefixes
            .iter()
            .chain(&cfg.pod_prefixes)
            .any(|c| c.contains(ep))
        {
            return Err(ConfigError::new(
                field("channel_endpoint"),
                format!("{ep} is inside the pod space: a node's channel must use its node address"),
            ));
        }
        nodes.push(peer);
    }
    Ok(nodes)
}

/// `[steering]`: which workload interfaces' traffic is steered into the tunnel.
fn steering(
    raw: RawSteering,
    tunnel: &str,
) -> Result<isthmus_ebpf_redirect::SteeringConfig, ConfigError> {
    use isthmus_ebpf_redirect::{Mode, PolicyNumbers};
    let mode = match raw.mode.as_deref() {
        None | Some("auto") => Mode::Auto,
        Some("bpf") => Mode::Bpf,
        Some("policy") => Mode::Policy,
        Some(other) => {
            return Err(ConfigError::new(
                "steering.mode",
                format!("`{other}`: expected \"auto\", \"bpf\" or \"policy\""),
            ))
        }
    };
    let interfaces = raw.interfaces.unwrap_or_default();
    if interfaces.is_empty() {
        return Err(ConfigError::new(
            "steering.interfaces",
            "required: the workload-facing interfaces whose traffic is steered",
        ));
    }
    for (i, name) in interfaces.iter().enumerate() {
        let field = format!("steering.interfaces[{i}]");
        if name.is_empty()
            || name.len() > 15
            || name == "."
            || name == ".."
            || name.contains(|c: char| {
                c == '/' || c == '"' || c == '\\' || c.is_whitespace() || c.is_control()
            })
        {
            return Err(ConfigError::new(
                field,
                format!("`{name}` is not a valid interface name"),
            ));
        }
        if name == tunnel {
            return Err(ConfigError::new(field, "is the tunnel device itself"));
        }
        if interfaces[..i].contains(name) {
            return Err(ConfigError::new(field, "listed twice"));
        }
    }
    let defaults = PolicyNumbers::default();
    let mask = raw.fwmark_mask.unwrap_or(defaults.mask);
    let fwmark = raw.fwmark.unwrap_or(defaults.fwmark);
    if mask == 0 {
        return Err(ConfigError::new("steering.fwmark_mask", "must not be 0"));
    }
    if fwmark == 0 || fwmark & !mask != 0 {
        return Err(ConfigError::new(
            "steering.fwmark",
            format!("{fwmark:#x} must be non-zero and inside steering.fwmark_mask ({mask:#x})"),
        ));
    }
    let table = raw.table.unwrap_or(defaults.table);
    // 0 is unspecified; 253–255 are the kernel's default, main and local tables.
    if table == 0 || (253..=255).contains(&table) {
        return Err(ConfigError::new(
            "steering.table",
            format!("{table} is reserved (0, default 253, main 254, local 255)"),
        ));
    }
    let priority = raw.rule_priority.unwrap_or(defaults.priority);
    if priority == 0 || priority >= 32766 {
        return Err(ConfigError::new(
            "steering.rule_priority",
            format!("{priority} must be between 1 and 32765 (before the main table's rule)"),
        ));
    }
    Ok(isthmus_ebpf_redirect::SteeringConfig {
        mode,
        tunnel: tunnel.to_string(),
        interfaces,
        policy: PolicyNumbers {
            fwmark,
            mask,
            table,
            priority,
        },
    })
}

fn mesh(
    raw: RawMesh,
    identity: &IdentityConfig,
    configured: &[IpPrefix],
) -> Result<MeshConfig, ConfigError> {
    let leaf = identity
        .credentials
        .chain
        .first()
        .ok_or_else(|| ConfigError::new("identity.certificate", "holds no certificate"))?;
    let own = isthmus_identity::spiffe_id_of(leaf)
        .ok()
        .and_then(|id| id.as_gateway())
        .ok_or_else(|| {
            ConfigError::new(
                "mesh",
                "the [identity] certificate must be a gateway identity (spiffe://<td>/cluster/<c>/gateway/<g>)",
            )
        })?;
    let mut clusters: Vec<MeshCluster> = Vec::new();
    for (i, c) in raw.clusters.into_iter().enumerate() {
        let field = |f: &str| format!("mesh.clusters[{i}].{f}");
        let name = c
            .name
            .ok_or_else(|| ConfigError::new(field("name"), "required"))?;
        let name = isthmus_identity::ClusterName::new(&name)
            .map_err(|e| ConfigError::new(field("name"), e.to_string()))?;
        if name == own.cluster {
            return Err(ConfigError::new(
                field("name"),
                format!("{name} is this gateway's own cluster"),
            ));
        }
        if let Some(j) = clusters.iter().position(|o| o.name == name) {
            return Err(ConfigError::new(
                field("name"),
                format!("same cluster as mesh.clusters[{j}]"),
            ));
        }
        let api = c.api.ok_or_else(|| {
            ConfigError::new(field("api"), "required (IP:PORT of its clustermesh API)")
        })?;
        let api = api
            .parse::<SocketAddr>()
            .or_else(|_| {
                api.parse::<IpAddr>()
                    .map(|ip| SocketAddr::new(ip, DEFAULT_MESH_API_PORT))
            })
            .map_err(|_| ConfigError::new(field("api"), format!("`{api}` is not IP[:PORT]")))?;
        clusters.push(MeshCluster { name, api });
    }
    let local_prefixes = raw
        .local_prefixes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.parse::<IpPrefix>().map_err(|e| {
                ConfigError::new(format!("mesh.local_prefixes[{i}]"), format!("`{p}`: {e}"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Statically configured peers' prefixes are off limits to the mesh too, and so
    // are this gateway's own channel address and the API servers' addresses (a route
    // for them into a tunnel would carry the control plane into itself).
    let mut local = local_prefixes;
    local.extend(configured.iter().copied());
    let host = |ip: IpAddr| -> Option<IpPrefix> {
        let ip = ip.to_canonical();
        (!ip.is_unspecified()).then(|| {
            format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })
                .parse()
                .ok()
        })?
    };
    local.extend(host(identity.listen.ip()));
    local.extend(identity.advertise_address.and_then(host));
    local.extend(clusters.iter().filter_map(|c| host(c.api.ip())));
    let remote_space = match raw.remote_space {
        None => isthmus_clustermesh_api::reducer::default_remote_space(),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let prefix = p.parse::<IpPrefix>().map_err(|e| {
                    ConfigError::new(format!("mesh.remote_space[{i}]"), format!("`{p}`: {e}"))
                })?;
                if prefix.len() == 0 {
                    return Err(ConfigError::new(
                        format!("mesh.remote_space[{i}]"),
                        "a default prefix would let a remote cluster claim any address",
                    ));
                }
                Ok(prefix)
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    let withdraw = raw.withdraw_after_secs.unwrap_or(300);
    if !(1..=86_400).contains(&withdraw) {
        return Err(ConfigError::new(
            "mesh.withdraw_after_secs",
            "must be between 1 and 86400",
        ));
    }
    let mut kinds = Vec::new();
    for (i, k) in raw
        .kinds
        .unwrap_or_else(|| vec!["wireguard".into()])
        .iter()
        .enumerate()
    {
        let kind = match k.as_str() {
            "wireguard" => TunnelKind::Wireguard,
            "esp" => TunnelKind::Esp,
            other => {
                return Err(ConfigError::new(
                    format!("mesh.kinds[{i}]"),
                    format!("`{other}` is not a tunnel kind (expected wireguard or esp)"),
                ))
            }
        };
        if kinds.contains(&kind) {
            return Err(ConfigError::new(format!("mesh.kinds[{i}]"), "listed twice"));
        }
        kinds.push(kind);
    }
    if kinds.is_empty() {
        return Err(ConfigError::new(
            "mesh.kinds",
            "needs at least one tunnel kind",
        ));
    }
    let cipher = match raw.esp_cipher.as_deref().unwrap_or("aes256-gcm") {
        "aes128-gcm" => EspCipher::Aes128Gcm,
        "aes256-gcm" => EspCipher::Aes256Gcm,
        other => {
            return Err(ConfigError::new(
                "mesh.esp_cipher",
                format!("`{other}` is not aes128-gcm or aes256-gcm"),
            ))
        }
    };
    Ok(MeshConfig {
        cluster: own.cluster,
        clusters,
        local_prefixes: local,
        withdraw_after: std::time::Duration::from_secs(withdraw),
        remote_space,
        kinds,
        esp: EspSettings {
            cipher,
            esn: raw.esn.unwrap_or(true),
            lifetimes: Lifetimes::default(),
        },
        persistent_keepalive: raw.persistent_keepalive,
    })
}

fn identity(raw: RawIdentity) -> Result<IdentityConfig, ConfigError> {
    let req = |v: Option<PathBuf>, f: &str, what: &str| {
        v.ok_or_else(|| ConfigError::new(format!("identity.{f}"), format!("required ({what})")))
    };
    let bundle = req(
        raw.trust_bundle,
        "trust_bundle",
        "PEM file with the mesh root CA(s)",
    )?;
    let cert = req(
        raw.certificate,
        "certificate",
        "PEM chain: this gateway's leaf, then its cluster CA",
    )?;
    let key = req(
        raw.private_key,
        "private_key",
        "PEM private key of the certificate, mode 0600",
    )?;
    let files = IdentityFiles {
        trust_bundle: bundle,
        certificate: cert,
        private_key: key,
        crls: raw.crls,
        crls_dir: raw.crls_dir,
    };
    let trust = files.load_trust()?;
    let credentials = files.load_credentials()?;
    let reload_interval = match raw.reload_interval_ms {
        None => DEFAULT_RELOAD_INTERVAL,
        Some(ms @ 100..=60_000) => Duration::from_millis(ms as u64),
        Some(ms) => {
            return Err(ConfigError::new(
                "identity.reload_interval_ms",
                format!("{ms} is out of range (100 to 60000)"),
            ))
        }
    };
    let listen = match raw.listen {
        None => SocketAddr::new(IpAddr::from([0, 0, 0, 0]), DEFAULT_CHANNEL_PORT),
        Some(text) => text
            .parse()
            .map_err(|_| ConfigError::new("identity.listen", format!("`{text}` is not IP:PORT")))?,
    };
    let advertise_address = raw
        .advertise_address
        .map(|t| {
            t.parse::<IpAddr>().map_err(|_| {
                ConfigError::new(
                    "identity.advertise_address",
                    format!("`{t}` is not an IP address"),
                )
            })
        })
        .transpose()?;
    // Check the certificate, key and trust now, before any socket exists.
    isthmus_identity::ChannelConfig::new(
        isthmus_identity::LocalCredentials {
            chain: credentials.chain.clone(),
            key: credentials.key.clone_key(),
        },
        &trust,
        isthmus_identity::TunnelParams {
            wireguard_public_key: None,
            wireguard_endpoint: None,
            esp_endpoint: None,
            esp_inbound_spi: None,
            mtu: DEFAULT_MTU,
            wireguard_keys: None,
        },
    )
    .map_err(|e| ConfigError::new("identity.certificate", e.to_string()))?;
    Ok(IdentityConfig {
        credentials,
        trust,
        files,
        reload_interval,
        listen,
        advertise_address,
    })
}

fn identity_peer(i: usize, raw: RawPeer) -> Result<IdentityPeer, ConfigError> {
    let field = |f: &str| format!("peers[{i}].{f}");
    check_peer_name(i, &raw.name)?;
    for (present, name) in [
        (raw.public_key.is_some(), "public_key"),
        (raw.endpoint.is_some(), "endpoint"),
    ] {
        if present {
            return Err(ConfigError::new(
                field(name),
                "a peer configured by spiffe_id learns its tunnel keys and endpoint over the mTLS channel; remove this field",
            ));
        }
    }
    let text = raw.spiffe_id.unwrap_or_default();
    let spiffe_id: isthmus_identity::SpiffeId = text
        .parse()
        .map_err(|e| ConfigError::new(field("spiffe_id"), format!("`{text}`: {e}")))?;
    if spiffe_id.as_gateway().is_none() {
        return Err(ConfigError::new(
            field("spiffe_id"),
            format!("`{text}` is not a gateway identity (spiffe://<trust-domain>/cluster/<cluster>/gateway/<name>)"),
        ));
    }
    let channel_endpoint = raw.channel_endpoint.ok_or_else(|| {
        ConfigError::new(
            field("channel_endpoint"),
            "required (IP:PORT of the peer's mTLS channel)",
        )
    })?;
    let channel_endpoint = parse_endpoint(field("channel_endpoint"), &channel_endpoint)?;
    let allowed_prefixes = parse_prefixes(i, &raw.allowed_prefixes)?;
    let kind = match raw.kind.as_deref().unwrap_or("wireguard") {
        "wireguard" => TunnelKind::Wireguard,
        "esp" => TunnelKind::Esp,
        other => {
            return Err(ConfigError::new(
                field("kind"),
                format!("`{other}` is not a tunnel kind (expected wireguard or esp)"),
            ))
        }
    };
    let esp = match (kind, raw.esp) {
        (TunnelKind::Wireguard, Some(_)) => {
            return Err(ConfigError::new(
                field("esp"),
                "is for ESP peers; set kind = \"esp\"",
            ))
        }
        (TunnelKind::Wireguard, None) => None,
        (TunnelKind::Esp, esp) => {
            let esp = esp.unwrap_or(RawEsp {
                sa_file: None,
                cipher: None,
                esn: None,
                soft_lifetime_seconds: None,
                soft_lifetime_packets: None,
                soft_lifetime_bytes: None,
                hard_lifetime_seconds: None,
                hard_lifetime_packets: None,
                hard_lifetime_bytes: None,
                rekey_grace_seconds: None,
                ike: None,
            });
            if esp.ike.is_some() {
                return Err(ConfigError::new(
                    field("esp.ike"),
                    "a peer configured by spiffe_id is keyed over the mTLS channel; IKE is for IPsec peers without one",
                ));
            }
            if esp.sa_file.is_some() {
                return Err(ConfigError::new(
                    field("esp.sa_file"),
                    "a peer configured by spiffe_id is keyed over the mTLS channel (TLS exporter); remove sa_file",
                ));
            }
            let cipher = match &esp.cipher {
                None => EspCipher::Aes128Gcm,
                Some(c) => c
                    .parse()
                    .map_err(|m: String| ConfigError::new(field("esp.cipher"), m))?,
            };
            let (esn, lifetimes) = esp_lifetimes(i, &esp)?;
            Some(EspSettings {
                cipher,
                esn,
                lifetimes,
            })
        }
    };
    if kind == TunnelKind::Esp && raw.persistent_keepalive.is_some() {
        return Err(ConfigError::new(
            field("persistent_keepalive"),
            "is for WireGuard peers",
        ));
    }
    Ok(IdentityPeer {
        name: raw.name,
        kind,
        spiffe_id,
        channel_endpoint,
        allowed_prefixes,
        persistent_keepalive: raw.persistent_keepalive.filter(|k| *k > 0),
        esp,
    })
}

/// Prefixes of peers of the same kind may nest (longest match decides)
/// but not repeat; across kinds they must not overlap at all, because the
/// two kinds are routed from separate tables.
fn check_prefixes(peers: &[(usize, TunnelKind, Vec<IpPrefix>)]) -> Result<(), ConfigError> {
    for (a, (ia, ka, pa)) in peers.iter().enumerate() {
        for (ib, kb, pb) in &peers[..a] {
            for p in pa {
                let clash = if ka == kb {
                    pb.iter().find(|q| *q == p)
                } else {
                    pb.iter().find(|q| overlaps(q, p))
                };
                if let Some(q) = clash {
                    let why = if ka == kb {
                        format!("{p} is also claimed by peers[{ib}]")
                    } else {
                        format!(
                            "{p} overlaps {q} of peers[{ib}] (a {} peer); prefixes of ESP and WireGuard peers must be disjoint",
                            kb.name()
                        )
                    };
                    return Err(ConfigError::new(
                        format!("peers[{ia}].allowed_prefixes"),
                        why,
                    ));
                }
            }
        }
    }
    Ok(())
}

fn interface(raw: RawInterface) -> Result<InterfaceConfig, ConfigError> {
    let name = raw
        .name
        .ok_or_else(|| ConfigError::new("interface.name", "required (the TUN device name)"))?;
    validate_ifname(&name).map_err(|m| ConfigError::new("interface.name", m))?;

    let private_key_from_file = raw.private_key_file.is_some();
    let private_key_file = raw.private_key_file.clone();
    let private_key = match raw.private_key_file {
        Some(path) => read_private_key(&path)
            .map_err(|m| ConfigError::new("interface.private_key_file", m))?,
        None => PrivateKey::generate(),
    };

    let mtu_given = raw.mtu.is_some();
    let mtu = raw.mtu.unwrap_or(i64::from(DEFAULT_MTU));
    let mtu = u16::try_from(mtu)
        .ok()
        .filter(|m| (MIN_MTU..=MAX_MTU).contains(m))
        .ok_or_else(|| {
            ConfigError::new(
                "interface.mtu",
                format!("{mtu} is out of range: must be between {MIN_MTU} and {MAX_MTU}"),
            )
        })?;

    let mut addresses = Vec::new();
    for (i, a) in raw.addresses.iter().enumerate() {
        let field = format!("interface.addresses[{i}]");
        addresses.push(parse_interface_address(a).map_err(|m| ConfigError::new(field, m))?);
    }

    let admin_socket = raw
        .admin_socket
        .unwrap_or_else(|| Path::new(ADMIN_SOCKET_DIR).join(format!("{name}.sock")));
    if !admin_socket.is_absolute() {
        return Err(ConfigError::new(
            "interface.admin_socket",
            "must be an absolute path",
        ));
    }
    Ok(InterfaceConfig {
        mtu_given,
        name,
        private_key,
        private_key_from_file,
        private_key_file,
        listen_port: raw.listen_port.unwrap_or(DEFAULT_LISTEN_PORT),
        mtu,
        addresses,
        admin_socket,
        uapi: raw.uapi.unwrap_or(true),
        offload: raw.offload.unwrap_or(true),
        esp_listen_port: raw.esp_listen_port.unwrap_or(DEFAULT_ESP_PORT),
    })
}

/// Linux interface names: 1 to 15 bytes of letters, digits, '-', '_', '.'.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "`{name}` must be 1 to 15 characters (Linux interface name limit)"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is not a valid interface name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "`{name}` contains `{c}`; use letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

/// Reads a private key file, refusing one that others may read.
fn read_private_key(path: &Path) -> Result<PrivateKey, String> {
    let text = read_secret_file(path)?;
    PrivateKey::from_base64(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Reads a file holding key material, refusing one that others may read
/// (checked on the open file: see [`isthmus_certs::files::read_secret_file`]).
fn read_secret_file(path: &Path) -> Result<zeroize::Zeroizing<String>, String> {
    let bytes = isthmus_certs::files::read_secret_file(path).map_err(|e| match e {
        isthmus_certs::CertError::KeyFileTooOpen { mode, .. } => format!(
            "{} has mode {:04o}: key material must not be readable by group or others (chmod 600 it)",
            path.display(),
            mode & 0o777
        ),
        other => other.to_string(),
    })?;
    let text =
        std::str::from_utf8(&bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    Ok(zeroize::Zeroizing::new(text.to_owned()))
}

/// An interface address: `ADDRESS/LENGTH` (host bits allowed) or a bare
/// address (a host prefix).
fn parse_interface_address(text: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{text}` is not ADDRESS/LENGTH"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("prefix length `{l}` must be 0 to {max}"))?,
    };
    Ok((addr, len))
}

fn parse_endpoint(field: String, text: &str) -> Result<SocketAddr, ConfigError> {
    let ep = text.parse::<SocketAddr>().map_err(|_| {
        ConfigError::new(
            field.clone(),
            format!("`{text}` is not IP:PORT (IPv6 as [ADDRESS]:PORT)"),
        )
    })?;
    if ep.port() == 0 || ep.ip().is_unspecified() {
        return Err(ConfigError::new(
            field,
            format!("`{ep}` is not a usable endpoint"),
        ));
    }
    Ok(ep)
}

fn parse_prefixes(i: usize, list: &[String]) -> Result<Vec<IpPrefix>, ConfigError> {
    let mut out = Vec::with_capacity(list.len());
    for (j, p) in list.iter().enumerate() {
        let prefix: IpPrefix = p.parse().map_err(|e| {
            ConfigError::new(
                format!("peers[{i}].allowed_prefixes[{j}]"),
                format!("`{p}`: {e}"),
            )
        })?;
        out.push(prefix);
    }
    Ok(out)
}

fn check_peer_name(i: usize, name: &Option<String>) -> Result<(), ConfigError> {
    if let Some(name) = name {
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(ConfigError::new(
                format!("peers[{i}].name"),
                "must be 1 to 64 printable characters",
            ));
        }
    }
    Ok(())
}

fn esp_peer(i: usize, raw: RawPeer) -> Result<EspPeerConfig, ConfigError> {
    let field = |f: &str| format!("peers[{i}].{f}");
    check_peer_name(i, &raw.name)?;
    if raw.public_key.is_some() {
        return Err(ConfigError::new(
            field("public_key"),
            "is for WireGuard peers; an ESP peer is keyed by [peers.esp] sa_file",
        ));
    }
    if raw.persistent_keepalive.is_some() {
        return Err(ConfigError::new(
            field("persistent_keepalive"),
            "is for WireGuard peers",
        ));
    }
    let endpoint = raw
        .endpoint
        .ok_or_else(|| ConfigError::new(field("endpoint"), "required for an ESP peer"))?;
    let endpoint = parse_endpoint(field("endpoint"), &endpoint)?;
    let allowed_prefixes = parse_prefixes(i, &raw.allowed_prefixes)?;
    let esp = raw.esp.ok_or_else(|| {
        ConfigError::new(field("esp"), "required: a [peers.esp] table with sa_file")
    })?;
    if esp.cipher.is_some() {
        return Err(ConfigError::new(
            field("esp.cipher"),
            "comes from the SA file for a manually keyed peer",
        ));
    }
    let sa_path = esp
        .sa_file
        .clone()
        .ok_or_else(|| ConfigError::new(field("esp.sa_file"), "required (mode 0600)"))?;
    let keying = read_sa_file(&sa_path)
        .map_err(|(f, m)| ConfigError::new(format!("peers[{i}].esp.sa_file{f}"), m))?;
    let marker = sa_in_use_marker(&sa_path);
    if marker.exists() {
        return Err(ConfigError::new(
            field("esp.sa_file"),
            format!(
                "{} was already used by an earlier run ({} exists): the same manual SAs again would repeat \
                 AES-GCM nonces and reopen the replay window. Generate fresh SA files for both gateways \
                 (isthmusctl esp-keygen) and remove the marker, or key ESP by identity",
                sa_path.display(),
                marker.display()
            ),
        ));
    }
    let (esn, lifetimes) = esp_lifetimes(i, &esp)?;
    Ok(EspPeerConfig {
        name: raw.name,
        endpoint,
        allowed_prefixes,
        local_prefixes: Vec::new(),
        esn,
        lifetimes,
        keying,
    })
}

/// An ESP peer keyed by IKEv2 (`[peers.esp.ike]`).
fn ike_peer(i: usize, raw: RawPeer) -> Result<crate::ipsec::IkePeerConfig, ConfigError> {
    use crate::ipsec::{parse_identity, IkePeerConfig, IkeRole};
    let field = |f: &str| format!("peers[{i}].{f}");
    check_peer_name(i, &raw.name)?;
    for (given, name) in [
        (raw.public_key.is_some(), "public_key"),
        (raw.persistent_keepalive.is_some(), "persistent_keepalive"),
    ] {
        if given {
            return Err(ConfigError::new(field(name), "is for WireGuard peers"));
        }
    }
    let endpoint = raw.endpoint.ok_or_else(|| {
        ConfigError::new(
            field("endpoint"),
            "required for an IKE peer: its address and port (4500)",
        )
    })?;
    let endpoint = parse_endpoint(field("endpoint"), &endpoint)?;
    // IKE is told apart by its source address, which arrives canonical.
    let endpoint = SocketAddr::new(endpoint.ip().to_canonical(), endpoint.port());
    let remote_prefixes = parse_prefixes(i, &raw.allowed_prefixes)?;
    if remote_prefixes.is_empty() {
        return Err(ConfigError::new(
            field("allowed_prefixes"),
            "required: the peer's side of the tunnel (its traffic selectors must fit in them)",
        ));
    }
    let Some(esp) = raw.esp else {
        return Err(ConfigError::new(field("esp"), "required"));
    };
    let Some(ike) = esp.ike.as_ref() else {
        return Err(ConfigError::new(field("esp.ike"), "required"));
    };
    for (given, name, why) in [
        (esp.sa_file.is_some(), "sa_file", "IKE negotiates the keys"),
        (
            esp.cipher.is_some(),
            "cipher",
            "IKE negotiates it; set [peers.esp.ike] key_bits",
        ),
        (
            esp.soft_lifetime_seconds.is_some(),
            "soft_lifetime_seconds",
            "the peer's IKE rekeys replace SAs; only hard limits apply",
        ),
        (
            esp.soft_lifetime_packets.is_some(),
            "soft_lifetime_packets",
            "the peer's IKE rekeys replace SAs; only hard limits apply",
        ),
        (
            esp.soft_lifetime_bytes.is_some(),
            "soft_lifetime_bytes",
            "the peer's IKE rekeys replace SAs; only hard limits apply",
        ),
    ] {
        if given {
            return Err(ConfigError::new(
                field(&format!("esp.{name}")),
                format!("not with [peers.esp.ike]: {why}"),
            ));
        }
    }
    let ike_field = |f: &str| format!("peers[{i}].esp.ike.{f}");
    let role = match ike.role.as_deref().unwrap_or("initiator") {
        "initiator" => IkeRole::Initiator,
        "responder" => IkeRole::Responder,
        other => {
            return Err(ConfigError::new(
                ike_field("role"),
                format!("`{}` is not initiator or responder", other.escape_debug()),
            ))
        }
    };
    let certificate = match ike.auth.as_deref().unwrap_or("psk") {
        "psk" => false,
        "certificate" => true,
        other => {
            return Err(ConfigError::new(
                ike_field("auth"),
                format!("`{}` is not psk or certificate", other.escape_debug()),
            ))
        }
    };
    let (psk, psk_file) = if certificate {
        for (given, f, why) in [
            (
                ike.psk_file.is_some(),
                "psk_file",
                "not with auth = \"certificate\"",
            ),
            (
                ike.local_id.is_some(),
                "local_id",
                "comes from the certificate (its subject DN) with auth = \"certificate\"",
            ),
        ] {
            if given {
                return Err(ConfigError::new(ike_field(f), why));
            }
        }
        (zeroize::Zeroizing::new(Vec::new()), PathBuf::new())
    } else {
        ike_psk(i, ike)?
    };
    let id = |f: &str, v: &Option<String>| {
        let v = v.as_deref().ok_or_else(|| {
            ConfigError::new(
                ike_field(f),
                "required (an IP address, user@host or host name)",
            )
        })?;
        parse_identity(v).map_err(|m| ConfigError::new(ike_field(f), m))
    };
    let (local_id, remote_id) = if certificate {
        let remote = ike.remote_id.as_deref().ok_or_else(|| {
            ConfigError::new(
                ike_field("remote_id"),
                "required: the peer's SPIFFE ID (spiffe://...), which its certificate must carry",
            )
        })?;
        let remote = isthmus_identity::SpiffeId::parse(remote).map_err(|e| {
            ConfigError::new(
                ike_field("remote_id"),
                format!("with auth = \"certificate\", a SPIFFE ID: {e}"),
            )
        })?;
        // Our subject DN is filled in once [identity] is read.
        (
            isthmus_ike::wire::Identification {
                id_type: 9,
                data: Vec::new(),
            },
            crate::ipsec::spiffe_identity(&remote),
        )
    } else {
        (
            id("local_id", &ike.local_id)?,
            id("remote_id", &ike.remote_id)?,
        )
    };
    let mut local_prefixes = Vec::new();
    for (j, text) in ike.local_prefixes.iter().enumerate() {
        local_prefixes.push(text.parse::<IpPrefix>().map_err(|e| {
            ConfigError::new(
                ike_field(&format!("local_prefixes[{j}]")),
                format!("`{text}`: {e}"),
            )
        })?);
    }
    if local_prefixes.is_empty() {
        return Err(ConfigError::new(
            ike_field("local_prefixes"),
            "required: this side of the tunnel (our traffic selectors)",
        ));
    }
    let groups = ike.groups.clone().unwrap_or_else(|| vec![31, 19, 20]);
    check_choices(
        &ike_field("groups"),
        &groups,
        &[31, 19, 20],
        "Diffie-Hellman groups 31 (Curve25519), 19 (P-256) or 20 (P-384)",
    )?;
    let key_bits = ike.key_bits.clone().unwrap_or_else(|| vec![256, 128]);
    check_choices(
        &ike_field("key_bits"),
        &key_bits,
        &[256, 128],
        "AES-GCM-16 key sizes 256 or 128",
    )?;
    let dpd = match ike.dpd_seconds.unwrap_or(DEFAULT_DPD_SECONDS) {
        0 => None,
        n if n > 86_400 => {
            return Err(ConfigError::new(
                ike_field("dpd_seconds"),
                "at most 86400 (0 turns liveness checks off)",
            ))
        }
        n => Some(Duration::from_secs(n)),
    };
    let defaults = Lifetimes::default();
    let hard = Limits {
        time: esp
            .hard_lifetime_seconds
            .map_or(IKE_HARD_LIFETIME, Duration::from_secs),
        packets: esp.hard_lifetime_packets.unwrap_or(defaults.hard.packets),
        bytes: esp.hard_lifetime_bytes.unwrap_or(defaults.hard.bytes),
    };
    let esn = esp.esn.unwrap_or(true);
    if hard.time.is_zero() || hard.packets == 0 || hard.bytes == 0 {
        return Err(ConfigError::new(
            field("esp.hard_lifetime_seconds"),
            "hard limits must be above 0",
        ));
    }
    if !esn && hard.packets > u64::from(u32::MAX) {
        return Err(ConfigError::new(
            field("esp.hard_lifetime_packets"),
            "without ESN the 32-bit counter must never wrap: at most 4294967295",
        ));
    }
    let grace = esp
        .rekey_grace_seconds
        .map_or(defaults.grace, Duration::from_secs);
    let rekey_after = match ike.rekey_seconds {
        None => None,
        Some(n) if n == 0 || n >= hard.time.as_secs() => {
            return Err(ConfigError::new(
                ike_field("rekey_seconds"),
                format!(
                    "{n} must be above 0 and below the hard lifetime ({} s)",
                    hard.time.as_secs()
                ),
            ))
        }
        Some(n) => Some(Duration::from_secs(n)),
    };
    Ok(IkePeerConfig {
        name: raw.name,
        endpoint,
        remote_prefixes,
        local_prefixes,
        role,
        psk,
        psk_file,
        certificates: None,
        local_id,
        remote_id,
        groups,
        key_bits,
        dpd,
        rekey_after,
        esn,
        // Soft limits are never used: nothing is derived (IKE rekeys).
        lifetimes: Lifetimes {
            soft: hard,
            hard,
            grace,
        },
    })
}

/// The pre-shared key of an IKE peer: its file (mode 0600), `0x` for hex, at least
/// [`MIN_PSK_BYTES`]; and the file's path.
fn ike_psk(i: usize, ike: &RawIke) -> Result<(zeroize::Zeroizing<Vec<u8>>, PathBuf), ConfigError> {
    let ike_field = |f: &str| format!("peers[{i}].esp.ike.{f}");
    let psk_file = ike
        .psk_file
        .clone()
        .ok_or_else(|| ConfigError::new(ike_field("psk_file"), "required (mode 0600)"))?;
    let text =
        read_secret_file(&psk_file).map_err(|m| ConfigError::new(ike_field("psk_file"), m))?;
    let text = text.trim_end_matches(['\n', '\r']);
    let psk = match text.strip_prefix("0x") {
        Some(h) => zeroize::Zeroizing::new(hex::decode(h).map_err(|_| {
            ConfigError::new(
                ike_field("psk_file"),
                format!("{}: starts with 0x but is not hex", psk_file.display()),
            )
        })?),
        None => zeroize::Zeroizing::new(text.as_bytes().to_vec()),
    };
    if psk.len() < MIN_PSK_BYTES {
        return Err(ConfigError::new(
            ike_field("psk_file"),
            format!(
                "{}: the key is {} bytes; at least {MIN_PSK_BYTES} (one captured exchange lets anyone test guesses offline)",
                psk_file.display(),
                psk.len()
            ),
        ));
    }
    Ok((psk, psk_file))
}

/// Shortest pre-shared key accepted for IKE.
const MIN_PSK_BYTES: usize = 16;
/// Liveness checks of IKE peers, by default.
const DEFAULT_DPD_SECONDS: u64 = 30;
/// How long an IKE-keyed ESP SA may be used at most, by default: past the
/// CHILD_SA lifetimes peers use (strongSwan one hour, Cisco ASA eight, others
/// up to a day). Near it with no rekey from the peer, the IKE SA starts over.
const IKE_HARD_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A non-empty list of distinct values out of `allowed`.
fn check_choices(
    field: &str,
    list: &[u16],
    allowed: &[u16],
    what: &str,
) -> Result<(), ConfigError> {
    let distinct = list.iter().enumerate().all(|(k, v)| !list[..k].contains(v));
    if list.is_empty() || !distinct || list.iter().any(|v| !allowed.contains(v)) {
        return Err(ConfigError::new(
            field,
            format!("{list:?}: a list of distinct {what}, most preferred first"),
        ));
    }
    Ok(())
}

/// ESN and SA lifetimes of an ESP peer, with the checks that keep a
/// counter from ever wrapping.
fn esp_lifetimes(i: usize, esp: &RawEsp) -> Result<(bool, Lifetimes), ConfigError> {
    let defaults = Lifetimes::default();
    let limits = |secs: Option<u64>, packets: Option<u64>, bytes: Option<u64>, d: Limits| Limits {
        time: secs.map(Duration::from_secs).unwrap_or(d.time),
        packets: packets.unwrap_or(d.packets),
        bytes: bytes.unwrap_or(d.bytes),
    };
    let soft = limits(
        esp.soft_lifetime_seconds,
        esp.soft_lifetime_packets,
        esp.soft_lifetime_bytes,
        defaults.soft,
    );
    let hard = limits(
        esp.hard_lifetime_seconds,
        esp.hard_lifetime_packets,
        esp.hard_lifetime_bytes,
        defaults.hard,
    );
    let esn = esp.esn.unwrap_or(true);
    for (name, s, h) in [
        ("seconds", soft.time.as_secs(), hard.time.as_secs()),
        ("packets", soft.packets, hard.packets),
        ("bytes", soft.bytes, hard.bytes),
    ] {
        if s == 0 || s >= h {
            return Err(ConfigError::new(
                format!("peers[{i}].esp.soft_lifetime_{name}"),
                format!("{s} must be above 0 and below hard_lifetime_{name} ({h})"),
            ));
        }
    }
    if !esn && hard.packets > u64::from(u32::MAX) {
        return Err(ConfigError::new(
            format!("peers[{i}].esp.hard_lifetime_packets"),
            "without ESN the 32-bit counter must never wrap: at most 4294967295",
        ));
    }
    let grace = Duration::from_secs(esp.rekey_grace_seconds.unwrap_or(defaults.grace.as_secs()));
    Ok((esn, Lifetimes { soft, hard, grace }))
}

/// The file that marks a manual SA file as used by a gateway run.
pub fn sa_in_use_marker(sa_file: &Path) -> PathBuf {
    let mut name = sa_file.as_os_str().to_owned();
    name.push(".used");
    PathBuf::from(name)
}

fn parse_spi(v: &SpiValue) -> Result<u32, String> {
    let spi = match v {
        SpiValue::Number(n) => *n,
        SpiValue::Text(t) => {
            let t = t.trim();
            let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(hex) => u32::from_str_radix(hex, 16),
                None => t.parse(),
            };
            parsed.map_err(|_| format!("`{t}` is not a 32-bit number"))?
        }
    };
    if spi < 256 {
        return Err(format!("{spi} is reserved (SPIs 0 to 255 are)"));
    }
    Ok(spi)
}

/// Reads an SA file; errors carry a sub-field (e.g. `.outbound_key`) and a
/// message that never includes key material.
fn read_sa_file(path: &Path) -> Result<Arc<dyn EspKeying>, (String, String)> {
    let text = read_secret_file(path).map_err(|m| (String::new(), m))?;
    let raw: RawSaFile = toml::from_str(&text).map_err(|e| {
        (
            String::new(),
            format!(
                "{}: {}",
                path.display(),
                e.message().lines().next().unwrap_or("invalid")
            ),
        )
    })?;
    let cipher: EspCipher = raw.cipher.parse().map_err(|m| (".cipher".to_string(), m))?;
    let keys = |spi: &SpiValue, key: &str, name: &str| -> Result<SaKeys, (String, String)> {
        let spi = parse_spi(spi).map_err(|m| (format!(".{name}_spi"), m))?;
        let bytes = zeroize::Zeroizing::new(
            hex::decode(key.trim())
                .map_err(|_| (format!(".{name}_key"), "is not hex".to_string()))?,
        );
        let want = cipher.key_len() + 4;
        if bytes.len() != want {
            return Err((
                format!(".{name}_key"),
                format!(
                    "is {} bytes; {} needs {want} (key followed by the 4-byte salt)",
                    bytes.len(),
                    cipher.name()
                ),
            ));
        }
        let key_len = cipher.key_len();
        Ok(SaKeys {
            spi,
            key: zeroize::Zeroizing::new(bytes[..key_len].to_vec()),
            salt: [
                bytes[key_len],
                bytes[key_len + 1],
                bytes[key_len + 2],
                bytes[key_len + 3],
            ],
        })
    };
    let pair = SaPair {
        outbound: keys(&raw.outbound_spi, &raw.outbound_key, "outbound")?,
        inbound: keys(&raw.inbound_spi, &raw.inbound_key, "inbound")?,
    };
    if pair.outbound.spi == pair.inbound.spi {
        return Err((
            ".inbound_spi".into(),
            "must differ from outbound_spi".into(),
        ));
    }
    // One key (or salt) for both directions would have both gateways encrypt
    // under the same key and nonce sequence: AES-GCM nonce reuse.
    if *pair.outbound.key == *pair.inbound.key {
        return Err((
            ".inbound_key".into(),
            "uses the same key as outbound_key; each direction needs its own key".into(),
        ));
    }
    if pair.outbound.salt == pair.inbound.salt {
        return Err((
            ".inbound_key".into(),
            "ends in the same salt as outbound_key; each direction needs its own salt".into(),
        ));
    }
    Ok(Arc::new(ManualKeying::new(cipher, pair)))
}

fn peer(i: usize, raw: RawPeer) -> Result<PeerConfig, ConfigError> {
    let field = |f: &str| format!("peers[{i}].{f}");
    if raw.esp.is_some() {
        return Err(ConfigError::new(
            field("esp"),
            "is for ESP peers; set kind = \"esp\"",
        ));
    }
    let key_text = raw
        .public_key
        .ok_or_else(|| ConfigError::new(field("public_key"), "required"))?;
    let public_key = PublicKey::from_base64(&key_text)
        .map_err(|e| ConfigError::new(field("public_key"), e.to_string()))?;
    let endpoint = raw
        .endpoint
        .map(|e| parse_endpoint(field("endpoint"), &e))
        .transpose()?;
    let allowed_prefixes = parse_prefixes(i, &raw.allowed_prefixes)?;
    check_peer_name(i, &raw.name)?;
    Ok(PeerConfig {
        name: raw.name,
        public_key,
        previous_keys: Vec::new(),
        preshared_key: None,
        endpoint,
        allowed_prefixes,
        persistent_keepalive: raw.persistent_keepalive.filter(|k| *k > 0),
    })
}

/// Checks that need all peers at once (duplicates, overlaps, own key), by
/// building the peer set exactly as the gateway will.
fn check_peers(
    iface: &InterfaceConfig,
    peers: &[PeerConfig],
    index: &[usize],
) -> Result<(), ConfigError> {
    use isthmus_tunnel::PeerSetError;
    let original = |i: usize| index.get(i).copied().unwrap_or(i);
    let first_index =
        |key: &PublicKey| original(peers.iter().position(|p| p.public_key == *key).unwrap_or(0));
    match WgCore::new(iface.private_key.clone(), peers.to_vec()) {
        Ok(_) => Ok(()),
        Err(PeerSetError::DuplicatePeer(key)) => {
            let last = original(peers.iter().rposition(|p| p.public_key == key).unwrap_or(0));
            Err(ConfigError::new(
                format!("peers[{last}].public_key"),
                format!("same key as peers[{}]", first_index(&key)),
            ))
        }
        Err(PeerSetError::OwnKey(key)) => Err(ConfigError::new(
            format!("peers[{}].public_key", first_index(&key)),
            "is this gateway's own public key",
        )),
        Err(PeerSetError::PrefixConflict {
            prefix,
            first,
            second,
        }) => Err(ConfigError::new(
            format!("peers[{}].allowed_prefixes", first_index(&second)),
            format!("{prefix} is also claimed by peers[{}]", first_index(&first)),
        )),
        Err(e) => Err(ConfigError::new("peers", e.to_string())),
    }
}

/// Builds the ESP peers as the gateway will (every SA of the first
/// generations), so SPI clashes and overlapping prefixes are config errors.
fn check_esp_peers(peers: &[EspPeerConfig], index: &[usize]) -> Result<(), ConfigError> {
    use isthmus_tunnel::esp::{EspCore, EspError};
    let original = |i: usize| index.get(i).copied().unwrap_or(i);
    match EspCore::new(peers.to_vec(), std::time::Instant::now()) {
        Ok(_) => Ok(()),
        Err(EspError::Sa { peer, source }) => Err(ConfigError::new(
            format!("peers[{}].esp.sa_file", original(peer)),
            source.to_string(),
        )),
        Err(EspError::Keying { peer, source }) => Err(ConfigError::new(
            format!("peers[{}].esp.sa_file", original(peer)),
            source.to_string(),
        )),
        Err(EspError::SpiConflict { peer, spi }) => Err(ConfigError::new(
            format!("peers[{}].esp.sa_file", original(peer)),
            format!("inbound SPI {spi:#010x} is already used by another ESP peer"),
        )),
        Err(EspError::PrefixConflict { prefix }) => {
            let owner = peers
                .iter()
                .rposition(|p| p.allowed_prefixes.contains(&prefix))
                .unwrap_or(0);
            Err(ConfigError::new(
                format!("peers[{}].allowed_prefixes", original(owner)),
                format!("{prefix} is claimed by two ESP peers"),
            ))
        }
        Err(e) => Err(ConfigError::new("peers", e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    struct TempFile(PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn temp_file(tag: &str, content: &str, mode: u32) -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "isthmus-config-test-{}-{tag}-{}.key",
            std::process::id(),
            PrivateKey::generate()
                .public_key()
                .to_base64()
                .replace(['/', '+', '='], "")
        ));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(content.as_bytes()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        TempFile(path)
    }

    fn key_file(mode: u32) -> (TempFile, PrivateKey) {
        let key = PrivateKey::generate();
        (temp_file("key", key.to_base64_secret().as_str(), mode), key)
    }

    fn config(key: &Path, extra_iface: &str, peers: &str) -> String {
        format!(
            "[interface]\nname = \"ist0\"\nprivate_key_file = \"{}\"\n{extra_iface}\n{peers}",
            key.display()
        )
    }

    fn peer_block(key: &PublicKey, prefixes: &str) -> String {
        format!(
            "[[peers]]\npublic_key = \"{key}\"\nendpoint = \"192.0.2.2:51820\"\nallowed_prefixes = [{prefixes}]\n"
        )
    }

    fn field_of(text: &str) -> String {
        parse(text).expect_err("config must be refused").field
    }

    fn node_cfg(path: &Path) -> NodeConfig {
        NodeConfig {
            pod_prefixes: vec!["10.244.1.0/24".parse().unwrap()],
            cluster_prefixes: vec!["10.244.0.0/16".parse().unwrap()],
            strict: true,
            nodes_file: path.to_path_buf(),
            table: DEFAULT_NODE_TABLE,
            rule_priority: DEFAULT_NODE_RULE_PRIORITY,
            nodes: vec![],
        }
    }

    fn node_entry(name: &str, endpoint: &str, pods: &str) -> String {
        format!(
            "[[nodes]]\nname = \"{name}\"\nspiffe_id = \"spiffe://td.test/cluster/k/gateway/{name}\"\n\
             channel_endpoint = \"{endpoint}\"\npod_prefixes = [\"{pods}\"]\n"
        )
    }

    #[test]
    fn nodes_file_is_checked_entry_by_entry() {
        let own: isthmus_identity::SpiffeId =
            "spiffe://td.test/cluster/k/gateway/node1".parse().unwrap();
        let cfg = node_cfg(Path::new("/nonexistent"));
        let good = node_entry("node1", "192.0.2.1:7443", "10.244.1.0/24")
            + &node_entry("node2", "192.0.2.2:7443", "10.244.2.0/24");
        let nodes = parse_nodes(&good, &cfg, &own).unwrap();
        // Its own entry is skipped.
        assert_eq!(nodes.len(), 1);
        assert_eq!(
            nodes[0].allowed_prefixes,
            vec!["10.244.2.0/24".parse().unwrap()]
        );
        let field = |text: String| parse_nodes(&text, &cfg, &own).expect_err("refused").field;
        // The key channel inside the pod space would be caught by strict mode.
        assert_eq!(
            field(node_entry("node2", "10.244.9.1:7443", "10.244.2.0/24")),
            "nodes[0].channel_endpoint"
        );
        // Outside the cluster's pod space, overlapping this node's or another node's.
        assert_eq!(
            field(node_entry("node2", "192.0.2.2:7443", "10.99.0.0/24")),
            "nodes[0].pod_prefixes[0]"
        );
        assert_eq!(
            field(node_entry("node2", "192.0.2.2:7443", "10.244.1.128/25")),
            "nodes[0].pod_prefixes[0]"
        );
        assert_eq!(
            field(
                node_entry("node2", "192.0.2.2:7443", "10.244.2.0/24")
                    + &node_entry("node3", "192.0.2.3:7443", "10.244.2.0/25")
            ),
            "nodes[1].pod_prefixes[0]"
        );
        // Another cluster's gateway is not a node of this cluster.
        let foreign = node_entry("node2", "192.0.2.2:7443", "10.244.2.0/24")
            .replace("/cluster/k/", "/cluster/other/");
        assert_eq!(field(foreign), "nodes[0].spiffe_id");
        assert_eq!(field("[[nodes]]\nbogus = 1\n".into()), "nodes[0].bogus");
    }

    #[test]
    fn a_nodes_file_writable_by_others_is_refused() {
        let own: isthmus_identity::SpiffeId =
            "spiffe://td.test/cluster/k/gateway/node1".parse().unwrap();
        let text = node_entry("node2", "192.0.2.2:7443", "10.244.2.0/24");
        let file = temp_file("nodes", &text, 0o644);
        assert_eq!(load_nodes(&node_cfg(&file.0), &own).unwrap().len(), 1);
        for mode in [0o664, 0o666, 0o646] {
            std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = load_nodes(&node_cfg(&file.0), &own).expect_err("group/world-writable");
            assert!(e.message.contains("writable"), "{e:?}");
        }
    }

    #[test]
    fn egress_policy_resources_are_read_like_egress_tables() {
        let (file, _) = key_file(0o600);
        let a = PrivateKey::generate().public_key();
        let peers = format!(
            "[[peers]]\nname = \"egress-a\"\npublic_key = \"{a}\"\nendpoint = \"192.0.2.2:51820\"\n\
             allowed_prefixes = [\"100.64.2.0/24\"]\n[steering]\ninterfaces = [\"wl0\"]\n"
        );
        let resource = |spec_extra: &str, peer: &str| {
            format!(
                "apiVersion: isthmus.dev/v1alpha1\nkind: IsthmusEgressPolicy\nmetadata:\n  name: to-db\n\
                 spec:\n  sources: [\"100.64.1.0/24\"]\n  destinations: [\"203.0.113.0/24\"]\n  \
                 gateways:\n    - peer: {peer}\n      probe: 100.64.2.1\n{spec_extra}"
            )
        };
        let with = |yaml: &str| {
            let policies = temp_file("policies.yaml", yaml, 0o644);
            let text = format!(
                "egress_policies = \"{}\"\n{}",
                policies.0.display(),
                config(&file.0, "addresses = [\"100.64.1.1/32\"]", &peers)
            );
            (parse(&text), policies)
        };
        let (cfg, _keep) = with(&resource("  probeIntervalMs: 100\n", "egress-a"));
        let cfg = cfg.expect("a valid resource");
        assert_eq!(cfg.egress.len(), 1);
        assert_eq!(cfg.egress[0].name, "to-db");
        assert_eq!(
            cfg.egress[0].probe_interval,
            std::time::Duration::from_millis(100)
        );
        // Errors name the resource and its field as spelled in the resource.
        let (err, _keep) = with(&resource("  probeIntervalMs: 5\n", "egress-a"));
        assert_eq!(
            err.unwrap_err().field,
            "egress_policies[to-db].spec.probeIntervalMs"
        );
        let (err, _keep) = with(&resource("", "nobody"));
        assert_eq!(
            err.unwrap_err().field,
            "egress_policies[to-db].spec.gateways[0].peer"
        );
        let (err, _keep) = with(&resource("  probeEvery: 5\n", "egress-a"));
        assert!(
            err.unwrap_err()
                .field
                .starts_with("egress_policies[0].spec"),
            "unknown fields are refused"
        );
        let missing = format!(
            "egress_policies = \"/nonexistent/policies.yaml\"\n{}",
            config(&file.0, "", "")
        );
        assert_eq!(field_of(&missing), "egress_policies");
    }

    #[test]
    fn egress_policies_and_the_egress_gateway_name_each_bad_field() {
        let (file, _) = key_file(0o600);
        let (a, b) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let peers = format!(
            "[[peers]]\nname = \"egress-a\"\npublic_key = \"{a}\"\nendpoint = \"192.0.2.2:51820\"\n\
             allowed_prefixes = [\"100.64.2.0/24\"]\n\
             [[peers]]\nname = \"other\"\npublic_key = \"{b}\"\nendpoint = \"192.0.2.3:51820\"\n\
             allowed_prefixes = [\"100.64.2.128/25\"]\n\
             [steering]\ninterfaces = [\"wl0\"]\n"
        );
        let policy = |dest: &str, probe: &str| {
            config(
                &file.0,
                "addresses = [\"100.64.1.1/32\"]",
                &format!(
                    "{peers}[[egress]]\nname = \"partner\"\nsources = [\"100.64.1.2/32\"]\n\
                     destinations = [\"{dest}\"]\ngateways = [{{ peer = \"egress-a\", probe = \"{probe}\" }}]\n"
                ),
            )
        };
        let cfg = parse(&policy("203.0.113.0/24", "100.64.2.1")).unwrap();
        assert_eq!(cfg.egress.len(), 1);
        assert_eq!(
            cfg.egress[0].probe_source,
            "100.64.1.1".parse::<IpAddr>().unwrap()
        );
        // A probe address that routes to another (more specific) peer, or none.
        assert_eq!(
            field_of(&policy("203.0.113.0/24", "100.64.2.200")),
            "egress[0].gateways[0].probe"
        );
        assert_eq!(
            field_of(&policy("203.0.113.0/24", "100.64.9.1")),
            "egress[0].gateways[0].probe"
        );
        // Endpoints inside a peer's prefixes would turn that peer's traffic into "replies".
        assert_eq!(
            field_of(&policy("100.64.2.0/26", "100.64.2.1")),
            "egress[0].destinations"
        );
        let gw = |extra: &str| {
            config(
                &file.0,
                "",
                &format!("[egress_gateway]\nuplink = \"eth1\"\negress_ip = \"198.51.100.1\"\nsources = [\"100.64.0.0/16\"]\n{extra}"),
            )
        };
        assert!(parse(&gw("destinations = [\"203.0.113.0/24\"]"))
            .unwrap()
            .egress_gateway
            .is_some());
        assert_eq!(field_of(&gw("")), "egress_gateway.destinations");
        assert_eq!(
            field_of(&gw(
                "destinations = [\"203.0.113.0/24\"]\nendpoint_probes = [\"nope\"]"
            )),
            "egress_gateway.endpoint_probes[0]"
        );
    }

    #[test]
    fn steering_parses_with_defaults_and_names_each_bad_field() {
        use isthmus_ebpf_redirect::Mode;
        let (file, _) = key_file(0o600);
        let b = PrivateKey::generate().public_key();
        let with = |steering: &str| {
            config(
                &file.0,
                "",
                &format!(
                    "{}\n[steering]\n{steering}\n",
                    peer_block(&b, "\"100.64.2.0/24\"")
                ),
            )
        };
        let cfg = parse(&with("interfaces = [\"veth-pods\"]")).unwrap();
        let s = cfg.steering.expect("steering");
        assert_eq!(s.mode, Mode::Auto);
        assert_eq!(s.tunnel, "ist0");
        assert_eq!(s.interfaces, vec!["veth-pods".to_string()]);
        assert_eq!(s.policy, isthmus_ebpf_redirect::PolicyNumbers::default());
        let s = parse(&with("mode = \"policy\"\ninterfaces = [\"a\", \"b\"]\ntable = 100\nfwmark = 256\nfwmark_mask = 65280"))
            .unwrap()
            .steering
            .unwrap();
        assert_eq!(
            (s.mode, s.policy.table, s.policy.fwmark, s.policy.mask),
            (Mode::Policy, 100, 256, 65280)
        );
        assert_eq!(field_of(&with("interfaces = []")), "steering.interfaces");
        assert_eq!(
            field_of(&with("mode = \"xdp\"\ninterfaces = [\"a\"]")),
            "steering.mode"
        );
        assert_eq!(
            field_of(&with("interfaces = [\"a\", \"a\"]")),
            "steering.interfaces[1]"
        );
        assert_eq!(
            field_of(&with("interfaces = [\"ist0\"]")),
            "steering.interfaces[0]"
        );
        assert_eq!(
            field_of(&with("interfaces = [\"a/b\"]")),
            "steering.interfaces[0]"
        );
        assert_eq!(
            field_of(&with("interfaces = [\"a\"]\ntable = 254")),
            "steering.table"
        );
        assert_eq!(
            field_of(&with("interfaces = [\"a\"]\nfwmark = 1")),
            "steering.fwmark"
        );
        assert_eq!(
            field_of(&with("interfaces = [\"a\"]\nrule_priority = 40000")),
            "steering.rule_priority"
        );
        assert_eq!(
            field_of(&with("interfaces = [\"a\"]\nextra = 1")),
            "steering.extra"
        );
    }

    #[test]
    fn a_full_config_parses_with_defaults() {
        let (file, _) = key_file(0o600);
        let b = PrivateKey::generate().public_key();
        let text = config(
            &file.0,
            "addresses = [\"100.64.1.1/24\", \"fd00:1::1/64\"]",
            &peer_block(&b, "\"100.64.2.0/24\", \"fd00:2::/64\""),
        );
        let cfg = parse(&text).unwrap();
        assert_eq!(cfg.interface.name, "ist0");
        assert_eq!(cfg.interface.mtu, DEFAULT_MTU);
        assert_eq!(cfg.interface.listen_port, DEFAULT_LISTEN_PORT);
        assert_eq!(
            cfg.interface.admin_socket,
            PathBuf::from("/var/run/isthmus/ist0.sock")
        );
        assert_eq!(cfg.interface.addresses.len(), 2);
        assert_eq!(cfg.peers.len(), 1);
        assert_eq!(cfg.peers[0].public_key, b);
        assert_eq!(cfg.peers[0].allowed_prefixes.len(), 2);
    }

    #[test]
    fn every_error_names_its_field() {
        let (file, own) = key_file(0o600);
        let b = PrivateKey::generate().public_key();
        let ok_peer = peer_block(&b, "\"100.64.2.0/24\"");
        let other = PrivateKey::generate().public_key();
        let cases: Vec<(String, &str)> = vec![
            ("[interface]\nmtu = 1400\n".into(), "interface.name"),
            (String::new(), "interface"),
            (config(&file.0, "mtu = 100", ""), "interface.mtu"),
            (config(&file.0, "mtu = 70000", ""), "interface.mtu"),
            (
                config(&file.0, "listen_port = 70000", ""),
                "interface.listen_port",
            ),
            (config(&file.0, "bogus = 1", ""), "interface.bogus"),
            (
                config(&file.0, "addresses = [\"1.2.3.4/40\"]", ""),
                "interface.addresses[0]",
            ),
            (
                "[interface]\nname = \"this-name-is-too-long\"\n".into(),
                "interface.name",
            ),
            (
                config(&file.0, "", "[[peers]]\npublic_key = \"nope\"\n"),
                "peers[0].public_key",
            ),
            (
                config(
                    &file.0,
                    "",
                    &format!("{ok_peer}[[peers]]\nendpoint = \"192.0.2.9:5\"\n"),
                ),
                "peers[1].public_key",
            ),
            (
                config(&file.0, "", &peer_block(&b, "\"100.64.2.1/24\"")),
                "peers[0].allowed_prefixes[0]",
            ),
            (
                config(
                    &file.0,
                    "",
                    &ok_peer.replace("192.0.2.2:51820", "example.com:1"),
                ),
                "peers[0].endpoint",
            ),
            (
                config(&file.0, "", &format!("{ok_peer}{ok_peer}")),
                "peers[1].public_key",
            ),
            (
                config(
                    &file.0,
                    "",
                    &format!("{ok_peer}{}", peer_block(&other, "\"100.64.2.0/24\"")),
                ),
                "peers[1].allowed_prefixes",
            ),
            (
                config(
                    &file.0,
                    "",
                    &peer_block(&own.public_key(), "\"100.64.2.0/24\""),
                ),
                "peers[0].public_key",
            ),
            (
                config(
                    &file.0,
                    "",
                    &ok_peer.replace("allowed_prefixes", "allowed_ips"),
                ),
                "peers[0].allowed_ips",
            ),
        ];
        for (text, field) in cases {
            assert_eq!(field_of(&text), field, "config:\n{text}");
        }
    }

    fn sa_text(cipher: &str, key_len: usize) -> String {
        format!(
            "cipher = \"{cipher}\"\noutbound_spi = \"0x1000abcd\"\noutbound_key = \"{}\"\n\
             inbound_spi = 0x2000\ninbound_key = \"{}\"\n",
            "11".repeat(key_len + 4),
            "22".repeat(key_len + 4)
        )
        .replace("inbound_spi = 0x2000", "inbound_spi = 8192")
    }

    fn esp_block(sa: &Path, prefix: &str, extra: &str) -> String {
        format!(
            "[[peers]]\nname = \"b\"\nkind = \"esp\"\nendpoint = \"192.0.2.2:4500\"\n\
             allowed_prefixes = [\"{prefix}\"]\n[peers.esp]\nsa_file = \"{}\"\n{extra}",
            sa.display()
        )
    }

    /// The mode is checked on the file that is read, not on whatever the path
    /// named a moment before: a path flipped between a 0600 and a 0644 file
    /// never yields the 0644 file's contents.
    #[test]
    fn secret_files_are_checked_on_the_file_that_is_read() {
        let secret = temp_file("flip-secret", "SECRET", 0o600);
        let open = temp_file("flip-open", "OPEN", 0o644);
        let link = secret.0.with_extension("link");
        let _cleanup = TempFile(link.clone());
        let tmp = secret.0.with_extension("tmp");
        let _cleanup_tmp = TempFile(tmp.clone());
        std::os::unix::fs::symlink(&secret.0, &link).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flipper = {
            let (stop, link, tmp) = (stop.clone(), link.clone(), tmp.clone());
            let targets = [secret.0.clone(), open.0.clone()];
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let _ = std::fs::remove_file(&tmp);
                    std::os::unix::fs::symlink(&targets[i % 2], &tmp).unwrap();
                    std::fs::rename(&tmp, &link).unwrap();
                }
            })
        };
        let started = std::time::Instant::now();
        let (mut accepted, mut refused) = (0u32, 0u32);
        while started.elapsed() < Duration::from_secs(3) {
            match read_secret_file(&link) {
                Ok(text) => {
                    assert_eq!(text.as_str(), "SECRET", "read a 0644 file as a secret");
                    accepted += 1;
                }
                Err(e) => {
                    assert!(e.contains("mode 0644"), "{e}");
                    refused += 1;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flipper.join().unwrap();
        assert!(
            accepted > 0 && refused > 0,
            "{accepted} accepted, {refused} refused"
        );
    }

    #[test]
    fn esp_peers_parse_with_manual_keying() {
        let (key, _) = key_file(0o600);
        let sa = temp_file("sa", &sa_text("aes256-gcm", 32), 0o600);
        let text = config(
            &key.0,
            "esp_listen_port = 4501",
            &esp_block(
                &sa.0,
                "100.64.2.0/24",
                "soft_lifetime_packets = 1000\nrekey_grace_seconds = 5\n",
            ),
        );
        let cfg = parse(&text).unwrap();
        assert_eq!(cfg.peers.len(), 0);
        assert_eq!(cfg.esp_peers.len(), 1);
        let p = &cfg.esp_peers[0];
        assert_eq!(p.endpoint, "192.0.2.2:4500".parse().unwrap());
        assert_eq!(p.lifetimes.soft.packets, 1000);
        assert_eq!(p.lifetimes.grace, Duration::from_secs(5));
        assert!(p.esn);
        let pair = p.keying.sa_pair(0).unwrap();
        assert_eq!((pair.outbound.spi, pair.inbound.spi), (0x1000_abcd, 0x2000));
        assert_eq!(pair.outbound.key.len(), 32);
        assert_eq!(cfg.interface.esp_listen_port, 4501);
        assert_eq!(
            cfg.interface.mtu, DEFAULT_MTU_WITH_ESP,
            "ESP needs room for its overhead"
        );
        let explicit = parse(&text.replace(
            "esp_listen_port = 4501",
            "esp_listen_port = 4501\nmtu = 1380",
        ))
        .unwrap();
        assert_eq!(explicit.interface.mtu, 1380);
    }

    #[test]
    fn esp_errors_name_their_field() {
        let (key, _) = key_file(0o600);
        let good = temp_file("sa", &sa_text("aes128-gcm", 16), 0o600);
        let open = temp_file("sa", &sa_text("aes128-gcm", 16), 0o644);
        let short = temp_file(
            "sa",
            &sa_text("aes128-gcm", 16).replace(&"11".repeat(20), "1111"),
            0o600,
        );
        let mismatch = temp_file("sa", &sa_text("aes256-gcm", 16), 0o600);
        let reserved = temp_file(
            "sa",
            &sa_text("aes128-gcm", 16).replace("0x1000abcd", "0x10"),
            0o600,
        );
        // The same key (or salt) in both directions: both gateways would encrypt
        // under one key with one nonce sequence (AES-GCM nonce reuse).
        let same_key = temp_file(
            "sa",
            &sa_text("aes128-gcm", 16).replace(&"22".repeat(20), &"11".repeat(20)),
            0o600,
        );
        let same_salt = temp_file(
            "sa",
            &sa_text("aes128-gcm", 16)
                .replace(&"11".repeat(20), &format!("{}a1b2c3d4", "11".repeat(16)))
                .replace(&"22".repeat(20), &format!("{}a1b2c3d4", "22".repeat(16))),
            0o600,
        );
        let wg_peer = peer_block(&PrivateKey::generate().public_key(), "\"100.64.0.0/16\"");
        let cases: Vec<(String, &str)> = vec![
            (
                config(&key.0, "", &esp_block(&same_key.0, "100.64.2.0/24", "")),
                "peers[0].esp.sa_file.inbound_key",
            ),
            (
                config(&key.0, "", &esp_block(&same_salt.0, "100.64.2.0/24", "")),
                "peers[0].esp.sa_file.inbound_key",
            ),
            (
                config(
                    &key.0,
                    "",
                    &esp_block(&good.0, "100.64.2.0/24", "")
                        .replace("kind = \"esp\"", "kind = \"gre\""),
                ),
                "peers[0].kind",
            ),
            (
                config(&key.0, "", &esp_block(&open.0, "100.64.2.0/24", "")),
                "peers[0].esp.sa_file",
            ),
            (
                config(&key.0, "", &esp_block(&short.0, "100.64.2.0/24", "")),
                "peers[0].esp.sa_file.outbound_key",
            ),
            (
                config(&key.0, "", &esp_block(&mismatch.0, "100.64.2.0/24", "")),
                "peers[0].esp.sa_file.outbound_key",
            ),
            (
                config(&key.0, "", &esp_block(&reserved.0, "100.64.2.0/24", "")),
                "peers[0].esp.sa_file.outbound_spi",
            ),
            (
                config(
                    &key.0,
                    "",
                    &esp_block(
                        &good.0,
                        "100.64.2.0/24",
                        "soft_lifetime_seconds = 4000\nhard_lifetime_seconds = 3600\n",
                    ),
                ),
                "peers[0].esp.soft_lifetime_seconds",
            ),
            (
                config(
                    &key.0,
                    "",
                    &esp_block(
                        &good.0,
                        "100.64.2.0/24",
                        "esn = false\nhard_lifetime_packets = 5000000000\n",
                    ),
                ),
                "peers[0].esp.hard_lifetime_packets",
            ),
            (
                config(
                    &key.0,
                    "",
                    &esp_block(&good.0, "100.64.2.0/24", "")
                        .replace("endpoint = \"192.0.2.2:4500\"\n", ""),
                ),
                "peers[0].endpoint",
            ),
            (
                config(
                    &key.0,
                    "",
                    &esp_block(&good.0, "100.64.2.0/24", "bogus = 1\n"),
                ),
                "peers[0].esp.bogus",
            ),
            (
                config(
                    &key.0,
                    "",
                    &format!("{wg_peer}{}", esp_block(&good.0, "100.64.2.0/24", "")),
                ),
                "peers[1].allowed_prefixes",
            ),
            (
                config(
                    &key.0,
                    "",
                    &format!(
                        "{}{}",
                        esp_block(&good.0, "100.64.2.0/24", ""),
                        esp_block(&good.0, "100.64.3.0/24", "")
                    ),
                ),
                "peers[1].esp.sa_file",
            ),
        ];
        for (text, field) in cases {
            let err = parse(&text).expect_err(&text);
            assert_eq!(err.field, field, "{err}\nconfig:\n{text}");
            assert!(
                !err.message.contains(&"11".repeat(20)),
                "key material in {err}"
            );
        }
    }

    /// A CA directory with one gateway certificate, removed on drop.
    struct Pki {
        dir: PathBuf,
        chain: PathBuf,
        key: PathBuf,
        bundle: PathBuf,
    }
    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn pki() -> Pki {
        use isthmus_certs::store::CaDirectory;
        use isthmus_certs::Validity;
        use isthmus_identity::{ClusterName, GatewayName, TrustDomain};
        let dir = std::env::temp_dir().join(format!(
            "isthmus-config-pki-{}-{}",
            std::process::id(),
            PrivateKey::generate()
                .public_key()
                .to_base64()
                .replace(['/', '+', '='], "")
        ));
        let ca = CaDirectory::init(
            &dir,
            &TrustDomain::new("mesh.test").unwrap(),
            Validity::days(2),
        )
        .unwrap();
        let cluster = ClusterName::new("a").unwrap();
        ca.issue_cluster_ca(&cluster, Validity::days(2)).unwrap();
        let files = ca
            .issue_gateway(
                &cluster,
                &GatewayName::new("gw").unwrap(),
                Validity::days(2),
            )
            .unwrap();
        Pki {
            bundle: ca.bundle_path(),
            chain: files.chain,
            key: files.key,
            dir,
        }
    }

    fn identity_config(pki: &Pki, peers: &str) -> String {
        format!(
            "[interface]\nname = \"ist0\"\n[identity]\ntrust_bundle = \"{}\"\ncertificate = \"{}\"\n\
             private_key = \"{}\"\nlisten = \"127.0.0.1:0\"\n{peers}",
            pki.bundle.display(),
            pki.chain.display(),
            pki.key.display()
        )
    }

    const B_WG: &str = "[[peers]]\nname = \"b\"\nspiffe_id = \"spiffe://mesh.test/cluster/b/gateway/gw\"\n\
                        channel_endpoint = \"192.0.2.2:7443\"\nallowed_prefixes = [\"100.64.2.0/24\"]\n";
    const C_ESP: &str = "[[peers]]\nname = \"c\"\nkind = \"esp\"\nspiffe_id = \"spiffe://mesh.test/cluster/c/gateway/gw\"\n\
                         channel_endpoint = \"192.0.2.3:7443\"\nallowed_prefixes = [\"100.64.3.0/24\"]\n\
                         [peers.esp]\ncipher = \"aes256-gcm\"\n";

    #[test]
    fn peers_by_identity_need_no_keys_in_the_config() {
        let pki = pki();
        let cfg = parse(&identity_config(&pki, &format!("{B_WG}{C_ESP}"))).unwrap();
        assert!(
            !cfg.interface.private_key_from_file,
            "a fresh WireGuard key per start"
        );
        assert!(cfg.peers.is_empty() && cfg.esp_peers.is_empty());
        assert_eq!(cfg.identity_peers.len(), 2);
        assert_eq!(cfg.identity_peers[0].kind, TunnelKind::Wireguard);
        assert_eq!(
            cfg.identity_peers[1].spiffe_id.to_string(),
            "spiffe://mesh.test/cluster/c/gateway/gw"
        );
        assert_eq!(
            cfg.identity_peers[1].esp.map(|e| e.cipher),
            Some(EspCipher::Aes256Gcm)
        );
        let id = cfg.identity.unwrap();
        assert_eq!(id.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(id.trust.roots.len(), 1);
    }

    #[test]
    fn remote_admin_defaults_to_this_gateways_cluster_and_errors_name_their_field() {
        let pki = pki();
        let admin = "[admin]\nlisten = \"127.0.0.1:7445\"\n";
        let cfg = parse(&identity_config(&pki, &format!("{B_WG}{admin}"))).expect("valid");
        let ra = cfg.remote_admin.expect("[admin]");
        assert_eq!(ra.listen, "127.0.0.1:7445".parse().expect("addr"));
        assert_eq!(
            ra.clusters,
            vec![isthmus_identity::ClusterName::new("a").expect("name")]
        );
        assert_eq!(ra.trust_domain.to_string(), "mesh.test");
        let two = format!("{admin}clusters = [\"a\", \"ops\"]\n");
        let cfg = parse(&identity_config(&pki, &two)).expect("valid");
        assert_eq!(cfg.remote_admin.expect("[admin]").clusters.len(), 2);
        for (text, field) in [
            (identity_config(&pki, "[admin]\n"), "admin.listen"),
            (
                identity_config(&pki, "[admin]\nlisten = \"port 7\"\n"),
                "admin.listen",
            ),
            (
                identity_config(&pki, &format!("{admin}clusters = []\n")),
                "admin.clusters",
            ),
            (
                identity_config(
                    &pki,
                    &format!("{admin}clusters = [\"a\", \"Not_A_Label\"]\n"),
                ),
                "admin.clusters[1]",
            ),
            (format!("[interface]\nname = \"ist0\"\n{admin}"), "admin"),
        ] {
            let err = parse(&text).expect_err(&text);
            assert_eq!(err.field, field, "{text}: {err}");
        }
    }

    #[test]
    fn mesh_config_parses_and_its_errors_name_their_field() {
        let pki = pki();
        let mesh = "[mesh]\nlocal_prefixes = [\"100.64.1.0/24\"]\n\
                    [[mesh.clusters]]\nname = \"b\"\napi = \"192.0.2.2:7444\"\n\
                    [[mesh.clusters]]\nname = \"c\"\napi = \"192.0.2.3\"\n";
        let cfg = parse(&identity_config(&pki, mesh)).expect("valid");
        let m = cfg.mesh.expect("mesh");
        assert_eq!(m.clusters.len(), 2);
        assert_eq!(m.clusters[1].api.port(), DEFAULT_MESH_API_PORT);
        assert_eq!(m.kinds, [TunnelKind::Wireguard]);
        // The API servers' addresses are off limits to remote clusters.
        assert!(m
            .local_prefixes
            .contains(&"192.0.2.2/32".parse().expect("prefix")));
        assert!(!m.remote_space.is_empty());
        let cases = [
            (mesh.replace("\"b\"", "\"a\""), "mesh.clusters[0].name"),
            (mesh.replace("\"c\"", "\"b\""), "mesh.clusters[1].name"),
            (
                mesh.replace("192.0.2.2:7444", "nowhere"),
                "mesh.clusters[0].api",
            ),
            (
                mesh.replace("100.64.1.0/24", "100.64.1.0/33"),
                "mesh.local_prefixes[0]",
            ),
            (
                mesh.replace("[mesh]\n", "[mesh]\nkinds = [\"gre\"]\n"),
                "mesh.kinds[0]",
            ),
        ];
        for (text, field) in cases {
            let err = parse(&identity_config(&pki, &text)).expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
        let remote_space = mesh.replace("[mesh]\n", "[mesh]\nremote_space = [\"0.0.0.0/0\"]\n");
        let err = parse(&identity_config(&pki, &remote_space)).expect_err("default");
        assert_eq!(err.field, "mesh.remote_space[0]");
    }

    #[test]
    fn identity_errors_name_their_field() {
        let pki = pki();
        let (key, _) = key_file(0o600);
        let cases: Vec<(String, &str)> = vec![
            (config(&key.0, "", B_WG), "identity"),
            (
                identity_config(&pki, &B_WG.replace("/gateway/gw", "/node/gw")),
                "peers[0].spiffe_id",
            ),
            (
                identity_config(&pki, &B_WG.replace("spiffe://", "https://")),
                "peers[0].spiffe_id",
            ),
            (
                identity_config(
                    &pki,
                    &format!(
                        "{B_WG}public_key = \"{}\"\n",
                        PrivateKey::generate().public_key()
                    ),
                ),
                "peers[0].public_key",
            ),
            (
                identity_config(
                    &pki,
                    &B_WG.replace("channel_endpoint = \"192.0.2.2:7443\"\n", ""),
                ),
                "peers[0].channel_endpoint",
            ),
            (
                identity_config(&pki, &format!("{C_ESP}sa_file = \"/nonexistent\"\n")),
                "peers[0].esp.sa_file",
            ),
            (
                identity_config(&pki, &C_ESP.replace("aes256-gcm", "des")),
                "peers[0].esp.cipher",
            ),
            (
                identity_config(&pki, &format!("{B_WG}{B_WG}")),
                "peers[1].spiffe_id",
            ),
            (
                identity_config(
                    &pki,
                    &format!(
                        "{B_WG}{}",
                        C_ESP.replace("100.64.3.0/24", "100.64.2.128/25")
                    ),
                ),
                "peers[1].allowed_prefixes",
            ),
            (
                identity_config(&pki, B_WG).replace("[identity]\n", "[identity]\nbogus = 1\n"),
                "identity.bogus",
            ),
            (
                identity_config(&pki, B_WG)
                    .replace(&pki.bundle.display().to_string(), "/nonexistent.pem"),
                "identity.trust_bundle",
            ),
            (
                identity_config(&pki, B_WG)
                    .replace(&pki.key.display().to_string(), &key.0.display().to_string()),
                "identity.private_key",
            ),
        ];
        for (text, field) in cases {
            let err = parse(&text).expect_err(&text);
            assert_eq!(err.field, field, "{err}\nconfig:\n{text}");
        }
        // A certificate key readable by others is refused, naming the file.
        std::fs::set_permissions(&pki.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = parse(&identity_config(&pki, B_WG)).unwrap_err();
        assert_eq!(err.field, "identity.private_key");
        assert!(err.message.contains("644"), "{err}");
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let (file, key) = key_file(0o644);
        let err = parse(&config(&file.0, "", "")).unwrap_err();
        assert_eq!(err.field, "interface.private_key_file");
        assert!(err.message.contains("0644"), "{err}");
        assert!(!err.message.contains(key.to_base64_secret().as_str()));
    }

    #[test]
    fn a_bad_key_file_does_not_echo_its_content() {
        let file = temp_file("bad", "c2VjcmV0LWJ1dC10b28tc2hvcnQ=", 0o600);
        let err = parse(&config(&file.0, "", "")).unwrap_err();
        assert_eq!(err.field, "interface.private_key_file");
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
    }

    fn ike_block(psk: &Path, extra_esp: &str, extra_ike: &str) -> String {
        format!(
            "[[peers]]\nname = \"partner\"\nkind = \"esp\"\nendpoint = \"192.0.2.2:4500\"\n\
             allowed_prefixes = [\"100.64.2.0/24\"]\n[peers.esp]\n{extra_esp}\n[peers.esp.ike]\n\
             psk_file = \"{}\"\nlocal_id = \"gw1.example\"\nremote_id = \"192.0.2.2\"\n\
             local_prefixes = [\"100.64.1.0/24\"]\n{extra_ike}",
            psk.display()
        )
    }

    #[test]
    fn an_ike_peer_gets_defaults_and_its_key_from_a_private_file() {
        let psk = temp_file("psk", "0x00112233445566778899aabbccddeeff\n", 0o600);
        let text = format!(
            "[interface]\nname = \"ist0\"\n{}",
            ike_block(&psk.0, "", "")
        );
        let cfg = parse(&text).unwrap();
        assert!(cfg.esp_peers.is_empty());
        let p = &cfg.ike_peers[0];
        assert_eq!(p.role, crate::ipsec::IkeRole::Initiator);
        assert_eq!(p.psk.len(), 16, "0x-prefixed text is hex");
        assert_eq!(
            (p.groups.clone(), p.key_bits.clone()),
            (vec![31, 19, 20], vec![256, 128])
        );
        assert_eq!(p.dpd, Some(Duration::from_secs(30)));
        assert_eq!(p.rekey_after, None, "our rekeys only near the hard limits");
        assert_eq!(crate::ipsec::display_id(&p.local_id), "gw1.example");
        assert_eq!(
            (p.remote_id.id_type, p.remote_id.data.clone()),
            (1, vec![192, 0, 2, 2])
        );
        assert_eq!(p.lifetimes.hard.time, Duration::from_secs(86_400));
        assert_eq!(
            cfg.interface.mtu, DEFAULT_MTU_WITH_ESP,
            "an ESP tunnel's MTU"
        );
        let shown = format!("{p:?}");
        assert!(
            !shown.contains("00112233"),
            "the key is not in Debug: {shown}"
        );
    }

    #[test]
    fn ike_peer_errors_name_the_field() {
        let psk = temp_file("psk-ok", "a-long-enough-pre-shared-key", 0o600);
        let open = temp_file("psk-open", "a-long-enough-pre-shared-key", 0o644);
        let short = temp_file("psk-short", "short", 0o600);
        let field_of = |block: String| {
            parse(&format!("[interface]\nname = \"ist0\"\n{block}"))
                .unwrap_err()
                .field
        };
        for (block, field) in [
            (ike_block(&open.0, "", ""), "peers[0].esp.ike.psk_file"),
            (ike_block(&short.0, "", ""), "peers[0].esp.ike.psk_file"),
            (
                ike_block(&psk.0, "", "role = \"server\""),
                "peers[0].esp.ike.role",
            ),
            (
                ike_block(&psk.0, "", "groups = [14]"),
                "peers[0].esp.ike.groups",
            ),
            (
                ike_block(&psk.0, "", "key_bits = [256, 256]"),
                "peers[0].esp.ike.key_bits",
            ),
            (
                ike_block(&psk.0, "", "dpd_seconds = 100000"),
                "peers[0].esp.ike.dpd_seconds",
            ),
            (
                ike_block(&psk.0, "", "rekey_seconds = 0"),
                "peers[0].esp.ike.rekey_seconds",
            ),
            (
                ike_block(&psk.0, "hard_lifetime_seconds = 600", "rekey_seconds = 600"),
                "peers[0].esp.ike.rekey_seconds",
            ),
            (
                ike_block(&psk.0, "sa_file = \"/x\"", ""),
                "peers[0].esp.sa_file",
            ),
            (
                ike_block(&psk.0, "cipher = \"aes128-gcm\"", ""),
                "peers[0].esp.cipher",
            ),
            (
                ike_block(&psk.0, "soft_lifetime_seconds = 10", ""),
                "peers[0].esp.soft_lifetime_seconds",
            ),
            (
                ike_block(&psk.0, "", "").replace("local_prefixes = [\"100.64.1.0/24\"]", ""),
                "peers[0].esp.ike.local_prefixes",
            ),
            (
                ike_block(&psk.0, "", "")
                    .replace("remote_id = \"192.0.2.2\"", "remote_id = \"CN=x, O=y\""),
                "peers[0].esp.ike.remote_id",
            ),
            (
                ike_block(&psk.0, "", "").replace("allowed_prefixes = [\"100.64.2.0/24\"]", ""),
                "peers[0].allowed_prefixes",
            ),
        ] {
            assert_eq!(field_of(block.clone()), field, "{block}");
        }
        // Two peers at one address (IKE is told apart by it), or claiming one prefix.
        let two = format!(
            "{}\n{}",
            ike_block(&psk.0, "", ""),
            ike_block(&psk.0, "", "")
        );
        assert_eq!(field_of(two.clone()), "peers[1].endpoint");
        let other_address = two.replacen("192.0.2.2:4500", "192.0.2.3:4500", 1);
        assert_eq!(field_of(other_address), "peers[1].allowed_prefixes");
    }
}
