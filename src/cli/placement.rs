//! `luna servers`, `luna server`, `luna groups` and `luna group`: where replicas and
//! leaders are, and moving them.

use std::time::Duration;

use clap::Subcommand;
use luna_client::{Client, GroupInfo, ServerInfo};

use super::output::{Cell, print_table};
use crate::error::CliError;

/// How often a waiting command asks the master again.
const POLL: Duration = Duration::from_millis(250);

/// `luna group ...`
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Move a group's leadership to its replica on another server, and keep it there.
    TransferLeader {
        /// The group's id (see `luna groups`).
        group: u64,
        /// The server to lead it (one that holds a replica).
        #[arg(long)]
        to: u64,
    },
    /// Move a group's replica from one server to another: the new replica catches up as a
    /// learner, then replaces the old one by joint consensus. No base data is copied.
    MoveReplica {
        /// The group's id (see `luna groups`).
        group: u64,
        /// The server whose replica moves.
        #[arg(long)]
        from: u64,
        /// The live server that takes it.
        #[arg(long)]
        to: u64,
        /// Wait at most this many seconds for the move to finish (0: do not wait).
        #[arg(long, default_value_t = 120)]
        wait_secs: u64,
    },
}

/// `luna server ...`
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Move every replica off a server (for maintenance or removal), a few at a time; it
    /// gets no new ones until the drain is cancelled.
    Drain {
        /// The server's id (see `luna servers`).
        server: u64,
        /// Stop draining: the server takes replicas again.
        #[arg(long)]
        cancel: bool,
        /// Wait at most this many seconds until it holds no replica (0: do not wait).
        #[arg(long, default_value_t = 0)]
        wait_secs: u64,
    },
}

/// `luna servers`
pub async fn servers(client: &Client, json: bool) -> Result<(), CliError> {
    let servers = client.admin().list_servers().await?;
    print_servers(&servers, json);
    Ok(())
}

/// `luna groups`
pub async fn groups(client: &Client, json: bool) -> Result<(), CliError> {
    let groups = client.admin().list_groups().await?;
    print_groups(&groups, json);
    Ok(())
}

/// `luna group ...`
pub async fn group(client: &Client, command: GroupCommand, json: bool) -> Result<(), CliError> {
    let admin = client.admin();
    match command {
        GroupCommand::TransferLeader { group, to } => {
            let group = admin.transfer_leader(group, to).await?;
            print_groups(&[group], json);
        }
        GroupCommand::MoveReplica {
            group,
            from,
            to,
            wait_secs,
        } => {
            let started = admin.move_replica(group, from, to).await?;
            let (info, done) = wait_for(wait_secs, started, || async {
                let info = find_group(client, group).await?;
                let done = info.moving.is_none();
                Ok((info, done))
            })
            .await?;
            if !done {
                return Err(CliError::Invalid(format!(
                    "group {group}'s replica is still moving from server {from} to server {to} \
                     after {wait_secs} s (the move goes on; follow it with `luna groups`)"
                )));
            }
            print_groups(&[info], json);
        }
    }
    Ok(())
}

/// `luna server ...`
pub async fn server(client: &Client, command: ServerCommand, json: bool) -> Result<(), CliError> {
    match command {
        ServerCommand::Drain {
            server,
            cancel,
            wait_secs,
        } => {
            let marked = client.admin().drain_server(server, cancel).await?;
            let (info, done) = wait_for(wait_secs, marked, || async {
                let servers = client.admin().list_servers().await?;
                let info = servers
                    .into_iter()
                    .find(|s| s.id == server)
                    .ok_or_else(|| CliError::Invalid(format!("there is no server {server}")))?;
                let done = info.group_replicas == 0;
                Ok((info, done))
            })
            .await?;
            if !done {
                return Err(CliError::Invalid(format!(
                    "server {server} still holds {} replicas after {wait_secs} s (the drain \
                     goes on; follow it with `luna servers`)",
                    info.group_replicas
                )));
            }
            print_servers(&[info], json);
        }
    }
    Ok(())
}

/// Polls until `poll` says it is done or `wait_secs` pass, and returns what it saw last
/// and whether it was done; with 0, returns `first` without polling.
async fn wait_for<T, F, Fut>(wait_secs: u64, first: T, mut poll: F) -> Result<(T, bool), CliError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(T, bool), CliError>>,
{
    if wait_secs == 0 {
        return Ok((first, true));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs);
    loop {
        let (seen, done) = poll().await?;
        if done || tokio::time::Instant::now() >= deadline {
            return Ok((seen, done));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn find_group(client: &Client, group: u64) -> Result<GroupInfo, CliError> {
    client
        .admin()
        .list_groups()
        .await?
        .into_iter()
        .find(|g| g.id == group)
        .ok_or_else(|| CliError::Invalid(format!("there is no group {group}")))
}

fn print_servers(servers: &[ServerInfo], json: bool) {
    let rows: Vec<Vec<Cell>> = servers
        .iter()
        .map(|server| {
            let state = match (server.alive, server.draining) {
                (true, false) => "up",
                (true, true) => "draining",
                (false, _) => "down",
            };
            vec![
                Cell::from(server.id),
                Cell::from(server.addr.clone()),
                Cell::from(state),
                Cell::from(server.group_replicas),
                Cell::from(server.group_leaders),
                Cell::from(server.http_addr.clone()),
            ]
        })
        .collect();
    print_table(
        &["server", "addr", "state", "replicas", "leaders", "http"],
        &rows,
        json,
    );
}

fn print_groups(groups: &[GroupInfo], json: bool) {
    let rows: Vec<Vec<Cell>> = groups
        .iter()
        .map(|group| {
            let replicas: Vec<String> = group.replicas.iter().map(u64::to_string).collect();
            let moving = group.moving.as_ref().map_or(String::new(), |m| {
                format!("{}->{} ({})", m.from_server_id, m.to_server_id, m.reason)
            });
            vec![
                Cell::from(group.id),
                Cell::from(replicas.join(",")),
                Cell::from(group.leader_server_id),
                Cell::from(group.term),
                Cell::from(group.tablet_count),
                Cell::from(moving),
            ]
        })
        .collect();
    print_table(
        &["group", "replicas", "leader", "term", "tablets", "moving"],
        &rows,
        json,
    );
}
