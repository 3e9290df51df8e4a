//! How big a key range of a BaseStore is, and where its data halves: what tablet splits
//! (by size, and at the middle) need to know.

use bytes::Bytes;

use super::BaseStore;
use crate::error::Result;
use crate::table::KEY_COLUMN;
use crate::types::{Direction, KeyRange};

impl BaseStore {
    /// A key that cuts the data of `range` in the current version about in half by size,
    /// for splitting a tablet: the first key of the key page at which the pages that start
    /// inside the range reach half their bytes. Where pages are too coarse for that (a few
    /// pages' worth of data), the rows themselves are weighed. `None` if no key lies
    /// strictly after the range's start, so that there is nothing to cut. Data still in
    /// MemStores is not counted: flush first.
    pub async fn split_key(&self, range: &KeyRange) -> Result<Option<Bytes>> {
        if let Some(key) = middle_key(self.pages_in(range).await?, range) {
            return Ok(Some(key));
        }
        let version = self.version();
        let mut rows: Vec<(Bytes, u64)> = Vec::new();
        for table in version.overlapping(range) {
            let reader = self.reader(&table).await?;
            let bytes_per_row = table.size_bytes / table.rows.max(1);
            let mut cursor = reader.cursor(range, Direction::Forward).await?;
            while let Some(entry) = cursor.next_entry().await? {
                rows.push((entry.key, bytes_per_row));
                if rows.len() > ROW_SCAN_LIMIT {
                    return Ok(None);
                }
            }
        }
        rows.sort();
        Ok(middle_key(rows, range))
    }

    /// The bytes of `range`'s data in the current version's tables, estimated as
    /// [`BaseStore::split_key`] counts them (page by page, so tables that also hold other
    /// ranges count only for their pages in this one).
    pub async fn range_size(&self, range: &KeyRange) -> Result<u64> {
        Ok(self
            .pages_in(range)
            .await?
            .iter()
            .map(|(_, bytes)| bytes)
            .sum())
    }

    /// The key pages of the current version's tables that start inside `range`, in key
    /// order, each with its estimated bytes (its rows times its table's bytes per row).
    async fn pages_in(&self, range: &KeyRange) -> Result<Vec<(Bytes, u64)>> {
        let version = self.version();
        let mut pages: Vec<(Bytes, u64)> = Vec::new();
        for table in version.overlapping(range) {
            let reader = self.reader(&table).await?;
            let index = reader.index();
            let bytes_per_row = table.size_bytes / table.rows.max(1);
            for page in 0..index.pages(KEY_COLUMN).len() {
                let Some(first) = index.first_key(page) else {
                    continue;
                };
                if range.contains(first) {
                    let rows = index.page_rows(KEY_COLUMN, page);
                    pages.push((first.clone(), (rows.end - rows.start) * bytes_per_row));
                }
            }
        }
        pages.sort();
        Ok(pages)
    }
}

/// Most rows [`BaseStore::split_key`] weighs one by one, when pages are too coarse: more
/// rows than this span enough pages.
const ROW_SCAN_LIMIT: usize = 100_000;

/// The first of `weighed` (keys in order, with their bytes) at which half the bytes lie
/// before, among the keys strictly after `range`'s start.
fn middle_key(weighed: Vec<(Bytes, u64)>, range: &KeyRange) -> Option<Bytes> {
    let total: u64 = weighed.iter().map(|(_, bytes)| bytes).sum();
    let mut before = 0;
    for (key, bytes) in weighed {
        before += bytes;
        if key.as_ref() > range.start.as_ref() && before * 2 >= total {
            return Some(key);
        }
    }
    None
}
