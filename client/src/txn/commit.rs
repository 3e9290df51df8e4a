//! Committing a transaction's buffered writes: one-phase when they all live in one tablet
//! group, else two-phase: lock the other groups' keys, then commit the primary's group in one
//! step that decides the transaction, then commit the locked keys in the background.

use bytes::Bytes;
use futures::future::join_all;
use luna_proto::tablet::{self as pb, mutation::Op};

use super::resolve::{Decision, resolve_keys};
use super::{Buffered, Transaction};
use crate::collection::Collection;
use crate::error::{ClientError, Result};
use crate::exec::{Access, CallSpec, LiveLock, Locate, Outcome, on_tablet};
use crate::retry::Deadline;
use crate::routing::TabletEntry;

/// One tablet's share of a transaction's writes.
struct Part {
    collection: Collection,
    tablet: TabletEntry,
    mutations: Vec<pb::Mutation>,
}

impl Part {
    fn keys(&self) -> Vec<Bytes> {
        self.mutations
            .iter()
            .map(|mutation| mutation.key.clone())
            .collect()
    }
}

/// The transaction's primary: the key whose commit decides it.
struct Primary {
    collection: String,
    key: Bytes,
}

/// Commits `routed` (collection, routing key, buffered write) for `txn`.
pub(super) async fn commit(
    txn: &Transaction,
    routed: Vec<(Collection, Bytes, Buffered)>,
    deadline: &Deadline,
) -> Result<u64> {
    let Some((first_collection, first_key, _)) = routed.first() else {
        return Ok(txn.start_ts);
    };
    let primary = Primary {
        collection: first_collection.name().to_owned(),
        key: first_key.clone(),
    };
    // Groups in the order their first key came, so the primary's group and tablet lead.
    let mut groups: Vec<(u64, Vec<Part>)> = Vec::new();
    for (collection, key, value) in routed {
        let table = collection.table(deadline).await?;
        let tablet = table
            .locate(&key)
            .cloned()
            .ok_or_else(|| ClientError::Unavailable {
                addr: String::new(),
                detail: format!("no tablet of `{}` holds a key yet", collection.name()),
            })?;
        let mutation = match value {
            Some(value) => pb::Mutation {
                op: Op::Put as i32,
                key,
                value,
            },
            None => pb::Mutation {
                op: Op::Delete as i32,
                key,
                value: Bytes::new(),
            },
        };
        let group = match groups.iter_mut().find(|(id, _)| *id == tablet.group_id) {
            Some((_, parts)) => parts,
            None => {
                groups.push((tablet.group_id, Vec::new()));
                &mut groups
                    .last_mut()
                    .ok_or_else(|| ClientError::protocol("no group"))?
                    .1
            }
        };
        match group
            .iter_mut()
            .find(|part| part.tablet.id == tablet.id && part.collection.name() == collection.name())
        {
            Some(part) => part.mutations.push(mutation),
            None => group.push(Part {
                collection,
                tablet,
                mutations: vec![mutation],
            }),
        }
    }
    let mut groups = groups.into_iter();
    let Some((_, primary_parts)) = groups.next() else {
        return Ok(txn.start_ts);
    };
    let secondary_parts: Vec<Part> = groups.flat_map(|(_, parts)| parts).collect();
    if secondary_parts.is_empty() {
        return prewrite(txn, &primary, &primary_parts, Step::CommitAll, deadline).await;
    }
    // Lock the other groups' keys; the primary's group is not locked, but commits last.
    let by_group = secondary_parts.chunk_by(|a, b| a.tablet.group_id == b.tablet.group_id);
    let prewrites = by_group.map(|parts| prewrite(txn, &primary, parts, Step::Lock, deadline));
    let mut commit_above = txn.start_ts;
    let mut failure: Option<ClientError> = None;
    for prewritten in join_all(prewrites).await {
        match prewritten {
            Ok(min_commit_ts) => commit_above = commit_above.max(min_commit_ts),
            // A conflict is the one to report: the caller retries those.
            Err(error) if failure.as_ref().is_none_or(|kept| !kept.is_conflict()) => {
                failure = Some(error);
            }
            Err(_) => {}
        }
    }
    if let Some(error) = failure {
        // Nothing was sent to the primary's group, so nothing committed.
        abandon(txn, &primary, primary_parts, secondary_parts, deadline).await;
        // A lock whose answer was lost (its outcome unknown) changes nothing of that: the
        // transaction did not commit, and running it again is safe.
        return Err(match error {
            ClientError::OutcomeUnknown { detail, .. } => ClientError::Conflict {
                message: format!("a lock's answer was lost ({detail}); nothing committed"),
            },
            error => error,
        });
    }
    // The primary's group checks and commits its keys in one entry, above every
    // prewrite's minimum (what each group served reads of the keys at), and records the
    // outcome: that decides the transaction, with no TSO round for the commit timestamp.
    let step = Step::Decide { commit_above };
    let decided = prewrite(txn, &primary, &primary_parts, step, deadline).await;
    match decided {
        Ok(commit_ts) => {
            resolve_in_background(txn, secondary_parts, Decision::Commit(commit_ts));
            Ok(commit_ts)
        }
        Err(error) if error.is_conflict() || matches!(error, ClientError::TxnAborted { .. }) => {
            abandon(txn, &primary, primary_parts, secondary_parts, deadline).await;
            Err(error)
        }
        // The deciding commit may or may not have happened (its answer was lost): the
        // locks stay for readers, who ask the primary's group.
        Err(error) => Err(error),
    }
}

