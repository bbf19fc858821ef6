//! Where storage's blocking work runs: fsyncs on sled's I/O threads and snapshots on
//! tokio's blocking pool, off the async workers, so that a slow disk holds up no task.
//!
//! A deterministic simulation (`tests/tests/simulation.rs`) runs every node on one
//! thread under a paused clock, and there that hand-off is what makes two runs of one
//! seed part: while a task waits on another thread the runtime has nothing to do, so it
//! moves the simulated clock on (by as much as the real disk took, in steps of the
//! simulation's tick), and the answer lands between other tasks' steps wherever the
//! real thread happened to finish. [`run_inline_on_this_thread`] makes the same work
//! run on the calling task's thread instead, so that it takes no simulated time. Only
//! a simulation calls it; the work done is the same either way.

use std::cell::Cell;
use std::time::Duration;

thread_local! {
    /// Whether blocking work started from this thread runs on it.
    static INLINE: Cell<bool> = const { Cell::new(false) };
    /// How long each fsync started from this thread waits first (a slow disk), when
    /// storage's work runs inline.
    static SYNC_DELAY: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

/// In a simulation (under [`run_inline_on_this_thread`]): every fsync started from
/// this thread takes `delay` of the runtime's (simulated) time first, as on a slow
/// disk; `Duration::ZERO` makes the disk fast again.
pub fn set_sync_delay_on_this_thread(delay: Duration) {
    SYNC_DELAY.with(|d| d.set(delay));
}

/// Run storage's blocking work (fsyncs, snapshots, and [`blocking`]) started from this
/// thread on this thread, from now on: for a simulation that runs every node on it.
pub fn run_inline_on_this_thread() {
    INLINE.with(|i| i.set(true));
}

fn inline() -> bool {
    INLINE.with(Cell::get)
}

/// Run `work`, which blocks, off the async workers (on tokio's blocking pool), or on
/// this thread under [`run_inline_on_this_thread`].
pub async fn blocking<R, F>(work: F) -> Result<R, tokio::task::JoinError>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    if inline() {
        Ok(work())
    } else {
        tokio::task::spawn_blocking(work).await
    }
}

/// Force `tree`'s database to disk: on sled's I/O threads, or on this thread under
/// [`run_inline_on_this_thread`].
pub(crate) async fn flush(tree: &sled::Tree) -> sled::Result<usize> {
    if inline() {
        let delay = SYNC_DELAY.with(Cell::get);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        tree.flush()
    } else {
        tree.flush_async().await
    }
}
