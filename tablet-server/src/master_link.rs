//! The tablet server's link to the master replicas: calls go to the replica that answered
//! last, follow a replica's leader hint, and move on to the next address when a replica is
//! down or does not lead.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use luna_proto::leader_hint::{self, LeaderSearch};
use luna_proto::master::master_client::MasterClient;
use luna_proto::master::{GetTimestampsRequest, HeartbeatRequest, HeartbeatResponse};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

use crate::error::{Result, TabletServerError};

/// Rounds over every address one call makes before it gives up: enough to ride out an
/// election (a replica that does not know the leader yet waits for one before answering).
const ROUNDS: usize = 2;

/// Clients of the master replicas, and which one answered last.
pub(crate) struct MasterLink {
    addrs: Vec<String>,
    /// One client per address called, listed or named as leader by a replica.
    clients: Mutex<HashMap<String, MasterClient<Channel>>>,
    preferred: Mutex<String>,
}

impl MasterLink {
    /// A link to the masters at `addrs` (connected lazily, so they may start later).
    pub(crate) fn new(addrs: &[String]) -> Result<MasterLink> {
        if addrs.is_empty() {
            return Err(TabletServerError::InvalidArgument(
                "no master address was given".to_owned(),
            ));
        }
        let link = MasterLink {
            addrs: addrs.to_vec(),
            clients: Mutex::new(HashMap::new()),
            preferred: Mutex::new(addrs[0].clone()),
        };
        // Bad listed addresses fail here, at start, rather than on every call.
        for addr in addrs {
            link.client(addr)?;
        }
        Ok(link)
    }

    fn client(&self, addr: &str) -> Result<MasterClient<Channel>> {
        let mut clients = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(addr) {
            return Ok(client.clone());
        }
        let client = MasterClient::new(master_endpoint(addr)?.connect_lazy());
        clients.insert(addr.to_owned(), client.clone());
        Ok(client)
    }

    /// The addresses, for messages.
    pub(crate) fn addrs(&self) -> String {
        self.addrs.join(",")
    }

    /// Sends one heartbeat to the leading master.
    pub(crate) async fn heartbeat(
        &self,
        request: &HeartbeatRequest,
    ) -> std::result::Result<HeartbeatResponse, Status> {
        self.call(|mut client| {
            let request = request.clone();
            async move { client.heartbeat(request).await }
        })
        .await
    }

    /// One fresh timestamp, larger than every timestamp the TSO handed out before.
    pub(crate) async fn timestamp(&self) -> Result<u64> {
        let response = self
            .call(|mut client| async move {
                client
                    .get_timestamps(GetTimestampsRequest { count: 1, after: 0 })
                    .await
            })
            .await
            .map_err(|status| TabletServerError::Master {
                addr: self.addrs(),
                detail: status.message().to_owned(),
            })?;
        Ok(response.first)
    }

    /// Calls the leading master, in [`LeaderSearch`] order. Answers other than UNAVAILABLE
    /// (which is also how tonic reports transport failures) are final.
    async fn call<T, F, Fut>(&self, mut call: F) -> std::result::Result<T, Status>
    where
        F: FnMut(MasterClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let start = self
            .preferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut search = LeaderSearch::new(&self.addrs, start);
        let mut last = Status::unavailable("no master was tried");
        for _ in 0..(self.addrs.len() + 1) * ROUNDS {
            let addr = search.current().to_owned();
            let client = self
                .client(&addr)
                .map_err(|error| Status::invalid_argument(error.to_string()))?;
            match call(client).await {
                Ok(response) => {
                    *self
                        .preferred
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = addr;
                    return Ok(response.into_inner());
                }
                Err(status) if status.code() == Code::Unavailable => {
                    let hint = leader_hint::read(&status).filter(|h| master_endpoint(h).is_ok());
                    search.next(hint);
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(last)
    }
}

/// The gRPC endpoint of a master address given as `host:port` or a URL.
fn master_endpoint(addr: &str) -> Result<Endpoint> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri)
        .map(|endpoint| {
            endpoint
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5))
        })
        .map_err(|error| TabletServerError::Master {
            addr: addr.to_owned(),
            detail: format!("not a valid address: {error}"),
        })
}
