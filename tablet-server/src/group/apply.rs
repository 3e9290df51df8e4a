//! The apply loop: every replica applies the group's committed entries in log order.
//!
//! Applying is idempotent on replay. A write at or below its tablet's recovered index is
//! already in the BaseStore and is skipped; a write whose request id the group already
//! applied is skipped (a client retry); opening a tablet at the epoch it already has is a
//! no-op. Everything here depends only on the log and the BaseStores, never on clocks or on
//! which replica is leader, so every replica builds the same state.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use luna_kernel::stream::{Committed, Entry, Snapshot, Stream};
use luna_proto::group as gpb;
use luna_proto::master::TabletInfo;
use luna_proto::tablet::mutation::Op;
use luna_storage::{Tablet, WriteBatch};
use prost::Message;

use super::dedup::{Applied, Dedup, Prior, RequestKey};
use super::locks::{Lock, TxnState};
use super::truncation::Truncation;
use super::{Group, Hosted, log_span, storage_range};
use crate::error::{Result, TabletServerError};

/// Applies the group's log from the start until the stream or the group goes away.
pub(super) async fn run(group: Weak<Group>) {
    let Some((stream, group_id)) = group
        .upgrade()
        .map(|group| (Arc::clone(&group.stream), group.id))
    else {
        return;
    };
    let mut subscription = match stream.subscribe(1).await {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::error!(group = group_id, %error, "cannot subscribe to the group's journal");
            return;
        }
    };
    while let Some(item) = subscription.next().await {
        let entry = match item {
            Ok(entry) => entry,
            Err(error) => {
                tracing::error!(group = group_id, %error, "group journal subscription failed");
                return;
            }
        };
        let Some(group) = group.upgrade() else {
            return;
        };
        let index = entry.index();
        let applied = match entry {
            Committed::Entry(entry) => group.apply_entry(entry).await.map(|truncation| {
                // Not awaited here: it answers after the journal's next fsync, and the
                // entries behind it would wait for that too.
                if let Some(truncation) = truncation {
                    tokio::spawn(truncation.run(Arc::downgrade(&group)));
                }
            }),
            Committed::Snapshot(snapshot) => group.install_snapshot(snapshot).await,
        };
        if let Err(error) = applied {
            // Skipping an entry would let replicas diverge: stop applying, so this replica
            // serves nothing newer than what it applied correctly.
            tracing::error!(group = group_id, index, %error, "cannot apply a group entry; replica stopped");
            return;
        }
    }
}

impl Group {
    /// Applies `entry`, and answers the truncation of the journal it allows, if any.
    async fn apply_entry(&self, entry: Entry) -> Result<Option<Truncation>> {
        let index = entry.index;
        // Set by the entries that may let the log go: a flush, or a tablet leaving.
        let mut releases_log = false;
        // Empty entries are the stream's own (a new leader's no-op).
        if !entry.data.is_empty() {
            let decoded = gpb::GroupEntry::decode(entry.data).map_err(|error| {
                TabletServerError::CorruptEntry {
                    group_id: self.id,
                    index,
                    detail: error.to_string(),
                }
            })?;
            match decoded.kind {
                Some(gpb::group_entry::Kind::Writes(writes)) => {
                    let mut writes = writes.writes.into_iter().peekable();
                    let mut unit_number = 0u32;
                    while let Some(first) = writes.next() {
                        // A request's parts are consecutive, one per tablet. A retry
                        // batched right behind its original repeats a tablet: a unit of
                        // its own, which dedup then skips.
                        let mut unit = vec![first];
                        while let Some(next) = writes.next_if(|next| {
                            next.request_id == unit[0].request_id
                                && unit.iter().all(|part| part.tablet_id != next.tablet_id)
                        }) {
                            unit.push(next);
                        }
                        self.apply_request(index, unit_number, unit).await;
                        unit_number = unit_number.saturating_add(1);
                    }
                }
                Some(gpb::group_entry::Kind::OpenTablet(info)) => {
                    self.open_tablet(info, index).await?;
                    self.last_control_index.store(index, Ordering::Release);
                }
                Some(gpb::group_entry::Kind::SealTablet(seal)) => {
                    self.apply_seal(seal);
                    self.last_control_index.store(index, Ordering::Release);
                }
                Some(gpb::group_entry::Kind::UnsealTablet(seal)) => {
                    self.apply_unseal(&seal);
                    self.last_control_index.store(index, Ordering::Release);
                }
                Some(gpb::group_entry::Kind::AdoptTablet(adopt)) => {
                    self.apply_adopt(adopt, index).await?;
                    self.last_control_index.store(index, Ordering::Release);
                }
                Some(gpb::group_entry::Kind::SplitTablet(split)) => {
                    self.apply_split(split, index).await?;
                    self.last_control_index.store(index, Ordering::Release);
                }
                Some(gpb::group_entry::Kind::CloseTablet(close)) => {
                    let hosted_epoch = self.hosted_epoch(close.tablet_id);
                    if close.epoch == 0 || hosted_epoch == Some(close.epoch) {
                        self.close_tablet(close.tablet_id).await;
                        // Flush markers never come to a group left with no tablets.
                        releases_log = true;
                    }
                    self.last_control_index.store(index, Ordering::Release);
                }
                Some(gpb::group_entry::Kind::Flushed(flushed)) => {
                    self.apply_flushed(flushed).await?;
                    releases_log = true;
                }
                Some(gpb::group_entry::Kind::DedupLearning(_)) => {
                    self.dedup().start_learning(index);
                }
                Some(gpb::group_entry::Kind::TxnGc(gc)) => {
                    if let Ok(mut txns) = self.txns.lock() {
                        txns.collect(gc.safe_point, gc.record_floor);
                    }
                    // A snapshot must not stand for an index before this entry: replayed
                    // from there, a prewrite between the two would be refused on one
                    // replica and not on the others.
                    self.last_control_index.store(index, Ordering::Release);
                }
                None => {
                    return Err(TabletServerError::CorruptEntry {
                        group_id: self.id,
                        index,
                        detail: "entry of an unknown kind".to_owned(),
                    });
                }
            }
        }
        self.applied.send_replace(index);
        Ok(if releases_log {
            self.truncation()
        } else {
            None
        })
    }

