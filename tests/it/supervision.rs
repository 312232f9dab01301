//! Supervision, as an operator meets it: a panicked upload attempt does not
//! strand its files, a dead uploader or ingest loop stops the daemon with 70
//! and a log line that says which loop died (so systemd restarts it), SIGIO
//! (a broken spool lease) does not kill the daemon, and both units arm the
//! systemd watchdog. The panics are made with the `=panic` failpoints, which
//! this test build has and a release build does not.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indexedcp::failpoint;

use crate::fixtures::*;
use crate::support::*;

/// A daemon whose stderr (its log) is collected for the test to read.
struct LoggedDaemon {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl LoggedDaemon {
    fn start(config: &Path, failpoints: &str) -> LoggedDaemon {
        let mut child = indexedcp()
            .args(["daemon", "--config"])
            .arg(config)
            .env(failpoint::ENV, failpoints)
            .env("INDEXEDCP_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start indexedcp daemon");
        let mut stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        LoggedDaemon { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for the daemon to exit on its own.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        let exited = wait_until(
            "the daemon to exit",
            Duration::from_millis(20),
            timeout,
            || Ok(child.try_wait()?.is_some()),
        );
        assert!(
            exited.is_ok(),
            "the daemon still runs; log:\n{}",
            self.log()
        );
        self.child.wait().unwrap()
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for LoggedDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_panicked_upload_attempt_releases_its_files() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let mut daemon = LoggedDaemon::start(&config, &format!("{}=panic", failpoint::UPLOAD_ATTEMPT));
    let content = pseudo_random(100_000, 9);
    drop_file(&staging, &spool, "first.bin", &content);
    // The first attempt panics; its file must be tried again, not stay busy
    // until a restart.
    let expected = BTreeMap::from([("first.bin".to_owned(), content)]);
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;
    let log = daemon.log();
    assert!(
        log.contains("upload attempt panicked"),
        "no log line for the panicked attempt:\n{log}"
    );
    assert!(daemon.is_running(), "the daemon stopped:\n{log}");
    eventually(
        Duration::from_secs(10),
        "the buffer to confirm the file",
        async || {
            let files = status_json(&config);
            (files.len() == 1 && files[0]["state"] == "confirmed").then_some(())
        },
    )
    .await;
}

/// Also shows that the integration tests' binary has the failpoints (the
/// crate's own dev-dependency turns the feature on): without them the daemon
/// would run on and every crash test would pass without crashing anything.
#[tokio::test]
async fn a_dead_uploader_loop_stops_the_daemon_with_70() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let mut daemon = LoggedDaemon::start(&config, &format!("{}=panic", failpoint::UPLOADER_LOOP));
    let status = daemon.wait_exit(Duration::from_secs(30));
    let log = daemon.log();
    assert_eq!(status.code(), Some(70), "log:\n{log}");
    assert!(
        log.contains("the agent's uploader loop stopped unexpectedly (panicked: failpoint uploader-loop reached"),
        "no log line naming the dead loop:\n{log}"
    );
    // Nothing is lost: a file dropped now waits in the spool for the restart.
    drop_file(&staging, &spool, "later.txt", b"later");
    let mut restarted = LoggedDaemon::start(&config, "");
    let expected = BTreeMap::from([("later.txt".to_owned(), b"later".to_vec())]);
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;
    assert!(restarted.is_running());
}

#[tokio::test]
async fn a_dead_ingest_loop_stops_the_daemon_with_70_and_keeps_the_file() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let mut daemon = LoggedDaemon::start(&config, &format!("{}=panic", failpoint::INGEST_LOOP));
    drop_file(&staging, &spool, "kept.txt", b"kept");
    let status = daemon.wait_exit(Duration::from_secs(30));
    let log = daemon.log();
    assert_eq!(status.code(), Some(70), "log:\n{log}");
    assert!(
        log.contains("failpoint ingest-loop reached"),
        "no log line naming the panic:\n{log}"
    );
    assert_eq!(std::fs::read(spool.join("kept.txt")).unwrap(), b"kept");
    assert!(visible_files(&out).is_empty());
}

/// The spool's settle rule takes a read lease for a moment; a writer opening
/// the file in that moment makes the kernel send SIGIO, whose default action
/// would end the daemon. The signal is sent here directly, as a lease break
/// would.
#[tokio::test]
async fn sigio_does_not_kill_the_daemon() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let mut daemon = LoggedDaemon::start(&config, "");
    drop_file(&staging, &spool, "before.txt", b"before");
    let mut expected = BTreeMap::from([("before.txt".to_owned(), b"before".to_vec())]);
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;
    for _ in 0..3 {
        unsafe_kill(daemon.child.id(), libc::SIGIO);
    }
    drop_file(&staging, &spool, "after.txt", b"after");
    expected.insert("after.txt".to_owned(), b"after".to_vec());
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;
    assert!(daemon.is_running(), "log:\n{}", daemon.log());
    let status = signal_and_wait(&mut daemon.child, libc::SIGTERM, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log());
}

#[test]
fn both_units_arm_the_watchdog() {
    for unit in ["indexedcp.service", "indexedcp-receiver.service"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("systemd")
            .join(unit);
        let text = std::fs::read_to_string(&path).unwrap();
        let value = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("WatchdogSec="))
            .unwrap_or_else(|| panic!("{unit} has no WatchdogSec="));
        let seconds: u64 = value.trim_end_matches('s').parse().unwrap();
        // The daemon pings at half the period; a period much shorter than
        // the default check_interval would kill a healthy daemon.
        assert!(seconds >= 30, "{unit}: WatchdogSec={value}");
    }
}

/// The loops end on SIGTERM in any order; none of them may be taken for a
/// dead loop then (that would turn every clean stop into 70).
#[tokio::test]
async fn sigterm_is_a_clean_stop_whichever_loop_ends_first() {
    let (dir, out, spool, _staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    for round in 0..20 {
        let mut daemon = LoggedDaemon::start(&config, "");
        let log = &daemon.log;
        let started = wait_until(
            "the daemon to start",
            Duration::from_millis(10),
            Duration::from_secs(20),
            || Ok(log.lock().unwrap().contains("indexedcp daemon running")),
        );
        assert!(started.is_ok(), "round {round}: {}", daemon.log());
        let status = signal_and_wait(&mut daemon.child, libc::SIGTERM, Duration::from_secs(20));
        assert_eq!(status.code(), Some(0), "round {round}: {}", daemon.log());
    }
}
