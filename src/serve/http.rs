//! The operations endpoints every process serves over HTTP: `/health` and `/metrics`
//! (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::faults::FaultHooks;
use crate::error::CliError;

/// Renders the process's metrics in the Prometheus text format.
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

/// A running HTTP endpoint.
pub struct HttpEndpoint {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl HttpEndpoint {
    /// Serves `/health` and `/metrics` on `addr`, and the fault hooks if given.
    pub async fn start(
        addr: SocketAddr,
        metrics: MetricsFn,
        hooks: Option<&Arc<FaultHooks>>,
    ) -> Result<HttpEndpoint, CliError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| CliError::Listen {
                addr: addr.to_string(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| CliError::Io {
            what: "reading the HTTP listener's address",
            source,
        })?;
        let mut router = Router::new()
            .route("/health", get(|| async { "ok\n" }))
            .route(
                "/metrics",
                get(move || {
                    let metrics = Arc::clone(&metrics);
                    async move {
                        ([(CONTENT_TYPE, "text/plain; version=0.0.4")], metrics()).into_response()
                    }
                }),
            );
        if let Some(hooks) = hooks {
            router = router.merge(hooks.routes());
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "HTTP endpoint failed");
            }
        });
        Ok(HttpEndpoint {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}
