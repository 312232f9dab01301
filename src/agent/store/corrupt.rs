//! Noticing a damaged buffer: which SQLite errors mean the file is corrupt,
//! the check run when the agent opens its buffer, the notice left next to a
//! damaged buffer for `status` and `doctor`, and the lock that keeps
//! `indexedcp doctor` and a running daemon off the same buffer.
//!
//! SQLite reports damage (`SQLITE_CORRUPT`, `SQLITE_NOTADB`) from whichever
//! statement meets a bad page, in any of the store's methods and at any time.
//! Every SQLite error of the store becomes a [`StoreError`] through one
//! conversion, so that conversion is where damage is noticed: it tells the
//! listeners registered with [`on_corruption`] (the agent registers one, which
//! stops ingest). The conversion does not know which database failed; that is
//! fine because a process holds one agent buffer, and only the agent listens.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{Result, Store, StoreError};

/// Whether SQLite's error says that the database file is damaged or is not a
/// database at all.
pub(crate) fn is_corruption(error: &rusqlite::Error) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(f, _)
        if matches!(f.code, rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase))
}

/// The same for an error that only has SQLite's message left (the connection
/// pool keeps its errors as text). SQLite's messages for these two codes are
/// fixed strings (`sqlite3ErrStr`).
pub(crate) fn is_corruption_text(message: &str) -> bool {
    message.contains("database disk image is malformed")
        || message.contains("file is not a database")
}

type Listener = Box<dyn Fn(&str) + Send + Sync>;

static LISTENERS: Mutex<Vec<Listener>> = Mutex::new(Vec::new());

/// Calls `listener` with SQLite's message each time a statement of the buffer
/// meets damage, from the thread that met it: it must be quick and must not
/// use the store.
pub(crate) fn on_corruption(listener: impl Fn(&str) + Send + Sync + 'static) {
    LISTENERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(Box::new(listener));
}

/// Tells the listeners that a statement met damage.
pub(super) fn report(detail: &str) {
    for listener in LISTENERS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .iter()
    {
        listener(detail);
    }
}

/// What the agent knows of damage to its buffer, shared with `status`
/// reporting (sd_notify, metrics): `None` while none was seen.
#[derive(Clone, Default)]
pub(crate) struct CorruptionFlag(Arc<Mutex<Option<String>>>);

impl CorruptionFlag {
    /// Records the first damage seen; later reports keep the first message.
    pub(crate) fn set(&self, detail: &str) {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if seen.is_none() {
            *seen = Some(detail.to_owned());
        }
    }

