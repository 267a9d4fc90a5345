//! The policy-routing backend, for hosts where BPF cannot load.
//!
//! An nftables table (`inet isthmus_<tunnel>`) holds one chain at prerouting:
//! a rule per remote prefix (and per egress source/destination pair) that
//! matches packets arriving on the workload interfaces, counts them, and sets
//! this gateway's fwmark bits. `ip rule fwmark/mask → table` (IPv4 and IPv6)
//! sends marked packets to a routing table whose default route leads into the
//! tunnel device, with a blackhole behind it: if the tunnel device is gone,
//! marked packets are dropped, never routed elsewhere.
//!
//! State left behind by a crashed run (same tunnel name) is removed at start.

use crate::netlink::{Netlink, Route, RouteKind, Rule};
use crate::{prefix_str, Count, Entry, EntryStatus, Mode, Prefix, SteerError};
use crate::{PolicyNumbers, SteeringConfig, SteeringStatus};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Route protocol number marking routes Isthmus installed.
pub const RTPROT_ISTHMUS: u8 = 0x49;

const CHAIN: &str = "steer";

/// nftables table name for a tunnel device.
pub fn table_name(tunnel: &str) -> String {
    let clean: String = tunnel
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("isthmus_{clean}")
}

fn nft_binary() -> Result<PathBuf, SteerError> {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            SteerError::Policy("nft (nftables) not found in /usr/sbin, /sbin or /usr/bin".into())
        })
}

/// Runs an nftables script (`nft -f -`, nft from /usr/sbin, /sbin or /usr/bin,
/// never looked up through PATH).
pub fn nft(script: &str) -> Result<(), SteerError> {
    run_nft(&nft_binary()?, script)
}

