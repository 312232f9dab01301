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
    /// Set when the file is streamed ([`Store::ingest_streaming`]).
    streaming: Option<Streaming<'a>>,
}

/// The intermediate commits of a file streamed into the buffer. Its bytes go
/// to the `bulk` database, its chunk records to `buffer.db` in the commit
/// after the one that holds their bytes: SQLite commits the two files one
/// after the other, and a reader must never see a chunk whose bytes are not
/// there yet.
struct Streaming<'a> {
    /// The file's chunk count: the last chunk is never in an intermediate
    /// commit, so the uploader cannot finish the file before it is sealed.
    chunk_count: u64,
    /// Chunks whose bytes are written but whose records are not: (index,
    /// offset, length, SHA-256, CRC-32C).
    pending: Vec<(u64, u64, u64, String, Option<u32>)>,
    /// Chunk bytes pushed since the last commit.
    since: u64,
    /// Called after each commit.
    committed: &'a dyn Fn(),
    /// Called between a commit and the next transaction.
    between: &'a dyn Fn(),
}

/// Chunk bytes of a streamed file per intermediate commit. Each commit also
/// writes the few b-tree pages it touched to the WAL again, so commits are
/// not per chunk; the first commit comes after the first chunk, so that
/// sending starts at once.
const STREAM_COMMIT_BYTES: u64 = 8 << 20;

impl ChunkSink<'_> {
    /// How many chunks were pushed so far.
    pub fn chunks(&self) -> u64 {
        self.next_idx
    }

    /// Appends the next chunk, with its SHA-256 as hex (empty when it is
    /// left to be worked out when needed, see [`ChunkMeta::sha256`]) and its
    /// CRC-32C.
    ///
    /// [`ChunkMeta::sha256`]: super::ChunkMeta::sha256
    pub(crate) fn push(&mut self, data: &[u8], sha256: &str, crc32c: Option<u32>) -> Result<()> {
        let (idx, offset) = (self.next_idx, self.offset);
        self.next_idx += 1;
        self.offset += data.len() as u64;
        let Some(streaming) = &mut self.streaming else {
            insert_chunk(
                self.conn,
                self.file_id,
                idx,
                offset,
                data.len() as u64,
                sha256,
                crc32c,
            )?;
            self.conn
                .prepare_cached(
                    "INSERT INTO main.chunk_data (file_id, idx, data) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![self.file_id, idx as i64, data])?;
            return Ok(());
        };
        let last = self.next_idx == streaming.chunk_count;
        if last {
            // The records of the chunks so far are committed first. Then the
            // last chunk's bytes come in a commit of their own, the first
            // synced one: the file's bytes are all durable in `bulk` before
            // the sealing commit (synced too) names the last chunk. SQLite
            // changes `synchronous` only between transactions.
            record_committed(self.conn, self.file_id, &mut streaming.pending)?;
            self.conn.execute_batch("COMMIT")?;
            crate::sqlite::set_synchronous(self.conn, "FULL")?;
            (streaming.between)();
            self.conn.execute_batch("BEGIN IMMEDIATE")?;
            (streaming.committed)();
        }
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO bulk.chunk_data (file_id, idx, data) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![self.file_id, idx as i64, data])?;
        streaming
            .pending
            .push((idx, offset, data.len() as u64, sha256.to_owned(), crc32c));
        streaming.since += data.len() as u64;
        let first = self.next_idx == 1;
        if last || first || streaming.since >= STREAM_COMMIT_BYTES {
            // Unsynced until the last chunk (the connection runs with
            // synchronous = NORMAL until then): the source stays in the
            // spool until the sealing commit, which makes these durable
            // with it. The records of the chunks just committed follow in a
            // commit of their own.
            record_committed(self.conn, self.file_id, &mut streaming.pending)?;
            streaming.since = 0;
            if !last {
                self.conn.execute_batch("COMMIT")?;
                (streaming.between)();
                self.conn.execute_batch("BEGIN IMMEDIATE")?;
                (streaming.committed)();
            }
        }
        Ok(())
    }
}

