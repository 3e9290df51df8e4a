//! What a reader pins for a table: each page's first key and position, and
//! the key bloom filter. Built once from the footer and page index, after
//! which the full Parquet metadata is dropped.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::async_reader::MetadataFetch;
use parquet::basic::{Compression, Type as PhysicalType};
use parquet::bloom_filter::Sbbf;
use parquet::errors::ParquetError;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaDataReader};
use parquet::file::page_index::column_index::ColumnIndexMetaData;
use parquet::schema::types::ColumnDescPtr;

use super::format::{KEY, KIND, TS, VALUE};
use crate::error::{Result, StorageError};

/// Bytes fetched from the end of a table at open, beyond an estimate of the
/// page index and bloom filter: usually the whole footer region in one GET.
const TAIL_SLACK: u64 = 64 * 1024;

static NEXT_TABLE_ID: AtomicU64 = AtomicU64::new(1);

/// Where one data page of one column lives.
#[derive(Debug, Clone, Copy)]
pub struct PageSpan {
    /// Byte offset of the page header in the object.
    pub offset: u64,
    /// Header plus body length.
    pub len: u32,
    /// Index of the page's first row in the table.
    pub first_row: u64,
}

/// The pinned read index of one table.
pub struct TableIndex {
    id: u64,
    path: Path,
    size: u64,
    rows: u64,
    first_keys: Vec<Bytes>,
    pages: [Vec<PageSpan>; 4],
    columns: [ColumnDescPtr; 4],
    compression: [Compression; 4],
    bloom: Sbbf,
}

impl std::fmt::Debug for TableIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableIndex")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .field("pages", &self.first_keys.len())
            .finish()
    }
}

