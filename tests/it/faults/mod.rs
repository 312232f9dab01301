//! The fault-injection suite: every test here tries to break one of the
//! delivery promises (exactly once, byte-identical, never a partial file, the
//! source kept until its buffered copy is durable) and prints its figure.
//!
//! Each scenario drives the real binary: agents and receivers are started as
//! processes whose logs go to files in the scenario's temporary directory (a
//! thousand retry warnings would drown the test output), and a failing scenario
//! keeps that directory and prints where it is, with the tail of each log.
//! Random choices come from a seeded generator: the seed is printed, and
//! `INDEXEDCP_FAULT_SEED` replays a run. `INDEXEDCP_LONG_FAULTS=1` runs the long
//! versions (more kills, files and requests); `INDEXEDCP_FAULTS_KEEP=1` keeps
//! every scenario's directory (logs, straces) even when it passes.
//!
//! - `manifest`: lost / duplicated / corrupted / unexpected counts and SQLite
//!   integrity checks, plus a watcher that catches partial files while a
//!   scenario runs;
//! - `proxy`: an HTTP/1.1-aware fault proxy between agent and receiver;
//! - the scenarios, one module each; the crash at every failpoint and the
//!   receiver's overload answers are tested in `failpoints` and `outage`.

mod manifest;
pub mod proxy;

mod fsync_order;
pub(crate) mod full_disk;
mod hostile_spool;
mod kill_agent;
mod kill_receiver;
mod proxy_faults;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::fixtures::KEY;
pub use crate::support::{Rng, files_below, free_port};
use crate::support::{indexedcp, poll_every, pseudo_random};

