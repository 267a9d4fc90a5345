//! The API server's configuration (TOML), validated completely before any socket is
//! bound; every error names its field.
//!
//! ```toml
//! listen = "0.0.0.0:7444"
//! # history = 10000                 changes kept for resuming watchers
//! # bookmark_interval_ms = 5000     mean interval of progress bookmarks
//!
//! [tls]
//! trust_bundle = "/etc/isthmus/bundle.pem"
//! certificate = "/etc/isthmus/api.pem"     # a gateway-form identity of this cluster:
//!                                          # spiffe://<td>/cluster/<c>/gateway/<name>
//! private_key = "/etc/isthmus/api.key"     # mode 0600
//! # crls = ["/etc/isthmus/root.crl"]
//! # crls_dir = "/etc/isthmus/trust"        # every *.crl.pem in it
//!
//! [source]
//! kind = "file"                            # file | etcd | kubernetes
//! path = "/etc/isthmus/cluster.toml"       # file: everything; kubernetes: the cluster
//!                                          # object and gateways (services come from the API;
//!                                          # without a path, from the IsthmusCluster resource
//!                                          # named after the cluster)
//! # reload_interval_ms = 1000              # file
//! # kubeconfig = "/root/.kube/config"      # kubernetes (default: $KUBECONFIG, ~/.kube/config,
//! # context = "east"                       #  then the in-cluster service account)
//! # service_exports = true                 # kubernetes: watch MCS ServiceExports
//! # endpoints = ["http://127.0.0.1:2379"]  # etcd: the members
//! # root = "/isthmus/clustermesh/v1"       # etcd: keys are <root>/<cluster>/<kind>/<ns>/<name>
//! ```

use crate::pb::Object;
use crate::source::file::{self, FileError};
use isthmus_identity::{ClusterName, LocalCredentials, MeshTrust, SpiffeId, TrustDomain};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config error: the field and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<FileError> for ConfigError {
    fn from(e: FileError) -> Self {
        ConfigError::new(format!("source.path: {}", e.field), e.message)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    history: Option<usize>,
    bookmark_interval_ms: Option<u64>,
    tls: Option<RawTls>,
    source: Option<RawSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    trust_bundle: Option<PathBuf>,
    certificate: Option<PathBuf>,
    private_key: Option<PathBuf>,
    #[serde(default)]
    crls: Vec<PathBuf>,
    /// Every `*.crl.pem` in this directory is loaded too.
    crls_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    kind: Option<String>,
    path: Option<PathBuf>,
    reload_interval_ms: Option<u64>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    service_exports: Option<bool>,
    endpoints: Option<Vec<String>>,
    root: Option<String>,
}

/// Where the cluster's state comes from.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A TOML file, polled for changes.
    File {
        /// The file.
        path: PathBuf,
        /// Its objects as loaded at start.
        initial: Vec<Object>,
        /// Poll interval.
        interval: Duration,
    },
    /// The cluster's prefix in etcd, listed then watched.
    Etcd(crate::source::etcd::EtcdSourceConfig),
    /// Services, EndpointSlices and ServiceExports from the Kubernetes API; the cluster
    /// object and gateways from a file (read once).
    Kubernetes {
        /// The kube settings.
        config: crate::source::kubernetes::KubernetesSourceConfig,
        /// The cluster object and gateways from a file; `None`: from the cluster's
        /// `IsthmusCluster` resource.
        static_objects: Option<Vec<Object>>,
    },
}

/// A validated server configuration.
pub struct ServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Changes kept for resumes.
    pub history: usize,
    /// Bookmark interval.
    pub bookmark_interval: Duration,
    /// The server's certificate chain and key.
    pub credentials: LocalCredentials,
    /// Roots and CRLs.
    pub trust: MeshTrust,
    /// The server's identity (a gateway-form ID of its cluster).
    pub id: SpiffeId,
    /// Its trust domain.
    pub trust_domain: TrustDomain,
    /// Its cluster: the only one it may publish.
    pub cluster: ClusterName,
    /// The source.
    pub source: SourceConfig,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("id", &self.id.to_string())
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("config", format!("{}: {e}", path.display())))?;
    parse(&text)
}

