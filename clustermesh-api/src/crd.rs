//! The `IsthmusCluster` custom resource: a cluster's membership in the mesh (its id,
//! pod and service prefixes, and its gateways), as the clustermesh API publishes it.
//!
//! With `[source] kind = "kubernetes"` and no `path`, the API server's Kubernetes source
//! watches the cluster-scoped `IsthmusCluster` named after its own cluster (the cluster of
//! its certificate) and publishes it: the same objects, checked by the same rules, as the
//! `[cluster]` and `[[gateways]]` tables of a cluster file (see [`crate::source::file`]).
//! Gateways of the other clusters learn it through the API's watch stream.
//!
//! The CRD in `deploy/base/crds/` is generated from these types (`isthmusctl crds`); a
//! test fails when the two differ.

use crate::pb::Object;
use crate::source::file::{self, FileError, RawCluster, RawFile, RawGateway};
use isthmus_identity::ClusterName;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A cluster of the mesh: `metadata.name` is the cluster's name.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "isthmus.dev",
    version = "v1alpha1",
    kind = "IsthmusCluster",
    plural = "isthmusclusters",
    shortname = "icluster",
    category = "isthmus",
    printcolumn = r#"{"name":"ID","type":"integer","jsonPath":".spec.id"}"#,
    printcolumn = r#"{"name":"Pods","type":"string","jsonPath":".spec.podPrefixes"}"#,
    doc = "A cluster's membership in the Isthmus mesh (metadata.name is the cluster name): \
           published by the cluster's clustermesh API to every other cluster."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IsthmusClusterSpec {
    /// The cluster id, unique in the mesh (1..=16777215).
    #[schemars(range(min = 1, max = 16_777_215))]
    pub id: u32,
    /// The cluster's pod prefixes (CIDR), routed into tunnels by the other clusters.
    #[serde(default)]
    pub pod_prefixes: Vec<String>,
    /// The cluster's service prefixes (CIDR).
    #[serde(default)]
    pub service_prefixes: Vec<String>,
    /// The cluster's gateways.
    #[serde(default)]
    pub gateways: Vec<ClusterGateway>,
}

/// One gateway of a cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterGateway {
    /// The gateway's name, unique in its cluster.
    pub name: String,
    /// Its identity: `spiffe://<trust domain>/cluster/<cluster>/gateway/<name>`.
    pub spiffe_id: String,
    /// Where its mTLS peer channel listens (`address:port`).
    pub channel_endpoint: String,
    /// Its WireGuard UDP endpoint (`address:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_endpoint: Option<String>,
    /// Its ESP-in-UDP endpoint (`address:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub esp_endpoint: Option<String>,
    /// The tunnel kinds it offers, preferred first: `wireguard`, `esp`.
    #[schemars(length(min = 1))]
    pub kinds: Vec<TunnelKindName>,
    /// ESP cipher (`aes128-gcm` or `aes256-gcm`; default aes256-gcm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub esp_cipher: Option<String>,
    /// ESP extended sequence numbers (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub esn: Option<bool>,
}

/// A tunnel kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TunnelKindName {
    /// Userspace WireGuard.
    Wireguard,
    /// ESP-in-UDP.
    Esp,
}

impl IsthmusClusterSpec {
    /// The objects this resource publishes for `cluster`, checked as a cluster file's are.
    /// Errors name the field as in the resource (`spec.gateways[0].channelEndpoint`).
    pub fn objects(&self, cluster: &ClusterName) -> Result<Vec<Object>, FileError> {
        let raw = RawFile {
            cluster: RawCluster {
                name: cluster.as_str().to_owned(),
                id: self.id,
                pod_prefixes: self.pod_prefixes.clone(),
                service_prefixes: self.service_prefixes.clone(),
            },
            gateways: self
                .gateways
                .iter()
                .map(|g| RawGateway {
                    name: g.name.clone(),
                    spiffe_id: g.spiffe_id.clone(),
                    channel_endpoint: g.channel_endpoint.clone(),
                    wireguard_endpoint: g.wireguard_endpoint.clone(),
                    esp_endpoint: g.esp_endpoint.clone(),
                    kinds: g
                        .kinds
                        .iter()
                        .map(|k| match k {
                            TunnelKindName::Wireguard => "wireguard".to_owned(),
                            TunnelKindName::Esp => "esp".to_owned(),
                        })
                        .collect(),
                    esp_cipher: g.esp_cipher.clone(),
                    esn: g.esn,
                })
                .collect(),
            services: Vec::new(),
            identities: Vec::new(),
        };
        file::build(raw, cluster).map_err(|e| FileError {
            field: spec_field(&e.field),
            message: e.message,
        })
    }
}

