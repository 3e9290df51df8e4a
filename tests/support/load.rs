//! Write load for tests that kill processes: writers that record every acknowledged write,
//! and the check that each one is still there at the end.

use std::process::Command;
use std::time::{Duration, Instant};

use luna_client::{Client, Collection, CollectionSpec, Database};

use super::Universe;

/// `masters` master processes, three tablet servers, and database `app` with one led
/// collection `name`.
pub async fn with_collection(
    masters: usize,
    name: &str,
    spec: CollectionSpec,
) -> (Universe, Client, Collection) {
    let universe = Universe::start_with_masters(masters, 3);
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;
    client.admin().create_database("app").await.expect("db");
    client
        .admin()
        .create_collection("app", name, spec)
        .await
        .expect("collection");
    wait_led(&client, "app", name).await;
    let collection = client.database("app").collection(name);
    (universe, client, collection)
}

/// Database `app` and its collection `kv` in `universe` (with `servers` tablet servers),
/// range-partitioned into two tablets at "m", once both have a leader.
pub async fn with_two_tablets(universe: Universe, servers: usize) -> (Universe, Client) {
    let client = universe.client().await;
    universe.wait_servers_up(&client, servers).await;
    let admin = client.admin();
    admin.create_database("app").await.expect("db");
    admin
        .create_collection("app", "kv", CollectionSpec::range().split_keys(["m"]))
        .await
        .expect("collection");
    wait_led(&client, "app", "kv").await;
    (universe, client)
}

/// The group of the collection's first tablet, and the server the master names as its
/// leader, once it names one: right after an election or a handover it reports none until
/// the new leader's next heartbeat.
pub async fn first_group_leader(client: &Client, database: &str, collection: &str) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tablets = client
            .admin()
            .list_tablets(database, collection)
            .await
            .expect("tablets");
        let groups = client.admin().list_groups().await.expect("groups");
        let group_id = tablets.first().expect("a tablet").group_id;
        let leader = groups
            .iter()
            .find(|group| group.id == group_id)
            .map_or(0, |group| group.leader_server_id);
        if leader != 0 {
            return (group_id, leader);
        }
        assert!(
            Instant::now() < deadline,
            "the master never named a leader of group {group_id}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every tablet of the collection has a leader in the routing table.
pub async fn wait_led(client: &Client, database: &str, collection: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let groups = client.admin().list_groups().await.unwrap_or_default();
        let tablets = client
            .admin()
            .list_tablets(database, collection)
            .await
            .unwrap_or_default();
        let led = !tablets.is_empty()
            && tablets.iter().all(|tablet| {
                groups
                    .iter()
                    .any(|group| group.id == tablet.group_id && group.leader_server_id != 0)
            });
        if led {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{database}/{collection} never got leaders"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[path = "../../src/chaos/writes.rs"]
mod checked;

/// Writers of distinct keys (`luna chaos`'s, in src/chaos/writes.rs) that fail the test when
/// writes stop or an acknowledged one is lost.
pub struct Writers(checked::Writers);

impl Writers {
    /// Starts `writers` tasks putting to `collection`.
    pub fn spawn(collection: &Collection, writers: usize) -> Writers {
        Writers(checked::Writers::spawn(collection, writers))
    }

    /// Writes acknowledged so far.
    pub fn count(&self) -> usize {
        self.0.count()
    }

    /// Waits until `more` writes beyond the current count are acknowledged.
    pub async fn wait_progress(&self, more: usize, what: &str) {
        let progressed = self.0.wait_progress(more, Duration::from_secs(30)).await;
        assert!(progressed, "writes did not continue {what}");
    }

    /// Stops the writers and checks that every acknowledged write reads back; `logs` are
    /// printed with a failure.
    pub async fn stop_and_check(self, logs: impl FnOnce() -> String) {
        let check = self.0.stop_and_check().await;
        assert!(
            check.missing.is_empty(),
            "{} of {} acknowledged writes are missing or wrong: {:?}\n{}",
            check.missing.len(),
            check.acked,
            &check.missing[..check.missing.len().min(10)],
            logs()
        );
    }
}

/// Asserts that `tablets` (in routing-key order) chain from the first key to the end of the
/// key space, without gaps or overlaps.
pub fn assert_covering(tablets: &[luna_client::TabletInfo]) {
    let mut next: Option<Vec<u8>> = Some(Vec::new());
    for tablet in tablets {
        let range = tablet.range.clone().expect("a range");
        assert_eq!(
            Some(range.start.clone()),
            next,
            "a gap or overlap: {tablets:?}"
        );
        next = range.end;
    }
    assert_eq!(next, None, "the last tablet ends early: {tablets:?}");
}

/// Three tablet servers and database `bank` with collections `checking` (hash, 3 tablets)
/// and `savings` (range, split at `m`), both led.
pub async fn bank_universe() -> (Universe, Client, Database, Collection, Collection) {
    bank_universe_with(&[]).await
}

/// [`bank_universe`] with more flags for the master.
pub async fn bank_universe_with(
    master_flags: &[&str],
) -> (Universe, Client, Database, Collection, Collection) {
    let universe = Universe::start_with_master_flags(1, 3, 300, master_flags);
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;
    let admin = client.admin();
    admin.create_database("bank").await.expect("db");
    admin
        .create_collection("bank", "checking", CollectionSpec::hash(3))
        .await
        .expect("checking");
    admin
        .create_collection("bank", "savings", CollectionSpec::range().split_keys(["m"]))
        .await
        .expect("savings");
    wait_led(&client, "bank", "checking").await;
    wait_led(&client, "bank", "savings").await;
    let db = client.database("bank");
    let checking = db.collection("checking");
    let savings = db.collection("savings");
    (universe, client, db, checking, savings)
}

/// Accounts in each of `luna bench txn`'s two collections, as [`bench_txn`] runs it.
pub const BENCH_ACCOUNTS: usize = 40;
/// An account's opening balance in `luna bench txn`.
pub const BENCH_OPENING_BALANCE: i64 = 1_000;

/// `luna bench txn` moving money between [`BENCH_ACCOUNTS`] accounts of database `bank`'s
/// collections `checking` and `savings` (two tablets each), with 8 clients, for
/// `duration_secs`, reporting JSON.
pub fn bench_txn(universe: &Universe, duration_secs: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_luna"));
    command
        .args(["bench", "txn", "--modes", "transfer", "--database", "bank"])
        .args(["--accounts", &BENCH_ACCOUNTS.to_string(), "--clients", "8"])
        .args(["--tablets", "2", "--duration-secs", duration_secs, "--json"])
        .args(["--master", &universe.master_addr])
        .env_remove("LUNA_MASTER");
    command
}

/// Every account's balance of [`bench_txn`]'s collections in one snapshot (reads resolve
/// the locks they meet).
pub async fn bench_balances(client: &Client) -> Vec<i64> {
    let db = client.database("bank");
    let txn = db.begin().await.expect("begin");
    let mut all = Vec::new();
    for name in ["checking", "savings"] {
        let pairs = txn
            .scan(&db.collection(name), &b"acct-"[..]..&b"acct."[..], 1000)
            .await
            .expect("scan the accounts");
        assert_eq!(pairs.len(), BENCH_ACCOUNTS, "every account is there");
        all.extend(pairs.iter().map(|(_, value)| {
            std::str::from_utf8(value)
                .ok()
                .and_then(|text| text.parse::<i64>().ok())
                .unwrap_or_else(|| panic!("{value:?} is not a balance"))
        }));
    }
    all
}
