//! The harness shared by the integration tests (`tests/it`, where it is
//! `crate::support`) and the benches (`benches/`, included with `#[path]`):
//! starting the real `indexedcp` binary with an environment that cannot leak
//! in from the shell, free ports on 127.0.0.1, the one seeded pseudo-random
//! generator, polling with a deadline instead of fixed sleeps, and listing a
//! directory tree. Fixtures that only the tests need (a receiver waited for on
//! its stdout, resumable-upload requests, agent configs) live in
//! `tests/it/fixtures.rs`; the benches' process handling (sd_notify, logs in
//! files) stays in the bench.

use std::collections::BTreeMap;
use std::fs::FileType;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The binary under test. Cargo sets `CARGO_BIN_EXE_<name>` for integration
/// tests and benches alike, so both find it the same way.
pub const BIN: &str = env!("CARGO_BIN_EXE_indexedcp");

/// Variables the binary reads that a developer's shell (or a CI job running
/// under systemd) may have set: each would change what the process under test
/// does, so none is inherited. A caller that wants one sets it after
/// [`indexedcp`] returns.
const INHERITED_ENV: [&str; 9] = [
    "INDEXEDCP_API_KEY",
    "INDEXEDCP_CONFIG",
    "INDEXEDCP_LOG_LEVEL",
    "INDEXEDCP_FAILPOINTS",
    "JOURNAL_STREAM",
    "INVOCATION_ID",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// A command running [`BIN`] without any of the variables above.
pub fn indexedcp() -> Command {
    let mut command = Command::new(BIN);
    clear_inherited_env(&mut command);
    command
}

/// Removes the variables above from `command`, for a program that runs the
/// binary in turn (strace, a shell).
pub fn clear_inherited_env(command: &mut Command) -> &mut Command {
    for name in INHERITED_ENV {
        command.env_remove(name);
    }
    command
}

/// A port on 127.0.0.1 that nothing listens on when this returns (a process
/// is started on it, or, for an agent whose receiver is down, nothing ever is).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("cannot bind 127.0.0.1:0")
        .port()
}

/// The one deterministic generator (splitmix64): the same seed gives the same
/// bytes and the same fault choices, so a failure can be replayed from the seed
/// it printed; its output does not compress, so nothing downstream of a bench
/// can take a shortcut, and it fills gigabytes per second.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    /// Fills `buf` with the next bytes of the stream, eight per step.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.fill(&mut buf);
        buf
    }
}

/// `len` pseudo-random bytes for `seed`, so a failing test reproduces.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    Rng::new(seed).bytes(len)
}

/// Checks `check` every `interval` until it returns `Some`; `None` once
/// `timeout` has passed without it.
pub async fn poll_every<T>(
    interval: Duration,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(interval).await;
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    check: impl AsyncFnMut() -> Option<T>,
) -> T {
    poll_every(Duration::from_millis(20), timeout, check)
        .await
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}

/// The blocking form, for code without a runtime: checks `done` every
/// `interval` until it holds and returns when it first did, or fails once
/// `timeout` has passed (or when `done` fails). Says on stderr every minute
/// that it is still waiting, since a bench may wait for a long time.
pub fn wait_until(
    what: &str,
    interval: Duration,
    timeout: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Instant> {
    let started = Instant::now();
    let mut next_note = started + Duration::from_secs(60);
    loop {
        if done()? {
            return Ok(Instant::now());
        }
        let now = Instant::now();
        anyhow::ensure!(
            now < started + timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        if now >= next_note {
            eprintln!(
                "  still waiting for {what} after {:.0} s",
                (now - started).as_secs_f64()
            );
            next_note += Duration::from_secs(60);
        }
        std::thread::sleep(interval);
    }
}

/// One entry found by [`walk`].
pub struct Entry {
    /// The path relative to the walked root.
    pub rel: String,
    pub path: PathBuf,
    /// Not followed: a symlink is a symlink, whatever it points to.
    pub kind: FileType,
}

/// Everything below `root`, depth first, each directory's entries by name,
/// without opening any file (a spool may hold FIFOs, which would block a
/// reader). Entries that vanish while a daemon works on the tree are skipped.
pub fn walk(root: &Path) -> Vec<Entry> {
    fn visit(root: &Path, dir: &Path, out: &mut Vec<Entry>) {
        let Ok(read) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = read.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push(Entry {
                rel,
                path: path.clone(),
                kind,
            });
            if kind.is_dir() {
                visit(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    visit(root, root, &mut out);
    out
}

/// Every file, directory and symlink below `root`, relative, with file contents;
/// directories map to `None`, symlinks to their target prefixed with `-> `.
pub fn tree(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    walk(root)
        .into_iter()
        .filter_map(|entry| {
            let content = if entry.kind.is_symlink() {
                let target = std::fs::read_link(&entry.path).ok()?;
                Some(format!("-> {}", target.display()).into_bytes())
            } else if entry.kind.is_dir() {
                None
            } else {
                Some(std::fs::read(&entry.path).ok()?)
            };
            Some((entry.rel, content))
        })
        .collect()
}

/// Whether `rel` is the receiver's own `.indexedcp` state directory or inside it.
pub fn is_receiver_state(rel: &str) -> bool {
    rel == ".indexedcp" || rel.starts_with(".indexedcp/")
}

/// The files a user sees in an output directory: everything except the
/// receiver's own `.indexedcp` state directory.
pub fn visible_files(output_dir: &Path) -> BTreeMap<String, Vec<u8>> {
    tree(output_dir)
        .into_iter()
        .filter(|(rel, _)| !is_receiver_state(rel))
        .filter_map(|(rel, content)| content.map(|c| (rel, c)))
        .collect()
}

/// Every regular file below `dir` (relative paths, sorted), without opening any.
pub fn files_below(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = walk(dir)
        .into_iter()
        .filter(|entry| entry.kind.is_file())
        .map(|entry| entry.rel)
        .collect();
    files.sort();
    files
}

/// The length of the largest file directly in `dir` (0 if none, or no
/// `dir`): how far a receiver's staging folder got with an upload.
pub fn largest_file_len(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// How `got` differs from `expected` (at most ten names of each kind), for a
/// failure message; empty when they are equal.
pub fn tree_diff(expected: &BTreeMap<String, Vec<u8>>, got: &BTreeMap<String, Vec<u8>>) -> String {
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(10)
        .collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .take(10)
        .collect();
    let differ: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .map(|(k, _)| k)
        .take(10)
        .collect();
    if missing.is_empty() && extra.is_empty() && differ.is_empty() {
        return String::new();
    }
    format!(
        "{} of {} files; missing {missing:?}, unexpected {extra:?}, different {differ:?}",
        got.len(),
        expected.len()
    )
}

/// Whether `program` is on the `PATH` (as `sh -c 'command -v program'` finds
/// it).
pub fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The one place a test decides what to do when a tool it runs is missing:
/// `true` when `present`; otherwise, under `CI=true` (where `.ci/run` has
/// installed every such tool) a failure naming `what` and how to install
/// it, and on a developer's machine `false` after saying on stderr, past the
/// harness's output capture, that the test is skipped and why.
#[track_caller]
pub fn require(present: bool, what: &str, hint: &str) -> bool {
    if present {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} is not installed ({hint}); .ci/run installs it, and under CI=true a test \
         never skips for a missing tool"
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {what} is not installed ({hint}; .ci/run installs it)"
    );
    false
}

/// [`require`] for a program looked up on the `PATH`.
#[track_caller]
pub fn require_tool(program: &str, hint: &str) -> bool {
    require(on_path(program), program, hint)
}
