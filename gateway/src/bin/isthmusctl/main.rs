//! `isthmusctl`: the Isthmus admin CLI.
//!
//! `status` reads a gateway's admin socket and prints its peers and counters
//! as a table or JSON. `keygen` and `pubkey` manage WireGuard key files.
//! `certs` runs the mesh PKI (root CA, cluster CAs, gateway certificates, CRLs;
//! see `certs.rs`). No command ever prints a private key.

mod certs;
mod diagnose;
mod keys;
mod mesh_rotate;
mod sa;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use isthmus_clustermesh_api::reducer::{ClusterStatus, ServiceImport};
use isthmus_gateway::admin::{self, Status};
use isthmus_gateway::config::{validate_ifname, ADMIN_SOCKET_DIR};
use isthmus_tunnel::PrivateKey;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "isthmusctl", version, about = "Admin CLI for Isthmus gateways")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show a gateway's peers, handshakes, traffic and drop counters.
    Status {
        #[command(flatten)]
        gateway: Gateway,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Create a new private key file (mode 0600) and print its public key.
    Keygen {
        /// Where to write the private key; refused if it exists.
        #[arg(long, value_name = "FILE")]
        private_key_file: PathBuf,
    },
    /// Print the public key of a private key file.
    Pubkey {
        #[arg(long, value_name = "FILE")]
        private_key_file: PathBuf,
    },
    /// Create the manual-keying SA files of one ESP tunnel: one for this
    /// gateway and a mirrored one for the peer (both mode 0600).
    EspKeygen {
        /// SA file for this gateway (its [peers.esp] sa_file).
        #[arg(long, value_name = "FILE")]
        local: PathBuf,
        /// SA file for the peer gateway.
        #[arg(long, value_name = "FILE")]
        remote: PathBuf,
        /// AEAD of the SAs.
        #[arg(long, value_enum, default_value_t = Cipher::Aes128Gcm)]
        cipher: Cipher,
    },
    /// What a gateway has learnt from the clustermesh API.
    Mesh {
        #[command(subcommand)]
        command: MeshCmd,
        /// The gateway's interface name (its admin socket is
        /// /var/run/isthmus/NAME.sock).
        #[arg(short, long, global = true, conflicts_with = "socket")]
        interface: Option<String>,
        /// Path of the gateway's admin socket.
        #[arg(short, long, global = true)]
        socket: Option<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
        output: Output,
    },
    /// An egress gateway's admin state: `drain` keeps the flows pinned to it
    /// and takes no new ones (sources move new flows to their next gateway);
    /// `resume` takes new flows again.
    Egress {
        #[command(subcommand)]
        command: EgressCmd,
        /// The gateway's interface name (its admin socket is
        /// /var/run/isthmus/NAME.sock).
        #[arg(short, long, global = true, conflicts_with = "socket")]
        interface: Option<String>,
        /// Path of the gateway's admin socket.
        #[arg(short, long, global = true)]
        socket: Option<PathBuf>,
    },
    /// Exit 0 when the gateway is ready (a remote cluster's API connected, if
    /// any is configured; every peer channel up with a keyed tunnel, except,
    /// while some cluster is connected, channels to a remote cluster that is
    /// down itself; an egress gateway's uplink up, not drained), 1 when not (or
    /// the gateway does not answer), saying why in one line. The Kubernetes
    /// readiness probe.
    Ready {
        #[command(flatten)]
        gateway: Gateway,
        /// Output format (json: the IsthmusGateway status).
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// What is wrong with one peer, in one sentence: its mTLS channel and
    /// certificate, a keyed tunnel, a fresh handshake, packets arriving from it
    /// and drops over --wait seconds. Exit 0 when healthy, 1 when not.
    Diagnose {
        /// The peer: its name, SPIFFE ID or WireGuard public key.
        peer: String,
        #[command(flatten)]
        gateway: Gateway,
        /// Seconds to watch the peer's counters.
        #[arg(long, value_name = "SECS", default_value_t = 3,
              value_parser = clap::value_parser!(u64).range(1..=60))]
        wait: u64,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// WireGuard static keys (`keys rotate`).
    Keys {
        #[command(subcommand)]
        command: keys::KeysCmd,
    },
    /// ESP security associations (`sa rotate`).
    Sa {
        #[command(subcommand)]
        command: sa::SaCmd,
    },
    /// Print the Isthmus CustomResourceDefinitions (YAML), generated from the
    /// Rust types; with --write, write one file per CRD into DIR instead.
    Crds {
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
    /// Mesh PKI: create the root CA, issue cluster CAs and gateway
    /// certificates, rotate certificates and CAs, show certificates, revoke,
    /// write Kubernetes Secrets.
    Certs {
        #[command(subcommand)]
        command: certs::CertsCmd,
    },
}

/// Which gateway: by interface name or admin socket path, or remotely by the
/// address of its `[admin] listen` over mTLS.
#[derive(clap::Args, Debug)]
pub(crate) struct Gateway {
    /// The gateway's interface name (its admin socket is
    /// /var/run/isthmus/NAME.sock).
    #[arg(
        short,
        long,
        conflicts_with_all = ["socket", "remote"],
        required_unless_present_any = ["socket", "remote"]
    )]
    interface: Option<String>,
    /// Path of the gateway's admin socket.
    #[arg(short, long, conflicts_with = "remote")]
    socket: Option<PathBuf>,
    /// A remote gateway's admin address (its `[admin] listen`), reached over
    /// mTLS with an administrator certificate (`certs issue admin`).
    #[arg(long, value_name = "IP:PORT", requires_all = ["cert", "key", "bundle"])]
    remote: Option<std::net::SocketAddr>,
    /// With --remote: the administrator's certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "remote")]
    cert: Option<PathBuf>,
    /// With --remote: the administrator's private key (PEM, mode 0600).
    #[arg(long, value_name = "FILE", requires = "remote")]
    key: Option<PathBuf>,
    /// With --remote: the mesh trust bundle (PEM).
    #[arg(long, value_name = "FILE", requires = "remote")]
    bundle: Option<PathBuf>,
    /// With --remote: CRL files the gateway's certificate is checked against.
    #[arg(long = "crl", value_name = "FILE", requires = "remote")]
    crls: Vec<PathBuf>,
    /// With --remote: the gateway's SPIFFE ID (default: any gateway of the
    /// trust domain).
    #[arg(long, value_name = "SPIFFE_ID", requires = "remote")]
    server_id: Option<String>,
}

