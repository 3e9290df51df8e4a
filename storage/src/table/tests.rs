use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{Array, BinaryArray, UInt8Array, UInt64Array};
use bytes::Bytes;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::cache::{BlockCache, CacheOptions};
use crate::error::StorageError;
use crate::types::{Direction, KeyRange, Kind, Lookup};

type Model = BTreeMap<(Vec<u8>, std::cmp::Reverse<u64>), (Kind, Vec<u8>)>;

fn random_model(seed: u64, keys: usize) -> Model {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::new();
    for k in 0..keys {
        let key = format!("key{:05}", k * 3).into_bytes();
        for _ in 0..rng.random_range(1..4) {
            let ts = rng.random_range(1..1000);
            let kind = if rng.random_bool(0.2) {
                Kind::Delete
            } else {
                Kind::Put
            };
            let value = if kind == Kind::Put {
                vec![b'v'; rng.random_range(0..300)]
            } else {
                vec![]
            };
            model.insert((key.clone(), std::cmp::Reverse(ts)), (kind, value));
        }
    }
    model
}

async fn write(store: &Arc<dyn ObjectStore>, path: &Path, model: &Model) -> (u64, TableSummary) {
    let mut builder = TableBuilder::new();
    for ((key, ts), (kind, value)) in model {
        builder.push(key, ts.0, *kind, value);
    }
    let (bytes, summary) = builder.finish(path.as_ref()).unwrap().unwrap();
    let size = bytes.len() as u64;
    store.put(path, bytes.into()).await.unwrap();
    (size, summary)
}

fn expected(model: &Model, key: &[u8], read_ts: u64) -> Lookup {
    let hit = model
        .range((key.to_vec(), std::cmp::Reverse(read_ts))..)
        .next()
        .filter(|((k, _), _)| k == key);
    match hit {
        Some(((_, ts), (Kind::Put, value))) => Lookup::Value {
            value: Bytes::from(value.clone()),
            ts: ts.0,
        },
        Some(((_, ts), (Kind::Delete, _))) => Lookup::Deleted { ts: ts.0 },
        None => Lookup::Absent,
    }
}

#[tokio::test]
async fn point_reads_match_a_model_at_every_snapshot() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let cache = Arc::new(BlockCache::new(CacheOptions::default()));
    let model = random_model(7, 2000);
    let path = Path::from("tables/t.parquet");
    let (size, summary) = write(&store, &path, &model).await;
    assert_eq!(summary.rows, model.len() as u64);
    let reader = TableReader::open(&store, &cache, &path, size, summary.rows)
        .await
        .unwrap();
    assert!(
        reader.index().pages(0).len() > model.len() / PAGE_ROWS - 1,
        "pages are small"
    );
    let mut rng = StdRng::seed_from_u64(8);
    for _ in 0..3000 {
        let key = format!("key{:05}", rng.random_range(0..6000)).into_bytes();
        let read_ts = rng.random_range(0..1100);
        assert_eq!(
            reader.get(&key, read_ts).await.unwrap(),
            expected(&model, &key, read_ts),
            "key {:?} at {read_ts}",
            String::from_utf8_lossy(&key)
        );
    }
}

#[tokio::test]
async fn cursors_return_every_version_in_range_in_order() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let cache = Arc::new(BlockCache::new(CacheOptions::default()));
    let model = random_model(11, 500);
    let path = Path::from("t.parquet");
    let (size, summary) = write(&store, &path, &model).await;
    for reader in [
        TableReader::open(&store, &cache, &path, size, summary.rows)
            .await
            .unwrap(),
        TableReader::open(&store, &cache, &path, size, summary.rows)
            .await
            .unwrap()
            .load_whole()
            .await
            .unwrap(),
    ] {
        for (start, end) in [
            (&b"key00300"[..], Some(&b"key01000"[..])),
            (b"key01450", None),
            (b"", Some(b"key00007")),
        ] {
            let range = KeyRange::new(
                Bytes::copy_from_slice(start),
                end.map(Bytes::copy_from_slice),
            );
            let mut want: Vec<_> = model
                .iter()
                .filter(|((k, _), _)| range.contains(k))
                .map(|((k, ts), (kind, v))| (k.clone(), ts.0, *kind, v.clone()))
                .collect();
            for direction in [Direction::Forward, Direction::Reverse] {
                let mut cursor = reader.cursor(&range, direction).await.unwrap();
                let mut seen = Vec::new();
                while let Some(entry) = cursor.next_entry().await.unwrap() {
                    seen.push((
                        entry.key.to_vec(),
                        entry.ts,
                        entry.kind,
                        entry.value.to_vec(),
                    ));
                }
                assert_eq!(seen, want, "{range:?} {direction:?}");
                want.reverse();
            }
        }
    }
}

