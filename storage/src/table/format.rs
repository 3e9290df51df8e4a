//! Encoding a sorted run of versions as a Parquet table.
//!
//! Columns `key` (binary), `ts` (uint64), `kind` (uint8: 0 put, 1 delete) and
//! `value` (binary), sorted by (key asc, ts desc), one row group per table.
//! PLAIN encoding, no dictionary and no compression keep a point read to one
//! small page per column that decodes with a few slice operations; pages of
//! [`PAGE_ROWS`] rows and a page index on `key` let a read find that page; a
//! bloom filter on `key` answers most absent keys without touching a page.

use std::sync::Arc;

use arrow_array::builder::{ArrayBuilder, BinaryBuilder, UInt8Builder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::error::{Result, StorageError};
use crate::types::{Kind, Timestamp};

/// Rows per data page: small enough that a point read decodes little.
pub const PAGE_ROWS: usize = 64;
/// A page is also cut at this many bytes, so huge values do not make huge pages.
const PAGE_BYTES: usize = 1024 * 1024;
/// Target false-positive rate of the key bloom filter.
const BLOOM_FPP: f64 = 0.01;

/// Column positions in the schema.
pub const KEY: usize = 0;
/// The `ts` column.
pub const TS: usize = 1;
/// The `kind` column.
pub const KIND: usize = 2;
/// The `value` column.
pub const VALUE: usize = 3;

/// The Arrow schema every table has.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("key", DataType::Binary, false),
        Field::new("ts", DataType::UInt64, false),
        Field::new("kind", DataType::UInt8, false),
        Field::new("value", DataType::Binary, false),
    ]))
}

/// What a finished table holds, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSummary {
    /// Smallest key.
    pub smallest: Bytes,
    /// Largest key.
    pub largest: Bytes,
    /// Oldest timestamp.
    pub min_ts: Timestamp,
    /// Newest timestamp.
    pub max_ts: Timestamp,
    /// Number of versions.
    pub rows: u64,
}

/// Accumulates versions, which must arrive in (key asc, ts desc) order, and
/// encodes them as one Parquet object.
pub struct TableBuilder {
    keys: BinaryBuilder,
    timestamps: UInt64Builder,
    kinds: UInt8Builder,
    values: BinaryBuilder,
    distinct_keys: u64,
    last_key: Option<Vec<u8>>,
    first_key: Option<Bytes>,
    min_ts: Timestamp,
    max_ts: Timestamp,
    encoded_bytes: usize,
}

impl Default for TableBuilder {
    fn default() -> Self {
        TableBuilder {
            keys: BinaryBuilder::new(),
            timestamps: UInt64Builder::new(),
            kinds: UInt8Builder::new(),
            values: BinaryBuilder::new(),
            distinct_keys: 0,
            last_key: None,
            first_key: None,
            min_ts: Timestamp::MAX,
            max_ts: 0,
            encoded_bytes: 0,
        }
    }
}

impl TableBuilder {
    /// An empty builder.
    pub fn new() -> TableBuilder {
        TableBuilder::default()
    }

    /// Appends a version. Callers feed sorted runs (a memtable, a merge).
    pub fn push(&mut self, key: &[u8], ts: Timestamp, kind: Kind, value: &[u8]) {
        if self.last_key.as_deref() != Some(key) {
            self.distinct_keys += 1;
            if self.first_key.is_none() {
                self.first_key = Some(Bytes::copy_from_slice(key));
            }
            self.last_key = Some(key.to_vec());
        }
        self.keys.append_value(key);
        self.timestamps.append_value(ts);
        self.kinds.append_value(kind.code());
        self.values.append_value(value);
        self.min_ts = self.min_ts.min(ts);
        self.max_ts = self.max_ts.max(ts);
        // PLAIN layout: a 4-byte length before each binary, 8 + 4 bytes for ts and kind.
        self.encoded_bytes += key.len() + value.len() + 20;
    }

    /// Approximate encoded size so far, for cutting tables at a target size.
    pub fn encoded_bytes(&self) -> usize {
        self.encoded_bytes
    }

    /// Rows appended so far.
    pub fn rows(&self) -> usize {
        self.timestamps.len()
    }

    /// The last key appended.
    pub fn last_key(&self) -> Option<&[u8]> {
        self.last_key.as_deref()
    }

    /// Encodes the table. `object` names it in errors. `None` when empty.
    pub fn finish(mut self, object: &str) -> Result<Option<(Bytes, TableSummary)>> {
        let (Some(smallest), Some(largest)) = (self.first_key.take(), self.last_key.take()) else {
            return Ok(None);
        };
        let encode_error = |detail: String| StorageError::Encode {
            object: object.to_string(),
            detail,
        };
        let rows = self.rows();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.keys.finish()),
            Arc::new(self.timestamps.finish()),
            Arc::new(self.kinds.finish()),
            Arc::new(self.values.finish()),
        ];
        let batch =
            RecordBatch::try_new(schema(), columns).map_err(|e| encode_error(e.to_string()))?;
        let mut out = Vec::with_capacity(self.encoded_bytes + self.encoded_bytes / 8 + 4096);
        let mut writer = ArrowWriter::try_new(
            &mut out,
            schema(),
            Some(writer_properties(self.distinct_keys)),
        )
        .map_err(|e| encode_error(e.to_string()))?;
        // One write call keeps pages aligned at PAGE_ROWS across columns.
        writer
            .write(&batch)
            .map_err(|e| encode_error(e.to_string()))?;
        writer.close().map_err(|e| encode_error(e.to_string()))?;
        let summary = TableSummary {
            smallest,
            largest: Bytes::from(largest),
            min_ts: self.min_ts,
            max_ts: self.max_ts,
            rows: rows as u64,
        };
        Ok(Some((Bytes::from(out), summary)))
    }
}

fn writer_properties(distinct_keys: u64) -> WriterProperties {
    let key = ColumnPath::from("key");
    WriterProperties::builder()
        .set_dictionary_enabled(false)
        .set_encoding(Encoding::PLAIN)
        .set_compression(Compression::UNCOMPRESSED)
        .set_data_page_row_count_limit(PAGE_ROWS)
        .set_write_batch_size(PAGE_ROWS)
        .set_data_page_size_limit(PAGE_BYTES)
        .set_max_row_group_row_count(None)
        .set_statistics_enabled(EnabledStatistics::None)
        .set_column_statistics_enabled(key.clone(), EnabledStatistics::Page)
        // Page minimums are the page's first keys: they must not be truncated.
        .set_column_index_truncate_length(None)
        .set_statistics_truncate_length(None)
        .set_column_bloom_filter_enabled(key.clone(), true)
        .set_column_bloom_filter_fpp(key.clone(), BLOOM_FPP)
        .set_column_bloom_filter_max_ndv(key, distinct_keys.max(1))
        .build()
}
