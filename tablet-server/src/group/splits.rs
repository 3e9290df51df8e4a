//! A tablet splitting in two within its group (docs/elasticity.md), on the group's side.
//!
//! The leader seals the tablet as for a move (no writes, locks drained, MemStore flushed),
//! then appends a `SplitTablet` entry. Every replica applies it the same way: the tablet
//! closes, and its two halves open over the same BaseStore with empty MemStores (all of the
//! tablet's writes are in tables by then), and the outcome records of transactions whose
//! primary is in the right half follow it. No table is rewritten: both halves read the same
//! tables, and compaction cuts them at the new boundary later.

use bytes::Bytes;
use luna_proto::group as gpb;
use luna_proto::master::{KeyRange, TabletInfo};

use super::{Group, Sealed, storage_range};
use crate::error::{Result, TabletServerError};

/// Where a split happened, and the MemStore bytes it flushed.
pub(crate) struct Split {
    pub(crate) at: Bytes,
    pub(crate) flushed_bytes: u64,
}

impl Group {
    /// On the leader: splits tablet `tablet_id` (hosted at `epoch`) at `at` (empty: where
    /// its data halves by size) into itself, one epoch up, and tablet `new_tablet_id`.
    /// Splitting it again answers where it split.
    pub(crate) async fn split(
        &self,
        tablet_id: u64,
        epoch: u64,
        new_tablet_id: u64,
        at: Bytes,
    ) -> Result<Split> {
        self.check_leads()?;
        if let Some(done) = self.split_done(tablet_id, epoch, new_tablet_id) {
            return Ok(done);
        }
        let (hosted, flushed_bytes) = self.seal_and_flush(tablet_id, epoch, epoch + 1).await?;
        let range = storage_range(&hosted.info);
        let at = if at.is_empty() {
            hosted
                .tablet
                .base()
                .split_key(&range)
                .await?
                .ok_or_else(|| {
                    TabletServerError::InvalidArgument(format!(
                        "tablet {tablet_id} has no data to split in the middle of; give a key"
                    ))
                })?
        } else {
            at
        };
        if at <= range.start || !range.contains(&at) {
            return Err(TabletServerError::InvalidArgument(format!(
                "the split key {:?} is not inside tablet {tablet_id}",
                String::from_utf8_lossy(&at)
            )));
        }
        let end = hosted.info.range.as_ref().and_then(|r| r.end.clone());
        let start = hosted.info.range.as_ref().map(|r| r.start.clone());
        let left = TabletInfo {
            epoch: epoch + 1,
            range: Some(KeyRange {
                start: start.unwrap_or_default(),
                end: Some(at.to_vec()),
            }),
            ..TabletInfo::clone(&hosted.info)
        };
        let right = TabletInfo {
            id: new_tablet_id,
            epoch: epoch + 1,
            range: Some(KeyRange {
                start: at.to_vec(),
                end,
            }),
            ..TabletInfo::clone(&hosted.info)
        };
        let split = gpb::SplitTablet {
            left: Some(left),
            right: Some(right),
        };
        self.propose(gpb::group_entry::Kind::SplitTablet(split))
            .await?;
        self.split_done(tablet_id, epoch, new_tablet_id)
            .map(|done| Split {
                flushed_bytes,
                ..done
            })
            .ok_or_else(|| TabletServerError::Internal(format!("tablet {tablet_id} did not split")))
    }

    /// On the leader: unseals tablet `tablet_id` for a cancelled split, unless it has split
    /// already (then answers where).
    pub(crate) async fn cancel_split(
        &self,
        tablet_id: u64,
        epoch: u64,
        new_tablet_id: u64,
    ) -> Result<Option<Split>> {
        self.check_leads()?;
        if let Some(done) = self.split_done(tablet_id, epoch, new_tablet_id) {
            return Ok(Some(done));
        }
        self.cancel_seal(tablet_id, epoch).await?;
        Ok(None)
    }

    /// Where tablet `tablet_id` split from `epoch`, if it did: both halves are hosted one
    /// epoch up.
    fn split_done(&self, tablet_id: u64, epoch: u64, new_tablet_id: u64) -> Option<Split> {
        let left = self.tablet_for(tablet_id, epoch + 1, Sealed::Allow).ok()?;
        self.tablet_for(new_tablet_id, epoch + 1, Sealed::Allow)
            .ok()?;
        let at = left.info.range.as_ref()?.end.clone()?;
        Some(Split {
            at: Bytes::from(at),
            flushed_bytes: 0,
        })
    }

    /// Applies a split at `index`: the sealed tablet closes and its halves open.
    pub(super) async fn apply_split(&self, split: gpb::SplitTablet, index: u64) -> Result<()> {
        let (Some(left), Some(right)) = (split.left, split.right) else {
            return Err(TabletServerError::CorruptEntry {
                group_id: self.id,
                index,
                detail: "a split without both halves".to_owned(),
            });
        };
        if self
            .hosted_at(left.id, left.epoch.saturating_sub(1))
            .is_none()
        {
            // Not hosted at the epoch it split from: an entry this replica already
            // applied before a snapshot, or a tablet closed since.
            return Ok(());
        }
        let at = Bytes::from(
            right
                .range
                .as_ref()
                .map(|r| r.start.clone())
                .unwrap_or_default(),
        );
        self.close_tablet(left.id).await;
        let (left_id, right_id) = (left.id, right.id);
        self.open_tablet(left, index).await?;
        self.open_tablet(right, index).await?;
        if let Ok(mut txns) = self.txns.lock() {
            txns.move_records(left_id, &at, right_id);
        }
        Ok(())
    }
}
