//! Routing keys: how a collection's user keys map onto tablet ranges.
//!
//! A range-partitioned collection routes and stores a key as itself. A hash-partitioned one
//! prefixes it with a 4-byte big-endian xxHash32 of the key, so tablets own contiguous
//! ranges of the hash space and sequential keys spread over all of them. Clients and
//! servers must compute exactly the same bytes, so this lives next to the protos that both
//! share, and the hash is fixed (seed 0) forever: changing it would re-route stored data.

use crate::master::Partitioning;

/// Bytes of the hash prefix of a hash-partitioned routing key.
pub const HASH_PREFIX_LEN: usize = 4;

/// The routing (and storage) key of `key` in a collection partitioned by `partitioning`.
pub fn routing_key(partitioning: Partitioning, key: &[u8]) -> Vec<u8> {
    match partitioning {
        Partitioning::Range => key.to_vec(),
        Partitioning::Hash => {
            let mut out = Vec::with_capacity(HASH_PREFIX_LEN + key.len());
            out.extend_from_slice(&key_hash(key).to_be_bytes());
            out.extend_from_slice(key);
            out
        }
    }
}

/// The user key inside a routing key; `None` if a hash routing key is too short to be one.
pub fn user_key(partitioning: Partitioning, routing_key: &[u8]) -> Option<&[u8]> {
    match partitioning {
        Partitioning::Range => Some(routing_key),
        Partitioning::Hash => routing_key.get(HASH_PREFIX_LEN..),
    }
}

/// The partitioning hash of a user key.
pub fn key_hash(key: &[u8]) -> u32 {
    twox_hash::XxHash32::oneshot(0, key)
}

/// Boundaries that cut the 32-bit hash space into `tablets` nearly equal ranges: the
/// `tablets - 1` interior split points, as 4-byte routing-key prefixes.
pub fn hash_split_points(tablets: u32) -> Vec<Vec<u8>> {
    let tablets = u64::from(tablets.max(1));
    (1..tablets)
        .map(|i| {
            let boundary = (i << 32) / tablets;
            // boundary < 2^32 because i < tablets.
            u32::try_from(boundary)
                .unwrap_or(u32::MAX)
                .to_be_bytes()
                .to_vec()
        })
        .collect()
}

/// The middle of the hash range `[start, end)` of a hash collection's tablet (`end: None`
/// is the end of the hash space), as a 4-byte routing-key prefix; `None` if the range is
/// one hash value wide and cannot be cut.
pub fn hash_range_middle(start: &[u8], end: Option<&[u8]>) -> Option<Vec<u8>> {
    let prefix = |key: &[u8]| {
        let mut bytes = [0u8; HASH_PREFIX_LEN];
        let len = key.len().min(HASH_PREFIX_LEN);
        bytes[..len].copy_from_slice(&key[..len]);
        u64::from(u32::from_be_bytes(bytes))
    };
    let low = prefix(start);
    let high = end.map_or(1 << 32, prefix);
    let middle = low + (high.saturating_sub(low)) / 2;
    let middle = u32::try_from(middle).ok()?;
    (u64::from(middle) > low).then(|| middle.to_be_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_ranges_halve_and_a_single_hash_does_not() {
        assert_eq!(hash_range_middle(&[], None), Some(vec![0x80, 0, 0, 0]));
        assert_eq!(
            hash_range_middle(&[0x80, 0, 0, 0], None),
            Some(vec![0xc0, 0, 0, 0])
        );
        assert_eq!(
            hash_range_middle(&[0, 0, 0, 0], Some(&[0x40, 0, 0, 0])),
            Some(vec![0x20, 0, 0, 0])
        );
        assert_eq!(hash_range_middle(&[0, 0, 0, 7], Some(&[0, 0, 0, 8])), None);
    }

    #[test]
    fn range_keys_route_as_themselves() {
        assert_eq!(routing_key(Partitioning::Range, b"abc"), b"abc");
        assert_eq!(user_key(Partitioning::Range, b"abc"), Some(&b"abc"[..]));
    }

    #[test]
    fn hash_keys_round_trip_and_are_stable() {
        let routed = routing_key(Partitioning::Hash, b"user:42");
        assert_eq!(routed.len(), HASH_PREFIX_LEN + 7);
        assert_eq!(user_key(Partitioning::Hash, &routed), Some(&b"user:42"[..]));
        // Pinned: stored data depends on this exact function.
        assert_eq!(key_hash(b""), 0x02cc_5d05);
        assert_eq!(user_key(Partitioning::Hash, b"ab"), None);
    }

    #[test]
    fn split_points_cut_the_hash_space_evenly_and_in_order() {
        assert!(hash_split_points(1).is_empty());
        assert_eq!(hash_split_points(2), vec![vec![0x80, 0, 0, 0]]);
        let points = hash_split_points(7);
        assert_eq!(points.len(), 6);
        assert!(points.windows(2).all(|pair| pair[0] < pair[1]));
    }
}
