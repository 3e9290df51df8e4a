//! Snapshot isolation, checked by an independent checker: transactions of a list-append
//! workload on a universe of real processes, their history checked by luna-check.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use luna_client::{ClientError, Collection, Database};
use support::history;
use support::load::bank_universe;

fn text(value: Option<Bytes>) -> Option<String> {
    value.map(|value| String::from_utf8_lossy(&value).into_owned())
}

/// A list-append history: each transaction appends unique numbers to some keys (read,
/// append, write back) and reads others; the lists, read back, must show no anomaly that
/// snapshot isolation forbids (checked by luna-check, which allows write skew).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_append_histories_are_snapshot_isolated() {
    let (_universe, _client, db, checking, savings) = bank_universe().await;
    let collections = Arc::new([checking, savings]);
    let seed = history::seed();
    let history = Arc::new(std::sync::Mutex::new(Vec::new()));
    let next_element = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for worker in 0..6u64 {
        let (db, collections, history, next_element, stop) = (
            db.clone(),
            collections.clone(),
            history.clone(),
            next_element.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut state = seed ^ (worker + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut id = worker << 32;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                let mut ops = Vec::new();
                let outcome =
                    list_append_txn(&db, &collections, &mut state, &next_element, &mut ops).await;
                let outcome = match outcome {
                    Ok(()) => luna_check::Outcome::Committed,
                    Err(error) if error.is_conflict() => luna_check::Outcome::Aborted,
                    Err(_) => luna_check::Outcome::Unknown,
                };
                if let Ok(mut history) = history.lock() {
                    history.push(luna_check::Txn { id, outcome, ops });
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("list-append task");
    }
    // A final read of every key makes every committed append visible to the checker.
    let mut ops = Vec::new();
    let last = db.begin().await.expect("begin");
    for key in 0..LIST_KEYS {
        let (collection, name) = list_key(&collections, key);
        let list = decode_list(last.get(collection, name).await.expect("final read"));
        ops.push(luna_check::Op::Read { key, list });
    }
    let mut history = history
        .lock()
        .map(|history| history.clone())
        .unwrap_or_default();
    history.push(luna_check::Txn {
        id: u64::MAX,
        outcome: luna_check::Outcome::Committed,
        ops,
    });
    let committed = history
        .iter()
        .filter(|txn| txn.outcome == luna_check::Outcome::Committed)
        .count();
    match luna_check::check_snapshot_isolation(&history) {
        Ok(summary) => println!("seed {seed}: {summary:?}"),
        Err(error) => panic!("seed {seed}: {error}"),
    }
    assert!(
        committed > 50,
        "too few transactions committed: {committed}"
    );
}

/// Keys of the list-append test, spread over both collections.
const LIST_KEYS: u64 = 8;

fn list_key(collections: &[Collection; 2], key: u64) -> (&Collection, String) {
    (&collections[(key % 2) as usize], format!("list-{key}"))
}

fn decode_list(value: Option<Bytes>) -> Vec<u64> {
    text(value)
        .map(|text| {
            text.split(',')
                .filter_map(|item| item.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// One transaction of one to three random operations; `ops` records what it did and saw.
async fn list_append_txn(
    db: &Database,
    collections: &[Collection; 2],
    state: &mut u64,
    next_element: &AtomicU64,
    ops: &mut Vec<luna_check::Op>,
) -> Result<(), ClientError> {
    let mut txn = db.begin().await?;
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1);
    let count = 1 + (*state >> 60) % 3;
    for op in 0..count {
        let choice = *state >> (8 * op + 4);
        let key = choice % LIST_KEYS;
        let (collection, name) = list_key(collections, key);
        let mut list = decode_list(txn.get(collection, name.clone()).await?);
        if (choice >> 3).is_multiple_of(2) {
            ops.push(luna_check::Op::Read { key, list });
        } else {
            let element = next_element.fetch_add(1, Ordering::Relaxed);
            list.push(element);
            let encoded: Vec<String> = list.iter().map(u64::to_string).collect();
            txn.put(collection, name, encoded.join(","))?;
            ops.push(luna_check::Op::Append { key, element });
        }
    }
    txn.commit().await.map(|_| ())
}
