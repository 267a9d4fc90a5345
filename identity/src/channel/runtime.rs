//! The one small tokio runtime all peer channels of a process run on.
//!
//! Sessions, dialers ([`PeerLink`](super::PeerLink)) and accept loops are tasks on a
//! multi-thread runtime with [`WORKER_THREADS`] workers, created on first use and kept for
//! the life of the process. It is owned by the channel layer rather than passed in because
//! its users are std-threaded (the gateway daemon, its tests): they get a fixed, small
//! number of threads however many peers, dialers and listeners they run, and never see an
//! async API. What crosses back to them is plain std: events on a
//! `std::sync::mpsc::Sender`, blocking waits on a `Condvar`. The data path never runs here.

use std::future::Future;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::runtime::{Builder, Handle, Runtime};
use tracing::instrument::WithSubscriber;

use super::ChannelError;

/// Worker threads of the channel runtime. A channel is mostly idle (a ping every few
/// seconds); handshakes are the only CPU work, and two workers use the machine's two cores.
pub const WORKER_THREADS: usize = 2;

/// Name of the runtime's threads (as seen in `/proc/<pid>/task/*/comm`).
pub const THREAD_NAME: &str = "isthmus-chan";

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The channel runtime, created on first use.
pub(crate) fn handle() -> Result<Handle, ChannelError> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.handle().clone());
    }
    let rt = Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        // Blocking work is never spawned; keep the pool from growing anyway.
        .max_blocking_threads(1)
        .thread_name(THREAD_NAME)
        .enable_io()
        .enable_time()
        .build()?;
    // Another thread may have won the race: its runtime is kept, ours dropped.
    let _ = RUNTIME.set(rt);
    RUNTIME
        .get()
        .map(|rt| rt.handle().clone())
        .ok_or(ChannelError::Closed)
}

/// Spawns `task` on the channel runtime, carrying the caller's tracing subscriber along
/// (tests capture logs with a thread-local one). The returned [`TaskDone`] reports the end
/// of the task.
pub(crate) fn spawn<F>(task: F) -> Result<TaskDone, ChannelError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let handle = handle()?;
    handle.spawn(
        async move {
            // Dropped when the task ends (or is cancelled with the runtime).
            let _done = done_tx;
            task.await;
        }
        .with_current_subscriber(),
    );
    Ok(TaskDone(done_rx))
}

/// Runs `fut` to completion on the calling (non-runtime) thread, with the channel
/// runtime's reactor and timers. For the blocking entry points only: never call it from
/// inside an async task.
pub(crate) fn block_on<F: Future>(fut: F) -> Result<F::Output, ChannelError> {
    Ok(handle()?.block_on(fut.with_current_subscriber()))
}

/// Becomes ready when a spawned task has ended.
#[derive(Debug)]
pub(crate) struct TaskDone(mpsc::Receiver<()>);

impl TaskDone {
    /// Waits up to `timeout` for the task to end; whether it did.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        matches!(
            self.0.recv_timeout(timeout),
            Err(mpsc::RecvTimeoutError::Disconnected) | Ok(())
        )
    }
}
