//! The spool watcher: finds the files in a spool directory that are complete and
//! offers them to ingest.
//!
//! It owns the notify (inotify) events, the full scans (at start-up, after the
//! event queue overflowed or the watcher failed, and on request) and the settle
//! rule. A file is complete when it was renamed or moved into the spool, closed
//! after writing, or left unchanged in size and mtime for the spool's `settle`
//! period. The watcher never opens a file and never touches SQLite or HTTP: it
//! only emits [`Candidate`]s, and the consumer decides by [`SourceIdentity`]
//! whether a candidate is new. Offering a file twice is therefore harmless, while
//! missing one is not, so every doubt (overflow, watcher error, new directory)
//! is resolved by scanning again.
//!
//! A name with a control character (a newline, a tab, an ESC...) is never
//! offered: every receiver refuses it, and buffering it would delete the only
//! other copy. The file stays in the spool with one warning that shows the
//! name escaped ([`escape_name`]); renaming it sends it. The watcher also
//! watches its spool again when the path comes to name another directory (a
//! file system mounted over it, or a directory put in its place).
//!
//! This module holds the public types and the watcher task's state and main
//! loop; the task's jobs live in submodules: `watch` turns notify events into
//! state changes, `scan` walks the spool, `settle` decides when a changing
//! file is complete, `filter` decides which names count, and `identity` says
//! what makes one version of a file.

mod filter;
mod identity;
mod scan;
mod settle;
mod watch;

#[cfg(test)]
mod testkit;

pub use identity::SourceIdentity;

use std::borrow::Cow;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, FileType};
use std::io;
use std::ops::ControlFlow;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use notify::{Event, RecommendedWatcher, RecursiveMode};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::SpoolConfig;
use filter::Filter;
use scan::{SAFETY_SCAN_PERIOD, ScanItem, ScanRequest, next_scan_item};
use settle::{Look, Pending, sleep_until_some, tick_period};
use watch::{EVENT_QUEUE, RootLost, start_watcher, watch_hint};

/// A regular file in a spool that is complete and ready to ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The spool root exactly as configured ([`SpoolConfig::path`]).
    pub spool: PathBuf,
    /// The spool root joined with `relative`.
    pub path: PathBuf,
    /// The path relative to the spool root, `/`-separated.
    pub relative: String,
    /// The file as it was when it was found complete.
    pub identity: SourceIdentity,
}

/// Why a spool could not be watched; only returned at start.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error(
        "cannot create spool directory {}: {source}; create it or fix the permissions of its parent",
        path.display()
    )]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch spool directory {}: {source}; {hint}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
        hint: &'static str,
    },
    #[error("invalid pattern {pattern:?} for spool {}: {source}; fix the pattern", spool.display())]
    Pattern {
        spool: PathBuf,
        pattern: String,
        #[source]
        source: globset::Error,
    },
}

/// Handle to a running watcher task.
#[derive(Debug, Clone)]
pub struct SpoolHandle {
    rescan: Arc<Notify>,
    reoffer: mpsc::UnboundedSender<String>,
}

impl SpoolHandle {
    /// Asks for a full scan that offers every complete file again, including
    /// those offered before (for instance after a failed ingest, or when buffer
    /// space frees up). Requests made while a scan is queued are merged.
    pub fn rescan(&self) {
        self.rescan.notify_one();
    }

    /// Asks for the file at `relative` to be offered again if it is still
    /// there and complete, although it was offered before unchanged: its
    /// ingest failed and is to be tried again.
    pub fn reoffer(&self, relative: String) {
        // Only fails when the watcher stopped, which its task reports.
        let _ = self.reoffer.send(relative);
    }
}

