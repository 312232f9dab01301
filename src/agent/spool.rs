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

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, FileType, Metadata};
use std::io;
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use globset::{Glob, GlobSet, GlobSetBuilder};
use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::SpoolConfig;

/// Events buffered between notify's thread and the watcher task. When the task
/// falls further behind, events are dropped and a full scan catches up, so
/// notify's thread never blocks. Room for a burst of ten thousand files
/// dropped at once (a few MiB at most): a full scan of a large spool costs far
/// more than the queue.
const EVENT_QUEUE: usize = 16384;

/// Entries a scan may walk ahead of the task.
const SCAN_QUEUE: usize = 256;

/// How long a file closed after writing must stay unchanged before it is
/// offered. Not zero: a writer that rewrites a file in place (open with
/// O_TRUNC, write, close, again) closes one version while the next is already
/// truncated, and the close event must not offer that empty moment. Two stats
/// this far apart must agree; closed files are looked at on their own timer,
/// not the settle tick, so a closed file is offered this soon after its close.
const CLOSE_QUIET: Duration = Duration::from_millis(25);

/// The least time between two looks at closed files: a burst of closes is
/// looked at in batches, not once per close.
const CLOSE_CHECK_SPACING: Duration = Duration::from_millis(5);

/// How often a full scan runs anyway, as a safety net for events the kernel
/// or notify may not deliver (it offers only files not offered as they are).
const SAFETY_SCAN_PERIOD: Duration = Duration::from_secs(60);

/// How long after a new directory appears it is scanned a second time.
/// notify adds the watch for a new directory only after handing out its create
/// event, so a file renamed into it between the first scan and the watch would
/// otherwise be missed.
const NEW_DIRECTORY_RESCAN: Duration = Duration::from_millis(1000);

/// Name endings that common tools use while a file is still being written.
const TEMPORARY_SUFFIXES: [&str; 4] = [".tmp", ".part", ".swp", "~"];

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

/// What identifies one version of a source file: a file replaced, rewritten or
/// appended to gets a different identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

impl SourceIdentity {
    pub fn of(meta: &Metadata) -> SourceIdentity {
        SourceIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
        }
    }

    /// Whether the file was last modified at least `settle` ago. A future mtime
    /// (clock skew) is never old enough.
    fn modified_before(&self, settle: Duration) -> bool {
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, saturating_nanos);
        now_ns.saturating_sub(self.mtime_ns) >= saturating_nanos(settle)
    }
}

fn saturating_nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// Which files of a spool are sent, decided on the relative path alone.
///
/// Hidden names (a component starting with `.`) and temporary names (`*.tmp`,
/// `*.part`, `*.swp`, `*~`) are always skipped; then the path must match an
/// `include` glob and no `exclude` glob. Globs use globset's defaults, so `*`
/// also matches `/`.
#[derive(Debug, Clone)]
pub struct Filter {
    include: GlobSet,
    exclude: GlobSet,
}

impl Filter {
    pub fn new(spool: &SpoolConfig) -> Result<Filter, SpoolError> {
        Ok(Filter {
            include: build_globs(&spool.path, &spool.include)?,
            exclude: build_globs(&spool.path, &spool.exclude)?,
        })
    }

    /// Whether the file at `relative` (`/`-separated) is to be sent.
    pub fn accepts(&self, relative: &str) -> bool {
        if is_hidden(relative) {
            return false;
        }
        let name = relative.rsplit('/').next().unwrap_or(relative);
        if TEMPORARY_SUFFIXES
            .iter()
            .any(|suffix| name.ends_with(suffix))
        {
            return false;
        }
        self.include.is_match(relative) && !self.exclude.is_match(relative)
    }
}

fn build_globs(spool: &Path, patterns: &[String]) -> Result<GlobSet, SpoolError> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = Glob::new(pattern).map_err(|source| SpoolError::Pattern {
            spool: spool.to_owned(),
            pattern: pattern.clone(),
            source,
        })?;
        set.add(glob);
    }
    set.build().map_err(|source| SpoolError::Pattern {
        spool: spool.to_owned(),
        pattern: patterns.join(", "),
        source,
    })
}

/// Whether a relative path is, or lies inside, a hidden file or directory.
fn is_hidden(relative: &str) -> bool {
    relative
        .split('/')
        .any(|component| component.starts_with('.'))
}

/// [`is_hidden`] for a path that is not valid UTF-8.
fn has_hidden_component(relative: &Path) -> bool {
    relative
        .components()
        .any(|component| component.as_os_str().as_bytes().starts_with(b"."))
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

/// What an operator can do about a watcher failure.
fn watch_hint(error: &notify::Error) -> &'static str {
    match &error.kind {
        notify::ErrorKind::MaxFilesWatch => {
            "raise the inotify watch limit (sysctl fs.inotify.max_user_watches)"
        }
        notify::ErrorKind::Io(io) if io.raw_os_error() == Some(24) => {
            "raise the inotify instance limit (sysctl fs.inotify.max_user_instances)"
        }
        _ => "check that it is a directory this user can read",
    }
}

/// Handle to a running watcher task.
#[derive(Debug, Clone)]
pub struct SpoolHandle {
    root: PathBuf,
    rescan: Arc<Notify>,
}

impl SpoolHandle {
    /// Asks for a full scan that offers every complete file again, including
    /// those offered before (for instance after a failed ingest, or when buffer
    /// space frees up). Requests made while a scan is queued are merged.
    pub fn rescan(&self) {
        self.rescan.notify_one();
    }

