//! `LunaObjectStore`: the one wrapper that every object-store request goes through.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{
    CopyMode, CopyOptions, Error, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

use super::faults::FaultInjector;
use super::multipart;
use super::shared::Shared;
use super::{MetricsSnapshot, OpKind, RetryPolicy};

/// How many single-object deletes of one `delete_stream` run at once.
const DELETE_CONCURRENCY: usize = 20;

/// An [`ObjectStore`] that counts, retries and (in tests) injects faults into every request
/// to the store it wraps.
///
/// Transient errors ([`object_store::Error::Generic`], except HTTP 4xx responses) are retried
/// per [`RetryPolicy`]; answers such as not-found or already-exists are returned at once. A conditional write (`PutMode::Create`
/// or `PutMode::Update`, `CopyMode::Create`) retried after an attempt that may have landed can
/// meet its own earlier write: then the stored bytes are compared with the intended ones, and
/// equal bytes count as success.
///
/// Streams (list results, get bodies) are retried only until they start. Deletes are sent one
/// object per request, so that each is retried on its own. Multipart parts are retried when the
/// backend exposes part numbers (S3, memory); local-filesystem uploads are only counted.
pub struct LunaObjectStore {
    shared: Arc<Shared>,
    multipart: Option<Arc<dyn MultipartStore>>,
}

impl LunaObjectStore {
    /// Wraps `inner`, which should not retry on its own.
    pub fn new(inner: Arc<dyn ObjectStore>, retry: RetryPolicy) -> LunaObjectStore {
        LunaObjectStore {
            shared: Arc::new(Shared::new(inner, retry)),
            multipart: None,
        }
    }

    /// Wraps a store that also offers the part-numbered multipart API, which lets each part
    /// of a multipart upload be retried on its own.
    pub fn with_multipart<S: ObjectStore + MultipartStore>(
        store: Arc<S>,
        retry: RetryPolicy,
    ) -> LunaObjectStore {
        let multipart: Arc<dyn MultipartStore> = store.clone();
        LunaObjectStore {
            shared: Arc::new(Shared::new(store, retry)),
            multipart: Some(multipart),
        }
    }

    /// A copy of the request counters.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.metrics.snapshot()
    }

    /// The fault injector; idle unless a test configures it.
    pub fn faults(&self) -> &FaultInjector {
        &self.shared.faults
    }

    /// The wrapped store, for requests that must bypass counting, retries and faults.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.shared.inner
    }

    /// Reads a whole object with retries, as one `Get` call.
    async fn read_whole(&self, location: &Path) -> Result<(ObjectMeta, Bytes)> {
        let s = &*self.shared;
        let outcome = s
            .call(OpKind::Get, || async {
                let got = s.inner.get_opts(location, GetOptions::default()).await?;
                let meta = got.meta.clone();
                Ok((meta, got.bytes().await?))
            })
            .await;
        s.finish(OpKind::Get, &outcome.result, |(_, bytes)| {
            len_u64(bytes.len())
        });
        outcome.result
    }

    /// Decides whether the object that made a retried conditional put fail is the put's own
    /// earlier attempt. If the object cannot be read, the outcome stays unknown and the read's
    /// error is returned instead.
    async fn resolve_put(
        &self,
        location: &Path,
        payload: &PutPayload,
        conflict: Error,
    ) -> Result<PutResult> {
        match self.read_whole(location).await {
            Ok((meta, stored)) if payload_eq(payload, &stored) => Ok(PutResult {
                e_tag: meta.e_tag,
                version: meta.version,
                extensions: Default::default(),
            }),
            Ok(_) | Err(Error::NotFound { .. }) => Err(conflict),
            Err(e) => Err(e),
        }
    }

    /// Like [`resolve_put`](Self::resolve_put), for a retried create-only copy.
    async fn resolve_copy(&self, from: &Path, to: &Path, conflict: Error) -> Result<()> {
        let (source, target) = match (self.read_whole(from).await, self.read_whole(to).await) {
            (Ok((_, source)), Ok((_, target))) => (source, target),
            (Err(Error::NotFound { .. }), _) | (_, Err(Error::NotFound { .. })) => {
                return Err(conflict);
            }
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        if source == target {
            Ok(())
        } else {
            Err(conflict)
        }
    }
}

/// Whether `error` is how a conditional put in `mode` reports that its condition failed.
fn condition_failed(mode: &PutMode, error: &Error) -> bool {
    matches!(
        (mode, error),
        (PutMode::Create, Error::AlreadyExists { .. })
            | (PutMode::Update(_), Error::Precondition { .. })
    )
}

fn payload_eq(payload: &PutPayload, stored: &[u8]) -> bool {
    if payload.content_length() != stored.len() {
        return false;
    }
    let mut offset = 0;
    payload.iter().all(|chunk| {
        let end = offset + chunk.len();
        let same = stored.get(offset..end) == Some(&chunk[..]);
        offset = end;
        same
    })
}

pub(crate) fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

