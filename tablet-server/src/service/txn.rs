//! The transaction requests: Prewrite, Resolve and CheckTxn (docs/transactions.md). Each
//! names tablets of one group; this checks the request and hands it to that group's leader.

use std::sync::Arc;

use bytes::Bytes;
use luna_proto::group as gpb;
use luna_proto::tablet as pb;

use super::{TabletService, checked_mutations, storage_key};
use crate::error::{Result, TabletServerError};
use crate::group::{
    Group, Hosted, LOGICAL_BITS, Prewrite, Resolve, Sealed, TabletPart, physical_now_ms,
};

/// Longest lock TTL a transaction may ask for: past it, a dead client's locks would block
/// readers for too long.
const MAX_TTL_MS: u64 = 10 * 60 * 1000;
/// How far ahead of this server's clock a transaction's timestamps may be.
const MAX_AHEAD_MS: u64 = 60_000;
/// Most keys one transactional request may carry.
const MAX_TXN_KEYS: usize = 100_000;

/// A request's group, and each tablet it names with its share of the request.
type GroupShares<T> = (Arc<Group>, Vec<(Hosted, T)>);

impl TabletService {
    /// Locates every tablet a request names, each with its share `T` of `size(T)` keys
    /// (at least one); all must be in the first one's group.
    fn locate_group<T>(
        &self,
        tablets: Vec<(Option<pb::TabletRef>, T)>,
        size: impl Fn(&T) -> usize,
        sealed: Sealed,
    ) -> Result<GroupShares<T>> {
        let mut group: Option<Arc<Group>> = None;
        let mut parts: Vec<(Hosted, T)> = Vec::with_capacity(tablets.len());
        let mut keys = 0;
        for (tablet, share) in tablets {
            let (located, hosted) = self.locate_in(tablet.as_ref(), sealed)?;
            if parts.iter().any(|(part, _)| part.info.id == hosted.info.id) {
                // The group applies a request's parts as one unit with one part per tablet.
                return Err(TabletServerError::InvalidArgument(format!(
                    "tablet {} is named twice: send each tablet's keys together",
                    hosted.info.id
                )));
            }
            match &group {
                Some(first) if first.id() != located.id() => {
                    return Err(TabletServerError::InvalidArgument(format!(
                        "tablets {} and {} are in different groups: send one request per group",
                        parts.first().map_or(0, |(first, _)| first.info.id),
                        hosted.info.id
                    )));
                }
                Some(_) => {}
                None => group = Some(located),
            }
            if size(&share) == 0 {
                return Err(TabletServerError::InvalidArgument(format!(
                    "tablet {} is named with no keys",
                    hosted.info.id
                )));
            }
            keys += size(&share);
            parts.push((hosted, share));
        }
        if keys > MAX_TXN_KEYS {
            return Err(TabletServerError::InvalidArgument(format!(
                "{keys} keys in one request; the limit is {MAX_TXN_KEYS}"
            )));
        }
        let group = group.ok_or_else(|| {
            TabletServerError::InvalidArgument("the request names no tablet".to_owned())
        })?;
        Ok((group, parts))
    }

    pub(super) async fn prewrite_inner(
        &self,
        request: pb::PrewriteRequest,
    ) -> Result<pb::PrewriteResponse> {
        check_start_ts(request.start_ts)?;
        if request.ttl_ms == 0 || request.ttl_ms > MAX_TTL_MS {
            return Err(TabletServerError::InvalidArgument(format!(
                "ttl_ms must be 1 to {MAX_TTL_MS}"
            )));
        }
        if request.primary_key.is_empty() || request.primary_collection.is_empty() {
            return Err(TabletServerError::InvalidArgument(
                "a prewrite names its transaction's primary collection and key".to_owned(),
            ));
        }
        let (request_id, _own_id) = self.request_key(request.request_id.as_ref())?;
        let (group, parts) = self.locate_group(
            request
                .tablets
                .into_iter()
                .map(|part| (part.tablet, (part.collection, part.mutations)))
                .collect(),
            |(_, mutations)| mutations.len(),
            Sealed::Refuse,
        )?;
        let parts = parts
            .into_iter()
            .map(|(hosted, (collection, mutations))| {
                let items = checked_mutations(&hosted, mutations)?;
                Ok((collection, TabletPart { hosted, items }))
            })
            .collect::<Result<Vec<_>>>()?;
        let one_phase = request.one_phase;
        if request.commit_above != 0 && (!one_phase || request.commit_above < request.start_ts) {
            return Err(TabletServerError::InvalidArgument(
                "commit_above decides a transaction in its primary's group: it needs one_phase, \
                 and to be at least start_ts"
                    .to_owned(),
            ));
        }
        check_not_ahead("commit_above", request.commit_above)?;
        if request.commit_above != 0
            && !parts.first().is_some_and(|(_, first)| {
                first
                    .items
                    .iter()
                    .any(|mutation| mutation.key == request.primary_key)
            })
        {
            return Err(TabletServerError::InvalidArgument(
                "a deciding commit writes the primary key in its first tablet".to_owned(),
            ));
        }
        let answer = group
            .prewrite(Prewrite {
                request_id,
                start_ts: request.start_ts,
                lock: gpb::TxnLock {
                    primary_collection: request.primary_collection,
                    primary_key: request.primary_key,
                    ttl_ms: request.ttl_ms,
                    collection: String::new(),
                },
                one_phase: request.one_phase,
                commit_above: request.commit_above,
                parts,
            })
            .await?;
        let (commit_ts, min_commit_ts) = match one_phase {
            true => (answer, 0),
            false => (0, answer),
        };
        Ok(pb::PrewriteResponse {
            error: None,
            commit_ts,
            min_commit_ts,
        })
    }

