//! Ownership of a tablet among its replicas: claiming and releasing the
//! right to flush, flushing, and following the owner's flushes as a replica.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;

use super::{Tablet, poisoned};
use crate::error::{Result, StorageError};
use crate::memstore::MemStore;

/// How long [`Tablet::apply_flushed`] keeps re-reading the manifest for a
/// flush it was told about. The owner appends its marker only after its
/// manifest edit committed, so a miss means a lagging or failing store.
const FLUSH_VISIBLE_WAIT: Duration = Duration::from_secs(2);

impl Tablet {
    /// Makes this handle the tablet's owner at `epoch`, which must be newer
    /// than the manifest's (else `Fenced`): from now on it flushes its
    /// memtables, and every older owner's flushes are refused.
    ///
    /// Memtables the manifest already covers (an earlier owner flushed them)
    /// are dropped instead of flushed again. Call `claim` and
    /// [`Tablet::release`] from one task (the group's apply loop), not concurrently.
    pub async fn claim(self: &Arc<Self>, epoch: u64) -> Result<()> {
        let _transition = self.transitions.lock().await;
        let claimed = self
            .base
            .claim_tablet(self.id, epoch, self.range.clone(), &self.span)
            .await?;
        // The claim's commit installed a version holding everything up to the
        // recorded marker, so these memtables are safe to drop.
        self.memstore.drop_flushed(claimed.flushed_up_to, false)?;
        self.note_flushed(claimed.flushed_up_to);
        let mut role = self.role.lock().map_err(|_| poisoned())?;
        role.epoch = Some(epoch);
        role.fenced_by = 0;
        // Spawned after the epoch is set: a flusher that saw no epoch would stop.
        let flusher = tokio::spawn(background_flusher(
            Arc::downgrade(self),
            Arc::clone(&self.memstore),
        ));
        if let Some(previous) = role.flusher.replace(flusher) {
            previous.abort();
        }
        Ok(())
    }

    /// Stops flushing (leadership was lost): this handle becomes a replica
    /// again, which applies writes, serves reads, follows markers with
    /// [`Tablet::apply_flushed`] and may [`Tablet::claim`] again at a newer epoch.
    ///
    /// The background flusher is cancelled where it stands, as a crash would
    /// cancel it: an upload or manifest put already sent may still land. The
    /// manifest then accepts it if the epoch is still current (the data is
    /// durable and the marker is right) or refuses it once a newer owner
    /// claimed the tablet; an uncommitted upload is an orphan for GC.
    pub fn release(&self) {
        self.release_if(|_| true);
    }

    /// [`Tablet::release`], if this handle still owns the tablet at `epoch`: a
    /// task that learns late that its leadership ended must not undo the claim
    /// a newer leadership made on the same handle meanwhile.
    pub fn release_at(&self, epoch: u64) {
        self.release_if(|owned| owned == Some(epoch));
    }

    fn release_if(&self, owned_at: impl Fn(Option<u64>) -> bool) {
        let flusher = match self.role.lock() {
            Ok(mut role) => {
                if !owned_at(role.epoch) {
                    return;
                }
                role.epoch = None;
                role.fenced_by = 0;
                role.flusher.take()
            }
            Err(poisoned) => poisoned.into_inner().flusher.take(),
        };
        if let Some(flusher) = flusher {
            flusher.abort();
        }
    }

    /// The highest journal index whose writes are all in the BaseStore for
    /// this tablet. It starts at [`Tablet::recovered_up_to`] and advances with
    /// every flush this handle commits (and with claims and applied markers):
    /// the owner appends "flushed up to X" to the journal from it and
    /// truncates the journal below it.
    pub fn watch_flushed(&self) -> watch::Receiver<u64> {
        self.flushed.subscribe()
    }

    /// The current value of [`Tablet::watch_flushed`].
    pub fn flushed_up_to(&self) -> u64 {
        *self.flushed.borrow()
    }

    fn note_flushed(&self, up_to: u64) {
        self.flushed.send_if_modified(|flushed| {
            let advanced = up_to > *flushed;
            *flushed = (*flushed).max(up_to);
            advanced
        });
    }

