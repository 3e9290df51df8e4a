//! A tablet moving between groups, on the groups' side (the protocol is in
//! docs/elasticity.md; the master drives it).
//!
//! The old group *seals* the tablet with a log entry: from that entry on, every replica
//! refuses the tablet's writes, prewrites, deciding commits and reads, and resolves only
//! the locks it already holds. Its leader waits until no lock is left, flushes the tablet
//! to its BaseStore, and answers the *handoff*: what its log knew about the tablet that
//! the BaseStore does not hold (the transaction outcomes of primaries in it, the requests
//! it applied recently, and the highest timestamp it used). The new group *adopts* the
//! tablet with a log entry that carries the handoff, and claims it in the manifest, which
//! fences the old group out of it for good.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use luna_proto::group as gpb;
use tokio::time::Instant;

use super::{Group, Hosted, LOGICAL_BITS, owner_epoch};
use crate::error::{Result, TabletServerError};

/// Whether a sealed tablet will do for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sealed {
    /// No: the tablet is moving (reads, writes, prewrites, transaction checks).
    Refuse,
    /// Yes: resolving the locks a sealed tablet still holds is what lets its move go on.
    Allow,
}

/// How long a seal waits for the tablet's locks to be resolved before the move gives up
/// (and the tablet is unsealed). Live transactions resolve theirs within milliseconds;
/// a dead client's lock waits for a reader to meet it.
const LOCK_DRAIN: Duration = Duration::from_secs(5);

/// How long a seal waits for a new leader to claim the tablet before it tries again later.
const CLAIM_WAIT: Duration = Duration::from_secs(5);

/// How often the waits above look again.
const POLL: Duration = Duration::from_millis(5);

/// At most this many flushes ahead of a seal (see [`Group::prepare_move`]).
const FLUSHES_AHEAD: usize = 4;

/// A MemStore tail this small is left for the seal: flushing it takes a few
/// milliseconds, about the fixed cost of a flush.
const SEAL_TAIL_BYTES: u64 = 256 << 10;

/// How far back the handoff takes applied requests: clients retry a write within their
/// operation deadline, which is seconds.
const RETRY_WINDOW_MS: u64 = 60_000;

/// At most this many applied requests go along with a tablet.
const RETRY_RECORDS: usize = 50_000;

impl Group {
    /// The seal on tablet `tablet_id`, if it is sealed for a move.
    pub(crate) fn seal_of(&self, tablet_id: u64) -> Option<gpb::SealTablet> {
        self.sealed.lock().ok()?.get(&tablet_id).cloned()
    }

    /// The tablets sealed for a move, for a snapshot of the group.
    pub(super) fn seals(&self) -> Vec<gpb::SealTablet> {
        let mut seals: Vec<gpb::SealTablet> = self
            .sealed
            .lock()
            .map(|sealed| sealed.values().cloned().collect())
            .unwrap_or_default();
        seals.sort_by_key(|seal| seal.tablet_id);
        seals
    }

    /// On the leader: seals tablet `tablet_id` (hosted at `epoch`) for its move to
    /// `next_epoch`, or finds it sealed, then waits until it holds no lock and is flushed,
    /// and answers the handoff with the MemStore bytes it flushed. Gives up (unsealing the
    /// tablet) if locks stay.
    pub(crate) async fn seal_for_move(
        &self,
        tablet_id: u64,
        epoch: u64,
        next_epoch: u64,
    ) -> Result<(gpb::TabletHandoff, u64)> {
        let (_, flushed_bytes) = self.seal_and_flush(tablet_id, epoch, next_epoch).await?;
        Ok((self.handoff(tablet_id), flushed_bytes))
    }

    /// On the leader: seals tablet `tablet_id` (hosted at `epoch`) for `next_epoch` (a
    /// move or a split), or finds it sealed, then waits until it holds no lock and is
    /// flushed, and answers it with the MemStore bytes it flushed. Gives up (unsealing the
    /// tablet) if locks stay.
    pub(super) async fn seal_and_flush(
        &self,
        tablet_id: u64,
        epoch: u64,
        next_epoch: u64,
    ) -> Result<(Hosted, u64)> {
        self.check_leads()?;
        let hosted = self.tablet_for(tablet_id, epoch, Sealed::Allow)?;
        if next_epoch <= epoch {
            return Err(TabletServerError::InvalidArgument(format!(
                "tablet {tablet_id} cannot move from epoch {epoch} to {next_epoch}"
            )));
        }
        let seal = gpb::SealTablet {
            tablet_id,
            epoch,
            next_epoch,
        };
        let started = Instant::now();
        if self.seal_of(tablet_id).as_ref() != Some(&seal) {
            self.propose(gpb::group_entry::Kind::SealTablet(seal))
                .await?;
        }
        // No lock can be taken any more; the ones held are resolved by their transactions.
        let drained_by = Instant::now() + LOCK_DRAIN;
        loop {
            let locks = self.txns.lock().map_or(0, |txns| txns.locks_in(tablet_id));
            if locks == 0 {
                break;
            }
            if Instant::now() >= drained_by {
                self.propose(gpb::group_entry::Kind::UnsealTablet(seal))
                    .await?;
                return Err(TabletServerError::LocksHeld { tablet_id, locks });
            }
            tokio::time::sleep(POLL).await;
        }
        let drained = started.elapsed();
        let flushed_bytes = self.memory_bytes(tablet_id);
        self.flush_moving(&hosted.tablet, next_epoch).await?;
        tracing::info!(
            group = self.id,
            tablet = tablet_id,
            flushed_bytes,
            sealed_and_drained_ms = drained.as_millis(),
            flushed_ms = started.elapsed().as_millis(),
            "tablet sealed"
        );
        Ok((hosted, flushed_bytes))
    }

