//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`), parsed and validated once.
//!
//! The rules follow the SPIFFE ID specification:
//! - the scheme is exactly `spiffe` (lowercase), followed by `://`;
//! - the trust domain is 1–255 characters of lowercase letters, digits, `-`, `.` and `_`
//!   (so no port, no userinfo, no uppercase, no percent-encoding);
//! - the path is empty or a sequence of `/segment`, each segment non-empty, not `.` or
//!   `..`, made of letters, digits, `-`, `.` and `_` (no trailing slash);
//! - no query (`?`) and no fragment (`#`);
//! - the whole ID is at most 2048 bytes.
//!
//! Isthmus gateways use the form `spiffe://<trust-domain>/cluster/<cluster>/gateway/<name>`
//! ([`GatewayId`]); a cluster's intermediate CA carries `spiffe://<trust-domain>/cluster/<cluster>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest SPIFFE ID accepted, in bytes (SPIFFE spec: URIs up to 2048 bytes).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest cluster or gateway name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

const SCHEME: &str = "spiffe://";

/// Why a SPIFFE ID, trust domain or name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The input was empty.
    #[error("empty SPIFFE ID")]
    Empty,
    /// The input is longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is {len} bytes long, the limit is {MAX_SPIFFE_ID_LEN}")]
    TooLong {
        /// Length of the input.
        len: usize,
    },
    /// The input does not start with `spiffe://`.
    #[error("a SPIFFE ID starts with \"spiffe://\" (lowercase)")]
    WrongScheme,
    /// Nothing between `spiffe://` and the path.
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("the trust domain is {len} bytes long, the limit is {MAX_TRUST_DOMAIN_LEN}")]
    TrustDomainTooLong {
        /// Length of the trust domain.
        len: usize,
    },
    /// The trust domain has a port (`:`).
    #[error("a trust domain has no port")]
    Port,
    /// The trust domain has userinfo (`@`).
    #[error("a trust domain has no user info")]
    UserInfo,
    /// A character outside `[a-z0-9._-]` in the trust domain.
    #[error("character {0:?} is not allowed in a trust domain (lowercase letters, digits, '-', '.', '_')")]
    TrustDomainChar(char),
    /// A `?` query.
    #[error("a SPIFFE ID has no query part")]
    Query,
    /// A `#` fragment.
    #[error("a SPIFFE ID has no fragment")]
    Fragment,
    /// Two slashes in a row, or a trailing slash.
    #[error("a path segment is empty (double or trailing '/')")]
    EmptySegment,
    /// A `.` or `..` path segment.
    #[error("path segments '.' and '..' are not allowed")]
    DotSegment,
    /// A character outside `[a-zA-Z0-9._-]` in the path.
    #[error("character {0:?} is not allowed in a SPIFFE ID path (letters, digits, '-', '.', '_')")]
    PathChar(char),
    /// A cluster or gateway name that is not a DNS label.
    #[error("{kind} name {name:?} is not valid: {reason}")]
    BadName {
        /// "cluster" or "gateway".
        kind: &'static str,
        /// The refused name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The ID is valid but not of the gateway form.
    #[error("{0} is not a gateway ID (spiffe://<trust-domain>/cluster/<cluster>/gateway/<name>)")]
    NotAGateway(String),
}

/// A SPIFFE trust domain, e.g. `mesh.example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain name (not a URI: no `spiffe://`).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        if name.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong { len: name.len() });
        }
        for c in name.chars() {
            match c {
                'a'..='z' | '0'..='9' | '-' | '.' | '_' => {}
                ':' => return Err(SpiffeIdError::Port),
                '@' => return Err(SpiffeIdError::UserInfo),
                '?' => return Err(SpiffeIdError::Query),
                '#' => return Err(SpiffeIdError::Fragment),
                other => return Err(SpiffeIdError::TrustDomainChar(other)),
            }
        }
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself (`spiffe://<td>`, empty path).
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.clone(),
            path: String::new(),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID.
