//! Moving tablets between groups of real processes while clients read and write them:
//! back and forth many times, through the SDK and the CLI, and under transactions (whose
//! tablets also split). No
//! acknowledged write may be lost or applied twice, every key's history must stay
//! linearizable, and transactions stay atomic.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use luna_client::{Client, CollectionSpec, TabletInfo};
use support::history::{self, Registers, seed};
use support::load::{
    BENCH_ACCOUNTS, BENCH_OPENING_BALANCE, Writers, bench_balances, bench_txn, with_collection,
};
use support::{Universe, json_reports, output_within};

async fn tablets(client: &Client) -> Vec<TabletInfo> {
    client
        .admin()
        .list_tablets("app", "moving")
        .await
        .expect("tablets")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tablet_moves_back_and_forth_under_reads_and_writes() {
    let (universe, client, collection) =
        with_collection(1, "moving", CollectionSpec::hash(2)).await;
    let before = tablets(&client).await;
    let (moving, other) = (before[0].clone(), before[1].clone());
    assert_ne!(moving.group_id, other.group_id, "the tablets share a group");

    let writers = Writers::spawn(&collection, 4);
    let registers = Registers::spawn(&collection, 4, 8, seed());
    writers.wait_progress(50, "before the first move").await;

    let groups = [moving.group_id, other.group_id];
    for round in 1..=6u64 {
        let to_group = groups[usize::from(round % 2 == 1)];
        let moved = client
            .admin()
            .move_tablet(moving.id, to_group)
            .await
            .unwrap_or_else(|error| panic!("move {round}: {error}\n{}", universe.logs()))
            .tablet;
        assert_eq!(moved.group_id, to_group);
        assert_eq!(
            moved.epoch,
            moving.epoch + round,
            "every move bumps the epoch once"
        );
        writers
            .wait_progress(30, &format!("after move {round}"))
            .await;
    }

    // The CLI moves the other tablet into the first one's group.
    let output = universe.cli(&[
        "tablet",
        "move",
        &other.id.to_string(),
        "--to-group",
        &moving.group_id.to_string(),
        "--json",
    ]);
    assert!(
        output.status.success(),
        "luna tablet move failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        universe.logs()
    );
    let after = tablets(&client).await;
    assert!(
        after
            .iter()
            .all(|tablet| tablet.group_id == moving.group_id)
    );
    writers.wait_progress(30, "after the CLI's move").await;

    // Moving a tablet to the group it is in changes nothing.
    let stayed = client
        .admin()
        .move_tablet(other.id, moving.group_id)
        .await
        .expect("a move in place");
    assert_eq!(stayed.tablet.epoch, other.epoch + 1);
    assert_eq!(stayed.bytes_copied, 0);

    writers.stop_and_check(|| universe.logs()).await;
    history::stop_and_check(registers, || universe.logs()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_moves_and_splits_are_refused_with_clear_errors() {
    let (universe, client, _collection) =
        with_collection(1, "moving", CollectionSpec::hash(2)).await;
    let tablet = tablets(&client).await[0].clone();
    let admin = client.admin();
    let unknown_tablet = admin.move_tablet(999_999, tablet.group_id).await;
    assert!(
        unknown_tablet
            .as_ref()
            .is_err_and(|error| error.to_string().contains("no tablet 999999")),
        "{unknown_tablet:?}"
    );
    let unknown_group = admin.move_tablet(tablet.id, 999_999).await;
    assert!(
        unknown_group
            .as_ref()
            .is_err_and(|error| error.to_string().contains("no group 999999")),
        "{unknown_group:?}"
    );
    let output = universe.cli(&["tablet", "move", "x", "--to-group", "1"]);
    assert!(!output.status.success());

    // A tablet without data has no middle: the split is cancelled, and the tablet (sealed
    // for it meanwhile) takes writes again.
    admin
        .create_collection("app", "empty", CollectionSpec::range())
        .await
        .expect("a range collection");
    let empty = admin.list_tablets("app", "empty").await.expect("tablets")[0].clone();
    let split = admin.split_tablet(empty.id, b"").await;
    assert!(
        split
            .as_ref()
            .is_err_and(|error| error.to_string().contains("no data to split")),
        "{split:?}\n{}",
        universe.logs()
    );
    let collection = client.database("app").collection("empty");
    collection
        .put("k", "v")
        .await
        .expect("a write after the cancelled split");
    assert_eq!(
        admin.list_tablets("app", "empty").await.expect("tablets"),
        [empty]
    );
}

/// Transfers between accounts of two collections run while their tablets split, and then
/// move between groups: no transfer fails (the SDK retries through each handoff, and
/// conflicts are only counted), and every snapshot keeps the total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_stay_atomic_while_their_tablets_split_and_move() {
    let universe = Universe::start(3);
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;
    let opened = output_within(&mut bench_txn(&universe, "1"), Duration::from_secs(120));
    assert!(
        opened.status.success(),
        "opening the accounts failed: {}",
        String::from_utf8_lossy(&opened.stderr)
    );
    let expected = 2 * BENCH_ACCOUNTS as i64 * BENCH_OPENING_BALANCE;
    assert_eq!(bench_balances(&client).await.iter().sum::<i64>(), expected);

    let running = bench_txn(&universe, "8")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn luna bench txn");
    let groups: Vec<u64> = client
        .admin()
        .list_groups()
        .await
        .expect("groups")
        .iter()
        .map(|group| group.id)
        .collect();
    assert!(groups.len() >= 2, "one group only: {groups:?}");
    let before = client
        .admin()
        .list_tablets("bank", "")
        .await
        .expect("tablets");
    // Each collection's two tablets split at a quarter and three quarters of the accounts
    // (so few keys fill one 64-row page: "the middle of the data" could not cut it).
    for tablet in &before {
        let first_half = tablet.range.as_ref().is_none_or(|r| r.start.is_empty());
        let at = if first_half {
            "acct-00000010"
        } else {
            "acct-00000030"
        };
        client
            .admin()
            .split_tablet(tablet.id, at)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "splitting tablet {}: {error}\n{}",
                    tablet.id,
                    universe.logs()
                )
            });
    }
    let split = client
        .admin()
        .list_tablets("bank", "")
        .await
        .expect("tablets");
    assert_eq!(split.len(), 2 * before.len());
    let mut rolled_back = 0;
    let all = bench_balances(&client).await;
    assert_eq!(all.iter().sum::<i64>(), expected, "after the splits");
    let mut moves = 0;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        for tablet in client
            .admin()
            .list_tablets("bank", "")
            .await
            .expect("tablets")
        {
            let at = groups
                .iter()
                .position(|&g| g == tablet.group_id)
                .unwrap_or(0);
            let to_group = groups[(at + 1) % groups.len()];
            // A move rolls back if a lock stays on the tablet for its whole seal (a
            // transaction that gave up mid-commit leaves its locks to the next reader,
            // and a sealed tablet has none); the next round tries again.
            match client.admin().move_tablet(tablet.id, to_group).await {
                Ok(_) => moves += 1,
                Err(error) if error.to_string().contains("rolled back") => {
                    println!("tablet {} stayed: {error}", tablet.id);
                    rolled_back += 1;
                }
                Err(error) => panic!("moving tablet {}: {error}\n{}", tablet.id, universe.logs()),
            }
        }
        let all = bench_balances(&client).await;
        assert_eq!(all.iter().sum::<i64>(), expected, "after {moves} moves");
        assert!(all.iter().all(|&balance| balance >= 0), "{all:?}");
    }
    let finished = running.wait_with_output().expect("luna bench txn");
    let report = String::from_utf8_lossy(&finished.stdout);
    assert!(
        finished.status.success(),
        "transfers failed during the moves: {report}\n{}\n{}",
        String::from_utf8_lossy(&finished.stderr),
        universe.logs()
    );
    let committed = json_reports(&finished)[0]["committed"]
        .as_u64()
        .unwrap_or(0);
    println!(
        "{} splits and {moves} moves ({rolled_back} rolled back) under {committed} committed transfers: {report}",
        before.len()
    );
    assert!(moves > 10, "too few moves went through: {moves}");
    let errors = json_reports(&finished)[0]["errors"].as_u64();
    assert_eq!(errors, Some(0), "transfers failed with errors: {report}");
    assert!(committed > 100, "too few transfers ran: {report}");
    assert_eq!(bench_balances(&client).await.iter().sum::<i64>(), expected);
}

