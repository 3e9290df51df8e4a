//! Where a tablet splits in the middle: the key that halves its data in the tables.

mod common;

use bytes::Bytes;
use common::*;
use luna_storage::{KeyRange, WriteBatch};

fn number(key: &Bytes) -> usize {
    std::str::from_utf8(&key[3..])
        .ok()
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("{key:?} is not a test key"))
}

#[tokio::test]
async fn the_split_key_halves_the_data_of_a_range() {
    let store = memory_store();
    let (base, tablet, mut journal) = single_tablet(&store).await;
    assert_eq!(
        base.split_key(&KeyRange::all()).await.unwrap(),
        None,
        "no tables yet"
    );
    // Four flushed tables of 5,000 keys each.
    for chunk in 0..4 {
        let mut batch = WriteBatch::new();
        for i in chunk * 5_000..(chunk + 1) * 5_000 {
            batch.put(key(i), value(i, 1));
        }
        journal.write(&tablet, batch).await;
        tablet.flush().await.unwrap();
    }
    let middle = base
        .split_key(&KeyRange::all())
        .await
        .unwrap()
        .expect("a key");
    let at = number(&middle);
    assert!((8_000..12_000).contains(&at), "split at key {at} of 20,000");
    // Within a part of the key space, the middle of that part.
    let part = KeyRange::new(key(2_000), Some(key(6_000)));
    let at = number(&base.split_key(&part).await.unwrap().expect("a key"));
    assert!(
        (3_000..5_000).contains(&at),
        "split at key {at} of 2,000..6,000"
    );
    // Within one page, the rows are weighed.
    let narrow = KeyRange::new(key(100), Some(key(110)));
    let at = number(&base.split_key(&narrow).await.unwrap().expect("a key"));
    assert!((104..=106).contains(&at), "split at key {at} of 100..110");
    // A range with nothing after its first key cannot be cut.
    let single = KeyRange::new(key(100), Some(key(101)));
    assert_eq!(base.split_key(&single).await.unwrap(), None);
    // Sizes add up by range: a fifth of the keys is about a fifth of the bytes.
    let all = base.range_size(&KeyRange::all()).await.unwrap();
    let fifth = base.range_size(&part).await.unwrap();
    assert!(all > 0);
    assert!(
        (all / 7..all / 3).contains(&fifth),
        "{fifth} of {all} bytes"
    );
}
