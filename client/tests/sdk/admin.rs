//! The admin API against the fake master.

use luna_client::{ClientError, CollectionSpec, Partitioning};

use crate::fake::{Harness, TestResult};

#[tokio::test]
async fn databases_and_collections_are_managed_through_the_master() -> TestResult {
    let harness = Harness::start(0).await?;
    let client = harness.client().await?;
    let admin = client.admin();
    let created = admin.create_database("shop").await?;
    assert_eq!(created.name, "shop");
    assert!(matches!(
        admin.create_database("shop").await,
        Err(ClientError::AlreadyExists { .. })
    ));
    let names: Vec<String> = admin
        .list_databases()
        .await?
        .into_iter()
        .map(|db| db.name)
        .collect();
    assert_eq!(names, ["shop"]);
    let info = admin
        .create_collection(
            "shop",
            "carts",
            CollectionSpec::range()
                .split_keys(["g", "p"])
                .replication_factor(3),
        )
        .await?;
    assert_eq!(info.name, "carts");
    admin
        .create_collection("shop", "users", CollectionSpec::hash(8))
        .await?;
    assert!(matches!(
        admin
            .create_collection(
                "shop",
                "bad",
                CollectionSpec::range().split_keys(["p", "g"])
            )
            .await,
        Err(ClientError::InvalidArgument { .. })
    ));
    let requests = harness
        .master
        .created_collections
        .lock()
        .map_err(|_| "poisoned")?
        .clone();
    assert_eq!(
        requests.len(),
        2,
        "the invalid spec never reached the master"
    );
    assert_eq!(requests[0].split_keys, vec![b"g".to_vec(), b"p".to_vec()]);
    assert_eq!(requests[0].replication_factor, 3);
    assert_eq!(requests[1].partitioning, Partitioning::Hash as i32);
    assert_eq!(requests[1].tablets, 8);
    admin.drop_database("shop").await?;
    assert!(matches!(
        admin.drop_database("shop").await,
        Err(ClientError::NotFound { .. })
    ));
    Ok(())
}
