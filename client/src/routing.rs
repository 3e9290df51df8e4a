//! The routing cache: per collection, its tablets in routing-key order, fetched from the
//! master on first use and again whenever a tablet server says the cached copy is stale.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bytes::Bytes;
use luna_proto::master::{CollectionRoute, GetRoutingRequest, Partitioning};
use tracing::debug;

use crate::Inner;
use crate::error::{ClientError, Result};
use crate::retry::Deadline;

/// One tablet as the client routes to it.
#[derive(Debug, Clone)]
pub(crate) struct TabletEntry {
    pub(crate) id: u64,
    pub(crate) epoch: u64,
    pub(crate) group_id: u64,
    /// First routing key (inclusive).
    pub(crate) start: Bytes,
    /// End routing key (exclusive); `None` is unbounded.
    pub(crate) end: Option<Bytes>,
    /// Tablet-service addresses of the group's replicas.
    pub(crate) replicas: Vec<String>,
    /// The leader's address, if the master knew it.
    pub(crate) leader: Option<String>,
}

impl TabletEntry {
    pub(crate) fn contains(&self, routing_key: &[u8]) -> bool {
        self.start.as_ref() <= routing_key
            && self
                .end
                .as_ref()
                .is_none_or(|end| routing_key < end.as_ref())
    }
}

/// A snapshot of one collection's routing.
#[derive(Debug)]
pub(crate) struct RouteTable {
    pub(crate) partitioning: Partitioning,
    /// Tablets sorted by start key, not overlapping.
    pub(crate) tablets: Vec<TabletEntry>,
    /// Which fetch this came from (local counter), to refresh at most once per staleness.
    pub(crate) generation: u64,
}

impl RouteTable {
    pub(crate) fn from_proto(route: CollectionRoute, generation: u64) -> Result<Self> {
        let collection = route
            .collection
            .ok_or_else(|| ClientError::protocol("GetRouting answered without a collection"))?;
        let partitioning = Partitioning::try_from(collection.partitioning).map_err(|_| {
            ClientError::protocol(format!(
                "unknown partitioning {} for collection {}",
                collection.partitioning, collection.name
            ))
        })?;
        let mut tablets = Vec::with_capacity(route.tablets.len());
        for tablet_route in route.tablets {
            let info = tablet_route
                .tablet
                .ok_or_else(|| ClientError::protocol("a tablet route without its tablet"))?;
            let range = info.range.unwrap_or_default();
            let replicas: Vec<String> = tablet_route
                .replicas
                .iter()
                .map(|replica| replica.addr.clone())
                .collect();
            let leader = tablet_route
                .replicas
                .iter()
                .find(|replica| {
                    tablet_route.leader_server_id != 0
                        && replica.server_id == tablet_route.leader_server_id
                })
                .map(|replica| replica.addr.clone());
            tablets.push(TabletEntry {
                id: info.id,
                epoch: info.epoch,
                group_id: info.group_id,
                start: Bytes::from(range.start),
                end: range.end.map(Bytes::from),
                replicas,
                leader,
            });
        }
        tablets.sort_by(|a, b| a.start.cmp(&b.start));
        Ok(RouteTable {
            partitioning,
            tablets,
            generation,
        })
    }

    /// The tablet whose range holds `routing_key`; `None` if no cached tablet does (the
    /// routing is incomplete, for example in the middle of a split).
    pub(crate) fn locate(&self, routing_key: &[u8]) -> Option<&TabletEntry> {
        let after = self
            .tablets
            .partition_point(|tablet| tablet.start.as_ref() <= routing_key);
        let tablet = self.tablets.get(after.checked_sub(1)?)?;
        tablet.contains(routing_key).then_some(tablet)
    }

    /// The tablet holding the keys just below `end` (exclusive; `None` is unbounded): where
    /// a reverse scan ending at `end` starts.
    pub(crate) fn locate_before(&self, end: Option<&[u8]>) -> Option<&TabletEntry> {
        let Some(end) = end else {
            return self.tablets.last().filter(|tablet| tablet.end.is_none());
        };
        let after = self
            .tablets
            .partition_point(|tablet| tablet.start.as_ref() < end);
        let tablet = self.tablets.get(after.checked_sub(1)?)?;
        let covers = tablet
            .end
            .as_ref()
            .is_none_or(|tablet_end| tablet_end.as_ref() >= end);
        covers.then_some(tablet)
    }
}

