//! The retry policy: what is retried, how, with which request id, and until when.

use std::time::Duration;

use luna_client::{Client, ClientError, ReadOptions};
use luna_proto::master::Partitioning;
use tokio::time::Instant;

use crate::fake::{
    Harness, Scripted, TestResult, busy, fast_options, not_leader, outcome_unknown,
    snapshot_too_old,
};

/// A collection of one tablet led by server 0 of `servers`.
async fn single_tablet(servers: usize) -> Result<(Harness, Vec<u64>), Box<dyn std::error::Error>> {
    let harness = Harness::start(servers).await?;
    let ids = harness.add_collection("db", "c", Partitioning::Range, &[(b"", None, 0)]);
    Ok((harness, ids))
}

#[tokio::test]
async fn not_leader_with_a_hint_goes_to_the_leader_at_once() -> TestResult {
    let (harness, ids) = single_tablet(2).await?;
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    coll.get("warm").await?;
    // Leadership moves to server 1; the master has not noticed.
    harness.universe.update(ids[0], |meta| meta.leader = 1);
    coll.put("k", "v").await?;
    let writes: Vec<_> = harness
        .all_seen()
        .into_iter()
        .filter(|s| s.method == "write")
        .collect();
    assert_eq!(writes.len(), 2, "refused by server 0, served by server 1");
    assert_eq!(writes[0].request_id, writes[1].request_id);
    assert_eq!(
        harness.master.routing_calls(),
        1,
        "a hint needs no routing refresh"
    );
    // The hint is remembered: the next request goes to server 1 directly.
    coll.get("k").await?;
    assert_eq!(harness.servers[0].seen().len(), 2);
    Ok(())
}

#[tokio::test]
async fn not_leader_without_a_hint_refreshes_the_routing() -> TestResult {
    let (harness, ids) = single_tablet(2).await?;
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    coll.get("warm").await?;
    harness.universe.update(ids[0], |meta| meta.leader = 1);
    harness.publish("db", "c");
    harness.servers[0].push(not_leader(""));
    coll.put("k", "v").await?;
    assert_eq!(harness.master.routing_calls(), 2);
    assert_eq!(
        harness.servers[1].seen().len(),
        1,
        "the refreshed routing names server 1"
    );
    Ok(())
}

#[tokio::test]
async fn epoch_mismatch_refreshes_the_routing() -> TestResult {
    let (harness, ids) = single_tablet(1).await?;
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    coll.put("k", "v1").await?;
    harness.universe.update(ids[0], |meta| meta.epoch = 2);
    harness.publish("db", "c");
    coll.put("k", "v2").await?;
    let seen = harness.servers[0].seen();
    let epochs: Vec<u64> = seen.iter().map(|s| s.tablet.epoch).collect();
    assert_eq!(epochs, vec![1, 1, 2]);
    assert_eq!(
        seen[1].request_id, seen[2].request_id,
        "same write, same id"
    );
    assert_eq!(harness.master.routing_calls(), 2);
    assert_eq!(coll.get("k").await?.as_deref(), Some(&b"v2"[..]));
    Ok(())
}

#[tokio::test]
async fn a_write_keeps_its_request_id_across_retries() -> TestResult {
    let (harness, _) = single_tablet(1).await?;
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    let server = &harness.servers[0];
    server.push(Scripted::Status(tonic::Code::Unavailable));
    server.push(busy(5));
    server.push(Scripted::Error(Default::default()));
    coll.put("k", "v").await?;
    coll.put("k2", "v").await?;
    let ids = server.request_ids();
    assert_eq!(ids.len(), 5);
    assert!(ids[..4].iter().all(|id| *id == ids[0]), "{ids:?}");
    assert_eq!(ids[0].client_id.len(), 16);
    assert_eq!(ids[4].client_id, ids[0].client_id);
    assert!(ids[4].seq > ids[0].seq);
    Ok(())
}

#[tokio::test]
async fn invalid_argument_and_snapshot_too_old_are_not_retried() -> TestResult {
    let (harness, _) = single_tablet(1).await?;
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    let server = &harness.servers[0];
    server.push(Scripted::Status(tonic::Code::InvalidArgument));
    assert!(matches!(
        coll.put("k", "v").await,
        Err(ClientError::InvalidArgument { .. })
    ));
    assert_eq!(server.seen().len(), 1);
    server.push(snapshot_too_old(500));
    let error = coll.get_with("k", &ReadOptions::stale(100)).await;
    assert!(
        matches!(
            error,
            Err(ClientError::SnapshotTooOld {
                read_ts: 100,
                safe_point: 500
            })
        ),
        "{error:?}"
    );
    assert_eq!(server.seen().len(), 2);
    Ok(())
}

