//! The gateway's custom resources, and the rendering of every Isthmus CRD.
//!
//! - `IsthmusEgressPolicy` (namespaced): one egress policy, the same fields and rules as
//!   a `[[egress]]` table. The gateway reads such resources from the file named by
//!   `egress_policies` in its config (YAML, `---` between resources): in Kubernetes the
//!   overlay mounts them from a ConfigMap (see `deploy/`), and the same file can be
//!   `kubectl apply`-ed so that the API server validates it against the CRD.
//! - `IsthmusGateway` (namespaced): a gateway and its readiness. Its status is
//!   [`GatewayReadiness`], what `isthmusctl ready --output json` prints and what the
//!   readiness probe decides on.
//! - `IsthmusCluster` is defined by the clustermesh API (`isthmus_clustermesh_api::crd`).
//!
//! [`rendered`] produces the CRD YAML that `deploy/base/crds/` holds; a test fails when
//! they differ (`isthmusctl crds --write deploy/base/crds` regenerates them).

use crate::admin::Status;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Isthmus resource.
pub const GROUP: &str = "isthmus.dev";
/// `apiVersion` of every Isthmus resource.
pub const API_VERSION: &str = "isthmus.dev/v1alpha1";

/// An egress policy: which workloads reach which firewalled endpoints through which
/// egress gateways. `metadata.name` is the policy's name.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "isthmus.dev",
    version = "v1alpha1",
    kind = "IsthmusEgressPolicy",
    plural = "isthmusegresspolicies",
    shortname = "iegress",
    category = "isthmus",
    namespaced,
    printcolumn = r#"{"name":"Destinations","type":"string","jsonPath":".spec.destinations"}"#,
    doc = "An egress policy: traffic from the sources to the destinations leaves through \
           the first healthy egress gateway (the same rules as a gateway's [[egress]] table)."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IsthmusEgressPolicySpec {
    /// The selected workloads' prefixes (CIDR).
    #[schemars(length(min = 1))]
    pub sources: Vec<String>,
    /// The firewalled endpoints' prefixes (CIDR), outside the mesh.
    #[schemars(length(min = 1))]
    pub destinations: Vec<String>,
    /// The egress gateways, most preferred first.
    #[schemars(length(min = 1))]
    pub gateways: Vec<EgressGatewaySelector>,
    /// Interval of the health probes in milliseconds (50..=1000, default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 50, max = 1000))]
    pub probe_interval_ms: Option<u64>,
    /// Missed probes before a gateway counts as down (2..=10, default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 10))]
    pub probe_multiplier: Option<u32>,
    /// Source address of the probes (default: the interface's first address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_source: Option<String>,
}

/// One egress gateway of a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressGatewaySelector {
    /// The name of a WireGuard peer of this gateway (`[[peers]] name`).
    pub peer: String,
    /// The address the egress gateway answers health probes on (inside that peer's
    /// allowed prefixes).
    pub probe: String,
}

/// A gateway (`metadata.name`: the gateway's name) and, as its status, its readiness.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "isthmus.dev",
    version = "v1alpha1",
    kind = "IsthmusGateway",
    plural = "isthmusgateways",
    shortname = "igw",
    category = "isthmus",
    namespaced,
    status = "GatewayReadiness",
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason"}"#,
    doc = "An Isthmus gateway; its status is the readiness that `isthmusctl ready` reports."
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IsthmusGatewaySpec {
    /// The cluster the gateway belongs to.
    pub cluster: String,
    /// The gateway's tunnel device.
    pub interface: String,
}

/// Whether a gateway is ready, and why not: decided from its status by [`readiness`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReadiness {
    /// True when everything that depends on this gateway alone is up (the rule:
    /// `isthmusctl ready --help`).
    pub ready: bool,
    /// One sentence: what is not up (or "all N channels up ...").
    pub reason: String,
    /// The peer channels (mTLS) and their tunnels.
    pub channels: Vec<ChannelReadiness>,
    /// The remote clusters (clustermesh API).
    pub clusters: Vec<ClusterReadiness>,
    /// Static WireGuard/ESP peers: not required for readiness (a static peer without
    /// traffic has no session), listed with their last handshake.
    pub peers: Vec<PeerReadiness>,
    /// This gateway's state as an egress gateway (`healthy`, `draining`, `uplink-down`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_gateway: Option<String>,
}

/// One peer channel in [`GatewayReadiness`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelReadiness {
    /// The peer's SPIFFE ID.
    pub spiffe_id: String,
    /// `up`, `connecting` or `down`.
    pub state: String,
    /// Whether the tunnel to this peer is keyed.
    pub tunnel: bool,
}

