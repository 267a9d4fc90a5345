//! Human-readable summaries of certificates — never of keys.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::SystemTime;

use isthmus_identity::svid::optional_spiffe_id;
use isthmus_identity::SpiffeId;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::error::CertError;
use crate::files;

/// RFC 3339 text of a time (UTC).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "(time out of range)".into())
}

/// A certificate serial number (big-endian bytes, no leading zero bytes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&[u8]> for Serial {
    fn from(bytes: &[u8]) -> Self {
        let first = bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        Self(bytes[first..].to_vec())
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&colon_hex(&self.0))
    }
}

impl FromStr for Serial {
    type Err = CertError;
    /// Hex bytes, optionally separated by `:` (as printed by `show`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || CertError::BadSerial(s.chars().take(80).collect());
        let digits: String = s.chars().filter(|&c| c != ':').collect();
        if digits.is_empty() || digits.len() > 40 {
            return Err(bad());
        }
        let bytes = hex::decode(&digits).map_err(|_| bad())?;
        Ok(Serial::from(bytes.as_slice()))
    }
}

fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What `show` prints about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSummary {
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// The SPIFFE ID (the only URI SAN), if there is a valid one.
    pub spiffe_id: Option<SpiffeId>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Serial number.
    pub serial: Serial,
    /// SHA-256 of the DER certificate.
    pub sha256_fingerprint: [u8; 32],
    /// Whether it is a CA certificate.
    pub is_ca: bool,
}

impl CertificateSummary {
    /// Summarises one DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CertError::BadCertificate(e.to_string()))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut sha256_fingerprint = [0u8; 32];
        sha256_fingerprint.copy_from_slice(digest.as_ref());
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            spiffe_id: optional_spiffe_id(der).ok().flatten(),
            not_before: cert.validity().not_before.to_datetime().into(),
            not_after: cert.validity().not_after.to_datetime().into(),
            serial: Serial::from(cert.raw_serial()),
            sha256_fingerprint,
            is_ca: cert.is_ca(),
        })
    }

    /// Summarises every certificate of a PEM text (other blocks, such as keys, are
    /// skipped and never shown).
    pub fn from_pem(pem: &str, what: &str) -> Result<Vec<Self>, CertError> {
        files::parse_certificates(pem, what)?
            .iter()
            .map(|der| Self::from_der(der))
            .collect()
    }

    /// Summarises every certificate of a PEM file.
    pub fn from_file(path: &Path) -> Result<Vec<Self>, CertError> {
        files::load_certificates(path)?
            .iter()
            .map(|der| Self::from_der(der))
            .collect()
    }

    /// Whether `now` lies within the validity period.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

impl fmt::Display for CertificateSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "subject:     {}", self.subject)?;
        writeln!(f, "issuer:      {}", self.issuer)?;
        match &self.spiffe_id {
            Some(id) => writeln!(f, "spiffe id:   {id}")?,
            None => writeln!(f, "spiffe id:   -")?,
        }
        writeln!(f, "ca:          {}", if self.is_ca { "yes" } else { "no" })?;
        writeln!(f, "not before:  {}", rfc3339(self.not_before))?;
        writeln!(f, "not after:   {}", rfc3339(self.not_after))?;
        writeln!(f, "serial:      {}", self.serial)?;
        write!(f, "sha256:      {}", colon_hex(&self.sha256_fingerprint))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_text_round_trip() {
        let s: Serial = "40:0a:ff".parse().unwrap();
        assert_eq!(s.as_bytes(), [0x40, 0x0a, 0xff]);
        assert_eq!(s.to_string(), "40:0a:ff");
        assert_eq!("400aff".parse::<Serial>().unwrap(), s);
        assert_eq!(Serial::from(&[0u8, 0x80][..]).as_bytes(), [0x80]);
        assert_eq!(Serial::from(&[0u8][..]).as_bytes(), [0]);
        for bad in ["", ":", "xyz", "4", &"ab".repeat(21)] {
            assert!(
                matches!(bad.parse::<Serial>(), Err(CertError::BadSerial(_))),
                "{bad}"
            );
        }
    }
}
