//! The agent's buffer: every file waiting for (or done with) upload, its chunks
//! as BLOBs, retry bookkeeping and the last errors, in SQLite behind an r2d2
//! pool: two files, each connection attaching the second.
//!
//! - `<state_dir>/buffer.db`, with 4 KiB pages: the records, and the bytes
//!   of files buffered together in one transaction (small files).
//! - `<state_dir>/buffer-bulk.db`, with 64 KiB pages, attached as `bulk`:
//!   the bytes of files streamed in ([`Store::ingest_streaming`]).
//!
//! Every commit writes whole pages. Large pages suit chunks of a MiB (16 WAL
//! frames each instead of 256), but a commit that changes a few records
//! would write a 64 KiB page for each b-tree it touches; small pages keep
//! the records and small files cheap to write.
//!
//! SQLite makes a commit atomic in each file, not across the two, so no
//! commit needs both: a streamed file's bytes are committed in `bulk`
//! before the commit in `buffer.db` that makes the file complete, and bytes
//! leave `bulk` only after the commit that confirmed or removed their file.
//! A crash between the two leaves bytes no file needs, deleted later
//! ([`Store::forget_unfinished`]).
//!
//! All SQL lives here. Every method blocks: callers run them off the async
//! executor (`spawn_blocking`). This module knows nothing of tokio, HTTP or the
//! config file. The commit that makes a file durable runs with
//! `synchronous = FULL` because the source is deleted right after it (a large
//! file streamed in is committed unsynced chunk by chunk, and only its last
//! commits are synced: [`Store::ingest_streaming`]); progress
//! with a resumable receiver may be recorded without a sync ([`Durability`]).
//! The buffer checkpoints its WALs itself ([`Store::trim_wal`]), after files
//! are confirmed rather than while they are sent.
//!
//! A buffer made by an older build keeps its one file with 64 KiB pages and
//! the bytes already in it; new streamed files go to the bulk file. The
//! library's storage keeps 64 KiB pages in `buffer.db` ([`Layout::ByName`]):
//! it buffers every file in one transaction of its own, large ones too.

use std::path::Path;
use std::time::Duration;

use crate::agent::spool::SourceIdentity;
use crate::clock::now_ms;
use crate::sqlite::{self, Pool};

mod admin;
mod corrupt;
mod doctor;
mod ingest;
mod queue;
mod schema;

pub(crate) use corrupt::{CorruptionFlag, on_corruption};
pub(crate) use corrupt::{clear_notice, write_notice};
pub use corrupt::{corrupt_message, read_notice};
pub use doctor::{DoctorReport, doctor};
pub use ingest::{ChunkSink, IngestDecision};

/// Why an operation on the buffer failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The buffer's database could not be opened or created.
    #[error(
        "cannot open the buffer {path}: {source}; check that the state directory exists and is writable"
    )]
    Open {
        /// The database file, as given to [`Store::open`].
        path: String,
        /// The connection pool's error, which carries SQLite's.
        #[source]
        source: r2d2::Error,
    },
    /// No connection could be taken from the pool: SQLite could not open one,
    /// or none became free within the pool's timeout.
    #[error("buffer database: {0}")]
    Pool(r2d2::Error),
    /// An SQLite statement failed (a full disk among other causes).
    #[error("buffer database: {0}")]
    Sql(rusqlite::Error),
    /// The buffer's file is damaged (`SQLITE_CORRUPT`), or is not an SQLite
    /// database (`SQLITE_NOTADB`), as found when it was opened or checked.
    #[error("{}", corrupt::corrupt_message(std::path::Path::new(path), detail))]
    Corrupt {
        /// The database file.
        path: String,
        /// What SQLite found.
        detail: String,
    },
    /// Another process holds the buffer's lock (`<buffer>.lock`).
    #[error("the buffer {path} is in use by {by}")]
    InUse {
        /// The database file.
        path: String,
        /// Who holds it, and what to do.
        by: &'static str,
    },
    /// A file next to the buffer (its lock, a salvaged copy) could not be
    /// created, renamed or synced.
    #[error("{about} {path}: {source}")]
    Io {
        /// What was being done.
        about: &'static str,
        /// The file it was done to.
        path: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The buffer's schema could not be brought up to this build's: the
    /// migration failed, or a newer build wrote the buffer.
    #[error("buffer database: {0}")]
    Migrate(#[from] sqlite::MigrateError),
    /// No file in the buffer has this id: it never existed, was purged, or
    /// was forgotten after its retention once confirmed.
    #[error("no buffered file with id {0}")]
    NoSuchFile(i64),
}

// Every SQLite error of the store passes here, so this is where damage met
// by any statement is noticed (see `corrupt`).
impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        if corrupt::is_corruption(&error) {
            corrupt::report(&error.to_string());
        }
        StoreError::Sql(error)
    }
}

