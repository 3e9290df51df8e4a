//! A network partition a server can be told to keep: the raft traffic it drops, both ways,
//! to and from chosen peers. Fault tests (`luna chaos`) cut servers off from each other
//! with it, without network namespaces or root.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// The peers whose raft messages this server drops, sent or received. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct Partition {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Whether any peer is cut: the only cost of a healed partition on the message path.
    any: AtomicBool,
    cut: RwLock<HashSet<u64>>,
}

impl Partition {
    /// Drops every message to and from `peers` from now on (replacing the earlier set).
    pub fn cut(&self, peers: impl IntoIterator<Item = u64>) {
        let mut cut = self
            .inner
            .cut
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        *cut = peers.into_iter().collect();
        self.inner.any.store(!cut.is_empty(), Ordering::Release);
    }

    /// Delivers everything again.
    pub fn heal(&self) {
        self.cut([]);
    }

    /// The peers cut off now.
    pub fn peers(&self) -> Vec<u64> {
        let mut peers: Vec<u64> = self
            .inner
            .cut
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect();
        peers.sort_unstable();
        peers
    }

    /// Whether messages to or from `peer` are dropped.
    pub(crate) fn blocks(&self, peer: u64) -> bool {
        self.inner.any.load(Ordering::Acquire)
            && self
                .inner
                .cut
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_blocks_only_its_peers_until_healed() {
        let partition = Partition::default();
        assert!(!partition.blocks(2));
        let shared = partition.clone();
        shared.cut([2, 3]);
        assert!(partition.blocks(2) && partition.blocks(3) && !partition.blocks(4));
        assert_eq!(partition.peers(), [2, 3]);
        partition.cut([4]);
        assert!(!partition.blocks(2) && partition.blocks(4));
        partition.heal();
        assert!(!shared.blocks(4));
        assert!(partition.peers().is_empty());
    }
}
