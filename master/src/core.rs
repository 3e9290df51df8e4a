//! The master's core: its state on the journal stream, the apply loop, and proposals.
//!
//! One task applies every committed entry of the stream in order, from index 1 (so a
//! restart is a replay). Proposals are serialised: a proposer takes the turn (an async
//! mutex), computes its command from the applied state, appends it, and waits until the
//! apply loop has applied that index to learn the result. Because the proposer holds the
//! turn, the state it computed from is still the state its command is applied to, so
//! commands are rarely rejected at apply; when they are (e.g. a second replica raced), the
//! rejection reaches the proposer as its result.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use luna_kernel::stream::{Committed, Entry, Snapshot, Stream, Subscription};
use luna_proto::masterlog::{Command, MasterState};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::MasterConfig;
use crate::error::MasterError;
use crate::gc::Holds;
use crate::heartbeat::registry::Registry;
use crate::state::State;
use crate::tso::{TsoAllocator, physical_ms};

/// Entries between two truncations of the master's log.
const TRUNCATE_EVERY: u64 = 1024;

/// Results of applied entries kept for their proposers. A proposer waits for its own index
/// while holding the turn, so only a few results are ever outstanding.
const RESULTS_KEPT: u64 = 1024;
/// Routing versions of one master run start at its start time in ms shifted by this many
/// bits, so they keep increasing across restarts (a run would need a million routing
/// changes per millisecond of uptime to catch up with the next run's start).
const ROUTING_VERSION_SHIFT: u32 = 20;

/// State shared by the service, the apply loop and the [`Master`](crate::Master) handle.
pub(crate) struct Core {
    pub config: MasterConfig,
    stream: Arc<dyn Stream>,
    state: RwLock<State>,
    /// Soft state from heartbeats. Lock order: `state` before `registry`.
    pub registry: Mutex<Registry>,
    /// Bumped (under the state or registry lock) on every change of routing.
    pub routing_version: watch::Sender<u64>,
    /// The last index the apply loop applied; closed when the loop stops.
    applied: watch::Receiver<u64>,
    results: Mutex<BTreeMap<u64, Result<(), MasterError>>>,
    /// The turn to propose: one proposal at a time.
    pub(crate) proposals: tokio::sync::Mutex<()>,
    pub tso: tokio::sync::Mutex<TsoAllocator>,
    /// Clients' holds on the GC safe point (soft state, reset when a term begins).
    holds: Mutex<Holds>,
    /// Why the apply loop stopped, if it did.
    failure: Mutex<Option<MasterError>>,
    /// Set to stop the apply loop and open watch streams.
    pub shutdown: watch::Sender<bool>,
    /// The term this replica serves as leader: set once the term's activation caught its
    /// state up and reset its TSO and soft state (see `leadership.rs`); 0 before that.
    /// Changed only under the `tso` lock, so a TSO allocator always belongs to this term.
    pub serving: watch::Sender<u64>,
    /// Tablets whose move a task of this replica is driving (see `tablet_moves.rs`).
    pub(crate) tablet_movers: Mutex<std::collections::BTreeSet<u64>>,
    /// Since when the groups' tablet counts have been out of balance (see
    /// `tablet_balance.rs`); soft state of the leader.
    pub(crate) tablet_imbalance: Mutex<Option<std::time::Instant>>,
    /// Whether a task runs the placement driver's tablet step (see `tablet_balance.rs`).
    pub(crate) tablet_step_running: std::sync::atomic::AtomicBool,
    /// Tablets' load over time and failed automatic splits (see `tablet_balance.rs`).
    pub(crate) split_watch: Mutex<crate::tablet_balance::SplitWatch>,
    /// Channels to tablet servers' group control services, by address.
    pub(crate) group_channels: Mutex<std::collections::HashMap<String, tonic::transport::Channel>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The stream is a trait object without Debug; the applied index says enough.
        f.debug_struct("Core")
            .field("applied", &*self.applied.borrow())
            .field("routing_version", &*self.routing_version.borrow())
            .finish_non_exhaustive()
    }
}

/// The turn to propose, from [`Core::turn`].
pub(crate) type Turn<'a> = tokio::sync::MutexGuard<'a, ()>;

