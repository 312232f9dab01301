//! The `tus` kind against the official Node server, @tus/server 2 with
//! @tus/file-store, started by each test on 127.0.0.1 from a small script
//! written to the test's directory. The file-store keeps every upload as a
//! file named by its id, next to `<id>.json` with its length and metadata:
//! what arrived is read from there, by `filename`. The script refuses every
//! request without the expected `Authorization`, and logs each request's
//! method, so that a test can count creations and PATCHes. A request's line
//! is written when its response closes, after its effect is in the store:
//! a test that reads the log once it saw an upload complete first waits for
//! [`TusServer::wait_until_logged`].
//!
//! The Node packages are found through `NODE_PATH`, else in
//! `target/tus-node/node_modules` (`.ci/run` installs them there). Missing,
//! the tests skip with a message, except under `CI=true`, where they fail.

#[path = "tus_agent_kill.rs"]
mod kill;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::fixtures::{Daemon, drop_file, sha256_hex, status_json, unsafe_kill};
use crate::support::{eventually, free_port, indexedcp, poll_every, pseudo_random, wait_until};

/// The token the test server wants as `Authorization: Bearer`.
pub const TOKEN: &str = "tus-token-0123456789";

const SERVER_SCRIPT: &str = r#"
import fs from 'node:fs';
import http from 'node:http';
import { Server } from '@tus/server';
import { FileStore } from '@tus/file-store';

const [port, directory, requestLog, token] = process.argv.slice(2);
const tus = new Server({ path: '/files', datastore: new FileStore({ directory }) });
// Requests begun and not yet logged, for the tests (answered at
// /in-flight, which is neither counted nor logged).
let inFlight = 0;
http.createServer((req, res) => {
  if (req.url === '/in-flight') {
    res.end(String(inFlight));
    return;
  }
  inFlight += 1;
  // Logged when the reply is sent (or the connection drops): method,
  // status, URL and the Upload-Offset a PATCH started at.
  res.on('close', () => {
    fs.appendFileSync(requestLog,
      `${req.method} ${res.statusCode} ${req.url} ${req.headers['upload-offset'] ?? '-'}\n`);
    inFlight -= 1;
  });
  if (req.headers['authorization'] !== `Bearer ${token}`) {
    res.writeHead(401, { 'Content-Type': 'text/plain' });
    res.end('wrong or missing Authorization');
    return;
  }
  tus.handle(req, res);
}).listen(Number(port), '127.0.0.1');
"#;

/// Where the Node packages are: `NODE_PATH`'s entry holding @tus/server,
/// else `target/tus-node/node_modules`. `None` (after a message) when they
/// are not installed; under `CI=true` that fails the test.
pub fn node_modules() -> Option<PathBuf> {
    let from_env = std::env::var_os("NODE_PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tus-node/node_modules");
    let found = from_env.into_iter().chain([default]).find(|dir| {
        dir.join("@tus/server/package.json").is_file() && dir.join("@tus/file-store").is_dir()
    });
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found.is_none() || !node {
        let what = "node with @tus/server and @tus/file-store (npm install --prefix target/tus-node \
                    tus-js-client@4 @tus/server@2 @tus/file-store; .ci/run does it)";
        crate::support::require(false, what, "the agent's tus peer");
        return None;
    }
    found
}

/// A running @tus/server with a file-store, on a fixed port so that it can
/// be restarted where the agent expects it.
pub struct TusServer {
    child: Child,
    port: u16,
    dir: PathBuf,
    pub store: PathBuf,
    requests: PathBuf,
}

/// One upload as the file-store keeps it.
#[derive(Debug)]
pub struct StoredUpload {
    pub id: String,
    pub filename: Option<String>,
    pub metadata: serde_json::Value,
    pub length: Option<u64>,
    pub data: Vec<u8>,
}

impl StoredUpload {
    /// Whether the server holds all of it.
    pub fn complete(&self) -> bool {
        self.length == Some(self.data.len() as u64)
    }
}

