//! Picking up new certificates, keys, trust bundles and CRLs without a restart.
//!
//! [`IdentityReloader::poll`] reads the `[identity]` files and compares their
//! contents (SHA-256) with what is in force. When the trust bundle or a CRL
//! changed, the new trust replaces the old one for every later handshake and
//! the caller re-checks every live session against it
//! ([`crate::mesh::MeshLinks::recheck`]); when the certificate and key changed
//! (and match each other), later handshakes present the new ones. A file that
//! does not parse, or a certificate and key caught half-written, change
//! nothing: the reload is tried again at the next poll and the error is shown
//! in `isthmusctl status`. Only the newest CRL of each issuer is used; an
//! issuer whose CRL disappears or goes back to an older one keeps the one in
//! force (dropping it would un-revoke), which `status` also says.
//!
//! Bound: a CRL written to disk takes effect within one reload interval
//! (`[identity] reload_interval_ms`, default 1 s) plus one tick of the
//! session checker (0.5 s); an expiring peer certificate within one tick.

use crate::config::IdentityFiles;
use isthmus_identity::{ChannelConfig, MeshTrust};
use rustls_pki_types::CertificateRevocationListDer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

/// What a poll changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reloaded {
    pub trust: bool,
    pub credentials: bool,
}

/// What `isthmusctl status` shows of reloading.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReloadStatus {
    /// Trust bundle / CRL changes applied since start.
    pub trust_reloads: u64,
    /// Certificate / key changes applied since start.
    pub credential_reloads: u64,
    /// When the last change was applied (seconds since the Unix epoch).
    pub last_reload_unix: Option<u64>,
    /// Why the files on disk are not in force, if they are not.
    pub last_error: Option<String>,
    /// This gateway's SPIFFE ID.
    #[serde(default)]
    pub local_id: Option<String>,
    /// Serial of the certificate in force now (later handshakes present it).
    #[serde(default)]
    pub certificate_serial: Option<String>,
    /// When it expires (Unix seconds).
    #[serde(default)]
    pub certificate_expires_unix: Option<u64>,
}

/// Watches the `[identity]` files of one gateway.
#[derive(Debug)]
pub struct IdentityReloader {
    files: IdentityFiles,
    trust_digest: Option<[u8; 32]>,
    credentials_digest: Option<[u8; 32]>,
    /// The CRL in force for each CRL issuer (raw issuer name).
    crls: HashMap<Vec<u8>, CrlInfo>,
    /// The first poll puts the files in force again without counting it: they
    /// may have changed between start-up's read and the watcher's start.
    first: bool,
    status: ReloadStatus,
}

/// One CRL: how new it is, and its DER.
#[derive(Debug, Clone)]
struct CrlInfo {
    /// CRL number, big-endian without leading zeros (empty when it has none).
    number: Vec<u8>,
    /// thisUpdate, Unix seconds.
    this_update: i64,
    /// The issuer's name, for messages.
    issuer_name: String,
    der: CertificateRevocationListDer<'static>,
}

impl CrlInfo {
    /// Whether `self` is older than `other` (by CRL number, then thisUpdate).
    fn older_than(&self, other: &CrlInfo) -> bool {
        (self.number.len(), &self.number, self.this_update)
            < (other.number.len(), &other.number, other.this_update)
    }
}