async fn delete_one(s: &Shared, location: Path) -> Result<Path> {
    let outcome = s
        .call(OpKind::Delete, || async {
            let one = stream::iter([Ok(location.clone())]).boxed();
            let mut results = s.inner.delete_stream(one);
            results.next().await.unwrap_or_else(|| {
                Err(Error::Generic {
                    store: "LunaObjectStore",
                    source: "delete_stream yielded no result for one location".into(),
                })
            })
        })
        .await;
    let result = match outcome.result {
        // An earlier attempt that seemed to fail deleted it.
        Err(Error::NotFound { .. }) if outcome.ambiguous => Ok(location),
        other => other,
    };
    s.finish(OpKind::Delete, &result, |_| 0);
    result
}

/// A listing retried until its first item (or its end) arrives; later errors pass through.
fn list_stream<F>(shared: Arc<Shared>, open: F) -> BoxStream<'static, Result<ObjectMeta>>
where
    F: Fn(&dyn ObjectStore) -> BoxStream<'static, Result<ObjectMeta>> + Send + Sync + 'static,
{
    stream::once(async move {
        let s = &*shared;
        let open = &open;
        let outcome = s
            .call(OpKind::List, || async move {
                let mut listing = open(s.inner.as_ref());
                match listing.next().await {
                    Some(Ok(first)) => Ok(Some((first, listing))),
                    Some(Err(e)) => Err(e),
                    // A finished stream must not be polled again.
                    None => Ok(None),
                }
            })
            .await;
        s.finish(OpKind::List, &outcome.result, |_| 0);
        match outcome.result {
            Ok(Some((first, rest))) => stream::iter([Ok(first)]).chain(rest).boxed(),
            Ok(None) => stream::empty().boxed(),
            Err(e) => stream::iter([Err(e)]).boxed(),
        }
    })
    .flatten()
    .boxed()
}

#[async_trait]
impl ObjectStore for LunaObjectStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let s = &*self.shared;
        let outcome = s
            .call(OpKind::Put, || {
                s.inner.put_opts(location, payload.clone(), opts.clone())
            })
            .await;
        let result = match outcome.result {
            Err(e) if outcome.ambiguous && condition_failed(&opts.mode, &e) => {
                self.resolve_put(location, &payload, e).await
            }
            other => other,
        };
        s.finish(OpKind::Put, &result, |_| len_u64(payload.content_length()));
        result
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        multipart::start(&self.shared, self.multipart.as_ref(), location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let kind = if options.head {
            OpKind::Head
        } else {
            OpKind::Get
        };
        let s = &*self.shared;
        let outcome = s
            .call(kind, || s.inner.get_opts(location, options.clone()))
            .await;
        s.finish(kind, &outcome.result, |got| match kind {
            OpKind::Get => got.range.end.saturating_sub(got.range.start),
            _ => 0,
        });
        outcome.result
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let s = &*self.shared;
        let outcome = s
            .call(OpKind::Get, || s.inner.get_ranges(location, ranges))
            .await;
        s.finish(OpKind::Get, &outcome.result, |parts| {
            parts.iter().map(|b| len_u64(b.len())).sum()
        });
        outcome.result
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let shared = Arc::clone(&self.shared);
        locations
            .map(move |location| {
                let shared = Arc::clone(&shared);
                async move { delete_one(&shared, location?).await }
            })
            .buffered(DELETE_CONCURRENCY)
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let prefix = prefix.cloned();
        list_stream(Arc::clone(&self.shared), move |inner| {
            inner.list(prefix.as_ref())
        })
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        let prefix = prefix.cloned();
        let offset = offset.clone();
        list_stream(Arc::clone(&self.shared), move |inner| {
            inner.list_with_offset(prefix.as_ref(), &offset)
        })
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let s = &*self.shared;
        let outcome = s
            .call(OpKind::List, || s.inner.list_with_delimiter(prefix))
            .await;
        s.finish(OpKind::List, &outcome.result, |_| 0);
        outcome.result
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        let s = &*self.shared;
        let outcome = s
            .call(OpKind::Copy, || {
                s.inner.copy_opts(from, to, options.clone())
            })
            .await;
        let result = match outcome.result {
            Err(e @ Error::AlreadyExists { .. })
                if outcome.ambiguous && options.mode == CopyMode::Create =>
            {
                self.resolve_copy(from, to, e).await
            }
            other => other,
        };
        s.finish(OpKind::Copy, &result, |_| 0);
        result
    }

    // `rename_opts` keeps the trait's copy-then-delete, so both steps get this wrapper's
    // retries, conflict resolution and counting.
}

impl fmt::Display for LunaObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LunaObjectStore({})", self.shared.inner)
    }
}

impl fmt::Debug for LunaObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LunaObjectStore")
            .field("inner", &self.shared.inner)
            .field("multipart_parts_retried", &self.multipart.is_some())
            .field("metrics", &self.metrics())
            .finish()
    }
}
