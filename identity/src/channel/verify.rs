//! Certificate verification for the peer channel: the chain to the mesh trust bundle (with
//! CRLs) and then the peer's exact SPIFFE ID.
//!
//! rustls's stock `WebPkiServerVerifier` checks a DNS name or IP address, which gateway
//! certificates do not carry (their identity is the URI SAN), so both directions use one
//! verifier built on rustls-webpki directly: the same path building, signature, validity,
//! EKU and CRL checks as rustls's own verifiers, with the name check replaced by the SPIFFE
//! ID check.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, ServerName, TrustAnchor, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};

use super::link::LinkParams;
use crate::spiffe::SpiffeId;
use crate::svid::{optional_spiffe_id, spiffe_id_of, SvidError};

/// The roots and revocation lists a gateway trusts.
///
/// `roots` may hold several mesh roots at once (rotation with overlap). `crls` hold the
/// revocation lists of the root and of the cluster intermediates; a certificate whose
/// issuer has no CRL here is not considered revoked.
#[derive(Debug, Clone, Default)]
pub struct MeshTrust {
    /// Self-signed mesh root certificates.
    pub roots: Vec<CertificateDer<'static>>,
    /// Certificate revocation lists issued by the roots or intermediates.
    pub crls: Vec<CertificateRevocationListDer<'static>>,
}

/// Why a peer was refused. Each variant names the cause; none carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The chain does not lead to any root of the trust bundle.
    #[error("unknown CA: the certificate chain does not lead to a root in the trust bundle")]
    UnknownCa,
    /// The certificate (or one in its chain) has expired.
    #[error("certificate expired")]
    Expired,
    /// The certificate (or one in its chain) is not valid yet.
    #[error("certificate not yet valid")]
    NotYetValid,
    /// The certificate (or one in its chain) is listed in a CRL.
    #[error("certificate revoked by a CRL")]
    Revoked,
    /// The client presented no certificate (client authentication is mandatory).
    #[error("no client certificate presented (client authentication is mandatory)")]
    NoClientCertificate,
    /// The certificate has no usable SPIFFE ID.
    #[error("no usable SPIFFE ID in the certificate: {0}")]
    NoSpiffeId(SvidError),
    /// The peer's trust domain is not the expected one.
    #[error("wrong trust domain: expected {expected}, peer presented {presented}")]
    WrongTrustDomain {
        /// The expected trust domain(s).
        expected: String,
        /// What the peer presented.
        presented: SpiffeId,
    },
    /// Right trust domain, wrong cluster.
    #[error("wrong cluster: expected cluster {expected}, peer presented {presented}")]
    WrongCluster {
        /// The expected cluster(s).
        expected: String,
        /// What the peer presented.
        presented: SpiffeId,
    },
    /// Right cluster, wrong gateway name.
    #[error("wrong gateway: expected gateway {expected}, peer presented {presented}")]
    WrongGateway {
        /// The expected gateway name(s).
        expected: String,
        /// What the peer presented.
        presented: SpiffeId,
    },
    /// The peer's ID is not of the expected form or not configured at all.
    #[error("unexpected peer identity {presented}: {detail}")]
    UnexpectedPeer {
        /// What the peer presented.
        presented: SpiffeId,
        /// What was expected instead.
        detail: String,
    },
    /// A cluster's CA issued a certificate for another cluster's gateway.
    #[error("certificate for {presented} was issued by the CA of {issuer}")]
    IssuerClusterMismatch {
        /// The SPIFFE ID of the issuing intermediate CA.
        issuer: SpiffeId,
        /// The leaf's SPIFFE ID.
        presented: SpiffeId,
    },
    /// A CA between the leaf and the root is not a cluster's CA: its SPIFFE ID is
    /// missing, does not parse, or names no cluster. Only cluster CAs may issue.
    #[error("the chain holds a CA that is not a cluster CA ({subject}): {reason}")]
    IssuerNotClusterCa {
        /// The CA's subject, as text.
        subject: String,
        /// What is wrong with its identity.
        reason: String,
    },
    /// Any other certificate defect (bad signature, wrong key usage, malformed, ...).
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// The peer aborted the handshake, i.e. it refused *our* certificate or identity.
    #[error("the peer refused the handshake (TLS alert {alert})")]
    RejectedByPeer {
        /// The TLS alert the peer sent.
        alert: String,
    },
    /// The peer is authenticated, but its hello announces another tunnel for this link
    /// (kind, ESP cipher or ESN) than we are configured with for it.
    #[error("tunnel mismatch: we use {ours}, peer uses {theirs}")]
    LinkMismatch {
        /// What this gateway is configured with for the peer.
        ours: LinkParams,
        /// What the peer announced.
        theirs: LinkParams,
    },
}

