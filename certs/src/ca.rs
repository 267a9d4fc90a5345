//! The mesh root CA, per-cluster intermediate CAs, and gateway leaf certificates.
//!
//! ```text
//! mesh root CA      URI SAN spiffe://<td>                      CA, path length 1
//!  └ cluster CA     URI SAN spiffe://<td>/cluster/<c>          CA, path length 0
//!     └ gateway     URI SAN spiffe://<td>/cluster/<c>/gateway/<n>
//!                   digitalSignature; EKU serverAuth + clientAuth; not a CA
//! ```
//!
//! All keys are ECDSA P-256; serial numbers are 16 random bytes. A leaf's validity is
//! clamped to its issuer's. CRLs are signed by the CA that issued the revoked
//! certificates (the root revokes cluster CAs, a cluster CA revokes its gateways).

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use isthmus_identity::{
    ClusterName, GatewayId, GatewayName, LocalCredentials, SpiffeId, TrustDomain,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::error::CertError;
use crate::files;
use crate::show::{rfc3339, Serial};

/// A certificate's validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start.
    pub not_before: SystemTime,
    /// End.
    pub not_after: SystemTime,
}

/// Backdating of `not_before` in [`Validity::starting_now`], for clock skew between gateways.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

impl Validity {
    /// A period from `not_before` to `not_after` (which must be later).
    pub fn new(not_before: SystemTime, not_after: SystemTime) -> Result<Self, CertError> {
        if not_after <= not_before {
            return Err(CertError::BadValidity);
        }
        Ok(Self {
            not_before,
            not_after,
        })
    }

    /// From a little before now (see [`CLOCK_SKEW_ALLOWANCE`]) for `lifetime`.
    pub fn starting_now(lifetime: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + lifetime,
        }
    }

    /// From a little before now for `days` days.
    pub fn days(days: u32) -> Self {
        Self::starting_now(Duration::from_secs(u64::from(days) * 86_400))
    }
}

fn random_serial() -> Result<SerialNumber, CertError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertError::Random)?;
    // Positive, and a fixed length of 16 bytes (no leading zero byte).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn new_key() -> Result<KeyPair, CertError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

fn uri_san(id: &SpiffeId) -> Result<SanType, CertError> {
    Ok(SanType::URI(id.to_string().try_into()?))
}

fn dn(common_name: String) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Isthmus mesh");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A CA certificate with its signing key.
struct CaKey {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    id: SpiffeId,
    subject: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaKey")
            .field("id", &self.id.to_string())
            .field("subject", &self.subject)
            .field("not_after", &rfc3339(self.not_after))
            .finish_non_exhaustive()
    }
}

impl CaKey {
    fn create(
        params: CertificateParams,
        key: KeyPair,
        parent: Option<&CaKey>,
        id: SpiffeId,
        subject: String,
    ) -> Result<Self, CertError> {
        let not_before = SystemTime::from(params.not_before);
        let not_after = SystemTime::from(params.not_after);
        let cert = match parent {
            None => params.self_signed(&key)?,
            Some(parent) => params.signed_by(&key, &parent.issuer)?,
        };
        Ok(Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
            id,
            subject,
            not_before,
            not_after,
        })
    }

    /// Parses a CA certificate and its key, checking that they belong together.
    fn from_pem(cert_pem: &str, key_pem: &str, what: &str) -> Result<Self, CertError> {
        let cert = files::parse_certificates(cert_pem, what)?
            .into_iter()
            .next()
            .ok_or_else(|| CertError::BadCertificate(format!("{what}: no certificate")))?;
        let key = KeyPair::from_pem(key_pem).map_err(|_| CertError::UnsupportedKey)?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CertError::UnsupportedKey);
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
            .map_err(|e| CertError::BadCertificate(format!("{what}: {e}")))?;
        let subject = parsed.subject().to_string();
        if !parsed.is_ca() {
            return Err(CertError::NotAMeshCa(format!(
                "{what}: {subject} is not a CA certificate"
            )));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::KeyMismatch { subject });
        }
        let id = isthmus_identity::svid::spiffe_id_of(&cert).map_err(|e| {
            CertError::NotAMeshCa(format!("{what}: {subject} has no mesh identity: {e}"))
        })?;
        let not_before = SystemTime::from(parsed.validity().not_before.to_datetime());
        let not_after = SystemTime::from(parsed.validity().not_after.to_datetime());
        let issuer = Issuer::from_ca_cert_der(&cert, key)?;
        Ok(Self {
            cert,
            issuer,
            id,
            subject,
            not_before,
            not_after,
        })
    }

    fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.issuer.key().serialize_pem())
    }

    fn cert_pem(&self) -> String {
        files::encode_pem("CERTIFICATE", &[self.cert.as_ref()])
    }

    /// Checks that the CA may sign now and clamps `validity` to the CA's own.
    fn child_validity(
        &self,
        validity: Validity,
    ) -> Result<(OffsetDateTime, OffsetDateTime), CertError> {
        let now = SystemTime::now();
        if now >= self.not_after {
            return Err(CertError::CaExpired {
                subject: self.subject.clone(),
                not_after: rfc3339(self.not_after),
            });
        }
        if now < self.not_before {
            return Err(CertError::CaNotYetValid {
                subject: self.subject.clone(),
                not_before: rfc3339(self.not_before),
            });
        }
        let not_before = validity.not_before.max(self.not_before);
        let not_after = validity.not_after.min(self.not_after);
        if not_after <= not_before {
            return Err(CertError::OutsideCaValidity {
                not_before: rfc3339(self.not_before),
                not_after: rfc3339(self.not_after),
            });
        }
        Ok((not_before.into(), not_after.into()))
    }

    fn crl(
        &self,
        revoked: &[Serial],
        crl_number: u64,
        validity: Validity,
    ) -> Result<Crl, CertError> {
        let now = OffsetDateTime::from(SystemTime::now());
        let params = CertificateRevocationListParams {
            this_update: validity.not_before.into(),
            next_update: validity.not_after.into(),
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial.as_bytes()),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        Ok(Crl {
            der: crl.der().clone(),
        })
    }
}

