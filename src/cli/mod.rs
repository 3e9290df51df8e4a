//! The `luna` subcommands that talk to a running universe through the client SDK: catalog
//! administration (`db`, `collection`, `servers`, `groups`, `tablets`, `tablet move`) and data (`put`,
//! `get`, `delete`, `scan`). Output is a table for people, or JSON with `--json`.

mod catalog;
mod data;
mod output;
mod placement;

use clap::{Args, Subcommand};
use luna_client::Client;

pub use self::catalog::{CollectionCommand, DbCommand, TabletCommand};
pub use self::data::{DeleteArgs, GetArgs, PutArgs, ScanArgs};
pub use self::placement::{GroupCommand, ServerCommand};
use crate::error::CliError;

/// How to reach the universe, and how to print.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// The master's address, or the master replicas' addresses separated by commas.
    #[arg(
        long,
        global = true,
        env = "LUNA_MASTER",
        default_value = "127.0.0.1:7420"
    )]
    pub master: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Connection {
    async fn connect(&self) -> Result<Client, CliError> {
        Ok(Client::connect(master_addrs(&self.master)).await?)
    }
}

/// The subcommands of this module.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create, list and drop databases.
    #[command(subcommand)]
    Db(DbCommand),
    /// Create, list and drop collections (named DATABASE/COLLECTION).
    #[command(subcommand)]
    Collection(CollectionCommand),
    /// Write a value.
    Put(PutArgs),
    /// Read a value.
    Get(GetArgs),
    /// Delete a key.
    Delete(DeleteArgs),
    /// List keys and values in order.
    Scan(ScanArgs),
    /// List the tablet servers.
    Servers,
    /// Act on one tablet server: drain it.
    #[command(subcommand)]
    Server(ServerCommand),
    /// List the tablet groups.
    Groups,
    /// Act on one tablet group: move its leader or one of its replicas.
    #[command(subcommand)]
    Group(GroupCommand),
    /// List tablets, of one collection (DATABASE/COLLECTION) or of all.
    Tablets {
        /// DATABASE/COLLECTION; all tablets when absent.
        collection: Option<String>,
    },
    /// Act on one tablet: move it to another group, or split it.
    #[command(subcommand)]
    Tablet(TabletCommand),
}

/// Runs one client subcommand.
pub async fn run(command: ClientCommand, connection: &Connection) -> Result<(), CliError> {
    let client = connection.connect().await?;
    let json = connection.json;
    match command {
        ClientCommand::Db(command) => catalog::db(&client, command, json).await,
        ClientCommand::Collection(command) => catalog::collection(&client, command, json).await,
        ClientCommand::Put(args) => data::put(&client, args, json).await,
        ClientCommand::Get(args) => data::get(&client, args, json).await,
        ClientCommand::Delete(args) => data::delete(&client, args, json).await,
        ClientCommand::Scan(args) => data::scan(&client, args, json).await,
        ClientCommand::Servers => placement::servers(&client, json).await,
        ClientCommand::Server(command) => placement::server(&client, command, json).await,
        ClientCommand::Groups => placement::groups(&client, json).await,
        ClientCommand::Group(command) => placement::group(&client, command, json).await,
        ClientCommand::Tablets { collection } => {
            catalog::tablets(&client, collection.as_deref(), json).await
        }
        ClientCommand::Tablet(command) => catalog::tablet(&client, command, json).await,
    }
}

/// Splits `DATABASE/COLLECTION`.
fn collection_path(path: &str) -> Result<(&str, &str), CliError> {
    match path.split_once('/') {
        Some((database, collection)) if !database.is_empty() && !collection.is_empty() => {
            Ok((database, collection))
        }
        _ => Err(CliError::Invalid(format!(
            "`{path}` is not DATABASE/COLLECTION, e.g. app/users"
        ))),
    }
}

/// The addresses in a `--master` value: one, or several separated by commas.
pub fn master_addrs(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|addr| !addr.is_empty())
        .collect()
}
