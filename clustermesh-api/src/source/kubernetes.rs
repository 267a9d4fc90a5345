//! The Kubernetes source: publishes this cluster's global services and their endpoint
//! slices, read from the cluster's own API server.
//!
//! Two parts:
//! - [`translate`] (sans-IO): Services, discovery/v1 EndpointSlices and MCS ServiceExports
//!   in, protocol objects and typed [`Skipped`] reasons out. It decides everything and is
//!   tested on recorded `kubectl get -o json` fixtures (`fixtures/kubernetes/`).
//! - [`run`]: the thin driver that watches the three kinds (and, when the server's config
//!   names no cluster file, the cluster's `IsthmusCluster` resource, translated by
//!   [`translate_membership`]) with kube's reflectors and hands every new translation to
//!   the [`Publisher`].
//!
//! # Which services are published
//! A Service is published (as a global service) when either
//! - a `ServiceExport` (`multicluster.x-k8s.io/v1alpha1`, the Multi-Cluster Services API)
//!   with the same namespace and name exists — the MCS way: export without touching the
//!   Service; or
//! - the Service carries the annotation `service.isthmus.dev/global: "true"` — the
//!   annotation way, for clusters without the MCS CRDs (in the spirit of Cilium's global
//!   services).
//!
//! Annotations on a published Service:
//! - `service.isthmus.dev/shared`: `"true"` (default) or `"false"`: whether this
//!   cluster's endpoints serve other clusters, or the service is only imported here;
//! - `service.isthmus.dev/affinity`: `local`, `remote` or `none` (default): which
//!   cluster's endpoints a client prefers.
//!
//! A value these annotations do not allow skips the Service (and its slices) with a
//! [`SkipReason`]; nothing here panics on what the API server sends. An `ExternalName`
//! Service has no endpoints to reach through a tunnel and is skipped too. A headless
//! Service is published with no cluster IPs.
//!
//! EndpointSlices are published only for published Services (by their
//! `kubernetes.io/service-name` label), `IPv4` and `IPv6` slices only (`FQDN` slices are
//! skipped: a gateway routes to addresses, not names).
//!
//! # What this source does not do
//! It publishes services and endpoints; the cluster object and gateways come from a file
//! or the cluster's `IsthmusCluster` resource (see [`run`]), identities from neither. It
//! never writes to the Kubernetes API (no ServiceExport status conditions), and it does
//! not define the ServiceExport CRD: it consumes the one the MCS API installs.

use crate::crd::IsthmusCluster;
use crate::model::{self, Invalid};
use crate::pb::{self, object::Body, Kind};
use crate::source::Publisher;
use isthmus_identity::ClusterName;
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Annotation that makes a Service global without a ServiceExport (value `"true"`).
pub const ANNOTATION_GLOBAL: &str = "service.isthmus.dev/global";
/// Annotation: whether this cluster's endpoints serve other clusters (default `"true"`).
pub const ANNOTATION_SHARED: &str = "service.isthmus.dev/shared";
/// Annotation: `local`, `remote` or `none` (default).
pub const ANNOTATION_AFFINITY: &str = "service.isthmus.dev/affinity";
/// The label that names an EndpointSlice's Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// An MCS `ServiceExport` (`multicluster.x-k8s.io/v1alpha1`), reduced to what this
/// source reads: its existence, namespace and name. Spec and status are ignored.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct ServiceExport {
    /// Namespace and name are those of the exported Service.
    #[serde(default)]
    pub metadata: ObjectMeta,
}

impl kube::Resource for ServiceExport {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "ServiceExport".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "multicluster.x-k8s.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "serviceexports".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The kind of a Kubernetes object that was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SourceKind {
    /// `v1` Service.
    Service,
    /// `discovery.k8s.io/v1` EndpointSlice.
    EndpointSlice,
    /// `multicluster.x-k8s.io/v1alpha1` ServiceExport.
    ServiceExport,
    /// `isthmus.dev/v1alpha1` IsthmusCluster (the cluster's membership).
    IsthmusCluster,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Service => "Service",
            SourceKind::EndpointSlice => "EndpointSlice",
            SourceKind::ServiceExport => "ServiceExport",
            SourceKind::IsthmusCluster => "IsthmusCluster",
        })
    }
}

