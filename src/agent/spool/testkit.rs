//! Test helpers shared by the spool's unit tests: a spool in a temporary
//! directory, a running watcher whose candidates can be awaited, and ways to
//! drop files into the spool as writers do.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::watch::EVENT_QUEUE;
use super::{Candidate, SpoolHandle, spawn_with_queue};
use crate::config::{Disposition, SpoolConfig};

pub(super) const SETTLE: Duration = Duration::from_millis(200);
/// Long enough that an offer within a test's deadline cannot come from the
/// settle rule.
pub(super) const NEVER: Duration = Duration::from_secs(3600);
pub(super) const DEADLINE: Duration = Duration::from_secs(5);

pub(super) fn config(root: &Path) -> SpoolConfig {
    SpoolConfig {
        path: root.to_owned(),
        target: "central".to_owned(),
        recursive: true,
        include: vec!["*".to_owned()],
        exclude: Vec::new(),
        settle: SETTLE,
        disposition: Disposition::Keep,
        remote_prefix: String::new(),
    }
}

/// A temporary directory with the spool root and a sibling directory on
/// the same filesystem to write files before renaming them in.
pub(super) struct Dirs {
    pub(super) _temp: TempDir,
    pub(super) root: PathBuf,
    pub(super) outside: PathBuf,
}

pub(super) fn dirs() -> Dirs {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("spool");
    let outside = temp.path().join("outside");
    fs::create_dir(&root).unwrap();
    fs::create_dir(&outside).unwrap();
    Dirs {
        _temp: temp,
        root,
        outside,
    }
}

pub(super) struct Running {
    pub(super) rx: mpsc::Receiver<Candidate>,
    pub(super) handle: SpoolHandle,
    pub(super) task: Option<JoinHandle<()>>,
    pub(super) shutdown: CancellationToken,
    pub(super) started: Instant,
}

pub(super) fn start(spool: SpoolConfig) -> Running {
    start_with_queue(spool, EVENT_QUEUE)
}

pub(super) fn start_with_queue(spool: SpoolConfig, event_queue: usize) -> Running {
    let (tx, rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let (handle, task) = spawn_with_queue(spool, tx, shutdown.clone(), event_queue).unwrap();
    Running {
        rx,
        handle,
        task: Some(task),
        shutdown,
        started,
    }
}

impl Running {
    pub(super) async fn next(&mut self) -> Candidate {
        tokio::time::timeout(DEADLINE, self.rx.recv())
            .await
            .expect("no candidate before the deadline")
            .expect("the watcher stopped")
    }

    /// The next `n` candidates by relative path; each path at most once.
    pub(super) async fn collect(&mut self, n: usize) -> BTreeMap<String, Candidate> {
        let mut found = BTreeMap::new();
        while found.len() < n {
            let candidate = self.next().await;
            let relative = candidate.relative.clone();
            assert!(
                found.insert(relative.clone(), candidate).is_none(),
                "{relative} offered twice"
            );
        }
        found
    }

    /// Asserts that nothing is offered within `window`: absence cannot be
    /// polled for, so this bounds the wait instead.
    pub(super) async fn assert_quiet(&mut self, window: Duration) {
        if let Ok(Some(candidate)) = tokio::time::timeout(window, self.rx.recv()).await {
            panic!("unexpected candidate {candidate:?}");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(super) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen before the deadline"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(super) fn write_old(path: &Path, content: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut file = File::create(path).unwrap();
    file.write_all(content).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
}

/// Writes `name` outside the spool, then renames it in: the recommended way
/// to drop a file.
pub(super) fn drop_in(dirs: &Dirs, relative: &str, content: &[u8]) -> PathBuf {
    let staged = dirs.outside.join(relative.replace('/', "_"));
    fs::write(&staged, content).unwrap();
    let target = dirs.root.join(relative);
    fs::rename(&staged, &target).unwrap();
    target
}

pub(super) fn make_fifo(path: &Path) {
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        path,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
}

pub(super) fn non_utf8_name() -> &'static OsStr {
    OsStr::from_bytes(b"bad\xffname.dat")
}
