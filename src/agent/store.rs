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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{OptionalExtension, params};

use crate::agent::spool::SourceIdentity;
use crate::sqlite::{self, Pool};

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
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Sql(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::DiskFull)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

const SCHEMA_V1: &str = "
CREATE TABLE files (
    id            INTEGER PRIMARY KEY,
    spool         TEXT NOT NULL,
    rel_path      TEXT NOT NULL,
    remote_name   TEXT NOT NULL,
    target        TEXT NOT NULL,
    size          INTEGER NOT NULL,
    sha256        TEXT NOT NULL,
    chunk_size    INTEGER NOT NULL,
    chunk_count   INTEGER NOT NULL,
    upload_id     TEXT NOT NULL UNIQUE,
    src_path      TEXT NOT NULL,
    src_dev       INTEGER NOT NULL,
    src_ino       INTEGER NOT NULL,
    src_size      INTEGER NOT NULL,
    src_mtime_ns  INTEGER NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('queued', 'failed', 'confirmed')),
    failure       TEXT,
    server_name   TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    confirmed_at  INTEGER
);
CREATE INDEX files_source ON files (spool, src_dev, src_ino, src_size, src_mtime_ns);
CREATE INDEX files_state ON files (state, target);
CREATE TABLE chunks (
    file_id       INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    byte_offset   INTEGER NOT NULL,
    length        INTEGER NOT NULL,
    sha256        TEXT NOT NULL,
    data          BLOB,
    state         TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'uploaded', 'confirmed')),
    retry_count   INTEGER NOT NULL DEFAULT 0,
    last_attempt  INTEGER,
    next_attempt  INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    PRIMARY KEY (file_id, idx)
);
CREATE TABLE chunk_errors (
    id            INTEGER PRIMARY KEY,
    file_id       INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    at            INTEGER NOT NULL,
    error         TEXT NOT NULL
);
CREATE INDEX chunk_errors_chunk ON chunk_errors (file_id, idx);
CREATE TABLE kept_sources (
    spool         TEXT NOT NULL,
    rel_path      TEXT NOT NULL,
    src_dev       INTEGER NOT NULL,
    src_ino       INTEGER NOT NULL,
    src_size      INTEGER NOT NULL,
    src_mtime_ns  INTEGER NOT NULL,
    PRIMARY KEY (spool, rel_path)
);
";

/// Chunk bytes move to their own table: SQLite rewrites a whole row on every
/// update, so keeping a 1 MiB BLOB next to the retry bookkeeping made every
/// acknowledgement and every failed attempt rewrite the chunk (twice the disk
/// traffic, and a WAL that could fill a small disk on retries alone).
const SCHEMA_V2: &str = "
CREATE TABLE chunk_data (
    file_id       INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    idx           INTEGER NOT NULL,
    data          BLOB NOT NULL,
    PRIMARY KEY (file_id, idx)
);
INSERT INTO chunk_data (file_id, idx, data) SELECT file_id, idx, data FROM chunks WHERE data IS NOT NULL;
UPDATE chunks SET data = NULL WHERE data IS NOT NULL;
";

/// Resume state of the delivery kinds: a file's upload as the peer knows it
/// (a multipart upload id, an upload URL), and each piece's acknowledgement
/// (a part's ETag), both opaque to the buffer.
const SCHEMA_V3: &str = "
ALTER TABLE files ADD COLUMN delivery_state TEXT;
ALTER TABLE chunks ADD COLUMN ack TEXT;
";

/// Errors kept per chunk.
pub const ERROR_HISTORY: usize = 5;

/// Milliseconds since the Unix epoch, the store's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    Queued,
    Failed,
    Confirmed,
}

impl FileState {
    pub fn as_str(self) -> &'static str {
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
    pub state: &'static str,
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

/// Receives a file's chunks during [`Store::ingest`].
pub struct ChunkSink<'a> {
    conn: &'a rusqlite::Connection,
    file_id: i64,
    next_idx: u64,
    offset: u64,
}

impl ChunkSink<'_> {
    /// How many chunks were pushed so far.
    pub fn chunks(&self) -> u64 {
        self.next_idx
    }

    /// Appends the next chunk, with its SHA-256 as hex.
    pub fn push(&mut self, data: &[u8], sha256: &str) -> Result<()> {
        self.conn.prepare_cached(
            "INSERT INTO chunks (file_id, idx, byte_offset, length, sha256) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![self.file_id, self.next_idx as i64, self.offset as i64, data.len() as i64, sha256])?;
        self.conn
            .prepare_cached("INSERT INTO chunk_data (file_id, idx, data) VALUES (?1, ?2, ?3)")?
            .execute(params![self.file_id, self.next_idx as i64, data])?;
        self.next_idx += 1;
        self.offset += data.len() as u64;
        Ok(())
    }
}

