//! A small asynchronous key-value store for JSON values, the original
//! IndexedCP's `storage` module: the [`Storage`] trait, its SQLite backend
//! [`SqliteStorage`], and [`create_storage`] to pick a backend by name.
//!
//! This is a general-purpose utility for applications built on the library;
//! the upload buffer itself is the agent's store
//! ([`Store`](crate::client::Store)), which has its own schema. Every SQLite
//! call runs on tokio's blocking pool (`spawn_blocking`), never on the
//! executor threads, through an r2d2 connection pool. The table layout
//! (`key`, `data` as JSON text, `created_at`, `updated_at` in seconds) is the
//! original's, so a database written by the Python library can be read here.
//!
//! ```
//! use indexedcp::client::storage::{Storage, SqliteStorage};
//! use serde_json::json;
//!
//! # #[tokio::main] async fn main() -> Result<(), indexedcp::client::storage::StorageError> {
//! let dir = tempfile::tempdir().unwrap();
//! let storage = SqliteStorage::new(dir.path().join("app.db"), "settings")?;
//! storage.initialize().await?;
//! storage.save("theme", json!({"dark": true})).await?;
//! assert_eq!(storage.load("theme").await?, Some(json!({"dark": true})));
//! storage.close().await?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use futures::future::BoxFuture;

use rusqlite::{OptionalExtension, params};
use serde_json::Value;