impl Refusal {
    /// Recovers the refusal behind a rustls handshake error, if it is one.
    pub(crate) fn from_tls(err: &rustls::Error) -> Option<Self> {
        Some(match err {
            rustls::Error::InvalidCertificate(cert_err) => match cert_err {
                CertificateError::Other(other) => {
                    return Some(match other.0.downcast_ref::<Refusal>() {
                        Some(r) => r.clone(),
                        None => Refusal::InvalidCertificate(other.0.to_string()),
                    })
                }
                CertificateError::UnknownIssuer => Refusal::UnknownCa,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Refusal::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Refusal::NotYetValid
                }
                CertificateError::Revoked => Refusal::Revoked,
                other => Refusal::InvalidCertificate(other.to_string()),
            },
            rustls::Error::NoCertificatesPresented => Refusal::NoClientCertificate,
            rustls::Error::AlertReceived(alert) => Refusal::RejectedByPeer {
                alert: format!("{alert:?}"),
            },
            _ => return None,
        })
    }

    /// The rustls error that aborts the handshake (with the matching TLS alert).
    pub(crate) fn into_tls(self) -> rustls::Error {
        let cert_err = match self {
            Refusal::UnknownCa => CertificateError::UnknownIssuer,
            Refusal::Expired => CertificateError::Expired,
            Refusal::NotYetValid => CertificateError::NotValidYet,
            Refusal::Revoked => CertificateError::Revoked,
            other => CertificateError::Other(OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(cert_err)
    }
}

fn webpki_refusal(err: webpki::Error) -> Refusal {
    use webpki::Error as E;
    match err {
        E::UnknownIssuer => Refusal::UnknownCa,
        E::CertExpired { .. } | E::InvalidCertValidity => Refusal::Expired,
        E::CertNotValidYet { .. } => Refusal::NotYetValid,
        E::CertRevoked => Refusal::Revoked,
        other => Refusal::InvalidCertificate(format!("{other:?}")),
    }
}

/// Parsed trust anchors and CRLs, shared by every verifier of one configuration.
pub(crate) struct TrustCore {
    anchors: Vec<TrustAnchor<'static>>,
    crls: Vec<CertRevocationList<'static>>,
    pub(crate) algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for TrustCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustCore")
            .field("roots", &self.anchors.len())
            .field("crls", &self.crls.len())
            .finish_non_exhaustive()
    }
}

/// Why a [`MeshTrust`] could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// No roots at all.
    #[error("the trust bundle holds no root certificate")]
    NoRoots,
    /// A root does not parse as a trust anchor.
    #[error("trust bundle root #{index} is not a usable certificate: {reason}")]
    BadRoot {
        /// Position in the bundle.
        index: usize,
        /// The parser's complaint.
        reason: String,
    },
    /// A CRL does not parse.
    #[error("CRL #{index} does not parse: {reason}")]
    BadCrl {
        /// Position in the list.
        index: usize,
        /// The parser's complaint.
        reason: String,
    },
}

