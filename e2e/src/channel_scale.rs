//! Many mTLS peer channels against one real gateway: the scale check behind
//! `isthmus-mesh-bench channels` and the `channel_scale` end-to-end test.
//!
//! One `isthmus-gateway` runs in a fresh network namespace with N peers configured by
//! identity (WireGuard links, one /26 of 100.64.0.0/10 each, a channel endpoint on its own
//! loopback address `127.0.x.y`). This process runs the N peer ends with the channel
//! library itself, as tasks on its channel runtime: the peers that [`should_dial`] the
//! gateway dial it from their own address, the others listen on theirs and are dialed.
//! A round reports how long until the gateway's `isthmusctl status` shows every channel up,
//! and the gateway's threads and resident memory before and after.
//!
//! The channel runtime's threads are created on first use and stay in the network
//! namespace of the thread that created them; so everything runs inside the namespace of
//! one [`ChannelScale`], and a process should make only one.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use isthmus_certs::{ClusterCa, IssuedCertificate, MeshRootCa, Validity};
use isthmus_identity::{
    should_dial, ChannelConfig, ChannelEvent, ChannelListener, ClusterName, GatewayName,
    LinkParams, ListenerHandle, MeshTrust, PeerEndpoint, PeerLink, SpiffeId, TrustDomain,
    TunnelParams,
};
use rand_core::{OsRng, RngCore};
use serde::Serialize;

use crate::netns::Netns;
use crate::process::ProcessGuard;
use crate::run::Run;
use crate::{bins, cmd};

/// Threads and resident memory of a process (from `/proc/PID/status`).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct ProcStats {
    /// `Threads:`.
    pub threads: u64,
    /// `VmRSS:` in KiB.
    pub rss_kib: u64,
}

impl ProcStats {
    /// Reads the stats of `pid`.
    pub fn of(pid: u32) -> Result<Self> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok(Self {
            threads: field("Threads:")?,
            rss_kib: field("VmRSS:")?,
        })
    }
}

/// What one round measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// Peer channels configured on the gateway.
    pub peers: usize,
    /// Of which the peer dials the gateway.
    pub dialed_by_peers: usize,
    /// Of which the gateway dials the peer.
    pub dialed_by_gateway: usize,
    /// From starting the gateway to its admin socket answering (includes installing a
    /// route per peer prefix).
    pub gateway_start_secs: f64,
    /// From starting the peer ends until half of the channels were up at the gateway.
    pub half_up_secs: f64,
    /// ... until 90 % were up.
    pub p90_up_secs: f64,
    /// ... until every channel was up.
    pub all_up_secs: f64,
    /// Sessions the gateway counted over all peers once all were up (equal to `peers`
    /// unless some flapped).
    pub sessions: u64,
    /// The gateway with every peer configured and no channel up.
    pub before: ProcStats,
    /// The gateway with every channel up (a few ping intervals later).
    pub after: ProcStats,
}

/// Parameters of one round.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// Peer channels.
    pub peers: usize,
    /// The gateway's channel port (on 127.0.0.1); the peers listen on the same port of
    /// their own addresses.
    pub port: u16,
    /// How long every channel may take to come up.
    pub timeout: Duration,
    /// How long to let the sessions run (pings) before measuring `after`.
    pub settle: Duration,
}

impl ScaleOptions {
    /// `peers` channels on port 7443, 120 s to come up, 6 s to settle.
    pub fn new(peers: usize) -> Self {
        Self {
            peers,
            port: 7443,
            timeout: Duration::from_secs(120),
            settle: Duration::from_secs(6),
        }
    }
}

/// A namespace for rounds of the scale check (needs root).
#[derive(Debug)]
pub struct ChannelScale {
    // Dropped in this order: the namespace (and any process left in it), then the run dir.
    ns: Netns,
    run: Arc<Run>,
}

/// The loopback address of peer `i` (0-based): 127.0.x.y with x, y in 1..=250 (the
/// gateway is on 127.0.0.1).
pub fn peer_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

/// The /26 of 100.64.0.0/10 routed to peer `i`.
pub fn peer_prefix(i: usize) -> String {
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (i as u32) * 64;
    format!("{}/26", Ipv4Addr::from(base))
}

const TRUST_DOMAIN: &str = "bench.isthmus";
const CLUSTER: &str = "bench";
const HUB: &str = "m-hub";

