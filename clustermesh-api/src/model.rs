//! Object keys, validation of published objects, and the authorization rule.

use crate::pb::{self, object::Body, Kind, Object, ObjectKey};
use isthmus_identity::{ClusterName, SpiffeId};
use isthmus_tunnel::IpPrefix;
use std::fmt;

/// Why an object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The object belongs to another cluster than the publisher's.
    #[error("{key}: a publisher of cluster {publisher} may not publish cluster {claimed}")]
    ForeignCluster {
        /// The object.
        key: String,
        /// The cluster of the publisher's identity.
        publisher: String,
        /// The cluster the object names.
        claimed: String,
    },
    /// The object is malformed.
    #[error("{key}: {reason}")]
    Malformed {
        /// The object.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// Shows a key as `cluster/kind/namespace/name`.
#[derive(Debug)]
pub struct KeyDisplay<'a>(pub &'a ObjectKey);

impl fmt::Display for KeyDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.0;
        let kind = Kind::try_from(k.kind).map_or("unknown", kind_name);
        if k.namespace.is_empty() {
            write!(f, "{}/{kind}/{}", k.cluster, k.name)
        } else {
            write!(f, "{}/{kind}/{}/{}", k.cluster, k.namespace, k.name)
        }
    }
}

/// Short lowercase name of a kind.
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Unspecified => "unspecified",
        Kind::Cluster => "cluster",
        Kind::Gateway => "gateway",
        Kind::Service => "service",
        Kind::EndpointSlice => "endpointslice",
        Kind::Identity => "identity",
    }
}

/// Builds a key.
pub fn key(cluster: &str, kind: Kind, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        cluster: cluster.to_string(),
        kind: kind as i32,
        namespace: namespace.to_string(),
        name: name.to_string(),
    }
}

/// The kind that matches an object's body, if any.
pub fn body_kind(body: &Body) -> Kind {
    match body {
        Body::Cluster(_) => Kind::Cluster,
        Body::Gateway(_) => Kind::Gateway,
        Body::Service(_) => Kind::Service,
        Body::EndpointSlice(_) => Kind::EndpointSlice,
        Body::Identity(_) => Kind::Identity,
    }
}

/// Parses a list of prefixes, naming the first bad one.
pub fn parse_prefixes(list: &[String]) -> Result<Vec<IpPrefix>, String> {
    list.iter()
        .map(|p| {
            p.parse::<IpPrefix>()
                .map_err(|e| format!("prefix {p:?}: {e}"))
        })
        .collect()
}

/// Checks an object published by a server whose identity is in `publisher` cluster:
/// the key names that cluster, the body matches the key's kind, and the body is well
/// formed (prefixes parse, a gateway's SPIFFE ID is a gateway of that cluster, endpoints
/// parse). The same check runs on the server (before storing) and on every client
/// (before applying): a compromised or misconfigured server cannot make a client accept
/// another cluster's objects.
pub fn check_object(publisher: &ClusterName, obj: &Object) -> Result<(), Invalid> {
    let Some(key) = obj.key.as_ref() else {
        return Err(Invalid::Malformed {
            key: "?".into(),
            reason: "no key".into(),
        });
    };
    let shown = KeyDisplay(key).to_string();
    let bad = |reason: String| Invalid::Malformed {
        key: shown.clone(),
        reason,
    };
    if key.cluster != publisher.as_str() {
        return Err(Invalid::ForeignCluster {
            key: shown.clone(),
            publisher: publisher.to_string(),
            claimed: key.cluster.clone(),
        });
    }
    check_key(key).map_err(bad)?;
    if obj.uid.is_empty() {
        return Err(bad("empty uid".into()));
    }
    let Some(body) = obj.body.as_ref() else {
        return Err(bad("no body".into()));
    };
    if body_kind(body) as i32 != key.kind {
        return Err(bad("the body does not match the key's kind".into()));
    }
    match body {
        Body::Cluster(c) => {
            if key.name != key.cluster {
                return Err(bad("a cluster object is named after its cluster".into()));
            }
            if c.id == 0 || c.id > isthmus_identity::ClusterId::MAX {
                return Err(bad(format!("cluster id {} out of range", c.id)));
            }
            parse_prefixes(&c.pod_prefixes).map_err(|e| bad(format!("pod_prefixes: {e}")))?;
            parse_prefixes(&c.service_prefixes)
                .map_err(|e| bad(format!("service_prefixes: {e}")))?;
        }
        Body::Gateway(g) => {
            let id = SpiffeId::parse(&g.spiffe_id).map_err(|e| bad(format!("spiffe_id: {e}")))?;
            let gw = id
                .as_gateway()
                .ok_or_else(|| bad(format!("spiffe_id {id} is not a gateway identity")))?;
            if gw.cluster != *publisher {
                return Err(Invalid::ForeignCluster {
                    key: shown.clone(),
                    publisher: publisher.to_string(),
                    claimed: gw.cluster.to_string(),
                });
            }
            parse_endpoint(&g.channel_endpoint)
                .map_err(|e| bad(format!("channel_endpoint: {e}")))?;
            for (field, v) in [
                ("wireguard_endpoint", &g.wireguard_endpoint),
                ("esp_endpoint", &g.esp_endpoint),
            ] {
                if !v.is_empty() {
                    parse_endpoint(v).map_err(|e| bad(format!("{field}: {e}")))?;
                }
            }
            if g.kinds.is_empty() {
                return Err(bad(
                    "kinds: a gateway offers at least one tunnel kind".into()
                ));
            }
            for k in &g.kinds {
                match pb::TunnelKind::try_from(*k) {
                    Ok(pb::TunnelKind::Wireguard | pb::TunnelKind::Esp) => {}
                    _ => return Err(bad(format!("kinds: unknown tunnel kind {k}"))),
                }
            }
            if !g.esp_cipher.is_empty()
                && !matches!(g.esp_cipher.as_str(), "aes128-gcm" | "aes256-gcm")
            {
                return Err(bad(format!(
                    "esp_cipher: unknown cipher {:?}",
                    g.esp_cipher
                )));
            }
        }
        Body::Service(s) => {
            check_ports(&s.ports).map_err(bad)?;
            for ip in &s.cluster_ips {
                ip.parse::<std::net::IpAddr>()
                    .map_err(|_| bad(format!("cluster_ips: {ip:?} is not an IP address")))?;
            }
        }
        Body::EndpointSlice(s) => {
            if s.service.is_empty() {
                return Err(bad("service: empty".into()));
            }
            let v6 = match s.address_type.as_str() {
                "IPv4" => false,
                "IPv6" => true,
                other => return Err(bad(format!("address_type: {other:?}"))),
            };
            check_ports(&s.ports).map_err(bad)?;
            for e in &s.endpoints {
                for a in &e.addresses {
                    let ip: std::net::IpAddr = a
                        .parse()
                        .map_err(|_| bad(format!("endpoint address {a:?} is not an IP")))?;
                    if ip.is_ipv6() != v6 {
                        return Err(bad(format!(
                            "endpoint address {a} does not match address_type {}",
                            s.address_type
                        )));
                    }
                }
            }
        }
        Body::Identity(i) => {
            let parsed = isthmus_identity::SecurityIdentity::from_u64(i.id)
                .map_err(|e| bad(format!("id: {e}")))?;
            if key.name != i.id.to_string() {
                return Err(bad("an identity object is named by its decimal id".into()));
            }
            let _ = parsed;
        }
    }
    Ok(())
}

