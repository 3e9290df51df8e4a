//! Calls to tablet servers over one long-lived `Multiplex` stream per server.
//!
//! Each get, scan or write becomes a command with an id; commands queued while the previous
//! message was on the wire leave together in one message, and the server's replies come
//! back in batches too (see `Multiplex` in tablet.proto). With many concurrent operations
//! this costs both sides far less than one HTTP/2 request per operation, which dominated
//! the CPU profile of small reads. A command answers exactly as the unary call would,
//! including with a gRPC status, so the retry policy in `exec` is the same for both.
//!
//! When the stream breaks, every command waiting on it fails with a transport failure
//! (the transport's own, or UNAVAILABLE for any other status that broke it), which the
//! retry policy retries; the next call opens a new stream on the same channel, which
//! reconnects. A stream that could not open at all passes its status on: nothing was
//! served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use luna_proto::multiplex;
use luna_proto::tablet::command::Request as CommandRequest;
use luna_proto::tablet::command_reply::Response as ReplyResponse;
use luna_proto::tablet::tablet_client::TabletClient;
use luna_proto::tablet::{
    BatchGetRequest, BatchGetResponse, CheckTxnRequest, CheckTxnResponse, Command, CommandBatch,
    CommandReply, GetRequest, GetResponse, PrewriteRequest, PrewriteResponse, ResolveRequest,
    ResolveResponse, ScanRequest, ScanResponse, WriteRequest, WriteResponse,
};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;
use tonic::transport::Channel;

use crate::conn::MAX_MESSAGE_BYTES;
use crate::error::{describe_status, is_transport_failure};

/// The calls of this client to one tablet server. Clones share the stream.
#[derive(Clone, Debug)]
pub(crate) struct TabletConn {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    channel: Channel,
    /// The current stream; replaced when it has ended.
    session: Mutex<Option<Session>>,
}

/// One `Multiplex` call.
#[derive(Clone, Debug)]
struct Session {
    commands: mpsc::UnboundedSender<Result<Command, Status>>,
    waiting: Arc<Waiting>,
}

/// The commands of one stream that wait for their replies.
#[derive(Debug)]
struct Waiting {
    /// `None` once the stream has ended: nothing more will be answered.
    calls: Mutex<Option<Calls>>,
    next_id: AtomicU64,
}

type Answer = oneshot::Receiver<Result<ReplyResponse, Status>>;
type Calls = HashMap<u64, oneshot::Sender<Result<ReplyResponse, Status>>>;

/// One method per command kind: sends the request on the stream, expects its own kind of
/// reply.
macro_rules! command {
    ($name:ident, $kind:ident, $request:ty, $response:ty) => {
        pub(crate) async fn $name(&self, request: $request) -> Result<$response, Status> {
            match self.call(CommandRequest::$kind(request)).await? {
                ReplyResponse::$kind(response) => Ok(response),
                other => Err(mismatch(stringify!($kind), &other)),
            }
        }
    };
}

impl TabletConn {
    /// Calls over `channel` (connected lazily, as tonic does).
    pub(crate) fn new(channel: Channel) -> Self {
        Self {
            shared: Arc::new(Shared {
                channel,
                session: Mutex::new(None),
            }),
        }
    }

    command!(get, Get, GetRequest, GetResponse);
    command!(batch_get, BatchGet, BatchGetRequest, BatchGetResponse);
    command!(scan, Scan, ScanRequest, ScanResponse);
    command!(write, Write, WriteRequest, WriteResponse);
    command!(prewrite, Prewrite, PrewriteRequest, PrewriteResponse);
    command!(resolve, Resolve, ResolveRequest, ResolveResponse);
    command!(check_txn, CheckTxn, CheckTxnRequest, CheckTxnResponse);

    async fn call(&self, request: CommandRequest) -> Result<ReplyResponse, Status> {
        let (waiting, id, answer) = self.submit(request)?;
        // A caller that gives up (its deadline passed) must not leave its entry behind.
        let _forget = Forget { waiting, id };
        match answer.await {
            Ok(Ok(ReplyResponse::Status(status))) => Err(status.into()),
            Ok(result) => result,
            Err(_) => Err(Status::unavailable(
                "the stream to the tablet server closed before it answered",
            )),
        }
    }

    /// Queues `request` on a live stream, opening one if needed.
    fn submit(&self, request: CommandRequest) -> Result<(Arc<Waiting>, u64, Answer), Status> {
        // The stream can end between finding it and registering on it: then take a new one.
        for _ in 0..2 {
            let session = self.live_session();
            let Some((id, answer)) = session.waiting.register() else {
                continue;
            };
            let command = Command {
                id,
                request: Some(request),
            };
            // The queue outlives registration: if the stream ends now, it fails the entry.
            let _ = session.commands.send(Ok(command));
            return Ok((session.waiting, id, answer));
        }
        Err(Status::unavailable(
            "the stream to the tablet server keeps closing",
        ))
    }

