//! Launching `isthmus-gateway` and querying it with `isthmusctl`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::bins;
use crate::keys::KeyPair;
use crate::process::ProcessGuard;
use crate::run::Run;

/// Exit status of `isthmus-gateway` for a configuration error (64, `EX_USAGE`).
pub const CONFIG_ERROR_EXIT: i32 = 64;

/// How long to wait for a started gateway to answer `isthmusctl status`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A `[[peers]]` entry.
#[derive(Clone, Debug, Default)]
pub struct PeerConfig {
    /// Optional label.
    pub name: Option<String>,
    /// The peer's public key, base64.
    pub public_key: String,
    /// `ip:port` or `[ipv6]:port`.
    pub endpoint: Option<String>,
    /// Prefixes routed to this peer (and accepted as inner source addresses from it).
    pub allowed_prefixes: Vec<String>,
    /// Keepalive interval in seconds.
    pub persistent_keepalive: Option<u16>,
}

/// An `isthmus-gateway` configuration file.
#[derive(Clone, Debug, Default)]
pub struct GatewayConfig {
    /// TUN device name (`interface.name`; `None` leaves it out, for negative tests).
    pub name: Option<String>,
    /// `interface.private_key_file`.
    pub private_key_file: Option<PathBuf>,
    /// `interface.listen_port`.
    pub listen_port: Option<u16>,
    /// `interface.mtu`.
    pub mtu: Option<u32>,
    /// `interface.addresses`.
    pub addresses: Vec<String>,
    /// `interface.admin_socket`.
    pub admin_socket: Option<PathBuf>,
    /// Extra raw TOML lines appended to `[interface]` (for negative tests).
    pub interface_extra: Vec<String>,
    /// `[[peers]]`.
    pub peers: Vec<PeerConfig>,
    /// Raw TOML appended after the peers (other tables, e.g. `[steering]`).
    pub trailer: Vec<String>,
}

/// An ESP peer entry (`[[peers]]` with `kind = "esp"`, keyed by an SA file).
#[derive(Clone, Debug, Default)]
pub struct EspPeerConfig {
    /// Optional label.
    pub name: Option<String>,
    /// `ip:port` or `[ipv6]:port` of the peer's ESP-in-UDP socket.
    pub endpoint: Option<String>,
    /// Prefixes routed to this peer (and accepted as inner source addresses from it).
    pub allowed_prefixes: Vec<String>,
    /// `[peers.esp] sa_file` (manual keying, mode 0600; see [`crate::esp::keygen`]).
    pub sa_file: Option<PathBuf>,
    /// `[peers.esp] esn` (the gateway's default is on).
    pub esn: Option<bool>,
    /// `[peers.esp] soft_lifetime_packets`.
    pub soft_lifetime_packets: Option<u64>,
    /// `[peers.esp] hard_lifetime_packets`.
    pub hard_lifetime_packets: Option<u64>,
    /// `[peers.esp] rekey_grace_seconds`.
    pub rekey_grace_seconds: Option<u64>,
    /// Extra raw TOML lines appended to `[peers.esp]` (other lifetimes, negative tests).
    pub esp_extra: Vec<String>,
}

/// The ESP part of a gateway configuration: `interface.esp_listen_port` and the ESP peers,
/// rendered after the WireGuard peers of a [`GatewayConfig`] by
/// [`GatewayConfig::to_toml_with_esp`].
#[derive(Clone, Debug, Default)]
pub struct EspSettings {
    /// `interface.esp_listen_port` (the gateway's default is 4500).
    pub listen_port: Option<u16>,
    /// ESP peers.
    pub peers: Vec<EspPeerConfig>,
}

