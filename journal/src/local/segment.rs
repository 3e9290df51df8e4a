//! The local stream's on-disk format: segment files of CRC-checked records, and recovery.
//!
//! A segment is named after its first index (`{index:020}.seg`), starts with an 8-byte magic
//! and holds records `len: u32 | index: u64 | crc32(len ‖ index): u32 | crc32(data): u32 |
//! data`, all little endian, with contiguous indexes across segments. The header has its own
//! checksum so that a damaged length is corruption, never mistaken for a torn tail.
//!
//! Recovery accepts exactly one kind of damage: a torn tail of the newest segment (a record
//! cut short by EOF, or a zero-filled remainder), which is what a power loss during a write
//! leaves. Those bytes were never fsynced, so no append covering them was acknowledged, and
//! they are cut off. Anything else is a typed [`JournalError::Corruption`].

use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use luna_kernel::stream::Entry;

use crate::error::JournalError;

/// First bytes of every segment file: format name and version.
pub(crate) const MAGIC: &[u8; 8] = b"LUNAJ002";
/// Bytes before a record's data: length, index, header checksum, data checksum.
pub(crate) const RECORD_HEADER_LEN: usize = 20;
const SUFFIX: &str = ".seg";

/// Path of the segment whose first index is `first_index`.
pub(crate) fn segment_path(dir: &Path, first_index: u64) -> PathBuf {
    dir.join(format!("{first_index:020}{SUFFIX}"))
}

/// Appends one encoded record to `buf`.
pub(crate) fn encode_record(buf: &mut Vec<u8>, index: u64, data: &[u8]) {
    // Entries are capped far below 4 GiB by `LocalConfig::max_entry_size`.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(&header_checksum(len, index).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    buf.extend_from_slice(data);
}

fn header_checksum(len: u32, index: u64) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(&index.to_le_bytes());
    hasher.finalize()
}

/// What [`recover`] found in a log directory.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// First index of every segment, oldest first; the last is the active segment.
    pub(crate) segments: Vec<u64>,
    /// Every entry on disk, in index order.
    pub(crate) entries: Vec<Entry>,
    /// Length of the valid prefix of the active segment (a torn tail lies beyond it).
    pub(crate) active_len: u64,
    /// The index the next append gets.
    pub(crate) next_index: u64,
}

/// Reads every segment in `dir`, checking checksums and index continuity.
pub(crate) fn recover(dir: &Path) -> Result<Recovered, JournalError> {
    let mut segments = list_segments(dir)?;
    segments.sort_unstable();
    let mut entries = Vec::new();
    let mut expected: Option<u64> = None;
    let mut active_len = MAGIC.len() as u64;
    for (position, &first) in segments.iter().enumerate() {
        let path = segment_path(dir, first);
        let is_last = position + 1 == segments.len();
        if let Some(next) = expected
            && next != first
        {
            return Err(corrupt(
                &path,
                0,
                format!("segment starts at {first}, expected {next}"),
            ));
        }
        let bytes = Bytes::from(
            fs::read(&path)
                .map_err(|e| JournalError::io(format!("reading {}", path.display()), e))?,
        );
        let before = entries.len();
        active_len = parse_segment(&path, &bytes, first, is_last, &mut entries)?;
        if entries.len() == before && !is_last {
            return Err(corrupt(
                &path,
                0,
                "empty segment before the newest one".to_owned(),
            ));
        }
        expected = Some(first + (entries.len() - before) as u64);
    }
    let next_index = expected.unwrap_or(1);
    Ok(Recovered {
        segments,
        entries,
        active_len,
        next_index,
    })
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, JournalError> {
    let listing =
        fs::read_dir(dir).map_err(|e| JournalError::io(format!("listing {}", dir.display()), e))?;
    let mut segments = Vec::new();
    for item in listing {
        let item = item.map_err(|e| JournalError::io(format!("listing {}", dir.display()), e))?;
        let name = item.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) else {
            continue;
        };
        let first = stem.parse::<u64>().map_err(|_| {
            corrupt(
                &item.path(),
                0,
                "segment name is not a 20-digit index".to_owned(),
            )
        })?;
        if first == 0 {
            // Indexes start at 1; a segment claiming 0 would underflow the committed index.
            return Err(corrupt(
                &item.path(),
                0,
                "segment starts at index 0".to_owned(),
            ));
        }
        segments.push(first);
    }
    Ok(segments)
}

