//! `isthmus-gateway`: the Isthmus gateway daemon.
//!
//! Reads and validates its config file (exit 64, one line naming the field,
//! before any socket or device exists), creates the TUN device and UDP
//! sockets, installs routes for the peers' prefixes, serves the WireGuard
//! UAPI and the admin socket, and on SIGTERM/SIGINT removes its sockets and
//! device and exits 0.

use anyhow::Context as _;
use clap::Parser;
use isthmus_ebpf_redirect::netlink::{Netlink, Route, RouteKind};
use isthmus_ebpf_redirect::policy::RTPROT_ISTHMUS;
use isthmus_ebpf_redirect::Steering;
use isthmus_gateway::admin::{self, AdminServer, PeerStatus, Status};
use isthmus_gateway::clustermesh::{MeshWatch, RouteSink};
use isthmus_gateway::config::{self, GatewayConfig, TunnelKind};
use isthmus_gateway::egress::{EgressGateway, EgressPolicies};
use isthmus_gateway::ipsec::IkeService;
use isthmus_gateway::mesh::MeshLinks;
use isthmus_gateway::node::{NodeRouting, NodeWatch};
use isthmus_gateway::rules;
use isthmus_gateway::uapi::{
    SetRequest, UapiDevice, UapiError, UapiPeer, UapiServer, UapiSnapshot,
};
use isthmus_identity::TunnelParams;
use isthmus_tunnel::driver::{Driver, DriverConfig};
use isthmus_tunnel::esp::EspCore;
use isthmus_tunnel::{IpPrefix, WgCore};
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// BSD sysexits EX_USAGE: the configuration or command line is wrong.
const EX_USAGE: u8 = 64;

