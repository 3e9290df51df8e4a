//! Transactions on a universe of real processes: snapshot reads, first-committer-wins
//! conflicts, one- and two-phase commits across collections and groups, rollback, a bank
//! whose total never changes under concurrent transfers and a killed group leader, and the
//! locks of a client that died between prewrite and commit, resolved through the primary by
//! a reader. tests/isolation.rs checks histories for snapshot isolation.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use luna_client::{Client, ClientError, Collection, CollectionSpec, Database};
use luna_proto::tablet::tablet_client::TabletClient;
use luna_proto::tablet::{self as pb, tablet_error::Kind};
use support::Universe;
use support::history;
use support::load::{bank_universe, first_group_leader, wait_led};
use tonic::transport::Channel;

fn text(value: Option<Bytes>) -> Option<String> {
    value.map(|value| String::from_utf8_lossy(&value).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactions_read_a_snapshot_and_the_first_committer_wins() {
    let (_universe, client, db, checking, savings) = bank_universe().await;

    // Two collections, several groups: a two-phase commit, visible to plain reads.
    let mut txn = db.begin().await.expect("begin");
    txn.put(&checking, "alice", "10").expect("put");
    txn.put(&savings, "alice", "20").expect("put");
    txn.put(&savings, "zed", "30").expect("put");
    assert_eq!(
        text(txn.get(&savings, "alice").await.expect("own write")),
        Some("20".into()),
        "a transaction reads its own writes"
    );
    let commit_ts = txn.commit().await.expect("commit");
    assert!(commit_ts > txn.start_ts());
    assert_eq!(
        text(checking.get("alice").await.expect("get")),
        Some("10".into())
    );
    assert_eq!(
        text(savings.get("zed").await.expect("get")),
        Some("30".into())
    );
    assert!(matches!(
        txn.commit().await,
        Err(ClientError::TxnFinished { .. })
    ));

    // A snapshot does not see what commits after it starts.
    let reader = db.begin().await.expect("begin");
    savings.put("alice", "21").await.expect("plain put");
    assert_eq!(
        text(reader.get(&savings, "alice").await.expect("snapshot read")),
        Some("20".into())
    );
    let scanned = reader.scan(&savings, .."n", 10).await.expect("scan");
    assert_eq!(
        scanned,
        vec![(Bytes::from("alice"), Bytes::from("20"))],
        "a scan reads the snapshot too"
    );

    // Two writers of one key: the first to commit wins, the other gets a typed conflict.
    let mut first = db.begin().await.expect("begin");
    let mut second = db.begin().await.expect("begin");
    first.put(&checking, "bob", "1").expect("put");
    second.put(&checking, "bob", "2").expect("put");
    second.put(&savings, "bob", "2").expect("put");
    first.commit().await.expect("first commit");
    let lost = second.commit().await;
    assert!(
        matches!(lost, Err(ClientError::Conflict { .. })),
        "{lost:?}"
    );
    assert!(lost.is_err_and(|error| error.is_retryable()));
    assert_eq!(
        text(checking.get("bob").await.expect("get")),
        Some("1".into())
    );
    assert_eq!(
        savings.get("bob").await.expect("get"),
        None,
        "the loser wrote nothing"
    );

    // One key: a one-phase commit. Rollback writes nothing.
    let mut one = db.begin().await.expect("begin");
    one.put(&checking, "carol", "5").expect("put");
    let one_ts = one.commit().await.expect("1pc");
    assert!(one_ts > one.start_ts());
    let after = db.begin().await.expect("begin");
    assert!(
        after.start_ts() > one_ts,
        "a transaction begun after a commit reads it: {} <= {one_ts}",
        after.start_ts()
    );
    let mut undone = db.begin().await.expect("begin");
    undone.put(&checking, "dave", "9").expect("put");
    undone.rollback().expect("rollback");
    assert_eq!(checking.get("dave").await.expect("get"), None);

    // A transaction belongs to one database.
    let other = client.database("other").collection("c");
    let mut txn = db.begin().await.expect("begin");
    assert!(matches!(
        txn.put(&other, "k", "v"),
        Err(ClientError::CrossDatabase { .. })
    ));
    let read_only = db.read_only_at(one_ts);
    assert_eq!(
        text(read_only.get(&checking, "carol").await.expect("read")),
        Some("5".into())
    );

    // A two-phase commit lands above every read a prewritten group served of its keys,
    // not only above the primary's group's clock: a snapshot read 5 s ahead of the clock
    // on the secondary's group stays repeatable.
    let tablets = client
        .admin()
        .list_tablets("bank", "savings")
        .await
        .expect("tablets");
    assert_ne!(tablets[0].group_id, tablets[1].group_id, "{tablets:?}");
    let mut writer = db.begin().await.expect("begin");
    let ahead = client.timestamp().await.expect("ts") + (5_000 << 18);
    let reader = db.read_only_at(ahead);
    assert_eq!(reader.get(&savings, "zz").await.expect("read ahead"), None);
    writer.put(&savings, "aa", "1").expect("put");
    writer.put(&savings, "zz", "1").expect("put");
    let commit_ts = writer.commit().await.expect("commit");
    assert!(
        commit_ts > ahead,
        "committed at {commit_ts}, at or below a read served at {ahead}"
    );
    assert_eq!(
        reader.get(&savings, "zz").await.expect("read again"),
        None,
        "the read ahead is repeatable"
    );
}

/// Sum of every account, read in one snapshot.
async fn total(db: &Database, accounts: &[(Collection, String)]) -> i64 {
    let snapshot = db.begin().await.expect("begin");
    let mut sum = 0;
    for (collection, key) in accounts {
        let value = snapshot.get(collection, key).await.expect("read balance");
        let balance: i64 = text(value)
            .and_then(|value| value.parse().ok())
            .expect("a balance");
        assert!(balance >= 0, "{key} went negative: {balance}");
        sum += balance;
    }
    sum
}

/// Concurrent transfers between accounts of two collections (several tablets and groups),
/// while the leader of a group holding accounts is killed -9 and restarted: snapshots always
/// see the same total, and no balance goes negative.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transfers_never_change_the_total() {
    let (mut universe, client, db, checking, savings) = bank_universe().await;
    let accounts: Vec<(Collection, String)> = (0..24)
        .map(|i| {
            let collection = if i % 2 == 0 { &checking } else { &savings };
            let key = if i % 3 == 0 {
                format!("a{i:02}")
            } else {
                format!("z{i:02}")
            };
            (collection.clone(), key)
        })
        .collect();
    let accounts = Arc::new(accounts);
    db.transaction(|txn| {
        let accounts = accounts.clone();
        Box::pin(async move {
            for (collection, key) in accounts.iter() {
                txn.put(collection, key.clone(), "100")?;
            }
            Ok(())
        })
    })
    .await
    .expect("open the accounts");
    let expected = 100 * accounts.len() as i64;
    assert_eq!(total(&db, &accounts).await, expected);

    let stop = Arc::new(AtomicBool::new(false));
    let transfers = Arc::new(AtomicU64::new(0));
    let seed = history::seed();
    let mut tasks = Vec::new();
    for worker in 0..6u64 {
        let (db, accounts, stop, transfers) = (
            db.clone(),
            accounts.clone(),
            stop.clone(),
            transfers.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut state = seed ^ (worker + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            while !stop.load(Ordering::Relaxed) {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                let from = (state >> 33) as usize % accounts.len();
                let to =
                    (from + 1 + (state >> 13) as usize % (accounts.len() - 1)) % accounts.len();
                let amount = 1 + (state >> 7) as i64 % 30;
                let done = db
                    .transaction(|txn| {
                        let accounts = accounts.clone();
                        Box::pin(async move {
                            let (from_collection, from_key) = &accounts[from];
                            let (to_collection, to_key) = &accounts[to];
                            let from_balance = balance(txn.get(from_collection, from_key).await?)?;
                            let to_balance = balance(txn.get(to_collection, to_key).await?)?;
                            if from_balance < amount {
                                return Ok(false);
                            }
                            txn.put(
                                from_collection,
                                from_key.clone(),
                                (from_balance - amount).to_string(),
                            )?;
                            txn.put(
                                to_collection,
                                to_key.clone(),
                                (to_balance + amount).to_string(),
                            )?;
                            Ok(true)
                        })
                    })
                    .await;
                match done {
                    Ok((true, _)) => {
                        transfers.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((false, _)) => {}
                    Err(error) if error.is_conflict() => {}
                    // While a leader is down, a commit may time out or lose its answer:
                    // either way it is all or nothing, which the totals check.
                    Err(error)
                        if error.is_retryable()
                            || matches!(error, ClientError::OutcomeUnknown { .. }) => {}
                    Err(error) => panic!("transfer failed (seed {seed}): {error}"),
                }
            }
        }));
    }
    let mut checks = 0;
    let mut check_for = async |duration: Duration| {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            assert_eq!(total(&db, &accounts).await, expected, "seed {seed}");
            checks += 1;
        }
    };
    check_for(Duration::from_secs(3)).await;
    let (group, leader) = first_group_leader(&client, "bank", "checking").await;
    let victim = universe.index_of(leader);
    println!("killing server {leader}, the leader of group {group}");
    universe.kill_server(victim);
    check_for(Duration::from_secs(3)).await;
    universe.restart_server(victim);
    check_for(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("transfer task");
    }
    assert_eq!(total(&db, &accounts).await, expected, "seed {seed}");
    let transfers = transfers.load(Ordering::Relaxed);
    println!("{transfers} transfers, {checks} snapshot checks");
    assert!(
        transfers > 20,
        "too few transfers went through: {transfers}"
    );
}

