//! `isthmus-ike-bench`: IKE SA setups per second with Isthmus as the responder (the gateway
//! running IKEv2 itself, `[peers.esp.ike]`) and with strongSwan's charon as the responder,
//! side by side in one run, the same initiator for both (Isthmus's IKEv2 library, from the
//! other site). Each setup is a whole IKE_SA_INIT + IKE_AUTH exchange (Curve25519,
//! AES-256-GCM, pre-shared key) with its CHILD_SA; setups run one after the other, each
//! replacing the one before (INITIAL_CONTACT), so the figure is setups per second of one
//! peer, latency included. charon logs at its default level here (the tests' level 4
//! prints keys and costs time).
//!
//! ```text
//! isthmus-ike-bench [--setups 200] [--runs 3] [--json]
//! ```
//! Needs root. Compare the ratio; absolute numbers drift between machines.

use std::net::UdpSocket;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use isthmus_e2e::strongswan::{self, Charon};
use isthmus_e2e::{netns, Topology, Underlay};

#[derive(Debug, Parser)]
#[command(name = "isthmus-ike-bench")]
struct Args {
    /// IKE SAs set up per run.
    #[arg(long, default_value_t = 200)]
    setups: u32,
    /// Runs per responder; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

const PSK: &str = "ike-bench-psk-4f1e8d2c7b6a5e3d9c0b1a2f";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Responder {
    Isthmus,
    Strongswan,
}

impl Responder {
    fn label(self) -> &'static str {
        match self {
            Responder::Isthmus => "isthmus",
            Responder::Strongswan => "strongswan",
        }
    }
}

/// One run: a fresh topology, the responder at site 1, `setups` IKE SAs from site 2.
fn run(responder: Responder, setups: u32) -> Result<f64> {
    let topo = Topology::two_sites(Underlay::V4)?;
    let (s1, s2) = (topo.site(1).clone(), topo.site(2).clone());
    // Declared before the topology goes: dropped first.
    let (_gateway, _charon) = match responder {
        Responder::Isthmus => (
            Some(strongswan::ike_gateway(
                &topo,
                &s1,
                &s2,
                "responder",
                PSK,
                0,
            )?),
            None,
        ),
        Responder::Strongswan => (
            None,
            Some(Charon::start_logging(
                topo.run(),
                &s1.gw_ns,
                "g1",
                "",
                &strongswan::psk_conf(&s1, &s2, PSK),
                1,
            )?),
        ),
    };
    netns::run_in(&s2.gw_ns.clone(), move || {
        let socket = UdpSocket::bind(s2.endpoint(4500)).context("binding 4500")?;
        socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        // One setup first: the responder is ready (and warm) when the clock starts.
        strongswan::setup_once(&socket, &s2, &s1, PSK, Duration::from_secs(10))?;
        let start = std::time::Instant::now();
        for n in 0..setups {
            strongswan::setup_once(&socket, &s2, &s1, PSK, Duration::from_secs(10))
                .with_context(|| format!("setup {n}"))?;
        }
        Ok(f64::from(setups) / start.elapsed().as_secs_f64())
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut results = Vec::new();
    for responder in [Responder::Isthmus, Responder::Strongswan] {
        let mut runs = Vec::new();
        for r in 1..=args.runs {
            let rate = run(responder, args.setups)
                .with_context(|| format!("{} run {r}", responder.label()))?;
            eprintln!(
                "isthmus-ike-bench: {} run {r}/{}: {rate:.0} setups/s",
                responder.label(),
                args.runs
            );
            runs.push(rate);
        }
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        results.push((responder, sorted[sorted.len() / 2], runs));
    }
    let ratio = results[0].1 / results[1].1;
    if args.json {
        let doc = serde_json::json!({
            "setups_per_run": args.setups,
            "results": results.iter().map(|(r, median, runs)| serde_json::json!({
                "responder": r.label(),
                "median_setups_per_s": median,
                "runs": runs,
            })).collect::<Vec<_>>(),
            "ratio_isthmus_over_strongswan": ratio,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "IKE SA setups per second (IKE_SA_INIT + IKE_AUTH + CHILD_SA, x25519, PSK), one \
             peer, {} setups x {} runs, median",
            args.setups, args.runs
        );
        for (r, median, runs) in &results {
            let shown: Vec<String> = runs.iter().map(|x| format!("{x:.0}")).collect();
            println!("{:<12} {median:>8.0}  runs {}", r.label(), shown.join(" "));
        }
        println!("isthmus / strongswan {ratio:>8.2}");
    }
    Ok(())
}
