//! The mesh PKI as an operator uses it: create, issue, store, load, show, revoke.

// Test helpers outside #[test] functions unwrap too (clippy.toml covers only the tests).
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use isthmus_certs::{
    CaDirectory, CertError, CertificateSummary, ClusterCa, Crl, MeshRootCa, Serial, TrustBundle,
    Validity,
};
use isthmus_identity::{ClusterName, GatewayName, TrustDomain};
use x509_parser::extensions::ParsedExtension;

const DAY: Duration = Duration::from_secs(86_400);

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}
fn cluster(s: &str) -> ClusterName {
    ClusterName::new(s).unwrap()
}
fn gw(s: &str) -> GatewayName {
    GatewayName::new(s).unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir =
        std::env::temp_dir().join(format!("isthmus-pki-{name}-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn hierarchy_has_the_documented_profile() {
    let root = MeshRootCa::create(&td("mesh.test"), Validity::days(365)).unwrap();
    let eu = root
        .issue_cluster_ca(&cluster("eu-1"), Validity::days(90))
        .unwrap();
    let leaf = eu.issue_gateway(&gw("gw-0"), Validity::days(30)).unwrap();

    assert_eq!(
        leaf.id().to_string(),
        "spiffe://mesh.test/cluster/eu-1/gateway/gw-0"
    );
    assert_eq!(leaf.chain().len(), 2);
    assert_eq!(&leaf.chain()[1], eu.certificate());

    // Root: CA, path length 1, URI SAN spiffe://mesh.test.
    let (_, r) = x509_parser::parse_x509_certificate(root.certificate()).unwrap();
    let bc = r.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(1));
    let ku = r.key_usage().unwrap().unwrap().value;
    assert!(ku.key_cert_sign() && ku.crl_sign());

    // Intermediate: CA, path length 0.
    let (_, i) = x509_parser::parse_x509_certificate(eu.certificate()).unwrap();
    let bc = i.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    assert_eq!(i.issuer(), r.subject());

    // Leaf: not a CA, digitalSignature, serverAuth + clientAuth, one URI SAN, P-256.
    let (_, l) = x509_parser::parse_x509_certificate(&leaf.chain()[0]).unwrap();
    assert!(!l.is_ca());
    let ku = l.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = l.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let uris: Vec<_> = l
        .extensions()
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(uris.len(), 1);
    assert_eq!(
        l.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );
    // Leaf validity was clamped to the intermediate's.
    assert!(l.validity().not_after <= i.validity().not_after);
    assert_eq!(l.raw_serial().len(), 16);
    assert_eq!(
        Serial::from(l.raw_serial()).to_string(),
        leaf.serial().to_string()
    );
}

#[test]
fn expired_or_future_ca_refuses_to_issue() {
    let now = SystemTime::now();
    let expired = MeshRootCa::create(
        &td("mesh.test"),
        Validity::new(now - 10 * DAY, now - DAY).unwrap(),
    )
    .unwrap();
    let err = expired
        .issue_cluster_ca(&cluster("a"), Validity::days(1))
        .unwrap_err();
    assert!(matches!(err, CertError::CaExpired { .. }), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");

    let future = MeshRootCa::create(
        &td("mesh.test"),
        Validity::new(now + DAY, now + 10 * DAY).unwrap(),
    )
    .unwrap();
    assert!(matches!(
        future.issue_cluster_ca(&cluster("a"), Validity::days(1)),
        Err(CertError::CaNotYetValid { .. })
    ));

    let root = MeshRootCa::create(&td("mesh.test"), Validity::days(10)).unwrap();
    assert!(matches!(
        root.issue_cluster_ca(
            &cluster("a"),
            Validity::new(now + 20 * DAY, now + 30 * DAY).unwrap()
        ),
        Err(CertError::OutsideCaValidity { .. })
    ));
    assert!(matches!(
        Validity::new(now, now),
        Err(CertError::BadValidity)
    ));
}

#[test]
fn ca_directory_init_issue_and_errors() {
    let dir = temp_dir("store");
    let store = CaDirectory::init(&dir, &td("mesh.test"), Validity::days(365)).unwrap();
    assert_eq!(mode(&dir.join("root-ca.key")), 0o600);
    assert_eq!(mode(&dir.join("root-ca.pem")), 0o644);
    assert!(matches!(
        CaDirectory::init(&dir, &td("mesh.test"), Validity::days(1)),
        Err(CertError::AlreadyExists { .. })
    ));

    // A gateway of a cluster without an intermediate: unknown cluster.
    let err = store
        .issue_gateway(&cluster("eu-1"), &gw("gw-0"), Validity::days(30))
        .unwrap_err();
    assert!(
        matches!(&err, CertError::UnknownCluster(c) if c == "eu-1"),
        "{err}"
    );
    assert!(err.to_string().contains("unknown cluster"), "{err}");

    let ca_path = store
        .issue_cluster_ca(&cluster("eu-1"), Validity::days(90))
        .unwrap();
    assert!(ca_path.is_file());
    assert!(matches!(
        store.issue_cluster_ca(&cluster("eu-1"), Validity::days(90)),
        Err(CertError::AlreadyExists { .. })
    ));
    let files = store
        .issue_gateway(&cluster("eu-1"), &gw("gw-0"), Validity::days(30))
        .unwrap();
    assert_eq!(mode(&files.key), 0o600);
    assert!(matches!(
        store.issue_gateway(&cluster("eu-1"), &gw("gw-0"), Validity::days(30)),
        Err(CertError::AlreadyExists { .. })
    ));

    // The stored gateway loads as credentials; the bundle holds the root.
    let creds = isthmus_certs::load_credentials(&files.chain, &files.key).unwrap();
    assert_eq!(creds.chain.len(), 2);
    let bundle = store.bundle().unwrap();
    assert_eq!(
        bundle.roots(),
        [store.root_ca().unwrap().certificate().clone()]
    );

    // Re-opened, the cluster CA issues again (loaded from its files).
    let reopened = CaDirectory::open(&dir).unwrap();
    let ca = reopened.cluster_ca(&cluster("eu-1")).unwrap();
    assert_eq!(ca.cluster().as_str(), "eu-1");
    assert_eq!(ca.trust_domain().as_str(), "mesh.test");
    ca.issue_gateway(&gw("gw-1"), Validity::days(1)).unwrap();

    assert!(matches!(
        CaDirectory::open(&dir.join("nope")),
        Err(CertError::NotInitialised { .. })
    ));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn key_file_with_mode_0644_is_refused_at_load() {
    let dir = temp_dir("mode");
    let store = CaDirectory::init(&dir, &td("mesh.test"), Validity::days(365)).unwrap();
    store
        .issue_cluster_ca(&cluster("eu-1"), Validity::days(90))
        .unwrap();
    let files = store
        .issue_gateway(&cluster("eu-1"), &gw("gw-0"), Validity::days(30))
        .unwrap();

    fs::set_permissions(&files.key, fs::Permissions::from_mode(0o644)).unwrap();
    let err = isthmus_certs::load_credentials(&files.chain, &files.key).unwrap_err();
    assert!(
        matches!(err, CertError::KeyFileTooOpen { mode: 0o644, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&files.key.display().to_string()) && msg.contains("0644"),
        "{msg}"
    );

    // The same for CA keys.
    let ca_key = dir.join("clusters/eu-1/ca.key");
    fs::set_permissions(&ca_key, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        store.cluster_ca(&cluster("eu-1")),
        Err(CertError::KeyFileTooOpen { mode: 0o644, .. })
    ));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn loading_a_ca_checks_key_and_role() {
    let root = MeshRootCa::create(&td("mesh.test"), Validity::days(365)).unwrap();
    let eu = root
        .issue_cluster_ca(&cluster("eu-1"), Validity::days(90))
        .unwrap();
    let other = root
        .issue_cluster_ca(&cluster("us-1"), Validity::days(90))
        .unwrap();
    let dir = temp_dir("load");
    eu.save(&dir.join("eu.pem"), &dir.join("eu.key")).unwrap();
    other
        .save(&dir.join("us.pem"), &dir.join("us.key"))
        .unwrap();
    root.save(&dir.join("root.pem"), &dir.join("root.key"))
        .unwrap();
    // Keys are never overwritten.
    assert!(matches!(
        root.save(&dir.join("root.pem"), &dir.join("root.key")),
        Err(CertError::KeyExists { .. })
    ));

    let eu_pem = fs::read_to_string(dir.join("eu.pem")).unwrap();
    let us_key = isthmus_certs::read_private_key_pem(&dir.join("us.key")).unwrap();
    assert!(matches!(
        ClusterCa::from_pem(&eu_pem, &us_key),
        Err(CertError::KeyMismatch { .. })
    ));
    let root_pem = fs::read_to_string(dir.join("root.pem")).unwrap();
    let root_key = isthmus_certs::read_private_key_pem(&dir.join("root.key")).unwrap();
    assert!(matches!(
        ClusterCa::from_pem(&root_pem, &root_key),
        Err(CertError::NotAMeshCa(_))
    ));
    let loaded = MeshRootCa::load(&dir.join("root.pem"), &dir.join("root.key")).unwrap();
    assert_eq!(loaded.trust_domain().as_str(), "mesh.test");
    // A loaded root still issues intermediates that chain to the same root.
    let again = loaded
        .issue_cluster_ca(&cluster("ap-1"), Validity::days(1))
        .unwrap();
    let (_, a) = x509_parser::parse_x509_certificate(again.certificate()).unwrap();
    let (_, r) = x509_parser::parse_x509_certificate(root.certificate()).unwrap();
    assert_eq!(a.issuer(), r.subject());
    assert!(a.verify_signature(Some(r.public_key())).is_ok());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn trust_bundle_holds_several_roots() {
    let old = MeshRootCa::create(&td("mesh.test"), Validity::days(365)).unwrap();
    let new = MeshRootCa::create(&td("mesh.test"), Validity::days(365)).unwrap();
    let mut bundle = TrustBundle::new();
    assert!(bundle.add(old.certificate().clone()).unwrap());
    assert!(bundle.add(new.certificate().clone()).unwrap());
    assert!(!bundle.add(new.certificate().clone()).unwrap());

    let dir = temp_dir("bundle");
    let path = dir.join("bundle.pem");
    bundle.save(&path).unwrap();
    let loaded = TrustBundle::load(&path).unwrap();
    assert_eq!(loaded, bundle);
    assert_eq!(loaded.roots().len(), 2);

    // Intermediates are not roots.
    let eu = old
        .issue_cluster_ca(&cluster("eu-1"), Validity::days(9))
        .unwrap();
    assert!(matches!(
        bundle.add(eu.certificate().clone()),
        Err(CertError::BadCertificate(_))
    ));

    // Retire the old root.
    let fp = CertificateSummary::from_der(old.certificate())
        .unwrap()
        .sha256_fingerprint;
    let mut rotated = loaded.clone();
    assert!(rotated.remove(&fp));
    assert!(!rotated.remove(&fp));
    assert_eq!(rotated.roots(), [new.certificate().clone()]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn crl_round_trips_through_pem() {
    let root = MeshRootCa::create(&td("mesh.test"), Validity::days(365)).unwrap();
    let eu = root
        .issue_cluster_ca(&cluster("eu-1"), Validity::days(90))
        .unwrap();
    let leaf = eu.issue_gateway(&gw("gw-0"), Validity::days(30)).unwrap();
    let crl = eu
        .crl(&[leaf.serial().clone()], 1, Validity::days(7))
        .unwrap();
    let dir = temp_dir("crl");
    let path = dir.join("eu-1.crl.pem");
    crl.save(&path).unwrap();
    assert!(fs::read_to_string(&path)
        .unwrap()
        .starts_with("-----BEGIN X509 CRL-----"));
    let loaded = Crl::load_all(&path).unwrap();
    assert_eq!(loaded, std::slice::from_ref(&crl));
    let (_, parsed) = x509_parser::parse_x509_crl(crl.der()).unwrap();
    let serials: Vec<_> = parsed
        .iter_revoked_certificates()
        .map(|r| Serial::from(r.raw_serial()))
        .collect();
    assert_eq!(serials, [leaf.serial().clone()]);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn show_summarises_without_key_material() {
    let dir = temp_dir("show");
    let store = CaDirectory::init(&dir, &td("mesh.test"), Validity::days(365)).unwrap();
    store
        .issue_cluster_ca(&cluster("eu-1"), Validity::days(90))
        .unwrap();
    let files = store
        .issue_gateway(&cluster("eu-1"), &gw("gw-0"), Validity::days(30))
        .unwrap();

    let summaries = CertificateSummary::from_file(&files.chain).unwrap();
    assert_eq!(summaries.len(), 2);
    let leaf = &summaries[0];
    assert_eq!(
        leaf.spiffe_id.as_ref().unwrap().to_string(),
        "spiffe://mesh.test/cluster/eu-1/gateway/gw-0"
    );
    assert!(!leaf.is_ca && summaries[1].is_ca);
    assert!(leaf.is_valid_at(SystemTime::now()));
    let text = leaf.to_string();
    for field in [
        "subject:",
        "issuer:",
        "spiffe id:",
        "not before:",
        "not after:",
        "serial:",
        "sha256:",
    ] {
        assert!(text.contains(field), "{text}");
    }
    let fp = ring::digest::digest(
        &ring::digest::SHA256,
        &isthmus_certs::load_certificates(&files.chain).unwrap()[0],
    );
    let fp: Vec<String> = fp.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert!(text.contains(&fp.join(":")), "{text}");

    // Shown a key file (or a file mixing key and certificate), it never prints the key.
    let key_pem = isthmus_certs::read_private_key_pem(&files.key).unwrap();
    let err = CertificateSummary::from_pem(&key_pem, "gw-0.key").unwrap_err();
    assert!(matches!(err, CertError::NothingFound { .. }), "{err}");
    let mixed = format!("{}{}", &*key_pem, fs::read_to_string(&files.chain).unwrap());
    let shown: String = CertificateSummary::from_pem(&mixed, "mixed.pem")
        .unwrap()
        .iter()
        .map(|s| format!("{s}\n{s:?}\n"))
        .collect();
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!shown.contains(line));
    }
    fs::remove_dir_all(dir).unwrap();
}

/// Checks chains the way a gateway does (webpki through the peer channel's verifier):
/// against the bundle on file and every CRL file of the directory.
struct Verifier {
    config: isthmus_identity::ChannelConfig,
}

impl Verifier {
    fn of(store: &CaDirectory, creds: &isthmus_certs::GatewayFiles) -> Self {
        let mut crls = Vec::new();
        let mut paths = vec![store.crl_path(None)];
        paths.extend(
            store
                .clusters()
                .unwrap()
                .iter()
                .map(|c| store.crl_path(Some(c))),
        );
        for path in paths.iter().filter(|p| p.is_file()) {
            crls.extend(Crl::load_all(path).unwrap().iter().map(|c| c.der().clone()));
        }
        let trust = store.bundle().unwrap().to_mesh_trust(crls);
        let credentials = isthmus_certs::load_credentials(&creds.chain, &creds.key).unwrap();
        let config = isthmus_identity::ChannelConfig::new(
            credentials,
            &trust,
            isthmus_identity::TunnelParams::without_tunnels(1420),
        )
        .unwrap();
        Self { config }
    }

    /// Whether `chain` (PEM text) is accepted as gateway `name` of cluster `one`.
    fn accepts(&self, chain_pem: &str, name: &str) -> Result<(), String> {
        let chain = isthmus_certs::files::parse_certificates(chain_pem, "chain").unwrap();
        let id =
            isthmus_identity::GatewayId::new(td("mesh.test"), cluster("one"), gw(name)).spiffe_id();
        self.config
            .verify_peer(
                &chain,
                isthmus_identity::Role::Dialer,
                &id,
                SystemTime::now(),
            )
            .map_err(|e| e.to_string())
    }
}

fn serial_of(pem: &str) -> Serial {
    CertificateSummary::from_pem(pem, "chain").unwrap()[0]
        .serial
        .clone()
}

/// A cluster CA rotated: the new CA has a subject of its own, every leaf of the cluster
/// is re-issued under it, leaves of the old CA stay valid, and a leaf of the old CA is
/// still revoked by the cluster's CRL file (signed by both CAs: CRLs are matched by
/// issuer name, so a CRL of the new CA alone would not revoke it).
#[test]
fn a_rotated_cluster_ca_keeps_old_leaves_valid_and_revocable() {
    let dir = temp_dir("rotate-ca");
    let store = CaDirectory::init(&dir, &td("mesh.test"), Validity::days(365)).unwrap();
    let one = cluster("one");
    store.issue_cluster_ca(&one, Validity::days(90)).unwrap();
    let a = store
        .issue_gateway(&one, &gw("a"), Validity::days(30))
        .unwrap();
    let b = store
        .issue_gateway(&one, &gw("b"), Validity::days(30))
        .unwrap();
    store
        .issue_leaf(
            isthmus_certs::LeafKind::Admin,
            &one,
            &gw("ops"),
            Validity::days(7),
        )
        .unwrap();
    let old_a = fs::read_to_string(&a.chain).unwrap();
    let old_b = fs::read_to_string(&b.chain).unwrap();

    let rotation = store
        .rotate_cluster_ca(&one, Validity::days(90), &|_| None)
        .unwrap();
    assert_ne!(rotation.old.serial, rotation.new.serial);
    assert_ne!(rotation.old.subject, rotation.new.subject);
    let names: Vec<&str> = rotation.reissued.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(names, ["a", "b", "ops"]);
    let new_a = fs::read_to_string(&a.chain).unwrap();
    assert_ne!(serial_of(&new_a), serial_of(&old_a));
    let chain = CertificateSummary::from_pem(&new_a, "a").unwrap();
    assert_eq!(chain[1].serial, rotation.new.serial);
    assert_eq!(chain[0].issuer, rotation.new.subject);
    // The re-issued leaf keeps the lifetime it had (30 days), not a default.
    let days = chain[0]
        .not_after
        .duration_since(chain[0].not_before)
        .unwrap()
        .as_secs()
        / 86_400;
    assert_eq!(days, 30);
    assert_eq!(mode(&a.key), 0o600);
    // The old CA is kept, key 0600, and loads.
    let kept = store.previous_cluster_cas(&one).unwrap();
    assert_eq!(kept.len(), 1);
    let kept_key = dir.join(format!(
        "clusters/one/previous/ca-{}.key",
        hex::encode(rotation.old.serial.as_bytes())
    ));
    assert_eq!(mode(&kept_key), 0o600);

    let v = Verifier::of(&store, &a);
    v.accepts(&old_a, "a").unwrap();
    v.accepts(&new_a, "a").unwrap();
    v.accepts(&old_b, "b").unwrap();

    // Revoking the old b (issued by the old CA) and the new a (by the new one).
    let revoked = [serial_of(&old_b), serial_of(&new_a)];
    let written = store
        .write_crls(Some(&one), &revoked, 1, Validity::days(30))
        .unwrap();
    let (path, n) = (written.path, written.signed);
    assert_eq!(n, 2, "one CRL per CA of the cluster");
    assert_eq!(Crl::load_all(&path).unwrap().len(), 2);
    let v = Verifier::of(&store, &a);
    let refused = v.accepts(&old_b, "b").unwrap_err();
    assert!(refused.to_lowercase().contains("revoked"), "{refused}");
    assert!(v.accepts(&new_a, "a").is_err());
    v.accepts(&old_a, "a").unwrap();
    v.accepts(&fs::read_to_string(&b.chain).unwrap(), "b")
        .unwrap();
    fs::remove_dir_all(dir).unwrap();
}

/// The root rotated with overlap: the bundle holds both roots until every cluster CA
/// moved under the new one; retiring is refused before that; afterwards chains under
/// the old root are refused and the old root's and its cluster CAs' keys are gone.
#[test]
fn a_root_rotation_overlaps_then_retires_the_old_root() {
    let dir = temp_dir("rotate-root");
    let store = CaDirectory::init(&dir, &td("mesh.test"), Validity::days(365)).unwrap();
    let one = cluster("one");
    store.issue_cluster_ca(&one, Validity::days(90)).unwrap();
    let a = store
        .issue_gateway(&one, &gw("a"), Validity::days(30))
        .unwrap();
    let old_a = fs::read_to_string(&a.chain).unwrap();
    let err = store.retire_previous_roots().unwrap_err();
    assert!(err.to_string().contains("no previous root"), "{err}");

    let rotation = store.rotate_root(Validity::days(365)).unwrap();
    assert_eq!(rotation.bundle_roots, 2);
    assert_ne!(rotation.old.subject, rotation.new.subject);
    assert_eq!(store.previous_roots().unwrap().len(), 1);
    // Nothing was issued under the new root yet: old chains verify with the new bundle.
    Verifier::of(&store, &a).accepts(&old_a, "a").unwrap();
    let err = store.retire_previous_roots().unwrap_err();
    assert!(
        err.to_string().contains("rotate --ca --cluster one"),
        "{err}"
    );
    assert_eq!(
        store.bundle().unwrap().roots().len(),
        2,
        "refused: nothing changed"
    );

    store
        .rotate_cluster_ca(&one, Validity::days(90), &|_| None)
        .unwrap();
    let new_a = fs::read_to_string(&a.chain).unwrap();
    let v = Verifier::of(&store, &a);
    v.accepts(&old_a, "a").unwrap();
    v.accepts(&new_a, "a").unwrap();
    // A leaf left behind under the old CA (a copy put back) blocks the retirement.
    let stale = a.chain.with_file_name("stale.pem");
    fs::write(&stale, &old_a).unwrap();
    fs::write(a.chain.with_file_name("stale.key"), "").unwrap();
    let err = store.retire_previous_roots().unwrap_err();
    assert!(err.to_string().contains("stale.pem"), "{err}");
    fs::remove_file(&stale).unwrap();
    fs::remove_file(a.chain.with_file_name("stale.key")).unwrap();

    let retired = store.retire_previous_roots().unwrap();
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].serial, rotation.old.serial);
    assert_eq!(store.bundle().unwrap().roots().len(), 1);
    assert!(store.previous_roots().unwrap().is_empty());
    assert!(
        store.previous_cluster_cas(&one).unwrap().is_empty(),
        "the cluster CA issued by the retired root is gone with it"
    );
    let v = Verifier::of(&store, &a);
    v.accepts(&new_a, "a").unwrap();
    assert!(
        v.accepts(&old_a, "a").is_err(),
        "the old root is no longer trusted"
    );
    fs::remove_dir_all(dir).unwrap();
}

/// A revoked gateway does not get a new certificate when its cluster's CA is rotated:
/// its files stay as they were (still revoked) and the rotation says it skipped it.
#[test]
fn a_cluster_ca_rotation_does_not_reissue_revoked_leaves() {
    let dir = temp_dir("rotate-ca-revoked");
    let store = CaDirectory::init(&dir, &td("mesh.test"), Validity::days(365)).unwrap();
    let one = cluster("one");
    store.issue_cluster_ca(&one, Validity::days(90)).unwrap();
    let a = store
        .issue_gateway(&one, &gw("a"), Validity::days(30))
        .unwrap();
    let b = store
        .issue_gateway(&one, &gw("b"), Validity::days(30))
        .unwrap();
    let old_b = fs::read_to_string(&b.chain).unwrap();
    let old_a = fs::read_to_string(&a.chain).unwrap();

    let rotation = store
        .rotate_cluster_ca(&one, Validity::days(90), &|leaf| {
            (leaf.serial == serial_of(&old_b)).then(|| "revoked".to_owned())
        })
        .unwrap();
    let reissued: Vec<&str> = rotation.reissued.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(reissued, ["a"]);
    let skipped: Vec<(&str, &str)> = rotation
        .skipped
        .iter()
        .map(|r| (r.1.as_str(), r.3.as_str()))
        .collect();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].0, "b");
    assert!(skipped[0].1.contains("revoked"), "{}", skipped[0].1);
    assert_eq!(fs::read_to_string(&b.chain).unwrap(), old_b);
    assert_ne!(fs::read_to_string(&a.chain).unwrap(), old_a);
    fs::remove_dir_all(dir).unwrap();
}

/// A rotation refused over an unreadable leaf changes nothing; a rotation cut short
/// after the old CA's key was archived (its file left behind) can be run again.
#[test]
fn a_cluster_ca_rotation_is_all_or_nothing_and_can_be_retried() {
    let dir = temp_dir("rotate-ca-retry");
    let store = CaDirectory::init(&dir, &td("mesh.test"), Validity::days(365)).unwrap();
    let one = cluster("one");
    store.issue_cluster_ca(&one, Validity::days(90)).unwrap();
    let a = store
        .issue_gateway(&one, &gw("a"), Validity::days(30))
        .unwrap();
    let ca_before = fs::read_to_string(store.cluster_cert_path(&one)).unwrap();
    let a_before = fs::read_to_string(&a.chain).unwrap();
    let broken = a.chain.with_file_name("broken.pem");
    fs::create_dir(&broken).unwrap();
    assert!(store
        .rotate_cluster_ca(&one, Validity::days(90), &|_| None)
        .is_err());
    assert_eq!(
        fs::read_to_string(store.cluster_cert_path(&one)).unwrap(),
        ca_before
    );
    assert_eq!(fs::read_to_string(&a.chain).unwrap(), a_before);
    assert!(store.previous_cluster_cas(&one).unwrap().is_empty());
    fs::remove_dir(&broken).unwrap();

    // The archived key of the CA in force already there, as after a crash.
    let old_serial = serial_of(&ca_before);
    let previous = dir.join("clusters/one/previous");
    fs::create_dir_all(&previous).unwrap();
    let left = previous.join(format!("ca-{}.key", hex::encode(old_serial.as_bytes())));
    fs::copy(dir.join("clusters/one/ca.key"), &left).unwrap();
    let rotation = store
        .rotate_cluster_ca(&one, Validity::days(90), &|_| None)
        .unwrap();
    assert_eq!(rotation.old.serial, old_serial);
    assert_eq!(store.previous_cluster_cas(&one).unwrap().len(), 1);

    // Likewise for the root.
    let root_serial = serial_of(&fs::read_to_string(store.root_cert_path()).unwrap());
    fs::create_dir_all(dir.join("previous")).unwrap();
    fs::copy(
        dir.join("root-ca.key"),
        dir.join(format!(
            "previous/root-ca-{}.key",
            hex::encode(root_serial.as_bytes())
        )),
    )
    .unwrap();
    let rotation = store.rotate_root(Validity::days(365)).unwrap();
    assert_eq!(rotation.old.serial, root_serial);
    assert_eq!(store.previous_roots().unwrap().len(), 1);
    fs::remove_dir_all(dir).unwrap();
}

/// Found by the second review: a gateway's chain file (owned by the gateway's user)
/// replaced by another gateway's certificate, or one from outside, was re-issued as if
/// it were that gateway's: only a certificate of this cluster's CAs for that very name
/// is.
#[test]
fn a_cluster_ca_rotation_reissues_only_the_directorys_own_certificates() {
    let dir = temp_dir("rotate-ca-foreign");
    let store = CaDirectory::init(&dir, &td("mesh.test"), Validity::days(365)).unwrap();
    let one = cluster("one");
    store.issue_cluster_ca(&one, Validity::days(90)).unwrap();
    let a = store
        .issue_gateway(&one, &gw("a"), Validity::days(30))
        .unwrap();
    let b = store
        .issue_gateway(&one, &gw("b"), Validity::days(30))
        .unwrap();
    let c = store
        .issue_gateway(&one, &gw("c"), Validity::days(30))
        .unwrap();
    // b's file now holds a's certificate; c's, one of another mesh's CA for c.
    fs::copy(&a.chain, &b.chain).unwrap();
    let other = MeshRootCa::create(&td("mesh.test"), Validity::days(30))
        .unwrap()
        .issue_cluster_ca(&one, Validity::days(30))
        .unwrap()
        .issue_gateway(&gw("c"), Validity::days(30))
        .unwrap();
    fs::write(&c.chain, other.chain_pem()).unwrap();
    let rotation = store
        .rotate_cluster_ca(&one, Validity::days(90), &|_| None)
        .unwrap();
    let reissued: Vec<&str> = rotation.reissued.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(reissued, ["a"]);
    let skipped: Vec<&str> = rotation.skipped.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(skipped, ["b", "c"]);
    assert!(rotation.skipped[0]
        .3
        .contains("not a certificate of this cluster"));

    // A leaf of a rotated-out CA of the cluster is its own: a's first certificate,
    // put back, is re-issued by the next rotation.
    fs::copy(&b.chain, &a.chain).unwrap();
    let rotation = store
        .rotate_cluster_ca(&one, Validity::days(90), &|_| None)
        .unwrap();
    let reissued: Vec<&str> = rotation.reissued.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(reissued, ["a"]);
    fs::remove_dir_all(dir).unwrap();
}

/// Found by the second review: one archived CA that no longer loads made every CRL write
/// of its level fail, so nothing more could be revoked. Then (third review) an archived
/// CA whose key went away (moved offline) signed nothing, and what its last CRL revoked
/// was trusted again: that CRL is kept as it was.
#[test]
fn an_unreadable_archived_ca_does_not_stop_revocation() {
    let dir = temp_dir("crl-bad-archive");
    let store = CaDirectory::init(&dir, &td("mesh.test"), Validity::days(365)).unwrap();
    let one = cluster("one");
    store.issue_cluster_ca(&one, Validity::days(90)).unwrap();
    let a = store
        .issue_gateway(&one, &gw("a"), Validity::days(30))
        .unwrap();
    let old_a = fs::read_to_string(&a.chain).unwrap();
    store
        .rotate_cluster_ca(&one, Validity::days(90), &|_| None)
        .unwrap();
    let revoked = [serial_of(&old_a)];
    fs::write(dir.join("clusters/one/previous/ca-00.pem"), "garbage").unwrap();
    let written = store
        .write_crls(Some(&one), &revoked, 1, Validity::days(7))
        .unwrap();
    assert_eq!(
        written.signed, 2,
        "the CA in force and the loadable archived one"
    );
    assert_eq!(written.unreadable.len(), 1);
    assert_eq!(Crl::load_all(&written.path).unwrap().len(), 2);
    let refused = Verifier::of(&store, &a).accepts(&old_a, "a").unwrap_err();
    assert!(refused.to_lowercase().contains("revoked"), "{refused}");

    fs::remove_file(dir.join("clusters/one/previous/ca-00.pem")).unwrap();
    for entry in fs::read_dir(dir.join("clusters/one/previous")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "key") {
            fs::remove_file(path).unwrap();
        }
    }
    let written = store
        .write_crls(Some(&one), &revoked, 2, Validity::days(7))
        .unwrap();
    assert_eq!(written.signed, 1);
    assert_eq!(written.carried_over.len(), 1, "{written:?}");
    assert_eq!(Crl::load_all(&written.path).unwrap().len(), 2);
    let refused = Verifier::of(&store, &a).accepts(&old_a, "a").unwrap_err();
    assert!(refused.to_lowercase().contains("revoked"), "{refused}");
    fs::remove_dir_all(dir).unwrap();
}
