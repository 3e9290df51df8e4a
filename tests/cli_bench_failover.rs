//! Runs the real `luna` binary: `luna bench failover` end to end (one round: its own six
//! processes, two kills, two restarts), and its answer to bad flags.

use std::process::Command;
use std::time::Duration;

mod support;

#[test]
fn bench_failover_kills_both_leaders_and_reports_the_gaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = support::output_within(
        Command::new(env!("CARGO_BIN_EXE_luna"))
            .args([
                "bench",
                "failover",
                "--rounds",
                "1",
                "--writers",
                "4",
                "--json",
            ])
            .arg("--dir")
            .arg(dir.path()),
        Duration::from_secs(240),
    );
    let reports = support::json_reports(&output);
    let kills: Vec<&str> = reports
        .iter()
        .map(|report| report["kill"].as_str().expect("kill"))
        .collect();
    assert_eq!(kills, ["group_leader", "master_leader"]);
    for report in &reports {
        let gaps = report["write_gaps_ms"].as_array().expect("write gaps");
        assert_eq!(gaps.len(), 1, "one round: {report}");
        let timestamp_gaps = report["timestamp_gaps_ms"].as_array().expect("gaps");
        assert_eq!(timestamp_gaps.len(), 1, "{report}");
    }
    // Killing the group leader stops writes for at least an election; killing the master
    // leader stops timestamps likewise. (How long is the benchmark's business, not this
    // test's: the floor only shows the kills hit the leaders.)
    let gap = |kill: usize, field: &str| reports[kill][field].as_f64().expect("a gap");
    assert!(gap(0, "median_write_gap_ms") >= 100.0, "{}", reports[0]);
    assert!(gap(1, "median_timestamp_gap_ms") >= 100.0, "{}", reports[1]);
    // The given directory keeps every process's log.
    for log in ["master-0.log", "server-0.log"] {
        assert!(dir.path().join(log).exists(), "{log} is missing");
    }
}

#[test]
fn bench_failover_rejects_zero_rounds() {
    let output = support::output_within(
        Command::new(env!("CARGO_BIN_EXE_luna")).args(["bench", "failover", "--rounds", "0"]),
        Duration::from_secs(30),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--rounds"), "{stderr}");
}
