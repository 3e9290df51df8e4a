//! Reads on a replica: the consistency barrier, then the tablet's snapshot read.

use luna_kernel::stream::Stream;
use luna_proto::tablet::ReadMode;

use super::Group;
use crate::error::{Result, TabletServerError};

/// How a read is made consistent (see `ReadMode` in tablet.proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadConsistency {
    /// On the leader under its lease: linearizable.
    Leader,
    /// On any replica after a ReadIndex round: linearizable.
    Follower,
    /// On any replica at a given timestamp, with what it has applied.
    Stale,
}

impl From<ReadMode> for ReadConsistency {
    fn from(mode: ReadMode) -> Self {
        match mode {
            ReadMode::Leader => Self::Leader,
            ReadMode::Follower => Self::Follower,
            ReadMode::Stale => Self::Stale,
        }
    }
}

impl Group {
    /// A ReadIndex round, then apply up to it: afterwards this replica reflects every
    /// write acknowledged before the call.
    pub(super) async fn catch_up(&self) -> Result<()> {
        let index = self
            .stream
            .read_index()
            .await
            .map_err(|source| self.append_error(source))?;
        self.wait_applied(index).await
    }

    /// Waits until this replica may serve a read with `consistency` at `read_ts` (0: the
    /// newest data), and returns the timestamp to read at.
    pub(crate) async fn read_barrier(
        &self,
        consistency: ReadConsistency,
        read_ts: u64,
    ) -> Result<u64> {
        match consistency {
            ReadConsistency::Leader => {
                if self.serving.borrow().is_none() {
                    return Err(self.not_leader());
                }
                let index = self
                    .stream
                    .lease_read()
                    .await
                    .map_err(|source| self.append_error(source))?;
                self.wait_applied(index).await?;
                if read_ts != 0 {
                    self.observe_read_ts(read_ts).await?;
                }
            }
            ReadConsistency::Follower => self.catch_up().await?,
            ReadConsistency::Stale => {
                if read_ts == 0 {
                    return Err(TabletServerError::InvalidArgument(
                        "a stale read needs a read timestamp (read_ts)".to_owned(),
                    ));
                }
            }
        }
        // Timestamp 0 reads everything applied; the newest version of each key wins.
        Ok(if read_ts == 0 { u64::MAX } else { read_ts })
    }
}
