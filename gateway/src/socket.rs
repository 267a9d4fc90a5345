//! Local control sockets (the UAPI and admin sockets) that only root, or the
//! gateway's own user, can use.
//!
//! - The socket file has mode 0600 from the moment it becomes visible: it is
//!   bound in a private 0700 staging directory, chmod-ed, then hard-linked
//!   into place, which also fails rather than replace a socket another
//!   process created meanwhile.
//! - A stale socket (nobody listening) at the path is removed first; a file
//!   that is not a socket, or a socket someone serves, is never touched.
//! - On shutdown the file is removed only if it is still the one we bound
//!   (same device and inode): never a path another process re-created.
//! - Each client is checked by its kernel credentials (`SO_PEERCRED`): only
//!   uid 0 and the gateway's own uid are served, even if the file's mode was
//!   widened by hand. At most `max_connections` are served at once; further
//!   ones are closed at once.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Serves one accepted connection.
pub type ServeFn = dyn Fn(UnixStream) + Send + Sync;

/// A listening private socket; removed (if still ours) on shutdown or drop.
#[derive(Debug)]
pub struct PrivateSocket {
    path: PathBuf,
    /// (st_dev, st_ino) of our socket file.
    ident: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    what: &'static str,
}

pub(crate) fn annotate(e: io::Error, context: String) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

/// The uid of the process at the other end of `stream`.
pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a valid, writable ucred and `len` holds its size; the
    // kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether a client with `uid` may use a gateway socket: root, or the user
/// the gateway runs as.
pub fn uid_allowed(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

impl PrivateSocket {
    /// Binds `path` (its directory is created 0755 if missing) and serves
    /// each allowed connection with `serve` on its own short-lived thread.
    /// A client that may not use the socket gets `refusal` before it is
    /// closed.
    pub fn bind(
        path: &Path,
        what: &'static str,
        max_connections: usize,
        refusal: &'static str,
        serve: Arc<ServeFn>,
    ) -> io::Result<Self> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|e| annotate(e, format!("cannot create {}", dir.display())))?;
        remove_stale_socket(path, what)?;
        let (listener, ident) = bind_private(dir, path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(what.into())
                .spawn(move || accept_loop(listener, serve, stop, max_connections, what, refusal))
        };
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            ident,
            stop,
            thread: Some(thread),
            what,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn is_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|md| md.file_type().is_socket() && (md.dev(), md.ino()) == self.ident)
    }

    /// Stops accepting and removes the socket file if it is still ours.
    pub fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        if !self.is_ours() {
            // Nothing reaches our listener any more; leave the thread parked
            // in accept() rather than hang, and never delete a foreign file.
            tracing::warn!(
                path = %self.path.display(),
                "{} socket path was removed or replaced; not removing it",
                self.what
            );
            return;
        }
        // Wake the accept loop so that it sees the stop flag.
        match UnixStream::connect(&self.path) {
            Ok(conn) => {
                drop(conn);
                if thread.join().is_err() {
                    tracing::warn!("{} accept thread panicked", self.what);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot wake the {} accept thread", self.what),
        }
        if self.is_ours() {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(error = %e, path = %self.path.display(), "cannot remove {} socket", self.what);
            }
        }
    }
}

impl Drop for PrivateSocket {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes a socket nobody listens on; refuses if someone does, or if the
/// path is not a socket.
fn remove_stale_socket(path: &Path, what: &str) -> io::Result<()> {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(annotate(e, format!("cannot inspect {}", path.display()))),
    };
    if !md.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use: another process is listening on it (is another gateway \
                 running for this interface?)",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale {what} socket");
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(annotate(
                    e,
                    format!("cannot remove stale socket {}", path.display()),
                )),
                _ => Ok(()),
            }
        }
        Err(e) => Err(annotate(
            e,
            format!("cannot probe existing socket {}", path.display()),
        )),
    }
}

/// Removes the staging directory (and the socket name in it) on every exit.
struct Staging {
    dir: PathBuf,
    sock: PathBuf,
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.sock);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Binds the listener in a private staging directory, sets mode 0600, then
/// hard-links it to `path` (failing if `path` exists). Returns the listener
/// and the socket file's (st_dev, st_ino).
fn bind_private(dir: &Path, path: &Path) -> io::Result<(UnixListener, (u64, u64))> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging_dir = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging_dir)
        .map_err(|e| annotate(e, format!("cannot create {}", staging_dir.display())))?;
    let staging = Staging {
        sock: staging_dir.join("s"),
        dir: staging_dir,
    };
    let listener = UnixListener::bind(&staging.sock)
        .map_err(|e| annotate(e, format!("cannot bind {}", staging.sock.display())))?;
    std::fs::set_permissions(&staging.sock, std::fs::Permissions::from_mode(0o600))?;
    std::fs::hard_link(&staging.sock, path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} was created by another process meanwhile",
                    path.display()
                ),
            )
        } else {
            annotate(e, format!("cannot create {}", path.display()))
        }
    })?;
    let md = std::fs::symlink_metadata(path)?;
    drop(staging);
    Ok((listener, (md.dev(), md.ino())))
}

/// Decrements the active-connection count when a connection ends.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(
    listener: UnixListener,
    serve: Arc<ServeFn>,
    stop: Arc<AtomicBool>,
    max_connections: usize,
    what: &'static str,
    refusal: &'static str,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "{what} accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match peer_uid(&stream) {
            Ok(uid) if uid_allowed(uid) => {}
            Ok(uid) => {
                tracing::warn!(
                    uid,
                    "{what} socket: refusing a client that is neither root nor this gateway's user"
                );
                let _ = stream.set_nonblocking(true);
                let _ = std::io::Write::write_all(&mut &stream, refusal.as_bytes());
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "{what} socket: cannot read the client's credentials; refusing it");
                continue;
            }
        }
        if active.fetch_add(1, Ordering::SeqCst) >= max_connections {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("too many {what} connections; closing a new one");
            continue;
        }
        let guard = ActiveGuard(Arc::clone(&active));
        let serve = Arc::clone(&serve);
        let spawned = std::thread::Builder::new()
            .name(format!("{what}-conn"))
            .spawn(move || {
                let _guard = guard;
                serve(stream);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot spawn a {what} connection thread");
        }
    }
    tracing::debug!("{what} accept loop stopped");
}
