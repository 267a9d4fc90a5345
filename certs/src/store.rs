//! A CA directory: where `isthmusctl certs init/issue` keep the mesh PKI.
//!
//! ```text
//! <dir>/root-ca.pem   root-ca.key           mesh root CA
//! <dir>/bundle.pem                          trust bundle handed to gateways
//! <dir>/clusters/<cluster>/ca.pem  ca.key   cluster intermediate CA
//! <dir>/clusters/<cluster>/gateways/<name>.pem  <name>.key   gateway chain and key
//! ```
//!
//! Directories are created 0700 and keys 0600; nothing that exists is overwritten.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use isthmus_identity::{ClusterName, GatewayName, TrustDomain};

use crate::bundle::TrustBundle;
use crate::ca::{ClusterCa, LeafKind, MeshRootCa, Validity};
use crate::error::CertError;

/// Paths of a gateway's issued files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayFiles {
    /// Leaf + intermediate, PEM.
    pub chain: PathBuf,
    /// Private key, PEM, mode 0600.
    pub key: PathBuf,
}

/// An initialised CA directory.
#[derive(Debug, Clone)]
pub struct CaDirectory {
    dir: PathBuf,
}

fn mkdir(path: &Path) -> Result<(), CertError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| CertError::io(path, e))
}

fn refuse_existing(path: &Path) -> Result<(), CertError> {
    if path.exists() {
        return Err(CertError::AlreadyExists {
            path: path.to_owned(),
        });
    }
    Ok(())
}

impl CaDirectory {
    /// Creates the mesh root CA and the trust bundle in `dir` (created if missing).
    pub fn init(
        dir: &Path,
        trust_domain: &TrustDomain,
        validity: Validity,
    ) -> Result<Self, CertError> {
        let store = Self {
            dir: dir.to_owned(),
        };
        refuse_existing(&store.root_cert_path())?;
        refuse_existing(&store.root_key_path())?;
        mkdir(dir)?;
        let root = MeshRootCa::create(trust_domain, validity)?;
        root.save(&store.root_cert_path(), &store.root_key_path())?;
        let mut bundle = TrustBundle::new();
        bundle.add(root.certificate().clone())?;
        bundle.save(&store.bundle_path())?;
        Ok(store)
    }

    /// Opens an initialised directory.
    pub fn open(dir: &Path) -> Result<Self, CertError> {
        let store = Self {
            dir: dir.to_owned(),
        };
        if !store.root_cert_path().is_file() {
            return Err(CertError::NotInitialised {
                path: dir.to_owned(),
            });
        }
        Ok(store)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The root certificate file.
    pub fn root_cert_path(&self) -> PathBuf {
        self.dir.join("root-ca.pem")
    }

    fn root_key_path(&self) -> PathBuf {
        self.dir.join("root-ca.key")
    }

    /// The trust bundle file.
    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }

    fn cluster_dir(&self, cluster: &ClusterName) -> PathBuf {
        self.dir.join("clusters").join(cluster.as_str())
    }

    /// The cluster CA certificate file.
    pub fn cluster_cert_path(&self, cluster: &ClusterName) -> PathBuf {
        self.cluster_dir(cluster).join("ca.pem")
    }

    fn cluster_key_path(&self, cluster: &ClusterName) -> PathBuf {
        self.cluster_dir(cluster).join("ca.key")
    }

    /// The files a gateway's certificate is issued to.
    pub fn gateway_files(&self, cluster: &ClusterName, name: &GatewayName) -> GatewayFiles {
        self.leaf_files(LeafKind::Gateway, cluster, name)
    }

    /// The files a leaf certificate is issued to (`gateways/` or `admins/` of the
    /// cluster's directory).
    pub fn leaf_files(
        &self,
        kind: LeafKind,
        cluster: &ClusterName,
        name: &GatewayName,
    ) -> GatewayFiles {
        let dir = self.cluster_dir(cluster).join(match kind {
            LeafKind::Gateway => "gateways",
            LeafKind::Admin => "admins",
        });
        GatewayFiles {
            chain: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    /// Loads the root CA.
    pub fn root_ca(&self) -> Result<MeshRootCa, CertError> {
        MeshRootCa::load(&self.root_cert_path(), &self.root_key_path())
    }

    /// Loads the trust bundle.
    pub fn bundle(&self) -> Result<TrustBundle, CertError> {
        TrustBundle::load(&self.bundle_path())
    }

    /// Issues and stores the intermediate CA of `cluster`.
    pub fn issue_cluster_ca(
        &self,
        cluster: &ClusterName,
        validity: Validity,
    ) -> Result<PathBuf, CertError> {
        let cert_path = self.cluster_cert_path(cluster);
        refuse_existing(&cert_path)?;
        refuse_existing(&self.cluster_key_path(cluster))?;
        let ca = self.root_ca()?.issue_cluster_ca(cluster, validity)?;
        mkdir(&self.cluster_dir(cluster))?;
        ca.save(&cert_path, &self.cluster_key_path(cluster))?;
        Ok(cert_path)
    }

    /// Loads the intermediate CA of `cluster`.
    pub fn cluster_ca(&self, cluster: &ClusterName) -> Result<ClusterCa, CertError> {
        let cert_path = self.cluster_cert_path(cluster);
        if !cert_path.is_file() {
            return Err(CertError::UnknownCluster(cluster.to_string()));
        }
        ClusterCa::load(&cert_path, &self.cluster_key_path(cluster))
    }

    /// Issues and stores the certificate of gateway `name` in `cluster`.
    pub fn issue_gateway(
        &self,
        cluster: &ClusterName,
        name: &GatewayName,
        validity: Validity,
    ) -> Result<GatewayFiles, CertError> {
        self.issue_leaf(LeafKind::Gateway, cluster, name, validity)
    }

    /// Issues and stores a leaf certificate of `cluster` (never over existing files).
    pub fn issue_leaf(
        &self,
        kind: LeafKind,
        cluster: &ClusterName,
        name: &GatewayName,
        validity: Validity,
    ) -> Result<GatewayFiles, CertError> {
        let files = self.leaf_files(kind, cluster, name);
        refuse_existing(&files.chain)?;
        refuse_existing(&files.key)?;
        let issued = self.cluster_ca(cluster)?.issue_leaf(kind, name, validity)?;
        if let Some(dir) = files.chain.parent() {
            mkdir(dir)?;
        }
        issued.save(&files.chain, &files.key)?;
        Ok(files)
    }

    /// Issues a new certificate and key for gateway `name` in `cluster`, which must
    /// have one already, and replaces its files atomically. The old certificate is
    /// not revoked (it stays valid until it expires or is revoked).
    pub fn rotate_gateway(
        &self,
        cluster: &ClusterName,
        name: &GatewayName,
        validity: Validity,
    ) -> Result<GatewayFiles, CertError> {
        let files = self.gateway_files(cluster, name);
        if !files.chain.is_file() {
            return Err(CertError::NotAFile {
                path: files.chain.clone(),
            });
        }
        let issued = self.cluster_ca(cluster)?.issue_gateway(name, validity)?;
        issued.replace(&files.chain, &files.key)?;
        Ok(files)
    }
}
