//! Plain types shared by the MemStore, the tables and the BaseStore.

use std::ops::{Bound, Range};

use bytes::Bytes;

use crate::error::{Result, StorageError};

/// A commit timestamp (from the TSO in a universe; any increasing number embedded).
pub type Timestamp = u64;

/// Identifies a tablet within its collection.
pub type TabletId = u64;

/// Whether a version stores a value or deletes the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The key holds a value from this timestamp on.
    Put,
    /// The key is deleted from this timestamp on (a tombstone).
    Delete,
}

impl Kind {
    /// The on-disk code of the kind (the `kind` column of a table).
    pub fn code(self) -> u8 {
        match self {
            Kind::Put => 0,
            Kind::Delete => 1,
        }
    }

    /// Parses an on-disk code.
    pub fn from_code(code: u8) -> Option<Kind> {
        match code {
            0 => Some(Kind::Put),
            1 => Some(Kind::Delete),
            _ => None,
        }
    }
}

/// One version of one key, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedEntry {
    /// The user key.
    pub key: Bytes,
    /// Its commit timestamp.
    pub ts: Timestamp,
    /// Put or delete.
    pub kind: Kind,
    /// The value (empty for a delete).
    pub value: Bytes,
}

/// What a point lookup found at a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The newest visible version is a put of this value, committed at `ts`.
    Value {
        /// The value.
        value: Bytes,
        /// Its commit timestamp.
        ts: Timestamp,
    },
    /// The newest visible version is a delete committed at `ts`.
    Deleted {
        /// The tombstone's timestamp.
        ts: Timestamp,
    },
    /// No visible version in this source.
    Absent,
}

impl Lookup {
    /// The timestamp of the version found, if any.
    pub fn ts(&self) -> Option<Timestamp> {
        match self {
            Lookup::Value { ts, .. } | Lookup::Deleted { ts } => Some(*ts),
            Lookup::Absent => None,
        }
    }

    /// Keeps whichever of two findings is newer: sources are consulted in any order.
    pub fn newer(self, other: Lookup) -> Lookup {
        match (self.ts(), other.ts()) {
            (Some(a), Some(b)) if b > a => other,
            (None, Some(_)) => other,
            _ => self,
        }
    }

    /// The value, if the key is live.
    pub fn into_value(self) -> Option<Bytes> {
        match self {
            Lookup::Value { value, .. } => Some(value),
            _ => None,
        }
    }
}

/// Which journal a tablet handle replays, so that the manifest's flush marker is read in
/// the right index space.
///
/// A tablet's flush marker ("every journal entry up to here is in a table") counts indexes
/// of the journal that carried the tablet's writes when it was recorded. A tablet that moves
/// to another group's journal moves to owner epochs above all of its old ones, so the
/// recorded owner's epoch says whose indexes the marker counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSpan {
    /// The owner epochs of this journal's hosting of the tablet.
    pub epochs: Range<u64>,
    /// The journal index at which this hosting began: no earlier entry of the journal
    /// writes to the tablet.
    pub opened_at: u64,
}

impl LogSpan {
    /// One journal for the tablet's whole life (an embedded tablet).
    pub fn whole() -> LogSpan {
        LogSpan {
            epochs: 0..u64::MAX,
            opened_at: 0,
        }
    }

    /// The journal index up to which replay skips the tablet's writes, given the owner
    /// epoch and flush marker the manifest records (`None`: never claimed).
    ///
    /// A marker recorded in this hosting counts here. One recorded before it counts in
    /// another journal: only this hosting's entries concern the tablet. One recorded after
    /// it means the tablet moved on, which it does only once this hosting's every write
    /// is flushed: every entry here is durable.
    pub fn replay_after(&self, recorded: Option<(u64, u64)>) -> u64 {
        match recorded {
            Some((epoch, _)) if epoch >= self.epochs.end => u64::MAX,
            Some((epoch, flushed_up_to)) if epoch >= self.epochs.start => {
                flushed_up_to.max(self.opened_at)
            }
            _ => self.opened_at,
        }
    }
}

/// A half-open range of user keys, `[start, end)`; `end: None` is unbounded.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyRange {
    /// Inclusive lower bound (empty = from the first key).
    pub start: Bytes,
    /// Exclusive upper bound, or unbounded.
    pub end: Option<Bytes>,
}

impl KeyRange {
    /// Every key.
    pub fn all() -> KeyRange {
        KeyRange::default()
    }

    /// `[start, end)`.
    pub fn new(start: impl Into<Bytes>, end: Option<Bytes>) -> KeyRange {
        KeyRange {
            start: start.into(),
            end,
        }
    }

    /// Whether `key` falls in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_ref() && self.end.as_ref().is_none_or(|end| key < end.as_ref())
    }

    /// Whether the range shares a key with the closed interval `[smallest, largest]`.
    pub fn overlaps(&self, smallest: &[u8], largest: &[u8]) -> bool {
        largest >= self.start.as_ref()
            && self.end.as_ref().is_none_or(|end| smallest < end.as_ref())
    }

    /// The intersection of two ranges (possibly empty).
    pub fn intersect(&self, other: &KeyRange) -> KeyRange {
        let start = self.start.clone().max(other.start.clone());
        let end = match (&self.end, &other.end) {
            (Some(a), Some(b)) => Some(a.clone().min(b.clone())),
            (Some(a), None) => Some(a.clone()),
            (None, b) => b.clone(),
        };
        KeyRange { start, end }
    }

    /// Whether no key can fall in the range.
    pub fn is_empty(&self) -> bool {
        self.end.as_ref().is_some_and(|end| end <= &self.start)
    }

    /// The upper bound as a std `Bound`.
    pub fn end_bound(&self) -> Bound<&[u8]> {
        match &self.end {
            Some(end) => Bound::Excluded(end.as_ref()),
            None => Bound::Unbounded,
        }
    }
}

