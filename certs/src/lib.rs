//! The Isthmus mesh PKI: a root CA per trust domain, one intermediate CA per cluster,
//! gateway certificates whose URI SAN is `spiffe://<td>/cluster/<cluster>/gateway/<name>`,
//! trust bundles holding several roots (rotation with overlap), and CRLs.
//!
//! - [`ca`]: [`MeshRootCa`], [`ClusterCa`], [`IssuedCertificate`], [`Crl`] (rcgen, ECDSA
//!   P-256, no hand-written ASN.1).
//! - [`bundle`]: [`TrustBundle`], a PEM file of roots.
//! - [`files`]: PEM files; private keys written 0600 and refused when group/other can
//!   access them.
//! - [`show`]: [`CertificateSummary`] (subject, issuer, SPIFFE ID, validity, serial,
//!   SHA-256 fingerprint) — never key material.
//! - [`store`]: [`CaDirectory`], the on-disk layout behind `isthmusctl certs`.
//!
//! It does not verify peers or run TLS (that is `isthmus-identity`'s peer channel, which
//! takes the [`TrustBundle`] roots and [`Crl`]s), publish CRLs, or talk to an external CA.
//! Unix only (file modes).

#![forbid(unsafe_code)]

pub mod bundle;
pub mod ca;
mod error;
pub mod files;
pub mod show;
pub mod store;

pub use bundle::TrustBundle;
pub use ca::{ClusterCa, Crl, IssuedCertificate, LeafKind, MeshRootCa, Validity};
pub use error::CertError;
pub use files::{
    load_certificates, load_credentials, load_crls, load_private_key, read_private_key_pem,
    replace_private_key, write_private_key, write_public_file,
};
pub use show::{CertificateSummary, Serial};
pub use store::{
    CaDirectory, ClusterCaRotation, CrlsWritten, GatewayFiles, LeafCheck, RootRotation,
};
