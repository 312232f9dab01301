//! What the uploader reads and records: due files, chunks and their bytes,
//! acknowledgements and resume state, failures with their next attempt,
//! parking and confirmation.

use rusqlite::{OptionalExtension, params};

use super::{
    ChunkMeta, Durability, ERROR_HISTORY, FileRecord, FileState, Result, Store, StoreError, now_ms,
};

/// Chunk data of confirmed files kept at most while other files wait (see
/// [`Store::confirm`]): the buffer's file is that much larger meanwhile.
pub(crate) const CONFIRMED_DATA_MAX: u64 = 32 << 20;

/// Deletes the chunk rows in `buffer.db` that confirmed files still have.
const DELETE_CONFIRMED_DATA: &str =
    "DELETE FROM main.chunk_data WHERE file_id IN (SELECT id FROM files WHERE state = 'confirmed')";

impl Store {
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
                state,
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

    /// The buffered file with this id, or [`StoreError::NoSuchFile`].
    pub fn file(&self, id: i64) -> Result<FileRecord> {
        self.file_records("WHERE f.id = ?1", &[&id])?
            .pop()
            .ok_or(StoreError::NoSuchFile(id))
    }

    /// Queued files of `target` due at `now` (every pending chunk's next attempt
    /// has come), oldest first, skipping `busy` ids, at most `limit`. Files
    /// still being buffered ([`FileRecord::is_buffering`]) count only with
    /// `buffering` (the target can send a file before its hash is known), and
    /// once their first chunk is in.
    pub(crate) fn due_files(
        &self,
        target: &str,
        now: i64,
        busy: &[i64],
        limit: usize,
        buffering: bool,
    ) -> Result<Vec<FileRecord>> {
        let conn = self.pool.get()?;
        // Walks the queue in id order and stops at the first `limit` due files
        // not busy: the cost does not grow with the length of the queue.
        let mut stmt = conn.prepare_cached(
            "SELECT f.id FROM files f
             WHERE f.state = 'queued' AND f.target = ?1
               AND (f.sha256 != '' OR (?4 AND EXISTS (SELECT 1 FROM chunks c WHERE c.file_id = f.id)))
               AND coalesce((SELECT max(next_attempt) FROM chunks c WHERE c.file_id = f.id AND c.state = 'pending'),
                            (SELECT max(next_attempt) FROM chunks c WHERE c.file_id = f.id), 0) <= ?2
             ORDER BY f.id LIMIT ?3",
        )?;
        let ids = stmt
            .query_map(
                params![target, now, (limit + busy.len()) as i64, buffering],
                |r| r.get::<_, i64>(0),
            )?
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
        let mut records =
            self.file_records("WHERE f.id IN (SELECT value FROM json_each(?1))", &[&ids])?;
        // A file left unsealed by a streaming-in that stopped is not
        // waited for (see `Store::is_ingesting`).
        records.retain(|f| !f.is_buffering() || self.is_ingesting(f.id));
        Ok(records)
    }

