//! Sending one request to one tablet until it succeeds, fails for good, or the operation
//! deadline passes: the SDK's retry policy in one place.
//!
//! | answer | action |
//! | --- | --- |
//! | NotLeader with a leader address | remember the leader of the group, retry at once (a few times in a row, then with backoff) |
//! | NotLeader without a hint (an election is on) | refetch the routing, retry with a backoff capped for elections |
//! | EpochMismatch, TabletNotFound, no tablet for the key | refetch the routing, retry with a backoff capped at 10 ms (a tablet move's handoff takes tens of milliseconds) |
//! | transport failure (UNAVAILABLE, connect failure, per-request timeout) | pass the server over when looking for leaders for a while, refetch the routing, retry with backoff |
//! | Busy | wait `retry_after_ms`, retry |
//! | OutcomeUnknown (the group's journal closed, timed out or failed under the request) | count a write as maybe applied, retry the same server with backoff |
//! | a tablet error of a kind this SDK does not know (a newer server's) | as EpochMismatch, and count a write as maybe applied |
//! | Locked | ask the lock's primary what became of its transaction, commit or roll the lock back, retry; while the transaction is alive wait (or, for a prewrite, fail with Conflict) |
//! | WriteConflict, TxnAborted | return [`ClientError::Conflict`] or [`ClientError::TxnAborted`] |
//! | SnapshotTooOld, INVALID_ARGUMENT, other statuses | return the typed error at once |
//!
//! Writes are retried like reads: each carries a [`RequestId`](luna_proto::tablet::RequestId)
//! that stays the same across its retries, so the group applies it at most once.
//! A write that ends in failure after an attempt whose answer was lost reports
//! [`ClientError::OutcomeUnknown`], unless the failure is an answer about the request
//! itself (a conflict, an aborted transaction, bad input): it may have been applied.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use luna_proto::tablet::tablet_error::Kind;
use luna_proto::tablet::{TabletError, TabletRef};
use tonic::Status;
use tracing::debug;

use crate::Inner;
use crate::error::{
    ClientError, Result, describe_status, is_connect_failure, is_transport_failure,
};
use crate::mux::TabletConn;
use crate::retry::{Backoff, Deadline};
use crate::routing::{RouteCache, TabletEntry};
use crate::txn::resolve::{LockState, resolve_lock};

/// NotLeader hints followed at once before retries back off (two replicas that hint at
/// each other must not spin).
const MAX_HINTED_IN_A_ROW: u32 = 3;

/// Shortest attempt worth starting: one squeezed into the deadline's last instant would
/// likely time out, and leave a write's outcome unknown when it had surely not applied.
const MIN_ATTEMPT: Duration = Duration::from_millis(25);

/// Which replica a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// The group leader: writes and leader reads.
    Leader,
    /// Any replica: follower and stale reads.
    AnyReplica,
}

/// How to find the tablet.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Locate<'a> {
    /// The tablet holding this routing key.
    Key(&'a [u8]),
    /// The tablet holding the keys just below this exclusive end (`None`: unbounded).
    Before(Option<&'a [u8]>),
}

/// What one request is.
pub(crate) struct CallSpec<'a> {
    pub(crate) operation: &'static str,
    pub(crate) access: Access,
    /// Whether the request changes data (so a lost answer leaves its outcome unknown).
    pub(crate) is_write: bool,
    /// The read timestamp, for [`ClientError::SnapshotTooOld`].
    pub(crate) read_ts: u64,
    pub(crate) locate: Locate<'a>,
    /// For multi-key requests: whether all keys still fall in the located tablet. If not, the
    /// routing changed under the request and the caller must split it again.
    pub(crate) fits: Option<&'a (dyn Fn(&TabletEntry) -> bool + Sync)>,
    /// For requests that name several tablets (a transaction's share of a group), of which
    /// `fits` checks only the located one: an `EpochMismatch` may be another tablet's (it
    /// moved or split), which the located one's routing never shows, so the caller splits
    /// the request again at once instead of retrying it. (`TabletNotFound` is retried: a
    /// tablet a group has not opened yet answers it too.)
    pub(crate) names_other_tablets: bool,
    /// What to do about a lock of a transaction that is still alive.
    pub(crate) live_lock: LiveLock,
}

/// What a request does when it meets the lock of a live transaction (a lock of one that
/// committed, rolled back or expired is resolved, and the request retried, either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LiveLock {
    /// Wait until it commits, rolls back or expires (reads, plain writes).
    Wait,
    /// Fail with [`ClientError::Conflict`] (a prewrite: of two transactions locking each
    /// other's keys, neither would finish before the other's locks expire).
    Conflict,
}

