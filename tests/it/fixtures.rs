//! Fixtures only the integration tests need, built on the shared harness
//! (`crate::support`): a receiver started on a free port and waited for on its
//! stdout, an agent daemon, resumable and raw upload requests, agent configs,
//! spool drops and the wait for an expected output tree.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::support::{eventually, indexedcp, poll_every, tree_diff, visible_files, wait_until};

pub const KEY: &str = "test-key-0123456789";

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A running `indexedcp server` (or `daemon`) process.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub output_dir: PathBuf,
    pub args: Vec<String>,
    pub stdout_lines: Vec<String>,
}

impl Server {
    /// Starts `indexedcp server --port 0 --output-dir DIR -k KEY` plus `extra`.
    pub async fn start(output_dir: &Path, extra: &[&str]) -> Server {
        let mut args: Vec<String> = vec![
            "server".into(),
            "--output-dir".into(),
            output_dir.display().to_string(),
        ];
        if !extra.contains(&"--port") {
            args.extend(["--port".into(), "0".into()]);
        }
        if !extra.contains(&"--no-key") {
            args.extend(["-k".into(), KEY.into()]);
        }
        args.extend(
            extra
                .iter()
                .filter(|a| **a != "--no-key")
                .map(|s| s.to_string()),
        );
        Server::spawn(args, output_dir).await
    }

    /// Starts the binary with `args`, waits for its "Server listening" line and
    /// for `/health` to answer.
    pub async fn spawn(args: Vec<String>, output_dir: &Path) -> Server {
        Server::spawn_with_env(args, output_dir, &[]).await
    }

