//! `luna bench storage` against a real S3 protocol server (s3s, in this test
//! process, on loopback), configured only through the CLI's S3 flags.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use luna_kernel::testing::S3TestServer;

#[test]
fn bench_storage_runs_on_s3_through_cli_flags() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime.block_on(S3TestServer::start("luna-bench")).unwrap();
    let options = server.options();
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_luna"))
        .args([
            "bench",
            "storage",
            "--num",
            "2000",
            "--memtable-size",
            "65536",
            "--json",
        ])
        .args(["--object-store", &server.url("bench")])
        .args(["--s3-endpoint", &server.endpoint()])
        .args(["--s3-region", options.region.as_deref().unwrap()])
        .args([
            "--s3-access-key-id",
            options.access_key_id.as_deref().unwrap(),
        ])
        .args([
            "--s3-secret-access-key",
            options.secret_access_key.as_deref().unwrap(),
        ])
        .arg("--s3-allow-http")
        .arg("--data-dir")
        .arg(data_dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn luna");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("luna bench on S3 ran longer than 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let reports: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(reports.len(), 5);
    assert!(
        reports[0]["object_store_puts"].as_u64().unwrap() >= 1,
        "tables went to S3"
    );
    let read = &reports[4];
    assert_eq!(read["workload"], "readrandom");
    assert!(read["found"].as_u64().unwrap() > 0, "{read}");
    // Nothing was written to the local data directory's object store.
    assert!(!data_dir.path().join("objects").exists());
    drop(server);
}