impl From<r2d2::Error> for StoreError {
    fn from(error: r2d2::Error) -> StoreError {
        let text = error.to_string();
        if corrupt::is_corruption_text(&text) {
            corrupt::report(&text);
        }
        StoreError::Pool(error)
    }
}

impl StoreError {
    /// Whether the error means that the buffer's file is damaged or is not
    /// a database: ingest must stop, and `indexedcp doctor` is the way out.
    pub fn is_corrupt(&self) -> bool {
        match self {
            StoreError::Corrupt { .. } => true,
            StoreError::Sql(e) => corrupt::is_corruption(e),
            StoreError::Migrate(sqlite::MigrateError::Sql(e)) => corrupt::is_corruption(e),
            StoreError::Pool(e) | StoreError::Migrate(sqlite::MigrateError::Pool(e)) => {
                corrupt::is_corruption_text(&e.to_string())
            }
            StoreError::Open { source, .. } => corrupt::is_corruption_text(&source.to_string()),
            _ => false,
        }
    }

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
    /// The file's id in the buffer, assigned when it was buffered; records
    /// are listed in id order, oldest first.
    pub id: i64,
    /// The spool folder the file came from, as configured; `(path)` for a
    /// file buffered by name (the one-shot commands and the library).
    pub spool: String,
    /// The file's path relative to its spool; for a file buffered by name,
    /// its absolute path (the library's name for it).
    pub rel_path: String,
    /// The name sent to the receiver as `X-File-Name`: the spool's
    /// `remote_prefix` joined to `rel_path`, or the name a named file was
    /// given.
    pub remote_name: String,
    /// The name of the target the file is sent to (`cli` for the library and
    /// the one-shot commands).
    pub target: String,
    /// The file's size in bytes.
    pub size: u64,
    /// The SHA-256 of the whole file, 64 lowercase hex digits (sent as
    /// `X-File-Sha256`); empty while the file is still being buffered
    /// ([`FileRecord::is_buffering`]).
    pub sha256: String,
    /// How many chunks the file was cut into, with the target's chunk size at
    /// the time it was buffered; at least 1 (an empty file is one empty chunk).
    pub chunk_count: u64,
    /// The id sent as `X-Upload-Id`: 32 random hex digits picked when the file
    /// was buffered and kept across retries and restarts.
    pub upload_id: String,
    /// Where the file is in its life: queued, parked as failed, or confirmed.
    pub state: FileState,
    /// Why the file was parked; `None` unless it is [`FileState::Failed`].
    pub failure: Option<String>,
    /// The name the receiver stored the file under (its `actualFilename`);
    /// `None` until confirmed, or when the receiver did not say.
    pub server_name: Option<String>,
    /// When the file was buffered, in milliseconds since the Unix epoch.
    pub created_at: i64,
    /// When the receiver confirmed the whole file, in milliseconds since the
    /// Unix epoch; `None` until then.
    pub confirmed_at: Option<i64>,
    /// Chunks acknowledged by the receiver.
    pub chunks_uploaded: u64,
    /// The highest retry count among the file's chunks.
    pub retries: u64,
    /// When the next attempt is due (ms since epoch), for queued files.
    pub next_attempt: Option<i64>,
    /// The error of the most recent failed attempt at any of the file's
    /// chunks; it stays after later successes, and is `None` only if no
    /// attempt ever failed.
    pub last_error: Option<String>,
    /// The delivery's resume state for this file, if it recorded one.
    #[serde(skip)]
    pub delivery_state: Option<String>,
}

