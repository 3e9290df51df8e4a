//! Range scans across a collection's tablets, in key order (or hash order).

use std::ops::{Bound, RangeBounds};

use bytes::Bytes;
use luna_proto::keys;
use luna_proto::master::Partitioning;
use luna_proto::tablet as pb;

use crate::collection::{Collection, ReadOptions};
use crate::error::{ClientError, Result};
use crate::exec::{CallSpec, LiveLock, Locate, Outcome, on_tablet};
use crate::retry::Deadline;

/// A page from one tablet.
struct Page {
    pairs: Vec<pb::KeyValue>,
    more: bool,
    tablet_start: Bytes,
    tablet_end: Option<Bytes>,
}

/// The smallest key after `key`.
fn successor(key: &[u8]) -> Bytes {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    Bytes::from(next)
}

/// `range` as a half-open routing-key range `[start, end)`, `None` end meaning unbounded.
fn routing_bounds<R, K>(partitioning: Partitioning, range: &R) -> Result<(Bytes, Option<Bytes>)>
where
    R: RangeBounds<K>,
    K: AsRef<[u8]> + ?Sized,
{
    let start = match range.start_bound() {
        Bound::Included(key) => Bytes::copy_from_slice(key.as_ref()),
        Bound::Excluded(key) => successor(key.as_ref()),
        Bound::Unbounded => Bytes::new(),
    };
    let end = match range.end_bound() {
        Bound::Included(key) => Some(successor(key.as_ref())),
        Bound::Excluded(key) => Some(Bytes::copy_from_slice(key.as_ref())),
        Bound::Unbounded => None,
    };
    if partitioning == Partitioning::Hash && (!start.is_empty() || end.is_some()) {
        return Err(ClientError::invalid(
            "a hash-partitioned collection can only be scanned whole (its keys are stored in hash order); use scan_all, or a range-partitioned collection for range scans",
        ));
    }
    Ok((start, end))
}