/// The Isthmus gateway: a userspace WireGuard tunnel endpoint for a mesh of
/// clusters.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Path of the TOML configuration file.
    #[arg(short, long, value_name = "FILE")]
    config: std::path::PathBuf,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info", value_name = "FILTER")]
    log: String,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let cfg = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("isthmus-gateway: config error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isthmus-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: GatewayConfig) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;

    let iface = &cfg.interface;
    let core = Arc::new(WgCore::new(iface.private_key.clone(), cfg.peers.clone())?);
    let wants_esp = !cfg.esp_peers.is_empty()
        || !cfg.ike_peers.is_empty()
        || cfg.identity_peers.iter().any(|p| p.kind == TunnelKind::Esp)
        || cfg
            .node
            .as_ref()
            .is_some_and(|n| n.nodes.iter().any(|p| p.kind == TunnelKind::Esp))
        || cfg
            .mesh
            .as_ref()
            .is_some_and(|m| m.kinds.contains(&TunnelKind::Esp));
    let esp = if wants_esp {
        Some(Arc::new(EspCore::new(
            cfg.esp_peers.clone(),
            Instant::now(),
        )?))
    } else {
        None
    };
    // Manual SAs are good for one run: mark each SA file as used before
    // the first packet, so a restart with the same keys is refused.
    for path in &cfg.sa_files {
        let marker = config::sa_in_use_marker(path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&marker)
            .with_context(|| {
                format!("marking {} as used ({})", path.display(), marker.display())
            })?;
    }
    let driver = Driver::start(
        core.clone(),
        esp.clone(),
        &DriverConfig {
            ifname: iface.name.clone(),
            mtu: iface.mtu,
            listen_port: iface.listen_port,
            esp_listen_port: iface.esp_listen_port,
            offload: iface.offload,
        },
    )?;
    configure_device(&cfg)?;
    let ike = match (&esp, driver.control_sender(), driver.esp_listen_port()) {
        (Some(esp), Some(sender), Some(port)) if !cfg.ike_peers.is_empty() => Some(
            IkeService::start(esp.clone(), sender, cfg.ike_peers.clone(), port)
                .context("starting IKE")?,
        ),
        _ => None,
    };
    let steering = start_steering(&cfg)?;
    let egress = match &steering {
        Some(st) if !cfg.egress.is_empty() => Some(
            EgressPolicies::start(&cfg.egress, &core, st, &iface.name)
                .context("starting the egress policies")?,
        ),
        _ => None,
    };
    let egress_gateway = match &cfg.egress_gateway {
        Some(eg) => Some(Arc::new(
            EgressGateway::start(eg, &iface.name).context("starting [egress_gateway]")?,
        )),
        None => None,
    };

    let mesh = match &cfg.identity {
        Some(identity)
            if !cfg.identity_peers.is_empty() || cfg.mesh.is_some() || cfg.node.is_some() =>
        {
            let advertise = identity
                .advertise_address
                .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
            let params = TunnelParams {
                wireguard_public_key: Some(core.public_key().0),
                wireguard_endpoint: Some(std::net::SocketAddr::new(
                    advertise,
                    driver.listen_port(),
                )),
                esp_endpoint: driver
                    .esp_listen_port()
                    .map(|port| std::net::SocketAddr::new(advertise, port)),
                esp_inbound_spi: None,
                mtu: iface.mtu,
                wireguard_keys: None,
            };
            Some(
                MeshLinks::start(
                    core.clone(),
                    esp.clone(),
                    cfg.identity_peers.clone(),
                    identity,
                    params,
                    cfg.mesh
                        .as_ref()
                        .map_or(DEFAULT_KEEP_TUNNEL, |m| m.withdraw_after),
                )
                .context("starting the mTLS peer channel")
                .inspect(|m| m.set_key_file(iface.private_key_file.clone()))?,
            )
        }
        _ => None,
    };

    let device = Arc::new(GatewayDevice {
        egress,
        egress_gateway: egress_gateway.clone(),
        watch: std::sync::OnceLock::new(),
        node: std::sync::OnceLock::new(),
        steering: steering.clone(),
        core,
        esp,
        ike,
        mesh,
        esp_listen_port: driver.esp_listen_port(),
        name: iface.name.clone(),
        listen_port: driver.listen_port(),
        mtu: iface.mtu,
        offload: driver.offload(),
    });
    let uapi = if iface.uapi {
        Some(UapiServer::bind(&iface.name, device.clone()).context("serving the WireGuard UAPI")?)
    } else {
        None
    };
    let watch = match (&cfg.mesh, &cfg.identity, &device.mesh) {
        (Some(mesh_cfg), Some(identity), Some(links)) => Some(Arc::new(
            MeshWatch::start(
                mesh_cfg.clone(),
                identity,
                links.clone(),
                Arc::new(MeshRoutes {
                    dev: iface.name.clone(),
                    mtu: iface.mtu,
                    steering: steering.clone(),
                }),
            )
            .context("starting the clustermesh watch")?,
        )),
        _ => None,
    };
    if let Some(w) = &watch {
        let _ = device.watch.set(w.clone());
    }
    let node_watch = match (&cfg.node, &cfg.identity, &device.mesh, &steering) {
        (Some(node_cfg), Some(identity), Some(links), Some(steering)) => {
            let own = config::own_id(identity).map_err(|e| anyhow::anyhow!("{e}"))?;
            Some(Arc::new(
                NodeWatch::start(
                    node_cfg.clone(),
                    own,
                    links.clone(),
                    NodeRouting {
                        dev: iface.name.clone(),
                        mtu: iface.mtu,
                        table: node_cfg.table,
                        priority: node_cfg.rule_priority,
                        pod_prefixes: node_cfg.pod_prefixes.clone(),
                        cluster_prefixes: node_cfg.cluster_prefixes.clone(),
                        strict: node_cfg.strict,
                        steering: Some(steering.clone()),
                    },
                    steering.clone(),
                )
                .context("starting node mode")?,
            ))
        }
        _ => None,
    };
    if let Some(n) = &node_watch {
        let _ = device.node.set(n.clone());
    }
    let status_device = device.clone();
    let admin_watch = watch.clone();
    let admin_egress = egress_gateway.clone();
    let handler: Arc<admin::Handler> = Arc::new(move |command: &str| {
        let json = |r: Result<String, serde_json::Error>| {
            r.unwrap_or_else(|e| format!("error: cannot encode: {e}"))
        };
        match command {
                "status" => Some(json(serde_json::to_string_pretty(&status_device.status()))),
                "egress-drain" | "egress-resume" => Some(match &admin_egress {
                    Some(e) => {
                        e.set_draining(command == "egress-drain");
                        json(serde_json::to_string_pretty(&e.status()))
                    }
                    None => "error: no [egress_gateway] in this gateway's config".into(),
                }),
                "keys-rotate" => Some(match &status_device.mesh {
                    Some(mesh) => match mesh.rotate_wireguard_key() {
                        Ok(r) => json(serde_json::to_string_pretty(&r)),
                        Err(e) => format!("error: {e}"),
                    },
                    None => "error: rotating the WireGuard key needs peers configured by identity (an [identity] section and spiffe_id peers): static peers cannot learn a new key".into(),
                }),
                _ if command.starts_with("sa-rotate ") => {
                    let selector = command["sa-rotate ".len()..].trim();
                    Some(
                        match admin::rotate_sas(status_device.esp.as_deref(), selector) {
                            Ok(r) => json(serde_json::to_string_pretty(&r)),
                            Err(e) => format!("error: {e}"),
                        },
                    )
                }
                "mesh-clusters" => Some(match &admin_watch {
                    Some(w) => json(serde_json::to_string_pretty(&w.clusters())),
                    None => "error: no [mesh] in this gateway's config".into(),
                }),
                "mesh-services" => Some(match &admin_watch {
                    Some(w) => json(serde_json::to_string_pretty(&w.services())),
                    None => "error: no [mesh] in this gateway's config".into(),
                }),
                _ => None,
            }
    });
    let admin = AdminServer::bind_with(&iface.admin_socket, handler.clone())
        .with_context(|| format!("serving the admin socket {}", iface.admin_socket.display()))?;
    // Serves until the process exits.
    let _remote_admin = match (&cfg.remote_admin, &cfg.identity) {
        (Some(ra), Some(identity)) => {
            let config = match &device.mesh {
                Some(mesh) => mesh.channel_config(),
                None => isthmus_gateway::reload::reloaded(
                    identity,
                    Arc::new(
                        isthmus_identity::ChannelConfig::new(
                            isthmus_identity::LocalCredentials {
                                chain: identity.credentials.chain.clone(),
                                key: identity.credentials.key.clone_key(),
                            },
                            &identity.trust,
                            TunnelParams::without_tunnels(iface.mtu),
                        )
                        .context("remote administration: TLS setup")?,
                    ),
                )
                .context("remote administration: reloading the identity files")?,
            };
            let policy = isthmus_identity::PeerPolicy::AdminOfClusters(
                ra.trust_domain.clone(),
                ra.clusters.clone(),
            );
            Some(
                isthmus_gateway::remote_admin::RemoteAdminServer::start(
                    ra.listen, config, policy, handler,
                )
                .with_context(|| format!("serving remote administration on {}", ra.listen))?,
            )
        }
        _ => None,
    };
    // Serves until the process exits.
    let _metrics = match cfg.metrics {
        Some(addr) => {
            let status_device = device.clone();
            Some(
                isthmus_gateway::metrics::MetricsServer::start(
                    addr,
                    Arc::new(move || status_device.status()),
                )
                .with_context(|| format!("serving metrics on {addr}"))?,
            )
        }
        None => None,
    };
    tracing::info!(
        interface = %iface.name,
        public_key = %device.core.public_key(),
        listen_port = device.listen_port,
        wireguard_peers = cfg.peers.len(),
        esp_peers = cfg.esp_peers.len(),
        identity_peers = cfg.identity_peers.len(),
        "gateway up"
    );

    let signal = signals.forever().next();
    tracing::info!(?signal, "shutting down");
    drop(admin);
    drop(node_watch);
    drop(watch);
    drop(uapi);
    // Detach the program / remove the fallback's rules before the device goes.
    drop(device);
    drop(egress_gateway);
    drop(steering);
    drop(driver);
    // The TUN device is not persistent: it disappears with our descriptor
    // when the process exits right after this.
    Ok(())
}