/// One remote cluster in [`GatewayReadiness`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterReadiness {
    /// The cluster's name.
    pub name: String,
    /// `connecting`, `connected`, `stale` or `withdrawn`.
    pub state: String,
}

/// One static peer in [`GatewayReadiness`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerReadiness {
    /// The peer's name (or its public key).
    pub name: String,
    /// `wireguard` or `esp`.
    pub kind: String,
    /// Seconds since its last handshake, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handshake_secs_ago: Option<f64>,
}

/// Decides readiness from a gateway's status.
///
/// Ready means the gateway carries traffic for everything that depends on it alone:
/// - when remote clusters are configured, at least one is `connected` now (`stale` means
///   this gateway's own stream to that API broke, which may be this gateway's fault);
/// - every mTLS channel is `up` with its tunnel keyed — except, while some remote
///   cluster is `connected`, a channel learnt from the clustermesh API of a remote
///   cluster that is itself not `connected` (an outage of that one cluster is not this
///   gateway's fault, and making every gateway unready for it would stall rollouts
///   everywhere); configured channels always count;
/// - as an egress gateway, its uplink answers and it is not drained.
///
/// Static WireGuard/ESP peers do not count (WireGuard has no session without traffic).
/// What does not count is still listed, and named in the reason of a ready gateway.
pub fn readiness(status: &Status) -> GatewayReadiness {
    let channels: Vec<ChannelReadiness> = status
        .channels
        .iter()
        .map(|c| ChannelReadiness {
            spiffe_id: c.spiffe_id.clone(),
            state: c.state.clone(),
            tunnel: c.tunnel,
        })
        .collect();
    let clusters: Vec<ClusterReadiness> = status
        .clusters
        .iter()
        .map(|c| ClusterReadiness {
            name: c.name.clone(),
            state: c.state.clone(),
        })
        .collect();
    let peers = status
        .peers
        .iter()
        .map(|p| PeerReadiness {
            name: p
                .name
                .clone()
                .or_else(|| p.public_key.clone())
                .unwrap_or_default(),
            kind: p.kind.clone(),
            last_handshake_secs_ago: p.last_handshake_secs_ago,
        })
        .collect();
    let egress_gateway = status.egress_gateway.as_ref().map(|g| g.state.clone());

    // The cluster of a learnt channel's peer, when that cluster is not connected.
    let cluster_down = |c: &crate::mesh::ChannelStatus| -> Option<String> {
        if !c.from_mesh {
            return None;
        }
        let peer = isthmus_identity::SpiffeId::parse(&c.spiffe_id)
            .ok()?
            .as_gateway()?;
        let name = peer.cluster.as_str();
        let state = clusters.iter().find(|k| k.name == name)?;
        (state.state != "connected").then(|| format!("{name} ({})", state.state))
    };
    let any_connected = clusters.iter().any(|c| c.state == "connected");
    let mut problems: Vec<String> = Vec::new();
    let mut excused: Vec<String> = Vec::new();
    for (c, status) in channels.iter().zip(&status.channels) {
        let problem = if c.state != "up" {
            format!("channel to {} is {}", c.spiffe_id, c.state)
        } else if !c.tunnel {
            format!(
                "channel to {} is up but its tunnel has no keys yet",
                c.spiffe_id
            )
        } else {
            continue;
        };
        match cluster_down(status).filter(|_| any_connected) {
            Some(cluster) if !excused.contains(&cluster) => excused.push(cluster),
            Some(_) => {}
            None => problems.push(problem),
        }
    }
    if !clusters.is_empty() && !any_connected {
        problems.insert(
            0,
            format!(
                "no remote cluster's clustermesh API is connected ({})",
                clusters
                    .iter()
                    .map(|c| format!("{}: {}", c.name, c.state))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    if let Some(state) = &egress_gateway {
        if state != "healthy" {
            problems.push(format!("this egress gateway is {state}"));
        }
    }
    let ready = problems.is_empty();
    let reason = match problems.len() {
        0 if excused.is_empty() => format!(
            "all {} channels up with keyed tunnels, {} clusters heard from",
            channels.len(),
            clusters.len()
        ),
        0 => format!(
            "ready; not counted: channels to clusters that are down themselves: {}",
            excused.join(", ")
        ),
        1 => problems.remove(0),
        n => format!("{} (and {} more)", problems.remove(0), n - 1),
    };
    GatewayReadiness {
        ready,
        reason,
        channels,
        clusters,
        peers,
        egress_gateway,
    }
}

/// Why a file of `IsthmusEgressPolicy` resources was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ResourceError {
    /// The document (`[2]`) or resource (`web-db`) and field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Parses a YAML stream of `IsthmusEgressPolicy` resources (documents separated by
/// `---`; empty documents are skipped). Every document must be one: apiVersion
/// `isthmus.dev/v1alpha1`, kind `IsthmusEgressPolicy`, a name, and a spec without
/// unknown fields.
pub fn parse_egress_policies(text: &str) -> Result<Vec<IsthmusEgressPolicy>, ResourceError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ResourceError {
            field: "yaml".into(),
            message: e.to_string().lines().next().unwrap_or("invalid").into(),
        })?;
    let mut out: Vec<IsthmusEgressPolicy> = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let at = |f: &str| format!("[{i}].{f}");
        let text_of = |f: &str| doc.get(f).and_then(|v| v.as_str()).unwrap_or_default();
        if text_of("apiVersion") != API_VERSION {
            return Err(ResourceError {
                field: at("apiVersion"),
                message: format!("{:?}: must be {API_VERSION}", text_of("apiVersion")),
            });
        }
        if text_of("kind") != "IsthmusEgressPolicy" {
            return Err(ResourceError {
                field: at("kind"),
                message: format!("{:?}: must be IsthmusEgressPolicy", text_of("kind")),
            });
        }
        let policy: IsthmusEgressPolicy =
            serde_path_to_error::deserialize(doc).map_err(|e| ResourceError {
                field: at(&e.path().to_string()),
                message: e.into_inner().to_string(),
            })?;
        let name = policy.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(ResourceError {
                field: at("metadata.name"),
                message: "required".into(),
            });
        }
        if out
            .iter()
            .any(|o| o.metadata.name.as_deref() == Some(&name))
        {
            return Err(ResourceError {
                field: at("metadata.name"),
                message: format!("{name:?} is defined twice"),
            });
        }
        out.push(policy);
    }
    Ok(out)
}

