//! The records of tus uploads. A tus upload is an upload of the resumable
//! extension's table (so that expiry, the staging sweep, recovery and
//! completion treat it like any other) plus a row of `tus_uploads` with what
//! tus adds: the length (unknown while deferred), the offset reached, and the
//! metadata as the client sent it. Each PATCH's bytes are one chunk record,
//! so the chunks tile the file as completion demands.
//!
//! While bytes arrive, the upload's `chunk_count` is [`OPEN_CHUNK_COUNT`], which
//! no count of chunks reaches: recovery completes only uploads whose chunks
//! are all there, and a tus upload's number of chunks is known only once its
//! offset reaches its length ([`UploadState::seal_tus`]).

use rusqlite::{OptionalExtension, params};

use super::{ChunkRecord, Result, UploadPhase, UploadState, now_secs};
use crate::sqlite;

/// Migration 2: the tus table.
pub(super) const SCHEMA_V2: &str = "
CREATE TABLE tus_uploads (
    upload_id      TEXT PRIMARY KEY REFERENCES uploads(upload_id) ON DELETE CASCADE,
    upload_length  INTEGER,
    upload_offset  INTEGER NOT NULL,
    metadata       TEXT NOT NULL,
    declared_sha256 TEXT
);
";

/// The chunk count of a tus upload still receiving bytes.
pub(in crate::server) const OPEN_CHUNK_COUNT: u64 = i64::MAX as u64;

/// A tus upload as recorded.
#[derive(Debug, Clone)]
pub(in crate::server) struct TusUpload {
    /// `None` while the length is deferred.
    pub(in crate::server) length: Option<u64>,
    pub(in crate::server) offset: u64,
    /// The `Upload-Metadata` header as the client sent it.
    pub(in crate::server) metadata: String,
    /// The `sha256` of the metadata, as 64 lowercase hex digits.
    pub(in crate::server) declared_sha256: Option<String>,
    pub(in crate::server) phase: UploadPhase,
    /// Unix seconds of the last change, from which the upload expires.
    pub(in crate::server) updated_at: i64,
    /// Chunks recorded so far, which is the index of the next one.
    pub(in crate::server) chunks: u64,
}

/// What a client declared when it created a tus upload.
pub(in crate::server) struct NewTusUpload<'a> {
    pub(in crate::server) client_name: &'a str,
    /// The named client creating the upload; `None` for an unnamed key.
    pub(in crate::server) named_client: Option<&'a str>,
    pub(in crate::server) length: Option<u64>,
    pub(in crate::server) metadata: &'a str,
    pub(in crate::server) declared_sha256: Option<&'a str>,
}

impl UploadState {
    /// Creates a tus upload, unsynced like any new upload: one lost to a power
    /// cut is unknown to the client's `HEAD`, which then starts again, and
    /// the synced commit of its first bytes makes it durable with them.
    pub(in crate::server) fn create_tus(&self, upload_id: &str, new: &NewTusUpload) -> Result<()> {
        let mut conn = self.pool.get()?;
        let now = now_secs();
        sqlite::unsynced(&mut conn, |conn| {
            let tx = conn.transaction()?;
            tx.prepare_cached(
                "INSERT INTO uploads
                     (upload_id, client_name, file_size, chunk_count, file_sha256, state, created_at, updated_at, named_client)
                 VALUES (?1, ?2, ?3, ?4, '', 'receiving', ?5, ?5, ?6)",
            )?
            .execute(params![
                upload_id,
                new.client_name,
                new.length.unwrap_or(0) as i64,
                OPEN_CHUNK_COUNT as i64,
                now,
                new.named_client
            ])?;
            tx.prepare_cached(
                "INSERT INTO tus_uploads (upload_id, upload_length, upload_offset, metadata, declared_sha256)
                 VALUES (?1, ?2, 0, ?3, ?4)",
            )?
            .execute(params![
                upload_id,
                new.length.map(|l| l as i64),
                new.metadata,
                new.declared_sha256
            ])?;
            tx.commit()
        })?;
        Ok(())
    }

    /// The tus upload `upload_id`, if there is one (an upload of another
    /// protocol is not).
    pub(in crate::server) fn tus_upload(&self, upload_id: &str) -> Result<Option<TusUpload>> {
        let conn = self.pool.get()?;
        Ok(conn
            .prepare_cached(
                "SELECT t.upload_length, t.upload_offset, t.metadata,
                        t.declared_sha256, u.state, u.updated_at,
                        (SELECT count(*) FROM upload_chunks c WHERE c.upload_id = u.upload_id)
                 FROM tus_uploads t JOIN uploads u ON u.upload_id = t.upload_id
                 WHERE t.upload_id = ?1",
            )?
            .query_row(params![upload_id], |r| {
                Ok(TusUpload {
                    length: r.get::<_, Option<i64>>(0)?.map(|l| l as u64),
                    offset: r.get::<_, i64>(1)? as u64,
                    metadata: r.get(2)?,
                    declared_sha256: r.get(3)?,
                    phase: UploadPhase::parse(&r.get::<_, String>(4)?),
                    updated_at: r.get(5)?,
                    chunks: r.get::<_, i64>(6)? as u64,
                })
            })
            .optional()?)
    }

