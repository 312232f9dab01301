//! Logging: the level follows the config and changes on SIGHUP; the journald
//! output is chosen under systemd and falls back to stderr when the journal is
//! unreachable.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use crate::fixtures::*;
use crate::support::*;

fn start_logging_to(
    config: &std::path::Path,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> std::process::Child {
    indexedcp()
        .args(["daemon", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_changes_the_log_level() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("[daemon]\n", "[daemon]\nlog_level = \"warn\"\n"),
    )
    .unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = start_logging_to(&config, &log, &[]);
    let mut files = BTreeMap::from([("quiet.txt".to_string(), b"quiet".to_vec())]);
    drop_file(&staging, &spool, "quiet.txt", b"quiet");
    wait_for_files(&out, &files, Duration::from_secs(30)).await;
    let before = std::fs::read_to_string(&log).unwrap();
    assert!(
        !before.contains("file delivered"),
        "info lines at level warn:\n{before}"
    );

    std::fs::write(
        &config,
        text.replace("[daemon]\n", "[daemon]\nlog_level = \"info\"\n"),
    )
    .unwrap();
    unsafe_kill(child.id(), 1);
    eventually(
        Duration::from_secs(20),
        "the reload to be logged",
        async || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("configuration reloaded")
                .then_some(())
        },
    )
    .await;
    drop_file(&staging, &spool, "loud.txt", b"loud");
    files.insert("loud.txt".to_string(), b"loud".to_vec());
    wait_for_files(&out, &files, Duration::from_secs(30)).await;
    eventually(
        Duration::from_secs(10),
        "info lines after the reload",
        async || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("file delivered file=loud.txt")
                .then_some(())
        },
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn under_systemd_without_a_journal_logs_fall_back_to_stderr() {
    if std::path::Path::new("/run/systemd/journal/socket").exists() {
        eprintln!("skipped: a journal socket exists here, so journald would really be used");
        return;
    }
    let (dir, out, spool, _staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let log = dir.path().join("daemon.log");
    // JOURNAL_STREAM is what systemd sets for a service whose output is the journal.
    let mut child = start_logging_to(&config, &log, &[("JOURNAL_STREAM", "8:12345")]);
    eventually(
        Duration::from_secs(20),
        "the fallback message and text logs",
        async || {
            let text = std::fs::read_to_string(&log).ok()?;
            (text.contains("journald is not reachable")
                && text.contains("indexedcp daemon running"))
            .then_some(())
        },
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
}
