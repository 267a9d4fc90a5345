//! `isthmusctl sa rotate`: new ESP SA generations on demand.

use std::time::{Duration, Instant};

use clap::Subcommand;
use isthmus_gateway::admin::{self, SaRotation, Status};
use serde::Serialize;

use crate::{Exit, Gateway, Output};

/// `isthmusctl sa ...`
#[derive(Subcommand, Debug)]
pub enum SaCmd {
    /// Move ESP peers to a new SA generation now. The new inbound SA is
    /// installed at the peer before this gateway sends on it, so no packet is
    /// lost; it takes effect with the next packet to the peer. Waits until
    /// every peer asked uses it (exit 0), or reports the ones still waiting
    /// for traffic (exit 2).
    Rotate {
        /// The ESP peer (its `name`).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        peer: Option<String>,
        /// Every ESP peer of the gateway.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        gateway: Gateway,
        /// Seconds to wait for the new generation to be in use (0: do not wait).
        #[arg(long, value_name = "SECS", default_value_t = 10)]
        wait: u64,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Serialize)]
struct Rotated {
    peer: String,
    from_generation: u64,
    /// The generation in use when we stopped waiting.
    generation: u64,
    applied: bool,
}

fn generation_of(status: &Status, peer: &str) -> Option<u64> {
    status
        .peers
        .iter()
        .find(|p| {
            p.name.as_deref() == Some(peer)
                || (p.name.is_none() && p.endpoint.as_deref() == Some(peer))
        })
        .and_then(|p| p.esp.as_ref())
        .map(|e| e.outbound.generation)
}

pub fn run(cmd: SaCmd) -> anyhow::Result<()> {
    let SaCmd::Rotate {
        peer,
        all,
        gateway,
        wait,
        output,
    } = cmd;
    let path = gateway.target()?;
    let selector = if all {
        "*".to_string()
    } else {
        peer.unwrap_or_default()
    };
    if selector.is_empty() || selector.contains(char::is_whitespace) {
        anyhow::bail!("--peer: a peer name has no spaces and is not empty");
    }
    let asked: SaRotation = admin::fetch(&path, &format!("sa-rotate {selector}"))?;
    let deadline = Instant::now() + Duration::from_secs(wait);
    let mut done: Vec<Rotated> = asked
        .peers
        .iter()
        .map(|p| Rotated {
            peer: p.peer.clone(),
            from_generation: p.generation,
            generation: p.generation,
            applied: false,
        })
        .collect();
    loop {
        let status = admin::fetch_status(&path)?;
        for r in &mut done {
            if let Some(g) = generation_of(&status, &r.peer) {
                r.generation = g;
                r.applied = g > r.from_generation;
            }
        }
        if wait == 0 || done.iter().all(|r| r.applied) || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&done)?),
        Output::Table => {
            for r in &done {
                if r.applied {
                    println!(
                        "{}: generation {} -> {}",
                        r.peer, r.from_generation, r.generation
                    );
                } else {
                    println!(
                        "{}: generation {}, new one pending (used with the next packet to this peer)",
                        r.peer, r.generation
                    );
                }
            }
        }
    }
    if wait > 0 && !done.iter().all(|r| r.applied) {
        return Err(Exit(2).into());
    }
    Ok(())
}