    /// Records the length of an upload created with a deferred length.
    pub(in crate::server) fn set_tus_length(&self, upload_id: &str, length: u64) -> Result<()> {
        let mut conn = self.pool.get()?;
        let tx = conn.transaction()?;
        tx.prepare_cached("UPDATE tus_uploads SET upload_length = ?2 WHERE upload_id = ?1")?
            .execute(params![upload_id, length as i64])?;
        tx.prepare_cached(
            "UPDATE uploads SET file_size = ?2, updated_at = ?3 WHERE upload_id = ?1",
        )?
        .execute(params![upload_id, length as i64, now_secs()])?;
        tx.commit()?;
        Ok(())
    }

    /// Records the bytes of one PATCH as the upload's next chunk and moves its
    /// offset past them, with a synced commit: the reply that acknowledges
    /// them follows, and the bytes themselves are synced before this.
    pub(in crate::server) fn record_tus_chunk(
        &self,
        upload_id: &str,
        chunk: &ChunkRecord,
    ) -> Result<()> {
        let mut conn = self.pool.get()?;
        let tx = conn.transaction()?;
        tx.prepare_cached(
            "INSERT INTO upload_chunks (upload_id, chunk_idx, chunk_offset, length, sha256)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            upload_id,
            chunk.chunk_idx as i64,
            chunk.offset as i64,
            chunk.length as i64,
            chunk.sha256
        ])?;
        tx.prepare_cached("UPDATE tus_uploads SET upload_offset = ?2 WHERE upload_id = ?1")?
            .execute(params![upload_id, (chunk.offset + chunk.length) as i64])?;
        tx.prepare_cached("UPDATE uploads SET updated_at = ?2 WHERE upload_id = ?1")?
            .execute(params![upload_id, now_secs()])?;
        tx.commit()?;
        Ok(())
    }

    /// Tus uploads whose bytes are all recorded but which were not sealed for
    /// completion (the receiver stopped in between): start-up completes them.
    pub(in crate::server) fn unsealed_tus(&self) -> Result<Vec<String>> {
        let conn = self.pool.get()?;
        let mut stmt = conn.prepare(
            "SELECT u.upload_id FROM uploads u JOIN tus_uploads t ON t.upload_id = u.upload_id
             WHERE u.state = 'receiving' AND u.chunk_count = ?1
               AND t.upload_length IS NOT NULL AND t.upload_offset = t.upload_length",
        )?;
        let ids = stmt
            .query_map(params![OPEN_CHUNK_COUNT as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(ids)
    }

    /// All bytes are in: records the number of chunks and the SHA-256 the file
    /// must have, after which the upload completes like a resumable one (and
    /// recovery completes it after a crash).
    pub(in crate::server) fn seal_tus(
        &self,
        upload_id: &str,
        chunk_count: u64,
        file_sha256: &str,
    ) -> Result<()> {
        let conn = self.pool.get()?;
        conn.prepare_cached(
            "UPDATE uploads SET chunk_count = ?2, file_sha256 = ?3, updated_at = ?4
             WHERE upload_id = ?1 AND state = 'receiving'",
        )?
        .execute(params![
            upload_id,
            chunk_count as i64,
            file_sha256,
            now_secs()
        ])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tus_upload_records_its_chunks_and_offset_and_is_sealed_for_completion() {
        let dir = tempfile::tempdir().unwrap();
        let state = UploadState::open(&dir.path().join("s.db")).unwrap();
        let id = "0123456789abcdef0123";
        state
            .create_tus(
                id,
                &NewTusUpload {
                    client_name: "a.bin",
                    named_client: None,
                    length: None,
                    metadata: "filename YS5iaW4=",
                    declared_sha256: None,
                },
            )
            .unwrap();
        let up = state.tus_upload(id).unwrap().unwrap();
        assert_eq!((up.length, up.offset, up.chunks), (None, 0, 0));
        assert_eq!(up.metadata, "filename YS5iaW4=");
        state.set_tus_length(id, 10).unwrap();
        let chunk = |chunk_idx, offset, length| ChunkRecord {
            chunk_idx,
            offset,
            length,
            sha256: "00".into(),
        };
        state.record_tus_chunk(id, &chunk(0, 0, 4)).unwrap();
        state.record_tus_chunk(id, &chunk(1, 4, 6)).unwrap();
        let up = state.tus_upload(id).unwrap().unwrap();
        assert_eq!((up.length, up.offset, up.chunks), (Some(10), 10, 2));
        // Not sealed: recovery leaves it alone.
        assert!(state.unfinished().unwrap().is_empty());
        state.seal_tus(id, 2, &"ab".repeat(32)).unwrap();
        assert_eq!(state.unfinished().unwrap().len(), 1);
        let plain = state.upload(id).unwrap().unwrap();
        assert_eq!((plain.meta.file_size, plain.meta.chunk_count), (10, 2));
        // Forgetting the upload forgets its tus row too.
        state.forget_upload(id).unwrap();
        assert!(state.tus_upload(id).unwrap().is_none());
        // An upload of the resumable extension is no tus upload.
        assert!(state.tus_upload("nothing-here-0000").unwrap().is_none());
    }
}
