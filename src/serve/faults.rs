//! Fault hooks for `luna chaos`: HTTP endpoints that cut a process's raft traffic to chosen
//! peers, and make its object store fail or slow down. They exist only in processes started
//! with `LUNA_FAULT_HOOKS=1`, which `luna chaos` sets for the universe it runs; a production
//! process never serves them.
//!
//! - `POST /faults/raft?cut=1,2` drops raft messages to and from those peers (node ids: the
//!   server ids of tablet servers, the replica ids of master replicas); `cut=` heals.
//! - `POST /faults/object-store?fail=0.2&delay_ms=50` fails that fraction of object-store
//!   requests (retried as transient errors) and delays every request; both 0 clear it. The
//!   answer starts with the number of faults injected so far.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, Uri};
use axum::routing::post;
use luna_journal::raft::Partition;
use luna_kernel::objstore::{FaultAction, FaultRule, LunaObjectStore};

/// The environment variable that turns the hooks on.
pub const FAULT_HOOKS_ENV: &str = "LUNA_FAULT_HOOKS";

/// What a process lets a fault test break.
#[derive(Debug, Default)]
pub struct FaultHooks {
    /// The journal's partition, once the journal runs.
    raft: OnceLock<Partition>,
    object_store: Option<Arc<LunaObjectStore>>,
}

impl FaultHooks {
    /// Hooks for a process with `object_store` (if it has one), when `LUNA_FAULT_HOOKS=1`.
    pub fn from_env(object_store: Option<Arc<LunaObjectStore>>) -> Option<Arc<FaultHooks>> {
        let enabled = std::env::var(FAULT_HOOKS_ENV).is_ok_and(|value| value == "1");
        enabled.then(|| {
            Arc::new(FaultHooks {
                raft: OnceLock::new(),
                object_store,
            })
        })
    }

    /// Hands the hooks the journal's partition once the journal runs.
    pub fn set_raft(&self, partition: Partition) {
        let _ = self.raft.set(partition);
    }

    /// The routes, to merge into the process's HTTP endpoint.
    pub fn routes(self: &Arc<Self>) -> Router {
        let raft = Arc::clone(self);
        let store = Arc::clone(self);
        Router::new()
            .route(
                "/faults/raft",
                post(move |uri: Uri| async move { raft.cut_raft(&uri) }),
            )
            .route(
                "/faults/object-store",
                post(move |uri: Uri| async move { store.break_object_store(&uri) }),
            )
    }

    fn cut_raft(&self, uri: &Uri) -> (StatusCode, String) {
        let Some(partition) = self.raft.get() else {
            return (
                StatusCode::CONFLICT,
                "this process has no replicated journal (yet)\n".to_owned(),
            );
        };
        let peers: Result<Vec<u64>, _> = query(uri, "cut")
            .unwrap_or_default()
            .split(',')
            .filter(|peer| !peer.is_empty())
            .map(str::parse)
            .collect();
        match peers {
            Ok(peers) => {
                tracing::warn!(?peers, "fault hook: raft traffic cut");
                partition.cut(peers);
                (StatusCode::OK, format!("cut {:?}\n", partition.peers()))
            }
            Err(error) => (StatusCode::BAD_REQUEST, format!("cut: {error}\n")),
        }
    }

    fn break_object_store(&self, uri: &Uri) -> (StatusCode, String) {
        let Some(store) = &self.object_store else {
            return (
                StatusCode::CONFLICT,
                "this process has no object store\n".to_owned(),
            );
        };
        let number = |name: &str| query(uri, name).map_or(Ok(0.0), |value| value.parse::<f64>());
        let (Ok(fail), Ok(delay_ms)) = (number("fail"), number("delay_ms")) else {
            return (
                StatusCode::BAD_REQUEST,
                "fail and delay_ms must be numbers\n".to_owned(),
            );
        };
        let faults = store.faults();
        faults.clear();
        let rules = [
            (fail > 0.0).then_some(FaultRule {
                action: FaultAction::Fail,
                fraction: fail.min(1.0),
                kind: None,
            }),
            (delay_ms > 0.0).then_some(FaultRule {
                action: FaultAction::Delay(Duration::from_secs_f64(delay_ms / 1000.0)),
                fraction: 1.0,
                kind: None,
            }),
        ];
        for rule in rules.into_iter().flatten() {
            if let Err(error) = faults.add_rule(rule) {
                return (StatusCode::BAD_REQUEST, format!("{error}\n"));
            }
        }
        tracing::warn!(fail, delay_ms, "fault hook: object store faults set");
        // The count first: `luna chaos` reads it to report how many requests failed.
        let injected = faults.injected();
        (
            StatusCode::OK,
            format!("{injected} faults injected so far; now fail {fail}, delay {delay_ms} ms\n"),
        )
    }
}

/// The value of query parameter `name`.
fn query<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}
