//! The processes of a benchmark's or chaos run's universe: this same `luna` binary, started
//! as master replicas and tablet servers on loopback, signalled by PID.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::CliError;

/// How long a process may take to say it is serving.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A `luna` child process; killed when dropped, so a run leaves nothing running.
pub struct Process {
    child: Child,
    /// The first line it printed: what it serves, and for a tablet server its id.
    pub banner: String,
}

impl Process {
    /// Starts `luna ARGS` with its log in `log` and environment `env` added, and waits until
    /// it prints its banner.
    pub fn start(args: &[String], env: &[(&str, &str)], log: &Path) -> Result<Process, CliError> {
        let io = |what: &'static str| move |source| CliError::Io { what, source };
        // Appended to, so a restarted process's log follows its earlier life's.
        let log_file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io("opening a process log"))?;
        let exe = std::env::current_exe().map_err(io("finding the luna binary"))?;
        let mut child = Command::new(exe)
            .args(args)
            // The run's own LUNA_LOG when set (to dig into a failure), else info.
            .env(
                "LUNA_LOG",
                std::env::var("LUNA_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env_remove("LUNA_MASTER")
            .env_remove("LUNA_DATA_DIR")
            .env_remove("LUNA_OBJECT_STORE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(io("starting a luna process"))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            return Err(CliError::Invalid(
                "a child process has no stdout".to_owned(),
            ));
        };
        let (lines, banner) = mpsc::channel();
        std::thread::spawn(move || {
            // Drains stdout to the end, so the child never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let mut process = Process {
            child,
            banner: String::new(),
        };
        match banner.recv_timeout(START_TIMEOUT) {
            Ok(line) => process.banner = line,
            Err(_) => {
                return Err(CliError::Invalid(format!(
                    "`luna {}` did not start within {START_TIMEOUT:?}; see {}",
                    args.join(" "),
                    log.display()
                )));
            }
        }
        Ok(process)
    }

    /// SIGKILL, as a crash, and reaps the process.
    pub fn kill(mut self) {
        self.stop();
    }

    /// SIGSTOP: the process stops answering, as if it hung.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// The `http://` address its banner names.
    pub fn http_addr(&self) -> Option<&str> {
        let (_, rest) = self.banner.split_once("http://")?;
        rest.split(|c: char| c == ')' || c.is_whitespace()).next()
    }

    fn signal(&self, signal: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: `kill` has no memory effects; the pid is our own child, not yet reaped
        // (it is reaped only in `stop`, which takes the process).
        unsafe {
            libc::kill(pid, signal);
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free loopback address (see [`super::ports`]), for processes that must know each
/// other's addresses before they start.
pub fn free_addr() -> Result<String, CliError> {
    super::ports::free_loopback_addr().map_err(|source| CliError::Io {
        what: "finding a free port",
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Ports come from below the kernel's ephemeral range, where no outgoing connection
    /// takes one between the probe and the bind, and are never handed out twice.
    #[test]
    fn free_ports_avoid_the_ephemeral_range_and_repeats() {
        let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768);
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            let addr = free_addr().expect("a free port");
            let port: u16 = addr
                .rsplit(':')
                .next()
                .and_then(|port| port.parse().ok())
                .expect("a port");
            assert!(port < ephemeral_low, "{port}");
            assert!(seen.insert(port), "{port} handed out twice");
            assert!(std::net::TcpListener::bind(addr.as_str()).is_ok(), "{addr}");
        }
    }
}
