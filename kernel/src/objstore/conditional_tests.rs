//! Tests of conditional writes retried after an attempt that may have landed.

use std::sync::Arc;

use object_store::path::Path;
use object_store::{Error, ObjectStore, ObjectStoreExt, PutMode, PutPayload, UpdateVersion};

use super::wrapper_tests::{fast_retries, memory_store, read};
use super::{FaultAction, LunaObjectStore, OpKind};

/// An outer store with faults over an inner counting store, so a test can see how many
/// requests really reached the backend.
fn layered() -> (LunaObjectStore, Arc<LunaObjectStore>) {
    let backend = Arc::new(memory_store(1));
    let outer = LunaObjectStore::new(backend.clone(), fast_retries(4));
    (outer, backend)
}

#[tokio::test]
async fn create_that_landed_then_failed_reports_success_and_writes_once() {
    let (store, backend) = layered();
    let path = Path::from("manifest/00000000000000000001");
    store
        .faults()
        .inject_next(OpKind::Put, 1, FaultAction::FailAfterApply);
    let put = store
        .put_opts(
            &path,
            PutPayload::from_static(b"edit-1"),
            PutMode::Create.into(),
        )
        .await
        .unwrap();

    assert_eq!(read(&store, &path).await, b"edit-1");
    let head = store.head(&path).await.unwrap();
    assert_eq!((put.e_tag, put.version), (head.e_tag, head.version));
    // Two attempts reached the backend: the first wrote, the second was refused.
    let backend_puts = backend.metrics().op(OpKind::Put);
    assert_eq!((backend_puts.requests, backend_puts.errors), (2, 1));
    let m = store.metrics().op(OpKind::Put);
    assert_eq!((m.requests, m.retries, m.errors), (1, 1, 0));
}

#[tokio::test]
async fn create_blocked_by_another_writers_bytes_is_a_conflict() {
    let (store, backend) = layered();
    let path = Path::from("manifest/00000000000000000001");
    // Our first attempt fails before reaching the store; meanwhile another writer wins.
    backend
        .put(&path, PutPayload::from_static(b"theirs"))
        .await
        .unwrap();
    store
        .faults()
        .inject_next(OpKind::Put, 1, FaultAction::Fail);
    let put = store.put_opts(
        &path,
        PutPayload::from_static(b"ours!!"),
        PutMode::Create.into(),
    );
    assert!(matches!(put.await, Err(Error::AlreadyExists { .. })));
    assert_eq!(read(&store, &path).await, b"theirs");
    let m = store.metrics();
    assert_eq!(
        (m.op(OpKind::Put).retries, m.op(OpKind::Put).errors),
        (1, 1)
    );
    // The conflict was checked by reading the object back.
    assert_eq!(m.op(OpKind::Get).requests, 2);
}

#[tokio::test]
async fn create_blocked_by_identical_bytes_counts_as_ours() {
    // Equal bytes cannot be told apart from our own write; for Luna's content-determined
    // objects that is the desired answer.
    let (store, backend) = layered();
    let path = Path::from("same");
    backend
        .put(&path, PutPayload::from_static(b"same"))
        .await
        .unwrap();
    store
        .faults()
        .inject_next(OpKind::Put, 1, FaultAction::Fail);
    let put = store.put_opts(
        &path,
        PutPayload::from_static(b"same"),
        PutMode::Create.into(),
    );
    put.await.unwrap();
}

#[tokio::test]
async fn update_that_landed_then_failed_reports_success() {
    let store = memory_store(4);
    let path = Path::from("pointer");
    let v1 = store
        .put(&path, PutPayload::from_static(b"v1"))
        .await
        .unwrap();
    store
        .faults()
        .inject_next(OpKind::Put, 1, FaultAction::FailAfterApply);
    let update = PutMode::Update(UpdateVersion::from(v1.clone()));
    let v2 = store
        .put_opts(&path, PutPayload::from_static(b"v2"), update.into())
        .await
        .unwrap();
    assert_eq!(read(&store, &path).await, b"v2");
    assert_eq!(v2.e_tag, store.head(&path).await.unwrap().e_tag);
    assert_ne!(v2.e_tag, v1.e_tag);

    // A stale version with different bytes stays a conflict, ambiguous or not.
    store
        .faults()
        .inject_next(OpKind::Put, 1, FaultAction::Fail);
    let stale = PutMode::Update(UpdateVersion::from(v1));
    let put = store.put_opts(&path, PutPayload::from_static(b"v3"), stale.into());
    assert!(matches!(put.await, Err(Error::Precondition { .. })));
    assert_eq!(read(&store, &path).await, b"v2");
}

#[tokio::test]
async fn copy_if_not_exists_that_landed_then_failed_succeeds() {
    let store = memory_store(3);
    let (from, to) = (Path::from("from"), Path::from("to"));
    store
        .put(&from, PutPayload::from_static(b"data"))
        .await
        .unwrap();
    store
        .faults()
        .inject_next(OpKind::Copy, 1, FaultAction::FailAfterApply);
    store.copy_if_not_exists(&from, &to).await.unwrap();
    assert_eq!(read(&store, &to).await, b"data");

    // A different object already at the target is a real conflict.
    let other = Path::from("other");
    store
        .put(&other, PutPayload::from_static(b"else"))
        .await
        .unwrap();
    store
        .faults()
        .inject_next(OpKind::Copy, 1, FaultAction::Fail);
    let copy = store.copy_if_not_exists(&other, &to).await;
    assert!(matches!(copy, Err(Error::AlreadyExists { .. })));
    assert_eq!(read(&store, &to).await, b"data");
}

#[tokio::test]
async fn rename_if_not_exists_goes_through_the_wrapper() {
    let store = memory_store(3);
    let (from, to) = (Path::from("from"), Path::from("to"));
    store
        .put(&from, PutPayload::from_static(b"data"))
        .await
        .unwrap();
    store
        .faults()
        .inject_next(OpKind::Copy, 1, FaultAction::FailAfterApply);
    store
        .faults()
        .inject_next(OpKind::Delete, 1, FaultAction::FailAfterApply);
    store.rename_if_not_exists(&from, &to).await.unwrap();
    assert_eq!(read(&store, &to).await, b"data");
    assert!(matches!(
        store.head(&from).await,
        Err(Error::NotFound { .. })
    ));
    let m = store.metrics();
    assert_eq!(
        (m.op(OpKind::Copy).retries, m.op(OpKind::Delete).retries),
        (1, 1)
    );
}
