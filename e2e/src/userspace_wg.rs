//! Reference WireGuard peers configured through UAPI with `wg set`: wireguard-go and
//! boringtun-cli.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd;
use crate::isthmus::PeerConfig;
use crate::keys::KeyPair;
use crate::netns;
use crate::process::ProcessGuard;
use crate::run::Run;
use crate::TUNNEL_MTU;

/// Which reference implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserspaceImpl {
    /// Debian's `wireguard-go`.
    WireguardGo,
    /// `boringtun-cli` (from `cargo install boringtun-cli`).
    BoringtunCli,
}

impl UserspaceImpl {
    /// The executable's name.
    pub fn program(self) -> &'static str {
        match self {
            UserspaceImpl::WireguardGo => "wireguard-go",
            UserspaceImpl::BoringtunCli => "boringtun-cli",
        }
    }

    /// Where the executable is, if installed (`PATH`, then `~/.cargo/bin` for boringtun-cli).
    pub fn find(self) -> Option<PathBuf> {
        if let Some(p) = cmd::which(self.program()) {
            return Some(p);
        }
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        let p = home.join("bin").join(self.program());
        p.is_file().then_some(p)
    }
}

/// Where the UAPI socket of interface `ifname` lives (shared by all namespaces).
pub fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

/// A running wireguard-go or boringtun-cli with its TUN device configured, up, and routed.
#[derive(Debug)]
pub struct UserspaceWg {
    /// Which implementation.
    pub kind: UserspaceImpl,
    /// Namespace it runs in.
    pub ns: String,
    /// Its TUN interface.
    pub ifname: String,
    /// Its keys.
    pub keys: KeyPair,
    proc: ProcessGuard,
}

impl UserspaceWg {
    /// Starts `kind` in `ns` on interface `ifname`, then configures it with `wg set` (key,
    /// `listen_port`, `peers`), sets MTU [`TUNNEL_MTU`], raises the interface and routes every
    /// peer's allowed prefixes through it.
    pub fn start(
        run: &Run,
        kind: UserspaceImpl,
        ns: &str,
        ifname: &str,
        keys: &KeyPair,
        listen_port: u16,
        peers: &[PeerConfig],
    ) -> Result<Self> {
        let program = kind
            .find()
            .with_context(|| format!("{} is not installed", kind.program()))?;
        let program_s = program.to_string_lossy().into_owned();
        let sock = uapi_socket(ifname);
        if sock.exists() {
            bail!(
                "{} already exists: another process uses interface name {ifname}",
                sock.display()
            );
        }
        let proc = match kind {
            UserspaceImpl::WireguardGo => ProcessGuard::spawn(
                run,
                &format!("wireguard-go-{ifname}"),
                Some(ns),
                &program_s,
                &["-f", ifname],
                &[("WG_PROCESS_FOREGROUND", "1"), ("LOG_LEVEL", "error")],
            )?,
            UserspaceImpl::BoringtunCli => ProcessGuard::spawn(
                run,
                &format!("boringtun-{ifname}"),
                Some(ns),
                &program_s,
                &["--foreground", "--disable-drop-privileges", ifname],
                &[("WG_LOG_LEVEL", "error")],
            )?,
        };
        let mut wg = UserspaceWg {
            kind,
            ns: ns.to_string(),
            ifname: ifname.to_string(),
            keys: keys.clone(),
            proc,
        };
        wg.wait_for_socket(Duration::from_secs(10))?;
        wg.configure(run, listen_port, peers, TUNNEL_MTU)
            .with_context(|| {
                format!(
                    "configuring {} {ifname}\n{}",
                    kind.program(),
                    wg.proc.logs()
                )
            })?;
        Ok(wg)
    }

    fn wait_for_socket(&mut self, timeout: Duration) -> Result<()> {
        let sock = uapi_socket(&self.ifname);
        let deadline = Instant::now() + timeout;
        while !sock.exists() {
            if let Some(st) = self.proc.try_wait()? {
                bail!(
                    "{} exited ({st}) during startup\n{}",
                    self.kind.program(),
                    self.proc.logs()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not create {} within {timeout:?}\n{}",
                    self.kind.program(),
                    sock.display(),
                    self.proc.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn configure(&self, run: &Run, listen_port: u16, peers: &[PeerConfig], mtu: u32) -> Result<()> {
        let key_path = run.path(&format!("{}.key", self.ifname));
        self.keys.write_private(&key_path, 0o600)?;
        let key_s = key_path.to_string_lossy().into_owned();
        let port_s = listen_port.to_string();
        let mut args: Vec<String> = vec![
            "set".into(),
            self.ifname.clone(),
            "private-key".into(),
            key_s,
            "listen-port".into(),
            port_s,
        ];
        for p in peers {
            args.push("peer".into());
            args.push(p.public_key.clone());
            if let Some(e) = &p.endpoint {
                args.push("endpoint".into());
                args.push(e.clone());
            }
            args.push("allowed-ips".into());
            args.push(p.allowed_prefixes.join(","));
            if let Some(k) = p.persistent_keepalive {
                args.push("persistent-keepalive".into());
                args.push(k.to_string());
            }
        }
        let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
        netns::exec(&self.ns, "wg", &args_ref)?;
        let mtu_s = mtu.to_string();
        netns::ip(
            &self.ns,
            &["link", "set", &self.ifname, "mtu", &mtu_s, "up"],
        )?;
        for p in peers {
            for prefix in &p.allowed_prefixes {
                netns::ip(&self.ns, &["route", "replace", prefix, "dev", &self.ifname])?;
            }
        }
        Ok(())
    }

    /// Stops the process and returns its exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        self.proc.stop()
    }

    /// Captured output.
    pub fn logs(&self) -> String {
        self.proc.logs()
    }
}

/// `wg show IFNAME dump`, parsed into one entry per peer.
#[derive(Clone, Debug)]
pub struct WgPeerDump {
    /// Peer public key.
    pub public_key: String,
    /// Endpoint or `(none)`.
    pub endpoint: String,
    /// Allowed IPs, comma-separated.
    pub allowed_ips: String,
    /// Unix time of the latest handshake (0 = never).
    pub latest_handshake: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// Runs `wg show IFNAME dump` (in namespace `ns`) and parses the peer lines.
pub fn wg_show_dump(ns: &str, ifname: &str) -> Result<Vec<WgPeerDump>> {
    let out = netns::exec(ns, "wg", &["show", ifname, "dump"])?;
    let mut peers = Vec::new();
    // First line: the interface (private-key, public-key, listen-port, fwmark).
    for line in out.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() < 8 {
            bail!("unexpected `wg show dump` line: {line:?}\n{out}");
        }
        let num = |s: &str| -> Result<u64> {
            s.parse()
                .with_context(|| format!("bad number {s:?} in `wg show dump`: {line:?}"))
        };
        peers.push(WgPeerDump {
            public_key: f[0].to_string(),
            endpoint: f[2].to_string(),
            allowed_ips: f[3].to_string(),
            latest_handshake: num(f[4])?,
            rx_bytes: num(f[5])?,
            tx_bytes: num(f[6])?,
        });
    }
    Ok(peers)
}