    /// The spool root as configured.
    pub fn root(&self) -> &Path {
        &self.root
    }
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
    let handle = SpoolHandle {
        root: state.spool_root.clone(),
        rescan: rescan.clone(),
    };
    let task = tokio::spawn(state.run(events, rescan, shutdown));
    Ok((handle, task))
}

fn start_watcher(
    root: &Path,
    mode: RecursiveMode,
    events: mpsc::Sender<notify::Result<Event>>,
    overflowed: Arc<AtomicBool>,
) -> notify::Result<RecommendedWatcher> {
    let forward = move |event: notify::Result<Event>| {
        // Opens (ours among them: every ingest opens its file) say nothing
        // about completeness; only a close after writing does. Dropping them
        // here keeps a burst of files within the queue.
        if let Ok(Event {
            kind: EventKind::Access(access),
            ..
        }) = &event
            && *access != AccessKind::Close(AccessMode::Write)
        {
            return;
        }
        // Never block notify's thread: a task that is behind catches up with a
        // full scan instead.
        if let Err(TrySendError::Full(_)) = events.try_send(event) {
            overflowed.store(true, Ordering::Relaxed);
        }
    };
    // Symlinked directories are not part of the spool: do not watch through them.
    let config = notify::Config::default().with_follow_symlinks(false);
    let mut watcher = RecommendedWatcher::new(forward, config)?;
    watcher.watch(root, mode)?;
    Ok(watcher)
}