/// Keys each CRL by its issuer (raw name) and keeps the newest of each issuer;
/// a CRL that does not parse is kept apart (the trust check refuses it).
fn by_issuer(
    crls: &[CertificateRevocationListDer<'static>],
) -> (
    HashMap<Vec<u8>, CrlInfo>,
    Vec<CertificateRevocationListDer<'static>>,
) {
    let mut out: HashMap<Vec<u8>, CrlInfo> = HashMap::new();
    let mut unparsed = Vec::new();
    for der in crls {
        let Ok((_, crl)) = x509_parser::parse_x509_crl(der) else {
            unparsed.push(der.clone());
            continue;
        };
        let number: Vec<u8> = crl
            .crl_number()
            .map(|n| n.to_bytes_be())
            .unwrap_or_default()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        let info = CrlInfo {
            number,
            this_update: crl.last_update().timestamp(),
            issuer_name: crl.issuer().to_string(),
            der: der.clone(),
        };
        let issuer = crl.issuer().as_raw().to_vec();
        if out.get(&issuer).is_none_or(|old| old.older_than(&info)) {
            out.insert(issuer, info);
        }
    }
    (out, unparsed)
}

/// The CRLs to put in force: only the newest of each issuer. The revocation
/// check uses the first CRL of an issuer it finds, so an old copy next to a
/// newer one would un-revoke what only the newer one lists.
/// Keeps `config` (a TLS configuration of this gateway that is not the peer
/// channel's: remote administration without peers by identity) following
/// the `[identity]` files: a thread re-reads them every
/// `reload_interval_ms`, as the peer channel's do. Returns `config`.
pub fn reloaded(
    identity: &crate::config::IdentityConfig,
    config: std::sync::Arc<ChannelConfig>,
) -> std::io::Result<std::sync::Arc<ChannelConfig>> {
    let mut reloader = IdentityReloader::new(identity.files.clone(), &identity.trust);
    let every = identity.reload_interval;
    let weak = std::sync::Arc::downgrade(&config);
    std::thread::Builder::new()
        .name("identity-reload".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Some(config) = weak.upgrade() else { return };
            reloader.poll(&config, SystemTime::now());
        })?;
    Ok(config)
}

pub fn newest_per_issuer(
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Vec<CertificateRevocationListDer<'static>> {
    let (newest, mut out) = by_issuer(&crls);
    out.extend(newest.into_values().map(|i| i.der));
    out
}

