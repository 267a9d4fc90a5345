//! Node mode on three node namespaces: every node runs a gateway with `[node]`
//! and `[steering]`, learns the other nodes from a shared nodes file, and
//! encrypts pod traffic between nodes without the pods knowing. A capture of
//! the node-to-node link shows only tunnel datagrams and the key channel;
//! same-node traffic is untouched; a node leaving (nodes file) makes strict
//! mode drop and count its traffic, nothing in clear; re-joining restores it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use isthmus_e2e::traffic::{self, ping_stats};
use isthmus_e2e::{
    netns, wait_for_ping, Capture, GatewayConfig, IsthmusGateway, KeyPair, Netns, Packet, Run,
    Site, Topology, Underlay, WG_PORT,
};
use isthmus_ebpf_redirect::Entry;

const CHANNEL_PORT: u16 = 7443;
const ESP_PORT: u16 = 4500;
const TD: &str = "nodes.test";
const CLUSTER: &str = "k";
const CLUSTER_PREFIX: &str = "100.64.0.0/16";
/// The cluster's IPv6 pod space; node i's pods are `fd64:i::/64` (pod `fd64:i::2`).
const CLUSTER_PREFIX6: &str = "fd64::/16";

fn pod6(i: usize) -> IpAddr {
    format!("fd64:{i}::2").parse().expect("IPv6 pod address")
}
/// The second pod on node 1 (same node as the site's workload).
const POD_1B: &str = "100.64.1.200";
const CANARY: &[u8] = b"ISTHMUS-NODE-MODE-CLEARTEXT-CANARY-41c9";