/// Validates a config text.
pub fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
    let de = toml::Deserializer::new(text);
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::new(
            if path == "." { "config".into() } else { path },
            e.into_inner().message().to_string(),
        )
    })?;
    let listen = raw
        .listen
        .as_deref()
        .unwrap_or("0.0.0.0:7444")
        .parse::<SocketAddr>()
        .map_err(|_| ConfigError::new("listen", "not an IP address and port"))?;
    let history = raw.history.unwrap_or(crate::store::DEFAULT_HISTORY);
    if history == 0 {
        return Err(ConfigError::new("history", "must be at least 1"));
    }
    let bookmark_ms = raw.bookmark_interval_ms.unwrap_or(5000);
    if !(100..=600_000).contains(&bookmark_ms) {
        return Err(ConfigError::new(
            "bookmark_interval_ms",
            "must be between 100 and 600000",
        ));
    }
    let tls = raw
        .tls
        .ok_or_else(|| ConfigError::new("tls", "required: the server speaks only mTLS"))?;
    let req = |v: Option<PathBuf>, f: &str| {
        v.ok_or_else(|| ConfigError::new(format!("tls.{f}"), "required"))
    };
    let bundle = req(tls.trust_bundle, "trust_bundle")?;
    let cert = req(tls.certificate, "certificate")?;
    let key = req(tls.private_key, "private_key")?;
    let roots = isthmus_certs::files::load_certificates(&bundle)
        .map_err(|e| ConfigError::new("tls.trust_bundle", e.to_string()))?;
    if roots.is_empty() {
        return Err(ConfigError::new("tls.trust_bundle", "holds no certificate"));
    }
    let mut crls = Vec::new();
    for (i, p) in tls.crls.iter().enumerate() {
        crls.extend(
            isthmus_certs::files::load_crls(p)
                .map_err(|e| ConfigError::new(format!("tls.crls[{i}]"), e.to_string()))?,
        );
    }
    if let Some(dir) = &tls.crls_dir {
        crls.extend(
            isthmus_certs::files::load_crl_dir(dir)
                .map_err(|e| ConfigError::new("tls.crls_dir", e.to_string()))?,
        );
    }
    let credentials = isthmus_certs::files::load_credentials(&cert, &key).map_err(|e| {
        let field = if e.to_string().contains(&key.display().to_string()) {
            "tls.private_key"
        } else {
            "tls.certificate"
        };
        ConfigError::new(field, e.to_string())
    })?;
    let leaf = credentials
        .chain
        .first()
        .ok_or_else(|| ConfigError::new("tls.certificate", "holds no certificate"))?;
    let id = isthmus_identity::spiffe_id_of(leaf)
        .map_err(|e| ConfigError::new("tls.certificate", e.to_string()))?;
    let gateway = id.as_gateway().ok_or_else(|| {
        ConfigError::new(
            "tls.certificate",
            format!("{id} is not spiffe://<td>/cluster/<cluster>/gateway/<name>: the server publishes the cluster named there"),
        )
    })?;
    let trust = MeshTrust { roots, crls };
    // Parse the trust bundle and CRLs now, so a bad one is a config error.
    isthmus_identity::MeshTls::new(credentials.clone(), &trust)
        .map_err(|e| ConfigError::new("tls", e.to_string()))?;
    let source = raw
        .source
        .ok_or_else(|| ConfigError::new("source", "required"))?;
    let source = match source.kind.as_deref().unwrap_or("file") {
        "file" => {
            let path = source
                .path
                .ok_or_else(|| ConfigError::new("source.path", "required with kind = \"file\""))?;
            let initial = file::load(&path, &gateway.cluster)?;
            let ms = source.reload_interval_ms.unwrap_or(1000);
            if !(50..=3_600_000).contains(&ms) {
                return Err(ConfigError::new(
                    "source.reload_interval_ms",
                    "must be between 50 and 3600000",
                ));
            }
            SourceConfig::File {
                path,
                initial,
                interval: Duration::from_millis(ms),
            }
        }
        "etcd" => {
            let endpoints = source.endpoints.unwrap_or_default();
            if endpoints.is_empty() {
                return Err(ConfigError::new(
                    "source.endpoints",
                    "required with kind = \"etcd\" (e.g. [\"http://127.0.0.1:2379\"])",
                ));
            }
            for (i, e) in endpoints.iter().enumerate() {
                if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() < 10 {
                    return Err(ConfigError::new(
                        format!("source.endpoints[{i}]"),
                        format!("{e:?} is not an http:// or https:// URL"),
                    ));
                }
            }
            let mut etcd = crate::source::etcd::EtcdSourceConfig::new(endpoints);
            if let Some(root) = source.root {
                crate::source::etcd::EtcdKeyLayout::new(&root)
                    .map_err(|e| ConfigError::new("source.root", e.to_string()))?;
                etcd.root = root;
            }
            SourceConfig::Etcd(etcd)
        }
        "kubernetes" => {
            // With a path, the cluster object and gateways come from that file (read
            // once); without one, from the IsthmusCluster resource named after the
            // cluster, watched like the services.
            let static_objects: Option<Vec<Object>> = match source.path {
                Some(path) => Some(
                    file::load(&path, &gateway.cluster)?
                        .into_iter()
                        .filter(|o| {
                            o.key.as_ref().is_some_and(|k| {
                                k.kind == crate::pb::Kind::Cluster as i32
                                    || k.kind == crate::pb::Kind::Gateway as i32
                            })
                        })
                        .collect(),
                ),
                None => None,
            };
            SourceConfig::Kubernetes {
                config: crate::source::kubernetes::KubernetesSourceConfig {
                    kubeconfig: source.kubeconfig,
                    context: source.context,
                    service_exports: source.service_exports.unwrap_or(true),
                    ..Default::default()
                },
                static_objects,
            }
        }
        other => {
            return Err(ConfigError::new(
                "source.kind",
                format!("{other:?} is not a source kind (file, etcd, kubernetes)"),
            ))
        }
    };
    Ok(ServerConfig {
        listen,
        history,
        bookmark_interval: Duration::from_millis(bookmark_ms),
        credentials,
        trust,
        trust_domain: id.trust_domain().clone(),
        cluster: gateway.cluster,
        id,
        source,
    })
}