    pub(super) async fn resolve_inner(
        &self,
        request: pb::ResolveRequest,
    ) -> Result<pb::ResolveResponse> {
        check_start_ts(request.start_ts)?;
        if request.commit_ts != 0 && request.commit_ts <= request.start_ts {
            return Err(TabletServerError::InvalidArgument(format!(
                "commit_ts {} must be above start_ts {}",
                request.commit_ts, request.start_ts
            )));
        }
        check_not_ahead("commit_ts", request.commit_ts)?;
        let (request_id, _own_id) = self.request_key(request.request_id.as_ref())?;
        let (group, parts) = self.locate_group(
            request
                .tablets
                .into_iter()
                .map(|part| (part.tablet, part.keys))
                .collect(),
            Vec::len,
            // Resolving the locks a sealed tablet holds is what lets its move go on.
            Sealed::Allow,
        )?;
        let parts = parts
            .into_iter()
            .map(|(hosted, keys)| {
                let items = keys
                    .iter()
                    .map(|key| storage_key(&hosted, key))
                    .collect::<Result<Vec<Bytes>>>()?;
                Ok(TabletPart { hosted, items })
            })
            .collect::<Result<Vec<_>>>()?;
        let primary_key = (!request.primary_key.is_empty()).then_some(request.primary_key);
        if let Some(primary) = &primary_key
            && !parts
                .first()
                .is_some_and(|first| first.items.contains(primary))
        {
            return Err(TabletServerError::InvalidArgument(
                "the primary key must be among the keys of the first tablet".to_owned(),
            ));
        }
        group
            .resolve(Resolve {
                request_id,
                start_ts: request.start_ts,
                commit_ts: request.commit_ts,
                primary_key,
                parts,
            })
            .await?;
        Ok(pb::ResolveResponse { error: None })
    }

    pub(super) async fn check_txn_inner(
        &self,
        request: pb::CheckTxnRequest,
    ) -> Result<pb::CheckTxnResponse> {
        check_start_ts(request.start_ts)?;
        let (group, hosted) = self.locate(request.tablet.as_ref())?;
        let primary = storage_key(&hosted, &request.primary_key)?;
        let (request_id, _own_id) = self.request_key(None)?;
        if request.caller_lock_ttl_ms > MAX_TTL_MS {
            return Err(TabletServerError::InvalidArgument(format!(
                "caller_lock_ttl_ms must be at most {MAX_TTL_MS}"
            )));
        }
        group
            .check_txn(
                hosted,
                primary,
                request.start_ts,
                request.caller_lock_ttl_ms,
                request_id,
            )
            .await
    }
}

fn check_start_ts(start_ts: u64) -> Result<()> {
    if start_ts == 0 {
        return Err(TabletServerError::InvalidArgument(
            "start_ts must be a timestamp from the TSO, not 0".to_owned(),
        ));
    }
    check_not_ahead("start_ts", start_ts)
}

/// Refuses a timestamp far ahead of this server's clock: commit timestamps follow the
/// largest one a leader has seen, so one from a bad client would push every later write
/// of the group into the future.
pub(super) fn check_not_ahead(name: &str, ts: u64) -> Result<()> {
    let ahead_ms = (ts >> LOGICAL_BITS).saturating_sub(physical_now_ms());
    if ahead_ms > MAX_AHEAD_MS {
        return Err(TabletServerError::InvalidArgument(format!(
            "{name} {ts} is {ahead_ms} ms ahead of this server's clock; the limit is {MAX_AHEAD_MS} ms"
        )));
    }
    Ok(())
}