    /// [`Server::spawn`] with extra environment variables.
    pub async fn spawn_with_env(
        args: Vec<String>,
        output_dir: &Path,
        env: &[(&str, &str)],
    ) -> Server {
        let mut child = indexedcp()
            .args(&args)
            .envs(env.iter().copied())
            .env("INDEXEDCP_LOG_LEVEL", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start indexedcp");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stdout_lines = Vec::new();
        let url = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("indexedcp {args:?} printed no listening line"));
            stdout_lines.push(line.clone());
            if let Some(url) = line.strip_prefix("Server listening on ") {
                break url.trim().to_owned();
            }
        };
        // Collect the lines printed right after (the generated key) without blocking.
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            stdout_lines.push(line);
        }
        let server = Server {
            child,
            url,
            output_dir: output_dir.to_owned(),
            args,
            stdout_lines,
        };
        let health = format!("{}/health", server.url);
        eventually(Duration::from_secs(10), "/health", async || {
            let r = reqwest::get(&health).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        server
    }

    pub fn upload_url(&self) -> String {
        format!("{}/upload", self.url)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` and waits (up to `timeout`) for the process to exit.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        signal_and_wait(&mut self.child, signal, timeout)
    }

    /// Restarts the process with the same arguments (on a new port).
    pub async fn restart(&mut self) {
        self.kill();
        *self = Server::spawn(self.args.clone(), &self.output_dir).await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn unsafe_kill(pid: u32, signal: i32) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// One chunk of a resumable upload, with every extension header.
pub struct ResumableChunk<'a> {
    pub upload_id: &'a str,
    pub name: &'a str,
    pub file: &'a [u8],
    pub chunk_size: usize,
    pub index: usize,
}

impl ResumableChunk<'_> {
    pub fn count(&self) -> usize {
        self.file.len().div_ceil(self.chunk_size).max(1)
    }

    pub fn body(&self) -> &[u8] {
        let start = (self.index * self.chunk_size).min(self.file.len());
        let end = (start + self.chunk_size).min(self.file.len());
        &self.file[start..end]
    }

    pub fn request(&self, client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
        self.request_with(client, url, &[])
    }

    /// The request without `X-File-Sha256`, as a client sends the chunks of
    /// a file it is still reading to a receiver that announced streaming.
    pub fn request_without_file_hash(
        &self,
        client: &reqwest::Client,
        url: &str,
    ) -> reqwest::RequestBuilder {
        let mut request = self.request(client, url).build().unwrap();
        request.headers_mut().remove("x-file-sha256");
        reqwest::RequestBuilder::from_parts(client.clone(), request)
    }

    /// The request with the chunk checked by `X-Chunk-Crc32c` instead of
    /// `X-Chunk-Sha256`, as the agent sends it to a receiver that announced
    /// CRC-32C checks.
    pub fn request_crc32c(&self, client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
        let crc = format!("{:08x}", crc32c::crc32c(self.body()));
        let mut request = self
            .request_with(client, url, &[("X-Chunk-Crc32c", crc)])
            .build()
            .unwrap();
        request.headers_mut().remove("x-chunk-sha256");
        reqwest::RequestBuilder::from_parts(client.clone(), request)
    }

    /// The request with some headers replaced by `overrides`.
    pub fn request_with(
        &self,
        client: &reqwest::Client,
        url: &str,
        overrides: &[(&str, String)],
    ) -> reqwest::RequestBuilder {
        use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
        let body = self.body();
        let mut headers = HeaderMap::new();
        let offset = (self.index * self.chunk_size).min(self.file.len());
        let defaults = [
            ("X-File-Name", self.name.to_string()),
            ("X-Chunk-Index", self.index.to_string()),
            ("X-Upload-Id", self.upload_id.to_string()),
            ("X-Chunk-Offset", offset.to_string()),
            ("X-Chunk-Sha256", sha256_hex(body)),
            ("X-File-Size", self.file.len().to_string()),
            ("X-Chunk-Count", self.count().to_string()),
            ("X-File-Sha256", sha256_hex(self.file)),
        ];
        for (name, value) in defaults.iter().chain(overrides) {
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        client
            .post(url)
            .bearer_auth(KEY)
            .headers(headers)
            .body(body.to_vec())
    }
}

/// Sends one v1 chunk (no extension headers).
pub async fn post_v1(
    client: &reqwest::Client,
    url: &str,
    name: &str,
    index: usize,
    body: &[u8],
) -> reqwest::Response {
    client
        .post(url)
        .bearer_auth(KEY)
        .header("X-File-Name", name)
        .header("X-Chunk-Index", index.to_string())
        .body(body.to_vec())
        .send()
        .await
        .expect("send v1 chunk")
}

pub async fn json(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("not JSON (status {status}): {text:?}"));
    (status, value)
}

/// Sends a raw HTTP/1.1 request (any bytes in the header values) and returns the
/// status and body. `Connection: close` is added.
pub fn raw_request(url: &str, head: &[u8], body: &[u8]) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = Vec::new();
    request.extend_from_slice(head);
    request.extend_from_slice(
        format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    request.extend_from_slice(body);
    stream.write_all(&request).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(response.len());
    (status, response[split..].to_vec())
}

/// A raw `POST /upload` whose `X-File-Name` is exactly `name`'s bytes; with
/// `upload_id`, the resumable headers for a one-chunk file are added.
pub fn raw_upload(
    url: &str,
    name: &[u8],
    body: &[u8],
    upload_id: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut head = Vec::new();
    head.extend_from_slice(b"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    head.extend_from_slice(
        format!("Authorization: Bearer {KEY}\r\nX-Chunk-Index: 0\r\n").as_bytes(),
    );
    head.extend_from_slice(b"X-File-Name: ");
    head.extend_from_slice(name);
    head.extend_from_slice(b"\r\n");
    if let Some(id) = upload_id {
        let sha = sha256_hex(body);
        head.extend_from_slice(
            format!(
                "X-Upload-Id: {id}\r\nX-Chunk-Offset: 0\r\nX-Chunk-Sha256: {sha}\r\nX-File-Size: {}\r\nX-Chunk-Count: 1\r\nX-File-Sha256: {sha}\r\n",
                body.len()
            )
            .as_bytes(),
        );
    }
    let (status, body) = raw_request(url, &head, body);
    let value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, value)
}

/// A running `indexedcp daemon` with the agent role only (no stdout handshake).
pub struct Daemon {
    pub child: Child,
    pub config: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path) -> Daemon {
        Daemon::start_with_env(config, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let child = indexedcp()
            .args(["daemon", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env("INDEXEDCP_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start indexedcp daemon");
        Daemon {
            child,
            config: config.to_owned(),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.kill();
        *self = Daemon::start(&self.config);
    }

    /// Sends `signal` and waits (up to `timeout`) for the process to exit.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> ExitStatus {
        signal_and_wait(&mut self.child, signal, timeout)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent config: one target at `url`, one spool at `spool`, state in `state`,
/// plus `extra_spool` and `extra_target` lines appended to those sections.
pub fn agent_config(
    dir: &Path,
    url: &str,
    spool: &Path,
    extra_spool: &str,
    extra_target: &str,
) -> PathBuf {
    let path = dir.join("agent.toml");
    let retry = if extra_target.contains("retry_delay") {
        ""
    } else {
        "initial_retry_delay = \"100ms\"\nmax_retry_delay = \"1s\"\n"
    };
    let text = format!(
        "[daemon]\nstate_dir = {state:?}\ncheck_interval = \"500ms\"\n\n\
         [[target]]\nname = \"central\"\nurl = {url:?}\napi_key = \"{KEY}\"\n{retry}{extra_target}\n\n\
         [[spool]]\npath = {spool:?}\ntarget = \"central\"\nsettle = \"300ms\"\n{extra_spool}\n",
        state = dir.join("state").display().to_string(),
        spool = spool.display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Writes `content` to `spool/rel` the recommended way: elsewhere, then rename.
pub fn drop_file(staging: &Path, spool: &Path, rel: &str, content: &[u8]) {
    let tmp = staging.join(format!("tmp-{}", sha256_hex(rel.as_bytes())));
    std::fs::write(&tmp, content).unwrap();
    let dest = spool.join(rel);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::rename(&tmp, &dest).unwrap();
}

/// Waits until `output` holds exactly `expected` (path -> bytes), with a deadline.
pub async fn wait_for_files(
    output: &Path,
    expected: &BTreeMap<String, Vec<u8>>,
    timeout: Duration,
) {
    let arrived = poll_every(Duration::from_millis(50), timeout, async || {
        (visible_files(output) == *expected).then_some(())
    })
    .await;
    if arrived.is_none() {
        let diff = tree_diff(expected, &visible_files(output));
        panic!("after {timeout:?}: {diff}");
    }
}

/// A temp dir with the paths an agent test uses: the receiver's output, the
/// spool, and a staging folder (created) to write files in before renaming
/// them into the spool.
pub fn agent_dirs() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (out, spool, staging) = (
        dir.path().join("out"),
        dir.path().join("spool"),
        dir.path().join("staging"),
    );
    std::fs::create_dir_all(&staging).unwrap();
    (dir, out, spool, staging)
}

/// Sends `signal` to `child` and waits (up to `timeout`) for its exit status.
pub fn signal_and_wait(child: &mut Child, signal: i32, timeout: Duration) -> ExitStatus {
    unsafe_kill(child.id(), signal);
    let what = format!("process {} to exit after signal {signal}", child.id());
    wait_until(&what, Duration::from_millis(20), timeout, || {
        Ok(child.try_wait()?.is_some())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    child.wait().unwrap()
}

/// The agent's buffer as `indexedcp status --json --config CONFIG` lists it
/// (empty when the command printed nothing readable).
pub fn status_json(config: &Path) -> Vec<serde_json::Value> {
    let output = indexedcp()
        .args(["status", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout).unwrap_or_default()
}