    /// On the leader: flushes tablet `tablet_id` (hosted at `epoch`) ahead of its seal,
    /// while it takes writes, and answers the MemStore bytes flushed.
    ///
    /// What the tablet takes while one flush runs is left for the seal to flush, inside
    /// the move's unavailability window: megabytes when a large flush meets a busy
    /// tablet (a 7.7 MB tail once took the seal 139 ms). So the flush repeats, each one
    /// shorter than the last, until the tail is small.
    pub(crate) async fn prepare_move(
        &self,
        tablet_id: u64,
        epoch: u64,
        next_epoch: u64,
    ) -> Result<u64> {
        self.check_leads()?;
        let hosted = self.tablet_for(tablet_id, epoch, Sealed::Allow)?;
        let mut flushed_bytes = 0;
        for flush in 0..FLUSHES_AHEAD {
            let tail = self.memory_bytes(tablet_id);
            if flush > 0 && tail <= SEAL_TAIL_BYTES {
                break;
            }
            flushed_bytes += tail;
            self.flush_moving(&hosted.tablet, next_epoch).await?;
        }
        Ok(flushed_bytes)
    }

    /// On the leader: unseals tablet `tablet_id` (its move was cancelled before the switch).
    pub(crate) async fn cancel_seal(&self, tablet_id: u64, epoch: u64) -> Result<()> {
        self.check_leads()?;
        if let Some(seal) = self.seal_of(tablet_id).filter(|seal| seal.epoch == epoch) {
            self.propose(gpb::group_entry::Kind::UnsealTablet(seal))
                .await?;
        }
        Ok(())
    }