/// The tablet an attempt goes to.
pub(crate) struct Target {
    pub(crate) tablet: TabletRef,
    /// The tablet's routing-key range.
    pub(crate) start: Bytes,
    pub(crate) end: Option<Bytes>,
    pub(crate) client: TabletConn,
}

/// How a request ended.
pub(crate) enum Outcome<T> {
    Done(T),
    /// The keys no longer fit in one tablet: split again and resend.
    Resplit,
}

/// Why the latest attempt failed.
enum Failure {
    Nothing,
    /// The server could not be reached or did not answer.
    Unreachable {
        addr: String,
        detail: String,
    },
    /// The server answered with a retryable refusal, or there was no route.
    Refused {
        detail: String,
    },
}

/// Runs `call` against the tablet `spec` locates, with the retry policy of this module.
pub(crate) async fn on_tablet<T, F, Fut>(
    inner: &Inner,
    cache: &RouteCache,
    spec: &CallSpec<'_>,
    deadline: &Deadline,
    mut call: F,
) -> Result<Outcome<T>>
where
    F: FnMut(Target) -> Fut,
    Fut: Future<Output = std::result::Result<(Option<TabletError>, T), Status>>,
{
    let mut backoff = Backoff::new(&inner.options, inner.next_seed());
    let mut hinted_in_a_row = 0;
    let mut last = Failure::Nothing;
    let mut maybe_applied = false;
    loop {
        let timeout = deadline.attempt_timeout(inner.options.request_timeout);
        if timeout < MIN_ATTEMPT.min(inner.options.request_timeout) {
            return Err(exhausted(spec, deadline, last, maybe_applied));
        }
        let table = cache
            .table(inner, deadline)
            .await
            .map_err(|error| settle(spec, maybe_applied, error))?;
        let located = match spec.locate {
            Locate::Key(key) => table.locate(key),
            Locate::Before(end) => table.locate_before(end),
        };
        let Some(tablet) = located else {
            last = Failure::Refused {
                detail: "the routing from the master has no tablet for the key".into(),
            };
            cache.invalidate(table.generation);
            if !deadline.sleep(backoff.next_wait()).await {
                return Err(exhausted(spec, deadline, last, maybe_applied));
            }
            continue;
        };
        if spec.fits.is_some_and(|fits| !fits(tablet)) {
            return resplit(spec, maybe_applied);
        }
        let addr = match spec.access {
            Access::Leader => cache.leader_addr(tablet, |addr| inner.is_unreachable(addr)),
            Access::AnyReplica => backoff.pick(&tablet.replicas).cloned(),
        };
        let Some(addr) = addr else {
            last = Failure::Refused {
                detail: format!("tablet {} has no replicas in the routing", tablet.id),
            };
            cache.invalidate(table.generation);
            if !deadline.sleep(backoff.next_wait()).await {
                return Err(exhausted(spec, deadline, last, maybe_applied));
            }
            continue;
        };
        let target = Target {
            tablet: TabletRef {
                tablet_id: tablet.id,
                epoch: tablet.epoch,
            },
            start: tablet.start.clone(),
            end: tablet.end.clone(),
            client: inner
                .tablet_conn(&addr)
                .map_err(|error| settle(spec, maybe_applied, error))?,
        };
        let group_id = tablet.group_id;
        let mut wait = None;
        match tokio::time::timeout(timeout, call(target)).await {
            Err(_) => {
                maybe_applied |= spec.is_write;
                // An attempt cut short by the deadline says little about the server: keep
                // the failure before it, if any, as the one to report.
                let clipped = timeout < inner.options.request_timeout;
                if !clipped {
                    inner.mark_unreachable(&addr);
                }
                if !clipped || matches!(last, Failure::Nothing) {
                    last = Failure::Unreachable {
                        addr,
                        detail: format!("no answer within {timeout:?}"),
                    };
                }
                cache.invalidate(table.generation);
            }
            Ok(Err(status)) if is_transport_failure(&status) => {
                maybe_applied |= spec.is_write && !is_connect_failure(&status);
                inner.mark_unreachable(&addr);
                last = Failure::Unreachable {
                    addr,
                    detail: describe_status(&status),
                };
                cache.invalidate(table.generation);
            }
            Ok(Err(status)) => {
                return Err(settle(
                    spec,
                    maybe_applied,
                    ClientError::from_status(&status),
                ));
            }
            Ok(Ok((None, value))) => {
                inner.mark_reachable(&addr);
                return Ok(Outcome::Done(value));
            }
            Ok(Ok((Some(error), _))) => {
                inner.mark_reachable(&addr);
                let detail = format!("{addr}: {}", refusal(&error));
                debug!(operation = spec.operation, %detail, "tablet refused");
                match error.kind {
                    Some(Kind::NotLeader(hint)) => {
                        let hinted = !hint.leader_addr.is_empty() && hint.leader_addr != addr;
                        if hinted {
                            inner.mark_reachable(&hint.leader_addr);
                            cache.set_leader(group_id, hint.leader_addr);
                        } else {
                            cache.invalidate(table.generation);
                            wait = Some(backoff.next_election_wait());
                        }
                        last = Failure::Refused { detail };
                        if hinted && hinted_in_a_row < MAX_HINTED_IN_A_ROW {
                            hinted_in_a_row += 1;
                            continue;
                        }
                    }
                    Some(Kind::Busy(busy)) => {
                        last = Failure::Refused { detail };
                        if busy.retry_after_ms > 0 {
                            wait = Some(Duration::from_millis(busy.retry_after_ms));
                        }
                    }
                    Some(Kind::SnapshotTooOld(too_old)) => {
                        return Err(ClientError::SnapshotTooOld {
                            read_ts: spec.read_ts,
                            safe_point: too_old.safe_point,
                        });
                    }
                    Some(Kind::Locked(locked)) => {
                        last = Failure::Refused { detail };
                        let lock = locked.lock.unwrap_or_default();
                        match resolve_lock(
                            inner,
                            &cache.database,
                            &cache.collection,
                            lock,
                            deadline,
                        )
                        .await
                        .map_err(|error| settle(spec, maybe_applied, error))?
                        {
                            LockState::Resolved => continue,
                            LockState::Alive { .. } if spec.live_lock == LiveLock::Conflict => {
                                return Err(ClientError::Conflict {
                                    message: format!(
                                        "a key is locked by a live transaction ({})",
                                        error.message
                                    ),
                                });
                            }
                            LockState::Alive { expires_in } => {
                                wait = Some(backoff.next_wait().min(expires_in));
                            }
                        }
                    }
                    Some(Kind::WriteConflict(conflict)) => {
                        return Err(ClientError::Conflict {
                            message: format!(
                                "a key has a version committed at {}, after the transaction started",
                                conflict.commit_ts
                            ),
                        });
                    }
                    Some(Kind::TxnAborted(aborted)) => {
                        return Err(ClientError::TxnAborted {
                            start_ts: aborted.start_ts,
                        });
                    }
                    Some(Kind::OutcomeUnknown(_)) => {
                        // The group's journal could not tell whether the entry commits; the
                        // retry under the same id learns. The server itself answered, so it
                        // stays a candidate for this group's and every other group's calls.
                        maybe_applied |= spec.is_write;
                        last = Failure::Refused { detail };
                    }
                    Some(Kind::EpochMismatch(_)) | Some(Kind::TabletNotFound(_)) | None => {
                        // No kind: a newer server's answer this SDK cannot read, which may
                        // not have been a refusal (as `OutcomeUnknown` is not).
                        maybe_applied |= spec.is_write && error.kind.is_none();
                        last = Failure::Refused { detail };
                        cache.invalidate(table.generation);
                        if spec.names_other_tablets
                            && matches!(error.kind, Some(Kind::EpochMismatch(_)))
                        {
                            return resplit(spec, maybe_applied);
                        }
                        // A tablet moving between groups is back within tens of
                        // milliseconds: poll, rather than back off for up to a second.
                        wait = Some(backoff.next_routing_wait());
                    }
                }
            }
        }
        hinted_in_a_row = 0;
        let wait = wait.unwrap_or_else(|| backoff.next_wait());
        if !deadline.sleep(wait).await {
            return Err(exhausted(spec, deadline, last, maybe_applied));
        }
    }
}

