//! The buffer's schema, one migration per version (`PRAGMA user_version`).

pub(super) const SCHEMA_V1: &str = "
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
pub(super) const SCHEMA_V2: &str = "
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
pub(super) const SCHEMA_V3: &str = "
ALTER TABLE files ADD COLUMN delivery_state TEXT;
ALTER TABLE chunks ADD COLUMN ack TEXT;
";

/// Streamed files' bytes go to the bulk file (`buffer-bulk.db`), outside
/// this schema: the version changes only so that an older build, which would
/// not find those bytes, refuses the buffer.
pub(super) const SCHEMA_V4: &str = "";

/// Each chunk's CRC-32C, taken from the source as it is read: sent instead
/// of its SHA-256 to a receiver that takes it (`X-Chunk-Crc32c`), which then
/// need not work out a chunk's SHA-256 besides the file's; and checked again
/// before a chunk read back is hashed for a receiver that does not. NULL for
/// chunks buffered before this version, which keep their SHA-256.
pub(super) const SCHEMA_V5: &str = "
ALTER TABLE chunks ADD COLUMN crc32c INTEGER;
";

/// Every migration, oldest first: migration `i` takes a buffer of version `i`
/// to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3, SCHEMA_V4, SCHEMA_V5];

/// Turns on `auto_vacuum = INCREMENTAL` for a buffer that holds no file yet
/// (a new one, or an old one that is empty), so that delivered chunks can be
/// given back to the file system ([`release_free_pages`]). SQLite changes the
/// mode of a database that has tables only with a `VACUUM`, which rewrites
/// the whole file: it is done only while that is cheap (no files, a few
/// pages) and never waits for another process's lock; a buffer that does not
/// qualify keeps its mode and is converted at a later start once empty.
pub(super) fn enable_incremental_vacuum(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let mode: i64 = conn.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
    if mode == INCREMENTAL {
        return Ok(());
    }
    if !cheap_to_rewrite(conn)? {
        return Ok(());
    }
    conn.busy_timeout(std::time::Duration::ZERO)?;
    let converted = conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; VACUUM;");
    conn.busy_timeout(std::time::Duration::from_secs(60))?;
    unless_busy(converted)
}