/// Why a storage operation failed.
///
/// ```
/// use indexedcp::client::storage::{create_storage, StorageError, StorageOptions};
///
/// let err = create_storage("redis", StorageOptions::default()).err().unwrap();
/// assert!(matches!(err, StorageError::UnknownBackend(_)));
/// assert_eq!(err.to_string(), "unknown storage type \"redis\"; valid types: sqlite");
/// ```
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// [`create_storage`] was given a backend name other than `sqlite` (or
    /// `sql`, `db`, in any case).
    #[error("unknown storage type {0:?}; valid types: sqlite")]
    UnknownBackend(String),
    /// The table name could not be put into SQL safely: it must be 1 to 64
    /// ASCII letters, digits or underscores, not starting with a digit.
    #[error(
        "invalid table name {0:?}: use 1 to 64 ASCII letters, digits or underscores, not starting with a digit"
    )]
    InvalidTableName(String),
    /// A method was called before [`Storage::initialize`] or after
    /// [`Storage::close`].
    #[error("storage not initialized: call initialize() first")]
    NotInitialized,
    /// The database's parent directory could not be created.
    #[error("cannot create the directory {path}: {source}")]
    CreateDir {
        /// The directory that could not be created.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or created.
    #[error("cannot open the storage database {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The connection pool's error, which carries SQLite's.
        #[source]
        source: r2d2::Error,
    },
    /// No connection could be taken from the pool: SQLite could not open one,
    /// or none became free within the pool's timeout.
    #[error("storage database: {0}")]
    Pool(#[from] r2d2::Error),
    /// An SQLite statement failed.
    #[error("storage database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored value is not valid JSON (something else wrote the table).
    #[error("the value under {key:?} is not valid JSON: {source}")]
    Json {
        /// The key whose value could not be parsed.
        key: String,
        /// The JSON parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A task on tokio's blocking pool panicked or was cancelled; the message
    /// is tokio's.
    #[error("storage task failed: {0}")]
    Task(String),
}

/// Shorthand for this module's results.
///
/// ```
/// fn ready() -> indexedcp::client::storage::Result<bool> {
///     Ok(true)
/// }
/// assert!(ready().unwrap());
/// ```
pub type Result<T> = std::result::Result<T, StorageError>;

/// An asynchronous key-value store of JSON values, ordered by creation time.
///
/// Methods return boxed futures so that backends can be used as
/// `Box<dyn Storage>` (what [`create_storage`] returns). Every method but
/// [`initialize`](Storage::initialize) and [`close`](Storage::close) fails with
/// [`StorageError::NotInitialized`] before `initialize` or after `close`.
///
/// ```
/// use indexedcp::client::storage::{create_storage, Storage, StorageOptions};
/// use serde_json::json;
///
/// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
/// let dir = tempfile::tempdir().unwrap();
/// let storage: Box<dyn Storage> = create_storage(
///     "sqlite",
///     StorageOptions { path: dir.path().join("kv.db"), ..StorageOptions::default() },
/// )?;
/// storage.initialize().await?;
/// storage.save("a", json!(1)).await?;
/// storage.save("b", json!(2)).await?;
/// assert_eq!(storage.list().await?, ["a", "b"]);
/// assert_eq!(storage.count().await?, 2);
/// # Ok(()) }
/// ```
pub trait Storage: Send + Sync {
    /// Creates the database (and its parent directories) and the table if
    /// needed. Calling it again is harmless.
    ///
    /// ```
    /// use indexedcp::client::storage::{Storage, SqliteStorage};
    /// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("nested/dirs/app.db");
    /// let storage = SqliteStorage::new(&path, "storage")?;
    /// storage.initialize().await?;
    /// storage.initialize().await?;
    /// assert!(path.exists());
    /// # Ok(()) }
    /// ```
    fn initialize(&self) -> BoxFuture<'_, Result<()>>;

    /// Stores `value` under `key`, replacing what was there (its creation time
    /// is kept).
    ///
    /// ```
    /// use indexedcp::client::storage::{Storage, SqliteStorage};
    /// use serde_json::json;
    /// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let storage = SqliteStorage::new(dir.path().join("app.db"), "storage")?;
    /// storage.initialize().await?;
    /// storage.save("file-0", json!({"chunkIndex": 0})).await?;
    /// storage.save("file-0", json!({"chunkIndex": 0, "sent": true})).await?;
    /// assert_eq!(storage.load("file-0").await?.unwrap()["sent"], json!(true));
    /// # Ok(()) }
    /// ```
    fn save<'a>(&'a self, key: &'a str, value: Value) -> BoxFuture<'a, Result<()>>;

    /// The value under `key`, or `None`.
    ///
    /// ```
    /// use indexedcp::client::storage::{Storage, SqliteStorage};
    /// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let storage = SqliteStorage::new(dir.path().join("app.db"), "storage")?;
    /// storage.initialize().await?;
    /// assert_eq!(storage.load("missing").await?, None);
    /// # Ok(()) }
    /// ```
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Value>>>;

    /// Every value, oldest first.
    ///
    /// ```
    /// use indexedcp::client::storage::{Storage, SqliteStorage};
    /// use serde_json::json;
    /// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let storage = SqliteStorage::new(dir.path().join("app.db"), "storage")?;
    /// storage.initialize().await?;
    /// storage.save("x", json!("first")).await?;
    /// storage.save("y", json!("second")).await?;
    /// assert_eq!(storage.load_all().await?, [json!("first"), json!("second")]);
    /// # Ok(()) }
    /// ```
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Value>>>;

    /// Removes `key`; `true` when it existed.
    ///
    /// ```
    /// use indexedcp::client::storage::{Storage, SqliteStorage};
    /// use serde_json::json;
    /// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let storage = SqliteStorage::new(dir.path().join("app.db"), "storage")?;
    /// storage.initialize().await?;
    /// storage.save("k", json!(null)).await?;
    /// assert!(storage.delete("k").await?);
    /// assert!(!storage.delete("k").await?);
    /// # Ok(()) }
    /// ```
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// Whether `key` holds a value.
    ///
    /// ```
    /// use indexedcp::client::storage::{Storage, SqliteStorage};
    /// use serde_json::json;
    /// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let storage = SqliteStorage::new(dir.path().join("app.db"), "storage")?;
    /// storage.initialize().await?;
    /// storage.save("k", json!([1, 2])).await?;
    /// assert!(storage.exists("k").await?);
    /// assert!(!storage.exists("other").await?);
    /// # Ok(()) }
    /// ```
    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// Every key, oldest first.
    ///
    /// ```
    /// use indexedcp::client::storage::{Storage, SqliteStorage};
    /// use serde_json::json;
    /// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let storage = SqliteStorage::new(dir.path().join("app.db"), "storage")?;
    /// storage.initialize().await?;
    /// storage.save("b", json!(1)).await?;
    /// storage.save("a", json!(2)).await?;
    /// assert_eq!(storage.list().await?, ["b", "a"]);
    /// # Ok(()) }
    /// ```
    fn list(&self) -> BoxFuture<'_, Result<Vec<String>>>;

    /// How many keys hold a value.
    ///
    /// ```
    /// use indexedcp::client::storage::{Storage, SqliteStorage};
    /// use serde_json::json;
    /// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let storage = SqliteStorage::new(dir.path().join("app.db"), "storage")?;
    /// storage.initialize().await?;
    /// assert_eq!(storage.count().await?, 0);
    /// storage.save("k", json!(1)).await?;
    /// assert_eq!(storage.count().await?, 1);
    /// # Ok(()) }
    /// ```
    fn count(&self) -> BoxFuture<'_, Result<u64>>;

    /// Deletes the entries created more than `max_age` ago; returns how many.
    ///
    /// ```
    /// use std::time::Duration;
    /// use indexedcp::client::storage::{Storage, SqliteStorage};
    /// use serde_json::json;
    /// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let storage = SqliteStorage::new(dir.path().join("app.db"), "storage")?;
    /// storage.initialize().await?;
    /// storage.save("fresh", json!(1)).await?;
    /// assert_eq!(storage.cleanup_old(Duration::from_secs(3600)).await?, 0);
    /// assert_eq!(storage.cleanup_old(Duration::ZERO).await?, 1);
    /// # Ok(()) }
    /// ```
    fn cleanup_old(&self, max_age: Duration) -> BoxFuture<'_, Result<u64>>;

    /// Releases the database; the data stays on disk. `initialize` opens it again.
    ///
    /// ```
    /// use indexedcp::client::storage::{Storage, SqliteStorage, StorageError};
    /// use serde_json::json;
    /// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let storage = SqliteStorage::new(dir.path().join("app.db"), "storage")?;
    /// storage.initialize().await?;
    /// storage.save("k", json!("kept")).await?;
    /// storage.close().await?;
    /// assert!(matches!(storage.load("k").await, Err(StorageError::NotInitialized)));
    /// storage.initialize().await?;
    /// assert_eq!(storage.load("k").await?, Some(json!("kept")));
    /// # Ok(()) }
    /// ```
    fn close(&self) -> BoxFuture<'_, Result<()>>;
}

/// What [`create_storage`] needs: the database file and the table.
///
/// The defaults are the original's: `./indexedcp.db` and table `storage`.
///
/// ```
/// use indexedcp::client::storage::StorageOptions;
///
/// let options = StorageOptions { table_name: "chunks".into(), ..StorageOptions::default() };
/// assert_eq!(options.path, std::path::PathBuf::from("./indexedcp.db"));
/// assert_eq!(options.table_name, "chunks");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageOptions {
    /// The SQLite database file (created with its parent directories).
    pub path: PathBuf,
    /// The table holding the entries: 1 to 64 ASCII letters, digits or `_`,
    /// not starting with a digit.
    pub table_name: String,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            path: PathBuf::from("./indexedcp.db"),
            table_name: "storage".to_owned(),
        }
    }
}

