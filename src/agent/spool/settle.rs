//! The settle rule: when a file seen changing is complete. A file closed after
//! writing (or renamed in) only has to stay unchanged for a moment and must not
//! be open for writing elsewhere; any other file must stay unchanged in
//! identity for the spool's `settle` period.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::{SourceIdentity, SpoolWatch};

/// How long a file closed after writing must stay unchanged before it is
/// offered. Not zero: a writer that rewrites a file in place (open with
/// O_TRUNC, write, close, again) closes one version while the next is already
/// truncated, and the close event must not offer that empty moment. Two stats
/// this far apart must agree; closed files are looked at on their own timer,
/// not the settle tick, so a closed file is offered this soon after its close.
pub(super) const CLOSE_QUIET: Duration = Duration::from_millis(25);

/// The least time between two looks at closed files: a burst of closes is
/// looked at in batches, not once per close.
const CLOSE_CHECK_SPACING: Duration = Duration::from_millis(5);

/// A file seen changing; it is offered once its identity stays the same for
/// `settle`.
#[derive(Debug)]
pub(super) struct Pending {
    /// `None` until the first stat after an event.
    pub(super) seen: Option<SourceIdentity>,
    /// When `seen` was last observed to change.
    pub(super) since: Instant,
    /// The writer closed the file and nothing changed it since: it only has to
    /// stay quiet for [`CLOSE_QUIET`] instead of the full settle period.
    pub(super) closed: bool,
}

impl SpoolWatch {
    /// Applies the settle rule: stats the pending files (`which`: all, at the
    /// settle tick; only the closed ones, at their own quicker timer) and
    /// offers those whose identity has not changed for long enough.
    pub(super) async fn settle_pending(&mut self, which: Look) -> ControlFlow<()> {
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
                        file = %super::escape_name(&relative),
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
}

/// How often pending files are looked at: often enough that a file is offered
/// soon after it settled, rarely enough to cost nothing when idle.
pub(super) fn tick_period(settle: Duration) -> Duration {
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
pub(super) enum Look {
    All,
    Closed,
}

/// Resolves at `at`; never when there is no `at`.
pub(super) async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    use tokio::time::Instant;

    use super::super::testkit::*;

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
}
