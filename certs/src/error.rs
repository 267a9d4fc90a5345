//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

use isthmus_identity::SpiffeIdError;

/// Why a PKI operation failed. Messages name the file, name or certificate concerned and
/// never include key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A private key file already exists; keys are never silently overwritten.
    #[error("{}: already exists; refusing to overwrite a private key", path.display())]
    KeyExists {
        /// The file.
        path: PathBuf,
    },
    /// A private key file is readable or writable by group or others.
    #[error(
        "{}: private key file has mode {mode:04o}, group/other may access it; \
         it must be 0600 or stricter (chmod 600)",
        path.display()
    )]
    KeyFileTooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A secret file owned by another user (who could have written the key).
    #[error(
        "{}: owned by uid {owner}; a key file must belong to this user or to root",
        path.display()
    )]
    KeyFileOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
    },
    /// A file larger than anything of its kind should be.
    #[error("{}: larger than {limit} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit.
        limit: u64,
    },
    /// Not a regular file (a directory, device, ...).
    #[error("{}: not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file holds no PEM block of the expected kind.
    #[error("{}: no {what} found", path.display())]
    NothingFound {
        /// The file.
        path: PathBuf,
        /// "certificate", "private key", ...
        what: &'static str,
    },
    /// The input is not valid PEM (the offending text is not repeated: it may be a key).
    #[error("{what}: invalid PEM")]
    BadPem {
        /// What was being read (a path or a description).
        what: String,
    },
    /// A certificate does not parse, or is not what was asked for.
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    /// A CRL does not parse.
    #[error("invalid CRL: {0}")]
    BadCrl(String),
    /// The private key is not an ECDSA P-256 PKCS#8 key.
    #[error("unsupported private key: only ECDSA P-256 (PKCS#8) keys are used")]
    UnsupportedKey,
    /// The private key does not belong to the certificate.
    #[error("the private key does not match the certificate {subject}")]
    KeyMismatch {
        /// The certificate's subject.
        subject: String,
    },
    /// The issuing CA's certificate has expired.
    #[error("CA certificate {subject} expired at {not_after}; create or issue a new CA")]
    CaExpired {
        /// The CA's subject.
        subject: String,
        /// When it expired (RFC 3339).
        not_after: String,
    },
    /// The issuing CA's certificate is not valid yet.
    #[error("CA certificate {subject} is not valid before {not_before}")]
    CaNotYetValid {
        /// The CA's subject.
        subject: String,
        /// When it becomes valid (RFC 3339).
        not_before: String,
    },
    /// The requested validity does not overlap the CA's.
    #[error("the requested validity lies outside the CA's validity ({not_before} to {not_after})")]
    OutsideCaValidity {
        /// CA not-before (RFC 3339).
        not_before: String,
        /// CA not-after (RFC 3339).
        not_after: String,
    },
    /// not_after is not after not_before.
    #[error("invalid validity: not-after must be later than not-before")]
    BadValidity,
    /// A CA certificate is not a mesh root or cluster CA.
    #[error("{0}")]
    NotAMeshCa(String),
    /// No intermediate CA exists for this cluster.
    #[error("unknown cluster {0:?}: no cluster CA has been issued for it (issue one first)")]
    UnknownCluster(String),
    /// A rotation step refused, with the reason and what to do.
    #[error("{0}")]
    RotationRefused(String),
    /// A CA directory does not exist or is not initialised.
    #[error("{}: not an initialised CA directory (run init first)", path.display())]
    NotInitialised {
        /// The directory.
        path: PathBuf,
    },
    /// Something to be created already exists.
    #[error("{}: already exists", path.display())]
    AlreadyExists {
        /// The path.
        path: PathBuf,
    },
    /// A trust domain, cluster or gateway name was refused.
    #[error("bad name: {0}")]
    BadName(#[from] SpiffeIdError),
    /// A serial number given as text is not hex.
    #[error("{0:?} is not a serial number (hex bytes, optionally ':'-separated)")]
    BadSerial(String),
    /// rcgen refused to build a certificate or CRL.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
}

impl CertError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        CertError::Io {
            path: path.into(),
            source,
        }
    }
}