/// A certificate revocation list (DER), issued by a mesh CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crl {
    der: CertificateRevocationListDer<'static>,
}

impl Crl {
    /// Wraps a DER CRL after checking that it parses.
    pub fn from_der(der: CertificateRevocationListDer<'static>) -> Result<Self, CertError> {
        x509_parser::parse_x509_crl(&der).map_err(|e| CertError::BadCrl(e.to_string()))?;
        Ok(Self { der })
    }

    /// The DER encoding (for [`MeshTrust::crls`](isthmus_identity::MeshTrust)).
    pub fn der(&self) -> &CertificateRevocationListDer<'static> {
        &self.der
    }

    /// The PEM encoding (`X509 CRL`).
    pub fn to_pem(&self) -> String {
        files::encode_pem("X509 CRL", &[self.der.as_ref()])
    }

    /// Writes the PEM to `path` (0644, atomic).
    pub fn save(&self, path: &Path) -> Result<(), CertError> {
        files::write_public_file(path, &self.to_pem())
    }

    /// Loads every CRL of a PEM file.
    pub fn load_all(path: &Path) -> Result<Vec<Self>, CertError> {
        files::load_crls(path)?
            .into_iter()
            .map(Self::from_der)
            .collect()
    }
}

/// The mesh root CA of one trust domain.
#[derive(Debug)]
pub struct MeshRootCa {
    trust_domain: TrustDomain,
    ca: CaKey,
}

