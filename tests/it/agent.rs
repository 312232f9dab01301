//! The agent: spool folders -> SQLite buffer -> uploader, against the real
//! receiver (or a v1-only one) on loopback.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fixtures::*;
use crate::support::*;

/// 200 files from 0 B to 20 MiB in nested folders, with spaces and non-ASCII names.
fn many_files() -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let big = [20 << 20, 8 << 20, 3 << 20, (1 << 20) + 1, 1 << 20];
    for i in 0..200usize {
        let size = if i < big.len() {
            big[i]
        } else {
            (i * 7919) % 70_000
        };
        let size = if i == 7 { 0 } else { size };
        let name = match i % 5 {
            0 => format!("file {i}.bin"),
            1 => format!("nested/deeper/ünïcødé-{i}.dat"),
            2 => format!("nested/{i} with spaces/x.txt"),
            3 => format!("日本語/ファイル{i}"),
            _ => format!("plain-{i}"),
        };
        files.insert(name, pseudo_random(size, i as u64 + 1));
    }
    files
}

async fn deliver_many(
    disposition: &str,
) -> (tempfile::TempDir, Daemon, Server, BTreeMap<String, Vec<u8>>) {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &["--path-mode", "allow-paths"]).await;
    let extra = match disposition {
        "move" => format!(
            "disposition = \"move\"\nmove_to = {:?}",
            dir.path().join("sent").display().to_string()
        ),
        other => format!("disposition = \"{other}\""),
    };
    let config = agent_config(
        dir.path(),
        &server.upload_url(),
        &spool,
        &extra,
        "chunk_size = \"1MiB\"",
    );
    let daemon = Daemon::start(&config);
    let files = many_files();
    for (rel, content) in &files {
        drop_file(&staging, &spool, rel, content);
    }
    wait_for_files(&out, &files, Duration::from_secs(180)).await;
    (dir, daemon, server, files)
}

