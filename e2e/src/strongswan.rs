//! A real strongSwan charon (Debian's 5.9, kernel-libipsec: ESP in userspace over a TUN
//! device) in a gateway namespace, as an IKEv2 interop peer.
//!
//! charon's pid file path is compiled in, so each instance runs in a private mount
//! namespace with the run dir's own directory mounted over `/run`; its configuration,
//! VICI socket and log are in the run dir too. The log is written with `ike = 4` and
//! `chd = 4`, which print the IKE and CHILD_SA keys: test keys only, in the run dir,
//! which lets a test compare them with what Isthmus derived.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use isthmus_ike::sa::{ChildSa, Config, Event, Initiator, Prefix};
use isthmus_ike::wire::Identification;

use crate::esp::SaFile;
use crate::isthmus::{EspPeerConfig, EspSettings, IsthmusGateway};
use crate::keys::KeyPair;
use crate::process::ProcessGuard;
use crate::run::Run;
use crate::topology::{Site, Topology};

/// The charon binary of Debian's strongswan-charon.
pub const CHARON: &str = "/usr/lib/ipsec/charon";

/// A running charon.
#[derive(Debug)]
pub struct Charon {
    dir: PathBuf,
    process: ProcessGuard,
}

/// Whether strongSwan is installed (scripts/setup.sh installs it).
pub fn available() -> bool {
    Path::new(CHARON).exists()
}

impl Charon {
    /// Starts charon in `ns` with `strongswan_extra` added to its `charon { }` section and
    /// loads `swanctl_conf` (the text of a swanctl.conf).
    pub fn start(
        run: &Run,
        ns: &str,
        label: &str,
        strongswan_extra: &str,
        swanctl_conf: &str,
    ) -> Result<Self> {
        Self::start_logging(run, ns, label, strongswan_extra, swanctl_conf, 4)
    }

    /// [`Charon::start`] with the IKE and CHILD_SA log level `level` (4 prints keys; 1 is
    /// charon's default, for benchmarks).
    pub fn start_logging(
        run: &Run,
        ns: &str,
        label: &str,
        strongswan_extra: &str,
        swanctl_conf: &str,
        level: u8,
    ) -> Result<Self> {
        Self::start_with_files(run, ns, label, strongswan_extra, swanctl_conf, level, &[])
    }

