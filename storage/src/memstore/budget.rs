//! A shared memory budget: writers stall here instead of growing memory
//! without limit when flushing falls behind.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Bytes of memtable memory that one or many MemStores may hold together.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
    released: Notify,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> MemoryBudget {
        MemoryBudget {
            limit,
            used: AtomicUsize::new(0),
            released: Notify::new(),
        }
    }

    /// Bytes currently charged.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether writers would stall now.
    pub fn is_exhausted(&self) -> bool {
        self.used() >= self.limit
    }

    pub(crate) fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        self.released.notify_waiters();
    }

    /// Waits until the budget is below its limit. A write may overshoot the
    /// limit by one batch; that bounds memory at limit + one batch.
    pub async fn wait_for_room(&self) {
        // The common case costs one atomic load.
        if !self.is_exhausted() {
            return;
        }
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Register before checking, so a release between the check and the
            // wait cannot be missed.
            released.as_mut().enable();
            if !self.is_exhausted() {
                return;
            }
            released.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn writers_stall_until_memory_is_released() {
        let budget = Arc::new(MemoryBudget::new(100));
        budget.charge(150);
        let waiter = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.wait_for_room().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "a writer must stall while over budget"
        );
        budget.release(100);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released writer must wake")
            .expect("task");
    }
}