impl EspPeerConfig {
    /// Renders the `[[peers]]` entry with its `[peers.esp]` table.
    pub fn to_toml(&self) -> String {
        let mut s = String::from("\n[[peers]]\n");
        if let Some(name) = &self.name {
            let _ = writeln!(s, "name = {}", toml_str(name));
        }
        s.push_str("kind = \"esp\"\n");
        if let Some(e) = &self.endpoint {
            let _ = writeln!(s, "endpoint = {}", toml_str(e));
        }
        let _ = writeln!(
            s,
            "allowed_prefixes = {}",
            toml_list(&self.allowed_prefixes)
        );
        s.push_str("[peers.esp]\n");
        if let Some(p) = &self.sa_file {
            let _ = writeln!(s, "sa_file = {}", toml_str(&p.to_string_lossy()));
        }
        if let Some(esn) = self.esn {
            let _ = writeln!(s, "esn = {esn}");
        }
        for (key, value) in [
            ("soft_lifetime_packets", self.soft_lifetime_packets),
            ("hard_lifetime_packets", self.hard_lifetime_packets),
            ("rekey_grace_seconds", self.rekey_grace_seconds),
        ] {
            if let Some(v) = value {
                let _ = writeln!(s, "{key} = {v}");
            }
        }
        for line in &self.esp_extra {
            let _ = writeln!(s, "{line}");
        }
        s
    }
}

/// Quotes `s` as a TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", inner.join(", "))
}

impl GatewayConfig {
    /// Renders the configuration as TOML.
    pub fn to_toml(&self) -> String {
        self.to_toml_with_esp(&EspSettings::default())
    }

    /// Renders the configuration plus `esp` (its port in `[interface]`, its peers after the
    /// WireGuard peers) as TOML.
    pub fn to_toml_with_esp(&self, esp: &EspSettings) -> String {
        let mut s = String::from("[interface]\n");
        if let Some(name) = &self.name {
            let _ = writeln!(s, "name = {}", toml_str(name));
        }
        if let Some(p) = &self.private_key_file {
            let _ = writeln!(s, "private_key_file = {}", toml_str(&p.to_string_lossy()));
        }
        if let Some(port) = self.listen_port {
            let _ = writeln!(s, "listen_port = {port}");
        }
        if let Some(mtu) = self.mtu {
            let _ = writeln!(s, "mtu = {mtu}");
        }
        if !self.addresses.is_empty() {
            let _ = writeln!(s, "addresses = {}", toml_list(&self.addresses));
        }
        if let Some(p) = &self.admin_socket {
            let _ = writeln!(s, "admin_socket = {}", toml_str(&p.to_string_lossy()));
        }
        if let Some(port) = esp.listen_port {
            let _ = writeln!(s, "esp_listen_port = {port}");
        }
        for line in &self.interface_extra {
            let _ = writeln!(s, "{line}");
        }
        for peer in &self.peers {
            s.push_str("\n[[peers]]\n");
            if let Some(name) = &peer.name {
                let _ = writeln!(s, "name = {}", toml_str(name));
            }
            let _ = writeln!(s, "public_key = {}", toml_str(&peer.public_key));
            if let Some(e) = &peer.endpoint {
                let _ = writeln!(s, "endpoint = {}", toml_str(e));
            }
            let _ = writeln!(
                s,
                "allowed_prefixes = {}",
                toml_list(&peer.allowed_prefixes)
            );
            if let Some(k) = peer.persistent_keepalive {
                let _ = writeln!(s, "persistent_keepalive = {k}");
            }
        }
        for peer in &esp.peers {
            s.push_str(&peer.to_toml());
        }
        for line in &self.trailer {
            let _ = writeln!(s, "{line}");
        }
        s
    }

    /// The admin socket the gateway will use (explicit or the default for its name).
    pub fn effective_admin_socket(&self) -> Option<PathBuf> {
        self.admin_socket.clone().or_else(|| {
            self.name
                .as_ref()
                .map(|n| PathBuf::from(format!("/var/run/isthmus/{n}.sock")))
        })
    }
}

/// Gateway-wide drop counters.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct GatewayDrops {
    /// Packets from the TUN device matching no peer's prefix.
    pub no_route: u64,
    /// Datagrams that are not well-formed WireGuard messages.
    pub malformed: u64,
    /// Datagrams for a receiver index / key that belongs to no peer.
    pub unknown_peer: u64,
}

