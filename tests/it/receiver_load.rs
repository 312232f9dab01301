//! The receiver under load from outside: slow uploads by the hundred, more
//! connections than it serves at once, a process out of descriptors. Each
//! test runs the real binary with its log in a file, and checks that a normal
//! upload still gets through within a deadline, with bounded threads,
//! descriptors and log lines. `LoggedServer` is shared with the other
//! receiver tests that read the log.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::fixtures::*;
use crate::support::*;

/// `indexedcp server` with its log (stderr) in a file.
pub struct LoggedServer {
    pub child: Child,
    pub url: String,
    pub log: PathBuf,
    pub args: Vec<String>,
    pub output_dir: PathBuf,
    nofile: Option<u64>,
}

impl LoggedServer {
    /// Starts `indexedcp server` on a free port with `extra` arguments; with
    /// `nofile`, its descriptor limit (soft and hard) is set to that first.
    pub async fn start(dir: &Path, extra: &[&str], nofile: Option<u64>) -> LoggedServer {
        let output_dir = dir.join("out");
        let mut args: Vec<String> = vec![
            "server".into(),
            "--port".into(),
            "0".into(),
            "-k".into(),
            KEY.into(),
            "--output-dir".into(),
            output_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(dir.join("receiver.log"), args, output_dir, nofile).await
    }

    async fn spawn(
        log: PathBuf,
        args: Vec<String>,
        output_dir: PathBuf,
        nofile: Option<u64>,
    ) -> LoggedServer {
        let mut command = indexedcp();
        command
            .args(&args)
            .env("INDEXEDCP_LOG_LEVEL", "info")
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            );
        if let Some(limit) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                command.pre_exec(move || {
                    let l = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("start indexedcp server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("Server listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("indexedcp {args:?} printed no listening line"));
        let health = format!("{url}/health");
        eventually(Duration::from_secs(10), "/health", async || {
            let r = reqwest::get(&health).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        LoggedServer {
            child,
            url,
            log,
            args,
            output_dir,
            nofile,
        }
    }

    /// SIGKILLs the process and starts it again with the same arguments (on a
    /// new port), appending to the same log.
    pub async fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let next = Self::spawn(
            self.log.clone(),
            self.args.clone(),
            self.output_dir.clone(),
            self.nofile,
        )
        .await;
        *self = next;
    }

    pub fn upload_url(&self) -> String {
        format!("{}/upload", self.url)
    }

    pub fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_owned()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.output_dir.join(".indexedcp").join("staging")
    }

    /// A field of /proc/PID/status, such as `Threads`.
    pub fn proc_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The process's open sockets.
    pub fn sockets(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("socket:"))
            .count()
    }
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this test process's soft descriptor limit (children inherit it) to
/// `wanted`, failing clearly when the hard limit does not allow it.
fn allow_descriptors(wanted: u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain calls on a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        assert!(
            l.rlim_max >= wanted,
            "this test needs {wanted} open descriptors; the hard limit is {} (raise it with ulimit -Hn)",
            l.rlim_max
        );
        if l.rlim_cur < wanted {
            l.rlim_cur = wanted;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
        }
    }
}

/// A v1 upload of a fresh file, retried until `deadline`: the file's bytes
/// must arrive identical.
async fn normal_upload_within(server: &LoggedServer, name: &str, deadline: Duration) -> Duration {
    let body = pseudo_random(256 << 10, 7);
    let client = reqwest::Client::builder()
        .timeout(deadline)
        .build()
        .unwrap();
    let started = Instant::now();
    let url = server.upload_url();
    let status = poll_every(Duration::from_millis(200), deadline, async || {
        let left = deadline.checked_sub(started.elapsed())?;
        let response = client
            .post(&url)
            .bearer_auth(KEY)
            .header("X-File-Name", name)
            .timeout(left)
            .body(body.clone())
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(200)
    })
    .await;
    assert_eq!(
        status,
        Some(200),
        "a normal upload did not succeed within {deadline:?}; log:\n{}",
        tail(&server.log_text())
    );
    assert_eq!(
        std::fs::read(server.output_dir.join(name)).unwrap(),
        body,
        "{name} arrived with other bytes"
    );
    started.elapsed()
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn staged_v1_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("v1-"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_slow_uploads_hold_no_thread_and_a_normal_upload_gets_through() {
    const SLOW: usize = 600;
    allow_descriptors(4 * SLOW as u64);
    let dir = tempfile::tempdir().unwrap();
    let server = LoggedServer::start(dir.path(), &["--max-connections", "1000"], None).await;

    // Each slow client sends its headers and a body of 1,000 bytes two bytes
    // at a time, one step a second: far within the read timeout (30 s).
    let mut slow = Vec::with_capacity(SLOW);
    for i in 0..SLOW {
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: receiver\r\nAuthorization: Bearer {KEY}\r\nX-File-Name: slow-{i}.bin\r\nX-Chunk-Index: 0\r\nContent-Length: 1000\r\n\r\nab"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        slow.push(stream);
    }
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            for stream in &mut slow {
                if stream.write_all(b"cd").await.is_err() {
                    return;
                }
            }
        }
    });
    // Every slow upload is being received (its chunk 0 has its staging file).
    let staging = server.staging_dir();
    let all_in = poll_every(
        Duration::from_millis(100),
        Duration::from_secs(30),
        async || (staged_v1_files(&staging) == SLOW).then_some(()),
    )
    .await;

