//! Serving the tablet service's `Multiplex` call: the commands of one stream run
//! concurrently through the service's own unary handlers, and their replies go back in
//! batches. Tablet servers and test doubles share this, so a command answers exactly as
//! the unary call would.
//!
//! A busy client sends many commands per message (see `Multiplex` in tablet.proto), and
//! the replies that are ready together leave in one message. Most reads finish without
//! waiting (a lease read of the MemStore): those are answered on the stream's own task,
//! and only commands that must wait (writes waiting for their commit, reads from object
//! storage) get a task of their own.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use futures::Stream;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Status, Streaming};

use crate::tablet::command::Request as CommandRequest;
use crate::tablet::command_reply::Response as ReplyResponse;
use crate::tablet::tablet_server::Tablet;
use crate::tablet::{CallStatus, Command, CommandBatch, CommandReply, ReplyBatch};

/// A batch stops growing at this many encoded bytes (one larger reply still goes alone).
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// A batch stops growing at this many commands or replies.
pub const MAX_BATCH_LEN: usize = 1024;

/// The response stream of a `Multiplex` call.
pub type ReplyStream = Pin<Box<dyn Stream<Item = Result<ReplyBatch, Status>> + Send>>;

/// Serves one `Multiplex` call with `service`'s unary handlers. The call ends when the
/// client ends its stream or when `stopping` turns true: no more commands are read then,
/// and the ones already running still answer. A malformed client message ends the call with
/// its status after those answers.
pub fn serve<S: Tablet>(
    service: Arc<S>,
    incoming: Streaming<CommandBatch>,
    stopping: watch::Receiver<bool>,
) -> ReplyStream {
    let (replies, outgoing) = mpsc::unbounded_channel();
    tokio::spawn(read_commands(service, incoming, replies, stopping));
    Box::pin(batches(
        outgoing,
        |reply| reply.encoded_len(),
        |replies| ReplyBatch { replies },
    ))
}

type Outgoing = mpsc::UnboundedSender<Result<CommandReply, Status>>;

async fn read_commands<S: Tablet>(
    service: Arc<S>,
    mut incoming: Streaming<CommandBatch>,
    replies: Outgoing,
    mut stopping: watch::Receiver<bool>,
) {
    loop {
        let message = tokio::select! {
            message = incoming.message() => message,
            () = stopped(&mut stopping) => return,
        };
        let batch = match message {
            Ok(Some(batch)) => batch,
            Ok(None) => return,
            Err(status) => {
                let _ = replies.send(Err(status));
                return;
            }
        };
        for command in batch.commands {
            let mut reply: Pin<Box<dyn Future<Output = CommandReply> + Send>> =
                Box::pin(dispatch(Arc::clone(&service), command));
            // A first poll with a no-op waker is safe: if the command must wait, its task
            // polls it again with a real waker before anything could have woken it.
            match reply.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(reply) => {
                    if replies.send(Ok(reply)).is_err() {
                        return;
                    }
                }
                Poll::Pending => {
                    let replies = replies.clone();
                    tokio::spawn(async move {
                        let _ = replies.send(Ok(reply.await));
                    });
                }
            }
        }
    }
}

/// Resolves once `stopping` turns true; never, if its sender is gone without that.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    if stopping.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Runs one command through `service`'s unary handler.
pub async fn dispatch<S: Tablet>(service: Arc<S>, command: Command) -> CommandReply {
    let response = match command.request {
        Some(CommandRequest::Get(request)) => service
            .get(Request::new(request))
            .await
            .map(|response| ReplyResponse::Get(response.into_inner())),
        Some(CommandRequest::BatchGet(request)) => service
            .batch_get(Request::new(request))
            .await
            .map(|response| ReplyResponse::BatchGet(response.into_inner())),
        Some(CommandRequest::Scan(request)) => service
            .scan(Request::new(request))
            .await
            .map(|response| ReplyResponse::Scan(response.into_inner())),
        Some(CommandRequest::Write(request)) => service
            .write(Request::new(request))
            .await
            .map(|response| ReplyResponse::Write(response.into_inner())),
        Some(CommandRequest::Prewrite(request)) => service
            .prewrite(Request::new(request))
            .await
            .map(|response| ReplyResponse::Prewrite(response.into_inner())),
        Some(CommandRequest::Resolve(request)) => service
            .resolve(Request::new(request))
            .await
            .map(|response| ReplyResponse::Resolve(response.into_inner())),
        Some(CommandRequest::CheckTxn(request)) => service
            .check_txn(Request::new(request))
            .await
            .map(|response| ReplyResponse::CheckTxn(response.into_inner())),
        None => Err(Status::invalid_argument(format!(
            "command {} carries no request",
            command.id
        ))),
    };
    CommandReply {
        id: command.id,
        response: Some(response.unwrap_or_else(|status| ReplyResponse::Status(status.into()))),
    }
}