/// Maps a cluster-file field path to the resource's (`gateways[0].spiffe_id` →
/// `spec.gateways[0].spiffeId`).
fn spec_field(file_field: &str) -> String {
    let field = file_field.strip_prefix("cluster").unwrap_or(file_field);
    let field = field.strip_prefix('.').unwrap_or(field);
    if field.is_empty() {
        "spec".into()
    } else {
        format!("spec.{}", camel_case(field))
    }
}

/// A config field name as Kubernetes resources spell it: `probe_interval_ms` →
/// `probeIntervalMs`.
pub fn camel_case(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::object::Body;

    fn east() -> ClusterName {
        ClusterName::new("east").expect("cluster name")
    }

    const EXAMPLE: &str = r#"
apiVersion: isthmus.dev/v1alpha1
kind: IsthmusCluster
metadata:
  name: east
spec:
  id: 2
  podPrefixes: ["100.64.2.0/24"]
  servicePrefixes: ["100.65.2.0/24"]
  gateways:
    - name: gw-a
      spiffeId: spiffe://mesh.example/cluster/east/gateway/gw-a
      channelEndpoint: 192.0.2.2:7443
      wireguardEndpoint: 192.0.2.2:51820
      kinds: [wireguard, esp]
"#;

    #[test]
    fn a_resource_publishes_the_cluster_and_its_gateways() {
        let cr: IsthmusCluster = serde_saphyr::from_str(EXAMPLE).expect("parses");
        let objects = cr.spec.objects(&east()).expect("valid");
        assert_eq!(objects.len(), 2);
        match &objects[0].body {
            Some(Body::Cluster(c)) => {
                assert_eq!(c.id, 2);
                assert_eq!(c.pod_prefixes, ["100.64.2.0/24"]);
            }
            other => panic!("first object is {other:?}"),
        }
        match &objects[1].body {
            Some(Body::Gateway(g)) => {
                assert_eq!(g.channel_endpoint, "192.0.2.2:7443");
                assert_eq!(g.kinds.len(), 2);
                assert!(g.esn, "esn defaults to true");
            }
            other => panic!("second object is {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_resource_field() {
        let mut cr: IsthmusCluster = serde_saphyr::from_str(EXAMPLE).expect("parses");
        cr.spec.gateways[0].spiffe_id = "spiffe://mesh.example/cluster/west/gateway/gw-a".into();
        let err = cr
            .spec
            .objects(&east())
            .expect_err("another cluster's identity");
        assert!(err.field.starts_with("spec.gateways[0]"), "{err}");
        cr.spec.gateways.clear();
        cr.spec.id = 0;
        let err = cr.spec.objects(&east()).expect_err("id 0");
        assert!(err.field.starts_with("spec"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = EXAMPLE.replace("  id: 2", "  id: 2\n  podCidrs: [\"10.0.0.0/8\"]");
        let err = serde_saphyr::from_str::<IsthmusCluster>(&text).expect_err("unknown field");
        assert!(err.to_string().contains("podCidrs"), "{err}");
    }

    #[test]
    fn field_paths_map_to_the_resource() {
        assert_eq!(
            spec_field("gateways[1].channel_endpoint"),
            "spec.gateways[1].channelEndpoint"
        );
        assert_eq!(spec_field("cluster"), "spec");
        assert_eq!(spec_field("cluster.pod_prefixes"), "spec.podPrefixes");
    }
}
