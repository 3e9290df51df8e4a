//! Runs the real `luna` binary: `luna start` on free loopback ports, then
//! `luna bench ycsb` and `luna bench txn` against it, end to end.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod support;

/// The `luna start` child; killed and reaped when dropped, also when a test panics.
struct Universe {
    child: Child,
    master: String,
}

impl Drop for Universe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether every port `luna start` would take from these bases is free now: the master at
/// `master`, tablet services at +1..+3, journals at +11..+13, HTTP at `http`..+3.
fn ports_free(master: u16, http: u16) -> bool {
    let mut ports: Vec<u16> = (0..=3).map(|i| master + i).collect();
    ports.extend((11..=13).map(|i| master + i));
    ports.extend((0..=3).map(|i| http + i));
    ports
        .iter()
        .all(|port| TcpListener::bind(("127.0.0.1", *port)).is_ok())
}

/// A base port the OS just handed out, so probably not in use by anyone else.
fn some_free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Starts `luna start` on free ports and waits until it lists 3 live tablet servers;
/// tries other ports if the start fails (another process may take a port in between).
fn start_universe(data_dir: &Path) -> Universe {
    for _attempt in 0..5 {
        let master = some_free_port();
        let http = some_free_port();
        if master > 65_000 || http > 65_000 || master.abs_diff(http) < 16 {
            continue;
        }
        if !ports_free(master, http) {
            continue;
        }
        let child = Command::new(env!("CARGO_BIN_EXE_luna"))
            .args(["start", "--master-addr"])
            .arg(format!("127.0.0.1:{master}"))
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{http}"))
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("LUNA_OBJECT_STORE")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn luna start");
        let mut universe = Universe {
            child,
            master: format!("127.0.0.1:{master}"),
        };
        if wait_for_servers(&mut universe, 3, Duration::from_secs(30)) {
            return universe;
        }
        // Dropping kills this attempt before the next one.
    }
    panic!("luna start did not come up with 3 servers on free ports in 5 attempts");
}

/// Polls `luna servers --json` until `count` servers are up; false if `luna start` exits
/// or the time runs out.
fn wait_for_servers(universe: &mut Universe, count: usize, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if universe
            .child
            .try_wait()
            .expect("poll luna start")
            .is_some()
        {
            return false;
        }
        let output = luna(
            &["servers", "--json", "--master", &universe.master],
            Duration::from_secs(10),
        );
        if output.status.success() {
            let stdout = String::from_utf8_lossy(&output.stdout);
            if stdout.matches("\"up\"").count() >= count {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Runs `luna` with `args`, killing it if it outlives `limit`.
fn luna(args: &[&str], limit: Duration) -> Output {
    support::output_within(
        Command::new(env!("CARGO_BIN_EXE_luna"))
            .args(args)
            .env_remove("LUNA_MASTER"),
        limit,
    )
}

#[test]
fn bench_ycsb_runs_load_a_and_c_against_a_real_universe() {
    let dir = tempfile::tempdir().unwrap();
    let universe = start_universe(dir.path());
    let output = luna(
        &[
            "bench",
            "ycsb",
            "--workloads",
            "load,a,c",
            "--records",
            "200",
            "--operations",
            "500",
            "--threads",
            "8",
            "--json",
            "--master",
            &universe.master,
        ],
        Duration::from_secs(60),
    );
    let reports = support::json_reports(&output);
    let names: Vec<&str> = reports
        .iter()
        .map(|r| r["workload"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["load", "a", "c"]);
    for report in &reports {
        assert_eq!(report["errors"], 0, "errors in {report}");
        assert!(report["ops_per_sec"].as_f64().unwrap() > 0.0, "{report}");
        let kinds = report["kinds"].as_object().unwrap();
        let kind_ops: u64 = kinds.values().map(|k| k["ops"].as_u64().unwrap()).sum();
        assert_eq!(report["ops"].as_u64().unwrap(), kind_ops, "{report}");
        for (kind, entry) in kinds {
            assert!(
                entry["ops_per_sec"].as_f64().unwrap() > 0.0,
                "{kind}: {entry}"
            );
            for field in ["p50_us", "p95_us", "p99_us", "max_us"] {
                assert!(
                    entry[field].as_f64().unwrap() > 0.0,
                    "{kind}.{field}: {entry}"
                );
            }
            assert!(entry["p50_us"].as_f64() <= entry["p99_us"].as_f64());
        }
    }
    let (load, a, c) = (&reports[0], &reports[1], &reports[2]);
    assert_eq!(load["ops"], 200);
    assert_eq!(load["kinds"]["insert"]["ops"], 200);
    assert_eq!(a["ops"], 500);
    let (reads, updates) = (
        a["kinds"]["read"]["ops"].as_u64().unwrap(),
        a["kinds"]["update"]["ops"].as_u64().unwrap(),
    );
    assert_eq!(reads + updates, 500);
    // 50/50 within a generous margin for 500 draws.
    assert!((150..=350).contains(&reads), "A read {reads} of 500");
    assert_eq!(c["ops"], 500);
    assert_eq!(c["kinds"]["read"]["ops"], 500);
    // Every key was loaded, so every read finds its value.
    assert_eq!(c["kinds"]["read"]["not_found"], 0);
    assert_eq!(a["kinds"]["read"]["not_found"], 0);
    drop(universe);
}

#[test]
fn bench_txn_reports_every_mode_with_commits_and_no_errors() {
    let dir = tempfile::tempdir().unwrap();
    let universe = start_universe(dir.path());
    let output = luna(
        &[
            "bench",
            "txn",
            "--accounts",
            "50",
            "--clients",
            "4",
            "--duration-secs",
            "2",
            "--json",
            "--master",
            &universe.master,
        ],
        Duration::from_secs(120),
    );
    let reports = support::json_reports(&output);
    let modes: Vec<&str> = reports
        .iter()
        .map(|r| r["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["put", "one-group", "two-group", "transfer"]);
    for report in &reports {
        assert_eq!(report["errors"], 0, "errors in {report}");
        assert!(report["committed"].as_u64().unwrap() > 0, "{report}");
        assert!(
            report["p50_us"].as_f64() <= report["p99_us"].as_f64(),
            "{report}"
        );
    }
    assert_eq!(reports[0]["aborted"], 0, "plain puts never conflict");
    drop(universe);
}

#[test]
fn bench_ycsb_rejects_bad_flags_without_a_universe() {
    let output = luna(
        &[
            "bench",
            "ycsb",
            "--workloads",
            "e",
            "--partitioning",
            "hash",
        ],
        Duration::from_secs(10),
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("range"));
    let output = luna(
        &["bench", "ycsb", "--records", "1000000", "--key-size", "8"],
        Duration::from_secs(10),
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--key-size"));
}