/// A storage backend chosen by name: `sqlite` (also `sql` or `db`, in any
/// case). Any other name is an error that lists the valid ones.
///
/// ```
/// use indexedcp::client::storage::{create_storage, StorageOptions};
/// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
/// let dir = tempfile::tempdir().unwrap();
/// let options = StorageOptions { path: dir.path().join("kv.db"), table_name: "jobs".into() };
/// let storage = create_storage("SQLite", options)?;
/// storage.initialize().await?;
/// assert!(storage.list().await?.is_empty());
/// assert!(create_storage("memory", StorageOptions::default()).is_err());
/// # Ok(()) }
/// ```
pub fn create_storage(kind: &str, options: StorageOptions) -> Result<Box<dyn Storage>> {
    match kind.to_ascii_lowercase().as_str() {
        "sqlite" | "sql" | "db" => Ok(Box::new(SqliteStorage::new(
            options.path,
            &options.table_name,
        )?)),
        _ => Err(StorageError::UnknownBackend(kind.to_owned())),
    }
}

use crate::sqlite::Pool;

/// [`Storage`] in a table of an SQLite database, through an r2d2 pool, with
/// every call on tokio's blocking pool.
///
/// ```
/// use indexedcp::client::storage::{Storage, SqliteStorage};
/// use serde_json::json;
/// # #[tokio::main] async fn main() -> indexedcp::client::storage::Result<()> {
/// let dir = tempfile::tempdir().unwrap();
/// let storage = SqliteStorage::new(dir.path().join("app.db"), "chunks")?;
/// storage.initialize().await?;
/// storage.save("report.pdf-0", json!({"fileName": "report.pdf", "chunkIndex": 0})).await?;
/// assert_eq!(storage.count().await?, 1);
/// # Ok(()) }
/// ```
pub struct SqliteStorage {
    path: PathBuf,
    table: String,
    pool: RwLock<Option<Pool>>,
}

