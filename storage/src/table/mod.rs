//! Tables: immutable Parquet objects holding sorted versions.

mod format;
mod index;
mod page;
mod reader;

pub use format::{KEY as KEY_COLUMN, PAGE_ROWS, TableBuilder, TableSummary, schema};
pub use index::{PageSpan, PinnedIndex, TableIndex};
pub use page::{DecodedPage, PageValues};
pub use reader::{RowPage, TableCursor, TableReader};

#[cfg(test)]
mod tests;
