//! End-to-end test harness for Isthmus.
//!
//! Builds real topologies out of Linux network namespaces and veth pairs, starts real gateways
//! (Isthmus, wireguard-go, boringtun-cli) inside them, and pushes traffic through the tunnels.
//! Everything is named with a per-run random id so that tests can run in parallel (cargo nextest
//! runs each test in its own process), and everything is torn down on drop — including while a
//! failing test unwinds.
//!
//! Needs root (network namespaces, TUN devices). The layout of a topology is the one described in
//! `shared/TESTBED.md`:
//!
//! * site `i` (1-based) has a gateway namespace and a workload namespace joined by a veth pair;
//!   workload `100.64.i.2/24`, gateway side `100.64.i.1/24`, default route of the workload via
//!   the gateway;
//! * the gateways share an underlay (a direct veth for two sites, a bridge namespace for more):
//!   `192.0.2.i/24` or `2001:db8::i/64`.
//!
//! [`mesh_bench_api`] is the exception: the clustermesh API scale benchmark runs API servers
//! and simulated gateways in one process on loopback and needs no namespaces.

pub mod bins;
pub mod capture;
pub mod channel_scale;
pub mod cmd;
pub mod egress_lab;
pub mod esp;
pub mod isthmus;
pub mod keys;
pub mod mesh;
pub mod mesh_bench_api;
pub mod metrics;
pub mod netns;
pub mod process;
pub mod run;
pub mod strongswan;
pub mod topology;
pub mod traffic;
pub mod userspace_wg;

pub use capture::{Capture, Packet, Pcap};
pub use esp::{EspPair, SaFile};
pub use isthmus::{
    EspPeerConfig, EspSettings, GatewayConfig, IkeStatus, IsthmusGateway, PeerConfig, Status,
};
pub use keys::KeyPair;
pub use mesh::{Implementation, Mesh, Node};
pub use netns::Netns;
pub use process::ProcessGuard;
pub use run::Run;
pub use topology::{Site, Topology, Underlay};
pub use traffic::{ping, wait_for_ping, Payload, TransferReport};
pub use userspace_wg::{UserspaceImpl, UserspaceWg};

/// The UDP port every WireGuard implementation listens on in these topologies (each gateway has
/// its own namespace, so they can all use the standard port).
pub const WG_PORT: u16 = 51820;

/// MTU of every tunnel interface.
pub const TUNNEL_MTU: u32 = 1420;
