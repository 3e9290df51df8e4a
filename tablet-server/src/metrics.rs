//! The tablet server's Prometheus metrics: request rates and latencies by operation and
//! outcome, the stages of a leader's group commit, and, computed at scrape time, group
//! roles, applied indexes, journal fsyncs and MemStore memory.

use std::time::Duration;

use luna_journal::raft::NodeStats;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets, in seconds: 50 µs to 5 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// Buckets of writes per journal entry: 1 to 4096.
const BATCH_BUCKETS: [f64; 13] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// One server's metrics, in a registry of its own (so several servers can share a
/// process, as under `luna start`).
pub(crate) struct ServerMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    pub(crate) flushes_recorded: prometheus::IntCounter,
    /// A write's wait in its group's queue, from arrival to its batch's proposal (leaders).
    pub(crate) write_queue_seconds: Histogram,
    /// A batch's journal commit, from proposal to committed (leaders).
    pub(crate) commit_seconds: Histogram,
    /// A committed batch's wait until this replica applied it (leaders).
    pub(crate) apply_wait_seconds: Histogram,
    /// Writes per batch, one journal entry each (leaders).
    pub(crate) batch_writes: Histogram,
    /// Per-group gauges, each with how a scrape reads its value off a sample.
    group_gauges: Vec<(IntGaugeVec, SampleValue)>,
    memory_bytes: IntGauge,
    /// The journal's gauges, each with how a scrape reads its value off the node's stats.
    journal_gauges: Vec<(IntGauge, JournalValue)>,
}

/// What a scrape reports about one group replica.
pub(crate) struct GroupSample {
    pub(crate) group_id: u64,
    pub(crate) is_leader: bool,
    pub(crate) term: u64,
    pub(crate) applied_index: u64,
    pub(crate) tablets: usize,
    pub(crate) truncated_index: u64,
    pub(crate) txn_locks: usize,
    pub(crate) txn_records: usize,
    pub(crate) txn_safe_point: u64,
    pub(crate) dedup_requests: usize,
    pub(crate) dedup_clients: usize,
}

/// Reads one gauge's value off a group sample.
type SampleValue = fn(&GroupSample) -> u64;

/// Name, help and value of each per-group gauge.
const GROUP_GAUGES: [(&str, &str, SampleValue); 10] = [
    (
        "group_is_leader",
        "1 if this replica leads the group",
        |g| u64::from(g.is_leader),
    ),
    ("group_term", "Raft term", |g| g.term),
    (
        "group_applied_index",
        "Highest applied journal index",
        |g| g.applied_index,
    ),
    ("group_tablets", "Tablets the group replica hosts", |g| {
        g.tablets as u64
    }),
    (
        "group_truncated_index",
        "The group's log is truncated up to here behind a snapshot",
        |g| g.truncated_index,
    ),
    (
        "group_txn_locks",
        "Keys locked by transactions that have not committed or rolled back",
        |g| g.txn_locks as u64,
    ),
    (
        "group_txn_records",
        "Outcomes of transactions whose primary key is in the group, kept to resolve their locks",
        |g| g.txn_records as u64,
    ),
    (
        "group_txn_safe_point",
        "The GC safe point the group's log applied: no older transaction locks anything",
        |g| g.txn_safe_point,
    ),
    (
        "group_dedup_requests",
        "Request ids of applied writes the group remembers, to answer retries",
        |g| g.dedup_requests as u64,
    ),
    (
        "group_dedup_clients",
        "Clients whose done_below the group remembers",
        |g| g.dedup_clients as u64,
    ),
];

/// Reads one gauge's value off the journal node's stats.
type JournalValue = fn(&NodeStats) -> u64;

