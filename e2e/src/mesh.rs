//! A full mesh of tunnel endpoints over a [`Topology`]: one gateway per site, each peering with
//! every other site for that site's workload prefix.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::isthmus::{GatewayConfig, IsthmusGateway, PeerConfig};
use crate::keys::KeyPair;
use crate::topology::{Site, Topology};
use crate::traffic;
use crate::userspace_wg::{UserspaceImpl, UserspaceWg};
use crate::{TUNNEL_MTU, WG_PORT};

/// Which implementation runs a site's gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Implementation {
    /// `isthmus-gateway`.
    Isthmus,
    /// wireguard-go.
    WireguardGo,
    /// boringtun-cli.
    BoringtunCli,
}

impl Implementation {
    /// Human-readable name.
    pub fn label(self) -> &'static str {
        match self {
            Implementation::Isthmus => "isthmus",
            Implementation::WireguardGo => "wireguard-go",
            Implementation::BoringtunCli => "boringtun-cli",
        }
    }
}

/// A running gateway of any implementation.
#[derive(Debug)]
// A handful of these per test: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Node {
    /// `isthmus-gateway`.
    Isthmus(IsthmusGateway),
    /// wireguard-go or boringtun-cli.
    Userspace(UserspaceWg),
}

/// One gateway per site, fully meshed. Drop it before the topology (declare it after).
#[derive(Debug)]
pub struct Mesh {
    /// Gateways, site 1 first.
    pub nodes: Vec<Node>,
    /// Keys of each site, site 1 first.
    pub keys: Vec<KeyPair>,
    /// Peer configurations of each site, site 1 first.
    pub peers: Vec<Vec<PeerConfig>>,
}

/// The peer entries site `me` needs to reach every other site of `topo`.
pub fn peers_for(topo: &Topology, keys: &[KeyPair], me: usize) -> Vec<PeerConfig> {
    topo.sites()
        .iter()
        .filter(|s| s.index != me)
        .map(|s| PeerConfig {
            name: Some(format!("site-{}", s.index)),
            public_key: keys[s.index - 1].public.clone(),
            endpoint: Some(s.endpoint(WG_PORT).to_string()),
            allowed_prefixes: vec![s.workload_prefix.clone()],
            persistent_keepalive: None,
        })
        .collect()
}

/// The configuration [`Mesh::start`] gives an Isthmus gateway at `site`.
pub fn isthmus_config(site: &Site, peers: Vec<PeerConfig>) -> GatewayConfig {
    GatewayConfig {
        name: Some(site.tunnel_if.clone()),
        listen_port: Some(WG_PORT),
        mtu: Some(TUNNEL_MTU),
        peers,
        ..GatewayConfig::default()
    }
}

impl Mesh {
    /// Starts `impls[i]` at site `i + 1` for every site of `topo`.
    pub fn start(topo: &Topology, impls: &[Implementation]) -> Result<Self> {
        Self::start_with(topo, impls, &[])
    }

    /// Like [`Mesh::start`], but the sites listed in `passive` (1-based) get no peer endpoints:
    /// they cannot initiate and must learn their peers' endpoints from incoming handshakes.
    ///
    /// Reference implementations start first: Isthmus initiates a handshake as soon as it starts,
    /// and WireGuard then waits REKEY_TIMEOUT (5 s) before retrying if that one found nobody.
    pub fn start_with(
        topo: &Topology,
        impls: &[Implementation],
        passive: &[usize],
    ) -> Result<Self> {
        anyhow::ensure!(
            impls.len() == topo.sites().len(),
            "{} implementations for {} sites",
            impls.len(),
            topo.sites().len()
        );
        let keys = topo
            .sites()
            .iter()
            .map(|_| KeyPair::generate())
            .collect::<Result<Vec<_>>>()?;
        let peers: Vec<Vec<PeerConfig>> = topo
            .sites()
            .iter()
            .map(|site| {
                let mut p = peers_for(topo, &keys, site.index);
                if passive.contains(&site.index) {
                    for peer in &mut p {
                        peer.endpoint = None;
                    }
                }
                p
            })
            .collect();
        let mut nodes: Vec<Option<Node>> = topo.sites().iter().map(|_| None).collect();
        let mut order: Vec<usize> = (0..impls.len()).collect();
        order.sort_by_key(|&i| impls[i] == Implementation::Isthmus);
        for i in order {
            let site = &topo.sites()[i];
            let node = match impls[i] {
                Implementation::Isthmus => Node::Isthmus(IsthmusGateway::start(
                    topo.run(),
                    &site.gw_ns,
                    &keys[i],
                    &isthmus_config(site, peers[i].clone()),
                )?),
                imp @ (Implementation::WireguardGo | Implementation::BoringtunCli) => {
                    let kind = if imp == Implementation::WireguardGo {
                        UserspaceImpl::WireguardGo
                    } else {
                        UserspaceImpl::BoringtunCli
                    };
                    Node::Userspace(UserspaceWg::start(
                        topo.run(),
                        kind,
                        &site.gw_ns,
                        &site.tunnel_if,
                        &keys[i],
                        WG_PORT,
                        &peers[i],
                    )?)
                }
            };
            nodes[i] = Some(node);
        }
        Ok(Mesh {
            nodes: nodes.into_iter().flatten().collect(),
            keys,
            peers,
        })
    }

    /// The Isthmus gateway at site `i` (1-based); panics if that site runs something else.
    pub fn isthmus(&self, i: usize) -> &IsthmusGateway {
        match &self.nodes[i - 1] {
            Node::Isthmus(g) => g,
            Node::Userspace(u) => panic!("site {i} runs {:?}, not Isthmus", u.kind),
        }
    }

    /// Mutable [`Mesh::isthmus`].
    pub fn isthmus_mut(&mut self, i: usize) -> &mut IsthmusGateway {
        match &mut self.nodes[i - 1] {
            Node::Isthmus(g) => g,
            Node::Userspace(u) => panic!("site {i} runs {:?}, not Isthmus", u.kind),
        }
    }

    /// Public key of site `i` (1-based).
    pub fn public_key(&self, i: usize) -> &str {
        &self.keys[i - 1].public
    }

    /// Logs of every node, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| match n {
                Node::Isthmus(g) => g.logs(),
                Node::Userspace(u) => u.logs(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Pings from every workload to every other until each answers (handshakes happen on the
    /// first packets), within `timeout` per pair.
    pub fn wait_connected(&self, topo: &Topology, timeout: Duration) -> Result<()> {
        for a in topo.sites() {
            for b in topo.sites() {
                if a.index == b.index {
                    continue;
                }
                if !traffic::wait_for_ping(&a.wl_ns, b.workload_addr.into(), timeout) {
                    return Err(anyhow::anyhow!(
                        "workload {} ({}) cannot ping workload {} ({}) within {timeout:?}\n{}",
                        a.index,
                        a.workload_addr,
                        b.index,
                        b.workload_addr,
                        self.logs()
                    ))
                    .context("mesh not connected");
                }
            }
        }
        Ok(())
    }
}

/// Starts a mesh on `topo` and waits until all workloads reach each other.
pub fn connected(topo: &Topology, impls: &[Implementation]) -> Result<Mesh> {
    connected_with(topo, impls, &[])
}

/// [`connected`] with [`Mesh::start_with`]'s `passive` sites.
pub fn connected_with(
    topo: &Topology,
    impls: &[Implementation],
    passive: &[usize],
) -> Result<Mesh> {
    let mesh = Mesh::start_with(topo, impls, passive).context("starting mesh")?;
    mesh.wait_connected(topo, Duration::from_secs(10))?;
    Ok(mesh)
}
