//! The bank invariant while client processes die mid-transaction: `luna bench txn` runs
//! transfers between accounts of two collections (several groups, two-phase commits), and
//! is SIGKILLed at a random moment, again and again. Whatever it left locked (prewritten but
//! not committed, or committed at the primary only) is resolved by the readers that follow:
//! the total of every snapshot stays what it was, and no balance goes negative.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use luna_client::{Collection, Database};
use support::{Universe, history, output_within};

const ACCOUNTS: u64 = 40;
const OPENING_BALANCE: i64 = 1_000;
const ROUNDS: usize = 5;

fn bench(universe: &Universe, duration_secs: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_luna"));
    command
        .args(["bench", "txn", "--modes", "transfer", "--database", "bank"])
        .args(["--accounts", &ACCOUNTS.to_string(), "--clients", "8"])
        .args(["--tablets", "2", "--duration-secs", duration_secs])
        .args(["--master", &universe.master_addr])
        .env_remove("LUNA_MASTER");
    command
}

fn balance(value: &Bytes) -> i64 {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("{value:?} is not a balance"))
}

/// Every account's balance in one snapshot (reads resolve the locks they meet).
async fn balances(db: &Database, collections: &[Collection; 2]) -> Vec<i64> {
    let txn = db.begin().await.expect("begin");
    let mut all = Vec::new();
    for collection in collections {
        let pairs = txn
            .scan(collection, &b"acct-"[..]..&b"acct."[..], 1000)
            .await
            .expect("scan the accounts");
        assert_eq!(pairs.len() as u64, ACCOUNTS, "every account is there");
        all.extend(pairs.iter().map(|(_, value)| balance(value)));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_holds_while_clients_die_between_prewrite_and_commit() {
    let universe = Universe::start(3);
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;
    // A first run that ends normally opens the accounts.
    let opened = output_within(&mut bench(&universe, "1"), Duration::from_secs(120));
    assert!(
        opened.status.success(),
        "the first run failed: {}",
        String::from_utf8_lossy(&opened.stderr)
    );
    let db = client.database("bank");
    let collections = [db.collection("checking"), db.collection("savings")];
    let expected = 2 * ACCOUNTS as i64 * OPENING_BALANCE;
    assert_eq!(
        balances(&db, &collections).await.iter().sum::<i64>(),
        expected
    );

    let mut seed = history::seed();
    let mut left_locked = 0;
    for round in 0..ROUNDS {
        let mut child = bench(&universe, "120")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn luna bench txn");
        // 1.5 to 3.5 s in: transfers are under way (connecting takes well under a second).
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let lifetime = Duration::from_millis(1500 + (seed >> 33) % 2000);
        tokio::time::sleep(lifetime).await;
        let _ = child.kill();
        let _ = child.wait();
        let locks = universe.server_gauge_sum("luna_group_txn_locks");
        left_locked += locks;
        let started = Instant::now();
        let all = balances(&db, &collections).await;
        assert_eq!(
            all.iter().sum::<i64>(),
            expected,
            "round {round}: the client died after {lifetime:?} with {locks} keys locked"
        );
        assert!(
            all.iter().all(|&balance| balance >= 0),
            "round {round}: a balance went negative: {all:?}"
        );
        println!(
            "round {round}: killed after {lifetime:?}, {locks} keys were locked, read back in {:?}",
            started.elapsed()
        );
    }
    assert!(
        left_locked > 0,
        "no kill caught a transaction half-way: the test exercised nothing"
    );
}
