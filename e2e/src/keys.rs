//! WireGuard key pairs, made with `wg genkey` / `wg pubkey`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result};

use crate::cmd;

/// A Curve25519 key pair in WireGuard's base64 form.
#[derive(Clone, Debug)]
pub struct KeyPair {
    /// Private key, base64.
    pub private: String,
    /// Public key, base64.
    pub public: String,
}

impl KeyPair {
    /// Generates a key pair with wireguard-tools.
    pub fn generate() -> Result<Self> {
        let private =
            cmd::run("wg", &["genkey"]).context("wg genkey (is wireguard-tools installed?)")?;
        let private = private.trim().to_string();
        let public = cmd::run_with_stdin("wg", &["pubkey"], format!("{private}\n").as_bytes())?;
        Ok(KeyPair {
            private,
            public: public.trim().to_string(),
        })
    }

    /// Writes the private key (plus a newline) to `path`, created with permission bits `mode`.
    pub fn write_private(&self, path: &Path, mode: u32) -> Result<()> {
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        writeln!(f, "{}", self.private)?;
        // The umask may have cleared bits that were asked for (e.g. 0644 under umask 077).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    }
}
