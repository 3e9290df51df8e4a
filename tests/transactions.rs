//! Transactions on a universe of real processes: snapshot reads, first-committer-wins
//! conflicts, one- and two-phase commits across collections and groups, rollback, a bank
//! whose total never changes under concurrent transfers and a killed group leader.
//! tests/txn_raw_protocol.rs has the locks of clients that died half-way and bad input,
//! tests/txn_killed_clients.rs the bank with client processes killed, and
//! tests/isolation.rs checks histories for snapshot isolation.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use luna_client::{ClientError, Collection, Database};
use support::history;
use support::load::{bank_universe, first_group_leader};

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
