//! The SQLite set-up every database of this crate shares: an r2d2 pool whose
//! connections wait for locks, sync every commit (`synchronous = FULL`) unless
//! a caller asks otherwise ([`unsynced`]), use WAL and enforce foreign keys;
//! and schema migrations by `PRAGMA user_version`.
//!
//! Knows nothing of what the databases hold: `store` (the agent's buffer),
//! `server::state` (the receiver's uploads) and `storage` own their SQL.

use std::path::Path;
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;

pub type Pool = r2d2::Pool<SqliteConnectionManager>;

/// Opens a pool on `path` (created if missing). `busy_timeout` is how long a
/// statement waits for another connection's lock before failing.
pub fn open_pool(path: &Path, busy_timeout: Duration) -> Result<Pool, r2d2::Error> {
    open_pool_with(path, busy_timeout, None, true)
}

/// [`open_pool`], and a new database gets pages of `page_size` bytes (a power
/// of two up to 65536). Large pages suit large BLOBs: a 1 MiB chunk is 16 WAL
/// frames instead of 256, which more than doubles the write rate. An existing
/// database keeps the page size it was created with. Without
/// `auto_checkpoint`, commits never copy the WAL into the database: the owner
/// checkpoints when it suits it (`PRAGMA wal_checkpoint`).
pub fn open_pool_with(
    path: &Path,
    busy_timeout: Duration,
    page_size: Option<u32>,
    auto_checkpoint: bool,
) -> Result<Pool, r2d2::Error> {
    open_pool_attached(path, busy_timeout, page_size, auto_checkpoint, None)
}

/// A second database every connection of a pool attaches
/// ([`open_pool_attached`]): its file, the schema name it is attached as,
/// and, when it is new, its page size and the SQL that creates its tables.
pub struct Attached<'a> {
    pub path: &'a Path,
    pub schema: &'static str,
    pub page_size: u32,
    pub create: &'static str,
}

/// [`open_pool_with`], and every connection attaches `attached`, with the
/// same settings (WAL, synced commits). A new attached file gets its page
/// size, incremental auto-vacuum and its tables first, from one connection
/// alone. SQLite makes a transaction that writes both files atomic in each
/// file, not across them: the caller orders its commits.
pub fn open_pool_attached(
    path: &Path,
    busy_timeout: Duration,
    page_size: Option<u32>,
    auto_checkpoint: bool,
    attached: Option<Attached<'_>>,
) -> Result<Pool, r2d2::Error> {
    let auto_checkpoint_pages = if auto_checkpoint { 1000 } else { 0 };
    let busy_ms = busy_timeout.as_millis();
    let attach = attached.as_ref().map(|a| (a.path.to_owned(), a.schema));
    if let Some(a) = &attached
        && let Ok(conn) = rusqlite::Connection::open(a.path)
    {
        let _ = conn.busy_timeout(busy_timeout);
        let _ = conn.execute_batch(&format!(
            "PRAGMA page_size = {}; PRAGMA auto_vacuum = INCREMENTAL",
            a.page_size
        ));
        let _ = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0));
        let _ = conn.execute_batch(a.create);
    }
    // r2d2 opens its connections in parallel; switch a new file to WAL once,
    // alone, first (the mode is persistent), so they never race for the
    // exclusive lock the switch needs. A failure here resurfaces below.
    if let Ok(conn) = rusqlite::Connection::open(path) {
        let _ = conn.busy_timeout(busy_timeout);
        if let Some(size) = page_size {
            // Only takes effect on a database with no pages yet.
            let _ = conn.execute_batch(&format!("PRAGMA page_size = {size}"));
        }
        let _ = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0));
    }
    // temp_store = MEMORY: statement journals and sorts stay in memory.
    // They are small, but on disk they are written in whole pages (64 KiB
    // for the agent's buffer) to files deleted right after: for 1,000
    // small files that was 51 MiB written for 4 MiB delivered.
    let manager = SqliteConnectionManager::file(path).with_init(move |conn| {
        conn.execute_batch(&format!(
            "PRAGMA busy_timeout = {busy_ms};
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             PRAGMA journal_size_limit = 67108864;
             PRAGMA temp_store = MEMORY;
             PRAGMA wal_autocheckpoint = {auto_checkpoint_pages};"
        ))?;
        if let Some((file, schema)) = &attach {
            conn.execute(
                &format!("ATTACH DATABASE ?1 AS {schema}"),
                [file.to_string_lossy()],
            )?;
            conn.execute_batch(&format!(
                "PRAGMA {schema}.synchronous = FULL;
                 PRAGMA {schema}.journal_size_limit = 67108864;"
            ))?;
        }
        // Every statement on a hot path is prepared once per connection.
        conn.set_prepared_statement_cache_capacity(64);
        // Switching the journal mode takes an exclusive lock, which a second
        // connection opened while the first writes would not get: only switch once.
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))?;
        }
        Ok(())
    });
    r2d2::Pool::builder().max_size(8).build(manager)
}

