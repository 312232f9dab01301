//! Operator actions (retry, purge) and the figures `status` and the metrics
//! show.

use rusqlite::{OptionalExtension, params};

use super::{Result, Store, TargetQueue, now_ms};

impl Store {
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
        let mut conn = self.pool.get()?;
        let existed = conn
            .prepare_cached("DELETE FROM files WHERE id = ?1")?
            .execute(params![file_id])?
            > 0;
        // Its bytes in `bulk` go in a commit of their own, after the record.
        if existed {
            self.release_bulk(&mut conn, Some(&[file_id]))?;
        }
        // The last file's pages go back to the file system, as on delivery.
        super::schema::release_free_pages(&mut conn)?;
        Ok(existed)
    }

    /// Forgets confirmed files confirmed before `cutoff` (ms). Returns how many.
    pub(crate) fn forget_confirmed_before(&self, cutoff: i64) -> Result<usize> {
        let mut conn = self.pool.get()?;
        let forgotten = conn
            .prepare_cached("DELETE FROM files WHERE state = 'confirmed' AND confirmed_at < ?1")?
            .execute(params![cutoff])?;
        if forgotten > 0 {
            self.release_bulk(&mut conn, None)?;
        }
        Ok(forgotten)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::store::Durability;
    use crate::agent::store::testing::{ingest, new_file};

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
        // b still waits: a's rows go with the last file's (see `confirm`).
        assert_eq!(store.chunk_data(a, 0).unwrap(), b"0123");
        assert_eq!(store.file(a).unwrap().server_name.as_deref(), Some("a"));
        assert_eq!(store.buffered_bytes().unwrap(), 10);
        store.park(b, "400 Invalid filename").unwrap();
        assert!(
            store
                .due_files("t", i64::MAX, &[], 10, false)
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.counts().unwrap(), (0, 1, 1));
        assert_eq!(store.retry(None).unwrap(), 1);
        assert_eq!(store.due_files("t", 0, &[], 10, false).unwrap().len(), 1);
        assert!(store.purge(b).unwrap());
        assert!(!store.purge(b).unwrap());
        assert_eq!(store.forget_confirmed_before(now_ms() + 1).unwrap(), 1);
        assert!(store.list().unwrap().is_empty());
        assert_eq!(store.integrity_check().unwrap(), "ok");
    }
}
