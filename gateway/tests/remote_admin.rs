//! Remote administration over mTLS: the real `isthmusctl --remote` against the
//! gateway's remote admin server on loopback TCP. Only an administrator
//! certificate of an allowed cluster gets an answer; a gateway's certificate,
//! another cluster's administrator and a revoked administrator are refused in
//! the TLS handshake (no command reaches the handler).

mod common;

use common::{status_document, TempDir};
use isthmus_certs::{ClusterCa, LeafKind, MeshRootCa, Serial, Validity};
use isthmus_gateway::remote_admin::RemoteAdminServer;
use isthmus_identity::{
    ChannelConfig, ClusterName, GatewayName, MeshTrust, PeerPolicy, TrustDomain, TunnelParams,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const TD: &str = "mesh.test";

struct Pki {
    root: MeshRootCa,
    a: ClusterCa,
    b: ClusterCa,
    dir: TempDir,
}

impl Pki {
    fn new(name: &str) -> Self {
        let td = TrustDomain::new(TD).expect("test set-up");
        let root = MeshRootCa::create(&td, Validity::days(30)).expect("test set-up");
        let cluster = |c: &str| {
            root.issue_cluster_ca(
                &ClusterName::new(c).expect("test set-up"),
                Validity::days(30),
            )
            .expect("test set-up")
        };
        let (a, b) = (cluster("a"), cluster("b"));
        let dir = TempDir::new(name);
        std::fs::write(dir.0.join("bundle.pem"), root.certificate_pem()).expect("test set-up");
        Self { root, a, b, dir }
    }

    /// Issues a leaf; returns (chain file, key file, serial).
    fn leaf(&self, ca: &ClusterCa, kind: LeafKind, name: &str) -> (PathBuf, PathBuf, Serial) {
        let issued = ca
            .issue_leaf(
                kind,
                &GatewayName::new(name).expect("test set-up"),
                Validity::days(7),
            )
            .expect("test set-up");
        let chain = self.dir.0.join(format!("{name}.pem"));
        let key = self.dir.0.join(format!("{name}.key"));
        issued.save(&chain, &key).expect("test set-up");
        (chain, key, issued.serial().clone())
    }

    fn trust(
        &self,
        crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
    ) -> MeshTrust {
        MeshTrust {
            roots: vec![self.root.certificate().clone()],
            crls,
        }
    }
}

/// A remote admin server on loopback presenting `chain`/`key`, letting cluster a's
/// administrators in, answering `status` with a status document (anything else
/// with `{}`); counts the commands that reach it.
struct Served {
    server: RemoteAdminServer,
    config: Arc<ChannelConfig>,
    count: Arc<AtomicUsize>,
}

impl Served {
    fn start(pki: &Pki, chain: &Path, key: &Path) -> Self {
        let config = Arc::new(
            ChannelConfig::new(
                isthmus_certs::files::load_credentials(chain, key).expect("test set-up"),
                &pki.trust(vec![]),
                TunnelParams::without_tunnels(1420),
            )
            .expect("test set-up"),
        );
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        let server = RemoteAdminServer::start(
            "127.0.0.1:0".parse().expect("test set-up"),
            config.clone(),
            PeerPolicy::AdminOfClusters(
                TrustDomain::new(TD).expect("test set-up"),
                vec![ClusterName::new("a").expect("test set-up")],
            ),
            Arc::new(move |command: &str| {
                counter.fetch_add(1, Ordering::SeqCst);
                Some(if command == "status" {
                    serde_json::to_string(&status_document()).expect("status")
                } else {
                    "{}".into()
                })
            }),
        )
        .expect("test set-up");
        Self {
            server,
            config,
            count,
        }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// A TCP connection to `to` from source address `from` (any port); None if
/// the source cannot be bound.
fn socket2_bind_connect(from: &str, to: std::net::SocketAddr) -> Option<std::net::TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    let from: std::net::SocketAddr = format!("{from}:0").parse().ok()?;
    sock.bind(&from.into()).ok()?;
    sock.connect(&to.into()).ok()?;
    Some(sock.into())
}

/// Sends `status` over TLS with ALPN isthmus-admin/1 and these credentials,
/// accepting any server of the mesh: what the gateway alone decides.
fn raw_client(
    addr: std::net::SocketAddr,
    pki: &Pki,
    chain: &Path,
    key: &Path,
) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let tls = isthmus_identity::MeshTls::new(
        isthmus_certs::files::load_credentials(chain, key).expect("test set-up"),
        &pki.trust(vec![]),
    )
    .expect("test set-up");
    let config = tls
        .client_config(
            PeerPolicy::AnyGateway(TrustDomain::new(TD).expect("test set-up")),
            isthmus_gateway::admin::ADMIN_ALPN,
        )
        .expect("test set-up");
    let sock = std::net::TcpStream::connect(addr)?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(conn, sock);
    stream.write_all(b"status\n")?;
    stream.flush()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::other("no answer"));
    }
    Ok(answer)
}

