//! Helpers shared by the gateway's integration tests.

use std::fs;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// A temporary directory removed when dropped, also when a test panics.
#[allow(dead_code)]
pub struct TempDir(pub PathBuf);

#[allow(dead_code)]
impl TempDir {
    /// A new, empty directory named after the test, the process and the time.
    pub fn new(name: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "isthmus-gateway-test-{name}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).expect("creating a temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A minimal status document, as a gateway with no peers answers.
#[allow(dead_code)]
pub fn status_document() -> isthmus_gateway::admin::Status {
    serde_json::from_value(serde_json::json!({
        "interface": "ist-test",
        "public_key": "pub",
        "listen_port": 51820,
        "mtu": 1420,
        "offload": false,
        "drops": {"no_route": 0, "malformed": 0, "unknown_peer": 0},
        "peers": [],
    }))
    .expect("a status document")
}
