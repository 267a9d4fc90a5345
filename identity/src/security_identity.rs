//! Numeric security identities: a cluster id plus a cluster-local id, packed in a `u64`.
//!
//! # Encoding
//!
//! ```text
//!  63       56 55                      32 31                               0
//! +-----------+--------------------------+----------------------------------+
//! | reserved  |  cluster id (24 bits)    |  local id (32 bits)              |
//! | (0)       |  1 ..= 16_777_215        |  1 ..= 4_294_967_295             |
//! +-----------+--------------------------+----------------------------------+
//! ```
//!
//! `encoded = (cluster << 32) | local`. The top 8 bits are reserved and must be zero
//! (a decoder refuses them, so they can later carry a version or flags). Cluster id 0 and
//! local id 0 are reserved for "unknown" and are never valid identities. The text form is
//! `cluster:local` in decimal, e.g. `7:100042`.
//!
//! For comparison: Cilium packs 8-bit cluster ids and 16-bit identities into 24 bits. Here
//! 16.7 million clusters of 4.29 billion identities each fit, and the whole value still
//! fits in one `u64` for BPF map keys.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a security identity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecurityIdentityError {
    /// Cluster id 0, or one that does not fit in 24 bits.
    #[error("cluster id {0} is out of range (1..={max})", max = ClusterId::MAX)]
    ClusterOutOfRange(u64),
    /// Local id 0.
    #[error("local id 0 is reserved (valid: 1..={max})", max = LocalId::MAX)]
    LocalZero,
    /// The reserved top 8 bits of an encoded identity are set.
    #[error("encoded identity {0:#018x} has reserved bits set")]
    ReservedBits(u64),
    /// The text form is not `cluster:local` in decimal.
    #[error("{0:?} is not of the form <cluster>:<local> (decimal)")]
    Syntax(String),
}

/// A cluster's numeric id: 24 bits, never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ClusterId(u32);

impl ClusterId {
    /// Largest cluster id (2^24 - 1).
    pub const MAX: u32 = (1 << 24) - 1;