/// The routing of one collection, shared by every handle to it.
#[derive(Debug)]
pub(crate) struct RouteCache {
    pub(crate) database: String,
    pub(crate) collection: String,
    table: RwLock<Option<Arc<RouteTable>>>,
    /// Leaders learned from NotLeader hints, by group; cleared on every refresh.
    leaders: Mutex<HashMap<u64, String>>,
    /// One fetch at a time; others wait and use its result.
    refresh: tokio::sync::Mutex<()>,
    generations: AtomicU64,
}

impl RouteCache {
    pub(crate) fn new(database: &str, collection: &str) -> Self {
        RouteCache {
            database: database.to_string(),
            collection: collection.to_string(),
            table: RwLock::new(None),
            leaders: Mutex::new(HashMap::new()),
            refresh: tokio::sync::Mutex::new(()),
            generations: AtomicU64::new(0),
        }
    }

    fn cached(&self) -> Option<Arc<RouteTable>> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The cached routing, fetched from the master first if there is none.
    pub(crate) async fn table(
        &self,
        inner: &Inner,
        deadline: &Deadline,
    ) -> Result<Arc<RouteTable>> {
        if let Some(table) = self.cached() {
            return Ok(table);
        }
        let _fetching = self.refresh.lock().await;
        // Another task may have fetched it while this one waited.
        if let Some(table) = self.cached() {
            return Ok(table);
        }
        let request = GetRoutingRequest {
            database: self.database.clone(),
            collection: self.collection.clone(),
        };
        let route = inner
            .call_master("GetRouting", deadline, |mut master| {
                let request = request.clone();
                async move { master.get_routing(request).await }
            })
            .await
            .map_err(|error| match error {
                ClientError::NotFound { message } => ClientError::NotFound {
                    message: format!(
                        "{message} (collection `{}` in database `{}`: create it with the admin API or `luna`)",
                        self.collection, self.database
                    ),
                },
                other => other,
            })?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let table = Arc::new(RouteTable::from_proto(route, generation)?);
        debug!(
            database = %self.database,
            collection = %self.collection,
            tablets = table.tablets.len(),
            "routing fetched"
        );
        self.leaders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Some(table.clone());
        Ok(table)
    }

    /// Drops the cached routing if it is still the one from fetch `generation`, so the next
    /// use fetches it again (and concurrent failures cause one fetch, not many).
    pub(crate) fn invalidate(&self, generation: u64) {
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if table
            .as_ref()
            .is_some_and(|current| current.generation == generation)
        {
            *table = None;
        }
    }

    /// Drops the cached routing whatever it is.
    pub(crate) fn clear(&self) {
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Where to send a request that needs the leader of `tablet`'s group: a learned hint,
    /// else the master's leader, else the replicas in order (a follower names the leader),
    /// passing over addresses for which `unreachable` holds; if it holds for all of them,
    /// the first one anyway.
    pub(crate) fn leader_addr(
        &self,
        tablet: &TabletEntry,
        unreachable: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let hinted = self
            .leaders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&tablet.group_id)
            .cloned();
        let candidates = || hinted.iter().chain(&tablet.leader).chain(&tablet.replicas);
        candidates()
            .find(|addr| !unreachable(addr))
            .or_else(|| candidates().next())
            .cloned()
    }