    /// Makes every write the tablet applied durable in its BaseStore. Nothing is left to
    /// flush once the new group claimed the tablet: it claims only after a seal answered,
    /// and a sealed tablet takes no more writes.
    async fn flush_moving(
        &self,
        tablet: &Arc<luna_storage::Tablet>,
        next_epoch: u64,
    ) -> Result<()> {
        let moved_on = || {
            tablet
                .base()
                .version()
                .tablet(tablet.id())
                .is_some_and(|recorded| recorded.epoch >= owner_epoch(next_epoch, 0))
        };
        let claimed_by = Instant::now() + CLAIM_WAIT;
        while tablet.epoch().is_none() && !moved_on() {
            if Instant::now() >= claimed_by {
                return Err(TabletServerError::Busy {
                    reason: format!("tablet {} is not claimed by this leader yet", tablet.id()),
                    retry_after_ms: 100,
                });
            }
            tokio::time::sleep(POLL).await;
        }
        match tablet.flush().await {
            Ok(()) => Ok(()),
            Err(_) if moved_on() => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// What tablet `tablet_id` takes along to its new group.
    fn handoff(&self, tablet_id: u64) -> gpb::TabletHandoff {
        let min_ts = self
            .clock
            .lock()
            .map_or(0, |clock| clock.last_assigned())
            .max(self.max_applied_ts());
        let txn_records = self
            .txns
            .lock()
            .map(|txns| txns.records_of(tablet_id))
            .unwrap_or_default();
        let retry_floor = min_ts.saturating_sub(RETRY_WINDOW_MS << LOGICAL_BITS);
        let recent = self.dedup().recent(retry_floor, RETRY_RECORDS);
        gpb::TabletHandoff {
            min_ts,
            txn_records,
            recent: Some(recent),
            ..gpb::TabletHandoff::default()
        }
    }

    /// On the leader: has the group host a tablet that moved here, with its handoff.
    /// Adopting it again at the same epoch does nothing.
    pub(crate) async fn adopt(&self, adopt: gpb::AdoptTablet) -> Result<()> {
        self.check_leads()?;
        let Some(info) = adopt.tablet.as_ref() else {
            return Err(TabletServerError::InvalidArgument(
                "an adoption names no tablet".to_owned(),
            ));
        };
        if info.group_id != self.id {
            return Err(TabletServerError::InvalidArgument(format!(
                "tablet {} is routed to group {}, not {}",
                info.id, info.group_id, self.id
            )));
        }
        let (tablet_id, epoch) = (info.id, info.epoch);
        if self.tablet(tablet_id, epoch).is_err() {
            let started = Instant::now();
            self.propose(gpb::group_entry::Kind::AdoptTablet(adopt))
                .await?;
            tracing::info!(
                group = self.id,
                tablet = tablet_id,
                epoch,
                applied_ms = started.elapsed().as_millis(),
                "tablet adopted"
            );
        }
        self.tablet(tablet_id, epoch).map(|_| ())
    }

    pub(super) fn check_leads(&self) -> Result<()> {
        if self.serving.borrow().is_none() {
            return Err(self.not_leader());
        }
        Ok(())
    }

    /// Applies a seal: the tablet, if hosted at the sealed epoch, takes no more writes.
    pub(super) fn apply_seal(&self, seal: gpb::SealTablet) {
        if self.hosted_at(seal.tablet_id, seal.epoch).is_some()
            && let Ok(mut sealed) = self.sealed.lock()
        {
            sealed.insert(seal.tablet_id, seal);
        }
    }

    /// Applies an unseal: the tablet takes writes again.
    pub(super) fn apply_unseal(&self, seal: &gpb::SealTablet) {
        if let Ok(mut sealed) = self.sealed.lock()
            && sealed.get(&seal.tablet_id) == Some(seal)
        {
            sealed.remove(&seal.tablet_id);
        }
    }

    /// Forgets the seal of a tablet that closed.
    pub(super) fn forget_seal(&self, tablet_id: u64) {
        if let Ok(mut sealed) = self.sealed.lock() {
            sealed.remove(&tablet_id);
        }
    }

    /// Applies an adoption at `index`: takes over the outcomes, applied requests and
    /// timestamp floor the tablet's old group handed over, then opens the tablet.
    pub(super) async fn apply_adopt(&self, adopt: gpb::AdoptTablet, index: u64) -> Result<()> {
        let Some(info) = adopt.tablet else {
            return Err(TabletServerError::CorruptEntry {
                group_id: self.id,
                index,
                detail: "an adoption without its tablet".to_owned(),
            });
        };
        if self
            .hosted_epoch(info.id)
            .is_some_and(|epoch| epoch >= info.epoch)
        {
            // A late duplicate of an adoption (the master retried it): epochs only go up.
            return Ok(());
        }
        let handoff = adopt.handoff.unwrap_or_default();
        if let Ok(mut txns) = self.txns.lock() {
            for record in handoff.txn_records {
                txns.decide(
                    record.tablet_id,
                    record.primary_key,
                    record.start_ts,
                    record.commit_ts,
                    index,
                );
            }
        }
        self.dedup()
            .insert_handed_off(handoff.recent.as_ref(), &handoff.recent_requests, index);
        self.max_applied_ts
            .fetch_max(handoff.min_ts, Ordering::AcqRel);
        if let Ok(mut clock) = self.clock.lock() {
            clock.raise(handoff.min_ts);
        }
        // Last: once the tablet is open, the leader stamps writes to it, and a stamp from
        // the clock before the raise could be below a version of the old group (whose clock
        // can run ahead of the wall clock, from a TSO window after a master failover): reads
        // would then see the older write as the newer. The records and request ids go
        // first for the same reason: a retried write must find them.
        self.open_tablet(info, index).await
    }

    /// Whether `unit` touches a sealed tablet in a way a seal forbids: anything but
    /// resolving a lock the tablet holds. A resolve that would record an outcome for a
    /// primary that holds no lock here is refused too: the records were (or are about to
    /// be) handed over, and the client's retry records it in the new group instead.
    pub(super) fn refused_by_seal(&self, unit: &[gpb::TabletWrite]) -> bool {
        let Ok(sealed) = self.sealed.lock() else {
            return false;
        };
        if sealed.is_empty() {
            return false;
        }
        let Ok(txns) = self.txns.lock() else {
            return true;
        };
        unit.iter().any(|write| {
            if !sealed.contains_key(&write.tablet_id) {
                return false;
            }
            match write
                .txn
                .as_ref()
                .and_then(|txn| txn.kind.as_ref().map(|kind| (txn, kind)))
            {
                Some((txn, gpb::txn_write::Kind::Resolve(resolve))) => {
                    !resolve.primary_key.is_empty()
                        && txns
                            .lock(write.tablet_id, &resolve.primary_key)
                            .is_none_or(|lock| lock.start_ts != txn.start_ts)
                }
                _ => true,
            }
        })
    }
}