///
/// ```
/// use isthmus_identity::SpiffeId;
/// let id: SpiffeId = "spiffe://mesh.example/cluster/eu-1/gateway/gw-a".parse().unwrap();
/// assert_eq!(id.trust_domain().as_str(), "mesh.example");
/// assert_eq!(id.path(), "/cluster/eu-1/gateway/gw-a");
/// assert!("spiffe://mesh.example/a/../b".parse::<SpiffeId>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or `/seg(/seg)*`.
    path: String,
}

impl SpiffeId {
    /// Parses and validates `spiffe://<trust-domain>[/<path>]`.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: input.len() });
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or(SpiffeIdError::WrongScheme)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // Query and fragment are reported as such wherever they appear.
        if authority.contains('?') || path.contains('?') {
            return Err(SpiffeIdError::Query);
        }
        if authority.contains('#') || path.contains('#') {
            return Err(SpiffeIdError::Fragment);
        }
        let trust_domain = TrustDomain::new(authority)?;
        validate_path(path)?;
        Ok(Self {
            trust_domain,
            path: path.to_owned(),
        })
    }

    /// Builds an ID from a trust domain and path segments (each validated).
    pub fn from_segments(
        trust_domain: &TrustDomain,
        segments: &[&str],
    ) -> Result<Self, SpiffeIdError> {
        let mut path = String::new();
        for segment in segments {
            path.push('/');
            path.push_str(segment);
        }
        validate_path(&path)?;
        let id = Self {
            trust_domain: trust_domain.clone(),
            path,
        };
        if id.to_string().len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong {
                len: id.to_string().len(),
            });
        }
        Ok(id)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path: empty, or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path segments, in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path.split('/').skip(1)
    }

    /// The ID of a cluster (carried by its intermediate CA):
    /// `spiffe://<td>/cluster/<cluster>`.
    pub fn cluster(trust_domain: &TrustDomain, cluster: &ClusterName) -> Self {
        Self {
            trust_domain: trust_domain.clone(),
            path: format!("/cluster/{cluster}"),
        }
    }

    /// If this is a cluster ID (`spiffe://<td>/cluster/<cluster>`), the cluster name.
    pub fn as_cluster(&self) -> Option<ClusterName> {
        let mut segments = self.segments();
        match (segments.next(), segments.next(), segments.next()) {
            (Some("cluster"), Some(cluster), None) => ClusterName::new(cluster).ok(),
            _ => None,
        }
    }

    /// If this is a gateway ID, its parts.
    pub fn as_gateway(&self) -> Option<GatewayId> {
        GatewayId::try_from(self).ok()
    }

    /// The ID of an administrator of a cluster (the client certificate of remote
    /// administration): `spiffe://<td>/cluster/<cluster>/admin/<name>`.
    pub fn admin(trust_domain: &TrustDomain, cluster: &ClusterName, name: &GatewayName) -> Self {
        Self {
            trust_domain: trust_domain.clone(),
            path: format!("/cluster/{cluster}/admin/{name}"),
        }
    }

    /// If this is an administrator ID, its cluster and name.
    pub fn as_admin(&self) -> Option<(ClusterName, GatewayName)> {
        let segments: Vec<&str> = self.segments().collect();
        match segments.as_slice() {
            ["cluster", cluster, "admin", name] => Some((
                ClusterName::new(cluster).ok()?,
                GatewayName::new(name).ok()?,
            )),
            _ => None,
        }
    }

    /// The cluster a leaf identity belongs to: a gateway's or an administrator's.
    pub fn member_cluster(&self) -> Option<ClusterName> {
        self.as_gateway()
            .map(|g| g.cluster)
            .or_else(|| self.as_admin().map(|(c, _)| c))
    }
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    // `path` starts with '/', so the first split element is empty.
    for segment in path.split('/').skip(1) {
        if segment.is_empty() {
            return Err(SpiffeIdError::EmptySegment);
        }
        if segment == "." || segment == ".." {
            return Err(SpiffeIdError::DotSegment);
        }
        for c in segment.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '.' | '_' => {}
                '?' => return Err(SpiffeIdError::Query),
                '#' => return Err(SpiffeIdError::Fragment),
                other => return Err(SpiffeIdError::PathChar(other)),
            }
        }
    }
    Ok(())
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_label(kind: &'static str, name: &str) -> Result<(), SpiffeIdError> {
    let bad = |reason| SpiffeIdError::BadName {
        kind,
        name: name.chars().take(80).collect(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("longer than 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("only lowercase letters, digits and '-' are allowed"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(bad("starts or ends with '-'"));
    }
    Ok(())
}

macro_rules! label_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates a DNS-label-like name: 1–63 of `[a-z0-9-]`, not starting or
            /// ending with `-`.
            pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
                validate_label($kind, name)?;
                Ok(Self(name.to_owned()))
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = SpiffeIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
    };
}

