//! The Isthmus data plane.
//!
//! - [`esp`]: IPsec ESP in UDP with AES-GCM, ESN, anti-replay and SA
//!   lifetimes with make-before-break rekeying; no I/O.
//! - [`wg`]: WireGuard sessions for many peers on boringtun's noise core,
//!   with cryptokey routing (outbound by longest prefix, inbound source check);
//!   no I/O, so it is tested in memory.
//! - [`prefix`]: IPv4/IPv6 prefixes and a longest-prefix-match table.
//! - [`key`]: typed WireGuard keys; private keys never print.
//! - [`counters`]: per-peer and per-device counters, drops by reason.
//! - [`driver`] (Linux): moves packets between a TUN device (with virtio-net
//!   offloads: TSO super-segments in, GRO-coalesced writes out) and UDP sockets
//!   (batched receive with GRO, GSO send) on dedicated threads.
//!
//! It does not parse configuration files, serve the UAPI, or manage routes:
//! that is the gateway's job.

pub mod counters;
#[cfg(target_os = "linux")]
pub mod driver;
pub mod egress;
pub mod esp;
pub mod fuzz_support;
pub mod key;
pub mod prefix;
pub mod wg;

pub use counters::{DeviceDrops, DropReason, PeerDrops, PeerStats};
pub use key::{KeyError, PrivateKey, PublicKey};
pub use prefix::{IpPrefix, PrefixError, PrefixTable};
pub use wg::{Inbound, Outbound, Peer, PeerConfig, PeerSet, PeerSetError, WgCore};
