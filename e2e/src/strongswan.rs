//! A real strongSwan charon (Debian's 5.9, kernel-libipsec: ESP in userspace over a TUN
//! device) in a gateway namespace, as an IKEv2 interop peer.
//!
//! charon's pid file path is compiled in, so each instance runs in a private mount
//! namespace with the run dir's own directory mounted over `/run`; its configuration,
//! VICI socket and log are in the run dir too. The log is written with `ike = 4` and
//! `chd = 4`, which print the IKE and CHILD_SA keys: test keys only, in the run dir,
//! which lets a test compare them with what Isthmus derived.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::ProcessGuard;
use crate::run::Run;

/// The charon binary of Debian's strongswan-charon.
pub const CHARON: &str = "/usr/lib/ipsec/charon";

/// A running charon.
#[derive(Debug)]
pub struct Charon {
    dir: PathBuf,
    process: ProcessGuard,
}

/// Whether strongSwan is installed (scripts/setup.sh installs it).
pub fn available() -> bool {
    Path::new(CHARON).exists()
}

impl Charon {
    /// Starts charon in `ns` with `strongswan_extra` added to its `charon { }` section and
    /// loads `swanctl_conf` (the text of a swanctl.conf).
    pub fn start(
        run: &Run,
        ns: &str,
        label: &str,
        strongswan_extra: &str,
        swanctl_conf: &str,
    ) -> Result<Self> {
        if !available() {
            bail!("{CHARON} is missing: run scripts/setup.sh (strongswan-charon)");
        }
        let dir = run.path(&format!("charon-{label}"));
        for sub in ["run", "swanctl/x509", "swanctl/x509ca", "swanctl/private"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let d = dir.display();
        std::fs::write(
            dir.join("strongswan.conf"),
            format!(
                "charon {{\n  load_modular = no\n  load = random nonce aes gcm openssl curve25519 \
                 sha1 sha2 hmac kdf pem pkcs1 pkcs8 pubkey x509 constraints kernel-libipsec \
                 kernel-netlink socket-default vici\n  install_routes = yes\n  \
                 plugins {{ vici {{ socket = unix://{d}/charon.vici }} }}\n  \
                 filelog {{ test {{ path = {d}/charon.log\n time_format = %T\n time_add_ms = yes\n \
                 flush_line = yes\n default = 1\n ike = 4\n chd = 4\n cfg = 2 }} }}\n  \
                 syslog {{ daemon {{ default = -1 }} }}\n  {strongswan_extra}\n}}\n\
                 swanctl {{\n  load = pem pkcs1 pkcs8 x509 pubkey openssl random\n  \
                 socket = unix://{d}/charon.vici\n}}\n"
            ),
        )?;
        std::fs::write(dir.join("swanctl/swanctl.conf"), swanctl_conf)?;
        let script = format!(
            "mount --bind {d}/run /run && STRONGSWAN_CONF={d}/strongswan.conf exec {CHARON}"
        );
        let process = ProcessGuard::spawn(
            run,
            &format!("charon-{label}"),
            Some(ns),
            "unshare",
            &["-m", "--propagation", "private", "sh", "-c", &script],
            &[],
        )?;
        let charon = Self { dir, process };
        let deadline = Instant::now() + Duration::from_secs(10);
        while charon.swanctl(&["--stats"]).is_err() {
            if Instant::now() > deadline {
                bail!("charon did not open its VICI socket:\n{}", charon.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let conf = charon.dir.join("swanctl/swanctl.conf");
        charon
            .swanctl(&["--load-all", "--file", &conf.to_string_lossy()])
            .context("swanctl --load-all")?;
        Ok(charon)
    }

    /// The configuration directory (`swanctl/x509`, `x509ca`, `private` for credentials).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `swanctl ARGS` against this charon; its output, or an error with it.
    pub fn swanctl(&self, args: &[&str]) -> Result<String> {
        let vici = format!("unix://{}/charon.vici", self.dir.display());
        let out = std::process::Command::new("swanctl")
            .args(args)
            .args(["-u", &vici])
            .env("STRONGSWAN_CONF", self.dir.join("strongswan.conf"))
            .output()
            .context("running swanctl")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("swanctl {args:?} failed: {text}");
        }
        Ok(text)
    }

    /// charon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("charon.log")).unwrap_or_default()
    }

    /// Every value charon logged under `label` (its `%B` dumps: `label => N bytes @ …`
    /// followed by hex rows), in order.
    pub fn logged(&self, label: &str) -> Vec<Vec<u8>> {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let mut out = Vec::new();
        let marker = format!("] {label} => ");
        for (i, line) in lines.iter().enumerate() {
            let Some(at) = line.find(&marker) else {
                continue;
            };
            let Some(n) = line[at + marker.len()..]
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            let mut bytes = Vec::with_capacity(n);
            for row in &lines[i + 1..] {
                if bytes.len() >= n {
                    break;
                }
                // "... <lab|1>    0: AB CD ...  ascii"
                let Some(colon) = row.find(": ") else { break };
                let hex: String = row[colon + 2..]
                    .split_whitespace()
                    .take_while(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
                    .collect();
                let Ok(chunk) = hex_decode(&hex) else { break };
                if chunk.is_empty() {
                    break;
                }
                bytes.extend(chunk);
            }
            bytes.truncate(n);
            out.push(bytes);
        }
        out
    }

    /// Whether charon is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

fn hex_decode(s: &str) -> Result<Vec<u8>> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).context("hex"))
        .collect()
}
