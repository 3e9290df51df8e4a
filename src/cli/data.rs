//! `luna put`, `luna get`, `luna delete` and `luna scan`.

use clap::Args;
use luna_client::Client;
use serde_json::json;

use super::collection_path;
use super::output::{Cell, print_table, show_bytes};
use crate::error::CliError;
use crate::stdout::say;

/// `luna put DATABASE/COLLECTION KEY VALUE`
#[derive(Debug, Args)]
pub struct PutArgs {
    /// DATABASE/COLLECTION.
    path: String,
    /// The key (UTF-8 text).
    key: String,
    /// The value (UTF-8 text).
    value: String,
}

/// `luna get DATABASE/COLLECTION KEY`
#[derive(Debug, Args)]
pub struct GetArgs {
    /// DATABASE/COLLECTION.
    path: String,
    /// The key.
    key: String,
}

/// `luna delete DATABASE/COLLECTION KEY`
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// DATABASE/COLLECTION.
    path: String,
    /// The key.
    key: String,
}

/// `luna scan DATABASE/COLLECTION`
#[derive(Debug, Args)]
pub struct ScanArgs {
    /// DATABASE/COLLECTION.
    path: String,
    /// First key (inclusive); range collections only.
    #[arg(long)]
    start: Option<String>,
    /// End key (exclusive); range collections only.
    #[arg(long)]
    end: Option<String>,
    /// At most this many pairs.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Descending order.
    #[arg(long)]
    reverse: bool,
}

pub async fn put(client: &Client, args: PutArgs, json: bool) -> Result<(), CliError> {
    let (database, name) = collection_path(&args.path)?;
    let collection = client.database(database).collection(name);
    let commit_ts = collection.put(args.key.clone(), args.value).await?;
    print_table(
        &["key", "commit_ts"],
        &[vec![Cell::from(args.key), Cell::from(commit_ts)]],
        json,
    );
    Ok(())
}

pub async fn get(client: &Client, args: GetArgs, json: bool) -> Result<(), CliError> {
    let (database, name) = collection_path(&args.path)?;
    let collection = client.database(database).collection(name);
    match collection.get(&args.key).await? {
        Some(value) if json => {
            say(format_args!(
                "{}",
                json!({ "key": args.key, "value": show_bytes(&value) })
            ));
            Ok(())
        }
        Some(value) => {
            say(format_args!("{}", show_bytes(&value)));
            Ok(())
        }
        None => Err(CliError::NotFound(format!(
            "key `{}` is not in {}",
            args.key, args.path
        ))),
    }
}

pub async fn delete(client: &Client, args: DeleteArgs, json: bool) -> Result<(), CliError> {
    let (database, name) = collection_path(&args.path)?;
    let collection = client.database(database).collection(name);
    let commit_ts = collection.delete(args.key.clone()).await?;
    print_table(
        &["deleted", "commit_ts"],
        &[vec![Cell::from(args.key), Cell::from(commit_ts)]],
        json,
    );
    Ok(())
}

pub async fn scan(client: &Client, args: ScanArgs, json: bool) -> Result<(), CliError> {
    let (database, name) = collection_path(&args.path)?;
    let collection = client.database(database).collection(name);
    let start = args.start.unwrap_or_default();
    let pairs = match args.end {
        Some(end) => {
            collection
                .scan(start.as_bytes()..end.as_bytes(), args.limit, args.reverse)
                .await?
        }
        None if start.is_empty() => collection.scan_all(args.limit, args.reverse).await?,
        None => {
            collection
                .scan(start.as_bytes().., args.limit, args.reverse)
                .await?
        }
    };
    let rows: Vec<Vec<Cell>> = pairs
        .iter()
        .map(|(key, value)| vec![Cell::from(show_bytes(key)), Cell::from(show_bytes(value))])
        .collect();
    print_table(&["key", "value"], &rows, json);
    Ok(())
}
