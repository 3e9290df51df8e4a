//! Free loopback ports for processes that must know each other's addresses before they
//! start. Shared with the integration tests (`tests/support`).

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

/// Ports this process handed out already: once a probe listener closes, the kernel may
/// offer its port again, and two processes of one universe must never get the same one.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Probes before giving up (each new port is as likely as the last to be fresh).
const ATTEMPTS: usize = 64;

/// A loopback address whose port was free a moment ago and that this process has not
/// handed out before. Another process may still take it before it is used, which fails
/// loudly (the address is in use), never silently.
pub fn free_loopback_addr() -> std::io::Result<String> {
    for _ in 0..ATTEMPTS {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let fresh = HANDED_OUT
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr.port());
        if fresh {
            return Ok(addr.to_string());
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("the kernel offered only ports handed out already in {ATTEMPTS} probes"),
    ))
}
