//! Egress gateways toward firewalled endpoints, with HA.
//!
//! **Source side** (`[[egress]]`): the steering program (or the policy-routing
//! fallback) sends the selected workloads' packets to the policy's
//! destinations into the tunnel device; the data path's egress table
//! (`isthmus_tunnel::egress`) picks the egress gateway per flow. A prober per
//! policy sends BFD-like probes ([`probe`]) *through the tunnel* to every
//! gateway of the policy every `probe_interval`; a gateway without a valid reply
//! for `probe_multiplier` intervals is down and its flows move to the next
//! healthy gateway on their next packet. A draining gateway keeps the flows
//! pinned to it and takes no new ones; a gateway whose uplink is down takes
//! none.
//!
//! **Egress gateway side** (`[egress_gateway]`): answers the probes (on the
//! tunnel device only), reports draining (admin command) or uplink-down
//! (optional TCP probes of the firewalled endpoints), and SNATs the allowed
//! inner sources to its egress IP on the uplink (nftables).

pub mod probe;

use crate::config::{EgressConfig, EgressGatewayConfig, EGRESS_PROBE_PORT};
use anyhow::Context as _;
use isthmus_ebpf_redirect::Steering;
use isthmus_tunnel::egress::{EgressPolicy, EgressPolicyConfig, EgressTable};
use isthmus_tunnel::WgCore;
use probe::{GatewayState, Health, Prober, ProberConfig};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Pinned flows idle this long are forgotten.
pub const FLOW_IDLE: Duration = Duration::from_secs(60);

/// One gateway of a policy, for `isthmusctl status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct EgressGatewayView {
    /// Peer name.
    pub peer: String,
    /// `unknown`, `healthy`, `draining`, `uplink-down` or `down`.
    pub health: String,
    /// Takes new flows.
    pub new_flows: bool,
    /// Flows pinned to it.
    pub flows: usize,
    /// Packets sent to it.
    pub packets: u64,
    /// Last probe round trip, milliseconds.
    pub rtt_ms: Option<f64>,
    /// Probes sent / valid replies.
    pub probes_sent: u64,
    pub probe_replies: u64,
}

/// One policy, for `isthmusctl status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct EgressPolicyView {
    pub name: String,
    pub sources: Vec<String>,
    pub destinations: Vec<String>,
    pub gateways: Vec<EgressGatewayView>,
    /// Packets dropped because no gateway was usable.
    pub no_gateway_drops: u64,
}

fn health_name(h: Health) -> &'static str {
    match h {
        Health::Unknown => "unknown",
        Health::Down => "down",
        Health::Up(GatewayState::Healthy) => "healthy",
        Health::Up(GatewayState::Draining) => "draining",
        Health::Up(GatewayState::UplinkDown) => "uplink-down",
    }
}

struct PolicyRuntime {
    cfg: EgressConfig,
    policy: Arc<EgressPolicy>,
    prober: Mutex<Prober>,
}

/// The source side: policies in the data path and their probers. Dropping it
/// stops the probers.
pub struct EgressPolicies {
    runtimes: Vec<Arc<PolicyRuntime>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for EgressPolicies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressPolicies")
            .field("policies", &self.runtimes.len())
            .finish()
    }
}