/// Per-peer drop counters.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct PeerDrops {
    /// Packets for the peer while no session exists.
    pub no_session: u64,
    /// Decrypted packets whose inner source is outside the peer's prefixes.
    pub bad_source: u64,
    /// Datagrams that failed authentication.
    pub decrypt_failure: u64,
    /// Replayed datagrams.
    pub replay: u64,
    /// ESP datagrams below the anti-replay window.
    #[serde(default)]
    pub too_old: u64,
}

/// The outbound SA of an ESP peer in `isthmusctl status`.
#[derive(Clone, Debug, Deserialize)]
pub struct EspOutboundStatus {
    /// SPI, `0x…`.
    pub spi: String,
    /// SA generation (0 = the SA file's, +1 per rekey).
    pub generation: u64,
    /// Last sequence number sent.
    pub last_seq: u64,
    /// Age in seconds.
    pub age_secs: f64,
}

/// One inbound SA of an ESP peer in `isthmusctl status`.
#[derive(Clone, Debug, Deserialize)]
pub struct EspInboundStatus {
    /// SPI, `0x…`.
    pub spi: String,
    /// SA generation.
    pub generation: u64,
    /// Highest sequence number accepted.
    pub highest_seq: u64,
    /// Packets accepted.
    pub packets: u64,
    /// Age in seconds.
    pub age_secs: f64,
    /// Replaced by a newer SA; kept for the rekey grace period.
    pub retiring: bool,
}

/// The `esp` object of an ESP peer in `isthmusctl status`.
#[derive(Clone, Debug, Deserialize)]
pub struct EspStatus {
    /// `aes128-gcm` or `aes256-gcm`.
    pub cipher: String,
    /// Extended sequence numbers.
    pub esn: bool,
    /// Outbound SA replacements so far.
    pub rekeys: u64,
    /// The SA packets are sent on.
    pub outbound: EspOutboundStatus,
    /// Installed inbound SAs, by generation.
    pub inbound: Vec<EspInboundStatus>,
}

/// One peer in `isthmusctl status --output json`.
#[derive(Clone, Debug, Deserialize)]
pub struct PeerStatus {
    /// Label.
    pub name: Option<String>,
    /// `wireguard` or `esp`.
    #[serde(default)]
    pub kind: String,
    /// Public key, base64 (`None` for an ESP peer).
    pub public_key: Option<String>,
    /// Current endpoint.
    pub endpoint: Option<String>,
    /// Allowed prefixes.
    pub allowed_prefixes: Vec<String>,
    /// Seconds since the last completed handshake (`None` before the first).
    pub last_handshake_secs_ago: Option<f64>,
    /// Completed handshakes.
    pub handshakes: u64,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// Packets received from the peer.
    pub rx_packets: u64,
    /// Packets sent to the peer.
    pub tx_packets: u64,
    /// Drop counters.
    pub drops: PeerDrops,
    /// SAs of an ESP peer (`None` for a WireGuard peer).
    #[serde(default)]
    pub esp: Option<EspStatus>,
}

/// `isthmusctl status --output json`.
#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    /// TUN device name.
    pub interface: String,
    /// The gateway's public key.
    pub public_key: String,
    /// UDP port.
    pub listen_port: u16,
    /// TUN MTU.
    pub mtu: u32,
    /// Gateway-wide drops.
    pub drops: GatewayDrops,
    /// The ESP-in-UDP port (when ESP peers are configured).
    #[serde(default)]
    pub esp_listen_port: Option<u16>,
    /// Gateway-wide ESP drops (`malformed`; `unknown_peer` = unknown SPI).
    #[serde(default)]
    pub esp_drops: Option<GatewayDrops>,
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// Steering (`[steering]`), with its counters.
    #[serde(default)]
    pub steering: Option<isthmus_ebpf_redirect::SteeringStatus>,
    /// Node mode (`[node]`), as the gateway reports it.
    #[serde(default)]
    pub node: Option<serde_json::Value>,
    /// IKEv2 with the peers of `[peers.esp.ike]`.
    #[serde(default)]
    pub ike: Vec<IkeStatus>,
}

