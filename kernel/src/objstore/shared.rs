//! The request pipeline shared by every call of a `LunaObjectStore`: count, inject faults,
//! retry.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use object_store::{ObjectStore, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::faults::FaultInjector;
use super::metrics::Metrics;
use super::retry::{is_transient, jitter_seed};
use super::{OpKind, RetryPolicy};

/// State shared with streams and uploads that outlive the call that created them.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) inner: Arc<dyn ObjectStore>,
    pub(crate) metrics: Metrics,
    pub(crate) faults: FaultInjector,
    policy: RetryPolicy,
    jitter: Mutex<StdRng>,
}

/// The result of a call, and whether an earlier attempt failed in a way that leaves unknown
/// whether it took effect.
pub(crate) struct Outcome<T> {
    pub(crate) result: Result<T>,
    pub(crate) ambiguous: bool,
}

impl Shared {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Shared {
        Shared {
            inner,
            metrics: Metrics::default(),
            faults: FaultInjector::default(),
            policy,
            jitter: Mutex::new(StdRng::seed_from_u64(jitter_seed())),
        }
    }

    /// Runs `op` as one `kind` call: counts it, and repeats it after transient errors.
    ///
    /// Errors and bytes are left to [`finish`](Self::finish), because a caller may still turn
    /// an error into success (a conditional write that turns out to be its own).
    pub(crate) async fn call<T, F, Fut>(&self, kind: OpKind, mut op: F) -> Outcome<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.metrics.request(kind);
        let mut ambiguous = false;
        let mut attempt = 1;
        loop {
            match self.attempt(kind, op()).await {
                Err(e) if is_transient(&e) && attempt < self.policy.attempts() => {
                    tracing::debug!(%kind, attempt, error = %e, "retrying object store request");
                    ambiguous = true;
                    self.metrics.retry(kind);
                    let wait = {
                        let mut rng = self.jitter.lock().unwrap_or_else(PoisonError::into_inner);
                        self.policy.backoff(attempt, &mut *rng)
                    };
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                result => return Outcome { result, ambiguous },
            }
        }
    }

    /// One attempt, with any injected faults around it.
    async fn attempt<T>(
        &self,
        kind: OpKind,
        request: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let fault = self.faults.decide(kind);
        if !fault.delay.is_zero() {
            tokio::time::sleep(fault.delay).await;
        }
        if fault.fail_before {
            return Err(FaultInjector::error(kind, false));
        }
        let result = request.await;
        if fault.fail_after {
            return Err(FaultInjector::error(kind, true));
        }
        result
    }

    /// Records the final result of a call; `bytes` measures a success.
    pub(crate) fn finish<T>(
        &self,
        kind: OpKind,
        result: &Result<T>,
        bytes: impl FnOnce(&T) -> u64,
    ) {
        match result {
            Ok(value) => self.metrics.bytes(kind, bytes(value)),
            Err(_) => self.metrics.error(kind),
        }
    }
}
