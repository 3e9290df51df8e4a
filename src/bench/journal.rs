//! `luna bench journal`: replicated appends on raft journal streams.
//!
//! Starts `--replicas` journal servers in this process, connected by the gRPC transport
//! over loopback, each hosting a replica of every one of `--streams` streams. The
//! `--appenders` concurrent appenders are spread over the streams; each appends
//! `--entry-size`-byte entries to its stream's current leader, one at a time, for
//! `--duration` seconds. Commit latency is the time from `append` to its acknowledgement
//! (fsynced on a quorum). `--idle-streams` more streams get no appends at all; the report's
//! process CPU (user + system, from `getrusage`) over the timed window, divided by the
//! number of servers, is what one server spends on them (with `--appenders 0`, nothing
//! else runs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use luna_journal::raft::grpc::GrpcNode;
use luna_journal::raft::{RaftConfig, RaftStream};
use luna_kernel::stream::{Stream, StreamError};
use serde::Serialize;
use tokio::net::TcpListener;

use super::report::{Latencies, WorkloadReport};
use crate::error::CliError;
use crate::harness::workdir::WorkDir;

/// Flags of `luna bench journal`.
#[derive(Debug, Args)]
pub struct JournalBenchArgs {
    /// Streams, each replicated on every server.
    #[arg(long, default_value_t = 1)]
    streams: u64,
    /// Servers (and so replicas per stream).
    #[arg(long, default_value_t = 3)]
    replicas: u64,
    /// Concurrent appenders, spread round-robin over the streams (0: only measure CPU).
    #[arg(long, default_value_t = 64)]
    appenders: u64,
    /// Extra streams, replicated on every server like the others, that get no appends.
    #[arg(long, default_value_t = 0)]
    idle_streams: u64,
    /// Entry size in bytes.
    #[arg(long, default_value_t = 128)]
    entry_size: usize,
    /// Seconds of appending.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Directory for the servers' logs (default: a new directory under the system temp
    /// directory, deleted at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// The benchmark's results.
#[derive(Debug, Serialize)]
struct JournalReport {
    streams: u64,
    idle_streams: u64,
    replicas: u64,
    appenders: u64,
    entry_size: usize,
    /// Acknowledged (committed) appends.
    appends: u64,
    seconds: f64,
    appends_per_sec: f64,
    /// Commit latency percentiles, in microseconds.
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// fsyncs of all servers together, per second.
    fsyncs_per_sec: f64,
    /// Acknowledged entry bytes per second (payload, not counting replication).
    bytes_per_sec: f64,
    /// Appends retried because leadership moved.
    not_leader_retries: u64,
    /// CPU time of the whole process (all servers, appenders and transport), in percent
    /// of one core.
    cpu_percent: f64,
    /// `cpu_percent` divided by the number of servers.
    cpu_percent_per_server: f64,
}

/// Runs the benchmark and prints its report.
pub async fn run(args: JournalBenchArgs) -> Result<(), CliError> {
    if args.streams == 0 || args.replicas == 0 || args.entry_size == 0 {
        return Err(CliError::Invalid(
            "--streams, --replicas and --entry-size must be at least 1".into(),
        ));
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err(CliError::Invalid("--duration must be positive".into()));
    }
    let dir = WorkDir::new("journal", args.dir.as_deref())?;
    let result = bench(&args, &dir.path).await;
    drop(dir);
    let report = result?;
    if args.json {
        let line = super::report::json_line(&report)?;
        println!("{line}");
    } else {
        println!(
            "journal  streams {} (+{} idle) replicas {} appenders {} entry {} B: {:.0} appends/s  commit p50 {:.0} us  p99 {:.0} us  max {:.0} us  {:.0} fsyncs/s  {:.1} MiB/s  cpu {:.1}% ({:.2}% per server)  ({} appends in {:.1} s, {} leader retries)",
            report.streams,
            report.idle_streams,
            report.replicas,
            report.appenders,
            report.entry_size,
            report.appends_per_sec,
            report.p50_us,
            report.p99_us,
            report.max_us,
            report.fsyncs_per_sec,
            report.bytes_per_sec / (1024.0 * 1024.0),
            report.cpu_percent,
            report.cpu_percent_per_server,
            report.appends,
            report.seconds,
            report.not_leader_retries,
        );
    }
    Ok(())
}

/// Every replica of every stream: `replicas[stream][server]`.
type Replicas = Vec<Vec<Arc<RaftStream>>>;

async fn bench(args: &JournalBenchArgs, dir: &std::path::Path) -> Result<JournalReport, CliError> {
    let mut listeners = Vec::new();
    let mut addrs: HashMap<u64, SocketAddr> = HashMap::new();
    for id in 1..=args.replicas {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| CliError::Io {
                what: "binding a loopback port",
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| CliError::Io {
            what: "reading a listener's address",
            source,
        })?;
        addrs.insert(id, addr);
        listeners.push(listener);
    }
    let voters: Vec<u64> = (1..=args.replicas).collect();
    let mut servers = Vec::new();
    for (id, listener) in (1..=args.replicas).zip(listeners) {
        let config = RaftConfig::new(id, dir.join(format!("server-{id}")));
        let server =
            GrpcNode::start(config, listener, &addrs).map_err(|source| CliError::Journal {
                what: "starting a journal server",
                source,
            })?;
        servers.push(server);
    }
    let result = drive(args, &servers, &voters).await;
    for server in servers {
        server.shutdown().await;
    }
    result
}

async fn drive(
    args: &JournalBenchArgs,
    servers: &[GrpcNode],
    voters: &[u64],
) -> Result<JournalReport, CliError> {
    let mut replicas: Replicas = Vec::new();
    for stream_id in 1..=args.streams + args.idle_streams {
        let mut streams = Vec::new();
        for server in servers {
            let stream = server
                .node()
                .add_stream(stream_id, voters)
                .await
                .map_err(|source| CliError::Journal {
                    what: "adding a stream",
                    source,
                })?;
            streams.push(Arc::new(stream));
        }
        replicas.push(streams);
    }
    let replicas = Arc::new(replicas);
    // Every stream elects a leader before the clock starts.
    let election_deadline = Instant::now() + Duration::from_secs(30);
    for streams in replicas.iter() {
        while leader_of(streams).is_none() {
            if Instant::now() > election_deadline {
                return Err(CliError::Invalid(
                    "no leader was elected within 30 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let fsyncs_before: u64 = servers.iter().map(|s| s.node().stats().fsyncs).sum();
    let cpu_before = process_cpu()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration);
    let payload = Bytes::from(vec![0x5a; args.entry_size]);
    let mut workers = Vec::new();
    for appender in 0..args.appenders {
        let replicas = Arc::clone(&replicas);
        let payload = payload.clone();
        let stream = (appender % args.streams) as usize;
        workers.push(tokio::spawn(async move {
            append_until(&replicas[stream], payload, deadline).await
        }));
    }
    if workers.is_empty() {
        tokio::time::sleep_until(deadline.into()).await;
    }
    let mut latencies = Latencies::new();
    let (mut appends, mut retries) = (0, 0);
    for worker in workers {
        let (worker_appends, worker_retries, worker_latencies) = worker
            .await
            .map_err(|e| CliError::Invalid(format!("appender failed: {e}")))??;
        appends += worker_appends;
        retries += worker_retries;
        latencies.merge(&worker_latencies);
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu()?.saturating_sub(cpu_before);
    let fsyncs_after: u64 = servers.iter().map(|s| s.node().stats().fsyncs).sum();
    // The shared report computes the percentiles.
    let shared = WorkloadReport::new("journal", appends, elapsed, &latencies);
    let seconds = elapsed.as_secs_f64();
    let cpu_percent = 100.0 * cpu.as_secs_f64() / seconds;
    Ok(JournalReport {
        streams: args.streams,
        idle_streams: args.idle_streams,
        replicas: args.replicas,
        appenders: args.appenders,
        entry_size: args.entry_size,
        appends,
        seconds,
        appends_per_sec: shared.ops_per_sec,
        p50_us: shared.p50_us,
        p99_us: shared.p99_us,
        max_us: shared.max_us,
        fsyncs_per_sec: (fsyncs_after - fsyncs_before) as f64 / seconds,
        bytes_per_sec: (appends * args.entry_size as u64) as f64 / seconds,
        not_leader_retries: retries,
        cpu_percent,
        cpu_percent_per_server: cpu_percent / args.replicas as f64,
    })
}

/// User plus system CPU time of this process so far.
fn process_cpu() -> Result<Duration, CliError> {
    // SAFETY: `getrusage` only writes the `rusage` it is given, which is zeroed plain data.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `rusage` that lives across the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Err(CliError::Io {
            what: "reading the process's CPU time",
            source: std::io::Error::last_os_error(),
        });
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Ok(time(usage.ru_utime) + time(usage.ru_stime))
}

fn leader_of(streams: &[Arc<RaftStream>]) -> Option<&Arc<RaftStream>> {
    streams.iter().find(|s| s.leadership().is_leader)
}

/// One appender: appends to the stream's leader until `deadline`; returns acknowledged
/// appends, `NotLeader` retries and commit latencies.
async fn append_until(
    streams: &[Arc<RaftStream>],
    payload: Bytes,
    deadline: Instant,
) -> Result<(u64, u64, Latencies), CliError> {
    let mut latencies = Latencies::new();
    let (mut appends, mut retries) = (0u64, 0u64);
    while Instant::now() < deadline {
        let Some(leader) = leader_of(streams) else {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        };
        let started = Instant::now();
        match leader.append(payload.clone()).await {
            Ok(_) => {
                latencies.record(started.elapsed());
                appends += 1;
            }
            Err(StreamError::NotLeader { .. }) => retries += 1,
            Err(source) => {
                return Err(CliError::Stream {
                    what: "appending",
                    source,
                });
            }
        }
    }
    Ok((appends, retries, latencies))
}
