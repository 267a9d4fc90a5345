//! The accept loop of the gateway's TCP control services (`/metrics`, remote
//! administration): each connection on a thread of its own, at most a fixed
//! number at once (further ones are closed at once), and helpers to bound a
//! whole connection by one deadline so slow clients cannot hold a slot.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Serves one accepted connection.
pub type Serve = dyn Fn(TcpStream) + Send + Sync;

/// Accepts on `listener` forever on a thread named `name`, serving at most
/// `max` connections at once and at most `per_source` from one IP address
/// (so one client cannot take every slot).
pub fn spawn(
    listener: TcpListener,
    name: &'static str,
    max: usize,
    per_source: usize,
    serve: Arc<Serve>,
) -> io::Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    let sources: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
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
            let source = match stream.peer_addr() {
                Ok(a) => a.ip().to_canonical(),
                Err(_) => continue,
            };
            {
                let mut per = sources.lock().unwrap_or_else(|e| e.into_inner());
                let n = per.entry(source).or_default();
                if *n >= per_source {
                    continue;
                }
                if active.fetch_add(1, Ordering::SeqCst) >= max {
                    active.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                *n += 1;
            }
            // Freed when the connection's thread ends, also by a panic, or at
            // once if the thread cannot be started.
            let slot = Slot {
                active: active.clone(),
                sources: sources.clone(),
                source,
            };
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
struct Slot {
    active: Arc<AtomicUsize>,
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        let mut per = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.source);
            }
        }
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

    /// Moves the deadline (e.g. a short one for a handshake, then the
    /// connection's).
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
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