/// Whether the long runs were asked for (`INDEXEDCP_LONG_FAULTS=1`).
pub fn long_run() -> bool {
    std::env::var("INDEXEDCP_LONG_FAULTS").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The seed of a scenario: `INDEXEDCP_FAULT_SEED` when set, else `default`.
pub fn seed(default: u64) -> u64 {
    std::env::var("INDEXEDCP_FAULT_SEED")
        .ok()
        .and_then(|s| {
            let s = s.trim();
            s.strip_prefix("0x")
                .map_or_else(|| s.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
        })
        .unwrap_or(default)
}

/// A scenario's directories: `out` (receiver output), `spool`, `staging` (where
/// files are written before being renamed into the spool), `state` (the agent's
/// state_dir) and `logs`. Kept, with its path printed, when the test fails.
pub struct Fixture {
    dir: Option<tempfile::TempDir>,
    pub root: PathBuf,
    pub out: PathBuf,
    pub spool: PathBuf,
    pub staging: PathBuf,
    pub state: PathBuf,
    pub logs: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let fixture = Fixture {
            out: root.join("out"),
            spool: root.join("spool"),
            staging: root.join("staging"),
            state: root.join("state"),
            logs: root.join("logs"),
            root,
            dir: Some(dir),
        };
        for d in [&fixture.spool, &fixture.staging, &fixture.logs] {
            std::fs::create_dir_all(d).unwrap();
        }
        fixture
    }

    /// The agent's buffer database.
    pub fn buffer_db(&self) -> PathBuf {
        self.state.join("buffer.db")
    }

    /// The receiver's state database (default state directory).
    pub fn uploads_db(&self) -> PathBuf {
        self.out.join(".indexedcp/uploads.db")
    }

    /// The last `n` lines of every log, for failure messages.
    pub fn log_tails(&self, n: usize) -> String {
        let mut text = String::new();
        let Ok(entries) = std::fs::read_dir(&self.logs) else {
            return text;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let content = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            text.push_str(&format!(
                "--- {} (last {} of {} lines)\n",
                path.display(),
                n.min(lines.len()),
                lines.len()
            ));
            for line in &lines[lines.len().saturating_sub(n)..] {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// How many lines of the logs whose file name starts with `prefix` contain `needle`.
    pub fn log_count(&self, prefix: &str, needle: &str) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.logs) else {
            return 0;
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let asked = std::env::var_os("INDEXEDCP_FAULTS_KEEP").is_some();
        if (std::thread::panicking() || asked)
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            if asked && !std::thread::panicking() {
                eprintln!("faults: directory kept at {}", kept.display());
            } else {
                eprintln!(
                    "faults: scenario failed; its directory (logs, spool, output, state) is kept at {}\n{}",
                    kept.display(),
                    self.log_tails(25)
                );
            }
        }
    }
}

/// Starts `indexedcp args` with stderr appended to `log` (and stdout to
/// `stdout`, if given, else the null device).
fn spawn_logged(args: &[OsString], log: &Path, stdout: Option<Stdio>, level: &str) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    indexedcp()
        .args(args)
        .env("INDEXEDCP_LOG_LEVEL", level)
        .stdout(stdout.unwrap_or_else(Stdio::null))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", crate::support::BIN))
}

/// An `indexedcp daemon` running the agent role, logging to `logs/agent.log`.
pub struct AgentProc {
    child: Child,
    config: PathBuf,
    log: PathBuf,
    level: String,
    pub starts: u32,
}

impl AgentProc {
    pub fn start(fx: &Fixture, config: &Path) -> AgentProc {
        Self::start_with_level(fx, config, "info")
    }

    /// Starts the agent with `INDEXEDCP_LOG_LEVEL=level`.
    pub fn start_with_level(fx: &Fixture, config: &Path, level: &str) -> AgentProc {
        let log = fx.logs.join("agent.log");
        let child = Self::spawn(config, &log, level);
        AgentProc {
            child,
            config: config.to_owned(),
            log,
            level: level.to_owned(),
            starts: 1,
        }
    }

    fn spawn(config: &Path, log: &Path, level: &str) -> Child {
        let args = vec![
            OsString::from("daemon"),
            "--config".into(),
            config.as_os_str().to_owned(),
        ];
        spawn_logged(&args, log, None, level)
    }

    /// SIGKILL, then wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.config, &self.log, &self.level);
        self.starts += 1;
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An `indexedcp server` on a fixed port (so that it can be killed and restarted
/// where the agent expects it), logging to `logs/receiver.log`.
pub struct ReceiverProc {
    child: Child,
    args: Vec<OsString>,
    log: PathBuf,
    pub port: u16,
    pub starts: u32,
}

impl ReceiverProc {
    /// Starts `indexedcp server --port PORT --output-dir OUT -k KEY
    /// --path-mode allow-paths` plus `extra`, and waits until it answers.
    pub async fn start(fx: &Fixture, port: u16, extra: &[&str]) -> ReceiverProc {
        Self::start_on(fx, &fx.out, port, extra).await
    }

    pub async fn start_on(fx: &Fixture, out: &Path, port: u16, extra: &[&str]) -> ReceiverProc {
        let mut args: Vec<OsString> = vec![
            "server".into(),
            "--port".into(),
            port.to_string().into(),
            "--output-dir".into(),
            out.as_os_str().to_owned(),
            "-k".into(),
            KEY.into(),
            "--path-mode".into(),
            "allow-paths".into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        let log = fx.logs.join("receiver.log");
        let child = Self::spawn_ready(&args, &log, port).await;
        ReceiverProc {
            child,
            args,
            log,
            port,
            starts: 1,
        }
    }

    async fn spawn_ready(args: &[OsString], log: &Path, port: u16) -> Child {
        let mut child = spawn_logged(args, log, Some(Stdio::piped()), "debug");
        let stdout = child.stdout.take().unwrap();
        // Drain stdout so the receiver never blocks on a full pipe.
        std::thread::spawn(move || for _ in BufReader::new(stdout).lines() {});
        let health = format!("http://127.0.0.1:{port}/health");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let ready = poll_every(
            Duration::from_millis(10),
            Duration::from_secs(30),
            async || {
                if let Ok(r) = client.get(&health).send().await
                    && r.status().is_success()
                {
                    return Some(());
                }
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "the receiver exited with {status} while starting; see {}",
                        log.display()
                    );
                }
                None
            },
        )
        .await;
        assert!(
            ready.is_some(),
            "the receiver did not answer /health within 30 s"
        );
        child
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn upload_url(&self) -> String {
        format!("{}/upload", self.url())
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILL, then start again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn_ready(&self.args, &self.log, self.port).await;
        self.starts += 1;
    }
}

impl Drop for ReceiverProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes an agent config (via `support::agent_config`) with `daemon_extra`
/// lines added to its `[daemon]` section.
pub fn agent_config_with(
    fx: &Fixture,
    url: &str,
    extra_spool: &str,
    extra_target: &str,
    daemon_extra: &str,
) -> PathBuf {
    let path = crate::fixtures::agent_config(&fx.root, url, &fx.spool, extra_spool, extra_target);
    if !daemon_extra.is_empty() {
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("[daemon]\n", &format!("[daemon]\n{daemon_extra}\n"));
        std::fs::write(&path, text).unwrap();
    }
    path
}

/// `n` files, mostly small (0 to 64 KiB, with a few empty ones), some of
/// hundreds of KiB, and `big` files of 1 to 8 MiB; names with sub-directories,
/// spaces and non-ASCII characters. Deterministic for a seed.
pub fn file_set(n: usize, big: usize, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut rng = Rng::new(seed);
    let mut files = BTreeMap::new();
    for i in 0..n {
        let size = if i < big {
            [8 << 20, (4 << 20) + 3, 2 << 20, (1 << 20) + 1][i % 4]
        } else if i % 23 == 0 {
            0
        } else if i % 10 == 0 {
            rng.range(64 << 10, 600 << 10) as usize
        } else {
            rng.below(64 << 10) as usize
        };
        let name = match i % 4 {
            0 => format!("f{i}.bin"),
            1 => format!("dir {}/sub/ünï-{i}.dat", i % 7),
            2 => format!("日本/{i}"),
            _ => format!("plain-{i}"),
        };
        files.insert(name, pseudo_random(size, seed ^ (i as u64 + 1)));
    }
    files
}

/// Counts of the agent's buffer by state: (queued, failed, confirmed). `None`
/// when the database cannot be read (not created yet).
pub fn buffer_counts(db: &Path) -> Option<(u64, u64, u64)> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()?;
    conn.busy_timeout(Duration::from_secs(5)).ok()?;
    conn.query_row(
        "SELECT coalesce(sum(state = 'queued'), 0), coalesce(sum(state = 'failed'), 0), coalesce(sum(state = 'confirmed'), 0) FROM files",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)),
    )
    .ok()
}

