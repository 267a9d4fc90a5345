//! Where ESP keying material comes from.
//!
//! An [`EspKeying`] hands out the SA pair of each *generation*: generation 0
//! is the first pair, generation n + 1 replaces generation n at its soft
//! lifetime. Both gateways must compute the same pairs (mirrored: one's
//! outbound is the other's inbound). Two sources exist:
//!
//! - [`ManualKeying`]: generation 0 comes from an SA file (SPI, key and salt
//!   per direction, as an operator would give `ip xfrm` or tshark), later
//!   generations are derived from it with HKDF-SHA256, so rekeying works
//!   without a key exchange.
//! - The mTLS peer channel (a later component) implements the same trait
//!   from the TLS exporter, with the generation as exporter context.

use super::sa::{EspCipher, SaKeys};
use ring::hkdf;
use std::fmt;
use zeroize::Zeroizing;

/// The two SAs of one generation, from the local side's point of view.
#[derive(Clone, Debug)]
pub struct SaPair {
    pub outbound: SaKeys,
    pub inbound: SaKeys,
}

/// Why keying material could not be produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyingError {
    #[error("no keying material for generation {0}")]
    Unavailable(u64),
    #[error("derived keying material is invalid")]
    Derivation,
}

/// A source of SA pairs, one per generation.
pub trait EspKeying: Send + Sync + fmt::Debug {
    fn cipher(&self) -> EspCipher;
    fn sa_pair(&self, generation: u64) -> Result<SaPair, KeyingError>;
    /// Whether later generations come from [`Self::sa_pair`]: installed inbound
    /// ahead of use and switched to by the data path at the soft lifetime or when
    /// an operator asks. `false` for keys a key exchange pushes ([`PushedKeying`]):
    /// only generation 0 comes from here, later ones through
    /// [`super::EspCore::install_pair`].
    fn derives_ahead(&self) -> bool {
        true
    }
}

/// Keys pushed from outside, by IKE: generation 0 is the first CHILD_SA, each
/// rekey is installed with [`super::EspCore::install_pair`]. Nothing is derived,
/// so the data path never switches SAs on its own; at the hard lifetime packets
/// are dropped until the key exchange installs a new pair.
pub struct PushedKeying {
    cipher: EspCipher,
    first: SaPair,
}

impl PushedKeying {
    pub fn new(cipher: EspCipher, first: SaPair) -> Self {
        Self { cipher, first }
    }
}

impl fmt::Debug for PushedKeying {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushedKeying")
            .field("cipher", &self.cipher)
            .field(
                "outbound_spi",
                &format_args!("{:#010x}", self.first.outbound.spi),
            )
            .field(
                "inbound_spi",
                &format_args!("{:#010x}", self.first.inbound.spi),
            )
            .finish_non_exhaustive()
    }
}

impl EspKeying for PushedKeying {
    fn cipher(&self) -> EspCipher {
        self.cipher
    }
    fn sa_pair(&self, generation: u64) -> Result<SaPair, KeyingError> {
        match generation {
            0 => Ok(self.first.clone()),
            n => Err(KeyingError::Unavailable(n)),
        }
    }
    fn derives_ahead(&self) -> bool {
        false
    }
}

/// Manual keying: a fixed generation 0, later generations derived from it.
pub struct ManualKeying {
    cipher: EspCipher,
    base: SaPair,
}

impl fmt::Debug for ManualKeying {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualKeying")
            .field("cipher", &self.cipher)
            .field(
                "outbound_spi",
                &format_args!("{:#010x}", self.base.outbound.spi),
            )
            .field(
                "inbound_spi",
                &format_args!("{:#010x}", self.base.inbound.spi),
            )
            .finish_non_exhaustive()
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

const REKEY_SALT: &[u8] = b"isthmus esp rekey v1";

impl ManualKeying {
    pub fn new(cipher: EspCipher, base: SaPair) -> Self {
        Self { cipher, base }
    }

    /// Generation `n` of one direction, derived from that direction's
    /// generation-0 keys, so both ends derive the same SA.
    fn derive(&self, base: &SaKeys, generation: u64) -> Result<SaKeys, KeyingError> {
        let mut ikm = Zeroizing::new(Vec::with_capacity(base.key.len() + 8));
        ikm.extend_from_slice(&base.key);
        ikm.extend_from_slice(&base.salt);
        ikm.extend_from_slice(&base.spi.to_be_bytes());
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, REKEY_SALT).extract(&ikm);
        let key_len = self.cipher.key_len();
        let gen = generation.to_be_bytes();
        let info: [&[u8]; 2] = [b"generation", &gen];
        let mut okm = Zeroizing::new(vec![0u8; key_len + 4 + 4]);
        prk.expand(&info, Len(okm.len()))
            .and_then(|o| o.fill(&mut okm))
            .map_err(|_| KeyingError::Derivation)?;
        let raw_spi = u32::from_be_bytes([
            okm[key_len + 4],
            okm[key_len + 5],
            okm[key_len + 6],
            okm[key_len + 7],
        ]);
        // Keep clear of the reserved range 0..=255.
        let spi = raw_spi | 0x0100_0000;
        Ok(SaKeys {
            spi,
            key: Zeroizing::new(okm[..key_len].to_vec()),
            salt: [
                okm[key_len],
                okm[key_len + 1],
                okm[key_len + 2],
                okm[key_len + 3],
            ],
        })
    }
}

impl EspKeying for ManualKeying {
    fn cipher(&self) -> EspCipher {
        self.cipher
    }
    fn sa_pair(&self, generation: u64) -> Result<SaPair, KeyingError> {
        if generation == 0 {
            return Ok(self.base.clone());
        }
        Ok(SaPair {
            outbound: self.derive(&self.base.outbound, generation)?,
            inbound: self.derive(&self.base.inbound, generation)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(spi: u32, byte: u8) -> SaKeys {
        SaKeys {
            spi,
            key: Zeroizing::new(vec![byte; 16]),
            salt: [byte; 4],
        }
    }

    #[test]
    fn both_ends_derive_mirrored_generations() {
        let a = ManualKeying::new(
            EspCipher::Aes128Gcm,
            SaPair {
                outbound: sa(0x1000, 1),
                inbound: sa(0x2000, 2),
            },
        );
        let b = ManualKeying::new(
            EspCipher::Aes128Gcm,
            SaPair {
                outbound: sa(0x2000, 2),
                inbound: sa(0x1000, 1),
            },
        );
        for generation in 0..5 {
            let (pa, pb) = (
                a.sa_pair(generation).unwrap(),
                b.sa_pair(generation).unwrap(),
            );
            assert_eq!(pa.outbound.spi, pb.inbound.spi);
            assert_eq!(*pa.outbound.key, *pb.inbound.key);
            assert_eq!(pa.outbound.salt, pb.inbound.salt);
            assert_eq!(*pa.inbound.key, *pb.outbound.key);
            assert!(pa.outbound.spi >= 256);
        }
        let (g1, g2) = (a.sa_pair(1).unwrap(), a.sa_pair(2).unwrap());
        assert_ne!(*g1.outbound.key, *g2.outbound.key);
        assert_ne!(g1.outbound.spi, g2.outbound.spi);
        assert_ne!(*g1.outbound.key, *g1.inbound.key, "directions differ");
    }
}
