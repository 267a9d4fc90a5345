//! Map layouts shared by the Isthmus TC steering programs (`programs/`) and
//! the userspace loader (`isthmus-ebpf-redirect`).
//!
//! Everything here is `#[repr(C)]` plain data with no padding, so the eBPF
//! side and the loader agree byte for byte.
#![no_std]

/// Entries per prefix map (remote prefixes, egress destinations, egress sources),
/// per address family.
pub const MAX_PREFIXES: u32 = 16_384;

/// Counter slots: the verdict counters first, then one slot per map entry.
pub const MAX_COUNTER_SLOTS: u32 = 65_536;

/// Counter slot: packets that matched nothing and passed untouched.
pub const SLOT_PASS: u32 = 0;
/// Counter slot: packets redirected into the tunnel device (all entries).
pub const SLOT_REDIRECT: u32 = 1;
/// Counter slot: packets whose redirect the kernel refused (dropped).
pub const SLOT_REDIRECT_FAILED: u32 = 2;
/// Counter slot: IP packets too short to parse (passed untouched, like any
/// non-IP frame; the kernel's own IP input drops them).
pub const SLOT_MALFORMED: u32 = 3;
/// Counter slot: packets larger than the tunnel device's MTU (or GSO packets
/// with larger segments). A mesh packet goes to the kernel's routing instead,
/// whose route into the tunnel carries the tunnel MTU: the sender gets
/// "fragmentation needed" / "packet too big" (path MTU discovery works) or the
/// packet is fragmented into the tunnel. An egress packet is dropped.
pub const SLOT_TOO_BIG: u32 = 4;
/// First slot handed out to map entries.
pub const FIRST_ENTRY_SLOT: u32 = 8;

/// What a matching entry does with the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// Interface index of the tunnel device the packet is redirected to; 0
    /// for a local entry (the packet passes untouched).
    pub ifindex: u32,
    /// Counter slot of this entry.
    pub slot: u32,
}

/// Value of an egress destination entry: which policy's source map to consult.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressDst {
    /// Policy number; the source entries of this policy are keyed by it.
    pub policy: u32,
    /// Counter slot of this destination entry (packets that matched the
    /// destination, whether or not the source was selected).
    pub slot: u32,
}

/// LPM key data of an egress source entry: the policy number (always matched in
/// full, so the prefix length is 32 + the source prefix length) followed by the
/// source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressSrc4 {
    /// Policy number, big-endian so it forms the first 32 bits of the key.
    pub policy_be: [u8; 4],
    /// Source address, network order.
    pub addr: [u8; 4],
}

/// IPv6 form of [`EgressSrc4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressSrc6 {
    /// Policy number, big-endian.
    pub policy_be: [u8; 4],
    /// Source address, network order.
    pub addr: [u8; 16],
}

/// A per-CPU counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes (as the kernel saw them, link-layer header included).
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: the types are #[repr(C)] with only integer and byte-array fields and
    // no padding, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::Target {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressSrc4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::EgressSrc6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counter {}
}
