//! The accept loop of the gateway's TCP control services (`/metrics`, remote
//! administration): each connection on a thread of its own, at most a fixed
//! number at once (further ones are closed at once), and helpers to bound a
//! whole connection by one deadline so slow clients cannot hold a slot.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Serves one accepted connection.
pub type Serve = dyn Fn(TcpStream) + Send + Sync;

/// Accepts on `listener` forever on a thread named `name`, serving at most
/// `max` connections at once.
pub fn spawn(
    listener: TcpListener,
    name: &'static str,
    max: usize,
    serve: Arc<Serve>,
) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(service = name, error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if active.fetch_add(1, Ordering::SeqCst) >= max {
                active.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            // Freed when the connection's thread ends, also by a panic, or at
            // once if the thread cannot be started.
            let slot = Slot(active.clone());
            let serve = serve.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-conn"))
                .spawn(move || {
                    let _slot = slot;
                    serve(stream);
                });
            if spawned.is_err() {
                tracing::warn!(service = name, "cannot spawn a connection thread");
            }
        })?;
    Ok(())
}

/// One serving slot, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Time left until `deadline`, or `None` when it has passed.
pub fn left(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// A TCP stream whose reads and writes all end by one deadline.
#[derive(Debug)]
pub struct DeadlineStream {
    sock: TcpStream,
    deadline: Instant,
}

impl DeadlineStream {
    pub fn new(sock: TcpStream, deadline: Instant) -> Self {
        Self { sock, deadline }
    }

    fn remaining(&self) -> io::Result<Duration> {
        left(self.deadline).ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = self.remaining()?;
        self.sock.set_read_timeout(Some(t))?;
        self.sock.read(buf)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = self.remaining()?;
        self.sock.set_write_timeout(Some(t))?;
        self.sock.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}
