//! Splitting tablets of real processes while clients read and write them: a range tablet in
//! the middle of its data, and again at a given key, a hash tablet in the middle of its hash
//! range, and a half moved to another group. No acknowledged write may be lost, every key's
//! history must stay linearizable, and the halves must cover the key space exactly.

mod support;

use luna_client::{Client, CollectionSpec, Partitioning, TabletInfo};
use luna_proto::master::SplitTabletRequest;
use luna_proto::master::master_client::MasterClient;
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

    // A retried request for that split (the SDK sends the epoch it saw) finds the tablet one
    // epoch up, and fails rather than splitting it again.
    let mut master = MasterClient::connect(format!("http://{}", universe.master_addr))
        .await
        .expect("the master");
    let retried = master
        .split_tablet(SplitTabletRequest {
            tablet_id: whole.id,
            at: Vec::new(),
            epoch: whole.epoch,
        })
        .await;
    assert_eq!(
        retried.map(|_| ()).map_err(|status| status.code()),
        Err(tonic::Code::FailedPrecondition)
    );
    assert_eq!(tablets(&client, "splitting").await.len(), 2);

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

/// Waits until collection `name` has at least `count` tablets, for at most 60 s.
async fn wait_tablets(client: &Client, universe: &support::Universe, name: &str, count: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let tablets = tablets(client, name).await;
        if tablets.len() >= count {
            assert_covering(&tablets);
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} did not split by itself: {tablets:?}\n{}",
            universe.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A tablet that grows past `--split-size-mb` splits by itself, and so does one that stays
/// busier than `--split-load-ops`; writes go on and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tablets_split_by_themselves_by_size_and_by_load() {
    let universe = support::Universe::start_with_master_flags(
        1,
        3,
        300,
        &[
            "--split-size-mb",
            "1",
            "--split-load-ops",
            "100",
            "--split-load-secs",
            "2",
        ],
    );
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;
    let admin = client.admin();
    admin.create_database("app").await.expect("db");
    for name in ["big", "busy"] {
        admin
            .create_collection("app", name, CollectionSpec::range())
            .await
            .expect("collection");
        support::load::wait_led(&client, "app", name).await;
    }
    // About 2 MiB in 32 values of 64 KiB: past the size, with few requests.
    let big = client.database("app").collection("big");
    for i in 0..32 {
        big.put(format!("k{i:03}"), vec![b'x'; 64 << 10])
            .await
            .expect("a big value");
    }
    wait_tablets(&client, &universe, "big", 2).await;
    // Small writes, many of them: past the load.
    let busy = client.database("app").collection("busy");
    let writers = Writers::spawn(&busy, 4);
    wait_tablets(&client, &universe, "busy", 2).await;
    writers.wait_progress(50, "after the load split").await;
    writers.stop_and_check(|| universe.logs()).await;
    for i in 0..32 {
        let value = big.get(format!("k{i:03}")).await.expect("a read");
        assert_eq!(value.map(|v| v.len()), Some(64 << 10), "k{i:03}");
    }
}
