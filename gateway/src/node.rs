//! Node mode: transparent encryption of pod traffic between the nodes of one
//! cluster.
//!
//! Every node runs a gateway with `[node]` and `[steering]`. The other nodes
//! come from the nodes file (reloaded when it changes; a bad file is reported
//! and the last good list kept): each becomes an identity peer (tunnel keys over
//! the mTLS channel) whose allowed prefixes are its pod prefixes, with kernel
//! routes and steering entries into the tunnel. This node's own pod prefixes
//! are local steering entries (same-node traffic passes untouched).
//!
//! **Strict mode** (default): the cluster's whole pod space is steered into the
//! tunnel device and routed there, so pod traffic to a node without a usable
//! tunnel (unknown, left, not keyed yet) is dropped by the tunnel device and
//! counted, never sent in clear. The key channel runs between the nodes'
//! underlay addresses, outside the pod space, so it is never caught by it.

use crate::clustermesh::RouteSink;
use crate::config::{self, IdentityPeer, NodeConfig};
use crate::mesh::MeshLinks;
use isthmus_ebpf_redirect::netlink::{Netlink, Route, RouteKind, Rule};
use isthmus_ebpf_redirect::policy::{flush_own_routes, RTPROT_ISTHMUS};
use isthmus_ebpf_redirect::Steering;
use isthmus_identity::SpiffeId;
use isthmus_tunnel::IpPrefix;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Routing of node mode: a table of its own, consulted before the main table
/// for the whole pod space, so a CNI's routes (host-gw, overlay devices) never
/// carry pod traffic between nodes in clear, whether the packet was steered,
/// DNATed to a pod by kube-proxy after steering, or sent by the node itself.
///
/// - rule `to <own pod prefix> lookup main` (priority `P`): same-node traffic
///   and decrypted arrivals go to the local pods as before;
/// - rule `to <cluster prefix> lookup T` (priority `P + 1`);
/// - table `T`: each other node's pod prefix into the tunnel (route MTU = the
///   tunnel's); in strict mode also the cluster prefix into the tunnel (a
///   removed or unknown node's traffic reaches the device, which drops and
///   counts it) and a blackhole for the cluster prefix behind everything
///   (highest metric). The routes into the device vanish with it; the rules
///   and the blackhole do not: after a crash, or a stop in strict mode, pod
///   traffic between nodes is dropped, never routed in clear, until the
///   gateway is back (its start replaces them). Without strict mode, traffic
///   no node route covers falls through to the main table.
#[derive(Debug, Clone)]
pub struct NodeRouting {
    /// The tunnel device.
    pub dev: String,
    /// Route MTU (the tunnel device's).
    pub mtu: u16,
    /// Table `T`.
    pub table: u32,
    /// Priority `P` of the first rule.
    pub priority: u32,
    /// This node's pod prefixes.
    pub pod_prefixes: Vec<IpPrefix>,
    /// The cluster's pod space.
    pub cluster_prefixes: Vec<IpPrefix>,
    /// Strict mode.
    pub strict: bool,
    /// Steering entries follow the routes.
    pub steering: Option<Arc<Steering>>,
}

impl NodeRouting {
    fn rules(&self) -> Vec<Rule> {
        let rule = |priority, table, dst: &IpPrefix| Rule {
            v6: !dst.is_ipv4(),
            priority,
            table,
            fwmark: None,
            iif: None,
            src: None,
            dst: Some((dst.addr(), dst.len())),
        };
        self.pod_prefixes
            .iter()
            .map(|p| rule(self.priority, MAIN_TABLE, p))
            .chain(
                self.cluster_prefixes
                    .iter()
                    .map(|p| rule(self.priority + 1, self.table, p)),
            )
            .collect()
    }

    fn route(&self, prefix: &IpPrefix, kind: RouteKind, oif: Option<u32>, last: bool) -> Route {
        Route {
            dst: (prefix.addr(), prefix.len()),
            table: self.table,
            kind,
            oif,
            mtu: oif.map(|_| u32::from(self.mtu)),
            protocol: RTPROT_ISTHMUS,
            priority: last.then_some(u32::MAX),
        }
    }

    fn netlink(&self) -> Result<(Netlink, u32), String> {
        Netlink::open_for(&self.dev).map_err(|e| format!("tunnel device {}: {e}", self.dev))
    }

