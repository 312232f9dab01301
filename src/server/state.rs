//! The receiver's own SQLite file: resumable uploads, their recorded chunks and
//! the v1 sessions. Every method blocks; callers run them with `spawn_blocking`.
//!
//! Commits are synced (`synchronous = FULL`) unless a method says otherwise.
//! Synced: the final name chosen for an upload (phase finalizing, one commit
//! for all the new files of a batch), v1 sessions, and forgetting or expiring
//! records. Unsynced: a new upload, its chunk records, and its completion. An
//! agent deletes its copy once told a file is complete, so what must survive
//! a power cut is the file under its final name, synced before that reply,
//! and the finalizing record that names it; from those two the completion is
//! recorded again, so its own commit need not wait for the disk.

use std::path::Path;
use std::time::Duration;

use rusqlite::{OptionalExtension, params};

use crate::sqlite::{self, Pool};

mod tus;
pub(super) use tus::{NewTusUpload, OPEN_CHUNK_COUNT, TusUpload};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("receiver state database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: r2d2::Error,
    },
    #[error("receiver state database: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("receiver state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("receiver state database: {0}")]
    Migrate(#[from] sqlite::MigrateError),
}

pub(super) type Result<T> = std::result::Result<T, StateError>;

const SCHEMA_V1: &str = "
CREATE TABLE uploads (
    upload_id    TEXT PRIMARY KEY,
    client_name  TEXT NOT NULL,
    file_size    INTEGER NOT NULL,
    chunk_count  INTEGER NOT NULL,
    file_sha256  TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('receiving', 'finalizing', 'complete')),
    actual_name  TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE TABLE upload_chunks (
    upload_id    TEXT NOT NULL REFERENCES uploads(upload_id) ON DELETE CASCADE,
    chunk_idx    INTEGER NOT NULL,
    chunk_offset INTEGER NOT NULL,
    length       INTEGER NOT NULL,
    sha256       TEXT NOT NULL,
    PRIMARY KEY (upload_id, chunk_idx)
);
CREATE TABLE v1_sessions (
    client_name  TEXT PRIMARY KEY,
    actual_name  TEXT NOT NULL,
    next_idx     INTEGER NOT NULL,
    size         INTEGER NOT NULL,
    last_sha256  TEXT,
    updated_at   INTEGER NOT NULL
);
";

/// Migration 3: the named client (`[[server.client]]`) that created each
/// upload, `NULL` for an unnamed key and for uploads recorded before the
/// column existed. (`client_name` is the file name the client gave, as the
/// original protocol calls it.)
const SCHEMA_V3: &str = "ALTER TABLE uploads ADD COLUMN named_client TEXT;";

pub(super) use crate::clock::now_secs;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum UploadPhase {
    Receiving,
    /// The final name is chosen and recorded; the rename may or may not have happened.
    Finalizing,
    Complete,
}

impl UploadPhase {
    fn as_str(self) -> &'static str {
        match self {
            UploadPhase::Receiving => "receiving",
            UploadPhase::Finalizing => "finalizing",
            UploadPhase::Complete => "complete",
        }
    }

    fn parse(s: &str) -> UploadPhase {
        match s {
            "finalizing" => UploadPhase::Finalizing,
            "complete" => UploadPhase::Complete,
            _ => UploadPhase::Receiving,
        }
    }
}

/// What a client declared about a whole file; every chunk repeats it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FileMeta {
    pub(super) client_name: String,
    pub(super) file_size: u64,
    pub(super) chunk_count: u64,
    pub(super) file_sha256: String,
}

impl FileMeta {
    /// Whether a chunk that declares `other` belongs to the upload created
    /// with `self`: the same file, and the same SHA-256 where both know it
    /// (a chunk sent while its client was still reading the file carries
    /// none, see [`protocol::STREAMING`](crate::protocol::STREAMING)).
    pub(super) fn admits(&self, other: &FileMeta) -> bool {
        self.client_name == other.client_name
            && self.file_size == other.file_size
            && self.chunk_count == other.chunk_count
            && (self.file_sha256 == other.file_sha256
                || self.file_sha256.is_empty()
                || other.file_sha256.is_empty())
    }
}