    /// Remembers that `addr` leads `group_id` (from a NotLeader hint).
    pub(crate) fn set_leader(&self, group_id: u64, addr: String) {
        self.leaders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(group_id, addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use luna_proto::master::{CollectionInfo, KeyRange, ReplicaAddr, TabletInfo, TabletRoute};

    fn route(bounds: &[(&str, Option<&str>)]) -> CollectionRoute {
        CollectionRoute {
            collection: Some(CollectionInfo {
                name: "c".into(),
                ..CollectionInfo::default()
            }),
            tablets: bounds
                .iter()
                .enumerate()
                .map(|(index, (start, end))| TabletRoute {
                    tablet: Some(TabletInfo {
                        id: index as u64 + 1,
                        epoch: 1,
                        group_id: 10 + index as u64,
                        range: Some(KeyRange {
                            start: start.as_bytes().to_vec(),
                            end: end.map(|end| end.as_bytes().to_vec()),
                        }),
                        ..TabletInfo::default()
                    }),
                    leader_server_id: 2,
                    replicas: vec![
                        ReplicaAddr {
                            server_id: 1,
                            addr: "a:1".into(),
                        },
                        ReplicaAddr {
                            server_id: 2,
                            addr: "b:1".into(),
                        },
                    ],
                })
                .collect(),
            routing_version: 1,
        }
    }

    fn located(table: &RouteTable, key: &str) -> Option<u64> {
        table.locate(key.as_bytes()).map(|tablet| tablet.id)
    }

    #[test]
    fn binary_search_finds_the_owning_tablet() -> Result<()> {
        let table = RouteTable::from_proto(
            route(&[
                ("m", Some("t")),
                ("", Some("g")),
                ("g", Some("m")),
                ("t", None),
            ]),
            1,
        )?;
        assert_eq!(located(&table, ""), Some(2));
        assert_eq!(located(&table, "a"), Some(2));
        assert_eq!(located(&table, "g"), Some(3));
        assert_eq!(located(&table, "lzzz"), Some(3));
        assert_eq!(located(&table, "m"), Some(1));
        assert_eq!(located(&table, "zzz"), Some(4));
        assert_eq!(
            table.tablets[0].leader.as_deref(),
            Some("b:1"),
            "leader comes from leader_server_id"
        );
        Ok(())
    }

    #[test]
    fn gaps_are_not_routed() -> Result<()> {
        let table = RouteTable::from_proto(route(&[("", Some("g")), ("m", None)]), 1)?;
        assert_eq!(located(&table, "h"), None);
        assert_eq!(located(&table, "m"), Some(2));
        assert!(table.locate_before(Some(b"k")).is_none());
        let empty = RouteTable::from_proto(route(&[]), 1)?;
        assert_eq!(located(&empty, "a"), None);
        assert!(empty.locate_before(None).is_none());
        Ok(())
    }

    #[test]
    fn reverse_location_takes_the_tablet_below_the_end() -> Result<()> {
        let table = RouteTable::from_proto(route(&[("", Some("g")), ("g", None)]), 1)?;
        let before = |end: Option<&str>| table.locate_before(end.map(str::as_bytes)).map(|t| t.id);
        assert_eq!(before(None), Some(2));
        assert_eq!(before(Some("z")), Some(2));
        assert_eq!(before(Some("g")), Some(1), "g itself is excluded");
        assert_eq!(before(Some("g\0")), Some(2));
        assert_eq!(before(Some("b")), Some(1));
        Ok(())
    }

    #[test]
    fn leader_lookup_passes_over_unreachable_servers() -> Result<()> {
        let table = RouteTable::from_proto(route(&[("", None)]), 1)?;
        let tablet = &table.tablets[0];
        let cache = RouteCache::new("d", "c");
        let down = |down: &'static [&'static str]| move |addr: &str| down.contains(&addr);
        assert_eq!(cache.leader_addr(tablet, down(&[])).as_deref(), Some("b:1"));
        assert_eq!(
            cache.leader_addr(tablet, down(&["b:1"])).as_deref(),
            Some("a:1"),
            "the master's leader is down: ask a replica, which names the new leader"
        );
        cache.set_leader(tablet.group_id, "c:1".into());
        assert_eq!(cache.leader_addr(tablet, down(&[])).as_deref(), Some("c:1"));
        assert_eq!(
            cache.leader_addr(tablet, down(&["c:1"])).as_deref(),
            Some("b:1")
        );
        assert_eq!(
            cache
                .leader_addr(tablet, down(&["a:1", "b:1", "c:1"]))
                .as_deref(),
            Some("c:1"),
            "with every candidate down, the best one is tried anyway"
        );
        Ok(())
    }
}
