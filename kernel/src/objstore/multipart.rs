//! Multipart uploads through `LunaObjectStore`.
//!
//! With a part-numbered backend ([`MultipartStore`]) every part and the completion are
//! retried on their own, because re-sending part `n` simply replaces it. Without one (the local
//! filesystem), the backend's own upload is used and only counted: its parts cannot be re-sent,
//! and local disks do not fail transiently.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    Error, GetOptions, MultipartId, MultipartUpload, PutMultipartOptions, PutPayload, PutResult,
    Result, UploadPart,
};

use super::OpKind;
use super::shared::Shared;
use super::wrapper::len_u64;

/// Starts an upload of `location`, counted as one `PutMultipart` call.
///
/// An attempt that failed ambiguously may leave an unused upload behind; the bucket's
/// lifecycle rules clean those up, as they do for crashed writers.
pub(crate) async fn start(
    shared: &Arc<Shared>,
    multipart: Option<&Arc<dyn MultipartStore>>,
    location: &Path,
    opts: PutMultipartOptions,
) -> Result<Box<dyn MultipartUpload>> {
    let s = &**shared;
    let opts = &opts;
    let result = match multipart {
        Some(store) => {
            let outcome = s
                .call(OpKind::PutMultipart, move || {
                    store.create_multipart_opts(location, opts.clone())
                })
                .await;
            outcome.result.map(|id| {
                Box::new(PartRetryingUpload {
                    shared: Arc::clone(shared),
                    store: Arc::clone(store),
                    location: location.clone(),
                    id,
                    parts: Arc::new(Mutex::new(Vec::new())),
                }) as Box<dyn MultipartUpload>
            })
        }
        None => {
            let outcome = s
                .call(OpKind::PutMultipart, move || {
                    s.inner.put_multipart_opts(location, opts.clone())
                })
                .await;
            outcome.result.map(|inner| {
                Box::new(CountedUpload {
                    shared: Arc::clone(shared),
                    inner,
                }) as Box<dyn MultipartUpload>
            })
        }
    };
    s.finish(OpKind::PutMultipart, &result, |_| 0);
    result
}

/// Part ids and sizes by part index; `None` until that part's upload succeeds.
type Parts = Arc<Mutex<Vec<Option<(PartId, u64)>>>>;

fn lock(parts: &Parts) -> MutexGuard<'_, Vec<Option<(PartId, u64)>>> {
    // Every update is one assignment or push, so a panicking holder leaves it consistent.
    parts.lock().unwrap_or_else(PoisonError::into_inner)
}

struct PartRetryingUpload {
    shared: Arc<Shared>,
    store: Arc<dyn MultipartStore>,
    location: Path,
    id: MultipartId,
    parts: Parts,
}

impl fmt::Debug for PartRetryingUpload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartRetryingUpload")
            .field("location", &self.location)
            .field("id", &self.id)
            .finish()
    }
}

impl PartRetryingUpload {
    /// After a completion that may have landed and then failed, the object's presence with the
    /// uploaded size is taken as this upload's success: upload ids are single-use and Luna
    /// writes each multipart object under a fresh name.
    async fn completed_anyway(&self, size: u64, error: Error) -> Result<PutResult> {
        let s = &*self.shared;
        let head = GetOptions::new().with_head(true);
        let outcome = s
            .call(OpKind::Head, || {
                s.inner.get_opts(&self.location, head.clone())
            })
            .await;
        s.finish(OpKind::Head, &outcome.result, |_| 0);
        match outcome.result {
            Ok(got) if got.meta.size == size => Ok(PutResult {
                e_tag: got.meta.e_tag,
                version: got.meta.version,
                extensions: Default::default(),
            }),
            _ => Err(error),
        }
    }
}