impl FileRecord {
    /// Whether the file is still being read into the buffer: a large file
    /// may be sent while it is, to a receiver that takes chunks before the
    /// file's hash; its size and chunk count are known, its hash is not, and
    /// its last chunk comes with the (synced) commit that seals it.
    pub fn is_buffering(&self) -> bool {
        self.state == FileState::Queued && self.sha256.is_empty()
    }
}

/// A chunk's metadata (without its bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMeta {
    /// The chunk's 0-based index in its file (sent as `X-Chunk-Index`).
    pub idx: u64,
    /// Where the chunk starts in the file, in bytes (sent as `X-Chunk-Offset`).
    pub offset: u64,
    /// The chunk's length in bytes: the file's chunk size, except for the
    /// last chunk, which may be shorter.
    pub length: u64,
    /// The SHA-256 of the chunk's bytes, 64 lowercase hex digits (sent as
    /// `X-Chunk-Sha256`). Empty for a chunk of a file of several chunks
    /// buffered by this version: its CRC-32C stands in for it, and a peer
    /// that needs the SHA-256 gets it worked out from the bytes read back,
    /// once they match the CRC.
    pub sha256: String,
    /// The CRC-32C of the chunk's bytes, taken as they were read from the
    /// source (sent as `X-Chunk-Crc32c`); `None` for a chunk buffered by an
    /// older version.
    pub crc32c: Option<u32>,
    /// Whether the receiver acknowledged the chunk, or confirmed its file.
    pub uploaded: bool,
    /// Failed attempts at this chunk since it was buffered, or since
    /// `indexedcp retry` last re-queued its file.
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
            // Set again, whatever a failed restore left on this connection.
            Durability::Synced => {
                sqlite::set_synchronous(conn, "FULL")?;
                f(conn)
            }
            Durability::Unsynced => sqlite::unsynced(conn, f),
        }
    }
}

/// A commit that left the WAL at least this large is followed by a WAL
/// checkpoint that truncates it, so that the WAL stays bounded while files
/// are buffered; otherwise the WAL is checkpointed once the buffer holds no
/// chunk data ([`Store::trim_wal`]). Until then a checkpoint would copy the
/// pages of files not yet delivered into the database, writing them a second
/// time, while a delivered file's pages are cut off the database first and
/// never copied.
const WAL_TRUNCATE_AFTER: u64 = 64 << 20;

/// The WALs are checkpointed when the buffer empties only once they hold
/// this much: files that arrive one at a time each empty the buffer, and a
/// checkpoint after each copied the same record pages into the database
/// again (the bytes of delivered files are not copied either way: their
/// pages are cut off the database first, and a checkpoint skips frames
/// beyond its end).
const WAL_IDLE_CHECKPOINT: u64 = 4 << 20;

/// Free space on the buffer's disk below which the WAL is checkpointed after
/// every commit that trims it: its space is needed more than its savings.
const DISK_TIGHT: u64 = 16 << 20;

/// Page size of a new `bulk` database: chunks are BLOBs of up to several MiB.
const BLOB_PAGE_SIZE: u32 = 65536;

/// Page size of a new `buffer.db`: records, and small files' bytes.
const RECORD_PAGE_SIZE: u32 = 4096;

/// Which pages a new `buffer.db` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The daemon's buffer: files from spools, small ones in batches and
    /// large ones streamed into the bulk file; records in 4 KiB pages (an
    /// empty buffer of an older build, in 64 KiB pages, is rewritten).
    Spool,
    /// The library's and the one-shot commands' storage: every file is
    /// buffered in one transaction of its own, large ones too, so its bytes
    /// stay in `buffer.db`, which keeps 64 KiB pages (with 4 KiB pages,
    /// `indexedcp add` of a 256 MiB file went from 367-380 to 215-220 MB/s).
    ByName,
}

/// The schema name of the database of streamed files' bytes.
pub(super) const BULK: &str = "bulk";

/// The tables of a new `bulk` database. No foreign key can reach the
/// records in the other file: rows are deleted by the store, and an
/// insert replaces a row left by a file that no longer exists.
const BULK_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS chunk_data (
    file_id       INTEGER NOT NULL,
    idx           INTEGER NOT NULL,
    data          BLOB NOT NULL,
    PRIMARY KEY (file_id, idx)
);";