    /// Applies one request's writes (one per tablet), the `unit_number`th request of the
    /// entry at `index`, all or none: none if the request was applied before or its
    /// client is done with it, or if one of its tablets closed or changed epoch after it
    /// was proposed. Such a request is left out of the dedup table, which is how its
    /// proposer learns it failed.
    async fn apply_request(&self, index: u64, unit_number: u32, unit: Vec<gpb::TabletWrite>) {
        let key = unit
            .first()
            .and_then(|write| write.request_id.as_ref())
            .and_then(RequestKey::new);
        if let Some(key) = &key
            && !self.dedup().admit(index, unit_number, key)
        {
            return;
        }
        if self.refused(&unit) || self.refused_by_seal(&unit) {
            // The leader checked this before proposing, but an entry ordered first (a
            // TxnGc, a reader's rollback, or a seal for a move) changed the answer.
            tracing::debug!(group = self.id, index, "transactional write refused");
            return;
        }
        let mut targets = Vec::with_capacity(unit.len());
        for write in &unit {
            let Some(hosted) = self.hosted_at(write.tablet_id, write.epoch) else {
                tracing::debug!(
                    group = self.id,
                    tablet = write.tablet_id,
                    index,
                    "write for a tablet not hosted at its epoch"
                );
                return;
            };
            targets.push(hosted);
        }
        let mut commit_ts = 0;
        for (write, hosted) in unit.into_iter().zip(targets) {
            commit_ts = write.commit_ts;
            let batch = match write.txn {
                None => to_batch(&write.mutations),
                Some(txn) => match txn.kind {
                    Some(gpb::txn_write::Kind::OnePhase(_)) => {
                        if !txn.decides.is_empty()
                            && let Ok(mut txns) = self.txns.lock()
                        {
                            txns.decide(
                                hosted.info.id,
                                txn.decides,
                                txn.start_ts,
                                write.commit_ts,
                                index,
                            );
                        }
                        to_batch(&write.mutations)
                    }
                    Some(gpb::txn_write::Kind::Prewrite(lock)) => {
                        self.lock_keys(index, hosted.info.id, txn.start_ts, lock, write.mutations);
                        continue;
                    }
                    Some(gpb::txn_write::Kind::Resolve(resolve)) => self.release_keys(
                        index,
                        hosted.info.id,
                        txn.start_ts,
                        write.commit_ts,
                        resolve,
                    ),
                    None => continue,
                },
            };
            // At or below the recovered index the write is already in the BaseStore.
            if !batch.is_empty()
                && index > hosted.tablet.recovered_up_to()
                && let Err(error) = hosted
                    .tablet
                    .write_committed(index, write.commit_ts, &batch)
                    .await
            {
                tracing::warn!(group = self.id, tablet = write.tablet_id, index, %error, "write not applied");
                return;
            }
        }
        self.max_applied_ts.fetch_max(commit_ts, Ordering::AcqRel);
        if let Some(key) = key {
            self.dedup().insert(&key, Applied { index, commit_ts });
        }
    }

