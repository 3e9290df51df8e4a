//! Tests of the `s3://` backend against an in-process S3 server.

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{Error, ObjectStore, ObjectStoreExt, PutMode, PutPayload, UpdateVersion};

use super::wrapper_tests::{fast_retries, read};
use super::{FaultAction, ObjectStoreOptions, OpKind, open_object_store};
use crate::testing::S3TestServer;

fn options(server: &S3TestServer) -> ObjectStoreOptions {
    ObjectStoreOptions {
        retry: fast_retries(3),
        ..server.options()
    }
}

#[tokio::test]
async fn s3_round_trip_under_a_prefix() {
    let server = S3TestServer::start("luna-test").await.unwrap();
    let store = open_object_store(&server.url("/db1/"), &options(&server)).unwrap();
    let path = Path::from("tables/t1.sst");
    store
        .put(&path, PutPayload::from_static(b"0123456789"))
        .await
        .unwrap();
    assert_eq!(read(store.as_ref(), &path).await, b"0123456789");
    assert_eq!(&store.get_range(&path, 2..5).await.unwrap()[..], b"234");
    assert_eq!(store.head(&path).await.unwrap().size, 10);

    let listed: Vec<_> = store
        .list(Some(&Path::from("tables")))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].location, path);
    let top = store.list_with_delimiter(None).await.unwrap();
    assert_eq!(top.common_prefixes, vec![Path::from("tables")]);

    // The prefix is applied: the whole bucket sees the key under it.
    let bucket = open_object_store(&server.url(""), &options(&server)).unwrap();
    let all: Vec<_> = bucket.list(None).try_collect().await.unwrap();
    assert_eq!(
        all.iter()
            .map(|m| m.location.to_string())
            .collect::<Vec<_>>(),
        ["db1/tables/t1.sst"]
    );

    store.delete(&path).await.unwrap();
    assert!(matches!(
        store.head(&path).await,
        Err(Error::NotFound { .. })
    ));
    assert!(
        store
            .list(None)
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
            .is_empty()
    );
    let m = store.metrics();
    assert_eq!((m.op(OpKind::Put).bytes, m.op(OpKind::Get).bytes), (10, 13));
    assert_eq!(m.op(OpKind::Head).errors, 1);
}

#[tokio::test]
async fn s3_conditional_puts() {
    let server = S3TestServer::start("luna-test").await.unwrap();
    let store = open_object_store(&server.url("m"), &options(&server)).unwrap();
    let path = Path::from("manifest/00000000000000000001");
    let create = || PutMode::Create.into();
    let first = store
        .put_opts(&path, PutPayload::from_static(b"a"), create())
        .await
        .unwrap();
    let again = store
        .put_opts(&path, PutPayload::from_static(b"b"), create())
        .await;
    assert!(
        matches!(again, Err(Error::AlreadyExists { .. })),
        "{again:?}"
    );
    assert_eq!(read(store.as_ref(), &path).await, b"a");

    // A create whose first attempt landed, then looked failed, is reported as done.
    let next = Path::from("manifest/00000000000000000002");
    store
        .faults()
        .inject_next(OpKind::Put, 1, FaultAction::FailAfterApply);
    store
        .put_opts(&next, PutPayload::from_static(b"c"), create())
        .await
        .unwrap();
    assert_eq!(read(store.as_ref(), &next).await, b"c");

    let update = |v| PutMode::Update(UpdateVersion::from(v)).into();
    store
        .put_opts(&path, PutPayload::from_static(b"a2"), update(first.clone()))
        .await
        .unwrap();
    let stale = store
        .put_opts(&path, PutPayload::from_static(b"a3"), update(first))
        .await;
    assert!(
        matches!(stale, Err(Error::Precondition { .. })),
        "{stale:?}"
    );
    assert_eq!(read(store.as_ref(), &path).await, b"a2");
}

#[tokio::test]
async fn s3_multipart_upload_with_retried_part_and_completion() {
    let server = S3TestServer::start("luna-test").await.unwrap();
    let store = open_object_store(&server.url(""), &options(&server)).unwrap();
    let path = Path::from("big");
    // One part: S3 wants 5 MiB in every part but the last, too slow for a unit test; the
    // memory backend's tests cover several parts.
    let mut upload = store.put_multipart(&path).await.unwrap();
    store
        .faults()
        .inject_next(OpKind::PutMultipart, 2, FaultAction::FailAfterApply);
    upload
        .put_part(PutPayload::from_static(b"the only part"))
        .await
        .unwrap();
    upload.complete().await.unwrap();
    assert_eq!(read(store.as_ref(), &path).await, b"the only part");
    let m = store.metrics().op(OpKind::PutMultipart);
    // Create, part, complete; the part and the completion each landed, failed, and were retried.
    assert_eq!((m.requests, m.retries, m.errors), (3, 2, 0));
}

#[tokio::test]
async fn s3_client_errors_are_not_retried() {
    let server = S3TestServer::start("luna-test").await.unwrap();
    let store = open_object_store(&server.url(""), &options(&server)).unwrap();
    let mut upload = store.put_multipart(&Path::from("small")).await.unwrap();
    upload
        .put_part(PutPayload::from_static(b"too small"))
        .await
        .unwrap();
    upload
        .put_part(PutPayload::from_static(b"to be a non-final part"))
        .await
        .unwrap();
    // 400 EntityTooSmall: object_store reports it as Generic, yet a retry cannot help.
    let err = upload.complete().await.unwrap_err();
    assert!(err.to_string().contains("EntityTooSmall"), "{err}");
    assert_eq!(store.metrics().op(OpKind::PutMultipart).retries, 0);
}

#[tokio::test]
async fn s3_wrong_credentials_are_not_retried() {
    let server = S3TestServer::start("luna-test").await.unwrap();
    let wrong = ObjectStoreOptions {
        secret_access_key: Some("not-the-secret".into()),
        ..options(&server)
    };
    let store = open_object_store(&server.url(""), &wrong).unwrap();
    let err = store.head(&Path::from("x")).await.unwrap_err();
    assert!(
        !matches!(err, Error::Generic { .. } | Error::NotFound { .. }),
        "{err}"
    );
    assert_eq!(store.metrics().op(OpKind::Head).retries, 0);
}

#[tokio::test]
async fn test_server_rejects_odd_bucket_names() {
    for bucket in ["", "ab", "Upper", "a/b", "a..b"] {
        assert!(S3TestServer::start(bucket).await.is_err(), "{bucket:?}");
    }
}