fn files_below(root: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    if !root.exists() {
        return BTreeMap::new();
    }
    tree(root)
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_files_arrive_exactly_once_and_the_spool_empties() {
    let (dir, _daemon, _server, _files) = deliver_many("delete").await;
    let spool = dir.path().join("spool");
    eventually(Duration::from_secs(30), "an empty spool", async || {
        files_below(&spool).is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn moved_sources_keep_their_relative_paths() {
    let (dir, _daemon, _server, files) = deliver_many("move").await;
    let sent = dir.path().join("sent");
    eventually(Duration::from_secs(30), "every source moved", async || {
        (files_below(&sent) == files).then_some(())
    })
    .await;
    assert!(files_below(&dir.path().join("spool")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn kept_sources_stay_and_are_not_sent_again_after_a_restart() {
    let (dir, out, spool, staging) = agent_dirs();
    let _server = Server::start(&out, &["--path-mode", "allow-paths"]).await;
    let config = agent_config(
        dir.path(),
        &_server.upload_url(),
        &spool,
        "disposition = \"keep\"",
        "",
    );
    let mut daemon = Daemon::start(&config);
    let mut files = BTreeMap::new();
    for i in 0..20 {
        let (rel, content) = (format!("k/{i}.txt"), pseudo_random(i * 1000, i as u64));
        drop_file(&staging, &spool, &rel, &content);
        files.insert(rel, content);
    }
    wait_for_files(&out, &files, Duration::from_secs(60)).await;
    assert_eq!(
        files_below(&spool),
        files.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    );
    daemon.restart();
    // A marker dropped after the restart arrives after the start-up scan was
    // ingested; by then any re-sent kept file would show up as a second copy.
    drop_file(&staging, &spool, "marker.txt", b"after restart");
    files.insert("marker.txt".into(), b"after restart".to_vec());
    wait_for_files(&out, &files, Duration::from_secs(60)).await;
    // A kept file that changes is a new version and is sent again.
    drop_file(&staging, &spool, "k/3.txt", b"changed");
    eventually(
        Duration::from_secs(30),
        "the changed kept file",
        async || {
            visible_files(&out)
                .iter()
                .any(|(k, v)| k.starts_with("k/3_") && v == b"changed")
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slowly_written_file_is_delivered_once_complete() {
    let dir = tempfile::tempdir().unwrap();
    let (out, spool) = (dir.path().join("out"), dir.path().join("spool"));
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let _daemon = Daemon::start(&config);
    std::fs::create_dir_all(&spool).unwrap();
    let path = spool.join("slow.log");
    let writer = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut file = std::fs::File::create(&path).unwrap();
        let mut written = Vec::new();
        // Twelve pieces over about 2.4 s with the file open the whole time; each
        // gap (200 ms) is shorter than the spool's settle (300 ms).
        for i in 0..12u64 {
            let piece = pseudo_random(10_000, i);
            file.write_all(&piece).unwrap();
            file.flush().unwrap();
            written.extend(piece);
            std::thread::sleep(Duration::from_millis(200));
        }
        written
    });
    let written = writer.await.unwrap();
    wait_for_files(
        &out,
        &[("slow.log".to_string(), written)].into(),
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn files_present_before_start_and_dropped_while_stopped_are_delivered() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &["--path-mode", "allow-paths"]).await;
    let mut files = BTreeMap::new();
    for i in 0..5 {
        let rel = format!("before/{i}.bin");
        files.insert(rel.clone(), pseudo_random(5000 + i, i as u64));
        drop_file(&staging, &spool, &rel, &files[&rel]);
    }
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let mut daemon = Daemon::start(&config);
    wait_for_files(&out, &files, Duration::from_secs(60)).await;
    assert_eq!(
        daemon.signal_and_wait(15, Duration::from_secs(20)).code(),
        Some(0)
    );
    for i in 0..5 {
        let rel = format!("while-stopped/{i}.bin");
        files.insert(rel.clone(), pseudo_random(7000 + i, 100 + i as u64));
        drop_file(&staging, &spool, &rel, &files[&rel]);
    }
    let _daemon = Daemon::start(&config);
    wait_for_files(&out, &files, Duration::from_secs(60)).await;
}

/// A stand-in receiver on a fixed port that answers 503 and records when each
/// request came.
async fn refusing_receiver(listener: tokio::net::TcpListener, hits: Arc<Mutex<Vec<Instant>>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let hits = hits.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = vec![0u8; 1 << 16];
            let mut request = Vec::new();
            // Read the headers and whatever body is announced, then refuse.
            loop {
                let Ok(n) = stream.read(&mut buf).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                request.extend_from_slice(&buf[..n]);
                if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map(|v| v.trim().parse().unwrap())
                        .unwrap_or(0);
                    if request.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            // Attempts at the file only (a chunk, or the status request a
            // retry begins with): not the question of what the receiver
            // speaks (`OPTIONS`) that comes before the first chunk.
            if !request.starts_with(b"OPTIONS ") {
                hits.lock().unwrap().push(Instant::now());
            }
            let body = r#"{"error":"Service unavailable","message":"test"}"#;
            let reply = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes()).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unavailable_then_unreachable_receiver_gets_everything_on_the_retry_schedule() {
    let (dir, out, spool, staging) = agent_dirs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/upload");
    let config = agent_config(
        dir.path(),
        &url,
        &spool,
        "",
        "initial_retry_delay = \"200ms\"\nmax_retry_delay = \"1600ms\"\nretry_multiplier = 2.0",
    );
    let hits = Arc::new(Mutex::new(Vec::new()));
    let refusing = tokio::spawn(refusing_receiver(listener, hits.clone()));
    let _daemon = Daemon::start(&config);
    let mut files = BTreeMap::new();
    files.insert("first.bin".to_string(), pseudo_random(300_000, 1));
    drop_file(&staging, &spool, "first.bin", &files["first.bin"]);

    // Six attempts: the first, then retries after 0.2, 0.4, 0.8, 1.6, 1.6 s (+ up to 10 % jitter).
    eventually(
        Duration::from_secs(20),
        "six refused attempts",
        async || (hits.lock().unwrap().len() >= 6).then_some(()),
    )
    .await;
    refusing.abort();
    let times = hits.lock().unwrap().clone();
    let expected = [0.2, 0.4, 0.8, 1.6, 1.6];
    for (n, want) in expected.iter().enumerate() {
        let got = times[n + 1].duration_since(times[n]).as_secs_f64();
        assert!(
            got >= want * 0.95 && got <= want * 1.1 + 0.35,
            "retry {}: waited {got:.3}s, schedule says {want}s (all: {:?})",
            n + 1,
            times
                .windows(2)
                .map(|w| w[1].duration_since(w[0]).as_secs_f64())
                .collect::<Vec<_>>()
        );
    }

    // More files while nothing listens at all (connection refused).
    for i in 0..10 {
        let rel = format!("during-outage-{i}.bin");
        files.insert(rel.clone(), pseudo_random(i * 3000, i as u64));
        drop_file(&staging, &spool, &rel, &files[&rel]);
    }
    // Then the real receiver comes up on the same port: everything drains.
    let _server = Server::start(&out, &["--port", &port.to_string()][..]).await;
    wait_for_files(&out, &files, Duration::from_secs(60)).await;
}

/// A receiver that speaks only IndexedCP v1, as the original Node.js server
/// does: appends each chunk to the file of its name, no extension headers.
#[derive(Default)]
struct V1Receiver {
    files: Mutex<BTreeMap<String, Vec<u8>>>,
    order: Mutex<BTreeMap<String, Vec<u64>>>,
    /// Chunks that came without `X-File-Sha256`: a receiver that did not
    /// announce streaming must get none.
    without_file_hash: Mutex<u64>,
}

async fn v1_upload(
    axum::extract::State(state): axum::extract::State<Arc<V1Receiver>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if headers.get("authorization").map(|v| v.as_bytes())
        != Some(format!("Bearer {KEY}").as_bytes())
    {
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            axum::Json(serde_json::json!({"error": "Invalid or missing API key"})),
        )
            .into_response();
    }
    if !headers.contains_key("x-file-sha256") {
        *state.without_file_hash.lock().unwrap() += 1;
    }
    let name = String::from_utf8(headers["x-file-name"].as_bytes().to_vec()).unwrap();
    let index: u64 = headers["x-chunk-index"].to_str().unwrap().parse().unwrap();
    state
        .files
        .lock()
        .unwrap()
        .entry(name.clone())
        .or_default()
        .extend_from_slice(&body);
    state
        .order
        .lock()
        .unwrap()
        .entry(name.clone())
        .or_default()
        .push(index);
    axum::Json(serde_json::json!({"message": "Chunk received", "actualFilename": name, "chunkIndex": index, "clientFilename": name})).into_response()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_v1_only_receiver_gets_identical_files_with_chunks_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, staging) = (dir.path().join("spool"), dir.path().join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let state = Arc::new(V1Receiver::default());
    let app = axum::Router::new()
        .route("/upload", axum::routing::post(v1_upload))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state.clone());
    let url = serve_on_loopback(app).await;
    let config = agent_config(
        dir.path(),
        &url,
        &spool,
        "",
        "chunk_size = \"64KiB\"\nconcurrency = 3",
    );
    let _daemon = Daemon::start(&config);
    let mut files = BTreeMap::new();
    for i in 0..12usize {
        let rel = format!("v1-{i}.bin");
        files.insert(rel.clone(), pseudo_random(i * 50_000 + 1, i as u64));
        drop_file(&staging, &spool, &rel, &files[&rel]);
    }
    eventually(
        Duration::from_secs(60),
        "every file on the v1 receiver",
        async || (*state.files.lock().unwrap() == files).then_some(()),
    )
    .await;
    for (name, order) in state.order.lock().unwrap().iter() {
        let expected: Vec<u64> = (0..files[name].len().div_ceil(64 * 1024).max(1) as u64).collect();
        assert_eq!(order, &expected, "{name}: chunks out of order or repeated");
    }
    // Files of 4 chunks and more were streamed into the buffer, yet none
    // left before it was sealed: every chunk carried the file's hash.
    assert_eq!(*state.without_file_hash.lock().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_buffer_pauses_ingest_and_leaves_files_in_the_spool() {
    let (dir, out, spool, staging) = agent_dirs();
    // Reserve a port with nothing listening: the receiver is down at first.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/upload");
    let config = agent_config(dir.path(), &url, &spool, "", "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("[daemon]\n", "[daemon]\nmax_buffer_bytes = 100000\n");
    std::fs::write(&config, text).unwrap();
    let _daemon = Daemon::start(&config);
    let mut files = BTreeMap::new();
    for i in 0..10 {
        let rel = format!("f{i}.bin");
        files.insert(rel.clone(), pseudo_random(30_000, i));
        drop_file(&staging, &spool, &rel, &files[&rel]);
    }
    // At most 100 000 bytes (three files) are buffered; the other files wait.
    eventually(Duration::from_secs(20), "ingest to pause", async || {
        (files_below(&spool).len() == 7).then_some(())
    })
    .await;
    let state = dir.path().join("state/buffer.db");
    assert!(state.exists());
    let _server = Server::start(&out, &["--port", &port.to_string()][..]).await;
    wait_for_files(&out, &files, Duration::from_secs(60)).await;
    eventually(Duration::from_secs(20), "an empty spool", async || {
        files_below(&spool).is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_file_is_parked_and_the_rest_still_arrive() {
    let (dir, out, spool, staging) = agent_dirs();
    // sanitize mode refuses names with sub-directories: a permanent 400.
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let _daemon = Daemon::start(&config);
    drop_file(&staging, &spool, "sub/refused.txt", b"no");
    drop_file(&staging, &spool, "fine.txt", b"yes");
    wait_for_files(
        &out,
        &[("fine.txt".to_string(), b"yes".to_vec())].into(),
        Duration::from_secs(30),
    )
    .await;
    // The refused file stays buffered (parked), not retried and not lost.
    let parked = eventually(
        Duration::from_secs(30),
        "the refused file parked",
        async || {
            status_json(&config)
                .into_iter()
                .find(|f| f["rel_path"] == "sub/refused.txt" && f["state"] == "failed")
        },
    )
    .await;
    let failure = parked["failure"].as_str().unwrap();
    assert!(
        failure.contains("400") && failure.contains("path separators"),
        "{parked}"
    );
    // The human listing starts with a line per target.
    let text = indexedcp()
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    let summary = text.lines().next().unwrap_or_default();
    assert!(
        summary.starts_with("target central: 0 queued (0 bytes), 0 in progress, 1 failed")
            && summary.contains("last error: refused:"),
        "{text}"
    );
}

/// Serves `app` on a free port of 127.0.0.1; its upload URL.
async fn serve_on_loopback(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/upload", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// A resumable receiver that announces batches but refuses the batch route
/// (as a proxy that forwards only `/upload` would): every file must still
/// arrive, once, through single requests.
#[derive(Default)]
struct NoBatchReceiver {
    files: Mutex<BTreeMap<String, Vec<Vec<u8>>>>,
    batch_requests: Mutex<u32>,
}

async fn single_chunk_upload(
    axum::extract::State(state): axum::extract::State<Arc<NoBatchReceiver>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let header = |name: &str| String::from_utf8(headers[name].as_bytes().to_vec()).unwrap();
    let (name, id) = (header("x-file-name"), header("x-upload-id"));
    assert_eq!(
        header("x-chunk-count"),
        "1",
        "the test files fit in one chunk"
    );
    assert_eq!(header("x-file-sha256"), sha256_hex(&body));
    state
        .files
        .lock()
        .unwrap()
        .entry(name.clone())
        .or_default()
        .push(body.to_vec());
    let mut response = axum::Json(serde_json::json!({"message": "Upload complete",
        "actualFilename": name, "chunkIndex": 0, "clientFilename": name,
        "uploadId": id, "complete": true}))
    .into_response();
    let h = response.headers_mut();
    h.insert("x-indexedcp-resumable", "1".parse().unwrap());
    h.insert("x-indexedcp-batch", "64".parse().unwrap());
    response
}

async fn refuse_batch(
    axum::extract::State(state): axum::extract::State<Arc<NoBatchReceiver>>,
) -> axum::http::StatusCode {
    *state.batch_requests.lock().unwrap() += 1;
    axum::http::StatusCode::NOT_FOUND
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_refuses_batches_gets_every_file_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let state = Arc::new(NoBatchReceiver::default());
    let app = axum::Router::new()
        .route("/upload", axum::routing::post(single_chunk_upload))
        .route("/upload/batch", axum::routing::post(refuse_batch))
        .with_state(state.clone());
    let url = serve_on_loopback(app).await;
    let config = agent_config(dir.path(), &url, &spool, "", "chunk_size = \"64KiB\"");
    // Forty files wait before the start: the first replies announce batches,
    // so the rest are offered as a batch, which is refused.
    let mut files = BTreeMap::new();
    for i in 0..40usize {
        let rel = format!("nb-{i}.bin");
        files.insert(rel.clone(), pseudo_random(1000 + i * 10, i as u64));
        std::fs::write(spool.join(&rel), &files[&rel]).unwrap();
    }
    let _daemon = Daemon::start(&config);
    eventually(
        Duration::from_secs(30),
        "every file on the receiver",
        async || (state.files.lock().unwrap().len() == files.len()).then_some(()),
    )
    .await;
    // Once refused, batches are not tried again.
    assert_eq!(*state.batch_requests.lock().unwrap(), 1);
    for (name, copies) in state.files.lock().unwrap().iter() {
        assert_eq!(copies, &vec![files[name].clone()], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_over_the_receivers_limit_falls_back_to_single_files() {
    let (dir, out, spool, _staging) = agent_dirs();
    // The receiver takes at most 16 KiB per request; the agent's chunks are
    // 64 KiB, so its batches of small files are refused whole (413).
    let server = Server::start(&out, &["--max-chunk-bytes", "16KiB"]).await;
    let config = agent_config(
        dir.path(),
        &server.upload_url(),
        &spool,
        "",
        "chunk_size = \"64KiB\"",
    );
    std::fs::create_dir_all(&spool).unwrap();
    let mut files = BTreeMap::new();
    for i in 0..30usize {
        let rel = format!("limit-{i}.bin");
        files.insert(rel.clone(), pseudo_random(3000 + i, i as u64 + 70));
        std::fs::write(spool.join(&rel), &files[&rel]).unwrap();
    }
    let _daemon = Daemon::start(&config);
    wait_for_files(&out, &files, Duration::from_secs(30)).await;
    // Every file confirmed, none parked on the way.
    eventually(
        Duration::from_secs(10),
        "every file confirmed",
        async || {
            let listing = status_json(&config);
            let states: Vec<&str> = listing.iter().filter_map(|f| f["state"].as_str()).collect();
            assert!(!states.contains(&"failed"), "{listing:?}");
            (states.len() == files.len() && states.iter().all(|s| *s == "confirmed")).then_some(())
        },
    )
    .await;
}

/// A resumable receiver that records how each chunk was checked: with
/// `crc32c`, it announces CRC-32C checks (as this crate's receiver does);
/// without, it is a receiver of an older version, which knows only
/// `X-Chunk-Sha256`. Each check that comes must match the chunk's bytes.
#[derive(Default)]
struct CheckingReceiver {
    crc32c: bool,
    /// Announces CRC-32C checks on `OPTIONS` only, and refuses a chunk that
    /// comes with its CRC alone, as an older receiver does (400): one that
    /// took over the address after the agent asked.
    replaced_by_older: bool,
    /// Per upload id: the chunks by index.
    chunks: Mutex<BTreeMap<String, BTreeMap<u64, Vec<u8>>>>,
    /// How the chunks were checked: "crc32c", "sha256" or both.
    checks: Mutex<BTreeMap<String, u32>>,
    files: Mutex<BTreeMap<String, Vec<u8>>>,
}

impl CheckingReceiver {
    fn announce(&self, response: &mut axum::response::Response) {
        let h = response.headers_mut();
        h.insert("x-indexedcp-resumable", "1".parse().unwrap());
        if self.crc32c && !self.replaced_by_older {
            h.insert("x-indexedcp-crc32c", "1".parse().unwrap());
        }
    }
}

async fn checking_options(
    axum::extract::State(state): axum::extract::State<Arc<CheckingReceiver>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = axum::http::StatusCode::NO_CONTENT.into_response();
    state.announce(&mut response);
    if state.replaced_by_older {
        response
            .headers_mut()
            .insert("x-indexedcp-crc32c", "1".parse().unwrap());
    }
    response
}

async fn checking_status(
    axum::extract::State(state): axum::extract::State<Arc<CheckingReceiver>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = (
        axum::http::StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({"error": "Not found"})),
    )
        .into_response();
    state.announce(&mut response);
    response
}

async fn checking_upload(
    axum::extract::State(state): axum::extract::State<Arc<CheckingReceiver>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8(v.as_bytes().to_vec()).unwrap())
    };
    let (name, id) = (
        header("x-file-name").unwrap(),
        header("x-upload-id").unwrap(),
    );
    let index: u64 = header("x-chunk-index").unwrap().parse().unwrap();
    let count: usize = header("x-chunk-count").unwrap().parse().unwrap();
    if state.replaced_by_older && header("x-chunk-sha256").is_none() {
        *state
            .checks
            .lock()
            .unwrap()
            .entry("refused".to_owned())
            .or_default() += 1;
        let mut response = (
            axum::http::StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": "Bad request",
                "message": "header x-chunk-sha256 is required with X-Upload-Id (the resumable extension)"})),
        )
            .into_response();
        state.announce(&mut response);
        return response;
    }
    let kind = match (header("x-chunk-crc32c"), header("x-chunk-sha256")) {
        (Some(crc), None) => {
            assert_eq!(
                crc,
                format!("{:08x}", crc32c::crc32c(&body)),
                "{name} #{index}"
            );
            "crc32c"
        }
        (None, Some(sha)) => {
            assert_eq!(sha, sha256_hex(&body), "{name} #{index}");
            "sha256"
        }
        other => panic!("{name} #{index}: chunk checks {other:?}"),
    };
    *state
        .checks
        .lock()
        .unwrap()
        .entry(kind.to_owned())
        .or_default() += 1;
    let mut chunks = state.chunks.lock().unwrap();
    let upload = chunks.entry(id.clone()).or_default();
    upload.insert(index, body.to_vec());
    let received = upload.len();
    let complete = received == count && header("x-file-sha256").is_some();
    if complete {
        let file: Vec<u8> = upload.values().flatten().copied().collect();
        assert_eq!(header("x-file-sha256").unwrap(), sha256_hex(&file));
        state.files.lock().unwrap().insert(name.clone(), file);
    }
    let mut reply = serde_json::json!({"message": if complete { "Upload complete" } else { "Chunk received" },
        "chunkIndex": index, "clientFilename": name, "uploadId": id,
        "complete": complete, "receivedChunks": received});
    if complete {
        reply["actualFilename"] = name.into();
    }
    let mut response = axum::Json(reply).into_response();
    state.announce(&mut response);
    response
}

/// Runs an agent with 64 KiB chunks against a [`CheckingReceiver`] until
/// `files` are all on it; returns how the chunks were checked.
async fn deliver_to_checking_receiver(
    crc32c: bool,
    replaced_by_older: bool,
    files: &BTreeMap<String, Vec<u8>>,
) -> BTreeMap<String, u32> {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let state = Arc::new(CheckingReceiver {
        crc32c,
        replaced_by_older,
        ..Default::default()
    });
    let app = axum::Router::new()
        .route(
            "/upload",
            axum::routing::post(checking_upload).options(checking_options),
        )
        .route("/upload/{id}", axum::routing::get(checking_status))
        .with_state(state.clone());
    let url = serve_on_loopback(app).await;
    let config = agent_config(dir.path(), &url, &spool, "", "chunk_size = \"64KiB\"");
    let _daemon = Daemon::start(&config);
    for (name, bytes) in files {
        let staged = dir.path().join(name);
        std::fs::write(&staged, bytes).unwrap();
        std::fs::rename(&staged, spool.join(name)).unwrap();
    }
    eventually(
        Duration::from_secs(30),
        "every file on the receiver",
        async || (state.files.lock().unwrap().len() == files.len()).then_some(()),
    )
    .await;
    assert_eq!(&*state.files.lock().unwrap(), files);
    state.checks.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_are_checked_by_crc32c_only_where_the_receiver_takes_it() {
    // Two files of several chunks (one streamed in, one buffered whole).
    let files: BTreeMap<String, Vec<u8>> = [
        ("streamed.bin".to_owned(), pseudo_random(5 * 65536 + 7, 41)),
        ("three.bin".to_owned(), pseudo_random(2 * 65536 + 9, 42)),
    ]
    .into();
    let chunks = 6 + 3;
    // A receiver that announces CRC-32C gets no chunk's SHA-256.
    let checks = deliver_to_checking_receiver(true, false, &files).await;
    assert_eq!(checks, [("crc32c".to_owned(), chunks)].into());
    // One that does not (an older version) gets each chunk's SHA-256, worked
    // out from the buffered bytes, and no CRC.
    let checks = deliver_to_checking_receiver(false, false, &files).await;
    assert_eq!(checks, [("sha256".to_owned(), chunks)].into());
    // An older version that took over after the agent asked (a rolling
    // upgrade, a rollback) refuses the chunks already sent with their CRC
    // alone (at most a window of four per file); each goes again with its
    // SHA-256, and so do the rest: nothing is parked.
    let checks = deliver_to_checking_receiver(true, true, &files).await;
    assert_eq!(checks.get("sha256"), Some(&chunks), "{checks:?}");
    let refused = checks.get("refused").copied().unwrap_or(0);
    assert!((1..=8).contains(&refused), "{checks:?}");
    assert_eq!(checks.len(), 2, "{checks:?}");
}
