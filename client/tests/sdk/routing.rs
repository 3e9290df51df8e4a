//! Requests reach the tablet that owns their key, for range and hash collections.

use bytes::Bytes;
use luna_client::{ClientError, ReadOptions, WriteBatch};
use luna_proto::keys;
use luna_proto::master::Partitioning;

use crate::fake::{Bounds, Harness, TestResult};

#[tokio::test]
async fn range_keys_reach_the_owning_tablet() -> TestResult {
    let harness = Harness::start(3).await?;
    let ids = harness.add_collection(
        "db",
        "range",
        Partitioning::Range,
        &[(b"", Some(b"g"), 0), (b"g", Some(b"p"), 1), (b"p", None, 2)],
    );
    let client = harness.client().await?;
    let coll = client.database("db").collection("range");
    for key in ["apple", "g", "kiwi", "p", "zebra"] {
        coll.put(key, format!("v-{key}")).await?;
    }
    let keys_of = |tablet| -> Vec<Bytes> {
        harness
            .universe
            .data_of(tablet)
            .into_iter()
            .map(|(key, _)| key)
            .collect()
    };
    assert_eq!(keys_of(ids[0]), vec![Bytes::from("apple")]);
    assert_eq!(keys_of(ids[1]), vec![Bytes::from("g"), Bytes::from("kiwi")]);
    assert_eq!(
        keys_of(ids[2]),
        vec![Bytes::from("p"), Bytes::from("zebra")]
    );
    // Each write went to its tablet's leader, so no server refused anything.
    for (index, server) in harness.servers.iter().enumerate() {
        assert!(
            server
                .seen()
                .iter()
                .all(|seen| seen.tablet.tablet_id == ids[index])
        );
    }
    assert_eq!(coll.get("kiwi").await?.as_deref(), Some(&b"v-kiwi"[..]));
    assert_eq!(coll.get("missing").await?, None);
    coll.delete("kiwi").await?;
    assert_eq!(coll.get("kiwi").await?, None);
    assert_eq!(harness.master.routing_calls(), 1, "the routing is cached");
    Ok(())
}