impl TrustCore {
    pub(crate) fn new(
        trust: &MeshTrust,
        algs: WebPkiSupportedAlgorithms,
    ) -> Result<Self, TrustError> {
        if trust.roots.is_empty() {
            return Err(TrustError::NoRoots);
        }
        let anchors = trust
            .roots
            .iter()
            .enumerate()
            .map(|(index, root)| {
                webpki::anchor_from_trusted_cert(root)
                    .map(|a| a.to_owned())
                    .map_err(|e| TrustError::BadRoot {
                        index,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let crls = trust
            .crls
            .iter()
            .enumerate()
            .map(|(index, crl)| {
                OwnedCertRevocationList::from_der(crl)
                    .map(CertRevocationList::from)
                    .map_err(|e| TrustError::BadCrl {
                        index,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            anchors,
            crls,
            algs,
        })
    }

    /// Verifies the chain (signatures, validity at `now`, EKU, CRLs over the whole chain)
    /// and returns the leaf's SPIFFE ID. Also refuses a leaf whose issuing intermediate
    /// belongs to another cluster.
    pub(crate) fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, Refusal> {
        let cert = EndEntityCert::try_from(end_entity)
            .map_err(|e| Refusal::InvalidCertificate(format!("{e:?}")))?;
        let crl_refs: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        // A stale CRL (past nextUpdate) is still used rather than failing every peer:
        // distributing fresh CRLs is the operator's job, and an old list still revokes.
        let revocation = RevocationOptionsBuilder::new(&crl_refs).ok().map(|b| {
            b.with_depth(RevocationCheckDepth::Chain)
                .with_status_policy(UnknownStatusPolicy::Allow)
                .with_expiration_policy(ExpirationPolicy::Ignore)
                .build()
        });
        let path = cert
            .verify_for_usage(
                self.algs.all,
                &self.anchors,
                intermediates,
                now,
                usage,
                revocation,
                None,
            )
            .map_err(webpki_refusal)?;
        let presented = spiffe_id_of(end_entity).map_err(Refusal::NoSpiffeId)?;
        // Every CA between the leaf and the root is a cluster CA
        // (spiffe://<td>/cluster/<c>) and may only vouch for that cluster's
        // gateways and administrators: one whose identity is missing or unreadable is refused,
        // not skipped.
        for ca in path.intermediate_certificates() {
            let ca_cert = ca.der();
            let ca_der: &[u8] = &ca_cert;
            let not_cluster_ca = |reason: String| Refusal::IssuerNotClusterCa {
                subject: subject_of(ca_der),
                reason,
            };
            let issuer = match optional_spiffe_id(ca_der) {
                Ok(Some(id)) => id,
                Ok(None) => return Err(not_cluster_ca("it carries no SPIFFE ID".into())),
                Err(e) => return Err(not_cluster_ca(e.to_string())),
            };
            let Some(cluster) = issuer.as_cluster() else {
                return Err(not_cluster_ca(format!("{issuer} names no cluster")));
            };
            let leaf_cluster = presented.member_cluster();
            if issuer.trust_domain() != presented.trust_domain()
                || leaf_cluster.as_ref() != Some(&cluster)
            {
                return Err(Refusal::IssuerClusterMismatch { issuer, presented });
            }
        }
        Ok(presented)
    }
}

/// A certificate's subject for error messages.
fn subject_of(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert.subject().to_string())
        .unwrap_or_else(|_| "an unparseable certificate".into())
}

fn describe(candidates: &[String]) -> String {
    let mut unique: Vec<&String> = Vec::new();
    for c in candidates {
        if !unique.contains(&c) {
            unique.push(c);
        }
    }
    match unique.as_slice() {
        [one] => (*one).clone(),
        many => {
            let shown: Vec<&str> = many.iter().take(5).map(|s| s.as_str()).collect();
            let more = if many.len() > 5 { ", ..." } else { "" };
            format!("one of {{{}{more}}}", shown.join(", "))
        }
    }
}

/// Checks that `presented` is one of `expected`; otherwise names the first level at which
/// it differs from the closest expected identity (trust domain, cluster, gateway).
pub(crate) fn check_identity(presented: &SpiffeId, expected: &[SpiffeId]) -> Result<(), Refusal> {
    if expected.contains(presented) {
        return Ok(());
    }
    if expected.is_empty() {
        return Err(Refusal::UnexpectedPeer {
            presented: presented.clone(),
            detail: "no peers are configured".into(),
        });
    }
    let same_td: Vec<&SpiffeId> = expected
        .iter()
        .filter(|e| e.trust_domain() == presented.trust_domain())
        .collect();
    if same_td.is_empty() {
        return Err(Refusal::WrongTrustDomain {
            expected: describe(
                &expected
                    .iter()
                    .map(|e| e.trust_domain().to_string())
                    .collect::<Vec<_>>(),
            ),
            presented: presented.clone(),
        });
    }
    let expected_gateways: Vec<_> = same_td.iter().filter_map(|e| e.as_gateway()).collect();
    let (Some(gateway), false) = (presented.as_gateway(), expected_gateways.is_empty()) else {
        return Err(Refusal::UnexpectedPeer {
            presented: presented.clone(),
            detail: format!(
                "expected {}",
                describe(&same_td.iter().map(|e| e.to_string()).collect::<Vec<_>>())
            ),
        });
    };
    let same_cluster: Vec<_> = expected_gateways
        .iter()
        .filter(|e| e.cluster == gateway.cluster)
        .collect();
    if same_cluster.is_empty() {
        return Err(Refusal::WrongCluster {
            expected: describe(
                &expected_gateways
                    .iter()
                    .map(|e| e.cluster.to_string())
                    .collect::<Vec<_>>(),
            ),
            presented: presented.clone(),
        });
    }
    Err(Refusal::WrongGateway {
        expected: describe(
            &same_cluster
                .iter()
                .map(|e| e.name.to_string())
                .collect::<Vec<_>>(),
        ),
        presented: presented.clone(),
    })
}

/// The trust in force now, shared by a configuration's verifiers and replaced as a whole
/// when the bundle or the CRLs change (handshakes that started before keep the one they
/// read).
#[derive(Debug, Clone)]
pub(crate) struct SharedTrust {
    current: Arc<RwLock<Arc<TrustCore>>>,
    pub(crate) algs: WebPkiSupportedAlgorithms,
}

impl SharedTrust {
    pub(crate) fn new(core: TrustCore) -> Self {
        Self {
            algs: core.algs,
            current: Arc::new(RwLock::new(Arc::new(core))),
        }
    }

    pub(crate) fn current(&self) -> Arc<TrustCore> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn replace(&self, core: TrustCore) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(core);
    }

    pub(crate) fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, Refusal> {
        self.current()
            .verify_chain(end_entity, intermediates, now, usage)
    }
}

/// Verifies the server's certificate on the dialing side: chain + exactly `expected`.
#[derive(Debug)]
pub(crate) struct PeerServerVerifier {
    pub(crate) trust: SharedTrust,
    pub(crate) expected: SpiffeId,
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = self
            .trust
            .verify_chain(end_entity, intermediates, now, KeyUsage::server_auth())
            .map_err(Refusal::into_tls)?;
        check_identity(&presented, std::slice::from_ref(&self.expected))
            .map_err(Refusal::into_tls)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.trust.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.trust.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algs.supported_schemes()
    }
}

/// The peers a listener accepts, each with the link it is configured with.
#[derive(Debug, Default)]
pub(crate) struct AllowedPeers {
    ids: Vec<SpiffeId>,
    links: HashMap<SpiffeId, LinkParams>,
}

impl AllowedPeers {
    /// The last entry wins for an identity listed twice.
    pub(crate) fn new(peers: Vec<(SpiffeId, LinkParams)>) -> Self {
        let mut links = HashMap::with_capacity(peers.len());
        let mut ids = Vec::with_capacity(peers.len());
        for (id, link) in peers {
            if links.insert(id.clone(), link).is_none() {
                ids.push(id);
            }
        }
        Self { ids, links }
    }

    pub(crate) fn ids(&self) -> &[SpiffeId] {
        &self.ids
    }

    pub(crate) fn link(&self, id: &SpiffeId) -> Option<LinkParams> {
        self.links.get(id).copied()
    }
}

/// Verifies client certificates on the accepting side: mandatory, chain + one of the
/// configured peers.
#[derive(Debug)]
pub(crate) struct PeerClientVerifier {
    pub(crate) trust: SharedTrust,
    pub(crate) allowed: Arc<RwLock<AllowedPeers>>,
}

impl ClientCertVerifier for PeerClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let presented = self
            .trust
            .verify_chain(end_entity, intermediates, now, KeyUsage::client_auth())
            .map_err(Refusal::into_tls)?;
        let allowed = self.allowed.read().unwrap_or_else(PoisonError::into_inner);
        check_identity(&presented, allowed.ids()).map_err(Refusal::into_tls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.trust.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.trust.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.algs.supported_schemes()
    }
}

/// Checks certificate chains presented outside TLS (IKEv2 CERT payloads) by the rules of
/// the peer channel: a path to a root of the bundle, validity, CRLs over the whole chain,
/// the server-authentication usage of gateway certificates, cluster CAs vouching only for
/// their own cluster. Returns the leaf's SPIFFE ID.
pub struct ChainVerifier {
    core: TrustCore,
}

impl fmt::Debug for ChainVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainVerifier")
            .field("core", &self.core)
            .finish()
    }
}

