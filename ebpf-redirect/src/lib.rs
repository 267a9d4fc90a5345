//! Steering of workload traffic into the Isthmus tunnel device.
//!
//! Packets that workloads send on the *workload-facing* interfaces of a gateway
//! (pod veths, a bridge port, a node's pod interface) are steered into the
//! gateway's tunnel device when their destination is a mesh prefix (another
//! cluster, another node) or when an egress policy selects them; everything
//! else passes untouched.
//!
//! Two backends do the same job:
//! - [`bpf::BpfSteering`]: the `isthmus-steer` TC program (built from
//!   `programs/` by this crate's build script), attached with TCX to the ingress
//!   of each workload interface; LPM-trie maps of prefixes, live updates,
//!   per-CPU counters. TCX links are file descriptors of this process, so the
//!   program goes away with the process, even after `kill -9`.
//! - [`policy::PolicySteering`]: the fallback where BPF cannot load: an
//!   nftables chain marks the same packets, and an `ip rule` on that fwmark
//!   sends them to a routing table whose only routes lead into the tunnel device.
//!
//! [`Steering::start`] picks one ([`Mode::Auto`]: BPF, else the fallback, said in
//! one log line). [`netlink`] programs routes, rules and addresses without
//! running `ip`.

pub mod bpf;
pub mod netlink;
pub mod policy;

pub use netlink::Prefix;

use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::sync::Mutex;

/// Which backend steers packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// BPF when it loads, else policy routing.
    Auto,
    /// BPF only; failing to load is an error.
    Bpf,
    /// Policy routing (nftables + fwmark rules) only.
    Policy,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Bpf => "bpf",
            Mode::Policy => "policy",
        })
    }
}

/// Numbers the policy-routing backend uses (the fwmark, its routing table and
/// the rule priority). They must not collide with the host's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyNumbers {
    /// Firewall mark set on steered packets.
    pub fwmark: u32,
    /// Bits of the mark this gateway owns.
    pub mask: u32,
    /// Routing table holding the routes into the tunnel device.
    pub table: u32,
    /// Priority of the `fwmark → table` rules.
    pub priority: u32,
}

impl Default for PolicyNumbers {
    fn default() -> Self {
        Self {
            fwmark: 0x0049_0000,
            mask: 0x00ff_0000,
            table: 4953,
            priority: 4953,
        }
    }
}

/// What to steer where.
#[derive(Clone, Debug)]
pub struct SteeringConfig {
    /// Backend choice.
    pub mode: Mode,
    /// The tunnel device packets are steered into.
    pub tunnel: String,
    /// Workload-facing interfaces whose incoming packets are steered.
    pub interfaces: Vec<String>,
    /// Numbers for the policy-routing backend.
    pub policy: PolicyNumbers,
}

/// Why steering failed.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// An interface named in the config does not exist.
    #[error("interface {0:?} does not exist")]
    NoInterface(String),
    /// BPF could not be used.
    #[error("BPF steering: {0}")]
    Bpf(String),
    /// The policy-routing backend failed.
    #[error("policy routing: {0}")]
    Policy(String),
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
}

/// One steering entry, as status and counters report it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Entry {
    /// Packets to this prefix go into the tunnel.
    Remote {
        /// Destination prefix.
        prefix: String,
    },
    /// Packets to this prefix pass untouched even inside a steered prefix
    /// (a node's own pods).
    Local {
        /// Destination prefix.
        prefix: String,
    },
    /// Egress policy: packets from `source` to any of the policy's
    /// destinations go into the tunnel.
    Egress {
        /// Policy number.
        policy: u32,
        /// Source workload prefix.
        source: String,
    },
}

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// Counters of one entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryStatus {
    /// The entry.
    #[serde(flatten)]
    pub entry: Entry,
    /// Packets the entry steered into the tunnel.
    pub steered: Count,
}

