//! Committing a transaction's buffered writes: one-phase when they all live in one tablet
//! group, else two-phase (prewrite everywhere, commit the primary, then the rest).

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
    if let [(_, parts)] = groups.as_slice() {
        return prewrite(txn, &primary, parts, true, deadline).await;
    }
    let prewrites = groups
        .iter()
        .map(|(_, parts)| prewrite(txn, &primary, parts, false, deadline));
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
    let parts: Vec<Part> = groups.into_iter().flat_map(|(_, parts)| parts).collect();
    if let Some(error) = failure {
        // Best effort: locks left behind expire and are rolled back by whoever meets them.
        if let Err(rollback) = resolve_all(txn, &primary, parts, Decision::RollBack, deadline).await
        {
            tracing::debug!(start_ts = txn.start_ts, %rollback, "rolling back after a failed prewrite");
        }
        return Err(error);
    }
    // No TSO round: the primary's leader picks the commit timestamp, above every
    // prewrite's minimum (what each group served reads of the keys at) and its own clock.
    resolve_all(
        txn,
        &primary,
        parts,
        Decision::CommitAbove(commit_above),
        deadline,
    )
    .await
}

/// Locks one group's share of the writes, or with `one_phase` commits them at once (then
/// they are the whole transaction); returns the one-phase commit timestamp, or the
/// timestamp a two-phase commit must be above.
async fn prewrite(
    txn: &Transaction,
    primary: &Primary,
    parts: &[Part],
    one_phase: bool,
    deadline: &Deadline,
) -> Result<u64> {
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
    // The request names every tablet at the epoch routed with: if the first one moved,
    // the grouping is stale and the transaction starts over.
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

/// Commits or rolls back every part's locks: the primary's tablet first and waited for
/// (that decides the transaction), the rest in the background, as the primary's outcome
/// says. Returns the commit timestamp (0 for a rollback). Failures of the rest are only
/// logged: a lock left behind is resolved through the primary by whoever meets it.
async fn resolve_all(
    txn: &Transaction,
    primary: &Primary,
    parts: Vec<Part>,
    decision: Decision,
    deadline: &Deadline,
) -> Result<u64> {
    let mut parts = parts.into_iter();
    let Some(first) = parts.next() else {
        return Ok(0);
    };
    let decided = resolve_keys(
        &txn.client.inner,
        &first.collection.cache,
        txn.start_ts,
        decision,
        first.keys(),
        Some(primary.key.clone()),
        deadline,
    )
    .await;
    let rest: Vec<(Collection, Vec<Bytes>)> = parts
        .map(|part| {
            let keys = part.keys();
            (part.collection, keys)
        })
        .collect();
    let inner = txn.client.inner.clone();
    let start_ts = txn.start_ts;
    // The rest follow the primary's outcome once it is known. When it is not (the answer
    // was lost), they stay locked: rolling them back could undo a committed transaction,
    // and whoever meets them asks the primary.
    let rest_decision = match &decided {
        Ok(commit_ts) => Decision::from_commit_ts(*commit_ts),
        Err(ClientError::TxnAborted { .. }) => Decision::RollBack,
        Err(_) => return decided,
    };
    // The secondaries get a deadline of their own: the commit's may be nearly spent.
    let budget = Deadline::after(inner.options.operation_timeout);
    tokio::spawn(async move {
        let by_tablet = rest.iter().map(|(collection, keys)| {
            resolve_keys(
                &inner,
                &collection.cache,
                start_ts,
                rest_decision,
                keys.clone(),
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
    decided
}
