//! The library API of the original IndexedCP client: [`Client`] buffers files in
//! a local SQLite database and uploads them to a receiver with retries and
//! exponential backoff, with the original's options, defaults and callbacks.
//!
//! It is a thin layer over the engine the daemon runs: files are buffered by
//! the agent's ingest into the [`Store`], and sent by the agent's uploader
//! (one attempt per due file), which records every outcome exactly as the
//! daemon's uploader does (chunk retry counts, the last five errors, the next
//! attempt, parking of refused files) and speaks the same resumable protocol.
//! The one-shot commands (`indexedcp upload`, `indexedcp add`) are built on this
//! client. Blocking work (SQLite, reading files) runs on tokio's blocking pool.
//!
//! # Events, and where this differs from the Python client
//!
//! Progress events carry `file_name`, `remote_name`, `chunk_index`, `chunk_count`,
//! `file_size`, `status` (`success`/`failed`), `retry_count`, `next_retry_in` and
//! `error`; the completion summary `succeeded`, `failed`, `total`. Where this
//! differs from the Python client: `upload_buffered_files` sends every queued file
//! at once (the background upload honours the retry schedule), stops a file at its
//! first failed chunk so that chunks stay in order, hears progress as chunks are
//! acknowledged (not always in chunk order with a resumable receiver), and reports
//! failures as `ClientError::Undelivered` with what was and was not delivered;
//! `max_retries` counts retries after the first attempt; the map's keys are
//! absolute paths; `on_upload_complete` is called by background rounds, as in the
//! original. `Client::store()` exposes the buffer (chunk retry counts, the last
//! five errors per chunk) for inspection. `indexedcp::client::storage` is the
//! original's key-value storage: the `Storage` trait (`initialize`, `save`,
//! `load`, `load_all`, `delete`, `exists`, `list`, `count`, `cleanup_old`,
//! `close`, JSON values), `SqliteStorage` (pooled, blocking work off the executor,
//! configurable table; it reads databases the Python library wrote) and
//! `create_storage("sqlite", options)`. `indexedcp::logging::init` sets up the
//! binary's logger. `cargo doc --open` has an example for every item.
//!
//!
//! ```no_run
//! use indexedcp::client::{Client, ClientOptions};
//!
//! # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
//! let client = Client::new(ClientOptions {
//!     server_url: Some("http://127.0.0.1:3000/upload".into()),
//!     api_key: Some("secret".into()),
//!     ..ClientOptions::default()
//! })
//! .await?;
//! client.on_upload_progress(|event| {
//!     println!("{} chunk {}: {:?}", event.file_name, event.chunk_index, event.status)
//! });
//! let chunks = client.add_file("report.pdf").await?;
//! println!("buffered in {chunks} chunk(s)");
//! for (file, server_name) in client.upload_buffered_files().await? {
//!     println!("{file} -> {server_name}");
//! }
//! client.close().await;
//! # Ok(()) }
//! ```

mod events;
mod options;
pub mod storage;

pub use crate::agent::ingest::{IngestError, PathIngest};
pub use crate::agent::store::{ChunkMeta, FileRecord, FileState, Store, StoreError};
pub use crate::agent::upload::Retry;
pub use events::{
    ChunkStatus, ClientError, CompleteCallback, ErrorCallback, FailedFile, ProgressCallback,
    ProgressEvent, UploadSummary,
};
pub use options::{
    API_KEY_ENV, ClientOptions, DEFAULT_CHUNK_SIZE, DEFAULT_TARGET, default_storage_path,
};

use events::{CallbackObserver, Callbacks, Round, call, round_of};
use options::normalize_url;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agent::ingest;
use crate::agent::upload::{self, Backoff, TargetRuntime};
use crate::config::{LogFormat, TargetConfig};
use crate::logging;

struct Inner {
    store: RwLock<Option<Store>>,
    storage_path: PathBuf,
    /// Chunk size and target name for ingest (always there).
    ingest_target: TargetConfig,
    server_url: Option<String>,
    api_key: Option<String>,
    /// Built when both the URL and the key are known.
    runtime: Option<Arc<TargetRuntime>>,
    callbacks: Callbacks,
    /// One round at a time: a direct upload and the background never send the
    /// same file at once.
    round_lock: tokio::sync::Mutex<()>,
    /// Wakes the background loop after a file is added.
    wake: Notify,
}

impl Inner {
    fn store(&self) -> Result<Store, ClientError> {
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(ClientError::Closed)
    }

