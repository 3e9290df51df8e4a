//! Feeding a [`Subscription`] from a stream's committed log.
//!
//! Both stream implementations publish their committed index on a `watch` channel and can
//! read committed entries by index; one task per subscription turns that into an ordered
//! channel of entries, with backpressure from the subscriber. Where entries were discarded
//! the source answers with the snapshot that replaced them, and the feed moves on past it.

use std::sync::Arc;

use async_trait::async_trait;
use luna_kernel::stream::{Committed, StreamError, Subscription};
use tokio::sync::{mpsc, watch};

/// Entries a subscriber may receive ahead of consuming them.
const CHANNEL_CAPACITY: usize = 1024;
/// Entries read from the log per call, so one slow read does not hold a lock for long.
const READ_CHUNK: u64 = 256;

/// Reads committed entries of one stream.
#[async_trait]
pub(crate) trait EntrySource: Send + Sync + 'static {
    /// Entries `from..=to`, in order; all of them must be committed. Returns at least one
    /// item: the snapshot alone if `from` is at or below its index (entries up to it are
    /// gone), else entries.
    async fn read(&self, from: u64, to: u64) -> Result<Vec<Committed>, StreamError>;
}

/// Starts a task that delivers entries from `from` onwards as `committed` advances. The
/// task ends when the subscriber drops its end, or when `committed`'s sender is dropped
/// (the stream closed) and everything committed before that was delivered.
pub(crate) fn spawn_feed(
    source: Arc<dyn EntrySource>,
    mut committed: watch::Receiver<u64>,
    from: u64,
) -> Subscription {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    tokio::spawn(async move {
        let mut next = from;
        loop {
            let upto = *committed.borrow_and_update();
            while next <= upto {
                let to = upto.min(next + READ_CHUNK - 1);
                match source.read(next, to).await {
                    Ok(entries) if entries.is_empty() => {
                        let reason = format!("no entries held for {next}..={to}");
                        let location = "subscription".to_owned();
                        let _ = tx
                            .send(Err(StreamError::Corruption { location, reason }))
                            .await;
                        return;
                    }
                    Ok(items) => {
                        for item in items {
                            // A snapshot moves the feed past everything it covers.
                            next = item.index() + 1;
                            if tx.send(Ok(item)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        // The subscriber learns why its stream of entries ends.
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            tokio::select! {
                changed = committed.changed() => {
                    if changed.is_err() && *committed.borrow() < next {
                        return;
                    }
                }
                // A subscriber gone while nothing commits: end now, not at the next commit,
                // which on an idle stream may never come.
                () = tx.closed() => return,
            }
        }
    });
    Subscription::new(rx)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A source for a stream on which nothing commits: never read.
    struct Idle;

    #[async_trait]
    impl EntrySource for Idle {
        async fn read(&self, _from: u64, _to: u64) -> Result<Vec<Committed>, StreamError> {
            Err(StreamError::Closed)
        }
    }

    #[tokio::test]
    async fn a_subscription_dropped_on_an_idle_stream_ends_its_feed() {
        let (committed, watching) = watch::channel(0);
        let subscription = spawn_feed(Arc::new(Idle), watching, 1);
        assert_eq!(committed.receiver_count(), 1, "the feed watches the stream");
        drop(subscription);
        tokio::time::timeout(Duration::from_secs(10), async {
            while committed.receiver_count() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the feed ends without a commit");
    }
}