/// `isthmusctl status --remote ADDR` with this administrator's files: (exit 0, output).
fn remote_status(
    addr: std::net::SocketAddr,
    bundle: &Path,
    cert: &Path,
    key: &Path,
) -> (bool, String) {
    remote_status_of(addr, bundle, cert, key, &[])
}

/// The same with more arguments (`--server-id ...`).
fn remote_status_of(
    addr: std::net::SocketAddr,
    bundle: &Path,
    cert: &Path,
    key: &Path,
    more: &[&str],
) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_isthmusctl"))
        .args(["status", "--output", "json", "--remote", &addr.to_string()])
        .args(more)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--bundle")
        .arg(bundle)
        .output()
        .expect("test set-up");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn only_an_administrator_of_an_allowed_cluster_gets_an_answer() {
    let pki = Pki::new("remote-admin");
    let (gw_chain, gw_key, _) = pki.leaf(&pki.a, LeafKind::Gateway, "gw");
    let served = Served::start(&pki, &gw_chain, &gw_key);
    let (addr, config) = (served.server.local_addr(), served.config.clone());
    let bundle = pki.dir.0.join("bundle.pem");

    let (alice_chain, alice_key, alice_serial) = pki.leaf(&pki.a, LeafKind::Admin, "alice");
    let (ok, said) = remote_status(addr, &bundle, &alice_chain, &alice_key);
    assert!(ok, "{said}");
    let doc: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert_eq!(doc["interface"], "ist-test");
    assert_eq!(served.count(), 1);
    let answer = raw_client(addr, &pki, &alice_chain, &alice_key).unwrap();
    assert!(answer.contains("ist-test"), "{answer}");
    assert_eq!(served.count(), 2);

    // Idle connections from one address cannot take every slot.
    let idle: Vec<std::net::TcpStream> = (0..8)
        .filter_map(|_| {
            let sock = socket2_bind_connect("127.0.0.2", addr)?;
            Some(sock)
        })
        .collect();
    assert!(!idle.is_empty());
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (ok, said) = remote_status(addr, &bundle, &alice_chain, &alice_key);
    assert!(ok, "idle clients held every slot: {said}");
    drop(idle);
    assert_eq!(served.count(), 3);

    // A gateway of the same cluster is not an administrator.
    let (other_chain, other_key, _) = pki.leaf(&pki.a, LeafKind::Gateway, "other");
    // Another cluster's administrator.
    let (bob_chain, bob_key, _) = pki.leaf(&pki.b, LeafKind::Admin, "bob");
    // A certificate from another mesh altogether.
    let stranger_root =
        MeshRootCa::create(&TrustDomain::new(TD).unwrap(), Validity::days(30)).unwrap();
    let stranger_ca = stranger_root
        .issue_cluster_ca(&ClusterName::new("a").unwrap(), Validity::days(30))
        .unwrap();
    let (eve_chain, eve_key, _) = pki.leaf(&stranger_ca, LeafKind::Admin, "eve");
    for (who, chain, key) in [
        ("a gateway", &other_chain, &other_key),
        ("cluster b's administrator", &bob_chain, &bob_key),
        ("another mesh's administrator", &eve_chain, &eve_key),
    ] {
        let (ok, said) = remote_status(addr, &bundle, chain, key);
        assert!(!ok, "{who} got an answer: {said}");
        assert!(said.contains("isthmusctl:"), "{who}: {said}");
        // And a client that does not check itself: the gateway refuses it.
        let answer = raw_client(addr, &pki, chain, key);
        assert!(answer.is_err(), "{who} got an answer: {answer:?}");
    }
    assert_eq!(served.count(), 3, "no refused client reached the handler");

    // Alice revoked: a CRL put in force on the running server refuses her next time.
    let crl = pki
        .a
        .crl(std::slice::from_ref(&alice_serial), 1, Validity::days(7))
        .unwrap();
    config
        .reload_trust(&pki.trust(vec![crl.der().clone()]))
        .unwrap();
    let (ok, said) = remote_status(addr, &bundle, &alice_chain, &alice_key);
    assert!(!ok, "a revoked administrator got an answer: {said}");
    let (carol_chain, carol_key, _) = pki.leaf(&pki.a, LeafKind::Admin, "carol");
    let (ok, said) = remote_status(addr, &bundle, &carol_chain, &carol_key);
    assert!(ok, "{said}");
    assert_eq!(served.count(), 4);
}

