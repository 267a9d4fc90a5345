//! Egress gateways toward a firewalled endpoint, with HA (the lab is
//! `isthmus_e2e::egress_lab`): a selected workload gets through (seen with an
//! egress IP, never its own address), an unselected one does not; killing the
//! active egress gateway under a steady sequence-numbered stream moves it to
//! the other within the bound; a drained gateway keeps its existing flow and
//! new flows go to the other.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use isthmus_e2e::egress_lab::*;
use isthmus_e2e::{netns, IsthmusGateway};

#[test]
fn egress_gateway_selection_failover_and_drain() -> Result<()> {
    let mut lab = Lab::start()?;
    let wl = lab.topo.site(1).wl_ns.clone();
    let (a, b): (IpAddr, IpAddr) = (EGRESS_A.parse()?, EGRESS_B.parse()?);
    lab.wait_health(&["healthy", "healthy"], Duration::from_secs(15))?;

    // Selected gets through with the preferred gateway's egress IP; unselected does not.
    send_some(&wl, "100.64.1.2", "sel", 20)?;
    send_some(&wl, "100.64.1.3", "unsel", 20)?;
    std::thread::sleep(Duration::from_millis(500));
    let sel = lab.received("sel");
    assert!(
        sel.len() >= 18,
        "selected workload: only {} of 20 arrived",
        sel.len()
    );
    assert!(
        sel.iter().all(|(src, _, _)| *src == a),
        "selected traffic not from egress IP A: {sel:?}"
    );
    assert!(
        lab.received("unsel").is_empty(),
        "an unselected workload reached the endpoint"
    );
    // A workload behind the egress gateway itself is not selected either: it is
    // not translated to the egress IP (only tunnel traffic is), so the firewall
    // drops it.
    let local_wl = lab.topo.site(2).wl_ns.clone();
    send_some(&local_wl, "100.64.2.2", "behind-egress", 10)?;
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lab.received("behind-egress").is_empty(),
        "a workload behind the egress gateway left with its egress IP"
    );
    let all = lab.log.lock().expect("receive log").clone();
    assert!(
        all.iter().all(|(src, _, _)| *src == a || *src == b),
        "the endpoint saw a workload's own address: {all:?}"
    );

    // Failover: kill -9 the active gateway under a steady stream.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = stream(&wl, "100.64.1.2:41000".parse()?, "ha", stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let killed_at = Instant::now();
    {
        let gw2 = lab.gateways[1].as_mut().expect("gw2");
        gw2.process().signal(libc::SIGKILL);
        gw2.process()
            .wait_timeout(Duration::from_secs(5))?
            .context("gateway 2 survived SIGKILL")?;
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let sent = netns::join(sender)?;
    std::thread::sleep(Duration::from_millis(200));
    let ha = lab.received("ha");
    let mut by_seq: BTreeMap<u64, (IpAddr, Instant)> = BTreeMap::new();
    for (src, t, p) in &ha {
        if let Some(s) = seq_of(p) {
            by_seq.entry(s).or_insert((*src, *t));
        }
    }
    // The outage: the longest run of missing sequence numbers around the kill.
    let mut longest = 0u64;
    let mut prev: Option<u64> = None;
    for s in by_seq.keys() {
        if let Some(p) = prev {
            longest = longest.max(s - p - 1);
        }
        prev = Some(*s);
    }
    let outage = TICK * u32::try_from(longest).unwrap_or(u32::MAX);
    let last_a = by_seq
        .values()
        .filter(|(src, _)| *src == a)
        .map(|(_, t)| *t)
        .max();
    let first_b = by_seq
        .values()
        .filter(|(src, _)| *src == b)
        .map(|(_, t)| *t)
        .min();
    eprintln!(
        "egress failover: sent {sent}, received {}, longest gap {longest} x {TICK:?} = {outage:?}; \
         last via A {:?} after the kill, first via B {:?} after the kill",
        by_seq.len(),
        last_a.map(|t| t.checked_duration_since(killed_at)),
        first_b.map(|t| t.checked_duration_since(killed_at)),
    );
    assert!(first_b.is_some(), "the stream never moved to gateway B");
    assert!(
        outage < OUTAGE_BOUND,
        "egress outage {outage:?} is over {OUTAGE_BOUND:?}"
    );
    lab.wait_health(&["down", "healthy"], Duration::from_secs(2))?;

    // Gateway 2 comes back; then it drains: its flow stays, a new flow goes to B.
    let (run, site2) = (lab.topo.run(), lab.topo.site(2).clone());
    lab.gateways[1] = Some(IsthmusGateway::start(
        run,
        &site2.gw_ns,
        &lab.keys[1],
        &lab.configs[1],
    )?);
    lab.wait_health(&["healthy", "healthy"], Duration::from_secs(15))?;
    let stop = Arc::new(AtomicBool::new(false));
    let pinned = stream(&wl, "100.64.1.2:42000".parse()?, "pinned", stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let out = isthmus_e2e::isthmus::isthmusctl(&[
        "egress",
        "drain",
        "--socket",
        &lab.gw(2).admin_socket.to_string_lossy(),
    ])?;
    assert!(
        out.status.success(),
        "isthmusctl egress drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.wait_health(&["draining", "healthy"], Duration::from_secs(2))?;
    let drained_at = Instant::now();
    send_some(&wl, "100.64.1.2", "newflow", 20)?;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    netns::join(pinned)?;
    std::thread::sleep(Duration::from_millis(200));
    let pinned_after: Vec<IpAddr> = lab
        .received("pinned")
        .into_iter()
        .filter(|(_, t, _)| *t > drained_at)
        .map(|(src, _, _)| src)
        .collect();
    assert!(
        !pinned_after.is_empty(),
        "the pinned flow stopped during the drain"
    );
    assert!(
        pinned_after.iter().all(|s| *s == a),
        "the existing flow left the draining gateway"
    );
    let new_flow = lab.received("newflow");
    assert!(
        new_flow.len() >= 18,
        "new flow during drain: {} of 20 arrived",
        new_flow.len()
    );
    assert!(
        new_flow.iter().all(|(s, _, _)| *s == b),
        "a new flow went to the draining gateway"
    );
    Ok(())
}
