//! Shared fixtures: a mesh PKI, channel configs, one-shot connection attempts over
//! loopback TCP, and a log capture.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use isthmus_certs::{ClusterCa, IssuedCertificate, MeshRootCa, Validity};
use isthmus_identity::{
    ChannelConfig, ChannelError, ChannelEvent, ChannelListener, ChannelTiming, ClusterName,
    Established, GatewayId, GatewayName, LinkParams, MeshTrust, PeerChannel, PeerEndpoint,
    SpiffeId, TrustDomain, TunnelParams,
};

pub const DAY: Duration = Duration::from_secs(86_400);

/// A mesh root whose validity comfortably covers back-dated test leaves.
pub struct Mesh {
    pub td: TrustDomain,
    pub root: MeshRootCa,
}

impl Mesh {
    pub fn new(td: &str) -> Self {
        let td = TrustDomain::new(td).unwrap();
        let now = SystemTime::now();
        let root = MeshRootCa::create(&td, Validity::new(now - 30 * DAY, now + 365 * DAY).unwrap())
            .unwrap();
        Self { td, root }
    }

    pub fn cluster(&self, name: &str) -> ClusterCa {
        let now = SystemTime::now();
        self.root
            .issue_cluster_ca(
                &ClusterName::new(name).unwrap(),
                Validity::new(now - 20 * DAY, now + 300 * DAY).unwrap(),
            )
            .unwrap()
    }

    pub fn trust(&self) -> MeshTrust {
        MeshTrust {
            roots: vec![self.root.certificate().clone()],
            crls: vec![],
        }
    }

    pub fn id(&self, cluster: &str, gateway: &str) -> SpiffeId {
        GatewayId::new(
            self.td.clone(),
            ClusterName::new(cluster).unwrap(),
            GatewayName::new(gateway).unwrap(),
        )
        .spiffe_id()
    }
}

pub fn issue(ca: &ClusterCa, name: &str) -> IssuedCertificate {
    ca.issue_gateway(&GatewayName::new(name).unwrap(), Validity::days(30))
        .unwrap()
}

pub fn issue_valid(
    ca: &ClusterCa,
    name: &str,
    from: SystemTime,
    to: SystemTime,
) -> IssuedCertificate {
    ca.issue_gateway(
        &GatewayName::new(name).unwrap(),
        Validity::new(from, to).unwrap(),
    )
    .unwrap()
}

pub fn params(n: u8) -> TunnelParams {
    TunnelParams {
        wireguard_public_key: Some([n; 32]),
        wireguard_endpoint: Some(SocketAddr::from(([192, 0, 2, n], 51820))),
        esp_endpoint: Some(SocketAddr::from(([198, 51, 100, n], 4500))),
        esp_inbound_spi: Some(0x100 + u32::from(n)),
        mtu: 1400 + u16::from(n),
        wireguard_keys: None,
    }
}

/// Allowed peers, all on WireGuard links.
pub fn wg(ids: Vec<SpiffeId>) -> Vec<(SpiffeId, LinkParams)> {
    ids.into_iter()
        .map(|id| (id, LinkParams::Wireguard))
        .collect()
}

/// A WireGuard link to `id` at `addr`.
pub fn endpoint(id: SpiffeId, addr: SocketAddr) -> PeerEndpoint {
    PeerEndpoint {
        id,
        addr,
        link: LinkParams::Wireguard,
    }
}

pub fn timing() -> ChannelTiming {
    ChannelTiming {
        handshake_timeout: Duration::from_secs(5),
        ping_interval: Duration::from_millis(100),
        missed_pings: 3,
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    }
}

pub fn config(issued: &IssuedCertificate, trust: &MeshTrust, n: u8) -> Arc<ChannelConfig> {
    Arc::new(
        ChannelConfig::new(issued.credentials().unwrap(), trust, params(n))
            .unwrap()
            .with_timing(timing()),
    )
}

/// The result of one dial against a background listener.
pub struct Attempt {
    pub listen_addr: SocketAddr,
    pub client: Result<Established, ChannelError>,
    pub client_events: Receiver<ChannelEvent>,
    pub server_events: Vec<ChannelEvent>,
}

/// Runs a listener (accept loop) allowing `allowed`, dials it expecting `expect_server`,
/// and collects what both sides report.
pub fn attempt(
    server: Arc<ChannelConfig>,
    allowed: Vec<SpiffeId>,
    client: &ChannelConfig,
    expect_server: SpiffeId,
) -> Attempt {
    let (stx, srx) = mpsc::channel();
    let listener = ChannelListener::bind(server, "127.0.0.1:0".parse().unwrap(), wg(allowed))
        .unwrap()
        .spawn(stx)
        .unwrap();
    let listen_addr = listener.local_addr();
    let (ctx, crx) = mpsc::channel();
    let client_result = PeerChannel::connect(
        client,
        &PeerEndpoint {
            id: expect_server,
            addr: listen_addr,
            link: LinkParams::Wireguard,
        },
        ctx,
    );
    let mut server_events = Vec::new();
    if let Ok(ev) = srx.recv_timeout(Duration::from_secs(5)) {
        server_events.push(ev);
    }
    // Anything else the server might report shortly after.
    std::thread::sleep(Duration::from_millis(100));
    server_events.extend(srx.try_iter());
    listener.shutdown();
    Attempt {
        listen_addr,
        client: client_result,
        client_events: crx,
        server_events,
    }
}

// ---- log capture -------------------------------------------------------------------

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once per test binary) a global subscriber capturing every event at TRACE.
pub fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
}

/// Everything captured so far.
pub fn captured() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}
