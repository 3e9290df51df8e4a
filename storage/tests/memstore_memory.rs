//! Memory held by a MemStore, measured by a counting global allocator. The
//! binary holds this one test so that nothing else allocates during the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use luna_storage::{Limits, MemStore, MemStoreOptions, MemoryBudget, WriteBatch};

/// Live bytes requested from the allocator by this process.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

struct Counting;

fn signed(size: usize) -> isize {
    isize::try_from(size).expect("allocation sizes fit in isize")
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter is only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(signed(layout.size()), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(signed(layout.size()), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(signed(layout.size()), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE_BYTES.fetch_add(signed(new_size) - signed(layout.size()), Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ENTRIES: usize = 100_000;
const KEY_BYTES: usize = 16;
const VALUE_BYTES: usize = 100;
const PER_BATCH: usize = 100;

/// 100,000 entries of 16-byte keys and 100-byte values cost at most twice
/// their raw size in allocated memory.
#[test]
fn memstore_holds_entries_in_under_twice_their_raw_size() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let memstore = MemStore::new(
        MemStoreOptions {
            memtable_size: usize::MAX,
            limits: Limits::default(),
        },
        Arc::new(MemoryBudget::new(usize::MAX)),
    );
    runtime.block_on(async {
        for (batch_index, first) in (0..ENTRIES).step_by(PER_BATCH).enumerate() {
            let mut batch = WriteBatch::new();
            for i in first..first + PER_BATCH {
                let key = format!("{i:016}");
                debug_assert_eq!(key.len(), KEY_BYTES);
                batch.put(key, vec![(i % 251) as u8; VALUE_BYTES]);
            }
            let seq = batch_index as u64 + 1;
            memstore.write(seq, seq, &batch).await.expect("write");
        }
    });
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let memtables = memstore.snapshot().expect("snapshot");
    assert_eq!(memtables.len(), 1, "nothing rotated");
    assert_eq!(memtables[0].len(), ENTRIES);
    drop(memtables);

    let raw = ENTRIES * (KEY_BYTES + VALUE_BYTES);
    let grown = usize::try_from(after - before).expect("memory grew");
    let ratio = grown as f64 / raw as f64;
    let estimate = memstore.snapshot().expect("snapshot")[0].approximate_bytes();
    println!(
        "memstore: {grown} bytes allocated for {raw} raw bytes: {ratio:.3}x \
         ({:.1} bytes per entry beyond key and value; the memtable estimates {estimate} bytes)",
        (grown - raw) as f64 / ENTRIES as f64
    );
    assert_eq!(memstore.snapshot().expect("snapshot")[0].raw_bytes(), raw);
    assert!(
        grown <= 2 * raw,
        "{grown} bytes allocated for {raw} raw bytes ({ratio:.3}x)"
    );
    drop(memstore);
}
