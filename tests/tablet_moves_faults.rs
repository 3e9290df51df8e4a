//! Tablet moves while processes die: the leader of the tablet's old group, the leader of its
//! new group, or the master's leader is killed -9 as the move starts; and a split while the
//! master's leader dies. Each operation either finishes (resumed by a new leader) or rolls
//! back; writes go on, and afterwards no acknowledged write is missing and every key's
//! history is linearizable.

mod support;

use std::time::{Duration, Instant};

use luna_client::{Client, CollectionSpec, TabletInfo};
use support::Universe;
use support::history::{self, Registers, seed};
use support::load::{Writers, assert_covering, with_collection};

/// The collection's tablets once no move is under way, at most 60 s from now.
async fn settled_tablets(client: &Client, universe: &Universe) -> Vec<TabletInfo> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let admin = client.admin();
        // Served by the master's leader, which may be changing.
        let moving = admin.tablet_moves("app", "faults").await;
        let splitting = admin.tablet_splits("app", "faults").await;
        if moving.is_ok_and(|moves| moves.is_empty())
            && splitting.is_ok_and(|splits| splits.is_empty())
            && let Ok(tablets) = admin.list_tablets("app", "faults").await
        {
            let groups = admin.list_groups().await.unwrap_or_default();
            if groups.iter().all(|group| group.leader_server_id != 0) {
                return tablets;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the tablets never settled\n{}",
            universe.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The server the master names as group `group_id`'s leader (waits for one).
async fn group_leader(client: &Client, group_id: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let groups = client.admin().list_groups().await.unwrap_or_default();
        if let Some(group) = groups.iter().find(|group| group.id == group_id)
            && group.leader_server_id != 0
        {
            return group.leader_server_id;
        }
        assert!(Instant::now() < deadline, "group {group_id} has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, Clone, Copy)]
enum Leader {
    OldGroup,
    NewGroup,
    Master,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn moves_survive_the_old_group_the_new_group_or_the_master_dying() {
    let (mut universe, client, collection) =
        with_collection(3, "faults", CollectionSpec::hash(2)).await;
    let writers = Writers::spawn(&collection, 4);
    let registers = Registers::spawn(&collection, 4, 6, seed());
    writers.wait_progress(50, "before the first move").await;

    let mut seed = history::seed();
    for victim in [
        Leader::OldGroup,
        Leader::NewGroup,
        Leader::Master,
        Leader::Master,
    ] {
        let tablets = settled_tablets(&client, &universe).await;
        let (tablet, other) = (&tablets[0], &tablets[1]);
        let to_group = if tablet.group_id == other.group_id {
            let groups = client.admin().list_groups().await.expect("groups");
            groups
                .iter()
                .map(|group| group.id)
                .find(|&id| id != tablet.group_id)
                .expect("a second group")
        } else {
            other.group_id
        };
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let delay = Duration::from_millis((seed >> 33) % 40);
        let mover = {
            let client = client.clone();
            let tablet_id = tablet.id;
            tokio::spawn(async move { client.admin().move_tablet(tablet_id, to_group).await })
        };
        tokio::time::sleep(delay).await;
        let restart = match victim {
            Leader::OldGroup | Leader::NewGroup => {
                let group = match victim {
                    Leader::OldGroup => tablet.group_id,
                    _ => to_group,
                };
                let leader = group_leader(&client, group).await;
                let index = universe.index_of(leader);
                universe.kill_server(index);
                Some(index)
            }
            Leader::Master => {
                let leader = universe.leading_master().await;
                universe.kill_master(leader);
                universe.restart_master(leader);
                None
            }
        };
        println!(
            "{victim:?} killed {delay:?} into the move of tablet {}",
            tablet.id
        );
        let outcome = mover.await.expect("the mover task");
        writers
            .wait_progress(50, &format!("after killing the {victim:?} leader"))
            .await;
        if let Some(index) = restart {
            universe.restart_server(index);
            universe.wait_servers_up(&client, 3).await;
        }
        // The move finished or was rolled back; either way it is over, and the epoch went
        // up by one exactly when the group changed.
        let after = settled_tablets(&client, &universe).await;
        let moved = after
            .iter()
            .find(|t| t.id == tablet.id)
            .expect("the tablet");
        println!("move outcome: {outcome:?}; the tablet is now {moved:?}");
        if moved.group_id == to_group {
            assert_eq!(moved.epoch, tablet.epoch + 1);
        } else {
            assert_eq!(
                (moved.group_id, moved.epoch),
                (tablet.group_id, tablet.epoch)
            );
            assert!(outcome.is_err(), "a move that answered OK did not happen");
        }
        writers.wait_progress(50, "after the move settled").await;
    }

    // A split while the master's leader dies: it ends, done or cancelled, and the tablets
    // still cover the key space.
    let tablets = settled_tablets(&client, &universe).await;
    let splitter = {
        let client = client.clone();
        let tablet_id = tablets[0].id;
        tokio::spawn(async move { client.admin().split_tablet(tablet_id, b"").await })
    };
    tokio::time::sleep(Duration::from_millis((seed >> 13) % 40)).await;
    let leader = universe.leading_master().await;
    universe.kill_master(leader);
    universe.restart_master(leader);
    let outcome = splitter.await.expect("the splitter task");
    let after = settled_tablets(&client, &universe).await;
    println!("split outcome: {outcome:?}; the tablets are now {after:?}");
    assert_covering(&after);
    if outcome.is_ok() {
        assert_eq!(after.len(), 3, "a split that answered OK did not happen");
    } else {
        // A retried call may have failed after the split was done, or it was cancelled.
        assert!((2..=3).contains(&after.len()), "{after:?}");
    }
    writers.wait_progress(50, "after the split").await;

    writers.stop_and_check(|| universe.logs()).await;
    history::stop_and_check(registers, || universe.logs()).await;
}