fn check_key(key: &ObjectKey) -> Result<(), String> {
    let kind = Kind::try_from(key.kind).map_err(|_| format!("unknown kind {}", key.kind))?;
    if kind == Kind::Unspecified {
        return Err("kind unspecified".into());
    }
    if key.name.is_empty() {
        return Err("empty name".into());
    }
    for (what, v) in [("namespace", &key.namespace), ("name", &key.name)] {
        if v.len() > 253 || v.contains('/') || v.chars().any(|c| c.is_control()) {
            return Err(format!("{what} {v:?} is not a valid name"));
        }
    }
    let namespaced = matches!(kind, Kind::Service | Kind::EndpointSlice);
    if namespaced == key.namespace.is_empty() {
        return Err(if namespaced {
            "a namespaced kind needs a namespace".into()
        } else {
            "this kind has no namespace".into()
        });
    }
    Ok(())
}

fn check_ports(ports: &[pb::ServicePort]) -> Result<(), String> {
    for p in ports {
        if p.port == 0 || p.port > 65535 {
            return Err(format!("port {} out of range", p.port));
        }
        if !matches!(p.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            return Err(format!("port {}: protocol {:?}", p.port, p.protocol));
        }
    }
    Ok(())
}

/// Parses `host:port` where host is an IP address.
pub fn parse_endpoint(text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an IP address and port"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster_obj(cluster: &str, id: u32, pods: &[&str]) -> Object {
        Object {
            key: Some(key(cluster, Kind::Cluster, "", cluster)),
            uid: "u1".into(),
            revision: 0,
            body: Some(Body::Cluster(pb::ClusterSpec {
                id,
                pod_prefixes: pods.iter().map(|s| s.to_string()).collect(),
                service_prefixes: vec![],
            })),
        }
    }

    #[test]
    fn a_publisher_may_publish_only_its_own_cluster() {
        let a = ClusterName::new("a").expect("name");
        assert_eq!(
            check_object(&a, &cluster_obj("a", 1, &["10.1.0.0/16"])),
            Ok(())
        );
        assert!(matches!(
            check_object(&a, &cluster_obj("b", 2, &["10.2.0.0/16"])),
            Err(Invalid::ForeignCluster { .. })
        ));
        let gw = Object {
            key: Some(key("a", Kind::Gateway, "", "gw")),
            uid: "u".into(),
            revision: 0,
            body: Some(Body::Gateway(pb::Gateway {
                spiffe_id: "spiffe://m.test/cluster/b/gateway/gw".into(),
                channel_endpoint: "192.0.2.1:7443".into(),
                kinds: vec![pb::TunnelKind::Wireguard as i32],
                ..Default::default()
            })),
        };
        assert!(matches!(
            check_object(&a, &gw),
            Err(Invalid::ForeignCluster { claimed, .. }) if claimed == "b"
        ));
    }

    #[test]
    fn malformed_objects_are_named() {
        let a = ClusterName::new("a").expect("name");
        let err = check_object(&a, &cluster_obj("a", 1, &["10.1.0.0/33"])).expect_err("bad");
        assert!(err.to_string().contains("pod_prefixes"), "{err}");
        let err = check_object(&a, &cluster_obj("a", 0, &[])).expect_err("bad id");
        assert!(err.to_string().contains("cluster id"), "{err}");
        let mut svc = Object {
            key: Some(key("a", Kind::Service, "", "web")),
            uid: "u".into(),
            revision: 0,
            body: Some(Body::Service(pb::Service::default())),
        };
        assert!(check_object(&a, &svc).is_err(), "service without namespace");
        svc.key = Some(key("a", Kind::Service, "default", "web"));
        assert_eq!(check_object(&a, &svc), Ok(()));
        svc.body = Some(Body::Identity(pb::Identity::default()));
        assert!(check_object(&a, &svc).is_err(), "body/kind mismatch");
    }
}