impl ChainVerifier {
    /// A verifier for `trust` (roots and CRLs as loaded now).
    pub fn new(trust: &MeshTrust) -> Result<Self, TrustError> {
        Ok(Self {
            core: TrustCore::new(
                trust,
                rustls::crypto::ring::default_provider().signature_verification_algorithms,
            )?,
        })
    }

    /// Verifies `chain` (DER, leaf first) at `now`; the leaf's SPIFFE ID.
    pub fn verify(
        &self,
        chain: &[Vec<u8>],
        now: std::time::SystemTime,
    ) -> Result<SpiffeId, Refusal> {
        let Some((leaf, rest)) = chain.split_first() else {
            return Err(Refusal::InvalidCertificate("no certificate".into()));
        };
        let leaf = CertificateDer::from(leaf.as_slice());
        let intermediates: Vec<CertificateDer<'_>> = rest
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let since = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| Refusal::InvalidCertificate("the clock is before 1970".into()))?;
        self.core.verify_chain(
            &leaf,
            &intermediates,
            UnixTime::since_unix_epoch(since),
            KeyUsage::server_auth(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA (`san`: its URI SAN, if any) signed by `issuer`, or self-signed.
    fn ca(
        san: Option<&str>,
        issuer: Option<&(rcgen::Certificate, rcgen::KeyPair)>,
    ) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        if let Some(san) = san {
            params.subject_alt_names = vec![rcgen::SanType::URI(san.try_into().unwrap())];
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, san.unwrap_or("no SAN"));
        let cert = match issuer {
            Some((cert, key_of)) => {
                let issuer = rcgen::Issuer::from_ca_cert_der(cert.der(), key_of).unwrap();
                params.signed_by(&key, &issuer).unwrap()
            }
            None => params.self_signed(&key).unwrap(),
        };
        (cert, key)
    }

    fn leaf(id: &str, issuer: &(rcgen::Certificate, rcgen::KeyPair)) -> rcgen::Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = rcgen::Issuer::from_ca_cert_der(issuer.0.der(), &issuer.1).unwrap();
        params.signed_by(&key, &issuer).unwrap()
    }