impl std::fmt::Debug for SqliteStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStorage")
            .field("path", &self.path)
            .field("table", &self.table)
            .field("initialized", &self.pool().is_ok())
            .finish()
    }
}

/// Whether `name` can be spliced into SQL as a table name: the names SQL can
/// carry unquoted, so that no value can change a statement.
fn valid_table_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    (1..=64).contains(&name.len())
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn now_secs() -> f64 {
    crate::clock::since_epoch().as_secs_f64()
}

impl SqliteStorage {
    /// A storage in `table_name` of the database at `path`; nothing is opened
    /// until [`initialize`](Storage::initialize). The table name is checked here.
    ///
    /// ```
    /// use indexedcp::client::storage::{SqliteStorage, StorageError};
    ///
    /// assert!(SqliteStorage::new("app.db", "chunks").is_ok());
    /// let err = SqliteStorage::new("app.db", "chunks; DROP TABLE x").unwrap_err();
    /// assert!(matches!(err, StorageError::InvalidTableName(_)));
    /// ```
    pub fn new(path: impl Into<PathBuf>, table_name: &str) -> Result<SqliteStorage> {
        if !valid_table_name(table_name) {
            return Err(StorageError::InvalidTableName(table_name.to_owned()));
        }
        Ok(SqliteStorage {
            path: path.into(),
            table: table_name.to_owned(),
            pool: RwLock::new(None),
        })
    }

    /// The database file.
    ///
    /// ```
    /// use indexedcp::client::storage::SqliteStorage;
    /// let storage = SqliteStorage::new("/tmp/app.db", "storage").unwrap();
    /// assert_eq!(storage.path(), std::path::Path::new("/tmp/app.db"));
    /// ```
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The table holding the entries.
    ///
    /// ```
    /// use indexedcp::client::storage::SqliteStorage;
    /// let storage = SqliteStorage::new("app.db", "chunks").unwrap();
    /// assert_eq!(storage.table_name(), "chunks");
    /// ```
    pub fn table_name(&self) -> &str {
        &self.table
    }

    fn pool(&self) -> Result<Pool> {
        self.pool
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StorageError::NotInitialized)
    }

    /// Runs `f` with a pooled connection on the blocking pool.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection, &str) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let pool = self.pool()?;
        let table = self.table.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.get()?;
            f(&conn, &table)
        })
        .await
        .map_err(|e| StorageError::Task(e.to_string()))?
    }
}

fn parse_value(key: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).map_err(|source| StorageError::Json {
        key: key.to_owned(),
        source,
    })
}