/// Commits the bytes written so far, and, in the transaction it opens next,
/// inserts the records of the `pending` chunks: their bytes are committed
/// now.
fn record_committed(
    conn: &rusqlite::Connection,
    file_id: i64,
    pending: &mut Vec<(u64, u64, u64, String, Option<u32>)>,
) -> rusqlite::Result<()> {
    conn.execute_batch("COMMIT; BEGIN IMMEDIATE")?;
    for (idx, offset, length, sha256, crc32c) in pending.drain(..) {
        insert_chunk(conn, file_id, idx, offset, length, &sha256, crc32c)?;
    }
    Ok(())
}

/// Inserts a chunk's record.
fn insert_chunk(
    conn: &rusqlite::Connection,
    file_id: i64,
    idx: u64,
    offset: u64,
    length: u64,
    sha256: &str,
    crc32c: Option<u32>,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT INTO chunks (file_id, idx, byte_offset, length, sha256, crc32c) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![file_id, idx as i64, offset as i64, length as i64, sha256, crc32c])
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
        // Size and chunk count come with the decision below.
        let file_id = insert_file(&self.tx, file, 0, 0).map_err(StoreError::from)?;
        let mut sink = ChunkSink {
            conn: &self.tx,
            file_id,
            next_idx: 0,
            offset: 0,
            streaming: None,
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
            remember_kept(&self.tx, file).map_err(StoreError::from)?;
        }
        Ok(Some(file_id))
    }

    /// Removes what was written of file `file_id` in this batch.
    fn forget(&self, file_id: i64) -> Result<()> {
        forget_file(&self.tx, file_id)
    }
}

/// Inserts `file`'s row, queued, with `size` and `chunk_count` and no
/// SHA-256 yet (which marks a file still being buffered); returns its id.
fn insert_file(
    conn: &rusqlite::Connection,
    file: &NewFile,
    size: u64,
    chunk_count: u64,
) -> rusqlite::Result<i64> {
    let now = now_ms();
    conn.prepare_cached(
        "INSERT INTO files (spool, rel_path, remote_name, target, size, sha256, chunk_size, chunk_count, upload_id,
                            src_path, src_dev, src_ino, src_size, src_mtime_ns, state, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, '', ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 'queued', ?14, ?14)",
    )?
    .execute(params![
        file.spool,
        file.rel_path,
        file.remote_name,
        file.target,
        size as i64,
        file.chunk_size as i64,
        chunk_count as i64,
        file.upload_id,
        file.src_path,
        file.identity.dev as i64,
        file.identity.ino as i64,
        file.identity.size as i64,
        file.identity.mtime_ns,
        now
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Records a kept source's identity, so that it is never buffered again.
fn remember_kept(conn: &rusqlite::Connection, file: &NewFile) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO kept_sources (spool, rel_path, src_dev, src_ino, src_size, src_mtime_ns)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        file.spool,
        file.rel_path,
        file.identity.dev as i64,
        file.identity.ino as i64,
        file.identity.size as i64,
        file.identity.mtime_ns
    ])
}

