//! Runs the real `luna` binary: `luna bench storage` end to end, and its
//! answers to bad flags.

use std::process::{Command, Output};
use std::time::Duration;

mod support;

/// Runs `luna` with `args` on `data_dir`, killing it if it outlives `limit`.
fn luna(args: &[&str], data_dir: &std::path::Path, limit: Duration) -> Output {
    support::output_within(
        Command::new(env!("CARGO_BIN_EXE_luna"))
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("LUNA_OBJECT_STORE"),
        limit,
    )
}

#[test]
fn bench_storage_reports_every_workload_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let output = luna(
        &[
            "bench",
            "storage",
            "--num",
            "3000",
            "--threads",
            "2",
            "--memtable-size",
            "65536",
            "--json",
        ],
        dir.path(),
        Duration::from_secs(120),
    );
    let reports = support::json_reports(&output);
    let names: Vec<&str> = reports
        .iter()
        .map(|r| r["workload"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "fillseq",
            "fillrandom",
            "overwrite",
            "readseq",
            "readrandom"
        ]
    );
    for report in &reports {
        for field in [
            "ops",
            "seconds",
            "ops_per_sec",
            "p50_us",
            "p99_us",
            "object_store_puts",
            "object_store_gets",
            "bytes_written",
        ] {
            assert!(report[field].is_number(), "{field} missing in {report}");
        }
        assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
    }
    assert!(
        reports[0]["object_store_puts"].as_u64().unwrap() >= 1,
        "a fill writes tables"
    );
    assert!(
        reports[0]["bytes_written"].as_u64().unwrap() > 3000 * 100,
        "fillseq wrote its values"
    );
    // readseq after fillrandom + overwrite sees exactly the distinct keys written.
    let found_seq = reports[3]["found"].as_u64().unwrap();
    assert!(found_seq > 0 && found_seq <= 3000, "{found_seq}");
    assert_eq!(reports[3]["ops"].as_u64().unwrap(), found_seq);
    // The benchmark cleans up after itself.
    let leftover = walk(&dir.path().join("objects"));
    assert_eq!(leftover, 0, "benchmark objects left behind");
}

fn walk(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| {
            if entry.path().is_dir() {
                walk(&entry.path())
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn bad_flags_get_a_clear_error_and_a_failing_exit() {
    let dir = tempfile::tempdir().unwrap();
    let output = luna(
        &["bench", "storage", "--num", "100000", "--key-size", "3"],
        dir.path(),
        Duration::from_secs(30),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: --key-size must be between 6"),
        "{stderr}"
    );

    let output = luna(
        &["bench", "storage", "--object-store", "ftp://nowhere"],
        dir.path(),
        Duration::from_secs(30),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("error:") && stderr.contains("ftp"),
        "{stderr}"
    );
}
