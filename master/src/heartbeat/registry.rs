//! The soft state heartbeats build: when each server was last heard from, and who leads
//! each group.
//!
//! None of this is in the log: it is rebuilt within one heartbeat interval after a master
//! restart or failover, and persisting it would write the log on every heartbeat. Times are
//! passed in (monotonic [`Instant`]s) so liveness is testable without sleeping.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use luna_proto::master::HeartbeatRequest;

/// Who leads a group, as last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct GroupLeader {
    /// The term of the report.
    pub term: u64,
    /// The leading server; 0 while unknown (an election is under way).
    pub server_id: u64,
}

#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    /// The server's last heartbeat said its journal's disk is behind.
    disk_behind: bool,
}

/// A group's journal membership and load, as its leader last reported them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Membership {
    term: u64,
    /// Voters, learners and outgoing voters.
    members: Vec<u64>,
    /// Reads and writes per second over the group's tablets.
    ops_per_sec: u64,
}

/// Liveness of servers, leaders of groups and their memberships.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    seen: HashMap<u64, Seen>,
    leaders: HashMap<u64, GroupLeader>,
    memberships: HashMap<u64, Membership>,
    /// Each group's highest reported lock floor: no lock below it is held or can be taken.
    lock_floors: HashMap<u64, u64>,
    /// Each tablet's data bytes and reads and writes per second, as its group's leader
    /// last reported them.
    tablet_stats: HashMap<u64, TabletStats>,
}

/// A tablet's size and load, from its group leader's heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TabletStats {
    pub size_bytes: u64,
    pub ops_per_sec: u64,
}

impl Registry {
    /// Records a heartbeat from server `server_id` at `now`. Reports of groups that
    /// `is_replica` says the server does not hold are stale and ignored. Returns whether
    /// the known leader of any group changed.
    pub fn record(
        &mut self,
        server_id: u64,
        now: Instant,
        request: &HeartbeatRequest,
        is_replica: impl Fn(u64) -> bool,
    ) -> bool {
        self.seen.insert(
            server_id,
            Seen {
                at: now,
                disk_behind: request.disk_behind,
            },
        );
        let mut changed = false;
        for report in &request.groups {
            if !is_replica(report.group_id) {
                continue;
            }
            let reported = GroupLeader {
                term: report.term,
                server_id: if report.is_leader {
                    server_id
                } else {
                    report.leader_server_id
                },
            };
            let known = self.leaders.get(&report.group_id).copied();
            // A newer term always wins; within a term, only a known leader replaces an
            // unknown one (a term has at most one leader, so two reports cannot disagree).
            let newer = match known {
                None => true,
                Some(known) => {
                    reported.term > known.term
                        || (reported.term == known.term
                            && known.server_id == 0
                            && reported.server_id != 0)
                }
            };
            if newer {
                changed |= known.map_or(0, |k| k.server_id) != reported.server_id;
                self.leaders.insert(report.group_id, reported);
            }
            let known_term = self
                .memberships
                .get(&report.group_id)
                .map_or(0, |membership| membership.term);
            if report.is_leader && report.term >= known_term {
                let members = [&report.voters, &report.learners, &report.outgoing_voters]
                    .into_iter()
                    .flatten()
                    .copied()
                    .collect();
                let ops_per_sec = report
                    .tablets
                    .iter()
                    .map(|t| t.reads_per_sec.saturating_add(t.writes_per_sec))
                    .fold(0u64, u64::saturating_add);
                for tablet in &report.tablets {
                    let stats = TabletStats {
                        size_bytes: tablet.size_bytes,
                        ops_per_sec: tablet.reads_per_sec.saturating_add(tablet.writes_per_sec),
                    };
                    self.tablet_stats.insert(tablet.tablet_id, stats);
                }
                self.memberships.insert(
                    report.group_id,
                    Membership {
                        term: report.term,
                        members,
                        ops_per_sec,
                    },
                );
                // A floor never goes down in the group, so an older report is only lower.
                let floor = self.lock_floors.entry(report.group_id).or_default();
                *floor = (*floor).max(report.lock_floor);
            }
        }
        changed
    }

    /// Whether the last membership the leader of `group_id` reported leaves `server_id`
    /// out (false while no leader has reported since this master started).
    pub fn left_out(&self, group_id: u64, server_id: u64) -> bool {
        self.memberships
            .get(&group_id)
            .is_some_and(|membership| !membership.members.contains(&server_id))
    }

    /// A registry for a new leader: every server in `servers` counts as heard from at
    /// `now`, so none is taken for dead (and no placement fails for want of live servers)
    /// before it has had a heartbeat timeout to reach this leader. Group leaders start
    /// unknown; heartbeats report them within an interval.
    pub fn assume_alive(servers: impl Iterator<Item = u64>, now: Instant) -> Registry {
        Registry {
            seen: servers
                .map(|id| {
                    let seen = Seen {
                        at: now,
                        disk_behind: false,
                    };
                    (id, seen)
                })
                .collect(),
            ..Registry::default()
        }
    }