/// Why a Kubernetes object that would otherwise be published was not.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    /// `metadata.name` or `metadata.namespace` is missing.
    #[error("metadata.name or metadata.namespace is missing")]
    NoName,
    /// `metadata.uid` is missing: deletes could not tell versions apart.
    #[error("metadata.uid is missing")]
    NoUid,
    /// An Isthmus annotation has a value it does not allow.
    #[error("annotation {annotation}: {value:?} is not one of {allowed}")]
    BadAnnotation {
        /// The annotation.
        annotation: &'static str,
        /// Its value.
        value: String,
        /// The values it allows.
        allowed: &'static str,
    },
    /// An `ExternalName` Service is a DNS alias with no endpoints to route to.
    #[error("an ExternalName service has no endpoints to publish")]
    ExternalName,
    /// A port that cannot be published (number out of range, no number, or an unknown
    /// protocol).
    #[error("port: {0}")]
    BadPort(String),
    /// A cluster IP that is not an IP address.
    #[error("cluster IP {0:?} is not an IP address")]
    BadClusterIp(String),
    /// A ServiceExport names a Service that does not exist (yet).
    #[error("no Service of this namespace and name exists")]
    NoSuchService,
    /// An EndpointSlice of `FQDN` addresses: only IP endpoints are published.
    #[error("addressType FQDN is not published (only IPv4 and IPv6)")]
    FqdnSlice,
    /// An EndpointSlice with an address type other than IPv4, IPv6 or FQDN.
    #[error("unknown addressType {0:?}")]
    UnknownAddressType(String),
    /// An EndpointSlice without the `kubernetes.io/service-name` label.
    #[error("no {LABEL_SERVICE_NAME} label")]
    NoServiceLabel,
    /// An endpoint address that is not an IP of the slice's address type.
    #[error("endpoint address {address:?} is not an {address_type} address")]
    BadEndpointAddress {
        /// The address.
        address: String,
        /// The slice's address type.
        address_type: String,
    },
    /// The translated object failed the model's check (a bug here, or an input this
    /// translation did not foresee).
    #[error("refused by the model check: {0}")]
    Refused(Invalid),
}

/// A Kubernetes object left out of the translation, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its kind.
    pub kind: SourceKind,
    /// Its namespace (empty when missing).
    pub namespace: String,
    /// Its name (empty when missing).
    pub name: String,
    /// Why it was skipped.
    pub reason: SkipReason,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}: {}",
            self.kind, self.namespace, self.name, self.reason
        )
    }
}

/// The result of one translation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Translation {
    /// Services, then EndpointSlices, each in namespace/name order; every one passes
    /// [`model::check_object`] for the cluster.
    pub objects: Vec<pb::Object>,
    /// What was left out and why: Services (input order), ServiceExports without a
    /// Service (namespace/name order), then EndpointSlices (input order).
    pub skipped: Vec<Skipped>,
}

/// Translates one cluster's Services, EndpointSlices and ServiceExports into the
/// protocol objects this cluster publishes (see the module doc for the rules).
///
/// Deterministic: the same input gives the same output, whatever its order.
pub fn translate<'a>(
    cluster: &ClusterName,
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    exports: impl IntoIterator<Item = &'a ServiceExport>,
) -> Translation {
    let mut skipped = Vec::new();
    let exported: BTreeSet<(&str, &str)> = exports
        .into_iter()
        .filter_map(|e| {
            Some((
                e.metadata.namespace.as_deref()?,
                e.metadata.name.as_deref()?,
            ))
        })
        .collect();

    let mut found: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut published: BTreeMap<(String, String), pb::Object> = BTreeMap::new();
    for svc in services {
        let meta = &svc.metadata;
        let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref())
        else {
            skipped.push(skip(SourceKind::Service, meta, SkipReason::NoName));
            continue;
        };
        found.insert((namespace, name));
        let by_export = exported.contains(&(namespace, name));
        match service_body(svc, by_export) {
            Ok(None) => {}
            Ok(Some(body)) => match meta.uid.as_deref().filter(|u| !u.is_empty()) {
                None => skipped.push(skip(SourceKind::Service, meta, SkipReason::NoUid)),
                Some(uid) => {
                    let obj = object(cluster, Kind::Service, namespace, name, uid, body);
                    // Checked here, before the slices: a refused service publishes none.
                    match model::check_object(cluster, &obj) {
                        Ok(()) => {
                            published.insert((namespace.to_string(), name.to_string()), obj);
                        }
                        Err(e) => {
                            skipped.push(skip(SourceKind::Service, meta, SkipReason::Refused(e)))
                        }
                    }
                }
            },
            Err(reason) => skipped.push(skip(SourceKind::Service, meta, reason)),
        }
    }
    for (namespace, name) in exported.difference(&found) {
        skipped.push(Skipped {
            kind: SourceKind::ServiceExport,
            namespace: namespace.to_string(),
            name: name.to_string(),
            reason: SkipReason::NoSuchService,
        });
    }

    let mut slice_objects: BTreeMap<(String, String), pb::Object> = BTreeMap::new();
    for slice in slices {
        let meta = &slice.metadata;
        let (Some(namespace), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref())
        else {
            skipped.push(skip(SourceKind::EndpointSlice, meta, SkipReason::NoName));
            continue;
        };
        let Some(service) = meta.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_NAME)) else {
            skipped.push(skip(
                SourceKind::EndpointSlice,
                meta,
                SkipReason::NoServiceLabel,
            ));
            continue;
        };
        // Slices of services that are not published are not published, silently: most
        // of a cluster's services are not global, and none of them is a mistake.
        if !published.contains_key(&(namespace.to_string(), service.clone())) {
            continue;
        }
        let result = slice_body(slice, service).and_then(|body| {
            let uid = meta
                .uid
                .as_deref()
                .filter(|u| !u.is_empty())
                .ok_or(SkipReason::NoUid)?;
            Ok(object(
                cluster,
                Kind::EndpointSlice,
                namespace,
                name,
                uid,
                body,
            ))
        });
        let checked = result.and_then(|obj| {
            model::check_object(cluster, &obj).map_err(SkipReason::Refused)?;
            Ok(obj)
        });
        match checked {
            Ok(obj) => {
                slice_objects.insert((namespace.to_string(), name.to_string()), obj);
            }
            Err(reason) => skipped.push(skip(SourceKind::EndpointSlice, meta, reason)),
        }
    }

    let objects = published
        .into_values()
        .chain(slice_objects.into_values())
        .collect();
    Translation { objects, skipped }
}

