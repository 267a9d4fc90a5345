//! A test run: a short random id that prefixes every name, and a temp dir for files and logs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand_core::{OsRng, RngCore};

/// Prefix of every name this harness creates (namespaces, interfaces, sockets).
pub const NAME_PREFIX: &str = "is";

/// Linux limit on interface names (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// One test run. Dropping it removes its temp dir (kept when the thread is panicking, so the
/// logs of a failed test can be read) and any UAPI/admin socket files left behind under its
/// names.
#[derive(Debug)]
pub struct Run {
    id: String,
    dir: PathBuf,
}

impl Run {
    /// Creates a run with a fresh id that no existing namespace or socket uses.
    pub fn new() -> Result<Self> {
        for _ in 0..16 {
            let id = format!("{:06x}", OsRng.next_u32() & 0x00ff_ffff);
            let prefix = format!("{NAME_PREFIX}{id}");
            if name_in_use(&prefix) {
                continue;
            }
            let dir = std::env::temp_dir().join(format!("isthmus-e2e-{id}"));
            if dir.exists() {
                continue;
            }
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating run dir {}", dir.display()))?;
            return Ok(Run { id, dir });
        }
        bail!("could not find an unused run id")
    }

    /// The random hex id (6 characters).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The run's private temp dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A path inside the run dir.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// `"is" + id + suffix`: a name unique to this run (for namespaces; any length).
    pub fn name(&self, suffix: &str) -> String {
        format!("{NAME_PREFIX}{}{suffix}", self.id)
    }

    /// Like [`Run::name`] but checked against the 15-character interface name limit.
    pub fn ifname(&self, suffix: &str) -> Result<String> {
        let name = self.name(suffix);
        if name.len() > IFNAME_MAX {
            bail!("interface name {name:?} is longer than {IFNAME_MAX} characters");
        }
        Ok(name)
    }
}

fn name_in_use(prefix: &str) -> bool {
    ["/var/run/netns", "/var/run/wireguard", "/var/run/isthmus"]
        .iter()
        .any(|dir| {
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with(prefix))
                })
                .unwrap_or(false)
        })
}

impl Drop for Run {
    fn drop(&mut self) {
        // Socket files of processes that were killed hard would make a later run with the same
        // names fail ("unix socket in use"); our names are unique, but keep /var/run tidy.
        let prefix = self.name("");
        for dir in ["/var/run/wireguard", "/var/run/isthmus"] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.starts_with(&prefix) && name.ends_with(".sock") {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        if std::thread::panicking() || std::env::var_os("ISTHMUS_E2E_KEEP").is_some() {
            eprintln!(
                "isthmus-e2e: keeping run dir {} for inspection",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
