//! The manifest: an append-only log of edits, one object per edit, each
//! written put-if-absent, plus periodic checkpoints. See docs/storage.md.

mod codec;
mod version;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use luna_proto::manifest as pb;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions};

pub use codec::{Layout, ManifestObject};
pub use version::{
    LEVELS, Rejection, TableInfo, TabletInfo, Version, range_to_pb, table_to_pb, tablet_to_pb,
};

use crate::error::{Result, StorageError};

/// Reads and appends a BaseStore's manifest log.
pub struct ManifestLog {
    store: Arc<dyn ObjectStore>,
    layout: Layout,
    writer_id: String,
    checkpoint_every: u64,
}

/// The manifest objects a listing found.
#[derive(Debug, Default)]
pub struct ManifestListing {
    /// Edit numbers, ascending.
    pub edits: Vec<u64>,
    /// Checkpoint numbers, ascending.
    pub checkpoints: Vec<u64>,
}

impl ManifestLog {
    /// A log under `layout`, writing a checkpoint every `checkpoint_every` edits.
    pub fn new(store: Arc<dyn ObjectStore>, layout: Layout, checkpoint_every: u64) -> ManifestLog {
        ManifestLog {
            store,
            layout,
            writer_id: uuid::Uuid::new_v4().to_string(),
            checkpoint_every: checkpoint_every.max(1),
        }
    }

