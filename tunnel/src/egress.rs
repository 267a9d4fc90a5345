//! Egress policies in the data path: packets from selected sources to
//! firewalled destinations go to one of several egress gateways (WireGuard
//! peers), chosen per flow.
//!
//! The control plane (health probes through the tunnel) sets, per gateway,
//! whether it takes *new* flows (healthy) and whether it keeps *existing*
//! ones (healthy or draining). A flow (protocol, addresses, ports) stays
//! pinned to its gateway while that gateway keeps existing flows; otherwise
//! it moves to the first gateway, in preference order, that takes new flows.
//! With none, the packet is dropped and counted (fail closed).

use crate::prefix::{IpPrefix, PrefixTable};
use crate::PublicKey;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most flows one policy pins at a time; beyond, the oldest are forgotten
/// (they are re-chosen on their next packet).
pub const MAX_FLOWS: usize = 65_536;

/// One egress policy as the control plane configures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressPolicyConfig {
    /// Policy name (status, logs).
    pub name: String,
    /// Selected workload sources.
    pub sources: Vec<IpPrefix>,
    /// Firewalled destinations.
    pub destinations: Vec<IpPrefix>,
    /// The egress gateways' WireGuard keys, most preferred first.
    pub gateways: Vec<PublicKey>,
}

/// Per-gateway admission, set by the health prober.
#[derive(Debug, Default)]
struct Admission {
    new_flows: AtomicBool,
    existing: AtomicBool,
    packets: AtomicU64,
}

/// Flow identity: protocol, addresses, ports (0 when not TCP/UDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
}

impl FlowKey {
    /// The packet's source address.
    pub fn source(&self) -> IpAddr {
        self.src
    }

    /// Parses the flow of an IPv4/IPv6 packet; `None` if it does not parse.
    pub fn of(packet: &[u8]) -> Option<Self> {
        match packet.first()? >> 4 {
            4 => {
                let ihl = usize::from(packet.first()? & 0x0f) * 4;
                if ihl < 20 || packet.len() < ihl {
                    return None;
                }
                let proto = *packet.get(9)?;
                let src = IpAddr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?);
                let dst = IpAddr::from(<[u8; 4]>::try_from(packet.get(16..20)?).ok()?);
                // Fragments (the first one too: more-fragments set) use ports 0,
                // so every fragment of a datagram is one flow, on one gateway.
                let frag = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x3fff;
                let (sport, dport) = if frag == 0 && matches!(proto, 6 | 17) {
                    ports(packet.get(ihl..)?)
                } else {
                    (0, 0)
                };
                Some(Self {
                    proto,
                    src,
                    dst,
                    sport,
                    dport,
                })
            }
            6 => {
                let proto = *packet.get(6)?;
                let src = IpAddr::from(<[u8; 16]>::try_from(packet.get(8..24)?).ok()?);
                let dst = IpAddr::from(<[u8; 16]>::try_from(packet.get(24..40)?).ok()?);
                let (sport, dport) = if matches!(proto, 6 | 17) {
                    ports(packet.get(40..)?)
                } else {
                    (0, 0)
                };
                Some(Self {
                    proto,
                    src,
                    dst,
                    sport,
                    dport,
                })
            }
            _ => None,
        }
    }
}

fn ports(l4: &[u8]) -> (u16, u16) {
    match l4 {
        [a, b, c, d, ..] => (u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d])),
        _ => (0, 0),
    }
}

/// One policy in the data path.
#[derive(Debug)]
pub struct EgressPolicy {
    config: EgressPolicyConfig,
    sources: PrefixTable<()>,
    admission: Vec<Admission>,
    flows: Mutex<HashMap<FlowKey, (usize, Instant)>>,
    no_gateway: AtomicU64,
}

/// What [`EgressPolicy::pick`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Send to this gateway.
    Gateway(PublicKey),
    /// No gateway takes the flow: drop (counted).
    NoGateway,
}

/// Status of one gateway of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressGatewayStatus {
    /// Its key.
    pub public_key: PublicKey,
    /// Takes new flows.
    pub new_flows: bool,
    /// Keeps the flows pinned to it.
    pub existing: bool,
    /// Packets sent to it.
    pub packets: u64,
    /// Flows pinned to it now.
    pub flows: usize,
}

impl EgressPolicy {
    fn new(config: EgressPolicyConfig) -> Self {
        let mut sources = PrefixTable::new();
        for p in &config.sources {
            sources.insert(*p, ());
        }
        let admission = config
            .gateways
            .iter()
            .map(|_| Admission::default())
            .collect();
        Self {
            config,
            sources,
            admission,
            flows: Mutex::new(HashMap::new()),
            no_gateway: AtomicU64::new(0),
        }
    }