/// Runs `f` on `conn` with `synchronous = NORMAL`: its commits reach the WAL
/// but are not synced, so a power cut may undo them (a process crash does
/// not). Only for records that can be lost without harm, such as progress the
/// peer can tell again; the next synced commit makes them durable as well.
pub fn unsynced<T>(
    conn: &mut rusqlite::Connection,
    f: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    with_setting(
        conn,
        |conn| set_synchronous(conn, "NORMAL"),
        |conn| set_synchronous(conn, "FULL"),
        f,
    )
}

/// Sets `synchronous` on every database of `conn`: the pragma without a
/// schema name only applies to `main`.
pub fn set_synchronous(conn: &rusqlite::Connection, level: &str) -> rusqlite::Result<()> {
    let names: Vec<String> = conn
        .prepare_cached("SELECT name FROM pragma_database_list WHERE name != 'temp'")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for name in names {
        conn.prepare_cached(&format!("PRAGMA \"{name}\".synchronous = {level}"))?
            .execute([])?;
    }
    Ok(())
}

/// Runs `f` on `conn` with `foreign_keys = OFF`, restored after. The pragma
/// takes effect only outside a transaction: `f` opens its own.
pub fn without_foreign_keys<T>(
    conn: &mut rusqlite::Connection,
    f: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let pragma = |sql: &'static str| {
        move |conn: &rusqlite::Connection| conn.prepare_cached(sql)?.execute([]).map(drop)
    };
    with_setting(
        conn,
        pragma("PRAGMA foreign_keys = OFF"),
        pragma("PRAGMA foreign_keys = ON"),
        f,
    )
}

/// Runs `f` on `conn` after `set`, then runs `restore` whatever `set` or `f`
/// returned (a half-done `set` is undone too); an error of `set` or `f` wins
/// over one of `restore`.
fn with_setting<T>(
    conn: &mut rusqlite::Connection,
    set: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<()>,
    restore: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<()>,
    f: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let result = set(conn).and_then(|()| f(conn));
    let restored = restore(conn);
    let value = result?;
    restored?;
    Ok(value)
}

/// A schema newer than this build.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("schema version {found} is newer than this build knows ({known}); upgrade indexedcp")]
    TooNew { found: i64, known: i64 },
    #[error(transparent)]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Pool(#[from] r2d2::Error),
}

/// Brings the database to `migrations.len()`: migration `i` (0-based) takes
/// `user_version` from `i` to `i + 1`. All in one transaction.
pub fn migrate(pool: &Pool, migrations: &[&str]) -> Result<(), MigrateError> {
    let known = migrations.len() as i64;
    let mut conn = pool.get()?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > known {
        return Err(MigrateError::TooNew {
            found: version,
            known,
        });
    }
    for sql in &migrations[version.max(0) as usize..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}
