//! The command line's object storage parts as a person runs them: the
//! one-shot `indexedcp FILE... s3://BUCKET/prefix/ --endpoint URL` into a
//! real S3 server on 127.0.0.1 (bytes compared in the bucket, output lines,
//! exit codes), and `status` showing each target's kind and the parts of a
//! large file a daemon has in flight. `s3s-fs` keeps objects as plain files;
//! moto is used where a missing bucket must be refused (`s3s-fs` creates a
//! bucket on the first write into it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::fixtures::Daemon;
use crate::s3::{ACCESS_KEY, BUCKET, Kind, Peer, SECRET_KEY};
use crate::support::*;

const MIB: usize = 1 << 20;

/// Runs the binary with a home of its own (so the one-shot buffer is inside
/// the test) and the credentials in the environment, as a user would.
fn run(home: &Path, cwd: &Path, secret: &str, args: &[&str]) -> Output {
    indexedcp()
        .args(args)
        .current_dir(cwd)
        .env("HOME", home)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Starts `kind`, or says why not: a missing server skips the test, except
/// under `CI=true`, where it fails.
async fn peer(kind: Kind) -> Option<Peer> {
    let program = match kind {
        Kind::S3sFs => "s3s-fs",
        Kind::Moto => "moto_server",
    };
    if !crate::support::require_tool(program, "an S3 server for the tests") {
        return None;
    }
    Some(Peer::start(kind).await)
}

fn status_json(home: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    status_json_once_buffered(home, extra).expect("a buffer to list")
}

/// `status --json`, or `None` while there is no buffer yet (a daemon that
/// has just been started may not have created it). Any other failure fails
/// the test.
fn status_json_once_buffered(home: &Path, extra: &[&str]) -> Option<Vec<serde_json::Value>> {
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(extra);
    let out = run(home, home, SECRET_KEY, &args);
    let stderr = text(&out.stderr);
    if out.status.code() == Some(65) && stderr.contains("no buffer at") {
        return None;
    }
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    Some(serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_copies_files_into_the_bucket_byte_for_byte() {
    let Some(peer) = peer(Kind::S3sFs).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (home, files) = (dir.path().join("home"), dir.path().join("files"));
    std::fs::create_dir_all(&files).unwrap();
    // Larger than the default part size of 8 MiB, so a multipart upload of
    // three parts; a small file goes as one PUT, an empty one too.
    let large = pseudo_random(2 * 8 * MIB + 1, 7);
    std::fs::write(files.join("large.bin"), &large).unwrap();
    std::fs::write(files.join("notes.txt"), b"hello\n").unwrap();
    std::fs::write(files.join("empty"), b"").unwrap();

    let endpoint = peer.endpoint.clone();
    let (h, f) = (home.clone(), files.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(
            &h,
            &f,
            SECRET_KEY,
            &[
                "large.bin",
                "notes.txt",
                "empty",
                &format!("s3://{BUCKET}/in/"),
                "--endpoint",
                &endpoint,
            ],
        )
    })
    .await
    .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let mut lines: Vec<&str> = stdout.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "empty -> in/empty",
            "large.bin -> in/large.bin",
            "notes.txt -> in/notes.txt"
        ]
    );
    let root = peer.root.as_ref().unwrap().join(BUCKET).join("in");
    assert_eq!(std::fs::read(root.join("large.bin")).unwrap(), large);
    assert_eq!(std::fs::read(root.join("notes.txt")).unwrap(), b"hello\n");
    assert_eq!(std::fs::read(root.join("empty")).unwrap(), b"");
    assert_eq!(
        peer.sha256_metadata("in/large.bin").await.as_deref(),
        Some(crate::fixtures::sha256_hex(&large).as_str())
    );

    let h = home.clone();
    let files = tokio::task::spawn_blocking(move || status_json(&h, &[]))
        .await
        .unwrap();
    assert_eq!(files.len(), 3);
    assert!(
        files.iter().all(|f| f["state"] == "confirmed"),
        "{files:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_or_a_wrong_key_exits_78_and_keeps_the_file_buffered() {
    let Some(moto) = peer(Kind::Moto).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let report = dir.path().join("report.csv");
    std::fs::write(&report, b"a,b\n1,2\n").unwrap();
    let (h, r, endpoint) = (home.clone(), report.clone(), moto.endpoint.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(
            &h,
            h.parent().unwrap(),
            SECRET_KEY,
            &[
                r.to_str().unwrap(),
                "s3://no-such-bucket/in/",
                "--endpoint",
                &endpoint,
            ],
        )
    })
    .await
    .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("NoSuchBucket"), "{stderr}");
    assert!(stderr.contains("check that the bucket exists"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "`indexedcp upload --server s3://no-such-bucket/in/ --endpoint {}` sends them",
            moto.endpoint
        )),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));

    // s3s-fs checks signatures: a wrong secret is refused the same way, and
    // the file, still buffered, goes once the right one is given.
    let Some(fs) = peer(Kind::S3sFs).await else {
        return;
    };
    let (h, endpoint) = (home.clone(), fs.endpoint.clone());
    let (wrong, right) = tokio::task::spawn_blocking(move || {
        let args = [
            "upload",
            "--server",
            "s3://archive/",
            "--endpoint",
            &endpoint,
        ];
        let wrong = run(&h, &h, "not-the-secret", &args);
        let right = run(&h, &h, SECRET_KEY, &args);
        (wrong, right)
    })
    .await
    .unwrap();
    let stderr = text(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("the store refused the request"), "{stderr}");
    assert_eq!(right.status.code(), Some(0), "{}", text(&right.stderr));
    assert_eq!(
        text(&right.stdout).trim(),
        format!("{} -> report.csv", report.display())
    );
    let object = fs.root.as_ref().unwrap().join("archive/report.csv");
    assert_eq!(std::fs::read(object).unwrap(), b"a,b\n1,2\n");
}

