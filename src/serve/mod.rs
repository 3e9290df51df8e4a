//! The server roles of the `luna` binary: `luna master`, `luna tablet-server`, and
//! `luna start`, which runs a whole local universe in one process.

pub mod faults;
pub mod grpc_metrics;
pub mod http;
pub mod master;
pub mod master_journal;
pub mod metrics;
pub mod start;
pub mod tablet;

use std::net::SocketAddr;

use crate::error::CliError;

/// Parses a listen address flag.
pub fn parse_addr(flag: &str, value: &str) -> Result<SocketAddr, CliError> {
    value.parse().map_err(|_| {
        CliError::Invalid(format!(
            "--{flag} {value}: expected HOST:PORT, e.g. 127.0.0.1:7420"
        ))
    })
}

/// Waits for Ctrl-C (or SIGTERM on Unix).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
