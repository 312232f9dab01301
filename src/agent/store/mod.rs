//! The agent's buffer: every file waiting for (or done with) upload, its chunks
//! as BLOBs, retry bookkeeping and the last errors, in one SQLite file
//! (`<state_dir>/buffer.db`) behind an r2d2 pool.
//!
//! All SQL lives here. Every method blocks: callers run them off the async
//! executor (`spawn_blocking`). This module knows nothing of tokio, HTTP or the
//! config file. The commit that makes a file durable runs with
//! `synchronous = FULL` because the source is deleted right after it; progress
//! with a resumable receiver may be recorded without a sync ([`Durability`]).
//! The buffer uses 64 KiB pages and checkpoints its WAL itself
//! ([`Store::trim_wal`]), after files are confirmed rather than while they are
//! sent.

use std::path::Path;
use std::time::Duration;

use crate::agent::spool::SourceIdentity;
use crate::clock::now_ms;
use crate::sqlite::{self, Pool};

mod admin;
mod ingest;
mod queue;
mod schema;

pub use ingest::{ChunkSink, IngestDecision};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the buffer {path}: {source}; check that the state directory exists and is writable"
    )]
    Open {
        path: String,
        #[source]
        source: r2d2::Error,
    },
    #[error("buffer database: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("buffer database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("buffer database: {0}")]
    Migrate(#[from] sqlite::MigrateError),
    #[error("no buffered file with id {0}")]
    NoSuchFile(i64),
}

impl StoreError {
    /// Whether the error means the disk holding the buffer is full.
    pub(crate) fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Sql(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DiskFull)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Errors kept per chunk.
pub const ERROR_HISTORY: usize = 5;

/// Where a buffered file is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    /// Waiting for (or in) delivery.
    Queued,
    /// Parked: refused, or out of retries, until an operator retries it.
    Failed,
    /// Delivered; only the record is kept, for a while.
    Confirmed,
}

impl std::fmt::Display for FileState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FileState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FileState::Queued => "queued",
            FileState::Failed => "failed",
            FileState::Confirmed => "confirmed",
        }
    }
    fn parse(s: &str) -> FileState {
        match s {
            "failed" => FileState::Failed,
            "confirmed" => FileState::Confirmed,
            _ => FileState::Queued,
        }
    }
}

/// A new file about to be buffered.
#[derive(Debug, Clone)]
pub struct NewFile {
    pub spool: String,
    pub rel_path: String,
    pub remote_name: String,
    pub target: String,
    pub chunk_size: u64,
    pub upload_id: String,
    pub src_path: String,
    pub identity: SourceIdentity,
    /// Remember the identity so that a kept source is never ingested again.
    pub remember_kept: bool,
}

/// A buffered file as the uploader and `status` see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileRecord {
    pub id: i64,
    pub spool: String,
    pub rel_path: String,
    pub remote_name: String,
    pub target: String,
    pub size: u64,
    pub sha256: String,
    pub chunk_count: u64,
    pub upload_id: String,
    pub state: FileState,
    pub failure: Option<String>,
    pub server_name: Option<String>,
    pub created_at: i64,
    pub confirmed_at: Option<i64>,
    /// Chunks acknowledged by the receiver.
    pub chunks_uploaded: u64,
    /// The highest retry count among the file's chunks.
    pub retries: u64,
    /// When the next attempt is due (ms since epoch), for queued files.
    pub next_attempt: Option<i64>,
    pub last_error: Option<String>,
    /// The delivery's resume state for this file, if it recorded one.
    #[serde(skip)]
    pub delivery_state: Option<String>,
}

/// A chunk's metadata (without its bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMeta {
    pub idx: u64,
    pub offset: u64,
    pub length: u64,
    pub sha256: String,
    pub uploaded: bool,
    pub retry_count: u64,
    /// What the delivery recorded when the piece holding this chunk was
    /// acknowledged (a part's ETag), if anything.
    pub ack: Option<String>,
}

/// One target's share of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetQueue {
    pub target: String,
    pub queued_files: u64,
    pub queued_bytes: u64,
    pub failed_files: u64,
    /// When the oldest queued file was buffered (ms since the epoch).
    pub oldest_queued_at: Option<i64>,
}

/// How a bookkeeping commit is made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced before returning (`synchronous = FULL`).
    Synced,
    /// Written to the WAL but not synced: a power cut may undo it, a crash
    /// does not. For progress a resumable receiver can tell again.
    Unsynced,
}

impl Durability {
    fn run<T>(
        self,
        conn: &mut rusqlite::Connection,
        f: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        match self {
            Durability::Synced => f(conn),
            Durability::Unsynced => sqlite::unsynced(conn, f),
        }
    }
}