    /// The policy's configuration.
    pub fn config(&self) -> &EgressPolicyConfig {
        &self.config
    }

    /// Whether the policy selects packets from `src`.
    pub fn selects(&self, src: IpAddr) -> bool {
        self.sources.lookup(src).is_some()
    }

    /// Sets what gateway `index` accepts (from the health prober).
    pub fn set_admission(&self, index: usize, new_flows: bool, existing: bool) {
        if let Some(a) = self.admission.get(index) {
            a.new_flows.store(new_flows, Ordering::Relaxed);
            a.existing.store(existing, Ordering::Relaxed);
        }
    }

    /// Chooses the gateway for `packet` (a packet this policy selects).
    pub fn pick(&self, packet: &[u8], now: Instant) -> Pick {
        let Some(flow) = FlowKey::of(packet) else {
            self.no_gateway.fetch_add(1, Ordering::Relaxed);
            return Pick::NoGateway;
        };
        let mut flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((idx, seen)) = flows.get_mut(&flow) {
            if self.admission[*idx].existing.load(Ordering::Relaxed) {
                *seen = now;
                let idx = *idx;
                return self.chosen(idx);
            }
        }
        let Some(idx) = self
            .admission
            .iter()
            .position(|a| a.new_flows.load(Ordering::Relaxed))
        else {
            flows.remove(&flow);
            self.no_gateway.fetch_add(1, Ordering::Relaxed);
            return Pick::NoGateway;
        };
        // A full table pins no more flows (the flow still goes to the first
        // healthy gateway): no scan, and no pinned flow of another workload is
        // evicted. Idle flows age out (`expire`).
        if flows.len() >= MAX_FLOWS && !flows.contains_key(&flow) {
            drop(flows);
            return self.chosen(idx);
        }
        flows.insert(flow, (idx, now));
        self.chosen(idx)
    }

    fn chosen(&self, idx: usize) -> Pick {
        self.admission[idx].packets.fetch_add(1, Ordering::Relaxed);
        Pick::Gateway(self.config.gateways[idx])
    }

    /// Forgets flows idle for longer than `idle`.
    pub fn expire(&self, now: Instant, idle: Duration) {
        let mut flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        flows.retain(|_, (_, t)| now.saturating_duration_since(*t) < idle);
    }

    /// Packets dropped because no gateway took their flow.
    pub fn no_gateway_drops(&self) -> u64 {
        self.no_gateway.load(Ordering::Relaxed)
    }

    /// Per-gateway state and counters.
    pub fn gateways(&self) -> Vec<EgressGatewayStatus> {
        let flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        self.config
            .gateways
            .iter()
            .zip(&self.admission)
            .enumerate()
            .map(|(i, (key, a))| EgressGatewayStatus {
                public_key: *key,
                new_flows: a.new_flows.load(Ordering::Relaxed),
                existing: a.existing.load(Ordering::Relaxed),
                packets: a.packets.load(Ordering::Relaxed),
                flows: flows.values().filter(|(idx, _)| *idx == i).count(),
            })
            .collect()
    }
}

/// Every egress policy of a device, by destination.
#[derive(Debug, Default)]
pub struct EgressTable {
    by_destination: PrefixTable<Arc<EgressPolicy>>,
    policies: Vec<Arc<EgressPolicy>>,
}

/// Why an egress table was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EgressError {
    /// Two policies claim one destination prefix.
    #[error("egress destination {0} is in two policies")]
    DuplicateDestination(IpPrefix),
    /// A policy has no gateway.
    #[error("egress policy {0} has no gateway")]
    NoGateway(String),
}

impl EgressTable {
    /// Builds the table.
    pub fn new(configs: Vec<EgressPolicyConfig>) -> Result<Self, EgressError> {
        let mut table = Self::default();
        for cfg in configs {
            if cfg.gateways.is_empty() {
                return Err(EgressError::NoGateway(cfg.name));
            }
            let policy = Arc::new(EgressPolicy::new(cfg));
            for d in &policy.config.destinations {
                if table.by_destination.insert(*d, policy.clone()).is_some() {
                    return Err(EgressError::DuplicateDestination(*d));
                }
            }
            table.policies.push(policy);
        }
        Ok(table)
    }

    /// The policies.
    pub fn policies(&self) -> &[Arc<EgressPolicy>] {
        &self.policies
    }

    /// Whether the table is empty (the data path then skips it).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policy that selects a packet from `src` to `dst`, if any.
    pub fn select(&self, src: IpAddr, dst: IpAddr) -> Option<&Arc<EgressPolicy>> {
        self.by_destination.lookup(dst).filter(|p| p.selects(src))
    }