#[tokio::test]
async fn an_independent_parquet_reader_reads_the_table() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let model = random_model(3, 300);
    let path = Path::from("t.parquet");
    write(&store, &path, &model).await;
    let bytes = store.get(&path).await.unwrap().bytes().await.unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let keys = batch
            .column_by_name("key")
            .unwrap()
            .as_any()
            .downcast_ref::<BinaryArray>()
            .unwrap();
        let ts = batch
            .column_by_name("ts")
            .unwrap()
            .as_any()
            .downcast_ref::<UInt64Array>()
            .unwrap();
        let kinds = batch
            .column_by_name("kind")
            .unwrap()
            .as_any()
            .downcast_ref::<UInt8Array>()
            .unwrap();
        let values = batch
            .column_by_name("value")
            .unwrap()
            .as_any()
            .downcast_ref::<BinaryArray>()
            .unwrap();
        for i in 0..batch.num_rows() {
            let kind = Kind::from_code(kinds.value(i)).unwrap();
            rows.push((
                (keys.value(i).to_vec(), std::cmp::Reverse(ts.value(i))),
                (kind, values.value(i).to_vec()),
            ));
        }
        assert_eq!(keys.null_count(), 0);
    }
    let want: Vec<_> = model.into_iter().collect();
    assert_eq!(rows, want);
}

#[tokio::test]
async fn damaged_tables_are_typed_corruption_naming_the_object() {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let cache = Arc::new(BlockCache::new(CacheOptions::default()));
    let model = random_model(5, 400);
    let good = Path::from("good.parquet");
    let (size, summary) = write(&store, &good, &model).await;
    let bytes = store.get(&good).await.unwrap().bytes().await.unwrap();

    let truncated = Path::from("truncated.parquet");
    store
        .put(&truncated, bytes.slice(..bytes.len() / 2).into())
        .await
        .unwrap();
    let error = TableReader::open(&store, &cache, &truncated, size, summary.rows)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&error, StorageError::Corruption { object, .. } if object == "truncated.parquet"),
        "{error}"
    );

    let garbage = Path::from("garbage.parquet");
    store
        .put(&garbage, vec![0x5a; size as usize].into())
        .await
        .unwrap();
    let error = TableReader::open(&store, &cache, &garbage, size, summary.rows)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&error, StorageError::Corruption { object, .. } if object == "garbage.parquet"),
        "{error}"
    );

    // A damaged data page fails the read that touches it, naming the table.
    let mut flipped = bytes.to_vec();
    let reader = TableReader::open(&store, &cache, &good, size, summary.rows)
        .await
        .unwrap();
    let span = reader.index().pages(0)[1];
    for b in &mut flipped[span.offset as usize..(span.offset + 12) as usize] {
        *b = 0xff;
    }
    let damaged = Path::from("damaged.parquet");
    store.put(&damaged, flipped.into()).await.unwrap();
    let reader = TableReader::open(&store, &cache, &damaged, size, summary.rows)
        .await
        .unwrap();
    let key = model
        .keys()
        .map(|(k, _)| k.clone())
        .nth(PAGE_ROWS + 3)
        .unwrap();
    let error = reader.get(&key, u64::MAX).await.err().unwrap();
    assert!(
        matches!(&error, StorageError::Corruption { object, .. } if object == "damaged.parquet"),
        "{error}"
    );
    // Other tables stay readable.
    let healthy = TableReader::open(&store, &cache, &good, size, summary.rows)
        .await
        .unwrap();
    assert_eq!(
        healthy.get(&key, u64::MAX).await.unwrap(),
        expected(&model, &key, u64::MAX)
    );
}