fn skip(kind: SourceKind, meta: &ObjectMeta, reason: SkipReason) -> Skipped {
    Skipped {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        reason,
    }
}

fn object(
    cluster: &ClusterName,
    kind: Kind,
    namespace: &str,
    name: &str,
    uid: &str,
    body: Body,
) -> pb::Object {
    pb::Object {
        key: Some(model::key(cluster.as_str(), kind, namespace, name)),
        uid: uid.to_string(),
        revision: 0,
        body: Some(body),
    }
}

/// Reads a boolean annotation: absent gives `default`, otherwise "true" or "false".
fn bool_annotation(
    annotations: Option<&BTreeMap<String, String>>,
    annotation: &'static str,
    default: bool,
) -> Result<bool, SkipReason> {
    match annotations
        .and_then(|a| a.get(annotation))
        .map(String::as_str)
    {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(SkipReason::BadAnnotation {
            annotation,
            value: other.to_string(),
            allowed: "\"true\", \"false\"",
        }),
    }
}

/// The Service body when the Service is published, `None` when it is not.
fn service_body(svc: &Service, exported: bool) -> Result<Option<Body>, SkipReason> {
    let annotations = svc.metadata.annotations.as_ref();
    let global = bool_annotation(annotations, ANNOTATION_GLOBAL, false)?;
    if !(exported || global) {
        return Ok(None);
    }
    let shared = bool_annotation(annotations, ANNOTATION_SHARED, true)?;
    let affinity = match annotations
        .and_then(|a| a.get(ANNOTATION_AFFINITY))
        .map(String::as_str)
    {
        None | Some("none") => pb::Affinity::None,
        Some("local") => pb::Affinity::Local,
        Some("remote") => pb::Affinity::Remote,
        Some(other) => {
            return Err(SkipReason::BadAnnotation {
                annotation: ANNOTATION_AFFINITY,
                value: other.to_string(),
                allowed: "local, remote, none",
            })
        }
    };
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        return Err(SkipReason::ExternalName);
    }
    let ports = spec
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default()
        .iter()
        .map(service_port)
        .collect::<Result<Vec<_>, _>>()?;
    // clusterIPs holds every family's IP (clusterIP is its first entry); objects
    // written before dual-stack may only have clusterIP.
    let ips: Vec<&String> = match spec {
        Some(s) => match s.cluster_ips.as_deref() {
            Some(list) if !list.is_empty() => list.iter().collect(),
            _ => s.cluster_ip.iter().collect(),
        },
        None => Vec::new(),
    };
    let mut cluster_ips = Vec::new();
    for ip in ips {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let parsed: IpAddr = ip
            .parse()
            .map_err(|_| SkipReason::BadClusterIp(ip.clone()))?;
        cluster_ips.push(parsed.to_string());
    }
    Ok(Some(Body::Service(pb::Service {
        ports,
        global: true,
        shared,
        affinity: affinity as i32,
        cluster_ips,
    })))
}

fn port(
    name: Option<&str>,
    number: Option<i32>,
    protocol: Option<&str>,
) -> Result<pb::ServicePort, SkipReason> {
    let shown = name.unwrap_or("(unnamed)");
    let number = number.ok_or_else(|| {
        SkipReason::BadPort(format!(
            "{shown}: no port number (all ports) cannot be published"
        ))
    })?;
    let port = u16::try_from(number)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| SkipReason::BadPort(format!("{shown}: {number} is out of range")))?;
    let protocol = match protocol.unwrap_or("TCP") {
        p @ ("TCP" | "UDP" | "SCTP") => p.to_string(),
        other => {
            return Err(SkipReason::BadPort(format!(
                "{shown}: unknown protocol {other:?}"
            )))
        }
    };
    Ok(pb::ServicePort {
        name: name.unwrap_or_default().to_string(),
        port: u32::from(port),
        protocol,
    })
}

fn service_port(p: &ServicePort) -> Result<pb::ServicePort, SkipReason> {
    port(p.name.as_deref(), Some(p.port), p.protocol.as_deref())
}

fn slice_port(p: &EndpointPort) -> Result<pb::ServicePort, SkipReason> {
    port(p.name.as_deref(), p.port, p.protocol.as_deref())
}