impl Gateway {
    /// Where this gateway's admin commands go.
    pub(crate) fn target(self) -> anyhow::Result<admin::AdminTarget> {
        let Some(addr) = self.remote else {
            return Ok(admin::AdminTarget::Socket(admin_socket_path(
                self.socket,
                self.interface,
            )?));
        };
        let (Some(cert), Some(key), Some(bundle)) = (self.cert, self.key, self.bundle) else {
            bail!("--remote needs --cert, --key and --bundle");
        };
        let credentials = isthmus_certs::files::load_credentials(&cert, &key)
            .with_context(|| format!("--cert {} / --key {}", cert.display(), key.display()))?;
        let mut crls = Vec::new();
        for path in &self.crls {
            crls.extend(
                isthmus_certs::files::load_crls(path)
                    .with_context(|| format!("--crl {}", path.display()))?,
            );
        }
        let trust = isthmus_identity::MeshTrust {
            roots: isthmus_certs::files::load_certificates(&bundle)
                .with_context(|| format!("--bundle {}", bundle.display()))?,
            crls,
        };
        let server_id = self
            .server_id
            .map(|s| s.parse::<isthmus_identity::SpiffeId>())
            .transpose()
            .map_err(|e| anyhow::anyhow!("--server-id: {e}"))?;
        Ok(admin::AdminTarget::Remote(
            admin::RemoteTarget::new(addr, credentials, &trust, server_id)
                .context("remote administration: TLS setup")?,
        ))
    }
}

#[derive(Subcommand, Debug)]
enum EgressCmd {
    /// Keep existing flows, take no new ones (maintenance).
    Drain,
    /// Take new flows again.
    Resume,
}

