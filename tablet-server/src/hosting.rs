//! The group replicas a server hosts, kept in line with the master's assignment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use luna_journal::raft::grpc::GrpcNode;
use luna_kernel::stream::Stream;
use luna_proto::master as mpb;

use crate::error::{Result, TabletServerError};
use crate::group::{Group, GroupContext, Hosted, Sealed};
use crate::metrics::GroupSample;

/// How long heartbeats keep saying the disk is behind after the journal last found it
/// so. Once its leaders have gone, a server takes fewer writes and its backlog shrinks;
/// without the hold, it would report a disk that keeps up, get leaderships back from
/// balancing, fall behind again, and so on.
const DISK_BEHIND_HOLD: Duration = Duration::from_secs(60);

/// When the previous heartbeat report was made, and each tablet's (reads, writes) then.
struct LastReport {
    at: Instant,
    counters: HashMap<u64, (u64, u64)>,
}

/// A server's group replicas.
pub(crate) struct Hosting {
    ctx: Arc<GroupContext>,
    node: GrpcNode,
    groups: RwLock<HashMap<u64, Arc<Group>>>,
    /// Groups whose tablets are being reconciled, so heartbeats do not pile up proposals.
    reconciling: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// Request counters at the previous report, for rates.
    last_report: std::sync::Mutex<LastReport>,
    /// When the journal last said its disk was behind.
    last_behind: std::sync::Mutex<Option<Instant>>,
}

impl Hosting {
    pub(crate) fn new(ctx: Arc<GroupContext>, node: GrpcNode) -> Self {
        Self {
            ctx,
            node,
            groups: RwLock::new(HashMap::new()),
            reconciling: std::sync::Mutex::new(std::collections::HashSet::new()),
            last_report: std::sync::Mutex::new(LastReport {
                at: Instant::now(),
                counters: HashMap::new(),
            }),
            last_behind: std::sync::Mutex::new(None),
        }
    }

    pub(crate) fn server_id(&self) -> u64 {
        self.ctx.server_id
    }

    pub(crate) fn raft_partition(&self) -> luna_journal::raft::Partition {
        self.node.partition().clone()
    }

    /// Whether the journal's disk is behind (it refuses writes until it catches up), or
    /// was within [`DISK_BEHIND_HOLD`].
    pub(crate) fn disk_behind(&self) -> bool {
        let now = Instant::now();
        let Ok(mut last_behind) = self.last_behind.lock() else {
            return false;
        };
        if self.node.node().stats().disk_behind {
            *last_behind = Some(now);
        }
        held(*last_behind, now, DISK_BEHIND_HOLD)
    }

    /// Why the server's journal stopped working, if it has (see `Node::failure`).
    pub(crate) fn journal_failure(&self) -> Option<String> {
        self.node.node().failure()
    }

    pub(crate) fn context(&self) -> &Arc<GroupContext> {
        &self.ctx
    }

    fn group(&self, group_id: u64) -> Option<Arc<Group>> {
        self.groups.read().ok()?.get(&group_id).cloned()
    }

    /// The replica of group `group_id` here, which must lead it for the master's calls.
    pub(crate) fn leading(&self, group_id: u64) -> Result<Arc<Group>> {
        self.group(group_id).ok_or(TabletServerError::NotLeader {
            group_id,
            leader: None,
        })
    }

