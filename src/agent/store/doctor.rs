//! `indexedcp doctor`: the way out of a damaged buffer. It reports what
//! SQLite's `integrity_check` finds, copies every file that is still whole
//! into a fresh buffer, sets the damaged file aside under a name that says
//! so, and puts the fresh buffer in its place.
//!
//! A file counts as whole when its record reads back, all its chunks read
//! back in order, each chunk's bytes match the SHA-256 (or, for the chunks
//! of a larger file, the CRC-32C) recorded for it and
//! the file's bytes match the file's SHA-256: exactly what the uploader
//! would have sent. Such a file keeps its id, upload id and delivery resume
//! state, so a receiver that already holds part of it still sees the same
//! upload, and exactly-once holds across the repair. Anything less is
//! listed as lost, by name when its record can be read. Confirmed records
//! (history without data) and remembered kept sources are copied as far as
//! they read back. One chunk is in memory at a time.
//!
//! The buffer's two files are checked and set aside together; a file's
//! bytes are read from whichever holds them (see the `store` module docs),
//! and the fresh buffer keeps them all in `buffer.db`. Bytes in
//! `buffer-bulk.db` with no record are not reported: a crash leaves such
//! bytes of files already delivered or removed.
//!
//! Nothing else may use the buffer meanwhile: `doctor` takes the buffer's
//! lock alone (see `corrupt::BufferLock`) and refuses while a daemon has it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::corrupt::{self, BufferLock, with_suffix};
use super::{Result, Store, StoreError};

/// A file copied into the fresh buffer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SavedFile {
    pub id: i64,
    pub name: String,
    pub size: u64,
    pub state: String,
}

/// A waiting file that could not be saved, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LostFile {
    pub id: i64,
    /// Its remote name, or `None` when its record is unreadable.
    pub name: Option<String>,
    pub reason: String,
}

/// What `doctor` found and did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DoctorReport {
    /// The buffer examined.
    pub path: PathBuf,
    /// `integrity_check`'s findings (`["ok"]` for a sound buffer), or the
    /// error that stopped it.
    pub problems: Vec<String>,
    /// Whether the buffer was sound (then nothing was changed).
    pub healthy: bool,
    /// Files waiting for delivery (queued or parked) that were kept.
    pub saved: Vec<SavedFile>,
    /// Files waiting for delivery that were lost.
    pub lost: Vec<LostFile>,
    /// Confirmed records copied (history only; their data was delivered).
    pub confirmed_kept: usize,
    /// Where the damaged file was set aside.
    pub damaged_copy: Option<PathBuf>,
    /// Where the damaged buffer's bulk file was set aside, if it had one.
    pub damaged_bulk_copy: Option<PathBuf>,
}

/// Checks the buffer at `path` and, when it is damaged, salvages it (see
/// the module docs). Refuses while another process has the buffer open.
pub fn doctor(path: &Path) -> Result<DoctorReport> {
    let _lock = BufferLock::exclusive(path)?;
    let old = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
        .map_err(StoreError::Sql)?;
    old.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(StoreError::Sql)?;
    // The bulk file when it reads as a database; else an empty stand-in, and
    // the files whose bytes were there are listed as lost.
    let bulk = super::bulk_path(path);
    let mut bulk_problem = None;
    if bulk.exists()
        && let Err(e) = old.execute("ATTACH DATABASE ?1 AS bulk", [bulk.to_string_lossy()])
    {
        bulk_problem = Some(format!("{}: {e}", bulk.display()));
    }
    if bulk_problem.is_some() || !bulk.exists() {
        old.execute_batch(
            "ATTACH DATABASE ':memory:' AS bulk;
             CREATE TABLE bulk.chunk_data (file_id INTEGER, idx INTEGER, data BLOB);",
        )
        .map_err(StoreError::Sql)?;
    }
    let mut problems = integrity_problems(&old);
    problems.extend(bulk_problem);
    if let Ok(missing) = old.query_row(super::MISSING_BYTES, [], |r| r.get::<_, i64>(0))
        && missing > 0
    {
        problems.push(format!(
            "{missing} chunks of waiting files have no bytes in the buffer (is {} missing?)",
            bulk.display()
        ));
    }
    if problems.len() > 1 {
        problems.retain(|p| p != "ok");
    }
    let mut report = DoctorReport {
        path: path.to_owned(),
        healthy: problems == ["ok"],
        problems,
        saved: Vec::new(),
        lost: Vec::new(),
        confirmed_kept: 0,
        damaged_copy: None,
        damaged_bulk_copy: None,
    };
    if report.healthy {
        corrupt::clear_notice(path);
        return Ok(report);
    }

    let fresh_path = with_suffix(path, ".salvage");
    remove_database(&fresh_path);
    remove_database(&super::bulk_path(&fresh_path));
    let fresh = Store::open(&fresh_path)?;
    {
        let mut new = fresh.pool.get()?;
        for id in file_ids(&old) {
            salvage_file(&old, &mut new, id, &mut report);
        }
        copy_kept_sources(&old, &new);
        // The fresh buffer is complete in its own file before it replaces
        // the damaged one.
        new.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    drop(fresh);
    let _ = std::fs::remove_file(with_suffix(&fresh_path, ".lock"));
    drop(old);

    let stamp = format!(".damaged-{}", crate::clock::now_ms() / 1000);
    let aside = with_suffix(path, &stamp);
    let rename = |from: &Path, to: &Path, about: &'static str| {
        std::fs::rename(from, to).map_err(|source| StoreError::Io {
            about,
            path: from.display().to_string(),
            source,
        })
    };
    // Each damaged file's WAL goes with it (it may hold its newest pages);
    // its shared-memory index is rebuilt by whoever opens the copy. The
    // fresh buffer holds every byte it kept in its `buffer.db`: its bulk
    // file is empty and is not kept (the next open creates one).
    for (damaged, aside) in [
        (bulk.clone(), with_suffix(&bulk, &stamp)),
        (path.to_owned(), aside.clone()),
    ] {
        if damaged.exists() {
            rename(&damaged, &aside, "cannot set the damaged buffer aside")?;
            if damaged == bulk {
                report.damaged_bulk_copy = Some(aside.clone());
            }
        }
        let wal = with_suffix(&damaged, "-wal");
        if wal.exists() {
            rename(
                &wal,
                &with_suffix(&aside, "-wal"),
                "cannot set the damaged WAL aside",
            )?;
        }
        let _ = std::fs::remove_file(with_suffix(&damaged, "-shm"));
    }
    rename(&fresh_path, path, "cannot put the salvaged buffer in place")?;
    for leftover in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(with_suffix(&fresh_path, leftover));
    }
    remove_database(&super::bulk_path(&fresh_path));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    corrupt::clear_notice(path);
    report.damaged_copy = Some(aside);
    Ok(report)
}