impl MeshRootCa {
    /// Creates a new root CA (new P-256 key, self-signed, path length 1).
    pub fn create(trust_domain: &TrustDomain, validity: Validity) -> Result<Self, CertError> {
        let validity = Validity::new(validity.not_before, validity.not_after)?;
        let serial = random_serial()?;
        let id = trust_domain.id();
        let subject_cn = format!("Isthmus mesh root CA {trust_domain} {}", short(&serial));
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(subject_cn.clone());
        params.serial_number = Some(serial);
        params.not_before = validity.not_before.into();
        params.not_after = validity.not_after.into();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri_san(&id)?];
        let ca = CaKey::create(params, new_key()?, None, id, subject_cn)?;
        tracing::info!(trust_domain = %trust_domain, subject = %ca.subject, "created mesh root CA");
        Ok(Self {
            trust_domain: trust_domain.clone(),
            ca,
        })
    }

    /// Loads a root CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let ca = CaKey::from_pem(cert_pem, key_pem, "root CA certificate")?;
        if !ca.id.path().is_empty() {
            return Err(CertError::NotAMeshCa(format!(
                "{} carries {}, not a trust domain ID: not a mesh root CA",
                ca.subject, ca.id
            )));
        }
        Ok(Self {
            trust_domain: ca.id.trust_domain().clone(),
            ca,
        })
    }

    /// Loads a root CA from files (the key file is permission-checked).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let cert = std::fs::read_to_string(cert_path).map_err(|e| CertError::io(cert_path, e))?;
        let key = files::read_private_key_pem(key_path)?;
        Self::from_pem(&cert, &key)
    }

    /// Writes the certificate (0644) and a new key file (0600, never overwritten).
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
        files::write_private_key(key_path, &self.ca.key_pem())?;
        files::write_public_file(cert_path, &self.ca.cert_pem())
    }

    /// Replaces an existing certificate and key, each file atomically (key first).
    pub fn replace(&self, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
        files::replace_private_key(key_path, &self.ca.key_pem())?;
        files::write_public_file(cert_path, &self.ca.cert_pem())
    }

    /// The subject distinguished name (unique per CA: it names the serial).
    pub fn subject(&self) -> &str {
        &self.ca.subject
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.ca.cert
    }

    /// The root certificate (PEM).
    pub fn certificate_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// Issues the intermediate CA of `cluster` (new key, path length 0).
    pub fn issue_cluster_ca(
        &self,
        cluster: &ClusterName,
        validity: Validity,
    ) -> Result<ClusterCa, CertError> {
        let (not_before, not_after) = self.ca.child_validity(validity)?;
        let serial = random_serial()?;
        let id = SpiffeId::cluster(&self.trust_domain, cluster);
        let subject_cn = format!("Isthmus cluster CA {cluster} {}", short(&serial));
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(subject_cn.clone());
        params.serial_number = Some(serial);
        params.not_before = not_before;
        params.not_after = not_after;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri_san(&id)?];
        params.use_authority_key_identifier_extension = true;
        let ca = CaKey::create(params, new_key()?, Some(&self.ca), id, subject_cn)?;
        tracing::info!(cluster = %cluster, subject = %ca.subject, "issued cluster CA");
        Ok(ClusterCa {
            trust_domain: self.trust_domain.clone(),
            cluster: cluster.clone(),
            ca,
        })
    }

    /// A CRL revoking cluster CA certificates by serial. `crl_number` must grow with
    /// every CRL this CA issues.
    pub fn crl(
        &self,
        revoked: &[Serial],
        crl_number: u64,
        validity: Validity,
    ) -> Result<Crl, CertError> {
        self.ca.crl(revoked, crl_number, validity)
    }
}

/// A cluster's intermediate CA: issues that cluster's gateway certificates only.
#[derive(Debug)]
pub struct ClusterCa {
    trust_domain: TrustDomain,
    cluster: ClusterName,
    ca: CaKey,
}

