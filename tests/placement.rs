//! Moving group leaders by hand, through the CLI against real processes: a transfer takes
//! effect, the group keeps its new leader (it became the preferred one), a transfer to a
//! replica that does not answer is reported and completes once it does, and bad requests
//! get clear errors.

mod support;

use std::process::Output;
use std::time::Duration;

use luna_client::{Client, CollectionSpec, GroupInfo};
use support::Universe;
use support::load::with_collection;

/// The id of the one group of collection `app.kv`, and that group as the master sees it.
async fn kv_group(client: &Client) -> (u64, GroupInfo) {
    let tablets = client
        .admin()
        .list_tablets("app", "kv")
        .await
        .expect("tablets");
    let group_id = tablets[0].group_id;
    let groups = client.admin().list_groups().await.expect("groups");
    let group = groups
        .into_iter()
        .find(|group| group.id == group_id)
        .expect("the collection's group");
    (group_id, group)
}

/// `luna group transfer-leader GROUP --to SERVER --json` against `universe`.
fn transfer_leader(universe: &Universe, group: impl ToString, to: impl ToString) -> Output {
    universe.cli(&[
        "group",
        "transfer-leader",
        &group.to_string(),
        "--to",
        &to.to_string(),
        "--json",
    ])
}

/// A follower of `group`.
fn follower_of(group: &GroupInfo) -> u64 {
    *group
        .replicas
        .iter()
        .find(|&&id| id != group.leader_server_id)
        .expect("a follower")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfer_leader_moves_the_leader_and_it_stays() {
    let (universe, client, kv) = with_collection(1, "kv", CollectionSpec::hash(1)).await;
    let (group_id, before) = kv_group(&client).await;
    let to = follower_of(&before);

    let output = transfer_leader(&universe, group_id, to);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "transfer-leader failed: {stderr}\n{}",
        universe.logs()
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("\"leader\":{to}")),
        "the answer names the new leader: {stdout}"
    );

    // It stays: the new leader is the group's preferred one now, so nothing moves it back
    // (the old preferred leader would have, in the next term or heartbeat).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, after) = kv_group(&client).await;
    assert_eq!(after.leader_server_id, to, "the leader moved back");
    assert_eq!(
        after.replicas[0], to,
        "the new leader is the preferred replica"
    );
    kv.put("k", "v")
        .await
        .expect("a write through the new leader");

    // Bad requests: a server without a replica, and a group that does not exist.
    let output = transfer_leader(&universe, group_id, 999);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("holds no replica"), "{stderr}");
    let output = transfer_leader(&universe, 424242, to);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no group 424242"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_to_a_paused_replica_is_reported_and_completes_once_it_answers() {
    let (universe, client, kv) = with_collection(1, "kv", CollectionSpec::hash(1)).await;
    let (group_id, before) = kv_group(&client).await;
    let to = follower_of(&before);
    let paused = universe.index_of(to);
    // Long enough for the group's leader to stop counting it as active (an election
    // timeout, 0.5 s), short of the master's heartbeat timeout (3 s): the master still lets
    // leadership move there.
    universe.server(paused).pause();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let output = transfer_leader(&universe, group_id, to);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a paused server took over");
    assert!(
        stderr.contains("has not taken over") && stderr.contains("tries again"),
        "the answer says the transfer is persisted and still coming: {stderr}"
    );
    // Writes still go through the old leader: it did not hand over to a replica that
    // does not answer.
    kv.put("during", "v")
        .await
        .expect("a write while the transferee is paused");

    universe.server(paused).resume();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, group) = kv_group(&client).await;
        if group.leader_server_id == to {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server {to} never took over after it resumed (leader: {})\n{}",
            group.leader_server_id,
            universe.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    kv.put("after", "v")
        .await
        .expect("a write through the new leader");
}