fn balance(value: Option<Bytes>) -> Result<i64, ClientError> {
    text(value)
        .and_then(|value| value.parse().ok())
        .ok_or_else(|| ClientError::Protocol {
            message: "not a balance".into(),
        })
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

/// Sends `request` to each server until one leads the tablet's group.
async fn prewrite_on_leader(
    servers: &mut [TabletClient<Channel>],
    request: pb::PrewriteRequest,
) -> pb::PrewriteResponse {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for server in servers.iter_mut() {
            let response = server
                .prewrite(request.clone())
                .await
                .expect("prewrite")
                .into_inner();
            match response
                .error
                .as_ref()
                .and_then(|error| error.kind.as_ref())
            {
                Some(Kind::NotLeader(_)) | Some(Kind::TabletNotFound(_)) => {}
                _ => return response,
            }
        }
        assert!(Instant::now() < deadline, "no leader took the prewrite");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn resolve_on_leader(servers: &mut [TabletClient<Channel>], request: pb::ResolveRequest) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for server in servers.iter_mut() {
            let response = server
                .resolve(request.clone())
                .await
                .expect("resolve")
                .into_inner();
            match response.error.and_then(|error| error.kind) {
                Some(Kind::NotLeader(_)) | Some(Kind::TabletNotFound(_)) => {}
                None => return,
                Some(other) => panic!("resolve failed: {other:?}"),
            }
        }
        assert!(Instant::now() < deadline, "no leader took the commit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_clients_locks_are_resolved_through_its_primary() {
    let universe = Universe::start(3);
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;
    let admin = client.admin();
    admin.create_database("app").await.expect("db");
    admin
        .create_collection("app", "kv", CollectionSpec::range().split_keys(["m"]))
        .await
        .expect("collection");
    wait_led(&client, "app", "kv").await;
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
        let response = prewrite_on_leader(&mut servers, request).await;
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
        &mut servers,
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
    let locked = prewrite_on_leader(&mut servers, secondary).await;
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
    let decided = prewrite_on_leader(&mut servers, deciding.clone()).await;
    assert!(decided.error.is_none(), "{:?}", decided.error);
    assert!(decided.commit_ts > commit_above);
    // Sent again under another request id (past deduplication), it answers the same.
    let again = prewrite_on_leader(
        &mut servers,
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
        let response = prewrite_on_leader(&mut servers, request).await;
        assert!(response.error.is_none(), "{:?}", response.error);
    }
    let commit_ts = client.timestamp().await.expect("ts");
    resolve_on_leader(
        &mut servers,
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
