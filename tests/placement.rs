//! Moving group leaders by hand, through the CLI against real processes: a transfer takes
//! effect, the group keeps its new leader (it became the preferred one), and bad requests
//! get clear errors.

mod support;

use std::time::Duration;

use luna_client::CollectionSpec;
use support::load::with_collection;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfer_leader_moves_the_leader_and_it_stays() {
    let (universe, client, kv) = with_collection(1, "kv", CollectionSpec::hash(1)).await;
    let tablets = client
        .admin()
        .list_tablets("app", "kv")
        .await
        .expect("tablets");
    let group_id = tablets[0].group_id;
    let group = |groups: Vec<luna_client::GroupInfo>| {
        groups
            .into_iter()
            .find(|group| group.id == group_id)
            .expect("the collection's group")
    };
    let before = group(client.admin().list_groups().await.expect("groups"));
    let to = *before
        .replicas
        .iter()
        .find(|&&id| id != before.leader_server_id)
        .expect("a follower");

    let output = universe.cli(&[
        "group",
        "transfer-leader",
        &group_id.to_string(),
        "--to",
        &to.to_string(),
        "--json",
    ]);
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
    let after = group(client.admin().list_groups().await.expect("groups"));
    assert_eq!(after.leader_server_id, to, "the leader moved back");
    assert_eq!(
        after.replicas[0], to,
        "the new leader is the preferred replica"
    );
    kv.put("k", "v")
        .await
        .expect("a write through the new leader");

    // Bad requests: a server without a replica, and a group that does not exist.
    let output = universe.cli(&[
        "group",
        "transfer-leader",
        &group_id.to_string(),
        "--to",
        "999",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("holds no replica"), "{stderr}");
    let output = universe.cli(&[
        "group",
        "transfer-leader",
        "424242",
        "--to",
        &to.to_string(),
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no group 424242"), "{stderr}");
}