/// A file seen changing; it is offered once its identity stays the same for
/// `settle`.
#[derive(Debug)]
struct Pending {
    /// `None` until the first stat after an event.
    seen: Option<SourceIdentity>,
    /// When `seen` was last observed to change.
    since: Instant,
    /// The writer closed the file and nothing changed it since: it only has to
    /// stay quiet for [`CLOSE_QUIET`] instead of the full settle period.
    closed: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum ScanRequest {
    Full,
    /// A directory, relative to the root, that appeared after start.
    Directory(String),
}

/// What a scan found, sent from the blocking walker to the task.
#[derive(Debug)]
enum ScanItem {
    File {
        relative: String,
        identity: SourceIdentity,
    },
    /// Not a regular file (symlink, FIFO, socket, device).
    Skipped {
        relative: String,
        file_type: FileType,
    },
    NonUtf8 {
        path: PathBuf,
    },
    Unreadable {
        path: PathBuf,
        error: io::Error,
    },
}

/// Where a path reported by notify lies.
enum Place {
    Root,
    Entry(String),
    /// Relative, but not valid UTF-8.
    NonUtf8(PathBuf),
    Outside,
}

/// The spool root was removed or moved away.
struct RootLost {
    /// Whether a failure to recreate it was logged already.
    failure_logged: bool,
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
    /// When a closed pending file is next due for a look ([`CLOSE_QUIET`]).
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
            close_check: None,
        };
        Ok((state, events))
    }

    async fn run(
        mut self,
        mut events: mpsc::Receiver<notify::Result<Event>>,
        rescan: Arc<Notify>,
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

    async fn handle_event(&mut self, event: notify::Result<Event>) -> ControlFlow<()> {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                warn!(
                    spool = %self.spool_root.display(),
                    error = %error,
                    "file watcher error; rescanning the spool ({})",
                    watch_hint(&error)
                );
                self.request_scan(ScanRequest::Full);
                return ControlFlow::Continue(());
            }
        };
        if event.need_rescan() {
            warn!(
                spool = %self.spool_root.display(),
                "the kernel dropped file events; rescanning the spool"
            );
            self.request_scan(ScanRequest::Full);
            return ControlFlow::Continue(());
        }
        match event.kind {
            EventKind::Create(CreateKind::Folder) => {
                for path in &event.paths {
                    self.directory_appeared(path);
                }
            }
            EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(RenameMode::Any | RenameMode::Other)) => {
                for path in &event.paths {
                    self.entry_appeared(path);
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                for path in &event.paths {
                    self.moved_in(path).await?;
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                if let [from, to] = event.paths.as_slice() {
                    self.gone(from);
                    self.moved_in(to).await?;
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) | EventKind::Remove(_) => {
                for path in &event.paths {
                    self.gone(path);
                }
            }
            EventKind::Modify(_) => {
                for path in &event.paths {
                    self.changed(path);
                }
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                for path in &event.paths {
                    if let Some(relative) = self.file_entry(path) {
                        // The writer closed it: what it wrote is all there
                        // is, once nothing else changes it for a moment.
                        let now = Instant::now();
                        self.pending.insert(
                            relative,
                            Pending {
                                seen: None,
                                since: now,
                                closed: true,
                            },
                        );
                        // A first look now, the second CLOSE_QUIET later.
                        self.close_check.get_or_insert(now);
                    }
                }
            }
            EventKind::Access(_) | EventKind::Any | EventKind::Other => {}
        }
        ControlFlow::Continue(())
    }

    /// Maps a notify path to a relative path, if it lies in the spool.
    fn place(&self, path: &Path) -> Place {
        let Ok(relative) = path.strip_prefix(&self.watch_root) else {
            return Place::Outside;
        };
        if relative.as_os_str().is_empty() {
            return Place::Root;
        }
        match relative.to_str() {
            Some(relative) => Place::Entry(relative.to_owned()),
            None => Place::NonUtf8(relative.to_owned()),
        }
    }

    /// The relative path of a file event that counts for this spool.
    fn file_entry(&mut self, path: &Path) -> Option<String> {
        match self.place(path) {
            Place::Entry(relative) if self.counts(&relative) => Some(relative),
            Place::NonUtf8(relative)
                if (self.recursive() || relative.components().count() == 1)
                    && !has_hidden_component(&relative) =>
            {
                self.report_non_utf8(path);
                None
            }
            _ => None,
        }
    }

    fn counts(&self, relative: &str) -> bool {
        (self.recursive() || !relative.contains('/')) && self.filter.accepts(relative)
    }

    /// Something was created under a name: a directory is scanned, anything
    /// else waits for the settle rule (a hard link, for instance, is never
    /// closed after writing).
    fn entry_appeared(&mut self, path: &Path) {
        if fs::symlink_metadata(path).is_ok_and(|meta| meta.is_dir()) {
            self.directory_appeared(path);
        } else {
            self.changed(path);
        }
    }

    /// Files written into a new directory before notify added its watch raise
    /// no event, so the directory is scanned.
    fn directory_appeared(&mut self, path: &Path) {
        if !self.recursive() {
            return;
        }
        match self.place(path) {
            Place::Entry(relative) if !is_hidden(&relative) => {
                self.delayed_scans
                    .push((Instant::now() + NEW_DIRECTORY_RESCAN, relative.clone()));
                self.request_scan(ScanRequest::Directory(relative));
            }
            Place::NonUtf8(relative) if !has_hidden_component(&relative) => {
                self.report_non_utf8(path);
            }
            _ => {}
        }
    }

    /// A rename is atomic, so a file renamed into the spool is complete.
    async fn moved_in(&mut self, path: &Path) -> ControlFlow<()> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => self.directory_appeared(path),
            Ok(meta) => {
                if let Some(relative) = self.file_entry(path) {
                    if !meta.is_file() {
                        // `offer` says why it is skipped.
                        return self.offer(relative, None).await;
                    }
                    // Renamed in complete, as files should be dropped: it goes
                    // at the next closed-file check (a batch of them at once)
                    // unless it changed since, or a process still has it open
                    // for writing (it then waits for that writer's close).
                    let now = Instant::now();
                    self.pending.insert(
                        relative,
                        Pending {
                            seen: Some(SourceIdentity::of(&meta)),
                            since: now.checked_sub(CLOSE_QUIET).unwrap_or(now),
                            closed: true,
                        },
                    );
                    self.close_check.get_or_insert(now);
                }
            }
            // Moved on already; its own event follows.
            Err(_) => {}
        }
        ControlFlow::Continue(())
    }

    /// The file is being written: whatever was offered before is stale, and it
    /// is offered again once it settles.
    fn changed(&mut self, path: &Path) {
        let Some(relative) = self.file_entry(path) else {
            return;
        };
        self.offered.remove(&relative);
        self.pending.insert(
            relative,
            Pending {
                seen: None,
                since: Instant::now(),
                closed: false,
            },
        );
    }

    fn gone(&mut self, path: &Path) {
        match self.place(path) {
            Place::Root => self.root_vanished(),
            Place::Entry(relative) => self.forget(&relative),
            Place::NonUtf8(_) => self.reported.retain(|reported| !reported.starts_with(path)),
            Place::Outside => {}
        }
    }

    /// Drops all state about a removed file or directory. A file moved back in
    /// later is then offered again, even with the same identity.
    fn forget(&mut self, relative: &str) {
        remove_tree(&mut self.pending, relative);
        remove_tree(&mut self.offered, relative);
        let path = self.watch_root.join(relative);
        self.reported
            .retain(|reported| !reported.starts_with(&path));
    }

    async fn handle_scan_item(&mut self, item: ScanItem) -> ControlFlow<()> {
        match item {
            ScanItem::File { relative, identity } => {
                // Events seen since the scan started know better.
                if self.pending.contains_key(&relative) {
                    return ControlFlow::Continue(());
                }
                if identity.modified_before(self.settle) {
                    return self.offer(relative, Some(identity)).await;
                }
                self.pending.insert(
                    relative,
                    Pending {
                        seen: Some(identity),
                        since: Instant::now(),
                        closed: false,
                    },
                );
            }
            ScanItem::Skipped {
                relative,
                file_type,
            } => self.report_skipped(&relative, file_type),
            ScanItem::NonUtf8 { path } => self.report_non_utf8(&path),
            ScanItem::Unreadable { path, error } => {
                if self.reported.insert(path.clone()) {
                    warn!(
                        spool = %self.spool_root.display(),
                        file = %path.display(),
                        error = %error,
                        "cannot read directory; its files are not sent until its permissions are fixed"
                    );
                }
            }
        }
        ControlFlow::Continue(())
    }

    fn request_scan(&mut self, request: ScanRequest) {
        // A queued full scan covers every directory scan.
        if self.scan_queue.contains(&ScanRequest::Full) || self.scan_queue.contains(&request) {
            return;
        }
        if request == ScanRequest::Full {
            self.scan_queue.clear();
        }
        self.scan_queue.push_back(request);
    }

    fn start_next_scan(&mut self) -> Option<mpsc::Receiver<ScanItem>> {
        let request = self.scan_queue.pop_front()?;
        let start = match request {
            ScanRequest::Full => {
                self.last_full_scan = Instant::now();
                String::new()
            }
            ScanRequest::Directory(relative) => relative,
        };
        debug!(spool = %self.spool_root.display(), dir = %start, "scanning");
        let (items, rx) = mpsc::channel(SCAN_QUEUE);
        let root = self.watch_root.clone();
        let recursive = self.recursive();
        let filter = self.filter.clone();
        tokio::task::spawn_blocking(move || walk(&root, start, recursive, &filter, &items));
        Some(rx)
    }

    async fn on_tick(&mut self) -> ControlFlow<()> {
        if self.root_lost.is_some() {
            self.watch_again();
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

    /// Applies the settle rule: stats the pending files (`which`: all, at the
    /// settle tick; only the closed ones, at their own quicker timer) and
    /// offers those whose identity has not changed for long enough.
    async fn settle_pending(&mut self, which: Look) -> ControlFlow<()> {
        if self.pending.is_empty() {
            return ControlFlow::Continue(());
        }
        let root = self.watch_root.clone();
        let relatives: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| which == Look::All || p.closed)
            .map(|(relative, _)| relative.clone())
            .collect();
        let stat_all = move || {
            relatives
                .into_iter()
                .map(|relative| {
                    let meta = fs::symlink_metadata(root.join(&relative));
                    (relative, meta)
                })
                .collect::<Vec<_>>()
        };
        let Ok(observed) = tokio::task::spawn_blocking(stat_all).await else {
            // Only a runtime shutting down cancels it.
            return ControlFlow::Break(());
        };

        let now = Instant::now();
        let mut due = Vec::new();
        for (relative, meta) in observed {
            let Some(pending) = self.pending.get_mut(&relative) else {
                continue;
            };
            match meta {
                Ok(meta) if meta.is_file() => {
                    let identity = SourceIdentity::of(&meta);
                    if pending.seen != Some(identity) {
                        // A change after the close means another writer: the
                        // full settle rule applies again.
                        pending.closed &= pending.seen.is_none();
                        pending.seen = Some(identity);
                        pending.since = now;
                    } else if now.duration_since(pending.since)
                        >= if pending.closed {
                            self.settle.min(CLOSE_QUIET)
                        } else {
                            self.settle
                        }
                    {
                        due.push((relative, identity, pending.closed));
                    }
                }
                Ok(meta) => {
                    self.pending.remove(&relative);
                    self.report_skipped(&relative, meta.file_type());
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    self.pending.remove(&relative);
                }
                Err(error) => {
                    // Retrying every tick would flood the log; the next scan retries.
                    self.pending.remove(&relative);
                    warn!(
                        spool = %self.spool_root.display(),
                        file = %relative,
                        error = %error,
                        "cannot stat file; it is looked at again at the next rescan"
                    );
                }
            }
        }
        // A closed file that some process has open for writing again (a writer
        // that reopened it, perhaps truncated, and stalled) is not complete:
        // it waits for its next close, or the full settle rule.
        let probe: Vec<String> = due
            .iter()
            .filter(|(_, _, closed)| *closed)
            .map(|(relative, _, _)| relative.clone())
            .collect();
        if !probe.is_empty() {
            let root = self.watch_root.clone();
            let writing = move || {
                probe
                    .into_iter()
                    .filter(|relative| open_for_writing(&root.join(relative)) == Some(true))
                    .collect::<HashSet<String>>()
            };
            let Ok(writing) = tokio::task::spawn_blocking(writing).await else {
                return ControlFlow::Break(());
            };
            due.retain(|(relative, _, _)| !writing.contains(relative));
            for relative in &writing {
                if let Some(pending) = self.pending.get_mut(relative) {
                    pending.closed = false;
                    pending.since = now;
                }
            }
        }
        // Closed files are looked at again as soon as their quiet time is over.
        self.close_check = self
            .pending
            .values()
            .filter(|p| p.closed)
            .map(|p| match p.seen {
                None => now,
                Some(_) => p.since + self.settle.min(CLOSE_QUIET),
            })
            .min()
            .map(|at| at.max(now + CLOSE_CHECK_SPACING));
        for (relative, identity, _) in due {
            self.offer(relative, Some(identity)).await?;
        }
        ControlFlow::Continue(())
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
        debug!(spool = %self.spool_root.display(), file = %relative, size = identity.size, "file complete");
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
                        file = %relative,
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
                file = %relative,
                kind = describe(file_type),
                "skipping: only regular files are sent"
            );
        }
    }

    fn report_non_utf8(&mut self, path: &Path) {
        if self.reported.insert(path.to_owned()) {
            warn!(
                spool = %self.spool_root.display(),
                file = %path.display(),
                "skipping a name that is not valid UTF-8; rename it to send it"
            );
        }
    }

    /// The spool directory itself was removed or moved away: recreate and watch
    /// it again, as at start, so files dropped later are not lost.
    fn root_vanished(&mut self) {
        if self.root_lost.is_some() {
            return;
        }
        warn!(
            spool = %self.spool_root.display(),
            "spool directory was removed or moved away; recreating it"
        );
        self.pending.clear();
        self.offered.clear();
        self.reported.clear();
        self.scan_queue.clear();
        // A moved directory keeps its watch; it must not report under our name.
        let _ = self.watcher.unwatch(&self.watch_root);
        self.root_lost = Some(RootLost {
            failure_logged: false,
        });
        self.watch_again();
    }

    fn watch_again(&mut self) {
        let result = fs::create_dir_all(&self.watch_root)
            .map_err(notify::Error::io)
            .and_then(|()| self.watcher.watch(&self.watch_root, self.mode));
        match result {
            Ok(()) => {
                info!(spool = %self.spool_root.display(), "spool directory recreated; watching it again");
                self.root_lost = None;
                self.request_scan(ScanRequest::Full);
            }
            Err(error) => {
                if let Some(lost) = self.root_lost.as_mut().filter(|lost| !lost.failure_logged) {
                    lost.failure_logged = true;
                    error!(
                        spool = %self.spool_root.display(),
                        error = %error,
                        "cannot recreate and watch spool directory; create it by hand ({}); retrying",
                        watch_hint(&error)
                    );
                }
            }
        }
    }
}