    /// Whether `packet`, decrypted from gateway `key`, is a firewalled
    /// endpoint's reply to a flow this device sent through that gateway: its
    /// source is a destination of a policy `key` serves, its destination a
    /// source that policy selects, and the reversed flow is pinned to `key`
    /// now. Anything else from an egress gateway with a source outside its
    /// allowed prefixes is refused (an unsolicited packet, a spoofed source).
    pub fn allows_reply(&self, packet: &[u8], key: &PublicKey) -> bool {
        let Some(f) = FlowKey::of(packet) else {
            return false;
        };
        let Some(policy) = self.by_destination.lookup(f.src) else {
            return false;
        };
        let Some(idx) = policy.config.gateways.iter().position(|g| g == key) else {
            return false;
        };
        if !policy.selects(f.dst) {
            return false;
        }
        let forward = FlowKey {
            proto: f.proto,
            src: f.dst,
            dst: f.src,
            sport: f.dport,
            dport: f.sport,
        };
        let flows = policy.flows.lock().unwrap_or_else(|e| e.into_inner());
        flows.get(&forward).is_some_and(|(i, _)| *i == idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PublicKey {
        PublicKey([b; 32])
    }

    fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    fn policy() -> EgressTable {
        EgressTable::new(vec![EgressPolicyConfig {
            name: "partner".into(),
            sources: vec!["10.0.1.2/32".parse().unwrap()],
            destinations: vec!["203.0.113.0/24".parse().unwrap()],
            gateways: vec![key(1), key(2)],
        }])
        .unwrap()
    }

    #[test]
    fn selection_needs_source_and_destination() {
        let t = policy();
        let src: IpAddr = "10.0.1.2".parse().unwrap();
        assert!(t.select(src, "203.0.113.9".parse().unwrap()).is_some());
        assert!(t
            .select("10.0.1.3".parse().unwrap(), "203.0.113.9".parse().unwrap())
            .is_none());
        assert!(t.select(src, "198.51.100.1".parse().unwrap()).is_none());
    }

    #[test]
    fn only_replies_to_a_flow_pinned_to_that_gateway_are_accepted() {
        let t = policy();
        let p = &t.policies()[0];
        let now = Instant::now();
        p.set_admission(0, true, true);
        p.set_admission(1, true, true);
        let reply = udp4([203, 0, 113, 9], [10, 0, 1, 2], 443, 4000);
        // Unsolicited: no flow was sent, so nothing comes back in.
        assert!(!t.allows_reply(&reply, &key(1)));
        assert_eq!(
            p.pick(&udp4([10, 0, 1, 2], [203, 0, 113, 9], 4000, 443), now),
            Pick::Gateway(key(1))
        );
        assert!(t.allows_reply(&reply, &key(1)));
        // The other gateway, another port, or another (unselected) workload: refused.
        assert!(!t.allows_reply(&reply, &key(2)));
        assert!(!t.allows_reply(&udp4([203, 0, 113, 9], [10, 0, 1, 2], 443, 4001), &key(1)));
        assert!(!t.allows_reply(&udp4([203, 0, 113, 9], [10, 0, 1, 3], 443, 4000), &key(1)));
        // A source outside the policy's destinations: refused.
        assert!(!t.allows_reply(&udp4([198, 51, 100, 1], [10, 0, 1, 2], 443, 4000), &key(1)));
        assert!(!t.allows_reply(b"garbage", &key(1)));
    }

    #[test]
    fn a_full_flow_table_evicts_nothing() {
        let t = policy();
        let p = &t.policies()[0];
        let now = Instant::now();
        p.set_admission(0, true, true);
        p.set_admission(1, true, true);
        let first = udp4([10, 0, 1, 2], [203, 0, 113, 9], 1, 443);
        assert_eq!(p.pick(&first, now), Pick::Gateway(key(1)));
        // Drain gateway 1 so new flows go to 2, then fill the table.
        p.set_admission(0, false, true);
        let mut n = 1;
        'fill: for sport in 2..=u16::MAX {
            for dport in [443u16, 444] {
                if n >= MAX_FLOWS {
                    break 'fill;
                }
                p.pick(&udp4([10, 0, 1, 2], [203, 0, 113, 9], sport, dport), now);
                n += 1;
            }
        }
        let extra = udp4([10, 0, 1, 2], [203, 0, 113, 10], 9, 9);
        assert_eq!(p.pick(&extra, now), Pick::Gateway(key(2)));
        // The first flow is still pinned to the draining gateway.
        assert_eq!(p.pick(&first, now), Pick::Gateway(key(1)));
        let total: usize = p.gateways().iter().map(|g| g.flows).sum();
        assert_eq!(total, MAX_FLOWS);
    }

    #[test]
    fn no_healthy_gateway_drops_and_counts() {
        let t = policy();
        let p = &t.policies()[0];
        let pkt = udp4([10, 0, 1, 2], [203, 0, 113, 9], 4000, 443);
        assert_eq!(p.pick(&pkt, Instant::now()), Pick::NoGateway);
        assert_eq!(p.no_gateway_drops(), 1);
        assert_eq!(p.pick(b"\x00garbage", Instant::now()), Pick::NoGateway);
    }

    #[test]
    fn flows_stay_pinned_while_their_gateway_keeps_them_and_move_when_it_fails() {
        let t = policy();
        let p = &t.policies()[0];
        let now = Instant::now();
        p.set_admission(0, true, true);
        p.set_admission(1, true, true);
        let f1 = udp4([10, 0, 1, 2], [203, 0, 113, 9], 4000, 443);
        let f2 = udp4([10, 0, 1, 2], [203, 0, 113, 9], 4001, 443);
        assert_eq!(p.pick(&f1, now), Pick::Gateway(key(1)));
        // Drain gateway 1: its flow stays, a new flow goes to gateway 2.
        p.set_admission(0, false, true);
        assert_eq!(p.pick(&f1, now), Pick::Gateway(key(1)));
        assert_eq!(p.pick(&f2, now), Pick::Gateway(key(2)));
        // Gateway 1 comes back: f2 stays on 2 (pinned), a new flow prefers 1.
        p.set_admission(0, true, true);
        assert_eq!(p.pick(&f2, now), Pick::Gateway(key(2)));
        let f3 = udp4([10, 0, 1, 2], [203, 0, 113, 9], 4002, 443);
        assert_eq!(p.pick(&f3, now), Pick::Gateway(key(1)));
        // Gateway 2 fails: f2 moves to 1.
        p.set_admission(1, false, false);
        assert_eq!(p.pick(&f2, now), Pick::Gateway(key(1)));
        let st = p.gateways();
        assert_eq!(st[0].flows, 3);
        assert_eq!(st[1].flows, 0);
        // Idle flows are forgotten.
        p.expire(now + Duration::from_secs(120), Duration::from_secs(60));
        assert_eq!(p.gateways()[0].flows, 0);
    }

    #[test]
    fn flow_keys_parse_v4_v6_and_refuse_garbage() {
        let k = FlowKey::of(&udp4([10, 0, 1, 2], [203, 0, 113, 9], 4000, 443)).unwrap();
        assert_eq!((k.proto, k.sport, k.dport), (17, 4000, 443));
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[6] = 6;
        v6[40..42].copy_from_slice(&1234u16.to_be_bytes());
        v6[42..44].copy_from_slice(&80u16.to_be_bytes());
        let k = FlowKey::of(&v6).unwrap();
        assert_eq!((k.proto, k.sport, k.dport), (6, 1234, 80));
        assert!(FlowKey::of(&[]).is_none());
        assert!(FlowKey::of(&[0x45, 0, 0]).is_none());
        assert!(FlowKey::of(&[0x4f; 10]).is_none());
        for len in 0..64 {
            let _ = FlowKey::of(&vec![0x46; len]);
            let _ = FlowKey::of(&vec![0x60; len]);
        }
    }

    #[test]
    fn all_fragments_of_a_datagram_are_one_flow() {
        let mut first = udp4([10, 0, 1, 2], [203, 0, 113, 9], 4000, 443);
        first[6] = 0x20; // more fragments, offset 0
        let mut later = udp4([10, 0, 1, 2], [203, 0, 113, 9], 0, 0);
        later[6] = 0x00;
        later[7] = 0xb9; // offset 185 (x 8 bytes), last fragment
        assert_eq!(FlowKey::of(&first), FlowKey::of(&later));
        let whole = udp4([10, 0, 1, 2], [203, 0, 113, 9], 4000, 443);
        assert_ne!(FlowKey::of(&whole), FlowKey::of(&first));
    }

    #[test]
    fn a_destination_in_two_policies_is_refused() {
        let cfg = EgressPolicyConfig {
            name: "a".into(),
            sources: vec![],
            destinations: vec!["203.0.113.0/24".parse().unwrap()],
            gateways: vec![key(1)],
        };
        let mut b = cfg.clone();
        b.name = "b".into();
        assert!(matches!(
            EgressTable::new(vec![cfg.clone(), b]),
            Err(EgressError::DuplicateDestination(_))
        ));
        let mut none = cfg;
        none.gateways.clear();
        assert!(matches!(
            EgressTable::new(vec![none]),
            Err(EgressError::NoGateway(_))
        ));
    }
}