    fn all_groups(&self) -> Vec<Arc<Group>> {
        self.groups
            .read()
            .map(|groups| groups.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The group hosting `tablet_id` here and the tablet, if hosted at `epoch` (and not
    /// sealed for a move, unless `sealed` allows it).
    pub(crate) fn locate(
        &self,
        tablet_id: u64,
        epoch: u64,
        sealed: Sealed,
    ) -> Result<(Arc<Group>, Hosted)> {
        let index = &self.ctx.tablet_groups;
        let group_id = index
            .group_of(tablet_id)
            .ok_or_else(|| index.not_hosted(tablet_id, epoch))?;
        let group = self
            .group(group_id)
            .ok_or(TabletServerError::TabletNotFound(tablet_id))?;
        let hosted = group.tablet_for(tablet_id, epoch, sealed)?;
        Ok((group, hosted))
    }

    /// Applies a heartbeat response: learns peers' addresses, starts replicas of new
    /// groups, and has each group's leader open and close tablets as assigned.
    pub(crate) async fn apply_assignment(self: &Arc<Self>, response: &mpb::HeartbeatResponse) {
        for peer in &response.peers {
            match peer.raft_addr.parse::<SocketAddr>() {
                Ok(addr) => self.node.set_peer(peer.id, addr),
                Err(error) => {
                    tracing::warn!(server = peer.id, addr = %peer.raft_addr, %error, "bad raft address from the master");
                }
            }
            if let Ok(mut addrs) = self.ctx.peer_addrs.write() {
                addrs.insert(peer.id, peer.addr.clone());
            }
        }
        self.drop_removed_groups(response).await;
        self.ctx
            .stores
            .set_gc_safe_point(response.gc_safe_point)
            .await;
        self.ctx
            .stores
            .set_compacting(&response.compacting_collections)
            .await;
        let (safe_point, record_floor) = (response.gc_safe_point, response.txn_record_floor);
        for assignment in &response.groups {
            let group = match self.group(assignment.group_id) {
                Some(group) => group,
                None => match self.start_group(assignment).await {
                    Ok(group) => group,
                    Err(error) => {
                        tracing::warn!(group = assignment.group_id, %error, "cannot host group");
                        continue;
                    }
                },
            };
            let claimed = self
                .reconciling
                .lock()
                .map(|mut busy| busy.insert(assignment.group_id))
                .unwrap_or(false);
            if claimed {
                let hosting = Arc::clone(self);
                let tablets = assignment.tablets.clone();
                let adopting = assignment.adopting.clone();
                let voters = assignment.voters.clone();
                tokio::spawn(async move {
                    group.reconcile(&tablets, &adopting).await;
                    group.reconcile_membership(&voters).await;
                    group
                        .prefer_leader(voters.first().copied().unwrap_or(0))
                        .await;
                    group.collect_txn_garbage(safe_point, record_floor).await;
                    if let Ok(mut busy) = hosting.reconciling.lock() {
                        busy.remove(&group.id());
                    }
                });
            }
        }
    }

    /// Stops hosting the groups the master lists as removed (not assigned here, and the
    /// group's leader reported a membership without this server), and deletes their logs.
    /// A group that is only missing from the assignment keeps running: its replica may
    /// still be a voter, and a voter that lost its log could help elect a leader without
    /// writes it had acknowledged.
    async fn drop_removed_groups(&self, response: &mpb::HeartbeatResponse) {
        let removed: Vec<Arc<Group>> = match self.groups.write() {
            Ok(mut groups) => response
                .removed_groups
                .iter()
                .filter(|id| !response.groups.iter().any(|g| g.group_id == **id))
                .filter_map(|id| groups.remove(id))
                .collect(),
            Err(_) => Vec::new(),
        };
        for group in removed {
            group.stop().await;
            match self.node.node().remove_stream(group.id()).await {
                Ok(_) => tracing::info!(group = group.id(), "group replica removed"),
                Err(error) => {
                    tracing::warn!(group = group.id(), %error, "deleting a removed group replica")
                }
            }
        }
    }

    async fn start_group(&self, assignment: &mpb::GroupAssignment) -> Result<Arc<Group>> {
        // Every replica starts from the voters the stream started with, including one
        // that joins later: it learns the rest from the log.
        let initial = if assignment.initial_voters.is_empty() {
            &assignment.voters
        } else {
            &assignment.initial_voters
        };
        let stream = self
            .node
            .node()
            .add_stream(assignment.group_id, initial)
            .await?;
        let group = Group::start(assignment.group_id, stream, Arc::clone(&self.ctx));
        if let Ok(mut groups) = self.groups.write() {
            groups.insert(assignment.group_id, Arc::clone(&group));
        }
        tracing::info!(group = assignment.group_id, voters = ?assignment.voters, "hosting group replica");
        Ok(group)
    }

    /// What the next heartbeat reports: every group's role and its tablets' size and load.
    pub(crate) fn report(&self) -> Vec<mpb::GroupReport> {
        let now = Instant::now();
        let Ok(mut last) = self.last_report.lock() else {
            return Vec::new();
        };
        let seconds = now.duration_since(last.at).as_secs_f64().max(0.001);
        let mut counters = HashMap::new();
        let mut reports = Vec::new();
        for group in self.all_groups() {
            let leadership = group.stream().leadership();
            let mut tablets = Vec::new();
            for hosted in group.hosted() {
                let reads = hosted.load.reads.load(Ordering::Relaxed);
                let writes = hosted.load.writes.load(Ordering::Relaxed);
                let (reads_before, writes_before) = last
                    .counters
                    .get(&hosted.info.id)
                    .copied()
                    .unwrap_or((reads, writes));
                counters.insert(hosted.info.id, (reads, writes));
                tablets.push(mpb::TabletReport {
                    tablet_id: hosted.info.id,
                    epoch: hosted.info.epoch,
                    memory_bytes: group.memory_bytes(hosted.info.id),
                    reads_per_sec: rate(reads.saturating_sub(reads_before), seconds),
                    writes_per_sec: rate(writes.saturating_sub(writes_before), seconds),
                    size_bytes: hosted.load.size_bytes.load(Ordering::Relaxed),
                });
            }
            let membership = group.stream().membership();
            reports.push(mpb::GroupReport {
                group_id: group.id(),
                is_leader: leadership.is_leader,
                term: leadership.term,
                leader_server_id: leadership.leader_id.unwrap_or(0),
                applied_index: group.applied_index(),
                tablets,
                voters: membership.voters,
                learners: membership.learners,
                outgoing_voters: membership.outgoing,
                lock_floor: group.lock_floor(),
            });
        }
        *last = LastReport { at: now, counters };
        reports
    }

    /// The server's metrics in the Prometheus text format.
    pub(crate) fn metrics_text(&self) -> String {
        let samples: Vec<GroupSample> = self
            .all_groups()
            .iter()
            .map(|group| {
                let leadership = group.stream().leadership();
                let (txn_locks, txn_records, txn_safe_point) = group.txn_stats();
                let (dedup_requests, dedup_clients) = group.dedup_stats();
                GroupSample {
                    group_id: group.id(),
                    is_leader: leadership.is_leader,
                    term: leadership.term,
                    applied_index: group.applied_index(),
                    tablets: group.hosted().len(),
                    truncated_index: group.truncated_index(),
                    txn_locks,
                    txn_records,
                    txn_safe_point,
                    dedup_requests,
                    dedup_clients,
                }
            })
            .collect();
        self.ctx.metrics.render(
            &samples,
            self.ctx.budget.used() as u64,
            &self.node.node().stats(),
        )
    }

    /// Stops every group (flushing the tablets this server owns) and the journal server.
    pub(crate) async fn shutdown(&self) {
        let groups: Vec<_> = self
            .groups
            .write()
            .map(|mut groups| groups.drain().map(|(_, group)| group).collect())
            .unwrap_or_default();
        for group in groups {
            group.stop().await;
        }
        self.node.node().shutdown().await;
        self.ctx.stores.shutdown().await;
    }
}

fn rate(count: u64, seconds: f64) -> u64 {
    (count as f64 / seconds).round() as u64
}

/// Whether `last` happened within `hold` before `now`.
fn held(last: Option<Instant>, now: Instant, hold: Duration) -> bool {
    last.is_some_and(|last| now.saturating_duration_since(last) < hold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_that_was_behind_is_reported_for_the_hold() {
        let now = Instant::now() + DISK_BEHIND_HOLD * 2;
        let ago = |seconds: u64| now.checked_sub(Duration::from_secs(seconds));
        assert!(!held(None, now, DISK_BEHIND_HOLD));
        assert!(held(ago(0), now, DISK_BEHIND_HOLD));
        assert!(held(ago(59), now, DISK_BEHIND_HOLD));
        assert!(!held(ago(60), now, DISK_BEHIND_HOLD));
    }
}