/// A commit that left the WAL at least this large is followed by a WAL
/// checkpoint that truncates it, so that a file's bytes are not held twice on
/// disk for long; small commits share one checkpoint.
const WAL_TRUNCATE_AFTER: u64 = 4 << 20;

/// Page size of a new buffer: chunks are BLOBs of up to several MiB.
const BLOB_PAGE_SIZE: u32 = 65536;

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    path: std::path::PathBuf,
}

impl Store {
    /// Opens (creating and migrating) the buffer at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let pool =
            sqlite::open_pool_with(path, Duration::from_secs(60), Some(BLOB_PAGE_SIZE), false)
                .map_err(|source| StoreError::Open {
                    path: path.display().to_string(),
                    source,
                })?;
        sqlite::migrate(&pool, schema::MIGRATIONS)?;
        Ok(Store {
            pool,
            path: path.to_owned(),
        })
    }

    /// Bytes the buffer can still grow by: free space for an unprivileged
    /// writer on its file system plus the database's free pages, if known.
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        let disk = self.free_disk_bytes()?;
        // Pages freed inside the database (by confirmed files) are reused
        // before the file grows: they count as free too.
        let reusable = self
            .pool
            .get()
            .ok()
            .and_then(|conn| {
                conn.prepare_cached("SELECT freelist_count * page_size FROM pragma_freelist_count(), pragma_page_size()").ok()?.query_row([],
                    |r| r.get::<_, i64>(0))
                .ok()
            })
            .unwrap_or(0)
            .max(0) as u64;
        Some(disk + reusable)
    }

    /// Free space for an unprivileged writer on the buffer's file system.
    fn free_disk_bytes(&self) -> Option<u64> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let stat = rustix::fs::statvfs(dir).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Bytes held for files not yet confirmed.
    pub fn buffered_bytes(&self) -> Result<u64> {
        let conn = self.pool.get()?;
        let n: i64 = conn
            .prepare_cached("SELECT coalesce(sum(size), 0) FROM files WHERE state != 'confirmed'")?
            .query_row([], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// [`Store::truncate_wal`] once the WAL has grown past
    /// 4 MiB (`WAL_TRUNCATE_AFTER`), so that small commits share one checkpoint; at
    /// once when the disk is nearly full, where the WAL's space is needed.
    /// (Commits never checkpoint by themselves: the buffer is opened without
    /// SQLite's automatic checkpoints.)
    pub(crate) fn trim_wal(&self) {
        let wal = self.wal_size();
        if wal >= WAL_TRUNCATE_AFTER || (wal > 0 && self.disk_is_tight()) {
            self.truncate_wal();
        }
    }

    /// [`Store::truncate_wal`] only when the disk is nearly full. After a
    /// large ingest: the bytes just committed are held once, in the WAL,
    /// until they are confirmed, and the checkpoint then (which has to copy
    /// them into the database) does not compete with their upload.
    pub(crate) fn trim_wal_if_tight(&self) {
        if self.wal_size() > 0 && self.disk_is_tight() {
            self.truncate_wal();
        }
    }

    fn wal_size(&self) -> u64 {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        std::fs::metadata(&wal).map_or(0, |m| m.len())
    }

    fn disk_is_tight(&self) -> bool {
        self.free_disk_bytes()
            .is_some_and(|free| free < 4 * WAL_TRUNCATE_AFTER)
    }

    /// Copies the WAL into the database and truncates it, so that a file's
    /// bytes are not held twice on disk (WAL and database) once committed. Best
    /// effort: with readers active it does what it can.
    pub(crate) fn truncate_wal(&self) {
        if let Ok(conn) = self.pool.get() {
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
    }

    #[cfg(test)]
    pub(crate) fn integrity_check(&self) -> Result<String> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached("PRAGMA integrity_check")?
            .query_row([], |r| r.get(0))?)
    }
}

#[cfg(test)]
pub(super) mod testing {
    use super::*;

    pub(super) fn new_file(name: &str, ino: u64) -> NewFile {
        NewFile {
            spool: "/spool".into(),
            rel_path: name.into(),
            remote_name: name.into(),
            target: "t".into(),
            chunk_size: 4,
            upload_id: format!("upload-{name}-0123456789"),
            src_path: format!("/spool/{name}"),
            identity: SourceIdentity {
                dev: 1,
                ino,
                size: 10,
                mtime_ns: 5,
            },
            remember_kept: false,
        }
    }

    pub(super) fn ingest(store: &Store, file: &NewFile, data: &[u8]) -> i64 {
        store
            .ingest(file, |sink| -> Result<IngestDecision> {
                for chunk in data.chunks(4) {
                    sink.push(chunk, "00")?;
                }
                Ok(IngestDecision::Commit {
                    sha256: "ff".into(),
                })
            })
            .unwrap()
            .unwrap()
    }
}