/// The error that ends a request. After an attempt of a write that may have been applied
/// (its answer was lost), only an answer about the request itself (a conflict, an aborted
/// transaction, bad input) proves what happened; any other failure, such as an unreachable
/// master while refreshing the routing, leaves the write's outcome unknown.
fn settle(spec: &CallSpec<'_>, maybe_applied: bool, error: ClientError) -> ClientError {
    let about_the_request = matches!(
        error,
        ClientError::Conflict { .. }
            | ClientError::TxnAborted { .. }
            | ClientError::SnapshotTooOld { .. }
            | ClientError::InvalidArgument { .. }
            | ClientError::OutcomeUnknown { .. }
    );
    if maybe_applied && !about_the_request {
        return ClientError::OutcomeUnknown {
            operation: spec.operation,
            detail: error.to_string(),
        };
    }
    error
}

/// The routing changed under a request: the caller splits it again and resends the parts
/// as new requests, unless an earlier attempt may have been applied. Resending then could
/// apply the write twice (a later write in between would be overwritten by the repeat), so
/// its outcome is unknown.
fn resplit<T>(spec: &CallSpec<'_>, maybe_applied: bool) -> Result<Outcome<T>> {
    if maybe_applied {
        return Err(ClientError::OutcomeUnknown {
            operation: spec.operation,
            detail: "the routing changed after an attempt whose answer was lost".to_owned(),
        });
    }
    Ok(Outcome::Resplit)
}

