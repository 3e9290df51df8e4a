//! Timestamps from the master's oracle, batched: the calls made while one request is on its
//! way share the next request (`count` = how many waited), as a busy transactional client
//! would otherwise send the master one request per transaction begin and commit.

use std::sync::{Arc, Mutex, PoisonError};

use luna_proto::master::GetTimestampsRequest;
use tokio::sync::oneshot;

use crate::error::{ClientError, Result};
use crate::retry::Deadline;
use crate::{Client, Inner};

/// Callers waiting for a timestamp, and whether a fetch is running for them.
#[derive(Debug, Default)]
pub(crate) struct TimestampQueue {
    state: Mutex<QueueState>,
}

#[derive(Debug, Default)]
struct QueueState {
    waiting: Vec<oneshot::Sender<Result<u64>>>,
    fetching: bool,
}

impl Client {
    /// A fresh timestamp from the master's timestamp oracle: unique, larger than any
    /// handed out before, and larger than every commit timestamp this client was answered
    /// with (so a snapshot at it sees the client's own writes). A timestamp is
    /// `(physical milliseconds << 18) | logical`. Concurrent calls share requests.
    pub async fn timestamp(&self) -> Result<u64> {
        let (sender, receiver) = oneshot::channel();
        let start_fetching = {
            let mut state = self
                .inner
                .timestamps
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            state.waiting.push(sender);
            !std::mem::replace(&mut state.fetching, true)
        };
        if start_fetching {
            // A task of its own, so that a caller that gives up does not strand the others.
            tokio::spawn(fetch_for_waiting(Arc::clone(&self.inner)));
        }
        receiver
            .await
            .unwrap_or_else(|_| Err(ClientError::protocol("the timestamp fetch stopped")))
    }
}

/// Fetches timestamps for everyone waiting, again for whoever queued meanwhile, until
/// nobody waits.
async fn fetch_for_waiting(inner: Arc<Inner>) {
    loop {
        let waiting = {
            let mut state = inner
                .timestamps
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if state.waiting.is_empty() {
                state.fetching = false;
                return;
            }
            std::mem::take(&mut state.waiting)
        };
        let count = u32::try_from(waiting.len()).unwrap_or(u32::MAX);
        match fetch(&inner, count).await {
            Ok(first) => {
                for (offset, waiter) in (0u64..).zip(waiting) {
                    let _ = waiter.send(Ok(first + offset));
                }
            }
            Err(error) => {
                for waiter in waiting {
                    let _ = waiter.send(Err(error.clone()));
                }
            }
        }
    }
}

/// `count` consecutive timestamps from the master; returns the first.
async fn fetch(inner: &Inner, count: u32) -> Result<u64> {
    let deadline = Deadline::after(inner.options.operation_timeout);
    let after = inner.max_seen_ts();
    let response = inner
        .call_master("GetTimestamps", &deadline, |mut master| async move {
            master
                .get_timestamps(GetTimestampsRequest { count, after })
                .await
        })
        .await?;
    if response.count < count {
        return Err(ClientError::protocol(format!(
            "GetTimestamps answered with {} timestamps, not {count}",
            response.count
        )));
    }
    inner.saw_timestamp(response.first + u64::from(count) - 1);
    Ok(response.first)
}