    fn live_session(&self) -> Session {
        let mut slot = self
            .shared
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match slot.as_ref() {
            Some(session) if session.waiting.is_open() => session.clone(),
            _ => {
                let session = self.open();
                *slot = Some(session.clone());
                session
            }
        }
    }

    /// Starts a `Multiplex` call and the task that hands its replies to the callers.
    fn open(&self) -> Session {
        let (commands, queue) = mpsc::unbounded_channel();
        let outbound = multiplex::batches(queue, Command::encoded_len, |commands| CommandBatch {
            commands,
        })
        // The client never queues an error.
        .filter_map(|batch| futures::future::ready(batch.ok()));
        let waiting = Arc::new(Waiting {
            calls: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
        });
        let replies_to = Arc::clone(&waiting);
        let mut client = TabletClient::new(self.shared.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        tokio::spawn(async move {
            let ended = match client.multiplex(outbound).await {
                Err(status) => status,
                Ok(response) => {
                    let mut replies = response.into_inner();
                    loop {
                        match replies.message().await {
                            Ok(Some(batch)) => replies_to.answer(batch.replies),
                            Ok(None) => {
                                break Status::unavailable("the tablet server ended the stream");
                            }
                            // The server may have served the waiting commands before
                            // the break: whatever ended the stream, they are retried.
                            Err(status) => break broken(&status),
                        }
                    }
                }
            };
            replies_to.close(&ended);
        });
        Session { commands, waiting }
    }
}

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Calls>> {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_open(&self) -> bool {
        self.lock().is_some()
    }

    fn register(&self) -> Option<(u64, Answer)> {
        let mut calls = self.lock();
        let calls = calls.as_mut()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        calls.insert(id, reply);
        Some((id, answer))
    }

    fn answer(&self, replies: Vec<CommandReply>) {
        let mut answered = Vec::with_capacity(replies.len());
        {
            let mut calls = self.lock();
            let Some(calls) = calls.as_mut() else {
                return;
            };
            for reply in replies {
                if let Some(waiter) = calls.remove(&reply.id) {
                    answered.push((waiter, reply.response));
                }
            }
        }
        // Wake the callers outside the lock.
        for (waiter, response) in answered {
            let result = response.ok_or_else(|| Status::internal("a reply carried no response"));
            let _ = waiter.send(result);
        }
    }

    /// Fails every waiting command with `status`; later registrations fail.
    fn close(&self, status: &Status) {
        let calls = self.lock().take().unwrap_or_default();
        for (_, waiter) in calls {
            let _ = waiter.send(Err(status.clone()));
        }
    }
}

/// The status for the commands waiting on a stream that broke with `status`. The status
/// says nothing about each command, which the server may have served before the break: one
/// the caller takes as final (tonic reports some HTTP/2 resets as INTERNAL) would report a
/// write that was applied as failed. So anything but a transport failure becomes
/// UNAVAILABLE, which the caller retries under the same request id.
fn broken(status: &Status) -> Status {
    if is_transport_failure(status) {
        return status.clone();
    }
    Status::unavailable(format!(
        "the stream of commands to the tablet server broke: {}",
        describe_status(status)
    ))
}

/// Removes a command's entry when its caller stops waiting.
struct Forget {
    waiting: Arc<Waiting>,
    id: u64,
}

impl Drop for Forget {
    fn drop(&mut self) {
        if let Some(calls) = self.waiting.lock().as_mut() {
            calls.remove(&self.id);
        }
    }
}

fn mismatch(expected: &str, got: &ReplyResponse) -> Status {
    let got = match got {
        ReplyResponse::Get(_) => "Get",
        ReplyResponse::BatchGet(_) => "BatchGet",
        ReplyResponse::Scan(_) => "Scan",
        ReplyResponse::Write(_) => "Write",
        ReplyResponse::Prewrite(_) => "Prewrite",
        ReplyResponse::Resolve(_) => "Resolve",
        ReplyResponse::CheckTxn(_) => "CheckTxn",
        ReplyResponse::Status(_) => "a status",
    };
    Status::internal(format!(
        "the tablet server answered a {expected} command with {got}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_stream_leaves_its_commands_retryable_whatever_status_ended_it() {
        let status = broken(&Status::internal("h2 protocol error: stream reset"));
        assert!(is_transport_failure(&status), "{status:?}");
        assert!(status.message().contains("stream reset"), "{status:?}");
    }

    #[test]
    fn a_transport_failure_reaches_the_commands_as_it_was() {
        let status = broken(&Status::cancelled("timeout expired"));
        assert_eq!(status.code(), tonic::Code::Cancelled);
        assert_eq!(status.message(), "timeout expired");
    }
}
