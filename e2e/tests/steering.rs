//! Steering (ebpf-redirect) on real network namespaces: the TCX program and the
//! policy-routing fallback pass the same checks. A "pod" namespace sends real
//! UDP through a veth into a "node" namespace; what is steered shows up on a
//! real TUN device the test reads.

use anyhow::{bail, Context, Result};
use isthmus_e2e::netns::{self, Netns};
use isthmus_e2e::run::Run;
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