#[derive(Subcommand, Debug)]
enum MeshCmd {
    /// Each remote cluster: state (connected, stale, withdrawn), revision, age,
    /// gateways, prefixes and refusals.
    Clusters,
    /// The services exported to this cluster, with their endpoints per cluster.
    Services,
    /// Rotate several gateways, one after the other: a new certificate and key
    /// for each (in the CA directory, put in force by the running gateway) and a
    /// new SA generation for each of its ESP peers and, when it has WireGuard
    /// peers by identity, a new WireGuard static key (as `keys rotate`); waits
    /// until each reports them in force. Exit 0 when all do, 2 when some do not
    /// within --wait.
    Rotate {
        /// CA directory made by `isthmusctl certs init` holding the gateways' certificates.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A gateway: its interface name or admin socket path (repeat for each).
        #[arg(long = "gateway", value_name = "GW", required = true)]
        gateways: Vec<String>,
        /// Validity of the new certificates in days.
        #[arg(long, value_name = "N", default_value_t = 90,
              value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
        /// Seconds to wait for each gateway.
        #[arg(long, value_name = "SECS", default_value_t = 15)]
        wait: u64,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Cipher {
    #[value(name = "aes128-gcm")]
    Aes128Gcm,
    #[value(name = "aes256-gcm")]
    Aes256Gcm,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Output {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 64 } else { 0 });
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(Exit(code)) = e.downcast_ref::<Exit>() {
                return ExitCode::from(*code);
            }
            eprintln!("isthmusctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Status { gateway, output } => {
            let path = gateway.target()?;
            let status = admin::fetch_status(&path)?;
            let text = match output {
                Output::Json => serde_json::to_string_pretty(&status)? + "\n",
                Output::Table => render_table(&status),
            };
            std::io::stdout().write_all(text.as_bytes())?;
        }
        Cmd::Mesh {
            command,
            interface,
            socket,
            output,
        } => {
            if let MeshCmd::Rotate {
                dir,
                gateways,
                days,
                wait,
            } = &command
            {
                return mesh_rotate::run(dir, gateways, *days, *wait, output);
            }
            let path = admin_socket_path(socket, interface)?;
            let text = match command {
                MeshCmd::Rotate { .. } => String::new(),
                MeshCmd::Clusters => {
                    let clusters: Vec<ClusterStatus> = admin::fetch(&path, "mesh-clusters")?;
                    match output {
                        Output::Json => serde_json::to_string_pretty(&clusters)? + "\n",
                        Output::Table => render_clusters(&clusters),
                    }
                }
                MeshCmd::Services => {
                    let services: Vec<ServiceImport> = admin::fetch(&path, "mesh-services")?;
                    match output {
                        Output::Json => serde_json::to_string_pretty(&services)? + "\n",
                        Output::Table => render_services(&services),
                    }
                }
            };
            std::io::stdout().write_all(text.as_bytes())?;
        }
        Cmd::Egress {
            command,
            interface,
            socket,
        } => {
            let path = admin_socket_path(socket, interface)?;
            let request = match command {
                EgressCmd::Drain => "egress-drain",
                EgressCmd::Resume => "egress-resume",
            };
            let st: isthmus_gateway::egress::EgressGatewayStatus = admin::fetch(&path, request)?;
            println!(
                "egress gateway {} ({} on {}): {}",
                st.egress_ip,
                if st.uplink_ok {
                    "uplink up"
                } else {
                    "uplink DOWN"
                },
                st.uplink,
                st.state
            );
        }
        Cmd::Keygen { private_key_file } => {
            let key = PrivateKey::generate();
            let text = zeroize::Zeroizing::new(format!("{}\n", key.to_base64_secret().as_str()));
            write_secret(&private_key_file, &text)?;
            println!("{}", key.public_key());
        }
        Cmd::EspKeygen {
            local,
            remote,
            cipher,
        } => esp_keygen(&local, &remote, cipher)?,
        Cmd::Pubkey { private_key_file } => {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(&private_key_file)
                    .with_context(|| format!("reading {}", private_key_file.display()))?,
            );
            let key = PrivateKey::from_base64(&text)
                .with_context(|| format!("{}", private_key_file.display()))?;
            println!("{}", key.public_key());
        }
        Cmd::Certs { command } => certs::run(command)?,
        Cmd::Sa { command } => sa::run(command)?,
        Cmd::Keys { command } => keys::run(command)?,
        Cmd::Diagnose {
            peer,
            gateway,
            wait,
            output,
        } => diagnose::run(&peer, gateway, wait, output)?,
        Cmd::Ready { gateway, output } => {
            let path = gateway.target()?;
            let status = admin::fetch_status(&path)?;
            let ready = isthmus_gateway::crd::readiness(&status);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&ready)?),
                Output::Table => println!(
                    "{}: {}",
                    if ready.ready { "ready" } else { "NOT READY" },
                    ready.reason
                ),
            }
            if !ready.ready {
                return Err(Exit(1).into());
            }
        }
        Cmd::Crds { write } => {
            let crds = isthmus_gateway::crd::rendered().context("rendering the CRDs")?;
            match write {
                None => {
                    let docs: Vec<&str> = crds.iter().map(|(_, y)| y.as_str()).collect();
                    print!("{}", docs.join("---\n"));
                }
                Some(dir) => {
                    for (name, yaml) in &crds {
                        let path = dir.join(name);
                        std::fs::write(&path, yaml)
                            .with_context(|| format!("writing {}", path.display()))?;
                        println!("wrote {}", path.display());
                    }
                }
            }
        }
    }
    Ok(())
}