    /// Whether `unit` prewrites a transaction that started below the safe point this
    /// group applied (its snapshot may be gone, and its outcome record with it), or
    /// commits, deciding it, a transaction already rolled back here.
    fn refused(&self, unit: &[gpb::TabletWrite]) -> bool {
        let Ok(txns) = self.txns.lock() else {
            return false;
        };
        unit.iter().any(|write| {
            let Some(txn) = &write.txn else {
                return false;
            };
            match txn.kind {
                Some(gpb::txn_write::Kind::Prewrite(_)) => txn.start_ts < txns.safe_point(),
                Some(gpb::txn_write::Kind::OnePhase(_)) if !txn.decides.is_empty() => {
                    txns.outcome(write.tablet_id, &txn.decides, txn.start_ts) == Some(0)
                }
                _ => false,
            }
        })
    }

    /// A prewrite: locks the mutations' keys, keeping each mutation in its lock.
    fn lock_keys(
        &self,
        index: u64,
        tablet_id: u64,
        start_ts: u64,
        lock: gpb::TxnLock,
        mutations: Vec<luna_proto::tablet::Mutation>,
    ) {
        let Ok(mut txns) = self.txns.lock() else {
            return;
        };
        for mutation in mutations {
            txns.install(
                tablet_id,
                Lock {
                    start_ts,
                    collection: lock.collection.clone(),
                    primary_collection: lock.primary_collection.clone(),
                    primary_key: lock.primary_key.clone(),
                    ttl_ms: lock.ttl_ms,
                    mutation,
                    prewrite_index: index,
                },
            );
        }
    }

    /// A commit or rollback: releases the transaction's locks on the keys, records the
    /// outcome for its primary, and returns what a commit writes.
    fn release_keys(
        &self,
        index: u64,
        tablet_id: u64,
        start_ts: u64,
        commit_ts: u64,
        resolve: gpb::TxnResolve,
    ) -> WriteBatch {
        let mut released = Vec::new();
        if let Ok(mut txns) = self.txns.lock() {
            for key in &resolve.keys {
                if let Some(lock) = txns.release(tablet_id, key, start_ts, index) {
                    released.push(lock.mutation);
                }
            }
            if !resolve.primary_key.is_empty() {
                txns.decide(tablet_id, resolve.primary_key, start_ts, commit_ts, index);
            }
        }
        if commit_ts == 0 {
            WriteBatch::new()
        } else {
            to_batch(&released)
        }
    }

    /// The dedup table. Its operations do not panic, and a replica that skipped or applied
    /// every request because some other panic poisoned the lock would part ways with the
    /// others, so a poisoned lock is taken as it is.
    pub(super) fn dedup(&self) -> MutexGuard<'_, Dedup> {
        self.dedup.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn dedup_get(&self, key: &RequestKey) -> Option<Applied> {
        self.dedup().get(key)
    }

    /// How many writes and clients the dedup table remembers.
    pub(crate) fn dedup_stats(&self) -> (usize, usize) {
        self.dedup().counts()
    }

    /// What the dedup table says of `key`.
    pub(super) fn dedup_prior(&self, key: &RequestKey) -> Prior {
        self.dedup().prior(key)
    }

    pub(super) fn hosted_at(&self, tablet_id: u64, epoch: u64) -> Option<Hosted> {
        let tablets = self.tablets.read().ok()?;
        tablets
            .get(&tablet_id)
            .filter(|hosted| hosted.info.epoch == epoch)
            .cloned()
    }

    /// Opens a tablet that this group's log carries from index `opened_at` on.
    pub(super) async fn open_tablet(&self, info: TabletInfo, opened_at: u64) -> Result<()> {
        let current = self.hosted_epoch(info.id);
        // Epochs only go up. An older one comes from an assignment the leader read before
        // a split or an adoption applied here; reopening the tablet at it would take
        // writes the newer epoch's owner never sees.
        if current.is_some_and(|epoch| epoch >= info.epoch) {
            return Ok(());
        }
        if current.is_some() {
            self.close_tablet(info.id).await;
        }
        let tablet = retry_transient(self.id, "opening a tablet", || async {
            let base = self.ctx.stores.get(info.collection_id).await?;
            Ok(Tablet::open_replica_in(
                base,
                info.id,
                storage_range(&info),
                log_span(info.epoch, opened_at),
                self.ctx.memstore,
                Arc::clone(&self.ctx.budget),
            )
            .await?)
        })
        .await?;
        tracing::info!(
            group = self.id,
            tablet = info.id,
            epoch = info.epoch,
            recovered_up_to = tablet.recovered_up_to(),
            "tablet opened"
        );
        self.ctx.tablet_groups.opened(info.id, self.id, info.epoch);
        if let Ok(mut tablets) = self.tablets.write() {
            tablets.insert(
                info.id,
                Hosted {
                    info: Arc::new(info),
                    tablet,
                    load: Arc::default(),
                },
            );
        }
        self.tablets_changed.notify_waiters();
        Ok(())
    }