/// Runs `operation` on a client with a 300 ms deadline and checks it ends in time.
async fn within_deadline<T>(
    harness: &Harness,
    operation: impl AsyncFnOnce(luna_client::Collection) -> Result<T, ClientError>,
) -> Result<ClientError, Box<dyn std::error::Error>> {
    let options = fast_options()
        .request_timeout(Duration::from_millis(100))
        .operation_timeout(Duration::from_millis(300));
    let client = Client::connect_with([harness.master_addr.as_str()], options).await?;
    let coll = client.database("db").collection("c");
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(5), operation(coll)).await?;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250),
        "gave up early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "overran its deadline: {elapsed:?}"
    );
    match result {
        Ok(_) => Err("expected the deadline to pass".into()),
        Err(error) => Ok(error),
    }
}

#[tokio::test]
async fn the_deadline_ends_busy_retries() -> TestResult {
    let (harness, _) = single_tablet(1).await?;
    harness.servers[0].set_always(Some(busy(20)));
    let error = within_deadline(&harness, async |coll| coll.get("k").await).await?;
    assert!(matches!(error, ClientError::Timeout { .. }), "{error}");
    assert!(error.is_retryable());
    assert!(harness.servers[0].seen().len() >= 5, "retried while busy");
    Ok(())
}

#[tokio::test]
async fn the_deadline_ends_leaders_that_point_at_each_other() -> TestResult {
    let (harness, _) = single_tablet(2).await?;
    let (a, b) = (
        harness.servers[0].addr.clone(),
        harness.servers[1].addr.clone(),
    );
    harness.servers[0].set_always(Some(not_leader(&b)));
    harness.servers[1].set_always(Some(not_leader(&a)));
    let error = within_deadline(&harness, async |coll| coll.get("k").await).await?;
    assert!(matches!(error, ClientError::Timeout { .. }), "{error}");
    for server in &harness.servers {
        assert!(server.seen().len() >= 3, "hints were followed");
    }
    Ok(())
}

#[tokio::test]
async fn a_write_that_never_answers_has_an_unknown_outcome() -> TestResult {
    let (harness, _) = single_tablet(1).await?;
    harness.servers[0].set_always(Some(Scripted::Hang));
    let error = within_deadline(&harness, async |coll| coll.put("k", "v").await).await?;
    assert!(
        matches!(error, ClientError::OutcomeUnknown { .. }),
        "{error}"
    );
    let ids = harness.servers[0].request_ids();
    assert!(ids.len() >= 2, "retried");
    assert!(ids.iter().all(|id| *id == ids[0]));
    // A read that never answers just times out.
    let error = within_deadline(&harness, async |coll| coll.get("k").await).await?;
    assert!(matches!(error, ClientError::Unavailable { .. }), "{error}");
    Ok(())
}

#[tokio::test]
async fn an_unknown_outcome_is_retried_on_the_same_server_under_the_same_id() -> TestResult {
    let (harness, _) = single_tablet(2).await?;
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    let leader = &harness.servers[0];
    leader.push(outcome_unknown());
    leader.push(outcome_unknown());
    coll.put("k", "v").await?;
    let ids = leader.request_ids();
    assert_eq!(ids.len(), 3, "two unknown outcomes, then the answer");
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    // The server answered, so nothing marks it down: no other replica was tried, and the
    // routing was not fetched again (an UNAVAILABLE would have done both).
    coll.get("k").await?;
    assert_eq!(leader.seen().len(), 4);
    assert!(harness.servers[1].seen().is_empty());
    assert_eq!(harness.master.routing_calls(), 1);
    Ok(())
}

#[tokio::test]
async fn a_write_whose_outcome_stays_unknown_says_so_at_the_deadline() -> TestResult {
    let (harness, _) = single_tablet(1).await?;
    harness.servers[0].set_always(Some(outcome_unknown()));
    let error = within_deadline(&harness, async |coll| coll.put("k", "v").await).await?;
    assert!(
        matches!(error, ClientError::OutcomeUnknown { .. }),
        "{error}"
    );
    // A read applies nothing: it just runs out of time.
    let error = within_deadline(&harness, async |coll| coll.get("k").await).await?;
    assert!(matches!(error, ClientError::Timeout { .. }), "{error}");
    Ok(())
}

#[tokio::test]
async fn an_answer_of_a_kind_the_sdk_does_not_know_may_have_applied_a_write() -> TestResult {
    let (harness, _) = single_tablet(1).await?;
    // What a newer server's new kind of tablet error decodes to here.
    harness.servers[0].set_always(Some(Scripted::Error(Default::default())));
    let error = within_deadline(&harness, async |coll| coll.put("k", "v").await).await?;
    assert!(
        matches!(error, ClientError::OutcomeUnknown { .. }),
        "{error}"
    );
    // Refusals the SDK knows, until the deadline, leave a write surely not applied.
    harness.servers[0].set_always(Some(busy(5)));
    let error = within_deadline(&harness, async |coll| coll.put("k", "v").await).await?;
    assert!(matches!(error, ClientError::Timeout { .. }), "{error}");
    Ok(())
}