/// What `isthmusctl status` shows of steering.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SteeringStatus {
    /// `bpf` or `policy`.
    pub mode: Mode,
    /// Tunnel device.
    pub tunnel: String,
    /// Workload-facing interfaces.
    pub interfaces: Vec<String>,
    /// Packets steered into the tunnel (all entries).
    pub redirected: Count,
    /// Packets that matched no entry and passed untouched.
    pub passed: Count,
    /// Packets whose redirect the kernel refused (BPF only).
    pub redirect_failed: Count,
    /// IP packets too short to parse, passed to the kernel (BPF only).
    pub malformed: Count,
    /// Packets too big for the tunnel device: mesh packets handed to routing
    /// (path MTU discovery), egress packets dropped (BPF only).
    #[serde(default)]
    pub too_big: Count,
    /// Per-entry counters.
    pub entries: Vec<EntryStatus>,
}

/// Canonical form of a prefix: host bits cleared, length checked.
pub fn canonical(prefix: Prefix) -> Result<Prefix, SteerError> {
    let (addr, len) = prefix;
    match addr {
        IpAddr::V4(a) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            Ok((IpAddr::from((u32::from(a) & mask).to_be_bytes()), len))
        }
        IpAddr::V6(a) if len <= 128 => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            Ok((IpAddr::from((u128::from(a) & mask).to_be_bytes()), len))
        }
        _ => Err(SteerError::Invalid(format!(
            "prefix length {len} is too long for {addr}"
        ))),
    }
}

/// Text form `addr/len`.
pub fn prefix_str(p: Prefix) -> String {
    format!("{}/{}", p.0, p.1)
}

enum Backend {
    Bpf(Box<bpf::BpfSteering>),
    Policy(policy::PolicySteering),
}

/// The running steering backend. Dropping it detaches the program (BPF) or
/// removes the nftables table, rules and routes (policy routing).
pub struct Steering {
    backend: Mutex<Backend>,
    mode: Mode,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("mode", &self.mode)
            .finish()
    }
}

impl Steering {
    /// Starts the configured backend. With [`Mode::Auto`] a BPF failure is said
    /// in one warning line and the policy-routing backend is used instead.
    pub fn start(cfg: &SteeringConfig) -> Result<Self, SteerError> {
        for name in std::iter::once(&cfg.tunnel).chain(&cfg.interfaces) {
            if if_index(name).is_none() {
                return Err(SteerError::NoInterface(name.clone()));
            }
        }
        let (backend, mode) = match cfg.mode {
            Mode::Bpf => (
                Backend::Bpf(Box::new(bpf::BpfSteering::start(cfg)?)),
                Mode::Bpf,
            ),
            Mode::Policy => (
                Backend::Policy(policy::PolicySteering::start(cfg)?),
                Mode::Policy,
            ),
            Mode::Auto => match bpf::BpfSteering::start(cfg) {
                Ok(b) => (Backend::Bpf(Box::new(b)), Mode::Bpf),
                Err(e) => {
                    tracing::warn!(
                        "{e}; falling back to policy routing (nftables fwmark + ip rule to table {})",
                        cfg.policy.table
                    );
                    (
                        Backend::Policy(policy::PolicySteering::start(cfg)?),
                        Mode::Policy,
                    )
                }
            },
        };
        tracing::info!(%mode, tunnel = %cfg.tunnel, interfaces = ?cfg.interfaces, "steering workload traffic");
        Ok(Self {
            backend: Mutex::new(backend),
            mode,
        })
    }

