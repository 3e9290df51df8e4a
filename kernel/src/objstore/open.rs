//! Opening an object store from a URL.

use std::fmt;
use std::sync::Arc;

use object_store::RetryConfig;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use url::Url;

use super::{LunaObjectStore, RetryPolicy};
use crate::KernelError;

/// The region used for `s3://` URLs when none is configured; S3-compatible servers such as
/// MinIO accept it.
const DEFAULT_S3_REGION: &str = "us-east-1";

/// Settings for [`open_object_store`]. The `s3://` backend uses the endpoint, region,
/// credential and `allow_http` fields; every backend uses `retry`.
///
/// Nothing here is read from the environment: the caller (the CLI) decides where settings come
/// from. Without credentials, S3 falls back to the instance's own credentials (IMDS).
#[derive(Clone, Default)]
pub struct ObjectStoreOptions {
    /// The S3 endpoint, for S3-compatible servers (MinIO); `None` means AWS.
    pub endpoint: Option<String>,
    /// The S3 region; `None` means `us-east-1`.
    pub region: Option<String>,
    /// The access key id; needs `secret_access_key`.
    pub access_key_id: Option<String>,
    /// The secret access key; needs `access_key_id`.
    pub secret_access_key: Option<String>,
    /// A session token, for temporary credentials.
    pub session_token: Option<String>,
    /// Whether a plain `http://` endpoint is allowed.
    pub allow_http: bool,
    /// How requests are retried.
    pub retry: RetryPolicy,
}

impl fmt::Debug for ObjectStoreOptions {
    /// Shows whether secrets are set, never their values, so options can be logged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("ObjectStoreOptions")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("allow_http", &self.allow_http)
            .field("retry", &self.retry)
            .finish()
    }
}

/// Opens the object store that `url` names, wrapped in a [`LunaObjectStore`].
///
/// - `file:///abs/path`: a directory on the local filesystem, created if missing.
/// - `memory://`: a new, empty in-memory store.
/// - `s3://bucket` or `s3://bucket/prefix`: an S3 bucket, optionally under a key prefix, with
///   conditional puts enabled and path-style requests when an endpoint is set.
pub fn open_object_store(
    url: &str,
    options: &ObjectStoreOptions,
) -> Result<Arc<LunaObjectStore>, KernelError> {
    let invalid = |reason: &str| KernelError::InvalidUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let parsed = Url::parse(url).map_err(|e| {
        invalid(&format!(
            "{e} (expected file:///absolute/path, memory:// or s3://bucket/prefix)"
        ))
    })?;
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("query strings and fragments are not supported"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(
            "credentials do not belong in the URL; use the options",
        ));
    }
    if parsed.port().is_some() {
        return Err(invalid(
            "a port does not belong in the URL; use the endpoint option",
        ));
    }
    let store = match parsed.scheme() {
        "file" => {
            let store = open_local(url, &parsed)?;
            LunaObjectStore::new(Arc::new(store), options.retry)
        }
        "memory" => {
            if parsed.host_str().is_some_and(|h| !h.is_empty())
                || !matches!(parsed.path(), "" | "/")
            {
                return Err(invalid("memory:// takes no name or path"));
            }
            LunaObjectStore::with_multipart(Arc::new(InMemory::new()), options.retry)
        }
        "s3" => open_s3(url, &parsed, options)?,
        other => {
            return Err(invalid(&format!(
                "unsupported scheme {other:?}; expected file, memory or s3"
            )));
        }
    };
    Ok(Arc::new(store))
}

fn open_local(url: &str, parsed: &Url) -> Result<LocalFileSystem, KernelError> {
    let dir = parsed
        .to_file_path()
        .map_err(|()| KernelError::InvalidUrl {
            url: url.to_string(),
            reason: "a file URL needs an absolute path and no host, as in file:///var/lib/luna"
                .to_string(),
        })?;
    std::fs::create_dir_all(&dir).map_err(|source| KernelError::Io {
        context: format!("creating object store directory {}", dir.display()),
        source,
    })?;
    // Durable once written, as S3 is: a flushed table lets the journal drop what it holds,
    // so a table still in the page cache at a power loss would lose acknowledged writes.
    let store =
        LocalFileSystem::new_with_prefix(&dir).map_err(|source| KernelError::OpenStore {
            url: url.to_string(),
            source,
        })?;
    Ok(store.with_fsync(true))
}

