//! Which master replica serves: the leader of the master's stream, once it has taken over.
//!
//! Every replica applies the log, but only the leader answers requests, because soft state
//! (liveness, group leaders) and the TSO live on the leader alone. When the stream elects
//! this replica, [`leadership_loop`] runs [`Core::activate`] for the new term; requests are
//! served once `serving` names the current term. A replica that does not lead answers
//! [`MasterError::NotLeader`] with the leader's address, and a request that arrives during an
//! election waits up to `election_wait` for one.

use std::sync::Arc;
use std::time::Duration;

use luna_kernel::stream::{Leadership, StreamError};

use crate::core::Core;
use crate::error::MasterError;

/// Pause before retrying a failed takeover (the stream is busy electing or catching up).
const ACTIVATION_RETRY: Duration = Duration::from_millis(50);

impl Core {
    /// Waits until this replica serves as the leader, and returns the term it serves; fails
    /// with the leader's address if another replica leads, or as unavailable if no leader
    /// emerges within `election_wait`.
    pub async fn lead(&self) -> Result<u64, MasterError> {
        self.check_running()?;
        let deadline = tokio::time::Instant::now() + self.config.election_wait;
        let mut leadership = self.stream().watch_leadership();
        let mut serving = self.serving.subscribe();
        let mut shutdown = self.shutdown.subscribe();
        let mut applied = self.watch_applied();
        loop {
            let current = *leadership.borrow_and_update();
            if current.is_leader && *serving.borrow_and_update() == current.term {
                return Ok(current.term);
            }
            if !current.is_leader && current.leader_id.is_some() {
                return Err(self.not_leader(current));
            }
            // An election is under way, or this replica won one and is catching up.
            tokio::select! {
                changed = leadership.changed() => if changed.is_err() {
                    return Err(MasterError::Closed);
                },
                _ = serving.changed() => {}
                // The apply loop stopped: its failure is the answer.
                stopped = applied.changed() => if stopped.is_err() {
                    return Err(self.check_running().err().unwrap_or(MasterError::Closed));
                },
                _ = shutdown.wait_for(|&stop| stop) => return Err(MasterError::Closed),
                () = tokio::time::sleep_until(deadline) => {
                    return Err(MasterError::Unavailable {
                        message: format!(
                            "no master leader was elected within {:?} (term {})",
                            self.config.election_wait, current.term
                        ),
                    });
                }
            }
        }
    }

    /// Fails unless this replica still serves `term` as a leader holding its lease. A
    /// deposed leader whose lease ran out cannot pass, and a new leader is elected only
    /// after the old lease ran out, so two replicas never both pass at the same time.
    pub async fn check_lease(&self, term: u64) -> Result<(), MasterError> {
        self.stream()
            .lease_read()
            .await
            .map_err(|e| self.stream_error("confirming the master lease", e))?;
        let current = self.stream().leadership();
        if current.term != term || *self.serving.borrow() != term {
            return Err(self.not_leader(current));
        }
        Ok(())
    }

    /// Waits until this replica serves as leader and still holds its lease (see
    /// [`check_lease`](Self::check_lease)), and returns the term: a deposed leader cut off
    /// from the others must not answer reads from a catalog the new leader may have
    /// changed.
    pub async fn lead_with_lease(&self) -> Result<u64, MasterError> {
        let term = self.lead().await?;
        self.check_lease(term).await?;
        Ok(term)
    }

    /// Waits until this replica serves as leader or knows another leader (`lead` gives up
    /// after `election_wait`), and then until its state has caught up with what the leader
    /// had committed, for at most another `election_wait`: a master opened alone is ready
    /// when `open` returns, and a follower that cannot apply its log fails the open.
    pub async fn settle(&self) {
        let _ = self.lead().await;
        let caught_up = async {
            let index = self.stream().read_index().await.ok()?;
            self.wait_applied(index).await.ok()
        };
        let _ = tokio::time::timeout(self.config.election_wait, caught_up).await;
    }

    /// A stream error of this replica's, as the error its callers act on: `NotLeader`
    /// names the leader's client address, as the stream only knows its node id.
    pub(crate) fn stream_error(&self, context: &'static str, error: StreamError) -> MasterError {
        match error {
            StreamError::NotLeader { leader_hint, term } => self.not_leader(Leadership {
                term,
                leader_id: leader_hint,
                is_leader: false,
            }),
            error => MasterError::stream(context, error),
        }
    }

    fn not_leader(&self, leadership: Leadership) -> MasterError {
        let leader = leadership.leader_id.filter(|_| !leadership.is_leader);
        MasterError::NotLeader {
            leader_addr: leader.and_then(|id| self.config.replica_addrs.get(&id).cloned()),
            term: leadership.term,
        }
    }
}

/// Takes over each term this replica is elected for, until shutdown.
pub(crate) async fn leadership_loop(core: Arc<Core>) {
    let mut leadership = core.stream().watch_leadership();
    let mut shutdown = core.shutdown.subscribe();
    loop {
        let current = *leadership.borrow_and_update();
        let mut retry = false;
        if !current.is_leader && *core.serving.borrow() != 0 {
            // Under the TSO lock, so no batch of the ended term is being handed out.
            let _tso = core.tso.lock().await;
            core.serving.send_replace(0);
            tracing::info!(term = current.term, "master replica stopped leading");
        }
        if current.is_leader
            && *core.serving.borrow() != current.term
            && let Err(error) = core.activate(current.term).await
        {
            if core.check_running().is_err() {
                break;
            }
            tracing::warn!(term = current.term, %error, "taking over as master leader");
            retry = true;
        }
        tokio::select! {
            changed = leadership.changed() => if changed.is_err() {
                break;
            },
            () = tokio::time::sleep(ACTIVATION_RETRY), if retry => {}
            _ = shutdown.wait_for(|&stop| stop) => break,
        }
    }
}
