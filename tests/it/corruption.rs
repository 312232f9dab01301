//! A damaged buffer (`buffer.db` and `buffer-bulk.db`): the daemon refuses
//! it with exit code 65 and leaves new files in the spool, `status` says
//! "buffer corrupt", `indexedcp doctor` refuses while a daemon holds the
//! buffer, then saves every intact file, and a restarted daemon delivers
//! them byte-identical to a real receiver. Either file cut to half its size
//! is reported as corrupt too, and so is a bulk file that is missing or not
//! a database (then doctor saves the small files, whose bytes are in
//! `buffer.db`).
//!
//! The damage is placed, not left to chance: the test finds, with SQLite's
//! `dbstat` table, a leaf page of the bulk file's `chunk_data` that holds
//! only chunks of the middle file and overwrites 4 KiB at its start (header
//! and cell pointers) with seeded noise, so exactly that file is lost and the
//! others survive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use crate::fixtures::*;
use crate::support::*;

const CHUNK: usize = 64 * 1024;

/// A config for an agent whose receiver is down (nothing listens on its
/// port), with 64 KiB chunks and `daemon_extra` added to `[daemon]`.
fn config(dir: &Path, url: &str, spool: &Path, daemon_extra: &str) -> PathBuf {
    let path = agent_config(dir, url, spool, "", "chunk_size = \"64KiB\"");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen("[daemon]\n", &format!("[daemon]\n{daemon_extra}"), 1),
    )
    .unwrap();
    path
}

fn buffer(dir: &Path) -> PathBuf {
    dir.join("state/buffer.db")
}

/// Runs `indexedcp ARGS --config CONFIG` to its end (with a deadline).
fn run(args: &[&str], config: &Path) -> Output {
    let child = indexedcp()
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish(child, Duration::from_secs(60))
}

/// Waits for `child` to exit by itself (it is killed at the deadline, and
/// the test fails) and returns its output.
fn finish(mut child: Child, timeout: Duration) -> Output {
    let exited = wait_until(
        "the process to exit",
        Duration::from_millis(20),
        timeout,
        || Ok(child.try_wait()?.is_some()),
    );
    if exited.is_err() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        exited.is_ok(),
        "did not exit within {timeout:?}: {}",
        text(&output)
    );
    output
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Buffers `files` one after the other through a daemon whose receiver is
/// down (so they stay queued, in this order), then stops it.
async fn buffer_files(config: &Path, spool: &Path, staging: &Path, files: &[(&str, Vec<u8>)]) {
    let mut daemon = Daemon::start(config);
    for (n, (name, bytes)) in files.iter().enumerate() {
        drop_file(staging, spool, name, bytes);
        eventually(
            Duration::from_secs(30),
            "the file to be buffered",
            async || {
                (status_json(config).len() == n + 1 && !spool.join(name).exists()).then_some(())
            },
        )
        .await;
    }
    let status = daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
}

/// Copies the WAL into the database file, so that the file on disk holds
/// every page the test is about to look at and damage.
fn checkpoint(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
}