impl Core {
    /// Starts the task that applies the stream from index 1 and the one that takes over
    /// when this replica is elected (see `leadership.rs`). Returns once this replica serves
    /// as leader or knows another leader, or after `election_wait`.
    pub async fn open(
        config: MasterConfig,
        stream: Arc<dyn Stream>,
    ) -> Result<(Arc<Self>, JoinHandle<()>), MasterError> {
        config.validate()?;
        let subscription = stream
            .subscribe(1)
            .await
            .map_err(|e| MasterError::stream("subscribing to the master log", e))?;
        let (applied_tx, applied) = watch::channel(0);
        let core = Arc::new(Self {
            config,
            stream,
            state: RwLock::new(State::default()),
            registry: Mutex::new(Registry::default()),
            routing_version: watch::Sender::new(0),
            applied,
            results: Mutex::new(BTreeMap::new()),
            proposals: tokio::sync::Mutex::new(()),
            tso: tokio::sync::Mutex::new(TsoAllocator::new(0)),
            holds: Mutex::new(Holds::new(std::time::Instant::now())),
            failure: Mutex::new(None),
            shutdown: watch::Sender::new(false),
            serving: watch::Sender::new(0),
            tablet_movers: Mutex::new(std::collections::BTreeSet::new()),
            group_channels: Mutex::new(std::collections::HashMap::new()),
            tablet_imbalance: Mutex::new(None),
            split_watch: Mutex::new(crate::tablet_balance::SplitWatch::default()),
            tablet_step_running: std::sync::atomic::AtomicBool::new(false),
        });
        let applying = tokio::spawn(apply_loop(Arc::clone(&core), subscription, applied_tx));
        let leading = tokio::spawn(crate::leadership::leadership_loop(Arc::clone(&core)));
        let placing = tokio::spawn(crate::driver::placement_loop(Arc::clone(&core)));
        let collecting = tokio::spawn(crate::gc::gc_loop(Arc::clone(&core)));
        let moving = tokio::spawn(crate::tablet_moves::tablet_move_loop(Arc::clone(&core)));
        let task = tokio::spawn(async move {
            // The loops end on shutdown; the handle covers them all.
            let _ = applying.await;
            let _ = leading.await;
            let _ = placing.await;
            let _ = collecting.await;
            let _ = moving.await;
        });
        core.settle().await;
        // A log this replica cannot apply (a corrupt snapshot, a failing stream) fails the
        // open, rather than every request later.
        if let Err(error) = core.check_running() {
            core.shutdown.send_replace(true);
            let _ = task.await;
            return Err(error);
        }
        Ok((core, task))
    }

    /// The index the apply loop has applied; closed when the loop stops.
    pub(crate) fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Takes over as the leader of `term`: catches the state up with everything committed
    /// (a read barrier as the leader covers every earlier leader's entries), then starts the
    /// TSO above the persisted window and forgets soft state from earlier terms.
    pub(crate) async fn activate(&self, term: u64) -> Result<(), MasterError> {
        let index = self
            .stream
            .read_index()
            .await
            .map_err(|e| self.stream_error("reading the committed index", e))?;
        self.wait_applied(index).await?;
        let mut tso = self.tso.lock().await;
        let limit = self.read_state().tso_limit;
        *tso = TsoAllocator::new(limit);
        // Leaders and liveness are rebuilt from this term's heartbeats: an earlier term's
        // record on this replica may be arbitrarily old. Until then every registered server
        // gets the benefit of the doubt for one heartbeat timeout.
        let servers: Vec<u64> = self.read_state().servers.keys().copied().collect();
        let now = std::time::Instant::now();
        *self.registry() = Registry::assume_alive(servers.into_iter(), now);
        *self.holds() = Holds::new(now);
        // Routing versions of a term start above every version an earlier leader served
        // (its versions started at its own start time, and the TSO limit is past that).
        let start_ms = self
            .config
            .clock
            .now_ms()
            .max(physical_ms(limit).saturating_add(1));
        self.routing_version.send_modify(|version| {
            *version = (*version).max(start_ms.saturating_mul(1 << ROUTING_VERSION_SHIFT)) + 1;
        });
        self.serving.send_replace(term);
        drop(tso);
        tracing::info!(
            term,
            applied_index = index,
            databases = self.read_state().databases.len(),
            "master replica leads"
        );
        Ok(())
    }

