//! Leadership of a group replica: taking over as leader, owning the tablets while it
//! leads, and stepping down.
//!
//! Taking over, in order: catch up (a ReadIndex barrier, then apply up to it) so the
//! replica has every tablet and every timestamp the old leader committed; take a fresh TSO
//! timestamp as the floor of its commit timestamps; start the write batcher. Then, while
//! it leads, an owner loop claims every hosted tablet in its BaseStore (fencing the old
//! leader out of the manifest) and records each flush in the log, so followers drop the
//! flushed data and the log can be truncated.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use luna_kernel::stream::{Leadership, Stream};
use luna_proto::group as gpb;

use super::{Group, owner_epoch};
use crate::error::Result;

/// How often the owner loop looks for new flushes and unclaimed tablets.
const OWNER_POLL: Duration = Duration::from_millis(200);
/// How often a leader measures its tablets' data sizes.
const SIZE_EVERY: Duration = Duration::from_secs(5);
/// Pause between attempts to take over (the TSO or the barrier failing).
const TAKEOVER_RETRY: Duration = Duration::from_millis(100);

/// Follows the stream's leadership for as long as the group exists.
pub(super) async fn run(group: Weak<Group>) {
    let Some(mut leadership) = group.upgrade().map(|group| group.stream.watch_leadership()) else {
        return;
    };
    loop {
        let current: Leadership = *leadership.borrow_and_update();
        let Some(group) = group.upgrade() else {
            return;
        };
        let serving_term = group.serving.borrow().as_ref().map(|serving| serving.term);
        if current.is_leader && serving_term != Some(current.term) {
            if serving_term.is_some() {
                group.step_down();
            }
            match group.take_over(current.term).await {
                Ok(()) => {
                    let owner = tokio::spawn(own_tablets(Arc::downgrade(&group), current.term));
                    group.track(owner.abort_handle());
                }
                Err(error) => {
                    tracing::info!(group = group.id, term = current.term, %error, "taking over as leader failed; retrying");
                    drop(group);
                    tokio::time::sleep(TAKEOVER_RETRY).await;
                    continue;
                }
            }
        } else if !current.is_leader && serving_term.is_some() {
            group.step_down();
        }
        drop(group);
        if leadership.changed().await.is_err() {
            return;
        }
    }
}

impl Group {
    async fn take_over(&self, term: u64) -> Result<()> {
        // Logged so an operator can tell a slow election from a slow takeover.
        let started = std::time::Instant::now();
        self.catch_up().await?;
        let caught_up = started.elapsed();
        let tso = self.ctx.master.timestamp().await?;
        let leadership = self.stream.leadership();
        if !leadership.is_leader || leadership.term != term {
            return Err(self.not_leader());
        }
        if !self.dedup().learns() {
            // Until this entry the table applies writes as builds before 2026-12-04 did;
            // it makes every replica start learning at the same index, whatever snapshot
            // of such a build it started from.
            self.propose(gpb::group_entry::Kind::DedupLearning(gpb::DedupLearning {}))
                .await?;
        }
        let floor = tso.max(self.max_applied_ts() + 1);
        self.start_serving(term, floor);
        tracing::info!(
            group = self.id,
            term,
            floor,
            catch_up_ms = caught_up.as_millis() as u64,
            takeover_ms = started.elapsed().as_millis() as u64,
            "serving as leader"
        );
        Ok(())
    }

    fn serves_term(&self, term: u64) -> bool {
        self.serving
            .borrow()
            .as_ref()
            .is_some_and(|serving| serving.term == term)
    }

    /// Stops taking writes and hands the tablets back to replica mode, so this replica
    /// never writes to a manifest the new leader owns.
    fn step_down(&self) {
        self.serving.send_replace(None);
        for hosted in self.hosted() {
            hosted.tablet.release();
        }
        tracing::info!(group = self.id, "stepped down");
    }
}

