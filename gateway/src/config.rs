//! The gateway's configuration file: read once, validated completely, and
//! turned into typed values before any socket or device exists.
//!
//! Every error names the field it is about (`interface.mtu`,
//! `peers[1].allowed_prefixes[0]`), so an operator can fix it without
//! reading code. Key material never appears in an error.

use isthmus_tunnel::{IpPrefix, PeerConfig, PrivateKey, PublicKey, WgCore};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const DEFAULT_LISTEN_PORT: u16 = 51820;
pub const DEFAULT_MTU: u16 = 1420;
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
    #[serde(default)]
    peers: Vec<RawPeer>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<String>,
    public_key: Option<String>,
    endpoint: Option<String>,
    #[serde(default)]
    allowed_prefixes: Vec<String>,
    persistent_keepalive: Option<u16>,
}

/// A validated gateway configuration.
#[derive(Debug)]
pub struct GatewayConfig {
    pub interface: InterfaceConfig,
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug)]
pub struct InterfaceConfig {
    pub name: String,
    pub private_key: PrivateKey,
    pub listen_port: u16,
    pub mtu: u16,
    /// Addresses put on the TUN device, with their prefix length.
    pub addresses: Vec<(IpAddr, u8)>,
    pub admin_socket: PathBuf,
    /// Serve the WireGuard UAPI at /var/run/wireguard/<name>.sock.
    pub uapi: bool,
    /// Ask for TUN offloads (TSO/GRO through the virtio-net header).
    pub offload: bool,
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
    let mut peers = Vec::with_capacity(raw.peers.len());
    for (i, p) in raw.peers.into_iter().enumerate() {
        peers.push(peer(i, p)?);
    }
    check_peers(&interface, &peers)?;
    Ok(GatewayConfig { interface, peers })
}

fn interface(raw: RawInterface) -> Result<InterfaceConfig, ConfigError> {
    let name = raw
        .name
        .ok_or_else(|| ConfigError::new("interface.name", "required (the TUN device name)"))?;
    validate_ifname(&name).map_err(|m| ConfigError::new("interface.name", m))?;

    let key_path = raw.private_key_file.ok_or_else(|| {
        ConfigError::new(
            "interface.private_key_file",
            "required (a file holding a key from `wg genkey`, mode 0600)",
        )
    })?;
    let private_key = read_private_key(&key_path)
        .map_err(|m| ConfigError::new("interface.private_key_file", m))?;

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
        name,
        private_key,
        listen_port: raw.listen_port.unwrap_or(DEFAULT_LISTEN_PORT),
        mtu,
        addresses,
        admin_socket,
        uapi: raw.uapi.unwrap_or(true),
        offload: raw.offload.unwrap_or(true),
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
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}: a private key must not be readable by group or others (chmod 600 it)",
            path.display()
        ));
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    PrivateKey::from_base64(&text).map_err(|e| format!("{}: {e}", path.display()))
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

fn peer(i: usize, raw: RawPeer) -> Result<PeerConfig, ConfigError> {
    let field = |f: &str| format!("peers[{i}].{f}");
    let key_text = raw
        .public_key
        .ok_or_else(|| ConfigError::new(field("public_key"), "required"))?;
    let public_key = PublicKey::from_base64(&key_text)
        .map_err(|e| ConfigError::new(field("public_key"), e.to_string()))?;
    let endpoint = raw
        .endpoint
        .map(|e| {
            e.parse::<SocketAddr>().map_err(|_| {
                ConfigError::new(
                    field("endpoint"),
                    format!("`{e}` is not IP:PORT (IPv6 as [ADDRESS]:PORT)"),
                )
            })
        })
        .transpose()?;
    if let Some(ep) = endpoint {
        if ep.port() == 0 || ep.ip().is_unspecified() {
            return Err(ConfigError::new(
                field("endpoint"),
                format!("`{ep}` is not a usable endpoint"),
            ));
        }
    }
    let mut allowed_prefixes = Vec::with_capacity(raw.allowed_prefixes.len());
    for (j, p) in raw.allowed_prefixes.iter().enumerate() {
        let prefix: IpPrefix = p.parse().map_err(|e| {
            ConfigError::new(
                format!("peers[{i}].allowed_prefixes[{j}]"),
                format!("`{p}`: {e}"),
            )
        })?;
        allowed_prefixes.push(prefix);
    }
    if let Some(name) = &raw.name {
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(ConfigError::new(
                field("name"),
                "must be 1 to 64 printable characters",
            ));
        }
    }
    Ok(PeerConfig {
        name: raw.name,
        public_key,
        preshared_key: None,
        endpoint,
        allowed_prefixes,
        persistent_keepalive: raw.persistent_keepalive.filter(|k| *k > 0),
    })
}

/// Checks that need all peers at once (duplicates, overlaps, own key), by
/// building the peer set exactly as the gateway will.
fn check_peers(iface: &InterfaceConfig, peers: &[PeerConfig]) -> Result<(), ConfigError> {
    use isthmus_tunnel::PeerSetError;
    let first_index =
        |key: &PublicKey| peers.iter().position(|p| p.public_key == *key).unwrap_or(0);
    match WgCore::new(iface.private_key.clone(), peers.to_vec()) {
        Ok(_) => Ok(()),
        Err(PeerSetError::DuplicatePeer(key)) => {
            let last = peers.iter().rposition(|p| p.public_key == key).unwrap_or(0);
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
}
