//! Connections: one shared tonic channel per address, and calls to the master with failover
//! across the listed addresses.

use std::future::Future;
use std::time::Duration;

use luna_proto::leader_hint::{self, LeaderSearch};
use luna_proto::master::master_client::MasterClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Response, Status};
use tracing::debug;

use crate::Inner;
use crate::error::{
    ClientError, Result, describe_status, is_connect_failure, is_transport_failure,
};
use crate::mux::TabletConn;
use crate::retry::{Backoff, Deadline};

/// Largest gRPC message the SDK sends or accepts: a batch of maximal values plus framing.
/// Servers must accept at least 8 MiB values too (tonic's default limit is 4 MiB).
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How long a tablet server that failed at the transport level is passed over when a
/// request looks for its group's leader. A dead leader stays in the master's routing until
/// the new leader reports in; without this, every retry would go back to it instead of
/// asking a follower, which names the new leader as soon as it is elected.
const UNREACHABLE_FOR: Duration = Duration::from_secs(2);

/// `addr` as a URI tonic can dial: `host:port` gets `http://`.
pub(crate) fn normalize_addr(addr: &str) -> Result<String> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Err(ClientError::invalid("an empty address was given"));
    }
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    // Reject what tonic cannot parse here, with the address in the message.
    Endpoint::from_shared(uri.clone()).map_err(|error| {
        ClientError::invalid(format!(
            "`{addr}` is not a valid address ({error}); use host:port or http://host:port"
        ))
    })?;
    Ok(uri)
}

impl Inner {
    fn endpoint(&self, uri: &str) -> Result<Endpoint> {
        let endpoint = Endpoint::from_shared(uri.to_string()).map_err(|error| {
            ClientError::invalid(format!("`{uri}` is not a valid address ({error})"))
        })?;
        Ok(endpoint
            .connect_timeout(self.options.connect_timeout)
            .tcp_nodelay(true))
    }

    /// The shared channel to `addr` (as the routing or the caller spells it), created
    /// unconnected on first use. tonic connects it lazily and reconnects after failures, so
    /// one channel per address serves the client's lifetime.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let channel = self.endpoint(&normalize_addr(addr)?)?.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Connects to `uri` now (used to check a master is there), caching the channel.
    pub(crate) async fn connect_now(&self, uri: &str) -> std::result::Result<(), String> {
        let endpoint = self.endpoint(uri).map_err(|error| error.to_string())?;
        let connect = endpoint.connect();
        match tokio::time::timeout(self.options.connect_timeout, connect).await {
            Ok(Ok(channel)) => {
                self.channels
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(uri.to_string(), channel);
                Ok(())
            }
            Ok(Err(error)) => Err(error_chain(&error)),
            Err(_) => Err(format!(
                "no connection within {:?}",
                self.options.connect_timeout
            )),
        }
    }

