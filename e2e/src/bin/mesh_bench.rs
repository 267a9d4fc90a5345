//! `isthmus-mesh-bench`: scale checks of the mesh control plane against one real gateway.
//!
//! ```text
//! isthmus-mesh-bench channels [--peers 1000] [--json]
//! isthmus-mesh-bench api [--clusters 1000] [--services 100] [--gateways 10] [--changes 200]
//!                        [--endpoints 3] [--interval-ms 20] [--workers 2] [--seed 1] [--json]
//! isthmus-mesh-bench egress-failover [--kills 20] [--json]
//! ```
//! `egress-failover` builds the egress lab (`isthmus_e2e::egress_lab`: a source gateway,
//! two egress gateways, a firewalled endpoint) and kills the active egress gateway under a
//! stream of one datagram every 5 ms, `--kills` times (restarting it between kills); it
//! reports the outage (longest run of lost datagrams) p50 and max.
//! `channels` starts one `isthmus-gateway` in a fresh network namespace with N peers
//! configured by identity and runs the N peer ends in this process (the channel library,
//! as tasks on its runtime); it reports the time until the gateway shows every mTLS
//! channel up, and the gateway's threads and resident memory before and after. The issue's
//! goal: 1,000 peers under 256 MiB and a few dozen threads. Needs root; a command, not a
//! timed test.
//!
//! `api` runs N clusters' clustermesh API servers and G simulated gateways, each watching
//! every cluster through the real client and reducer, in this process over loopback mTLS
//! (see `isthmus_e2e::mesh_bench_api`): time to full sync, time from a change until every
//! gateway applied it (p50/p99/max), RSS and threads. Raises `RLIMIT_NOFILE` to about
//! 2 × N × G (root for more than the hard limit).

use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use isthmus_e2e::channel_scale::{ChannelScale, ScaleOptions, ScaleReport};
use isthmus_e2e::mesh_bench_api::{self, ApiBenchOptions};

/// Scale checks of the Isthmus mesh control plane.
#[derive(Debug, Parser)]
#[command(name = "isthmus-mesh-bench")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Egress HA: kill the active egress gateway under a steady stream (one
    /// datagram every 5 ms), `--kills` times; outage p50 and max.
    EgressFailover {
        /// Kills of the active gateway.
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// N mTLS peer channels against one gateway: time to establish, threads, memory.
    Channels {
        /// Peer channels.
        #[arg(long, default_value_t = 1000)]
        peers: usize,
        /// Seconds every channel may take to come up.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Clustermesh API: N API servers, G gateways watching all of them: sync time, change
    /// propagation to every gateway, memory and threads per remote cluster.
    Api(ApiArgs),
}

#[derive(Debug, clap::Args)]
struct ApiArgs {
    /// Clusters, each with its own API server.
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    /// Services per cluster (each with one EndpointSlice).
    #[arg(long, default_value_t = 100)]
    services: usize,
    /// Simulated gateways, each watching every cluster.
    #[arg(long, default_value_t = 10)]
    gateways: usize,
    /// Changes published after the sync, on random clusters.
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Endpoints per EndpointSlice.
    #[arg(long, default_value_t = 3)]
    endpoints: usize,
    /// Milliseconds between two changes.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Seed of the choice of clusters and kinds of the changes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn run_api(a: ApiArgs) -> Result<()> {
    let opts = ApiBenchOptions {
        clusters: a.clusters,
        services: a.services,
        endpoints: a.endpoints,
        gateways: a.gateways,
        changes: a.changes,
        change_interval: Duration::from_millis(a.interval_ms),
        workers: a.workers,
        seed: a.seed,
        ..ApiBenchOptions::default()
    };
    if let Err(e) = opts.validate() {
        eprintln!("isthmus-mesh-bench api: {e}");
        std::process::exit(64);
    }
    let report = mesh_bench_api::run(opts)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_table(r: &ScaleReport) {
    println!(
        "{} peer channels ({} dialed by the peers, {} by the gateway)",
        r.peers, r.dialed_by_peers, r.dialed_by_gateway
    );
    println!("| | threads | RSS (MiB) |");
    println!("|---|---|---|");
    println!(
        "| gateway, peers configured, no channel up | {} | {:.1} |",
        r.before.threads,
        mib(r.before.rss_kib)
    );
    println!(
        "| gateway, all {} channels up | {} | {:.1} |",
        r.peers,
        r.after.threads,
        mib(r.after.rss_kib)
    );
    println!(
        "time to establish: 50 % {:.2} s, 90 % {:.2} s, all {:.2} s (sessions {}); gateway start {:.2} s",
        r.half_up_secs, r.p90_up_secs, r.all_up_secs, r.sessions, r.gateway_start_secs
    );
}

/// Kills the preferred egress gateway `kills` times under a stream; prints the outages.
fn egress_failover(kills: usize, json: bool) -> Result<()> {
    use isthmus_e2e::egress_lab::{self, Lab};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut lab = Lab::start()?;
    lab.wait_health(&["healthy", "healthy"], Duration::from_secs(15))?;
    let wl = lab.topo.site(1).wl_ns.clone();
    let mut outages = Vec::new();
    for k in 0..kills {
        let tag = format!("k{k}");
        let stop = Arc::new(AtomicBool::new(false));
        let port = 43000 + u16::try_from(k % 1000).unwrap_or(0);
        let sender = egress_lab::stream(
            &wl,
            format!("100.64.1.2:{port}").parse()?,
            &tag,
            stop.clone(),
        );
        std::thread::sleep(Duration::from_millis(700));
        {
            let gw = lab.gateways[1].as_mut().context("gateway A")?;
            gw.process().signal(libc::SIGKILL);
            gw.process()
                .wait_timeout(Duration::from_secs(5))?
                .context("gateway A survived SIGKILL")?;
        }
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
        isthmus_e2e::netns::join(sender)?;
        std::thread::sleep(Duration::from_millis(200));
        let outage = egress_lab::outage(&lab.received(&format!("{tag}:")));
        eprintln!(
            "isthmus-mesh-bench: egress kill {}/{kills}: outage {outage:?}",
            k + 1
        );
        outages.push(outage);
        let (run, site) = (lab.topo.run(), lab.topo.site(2).clone());
        lab.gateways[1] = Some(isthmus_e2e::IsthmusGateway::start(
            run,
            &site.gw_ns,
            &lab.keys[1],
            &lab.configs[1],
        )?);
        lab.wait_health(&["healthy", "healthy"], Duration::from_secs(15))?;
    }
    let mut ms: Vec<f64> = outages.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let p50 = ms.get(ms.len() / 2).copied().unwrap_or(0.0);
    let max = ms.last().copied().unwrap_or(0.0);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "kills": kills, "outage_ms": ms, "p50_ms": p50, "max_ms": max,
                "probe_interval_ms": 100, "probe_multiplier": 3,
            }))?
        );
    } else {
        println!("egress failover: {kills} kills of the active gateway, probes 100 ms x 3, stream every 5 ms");
        println!("outage p50 {p50:.0} ms, max {max:.0} ms (bound 1000 ms)");
        println!(
            "all (ms): {}",
            ms.iter()
                .map(|m| format!("{m:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
        Command::EgressFailover { kills, json } => egress_failover(kills, json)?,
        Command::Channels {
            peers,
            timeout,
            json,
        } => {
            let scale = ChannelScale::new()?;
            let mut opts = ScaleOptions::new(peers);
            opts.timeout = Duration::from_secs(timeout);
            let report = scale.round(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_table(&report);
            }
        }
        Command::Api(a) => run_api(a)?,
    }
    Ok(())
}
