//! The local stream's snapshot file: the application's metadata for the discarded prefix.
//!
//! One file, `SNAPSHOT`: `magic (LUNAS001) | index: u64 | term: u64 | len: u32 |
//! crc32(index ‖ term ‖ len ‖ data): u32 | data`, little endian. A new snapshot is written
//! to `SNAPSHOT.tmp`, fsynced, renamed over `SNAPSHOT`, and the directory is fsynced, so a
//! crash leaves either the old snapshot or the new one, never a mix. A leftover temp file
//! is a write that never finished and is removed at open. Any damage to `SNAPSHOT` itself
//! is [`JournalError::Corruption`]: it was fsynced before any segment it replaced was
//! deleted, so there is no torn state to tolerate.

use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::Path;

use bytes::Bytes;
use luna_kernel::stream::Snapshot;

use crate::error::JournalError;

const MAGIC: &[u8; 8] = b"LUNAS001";
/// Bytes before the data: magic, index, term, length, checksum.
const HEADER_LEN: usize = 8 + 8 + 8 + 4 + 4;
const FILE_NAME: &str = "SNAPSHOT";
const TEMP_NAME: &str = "SNAPSHOT.tmp";

/// Writes `snapshot` so that it replaces the previous one atomically and durably.
pub(super) fn write(dir: &Path, snapshot: &Snapshot) -> io::Result<()> {
    let len = u32::try_from(snapshot.data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "snapshot larger than 4 GiB"))?;
    let mut buf = Vec::with_capacity(HEADER_LEN + snapshot.data.len());
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&snapshot.index.to_le_bytes());
    buf.extend_from_slice(&snapshot.term.to_le_bytes());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(
        &checksum(snapshot.index, snapshot.term, len, &snapshot.data).to_le_bytes(),
    );
    buf.extend_from_slice(&snapshot.data);
    let temp = dir.join(TEMP_NAME);
    let mut file = File::create(&temp)?;
    file.write_all(&buf)?;
    file.sync_all()?;
    fs::rename(&temp, dir.join(FILE_NAME))?;
    File::open(dir)?.sync_all()
}

/// Reads the snapshot in `dir`, if there is one, and removes an unfinished temp file.
pub(super) fn read(dir: &Path) -> Result<Option<Snapshot>, JournalError> {
    let temp = dir.join(TEMP_NAME);
    match fs::remove_file(&temp) {
        Ok(()) => tracing::warn!(path = %temp.display(), "removed an unfinished snapshot"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(JournalError::io(format!("removing {}", temp.display()), e)),
    }
    let path = dir.join(FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(bytes) => Bytes::from(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(JournalError::io(format!("reading {}", path.display()), e)),
    };
    let corrupt = |reason: &str| JournalError::Corruption {
        path: path.clone(),
        offset: 0,
        reason: reason.to_owned(),
    };
    if bytes.len() < HEADER_LEN || &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt("missing or short snapshot header"));
    }
    let u64_at = |at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(word)
    };
    let u32_at = |at: usize| {
        let mut word = [0u8; 4];
        word.copy_from_slice(&bytes[at..at + 4]);
        u32::from_le_bytes(word)
    };
    let (index, term, len, crc) = (u64_at(8), u64_at(16), u32_at(24), u32_at(28));
    let data = bytes.slice(HEADER_LEN..);
    if data.len() != len as usize {
        return Err(corrupt("snapshot length does not match the file"));
    }
    if checksum(index, term, len, &data) != crc {
        return Err(corrupt("snapshot checksum mismatch"));
    }
    if index == 0 {
        return Err(corrupt("snapshot at index 0"));
    }
    Ok(Some(Snapshot { index, term, data }))
}

fn checksum(index: u64, term: u64, len: u32, data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&index.to_le_bytes());
    hasher.update(&term.to_le_bytes());
    hasher.update(&len.to_le_bytes());
    hasher.update(data);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            index: 42,
            term: 1,
            data: Bytes::from_static(b"tablets and manifest positions"),
        }
    }

    #[test]
    fn round_trips_and_replaces_the_previous_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("read"), None);
        write(dir.path(), &snapshot()).expect("write");
        let newer = Snapshot {
            index: 50,
            data: Bytes::new(),
            ..snapshot()
        };
        write(dir.path(), &newer).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Some(newer));
    }

    #[test]
    fn an_unfinished_write_is_removed_and_the_old_snapshot_stands() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), &snapshot()).expect("write");
        fs::write(dir.path().join(TEMP_NAME), b"LUNAS001 half").expect("write temp");
        assert_eq!(read(dir.path()).expect("read"), Some(snapshot()));
        assert!(!dir.path().join(TEMP_NAME).exists());
    }

    #[test]
    fn every_damage_is_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), &snapshot()).expect("write");
        let path = dir.path().join(FILE_NAME);
        let good = fs::read(&path).expect("read");
        let flipped_index = {
            let mut bytes = good.clone();
            bytes[8] ^= 1;
            bytes
        };
        let flipped_data = {
            let mut bytes = good.clone();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x20;
            bytes
        };
        let cut = good[..good.len() - 3].to_vec();
        let no_magic = good[8..].to_vec();
        for damaged in [flipped_index, flipped_data, cut, no_magic] {
            fs::write(&path, &damaged).expect("write");
            let err = read(dir.path()).expect_err("damaged snapshot");
            assert!(matches!(err, JournalError::Corruption { .. }), "{err}");
        }
    }
}
