//! The latest committed entries of a stream, kept where its subscriptions can read them
//! without the driver thread.
//!
//! A subscription that keeps up (the tablet server's apply loop) asks for entries the moment
//! they commit. Reading them through the driver cost a channel send, a wait for the
//! driver's next turn and a reply on every commit, on every replica. The ready loop instead
//! copies each committed entry here (a reference-counted `Bytes`, no data copy) before it
//! publishes the new committed index; a read that finds its range here needs only a lock,
//! and takes the entries out. Older entries, and snapshots, still come from the driver.

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

    /// Takes the entries from `from` up to `to` (at least `from` itself) out of the window,
    /// if it holds `from`, and drops the older ones with them. Consumed entries leave, so
    /// a window whose subscriber keeps up holds almost nothing, and an idle stream keeps
    /// no entries alive. Another subscriber that needs them reads through the driver.
    pub(crate) fn take(&self, from: u64, to: u64) -> Option<Vec<Committed>> {
        let mut window = self.window.lock().ok()?;
        let window = &mut *window;
        let first = window.entries.front()?.index;
        let last = window.entries.back()?.index;
        if from < first || from > last {
            return None;
        }
        let mut taken = Vec::new();
        while let Some(entry) = window.entries.pop_front_if(|entry| entry.index <= to) {
            window.bytes -= entry.data.len();
            if entry.index >= from {
                taken.push(Committed::Entry(entry));
            }
        }
        Some(taken)
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
    fn reads_take_from_the_window_or_nothing() {
        let recent = RecentEntries::default();
        assert_eq!(indexes(recent.take(1, 5)), Vec::<u64>::new());
        recent.push((1..=5).map(|i| entry(i, 10)));
        assert_eq!(
            indexes(recent.take(2, 3)),
            vec![2, 3],
            "entry 1 is dropped with them"
        );
        assert!(
            recent.take(1, 1).is_none(),
            "taken or dropped: the driver serves it"
        );
        assert!(recent.take(6, 6).is_none(), "not committed yet");
        assert_eq!(indexes(recent.take(4, 100)), vec![4, 5]);
        assert!(recent.take(5, 5).is_none(), "empty once consumed");
        // A gap starts the window over: entries before it are the driver's to serve.
        recent.push([entry(6, 10)]);
        recent.push([entry(9, 10)]);
        assert!(recent.take(6, 9).is_none());
        recent.push([entry(10, 10), entry(11, 10)]);
        recent.discard_through(10);
        assert!(
            recent.take(10, 11).is_none(),
            "compacted: the snapshot answers"
        );
        assert_eq!(indexes(recent.take(11, 11)), vec![11]);
        recent.push([entry(12, 10)]);
        recent.clear();
        assert!(recent.take(12, 12).is_none());
    }

    #[test]
    fn the_window_is_bounded_by_count_and_bytes() {
        let recent = RecentEntries::default();
        recent.push((1..=(MAX_ENTRIES as u64 + 10)).map(|i| entry(i, 1)));
        assert!(recent.take(10, 10).is_none(), "the oldest were dropped");
        assert_eq!(indexes(recent.take(11, 11)), vec![11]);
        let last = MAX_ENTRIES as u64 + 11;
        recent.push([entry(last, MAX_BYTES + 1)]);
        assert!(
            recent.take(last - 1, last).is_none(),
            "one huge entry pushes out the rest"
        );
        assert_eq!(indexes(recent.take(last, last)), vec![last]);
    }
}