    /// [`Charon::start_logging`] with `files` (paths relative to the configuration
    /// directory, e.g. `swanctl/x509/me.pem`, and their contents) written before the
    /// configuration is loaded.
    pub fn start_with_files(
        run: &Run,
        ns: &str,
        label: &str,
        strongswan_extra: &str,
        swanctl_conf: &str,
        level: u8,
        files: &[(&str, Vec<u8>)],
    ) -> Result<Self> {
        if !available() {
            bail!("{CHARON} is missing: run scripts/setup.sh (strongswan-charon)");
        }
        let dir = run.path(&format!("charon-{label}"));
        for sub in ["run", "swanctl/x509", "swanctl/x509ca", "swanctl/private"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let d = dir.display();
        std::fs::write(
            dir.join("strongswan.conf"),
            format!(
                "charon {{\n  load_modular = no\n  load = random nonce aes gcm openssl curve25519 \
                 sha1 sha2 hmac kdf pem pkcs1 pkcs8 pubkey x509 constraints kernel-libipsec \
                 kernel-netlink socket-default vici\n  install_routes = yes\n  \
                 plugins {{ vici {{ socket = unix://{d}/charon.vici }} }}\n  \
                 filelog {{ test {{ path = {d}/charon.log\n time_format = %T\n time_add_ms = yes\n \
                 flush_line = yes\n default = 1\n ike = {level}\n chd = {level}\n cfg = 2 }} }}\n  \
                 syslog {{ daemon {{ default = -1 }} }}\n  {strongswan_extra}\n}}\n\
                 swanctl {{\n  load = pem pkcs1 pkcs8 x509 pubkey openssl random\n  \
                 socket = unix://{d}/charon.vici\n}}\n"
            ),
        )?;
        std::fs::write(dir.join("swanctl/swanctl.conf"), swanctl_conf)?;
        for (path, contents) in files {
            use std::os::unix::fs::PermissionsExt as _;
            let path = dir.join(path);
            std::fs::write(&path, contents)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        let script = format!(
            "mount --bind {d}/run /run && STRONGSWAN_CONF={d}/strongswan.conf exec {CHARON}"
        );
        let process = ProcessGuard::spawn(
            run,
            &format!("charon-{label}"),
            Some(ns),
            "unshare",
            &["-m", "--propagation", "private", "sh", "-c", &script],
            &[],
        )?;
        let charon = Self { dir, process };
        let deadline = Instant::now() + Duration::from_secs(10);
        while charon.swanctl(&["--stats"]).is_err() {
            if Instant::now() > deadline {
                bail!("charon did not open its VICI socket:\n{}", charon.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let conf = charon.dir.join("swanctl/swanctl.conf");
        charon
            .swanctl(&["--load-all", "--file", &conf.to_string_lossy()])
            .context("swanctl --load-all")?;
        Ok(charon)
    }

    /// The configuration directory (`swanctl/x509`, `x509ca`, `private` for credentials).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `swanctl ARGS` against this charon; its output, or an error with it.
    pub fn swanctl(&self, args: &[&str]) -> Result<String> {
        let vici = format!("unix://{}/charon.vici", self.dir.display());
        let out = std::process::Command::new("swanctl")
            .args(args)
            .args(["-u", &vici])
            .env("STRONGSWAN_CONF", self.dir.join("strongswan.conf"))
            .output()
            .context("running swanctl")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("swanctl {args:?} failed: {text}");
        }
        Ok(text)
    }

    /// charon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("charon.log")).unwrap_or_default()
    }

    /// Every value charon logged under `label` (its `%B` dumps: `label => N bytes @ …`
    /// followed by hex rows), in order.
    pub fn logged(&self, label: &str) -> Vec<Vec<u8>> {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let mut out = Vec::new();
        let marker = format!("] {label} => ");
        for (i, line) in lines.iter().enumerate() {
            let Some(at) = line.find(&marker) else {
                continue;
            };
            let Some(n) = line[at + marker.len()..]
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            let mut bytes = Vec::with_capacity(n);
            for row in &lines[i + 1..] {
                if bytes.len() >= n {
                    break;
                }
                // "... <lab|1>    0: AB CD ...  ascii"
                let Some(colon) = row.find(": ") else { break };
                let hex: String = row[colon + 2..]
                    .split_whitespace()
                    .take_while(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
                    .collect();
                let Ok(chunk) = hex_decode(&hex) else { break };
                if chunk.is_empty() {
                    break;
                }
                bytes.extend(chunk);
            }
            bytes.truncate(n);
            out.push(bytes);
        }
        out
    }

    /// Kills charon at once (SIGKILL): a peer that vanishes without a word.
    pub fn kill(&mut self) {
        self.process.signal(libc::SIGKILL);
    }

    /// Whether charon is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

fn hex_decode(s: &str) -> Result<Vec<u8>> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).context("hex"))
        .collect()
}

/// A pre-shared-key connection `lab` of charon at site `local` toward site `remote` of a
/// two-site topology: identities `gw<i>.test`, a tunnel between the two workload prefixes
/// with AES-256-GCM (IKE: Curve25519; ESP: no ESN), UDP encapsulation forced on port 4500
/// at both ends, no DPD.
pub fn psk_conf(local: &Site, remote: &Site, psk: &str) -> String {
    format!(
        "connections {{\n  lab {{\n    version = 2\n    local_addrs = {la}\n    \
         remote_addrs = {ra}\n    local_port = 4500\n    remote_port = 4500\n    \
         proposals = aes256gcm16-prfsha256-x25519\n    encap = yes\n    mobike = no\n    \
         dpd_delay = 0s\n    \
         local {{\n      auth = psk\n      id = gw{li}.test\n    }}\n    \
         remote {{\n      auth = psk\n      id = gw{ri}.test\n    }}\n    \
         children {{\n      net {{\n        mode = tunnel\n        \
         local_ts = {lp}\n        remote_ts = {rp}\n        esp_proposals = aes256gcm16\n      \
         }}\n    }}\n  }}\n}}\n\
         secrets {{\n  ike-lab {{\n    id-1 = gw{li}.test\n    id-2 = gw{ri}.test\n    \
         secret = \"{psk}\"\n  }}\n}}\n",
        la = local.underlay_addr,
        ra = remote.underlay_addr,
        li = local.index,
        ri = remote.index,
        lp = local.workload_prefix,
        rp = remote.workload_prefix,
    )
}

fn prefix_of(text: &str) -> Result<Prefix> {
    let (addr, len) = text.split_once('/').context("a prefix")?;
    Ok(Prefix {
        addr: addr.parse()?,
        len: len.parse()?,
    })
}

/// The IKE configuration of Isthmus's initiator at site `local` toward site `remote` as
/// [`psk_conf`] configures charon there: identities `gw<i>.test`, Curve25519,
/// AES-256-GCM, no ESN, no DPD, port 4500 both ends.
fn psk_config(local: &Site, remote: &Site, psk: &str) -> Result<Config> {
    let id = |site: &Site| Identification {
        id_type: 2,
        data: format!("gw{}.test", site.index).into_bytes(),
    };
    Ok(Config {
        local_id: id(local),
        remote_id: id(remote),
        psk: psk.as_bytes().to_vec().into(),
        certificates: None,
        groups: vec![31],
        key_bits: vec![256],
        local_prefixes: vec![prefix_of(&local.workload_prefix)?],
        remote_prefixes: vec![prefix_of(&remote.workload_prefix)?],
        local: local.endpoint(4500),
        remote: remote.endpoint(4500),
        esn: false,
        dpd: None,
    })
}

/// Waits until the gateway's (only) IKE peer satisfies `want`; the last status seen
/// otherwise.
pub fn wait_ike(
    gw: &IsthmusGateway,
    want: impl Fn(&crate::IkeStatus) -> bool,
    timeout: Duration,
) -> Result<crate::IkeStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = gw.status()?.ike.into_iter().next();
        if let Some(k) = last.as_ref().filter(|k| want(k)) {
            return Ok(k.clone());
        }
        if Instant::now() > deadline {
            bail!("IKE status never as wanted: {last:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `count` sequence-numbered datagrams (200 bytes, `rate` a second) from site
/// `from`'s workload to site `to`'s on `port`, in a thread.
pub fn udp_flow(
    from: &Site,
    to: &Site,
    port: u16,
    count: u32,
    rate: u32,
) -> std::thread::JoinHandle<Result<crate::traffic::SequenceReport>> {
    let (src, dst) = (from.wl_ns.clone(), to.wl_ns.clone());
    let addr = std::net::SocketAddr::new(std::net::IpAddr::V4(to.workload_addr), port);
    std::thread::spawn(move || crate::traffic::udp_sequence(&src, &dst, addr, count, 200, rate))
}

/// Brings up an IKE SA and its CHILD_SA from site `local` (Isthmus's initiator, on the
/// gateway's port 4500) to charon at site `remote` configured with [`psk_conf`]; the
/// socket is closed when this returns.
pub fn negotiate_child(local: &Site, remote: &Site, psk: &str) -> Result<ChildSa> {
    let config = psk_config(local, remote, psk)?;
    let to = remote.endpoint(4500);
    let from = local.endpoint(4500);
    crate::netns::run_in(&local.gw_ns, move || {
        let socket = UdpSocket::bind(from).context("binding 4500")?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let send = |bytes: &[u8]| -> Result<()> {
            let mut d = vec![0u8; 4];
            d.extend_from_slice(bytes);
            socket.send_to(&d, to).context("send")?;
            Ok(())
        };
        let (mut initiator, first) = Initiator::start(config, Instant::now())?;
        send(&first)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 65536];
        while Instant::now() < deadline {
            let events = match socket.recv_from(&mut buf) {
                Ok((n, _)) if n > 4 && buf[..4] == [0, 0, 0, 0] => {
                    initiator.handle(&buf[4..n], Instant::now())?
                }
                Ok(_) => continue,
                Err(_) => initiator.on_timer(Instant::now())?,
            };
            for event in events {
                match event {
                    Event::Send(bytes) => send(&bytes)?,
                    Event::Established(child) => return Ok(child),
                    Event::ChildRekeyed(_) | Event::ChildDeleted(_) => {}
                    Event::Closed(why) => bail!("the IKE SA closed: {why}"),
                }
            }
        }
        bail!("no CHILD_SA within 10 s")
    })
}

/// Writes `child` as a manual-keying SA file (mode 0600) in the run dir.
pub fn write_sa_file(run: &Run, name: &str, child: &ChildSa) -> Result<SaFile> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let cipher = match child.outbound_key.len() {
        20 => "aes128-gcm",
        36 => "aes256-gcm",
        n => bail!("a key of {n} bytes"),
    };
    let hex = |b: &[u8]| -> String { b.iter().map(|x| format!("{x:02x}")).collect() };
    let path = run.path(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    write!(
        file,
        "cipher = \"{cipher}\"\noutbound_spi = {}\noutbound_key = \"{}\"\n\
         inbound_spi = {}\ninbound_key = \"{}\"\n",
        child.outbound_spi,
        hex(&child.outbound_key),
        child.inbound_spi,
        hex(&child.inbound_key)
    )?;
    SaFile::read(&path)
}

/// Waits until the workloads of sites 1 and 2 ping each other.
fn connected(topo: &Topology, logs: &dyn Fn() -> String) -> Result<()> {
    for (from, to) in [(1, 2), (2, 1)] {
        let dst = topo.site(to).workload_addr.into();
        if !crate::traffic::wait_for_ping(&topo.site(from).wl_ns, dst, Duration::from_secs(10)) {
            bail!("workload {from} cannot ping workload {to}\n{}", logs());
        }
    }
    Ok(())
}

/// Site 1: an Isthmus gateway running IKEv2 itself (`[peers.esp.ike]`, initiator) with
/// site 2's charon (kernel-libipsec); site 2: that charon. Returns once the workloads ping
/// each other.
pub fn isthmus_with_charon(topo: &Topology) -> Result<(Charon, IsthmusGateway)> {
    let (a, b) = (topo.site(1), topo.site(2));
    let psk = "bench-psk-0b5e7d2c4a6f8e1d3c5b7a9f";
    let charon = Charon::start(topo.run(), &b.gw_ns, "g2", "", &psk_conf(b, a, psk))?;
    let gateway = ike_gateway(topo, a, b, "initiator", psk, 30)?;
    connected(topo, &|| format!("{}\n{}", gateway.logs(), charon.log()))?;
    Ok((charon, gateway))
}

/// A charon at each of sites 1 and 2, the first initiating: strongSwan with itself.
/// Returns once the workloads ping each other.
pub fn charon_pair(topo: &Topology) -> Result<(Charon, Charon)> {
    let (a, b) = (topo.site(1), topo.site(2));
    let psk = "bench-psk-0b5e7d2c4a6f8e1d3c5b7a9f";
    let responder = Charon::start(topo.run(), &b.gw_ns, "g2", "", &psk_conf(b, a, psk))?;
    let initiator = Charon::start(topo.run(), &a.gw_ns, "g1", "", &psk_conf(a, b, psk))?;
    initiator.swanctl(&["--initiate", "--child", "net", "--timeout", "10"])?;
    connected(topo, &|| {
        format!("{}\n{}", initiator.log(), responder.log())
    })?;
    Ok((initiator, responder))
}

/// Writes `psk` as a pre-shared-key file (mode 0600) in the run dir (again, for a
/// restarted gateway).
pub fn write_psk(run: &Run, name: &str, psk: &str) -> Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = run.path(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{psk}")?;
    Ok(path)
}

/// Site `local`'s gateway's `[[peers]]` entry for site `remote`, keyed by the gateway's own
/// IKEv2 (`[peers.esp.ike]`) in `role`, identities `gw<i>.test` as in [`psk_conf`], liveness
/// checks every `dpd_seconds`.
pub fn ike_peer(
    local: &Site,
    remote: &Site,
    role: &str,
    psk_file: &Path,
    dpd_seconds: u64,
) -> EspPeerConfig {
    EspPeerConfig {
        name: Some(format!("site-{}", remote.index)),
        endpoint: Some(remote.endpoint(4500).to_string()),
        allowed_prefixes: vec![remote.workload_prefix.clone()],
        esp_extra: vec![
            "[peers.esp.ike]".into(),
            format!("role = \"{role}\""),
            format!(
                "psk_file = {}",
                crate::isthmus::toml_str(&psk_file.to_string_lossy())
            ),
            format!("local_id = \"gw{}.test\"", local.index),
            format!("remote_id = \"gw{}.test\"", remote.index),
            format!("local_prefixes = [\"{}\"]", local.workload_prefix),
            format!("dpd_seconds = {dpd_seconds}"),
        ],
        ..EspPeerConfig::default()
    }
}

/// Starts site `local`'s Isthmus gateway with one IKE peer, site `remote` ([`ike_peer`]).
pub fn ike_gateway(
    topo: &Topology,
    local: &Site,
    remote: &Site,
    role: &str,
    psk: &str,
    dpd_seconds: u64,
) -> Result<IsthmusGateway> {
    ike_gateway_with(topo, local, remote, role, psk, dpd_seconds, &[])
}

/// [`ike_gateway`] with `extra` lines in `[peers.esp.ike]` (e.g. `rekey_seconds = 2`).
pub fn ike_gateway_with(
    topo: &Topology,
    local: &Site,
    remote: &Site,
    role: &str,
    psk: &str,
    dpd_seconds: u64,
    extra: &[&str],
) -> Result<IsthmusGateway> {
    let psk_file = write_psk(topo.run(), &format!("gw{}-ike.psk", local.index), psk)?;
    let mut peer = ike_peer(local, remote, role, &psk_file, dpd_seconds);
    peer.esp_extra.extend(extra.iter().map(|l| l.to_string()));
    let esp = EspSettings {
        listen_port: Some(4500),
        peers: vec![peer],
    };
    IsthmusGateway::start_with_esp(
        topo.run(),
        &local.gw_ns,
        &KeyPair::generate()?,
        &crate::mesh::isthmus_config(local, Vec::new()),
        &esp,
    )
}

/// Brings up one IKE SA and its CHILD_SA with Isthmus's initiator over `socket` (bound to
/// site `local`'s port 4500) toward site `remote`, identities and prefixes as in
/// [`psk_conf`]; returns how long it took.
pub fn setup_once(
    socket: &UdpSocket,
    local: &Site,
    remote: &Site,
    psk: &str,
    timeout: Duration,
) -> Result<Duration> {
    let config = psk_config(local, remote, psk)?;
    let to = remote.endpoint(4500);
    let send = |bytes: &[u8]| -> Result<()> {
        let mut d = vec![0u8; 4];
        d.extend_from_slice(bytes);
        socket.send_to(&d, to).context("send")?;
        Ok(())
    };
    let start = Instant::now();
    let (mut initiator, first) = Initiator::start(config, start)?;
    send(&first)?;
    let mut buf = [0u8; 65536];
    while start.elapsed() < timeout {
        let events = match socket.recv_from(&mut buf) {
            Ok((n, from)) if from == to && n > 4 && buf[..4] == [0, 0, 0, 0] => {
                match initiator.handle(&buf[4..n], Instant::now()) {
                    Ok(events) => events,
                    // Another IKE SA's message (a delete of an earlier one): not ours.
                    Err(_) if !initiator.is_closed() => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(_) => continue,
            Err(_) => initiator.on_timer(Instant::now())?,
        };
        for event in events {
            match event {
                Event::Send(bytes) => send(&bytes)?,
                Event::Established(_) => return Ok(start.elapsed()),
                Event::ChildRekeyed(_) | Event::ChildDeleted(_) => {}
                Event::Closed(why) => bail!("the IKE SA closed: {why}"),
            }
        }
    }
    bail!("no CHILD_SA within {timeout:?}")
}