/// Puts the configured addresses on the device and routes every peer's
/// allowed prefixes into it (like wg-quick, without touching default routes),
/// through netlink.
fn configure_device(cfg: &GatewayConfig) -> anyhow::Result<()> {
    let name = &cfg.interface.name;
    let mut nl = Netlink::open().context("opening a netlink socket")?;
    let index = nl
        .link_index(name)
        .with_context(|| format!("finding the tunnel device {name}"))?;
    for (addr, len) in &cfg.interface.addresses {
        nl.addr_replace(index, *addr, *len)
            .with_context(|| format!("putting {addr}/{len} on {name}"))?;
    }
    for prefix in static_prefixes(cfg) {
        if prefix.len() == 0 {
            tracing::warn!(
                %prefix,
                "not routing a default prefix into the tunnel; add policy routing for it"
            );
            continue;
        }
        nl.route_replace(&tunnel_route(prefix, index, cfg.interface.mtu))
            .with_context(|| format!("routing {prefix} into {name}"))?;
    }
    Ok(())
}

/// Every statically configured peer's allowed prefixes.
fn static_prefixes(cfg: &GatewayConfig) -> impl Iterator<Item = &IpPrefix> {
    cfg.peers
        .iter()
        .flat_map(|p| &p.allowed_prefixes)
        .chain(cfg.esp_peers.iter().flat_map(|p| &p.allowed_prefixes))
        // Routed into the tunnel before IKE is up, so nothing leaves in clear.
        .chain(cfg.ike_peers.iter().flat_map(|p| &p.remote_prefixes))
        .chain(cfg.identity_peers.iter().flat_map(|p| &p.allowed_prefixes))
}

