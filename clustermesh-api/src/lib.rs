//! The Isthmus clustermesh API.
//!
//! Each cluster runs an API server (`isthmus-clustermesh-api`) that publishes that
//! cluster's state, read from a [`source`] (a file, etcd, or Kubernetes), to the other
//! clusters' gateways over gRPC on mTLS. Gateways watch every remote cluster's server
//! ([`client`]) and fold the streams into tables ([`reducer`]) that become channel peers,
//! tunnel peers and prefix routes.
//!
//! - [`pb`]: the generated protocol (`proto/clustermesh.proto`).
//! - [`model`]: keys, validation and the authorization rule (a server publishes only the
//!   cluster of its own SPIFFE ID).
//! - [`store`]: the server's revisioned object store with a bounded change history
//!   (sans-IO): snapshots, resumes and explicit resyncs are decided here.
//! - [`server`]: the tonic service and the mTLS listener.
//! - [`client`]: one watch per remote cluster, reconnecting with jittered exponential
//!   backoff and resuming with `(epoch, revision)`.
//! - [`crd`]: the `IsthmusCluster` custom resource (a cluster's membership), read by the
//!   Kubernetes source.
//! - [`reducer`]: the gateway's view of the mesh (sans-IO, fake-clock testable): mark and
//!   sweep at `SnapshotEnd`, uid-checked deletes, per-cluster liveness
//!   (Connected → Stale → Withdrawn), prefix-overlap refusals.

pub mod client;
pub mod config;
pub mod crd;
pub mod model;
pub mod reducer;
pub mod server;
pub mod source;
pub mod store;

/// The generated protocol.
#[allow(missing_docs, missing_debug_implementations, clippy::all)]
pub mod pb {
    tonic::include_proto!("isthmus.clustermesh.v1");
}

/// ALPN of the clustermesh API over TLS (gRPC needs HTTP/2).
pub const ALPN: &[u8] = b"h2";