fn slice_body(slice: &EndpointSlice, service: &str) -> Result<Body, SkipReason> {
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        "FQDN" => return Err(SkipReason::FqdnSlice),
        other => return Err(SkipReason::UnknownAddressType(other.to_string())),
    };
    let ports = slice
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(slice_port)
        .collect::<Result<Vec<_>, _>>()?;
    let endpoints = slice
        .endpoints
        .iter()
        .map(|e| endpoint(e, v6, &slice.address_type))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Body::EndpointSlice(pb::EndpointSlice {
        service: service.to_string(),
        address_type: slice.address_type.clone(),
        endpoints,
        ports,
    }))
}

/// One endpoint. Conditions, per the EndpointSlice API: `ready` unset means ready;
/// `serving` unset defers to `ready` (the rule since `serving` was introduced: a
/// producer that predates it sets only `ready`, and an endpoint it marked not ready
/// must not count as serving); `terminating` unset means not terminating.
fn endpoint(e: &Endpoint, v6: bool, address_type: &str) -> Result<pb::Endpoint, SkipReason> {
    let addresses = e
        .addresses
        .iter()
        .map(|a| match a.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv6() == v6 => Ok(ip.to_string()),
            _ => Err(SkipReason::BadEndpointAddress {
                address: a.clone(),
                address_type: address_type.to_string(),
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let conditions = e.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    Ok(pb::Endpoint {
        addresses,
        ready,
        serving,
        terminating,
        node_name: e.node_name.clone().unwrap_or_default(),
        zone: e.zone.clone().unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------------------
// The live source.

/// Where and how to reach the cluster's Kubernetes API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSourceConfig {
    /// A kubeconfig file; `None` infers the configuration the way kubectl and kube do
    /// (`$KUBECONFIG`, `~/.kube/config`, then the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context; `None` for its current context.
    pub context: Option<String>,
    /// Whether to watch MCS ServiceExports. Turn it off in a cluster without the
    /// `multicluster.x-k8s.io` CRDs: only the global annotation publishes services then.
    /// With it on and the CRD missing, the source logs the error, retries, and never
    /// reports itself synced.
    pub service_exports: bool,
    /// How long to gather further changes before translating again (a rollout changes
    /// many slices at once).
    pub debounce: Duration,
}

impl Default for KubernetesSourceConfig {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            context: None,
            service_exports: true,
            debounce: Duration::from_millis(200),
        }
    }
}

/// Why the cluster's `IsthmusCluster` resource was not published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// No `IsthmusCluster` named after the cluster exists.
    #[error("no IsthmusCluster named {0:?}: the cluster and its gateways are not published")]
    Missing(String),
    /// The resource breaks a rule a cluster file would break too.
    #[error("IsthmusCluster {name:?}: {error}")]
    Invalid {
        /// The resource's name.
        name: String,
        /// The field and what is wrong.
        error: crate::source::file::FileError,
    },
}

/// The cluster object and gateways from the `IsthmusCluster` resource named after
/// `cluster` (sans-IO; resources of other names are ignored: a cluster publishes only
/// itself).
pub fn translate_membership<'a>(
    cluster: &ClusterName,
    resources: impl IntoIterator<Item = &'a IsthmusCluster>,
) -> Result<Vec<pb::Object>, MembershipError> {
    let own = resources
        .into_iter()
        .find(|r| r.metadata.name.as_deref() == Some(cluster.as_str()))
        .ok_or_else(|| MembershipError::Missing(cluster.as_str().to_owned()))?;
    own.spec
        .objects(cluster)
        .map_err(|error| MembershipError::Invalid {
            name: cluster.as_str().to_owned(),
            error,
        })
}

/// The membership a source publishes (sans-IO): the last good translation of the
/// cluster's `IsthmusCluster`. Until a first good one is seen, nothing is published and
/// the source does not report itself synced: a server that starts while the resource is
/// missing or invalid must not tell every gateway that the cluster has no gateways.
#[derive(Debug, Default)]
struct MembershipState {
    last_good: Option<Vec<pb::Object>>,
    error: Option<MembershipError>,
}

/// What one translation changed, for the log.
#[derive(Debug, PartialEq, Eq)]
enum MembershipChange {
    /// Usable (as before, or for the first time).
    Usable,
    /// Usable again after an error.
    Recovered,
    /// A new error (the last good membership, if any, stays).
    Failed,
    /// The same error as last time.
    StillFailing,
}

impl MembershipState {
    fn observe(&mut self, result: Result<Vec<pb::Object>, MembershipError>) -> MembershipChange {
        match result {
            Ok(objects) => {
                self.last_good = Some(objects);
                if self.error.take().is_some() {
                    MembershipChange::Recovered
                } else {
                    MembershipChange::Usable
                }
            }
            Err(e) if self.error.as_ref() == Some(&e) => MembershipChange::StillFailing,
            Err(e) => {
                self.error = Some(e);
                MembershipChange::Failed
            }
        }
    }

    /// The objects to publish; `None`: hold (no good membership yet).
    fn objects(&self) -> Option<&Vec<pb::Object>> {
        self.last_good.as_ref()
    }
}

/// Why the Kubernetes source stopped.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum KubernetesSourceError {
    /// No usable configuration was found (no kubeconfig, not in a cluster).
    #[error("kubernetes configuration: {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The kubeconfig file or context is unusable.
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// The client could not be built from the configuration (TLS, proxy, auth).
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
    /// The watch streams ended; kube's watchers retry errors themselves, so this is
    /// not expected while the process runs.
    #[error("the kubernetes watches ended")]
    WatchesEnded,
}

