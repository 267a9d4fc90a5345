//! Network namespaces: RAII creation/deletion and running code or commands inside them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Output;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// A named network namespace (`ip netns add`). Dropping it kills every process still in it and
/// deletes it, also while a failing test unwinds.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and sets its loopback up.
    pub fn new(name: &str) -> Result<Self> {
        cmd::run("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME args…`, checked.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        ip(&self.name, args)
    }

    /// `ip netns exec NAME program args…`, checked; returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        exec(&self.name, program, args)
    }

    /// `ip netns exec NAME program args…`, unchecked.
    pub fn exec_output(&self, program: &str, args: &[&str]) -> Result<Output> {
        exec_output(&self.name, program, args)
    }

    /// Runs `f` on a new thread that has entered this namespace.
    pub fn spawn<F, T>(&self, f: F) -> JoinHandle<Result<T>>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        spawn_in(&self.name, f)
    }

    /// Runs `f` on a thread inside this namespace and waits for it.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        run_in(&self.name, f)
    }

    /// Pids of the processes in the namespace.
    pub fn pids(&self) -> Vec<i32> {
        pids(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let me = std::process::id() as i32;
        for pid in pids(&self.name) {
            if pid != me && pid > 1 {
                // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        if let Err(e) = cmd::run("ip", &["netns", "del", &self.name]) {
            eprintln!("isthmus-e2e: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// `ip -n NS args…`, checked.
pub fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    cmd::run("ip", &full)
}

/// `ip netns exec NS program args…`, checked; returns stdout.
pub fn exec(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let full = exec_args(ns, program, args);
    cmd::run("ip", &full)
}

/// `ip netns exec NS program args…`, unchecked.
pub fn exec_output(ns: &str, program: &str, args: &[&str]) -> Result<Output> {
    let full = exec_args(ns, program, args);
    cmd::output("ip", &full)
}

fn exec_args<'a>(ns: &'a str, program: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    full
}

/// Pids of the processes whose network namespace is `ns`.
pub fn pids(ns: &str) -> Vec<i32> {
    cmd::output("ip", &["netns", "pids", ns])
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a namespace called `ns` exists.
pub fn exists(ns: &str) -> bool {
    std::path::Path::new("/var/run/netns").join(ns).exists()
}

/// Moves the calling thread into the network namespace `ns`.
///
/// Only the calling thread changes namespace; sockets it creates afterwards belong to `ns` for
/// their whole life, whichever thread uses them later.
pub fn enter(ns: &str) -> Result<()> {
    let path = std::path::Path::new("/var/run/netns").join(ns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: `file` is an open descriptor of a network-namespace file that stays open for the
    // duration of the call; setns(2) with CLONE_NEWNET only changes this thread's network
    // namespace and touches no memory of ours.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns({}) failed: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Runs `f` on a new thread that first enters the network namespace `ns`.
pub fn spawn_in<F, T>(ns: &str, f: F) -> JoinHandle<Result<T>>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let ns = ns.to_string();
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            enter(&ns)?;
            f()
        })
        .expect("spawning a thread")
}

/// Runs `f` on a thread inside `ns` and waits for its result.
pub fn run_in<F, T>(ns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    join(spawn_in(ns, f))
}

/// Joins a thread started by [`spawn_in`], turning a panic into an error.
pub fn join<T>(handle: JoinHandle<Result<T>>) -> Result<T> {
    match handle.join() {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            bail!("thread panicked: {msg}")
        }
    }
}