fn run_nft(bin: &std::path::Path, script: &str) -> Result<(), SteerError> {
    let mut child = Command::new(bin)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| SteerError::Policy(format!("running {}: {e}", bin.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| SteerError::Policy(format!("writing to nft: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| SteerError::Policy(format!("waiting for nft: {e}")))?;
    if !out.status.success() {
        return Err(SteerError::Policy(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Deletes every route Isthmus installed (protocol [`RTPROT_ISTHMUS`]) in
/// `table`, both families; errors (already gone) are ignored.
pub fn flush_own_routes(nl: &mut Netlink, table: u32) {
    for v6 in [false, true] {
        for r in nl.routes_in_table(v6, table).unwrap_or_default() {
            if r.protocol == RTPROT_ISTHMUS {
                let _ = nl.route_delete(&Route {
                    dst: r.dst,
                    table: r.table,
                    kind: r.kind,
                    oif: r.oif,
                    mtu: None,
                    protocol: r.protocol,
                    priority: r.priority,
                });
            }
        }
    }
}

/// The running fallback.
#[derive(Debug)]
pub struct PolicySteering {
    nft: PathBuf,
    table: String,
    tunnel: String,
    interfaces: Vec<String>,
    numbers: PolicyNumbers,
    remotes: BTreeSet<Prefix>,
    locals: BTreeSet<Prefix>,
    egress: BTreeMap<u32, (BTreeSet<Prefix>, BTreeSet<Prefix>)>,
    /// Steered packets counted by rules deleted since (kept in the total).
    retired: Count,
    /// Whether the IPv6 route and rule are in place; without them IPv6
    /// entries are refused (a marked packet must never fall through).
    v6: bool,
}

fn rules_of(n: &PolicyNumbers) -> [Rule; 2] {
    [false, true].map(|v6| Rule {
        v6,
        priority: n.priority,
        table: n.table,
        fwmark: Some((n.fwmark, n.mask)),
        iif: None,
        src: None,
        dst: None,
    })
}

fn routes_of(n: &PolicyNumbers, tun: u32) -> [Route; 4] {
    let any4: Prefix = (IpAddr::from([0u8; 4]), 0);
    let any6: Prefix = (IpAddr::from([0u8; 16]), 0);
    let route = |dst, kind, oif, metric_last: bool| Route {
        dst,
        table: n.table,
        kind,
        oif,
        mtu: None,
        protocol: RTPROT_ISTHMUS,
        priority: if metric_last { Some(u32::MAX) } else { None },
    };
    [
        route(any4, RouteKind::Unicast, Some(tun), false),
        route(any6, RouteKind::Unicast, Some(tun), false),
        route(any4, RouteKind::Blackhole, None, true),
        route(any6, RouteKind::Blackhole, None, true),
    ]
}

impl PolicySteering {
    /// Removes what a previous run with the same tunnel name left, then creates
    /// the table, chain, rules and routes.
    pub fn start(cfg: &SteeringConfig) -> Result<Self, SteerError> {
        let nft = nft_binary()?;
        let mut me = Self {
            nft,
            table: table_name(&cfg.tunnel),
            tunnel: cfg.tunnel.clone(),
            interfaces: cfg.interfaces.clone(),
            numbers: cfg.policy,
            remotes: BTreeSet::new(),
            locals: BTreeSet::new(),
            egress: BTreeMap::new(),
            retired: Count::default(),
            v6: true,
        };
        me.cleanup();
        for name in &cfg.interfaces {
            if name.contains('"') || name.contains('\\') {
                return Err(SteerError::Invalid(format!("bad interface name {name:?}")));
            }
        }
        let ifaces = cfg
            .interfaces
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let table = &me.table;
        me.nft_script(&format!(
            "table inet {table} {{\n\
             \tset ifaces {{ type ifname; elements = {{ {ifaces} }} }}\n\
             \tchain {CHAIN} {{\n\
             \t\ttype filter hook prerouting priority mangle; policy accept;\n\
             \t\tiifname @ifaces counter comment \"pass\"\n\
             \t}}\n\
             }}\n"
        ))?;
        let mut nl = Netlink::open()?;
        let tun = nl.link_index(&cfg.tunnel)?;
        for route in routes_of(&me.numbers, tun) {
            if let Err(e) = nl.route_replace(&route) {
                if route.dst.0.is_ipv6() {
                    tracing::warn!(
                        "policy routing: no IPv6 route into {} ({e}): IPv6 is not steered",
                        cfg.tunnel
                    );
                    me.v6 = false;
                    continue;
                }
                return Err(e.into());
            }
        }
        for rule in rules_of(&me.numbers) {
            if rule.v6 && !me.v6 {
                continue;
            }
            if let Err(e) = nl.rule_add(&rule) {
                if rule.v6 {
                    tracing::warn!("policy routing: no IPv6 rule ({e}): IPv6 is not steered");
                    me.v6 = false;
                    continue;
                }
                return Err(e.into());
            }
        }
        Ok(me)
    }

    /// Removes the table, rules and routes (ignoring what is already gone).
    fn cleanup(&self) {
        let _ = self.nft_script(&format!("delete table inet {}\n", self.table));
        if let Ok(mut nl) = Netlink::open() {
            for rule in rules_of(&self.numbers) {
                let _ = nl.rule_delete(&rule);
            }
            flush_own_routes(&mut nl, self.numbers.table);
        }
    }

    fn nft_script(&self, script: &str) -> Result<(), SteerError> {
        run_nft(&self.nft, script)
    }

    /// The chain's rules as (handle, comment, counter).
    fn rules(&self) -> Result<Vec<(u64, String, Count)>, SteerError> {
        let out = Command::new(&self.nft)
            .args(["-j", "list", "chain", "inet", &self.table, CHAIN])
            .output()
            .map_err(|e| SteerError::Policy(format!("running nft: {e}")))?;
        if !out.status.success() {
            return Err(SteerError::Policy(format!(
                "nft list chain: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| SteerError::Policy(format!("nft -j output: {e}")))?;
        let mut rules = Vec::new();
        for item in json["nftables"].as_array().into_iter().flatten() {
            let rule = &item["rule"];
            let (Some(handle), Some(comment)) = (rule["handle"].as_u64(), rule["comment"].as_str())
            else {
                continue;
            };
            let mut count = Count::default();
            for expr in rule["expr"].as_array().into_iter().flatten() {
                if let Some(c) = expr.get("counter") {
                    count.packets += c["packets"].as_u64().unwrap_or(0);
                    count.bytes += c["bytes"].as_u64().unwrap_or(0);
                }
            }
            rules.push((handle, comment.to_string(), count));
        }
        Ok(rules)
    }

    fn find(&self, comment: &str) -> Result<Option<(u64, Count)>, SteerError> {
        Ok(self
            .rules()?
            .into_iter()
            .find(|(_, c, _)| c == comment)
            .map(|(h, _, count)| (h, count)))
    }

    fn handle_of(&self, comment: &str) -> Result<Option<u64>, SteerError> {
        Ok(self.find(comment)?.map(|(h, _)| h))
    }

    fn mark_stmt(&self) -> String {
        let n = &self.numbers;
        format!(
            "counter meta mark set meta mark & {:#x} | {:#x} accept",
            !n.mask,
            n.fwmark & n.mask
        )
    }

    fn family(addr: &IpAddr) -> &'static str {
        if addr.is_ipv4() {
            "ip"
        } else {
            "ip6"
        }
    }

    fn remote_comment(p: Prefix) -> String {
        format!("remote {}", prefix_str(p))
    }

    fn egress_comment(policy: u32, src: Prefix, dst: Prefix) -> String {
        format!("egress {policy} {} {}", prefix_str(src), prefix_str(dst))
    }

    fn check_family(&self, prefix: Prefix) -> Result<(), SteerError> {
        if prefix.0.is_ipv6() && !self.v6 {
            return Err(SteerError::Policy(format!(
                "{}: IPv6 policy routing could not be set up on this host",
                prefix_str(prefix)
            )));
        }
        Ok(())
    }

    pub(crate) fn add_remote(&mut self, prefix: Prefix) -> Result<(), SteerError> {
        self.check_family(prefix)?;
        if self.locals.contains(&prefix) {
            return Err(SteerError::Invalid(format!(
                "{} is a local prefix",
                prefix_str(prefix)
            )));
        }
        if self.remotes.contains(&prefix) {
            return Ok(());
        }
        let pass = self
            .handle_of("pass")?
            .ok_or_else(|| SteerError::Policy("the pass rule is missing from the chain".into()))?;
        let fam = Self::family(&prefix.0);
        self.nft_script(&format!(
            "insert rule inet {} {CHAIN} position {pass} iifname @ifaces {fam} daddr {} {} comment \"{}\"\n",
            self.table,
            prefix_str(prefix),
            self.mark_stmt(),
            Self::remote_comment(prefix)
        ))?;
        self.remotes.insert(prefix);
        Ok(())
    }

    pub(crate) fn add_local(&mut self, prefix: Prefix) -> Result<(), SteerError> {
        if self.remotes.contains(&prefix) {
            return Err(SteerError::Invalid(format!(
                "{} is a remote prefix",
                prefix_str(prefix)
            )));
        }
        if self.locals.contains(&prefix) {
            return Ok(());
        }
        // At the top of the chain: a local prefix wins over any steered one.
        let fam = Self::family(&prefix.0);
        self.nft_script(&format!(
            "insert rule inet {} {CHAIN} iifname @ifaces {fam} daddr {} counter accept comment \"local {}\"\n",
            self.table,
            prefix_str(prefix),
            prefix_str(prefix)
        ))?;
        self.locals.insert(prefix);
        Ok(())
    }

    fn delete_comment(&mut self, comment: &str) -> Result<(), SteerError> {
        if let Some((handle, count)) = self.find(comment)? {
            self.nft_script(&format!(
                "delete rule inet {} {CHAIN} handle {handle}\n",
                self.table
            ))?;
            // The verdict total keeps what this rule steered.
            self.retired.packets += count.packets;
            self.retired.bytes += count.bytes;
        }
        Ok(())
    }

    pub(crate) fn remove_remote(&mut self, prefix: Prefix) -> Result<(), SteerError> {
        if !self.remotes.contains(&prefix) {
            return Ok(());
        }
        self.delete_comment(&Self::remote_comment(prefix))?;
        self.remotes.remove(&prefix);
        Ok(())
    }

    pub(crate) fn remotes(&self) -> Vec<Prefix> {
        self.remotes.iter().copied().collect()
    }

    pub(crate) fn set_egress(
        &mut self,
        policy: u32,
        sources: &[Prefix],
        destinations: &[Prefix],
    ) -> Result<(), SteerError> {
        for p in sources.iter().chain(destinations) {
            self.check_family(*p)?;
        }
        let sources: BTreeSet<Prefix> = sources.iter().copied().collect();
        let destinations: BTreeSet<Prefix> = destinations.iter().copied().collect();
        for (other, (_, d)) in &self.egress {
            if *other == policy {
                continue;
            }
            if let Some(dst) = destinations.iter().find(|x| d.contains(x)) {
                return Err(SteerError::Invalid(format!(
                    "egress destination {} already belongs to egress policy {other}",
                    prefix_str(*dst)
                )));
            }
        }
        let pairs = |s: &BTreeSet<Prefix>, d: &BTreeSet<Prefix>| -> BTreeSet<(Prefix, Prefix)> {
            s.iter()
                .flat_map(|src| d.iter().map(move |dst| (*src, *dst)))
                .filter(|(src, dst)| src.0.is_ipv4() == dst.0.is_ipv4())
                .collect()
        };
        let (old_s, old_d) = self.egress.get(&policy).cloned().unwrap_or_default();
        let old = pairs(&old_s, &old_d);
        let new = pairs(&sources, &destinations);
        let mut script = String::new();
        for (src, dst) in new.difference(&old) {
            let fam = Self::family(&src.0);
            script.push_str(&format!(
                "insert rule inet {} {CHAIN} iifname @ifaces {fam} saddr {} {fam} daddr {} {} comment \"{}\"\n",
                self.table,
                prefix_str(*src),
                prefix_str(*dst),
                self.mark_stmt(),
                Self::egress_comment(policy, *src, *dst)
            ));
        }
        if !script.is_empty() {
            self.nft_script(&script)?;
        }
        for (src, dst) in old.difference(&new) {
            self.delete_comment(&Self::egress_comment(policy, *src, *dst))?;
        }
        if sources.is_empty() && destinations.is_empty() {
            self.egress.remove(&policy);
        } else {
            self.egress.insert(policy, (sources, destinations));
        }
        Ok(())
    }

    pub(crate) fn status(&self) -> SteeringStatus {
        let rules = self.rules().unwrap_or_default();
        let mut passed = Count::default();
        let mut redirected = self.retired;
        let mut by_entry: BTreeMap<Entry, Count> = BTreeMap::new();
        for p in &self.remotes {
            by_entry.insert(
                Entry::Remote {
                    prefix: prefix_str(*p),
                },
                Count::default(),
            );
        }
        for p in &self.locals {
            by_entry.insert(
                Entry::Local {
                    prefix: prefix_str(*p),
                },
                Count::default(),
            );
        }
        for (policy, (sources, _)) in &self.egress {
            for s in sources {
                by_entry.insert(
                    Entry::Egress {
                        policy: *policy,
                        source: prefix_str(*s),
                    },
                    Count::default(),
                );
            }
        }
        for (_, comment, count) in rules {
            let mut words = comment.split_whitespace();
            let entry = match words.next() {
                Some("pass") => {
                    passed.packets += count.packets;
                    passed.bytes += count.bytes;
                    continue;
                }
                Some("remote") => words.next().map(|p| Entry::Remote {
                    prefix: p.to_string(),
                }),
                Some("local") => {
                    // Passed, not steered: counted as passed and on its entry.
                    if let Some(p) = words.next() {
                        let e = Entry::Local {
                            prefix: p.to_string(),
                        };
                        if let Some(c) = by_entry.get_mut(&e) {
                            *c = count;
                        }
                    }
                    passed.packets += count.packets;
                    passed.bytes += count.bytes;
                    continue;
                }
                Some("egress") => match (words.next().and_then(|p| p.parse().ok()), words.next()) {
                    (Some(policy), Some(src)) => Some(Entry::Egress {
                        policy,
                        source: src.to_string(),
                    }),
                    _ => None,
                },
                _ => None,
            };
            let Some(entry) = entry else { continue };
            redirected.packets += count.packets;
            redirected.bytes += count.bytes;
            if let Some(c) = by_entry.get_mut(&entry) {
                c.packets += count.packets;
                c.bytes += count.bytes;
            }
        }
        SteeringStatus {
            mode: Mode::Policy,
            tunnel: self.tunnel.clone(),
            interfaces: self.interfaces.clone(),
            redirected,
            passed,
            redirect_failed: Count::default(),
            malformed: Count::default(),
            too_big: Count::default(),
            entries: by_entry
                .into_iter()
                .map(|(entry, steered)| EntryStatus { entry, steered })
                .collect(),
        }
    }
}

impl Drop for PolicySteering {
    fn drop(&mut self) {
        self.cleanup();
    }
}
