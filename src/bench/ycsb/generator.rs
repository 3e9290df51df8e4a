//! Key choosers of the YCSB core workloads: zipfian (Gray et al., "Quickly generating
//! billion-record synthetic databases", SIGMOD 1994, as YCSB implements it), its scrambled
//! form, "latest", and uniform; and the counter that hands out keys to insert.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use rand::Rng;

/// YCSB's skew: item 0 is drawn about 1 / zeta(n) of the time.
pub const ZIPFIAN_THETA: f64 = 0.99;

/// The item count the scrambled generator draws ranks from, as YCSB's
/// `ScrambledZipfianGenerator`: ranks from this large space are hashed onto the real key
/// space, so the popularity curve does not depend on the record count and its zeta is a
/// constant instead of an O(n) sum at start-up.
const SCRAMBLED_ITEM_COUNT: u64 = 10_000_000_000;

/// zeta(SCRAMBLED_ITEM_COUNT, 0.99), YCSB's precomputed `ZETAN`.
const SCRAMBLED_ZETAN: f64 = 26.469_028_201_783_02;

/// The sum of 1 / i^theta for i in (from, to]: zeta(to) given zeta(from) = `partial`.
fn zeta_from(from: u64, to: u64, theta: f64, partial: f64) -> f64 {
    (from + 1..=to).fold(partial, |sum, i| sum + 1.0 / (i as f64).powf(theta))
}

/// Zipfian ranks over `[0, items)`: rank 0 is the most popular, rank i has weight
/// 1 / (i + 1)^theta. Gray et al.'s method: O(1) per draw once zeta(items) is known, and
/// the item count may grow later at the cost of extending the sum (as "latest" needs).
#[derive(Debug, Clone)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zeta2: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    /// A generator over `[0, items)` (`items` >= 1); computes zeta(items) in O(items).
    pub fn new(items: u64, theta: f64) -> Zipfian {
        let zetan = zeta_from(0, items, theta, 0.0);
        Zipfian::with_zeta(items, theta, zetan)
    }

    /// A generator over `[0, items)` whose zeta(items) is known.
    fn with_zeta(items: u64, theta: f64, zetan: f64) -> Zipfian {
        let zeta2 = zeta_from(0, 2, theta, 0.0);
        let mut zipfian = Zipfian {
            items,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zeta2,
            zetan,
            eta: 0.0,
        };
        zipfian.eta = zipfian.eta_for(items);
        zipfian
    }

    fn eta_for(&self, items: u64) -> f64 {
        (1.0 - (2.0 / items as f64).powf(1.0 - self.theta)) / (1.0 - self.zeta2 / self.zetan)
    }

    /// Grows the item count to `items` (never shrinks: YCSB's "latest" only ever grows).
    fn grow(&mut self, items: u64) {
        if items > self.items {
            self.zetan = zeta_from(self.items, items, self.theta, self.zetan);
            self.items = items;
            self.eta = self.eta_for(items);
        }
    }

    /// The next rank, in `[0, items)`.
    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.items - 1);
        }
        let rank = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        // Rounding can land exactly on `items` when u is close to 1.
        rank.min(self.items - 1)
    }
}

/// YCSB's 64-bit FNV-1a over the 8 little-endian bytes of `value`: spreads the popular
/// ranks over the key space so that they do not cluster in one tablet.
pub fn fnv_hash64(value: u64) -> u64 {
    const OFFSET_BASIS: u64 = 0xCBF2_9CE4_8422_2325;
    const PRIME: u64 = 1_099_511_628_211;
    value.to_le_bytes().iter().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

/// YCSB's `ScrambledZipfianGenerator`: zipfian popularity over `[0, items)`, with the
/// popular items scattered by a hash instead of being 0, 1, 2, ...
#[derive(Debug, Clone)]
pub struct ScrambledZipfian {
    items: u64,
    ranks: Zipfian,
}

impl ScrambledZipfian {
    /// A generator over `[0, items)`, `items` >= 1.
    pub fn new(items: u64) -> ScrambledZipfian {
        ScrambledZipfian {
            items,
            ranks: Zipfian::with_zeta(SCRAMBLED_ITEM_COUNT, ZIPFIAN_THETA, SCRAMBLED_ZETAN),
        }
    }

    /// The next item, in `[0, items)`.
    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        fnv_hash64(self.ranks.next(rng)) % self.items
    }
}

/// Hands out the numbers of keys to insert, and tracks which inserts have completed, so
/// that reads only choose keys that exist (YCSB's `AcknowledgedCounterGenerator`).
#[derive(Debug)]
pub struct InsertCounter {
    next: AtomicU64,
    /// Every key below this has been inserted (or its insert has failed).
    limit: AtomicU64,
    /// Completed inserts above `limit`, waiting for the gap below them to close.
    done: Mutex<BTreeSet<u64>>,
}

impl InsertCounter {
    /// A counter whose keys below `start` already exist.
    pub fn new(start: u64) -> InsertCounter {
        InsertCounter {
            next: AtomicU64::new(start),
            limit: AtomicU64::new(start),
            done: Mutex::new(BTreeSet::new()),
        }
    }

