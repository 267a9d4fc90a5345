//! `isthmus-clustermesh-api`: serves one cluster's state to the other clusters' gateways.

use anyhow::Context as _;
use clap::Parser;
use isthmus_clustermesh_api::config::{self, SourceConfig};
use isthmus_clustermesh_api::server::{self, ClusterMeshService, ServerOptions};
use isthmus_clustermesh_api::source::{etcd, file, kubernetes, Publisher};
use isthmus_clustermesh_api::store::Store;
use isthmus_identity::{MeshTls, PeerPolicy};
use std::process::ExitCode;

/// BSD sysexits EX_USAGE.
const EX_USAGE: u8 = 64;

/// The Isthmus clustermesh API server: publishes this cluster's gateways, prefixes,
/// services and identities (from a file, etcd or Kubernetes) over gRPC on mTLS to the gateways of the mesh.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Path of the TOML configuration file (to serve).
    #[arg(short, long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info", value_name = "FILTER", global = true)]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Writes a cluster file's objects into etcd (under <root>/<cluster>/...). With
    /// --gateway-ttl the gateways are held under a lease that this process keeps alive
    /// until it is stopped (then they expire), as a gateway registers itself.
    Publish {
        /// The cluster file (same format as the file source).
        #[arg(long, value_name = "FILE")]
        file: std::path::PathBuf,
        /// The cluster the file must describe.
        #[arg(long)]
        cluster: String,
        /// etcd members (repeat or comma-separate).
        #[arg(long, value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// Key root.
        #[arg(long, default_value = etcd::DEFAULT_ROOT)]
        root: String,
        /// Hold the gateways under a lease of this many seconds, kept alive until stopped.
        #[arg(long, value_name = "SECS")]
        gateway_ttl: Option<u64>,
        /// Also delete keys of this cluster that the file does not have.
        #[arg(long)]
        prune: bool,
    },
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
    if let Some(Command::Publish {
        file,
        cluster,
        etcd,
        root,
        gateway_ttl,
        prune,
    }) = args.command
    {
        return match publish(file, cluster, etcd, root, gateway_ttl, prune) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("isthmus-clustermesh-api publish: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let Some(config_path) = args.config else {
        eprintln!("isthmus-clustermesh-api: --config is required");
        return ExitCode::from(EX_USAGE);
    };
    let cfg = match config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("isthmus-clustermesh-api: config error: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("isthmus-clustermesh-api: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: config::ServerConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("clustermesh-api")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let tls = MeshTls::new(cfg.credentials.clone(), &cfg.trust).context("TLS setup")?;
        let server_tls = tls
            .server_config(
                PeerPolicy::AnyGateway(cfg.trust_domain.clone()),
                isthmus_clustermesh_api::ALPN,
            )
            .context("TLS setup")?;
        let epoch = rand_core::RngCore::next_u64(&mut rand_core::OsRng);
        let publisher = Publisher::new(Store::new(cfg.cluster.clone(), epoch, cfg.history));
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        tracing::info!(listen = %listener.local_addr()?, id = %cfg.id, cluster = %cfg.cluster, "clustermesh API serving");
        match cfg.source {
            SourceConfig::File {
                path,
                initial,
                interval,
            } => {
                tokio::spawn(file::run(publisher.clone(), path, initial, interval));
            }
            SourceConfig::Etcd(etcd_config) => {
                let publisher = publisher.clone();
                tokio::spawn(async move {
                    if let Err(e) = etcd::run(publisher, etcd_config).await {
                        tracing::error!(error = %e, "the etcd source stopped; clients keep the last state until their TTL");
                    }
                });
            }
            SourceConfig::Kubernetes {
                config,
                static_objects,
            } => {
                let publisher = publisher.clone();
                tokio::spawn(async move {
                    if let Err(e) = kubernetes::run(publisher, config, static_objects).await {
                        tracing::error!(error = %e, "the Kubernetes source stopped; clients keep the last state until their TTL");
                    }
                });
            }
        }
        let options = ServerOptions {
            bookmark_interval: cfg.bookmark_interval,
            ..ServerOptions::default()
        };
        let service = ClusterMeshService::new(publisher, options);
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
            }
            tracing::info!("shutting down");
        };
        server::serve(listener, server_tls, service, shutdown)
            .await
            .context("serving")?;
        Ok(())
    })
}

fn publish(
    path: std::path::PathBuf,
    cluster: String,
    endpoints: Vec<String>,
    root: String,
    gateway_ttl: Option<u64>,
    prune: bool,
) -> anyhow::Result<()> {
    let cluster = isthmus_identity::ClusterName::new(&cluster).context("--cluster")?;
    let objects =
        file::load(&path, &cluster).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let mut config = etcd::EtcdWriterConfig::new(cluster.clone(), endpoints);
        config.root = root;
        let writer = etcd::EtcdObjectWriter::connect(config).await?;
        let mut held = Vec::new();
        for obj in &objects {
            let is_gateway = obj
                .key
                .as_ref()
                .is_some_and(|k| k.kind == isthmus_clustermesh_api::pb::Kind::Gateway as i32);
            match gateway_ttl {
                Some(ttl) if is_gateway => {
                    held.push(
                        writer
                            .register_gateway(obj, std::time::Duration::from_secs(ttl))
                            .await?,
                    );
                }
                _ => {
                    writer.put(obj).await?;
                }
            }
        }
        if prune {
            let keep: Vec<_> = objects.iter().filter_map(|o| o.key.clone()).collect();
            let pruned = writer.prune_except(&keep).await?;
            println!("pruned {pruned} keys");
        }
        println!("published {} objects of cluster {cluster}", objects.len());
        if !held.is_empty() {
            println!("holding {} gateway leases; stop with SIGTERM", held.len());
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            for h in held {
                let _ = h.revoke().await;
            }
        }
        Ok(())
    })
}