/// What one watcher event means for the translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchStep {
    /// A (re)listing is in progress: the reflector's store does not show it yet.
    Listing,
    /// A listing completed: the store now shows it.
    Listed,
    /// An object was applied or deleted after the listing.
    Changed,
}

/// When to translate (sans-IO): only once every watched kind has been listed, and then
/// after any event that changed what a reflector store shows. Watch errors change
/// nothing (the reflector keeps its last complete view while kube retries).
#[derive(Debug)]
struct SyncProgress {
    unlisted: BTreeSet<SourceKind>,
    dirty: bool,
}

impl SyncProgress {
    fn new(kinds: impl IntoIterator<Item = SourceKind>) -> Self {
        Self {
            unlisted: kinds.into_iter().collect(),
            dirty: false,
        }
    }

    fn observe<E: fmt::Display>(&mut self, kind: SourceKind, step: Result<WatchStep, E>) {
        match step {
            Ok(WatchStep::Listing) => {}
            Ok(WatchStep::Listed) => {
                if self.unlisted.remove(&kind) {
                    tracing::debug!(%kind, "initial listing complete");
                }
                self.dirty = true;
            }
            Ok(WatchStep::Changed) => self.dirty = true,
            Err(e) => tracing::warn!(%kind, error = %e, "kubernetes watch error (retrying)"),
        }
    }

    fn should_translate(&self) -> bool {
        self.dirty && self.unlisted.is_empty()
    }

    fn translated(&mut self) {
        self.dirty = false;
    }
}

async fn connect(config: &KubernetesSourceConfig) -> Result<kube::Client, KubernetesSourceError> {
    use kube::config::{Config, KubeConfigOptions, Kubeconfig};
    let options = KubeConfigOptions {
        context: config.context.clone(),
        ..KubeConfigOptions::default()
    };
    let kube_config = match (&config.kubeconfig, &config.context) {
        (Some(path), _) => {
            Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, &options).await?
        }
        (None, Some(_)) => Config::from_kubeconfig(&options).await?,
        (None, None) => Config::infer().await?,
    };
    Ok(kube::Client::try_from(kube_config)?)
}

