//! `isthmusctl diagnose PEER`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use isthmus_gateway::admin;
use isthmus_gateway::diagnose::diagnose;

use crate::{Exit, Gateway, Output};

pub fn run(peer: &str, gateway: Gateway, wait: u64, output: Output) -> anyhow::Result<()> {
    let path = gateway.target()?;
    let window = Duration::from_secs(wait);
    let before = admin::fetch_status(&path)?;
    std::thread::sleep(window);
    let after = admin::fetch_status(&path)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let Some(d) = diagnose(&before, &after, peer, window, now) else {
        anyhow::bail!("no peer `{peer}` (give its name, SPIFFE ID or WireGuard public key)");
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&d)?),
        Output::Table => {
            println!("{}", d.summary);
            for c in &d.checks {
                println!(
                    "  [{}] {:<11} {}",
                    if c.ok { "ok" } else { "!!" },
                    c.name,
                    c.detail
                );
            }
        }
    }
    if !d.healthy {
        return Err(Exit(1).into());
    }
    Ok(())
}