    /// The earliest moment (ms) any queued file of `target` becomes due.
    pub(crate) fn next_due(&self, target: &str) -> Result<Option<i64>> {
        let conn = self.pool.get()?;
        // A file is due when its latest-scheduled pending chunk is, or, when
        // every piece was acknowledged and only finishing it failed, when its
        // latest-scheduled chunk is (as `due_files` reads it); the earliest
        // such moment over all files is when the uploader must wake.
        Ok(conn.prepare_cached("SELECT min(due) FROM (SELECT coalesce(max(CASE WHEN c.state = 'pending' THEN c.next_attempt END), max(c.next_attempt)) AS due
             FROM chunks c JOIN files f ON f.id = c.file_id
             WHERE f.state = 'queued' AND f.target = ?1 GROUP BY f.id)")?.query_row(params![target],
            |r| r.get(0))?)
    }

    /// A file's chunks in index order, without their bytes
    /// ([`Store::chunk_data`] reads those); empty for an unknown id.
    pub fn chunks(&self, file_id: i64) -> Result<Vec<ChunkMeta>> {
        self.chunks_from(file_id, 0)
    }

    /// [`Store::chunks`] from index `from` on: the chunks of a file being
    /// streamed in that were committed since its upload last looked.
    pub(crate) fn chunks_from(&self, file_id: i64, from: u64) -> Result<Vec<ChunkMeta>> {
        let conn = self.pool.get()?;
        let mut stmt = conn.prepare_cached(
            "SELECT idx, byte_offset, length, sha256, state, retry_count, ack, crc32c FROM chunks WHERE file_id = ?1 AND idx >= ?2 ORDER BY idx",
        )?;
        let rows = stmt.query_map(params![file_id, from as i64], |r| {
            Ok(ChunkMeta {
                idx: r.get::<_, i64>(0)? as u64,
                offset: r.get::<_, i64>(1)? as u64,
                length: r.get::<_, i64>(2)? as u64,
                sha256: r.get(3)?,
                uploaded: r.get::<_, String>(4)? != "pending",
                retry_count: r.get::<_, i64>(5)? as u64,
                ack: r.get(6)?,
                crc32c: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// A chunk's bytes; empty for an unknown chunk, and once the data of
    /// its confirmed file has left the buffer (see `Store::confirm`).
    pub fn chunk_data(&self, file_id: i64, idx: u64) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        self.append_chunk_data(file_id, idx, &mut data)?;
        Ok(data)
    }

    /// Appends chunk `idx`'s bytes to `out` (nothing if there is no such
    /// chunk) straight from SQLite's copy of the row: a piece of several
    /// chunks is put together without a buffer per chunk.
    pub(crate) fn append_chunk_data(
        &self,
        file_id: i64,
        idx: u64,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let conn = self.pool.get()?;
        let start = out.len();
        conn.prepare_cached(
            "SELECT data FROM main.chunk_data WHERE file_id = ?1 AND idx = ?2
             UNION ALL SELECT data FROM bulk.chunk_data WHERE file_id = ?1 AND idx = ?2 LIMIT 1",
        )?
        .query_row(params![file_id, idx as i64], |r| {
            out.extend_from_slice(r.get_ref(0)?.as_blob()?);
            Ok(())
        })
        .optional()?;
        // The overflow pages of a chunk larger than a page are not read
        // again (a chunk is sent once), but each pooled connection would
        // keep up to 2 MB of them: an S3 agent reading 8 MiB parts peaked at
        // 62-63 MiB that way, 55 MiB without. A small file's chunk sits in a
        // b-tree page that its neighbours' reads still want.
        if out.len() - start > super::BLOB_PAGE_SIZE as usize {
            let _ = conn.release_memory();
        }
        Ok(())
    }

    /// Marks chunks acknowledged by the receiver, with what the delivery
    /// needs to remember of their piece (`ack`), if anything.
    pub(crate) fn mark_uploaded(
        &self,
        file_id: i64,
        idxs: &[u64],
        ack: Option<&str>,
        durability: Durability,
    ) -> Result<()> {
        // Ingest pauses at its next commit until this write is done.
        let _turn = self.writer_waiting();
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
    pub(crate) fn reschedule_now(&self, target: &str) -> Result<usize> {
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
    pub(crate) fn reset_chunks(&self, file_id: i64) -> Result<()> {
        // Ingest pauses at its next commit until this write is done.
        let _turn = self.writer_waiting();
        let conn = self.pool.get()?;
        conn.prepare_cached("UPDATE chunks SET state = 'pending', ack = NULL WHERE file_id = ?1")?
            .execute(params![file_id])?;
        Ok(())
    }

    /// Forgets a file's upload on the peer: every chunk pending again and no
    /// resume state, so the next attempt starts a new upload.
    pub(crate) fn forget_upload(&self, file_id: i64) -> Result<()> {
        // Ingest pauses at its next commit until this write is done.
        let _turn = self.writer_waiting();
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
    pub(crate) fn set_delivery_state(&self, file_id: i64, state: Option<&str>) -> Result<()> {
        // Ingest pauses at its next commit until this write is done.
        let _turn = self.writer_waiting();
        let conn = self.pool.get()?;
        conn.prepare_cached("UPDATE files SET delivery_state = ?2, updated_at = ?3 WHERE id = ?1")?
            .execute(params![file_id, state, now_ms()])?;
        Ok(())
    }

    /// Records a failed attempt at a chunk: its retry count goes up, its next
    /// attempt is `next_attempt` (ms), and the error joins the last five.
    /// Returns the new retry count.
    pub(crate) fn record_failure(
        &self,
        file_id: i64,
        idx: u64,
        error: &str,
        next_attempt: i64,
    ) -> Result<u64> {
        // Ingest pauses at its next commit until this write is done.
        let _turn = self.writer_waiting();
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
        // Nothing else checkpoints the WAL while nothing is confirmed: during
        // an outage of days, failures alone would grow it without bound.
        self.trim_wal();
        Ok(count as u64)
    }

    /// The last errors of a chunk, oldest first (at most five), each with
    /// when it happened in milliseconds since the Unix epoch.
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
    pub(crate) fn park(&self, file_id: i64, reason: &str) -> Result<()> {
        // Ingest pauses at its next commit until this write is done.
        let _turn = self.writer_waiting();
        let conn = self.pool.get()?;
        conn.prepare_cached(
            "UPDATE files SET state = 'failed', failure = ?2, updated_at = ?3 WHERE id = ?1",
        )?
        .execute(params![file_id, reason, now_ms()])?;
        Ok(())
    }

    /// The receiver confirmed the whole file: its data leaves the store; the
    /// record stays (with the server's name) until the retention period passes.
    ///
    /// The data goes at once only when no other file needs chunk data: the
    /// whole table is emptied then, which frees its pages without writing
    /// them. While other files wait, deleting a file's rows would rewrite
    /// the b-tree pages that hold them (for small files, each page is shared
    /// with the files around it), writing their bytes a second time; so the
    /// data of confirmed files waits for that moment, up to
    /// [`CONFIRMED_DATA_MAX`] bytes, and past that it is deleted together.
    pub(crate) fn confirm(
        &self,
        file_id: i64,
        server_name: Option<&str>,
        durability: Durability,
    ) -> Result<()> {
        self.confirm_many(&[(file_id, server_name.map(str::to_owned))], durability)
    }

    /// Deletes the chunk data that confirmed files still have (see
    /// [`Store::confirm`]) at once, and gives its pages back. Returns how
    /// many chunks went.
    pub(crate) fn release_confirmed_data(&self) -> Result<usize> {
        let _turn = self.writer_waiting();
        let mut kept = self
            .confirmed_data
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut conn = self.pool.get()?;
        let deleted = conn.prepare_cached(DELETE_CONFIRMED_DATA)?.execute([])?;
        let deleted = deleted + self.release_bulk(&mut conn, None)?;
        *kept = 0;
        drop(kept);
        if deleted > 0 {
            super::schema::release_free_pages(&mut conn)?;
            drop(conn);
            self.trim_wal();
        }
        Ok(deleted)
    }

    /// [`Store::confirm`] for several files (id, the receiver's name) in one commit.
    pub(crate) fn confirm_many(
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

    /// Deletes the bytes in `bulk` that no waiting file needs, in a commit
    /// after the one that confirmed or removed their files: all of them when
    /// no file waits, else those of `files` (once confirmed or gone), or,
    /// with `None`, of every file confirmed or gone. `buffer.db`'s WAL is
    /// synced first, with the write lock held, so that a power cut cannot
    /// keep the deletion and lose an earlier commit made unsynced
    /// ([`Durability::Unsynced`]). Returns how many chunks went.
    pub(super) fn release_bulk(
        &self,
        conn: &mut rusqlite::Connection,
        files: Option<&[i64]>,
    ) -> Result<usize> {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        self.sync_records()?;
        let waiting: bool = tx
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM files WHERE state != 'confirmed')")?
            .query_row([], |r| r.get(0))?;
        let deleted = match files {
            _ if !waiting => tx
                .prepare_cached("DELETE FROM bulk.chunk_data")?
                .execute([])?,
            Some(ids) => {
                let mut delete = tx.prepare_cached(
                    "DELETE FROM bulk.chunk_data WHERE file_id = ?1 AND NOT EXISTS
                        (SELECT 1 FROM main.files WHERE id = ?1 AND state != 'confirmed')",
                )?;
                let mut deleted = 0;
                for id in ids {
                    deleted += delete.execute(params![id])?;
                }
                deleted
            }
            None => tx
                .prepare_cached(super::DELETE_UNNEEDED_BULK)?
                .execute([])?,
        };
        tx.commit()?;
        Ok(deleted)
    }

    fn confirm_once(&self, files: &[(i64, Option<String>)], durability: Durability) -> Result<()> {
        // Ingest pauses at its next commit until this write is done.
        let _turn = self.writer_waiting();
        let mut kept = self
            .confirmed_data
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let waiting = *kept;
        let mut conn = self.pool.get()?;
        // Foreign keys off for the transaction: SQLite empties a table
        // without visiting its rows only when no foreign key applies to it.
        // The transaction deletes no file, so no cascade is missed.
        let left = crate::sqlite::without_foreign_keys(&mut conn, |conn| {
            durability.run(conn, |conn| {
                let tx = conn.transaction()?;
                let now = now_ms();
                let mut bytes = 0u64;
                let mut in_bulk = false;
                {
                    let mut file = tx.prepare_cached("UPDATE files SET state = 'confirmed', server_name = ?2, failure = NULL, confirmed_at = ?3, updated_at = ?3 WHERE id = ?1 RETURNING size")?;
                    let mut chunks = tx
                        .prepare_cached("UPDATE chunks SET state = 'confirmed' WHERE file_id = ?1")?;
                    let mut bulk = tx.prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM bulk.chunk_data WHERE file_id = ?1)",
                    )?;
                    for (file_id, server_name) in files {
                        let size: Option<i64> = file
                            .query_row(params![file_id, server_name, now], |r| r.get(0))
                            .optional()?;
                        chunks.execute(params![file_id])?;
                        if bulk.query_row(params![file_id], |r| r.get(0))? {
                            in_bulk = true;
                        } else {
                            bytes += size.unwrap_or(0).max(0) as u64;
                        }
                    }
                }
                let others_wait: bool = tx
                    .prepare_cached("SELECT EXISTS (SELECT 1 FROM files WHERE state != 'confirmed')")?
                    .query_row([], |r| r.get(0))?;
                let left = if !others_wait {
                    tx.prepare_cached("DELETE FROM main.chunk_data")?.execute([])?;
                    0
                } else if waiting + bytes > CONFIRMED_DATA_MAX {
                    tx.prepare_cached(
                        DELETE_CONFIRMED_DATA,
                    )?
                    .execute([])?;
                    0
                } else {
                    waiting + bytes
                };
                // Bytes in `bulk` left by a crash go when the buffer empties.
                let bulk_left = !others_wait
                    && tx
                        .prepare_cached("SELECT EXISTS (SELECT 1 FROM bulk.chunk_data)")?
                        .query_row([], |r| r.get::<_, bool>(0))?;
                tx.commit()?;
                Ok((left, in_bulk || bulk_left))
            })
        })?;
        let (left, release_bulk) = left;
        *kept = left;
        drop(kept);
        // A streamed file's bytes leave `bulk` at once, now that its
        // confirmation is committed: deleting them rewrites little (each
        // chunk is pages of its own), and they are the bulk of the disk.
        if release_bulk {
            let ids: Vec<i64> = files.iter().map(|(id, _)| *id).collect();
            self.release_bulk(&mut conn, Some(&ids))?;
        }
        super::schema::release_free_pages(&mut conn)?;
        drop(conn);
        // A large file's pages are still in the WAL (ingest does not
        // checkpoint): now they are copied and the WAL emptied.
        self.trim_wal();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::store::testing::{ingest, ingest_streamed, new_file, rows_per_file};

    #[test]
    fn small_files_bytes_stay_with_the_records_and_streamed_bytes_go_to_the_bulk_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        let store = Store::open(&path).unwrap();
        assert!(dir.path().join("buffer-bulk.db").exists());
        let page_size = |file: &str| -> i64 {
            rusqlite::Connection::open(dir.path().join(file))
                .unwrap()
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(
            (page_size("buffer.db"), page_size("buffer-bulk.db")),
            (4096, 65536)
        );
        let small = ingest(&store, &new_file("small", 1), b"0123456789");
        let big = ingest_streamed(&store, &new_file("big", 2), b"abcdefghijklmnopq");
        let other = ingest_streamed(&store, &new_file("other", 3), b"ABCDEFGHIJKLMNOPQ");
        assert_eq!(rows_per_file(&store), (3, 10));
        assert_eq!(store.chunk_data(small, 2).unwrap(), b"89");
        assert_eq!(store.chunk_data(big, 4).unwrap(), b"q");
        assert_eq!(store.chunk_data(other, 0).unwrap(), b"ABCD");

        // A confirmed streamed file's bytes leave at once, others' stay.
        store.confirm(big, None, Durability::Unsynced).unwrap();
        assert_eq!(rows_per_file(&store), (3, 5));
        assert_eq!(store.chunk_data(other, 4).unwrap(), b"Q");
        // Purged: the record goes, then its bytes.
        assert!(store.purge(other).unwrap());
        assert_eq!(rows_per_file(&store), (3, 0));
        store.confirm(small, None, Durability::Synced).unwrap();
        assert_eq!(rows_per_file(&store), (0, 0));
        assert_eq!(store.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn a_storage_for_files_by_name_keeps_large_pages_and_is_never_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.db");
        let page_size = || -> i64 {
            rusqlite::Connection::open(&path)
                .unwrap()
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        let store = Store::open_as(&path, crate::agent::store::Layout::ByName).unwrap();
        let id = ingest(&store, &new_file("a", 1), b"0123456789");
        assert_eq!(rows_per_file(&store), (3, 0));
        store.confirm(id, None, Durability::Synced).unwrap();
        drop(store);
        assert_eq!(page_size(), 65536);
        // Empty, opened again as the library does: it keeps its pages.
        drop(Store::open_as(&path, crate::agent::store::Layout::ByName).unwrap());
        assert_eq!(page_size(), 65536);
    }

    #[test]
    fn bytes_a_crash_left_in_the_bulk_file_are_deleted_and_never_block_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("buffer.db")).unwrap();
        let waiting = ingest_streamed(&store, &new_file("waiting", 1), b"0123456789");
        let done = ingest_streamed(&store, &new_file("done", 2), b"abcdefghij");
        // A crash between the commit that confirmed (or removed) a file and
        // the one that deletes its bytes: the bytes stay behind, and a
        // removed file's id may be given to the next file.
        {
            let conn = store.pool.get().unwrap();
            conn.execute_batch(&format!(
                "UPDATE files SET state = 'confirmed' WHERE id = {done};
                 INSERT INTO bulk.chunk_data (file_id, idx, data) VALUES ({next}, 0, x'EE'), ({next}, 5, x'EE');",
                next = done + 1
            ))
            .unwrap();
        }
        assert_eq!(rows_per_file(&store), (0, 8));
        let next = ingest_streamed(&store, &new_file("next", 3), b"ABCDEFGHIJ");
        assert_eq!(next, done + 1);
        assert_eq!(store.chunk_data(next, 0).unwrap(), b"ABCD");
        // The next start deletes what no waiting file needs.
        assert_eq!(store.forget_unfinished().unwrap(), 0);
        assert_eq!(rows_per_file(&store), (0, 6));
        assert_eq!(store.chunk_data(waiting, 2).unwrap(), b"89");
        assert_eq!(store.chunk_data(next, 2).unwrap(), b"IJ");
        assert!(store.chunk_data(done, 0).unwrap().is_empty());
        assert!(store.chunk_data(next, 5).unwrap().is_empty());
    }

    #[test]
    fn confirmed_data_leaves_with_the_last_waiting_file_or_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let rows = |store: &Store| -> i64 {
            let conn = store.pool.get().unwrap();
            conn.query_row("SELECT count(*) FROM chunk_data", [], |r| r.get(0))
                .unwrap()
        };
        let a = ingest(&store, &new_file("a", 1), b"0123456789");
        let b = ingest(&store, &new_file("b", 2), b"abcdef");
        assert_eq!(rows(&store), 5);
        store.confirm(a, Some("a"), Durability::Synced).unwrap();
        assert_eq!(rows(&store), 5, "b waits: a's rows stay");
        assert_eq!(store.chunk_data(b, 1).unwrap(), b"ef");
        // What ingest does when the disk is short.
        assert_eq!(store.release_confirmed_data().unwrap(), 3);
        assert_eq!(rows(&store), 2);
        assert_eq!(store.chunk_data(b, 1).unwrap(), b"ef");
        store.confirm(b, Some("b"), Durability::Synced).unwrap();
        assert_eq!(rows(&store), 0, "nothing waits: the table is emptied");

        // Past the bound, confirmed files' rows go while others wait.
        let c = ingest(&store, &new_file("c", 3), b"xyz");
        let d = ingest(&store, &new_file("d", 4), b"uvw");
        *store.confirmed_data.lock().unwrap() = CONFIRMED_DATA_MAX;
        store.confirm(c, Some("c"), Durability::Synced).unwrap();
        assert_eq!(rows(&store), 1);
        assert_eq!(store.chunk_data(d, 0).unwrap(), b"uvw");
        // Foreign keys are back on: purging cascades to the chunk rows.
        assert!(store.purge(d).unwrap());
        assert_eq!(rows(&store), 0);
        assert_eq!(store.integrity_check().unwrap(), "ok");
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
        assert!(
            store
                .due_files("t", 6_999, &[], 10, false)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.due_files("t", 7_000, &[], 10, false).unwrap().len(),
            1
        );
        assert_eq!(store.next_due("t").unwrap(), Some(7_000));
        let rec = store.file(id).unwrap();
        assert_eq!(
            (rec.retries, rec.last_error.as_deref()),
            (7, Some("error 7"))
        );
    }

    #[test]
    fn a_file_whose_pieces_all_arrived_waits_out_a_failed_finish() {
        // Every piece acknowledged, then finishing it failed (an object
        // store's CompleteMultipartUpload refused): the retry time is on an
        // acknowledged chunk, and the file must wait for it, not be due again
        // at once, round after round.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let id = ingest(&store, &new_file("a", 1), b"0123456789");
        store
            .mark_uploaded(id, &[0, 1, 2], Some("tag"), Durability::Synced)
            .unwrap();
        store
            .record_failure(id, 2, "finish refused", 5_000)
            .unwrap();
        assert!(
            store
                .due_files("t", 4_999, &[], 10, false)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store.due_files("t", 5_000, &[], 10, false).unwrap().len(),
            1
        );
        assert_eq!(store.next_due("t").unwrap(), Some(5_000));
    }

    #[test]
    fn failures_alone_do_not_grow_the_wal_without_bound() {
        // Nothing is confirmed during an outage, so nothing else checkpoints
        // the WAL; every recorded failure rewrites a few 64 KiB pages.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let store = Store::open(&path).unwrap();
        let id = ingest(&store, &new_file("a", 1), b"0123456789");
        for n in 0..2_000 {
            store.record_failure(id, 0, "unreachable", n).unwrap();
        }
        let wal = std::fs::metadata(dir.path().join("b.db-wal")).map_or(0, |m| m.len());
        assert!(
            wal < 2 * super::super::WAL_TRUNCATE_AFTER,
            "the WAL holds {wal} bytes after 2,000 failures"
        );
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
}