fn ctl(args: &[&str]) -> Result<String> {
    let out = isthmus_e2e::isthmus::isthmusctl(args)?;
    if !out.status.success() {
        bail!(
            "isthmusctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Mesh CA, the cluster's CA and one gateway identity per node.
fn pki(run: &Run, nodes: usize) -> Result<(PathBuf, Vec<(PathBuf, PathBuf)>)> {
    let dir = run.path("ca");
    let d = s(&dir);
    ctl(&["certs", "init", "--dir", &d, "--trust-domain", TD])?;
    ctl(&[
        "certs",
        "issue",
        "--dir",
        &d,
        "cluster",
        "--cluster",
        CLUSTER,
    ])?;
    let mut out = Vec::new();
    for i in 1..=nodes {
        let name = format!("node{i}");
        ctl(&[
            "certs",
            "issue",
            "--dir",
            &d,
            "gateway",
            "--cluster",
            CLUSTER,
            "--name",
            &name,
        ])?;
        let base = dir.join("clusters").join(CLUSTER).join("gateways");
        out.push((
            base.join(format!("{name}.pem")),
            base.join(format!("{name}.key")),
        ));
    }
    Ok((dir.join("bundle.pem"), out))
}

fn nodes_file(sites: &[&Site], kind: &str) -> String {
    let mut text = String::new();
    for site in sites {
        text += &format!(
            "[[nodes]]\nname = \"node{i}\"\nspiffe_id = \"spiffe://{TD}/cluster/{CLUSTER}/gateway/node{i}\"\n\
             channel_endpoint = \"{}\"\npod_prefixes = [\"{}\", \"fd64:{i}::/64\"]\nkind = \"{kind}\"\n\n",
            site.endpoint(CHANNEL_PORT),
            site.workload_prefix,
            i = site.index,
        );
    }
    text
}

/// Writes the nodes file atomically (readers never see half a file).
fn write_nodes(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

struct Lab {
    topo: Topology,
    gateways: Vec<IsthmusGateway>,
    nodes_path: PathBuf,
    kind: &'static str,
    _pod_1b: Netns,
}

impl Lab {
    fn start(kind: &'static str, steering_mode: &str) -> Result<Self> {
        let topo = Topology::new(3, Underlay::V4)?;
        let run = topo.run();
        let (bundle, certs) = pki(run, 3)?;
        // A second pod on node 1, CNI style: a /32 behind its own veth.
        let site1 = topo.site(1).clone();
        let pod_1b = Netns::new(&run.name("p1b"))?;
        let veth_1b = run.ifname("b")?;
        netns::ip(
            &site1.gw_ns,
            &[
                "link",
                "add",
                &veth_1b,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod_1b.name(),
            ],
        )?;
        netns::ip(&site1.gw_ns, &["link", "set", &veth_1b, "up"])?;
        netns::ip(
            &site1.gw_ns,
            &["route", "add", &format!("{POD_1B}/32"), "dev", &veth_1b],
        )?;
        pod_1b.ip(&["addr", "add", &format!("{POD_1B}/32"), "dev", "eth0"])?;
        pod_1b.ip(&["link", "set", "eth0", "up"])?;
        pod_1b.ip(&[
            "route",
            "add",
            &site1.gw_lan_addr.to_string(),
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        pod_1b.ip(&[
            "route",
            "add",
            "default",
            "via",
            &site1.gw_lan_addr.to_string(),
        ])?;
        // The site's workload reaches it through the node (a /32 via the node,
        // as CNIs route pods).
        netns::ip(
            &site1.wl_ns,
            &[
                "route",
                "add",
                &format!("{POD_1B}/32"),
                "via",
                &site1.gw_lan_addr.to_string(),
            ],
        )?;

        // A CNI's own route toward node 2's pods, straight over the underlay
        // (host-gw style): node mode's routing must win over it.
        netns::ip(
            &site1.gw_ns,
            &[
                "route",
                "add",
                &topo.site(2).workload_prefix,
                "via",
                &topo.site(2).underlay_addr.to_string(),
            ],
        )?;

        // IPv6 pods too.
        for site in topo.sites() {
            let i = site.index;
            netns::ip(
                &site.gw_ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("fd64:{i}::1/64"),
                    "dev",
                    &site.lan_if,
                    "nodad",
                ],
            )?;
            netns::ip(
                &site.wl_ns,
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("fd64:{i}::2/64"),
                    "dev",
                    &site.wl_if,
                    "nodad",
                ],
            )?;
            netns::ip(
                &site.wl_ns,
                &[
                    "-6",
                    "route",
                    "replace",
                    "default",
                    "via",
                    &format!("fd64:{i}::1"),
                ],
            )?;
        }

        let nodes_path = run.path("nodes.toml");
        let sites: Vec<&Site> = topo.sites().iter().collect();
        write_nodes(&nodes_path, &nodes_file(&sites, kind))?;
        let mut gateways = Vec::new();
        for site in topo.sites() {
            let i = site.index;
            let mut interfaces = vec![format!("\"{}\"", site.lan_if)];
            if i == 1 {
                interfaces.push(format!("\"{veth_1b}\""));
            }
            let (cert, key) = &certs[i - 1];
            let mut config = GatewayConfig {
                name: Some(site.tunnel_if.clone()),
                listen_port: Some(WG_PORT),
                ..GatewayConfig::default()
            };
            if kind == "esp" {
                config.interface_extra = vec![format!("esp_listen_port = {ESP_PORT}")];
            }
            config.trailer = vec![
                format!(
                    "[identity]\ntrust_bundle = {:?}\ncertificate = {:?}\nprivate_key = {:?}\nlisten = \"{}\"\n",
                    s(&bundle),
                    s(cert),
                    s(key),
                    site.endpoint(CHANNEL_PORT)
                ),
                format!(
                    "[steering]\nmode = \"{steering_mode}\"\ninterfaces = [{}]\n",
                    interfaces.join(", ")
                ),
                format!(
                    "[node]\npod_prefixes = [\"{}\", \"fd64:{i}::/64\"]\n\
                     cluster_prefixes = [\"{CLUSTER_PREFIX}\", \"{CLUSTER_PREFIX6}\"]\nnodes_file = {:?}\n",
                    site.workload_prefix,
                    s(&nodes_path)
                ),
            ];
            gateways.push(IsthmusGateway::start(
                run,
                &site.gw_ns,
                &KeyPair::generate()?,
                &config,
            )?);
        }
        Ok(Self {
            topo,
            gateways,
            nodes_path,
            kind,
            _pod_1b: pod_1b,
        })
    }

    fn logs(&self) -> String {
        self.gateways.iter().map(|g| g.logs()).collect()
    }

    fn tunnel_port(&self) -> u16 {
        if self.kind == "esp" {
            ESP_PORT
        } else {
            WG_PORT
        }
    }

    /// A frame the node-to-node link may carry: a tunnel datagram or the key
    /// channel (TCP to/from the channel port) between two nodes, or ARP/ND.
    fn allowed(&self, p: &Packet) -> bool {
        let nodes: Vec<IpAddr> = self.topo.sites().iter().map(|s| s.underlay_addr).collect();
        let between =
            p.src.is_some_and(|a| nodes.contains(&a)) && p.dst.is_some_and(|a| nodes.contains(&a));
        let port = self.tunnel_port();
        let tunnel = p.udp_src == Some(port) && p.udp_dst == Some(port);
        let channel = p.tcp_src == Some(CHANNEL_PORT) || p.tcp_dst == Some(CHANNEL_PORT);
        p.is_link_housekeeping() || (between && (tunnel || channel))
    }
}

fn canaries(from: &Site, to: IpAddr, n: usize) {
    let datagrams = (0..n)
        .map(|i| [CANARY, format!("#{i}").as_bytes()].concat())
        .collect();
    let _ = traffic::udp_send(
        &from.wl_ns,
        SocketAddr::new(to, 9),
        datagrams,
        Duration::from_micros(300),
    );
}

fn local_passed(gw: &IsthmusGateway, prefix: &str) -> Result<u64> {
    let st = gw.status()?.steering.context("no steering in status")?;
    Ok(st
        .entries
        .iter()
        .find(|e| {
            e.entry
                == Entry::Local {
                    prefix: prefix.into(),
                }
        })
        .map_or(0, |e| e.steered.packets))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node_mode(kind: &'static str, steering_mode: &str) -> Result<()> {
    let lab = Lab::start(kind, steering_mode)?;
    let (s1, s2, s3) = (
        lab.topo.site(1).clone(),
        lab.topo.site(2).clone(),
        lab.topo.site(3).clone(),
    );
    let (w2, w3): (IpAddr, IpAddr) = (s2.workload_addr.into(), s3.workload_addr.into());
    for (from, to) in [
        (&s1, w2),
        (&s1, w3),
        (&s2, w3),
        (&s1, pod6(2)),
        (&s1, pod6(3)),
    ] {
        if !wait_for_ping(&from.wl_ns, to, Duration::from_secs(30)) {
            bail!(
                "pod {} cannot reach {to} across nodes\n{}",
                from.wl_ns,
                lab.logs()
            );
        }
    }

    // Pod-to-pod across nodes: only tunnel datagrams and the key channel on the link.
    let cap = Capture::start(lab.topo.run(), &s1.gw_ns, &s1.underlay_if, None)?;
    canaries(&s1, w2, 50);
    let (sent, received) = ping_stats(&s1.wl_ns, w3, 5)?;
    let pcap = cap.stop()?;
    assert_eq!((sent, received), (5, 5), "pod-to-pod ping lost packets");
    assert!(
        !pcap.contains(CANARY)?,
        "cleartext pod traffic on the node link ({})",
        pcap.path.display()
    );
    let packets = pcap.packets(WG_PORT)?;
    let bad: Vec<&Packet> = packets.iter().filter(|p| !lab.allowed(p)).collect();
    assert!(
        bad.is_empty(),
        "unexpected frames on the node link: {bad:#?}"
    );
    let port = lab.tunnel_port();
    assert!(
        packets.iter().any(|p| p.udp_dst == Some(port)),
        "no tunnel datagram captured"
    );

    // The node's own traffic to a pod on another node (and traffic kube-proxy
    // DNATs to one after steering) follows routing: node mode's table wins over
    // the CNI's route, so it is encrypted too.
    let cap = Capture::start(lab.topo.run(), &s1.gw_ns, &s1.underlay_if, None)?;
    let host_ping = netns::exec_output(
        &s1.gw_ns,
        "ping",
        &[
            "-n",
            "-q",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "-I",
            &s1.gw_lan_addr.to_string(),
            &w2.to_string(),
        ],
    )?;
    let pcap = cap.stop()?;
    let clear: Vec<Packet> = pcap
        .packets(WG_PORT)?
        .into_iter()
        .filter(|p| p.has("icmp"))
        .collect();
    assert!(
        clear.is_empty(),
        "the node's traffic to a remote pod crossed in clear: {clear:#?}"
    );
    assert!(
        host_ping.status.success(),
        "node 1 cannot reach a pod on node 2 through the tunnel: {}",
        String::from_utf8_lossy(&host_ping.stdout)
    );

    // Same-node traffic is untouched: it reaches the other pod and is counted
    // as local (passed), and nothing for it crosses the node link.
    let before = local_passed(&lab.gateways[0], &s1.workload_prefix)?;
    let cap = Capture::start(lab.topo.run(), &s1.gw_ns, &s1.underlay_if, None)?;
    let (sent, received) = ping_stats(&s1.wl_ns, POD_1B.parse()?, 3)?;
    let pcap = cap.stop()?;
    if received != sent {
        let diag = [
            netns::ip(&s1.wl_ns, &["neigh"]).unwrap_or_default(),
            netns::ip(&s1.gw_ns, &["neigh"]).unwrap_or_default(),
            netns::ip(&s1.gw_ns, &["route"]).unwrap_or_default(),
            format!("{:#?}", lab.gateways[0].status().map(|s| s.steering)),
        ];
        bail!(
            "same-node ping failed ({sent}, {received}):\n{}",
            diag.join("\n")
        );
    }
    let after = local_passed(&lab.gateways[0], &s1.workload_prefix)?;
    assert!(
        after >= before + 3,
        "same-node packets not passed as local: {before} -> {after}"
    );
    let tunnel_frames = pcap
        .packets(WG_PORT)?
        .into_iter()
        .filter(|p| p.udp_dst == Some(port))
        .count();
    assert_eq!(
        tunnel_frames, 0,
        "same-node traffic went through the tunnel"
    );

    // Node 3 leaves: strict mode drops pod traffic to it, counts it, and sends
    // nothing in clear.
    let sites12 = [&s1, &s2];
    write_nodes(&lab.nodes_path, &nodes_file(&sites12, lab.kind))?;
    let gw1 = &lab.gateways[0];
    wait_until("node 1 to drop node 3", Duration::from_secs(10), || {
        let st = gw1.status()?;
        let n = st
            .node
            .as_ref()
            .and_then(|n| n["nodes"].as_array().map(|a| a.len()));
        Ok(n == Some(1))
    })?;
    let drops_before = gw1.status()?.drops.no_route;
    let cap = Capture::start(lab.topo.run(), &s1.gw_ns, &s1.underlay_if, None)?;
    canaries(&s1, w3, 30);
    canaries(&s1, pod6(3), 30);
    let (_, received) = ping_stats(&s1.wl_ns, w3, 3)?;
    let (_, received6) = ping_stats(&s1.wl_ns, pod6(3), 3)?;
    let pcap = cap.stop()?;
    assert_eq!(
        (received, received6),
        (0, 0),
        "node 3 still reachable after it left"
    );
    assert!(
        !pcap.contains(CANARY)?,
        "strict mode leaked cleartext ({})",
        pcap.path.display()
    );
    let to_3: Vec<Packet> = pcap
        .packets(WG_PORT)?
        .into_iter()
        .filter(|p| p.dst == Some(s3.underlay_addr) && !p.is_link_housekeeping())
        .collect();
    assert!(
        to_3.iter()
            .all(|p| p.tcp_dst == Some(CHANNEL_PORT) || p.tcp_src == Some(CHANNEL_PORT)),
        "node 1 still sent pod traffic to node 3: {to_3:#?}"
    );
    let drops_after = gw1.status()?.drops.no_route;
    assert!(
        drops_after >= drops_before + 60,
        "strict-mode drops not counted: {drops_before} -> {drops_after}"
    );

    // Node 3 joins again: traffic flows.
    let all: Vec<&Site> = lab.topo.sites().iter().collect();
    write_nodes(&lab.nodes_path, &nodes_file(&all, lab.kind))?;
    if !wait_for_ping(&s1.wl_ns, w3, Duration::from_secs(30))
        || !wait_for_ping(&s1.wl_ns, pod6(3), Duration::from_secs(10))
    {
        bail!("node 3 unreachable after re-joining\n{}", lab.logs());
    }
    let text = ctl(&["status", "--socket", &s(&gw1.admin_socket)])?;
    assert!(text.contains("node mode (strict)"), "{text}");
    Ok(())
}

#[test]
fn node_mode_wireguard_bpf_encrypts_pod_traffic_and_strict_mode_drops() -> Result<()> {
    node_mode("wireguard", "bpf")
}

#[test]
fn node_mode_esp_policy_fallback_encrypts_pod_traffic_and_strict_mode_drops() -> Result<()> {
    node_mode("esp", "policy")
}
