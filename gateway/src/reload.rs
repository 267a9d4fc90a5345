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
//! in `isthmusctl status`.
//!
//! Bound: a CRL written to disk takes effect within one reload interval
//! (`[identity] reload_interval_ms`, default 1 s) plus one tick of the
//! session checker (0.5 s); an expiring peer certificate within one tick.

use crate::config::IdentityFiles;
use isthmus_identity::ChannelConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
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
    status: ReloadStatus,
}

fn digest_file(hasher: &mut Sha256, path: &Path, secret: bool) {
    hasher.update(path.as_os_str().as_encoded_bytes());
    hasher.update([0]);
    let mut add = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    // A missing or unreadable file is a state of its own: the reload that
    // follows reports why.
    let read = if secret {
        // Zeroed when dropped.
        isthmus_certs::files::read_secret_file(path)
            .map(|bytes| add(&bytes))
            .is_ok()
    } else {
        std::fs::read(path).map(|bytes| add(&bytes)).is_ok()
    };
    if !read {
        hasher.update(b"unreadable");
    }
}

impl IdentityReloader {
    /// Starts from the files as they were read at start-up.
    pub fn new(files: IdentityFiles) -> Self {
        let mut reloader = Self {
            files,
            trust_digest: None,
            credentials_digest: None,
            status: ReloadStatus::default(),
        };
        reloader.trust_digest = Some(reloader.digest_trust());
        reloader.credentials_digest = Some(reloader.digest_credentials());
        reloader
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
            match self
                .files
                .load_trust()
                .map_err(|e| e.to_string())
                .and_then(|t| config.reload_trust(&t).map_err(|e| e.to_string()))
            {
                Ok(()) => {
                    self.trust_digest = Some(trust_digest);
                    self.status.trust_reloads += 1;
                    done.trust = true;
                    tracing::info!("trust bundle / CRLs changed on disk; reloaded");
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
                    self.status.credential_reloads += 1;
                    done.credentials = true;
                    tracing::info!(
                        "certificate and key changed on disk; later handshakes use the new ones"
                    );
                }
                Err(e) => errors.push(format!("certificate not reloaded: {e}")),
            }
        }
        if done.trust || done.credentials {
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