impl TableIndex {
    /// Reads the footer, page index and bloom filter of the table at `path`,
    /// whose size and row count the manifest recorded.
    pub async fn open(
        store: &Arc<dyn ObjectStore>,
        path: &Path,
        size: u64,
        rows_hint: u64,
    ) -> Result<TableIndex> {
        let corrupt = |detail: String| StorageError::corruption(path.to_string(), detail);
        let tail_len = size.min(TAIL_SLACK + rows_hint.saturating_mul(4));
        let tail_start = size - tail_len;
        let tail = store
            .get_range(path, tail_start..size)
            .await
            .map_err(|e| StorageError::store("get", path, e))?;
        if (tail.len() as u64) < tail_len {
            return Err(corrupt(format!(
                "object is shorter than the {size} bytes the manifest records"
            )));
        }
        let mut fetch = TailFetch {
            store: Arc::clone(store),
            path: path.clone(),
            tail,
            tail_start,
        };
        let metadata = ParquetMetaDataReader::new()
            .with_page_index_policy(PageIndexPolicy::Required)
            .load_and_finish(fetch.clone(), size)
            .await
            .map_err(|e| fetch_or_corrupt(path, "unreadable footer", e))?;
        if metadata.num_row_groups() != 1 {
            return Err(corrupt(format!(
                "{} row groups, expected 1",
                metadata.num_row_groups()
            )));
        }
        let row_group = metadata.row_group(0);
        let expected = [
            PhysicalType::BYTE_ARRAY,
            PhysicalType::INT64,
            PhysicalType::INT32,
            PhysicalType::BYTE_ARRAY,
        ];
        if row_group.num_columns() != 4
            || (0..4).any(|c| row_group.column(c).column_type() != expected[c])
        {
            return Err(corrupt("not a Luna table: unexpected columns".into()));
        }
        let page_index = metadata
            .page_index()
            .ok_or_else(|| corrupt("no page index".into()))?;
        let rows = u64::try_from(row_group.num_rows())
            .map_err(|_| corrupt("negative row count".into()))?;
        let mut pages: [Vec<PageSpan>; 4] = Default::default();
        for (column, spans) in pages.iter_mut().enumerate() {
            let locations = page_index
                .page_locations(0, column)
                .ok_or_else(|| corrupt(format!("no offset index for column {column}")))?;
            for location in locations {
                let span = PageSpan {
                    offset: u64::try_from(location.offset)
                        .map_err(|_| corrupt("negative page offset".into()))?,
                    len: u32::try_from(location.compressed_page_size)
                        .map_err(|_| corrupt("bad page size".into()))?,
                    first_row: u64::try_from(location.first_row_index)
                        .map_err(|_| corrupt("bad first row".into()))?,
                };
                if span.offset + u64::from(span.len) > size || span.first_row >= rows.max(1) {
                    return Err(corrupt(format!(
                        "page of column {column} lies outside the table"
                    )));
                }
                spans.push(span);
            }
            if spans.is_empty() || spans[0].first_row != 0 {
                return Err(corrupt(format!("column {column} has no first page")));
            }
            // Readers binary-search these and subtract neighbours: they must ascend.
            if spans.windows(2).any(|pair| {
                pair[1].first_row <= pair[0].first_row || pair[1].offset <= pair[0].offset
            }) {
                return Err(corrupt(format!(
                    "pages of column {column} are out of order"
                )));
            }
        }
        let Some(ColumnIndexMetaData::BYTE_ARRAY(key_index)) = page_index.column_index(0, KEY)
        else {
            return Err(corrupt("no column index on key".into()));
        };
        let first_keys = (0..pages[KEY].len())
            .map(|page| {
                key_index
                    .min_value(page)
                    .map(Bytes::copy_from_slice)
                    .ok_or_else(|| corrupt(format!("no first key for page {page}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let key_chunk = row_group.column(KEY);
        let (Some(bloom_offset), Some(bloom_len)) = (
            key_chunk.bloom_filter_offset(),
            key_chunk.bloom_filter_length(),
        ) else {
            return Err(corrupt("no key bloom filter".into()));
        };
        let bloom_range = u64::try_from(bloom_offset).unwrap_or(u64::MAX)
            ..u64::try_from(bloom_offset)
                .unwrap_or(u64::MAX)
                .saturating_add(u64::try_from(bloom_len).unwrap_or(u64::MAX));
        if bloom_range.end > size {
            return Err(corrupt("bloom filter lies outside the table".into()));
        }
        let bloom_bytes = fetch
            .fetch(bloom_range)
            .await
            .map_err(|e| fetch_or_corrupt(path, "bloom filter", e))?;
        let bloom =
            Sbbf::from_bytes(&bloom_bytes).map_err(|e| corrupt(format!("bloom filter: {e}")))?;
        let columns = [KEY, TS, KIND, VALUE].map(|c| row_group.column(c).column_descr_ptr());
        let compression = [KEY, TS, KIND, VALUE].map(|c| row_group.column(c).compression());
        Ok(TableIndex {
            id: NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed),
            path: path.clone(),
            size,
            rows,
            first_keys,
            pages,
            columns,
            compression,
            bloom,
        })
    }

    /// A process-unique id, used in page-cache keys.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The object's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The object's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Rows in the table.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Whether `key` may be in the table (false means certainly not).
    pub fn may_contain(&self, key: &[u8]) -> bool {
        self.bloom.check(key)
    }

    /// The first key page that can hold versions of `key` (or anything after it).
    pub fn first_page_for(&self, key: &[u8]) -> usize {
        // Versions of `key` may begin at the end of the page before the first
        // page whose first key is >= key.
        self.first_keys
            .partition_point(|first| first.as_ref() < key)
            .saturating_sub(1)
    }

    /// The first key of key page `page`.
    pub fn first_key(&self, page: usize) -> Option<&Bytes> {
        self.first_keys.get(page)
    }

    /// The pages of `column`.
    pub fn pages(&self, column: usize) -> &[PageSpan] {
        &self.pages[column]
    }

    /// The page of `column` holding `row`.
    pub fn page_of_row(&self, column: usize, row: u64) -> usize {
        self.pages[column]
            .partition_point(|span| span.first_row <= row)
            .saturating_sub(1)
    }

    /// Rows of page `page` of `column`.
    pub fn page_rows(&self, column: usize, page: usize) -> Range<u64> {
        let spans = &self.pages[column];
        let start = spans[page].first_row;
        let end = spans.get(page + 1).map_or(self.rows, |next| next.first_row);
        start..end
    }

    pub(crate) fn column_descr(&self, column: usize) -> &ColumnDescPtr {
        &self.columns[column]
    }

    pub(crate) fn compression(&self, column: usize) -> Compression {
        self.compression[column]
    }

    /// Approximate memory the index pins, for the cache's weigher.
    pub fn memory_bytes(&self) -> usize {
        let keys: usize = self.first_keys.iter().map(|k| k.len() + 32).sum();
        let spans: usize = self
            .pages
            .iter()
            .map(|p| p.len() * size_of::<PageSpan>())
            .sum();
        keys + spans + self.bloom.num_blocks() * 32 + 512
    }
}

/// A store failure surfacing through the Parquet reader stays a (possibly
/// retryable) store error; anything else means the bytes are bad.
fn fetch_or_corrupt(path: &Path, what: &str, error: ParquetError) -> StorageError {
    match error {
        ParquetError::External(source) => match source.downcast::<object_store::Error>() {
            Ok(store_error) => StorageError::store("get", path, *store_error),
            Err(other) => StorageError::corruption(path.to_string(), format!("{what}: {other}")),
        },
        other => StorageError::corruption(path.to_string(), format!("{what}: {other}")),
    }
}

/// Serves the metadata reader from the tail fetched at open, and anything
/// outside it with a ranged GET.
#[derive(Clone)]
struct TailFetch {
    store: Arc<dyn ObjectStore>,
    path: Path,
    tail: Bytes,
    tail_start: u64,
}

impl MetadataFetch for TailFetch {
    fn fetch(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        let tail_end = self.tail_start + self.tail.len() as u64;
        if range.start >= self.tail_start && range.end <= tail_end && range.start <= range.end {
            let start = (range.start - self.tail_start) as usize;
            let end = (range.end - self.tail_start) as usize;
            let bytes = self.tail.slice(start..end);
            return async move { Ok(bytes) }.boxed();
        }
        let store = Arc::clone(&self.store);
        let path = self.path.clone();
        async move {
            store
                .get_range(&path, range)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        }
        .boxed()
    }
}

/// A table's index as last opened, held weakly: the cache stays the owner
/// (and bounds memory), while a hit here skips the cache's hashing.
#[derive(Default)]
pub struct PinnedIndex(std::sync::RwLock<std::sync::Weak<TableIndex>>);

impl PinnedIndex {
    /// The index, if it is still cached.
    pub fn get(&self) -> Option<Arc<TableIndex>> {
        self.0.read().ok()?.upgrade()
    }

    /// Remembers `index`.
    pub fn set(&self, index: &Arc<TableIndex>) {
        if let Ok(mut slot) = self.0.write() {
            *slot = Arc::downgrade(index);
        }
    }
}

impl Clone for PinnedIndex {
    /// A copy starts empty: it is only a shortcut.
    fn clone(&self) -> Self {
        PinnedIndex::default()
    }
}

impl PartialEq for PinnedIndex {
    /// Shortcuts never make two tables different.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for PinnedIndex {}

impl std::fmt::Debug for PinnedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinnedIndex")
    }
}