#[async_trait]
impl MultipartUpload for PartRetryingUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let idx = {
            let mut parts = lock(&self.parts);
            parts.push(None);
            parts.len() - 1
        };
        let shared = Arc::clone(&self.shared);
        let store = Arc::clone(&self.store);
        let location = self.location.clone();
        let id = self.id.clone();
        let parts = Arc::clone(&self.parts);
        Box::pin(async move {
            let (store, location, id, data) = (&store, &location, &id, &data);
            let outcome = shared
                .call(OpKind::PutMultipart, move || {
                    store.put_part(location, id, idx, data.clone())
                })
                .await;
            let size = len_u64(data.content_length());
            shared.finish(OpKind::PutMultipart, &outcome.result, |_| size);
            let part = outcome.result?;
            if let Some(slot) = lock(&parts).get_mut(idx) {
                *slot = Some((part, size));
            }
            Ok(())
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        let parts: Option<Vec<(PartId, u64)>> = lock(&self.parts).iter().cloned().collect();
        let s = &*self.shared;
        let Some(parts) = parts else {
            s.metrics.error(OpKind::PutMultipart);
            return Err(Error::Generic {
                store: "LunaObjectStore",
                source: "multipart upload completed before all of its parts succeeded".into(),
            });
        };
        let size = parts.iter().map(|(_, size)| size).sum();
        let ids: Vec<PartId> = parts.into_iter().map(|(id, _)| id).collect();
        let (store, location, id, ids) = (&self.store, &self.location, &self.id, &ids);
        let outcome = s
            .call(OpKind::PutMultipart, move || {
                store.complete_multipart(location, id, ids.clone())
            })
            .await;
        let result = match outcome.result {
            Err(e) if outcome.ambiguous => self.completed_anyway(size, e).await,
            other => other,
        };
        s.finish(OpKind::PutMultipart, &result, |_| 0);
        result
    }

    async fn abort(&mut self) -> Result<()> {
        let s = &*self.shared;
        let (store, location, id) = (&self.store, &self.location, &self.id);
        let outcome = s
            .call(OpKind::PutMultipart, move || {
                store.abort_multipart(location, id)
            })
            .await;
        let result = match outcome.result {
            // An earlier attempt that seemed to fail aborted it.
            Err(Error::NotFound { .. }) if outcome.ambiguous => Ok(()),
            other => other,
        };
        s.finish(OpKind::PutMultipart, &result, |_| 0);
        result
    }
}

#[derive(Debug)]
struct CountedUpload {
    shared: Arc<Shared>,
    inner: Box<dyn MultipartUpload>,
}

#[async_trait]
impl MultipartUpload for CountedUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let shared = Arc::clone(&self.shared);
        let len = len_u64(data.content_length());
        shared.metrics.request(OpKind::PutMultipart);
        let part = self.inner.put_part(data);
        Box::pin(async move {
            let result = part.await;
            shared.finish(OpKind::PutMultipart, &result, |_| len);
            result
        })
    }

    async fn complete(&mut self) -> Result<PutResult> {
        self.shared.metrics.request(OpKind::PutMultipart);
        let result = self.inner.complete().await;
        self.shared.finish(OpKind::PutMultipart, &result, |_| 0);
        result
    }

    async fn abort(&mut self) -> Result<()> {
        self.shared.metrics.request(OpKind::PutMultipart);
        let result = self.inner.abort().await;
        self.shared.finish(OpKind::PutMultipart, &result, |_| 0);
        result
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::local::LocalFileSystem;
    use object_store::path::Path;
    use object_store::{ObjectStoreExt, PutPayload};

    use crate::objstore::wrapper_tests::{fail, fast_retries, memory_store, op, read};
    use crate::objstore::{FaultAction, LunaObjectStore, OpKind};

    #[tokio::test]
    async fn multipart_parts_are_counted_and_retried() {
        let store = memory_store(8);
        store.faults().set_seed(3);
        store
            .faults()
            .add_rule(fail(0.5, Some(OpKind::PutMultipart)))
            .unwrap();
        let path = Path::from("big");
        let mut upload = store.put_multipart(&path).await.unwrap();
        for part in [&b"one-"[..], b"two-", b"three"] {
            upload
                .put_part(PutPayload::from(part.to_vec()))
                .await
                .unwrap();
        }
        upload.complete().await.unwrap();
        store.faults().clear();
        assert_eq!(read(&store, &path).await, b"one-two-three");
        let m = store.metrics().op(OpKind::PutMultipart);
        // Create, three parts, complete.
        assert_eq!((m.requests, m.bytes, m.errors), (5, 13, 0));
        assert!(m.retries > 0, "seed 3 should fail some attempts: {m:?}");
    }

    #[tokio::test]
    async fn multipart_completion_that_landed_then_failed_succeeds() {
        let store = memory_store(3);
        let path = Path::from("big");
        let mut upload = store.put_multipart(&path).await.unwrap();
        upload
            .put_part(PutPayload::from_static(b"part"))
            .await
            .unwrap();
        store
            .faults()
            .inject_next(OpKind::PutMultipart, 1, FaultAction::FailAfterApply);
        let done = upload.complete().await.unwrap();
        assert_eq!(done.e_tag, store.head(&path).await.unwrap().e_tag);
        assert_eq!(read(&store, &path).await, b"part");
    }

    #[tokio::test]
    async fn local_multipart_uploads_are_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let local = LocalFileSystem::new_with_prefix(tmp.path()).unwrap();
        let store = LunaObjectStore::new(Arc::new(local), fast_retries(3));
        let path = Path::from("f");
        let mut upload = store.put_multipart(&path).await.unwrap();
        upload
            .put_part(PutPayload::from_static(b"ab"))
            .await
            .unwrap();
        upload
            .put_part(PutPayload::from_static(b"cde"))
            .await
            .unwrap();
        upload.complete().await.unwrap();
        assert_eq!(read(&store, &path).await, b"abcde");
        assert_eq!(store.metrics().op(OpKind::PutMultipart), op(4, 5));
    }
}
