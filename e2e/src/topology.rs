//! Multi-site topologies of network namespaces.
//!
//! ```text
//!  wl1 ──veth── gw1 ─┐                 wl1 = is<id>-w1   100.64.1.2/24 (default via .1)
//!                    ├─ underlay       gw1 = is<id>-g1   100.64.1.1/24, 192.0.2.1/24 | 2001:db8::1/64
//!  wl2 ──veth── gw2 ─┘                 (two sites: one veth; more: bridge namespace is<id>-ul)
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::run::Run;

/// Address family of the underlay network between the gateways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Underlay {
    /// `192.0.2.i/24`
    V4,
    /// `2001:db8::i/64`
    V6,
}

/// One site: a gateway namespace and a workload namespace behind it.
#[derive(Clone, Debug)]
pub struct Site {
    /// 1-based site number (the `i` of the address plan).
    pub index: usize,
    /// Name of the gateway namespace.
    pub gw_ns: String,
    /// Name of the workload namespace.
    pub wl_ns: String,
    /// The workload's address, `100.64.i.2`.
    pub workload_addr: Ipv4Addr,
    /// The gateway's address on the workload link, `100.64.i.1`.
    pub gw_lan_addr: Ipv4Addr,
    /// The workload prefix of the site, `100.64.i.0/24`.
    pub workload_prefix: String,
    /// The gateway's underlay address (of the family the topology was built with).
    pub underlay_addr: IpAddr,
    /// The underlay interface in the gateway namespace.
    pub underlay_if: String,
    /// The gateway's interface towards the workload.
    pub lan_if: String,
    /// The workload's interface towards the gateway.
    pub wl_if: String,
    /// A tunnel interface name reserved for this site's gateway (unique across runs).
    pub tunnel_if: String,
}

impl Site {
    /// The gateway's WireGuard endpoint on the underlay for `port`.
    pub fn endpoint(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.underlay_addr, port)
    }
}

/// A set of sites connected by an underlay. Dropping it kills all processes still in its
/// namespaces, deletes them (with every interface in them) and removes the run dir.
#[derive(Debug)]
pub struct Topology {
    /// Address family of the underlay.
    pub underlay: Underlay,
    sites: Vec<Site>,
    // Declared before `run` so that namespaces go before the run dir.
    namespaces: Vec<Netns>,
    run: Run,
}

impl Topology {
    /// Two sites joined by a direct veth underlay.
    pub fn two_sites(underlay: Underlay) -> Result<Self> {
        Self::new(2, underlay)
    }

    /// `n` sites (1..=200); two are joined by a direct veth, more by a bridge namespace.
    pub fn new(n: usize, underlay: Underlay) -> Result<Self> {
        if !(1..=200).contains(&n) {
            bail!("a topology has 1 to 200 sites, not {n}");
        }
        let run = Run::new()?;
        let mut topo = Topology {
            underlay,
            sites: Vec::new(),
            namespaces: Vec::new(),
            run,
        };
        topo.build(n)
            .with_context(|| format!("building topology {} ({n} sites)", topo.run.id()))?;
        Ok(topo)
    }

    fn add_ns(&mut self, name: String) -> Result<String> {
        let ns = Netns::new(&name)?;
        self.namespaces.push(ns);
        Ok(name)
    }