fn open_s3(
    url: &str,
    parsed: &Url,
    options: &ObjectStoreOptions,
) -> Result<LunaObjectStore, KernelError> {
    let invalid = |reason: String| KernelError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    let bucket = parsed
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| invalid("missing bucket, as in s3://bucket/prefix".to_string()))?;
    let prefix = Path::from_url_path(parsed.path())
        .map_err(|e| invalid(format!("invalid key prefix: {e}")))?;

    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(options.region.as_deref().unwrap_or(DEFAULT_S3_REGION))
        .with_allow_http(options.allow_http)
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        // LunaObjectStore retries; a second layer here would multiply attempts and hide them
        // from metrics and fault injection.
        .with_retry(RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        });
    if let Some(endpoint) = &options.endpoint {
        // S3-compatible servers are usually addressed by one host name, not one per bucket.
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
    }
    if let Some(key) = &options.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &options.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    if let Some(token) = &options.session_token {
        builder = builder.with_token(token);
    }
    let s3 = builder.build().map_err(|source| KernelError::OpenStore {
        url: url.to_string(),
        source,
    })?;
    Ok(if prefix.parts().next().is_none() {
        LunaObjectStore::with_multipart(Arc::new(s3), options.retry)
    } else {
        LunaObjectStore::with_multipart(Arc::new(PrefixStore::new(s3, prefix)), options.retry)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::{ObjectStoreExt, PutPayload};
    use proptest::prelude::*;

    fn open(url: &str) -> Result<Arc<LunaObjectStore>, KernelError> {
        open_object_store(url, &ObjectStoreOptions::default())
    }

    fn reason(url: &str) -> String {
        match open(url) {
            Err(KernelError::InvalidUrl { url: u, reason }) => {
                assert_eq!(u, url);
                reason
            }
            other => panic!("{url}: expected InvalidUrl, got {other:?}"),
        }
    }

    #[test]
    fn bad_urls_are_rejected_with_a_reason() {
        assert!(reason("").contains("expected file:///absolute/path"));
        assert!(reason("/tmp/relative-without-scheme").contains("expected file:///"));
        assert!(reason("gs://bucket").contains("unsupported scheme \"gs\""));
        assert!(reason("file://host/tmp/x").contains("absolute path and no host"));
        assert!(reason("memory://name").contains("no name or path"));
        assert!(reason("memory:///x").contains("no name or path"));
        assert!(reason("s3:///prefix").contains("missing bucket"));
        assert!(reason("s3://bucket/a//b").contains("invalid key prefix"));
        assert!(reason("s3://key:secret@bucket").contains("credentials"));
        assert!(reason("s3://bucket:9000/p").contains("port"));
        assert!(reason("s3://bucket/p?region=x").contains("query"));
    }

    #[test]
    fn s3_urls_open_without_network() {
        let options = ObjectStoreOptions {
            endpoint: Some("http://127.0.0.1:1".into()),
            allow_http: true,
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            ..ObjectStoreOptions::default()
        };
        for url in ["s3://bucket", "s3://bucket/", "s3://bucket/some/prefix"] {
            open_object_store(url, &options).unwrap();
        }
        let half_credentials = ObjectStoreOptions {
            access_key_id: Some("k".into()),
            ..ObjectStoreOptions::default()
        };
        let err = open_object_store("s3://bucket", &half_credentials).unwrap_err();
        assert!(matches!(err, KernelError::OpenStore { .. }), "{err}");
    }

    #[test]
    fn debug_redacts_secrets() {
        let options = ObjectStoreOptions {
            secret_access_key: Some("hunter2".into()),
            session_token: Some("tok3n".into()),
            ..ObjectStoreOptions::default()
        };
        let shown = format!("{options:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok3n"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"));
    }

    #[tokio::test]
    async fn file_url_creates_the_directory_and_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/store dir");
        let url = Url::from_directory_path(&dir).unwrap().to_string();
        let store = open(&url).unwrap();
        let path = Path::from("a/b.txt");
        store
            .put(&path, PutPayload::from_static(b"hello"))
            .await
            .unwrap();
        assert_eq!(std::fs::read(dir.join("a/b.txt")).unwrap(), b"hello");
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], b"hello");

        // A second open of the same URL sees the same data.
        let again = open(&url).unwrap();
        assert_eq!(again.head(&path).await.unwrap().size, 5);
    }

    /// Tables and manifests on a local disk are synced before a put returns: the journal
    /// drops what a flushed table holds, so an unsynced table could lose acknowledged
    /// writes at a power loss. (object_store shows the setting only in its Debug form.)
    #[test]
    fn file_stores_sync_what_they_write() {
        let tmp = tempfile::tempdir().unwrap();
        let url = Url::from_directory_path(tmp.path()).unwrap();
        let store = open_local(url.as_str(), &url).unwrap();
        assert!(format!("{store:?}").contains("fsync: true"), "{store:?}");
    }

    #[tokio::test]
    async fn memory_url_round_trips_and_each_open_is_fresh() {
        let store = open("memory://").unwrap();
        let path = Path::from("k");
        store
            .put(&path, PutPayload::from_static(b"v"))
            .await
            .unwrap();
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&got[..], b"v");
        let other = open("memory:///").unwrap();
        assert!(matches!(
            other.head(&path).await,
            Err(object_store::Error::NotFound { .. })
        ));
    }

    proptest! {
        // Each valid s3 URL builds an HTTP client, which is slow enough to limit the cases.
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn arbitrary_strings_never_panic(url in ".{0,40}", tail in "[a-z0-9:/%?#@.]{0,20}") {
            // Opening s3 and memory URLs never touches the network or disk.
            let _ = open(&format!("s3://{url}{tail}"));
            let _ = open(&format!("memory://{url}{tail}"));
            let raw = format!("{url}{tail}");
            // A file URL would create directories wherever the generated string points.
            prop_assume!(Url::parse(&raw).map_or(true, |u| u.scheme() != "file"));
            let _ = open(&raw);
        }
    }
}