    let took = normal_upload_within(&server, "normal.bin", Duration::from_secs(15)).await;
    let threads = server.proc_status("Threads");
    eprintln!("normal upload beside {SLOW} slow ones: {took:?}; receiver threads: {threads}");
    assert!(
        all_in.is_some(),
        "only {} of {SLOW} slow uploads were being received",
        staged_v1_files(&staging)
    );
    // Executor threads, the writers (32), short blocking calls (64) and a few
    // of the runtime's own: far below one per upload.
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    let bound = cores + 32 + 64 + 16;
    assert!(
        threads <= bound,
        "the receiver runs {threads} threads for {SLOW} slow uploads (bound {bound})"
    );

    // The slow clients give up: their chunks are refused and their staging
    // files removed.
    trickle.abort();
    let _ = trickle.await;
    eventually(
        Duration::from_secs(30),
        "the staging files of the abandoned uploads to be removed",
        async || (staged_v1_files(&staging) == 0).then_some(()),
    )
    .await;
    assert!(
        !server.output_dir.join("slow-0.bin").exists(),
        "an abandoned chunk 0 reached the output directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_and_a_normal_upload_gets_through() {
    const MAX: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let server = LoggedServer::start(
        dir.path(),
        &[
            "--max-connections",
            &MAX.to_string(),
            "--read-timeout",
            "2s",
        ],
        None,
    )
    .await;
    let sockets_before = server.sockets();
    // Keyless clients that connect and send nothing.
    let mut idle = Vec::new();
    for _ in 0..MAX + 30 {
        idle.push(TcpStream::connect(server.addr()).await.unwrap());
    }
    // Those beyond the cap wait in the backlog: the receiver holds at most
    // MAX of them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = server.sockets() - sockets_before;
    assert!(
        held <= MAX,
        "the receiver holds {held} connections with max_connections {MAX}"
    );
    // They time out in turn, and the upload gets its slot.
    let took = normal_upload_within(&server, "after-idle.bin", Duration::from_secs(30)).await;
    eprintln!(
        "normal upload behind {} idle connections: {took:?}",
        idle.len()
    );
    assert!(
        server
            .log_text()
            .matches("accepting a connection failed")
            .count()
            == 0,
        "accept failures with descriptors to spare:\n{}",
        tail(&server.log_text())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_logged_once_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    // 96 descriptors for a receiver that would serve 400 connections: it says
    // it cannot raise the limit, and runs out when flooded.
    let server = LoggedServer::start(
        dir.path(),
        &["--max-connections", "400", "--read-timeout", "2s"],
        Some(96),
    )
    .await;
    assert!(
        server.log_text().contains("open-descriptor limit is below"),
        "no warning about the descriptor limit:\n{}",
        server.log_text()
    );
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..250 {
        idle.push(TcpStream::connect(server.addr()).await.unwrap());
    }
    eventually(Duration::from_secs(10), "an accept failure", async || {
        server
            .log_text()
            .contains("accepting a connection failed")
            .then_some(())
    })
    .await;
    normal_upload_within(&server, "after-flood.bin", Duration::from_secs(60)).await;
    let warnings = server
        .log_text()
        .matches("accepting a connection failed")
        .count();
    // One at once, then at most one per 10 s.
    let allowed = 2 + started.elapsed().as_secs() as usize / 10;
    assert!(
        warnings <= allowed,
        "{warnings} accept warnings in {:?} (at most {allowed}):\n{}",
        started.elapsed(),
        tail(&server.log_text())
    );
    drop(idle);
}