/// How often pending files are looked at: often enough that a file is offered
/// soon after it settled, rarely enough to cost nothing when idle.
fn tick_period(settle: Duration) -> Duration {
    (settle / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

/// Whether some process has the file at `path` open for writing, as the kernel
/// tells by refusing a read lease (`fcntl(F_SETLEASE, F_RDLCK)` fails with
/// EAGAIN while the file is open for writing anywhere). `None` when it cannot
/// tell: leases need the file's owner (or CAP_LEASE) and a file system that
/// supports them. The lease, when granted, is released at once.
fn open_for_writing(path: &Path) -> Option<bool> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)
        .ok()?;
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `file` for the whole call;
    // F_SETLEASE takes an integer argument and touches no memory.
    let granted = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) } == 0;
    if granted {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// Which pending files a settle pass looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    All,
    Closed,
}

/// Resolves at `at`; never when there is no `at`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next item of the running scan; never resolves when no scan runs.
async fn next_scan_item(scan: &mut Option<mpsc::Receiver<ScanItem>>) -> Option<ScanItem> {
    match scan {
        Some(items) => items.recv().await,
        None => std::future::pending().await,
    }
}

/// Removes `relative` and everything under it.
fn remove_tree<V>(map: &mut BTreeMap<String, V>, relative: &str) {
    map.remove(relative);
    let prefix = format!("{relative}/");
    let under: Vec<String> = map
        .range(prefix.clone()..)
        .map(|(key, _)| key)
        .take_while(|key| key.starts_with(&prefix))
        .cloned()
        .collect();
    for key in under {
        map.remove(&key);
    }
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

/// Walks the spool from the directory `start` (relative, empty for the root),
/// on a blocking thread. Hidden directories and symlinks are never entered; a
/// non-recursive walk only looks at `start` itself. Stops early when the task
/// no longer listens (it stopped, or started over).
fn walk(
    root: &Path,
    start: String,
    recursive: bool,
    filter: &Filter,
    items: &mpsc::Sender<ScanItem>,
) {
    let mut dirs = vec![start];
    while let Some(dir) = dirs.pop() {
        let dir_path = root.join(&dir);
        let entries = match fs::read_dir(&dir_path) {
            Ok(entries) => entries,
            // Removed meanwhile; its removal event cleans up.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => {
                let item = ScanItem::Unreadable {
                    path: dir_path,
                    error,
                };
                if items.blocking_send(item).is_err() {
                    return;
                }
                continue;
            }
        };
        for entry in entries {
            let Ok(entry) = entry else {
                continue;
            };
            let name = entry.file_name();
            if name.as_bytes().starts_with(b".") {
                continue;
            }
            let item = match name.to_str() {
                None => Some(ScanItem::NonUtf8 { path: entry.path() }),
                Some(name) => {
                    let relative = if dir.is_empty() {
                        name.to_owned()
                    } else {
                        format!("{dir}/{name}")
                    };
                    match entry.file_type() {
                        Ok(file_type) if file_type.is_dir() => {
                            if recursive {
                                dirs.push(relative);
                            }
                            None
                        }
                        Ok(_) if !filter.accepts(&relative) => None,
                        // `DirEntry::metadata` does not follow symlinks.
                        Ok(_) => match entry.metadata() {
                            Ok(meta) if meta.is_file() => Some(ScanItem::File {
                                relative,
                                identity: SourceIdentity::of(&meta),
                            }),
                            Ok(meta) => Some(ScanItem::Skipped {
                                relative,
                                file_type: meta.file_type(),
                            }),
                            Err(_) => None,
                        },
                        // Removed between listing and looking.
                        Err(_) => None,
                    }
                }
            };
            let Some(item) = item else {
                continue;
            };
            if items.blocking_send(item).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::ffi::OsStr;
    use std::fs::{self, File, OpenOptions};
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixListener;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, SystemTime};

    use tempfile::TempDir;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::config::{Disposition, SpoolConfig};

    const SETTLE: Duration = Duration::from_millis(200);
    /// Long enough that an offer within a test's deadline cannot come from the
    /// settle rule.
    const NEVER: Duration = Duration::from_secs(3600);
    const DEADLINE: Duration = Duration::from_secs(5);

    fn config(root: &Path) -> SpoolConfig {
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
    struct Dirs {
        _temp: TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    fn dirs() -> Dirs {
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

    struct Running {
        rx: mpsc::Receiver<Candidate>,
        handle: SpoolHandle,
        task: Option<JoinHandle<()>>,
        shutdown: CancellationToken,
        started: Instant,
    }

    fn start(spool: SpoolConfig) -> Running {
        start_with_queue(spool, EVENT_QUEUE)
    }

    fn start_with_queue(spool: SpoolConfig, event_queue: usize) -> Running {
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
        async fn next(&mut self) -> Candidate {
            tokio::time::timeout(DEADLINE, self.rx.recv())
                .await
                .expect("no candidate before the deadline")
                .expect("the watcher stopped")
        }

        /// The next `n` candidates by relative path; each path at most once.
        async fn collect(&mut self, n: usize) -> BTreeMap<String, Candidate> {
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
        async fn assert_quiet(&mut self, window: Duration) {
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

    async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !condition() {
            assert!(
                Instant::now() < deadline,
                "{what} did not happen before the deadline"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn write_old(path: &Path, content: &[u8]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut file = File::create(path).unwrap();
        file.write_all(content).unwrap();
        file.set_modified(SystemTime::now() - Duration::from_secs(3600))
            .unwrap();
    }

    /// Writes `name` outside the spool, then renames it in: the recommended way
    /// to drop a file.
    fn drop_in(dirs: &Dirs, relative: &str, content: &[u8]) -> PathBuf {
        let staged = dirs.outside.join(relative.replace('/', "_"));
        fs::write(&staged, content).unwrap();
        let target = dirs.root.join(relative);
        fs::rename(&staged, &target).unwrap();
        target
    }

    fn make_fifo(path: &Path) {
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            path,
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .unwrap();
    }

    fn non_utf8_name() -> &'static OsStr {
        OsStr::from_bytes(b"bad\xffname.dat")
    }

    #[test]
    fn a_file_open_for_writing_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        let mut writer = File::create(&path).unwrap();
        writer.write_all(b"half").unwrap();
        // The file's owner may take leases; anyone else gets "cannot tell".
        // SAFETY: geteuid has no preconditions and cannot fail.
        let owner = unsafe { libc::geteuid() } == fs::metadata(&path).unwrap().uid();
        let expected = |v: bool| if owner { Some(v) } else { None };
        assert_eq!(super::open_for_writing(&path), expected(true));
        drop(writer);
        assert_eq!(super::open_for_writing(&path), expected(false));
        let _reader = File::open(&path).unwrap();
        assert_eq!(super::open_for_writing(&path), expected(false));
        assert_eq!(super::open_for_writing(&dir.path().join("missing")), None);
    }

    #[test]
    fn filter_skips_hidden_and_temporary_names() {
        let filter = Filter::new(&config(Path::new("/in"))).unwrap();
        for accepted in [
            "a.dat",
            "sub/deep/b.dat",
            "no-extension",
            "tmp",
            "x.tmp.dat",
            "a.b/c",
        ] {
            assert!(filter.accepts(accepted), "{accepted} should be accepted");
        }
        for skipped in [
            ".hidden",
            "x.tmp",
            "x.part",
            "x.swp",
            "x.dat~",
            "sub/.hidden",
            ".git/config",
            "sub/.cache/deep/file.dat",
            "sub/upload.part",
        ] {
            assert!(!filter.accepts(skipped), "{skipped} should be skipped");
        }
    }

    #[test]
    fn filter_matches_include_and_exclude_against_the_relative_path() {
        let mut spool = config(Path::new("/in"));
        spool.include = vec!["*.dat".to_owned(), "logs/*".to_owned()];
        spool.exclude = vec!["skip-*".to_owned(), "*/private/*".to_owned()];
        let filter = Filter::new(&spool).unwrap();
        // `*` matches across `/`.
        assert!(filter.accepts("a.dat"));
        assert!(filter.accepts("deep/down/a.dat"));
        assert!(filter.accepts("logs/2024/app.log"));
        assert!(!filter.accepts("notes.txt"));
        assert!(!filter.accepts("skip-1.dat"));
        assert!(!filter.accepts("sub/private/a.dat"));

        spool.include = vec!["[broken".to_owned()];
        let message = Filter::new(&spool).unwrap_err().to_string();
        assert!(
            message.contains("[broken")
                && message.contains("/in")
                && message.contains("fix the pattern"),
            "{message}"
        );
    }

    #[test]
    fn identity_comes_from_the_metadata() {
        let dirs = dirs();
        let path = dirs.root.join("a.dat");
        fs::write(&path, b"12345").unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        let identity = SourceIdentity::of(&meta);
        let mtime = meta.modified().unwrap().duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(identity.size, 5);
        assert_eq!(identity.ino, meta.ino());
        assert_eq!(identity.dev, meta.dev());
        assert_eq!(identity.mtime_ns, i64::try_from(mtime.as_nanos()).unwrap());
        assert!(!identity.modified_before(Duration::from_secs(60)));
        assert!(identity.modified_before(Duration::ZERO));
    }

    #[tokio::test]
    async fn start_up_scan_offers_complete_files_and_skips_the_rest() {
        let dirs = dirs();
        let root = &dirs.root;
        write_old(&root.join("a.dat"), b"alpha");
        write_old(&root.join("empty.dat"), b"");
        write_old(&root.join("sub/deep/b.dat"), b"beta");
        write_old(&root.join(".hidden"), b"x");
        write_old(&root.join("upload.tmp"), b"x");
        write_old(&root.join("upload.part"), b"x");
        write_old(&root.join(".cache/c.dat"), b"x");
        write_old(&root.join("sub").join(non_utf8_name()), b"x");
        write_old(&dirs.outside.join("target/t.dat"), b"x");
        std::os::unix::fs::symlink(dirs.outside.join("target"), root.join("linked-dir")).unwrap();
        std::os::unix::fs::symlink(dirs.outside.join("target/t.dat"), root.join("link.dat"))
            .unwrap();
        make_fifo(&root.join("pipe.dat"));
        let _socket = UnixListener::bind(root.join("socket.dat")).unwrap();

        let mut spool = config(root);
        // Found complete by their old mtime, not by waiting.
        spool.settle = NEVER;
        let mut running = start(spool);
        let found = running.collect(3).await;
        assert_eq!(
            found.keys().collect::<Vec<_>>(),
            ["a.dat", "empty.dat", "sub/deep/b.dat"]
        );
        let b = &found["sub/deep/b.dat"];
        assert_eq!(b.spool, *root);
        assert_eq!(b.path, root.join("sub/deep/b.dat"));
        assert_eq!(
            b.identity,
            SourceIdentity::of(&fs::metadata(&b.path).unwrap())
        );
        assert_eq!(found["empty.dat"].identity.size, 0);
        running.assert_quiet(Duration::from_millis(300)).await;
    }

    #[tokio::test]
    async fn start_up_scan_lets_fresh_files_settle() {
        let dirs = dirs();
        fs::write(dirs.root.join("fresh.dat"), b"new").unwrap();
        let mut running = start(config(&dirs.root));
        let candidate = running.next().await;
        assert_eq!(candidate.relative, "fresh.dat");
        assert!(running.started.elapsed() >= SETTLE);
    }

    #[tokio::test]
    async fn non_recursive_spool_counts_only_top_level_files() {
        let dirs = dirs();
        write_old(&dirs.root.join("top.dat"), b"x");
        write_old(&dirs.root.join("sub/nested.dat"), b"x");
        let mut spool = config(&dirs.root);
        spool.recursive = false;
        spool.settle = NEVER;
        let mut running = start(spool);
        assert_eq!(running.next().await.relative, "top.dat");

        fs::create_dir(dirs.root.join("new")).unwrap();
        fs::write(dirs.root.join("new/inside.dat"), b"x").unwrap();
        fs::write(dirs.root.join("sub/later.dat"), b"x").unwrap();
        // Events are handled in order, so anything offered for the
        // sub-directories would come before this file.
        drop_in(&dirs, "marker.dat", b"x");
        assert_eq!(running.next().await.relative, "marker.dat");
    }

    #[tokio::test]
    async fn rename_into_the_spool_is_complete_at_once() {
        let dirs = dirs();
        let mut spool = config(&dirs.root);
        spool.settle = NEVER;
        let mut running = start(spool);

        let path = drop_in(&dirs, "moved.dat", b"payload");
        let candidate = running.next().await;
        assert_eq!(candidate.relative, "moved.dat");
        assert_eq!(candidate.path, path);
        assert_eq!(candidate.identity.size, 7);

        // Written under a temporary name inside the spool, then renamed.
        let staged = dirs.root.join("report.tmp");
        let mut file = File::create(&staged).unwrap();
        file.write_all(b"report").unwrap();
        drop(file);
        fs::rename(&staged, dirs.root.join("report.dat")).unwrap();
        let candidate = running.next().await;
        assert_eq!(candidate.relative, "report.dat");
        assert_eq!(candidate.identity.size, 6);
    }

    #[tokio::test]
    async fn a_file_renamed_in_while_still_open_for_writing_waits_for_its_close() {
        let dirs = dirs();
        let mut spool = config(&dirs.root);
        spool.settle = NEVER;
        let mut running = start(spool);

        // The writer keeps a handle across the rename and truncates through it.
        let staged = dirs.outside.join("held.dat");
        fs::write(&staged, vec![7u8; 100_000]).unwrap();
        let handle = fs::OpenOptions::new().write(true).open(&staged).unwrap();
        fs::rename(&staged, dirs.root.join("held.dat")).unwrap();
        running.assert_quiet(Duration::from_millis(300)).await;
        handle.set_len(1000).unwrap();
        drop(handle);
        let candidate = running.next().await;
        assert_eq!(candidate.relative, "held.dat");
        assert_eq!(candidate.identity.size, 1000);
    }

    #[tokio::test]
    async fn close_after_write_is_complete_at_once() {
        let dirs = dirs();
        let mut spool = config(&dirs.root);
        spool.settle = NEVER;
        let mut running = start(spool);

        fs::write(dirs.root.join("written.dat"), b"0123456789").unwrap();
        let candidate = running.next().await;
        assert_eq!(candidate.relative, "written.dat");
        assert_eq!(candidate.identity.size, 10);

        File::create(dirs.root.join("empty.dat")).unwrap();
        let candidate = running.next().await;
        assert_eq!(candidate.relative, "empty.dat");
        assert_eq!(candidate.identity.size, 0);
    }

    #[tokio::test]
    async fn new_directories_are_scanned() {
        let dirs = dirs();
        let mut running = start(config(&dirs.root));

        // Written right after the directories appear, possibly before notify
        // watches them.
        fs::create_dir_all(dirs.root.join("a/b/c")).unwrap();
        fs::write(dirs.root.join("a/b/c/deep.dat"), b"x").unwrap();
        fs::write(dirs.root.join("a/top.dat"), b"x").unwrap();
        // A whole tree moved in.
        write_old(&dirs.outside.join("tree/x.dat"), b"x");
        fs::write(dirs.outside.join("tree/fresh.dat"), b"x").unwrap();
        write_old(&dirs.outside.join("tree/y/z.dat"), b"x");
        fs::rename(dirs.outside.join("tree"), dirs.root.join("tree")).unwrap();

        let found = running.collect(5).await;
        assert_eq!(
            found.keys().collect::<Vec<_>>(),
            [
                "a/b/c/deep.dat",
                "a/top.dat",
                "tree/fresh.dat",
                "tree/x.dat",
                "tree/y/z.dat"
            ]
        );
        running.assert_quiet(3 * SETTLE).await;
    }

    #[tokio::test]
    async fn growing_file_is_offered_only_once_it_settles() {
        let dirs = dirs();
        let mut running = start(config(&dirs.root));

        let path = dirs.root.join("growing.dat");
        let mut file = File::create(&path).unwrap();
        // Appended to for longer than `settle`, never closed meanwhile.
        let mut last_write = Instant::now();
        for _ in 0..8 {
            file.write_all(&[7; 100]).unwrap();
            last_write = Instant::now();
            tokio::time::sleep(SETTLE / 3).await;
            assert!(
                running.rx.try_recv().is_err(),
                "offered while still growing"
            );
        }
        let candidate = running.next().await;
        assert_eq!(candidate.relative, "growing.dat");
        assert_eq!(candidate.identity.size, 800);
        assert!(last_write.elapsed() >= SETTLE);

        // Closing it now changes nothing, so it is not offered again.
        drop(file);
        drop_in(&dirs, "marker.dat", b"x");
        assert_eq!(running.next().await.relative, "marker.dat");
    }

    #[tokio::test]
    async fn hard_link_is_offered_once_it_settles() {
        let dirs = dirs();
        let mut running = start(config(&dirs.root));
        let source = dirs.outside.join("linked.dat");
        fs::write(&source, b"linked").unwrap();
        let linked_at = Instant::now();
        // A hard link raises a create event only: no close, no rename.
        fs::hard_link(&source, dirs.root.join("linked.dat")).unwrap();
        let candidate = running.next().await;
        assert_eq!(candidate.relative, "linked.dat");
        assert_eq!(candidate.identity.size, 6);
        assert!(linked_at.elapsed() >= SETTLE);
    }

    #[tokio::test]
    async fn ignored_and_special_files_are_never_offered() {
        let dirs = dirs();
        let root = &dirs.root;
        let mut spool = config(root);
        spool.include = vec!["*.dat".to_owned()];
        spool.exclude = vec!["skip-*".to_owned()];
        let mut running = start(spool);

        for name in [
            ".hidden.dat",
            "x.tmp",
            "x.part",
            "x.swp",
            "x.dat~",
            "skip-1.dat",
            "notes.txt",
        ] {
            fs::write(root.join(name), b"x").unwrap();
        }
        fs::create_dir(root.join(".git")).unwrap();
        fs::write(root.join(".git/config.dat"), b"x").unwrap();
        fs::write(root.join(non_utf8_name()), b"x").unwrap();
        fs::write(dirs.outside.join("target.dat"), b"x").unwrap();
        std::os::unix::fs::symlink(dirs.outside.join("target.dat"), root.join("link.dat")).unwrap();
        make_fifo(&root.join("pipe.dat"));
        let _socket = UnixListener::bind(root.join("socket.dat")).unwrap();
        // A symlink renamed in is still not a regular file.
        std::os::unix::fs::symlink(dirs.outside.join("target.dat"), dirs.outside.join("l2.dat"))
            .unwrap();
        fs::rename(dirs.outside.join("l2.dat"), root.join("moved-link.dat")).unwrap();

        // Offers at once come before the marker; offers by settling within
        // the quiet window after it.
        drop_in(&dirs, "marker.dat", b"x");
        assert_eq!(running.next().await.relative, "marker.dat");
        running.assert_quiet(3 * SETTLE).await;
    }

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

    #[tokio::test]
    async fn event_queue_overflow_falls_back_to_a_full_scan() {
        let dirs = dirs();
        // One event fits; the test writes without yielding, so most are dropped.
        let mut running = start_with_queue(config(&dirs.root), 1);
        const FILES: usize = 100;
        for i in 0..FILES {
            fs::write(dirs.root.join(format!("f{i:03}.dat")), b"x").unwrap();
        }
        let found = running.collect(FILES).await;
        assert_eq!(found.len(), FILES);
        // Found by events and by the scan, offered once.
        running.assert_quiet(3 * SETTLE).await;

        running.handle.rescan();
        assert_eq!(running.collect(FILES).await.len(), FILES);
    }

    #[tokio::test]
    async fn kernel_overflow_and_watcher_errors_ask_for_a_full_scan() {
        let dirs = dirs();
        let (tx, _rx) = mpsc::channel(1);
        let (mut state, _events) =
            SpoolWatch::start(config(&dirs.root), tx, CancellationToken::new(), 1).unwrap();

        let overflow = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert!(state.handle_event(Ok(overflow)).await.is_continue());
        assert_eq!(state.scan_queue, [ScanRequest::Full]);

        // A directory scan is covered by the queued full scan.
        fs::create_dir(dirs.root.join("new")).unwrap();
        let created =
            Event::new(EventKind::Create(CreateKind::Folder)).add_path(dirs.root.join("new"));
        assert!(state.handle_event(Ok(created)).await.is_continue());
        assert_eq!(state.scan_queue, [ScanRequest::Full]);

        state.scan_queue.clear();
        let error = notify::Error::new(notify::ErrorKind::MaxFilesWatch);
        assert!(state.handle_event(Err(error)).await.is_continue());
        assert_eq!(state.scan_queue, [ScanRequest::Full]);
    }

    #[tokio::test]
    async fn removal_forgets_the_file() {
        let dirs = dirs();
        let mut running = start(config(&dirs.root));

        // Pending (still open), then removed: never offered.
        let mut pending = File::create(dirs.root.join("a.dat")).unwrap();
        pending.write_all(b"partial").unwrap();
        fs::remove_file(dirs.root.join("a.dat")).unwrap();
        drop(pending);

        // Offered, moved out and back unchanged: offered again, as the
        // consumer may have disposed of its copy meanwhile.
        let path = drop_in(&dirs, "b.dat", b"bravo");
        let first = running.next().await;
        assert_eq!(first.relative, "b.dat");
        fs::rename(&path, dirs.outside.join("b.dat")).unwrap();
        fs::rename(dirs.outside.join("b.dat"), &path).unwrap();
        assert_eq!(running.next().await, first);
        running.assert_quiet(3 * SETTLE).await;
    }

    #[tokio::test]
    async fn removed_spool_directory_is_recreated_and_watched() {
        let dirs = dirs();
        let mut running = start(config(&dirs.root));
        fs::remove_dir_all(&dirs.root).unwrap();
        eventually("spool directory recreated", || dirs.root.is_dir()).await;
        fs::write(dirs.root.join("after.dat"), b"x").unwrap();
        assert_eq!(running.next().await.relative, "after.dat");
    }

    #[tokio::test]
    async fn spawn_creates_the_spool_and_stops_on_shutdown() {
        let dirs = dirs();
        let root = dirs.root.join("new/spool");
        let mut running = start(config(&root));
        assert!(root.is_dir());
        assert_eq!(running.handle.root(), root);
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
