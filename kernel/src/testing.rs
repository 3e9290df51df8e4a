//! Helpers for tests of crates built on the kernel (cargo feature `testing`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::KernelError;
use crate::objstore::ObjectStoreOptions;

const ACCESS_KEY: &str = "luna-test-access-key";
const SECRET_KEY: &str = "luna-test-secret-key";
const REGION: &str = "us-east-1";

/// An S3 server (s3s-fs over a temporary directory) running in-process on `127.0.0.1`, with
/// one bucket and fixed credentials. It stops, and its data is deleted, on drop.
///
/// Its conditional puts are checked but not atomic, so concurrent `PutMode::Create` races are
/// not meaningful against it.
#[derive(Debug)]
pub struct S3TestServer {
    addr: SocketAddr,
    bucket: String,
    task: JoinHandle<()>,
    // Fields drop after `Drop::drop` has aborted the server task.
    _dir: tempfile::TempDir,
}

impl S3TestServer {
    /// Starts a server on an ephemeral port with an empty `bucket`.
    ///
    /// `bucket` must be a plain S3 bucket name (lowercase letters, digits, `-` and `.`).
    pub async fn start(bucket: &str) -> Result<S3TestServer, KernelError> {
        let plain = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if bucket.len() < 3 || !bucket.chars().all(plain) || bucket.contains("..") {
            return Err(KernelError::InvalidArgument {
                name: "bucket",
                reason: format!("{bucket:?} is not a plain S3 bucket name"),
            });
        }
        let io = |context: &str| {
            let context = context.to_string();
            move |source| KernelError::Io { context, source }
        };
        let dir = tempfile::tempdir().map_err(io("creating the S3 test server's directory"))?;
        std::fs::create_dir(dir.path().join(bucket)).map_err(io("creating the test bucket"))?;
        let fs = s3s_fs::FileSystem::new(dir.path()).map_err(|e| KernelError::Io {
            context: "starting s3s-fs".to_string(),
            source: std::io::Error::other(format!("{e:?}")),
        })?;
        let mut service = S3ServiceBuilder::new(fs);
        service.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(io("binding the S3 test server"))?;
        let addr = listener
            .local_addr()
            .map_err(io("reading the S3 test server's address"))?;
        let task = tokio::spawn(serve(listener, service.build()));
        Ok(S3TestServer {
            addr,
            bucket: bucket.to_string(),
            task,
            _dir: dir,
        })
    }

    /// The server's base URL, `http://127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Options that reach this server: its endpoint, credentials and region, plain HTTP.
    pub fn options(&self) -> ObjectStoreOptions {
        ObjectStoreOptions {
            endpoint: Some(self.endpoint()),
            region: Some(REGION.to_string()),
            access_key_id: Some(ACCESS_KEY.to_string()),
            secret_access_key: Some(SECRET_KEY.to_string()),
            allow_http: true,
            ..ObjectStoreOptions::default()
        }
    }

    /// The `s3://` URL of `prefix` in the bucket; an empty prefix names the whole bucket.
    pub fn url(&self, prefix: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{prefix}", self.bucket)
        }
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts connections until aborted; the connections live in a `JoinSet` so that aborting
/// this task ends them too.
async fn serve(listener: TcpListener, service: S3Service) {
    let http = ConnBuilder::new(TokioExecutor::new());
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let socket = match listener.accept().await {
            Ok((socket, _)) => socket,
            Err(e) => {
                tracing::warn!(error = %e, "S3 test server: accept failed");
                // Out of file descriptors and similar: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Small requests otherwise wait on Nagle's algorithm and delayed ACKs (~40 ms each).
        if let Err(e) = socket.set_nodelay(true) {
            tracing::warn!(error = %e, "S3 test server: cannot set TCP_NODELAY");
        }
        let connection = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "S3 test server: connection ended with an error");
            }
        });
    }
}