    /// The shared multiplexed connection to the tablet server at `addr`.
    pub(crate) fn tablet_conn(&self, addr: &str) -> Result<TabletConn> {
        let mut conns = self
            .tablet_conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(conn) = conns.get(addr) {
            return Ok(conn.clone());
        }
        let conn = TabletConn::new(self.channel(addr)?);
        conns.insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    /// Remembers that the tablet server at `addr` did not answer (refused the connection,
    /// or let a request time out).
    pub(crate) fn mark_unreachable(&self, addr: &str) {
        self.unreachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(addr.to_string(), tokio::time::Instant::now());
    }

    /// Forgets that `addr` failed: it answered, or a server that answered named it leader.
    pub(crate) fn mark_reachable(&self, addr: &str) {
        let mut unreachable = self
            .unreachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !unreachable.is_empty() {
            unreachable.remove(addr);
        }
    }

    /// Whether `addr` failed within [`UNREACHABLE_FOR`] and has not answered since.
    pub(crate) fn is_unreachable(&self, addr: &str) -> bool {
        let mut unreachable = self
            .unreachable
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match unreachable.get(addr) {
            Some(since) if since.elapsed() < UNREACHABLE_FOR => true,
            Some(_) => {
                unreachable.remove(addr);
                false
            }
            None => false,
        }
    }

    fn master_client(&self, uri: &str) -> Result<MasterClient<Channel>> {
        Ok(MasterClient::new(self.channel(uri)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Remembers `uri` as the master to call first.
    pub(crate) fn prefer_master(&self, uri: &str) {
        let mut preferred = self
            .preferred_master
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *preferred != uri {
            *preferred = uri.to_owned();
        }
    }

    fn preferred_master(&self) -> String {
        self.preferred_master
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Calls the master: the one that answered last first, then the leader a replica names
    /// (listed or not, so any one replica's address finds the leader), else each listed
    /// address in turn, until one answers; then again with backoff until `deadline`.
    /// Transport failures and replicas that do not lead move on; any other status is the
    /// answer, mapped to a [`ClientError`].
    ///
    /// A call whose answer was lost is sent again, so a retried create may report
    /// [`ClientError::AlreadyExists`] for an object it created itself.
    pub(crate) async fn call_master<T, F, Fut>(
        &self,
        operation: &'static str,
        deadline: &Deadline,
        mut call: F,
    ) -> Result<T>
    where
        F: FnMut(MasterClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let count = self.master_uris.len();
        let mut backoff = Backoff::new(&self.options, self.next_seed());
        let mut last = String::from("no attempt was made before the deadline");
        loop {
            let mut search = LeaderSearch::new(&self.master_uris, self.preferred_master());
            // Set when a replica answered but did not lead: an election is under way.
            let mut electing = false;
            // Every listed address once, plus one hop to a named leader.
            for _ in 0..=count {
                let timeout = deadline.attempt_timeout(self.options.request_timeout);
                if timeout.is_zero() {
                    break;
                }
                let uri = search.current().to_owned();
                let request = call(self.master_client(&uri)?);
                let hint = match tokio::time::timeout(timeout, request).await {
                    Ok(Ok(response)) => {
                        self.prefer_master(&uri);
                        return Ok(response.into_inner());
                    }
                    Ok(Err(status)) if is_transport_failure(&status) => {
                        last = format!("{uri}: {}", describe_status(&status));
                        if is_connect_failure(&status) {
                            search.mark_down();
                        } else {
                            electing = true;
                        }
                        // A replica that does not lead names the one that does.
                        leader_hint::read(&status).and_then(|hint| normalize_addr(&hint).ok())
                    }
                    Ok(Err(status)) => return Err(ClientError::from_status(&status)),
                    Err(_) => {
                        last = format!("{uri}: no answer within {timeout:?}");
                        search.mark_down();
                        None
                    }
                };
                debug!(operation, %last, "master call failed");
                search.next(hint);
            }
            let wait = if electing {
                backoff.next_election_wait()
            } else {
                backoff.next_wait()
            };
            if !deadline.sleep(wait).await {
                return Err(ClientError::MasterUnreachable {
                    addrs: self.masters.clone(),
                    detail: format!("{operation}: {last}"),
                });
            }
        }
    }
}

/// An error with its sources, on one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        // Some errors repeat their source in their own message.
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientOptions;

    #[tokio::test]
    async fn one_channel_per_address_is_shared() -> Result<()> {
        let inner = Inner::new(["127.0.0.1:1"], ClientOptions::default())?;
        inner.tablet_conn("127.0.0.1:2")?;
        inner.tablet_conn("127.0.0.1:2")?;
        inner.tablet_conn("127.0.0.1:3")?;
        let channels = inner.channels.lock().map(|map| map.len()).unwrap_or(0);
        assert_eq!(
            channels, 2,
            "nothing connects until used, and each address once"
        );
        let first = inner.next_request_id();
        let second = inner.next_request_id();
        assert_eq!(first.client_id, second.client_id);
        assert_eq!(first.client_id.len(), 16);
        assert!(second.seq > first.seq);
        let other = Inner::new(["127.0.0.1:1"], ClientOptions::default())?;
        assert_ne!(other.next_request_id().client_id, first.client_id);
        Ok(())
    }

    #[test]
    fn addresses_get_a_scheme() {
        assert_eq!(
            normalize_addr("127.0.0.1:7420").ok().as_deref(),
            Some("http://127.0.0.1:7420")
        );
        assert_eq!(
            normalize_addr("http://master:7420").ok().as_deref(),
            Some("http://master:7420")
        );
        assert!(matches!(
            normalize_addr(" "),
            Err(ClientError::InvalidArgument { .. })
        ));
        assert!(matches!(
            normalize_addr("not an address"),
            Err(ClientError::InvalidArgument { .. })
        ));
    }
}
