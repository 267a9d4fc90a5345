//! The Isthmus gateway: configuration, the admin API, and the pieces the
//! `isthmus-gateway` daemon and the `isthmusctl` CLI share.
//!
//! The data plane lives in `isthmus-tunnel`; this crate parses and validates
//! the config file (before any socket exists), serves status over a local
//! admin socket, and defines the status document both binaries speak.

pub mod admin;
pub mod clustermesh;
pub mod config;
pub mod crd;
pub mod diagnose;
pub mod egress;
pub mod ipsec;
pub mod key_rotation;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod reload;
pub mod remote_admin;
pub mod rules;
pub mod socket;
pub mod tcp_service;
#[cfg(test)]
mod test_pki;
pub mod uapi;