/// Rolls back a transaction that did not commit (the primary's group records the
/// rollback). Best effort: locks left behind expire and are rolled back by whoever meets
/// them.
async fn abandon(
    txn: &Transaction,
    primary: &Primary,
    mut parts: Vec<Part>,
    secondary_parts: Vec<Part>,
    deadline: &Deadline,
) {
    parts.extend(secondary_parts);
    if let Err(rollback) = roll_back_all(txn, primary, parts, deadline).await {
        tracing::debug!(start_ts = txn.start_ts, %rollback, "rolling back a failed commit");
    }
}

/// What a prewrite request does in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Lock the keys (a two-phase transaction's other groups).
    Lock,
    /// Commit the whole transaction at once (one phase).
    CommitAll,
    /// Commit the primary's group's keys above `commit_above`, deciding a transaction whose
    /// other groups are locked.
    Decide { commit_above: u64 },
}

/// Locks or commits one group's share of the writes, as `step` says; returns the commit
/// timestamp of a commit, or for a lock the timestamp the transaction must commit above.
async fn prewrite(
    txn: &Transaction,
    primary: &Primary,
    parts: &[Part],
    step: Step,
    deadline: &Deadline,
) -> Result<u64> {
    let (one_phase, commit_above) = match step {
        Step::Lock => (false, 0),
        Step::CommitAll => (true, 0),
        Step::Decide { commit_above } => (true, commit_above),
    };
    let Some(first) = parts.first() else {
        return Ok(0);
    };
    let Some(first_key) = first.mutations.first().map(|mutation| mutation.key.clone()) else {
        return Ok(0);
    };
    let request_id = txn.client.inner.next_request_id();
    let ttl_ms = txn.lock_ttl_ms();
    let tablets: Vec<pb::TabletMutations> = parts
        .iter()
        .map(|part| pb::TabletMutations {
            tablet: Some(pb::TabletRef {
                tablet_id: part.tablet.id,
                epoch: part.tablet.epoch,
            }),
            mutations: part.mutations.clone(),
            collection: part.collection.name().to_owned(),
        })
        .collect();
    // The request names every tablet at the epoch routed with: if one moved or split (the
    // first one's routing shows it; another answers EpochMismatch), the grouping is stale
    // and the transaction starts over.
    let unchanged =
        |tablet: &TabletEntry| tablet.id == first.tablet.id && tablet.epoch == first.tablet.epoch;
    let spec = CallSpec {
        operation: if one_phase { "commit" } else { "prewrite" },
        access: Access::Leader,
        is_write: true,
        read_ts: txn.start_ts,
        locate: Locate::Key(&first_key),
        fits: Some(&unchanged),
        live_lock: LiveLock::Conflict,
        names_other_tablets: true,
    };
    let outcome = on_tablet(
        &txn.client.inner,
        &first.collection.cache,
        &spec,
        deadline,
        |target| {
            let request = pb::PrewriteRequest {
                request_id: Some(request_id.clone()),
                start_ts: txn.start_ts,
                primary_collection: primary.collection.clone(),
                primary_key: primary.key.clone(),
                ttl_ms,
                tablets: tablets.clone(),
                one_phase,
                commit_above,
            };
            async move {
                let response = target.client.prewrite(request).await?;
                let answer = match one_phase {
                    true => response.commit_ts,
                    false => response.min_commit_ts,
                };
                Ok((response.error, answer))
            }
        },
    )
    .await?;
    match outcome {
        Outcome::Done(commit_ts) => Ok(commit_ts),
        Outcome::Resplit => Err(ClientError::Conflict {
            message: "the routing changed while the transaction committed".to_owned(),
        }),
    }
}

/// Rolls back every part's locks: the primary's tablet first, recording the rollback so
/// nothing of the transaction can commit any more, then the rest in the background.
async fn roll_back_all(
    txn: &Transaction,
    primary: &Primary,
    parts: Vec<Part>,
    deadline: &Deadline,
) -> Result<()> {
    let mut parts = parts.into_iter();
    let Some(first) = parts.next() else {
        return Ok(());
    };
    resolve_keys(
        &txn.client.inner,
        &first.collection.cache,
        txn.start_ts,
        Decision::RollBack,
        first.keys(),
        Some(primary.key.clone()),
        deadline,
    )
    .await?;
    resolve_in_background(txn, parts.collect(), Decision::RollBack);
    Ok(())
}

/// Commits or rolls back the locks of `parts` as `decision` says, in the background.
/// Failures are only logged: a lock left behind is resolved through the primary by
/// whoever meets it.
fn resolve_in_background(txn: &Transaction, parts: Vec<Part>, decision: Decision) {
    if parts.is_empty() {
        return;
    }
    let inner = txn.client.inner.clone();
    let start_ts = txn.start_ts;
    // A deadline of their own: the commit's may be nearly spent.
    let budget = Deadline::after(inner.options.operation_timeout);
    tokio::spawn(async move {
        let by_tablet = parts.iter().map(|part| {
            resolve_keys(
                &inner,
                &part.collection.cache,
                start_ts,
                decision,
                part.keys(),
                None,
                &budget,
            )
        });
        for result in join_all(by_tablet).await {
            if let Err(error) = result {
                tracing::debug!(start_ts, %error, "resolving a transaction's secondary locks");
            }
        }
    });
}