/// While `term` lasts: claims hosted tablets and records their flushes in the log.
async fn own_tablets(group: Weak<Group>, term: u64) {
    // Tablet id to (claimed owner epoch, flushed index already recorded in the log).
    let mut owned: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut measured = None;
    loop {
        let Some(group) = group.upgrade() else {
            return;
        };
        if !group.serves_term(term) {
            return;
        }
        let changed = group.tablets_changed.notified();
        let hosted = group.hosted();
        owned.retain(|tablet_id, _| hosted.iter().any(|hosted| hosted.info.id == *tablet_id));
        for hosted in hosted {
            let epoch = owner_epoch(hosted.info.epoch, term);
            let recorded = match owned.get(&hosted.info.id) {
                Some(&(claimed, recorded)) if claimed == epoch => recorded,
                _ => match hosted.tablet.claim(epoch).await {
                    Ok(()) if !group.serves_term(term) => {
                        // Stepped down while claiming: step_down's release may have run
                        // before the claim finished (and a newer term may own it by now).
                        hosted.tablet.release_at(epoch);
                        return;
                    }
                    Ok(()) => {
                        owned.insert(hosted.info.id, (epoch, 0));
                        0
                    }
                    Err(error) => {
                        tracing::warn!(group = group.id, tablet = hosted.info.id, epoch, %error, "cannot claim tablet");
                        continue;
                    }
                },
            };
            let flushed = *hosted.tablet.watch_flushed().borrow();
            if flushed > recorded {
                let marker = gpb::TabletFlushed {
                    tablet_id: hosted.info.id,
                    epoch: hosted.info.epoch,
                    flushed_up_to: flushed,
                };
                match group.propose(gpb::group_entry::Kind::Flushed(marker)).await {
                    Ok(_) => {
                        group.ctx.metrics.flushes_recorded.inc();
                        owned.insert(hosted.info.id, (epoch, flushed));
                    }
                    Err(error) => {
                        tracing::debug!(group = group.id, %error, "recording a flush");
                    }
                }
            }
        }
        flush_laggards(&group).await;
        measure_sizes(&group, &mut measured).await;
        // Holding the group while waiting is fine: stopping it aborts this task.
        tokio::select! {
            () = changed => {}
            () = tokio::time::sleep(OWNER_POLL) => {}
        }
    }
}

/// Flushes the owned tablets whose oldest unflushed write lies more than
/// `flush_behind_entries` entries behind the group's log, so that the log can be
/// truncated past it (see `TabletServerConfig::flush_behind_entries`).
async fn flush_laggards(group: &Group) {
    let applied = group.applied_index();
    for hosted in group.hosted() {
        let tablet = &hosted.tablet;
        let behind = applied.saturating_sub(tablet.flushed_up_to());
        if tablet.epoch().is_none()
            || behind <= group.ctx.flush_behind_entries
            || !hosted.holds_writes()
        {
            continue;
        }
        tracing::debug!(
            group = group.id,
            tablet = hosted.info.id,
            behind,
            "flushing a tablet that holds the log back"
        );
        if let Err(error) = tablet.flush().await {
            tracing::debug!(group = group.id, tablet = hosted.info.id, %error, "flushing a tablet that holds the log back");
        }
    }
}

/// Measures the hosted tablets' data sizes (in tables and in memory) for the heartbeats,
/// which the master's automatic splits read, every `SIZE_EVERY`.
async fn measure_sizes(group: &Group, measured: &mut Option<Instant>) {
    if measured.is_some_and(|at| at.elapsed() < SIZE_EVERY) {
        return;
    }
    *measured = Some(Instant::now());
    for hosted in group.hosted() {
        match hosted.tablet.base().range_size(hosted.tablet.range()).await {
            Ok(size) => {
                let size = size.saturating_add(group.memory_bytes(hosted.info.id));
                hosted.load.size_bytes.store(size, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::debug!(group = group.id, tablet = hosted.info.id, %error, "measuring a tablet");
            }
        }
    }
}