    fn build(&mut self, n: usize) -> Result<()> {
        let bridge_ns = if n > 2 {
            let name = self.add_ns(self.run.name("-ul"))?;
            crate::netns::ip(&name, &["link", "add", "br0", "type", "bridge"])?;
            crate::netns::ip(&name, &["link", "set", "br0", "up"])?;
            Some(name)
        } else {
            None
        };
        for i in 1..=n {
            let gw_ns = self.add_ns(self.run.name(&format!("-g{i}")))?;
            let wl_ns = self.add_ns(self.run.name(&format!("-w{i}")))?;
            crate::netns::exec(
                &gw_ns,
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                ],
            )?;
            let lan_if = self.run.ifname(&format!("l{i}"))?;
            let wl_if = self.run.ifname(&format!("w{i}"))?;
            let underlay_if = self.run.ifname(&format!("u{i}"))?;
            let tunnel_if = self.run.ifname(&format!("t{i}"))?;
            let workload_addr = Ipv4Addr::new(100, 64, i as u8, 2);
            let gw_lan_addr = Ipv4Addr::new(100, 64, i as u8, 1);

            // Workload link.
            crate::netns::ip(
                &gw_ns,
                &[
                    "link", "add", &lan_if, "type", "veth", "peer", "name", &wl_if, "netns", &wl_ns,
                ],
            )?;
            crate::netns::ip(
                &gw_ns,
                &["addr", "add", &format!("{gw_lan_addr}/24"), "dev", &lan_if],
            )?;
            crate::netns::ip(&gw_ns, &["link", "set", &lan_if, "up"])?;
            crate::netns::ip(
                &wl_ns,
                &["addr", "add", &format!("{workload_addr}/24"), "dev", &wl_if],
            )?;
            crate::netns::ip(&wl_ns, &["link", "set", &wl_if, "up"])?;
            crate::netns::ip(
                &wl_ns,
                &["route", "add", "default", "via", &gw_lan_addr.to_string()],
            )?;

            // Underlay link.
            if let Some(br) = &bridge_ns {
                let br_if = self.run.ifname(&format!("b{i}"))?;
                crate::netns::ip(
                    &gw_ns,
                    &[
                        "link",
                        "add",
                        &underlay_if,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        &br_if,
                        "netns",
                        br,
                    ],
                )?;
                crate::netns::ip(br, &["link", "set", &br_if, "master", "br0", "up"])?;
            } else if i == 2 {
                let peer = &self.sites[0];
                crate::netns::ip(
                    &peer.gw_ns,
                    &[
                        "link",
                        "add",
                        &peer.underlay_if,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        &underlay_if,
                        "netns",
                        &gw_ns,
                    ],
                )?;
            }
            let underlay_addr = match self.underlay {
                Underlay::V4 => IpAddr::V4(Ipv4Addr::new(192, 0, 2, i as u8)),
                Underlay::V6 => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16)),
            };
            self.sites.push(Site {
                index: i,
                gw_ns,
                wl_ns,
                workload_addr,
                gw_lan_addr,
                workload_prefix: format!("100.64.{i}.0/24"),
                underlay_addr,
                underlay_if,
                lan_if,
                wl_if,
                tunnel_if,
            });
        }
        // Address and raise the underlay interfaces once both ends of each veth exist.
        for site in &self.sites {
            if bridge_ns.is_none() && n == 1 {
                // A single site has no underlay link; nothing to configure.
                break;
            }
            let (addr, extra): (String, &[&str]) = match site.underlay_addr {
                IpAddr::V4(a) => (format!("{a}/24"), &[]),
                IpAddr::V6(a) => (format!("{a}/64"), &["nodad"]),
            };
            let mut args = vec![
                "addr",
                "add",
                addr.as_str(),
                "dev",
                site.underlay_if.as_str(),
            ];
            args.extend_from_slice(extra);
            crate::netns::ip(&site.gw_ns, &args)?;
            crate::netns::ip(&site.gw_ns, &["link", "set", &site.underlay_if, "up"])?;
        }
        Ok(())
    }

    /// All sites, in order (site 1 first).
    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    /// Site `i`, 1-based. Panics if there is no such site.
    pub fn site(&self, i: usize) -> &Site {
        assert!(
            i >= 1 && i <= self.sites.len(),
            "site {i} does not exist (1..={})",
            self.sites.len()
        );
        &self.sites[i - 1]
    }

    /// The run (id and temp dir) this topology belongs to.
    pub fn run(&self) -> &Run {
        &self.run
    }

    /// Names of all namespaces of the topology.
    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces
            .iter()
            .map(|n| n.name().to_string())
            .collect()
    }
}