/// The order a scan returns keys in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Direction {
    /// Ascending keys.
    #[default]
    Forward,
    /// Descending keys.
    Reverse,
}

/// One change in a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: Bytes,
    },
}

impl Mutation {
    /// The key the mutation changes.
    pub fn key(&self) -> &Bytes {
        match self {
            Mutation::Put { key, .. } | Mutation::Delete { key } => key,
        }
    }
}

/// Mutations applied atomically at one timestamp.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    mutations: Vec<Mutation>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// Adds a put.
    pub fn put(&mut self, key: impl Into<Bytes>, value: impl Into<Bytes>) -> &mut Self {
        self.mutations.push(Mutation::Put {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Adds a delete.
    pub fn delete(&mut self, key: impl Into<Bytes>) -> &mut Self {
        self.mutations.push(Mutation::Delete { key: key.into() });
        self
    }

    /// The mutations, in order.
    pub fn mutations(&self) -> &[Mutation] {
        &self.mutations
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.mutations.is_empty()
    }
}

/// Size limits on user input, checked before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest key, in bytes (keys must also be at least 1 byte).
    pub max_key_size: usize,
    /// Largest value, in bytes.
    pub max_value_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_size: 4 * 1024,
            max_value_size: 8 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// Rejects an empty or oversized key.
    pub fn check_key(&self, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            return Err(StorageError::invalid("keys must be at least 1 byte"));
        }
        if key.len() > self.max_key_size {
            return Err(StorageError::invalid(format!(
                "key of {} bytes exceeds the limit of {} bytes",
                key.len(),
                self.max_key_size
            )));
        }
        Ok(())
    }

    /// Rejects a batch with an invalid key or an oversized value.
    pub fn check_batch(&self, batch: &WriteBatch) -> Result<()> {
        for mutation in batch.mutations() {
            self.check_key(mutation.key())?;
            if let Mutation::Put { value, .. } = mutation
                && value.len() > self.max_value_size
            {
                return Err(StorageError::invalid(format!(
                    "value of {} bytes exceeds the limit of {} bytes",
                    value.len(),
                    self.max_value_size
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_reads_the_flush_marker_only_in_its_own_journal() {
        let span = LogSpan {
            epochs: 20..30,
            opened_at: 40,
        };
        assert_eq!(span.replay_after(None), 40);
        // Recorded by the journal the tablet came from: its indexes are not ours.
        assert_eq!(span.replay_after(Some((12, 5000))), 40);
        assert_eq!(span.replay_after(Some((21, 700))), 700);
        assert_eq!(span.replay_after(Some((21, 10))), 40);
        // The tablet moved on after this hosting flushed everything.
        assert_eq!(span.replay_after(Some((30, 3))), u64::MAX);
        assert_eq!(LogSpan::whole().replay_after(Some((5, 9))), 9);
        assert_eq!(LogSpan::whole().replay_after(None), 0);
    }

    #[test]
    fn key_range_contains_and_overlaps() {
        let range = KeyRange::new(&b"b"[..], Some(Bytes::from_static(b"d")));
        assert!(!range.contains(b"a"));
        assert!(range.contains(b"b"));
        assert!(range.contains(b"c\xff"));
        assert!(!range.contains(b"d"));
        assert!(range.overlaps(b"a", b"b"));
        assert!(!range.overlaps(b"a", b"a\xff"));
        assert!(!range.overlaps(b"d", b"z"));
        assert!(KeyRange::all().contains(b"anything"));
    }

    #[test]
    fn intersect_narrows_both_ends() {
        let a = KeyRange::new(&b"b"[..], None);
        let b = KeyRange::new(&b"a"[..], Some(Bytes::from_static(b"m")));
        let both = a.intersect(&b);
        assert_eq!(
            both,
            KeyRange::new(&b"b"[..], Some(Bytes::from_static(b"m")))
        );
        let disjoint = KeyRange::new(&b"x"[..], None).intersect(&b);
        assert!(disjoint.is_empty());
    }

    #[test]
    fn newer_keeps_the_larger_timestamp() {
        let old = Lookup::Value {
            value: Bytes::from_static(b"old"),
            ts: 3,
        };
        let tomb = Lookup::Deleted { ts: 5 };
        assert_eq!(old.clone().newer(tomb.clone()), tomb);
        assert_eq!(tomb.clone().newer(old.clone()), tomb);
        assert_eq!(Lookup::Absent.newer(old.clone()), old);
        assert_eq!(old.clone().newer(Lookup::Absent), old);
    }

    #[test]
    fn limits_reject_bad_input() {
        let limits = Limits {
            max_key_size: 4,
            max_value_size: 8,
        };
        assert!(limits.check_key(b"").is_err());
        assert!(limits.check_key(b"abcd").is_ok());
        assert!(limits.check_key(b"abcde").is_err());
        let mut batch = WriteBatch::new();
        batch.put(&b"k"[..], vec![0u8; 9]);
        assert!(matches!(
            limits.check_batch(&batch),
            Err(StorageError::InvalidArgument { .. })
        ));
        let mut ok = WriteBatch::new();
        ok.put(&b"k"[..], vec![0u8; 8]).delete(&b"j"[..]);
        assert!(limits.check_batch(&ok).is_ok());
    }
}
