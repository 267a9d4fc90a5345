//! The link parameters both ends of a channel must agree on for a peer: the tunnel kind
//! and, for ESP, the cipher and whether extended sequence numbers are used.
//!
//! Each side announces in its hello what it is configured with *for that peer*; the other
//! side compares with its own configuration for the identity it verified and refuses a
//! mismatch ([`Refusal::LinkMismatch`](super::Refusal::LinkMismatch)) instead of bringing
//! up a tunnel whose packets would fail their integrity checks on the other end.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The ESP AEAD a link uses (RFC 4106).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EspCipher {
    /// AES-128-GCM with a 16-byte ICV.
    Aes128Gcm,
    /// AES-256-GCM with a 16-byte ICV.
    Aes256Gcm,
}

impl EspCipher {
    /// The name used in configs and messages (`aes128-gcm`, `aes256-gcm`).
    pub fn name(self) -> &'static str {
        match self {
            EspCipher::Aes128Gcm => "aes128-gcm",
            EspCipher::Aes256Gcm => "aes256-gcm",
        }
    }
}

/// The tunnel a link carries, with the parameters both ends must share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkParams {
    /// WireGuard (nothing else to agree on: the protocol fixes its cipher suite).
    Wireguard,
    /// ESP in UDP.
    Esp {
        /// The AEAD.
        cipher: EspCipher,
        /// RFC 4304 extended sequence numbers.
        esn: bool,
    },
}

impl fmt::Display for LinkParams {
    /// `wireguard`, `esp/aes256-gcm/esn` or `esp/aes128-gcm/no-esn`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkParams::Wireguard => f.write_str("wireguard"),
            LinkParams::Esp { cipher, esn } => write!(
                f,
                "esp/{}/{}",
                cipher.name(),
                if *esn { "esn" } else { "no-esn" }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_config_spelling() {
        assert_eq!(LinkParams::Wireguard.to_string(), "wireguard");
        let esp = LinkParams::Esp {
            cipher: EspCipher::Aes256Gcm,
            esn: true,
        };
        assert_eq!(esp.to_string(), "esp/aes256-gcm/esn");
        let esp = LinkParams::Esp {
            cipher: EspCipher::Aes128Gcm,
            esn: false,
        };
        assert_eq!(esp.to_string(), "esp/aes128-gcm/no-esn");
        assert_eq!(
            serde_json::to_string(&esp).unwrap(),
            r#"{"esp":{"cipher":"aes128-gcm","esn":false}}"#
        );
    }
}
