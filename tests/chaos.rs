//! Runs the real `luna chaos`: a short run that meets every kind of fault (kill -9 and
//! restart of tablet servers and masters, SIGSTOP, raft partitions, object-store errors and
//! latency) under load, and must find the histories linearizable and every acknowledged
//! write present; and its answer to bad flags.

use std::process::Command;
use std::time::Duration;

mod support;

/// Every kind of fault, as the report names them.
const KINDS: [&str; 7] = [
    "kill-server",
    "kill-master",
    "pause-server",
    "pause-master",
    "partition-server",
    "partition-master",
    "object-store",
];

#[test]
fn a_short_chaos_run_meets_every_fault_and_finds_no_violation() {
    let seed = support::history::seed();
    let dir = tempfile::tempdir().expect("tempdir");
    // 45 s is one full round of the seven kinds even when one kill outlasts the repair
    // time (8 s + 5 s), so every kind is met.
    let output = support::output_within(
        Command::new(env!("CARGO_BIN_EXE_luna"))
            .args(["chaos", "--duration-secs", "45", "--repair-after-secs", "8"])
            .args(["--seed", &seed.to_string()])
            .arg("--dir")
            .arg(dir.path()),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "luna chaos failed (seed {seed}):\n{stdout}\n{stderr}"
    );
    let injected = stdout
        .lines()
        .find(|line| line.starts_with("chaos: faults injected:"))
        .unwrap_or_else(|| panic!("no fault summary:\n{stdout}"));
    for kind in KINDS {
        assert!(
            injected.contains(&format!("{kind} ")),
            "{kind} was never injected: {injected}"
        );
    }
    assert!(
        stdout.contains(": linearizable") && stdout.contains(", 0 missing"),
        "{stdout}"
    );
}

#[test]
fn chaos_refuses_too_few_servers() {
    let output = support::output_within(
        Command::new(env!("CARGO_BIN_EXE_luna")).args(["chaos", "--servers", "2"]),
        Duration::from_secs(30),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--servers 3 or more"), "{stderr}");
}
