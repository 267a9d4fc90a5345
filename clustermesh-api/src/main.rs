//! `isthmus-clustermesh-api`: serves one cluster's state to the other clusters' gateways.

use anyhow::Context as _;
use clap::Parser;
use isthmus_clustermesh_api::config::{self, SourceConfig};
use isthmus_clustermesh_api::server::{self, ClusterMeshService, ServerOptions};
use isthmus_clustermesh_api::source::{file, kubernetes, Publisher};
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
        .init();
    let cfg = match config::load(&args.config) {
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
