//! Scans across tablets, in both directions, with limits and server-side paging.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use luna_client::{Collection, WriteBatch};
use luna_proto::master::Partitioning;

use crate::fake::{Harness, TestResult};

const KEYS: [&str; 10] = ["a", "b", "f", "g", "h", "m", "p", "q", "x", "z"];

/// Three tablets split at g and p, scan pages of two pairs, and KEYS written.
async fn setup() -> Result<(Harness, Collection), Box<dyn std::error::Error>> {
    let harness = Harness::start(2).await?;
    harness.add_collection(
        "db",
        "c",
        Partitioning::Range,
        &[(b"", Some(b"g"), 0), (b"g", Some(b"p"), 1), (b"p", None, 0)],
    );
    for server in &harness.servers {
        server.page_size.store(2, Ordering::Relaxed);
    }
    let coll = harness.client().await?.database("db").collection("c");
    let mut batch = WriteBatch::new();
    for key in KEYS {
        batch.put(key, key.to_uppercase());
    }
    coll.batch(batch).await?;
    Ok((harness, coll))
}

fn keys(pairs: &[(Bytes, Bytes)]) -> Vec<&str> {
    pairs
        .iter()
        .map(|(key, _)| std::str::from_utf8(key).unwrap_or("<binary>"))
        .collect()
}

#[tokio::test]
async fn forward_scans_cross_tablets_in_order() -> TestResult {
    let (_harness, coll) = setup().await?;
    let all = coll.scan_all(100, false).await?;
    assert_eq!(keys(&all), KEYS);
    assert!(
        all.iter()
            .all(|(key, value)| value.as_ref() == key.to_ascii_uppercase())
    );
    assert_eq!(
        keys(&coll.scan_all(5, false).await?),
        ["a", "b", "f", "g", "h"]
    );
    assert_eq!(
        keys(&coll.scan("c".."q", 100, false).await?),
        ["f", "g", "h", "m", "p"]
    );
    assert_eq!(
        keys(&coll.scan("c"..="q", 3, false).await?),
        ["f", "g", "h"]
    );
    assert_eq!(
        keys(&coll.scan("g".., 100, false).await?),
        ["g", "h", "m", "p", "q", "x", "z"]
    );
    assert!(coll.scan("c".."d", 100, false).await?.is_empty());
    assert!(coll.scan_all(0, false).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn reverse_scans_cross_tablets_backwards() -> TestResult {
    let (_harness, coll) = setup().await?;
    let mut reversed = KEYS;
    reversed.reverse();
    assert_eq!(keys(&coll.scan_all(100, true).await?), reversed);
    assert_eq!(keys(&coll.scan_all(4, true).await?), ["z", "x", "q", "p"]);
    assert_eq!(
        keys(&coll.scan("c".."q", 100, true).await?),
        ["p", "m", "h", "g", "f"]
    );
    assert_eq!(keys(&coll.scan("b"..="p", 3, true).await?), ["p", "m", "h"]);
    assert_eq!(
        keys(&coll.scan(..="g", 100, true).await?),
        ["g", "f", "b", "a"]
    );
    Ok(())
}

#[tokio::test]
async fn scans_follow_a_split_after_a_routing_refresh() -> TestResult {
    let (harness, coll) = setup().await?;
    coll.scan_all(1, false).await?;
    // Split the middle tablet [g, p) at m: g..m keeps the id with a new epoch, m..p is new.
    let middle = harness
        .universe
        .tablets
        .lock()
        .map_err(|_| "poisoned")?
        .values()
        .find(|t| t.start == b"g")
        .map(|t| t.id)
        .ok_or("no middle tablet")?;
    let moved: Vec<(Bytes, Bytes)> = harness
        .universe
        .data_of(middle)
        .into_iter()
        .filter(|(key, _)| key.as_ref() >= b"m".as_slice())
        .collect();
    harness.universe.update(middle, |meta| {
        meta.epoch += 1;
        meta.end = Some(b"m".to_vec());
        meta.data.retain(|key, _| key.as_ref() < b"m".as_slice());
    });
    let new_ids = harness.add_collection("db", "c", Partitioning::Range, &[(b"m", Some(b"p"), 1)]);
    harness
        .universe
        .update(new_ids[0], |meta| meta.data.extend(moved.clone()));
    assert_eq!(keys(&coll.scan_all(100, false).await?), KEYS);
    assert_eq!(harness.master.routing_calls(), 2);
    let mut reversed = KEYS;
    reversed.reverse();
    assert_eq!(keys(&coll.scan_all(100, true).await?), reversed);
    Ok(())
}
