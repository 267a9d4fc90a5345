//! The egress lab: a source site, two egress gateways and a firewalled endpoint
//! (used by `tests/egress.rs` and `isthmus-mesh-bench egress-failover`).
//!
//! Egress gateways toward a firewalled endpoint, with HA.
//!
//! Site 1 is the source (a workload behind a gateway with `[steering]` and an
//! `[[egress]]` policy); sites 2 and 3 are egress gateways, each with an uplink
//! to a "firewalled endpoint" namespace whose nftables accept only the two
//! egress IPs. Checks: a selected workload gets through (seen with an egress
//! IP, never its own address), an unselected one does not; killing the active
//! egress gateway under a steady sequence-numbered stream moves it to the
//! other within the bound; a drained gateway keeps its existing flow and new
//! flows go to the other.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{mesh, netns, IsthmusGateway, KeyPair, Netns, Topology, Underlay};
use anyhow::{bail, Result};

/// The firewalled endpoint (a UDP receiver).
pub const ENDPOINT: &str = "203.0.113.10";
/// Its UDP port.
pub const PORT: u16 = 7000;
/// Egress IP of gateway A (site 2, preferred).
pub const EGRESS_A: &str = "198.51.100.1";
/// Egress IP of gateway B (site 3).
pub const EGRESS_B: &str = "198.51.100.5";
/// Outage bound of a failover (the issue's: under one second).
pub const OUTAGE_BOUND: Duration = Duration::from_secs(1);
/// Stream interval of the failover probe.
pub const TICK: Duration = Duration::from_millis(5);

/// What the endpoint received: (source address, payload).
pub type Log = Arc<Mutex<Vec<(IpAddr, Instant, Vec<u8>)>>>;

/// The running lab; dropping it stops the receiver and removes everything.
pub struct Lab {
    pub topo: Topology,
    pub keys: Vec<KeyPair>,
    pub gateways: Vec<Option<IsthmusGateway>>,
    pub configs: Vec<crate::GatewayConfig>,
    _fw: Netns,
    pub log: Log,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("topo", &self.topo)
            .finish_non_exhaustive()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Lab {
    pub fn start() -> Result<Self> {
        let topo = Topology::new(3, Underlay::V4)?;
        let run = topo.run();
        let keys: Vec<KeyPair> = (0..3).map(|_| KeyPair::generate()).collect::<Result<_>>()?;
        // The firewalled endpoint, with one link to each egress gateway.
        let fw = Netns::new(&run.name("fw"))?;
        fw.ip(&["addr", "add", &format!("{ENDPOINT}/32"), "dev", "lo"])?;
        let mut uplinks = Vec::new();
        for (i, (gw_addr, fw_addr)) in [(EGRESS_A, "198.51.100.2"), (EGRESS_B, "198.51.100.6")]
            .iter()
            .enumerate()
        {
            let site = topo.site(i + 2);
            let up = run.ifname(&format!("e{}", i + 2))?;
            let peer = format!("fw{}", i + 2);
            netns::ip(
                &site.gw_ns,
                &[
                    "link",
                    "add",
                    &up,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &peer,
                    "netns",
                    fw.name(),
                ],
            )?;
            netns::ip(
                &site.gw_ns,
                &["addr", "add", &format!("{gw_addr}/30"), "dev", &up],
            )?;
            netns::ip(&site.gw_ns, &["link", "set", &up, "up"])?;
            netns::ip(
                &site.gw_ns,
                &["route", "add", "203.0.113.0/24", "via", fw_addr],
            )?;
            fw.ip(&["addr", "add", &format!("{fw_addr}/30"), "dev", &peer])?;
            fw.ip(&["link", "set", &peer, "up"])?;
            uplinks.push(up);
        }
        // The partner's firewall: only the egress IPs get in.
        crate::cmd::run_with_stdin(
            "ip",
            &["netns", "exec", fw.name(), "nft", "-f", "-"],
            format!(
                "table inet partner {{ chain input {{ type filter hook input priority 0; policy accept; \
                 udp dport {PORT} ip saddr != {{ {EGRESS_A}, {EGRESS_B} }} counter drop\n }}\n}}\n"
            )
            .as_bytes(),
        )?;
        let log: Log = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (log, stop) = (log.clone(), stop.clone());
            let _ = netns::spawn_in(fw.name(), move || {
                let sock = UdpSocket::bind((ENDPOINT, PORT))?;
                sock.set_read_timeout(Some(Duration::from_millis(50)))?;
                let mut buf = [0u8; 256];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        log.lock().expect("receive log").push((
                            from.ip(),
                            Instant::now(),
                            buf[..n].to_vec(),
                        ));
                    }
                }
                Ok(())
            });
        }
        // A second, unselected address on the source workload.
        let s1 = topo.site(1).clone();
        netns::ip(
            &s1.wl_ns,
            &["addr", "add", "100.64.1.3/24", "dev", &s1.wl_if],
        )?;
        let mut configs = Vec::new();
        for site in topo.sites() {
            let i = site.index;
            let mut c = mesh::isthmus_config(site, mesh::peers_for(&topo, &keys, i));
            c.trailer = match i {
                1 => vec![
                    format!("[steering]\nmode = \"bpf\"\ninterfaces = [\"{}\"]\n", site.lan_if),
                    format!(
                        "[[egress]]\nname = \"partner\"\nsources = [\"100.64.1.2/32\"]\n\
                         destinations = [\"203.0.113.0/24\"]\nprobe_interval_ms = 100\nprobe_multiplier = 3\n\
                         probe_source = \"{}\"\n\
                         gateways = [{{ peer = \"site-2\", probe = \"{}\" }}, {{ peer = \"site-3\", probe = \"{}\" }}]\n",
                        site.gw_lan_addr,
                        topo.site(2).gw_lan_addr,
                        topo.site(3).gw_lan_addr
                    ),
                ],
                _ => vec![format!(
                    "[egress_gateway]\nuplink = \"{}\"\negress_ip = \"{}\"\nsources = [\"100.64.0.0/16\"]\n\
                     destinations = [\"203.0.113.0/24\"]\n",
                    uplinks[i - 2],
                    if i == 2 { EGRESS_A } else { EGRESS_B }
                )],
            };
            configs.push(c);
        }
        let mut gateways = Vec::new();
        for site in topo.sites() {
            let i = site.index;
            gateways.push(Some(IsthmusGateway::start(
                run,
                &site.gw_ns,
                &keys[i - 1],
                &configs[i - 1],
            )?));
        }
        Ok(Self {
            topo,
            keys,
            gateways,
            configs,
            _fw: fw,
            log,
            stop,
        })
    }

    pub fn gw(&self, i: usize) -> &IsthmusGateway {
        self.gateways[i - 1].as_ref().expect("gateway running")
    }

    /// Health of each egress gateway as the source sees it.
    pub fn health(&self) -> Result<Vec<String>> {
        let out = crate::isthmus::isthmusctl(&[
            "status",
            "--socket",
            &self.gw(1).admin_socket.to_string_lossy(),
            "--output",
            "json",
        ])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["egress"][0]["gateways"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|g| g["health"].as_str().unwrap_or("?").to_string())
                    .collect()
            })
            .unwrap_or_default())
    }

    pub fn wait_health(&self, want: &[&str], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.health()?;
            if h == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs: String = self.gateways.iter().flatten().map(|g| g.logs()).collect();
                bail!("egress health {h:?}, wanted {want:?}\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn received(&self, tag: &str) -> Vec<(IpAddr, Instant, Vec<u8>)> {
        self.log
            .lock()
            .expect("receive log")
            .iter()
            .filter(|(_, _, p)| p.starts_with(tag.as_bytes()))
            .cloned()
            .collect()
    }
}

