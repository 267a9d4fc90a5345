//! The admin socket as a local user meets it: `isthmusctl` as root gets answers, any
//! other user is refused (by the file's mode, and by the kernel's peer credentials even
//! when the mode was widened), idle clients cannot take more than their share, and the
//! gateway never removes a file it did not create.

mod common;

use common::TempDir;
use isthmus_gateway::admin::{AdminServer, Status, MAX_ADMIN_CONNECTIONS};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

const NOBODY: u32 = 65534;

fn status() -> Status {
    common::status_document()
}

fn ctl_status(socket: &Path, uid: Option<u32>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_isthmusctl"));
    cmd.args(["status", "--output", "json", "--socket"])
        .arg(socket);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().expect("running isthmusctl")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn only_root_is_served() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let dir = TempDir::new("admin-uid");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.0.join("gw.sock");
    let server = AdminServer::bind(&path, Arc::new(status)).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let out = ctl_status(&path, None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ist-test"));

    // Another user cannot even connect (mode 0600)...
    let out = ctl_status(&path, Some(NOBODY));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ermission denied"),
        "{}",
        stderr(&out)
    );
    // ... and is refused by its credentials when the mode is widened by hand.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = ctl_status(&path, Some(NOBODY));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("only root or the gateway's own user"),
        "{}",
        stderr(&out)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ist-test"));
    drop(server);
}

#[test]
fn idle_clients_are_capped_and_foreign_files_are_left_alone() {
    let dir = TempDir::new("admin-cap");
    let path = dir.0.join("gw.sock");
    let server = AdminServer::bind(&path, Arc::new(status)).unwrap();
    // Clients that connect and say nothing hold a slot each (until their
    // 5 s read timeout); one more is closed at once.
    let idle: Vec<UnixStream> = (0..MAX_ADMIN_CONNECTIONS)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = UnixStream::connect(&path).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = Vec::new();
    let n = extra
        .read_to_end(&mut buf)
        .expect("closed, not left hanging");
    assert_eq!(n, 0, "the connection over the cap was served");
    drop(idle);
    // Slots come back when the idle clients go.
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    loop {
        if ctl_status(&path, None).status.success() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slots never freed");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A file that replaced our socket is not removed when the server stops.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, "not ours").unwrap();
    drop(server);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not ours");
    // And a new server refuses to replace it.
    let err = AdminServer::bind(&path, Arc::new(status)).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
}
