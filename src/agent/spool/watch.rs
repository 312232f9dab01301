//! The notify side of the watcher: the watcher itself, whose callback only
//! forwards events into a bounded channel (never blocking notify's thread), and
//! the task's handling of each event: which paths count, what a create, rename,
//! close, change or removal means for the pending and offered files, and
//! recreating the spool root when it disappears.

use std::collections::BTreeMap;
use std::fs;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::filter::{has_hidden_component, is_hidden};
use super::scan::{NEW_DIRECTORY_RESCAN, ScanRequest};
use super::settle::{CLOSE_QUIET, Pending};
use super::{SourceIdentity, SpoolWatch};

/// Events buffered between notify's thread and the watcher task. When the task
/// falls further behind, events are dropped and a full scan catches up, so
/// notify's thread never blocks. Room for a burst of ten thousand files
/// dropped at once (a few MiB at most): a full scan of a large spool costs far
/// more than the queue.
pub(super) const EVENT_QUEUE: usize = 16384;

/// What an operator can do about a watcher failure.
pub(super) fn watch_hint(error: &notify::Error) -> &'static str {
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

pub(super) fn start_watcher(
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

/// Where a path reported by notify lies.
enum Place {
    Root,
    Entry(String),
    /// Relative, but not valid UTF-8.
    NonUtf8(PathBuf),
    Outside,
}

/// The spool root was removed or moved away.
pub(super) struct RootLost {
    /// Whether a failure to recreate it was logged already.
    failure_logged: bool,
}

impl SpoolWatch {
    /// Applies one notify event, or a watcher error, to the pending and
    /// offered files. Anything that may have lost events queues a full scan.
    pub(super) async fn handle_event(&mut self, event: notify::Result<Event>) -> ControlFlow<()> {
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
        self.start_over();
    }

    /// Forgets everything known about the spool's contents, drops the old
    /// watch (a moved or hidden directory keeps it, and must not report under
    /// our name) and watches the path again, as at start.
    fn start_over(&mut self) {
        self.pending.clear();
        self.offered.clear();
        self.reported.clear();
        self.scan_queue.clear();
        let _ = self.watcher.unwatch(&self.watch_root);
        self.root_lost = Some(RootLost {
            failure_logged: false,
        });
        self.watch_again();
    }

    /// Watches the spool again when its path names another directory than
    /// the one watched: a file system mounted over it (a data disk or a
    /// share that mounts late) or a directory put in its place. The old
    /// watch sees nothing of the new directory, whose files would otherwise
    /// wait for the periodic safety scan.
    pub(super) fn check_root_identity(&mut self) {
        let now = super::dir_identity(&self.watch_root);
        if now.is_none() || now == self.root_identity {
            // A missing root is the removal that notify reports itself.
            return;
        }
        warn!(
            spool = %self.spool_root.display(),
            "the spool path now names another directory (a file system was mounted over it, or it was replaced); watching the new one"
        );
        self.root_identity = now;
        self.start_over();
    }

    pub(super) fn watch_again(&mut self) {
        let result = fs::create_dir_all(&self.watch_root)
            .map_err(notify::Error::io)
            .and_then(|()| self.watcher.watch(&self.watch_root, self.mode));
        match result {
            Ok(()) => {
                info!(spool = %self.spool_root.display(), "spool directory recreated; watching it again");
                self.root_lost = None;
                self.root_identity = super::dir_identity(&self.watch_root);
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

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    use notify::event::CreateKind;
    use notify::{Event, EventKind};
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::super::SpoolWatch;
    use super::super::scan::ScanRequest;
    use super::super::testkit::*;

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
}
