//! The register histories of `luna chaos` (src/chaos/history.rs, included here so that the
//! tests check with the same code), with the tests' seed and their failure report.

#[path = "../../src/chaos/history.rs"]
mod checked;

pub use checked::*;

/// The seed of a randomized test: `LUNA_SEED` to replay one, else a fresh one (printed).
pub fn seed() -> u64 {
    let seed = std::env::var("LUNA_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_nanos() as u64)
        });
    println!("seed {seed} (LUNA_SEED={seed} repeats its choices)");
    seed
}

/// Stops `registers` and panics, with `logs`, unless every key's history is linearizable.
pub async fn stop_and_check(registers: Registers, logs: impl FnOnce() -> String) {
    let histories = registers.stop().await;
    let check = check_registers(&histories);
    println!(
        "{} keys, {} operations ({} of unknown outcome)",
        check.keys, check.operations, check.unknown
    );
    assert!(check.operations > 0, "the register tasks recorded nothing");
    if let Some((key, minimal)) = check.violation {
        let lines = |ops: &[Recorded]| {
            ops.iter()
                .map(|op| format!("  {op:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        // The whole history too: the smallest part leaves out the writes it can, which
        // hides where a read's value came from.
        let mut whole = histories.get(&key).cloned().unwrap_or_default();
        whole.sort_by_key(|op| op.invoked);
        panic!(
            "{key}: the history is not linearizable; a smallest failing part:\n{}\nthe key's whole history:\n{}\n{}",
            lines(&minimal),
            lines(&whole),
            logs()
        );
    }
}
