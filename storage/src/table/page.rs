//! Decoding one data page of one column from its raw bytes.
//!
//! The parquet crate parses the page header and decompresses (through a
//! page reader over a one-page window); the PLAIN values of a required column
//! are then read directly, which is far cheaper than the Arrow reader for a
//! single page.

use std::ops::Range;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use parquet::column::page::{Page, PageReader};
use parquet::errors::ParquetError;
use parquet::file::metadata::ColumnChunkMetaData;
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::serialized_reader::SerializedPageReader;

use super::format::{KEY, KIND, TS, VALUE};
use super::index::TableIndex;
use crate::error::{Result, StorageError};

/// The values of one page.
#[derive(Debug)]
pub enum PageValues {
    /// Binary values: `data[ranges[i]]` is value i.
    Binary {
        /// The page body.
        data: Bytes,
        /// Each value's byte range in `data`.
        ranges: Vec<Range<u32>>,
    },
    /// 64-bit values (`ts`).
    U64(Vec<u64>),
    /// 8-bit values (`kind`, stored as INT32).
    U8(Vec<u8>),
}

/// A decoded page and the table rows it covers.
#[derive(Debug)]
pub struct DecodedPage {
    /// Table rows of the page.
    pub rows: Range<u64>,
    /// Its values.
    pub values: PageValues,
}

impl DecodedPage {
    /// Whether the page holds table row `row`.
    pub fn contains(&self, row: u64) -> bool {
        self.rows.contains(&row)
    }

    /// The binary value at table row `row` (empty if the page is not binary).
    pub fn binary(&self, row: u64) -> Bytes {
        match &self.values {
            PageValues::Binary { data, ranges } => {
                let range = &ranges[(row - self.rows.start) as usize];
                data.slice(range.start as usize..range.end as usize)
            }
            _ => Bytes::new(),
        }
    }

    /// The binary value at row `row` as a slice, without a refcount bump.
    pub fn binary_ref(&self, row: u64) -> &[u8] {
        match &self.values {
            PageValues::Binary { data, ranges } => {
                let range = &ranges[(row - self.rows.start) as usize];
                &data[range.start as usize..range.end as usize]
            }
            _ => &[],
        }
    }

    /// The integer at table row `row`.
    pub fn int(&self, row: u64) -> u64 {
        let index = (row - self.rows.start) as usize;
        match &self.values {
            PageValues::U64(values) => values[index],
            PageValues::U8(values) => u64::from(values[index]),
            PageValues::Binary { .. } => 0,
        }
    }

    /// Index of the first binary value >= `key` (binary pages only; values sorted).
    pub fn lower_bound(&self, key: &[u8]) -> u64 {
        match &self.values {
            PageValues::Binary { data, ranges } => {
                let index =
                    ranges.partition_point(|r| &data[r.start as usize..r.end as usize] < key);
                self.rows.start + index as u64
            }
            _ => self.rows.start,
        }
    }

    /// Approximate memory held, for the cache's weigher.
    pub fn memory_bytes(&self) -> usize {
        64 + match &self.values {
            PageValues::Binary { data, ranges } => data.len() + ranges.len() * 8,
            PageValues::U64(values) => values.len() * 8,
            PageValues::U8(values) => values.len(),
        }
    }
}

/// Decodes page `page` of `column` from `bytes` (exactly the page's span).
pub fn decode(index: &TableIndex, column: usize, page: usize, bytes: Bytes) -> Result<DecodedPage> {
    let corrupt = |detail: String| {
        StorageError::corruption(
            index.path().to_string(),
            format!("column {column} page {page}: {detail}"),
        )
    };
    let span = index.pages(column)[page];
    let rows = index.page_rows(column, page);
    let expected = (rows.end - rows.start) as usize;
    if bytes.len() != span.len as usize {
        return Err(corrupt(format!(
            "{} bytes, expected {}",
            bytes.len(),
            span.len
        )));
    }
    let body = read_page_body(index, column, &span, expected, bytes)
        .map_err(|e| corrupt(e.to_string()))?;
    let values = match column {
        KEY | VALUE => decode_binary(body, expected),
        TS => decode_fixed::<8>(&body, expected)
            .map(|v| PageValues::U64(v.into_iter().map(u64::from_le_bytes).collect())),
        KIND => decode_fixed::<4>(&body, expected)
            .map(|v| PageValues::U8(v.into_iter().map(|b| i32::from_le_bytes(b) as u8).collect())),
        _ => Err(format!("no column {column}")),
    }
    .map_err(corrupt)?;
    Ok(DecodedPage { rows, values })
}

