//! Writers of distinct keys that keep every acknowledged write, and the check that each one
//! reads back at the end. `luna chaos` and the kill tests in tests/ share this file (the
//! tests include it with `#[path]`), so it uses nothing of the binary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use luna_client::Collection;

/// Reads in flight while acknowledged writes are read back.
const READ_BACK_CONCURRENCY: usize = 64;

/// Tasks writing distinct keys until stopped, keeping every acknowledged (key, value).
pub struct Writers {
    collection: Collection,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What reading the acknowledged writes back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteCheck {
    /// Writes acknowledged.
    pub acked: usize,
    /// Those missing or wrong, as `key: what was read`.
    pub missing: Vec<String>,
}

impl Writers {
    /// Starts `writers` tasks putting to `collection`.
    pub fn spawn(collection: &Collection, writers: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let tasks = (0..writers)
            .map(|w| {
                let collection = collection.clone();
                let stop = Arc::clone(&stop);
                let acked = Arc::clone(&acked);
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("w{w}-{n:06}");
                        let value = format!("value-{w}-{n}");
                        n += 1;
                        // Failures during a fault are expected; only acknowledged writes
                        // must survive.
                        if collection.put(key.clone(), value.clone()).await.is_ok()
                            && let Ok(mut acked) = acked.lock()
                        {
                            acked.push((key, value));
                        }
                    }
                })
            })
            .collect();
        Writers {
            collection: collection.clone(),
            stop,
            acked,
            tasks,
        }
    }

    /// Writes acknowledged so far.
    pub fn count(&self) -> usize {
        self.acked.lock().map_or(0, |acked| acked.len())
    }

    /// Waits until `more` writes beyond the current count are acknowledged, for at most
    /// `limit`; returns whether they were.
    pub async fn wait_progress(&self, more: usize, limit: Duration) -> bool {
        let target = self.count() + more;
        let deadline = Instant::now() + limit;
        while self.count() < target {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Stops the writers and reads every acknowledged write back.
    pub async fn stop_and_check(self) -> WriteCheck {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        let acked = self
            .acked
            .lock()
            .map(|acked| acked.clone())
            .unwrap_or_default();
        // Read back many at a time: a long run acknowledges millions.
        let collection = &self.collection;
        let first_misses: Vec<(&String, &String, String)> = futures::stream::iter(&acked)
            .map(|(key, value)| async move {
                read_back(collection, key, value)
                    .await
                    .err()
                    .map(|read| (key, value, read))
            })
            .buffer_unordered(READ_BACK_CONCURRENCY)
            .filter_map(|missing| async move { missing })
            .collect()
            .await;
        // A write that shows up on a second read was stale on the first (a read that
        // missed an acknowledged write), not lost: both are violations, but different bugs.
        let mut missing = Vec::with_capacity(first_misses.len());
        if !first_misses.is_empty() {
            tokio::time::sleep(REREAD_AFTER).await;
        }
        for (key, value, first) in first_misses {
            missing.push(match read_back(collection, key, value).await {
                Ok(()) => format!("{key}: {first}, found {REREAD_AFTER:?} later (a stale read)"),
                Err(again) => format!("{key}: {first}, again {REREAD_AFTER:?} later: {again}"),
            });
        }
        WriteCheck {
            acked: acked.len(),
            missing,
        }
    }
}

/// How long the check waits before it reads a missing write once more.
const REREAD_AFTER: Duration = Duration::from_secs(2);

/// Reads `key` and describes what was read unless it is `value`.
async fn read_back(collection: &Collection, key: &str, value: &str) -> Result<(), String> {
    match collection.get(key).await {
        Ok(Some(found)) if found == value.as_bytes() => Ok(()),
        other => Err(format!("{other:?}")),
    }
}