    fn runtime(&self) -> Result<Arc<TargetRuntime>, ClientError> {
        if self.server_url.is_none() {
            return Err(ClientError::NoServerUrl);
        }
        if self.api_key.is_none() {
            return Err(ClientError::NoApiKey);
        }
        self.runtime.clone().ok_or(ClientError::NoServerUrl)
    }

    /// One attempt at every queued file due at `due_at` (ms since the epoch).
    async fn round(&self, due_at: i64) -> Result<Round, ClientError> {
        let target = self.runtime()?;
        let store = self.store()?;
        let _one_at_a_time = self.round_lock.lock().await;
        let s = store.clone();
        let files =
            blocking(move || s.due_files(DEFAULT_TARGET, due_at, &[], usize::MAX, false)).await?;
        if files.is_empty() {
            return Ok(round_of(Vec::new()));
        }
        tracing::info!(files = files.len(), "uploading buffered files");
        let observer = CallbackObserver {
            callbacks: &self.callbacks,
            files: files.iter().map(|f| (f.id, f.clone())).collect(),
        };
        let attempts = upload::upload_files_once(&store, &target, &observer, files).await;
        Ok(round_of(attempts))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClientError::Task(e.to_string()))?
        .map_err(ClientError::from)
}

struct Background {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

/// The IndexedCP client: buffers files and uploads them with retries.
///
/// Dropping a client closes it (its background upload stops; what is buffered
/// stays on disk).
///
/// ```
/// use indexedcp::client::{Client, ClientOptions};
///
/// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
/// let client = Client::new(ClientOptions {
///     storage_path: dir.path().join("client.db"),
///     ..ClientOptions::default()
/// })
/// .await?;
/// // Buffering works offline; uploading needs a server URL and a key.
/// assert_eq!(client.add_file(dir.path().join("notes.txt")).await?, 1);
/// assert_eq!(client.buffered_files().await?.len(), 1);
/// client.close().await;
/// # Ok(()) }
/// ```
pub struct Client {
    inner: Arc<Inner>,
    background: Mutex<Option<Background>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("storage_path", &self.inner.storage_path)
            .field("server_url", &self.inner.server_url)
            .field("background", &self.is_background_running())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Checks the options and opens (creating) the buffer at `storage_path`.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientError, ClientOptions};
    /// use std::time::Duration;
    ///
    /// # #[tokio::main] async fn main() {
    /// let dir = tempfile::tempdir().unwrap();
    /// let storage_path = dir.path().join("nested/client.db");
    /// let client = Client::new(ClientOptions {
    ///     storage_path: storage_path.clone(),
    ///     ..ClientOptions::default()
    /// })
    /// .await
    /// .unwrap();
    /// assert!(storage_path.exists());
    /// drop(client);
    ///
    /// let bad = Client::new(ClientOptions {
    ///     storage_path,
    ///     initial_retry_delay: Duration::from_secs(120),
    ///     ..ClientOptions::default()
    /// })
    /// .await;
    /// assert!(matches!(bad, Err(ClientError::InvalidOptions(_))));
    /// # }
    /// ```
    pub async fn new(options: ClientOptions) -> Result<Client, ClientError> {
        if let Some(level) = &options.log_level {
            logging::init(Some(level), LogFormat::Auto);
        }
        Backoff::new(
            options.initial_retry_delay,
            options.max_retry_delay,
            options.retry_multiplier,
        )
        .map_err(|e| ClientError::InvalidOptions(e.to_string()))?;
        if options.chunk_size == 0 || options.chunk_size > usize::MAX as u64 {
            return Err(ClientError::InvalidOptions(format!(
                "chunk_size {} must be at least 1 byte",
                options.chunk_size
            )));
        }
        let server_url = options
            .server_url
            .as_deref()
            .map(normalize_url)
            .transpose()?;
        let api_key = options.api_key.clone().filter(|k| !k.trim().is_empty());
        let mut target = TargetConfig::new(DEFAULT_TARGET, server_url.clone().unwrap_or_default());
        target.api_key = api_key.clone();
        target.chunk_size = options.chunk_size;
        target.max_retries = options.max_retries;
        target.initial_retry_delay = options.initial_retry_delay;
        target.max_retry_delay = options.max_retry_delay;
        target.retry_multiplier = options.retry_multiplier;
        target.tls = options.tls.clone();
        let runtime = match (&server_url, &api_key) {
            (Some(_), Some(_)) => Some(Arc::new(TargetRuntime::new(target.clone())?)),
            _ => None,
        };

        let path = options.storage_path.clone();
        let store = tokio::task::spawn_blocking(move || {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| ClientError::StorageDir {
                    path: parent.to_owned(),
                    source,
                })?;
            }
            Ok::<_, ClientError>(Store::open_as(&path, crate::agent::store::Layout::ByName)?)
        })
        .await
        .map_err(|e| ClientError::Task(e.to_string()))??;
        tracing::debug!(storage = %options.storage_path.display(), "client initialized");

        let callbacks = Callbacks::default();
        *callbacks
            .progress
            .write()
            .unwrap_or_else(|p| p.into_inner()) = options.on_upload_progress;
        *callbacks.error.write().unwrap_or_else(|p| p.into_inner()) = options.on_upload_error;
        *callbacks
            .complete
            .write()
            .unwrap_or_else(|p| p.into_inner()) = options.on_upload_complete;
        Ok(Client {
            inner: Arc::new(Inner {
                store: RwLock::new(Some(store)),
                storage_path: options.storage_path,
                ingest_target: target,
                server_url,
                api_key,
                runtime,
                callbacks,
                round_lock: tokio::sync::Mutex::new(()),
                wake: Notify::new(),
            }),
            background: Mutex::new(None),
        })
    }

    /// The buffer database in use.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("client.db");
    /// let client = Client::new(ClientOptions { storage_path: path.clone(), ..ClientOptions::default() }).await?;
    /// assert_eq!(client.storage_path(), path);
    /// # Ok(()) }
    /// ```
    pub fn storage_path(&self) -> &Path {
        &self.inner.storage_path
    }

    /// The server URL in use (normalized: `/upload` is added to a bare host).
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let client = Client::new(ClientOptions {
    ///     storage_path: dir.path().join("client.db"),
    ///     ..ClientOptions::new("http://127.0.0.1:3000")
    /// })
    /// .await?;
    /// assert_eq!(client.server_url(), Some("http://127.0.0.1:3000/upload"));
    /// # Ok(()) }
    /// ```
    pub fn server_url(&self) -> Option<&str> {
        self.inner.server_url.as_deref()
    }

    /// The buffer underneath, for inspection (chunk retry counts, the last
    /// errors) and for the operator actions of [`Store`]. Its methods block: call
    /// them from `spawn_blocking` in async code.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// # std::fs::write(dir.path().join("a.txt"), vec![7u8; 2500]).unwrap();
    /// let client = Client::new(ClientOptions {
    ///     storage_path: dir.path().join("client.db"),
    ///     chunk_size: 1024,
    ///     ..ClientOptions::default()
    /// })
    /// .await?;
    /// client.add_file(dir.path().join("a.txt")).await?;
    /// let store = client.store()?;
    /// let file = tokio::task::spawn_blocking(move || {
    ///     let id = store.list()?[0].id;
    ///     store.chunks(id)
    /// })
    /// .await
    /// .unwrap()?;
    /// assert_eq!(file.len(), 3);
    /// assert!(file.iter().all(|chunk| chunk.retry_count == 0));
    /// # Ok(()) }
    /// ```
    pub fn store(&self) -> Result<Store, ClientError> {
        self.inner.store()
    }

    /// Sets the progress callback, called for every chunk sent or failed.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let client = Client::new(ClientOptions { storage_path: dir.path().join("c.db"), ..ClientOptions::default() }).await?;
    /// client.on_upload_progress(|event| {
    ///     eprintln!("{} chunk {} {}", event.file_name, event.chunk_index, event.status.as_str())
    /// });
    /// # Ok(()) }
    /// ```
    pub fn on_upload_progress(&self, callback: impl Fn(&ProgressEvent) + Send + Sync + 'static) {
        *self
            .inner
            .callbacks
            .progress
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(callback));
    }

    /// Sets the error callback, called when a background round fails or leaves
    /// files undelivered.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let client = Client::new(ClientOptions { storage_path: dir.path().join("c.db"), ..ClientOptions::default() }).await?;
    /// client.on_upload_error(|error| eprintln!("upload: {error}"));
    /// # Ok(()) }
    /// ```
    pub fn on_upload_error(&self, callback: impl Fn(&ClientError) + Send + Sync + 'static) {
        *self
            .inner
            .callbacks
            .error
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(callback));
    }

    /// Sets the completion callback, called after a background round that
    /// delivered files (a direct [`upload_buffered_files`](Client::upload_buffered_files)
    /// returns its result instead, as in the original).
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let client = Client::new(ClientOptions { storage_path: dir.path().join("c.db"), ..ClientOptions::default() }).await?;
    /// client.on_upload_complete(|summary| eprintln!("{} of {} delivered", summary.succeeded, summary.total));
    /// # Ok(()) }
    /// ```
    pub fn on_upload_complete(&self, callback: impl Fn(&UploadSummary) + Send + Sync + 'static) {
        *self
            .inner
            .callbacks
            .complete
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(callback));
    }

    /// Buffers the file at `path` (sent under its base name) and returns its
    /// number of chunks. Works offline. The same unchanged file still waiting in
    /// the buffer is not buffered twice.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let file = dir.path().join("data.bin");
    /// std::fs::write(&file, vec![0u8; 2500]).unwrap();
    /// let client = Client::new(ClientOptions {
    ///     storage_path: dir.path().join("client.db"),
    ///     chunk_size: 1024,
    ///     ..ClientOptions::default()
    /// })
    /// .await?;
    /// assert_eq!(client.add_file(&file).await?, 3);
    /// assert!(client.add_file(dir.path().join("missing")).await.is_err());
    /// # Ok(()) }
    /// ```
    pub async fn add_file(&self, path: impl AsRef<Path>) -> Result<u64, ClientError> {
        Ok(self.buffer_file(path).await?.chunk_count)
    }

    /// [`add_file`](Client::add_file) with the details: the buffer id, the
    /// size, and whether the file was already waiting.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let file = dir.path().join("a.txt");
    /// # std::fs::write(&file, b"abc").unwrap();
    /// let client = Client::new(ClientOptions { storage_path: dir.path().join("c.db"), ..ClientOptions::default() }).await?;
    /// let first = client.buffer_file(&file).await?;
    /// let again = client.buffer_file(&file).await?;
    /// assert_eq!((first.bytes, first.already_buffered), (3, false));
    /// assert_eq!((again.file_id, again.already_buffered), (first.file_id, true));
    /// # Ok(()) }
    /// ```
    pub async fn buffer_file(&self, path: impl AsRef<Path>) -> Result<PathIngest, ClientError> {
        let store = self.inner.store()?;
        let path = path.as_ref().to_owned();
        let target = self.inner.ingest_target.clone();
        let remote_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| IngestError::NotAFile { path: path.clone() })?;
        let ingested = tokio::task::spawn_blocking(move || {
            ingest::ingest_path(&store, &path, &remote_name, &target)
        })
        .await
        .map_err(|e| ClientError::Task(e.to_string()))??;
        tracing::info!(
            file_id = ingested.file_id,
            chunks = ingested.chunk_count,
            bytes = ingested.bytes,
            already_buffered = ingested.already_buffered,
            "file added to the buffer"
        );
        self.inner.wake.notify_one();
        Ok(ingested)
    }

    /// This client's files in the buffer (queued, parked and recently
    /// confirmed), oldest first.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let client = Client::new(ClientOptions { storage_path: dir.path().join("c.db"), ..ClientOptions::default() }).await?;
    /// assert!(client.buffered_files().await?.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn buffered_files(&self) -> Result<Vec<FileRecord>, ClientError> {
        let store = self.inner.store()?;
        let files = blocking(move || store.list()).await?;
        Ok(files
            .into_iter()
            .filter(|f| f.target == DEFAULT_TARGET)
            .collect())
    }

    /// Sends every queued file now (whatever its retry schedule), one attempt
    /// each, and returns client name (absolute path) -> name on the server for
    /// the files delivered. When some file fails, the result is
    /// [`ClientError::Undelivered`] with what was delivered and what was not; the
    /// failures are recorded (retry count, error, next attempt) and the files
    /// stay buffered.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientError, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// // Without a server URL there is nothing to upload to.
    /// let offline = Client::new(ClientOptions {
    ///     storage_path: dir.path().join("a.db"),
    ///     ..ClientOptions::default()
    /// })
    /// .await?;
    /// assert!(matches!(offline.upload_buffered_files().await, Err(ClientError::NoServerUrl)));
    ///
    /// // An empty buffer needs no request at all.
    /// let client = Client::new(ClientOptions {
    ///     api_key: Some("secret".into()),
    ///     storage_path: dir.path().join("b.db"),
    ///     ..ClientOptions::new("http://127.0.0.1:9/upload")
    /// })
    /// .await?;
    /// assert!(client.upload_buffered_files().await?.is_empty());
    /// # Ok(()) }
    /// ```
    pub async fn upload_buffered_files(&self) -> Result<HashMap<String, String>, ClientError> {
        let round = self.inner.round(i64::MAX).await?;
        if round.failed.is_empty() {
            Ok(round.delivered)
        } else {
            Err(ClientError::Undelivered {
                delivered: round.delivered,
                failed: round.failed,
            })
        }
    }

    /// Starts uploading in the background: every `check_interval` (and soon
    /// after [`add_file`](Client::add_file)), the files whose retry is due are
    /// sent; `on_upload_complete` hears of each round that delivered files,
    /// `on_upload_error` of each that failed. A second call while it runs does
    /// nothing.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientError, ClientOptions};
    /// use std::time::Duration;
    /// # #[tokio::main] async fn main() -> Result<(), ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let client = Client::new(ClientOptions {
    ///     api_key: Some("secret".into()),
    ///     storage_path: dir.path().join("c.db"),
    ///     ..ClientOptions::new("http://127.0.0.1:9/upload")
    /// })
    /// .await?;
    /// client.start_upload_background(Duration::from_secs(5)).await?;
    /// client.start_upload_background(Duration::from_secs(5)).await?; // no-op
    /// assert!(client.is_background_running());
    /// client.stop_upload_background().await;
    /// assert!(!client.is_background_running());
    /// # Ok(()) }
    /// ```
    pub async fn start_upload_background(
        &self,
        check_interval: Duration,
    ) -> Result<(), ClientError> {
        self.inner.runtime()?;
        self.inner.store()?;
        let mut background = self.background.lock().unwrap_or_else(|p| p.into_inner());
        if background.as_ref().is_some_and(|b| !b.handle.is_finished()) {
            tracing::info!("background upload already running");
            return Ok(());
        }
        let token = CancellationToken::new();
        let handle = tokio::spawn(background_loop(
            self.inner.clone(),
            check_interval.max(Duration::from_millis(10)),
            token.clone(),
        ));
        tracing::info!(?check_interval, "background upload started");
        *background = Some(Background { token, handle });
        Ok(())
    }

    /// Whether the background upload runs.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let client = Client::new(ClientOptions { storage_path: dir.path().join("c.db"), ..ClientOptions::default() }).await?;
    /// assert!(!client.is_background_running());
    /// # Ok(()) }
    /// ```
    pub fn is_background_running(&self) -> bool {
        self.background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|b| !b.handle.is_finished())
    }

    /// Stops the background upload and waits for it. A chunk in flight is
    /// abandoned; it is sent again (and recognised by the receiver) next time.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), indexedcp::client::ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let client = Client::new(ClientOptions { storage_path: dir.path().join("c.db"), ..ClientOptions::default() }).await?;
    /// client.stop_upload_background().await; // nothing running: nothing to do
    /// # Ok(()) }
    /// ```
    pub async fn stop_upload_background(&self) {
        let background = self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(background) = background {
            background.token.cancel();
            let _ = background.handle.await;
            tracing::info!("background upload stopped");
        }
    }

    /// Stops the background upload and releases the buffer; later calls fail
    /// with [`ClientError::Closed`]. What is buffered stays on disk.
    ///
    /// ```
    /// use indexedcp::client::{Client, ClientError, ClientOptions};
    /// # #[tokio::main] async fn main() -> Result<(), ClientError> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let client = Client::new(ClientOptions { storage_path: dir.path().join("c.db"), ..ClientOptions::default() }).await?;
    /// client.close().await;
    /// assert!(matches!(client.add_file("x").await, Err(ClientError::Closed)));
    /// # Ok(()) }
    /// ```
    pub async fn close(&self) {
        self.stop_upload_background().await;
        let store = self
            .inner
            .store
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(store) = store {
            // Closing the connections may checkpoint the WAL: off the executor.
            let _ = tokio::task::spawn_blocking(move || drop(store)).await;
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(background) = self
            .background
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            background.token.cancel();
        }
        self.inner
            .store
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

async fn background_loop(inner: Arc<Inner>, check_interval: Duration, token: CancellationToken) {
    loop {
        // Biased: once stopped, no round starts and no callback fires.
        let round = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            round = inner.round(crate::clock::now_ms()) => round,
        };
        match round {
            Ok(round) => {
                let (succeeded, failed) = (round.delivered.len(), round.failed.len());
                if succeeded > 0 {
                    let summary = UploadSummary {
                        succeeded,
                        failed,
                        total: succeeded + failed,
                    };
                    call(&inner.callbacks.complete, |f| f(&summary));
                }
                if failed > 0 {
                    let error = ClientError::Undelivered {
                        delivered: round.delivered,
                        failed: round.failed,
                    };
                    tracing::warn!(error = %error, "background upload round");
                    call(&inner.callbacks.error, |f| f(&error));
                }
            }
            Err(error) => {
                tracing::error!(error = %error, "background upload error");
                call(&inner.callbacks.error, |f| f(&error));
            }
        }
        tokio::select! {
            biased;
            _ = token.cancelled() => break,
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep(check_interval) => {}
        }
    }
}
