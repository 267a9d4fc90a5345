//! ESP keying material from the TLS exporter (RFC 8446 §7.5).
//!
//! Each direction has its own exporter label, and the key generation is the exporter
//! context (8 bytes, big-endian), so a rekey derives fresh, independent material from the
//! same session without another handshake. Both sides compute the same two blocks; each
//! calls the one it sends with `outbound`.

use std::fmt;

use zeroize::Zeroizing;

/// Exporter label for keys protecting traffic from the dialing gateway (TLS client) to the
/// accepting one (TLS server).
pub const LABEL_CLIENT_TO_SERVER: &[u8] = b"EXPORTER-isthmus-esp-client-to-server";
/// Exporter label for keys protecting traffic from the accepting gateway to the dialer.
pub const LABEL_SERVER_TO_CLIENT: &[u8] = b"EXPORTER-isthmus-esp-server-to-client";
/// Largest key block length accepted (per direction).
pub const MAX_ESP_KEY_LEN: usize = 256;
/// Default length: AES-256-GCM key (32 bytes) plus the RFC 4106 salt (4 bytes).
pub const DEFAULT_ESP_KEY_LEN: usize = 36;

/// ESP keying material of one generation, from the local side's point of view.
/// Zeroed on drop; `Debug` shows only lengths.
pub struct EspKeyBlock {
    /// The generation (exporter context) these keys belong to.
    pub generation: u64,
    /// Keys for packets this gateway sends to the peer.
    pub outbound: Zeroizing<Vec<u8>>,
    /// Keys for packets this gateway receives from the peer.
    pub inbound: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for EspKeyBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EspKeyBlock")
            .field("generation", &self.generation)
            .field("outbound_len", &self.outbound.len())
            .field("inbound_len", &self.inbound.len())
            .finish_non_exhaustive()
    }
}

/// Which end of the TLS session this gateway is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// This gateway dialed (TLS client).
    Dialer,
    /// This gateway accepted (TLS server).
    Acceptor,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Dialer => "dialer",
            Role::Acceptor => "acceptor",
        })
    }
}

/// Derives the block for `generation` from an established rustls connection.
pub(crate) fn derive(
    conn: &rustls::Connection,
    role: Role,
    generation: u64,
    len: usize,
) -> Result<EspKeyBlock, rustls::Error> {
    let context = generation.to_be_bytes();
    let export = |label: &[u8]| -> Result<Zeroizing<Vec<u8>>, rustls::Error> {
        let out = Zeroizing::new(vec![0u8; len]);
        conn.export_keying_material(out, label, Some(&context))
    };
    let c2s = export(LABEL_CLIENT_TO_SERVER)?;
    let s2c = export(LABEL_SERVER_TO_CLIENT)?;
    let (outbound, inbound) = match role {
        Role::Dialer => (c2s, s2c),
        Role::Acceptor => (s2c, c2s),
    };
    Ok(EspKeyBlock {
        generation,
        outbound,
        inbound,
    })
}
