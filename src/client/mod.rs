//! The library API of the original IndexedCP client: [`Client`] buffers files in
//! a local SQLite database and uploads them to a receiver with retries and
//! exponential backoff, with the original's options, defaults and callbacks.
//!
//! It is a thin layer over the engine the daemon runs: files are buffered by
//! [`ingest::ingest_path`] into the [`Store`], and sent by
//! [`upload::upload_queued_once`], which records every outcome exactly as the
//! daemon's uploader does (chunk retry counts, the last five errors, the next
//! attempt, parking of refused files) and speaks the same resumable protocol.
//! The one-shot commands (`indexedcp upload`, `indexedcp add`) are built on this
//! client. Blocking work (SQLite, reading files) runs on tokio's blocking pool.
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

pub mod storage;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::agent::ingest::{self, IngestError, PathIngest};
use crate::agent::store::{self, FileRecord, Store, StoreError};
use crate::agent::upload::{
    self, Backoff, EventStatus, FileAttempt, FileOutcome, Retry, TargetRuntime, UploadError,
    UploadEvent, UploadObserver,
};
use crate::config::{LogFormat, TargetConfig};
use crate::logging;

/// The target name under which the client (and the one-shot commands) buffer
/// files; the daemon's uploader never sends them.
///
/// ```
/// assert_eq!(indexedcp::client::DEFAULT_TARGET, "cli");
/// ```
pub const DEFAULT_TARGET: &str = "cli";

/// The default chunk size, 1 MiB, as in the original.
///
/// ```
/// assert_eq!(indexedcp::client::DEFAULT_CHUNK_SIZE, 1024 * 1024);
/// ```
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;

/// Environment variable holding the API key when none is given.
///
/// ```
/// assert_eq!(indexedcp::client::API_KEY_ENV, "INDEXEDCP_API_KEY");
/// ```
pub const API_KEY_ENV: &str = "INDEXEDCP_API_KEY";

/// The default buffer, `~/.indexcp/db/client.db` (the original's), or
/// `.indexcp/db/client.db` in the current directory when `HOME` is not set.
///
/// ```
/// let path = indexedcp::client::default_storage_path();
/// assert!(path.ends_with(".indexcp/db/client.db"));
/// ```
pub fn default_storage_path() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".indexcp/db/client.db")
}

/// Whether a chunk was acknowledged or failed.
///
/// ```
/// use indexedcp::client::ChunkStatus;
/// assert_eq!(ChunkStatus::Success.as_str(), "success");
/// assert_eq!(ChunkStatus::Failed.as_str(), "failed");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStatus {
    Success,
    Failed,
}

impl ChunkStatus {
    /// The original's spelling: `success` or `failed`.
    ///
    /// ```
    /// assert_eq!(indexedcp::client::ChunkStatus::Failed.as_str(), "failed");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkStatus::Success => "success",
            ChunkStatus::Failed => "failed",
        }
    }
}

/// What `on_upload_progress` receives for every chunk attempt.
///
/// ```
/// use indexedcp::client::{ChunkStatus, ProgressEvent};
/// use std::time::Duration;
///
/// let event = ProgressEvent {
///     file_name: "/data/report.pdf".into(),
///     remote_name: "report.pdf".into(),
///     chunk_index: 2,
///     chunk_count: 5,
///     file_size: 5 << 20,
///     status: ChunkStatus::Failed,
///     retry_count: 1,
///     next_retry_in: Some(Duration::from_secs(1)),
///     error: Some("cannot reach http://127.0.0.1:3000/upload".into()),
/// };
/// assert_eq!(event.status.as_str(), "failed");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressEvent {
    /// The client's name for the file: its absolute path when it was added
    /// (the key of [`Client::upload_buffered_files`]'s map).
    pub file_name: String,
    /// The name sent to the receiver (`X-File-Name`): the file's base name.
    pub remote_name: String,
    pub chunk_index: u64,
    pub chunk_count: u64,
    /// The whole file's size in bytes.
    pub file_size: u64,
    pub status: ChunkStatus,
    /// Failed attempts at this chunk so far (including this one when it failed).
    pub retry_count: u64,
    /// When the chunk is tried again (`None` after a success, or when the file
    /// was given up on).
    pub next_retry_in: Option<Duration>,
    pub error: Option<String>,
}

