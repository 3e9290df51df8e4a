//! Point reads and ordered cursors over one table, page by page.

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::format::{KEY, KIND, TS, VALUE};
use super::index::TableIndex;
use super::page::{self, DecodedPage};
use crate::cache::BlockCache;
use crate::error::{Result, StorageError};
use crate::types::{Kind, Lookup, Timestamp, VersionedEntry};

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
    /// Opens the table at `path` for cached reads.
    pub async fn open(
        store: &Arc<dyn ObjectStore>,
        cache: &Arc<BlockCache>,
        path: &Path,
        size: u64,
        rows: u64,
    ) -> Result<TableReader> {
        let index = cache.index(store, path, size, rows).await?;
        Ok(TableReader {
            index,
            source: PageSource::Cached {
                store: Arc::clone(store),
                cache: Arc::clone(cache),
            },
        })
    }

    /// Fetches the whole table in one request, for a full pass.
    pub async fn load(store: &Arc<dyn ObjectStore>, cache: &Arc<BlockCache>, path: &Path, size: u64, rows: u64) -> Result<TableReader> {
        let index = cache.index(store, path, size, rows).await?;
        let bytes = store
            .get(path)
            .await
            .map_err(|e| StorageError::store("get", path, e))?
            .bytes()
            .await
            .map_err(|e| StorageError::store("get", path, e))?;
        if bytes.len() as u64 != size {
            return Err(StorageError::corruption(path.to_string(), format!("{} bytes, expected {size}", bytes.len())));
        }
        Ok(TableReader {
            index,
            source: PageSource::Loaded(bytes),
        })
    }

    /// The pinned index.
    pub fn index(&self) -> &Arc<TableIndex> {
        &self.index
    }

    async fn page(&self, column: usize, page: usize) -> Result<Arc<DecodedPage>> {
        let span = self.index.pages(column)[page];
        let range = span.offset..span.offset + u64::from(span.len);
        match &self.source {
            PageSource::Loaded(bytes) => {
                let body = bytes.slice(range.start as usize..range.end as usize);
                page::decode(&self.index, column, page, body).map(Arc::new)
            }
            PageSource::Cached { store, cache } => {
                cache
                    .page(&self.index, column, page, async {
                        let path = self.index.path();
                        let body = store.get_range(path, range).await.map_err(|e| StorageError::store("get", path, e))?;
                        page::decode(&self.index, column, page, body).map(Arc::new)
                    })
                    .await
            }
        }
    }

    /// The newest version of `key` at or below `read_ts`.
    pub async fn get(&self, key: &[u8], read_ts: Timestamp) -> Result<Lookup> {
        if !self.index.may_contain(key) {
            return Ok(Lookup::Absent);
        }
        let mut rows = RowAccess::new(self);
        let mut row = self.seek(key).await?;
        while row < self.index.rows() {
            if rows.page(KEY, row).await?.binary_ref(row) != key {
                break;
            }
            let ts = rows.page(TS, row).await?.int(row);
            if ts <= read_ts {
                return match rows.kind(row).await? {
                    Kind::Put => Ok(Lookup::Value {
                        value: rows.page(VALUE, row).await?.binary(row),
                        ts,
                    }),
                    Kind::Delete => Ok(Lookup::Deleted { ts }),
                };
            }
            row += 1;
        }
        Ok(Lookup::Absent)
    }

    /// The first row whose key is >= `key` (the row count if none).
    async fn seek(&self, key: &[u8]) -> Result<u64> {
        let pages = self.index.pages(KEY).len();
        for page in self.index.first_page_for(key)..pages {
            let decoded = self.page(KEY, page).await?;
            let row = decoded.lower_bound(key);
            if row < decoded.rows.end {
                return Ok(row);
            }
        }
        Ok(self.index.rows())
    }

    /// A cursor over every version with a key in `[start, end)`.
    pub async fn cursor(&self, start: &[u8], end: Option<Bytes>) -> Result<TableCursor> {
        let row = self.seek(start).await?;
        Ok(TableCursor {
            reader: self.clone(),
            pages: Default::default(),
            row,
            end,
        })
    }
}

/// Keeps the current page of each column, so consecutive rows cost no lookup.
struct RowAccess<'a> {
    reader: &'a TableReader,
    pages: [Option<Arc<DecodedPage>>; 4],
}

impl<'a> RowAccess<'a> {
    fn new(reader: &'a TableReader) -> Self {
        RowAccess {
            reader,
            pages: Default::default(),
        }
    }

    async fn page(&mut self, column: usize, row: u64) -> Result<Arc<DecodedPage>> {
        load_row_page(self.reader, &mut self.pages, column, row).await
    }

    async fn kind(&mut self, row: u64) -> Result<Kind> {
        let code = self.page(KIND, row).await?.int(row);
        decode_kind(self.reader, code)
    }
}

async fn load_row_page(
    reader: &TableReader,
    pages: &mut [Option<Arc<DecodedPage>>; 4],
    column: usize,
    row: u64,
) -> Result<Arc<DecodedPage>> {
    if let Some(page) = &pages[column]
        && page.contains(row)
    {
        return Ok(Arc::clone(page));
    }
    let page = reader.page(column, reader.index.page_of_row(column, row)).await?;
    if !page.contains(row) {
        return Err(StorageError::corruption(
            reader.index.path().to_string(),
            format!("row {row} is not in the page that should hold it"),
        ));
    }
    pages[column] = Some(Arc::clone(&page));
    Ok(page)
}

fn decode_kind(reader: &TableReader, code: u64) -> Result<Kind> {
    u8::try_from(code)
        .ok()
        .and_then(Kind::from_code)
        .ok_or_else(|| StorageError::corruption(reader.index.path().to_string(), format!("unknown kind {code}")))
}

/// An owned forward cursor over a table's versions.
pub struct TableCursor {
    reader: TableReader,
    pages: [Option<Arc<DecodedPage>>; 4],
    row: u64,
    end: Option<Bytes>,
}

impl TableCursor {
    /// The next version, or `None` past the end of the range.
    pub async fn next_entry(&mut self) -> Result<Option<VersionedEntry>> {
        let row = self.row;
        if row >= self.reader.index.rows() {
            return Ok(None);
        }
        let key = load_row_page(&self.reader, &mut self.pages, KEY, row).await?.binary(row);
        if self.end.as_ref().is_some_and(|end| key >= end) {
            self.row = self.reader.index.rows();
            return Ok(None);
        }
        let ts = load_row_page(&self.reader, &mut self.pages, TS, row).await?.int(row);
        let code = load_row_page(&self.reader, &mut self.pages, KIND, row).await?.int(row);
        let kind = decode_kind(&self.reader, code)?;
        let value = match kind {
            Kind::Put => load_row_page(&self.reader, &mut self.pages, VALUE, row).await?.binary(row),
            Kind::Delete => Bytes::new(),
        };
        self.row += 1;
        Ok(Some(VersionedEntry { key, ts, kind, value }))
    }
}
