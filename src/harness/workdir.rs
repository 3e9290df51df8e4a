//! Where a benchmark keeps its files.

use std::path::{Path, PathBuf};

use crate::error::CliError;

/// A benchmark's working directory: given, or a new one under the system temp directory
/// that is deleted at the end.
pub struct WorkDir {
    pub path: PathBuf,
    remove: std::sync::atomic::AtomicBool,
}

impl WorkDir {
    /// `given`, or a fresh temporary directory named after `bench`.
    pub fn new(bench: &str, given: Option<&Path>) -> Result<WorkDir, CliError> {
        let (path, remove) = match given {
            Some(path) => (path.to_path_buf(), false),
            None => {
                let name = format!("luna-bench-{bench}-{}", std::process::id());
                (std::env::temp_dir().join(name), true)
            }
        };
        std::fs::create_dir_all(&path).map_err(|source| CliError::Io {
            what: "creating the benchmark directory",
            source,
        })?;
        Ok(WorkDir {
            path,
            remove: remove.into(),
        })
    }
}

impl WorkDir {
    /// Keeps the directory at the end even if it was made here (its logs explain a failure).
    pub fn keep(&self) {
        self.remove
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if *self.remove.get_mut()
            && let Err(error) = std::fs::remove_dir_all(&self.path)
        {
            tracing::warn!(%error, dir = %self.path.display(), "could not remove the work directory");
        }
    }
}