    /// Whether the master heard from `server_id` within `timeout` before `now`.
    pub fn is_alive(&self, server_id: u64, now: Instant, timeout: Duration) -> bool {
        self.seen
            .get(&server_id)
            .is_some_and(|seen| now.saturating_duration_since(seen.at) <= timeout)
    }

    /// The live servers among `servers`, in ascending order.
    pub fn alive(
        &self,
        servers: impl Iterator<Item = u64>,
        now: Instant,
        timeout: Duration,
    ) -> Vec<u64> {
        let mut alive: Vec<u64> = servers
            .filter(|&id| self.is_alive(id, now, timeout))
            .collect();
        alive.sort_unstable();
        alive
    }

    /// The servers whose last heartbeat said their journal's disk is behind.
    pub fn disks_behind(&self) -> BTreeSet<u64> {
        self.seen
            .iter()
            .filter(|(_, seen)| seen.disk_behind)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Milliseconds since the last heartbeat of `server_id`; `u64::MAX` if none since this
    /// master started.
    pub fn last_heartbeat_ago_ms(&self, server_id: u64, now: Instant) -> u64 {
        self.seen.get(&server_id).map_or(u64::MAX, |seen| {
            u64::try_from(now.saturating_duration_since(seen.at).as_millis()).unwrap_or(u64::MAX)
        })
    }

    /// Tablet `tablet_id`'s size and load as its group leader last reported them.
    pub fn tablet_stats(&self, tablet_id: u64) -> TabletStats {
        self.tablet_stats
            .get(&tablet_id)
            .copied()
            .unwrap_or_default()
    }

    /// Each group's reads and writes per second, as its leader last reported them.
    pub fn group_loads(&self) -> BTreeMap<u64, u64> {
        self.memberships
            .iter()
            .map(|(&group_id, membership)| (group_id, membership.ops_per_sec))
            .collect()
    }

    /// The lowest lock floor among `groups`: no group holds or can take a lock of a
    /// transaction that started below it. 0 while one of them has not reported one.
    pub fn lock_floor(&self, mut groups: impl Iterator<Item = u64>) -> u64 {
        groups
            .try_fold(u64::MAX, |lowest, group_id| {
                Some(lowest.min(*self.lock_floors.get(&group_id)?))
            })
            .filter(|&floor| floor != u64::MAX)
            .unwrap_or(0)
    }

    /// The last reported leader of `group_id` (server 0 when unknown).
    pub fn leader(&self, group_id: u64) -> GroupLeader {
        self.leaders.get(&group_id).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use luna_proto::master::{GroupReport, TabletReport};

    use super::*;

    fn report(group_id: u64, is_leader: bool, term: u64, leader: u64) -> HeartbeatRequest {
        HeartbeatRequest {
            groups: vec![GroupReport {
                group_id,
                is_leader,
                term,
                leader_server_id: leader,
                ..GroupReport::default()
            }],
            ..HeartbeatRequest::default()
        }
    }

    #[test]
    fn only_the_newest_leader_report_says_who_was_left_out() {
        let mut registry = Registry::default();
        let now = Instant::now();
        assert!(!registry.left_out(7, 4), "unknown until a leader reports");
        let membership = |is_leader: bool, term: u64, voters: Vec<u64>, learners: Vec<u64>| {
            let mut request = report(7, is_leader, term, 1);
            request.groups[0].voters = voters;
            request.groups[0].learners = learners;
            request
        };
        registry.record(1, now, &membership(true, 3, vec![1, 2, 3], vec![4]), |_| {
            true
        });
        assert!(!registry.left_out(7, 4), "a learner is a member");
        assert!(registry.left_out(7, 5));
        registry.record(2, now, &membership(false, 3, vec![1, 2], vec![]), |_| true);
        assert!(!registry.left_out(7, 3), "a follower's view does not count");
        registry.record(3, now, &membership(true, 2, vec![1, 2], vec![]), |_| true);
        assert!(
            !registry.left_out(7, 3),
            "an older term's leader does not count"
        );
        let mut busy = membership(true, 3, vec![1, 2, 4], vec![]);
        busy.groups[0].tablets = vec![
            TabletReport {
                reads_per_sec: 100,
                writes_per_sec: 20,
                ..TabletReport::default()
            },
            TabletReport {
                writes_per_sec: 3,
                ..TabletReport::default()
            },
        ];
        registry.record(1, now, &busy, |_| true);
        assert!(registry.left_out(7, 3), "the same term's later report does");
        assert!(!registry.left_out(7, 4));
        assert_eq!(registry.group_loads().get(&7), Some(&123));
    }

    #[test]
    fn liveness_follows_the_timeout() {
        let mut registry = Registry::default();
        let start = Instant::now();
        let timeout = Duration::from_secs(5);
        registry.record(1, start, &HeartbeatRequest::default(), |_| true);
        registry.record(
            2,
            start + Duration::from_secs(4),
            &HeartbeatRequest::default(),
            |_| true,
        );
        let later = start + Duration::from_secs(6);
        assert!(!registry.is_alive(1, later, timeout));
        assert!(registry.is_alive(2, later, timeout));
        assert!(!registry.is_alive(3, later, timeout));
        assert_eq!(
            registry.alive([3, 2, 1].into_iter(), later, timeout),
            vec![2]
        );
        assert_eq!(registry.last_heartbeat_ago_ms(1, later), 6000);
        assert_eq!(registry.last_heartbeat_ago_ms(3, later), u64::MAX);
    }

    #[test]
    fn a_new_leader_counts_known_servers_alive_for_one_timeout() {
        let start = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut registry = Registry::assume_alive([1, 2].into_iter(), start);
        assert_eq!(
            registry.alive([1, 2, 3].into_iter(), start, timeout),
            [1, 2]
        );
        assert_eq!(registry.leader(10).server_id, 0, "leaders start unknown");
        registry.record(
            2,
            start + Duration::from_secs(4),
            &HeartbeatRequest::default(),
            |_| true,
        );
        let later = start + Duration::from_secs(6);
        assert_eq!(
            registry.alive([1, 2].into_iter(), later, timeout),
            [2],
            "a server that never reached the new leader is dead after the timeout"
        );
    }

    #[test]
    fn leaders_change_only_with_newer_terms() {
        let mut registry = Registry::default();
        let now = Instant::now();
        assert!(registry.record(1, now, &report(10, true, 2, 0), |_| true));
        assert_eq!(
            registry.leader(10),
            GroupLeader {
                term: 2,
                server_id: 1
            }
        );
        // Same leader again, and a follower of an older term: no change.
        assert!(!registry.record(1, now, &report(10, true, 2, 0), |_| true));
        assert!(!registry.record(2, now, &report(10, false, 1, 2), |_| true));
        assert_eq!(registry.leader(10).server_id, 1);
        // A new term without a leader yet, then its leader.
        assert!(registry.record(3, now, &report(10, false, 3, 0), |_| true));
        assert_eq!(registry.leader(10).server_id, 0);
        assert!(registry.record(3, now, &report(10, false, 3, 2), |_| true));
        assert_eq!(
            registry.leader(10),
            GroupLeader {
                term: 3,
                server_id: 2
            }
        );
        // Reports of groups the server is not a replica of are ignored.
        assert!(!registry.record(4, now, &report(10, true, 9, 0), |_| false));
        assert_eq!(registry.leader(10).server_id, 2);
    }

    #[test]
    fn the_lock_floor_needs_every_group_and_never_goes_down() {
        let mut registry = Registry::default();
        let now = Instant::now();
        let floor = |group_id: u64, is_leader: bool, term: u64, lock_floor: u64| {
            let mut request = report(group_id, is_leader, term, 1);
            request.groups[0].lock_floor = lock_floor;
            request
        };
        assert_eq!(registry.lock_floor([1, 2].into_iter()), 0, "no reports");
        registry.record(1, now, &floor(1, true, 1, 50), |_| true);
        assert_eq!(
            registry.lock_floor([1, 2].into_iter()),
            0,
            "group 2 unknown"
        );
        assert_eq!(registry.lock_floor([1].into_iter()), 50);
        registry.record(1, now, &floor(2, true, 1, 30), |_| true);
        assert_eq!(registry.lock_floor([1, 2].into_iter()), 30);
        registry.record(2, now, &floor(2, false, 1, 90), |_| true);
        assert_eq!(
            registry.lock_floor([1, 2].into_iter()),
            30,
            "a follower's floor"
        );
        registry.record(1, now, &floor(2, true, 1, 20), |_| true);
        assert_eq!(
            registry.lock_floor([1, 2].into_iter()),
            30,
            "an older report of a higher floor stands"
        );
        registry.record(1, now, &floor(2, true, 2, 70), |_| true);
        assert_eq!(registry.lock_floor([1, 2].into_iter()), 50);
        assert_eq!(registry.lock_floor(std::iter::empty()), 0);
    }

    /// A server's disk is behind for as long as its latest heartbeat says so.
    #[test]
    fn a_disk_is_behind_while_the_last_heartbeat_says_so() {
        let mut registry = Registry::default();
        let now = Instant::now();
        let behind = HeartbeatRequest {
            disk_behind: true,
            ..HeartbeatRequest::default()
        };
        registry.record(1, now, &behind, |_| true);
        registry.record(2, now, &HeartbeatRequest::default(), |_| true);
        assert_eq!(registry.disks_behind(), [1].into());
        registry.record(1, now, &HeartbeatRequest::default(), |_| true);
        assert!(registry.disks_behind().is_empty());
    }
}
