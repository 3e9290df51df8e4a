//! The multiplexed stream that carries every call to a tablet server: commands answer out
//! of order, and a broken stream fails only the commands that were waiting on it.

use std::time::Duration;

use luna_proto::master::Partitioning;

use crate::fake::{Harness, Scripted, TestResult};

#[tokio::test]
async fn a_waiting_command_does_not_hold_up_the_others_on_its_stream() -> TestResult {
    let harness = Harness::start(1).await?;
    harness.add_collection("db", "c", Partitioning::Range, &[(b"", None, 0)]);
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    coll.put("k", "v").await?;
    // The next command hangs until the client's request timeout (500 ms) and its retry.
    harness.servers[0].push(Scripted::Hang);
    let slow = tokio::spawn({
        let coll = coll.clone();
        async move { coll.put("slow", "v").await }
    });
    while harness.servers[0].seen().len() < 2 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let reads = futures::future::try_join_all((0..20).map(|_| coll.get("k"))).await?;
    assert!(
        reads
            .iter()
            .all(|value| value.as_deref() == Some(&b"v"[..]))
    );
    assert!(
        !slow.is_finished(),
        "twenty reads were answered on the stream while the write waited"
    );
    slow.await??;
    assert_eq!(coll.get("slow").await?.as_deref(), Some(&b"v"[..]));
    Ok(())
}

#[tokio::test]
async fn concurrent_commands_get_their_own_answers() -> TestResult {
    let harness = Harness::start(2).await?;
    harness.add_collection(
        "db",
        "c",
        Partitioning::Range,
        &[(b"", Some(b"k5"), 0), (b"k5", None, 1)],
    );
    let client = harness.client().await?;
    let coll = client.database("db").collection("c");
    let keys: Vec<String> = (0..500).map(|i| format!("k{i}")).collect();
    futures::future::try_join_all(keys.iter().map(|key| coll.put(key.clone(), key.clone())))
        .await?;
    let values = futures::future::try_join_all(keys.iter().map(|key| coll.get(key))).await?;
    for (key, value) in keys.iter().zip(values) {
        assert_eq!(value.as_deref(), Some(key.as_bytes()), "{key}");
    }
    let servers: Vec<usize> = harness.servers.iter().map(|s| s.seen().len()).collect();
    assert!(
        servers.iter().all(|&seen| seen > 0),
        "both servers served: {servers:?}"
    );
    Ok(())
}
