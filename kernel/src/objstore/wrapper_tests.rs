//! Tests of `LunaObjectStore`'s counting, retries and fault injection over local stores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{Error, ObjectStore, ObjectStoreExt, PutPayload};

use super::{FaultAction, FaultRule, LunaObjectStore, OpKind, OpMetrics, RetryPolicy};

pub(crate) fn fast_retries(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
    }
}

pub(crate) fn memory_store(max_attempts: u32) -> LunaObjectStore {
    LunaObjectStore::with_multipart(Arc::new(InMemory::new()), fast_retries(max_attempts))
}

pub(crate) fn fail(fraction: f64, kind: Option<OpKind>) -> FaultRule {
    FaultRule {
        action: FaultAction::Fail,
        fraction,
        kind,
    }
}

pub(crate) async fn read(store: &dyn ObjectStore, path: &Path) -> Vec<u8> {
    store
        .get(path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

pub(crate) fn op(requests: u64, bytes: u64) -> OpMetrics {
    OpMetrics {
        requests,
        bytes,
        errors: 0,
        retries: 0,
    }
}

#[tokio::test]
async fn metrics_count_requests_and_bytes_per_kind() {
    let store = memory_store(3);
    let (a, b) = (Path::from("dir/a"), Path::from("dir/b"));
    store
        .put(&a, PutPayload::from_static(b"abc"))
        .await
        .unwrap();
    store
        .put(&b, PutPayload::from_static(b"hello"))
        .await
        .unwrap();
    let before = store.metrics();

    assert_eq!(read(&store, &a).await, b"abc");
    assert_eq!(&store.get_range(&b, 1..3).await.unwrap()[..], b"el");
    let ranges = store.get_ranges(&b, &[0..1, 3..5]).await.unwrap();
    assert_eq!(ranges.concat(), b"hlo");
    assert_eq!(store.head(&b).await.unwrap().size, 5);
    assert_eq!(
        store
            .list(None)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .len(),
        2
    );
    let after_a = store
        .list_with_offset(None, &a)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    assert_eq!(after_a.len(), 1);
    assert_eq!(
        store
            .list_with_delimiter(None)
            .await
            .unwrap()
            .common_prefixes
            .len(),
        1
    );
    store.copy(&a, &Path::from("c")).await.unwrap();
    store
        .copy_if_not_exists(&a, &Path::from("d"))
        .await
        .unwrap();
    store.delete(&a).await.unwrap();

    let diff = store.metrics() - before;
    assert_eq!(diff.op(OpKind::Put), OpMetrics::default());
    assert_eq!(diff.op(OpKind::Get), op(3, 3 + 2 + 3));
    assert_eq!(diff.op(OpKind::Head), op(1, 0));
    assert_eq!(diff.op(OpKind::List), op(3, 0));
    assert_eq!(diff.op(OpKind::Copy), op(2, 0));
    assert_eq!(diff.op(OpKind::Delete), op(1, 0));
    assert_eq!(before.op(OpKind::Put), op(2, 8));

    let missing = store.get(&Path::from("missing")).await;
    assert!(matches!(missing, Err(Error::NotFound { .. })));
    let errors = (store.metrics() - before).op(OpKind::Get);
    assert_eq!((errors.requests, errors.errors, errors.retries), (4, 1, 0));
    assert!(
        store
            .metrics()
            .to_string()
            .contains("get: 4 req, 8 B, 0 retries, 1 errors")
    );
}

#[tokio::test]
async fn half_of_all_requests_failing_is_survived_by_retries() {
    let store = memory_store(12);
    store.faults().set_seed(42);
    store.faults().add_rule(fail(0.5, None)).unwrap();
    let after_apply = FaultRule {
        action: FaultAction::FailAfterApply,
        fraction: 0.2,
        kind: None,
    };
    store.faults().add_rule(after_apply).unwrap();
    for i in 0..10 {
        let path = Path::from(format!("k/{i}"));
        store
            .put(&path, PutPayload::from(format!("value {i}")))
            .await
            .unwrap();
        assert_eq!(read(&store, &path).await, format!("value {i}").as_bytes());
    }
    assert_eq!(
        store
            .list(Some(&Path::from("k")))
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .len(),
        10
    );
    store.delete(&Path::from("k/0")).await.unwrap();
    let listed = store
        .list_with_delimiter(Some(&Path::from("k")))
        .await
        .unwrap();
    assert_eq!(listed.objects.len(), 9);

    let injected = store.faults().injected();
    store.faults().clear();
    let m = store.metrics();
    let retries: u64 = OpKind::ALL.iter().map(|k| m.op(*k).retries).sum();
    let errors: u64 = OpKind::ALL.iter().map(|k| m.op(*k).errors).sum();
    assert!(
        retries >= 10 && injected >= retries,
        "{retries} retries, {injected} injected"
    );
    assert_eq!(errors, 0, "{m}");
}

#[tokio::test]
async fn retries_give_up_after_max_attempts_with_the_last_error() {
    let store = memory_store(3);
    let path = Path::from("x");
    store
        .put(&path, PutPayload::from_static(b"x"))
        .await
        .unwrap();
    store
        .faults()
        .add_rule(fail(1.0, Some(OpKind::Get)))
        .unwrap();
    let err = store.get_range(&path, 0..1).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Generic {
                store: "fault-injection",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.faults().injected(), 3);
    let m = store.metrics().op(OpKind::Get);
    assert_eq!((m.requests, m.retries, m.errors), (1, 2, 1));

    // Streams fail the same way once their first item cannot be fetched.
    store
        .faults()
        .add_rule(fail(1.0, Some(OpKind::List)))
        .unwrap();
    let listed: Result<Vec<_>, _> = store.list(None).try_collect().await;
    assert!(matches!(listed, Err(Error::Generic { .. })));
    assert_eq!(store.metrics().op(OpKind::List).retries, 2);
}

#[tokio::test]
async fn non_transient_errors_are_not_retried() {
    let store = memory_store(5);
    let path = Path::from("x");
    store
        .put(&path, PutPayload::from_static(b"x"))
        .await
        .unwrap();
    let create = store.put_opts(
        &path,
        PutPayload::from_static(b"y"),
        object_store::PutMode::Create.into(),
    );
    assert!(matches!(create.await, Err(Error::AlreadyExists { .. })));
    assert!(matches!(
        store.head(&Path::from("nope")).await,
        Err(Error::NotFound { .. })
    ));
    let copy = store
        .copy_if_not_exists(&Path::from("nope"), &Path::from("z"))
        .await;
    assert!(matches!(copy, Err(Error::NotFound { .. })));
    let m = store.metrics();
    for kind in OpKind::ALL {
        assert_eq!(m.op(kind).retries, 0, "{kind}: {m}");
    }
    assert_eq!(m.op(OpKind::Put).errors, 1);
    // No verification read: the conflict was not preceded by an ambiguous attempt.
    assert_eq!(m.op(OpKind::Get).requests, 0);
}

#[tokio::test]
async fn first_requests_of_a_stream_or_range_read_are_retried() {
    let store = memory_store(4);
    for name in ["a", "b", "c"] {
        store
            .put(&Path::from(name), PutPayload::from_static(b"0123"))
            .await
            .unwrap();
    }
    store
        .faults()
        .inject_next(OpKind::List, 2, FaultAction::Fail);
    assert_eq!(
        store
            .list(None)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .len(),
        3
    );
    store
        .faults()
        .inject_next(OpKind::List, 1, FaultAction::FailAfterApply);
    let after_a = store
        .list_with_offset(None, &Path::from("a"))
        .try_collect::<Vec<_>>()
        .await;
    assert_eq!(after_a.unwrap().len(), 2);
    store
        .faults()
        .inject_next(OpKind::Get, 2, FaultAction::Fail);
    assert_eq!(
        store
            .get_ranges(&Path::from("b"), &[1..2, 2..4])
            .await
            .unwrap()
            .concat(),
        b"123"
    );
    assert_eq!(store.metrics().op(OpKind::List).retries, 3);
    assert_eq!(store.metrics().op(OpKind::Get).retries, 2);
}

#[tokio::test]
async fn injected_delays_slow_only_the_selected_kind() {
    let store = memory_store(1);
    let path = Path::from("x");
    store
        .put(&path, PutPayload::from_static(b"x"))
        .await
        .unwrap();
    let delay = Duration::from_millis(25);
    let rule = FaultRule {
        action: FaultAction::Delay(delay),
        fraction: 1.0,
        kind: Some(OpKind::Head),
    };
    store.faults().add_rule(rule).unwrap();
    store.get(&path).await.unwrap();
    assert_eq!(store.faults().injected(), 0);
    let started = Instant::now();
    store.head(&path).await.unwrap();
    assert!(started.elapsed() >= delay);
    assert_eq!(store.faults().injected(), 1);
}

#[tokio::test]
async fn delete_that_landed_then_failed_succeeds() {
    // The local filesystem reports deleting a missing file as NotFound, unlike S3.
    let tmp = tempfile::tempdir().unwrap();
    let local = LocalFileSystem::new_with_prefix(tmp.path()).unwrap();
    let store = LunaObjectStore::new(Arc::new(local), fast_retries(3));
    let path = Path::from("x");
    store
        .put(&path, PutPayload::from_static(b"x"))
        .await
        .unwrap();
    store
        .faults()
        .inject_next(OpKind::Delete, 1, FaultAction::FailAfterApply);
    store.delete(&path).await.unwrap();
    assert!(!tmp.path().join("x").exists());
    // Without an ambiguous attempt, a missing file is still an error.
    assert!(matches!(
        store.delete(&path).await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn delete_stream_keeps_order_and_reports_each_location() {
    let store = memory_store(3);
    let paths: Vec<Path> = (0..30).map(|i| Path::from(format!("p/{i:02}"))).collect();
    for p in &paths {
        store.put(p, PutPayload::from_static(b"x")).await.unwrap();
    }
    store
        .faults()
        .inject_next(OpKind::Delete, 5, FaultAction::Fail);
    let input = futures::stream::iter(paths.clone().into_iter().map(Ok)).boxed();
    let deleted: Vec<Path> = store.delete_stream(input).try_collect().await.unwrap();
    assert_eq!(deleted, paths);
    assert!(
        store
            .list(None)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.metrics().op(OpKind::Delete),
        OpMetrics {
            requests: 30,
            bytes: 0,
            errors: 0,
            retries: 5
        }
    );
}
