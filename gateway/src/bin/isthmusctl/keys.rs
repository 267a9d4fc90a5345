//! `isthmusctl keys rotate`: a new WireGuard static key without a restart.

use std::time::{Duration, Instant};

use clap::Subcommand;
use isthmus_gateway::admin::{self, AdminError, Status};
use isthmus_gateway::mesh::KeyRotationStarted;
use serde::Serialize;

use crate::{Exit, Gateway, Output};

/// `isthmusctl keys ...`
#[derive(Subcommand, Debug)]
pub enum KeysCmd {
    /// Give the gateway a new WireGuard static key. The key is one per
    /// gateway, so every peer is concerned: it is accepted at once,
    /// announced to each peer over its mTLS channel, put in force when every
    /// peer has acknowledged it, and packets move to it peer by peer as soon
    /// as its session is up; the old key stays accepted for 9.5 minutes. No
    /// session is cut. Written to the interface's private_key_file, if any.
    /// Waits until packets to every peer go out under the new key (exit 0),
    /// or names the peers still behind (exit 2).
    Rotate {
        /// Every peer (the only choice: a WireGuard static key is one per
        /// gateway).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        gateway: Gateway,
        /// Seconds to wait for the new key to be in use.
        #[arg(long, value_name = "SECS", default_value_t = 20)]
        wait: u64,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Serialize, Debug)]
pub(crate) struct Outcome {
    /// The epoch in force before.
    pub from_epoch: Option<u64>,
    pub epoch: u64,
    pub public_key: String,
    /// The new key is the one in force.
    pub in_force: bool,
    /// Peers whose packets still go out under an older key, or that have
    /// not acknowledged the key yet.
    pub behind: Vec<String>,
}

impl Outcome {
    pub(crate) fn done(&self) -> bool {
        self.in_force && self.behind.is_empty()
    }
}

fn peer_label(p: &admin::PeerStatus) -> String {
    p.name
        .clone()
        .or_else(|| p.public_key.clone())
        .unwrap_or_default()
}

/// Where the rotation to `epoch` stands in `status`.
fn outcome(status: &Status, started: &KeyRotationStarted) -> Outcome {
    let in_force = status
        .wireguard_keys
        .iter()
        .any(|k| k.epoch == started.epoch && k.in_force);
    let mut behind: Vec<String> = status
        .key_rotation
        .as_ref()
        .map(|r| r.waiting_for.clone())
        .unwrap_or_default();
    // Peers with a session that still send under an older key.
    behind.extend(
        status
            .peers
            .iter()
            .filter(|p| p.kind == "wireguard" && p.last_handshake_secs_ago.is_some())
            .filter(|p| p.key_epoch.is_some_and(|e| e < started.epoch))
            .map(peer_label),
    );
    Outcome {
        from_epoch: None,
        epoch: started.epoch,
        public_key: started.public_key.clone(),
        in_force,
        behind,
    }
}

pub fn run(cmd: KeysCmd) -> anyhow::Result<()> {
    let KeysCmd::Rotate {
        all: _,
        gateway,
        wait,
        output,
    } = cmd;
    let path = gateway.target()?;
    let o = rotate(&path, Instant::now() + Duration::from_secs(wait))?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&o)?),
        Output::Table => {
            if o.done() {
                println!(
                    "WireGuard key epoch {} in force and in use toward every peer ({})",
                    o.epoch, o.public_key
                );
            } else if o.in_force {
                println!(
                    "WireGuard key epoch {} in force; still sending under an older key: {}",
                    o.epoch,
                    o.behind.join(", ")
                );
            } else {
                println!(
                    "WireGuard key epoch {} announced, not yet in force; waiting for: {}",
                    o.epoch,
                    o.behind.join(", ")
                );
            }
        }
    }
    if !o.done() {
        return Err(Exit(2).into());
    }
    Ok(())
}

/// Asks the gateway at `path` for a new WireGuard key and waits until it
/// is in force and in use toward every peer, or `deadline`.
pub(crate) fn rotate(
    path: &(impl admin::AdminEndpoint + ?Sized),
    deadline: Instant,
) -> anyhow::Result<Outcome> {
    let from_epoch = admin::fetch_status(path)?
        .wireguard_keys
        .iter()
        .find(|k| k.in_force)
        .map(|k| k.epoch);
    // The gateway refuses while a key two rotations old still carries
    // packets ("try again in a moment"): retry until the deadline.
    let started: KeyRotationStarted = loop {
        match admin::fetch(path, "keys-rotate") {
            Ok(s) => break s,
            Err(AdminError::Refused { message, .. })
                if message.contains("try again") && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    };
    loop {
        let status = admin::fetch_status(path)?;
        let mut o = outcome(&status, &started);
        o.from_epoch = from_epoch;
        if o.done() || Instant::now() >= deadline {
            return Ok(o);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
