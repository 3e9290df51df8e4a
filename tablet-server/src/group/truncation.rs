//! Truncating the group's journal behind what every hosted tablet flushed.
//!
//! The apply loop builds the snapshot when it applies an entry that may let the log go (a
//! flush marker, a tablet leaving), because the snapshot must describe the group at a
//! point the loop has reached. The truncation itself runs beside the loop: the journal
//! answers it after its next fsync, and the entries behind it would otherwise wait for
//! that too (on a disk busy writing tables back, hundreds of milliseconds).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::Bytes;
use luna_kernel::stream::Stream;
use luna_proto::group as gpb;
use luna_proto::master::TabletInfo;
use prost::Message;

use super::Group;

/// A snapshot of the group, and the journal index it stands for.
pub(super) struct Truncation {
    up_to: u64,
    snapshot: Bytes,
}

impl Group {
    /// The truncation the group's state allows now: the stream may discard entries that
    /// every hosted tablet has in its BaseStore, behind a snapshot of the group at that
    /// index. `None` when nothing more may go.
    ///
    /// The snapshot must describe the group exactly at the truncation index `x`, but it is
    /// taken later, at the applied index. The tablet set is the same at both only if no
    /// tablet opened or closed in between, so truncation waits until then. The dedup
    /// table goes in as it is now, and the snapshot says so (see `dedup`). A tablet with
    /// nothing in memory has everything it ever applied in its BaseStore, so it holds the
    /// log back no further than now, and a group with no tablets needs none of its log.
    pub(super) fn truncation(&self) -> Option<Truncation> {
        let applied = self.applied_index();
        let hosted = self.hosted();
        let up_to = hosted
            .iter()
            .map(|hosted| {
                if !hosted.holds_writes() {
                    applied
                } else {
                    // A claim inherits the manifest's marker, which an old leader may
                    // have moved past what this replica applied so far.
                    hosted.tablet.flushed_up_to().min(applied)
                }
            })
            .min()
            .unwrap_or(applied);
        let (up_to, txn_records, txn_safe_point) = {
            let txns = self.txns.lock().ok()?;
            let up_to = txns.truncation_bound(up_to);
            (up_to, txns.records_up_to(up_to), txns.safe_point())
        };
        if up_to <= self.truncated.load(Ordering::Acquire)
            || self.last_control_index.load(Ordering::Acquire) > up_to
        {
            return None;
        }
        let started = Instant::now();
        let mut snapshot = gpb::GroupSnapshot {
            tablets: hosted
                .into_iter()
                .map(|hosted| TabletInfo::clone(&hosted.info))
                .collect(),
            max_commit_ts: self.max_applied_ts(),
            txn_records,
            txn_safe_point,
            sealed: self.seals(),
            ..gpb::GroupSnapshot::default()
        };
        self.dedup().snapshot(up_to, &mut snapshot);
        let snapshot = Bytes::from(snapshot.encode_to_vec());
        // Built in the apply loop, so its cost delays every write behind the marker.
        tracing::debug!(
            group = self.id,
            up_to,
            bytes = snapshot.len(),
            micros = started.elapsed().as_micros(),
            "group snapshot built"
        );
        Some(Truncation { up_to, snapshot })
    }
}

impl Truncation {
    /// Truncates `group`'s journal, and records how far it went once that is durable.
    /// Truncations may finish out of order: the journal ignores one below its snapshot.
    pub(super) async fn run(self, group: Weak<Group>) {
        let Some(stream) = group.upgrade().map(|group| Arc::clone(&group.stream)) else {
            return;
        };
        let truncated = stream.truncate(self.up_to, self.snapshot).await;
        let Some(group) = group.upgrade() else {
            return;
        };
        match truncated {
            Ok(()) => {
                group.truncated.fetch_max(self.up_to, Ordering::AcqRel);
                if let Ok(mut txns) = group.txns.lock() {
                    txns.truncated(self.up_to);
                }
                group.dedup().truncated(self.up_to);
            }
            Err(error) => {
                tracing::debug!(group = group.id, up_to = self.up_to, %error, "truncating the group journal");
            }
        }
    }
}