label_type!(
    /// A cluster name, e.g. `eu-west-1` (a DNS label).
    ClusterName,
    "cluster"
);
label_type!(
    /// A gateway name within its cluster, e.g. `gw-0` (a DNS label).
    GatewayName,
    "gateway"
);

/// A gateway's identity: `spiffe://<trust-domain>/cluster/<cluster>/gateway/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayId {
    /// The mesh trust domain.
    pub trust_domain: TrustDomain,
    /// The gateway's cluster.
    pub cluster: ClusterName,
    /// The gateway's name within its cluster.
    pub name: GatewayName,
}

impl GatewayId {
    /// Assembles a gateway identity from validated parts.
    pub fn new(trust_domain: TrustDomain, cluster: ClusterName, name: GatewayName) -> Self {
        Self {
            trust_domain,
            cluster,
            name,
        }
    }

    /// The SPIFFE ID.
    pub fn spiffe_id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.trust_domain.clone(),
            path: format!("/cluster/{}/gateway/{}", self.cluster, self.name),
        }
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.spiffe_id().fmt(f)
    }
}

impl TryFrom<&SpiffeId> for GatewayId {
    type Error = SpiffeIdError;
    fn try_from(id: &SpiffeId) -> Result<Self, Self::Error> {
        let not_gateway = || SpiffeIdError::NotAGateway(id.to_string());
        let segments: Vec<&str> = id.segments().collect();
        match segments.as_slice() {
            ["cluster", cluster, "gateway", name] => Ok(Self {
                trust_domain: id.trust_domain.clone(),
                cluster: ClusterName::new(cluster).map_err(|_| not_gateway())?,
                name: GatewayName::new(name).map_err(|_| not_gateway())?,
            }),
            _ => Err(not_gateway()),
        }
    }
}