    pub(super) async fn close_tablet(&self, tablet_id: u64) {
        let removed = self
            .tablets
            .write()
            .ok()
            .and_then(|mut tablets| tablets.remove(&tablet_id));
        self.forget_seal(tablet_id);
        let Some(hosted) = removed else {
            return;
        };
        if self.ctx.tablet_groups.closed(tablet_id, self.id) {
            self.ctx
                .tablet_groups
                .departed(tablet_id, hosted.info.epoch);
        }
        if let Err(error) = hosted.tablet.close().await {
            tracing::warn!(group = self.id, tablet = tablet_id, %error, "closing tablet");
        }
        self.tablets_changed.notify_waiters();
        tracing::info!(group = self.id, tablet = tablet_id, "tablet closed");
    }

    /// The leader flushed a tablet: drop what is now in the BaseStore from this replica's
    /// memory (the leader's own handle already did). The log is truncated once the marker
    /// counts as applied.
    async fn apply_flushed(&self, flushed: gpb::TabletFlushed) -> Result<()> {
        if let Some(hosted) = self.hosted_at(flushed.tablet_id, flushed.epoch) {
            retry_transient(self.id, "applying a flush marker", || async {
                Ok(hosted.tablet.apply_flushed(flushed.flushed_up_to).await?)
            })
            .await?;
        }
        Ok(())
    }

    /// Rebuilds the group's state from a snapshot that stands for the log up to its index:
    /// the tablets it lists (opened from their BaseStores, which hold everything up to
    /// there), the dedup table, and the timestamp high-water mark.
    async fn install_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let state = gpb::GroupSnapshot::decode(snapshot.data).map_err(|error| {
            TabletServerError::CorruptEntry {
                group_id: self.id,
                index: snapshot.index,
                detail: format!("group snapshot: {error}"),
            }
        })?;
        let dedup = Dedup::from_snapshot(&state, snapshot.index);
        // Even a tablet the snapshot lists at the epoch it has here is reopened: its
        // MemStore lacks the entries the snapshot stands for, and its BaseStore version
        // may predate the flushes that hold them, so it would read as if they never were.
        for hosted in self.hosted() {
            self.close_tablet(hosted.info.id).await;
        }
        for info in state.tablets {
            self.open_tablet(info, snapshot.index).await?;
        }
        for seal in state.sealed {
            self.apply_seal(seal);
        }
        *self.dedup() = dedup;
        if let Ok(mut txns) = self.txns.lock() {
            *txns = TxnState::from_records(&state.txn_records, state.txn_safe_point);
        }
        self.max_applied_ts
            .fetch_max(state.max_commit_ts, Ordering::AcqRel);
        self.last_control_index
            .store(snapshot.index, Ordering::Release);
        self.truncated.fetch_max(snapshot.index, Ordering::AcqRel);
        self.applied.send_replace(snapshot.index);
        tracing::info!(
            group = self.id,
            index = snapshot.index,
            "group state restored from a snapshot"
        );
        Ok(())
    }
}

/// Runs `op` until it succeeds or fails for good. The apply loop must not skip an entry
/// (replicas would diverge) and should not stop on a slow or briefly failing object store,
/// so a transient failure is retried with backoff while the loop waits.
async fn retry_transient<T, F, Fut>(group_id: u64, what: &str, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        match op().await {
            Ok(value) => return Ok(value),
            Err(TabletServerError::Storage(error)) if error.is_retryable() => {
                tracing::warn!(group = group_id, %error, "{what} failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(error),
        }
    }
}

fn to_batch(mutations: &[luna_proto::tablet::Mutation]) -> WriteBatch {
    let mut batch = WriteBatch::new();
    for mutation in mutations {
        match mutation.op() {
            Op::Put => batch.put(mutation.key.clone(), mutation.value.clone()),
            Op::Delete => batch.delete(mutation.key.clone()),
        };
    }
    batch
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use luna_storage::StorageError;

    use super::*;

    #[tokio::test]
    async fn transient_storage_failures_are_retried_and_others_are_not() {
        let calls = AtomicU32::new(0);
        let value = retry_transient(1, "test", || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 | 1 => Err(TabletServerError::Storage(StorageError::Job {
                    job: "flush",
                    detail: "slow store".to_owned(),
                })),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(value.ok(), Some(7));
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let calls = AtomicU32::new(0);
        let failed: Result<()> = retry_transient(1, "test", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(TabletServerError::Storage(StorageError::InvalidArgument {
                message: "bad".to_owned(),
            }))
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a permanent error is not retried"
        );
    }
}
