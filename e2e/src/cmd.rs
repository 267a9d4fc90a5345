//! Running external commands (mostly `ip`) with useful error messages.

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// Renders a command line for messages.
pub fn render<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// Runs `program args…` to completion and returns its output whatever the exit status.
pub fn output<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", render(program, args)))
}

/// Runs `program args…`, fails unless it exits 0, and returns its stdout.
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String> {
    let out = output(program, args)?;
    check(program, args, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with the command line, status, stdout and stderr unless `out` is a success.
pub fn check<S: AsRef<OsStr>>(program: &str, args: &[S], out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "`{}` failed ({}):\nstdout: {}\nstderr: {}",
        render(program, args),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// Runs `program args…` with `input` on its stdin; fails unless it exits 0; returns stdout.
pub fn run_with_stdin<S: AsRef<OsStr>>(program: &str, args: &[S], input: &[u8]) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{}`", render(program, args)))?;
    {
        let mut stdin = child.stdin.take().context("child stdin")?;
        stdin.write_all(input).context("writing child stdin")?;
    }
    let out = child.wait_with_output().context("waiting for child")?;
    check(program, args, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `program` can be found on `PATH` (or is an existing path).
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let p = std::path::Path::new(program);
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}