impl From<Status> for CallStatus {
    fn from(status: Status) -> Self {
        CallStatus {
            code: status.code() as i32,
            message: status.message().to_owned(),
        }
    }
}

impl From<CallStatus> for Status {
    fn from(status: CallStatus) -> Self {
        Status::new(status.code.into(), status.message)
    }
}

/// The items `queue` holds, in messages: each takes the first item it waits for plus
/// whatever else is queued, up to [`MAX_BATCH_LEN`] items and [`MAX_BATCH_BYTES`]. An
/// `Err` ends the stream after the items before it. Clients use this for their commands,
/// servers for their replies.
pub fn batches<T, B, S, W>(
    queue: mpsc::UnboundedReceiver<Result<T, Status>>,
    size: S,
    wrap: W,
) -> impl Stream<Item = Result<B, Status>> + Send
where
    T: Send + 'static,
    B: Send + 'static,
    S: Fn(&T) -> usize + Send + 'static,
    W: Fn(Vec<T>) -> B + Send + 'static,
{
    let state = Batcher {
        queue,
        carried: None,
        ended: false,
        size,
        wrap,
    };
    futures::stream::unfold(state, |mut state| async move {
        let message = state.next_message().await?;
        Some((message, state))
    })
}

struct Batcher<T, S, W> {
    queue: mpsc::UnboundedReceiver<Result<T, Status>>,
    /// An `Err` taken from the queue behind items that left first.
    carried: Option<Status>,
    ended: bool,
    size: S,
    wrap: W,
}

impl<T, B, S, W> Batcher<T, S, W>
where
    S: Fn(&T) -> usize,
    W: Fn(Vec<T>) -> B,
{
    async fn next_message(&mut self) -> Option<Result<B, Status>> {
        if self.ended {
            return None;
        }
        if let Some(status) = self.carried.take() {
            self.ended = true;
            return Some(Err(status));
        }
        let mut next = self.queue.recv().await?;
        let mut items = Vec::new();
        let mut bytes = 0;
        loop {
            match next {
                Ok(item) => {
                    bytes += (self.size)(&item);
                    items.push(item);
                }
                Err(status) if items.is_empty() => {
                    self.ended = true;
                    return Some(Err(status));
                }
                Err(status) => {
                    self.carried = Some(status);
                    break;
                }
            }
            if items.len() >= MAX_BATCH_LEN || bytes >= MAX_BATCH_BYTES {
                break;
            }
            match self.queue.try_recv() {
                Ok(item) => next = item,
                Err(_) => break,
            }
        }
        Some(Ok((self.wrap)(items)))
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;

    #[tokio::test]
    async fn queued_items_leave_together_and_an_error_ends_the_stream() {
        let (sender, queue) = mpsc::unbounded_channel();
        for item in 0..3u32 {
            sender.send(Ok(item)).ok();
        }
        sender.send(Err(Status::internal("broken"))).ok();
        sender.send(Ok(9)).ok();
        let mut stream = Box::pin(batches(queue, |_| 1, |items| items));
        assert_eq!(
            stream.next().await.and_then(Result::ok),
            Some(vec![0, 1, 2])
        );
        let error = stream.next().await.and_then(Result::err);
        assert_eq!(
            error.map(|status| status.message().to_owned()).as_deref(),
            Some("broken")
        );
        assert!(stream.next().await.is_none(), "nothing after the error");
    }

    #[tokio::test]
    async fn batches_are_bounded_by_bytes_and_length() {
        let (sender, queue) = mpsc::unbounded_channel();
        for _ in 0..3 {
            sender.send(Ok(MAX_BATCH_BYTES / 2)).ok();
        }
        for _ in 0..MAX_BATCH_LEN + 1 {
            sender.send(Ok(0)).ok();
        }
        drop(sender);
        let stream = batches(queue, |bytes: &usize| *bytes, |items| items.len());
        let lengths: Vec<usize> = stream
            .filter_map(|batch| async { batch.ok() })
            .collect()
            .await;
        assert_eq!(
            lengths,
            vec![2, MAX_BATCH_LEN, 2],
            "split at 4 MiB, then at the length cap"
        );
    }

    #[test]
    fn statuses_survive_the_round_trip() {
        let status: Status = CallStatus::from(Status::invalid_argument("bad key")).into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "bad key");
    }
}
