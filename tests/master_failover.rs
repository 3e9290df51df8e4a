//! A replicated master of real processes on loopback: three `luna master` replicas and
//! three tablet servers. kill -9 of the master leader (twice, with a restart between) under
//! write load: writes go on, catalog changes and timestamps are served by the new leader,
//! timestamps never go back, and every acknowledged write is still there.

mod support;

use luna_client::{Client, CollectionSpec};
use support::history::{self, Registers, seed};
use support::load::{Writers, wait_led, with_collection};

/// Timestamps from the client, which must only move forward.
async fn timestamp_above(client: &Client, floor: u64, what: &str) -> u64 {
    let timestamp = client.timestamp().await.expect("a timestamp");
    assert!(
        timestamp > floor,
        "timestamp {timestamp} {what} is not above {floor}"
    );
    timestamp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_master_leader_loses_nothing_and_timestamps_move_forward() {
    let (mut universe, client, collection) =
        with_collection(3, "load", CollectionSpec::hash(4)).await;
    let writers = Writers::spawn(&collection, 4);
    let registers = Registers::spawn(&collection, 4, 3, seed());
    writers.wait_progress(100, "at the start").await;
    let mut last = timestamp_above(&client, 0, "at the start").await;

    for round in 0..2 {
        let leader = universe.leading_master().await;
        universe.kill_master(leader);
        writers
            .wait_progress(200, &format!("after killing master {leader}"))
            .await;
        last = timestamp_above(&client, last, "after the failover").await;
        // The catalog moves on at the new leader, and it hears from every server.
        let name = format!("after{round}");
        client
            .admin()
            .create_collection("app", &name, CollectionSpec::hash(2))
            .await
            .expect("a collection created after the failover");
        wait_led(&client, "app", &name).await;
        universe.wait_servers_up(&client, 3).await;
        // Back to three replicas, so the next kill leaves a majority.
        universe.restart_master(leader);
    }
    let names: Vec<String> = client
        .admin()
        .list_collections("app")
        .await
        .expect("collections")
        .into_iter()
        .map(|collection| collection.name)
        .collect();
    assert_eq!(names, ["load", "after0", "after1"], "listed by id");
    writers.stop_and_check(|| universe.logs()).await;
    history::stop_and_check(registers, || universe.logs()).await;
}
