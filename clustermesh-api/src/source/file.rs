//! A cluster's state from a TOML file, reloaded when it changes.
//!
//! ```toml
//! [cluster]
//! name = "c"                        # must be the cluster of the server's certificate
//! id = 3                            # 1..=16777215
//! pod_prefixes = ["100.64.3.0/24"]
//! service_prefixes = ["100.65.3.0/24"]
//!
//! [[gateways]]
//! name = "gw"
//! spiffe_id = "spiffe://mesh.example/cluster/c/gateway/gw"
//! channel_endpoint = "192.0.2.3:7443"
//! kinds = ["wireguard"]             # or ["esp"], preferred first
//! # wireguard_endpoint, esp_endpoint, esp_cipher = "aes256-gcm", esn = true
//!
//! [[services]]
//! namespace = "default"
//! name = "web"
//! global = true                     # exported to the other clusters
//! shared = true                     # this cluster's endpoints serve them
//! affinity = "none"                 # local | remote | none
//! ports = [{ name = "http", port = 80, protocol = "TCP" }]
//! endpoints = [{ addresses = ["100.64.3.2"], ready = true }]
//!
//! [[identities]]
//! id = 12884901889                  # (cluster id << 32) | local id
//! labels = { app = "web" }
//! ```
//!
//! A file that does not parse at start is a config error; a bad edit later is logged and
//! the last good state keeps serving.