/// Files being buffered in one transaction; see [`Store::ingest_batch`].
pub struct IngestBatch<'c> {
    tx: rusqlite::Transaction<'c>,
}

impl IngestBatch<'_> {
    /// Adds one file: `fill` pushes every chunk into the sink and decides
    /// whether to keep it. Returns the new file's id, or `None` when `fill`
    /// aborted (nothing of this file is kept; the rest of the batch is).
    pub fn add<E>(
        &mut self,
        file: &NewFile,
        fill: impl FnOnce(&mut ChunkSink<'_>) -> std::result::Result<IngestDecision, E>,
    ) -> std::result::Result<Option<i64>, E>
    where
        E: From<StoreError>,
    {
        let now = now_ms();
        self.tx
            .prepare_cached(
                "INSERT INTO files (spool, rel_path, remote_name, target, size, sha256, chunk_size, chunk_count, upload_id,
                                    src_path, src_dev, src_ino, src_size, src_mtime_ns, state, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, 0, '', ?5, 0, ?6, ?7, ?8, ?9, ?10, ?11, 'queued', ?12, ?12)",
            )
            .and_then(|mut insert| {
                insert.execute(params![
                    file.spool,
                    file.rel_path,
                    file.remote_name,
                    file.target,
                    file.chunk_size as i64,
                    file.upload_id,
                    file.src_path,
                    file.identity.dev as i64,
                    file.identity.ino as i64,
                    file.identity.size as i64,
                    file.identity.mtime_ns,
                    now
                ])
            })
            .map_err(StoreError::from)?;
        let file_id = self.tx.last_insert_rowid();
        let mut sink = ChunkSink {
            conn: &self.tx,
            file_id,
            next_idx: 0,
            offset: 0,
        };
        // A file that failed or changed leaves nothing behind; the rest of the
        // batch stays. (Not a savepoint: that would copy every page it touches.)
        let decision = fill(&mut sink);
        let (n_chunks, size) = (sink.next_idx, sink.offset);
        let sha256 = match decision {
            Ok(IngestDecision::Commit { sha256 }) => sha256,
            Ok(IngestDecision::Abort) => {
                self.forget(file_id)?;
                return Ok(None);
            }
            Err(e) => {
                self.forget(file_id)?;
                return Err(e);
            }
        };
        self.tx
            .prepare_cached(
                "UPDATE files SET size = ?2, sha256 = ?3, chunk_count = ?4 WHERE id = ?1",
            )
            .and_then(|mut update| {
                update.execute(params![file_id, size as i64, sha256, n_chunks as i64])
            })
            .map_err(StoreError::from)?;
        if file.remember_kept {
            self.tx
                .prepare_cached("INSERT OR REPLACE INTO kept_sources (spool, rel_path, src_dev, src_ino, src_size, src_mtime_ns)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)").map_err(StoreError::from)?.execute(params![
                        file.spool,
                        file.rel_path,
                        file.identity.dev as i64,
                        file.identity.ino as i64,
                        file.identity.size as i64,
                        file.identity.mtime_ns
                    ])
                .map_err(StoreError::from)?;
        }
        Ok(Some(file_id))
    }

    /// Removes what was written of file `file_id` in this batch.
    fn forget(&self, file_id: i64) -> Result<()> {
        for sql in [
            "DELETE FROM chunk_data WHERE file_id = ?1",
            "DELETE FROM chunks WHERE file_id = ?1",
            "DELETE FROM files WHERE id = ?1",
        ] {
            self.tx.prepare_cached(sql)?.execute(params![file_id])?;
        }
        Ok(())
    }
}