/// The number of a `chunk_data` leaf page that holds chunks of `file_id`
/// only. Rows of a rowid table are stored in rowid order across its leaves,
/// which `dbstat` lists in tree order; rowids are dense here (nothing was
/// deleted), which the test checks.
fn leaf_of_file_only(path: &Path, file_id: i64) -> (u64, u64) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let page_size: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    let (rows, max_rowid): (i64, i64) = conn
        .query_row("SELECT count(*), max(rowid) FROM chunk_data", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(rows, max_rowid, "chunk_data rowids are not dense");
    let (first, last): (i64, i64) = conn
        .query_row(
            "SELECT min(rowid), max(rowid) FROM chunk_data WHERE file_id = ?1",
            [file_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT pageno, ncell FROM dbstat WHERE name = 'chunk_data' AND pagetype = 'leaf' ORDER BY path",
        )
        .unwrap();
    let leaves: Vec<(i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(leaves.iter().map(|l| l.1).sum::<i64>(), rows);
    let mut next_rowid = 1;
    for (page, cells) in leaves {
        let range = next_rowid..next_rowid + cells;
        next_rowid += cells;
        if cells > 0 && range.start >= first && range.end - 1 <= last {
            return (page as u64, page_size as u64);
        }
    }
    panic!("no chunk_data leaf holds chunks of file {file_id} alone");
}

/// Overwrites 4 KiB at the start of page `page` with seeded noise; the first
/// byte (the page type) is made invalid so that the damage is always seen.
fn damage_page(path: &Path, page: u64, page_size: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut noise = pseudo_random(4096, 0xC0FFEE);
    noise[0] = 0;
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start((page - 1) * page_size)).unwrap();
    file.write_all(&noise).unwrap();
    file.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_buffer_stops_the_daemon_and_doctor_saves_the_intact_files() {
    let (dir, out, spool, staging) = agent_dirs();
    let down = format!("http://127.0.0.1:{}/upload", free_port());
    let config = config(dir.path(), &down, &spool, "");
    let files = [
        ("first.bin", pseudo_random(5 * CHUNK + 123, 1)),
        ("middle.bin", pseudo_random(40 * CHUNK, 2)),
        ("last.bin", pseudo_random(3 * CHUNK + 7, 3)),
    ];
    buffer_files(&config, &spool, &staging, &files).await;
    let buffer = buffer(dir.path());
    // Files of several chunks are streamed in: their bytes are in the
    // buffer's bulk file.
    let bulk = dir.path().join("state/buffer-bulk.db");
    checkpoint(&buffer);
    checkpoint(&bulk);
    let ids: BTreeMap<String, i64> = status_json(&config)
        .iter()
        .map(|f| {
            (
                f["remote_name"].as_str().unwrap().to_owned(),
                f["id"].as_i64().unwrap(),
            )
        })
        .collect();
    let (page, page_size) = leaf_of_file_only(&bulk, ids["middle.bin"]);
    damage_page(&bulk, page, page_size);

    // A file arriving now must stay in the spool, untouched.
    let newcomer = pseudo_random(2 * CHUNK + 5, 4);
    drop_file(&staging, &spool, "newcomer.bin", &newcomer);

    let child = indexedcp()
        .args(["daemon", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let refused = finish(child, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(65), "{}", text(&refused));
    assert!(stderr.contains("buffer corrupt"), "{stderr}");
    assert!(stderr.contains(&buffer.display().to_string()), "{stderr}");
    assert!(stderr.contains("indexedcp doctor"), "{stderr}");
    assert_eq!(std::fs::read(spool.join("newcomer.bin")).unwrap(), newcomer);

    let status = run(&["status"], &config);
    assert_eq!(status.status.code(), Some(65), "{}", text(&status));
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("buffer corrupt"),
        "{}",
        text(&status)
    );

    // With "stop-ingest" the daemon runs on without ingesting, says so in
    // its metrics, and doctor refuses to touch the buffer meanwhile.
    let metrics_port = free_port();
    let tolerant = config_with(
        &config,
        &format!(
            "on_buffer_corrupt = \"stop-ingest\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n"
        ),
    );
    let mut daemon = Daemon::start(&tolerant);
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    eventually(
        Duration::from_secs(30),
        "indexedcp_buffer_corrupt 1",
        async || {
            let body = reqwest::get(&metrics_url).await.ok()?.text().await.ok()?;
            body.contains("\nindexedcp_buffer_corrupt 1\n")
                .then_some(())
        },
    )
    .await;
    let busy = run(&["doctor"], &config);
    assert_eq!(busy.status.code(), Some(75), "{}", text(&busy));
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use"),
        "{}",
        text(&busy)
    );
    assert_eq!(
        daemon
            .signal_and_wait(libc::SIGTERM, Duration::from_secs(30))
            .code(),
        Some(0)
    );
    assert_eq!(std::fs::read(spool.join("newcomer.bin")).unwrap(), newcomer);

    let doctor = run(&["doctor"], &config);
    let report = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert_eq!(doctor.status.code(), Some(65), "{}", text(&doctor));
    assert!(report.contains("damaged; integrity_check says"), "{report}");
    assert_saved_and_lost(&report, &["first.bin", "last.bin"], &["middle.bin"]);
    let aside: Vec<String> = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| {
            name.starts_with("buffer.db.damaged-") || name.starts_with("buffer-bulk.db.damaged-")
        })
        .collect();
    assert_eq!(aside.len(), 2, "{aside:?}");
    assert!(
        report.contains("its bulk file was set aside as")
            && report.contains("buffer-bulk.db.damaged-"),
        "{report}"
    );

    let status = run(&["status"], &config);
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    let mut left: Vec<String> = status_json(&config)
        .iter()
        .map(|f| f["remote_name"].as_str().unwrap().to_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["first.bin", "last.bin"]);

    // A restarted daemon delivers the saved files and the newcomer.
    let expected: BTreeMap<String, Vec<u8>> = [
        ("first.bin".to_owned(), files[0].1.clone()),
        ("last.bin".to_owned(), files[2].1.clone()),
        ("newcomer.bin".to_owned(), newcomer),
    ]
    .into_iter()
    .collect();
    delivered_after_doctor(dir.path(), &out, &spool, &expected).await;
}

/// Checks doctor's report: each of `saved` on a "saved" line, each of
/// `lost` on a "lost" line.
fn assert_saved_and_lost(report: &str, saved: &[&str], lost: &[&str]) {
    for name in saved {
        assert!(
            report
                .lines()
                .any(|l| l.trim_start().starts_with("saved") && l.ends_with(name)),
            "{name} not saved:\n{report}"
        );
    }
    for name in lost {
        assert!(
            report
                .lines()
                .any(|l| l.trim_start().starts_with("lost") && l.contains(name)),
            "{name} not reported lost:\n{report}"
        );
    }
}

/// Starts a real receiver and a daemon on the repaired buffer in `dir`, and
/// waits for `expected` to arrive byte-identical.
async fn delivered_after_doctor(
    dir: &Path,
    out: &Path,
    spool: &Path,
    expected: &BTreeMap<String, Vec<u8>>,
) {
    let receiver = Server::start(out, &[]).await;
    let working = crate::fixtures::agent_config(
        dir,
        &receiver.upload_url(),
        spool,
        "",
        "chunk_size = \"64KiB\"",
    );
    let _daemon = Daemon::start(&working);
    wait_for_files(out, expected, Duration::from_secs(60)).await;
}

/// `config` with `daemon_extra` added to its `[daemon]` section, written
/// next to it.
fn config_with(config: &Path, daemon_extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    let path = config.with_file_name("tolerant.toml");
    std::fs::write(
        &path,
        text.replacen("[daemon]\n", &format!("[daemon]\n{daemon_extra}"), 1),
    )
    .unwrap();
    path
}

/// Buffers two streamed files, cuts the buffer's file `file_of(state dir)`
/// to half its size, and checks that each of `commands` refuses the buffer
/// as corrupt (exit 65, pointing to doctor).
async fn a_cut_file_is_refused(file_of: fn(&Path) -> PathBuf, commands: &[&[&str]]) {
    let (dir, _out, spool, staging) = agent_dirs();
    let down = format!("http://127.0.0.1:{}/upload", free_port());
    let config = config(dir.path(), &down, &spool, "");
    let files = [
        ("one.bin", pseudo_random(8 * CHUNK, 5)),
        ("two.bin", pseudo_random(8 * CHUNK, 6)),
    ];
    buffer_files(&config, &spool, &staging, &files).await;
    let file = file_of(dir.path());
    checkpoint(&file);
    let size = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(size / 2)
        .unwrap();

    for args in commands {
        let output = run(args, &config);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(65),
            "{args:?}: {}",
            text(&output)
        );
        assert!(stderr.contains("buffer corrupt"), "{args:?}: {stderr}");
        assert!(stderr.contains("indexedcp doctor"), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("state directory exists"),
            "{args:?}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_buffer_cut_to_half_its_size_is_reported_as_corrupt() {
    a_cut_file_is_refused(buffer, &[&["status"], &["daemon"]]).await;
}

/// The files of several chunks are streamed in: their bytes are in the bulk
/// file, which `status` does not read; the daemon's start-up check does.
#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_file_cut_to_half_its_size_stops_the_daemon() {
    a_cut_file_is_refused(bulk, &[&["daemon"]]).await;
}

/// The bulk file of `dir`'s buffer.
fn bulk(dir: &Path) -> PathBuf {
    dir.join("state/buffer-bulk.db")
}

/// Runs doctor on a buffer whose bulk file is gone or not a database: the
/// small file (its bytes are in `buffer.db`) is saved, the streamed one is
/// listed as lost, and a daemon then delivers the small file.
async fn doctor_without_a_readable_bulk_file(damage: impl FnOnce(&Path)) {
    let (dir, out, spool, staging) = agent_dirs();
    let down = format!("http://127.0.0.1:{}/upload", free_port());
    let config = config(dir.path(), &down, &spool, "");
    let files = [
        ("small.bin", pseudo_random(CHUNK / 2, 9)),
        ("streamed.bin", pseudo_random(6 * CHUNK, 10)),
    ];
    buffer_files(&config, &spool, &staging, &files).await;
    damage(&bulk(dir.path()));

    for args in [&["status"][..], &["daemon"][..]] {
        let output = run(args, &config);
        let all = text(&output);
        assert_eq!(output.status.code(), Some(65), "{args:?}: {all}");
        assert!(all.contains("buffer corrupt"), "{args:?}: {all}");
        assert!(all.contains("indexedcp doctor"), "{args:?}: {all}");
    }

    let doctor = run(&["doctor"], &config);
    let report = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert_eq!(doctor.status.code(), Some(65), "{}", text(&doctor));
    assert_saved_and_lost(&report, &["small.bin"], &["streamed.bin"]);
    let expected: BTreeMap<String, Vec<u8>> = [("small.bin".to_owned(), files[0].1.clone())]
        .into_iter()
        .collect();
    delivered_after_doctor(dir.path(), &out, &spool, &expected).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_bulk_file_is_reported_and_doctor_saves_the_small_files() {
    doctor_without_a_readable_bulk_file(|bulk| {
        for suffix in ["", "-wal", "-shm"] {
            let mut name = bulk.as_os_str().to_owned();
            name.push(suffix);
            let _ = std::fs::remove_file(name);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_file_that_is_not_a_database_is_reported_and_doctor_saves_the_small_files() {
    doctor_without_a_readable_bulk_file(|bulk| {
        checkpoint(bulk);
        std::fs::write(bulk, pseudo_random(256 * 1024, 11)).unwrap();
        for suffix in ["-wal", "-shm"] {
            let mut name = bulk.as_os_str().to_owned();
            name.push(suffix);
            let _ = std::fs::remove_file(name);
        }
    })
    .await;
}
