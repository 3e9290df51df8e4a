//! The transaction protocol spoken raw, as a client that dies half-way would leave it:
//! locks resolved through the primary by readers (after its prewrites, after its primary's
//! group decided, while it is still deciding), and typed answers to bad input. Also a
//! write's retry across a tablet move, by request id, a late copy of a write its client
//! gave up on, and follower reads right after writes.
//! tests/transactions.rs drives transactions through the SDK.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use luna_client::Client;
use luna_proto::tablet::tablet_client::TabletClient;
use luna_proto::tablet::{self as pb, tablet_error::Kind};
use support::Universe;
use support::load::with_two_tablets;
use tonic::transport::Channel;

fn text(value: Option<Bytes>) -> Option<String> {
    value.map(|value| String::from_utf8_lossy(&value).into_owned())
}

/// A raw connection to every tablet server, to act as a client that dies half-way.
async fn raw_servers(client: &Client) -> Vec<TabletClient<Channel>> {
    let mut raw = Vec::new();
    for server in client.admin().list_servers().await.expect("servers") {
        raw.push(
            TabletClient::connect(format!("http://{}", server.addr))
                .await
                .expect("connect"),
        );
    }
    raw
}

/// Calls each server in turn until one leads the tablet's group: `call` answers the
/// error kind of the server's response, and the response.
async fn on_leader<T, Fut>(
    servers: &[TabletClient<Channel>],
    what: &str,
    call: impl Fn(TabletClient<Channel>) -> Fut,
) -> (Option<Kind>, T)
where
    Fut: std::future::Future<Output = (Option<Kind>, T)>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for server in servers {
            let (kind, response) = call(server.clone()).await;
            if !matches!(
                kind,
                Some(Kind::NotLeader(_)) | Some(Kind::TabletNotFound(_))
            ) {
                return (kind, response);
            }
        }
        assert!(Instant::now() < deadline, "no leader took the {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `request` to each server until one leads the tablet's group.
async fn prewrite_on_leader(
    servers: &[TabletClient<Channel>],
    request: pb::PrewriteRequest,
) -> pb::PrewriteResponse {
    let (_, response) = on_leader(servers, "prewrite", |mut server| {
        let request = request.clone();
        async move {
            let response = server
                .prewrite(request)
                .await
                .expect("prewrite")
                .into_inner();
            (
                response.error.clone().and_then(|error| error.kind),
                response,
            )
        }
    })
    .await;
    response
}

async fn resolve_on_leader(servers: &[TabletClient<Channel>], request: pb::ResolveRequest) {
    let (kind, ()) = on_leader(servers, "commit", |mut server| {
        let request = request.clone();
        async move {
            let response = server.resolve(request).await.expect("resolve").into_inner();
            (response.error.and_then(|error| error.kind), ())
        }
    })
    .await;
    assert!(kind.is_none(), "resolve failed: {kind:?}");
}

/// Sends `request` to each server until one leads the tablet's group, and answers the
/// write's commit timestamp.
async fn write_on_leader(servers: &[TabletClient<Channel>], request: pb::WriteRequest) -> u64 {
    let (kind, commit_ts) = on_leader(servers, "write", |mut server| {
        let request = request.clone();
        async move {
            let response = server.write(request).await.expect("write").into_inner();
            (
                response.error.and_then(|error| error.kind),
                response.commit_ts,
            )
        }
    })
    .await;
    assert!(kind.is_none(), "write failed: {kind:?}");
    commit_ts
}

fn put(key: &str, value: &str) -> pb::Mutation {
    pb::Mutation {
        op: pb::mutation::Op::Put as i32,
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

fn request_id(seq: u64) -> Option<pb::RequestId> {
    Some(pb::RequestId {
        client_id: Bytes::from_static(b"dead-client-0001"),
        seq,
        done_below: 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_clients_locks_are_resolved_through_its_primary() {
    // Held to the end: dropping the universe stops its processes.
    let (_universe, client) = with_two_tablets(Universe::start(3), 3).await;
    let admin = client.admin();
    let kv = client.database("app").collection("kv");
    for key in ["a1", "z1", "a2", "z2"] {
        kv.put(key, "old").await.expect("put");
    }
    let tablets = admin.list_tablets("app", "kv").await.expect("tablets");
    let tablet = |key: &str| {
        let info = tablets
            .iter()
            .find(|tablet| {
                let range = tablet.range.clone().unwrap_or_default();
                range.start.as_slice() <= key.as_bytes()
                    && range
                        .end
                        .as_ref()
                        .is_none_or(|end| key.as_bytes() < end.as_slice())
            })
            .expect("a tablet for the key");
        Some(pb::TabletRef {
            tablet_id: info.id,
            epoch: info.epoch,
        })
    };
    let mut servers = raw_servers(&client).await;
    let prewrite = |start_ts: u64, seq: u64, primary: &str, secondary: &str, ttl_ms: u64| {
        (
            pb::PrewriteRequest {
                request_id: request_id(seq),
                start_ts,
                primary_collection: "kv".into(),
                primary_key: Bytes::copy_from_slice(primary.as_bytes()),
                ttl_ms,
                tablets: vec![pb::TabletMutations {
                    tablet: tablet(primary),
                    mutations: vec![put(primary, "new")],
                    collection: "kv".into(),
                }],
                one_phase: false,
                commit_above: 0,
            },
            pb::PrewriteRequest {
                request_id: request_id(seq + 1),
                start_ts,
                primary_collection: "kv".into(),
                primary_key: Bytes::copy_from_slice(primary.as_bytes()),
                ttl_ms,
                tablets: vec![pb::TabletMutations {
                    tablet: tablet(secondary),
                    mutations: vec![put(secondary, "new")],
                    collection: "kv".into(),
                }],
                one_phase: false,
                commit_above: 0,
            },
        )
    };

    // Died after its prewrites: once the locks expire, a reader rolls it back.
    let start_ts = client.timestamp().await.expect("ts");
    let (primary, secondary) = prewrite(start_ts, 1, "a1", "z1", 500);
    for request in [primary.clone(), secondary] {
        let response = prewrite_on_leader(&servers, request).await;
        assert!(response.error.is_none(), "{:?}", response.error);
    }
    let read = Instant::now();
    assert_eq!(text(kv.get("z1").await.expect("get")), Some("old".into()));
    assert!(
        read.elapsed() >= Duration::from_millis(100),
        "the reader waited for the lock to expire"
    );
    assert_eq!(text(kv.get("a1").await.expect("get")), Some("old".into()));
    // The primary was rolled back: a late prewrite of it cannot lock it again.
    let late = prewrite_on_leader(
        &servers,
        pb::PrewriteRequest {
            request_id: request_id(10),
            ..primary
        },
    )
    .await;
    assert!(
        matches!(
            late.error.and_then(|error| error.kind),
            Some(Kind::TxnAborted(_))
        ),
        "a rolled-back primary takes no new lock"
    );

    // The SDK's way: the other group is locked, and the primary's group commits last, in
    // one step that decides the transaction. A reader that meets the lock meanwhile finds
    // neither a lock nor an outcome at the primary, and waits for the lock's TTL instead of
    // rolling the transaction back; once the primary's group commits, it commits the lock.
    let start_ts = client.timestamp().await.expect("ts");
    let (primary, secondary) = prewrite(start_ts, 50, "a4", "z4", 60_000);
    let locked = prewrite_on_leader(&servers, secondary).await;
    assert!(locked.error.is_none(), "{:?}", locked.error);
    let reader = {
        let kv = kv.clone();
        tokio::spawn(async move { kv.get("z4").await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !reader.is_finished(),
        "the reader rolled back a transaction still committing"
    );
    let commit_above = locked.min_commit_ts.max(start_ts);
    let deciding = pb::PrewriteRequest {
        one_phase: true,
        commit_above,
        ..primary
    };
    let decided = prewrite_on_leader(&servers, deciding.clone()).await;
    assert!(decided.error.is_none(), "{:?}", decided.error);
    assert!(decided.commit_ts > commit_above);
    // Sent again under another request id (past deduplication), it answers the same.
    let again = prewrite_on_leader(
        &servers,
        pb::PrewriteRequest {
            request_id: request_id(52),
            ..deciding
        },
    )
    .await;
    assert_eq!((again.error, again.commit_ts), (None, decided.commit_ts));
    let read = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the reader finished once the primary committed")
        .expect("reader task")
        .expect("read");
    assert_eq!(text(read), Some("new".into()));
    assert_eq!(text(kv.get("a4").await.expect("get")), Some("new".into()));

    // Died after committing its primary: a reader of the other key commits it too, at once.
    let start_ts = client.timestamp().await.expect("ts");
    let (primary, secondary) = prewrite(start_ts, 20, "a2", "z2", 60_000);
    for request in [primary, secondary] {
        let response = prewrite_on_leader(&servers, request).await;
        assert!(response.error.is_none(), "{:?}", response.error);
    }
    let commit_ts = client.timestamp().await.expect("ts");
    resolve_on_leader(
        &servers,
        pb::ResolveRequest {
            request_id: request_id(30),
            start_ts,
            commit_ts,
            tablets: vec![pb::TabletKeys {
                tablet: tablet("a2"),
                keys: vec![Bytes::from_static(b"a2")],
            }],
            primary_key: Bytes::from_static(b"a2"),
        },
    )
    .await;
    assert_eq!(text(kv.get("z2").await.expect("get")), Some("new".into()));
    assert_eq!(text(kv.get("a2").await.expect("get")), Some("new".into()));
    let old = client.database("app").read_only_at(commit_ts - 1);
    assert_eq!(
        text(old.get(&kv, "z2").await.expect("get")),
        Some("old".into()),
        "the secondary committed at the primary's commit timestamp"
    );

    // Bad input gets typed answers.
    let bad_prewrites = [
        (
            "start_ts 0",
            pb::PrewriteRequest {
                start_ts: 0,
                ..prewrite(1, 40, "a3", "z3", 500).0
            },
        ),
        // A timestamp far in the future would drag the group's clock along.
        (
            "start_ts far ahead",
            pb::PrewriteRequest {
                start_ts: u64::MAX,
                ..prewrite(1, 41, "a3", "z3", 500).0
            },
        ),
        (
            "ttl 0",
            pb::PrewriteRequest {
                ttl_ms: 0,
                ..prewrite(5, 42, "a3", "z3", 500).0
            },
        ),
        (
            "no tablets",
            pb::PrewriteRequest {
                tablets: vec![],
                ..prewrite(5, 43, "a3", "z3", 500).0
            },
        ),
        ("a tablet named twice", {
            let mut request = prewrite(5, 44, "a3", "z3", 500).0;
            request.tablets.push(request.tablets[0].clone());
            request
        }),
        (
            "commit_above without one_phase",
            pb::PrewriteRequest {
                commit_above: 20,
                ..prewrite(5, 45, "a3", "z3", 500).0
            },
        ),
        (
            "commit_above below start_ts",
            pb::PrewriteRequest {
                commit_above: 4,
                one_phase: true,
                ..prewrite(5, 46, "a3", "z3", 500).0
            },
        ),
        (
            "a deciding commit without its primary",
            pb::PrewriteRequest {
                commit_above: 20,
                one_phase: true,
                // The secondary's request: its first tablet does not hold the primary.
                ..prewrite(5, 46, "a3", "z3", 500).1
            },
        ),
    ];
    for (what, request) in bad_prewrites {
        let answer = servers[0].prewrite(request).await;
        assert_eq!(
            answer.map(|_| ()).unwrap_err().code(),
            tonic::Code::InvalidArgument,
            "{what}"
        );
    }
    let answer = servers[0]
        .resolve(pb::ResolveRequest {
            request_id: request_id(47),
            start_ts: 10,
            commit_ts: 5,
            tablets: vec![pb::TabletKeys {
                tablet: tablet("a3"),
                keys: vec![Bytes::from_static(b"a3")],
            }],
            primary_key: Bytes::new(),
        })
        .await;
    assert_eq!(
        answer.map(|_| ()).unwrap_err().code(),
        tonic::Code::InvalidArgument,
        "commit_ts below start_ts"
    );
    let answer = servers[0]
        .check_txn(pb::CheckTxnRequest {
            tablet: tablet("a3"),
            primary_key: Bytes::from_static(b"a3"),
            start_ts: 10,
            caller_lock_ttl_ms: u64::MAX,
        })
        .await;
    assert_eq!(
        answer.map(|_| ()).unwrap_err().code(),
        tonic::Code::InvalidArgument,
        "a caller's lock TTL beyond the limit"
    );
}

/// A request naming a tablet that moved out of its group, at the epoch the group had it,
/// sent to a server that hosts the old group but not the new one: the server answers that
/// the epoch is stale (so that the SDK starts the transaction over at once) rather than
/// that it does not know the tablet (which the SDK retries until its deadline, as it does
/// for a tablet its group has not opened yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tablet_that_moved_away_is_reported_at_a_stale_epoch() {
    // Four servers, so that groups (three replicas each) differ in where they are.
    let (universe, client) = with_two_tablets(Universe::start(4), 4).await;
    let admin = client.admin();
    // A group `from` whose leader has no replica of another group `to`.
    let (from, to, leader) = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let groups = admin.list_groups().await.expect("groups");
            let pair = groups.iter().find_map(|from| {
                let to = groups.iter().find(|to| {
                    to.id != from.id
                        && from.leader_server_id != 0
                        && !to.replicas.contains(&from.leader_server_id)
                })?;
                Some((from.id, to.id, from.leader_server_id))
            });
            if let Some(pair) = pair {
                break pair;
            }
            assert!(Instant::now() < deadline, "no such groups: {groups:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let tablets = admin.list_tablets("app", "kv").await.expect("tablets");
    let (left, right) = (tablets[0].id, tablets[1].id);
    let left = admin.move_tablet(left, from).await.expect("move in").tablet;
    let right = admin
        .move_tablet(right, from)
        .await
        .expect("move in")
        .tablet;
    admin.move_tablet(right.id, to).await.expect("move away");
    // The group closes its sealed copy at its next reconciliation (heartbeats every 0.5 s).
    tokio::time::sleep(Duration::from_secs(3)).await;

    let addr = admin
        .list_servers()
        .await
        .expect("servers")
        .into_iter()
        .find(|server| server.id == leader)
        .expect("the leader's address")
        .addr;
    let mut server = TabletClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let share = |tablet: &luna_client::TabletInfo, key: &str| pb::TabletMutations {
        tablet: Some(pb::TabletRef {
            tablet_id: tablet.id,
            epoch: tablet.epoch,
        }),
        mutations: vec![put(key, "new")],
        collection: "kv".into(),
    };
    let request = pb::PrewriteRequest {
        request_id: request_id(100),
        start_ts: client.timestamp().await.expect("ts"),
        primary_collection: "kv".into(),
        primary_key: Bytes::from_static(b"a1"),
        ttl_ms: 3_000,
        tablets: vec![share(&left, "a1"), share(&right, "z1")],
        one_phase: true,
        commit_above: 0,
    };
    let response = server
        .prewrite(request)
        .await
        .expect("prewrite")
        .into_inner();
    let kind = response.error.and_then(|error| error.kind);
    assert!(
        matches!(kind, Some(Kind::EpochMismatch(_))),
        "{kind:?}\n{}",
        universe.logs()
    );
}

/// The first tablet of `app/kv`, and a group it does not belong to, to move it to.
async fn a_tablet_and_another_group(client: &Client) -> (luna_client::TabletInfo, u64) {
    let admin = client.admin();
    let tablet = admin.list_tablets("app", "kv").await.expect("tablets")[0].clone();
    let to_group = admin
        .list_groups()
        .await
        .expect("groups")
        .into_iter()
        .map(|group| group.id)
        .find(|&group| group != tablet.group_id)
        .expect("a second group");
    (tablet, to_group)
}

/// The value of `a1` in `app/kv`, read through the SDK.
async fn value_of_a1(client: &Client) -> Option<String> {
    let kv = client.database("app").collection("kv");
    text(kv.get("a1").await.expect("get"))
}

/// A raw write of `a1 = value` to `tablet`, as write `seq` of `client_id`, which is done
/// with every write below `done_below`.
fn raw_write(
    tablet: &luna_client::TabletInfo,
    client_id: &'static [u8; 16],
    (seq, done_below): (u64, u64),
    value: &str,
) -> pb::WriteRequest {
    pb::WriteRequest {
        tablet: Some(pb::TabletRef {
            tablet_id: tablet.id,
            epoch: tablet.epoch,
        }),
        request_id: Some(pb::RequestId {
            client_id: Bytes::from_static(client_id),
            seq,
            done_below,
        }),
        mutations: vec![put("a1", value)],
        commit_above: 0,
    }
}

/// A retry that reaches a tablet's new group after a move is answered with the outcome of
/// the write its old group applied, and not applied again: the handoff keeps the ids of
/// writes still in flight, which `done_below` says this one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_retried_after_its_tablet_moved_is_answered_and_not_applied_again() {
    let (universe, client) = with_two_tablets(Universe::start(3), 3).await;
    let admin = client.admin();
    let (tablet, to_group) = a_tablet_and_another_group(&client).await;
    let servers = raw_servers(&client).await;
    // The first write's answer is lost: it stays in flight, to be retried.
    let write = |tablet: &luna_client::TabletInfo, seq: u64, value: &str| {
        raw_write(tablet, b"retrying-client1", (seq, 1), value)
    };
    let first_ts = write_on_leader(&servers, write(&tablet, 1, "first")).await;
    write_on_leader(&servers, write(&tablet, 2, "second")).await;
    let moved = admin
        .move_tablet(tablet.id, to_group)
        .await
        .expect("move")
        .tablet;
    let retried_ts = write_on_leader(&servers, write(&moved, 1, "first")).await;
    assert_eq!(retried_ts, first_ts, "{}", universe.logs());
    assert_eq!(
        value_of_a1(&client).await,
        Some("second".into()),
        "the retry was applied again"
    );
}

/// A late copy of a write its client gave up on (and said so with its next write) is
/// refused, not applied over that next write, also by the group the tablet moved to: the
/// handoff carries what the client is done with.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_copy_of_a_write_its_client_gave_up_on_is_refused_after_a_move() {
    let (universe, client) = with_two_tablets(Universe::start(3), 3).await;
    let (tablet, to_group) = a_tablet_and_another_group(&client).await;
    let servers = raw_servers(&client).await;
    // The client gave up on write 1 (its copy is still in the network).
    let second = raw_write(&tablet, b"giving-up-client", (2, 2), "second");
    write_on_leader(&servers, second).await;
    let moved = client
        .admin()
        .move_tablet(tablet.id, to_group)
        .await
        .expect("move")
        .tablet;
    let late_copy = raw_write(&moved, b"giving-up-client", (1, 1), "first");
    let deadline = Instant::now() + Duration::from_secs(20);
    let refusal = 'leader: loop {
        for server in &servers {
            match server.clone().write(late_copy.clone()).await {
                Err(status) => break 'leader status,
                Ok(response) => {
                    let kind = response.into_inner().error.and_then(|error| error.kind);
                    assert!(
                        matches!(
                            kind,
                            Some(Kind::NotLeader(_)) | Some(Kind::TabletNotFound(_))
                        ),
                        "the late copy was not refused: {kind:?}\n{}",
                        universe.logs()
                    );
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader answered the late copy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        refusal.code(),
        tonic::Code::FailedPrecondition,
        "{refusal:?}"
    );
    assert!(
        refusal.message().contains("done with every write below 2"),
        "{refusal:?}"
    );
    assert_eq!(
        value_of_a1(&client).await,
        Some("second".into()),
        "the late copy was applied"
    );
}

/// A follower read right after an acknowledged write sees it, on every replica. Followers
/// learn the commit index only with the leader's next message (no broadcast per commit),
/// so it is the read's ReadIndex round that brings them up to date.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_read_right_after_a_write_sees_it_on_every_replica() {
    let (universe, client) = with_two_tablets(Universe::start(3), 3).await;
    let tablet = client
        .admin()
        .list_tablets("app", "kv")
        .await
        .expect("tablets")[0]
        .clone();
    let tablet_ref = pb::TabletRef {
        tablet_id: tablet.id,
        epoch: tablet.epoch,
    };
    let servers = raw_servers(&client).await;
    for round in 0..20u64 {
        let value = format!("v{round}");
        let write = pb::WriteRequest {
            tablet: Some(tablet_ref),
            request_id: request_id(100 + round),
            mutations: vec![put("a1", &value)],
            commit_above: 0,
        };
        write_on_leader(&servers, write).await;
        for (i, server) in servers.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(10);
            let response = loop {
                let response = server
                    .clone()
                    .get(pb::GetRequest {
                        tablet: Some(tablet_ref),
                        key: Bytes::from_static(b"a1"),
                        options: Some(pb::ReadOptions {
                            mode: pb::ReadMode::Follower as i32,
                            read_ts: 0,
                        }),
                    })
                    .await
                    .expect("get")
                    .into_inner();
                // A replica that has not opened the tablet yet says so; it never answers
                // with an older value.
                let not_open = matches!(
                    response.error.as_ref().and_then(|e| e.kind.as_ref()),
                    Some(Kind::TabletNotFound(_))
                );
                if !not_open || Instant::now() > deadline {
                    break response;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert!(response.error.is_none(), "server {i}: {:?}", response.error);
            assert_eq!(
                text(response.found.then_some(response.value)),
                Some(value.clone()),
                "server {i}, round {round}\n{}",
                universe.logs()
            );
        }
    }
}
