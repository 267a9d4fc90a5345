//! A mesh CA, two clusters and a gateway of each, with the files a gateway's
//! `[identity]` reads (for tests).

#![allow(clippy::unwrap_used)]

use crate::config::{IdentityConfig, IdentityFiles};
use isthmus_certs::{ClusterCa, IssuedCertificate, MeshRootCa, Validity};
use isthmus_identity::{ClusterName, GatewayId, GatewayName, SpiffeId, TrustDomain};
use std::path::PathBuf;

pub struct Pki {
    pub dir: PathBuf,
    pub td: TrustDomain,
    pub ca_a: ClusterCa,
    pub ca_b: ClusterCa,
    /// Gateway `gw` of cluster `b`: its peer.
    pub leaf_b: IssuedCertificate,
    /// `crls_dir` of the files.
    pub crls: PathBuf,
    pub files: IdentityFiles,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "isthmus-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let crls = dir.join("crls");
        std::fs::create_dir_all(&crls).unwrap();
        let td = TrustDomain::new("mesh.test").unwrap();
        let root = MeshRootCa::create(&td, Validity::days(30)).unwrap();
        let ca = |c: &str| {
            root.issue_cluster_ca(&ClusterName::new(c).unwrap(), Validity::days(30))
                .unwrap()
        };
        let (ca_a, ca_b) = (ca("a"), ca("b"));
        let gw = GatewayName::new("gw").unwrap();
        let leaf_a = ca_a.issue_gateway(&gw, Validity::days(30)).unwrap();
        let leaf_b = ca_b.issue_gateway(&gw, Validity::days(30)).unwrap();
        let files = IdentityFiles {
            trust_bundle: dir.join("bundle.pem"),
            certificate: dir.join("a.pem"),
            private_key: dir.join("a.key"),
            crls: vec![],
            crls_dir: Some(crls.clone()),
        };
        std::fs::write(&files.trust_bundle, root.certificate_pem()).unwrap();
        leaf_a.save(&files.certificate, &files.private_key).unwrap();
        Self {
            dir,
            td,
            ca_a,
            ca_b,
            leaf_b,
            crls,
            files,
        }
    }

    /// The `[identity]` of gateway a as read now (listening on loopback).
    pub fn identity(&self) -> IdentityConfig {
        IdentityConfig {
            credentials: self.files.load_credentials().unwrap(),
            trust: self.files.load_trust().unwrap(),
            files: self.files.clone(),
            reload_interval: std::time::Duration::from_secs(3600),
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise_address: None,
        }
    }

    pub fn id(&self, cluster: &str) -> SpiffeId {
        GatewayId::new(
            self.td.clone(),
            ClusterName::new(cluster).unwrap(),
            GatewayName::new("gw").unwrap(),
        )
        .spiffe_id()
    }

    /// Writes cluster b's CRL with CRL number `number`, revoking its gateway.
    pub fn revoke_b(&self, number: u64) {
        self.write_crl(&self.ca_b, &[&self.leaf_b], number, "b.crl.pem");
    }

    /// Writes `ca`'s CRL revoking `leaves` into the CRL directory as `file`.
    pub fn write_crl(
        &self,
        ca: &ClusterCa,
        leaves: &[&IssuedCertificate],
        number: u64,
        file: &str,
    ) {
        let serials: Vec<_> = leaves.iter().map(|l| l.serial().clone()).collect();
        let crl = ca.crl(&serials, number, Validity::days(7)).unwrap();
        crl.save(&self.crls.join(file)).unwrap();
    }
}
