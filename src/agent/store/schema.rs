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

/// Every migration, oldest first: migration `i` takes a buffer of version `i`
/// to `i + 1`.
pub(super) const MIGRATIONS: &[&str] = &[SCHEMA_V1, SCHEMA_V2, SCHEMA_V3];

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
}
