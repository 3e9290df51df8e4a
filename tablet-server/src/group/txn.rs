//! The leader's side of transactions (docs/transactions.md): every check a transactional
//! request needs, made under latches on its keys, then one proposal that every replica
//! applies as is.
//!
//! A latch turns plain writes to its keys away while it is held, and is taken only once
//! every batch in flight that writes one of its keys has been applied (transactional
//! requests on the same keys wait for each other's latches). So the checks (the lock
//! table, the newest committed version) see every write ordered before the proposal, and
//! nothing can be ordered between the checks and the proposal.

use std::time::Duration;

use bytes::Bytes;
use luna_proto::group as gpb;
use luna_proto::tablet::check_txn_response::State;
use luna_proto::tablet::{CheckTxnResponse, Mutation};

use super::commit::{Clock, Stamp, WriteRequest, physical_now_ms};
use super::{Group, Hosted, RequestKey};
use crate::error::{Result, TabletServerError};

/// How long a transactional request waits for another's latch on one of its keys.
const LATCH_WAIT: Duration = Duration::from_secs(2);
/// How long a plain write turned away by a latch waits before its retry.
const LATCHED_RETRY_MS: u64 = 2;

/// One tablet's part of a transactional request, located and validated.
pub(crate) struct TabletPart<T> {
    pub(crate) hosted: Hosted,
    pub(crate) items: Vec<T>,
}

/// A prewrite (or a one-phase commit) of one transaction's writes in this group.
pub(crate) struct Prewrite {
    pub(crate) request_id: RequestKey,
    pub(crate) start_ts: u64,
    /// The locks' primary and TTL (each part adds its collection).
    pub(crate) lock: gpb::TxnLock,
    pub(crate) one_phase: bool,
    /// With `one_phase`: this group holds the primary key (in the first part's tablet) of
    /// a transaction whose other groups are prewritten, and commits above this, deciding
    /// the transaction (0: the whole transaction is here).
    pub(crate) commit_above: u64,
    /// Each tablet's mutations, with the name of its collection.
    pub(crate) parts: Vec<(String, TabletPart<Mutation>)>,
}

/// A commit (`commit_ts > 0`) or rollback of one transaction's locks in this group.
pub(crate) struct Resolve {
    pub(crate) request_id: RequestKey,
    pub(crate) start_ts: u64,
    pub(crate) commit_ts: u64,
    /// The transaction's primary key, when the request decides the transaction: it is in
    /// the first part's tablet.
    pub(crate) primary_key: Option<Bytes>,
    pub(crate) parts: Vec<TabletPart<Bytes>>,
}

/// Keys latched by one request, released when it is dropped.
struct Latch<'a> {
    group: &'a Group,
    keys: Vec<(u64, Bytes)>,
}

impl Drop for Latch<'_> {
    fn drop(&mut self) {
        if let Ok(mut clock) = self.group.clock.lock() {
            for key in &self.keys {
                clock.latched.remove(key);
            }
        }
        self.group.latches_released.notify_waiters();
    }
}

impl Group {
    /// Refuses a plain write to a key that a transaction has locked or is locking. Runs
    /// as the batch forms, under the clock lock, so after every earlier proposal.
    pub(super) fn check_unlocked(&self, clock: &Clock, requests: &[WriteRequest]) -> Result<()> {
        let Ok(txns) = self.txns.lock() else {
            return Err(TabletServerError::ShuttingDown);
        };
        if !txns.has_locks() && clock.latched.is_empty() {
            return Ok(());
        }
        for request in requests {
            for mutation in &request.mutations {
                if let Some(lock) = txns.lock(request.tablet_id, &mutation.key) {
                    return Err(TabletServerError::Locked(Box::new(lock.info())));
                }
                if clock
                    .latched
                    .contains(&(request.tablet_id, mutation.key.clone()))
                {
                    return Err(TabletServerError::Busy {
                        reason: "a transaction is locking the key".to_owned(),
                        retry_after_ms: LATCHED_RETRY_MS,
                    });
                }
            }
        }
        Ok(())
    }

    /// Refuses a read at `read_ts` of `key` that a transaction's lock keeps undecided.
    pub(crate) fn check_read(&self, tablet_id: u64, key: &Bytes, read_ts: u64) -> Result<()> {
        let txns = self
            .txns
            .lock()
            .map_err(|_| TabletServerError::ShuttingDown)?;
        match txns.blocking_read(tablet_id, key, read_ts) {
            Some(lock) => Err(TabletServerError::Locked(Box::new(lock.info()))),
            None => Ok(()),
        }
    }

