//! The BaseStore's background compaction job, and the low-priority threads compactions run
//! on.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::BaseStore;
use crate::error::{Result, StorageError};

/// While this process is the store's compactor, runs compactions whenever a flush here
/// asks for one, and every `compactor_poll` for tables other processes flushed; until the
/// store closes.
pub(super) fn spawn_compactions(base: &Arc<BaseStore>) -> tokio::task::JoinHandle<()> {
    // The task holds the store weakly: dropping the last handle (or close())
    // ends it, and an idle wait never keeps the store alive.
    let store = Arc::downgrade(base);
    let wanted = Arc::clone(&base.compaction_wanted);
    let mut shutdown = base.shutdown.subscribe();
    let mut compactor = base.compactor.subscribe();
    let poll = base.options.compactor_poll.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let Some(base) = store.upgrade().filter(|_| !*shutdown.borrow()) else {
                return;
            };
            let compacting = *compactor.borrow_and_update();
            let outcome = if compacting {
                match base.refresh().await {
                    Ok(_) => base.compact_once().await,
                    Err(error) => Err(error),
                }
            } else {
                Ok(None)
            };
            drop(base);
            let pause = match outcome {
                Ok(Some(_)) => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Ok(None) => None,
                Err(StorageError::Closed { .. }) => return,
                // Work cut short by shutdown is not worth a warning.
                Err(_) if *shutdown.borrow() => return,
                Err(error) => {
                    tracing::warn!(%error, "compaction failed; will retry");
                    let pause = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    Some(pause)
                }
            };
            let wait = async {
                match pause {
                    Some(pause) => tokio::time::sleep(pause).await,
                    None if compacting => {
                        let _ = tokio::time::timeout(poll, wanted.notified()).await;
                    }
                    None => wanted.notified().await,
                }
            };
            tokio::select! {
                _ = wait => {}
                // Err: the store was dropped; the next turn ends the task.
                _ = compactor.changed() => {}
                _ = shutdown.changed() => return,
            }
        }
    })
}

/// The nice value of compaction threads: they yield the CPU to request handling, yet
/// still run on a machine that is busy all the time.
const BACKGROUND_NICE: i32 = 10;

/// Runs `job` to completion on a new thread at [`BACKGROUND_NICE`], driving its I/O with
/// the caller's runtime, and waits for its result.
pub(super) async fn on_own_thread<F, Fut, T>(job: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
    T: Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("luna-compaction".to_owned())
        .spawn(move || {
            lower_this_threads_priority();
            // The caller may have gone (shutdown): the result is of no use then.
            let _ = done.send(runtime.block_on(job()));
        })
        .map_err(|error| StorageError::Job {
            job: "compaction",
            detail: format!("starting its thread: {error}"),
        })?;
    result.await.map_err(|_| StorageError::Job {
        job: "compaction",
        detail: "its thread ended without a result (it panicked)".to_owned(),
    })?
}

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`]. Best effort: a
/// failure (a sandbox forbidding it) leaves the thread at normal priority.
#[cfg(target_os = "linux")]
fn lower_this_threads_priority() {
    // SAFETY: gettid and setpriority take and return plain integers. On Linux a nice value
    // belongs to a thread, and PRIO_PROCESS with a thread id changes that thread only.
    let changed = unsafe {
        let thread = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, thread as libc::id_t, BACKGROUND_NICE)
    };
    if changed != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not lower a compaction thread's priority"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_this_threads_priority() {}