#[tokio::test]
async fn hash_keys_are_prefixed_routed_and_stripped() -> TestResult {
    let harness = Harness::start(2).await?;
    let points = keys::hash_split_points(4);
    let bounds: Vec<Bounds<'_>> = vec![
        (b"", Some(&points[0]), 0),
        (&points[0], Some(&points[1]), 1),
        (&points[1], Some(&points[2]), 0),
        (&points[2], None, 1),
    ];
    let ids = harness.add_collection("db", "hash", Partitioning::Hash, &bounds);
    let client = harness.client().await?;
    let coll = client.database("db").collection("hash");
    let keys: Vec<String> = (0..40).map(|i| format!("user:{i:03}")).collect();
    let mut batch = WriteBatch::new();
    for key in &keys {
        batch.put(key.clone(), key.clone());
    }
    coll.batch(batch).await?;
    let mut stored = 0;
    for (index, id) in ids.iter().enumerate() {
        let data = harness.universe.data_of(*id);
        assert!(
            !data.is_empty(),
            "tablet {index} got no keys: hashing spreads them"
        );
        for (key, value) in data {
            // Stored under the routing key, inside the tablet's hash range.
            assert_eq!(key, keys::routing_key(Partitioning::Hash, &value));
            assert!(key.as_ref() >= bounds[index].0);
            assert!(bounds[index].1.is_none_or(|end| key.as_ref() < end));
            stored += 1;
        }
    }
    assert_eq!(stored, keys.len());
    let values = coll
        .batch_get(keys.iter().chain(["absent".to_string()].iter()))
        .await?;
    assert_eq!(values.len(), keys.len() + 1);
    for (key, value) in keys.iter().zip(&values) {
        assert_eq!(value.as_deref(), Some(key.as_bytes()));
    }
    assert_eq!(values[keys.len()], None);
    // A whole scan returns user keys, in hash order.
    let scanned = coll.scan_all(1000, false).await?;
    let mut expected: Vec<&String> = keys.iter().collect();
    expected.sort_by_key(|key| keys::routing_key(Partitioning::Hash, key.as_bytes()));
    let scanned_keys: Vec<&[u8]> = scanned.iter().map(|(key, _)| key.as_ref()).collect();
    let expected: Vec<&[u8]> = expected.iter().map(|key| key.as_bytes()).collect();
    assert_eq!(scanned_keys, expected);
    // Bounded ranges make no sense in hash order.
    assert!(matches!(
        coll.scan("a".."b", 10, false).await,
        Err(ClientError::InvalidArgument { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn batches_split_by_tablet_with_their_own_request_ids() -> TestResult {
    let harness = Harness::start(2).await?;
    harness.add_collection(
        "db",
        "c",
        Partitioning::Range,
        &[(b"", Some(b"m"), 0), (b"m", None, 1)],
    );
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    let mut batch = WriteBatch::new();
    batch.put("a", "1").put("z", "2").put("b", "3").delete("y");
    let commit_ts = coll.batch(batch).await?;
    let writes: Vec<_> = harness
        .all_seen()
        .into_iter()
        .filter(|seen| seen.method == "write")
        .collect();
    assert_eq!(writes.len(), 2, "one write per tablet");
    let ids: Vec<u64> = writes
        .iter()
        .filter_map(|w| w.request_id.as_ref().map(|id| id.seq))
        .collect();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    assert_eq!(
        commit_ts,
        1000 + ids.iter().max().copied().unwrap_or_default()
    );
    let values = coll.batch_get(["b", "z", "y", "a"]).await?;
    let expected: Vec<Option<Bytes>> =
        vec![Some("3".into()), Some("2".into()), None, Some("1".into())];
    assert_eq!(values, expected);
    Ok(())
}

#[tokio::test]
async fn replica_reads_carry_their_mode_and_timestamp() -> TestResult {
    let harness = Harness::start(3).await?;
    harness.add_collection("db", "c", Partitioning::Range, &[(b"", None, 0)]);
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    coll.put("k", "v").await?;
    let ts = client.timestamp().await?;
    assert!(client.timestamp().await? > ts);
    for _ in 0..6 {
        assert_eq!(
            coll.get_with("k", &ReadOptions::stale(ts))
                .await?
                .as_deref(),
            Some(&b"v"[..])
        );
    }
    let reads: Vec<_> = harness
        .all_seen()
        .into_iter()
        .filter(|seen| seen.method == "get")
        .collect();
    assert_eq!(reads.len(), 6);
    for read in &reads {
        let options = read.read.unwrap_or_default();
        assert_eq!((options.mode, options.read_ts), (2, ts));
    }
    assert!(matches!(
        coll.get_with("k", &ReadOptions::stale(0)).await,
        Err(ClientError::InvalidArgument { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn bad_input_is_rejected_before_sending() -> TestResult {
    let harness = Harness::start(1).await?;
    harness.add_collection("db", "c", Partitioning::Range, &[(b"", None, 0)]);
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    assert!(matches!(
        coll.put("", "v").await,
        Err(ClientError::InvalidArgument { .. })
    ));
    let big_key = vec![b'k'; luna_client::MAX_KEY_LEN + 1];
    assert!(matches!(
        coll.put(big_key, "v").await,
        Err(ClientError::InvalidArgument { .. })
    ));
    let big_value = vec![0u8; luna_client::MAX_VALUE_LEN + 1];
    assert!(matches!(
        coll.put("k", big_value).await,
        Err(ClientError::InvalidArgument { .. })
    ));
    assert!(harness.all_seen().is_empty());
    let missing = client.database("db").collection("nope");
    assert!(matches!(
        missing.get("k").await,
        Err(ClientError::NotFound { .. })
    ));
    Ok(())
}