    /// Checked constructor: `1..=ClusterId::MAX`.
    pub fn new(id: u32) -> Result<Self, SecurityIdentityError> {
        if id == 0 || id > Self::MAX {
            return Err(SecurityIdentityError::ClusterOutOfRange(u64::from(id)));
        }
        Ok(Self(id))
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for ClusterId {
    type Error = SecurityIdentityError;
    fn try_from(id: u32) -> Result<Self, Self::Error> {
        Self::new(id)
    }
}

impl From<ClusterId> for u32 {
    fn from(id: ClusterId) -> u32 {
        id.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A cluster-local identity number: 32 bits, never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct LocalId(u32);

impl LocalId {
    /// Largest local id.
    pub const MAX: u32 = u32::MAX;

    /// Checked constructor: `1..=u32::MAX`.
    pub fn new(id: u32) -> Result<Self, SecurityIdentityError> {
        if id == 0 {
            return Err(SecurityIdentityError::LocalZero);
        }
        Ok(Self(id))
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for LocalId {
    type Error = SecurityIdentityError;
    fn try_from(id: u32) -> Result<Self, Self::Error> {
        Self::new(id)
    }
}

impl From<LocalId> for u32 {
    fn from(id: LocalId) -> u32 {
        id.0
    }
}

impl fmt::Display for LocalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A mesh-wide numeric security identity (see the module docs for the encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct SecurityIdentity {
    cluster: ClusterId,
    local: LocalId,
}

impl SecurityIdentity {
    const RESERVED_MASK: u64 = 0xff00_0000_0000_0000;

    /// Assembles an identity from checked parts.
    pub fn new(cluster: ClusterId, local: LocalId) -> Self {
        Self { cluster, local }
    }

    /// Checked constructor from raw numbers.
    pub fn from_parts(cluster: u32, local: u32) -> Result<Self, SecurityIdentityError> {
        Ok(Self::new(ClusterId::new(cluster)?, LocalId::new(local)?))
    }

    /// The cluster id.
    pub fn cluster(self) -> ClusterId {
        self.cluster
    }

    /// The cluster-local id.
    pub fn local(self) -> LocalId {
        self.local
    }

    /// `(cluster << 32) | local`.
    pub fn to_u64(self) -> u64 {
        (u64::from(self.cluster.0) << 32) | u64::from(self.local.0)
    }

    /// Decodes [`SecurityIdentity::to_u64`]'s output; refuses reserved bits and zero parts.
    pub fn from_u64(encoded: u64) -> Result<Self, SecurityIdentityError> {
        if encoded & Self::RESERVED_MASK != 0 {
            return Err(SecurityIdentityError::ReservedBits(encoded));
        }
        // Both casts are lossless: the cluster part is < 2^24 after the mask check.
        let cluster = u32::try_from(encoded >> 32)
            .map_err(|_| SecurityIdentityError::ClusterOutOfRange(encoded >> 32))?;
        let local = (encoded & 0xffff_ffff) as u32;
        Self::from_parts(cluster, local)
    }
}

impl TryFrom<u64> for SecurityIdentity {
    type Error = SecurityIdentityError;
    fn try_from(encoded: u64) -> Result<Self, Self::Error> {
        Self::from_u64(encoded)
    }
}

impl From<SecurityIdentity> for u64 {
    fn from(id: SecurityIdentity) -> u64 {
        id.to_u64()
    }
}

impl fmt::Display for SecurityIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.cluster, self.local)
    }
}

impl FromStr for SecurityIdentity {
    type Err = SecurityIdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || SecurityIdentityError::Syntax(s.chars().take(64).collect());
        let (cluster, local) = s.split_once(':').ok_or_else(syntax)?;
        let number = |part: &str| -> Result<u64, SecurityIdentityError> {
            // Digits only: no sign, no whitespace; at most 20 digits fits u64 parsing.
            if part.is_empty() || part.len() > 20 || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(syntax());
            }
            part.parse::<u64>().map_err(|_| syntax())
        };
        let cluster = number(cluster)?;
        let local = number(local)?;
        let cluster = u32::try_from(cluster)
            .map_err(|_| SecurityIdentityError::ClusterOutOfRange(cluster))?;
        let local = u32::try_from(local).map_err(|_| syntax())?;
        Self::from_parts(cluster, local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_layout_is_cluster_high_local_low() {
        let id = SecurityIdentity::from_parts(0x12_3456, 0x789a_bcde).unwrap();
        assert_eq!(id.to_u64(), 0x0012_3456_789a_bcde);
        assert_eq!(
            SecurityIdentity::from_u64(0x0012_3456_789a_bcde).unwrap(),
            id
        );
        assert_eq!(id.to_string(), format!("{}:{}", 0x12_3456, 0x789a_bcde_u32));
    }

    #[test]
    fn round_trips_at_the_bounds() {
        for (c, l) in [
            (1, 1),
            (1, u32::MAX),
            (ClusterId::MAX, 1),
            (ClusterId::MAX, u32::MAX),
            (256, 65_536),
            (65_535, 16_777_216),
        ] {
            let id = SecurityIdentity::from_parts(c, l).unwrap();
            assert_eq!(SecurityIdentity::from_u64(id.to_u64()).unwrap(), id);
            assert_eq!(id.to_string().parse::<SecurityIdentity>().unwrap(), id);
            assert_eq!(id.cluster().get(), c);
            assert_eq!(id.local().get(), l);
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(serde_json::from_str::<SecurityIdentity>(&json).unwrap(), id);
        }
    }

    #[test]
    fn out_of_range_is_refused() {
        use SecurityIdentityError as E;
        assert_eq!(ClusterId::new(0), Err(E::ClusterOutOfRange(0)));
        assert_eq!(ClusterId::new(1 << 24), Err(E::ClusterOutOfRange(1 << 24)));
        assert_eq!(LocalId::new(0), Err(E::LocalZero));
        assert_eq!(SecurityIdentity::from_u64(0), Err(E::ClusterOutOfRange(0)));
        assert_eq!(SecurityIdentity::from_u64(1 << 32), Err(E::LocalZero));
        assert_eq!(
            SecurityIdentity::from_u64(1 << 56 | 1 << 32 | 1),
            Err(E::ReservedBits(1 << 56 | 1 << 32 | 1))
        );
        assert!(serde_json::from_str::<SecurityIdentity>("0").is_err());
        assert!(serde_json::from_str::<ClusterId>("16777216").is_err());
    }

    #[test]
    fn text_form_is_strict() {
        use SecurityIdentityError as E;
        assert_eq!(
            "7:100042".parse::<SecurityIdentity>().unwrap(),
            SecurityIdentity::from_parts(7, 100_042).unwrap()
        );
        for bad in [
            "",
            "7",
            "7:",
            ":7",
            "7:8:9",
            "+7:8",
            "7:-8",
            " 7:8",
            "7:8 ",
            "0x7:8",
            "a:b",
            "7:4294967296",
            "99999999999999999999999:1",
        ] {
            assert!(
                matches!(bad.parse::<SecurityIdentity>(), Err(E::Syntax(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            "16777216:1".parse::<SecurityIdentity>(),
            Err(E::ClusterOutOfRange(16_777_216))
        );
        assert_eq!(
            "0:1".parse::<SecurityIdentity>(),
            Err(E::ClusterOutOfRange(0))
        );
        assert_eq!("1:0".parse::<SecurityIdentity>(), Err(E::LocalZero));
    }
}