/// Deletes the bytes in `bulk` of files that are confirmed or gone. Run in a
/// transaction that holds the write lock (`BEGIN IMMEDIATE`), so that it
/// sees the records as of the bytes' latest commit. The file ids come from
/// the table's index, without reading its rows (a chunk fills pages).
pub(super) const DELETE_UNNEEDED_BULK: &str = "DELETE FROM bulk.chunk_data WHERE file_id IN
    (SELECT DISTINCT b.file_id FROM bulk.chunk_data b WHERE NOT EXISTS
        (SELECT 1 FROM main.files f WHERE f.id = b.file_id AND f.state != 'confirmed'))";

/// Counts the chunks of complete, waiting files whose bytes are in neither
/// file: not 0 when the bulk file is missing or was replaced.
pub(super) const MISSING_BYTES: &str = "SELECT count(*) FROM chunks c JOIN files f ON f.id = c.file_id
    WHERE f.state != 'confirmed' AND f.sha256 != ''
      AND NOT EXISTS (SELECT 1 FROM main.chunk_data d WHERE d.file_id = c.file_id AND d.idx = c.idx)
      AND NOT EXISTS (SELECT 1 FROM bulk.chunk_data b WHERE b.file_id = c.file_id AND b.idx = c.idx)";

/// The file of the `bulk` database of the buffer at `path`: `buffer.db`
/// gives `buffer-bulk.db`.
pub fn bulk_path(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bulk = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem}-bulk.{ext}"),
        _ => format!("{name}-bulk"),
    };
    path.with_file_name(bulk)
}

/// The agent's upload buffer: a handle on its SQLite file, cheap to clone
/// (clones share one connection pool). Every method blocks.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    path: std::path::PathBuf,
    /// Held while any clone lives: keeps `indexedcp doctor` away.
    _lock: Option<std::sync::Arc<corrupt::BufferLock>>,
    /// Counts the commits of files being streamed in
    /// ([`Store::ingest_streaming`]), for uploads that wait for their chunks.
    commits: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// Files this process is streaming in right now. A file still being
    /// buffered that is not among them is left over from a streaming-in
    /// that stopped and could not be removed (a full disk): no upload waits
    /// for its chunks; the next start removes it.
    ingesting: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<i64>>>,
    /// Bytes of chunk data of confirmed files not deleted yet (see
    /// [`Store::confirm`]), as far as this process knows (rows left by an
    /// earlier process go with the next emptying). Held for the whole
    /// transaction that reads and changes it.
    confirmed_data: std::sync::Arc<std::sync::Mutex<u64>>,
    /// Uploader writes waiting for (or holding) the buffer's write lock: a
    /// file being streamed in lets them go first at its next commit
    /// ([`Store::ingest_streaming`]), since SQLite's busy handler, which
    /// sleeps between tries, would otherwise miss the moment between two
    /// commits for the whole file (an S3 upload id created and then not
    /// recorded for seconds, among others).
    waiting_writers: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one uploader write in [`Store::waiting_writers`] while it lives.
