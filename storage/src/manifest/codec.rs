//! Object names and the byte format of manifest objects.
//!
//! An object is a protobuf message followed by an 8-byte trailer: the CRC32 of
//! the message and a magic number. Object stores write whole objects, so a
//! damaged object means outside damage; the trailer turns it into a typed
//! Corruption error instead of a misread.

use bytes::{BufMut, Bytes, BytesMut};
use object_store::path::Path;
use prost::Message;

use crate::error::{Result, StorageError};

const MAGIC: u32 = 0x4c4d_4e31; // "LMN1"
const TRAILER: usize = 8;
const EDIT_SUFFIX: &str = ".edit";
const CHECKPOINT_SUFFIX: &str = ".ckpt";

/// Where a BaseStore's objects live, below its root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: Path,
}

/// What a name under `manifest/` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestObject {
    /// Edit number `seq`.
    Edit(u64),
    /// A checkpoint of the state after edit `seq`.
    Checkpoint(u64),
}

impl Layout {
    /// The layout of a BaseStore rooted at `root`.
    pub fn new(root: Path) -> Layout {
        Layout { root }
    }

    /// The BaseStore's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of manifest objects.
    pub fn manifest_dir(&self) -> Path {
        self.root.clone().join("manifest")
    }

    /// The folder of tables.
    pub fn tables_dir(&self) -> Path {
        self.root.clone().join("tables")
    }

    /// Edit number `seq`. Zero-padded so names sort by number.
    pub fn edit(&self, seq: u64) -> Path {
        self.manifest_dir().join(format!("{seq:020}{EDIT_SUFFIX}"))
    }

    /// The checkpoint taken after edit `seq`.
    pub fn checkpoint(&self, seq: u64) -> Path {
        self.manifest_dir()
            .join(format!("{seq:020}{CHECKPOINT_SUFFIX}"))
    }

    /// The object path of table `name` (names are relative to the root).
    pub fn table(&self, name: &str) -> Path {
        Path::from_iter(self.root.parts().chain(Path::from(name).parts()))
    }

    /// Classifies a listed object under `manifest/`.
    pub fn parse_manifest_object(path: &Path) -> Option<ManifestObject> {
        let file = path.filename()?;
        if let Some(number) = file.strip_suffix(EDIT_SUFFIX) {
            return number.parse().ok().map(ManifestObject::Edit);
        }
        let number = file.strip_suffix(CHECKPOINT_SUFFIX)?;
        number.parse().ok().map(ManifestObject::Checkpoint)
    }
}

/// Serialises a manifest message with its trailer.
pub fn encode<M: Message>(message: &M) -> Bytes {
    let mut out = BytesMut::with_capacity(message.encoded_len() + TRAILER);
    // Encoding into a BytesMut with enough capacity cannot fail.
    let _ = message.encode(&mut out);
    let crc = crc32fast::hash(&out);
    out.put_u32_le(crc);
    out.put_u32_le(MAGIC);
    out.freeze()
}

/// Parses a manifest message, checking its trailer.
pub fn decode<M: Message + Default>(object: &Path, bytes: &[u8]) -> Result<M> {
    let corrupt = |detail: String| StorageError::corruption(object.to_string(), detail);
    let body_len = bytes
        .len()
        .checked_sub(TRAILER)
        .ok_or_else(|| corrupt(format!("{} bytes is shorter than the trailer", bytes.len())))?;
    let (body, trailer) = bytes.split_at(body_len);
    let (crc_bytes, magic_bytes) = trailer.split_at(4);
    let magic = u32::from_le_bytes(magic_bytes.try_into().unwrap_or_default());
    if magic != MAGIC {
        return Err(corrupt(format!("bad magic {magic:#x}")));
    }
    let crc = u32::from_le_bytes(crc_bytes.try_into().unwrap_or_default());
    if crc != crc32fast::hash(body) {
        return Err(corrupt("checksum mismatch".into()));
    }
    M::decode(body).map_err(|error| corrupt(format!("undecodable: {error}")))
}

#[cfg(test)]
mod tests {
    use luna_proto::manifest::{Compaction, ManifestEdit, manifest_edit::Change};

    use super::*;

    fn edit() -> ManifestEdit {
        ManifestEdit {
            seq: 7,
            written_at_ms: 1,
            writer: "w".into(),
            change: Some(Change::Compaction(Compaction {
                removed: vec!["tables/a.parquet".into()],
                added: vec![],
                gc_safe_point: 3,
            })),
        }
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let path = Path::from("manifest/x.edit");
        let bytes = encode(&edit());
        assert_eq!(decode::<ManifestEdit>(&path, &bytes).unwrap(), edit());
        for cut in [0, 3, bytes.len() - 1] {
            let error = decode::<ManifestEdit>(&path, &bytes[..cut]).unwrap_err();
            assert!(
                matches!(&error, StorageError::Corruption { object, .. } if object.as_str() == "manifest/x.edit")
            );
        }
        let mut flipped = bytes.to_vec();
        flipped[2] ^= 0x40;
        assert!(matches!(
            decode::<ManifestEdit>(&path, &flipped),
            Err(StorageError::Corruption { .. })
        ));
    }

    #[test]
    fn names_sort_by_number_and_parse_back() {
        let layout = Layout::new(Path::from("db/coll"));
        assert_eq!(
            layout.edit(42).to_string(),
            "db/coll/manifest/00000000000000000042.edit"
        );
        assert!(layout.edit(9).to_string() < layout.edit(10).to_string());
        assert_eq!(
            Layout::parse_manifest_object(&layout.edit(42)),
            Some(ManifestObject::Edit(42))
        );
        assert_eq!(
            Layout::parse_manifest_object(&layout.checkpoint(3)),
            Some(ManifestObject::Checkpoint(3))
        );
        assert_eq!(
            Layout::parse_manifest_object(&Path::from("manifest/junk")),
            None
        );
        assert_eq!(
            layout.table("tables/t.parquet").to_string(),
            "db/coll/tables/t.parquet"
        );
        assert_eq!(
            Layout::new(Path::default())
                .table("tables/t.parquet")
                .to_string(),
            "tables/t.parquet"
        );
    }
}
