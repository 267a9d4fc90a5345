//! Long-running processes (gateways, captures, iperf3 servers) with captured output.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::run::Run;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// How long [`ProcessGuard::stop`] waits after SIGTERM before sending SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A child process, optionally inside a network namespace, whose stdout and stderr go to files in
/// the run dir. Dropping it stops it (SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]) and reaps it;
/// if the thread is panicking, its output is printed to help debugging.
#[derive(Debug)]
pub struct ProcessGuard {
    label: String,
    ns: Option<String>,
    command_line: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    print_on_panic: bool,
}

impl ProcessGuard {
    /// Starts `program args…` (inside `ns` via `ip netns exec` when given) with extra environment
    /// variables `envs`.
    pub fn spawn(
        run: &Run,
        label: &str,
        ns: Option<&str>,
        program: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let stdout_path = run.path(&format!("{label}.{n}.stdout"));
        let stderr_path = run.path(&format!("{label}.{n}.stderr"));
        let stdout = File::create(&stdout_path)
            .with_context(|| format!("creating {}", stdout_path.display()))?;
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("creating {}", stderr_path.display()))?;
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        };
        command
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let command_line = format!(
            "{}{}{}",
            envs.iter()
                .map(|(k, v)| format!("{k}={v} "))
                .collect::<String>(),
            ns.map(|ns| format!("ip netns exec {ns} "))
                .unwrap_or_default(),
            crate::cmd::render(program, args)
        );
        let child = command
            .spawn()
            .with_context(|| format!("cannot start `{command_line}`"))?;
        Ok(ProcessGuard {
            label: label.to_string(),
            ns: ns.map(str::to_string),
            command_line,
            child,
            status: None,
            stdout_path,
            stderr_path,
            print_on_panic: true,
        })
    }

    /// The label given at spawn time.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The process id (`ip netns exec` execs the program, so this is the program itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether to print the captured output when dropped during a panic (default true).
    pub fn set_print_on_panic(&mut self, yes: bool) {
        self.print_on_panic = yes;
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("waiting for child")?;
        }
        Ok(self.status)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the process (if it is still running).
    pub fn signal(&mut self, signal: i32) {
        if self.is_running() {
            // SAFETY: kill(2) takes plain integers; the pid is our own unreaped child, so it
            // cannot have been recycled for another process.
            unsafe {
                libc::kill(self.child.id() as i32, signal);
            }
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL after `timeout`; returns its exit status.
    pub fn stop_with_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.try_wait()? {
            return Ok(st);
        }
        self.signal(libc::SIGTERM);
        if let Some(st) = self.wait_timeout(timeout)? {
            return Ok(st);
        }
        eprintln!(
            "isthmus-e2e: {} did not exit {timeout:?} after SIGTERM, killing it",
            self.label
        );
        let _ = self.child.kill();
        let st = self.child.wait().context("waiting for killed child")?;
        self.status = Some(st);
        Ok(st)
    }

    /// [`ProcessGuard::stop_with_timeout`] with [`STOP_TIMEOUT`].
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.stop_with_timeout(STOP_TIMEOUT)
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read(&self.stdout_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until stdout or stderr contains `needle`; fails if the process exits first or after
    /// `timeout`.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return Ok(());
            }
            if let Some(st) = self.try_wait()? {
                anyhow::bail!(
                    "{} exited ({st}) before printing {needle:?}\n{}",
                    self.label,
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{} did not print {needle:?} within {timeout:?}\n{}",
                    self.label,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The command line and the captured output, for messages (the last 200 lines of each).
    pub fn logs(&self) -> String {
        format!(
            "----- {} ({}) -----\n$ {}\n--- stdout ({}) ---\n{}\n--- stderr ({}) ---\n{}\n----- end of {} -----",
            self.label,
            self.ns.as_deref().unwrap_or("root netns"),
            self.command_line,
            self.stdout_path.display(),
            tail(&self.stdout(), 200),
            self.stderr_path.display(),
            tail(&self.stderr(), 200),
            self.label
        )
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = String::new();
    if start > 0 {
        out.push_str(&format!("[… {start} earlier lines …]\n"));
    }
    out.push_str(&all[start..].join("\n"));
    out
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let _ = self.stop();
        if std::thread::panicking() && self.print_on_panic {
            eprintln!("{}", self.logs());
        }
    }
}