    /// Removes what an earlier run left (rules of these priorities, our routes
    /// in the table), then installs the rules and the cluster routes.
    pub fn install(&self) -> Result<(), String> {
        let (mut nl, index) = self.netlink()?;
        for v6 in [false, true] {
            for r in nl.rules(v6).unwrap_or_default() {
                if r.priority == self.priority || r.priority == self.priority + 1 {
                    let _ = nl.rule_delete(&r);
                }
            }
        }
        flush_own_routes(&mut nl, self.table);
        // Routes before rules. Strict mode: the cluster prefix into the tunnel,
        // and a blackhole behind it that outlives the device.
        if self.strict {
            for c in &self.cluster_prefixes {
                nl.route_replace(&self.route(c, RouteKind::Blackhole, None, true))
                    .map_err(|e| format!("blackhole for {c} in table {}: {e}", self.table))?;
                nl.route_replace(&self.route(c, RouteKind::Unicast, Some(index), false))
                    .map_err(|e| format!("routing {c} into {}: {e}", self.dev))?;
            }
        }
        for rule in self.rules() {
            nl.rule_add(&rule)
                .map_err(|e| format!("ip rule {rule:?}: {e}"))?;
        }
        Ok(())
    }

    /// Removes the rules and routes (a graceful stop without strict mode).
    pub fn uninstall(&self) {
        if let Ok(mut nl) = Netlink::open() {
            for rule in self.rules() {
                let _ = nl.rule_delete(&rule);
            }
            flush_own_routes(&mut nl, self.table);
        }
    }
}

/// The kernel's main routing table.
const MAIN_TABLE: u32 = 254;

impl RouteSink for NodeRouting {
    fn add(&self, prefix: &IpPrefix) -> Result<(), String> {
        let (mut nl, index) = self.netlink()?;
        nl.route_replace(&self.route(prefix, RouteKind::Unicast, Some(index), false))
            .map_err(|e| format!("routing {prefix}: {e}"))?;
        if let Some(s) = &self.steering {
            s.add_remote((prefix.addr(), prefix.len())).map_err(|e| {
                format!("steering {prefix} (routed into the tunnel all the same): {e}")
            })?;
        }
        Ok(())
    }

    fn remove(&self, prefix: &IpPrefix) -> Result<(), String> {
        // The node's own route goes: in strict mode the cluster prefix's route
        // then takes its traffic into the tunnel device, which has no peer for
        // it (dropped and counted); otherwise it follows the host's routes.
        let (mut nl, _) = self.netlink()?;
        nl.route_delete(&self.route(prefix, RouteKind::Unicast, None, false))
            .map_err(|e| format!("removing the route of {prefix}: {e}"))?;
        if let Some(s) = &self.steering {
            s.remove_remote((prefix.addr(), prefix.len()))
                .map_err(|e| format!("unsteering {prefix}: {e}"))?;
        }
        Ok(())
    }
}

/// How often the nodes file is checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_millis(500);

/// What `isthmusctl status` shows of node mode.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct NodeStatus {
    /// The nodes file.
    pub nodes_file: String,
    /// Whether strict mode is on.
    pub strict: bool,
    /// This node's pod prefixes.
    pub pod_prefixes: Vec<String>,
    /// The cluster's pod space.
    pub cluster_prefixes: Vec<String>,
    /// The other nodes in use (name or SPIFFE ID, pod prefixes).
    pub nodes: Vec<NodeEntry>,
    /// Why the last change of the nodes file was refused, if it was.
    pub last_error: Option<String>,
}

/// One other node.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct NodeEntry {
    /// Name from the nodes file.
    pub name: Option<String>,
    /// Its identity.
    pub spiffe_id: String,
    /// Its pod prefixes.
    pub pod_prefixes: Vec<String>,
}

struct Shared {
    nodes: Vec<IdentityPeer>,
    routed: BTreeSet<IpPrefix>,
    last_error: Option<String>,
}

/// The running node mode. Dropping it stops the reload thread.
pub struct NodeWatch {
    cfg: NodeConfig,
    routing: Arc<NodeRouting>,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for NodeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeWatch").finish_non_exhaustive()
    }
}

impl Drop for NodeWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Strict mode keeps the rules and the blackhole: stopped, the node
        // drops pod traffic to other nodes rather than route it in clear.
        if !self.cfg.strict {
            self.routing.uninstall();
        }
    }
}

/// File identity for change detection.
fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

