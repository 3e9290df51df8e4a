//! Holds on the master's GC safe point (docs/transactions.md, "Garbage collection").
//!
//! Compaction drops MVCC versions below the safe point, so while a transaction or
//! read-only snapshot is open, its start timestamp must stay at or above it. Each open one
//! holds a [`SnapshotHold`]; while any is held, a background task tells the master the
//! oldest start timestamp, renewing the master's lease on it three times per lease. When
//! the last hold is dropped the task stops and the master's lease simply runs out: an
//! explicit release could overtake the next task's first renewal and drop a live hold.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use luna_proto::master::KeepSnapshotsRequest;

use crate::Inner;
use crate::retry::Deadline;

/// Renewal interval until the master has said how long its leases are.
const FIRST_RENEWAL: Duration = Duration::from_secs(3);
/// Pause before retrying a renewal that failed.
const RETRY_RENEWAL: Duration = Duration::from_millis(500);

/// The start timestamps of this client's open transactions and snapshots.
#[derive(Debug, Default)]
pub(crate) struct SnapshotHolds {
    state: Mutex<HoldsState>,
}

#[derive(Debug, Default)]
struct HoldsState {
    /// Open holds per start timestamp.
    live: BTreeMap<u64, usize>,
    /// Whether the renewal task runs.
    renewing: bool,
}

impl SnapshotHolds {
    fn state(&self) -> std::sync::MutexGuard<'_, HoldsState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The oldest start timestamp held; stops the renewal task (by returning `None`) when
    /// there is none.
    fn oldest_or_stop(&self) -> Option<u64> {
        let mut state = self.state();
        let oldest = state.live.keys().next().copied();
        if oldest.is_none() {
            state.renewing = false;
        }
        oldest
    }
}

/// Keeps the master's GC safe point at or below `start_ts` until dropped.
#[derive(Debug)]
pub(crate) struct SnapshotHold {
    inner: Arc<Inner>,
    start_ts: u64,
}

impl Drop for SnapshotHold {
    fn drop(&mut self) {
        let mut state = self.inner.snapshot_holds.state();
        if let Some(count) = state.live.get_mut(&self.start_ts) {
            *count -= 1;
            if *count == 0 {
                state.live.remove(&self.start_ts);
            }
        }
    }
}

impl Inner {
    /// Holds the GC safe point at or below `start_ts` while the returned guard lives.
    pub(crate) fn hold_snapshot(self: &Arc<Self>, start_ts: u64) -> SnapshotHold {
        let start_renewing = {
            let mut state = self.snapshot_holds.state();
            *state.live.entry(start_ts).or_insert(0) += 1;
            !std::mem::replace(&mut state.renewing, true)
        };
        if start_renewing {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(renew_holds(Arc::downgrade(self)));
                }
                // Without a runtime nothing can be read either; the next hold made
                // inside one starts the task.
                Err(_) => self.snapshot_holds.state().renewing = false,
            }
        }
        SnapshotHold {
            inner: Arc::clone(self),
            start_ts,
        }
    }

    /// The client id the master knows this client's holds by.
    fn holder_id(&self) -> String {
        self.client_id().iter().fold(String::new(), |mut id, byte| {
            let _ = write!(id, "{byte:02x}");
            id
        })
    }
}

/// Renews this client's hold on the master while it has open snapshots.
async fn renew_holds(inner: Weak<Inner>) {
    let mut every = FIRST_RENEWAL;
    loop {
        let Some(client) = inner.upgrade() else {
            return;
        };
        let Some(oldest_start_ts) = client.snapshot_holds.oldest_or_stop() else {
            return;
        };
        let request = KeepSnapshotsRequest {
            client_id: client.holder_id(),
            oldest_start_ts,
        };
        let deadline = Deadline::after(client.options.operation_timeout);
        let renewed = client
            .call_master("KeepSnapshots", &deadline, |mut master| {
                let request = request.clone();
                async move { master.keep_snapshots(request).await }
            })
            .await;
        drop(client);
        let pause = match renewed {
            Ok(response) => {
                if response.lease_ms > 0 {
                    every = Duration::from_millis(response.lease_ms / 3).max(RETRY_RENEWAL);
                }
                every
            }
            Err(error) => {
                tracing::debug!(%error, "renewing the snapshot hold; will retry");
                RETRY_RENEWAL
            }
        };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientOptions;

    #[tokio::test]
    async fn holds_count_per_timestamp_and_the_oldest_is_kept() {
        let inner =
            Arc::new(Inner::new(["127.0.0.1:1"], ClientOptions::default()).expect("client"));
        let first = inner.hold_snapshot(20);
        let second = inner.hold_snapshot(10);
        let third = inner.hold_snapshot(10);
        assert_eq!(inner.snapshot_holds.oldest_or_stop(), Some(10));
        drop(second);
        assert_eq!(inner.snapshot_holds.oldest_or_stop(), Some(10), "one left");
        drop(third);
        assert_eq!(inner.snapshot_holds.oldest_or_stop(), Some(20));
        drop(first);
        assert_eq!(inner.snapshot_holds.oldest_or_stop(), None);
        assert!(!inner.snapshot_holds.state().renewing, "the task stops");
        assert_eq!(inner.holder_id().len(), 32, "16 bytes in hex");
    }
}