/// Main-table route of `prefix` into the tunnel device, marked as ours. Its
/// MTU is the tunnel's (the device MTU already leaves room for the tunnel
/// overhead), so nothing routed into the tunnel needs fragmenting.
fn tunnel_route(prefix: &IpPrefix, oif: u32, mtu: u16) -> Route {
    Route {
        dst: (prefix.addr(), prefix.len()),
        table: MAIN_TABLE,
        kind: RouteKind::Unicast,
        oif: Some(oif),
        mtu: Some(mtu.into()),
        protocol: RTPROT_ISTHMUS,
        priority: None,
    }
}

/// The kernel's main routing table.
const MAIN_TABLE: u32 = 254;

/// Starts steering (`[steering]`) and steers every static peer's prefixes.
fn start_steering(cfg: &GatewayConfig) -> anyhow::Result<Option<Arc<Steering>>> {
    let Some(steer_cfg) = &cfg.steering else {
        return Ok(None);
    };
    let steering = Steering::start(steer_cfg).context("starting [steering]")?;
    // Steered packets skip routing, so the route MTU cannot shrink them: the
    // workloads' own MTU must leave room for the tunnel.
    if let Ok(mut nl) = Netlink::open() {
        for name in &steer_cfg.interfaces {
            let mtu = nl.link_index(name).and_then(|i| nl.link_mtu(i));
            if let Ok(mtu) = mtu {
                if mtu > u32::from(cfg.interface.mtu) {
                    tracing::warn!(
                        interface = %name,
                        mtu,
                        tunnel_mtu = cfg.interface.mtu,
                        "workload interface MTU is above the tunnel's: set the workloads' MTU to at most the tunnel MTU, or their largest packets get fragmented or dropped on the underlay"
                    );
                }
            }
        }
    }
    for prefix in static_prefixes(cfg).filter(|p| p.len() > 0) {
        steering
            .add_remote((prefix.addr(), prefix.len()))
            .with_context(|| format!("steering {prefix}"))?;
    }
    Ok(Some(Arc::new(steering)))
}

/// How long an identity peer's tunnel outlives its lost channel when no
/// `[mesh]` TTL applies.
const DEFAULT_KEEP_TUNNEL: std::time::Duration = std::time::Duration::from_secs(300);

/// Kernel routes (through netlink) and steering entries for prefixes learnt
/// from the mesh.
struct MeshRoutes {
    dev: String,
    mtu: u16,
    steering: Option<Arc<Steering>>,
}

impl MeshRoutes {
    fn netlink(&self) -> Result<(Netlink, u32), String> {
        Netlink::open_for(&self.dev).map_err(|e| format!("tunnel device {}: {e}", self.dev))
    }
}