/// A plain write commits above every timestamp its client saw, so a snapshot the client
/// took before the write does not see it, even when the write lands in the millisecond of
/// the snapshot's TSO timestamp.
#[tokio::test]
async fn a_write_commits_above_every_timestamp_its_client_saw() -> TestResult {
    let (harness, _) = single_tablet(1).await?;
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    let snapshot = client.timestamp().await?;
    coll.put("k", "v1").await?;
    // The fake answers commit timestamp 1000 + the request's sequence number.
    coll.put("k", "v2").await?;
    let floors = harness.servers[0]
        .commit_floors
        .lock()
        .map_err(|_| "poisoned")?
        .clone();
    assert_eq!(floors.len(), 2);
    assert!(floors[0] >= snapshot, "{floors:?} against {snapshot}");
    assert!(
        floors[1] > floors[0],
        "the first write's commit timestamp counts: {floors:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_unreachable_master_is_a_typed_error() -> TestResult {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    drop(listener);
    let started = Instant::now();
    let result = Client::connect_with([addr.as_str()], fast_options()).await;
    match result {
        Err(ClientError::MasterUnreachable { addrs, .. }) => assert_eq!(addrs, vec![addr.clone()]),
        other => return Err(format!("expected MasterUnreachable, got {other:?}").into()),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(matches!(
        Client::connect(Vec::<String>::new()).await,
        Err(ClientError::InvalidArgument { .. })
    ));
    // A dead first address fails over to a live one.
    let harness = Harness::start(0).await?;
    let client = Client::connect_with(
        [addr.as_str(), harness.master_addr.as_str()],
        fast_options(),
    )
    .await?;
    client.timestamp().await?;
    Ok(())
}

#[tokio::test]
async fn a_write_to_a_server_that_refuses_connections_surely_did_not_apply() -> TestResult {
    let (harness, _) = single_tablet(1).await?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let dead = listener.local_addr()?.to_string();
    drop(listener);
    harness
        .universe
        .server_addrs
        .lock()
        .map_err(|_| "poisoned")?[0] = dead.clone();
    harness.publish("db", "c");
    let error = within_deadline(&harness, async |coll| coll.put("k", "v").await).await?;
    match error {
        ClientError::Unavailable { addr, .. } => assert_eq!(addr, dead),
        other => return Err(format!("expected Unavailable, got {other}").into()),
    }
    Ok(())
}

#[tokio::test]
async fn a_replica_that_does_not_lead_sends_the_client_to_the_leader() -> TestResult {
    let (follower, _) = single_tablet(1).await?;
    let (leader, _) = single_tablet(1).await?;
    follower
        .master
        .unavailable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    *follower.master.leader_hint.lock().map_err(|_| "poisoned")? = Some(leader.master_addr.clone());
    // Only the follower's address is given: the hint is the way to the leader.
    let client = Client::connect_with([follower.master_addr.as_str()], fast_options()).await?;
    let coll = client.database("db").collection("c");
    coll.put("k", "v").await?;
    assert_eq!(
        follower.master.routing_calls(),
        1,
        "asked the given address"
    );
    assert_eq!(leader.master.routing_calls(), 1, "then the one it named");
    assert_eq!(leader.servers[0].seen().len(), 1);
    // The leader is remembered: the next lookup (of a collection it does not know) goes
    // straight there.
    let unknown = client.database("db").collection("c2").get("k").await;
    assert!(
        matches!(unknown, Err(ClientError::NotFound { .. })),
        "{unknown:?}"
    );
    assert_eq!(leader.master.routing_calls(), 2);
    assert_eq!(
        follower.master.routing_calls(),
        1,
        "the follower was not asked again"
    );
    Ok(())
}

#[tokio::test]
async fn master_calls_fail_over_and_end_in_a_typed_error() -> TestResult {
    let (first, _) = single_tablet(1).await?;
    let (second, _) = single_tablet(1).await?;
    first
        .master
        .unavailable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let addrs = [first.master_addr.as_str(), second.master_addr.as_str()];
    let client = Client::connect_with(addrs, fast_options()).await?;
    let coll = client.database("db").collection("c");
    coll.put("k", "v").await?;
    assert_eq!(first.master.routing_calls(), 1, "tried first");
    assert_eq!(
        second.master.routing_calls(),
        1,
        "answered by the next address"
    );
    assert_eq!(second.servers[0].seen().len(), 1);
    // With no master answering, a routing fetch ends in MasterUnreachable at the deadline.
    second
        .master
        .unavailable
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let error = within_deadline(&second, async |coll| coll.get("k").await).await?;
    match error {
        ClientError::MasterUnreachable { addrs, .. } => {
            assert_eq!(addrs, vec![second.master_addr.clone()])
        }
        other => return Err(format!("expected MasterUnreachable, got {other}").into()),
    }
    Ok(())
}
