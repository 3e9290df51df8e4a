//! The operations endpoints every process serves over HTTP: `/health` (200 `ok`, or 503
//! with the reason a process can no longer serve) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
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

/// Why the process can no longer serve, if it cannot (a tablet server whose journal failed).
pub type HealthFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

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
        health: HealthFn,
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
            .route(
                "/health",
                get(move || {
                    let failure = health();
                    async move {
                        match failure {
                            None => (StatusCode::OK, "ok\n".to_owned()),
                            Some(why) => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("unhealthy: {why}\n"),
                            ),
                        }
                    }
                }),
            )
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get_health(addr: SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn health_answers_503_with_the_reason_once_the_process_cannot_serve() {
        let failed = Arc::new(AtomicBool::new(false));
        let health: HealthFn = {
            let failed = Arc::clone(&failed);
            Arc::new(move || {
                failed
                    .load(Ordering::Relaxed)
                    .then(|| "the journal failed: fsync".to_owned())
            })
        };
        let endpoint = HttpEndpoint::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Arc::new(String::new),
            health,
            None,
        )
        .await
        .expect("start");
        let healthy = get_health(endpoint.addr()).await;
        assert!(healthy.starts_with("HTTP/1.1 200"), "{healthy}");
        assert!(healthy.ends_with("ok\n"), "{healthy}");
        failed.store(true, Ordering::Relaxed);
        let unhealthy = get_health(endpoint.addr()).await;
        assert!(unhealthy.starts_with("HTTP/1.1 503"), "{unhealthy}");
        assert!(
            unhealthy.ends_with("unhealthy: the journal failed: fsync\n"),
            "{unhealthy}"
        );
        endpoint.stop().await;
    }
}