impl RouteSink for MeshRoutes {
    fn add(&self, prefix: &IpPrefix) -> Result<(), String> {
        if prefix.len() == 0 {
            return Err("not routing a default prefix into the tunnel".into());
        }
        let (mut nl, index) = self.netlink()?;
        // Only our own routes (into the TUN, or the blackhole we left when the prefix
        // was withdrawn) may be replaced; anything else is the host's and stays.
        let existing = nl
            .routes_exact((prefix.addr(), prefix.len()), MAIN_TABLE)
            .map_err(|e| format!("listing routes for {prefix}: {e}"))?;
        for r in &existing {
            let ours = r.kind == RouteKind::Blackhole || r.oif == Some(index);
            if !ours {
                return Err(format!(
                    "a route for {prefix} exists that is not this gateway's ({:?} via interface index {:?})",
                    r.kind, r.oif
                ));
            }
        }
        // The route first: if steering then fails (a full map), the workloads'
        // packets still reach the tunnel through routing.
        nl.route_replace(&tunnel_route(prefix, index, self.mtu))
            .map_err(|e| format!("routing {prefix}: {e}"))?;
        if let Some(s) = &self.steering {
            s.add_remote((prefix.addr(), prefix.len())).map_err(|e| {
                format!("steering {prefix} (routed into the tunnel all the same): {e}")
            })?;
        }
        Ok(())
    }

    fn remove(&self, prefix: &IpPrefix) -> Result<(), String> {
        // A withdrawn prefix is blackholed, never left to another route.
        let (mut nl, _) = self.netlink()?;
        let res = nl
            .route_replace(&Route {
                kind: RouteKind::Blackhole,
                oif: None,
                mtu: None,
                ..tunnel_route(prefix, 0, self.mtu)
            })
            .map_err(|e| format!("blackholing {prefix}: {e}"));
        // Unsteer only once the prefix is blackholed: never leave it to another route.
        res?;
        if let Some(s) = &self.steering {
            s.remove_remote((prefix.addr(), prefix.len()))
                .map_err(|e| format!("unsteering {prefix}: {e}"))?;
        }
        Ok(())
    }
}

/// What the UAPI and the admin socket see of the running gateway.
struct GatewayDevice {
    /// Egress policies (`[[egress]]`).
    egress: Option<EgressPolicies>,
    /// This gateway as an egress gateway.
    egress_gateway: Option<Arc<EgressGateway>>,
    /// Node mode, set once it has started.
    node: std::sync::OnceLock<Arc<NodeWatch>>,
    /// Steering of workload traffic, when `[steering]` is configured.
    steering: Option<Arc<Steering>>,
    /// The clustermesh watch, set once it has started.
    watch: std::sync::OnceLock<Arc<MeshWatch>>,
    core: Arc<WgCore>,
    esp: Option<Arc<EspCore>>,
    /// IKEv2 with the peers of `[peers.esp.ike]`.
    ike: Option<IkeService>,
    mesh: Option<Arc<MeshLinks>>,
    esp_listen_port: Option<u16>,
    name: String,
    listen_port: u16,
    mtu: u16,
    offload: bool,
}

