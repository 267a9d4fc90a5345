//! Reading the SPIFFE ID out of an X.509 certificate (an X.509-SVID).
//!
//! An X.509-SVID carries exactly one URI subject alternative name, the SPIFFE ID. A
//! certificate with none, several, or an invalid one has no identity here.

use x509_parser::extensions::GeneralName;

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Why no SPIFFE ID could be read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The DER does not parse as an X.509 certificate.
    #[error("not a parseable X.509 certificate")]
    BadCertificate,
    /// No URI subject alternative name.
    #[error("the certificate has no URI subject alternative name (no SPIFFE ID)")]
    NoUriSan,
    /// More than one URI SAN: an SVID has exactly one.
    #[error("the certificate has {0} URI subject alternative names; an SVID has exactly one")]
    SeveralUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("the URI subject alternative name is not a valid SPIFFE ID: {0}")]
    InvalidId(#[from] SpiffeIdError),
}

/// The SPIFFE ID of a DER-encoded certificate, or `Ok(None)` if it has no URI SAN at all
/// (CA certificates may have none).
pub fn optional_spiffe_id(cert_der: &[u8]) -> Result<Option<SpiffeId>, SvidError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|_| SvidError::BadCertificate)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| SvidError::BadCertificate)?;
    let Some(san) = san else {
        return Ok(None);
    };
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Ok(None),
        [uri] => Ok(Some(SpiffeId::parse(uri)?)),
        several => Err(SvidError::SeveralUriSans(several.len())),
    }
}

/// The SPIFFE ID of a DER-encoded certificate (its only URI SAN).
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<SpiffeId, SvidError> {
    optional_spiffe_id(cert_der)?.ok_or(SvidError::NoUriSan)
}