/// Runs the Kubernetes source: watches Services, EndpointSlices and (unless turned off)
/// ServiceExports in all namespaces — and, without `static_objects`, the cluster's own
/// `IsthmusCluster` — and after every change (debounced) publishes the membership
/// (`static_objects`, or the last good [`translate_membership`]) followed by the
/// [`translate`]d objects with [`Publisher::replace_all`]. Marks the publisher synced once
/// every watched kind has been listed and a good membership exists; until then it
/// publishes nothing. Skip reasons are logged when they first appear.
///
/// Not tested here: no Kubernetes API server runs on the build machines. It is kept to
/// wiring (kube's reflectors, which retry with backoff and relist after a desync); every
/// decision is in [`translate`], [`translate_membership`] and `MembershipState`, which
/// are tested.
pub async fn run(
    publisher: Publisher,
    config: KubernetesSourceConfig,
    static_objects: Option<Vec<pb::Object>>,
) -> Result<(), KubernetesSourceError> {
    use futures_util::stream::{self, BoxStream, StreamExt};
    use kube::runtime::{reflector, watcher, WatchStreamExt};
    use kube::Api;

    let client = connect(&config).await?;
    let cluster = publisher.lock().cluster().clone();

    /// One kind's reflector, its events reduced to what [`SyncProgress`] needs.
    fn watch<K>(
        kind: SourceKind,
        api: Api<K>,
        writer: reflector::store::Writer<K>,
        config: watcher::Config,
    ) -> BoxStream<'static, (SourceKind, Result<WatchStep, watcher::Error>)>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        reflector(writer, watcher(api, config))
            .default_backoff()
            .map(move |event| {
                let step = event.map(|e| match e {
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => WatchStep::Changed,
                    watcher::Event::InitDone => WatchStep::Listed,
                    watcher::Event::Init | watcher::Event::InitApply(_) => WatchStep::Listing,
                });
                (kind, step)
            })
            .boxed()
    }

    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let (exports, exports_writer) = reflector::store::<ServiceExport>();
    let mut streams = vec![
        watch(
            SourceKind::Service,
            Api::all(client.clone()),
            services_writer,
            watcher::Config::default(),
        ),
        watch(
            SourceKind::EndpointSlice,
            Api::all(client.clone()),
            slices_writer,
            watcher::Config::default(),
        ),
    ];
    let mut kinds = vec![SourceKind::Service, SourceKind::EndpointSlice];
    if config.service_exports {
        streams.push(watch(
            SourceKind::ServiceExport,
            Api::all(client.clone()),
            exports_writer,
            watcher::Config::default(),
        ));
        kinds.push(SourceKind::ServiceExport);
    }
    let (memberships, memberships_writer) = reflector::store::<IsthmusCluster>();
    if static_objects.is_none() {
        streams.push(watch(
            SourceKind::IsthmusCluster,
            Api::all(client),
            memberships_writer,
            // Only our own resource: another cluster's (which we never publish) cannot
            // break the listing, e.g. with a field a newer CRD added.
            watcher::Config::default().fields(&format!("metadata.name={}", cluster.as_str())),
        ));
        kinds.push(SourceKind::IsthmusCluster);
    }
    // The last good membership is kept while the resource is missing or invalid.
    let mut membership = MembershipState::default();
    if let Some(objects) = &static_objects {
        membership.observe(Ok(objects.clone()));
    }
    let mut events = stream::select_all(streams);
    let mut progress = SyncProgress::new(kinds);
    let mut synced = false;
    let mut reported: Vec<Skipped> = Vec::new();
    loop {
        let (kind, item) = events
            .next()
            .await
            .ok_or(KubernetesSourceError::WatchesEnded)?;
        progress.observe(kind, item);
        if !progress.should_translate() {
            continue;
        }
        let deadline = tokio::time::Instant::now() + config.debounce;
        while let Ok(next) = tokio::time::timeout_at(deadline, events.next()).await {
            let (kind, item) = next.ok_or(KubernetesSourceError::WatchesEnded)?;
            progress.observe(kind, item);
        }
        progress.translated();

        let (service_list, slice_list) = (services.state(), slices.state());
        let export_list = exports.state();
        let translation = translate(
            &cluster,
            service_list.iter().map(|s| s.as_ref()),
            slice_list.iter().map(|s| s.as_ref()),
            export_list.iter().map(|e| e.as_ref()),
        );
        for s in &translation.skipped {
            if !reported.contains(s) {
                tracing::warn!(skipped = %s, "kubernetes object not published");
            }
        }
        reported = translation.skipped;
        let published = translation.objects.len();
        if static_objects.is_none() {
            let resources = memberships.state();
            let result = translate_membership(&cluster, resources.iter().map(|r| r.as_ref()));
            let error = result.as_ref().err().map(ToString::to_string);
            match membership.observe(result) {
                MembershipChange::Recovered => tracing::info!("IsthmusCluster usable again"),
                MembershipChange::Failed => tracing::warn!(
                    error = error.as_deref().unwrap_or_default(),
                    "IsthmusCluster not published (the last good one, if any, is kept)"
                ),
                MembershipChange::Usable | MembershipChange::StillFailing => {}
            }
        }
        let Some(own) = membership.objects() else {
            // Never had a good membership: publish nothing, stay unsynced.
            continue;
        };
        let mut all = own.clone();
        all.extend(translation.objects);
        let refused = publisher.replace_all(all, 0);
        tracing::debug!(
            published,
            refused = refused.len(),
            "kubernetes state published"
        );
        if !synced {
            publisher.mark_synced(0);
            synced = true;
            tracing::info!(published, "kubernetes source synced");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::api::discovery::v1::EndpointConditions;

    fn cluster() -> ClusterName {
        ClusterName::new("east").expect("cluster name")
    }

    fn membership(name: &str, id: u32) -> IsthmusCluster {
        let mut r = IsthmusCluster::new(
            name,
            crate::crd::IsthmusClusterSpec {
                id,
                pod_prefixes: vec!["100.64.2.0/24".into()],
                service_prefixes: vec![],
                gateways: vec![crate::crd::ClusterGateway {
                    name: "gw".into(),
                    spiffe_id: format!("spiffe://mesh.example/cluster/{name}/gateway/gw"),
                    channel_endpoint: "192.0.2.2:7443".into(),
                    wireguard_endpoint: Some("192.0.2.2:51820".into()),
                    esp_endpoint: None,
                    kinds: vec![crate::crd::TunnelKindName::Wireguard],
                    esp_cipher: None,
                    esn: None,
                }],
            },
        );
        r.metadata.uid = Some(format!("u-{name}"));
        r
    }

    #[test]
    fn no_membership_is_published_before_a_good_one_and_the_last_good_one_stays() {
        let mut state = MembershipState::default();
        let missing = || Err(MembershipError::Missing("east".into()));
        assert_eq!(state.observe(missing()), MembershipChange::Failed);
        assert_eq!(state.objects(), None, "a fresh server holds");
        assert_eq!(state.observe(missing()), MembershipChange::StillFailing);
        let good = translate_membership(&cluster(), [&membership("east", 2)]).expect("good");
        assert_eq!(state.observe(Ok(good.clone())), MembershipChange::Recovered);
        assert_eq!(state.objects(), Some(&good));
        assert_eq!(state.observe(missing()), MembershipChange::Failed);
        assert_eq!(
            state.objects(),
            Some(&good),
            "deleted: the last good one stays"
        );
        assert_eq!(state.observe(Ok(good.clone())), MembershipChange::Recovered);
        assert_eq!(state.observe(Ok(good)), MembershipChange::Usable);
    }

    #[test]
    fn membership_comes_from_the_resource_named_after_the_cluster() {
        let west = membership("west", 3);
        let east = membership("east", 2);
        let objects = translate_membership(&cluster(), [&west, &east]).expect("east is there");
        assert_eq!(objects.len(), 2, "the cluster object and one gateway");
        assert!(objects
            .iter()
            .all(|o| o.key.as_ref().is_some_and(|k| k.cluster == "east")));
        assert_eq!(
            translate_membership(&cluster(), [&west]),
            Err(MembershipError::Missing("east".into())),
            "another cluster's resource is never published as ours"
        );
        let mut bad = membership("east", 2);
        bad.spec.pod_prefixes = vec!["not a prefix".into()];
        match translate_membership(&cluster(), [&bad]) {
            Err(MembershipError::Invalid { error, .. }) => {
                assert!(error.field.starts_with("spec"), "{error}")
            }
            other => panic!("expected an invalid resource, got {other:?}"),
        }
    }

    fn meta(name: &str, uid: Option<&str>, annotations: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            namespace: Some("ns".into()),
            name: Some(name.into()),
            uid: uid.map(Into::into),
            annotations: (!annotations.is_empty()).then(|| {
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            ..ObjectMeta::default()
        }
    }

    fn service(name: &str, annotations: &[(&str, &str)]) -> Service {
        Service {
            metadata: meta(name, Some("u-svc"), annotations),
            spec: Some(ServiceSpec {
                cluster_ip: Some("100.96.0.9".into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn slice(name: &str, service: &str, conditions: Option<EndpointConditions>) -> EndpointSlice {
        let mut m = meta(name, Some("u-slice"), &[]);
        m.labels = Some([(LABEL_SERVICE_NAME.to_string(), service.to_string())].into());
        EndpointSlice {
            metadata: m,
            address_type: "IPv4".into(),
            endpoints: vec![Endpoint {
                addresses: vec!["100.64.0.1".into()],
                conditions,
                ..Endpoint::default()
            }],
            ports: None,
        }
    }

    fn export(name: &str) -> ServiceExport {
        ServiceExport {
            metadata: meta(name, Some("u-exp"), &[]),
        }
    }

    fn only_service(t: &Translation) -> &pb::Service {
        match t.objects.as_slice() {
            [pb::Object {
                body: Some(Body::Service(s)),
                ..
            }] => s,
            other => panic!("expected one service, got {other:?}"),
        }
    }

    #[test]
    fn defaults_of_a_service_with_only_a_port_number() {
        let t = translate(&cluster(), &[service("a", &[])], &[], &[export("a")]);
        assert_eq!(t.skipped, vec![]);
        assert_eq!(
            only_service(&t),
            &pb::Service {
                ports: vec![pb::ServicePort {
                    name: String::new(),
                    port: 80,
                    protocol: "TCP".into()
                }],
                global: true,
                shared: true,
                affinity: pb::Affinity::None as i32,
                cluster_ips: vec!["100.96.0.9".into()],
            },
            "protocol defaults to TCP, clusterIP stands in for a missing clusterIPs"
        );
    }

    #[test]
    fn global_false_without_export_is_not_published_and_not_a_skip() {
        let t = translate(
            &cluster(),
            &[service("a", &[(ANNOTATION_GLOBAL, "false")])],
            &[slice("a-1", "a", None)],
            &[],
        );
        assert_eq!(t, Translation::default());
    }

    #[test]
    fn an_export_publishes_even_with_global_false() {
        let t = translate(
            &cluster(),
            &[service("a", &[(ANNOTATION_GLOBAL, "false")])],
            &[],
            &[export("a")],
        );
        assert!(only_service(&t).global);
    }

    #[test]
    fn bad_boolean_annotations_skip_with_the_value() {
        for annotation in [ANNOTATION_GLOBAL, ANNOTATION_SHARED] {
            let t = translate(
                &cluster(),
                &[service("a", &[(annotation, "yes")])],
                &[slice("a-1", "a", None)],
                &[export("a")],
            );
            assert_eq!(t.objects, vec![], "{annotation}: the slice goes too");
            assert_eq!(t.skipped.len(), 1, "{annotation}");
            assert_eq!(
                t.skipped[0].to_string(),
                format!(
                    "Service ns/a: annotation {annotation}: \"yes\" is not one of \"true\", \"false\""
                )
            );
        }
    }

    #[test]
    fn a_published_service_without_uid_is_skipped() {
        let mut svc = service("a", &[]);
        svc.metadata.uid = None;
        let t = translate(
            &cluster(),
            &[svc],
            &[slice("a-1", "a", None)],
            &[export("a")],
        );
        assert_eq!(t.objects, vec![]);
        assert_eq!(t.skipped.len(), 1);
        assert_eq!(t.skipped[0].reason, SkipReason::NoUid);
        assert_eq!(t.skipped[0].kind, SourceKind::Service);
    }

    #[test]
    fn bad_ports_and_ips_skip_the_service() {
        let mut svc = service("a", &[]);
        if let Some(spec) = svc.spec.as_mut() {
            spec.ports = Some(vec![ServicePort {
                port: 70000,
                ..ServicePort::default()
            }]);
        }
        let t = translate(&cluster(), &[svc], &[], &[export("a")]);
        assert!(
            matches!(&t.skipped[..], [Skipped { reason: SkipReason::BadPort(m), .. }] if m.contains("70000")),
            "{:?}",
            t.skipped
        );

        let mut svc = service("b", &[]);
        if let Some(spec) = svc.spec.as_mut() {
            spec.cluster_ips = Some(vec!["10.0.0.300".into()]);
        }
        let t = translate(&cluster(), &[svc], &[], &[export("b")]);
        assert_eq!(
            t.skipped[0].reason,
            SkipReason::BadClusterIp("10.0.0.300".into())
        );
    }

    fn endpoint_of(t: &Translation) -> &pb::Endpoint {
        let slice = t
            .objects
            .iter()
            .find_map(|o| match &o.body {
                Some(Body::EndpointSlice(s)) => Some(s),
                _ => None,
            })
            .expect("a slice");
        &slice.endpoints[0]
    }

    #[test]
    fn unset_conditions_follow_the_endpointslice_api() {
        let conditions = |ready, serving, terminating| {
            Some(EndpointConditions {
                ready,
                serving,
                terminating,
            })
        };
        // (input conditions) -> (ready, serving, terminating)
        let cases = [
            (None, (true, true, false)),
            (conditions(None, None, None), (true, true, false)),
            (conditions(Some(false), None, None), (false, false, false)),
            (
                conditions(Some(false), Some(true), Some(true)),
                (false, true, true),
            ),
            (conditions(None, Some(false), None), (true, false, false)),
        ];
        for (input, (ready, serving, terminating)) in cases {
            let t = translate(
                &cluster(),
                &[service("a", &[])],
                &[slice("a-1", "a", input.clone())],
                &[export("a")],
            );
            let e = endpoint_of(&t);
            assert_eq!(
                (e.ready, e.serving, e.terminating),
                (ready, serving, terminating),
                "{input:?}"
            );
        }
    }

    #[test]
    fn slices_that_cannot_be_published_are_named() {
        let mut unlabeled = slice("a-1", "a", None);
        unlabeled.metadata.labels = None;
        let mut wrong_family = slice("a-2", "a", None);
        wrong_family.address_type = "IPv6".into();
        let mut odd = slice("a-3", "a", None);
        odd.address_type = "IPX".into();
        let mut all_ports = slice("a-4", "a", None);
        all_ports.ports = Some(vec![EndpointPort::default()]);
        let t = translate(
            &cluster(),
            &[service("a", &[])],
            &[unlabeled, wrong_family, odd, all_ports],
            &[export("a")],
        );
        let reasons: Vec<_> = t
            .skipped
            .iter()
            .map(|s| (s.name.as_str(), &s.reason))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("a-1", &SkipReason::NoServiceLabel),
                (
                    "a-2",
                    &SkipReason::BadEndpointAddress {
                        address: "100.64.0.1".into(),
                        address_type: "IPv6".into()
                    }
                ),
                ("a-3", &SkipReason::UnknownAddressType("IPX".into())),
                (
                    "a-4",
                    &SkipReason::BadPort(
                        "(unnamed): no port number (all ports) cannot be published".into()
                    )
                ),
            ]
        );
        assert_eq!(t.objects.len(), 1, "only the service");
    }

    #[test]
    fn output_does_not_depend_on_input_order() {
        let services = [
            service("a", &[]),
            service("b", &[(ANNOTATION_GLOBAL, "true")]),
        ];
        let slices = [slice("a-1", "a", None), slice("b-1", "b", None)];
        let forward = translate(&cluster(), &services, &slices, &[export("a")]);
        let backward = translate(
            &cluster(),
            services.iter().rev(),
            slices.iter().rev(),
            &[export("a")],
        );
        assert_eq!(forward, backward);
        assert_eq!(forward.objects.len(), 4);
    }

    #[test]
    fn translation_waits_for_every_listing_then_follows_changes() {
        let mut p = SyncProgress::new([SourceKind::Service, SourceKind::EndpointSlice]);
        let ok = Ok::<_, &str>;
        p.observe(SourceKind::Service, ok(WatchStep::Listing));
        p.observe(SourceKind::Service, ok(WatchStep::Listed));
        p.observe(SourceKind::Service, ok(WatchStep::Changed));
        assert!(!p.should_translate(), "slices not listed yet");
        p.observe(SourceKind::EndpointSlice, Err("connection refused"));
        assert!(!p.should_translate(), "an error is not a listing");
        p.observe(SourceKind::EndpointSlice, ok(WatchStep::Listed));
        assert!(p.should_translate(), "an empty listing counts");
        p.translated();
        assert!(!p.should_translate());
        p.observe(SourceKind::EndpointSlice, ok(WatchStep::Listing));
        assert!(
            !p.should_translate(),
            "a relist shows nothing until it completes"
        );
        p.observe(SourceKind::EndpointSlice, ok(WatchStep::Listed));
        assert!(p.should_translate());
    }
}