impl Drop for EgressPolicies {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl EgressPolicies {
    /// Installs the policies in the data path and the steering maps, and
    /// starts one prober per policy. Every gateway starts unknown (no flow is
    /// sent anywhere until a gateway answers).
    pub fn start(
        cfgs: &[EgressConfig],
        wg: &Arc<WgCore>,
        steering: &Steering,
        tunnel: &str,
    ) -> anyhow::Result<Self> {
        let table = EgressTable::new(
            cfgs.iter()
                .map(|c| EgressPolicyConfig {
                    name: c.name.clone(),
                    sources: c.sources.clone(),
                    destinations: c.destinations.clone(),
                    gateways: c.gateways.iter().map(|g| g.public_key).collect(),
                })
                .collect(),
        )
        .context("egress policies")?;
        let policies = table.policies().to_vec();
        wg.set_egress(table);
        let stop = Arc::new(AtomicBool::new(false));
        let mut runtimes = Vec::new();
        let mut threads = Vec::new();
        let now = Instant::now();
        for (i, (cfg, policy)) in cfgs.iter().zip(policies).enumerate() {
            let id = u32::try_from(i + 1).context("too many egress policies")?;
            let prefixes = |v: &[isthmus_tunnel::IpPrefix]| -> Vec<isthmus_ebpf_redirect::Prefix> {
                v.iter().map(|p| (p.addr(), p.len())).collect()
            };
            steering
                .set_egress(id, &prefixes(&cfg.sources), &prefixes(&cfg.destinations))
                .with_context(|| format!("steering egress policy {}", cfg.name))?;
            let socket = probe_socket(cfg.probe_source, tunnel).with_context(|| {
                format!(
                    "egress {}: the probe socket on {} (must be an address of this gateway)",
                    cfg.name, cfg.probe_source
                )
            })?;
            let rt = Arc::new(PolicyRuntime {
                cfg: cfg.clone(),
                policy,
                prober: Mutex::new(Prober::new(
                    ProberConfig {
                        interval: cfg.probe_interval,
                        multiplier: cfg.probe_multiplier,
                    },
                    cfg.gateways.len(),
                    now,
                )),
            });
            runtimes.push(rt.clone());
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("egress-{}", cfg.name))
                    .spawn(move || run_prober(&rt, &socket, &stop))
                    .context("starting an egress prober")?,
            );
            tracing::info!(
                policy = %cfg.name,
                gateways = ?cfg.gateways.iter().map(|g| g.peer.as_str()).collect::<Vec<_>>(),
                interval_ms = cfg.probe_interval.as_millis() as u64,
                multiplier = cfg.probe_multiplier,
                "egress policy"
            );
        }
        Ok(Self {
            runtimes,
            stop,
            threads,
        })
    }

    /// Every policy's gateways, health and counters.
    pub fn status(&self) -> Vec<EgressPolicyView> {
        self.runtimes
            .iter()
            .map(|rt| {
                let prober = rt.prober.lock().unwrap_or_else(|e| e.into_inner());
                let dp = rt.policy.gateways();
                EgressPolicyView {
                    name: rt.cfg.name.clone(),
                    sources: rt.cfg.sources.iter().map(|p| p.to_string()).collect(),
                    destinations: rt.cfg.destinations.iter().map(|p| p.to_string()).collect(),
                    gateways: rt
                        .cfg
                        .gateways
                        .iter()
                        .enumerate()
                        .map(|(i, g)| {
                            let stats = prober.stats(i);
                            let d = dp.get(i);
                            EgressGatewayView {
                                peer: g.peer.clone(),
                                health: health_name(prober.health(i)).into(),
                                new_flows: d.is_some_and(|d| d.new_flows),
                                flows: d.map_or(0, |d| d.flows),
                                packets: d.map_or(0, |d| d.packets),
                                rtt_ms: stats.last_rtt.map(|r| r.as_secs_f64() * 1000.0),
                                probes_sent: stats.sent,
                                probe_replies: stats.replies,
                            }
                        })
                        .collect(),
                    no_gateway_drops: rt.policy.no_gateway_drops(),
                }
            })
            .collect()
    }
}

/// A UDP socket on `source`, bound to the tunnel device: probes leave only
/// through the tunnel, and only replies that came through it (authenticated,
/// inner source checked) are read; a spoofed reply on the underlay is not.
fn probe_socket(source: std::net::IpAddr, tunnel: &str) -> anyhow::Result<UdpSocket> {
    let domain = if source.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.bind_device(Some(tunnel.as_bytes()))?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    Ok(socket.into())
}

fn apply(rt: &PolicyRuntime, t: probe::Transition) {
    let (new, existing) = probe::admission(t.to);
    rt.policy.set_admission(t.index, new, existing);
    let peer = rt
        .cfg
        .gateways
        .get(t.index)
        .map_or("?", |g| g.peer.as_str());
    tracing::info!(
        policy = %rt.cfg.name,
        gateway = peer,
        from = health_name(t.from),
        to = health_name(t.to),
        "egress gateway health changed"
    );
}

/// The prober loop: send due probes, read replies until the next deadline,
/// mark silent gateways down.
fn run_prober(rt: &PolicyRuntime, socket: &UdpSocket, stop: &AtomicBool) {
    let start = Instant::now();
    let mut last_expire = start;
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let (due, deadline) = {
            let mut prober = rt.prober.lock().unwrap_or_else(|e| e.into_inner());
            let micros = u64::try_from(now.duration_since(start).as_micros()).unwrap_or(u64::MAX);
            let due = prober.poll_probes(now, micros);
            for t in prober.on_tick(now) {
                apply(rt, t);
            }
            (due, prober.next_deadline())
        };
        for (index, bytes) in due {
            if let Some(g) = rt.cfg.gateways.get(index) {
                // A send error (no route yet) is a missed probe, nothing more.
                let _ = socket.send_to(&bytes, SocketAddr::new(g.probe, EGRESS_PROBE_PORT));
            }
        }
        // Replies until the next deadline (at most 50 ms per wait, so a stop is quick).
        loop {
            let now = Instant::now();
            if now >= deadline || stop.load(Ordering::Relaxed) {
                break;
            }
            let wait = (deadline - now).clamp(Duration::from_millis(1), Duration::from_millis(50));
            let _ = socket.set_read_timeout(Some(wait));
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let Some(index) = rt
                .cfg
                .gateways
                .iter()
                .position(|g| g.probe == from.ip() && from.port() == EGRESS_PROBE_PORT)
            else {
                continue;
            };
            let mut prober = rt.prober.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = prober.on_datagram(index, &buf[..n], Instant::now()) {
                apply(rt, t);
            }
        }
        let now = Instant::now();
        if now.duration_since(last_expire) >= Duration::from_secs(5) {
            rt.policy.expire(now, FLOW_IDLE);
            last_expire = now;
        }
    }
}

