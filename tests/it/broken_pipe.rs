//! A reader that goes away early (`indexedcp status | head -1`): every
//! command that prints ends quietly, with 0 or killed by SIGPIPE as `cat`
//! would be (the shell shows 141), never with a panic; the receiver keeps
//! serving when its stdout is such a pipe. The pipe's read end is closed
//! before the command starts, so its first write meets a broken pipe every
//! time, whatever the timing.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::fixtures::*;
use crate::support::*;

/// Runs `command` with stdout a pipe nobody reads any more.
fn run_into_closed_pipe(command: &mut Command) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    command
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn assert_quiet_end(what: &str, output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    assert!(
        output.status.code() == Some(0) || output.status.signal() == Some(libc::SIGPIPE),
        "{what}: {:?}, stderr: {stderr}",
        output.status
    );
}

#[test]
fn status_and_other_printing_commands_end_quietly_on_a_closed_pipe() {
    let (dir, _out, spool, staging) = agent_dirs();
    let config = agent_config(dir.path(), "http://127.0.0.1:9/upload", &spool, "", "");
    // A buffer with files in it, so that status prints a table of rows.
    for n in 0..20 {
        drop_file(&staging, &spool, &format!("f{n}.txt"), b"x");
    }
    let mut daemon = Daemon::start(&config);
    let buffered = wait_until(
        "the daemon to buffer the files",
        Duration::from_millis(50),
        Duration::from_secs(30),
        || Ok(status_json(&config).len() == 20),
    );
    assert!(buffered.is_ok(), "{:?}", status_json(&config));
    let stopped = daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert_eq!(stopped.code(), Some(0));

    let config = config.display().to_string();
    for args in [
        vec!["status", "--config", &config],
        vec!["status", "--json", "--config", &config],
        vec!["check-config", "--config", &config],
        vec!["completions", "bash"],
    ] {
        let output = run_into_closed_pipe(indexedcp().args(&args));
        assert_quiet_end(&args.join(" "), &output);
    }
}

#[tokio::test]
async fn the_receiver_keeps_serving_when_its_stdout_is_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = indexedcp()
        .args([
            "server",
            "--port",
            &port.to_string(),
            "-k",
            KEY,
            "--output-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let health = format!("http://127.0.0.1:{port}/health");
    let up = poll_every(
        Duration::from_millis(50),
        Duration::from_secs(20),
        async || {
            let r = reqwest::get(&health).await.ok()?;
            r.status().is_success().then_some(())
        },
    )
    .await;
    let running = child.try_wait().unwrap();
    assert!(running.is_none(), "the receiver exited: {running:?}");
    assert!(up.is_some(), "/health never answered");
    let status = signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
}