/// Deletes file `file_id` with its chunks (in the caller's transaction, if
/// any). For a file never sealed: a crash may keep either file's part of
/// this, and either way the file is unsealed or gone at the next start.
fn forget_file(conn: &rusqlite::Connection, file_id: i64) -> Result<()> {
    for sql in [
        "DELETE FROM main.chunk_data WHERE file_id = ?1",
        "DELETE FROM bulk.chunk_data WHERE file_id = ?1",
        "DELETE FROM chunks WHERE file_id = ?1",
        "DELETE FROM chunk_errors WHERE file_id = ?1",
        "DELETE FROM files WHERE id = ?1",
    ] {
        conn.prepare_cached(sql)?.execute(params![file_id])?;
    }
    Ok(())
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
    /// A file still being streamed in does not count: its source is needed.
    pub(crate) fn find_by_source(&self, spool: &str, id: SourceIdentity) -> Result<Option<i64>> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached("SELECT id FROM files WHERE spool = ?1 AND src_dev = ?2 AND src_ino = ?3 AND src_size = ?4 AND src_mtime_ns = ?5 AND sha256 != ''")?.query_row(params![spool, id.dev as i64, id.ino as i64, id.size as i64, id.mtime_ns],
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

    /// Buffers one large file in commits of its own while it is read, so that
    /// a delivery that can send a file before its hash is known starts at
    /// once. The file's row is created first, with its size and its
    /// `chunk_count` (which `fill` must push exactly) and an empty SHA-256,
    /// which marks it as still being buffered; chunks are committed
    /// unsynced every few MiB, `committed` being called after each commit;
    /// the last chunk and the SHA-256 come in the final commit, which is
    /// synced. Returns the file's id, or `None` when `fill` aborted: then,
    /// as on an error, what was committed of the file is deleted again (or,
    /// if even that fails, at the next start: [`Store::forget_unfinished`]).
    pub(crate) fn ingest_streaming<E>(
        &self,
        file: &NewFile,
        chunk_count: u64,
        committed: &dyn Fn(),
        fill: impl FnOnce(&mut ChunkSink<'_>) -> std::result::Result<IngestDecision, E>,
    ) -> std::result::Result<Option<i64>, E>
    where
        E: From<StoreError>,
    {
        let committed = || {
            self.commits.send_modify(|n| *n = n.wrapping_add(1));
            committed();
        };
        // The unsynced commits' pages start going to disk right away, so
        // that the sealing sync finds them (mostly) written instead of
        // writing the whole file then, while the last chunk waits for it.
        let wal = std::cell::OnceCell::new();
        let between = || {
            self.let_writers_in();
            let wal = wal.get_or_init(|| {
                std::fs::File::open(super::corrupt::with_suffix(
                    &super::bulk_path(&self.path),
                    "-wal",
                ))
                .ok()
            });
            if let Some(wal) = wal {
                crate::disk::start_writeback(wal, 0, 0);
            }
        };
        self.let_writers_in();
        let conn = self.pool.get().map_err(StoreError::from)?;
        let mut file_id = None;
        // Everything from here on runs in the closure, so that `synchronous`
        // is set back to FULL below whatever fails.
        let outcome = (|| -> std::result::Result<Option<i64>, E> {
            crate::sqlite::set_synchronous(&conn, "NORMAL").map_err(StoreError::from)?;
            conn.execute_batch("BEGIN IMMEDIATE")
                .map_err(StoreError::from)?;
            let id = insert_file(&conn, file, file.identity.size, chunk_count)
                .map_err(StoreError::from)?;
            // Bytes a crash left under this id, if it was a removed file's.
            conn.prepare_cached("DELETE FROM bulk.chunk_data WHERE file_id = ?1")
                .and_then(|mut stale| stale.execute(params![id]))
                .map_err(StoreError::from)?;
            file_id = Some(id);
            self.set_ingesting(id, true);
            let mut sink = ChunkSink {
                conn: &conn,
                file_id: id,
                next_idx: 0,
                offset: 0,
                streaming: Some(Streaming {
                    chunk_count,
                    pending: Vec::new(),
                    since: 0,
                    committed: &committed,
                    between: &between,
                }),
            };
            let sha256 = match fill(&mut sink)? {
                IngestDecision::Commit { sha256 } => sha256,
                IngestDecision::Abort => return Ok(None),
            };
            if sink.next_idx != chunk_count || sink.offset != file.identity.size {
                return Ok(None);
            }
            crate::failpoint::hit(crate::failpoint::INGEST_BEFORE_SEAL);
            conn.prepare_cached("UPDATE files SET sha256 = ?2 WHERE id = ?1")
                .and_then(|mut update| update.execute(params![id, sha256]))
                .map_err(StoreError::from)?;
            if file.remember_kept {
                remember_kept(&conn, file).map_err(StoreError::from)?;
            }
            // The sealing commit is synced (see `ChunkSink::push`): the
            // source may go right after it.
            conn.execute_batch("COMMIT").map_err(StoreError::from)?;
            Ok(Some(id))
        })();
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        let _ = crate::sqlite::set_synchronous(&conn, "FULL");
        if let Some(id) = file_id {
            self.set_ingesting(id, false);
        }
        if !matches!(outcome, Ok(Some(_)))
            && let Some(id) = file_id
        {
            let forgotten = forget_file(&conn, id);
            if let Err(e) = forgotten {
                tracing::warn!(file_id = id, error = %e, "could not remove a file whose buffering stopped half-way; it is removed at the next start");
            }
        }
        committed();
        outcome
    }

    /// Removes files whose buffering stopped half-way (streamed files never
    /// sealed, other than those this process is streaming in right now),
    /// with their chunks: their sources are still in their spools, and are
    /// buffered again. Returns how many. For the process that streams files
    /// in (the daemon): at its start, after a stop; and while ingest waits
    /// for room, after a full disk kept an ingest from cleaning up (such a
    /// file's bytes count against the buffer's limits until removed).
    ///
    /// Also deletes the bytes in `bulk` that no waiting file needs: left by
    /// a crash between the two commits that remove a file, or confirm it.
    pub(crate) fn forget_unfinished(&self) -> Result<usize> {
        let mut conn = self.pool.get()?;
        // Immediate: holding the write lock of both files, it reads records
        // and bytes as of the same commit.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut ids: Vec<i64> = tx
            .prepare_cached("SELECT id FROM files WHERE state = 'queued' AND sha256 = ''")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        ids.retain(|id| !self.is_ingesting(*id));
        for id in &ids {
            forget_file(&tx, *id)?;
        }
        // A confirmation committed unsynced before a crash must be durable
        // before the bytes it released go (see `Store::release_bulk`).
        self.sync_records()?;
        let orphans = tx
            .prepare_cached(super::DELETE_UNNEEDED_BULK)?
            .execute([])?;
        tx.commit()?;
        if !ids.is_empty() || orphans > 0 {
            super::schema::release_free_pages(&mut conn)?;
        }
        Ok(ids.len())
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
        self.let_writers_in();
        let value = {
            let mut conn = self.pool.get().map_err(StoreError::from)?;
            // The sources go right after this commit: synced, whatever a
            // failed restore left on this pooled connection.
            crate::sqlite::set_synchronous(&conn, "FULL").map_err(StoreError::from)?;
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
                sink.push(b"xx", "00", None)?;
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
    fn a_streamed_file_is_visible_chunk_by_chunk_and_sealed_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let mut file = new_file("big", 7);
        file.identity.size = 10;
        let commits = std::cell::Cell::new(0);
        let committed = || commits.set(commits.get() + 1);
        // Seen from another connection while the file is read: after the
        // first chunk's commit the file is due to a target that streams
        // (only), without a hash, and without its last chunk.
        let id = store
            .ingest_streaming(&file, 3, &committed, |sink| -> Result<IngestDecision> {
                sink.push(b"0123", "c0", None)?;
                let due = store.due_files("t", i64::MAX, &[], 10, true)?;
                assert_eq!(due.len(), 1);
                assert!(due[0].is_buffering());
                assert_eq!((due[0].size, due[0].chunk_count), (10, 3));
                assert!(store.due_files("t", i64::MAX, &[], 10, false)?.is_empty());
                sink.push(b"4567", "c1", None)?;
                sink.push(b"89", "c2", None)?;
                let seen = store.chunks(due[0].id)?.len();
                assert_eq!(seen, 2, "every chunk but the last is seen");
                // Not a source to dispose of yet.
                assert_eq!(store.find_by_source("/spool", file.identity)?, None);
                Ok(IngestDecision::Commit {
                    sha256: "ff".into(),
                })
            })
            .unwrap()
            .unwrap();
        assert_eq!(
            commits.get(),
            3,
            "after the first chunk, before the last, the seal"
        );
        let rec = store.file(id).unwrap();
        assert!(!rec.is_buffering());
        assert_eq!((rec.sha256.as_str(), rec.chunk_count), ("ff", 3));
        assert_eq!(store.chunk_data(id, 2).unwrap(), b"89");
        assert_eq!(
            store.find_by_source("/spool", file.identity).unwrap(),
            Some(id)
        );
        assert_eq!(store.forget_unfinished().unwrap(), 0);

        // A file whose reading is abandoned leaves nothing; nor does one a
        // stop interrupted, once the next start tidies up.
        let mut changed = new_file("changed", 8);
        changed.identity.size = 10;
        let kept = store
            .ingest_streaming(&changed, 3, &|| {}, |sink| -> Result<IngestDecision> {
                sink.push(b"0123", "c0", None)?;
                Ok(IngestDecision::Abort)
            })
            .unwrap();
        assert_eq!(kept, None);
        assert_eq!(store.list().unwrap().len(), 1);
        {
            let conn = store.pool.get().unwrap();
            conn.execute_batch(
                "INSERT INTO files (spool, rel_path, remote_name, target, size, sha256, chunk_size, chunk_count, upload_id,
                                    src_path, src_dev, src_ino, src_size, src_mtime_ns, state, created_at, updated_at)
                 VALUES ('/spool', 'cut', 'cut', 't', 10, '', 4, 3, 'upload-cut-0123456789', '/spool/cut', 1, 9, 10, 5, 'queued', 0, 0);
                 INSERT INTO chunks (file_id, idx, byte_offset, length, sha256) VALUES (last_insert_rowid(), 0, 0, 4, 'c0');",
            )
            .unwrap();
        }
        // Left over, not being streamed in by anyone: no upload waits for it.
        assert!(
            store
                .due_files("t", i64::MAX, &[], 10, true)
                .unwrap()
                .iter()
                .all(|f| !f.is_buffering())
        );
        assert_eq!(store.forget_unfinished().unwrap(), 1);
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(store.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn an_uploader_write_does_not_wait_for_a_large_file_to_be_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let other = ingest(&store, &new_file("small", 1), b"abc");
        let mut big = new_file("big", 2);
        big.chunk_size = 1 << 20;
        big.identity.size = 40 << 20;
        let chunk = vec![5u8; 1 << 20];
        let written_at = std::sync::atomic::AtomicU64::new(u64::MAX);
        std::thread::scope(|scope| {
            store
                .ingest_streaming(&big, 40, &|| {}, |sink| -> Result<IngestDecision> {
                    for idx in 0..40u64 {
                        sink.push(&chunk, "00", None)?;
                        if idx == 2 {
                            // An upload records its resume state meanwhile
                            // (the write lock is the ingest's right now).
                            let (store, written_at) = (&store, &written_at);
                            scope.spawn(move || {
                                store.set_delivery_state(other, Some("upload-1")).unwrap();
                                let done = store.chunks_from(2, 0).unwrap().len() as u64;
                                written_at.store(done, std::sync::atomic::Ordering::SeqCst);
                            });
                        }
                    }
                    Ok(IngestDecision::Commit {
                        sha256: "ff".into(),
                    })
                })
                .unwrap()
                .unwrap();
        });
        let at = written_at.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            at < 39,
            "the uploader's write went through when {at} of 40 chunks were committed; it should not wait for the seal"
        );
        assert_eq!(
            store.file(other).unwrap().delivery_state.as_deref(),
            Some("upload-1")
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
