//! Trust bundles: the set of mesh roots a gateway trusts, stored as one PEM file.
//!
//! A bundle may hold several roots at once, so a root can be rotated with overlap: add the
//! new root to every gateway's bundle, re-issue intermediates and leaves under it, then
//! remove the old root.

use std::path::Path;

use isthmus_identity::MeshTrust;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::error::CertError;
use crate::files;
use crate::show::CertificateSummary;

/// An ordered set of self-signed mesh root certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// An empty bundle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a PEM bundle; every certificate must be a self-signed CA.
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, CertError> {
        let mut bundle = Self::new();
        for root in files::parse_certificates(pem, what)? {
            bundle.add(root)?;
        }
        Ok(bundle)
    }

    /// Loads a PEM bundle file.
    pub fn load(path: &Path) -> Result<Self, CertError> {
        let pem = std::fs::read_to_string(path).map_err(|e| CertError::io(path, e))?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// Writes the bundle (0644, atomic).
    pub fn save(&self, path: &Path) -> Result<(), CertError> {
        files::write_public_file(path, &self.to_pem())
    }

    /// The PEM text (one CERTIFICATE block per root).
    pub fn to_pem(&self) -> String {
        let ders: Vec<&[u8]> = self.roots.iter().map(|c| c.as_ref()).collect();
        files::encode_pem("CERTIFICATE", &ders)
    }

    /// Adds a root; returns `false` if it was already present.
    pub fn add(&mut self, root: CertificateDer<'static>) -> Result<bool, CertError> {
        let summary = CertificateSummary::from_der(&root)?;
        if !summary.is_ca || summary.subject != summary.issuer {
            return Err(CertError::BadCertificate(format!(
                "{} is not a self-signed CA certificate; a trust bundle holds roots only",
                summary.subject
            )));
        }
        if self.roots.contains(&root) {
            return Ok(false);
        }
        self.roots.push(root);
        Ok(true)
    }

    /// Removes the root with this SHA-256 fingerprint; returns whether one was removed.
    pub fn remove(&mut self, sha256_fingerprint: &[u8; 32]) -> bool {
        let before = self.roots.len();
        self.roots.retain(|root| {
            ring::digest::digest(&ring::digest::SHA256, root).as_ref() != sha256_fingerprint
        });
        self.roots.len() != before
    }

    /// The roots, in order.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Whether the bundle is empty.
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The trust configuration of the peer channel: these roots plus `crls`.
    pub fn to_mesh_trust(&self, crls: Vec<CertificateRevocationListDer<'static>>) -> MeshTrust {
        MeshTrust {
            roots: self.roots.clone(),
            crls,
        }
    }
}
