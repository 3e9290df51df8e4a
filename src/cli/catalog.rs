//! `luna db`, `luna collection` and `luna tablets`.

use clap::Subcommand;
use luna_client::{Client, CollectionSpec, Partitioning, TabletInfo};

use super::collection_path;
use super::output::{Cell, print_table, show_bytes};
use crate::error::CliError;

/// `luna db ...`
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Create a database.
    Create {
        /// Its name.
        name: String,
    },
    /// List databases.
    List,
    /// Drop a database and every collection in it.
    Drop {
        /// Its name.
        name: String,
    },
}

/// `luna collection ...`
#[derive(Debug, Subcommand)]
pub enum CollectionCommand {
    /// Create a collection.
    Create {
        /// DATABASE/COLLECTION.
        path: String,
        /// Partition by a hash of the key instead of by key range.
        #[arg(long)]
        hash: bool,
        /// Number of tablets (hash collections; range collections use --split).
        #[arg(long)]
        tablets: Option<u32>,
        /// Split point of a range collection; repeat for more tablets.
        #[arg(long = "split")]
        splits: Vec<String>,
        /// Replicas of each tablet (default: the universe's).
        #[arg(long)]
        replication_factor: Option<u32>,
    },
    /// List collections, of one database or of all.
    List {
        /// The database; all when absent.
        database: Option<String>,
    },
    /// Drop a collection.
    Drop {
        /// DATABASE/COLLECTION.
        path: String,
    },
}

fn partitioning_name(partitioning: i32) -> &'static str {
    match Partitioning::try_from(partitioning) {
        Ok(Partitioning::Hash) => "hash",
        _ => "range",
    }
}

pub async fn db(client: &Client, command: DbCommand, json: bool) -> Result<(), CliError> {
    let admin = client.admin();
    match command {
        DbCommand::Create { name } => {
            let database = admin.create_database(&name).await?;
            print_table(
                &["database", "id"],
                &[vec![Cell::from(database.name), Cell::from(database.id)]],
                json,
            );
        }
        DbCommand::List => {
            let rows: Vec<Vec<Cell>> = admin
                .list_databases()
                .await?
                .into_iter()
                .map(|database| vec![Cell::from(database.name), Cell::from(database.id)])
                .collect();
            print_table(&["database", "id"], &rows, json);
        }
        DbCommand::Drop { name } => {
            admin.drop_database(&name).await?;
            print_table(&["dropped"], &[vec![Cell::from(name)]], json);
        }
    }
    Ok(())
}

pub async fn collection(
    client: &Client,
    command: CollectionCommand,
    json: bool,
) -> Result<(), CliError> {
    let admin = client.admin();
    let headers = ["collection", "id", "partitioning", "tablets", "replicas"];
    let row = |info: luna_client::CollectionInfo| {
        vec![
            Cell::from(format!("{}/{}", info.database, info.name)),
            Cell::from(info.id),
            Cell::from(partitioning_name(info.partitioning)),
            Cell::from(info.tablet_count),
            Cell::from(info.replication_factor),
        ]
    };
    match command {
        CollectionCommand::Create {
            path,
            hash,
            tablets,
            splits,
            replication_factor,
        } => {
            let (database, name) = collection_path(&path)?;
            let mut spec = if hash {
                CollectionSpec::hash(tablets.unwrap_or(0))
            } else {
                let spec = CollectionSpec::range().split_keys(splits);
                match tablets {
                    Some(tablets) => spec.tablets(tablets),
                    None => spec,
                }
            };
            if let Some(replicas) = replication_factor {
                spec = spec.replication_factor(replicas);
            }
            let info = admin.create_collection(database, name, spec).await?;
            print_table(&headers, &[row(info)], json);
        }
        CollectionCommand::List { database } => {
            let rows: Vec<Vec<Cell>> = admin
                .list_collections(database.as_deref().unwrap_or(""))
                .await?
                .into_iter()
                .map(row)
                .collect();
            print_table(&headers, &rows, json);
        }
        CollectionCommand::Drop { path } => {
            let (database, name) = collection_path(&path)?;
            admin.drop_collection(database, name).await?;
            print_table(&["dropped"], &[vec![Cell::from(path)]], json);
        }
    }
    Ok(())
}

pub async fn tablets(client: &Client, path: Option<&str>, json: bool) -> Result<(), CliError> {
    let (database, collection) = match path {
        Some(path) => collection_path(path)?,
        None => ("", ""),
    };
    let tablets = client.admin().list_tablets(database, collection).await?;
    print_tablets(&tablets, json);
    Ok(())
}

/// `luna tablet ...`
#[derive(Debug, Subcommand)]
pub enum TabletCommand {
    /// Move a tablet to another group. No base data is copied: the old group seals and
    /// flushes it, the new one opens it from the shared BaseStore; requests pause only for
    /// the handoff. Answers once the new group serves it.
    Move {
        /// The tablet's id (see `luna tablets`).
        tablet: u64,
        /// The group to move it to (see `luna groups`).
        #[arg(long)]
        to_group: u64,
    },
    /// Split a tablet in two, in its group: it keeps the keys below the split key, a new
    /// tablet takes the rest. Metadata only: no table is rewritten.
    Split {
        /// The tablet's id (see `luna tablets`).
        tablet: u64,
        /// The first key of the new tablet. Without it, a range collection's tablet splits
        /// where its data halves by size, a hash collection's in the middle of its hash range.
        #[arg(long)]
        at: Option<String>,
    },
}

/// `luna tablet ...`
pub async fn tablet(client: &Client, command: TabletCommand, json: bool) -> Result<(), CliError> {
    match command {
        TabletCommand::Move { tablet, to_group } => {
            let moved = client.admin().move_tablet(tablet, to_group).await?;
            print_tablets(&[moved.tablet], json);
        }
        TabletCommand::Split { tablet, at } => {
            let at = at.unwrap_or_default();
            let (left, right) = client.admin().split_tablet(tablet, at.as_bytes()).await?;
            print_tablets(&[left, right], json);
        }
    }
    Ok(())
}

fn print_tablets(tablets: &[TabletInfo], json: bool) {
    let rows: Vec<Vec<Cell>> = tablets
        .iter()
        .map(|tablet| {
            let (start, end) = match &tablet.range {
                Some(range) => (
                    show_bytes(&range.start),
                    range
                        .end
                        .as_deref()
                        .map_or_else(|| "∞".to_owned(), show_bytes),
                ),
                None => (String::new(), "∞".to_owned()),
            };
            vec![
                Cell::from(tablet.id),
                Cell::from(tablet.collection_id),
                Cell::from(start),
                Cell::from(end),
                Cell::from(tablet.epoch),
                Cell::from(tablet.group_id),
            ]
        })
        .collect();
    print_table(
        &["tablet", "collection", "start", "end", "epoch", "group"],
        &rows,
        json,
    );
}