const STATE_HEALTHY: u8 = 0;
const STATE_DRAINING: u8 = 1;

/// This gateway as an egress gateway, for `isthmusctl status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct EgressGatewayStatus {
    /// `healthy`, `draining` or `uplink-down` (what the probes are answered with).
    pub state: String,
    pub uplink: String,
    pub egress_ip: String,
    /// Whether the endpoint probes (if any) succeed.
    pub uplink_ok: bool,
}

/// The egress gateway side. Dropping it stops the responder and removes the
/// SNAT table.
pub struct EgressGateway {
    cfg: EgressGatewayConfig,
    table: String,
    shared: Arc<GatewayShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct GatewayShared {
    admin: AtomicU8,
    uplink_ok: AtomicBool,
    stop: AtomicBool,
}

impl GatewayShared {
    fn state(&self) -> GatewayState {
        if !self.uplink_ok.load(Ordering::Relaxed) {
            GatewayState::UplinkDown
        } else if self.admin.load(Ordering::Relaxed) == STATE_DRAINING {
            GatewayState::Draining
        } else {
            GatewayState::Healthy
        }
    }
}

impl std::fmt::Debug for EgressGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressGateway")
            .field("uplink", &self.cfg.uplink)
            .finish_non_exhaustive()
    }
}

impl Drop for EgressGateway {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = nft(&format!("delete table inet {}\n", self.table));
    }
}

fn nft(script: &str) -> anyhow::Result<()> {
    isthmus_ebpf_redirect::policy::nft(script).map_err(|e| anyhow::anyhow!("{e}"))
}