    /// The first damage seen, if any.
    pub(crate) fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What an operator reads about a damaged buffer, wherever it is shown (the
/// log, `status`, sd_notify, the daemon's last words).
pub fn corrupt_message(path: &Path, detail: &str) -> String {
    format!(
        "buffer corrupt: {} is damaged ({detail}); stop the daemon and run `indexedcp doctor` \
         with the daemon's --config (or --storage {0}) to set the damaged file aside and keep \
         every intact file",
        path.display()
    )
}

/// The notice file left next to a damaged buffer (`buffer.db.corrupt`): it
/// holds what was seen, so that `status` says so even when its own queries
/// do not touch the damaged pages. `doctor` removes it, and so does an agent
/// whose check finds the buffer sound again.
pub(crate) fn notice_path(buffer: &Path) -> PathBuf {
    with_suffix(buffer, ".corrupt")
}

/// Leaves the notice (best effort: a buffer on a read-only or full disk
/// still has its message in the log).
pub(crate) fn write_notice(buffer: &Path, detail: &str) {
    let _ = std::fs::write(notice_path(buffer), format!("{detail}\n"));
}

/// What the notice says, if there is one.
pub fn read_notice(buffer: &Path) -> Option<String> {
    std::fs::read_to_string(notice_path(buffer))
        .ok()
        .map(|text| text.trim().to_owned())
}

/// Removes the notice, if there is one.
pub(crate) fn clear_notice(buffer: &Path) {
    let _ = std::fs::remove_file(notice_path(buffer));
}

/// `path` with `suffix` appended to its file name (`buffer.db` + `.lock`).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A lock on `<buffer>.lock`: every process that opens the buffer holds it
/// shared, and `indexedcp doctor` holds it alone, so that the two never work
/// on the same file. It is an `flock`, separate from SQLite's own locks, and
/// the kernel drops it when the process ends, however it ends.
pub(crate) struct BufferLock {
    _file: File,
}

impl BufferLock {
    /// The shared lock of a process using the buffer. Refused only while
    /// `doctor` repairs the buffer; a lock file that cannot be created (a
    /// read-only state directory) leaves the buffer unlocked, as before.
    pub(crate) fn shared(buffer: &Path) -> Result<Option<BufferLock>> {
        let Ok(file) = open_lock_file(buffer) else {
            return Ok(None);
        };
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
            Ok(()) => Ok(Some(BufferLock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(StoreError::InUse {
                path: buffer.display().to_string(),
                by: "`indexedcp doctor`, which is repairing it; wait until it is done",
            }),
            Err(_) => Ok(None),
        }
    }

    /// The lock `doctor` needs: refused while any other process (a running
    /// daemon, a one-shot upload, a `status`) has the buffer open.
    pub(crate) fn exclusive(buffer: &Path) -> Result<BufferLock> {
        let in_use = || StoreError::InUse {
            path: buffer.display().to_string(),
            by: "another indexedcp process (a running daemon?); stop it first (systemctl stop indexedcp)",
        };
        let file = open_lock_file(buffer).map_err(|e| StoreError::Io {
            about: "cannot create the buffer's lock file",
            path: with_suffix(buffer, ".lock").display().to_string(),
            source: e,
        })?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(BufferLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(in_use()),
            Err(e) => Err(StoreError::Io {
                about: "cannot lock the buffer",
                path: with_suffix(buffer, ".lock").display().to_string(),
                source: e.into(),
            }),
        }
    }
}

fn open_lock_file(buffer: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(with_suffix(buffer, ".lock"))
}

/// Reads the buffer's header and schema on a connection of its own, before
/// the pool opens: a damaged first page or a file that is not a database
/// then says so, instead of failing the pool's set-up with a message about
/// the state directory.
pub(super) fn probe(path: &Path) -> Result<()> {
    if std::fs::metadata(path).map_or(true, |m| m.len() == 0) {
        return Ok(()); // A new buffer.
    }
    let Ok(conn) = rusqlite::Connection::open(path) else {
        return Ok(()); // The pool reports why it cannot be opened.
    };
    let _ = conn.busy_timeout(std::time::Duration::from_secs(60));
    match conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Err(e) if is_corruption(&e) => Err(StoreError::Corrupt {
            path: path.display().to_string(),
            detail: e.to_string(),
        }),
        _ => Ok(()),
    }
}

impl Store {
    /// `PRAGMA quick_check`: every page of every table and index is read
    /// and its structure checked (an index's entries are not matched to
    /// their rows; `integrity_check` does that, at several times the cost).
    /// It reads the whole file, chunk bytes included: about a second per
    /// GiB from the page cache (see the README for figures). Returns
    /// [`StoreError::Corrupt`] with SQLite's findings when the buffer is
    /// damaged.
    pub(crate) fn quick_check(&self) -> Result<()> {
        let conn = self.pool.get()?;
        let found: rusqlite::Result<Vec<String>> = conn
            .prepare("PRAGMA quick_check(20)")
            .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect());
        match found {
            Ok(lines) if lines.len() == 1 && lines[0] == "ok" => Ok(()),
            Ok(lines) => Err(StoreError::Corrupt {
                path: self.path.display().to_string(),
                detail: format!("quick_check: {}", lines.join("; ")),
            }),
            Err(e) if is_corruption(&e) => Err(StoreError::Corrupt {
                path: self.path.display().to_string(),
                detail: e.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The buffer's file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}
