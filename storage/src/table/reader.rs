//! Point reads and ordered cursors over one table.
//!
//! The unit of caching is a row page: the rows of one `key` page with the
//! matching pages of `ts`, `kind` and `value`, fetched together. A point read
//! then costs one cache lookup, and a cold one a single batched fetch.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::format::{KEY, KIND, TS, VALUE};
use super::index::TableIndex;
use super::page::{self, DecodedPage};
use crate::cache::BlockCache;
use crate::error::{Result, StorageError};
use crate::types::{Direction, KeyRange, Kind, Lookup, Timestamp, VersionedEntry};

/// The rows of one key page, with every column decoded.
#[derive(Debug)]
pub struct RowPage {
    rows: Range<u64>,
    /// Per column, the pages covering `rows`: one when pages are aligned,
    /// which they are unless huge values forced extra page cuts.
    columns: [Vec<DecodedPage>; 4],
}

impl RowPage {
    fn column(&self, column: usize, row: u64) -> Option<&DecodedPage> {
        self.columns[column].iter().find(|page| page.contains(row))
    }

    /// Approximate memory held, for the cache's weigher.
    pub fn memory_bytes(&self) -> usize {
        self.columns
            .iter()
            .flatten()
            .map(DecodedPage::memory_bytes)
            .sum()
    }

    fn key(&self, row: u64) -> &[u8] {
        self.column(KEY, row)
            .map_or(&[], |page| page.binary_ref(row))
    }
}

/// Where pages come from: the shared cache (reads), or an object fetched
/// whole (compaction, which would only pollute the cache).
#[derive(Clone)]
enum PageSource {
    Cached {
        store: Arc<dyn ObjectStore>,
        cache: Arc<BlockCache>,
    },
    Loaded(Bytes),
}

/// An open table.
#[derive(Clone)]
pub struct TableReader {
    index: Arc<TableIndex>,
    source: PageSource,
}

impl TableReader {
    /// A reader over an already opened index, reading through the cache.
    pub fn new(
        index: Arc<TableIndex>,
        store: &Arc<dyn ObjectStore>,
        cache: &Arc<BlockCache>,
    ) -> TableReader {
        TableReader {
            index,
            source: PageSource::Cached {
                store: Arc::clone(store),
                cache: Arc::clone(cache),
            },
        }
    }

    /// Opens the table at `path` for cached reads.
    pub async fn open(
        store: &Arc<dyn ObjectStore>,
        cache: &Arc<BlockCache>,
        path: &Path,
        size: u64,
        rows: u64,
    ) -> Result<TableReader> {
        let index = cache.index(store, path, size, rows).await?;
        Ok(TableReader::new(index, store, cache))
    }

    /// Fetches the whole table in one request, for a full pass that should
    /// not go through (and evict) the cache.
    pub async fn load_whole(self) -> Result<TableReader> {
        let PageSource::Cached { store, .. } = &self.source else {
            return Ok(self);
        };
        let path = self.index.path();
        let fetched = match store.get(path).await {
            Ok(result) => result.bytes().await,
            Err(error) => Err(error),
        };
        let bytes = fetched.map_err(|e| StorageError::store("get", path, e))?;
        let size = self.index.size();
        if bytes.len() as u64 != size {
            return Err(StorageError::corruption(
                path.to_string(),
                format!("{} bytes, expected {size}", bytes.len()),
            ));
        }
        Ok(TableReader {
            index: self.index,
            source: PageSource::Loaded(bytes),
        })
    }

    /// The pinned index.
    pub fn index(&self) -> &Arc<TableIndex> {
        &self.index
    }

    /// Row page `key_page`, from the cache or the object.
    async fn row_page(&self, key_page: usize) -> Result<Arc<RowPage>> {
        match &self.source {
            PageSource::Loaded(bytes) => self
                .decode_row_page(key_page, |range| {
                    Ok(bytes.slice(range.start as usize..range.end as usize))
                })
                .map(Arc::new),
            PageSource::Cached { store, cache } => {
                cache
                    .row_page(&self.index, key_page, async {
                        let path = self.index.path();
                        let ranges: Vec<Range<u64>> = self
                            .spans(key_page)
                            .into_iter()
                            .map(|(_, _, range)| range)
                            .collect();
                        let mut fetched = store
                            .get_ranges(path, &ranges)
                            .await
                            .map_err(|e| StorageError::store("get", path, e))?
                            .into_iter();
                        self.decode_row_page(key_page, |_| {
                            fetched.next().ok_or_else(|| {
                                StorageError::corruption(path.to_string(), "short ranged read")
                            })
                        })
                        .map(Arc::new)
                    })
                    .await
            }
        }
    }

    /// (column, page, byte range) of every page a row page needs, in order.
    fn spans(&self, key_page: usize) -> Vec<(usize, usize, Range<u64>)> {
        let rows = self.index.page_rows(KEY, key_page);
        let mut spans = Vec::with_capacity(4);
        for column in [KEY, TS, KIND, VALUE] {
            let first = self.index.page_of_row(column, rows.start);
            let last = self
                .index
                .page_of_row(column, rows.end.saturating_sub(1).max(rows.start));
            for page in first..=last {
                let span = self.index.pages(column)[page];
                spans.push((column, page, span.offset..span.offset + u64::from(span.len)));
            }
        }
        spans
    }

