//! The bank invariant while client processes die mid-transaction: `luna bench txn` runs
//! transfers between accounts of two collections (several groups, two-phase commits), and
//! is SIGKILLed at a random moment, again and again. Whatever it left locked (prewritten but
//! not committed, or committed at the primary only) is resolved by the readers that follow:
//! the total of every snapshot stays what it was, and no balance goes negative.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use support::load::{BENCH_ACCOUNTS, BENCH_OPENING_BALANCE, bench_balances, bench_txn};
use support::{Universe, history, output_within};

const ROUNDS: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_total_holds_while_clients_die_between_prewrite_and_commit() {
    let universe = Universe::start(3);
    let client = universe.client().await;
    universe.wait_servers_up(&client, 3).await;
    // A first run that ends normally opens the accounts.
    let opened = output_within(&mut bench_txn(&universe, "1"), Duration::from_secs(120));
    assert!(
        opened.status.success(),
        "the first run failed: {}",
        String::from_utf8_lossy(&opened.stderr)
    );
    let expected = 2 * BENCH_ACCOUNTS as i64 * BENCH_OPENING_BALANCE;
    assert_eq!(bench_balances(&client).await.iter().sum::<i64>(), expected);

    let mut seed = history::seed();
    let mut left_locked = 0;
    for round in 0..ROUNDS {
        let mut child = bench_txn(&universe, "120")
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
        let all = bench_balances(&client).await;
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