/// Ends the program with this exit code, printing nothing more.
#[derive(Debug)]
pub(crate) struct Exit(u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for Exit {}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

fn esp_keygen(local: &Path, remote: &Path, cipher: Cipher) -> anyhow::Result<()> {
    use rand_core::RngCore as _;
    let (name, key_len) = match cipher {
        Cipher::Aes128Gcm => ("aes128-gcm", 16),
        Cipher::Aes256Gcm => ("aes256-gcm", 32),
    };
    let mut rng = rand_core::OsRng;
    let spi = |rng: &mut rand_core::OsRng| loop {
        let v = rng.next_u32();
        if v >= 256 {
            break v;
        }
    };
    let key = |rng: &mut rand_core::OsRng| {
        let mut k = zeroize::Zeroizing::new(vec![0u8; key_len + 4]);
        rng.fill_bytes(&mut k);
        zeroize::Zeroizing::new(hex::encode(&*k))
    };
    let (spi_a, spi_b) = loop {
        let (a, b) = (spi(&mut rng), spi(&mut rng));
        if a != b {
            break (a, b);
        }
    };
    let (key_a, key_b) = (key(&mut rng), key(&mut rng));
    let file = |out_spi: u32, out_key: &str, in_spi: u32, in_key: &str| {
        zeroize::Zeroizing::new(format!(
            "# Isthmus ESP manual keying (generation 0). Keep secret: mode 0600.\n\
             cipher = \"{name}\"\n\
             outbound_spi = \"{out_spi:#010x}\"\n\
             outbound_key = \"{out_key}\"\n\
             inbound_spi = \"{in_spi:#010x}\"\n\
             inbound_key = \"{in_key}\"\n"
        ))
    };
    write_secret(local, &file(spi_a, &key_a, spi_b, &key_b))?;
    if let Err(e) = write_secret(remote, &file(spi_b, &key_b, spi_a, &key_a)) {
        let _ = std::fs::remove_file(local);
        return Err(e);
    }
    println!(
        "wrote {} (outbound SPI {spi_a:#010x}) and {} (outbound SPI {spi_b:#010x})",
        local.display(),
        remote.display()
    );
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn ago(secs: Option<f64>) -> String {
    match secs {
        None => "never".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s ago"),
        Some(s) if s < 7200.0 => format!("{:.0}m ago", s / 60.0),
        Some(s) => format!("{:.1}h ago", s / 3600.0),
    }
}

fn render_table(s: &Status) -> String {
    let mut out = format!(
        "interface {}  public key {}  port {}  mtu {}  offload {}\n\
         device drops: no_route={} malformed={} unknown_peer={}\n",
        s.interface,
        s.public_key,
        s.listen_port,
        s.mtu,
        if s.offload { "on" } else { "off" },
        s.drops.no_route,
        s.drops.malformed,
        s.drops.unknown_peer,
    );
    if let (Some(port), Some(d)) = (s.esp_listen_port, &s.esp_drops) {
        out += &format!(
            "esp port {port}  esp drops: malformed={} unknown_spi={}\n",
            d.malformed, d.unknown_peer
        );
    }
    if let Some(d) = &s.ike_drops {
        out += &format!("ike drops: stray={} overflow={}\n", d.stray, d.overflow);
    }
    for k in &s.ike {
        out += &format!(
            "ike {} ({:?}, {} -> {}) {} with {}{}\n",
            k.peer,
            k.role,
            k.local_id,
            k.remote_id,
            k.state,
            k.endpoint,
            k.established_secs
                .map(|t| format!(" for {t:.0}s"))
                .unwrap_or_default(),
        );
        if let Some((i, r)) = &k.ike_spis {
            out += &format!(
                "  IKE SA {i}_i {r}_r  CHILD_SAs (in/out) {}  rekeys {}  last heard {}  dpd {}  ESP hard lifetime {}s\n",
                if k.child_sas.is_empty() {
                    "-".to_string()
                } else {
                    k.child_sas
                        .iter()
                        .map(|(i, o)| format!("{i}/{o}"))
                        .collect::<Vec<_>>()
                        .join(",")
                },
                k.child_rekeys,
                ago(k.last_heard_secs),
                k.dpd_secs.map_or("off".to_string(), |d| format!("{d}s")),
                k.esp_hard_lifetime_secs,
            );
        }
        if let Some(e) = &k.last_error {
            out += &format!("  last error: {e}\n");
        }
    }
    out += "\n";
    let header = [
        "PEER",
        "KIND",
        "PUBLIC KEY / SPI (out, in)",
        "ENDPOINT",
        "ALLOWED PREFIXES",
        "HANDSHAKE / SA",
        "RX",
        "TX",
        "DROPS (no_session/bad_source/decrypt/replay/too_old)",
    ];
    let rows: Vec<[String; 9]> = s
        .peers
        .iter()
        .map(|p| {
            let (key, session) = match &p.esp {
                Some(esp) => (
                    format!(
                        "{} {}",
                        esp.outbound.spi,
                        esp.inbound
                            .iter()
                            .map(|sa| sa.spi.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    format!(
                        "{} gen {} seq {} age {:.0}s",
                        esp.cipher,
                        esp.outbound.generation,
                        esp.outbound.last_seq,
                        esp.outbound.age_secs
                    ),
                ),
                None => (
                    p.public_key.clone().unwrap_or_else(|| "-".into()),
                    format!("{} (#{})", ago(p.last_handshake_secs_ago), p.handshakes),
                ),
            };
            [
                p.name.clone().unwrap_or_else(|| "-".into()),
                p.kind.clone(),
                key,
                p.endpoint.clone().unwrap_or_else(|| "-".into()),
                if p.allowed_prefixes.is_empty() {
                    "-".into()
                } else {
                    p.allowed_prefixes.join(",")
                },
                session,
                format!("{} / {} pkts", human_bytes(p.rx_bytes), p.rx_packets),
                format!("{} / {} pkts", human_bytes(p.tx_bytes), p.tx_packets),
                format!(
                    "{}/{}/{}/{}/{}",
                    p.drops.no_session,
                    p.drops.bad_source,
                    p.drops.decrypt_failure,
                    p.drops.replay,
                    p.drops.too_old
                ),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    out += &line(header.to_vec());
    for row in &rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        out += "(no peers)\n";
    }
    if !s.clusters.is_empty() {
        out += "\nremote clusters (clustermesh API; details: isthmusctl mesh clusters):\n";
        for c in &s.clusters {
            out += &format!(
                "  {:<16} {:<10} for {:<8} revision {:<8} gateways {}{}\n",
                c.name,
                c.state,
                age(Some(c.state_secs)),
                c.revision,
                c.gateways,
                if c.refusals > 0 {
                    format!("  refusals {}", c.refusals)
                } else {
                    String::new()
                }
            );
        }
    }
    if let Some(st) = &s.steering {
        out += &render_steering(st);
    }
    for e in &s.egress {
        out += &format!(
            "\negress policy {}: {} -> {}{}\n",
            e.name,
            e.sources.join(", "),
            e.destinations.join(", "),
            if e.no_gateway_drops > 0 {
                format!("  (dropped, no gateway: {})", e.no_gateway_drops)
            } else {
                String::new()
            }
        );
        for g in &e.gateways {
            out += &format!(
                "  {:<20} {:<12} flows {:<6} packets {:<10} rtt {}\n",
                g.peer,
                g.health,
                g.flows,
                g.packets,
                g.rtt_ms.map_or("-".to_string(), |r| format!("{r:.2} ms"))
            );
        }
    }
    if let Some(g) = &s.egress_gateway {
        out += &format!(
            "\negress gateway: {} via {} as {}{}\n",
            g.state,
            g.uplink,
            g.egress_ip,
            if g.uplink_ok {
                ""
            } else {
                " (endpoint probes failing)"
            }
        );
    }
    if let Some(n) = &s.node {
        out += &format!(
            "\nnode mode ({}): pods {} in cluster {}; nodes from {}\n",
            if n.strict { "strict" } else { "not strict" },
            n.pod_prefixes.join(", "),
            n.cluster_prefixes.join(", "),
            n.nodes_file
        );
        for node in &n.nodes {
            out += &format!(
                "  {:<20} {}  pods {}\n",
                node.name.as_deref().unwrap_or("-"),
                node.spiffe_id,
                node.pod_prefixes.join(", ")
            );
        }
        if n.nodes.is_empty() {
            out += "  (no other nodes)\n";
        }
        if let Some(e) = &n.last_error {
            out += &format!("  nodes file refused: {e} (last good list kept)\n");
        }
    }
    if !s.channels.is_empty() {
        out += "\nmTLS peer channels:\n";
        let name_w = s
            .channels
            .iter()
            .map(|c| c.name.as_deref().unwrap_or("-").len())
            .max()
            .unwrap_or(1);
        let id_w = s
            .channels
            .iter()
            .map(|c| c.spiffe_id.len())
            .max()
            .unwrap_or(1);
        for c in &s.channels {
            let up = match (c.state.as_str(), c.up_secs) {
                ("up", Some(secs)) => format!(
                    "up {} ({})",
                    ago(Some(secs)).replace(" ago", ""),
                    c.role.as_deref().unwrap_or("-")
                ),
                ("down", _) => format!(
                    "down, tunnel kept {}",
                    c.tunnel_expires_secs
                        .map(|t| format!("for {}", age(Some(t))))
                        .unwrap_or_default()
                ),
                (state, _) => state.to_string(),
            };
            out += &format!(
                "  {:<name_w$}  {:<9}  {:<id_w$}  via {}  {}  sessions {}{}\n",
                c.name.as_deref().unwrap_or("-"),
                c.kind,
                c.spiffe_id,
                c.channel_endpoint,
                up,
                c.sessions,
                c.last_refusal
                    .as_deref()
                    .map(|r| format!("  last refusal: {r}"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(r) = &s.identity_reload {
        out += &format!(
            "
identity files: {} trust reload(s), {} certificate reload(s){}
",
            r.trust_reloads,
            r.credential_reloads,
            r.last_reload_unix
                .map(|t| format!(", last at unix time {t}"))
                .unwrap_or_default()
        );
        if let Some(e) = &r.last_error {
            out += &format!(
                "  not in force: {e} (the previous files stay in use)
"
            );
        }
    }
    out
}

/// The admin socket named by `--socket`, or by `--interface` in the default directory.
pub(crate) fn admin_socket_path(
    socket: Option<PathBuf>,
    interface: Option<String>,
) -> anyhow::Result<PathBuf> {
    match (socket, interface) {
        (Some(p), _) => Ok(p),
        (None, Some(name)) => {
            validate_ifname(&name).map_err(|m| anyhow::anyhow!("--interface: {m}"))?;
            Ok(Path::new(ADMIN_SOCKET_DIR).join(format!("{name}.sock")))
        }
        (None, None) => bail!("give --interface NAME or --socket PATH"),
    }
}

fn age(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 10.0 => format!("{s:.1}s"),
        Some(s) if s < 3600.0 => format!("{}s", s as u64),
        Some(s) => format!("{}h{:02}m", s as u64 / 3600, (s as u64 % 3600) / 60),
    }
}

fn render_steering(st: &isthmus_ebpf_redirect::SteeringStatus) -> String {
    use isthmus_ebpf_redirect::Entry;
    let mut out = format!(
        "\nsteering ({}) into {} from {}:\n",
        match st.mode {
            isthmus_ebpf_redirect::Mode::Bpf => "bpf, TCX",
            _ => "policy routing fallback",
        },
        st.tunnel,
        st.interfaces.join(", ")
    );
    let count =
        |c: &isthmus_ebpf_redirect::Count| format!("{} pkts {}", c.packets, human_bytes(c.bytes));
    out += &format!(
        "  redirected {}  passed {}  redirect failed {}  malformed {}  too big for the tunnel {}\n",
        count(&st.redirected),
        count(&st.passed),
        st.redirect_failed.packets,
        st.malformed.packets,
        st.too_big.packets
    );
    for e in &st.entries {
        let what = match &e.entry {
            Entry::Remote { prefix } => format!("remote  {prefix}"),
            Entry::Local { prefix } => format!("local   {prefix} (passes)"),
            Entry::Egress { policy, source } => format!("egress  policy {policy} from {source}"),
        };
        out += &format!("  {what:<44} {}\n", count(&e.steered));
    }
    out
}

fn render_clusters(clusters: &[ClusterStatus]) -> String {
    let mut out = format!(
        "{:<16} {:<10} {:>7} {:>9} {:>10} {:>11} {:>7}  {:<20} GATEWAYS\n",
        "CLUSTER", "STATE", "FOR", "REVISION", "LAST EVENT", "LAST CHANGE", "OBJECTS", "PREFIXES"
    );
    for c in clusters {
        let gateways: Vec<String> = c
            .gateways
            .iter()
            .map(|g| format!("{} ({}, {})", g.name, g.channel_endpoint, g.kinds.join("/")))
            .collect();
        out.push_str(&format!(
            "{:<16} {:<10} {:>7} {:>9} {:>10} {:>11} {:>7}  {:<20} {}\n",
            c.name,
            c.state.name(),
            age(Some(c.state_secs)),
            c.revision,
            age(c.last_event_secs),
            age(c.last_change_secs),
            c.objects,
            if c.prefixes.is_empty() {
                "-".to_string()
            } else {
                c.prefixes.join(",")
            },
            if gateways.is_empty() {
                "-".to_string()
            } else {
                gateways.join(", ")
            },
        ));
        if let Some(reason) = &c.last_disconnect {
            if c.state.name() != "connected" {
                out.push_str(&format!("    last disconnect: {reason}\n"));
            }
        }
        for r in &c.refusals {
            out.push_str(&format!("    refused: {}\n", r.reason));
        }
    }
    if clusters.is_empty() {
        out.push_str("(no remote clusters configured)\n");
    }
    out
}

fn render_services(services: &[ServiceImport]) -> String {
    let mut out = format!(
        "{:<32} {:<16} {:<8} {:<12} ENDPOINTS\n",
        "SERVICE", "PORTS", "AFFINITY", "CLUSTER"
    );
    for s in services {
        for (i, b) in s.backends.iter().enumerate() {
            let endpoints: Vec<String> = b
                .endpoints
                .iter()
                .map(|e| {
                    let state = if e.terminating {
                        "terminating"
                    } else if e.ready {
                        "ready"
                    } else if e.serving {
                        "serving"
                    } else {
                        "not ready"
                    };
                    format!("{} ({state})", e.address)
                })
                .collect();
            let (name, ports, affinity) = if i == 0 {
                (
                    format!("{}/{}", s.namespace, s.name),
                    s.ports.join(","),
                    s.affinity.clone(),
                )
            } else {
                (String::new(), String::new(), String::new())
            };
            out.push_str(&format!(
                "{:<32} {:<16} {:<8} {:<12} {}\n",
                name,
                ports,
                affinity,
                b.cluster,
                if !b.shared {
                    "(not shared)".to_string()
                } else if endpoints.is_empty() {
                    "-".to_string()
                } else {
                    endpoints.join(", ")
                }
            ));
        }
    }
    if services.is_empty() {
        out.push_str("(no services exported to this cluster)\n");
    }
    out
}