/// Every Isthmus CRD as `(file name, YAML)`, sorted by file name: the content of
/// `deploy/base/crds/`.
pub fn rendered() -> Result<Vec<(String, String)>, serde_saphyr::ser::Error> {
    let crds = [
        isthmus_clustermesh_api::crd::IsthmusCluster::crd(),
        IsthmusEgressPolicy::crd(),
        IsthmusGateway::crd(),
    ];
    let mut out = Vec::new();
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let yaml = serde_saphyr::to_string(crd)?;
        out.push((
            format!("{name}.yaml"),
            format!("# Generated from the Rust types by `isthmusctl crds`: do not edit.\n{yaml}"),
        ));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_crd_renders_with_a_structural_schema() {
        let all = rendered().expect("renders");
        let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "isthmusclusters.isthmus.dev.yaml",
                "isthmusegresspolicies.isthmus.dev.yaml",
                "isthmusgateways.isthmus.dev.yaml"
            ]
        );
        for (name, yaml) in &all {
            assert!(yaml.contains("openAPIV3Schema"), "{name}");
            assert!(yaml.contains("kind: CustomResourceDefinition"), "{name}");
        }
    }

    fn status(channels: serde_json::Value, clusters: serde_json::Value) -> Status {
        serde_json::from_value(serde_json::json!({
            "interface": "ist0", "public_key": "k", "listen_port": 51820, "mtu": 1420,
            "offload": false,
            "drops": {"no_route": 0, "malformed": 0, "unknown_peer": 0},
            "peers": [],
            "channels": channels,
            "clusters": clusters,
        }))
        .expect("a status document")
    }

    fn channel(id: &str, state: &str, tunnel: bool) -> serde_json::Value {
        serde_json::json!({
            "spiffe_id": id, "name": null, "kind": "wireguard",
            "channel_endpoint": "192.0.2.1:7443", "state": state, "tunnel": tunnel,
            "role": "dialer", "up_secs": 1.0, "sessions": 1, "last_refusal": null
        })
    }

    fn learnt(id: &str, state: &str) -> serde_json::Value {
        let mut c = channel(id, state, state == "up");
        c["from_mesh"] = true.into();
        c
    }

    fn cluster(name: &str, state: &str) -> serde_json::Value {
        serde_json::json!({"name": name, "state": state, "revision": 3,
                           "state_secs": 1.0, "gateways": 1, "refusals": 0})
    }

    #[test]
    fn ready_only_when_every_channel_and_cluster_is_up() {
        let a = "spiffe://m/cluster/west/gateway/a";
        let up = status(
            serde_json::json!([channel(a, "up", true)]),
            serde_json::json!([cluster("west", "connected"), cluster("north", "stale")]),
        );
        let r = readiness(&up);
        assert!(r.ready, "{}", r.reason);
        assert_eq!(r.channels.len(), 1);

        let connecting = status(
            serde_json::json!([channel(a, "connecting", false)]),
            serde_json::json!([cluster("west", "connected")]),
        );
        let r = readiness(&connecting);
        assert!(!r.ready);
        assert_eq!(r.reason, format!("channel to {a} is connecting"));

        let unkeyed = status(
            serde_json::json!([channel(a, "up", false)]),
            serde_json::json!([]),
        );
        assert!(
            readiness(&unkeyed).reason.contains("no keys"),
            "tunnel not keyed"
        );

        let api_down = status(
            serde_json::json!([channel(a, "down", true)]),
            serde_json::json!([cluster("west", "connecting")]),
        );
        let r = readiness(&api_down);
        assert!(!r.ready);
        assert!(r.reason.ends_with("(and 1 more)"), "{}", r.reason);

        // A learnt channel to a cluster that is down itself does not count; one to a
        // connected cluster does.
        let w = "spiffe://m/cluster/west/gateway/gw";
        let n = "spiffe://m/cluster/north/gateway/gw";
        let remote_outage = status(
            serde_json::json!([learnt(w, "connecting"), learnt(n, "up")]),
            serde_json::json!([cluster("west", "stale"), cluster("north", "connected")]),
        );
        let r = readiness(&remote_outage);
        assert!(r.ready, "{}", r.reason);
        assert!(r.reason.contains("west (stale)"), "{}", r.reason);
        let path_broken = status(
            serde_json::json!([learnt(w, "connecting")]),
            serde_json::json!([cluster("west", "connected")]),
        );
        assert!(!readiness(&path_broken).ready);
        let nothing_heard = status(
            serde_json::json!([]),
            serde_json::json!([cluster("west", "connecting"), cluster("north", "withdrawn")]),
        );
        let r = readiness(&nothing_heard);
        assert!(
            !r.ready && r.reason.contains("no remote cluster"),
            "{}",
            r.reason
        );
        // This gateway's own path broken: every stream stale, every channel lost.
        let own_path_broken = status(
            serde_json::json!([learnt(w, "down"), learnt(n, "connecting")]),
            serde_json::json!([cluster("west", "stale"), cluster("north", "stale")]),
        );
        let r = readiness(&own_path_broken);
        assert!(!r.ready, "stale everywhere is not an excuse: {}", r.reason);

        let mut egress = status(serde_json::json!([]), serde_json::json!([]));
        egress.egress_gateway = Some(crate::egress::EgressGatewayStatus {
            state: "uplink-down".into(),
            uplink: "eth0".into(),
            egress_ip: "198.51.100.9".into(),
            uplink_ok: false,
        });
        let r = readiness(&egress);
        assert!(!r.ready && r.reason.contains("uplink-down"), "{}", r.reason);
    }

    const POLICIES: &str = r#"