impl Storage for SqliteStorage {
    fn initialize(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if self.pool().is_ok() {
                return Ok(());
            }
            let path = self.path.clone();
            let table = self.table.clone();
            let pool = tokio::task::spawn_blocking(move || {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|source| StorageError::CreateDir {
                        path: parent.to_owned(),
                        source,
                    })?;
                }
                let pool = crate::sqlite::open_pool(&path, std::time::Duration::from_secs(30))
                    .map_err(|source| StorageError::Open {
                        path: path.clone(),
                        source,
                    })?;
                pool.get()?.execute_batch(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} (
                         key TEXT PRIMARY KEY,
                         data TEXT NOT NULL,
                         created_at REAL NOT NULL,
                         updated_at REAL NOT NULL
                     );
                     CREATE INDEX IF NOT EXISTS idx_{table}_created_at ON {table} (created_at);"
                ))?;
                Ok::<_, StorageError>(pool)
            })
            .await
            .map_err(|e| StorageError::Task(e.to_string()))??;
            *self.pool.write().unwrap_or_else(|p| p.into_inner()) = Some(pool);
            tracing::debug!(path = %self.path.display(), table = %self.table, "storage initialized");
            Ok(())
        })
    }

    fn save<'a>(&'a self, key: &'a str, value: Value) -> BoxFuture<'a, Result<()>> {
        let key = key.to_owned();
        Box::pin(self.with_conn(move |conn, table| {
            let now = now_secs();
            conn.execute(
                &format!(
                    "INSERT INTO {table} (key, data, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)
                     ON CONFLICT (key) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at"
                ),
                params![key, value.to_string(), now],
            )?;
            Ok(())
        }))
    }

    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Value>>> {
        let key = key.to_owned();
        Box::pin(self.with_conn(move |conn, table| {
            let text: Option<String> = conn
                .query_row(
                    &format!("SELECT data FROM {table} WHERE key = ?1"),
                    params![key],
                    |r| r.get(0),
                )
                .optional()?;
            text.map(|t| parse_value(&key, &t)).transpose()
        }))
    }

    fn load_all(&self) -> BoxFuture<'_, Result<Vec<Value>>> {
        Box::pin(self.with_conn(|conn, table| {
            let mut stmt = conn.prepare(&format!(
                "SELECT key, data FROM {table} ORDER BY created_at, rowid"
            ))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.iter().map(|(k, t)| parse_value(k, t)).collect()
        }))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool>> {
        let key = key.to_owned();
        Box::pin(self.with_conn(move |conn, table| {
            Ok(conn.execute(&format!("DELETE FROM {table} WHERE key = ?1"), params![key])? > 0)
        }))
    }

    fn exists<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool>> {
        let key = key.to_owned();
        Box::pin(self.with_conn(move |conn, table| {
            Ok(conn
                .query_row(
                    &format!("SELECT 1 FROM {table} WHERE key = ?1 LIMIT 1"),
                    params![key],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
        }))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(self.with_conn(|conn, table| {
            let mut stmt = conn.prepare(&format!(
                "SELECT key FROM {table} ORDER BY created_at, rowid"
            ))?;
            let keys = stmt
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(keys)
        }))
    }

    fn count(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(self.with_conn(|conn, table| {
            let n: i64 =
                conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
            Ok(n as u64)
        }))
    }

    fn cleanup_old(&self, max_age: Duration) -> BoxFuture<'_, Result<u64>> {
        Box::pin(self.with_conn(move |conn, table| {
            let cutoff = now_secs() - max_age.as_secs_f64();
            let n = conn.execute(
                &format!("DELETE FROM {table} WHERE created_at < ?1"),
                params![cutoff],
            )?;
            Ok(n as u64)
        }))
    }

    fn close(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let pool = self.pool.write().unwrap_or_else(|p| p.into_inner()).take();
            // Dropping the last handle closes the connections, which may block
            // on a checkpoint: do it off the executor.
            if let Some(pool) = pool {
                tokio::task::spawn_blocking(move || drop(pool))
                    .await
                    .map_err(|e| StorageError::Task(e.to_string()))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_names_are_plain_identifiers() {
        for good in ["storage", "chunks", "_x", "T_2", &"a".repeat(64)] {
            assert!(valid_table_name(good), "{good}");
        }
        for bad in ["", "2x", "a-b", "a b", "x;", "t\"", "é", &"a".repeat(65)] {
            assert!(!valid_table_name(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn values_round_trip_and_order_survives_updates() {
        let dir = tempfile::tempdir().unwrap();
        let storage = SqliteStorage::new(dir.path().join("s.db"), "t").unwrap();
        assert!(matches!(
            storage.count().await,
            Err(StorageError::NotInitialized)
        ));
        storage.initialize().await.unwrap();
        storage.save("one", json!({"n": 1})).await.unwrap();
        storage.save("two", json!([2])).await.unwrap();
        storage.save("one", json!({"n": 11})).await.unwrap();
        assert_eq!(storage.list().await.unwrap(), ["one", "two"]);
        assert_eq!(
            storage.load_all().await.unwrap(),
            [json!({"n": 11}), json!([2])]
        );
        // Two tables in one file do not see each other.
        let other = SqliteStorage::new(dir.path().join("s.db"), "u").unwrap();
        other.initialize().await.unwrap();
        assert_eq!(other.count().await.unwrap(), 0);
        storage.close().await.unwrap();
        storage.close().await.unwrap();
    }
}
