//! Buffering files: one transaction takes any number of files, each kept or
//! rolled back on its own, committed with one sync; and the questions ingest
//! asks before it reads a source (buffered already? kept already?).

use rusqlite::{OptionalExtension, params};

use crate::agent::spool::SourceIdentity;

use super::{NewFile, Result, Store, StoreError, now_ms};

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
    pub(crate) fn push(&mut self, data: &[u8], sha256: &str) -> Result<()> {
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
    pub(crate) fn add<E>(
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

impl Store {
    /// The id of a buffered file with this source identity in this spool, if any:
    /// the source was buffered before and only its disposal may be missing.
    pub(crate) fn find_by_source(&self, spool: &str, id: SourceIdentity) -> Result<Option<i64>> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached("SELECT id FROM files WHERE spool = ?1 AND src_dev = ?2 AND src_ino = ?3 AND src_size = ?4 AND src_mtime_ns = ?5")?.query_row(params![spool, id.dev as i64, id.ino as i64, id.size as i64, id.mtime_ns],
                |r| r.get(0))
            .optional()?)
    }

    /// Whether a kept source at `rel_path` was already ingested unchanged.
    pub(crate) fn is_kept(&self, spool: &str, rel_path: &str, id: SourceIdentity) -> Result<bool> {
        let conn = self.pool.get()?;
        let found: Option<i64> = conn
            .prepare_cached("SELECT 1 FROM kept_sources WHERE spool = ?1 AND rel_path = ?2 AND src_dev = ?3 AND src_ino = ?4 AND src_size = ?5 AND src_mtime_ns = ?6")?.query_row(params![spool, rel_path, id.dev as i64, id.ino as i64, id.size as i64, id.mtime_ns],
                |r| r.get(0))
            .optional()?;
        Ok(found.is_some())
    }

    /// Buffers a file in one transaction: `fill` pushes every chunk into the sink
    /// and decides whether to commit. Returns the new file's id, or `None` when
    /// `fill` aborted (nothing is kept).
    pub(crate) fn ingest<E>(
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
    pub(crate) fn ingest_batch<T, E>(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::store::FileState;
    use crate::agent::store::testing::{ingest, new_file};

    #[test]
    fn ingest_commits_or_rolls_back_whole_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let id = ingest(&store, &new_file("a", 1), b"0123456789");
        let rec = store.file(id).unwrap();
        assert_eq!(
            (rec.size, rec.chunk_count, rec.state),
            (10, 3, FileState::Queued)
        );
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
