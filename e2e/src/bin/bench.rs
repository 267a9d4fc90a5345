//! `isthmus-bench`: single-flow TCP throughput (iperf3) through Isthmus, wireguard-go and
//! boringtun-cli, each on its own fresh two-site IPv4 topology, side by side in one run.
//!
//! ```text
//! isthmus-bench [--seconds 10] [--runs 1] [--json] [--only isthmus,wireguard-go,boringtun-cli]
//! ```
//! Needs root. Absolute numbers drift between machines; compare the ratios.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use isthmus_e2e::mesh::{self, Implementation};
use isthmus_e2e::process::ProcessGuard;
use isthmus_e2e::{bins, netns, Topology, Underlay, UserspaceImpl};

/// Single-flow TCP throughput through Isthmus and reference WireGuard implementations.
#[derive(Debug, Parser)]
#[command(name = "isthmus-bench")]
struct Args {
    /// Length of each iperf3 run in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Runs per implementation; the median is reported.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Comma-separated subset of implementations to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "isthmus,wireguard-go,boringtun-cli"
    )]
    only: Vec<String>,
}

#[derive(Debug)]
struct Outcome {
    implementation: Implementation,
    /// Mbit/s of each run, or why it was skipped.
    result: Result<Vec<f64>, String>,
}

impl Outcome {
    fn median(&self) -> Option<f64> {
        let runs = self.result.as_ref().ok()?;
        median(runs)
    }
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

fn missing(implementation: Implementation) -> Option<String> {
    match implementation {
        Implementation::Isthmus => {
            let gw = bins::find("isthmus-gateway", bins::GATEWAY_ENV);
            let ctl = bins::find("isthmusctl", bins::CTL_ENV);
            (gw.is_none() || ctl.is_none()).then(|| {
                "isthmus-gateway/isthmusctl not found (run `cargo build --workspace --bins`)"
                    .to_string()
            })
        }
        Implementation::WireguardGo => UserspaceImpl::WireguardGo
            .find()
            .is_none()
            .then(|| "wireguard-go not installed (Debian package wireguard-go)".to_string()),
        Implementation::BoringtunCli => UserspaceImpl::BoringtunCli
            .find()
            .is_none()
            .then(|| "boringtun-cli not installed (cargo install boringtun-cli)".to_string()),
    }
    .or_else(|| {
        isthmus_e2e::cmd::which("iperf3")
            .is_none()
            .then(|| "iperf3 not installed".to_string())
    })
}

fn measure(implementation: Implementation, seconds: u32, runs: usize) -> Result<Vec<f64>> {
    let topo = Topology::two_sites(Underlay::V4)?;
    let _mesh = mesh::connected(&topo, &[implementation, implementation])?;
    let a = topo.site(1);
    let b = topo.site(2);
    let server_addr = b.workload_addr.to_string();
    let mut server = ProcessGuard::spawn(
        topo.run(),
        "iperf3-server",
        Some(&b.wl_ns),
        "iperf3",
        &["-s", "-B", &server_addr, "-p", "5201", "--forceflush"],
        &[],
    )?;
    server.wait_for_output("Server listening", Duration::from_secs(10))?;
    let secs = seconds.to_string();
    let mut results = Vec::new();
    for run in 1..=runs {
        let out = netns::exec_output(
            &a.wl_ns,
            "iperf3",
            &[
                "-c",
                &server_addr,
                "-p",
                "5201",
                "-t",
                &secs,
                "-J",
                "--connect-timeout",
                "5000",
            ],
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("iperf3 output is not JSON: {text}"))?;
        if let Some(err) = json.get("error").and_then(|e| e.as_str()) {
            bail!("iperf3 run {run} failed: {err}\n{}", server.logs());
        }
        let bps = json
            .pointer("/end/sum_received/bits_per_second")
            .and_then(|v| v.as_f64())
            .with_context(|| {
                format!("no end.sum_received.bits_per_second in iperf3 output: {text}")
            })?;
        let mbps = bps / 1e6;
        eprintln!(
            "isthmus-bench: {} run {run}/{runs}: {mbps:.1} Mbit/s",
            implementation.label()
        );
        results.push(mbps);
        // Let the server get ready for the next client.
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(results)
}

fn parse_impl(s: &str) -> Result<Implementation> {
    Ok(match s.trim() {
        "isthmus" => Implementation::Isthmus,
        "wireguard-go" => Implementation::WireguardGo,
        "boringtun-cli" | "boringtun" => Implementation::BoringtunCli,
        other => bail!("unknown implementation {other:?} (isthmus, wireguard-go, boringtun-cli)"),
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 || args.seconds == 0 {
        bail!("--runs and --seconds must be at least 1");
    }
    let impls = args
        .only
        .iter()
        .map(|s| parse_impl(s))
        .collect::<Result<Vec<_>>>()?;
    let mut outcomes = Vec::new();
    for implementation in impls {
        let result = match missing(implementation) {
            Some(why) => {
                eprintln!("isthmus-bench: skipping {}: {why}", implementation.label());
                Err(format!("skipped: {why}"))
            }
            None => {
                eprintln!(
                    "isthmus-bench: measuring {} ({} x {} s)",
                    implementation.label(),
                    args.runs,
                    args.seconds
                );
                measure(implementation, args.seconds, args.runs).map_err(|e| {
                    eprintln!("isthmus-bench: {} failed: {e:#}", implementation.label());
                    format!("failed: {e:#}")
                })
            }
        };
        outcomes.push(Outcome {
            implementation,
            result,
        });
    }
    let get = |i: Implementation| {
        outcomes
            .iter()
            .find(|o| o.implementation == i)
            .and_then(Outcome::median)
    };
    let isthmus = get(Implementation::Isthmus);
    let ratio = |other: Option<f64>| match (isthmus, other) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let ratio_wg = ratio(get(Implementation::WireguardGo));
    let ratio_bt = ratio(get(Implementation::BoringtunCli));

    if args.json {
        let results: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|o| match &o.result {
                Ok(runs) => serde_json::json!({
                    "implementation": o.implementation.label(),
                    "runs_mbit_per_s": runs,
                    "median_mbit_per_s": o.median(),
                }),
                Err(why) => serde_json::json!({
                    "implementation": o.implementation.label(),
                    "error": why,
                }),
            })
            .collect();
        let doc = serde_json::json!({
            "seconds": args.seconds,
            "runs": args.runs,
            "results": results,
            "ratio_isthmus_over_wireguard_go": ratio_wg,
            "ratio_isthmus_over_boringtun_cli": ratio_bt,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "single-flow TCP (iperf3), two-site IPv4 topology, {} run(s) x {} s, median",
            args.runs, args.seconds
        );
        println!("{:<16} {:>14}  runs", "implementation", "Mbit/s");
        for o in &outcomes {
            match &o.result {
                Ok(runs) => println!(
                    "{:<16} {:>14.1}  {}",
                    o.implementation.label(),
                    o.median().unwrap_or(0.0),
                    runs.iter()
                        .map(|r| format!("{r:.1}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                Err(why) => println!("{:<16} {:>14}  {why}", o.implementation.label(), "-"),
            }
        }
        let show = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "n/a".into());
        println!("isthmus / wireguard-go:  {}", show(ratio_wg));
        println!("isthmus / boringtun-cli: {}", show(ratio_bt));
    }
    Ok(())
}
