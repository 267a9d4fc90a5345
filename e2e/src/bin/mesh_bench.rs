//! `isthmus-mesh-bench`: scale checks of the mesh control plane against one real gateway.
//!
//! ```text
//! isthmus-mesh-bench channels [--peers 1000] [--json]
//! ```
//! `channels` starts one `isthmus-gateway` in a fresh network namespace with N peers
//! configured by identity and runs the N peer ends in this process (the channel library,
//! as tasks on its runtime); it reports the time until the gateway shows every mTLS
//! channel up, and the gateway's threads and resident memory before and after. The issue's
//! goal: 1,000 peers under 256 MiB and a few dozen threads. Needs root; a command, not a
//! timed test.

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use isthmus_e2e::channel_scale::{ChannelScale, ScaleOptions, ScaleReport};

/// Scale checks of the Isthmus mesh control plane.
#[derive(Debug, Parser)]
#[command(name = "isthmus-mesh-bench")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

fn main() -> Result<()> {
    let args = Args::parse();
    match args.command {
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
    }
    Ok(())
}