    /// The applied state, for reading.
    pub fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The soft state, for reading or updating.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.registry)
    }

    /// Runs `step` every `interval` until shutdown; a failed step is logged (as `what`) and
    /// tried again at the next tick.
    pub(crate) async fn every<Fut>(
        &self,
        interval: std::time::Duration,
        what: &'static str,
        mut step: impl FnMut() -> Fut,
    ) where
        Fut: std::future::Future<Output = Result<(), MasterError>>,
    {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.wait_for(|&stop| stop) => return,
            }
            if let Err(error) = step().await {
                tracing::debug!(%error, "{what}");
            }
        }
    }

    /// Clients' holds on the GC safe point.
    pub(crate) fn holds(&self) -> MutexGuard<'_, Holds> {
        lock(&self.holds)
    }

    /// Marks a change of routing.
    pub fn bump_routing_version(&self) {
        self.routing_version.send_modify(|version| *version += 1);
    }

    /// Waits for the turn to propose (on the leader only).
    pub async fn turn(&self) -> Result<Turn<'_>, MasterError> {
        self.lead().await?;
        Ok(self.proposals.lock().await)
    }

    /// Appends `command` and waits until it is applied; returns the result of applying it.
    /// The caller holds `turn` and computed `command` from the state under it.
    pub async fn propose(&self, _turn: &Turn<'_>, command: &Command) -> Result<(), MasterError> {
        self.check_running()?;
        let data = Bytes::from(command.encode_to_vec());
        let index = self
            .stream
            .append(data)
            .await
            .map_err(|e| self.stream_error("appending a command", e))?;
        self.wait_applied(index).await?;
        lock(&self.results).remove(&index).unwrap_or_else(|| {
            Err(MasterError::internal(format!(
                "the result of master log entry {index} is missing"
            )))
        })
    }

    /// The stream this replica's state lives on.
    pub fn stream(&self) -> &dyn Stream {
        self.stream.as_ref()
    }

    pub(crate) fn check_running(&self) -> Result<(), MasterError> {
        match lock(&self.failure).clone() {
            Some(error) => Err(error),
            None if *self.shutdown.borrow() => Err(MasterError::Closed),
            None => Ok(()),
        }
    }

    pub(crate) async fn wait_applied(&self, index: u64) -> Result<(), MasterError> {
        let mut applied = self.applied.clone();
        if applied.wait_for(|&applied| applied >= index).await.is_err() {
            // The loop stopped before reaching `index`.
            return Err(lock(&self.failure).clone().unwrap_or(MasterError::Closed));
        }
        Ok(())
    }

    /// Replaces the state with a snapshot's: the log before it is gone.
    fn install_snapshot(&self, snapshot: &Snapshot) -> Result<(), MasterError> {
        let state =
            MasterState::decode(snapshot.data.as_ref()).map_err(|error| MasterError::Corrupt {
                index: snapshot.index,
                reason: format!("master snapshot: {error}"),
            })?;
        if state.applied_index != snapshot.index {
            return Err(MasterError::Corrupt {
                index: snapshot.index,
                reason: format!(
                    "master snapshot of index {} stands at index {}",
                    state.applied_index, snapshot.index
                ),
            });
        }
        *self.write_state() = State::from_snapshot(state);
        self.bump_routing_version();
        tracing::info!(
            index = snapshot.index,
            "master state restored from a snapshot"
        );
        Ok(())
    }

    /// Every `TRUNCATE_EVERY` entries, lets the stream discard the log behind a snapshot of
    /// the whole state: the master's state is small, so restart replays at most that many
    /// entries after loading it.
    async fn truncate_behind(&self, index: u64) {
        if !index.is_multiple_of(TRUNCATE_EVERY) {
            return;
        }
        let snapshot = Bytes::from(self.read_state().snapshot().encode_to_vec());
        if let Err(error) = self.stream.truncate(index, snapshot).await {
            tracing::warn!(index, %error, "truncating the master log");
        }
    }

    fn apply_entry(&self, entry: &Entry) {
        let mut state = self.write_state();
        if entry.data.is_empty() {
            // Written by the stream itself (e.g. a new leader's first entry).
            state.skip(entry.index);
            return;
        }
        let result = match Command::decode(entry.data.as_ref()) {
            Ok(command) => match state.apply(entry.index, &command) {
                Ok(applied) => {
                    if applied.routing_changed {
                        self.bump_routing_version();
                    }
                    Ok(())
                }
                Err(error) => {
                    tracing::warn!(index = entry.index, %error, "master command rejected");
                    Err(error)
                }
            },
            Err(error) => {
                // Skipping is deterministic, so replicas still agree; the entry's proposer
                // (if any) learns about it.
                state.skip(entry.index);
                let error = MasterError::Corrupt {
                    index: entry.index,
                    reason: error.to_string(),
                };
                tracing::error!(%error, "skipping an undecodable master log entry");
                Err(error)
            }
        };
        drop(state);
        let mut results = lock(&self.results);
        results.insert(entry.index, result);
        let keep = results.split_off(&entry.index.saturating_sub(RESULTS_KEPT));
        *results = keep;
    }

    fn fail(&self, error: MasterError) {
        tracing::error!(%error, "the master's apply loop stopped");
        lock(&self.failure).get_or_insert(error);
    }
}

async fn apply_loop(core: Arc<Core>, mut subscription: Subscription, applied: watch::Sender<u64>) {
    let mut shutdown = core.shutdown.subscribe();
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.wait_for(|&stop| stop) => break,
            next = subscription.next() => next,
        };
        match next {
            Some(Ok(Committed::Entry(entry))) => {
                core.apply_entry(&entry);
                applied.send_replace(entry.index);
                core.truncate_behind(entry.index).await;
            }
            Some(Ok(Committed::Snapshot(snapshot))) => match core.install_snapshot(&snapshot) {
                Ok(()) => {
                    applied.send_replace(snapshot.index);
                }
                Err(error) => {
                    core.fail(error);
                    break;
                }
            },
            Some(Err(error)) => {
                core.fail(MasterError::stream("reading the master log", error));
                break;
            }
            None => {
                core.fail(MasterError::Closed);
                break;
            }
        }
    }
}

/// Locks `mutex`, ignoring poison: every critical section leaves its data consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