    /// The backend in use: [`Mode::Bpf`] or [`Mode::Policy`].
    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn with<T>(&self, f: impl FnOnce(&mut Backend) -> T) -> T {
        let mut guard = self.backend.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// Steers packets to `prefix` into the tunnel (idempotent).
    pub fn add_remote(&self, prefix: Prefix) -> Result<(), SteerError> {
        let prefix = canonical(prefix)?;
        self.with(|b| match b {
            Backend::Bpf(b) => b.add_remote(prefix),
            Backend::Policy(p) => p.add_remote(prefix),
        })
    }

    /// Stops steering packets to `prefix` (idempotent).
    pub fn remove_remote(&self, prefix: Prefix) -> Result<(), SteerError> {
        let prefix = canonical(prefix)?;
        self.with(|b| match b {
            Backend::Bpf(b) => b.remove_remote(prefix),
            Backend::Policy(p) => p.remove_remote(prefix),
        })
    }

    /// Lets packets to `prefix` pass untouched even when a steered prefix
    /// covers it (longest prefix wins), e.g. a node's own pod prefix inside the
    /// cluster's pod space (idempotent).
    pub fn add_local(&self, prefix: Prefix) -> Result<(), SteerError> {
        let prefix = canonical(prefix)?;
        self.with(|b| match b {
            Backend::Bpf(b) => b.add_local(prefix),
            Backend::Policy(p) => p.add_local(prefix),
        })
    }

    /// Makes the steered remote prefixes exactly `prefixes`: new entries are
    /// written first, stale ones removed after.
    pub fn sync_remotes(&self, prefixes: &[Prefix]) -> Result<(), SteerError> {
        let wanted = prefixes
            .iter()
            .map(|p| canonical(*p))
            .collect::<Result<std::collections::BTreeSet<_>, _>>()?;
        for p in &wanted {
            self.add_remote(*p)?;
        }
        for p in self.remotes() {
            if !wanted.contains(&p) {
                self.remove_remote(p)?;
            }
        }
        Ok(())
    }

    /// The remote prefixes steered now.
    pub fn remotes(&self) -> Vec<Prefix> {
        self.with(|b| match b {
            Backend::Bpf(b) => b.remotes(),
            Backend::Policy(p) => p.remotes(),
        })
    }

    /// Sets egress policy `policy`: packets from any of `sources` to any of
    /// `destinations` go into the tunnel. Replaces the policy's previous
    /// entries (new ones written first).
    pub fn set_egress(
        &self,
        policy: u32,
        sources: &[Prefix],
        destinations: &[Prefix],
    ) -> Result<(), SteerError> {
        let sources = sources
            .iter()
            .map(|p| canonical(*p))
            .collect::<Result<Vec<_>, _>>()?;
        let destinations = destinations
            .iter()
            .map(|p| canonical(*p))
            .collect::<Result<Vec<_>, _>>()?;
        self.with(|b| match b {
            Backend::Bpf(b) => b.set_egress(policy, &sources, &destinations),
            Backend::Policy(p) => p.set_egress(policy, &sources, &destinations),
        })
    }

    /// Removes egress policy `policy` (idempotent).
    pub fn remove_egress(&self, policy: u32) -> Result<(), SteerError> {
        self.set_egress(policy, &[], &[])
    }

    /// Counters and entries.
    pub fn status(&self) -> SteeringStatus {
        self.with(|b| match b {
            Backend::Bpf(b) => b.status(),
            Backend::Policy(p) => p.status(),
        })
    }
}

/// Index of interface `name` in the calling thread's network namespace
/// (sysfs would show the namespace it was mounted in instead).
pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// ARPHRD_* link type of interface `name` (SIOCGIFHWADDR), in the calling
/// thread's network namespace.
pub fn link_type(name: &str) -> Option<u16> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: socket(2) with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a descriptor we just opened and now own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name and writes ifr_hwaddr of the ifreq we
    // pass, which lives for the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut ifr) };
    if rc < 0 {
        return None;
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds ifr_hwaddr.
    Some(unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Names of the TCX ingress programs attached to `interface` (for checks that
/// nothing stale is left behind).
pub fn tcx_ingress_programs(interface: &str) -> Result<Vec<String>, SteerError> {
    bpf::attached_names(interface)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_clears_host_bits_and_checks_length() {
        let p = canonical(("10.1.2.3".parse().unwrap(), 16)).unwrap();
        assert_eq!(prefix_str(p), "10.1.0.0/16");
        let p = canonical(("fd00::1:2".parse().unwrap(), 64)).unwrap();
        assert_eq!(prefix_str(p), "fd00::/64");
        assert_eq!(
            prefix_str(canonical(("1.2.3.4".parse().unwrap(), 0)).unwrap()),
            "0.0.0.0/0"
        );
        assert!(canonical(("1.2.3.4".parse().unwrap(), 33)).is_err());
        assert!(canonical(("::".parse().unwrap(), 129)).is_err());
    }
}