impl TusServer {
    /// Starts the server with its script, store and request log in `dir`;
    /// `None` when Node or the packages are not installed.
    pub async fn start(dir: &Path) -> Option<TusServer> {
        let modules = node_modules()?;
        std::fs::create_dir_all(dir).unwrap();
        // An ES module finds its packages in a node_modules folder next to
        // it (NODE_PATH is for CommonJS only).
        let link = dir.join("node_modules");
        if !link.exists() {
            std::os::unix::fs::symlink(&modules, &link).unwrap();
        }
        std::fs::write(dir.join("server.mjs"), SERVER_SCRIPT).unwrap();
        let store = dir.join("store");
        std::fs::create_dir_all(&store).unwrap();
        let child = spawn(dir, free_port(), &store);
        let port = child.1;
        let server = TusServer {
            child: child.0,
            port,
            dir: dir.to_owned(),
            store,
            requests: dir.join("requests.log"),
        };
        server.wait_until_up().await;
        Some(server)
    }

    /// The creation URL, as a target's `url`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/files/", self.port)
    }

    async fn wait_until_up(&self) {
        let client = reqwest::Client::new();
        let url = self.url();
        let up = poll_every(
            Duration::from_millis(50),
            Duration::from_secs(30),
            async || {
                let response = client
                    .request(reqwest::Method::OPTIONS, &url)
                    .bearer_auth(TOKEN)
                    .send()
                    .await
                    .ok()?;
                response.status().is_success().then_some(())
            },
        )
        .await;
        assert!(up.is_some(), "@tus/server did not start on {url}");
    }

    /// Waits until every request this server process has begun is in the
    /// request log. Its line is written when the response closes, which
    /// comes after the request's bytes are in the store (and can come after
    /// the client read the response): an upload seen complete in the store
    /// does not mean the PATCH that completed it is logged yet.
    pub async fn wait_until_logged(&self) {
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{}/in-flight", self.port);
        eventually(
            Duration::from_secs(10),
            "the tus server to log every request it began",
            async || {
                let open = client.get(&url).send().await.ok()?.text().await.ok()?;
                (open == "0").then_some(())
            },
        )
        .await;
    }

    /// SIGKILL, then wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.kill();
        self.child = spawn_on(&self.dir, self.port, &self.store);
        self.wait_until_up().await;
    }

    /// Requests received with `method` so far (across restarts).
    pub fn requests(&self, method: &str) -> usize {
        std::fs::read_to_string(&self.requests)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.split(' ').next() == Some(method))
            .count()
    }

    /// The `Upload-Offset` of every PATCH answered with `status`.
    pub fn patch_offsets(&self, status: u16) -> Vec<u64> {
        std::fs::read_to_string(&self.requests)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                (fields[0] == "PATCH" && fields[1] == status.to_string())
                    .then(|| fields[3].parse().ok())
                    .flatten()
            })
            .collect()
    }

    /// Every upload in the store.
    pub fn uploads(&self) -> Vec<StoredUpload> {
        let mut uploads = Vec::new();
        for entry in std::fs::read_dir(&self.store).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            // The JSON is written right after the empty data file: a
            // half-written one is an upload being created.
            let Ok(info) = serde_json::from_slice::<serde_json::Value>(
                &std::fs::read(&path).unwrap_or_default(),
            ) else {
                continue;
            };
            let id = info["id"].as_str().unwrap().to_owned();
            let data = std::fs::read(self.store.join(&id)).unwrap_or_default();
            uploads.push(StoredUpload {
                filename: info["metadata"]["filename"].as_str().map(str::to_owned),
                metadata: info["metadata"].clone(),
                length: info["size"].as_u64(),
                data,
                id,
            });
        }
        uploads
    }

    /// The complete uploads by `filename`: how many, and the bytes of each.
    pub fn completed(&self) -> BTreeMap<String, Vec<Vec<u8>>> {
        let mut completed: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for upload in self.uploads() {
            if upload.complete() {
                completed
                    .entry(upload.filename.clone().unwrap_or_default())
                    .or_default()
                    .push(upload.data);
            }
        }
        completed
    }
}

impl Drop for TusServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(dir: &Path, port: u16, store: &Path) -> (Child, u16) {
    (spawn_on(dir, port, store), port)
}

fn spawn_on(dir: &Path, port: u16, store: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    Command::new("node")
        .current_dir(dir)
        .arg(dir.join("server.mjs"))
        .arg(port.to_string())
        .arg(store)
        .arg(dir.join("requests.log"))
        .arg(TOKEN)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start node")
}