impl NodeWatch {
    /// Sets up local and strict steering, applies the nodes read at start and
    /// starts watching the nodes file.
    pub fn start(
        cfg: NodeConfig,
        own: SpiffeId,
        links: Arc<MeshLinks>,
        routing: NodeRouting,
        steering: Arc<Steering>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        for p in &cfg.pod_prefixes {
            steering
                .add_local((p.addr(), p.len()))
                .with_context(|| format!("steering: local pod prefix {p}"))?;
        }
        routing
            .install()
            .map_err(|e| anyhow::anyhow!("node routing: {e}"))?;
        if cfg.strict {
            for p in &cfg.cluster_prefixes {
                steering
                    .add_remote((p.addr(), p.len()))
                    .with_context(|| format!("steering: cluster prefix {p} (strict mode)"))?;
            }
        }
        let routing = Arc::new(routing);
        let routes: Arc<dyn RouteSink> = routing.clone();
        let shared = Arc::new(Mutex::new(Shared {
            nodes: Vec::new(),
            routed: BTreeSet::new(),
            last_error: None,
        }));
        apply(&shared, cfg.nodes.clone(), &links, routes.as_ref());
        tracing::info!(
            nodes = cfg.nodes.len(),
            strict = cfg.strict,
            file = %cfg.nodes_file.display(),
            "node mode"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (cfg, shared, stop) = (cfg.clone(), shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("node-watch".into())
                .spawn(move || {
                    let mut seen = stamp(&cfg.nodes_file);
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(RELOAD_INTERVAL);
                        let now = stamp(&cfg.nodes_file);
                        if now == seen {
                            continue;
                        }
                        seen = now;
                        match config::load_nodes(&cfg, &own) {
                            Ok(nodes) => {
                                shared.lock().unwrap_or_else(|e| e.into_inner()).last_error = None;
                                apply(&shared, nodes, &links, routes.as_ref());
                            }
                            Err(e) => {
                                let msg = format!("{}: {}", e.field, e.message);
                                tracing::warn!(
                                    file = %cfg.nodes_file.display(),
                                    error = %msg,
                                    "nodes file refused; keeping the last good list"
                                );
                                shared.lock().unwrap_or_else(|e| e.into_inner()).last_error =
                                    Some(msg);
                            }
                        }
                    }
                })
                .context("starting the nodes-file watch")?
        };
        Ok(Self {
            cfg,
            routing,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Node mode's state.
    pub fn status(&self) -> NodeStatus {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        NodeStatus {
            nodes_file: self.cfg.nodes_file.display().to_string(),
            strict: self.cfg.strict,
            pod_prefixes: self
                .cfg
                .pod_prefixes
                .iter()
                .map(|p| p.to_string())
                .collect(),
            cluster_prefixes: self
                .cfg
                .cluster_prefixes
                .iter()
                .map(|p| p.to_string())
                .collect(),
            nodes: shared
                .nodes
                .iter()
                .map(|n| NodeEntry {
                    name: n.name.clone(),
                    spiffe_id: n.spiffe_id.to_string(),
                    pod_prefixes: n.allowed_prefixes.iter().map(|p| p.to_string()).collect(),
                })
                .collect(),
            last_error: shared.last_error.clone(),
        }
    }
}

/// Makes the node peers, routes and steering entries match `nodes`: new
/// routes first, then the peer set, then stale routes go (in strict mode the
/// cluster prefix keeps steering and routing them into the tunnel, where they
/// are dropped and counted).
fn apply(
    shared: &Mutex<Shared>,
    nodes: Vec<IdentityPeer>,
    links: &MeshLinks,
    routes: &dyn RouteSink,
) {
    let wanted: BTreeSet<IpPrefix> = nodes
        .iter()
        .flat_map(|n| n.allowed_prefixes.iter().copied())
        .collect();
    let mut shared = shared.lock().unwrap_or_else(|e| e.into_inner());
    for p in wanted.difference(&shared.routed.clone()) {
        match routes.add(p) {
            Ok(()) => {
                shared.routed.insert(*p);
            }
            Err(e) => tracing::warn!(prefix = %p, error = %e, "cannot route a node's pod prefix"),
        }
    }
    let changes = links.set_mesh_peers(nodes.clone());
    for p in shared.routed.clone().difference(&wanted) {
        if let Err(e) = routes.remove(p) {
            tracing::warn!(prefix = %p, error = %e, "cannot remove a node's route");
        }
        shared.routed.remove(p);
    }
    if !changes.added.is_empty() || !changes.removed.is_empty() || !changes.changed.is_empty() {
        tracing::info!(
            added = ?changes.added.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            removed = ?changes.removed.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            changed = ?changes.changed.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            "nodes changed"
        );
    }
    shared.nodes = nodes;
}