impl FromStr for GatewayId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(&SpiffeId::parse(s)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_round_trip() {
        for s in [
            "spiffe://example.org",
            "spiffe://example.org/workload",
            "spiffe://mesh_1.example-2.org/cluster/eu-1/gateway/gw-0",
            "spiffe://td/A.b_c-D/x",
            "spiffe://td/.../..a/a..",
            "spiffe://1.2.3.4/x",
        ] {
            let id = SpiffeId::parse(s).unwrap();
            assert_eq!(id.to_string(), s);
            assert_eq!(s.parse::<SpiffeId>().unwrap(), id);
        }
    }

    #[test]
    fn invalid_ids_are_refused_with_the_cause() {
        use SpiffeIdError as E;
        let long_td = format!("spiffe://{}", "a".repeat(256));
        let long_id = format!("spiffe://td/{}", "a".repeat(2040));
        let cases: &[(&str, E)] = &[
            ("", E::Empty),
            ("http://example.org/x", E::WrongScheme),
            ("SPIFFE://example.org/x", E::WrongScheme),
            ("spiffe:/example.org", E::WrongScheme),
            ("example.org/x", E::WrongScheme),
            ("spiffe://", E::EmptyTrustDomain),
            ("spiffe:///path", E::EmptyTrustDomain),
            ("spiffe://Example.org", E::TrustDomainChar('E')),
            ("spiffe://example.org:8080/x", E::Port),
            ("spiffe://user@example.org/x", E::UserInfo),
            ("spiffe://exa%41mple.org", E::TrustDomainChar('%')),
            ("spiffe://exämple.org", E::TrustDomainChar('ä')),
            ("spiffe://example.org/x?y=1", E::Query),
            ("spiffe://example.org?y", E::Query),
            ("spiffe://example.org/x#frag", E::Fragment),
            ("spiffe://example.org/", E::EmptySegment),
            ("spiffe://example.org/a//b", E::EmptySegment),
            ("spiffe://example.org/a/", E::EmptySegment),
            ("spiffe://example.org/.", E::DotSegment),
            ("spiffe://example.org/a/../b", E::DotSegment),
            ("spiffe://example.org/a b", E::PathChar(' ')),
            ("spiffe://example.org/a%20b", E::PathChar('%')),
            ("spiffe://example.org/a\\b", E::PathChar('\\')),
        ];
        for (input, expected) in cases {
            assert_eq!(
                SpiffeId::parse(input).as_ref(),
                Err(expected),
                "input {input:?}"
            );
        }
        assert!(matches!(
            SpiffeId::parse(&long_td),
            Err(E::TrustDomainTooLong { len: 256 })
        ));
        assert!(matches!(SpiffeId::parse(&long_id), Err(E::TooLong { .. })));
    }

    #[test]
    fn gateway_form() {
        let td = TrustDomain::new("mesh.test").unwrap();
        let gw = GatewayId::new(
            td.clone(),
            ClusterName::new("eu-1").unwrap(),
            GatewayName::new("gw-0").unwrap(),
        );
        let id = gw.spiffe_id();
        assert_eq!(
            id.to_string(),
            "spiffe://mesh.test/cluster/eu-1/gateway/gw-0"
        );
        assert_eq!(id.as_gateway(), Some(gw.clone()));
        assert_eq!(id.to_string().parse::<GatewayId>().unwrap(), gw);
        assert_eq!(id.as_cluster(), None);

        let cluster = SpiffeId::cluster(&td, &ClusterName::new("eu-1").unwrap());
        assert_eq!(cluster.to_string(), "spiffe://mesh.test/cluster/eu-1");
        assert_eq!(cluster.as_cluster().unwrap().as_str(), "eu-1");
        assert!(cluster.as_gateway().is_none());

        for not_gw in [
            "spiffe://td/cluster/a/gateway",
            "spiffe://td/cluster/a/gateway/b/c",
            "spiffe://td/cluster/A/gateway/b",
            "spiffe://td/cluster/a/gw/b",
            "spiffe://td/cluster/-a/gateway/b",
            "spiffe://td",
        ] {
            assert!(
                matches!(
                    not_gw.parse::<GatewayId>(),
                    Err(SpiffeIdError::NotAGateway(_))
                ),
                "{not_gw}"
            );
        }
    }

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "eu-west-1", "0", &"a".repeat(63)] {
            assert!(ClusterName::new(ok).is_ok(), "{ok}");
            assert!(GatewayName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a/b",
            &"a".repeat(64),
            "é",
        ] {
            assert!(
                matches!(
                    ClusterName::new(bad),
                    Err(SpiffeIdError::BadName {
                        kind: "cluster",
                        ..
                    })
                ),
                "{bad}"
            );
            assert!(GatewayName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn from_segments_validates() {
        let td = TrustDomain::new("td").unwrap();
        assert_eq!(
            SpiffeId::from_segments(&td, &["a", "b"])
                .unwrap()
                .to_string(),
            "spiffe://td/a/b"
        );
        assert_eq!(SpiffeId::from_segments(&td, &[]).unwrap(), td.id());
        assert_eq!(
            SpiffeId::from_segments(&td, &["a/b"]).unwrap().path(),
            "/a/b"
        );
        assert_eq!(
            SpiffeId::from_segments(&td, &[".."]),
            Err(SpiffeIdError::DotSegment)
        );
        assert_eq!(
            SpiffeId::from_segments(&td, &[""]),
            Err(SpiffeIdError::EmptySegment)
        );
    }

    #[test]
    fn serde_as_string() {
        let id = SpiffeId::parse("spiffe://td/x").unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://td/x\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/../x\"").is_err());
    }
}