impl ClusterCa {
    /// Loads a cluster CA from its certificate and key PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let ca = CaKey::from_pem(cert_pem, key_pem, "cluster CA certificate")?;
        let cluster = ca.id.as_cluster().ok_or_else(|| {
            CertError::NotAMeshCa(format!(
                "{} carries {}, not spiffe://<td>/cluster/<name>: not a cluster CA",
                ca.subject, ca.id
            ))
        })?;
        Ok(Self {
            trust_domain: ca.id.trust_domain().clone(),
            cluster,
            ca,
        })
    }

    /// Loads a cluster CA from files (the key file is permission-checked).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CertError> {
        let cert = std::fs::read_to_string(cert_path).map_err(|e| CertError::io(cert_path, e))?;
        let key = files::read_private_key_pem(key_path)?;
        Self::from_pem(&cert, &key)
    }

    /// Writes the certificate (0644) and a new key file (0600, never overwritten).
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
        files::write_private_key(key_path, &self.ca.key_pem())?;
        files::write_public_file(cert_path, &self.ca.cert_pem())
    }

    /// Replaces an existing certificate and key, each file atomically (key first).
    pub fn replace(&self, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
        files::replace_private_key(key_path, &self.ca.key_pem())?;
        files::write_public_file(cert_path, &self.ca.cert_pem())
    }

    /// The subject distinguished name (unique per CA: it names the serial).
    pub fn subject(&self) -> &str {
        &self.ca.subject
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The cluster.
    pub fn cluster(&self) -> &ClusterName {
        &self.cluster
    }

    /// The intermediate certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.ca.cert
    }

    /// The intermediate certificate (PEM).
    pub fn certificate_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// Issues the certificate of gateway `name` of this cluster (new key).
    pub fn issue_gateway(
        &self,
        name: &GatewayName,
        validity: Validity,
    ) -> Result<IssuedCertificate, CertError> {
        self.issue_leaf(LeafKind::Gateway, name, validity)
    }

    /// Issues a leaf of this cluster (new key): a gateway's (server and client
    /// authentication) or an administrator's (client authentication only,
    /// `spiffe://<td>/cluster/<c>/admin/<name>`).
    pub fn issue_leaf(
        &self,
        kind: LeafKind,
        name: &GatewayName,
        validity: Validity,
    ) -> Result<IssuedCertificate, CertError> {
        let (not_before, not_after) = self.ca.child_validity(validity)?;
        let serial = random_serial()?;
        let id = match kind {
            LeafKind::Gateway => GatewayId::new(
                self.trust_domain.clone(),
                self.cluster.clone(),
                name.clone(),
            )
            .spiffe_id(),
            LeafKind::Admin => SpiffeId::admin(&self.trust_domain, &self.cluster, name),
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(match kind {
            LeafKind::Gateway => format!("{name}.{}", self.cluster),
            LeafKind::Admin => format!("admin {name}.{}", self.cluster),
        });
        params.serial_number = Some(serial.clone());
        params.not_before = not_before;
        params.not_after = not_after;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match kind {
            LeafKind::Gateway => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            LeafKind::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.subject_alt_names = vec![uri_san(&id)?];
        params.use_authority_key_identifier_extension = true;
        let key = new_key()?;
        let cert = params.signed_by(&key, &self.ca.issuer)?;
        tracing::info!(id = %id, serial = %Serial::from(serial.as_ref()), "issued a leaf certificate");
        Ok(IssuedCertificate {
            id,
            chain: vec![cert.der().clone(), self.ca.cert.clone()],
            key_pem: Zeroizing::new(key.serialize_pem()),
            serial: Serial::from(serial.as_ref()),
        })
    }

    /// A CRL revoking gateway certificates of this cluster by serial. `crl_number` must
    /// grow with every CRL this CA issues.
    pub fn crl(
        &self,
        revoked: &[Serial],
        crl_number: u64,
        validity: Validity,
    ) -> Result<Crl, CertError> {
        self.ca.crl(revoked, crl_number, validity)
    }
}

/// What a leaf certificate of a cluster is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafKind {
    /// A gateway: `spiffe://<td>/cluster/<c>/gateway/<name>`.
    Gateway,
    /// An administrator of the cluster's gateways (remote administration):
    /// `spiffe://<td>/cluster/<c>/admin/<name>`.
    Admin,
}

/// A freshly issued gateway certificate with its chain and private key.
pub struct IssuedCertificate {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key_pem: Zeroizing<String>,
    serial: Serial,
}

impl fmt::Debug for IssuedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCertificate")
            .field("id", &self.id.to_string())
            .field("serial", &self.serial.to_string())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl IssuedCertificate {
    /// The SPIFFE ID in the certificate.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The serial number (for revocation).
    pub fn serial(&self) -> &Serial {
        &self.serial
    }

    /// Leaf, then the cluster intermediate.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The chain as PEM (leaf first).
    pub fn chain_pem(&self) -> String {
        let ders: Vec<&[u8]> = self.chain.iter().map(|c| c.as_ref()).collect();
        files::encode_pem("CERTIFICATE", &ders)
    }

    /// The private key as PKCS#8 PEM. Handle with care: write it with
    /// [`write_private_key`](crate::write_private_key), never log it.
    pub fn private_key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The private key as DER.
    pub fn private_key_der(&self) -> Result<PrivateKeyDer<'static>, CertError> {
        files::parse_private_key(&self.key_pem, "issued key")
    }

    /// Chain and key in the form the peer channel takes.
    pub fn credentials(&self) -> Result<LocalCredentials, CertError> {
        Ok(LocalCredentials {
            chain: self.chain.clone(),
            key: self.private_key_der()?,
        })
    }

    /// Writes the chain (0644) and a new key file (0600, never overwritten).
    pub fn save(&self, chain_path: &Path, key_path: &Path) -> Result<(), CertError> {
        files::write_private_key(key_path, &self.key_pem)?;
        files::write_public_file(chain_path, &self.chain_pem())
    }

    /// Replaces an existing certificate and key, each file atomically (key first;
    /// a reader that sees the new key with the old chain finds them mismatched and
    /// reads again).
    pub fn replace(&self, chain_path: &Path, key_path: &Path) -> Result<(), CertError> {
        files::replace_private_key(key_path, &self.key_pem)?;
        files::write_public_file(chain_path, &self.chain_pem())
    }
}

fn short(serial: &SerialNumber) -> String {
    // 8 of the 16 random bytes: CRLs are matched by issuer name, so two CAs of a
    // cluster must never share one.
    hex::encode(&serial.as_ref()[..8])
}