/// Sends `tag:seq` datagrams from the workload (`from`, fixed source port) every
/// `TICK` until `stop`.
pub fn stream(
    ns: &str,
    from: SocketAddr,
    tag: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<u64>> {
    let tag = tag.to_string();
    netns::spawn_in(ns, move || {
        let sock = UdpSocket::bind(from)?;
        let to: SocketAddr = format!("{ENDPOINT}:{PORT}").parse()?;
        let mut seq = 0u64;
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let _ = sock.send_to(format!("{tag}:{seq}").as_bytes(), to);
            seq += 1;
            next += TICK;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        Ok(seq)
    })
}

pub fn send_some(ns: &str, from: &str, tag: &str, n: usize) -> Result<()> {
    let from: SocketAddr = format!("{from}:0").parse()?;
    let tag = tag.to_string();
    netns::run_in(ns, move || {
        let sock = UdpSocket::bind(from)?;
        for i in 0..n {
            let _ = sock.send_to(format!("{tag}:{i}").as_bytes(), (ENDPOINT, PORT));
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    })
}

pub fn seq_of(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload)
        .ok()?
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}

/// The longest run of missing sequence numbers in `received` (payloads
/// `tag:seq`), and the first arrival through `via` after `since`.
pub fn outage(received: &[(IpAddr, Instant, Vec<u8>)]) -> Duration {
    let mut seqs: Vec<u64> = received.iter().filter_map(|(_, _, p)| seq_of(p)).collect();
    seqs.sort_unstable();
    seqs.dedup();
    let longest = seqs.windows(2).map(|w| w[1] - w[0] - 1).max().unwrap_or(0);
    TICK * u32::try_from(longest).unwrap_or(u32::MAX)
}
