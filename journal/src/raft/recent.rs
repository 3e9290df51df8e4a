//! The latest committed entries of a stream, kept where its subscriptions can read them
//! without the driver thread.
//!
//! A subscription that keeps up (the tablet server's apply loop) asks for entries the moment
//! they commit. Reading them through the driver cost a channel send, a wait for the
//! driver's next turn and a reply on every commit, on every replica. The ready loop instead
//! copies each committed entry here (a reference-counted `Bytes`, no data copy) before it
//! publishes the new committed index; a read that finds its range here needs only a lock.
//! Older entries, and snapshots, still come from the driver.

use std::collections::VecDeque;
use std::sync::Mutex;

use luna_kernel::stream::{Committed, Entry};

/// Entries kept, at most.
const MAX_ENTRIES: usize = 1024;
/// Bytes of entry data kept, at most (the newest entry stays even if it is larger).
const MAX_BYTES: usize = 4 << 20;

/// A window of the latest committed entries, contiguous by index.
#[derive(Debug, Default)]
pub(crate) struct RecentEntries {
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl RecentEntries {
    /// Appends newly committed entries, in index order. A gap (after a snapshot) starts the
    /// window over.
    pub(crate) fn push(&self, committed: impl IntoIterator<Item = Entry>) {
        let Ok(mut window) = self.window.lock() else {
            return;
        };
        for entry in committed {
            if window
                .entries
                .back()
                .is_some_and(|last| last.index + 1 != entry.index)
            {
                window.entries.clear();
                window.bytes = 0;
            }
            window.bytes += entry.data.len();
            window.entries.push_back(entry);
            while window.entries.len() > MAX_ENTRIES
                || (window.bytes > MAX_BYTES && window.entries.len() > 1)
            {
                if let Some(old) = window.entries.pop_front() {
                    window.bytes -= old.data.len();
                }
            }
        }
    }

    /// Forgets the entries up to `index` (the log was compacted there).
    pub(crate) fn discard_through(&self, index: u64) {
        let Ok(mut window) = self.window.lock() else {
            return;
        };
        while window
            .entries
            .front()
            .is_some_and(|entry| entry.index <= index)
        {
            if let Some(old) = window.entries.pop_front() {
                window.bytes -= old.data.len();
            }
        }
    }

    /// Forgets everything (a snapshot replaced the log).
    pub(crate) fn clear(&self) {
        if let Ok(mut window) = self.window.lock() {
            *window = Window::default();
        }
    }

    /// Entries from `from` up to `to` (at least `from` itself), if the window holds `from`.
    pub(crate) fn read(&self, from: u64, to: u64) -> Option<Vec<Committed>> {
        let window = self.window.lock().ok()?;
        let first = window.entries.front()?.index;
        let offset = usize::try_from(from.checked_sub(first)?).ok()?;
        let entries: Vec<Committed> = window
            .entries
            .iter()
            .skip(offset)
            .take_while(|entry| entry.index <= to)
            .cloned()
            .map(Committed::Entry)
            .collect();
        (!entries.is_empty()).then_some(entries)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn entry(index: u64, size: usize) -> Entry {
        Entry {
            index,
            term: 1,
            data: Bytes::from(vec![0u8; size]),
        }
    }

    fn indexes(read: Option<Vec<Committed>>) -> Vec<u64> {
        read.unwrap_or_default()
            .iter()
            .map(Committed::index)
            .collect()
    }

    #[test]
    fn reads_come_from_the_window_or_not_at_all() {
        let recent = RecentEntries::default();
        assert_eq!(indexes(recent.read(1, 5)), Vec::<u64>::new());
        recent.push((1..=5).map(|i| entry(i, 10)));
        assert_eq!(indexes(recent.read(2, 3)), vec![2, 3]);
        assert_eq!(indexes(recent.read(4, 100)), vec![4, 5]);
        assert!(recent.read(6, 6).is_none(), "not committed yet");
        // A gap starts the window over: entries before it are the driver's to serve.
        recent.push([entry(9, 10)]);
        assert!(recent.read(5, 9).is_none());
        assert_eq!(indexes(recent.read(9, 9)), vec![9]);
        recent.push([entry(10, 10), entry(11, 10)]);
        recent.discard_through(10);
        assert!(
            recent.read(10, 11).is_none(),
            "compacted: the snapshot answers"
        );
        assert_eq!(indexes(recent.read(11, 11)), vec![11]);
        recent.clear();
        assert!(recent.read(9, 9).is_none());
    }

    #[test]
    fn the_window_is_bounded_by_count_and_bytes() {
        let recent = RecentEntries::default();
        recent.push((1..=(MAX_ENTRIES as u64 + 10)).map(|i| entry(i, 1)));
        assert!(recent.read(10, 10).is_none(), "the oldest were dropped");
        assert_eq!(indexes(recent.read(11, 11)), vec![11]);
        recent.push([entry(MAX_ENTRIES as u64 + 11, MAX_BYTES + 1)]);
        let last = MAX_ENTRIES as u64 + 11;
        assert!(
            recent.read(last - 1, last).is_none(),
            "one huge entry pushes out the rest"
        );
        assert_eq!(indexes(recent.read(last, last)), vec![last]);
    }
}
