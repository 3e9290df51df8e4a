//! Object-store flags shared by every subcommand that opens a store.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use luna_kernel::objstore::{LunaObjectStore, ObjectStoreOptions, open_object_store};

use crate::error::CliError;

/// Where data lives: a local directory by default, or any object store URL.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Local data directory (holds the default `file://` object store).
    #[arg(long, env = "LUNA_DATA_DIR", default_value = "luna-data")]
    pub data_dir: PathBuf,
    /// Object store URL: file:///abs/path, memory://, or s3://bucket/prefix.
    /// Defaults to file://DATA_DIR/objects.
    #[arg(long, env = "LUNA_OBJECT_STORE")]
    pub object_store: Option<String>,
    /// S3 endpoint, for MinIO or another S3-compatible server.
    #[arg(long, env = "AWS_ENDPOINT_URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "AWS_REGION")]
    pub s3_region: Option<String>,
    /// S3 access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
    /// Allow a plain http:// S3 endpoint (local MinIO).
    #[arg(long, env = "LUNA_S3_ALLOW_HTTP")]
    pub s3_allow_http: bool,
}

impl StoreArgs {
    /// Opens the store the flags name, creating the data directory if needed.
    pub fn open(&self) -> Result<Arc<LunaObjectStore>, CliError> {
        let url = match &self.object_store {
            Some(url) => url.clone(),
            None => format!(
                "file://{}",
                absolute(&self.data_dir.join("objects"))?.display()
            ),
        };
        let options = ObjectStoreOptions {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            access_key_id: self.s3_access_key_id.clone(),
            secret_access_key: self.s3_secret_access_key.clone(),
            allow_http: self.s3_allow_http,
            ..ObjectStoreOptions::default()
        };
        Ok(open_object_store(&url, &options)?)
    }
}

fn absolute(path: &Path) -> Result<PathBuf, CliError> {
    std::fs::create_dir_all(path).map_err(|source| CliError::Io {
        what: "creating the data directory",
        source,
    })?;
    std::path::absolute(path).map_err(|source| CliError::Io {
        what: "resolving the data directory",
        source,
    })
}
