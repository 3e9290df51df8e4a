//! Resolving a lock that a read or write met: ask the group holding the lock's primary key
//! what became of its transaction (CheckTxn, which also rolls back a transaction whose lock
//! expired), then commit or roll back the lock met, as the primary says.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use luna_proto::tablet::check_txn_response::State;
use luna_proto::tablet::{self as pb, LockInfo};

use crate::Inner;
use crate::error::{ClientError, Result};
use crate::exec::{Access, CallSpec, LiveLock, Locate, Outcome, on_tablet};
use crate::retry::Deadline;

/// What became of a lock after an attempt to resolve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockState {
    /// Committed or rolled back: the request that met it can be retried at once.
    Resolved,
    /// Its transaction is alive; its lock expires after this.
    Alive { expires_in: Duration },
}

/// Resolves `lock`, met on a key of `collection` in `database` (unless the lock names its
/// collection: a request may carry keys of several). Boxed, because resolving sends requests
/// through the same retry loop that met the lock.
pub(crate) fn resolve_lock<'a>(
    inner: &'a Inner,
    database: &'a str,
    collection: &'a str,
    lock: LockInfo,
    deadline: &'a Deadline,
) -> Pin<Box<dyn Future<Output = Result<LockState>> + Send + 'a>> {
    Box::pin(async move {
        let (state, commit_ts, ttl_remaining_ms) =
            check_txn(inner, database, &lock, deadline).await?;
        match state {
            State::Locked => {
                return Ok(LockState::Alive {
                    expires_in: Duration::from_millis(ttl_remaining_ms),
                });
            }
            State::Committed | State::RolledBack => {}
        }
        let collection = if lock.collection.is_empty() {
            collection
        } else {
            &lock.collection
        };
        let cache = inner.route_cache(database, collection);
        resolve_keys(
            inner,
            &cache,
            lock.start_ts,
            Decision::from_commit_ts(commit_ts),
            vec![lock.key.clone()],
            None,
            deadline,
        )
        .await?;
        Ok(LockState::Resolved)
    })
}

/// Asks the group of `lock`'s primary what became of its transaction.
async fn check_txn(
    inner: &Inner,
    database: &str,
    lock: &LockInfo,
    deadline: &Deadline,
) -> Result<(State, u64, u64)> {
    let cache = inner.route_cache(database, &lock.primary_collection);
    let spec = CallSpec {
        operation: "check transaction",
        access: Access::Leader,
        is_write: true,
        read_ts: 0,
        locate: Locate::Key(&lock.primary_key),
        fits: None,
        live_lock: LiveLock::Wait,
        names_other_tablets: false,
    };
    let outcome = on_tablet(inner, &cache, &spec, deadline, |target| {
        let request = pb::CheckTxnRequest {
            tablet: Some(target.tablet),
            primary_key: lock.primary_key.clone(),
            start_ts: lock.start_ts,
            caller_lock_ttl_ms: lock.ttl_ms,
        };
        async move {
            let response = target.client.check_txn(request).await?;
            let state = State::try_from(response.state).unwrap_or(State::Locked);
            Ok((
                response.error,
                (state, response.commit_ts, response.ttl_remaining_ms),
            ))
        }
    })
    .await?;
    match outcome {
        Outcome::Done(answer) => Ok(answer),
        Outcome::Resplit => Err(ClientError::protocol("a single key cannot span tablets")),
    }
}

/// What a `Resolve` does with a transaction's locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Commit at this timestamp.
    Commit(u64),
    RollBack,
}

impl Decision {
    /// A commit at `commit_ts`, or for 0 a rollback.
    pub(crate) fn from_commit_ts(commit_ts: u64) -> Decision {
        match commit_ts {
            0 => Decision::RollBack,
            commit_ts => Decision::Commit(commit_ts),
        }
    }

    /// The request's `commit_ts`.
    fn commit_ts(self) -> u64 {
        match self {
            Decision::Commit(commit_ts) => commit_ts,
            Decision::RollBack => 0,
        }
    }
}

/// Commits or rolls back the locks of transaction `start_ts` on `keys` (routing keys of one
/// tablet of `cache`'s collection). `primary` names the transaction's primary key when the
/// request decides the transaction.
pub(crate) async fn resolve_keys(
    inner: &Inner,
    cache: &crate::routing::RouteCache,
    start_ts: u64,
    decision: Decision,
    keys: Vec<Bytes>,
    primary: Option<Bytes>,
    deadline: &Deadline,
) -> Result<()> {
    let Some(first) = keys.first().cloned() else {
        return Ok(());
    };
    let request_id = inner.next_request_id();
    let commit_ts = decision.commit_ts();
    let spec = CallSpec {
        operation: match decision {
            Decision::RollBack => "roll back",
            _ => "commit",
        },
        access: Access::Leader,
        is_write: true,
        read_ts: 0,
        locate: Locate::Key(&first),
        fits: None,
        live_lock: LiveLock::Wait,
        names_other_tablets: false,
    };
    let outcome = on_tablet(inner, cache, &spec, deadline, |target| {
        let request = pb::ResolveRequest {
            request_id: Some(request_id.clone()),
            start_ts,
            commit_ts,
            tablets: vec![pb::TabletKeys {
                tablet: Some(target.tablet),
                keys: keys.clone(),
            }],
            primary_key: primary.clone().unwrap_or_default(),
        };
        async move {
            let response = target.client.resolve(request).await?;
            Ok((response.error, ()))
        }
    })
    .await?;
    match outcome {
        Outcome::Done(()) => Ok(()),
        Outcome::Resplit => Err(ClientError::protocol("a single key cannot span tablets")),
    }
}