/// A tablet error as one line.
fn refusal(error: &TabletError) -> String {
    let kind = match &error.kind {
        Some(Kind::NotLeader(hint)) if hint.leader_addr.is_empty() => {
            "not leader, leader unknown".to_string()
        }
        Some(Kind::NotLeader(hint)) => format!("not leader, leader is {}", hint.leader_addr),
        Some(Kind::Locked(locked)) => format!(
            "locked by transaction {}",
            locked.lock.as_ref().map_or(0, |lock| lock.start_ts)
        ),
        Some(Kind::WriteConflict(conflict)) => {
            format!("write conflict at {}", conflict.commit_ts)
        }
        Some(Kind::TxnAborted(aborted)) => format!("transaction {} aborted", aborted.start_ts),
        Some(Kind::EpochMismatch(mismatch)) => {
            format!("epoch mismatch, current epoch {}", mismatch.current_epoch)
        }
        Some(Kind::TabletNotFound(_)) => "tablet not hosted here".to_string(),
        Some(Kind::Busy(busy)) => format!("busy, retry after {} ms", busy.retry_after_ms),
        Some(Kind::SnapshotTooOld(too_old)) => {
            format!("snapshot too old, safe point {}", too_old.safe_point)
        }
        Some(Kind::OutcomeUnknown(_)) => "outcome unknown in the group's journal".to_string(),
        None => "unknown refusal".to_string(),
    };
    if error.message.is_empty() {
        kind
    } else {
        format!("{kind} ({})", error.message)
    }
}

/// The error for an operation that ran out of time.
fn exhausted(
    spec: &CallSpec<'_>,
    deadline: &Deadline,
    last: Failure,
    maybe_applied: bool,
) -> ClientError {
    let last_error = match &last {
        Failure::Nothing => "no attempt could be made before the deadline".to_string(),
        Failure::Unreachable { addr, detail } => format!("{addr}: {detail}"),
        Failure::Refused { detail } => detail.clone(),
    };
    if maybe_applied {
        return ClientError::OutcomeUnknown {
            operation: spec.operation,
            detail: last_error,
        };
    }
    match last {
        Failure::Unreachable { addr, detail } => ClientError::Unavailable { addr, detail },
        _ => ClientError::Timeout {
            operation: spec.operation,
            after: deadline.budget(),
            last_error,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_spec() -> CallSpec<'static> {
        CallSpec {
            operation: "put",
            access: Access::Leader,
            is_write: true,
            read_ts: 0,
            locate: Locate::Key(b"k"),
            fits: None,
            names_other_tablets: false,
            live_lock: LiveLock::Wait,
        }
    }

    #[test]
    fn a_failure_after_a_lost_answer_leaves_the_outcome_unknown() {
        let spec = put_spec();
        let unreachable = || ClientError::MasterUnreachable {
            addrs: vec!["127.0.0.1:7420".into()],
            detail: "connection refused".into(),
        };
        assert!(matches!(
            settle(&spec, true, unreachable()),
            ClientError::OutcomeUnknown {
                operation: "put",
                ..
            }
        ));
        assert!(matches!(
            settle(&spec, false, unreachable()),
            ClientError::MasterUnreachable { .. }
        ));
        // An answer about the request itself says what happened, lost answer or not.
        let conflict = ClientError::Conflict {
            message: "written after the start".into(),
        };
        assert!(matches!(
            settle(&spec, true, conflict),
            ClientError::Conflict { .. }
        ));
    }

    #[test]
    fn a_request_is_split_again_only_if_no_attempt_may_have_applied_it() {
        let spec = put_spec();
        assert!(matches!(resplit::<()>(&spec, false), Ok(Outcome::Resplit)));
        assert!(matches!(
            resplit::<()>(&spec, true),
            Err(ClientError::OutcomeUnknown { .. })
        ));
    }
}