impl Collection {
    /// Up to `limit` pairs with keys in `range`, ascending (or descending if `reverse`),
    /// read on the leaders, across tablets in order. See [`Collection::scan_with`].
    pub async fn scan<R, K>(
        &self,
        range: R,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(Bytes, Bytes)>>
    where
        R: RangeBounds<K>,
        K: AsRef<[u8]> + ?Sized,
    {
        self.scan_with(range, limit, reverse, &ReadOptions::default())
            .await
    }

    /// Up to `limit` pairs of the whole collection; for a hash-partitioned collection the
    /// only scan there is, in hash order. See [`Collection::scan_with`].
    pub async fn scan_all(&self, limit: usize, reverse: bool) -> Result<Vec<(Bytes, Bytes)>> {
        self.scan_with::<_, [u8]>(.., limit, reverse, &ReadOptions::default())
            .await
    }

    /// Up to `limit` pairs with keys in `range`, read as `options` say, visiting the tablets
    /// in routing-key order and paging within each. The result is materialized, so keep
    /// `limit` to what fits in memory, and page on with the last key returned.
    ///
    /// Each tablet is read at its newest data unless `options` carry a timestamp
    /// ([`ReadOptions::at`]): give one (from [`Client::timestamp`](crate::Client::timestamp))
    /// for one consistent snapshot across tablets.
    ///
    /// Range-partitioned collections return keys in key order. Hash-partitioned collections
    /// can only be scanned whole (`..`, or [`Collection::scan_all`]): their keys come in
    /// order of their 32-bit hash, with the hash prefix removed.
    pub async fn scan_with<R, K>(
        &self,
        range: R,
        limit: usize,
        reverse: bool,
        options: &ReadOptions,
    ) -> Result<Vec<(Bytes, Bytes)>>
    where
        R: RangeBounds<K>,
        K: AsRef<[u8]> + ?Sized,
    {
        let deadline = self.deadline();
        let read = options.to_proto()?;
        let table = self.table(&deadline).await?;
        let partitioning = table.partitioning;
        let (start, end) = routing_bounds(partitioning, &range)?;
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        // Forward: the next key to read. Reverse: the exclusive end of what is left.
        let mut cursor_start = start.clone();
        let mut cursor_end = end.clone();
        loop {
            let remaining = limit.saturating_sub(out.len());
            if remaining == 0 {
                break;
            }
            let done = if reverse {
                cursor_end.as_ref().is_some_and(|cursor| *cursor <= start)
            } else {
                end.as_ref().is_some_and(|end| cursor_start >= *end)
            };
            if done {
                break;
            }
            let page = self
                .scan_page(
                    &cursor_start,
                    cursor_end.as_ref(),
                    reverse,
                    remaining,
                    options,
                    read,
                    &deadline,
                )
                .await?;
            let last_key = page.pairs.last().map(|pair| pair.key.clone());
            for pair in page.pairs.into_iter().take(remaining) {
                let key = match partitioning {
                    Partitioning::Range => pair.key,
                    Partitioning::Hash => {
                        let user = keys::user_key(partitioning, &pair.key).ok_or_else(|| {
                            ClientError::protocol("a scan returned a hash key without its prefix")
                        })?;
                        pair.key.slice_ref(user)
                    }
                };
                out.push((key, pair.value));
            }
            if page.more {
                // More in this tablet: continue after the last key returned.
                let last_key = last_key.ok_or_else(|| {
                    ClientError::protocol("a scan page was empty but said it had more")
                })?;
                if reverse {
                    cursor_end = Some(last_key);
                } else {
                    cursor_start = successor(&last_key);
                }
            } else if reverse {
                if page.tablet_start <= start {
                    break;
                }
                cursor_end = Some(page.tablet_start);
            } else {
                match page.tablet_end {
                    Some(tablet_end) => cursor_start = tablet_end,
                    None => break,
                }
            }
        }
        Ok(out)
    }

    /// One page from the tablet holding `cursor_start` (forward) or the keys below
    /// `cursor_end` (reverse), cut to that tablet's range.
    #[allow(clippy::too_many_arguments)]
    async fn scan_page(
        &self,
        cursor_start: &Bytes,
        cursor_end: Option<&Bytes>,
        reverse: bool,
        remaining: usize,
        options: &ReadOptions,
        read: pb::ReadOptions,
        deadline: &Deadline,
    ) -> Result<Page> {
        let locate = if reverse {
            Locate::Before(cursor_end.map(|end| end.as_ref()))
        } else {
            Locate::Key(cursor_start)
        };
        let spec = CallSpec {
            operation: "scan",
            access: options.access(),
            is_write: false,
            read_ts: options.read_ts(),
            locate,
            fits: None,
            live_lock: LiveLock::Wait,
            names_other_tablets: false,
        };
        let limit = u32::try_from(remaining).unwrap_or(u32::MAX);
        let outcome = on_tablet(&self.inner, &self.cache, &spec, deadline, |target| {
            // Clip the scan to the tablet: the cursor bound on one side, the tablet's on
            // the other, whichever is tighter.
            let start = cursor_start.clone().max(target.start.clone());
            let end = match (cursor_end, &target.end) {
                (Some(cursor), Some(tablet)) => Some(cursor.clone().min(tablet.clone())),
                (Some(cursor), None) => Some(cursor.clone()),
                (None, tablet) => tablet.clone(),
            };
            let request = pb::ScanRequest {
                tablet: Some(target.tablet),
                start,
                end,
                limit,
                reverse,
                options: Some(read),
            };
            let tablet_start = target.start.clone();
            let tablet_end = target.end.clone();
            async move {
                let response = target.client.scan(request).await?;
                let page = Page {
                    pairs: response.pairs,
                    more: response.more,
                    tablet_start,
                    tablet_end,
                };
                Ok((response.error, page))
            }
        })
        .await?;
        match outcome {
            Outcome::Done(page) => Ok(page),
            Outcome::Resplit => Err(ClientError::protocol("a scan page cannot be split")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_become_half_open_routing_ranges() -> Result<()> {
        let (start, end) = routing_bounds(Partitioning::Range, &("b".."d"))?;
        assert_eq!((&start[..], end.as_deref()), (&b"b"[..], Some(&b"d"[..])));
        let (start, end) = routing_bounds(Partitioning::Range, &("b"..="d"))?;
        assert_eq!((&start[..], end.as_deref()), (&b"b"[..], Some(&b"d\0"[..])));
        let (start, end) = routing_bounds::<_, [u8]>(Partitioning::Range, &(..))?;
        assert_eq!((&start[..], end), (&b""[..], None));
        let excluded: (Bound<&str>, Bound<&str>) = (Bound::Excluded("b"), Bound::Unbounded);
        let (start, _) = routing_bounds::<_, &str>(Partitioning::Range, &excluded)?;
        assert_eq!(&start[..], b"b\0");
        assert!(routing_bounds::<_, [u8]>(Partitioning::Hash, &(..)).is_ok());
        assert!(routing_bounds(Partitioning::Hash, &("a".."b")).is_err());
        Ok(())
    }
}
