//! The tablet server's Prometheus metrics: request rates and latencies by operation and
//! outcome, and, computed at scrape time, group roles, applied indexes, journal fsyncs and
//! MemStore memory.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Latency buckets, in seconds: 50 µs to 5 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// One server's metrics, in a registry of its own (so several servers can share a
/// process, as under `luna start`).
pub(crate) struct ServerMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    pub(crate) flushes_recorded: prometheus::IntCounter,
    group_leader: IntGaugeVec,
    group_term: IntGaugeVec,
    group_applied: IntGaugeVec,
    group_tablets: IntGaugeVec,
    group_truncated: IntGaugeVec,
    memory_bytes: IntGauge,
    journal_fsyncs: IntGauge,
}

/// What a scrape reports about one group replica.
pub(crate) struct GroupSample {
    pub(crate) group_id: u64,
    pub(crate) is_leader: bool,
    pub(crate) term: u64,
    pub(crate) applied_index: u64,
    pub(crate) tablets: usize,
    pub(crate) truncated_index: u64,
}

fn gauge(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl ServerMetrics {
    /// Metrics labelled with `server_id`.
    pub(crate) fn new(server_id: u64) -> Result<ServerMetrics, prometheus::Error> {
        let registry = Registry::new_custom(
            Some("luna".to_owned()),
            Some([("server".to_owned(), server_id.to_string())].into()),
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "tablet_requests_total",
                "Tablet service requests by operation and outcome",
            ),
            &["op", "outcome"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "tablet_request_seconds",
                "Tablet service latency by operation",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )?;
        let flushes_recorded = prometheus::IntCounter::new(
            "tablet_flushes_total",
            "Tablet flushes this server recorded in a group log as leader",
        )?;
        let group_leader = IntGaugeVec::new(
            Opts::new("group_is_leader", "1 if this replica leads the group"),
            &["group"],
        )?;
        let group_term = IntGaugeVec::new(Opts::new("group_term", "Raft term"), &["group"])?;
        let group_applied = IntGaugeVec::new(
            Opts::new("group_applied_index", "Highest applied journal index"),
            &["group"],
        )?;
        let group_tablets = IntGaugeVec::new(
            Opts::new("group_tablets", "Tablets the group replica hosts"),
            &["group"],
        )?;
        let group_truncated = IntGaugeVec::new(
            Opts::new(
                "group_truncated_index",
                "The group's log is truncated up to here behind a snapshot",
            ),
            &["group"],
        )?;
        let memory_bytes = IntGauge::new("memstore_bytes", "MemStore memory of all tablets")?;
        let journal_fsyncs = IntGauge::new(
            "journal_fsyncs",
            "fsyncs of the server's raft log since it started",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(flushes_recorded.clone()))?;
        registry.register(Box::new(group_leader.clone()))?;
        registry.register(Box::new(group_term.clone()))?;
        registry.register(Box::new(group_applied.clone()))?;
        registry.register(Box::new(group_tablets.clone()))?;
        registry.register(Box::new(group_truncated.clone()))?;
        registry.register(Box::new(memory_bytes.clone()))?;
        registry.register(Box::new(journal_fsyncs.clone()))?;
        Ok(ServerMetrics {
            registry,
            requests,
            latency,
            flushes_recorded,
            group_leader,
            group_term,
            group_applied,
            group_tablets,
            group_truncated,
            memory_bytes,
            journal_fsyncs,
        })
    }

    /// Counts one request.
    pub(crate) fn observe(&self, op: &str, outcome: &str, elapsed: Duration) {
        self.requests.with_label_values(&[op, outcome]).inc();
        self.latency
            .with_label_values(&[op])
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition, after setting the scrape-time values.
    pub(crate) fn render(&self, groups: &[GroupSample], memory_bytes: u64, fsyncs: u64) -> String {
        self.group_leader.reset();
        self.group_term.reset();
        self.group_applied.reset();
        self.group_tablets.reset();
        self.group_truncated.reset();
        for group in groups {
            let label = group.group_id.to_string();
            let label = [label.as_str()];
            self.group_leader
                .with_label_values(&label)
                .set(i64::from(group.is_leader));
            self.group_term
                .with_label_values(&label)
                .set(gauge(group.term));
            self.group_applied
                .with_label_values(&label)
                .set(gauge(group.applied_index));
            self.group_tablets
                .with_label_values(&label)
                .set(gauge(group.tablets as u64));
            self.group_truncated
                .with_label_values(&label)
                .set(gauge(group.truncated_index));
        }
        self.memory_bytes.set(gauge(memory_bytes));
        self.journal_fsyncs.set(gauge(fsyncs));
        let mut out = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_requests_and_groups() {
        let metrics = ServerMetrics::new(7).expect("metrics");
        metrics.observe("get", "ok", Duration::from_micros(300));
        let text = metrics.render(
            &[GroupSample {
                group_id: 3,
                is_leader: true,
                term: 2,
                applied_index: 10,
                tablets: 4,
                truncated_index: 8,
            }],
            1024,
            5,
        );
        assert!(
            text.contains(r#"luna_tablet_requests_total{op="get",outcome="ok",server="7"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"luna_group_is_leader{group="3",server="7"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"luna_group_applied_index{group="3",server="7"} 10"#),
            "{text}"
        );
        assert!(
            text.contains(r#"luna_memstore_bytes{server="7"} 1024"#),
            "{text}"
        );
    }
}
