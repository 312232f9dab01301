//! What the agent does with a spool file it could not buffer at the first
//! try: a failure that passes (a file unreadable for a while) is retried on
//! the target's schedule, a file larger than the buffer waits until a reload
//! raises the limit, and a name every receiver refuses (a control character)
//! is never buffered, so its source is never deleted. Each runs the real
//! daemon against the real receiver and reads its log as an operator would.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::fixtures::*;
use crate::support::*;

/// An agent daemon whose log goes to a file the test reads.
struct LoggedAgent {
    child: Child,
    log: PathBuf,
}

impl LoggedAgent {
    /// Starts `indexedcp daemon --config CONFIG`, as the user `uid` when
    /// given, logging to `log`.
    fn start(config: &Path, log: &Path, uid: Option<u32>) -> LoggedAgent {
        let mut command = indexedcp();
        command
            .args(["daemon", "--config"])
            .arg(config)
            .env("INDEXEDCP_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap());
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(uid);
        }
        LoggedAgent {
            child: command.spawn().expect("start indexedcp daemon"),
            log: log.to_owned(),
        }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits until the log has a line containing every one of `parts`.
    async fn wait_for_line(&self, parts: &[&str], timeout: Duration) -> String {
        let found = poll_every(Duration::from_millis(50), timeout, async || {
            self.log()
                .lines()
                .find(|line| parts.iter().all(|p| line.contains(p)))
                .map(str::to_owned)
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "no log line with {parts:?} after {timeout:?}; log:\n{}",
                self.log()
            )
        })
    }
}

impl Drop for LoggedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

/// A file the agent cannot open at first (mode 000 for a daemon that is not
/// root) and can once its permissions are fixed: it is delivered, without a
/// restart and well before the safety scan. As root the daemon runs as
/// `nobody` (65534), since root reads a file of any mode.
#[tokio::test]
async fn an_ingest_that_failed_once_is_retried() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let uid = (euid() == 0).then_some(65534u32);
    std::fs::create_dir_all(&spool).unwrap();
    if let Some(uid) = uid {
        for entry in walk(dir.path()) {
            let _ = std::os::unix::fs::lchown(&entry.path, Some(uid), Some(uid));
        }
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid)).unwrap();
    }
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    if let Some(uid) = uid {
        std::os::unix::fs::chown(&config, Some(uid), Some(uid)).unwrap();
    }
    let agent = LoggedAgent::start(&config, &dir.path().join("agent.log"), uid);

    // Written elsewhere with no permissions at all, then moved in.
    let locked = b"unreadable at first".to_vec();
    let tmp = staging.join("locked.bin");
    std::fs::write(&tmp, &locked).unwrap();
    if let Some(uid) = uid {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(uid)).unwrap();
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::rename(&tmp, spool.join("locked.bin")).unwrap();
    drop_file(&staging, &spool, "plain.bin", b"readable");

    agent
        .wait_for_line(&["locked.bin", "denied"], Duration::from_secs(30))
        .await;
    let expected = BTreeMap::from([("plain.bin".to_owned(), b"readable".to_vec())]);
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;

    // Fixed: delivered on the retry schedule (at most 1 s apart here), not
    // at the next safety scan a minute later or never.
    std::fs::set_permissions(
        spool.join("locked.bin"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut expected = expected;
    expected.insert("locked.bin".to_owned(), locked);
    wait_for_files(&out, &expected, Duration::from_secs(20)).await;
    assert!(
        !spool.join("locked.bin").exists(),
        "the source is deleted once buffered"
    );
}

/// A file larger than `max_buffer_bytes` waits in the spool, untouched, with
/// a message saying which limit to raise; raising it and sending SIGHUP
/// delivers it.
#[tokio::test]
async fn a_file_too_large_for_the_buffer_goes_once_a_reload_raises_the_limit() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let text = std::fs::read_to_string(&config).unwrap();
    let small = text.replace("[daemon]\n", "[daemon]\nmax_buffer_bytes = \"64KiB\"\n");
    std::fs::write(&config, &small).unwrap();
    let agent = LoggedAgent::start(&config, &dir.path().join("agent.log"), None);

    let big = pseudo_random(200 << 10, 7);
    drop_file(&staging, &spool, "big.bin", &big);
    drop_file(&staging, &spool, "small.bin", b"fits");
    agent
        .wait_for_line(
            &["big.bin", "larger than daemon.max_buffer_bytes"],
            Duration::from_secs(30),
        )
        .await;
    let mut expected = BTreeMap::from([("small.bin".to_owned(), b"fits".to_vec())]);
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;
    assert_eq!(std::fs::read(spool.join("big.bin")).unwrap(), big);

    let large = text.replace("[daemon]\n", "[daemon]\nmax_buffer_bytes = \"16MiB\"\n");
    std::fs::write(&config, large).unwrap();
    unsafe_kill(agent.child.id(), libc::SIGHUP);
    expected.insert("big.bin".to_owned(), big);
    wait_for_files(&out, &expected, Duration::from_secs(20)).await;
}