/// Whether the buffer holds no file and a few pages at most, so that
/// rewriting it (`VACUUM`) costs next to nothing.
fn cheap_to_rewrite(conn: &rusqlite::Connection) -> rusqlite::Result<bool> {
    let (files, pages): (i64, i64) = conn.query_row(
        "SELECT (SELECT count(*) FROM files), (SELECT page_count FROM pragma_page_count())",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(files == 0 && pages <= CONVERT_MAX_PAGES)
}

/// `result`, except that another process holding the buffer (busy) leaves it
/// as it is, to be converted at a later start.
fn unless_busy(result: rusqlite::Result<()>) -> rusqlite::Result<()> {
    match result {
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::DatabaseBusy =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Gives an empty buffer made with other pages than `page_size` (an older
/// build's, of 64 KiB) pages of that size, and incremental vacuum, by
/// rewriting it (`VACUUM`), as [`enable_incremental_vacuum`] does and under
/// the same conditions. SQLite changes the page size only outside WAL mode,
/// which it leaves only with no other connection open: this runs before the
/// pool opens any, and gives up, changing nothing, when another process has
/// the buffer open.
pub(super) fn convert_page_size(path: &std::path::Path, page_size: u32) -> rusqlite::Result<()> {
    if std::fs::metadata(path).map_or(true, |m| m.len() == 0) {
        return Ok(());
    }
    let conn = rusqlite::Connection::open(path)?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    if size == i64::from(page_size) {
        return Ok(());
    }
    // Not a buffer (yet) when the query fails: opening it says what is wrong.
    if !cheap_to_rewrite(&conn).unwrap_or(false) {
        return Ok(());
    }
    conn.busy_timeout(std::time::Duration::ZERO)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Ok(());
    }
    let converted = conn.execute_batch(&format!(
        "PRAGMA page_size = {page_size}; PRAGMA auto_vacuum = INCREMENTAL; VACUUM;"
    ));
    // Back to WAL whatever happened: the pool expects it.
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))?;
    unless_busy(converted)
}

/// `PRAGMA auto_vacuum` of a buffer that can give its free pages back.
const INCREMENTAL: i64 = 2;

/// An empty buffer of up to this many pages (4 MiB at 64 KiB) is converted
/// to incremental vacuum at open.
const CONVERT_MAX_PAGES: i64 = 64;

/// Gives the buffer's free pages back to the file system when no chunk data
/// is left in it, after the commit that deleted the last chunks. Besides
/// shrinking the file, this keeps most bytes from being written twice: a
/// file's pages sit in the WAL until it is delivered, and a checkpoint skips
/// the WAL's frames of pages beyond the end of the database, so pages cut off
/// before the checkpoint are never copied into it. With chunk data of other
/// files left, free pages stay for new chunks (moving those files' pages to
/// fill the holes would write them again).
///
/// The pages go in steps of [`VACUUM_STEP_BYTES`], each its own small transaction
/// with a page cache large enough to hold it: SQLite marks every page it
/// takes off the free list as written, and one transaction over them all
/// would spill them from its cache into the WAL, writing the whole file a
/// second time; pages cut off within one transaction are never written.
/// The steps are not synced: a step lost to a power cut only leaves the file
/// larger.
pub(super) fn release_free_pages(conn: &mut rusqlite::Connection) -> rusqlite::Result<()> {
    for schema in ["main", super::BULK] {
        let data_left: bool = conn.query_row(
            &format!("SELECT EXISTS (SELECT 1 FROM {schema}.chunk_data)"),
            [],
            |r| r.get(0),
        )?;
        if !data_left {
            release_free_pages_of(conn, schema)?;
        }
    }
    Ok(())
}

/// [`release_free_pages`] for the database `schema`.
fn release_free_pages_of(conn: &mut rusqlite::Connection, schema: &str) -> rusqlite::Result<()> {
    let cache: i64 = conn.query_row(&format!("PRAGMA {schema}.cache_size"), [], |r| r.get(0))?;
    let page_size: i64 = conn.query_row(&format!("PRAGMA {schema}.page_size"), [], |r| r.get(0))?;
    let step = VACUUM_STEP_BYTES / page_size.max(512);
    conn.execute_batch(&format!("PRAGMA {schema}.cache_size = {}", step * 5 / 4))?;
    let stepped = crate::sqlite::unsynced(conn, |conn| {
        loop {
            let tx = conn.transaction()?;
            // Returns a row per page freed; a buffer without incremental
            // vacuum (not converted yet) returns none and keeps its pages.
            let mut freed = 0;
            {
                let mut vacuum =
                    tx.prepare_cached(&format!("PRAGMA {schema}.incremental_vacuum({step})"))?;
                let mut rows = vacuum.query([])?;
                while rows.next()?.is_some() {
                    freed += 1;
                }
            }
            tx.commit()?;
            if freed < step {
                return Ok(());
            }
        }
    });
    conn.execute_batch(&format!("PRAGMA {schema}.cache_size = {cache}"))?;
    stepped
}

/// Bytes of pages a step of [`release_free_pages`] takes off the end of a
/// file (100 pages at 64 KiB, 1,600 at 4 KiB): each step also writes the
/// file's first pages again. Its page cache holds a quarter more, so that
/// the step's pages never spill into the WAL.
const VACUUM_STEP_BYTES: i64 = 100 * 65536;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::agent::store::{Durability, Store};
    use crate::sqlite;

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
    fn giving_a_delivered_files_pages_back_does_not_write_them_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let store = Store::open(&path).unwrap();
        // A streamed file's bytes are in the bulk file.
        let bulk = crate::agent::store::bulk_path(&path);
        let wal = || {
            std::fs::metadata(crate::agent::store::corrupt::with_suffix(&bulk, "-wal"))
                .map_or(0, |m| m.len())
        };
        let mut big = crate::agent::store::testing::new_file("big", 2);
        big.chunk_size = 1 << 20;
        big.identity.size = 32 << 20;
        let data = vec![3u8; 1 << 20];
        store
            .ingest_streaming(&big, 32, &|| {}, |sink| -> crate::agent::store::Result<_> {
                for _ in 0..32 {
                    sink.push(&data, "00", None)?;
                }
                Ok(crate::agent::store::IngestDecision::Commit {
                    sha256: "ff".into(),
                })
            })
            .unwrap()
            .unwrap();
        let buffered = wal();
        assert!(buffered >= 32 << 20);
        let mut conn = store.pool.get().unwrap();
        conn.execute_batch("DELETE FROM bulk.chunk_data").unwrap();
        release_free_pages(&mut conn).unwrap();
        let freelist: i64 = conn
            .query_row("PRAGMA bulk.freelist_count", [], |r| r.get(0))
            .unwrap();
        assert_eq!(freelist, 0);
        // One transaction would have written the 32 MiB of freed pages
        // into the WAL once more.
        let grew = wal() - buffered;
        assert!(
            grew < 4 << 20,
            "giving the pages back wrote {grew} bytes to the WAL"
        );
        drop(conn);
        store.truncate_wal();
        assert!(std::fs::metadata(&bulk).unwrap().len() < 2 << 20);
        assert_eq!(wal(), 0);
        assert_eq!(store.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn a_delivered_file_gives_its_pages_back_and_old_buffers_are_converted_once_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        // A buffer made by the schema before incremental vacuum, holding a file.
        {
            let pool =
                sqlite::open_pool_with(&path, Duration::from_secs(5), Some(65536), false).unwrap();
            sqlite::migrate(&pool, MIGRATIONS).unwrap();
            pool.get().unwrap().execute_batch(
                "INSERT INTO files (id, spool, rel_path, remote_name, target, size, sha256, chunk_size, chunk_count,
                     upload_id, src_path, src_dev, src_ino, src_size, src_mtime_ns, state, created_at, updated_at)
                 VALUES (1, 's', 'a', 'a', 't', 4, 'x', 4, 1, 'upload-a-0123456789', '/s/a', 1, 1, 4, 1, 'queued', 0, 0);
                 INSERT INTO chunks (file_id, idx, byte_offset, length, sha256) VALUES (1, 0, 0, 4, 'y');
                 INSERT INTO chunk_data (file_id, idx, data) VALUES (1, 0, x'07070707');",
            )
            .unwrap();
        }
        let id = 1;
        let mode = |path: &std::path::Path| -> i64 {
            rusqlite::Connection::open(path)
                .unwrap()
                .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
                .unwrap()
        };
        // Converting it would mean rewriting its data: it keeps its mode and
        // its file, and still delivers.
        let store = Store::open(&path).unwrap();
        assert_eq!(mode(&path), 0);
        assert_eq!(store.chunk_data(id, 0).unwrap(), [7; 4]);
        store.confirm(id, Some("a"), Durability::Synced).unwrap();
        store.forget_confirmed_before(i64::MAX).unwrap();
        drop(store);
        // Empty now: the next open converts it, to small pages too.
        let store = Store::open(&path).unwrap();
        assert_eq!(mode(&path), INCREMENTAL);
        let page_size: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(page_size, 4096);
        assert_eq!(store.integrity_check().unwrap(), "ok");

        // A large file's pages go back to the file system once it is
        // delivered (and the WAL is emptied).
        let db_size = || std::fs::metadata(&path).unwrap().len();
        let empty = db_size();
        let mut big = crate::agent::store::testing::new_file("big", 2);
        big.chunk_size = 1 << 20;
        let data = vec![9u8; 8 << 20];
        let id = store
            .ingest(&big, |sink| -> crate::agent::store::Result<_> {
                for chunk in data.chunks(1 << 20) {
                    sink.push(chunk, "00", None)?;
                }
                Ok(crate::agent::store::IngestDecision::Commit {
                    sha256: "ff".into(),
                })
            })
            .unwrap()
            .unwrap();
        store.truncate_wal();
        assert!(
            db_size() >= empty + (8 << 20),
            "the file is in the database"
        );
        store.confirm(id, Some("big"), Durability::Synced).unwrap();
        store.truncate_wal();
        assert!(
            db_size() < empty + (1 << 20),
            "the buffer holds {} bytes after delivery, {empty} before",
            db_size()
        );
        assert_eq!(store.integrity_check().unwrap(), "ok");
    }
}