#[derive(Debug, Clone)]
pub(super) struct Upload {
    pub(super) upload_id: String,
    pub(super) meta: FileMeta,
    pub(super) phase: UploadPhase,
    pub(super) actual_name: Option<String>,
    /// The named client that created the upload; `None` for an unnamed key.
    pub(super) named_client: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChunkRecord {
    pub(super) chunk_idx: u64,
    pub(super) offset: u64,
    pub(super) length: u64,
    /// The chunk's check as recorded: its SHA-256 (hex), or `crc32c:` and
    /// its CRC-32C for a chunk that came with `X-Chunk-Crc32c` alone (the
    /// column kept its name).
    pub(super) sha256: String,
}

#[derive(Debug, Clone)]
pub(super) struct V1Session {
    pub(super) client_name: String,
    pub(super) actual_name: String,
    pub(super) next_idx: u64,
    pub(super) size: u64,
    pub(super) last_sha256: Option<String>,
}

#[derive(Clone)]
pub(super) struct UploadState {
    pool: Pool,
}

impl UploadState {
    pub(super) fn open(path: &Path) -> Result<UploadState> {
        let pool = sqlite::open_pool(path, Duration::from_secs(10)).map_err(|source| {
            StateError::Open {
                path: path.display().to_string(),
                source,
            }
        })?;
        sqlite::migrate(&pool, &[SCHEMA_V1, tus::SCHEMA_V2, SCHEMA_V3])?;
        Ok(UploadState { pool })
    }