#[test]
fn the_client_refuses_a_server_that_is_not_a_gateway_of_the_mesh() {
    // The "gateway" presents an administrator certificate: isthmusctl must not send
    // its command to it.
    let pki = Pki::new("remote-admin-server");
    let (fake_chain, fake_key, _) = pki.leaf(&pki.a, LeafKind::Admin, "fake");
    let served = Served::start(&pki, &fake_chain, &fake_key);
    let bundle = pki.dir.0.join("bundle.pem");
    let (alice_chain, alice_key, _) = pki.leaf(&pki.a, LeafKind::Admin, "alice");
    let (ok, said) = remote_status(
        served.server.local_addr(),
        &bundle,
        &alice_chain,
        &alice_key,
    );
    assert!(!ok, "{said}");
    assert_eq!(served.count(), 0);
}

/// Without --server-id the client accepts only a gateway of its own cluster; with it,
/// exactly that gateway. Commands only the local socket serves are refused remotely
/// before they reach the handler.
#[test]
fn the_client_wants_its_own_clusters_gateway_and_only_some_commands_go_remote() {
    let pki = Pki::new("remote-admin-scope");
    let (gw_chain, gw_key, _) = pki.leaf(&pki.b, LeafKind::Gateway, "gw");
    // Cluster b's gateway lets cluster a's administrators in.
    let served = Served::start(&pki, &gw_chain, &gw_key);
    let addr = served.server.local_addr();
    let bundle = pki.dir.0.join("bundle.pem");
    let (alice_chain, alice_key, _) = pki.leaf(&pki.a, LeafKind::Admin, "alice");
    let (ok, said) = remote_status(addr, &bundle, &alice_chain, &alice_key);
    assert!(!ok, "a gateway of another cluster was trusted: {said}");
    let (ok, said) = remote_status_of(
        addr,
        &bundle,
        &alice_chain,
        &alice_key,
        &["--server-id", "spiffe://mesh.test/cluster/b/gateway/gw"],
    );
    assert!(ok, "{said}");
    assert_eq!(served.count(), 1);

    let target = isthmus_gateway::admin::RemoteTarget::new(
        addr,
        isthmus_certs::files::load_credentials(&alice_chain, &alice_key).unwrap(),
        &pki.trust(vec![]),
        Some("spiffe://mesh.test/cluster/b/gateway/gw".parse().unwrap()),
    )
    .unwrap();
    for command in ["egress-drain", "mesh-clusters"] {
        let got = isthmus_gateway::admin::fetch::<serde_json::Value>(&target, command);
        let Err(isthmus_gateway::admin::AdminError::Refused { message, .. }) = got else {
            panic!("{command}: {got:?}");
        };
        assert!(message.contains("not served remotely"), "{message}");
    }
    assert_eq!(served.count(), 1, "refused before the handler");
}
