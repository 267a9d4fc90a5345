//! Every configuration file in deploy/ is accepted by the component that reads it, laid
//! out as the manifests mount it, with the Secrets `isthmusctl certs secrets` writes:
//! deploy/ stays true to what the code does. A revoked certificate's CRL, shipped in the
//! trust Secret, is loaded by every component that checks peers.

// Helpers outside #[test] functions unwrap too (clippy.toml covers only the tests).
#![allow(clippy::unwrap_used)]

mod common;
use common::TempDir;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn ctl(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_isthmusctl"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "isthmusctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A Secret's files, decoded: (key, bytes).
type Files = Vec<(String, Vec<u8>)>;

/// The Secrets of a manifest stream: (name, files).
fn secrets(yaml: &str) -> Vec<(String, Files)> {
    use base64::Engine as _;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).unwrap();
    docs.iter()
        .map(|d| {
            let name = d["metadata"]["name"].as_str().unwrap().to_owned();
            let data = d["data"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap())
                        .unwrap();
                    (k.clone(), bytes)
                })
                .collect();
            (name, data)
        })
        .collect()
}

/// Writes `bytes` to `dir/name` with `mode`, as a Secret or ConfigMap volume would.
fn put(dir: &Path, name: &str, bytes: &[u8], mode: u32) {
    fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    fs::write(&path, bytes).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A pod's /etc/isthmus: the trust Secret, one identity's pair (as the projected
/// volume + subPathExpr mount it), the API's pair, and a config directory.
struct Pod {
    root: PathBuf,
}

impl Pod {
    fn new(root: &Path, trust: &[(String, Vec<u8>)]) -> Self {
        // As the kubelet lays out a Secret volume: the files in a timestamped folder,
        // `..data` pointing at it, and one symlink per key through `..data`.
        let dir = root.join("trust");
        let stamped = "..2026_11_30_12_00_00.000000001";
        for (k, v) in trust {
            put(&dir.join(stamped), k, v, 0o644);
            std::os::unix::fs::symlink(format!("..data/{k}"), dir.join(k)).unwrap();
        }
        std::os::unix::fs::symlink(stamped, dir.join("..data")).unwrap();
        Self {
            root: root.to_owned(),
        }
    }

    fn identity(&self, tls: &[(String, Vec<u8>)], name: &str) {
        let get = |k: &str| &tls.iter().find(|(n, _)| n == k).unwrap().1;
        let dir = self.root.join("identity");
        put(&dir, "gateway.pem", get(&format!("{name}.pem")), 0o400);
        put(&dir, "gateway.key", get(&format!("{name}.key")), 0o400);
        let dir = self.root.join("tls");
        put(
            &dir,
            &format!("{name}.pem"),
            get(&format!("{name}.pem")),
            0o400,
        );
        put(
            &dir,
            &format!("{name}.key"),
            get(&format!("{name}.key")),
            0o400,
        );
    }

    fn config(&self, overlay: &str, files: &[(&str, &str)]) {
        for (mounted_as, source) in files {
            let text = fs::read(deploy().join(overlay).join(source)).unwrap();
            put(&self.root.join("config"), mounted_as, &text, 0o644);
        }
    }

    /// The config text with /etc/isthmus/ pointing at this pod's files.
    fn read(&self, overlay_file: &str) -> String {
        fs::read_to_string(deploy().join(overlay_file))
            .unwrap()
            .replace("/etc/isthmus/", &format!("{}/", self.root.display()))
    }
}

#[test]
fn every_deploy_config_is_accepted_with_the_secrets_isthmusctl_writes() {
    let tmp = TempDir::new("configs");
    let ca = tmp.0.join("ca");
    let d = ca.to_str().unwrap();
    ctl(&[
        "certs",
        "init",
        "--dir",
        d,
        "--trust-domain",
        "mesh.example",
    ]);
    ctl(&["certs", "issue", "--dir", d, "cluster", "--cluster", "east"]);
    let gateways = [
        "clustermesh-api",
        "isthmus-gateway-0",
        "isthmus-gateway-1",
        "node-a",
        "node-b",
        "stolen",
    ];
    for gw in gateways {
        ctl(&[
            "certs",
            "issue",
            "--dir",
            d,
            "gateway",
            "--cluster",
            "east",
            "--name",
            gw,
        ]);
    }
    // Revoke one gateway: its cluster CA's CRL must reach every component.
    let shown = ctl(&[
        "certs",
        "show",
        "--output",
        "json",
        ca.join("clusters/east/gateways/stolen.pem")
            .to_str()
            .unwrap(),
    ]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let serial = shown["certificates"][0]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    ctl(&[
        "certs",
        "revoke",
        "--dir",
        d,
        "--cluster",
        "east",
        "--serial",
        &serial,
    ]);
    let manifests = tmp.0.join("secrets.yaml");
    ctl(&[
        "certs",
        "secrets",
        "--dir",
        d,
        "--cluster",
        "east",
        "--out",
        manifests.to_str().unwrap(),
    ]);
    let all = secrets(&fs::read_to_string(&manifests).unwrap());
    let trust = &all.iter().find(|(n, _)| n == "isthmus-trust").unwrap().1;
    let tls = &all.iter().find(|(n, _)| n == "isthmus-tls").unwrap().1;
    assert!(
        trust.iter().any(|(k, _)| k == "cluster-east.crl.pem"),
        "the trust Secret carries east's CRL"
    );

    // The clustermesh API (base).
    let api = Pod::new(&tmp.0.join("api"), trust);
    api.identity(tls, "clustermesh-api");
    let cfg = isthmus_clustermesh_api::config::parse(&api.read("base/clustermesh-api/api.toml"))
        .unwrap_or_else(|e| panic!("base/clustermesh-api/api.toml: {e}"));
    assert!(!cfg.trust.crls.is_empty(), "the API server loads the CRLs");

    // The cluster gateway (each replica reads the same file).
    let gw = Pod::new(&tmp.0.join("gw"), trust);
    gw.identity(tls, "isthmus-gateway-0");
    let cfg = isthmus_gateway::config::parse(&gw.read("overlays/cluster-gateway/gateway.toml"))
        .unwrap_or_else(|e| panic!("overlays/cluster-gateway/gateway.toml: {e}"));
    assert!(
        !cfg.identity.as_ref().unwrap().trust.crls.is_empty(),
        "the cluster gateway loads the CRLs"
    );

    // Node mode, on each node.
    for node in ["node-a", "node-b"] {
        let pod = Pod::new(&tmp.0.join(node), trust);
        pod.identity(tls, node);
        pod.config(
            "overlays/node",
            &[
                ("nodes.toml", "nodes.toml"),
                ("egress-policies.yaml", "egress-policies.yaml"),
            ],
        );
        let file = format!("overlays/node/{node}.toml");
        let cfg = isthmus_gateway::config::parse(&pod.read(&file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(cfg.node.is_some() && cfg.steering.is_some(), "{file}");
        assert!(
            !cfg.identity.as_ref().unwrap().trust.crls.is_empty(),
            "{file}"
        );
    }

    // The egress gateways, with their WireGuard keys as the Secret mounts them.
    for node in ["egress-a", "egress-b"] {
        let pod = Pod::new(&tmp.0.join(node), trust);
        let key = tmp.0.join(format!("{node}.key"));
        ctl(&["keygen", "--private-key-file", key.to_str().unwrap()]);
        put(
            &pod.root.join("wireguard"),
            "wireguard.key",
            &fs::read(&key).unwrap(),
            0o400,
        );
        let file = format!("overlays/egress-gateway/{node}.toml");
        let cfg = isthmus_gateway::config::parse(&pod.read(&file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(cfg.egress_gateway.is_some(), "{file}");
    }
}
