//! Scenario 3 of the fault-injection suite: a crash (abort, as abrupt as SIGKILL) at every step
//! boundary of ingest, upload and the receiver's finalize, then a restart:
//! every file arrives exactly once, byte-identical, and both databases pass
//! `PRAGMA integrity_check`.

use std::collections::BTreeMap;
use std::time::Duration;

use indexedcp::failpoint;

use crate::fixtures::*;
use crate::support::*;

fn integrity(path: &std::path::Path) -> String {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

fn wait_for_crash(child: &mut std::process::Child, what: &str) {
    let exited = wait_until(
        &format!("{what} to crash"),
        Duration::from_millis(20),
        Duration::from_secs(60),
        || Ok(child.try_wait()?.is_some()),
    );
    assert!(exited.is_ok(), "{what} never reached its failpoint");
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "{what} exited normally instead of crashing"
    );
}

async fn crash_at(point: &str) -> (usize, usize, usize) {
    let (dir, out, spool, staging) = agent_dirs();
    let port = free_port().to_string();
    let server_args = vec![
        "server".to_string(),
        "--port".into(),
        port.clone(),
        "--output-dir".into(),
        out.display().to_string(),
        "-k".into(),
        KEY.into(),
        "--path-mode".into(),
        "allow-paths".into(),
    ];
    let on_server = point.starts_with("server-");
    let armed = [(failpoint::ENV, point)];
    let mut server = Server::spawn_with_env(
        server_args.clone(),
        &out,
        if on_server { &armed } else { &[] },
    )
    .await;
    let config = agent_config(
        dir.path(),
        &server.upload_url(),
        &spool,
        "",
        "chunk_size = \"64KiB\"",
    );
    let mut daemon = Daemon::start_with_env(&config, if on_server { &[] } else { &armed });

    let mut files = BTreeMap::new();
    for (i, size) in [0usize, 10, 200_000, 70_000].into_iter().enumerate() {
        let rel = format!("d{i}/f{i}.bin");
        files.insert(rel.clone(), pseudo_random(size, i as u64 + 7));
        drop_file(&staging, &spool, &rel, &files[&rel]);
    }
    if on_server {
        wait_for_crash(&mut server.child, point);
        server = Server::spawn(server_args, &out).await;
    } else {
        wait_for_crash(&mut daemon.child, point);
        daemon = Daemon::start(&config);
    }
    wait_for_files(&out, &files, Duration::from_secs(60)).await;
    eventually(Duration::from_secs(30), "an empty spool", async || {
        tree(&spool).values().all(Option::is_none).then_some(())
    })
    .await;
    drop(daemon);
    drop(server);
    assert_eq!(integrity(&dir.path().join("state/buffer.db")), "ok");
    assert_eq!(integrity(&out.join(".indexedcp/uploads.db")), "ok");
    // Exactly the expected files: none lost, none twice, none different.
    let got = visible_files(&out);
    let lost = files.keys().filter(|k| !got.contains_key(*k)).count();
    let duplicated = got.keys().filter(|k| !files.contains_key(*k)).count();
    let corrupted = files
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .count();
    (lost, duplicated, corrupted)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_every_failpoint_loses_and_duplicates_nothing() {
    for point in failpoint::ALL {
        let (lost, duplicated, corrupted) = crash_at(point).await;
        println!(
            "scenario 3: crash at {point}: lost {lost}, duplicated {duplicated}, corrupted {corrupted}"
        );
        assert_eq!((lost, duplicated, corrupted), (0, 0, 0), "{point}");
    }
}