/// Waits until the spool is empty, the agent's buffer holds only confirmed files
/// and every source is in the output (the manifest finds none lost): the agent
/// has nothing left to do. Fails at once when the agent parked a file as failed
/// (none of these scenarios gives it a reason to). Returns how long it took.
pub async fn wait_until_drained(
    fx: &Fixture,
    manifest: &manifest::Manifest,
    timeout: Duration,
) -> Duration {
    try_wait_until_drained(fx, manifest, timeout)
        .await
        .unwrap_or_else(|why| panic!("{why}"))
}

/// [`wait_until_drained`], returning what is left at the deadline instead of
/// panicking.
pub async fn try_wait_until_drained(
    fx: &Fixture,
    manifest: &manifest::Manifest,
    timeout: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let db = fx.buffer_db();
    // What was left at the last check, for the message at the deadline.
    let mut left = String::new();
    let outcome = poll_every(Duration::from_millis(100), timeout, async || {
        let spool = files_below(&fx.spool);
        let counts = buffer_counts(&db);
        if let Some((_, failed, _)) = counts
            && failed > 0
        {
            return Some(Err(format!(
                "the agent parked {failed} file(s) as failed: {:?}",
                parked_files(&db)
            )));
        }
        let missing = if spool.is_empty() && counts.is_some_and(|c| c.0 == 0) {
            let missing = manifest.missing(&fx.out);
            if missing.is_empty() {
                return Some(Ok(started.elapsed()));
            }
            missing
        } else {
            Vec::new()
        };
        left = format!(
            "{} file(s) in the spool {:?}, buffer (queued, failed, confirmed) {counts:?}, missing from the output {:?}",
            spool.len(),
            spool.iter().take(10).collect::<Vec<_>>(),
            missing.iter().take(10).collect::<Vec<_>>()
        );
        None
    })
    .await;
    outcome.unwrap_or_else(|| Err(format!("not drained after {timeout:?}: {left}")))
}

/// The agent's parked files with their reasons.
pub fn parked_files(db: &Path) -> Vec<(String, String)> {
    let Ok(conn) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return Vec::new();
    };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    let Ok(mut stmt) =
        conn.prepare("SELECT rel_path, coalesce(failure, '') FROM files WHERE state = 'failed'")
    else {
        return Vec::new();
    };
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// Drops `files` into the spool (written in staging, then renamed) in a random
/// order on a thread, spread over about `period` with random gaps.
pub fn spawn_dropper(
    fx: &Fixture,
    files: &BTreeMap<String, Vec<u8>>,
    period: Duration,
    seed: u64,
) -> std::thread::JoinHandle<()> {
    let mut rng = Rng::new(seed);
    let mut order: Vec<(String, Vec<u8>)> = files.clone().into_iter().collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mean_gap = period / order.len().max(1) as u32;
    let (staging, spool) = (fx.staging.clone(), fx.spool.clone());
    std::thread::spawn(move || {
        for (rel, data) in order {
            crate::fixtures::drop_file(&staging, &spool, &rel, &data);
            std::thread::sleep(mean_gap.mul_f64(rng.below(2001) as f64 / 1000.0));
        }
    })
}