/// Merges the CRLs loaded now with those in force: an issuer whose CRL is gone
/// or older keeps the one in force (putting it back would un-revoke), and says
/// so; every other issuer gets its new CRL.
fn merge_crls(
    in_force: &HashMap<Vec<u8>, CrlInfo>,
    loaded: &[CertificateRevocationListDer<'static>],
) -> (
    HashMap<Vec<u8>, CrlInfo>,
    Vec<CertificateRevocationListDer<'static>>,
    Vec<String>,
) {
    let (mut merged, unparsed) = by_issuer(loaded);
    let mut kept = Vec::new();
    for (issuer, old) in in_force {
        match merged.get(issuer) {
            None => kept.push(format!(
                "the CRL of {} is gone; the one in force is kept (restart the gateway to drop it)",
                old.issuer_name
            )),
            Some(new) if new.older_than(old) => kept.push(format!(
                "the CRL of {} on disk is older than the one in force; that one is kept",
                old.issuer_name
            )),
            Some(_) => continue,
        }
        merged.insert(issuer.clone(), old.clone());
    }
    let mut list = unparsed;
    list.extend(merged.values().map(|i| i.der.clone()));
    (merged, list, kept)
}

fn digest_file(hasher: &mut Sha256, path: &Path, secret: bool) {
    hasher.update(path.as_os_str().as_encoded_bytes());
    hasher.update([0]);
    let mut add = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    // A missing or unreadable file is a state of its own: the reload that
    // follows reports why. Both readers refuse anything but a regular file and
    // never block on one (a FIFO in place of a CRL must not stall the watcher).
    let read = if secret {
        // Zeroed when dropped.
        isthmus_certs::files::read_secret_file(path)
            .map(|bytes| add(&bytes))
            .is_ok()
    } else {
        isthmus_certs::files::read_public_file(path)
            .map(|bytes| add(&bytes))
            .is_ok()
    };
    if !read {
        hasher.update(b"unreadable");
    }
}

impl IdentityReloader {
    /// Starts from the trust read at start-up; the first poll reads every
    /// file again and puts it in force.
    pub fn new(files: IdentityFiles, trust: &MeshTrust) -> Self {
        Self {
            files,
            trust_digest: None,
            credentials_digest: None,
            crls: by_issuer(&trust.crls).0,
            first: true,
            status: ReloadStatus::default(),
        }
    }

    fn digest_trust(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        digest_file(&mut h, &self.files.trust_bundle, false);
        for path in &self.files.crls {
            digest_file(&mut h, path, false);
        }
        if let Some(dir) = &self.files.crls_dir {
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            names.sort();
            for path in names
                .iter()
                .filter(|p| p.to_string_lossy().ends_with(".crl.pem"))
            {
                digest_file(&mut h, path, false);
            }
        }
        h.finalize().into()
    }

    fn digest_credentials(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        digest_file(&mut h, &self.files.certificate, false);
        digest_file(&mut h, &self.files.private_key, true);
        h.finalize().into()
    }

    /// Reads the files again and applies what changed to `config`.
    pub fn poll(&mut self, config: &ChannelConfig, now: SystemTime) -> Reloaded {
        let mut done = Reloaded::default();
        let mut errors = Vec::new();
        let trust_digest = self.digest_trust();
        if Some(trust_digest) != self.trust_digest {
            let loaded = self.files.load_trust().map_err(|e| e.to_string());
            match loaded.and_then(|mut t| {
                let (merged, list, kept) = merge_crls(&self.crls, &t.crls);
                t.crls = list;
                config.reload_trust(&t).map_err(|e| e.to_string())?;
                Ok((merged, kept))
            }) {
                Ok((merged, kept)) => {
                    self.trust_digest = Some(trust_digest);
                    self.crls = merged;
                    errors.extend(kept);
                    done.trust = true;
                    if !self.first {
                        self.status.trust_reloads += 1;
                        tracing::info!("trust bundle / CRLs changed on disk; reloaded");
                    }
                }
                Err(e) => errors.push(format!("trust not reloaded: {e}")),
            }
        }
        let credentials_digest = self.digest_credentials();
        if Some(credentials_digest) != self.credentials_digest {
            match self
                .files
                .load_credentials()
                .map_err(|e| e.to_string())
                .and_then(|c| config.reload_credentials(c).map_err(|e| e.to_string()))
            {
                Ok(()) => {
                    self.credentials_digest = Some(credentials_digest);
                    done.credentials = true;
                    if !self.first {
                        self.status.credential_reloads += 1;
                        tracing::info!(
                            "certificate and key changed on disk; later handshakes use the new ones"
                        );
                    }
                }
                Err(e) => errors.push(format!("certificate not reloaded: {e}")),
            }
        }
        let counted = !self.first;
        self.first = false;
        if counted && (done.trust || done.credentials) {
            self.status.last_reload_unix = now
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs());
        }
        let error = (!errors.is_empty()).then(|| errors.join("; "));
        if error.is_some() && error != self.status.last_error {
            tracing::warn!(
                error = error.as_deref().unwrap_or(""),
                "identity files not reloaded; keeping the ones in force"
            );
        }
        self.status.last_error = error;
        done
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.clone()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::test_pki::Pki;
    use isthmus_identity::{Refusal, Role, TunnelParams};

    fn channel(pki: &Pki) -> ChannelConfig {
        let identity = pki.identity();
        ChannelConfig::new(
            identity.credentials,
            &identity.trust,
            TunnelParams::without_tunnels(1420),
        )
        .unwrap()
    }

    fn b_is(pki: &Pki, config: &ChannelConfig) -> Result<(), Refusal> {
        config.verify_peer(
            pki.leaf_b.chain(),
            Role::Dialer,
            &pki.id("b"),
            SystemTime::now(),
        )
    }

    /// Found by review: a CRL written between start-up's read and the watcher's
    /// start matched the watcher's first digest and was never put in force.
    #[test]
    fn a_crl_written_during_start_up_is_put_in_force() {
        let pki = Pki::new("reload-start");
        let identity = pki.identity();
        let config = channel(&pki);
        pki.revoke_b(1);
        let mut reloader = IdentityReloader::new(pki.files.clone(), &identity.trust);
        assert_eq!(b_is(&pki, &config), Ok(()));
        assert!(reloader.poll(&config, SystemTime::now()).trust);
        assert_eq!(b_is(&pki, &config), Err(Refusal::Revoked));
        // Not counted as a change: nothing changed since the watcher started.
        assert_eq!(reloader.status().trust_reloads, 0);
    }

    /// Found by review: deleting a CRL, or putting back an older one, was accepted
    /// quietly and un-revoked its certificates. Then (second review) refusing the
    /// whole reload for it blocked every later revocation: now the issuer keeps the
    /// CRL in force and every other change goes through.
    #[test]
    fn a_crl_that_goes_away_or_back_in_time_is_kept_and_others_still_apply() {
        let pki = Pki::new("reload-rollback");
        pki.revoke_b(5);
        let identity = pki.identity();
        let config = channel(&pki);
        let mut reloader = IdentityReloader::new(pki.files.clone(), &identity.trust);
        reloader.poll(&config, SystemTime::now());
        assert_eq!(b_is(&pki, &config), Err(Refusal::Revoked));
        // Cluster b's CRL disappears while cluster a's revokes a gateway of a.
        let other = pki
            .ca_a
            .issue_gateway(
                &isthmus_identity::GatewayName::new("gw2").unwrap(),
                isthmus_certs::Validity::days(30),
            )
            .unwrap();
        std::fs::remove_file(pki.crls.join("b.crl.pem")).unwrap();
        pki.write_crl(&pki.ca_a, &[&other], 1, "a.crl.pem");
        assert!(reloader.poll(&config, SystemTime::now()).trust);
        let err = reloader.status().last_error.unwrap();
        assert!(err.contains("is gone"), "{err}");
        assert_eq!(b_is(&pki, &config), Err(Refusal::Revoked));
        let a2 = config.verify_peer(other.chain(), Role::Dialer, other.id(), SystemTime::now());
        assert_eq!(
            a2,
            Err(Refusal::Revoked),
            "cluster a's new CRL was not applied"
        );
        // An older CRL of b is not put in force either.
        pki.revoke_b(4);
        reloader.poll(&config, SystemTime::now());
        let err = reloader.status().last_error.unwrap();
        assert!(err.contains("older"), "{err}");
        assert_eq!(b_is(&pki, &config), Err(Refusal::Revoked));
        // A newer one is, and the warning goes away.
        pki.revoke_b(6);
        reloader.poll(&config, SystemTime::now());
        assert_eq!(reloader.status().last_error, None);
        assert_eq!(b_is(&pki, &config), Err(Refusal::Revoked));
    }

    /// Found by the second review: the revocation check uses the first CRL of an
    /// issuer it finds, so an old copy of b's CRL sorted before the new one
    /// un-revoked b. Only the newest CRL of each issuer is kept.
    #[test]
    fn only_the_newest_crl_of_an_issuer_counts() {
        let pki = Pki::new("reload-dup");
        pki.write_crl(&pki.ca_b, &[], 1, "a-old.crl.pem");
        pki.revoke_b(2);
        let identity = pki.identity();
        assert_eq!(identity.trust.crls.len(), 1);
        let config = channel(&pki);
        assert_eq!(b_is(&pki, &config), Err(Refusal::Revoked));
    }

    /// Found by review: a FIFO in place of a CRL file blocked the thread that
    /// also enforced expiry, forever.
    #[test]
    fn a_fifo_in_place_of_a_crl_does_not_stall_reloading() {
        let pki = Pki::new("reload-fifo");
        let identity = pki.identity();
        let config = channel(&pki);
        let fifo = pki.crls.join("stuck.crl.pem");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let files = pki.files.clone();
        let trust = identity.trust.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reloader = IdentityReloader::new(files, &trust);
            reloader.poll(&config, SystemTime::now());
            let _ = tx.send(reloader.status());
        });
        let status = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("reloading stalled on a FIFO");
        let err = status.last_error.unwrap();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
