//! moka caches of table indexes (footer, page index, bloom filter) and of
//! decoded pages. Concurrent misses for the same entry share one load.

use std::sync::Arc;

use moka::future::Cache;
use object_store::ObjectStore;
use object_store::path::Path;

use crate::error::{Result, StorageError};
use crate::table::{RowPage, TableIndex};

/// Cache sizes in bytes.
#[derive(Debug, Clone, Copy)]
pub struct CacheOptions {
    /// Decoded row pages.
    pub page_bytes: u64,
    /// Pinned table indexes (first keys, page positions, bloom filters).
    pub index_bytes: u64,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            page_bytes: 256 * 1024 * 1024,
            index_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The caches shared by every table of one or many BaseStores.
pub struct BlockCache {
    indexes: Cache<Path, Arc<TableIndex>>,
    pages: Cache<(u64, u32), Arc<RowPage>>,
}

impl BlockCache {
    /// Caches of the given sizes.
    pub fn new(options: CacheOptions) -> BlockCache {
        BlockCache {
            indexes: Cache::builder()
                .max_capacity(options.index_bytes)
                .weigher(|_, index: &Arc<TableIndex>| weight(index.memory_bytes()))
                .build(),
            pages: Cache::builder()
                .max_capacity(options.page_bytes)
                .weigher(|_, page: &Arc<RowPage>| weight(page.memory_bytes()))
                .build(),
        }
    }

    /// The index of the table at `path`, opening it on a miss.
    pub async fn index(
        &self,
        store: &Arc<dyn ObjectStore>,
        path: &Path,
        size: u64,
        rows: u64,
    ) -> Result<Arc<TableIndex>> {
        if let Some(index) = self.indexes.get(path).await {
            return Ok(index);
        }
        self.indexes
            .try_get_with_by_ref(path, async {
                TableIndex::open(store, path, size, rows)
                    .await
                    .map(Arc::new)
            })
            .await
            .map_err(unshare)
    }

    /// Row page `key_page` of a table, loading it with `load` on a miss.
    pub async fn row_page<F>(
        &self,
        index: &TableIndex,
        key_page: usize,
        load: F,
    ) -> Result<Arc<RowPage>>
    where
        F: Future<Output = Result<Arc<RowPage>>>,
    {
        let key = (index.id(), key_page as u32);
        if let Some(page) = self.pages.get(&key).await {
            return Ok(page);
        }
        self.pages.try_get_with(key, load).await.map_err(unshare)
    }

    /// Drops a deleted table's index.
    pub async fn forget(&self, path: &Path) {
        self.indexes.invalidate(path).await;
    }
}

fn weight(bytes: usize) -> u32 {
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// A load error shared by concurrent waiters; the first owner gets it whole,
/// others get an equivalent error that keeps its kind and message.
fn unshare(error: Arc<StorageError>) -> StorageError {
    match Arc::try_unwrap(error) {
        Ok(error) => error,
        Err(shared) => match &*shared {
            StorageError::Corruption { object, detail } => StorageError::Corruption {
                object: object.clone(),
                detail: detail.clone(),
            },
            StorageError::ObjectStore {
                operation,
                path,
                source,
            } => StorageError::ObjectStore {
                operation,
                path: path.clone(),
                source: object_store::Error::Generic {
                    store: "shared load",
                    source: source.to_string().into(),
                },
            },
            other => StorageError::Job {
                job: "cache load",
                detail: other.to_string(),
            },
        },
    }
}
