//! `isthmusctl mesh rotate`: rotate what can be rotated on several gateways,
//! one after the other, and wait until each reports the new keys.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use isthmus_gateway::admin::{self, SaRotation, Status};
use isthmus_gateway::config::ADMIN_SOCKET_DIR;
use isthmus_identity::SpiffeId;
use serde::Serialize;

use crate::{Exit, Output};

/// What happened on one gateway.
#[derive(Serialize, Debug)]
struct GatewayRotation {
    gateway: String,
    identity: String,
    old_serial: Option<String>,
    new_serial: Option<String>,
    certificate_in_force: bool,
    /// WireGuard peers by identity whose channel was up before and is up again
    /// in a new session (under the new certificate), of those that were up.
    channels_renewed: (usize, usize),
    /// (peer, generation before, generation now)
    esp: Vec<(String, u64, u64)>,
    /// The WireGuard key, for a gateway with WireGuard peers by identity.
    wireguard_key: Option<crate::keys::Outcome>,
    done: bool,
}

/// An admin socket path (contains '/') or an interface name.
fn socket_of(gateway: &str) -> anyhow::Result<PathBuf> {
    if gateway.contains('/') {
        return Ok(PathBuf::from(gateway));
    }
    isthmus_gateway::config::validate_ifname(gateway)
        .map_err(|m| anyhow::anyhow!("--gateway {gateway}: {m}"))?;
    Ok(Path::new(ADMIN_SOCKET_DIR).join(format!("{gateway}.sock")))
}

fn esp_generations(s: &Status) -> Vec<(String, u64)> {
    s.peers
        .iter()
        .filter_map(|p| {
            let esp = p.esp.as_ref()?;
            Some((
                p.name
                    .clone()
                    .or_else(|| p.endpoint.clone())
                    .unwrap_or_default(),
                esp.outbound.generation,
            ))
        })
        .collect()
}

fn rotate_one(
    dir: &Path,
    gateway: &str,
    days: u32,
    wait: Duration,
) -> anyhow::Result<GatewayRotation> {
    let path = socket_of(gateway)?;
    let before = admin::fetch_status(&path)?;
    let reload = before
        .identity_reload
        .clone()
        .with_context(|| format!("{gateway}: no [identity] in its config: nothing to rotate"))?;
    let id: SpiffeId = reload
        .local_id
        .as_deref()
        .context("the gateway did not say its identity")?
        .parse()?;
    let gw = id
        .as_gateway()
        .with_context(|| format!("{id} is not a gateway identity"))?;
    let deadline = Instant::now() + wait;
    // A revoked gateway is refused, as `certs rotate` refuses it without --force.
    crate::certs::rotate_gateway(dir, gw.cluster.as_str(), gw.name.as_str(), days, false)?;
    let mut out = GatewayRotation {
        gateway: gateway.to_string(),
        identity: id.to_string(),
        old_serial: reload.certificate_serial.clone(),
        new_serial: None,
        certificate_in_force: false,
        channels_renewed: (0, 0),
        esp: Vec::new(),
        wireguard_key: None,
        done: false,
    };
    // The gateway reads the new files by itself.
    loop {
        let r = admin::fetch_status(&path)?
            .identity_reload
            .unwrap_or_default();
        if r.credential_reloads > reload.credential_reloads
            && r.certificate_serial != reload.certificate_serial
        {
            out.new_serial = r.certificate_serial;
            out.certificate_in_force = true;
            break;
        }
        if Instant::now() >= deadline {
            return Ok(out);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // It renews its WireGuard peers' channels under the new certificate: wait
    // for them, so that its peers hold it before anything else changes.
    let wg_up: Vec<String> = before
        .channels
        .iter()
        .filter(|c| c.kind == "wireguard" && c.state == "up")
        .map(|c| c.spiffe_id.clone())
        .collect();
    loop {
        let now = admin::fetch_status(&path)?;
        // Renewed: the live session is one made under the new certificate.
        let renewed = wg_up
            .iter()
            .filter(|id| {
                now.channels.iter().any(|c| {
                    c.spiffe_id == **id
                        && c.state == "up"
                        && c.local_serial.is_some()
                        && c.local_serial == out.new_serial
                })
            })
            .count();
        out.channels_renewed = (renewed, wg_up.len());
        if renewed == wg_up.len() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let esp_before = esp_generations(&before);
    if !esp_before.is_empty() {
        let asked: SaRotation = admin::fetch(&path, "sa-rotate *")?;
        loop {
            let now = esp_generations(&admin::fetch_status(&path)?);
            out.esp = asked
                .peers
                .iter()
                .map(|a| {
                    let g = now
                        .iter()
                        .find(|(n, _)| *n == a.peer)
                        .map_or(a.generation, |(_, g)| *g);
                    (a.peer.clone(), a.generation, g)
                })
                .collect();
            if out.esp.iter().all(|(_, from, to)| to > from) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let wireguard_by_identity =
        before.key_rotation.is_some() && before.channels.iter().any(|c| c.kind == "wireguard");
    if wireguard_by_identity {
        out.wireguard_key = Some(crate::keys::rotate(&path, deadline)?);
    }
    out.done = out.certificate_in_force
        && out.channels_renewed.0 == out.channels_renewed.1
        && out.esp.iter().all(|(_, from, to)| to > from)
        && out.wireguard_key.as_ref().is_none_or(|k| k.done());
    Ok(out)
}

pub fn run(
    dir: &Path,
    gateways: &[String],
    days: u32,
    wait: u64,
    output: Output,
) -> anyhow::Result<()> {
    if gateways.is_empty() {
        bail!("name the gateways to rotate with --gateway (interface name or admin socket path)");
    }
    let mut results = Vec::new();
    for (i, gateway) in gateways.iter().enumerate() {
        let r = rotate_one(dir, gateway, days, Duration::from_secs(wait))
            .with_context(|| format!("rotating {gateway}"))?;
        if let Output::Table = output {
            let esp: Vec<String> = r
                .esp
                .iter()
                .map(|(p, from, to)| format!("{p} {from}->{to}"))
                .collect();
            let wg = r.wireguard_key.as_ref().map_or(String::new(), |k| {
                format!(
                    "; WireGuard key epoch {} -> {}{}",
                    k.from_epoch.map_or("?".to_string(), |e| e.to_string()),
                    k.epoch,
                    if k.done() {
                        ""
                    } else {
                        " (not in use everywhere yet)"
                    }
                )
            });
            println!(
                "[{}/{}] {} ({}): certificate {} -> {}{}{}{}{}",
                i + 1,
                gateways.len(),
                r.gateway,
                r.identity,
                r.old_serial.as_deref().unwrap_or("?"),
                r.new_serial.as_deref().unwrap_or("(not in force yet)"),
                match r.channels_renewed {
                    (_, 0) => String::new(),
                    (n, m) if n == m => format!("; {m} channel(s) renewed"),
                    (n, m) => format!("; {n} of {m} channel(s) renewed"),
                },
                if esp.is_empty() {
                    String::new()
                } else {
                    format!("; ESP SAs {}", esp.join(", "))
                },
                wg,
                if r.done { "" } else { "  -- NOT DONE" }
            );
        }
        results.push(r);
    }
    let all = results.iter().all(|r| r.done);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&results)?),
        Output::Table => println!(
            "{}",
            if all {
                format!("all {} gateway(s) report the new keys", results.len())
            } else {
                "some gateways do not report the new keys yet (see above)".to_string()
            }
        ),
    }
    if !all {
        return Err(Exit(2).into());
    }
    Ok(())
}
