//! Isthmus identities and the mTLS peer channel that binds tunnel keys to them.
//!
//! - [`spiffe`]: typed SPIFFE IDs ([`SpiffeId`], [`TrustDomain`]) and the gateway form
//!   `spiffe://<trust-domain>/cluster/<cluster>/gateway/<name>` ([`GatewayId`]).
//! - [`security_identity`]: numeric security identities, a 24-bit cluster id and a
//!   32-bit cluster-local id packed in a `u64` ([`SecurityIdentity`]).
//! - [`svid`]: reading the SPIFFE ID out of a certificate.
//! - [`channel`]: the gateway-to-gateway session (rustls, TLS 1.3 over TCP, *ring*
//!   provider) that verifies both peers' certificates and exact SPIFFE IDs, exchanges
//!   [`TunnelParams`] and the link's [`LinkParams`] (refusing a mismatch), derives ESP keys
//!   from the TLS exporter, and carries liveness probes and rekey messages. Its I/O runs as
//!   tasks on one small tokio runtime (tokio-rustls), so a gateway holds a thousand
//!   channels on two threads; its API stays blocking and std.
//!
//! It does not issue or store certificates and keys (that is `isthmus-certs`), configure
//! tunnels (it hands [`Established`] events to the gateway), or carry tunnel traffic.

#![forbid(unsafe_code)]

pub mod channel;
pub mod security_identity;
pub mod spiffe;
pub mod svid;

pub use channel::{
    peer_id, should_dial, ChainVerifier, ChannelConfig, ChannelError, ChannelEvent,
    ChannelListener, ChannelTiming, ControlMessage, EspCipher, EspKeyBlock, Established,
    LinkParams, ListenerHandle, ListenerLimits, ListenerStats, LocalCredentials, LossReason,
    MeshTls, MeshTrust, PeerChannel, PeerEndpoint, PeerLink, PeerPolicy, PeerSession, Refusal,
    Role, TunnelParams, WireguardKeys,
};
pub use security_identity::{ClusterId, LocalId, SecurityIdentity, SecurityIdentityError};
pub use spiffe::{ClusterName, GatewayId, GatewayName, SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::{spiffe_id_of, SvidError};
