//! Splitting tablets of real processes while clients read and write them: a range tablet in
//! the middle of its data, and again at a given key, a hash tablet in the middle of its hash
//! range, and a half moved to another group. No acknowledged write may be lost, every key's
//! history must stay linearizable, and the halves must cover the key space exactly.

mod support;

use luna_client::{Client, CollectionSpec, Partitioning, TabletInfo};
use support::history::{self, Registers, seed};
use support::load::{Writers, assert_covering, with_collection};

async fn tablets(client: &Client, name: &str) -> Vec<TabletInfo> {
    client
        .admin()
        .list_tablets("app", name)
        .await
        .expect("tablets")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_and_hash_tablets_split_under_reads_and_writes() {
    let (universe, client, collection) =
        with_collection(1, "splitting", CollectionSpec::range()).await;
    let writers = Writers::spawn(&collection, 4);
    let registers = Registers::spawn(&collection, 4, 8, seed());
    writers.wait_progress(200, "before the first split").await;

    // In the middle of the data: the writers' keys (w0-... to w3-...) and the registers'.
    let whole = tablets(&client, "splitting").await[0].clone();
    let (left, right) = client
        .admin()
        .split_tablet(whole.id, b"")
        .await
        .unwrap_or_else(|error| panic!("split: {error}\n{}", universe.logs()));
    let at = right.range.clone().expect("a range").start;
    println!("split at {:?}", String::from_utf8_lossy(&at));
    assert!(
        at.as_slice() > &b"register"[..] && at.as_slice() < &b"w4"[..],
        "{at:?} is not amid the keys"
    );
    assert_eq!((left.id, left.epoch), (whole.id, whole.epoch + 1));
    assert_eq!(
        (right.group_id, right.epoch),
        (whole.group_id, whole.epoch + 1)
    );
    assert_covering(&tablets(&client, "splitting").await);
    writers.wait_progress(200, "after the first split").await;

    // Again at a given key, with the CLI; then the new half moves to another group.
    let output = universe.cli(&[
        "tablet",
        "split",
        &right.id.to_string(),
        "--at",
        "w2",
        "--json",
    ]);
    assert!(
        output.status.success(),
        "luna tablet split failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        universe.logs()
    );
    let after = tablets(&client, "splitting").await;
    assert_eq!(after.len(), 3);
    assert_covering(&after);
    let last = after.last().expect("a tablet").clone();
    assert_eq!(last.range.clone().expect("a range").start, b"w2");
    let groups = client.admin().list_groups().await.expect("groups");
    let elsewhere = groups
        .iter()
        .map(|group| group.id)
        .find(|&id| id != last.group_id)
        .expect("a second group");
    client
        .admin()
        .move_tablet(last.id, elsewhere)
        .await
        .unwrap_or_else(|error| panic!("moving a half: {error}\n{}", universe.logs()));
    writers.wait_progress(200, "after the half moved").await;

    // A key outside the tablet is refused, and nothing changes.
    let outside = client.admin().split_tablet(left.id, b"zzz").await;
    assert!(outside.is_err(), "{outside:?}");
    assert_eq!(tablets(&client, "splitting").await.len(), 3);

    // A hash collection's tablet splits in the middle of its hash range, and takes no key.
    client
        .admin()
        .create_collection("app", "hashed", CollectionSpec::hash(2))
        .await
        .expect("a hash collection");
    let hashed = client.database("app").collection("hashed");
    let hash_writers = Writers::spawn(&hashed, 2);
    hash_writers
        .wait_progress(50, "on the hash collection")
        .await;
    let first = tablets(&client, "hashed").await[0].clone();
    assert_eq!(first.partitioning(), Partitioning::Hash);
    let keyed = client.admin().split_tablet(first.id, b"w1").await;
    assert!(keyed.is_err(), "{keyed:?}");
    let (_, right) = client
        .admin()
        .split_tablet(first.id, b"")
        .await
        .unwrap_or_else(|error| panic!("hash split: {error}\n{}", universe.logs()));
    assert_eq!(right.range.expect("a range").start, vec![0x40, 0, 0, 0]);
    let hashed_tablets = tablets(&client, "hashed").await;
    assert_eq!(hashed_tablets.len(), 3);
    assert_covering(&hashed_tablets);
    hash_writers.wait_progress(50, "after the hash split").await;

    hash_writers.stop_and_check(|| universe.logs()).await;
    writers.stop_and_check(|| universe.logs()).await;
    history::stop_and_check(registers, || universe.logs()).await;
}
