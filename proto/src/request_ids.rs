//! Request ids for writes, and which of them are still in flight: for the client SDK, and
//! for a tablet server's own ids of requests that came without one.
//!
//! Every write carries `(client id, seq)`, which the tablet's group records so that a
//! retry is answered with the first outcome instead of being applied again. The id also
//! says which of the client's writes are done (`done_below`: every lower seq was
//! answered or given up on, so it is never sent again). A group then forgets those ids
//! at once, keeping tens instead of tens of thousands, and refuses a late copy of one
//! (the RIFL scheme, "Implementing Linearizability at Large Scale and Low Latency", SOSP
//! 2015).

use std::collections::BTreeSet;
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use crate::tablet::RequestId;

/// The seqs this client has handed out, and the ones still in flight.
#[derive(Debug, Default)]
pub struct RequestIds {
    state: Mutex<Seqs>,
}

#[derive(Debug, Default)]
struct Seqs {
    last: u64,
    in_flight: BTreeSet<u64>,
}

impl RequestIds {
    /// A new request id of `client_id` for one write, in flight until the returned value
    /// is dropped (retries reuse it).
    pub fn start(self: &Arc<Self>, client_id: &Bytes) -> InFlightRequest {
        let mut seqs = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        seqs.last += 1;
        let seq = seqs.last;
        seqs.in_flight.insert(seq);
        let done_below = seqs.in_flight.first().copied().unwrap_or(seq);
        InFlightRequest {
            id: RequestId {
                client_id: client_id.clone(),
                seq,
                done_below,
            },
            ids: Arc::clone(self),
        }
    }

    fn finish(&self, seq: u64) {
        let mut seqs = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        seqs.in_flight.remove(&seq);
    }
}

/// A write's request id while the write is in flight: from its first send until its
/// answer, or until the client gives up on it.
#[derive(Debug)]
pub struct InFlightRequest {
    id: RequestId,
    ids: Arc<RequestIds>,
}

impl Deref for InFlightRequest {
    type Target = RequestId;

    fn deref(&self) -> &RequestId {
        &self.id
    }
}

impl Drop for InFlightRequest {
    fn drop(&mut self) {
        self.ids.finish(self.id.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_below_stops_at_the_oldest_write_in_flight() {
        let ids = Arc::new(RequestIds::default());
        let client = Bytes::from_static(&[9; 16]);
        let first = ids.start(&client);
        let second = ids.start(&client);
        assert_eq!((first.seq, first.done_below), (1, 1));
        assert_eq!((second.seq, second.done_below), (2, 1));
        drop(second);
        let third = ids.start(&client);
        assert_eq!(third.done_below, 1, "the first write is still in flight");
        drop(first);
        let fourth = ids.start(&client);
        assert_eq!((fourth.seq, fourth.done_below), (4, 3));
        drop(third);
        drop(fourth);
        let fifth = ids.start(&client);
        assert_eq!(
            (fifth.seq, fifth.done_below),
            (5, 5),
            "nothing else in flight"
        );
        assert_eq!(fifth.client_id, client);
    }
}
