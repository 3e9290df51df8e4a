//! Garbage collection: deletes tables no live version references (compacted
//! away, or orphaned by a crash between upload and manifest edit) and
//! manifest objects a newer checkpoint covers. Nothing is deleted while a
//! reader in this process holds a version that uses it, nor before it is
//! `gc_grace` old and was seen unreferenced `gc_grace` ago, which covers
//! readers and uploads in other processes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::TryStreamExt;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};

use super::BaseStore;
use crate::error::{Result, StorageError};
use crate::manifest::{Layout, ManifestObject};

/// What one garbage-collection pass deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Table objects deleted.
    pub tables_deleted: usize,
    /// Bytes of table objects deleted.
    pub table_bytes_deleted: u64,
    /// Manifest edits and checkpoints deleted.
    pub manifest_objects_deleted: usize,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

impl BaseStore {
    /// Names of tables some version in this process may still read, or that
    /// are being uploaded.
    fn tables_in_use(&self) -> HashSet<String> {
        let mut live: HashSet<String> = self.version().tables().map(|t| t.name.clone()).collect();
        if let Ok(uploading) = self.uploading.lock() {
            live.extend(uploading.iter().cloned());
        }
        if let Ok(retired) = self.retired.lock() {
            for version in retired.iter().filter_map(|weak| weak.upgrade()) {
                live.extend(version.tables().map(|t| t.name.clone()));
            }
        }
        live
    }

    async fn list_all(&self, dir: &object_store::path::Path) -> Result<Vec<ObjectMeta>> {
        self.store
            .list(Some(dir))
            .try_collect()
            .await
            .map_err(|e| StorageError::store("list", dir, e))
    }

    async fn delete_object(&self, path: &object_store::path::Path) -> Result<bool> {
        match self.store.delete(path).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(StorageError::store("delete", path, error)),
        }
    }

    /// Runs one garbage-collection pass.
    pub async fn collect_garbage(&self) -> Result<GcReport> {
        let mut report = GcReport::default();
        // Refresh first: a table another process just committed is live.
        let _ = self.refresh().await?;
        let grace_ms = i64::try_from(self.options.gc_grace.as_millis()).unwrap_or(i64::MAX);
        let old_enough = |meta: &ObjectMeta| {
            now_ms().saturating_sub(meta.last_modified.timestamp_millis()) >= grace_ms
        };

        let tables_dir = self.layout().tables_dir();
        let objects = self.list_all(&tables_dir).await?;
        let in_use = self.tables_in_use();
        let root_parts = self.layout().root().parts().count();
        let now = tokio::time::Instant::now();
        // When each unreferenced object was first seen so. Rebuilt from this
        // listing: entries for objects now referenced or gone are dropped.
        let previously = self
            .unreferenced_since
            .lock()
            .map(|mut seen| std::mem::take(&mut *seen))
            .unwrap_or_default();
        let mut unreferenced = HashMap::new();
        let mut doomed = Vec::new();
        for meta in &objects {
            let name = meta
                .location
                .parts()
                .skip(root_parts)
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/");
            if in_use.contains(&name) {
                continue;
            }
            let since = previously.get(&name).copied().unwrap_or(now);
            // Both clocks must pass the grace: the upload age covers objects
            // from before this process started watching; the time since it was
            // first seen unreferenced covers other processes that still read a
            // version from before the compaction that dropped it, or upload
            // it for a commit to come (see `Uploads::check_fresh`).
            if old_enough(meta) && now.duration_since(since) >= self.options.gc_grace {
                doomed.push(meta);
            }
            // Kept for doomed ones too: a failed delete must not restart the clock.
            unreferenced.insert(name, since);
        }
        if let Ok(mut seen) = self.unreferenced_since.lock() {
            *seen = unreferenced;
        }
        for meta in doomed {
            if self.delete_object(&meta.location).await? {
                report.tables_deleted += 1;
                report.table_bytes_deleted += meta.size;
            }
            self.options.cache.forget(&meta.location).await;
        }

        // Keep the two newest checkpoints and every edit after the older one,
        // so a damaged newest checkpoint still has a fallback.
        let manifest = self.list_all(&self.layout().manifest_dir()).await?;
        let mut checkpoints: Vec<u64> = manifest
            .iter()
            .filter_map(|meta| match Layout::parse_manifest_object(&meta.location) {
                Some(ManifestObject::Checkpoint(seq)) => Some(seq),
                _ => None,
            })
            .collect();
        checkpoints.sort_unstable();
        if checkpoints.len() >= 2 {
            let keep_from = checkpoints[checkpoints.len() - 2];
            for meta in manifest.iter().filter(|meta| old_enough(meta)) {
                let obsolete = match Layout::parse_manifest_object(&meta.location) {
                    Some(ManifestObject::Edit(seq)) => seq <= keep_from,
                    Some(ManifestObject::Checkpoint(seq)) => seq < keep_from,
                    None => false,
                };
                if obsolete && self.delete_object(&meta.location).await? {
                    report.manifest_objects_deleted += 1;
                }
            }
        }
        Ok(report)
    }
}

/// Every `gc_interval` until the store closes: collects garbage if this process is the
/// compactor, else refreshes the version.
pub(super) fn spawn_collections(base: &Arc<BaseStore>) -> tokio::task::JoinHandle<()> {
    // Held weakly, like the compaction task: dropping the store ends it.
    let store = Arc::downgrade(base);
    let interval = base.options.gc_interval.max(Duration::from_millis(10));
    let mut shutdown = base.shutdown.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.changed() => return,
            }
            let Some(base) = store.upgrade().filter(|_| !*shutdown.borrow()) else {
                return;
            };
            if base.is_compactor() {
                if let Err(error) = base.collect_garbage().await {
                    tracing::warn!(%error, "garbage collection failed; will retry");
                }
            } else if let Err(error) = base.refresh().await {
                // Another process collects; it deletes a table `gc_grace` after every
                // process could have moved off it, which holds only while each refreshes
                // this often.
                tracing::warn!(%error, "refreshing the manifest failed; will retry");
            }
        }
    })
}