/// The placement driver evens out the groups' tablet counts with moves, once they have been
/// out of balance for `--tablet-balance-after-secs`, and leaves the tablets an operator
/// moved where they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_driver_moves_tablets_to_even_out_the_groups() {
    let universe =
        Universe::start_with_master_flags(1, 3, 300, &["--tablet-balance-after-secs", "1"]);
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;
    let admin = client.admin();
    admin.create_database("app").await.expect("db");
    admin
        .create_collection("app", "balanced", CollectionSpec::hash(3))
        .await
        .expect("collection");
    support::load::wait_led(&client, "app", "balanced").await;
    let collection = client.database("app").collection("balanced");
    let writers = Writers::spawn(&collection, 2);
    writers
        .wait_progress(50, "before the operator's move")
        .await;
    let before = admin
        .list_tablets("app", "balanced")
        .await
        .expect("tablets");
    let groups: std::collections::BTreeSet<u64> = before.iter().map(|t| t.group_id).collect();
    assert_eq!(groups.len(), 3, "one tablet per group: {before:?}");

    // The operator piles two tablets on one group; the driver moves the other one away.
    let (kept, pinned) = (&before[0], &before[1]);
    admin
        .move_tablet(pinned.id, kept.group_id)
        .await
        .expect("the operator's move");
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let tablets = admin
            .list_tablets("app", "balanced")
            .await
            .expect("tablets");
        let groups: std::collections::BTreeSet<u64> = tablets.iter().map(|t| t.group_id).collect();
        if groups.len() == 3 {
            break tablets;
        }
        assert!(
            Instant::now() < deadline,
            "the groups were not balanced again: {tablets:?}\n{}",
            universe.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let find = |id: u64| {
        after
            .iter()
            .find(|t| t.id == id)
            .expect("the tablet")
            .clone()
    };
    assert_eq!(
        find(pinned.id).group_id,
        kept.group_id,
        "the operator's tablet moved back"
    );
    assert_eq!(
        find(kept.id).epoch,
        kept.epoch + 1,
        "the driver moved the unpinned tablet"
    );
    writers.wait_progress(50, "after the driver's move").await;
    writers.stop_and_check(|| universe.logs()).await;
}