/// Name, help and value of each journal gauge.
const JOURNAL_GAUGES: [(&str, &str, JournalValue); 8] = [
    (
        "journal_fsyncs",
        "fsyncs of the server's raft log since it started",
        |j| j.fsyncs,
    ),
    (
        "journal_sync_microseconds",
        "Time the raft log's writes with fsync took since the server started, in microseconds (over journal_fsyncs: the mean)",
        |j| j.sync_micros,
    ),
    (
        "journal_peer_batches_dropped",
        "Batches of peers' raft messages dropped since the server started, because its raft driver was too far behind on them",
        |j| j.peer_batches_dropped,
    ),
    (
        "journal_peer_bytes_queued",
        "Bytes of peers' raft messages waiting for the server's raft driver",
        |j| j.peer_bytes_queued as u64,
    ),
    (
        "journal_unsynced_bytes",
        "Bytes of raft log writes waiting behind the fsync in flight",
        |j| j.unsynced_bytes as u64,
    ),
    (
        "journal_proposals_refused",
        "Proposals refused since the server started because its disk was behind (answered Busy)",
        |j| j.proposals_refused,
    ),
    (
        "journal_peer_appends_dropped",
        "Peers' raft appends dropped since the server started because its disk was behind",
        |j| j.peer_appends_dropped,
    ),
    (
        "journal_disk_behind",
        "1 while the journal's unsynced writes are over their bound: the server refuses writes, and the master moves its leaderships away",
        |j| u64::from(j.disk_behind),
    ),
];

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
        let stage = |name: &str, help: &str, buckets: &[f64]| {
            let histogram =
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
            registry.register(Box::new(histogram.clone()))?;
            Ok::<_, prometheus::Error>(histogram)
        };
        let write_queue_seconds = stage(
            "group_write_queue_seconds",
            "Leader: a write's wait in its group's queue until its batch was proposed",
            &LATENCY_BUCKETS,
        )?;
        let commit_seconds = stage(
            "group_commit_seconds",
            "Leader: from proposing a batch of writes to the journal until it committed",
            &LATENCY_BUCKETS,
        )?;
        let apply_wait_seconds = stage(
            "group_apply_wait_seconds",
            "Leader: from a batch's commit until this replica applied it",
            &LATENCY_BUCKETS,
        )?;
        let batch_writes = stage(
            "group_batch_writes",
            "Leader: writes per batch, one journal entry each",
            &BATCH_BUCKETS,
        )?;
        let mut group_gauges = Vec::with_capacity(GROUP_GAUGES.len());
        for (name, help, value) in GROUP_GAUGES {
            let gauges = IntGaugeVec::new(Opts::new(name, help), &["group"])?;
            registry.register(Box::new(gauges.clone()))?;
            group_gauges.push((gauges, value));
        }
        let memory_bytes = IntGauge::new("memstore_bytes", "MemStore memory of all tablets")?;
        let mut journal_gauges = Vec::with_capacity(JOURNAL_GAUGES.len());
        for (name, help, value) in JOURNAL_GAUGES {
            let gauge = IntGauge::new(name, help)?;
            registry.register(Box::new(gauge.clone()))?;
            journal_gauges.push((gauge, value));
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(flushes_recorded.clone()))?;
        registry.register(Box::new(memory_bytes.clone()))?;
        Ok(ServerMetrics {
            registry,
            requests,
            latency,
            flushes_recorded,
            write_queue_seconds,
            commit_seconds,
            apply_wait_seconds,
            batch_writes,
            group_gauges,
            memory_bytes,
            journal_gauges,
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
    pub(crate) fn render(
        &self,
        groups: &[GroupSample],
        memory_bytes: u64,
        journal: &NodeStats,
    ) -> String {
        for (gauges, value) in &self.group_gauges {
            gauges.reset();
            for group in groups {
                gauges
                    .with_label_values(&[group.group_id.to_string().as_str()])
                    .set(gauge(value(group)));
            }
        }
        self.memory_bytes.set(gauge(memory_bytes));
        for (journal_gauge, value) in &self.journal_gauges {
            journal_gauge.set(gauge(value(journal)));
        }
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
        metrics.commit_seconds.observe(0.0007);
        metrics.batch_writes.observe(5.0);
        let text = metrics.render(
            &[GroupSample {
                group_id: 3,
                is_leader: true,
                term: 2,
                applied_index: 10,
                tablets: 4,
                truncated_index: 8,
                txn_locks: 2,
                txn_records: 3,
                txn_safe_point: 99,
                dedup_requests: 64,
                dedup_clients: 1,
            }],
            1024,
            &NodeStats {
                fsyncs: 5,
                sync_micros: 1500,
                rounds: 6,
                peer_batches_dropped: 2,
                peer_bytes_queued: 4096,
                unsynced_bytes: 8192,
                proposals_refused: 3,
                peer_appends_dropped: 4,
                disk_behind: true,
            },
        );
        for line in [
            r#"luna_journal_fsyncs{server="7"} 5"#,
            r#"luna_journal_sync_microseconds{server="7"} 1500"#,
            r#"luna_journal_peer_batches_dropped{server="7"} 2"#,
            r#"luna_journal_peer_bytes_queued{server="7"} 4096"#,
            r#"luna_journal_unsynced_bytes{server="7"} 8192"#,
            r#"luna_journal_proposals_refused{server="7"} 3"#,
            r#"luna_journal_peer_appends_dropped{server="7"} 4"#,
            r#"luna_journal_disk_behind{server="7"} 1"#,
            r#"luna_tablet_requests_total{op="get",outcome="ok",server="7"} 1"#,
            r#"luna_group_is_leader{group="3",server="7"} 1"#,
            r#"luna_group_applied_index{group="3",server="7"} 10"#,
            r#"luna_memstore_bytes{server="7"} 1024"#,
            r#"luna_group_txn_records{group="3",server="7"} 3"#,
            r#"luna_group_dedup_requests{group="3",server="7"} 64"#,
            r#"luna_group_commit_seconds_bucket{server="7",le="0.001"} 1"#,
            r#"luna_group_commit_seconds_bucket{server="7",le="0.0005"} 0"#,
            r#"luna_group_batch_writes_bucket{server="7",le="4"} 0"#,
            r#"luna_group_batch_writes_bucket{server="7",le="8"} 1"#,
        ] {
            assert!(text.contains(line), "{line} is missing from:\n{text}");
        }
    }
}