/// One IKE peer in `isthmusctl status --output json`.
#[derive(Clone, Debug, Deserialize)]
pub struct IkeStatus {
    /// The peer's name.
    pub peer: String,
    /// `initiator` or `responder`.
    pub role: String,
    /// `connecting`, `established`, `waiting` or `down`.
    pub state: String,
    /// The IKE SA's SPIs (initiator's, responder's), hex.
    pub ike_spis: Option<(String, String)>,
    /// CHILD_SAs in force, oldest first: (inbound SPI, outbound SPI), `0x…`.
    pub child_sas: Vec<(String, String)>,
    /// CHILD_SA rekeys installed (the peer's and the gateway's own).
    pub child_rekeys: u64,
    /// Of those, the gateway's own.
    #[serde(default)]
    pub own_rekeys: u64,
    /// IKE SAs established since start.
    pub established: u64,
    /// Seconds since the peer was last heard (authenticated).
    pub last_heard_secs: Option<f64>,
    /// Why the last IKE SA ended or failed.
    pub last_error: Option<String>,
}

impl Status {
    /// The peer with public key `public_key`.
    pub fn peer(&self, public_key: &str) -> Option<&PeerStatus> {
        self.peers
            .iter()
            .find(|p| p.public_key.as_deref() == Some(public_key))
    }

    /// The peer labelled `name` (ESP peers have no public key).
    pub fn peer_named(&self, name: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.name.as_deref() == Some(name))
    }

    /// Like [`Status::peer_named`], failing with the whole status when absent.
    pub fn require_peer_named(&self, name: &str) -> Result<&PeerStatus> {
        self.peer_named(name)
            .with_context(|| format!("peer named {name:?} not in status: {self:#?}"))
    }

    /// Like [`Status::peer`], failing with the whole status when absent.
    pub fn require_peer(&self, public_key: &str) -> Result<&PeerStatus> {
        self.peer(public_key)
            .with_context(|| format!("peer {public_key} not in status: {self:#?}"))
    }
}

/// Runs `isthmusctl args…` (in the root namespace: the admin socket is a file).
pub fn isthmusctl(args: &[&str]) -> Result<Output> {
    let ctl = bins::ctl();
    crate::cmd::output(&ctl.to_string_lossy(), args)
}

/// `isthmusctl status --socket PATH --output json`, parsed.
pub fn status_of(admin_socket: &Path) -> Result<Status> {
    let sock = admin_socket.to_string_lossy();
    let args = ["status", "--socket", sock.as_ref(), "--output", "json"];
    let out = isthmusctl(&args)?;
    crate::cmd::check("isthmusctl", &args, &out)?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).with_context(|| format!("parsing isthmusctl JSON: {text}"))
}

/// A running `isthmus-gateway`. Dropping it stops it (and prints its logs if a test failed).
#[derive(Debug)]
pub struct IsthmusGateway {
    /// Namespace it runs in.
    pub ns: String,
    /// TUN device name.
    pub ifname: String,
    /// Its keys.
    pub keys: KeyPair,
    /// Admin socket path.
    pub admin_socket: PathBuf,
    /// Config file path.
    pub config_path: PathBuf,
    /// The configuration it was started with (its ESP part is in the file at `config_path`).
    pub config: GatewayConfig,
    proc: ProcessGuard,
}

impl IsthmusGateway {
    /// Writes `keys` to a 0600 file and `config` (whose `private_key_file` is set to that file
    /// unless already set) to the run dir, starts the gateway in `ns`, and waits until
    /// `isthmusctl status` answers.
    pub fn start(run: &Run, ns: &str, keys: &KeyPair, config: &GatewayConfig) -> Result<Self> {
        Self::start_with_esp(run, ns, keys, config, &EspSettings::default())
    }

