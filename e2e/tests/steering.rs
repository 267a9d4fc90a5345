//! Steering (ebpf-redirect) on real network namespaces: the TCX program and the
//! policy-routing fallback pass the same checks. A "pod" namespace sends real
//! UDP through a veth into a "node" namespace; what is steered shows up on a
//! real TUN device the test reads.

use anyhow::{bail, Context, Result};
use isthmus_e2e::netns::{self, Netns};
use isthmus_e2e::run::Run;
use isthmus_e2e::{mesh, ping, wait_for_ping, IsthmusGateway, KeyPair, Topology, Underlay};
use isthmus_ebpf_redirect::{Entry, Mode, PolicyNumbers, Prefix, Steering, SteeringConfig};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// A TUN device the test holds open and reads (IFF_TUN | IFF_NO_PI).
struct Tun {
    fd: OwnedFd,
}

impl Tun {
    fn open(name: &str) -> Result<Self> {
        let path = c"/dev/net/tun";
        // SAFETY: a plain open(2) of a NUL-terminated path.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            bail!("open /dev/net/tun: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // struct ifreq: 16 bytes of name, then the flags (short), padded to 40.
        let mut ifr = [0u8; 40];
        let bytes = name.as_bytes();
        if bytes.len() >= 16 {
            bail!("interface name {name} too long");
        }
        ifr[..bytes.len()].copy_from_slice(bytes);
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; `ifr` is 40 bytes, the
        // size of that struct, and lives for the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
        if rc < 0 {
            bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Reads packets until one contains `marker` or `wait` passes.
    fn saw(&self, marker: &[u8], wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: reads into a buffer we own, of the length we pass.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                let pkt = &buf[..n as usize];
                if pkt.windows(marker.len()).any(|w| w == marker) {
                    return true;
                }
                continue;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

struct Lab {
    run: Run,
    node: Netns,
    pod: Netns,
    workload_if: String,
    tun: String,
}

fn lab() -> Result<Lab> {
    let run = Run::new()?;
    let node = Netns::new(&run.name("node"))?;
    let pod = Netns::new(&run.name("pod"))?;
    let workload_if = run.ifname("w")?;
    let tun = run.ifname("t")?;
    node.ip(&[
        "link",
        "add",
        &workload_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ])?;
    node.ip(&["addr", "add", "10.77.0.1/24", "dev", &workload_if])?;
    node.ip(&["addr", "add", "fd77::1/64", "dev", &workload_if, "nodad"])?;
    node.ip(&["link", "set", &workload_if, "up"])?;
    pod.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"])?;
    pod.ip(&["addr", "add", "10.77.0.3/24", "dev", "eth0"])?;
    pod.ip(&["addr", "add", "fd77::2/64", "dev", "eth0", "nodad"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["route", "add", "default", "via", "10.77.0.1"])?;
    pod.ip(&["-6", "route", "add", "default", "via", "fd77::1"])?;
    // A node forwards its pods' traffic (the policy-routing fallback routes it).
    node.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    node.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
    Ok(Lab {
        run,
        node,
        pod,
        workload_if,
        tun,
    })
}

fn prefix(s: &str) -> Prefix {
    let (a, l) = s.split_once('/').expect("prefix");
    (a.parse().expect("address"), l.parse().expect("length"))
}

/// Sends one UDP datagram from the pod (source `from`) to `to`.
fn pod_send(pod: &str, from: &str, to: &str, payload: &[u8]) -> Result<()> {
    let from: IpAddr = from.parse()?;
    let to: SocketAddr = to.parse()?;
    let payload = payload.to_vec();
    netns::run_in(pod, move || {
        let sock = UdpSocket::bind(SocketAddr::new(from, 0)).context("binding in the pod")?;
        // An unreachable destination may refuse; what matters is where it went.
        let _ = sock.send_to(&payload, to);
        Ok(())
    })
}

fn entry_packets(steer: &Steering, entry: &Entry) -> u64 {
    steer
        .status()
        .entries
        .iter()
        .find(|e| &e.entry == entry)
        .map_or(0, |e| e.steered.packets)
}

/// The checks both backends must pass.
fn steering_checks(mode: Mode) -> Result<()> {
    let lab = lab()?;
    let (pod, workload_if, tun_name) = (
        lab.pod.name().to_string(),
        lab.workload_if.clone(),
        lab.tun.clone(),
    );
    let node = lab.node.name().to_string();
    let table = format!(
        "isthmus_{}",
        tun_name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    netns::run_in(lab.node.name(), move || {
        let tun = Tun::open(&tun_name)?;
        netns::ip(&node, &["link", "set", &tun_name, "up"])?;
        let cfg = SteeringConfig {
            mode,
            tunnel: tun_name.clone(),
            interfaces: vec![workload_if.clone()],
            policy: PolicyNumbers::default(),
        };
        let steer = Steering::start(&cfg).context("starting steering")?;
        assert_eq!(steer.mode(), mode);
        steer.add_remote(prefix("10.99.0.0/16"))?;
        steer.add_remote(prefix("fd99::/64"))?;
        let wait = Duration::from_secs(2);
        let short = Duration::from_millis(400);

        // A packet to a remote prefix is steered into the tunnel device.
        pod_send(&pod, "10.77.0.2", "10.99.0.5:7000", b"remote-v4-1")?;
        assert!(
            tun.saw(b"remote-v4-1", wait),
            "{mode}: remote IPv4 packet not on the tunnel device"
        );
        pod_send(&pod, "fd77::2", "[fd99::5]:7000", b"remote-v6-1")?;
        assert!(
            tun.saw(b"remote-v6-1", wait),
            "{mode}: remote IPv6 packet not on the tunnel device"
        );

        // One to a local prefix is not: it reaches the node's own socket.
        let local = UdpSocket::bind("10.77.0.1:7001")?;
        local.set_read_timeout(Some(wait))?;
        pod_send(&pod, "10.77.0.2", "10.77.0.1:7001", b"local-1")?;
        let mut buf = [0u8; 64];
        let (n, _) = local
            .recv_from(&mut buf)
            .context("local packet never arrived")?;
        assert_eq!(&buf[..n], b"local-1");
        assert!(
            !tun.saw(b"local-1", short),
            "{mode}: a local packet went into the tunnel"
        );

        // Maps change live: a new prefix takes effect without a reload, and a
        // removed one stops.
        pod_send(&pod, "10.77.0.2", "10.98.0.5:7000", b"late-1")?;
        assert!(
            !tun.saw(b"late-1", short),
            "{mode}: steered before the prefix was added"
        );
        steer.add_remote(prefix("10.98.0.0/16"))?;
        pod_send(&pod, "10.77.0.2", "10.98.0.5:7000", b"late-2")?;
        assert!(
            tun.saw(b"late-2", wait),
            "{mode}: a prefix added live was not steered"
        );
        steer.remove_remote(prefix("10.98.0.0/16"))?;
        pod_send(&pod, "10.77.0.2", "10.98.0.5:7000", b"late-3")?;
        assert!(
            !tun.saw(b"late-3", short),
            "{mode}: a removed prefix is still steered"
        );

        // A local entry inside a steered prefix passes (a node's own pods
        // inside the cluster's pod space); the rest of the prefix is steered.
        steer.add_local(prefix("10.99.7.0/24"))?;
        pod_send(&pod, "10.77.0.2", "10.99.7.5:7000", b"inside-local")?;
        assert!(
            !tun.saw(b"inside-local", short),
            "{mode}: a local prefix was steered"
        );
        pod_send(&pod, "10.77.0.2", "10.99.8.5:7000", b"beside-local")?;
        assert!(
            tun.saw(b"beside-local", wait),
            "{mode}: the covering prefix stopped steering"
        );
        assert!(
            entry_packets(
                &steer,
                &Entry::Local {
                    prefix: "10.99.7.0/24".into()
                }
            ) >= 1,
            "{mode}: {:?}",
            steer.status()
        );

        // Egress steering: only the selected source goes to the tunnel.
        steer.set_egress(1, &[prefix("10.77.0.2/32")], &[prefix("203.0.113.0/24")])?;
        pod_send(&pod, "10.77.0.2", "203.0.113.9:443", b"egress-selected")?;
        assert!(
            tun.saw(b"egress-selected", wait),
            "{mode}: selected egress source not steered"
        );
        pod_send(&pod, "10.77.0.3", "203.0.113.9:443", b"egress-unselected")?;
        assert!(
            !tun.saw(b"egress-unselected", short),
            "{mode}: unselected source was steered"
        );

        // Counters count, per entry and per verdict.
        let remote4 = Entry::Remote {
            prefix: "10.99.0.0/16".into(),
        };
        let remote6 = Entry::Remote {
            prefix: "fd99::/64".into(),
        };
        let egress = Entry::Egress {
            policy: 1,
            source: "10.77.0.2/32".into(),
        };
        assert!(
            entry_packets(&steer, &remote4) >= 1,
            "{mode}: {:?}",
            steer.status()
        );
        assert!(
            entry_packets(&steer, &remote6) >= 1,
            "{mode}: {:?}",
            steer.status()
        );
        assert!(
            entry_packets(&steer, &egress) >= 1,
            "{mode}: {:?}",
            steer.status()
        );
        let status = steer.status();
        assert!(status.redirected.packets >= 4, "{mode}: {status:?}");
        assert!(status.passed.packets >= 1, "{mode}: {status:?}");

        // Another TCX program after ours still runs for what ours passes (ours
        // must not end the chain): here, a second steering instance that
        // steers a prefix the first one does not know.
        if mode == Mode::Bpf {
            let second = Steering::start(&cfg).context("a second TCX program")?;
            second.add_remote(prefix("10.97.0.0/16"))?;
            pod_send(&pod, "10.77.0.2", "10.97.0.5:7000", b"chained")?;
            assert!(
                tun.saw(b"chained", wait),
                "the next TCX program never saw a packet ours passed"
            );
            drop(second);
        }

        // Shut down: nothing is left behind.
        drop(steer);
        let programs = isthmus_ebpf_redirect::tcx_ingress_programs(&workload_if)?;
        assert!(
            programs.is_empty(),
            "{mode}: programs left attached: {programs:?}"
        );
        let tables = netns::exec(&node, "nft", &["list", "tables"])?;
        assert!(
            !tables.contains(&table),
            "{mode}: nftables table left behind: {tables}"
        );
        let rules = netns::ip(&node, &["rule", "show"])?;
        assert!(
            !rules.contains("4953"),
            "{mode}: ip rule left behind: {rules}"
        );
        pod_send(&pod, "10.77.0.2", "10.99.0.5:7000", b"after-stop")?;
        assert!(
            !tun.saw(b"after-stop", short),
            "{mode}: steered after shutdown"
        );
        Ok(())
    })?;
    drop(lab.run);
    Ok(())
}

#[test]
fn bpf_steers_remote_and_egress_traffic_and_leaves_nothing_behind() -> Result<()> {
    steering_checks(Mode::Bpf)
}

#[test]
fn policy_routing_fallback_passes_the_same_checks() -> Result<()> {
    steering_checks(Mode::Policy)
}

fn tcx_programs(ns: &str, iface: &str) -> Result<Vec<String>> {
    let iface = iface.to_string();
    netns::run_in(ns, move || {
        Ok(isthmus_ebpf_redirect::tcx_ingress_programs(&iface)?)
    })
}

fn steered_packets(gw: &IsthmusGateway, prefix: &str) -> Result<u64> {
    let st = gw.status()?;
    let steering = st.steering.context("isthmusctl status shows no steering")?;
    Ok(steering
        .entries
        .iter()
        .find(|e| {
            e.entry
                == Entry::Remote {
                    prefix: prefix.into(),
                }
        })
        .map_or(0, |e| e.steered.packets))
}

/// What a restarted gateway finds of the one that was killed: BPF leaves
/// nothing (the TCX link died with the process); the fallback's table and
/// rules are still there and must be replaced, not duplicated.
fn leftovers(ns: &str, lan_if: &str, tun: &str) -> Result<(Vec<String>, usize, usize)> {
    let programs = tcx_programs(ns, lan_if)?;
    let table = format!(
        "isthmus_{}",
        tun.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    );
    let tables = netns::exec(ns, "nft", &["list", "tables"])?;
    let n_tables = tables
        .lines()
        .filter(|l| l.split_whitespace().last() == Some(table.as_str()))
        .count();
    let rules = netns::ip(ns, &["rule", "show"])? + &netns::ip(ns, &["-6", "rule", "show"])?;
    let n_rules = rules.lines().filter(|l| l.contains("lookup 4953")).count();
    Ok((programs, n_tables, n_rules))
}

/// A gateway with `[steering]` in front of its workload: the workload reaches
/// the far site through the tunnel, the steering counters show the packets,
/// and after `kill -9` and a restart exactly one program (or one fallback
/// table and rule pair) is in place.
fn gateway_steering(mode: &str, expect: Mode) -> Result<()> {
    let topo = Topology::two_sites(Underlay::V4)?;
    let keys = [KeyPair::generate()?, KeyPair::generate()?];
    let (s1, s2) = (topo.site(1).clone(), topo.site(2).clone());
    let mut c1 = mesh::isthmus_config(&s1, mesh::peers_for(&topo, &keys, 1));
    c1.trailer = vec![
        "[steering]".into(),
        format!("mode = \"{mode}\""),
        format!("interfaces = [\"{}\"]", s1.lan_if),
    ];
    let c2 = mesh::isthmus_config(&s2, mesh::peers_for(&topo, &keys, 2));
    let mut g1 = IsthmusGateway::start(topo.run(), &s1.gw_ns, &keys[0], &c1)?;
    let _g2 = IsthmusGateway::start(topo.run(), &s2.gw_ns, &keys[1], &c2)?;
    let far: IpAddr = s2.workload_addr.into();
    assert!(
        wait_for_ping(&s1.wl_ns, far, Duration::from_secs(10)),
        "no ping through the tunnel"
    );
    let st = g1.status()?.steering.context("no steering in status")?;
    assert_eq!(st.mode, expect, "{mode}: {st:?}");
    let redirected = |g: &IsthmusGateway| -> Result<u64> {
        Ok(g.status()?
            .steering
            .context("no steering")?
            .redirected
            .packets)
    };
    let redirected_before = redirected(&g1)?;
    let before = steered_packets(&g1, &s2.workload_prefix)?;
    assert!(ping(&s1.wl_ns, far, 3), "ping failed");
    let after = steered_packets(&g1, &s2.workload_prefix)?;
    assert!(
        redirected(&g1)? >= redirected_before + 3,
        "{mode}: the pings were not redirected into the tunnel"
    );
    assert!(
        after >= before + 3,
        "{mode}: steering counted {before} then {after}"
    );
    let text = String::from_utf8_lossy(
        &isthmus_e2e::isthmus::isthmusctl(&[
            "status",
            "--socket",
            &g1.admin_socket.to_string_lossy(),
        ])?
        .stdout,
    )
    .into_owned();
    assert!(
        text.contains("steering ("),
        "isthmusctl status shows no steering:\n{text}"
    );
    // Full-size TCP from a workload whose MTU (1500) is above the tunnel's
    // (1420): the oversize packets are not redirected but handed to routing,
    // whose route into the tunnel carries its MTU, so path MTU discovery works
    // and the transfer completes (a redirect alone would stall it).
    let report = isthmus_e2e::traffic::tcp_transfer(
        &s1.wl_ns,
        &s2.wl_ns,
        far,
        7311,
        4_000_000,
        isthmus_e2e::Payload::Random,
    )?;
    assert!(
        report.intact(),
        "{mode}: TCP through the steered tunnel: {report:?}"
    );
    if expect == Mode::Bpf {
        let st = g1.status()?.steering.context("no steering")?;
        assert!(
            st.too_big.packets > 0,
            "{mode}: no packet was too big for the tunnel? {st:?}"
        );
    }
    let (programs, tables, rules) = leftovers(&s1.gw_ns, &s1.lan_if, &s1.tunnel_if)?;
    match expect {
        Mode::Bpf => assert_eq!(
            (programs, tables, rules),
            (vec!["isthmus_steer".to_string()], 0, 0)
        ),
        _ => assert_eq!((programs.len(), tables, rules), (0, 1, 2)),
    }

    // kill -9: the BPF program goes with the process.
    g1.process().signal(libc::SIGKILL);
    g1.process()
        .wait_timeout(Duration::from_secs(5))?
        .context("gateway survived SIGKILL")?;
    let (programs, _, _) = leftovers(&s1.gw_ns, &s1.lan_if, &s1.tunnel_if)?;
    assert!(
        programs.is_empty(),
        "{mode}: program left attached after kill -9: {programs:?}"
    );

    // Restart: exactly one program / one table and rule pair again, and traffic flows.
    let g1 = IsthmusGateway::start(topo.run(), &s1.gw_ns, &keys[0], &c1)?;
    let (programs, tables, rules) = leftovers(&s1.gw_ns, &s1.lan_if, &s1.tunnel_if)?;
    match expect {
        Mode::Bpf => assert_eq!(
            (programs, tables, rules),
            (vec!["isthmus_steer".to_string()], 0, 0)
        ),
        _ => assert_eq!((programs.len(), tables, rules), (0, 1, 2)),
    }
    assert!(
        wait_for_ping(&s1.wl_ns, far, Duration::from_secs(10)),
        "no ping after restart"
    );
    assert!(steered_packets(&g1, &s2.workload_prefix)? >= 1);
    Ok(())
}

#[test]
fn gateway_bpf_steering_survives_kill_9_without_stale_programs() -> Result<()> {
    gateway_steering("bpf", Mode::Bpf)
}

#[test]
fn gateway_policy_fallback_survives_kill_9_without_duplicate_rules() -> Result<()> {
    gateway_steering("policy", Mode::Policy)
}
