//! The group's side of the master's assignment: the leader opens and closes tablets
//! through the log until the group hosts what the master assigned.

use luna_proto::group as gpb;
use luna_proto::master::TabletInfo;

use super::Group;

impl Group {
    /// Makes the group's log open and close tablets so that it hosts exactly `desired`
    /// (the master's assignment), leaving alone the tablets it is `adopting` (the master
    /// opens those). Only the serving leader proposes; other replicas follow the log.
    pub(crate) async fn reconcile(&self, desired: &[TabletInfo], adopting: &[u64]) {
        if self.serving.borrow().is_none() {
            return;
        }
        let hosted: Vec<HostedTablet> = self
            .hosted()
            .into_iter()
            .map(|hosted| HostedTablet {
                id: hosted.info.id,
                epoch: hosted.info.epoch,
                collection_id: hosted.info.collection_id,
            })
            .collect();
        let entries = reconcile_entries(&hosted, desired, adopting);
        for kind in entries {
            if let Err(error) = self.propose(kind).await {
                tracing::debug!(group = self.id, %error, "reconciling tablets");
                return;
            }
        }
    }
}

/// A tablet a group hosts, as [`reconcile_entries`] weighs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HostedTablet {
    id: u64,
    epoch: u64,
    collection_id: u64,
}

/// The log entries that make a group hosting `hosted` host `desired` (the master's
/// assignment), leaving alone the tablets it is `adopting`.
fn reconcile_entries(
    hosted: &[HostedTablet],
    desired: &[TabletInfo],
    adopting: &[u64],
) -> Vec<gpb::group_entry::Kind> {
    let hosted_epoch = |tablet_id: u64| {
        hosted
            .iter()
            .find(|tablet| tablet.id == tablet_id)
            .map(|tablet| tablet.epoch)
    };
    let mut entries = Vec::new();
    // Collections whose assignment shows a tablet older than hosted here: it was read
    // before a split or move applied, so its list of that collection's tablets is stale (a
    // split's new half is missing from it) and closes nothing.
    let mut stale_collections = Vec::new();
    for info in desired {
        match hosted_epoch(info.id) {
            // Epochs only go up: the assignment will catch up.
            Some(epoch) if epoch > info.epoch => stale_collections.push(info.collection_id),
            Some(epoch) if epoch == info.epoch => {}
            _ => entries.push(gpb::group_entry::Kind::OpenTablet(info.clone())),
        }
    }
    for tablet in hosted {
        if !desired.iter().any(|info| info.id == tablet.id)
            && !adopting.contains(&tablet.id)
            && !stale_collections.contains(&tablet.collection_id)
        {
            entries.push(gpb::group_entry::Kind::CloseTablet(gpb::CloseTablet {
                tablet_id: tablet.id,
                epoch: tablet.epoch,
            }));
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tablet(id: u64, epoch: u64, collection_id: u64) -> TabletInfo {
        TabletInfo {
            id,
            epoch,
            collection_id,
            ..TabletInfo::default()
        }
    }

    fn hosted(id: u64, epoch: u64, collection_id: u64) -> HostedTablet {
        HostedTablet {
            id,
            epoch,
            collection_id,
        }
    }

    #[test]
    fn an_assignment_from_before_a_split_neither_reopens_nor_closes_its_halves() {
        // Tablet 9 split into 9 and 11 at epoch 6; the master still routes 9 at epoch 5.
        let entries = reconcile_entries(
            &[hosted(9, 6, 5), hosted(11, 6, 5), hosted(12, 1, 8)],
            &[tablet(9, 5, 5)],
            &[],
        );
        // Only the other collection's tablet, which the assignment really dropped, closes.
        assert_eq!(
            entries,
            vec![gpb::group_entry::Kind::CloseTablet(gpb::CloseTablet {
                tablet_id: 12,
                epoch: 1,
            })]
        );
    }

    #[test]
    fn tablets_open_when_assigned_or_newer_and_close_at_their_epoch() {
        let entries = reconcile_entries(
            &[hosted(1, 2, 5), hosted(2, 1, 5), hosted(3, 4, 5)],
            &[tablet(1, 3, 5), tablet(2, 1, 5), tablet(4, 1, 5)],
            &[3],
        );
        // Tablet 1 at its newer epoch and new tablet 4 open; tablet 3 is being adopted,
        // so it stays although unassigned.
        assert_eq!(
            entries,
            vec![
                gpb::group_entry::Kind::OpenTablet(tablet(1, 3, 5)),
                gpb::group_entry::Kind::OpenTablet(tablet(4, 1, 5)),
            ]
        );
        let moved_out = reconcile_entries(&[hosted(3, 4, 5)], &[tablet(1, 3, 5)], &[]);
        assert!(
            moved_out.contains(&gpb::group_entry::Kind::CloseTablet(gpb::CloseTablet {
                tablet_id: 3,
                epoch: 4,
            }))
        );
    }
}