/// `name` fit for a log line or a terminal: control characters (a newline
/// that would forge a log line, an ESC that would drive the terminal) are
/// escaped the way Rust escapes strings (`\n`, `\u{1b}`); every other
/// character, non-ASCII letters included, is kept as it is.
pub fn escape_name(name: &str) -> Cow<'_, str> {
    if !name.chars().any(char::is_control) {
        return Cow::Borrowed(name);
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Starts watching `spool`: a full scan at start, then notify events. Emits
/// each complete file on `tx`, waiting while the channel is full. Stops when
/// `shutdown` is cancelled or the receiver of `tx` is dropped.
///
/// Creates the spool directory if it is missing. Errors only if the directory
/// cannot be created or watched. Blocks while inotify watches are added (one
/// per directory of a recursive spool).
pub fn spawn(
    spool: SpoolConfig,
    tx: mpsc::Sender<Candidate>,
    shutdown: CancellationToken,
) -> Result<(SpoolHandle, JoinHandle<()>), SpoolError> {
    spawn_with_queue(spool, tx, shutdown, EVENT_QUEUE)
}

fn spawn_with_queue(
    spool: SpoolConfig,
    tx: mpsc::Sender<Candidate>,
    shutdown: CancellationToken,
    event_queue: usize,
) -> Result<(SpoolHandle, JoinHandle<()>), SpoolError> {
    let (state, events) = SpoolWatch::start(spool, tx, shutdown.clone(), event_queue)?;
    let rescan = Arc::new(Notify::new());
    let (reoffer, reoffers) = mpsc::unbounded_channel();
    let handle = SpoolHandle {
        rescan: rescan.clone(),
        reoffer,
    };
    let task = tokio::spawn(state.run(events, rescan, reoffers, shutdown));
    Ok((handle, task))
}

/// The watcher task's state; all of it lives in one task, so no locking.
struct SpoolWatch {
    spool_root: PathBuf,
    watch_root: PathBuf,
    mode: RecursiveMode,
    settle: Duration,
    filter: Arc<Filter>,
    tx: mpsc::Sender<Candidate>,
    shutdown: CancellationToken,
    /// Kept alive here: dropping it stops notify's thread.
    watcher: RecommendedWatcher,
    overflowed: Arc<AtomicBool>,
    /// Keyed by relative path; a `BTreeMap` so a removed directory's entries
    /// form one range.
    pending: BTreeMap<String, Pending>,
    /// The identity last offered per relative path, so the same file is not
    /// offered twice in a row.
    offered: BTreeMap<String, SourceIdentity>,
    /// Paths already logged as skipped, so each is logged once.
    reported: HashSet<PathBuf>,
    scan_queue: VecDeque<ScanRequest>,
    /// Directories to scan again once their watch is surely in place.
    delayed_scans: Vec<(Instant, String)>,
    last_full_scan: Instant,
    root_lost: Option<RootLost>,
    /// The device and inode of the spool directory being watched. A file
    /// system mounted over the spool, or a directory put in its place, keeps
    /// the path but not these, and raises no event on the old watch.
    root_identity: Option<(u64, u64)>,
    /// When a closed pending file is next due for a look ([`settle::CLOSE_QUIET`]).
    close_check: Option<Instant>,
}

impl SpoolWatch {
    /// Creates the spool directory and its watcher; the events arrive on the
    /// returned receiver.
    fn start(
        spool: SpoolConfig,
        tx: mpsc::Sender<Candidate>,
        shutdown: CancellationToken,
        event_queue: usize,
    ) -> Result<(SpoolWatch, mpsc::Receiver<notify::Result<Event>>), SpoolError> {
        let filter = Arc::new(Filter::new(&spool)?);
        let create_error = |source| SpoolError::Create {
            path: spool.path.clone(),
            source,
        };
        fs::create_dir_all(&spool.path).map_err(create_error)?;
        // notify reports absolute paths; relative ones are computed against this.
        let watch_root = std::path::absolute(&spool.path).map_err(create_error)?;
        let mode = if spool.recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };

        let (event_tx, events) = mpsc::channel(event_queue);
        let overflowed = Arc::new(AtomicBool::new(false));
        let watcher =
            start_watcher(&watch_root, mode, event_tx, overflowed.clone()).map_err(|source| {
                SpoolError::Watch {
                    path: spool.path.clone(),
                    hint: watch_hint(&source),
                    source,
                }
            })?;
        let root_identity = dir_identity(&watch_root);
        let state = SpoolWatch {
            spool_root: spool.path,
            watch_root,
            mode,
            settle: spool.settle,
            filter,
            tx,
            shutdown,
            watcher,
            overflowed,
            pending: BTreeMap::new(),
            offered: BTreeMap::new(),
            reported: HashSet::new(),
            scan_queue: VecDeque::new(),
            delayed_scans: Vec::new(),
            last_full_scan: Instant::now(),
            root_lost: None,
            root_identity,
            close_check: None,
        };
        Ok((state, events))
    }

    async fn run(
        mut self,
        mut events: mpsc::Receiver<notify::Result<Event>>,
        rescan: Arc<Notify>,
        mut reoffers: mpsc::UnboundedReceiver<String>,
        shutdown: CancellationToken,
    ) {
        debug!(
            spool = %self.spool_root.display(),
            recursive = self.recursive(),
            settle = ?self.settle,
            "spool watcher started"
        );
        // Files that arrived while the daemon was down.
        self.request_scan(ScanRequest::Full);
        let mut tick = tokio::time::interval(tick_period(self.settle));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut scan: Option<mpsc::Receiver<ScanItem>> = None;
        loop {
            if self.overflowed.swap(false, Ordering::Relaxed) {
                warn!(
                    spool = %self.spool_root.display(),
                    "file events arrived faster than they were handled; rescanning the spool"
                );
                self.request_scan(ScanRequest::Full);
            }
            if scan.is_none() {
                scan = self.start_next_scan();
            }
            // Unbiased on purpose: a flood of events must not starve the
            // settle timer or a scan, nor the other way round.
            let flow = tokio::select! {
                () = shutdown.cancelled() => ControlFlow::Break(()),
                Some(event) = events.recv() => self.handle_event(event).await,
                item = next_scan_item(&mut scan) => match item {
                    Some(item) => self.handle_scan_item(item).await,
                    None => {
                        scan = None;
                        ControlFlow::Continue(())
                    }
                },
                () = rescan.notified() => {
                    debug!(spool = %self.spool_root.display(), "rescan requested");
                    // Offer everything again: the consumer asked for it.
                    self.offered.clear();
                    self.request_scan(ScanRequest::Full);
                    ControlFlow::Continue(())
                }
                Some(relative) = reoffers.recv() => {
                    self.offered.remove(&relative);
                    self.offer(relative, None).await
                }
                _ = tick.tick() => self.on_tick().await,
                () = sleep_until_some(self.close_check) => {
                    self.close_check = None;
                    // Events already queued come first (select picks a ready
                    // branch at random): a writer that truncated the file again
                    // after its close must be seen before the file is offered.
                    let mut flow = ControlFlow::Continue(());
                    while flow.is_continue() && let Ok(event) = events.try_recv() {
                        flow = self.handle_event(event).await;
                    }
                    if flow.is_continue() {
                        self.settle_pending(Look::Closed).await
                    } else {
                        flow
                    }
                }
            };
            if flow.is_break() {
                break;
            }
        }
        debug!(spool = %self.spool_root.display(), "spool watcher stopped");
    }

    fn recursive(&self) -> bool {
        self.mode == RecursiveMode::Recursive
    }

    /// The settle tick: retries watching a lost root, queues the periodic
    /// safety scan and the directory scans now due, then applies the settle
    /// rule to every pending file.
    async fn on_tick(&mut self) -> ControlFlow<()> {
        if self.root_lost.is_some() {
            self.watch_again();
        } else {
            self.check_root_identity();
        }
        let now = Instant::now();
        if now.duration_since(self.last_full_scan) >= SAFETY_SCAN_PERIOD {
            self.request_scan(ScanRequest::Full);
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.delayed_scans)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.delayed_scans = later;
        for (_, relative) in due {
            self.request_scan(ScanRequest::Directory(relative));
        }
        self.settle_pending(Look::All).await
    }

    /// Offers a complete file, after checking that it is (still) a regular file
    /// with the `expected` identity and was not offered already as it is.
    /// Breaks when the watcher must stop.
    async fn offer(
        &mut self,
        relative: String,
        expected: Option<SourceIdentity>,
    ) -> ControlFlow<()> {
        let Some(identity) = self.check_offer(&relative, expected) else {
            return ControlFlow::Continue(());
        };
        let permit = match self.tx.clone().try_reserve_owned() {
            Ok(permit) => permit,
            Err(TrySendError::Closed(_)) => return ControlFlow::Break(()),
            Err(TrySendError::Full(tx)) => {
                let permit = tokio::select! {
                    permit = tx.reserve_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return ControlFlow::Break(()),
                    },
                    () = self.shutdown.cancelled() => return ControlFlow::Break(()),
                };
                // Waiting for room may have taken long: the file must still be
                // the one found complete.
                if self.check_offer(&relative, Some(identity)).is_none() {
                    return ControlFlow::Continue(());
                }
                permit
            }
        };
        debug!(spool = %self.spool_root.display(), file = %escape_name(&relative), size = identity.size, "file complete");
        self.pending.remove(&relative);
        self.offered.insert(relative.clone(), identity);
        permit.send(Candidate {
            spool: self.spool_root.clone(),
            path: self.spool_root.join(&relative),
            relative,
            identity,
        });
        ControlFlow::Continue(())
    }

    /// The identity to offer `relative` with, or `None` if it is not to be
    /// offered now (gone, not a regular file, changed, or offered already).
    fn check_offer(
        &mut self,
        relative: &str,
        expected: Option<SourceIdentity>,
    ) -> Option<SourceIdentity> {
        let meta = match fs::symlink_metadata(self.watch_root.join(relative)) {
            Ok(meta) => meta,
            Err(error) => {
                if error.kind() != io::ErrorKind::NotFound {
                    warn!(
                        spool = %self.spool_root.display(),
                        file = %escape_name(relative),
                        error = %error,
                        "cannot stat file; it is looked at again at the next rescan"
                    );
                }
                self.pending.remove(relative);
                return None;
            }
        };
        if !meta.is_file() {
            self.pending.remove(relative);
            self.report_skipped(relative, meta.file_type());
            return None;
        }
        if relative.chars().any(char::is_control) {
            self.pending.remove(relative);
            self.report_control_name(relative);
            return None;
        }
        let identity = SourceIdentity::of(&meta);
        if expected.is_some_and(|expected| expected != identity) {
            // Changed since it looked complete: it has to settle again.
            self.pending.insert(
                relative.to_owned(),
                Pending {
                    seen: Some(identity),
                    since: Instant::now(),
                    closed: false,
                },
            );
            return None;
        }
        if self.offered.get(relative) == Some(&identity) {
            self.pending.remove(relative);
            return None;
        }
        Some(identity)
    }

    fn report_skipped(&mut self, relative: &str, file_type: FileType) {
        // Directories are walked, not sent; nothing to report.
        if file_type.is_dir() {
            return;
        }
        if self.reported.insert(self.watch_root.join(relative)) {
            info!(
                spool = %self.spool_root.display(),
                file = %escape_name(relative),
                kind = describe(file_type),
                "skipping: only regular files are sent"
            );
        }
    }

    /// A name with a control character (a newline, a tab, an ESC...) is
    /// refused by every receiver, so buffering it would only park it in the
    /// buffer after its source was deleted: it stays in the spool instead,
    /// where renaming it is all it takes to send it.
    fn report_control_name(&mut self, relative: &str) {
        if self.reported.insert(self.watch_root.join(relative)) {
            warn!(
                spool = %self.spool_root.display(),
                file = %escape_name(relative),
                "skipping a name with a control character (shown escaped), which receivers refuse; the file stays in the spool: rename it to send it"
            );
        }
    }

    fn report_non_utf8(&mut self, path: &Path) {
        if self.reported.insert(path.to_owned()) {
            warn!(
                spool = %self.spool_root.display(),
                file = %escape_name(&path.display().to_string()),
                "skipping a name that is not valid UTF-8; rename it to send it"
            );
        }
    }
}