/// Peer names sort around the hub's, so that half of them dial it and it dials the others.
fn peer_name(i: usize, peers: usize) -> String {
    if i < peers.div_ceil(2) {
        format!("a{i:04}")
    } else {
        format!("z{i:04}")
    }
}

struct Pki {
    root: MeshRootCa,
    cluster: ClusterCa,
}

impl Pki {
    fn new() -> Result<Self> {
        let td = TrustDomain::new(TRUST_DOMAIN)?;
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let root = MeshRootCa::create(&td, Validity::new(now - day, now + 30 * day)?)?;
        let cluster = root.issue_cluster_ca(
            &ClusterName::new(CLUSTER)?,
            Validity::new(now - day, now + 20 * day)?,
        )?;
        Ok(Self { root, cluster })
    }

    fn leaf(&self, name: &str) -> Result<IssuedCertificate> {
        Ok(self
            .cluster
            .issue_gateway(&GatewayName::new(name)?, Validity::days(10))?)
    }

    fn trust(&self) -> MeshTrust {
        MeshTrust {
            roots: vec![self.root.certificate().clone()],
            crls: vec![],
        }
    }
}

/// The peer ends run by this process; dropped after the gateway is stopped.
#[derive(Default)]
struct PeerEnds {
    links: Vec<PeerLink>,
    listeners: Vec<ListenerHandle>,
}

impl ChannelScale {
    /// Creates the run and its namespace.
    pub fn new() -> Result<Self> {
        let run = Arc::new(Run::new()?);
        let ns = Netns::new(&run.name("chs"))?;
        Ok(Self { ns, run })
    }

    /// One round with a fresh PKI and gateway.
    pub fn round(&self, opts: &ScaleOptions) -> Result<ScaleReport> {
        anyhow::ensure!(
            (1..=250 * 250).contains(&opts.peers),
            "between 1 and 62500 peers"
        );
        let ns = self.ns.name().to_string();
        let run = self.run.clone();
        let ifname = self.run.ifname(&format!("c{}", opts.port % 1000))?;
        let opts = opts.clone();
        crate::netns::run_in(&ns.clone(), move || round(&ns, &run, &ifname, &opts))
    }
}

