//! `luna start` as a user runs it: it prints its addresses, serves the CLI, stops cleanly on
//! Ctrl-C (SIGINT), and a second start on the same directory brings every acknowledged write
//! back.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `luna start` child, killed on drop if the test did not stop it.
struct Started {
    child: Child,
    banner: Vec<String>,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `luna start` with the master on `port` (servers on the ports after it); `None`
/// if it could not listen there.
fn start(dir: &std::path::Path, port: u16) -> Option<Started> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_luna"))
        .args(["start", "--data-dir"])
        .arg(dir)
        .args(["--master-addr", &format!("127.0.0.1:{port}")])
        .args(["--http-addr", &format!("127.0.0.1:{}", port + 40)])
        .env_remove("LUNA_OBJECT_STORE")
        .env_remove("LUNA_DATA_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn luna start");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        // Keeps draining after the test stops listening, so the child never writes into
        // a closed pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut banner = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                let done = line.starts_with("Press Ctrl-C");
                banner.push(line);
                if done {
                    return Some(Started { child, banner });
                }
            }
            // It exited (a port was taken) or hung.
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn cli(port: u16, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_luna"))
        .args(args)
        .env("LUNA_MASTER", format!("127.0.0.1:{port}"))
        .output()
        .expect("run the CLI")
}

/// Retries a CLI command while the universe settles (tablets getting their leaders).
fn cli_ok(port: u16, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = cli(port, args);
        if output.status.success() {
            return String::from_utf8_lossy(&output.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "`luna {}` kept failing: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Sends SIGINT, as Ctrl-C does, and waits for a clean exit.
fn interrupt(mut started: Started) {
    let pid = started.child.id().to_string();
    let sent = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = started.child.try_wait().expect("poll luna start") {
            assert!(
                status.success(),
                "luna start exited with {status} after Ctrl-C"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "luna start did not stop after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn start_serves_stops_on_ctrl_c_and_restarts_with_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("luna-data");
    // Ports derived from the process id keep parallel test runs apart; retry on a clash.
    let mut port = 20_000 + u16::try_from(std::process::id() % 20_000).unwrap_or(0);
    let started = loop {
        if let Some(started) = start(&data, port) {
            break started;
        }
        port = 20_000 + (port + 97) % 40_000;
    };
    let banner = started.banner.join("\n");
    assert!(
        banner.contains(&format!("master            127.0.0.1:{port}")),
        "{banner}"
    );
    assert_eq!(banner.matches("tablet server").count(), 3, "{banner}");

    cli_ok(port, &["db", "create", "app"]);
    cli_ok(
        port,
        &[
            "collection",
            "create",
            "app/users",
            "--hash",
            "--tablets",
            "3",
        ],
    );
    cli_ok(port, &["put", "app/users", "alice", "31"]);
    assert_eq!(cli_ok(port, &["get", "app/users", "alice"]).trim(), "31");
    interrupt(started);

    let started = start(&data, port).expect("restart on the same ports");
    assert_eq!(cli_ok(port, &["get", "app/users", "alice"]).trim(), "31");
    interrupt(started);
}

#[test]
fn start_refuses_unusable_flags_with_one_line() {
    for (flags, expected) in [
        (&["--servers", "11"][..], "more than luna start runs"),
        (
            &["--servers", "2"][..],
            "cannot hold --replication-factor 3",
        ),
        (&["--master-addr", "nowhere"][..], "expected HOST:PORT"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_luna"))
            .arg("start")
            .args(flags)
            .output()
            .expect("run luna start");
        assert!(!output.status.success(), "{flags:?}");
        let message = String::from_utf8_lossy(&output.stderr);
        assert!(message.contains(expected), "{flags:?}: {message}");
        assert_eq!(message.trim().lines().count(), 1, "{flags:?}: {message}");
    }
}
