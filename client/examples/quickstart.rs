//! Connects to a Luna master, creates a database and a collection if they are missing, then
//! writes, reads and scans a few keys.
//!
//! ```sh
//! luna start &                       # a universe on 127.0.0.1:7420
//! cargo run -p luna-client --example quickstart
//! LUNA_MASTER=10.0.0.5:7420 cargo run -p luna-client --example quickstart
//! ```

use luna_client::{Client, ClientError, CollectionSpec, WriteBatch};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), ClientError> {
    let master = std::env::var("LUNA_MASTER").unwrap_or_else(|_| "127.0.0.1:7420".to_string());
    let client = Client::connect(master.split(',')).await?;
    let admin = client.admin();

    match admin.create_database("quickstart").await {
        Ok(_) | Err(ClientError::AlreadyExists { .. }) => {}
        Err(error) => return Err(error),
    }
    let spec = CollectionSpec::range().split_keys(["fruit:m"]);
    match admin.create_collection("quickstart", "fruit", spec).await {
        Ok(_) | Err(ClientError::AlreadyExists { .. }) => {}
        Err(error) => return Err(error),
    }

    let fruit = client.database("quickstart").collection("fruit");
    fruit.put("fruit:apple", "red").await?;
    let mut batch = WriteBatch::new();
    batch
        .put("fruit:banana", "yellow")
        .put("fruit:plum", "purple")
        .delete("fruit:durian");
    // Two tablets (split at fruit:m): atomic per tablet, not across them.
    fruit.batch(batch).await?;

    let apple = fruit.get("fruit:apple").await?;
    println!(
        "fruit:apple = {:?}",
        apple.as_deref().map(String::from_utf8_lossy)
    );

    for (key, value) in fruit.scan("fruit:".."fruit;", 100, false).await? {
        println!(
            "{} = {}",
            String::from_utf8_lossy(&key),
            String::from_utf8_lossy(&value)
        );
    }
    Ok(())
}