impl EgressGateway {
    /// Puts the egress IP on the uplink (if it is not an address of this host
    /// yet), installs the SNAT table and starts the probe responder (bound to
    /// the tunnel device) and the endpoint prober.
    pub fn start(cfg: &EgressGatewayConfig, tunnel: &str) -> anyhow::Result<Self> {
        use isthmus_ebpf_redirect::netlink::Netlink;
        let mut nl = Netlink::open().context("netlink")?;
        let uplink = nl
            .link_index(&cfg.uplink)
            .with_context(|| format!("egress_gateway.uplink {}", cfg.uplink))?;
        if UdpSocket::bind(SocketAddr::new(cfg.egress_ip, 0)).is_err() {
            let len = if cfg.egress_ip.is_ipv4() { 32 } else { 128 };
            nl.addr_replace(uplink, cfg.egress_ip, len)
                .with_context(|| {
                    format!("putting the egress IP {} on {}", cfg.egress_ip, cfg.uplink)
                })?;
        }
        let table = format!(
            "isthmus_egress_{}",
            tunnel
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect::<String>()
        );
        let fam = if cfg.egress_ip.is_ipv4() { "ip" } else { "ip6" };
        let same_family = |list: &[isthmus_tunnel::IpPrefix]| -> Vec<String> {
            list.iter()
                .filter(|p| p.is_ipv4() == cfg.egress_ip.is_ipv4())
                .map(|p| p.to_string())
                .collect()
        };
        let (sources, destinations) = (same_family(&cfg.sources), same_family(&cfg.destinations));
        if sources.is_empty() || destinations.is_empty() {
            anyhow::bail!(
                "egress_gateway.sources and egress_gateway.destinations need prefixes of the egress IP's family"
            );
        }
        let _ = nft(&format!("delete table inet {table}\n"));
        // Only tunnel traffic from the allowed sources to the allowed
        // destinations leaves through the uplink, translated to the egress IP;
        // anything else from the tunnel to the uplink is dropped (no open relay),
        // and traffic from elsewhere is never translated to the egress IP.
        nft(&format!(
            "table inet {table} {{\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"{tun}\" oifname \"{uplink}\" {fam} saddr {{ {srcs} }} {fam} daddr {{ {dsts} }} accept\n\
             \t\tiifname \"{tun}\" oifname \"{uplink}\" counter drop\n\
             \t}}\n\
             \tchain post {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tiifname \"{tun}\" oifname \"{uplink}\" {fam} saddr {{ {srcs} }} {fam} daddr {{ {dsts} }} counter snat {fam} to {ip}\n\
             \t}}\n\
             }}\n",
            tun = tunnel,
            uplink = cfg.uplink,
            srcs = sources.join(", "),
            dsts = destinations.join(", "),
            ip = cfg.egress_ip,
        ))
        .context("installing the egress SNAT table")?;
        let shared = Arc::new(GatewayShared {
            admin: AtomicU8::new(STATE_HEALTHY),
            uplink_ok: AtomicBool::new(true),
            stop: AtomicBool::new(false),
        });
        let socket = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .context("probe responder socket")?;
        socket
            .set_only_v6(false)
            .context("probe responder socket")?;
        // Probes come through the tunnel only: the underlay cannot reach it.
        socket
            .bind_device(Some(tunnel.as_bytes()))
            .with_context(|| format!("binding the probe responder to {tunnel}"))?;
        socket
            .bind(&SocketAddr::from(([0u16; 8], EGRESS_PROBE_PORT)).into())
            .with_context(|| {
                format!("binding the probe responder to UDP port {EGRESS_PROBE_PORT}")
            })?;
        let socket: UdpSocket = socket.into();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .context("probe responder socket")?;
        let mut threads = Vec::new();
        {
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("egress-responder".into())
                    .spawn(move || {
                        let mut buf = [0u8; 64];
                        while !shared.stop.load(Ordering::Relaxed) {
                            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                                continue;
                            };
                            if let Some(reply) = probe::answer(&buf[..n], shared.state()) {
                                let _ = socket.send_to(&reply, from);
                            }
                        }
                    })
                    .context("starting the probe responder")?,
            );
        }
        if !cfg.endpoint_probes.is_empty() {
            let (shared, probes, interval, from) = (
                shared.clone(),
                cfg.endpoint_probes.clone(),
                cfg.endpoint_probe_interval,
                cfg.egress_ip,
            );
            threads.push(
                std::thread::Builder::new()
                    .name("egress-uplink".into())
                    .spawn(move || run_endpoint_probes(&shared, &probes, interval, from))
                    .context("starting the endpoint prober")?,
            );
        }
        tracing::info!(uplink = %cfg.uplink, egress_ip = %cfg.egress_ip, "egress gateway");
        Ok(Self {
            cfg: cfg.clone(),
            table,
            shared,
            threads,
        })
    }

    /// Drain (`true`): keep existing flows, take no new ones; or resume.
    pub fn set_draining(&self, draining: bool) {
        self.shared.admin.store(
            if draining {
                STATE_DRAINING
            } else {
                STATE_HEALTHY
            },
            Ordering::Relaxed,
        );
        tracing::info!(draining, "egress gateway admin state");
    }

    pub fn status(&self) -> EgressGatewayStatus {
        EgressGatewayStatus {
            state: health_name(Health::Up(self.shared.state())).into(),
            uplink: self.cfg.uplink.clone(),
            egress_ip: self.cfg.egress_ip.to_string(),
            uplink_ok: self.shared.uplink_ok.load(Ordering::Relaxed),
        }
    }
}

/// Consecutive rounds with every endpoint probe failing before the uplink
/// counts as down.
const UPLINK_FAILURES: u32 = 3;

/// A TCP connection attempt to `to` from the egress IP (the path the
/// translated traffic takes, through a firewall that admits only that IP).
fn endpoint_reachable(from: std::net::IpAddr, to: &SocketAddr, timeout: Duration) -> bool {
    let domain = if to.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let Ok(socket) =
        socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
    else {
        return false;
    };
    socket.bind(&SocketAddr::new(from, 0).into()).is_ok()
        && socket.connect_timeout(&(*to).into(), timeout).is_ok()
}

fn run_endpoint_probes(
    shared: &GatewayShared,
    probes: &[SocketAddr],
    interval: Duration,
    from: std::net::IpAddr,
) {
    let timeout = interval.min(Duration::from_secs(1));
    let mut failures = 0u32;
    while !shared.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let ok = probes.iter().any(|p| endpoint_reachable(from, p, timeout));
        failures = if ok { 0 } else { failures.saturating_add(1) };
        let up = failures < UPLINK_FAILURES;
        if shared.uplink_ok.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("endpoint probes succeed again: taking egress flows");
            } else {
                tracing::warn!("every endpoint probe failed {UPLINK_FAILURES} times: reporting the uplink down");
            }
        }
        let spent = started.elapsed();
        let mut left = interval.saturating_sub(spent);
        while !left.is_zero() && !shared.stop.load(Ordering::Relaxed) {
            let step = left.min(Duration::from_millis(100));
            std::thread::sleep(step);
            left -= step;
        }
    }
}
