//! A CA directory: where `isthmusctl certs init/issue` keep the mesh PKI.
//!
//! ```text
//! <dir>/root-ca.pem   root-ca.key           mesh root CA
//! <dir>/bundle.pem                          trust bundle handed to gateways
//! <dir>/clusters/<cluster>/ca.pem  ca.key   cluster intermediate CA
//! <dir>/clusters/<cluster>/gateways/<name>.pem  <name>.key   gateway chain and key
//! <dir>/clusters/<cluster>/admins/<name>.pem    <name>.key   administrator chain and key
//! <dir>/previous/root-ca-<serial>.pem  .key     roots rotated out, still in the bundle
//! <dir>/clusters/<cluster>/previous/ca-<serial>.pem  .key   cluster CAs rotated out
//! ```
//!
//! Directories are created 0700 and keys 0600; `init` and `issue` never overwrite what
//! exists, the `rotate_*` methods replace files atomically and keep what they replace
//! under `previous/`.
//!
//! ## Rotating a CA without cutting anyone
//! - A cluster CA ([`CaDirectory::rotate_cluster_ca`]): a new CA under the same root (a
//!   subject of its own: CRLs are matched to certificates by issuer name), every leaf of
//!   the cluster re-issued under it. Leaves of the old CA keep chaining to the root, so
//!   peers need nothing new; the old CA stays under `previous/` and keeps signing the
//!   cluster's CRL next to the new one until it is revoked or its root retired.
//! - The root ([`CaDirectory::rotate_root`]): a new root is added to the bundle, which
//!   every gateway must have before anything is issued under it; then each cluster CA is
//!   rotated (now under the new root); then [`CaDirectory::retire_previous_roots`] takes
//!   the old roots out of the bundle, refusing while a cluster CA or leaf on file still
//!   chains to one of them.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use isthmus_identity::{ClusterName, GatewayId, GatewayName, SpiffeId, TrustDomain};

use crate::bundle::TrustBundle;
use crate::ca::{ClusterCa, LeafKind, MeshRootCa, Validity, CLOCK_SKEW_ALLOWANCE};
use crate::error::CertError;
use crate::show::{CertificateSummary, Serial};

/// What a cluster CA rotation did.
#[derive(Debug, Clone)]
pub struct ClusterCaRotation {
    /// The CA rotated out (kept under `previous/`).
    pub old: CertificateSummary,
    /// The CA now in force.
    pub new: CertificateSummary,
    /// Every leaf re-issued under the new CA: (kind, name, files, new serial).
    pub reissued: Vec<(LeafKind, GatewayName, GatewayFiles, Serial)>,
    /// Leaves left as they were: (kind, name, files, why): revoked ones (a revoked
    /// gateway must not get a new certificate) and expired ones.
    pub skipped: Vec<(LeafKind, GatewayName, GatewayFiles, String)>,
}

/// A caller's verdict on a leaf on file: why it must not get a new certificate (its
/// revocation records), or `None`.
pub type LeafCheck<'a> = dyn Fn(&CertificateSummary) -> Option<String> + 'a;

/// What [`CaDirectory::write_crls`] wrote.
#[derive(Debug, Clone)]
pub struct CrlsWritten {
    /// The CRL file.
    pub path: PathBuf,
    /// How many CRLs were signed (the CA in force and each archived one that loads).
    pub signed: usize,
    /// Issuers (subjects) of archived CAs whose key did not load: their last CRL was
    /// kept as it was, and stops being valid at its nextUpdate.
    pub carried_over: Vec<String>,
    /// Archived CA certificate files that do not parse (nothing of theirs was kept).
    pub unreadable: Vec<PathBuf>,
}

fn crl_issuer(crl: &crate::ca::Crl) -> Option<String> {
    x509_parser::parse_x509_crl(crl.der().as_ref())
        .ok()
        .map(|(_, c)| c.issuer().to_string())
}

