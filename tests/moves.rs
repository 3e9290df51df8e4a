//! Moving replicas between real processes, under writes: an operator's `move-replica` (of a
//! group's leader), `server drain`, and the placement driver's repair of a killed server.
//! Every acknowledged write must read back afterwards.

mod support;

use std::time::{Duration, Instant};

use luna_client::{Client, CollectionSpec, GroupInfo};
use support::Universe;
use support::load::{Writers, wait_led};

/// Four tablet servers (each group has replicas on three of them) and a collection `app.kv`
/// of four tablets, led.
async fn four_servers(repair_after_secs: u64) -> (Universe, Client) {
    let universe = Universe::start_with_repair(1, 4, repair_after_secs);
    let client = universe.client().await;
    universe.wait_servers_up(&client, 4).await;
    client.admin().create_database("app").await.expect("db");
    client
        .admin()
        .create_collection("app", "kv", CollectionSpec::hash(4))
        .await
        .expect("collection");
    wait_led(&client, "app", "kv").await;
    (universe, client)
}

async fn groups(client: &Client) -> Vec<GroupInfo> {
    client.admin().list_groups().await.expect("groups")
}

/// Waits until `done` holds for the groups, for at most `limit`.
async fn wait_groups(
    client: &Client,
    universe: &Universe,
    limit: Duration,
    what: &str,
    done: impl Fn(&[GroupInfo]) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        let groups = groups(client).await;
        if done(&groups) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}: {groups:?}\n{}",
            universe.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leaders_replica_moves_and_a_drained_server_empties_under_writes() {
    let (universe, client) = four_servers(300).await;
    let kv = client.database("app").collection("kv");
    let writers = Writers::spawn(&kv, 4);
    writers.wait_progress(50, "before the move").await;

    // Move the leader's replica of a group with tablets to the one server without one.
    let tablets = client
        .admin()
        .list_tablets("app", "kv")
        .await
        .expect("tablets");
    // Its leader as the master last heard of it: unknown (0) for a moment after an election.
    let deadline = Instant::now() + Duration::from_secs(30);
    let group = loop {
        let group = groups(&client)
            .await
            .into_iter()
            .find(|g| g.id == tablets[0].group_id)
            .expect("the first tablet's group");
        if group.leader_server_id != 0 {
            break group;
        }
        assert!(
            Instant::now() < deadline,
            "group {} has no leader",
            group.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let from = group.leader_server_id;
    let to = (1..=4)
        .map(|i| universe.server_id(i - 1))
        .find(|id| !group.replicas.contains(id))
        .expect("a server without a replica");
    let output = universe.cli(&[
        "group",
        "move-replica",
        &group.id.to_string(),
        "--from",
        &from.to_string(),
        "--to",
        &to.to_string(),
        "--wait-secs",
        "60",
        "--json",
    ]);
    assert!(
        output.status.success(),
        "move-replica failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        universe.logs()
    );
    let moved = support::json_reports(&output);
    let replicas = moved[0][0]["replicas"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let listed: Vec<u64> = replicas.split(',').filter_map(|s| s.parse().ok()).collect();
    assert!(
        listed.contains(&to) && !listed.contains(&from),
        "server {to} replaced server {from}: {replicas}"
    );
    writers.wait_progress(50, "after the move").await;

    // A second move on the same group while none is under way works the same; a move onto
    // a server that already holds a replica is refused with a clear message.
    let output = universe.cli(&[
        "group",
        "move-replica",
        &group.id.to_string(),
        "--from",
        &listed[0].to_string(),
        "--to",
        &listed[1].to_string(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already holds a replica"), "{stderr}");

    // Drain a server: every replica leaves it, and nothing lands on it.
    let drained = universe.server_id(0);
    let hosted_before = groups(&client)
        .await
        .iter()
        .filter(|g| g.replicas.contains(&drained))
        .count();
    assert!(hosted_before > 0, "server {drained} hosts replicas");
    let output = universe.cli(&["server", "drain", &drained.to_string(), "--wait-secs", "90"]);
    assert!(
        output.status.success(),
        "drain failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        universe.logs()
    );
    wait_groups(
        &client,
        &universe,
        Duration::from_secs(30),
        "the drain",
        |groups| {
            groups.iter().all(|g| {
                g.moving.is_none() && g.replicas.len() == 3 && !g.replicas.contains(&drained)
            })
        },
    )
    .await;
    // Once each group's leader reports a membership without it, the master names the
    // group as removed and the drained server deletes its replica.
    let deadline = Instant::now() + Duration::from_secs(30);
    while universe
        .server_log(0)
        .matches("group replica removed")
        .count()
        < hosted_before
    {
        assert!(
            Instant::now() < deadline,
            "server {drained} did not delete its {hosted_before} replicas:\n{}",
            universe.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    writers.wait_progress(50, "after the drain").await;
    writers.stop_and_check(|| universe.logs()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_servers_replicas_are_rebuilt_elsewhere() {
    // Replaced 4 s after its last heartbeat (the heartbeat timeout is 3 s).
    let (mut universe, client) = four_servers(4).await;
    let kv = client.database("app").collection("kv");
    let writers = Writers::spawn(&kv, 4);
    writers.wait_progress(50, "before the kill").await;
    let killed = universe.server_id(1);
    universe.kill_server(1);
    wait_groups(
        &client,
        &universe,
        Duration::from_secs(60),
        "the repair",
        |groups| {
            groups.iter().all(|g| {
                g.moving.is_none() && g.replicas.len() == 3 && !g.replicas.contains(&killed)
            })
        },
    )
    .await;
    // Every group is whole again: it survives the loss of one more server.
    let second = universe.server_id(2);
    universe.kill_server(2);
    wait_groups(
        &client,
        &universe,
        Duration::from_secs(30),
        "new leaders",
        |groups| {
            groups
                .iter()
                .all(|g| g.leader_server_id != 0 && g.leader_server_id != second)
        },
    )
    .await;
    writers.wait_progress(50, "after losing two servers").await;
    writers.stop_and_check(|| universe.logs()).await;
}