    fn decode_row_page(
        &self,
        key_page: usize,
        mut bytes_of: impl FnMut(Range<u64>) -> Result<Bytes>,
    ) -> Result<RowPage> {
        let mut columns: [Vec<DecodedPage>; 4] = Default::default();
        for (column, page, range) in self.spans(key_page) {
            columns[column].push(page::decode(&self.index, column, page, bytes_of(range)?)?);
        }
        Ok(RowPage {
            rows: self.index.page_rows(KEY, key_page),
            columns,
        })
    }

    /// The first row whose key is >= `key`, and its row page (`None` past the end).
    async fn seek(&self, key: &[u8]) -> Result<Option<(u64, Arc<RowPage>)>> {
        let pages = self.index.pages(KEY).len();
        for key_page in self.index.first_page_for(key)..pages {
            let page = self.row_page(key_page).await?;
            let row = page
                .column(KEY, page.rows.start)
                .map_or(page.rows.end, |keys| keys.lower_bound(key));
            if row < page.rows.end {
                return Ok(Some((row, page)));
            }
        }
        Ok(None)
    }

    /// The newest version of `key` at or below `read_ts`.
    pub async fn get(&self, key: &[u8], read_ts: Timestamp) -> Result<Lookup> {
        if !self.index.may_contain(key) {
            return Ok(Lookup::Absent);
        }
        let Some((row, page)) = self.seek(key).await? else {
            return Ok(Lookup::Absent);
        };
        let mut cursor = TableCursor {
            reader: self.clone(),
            page: Some(page),
            row: Some(row),
            range: KeyRange::all(),
            direction: Direction::Forward,
        };
        while let Some(version) = cursor.next_version(Some(key)).await? {
            if version.ts <= read_ts {
                return Ok(match version.kind {
                    Kind::Put => Lookup::Value {
                        value: version.value,
                        ts: version.ts,
                    },
                    Kind::Delete => Lookup::Deleted { ts: version.ts },
                });
            }
        }
        Ok(Lookup::Absent)
    }

    /// A cursor over every version with a key in `range`, in (key asc, ts
    /// desc) order forward and the exact reverse backward.
    pub async fn cursor(&self, range: &KeyRange, direction: Direction) -> Result<TableCursor> {
        let rows = self.index.rows();
        let (row, page) = match (direction, &range.end) {
            (Direction::Forward, _) => match self.seek(&range.start).await? {
                Some((row, page)) => (Some(row), Some(page)),
                None => (None, None),
            },
            // The last row before the first key >= end.
            (Direction::Reverse, Some(end)) => match self.seek(end).await? {
                Some((row, _)) => (row.checked_sub(1), None),
                None => (rows.checked_sub(1), None),
            },
            (Direction::Reverse, None) => (rows.checked_sub(1), None),
        };
        Ok(TableCursor {
            reader: self.clone(),
            page,
            row,
            range: range.clone(),
            direction,
        })
    }
}

/// An owned cursor over a table's versions.
pub struct TableCursor {
    reader: TableReader,
    page: Option<Arc<RowPage>>,
    /// The next row to return; `None` once exhausted.
    row: Option<u64>,
    range: KeyRange,
    direction: Direction,
}

impl TableCursor {
    /// The next version, or `None` past the end of the range.
    pub async fn next_entry(&mut self) -> Result<Option<VersionedEntry>> {
        self.next_version(None).await
    }

    /// The next version; with `only`, `None` as soon as the key differs.
    async fn next_version(&mut self, only: Option<&[u8]>) -> Result<Option<VersionedEntry>> {
        let index = Arc::clone(&self.reader.index);
        let Some(row) = self.row.filter(|&row| row < index.rows()) else {
            return Ok(None);
        };
        let page = match &self.page {
            Some(page) if page.rows.contains(&row) => Arc::clone(page),
            _ => {
                let page = self.reader.row_page(index.page_of_row(KEY, row)).await?;
                self.page = Some(Arc::clone(&page));
                page
            }
        };
        let key = page.key(row);
        if only.is_some_and(|only| only != key) || !self.range.contains(key) {
            self.row = None;
            return Ok(None);
        }
        let corrupt = |what: &str| {
            StorageError::corruption(index.path().to_string(), format!("row {row}: {what}"))
        };
        let ts = page
            .column(TS, row)
            .ok_or_else(|| corrupt("no ts"))?
            .int(row);
        let code = page
            .column(KIND, row)
            .ok_or_else(|| corrupt("no kind"))?
            .int(row);
        let kind = u8::try_from(code)
            .ok()
            .and_then(Kind::from_code)
            .ok_or_else(|| corrupt(&format!("unknown kind {code}")))?;
        let value = match kind {
            Kind::Put => page
                .column(VALUE, row)
                .ok_or_else(|| corrupt("no value"))?
                .binary(row),
            Kind::Delete => Bytes::new(),
        };
        let key = page
            .column(KEY, row)
            .ok_or_else(|| corrupt("no key"))?
            .binary(row);
        self.row = match self.direction {
            Direction::Forward => Some(row + 1),
            Direction::Reverse => row.checked_sub(1),
        };
        Ok(Some(VersionedEntry {
            key,
            ts,
            kind,
            value,
        }))
    }
}
