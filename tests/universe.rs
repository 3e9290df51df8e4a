//! A universe of real processes on loopback: a master and three tablet servers, reached
//! through the SDK and the CLI. Covers routing over many range and hash tablets, kill -9 of
//! a follower and then of a leader under write load, a paused (SIGSTOP) leader, a full
//! restart, and bad input. Register histories recorded meanwhile are checked for
//! linearizability.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use luna_client::{ClientError, CollectionSpec};
use luna_proto::tablet::tablet_client::TabletClient;
use luna_proto::tablet::{self as pb, tablet_error::Kind};
use support::Universe;
use support::history::{self, Registers, seed};
use support::load::{Writers, first_group_leader, wait_led, with_collection, with_two_tablets};

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdk_and_cli_write_and_read_each_other() {
    let universe = Universe::start(3);
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;

    let created = universe.cli(&["db", "create", "app"]);
    assert!(created.status.success(), "{}", stderr(&created));
    let created = universe.cli(&["collection", "create", "app/users"]);
    assert!(created.status.success(), "{}", stderr(&created));
    wait_led(&client, "app", "users").await;

    let users = client.database("app").collection("users");
    users.put("alice", "from-sdk").await.expect("sdk put");
    let got = universe.cli(&["get", "app/users", "alice"]);
    assert!(got.status.success(), "{}", stderr(&got));
    assert_eq!(stdout(&got).trim(), "from-sdk");

    let put = universe.cli(&["put", "app/users", "bob", "from-cli"]);
    assert!(put.status.success(), "{}", stderr(&put));
    assert_eq!(
        users.get("bob").await.expect("sdk get").as_deref(),
        Some(&b"from-cli"[..])
    );

    let scan = universe.cli(&["--json", "scan", "app/users"]);
    assert!(scan.status.success(), "{}", stderr(&scan));
    let pairs: serde_json::Value = serde_json::from_str(&stdout(&scan)).expect("scan JSON");
    assert_eq!(
        pairs,
        serde_json::json!([
            {"key": "alice", "value": "from-sdk"},
            {"key": "bob", "value": "from-cli"}
        ])
    );

    let deleted = universe.cli(&["delete", "app/users", "alice"]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    assert_eq!(users.get("alice").await.expect("get"), None);
    let missing = universe.cli(&["get", "app/users", "alice"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("not in app/users"),
        "{}",
        stderr(&missing)
    );

    let servers = universe.cli(&["--json", "servers"]);
    let servers: serde_json::Value = serde_json::from_str(&stdout(&servers)).expect("JSON");
    assert_eq!(servers.as_array().map(Vec::len), Some(3));
    assert!(
        servers
            .as_array()
            .is_some_and(|list| list.iter().all(|server| server["state"] == "up"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_and_hash_collections_route_across_many_tablets() {
    let universe = Universe::start(3);
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;
    let admin = client.admin();
    admin.create_database("app").await.expect("create db");
    let splits: Vec<String> = ["c", "f", "j", "m", "p", "s", "v", "y"]
        .iter()
        .map(|split| (*split).to_owned())
        .collect();
    admin
        .create_collection("app", "ranged", CollectionSpec::range().split_keys(splits))
        .await
        .expect("range collection");
    admin
        .create_collection("app", "hashed", CollectionSpec::hash(16))
        .await
        .expect("hash collection");
    assert_eq!(
        admin
            .list_tablets("app", "ranged")
            .await
            .expect("tablets")
            .len(),
        9
    );
    assert_eq!(
        admin
            .list_tablets("app", "hashed")
            .await
            .expect("tablets")
            .len(),
        16
    );
    wait_led(&client, "app", "ranged").await;
    wait_led(&client, "app", "hashed").await;

    let db = client.database("app");
    let ranged = db.collection("ranged");
    let hashed = db.collection("hashed");
    let mut expected = BTreeMap::new();
    for i in 0..260u32 {
        // Keys spread over every range tablet: a..z prefixes.
        let letter = char::from(b'a' + u8::try_from(i % 26).unwrap_or(0));
        let key = format!("{letter}{i:04}");
        let value = format!("v{i}");
        ranged
            .put(key.clone(), value.clone())
            .await
            .expect("range put");
        hashed
            .put(key.clone(), value.clone())
            .await
            .expect("hash put");
        expected.insert(key, value);
    }
    for (key, value) in expected.iter().step_by(7) {
        assert_eq!(
            ranged.get(key).await.expect("get").as_deref(),
            Some(value.as_bytes())
        );
        assert_eq!(
            hashed.get(key).await.expect("get").as_deref(),
            Some(value.as_bytes())
        );
    }
    let scanned = ranged.scan_all(1000, false).await.expect("range scan");
    let scanned: Vec<(String, String)> = scanned
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into(),
                String::from_utf8_lossy(v).into(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = expected.clone().into_iter().collect();
    assert_eq!(
        scanned, want,
        "a range scan returns every key, in order, across tablets"
    );
    let reversed = ranged.scan("d".."k", 5, true).await.expect("reverse scan");
    let want: Vec<&String> = expected
        .range("d".to_owned().."k".to_owned())
        .rev()
        .take(5)
        .map(|(k, _)| k)
        .collect();
    let got: Vec<String> = reversed
        .iter()
        .map(|(k, _)| String::from_utf8_lossy(k).into())
        .collect();
    assert_eq!(got.iter().collect::<Vec<_>>(), want);
    let hashed_all = hashed.scan_all(1000, false).await.expect("hash scan");
    assert_eq!(hashed_all.len(), expected.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_follower_then_leader_under_load_loses_nothing() {
    let (mut universe, client, collection) =
        with_collection(1, "load", CollectionSpec::hash(6)).await;

    let writers = Writers::spawn(&collection, 6);
    let registers = Registers::spawn(&collection, 4, 3, seed());
    writers.wait_progress(100, "at the start").await;

    // A follower of group G dies: G keeps its quorum and writes go on.
    let groups = client.admin().list_groups().await.expect("groups");
    let group = groups
        .iter()
        .find(|group| group.leader_server_id != 0)
        .expect("a led group");
    let leader = group.leader_server_id;
    let follower = *group
        .replicas
        .iter()
        .find(|&&id| id != leader)
        .expect("a follower");
    let follower_index = universe.index_of(follower);
    universe.kill_server(follower_index);
    writers.wait_progress(200, "after killing a follower").await;
    universe.restart_server(follower_index);
    universe.wait_servers_up(&client, 3).await;

    // Now G's leader dies: a new leader is elected and writes go on.
    let leader_index = universe.index_of(leader);
    universe.kill_server(leader_index);
    writers.wait_progress(200, "after killing a leader").await;
    universe.restart_server(leader_index);
    universe.wait_servers_up(&client, 3).await;
    writers.wait_progress(100, "after the restart").await;

    writers.stop_and_check(|| universe.logs()).await;
    history::stop_and_check(registers, || universe.logs()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_group_leader_is_replaced_and_wakes_without_stale_answers() {
    let (universe, client, collection) =
        with_collection(1, "paused", CollectionSpec::hash(1)).await;
    let writers = Writers::spawn(&collection, 4);
    let registers = Registers::spawn(&collection, 4, 3, seed());
    writers.wait_progress(100, "at the start").await;

    // SIGSTOP the group's leader: it keeps its sockets and believes it still leads. The
    // others elect a new leader and writes go on.
    let (_, leader) = first_group_leader(&client, "app", "paused").await;
    let paused = universe.index_of(leader);
    universe.server(paused).pause();
    writers.wait_progress(200, "with the leader paused").await;
    // Woken, it must not answer from its old lease or accept writes of its old term.
    universe.server(paused).resume();
    writers
        .wait_progress(200, "after the old leader woke")
        .await;

    writers.stop_and_check(|| universe.logs()).await;
    history::stop_and_check(registers, || universe.logs()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_restart_after_kill_keeps_every_write() {
    let (mut universe, _client, kv) = with_collection(1, "kv", CollectionSpec::hash(4)).await;
    for i in 0..200u32 {
        kv.put(format!("key{i}"), format!("value{i}"))
            .await
            .expect("put");
    }
    kv.delete("key7").await.expect("delete");

    universe.kill_all();
    universe.start_master();
    for i in 0..3 {
        universe.restart_server(i);
    }
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;
    wait_led(&client, "app", "kv").await;
    let kv = client.database("app").collection("kv");
    for i in 0..200u32 {
        let expected = (i != 7).then(|| format!("value{i}"));
        let got = kv.get(format!("key{i}")).await.expect("get after restart");
        assert_eq!(
            got.as_deref(),
            expected.as_ref().map(String::as_bytes),
            "key{i} after the restart\n{}",
            universe.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_typed_errors_and_clear_messages() {
    let universe = Universe::start(3);
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;

    // Unknown database and collection.
    let error = client.database("nope").collection("x").get("k").await;
    assert!(
        matches!(error, Err(ClientError::NotFound { .. })),
        "{error:?}"
    );
    client.admin().create_database("app").await.expect("db");
    let error = client
        .database("app")
        .collection("nope")
        .put("k", "v")
        .await;
    assert!(
        matches!(error, Err(ClientError::NotFound { .. })),
        "{error:?}"
    );
    let duplicate = client.admin().create_database("app").await;
    assert!(
        matches!(duplicate, Err(ClientError::AlreadyExists { .. })),
        "{duplicate:?}"
    );

    // Oversized key, refused before it leaves the client.
    client
        .admin()
        .create_collection("app", "kv", CollectionSpec::range())
        .await
        .expect("collection");
    wait_led(&client, "app", "kv").await;
    let kv = client.database("app").collection("kv");
    let error = kv.put(vec![b'k'; 5000], "v").await;
    assert!(
        matches!(error, Err(ClientError::InvalidArgument { .. })),
        "{error:?}"
    );

    // Malformed requests straight to a tablet server get typed answers, not crashes.
    let tablets = client
        .admin()
        .list_tablets("app", "kv")
        .await
        .expect("tablets");
    let tablet = &tablets[0];
    let servers = client.admin().list_servers().await.expect("servers");
    for server in &servers {
        let mut raw = TabletClient::connect(format!("http://{}", server.addr))
            .await
            .expect("connect");
        // Every replica opens the tablet when it applies the group's log; wait for that.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let probe = raw
                .get(pb::GetRequest {
                    tablet: Some(pb::TabletRef {
                        tablet_id: tablet.id,
                        epoch: tablet.epoch,
                    }),
                    key: Bytes::from_static(b"k"),
                    options: Some(pb::ReadOptions {
                        mode: pb::ReadMode::Stale as i32,
                        read_ts: 1,
                    }),
                })
                .await
                .expect("probe")
                .into_inner();
            if !matches!(
                probe.error.and_then(|e| e.kind),
                Some(Kind::TabletNotFound(_))
            ) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "server {} never opened the tablet",
                server.id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let no_tablet = raw
            .write(pb::WriteRequest {
                tablet: None,
                request_id: None,
                mutations: vec![pb::Mutation {
                    op: pb::mutation::Op::Put as i32,
                    key: Bytes::from_static(b"k"),
                    value: Bytes::from_static(b"v"),
                }],
                commit_above: 0,
            })
            .await;
        assert_eq!(
            no_tablet.expect_err("no tablet").code(),
            tonic::Code::InvalidArgument
        );
        let huge_key = raw
            .get(pb::GetRequest {
                tablet: Some(pb::TabletRef {
                    tablet_id: tablet.id,
                    epoch: tablet.epoch,
                }),
                key: Bytes::from(vec![b'k'; 5000]),
                options: Some(pb::ReadOptions {
                    mode: pb::ReadMode::Stale as i32,
                    read_ts: 1,
                }),
            })
            .await;
        assert_eq!(
            huge_key.expect_err("oversized key").code(),
            tonic::Code::InvalidArgument
        );
        let future_epoch = raw
            .get(pb::GetRequest {
                tablet: Some(pb::TabletRef {
                    tablet_id: tablet.id,
                    epoch: tablet.epoch + 7,
                }),
                key: Bytes::from_static(b"k"),
                options: None,
            })
            .await
            .expect("typed answer")
            .into_inner();
        // An epoch ahead of the replica's is one it has not applied yet: the request goes
        // elsewhere or waits, it is not refreshed as stale.
        assert!(
            matches!(
                future_epoch.error.and_then(|e| e.kind),
                Some(Kind::TabletNotFound(_))
            ),
            "server {}",
            server.id
        );
        let unknown = raw
            .get(pb::GetRequest {
                tablet: Some(pb::TabletRef {
                    tablet_id: 999_999,
                    epoch: 1,
                }),
                key: Bytes::from_static(b"k"),
                options: None,
            })
            .await
            .expect("typed answer")
            .into_inner();
        assert!(matches!(
            unknown.error.and_then(|e| e.kind),
            Some(Kind::TabletNotFound(_))
        ));
    }

    // An unreachable master: a non-zero exit and a message that says what to do.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_luna"))
        .args(["--master", "127.0.0.1:1", "db", "list"])
        .output()
        .expect("run luna");
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("cannot reach the master at 127.0.0.1:1"),
        "{message}"
    );
    assert_eq!(message.trim().lines().count(), 1, "one line: {message}");
    let bad_path = universe.cli(&["get", "no-slash", "k"]);
    assert!(!bad_path.status.success());
    assert!(
        stderr(&bad_path).contains("DATABASE/COLLECTION"),
        "{}",
        stderr(&bad_path)
    );
}

/// The highest value of gauge `name` for group `group_id` among the running tablet servers.
fn group_gauge(universe: &Universe, name: &str, group_id: u64) -> u64 {
    let prefix = format!("{name}{{group=\"{group_id}\",");
    universe
        .servers
        .iter()
        .flatten()
        .flat_map(|server| {
            server
                .metrics()
                .lines()
                .filter(|line| line.starts_with(&prefix))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or(0)
}

/// Waits (30 s at most) until a replica of `group` truncated its log at `index` or past
/// it; `what` says what stands at `index`.
async fn wait_truncated(universe: &Universe, group: u64, index: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let truncated = group_gauge(universe, "luna_group_truncated_index", group);
        if truncated >= index {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "group {group}'s log stays truncated at {truncated}, behind {what} at {index}\n{}",
            universe.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A tablet that stops taking writes long before its memtable fills is flushed once its
/// group's log has moved on far enough (`--flush-behind-entries`), so that the log is
/// truncated past its last writes instead of growing for as long as the tablet idles.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_tablet_does_not_hold_its_groups_log_back() {
    let flags = ["--flush-behind-entries", "50"];
    let (universe, client) =
        with_two_tablets(Universe::start_with_server_flags(3, &flags), 3).await;
    let admin = client.admin();
    // Both tablets in one group: one of them idles while the other takes writes.
    let tablets = admin.list_tablets("app", "kv").await.expect("tablets");
    let group = tablets[0].group_id;
    if tablets[1].group_id != group {
        admin
            .move_tablet(tablets[1].id, group)
            .await
            .expect("move into one group");
    }
    let kv = client.database("app").collection("kv");
    kv.put("a-idle", "x").await.expect("put");
    let written_at = group_gauge(&universe, "luna_group_applied_index", group);
    for i in 0..200 {
        kv.put(format!("z{i:04}"), "y").await.expect("put");
    }
    wait_truncated(&universe, group, written_at, "the idle tablet's write").await;
    assert_eq!(
        kv.get("a-idle").await.expect("get").as_deref(),
        Some(&b"x"[..])
    );
}

/// A group whose tablets all moved away truncates its whole log: no flush marker comes to
/// it any more, and an untruncated log would pin the journal's old files for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_left_without_tablets_truncates_its_log() {
    let (universe, client) = with_two_tablets(Universe::start(3), 3).await;
    let admin = client.admin();
    let kv = client.database("app").collection("kv");
    for i in 0..50 {
        kv.put(format!("a{i:03}"), "v").await.expect("put");
        kv.put(format!("z{i:03}"), "v").await.expect("put");
    }
    let tablets = admin.list_tablets("app", "kv").await.expect("tablets");
    let source = tablets[0].group_id;
    let groups = admin.list_groups().await.expect("groups");
    let target = groups
        .iter()
        .map(|group| group.id)
        .find(|id| *id != source)
        .expect("a second group");
    for tablet in tablets.iter().filter(|tablet| tablet.group_id == source) {
        admin
            .move_tablet(tablet.id, target)
            .await
            .expect("move out of the source group");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while group_gauge(&universe, "luna_group_tablets", source) > 0 {
        assert!(
            Instant::now() < deadline,
            "a replica of group {source} still hosts a tablet\n{}",
            universe.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let applied = group_gauge(&universe, "luna_group_applied_index", source);
    wait_truncated(
        &universe,
        source,
        applied,
        "the last close, with no tablets left",
    )
    .await;
    assert_eq!(
        kv.get("a000").await.expect("get").as_deref(),
        Some(&b"v"[..])
    );
}
