//! Full and directory scans: the walk over the spool on a blocking thread
//! (at start-up, after an overflow or watcher error, on request, as a periodic
//! safety net, and for each new directory), and what the task does with each
//! entry found.

use std::fs::{self, FileType};
use std::io;
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::filter::Filter;
use super::settle::Pending;
use super::{SourceIdentity, SpoolWatch};

/// Entries a scan may walk ahead of the task.
const SCAN_QUEUE: usize = 256;

/// How often a full scan runs anyway, as a safety net for events the kernel
/// or notify may not deliver (it offers only files not offered as they are).
pub(super) const SAFETY_SCAN_PERIOD: Duration = Duration::from_secs(60);

/// How long after a new directory appears it is scanned a second time.
/// notify adds the watch for a new directory only after handing out its create
/// event, so a file renamed into it between the first scan and the watch would
/// otherwise be missed.
pub(super) const NEW_DIRECTORY_RESCAN: Duration = Duration::from_millis(1000);

/// A scan waiting to run; a queued full scan makes directory scans redundant.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ScanRequest {
    Full,
    /// A directory, relative to the root, that appeared after start.
    Directory(String),
}

/// What a scan found, sent from the blocking walker to the task.
#[derive(Debug)]
pub(super) enum ScanItem {
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

impl SpoolWatch {
    pub(super) async fn handle_scan_item(&mut self, item: ScanItem) -> ControlFlow<()> {
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
                        file = %super::escape_name(&path.display().to_string()),
                        error = %error,
                        "cannot read directory; its files are not sent until its permissions are fixed"
                    );
                }
            }
        }
        ControlFlow::Continue(())
    }

    pub(super) fn request_scan(&mut self, request: ScanRequest) {
        // A queued full scan covers every directory scan.
        if self.scan_queue.contains(&ScanRequest::Full) || self.scan_queue.contains(&request) {
            return;
        }
        if request == ScanRequest::Full {
            self.scan_queue.clear();
        }
        self.scan_queue.push_back(request);
    }

    pub(super) fn start_next_scan(&mut self) -> Option<mpsc::Receiver<ScanItem>> {
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
}

/// The next item of the running scan; never resolves when no scan runs.
pub(super) async fn next_scan_item(
    scan: &mut Option<mpsc::Receiver<ScanItem>>,
) -> Option<ScanItem> {
    match scan {
        Some(items) => items.recv().await,
        None => std::future::pending().await,
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
    use std::fs;
    use std::os::unix::net::UnixListener;

    use super::super::testkit::*;
    use super::*;

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
}