/// What a root rotation did.
#[derive(Debug, Clone)]
pub struct RootRotation {
    /// The root rotated out (kept in the bundle and under `previous/` until retired).
    pub old: CertificateSummary,
    /// The root now in force.
    pub new: CertificateSummary,
    /// How many roots the bundle holds now.
    pub bundle_roots: usize,
}

/// Whether `leaf` (DER) carries `id` and was signed by one of `cas` (DER): a file in the
/// directory is re-issued only if the directory's own CAs issued it for that name, not
/// whatever certificate was put in its place.
fn issued_for(leaf: &[u8], id: &SpiffeId, cas: &[&[u8]]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return false;
    };
    let names_it = crate::show::CertificateSummary::from_der(leaf)
        .ok()
        .and_then(|s| s.spiffe_id)
        .is_some_and(|found| found == *id);
    names_it
        && cas.iter().any(|ca| {
            x509_parser::parse_x509_certificate(ca)
                .is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
        })
}

fn summary(cert: &rustls_pki_types::CertificateDer<'_>) -> Result<CertificateSummary, CertError> {
    CertificateSummary::from_der(cert)
}

/// `<prefix>-<serial hex>.pem` / `.key` in `dir`.
fn archive_files(dir: &Path, prefix: &str, serial: &Serial) -> (PathBuf, PathBuf) {
    let stem = format!("{prefix}-{}", hex::encode(serial.as_bytes()));
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    )
}

