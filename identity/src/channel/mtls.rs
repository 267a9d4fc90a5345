//! mTLS for the mesh's other services (the clustermesh API): the same chain, CRL, EKU and
//! cluster-CA checks as the peer channel, with a [`PeerPolicy`] that says which verified
//! SPIFFE IDs the service accepts.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::NoServerSessionStorage;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use webpki::KeyUsage;

use super::verify::{check_identity, TrustCore};
use super::{ChannelError, LocalCredentials, MeshTrust, Refusal};
use crate::spiffe::{ClusterName, SpiffeId, TrustDomain};
use crate::svid::spiffe_id_of;

/// Which verified peers a service accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerPolicy {
    /// Exactly one of these IDs.
    Exact(Vec<SpiffeId>),
    /// Any gateway (`spiffe://<td>/cluster/<c>/gateway/<g>`) of the trust domain.
    AnyGateway(TrustDomain),
    /// Any gateway of this cluster of the trust domain.
    GatewayOfCluster(TrustDomain, ClusterName),
    /// An administrator (`spiffe://<td>/cluster/<c>/admin/<name>`) of one of these
    /// clusters of the trust domain.
    AdminOfClusters(TrustDomain, Vec<ClusterName>),
}

impl PeerPolicy {
    /// Checks a verified SPIFFE ID against the policy.
    pub fn check(&self, presented: &SpiffeId) -> Result<(), Refusal> {
        match self {
            PeerPolicy::Exact(ids) => check_identity(presented, ids),
            PeerPolicy::AnyGateway(td) => {
                if presented.trust_domain() != td {
                    return Err(Refusal::WrongTrustDomain {
                        expected: td.to_string(),
                        presented: presented.clone(),
                    });
                }
                if presented.as_gateway().is_none() {
                    return Err(Refusal::UnexpectedPeer {
                        presented: presented.clone(),
                        detail: "expected a gateway identity".into(),
                    });
                }
                Ok(())
            }
            PeerPolicy::AdminOfClusters(td, clusters) => {
                if presented.trust_domain() != td {
                    return Err(Refusal::WrongTrustDomain {
                        expected: td.to_string(),
                        presented: presented.clone(),
                    });
                }
                match presented.as_admin() {
                    Some((c, _)) if clusters.contains(&c) => Ok(()),
                    Some(_) => Err(Refusal::WrongCluster {
                        expected: clusters
                            .iter()
                            .map(|c| c.to_string())
                            .collect::<Vec<_>>()
                            .join(" or "),
                        presented: presented.clone(),
                    }),
                    None => Err(Refusal::UnexpectedPeer {
                        presented: presented.clone(),
                        detail: "expected an administrator identity".into(),
                    }),
                }
            }
            PeerPolicy::GatewayOfCluster(td, cluster) => {
                if presented.trust_domain() != td {
                    return Err(Refusal::WrongTrustDomain {
                        expected: td.to_string(),
                        presented: presented.clone(),
                    });
                }
                match presented.as_gateway() {
                    Some(g) if &g.cluster == cluster => Ok(()),
                    Some(_) => Err(Refusal::WrongCluster {
                        expected: cluster.to_string(),
                        presented: presented.clone(),
                    }),
                    None => Err(Refusal::UnexpectedPeer {
                        presented: presented.clone(),
                        detail: format!("expected a gateway identity of cluster {cluster}"),
                    }),
                }
            }
        }
    }
}

/// Builds rustls configs (TLS 1.3 only, *ring*, no resumption, mandatory client
/// certificates) for a mesh service with its own ALPN.
pub struct MeshTls {
    local_id: SpiffeId,
    credentials: LocalCredentials,
    trust: Arc<TrustCore>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshTls")
            .field("local_id", &self.local_id.to_string())
            .finish_non_exhaustive()
    }
}

impl MeshTls {
    /// Checks that the leaf carries a SPIFFE ID and parses the trust bundle and CRLs.
    pub fn new(credentials: LocalCredentials, trust: &MeshTrust) -> Result<Self, ChannelError> {
        let leaf = credentials
            .chain
            .first()
            .ok_or_else(|| ChannelError::Credentials("the certificate chain is empty".into()))?;
        let local_id = spiffe_id_of(leaf)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let trust = Arc::new(TrustCore::new(
            trust,
            provider.signature_verification_algorithms,
        )?);
        let tls = Self {
            local_id,
            credentials,
            trust,
            provider,
        };
        tls.server_config(PeerPolicy::Exact(Vec::new()), b"check")?;
        Ok(tls)
    }

    /// This side's SPIFFE ID.
    pub fn local_id(&self) -> &SpiffeId {
        &self.local_id
    }

    /// A client config that accepts a server allowed by `policy`.
    pub fn client_config(
        &self,
        policy: PeerPolicy,
        alpn: &[u8],
    ) -> Result<Arc<ClientConfig>, ChannelError> {
        let verifier = Arc::new(PolicyServerVerifier {
            trust: self.trust.clone(),
            policy,
        });
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ChannelError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(
                self.credentials.chain.clone(),
                self.credentials.key.clone_key(),
            )
            .map_err(|e| ChannelError::Credentials(e.to_string()))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_sni = false;
        Ok(Arc::new(config))
    }

    /// A server config that accepts clients allowed by `policy`.
    pub fn server_config(
        &self,
        policy: PeerPolicy,
        alpn: &[u8],
    ) -> Result<Arc<ServerConfig>, ChannelError> {
        let verifier = Arc::new(PolicyClientVerifier {
            trust: self.trust.clone(),
            policy,
        });
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ChannelError::Tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                self.credentials.chain.clone(),
                self.credentials.key.clone_key(),
            )
            .map_err(|e| ChannelError::Credentials(e.to_string()))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

/// The SPIFFE ID of a peer whose certificate a verifier of this module accepted (the
/// leaf of `peer_certificates()` after the handshake).
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| spiffe_id_of(leaf).ok())
}

#[derive(Debug)]
struct PolicyServerVerifier {
    trust: Arc<TrustCore>,
    policy: PeerPolicy,
}

impl ServerCertVerifier for PolicyServerVerifier {
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
        self.policy.check(&presented).map_err(Refusal::into_tls)?;
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

#[derive(Debug)]
pub(crate) struct PolicyClientVerifier {
    pub(crate) trust: Arc<TrustCore>,
    pub(crate) policy: PeerPolicy,
}

impl ClientCertVerifier for PolicyClientVerifier {
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
        self.policy.check(&presented).map_err(Refusal::into_tls)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("valid id")
    }

    #[test]
    fn policies_accept_and_refuse_as_named() {
        let td = TrustDomain::new("mesh.test").expect("td");
        let any = PeerPolicy::AnyGateway(td.clone());
        assert!(any
            .check(&id("spiffe://mesh.test/cluster/a/gateway/gw"))
            .is_ok());
        assert!(any
            .check(&id("spiffe://other.test/cluster/a/gateway/gw"))
            .is_err());
        assert!(any.check(&id("spiffe://mesh.test/cluster/a")).is_err());
        let of_b = PeerPolicy::GatewayOfCluster(td, ClusterName::new("b").expect("name"));
        assert!(of_b
            .check(&id("spiffe://mesh.test/cluster/b/gateway/api"))
            .is_ok());
        assert!(matches!(
            of_b.check(&id("spiffe://mesh.test/cluster/a/gateway/api")),
            Err(Refusal::WrongCluster { .. })
        ));
    }
}
