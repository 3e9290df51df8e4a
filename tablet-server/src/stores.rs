//! The BaseStores of the collections this server hosts tablets of: one per collection,
//! shared by all its tablets here, opened on first use.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use luna_kernel::objstore::LunaObjectStore;
use luna_storage::{BaseStore, BaseStoreOptions};
use object_store::ObjectStore;
use object_store::path::Path;

use crate::error::Result;

/// Open BaseStores by collection id.
pub(crate) struct CollectionStores {
    object_store: Arc<LunaObjectStore>,
    options: BaseStoreOptions,
    open: tokio::sync::Mutex<HashMap<u64, Arc<BaseStore>>>,
    /// The master's GC safe point, for stores opened later too.
    gc_safe_point: AtomicU64,
    /// The collections the master named this server the compactor of, for stores opened
    /// later too.
    compacting: std::sync::Mutex<HashSet<u64>>,
}

impl CollectionStores {
    pub(crate) fn new(object_store: Arc<LunaObjectStore>, options: BaseStoreOptions) -> Self {
        Self {
            object_store,
            options,
            open: tokio::sync::Mutex::new(HashMap::new()),
            gc_safe_point: AtomicU64::new(0),
            compacting: std::sync::Mutex::default(),
        }
    }

    /// Where a collection's BaseStore lives: by id, so that a collection dropped and
    /// created again under the same name never sees the old data.
    pub(crate) fn root(collection_id: u64) -> Path {
        Path::from(format!("collections/{collection_id}"))
    }

    /// The collection's BaseStore, opened (and its manifest replayed) on first use.
    pub(crate) async fn get(&self, collection_id: u64) -> Result<Arc<BaseStore>> {
        let mut open = self.open.lock().await;
        if let Some(base) = open.get(&collection_id) {
            return Ok(Arc::clone(base));
        }
        let store = Arc::clone(&self.object_store) as Arc<dyn ObjectStore>;
        let base = BaseStore::open(store, Self::root(collection_id), self.options.clone()).await?;
        base.set_gc_safe_point(self.gc_safe_point.load(Ordering::Acquire));
        base.set_compactor(self.compacts(collection_id));
        open.insert(collection_id, Arc::clone(&base));
        Ok(base)
    }

    /// Lets every BaseStore's compactions drop versions below `safe_point`, and refuses
    /// reads below it (it never goes down).
    pub(crate) async fn set_gc_safe_point(&self, safe_point: u64) {
        // Every heartbeat carries it; only a rise is worth waiting for a store being opened.
        if self.gc_safe_point.fetch_max(safe_point, Ordering::AcqRel) >= safe_point {
            return;
        }
        for base in self.open.lock().await.values() {
            base.set_gc_safe_point(safe_point);
        }
    }

    /// Makes this server the compactor of exactly `collections` (the master's choice: one
    /// server per collection).
    pub(crate) async fn set_compacting(&self, collections: &[u64]) {
        if let Ok(mut compacting) = self.compacting.lock() {
            *compacting = collections.iter().copied().collect();
        }
        for (&collection_id, base) in self.open.lock().await.iter() {
            base.set_compactor(self.compacts(collection_id));
        }
    }

    fn compacts(&self, collection_id: u64) -> bool {
        self.compacting
            .lock()
            .is_ok_and(|compacting| compacting.contains(&collection_id))
    }

    /// Stops every BaseStore's background jobs and waits for them.
    pub(crate) async fn shutdown(&self) {
        let open: Vec<_> = self
            .open
            .lock()
            .await
            .drain()
            .map(|(_, base)| base)
            .collect();
        for base in open {
            base.shutdown().await;
        }
    }
}