/// The `(cert, key)` pairs named `<prefix>-*.pem` in `dir` (none if `dir` is missing),
/// in name order.
fn archived(dir: &Path, prefix: &str) -> Result<Vec<(PathBuf, PathBuf)>, CertError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CertError::io(dir, e)),
    };
    let mut found: Vec<(PathBuf, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{prefix}-")) && n.ends_with(".pem"))
        })
        .map(|p| {
            let key = p.with_extension("key");
            (p, key)
        })
        .collect();
    found.sort();
    Ok(found)
}

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
        let dir = self.leaf_dir(kind, cluster);
        GatewayFiles {
            chain: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    fn leaf_dir(&self, kind: LeafKind, cluster: &ClusterName) -> PathBuf {
        self.cluster_dir(cluster).join(match kind {
            LeafKind::Gateway => "gateways",
            LeafKind::Admin => "admins",
        })
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

    /// The leaves on file of `cluster`: (kind, name, files), gateways first, in name
    /// order.
    pub fn leaves(
        &self,
        cluster: &ClusterName,
    ) -> Result<Vec<(LeafKind, GatewayName, GatewayFiles)>, CertError> {
        let mut found = Vec::new();
        for kind in [LeafKind::Gateway, LeafKind::Admin] {
            let dir = self.leaf_dir(kind, cluster);
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(CertError::io(&dir, e)),
            };
            let mut names: Vec<GatewayName> = entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name();
                    let stem = name.to_str()?.strip_suffix(".pem")?;
                    GatewayName::new(stem).ok()
                })
                .collect();
            names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
            for name in names {
                let files = self.leaf_files(kind, cluster, &name);
                found.push((kind, name, files));
            }
        }
        Ok(found)
    }

    fn previous_dir(&self, cluster: Option<&ClusterName>) -> PathBuf {
        match cluster {
            None => self.dir.join("previous"),
            Some(c) => self.cluster_dir(c).join("previous"),
        }
    }

    /// The roots rotated out and not retired yet (`previous/`), oldest name first.
    pub fn previous_roots(&self) -> Result<Vec<MeshRootCa>, CertError> {
        archived(&self.previous_dir(None), "root-ca")?
            .iter()
            .map(|(cert, key)| MeshRootCa::load(cert, key))
            .collect()
    }

    /// The certificate files of the CAs rotated out and kept (`previous/`): the roots'
    /// (`cluster` `None`) or a cluster's. Listed by name, without reading them.
    pub fn previous_ca_files(
        &self,
        cluster: Option<&ClusterName>,
    ) -> Result<Vec<PathBuf>, CertError> {
        let prefix = if cluster.is_some() { "ca" } else { "root-ca" };
        Ok(archived(&self.previous_dir(cluster), prefix)?
            .into_iter()
            .map(|(cert, _)| cert)
            .collect())
    }

    /// The CAs of a level rotated out and kept that load (`cluster` `None`: roots), and
    /// the files of those that do not (skipped: one bad file must not stop revocation).
    fn loadable_previous<T>(
        &self,
        cluster: Option<&ClusterName>,
        load: impl Fn(&Path, &Path) -> Result<T, CertError>,
    ) -> Result<(Vec<T>, Vec<PathBuf>), CertError> {
        let prefix = if cluster.is_some() { "ca" } else { "root-ca" };
        let mut loaded = Vec::new();
        let mut unreadable = Vec::new();
        for (cert, key) in archived(&self.previous_dir(cluster), prefix)? {
            match load(&cert, &key) {
                Ok(ca) => loaded.push(ca),
                Err(_) => unreadable.push(cert),
            }
        }
        Ok((loaded, unreadable))
    }

    /// The CAs of `cluster` rotated out and still kept (`previous/`): they sign the
    /// cluster's CRL next to the CA in force while their leaves may be in use.
    pub fn previous_cluster_cas(&self, cluster: &ClusterName) -> Result<Vec<ClusterCa>, CertError> {
        archived(&self.previous_dir(Some(cluster)), "ca")?
            .iter()
            .map(|(cert, key)| ClusterCa::load(cert, key))
            .collect()
    }

    /// Rotates the CA of `cluster`: issues a new one under the root in force, keeps the
    /// old one (certificate and key) under `clusters/<cluster>/previous/`, puts the new
    /// one in place, then re-issues every gateway and administrator certificate of the
    /// cluster under it (new key each, the lifetime it had), each file replaced
    /// atomically. Not re-issued (see [`ClusterCaRotation::skipped`]): a leaf for which
    /// `skip` gives a reason (the caller's revocation records), an expired one, and a
    /// file that is not a certificate of this cluster's CAs (current or rotated out) for
    /// its own name. Old leaves stay valid until they expire or their CA is revoked.
    ///
    /// Every leaf is read before anything changes, so an unreadable one refuses the
    /// rotation with nothing changed; a rotation cut short (a crash) can be run again.
    pub fn rotate_cluster_ca(
        &self,
        cluster: &ClusterName,
        validity: Validity,
        skip: &LeafCheck<'_>,
    ) -> Result<ClusterCaRotation, CertError> {
        let old = self.cluster_ca(cluster)?;
        let old_summary = summary(old.certificate())?;
        let now = std::time::SystemTime::now();
        let mut plan = Vec::new();
        let mut skipped = Vec::new();
        for (kind, name, files) in self.leaves(cluster)? {
            let leaf = match self.own_leaf(kind, cluster, &name, &files, skip)? {
                Ok(leaf) => leaf,
                Err(why) => {
                    skipped.push((kind, name, files, why));
                    continue;
                }
            };
            if leaf.not_after <= now {
                skipped.push((kind, name, files, "expired".to_owned()));
                continue;
            }
            let lifetime = leaf.not_after.duration_since(leaf.not_before).map_or(
                std::time::Duration::from_secs(90 * 86_400),
                |d| {
                    d.saturating_sub(CLOCK_SKEW_ALLOWANCE)
                        .max(std::time::Duration::from_secs(3600))
                },
            );
            plan.push((kind, name, files, lifetime));
        }
        let new = self.root_ca()?.issue_cluster_ca(cluster, validity)?;
        let new_summary = summary(new.certificate())?;
        let archive = self.previous_dir(Some(cluster));
        mkdir(&archive)?;
        // Replaced, not created: a file left by a rotation cut short is the same CA.
        let (cert, key) = archive_files(&archive, "ca", &old_summary.serial);
        old.replace(&cert, &key)?;
        new.replace(
            &self.cluster_cert_path(cluster),
            &self.cluster_key_path(cluster),
        )?;
        let mut reissued = Vec::new();
        for (kind, name, files, lifetime) in plan {
            let issued = new.issue_leaf(kind, &name, Validity::starting_now(lifetime))?;
            issued.replace(&files.chain, &files.key)?;
            reissued.push((kind, name, files, issued.serial().clone()));
        }
        Ok(ClusterCaRotation {
            old: old_summary,
            new: new_summary,
            reissued,
            skipped,
        })
    }

    /// The leaf on file at `files`, if it is this cluster's own for `name` (issued for
    /// that identity by the cluster's CA in force or one rotated out) and `skip` gives no
    /// reason against it; else why not.
    fn own_leaf(
        &self,
        kind: LeafKind,
        cluster: &ClusterName,
        name: &GatewayName,
        files: &GatewayFiles,
        skip: &LeafCheck<'_>,
    ) -> Result<Result<CertificateSummary, String>, CertError> {
        let ca = self.cluster_ca(cluster)?;
        let previous = self.loadable_previous(Some(cluster), ClusterCa::load)?.0;
        let mut cas: Vec<&[u8]> = vec![ca.certificate().as_ref()];
        cas.extend(previous.iter().map(|ca| ca.certificate().as_ref()));
        let chain = crate::files::load_certificates(&files.chain)?;
        let leaf_der = chain.first().ok_or_else(|| CertError::NotAFile {
            path: files.chain.clone(),
        })?;
        let leaf = CertificateSummary::from_der(leaf_der)?;
        let id = match kind {
            LeafKind::Gateway => {
                GatewayId::new(ca.trust_domain().clone(), cluster.clone(), name.clone()).spiffe_id()
            }
            LeafKind::Admin => SpiffeId::admin(ca.trust_domain(), cluster, name),
        };
        if !issued_for(leaf_der, &id, &cas) {
            return Ok(Err(format!(
                "not a certificate of this cluster's CAs for {id}"
            )));
        }
        Ok(match skip(&leaf) {
            Some(why) => Err(why),
            None => Ok(leaf),
        })
    }

    /// Rotates the mesh root: a new root (same trust domain) is added to the trust
    /// bundle and put in place; the old one stays in the bundle and, with its key,
    /// under `previous/`. Nothing is issued under the new root here: every gateway needs
    /// the new bundle first. Then rotate each cluster CA, then
    /// [`CaDirectory::retire_previous_roots`].
    pub fn rotate_root(&self, validity: Validity) -> Result<RootRotation, CertError> {
        let old = self.root_ca()?;
        let old_summary = summary(old.certificate())?;
        let new = MeshRootCa::create(old.trust_domain(), validity)?;
        let new_summary = summary(new.certificate())?;
        let previous = self.previous_dir(None);
        mkdir(&previous)?;
        // Replaced, not created: a file left by a rotation cut short is the same root.
        let (cert, key) = archive_files(&previous, "root-ca", &old_summary.serial);
        old.replace(&cert, &key)?;
        let mut bundle = self.bundle()?;
        bundle.add(old.certificate().clone())?;
        bundle.add(new.certificate().clone())?;
        bundle.save(&self.bundle_path())?;
        new.replace(&self.root_cert_path(), &self.root_key_path())?;
        Ok(RootRotation {
            old: old_summary,
            new: new_summary,
            bundle_roots: bundle.roots().len(),
        })
    }

    /// Takes the roots rotated out of the trust bundle and deletes them (and the
    /// rotated-out cluster CAs they issued) from `previous/`. Refused, changing nothing,
    /// while a cluster CA or a leaf's chain on file was issued under another root than
    /// the one in force. Returns the roots retired.
    pub fn retire_previous_roots(&self) -> Result<Vec<CertificateSummary>, CertError> {
        let root = summary(self.root_ca()?.certificate())?;
        let previous = self.previous_roots()?;
        if previous.is_empty() {
            return Err(CertError::RotationRefused(
                "no previous root to retire (rotate the root first: isthmusctl certs rotate --root)"
                    .into(),
            ));
        }
        let mut clusters = Vec::new();
        for cluster in self.clusters()? {
            let ca = summary(self.cluster_ca(&cluster)?.certificate())?;
            if ca.issuer != root.subject {
                return Err(CertError::RotationRefused(format!(
                    "the CA of cluster {cluster} was issued by {}, not by the root in force: \
                     rotate it first (isthmusctl certs rotate --ca --cluster {cluster})",
                    ca.issuer
                )));
            }
            for (_, _, files) in self.leaves(&cluster)? {
                let chain = CertificateSummary::from_file(&files.chain)?;
                let chains_here = chain.get(1).is_some_and(|ca| ca.issuer == root.subject);
                if !chains_here {
                    return Err(CertError::RotationRefused(format!(
                        "{} chains to a previous root: re-issue it first \
                         (isthmusctl certs rotate --ca --cluster {cluster} re-issues the \
                         cluster's certificates that are neither revoked nor expired), or \
                         remove it (a revoked or expired one is never re-issued)",
                        files.chain.display()
                    )));
                }
            }
            clusters.push(cluster);
        }
        let mut retired = Vec::new();
        let mut bundle = self.bundle()?;
        for old in &previous {
            let s = summary(old.certificate())?;
            bundle.remove(&s.sha256_fingerprint);
            retired.push(s);
        }
        bundle.add(self.root_ca()?.certificate().clone())?;
        bundle.save(&self.bundle_path())?;
        // Keys that can no longer sign anything trusted go.
        let gone = |dir: &Path, prefix: &str, issued_by_retired: &dyn Fn(&Path) -> bool| {
            for (cert, key) in archived(dir, prefix)? {
                if issued_by_retired(&cert) {
                    for path in [&key, &cert] {
                        match std::fs::remove_file(path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => return Err(CertError::io(path, e)),
                        }
                    }
                }
            }
            Ok::<(), CertError>(())
        };
        gone(&self.previous_dir(None), "root-ca", &|_| true)?;
        for cluster in &clusters {
            gone(&self.previous_dir(Some(cluster)), "ca", &|cert| {
                CertificateSummary::from_file(cert)
                    .ok()
                    .and_then(|v| v.into_iter().next())
                    // One that cannot be read is kept: only a key known to be
                    // under a retired root is deleted.
                    .is_some_and(|ca| ca.issuer != root.subject)
            })?;
        }
        Ok(retired)
    }

    /// The CRL file of the root (`None`: `root-ca.crl.pem`, revoking cluster CAs) or of
    /// a cluster's CA (`clusters/<c>/ca.crl.pem`, revoking its leaves).
    pub fn crl_path(&self, cluster: Option<&ClusterName>) -> PathBuf {
        match cluster {
            None => self.dir.join("root-ca.crl.pem"),
            Some(c) => self.cluster_dir(c).join("ca.crl.pem"),
        }
    }

    /// Writes the CRL file of a level (see [`CaDirectory::crl_path`]): one CRL listing
    /// `revoked`, signed by the CA in force and one by each CA of that level rotated out
    /// and kept. A certificate's CRL is found by its issuer's name, so a leaf of a
    /// rotated-out CA is revoked only by a CRL that CA signed. `crl_number` must grow
    /// with every write. Returns the path and how many CRLs it holds.
    ///
    /// An archived CA whose key does not load (moved offline, say) cannot sign: the CRL
    /// it signed last is carried over from the file as it was (dropping it would
    /// un-revoke what it revoked), and named in [`CrlsWritten::carried_over`]; an
    /// archived certificate that does not parse is named in [`CrlsWritten::unreadable`].
    pub fn write_crls(
        &self,
        cluster: Option<&ClusterName>,
        revoked: &[Serial],
        crl_number: u64,
        validity: Validity,
    ) -> Result<CrlsWritten, CertError> {
        // An archived CA that does not load signs nothing; the CA in force and the
        // others still do (the caller is told which files were skipped).
        let (crls, unreadable) = match cluster {
            None => {
                let mut crls = vec![self.root_ca()?.crl(revoked, crl_number, validity)?];
                let (old, unreadable) = self.loadable_previous(None, MeshRootCa::load)?;
                for ca in old {
                    crls.push(ca.crl(revoked, crl_number, validity)?);
                }
                (crls, unreadable)
            }
            Some(c) => {
                let mut crls = vec![self.cluster_ca(c)?.crl(revoked, crl_number, validity)?];
                let (old, unreadable) = self.loadable_previous(Some(c), ClusterCa::load)?;
                for ca in old {
                    crls.push(ca.crl(revoked, crl_number, validity)?);
                }
                (crls, unreadable)
            }
        };
        let path = self.crl_path(cluster);
        // The last CRL of each archived CA that cannot sign, from the file as it is.
        let mut carried = Vec::new();
        let mut not_parsed = Vec::new();
        let existing = if path.is_file() {
            crate::ca::Crl::load_all(&path)?
        } else {
            Vec::new()
        };
        for cert in unreadable {
            let subject = CertificateSummary::from_file(&cert)
                .ok()
                .and_then(|v| v.into_iter().next())
                .map(|s| s.subject);
            let Some(subject) = subject else {
                not_parsed.push(cert);
                continue;
            };
            for crl in &existing {
                if crl_issuer(crl).as_deref() == Some(subject.as_str()) {
                    carried.push((subject.clone(), crl.to_pem()));
                }
            }
        }
        let mut pem: String = crls.iter().map(crate::ca::Crl::to_pem).collect();
        for (_, crl) in &carried {
            pem.push_str(crl);
        }
        crate::files::write_public_file(&path, &pem)?;
        Ok(CrlsWritten {
            path,
            signed: crls.len(),
            carried_over: carried.into_iter().map(|(subject, _)| subject).collect(),
            unreadable: not_parsed,
        })
    }

    /// The clusters with a CA on file, in name order.
    pub fn clusters(&self) -> Result<Vec<ClusterName>, CertError> {
        let dir = self.dir.join("clusters");
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(CertError::io(&dir, e)),
        };
        let mut found: Vec<ClusterName> = entries
            .flatten()
            .filter_map(|e| ClusterName::new(e.file_name().to_str()?).ok())
            .filter(|c| self.cluster_cert_path(c).is_file())
            .collect();
        found.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(found)
    }

    /// Issues a new certificate and key for gateway `name` in `cluster`, which must
    /// have one already, and replaces its files atomically. The old certificate is
    /// not revoked (it stays valid until it expires or is revoked).
    ///
    /// With `check`, the certificate on file must be the cluster's own for that name
    /// (see [`CaDirectory::rotate_cluster_ca`]) and `check` must give no reason against
    /// it (the caller's revocation records); otherwise nothing changes. `None` (a
    /// deliberate `--force`) issues whatever the file holds.
    pub fn rotate_gateway(
        &self,
        cluster: &ClusterName,
        name: &GatewayName,
        validity: Validity,
        check: Option<&LeafCheck<'_>>,
    ) -> Result<GatewayFiles, CertError> {
        let files = self.gateway_files(cluster, name);
        if !files.chain.is_file() {
            return Err(CertError::NotAFile {
                path: files.chain.clone(),
            });
        }
        if let Some(check) = check {
            if let Err(why) = self.own_leaf(LeafKind::Gateway, cluster, name, &files, check)? {
                return Err(CertError::RotationRefused(why));
            }
        }
        let issued = self.cluster_ca(cluster)?.issue_gateway(name, validity)?;
        issued.replace(&files.chain, &files.key)?;
        Ok(files)
    }
}