impl GatewayDevice {
    fn status(&self) -> Status {
        let set = self.core.peers();
        let peers = set.peers().iter().map(|p| {
            let cfg = p.config();
            let stats = p.stats();
            PeerStatus {
                name: cfg.name,
                kind: "wireguard".into(),
                public_key: Some(cfg.public_key.to_base64()),
                endpoint: cfg.endpoint.map(|e| e.to_string()),
                allowed_prefixes: admin::prefixes(&cfg.allowed_prefixes),
                last_handshake_secs_ago: p
                    .last_handshake()
                    .and_then(|t| t.elapsed().ok())
                    .map(|d| d.as_secs_f64()),
                handshakes: stats.handshakes,
                rx_bytes: stats.rx_bytes,
                tx_bytes: stats.tx_bytes,
                rx_packets: stats.rx_packets,
                tx_packets: stats.tx_packets,
                drops: stats.drops.into(),
                esp: None,
                key_epoch: Some(p.sending_with().0),
                previous_keys: cfg.previous_keys.iter().map(|k| k.to_base64()).collect(),
            }
        });
        let now = Instant::now();
        let esp_set = self.esp.as_ref().map(|e| e.peers());
        let esp_peers = esp_set.iter().flat_map(|set| set.peers()).map(|p| {
            let cfg = p.config();
            let stats = p.stats();
            PeerStatus {
                name: cfg.name.clone(),
                kind: "esp".into(),
                public_key: None,
                endpoint: Some(cfg.endpoint.to_string()),
                allowed_prefixes: admin::prefixes(&cfg.allowed_prefixes),
                last_handshake_secs_ago: None,
                handshakes: 0,
                rx_bytes: stats.rx_bytes,
                tx_bytes: stats.tx_bytes,
                rx_packets: stats.rx_packets,
                tx_packets: stats.tx_packets,
                drops: stats.drops.into(),
                esp: Some(p.status(now)),
                key_epoch: None,
                previous_keys: Vec::new(),
            }
        });
        let peers = peers.chain(esp_peers).collect();
        Status {
            interface: self.name.clone(),
            public_key: self.core.public_key().to_base64(),
            listen_port: self.listen_port,
            mtu: self.mtu,
            offload: self.offload,
            drops: self.core.counters.snapshot().into(),
            esp_listen_port: self.esp_listen_port,
            esp_drops: self.esp.as_ref().map(|e| e.counters.snapshot().into()),
            ike: self
                .ike
                .as_ref()
                .map(IkeService::status)
                .unwrap_or_default(),
            ike_drops: self.ike.as_ref().map(IkeService::drops),
            peers,
            channels: self.mesh.as_ref().map(|m| m.status()).unwrap_or_default(),
            identity_reload: self.mesh.as_ref().map(|m| m.reload_status()),
            clusters: self
                .watch
                .get()
                .map(|w| {
                    w.clusters()
                        .into_iter()
                        .map(|c| admin::ClusterSummary {
                            name: c.name,
                            state: c.state.name().to_string(),
                            revision: c.revision,
                            state_secs: c.state_secs,
                            gateways: c.gateways.len(),
                            refusals: c.refusals.len(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            steering: self.steering.as_ref().map(|s| s.status()),
            node: self.node.get().map(|n| n.status()),
            egress: self.egress.as_ref().map(|e| e.status()).unwrap_or_default(),
            egress_gateway: self.egress_gateway.as_ref().map(|e| e.status()),
            wireguard_keys: self
                .core
                .keys()
                .into_iter()
                .map(|k| admin::WireguardKeyDoc {
                    epoch: k.epoch,
                    public_key: k.public_key.to_base64(),
                    in_force: k.in_force,
                })
                .collect(),
            key_rotation: self.mesh.as_ref().map(|m| m.rotation_status()),
        }
    }
}

impl UapiDevice for GatewayDevice {
    fn snapshot(&self) -> UapiSnapshot {
        let set = self.core.peers();
        UapiSnapshot {
            private_key: None,
            listen_port: self.listen_port,
            fwmark: None,
            peers: set
                .peers()
                .iter()
                .map(|p| {
                    let cfg = p.config();
                    let stats = p.stats();
                    UapiPeer {
                        public_key: cfg.public_key.0,
                        preshared_key: None,
                        endpoint: cfg.endpoint,
                        persistent_keepalive_interval: cfg.persistent_keepalive.unwrap_or(0),
                        allowed_ips: cfg
                            .allowed_prefixes
                            .iter()
                            .map(|p| (p.addr(), p.len()))
                            .collect(),
                        last_handshake: p.last_handshake(),
                        rx_bytes: stats.rx_bytes,
                        tx_bytes: stats.tx_bytes,
                    }
                })
                .collect(),
        }
    }

    fn apply(&self, req: SetRequest) -> Result<(), UapiError> {
        let change = |owned: &[isthmus_tunnel::PublicKey], protected: &[IpPrefix]| {
            let facts = rules::UapiFacts {
                listen_port: self.listen_port,
                owned,
                protected,
            };
            let mut result = Ok(());
            let mut req = Some(req);
            self.core
                .update_peers(|current| {
                    let Some(req) = req.take() else { return };
                    match rules::apply_uapi(current, req, facts, |k| {
                        self.core
                            .is_own_private_key(&isthmus_tunnel::PrivateKey::from_bytes(*k))
                    }) {
                        Ok(peers) => *current = peers,
                        Err(e) => result = Err(e),
                    }
                })
                .map_err(|e| UapiError::Rejected(e.to_string()))?;
            result
        };
        // Ownership is decided on the same snapshot as the change.
        match &self.mesh {
            Some(mesh) => mesh.with_owned(change),
            None => change(&[], &[]),
        }
    }
}