fn read_page_body(
    index: &TableIndex,
    column: usize,
    span: &super::index::PageSpan,
    rows: usize,
    bytes: Bytes,
) -> std::result::Result<Bytes, ParquetError> {
    // A chunk description covering just this page, so the page reader neither
    // looks for a dictionary page nor reads past the window.
    let offset = i64::try_from(span.offset).map_err(|e| ParquetError::General(e.to_string()))?;
    let meta = ColumnChunkMetaData::builder(Arc::clone(index.column_descr(column)))
        .set_compression(index.compression(column))
        .set_data_page_offset(offset)
        .set_dictionary_page_offset(None)
        .set_total_compressed_size(i64::from(span.len))
        .set_num_values(rows as i64)
        .build()?;
    let window = Arc::new(Window {
        base: span.offset,
        bytes,
    });
    let mut reader = SerializedPageReader::new(window, &meta, rows, None)?;
    match reader.get_next_page()? {
        Some(Page::DataPage {
            buf, num_values, ..
        }) if num_values as usize == rows => Ok(buf),
        Some(Page::DataPage { num_values, .. }) => Err(ParquetError::General(format!(
            "{num_values} values, expected {rows}"
        ))),
        Some(other) => Err(ParquetError::General(format!(
            "unexpected {:?} page",
            other.page_type()
        ))),
        None => Err(ParquetError::General("no page".into())),
    }
}

fn decode_binary(body: Bytes, count: usize) -> std::result::Result<PageValues, String> {
    let mut ranges = Vec::with_capacity(count);
    let mut position = 0usize;
    for _ in 0..count {
        let len_bytes = body
            .get(position..position + 4)
            .ok_or_else(|| format!("truncated at value {}", ranges.len()))?;
        let len =
            u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        let start = position + 4;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= body.len())
            .ok_or("value overruns the page")?;
        ranges.push(
            u32::try_from(start).map_err(|e| e.to_string())?
                ..u32::try_from(end).map_err(|e| e.to_string())?,
        );
        position = end;
    }
    Ok(PageValues::Binary { data: body, ranges })
}

fn decode_fixed<const N: usize>(
    body: &[u8],
    count: usize,
) -> std::result::Result<Vec<[u8; N]>, String> {
    if body.len() < count * N {
        return Err(format!(
            "{} bytes for {count} values of {N} bytes",
            body.len()
        ));
    }
    Ok(body
        .chunks_exact(N)
        .take(count)
        .map(|chunk| {
            let mut value = [0u8; N];
            value.copy_from_slice(chunk);
            value
        })
        .collect())
}

/// A `ChunkReader` over bytes `[base, base + len)` of the object.
struct Window {
    base: u64,
    bytes: Bytes,
}

impl Length for Window {
    fn len(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }
}

impl ChunkReader for Window {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(self
            .get_bytes(start, (self.len() - start.min(self.len())) as usize)?
            .reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let offset = start
            .checked_sub(self.base)
            .map(|o| o as usize)
            .filter(|&o| {
                o.checked_add(length)
                    .is_some_and(|end| end <= self.bytes.len())
            })
            .ok_or_else(|| {
                ParquetError::EOF(format!(
                    "read of {length} bytes at {start} is outside the page"
                ))
            })?;
        Ok(self.bytes.slice(offset..offset + length))
    }
}
