//! Write load for tests that kill processes: writers that record every acknowledged write,
//! and the check that each one is still there at the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use luna_client::{Client, Collection, CollectionSpec};

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

/// Tasks writing distinct keys until stopped, keeping every acknowledged (key, value).
pub struct Writers {
    collection: Collection,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// Starts `writers` tasks putting to `collection`.
    pub fn spawn(collection: &Collection, writers: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let tasks = (0..writers)
            .map(|w| {
                let collection = collection.clone();
                let stop = Arc::clone(&stop);
                let acked = Arc::clone(&acked);
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("w{w}-{n:06}");
                        let value = format!("value-{w}-{n}");
                        n += 1;
                        // Failures during a failover are expected; only acknowledged writes
                        // must survive.
                        if collection.put(key.clone(), value.clone()).await.is_ok()
                            && let Ok(mut acked) = acked.lock()
                        {
                            acked.push((key, value));
                        }
                    }
                })
            })
            .collect();
        Writers {
            collection: collection.clone(),
            stop,
            acked,
            tasks,
        }
    }

    /// Writes acknowledged so far.
    pub fn count(&self) -> usize {
        self.acked.lock().map_or(0, |acked| acked.len())
    }

    /// Waits until `more` writes beyond the current count are acknowledged.
    pub async fn wait_progress(&self, more: usize, what: &str) {
        let target = self.count() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.count() < target {
            assert!(Instant::now() < deadline, "writes did not continue {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the writers and checks that every acknowledged write reads back; `logs` are
    /// printed with a failure.
    pub async fn stop_and_check(self, logs: impl FnOnce() -> String) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("writer task");
        }
        let acked = self
            .acked
            .lock()
            .map(|acked| acked.clone())
            .unwrap_or_default();
        let mut missing = Vec::new();
        for (key, value) in &acked {
            match self.collection.get(key).await {
                Ok(Some(found)) if found == value.as_bytes() => {}
                other => missing.push(format!("{key}: {other:?}")),
            }
        }
        assert!(
            missing.is_empty(),
            "{} of {} acknowledged writes are missing or wrong: {:?}\n{}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(10)],
            logs()
        );
    }
}