    /// Every CA between the leaf and the root must be the CA of the leaf's own
    /// cluster: one whose SPIFFE ID is missing, does not parse, or is not a
    /// cluster's is refused, and so is another cluster's CA anywhere in the
    /// path (the review found only the first intermediate looked at, and an
    /// unparseable one skipped).
    #[test]
    fn every_intermediate_must_be_the_leafs_cluster_ca() {
        let root = ca(None, None);
        let trust = MeshTrust {
            roots: vec![root.0.der().clone()],
            crls: vec![],
        };
        let core = TrustCore::new(
            &trust,
            rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
        .unwrap();
        let gateway = "spiffe://td/cluster/a/gateway/gw1";
        let sign = |issuer: &(rcgen::Certificate, rcgen::KeyPair),
                    chain: &[&(rcgen::Certificate, rcgen::KeyPair)]| {
            let leaf = leaf(gateway, issuer);
            let intermediates: Vec<CertificateDer<'_>> =
                chain.iter().map(|c| c.0.der().clone()).collect();
            core.verify_chain(
                leaf.der(),
                &intermediates,
                UnixTime::now(),
                KeyUsage::server_auth(),
            )
        };

        let a = ca(Some("spiffe://td/cluster/a"), Some(&root));
        assert_eq!(sign(&a, &[&a]).unwrap().to_string(), gateway);

        let b = ca(Some("spiffe://td/cluster/b"), Some(&root));
        assert!(matches!(
            sign(&b, &[&b]),
            Err(Refusal::IssuerClusterMismatch { .. })
        ));
        // Cluster b's CA signs a CA for cluster a: the first intermediate
        // matches, the second does not.
        let a_under_b = ca(Some("spiffe://td/cluster/a"), Some(&b));
        assert!(
            matches!(
                sign(&a_under_b, &[&a_under_b, &b]),
                Err(Refusal::IssuerClusterMismatch { ref issuer, .. })
                    if issuer.to_string() == "spiffe://td/cluster/b"
            ),
            "{:?}",
            sign(&a_under_b, &[&a_under_b, &b])
        );
        for (what, san) in [
            (
                "a URI SAN that is no SPIFFE ID",
                Some("https://example.com/ca"),
            ),
            (
                "a SPIFFE ID with a path no cluster has",
                Some("spiffe://td/cluster"),
            ),
            ("no URI SAN", None),
            ("a gateway's ID", Some("spiffe://td/cluster/a/gateway/gw9")),
        ] {
            let odd = ca(san, Some(&root));
            let got = sign(&odd, &[&odd]);
            assert!(
                matches!(got, Err(Refusal::IssuerNotClusterCa { .. })),
                "an intermediate with {what}: {got:?}"
            );
        }
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn identity_check_names_the_first_mismatch() {
        let expected = [id("spiffe://td/cluster/a/gateway/gw1")];
        assert_eq!(check_identity(&expected[0], &expected), Ok(()));
        assert!(matches!(
            check_identity(&id("spiffe://other/cluster/a/gateway/gw1"), &expected),
            Err(Refusal::WrongTrustDomain { expected, .. }) if expected == "td"
        ));
        assert!(matches!(
            check_identity(&id("spiffe://td/cluster/b/gateway/gw1"), &expected),
            Err(Refusal::WrongCluster { expected, .. }) if expected == "a"
        ));
        assert!(matches!(
            check_identity(&id("spiffe://td/cluster/a/gateway/gw2"), &expected),
            Err(Refusal::WrongGateway { expected, .. }) if expected == "gw1"
        ));
        assert!(matches!(
            check_identity(&id("spiffe://td/workload/x"), &expected),
            Err(Refusal::UnexpectedPeer { .. })
        ));
        assert!(matches!(
            check_identity(&expected[0], &[]),
            Err(Refusal::UnexpectedPeer { .. })
        ));
        let several = [
            id("spiffe://td/cluster/a/gateway/gw1"),
            id("spiffe://td/cluster/b/gateway/gw1"),
        ];
        assert!(matches!(
            check_identity(&id("spiffe://td/cluster/c/gateway/gw1"), &several),
            Err(Refusal::WrongCluster { expected, .. }) if expected == "one of {a, b}"
        ));
    }

    #[test]
    fn refusals_survive_the_trip_through_rustls_errors() {
        let all = [
            Refusal::UnknownCa,
            Refusal::Expired,
            Refusal::NotYetValid,
            Refusal::Revoked,
            Refusal::WrongCluster {
                expected: "a".into(),
                presented: id("spiffe://td/cluster/b/gateway/g"),
            },
            Refusal::NoSpiffeId(SvidError::NoUriSan),
        ];
        for r in all {
            assert_eq!(Refusal::from_tls(&r.clone().into_tls()), Some(r));
        }
        assert_eq!(
            Refusal::from_tls(&rustls::Error::NoCertificatesPresented),
            Some(Refusal::NoClientCertificate)
        );
    }
}