/// What the ingest callback decided after reading the whole source.
pub enum IngestDecision {
    /// Keep it: the whole file's SHA-256.
    Commit { sha256: String },
    /// Roll back (the source changed while it was read).
    Abort,
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
        sqlite::migrate(&pool, &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3])?;
        Ok(Store {
            pool,
            path: path.to_owned(),
        })
    }

    /// The id of a buffered file with this source identity in this spool, if any:
    /// the source was buffered before and only its disposal may be missing.
    pub fn find_by_source(&self, spool: &str, id: SourceIdentity) -> Result<Option<i64>> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached("SELECT id FROM files WHERE spool = ?1 AND src_dev = ?2 AND src_ino = ?3 AND src_size = ?4 AND src_mtime_ns = ?5")?.query_row(params![spool, id.dev as i64, id.ino as i64, id.size as i64, id.mtime_ns],
                |r| r.get(0))
            .optional()?)
    }

    /// Whether a kept source at `rel_path` was already ingested unchanged.
    pub fn is_kept(&self, spool: &str, rel_path: &str, id: SourceIdentity) -> Result<bool> {
        let conn = self.pool.get()?;
        let found: Option<i64> = conn
            .prepare_cached("SELECT 1 FROM kept_sources WHERE spool = ?1 AND rel_path = ?2 AND src_dev = ?3 AND src_ino = ?4 AND src_size = ?5 AND src_mtime_ns = ?6")?.query_row(params![spool, rel_path, id.dev as i64, id.ino as i64, id.size as i64, id.mtime_ns],
                |r| r.get(0))
            .optional()?;
        Ok(found.is_some())
    }

    /// Bytes the buffer can still grow by: free space for an unprivileged
    /// writer on its file system plus the database's free pages, if known.
    pub fn free_bytes(&self) -> Option<u64> {
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

    /// Buffers a file in one transaction: `fill` pushes every chunk into the sink
    /// and decides whether to commit. Returns the new file's id, or `None` when
    /// `fill` aborted (nothing is kept).
    pub fn ingest<E>(
        &self,
        file: &NewFile,
        fill: impl FnOnce(&mut ChunkSink<'_>) -> std::result::Result<IngestDecision, E>,
    ) -> std::result::Result<Option<i64>, E>
    where
        E: From<StoreError>,
    {
        let added = self.ingest_batch(|batch| batch.add(file, fill))?;
        self.trim_wal();
        Ok(added)
    }

    /// Buffers several files in one transaction, so that one sync covers them
    /// all: `f` adds them one by one to the [`IngestBatch`]; each is kept or
    /// rolled back on its own. Nothing is kept when `f` fails. The caller
    /// trims the WAL afterwards ([`Store::trim_wal`]), once the uploader knows
    /// of the files, so that the two overlap.
    pub fn ingest_batch<T, E>(
        &self,
        f: impl FnOnce(&mut IngestBatch<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E>
    where
        E: From<StoreError>,
    {
        let value = {
            let mut conn = self.pool.get().map_err(StoreError::from)?;
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(StoreError::from)?;
            let mut batch = IngestBatch { tx };
            let value = f(&mut batch)?;
            batch.tx.commit().map_err(StoreError::from)?;
            value
        };
        Ok(value)
    }

    fn file_records(
        &self,
        where_sql: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<Vec<FileRecord>> {
        let conn = self.pool.get()?;
        let sql = format!(
            "SELECT f.id, f.spool, f.rel_path, f.remote_name, f.target, f.size, f.sha256, f.chunk_count, f.upload_id,
                    f.state, f.failure, f.server_name, f.created_at, f.confirmed_at,
                    (SELECT count(*) FROM chunks c WHERE c.file_id = f.id AND c.state != 'pending'),
                    (SELECT coalesce(max(retry_count), 0) FROM chunks c WHERE c.file_id = f.id),
                    (SELECT max(next_attempt) FROM chunks c WHERE c.file_id = f.id AND c.state = 'pending'),
                    (SELECT error FROM chunk_errors e WHERE e.file_id = f.id ORDER BY e.id DESC LIMIT 1),
                    f.delivery_state
             FROM files f {where_sql} ORDER BY f.id"
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(args, |r| {
            let state = FileState::parse(&r.get::<_, String>(9)?);
            let chunk_count = r.get::<_, i64>(7)? as u64;
            Ok(FileRecord {
                id: r.get(0)?,
                spool: r.get(1)?,
                rel_path: r.get(2)?,
                remote_name: r.get(3)?,
                target: r.get(4)?,
                size: r.get::<_, i64>(5)? as u64,
                sha256: r.get(6)?,
                chunk_count,
                upload_id: r.get(8)?,
                state: state.as_str(),
                failure: r.get(10)?,
                server_name: r.get(11)?,
                created_at: r.get(12)?,
                confirmed_at: r.get(13)?,
                chunks_uploaded: if state == FileState::Confirmed {
                    chunk_count
                } else {
                    r.get::<_, i64>(14)? as u64
                },
                retries: r.get::<_, i64>(15)? as u64,
                next_attempt: if state == FileState::Queued {
                    r.get(16)?
                } else {
                    None
                },
                last_error: r.get(17)?,
                delivery_state: r.get(18)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Every file in the buffer, oldest first.
    pub fn list(&self) -> Result<Vec<FileRecord>> {
        self.file_records("", &[])
    }

    pub fn file(&self, id: i64) -> Result<FileRecord> {
        self.file_records("WHERE f.id = ?1", &[&id])?
            .pop()
            .ok_or(StoreError::NoSuchFile(id))
    }

    /// Queued files of `target` due at `now` (every pending chunk's next attempt
    /// has come), oldest
    /// first, skipping `busy` ids, at most `limit`.
    pub fn due_files(
        &self,
        target: &str,
        now: i64,
        busy: &[i64],
        limit: usize,
    ) -> Result<Vec<FileRecord>> {
        let conn = self.pool.get()?;
        // Walks the queue in id order and stops at the first `limit` due files
        // not busy: the cost does not grow with the length of the queue.
        let mut stmt = conn.prepare_cached(
            "SELECT f.id FROM files f
             WHERE f.state = 'queued' AND f.target = ?1
               AND coalesce((SELECT max(next_attempt) FROM chunks c WHERE c.file_id = f.id AND c.state = 'pending'), 0) <= ?2
             ORDER BY f.id LIMIT ?3",
        )?;
        let ids = stmt
            .query_map(params![target, now, (limit + busy.len()) as i64], |r| {
                r.get::<_, i64>(0)
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        drop(stmt);
        drop(conn);
        let busy: std::collections::HashSet<i64> = busy.iter().copied().collect();
        let wanted: Vec<i64> = ids
            .into_iter()
            .filter(|id| !busy.contains(id))
            .take(limit)
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        // One query for all of them (ids as a JSON array), in id order.
        let ids = serde_json::to_string(&wanted).expect("ids serialise");
        self.file_records("WHERE f.id IN (SELECT value FROM json_each(?1))", &[&ids])
    }

    /// The earliest moment (ms) any queued file of `target` becomes due.
    pub fn next_due(&self, target: &str) -> Result<Option<i64>> {
        let conn = self.pool.get()?;
        // A file is due when its latest-scheduled pending chunk is; the earliest
        // such moment over all files is when the uploader must wake.
        Ok(conn.prepare_cached("SELECT min(due) FROM (SELECT max(c.next_attempt) AS due FROM chunks c JOIN files f ON f.id = c.file_id
             WHERE f.state = 'queued' AND f.target = ?1 AND c.state = 'pending' GROUP BY f.id)")?.query_row(params![target],
            |r| r.get(0))?)
    }

    pub fn chunks(&self, file_id: i64) -> Result<Vec<ChunkMeta>> {
        let conn = self.pool.get()?;
        let mut stmt = conn.prepare(
            "SELECT idx, byte_offset, length, sha256, state, retry_count, ack FROM chunks WHERE file_id = ?1 ORDER BY idx",
        )?;
        let rows = stmt.query_map(params![file_id], |r| {
            Ok(ChunkMeta {
                idx: r.get::<_, i64>(0)? as u64,
                offset: r.get::<_, i64>(1)? as u64,
                length: r.get::<_, i64>(2)? as u64,
                sha256: r.get(3)?,
                uploaded: r.get::<_, String>(4)? != "pending",
                retry_count: r.get::<_, i64>(5)? as u64,
                ack: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// A chunk's bytes.
    pub fn chunk_data(&self, file_id: i64, idx: u64) -> Result<Vec<u8>> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached("SELECT data FROM chunk_data WHERE file_id = ?1 AND idx = ?2")?
            .query_row(params![file_id, idx as i64], |r| r.get::<_, Vec<u8>>(0))
            .optional()?
            .unwrap_or_default())
    }

    /// Marks chunks acknowledged by the receiver, with what the delivery
    /// needs to remember of their piece (`ack`), if anything.
    pub fn mark_uploaded(
        &self,
        file_id: i64,
        idxs: &[u64],
        ack: Option<&str>,
        durability: Durability,
    ) -> Result<()> {
        let mut conn = self.pool.get()?;
        durability.run(&mut conn, |conn| {
            let tx = conn.transaction()?;
            let now = now_ms();
            {
                let mut mark = tx.prepare_cached(
                    "UPDATE chunks SET state = 'uploaded', last_attempt = ?3, ack = ?4 WHERE file_id = ?1 AND idx = ?2 AND state = 'pending'",
                )?;
                for idx in idxs {
                    mark.execute(params![file_id, *idx as i64, now, ack])?;
                }
            }
            tx.prepare_cached("UPDATE files SET updated_at = ?2 WHERE id = ?1")?.execute(params![file_id, now])?;
            tx.commit()
        })?;
        Ok(())
    }

    /// Makes every queued file of `target` due now (after its settings changed,
    /// there is no reason to wait out a delay earned under the old ones).
    pub fn reschedule_now(&self, target: &str) -> Result<usize> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached(
                "UPDATE chunks SET next_attempt = 0 WHERE state = 'pending' AND file_id IN
                (SELECT id FROM files WHERE state = 'queued' AND target = ?1)",
            )?
            .execute(params![target])?)
    }

    /// Puts every chunk of a file back to pending (the receiver lost the
    /// upload, or is about to say again what it holds).
    pub fn reset_chunks(&self, file_id: i64) -> Result<()> {
        let conn = self.pool.get()?;
        conn.prepare_cached("UPDATE chunks SET state = 'pending', ack = NULL WHERE file_id = ?1")?
            .execute(params![file_id])?;
        Ok(())
    }

    /// Forgets a file's upload on the peer: every chunk pending again and no
    /// resume state, so the next attempt starts a new upload.
    pub fn forget_upload(&self, file_id: i64) -> Result<()> {
        let mut conn = self.pool.get()?;
        let tx = conn.transaction()?;
        tx.prepare_cached("UPDATE chunks SET state = 'pending', ack = NULL WHERE file_id = ?1")?
            .execute(params![file_id])?;
        tx.prepare_cached("UPDATE files SET delivery_state = NULL, updated_at = ?2 WHERE id = ?1")?
            .execute(params![file_id, now_ms()])?;
        tx.commit()?;
        Ok(())
    }

    /// Records a file's resume state (synced: the delivery depends on it
    /// from the next request on).
    pub fn set_delivery_state(&self, file_id: i64, state: Option<&str>) -> Result<()> {
        let conn = self.pool.get()?;
        conn.prepare_cached("UPDATE files SET delivery_state = ?2, updated_at = ?3 WHERE id = ?1")?
            .execute(params![file_id, state, now_ms()])?;
        Ok(())
    }

    /// Records a failed attempt at a chunk: its retry count goes up, its next
    /// attempt is `next_attempt` (ms), and the error joins the last five.
    /// Returns the new retry count.
    pub fn record_failure(
        &self,
        file_id: i64,
        idx: u64,
        error: &str,
        next_attempt: i64,
    ) -> Result<u64> {
        let mut conn = self.pool.get()?;
        let tx = conn.transaction()?;
        let now = now_ms();
        tx.prepare_cached("UPDATE chunks SET retry_count = retry_count + 1, last_attempt = ?3, next_attempt = ?4, last_error = ?5
             WHERE file_id = ?1 AND idx = ?2")?.execute(params![file_id, idx as i64, now, next_attempt, error])?;
        tx.prepare_cached(
            "INSERT INTO chunk_errors (file_id, idx, at, error) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![file_id, idx as i64, now, error])?;
        tx.prepare_cached("DELETE FROM chunk_errors WHERE file_id = ?1 AND idx = ?2 AND id NOT IN
                (SELECT id FROM chunk_errors WHERE file_id = ?1 AND idx = ?2 ORDER BY id DESC LIMIT ?3)")?.execute(params![file_id, idx as i64, ERROR_HISTORY as i64])?;
        let count: i64 = tx
            .prepare_cached("SELECT retry_count FROM chunks WHERE file_id = ?1 AND idx = ?2")?
            .query_row(params![file_id, idx as i64], |r| r.get(0))?;
        tx.prepare_cached("UPDATE files SET updated_at = ?2 WHERE id = ?1")?
            .execute(params![file_id, now])?;
        tx.commit()?;
        Ok(count as u64)
    }

    /// The last errors of a chunk, oldest first (at most five).
    pub fn chunk_errors(&self, file_id: i64, idx: u64) -> Result<Vec<(i64, String)>> {
        let conn = self.pool.get()?;
        let mut stmt = conn.prepare(
            "SELECT at, error FROM chunk_errors WHERE file_id = ?1 AND idx = ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![file_id, idx as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Parks a file as failed with the reason; it stays until an operator retries
    /// or purges it.
    pub fn park(&self, file_id: i64, reason: &str) -> Result<()> {
        let conn = self.pool.get()?;
        conn.prepare_cached(
            "UPDATE files SET state = 'failed', failure = ?2, updated_at = ?3 WHERE id = ?1",
        )?
        .execute(params![file_id, reason, now_ms()])?;
        Ok(())
    }

    /// The receiver confirmed the whole file: its data leaves the store; the
    /// record stays (with the server's name) until the retention period passes.
    pub fn confirm(
        &self,
        file_id: i64,
        server_name: Option<&str>,
        durability: Durability,
    ) -> Result<()> {
        self.confirm_many(&[(file_id, server_name.map(str::to_owned))], durability)
    }

    /// [`Store::confirm`] for several files (id, the receiver's name) in one commit.
    pub fn confirm_many(
        &self,
        files: &[(i64, Option<String>)],
        durability: Durability,
    ) -> Result<()> {
        match self.confirm_once(files, durability) {
            // The WAL may hold the space this needs: move it into the database
            // (whose free pages the commit can reuse) and try once more.
            Err(e) if e.is_disk_full() => {
                self.truncate_wal();
                self.confirm_once(files, durability)
            }
            done => done,
        }
    }

    fn confirm_once(&self, files: &[(i64, Option<String>)], durability: Durability) -> Result<()> {
        let mut conn = self.pool.get()?;
        durability.run(&mut conn, |conn| {
            let tx = conn.transaction()?;
            let now = now_ms();
            {
                let mut file = tx.prepare_cached("UPDATE files SET state = 'confirmed', server_name = ?2, failure = NULL, confirmed_at = ?3, updated_at = ?3 WHERE id = ?1")?;
                let mut chunks =
                    tx.prepare_cached("UPDATE chunks SET state = 'confirmed' WHERE file_id = ?1")?;
                let mut data = tx.prepare_cached("DELETE FROM chunk_data WHERE file_id = ?1")?;
                for (file_id, server_name) in files {
                    file.execute(params![file_id, server_name, now])?;
                    chunks.execute(params![file_id])?;
                    data.execute(params![file_id])?;
                }
            }
            tx.commit()
        })?;
        drop(conn);
        // A large file's pages are still in the WAL (ingest does not
        // checkpoint): now they are copied and the WAL emptied.
        self.trim_wal();
        Ok(())
    }

    /// [`Store::truncate_wal`] once the WAL has grown past
    /// 4 MiB (`WAL_TRUNCATE_AFTER`), so that small commits share one checkpoint; at
    /// once when the disk is nearly full, where the WAL's space is needed.
    /// (Commits never checkpoint by themselves: the buffer is opened without
    /// SQLite's automatic checkpoints.)
    pub fn trim_wal(&self) {
        let wal = self.wal_size();
        if wal >= WAL_TRUNCATE_AFTER || (wal > 0 && self.disk_is_tight()) {
            self.truncate_wal();
        }
    }

    /// [`Store::truncate_wal`] only when the disk is nearly full. After a
    /// large ingest: the bytes just committed are held once, in the WAL,
    /// until they are confirmed, and the checkpoint then (which has to copy
    /// them into the database) does not compete with their upload.
    pub fn trim_wal_if_tight(&self) {
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
    pub fn truncate_wal(&self) {
        if let Ok(conn) = self.pool.get() {
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
    }

    /// Puts failed files back in the queue with fresh retry counts; `None` means
    /// all of them. Returns how many were re-queued.
    pub fn retry(&self, file_id: Option<i64>) -> Result<usize> {
        let mut conn = self.pool.get()?;
        // Reads then writes: take the write lock first, or a concurrent writer
        // makes the upgrade fail with SQLITE_BUSY instead of waiting.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let ids: Vec<i64> = {
            let mut stmt = tx.prepare(
                "SELECT id FROM files WHERE state = 'failed' AND (?1 IS NULL OR id = ?1)",
            )?;
            stmt.query_map(params![file_id], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        for id in &ids {
            tx.prepare_cached(
                "UPDATE files SET state = 'queued', failure = NULL, updated_at = ?2 WHERE id = ?1",
            )?
            .execute(params![id, now_ms()])?;
            tx.prepare_cached(
                "UPDATE chunks SET retry_count = 0, next_attempt = 0 WHERE file_id = ?1",
            )?
            .execute(params![id])?;
        }
        tx.commit()?;
        Ok(ids.len())
    }

    /// Deletes a file and its data from the buffer. Returns whether it existed.
    pub fn purge(&self, file_id: i64) -> Result<bool> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached("DELETE FROM files WHERE id = ?1")?
            .execute(params![file_id])?
            > 0)
    }

    /// Forgets confirmed files confirmed before `cutoff` (ms). Returns how many.
    pub fn forget_confirmed_before(&self, cutoff: i64) -> Result<usize> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached("DELETE FROM files WHERE state = 'confirmed' AND confirmed_at < ?1")?
            .execute(params![cutoff])?)
    }

    /// Per target: queued files and bytes, failed files, and when the oldest
    /// queued file was buffered (ms), for metrics and status.
    pub fn target_queues(&self) -> Result<Vec<TargetQueue>> {
        let conn = self.pool.get()?;
        let mut stmt = conn.prepare(
            "SELECT target,
                    coalesce(sum(state = 'queued'), 0),
                    coalesce(sum(CASE WHEN state = 'queued' THEN size ELSE 0 END), 0),
                    coalesce(sum(state = 'failed'), 0),
                    min(CASE WHEN state = 'queued' THEN created_at END)
             FROM files GROUP BY target ORDER BY target",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(TargetQueue {
                target: r.get(0)?,
                queued_files: r.get::<_, i64>(1)? as u64,
                queued_bytes: r.get::<_, i64>(2)? as u64,
                failed_files: r.get::<_, i64>(3)? as u64,
                oldest_queued_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Counts by state, for status lines.
    pub fn counts(&self) -> Result<(u64, u64, u64)> {
        let conn = self.pool.get()?;
        Ok(conn.prepare_cached("SELECT coalesce(sum(state = 'queued'), 0), coalesce(sum(state = 'failed'), 0), coalesce(sum(state = 'confirmed'), 0) FROM files")?.query_row([],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)))?)
    }

    /// The newest error of a file still waiting or parked, for status lines.
    pub fn last_error(&self) -> Result<Option<String>> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached(
                "SELECT e.error FROM chunk_errors e JOIN files f ON f.id = e.file_id
                 WHERE f.state != 'confirmed' ORDER BY e.id DESC LIMIT 1",
            )?
            .query_row([], |r| r.get(0))
            .optional()?)
    }

    pub fn integrity_check(&self) -> Result<String> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached("PRAGMA integrity_check")?
            .query_row([], |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_file(name: &str, ino: u64) -> NewFile {
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

    fn ingest(store: &Store, file: &NewFile, data: &[u8]) -> i64 {
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

    #[test]
    fn ingest_commits_or_rolls_back_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let id = ingest(&store, &new_file("a", 1), b"0123456789");
        let rec = store.file(id).unwrap();
        assert_eq!((rec.size, rec.chunk_count, rec.state), (10, 3, "queued"));
        assert_eq!(store.chunk_data(id, 2).unwrap(), b"89");
        assert_eq!(store.buffered_bytes().unwrap(), 10);
        let aborted = store
            .ingest(&new_file("b", 2), |sink| -> Result<IngestDecision> {
                sink.push(b"xx", "00")?;
                Ok(IngestDecision::Abort)
            })
            .unwrap();
        assert!(aborted.is_none());
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(
            store
                .find_by_source(
                    "/spool",
                    SourceIdentity {
                        dev: 1,
                        ino: 1,
                        size: 10,
                        mtime_ns: 5
                    }
                )
                .unwrap(),
            Some(id)
        );
        assert_eq!(
            store
                .find_by_source(
                    "/spool",
                    SourceIdentity {
                        dev: 1,
                        ino: 2,
                        size: 10,
                        mtime_ns: 5
                    }
                )
                .unwrap(),
            None
        );
    }

    #[test]
    fn failures_keep_five_errors_and_schedule_the_next_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let id = ingest(&store, &new_file("a", 1), b"0123456789");
        for n in 1..=7 {
            assert_eq!(
                store
                    .record_failure(id, 0, &format!("error {n}"), 1_000 * n)
                    .unwrap(),
                n as u64
            );
        }
        let errors = store.chunk_errors(id, 0).unwrap();
        assert_eq!(
            errors.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(),
            ["error 3", "error 4", "error 5", "error 6", "error 7"]
        );
        assert!(store.due_files("t", 6_999, &[], 10).unwrap().is_empty());
        assert_eq!(store.due_files("t", 7_000, &[], 10).unwrap().len(), 1);
        assert_eq!(store.next_due("t").unwrap(), Some(7_000));
        let rec = store.file(id).unwrap();
        assert_eq!(
            (rec.retries, rec.last_error.as_deref()),
            (7, Some("error 7"))
        );
    }

    #[test]
    fn confirm_drops_data_and_park_retry_purge() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let a = ingest(&store, &new_file("a", 1), b"0123456789");
        let b = ingest(&store, &new_file("b", 2), b"0123456789");
        store
            .mark_uploaded(a, &[0, 1, 2], None, Durability::Synced)
            .unwrap();
        store.confirm(a, Some("a"), Durability::Synced).unwrap();
        assert!(store.chunk_data(a, 0).unwrap().is_empty());
        assert_eq!(store.file(a).unwrap().server_name.as_deref(), Some("a"));
        assert_eq!(store.buffered_bytes().unwrap(), 10);
        store.park(b, "400 Invalid filename").unwrap();
        assert!(store.due_files("t", i64::MAX, &[], 10).unwrap().is_empty());
        assert_eq!(store.counts().unwrap(), (0, 1, 1));
        assert_eq!(store.retry(None).unwrap(), 1);
        assert_eq!(store.due_files("t", 0, &[], 10).unwrap().len(), 1);
        assert!(store.purge(b).unwrap());
        assert!(!store.purge(b).unwrap());
        assert_eq!(store.forget_confirmed_before(now_ms() + 1).unwrap(), 1);
        assert!(store.list().unwrap().is_empty());
        assert_eq!(store.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn a_version_1_buffer_is_migrated_with_its_chunk_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        {
            let pool = sqlite::open_pool(&path, Duration::from_secs(5)).unwrap();
            sqlite::migrate(&pool, &[SCHEMA_V1]).unwrap();
            let conn = pool.get().unwrap();
            conn.execute_batch(
                "INSERT INTO files (id, spool, rel_path, remote_name, target, size, sha256, chunk_size, chunk_count,
                     upload_id, src_path, src_dev, src_ino, src_size, src_mtime_ns, state, created_at, updated_at)
                 VALUES (1, 's', 'a', 'a', 't', 3, 'x', 4, 1, 'upload-a-0123456789', '/s/a', 1, 1, 3, 1, 'queued', 0, 0);
                 INSERT INTO chunks (file_id, idx, byte_offset, length, sha256, data) VALUES (1, 0, 0, 3, 'y', x'616263');",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.chunk_data(1, 0).unwrap(), b"abc");
        assert_eq!(store.chunks(1).unwrap()[0].ack, None);
        assert_eq!(store.file(1).unwrap().delivery_state, None);
        store.confirm(1, Some("a"), Durability::Unsynced).unwrap();
        assert!(store.chunk_data(1, 0).unwrap().is_empty());
        assert_eq!(store.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn resume_state_and_piece_acks_stay_until_the_upload_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let store = Store::open(&path).unwrap();
        let id = ingest(&store, &new_file("r", 1), b"0123456789");
        assert_eq!(store.file(id).unwrap().delivery_state, None);
        store.set_delivery_state(id, Some("multipart-7")).unwrap();
        store
            .mark_uploaded(id, &[0, 1], Some("etag-a"), Durability::Unsynced)
            .unwrap();
        // Both survive a reopen, as after a crash.
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.file(id).unwrap().delivery_state.as_deref(),
            Some("multipart-7")
        );
        let acks: Vec<(bool, Option<String>)> = store
            .chunks(id)
            .unwrap()
            .into_iter()
            .map(|c| (c.uploaded, c.ack))
            .collect();
        let etag = Some("etag-a".to_owned());
        assert_eq!(acks, [(true, etag.clone()), (true, etag), (false, None)]);
        // Asking the peer again keeps the upload; forgetting it starts anew.
        store.reset_chunks(id).unwrap();
        assert!(
            store
                .chunks(id)
                .unwrap()
                .iter()
                .all(|c| !c.uploaded && c.ack.is_none())
        );
        assert!(store.file(id).unwrap().delivery_state.is_some());
        store
            .mark_uploaded(id, &[2], Some("etag-b"), Durability::Synced)
            .unwrap();
        store.forget_upload(id).unwrap();
        assert!(
            store
                .chunks(id)
                .unwrap()
                .iter()
                .all(|c| !c.uploaded && c.ack.is_none())
        );
        assert_eq!(store.file(id).unwrap().delivery_state, None);
    }

    #[test]
    fn kept_sources_are_remembered_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let mut file = new_file("k", 9);
        file.remember_kept = true;
        ingest(&store, &file, b"abc");
        assert!(store.is_kept("/spool", "k", file.identity).unwrap());
        let changed = SourceIdentity {
            mtime_ns: 6,
            ..file.identity
        };
        assert!(!store.is_kept("/spool", "k", changed).unwrap());
    }
}