#[tokio::test]
async fn endpoint_and_region_are_refused_for_a_receiver_and_a_bad_bucket_url_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.txt");
    std::fs::write(&file, b"a").unwrap();
    let file = file.to_str().unwrap();
    let out = run(
        dir.path(),
        dir.path(),
        SECRET_KEY,
        &[file, "http://127.0.0.1:9/upload", "--region", "eu-west-1"],
    );
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("--region is for s3:// URLs"),
        "{}",
        text(&out.stderr)
    );
    let out = run(dir.path(), dir.path(), SECRET_KEY, &[file, "s3://No_Such/"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("is not a valid bucket name"),
        "{}",
        text(&out.stderr)
    );
    // Nothing was buffered by a refused command.
    assert!(!dir.path().join(".indexcp/db/client.db").exists());
}

/// A proxy that passes the first `budget` bytes the agent sends, then holds
/// every connection without passing anything more: with one part in flight
/// at a time, exactly the parts that fit in the budget arrive.
async fn gate(upstream: SocketAddr, budget: i64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let left = Arc::new(AtomicI64::new(budget));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let left = left.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match from_client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let allowed = left
                        .fetch_sub(n as i64, Ordering::SeqCst)
                        .clamp(0, n as i64);
                    let allowed = allowed as usize;
                    if allowed > 0 && to_server.write_all(&buf[..allowed]).await.is_err() {
                        return;
                    }
                    if allowed < n {
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_kind_of_each_target_and_the_parts_of_a_large_file_in_flight() {
    let Some(peer) = peer(Kind::S3sFs).await else {
        return;
    };
    let upstream: SocketAddr = peer.endpoint.trim_start_matches("http://").parse().unwrap();
    // Two parts of 5 MiB and their requests' heads pass; the third part stalls.
    let proxy = gate(upstream, (2 * 5 * MIB + 64 * 1024) as i64).await;
    let dir = tempfile::tempdir().unwrap();
    let (spool, other_spool) = (dir.path().join("spool"), dir.path().join("other"));
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::create_dir_all(&other_spool).unwrap();
    let secret = dir.path().join("s3.secret");
    std::fs::write(&secret, SECRET_KEY).unwrap();
    let state: PathBuf = dir.path().join("state");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = {state:?}\ncheck_interval = \"300ms\"\n\n\
             [[target]]\nname = \"archive\"\nkind = \"s3\"\nurl = \"s3://{BUCKET}/in/\"\n\
             endpoint = \"http://{proxy}\"\naccess_key_id = \"{ACCESS_KEY}\"\n\
             secret_access_key_file = {secret:?}\npart_size = \"5MiB\"\nconcurrency = 1\n\
             timeout = \"120s\"\n\n\
             [[target]]\nname = \"central\"\nurl = \"http://127.0.0.1:{dead}/upload\"\n\
             api_key = \"k\"\n\n\
             [[spool]]\npath = {spool:?}\ntarget = \"archive\"\nsettle = \"200ms\"\n\n\
             [[spool]]\npath = {other_spool:?}\ntarget = \"central\"\nsettle = \"200ms\"\n",
            state = state.display().to_string(),
            secret = secret.display().to_string(),
            spool = spool.display().to_string(),
            other_spool = other_spool.display().to_string(),
            dead = free_port(),
        ),
    )
    .unwrap();
    let _daemon = Daemon::start(&config);
    // Four parts of 5 MiB: the byte budget of one file in flight at a time
    // (one part plus one chunk) lets only one of them travel at once.
    std::fs::write(spool.join("big.bin"), pseudo_random(4 * 5 * MIB, 3)).unwrap();
    std::fs::write(other_spool.join("note.txt"), b"for the receiver").unwrap();

    let config_arg = config.display().to_string();
    let files = eventually(Duration::from_secs(60), "two parts sent", async || {
        let c = config_arg.clone();
        let home = dir.path().to_owned();
        let files = tokio::task::spawn_blocking(move || {
            status_json_once_buffered(&home, &["--config", &c])
        })
        .await
        .unwrap()?;
        let big = files.iter().find(|f| f["remote_name"] == "big.bin")?;
        // A part's record and its chunks' acknowledgements are two commits:
        // status may show the part before its chunks.
        (big["parts_sent"] == 2 && big["chunks_uploaded"] == 10 && files.len() == 2)
            .then_some(files)
    })
    .await;
    let big = files
        .iter()
        .find(|f| f["remote_name"] == "big.bin")
        .unwrap();
    assert_eq!(big["target_kind"], "s3");
    assert_eq!(big["part_count"], 4);
    assert_eq!(big["state"], "queued");
    let note = files
        .iter()
        .find(|f| f["remote_name"] == "note.txt")
        .unwrap();
    assert_eq!(note["target_kind"], "indexedcp");
    assert!(note.get("parts_sent").is_none(), "{note:#}");

    let c = config_arg.clone();
    let home = dir.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        run(&home, &home, SECRET_KEY, &["status", "--config", &c])
    })
    .await
    .unwrap();
    let table = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        table.contains("target archive: 1 queued (20971520 bytes), 1 in progress, 0 failed")
            && table.contains(&format!("\n  kind s3, s3://{BUCKET}/in/\n")),
        "{table}"
    );
    assert!(
        table.contains("\n  kind indexedcp, http://127.0.0.1:"),
        "{table}"
    );
    assert!(
        table.contains("multipart upload: 2 of 4 parts sent"),
        "{table}"
    );
}
