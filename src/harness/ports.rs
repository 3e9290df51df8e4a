//! Free loopback ports for processes that must know each other's addresses before they
//! start. Shared with the integration tests (`tests/support`).
//!
//! A port is only free until someone takes it, and the port a bind to port 0 returns
//! comes from the kernel's ephemeral range, where every outgoing connection on the
//! machine takes its local port too: a test's gRPC client could take a port between the
//! probe that found it free and the process that binds it. So candidates come from below
//! that range, where only explicit binds go.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Ports this process handed out already: two processes of one universe must never get
/// the same one.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Draws candidate ports (seeded from the clock and the process id, so that concurrent
/// test processes draw different ones).
static DRAWS: Mutex<Option<SmallRng>> = Mutex::new(None);

/// Probes before giving up.
const ATTEMPTS: usize = 64;

/// The lowest candidate: below are the well-known and registered ports that services
/// tend to use.
const LOWEST_CANDIDATE: u16 = 10_000;

/// Where outgoing connections take their local ports when the kernel does not say
/// (Linux's default `ip_local_port_range` starts here).
const DEFAULT_EPHEMERAL_LOW: u16 = 32_768;

/// A loopback address whose port was free a moment ago, outside the ephemeral range,
/// and that this process has not handed out before. Another process may still take it
/// before it is used, which fails loudly (the address is in use), never silently.
pub fn free_loopback_addr() -> std::io::Result<String> {
    let high = ephemeral_low();
    if high <= LOWEST_CANDIDATE {
        return any_free_loopback_addr();
    }
    let mut draws = DRAWS.lock().unwrap_or_else(PoisonError::into_inner);
    let rng = draws.get_or_insert_with(|| SmallRng::seed_from_u64(seed()));
    for _ in 0..ATTEMPTS {
        let port = rng.random_range(LOWEST_CANDIDATE..high);
        if HANDED_OUT
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&port)
        {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            hand_out(port);
            return Ok(format!("127.0.0.1:{port}"));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free port below {high} in {ATTEMPTS} probes"),
    ))
}

/// A port the kernel picks (from the ephemeral range), for a machine whose ephemeral
/// range leaves nothing below it.
fn any_free_loopback_addr() -> std::io::Result<String> {
    for _ in 0..ATTEMPTS {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        if hand_out(addr.port()) {
            return Ok(addr.to_string());
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("the kernel offered only ports handed out already in {ATTEMPTS} probes"),
    ))
}

/// Records `port` as handed out; whether it was not before.
fn hand_out(port: u16) -> bool {
    HANDED_OUT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(port)
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_LOW)
}

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}