/// The device and inode of the directory at `path`, following symlinks as
/// the watch does.
fn dir_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn describe(file_type: FileType) -> &'static str {
    if file_type.is_symlink() {
        "symbolic link"
    } else if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_block_device() || file_type.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};
    use std::io::Write;

    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::testkit::*;
    use super::*;

    #[tokio::test]
    async fn same_file_is_offered_again_only_after_rescan_or_change() {
        let dirs = dirs();
        let mut running = start(config(&dirs.root));

        let path = dirs.root.join("a.dat");
        fs::write(&path, b"first").unwrap();
        let first = running.next().await;
        assert_eq!(first.relative, "a.dat");

        // Opened for writing and closed without a change: same identity.
        drop(OpenOptions::new().write(true).open(&path).unwrap());
        drop_in(&dirs, "marker-1.dat", b"x");
        assert_eq!(running.next().await.relative, "marker-1.dat");

        // Asked for: everything present is offered again, unchanged (after
        // settling, as the files are fresh).
        running.handle.rescan();
        let again = running.collect(2).await;
        assert_eq!(again["a.dat"], first);
        assert!(again.contains_key("marker-1.dat"));

        // Changed: offered again with the new identity.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b" and more")
            .unwrap();
        let changed = running.next().await;
        assert_eq!(changed.relative, "a.dat");
        assert_eq!(changed.identity.size, 14);
        assert_ne!(changed.identity, first.identity);
    }

    #[test]
    fn names_are_escaped_only_where_needed() {
        assert!(matches!(escape_name("日本語 a.txt"), Cow::Borrowed(_)));
        assert_eq!(escape_name("a\nb\tc\r"), "a\\nb\\tc\\r");
        assert_eq!(escape_name("x\u{1b}[31my\u{7f}"), "x\\u{1b}[31my\\u{7f}");
    }

    #[tokio::test]
    async fn spawn_creates_the_spool_and_stops_on_shutdown() {
        let dirs = dirs();
        let root = dirs.root.join("new/spool");
        let mut running = start(config(&root));
        assert!(root.is_dir());
        running.shutdown.cancel();
        let task = running.task.take().unwrap();
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("watcher did not stop")
            .unwrap();
    }

    #[tokio::test]
    async fn watcher_stops_when_the_consumer_is_gone() {
        let dirs = dirs();
        write_old(&dirs.root.join("a.dat"), b"x");
        let mut running = start(config(&dirs.root));
        running.rx.close();
        let task = running.task.take().unwrap();
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("watcher did not stop")
            .unwrap();
    }

    #[tokio::test]
    async fn spawn_names_a_spool_that_cannot_be_created() {
        let dirs = dirs();
        fs::write(dirs.outside.join("file"), b"x").unwrap();
        let root = dirs.outside.join("file/spool");
        let (tx, _rx) = mpsc::channel(1);
        let error = spawn(config(&root), tx, CancellationToken::new()).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, SpoolError::Create { .. }));
        assert!(
            message.starts_with(&format!("cannot create spool directory {}", root.display())),
            "{message}"
        );
        assert!(message.contains("create it"), "{message}");
    }
}