/// What `on_upload_complete` receives after a background round that delivered
/// at least one file.
///
/// ```
/// let summary = indexedcp::client::UploadSummary { succeeded: 2, failed: 1, total: 3 };
/// assert_eq!(summary.succeeded + summary.failed, summary.total);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadSummary {
    pub succeeded: usize,
    pub failed: usize,
    pub total: usize,
}

/// A file an upload could not deliver, and why.
///
/// ```
/// use indexedcp::client::FailedFile;
/// use indexedcp::agent::upload::Retry;
///
/// let failed = FailedFile {
///     file_id: 7,
///     file_name: "/data/a.txt".into(),
///     remote_name: "a.txt".into(),
///     error: "cannot reach http://127.0.0.1:9/upload: connection refused".into(),
///     retry: Retry::Backoff,
///     parked: false,
/// };
/// assert!(!failed.parked);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FailedFile {
    /// The file's id in the buffer (`indexedcp status` shows it).
    pub file_id: i64,
    pub file_name: String,
    pub remote_name: String,
    pub error: String,
    /// What the retry rule says about the error (a refused key or URL is
    /// [`Retry::AtMaximum`], a refused file [`Retry::Never`]).
    pub retry: Retry,
    /// The file was given up on (refused, or past `max_retries`): it stays in the
    /// buffer as failed until `indexedcp retry` re-queues it.
    pub parked: bool,
}

/// Why a client operation failed.
///
/// ```
/// use indexedcp::client::ClientError;
/// assert!(ClientError::NoServerUrl.to_string().starts_with("server_url required"));
/// assert!(ClientError::NoApiKey.to_string().starts_with("api_key required"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "server_url required for upload: set ClientOptions::server_url (for example http://host:3000/upload)"
    )]
    NoServerUrl,
    #[error("api_key required for upload: set ClientOptions::api_key or INDEXEDCP_API_KEY")]
    NoApiKey,
    #[error("invalid client options: {0}")]
    InvalidOptions(String),
    #[error("the client is closed")]
    Closed,
    #[error("cannot create the directory {path} for the buffer: {source}")]
    StorageDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error("{}", undelivered_message(failed))]
    Undelivered {
        /// What was delivered before the failures (client name -> server name).
        delivered: HashMap<String, String>,
        failed: Vec<FailedFile>,
    },
    #[error("a background task failed: {0}")]
    Task(String),
}

fn undelivered_message(failed: &[FailedFile]) -> String {
    let mut message = format!("{} file(s) failed to upload", failed.len());
    if let Some(first) = failed.first() {
        message.push_str(&format!(" ({}: {}", first.remote_name, first.error));
        if failed.len() > 1 {
            message.push_str(&format!(", and {} more", failed.len() - 1));
        }
        message.push(')');
    }
    if failed.iter().all(|f| f.parked) {
        message.push_str(
            "; they are parked in the buffer: fix the cause, then `indexedcp retry --all`",
        );
    } else {
        message.push_str("; they stay buffered and the next upload resumes them");
    }
    message
}

/// Called with every [`ProgressEvent`].
///
/// ```
/// use std::sync::Arc;
/// use indexedcp::client::{ClientOptions, ProgressCallback};
///
/// let progress: ProgressCallback = Arc::new(|e| eprintln!("{} {}", e.file_name, e.status.as_str()));
/// let options = ClientOptions { on_upload_progress: Some(progress), ..ClientOptions::default() };
/// assert!(options.on_upload_progress.is_some());
/// ```
pub type ProgressCallback = Arc<dyn Fn(&ProgressEvent) + Send + Sync>;
/// Called with errors of the background upload.
///
/// ```
/// use std::sync::Arc;
/// use indexedcp::client::{ClientError, ErrorCallback};
///
/// let on_error: ErrorCallback = Arc::new(|e| eprintln!("upload: {e}"));
/// on_error(&ClientError::NoApiKey);
/// ```
pub type ErrorCallback = Arc<dyn Fn(&ClientError) + Send + Sync>;
/// Called with the [`UploadSummary`] of a background round.
///
/// ```
/// use std::sync::Arc;
/// use indexedcp::client::{CompleteCallback, UploadSummary};
///
/// let on_complete: CompleteCallback = Arc::new(|s| assert_eq!(s.total, s.succeeded + s.failed));
/// on_complete(&UploadSummary { succeeded: 1, failed: 0, total: 1 });
/// ```
pub type CompleteCallback = Arc<dyn Fn(&UploadSummary) + Send + Sync>;

