//! The gateway's IKEv2 with certificates (`[peers.esp.ike] auth = "certificate"`) against a
//! real strongSwan charon: certificates from the mesh CA (`isthmus-certs`), RFC 7427 ECDSA
//! signatures, the subject DN as the identity, the peer's SPIFFE ID (URI SAN) checked by
//! the gateway; IKE_AUTH over 1280 bytes sent in fragments (RFC 7383). Isthmus as
//! initiator and as responder; ping through the tunnel; a certificate from another CA
//! and a revoked one are refused.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use isthmus_certs::{ClusterCa, IssuedCertificate, MeshRootCa, Validity};
use isthmus_e2e::strongswan::{wait_ike, Charon};
use isthmus_e2e::traffic::wait_for_ping;
use isthmus_e2e::{EspPeerConfig, EspSettings, IsthmusGateway, KeyPair, Site, Topology, Underlay};
use isthmus_identity::{ClusterName, GatewayName, TrustDomain};

struct Pki {
    root: MeshRootCa,
    cluster: ClusterCa,
}

fn make_pki(trust_domain: &str) -> Pki {
    let td = TrustDomain::new(trust_domain).expect("trust domain");
    let root = MeshRootCa::create(&td, Validity::days(30)).expect("root");
    let cluster = root
        .issue_cluster_ca(&ClusterName::new("east").expect("name"), Validity::days(20))
        .expect("cluster CA");
    Pki { root, cluster }
}

fn issue(pki: &Pki, name: &str) -> IssuedCertificate {
    pki.cluster
        .issue_gateway(&GatewayName::new(name).expect("name"), Validity::days(10))
        .expect("leaf")
}

fn subject(cert: &IssuedCertificate) -> String {
    let der = cert.chain()[0].to_vec();
    let (_, c) = x509_parser::parse_x509_certificate(&der).expect("certificate");
    c.subject().to_string()
}

fn pem(der: &[u8]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out.into_bytes()
}

/// charon at `local` with certificate `me` (its CA chain from `pki`), its peer `peer_dn`.
fn start_charon(
    topo: &Topology,
    local: &Site,
    remote: &Site,
    label: &str,
    pki: &Pki,
    me: &IssuedCertificate,
    peer_dn: &str,
) -> Charon {
    let conf = format!(
        "connections {{\n  lab {{\n    version = 2\n    local_addrs = {la}\n    \
         remote_addrs = {ra}\n    local_port = 4500\n    remote_port = 4500\n    \
         proposals = aes256gcm16-prfsha256-ecp256\n    encap = yes\n    mobike = no\n    \
         dpd_delay = 0s\n    \
         local {{\n      auth = pubkey\n      certs = me.pem\n      id = \"{me_dn}\"\n    }}\n    \
         remote {{\n      auth = pubkey\n      id = \"{peer_dn}\"\n    }}\n    \
         children {{\n      net {{\n        mode = tunnel\n        \
         local_ts = {lp}\n        remote_ts = {rp}\n        esp_proposals = aes256gcm16\n      \
         }}\n    }}\n  }}\n}}\n",
        la = local.underlay_addr,
        ra = remote.underlay_addr,
        me_dn = subject(me),
        lp = local.workload_prefix,
        rp = remote.workload_prefix,
    );
    let files = [
        ("swanctl/x509/me.pem", pem(&me.chain()[0])),
        (
            "swanctl/x509ca/root.pem",
            pki.root.certificate_pem().into_bytes(),
        ),
        (
            "swanctl/x509ca/cluster.pem",
            pki.cluster.certificate_pem().into_bytes(),
        ),
        (
            "swanctl/private/me.pem",
            me.private_key_pem().as_bytes().to_vec(),
        ),
    ];
    Charon::start_with_files(topo.run(), &local.gw_ns, label, "", &conf, 4, &files).expect("charon")
}