/// `PRAGMA integrity_check`'s findings (up to 100), or the error that
/// stopped it.
fn integrity_problems(conn: &Connection) -> Vec<String> {
    let found: rusqlite::Result<Vec<String>> = conn
        .prepare("PRAGMA integrity_check(100)")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect());
    found.unwrap_or_else(|e| vec![e.to_string()])
}

/// Every file id that any readable part of the damaged buffer mentions: the
/// table itself, its two indexes (which live on other pages) and the chunk
/// tables, each read as far as it goes.
fn file_ids(conn: &Connection) -> BTreeSet<i64> {
    let mut ids = BTreeSet::new();
    for sql in [
        "SELECT id FROM files",
        "SELECT id FROM files INDEXED BY files_state",
        "SELECT id FROM files INDEXED BY files_source",
        "SELECT DISTINCT file_id FROM chunks",
        "SELECT DISTINCT file_id FROM main.chunk_data",
    ] {
        let Ok(mut stmt) = conn.prepare(sql) else {
            continue;
        };
        let Ok(mut rows) = stmt.query([]) else {
            continue;
        };
        while let Ok(Some(row)) = rows.next() {
            if let Ok(id) = row.get::<_, i64>(0) {
                ids.insert(id);
            }
        }
    }
    ids
}

/// The whole row(s) of `table` matching `filter`, with their column names.
fn rows(
    conn: &Connection,
    table: &str,
    filter: &str,
    id: i64,
) -> rusqlite::Result<(Vec<String>, Vec<Vec<Value>>)> {
    let mut stmt = conn.prepare(&format!("SELECT * FROM {table} WHERE {filter}"))?;
    let columns: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
    let n = columns.len();
    let rows = stmt
        .query_map([id], |r| (0..n).map(|i| r.get::<_, Value>(i)).collect())?
        .collect::<rusqlite::Result<Vec<Vec<Value>>>>()?;
    Ok((columns, rows))
}

fn insert(
    conn: &Connection,
    table: &str,
    columns: &[String],
    row: &[Value],
) -> rusqlite::Result<()> {
    let marks = vec!["?"; columns.len()].join(", ");
    conn.prepare_cached(&format!(
        "INSERT INTO {table} ({}) VALUES ({marks})",
        columns.join(", ")
    ))?
    .execute(rusqlite::params_from_iter(row))?;
    Ok(())
}

/// Copies one file into the fresh buffer if it is whole; records the
/// outcome in `report`.
fn salvage_file(old: &Connection, new: &mut Connection, id: i64, report: &mut DoctorReport) {
    let record = old
        .query_row(
            "SELECT remote_name, state, size, sha256, chunk_count FROM files WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            },
        )
        .optional();
    let (name, state, size, sha256, chunk_count) = match record {
        Ok(Some(record)) => record,
        Ok(None) => {
            report.lost.push(LostFile {
                id,
                name: None,
                reason: "its record is gone; only its chunks are left".into(),
            });
            return;
        }
        Err(e) => {
            report.lost.push(LostFile {
                id,
                name: None,
                reason: format!("its record is unreadable ({e})"),
            });
            return;
        }
    };
    let confirmed = state == "confirmed";
    let copied = copy_file(
        old,
        new,
        id,
        confirmed,
        size as u64,
        &sha256,
        chunk_count as u64,
    );
    match (copied, confirmed) {
        (Ok(()), true) => report.confirmed_kept += 1,
        (Err(_), true) => {} // History only: its data was delivered.
        (Ok(()), false) => report.saved.push(SavedFile {
            id,
            name,
            size: size as u64,
            state,
        }),
        (Err(reason), false) => report.lost.push(LostFile {
            id,
            name: Some(name),
            reason,
        }),
    }
}

