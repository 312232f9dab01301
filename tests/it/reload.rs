//! SIGHUP reloads, SIGTERM during an upload, and the sd_notify protocol, with
//! the real binary and real signals.

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::fixtures::*;
use crate::support::*;

const SIGHUP: i32 = 1;
const SIGTERM: i32 = 15;

fn two_spool_config(dir: &std::path::Path, url: &str, spools: &[&std::path::Path]) -> String {
    let mut text = format!(
        "[daemon]\nstate_dir = {:?}\ncheck_interval = \"300ms\"\n\n[[target]]\nname = \"central\"\nurl = {url:?}\napi_key = \"{KEY}\"\ninitial_retry_delay = \"100ms\"\nmax_retry_delay = \"1s\"\n",
        dir.join("state").display().to_string()
    );
    for spool in spools {
        text.push_str(&format!(
            "\n[[spool]]\npath = {:?}\ntarget = \"central\"\nsettle = \"200ms\"\n",
            spool.display().to_string()
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_adds_and_removes_spools() {
    let dir = tempfile::tempdir().unwrap();
    let (out, a, b, staging) = (
        dir.path().join("out"),
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("staging"),
    );
    std::fs::create_dir_all(&staging).unwrap();
    let server = Server::start(&out, &[]).await;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        two_spool_config(dir.path(), &server.upload_url(), &[&a]),
    )
    .unwrap();
    let mut daemon = Daemon::start(&config);
    let mut expected = BTreeMap::new();
    drop_file(&staging, &a, "a1.txt", b"from a");
    expected.insert("a1.txt".to_string(), b"from a".to_vec());
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;

    std::fs::write(
        &config,
        two_spool_config(dir.path(), &server.upload_url(), &[&b]),
    )
    .unwrap();
    unsafe_kill(daemon.child.id(), SIGHUP);
    // b is watched once the reload is applied (and scanned when it starts).
    drop_file(&staging, &b, "b1.txt", b"from b");
    expected.insert("b1.txt".to_string(), b"from b".to_vec());
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;
    // a is no longer watched: a file dropped there stays, while b keeps working.
    drop_file(&staging, &a, "a2.txt", b"left alone");
    drop_file(&staging, &b, "b2.txt", b"marker");
    expected.insert("b2.txt".to_string(), b"marker".to_vec());
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;
    assert!(a.join("a2.txt").exists());
    assert_eq!(
        daemon
            .signal_and_wait(SIGTERM, Duration::from_secs(20))
            .code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_moves_delivery_to_a_new_receiver_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let (out1, out2, spool, staging) = (
        dir.path().join("out1"),
        dir.path().join("out2"),
        dir.path().join("spool"),
        dir.path().join("staging"),
    );
    std::fs::create_dir_all(&staging).unwrap();
    let first = Server::start(&out1, &[]).await;
    let second = Server::start(&out2, &[]).await;
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        two_spool_config(dir.path(), &first.upload_url(), &[&spool]),
    )
    .unwrap();
    let daemon = Daemon::start(&config);
    let mut sent = BTreeMap::new();
    for i in 0..5 {
        let name = format!("before-{i}.bin");
        sent.insert(name.clone(), pseudo_random(20_000 + i, i as u64));
        drop_file(&staging, &spool, &name, &sent[&name]);
    }
    wait_for_files(&out1, &sent, Duration::from_secs(30)).await;

    std::fs::write(
        &config,
        two_spool_config(dir.path(), &second.upload_url(), &[&spool]),
    )
    .unwrap();
    unsafe_kill(daemon.child.id(), SIGHUP);
    // Markers until one reaches the second receiver: from then on the reload is in force.
    let mut marker = 0;
    eventually(
        Duration::from_secs(30),
        "a marker on the second receiver",
        async || {
            let name = format!("marker-{marker}.txt");
            sent.insert(name.clone(), name.clone().into_bytes());
            drop_file(&staging, &spool, &name, name.as_bytes());
            marker += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            visible_files(&out2)
                .keys()
                .any(|k| k.starts_with("marker-"))
                .then_some(())
        },
    )
    .await;
    let mut after = BTreeMap::new();
    for i in 0..5 {
        let name = format!("after-{i}.bin");
        after.insert(name.clone(), pseudo_random(30_000 + i, 50 + i as u64));
        sent.insert(name.clone(), after[&name].clone());
        drop_file(&staging, &spool, &name, &after[&name]);
    }
    // Every file exactly once across both receivers; the later ones on the second.
    eventually(
        Duration::from_secs(30),
        "every file delivered once",
        async || {
            let mut union = visible_files(&out1);
            let two = visible_files(&out2);
            let total = union.len() + two.len();
            union.extend(two);
            (total == sent.len() && union == sent).then_some(())
        },
    )
    .await;
    let on_second = visible_files(&out2);
    assert!(
        after.keys().all(|k| on_second.contains_key(k)),
        "files after the reload went elsewhere"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_reload_keeps_the_running_config() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let good = std::fs::read_to_string(&config).unwrap();
    let mut daemon = Daemon::start(&config);
    // Up and delivering before the reload (a SIGHUP before the handlers are
    // installed would end the process, as for any program).
    drop_file(&staging, &spool, "first.txt", b"first");
    let mut expected = BTreeMap::from([("first.txt".to_string(), b"first".to_vec())]);
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;
    std::fs::write(&config, format!("{good}\nnot_a_key = 1\n[[[broken")).unwrap();
    unsafe_kill(daemon.child.id(), SIGHUP);
    drop_file(
        &staging,
        &spool,
        "still-served.txt",
        b"old config still serving",
    );
    expected.insert(
        "still-served.txt".to_string(),
        b"old config still serving".to_vec(),
    );
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited on a bad reload"
    );
    assert_eq!(
        daemon
            .signal_and_wait(SIGTERM, Duration::from_secs(20))
            .code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_large_upload_then_restart_resumes_it() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(
        dir.path(),
        &server.upload_url(),
        &spool,
        "",
        "chunk_size = \"64KiB\"",
    );
    let mut daemon = Daemon::start(&config);
    let big = pseudo_random(24 << 20, 99);
    drop_file(&staging, &spool, "big.bin", &big);
    // Stop it once part of the file is on the receiver (in staging, not visible).
    let receiver_staging = out.join(".indexedcp/staging");
    eventually(Duration::from_secs(60), "a partial upload", async || {
        let entries = std::fs::read_dir(&receiver_staging).ok()?;
        entries
            .filter_map(Result::ok)
            .any(|e| e.metadata().is_ok_and(|m| m.len() > 0))
            .then_some(())
    })
    .await;
    let started = Instant::now();
    assert_eq!(
        daemon
            .signal_and_wait(SIGTERM, Duration::from_secs(20))
            .code(),
        Some(0)
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(!out.join("big.bin").exists() || std::fs::read(out.join("big.bin")).unwrap() == big);
    daemon.restart();
    wait_for_files(
        &out,
        &[("big.bin".to_string(), big)].into(),
        Duration::from_secs(120),
    )
    .await;
}

fn notifications(socket: &UnixDatagram, until: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = message.lines().any(|l| l == until);
            got.push(message);
            if done {
                return got;
            }
        }
    }
    panic!("no {until} within {timeout:?}; got {got:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sd_notify_ready_reloading_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let (spool, out) = (dir.path().join("spool"), dir.path().join("out"));
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let mut child = indexedcp()
        .args(["daemon", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("INDEXEDCP_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let ready = notifications(&socket, "READY=1", Duration::from_secs(20));
    assert!(!ready.iter().any(|m| m.contains("RELOADING")), "{ready:?}");
    unsafe_kill(child.id(), SIGHUP);
    let reload = notifications(&socket, "READY=1", Duration::from_secs(20));
    let reloading = reload
        .iter()
        .position(|m| m.contains("RELOADING=1"))
        .expect("RELOADING=1 sent");
    assert!(
        reload[reloading].contains("MONOTONIC_USEC=")
            || reload
                .get(reloading + 1)
                .is_some_and(|m| m.contains("MONOTONIC_USEC=")),
        "{reload:?}"
    );
    unsafe_kill(child.id(), SIGTERM);
    notifications(&socket, "STOPPING=1", Duration::from_secs(20));
    let exited = wait_until(
        "the daemon to exit after SIGTERM",
        Duration::from_millis(20),
        Duration::from_secs(20),
        || Ok(child.try_wait()?.is_some()),
    );
    assert!(exited.is_ok(), "no exit after SIGTERM");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sd_notify_watchdog_pings_and_status_lines() {
    let (dir, _, spool, staging) = agent_dirs();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    // Nothing listens here, so the file stays queued with an error.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/upload");
    let config = agent_config(dir.path(), &url, &spool, "", "");
    // systemd sets WATCHDOG_PID to the service's main pid; `exec` keeps the
    // shell's pid, so the daemon sees its own.
    let child = clear_inherited_env(&mut Command::new("sh"))
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" daemon --config \"$1\"")
        .arg(BIN)
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env("INDEXEDCP_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon { child, config };
    notifications(&socket, "READY=1", Duration::from_secs(20));
    let pings = notifications(&socket, "WATCHDOG=1", Duration::from_secs(10));
    let status = pings
        .iter()
        .find(|m| m.starts_with("STATUS="))
        .expect("a STATUS= line before the first ping");
    assert_eq!(status.trim_end(), "STATUS=0 queued (0 bytes), 0 failed");

    drop_file(&staging, &spool, "late.txt", b"waiting");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = notifications(&socket, "WATCHDOG=1", Duration::from_secs(5));
        let status = got.iter().find(|m| m.starts_with("STATUS="));
        if let Some(status) = status.filter(|s| s.contains("last error")) {
            assert!(
                status.starts_with("STATUS=1 queued (7 bytes), 0 failed; last error: "),
                "{status}"
            );
            assert!(status.contains(&port.to_string()), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no STATUS= with the last error: {got:?}"
        );
    }
    let status = daemon.signal_and_wait(SIGTERM, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
}
