//! Real etcd members for tests: one or three `etcd` processes on free loopback ports,
//! each with its own data directory under a unique temporary folder. Dropping the
//! cluster (also while a test panics) kills every member and removes the folder.
//!
//! Needs the `etcd` binary (Debian package `etcd-server`); `ISTHMUS_ETCD` overrides the
//! path.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a member (or the whole cluster) may take to answer after a start.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);

/// Attempts with fresh ports when a first start fails (a port taken in between).
const START_ATTEMPTS: usize = 3;

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// One etcd cluster of 1 or more members on loopback.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
}

fn etcd_binary() -> String {
    std::env::var("ISTHMUS_ETCD").unwrap_or_else(|_| "etcd".to_string())
}

/// Free loopback ports: all bound at once (so they differ), then released for etcd.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn unique_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "isthmus-etcd-{}-{}-{nanos:x}",
        std::process::id(),
        RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

impl EtcdCluster {
    /// Starts a single member.
    pub async fn single() -> Self {
        Self::start(1).await
    }

    /// Starts `n` members forming one cluster and waits until every one answers a
    /// linearizable read (so a leader is elected).
    pub async fn start(n: usize) -> Self {
        let name = unique_name();
        let dir = std::env::temp_dir().join(&name);
        let mut last_failure = String::new();
        for attempt in 0..START_ATTEMPTS {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create the test folder");
            let ports = free_ports(2 * n);
            let members = (0..n)
                .map(|i| {
                    let member_dir = dir.join(format!("m{i}"));
                    std::fs::create_dir_all(&member_dir).expect("member folder");
                    Member {
                        name: format!("m{i}"),
                        client_port: ports[2 * i],
                        peer_port: ports[2 * i + 1],
                        data_dir: member_dir.join("data"),
                        log: member_dir.join("etcd.log"),
                        child: None,
                    }
                })
                .collect();
            let mut cluster = EtcdCluster {
                dir: dir.clone(),
                token: format!("{name}-{attempt}"),
                members,
            };
            for i in 0..n {
                cluster.spawn(i);
            }
            match cluster.wait_healthy_all().await {
                Ok(()) => return cluster,
                Err(e) => {
                    last_failure = e;
                    // Drop kills the members and removes the folder.
                    drop(cluster);
                }
            }
        }
        panic!("etcd did not start in {START_ATTEMPTS} attempts: {last_failure}");
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, url(m.peer_port)))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) {
        let initial_cluster = self.initial_cluster();
        let token = self.token.clone();
        let m = &mut self.members[i];
        assert!(m.child.is_none(), "member {} already runs", m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("member log");
        let log2 = log.try_clone().expect("member log");
        let child = Command::new(etcd_binary())
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(url(m.client_port))
            .arg("--advertise-client-urls")
            .arg(url(m.client_port))
            .arg("--listen-peer-urls")
            .arg(url(m.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(url(m.peer_port))
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(token)
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (Debian package etcd-server): {e}",
                    etcd_binary()
                )
            });
        m.child = Some(child);
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        url(self.members[i].client_port)
    }

    /// The client URLs of all members.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Kills member `i` (SIGKILL, as a crash) and waits for it to exit.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory and waits until it answers.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        if let Err(e) = self.wait_healthy(i).await {
            panic!("restarted member did not come back: {e}");
        }
    }

    /// Starts member `i` again on its data directory but listening for clients on
    /// another free port (clients configured with the old endpoint cannot reach it);
    /// returns the new endpoint. A later [`EtcdCluster::restart_on_port`] moves it back.
    pub async fn restart_on_port(&mut self, i: usize, port: u16) -> String {
        self.members[i].client_port = port;
        self.restart(i).await;
        self.endpoint(i)
    }

    /// The client port of member `i`.
    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client_port
    }

    /// A currently free loopback port.
    pub fn free_port() -> u16 {
        free_ports(1)[0]
    }

    async fn wait_healthy_all(&mut self) -> Result<(), String> {
        for i in 0..self.members.len() {
            self.wait_healthy(i).await?;
        }
        Ok(())
    }

    /// Waits until member `i` serves a linearizable read (it has a leader).
    async fn wait_healthy(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        let endpoint = self.endpoint(i);
        let mut last = String::from("no answer yet");
        while Instant::now() < deadline {
            if let Some(child) = self.members[i].child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.members[i].child = None;
                    return Err(format!(
                        "member {i} exited ({status}): {}",
                        tail(&self.members[i].log)
                    ));
                }
            }
            let probe = async {
                let opts = etcd_client::ConnectOptions::new()
                    .with_connect_timeout(Duration::from_millis(500));
                let mut client = etcd_client::Client::connect([endpoint.as_str()], Some(opts))
                    .await
                    .map_err(|e| e.to_string())?;
                client
                    .get("/health-probe", None)
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(Duration::from_secs(2), probe).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => last = e,
                Err(_) => last = "probe timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "member {i} not healthy within {HEALTHY_WITHIN:?} ({last}): {}",
            tail(&self.members[i].log)
        ))
    }
}

fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