    /// Applies the owner's "flushed up to `up_to`" marker on a replica: brings
    /// the BaseStore's version up to a manifest that records the flush
    /// (re-reading briefly if the store lags; `FlushNotVisible` if it never
    /// shows), then drops every memtable whose writes all have index <= `up_to`.
    /// A non-empty active memtable turns immutable, so a later marker can drop
    /// it. Reads never miss data: the version is installed before any
    /// memtable goes. On the owner this does nothing: its own flushes drop
    /// its memtables.
    pub async fn apply_flushed(&self, up_to: u64) -> Result<()> {
        let _transition = self.transitions.lock().await;
        if self.epoch().is_some() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + FLUSH_VISIBLE_WAIT;
        let mut backoff = Duration::from_millis(10);
        loop {
            // Read in this handle's journal: a tablet that moved on to another journal
            // since has every write of this one in the BaseStore.
            let found = match self.base.refresh().await {
                Ok(version) => Ok(self
                    .span
                    .replay_after(version.tablet(self.id).map(|t| (t.epoch, t.flushed_up_to)))),
                Err(error) => Err(error),
            };
            match found {
                Ok(found) if found >= up_to => break,
                Ok(found) if tokio::time::Instant::now() >= deadline => {
                    return Err(StorageError::FlushNotVisible {
                        tablet_id: self.id,
                        wanted: up_to,
                        found,
                    });
                }
                Err(error) if !error.is_retryable() || tokio::time::Instant::now() >= deadline => {
                    return Err(error);
                }
                Ok(_) | Err(_) => {}
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        self.memstore.drop_flushed(up_to, true)?;
        self.note_flushed(up_to);
        Ok(())
    }

    /// The epoch to flush at, or why this handle must not flush.
    fn owner_epoch(&self) -> Result<u64> {
        let role = self.role.lock().map_err(|_| poisoned())?;
        match (role.epoch, role.fenced_by) {
            (None, _) => Err(StorageError::NotOwner { tablet_id: self.id }),
            (Some(epoch), 0) => Ok(epoch),
            (Some(epoch), current_epoch) => Err(StorageError::Fenced {
                tablet_id: self.id,
                epoch,
                current_epoch,
            }),
        }
    }

    /// Makes everything written so far durable in the BaseStore. Only the
    /// owner flushes: a replica gets `NotOwner`.
    pub async fn flush(&self) -> Result<()> {
        self.owner_epoch()?;
        self.memstore.rotate()?;
        self.flush_immutables().await
    }

    async fn flush_immutables(&self) -> Result<()> {
        let _one_at_a_time = self.flush_lock.lock().await;
        while let Some(memtable) = self.memstore.oldest_immutable()? {
            // Re-checked per memtable: a release stops the loop here.
            let epoch = self.owner_epoch()?;
            match self.base.flush(self.id, epoch, &memtable).await {
                Ok(version) => {
                    self.memstore.remove_flushed(&memtable)?;
                    let up_to = version
                        .tablet(self.id)
                        .map_or(memtable.max_seq(), |t| t.flushed_up_to);
                    self.note_flushed(up_to);
                }
                Err(error @ StorageError::Fenced { current_epoch, .. }) => {
                    let mut role = self.role.lock().map_err(|_| poisoned())?;
                    // Only the epoch that was refused is fenced; a release or
                    // a newer claim meanwhile owns the role now.
                    if role.epoch == Some(epoch) {
                        role.fenced_by = current_epoch.max(epoch + 1);
                    }
                    return Err(error);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Flushes everything (if it is the owner) and stops flushing.
    pub async fn close(&self) -> Result<()> {
        let result = match self.owner_epoch() {
            Ok(_) => self.flush().await,
            Err(StorageError::NotOwner { .. }) => Ok(()),
            Err(error) => Err(error),
        };
        self.release();
        result
    }
}

impl Drop for Tablet {
    fn drop(&mut self) {
        self.release();
    }
}

/// Flushes memtables as they turn immutable, starting with any already
/// waiting. A failed flush keeps its memtable (nothing is lost) and is retried
/// with backoff; writers stall on the memory budget meanwhile. It ends when
/// the handle is released, fenced or dropped.
async fn background_flusher(tablet: Weak<Tablet>, memstore: Arc<MemStore>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(handle) = tablet.upgrade() else {
            return;
        };
        match handle.flush_immutables().await {
            Ok(()) => {
                backoff = Duration::from_millis(50);
                drop(handle);
                memstore.immutable_ready().await;
            }
            Err(StorageError::NotOwner { .. }) => return,
            Err(error @ (StorageError::Fenced { .. } | StorageError::Closed { .. })) => {
                tracing::warn!(tablet = handle.id, %error, "flusher stopping");
                return;
            }
            Err(error) => {
                tracing::warn!(tablet = handle.id, %error, "flush failed; will retry");
                drop(handle);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
