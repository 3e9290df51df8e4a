//! A tower layer that counts a gRPC server's requests by method and status, and times them
//! (to the response headers), into a Prometheus registry. The master's service uses it; the
//! tablet service counts its own requests by typed outcome.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tower::{Layer, Service};

/// Latency buckets, in seconds: 50 µs to 5 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// Request counters and latencies of one gRPC server.
#[derive(Clone)]
pub struct GrpcMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl GrpcMetrics {
    /// Registers `{prefix}_requests_total{method,code}` and `{prefix}_request_seconds{method}`.
    pub fn register(registry: &Registry, prefix: &str) -> Result<GrpcMetrics, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                format!("{prefix}_requests_total"),
                "gRPC requests by method and status",
            ),
            &["method", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                format!("{prefix}_request_seconds"),
                "gRPC latency by method",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(GrpcMetrics { requests, latency })
    }
}

impl<S> Layer<S> for GrpcMetrics {
    type Service = Measured<S>;

    fn layer(&self, inner: S) -> Measured<S> {
        Measured {
            inner,
            metrics: self.clone(),
        }
    }
}

/// A service wrapped by [`GrpcMetrics`].
#[derive(Clone)]
pub struct Measured<S> {
    inner: S,
    metrics: GrpcMetrics,
}

impl<S, B, R> Service<http::Request<B>> for Measured<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // "/luna.master.v1.Master/GetTimestamps" -> "GetTimestamps".
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                // A failed unary call is "trailers only": its status is in the headers.
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|code| code.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Err(_) => "transport".to_owned(),
            };
            metrics
                .requests
                .with_label_values(&[method.as_str(), code.as_str()])
                .inc();
            metrics
                .latency
                .with_label_values(&[method.as_str()])
                .observe(started.elapsed().as_secs_f64());
            response
        })
    }
}