    /// Refuses a scan at `read_ts` of `range` that a transaction's lock keeps undecided.
    pub(crate) fn check_scan(
        &self,
        tablet_id: u64,
        range: &luna_storage::KeyRange,
        read_ts: u64,
    ) -> Result<()> {
        let txns = self
            .txns
            .lock()
            .map_err(|_| TabletServerError::ShuttingDown)?;
        match txns.blocking_scan(tablet_id, range, read_ts) {
            Some(lock) => Err(TabletServerError::Locked(Box::new(lock.info()))),
            None => Ok(()),
        }
    }

    /// Latches `keys` (waiting for other requests' latches on them), then waits until
    /// every batch in flight that writes one of them is applied.
    async fn latch(&self, mut keys: Vec<(u64, Bytes)>) -> Result<Latch<'_>> {
        keys.sort();
        keys.dedup();
        let deadline = tokio::time::Instant::now() + LATCH_WAIT;
        let proposed = loop {
            let released = self.latches_released.notified();
            let taken = {
                let mut clock = self
                    .clock
                    .lock()
                    .map_err(|_| TabletServerError::ShuttingDown)?;
                if keys.iter().any(|key| clock.latched.contains(key)) {
                    None
                } else {
                    clock.latched.extend(keys.iter().cloned());
                    Some(clock.newest_writing(&keys))
                }
            };
            if let Some(proposed) = taken {
                break proposed;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(TabletServerError::Busy {
                    reason: "another transaction holds a latch on a key".to_owned(),
                    retry_after_ms: 10,
                });
            }
        };
        let latch = Latch { group: self, keys };
        let Some(proposed) = proposed else {
            return Ok(latch);
        };
        let mut done = self.batches_done.subscribe();
        tokio::time::timeout_at(deadline, done.wait_for(|done| *done >= proposed))
            .await
            .map_err(|_| TabletServerError::Busy {
                reason: "earlier writes are still being applied".to_owned(),
                retry_after_ms: 10,
            })?
            .map_err(|_| TabletServerError::ShuttingDown)?;
        Ok(latch)
    }

    /// Locks a transaction's keys in this group, or with `one_phase` commits them at once;
    /// returns the commit timestamp of a one-phase commit, else the timestamp the
    /// transaction must commit above.
    pub(crate) async fn prewrite(&self, prewrite: Prewrite) -> Result<u64> {
        if self.serving.borrow().is_none() {
            return Err(self.not_leader());
        }
        let one_phase = prewrite.one_phase;
        if let Some(applied) = self.dedup_get(&prewrite.request_id) {
            return match one_phase {
                true => Ok(applied.commit_ts),
                false => self.min_commit_ts(),
            };
        }
        self.check_above_safe_point(prewrite.start_ts)?;
        let keys = prewrite
            .parts
            .iter()
            .flat_map(|(_, part)| {
                part.items
                    .iter()
                    .map(|mutation| (part.hosted.info.id, mutation.key.clone()))
            })
            .collect();
        let _latch = self.latch(keys).await?;
        for (_, part) in &prewrite.parts {
            let tablet_id = part.hosted.info.id;
            if let Some(commit_ts) = self.check_not_decided(tablet_id, &prewrite)? {
                return Ok(commit_ts);
            }
            for mutation in &part.items {
                self.check_writable(&part.hosted, &mutation.key, prewrite.start_ts)
                    .await?;
            }
        }
        let stamp = if prewrite.one_phase {
            Stamp::Above(prewrite.start_ts.max(prewrite.commit_above))
        } else {
            Stamp::Unstamped
        };
        let requests = prewrite
            .parts
            .into_iter()
            .enumerate()
            .map(|(i, (collection, part))| {
                let kind = if prewrite.one_phase {
                    gpb::txn_write::Kind::OnePhase(true)
                } else {
                    gpb::txn_write::Kind::Prewrite(gpb::TxnLock {
                        collection,
                        ..prewrite.lock.clone()
                    })
                };
                // The primary's tablet records the outcome of a deciding commit.
                let decides = match i == 0 && prewrite.commit_above > 0 {
                    true => prewrite.lock.primary_key.clone(),
                    false => Bytes::new(),
                };
                WriteRequest {
                    tablet_id: part.hosted.info.id,
                    epoch: part.hosted.info.epoch,
                    request_id: prewrite.request_id.clone(),
                    mutations: part.items,
                    txn: Some(gpb::TxnWrite {
                        start_ts: prewrite.start_ts,
                        decides,
                        kind: Some(kind),
                    }),
                }
            })
            .collect();
        let commit_ts = self.commit_writes(requests, stamp).await?;
        match one_phase {
            true => Ok(commit_ts),
            false => self.min_commit_ts(),
        }
    }

    /// Above every timestamp this leader assigned or served a read at. Taken once the
    /// locks are applied: a read that registers its timestamp later meets them, and one
    /// that registered before is below this, so committing above it keeps that read
    /// repeatable.
    fn min_commit_ts(&self) -> Result<u64> {
        let clock = self
            .clock
            .lock()
            .map_err(|_| TabletServerError::ShuttingDown)?;
        Ok(clock.last_assigned().saturating_add(1))
    }

    /// Refuses a transaction that started below the GC safe point this group applied: what
    /// it read may be gone, and so may the outcome records that would resolve its locks.
    fn check_above_safe_point(&self, start_ts: u64) -> Result<()> {
        let txns = self
            .txns
            .lock()
            .map_err(|_| TabletServerError::ShuttingDown)?;
        let safe_point = txns.safe_point();
        if start_ts < safe_point {
            return Err(TabletServerError::SnapshotTooOld {
                read_ts: start_ts,
                safe_point,
            });
        }
        Ok(())
    }

    /// Locked keys, kept outcomes and the applied safe point, for metrics.
    pub(crate) fn txn_stats(&self) -> (usize, usize, u64) {
        self.txns.lock().map_or((0, 0, 0), |txns| {
            let (locks, records) = txns.counts();
            (locks, records, txns.safe_point())
        })
    }

    /// No lock of a transaction that started below this is held in the group or can be
    /// taken any more (for the master's transaction record floor).
    pub(crate) fn lock_floor(&self) -> u64 {
        self.txns.lock().map_or(0, |txns| txns.lock_floor())
    }

    /// On the leader: has the log carry the master's GC safe point and transaction record
    /// floor, if that changes anything.
    pub(crate) async fn collect_txn_garbage(&self, safe_point: u64, record_floor: u64) {
        if self.serving.borrow().is_none() {
            return;
        }
        let due = self
            .txns
            .lock()
            .is_ok_and(|txns| txns.collectable(safe_point, record_floor));
        if !due {
            return;
        }
        let gc = gpb::TxnGc {
            safe_point,
            record_floor,
        };
        if let Err(error) = self.propose(gpb::group_entry::Kind::TxnGc(gc)).await {
            tracing::debug!(group = self.id, %error, "proposing transaction GC");
        }
    }

    /// A prewrite of a transaction already decided here (a late retry, or one its primary
    /// was rolled back under) must not lock anything again. A deciding commit of a
    /// transaction that committed already is answered with its commit timestamp.
    fn check_not_decided(&self, tablet_id: u64, prewrite: &Prewrite) -> Result<Option<u64>> {
        let txns = self
            .txns
            .lock()
            .map_err(|_| TabletServerError::ShuttingDown)?;
        match txns.outcome(tablet_id, &prewrite.lock.primary_key, prewrite.start_ts) {
            Some(commit_ts) if commit_ts > 0 && prewrite.commit_above > 0 => Ok(Some(commit_ts)),
            Some(_) => Err(TabletServerError::TxnAborted {
                start_ts: prewrite.start_ts,
            }),
            None => Ok(None),
        }
    }

    /// Fails if another transaction locks `key`, or a version of it committed at or after
    /// `start_ts` (the first committer wins).
    async fn check_writable(&self, hosted: &Hosted, key: &Bytes, start_ts: u64) -> Result<()> {
        {
            let txns = self
                .txns
                .lock()
                .map_err(|_| TabletServerError::ShuttingDown)?;
            if let Some(lock) = txns.lock(hosted.info.id, key)
                && lock.start_ts != start_ts
            {
                return Err(TabletServerError::Locked(Box::new(lock.info())));
            }
        }
        let newest = hosted.tablet.get_version(key, u64::MAX).await?;
        match newest.ts() {
            Some(commit_ts) if commit_ts >= start_ts => Err(TabletServerError::WriteConflict {
                key: key.clone(),
                commit_ts,
            }),
            _ => Ok(()),
        }
    }

    /// Commits or rolls back a transaction's locks in this group. When the request names
    /// the primary, this decides the transaction: a commit needs the primary's lock (or an
    /// earlier commit), and a transaction rolled back cannot commit.
    pub(crate) async fn resolve(&self, resolve: Resolve) -> Result<()> {
        if self.serving.borrow().is_none() {
            return Err(self.not_leader());
        }
        if self.dedup_get(&resolve.request_id).is_some() {
            return Ok(());
        }
        let keys = resolve
            .parts
            .iter()
            .flat_map(|part| {
                part.items
                    .iter()
                    .map(|key| (part.hosted.info.id, key.clone()))
            })
            .collect();
        let _latch = self.latch(keys).await?;
        self.resolve_latched(resolve).await
    }

    /// [`Group::resolve`] once the request's keys are latched.
    async fn resolve_latched(&self, resolve: Resolve) -> Result<()> {
        if let (Some(primary), Some(first)) = (&resolve.primary_key, resolve.parts.first())
            && self.primary_decided(first.hosted.info.id, primary, &resolve)?
        {
            return Ok(());
        }
        let stamp = match resolve.commit_ts {
            0 => Stamp::Unstamped,
            commit_ts => Stamp::Given(commit_ts),
        };
        let primary_tablet = resolve.parts.first().map(|part| part.hosted.info.id);
        let requests = resolve
            .parts
            .into_iter()
            .map(|part| {
                let tablet_id = part.hosted.info.id;
                WriteRequest {
                    tablet_id,
                    epoch: part.hosted.info.epoch,
                    request_id: resolve.request_id.clone(),
                    mutations: Vec::new(),
                    txn: Some(gpb::TxnWrite {
                        start_ts: resolve.start_ts,
                        decides: Bytes::new(),
                        kind: Some(gpb::txn_write::Kind::Resolve(gpb::TxnResolve {
                            keys: part.items,
                            primary_key: resolve
                                .primary_key
                                .clone()
                                .filter(|_| Some(tablet_id) == primary_tablet)
                                .unwrap_or_default(),
                        })),
                    }),
                }
            })
            .collect();
        self.commit_writes(requests, stamp).await.map(|_| ())
    }

    /// Whether the transaction whose primary is `primary` was decided already the way
    /// `resolve` asks (nothing left to do); an error if it was decided the other way, or if
    /// a commit finds neither the primary's lock nor an outcome.
    fn primary_decided(&self, tablet_id: u64, primary: &Bytes, resolve: &Resolve) -> Result<bool> {
        let txns = self
            .txns
            .lock()
            .map_err(|_| TabletServerError::ShuttingDown)?;
        let locked = txns
            .lock(tablet_id, primary)
            .is_some_and(|lock| lock.start_ts == resolve.start_ts);
        match (
            txns.outcome(tablet_id, primary, resolve.start_ts),
            resolve.commit_ts,
        ) {
            (Some(0), 0) => Ok(true),
            (Some(0), _) => Err(TabletServerError::TxnAborted {
                start_ts: resolve.start_ts,
            }),
            (Some(_), 0) => Err(TabletServerError::InvalidArgument(format!(
                "transaction {} committed: it cannot be rolled back",
                resolve.start_ts
            ))),
            (Some(_), _) => Ok(true),
            (None, 0) => Ok(false),
            (None, _) if locked => Ok(false),
            (None, _) => Err(TabletServerError::TxnAborted {
                start_ts: resolve.start_ts,
            }),
        }
    }

    /// What became of the transaction `start_ts` whose primary is `primary` in `hosted`:
    /// committed, rolled back, or still locked. A transaction whose primary lock expired, or
    /// that never locked its primary, is rolled back first.
    pub(crate) async fn check_txn(
        &self,
        hosted: Hosted,
        primary: Bytes,
        start_ts: u64,
        caller_lock_ttl_ms: u64,
        request_id: RequestKey,
    ) -> Result<CheckTxnResponse> {
        if self.serving.borrow().is_none() {
            return Err(self.not_leader());
        }
        let tablet_id = hosted.info.id;
        let _latch = self.latch(vec![(tablet_id, primary.clone())]).await?;
        {
            let txns = self
                .txns
                .lock()
                .map_err(|_| TabletServerError::ShuttingDown)?;
            match txns.outcome(tablet_id, &primary, start_ts) {
                Some(0) => return Ok(state(State::RolledBack, 0, 0)),
                Some(commit_ts) => return Ok(state(State::Committed, commit_ts, 0)),
                None => {}
            }
            // The primary's own lock, or while it has none (its group decides the
            // transaction last, without locking), the lock the caller met.
            let ttl_ms = txns
                .lock(tablet_id, &primary)
                .filter(|lock| lock.start_ts == start_ts)
                .map_or(caller_lock_ttl_ms, |lock| lock.ttl_ms);
            let expires_ms = (start_ts >> super::commit::LOGICAL_BITS).saturating_add(ttl_ms);
            let now_ms = physical_now_ms();
            if now_ms < expires_ms {
                return Ok(state(State::Locked, 0, expires_ms - now_ms));
            }
        }
        self.resolve_latched(Resolve {
            request_id,
            start_ts,
            commit_ts: 0,
            primary_key: Some(primary.clone()),
            parts: vec![TabletPart {
                hosted,
                items: vec![primary],
            }],
        })
        .await?;
        Ok(state(State::RolledBack, 0, 0))
    }
}

fn state(state: State, commit_ts: u64, ttl_remaining_ms: u64) -> CheckTxnResponse {
    CheckTxnResponse {
        error: None,
        state: state as i32,
        commit_ts,
        ttl_remaining_ms,
    }
}