    pub(super) fn upload(&self, upload_id: &str) -> Result<Option<Upload>> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached(
                "SELECT client_name, file_size, chunk_count, file_sha256, state, actual_name, named_client
                 FROM uploads WHERE upload_id = ?1",
            )?
            .query_row(params![upload_id], |r| {
                Ok(Upload {
                    upload_id: upload_id.to_owned(),
                    meta: FileMeta {
                        client_name: r.get(0)?,
                        file_size: r.get::<_, i64>(1)? as u64,
                        chunk_count: r.get::<_, i64>(2)? as u64,
                        file_sha256: r.get(3)?,
                    },
                    phase: UploadPhase::parse(&r.get::<_, String>(4)?),
                    actual_name: r.get(5)?,
                    named_client: r.get(6)?,
                })
            })
            .optional()?)
    }

    /// Returns the upload, creating it with `meta` and the named client that
    /// sent it if it does not exist yet (an existing upload keeps the client
    /// that created it). Not synced, like the chunk records that follow it: an upload lost to a
    /// power cut is unknown to the client's `GET`, and it starts again.
    pub(super) fn get_or_create_upload(
        &self,
        upload_id: &str,
        meta: &FileMeta,
        named_client: Option<&str>,
    ) -> Result<Upload> {
        let mut conn = self.pool.get()?;
        let now = now_secs();
        sqlite::unsynced(&mut conn, |conn| {
            conn.prepare_cached(
                "INSERT OR IGNORE INTO uploads
                     (upload_id, client_name, file_size, chunk_count, file_sha256, state, created_at, updated_at, named_client)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'receiving', ?6, ?6, ?7)",
            )?
            .execute(params![
                upload_id,
                meta.client_name,
                meta.file_size as i64,
                meta.chunk_count as i64,
                meta.file_sha256,
                now,
                named_client
            ])
        })?;
        drop(conn);
        Ok(self
            .upload(upload_id)?
            .expect("upload row exists after INSERT OR IGNORE"))
    }

    pub(super) fn chunk(&self, upload_id: &str, chunk_idx: u64) -> Result<Option<ChunkRecord>> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached(
                "SELECT chunk_offset, length, sha256 FROM upload_chunks
                 WHERE upload_id = ?1 AND chunk_idx = ?2",
            )?
            .query_row(params![upload_id, chunk_idx as i64], |r| {
                Ok(ChunkRecord {
                    chunk_idx,
                    offset: r.get::<_, i64>(0)? as u64,
                    length: r.get::<_, i64>(1)? as u64,
                    sha256: r.get(2)?,
                })
            })
            .optional()?)
    }

    pub(super) fn chunks(&self, upload_id: &str) -> Result<Vec<ChunkRecord>> {
        let conn = self.pool.get()?;
        let mut stmt = conn.prepare(
            "SELECT chunk_idx, chunk_offset, length, sha256 FROM upload_chunks
             WHERE upload_id = ?1 ORDER BY chunk_idx",
        )?;
        let rows = stmt.query_map(params![upload_id], |r| {
            Ok(ChunkRecord {
                chunk_idx: r.get::<_, i64>(0)? as u64,
                offset: r.get::<_, i64>(1)? as u64,
                length: r.get::<_, i64>(2)? as u64,
                sha256: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Records a received chunk; returns how many chunks the upload has.
    /// Not synced: a chunk record lost to a power cut is sent again by the
    /// client, and one that outlived its (unsynced) data fails the whole-file
    /// check, which discards the upload for a fresh start.
    pub(super) fn record_chunk(&self, upload_id: &str, chunk: &ChunkRecord) -> Result<u64> {
        let mut conn = self.pool.get()?;
        let count = sqlite::unsynced(&mut conn, |conn| {
            let tx = conn.transaction()?;
            tx.prepare_cached("INSERT OR IGNORE INTO upload_chunks (upload_id, chunk_idx, chunk_offset, length, sha256)
                 VALUES (?1, ?2, ?3, ?4, ?5)")?.execute(params![
                    upload_id,
                    chunk.chunk_idx as i64,
                    chunk.offset as i64,
                    chunk.length as i64,
                    chunk.sha256
                ])?;
            tx.prepare_cached("UPDATE uploads SET updated_at = ?2 WHERE upload_id = ?1")?
                .execute(params![upload_id, now_secs()])?;
            let count: i64 = tx
                .prepare_cached("SELECT count(*) FROM upload_chunks WHERE upload_id = ?1")?
                .query_row(params![upload_id], |r| r.get(0))?;
            tx.commit()?;
            Ok(count)
        })?;
        Ok(count as u64)
    }

    /// Sets an upload's phase and final name, with a synced commit: completion
    /// records the final name it chose this way before the rename.
    pub(super) fn set_phase(
        &self,
        upload_id: &str,
        phase: UploadPhase,
        actual_name: Option<&str>,
    ) -> Result<()> {
        let conn = self.pool.get()?;
        conn.prepare_cached(
            "UPDATE uploads SET state = ?2, actual_name = ?3, updated_at = ?4 WHERE upload_id = ?1",
        )?
        .execute(params![upload_id, phase.as_str(), actual_name, now_secs()])?;
        Ok(())
    }

    /// Marks an upload complete and drops its chunk records, which are no longer
    /// needed: only the id, the metadata and the final name are remembered.
    /// Not synced: the synced "finalizing" record with the final name, and the
    /// rename made durable before this, are enough for [`Receiver::recover`]
    /// to redo it after a power cut.
    ///
    /// [`Receiver::recover`]: crate::server::Receiver::recover
    /// Records the whole file's SHA-256 of an upload created without it, and
    /// returns the one recorded: the first chunk to bring it decides, and a
    /// later different one is the caller's conflict. Unsynced, like the
    /// chunks: a record lost to a power cut is brought again by the chunk
    /// the client sends last.
    pub(super) fn learn_file_sha256(&self, upload_id: &str, sha256: &str) -> Result<String> {
        let mut conn = self.pool.get()?;
        sqlite::unsynced(&mut conn, |conn| {
            conn.prepare_cached(
                "UPDATE uploads SET file_sha256 = ?2 WHERE upload_id = ?1 AND file_sha256 = ''",
            )?
            .execute(params![upload_id, sha256])?;
            conn.prepare_cached("SELECT file_sha256 FROM uploads WHERE upload_id = ?1")?
                .query_row(params![upload_id], |r| r.get(0))
        })
        .map_err(Into::into)
    }

    pub(super) fn complete(&self, upload_id: &str, actual_name: &str) -> Result<()> {
        self.complete_many(&[(upload_id.to_owned(), actual_name.to_owned())])
    }

    /// [`UploadState::complete`] for several uploads (id, final name) in one commit.
    pub(super) fn complete_many(&self, done: &[(String, String)]) -> Result<()> {
        let mut conn = self.pool.get()?;
        let now = now_secs();
        sqlite::unsynced(&mut conn, |conn| {
            let tx = conn.transaction()?;
            {
                let mut complete = tx.prepare_cached(
                    "UPDATE uploads SET state = 'complete', actual_name = ?2, updated_at = ?3
                     WHERE upload_id = ?1",
                )?;
                let mut forget_chunks =
                    tx.prepare_cached("DELETE FROM upload_chunks WHERE upload_id = ?1")?;
                for (upload_id, actual_name) in done {
                    complete.execute(params![upload_id, actual_name, now])?;
                    forget_chunks.execute(params![upload_id])?;
                }
            }
            tx.commit()
        })?;
        Ok(())
    }

    /// Records whole files received in one piece (a batch): each upload with
    /// its only chunk and its chosen final name, in phase finalizing, all in
    /// one synced commit. The files' bytes must be durable already. An upload
    /// that exists (receiving, without chunks) takes the new record, but
    /// keeps the named client that created it; a new one is recorded as
    /// `named_client`'s, the sender of the batch.
    pub(super) fn record_finalizing(
        &self,
        files: &[(String, FileMeta, ChunkRecord, String)],
        named_client: Option<&str>,
    ) -> Result<()> {
        let mut conn = self.pool.get()?;
        let now = now_secs();
        let tx = conn.transaction()?;
        {
            let mut upload = tx.prepare_cached(
                "INSERT INTO uploads
                     (upload_id, client_name, file_size, chunk_count, file_sha256, state, actual_name, created_at, updated_at, named_client)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'finalizing', ?6, ?7, ?7, ?8)
                 ON CONFLICT (upload_id) DO UPDATE SET state = 'finalizing', actual_name = ?6, updated_at = ?7",
            )?;
            let mut chunk = tx.prepare_cached(
                "INSERT OR REPLACE INTO upload_chunks (upload_id, chunk_idx, chunk_offset, length, sha256)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (upload_id, meta, record, final_name) in files {
                upload.execute(params![
                    upload_id,
                    meta.client_name,
                    meta.file_size as i64,
                    meta.chunk_count as i64,
                    meta.file_sha256,
                    final_name,
                    now,
                    named_client
                ])?;
                chunk.execute(params![
                    upload_id,
                    record.chunk_idx as i64,
                    record.offset as i64,
                    record.length as i64,
                    record.sha256
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Forgets an upload entirely (after a whole-file mismatch), so the client can
    /// start it again.
    pub(super) fn forget_upload(&self, upload_id: &str) -> Result<()> {
        let conn = self.pool.get()?;
        conn.prepare_cached("DELETE FROM uploads WHERE upload_id = ?1")?
            .execute(params![upload_id])?;
        Ok(())
    }

    /// Uploads left between choosing a final name and recording completion.
    pub(super) fn unfinished(&self) -> Result<Vec<Upload>> {
        let ids: Vec<String> = {
            let conn = self.pool.get()?;
            let mut stmt = conn.prepare(
                "SELECT u.upload_id FROM uploads u
                 WHERE u.state = 'finalizing'
                    OR (u.state = 'receiving' AND
                        (SELECT count(*) FROM upload_chunks c WHERE c.upload_id = u.upload_id) = u.chunk_count)",
            )?;
            stmt.query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        let mut out = Vec::new();
        for id in ids {
            if let Some(upload) = self.upload(&id)? {
                out.push(upload);
            }
        }
        Ok(out)
    }

    /// Removes uploads and v1 sessions untouched since `cutoff` (unix seconds) and
    /// returns the ids of the removed incomplete uploads, whose staging files the
    /// caller deletes.
    pub(super) fn expire(&self, cutoff: i64) -> Result<(Vec<String>, usize)> {
        let mut conn = self.pool.get()?;
        // Reads then writes: take the write lock first, or a concurrent writer
        // makes the upgrade fail with SQLITE_BUSY instead of waiting.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let stale: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT upload_id FROM uploads WHERE updated_at < ?1 AND state = 'receiving'",
            )?;
            stmt.query_map(params![cutoff], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        let forgotten = tx
            .prepare_cached(
                "DELETE FROM uploads WHERE updated_at < ?1 AND state IN ('receiving', 'complete')",
            )?
            .execute(params![cutoff])?;
        tx.prepare_cached("DELETE FROM v1_sessions WHERE updated_at < ?1")?
            .execute(params![cutoff])?;
        tx.commit()?;
        Ok((stale, forgotten))
    }

    pub(super) fn v1_session(&self, client_name: &str) -> Result<Option<V1Session>> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached("SELECT actual_name, next_idx, size, last_sha256 FROM v1_sessions WHERE client_name = ?1")?.query_row(params![client_name],
                |r| {
                    Ok(V1Session {
                        client_name: client_name.to_owned(),
                        actual_name: r.get(0)?,
                        next_idx: r.get::<_, i64>(1)? as u64,
                        size: r.get::<_, i64>(2)? as u64,
                        last_sha256: r.get(3)?,
                    })
                })
            .optional()?)
    }

    /// Every v1 session: client name, final name and acknowledged size.
    pub(super) fn v1_sessions(&self) -> Result<Vec<(String, String, u64)>> {
        let conn = self.pool.get()?;
        let mut stmt =
            conn.prepare_cached("SELECT client_name, actual_name, size FROM v1_sessions")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Creates or replaces the v1 session of a client file name.
    pub(super) fn put_v1_session(&self, session: &V1Session) -> Result<()> {
        let conn = self.pool.get()?;
        conn.prepare_cached(
            "INSERT OR REPLACE INTO v1_sessions
                 (client_name, actual_name, next_idx, size, last_sha256, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            session.client_name,
            session.actual_name,
            session.next_idx as i64,
            session.size as i64,
            session.last_sha256,
            now_secs()
        ])?;
        Ok(())
    }

    #[cfg(test)]
    fn integrity_check(&self) -> Result<String> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached("PRAGMA integrity_check")?
            .query_row([], |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> FileMeta {
        FileMeta {
            client_name: "a.txt".into(),
            file_size: 10,
            chunk_count: 2,
            file_sha256: "00".repeat(32),
        }
    }

    #[test]
    fn uploads_chunks_and_completion_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let state = UploadState::open(&dir.path().join("s.db")).unwrap();
        let up = state
            .get_or_create_upload("id-0123456789abcdef", &meta(), Some("lab-3"))
            .unwrap();
        assert_eq!(up.phase, UploadPhase::Receiving);
        let again = state
            .get_or_create_upload("id-0123456789abcdef", &meta(), Some("lab-3"))
            .unwrap();
        assert_eq!(again.meta, meta());
        assert_eq!(again.named_client.as_deref(), Some("lab-3"));
        let c0 = ChunkRecord {
            chunk_idx: 0,
            offset: 0,
            length: 5,
            sha256: "aa".into(),
        };
        assert_eq!(state.record_chunk("id-0123456789abcdef", &c0).unwrap(), 1);
        assert_eq!(state.record_chunk("id-0123456789abcdef", &c0).unwrap(), 1);
        let c1 = ChunkRecord {
            chunk_idx: 1,
            offset: 5,
            length: 5,
            sha256: "bb".into(),
        };
        assert_eq!(state.record_chunk("id-0123456789abcdef", &c1).unwrap(), 2);
        assert_eq!(state.unfinished().unwrap().len(), 1);
        state.complete("id-0123456789abcdef", "a.txt").unwrap();
        let done = state.upload("id-0123456789abcdef").unwrap().unwrap();
        assert_eq!(done.phase, UploadPhase::Complete);
        assert_eq!(done.actual_name.as_deref(), Some("a.txt"));
        assert!(state.chunks("id-0123456789abcdef").unwrap().is_empty());
        assert!(state.unfinished().unwrap().is_empty());
        // Reopening migrates nothing and keeps the data.
        drop(state);
        let state = UploadState::open(&dir.path().join("s.db")).unwrap();
        assert!(state.upload("id-0123456789abcdef").unwrap().is_some());
        assert_eq!(state.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn expiry_forgets_old_uploads_but_not_finalizing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let state = UploadState::open(&dir.path().join("s.db")).unwrap();
        state
            .get_or_create_upload("receiving-000000001", &meta(), None)
            .unwrap();
        state
            .get_or_create_upload("finalizing-00000001", &meta(), None)
            .unwrap();
        state
            .set_phase("finalizing-00000001", UploadPhase::Finalizing, Some("x"))
            .unwrap();
        let (stale, forgotten) = state.expire(now_secs() + 10).unwrap();
        assert_eq!(stale, vec!["receiving-000000001".to_string()]);
        assert_eq!(forgotten, 1);
        assert!(state.upload("finalizing-00000001").unwrap().is_some());
    }

    #[test]
    fn a_state_file_from_before_the_named_client_column_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        // The state file as the receiver wrote it before migration 3.
        {
            let pool = sqlite::open_pool(&path, Duration::from_secs(10)).unwrap();
            sqlite::migrate(&pool, &[SCHEMA_V1, tus::SCHEMA_V2]).unwrap();
            pool.get()
                .unwrap()
                .execute(
                    "INSERT INTO uploads (upload_id, client_name, file_size, chunk_count, file_sha256, state, created_at, updated_at)
                     VALUES ('old-0123456789abcdef', 'a.txt', 10, 2, ?1, 'receiving', 1, 1)",
                    params!["00".repeat(32)],
                )
                .unwrap();
        }
        let state = UploadState::open(&path).unwrap();
        let old = state.upload("old-0123456789abcdef").unwrap().unwrap();
        assert_eq!(old.meta, meta());
        assert_eq!(old.named_client, None);
        let new = state
            .get_or_create_upload("new-0123456789abcdef", &meta(), Some("clinic-12"))
            .unwrap();
        assert_eq!(new.named_client.as_deref(), Some("clinic-12"));
        // A batch records the client of the files it creates, and leaves the
        // client of an upload that exists already as it was.
        let chunk = ChunkRecord {
            chunk_idx: 0,
            offset: 0,
            length: 10,
            sha256: "aa".into(),
        };
        state
            .record_finalizing(
                &[
                    (
                        "new-0123456789abcdef".into(),
                        meta(),
                        chunk.clone(),
                        "a.txt".into(),
                    ),
                    ("bat-0123456789abcdef".into(), meta(), chunk, "b.txt".into()),
                ],
                Some("lab-3"),
            )
            .unwrap();
        let kept = state.upload("new-0123456789abcdef").unwrap().unwrap();
        assert_eq!(kept.named_client.as_deref(), Some("clinic-12"));
        let batch = state.upload("bat-0123456789abcdef").unwrap().unwrap();
        assert_eq!(batch.named_client.as_deref(), Some("lab-3"));
        assert_eq!(state.integrity_check().unwrap(), "ok");
    }
}
