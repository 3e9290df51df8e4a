//! The leader hint a replica that does not lead attaches to its UNAVAILABLE answers: the
//! client address of the replica it believes leads, so the caller goes there next instead
//! of trying every address in turn.

use tonic::Status;
use tonic::metadata::MetadataValue;

/// The metadata key of the hint.
pub const LEADER_HINT_KEY: &str = "luna-leader";

/// Attaches `leader_addr` to `status`. An address that is not valid metadata is left out:
/// the hint is an optimisation, and callers still find the leader without it.
pub fn attach(status: &mut Status, leader_addr: &str) {
    if let Ok(value) = MetadataValue::try_from(leader_addr) {
        status.metadata_mut().insert(LEADER_HINT_KEY, value);
    }
}

/// The leader address `status` names, if any.
pub fn read(status: &Status) -> Option<String> {
    let value = status.metadata().get(LEADER_HINT_KEY)?;
    let addr = value.to_str().ok()?.trim();
    (!addr.is_empty()).then(|| addr.to_owned())
}

/// The order in which a caller tries the replicas of a replicated service while it looks
/// for the leader: the replica that answered last first, then whichever replica the one
/// that failed names as leader (listed or not, so any one address leads to the leader),
/// else the next listed address.
#[derive(Debug)]
pub struct LeaderSearch<'a> {
    listed: &'a [String],
    current: String,
    rotation: usize,
    /// Addresses that did not answer at all: until their election timeout runs out, the
    /// followers of a dead leader still name it, and following them back there is wasted.
    down: Vec<String>,
}

impl<'a> LeaderSearch<'a> {
    /// Starts at `start`, among the `listed` addresses (which must not be empty).
    pub fn new(listed: &'a [String], start: String) -> Self {
        // Continuing from an unlisted start goes to the first listed address next.
        let rotation = listed
            .iter()
            .position(|addr| *addr == start)
            .unwrap_or(listed.len().saturating_sub(1));
        LeaderSearch {
            listed,
            current: start,
            rotation,
            down: Vec::new(),
        }
    }

    /// The address to call now.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// Notes that the current address did not answer at all (its connection was refused,
    /// or it let the request time out), so later hints naming it are not followed.
    pub fn mark_down(&mut self) {
        if !self.down.contains(&self.current) {
            self.down.push(self.current.clone());
        }
    }

    /// Moves on after the current address failed: to `hint`, the leader it named (in the
    /// caller's spelling) unless that is the current or a [down](Self::mark_down) address,
    /// else to the next listed address.
    pub fn next(&mut self, hint: Option<String>) {
        let followed = hint.filter(|hint| *hint != self.current && !self.down.contains(hint));
        self.current = match followed {
            Some(hint) => hint,
            None if self.listed.is_empty() => return,
            None => {
                self.rotation = (self.rotation + 1) % self.listed.len();
                self.listed[self.rotation].clone()
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_follows_hints_and_otherwise_goes_round_the_list() {
        let listed: Vec<String> = ["a", "b", "c"].map(str::to_owned).to_vec();
        let mut search = LeaderSearch::new(&listed, "b".to_owned());
        assert_eq!(search.current(), "b");
        search.next(None);
        assert_eq!(search.current(), "c");
        search.next(Some("x".to_owned()));
        assert_eq!(search.current(), "x", "an unlisted leader is still tried");
        search.next(Some("x".to_owned()));
        assert_eq!(
            search.current(),
            "a",
            "a hint naming the failed one is ignored"
        );
        search.mark_down();
        search.next(None);
        assert_eq!(search.current(), "b");
        search.next(Some("a".to_owned()));
        assert_eq!(
            search.current(),
            "c",
            "a hint naming an address that did not answer is ignored"
        );
        let mut search = LeaderSearch::new(&listed, "x".to_owned());
        search.next(None);
        assert_eq!(
            search.current(),
            "a",
            "from an unlisted start the list starts over"
        );
    }

    #[test]
    fn a_hint_survives_the_status_and_a_bad_one_is_left_out() {
        let mut status = Status::unavailable("not the leader");
        assert_eq!(read(&status), None);
        attach(&mut status, "127.0.0.1:7421");
        assert_eq!(read(&status).as_deref(), Some("127.0.0.1:7421"));
        let mut status = Status::unavailable("not the leader");
        attach(&mut status, "bad\naddress");
        assert_eq!(read(&status), None);
    }
}