/// Names with a newline and an ESC sequence are refused by every receiver:
/// the files stay in the spool byte for byte, one warning names each of them
/// escaped, no log line is forged from a name, and the files around them are
/// delivered.
#[tokio::test]
async fn names_with_control_characters_stay_in_the_spool() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let agent = LoggedAgent::start(&config, &dir.path().join("agent.log"), None);

    let refused = [
        ("two\nFORGED line.txt", b"newline".to_vec()),
        ("esc\u{1b}[31mred.txt", b"escape".to_vec()),
    ];
    let mut expected = BTreeMap::new();
    for i in 0..4 {
        let name = format!("ok-{i}.txt");
        let content = format!("file {i}").into_bytes();
        drop_file(&staging, &spool, &name, &content);
        expected.insert(name, content);
        if let Some((name, content)) = refused.get(i) {
            drop_file(&staging, &spool, name, content);
        }
    }
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;
    agent
        .wait_for_line(
            &["two\\nFORGED line.txt", "control character"],
            Duration::from_secs(30),
        )
        .await;
    agent
        .wait_for_line(
            &["esc\\u{1b}[31mred.txt", "control character"],
            Duration::from_secs(30),
        )
        .await;
    // Files dropped afterwards still go, and the refused ones stay.
    drop_file(&staging, &spool, "ok-after.txt", b"after");
    expected.insert("ok-after.txt".to_owned(), b"after".to_vec());
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;
    for (name, content) in &refused {
        assert_eq!(
            &std::fs::read(spool.join(name)).unwrap(),
            content,
            "{name:?}"
        );
    }
    let log = agent.log();
    assert!(!log.contains('\u{1b}'), "a raw ESC reached the log:\n{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("FORGED")),
        "a name forged a log line:\n{log}"
    );
    assert_eq!(
        log.matches("control character").count(),
        2,
        "one warning per name:\n{log}"
    );
    assert_eq!(visible_files(&out), expected, "nothing else arrived");
    assert!(
        status_json(&config).len() == expected.len(),
        "only the plain files were buffered"
    );
}

/// `indexedcp upload` of a file whose name has a control character stops
/// before buffering it (exit 65, the name escaped in the message) instead
/// of parking it in the buffer after the receiver's 400.
#[tokio::test]
async fn a_named_file_with_a_control_character_is_not_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let file = dir.path().join("two\nlines.txt");
    std::fs::write(&file, b"content").unwrap();
    let output = indexedcp()
        .args(["upload", "--server", &server.upload_url(), "--api-key", KEY])
        .arg("--storage")
        .arg(dir.path().join("client.db"))
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("two\\nlines.txt"), "{stderr}");
    assert!(stderr.contains("control character"), "{stderr}");
    assert!(visible_files(&out).is_empty());
    assert_eq!(std::fs::read(&file).unwrap(), b"content");
}
