//! Latency recording and the per-workload report.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies of one workload, in microseconds.
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Latencies {
    /// An empty recorder (1 µs to 60 s, 3 significant digits).
    pub fn new() -> Latencies {
        Latencies {
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("constant bounds are valid"),
        }
    }

    /// Records one operation.
    pub fn record(&mut self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.histogram.saturating_record(micros);
    }

    /// Adds another recorder's samples.
    pub fn merge(&mut self, other: &Latencies) {
        // Both share the same bounds, so adding cannot fail.
        let _ = self.histogram.add(&other.histogram);
    }

    /// The latency at quantile `q` (0 to 1), in microseconds.
    pub fn quantile(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64
    }

    /// The slowest recorded latency, in microseconds.
    pub fn max(&self) -> f64 {
        self.histogram.max() as f64
    }
}

/// A report as one line of JSON, for `--json`.
pub fn json_line(report: &impl Serialize) -> Result<String, crate::error::CliError> {
    serde_json::to_string(report).map_err(|e| crate::error::CliError::Invalid(e.to_string()))
}

/// One workload's results; printed as a line, or as JSON with `--json`.
#[derive(Debug, Serialize)]
pub struct WorkloadReport {
    /// Workload name.
    pub workload: String,
    /// Operations completed.
    pub ops: u64,
    /// Wall time.
    pub seconds: f64,
    /// Throughput.
    pub ops_per_sec: f64,
    /// Median latency.
    pub p50_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
    /// Slowest operation: shows write stalls that percentiles hide.
    pub max_us: f64,
    /// Object-store PUTs (including multipart parts).
    pub object_store_puts: u64,
    /// Object-store GETs.
    pub object_store_gets: u64,
    /// Bytes uploaded to the object store.
    pub bytes_written: u64,
    /// Keys found, for read workloads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<u64>,
}

impl WorkloadReport {
    /// Fills in throughput and latency fields.
    pub fn new(
        workload: &str,
        ops: u64,
        elapsed: Duration,
        latencies: &Latencies,
    ) -> WorkloadReport {
        let seconds = elapsed.as_secs_f64();
        WorkloadReport {
            workload: workload.to_string(),
            ops,
            seconds,
            ops_per_sec: if seconds > 0.0 {
                ops as f64 / seconds
            } else {
                0.0
            },
            p50_us: latencies.quantile(0.5),
            p99_us: latencies.quantile(0.99),
            max_us: latencies.max(),
            object_store_puts: 0,
            object_store_gets: 0,
            bytes_written: 0,
            found: None,
        }
    }

    /// A human-readable line.
    pub fn line(&self) -> String {
        let found = self
            .found
            .map(|f| format!(" found={f}"))
            .unwrap_or_default();
        format!(
            "{:<11} {:>9} ops {:>8.2} s {:>10.0} ops/s  p50 {:>5.0} us  p99 {:>5.0} us  max {:>7.0} us  puts {:>4}  gets {:>6}  written {:>6.1} MiB{found}",
            self.workload,
            self.ops,
            self.seconds,
            self.ops_per_sec,
            self.p50_us,
            self.p99_us,
            self.max_us,
            self.object_store_puts,
            self.object_store_gets,
            self.bytes_written as f64 / (1024.0 * 1024.0),
        )
    }
}
