//! Timestamps from the master's TSO, for a new group leader's commit-timestamp floor.

use luna_proto::master::GetTimestampsRequest;
use luna_proto::master::master_client::MasterClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::{Result, TabletServerError};

/// A client of the master's timestamp oracle.
#[derive(Clone)]
pub(crate) struct TsoClient {
    addr: String,
    client: MasterClient<Channel>,
}

impl TsoClient {
    /// A client of the master at `addr` (connected lazily, so the master may start later).
    pub(crate) fn new(addr: &str) -> Result<TsoClient> {
        let channel = master_endpoint(addr)?.connect_lazy();
        Ok(TsoClient {
            addr: addr.to_owned(),
            client: MasterClient::new(channel),
        })
    }

    /// One fresh timestamp, larger than every timestamp the TSO handed out before.
    pub(crate) async fn timestamp(&self) -> Result<u64> {
        let response = self
            .client
            .clone()
            .get_timestamps(GetTimestampsRequest { count: 1 })
            .await
            .map_err(|status| TabletServerError::Master {
                addr: self.addr.clone(),
                detail: status.message().to_owned(),
            })?;
        Ok(response.into_inner().first)
    }
}

/// The gRPC endpoint of a master address given as `host:port` or a URL.
pub(crate) fn master_endpoint(addr: &str) -> Result<Endpoint> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri)
        .map(|endpoint| {
            endpoint
                .tcp_nodelay(true)
                .connect_timeout(std::time::Duration::from_secs(2))
                .timeout(std::time::Duration::from_secs(5))
        })
        .map_err(|error| TabletServerError::Master {
            addr: addr.to_owned(),
            detail: format!("not a valid address: {error}"),
        })
}