/// Site 1's gateway with certificate `me`, trusting `pki`'s root (and `crl`, if any), its
/// IKE peer site 2 proving `remote_id`.
fn start_gateway(
    topo: &Topology,
    role: &str,
    pki: &Pki,
    me: &IssuedCertificate,
    remote_id: &str,
    crl: Option<String>,
) -> IsthmusGateway {
    let (local, remote) = (topo.site(1), topo.site(2));
    let write = |name: &str, contents: &[u8]| -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = topo.run().path(name);
        std::fs::write(&path, contents).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    };
    let chain = write("gw-chain.pem", me.chain_pem().as_bytes());
    let key = write("gw-key.pem", me.private_key_pem().as_bytes());
    let bundle = write("bundle.pem", pki.root.certificate_pem().as_bytes());
    let mut config = isthmus_e2e::mesh::isthmus_config(local, Vec::new());
    config.trailer.extend([
        "[identity]".to_string(),
        format!("trust_bundle = \"{}\"", bundle.display()),
        format!("certificate = \"{}\"", chain.display()),
        format!("private_key = \"{}\"", key.display()),
    ]);
    // CRLs come from a directory the gateway watches.
    let crls = crl_dir(topo);
    std::fs::create_dir_all(&crls).expect("CRL dir");
    config
        .trailer
        .push(format!("crls_dir = \"{}\"", crls.display()));
    if let Some(crl) = crl {
        std::fs::write(crls.join("cluster.crl.pem"), crl).expect("CRL");
    }
    let peer = EspPeerConfig {
        name: Some(format!("site-{}", remote.index)),
        endpoint: Some(remote.endpoint(4500).to_string()),
        allowed_prefixes: vec![remote.workload_prefix.clone()],
        esp_extra: vec![
            "[peers.esp.ike]".into(),
            format!("role = \"{role}\""),
            "auth = \"certificate\"".into(),
            format!("remote_id = \"{remote_id}\""),
            format!("local_prefixes = [\"{}\"]", local.workload_prefix),
            "dpd_seconds = 0".into(),
        ],
        ..EspPeerConfig::default()
    };
    let esp = EspSettings {
        listen_port: Some(4500),
        peers: vec![peer],
    };
    IsthmusGateway::start_with_esp(
        topo.run(),
        &local.gw_ns,
        &KeyPair::generate().expect("key"),
        &config,
        &esp,
    )
    .expect("gateway")
}

fn crl_dir(topo: &Topology) -> PathBuf {
    topo.run().path("crls")
}

fn pings_both_ways(s1: &Site, s2: &Site, logs: &dyn Fn() -> String) {
    for (from, to) in [(s1, s2), (s2, s1)] {
        assert!(
            wait_for_ping(
                &from.wl_ns,
                IpAddr::V4(to.workload_addr),
                Duration::from_secs(10)
            ),
            "workload {} cannot ping workload {}\n{}",
            from.index,
            to.index,
            logs()
        );
    }
}

#[test]
fn the_gateway_initiates_with_certificates_to_strongswan() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let (s1, s2) = (topo.site(1), topo.site(2));
    let pki = make_pki("ike-certs.test");
    let (gw1, gw2) = (issue(&pki, "gw1"), issue(&pki, "gw2"));
    let charon = start_charon(&topo, s2, s1, "g2", &pki, &gw2, &subject(&gw1));
    let gw = start_gateway(&topo, "initiator", &pki, &gw1, &gw2.id().to_string(), None);
    let logs = || format!("{}\n{}", gw.logs(), charon.log());
    let ike = wait_ike(&gw, |k| k.state == "established", Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(ike.established, 1);
    pings_both_ways(s1, s2, &logs);
    // charon checked our signature with our certificate's key.
    let proof = format!(
        "authentication of '{}' with ECDSA_WITH_SHA256_DER successful",
        subject(&gw1)
    );
    assert!(charon.log().contains(&proof), "{}", logs());
    // Our IKE_AUTH (two certificates) is over 1280 bytes: it went in IKE fragments
    // (RFC 7383), which charon put back together.
    assert!(
        charon.log().contains("reassembled fragmented IKE message"),
        "{}",
        logs()
    );
}