use crate::model::{check_object, key};
use crate::pb::{self, object::Body, Kind, Object};
use crate::source::Publisher;
use isthmus_identity::ClusterName;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a cluster file was refused: the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FileError {
    /// The offending field (`services[1].ports[0].port`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl FileError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    pub(crate) cluster: RawCluster,
    #[serde(default)]
    pub(crate) gateways: Vec<RawGateway>,
    #[serde(default)]
    pub(crate) services: Vec<RawService>,
    #[serde(default)]
    pub(crate) identities: Vec<RawIdentity>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub(crate) name: String,
    pub(crate) id: u32,
    #[serde(default)]
    pub(crate) pod_prefixes: Vec<String>,
    #[serde(default)]
    pub(crate) service_prefixes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGateway {
    pub(crate) name: String,
    pub(crate) spiffe_id: String,
    pub(crate) channel_endpoint: String,
    #[serde(default)]
    pub(crate) wireguard_endpoint: Option<String>,
    #[serde(default)]
    pub(crate) esp_endpoint: Option<String>,
    pub(crate) kinds: Vec<String>,
    #[serde(default)]
    pub(crate) esp_cipher: Option<String>,
    #[serde(default)]
    pub(crate) esn: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPort {
    #[serde(default)]
    name: String,
    port: u32,
    #[serde(default = "tcp")]
    protocol: String,
}

fn tcp() -> String {
    "TCP".into()
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEndpoint {
    addresses: Vec<String>,
    #[serde(default = "yes")]
    ready: bool,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: bool,
    #[serde(default)]
    node_name: String,
    #[serde(default)]
    zone: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    namespace: String,
    name: String,
    #[serde(default)]
    global: bool,
    #[serde(default = "yes")]
    shared: bool,
    #[serde(default)]
    affinity: Option<String>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    cluster_ips: Vec<String>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentity {
    id: u64,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

fn uid(kind: &str, ns: &str, name: &str) -> String {
    format!("file:{kind}:{ns}:{name}")
}

fn ports(raw: Vec<RawPort>) -> Vec<pb::ServicePort> {
    raw.into_iter()
        .map(|p| pb::ServicePort {
            name: p.name,
            port: p.port,
            protocol: p.protocol,
        })
        .collect()
}

/// Parses a cluster file into objects of `cluster`, checking each one as the server will.
pub fn parse(text: &str, cluster: &ClusterName) -> Result<Vec<Object>, FileError> {
    let de = toml::Deserializer::new(text);
    let raw: RawFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        FileError::new(
            if path == "." { "file".into() } else { path },
            inner.message().to_string(),
        )
    })?;
    build(raw, cluster)
}

/// Turns a parsed cluster file (or an `IsthmusCluster` resource converted into one) into
/// objects of `cluster`, checking each one as the server will.
pub(crate) fn build(raw: RawFile, cluster: &ClusterName) -> Result<Vec<Object>, FileError> {
    if raw.cluster.name != cluster.as_str() {
        return Err(FileError::new(
            "cluster.name",
            format!(
                "{:?} is not the server's cluster {cluster:?} (from its certificate)",
                raw.cluster.name
            ),
        ));
    }
    let c = cluster.as_str();
    let mut out = Vec::new();
    let mut push = |field: String, obj: Object| -> Result<(), FileError> {
        check_object(cluster, &obj).map_err(|e| FileError::new(field, e.to_string()))?;
        if out.iter().any(|o: &Object| o.key == obj.key) {
            return Err(FileError::new(
                "",
                "an object with this key is defined twice".to_string(),
            ));
        }
        out.push(obj);
        Ok(())
    };
    push(
        "cluster".into(),
        Object {
            key: Some(key(c, Kind::Cluster, "", c)),
            uid: uid("cluster", "", c),
            revision: 0,
            body: Some(Body::Cluster(pb::ClusterSpec {
                id: raw.cluster.id,
                pod_prefixes: raw.cluster.pod_prefixes,
                service_prefixes: raw.cluster.service_prefixes,
            })),
        },
    )?;
    for (i, g) in raw.gateways.into_iter().enumerate() {
        let field = format!("gateways[{i}]");
        let mut kinds = Vec::new();
        for (j, k) in g.kinds.iter().enumerate() {
            kinds.push(match k.as_str() {
                "wireguard" => pb::TunnelKind::Wireguard as i32,
                "esp" => pb::TunnelKind::Esp as i32,
                other => {
                    return Err(FileError::new(
                        format!("{field}.kinds[{j}]"),
                        format!("unknown tunnel kind {other:?} (wireguard or esp)"),
                    ))
                }
            });
        }
        push(
            field,
            Object {
                key: Some(key(c, Kind::Gateway, "", &g.name)),
                uid: uid("gateway", "", &g.name),
                revision: 0,
                body: Some(Body::Gateway(pb::Gateway {
                    spiffe_id: g.spiffe_id,
                    channel_endpoint: g.channel_endpoint,
                    wireguard_endpoint: g.wireguard_endpoint.unwrap_or_default(),
                    esp_endpoint: g.esp_endpoint.unwrap_or_default(),
                    kinds,
                    esp_cipher: g.esp_cipher.unwrap_or_default(),
                    esn: g.esn.unwrap_or(true),
                })),
            },
        )?;
    }
    for (i, s) in raw.services.into_iter().enumerate() {
        let field = format!("services[{i}]");
        let affinity = match s.affinity.as_deref() {
            None | Some("none") => pb::Affinity::None,
            Some("local") => pb::Affinity::Local,
            Some("remote") => pb::Affinity::Remote,
            Some(other) => {
                return Err(FileError::new(
                    format!("{field}.affinity"),
                    format!("{other:?} is not local, remote or none"),
                ))
            }
        };
        let port_list = ports(s.ports);
        let v6 = s
            .endpoints
            .iter()
            .flat_map(|e| e.addresses.first())
            .next()
            .is_some_and(|a| a.contains(':'));
        let endpoints: Vec<pb::Endpoint> = s
            .endpoints
            .into_iter()
            .map(|e| pb::Endpoint {
                addresses: e.addresses,
                ready: e.ready,
                serving: e.serving.unwrap_or(e.ready),
                terminating: e.terminating,
                node_name: e.node_name,
                zone: e.zone,
            })
            .collect();
        push(
            field.clone(),
            Object {
                key: Some(key(c, Kind::Service, &s.namespace, &s.name)),
                uid: uid("service", &s.namespace, &s.name),
                revision: 0,
                body: Some(Body::Service(pb::Service {
                    ports: port_list.clone(),
                    global: s.global,
                    shared: s.shared,
                    affinity: affinity as i32,
                    cluster_ips: s.cluster_ips,
                })),
            },
        )?;
        if !endpoints.is_empty() {
            let slice = format!("{}-file", s.name);
            push(
                format!("{field}.endpoints"),
                Object {
                    key: Some(key(c, Kind::EndpointSlice, &s.namespace, &slice)),
                    uid: uid("endpointslice", &s.namespace, &slice),
                    revision: 0,
                    body: Some(Body::EndpointSlice(pb::EndpointSlice {
                        service: s.name.clone(),
                        address_type: if v6 { "IPv6" } else { "IPv4" }.into(),
                        endpoints,
                        ports: port_list,
                    })),
                },
            )?;
        }
    }
    for (i, id) in raw.identities.into_iter().enumerate() {
        let name = id.id.to_string();
        push(
            format!("identities[{i}]"),
            Object {
                key: Some(key(c, Kind::Identity, "", &name)),
                uid: uid("identity", "", &name),
                revision: 0,
                body: Some(Body::Identity(pb::Identity {
                    id: id.id,
                    labels: id.labels.into_iter().collect(),
                })),
            },
        )?;
    }
    Ok(out)
}

/// Reads and parses a cluster file.
pub fn load(path: &Path, cluster: &ClusterName) -> Result<Vec<Object>, FileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| FileError::new("source.path", format!("{}: {e}", path.display())))?;
    parse(&text, cluster)
}

fn fingerprint(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    let text = std::fs::read(path).ok()?;
    let meta = std::fs::metadata(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(&text, &mut h);
    Some((
        meta.modified().ok()?,
        meta.len(),
        std::hash::Hasher::finish(&h),
    ))
}

/// Publishes `initial` (already loaded), then polls `path` every `interval` and publishes
/// each good new version. Never returns.
pub async fn run(publisher: Publisher, path: PathBuf, initial: Vec<Object>, interval: Duration) {
    let cluster = publisher.lock().cluster().clone();
    let mut seen = fingerprint(&path);
    publisher.replace_all(initial, 0);
    publisher.mark_synced(0);
    loop {
        tokio::time::sleep(interval).await;
        let now = fingerprint(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match load(&path, &cluster) {
            Ok(objects) => {
                let n = objects.len();
                publisher.replace_all(objects, 0);
                tracing::info!(path = %path.display(), objects = n, "cluster file reloaded");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cluster file not reloaded; the last good state keeps serving");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "c"
id = 3
pod_prefixes = ["100.64.3.0/24"]

[[gateways]]
name = "gw"
spiffe_id = "spiffe://m.test/cluster/c/gateway/gw"
channel_endpoint = "192.0.2.3:7443"
kinds = ["wireguard"]

[[services]]
namespace = "default"
name = "web"
global = true
ports = [{ name = "http", port = 80 }]
endpoints = [{ addresses = ["100.64.3.2"] }]
"#;

    fn c() -> ClusterName {
        ClusterName::new("c").expect("name")
    }

    #[test]
    fn a_cluster_file_becomes_checked_objects() {
        let objs = parse(GOOD, &c()).expect("parses");
        let kinds: Vec<i32> = objs
            .iter()
            .filter_map(|o| o.key.as_ref())
            .map(|k| k.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                Kind::Cluster as i32,
                Kind::Gateway as i32,
                Kind::Service as i32,
                Kind::EndpointSlice as i32
            ]
        );
        let Some(Body::EndpointSlice(s)) = &objs[3].body else {
            panic!("slice")
        };
        assert_eq!(s.service, "web");
        assert!(s.endpoints[0].ready && s.endpoints[0].serving);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (GOOD.replace("name = \"c\"", "name = \"b\""), "cluster.name"),
            (GOOD.replace("id = 3", "id = 0"), "cluster"),
            (
                GOOD.replace("\"wireguard\"", "\"gre\""),
                "gateways[0].kinds[0]",
            ),
            (GOOD.replace("port = 80", "port = 70000"), "services[0]"),
            (
                GOOD.replace("global = true", "global = true\ncolour = 1"),
                "services[0]",
            ),
            (
                GOOD.replace("cluster/c/gateway", "cluster/b/gateway"),
                "gateways[0]",
            ),
        ];
        for (text, field) in cases {
            let err = parse(&text, &c()).expect_err(field);
            assert!(
                err.field.starts_with(field),
                "expected field {field}, got {err}"
            );
        }
    }
}
