//! Kills a real `luna` process with SIGKILL in the middle of flushes and
//! compactions, then reopens what it left: the manifest must load, every
//! table it references must be readable (no dangling references), and
//! garbage collection must remove the orphans.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use luna_storage::{BaseStore, BaseStoreOptions, Direction, KeyRange, ScanRequest};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;

fn kill_bench_after(data_dir: &std::path::Path, delay: Duration) -> u32 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_luna"))
        .args([
            "bench",
            "storage",
            "--num",
            "3000000",
            "--memtable-size",
            "262144",
            "--json",
            "--keep",
        ])
        .args(["--workloads", "fillrandom"])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("LUNA_OBJECT_STORE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn luna");
    let pid = child.id();
    // Wait until flushes are under way (edits in the manifest), then let it
    // run a little longer so the kill lands at a different point each time.
    let manifest = data_dir.join(format!("objects/bench-storage-{pid}/fillrandom/manifest"));
    let started = Instant::now();
    let mut flushing_since: Option<Instant> = None;
    loop {
        if child.try_wait().expect("poll luna").is_some() {
            panic!("the benchmark ended before it could be killed; give it more work");
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the benchmark wrote no manifest edits within 60 s");
        }
        let edits = std::fs::read_dir(&manifest).map_or(0, |entries| entries.count());
        if flushing_since.is_none() && edits >= 10 {
            flushing_since = Some(Instant::now());
        }
        if flushing_since.is_some_and(|since| since.elapsed() >= delay) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().expect("SIGKILL luna");
    child.wait().expect("reap luna");
    pid
}

async fn check_reopen(data_dir: &std::path::Path, pid: u32) {
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalFileSystem::new_with_prefix(data_dir.join("objects")).unwrap());
    let root = Path::from(format!("bench-storage-{pid}/fillrandom"));
    let options = BaseStoreOptions {
        background_jobs: false,
        gc_grace: Duration::ZERO,
        ..BaseStoreOptions::default()
    };
    let base = BaseStore::open(Arc::clone(&store), root.clone(), options)
        .await
        .expect("manifest loads after a kill");
    let version = base.version();
    assert!(
        version.seq() > 0,
        "the process got far enough to commit edits"
    );
    let tablet = version.tablet(1).expect("the tablet was claimed").clone();
    // Every referenced table is readable end to end.
    let scan = luna_storage::Tablet::open(
        Arc::clone(&base),
        1,
        tablet.epoch + 1,
        tablet.range.clone(),
        luna_storage::MemStoreOptions::default(),
        Arc::new(luna_storage::MemoryBudget::new(64 << 20)),
    )
    .await
    .expect("a new owner claims the tablet");
    let request = ScanRequest {
        range: KeyRange::all(),
        read_ts: u64::MAX,
        limit: 0,
        direction: Direction::Forward,
    };
    let rows = scan
        .scan(&request)
        .await
        .expect("every referenced table reads");
    let flushed_rows: u64 = version.tables().map(|t| t.rows).sum();
    assert!(
        flushed_rows > 0 && !rows.is_empty(),
        "flushed data is visible"
    );
    // Orphans (uploads whose edit never landed, outputs of a cut compaction) are collected.
    let report = base.collect_garbage().await.expect("gc");
    let left: Vec<String> = store
        .list(Some(&root.clone().join("tables")))
        .map_ok(|meta| meta.location.filename().unwrap_or_default().to_string())
        .try_collect()
        .await
        .unwrap();
    let live: std::collections::HashSet<String> = base
        .version()
        .tables()
        .map(|t| t.name.trim_start_matches("tables/").to_string())
        .collect();
    assert_eq!(
        left.len(),
        live.len(),
        "only live tables remain (gc deleted {})",
        report.tables_deleted
    );
    assert!(left.iter().all(|name| live.contains(name)));
    eprintln!(
        "after the kill: manifest at edit {}, {} live tables, {} versions scanned, {} orphans collected",
        version.seq(),
        live.len(),
        rows.len(),
        report.tables_deleted
    );
    base.close();
}

#[test]
fn killed_mid_write_reopens_without_loss_or_dangling_tables() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for delay_ms in [0, 70, 230] {
        let dir = tempfile::tempdir().unwrap();
        let pid = kill_bench_after(dir.path(), Duration::from_millis(delay_ms));
        runtime.block_on(check_reopen(dir.path(), pid));
    }
}
