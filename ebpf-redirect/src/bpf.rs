//! The BPF backend: the `isthmus-steer` TC program on TCX ingress links.

use crate::{prefix_str, Count, Entry, EntryStatus, Mode, Prefix, SteerError};
use crate::{SteeringConfig, SteeringStatus};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use aya::programs::links::LinkOrder;
use aya::programs::tc::{SchedClassifierLinkId, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use isthmus_ebpf_common::{
    Counter, EgressDst, EgressSrc4, EgressSrc6, Target, FIRST_ENTRY_SLOT, MAX_COUNTER_SLOTS,
    SLOT_MALFORMED, SLOT_PASS, SLOT_REDIRECT, SLOT_REDIRECT_FAILED, SLOT_TOO_BIG,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The program object, built by `build.rs` from `programs/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/isthmus-steer.o"));

/// Name of the classifier function in the object (also what the kernel lists).
pub const PROGRAM: &str = "isthmus_steer";

/// Counter slots handed to map entries; freed slots are reused (and zeroed).
#[derive(Debug, Default)]
struct Slots {
    next: u32,
    free: Vec<u32>,
}

impl Slots {
    fn take(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        let s = FIRST_ENTRY_SLOT + self.next;
        if s >= MAX_COUNTER_SLOTS {
            return None;
        }
        self.next += 1;
        Some(s)
    }
}

#[derive(Debug, Default, Clone)]
struct EgressPolicy {
    /// Source prefix → counter slot.
    sources: BTreeMap<Prefix, u32>,
    /// Destination prefix → counter slot.
    destinations: BTreeMap<Prefix, u32>,
}

/// The loaded, attached program and its maps. Dropping it closes the TCX
/// links: the kernel detaches the program from every interface.
pub struct BpfSteering {
    tunnel: String,
    interfaces: Vec<String>,
    tun_ifindex: u32,
    ncpus: usize,
    remote4: LpmTrie<MapData, [u8; 4], Target>,
    remote6: LpmTrie<MapData, [u8; 16], Target>,
    egress_dst4: LpmTrie<MapData, [u8; 4], EgressDst>,
    egress_dst6: LpmTrie<MapData, [u8; 16], EgressDst>,
    egress_src4: LpmTrie<MapData, EgressSrc4, Target>,
    egress_src6: LpmTrie<MapData, EgressSrc6, Target>,
    counters: PerCpuArray<MapData, Counter>,
    slots: Slots,
    remotes: BTreeMap<Prefix, u32>,
    locals: BTreeMap<Prefix, u32>,
    egress: BTreeMap<u32, EgressPolicy>,
    _links: Vec<SchedClassifierLinkId>,
    // Declared last: dropped after the maps above, and with it the program and
    // its TCX links.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for BpfSteering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfSteering")
            .field("tunnel", &self.tunnel)
            .field("interfaces", &self.interfaces)
            .field("remotes", &self.remotes.len())
            .field("egress_policies", &self.egress.len())
            .finish()
    }
}

fn bpf_err(what: &str, e: impl std::fmt::Display) -> SteerError {
    SteerError::Bpf(format!("{what}: {e}"))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, SteerError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| SteerError::Bpf(format!("map {name} missing from the object")))?;
    T::try_from(map).map_err(|e| bpf_err(&format!("map {name}"), e))
}

fn ifindex(name: &str) -> Result<u32, SteerError> {
    crate::if_index(name).ok_or_else(|| SteerError::NoInterface(name.to_string()))
}

/// The program parses Ethernet frames: only ARPHRD_ETHER interfaces qualify.
fn is_ethernet(name: &str) -> bool {
    crate::link_type(name) == Some(libc::ARPHRD_ETHER)
}

impl BpfSteering {
    /// Loads the program and its maps and attaches it (TCX, ingress) to every
    /// workload interface.
    pub fn start(cfg: &SteeringConfig) -> Result<Self, SteerError> {
        for name in &cfg.interfaces {
            if !is_ethernet(name) {
                return Err(SteerError::Bpf(format!(
                    "{name} is not an Ethernet interface (the program parses Ethernet frames)"
                )));
            }
        }
        let tun_ifindex = ifindex(&cfg.tunnel)?;
        let ncpus = aya::util::nr_cpus().map_err(|(what, e)| bpf_err(what, e))?;
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| bpf_err("loading the program", e))?;
        let remote4 = take_map(&mut ebpf, "REMOTE4")?;
        let remote6 = take_map(&mut ebpf, "REMOTE6")?;
        let egress_dst4 = take_map(&mut ebpf, "EGRESS_DST4")?;
        let egress_dst6 = take_map(&mut ebpf, "EGRESS_DST6")?;
        let egress_src4 = take_map(&mut ebpf, "EGRESS_SRC4")?;
        let egress_src6 = take_map(&mut ebpf, "EGRESS_SRC6")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| SteerError::Bpf(format!("program {PROGRAM} missing from the object")))?
            .try_into()
            .map_err(|e| bpf_err("program type", e))?;
        program
            .load()
            .map_err(|e| bpf_err("the kernel refused the program", e))?;
        let mut links = Vec::new();
        for name in &cfg.interfaces {
            // TCX (kernel >= 6.6): a link owned by this process, gone with it.
            let link = program
                .attach_with_options(
                    name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| bpf_err(&format!("TCX attach to {name}"), e))?;
            links.push(link);
        }
        Ok(Self {
            tunnel: cfg.tunnel.clone(),
            interfaces: cfg.interfaces.clone(),
            tun_ifindex,
            ncpus,
            remote4,
            remote6,
            egress_dst4,
            egress_dst6,
            egress_src4,
            egress_src6,
            counters,
            slots: Slots::default(),
            remotes: BTreeMap::new(),
            locals: BTreeMap::new(),
            egress: BTreeMap::new(),
            _links: links,
            _ebpf: ebpf,
        })
    }

    fn new_slot(&mut self) -> Result<u32, SteerError> {
        let slot = self
            .slots
            .take()
            .ok_or_else(|| SteerError::Invalid("too many steering entries".into()))?;
        let zero = PerCpuValues::try_from(vec![Counter::default(); self.ncpus])
            .map_err(|e| bpf_err("counter values", e))?;
        if let Err(e) = self.counters.set(slot, zero, 0) {
            self.slots.free.push(slot);
            return Err(bpf_err("resetting a counter", e));
        }
        Ok(slot)
    }

    fn read(&self, slot: u32) -> Count {
        match self.counters.get(&slot, 0) {
            Ok(values) => values.iter().fold(Count::default(), |acc, c| Count {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            }),
            Err(_) => Count::default(),
        }
    }

    pub(crate) fn add_remote(&mut self, prefix: Prefix) -> Result<(), SteerError> {
        if self.locals.contains_key(&prefix) {
            return Err(SteerError::Invalid(format!(
                "{} is a local prefix",
                prefix_str(prefix)
            )));
        }
        self.insert_prefix(prefix, self.tun_ifindex)
    }

    pub(crate) fn add_local(&mut self, prefix: Prefix) -> Result<(), SteerError> {
        if self.remotes.contains_key(&prefix) {
            return Err(SteerError::Invalid(format!(
                "{} is a remote prefix",
                prefix_str(prefix)
            )));
        }
        self.insert_prefix(prefix, 0)
    }

    /// Writes a prefix entry: into the tunnel (`ifindex` of the tunnel) or
    /// local (`0`).
    fn insert_prefix(&mut self, prefix: Prefix, ifindex: u32) -> Result<(), SteerError> {
        let book = if ifindex == 0 {
            &self.locals
        } else {
            &self.remotes
        };
        if book.contains_key(&prefix) {
            return Ok(());
        }
        let slot = self.new_slot()?;
        let target = Target { ifindex, slot };
        let res = match prefix.0 {
            IpAddr::V4(a) => self
                .remote4
                .insert(&Key::new(prefix.1.into(), a.octets()), target, 0),
            IpAddr::V6(a) => self
                .remote6
                .insert(&Key::new(prefix.1.into(), a.octets()), target, 0),
        };
        if let Err(e) = res {
            self.slots.free.push(slot);
            return Err(bpf_err(&format!("adding {}", prefix_str(prefix)), e));
        }
        if ifindex == 0 {
            self.locals.insert(prefix, slot);
        } else {
            self.remotes.insert(prefix, slot);
        }
        Ok(())
    }

    pub(crate) fn remove_remote(&mut self, prefix: Prefix) -> Result<(), SteerError> {
        let Some(&slot) = self.remotes.get(&prefix) else {
            return Ok(());
        };
        let res = match prefix.0 {
            IpAddr::V4(a) => self.remote4.remove(&Key::new(prefix.1.into(), a.octets())),
            IpAddr::V6(a) => self.remote6.remove(&Key::new(prefix.1.into(), a.octets())),
        };
        match res {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(bpf_err(&format!("removing {}", prefix_str(prefix)), e)),
        }
        self.remotes.remove(&prefix);
        self.slots.free.push(slot);
        Ok(())
    }

    pub(crate) fn remotes(&self) -> Vec<Prefix> {
        self.remotes.keys().copied().collect()
    }

    fn src_insert(&mut self, policy: u32, src: Prefix, slot: u32) -> Result<(), SteerError> {
        let target = Target {
            ifindex: self.tun_ifindex,
            slot,
        };
        let policy_be = policy.to_be_bytes();
        let len = 32 + u32::from(src.1);
        match src.0 {
            IpAddr::V4(a) => self.egress_src4.insert(
                &Key::new(
                    len,
                    EgressSrc4 {
                        policy_be,
                        addr: a.octets(),
                    },
                ),
                target,
                0,
            ),
            IpAddr::V6(a) => self.egress_src6.insert(
                &Key::new(
                    len,
                    EgressSrc6 {
                        policy_be,
                        addr: a.octets(),
                    },
                ),
                target,
                0,
            ),
        }
        .map_err(|e| bpf_err(&format!("adding egress source {}", prefix_str(src)), e))
    }

    fn src_remove(&mut self, policy: u32, src: Prefix) -> Result<(), SteerError> {
        let policy_be = policy.to_be_bytes();
        let len = 32 + u32::from(src.1);
        let res = match src.0 {
            IpAddr::V4(a) => self.egress_src4.remove(&Key::new(
                len,
                EgressSrc4 {
                    policy_be,
                    addr: a.octets(),
                },
            )),
            IpAddr::V6(a) => self.egress_src6.remove(&Key::new(
                len,
                EgressSrc6 {
                    policy_be,
                    addr: a.octets(),
                },
            )),
        };
        match res {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(bpf_err(
                &format!("removing egress source {}", prefix_str(src)),
                e,
            )),
        }
    }

    fn dst_insert(&mut self, policy: u32, dst: Prefix, slot: u32) -> Result<(), SteerError> {
        let value = EgressDst { policy, slot };
        match dst.0 {
            IpAddr::V4(a) => self
                .egress_dst4
                .insert(&Key::new(dst.1.into(), a.octets()), value, 0),
            IpAddr::V6(a) => self
                .egress_dst6
                .insert(&Key::new(dst.1.into(), a.octets()), value, 0),
        }
        .map_err(|e| bpf_err(&format!("adding egress destination {}", prefix_str(dst)), e))
    }

    fn dst_remove(&mut self, dst: Prefix) -> Result<(), SteerError> {
        let res = match dst.0 {
            IpAddr::V4(a) => self.egress_dst4.remove(&Key::new(dst.1.into(), a.octets())),
            IpAddr::V6(a) => self.egress_dst6.remove(&Key::new(dst.1.into(), a.octets())),
        };
        match res {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(bpf_err(
                &format!("removing egress destination {}", prefix_str(dst)),
                e,
            )),
        }
    }

    pub(crate) fn set_egress(
        &mut self,
        policy: u32,
        sources: &[Prefix],
        destinations: &[Prefix],
    ) -> Result<(), SteerError> {
        let sources: BTreeSet<Prefix> = sources.iter().copied().collect();
        let destinations: BTreeSet<Prefix> = destinations.iter().copied().collect();
        // One destination prefix belongs to one policy (the map says which
        // policy's sources to check).
        for (other, p) in &self.egress {
            if *other == policy {
                continue;
            }
            if let Some(d) = destinations.iter().find(|d| p.destinations.contains_key(d)) {
                return Err(SteerError::Invalid(format!(
                    "egress destination {} already belongs to egress policy {other}",
                    prefix_str(*d)
                )));
            }
        }
        let old = self.egress.get(&policy).cloned().unwrap_or_default();
        let mut new = EgressPolicy::default();
        // Sources first (so a destination never points at an empty policy that
        // should have sources), then destinations; stale ones removed after.
        for src in &sources {
            let slot = match old.sources.get(src) {
                Some(&s) => s,
                None => {
                    let s = self.new_slot()?;
                    if let Err(e) = self.src_insert(policy, *src, s) {
                        self.slots.free.push(s);
                        return Err(e);
                    }
                    s
                }
            };
            new.sources.insert(*src, slot);
        }
        for dst in &destinations {
            let slot = match old.destinations.get(dst) {
                Some(&s) => s,
                None => {
                    let s = self.new_slot()?;
                    if let Err(e) = self.dst_insert(policy, *dst, s) {
                        self.slots.free.push(s);
                        return Err(e);
                    }
                    s
                }
            };
            new.destinations.insert(*dst, slot);
        }
        for (dst, slot) in &old.destinations {
            if !new.destinations.contains_key(dst) {
                self.dst_remove(*dst)?;
                self.slots.free.push(*slot);
            }
        }
        for (src, slot) in &old.sources {
            if !new.sources.contains_key(src) {
                self.src_remove(policy, *src)?;
                self.slots.free.push(*slot);
            }
        }
        if new.sources.is_empty() && new.destinations.is_empty() {
            self.egress.remove(&policy);
        } else {
            self.egress.insert(policy, new);
        }
        Ok(())
    }

    pub(crate) fn status(&self) -> SteeringStatus {
        let mut entries: Vec<EntryStatus> = self
            .remotes
            .iter()
            .map(|(p, slot)| EntryStatus {
                entry: Entry::Remote {
                    prefix: prefix_str(*p),
                },
                steered: self.read(*slot),
            })
            .collect();
        entries.extend(self.locals.iter().map(|(p, slot)| EntryStatus {
            entry: Entry::Local {
                prefix: prefix_str(*p),
            },
            steered: self.read(*slot),
        }));
        for (policy, p) in &self.egress {
            for (src, slot) in &p.sources {
                entries.push(EntryStatus {
                    entry: Entry::Egress {
                        policy: *policy,
                        source: prefix_str(*src),
                    },
                    steered: self.read(*slot),
                });
            }
        }
        SteeringStatus {
            mode: Mode::Bpf,
            tunnel: self.tunnel.clone(),
            interfaces: self.interfaces.clone(),
            redirected: self.read(SLOT_REDIRECT),
            passed: self.read(SLOT_PASS),
            redirect_failed: self.read(SLOT_REDIRECT_FAILED),
            malformed: self.read(SLOT_MALFORMED),
            too_big: self.read(SLOT_TOO_BIG),
            entries,
        }
    }
}

/// Names of the TCX ingress programs attached to `interface`.
pub fn attached_names(interface: &str) -> Result<Vec<String>, SteerError> {
    let (_, programs) = SchedClassifier::query_tcx(interface, TcAttachType::Ingress)
        .map_err(|e| bpf_err(&format!("querying TCX programs of {interface}"), e))?;
    Ok(programs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("?").to_string())
        .collect())
}
