//! When to retry an object-store request, and how long to wait first.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::Duration;

use rand::Rng;

/// How [`LunaObjectStore`](super::LunaObjectStore) retries transient failures.
///
/// The wait before retry `n` (counting from 1) is drawn uniformly from `[d/2, d]`, where
/// `d = min(max_backoff, initial_backoff * 2^(n-1))`: exponential growth, with jitter so that
/// clients that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per call, the first included; 0 is treated as 1.
    pub max_attempts: u32,
    /// The upper bound of the first wait.
    pub initial_backoff: Duration,
    /// The upper bound of any wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Attempts per call, never less than one.
    pub(crate) fn attempts(&self) -> u32 {
        self.max_attempts.max(1)
    }

    /// The wait before retry number `retry` (1 for the first retry).
    pub(crate) fn backoff(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        let ceiling = self
            .initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff);
        let half = ceiling / 2;
        // Nanoseconds of any backoff worth configuring fit in u64 (584 years).
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rng.random_range(0..=spread))
    }
}

/// Whether an error may go away if the same request is sent again.
///
/// Only [`object_store::Error::Generic`] qualifies: backends report timeouts, connection
/// failures and 5xx responses that way, and injected faults use it too. Everything else
/// (not found, already exists, precondition failed, invalid path, permission, ...) is an
/// answer that a retry would only repeat, and so are the 4xx responses that HTTP backends
/// also report as `Generic`.
pub(crate) fn is_transient(error: &object_store::Error) -> bool {
    match error {
        object_store::Error::Generic { source, .. } => !is_client_error(source.as_ref()),
        _ => false,
    }
}

/// Whether an HTTP backend's error chain holds a 4xx response, other than the ones that mean
/// "too slow" or "too fast" (408, 429, and S3's 400 `RequestTimeout`).
///
/// object_store keeps the status of these errors private and exposes only the message, so this
/// reads the message. Should its wording change, such errors are retried again: wasteful,
/// not wrong. A test against the S3 test server pins the wording.
fn is_client_error(error: &(dyn std::error::Error + 'static)) -> bool {
    const STATUS_PREFIX: &str = "Server returned non-2xx status code: ";
    let mut next = Some(error);
    while let Some(e) = next {
        let message = e.to_string();
        if let Some(status) = message.strip_prefix(STATUS_PREFIX) {
            return status.starts_with('4')
                && !status.starts_with("408")
                && !status.starts_with("429")
                && !status.contains("RequestTimeout");
        }
        next = e.source();
    }
    false
}

/// A seed that differs between processes, so that their retry jitter does not line up.
///
/// `RandomState` is seeded by the standard library from the OS; this avoids needing rand's
/// OS-randomness feature for a value that never affects correctness.
pub(crate) fn jitter_seed() -> u64 {
    RandomState::new().hash_one(0u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn backoff_grows_exponentially_within_jitter_bounds_and_caps() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
        };
        let mut rng = StdRng::seed_from_u64(7);
        let ceilings = [100, 200, 400, 500, 500, 500];
        for (i, ceiling) in ceilings.into_iter().enumerate() {
            let ceiling = Duration::from_millis(ceiling);
            for _ in 0..50 {
                let retry = u32::try_from(i).unwrap() + 1;
                let wait = policy.backoff(retry, &mut rng);
                assert!(
                    wait >= ceiling / 2 && wait <= ceiling,
                    "retry {retry}: {wait:?}"
                );
            }
        }
    }

    #[test]
    fn backoff_does_not_overflow_on_huge_retry_numbers() {
        let policy = RetryPolicy::default();
        let mut rng = StdRng::seed_from_u64(1);
        assert!(policy.backoff(u32::MAX, &mut rng) <= policy.max_backoff);
    }

    /// An error with a message and an optional cause, to build chains like object_store's.
    #[derive(Debug)]
    struct Chain(&'static str, Option<Box<Chain>>);

    impl std::fmt::Display for Chain {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Chain {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|c| c as _)
        }
    }

    #[test]
    fn only_generic_errors_other_than_client_errors_are_transient() {
        let generic = object_store::Error::Generic {
            store: "x",
            source: "boom".into(),
        };
        let not_found = object_store::Error::NotFound {
            path: "p".into(),
            source: "gone".into(),
        };
        let exists = object_store::Error::AlreadyExists {
            path: "p".into(),
            source: "x".into(),
        };
        let precondition = object_store::Error::Precondition {
            path: "p".into(),
            source: "x".into(),
        };
        assert!(is_transient(&generic));
        let timeout = object_store::Error::Generic {
            store: "S3",
            source: Box::new(Chain(
                "put failed",
                Some(Box::new(Chain(
                    "Server returned non-2xx status code: 400 Bad Request: <Code>RequestTimeout</Code>",
                    None,
                ))),
            )),
        };
        assert!(is_transient(&timeout));
        let throttled = object_store::Error::Generic {
            store: "S3",
            source: Box::new(Chain(
                "Server returned non-2xx status code: 429 Too Many Requests",
                None,
            )),
        };
        assert!(is_transient(&throttled));
        let bad_request = object_store::Error::Generic {
            store: "S3",
            source: Box::new(Chain(
                "put failed",
                Some(Box::new(Chain(
                    "Server returned non-2xx status code: 400 Bad Request: <Code>EntityTooSmall</Code>",
                    None,
                ))),
            )),
        };
        assert!(!is_transient(&bad_request));
        assert!(!is_transient(&not_found));
        assert!(!is_transient(&exists));
        assert!(!is_transient(&precondition));
    }
}