    /// The object layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Lists the manifest objects.
    pub async fn list(&self) -> Result<ManifestListing> {
        let dir = self.layout.manifest_dir();
        let objects: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| StorageError::store("list", &dir, e))?;
        let mut listing = ManifestListing::default();
        for object in objects {
            match Layout::parse_manifest_object(&object.location) {
                Some(ManifestObject::Edit(seq)) => listing.edits.push(seq),
                Some(ManifestObject::Checkpoint(seq)) => listing.checkpoints.push(seq),
                None => {}
            }
        }
        listing.edits.sort_unstable();
        listing.checkpoints.sort_unstable();
        Ok(listing)
    }

    /// Rebuilds the newest state: the newest readable checkpoint, then every edit after it.
    pub async fn load(&self) -> Result<Version> {
        let listing = self.list().await?;
        let mut version = Version::default();
        for &seq in listing.checkpoints.iter().rev() {
            match self.read_checkpoint(seq).await {
                Ok(Some(checkpoint)) => {
                    version = Version::from_checkpoint(&checkpoint);
                    break;
                }
                // Gone (collected meanwhile) or damaged: an older checkpoint plus more edits gives the same state.
                Ok(None) => {}
                Err(error @ StorageError::Corruption { .. }) => {
                    tracing::warn!(%error, "skipping damaged manifest checkpoint");
                }
                Err(error) => return Err(error),
            }
        }
        let expected = version.seq() + 1;
        let known: Vec<u64> = listing
            .edits
            .into_iter()
            .filter(|&seq| seq >= expected)
            .collect();
        if let Some((missing, _)) = (expected..).zip(&known).find(|(want, have)| want != *have) {
            return Err(StorageError::corruption(
                self.layout.edit(missing).to_string(),
                format!("missing, while later edits exist: the manifest has a gap at {missing}"),
            ));
        }
        // Known edits are fetched concurrently; anything newer is probed after.
        let mut edits =
            futures::stream::iter(known.into_iter().map(|seq| self.read_edit(seq))).buffered(16);
        while let Some(edit) = edits.next().await {
            match edit? {
                Some(edit) if edit.seq == version.seq() + 1 => apply_logged(&mut version, &edit),
                Some(edit) => {
                    return Err(StorageError::corruption(
                        self.layout.edit(version.seq() + 1).to_string(),
                        format!("holds edit {} out of order", edit.seq),
                    ));
                }
                None => break,
            }
        }
        Ok(self.apply_newer_edits(&version).await?.unwrap_or(version))
    }

    /// Brings `version` up to date. `None` when nothing changed.
    ///
    /// A missing next edit normally means `version` is the newest state. But if
    /// `version`'s own edit is gone too, garbage collection has removed edits
    /// past it (it was held longer than the grace period): the log cannot be
    /// continued from there, so the whole state is reloaded. Without this, a
    /// stale writer would reuse a collected sequence number and its edit would
    /// be invisible to every reader starting from a newer checkpoint.
    pub async fn catch_up(&self, version: &Version) -> Result<Option<Version>> {
        let newer = self.apply_newer_edits(version).await?;
        let latest = newer.as_ref().unwrap_or(version);
        if latest.seq() > 0 && !self.edit_exists(latest.seq()).await? {
            tracing::info!(
                seq = latest.seq(),
                "manifest state predates collected edits; reloading"
            );
            return self.load().await.map(Some);
        }
        Ok(newer)
    }

    async fn edit_exists(&self, seq: u64) -> Result<bool> {
        let path = self.layout.edit(seq);
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(StorageError::store("head", &path, error)),
        }
    }

    /// Applies the edits after `version` until one is missing.
    async fn apply_newer_edits(&self, version: &Version) -> Result<Option<Version>> {
        let mut newer: Option<Version> = None;
        loop {
            let current = newer.as_ref().unwrap_or(version);
            let Some(edit) = self.read_edit(current.seq() + 1).await? else {
                return Ok(newer);
            };
            let mut next = current.clone();
            apply_logged(&mut next, &edit);
            newer = Some(next);
        }
    }

    /// Appends the change `make` derives from the newest state, retrying when
    /// another writer takes the next sequence number first. `make` sees the
    /// state its edit will follow and refuses (e.g. `Fenced`) by returning an error.
    pub async fn commit(
        &self,
        known: &Version,
        mut make: impl FnMut(&Version) -> Result<pb::manifest_edit::Change>,
    ) -> Result<Version> {
        let mut version = known.clone();
        loop {
            if let Some(newer) = self.catch_up(&version).await? {
                version = newer;
            }
            let change = make(&version)?;
            let edit = pb::ManifestEdit {
                seq: version.seq() + 1,
                written_at_ms: now_ms(),
                writer: self.writer_id.clone(),
                change: Some(change),
            };
            let path = self.layout.edit(edit.seq);
            let options = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            match self
                .store
                .put_opts(&path, codec::encode(&edit).into(), options)
                .await
            {
                Ok(_) => {
                    let mut next = version.clone();
                    next.apply(&edit).map_err(|rejection| StorageError::Job {
                        job: "manifest commit",
                        detail: format!("own edit {} was rejected: {rejection:?}", edit.seq),
                    })?;
                    if next.seq().is_multiple_of(self.checkpoint_every) {
                        self.write_checkpoint(&next).await;
                    }
                    return Ok(next);
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    tracing::debug!(seq = edit.seq, "lost a manifest race; re-reading");
                }
                Err(error) => return Err(StorageError::store("put", &path, error)),
            }
        }
    }

    /// Writes a checkpoint of `version`. Best effort: the edits stay the
    /// source of truth, a missing checkpoint only makes replay longer.
    pub async fn write_checkpoint(&self, version: &Version) {
        let path = self.layout.checkpoint(version.seq());
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let bytes = codec::encode(&version.to_checkpoint());
        match self.store.put_opts(&path, bytes.into(), options).await {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(error) => tracing::warn!(%error, %path, "manifest checkpoint not written"),
        }
    }

    async fn read_edit(&self, seq: u64) -> Result<Option<pb::ManifestEdit>> {
        let path = self.layout.edit(seq);
        let Some(bytes) = self.read_object(&path).await? else {
            return Ok(None);
        };
        let edit: pb::ManifestEdit = codec::decode(&path, &bytes)?;
        if edit.seq != seq {
            return Err(StorageError::corruption(
                path.to_string(),
                format!("names edit {}", edit.seq),
            ));
        }
        Ok(Some(edit))
    }

    async fn read_checkpoint(&self, seq: u64) -> Result<Option<pb::Checkpoint>> {
        let path = self.layout.checkpoint(seq);
        let Some(bytes) = self.read_object(&path).await? else {
            return Ok(None);
        };
        codec::decode(&path, &bytes).map(Some)
    }

    async fn read_object(&self, path: &object_store::path::Path) -> Result<Option<bytes::Bytes>> {
        let fetched = match self.store.get(path).await {
            Ok(result) => result.bytes().await,
            Err(error) => Err(error),
        };
        match fetched {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(StorageError::store("get", path, error)),
        }
    }
}

fn apply_logged(version: &mut Version, edit: &pb::ManifestEdit) {
    if let Err(rejection) = version.apply(edit) {
        tracing::debug!(seq = edit.seq, writer = %edit.writer, ?rejection, "manifest edit fenced out");
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests;