    /// [`IsthmusGateway::start`] for a configuration with ESP peers (and port) `esp`.
    pub fn start_with_esp(
        run: &Run,
        ns: &str,
        keys: &KeyPair,
        config: &GatewayConfig,
        esp: &EspSettings,
    ) -> Result<Self> {
        let ifname = config
            .name
            .clone()
            .context("GatewayConfig.name is required to start a gateway")?;
        let mut config = config.clone();
        if config.private_key_file.is_none() {
            let key_path = run.path(&format!("{ifname}.key"));
            keys.write_private(&key_path, 0o600)?;
            config.private_key_file = Some(key_path);
        }
        let admin_socket = config
            .effective_admin_socket()
            .context("no admin socket path")?;
        let config_path = run.path(&format!("{ifname}.toml"));
        std::fs::write(&config_path, config.to_toml_with_esp(esp))
            .with_context(|| format!("writing {}", config_path.display()))?;
        let bin = bins::gateway();
        let config_s = config_path.to_string_lossy().into_owned();
        let proc = ProcessGuard::spawn(
            run,
            &format!("isthmus-gateway-{ifname}"),
            Some(ns),
            &bin.to_string_lossy(),
            &["--config", &config_s],
            &[(
                "RUST_LOG",
                &std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )],
        )?;
        let mut gw = IsthmusGateway {
            ns: ns.to_string(),
            ifname,
            keys: keys.clone(),
            admin_socket,
            config_path,
            config,
            proc,
        };
        gw.wait_ready(READY_TIMEOUT)?;
        Ok(gw)
    }

    /// Waits until `isthmusctl status` answers (fails early if the process exits).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_err = None;
        loop {
            if let Some(st) = self.proc.try_wait()? {
                bail!(
                    "isthmus-gateway {} exited ({st}) during startup\nconfig:\n{}\n{}",
                    self.ifname,
                    std::fs::read_to_string(&self.config_path).unwrap_or_default(),
                    self.proc.logs()
                );
            }
            if self.admin_socket.exists() {
                match status_of(&self.admin_socket) {
                    Ok(_) => return Ok(()),
                    Err(e) => last_err = Some(e),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "isthmus-gateway {} not ready within {timeout:?} (admin socket {} {}; last \
                     isthmusctl error: {})\n{}",
                    self.ifname,
                    self.admin_socket.display(),
                    if self.admin_socket.exists() {
                        "exists"
                    } else {
                        "missing"
                    },
                    last_err
                        .map(|e| format!("{e:#}"))
                        .unwrap_or_else(|| "none".into()),
                    self.proc.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `isthmusctl status --output json`, parsed.
    pub fn status(&self) -> Result<Status> {
        status_of(&self.admin_socket).with_context(|| format!("status of {}", self.ifname))
    }

    /// Polls [`IsthmusGateway::status`] until `pred` holds or `timeout` passes; returns the last
    /// status either way (callers assert on it).
    pub fn wait_status<F: Fn(&Status) -> bool>(
        &self,
        timeout: Duration,
        pred: F,
    ) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status()?;
            if pred(&st) || Instant::now() >= deadline {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the gateway (SIGTERM, SIGKILL after 5 s) and returns its exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.proc.stop()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Captured stdout+stderr.
    pub fn logs(&self) -> String {
        self.proc.logs()
    }

    /// The underlying process guard.
    pub fn process(&mut self) -> &mut ProcessGuard {
        &mut self.proc
    }
}

/// Outcome of [`run_to_exit`].
#[derive(Debug)]
pub struct ExitOutcome {
    /// Exit status (`None` if it was still running at the timeout and had to be killed).
    pub status: Option<ExitStatus>,
    /// Captured stdout.
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
}

/// Writes `toml` to the run dir and runs `isthmus-gateway --config FILE` in `ns`, expecting it to
/// exit by itself within `timeout` (config errors).
pub fn run_to_exit(
    run: &Run,
    ns: &str,
    label: &str,
    toml: &str,
    timeout: Duration,
) -> Result<ExitOutcome> {
    let config_path = run.path(&format!("{label}.toml"));
    std::fs::write(&config_path, toml)?;
    let bin = bins::gateway();
    let config_s = config_path.to_string_lossy().into_owned();
    let mut proc = ProcessGuard::spawn(
        run,
        label,
        Some(ns),
        &bin.to_string_lossy(),
        &["--config", &config_s],
        &[],
    )?;
    let status = proc.wait_timeout(timeout)?;
    if status.is_none() {
        proc.stop()?;
    }
    proc.set_print_on_panic(false);
    Ok(ExitOutcome {
        status,
        stdout: proc.stdout(),
        stderr: proc.stderr(),
    })
}