/// charon at site 2 initiates with `me`; the outcome of its `swanctl --initiate`.
fn charon_initiates(
    topo: &Topology,
    label: &str,
    pki: &Pki,
    me: &IssuedCertificate,
    peer_dn: &str,
) -> (Charon, Result<String>) {
    let (s1, s2) = (topo.site(1), topo.site(2));
    let charon = start_charon(topo, s2, s1, label, pki, me, peer_dn);
    let initiated = charon
        .swanctl(&["--initiate", "--child", "net", "--timeout", "10"])
        .context("initiate");
    (charon, initiated)
}

#[test]
fn strongswan_initiates_with_certificates_and_bad_ones_are_refused() {
    let topo = Topology::two_sites(Underlay::V4).expect("topology");
    let (s1, s2) = (topo.site(1), topo.site(2));
    let pki = make_pki("ike-certs.test");
    let (gw1, gw2, revoked) = (issue(&pki, "gw1"), issue(&pki, "gw2"), issue(&pki, "gw2"));
    let gw = start_gateway(&topo, "responder", &pki, &gw1, &gw2.id().to_string(), None);
    let gw1_dn = subject(&gw1);

    // The second certificate issued for gw2 gets in while nothing revokes it...
    let (mut before, initiated) = charon_initiates(&topo, "g2r", &pki, &revoked, &gw1_dn);
    initiated.unwrap_or_else(|e| panic!("{e}\n{}\n{}", gw.logs(), before.log()));
    wait_ike(&gw, |k| k.established == 1, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.logs()));
    before.kill();
    drop(before);
    // ...then a CRL of the cluster CA revoking it lands in the watched directory, and
    // the running gateway refuses it from then on.
    let crl = pki
        .cluster
        .crl(&[revoked.serial().clone()], 1, Validity::days(5))
        .expect("CRL")
        .to_pem();
    std::fs::write(crl_dir(&topo).join("cluster.crl.pem"), crl).expect("CRL");
    std::thread::sleep(Duration::from_millis(1500));
    let (bad, initiated) = charon_initiates(&topo, "g2a", &pki, &revoked, &gw1_dn);
    assert!(initiated.is_err(), "a revoked certificate got in");
    let ike = wait_ike(
        &gw,
        |k| {
            k.last_error
                .as_deref()
                .is_some_and(|e| e.contains("revoked"))
        },
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", gw.logs(), bad.log()));
    assert_eq!(ike.established, 1);
    drop(bad);

    // Another CA's certificate for the same name.
    let other = make_pki("ike-certs.test");
    let stranger = issue(&other, "gw2");
    let (bad, initiated) = charon_initiates(&topo, "g2b", &other, &stranger, &gw1_dn);
    assert!(initiated.is_err(), "a certificate of another CA got in");
    let ike = wait_ike(
        &gw,
        |k| {
            k.last_error
                .as_deref()
                .is_some_and(|e| e.contains("unknown CA"))
        },
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", gw.logs(), bad.log()));
    assert_eq!(ike.established, 1);
    drop(bad);

    // The real gw2 gets in; traffic flows.
    let (charon, initiated) = charon_initiates(&topo, "g2c", &pki, &gw2, &gw1_dn);
    initiated.unwrap_or_else(|e| panic!("{e}\n{}\n{}", gw.logs(), charon.log()));
    let ike = wait_ike(&gw, |k| k.established == 2, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.logs()));
    assert_eq!(
        (ike.role.as_str(), ike.state.as_str()),
        ("responder", "established")
    );
    pings_both_ways(s1, s2, &|| format!("{}\n{}", gw.logs(), charon.log()));
}