pub(crate) struct WriterWaiting(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for WriterWaiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Store {
    /// Opens (creating and migrating) the buffer at `path`. A file that is
    /// damaged where opening reads it (its header, its schema), or that is
    /// not a database, gives [`StoreError::Corrupt`]; damage elsewhere shows
    /// when a statement meets it, or in `Store::quick_check`. For the
    /// daemon's buffer (`Layout::Spool`).
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_as(path, Layout::Spool)
    }

    /// [`Store::open`] with the page layout of `layout`, which matters when
    /// the buffer is created, and for an empty buffer of an older build.
    pub fn open_as(path: &Path, layout: Layout) -> Result<Store> {
        let lock = corrupt::BufferLock::shared(path)?;
        corrupt::probe(path)?;
        let corrupt = |detail: String| StoreError::Corrupt {
            path: path.display().to_string(),
            detail,
        };
        // The bulk file too, named in the detail: doctor is run on the buffer.
        let bulk = bulk_path(path);
        corrupt::probe(&bulk).map_err(|e| match e {
            StoreError::Corrupt { detail, .. } => corrupt(format!("{}: {detail}", bulk.display())),
            other => other,
        })?;
        // Best effort: a buffer that cannot be converted works as it is.
        if layout == Layout::Spool {
            let _ = schema::convert_page_size(path, RECORD_PAGE_SIZE);
        }
        let bulk_existed = bulk.exists();
        let pool = sqlite::open_pool_attached(
            path,
            Duration::from_secs(60),
            Some(match layout {
                Layout::Spool => RECORD_PAGE_SIZE,
                Layout::ByName => BLOB_PAGE_SIZE,
            }),
            false,
            Some(sqlite::Attached {
                path: &bulk,
                schema: BULK,
                page_size: BLOB_PAGE_SIZE,
                create: BULK_SCHEMA,
            }),
        )
        .map_err(|source| {
            let text = source.to_string();
            if corrupt::is_corruption_text(&text) {
                corrupt(text)
            } else {
                StoreError::Open {
                    path: path.display().to_string(),
                    source,
                }
            }
        })?;
        sqlite::migrate(&pool, schema::MIGRATIONS).map_err(|e| {
            let e = StoreError::from(e);
            if e.is_corrupt() {
                corrupt(e.to_string())
            } else {
                e
            }
        })?;
        // A bulk file created just now, for a buffer whose waiting files had
        // bytes in one: it was deleted, or the buffer copied without it.
        // Removed again, so that every start says so until `doctor` runs.
        if !bulk_existed {
            let missing: i64 = pool.get()?.query_row(MISSING_BYTES, [], |r| r.get(0))?;
            if missing > 0 {
                drop(pool);
                doctor::remove_database(&bulk);
                return Err(corrupt(format!(
                    "{} is missing: {missing} chunks of waiting files have no bytes",
                    bulk.display()
                )));
            }
        }
        schema::enable_incremental_vacuum(&*pool.get()?)?;
        Ok(Store {
            pool,
            path: path.to_owned(),
            _lock: lock.map(std::sync::Arc::new),
            commits: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
            ingesting: Default::default(),
            confirmed_data: Default::default(),
            waiting_writers: Default::default(),
        })
    }

    /// Marks an uploader write as waiting until the guard is dropped.
    pub(crate) fn writer_waiting(&self) -> WriterWaiting {
        self.waiting_writers
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        WriterWaiting(self.waiting_writers.clone())
    }

    /// Between two commits of a file being streamed in: lets uploader
    /// writes that wait for the write lock have it first, for up to 250 ms.
    pub(crate) fn let_writers_in(&self) {
        let until = std::time::Instant::now() + Duration::from_millis(250);
        while self
            .waiting_writers
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
            && std::time::Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether this process is streaming file `id` in right now.
    pub(crate) fn is_ingesting(&self, id: i64) -> bool {
        self.ingesting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&id)
    }

    fn set_ingesting(&self, id: i64, now: bool) {
        let mut ids = self
            .ingesting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now {
            ids.insert(id);
        } else {
            ids.remove(&id);
        }
    }

    /// Changes with every commit of a file being streamed in (its chunks,
    /// its sealing, its removal), in this process.
    pub(crate) fn watch_commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    /// Bytes the buffer can still grow by: free space for an unprivileged
    /// writer on its file system plus the database's free pages, if known.
    pub(crate) fn free_bytes(&self) -> Option<u64> {
        let disk = self.free_disk_bytes()?;
        // Pages freed inside the databases (by confirmed files) are reused
        // before the files grow: they count as free too.
        let reusable = self
            .pool
            .get()
            .ok()
            .and_then(|conn| {
                let mut free = 0i64;
                for schema in ["main", BULK] {
                    let pages: i64 = conn
                        .prepare_cached(&format!("PRAGMA {schema}.freelist_count"))
                        .ok()?
                        .query_row([], |r| r.get(0))
                        .ok()?;
                    let size: i64 = conn
                        .prepare_cached(&format!("PRAGMA {schema}.page_size"))
                        .ok()?
                        .query_row([], |r| r.get(0))
                        .ok()?;
                    free += pages * size;
                }
                Some(free)
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

    /// [`Store::truncate_wal`] once the buffer holds no chunk data (the
    /// checkpoint then copies only bookkeeping) and the WALs hold 4 MiB
    /// (`WAL_IDLE_CHECKPOINT`), or once they have grown past 64 MiB
    /// (`WAL_TRUNCATE_AFTER`); at once when the disk is nearly full, where
    /// the WAL's space is needed. (Commits never checkpoint by themselves:
    /// the buffer is opened without SQLite's automatic checkpoints.)
    pub(crate) fn trim_wal(&self) {
        let wal = self.wal_size();
        if wal == 0 {
            return;
        }
        if wal >= WAL_TRUNCATE_AFTER
            || self.disk_is_tight()
            || (wal >= WAL_IDLE_CHECKPOINT && !self.holds_chunk_data())
        {
            self.truncate_wal();
        }
    }

    /// Syncs `buffer.db`'s WAL, which makes every commit in it durable
    /// (those made with `synchronous = NORMAL` too). Called with the write
    /// lock held, before bytes in `bulk` are deleted on the strength of the
    /// records.
    pub(super) fn sync_records(&self) -> Result<()> {
        let wal = corrupt::with_suffix(&self.path, "-wal");
        let io = |about, source| StoreError::Io {
            about,
            path: wal.display().to_string(),
            source,
        };
        match std::fs::File::open(&wal) {
            Ok(file) => file
                .sync_data()
                .map_err(|e| io("cannot sync the buffer's WAL", e)),
            // No WAL: every commit is in the database file, synced by the
            // checkpoint that moved it there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot open the buffer's WAL", e)),
        }
    }

    /// Whether any file's chunk bytes are in the buffer (true when unsure).
    fn holds_chunk_data(&self) -> bool {
        let Ok(conn) = self.pool.get() else {
            return true;
        };
        conn.prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM main.chunk_data) OR EXISTS (SELECT 1 FROM bulk.chunk_data)",
        )
        .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
        .unwrap_or(true)
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

    /// The size of both WALs.
    fn wal_size(&self) -> u64 {
        [self.path.clone(), bulk_path(&self.path)]
            .into_iter()
            .map(|path| {
                std::fs::metadata(corrupt::with_suffix(&path, "-wal")).map_or(0, |m| m.len())
            })
            .sum()
    }

    fn disk_is_tight(&self) -> bool {
        self.free_disk_bytes().is_some_and(|free| free < DISK_TIGHT)
    }

    /// Copies the WALs into their databases and truncates them, so that a
    /// file's bytes are not held twice on disk (WAL and database) once
    /// committed. Best effort: with readers active it does what it can.
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

    /// Streams `data` in as [`Store::ingest_streaming`] does, in chunks of
    /// 4 bytes.
    pub(super) fn ingest_streamed(store: &Store, file: &NewFile, data: &[u8]) -> i64 {
        let mut file = file.clone();
        file.identity.size = data.len() as u64;
        let count = data.len().div_ceil(4).max(1) as u64;
        store
            .ingest_streaming(&file, count, &|| {}, push_all(data))
            .unwrap()
            .unwrap()
    }

    /// Chunk rows in `buffer.db` and in the bulk file.
    pub(super) fn rows_per_file(store: &Store) -> (i64, i64) {
        let conn = store.pool.get().unwrap();
        conn.query_row(
            "SELECT (SELECT count(*) FROM main.chunk_data), (SELECT count(*) FROM bulk.chunk_data)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    pub(super) fn ingest(store: &Store, file: &NewFile, data: &[u8]) -> i64 {
        store.ingest(file, push_all(data)).unwrap().unwrap()
    }

    /// Pushes `data` in chunks of 4 bytes and commits.
    fn push_all(data: &[u8]) -> impl FnOnce(&mut ChunkSink<'_>) -> Result<IngestDecision> + '_ {
        move |sink| {
            for chunk in data.chunks(4) {
                sink.push(chunk, "00", None)?;
            }
            Ok(IngestDecision::Commit {
                sha256: "ff".into(),
            })
        }
    }
}