/// Parses one segment into `entries`; returns the length of its valid prefix.
fn parse_segment(
    path: &Path,
    bytes: &Bytes,
    first: u64,
    is_last: bool,
    entries: &mut Vec<Entry>,
) -> Result<u64, JournalError> {
    let len = bytes.len();
    if len < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        // A new segment whose header never reached disk is a torn tail too.
        if is_last && len < MAGIC.len() && MAGIC.starts_with(&bytes[..]) {
            return Ok(0);
        }
        return Err(corrupt(path, 0, "missing segment header".to_owned()));
    }
    let mut offset = MAGIC.len();
    let mut expected = first;
    while offset < len {
        let torn = |reason: &str| -> Result<u64, JournalError> {
            if is_last {
                tracing::warn!(path = %path.display(), offset, reason, "cutting torn tail");
                Ok(offset as u64)
            } else {
                Err(corrupt(path, offset as u64, reason.to_owned()))
            }
        };
        if len - offset < RECORD_HEADER_LEN {
            return torn("record header cut short");
        }
        let header = &bytes[offset..offset + RECORD_HEADER_LEN];
        let word = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let raw_len = word(0);
        let mut index_bytes = [0u8; 8];
        index_bytes.copy_from_slice(&header[4..12]);
        let index = u64::from_le_bytes(index_bytes);
        if header_checksum(raw_len, index) != word(12) {
            if bytes[offset..].iter().all(|&b| b == 0) {
                return torn("zero-filled tail");
            }
            return Err(corrupt(
                path,
                offset as u64,
                "record header checksum mismatch".to_owned(),
            ));
        }
        let data_len = raw_len as usize;
        let start = offset + RECORD_HEADER_LEN;
        if len - start < data_len {
            return torn("record data cut short");
        }
        let data = bytes.slice(start..start + data_len);
        if crc32fast::hash(&data) != word(16) {
            return Err(corrupt(path, offset as u64, "checksum mismatch".to_owned()));
        }
        if index != expected {
            return Err(corrupt(
                path,
                offset as u64,
                format!("index {index}, expected {expected}"),
            ));
        }
        entries.push(Entry {
            index,
            term: 1,
            data,
        });
        expected += 1;
        offset = start + data_len;
    }
    Ok(len as u64)
}

fn corrupt(path: &Path, offset: u64, reason: String) -> JournalError {
    JournalError::Corruption {
        path: path.to_owned(),
        offset,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_segment(dir: &Path, first: u64, records: &[(u64, &[u8])]) -> PathBuf {
        let mut buf = MAGIC.to_vec();
        for (index, data) in records {
            encode_record(&mut buf, *index, data);
        }
        let path = segment_path(dir, first);
        fs::write(&path, buf).expect("test write");
        path
    }

    #[test]
    fn reads_contiguous_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_segment(dir.path(), 1, &[(1, b"a"), (2, b"bb")]);
        write_segment(dir.path(), 3, &[(3, b"")]);
        let got = recover(dir.path()).expect("recover");
        assert_eq!(got.segments, vec![1, 3]);
        assert_eq!(got.next_index, 4);
        let data: Vec<&[u8]> = got.entries.iter().map(|e| &e.data[..]).collect();
        assert_eq!(data, vec![&b"a"[..], b"bb", b""]);
    }

    #[test]
    fn torn_tail_of_newest_segment_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_segment(dir.path(), 1, &[(1, b"hello"), (2, b"world")]);
        let full = fs::metadata(&path).expect("meta").len();
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(full - 2).expect("truncate");
        let got = recover(dir.path()).expect("recover");
        assert_eq!(got.entries.len(), 1);
        assert_eq!(got.active_len, (MAGIC.len() + RECORD_HEADER_LEN + 5) as u64);
        assert_eq!(got.next_index, 2);
    }

    #[test]
    fn zero_filled_tail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_segment(dir.path(), 1, &[(1, b"x")]);
        let mut bytes = fs::read(&path).expect("read");
        bytes.extend_from_slice(&[0u8; 64]);
        fs::write(&path, bytes).expect("write");
        assert_eq!(recover(dir.path()).expect("recover").entries.len(), 1);
    }

    #[test]
    fn truncated_older_segment_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_segment(dir.path(), 1, &[(1, b"hello"), (2, b"world")]);
        write_segment(dir.path(), 3, &[(3, b"x")]);
        let full = fs::metadata(&path).expect("meta").len();
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(full - 2).expect("truncate");
        let err = recover(dir.path()).expect_err("must fail");
        assert!(matches!(err, JournalError::Corruption { .. }), "{err}");
    }

    #[test]
    fn damaged_length_is_corruption_not_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_segment(dir.path(), 1, &[(1, b"hello"), (2, b"world")]);
        let mut bytes = fs::read(&path).expect("read");
        // The second record's length now points far past the end of the file.
        let second = MAGIC.len() + RECORD_HEADER_LEN + 5;
        bytes[second + 3] ^= 0x10;
        fs::write(&path, bytes).expect("write");
        let err = recover(dir.path()).expect_err("an acknowledged record must not be cut off");
        assert!(
            matches!(err, JournalError::Corruption { offset, .. } if offset == second as u64),
            "{err}"
        );
    }

    #[test]
    fn a_segment_starting_at_index_zero_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(segment_path(dir.path(), 0), MAGIC).expect("write");
        assert!(matches!(
            recover(dir.path()),
            Err(JournalError::Corruption { .. })
        ));
    }

    #[test]
    fn flipped_bit_is_corruption_even_in_newest_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_segment(dir.path(), 1, &[(1, b"hello"), (2, b"world")]);
        let mut bytes = fs::read(&path).expect("read");
        let at = MAGIC.len() + RECORD_HEADER_LEN + 1;
        bytes[at] ^= 0x40;
        fs::write(&path, bytes).expect("write");
        let err = recover(dir.path()).expect_err("must fail");
        assert!(
            matches!(err, JournalError::Corruption { offset, .. } if offset == MAGIC.len() as u64),
            "{err}"
        );
    }

    #[test]
    fn gap_between_segments_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_segment(dir.path(), 1, &[(1, b"a")]);
        write_segment(dir.path(), 5, &[(5, b"b")]);
        assert!(matches!(
            recover(dir.path()),
            Err(JournalError::Corruption { .. })
        ));
    }

    #[test]
    fn bad_header_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(segment_path(dir.path(), 1), b"NOTAJOURNAL").expect("write");
        assert!(matches!(
            recover(dir.path()),
            Err(JournalError::Corruption { .. })
        ));
    }
}