fn write_gateway_files(
    dir: &Path,
    ifname: &str,
    pki: &Pki,
    hub: &IssuedCertificate,
    peers: &[SpiffeId],
    port: u16,
) -> Result<PathBuf> {
    let bundle = dir.join(format!("{ifname}-bundle.pem"));
    std::fs::write(&bundle, pki.root.certificate_pem())?;
    let (chain, key) = (
        dir.join(format!("{ifname}-hub.pem")),
        dir.join(format!("{ifname}-hub.key")),
    );
    hub.save(&chain, &key)?;
    let mut text = format!(
        "[interface]\nname = {ifname:?}\nlisten_port = 51820\n\n[identity]\n\
         trust_bundle = {:?}\ncertificate = {:?}\nprivate_key = {:?}\nlisten = \"127.0.0.1:{port}\"\n",
        bundle.to_string_lossy(),
        chain.to_string_lossy(),
        key.to_string_lossy(),
    );
    for (i, id) in peers.iter().enumerate() {
        text += &format!(
            "\n[[peers]]\nname = \"p{i}\"\nkind = \"wireguard\"\nspiffe_id = \"{id}\"\n\
             channel_endpoint = \"{}:{port}\"\nallowed_prefixes = [\"{}\"]\n",
            peer_addr(i),
            peer_prefix(i),
        );
    }
    let path = dir.join(format!("{ifname}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `isthmusctl status --output json` of the gateway.
fn status(socket: &Path) -> Result<serde_json::Value> {
    let sock = socket.to_string_lossy();
    let args = ["status", "--socket", sock.as_ref(), "--output", "json"];
    let out = std::process::Command::new(bins::ctl())
        .args(args)
        .output()?;
    cmd::check("isthmusctl", &args, &out)?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Channels up and sessions established so far, per the gateway.
fn channels_up(status: &serde_json::Value) -> (usize, u64) {
    let channels = status["channels"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let up = channels.iter().filter(|c| c["state"] == "up").count();
    let sessions = channels.iter().filter_map(|c| c["sessions"].as_u64()).sum();
    (up, sessions)
}

fn round(ns: &str, run: &Run, ifname: &str, opts: &ScaleOptions) -> Result<ScaleReport> {
    let n = opts.peers;
    let dir = run.dir();
    let pki = Pki::new()?;
    let td = TrustDomain::new(TRUST_DOMAIN)?;
    let hub_leaf = pki.leaf(HUB)?;
    let hub_id = hub_leaf.id().clone();
    let leaves = (0..n)
        .map(|i| pki.leaf(&peer_name(i, n)))
        .collect::<Result<Vec<_>>>()?;
    let ids: Vec<SpiffeId> = leaves.iter().map(|l| l.id().clone()).collect();
    debug_assert!(ids.iter().all(|id| id.trust_domain() == &td));
    let config = write_gateway_files(dir, ifname, &pki, &hub_leaf, &ids, opts.port)?;
    let socket = PathBuf::from(format!("/var/run/isthmus/{ifname}.sock"));

    let started = Instant::now();
    let mut gateway = ProcessGuard::spawn(
        run,
        &format!("gw-{ifname}"),
        Some(ns),
        &bins::gateway().to_string_lossy(),
        &["--config", &config.to_string_lossy()],
        &[("RUST_LOG", "info")],
    )?;
    while status(&socket).is_err() {
        if !gateway.is_running() || started.elapsed() > Duration::from_secs(120) {
            bail!("the gateway did not come up\n{}", gateway.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let gateway_start_secs = started.elapsed().as_secs_f64();
    let before = ProcStats::of(gateway.pid())?;

    // The peer ends.
    let trust = pki.trust();
    let (events, events_rx) = mpsc::channel();
    let drain = std::thread::spawn(move || {
        let mut refused = 0usize;
        for ev in events_rx {
            if let ChannelEvent::Refused { .. } = ev {
                refused += 1;
            }
        }
        refused
    });
    let hub_addr = SocketAddr::from(([127, 0, 0, 1], opts.port));
    let mut ends = PeerEnds::default();
    let mut dialed_by_peers = 0;
    let t0 = Instant::now();
    for (i, leaf) in leaves.iter().enumerate() {
        let addr = peer_addr(i);
        let mut wg_key = [0u8; 32];
        OsRng.fill_bytes(&mut wg_key);
        let params = TunnelParams {
            wireguard_public_key: Some(wg_key),
            wireguard_endpoint: Some(SocketAddr::from((addr, 51820))),
            esp_endpoint: None,
            esp_inbound_spi: None,
            mtu: 1420,
            wireguard_keys: None,
        };
        let cfg = ChannelConfig::new(leaf.credentials()?, &trust, params)?;
        if should_dial(&ids[i], &hub_id) {
            dialed_by_peers += 1;
            ends.links.push(PeerLink::spawn(
                Arc::new(cfg.with_source_address(addr.into())),
                PeerEndpoint {
                    id: hub_id.clone(),
                    addr: hub_addr,
                    link: LinkParams::Wireguard,
                },
                events.clone(),
            )?);
        } else {
            ends.listeners.push(
                ChannelListener::bind(
                    Arc::new(cfg),
                    SocketAddr::from((addr, opts.port)),
                    vec![(hub_id.clone(), LinkParams::Wireguard)],
                )?
                .spawn(events.clone())?,
            );
        }
    }
    drop(events);

    let (mut half, mut p90) = (None, None);
    let all_up_secs = loop {
        let s = status(&socket)?;
        let (up, _) = channels_up(&s);
        let t = t0.elapsed().as_secs_f64();
        if up * 2 >= n && half.is_none() {
            half = Some(t);
        }
        if up * 10 >= n * 9 && p90.is_none() {
            p90 = Some(t);
        }
        if up == n {
            break t;
        }
        if t0.elapsed() > opts.timeout || !gateway.is_running() {
            bail!(
                "{up} of {n} channels up after {:?}\n{}",
                t0.elapsed(),
                gateway.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(opts.settle);
    let after = ProcStats::of(gateway.pid())?;
    let (up, sessions) = channels_up(&status(&socket)?);
    if up != n {
        bail!(
            "only {up} of {n} channels still up after settling\n{}",
            gateway.logs()
        );
    }
    gateway.stop()?;
    drop(ends);
    let _refused = drain.join();
    Ok(ScaleReport {
        peers: n,
        dialed_by_peers,
        dialed_by_gateway: n - dialed_by_peers,
        gateway_start_secs,
        half_up_secs: half.unwrap_or(all_up_secs),
        p90_up_secs: p90.unwrap_or(all_up_secs),
        all_up_secs,
        sessions,
        before,
        after,
    })
}