/// The client's options, with the original's defaults.
///
/// `Default` reads `INDEXEDCP_API_KEY` into `api_key` and `INDEXEDCP_LOG_LEVEL`
/// into `log_level`, as the original falls back to them.
///
/// ```
/// use indexedcp::client::{ClientOptions, DEFAULT_CHUNK_SIZE};
/// use std::time::Duration;
///
/// let options = ClientOptions::default();
/// assert_eq!(options.server_url, None);
/// assert_eq!(options.chunk_size, DEFAULT_CHUNK_SIZE);
/// assert_eq!(options.max_retries, None); // retry forever
/// assert_eq!(options.initial_retry_delay, Duration::from_secs(1));
/// assert_eq!(options.max_retry_delay, Duration::from_secs(60));
/// assert_eq!(options.retry_multiplier, 2.0);
/// assert!(options.storage_path.ends_with(".indexcp/db/client.db"));
/// ```
#[derive(Clone)]
pub struct ClientOptions {
    /// The receiver's upload URL, e.g. `http://host:3000/upload`; a URL without
    /// a path gets `/upload`. Needed to upload, not to buffer.
    pub server_url: Option<String>,
    /// The API key sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// The buffer database (created with its parent directories).
    pub storage_path: PathBuf,
    /// Bytes per chunk for files added from now on.
    pub chunk_size: u64,
    /// After this many failed retries of a chunk the file is parked; `None`
    /// retries forever.
    pub max_retries: Option<u32>,
    pub initial_retry_delay: Duration,
    pub max_retry_delay: Duration,
    pub retry_multiplier: f64,
    /// When set, [`Client::new`] installs the crate's logger (stderr, or
    /// journald under systemd) at this level: `trace`, `debug`, `info`, `warn`,
    /// `error` or `fatal`; `INDEXEDCP_LOG_LEVEL` still wins, as in
    /// [`crate::logging`]. When `None`, the application's own `tracing`
    /// subscriber (if any) sees the client's logs.
    pub log_level: Option<String>,
    pub on_upload_progress: Option<ProgressCallback>,
    pub on_upload_error: Option<ErrorCallback>,
    pub on_upload_complete: Option<CompleteCallback>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        ClientOptions {
            server_url: None,
            api_key: env(API_KEY_ENV),
            storage_path: default_storage_path(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_retries: None,
            initial_retry_delay: Duration::from_secs(1),
            max_retry_delay: Duration::from_secs(60),
            retry_multiplier: 2.0,
            log_level: env(logging::LOG_LEVEL_ENV),
            on_upload_progress: None,
            on_upload_error: None,
            on_upload_complete: None,
        }
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("server_url", &self.server_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("storage_path", &self.storage_path)
            .field("chunk_size", &self.chunk_size)
            .field("max_retries", &self.max_retries)
            .field("initial_retry_delay", &self.initial_retry_delay)
            .field("max_retry_delay", &self.max_retry_delay)
            .field("retry_multiplier", &self.retry_multiplier)
            .field("log_level", &self.log_level)
            .finish_non_exhaustive()
    }
}

impl ClientOptions {
    /// The defaults with `server_url` set.
    ///
    /// ```
    /// use indexedcp::client::ClientOptions;
    /// let options = ClientOptions::new("http://127.0.0.1:3000/upload");
    /// assert_eq!(options.server_url.as_deref(), Some("http://127.0.0.1:3000/upload"));
    /// ```
    pub fn new(server_url: impl Into<String>) -> ClientOptions {
        ClientOptions {
            server_url: Some(server_url.into()),
            ..ClientOptions::default()
        }
    }
}

/// `http(s)://host[:port]/path`, with `/upload` when the path is empty.
fn normalize_url(url: &str) -> Result<String, ClientError> {
    let invalid = |why: &str| {
        ClientError::InvalidOptions(format!(
            "server_url {url:?} {why}; use for example http://host:3000/upload"
        ))
    };
    let mut parsed =
        reqwest::Url::parse(url).map_err(|e| invalid(&format!("is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("is not an http:// or https:// URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("has no host"));
    }
    if parsed.path().is_empty() || parsed.path() == "/" {
        parsed.set_path("/upload");
    }
    Ok(parsed.to_string())
}

#[derive(Default)]
struct Callbacks {
    progress: RwLock<Option<ProgressCallback>>,
    error: RwLock<Option<ErrorCallback>>,
    complete: RwLock<Option<CompleteCallback>>,
}

/// Runs a user callback; a panic in it is logged, never propagated into the
/// upload engine.
fn call<T: ?Sized>(slot: &RwLock<Option<Arc<T>>>, run: impl FnOnce(&T)) {
    let callback = slot.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(callback) = callback
        && std::panic::catch_unwind(AssertUnwindSafe(|| run(&callback))).is_err()
    {
        tracing::error!("an upload callback panicked; the upload goes on");
    }
}

/// Turns the engine's events into the original's progress events.
struct CallbackObserver<'a> {
    callbacks: &'a Callbacks,
    files: HashMap<i64, FileRecord>,
}

impl UploadObserver for CallbackObserver<'_> {
    fn on_event(&self, event: &UploadEvent) {
        let status = match event.status {
            EventStatus::Success => ChunkStatus::Success,
            EventStatus::Failed | EventStatus::Parked { .. } => ChunkStatus::Failed,
            EventStatus::Complete { .. } => return,
        };
        let file = self.files.get(&event.file_id);
        let progress = ProgressEvent {
            file_name: file
                .map(|f| f.rel_path.clone())
                .unwrap_or_else(|| event.file_name.clone()),
            remote_name: event.file_name.clone(),
            chunk_index: event.chunk_index,
            chunk_count: file.map_or(0, |f| f.chunk_count),
            file_size: file.map_or(0, |f| f.size),
            status,
            retry_count: event.retry_count,
            next_retry_in: event.next_retry_in,
            error: event.error.clone(),
        };
        call(&self.callbacks.progress, |f| f(&progress));
    }
}

/// What one round of uploads did.
struct Round {
    delivered: HashMap<String, String>,
    failed: Vec<FailedFile>,
}

fn round_of(attempts: Vec<FileAttempt>) -> Round {
    let mut round = Round {
        delivered: HashMap::new(),
        failed: Vec::new(),
    };
    for attempt in attempts {
        let file = attempt.file;
        match attempt.outcome {
            FileOutcome::Confirmed { server_name } => {
                let server_name = server_name.unwrap_or_else(|| file.remote_name.clone());
                round.delivered.insert(file.rel_path, server_name);
            }
            outcome => {
                let (error, retry) = attempt
                    .error
                    .unwrap_or_else(|| ("not delivered".to_owned(), Retry::Backoff));
                round.failed.push(FailedFile {
                    file_id: file.id,
                    file_name: file.rel_path,
                    remote_name: file.remote_name,
                    error,
                    retry,
                    parked: matches!(outcome, FileOutcome::Parked { .. }),
                });
            }
        }
    }
    round
}

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
        let files = blocking(move || s.due_files(DEFAULT_TARGET, due_at, &[], usize::MAX)).await?;
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
            Ok::<_, ClientError>(Store::open(&path)?)
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
            round = inner.round(store::now_ms()) => round,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_an_upload_path_only_when_they_have_none() {
        assert_eq!(
            normalize_url("http://127.0.0.1:3000").unwrap(),
            "http://127.0.0.1:3000/upload"
        );
        assert_eq!(
            normalize_url("https://host/").unwrap(),
            "https://host/upload"
        );
        assert_eq!(
            normalize_url("http://host:1/in/upload").unwrap(),
            "http://host:1/in/upload"
        );
        for bad in ["ftp://host/upload", "host:3000/upload", "", "http://"] {
            assert!(normalize_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn undelivered_messages_say_what_happens_next() {
        let failed = |parked| FailedFile {
            file_id: 1,
            file_name: "/x/a.txt".into(),
            remote_name: "a.txt".into(),
            error: "boom".into(),
            retry: Retry::Backoff,
            parked,
        };
        assert_eq!(
            undelivered_message(&[failed(false), failed(true)]),
            "2 file(s) failed to upload (a.txt: boom, and 1 more); they stay buffered and the next upload resumes them"
        );
        assert!(undelivered_message(&[failed(true)]).contains("indexedcp retry"));
    }
}