/// Copies the file's record, chunk records and (unless confirmed) chunk
/// bytes in one transaction, verifying the bytes on the way; rolls back and
/// says why when anything is missing or differs.
fn copy_file(
    old: &Connection,
    new: &mut Connection,
    id: i64,
    confirmed: bool,
    size: u64,
    sha256: &str,
    chunk_count: u64,
) -> std::result::Result<(), String> {
    let unreadable = |what: &str, e: rusqlite::Error| format!("{what} unreadable ({e})");
    let tx = new
        .transaction()
        .map_err(|e| format!("cannot write the fresh buffer: {e}"))?;
    let (columns, files) =
        rows(old, "files", "id = ?1", id).map_err(|e| unreadable("its record", e))?;
    for row in &files {
        insert(&tx, "files", &columns, row).map_err(|e| format!("cannot copy its record: {e}"))?;
    }
    let (columns, chunks) = rows(old, "chunks", "file_id = ?1 ORDER BY idx", id)
        .map_err(|e| unreadable("its chunk list", e))?;
    let idx_at = columns.iter().position(|c| c == "idx");
    let sha_at = columns.iter().position(|c| c == "sha256");
    // Absent in a buffer of an older version.
    let crc_at = columns.iter().position(|c| c == "crc32c");
    let (Some(idx_at), Some(sha_at)) = (idx_at, sha_at) else {
        return Err("the chunk table has no idx or sha256 column".into());
    };
    if !confirmed && chunks.len() as u64 != chunk_count {
        return Err(format!(
            "{} of its {chunk_count} chunk records are readable",
            chunks.len()
        ));
    }
    let mut whole = Sha256::new();
    let mut bytes = 0u64;
    for (expected_idx, row) in chunks.iter().enumerate() {
        insert(&tx, "chunks", &columns, row)
            .map_err(|e| format!("cannot copy a chunk record: {e}"))?;
        if confirmed {
            continue;
        }
        let (Value::Integer(idx), Value::Text(chunk_sha)) = (&row[idx_at], &row[sha_at]) else {
            return Err("a chunk record holds values of the wrong type".into());
        };
        if *idx != expected_idx as i64 {
            return Err(format!("chunk {expected_idx} has no record"));
        }
        let data: Vec<u8> = old
            .query_row(
                "SELECT data FROM main.chunk_data WHERE file_id = ?1 AND idx = ?2
                 UNION ALL SELECT data FROM bulk.chunk_data WHERE file_id = ?1 AND idx = ?2 LIMIT 1",
                params![id, idx],
                |r| r.get(0),
            )
            .map_err(|e| unreadable(&format!("chunk {idx}"), e))?;
        // A chunk of a file of several chunks is buffered with its CRC-32C
        // instead of its SHA-256.
        if !chunk_sha.is_empty() {
            if hex(&Sha256::digest(&data)) != *chunk_sha {
                return Err(format!("chunk {idx} does not match its SHA-256"));
            }
        } else if let Some(Value::Integer(crc)) = crc_at.map(|at| &row[at]) {
            if i64::from(crc32c::crc32c(&data)) != *crc {
                return Err(format!("chunk {idx} does not match its CRC-32C"));
            }
        } else {
            return Err(format!("chunk {idx} has neither a SHA-256 nor a CRC-32C"));
        }
        whole.update(&data);
        bytes += data.len() as u64;
        tx.prepare_cached("INSERT INTO main.chunk_data (file_id, idx, data) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![id, idx, data]))
            .map_err(|e| format!("cannot copy chunk {idx}: {e}"))?;
    }
    if !confirmed && (bytes != size || hex(&whole.finalize()) != sha256) {
        return Err("its bytes do not match the file's SHA-256".into());
    }
    tx.commit()
        .map_err(|e| format!("cannot write the fresh buffer: {e}"))
}

/// The sources kept in place (`disposition = "keep"`) that must never be
/// buffered again: every row that reads back.
fn copy_kept_sources(old: &Connection, new: &Connection) {
    let Ok(mut stmt) = old.prepare("SELECT * FROM kept_sources") else {
        return;
    };
    let columns: Vec<String> = stmt.column_names().iter().map(|c| c.to_string()).collect();
    let n = columns.len();
    let Ok(mut rows) = stmt.query([]) else {
        return;
    };
    while let Ok(Some(row)) = rows.next() {
        let values: rusqlite::Result<Vec<Value>> = (0..n).map(|i| row.get(i)).collect();
        if let Ok(values) = values {
            let _ = insert(new, "kept_sources", &columns, &values);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Removes a database file and its WAL and shared-memory files, if any.
pub(super) fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(with_suffix(path, suffix));
    }
}