apiVersion: isthmus.dev/v1alpha1
kind: IsthmusEgressPolicy
metadata:
  name: to-db
  namespace: isthmus-system
spec:
  sources: ["100.64.1.0/24"]
  destinations: ["198.51.100.0/24"]
  gateways:
    - peer: egress-a
      probe: 100.127.0.1
  probeIntervalMs: 100
---
apiVersion: isthmus.dev/v1alpha1
kind: IsthmusEgressPolicy
metadata:
  name: to-api
spec:
  sources: ["100.64.1.0/24"]
  destinations: ["203.0.113.0/24"]
  gateways: [{peer: egress-b, probe: 100.127.0.2}]
"#;

    #[test]
    fn a_stream_of_policies_parses() {
        let p = parse_egress_policies(POLICIES).expect("valid");
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].spec.probe_interval_ms, Some(100));
        assert_eq!(p[1].spec.gateways[0].peer, "egress-b");
    }

    #[test]
    fn bad_documents_name_the_document_and_field() {
        let e = parse_egress_policies(&POLICIES.replace("probeIntervalMs", "probeInterval"))
            .expect_err("unknown field");
        assert!(e.field.starts_with("[0].spec"), "{e}");
        let e = parse_egress_policies(&POLICIES.replace(
            "kind: IsthmusEgressPolicy\nmetadata:\n  name: to-api",
            "kind: ConfigMap\nmetadata:\n  name: to-api",
        ))
        .expect_err("wrong kind");
        assert_eq!(e.field, "[1].kind", "{e}");
        let e = parse_egress_policies(&POLICIES.replace("name: to-api", "name: to-db"))
            .expect_err("twice");
        assert_eq!(e.field, "[1].metadata.name", "{e}");
        let e = parse_egress_policies(&POLICIES.replace("v1alpha1", "v1")).expect_err("version");
        assert_eq!(e.field, "[0].apiVersion", "{e}");
    }
}
