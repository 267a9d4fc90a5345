//! WireGuard static keys as typed values.
//!
//! A [`PrivateKey`] never prints itself: its `Debug` is redacted and it has no
//! `Display`. Its bytes are wiped on drop.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use std::fmt;
use zeroize::Zeroizing;

/// Why a key string was refused. The message never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64 (expected 44 characters as printed by `wg genkey`)")]
    Base64,
    #[error("decodes to {0} bytes, expected 32")]
    Length(usize),
    #[error("the all-zero key is not a valid key")]
    Zero,
}

fn decode32(text: &str) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let bytes = Zeroizing::new(B64.decode(text.trim()).map_err(|_| KeyError::Base64)?);
    if bytes.len() != 32 {
        return Err(KeyError::Length(bytes.len()));
    }
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&bytes);
    if out.iter().all(|b| *b == 0) {
        return Err(KeyError::Zero);
    }
    Ok(out)
}

/// A Curve25519 public key (a peer's identity in WireGuard).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses the base64 form used by `wg` and WireGuard config files.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        Ok(Self(*decode32(text)?))
    }
    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    /// Whether Diffie-Hellman with this key gives no shared secret (a
    /// low-order point, e.g. all zeros): such a key must not be accepted
    /// from a peer.
    pub fn is_low_order(&self) -> bool {
        let probe = PrivateKey::generate().to_secret();
        !probe
            .diffie_hellman(&boringtun::x25519::PublicKey::from(self.0))
            .was_contributory()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

/// A Curve25519 private key. Redacted in `Debug`, zeroed on drop.
#[derive(Clone)]
pub struct PrivateKey(Zeroizing<[u8; 32]>);

impl PrivateKey {
    /// Parses the base64 form produced by `wg genkey`.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        Ok(Self(decode32(text)?))
    }
    /// Builds a key from raw bytes (e.g. from the UAPI's hex form).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }
    /// A fresh random key from the OS random source.
    pub fn generate() -> Self {
        use rand_core::RngCore as _;
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand_core::OsRng.fill_bytes(bytes.as_mut());
        Self(bytes)
    }
    pub fn public_key(&self) -> PublicKey {
        let secret = self.to_secret();
        PublicKey(boringtun::x25519::PublicKey::from(&secret).to_bytes())
    }
    pub(crate) fn to_secret(&self) -> boringtun::x25519::StaticSecret {
        boringtun::x25519::StaticSecret::from(*self.0)
    }
    /// X25519 of this key and `remote` (None for a low-order `remote`).
    pub fn key_agreement(&self, remote: &PublicKey) -> Option<Zeroizing<[u8; 32]>> {
        let shared = self
            .to_secret()
            .diffie_hellman(&boringtun::x25519::PublicKey::from(remote.0));
        shared
            .was_contributory()
            .then(|| Zeroizing::new(shared.to_bytes()))
    }
    /// Base64 form, for writing a freshly generated key to a 0600 file only.
    pub fn to_base64_secret(&self) -> Zeroizing<String> {
        Zeroizing::new(B64.encode(*self.0))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_derivation_matches_rfc7748_vector() {
        // RFC 7748 section 6.1: Alice's private key and public key.
        let private =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        let public =
            hex::decode("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
                .unwrap();
        let key = PrivateKey::from_bytes(private.try_into().unwrap());
        assert_eq!(key.public_key().0.to_vec(), public);
    }

    #[test]
    fn parse_rejects_bad_keys() {
        assert_eq!(PublicKey::from_base64("not base64!"), Err(KeyError::Base64));
        assert_eq!(PublicKey::from_base64("AAAA"), Err(KeyError::Length(3)));
        let zero = B64.encode([0u8; 32]);
        assert_eq!(PublicKey::from_base64(&zero), Err(KeyError::Zero));
        let good = PrivateKey::generate().public_key();
        assert_eq!(PublicKey::from_base64(&good.to_base64()), Ok(good));
    }

    #[test]
    fn private_key_debug_is_redacted() {
        let key = PrivateKey::generate();
        let shown = format!("{key:?}");
        assert!(!shown.contains(key.to_base64_secret().as_str()));
        assert!(shown.contains("redacted"));
    }
}