    /// The number of a new key to insert.
    pub fn claim(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Marks `key` as done. A failed insert counts as done too, else one error would freeze
    /// the readable range for the rest of the run; a read of it then finds nothing.
    pub fn complete(&self, key: u64) {
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        done.insert(key);
        let mut limit = self.limit.load(Ordering::Acquire);
        while done.remove(&limit) {
            limit += 1;
        }
        self.limit.store(limit, Ordering::Release);
    }

    /// Keys below this exist.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }
}

/// How the key of a read, update, scan or read-modify-write is chosen.
#[derive(Debug, Clone)]
pub enum KeyChooser {
    /// Every existing key equally likely.
    Uniform,
    /// Scrambled zipfian over the records plus the inserts expected during the run, drawing
    /// again when it picks a key not inserted yet (as YCSB does).
    Zipfian(ScrambledZipfian),
    /// The newest keys most likely: zipfian by distance from the last inserted key.
    Latest(Zipfian),
}

impl KeyChooser {
    /// The number of an existing key; `limit` (>= 1) is [`InsertCounter::limit`].
    pub fn next(&mut self, rng: &mut impl Rng, limit: u64) -> u64 {
        match self {
            KeyChooser::Uniform => rng.random_range(0..limit),
            KeyChooser::Zipfian(zipfian) => {
                // The generator covers at most a few expected inserts more than exist, so
                // a few redraws are enough; the bound only guards against a caller's error.
                for _ in 0..1000 {
                    let key = zipfian.next(rng);
                    if key < limit {
                        return key;
                    }
                }
                rng.random_range(0..limit)
            }
            KeyChooser::Latest(zipfian) => {
                zipfian.grow(limit);
                let distance = zipfian.next(rng).min(limit - 1);
                limit - 1 - distance
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn counts(draw: impl Fn(&mut SmallRng) -> u64, items: u64, samples: u64) -> Vec<u64> {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut counts = vec![0u64; items as usize];
        for _ in 0..samples {
            let item = draw(&mut rng);
            assert!(item < items, "{item} is out of [0, {items})");
            counts[item as usize] += 1;
        }
        counts
    }

    #[test]
    fn zipfian_ranks_get_their_share() {
        let (items, samples) = (1000, 500_000);
        let zipfian = Zipfian::new(items, ZIPFIAN_THETA);
        let counts = counts(|rng| zipfian.next(rng), items, samples);
        let zetan = zeta_from(0, items, ZIPFIAN_THETA, 0.0);
        // Ranks 0 and 1 are exact in Gray et al.'s method; later ranks are approximated,
        // so they get a looser tolerance.
        for (rank, tolerance) in [(0usize, 0.03), (1, 0.05), (9, 0.2), (99, 0.3)] {
            let expected = 1.0 / ((rank + 1) as f64).powf(ZIPFIAN_THETA) / zetan;
            let share = counts[rank] as f64 / samples as f64;
            assert!(
                (share - expected).abs() <= expected * tolerance,
                "rank {rank}: share {share}, expected {expected}"
            );
        }
        // Popularity falls with rank.
        assert!(counts[0] > counts[1] && counts[1] > counts[10] && counts[10] > counts[500]);
    }

    #[test]
    fn scrambled_zipfian_is_skewed_spread_and_deterministic() {
        let (items, samples) = (1000, 500_000);
        let zipfian = ScrambledZipfian::new(items);
        let counts = counts(|rng| zipfian.next(rng), items, samples);
        let mut sorted = counts.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        // The hottest item is rank 0 of 10^10, hashed: 1 / 26.47 = 3.78% of draws, plus the
        // ranks that hash onto the same item (about 1 / items of the rest).
        let top = sorted[0] as f64 / samples as f64;
        assert!((0.034..0.045).contains(&top), "hottest item got {top}");
        // Ten items take far more than 1% of the draws, yet every item is drawn.
        let top10: u64 = sorted[..10].iter().sum();
        assert!(top10 as f64 / samples as f64 > 0.1, "top 10 got {top10}");
        assert!(sorted[items as usize - 1] > 0, "some item was never drawn");
        // The hot items are scattered, not 0, 1, 2, ...
        let hottest = counts.iter().position(|c| *c == sorted[0]);
        assert_ne!(hottest, Some(0));
        // The same seed draws the same sequence.
        let draw = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..100).map(|_| zipfian.next(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn zipfian_can_grow() {
        let mut grown = Zipfian::new(10, ZIPFIAN_THETA);
        grown.grow(5000);
        let fresh = Zipfian::new(5000, ZIPFIAN_THETA);
        assert!((grown.zetan - fresh.zetan).abs() < 1e-9);
        assert!((grown.eta - fresh.eta).abs() < 1e-12);
    }

    #[test]
    fn latest_prefers_new_keys_and_stays_in_range() {
        let mut chooser = KeyChooser::Latest(Zipfian::new(1, ZIPFIAN_THETA));
        let mut rng = SmallRng::seed_from_u64(1);
        let draws: Vec<u64> = (0..10_000).map(|_| chooser.next(&mut rng, 1000)).collect();
        assert!(draws.iter().all(|key| *key < 1000));
        let newest = draws.iter().filter(|key| **key == 999).count();
        assert!(newest > 10_000 / 20, "the newest key got {newest} draws");
        assert_eq!(chooser.next(&mut rng, 1), 0);
    }

    #[test]
    fn insert_counter_waits_for_gaps() {
        let counter = InsertCounter::new(10);
        let (a, b, c) = (counter.claim(), counter.claim(), counter.claim());
        assert_eq!((a, b, c), (10, 11, 12));
        counter.complete(b);
        assert_eq!(counter.limit(), 10);
        counter.complete(a);
        assert_eq!(counter.limit(), 12);
        counter.complete(c);
        assert_eq!(counter.limit(), 13);
    }
}
