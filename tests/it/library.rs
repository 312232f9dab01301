//! The library API (`indexedcp::client`, `indexedcp::client::storage`) against a real
//! receiver: the behaviours the original Python client's test suite covers,
//! ported to this crate's engine. Failures come from a small proxy in front of
//! the receiver that answers 500 to as many uploads as it is told to.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indexedcp::client::{
    ChunkStatus, Client, ClientError, ClientOptions, FileState, ProgressEvent, Retry, UploadSummary,
};

use crate::fixtures::*;
use crate::support::*;

/// What the Python suite's fixture file holds: 2500 bytes, three 1 KiB chunks.
fn test_content() -> Vec<u8> {
    "Test content for upload. ".repeat(100).into_bytes()
}

/// One POST the proxy saw.
#[derive(Debug, Clone)]
struct Seen {
    name: String,
    chunk_index: u64,
    upload_id: String,
    failed: bool,
}

/// A proxy in front of the receiver that fails the next `fail_next` uploads
/// with 500 and records every upload it sees.
struct Flaky {
    upstream: String,
    fail_next: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    http: reqwest::Client,
    /// POSTs being answered now, and the most at once.
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl Flaky {
    fn fail(&self, n: usize) {
        self.fail_next.store(n, Ordering::SeqCst);
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn posts(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

async fn proxy(
    axum::extract::State(flaky): axum::extract::State<Arc<Flaky>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let _counted = (parts.method == reqwest::Method::POST).then(|| InFlight::enter(&flaky));
    if parts.method == reqwest::Method::POST {
        let failed = flaky
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        flaky.seen.lock().unwrap().push(Seen {
            name: header("x-file-name"),
            chunk_index: header("x-chunk-index").parse().unwrap_or(u64::MAX),
            upload_id: header("x-upload-id"),
            failed,
        });
        if failed {
            return (
                reqwest::StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(serde_json::json!({"error": "Server error"})),
            )
                .into_response();
        }
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut headers = parts.headers.clone();
    headers.remove(reqwest::header::HOST);
    let reply = flaky
        .http
        .request(parts.method, format!("{}{path}", flaky.upstream))
        .headers(headers)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = reply.status();
    let headers = reply.headers().clone();
    let bytes = reply.bytes().await.unwrap();
    let mut response = (status, bytes).into_response();
    for (name, value) in &headers {
        if name != reqwest::header::CONTENT_LENGTH && name != reqwest::header::TRANSFER_ENCODING {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// Counts a POST as in flight while it lives.
struct InFlight<'a>(&'a Flaky);

impl<'a> InFlight<'a> {
    fn enter(flaky: &'a Flaky) -> InFlight<'a> {
        let now = flaky.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        flaky.most_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(flaky)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A receiver with a [`Flaky`] proxy in front; `url` is the proxy's upload URL.
struct Receiver {
    _server: Server,
    flaky: Arc<Flaky>,
    url: String,
    out: PathBuf,
}

async fn receiver(dir: &Path) -> Receiver {
    let out = dir.join("out");
    let server = Server::start(&out, &[]).await;
    let flaky = Arc::new(Flaky {
        upstream: server.url.clone(),
        fail_next: AtomicUsize::new(0),
        seen: Mutex::new(Vec::new()),
        http: reqwest::Client::new(),
        in_flight: AtomicUsize::new(0),
        most_in_flight: AtomicUsize::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/upload", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .fallback(proxy)
        .with_state(flaky.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver {
        _server: server,
        flaky,
        url,
        out,
    }
}

/// The Python fixture's client: the receiver's URL and key, a fresh buffer,
/// 1 KiB chunks, and short retry delays so that nothing waits.
fn options(dir: &Path, url: &str) -> ClientOptions {
    ClientOptions {
        server_url: Some(url.to_owned()),
        api_key: Some(KEY.to_owned()),
        storage_path: dir.join("client.db"),
        chunk_size: 1024,
        initial_retry_delay: Duration::from_millis(50),
        max_retry_delay: Duration::from_millis(200),
        log_level: None,
        ..ClientOptions::default()
    }
}

fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn key(path: &Path) -> String {
    path.display().to_string()
}

/// Runs `f` on the client's buffer (`Client::store`), whose methods block.
async fn in_store<T: Send + 'static, S: Send + 'static>(
    store: S,
    f: impl FnOnce(&S) -> T + Send + 'static,
) -> T {
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .unwrap()
}

/// Milliseconds since the Unix epoch, the unit of the buffer's schedule.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn undelivered(
    result: Result<impl std::fmt::Debug, ClientError>,
) -> Vec<indexedcp::client::FailedFile> {
    match result {
        Err(ClientError::Undelivered { failed, .. }) => failed,
        other => panic!("expected undelivered files, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn basic_upload_returns_client_name_to_server_name_and_frees_the_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let file = write(dir.path(), "upload-test.txt", &test_content());
    let client = Client::new(options(dir.path(), &rx.url)).await.unwrap();

    assert_eq!(client.add_file(&file).await.unwrap(), 3);
    let result = client.upload_buffered_files().await.unwrap();

    assert_eq!(
        result.into_iter().collect::<BTreeMap<_, _>>(),
        BTreeMap::from([(key(&file), "upload-test.txt".to_owned())])
    );
    assert_eq!(
        visible_files(&rx.out),
        BTreeMap::from([("upload-test.txt".to_owned(), test_content())])
    );
    let (state, data) = in_store(client.store().unwrap(), |s| {
        let f = s.list().unwrap().remove(0);
        (f.state, s.chunk_data(f.id, 0).unwrap())
    })
    .await;
    assert_eq!(state, FileState::Confirmed);
    assert!(
        data.is_empty(),
        "a confirmed file's chunks leave the buffer"
    );
    client.close().await;
}

#[tokio::test]
async fn upload_without_a_server_url_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "a.txt", &test_content());
    let client = Client::new(ClientOptions {
        server_url: None,
        ..options(dir.path(), "http://unused/upload")
    })
    .await
    .unwrap();
    assert_eq!(
        client.add_file(&file).await.unwrap(),
        3,
        "buffering needs no server"
    );
    let error = client.upload_buffered_files().await.unwrap_err();
    assert!(matches!(error, ClientError::NoServerUrl), "{error:?}");
    assert!(error.to_string().contains("server_url required"), "{error}");
    let error = client
        .start_upload_background(Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(error, ClientError::NoServerUrl), "{error:?}");
}

#[tokio::test]
async fn upload_without_an_api_key_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "a.txt", &test_content());
    let client = Client::new(ClientOptions {
        api_key: None,
        ..options(dir.path(), "http://127.0.0.1:9/upload")
    })
    .await
    .unwrap();
    client.add_file(&file).await.unwrap();
    let error = client.upload_buffered_files().await.unwrap_err();
    assert!(matches!(error, ClientError::NoApiKey), "{error:?}");
    assert!(error.to_string().contains("api_key required"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_buffer_uploads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let client = Client::new(options(dir.path(), &rx.url)).await.unwrap();
    assert!(client.upload_buffered_files().await.unwrap().is_empty());
    assert_eq!(rx.flaky.posts(), 0);
}

#[tokio::test]
async fn added_chunks_start_with_fresh_retry_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "a.txt", &test_content());
    let client = Client::new(options(dir.path(), "http://127.0.0.1:9/upload"))
        .await
        .unwrap();
    let n = client.add_file(&file).await.unwrap();
    let (record, chunks, errors) = in_store(client.store().unwrap(), |s| {
        let f = s.list().unwrap().remove(0);
        let chunks = s.chunks(f.id).unwrap();
        let errors: Vec<usize> = chunks
            .iter()
            .map(|c| s.chunk_errors(f.id, c.idx).unwrap().len())
            .collect();
        (f, chunks, errors)
    })
    .await;
    assert_eq!(chunks.len() as u64, n);
    assert!(chunks.iter().all(|c| c.retry_count == 0 && !c.uploaded));
    assert!(errors.iter().all(|n| *n == 0));
    assert_eq!((record.retries, record.last_error), (0, None));
    assert!(record.next_attempt.unwrap() <= now_ms(), "due at once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_chunk_is_recorded_and_the_next_upload_delivers_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let file = write(dir.path(), "retry.txt", &test_content());
    let client = Client::new(options(dir.path(), &rx.url)).await.unwrap();
    let events = Arc::new(Mutex::new(Vec::<ProgressEvent>::new()));
    let sink = events.clone();
    client.on_upload_progress(move |e| sink.lock().unwrap().push(e.clone()));
    client.add_file(&file).await.unwrap();

    rx.flaky.fail(1);
    let result = client.upload_buffered_files().await;
    let message = format!("{}", result.as_ref().unwrap_err());
    let failed = undelivered(result);
    assert!(message.contains("1 file(s) failed"), "{message}");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].file_name, key(&file));
    assert_eq!((failed[0].retry, failed[0].parked), (Retry::Backoff, false));
    assert!(failed[0].error.contains("500"), "{}", failed[0].error);

    let (chunks, errors) = in_store(client.store().unwrap(), |s| {
        let id = s.list().unwrap()[0].id;
        (s.chunks(id).unwrap(), s.chunk_errors(id, 0).unwrap())
    })
    .await;
    assert_eq!(
        chunks.iter().map(|c| c.retry_count).collect::<Vec<_>>(),
        [1, 0, 0],
        "the file stops at its first failed chunk, so that chunks stay in order"
    );
    assert_eq!(errors.len(), 1);
    {
        let events = events.lock().unwrap();
        assert_eq!(events.len(), 1);
        let e = &events[0];
        assert_eq!(
            (e.chunk_index, e.status, e.retry_count),
            (0, ChunkStatus::Failed, 1)
        );
        assert!(e.next_retry_in.is_some() && e.error.as_deref().unwrap().contains("500"));
    }

    let result = client.upload_buffered_files().await.unwrap();
    assert_eq!(result.len(), 1);
    assert_eq!(
        visible_files(&rx.out),
        BTreeMap::from([("retry.txt".to_owned(), test_content())])
    );
    // In the order the chunks were acknowledged: a resumable receiver has a
    // few in flight at once.
    let mut success: Vec<(u64, u64)> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.status == ChunkStatus::Success)
        .map(|e| (e.chunk_index, e.retry_count))
        .collect();
    success.sort_unstable();
    assert_eq!(success, [(0, 1), (1, 0), (2, 0)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_progress_callback_hears_every_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let file = write(dir.path(), "progress.txt", &test_content());
    let events = Arc::new(Mutex::new(Vec::<ProgressEvent>::new()));
    let sink = events.clone();
    let client = Client::new(ClientOptions {
        on_upload_progress: Some(Arc::new(move |e: &ProgressEvent| {
            sink.lock().unwrap().push(e.clone())
        })),
        ..options(dir.path(), &rx.url)
    })
    .await
    .unwrap();
    let n = client.add_file(&file).await.unwrap();
    client.upload_buffered_files().await.unwrap();
    let mut events = events.lock().unwrap().clone();
    assert_eq!(events.len() as u64, n);
    // Heard as the chunks are acknowledged, a few in flight at once.
    events.sort_by_key(|e| e.chunk_index);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.file_name, key(&file));
        assert_eq!(e.remote_name, "progress.txt");
        assert_eq!((e.chunk_index, e.chunk_count), (i as u64, n));
        assert_eq!(e.file_size, test_content().len() as u64);
        assert_eq!(e.status.as_str(), "success");
        assert_eq!((e.retry_count, e.next_retry_in, &e.error), (0, None, &None));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_completion_callback_is_for_background_rounds_only() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let client = Client::new(options(dir.path(), &rx.url)).await.unwrap();
    let summaries = Arc::new(Mutex::new(Vec::<UploadSummary>::new()));
    let sink = summaries.clone();
    client.on_upload_complete(move |s| sink.lock().unwrap().push(*s));

    client
        .add_file(write(dir.path(), "direct.txt", b"direct"))
        .await
        .unwrap();
    client.upload_buffered_files().await.unwrap();
    assert!(
        summaries.lock().unwrap().is_empty(),
        "a direct upload returns its result instead"
    );

    client
        .add_file(write(dir.path(), "background.txt", b"background"))
        .await
        .unwrap();
    client
        .start_upload_background(Duration::from_millis(50))
        .await
        .unwrap();
    let summary = eventually(Duration::from_secs(10), "a background round", async || {
        summaries.lock().unwrap().first().copied()
    })
    .await;
    client.stop_upload_background().await;
    assert_eq!(
        summary,
        UploadSummary {
            succeeded: 1,
            failed: 0,
            total: 1
        }
    );
    assert_eq!(visible_files(&rx.out).len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_retries_parks_the_file_and_stops_sending_it() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let file = write(dir.path(), "doomed.txt", &test_content());
    let client = Client::new(ClientOptions {
        max_retries: Some(2),
        ..options(dir.path(), &rx.url)
    })
    .await
    .unwrap();
    client.add_file(&file).await.unwrap();
    rx.flaky.fail(usize::MAX);

    // The first attempt and two retries fail; the second retry is the last.
    for attempt in 1..=3 {
        let failed = undelivered(client.upload_buffered_files().await);
        assert_eq!(failed[0].parked, attempt == 3, "attempt {attempt}");
    }
    let sent = rx.flaky.posts();
    assert_eq!(sent, 3);
    assert!(client.upload_buffered_files().await.unwrap().is_empty());
    assert_eq!(rx.flaky.posts(), sent, "a parked file is not sent again");
    let record = in_store(client.store().unwrap(), |s| s.list().unwrap().remove(0)).await;
    assert_eq!((record.state, record.retries), (FileState::Failed, 3));
    assert!(
        record
            .failure
            .as_deref()
            .unwrap()
            .contains("gave up after 2 retries"),
        "{:?}",
        record.failure
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn background_upload_delivers_what_is_added() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let client = Client::new(options(dir.path(), &rx.url)).await.unwrap();
    client
        .add_file(write(dir.path(), "first.txt", &test_content()))
        .await
        .unwrap();
    client
        .start_upload_background(Duration::from_millis(100))
        .await
        .unwrap();
    assert!(client.is_background_running());
    // Added while it runs: picked up without waiting for the interval.
    client
        .add_file(write(dir.path(), "second.txt", b"second"))
        .await
        .unwrap();
    let expected = BTreeMap::from([
        ("first.txt".to_owned(), test_content()),
        ("second.txt".to_owned(), b"second".to_vec()),
    ]);
    wait_for_files(&rx.out, &expected, Duration::from_secs(10)).await;
    // The receiver has the files a moment before the client records them.
    eventually(
        Duration::from_secs(10),
        "both files confirmed",
        async || {
            let states = in_store(client.store().unwrap(), |s| {
                s.list()
                    .unwrap()
                    .into_iter()
                    .map(|f| f.state)
                    .collect::<Vec<_>>()
            })
            .await;
            (states == [FileState::Confirmed, FileState::Confirmed]).then_some(())
        },
    )
    .await;
    client.stop_upload_background().await;
    assert!(!client.is_background_running());
}

#[tokio::test(flavor = "multi_thread")]
async fn starting_the_background_upload_twice_runs_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let client = Client::new(options(dir.path(), &rx.url)).await.unwrap();
    let errors = Arc::new(AtomicUsize::new(0));
    let count = errors.clone();
    client.on_upload_error(move |_| {
        count.fetch_add(1, Ordering::SeqCst);
    });
    client
        .start_upload_background(Duration::from_secs(1))
        .await
        .unwrap();
    client
        .start_upload_background(Duration::from_secs(1))
        .await
        .unwrap();
    assert!(client.is_background_running());
    client.stop_upload_background().await;
    assert!(!client.is_background_running());
    // Stopped means stopped: it can be started again, and close stops it too.
    client
        .start_upload_background(Duration::from_secs(1))
        .await
        .unwrap();
    client.close().await;
    assert!(!client.is_background_running());
    assert_eq!(errors.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_delays_grow_exponentially_up_to_the_maximum() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let client = Client::new(ClientOptions {
        initial_retry_delay: Duration::from_secs(1),
        max_retry_delay: Duration::from_secs(3),
        retry_multiplier: 2.0,
        ..options(dir.path(), &rx.url)
    })
    .await
    .unwrap();
    let delays = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let sink = delays.clone();
    client.on_upload_progress(move |e| sink.lock().unwrap().extend(e.next_retry_in));
    client
        .add_file(write(dir.path(), "a.txt", &test_content()))
        .await
        .unwrap();
    rx.flaky.fail(usize::MAX);
    for _ in 0..4 {
        let before = now_ms();
        undelivered(client.upload_buffered_files().await);
        // The schedule is recorded in the buffer: the next attempt is due after the delay.
        let next = in_store(client.store().unwrap(), |s| {
            s.list().unwrap()[0].next_attempt.unwrap()
        })
        .await;
        let delay = *delays.lock().unwrap().last().unwrap();
        assert!(
            next >= before + delay.as_millis() as i64,
            "{next} {before} {delay:?}"
        );
    }
    let delays = delays.lock().unwrap().clone();
    // 1 s, 2 s, 4 s capped at 3 s, then 3 s; up to 10 % jitter, never past the cap.
    let expected = [1000, 2000, 3000, 3000];
    for (delay, base) in delays.iter().zip(expected) {
        let ms = delay.as_millis() as u64;
        assert!(
            ms >= base && ms <= (base + base / 10).min(3000),
            "{delays:?}"
        );
    }
    assert_eq!(delays.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn multiple_files_are_all_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let client = Client::new(options(dir.path(), &rx.url)).await.unwrap();
    let mut expected_files = BTreeMap::new();
    let mut expected_map = BTreeMap::new();
    for i in 0..3 {
        let name = format!("file-{i}.txt");
        let content = format!("Test file {i} content. ").repeat(50).into_bytes();
        let path = write(dir.path(), &name, &content);
        client.add_file(&path).await.unwrap();
        expected_map.insert(key(&path), name.clone());
        expected_files.insert(name, content);
    }
    let result = client.upload_buffered_files().await.unwrap();
    assert_eq!(result.into_iter().collect::<BTreeMap<_, _>>(), expected_map);
    assert_eq!(visible_files(&rx.out), expected_files);
}

#[tokio::test(flavor = "multi_thread")]
async fn chunks_of_a_file_are_sent_once_each_under_one_session() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let client = Client::new(options(dir.path(), &rx.url)).await.unwrap();
    let mut expected = BTreeMap::new();
    for i in 0..3 {
        let content = pseudo_random(10 * 1024 + i * 100, i as u64);
        let name = format!("ordered-{i}.bin");
        client
            .add_file(write(dir.path(), &name, &content))
            .await
            .unwrap();
        expected.insert(name, content);
    }
    // Session tracking: one buffered file per add, indices 0..n, one upload id.
    let files = in_store(client.store().unwrap(), |s| {
        s.list()
            .unwrap()
            .into_iter()
            .map(|f| {
                (
                    f.remote_name.clone(),
                    f.upload_id.clone(),
                    s.chunks(f.id).unwrap(),
                )
            })
            .collect::<Vec<_>>()
    })
    .await;
    assert_eq!(files.len(), 3);
    for (_, _, chunks) in &files {
        let indices: Vec<u64> = chunks.iter().map(|c| c.idx).collect();
        assert_eq!(indices, (0..chunks.len() as u64).collect::<Vec<_>>());
    }

    client.upload_buffered_files().await.unwrap();
    assert_eq!(visible_files(&rx.out), expected);
    let seen = rx.flaky.seen();
    for (name, upload_id, chunks) in &files {
        let sent: Vec<&Seen> = seen.iter().filter(|s| &s.name == name).collect();
        // A resumable receiver gets a few chunks at a time, in any order (a
        // v1 receiver gets them in order: agent.rs).
        let mut indices: Vec<u64> = sent.iter().map(|s| s.chunk_index).collect();
        indices.sort_unstable();
        assert_eq!(
            indices,
            (0..chunks.len() as u64).collect::<Vec<_>>(),
            "{name}"
        );
        assert!(sent.iter().all(|s| &s.upload_id == upload_id && !s.failed));
    }
}

/// A fresh client does not know yet whether the receiver is resumable, so it
/// sends the first chunk alone; once the reply says so, the rest of that same
/// file goes several chunks at a time (it used to go one by one to the end).
#[tokio::test(flavor = "multi_thread")]
async fn the_first_file_sends_chunks_side_by_side_once_the_receiver_is_known() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let client = Client::new(options(dir.path(), &rx.url)).await.unwrap();
    let content = pseudo_random(64 * 1024, 3);
    client
        .add_file(write(dir.path(), "wide.bin", &content))
        .await
        .unwrap();
    client.upload_buffered_files().await.unwrap();
    assert_eq!(visible_files(&rx.out)["wide.bin"], content);
    assert_eq!(rx.flaky.posts(), 64, "each chunk once");
    let most = rx.flaky.most_in_flight.load(Ordering::SeqCst);
    assert!(most >= 2, "at most {most} chunk(s) in flight at once");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_error_history_keeps_the_last_five() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let client = Client::new(ClientOptions {
        max_retries: Some(10),
        ..options(dir.path(), &rx.url)
    })
    .await
    .unwrap();
    client
        .add_file(write(dir.path(), "a.txt", &test_content()))
        .await
        .unwrap();
    rx.flaky.fail(usize::MAX);
    for _ in 0..7 {
        undelivered(client.upload_buffered_files().await);
    }
    let (chunks, errors) = in_store(client.store().unwrap(), |s| {
        let id = s.list().unwrap()[0].id;
        (s.chunks(id).unwrap(), s.chunk_errors(id, 0).unwrap())
    })
    .await;
    assert_eq!(chunks[0].retry_count, 7);
    assert_eq!(errors.len(), 5);
    assert!(errors.iter().all(|(_, e)| e.contains("500")));
}

#[tokio::test(flavor = "multi_thread")]
async fn adding_the_same_file_twice_sends_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    let file = write(dir.path(), "once.txt", &test_content());
    let client = Client::new(options(dir.path(), &rx.url)).await.unwrap();
    client.add_file(&file).await.unwrap();
    client.add_file(&file).await.unwrap();
    assert_eq!(client.upload_buffered_files().await.unwrap().len(), 1);
    // Confirmed: adding it again is a new copy, as `cp` would make.
    client.add_file(&file).await.unwrap();
    let again = client.upload_buffered_files().await.unwrap();
    assert_ne!(again[&key(&file)], "once.txt", "a second, renamed copy");
    assert_eq!(visible_files(&rx.out).len(), 2);
}

#[tokio::test]
async fn missing_files_closed_clients_and_bad_options_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let client = Client::new(options(dir.path(), "http://127.0.0.1:9"))
        .await
        .unwrap();
    assert_eq!(client.server_url(), Some("http://127.0.0.1:9/upload"));
    let missing = dir.path().join("missing.txt");
    let error = client.add_file(&missing).await.unwrap_err();
    assert!(error.to_string().contains("missing.txt"), "{error}");
    let error = client.add_file(dir.path()).await.unwrap_err();
    assert!(error.to_string().contains("not a regular file"), "{error}");
    client.close().await;
    assert!(matches!(
        client.upload_buffered_files().await,
        Err(ClientError::Closed)
    ));

    for bad in [
        ClientOptions {
            retry_multiplier: 0.5,
            ..options(dir.path(), "http://127.0.0.1:9")
        },
        ClientOptions {
            chunk_size: 0,
            ..options(dir.path(), "http://127.0.0.1:9")
        },
        options(dir.path(), "ftp://127.0.0.1:9/upload"),
    ] {
        let error = Client::new(bad).await.unwrap_err();
        assert!(matches!(error, ClientError::InvalidOptions(_)), "{error:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_a_client_stops_its_background_upload() {
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver(dir.path()).await;
    rx.flaky.fail(usize::MAX);
    let client = Client::new(ClientOptions {
        initial_retry_delay: Duration::from_millis(10),
        max_retry_delay: Duration::from_millis(10),
        ..options(dir.path(), &rx.url)
    })
    .await
    .unwrap();
    client
        .add_file(write(dir.path(), "a.txt", b"x"))
        .await
        .unwrap();
    client
        .start_upload_background(Duration::from_millis(20))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "a few attempts", async || {
        (rx.flaky.posts() >= 2).then_some(())
    })
    .await;
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after_drop = rx.flaky.posts();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.flaky.posts(), after_drop);
}

#[tokio::test]
async fn sqlite_storage_reads_what_the_original_wrote() {
    use indexedcp::client::storage::{Storage, StorageOptions, create_storage};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("python.db");
    // The original's layout, as its SQLiteStorage creates and fills it.
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE chunks (key TEXT PRIMARY KEY, data TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
         INSERT INTO chunks VALUES ('a.txt-0', '{\"fileName\": \"a.txt\", \"chunkIndex\": 0}', 100.0, 100.0);
         INSERT INTO chunks VALUES ('a.txt-1', '{\"fileName\": \"a.txt\", \"chunkIndex\": 1}', 101.0, 101.0);",
    )
    .unwrap();
    drop(conn);

    let storage = create_storage(
        "sqlite",
        StorageOptions {
            path,
            table_name: "chunks".into(),
        },
    )
    .unwrap();
    storage.initialize().await.unwrap();
    assert_eq!(storage.list().await.unwrap(), ["a.txt-0", "a.txt-1"]);
    assert_eq!(
        storage.load("a.txt-1").await.unwrap().unwrap()["chunkIndex"],
        1
    );
    // Concurrent writers through the pool, all off the executor.
    let storage: Arc<dyn Storage> = Arc::from(storage);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let s = storage.clone();
        tasks.spawn(async move { s.save(&format!("k{i}"), serde_json::json!(i)).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    assert_eq!(storage.count().await.unwrap(), 52);
    // The original's rows are decades old.
    assert_eq!(
        storage
            .cleanup_old(Duration::from_secs(3600))
            .await
            .unwrap(),
        2
    );
    assert!(!storage.exists("a.txt-0").await.unwrap());
    assert!(storage.delete("k0").await.unwrap());
    assert_eq!(storage.load_all().await.unwrap().len(), 49);
    storage.close().await.unwrap();
}