/// An agent config with one tus target at `url` (64 KiB chunks, sending
/// `Authorization: Bearer <token>` through `headers`) and one spool.
pub fn tus_config(dir: &Path, url: &str, spool: &Path, token: &str, extra_target: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    let text = format!(
        "[daemon]\nstate_dir = {state:?}\ncheck_interval = \"500ms\"\n\n\
         [[target]]\nname = \"media\"\nkind = \"tus\"\nurl = {url:?}\nchunk_size = \"64KiB\"\n\
         initial_retry_delay = \"100ms\"\nmax_retry_delay = \"1s\"\n\
         headers = {{ Authorization = \"Bearer {token}\" }}\n{extra_target}\n\n\
         [[spool]]\npath = {spool:?}\ntarget = \"media\"\nsettle = \"300ms\"\n",
        state = dir.join("state").display().to_string(),
        spool = spool.display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Chunks of a file of `len` bytes cut at 64 KiB (an empty file is one).
fn chunk_count(len: usize) -> usize {
    len.div_ceil(64 << 10).max(1)
}

#[tokio::test(flavor = "multi_thread")]
async fn small_empty_and_multi_chunk_files_arrive_once_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = TusServer::start(&dir.path().join("tus")).await else {
        return;
    };
    let (spool, staging) = (dir.path().join("spool"), dir.path().join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let config = tus_config(dir.path(), &server.url(), &spool, TOKEN, "");
    let _daemon = Daemon::start(&config);
    let files: BTreeMap<String, Vec<u8>> = [
        ("small.txt", 1000),
        ("empty", 0),
        ("multi.bin", 5 * (64 << 10) + 123),
        ("sub/exact.csv", 2 * (64 << 10)),
    ]
    .into_iter()
    .map(|(name, len)| (name.to_owned(), pseudo_random(len, len as u64 + 7)))
    .collect();
    for (name, data) in &files {
        drop_file(&staging, &spool, name, data);
    }
    let expected: BTreeMap<String, Vec<Vec<u8>>> = files
        .iter()
        .map(|(n, d)| (n.clone(), vec![d.clone()]))
        .collect();
    eventually(
        Duration::from_secs(60),
        "every file on the server",
        async || (server.completed() == expected).then_some(()),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the buffer to confirm every file",
        async || {
            let status = status_json(&config);
            (status.len() == files.len() && status.iter().all(|f| f["state"] == "confirmed"))
                .then_some(())
        },
    )
    .await;

    // One creation per file, every chunk sent once, and nothing else stored.
    // The empty file is created with its length deferred (so that it is not
    // complete before the agent recorded where it is), then told it in one
    // empty PATCH.
    server.wait_until_logged().await;
    let uploads = server.uploads();
    assert_eq!(uploads.len(), files.len(), "{uploads:?}");
    assert_eq!(server.requests("POST"), files.len());
    let n_patches: usize = files.values().map(|d| chunk_count(d.len())).sum();
    assert_eq!(server.requests("PATCH"), n_patches);
    // The metadata a tus server (and whoever reads its uploads) sees.
    for upload in &uploads {
        let name = upload.filename.as_deref().unwrap();
        assert_eq!(
            upload.metadata["sha256"],
            sha256_hex(&files[name]),
            "{name}"
        );
    }
    let by_name = |name: &str| {
        uploads
            .iter()
            .find(|u| u.filename.as_deref() == Some(name))
            .unwrap()
    };
    assert_eq!(by_name("small.txt").metadata["filetype"], "text/plain");
    assert_eq!(by_name("sub/exact.csv").metadata["filetype"], "text/csv");
    assert!(by_name("multi.bin").metadata.get("filetype").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_reach_the_server_and_a_refused_one_waits_for_the_fixed_config() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = TusServer::start(&dir.path().join("tus")).await else {
        return;
    };
    let (spool, staging) = (dir.path().join("spool"), dir.path().join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let config = tus_config(dir.path(), &server.url(), &spool, "wrong-token", "");
    let daemon = Daemon::start(&config);
    let data = pseudo_random(3 * (64 << 10), 3);
    drop_file(&staging, &spool, "report.pdf", &data);

    // The server refuses the wrong header: the file waits, with the reason.
    let error = eventually(
        Duration::from_secs(30),
        "the refusal in the status",
        async || {
            status_json(&config)
                .first()
                .and_then(|f| f["last_error"].as_str().map(str::to_owned))
        },
    )
    .await;
    assert!(
        error.contains("401") && error.contains("check the target's headers"),
        "{error}"
    );
    assert_eq!(status_json(&config)[0]["state"], "queued");
    assert!(server.uploads().is_empty());

    // Fixed and reloaded, the same file goes through, once.
    let fixed = std::fs::read_to_string(&config)
        .unwrap()
        .replace("Bearer wrong-token", &format!("Bearer {TOKEN}"));
    std::fs::write(&config, fixed).unwrap();
    unsafe_kill(daemon.child.id(), libc::SIGHUP);
    let expected = BTreeMap::from([("report.pdf".to_owned(), vec![data])]);
    eventually(
        Duration::from_secs(30),
        "the file on the server",
        async || (server.completed() == expected).then_some(()),
    )
    .await;
    assert_eq!(server.uploads().len(), 1);
}

/// The agent crashes right after the server acknowledged a chunk, and right
/// after it acknowledged the last one, each time before the buffer knew: the
/// restarted agent continues the same upload and sends no byte twice.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_before_an_acknowledgement_is_recorded_resumes_the_same_upload() {
    for failpoint in [
        indexedcp::failpoint::UPLOAD_AFTER_ACK,
        indexedcp::failpoint::UPLOAD_AFTER_COMPLETE,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let Some(server) = TusServer::start(&dir.path().join("tus")).await else {
            return;
        };
        let (spool, staging) = (dir.path().join("spool"), dir.path().join("staging"));
        std::fs::create_dir_all(&staging).unwrap();
        let config = tus_config(dir.path(), &server.url(), &spool, TOKEN, "");
        let data = pseudo_random(5 * (64 << 10) + 123, 5);
        drop_file(&staging, &spool, "video.mp4", &data);
        let mut daemon = Daemon::start_with_env(&config, &[(indexedcp::failpoint::ENV, failpoint)]);
        wait_until(
            &format!("the agent to crash at {failpoint}"),
            Duration::from_millis(20),
            Duration::from_secs(30),
            || Ok(daemon.child.try_wait()?.is_some()),
        )
        .unwrap();
        assert_eq!(server.requests("POST"), 1, "{failpoint}");
        daemon.restart();
        let expected = BTreeMap::from([("video.mp4".to_owned(), vec![data.clone()])]);
        eventually(
            Duration::from_secs(30),
            "the file on the server",
            async || (server.completed() == expected).then_some(()),
        )
        .await;
        eventually(
            Duration::from_secs(10),
            "the buffer to confirm it",
            async || (status_json(&config).first()?["state"] == "confirmed").then_some(()),
        )
        .await;
        server.wait_until_logged().await;
        assert_eq!(server.uploads().len(), 1, "{failpoint}");
        assert_eq!(
            server.requests("POST"),
            1,
            "{failpoint}: one upload created"
        );
        assert_eq!(
            server.requests("PATCH"),
            chunk_count(data.len()),
            "{failpoint}: every chunk sent once"
        );
        assert_eq!(
            server.requests("HEAD"),
            1,
            "{failpoint}: one question after the restart"
        );
    }
}

/// A PATCH cut off in the middle leaves the server holding part of a
/// chunk (here another tus client sends that part while the agent is down,
/// after a crash before the agent recorded its first chunk): the restarted
/// agent sends exactly the missing tail of that chunk, then the rest.
#[tokio::test(flavor = "multi_thread")]
async fn an_offset_inside_a_chunk_resumes_with_the_chunks_tail() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = TusServer::start(&dir.path().join("tus")).await else {
        return;
    };
    let (spool, staging) = (dir.path().join("spool"), dir.path().join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let config = tus_config(dir.path(), &server.url(), &spool, TOKEN, "");
    let data = pseudo_random(5 * (64 << 10) + 123, 9);
    drop_file(&staging, &spool, "cut.bin", &data);
    let failpoint = indexedcp::failpoint::UPLOAD_AFTER_ACK;
    let mut daemon = Daemon::start_with_env(&config, &[(indexedcp::failpoint::ENV, failpoint)]);
    wait_until(
        "the agent to crash after its first chunk",
        Duration::from_millis(20),
        Duration::from_secs(30),
        || Ok(daemon.child.try_wait()?.is_some()),
    )
    .unwrap();
    let uploads = server.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].data.len(), 64 << 10);

    // The second chunk and 500 bytes of the third reach the server.
    let upload_url = format!("{}{}", server.url(), uploads[0].id);
    let cut = 2 * (64 << 10) + 500;
    let response = reqwest::Client::new()
        .patch(&upload_url)
        .bearer_auth(TOKEN)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", 64 << 10)
        .header("Content-Type", "application/offset+octet-stream")
        .body(data[64 << 10..cut].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);

    daemon.restart();
    let expected = BTreeMap::from([("cut.bin".to_owned(), vec![data.clone()])]);
    eventually(
        Duration::from_secs(30),
        "the file on the server",
        async || (server.completed() == expected).then_some(()),
    )
    .await;
    // The PATCH that completed the file may not be logged yet.
    server.wait_until_logged().await;
    assert_eq!(server.uploads().len(), 1);
    assert_eq!(server.requests("POST"), 1);
    // The PATCHes: the agent's first chunk, the other client's, then the
    // agent's tail of the third chunk from the cut, and the remaining chunks
    // whole, each once. (Sorted: the server's log line is written when a
    // response closes, which on a kept-alive connection need not follow the
    // order of the requests.)
    let mut offsets = server.patch_offsets(204);
    offsets.sort_unstable();
    assert_eq!(
        offsets,
        [
            0,
            64 << 10,
            cut as u64,
            3 * (64 << 10),
            4 * (64 << 10),
            5 * (64 << 10)
        ]
    );
    // Known from the one HEAD after the restart: no PATCH was refused.
    assert_eq!(server.patch_offsets(409), Vec::<u64>::new());
    assert_eq!(server.requests("HEAD"), 1);
}

/// `indexedcp purge` of a file whose upload is unfinished deletes that
/// upload on the server (termination, which @tus/server announces); a
/// delivered file's upload stays, since the server keeps the file in it.
#[tokio::test(flavor = "multi_thread")]
async fn purge_deletes_an_unfinished_upload_on_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = TusServer::start(&dir.path().join("tus")).await else {
        return;
    };
    let (spool, staging) = (dir.path().join("spool"), dir.path().join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let config = tus_config(dir.path(), &server.url(), &spool, TOKEN, "");
    let done = pseudo_random(1000, 1);
    drop_file(&staging, &spool, "done.txt", &done);
    let mut daemon = Daemon::start(&config);
    let expected = BTreeMap::from([("done.txt".to_owned(), vec![done.clone()])]);
    eventually(
        Duration::from_secs(30),
        "the first file on the server",
        async || {
            let confirmed = status_json(&config)
                .first()
                .is_some_and(|f| f["state"] == "confirmed");
            (confirmed && server.completed() == expected).then_some(())
        },
    )
    .await;
    daemon.kill();

    // A second file: the agent dies after the server took its first chunk.
    let data = pseudo_random(5 * (64 << 10) + 123, 3);
    drop_file(&staging, &spool, "cut.bin", &data);
    let failpoint = indexedcp::failpoint::UPLOAD_AFTER_ACK;
    let mut daemon = Daemon::start_with_env(&config, &[(indexedcp::failpoint::ENV, failpoint)]);
    wait_until(
        "the agent to crash after a chunk",
        Duration::from_millis(20),
        Duration::from_secs(30),
        || Ok(daemon.child.try_wait()?.is_some()),
    )
    .unwrap();
    let cut = server
        .uploads()
        .into_iter()
        .find(|u| u.filename.as_deref() == Some("cut.bin"))
        .expect("the unfinished upload on the server");
    assert!(!cut.complete());
    let cut_url = format!("{}{}", server.url(), cut.id);
    let client = reqwest::Client::new();
    let head = async |url: &str| {
        client
            .head(url)
            .bearer_auth(TOKEN)
            .header("Tus-Resumable", "1.0.0")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(head(&cut_url).await, 200);

    for file in status_json(&config) {
        let id = file["id"].to_string();
        let output = indexedcp()
            .args(["purge", &id, "--yes", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "purge {id}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.stderr.is_empty(),
            "purge {id} warned: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(status_json(&config).is_empty());
    assert!(
        [404, 410].contains(&head(&cut_url).await),
        "the purged file's upload is still on the server"
    );
    assert!(!server.store.join(&cut.id).exists());
    server.wait_until_logged().await;
    assert_eq!(server.requests("DELETE"), 1);
    // The delivered file is still there.
    assert_eq!(server.completed(), expected);
}

/// A PATCH answered 409 (another client moved the upload's offset since
/// the agent last heard from the server) is followed by a HEAD, and the
/// agent goes on from the server's offset: here from inside a chunk. A
/// proxy between agent and server holds the agent's third PATCH while the
/// other client writes.
#[tokio::test(flavor = "multi_thread")]
async fn a_conflict_continues_from_the_servers_offset() {
    let dir = tempfile::tempdir().unwrap();
    let Some(server) = TusServer::start(&dir.path().join("tus")).await else {
        return;
    };
    let proxy = HoldingProxy::start(server.port, 3).await;
    let (spool, staging) = (dir.path().join("spool"), dir.path().join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let url = format!("http://127.0.0.1:{}/files/", proxy.port);
    let config = tus_config(dir.path(), &url, &spool, TOKEN, "");
    let data = pseudo_random(5 * (64 << 10) + 123, 11);
    drop_file(&staging, &spool, "moved.bin", &data);
    let _daemon = Daemon::start(&config);
    let mut held = proxy.held;
    let path = tokio::time::timeout(Duration::from_secs(60), held.recv())
        .await
        .expect("the agent's third PATCH never came")
        .unwrap();
    // Two chunks are in; the other client sends the third and 700 bytes
    // of the fourth, straight to the server.
    let upload_url = format!("http://127.0.0.1:{}{path}", server.port);
    let (from, to) = (2 * (64 << 10), 3 * (64 << 10) + 700);
    let response = reqwest::Client::new()
        .patch(&upload_url)
        .bearer_auth(TOKEN)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Offset", from)
        .header("Content-Type", "application/offset+octet-stream")
        .body(data[from..to].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    proxy.release.send(()).unwrap();

    let expected = BTreeMap::from([("moved.bin".to_owned(), vec![data.clone()])]);
    eventually(
        Duration::from_secs(30),
        "the file on the server",
        async || (server.completed() == expected).then_some(()),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the buffer to confirm it",
        async || (status_json(&config).first()?["state"] == "confirmed").then_some(()),
    )
    .await;
    server.wait_until_logged().await;
    assert_eq!(server.uploads().len(), 1);
    assert_eq!(server.requests("POST"), 1);
    // The held PATCH was refused; the agent asked, then sent the fourth
    // chunk's tail and the rest.
    assert_eq!(server.patch_offsets(409), [from as u64]);
    assert_eq!(server.requests("HEAD"), 1);
    assert_eq!(
        server.patch_offsets(204),
        [
            0,
            64 << 10,
            from as u64,
            to as u64,
            4 * (64 << 10),
            5 * (64 << 10)
        ]
    );
}

/// A TCP proxy to 127.0.0.1:`port` that holds the `nth` request starting
/// with `PATCH ` (the agent sends one request at a time, so each begins a
/// read) until `release` fires, after sending its path on `held`.
struct HoldingProxy {
    port: u16,
    held: tokio::sync::mpsc::UnboundedReceiver<String>,
    release: tokio::sync::watch::Sender<()>,
}

impl HoldingProxy {
    async fn start(upstream: u16, nth: usize) -> HoldingProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (held_tx, held) = tokio::sync::mpsc::unbounded_channel();
        let (release, released) = tokio::sync::watch::channel(());
        let patches = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
                let (held_tx, patches) = (held_tx.clone(), patches.clone());
                let mut released = released.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if buf[..n].starts_with(b"PATCH ")
                            && patches.fetch_add(1, Ordering::SeqCst) + 1 == nth
                        {
                            let line = String::from_utf8_lossy(&buf[..n.min(200)]).into_owned();
                            let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
                            let _ = held_tx.send(path);
                            let _ = released.changed().await;
                        }
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = server_write.shutdown().await;
                });
            }
        });
        HoldingProxy {
            port,
            held,
            release,
        }
    }
}
