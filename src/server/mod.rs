//! The receiver: an axum application that accepts chunks on `POST /upload`,
//! verifies them and writes finished files into the output directory.
//!
//! Two protocols share the route (DESIGN.md section 5). A v1 request (no
//! `X-Upload-Id`) appends to the file of its client file name's current session,
//! exactly as the original servers do, but with sessions kept in SQLite and a new
//! file for every chunk 0. A resumable request writes its chunk at its offset into
//! a staging file under the state directory; when every chunk is recorded the
//! whole file is verified, synced and renamed into place without replacing
//! anything. The order "bytes durable, then recorded; name recorded, then renamed,
//! then complete" is what lets a SIGKILL at any moment lose nothing and never show
//! a partial file under a final name. A batch (`POST /upload/batch`) carries
//! whole small files, each the single chunk of its upload id, and follows the
//! same order with its syncs shared by all its new files.
//!
//! This module does not import the client side (`upload`).

mod body;
mod hashes;
pub mod paths;
mod sha256;
pub mod state;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{PathMode, ServerConfig};
use crate::protocol::{
    self, BatchEntry, BatchManifest, BatchReply, BatchResult, ChunkReply, ErrorReply, UploadStatus,
};
use body::{BodyError, Frames, Sink, is_disk_full, read_body, stream_body};
use hashes::FileHashes;
use paths::{Destination, InvalidName};
use sha256::Sha256Stream;
use state::{ChunkRecord, FileMeta, UploadPhase, UploadState, V1Session};

/// How long a client may take to send its request headers, and to send each
/// piece of a body, before the connection is closed.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors that stop the receiver from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create {what} {path}: {source}")]
    CreateDir {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "server.state_dir {state_dir} is not on the same file system as server.output_dir {output_dir}; finished files are renamed into place, so put the state directory on the output directory's file system"
    )]
    CrossDevice {
        state_dir: PathBuf,
        output_dir: PathBuf,
    },
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("cannot listen on {addr}: {source}; choose another address or port")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Run-time options of the receiver that are not part of the config file.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    pub read_timeout: Duration,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            read_timeout: DEFAULT_READ_TIMEOUT,
        }
    }
}

/// Generates a random 256-bit API key as 64 hex characters, as the original does
/// when no key is configured.
pub fn generate_api_key() -> String {
    paths::random_hex(32)
}

/// The receiver's shared state, cheap to clone into handlers.
#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Inner>,
}

struct Inner {
    output_dir: PathBuf,
    keys: Vec<Vec<u8>>,
    path_mode: PathMode,
    max_chunk_bytes: u64,
    max_file_bytes: u64,
    incomplete_expiry: Duration,
    read_timeout: Duration,
    state: UploadState,
    root: OwnedFd,
    staging: OwnedFd,
    staging_path: PathBuf,
    reserved: Option<String>,
    /// Whole-file hashes of uploads in progress, advanced as chunks arrive;
    /// shared by every `Receiver` of the process with this staging directory,
    /// since requests still running on a receiver replaced by a reload write
    /// the same files.
    hashes: Arc<FileHashes>,
    /// Shared by every `Receiver` of the process: after a reload, the new
    /// receiver's recovery waits for requests still running on the old one.
    locks: &'static KeyedLocks,
}

static UPLOAD_LOCKS: std::sync::LazyLock<KeyedLocks> =
    std::sync::LazyLock::new(KeyedLocks::default);

impl Receiver {
    /// Opens (creating as needed) the output and state directories and the state
    /// database. `api_keys` must not be empty; see [`generate_api_key`].
    pub fn open(cfg: &ServerConfig, options: &ReceiverOptions) -> Result<Receiver, ServerError> {
        create_dir(&cfg.output_dir, "the output directory")?;
        let staging_path = cfg.state_dir.join("staging");
        create_dir(&staging_path, "the staging directory")?;
        let dev = |p: &Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::dev(&m));
        if let (Ok(a), Ok(b)) = (dev(&cfg.output_dir), dev(&staging_path))
            && a != b
        {
            return Err(ServerError::CrossDevice {
                state_dir: cfg.state_dir.clone(),
                output_dir: cfg.output_dir.clone(),
            });
        }
        let state = UploadState::open(&cfg.state_dir.join("uploads.db"))?;
        let root = paths::open_root(&cfg.output_dir).map_err(|source| ServerError::CreateDir {
            what: "the output directory",
            path: cfg.output_dir.clone(),
            source,
        })?;
        let staging = paths::open_root(&staging_path).map_err(|source| ServerError::CreateDir {
            what: "the staging directory",
            path: staging_path.clone(),
            source,
        })?;
        let hashes = hashes::for_staging_dir(&staging_path);
        Ok(Receiver {
            inner: Arc::new(Inner {
                output_dir: cfg.output_dir.clone(),
                keys: cfg.api_keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
                path_mode: cfg.path_mode,
                max_chunk_bytes: cfg.max_chunk_bytes,
                max_file_bytes: cfg.max_file_bytes,
                incomplete_expiry: cfg.incomplete_expiry,
                read_timeout: options.read_timeout,
                state,
                root,
                staging,
                staging_path,
                reserved: reserved_component(&cfg.output_dir, &cfg.state_dir),
                hashes,
                locks: &UPLOAD_LOCKS,
            }),
        })
    }

    pub fn output_dir(&self) -> &Path {
        &self.inner.output_dir
    }

    /// The axum application.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/health", get(health))
            .route("/upload", post(upload))
            .route("/upload/batch", post(receive_batch))
            .route("/upload/{upload_id}", get(upload_status))
            .fallback(not_found)
            .layer(middleware::from_fn(cors))
            .with_state(self.clone())
    }

    /// Finishes uploads interrupted between their last chunk and completion (a
    /// crash or SIGKILL), so their files appear without waiting for the client.
    pub async fn recover(&self) {
        let state = self.inner.state.clone();
        let unfinished = match blocking(move || state.unfinished()).await {
            Ok(list) => list,
            Err(e) => {
                tracing::error!(error = %e, "cannot list unfinished uploads");
                return;
            }
        };
        for upload in unfinished {
            match self.finalize(&upload.upload_id).await {
                Ok(name) => {
                    tracing::info!(upload_id = %upload.upload_id, file = %name, "recovered upload completed")
                }
                Err(e) => {
                    tracing::warn!(upload_id = %upload.upload_id, error = %e.message(), "recovered upload could not be completed")
                }
            }
        }
        self.sweep_staging().await;
    }

    /// Removes staging files nothing refers to: those of a batch stopped
    /// before it recorded them, and of uploads already complete. Each is
    /// checked under its upload's locks, so a request writing it is waited for.
    async fn sweep_staging(&self) {
        let path = self.inner.staging_path.clone();
        let names = match blocking(move || {
            std::fs::read_dir(&path)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<Vec<String>>>()
        })
        .await
        {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the staging directory");
                return;
            }
        };
        let mut removed = 0usize;
        // (`v1-*` files are v1 chunks on their way in, not uploads.)
        let ids = names
            .into_iter()
            .filter(|n| protocol::is_valid_upload_id(n) && !n.starts_with("v1-"));
        for id in ids {
            let _guards = self.inner.locks.lock_uploads([id.as_str()]).await;
            let this = self.clone();
            let gone = blocking(move || {
                let orphan = match this.inner.state.upload(&id)? {
                    None => true,
                    Some(upload) => upload.phase == UploadPhase::Complete,
                };
                if orphan {
                    this.discard_staged(&id);
                }
                Ok::<_, state::StateError>(orphan)
            })
            .await;
            removed += usize::from(matches!(gone, Ok(true)));
        }
        if removed > 0 {
            tracing::info!(files = removed, "removed staging files of no upload");
        }
    }

    /// Removes uploads untouched for `incomplete_expiry` and their staging data.
    pub async fn expire(&self) {
        let inner = self.inner.clone();
        let cutoff = state::now_secs() - inner.incomplete_expiry.as_secs() as i64;
        let state = inner.state.clone();
        let result = blocking(move || state.expire(cutoff)).await;
        // A batch may be writing a staging file of the same id (it holds the
        // chunk's lock): the file goes only once nobody holds it.
        let result = match result {
            Ok((stale, forgotten)) => {
                // At once: the same ids may be used again before the locks
                // below are free, and must not find the old hashes.
                stale.iter().for_each(|id| inner.hashes.forget(id));
                let _guards = inner
                    .locks
                    .lock_uploads(stale.iter().map(String::as_str))
                    .await;
                let (this, n) = (self.clone(), stale.len());
                let _ = blocking(move || {
                    stale.iter().for_each(|id| this.discard_staged(id));
                    Ok::<_, ApiError>(())
                })
                .await;
                Ok((n, forgotten))
            }
            Err(e) => Err(e),
        };
        match result {
            Ok((0, 0)) => {}
            Ok((stale, forgotten)) => {
                tracing::info!(abandoned = stale, forgotten, "expired old upload records")
            }
            Err(e) => tracing::warn!(error = %e, "expiring old uploads failed"),
        }
    }

    /// Checks an `Authorization` header against every key in constant time.
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers
            .get(protocol::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        else {
            return false;
        };
        self.inner
            .keys
            .iter()
            .fold(0u8, |ok, key| ok | key.as_slice().ct_eq(given).unwrap_u8())
            == 1
    }

    fn destination(&self, client_name: &str) -> Result<Destination, ApiError> {
        paths::destination_for(
            self.inner.path_mode,
            client_name,
            self.inner.reserved.as_deref(),
        )
        .map_err(|InvalidName(message)| ApiError::InvalidName(message))
    }

    /// Verifies a fully received upload and renames it into place; idempotent, and
    /// safe to call again after a crash at any point.
    async fn finalize(&self, upload_id: &str) -> Result<String, ApiError> {
        let _guard = self.inner.locks.lock(upload_id.to_owned()).await;
        let this = self.clone();
        let id = upload_id.to_owned();
        blocking(move || this.finalize_blocking(&id)).await
    }

    fn finalize_blocking(&self, upload_id: &str) -> Result<String, ApiError> {
        let inner = &self.inner;
        let Some(upload) = inner.state.upload(upload_id)? else {
            return Err(ApiError::NotFound);
        };
        let (dest, first_attempt) = match (upload.phase, upload.actual_name) {
            (UploadPhase::Complete, Some(name)) => return Ok(name),
            (UploadPhase::Finalizing, Some(name)) => {
                let dest = destination_from_display(&name);
                // The staged file's name was made durable before the final name
                // was recorded, so a missing staged file means the rename
                // happened (the final file may have been taken away since).
                let renamed = !paths::exists_in(&inner.staging, upload_id)?;
                let parent = paths::open_parent(&inner.root, &dest).map_err(open_error)?;
                // Where rename is emulated by link + unlink, a crash between
                // the two leaves both names on one file.
                let linked =
                    !renamed && paths::same_file(&inner.staging, upload_id, &parent, &dest.name)?;
                if renamed || linked {
                    if linked {
                        rustix::fs::unlinkat(
                            &inner.staging,
                            upload_id,
                            rustix::fs::AtFlags::empty(),
                        )
                        .map_err(io::Error::from)?;
                    }
                    paths::fsync_dir(&parent)?;
                    paths::fsync_dir(&inner.staging)?;
                    inner.state.complete(upload_id, &name)?;
                    return Ok(name);
                }
                (dest, 0)
            }
            _ => {
                self.verify_staged(upload_id, &upload.meta)?;
                (self.destination(&upload.meta.client_name)?, 0)
            }
        };
        let parent = paths::open_parent(&inner.root, &dest).map_err(open_error)?;
        let millis = paths::now_millis();
        for attempt in first_attempt..10_000u32 {
            let candidate = dest.with_name(paths::unique_candidate(&dest.name, millis, attempt));
            let final_name = candidate.display();
            // The chosen name is durable before the rename, so recovery knows where
            // the file went.
            inner
                .state
                .set_phase(upload_id, UploadPhase::Finalizing, Some(&final_name))?;
            crate::failpoint::hit(crate::failpoint::SERVER_BEFORE_RENAME);
            if paths::rename_no_replace(&inner.staging, upload_id, &parent, &candidate.name)? {
                paths::fsync_dir(&parent)?;
                paths::fsync_dir(&inner.staging)?;
                crate::failpoint::hit(crate::failpoint::SERVER_AFTER_RENAME);
                inner.state.complete(upload_id, &final_name)?;
                tracing::info!(upload_id, client_name = %upload.meta.client_name, file = %final_name, size = upload.meta.file_size, "file complete");
                return Ok(final_name);
            }
        }
        Err(ApiError::Internal(format!(
            "no free name for {} in the output directory",
            dest.display()
        )))
    }

    /// Checks that the recorded chunks tile the file and that the staged bytes
    /// hash to the declared SHA-256; on a mismatch the staging data is discarded.
    fn verify_staged(&self, upload_id: &str, meta: &FileMeta) -> Result<(), ApiError> {
        let inner = &self.inner;
        let chunks = inner.state.chunks(upload_id)?;
        let mut expected_offset = 0u64;
        let mut tiled = chunks.len() as u64 == meta.chunk_count;
        for (i, chunk) in chunks.iter().enumerate() {
            tiled &= chunk.chunk_idx == i as u64 && chunk.offset == expected_offset;
            expected_offset += chunk.length;
        }
        tiled &= expected_offset == meta.file_size;
        let discard = |why: String| -> Result<(), ApiError> {
            self.discard_staged(upload_id);
            inner.state.forget_upload(upload_id)?;
            tracing::warn!(upload_id, client_name = %meta.client_name, reason = %why, "upload discarded");
            Err(ApiError::FileMismatch(format!(
                "{why}; the upload was discarded, send the file again from its first chunk"
            )))
        };
        if !tiled {
            return discard(format!(
                "the chunks do not cover the file exactly ({} chunks ending at byte {expected_offset}, X-File-Size {})",
                chunks.len(),
                meta.file_size
            ));
        }
        let path = inner.staging_path.join(upload_id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        file.set_len(meta.file_size)?;
        // Only what the hash followed as chunks arrived is not read back.
        let actual = match inner.hashes.take(upload_id) {
            hashes::Known::Whole(sha256) => sha256,
            known => {
                // Read back what the hash did not follow: all of it when
                // nothing was followed.
                let (mut hasher, len) = match known {
                    hashes::Known::Prefix { hasher, len } if len <= meta.file_size => (hasher, len),
                    _ => (Sha256Stream::new(), 0),
                };
                hashes::hash_range(&file, len, meta.file_size - len, &mut hasher)?;
                hasher.finalize_hex()
            }
        };
        if actual != meta.file_sha256 {
            return discard(format!(
                "the received file has SHA-256 {actual}, not X-File-Sha256 {}",
                meta.file_sha256
            ));
        }
        file.sync_all()?;
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
        // The staged name too: recovery reads a missing staged file as renamed.
        paths::fsync_dir(&inner.staging)?;
        Ok(())
    }
}

fn create_dir(path: &Path, what: &'static str) -> Result<(), ServerError> {
    std::fs::create_dir_all(path).map_err(|source| ServerError::CreateDir {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The first component of `state_dir` below `output_dir`, if it lies inside.
fn reserved_component(output_dir: &Path, state_dir: &Path) -> Option<String> {
    let out = std::fs::canonicalize(output_dir).ok()?;
    let state = std::fs::canonicalize(state_dir).ok()?;
    let rest = state.strip_prefix(&out).ok()?;
    rest.components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
}

fn destination_from_display(display: &str) -> Destination {
    let mut parts: Vec<String> = display.split('/').map(str::to_owned).collect();
    let name = parts.pop().unwrap_or_default();
    Destination { dirs: parts, name }
}

async fn blocking<T: Send + 'static, E: Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    ApiError: From<E>,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::Internal(format!("blocking task failed: {e}"))),
    }
}

/// Serves `receiver` on `listener` until `shutdown` is cancelled, then lets
/// in-flight requests finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    receiver: Receiver,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let (_keep, receivers) = tokio::sync::watch::channel(receiver);
    serve_reloadable(listener, receivers, shutdown, grace).await
}

/// Like [`serve`], but each new connection is served by the receiver current in
/// `receivers`, so a configuration reload (keys, path mode, limits) takes effect
/// without closing the listener or dropping requests in flight.
pub async fn serve_reloadable(
    listener: TcpListener,
    mut receivers: tokio::sync::watch::Receiver<Receiver>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut receiver = receivers.borrow_and_update().clone();
    let mut router = receiver.router();
    let maintenance = {
        let mut receivers = receivers.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut current = receivers.borrow_and_update().clone();
            current.recover().await;
            loop {
                current.expire().await;
                let period = (current.inner.incomplete_expiry / 4)
                    .clamp(Duration::from_secs(1), Duration::from_secs(600));
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(period) => {}
                    changed = receivers.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        current = receivers.borrow_and_update().clone();
                        current.recover().await;
                    }
                }
            }
        })
    };
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        if receivers.has_changed().unwrap_or(false) {
            receiver = receivers.borrow_and_update().clone();
            router = receiver.router();
        }
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(receiver.inner.read_timeout)
            .keep_alive(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    maintenance.abort();
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!("all connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!(?grace, "in-flight requests did not finish within the grace period; abandoning them"),
    }
}

// ---------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------

/// A reply other than success: status plus `{"error", "message"}`.
#[derive(Debug, Clone)]
pub enum ApiError {
    Unauthorized,
    BadRequest(String),
    InvalidName(String),
    NotFound,
    Conflict(String),
    Timeout(String),
    TooLarge(String),
    Unprocessable(String),
    /// The whole file did not verify; the upload was discarded.
    FileMismatch(String),
    InsufficientStorage(String),
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) | ApiError::InvalidName(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) | ApiError::FileMismatch(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::Unauthorized => protocol::INVALID_KEY_ERROR.to_owned(),
            ApiError::NotFound => "Not found".to_owned(),
            ApiError::BadRequest(m)
            | ApiError::InvalidName(m)
            | ApiError::Conflict(m)
            | ApiError::Timeout(m)
            | ApiError::TooLarge(m)
            | ApiError::Unprocessable(m)
            | ApiError::FileMismatch(m)
            | ApiError::InsufficientStorage(m)
            | ApiError::Internal(m) => m.clone(),
        }
    }

    fn reply(&self) -> ErrorReply {
        let (error, message) = match self {
            ApiError::Unauthorized => (protocol::INVALID_KEY_ERROR, None),
            ApiError::NotFound => ("Not found", None),
            ApiError::BadRequest(m) => ("Bad request", Some(m)),
            ApiError::InvalidName(m) => ("Invalid filename", Some(m)),
            ApiError::Conflict(m) => ("Conflict", Some(m)),
            ApiError::Timeout(m) => ("Request timeout", Some(m)),
            ApiError::TooLarge(m) => ("Payload too large", Some(m)),
            ApiError::Unprocessable(m) => (protocol::CHUNK_MISMATCH_ERROR, Some(m)),
            ApiError::FileMismatch(m) => (protocol::FILE_MISMATCH_ERROR, Some(m)),
            ApiError::InsufficientStorage(m) => ("Insufficient storage", Some(m)),
            ApiError::Internal(m) => ("Internal error", Some(m)),
        };
        ErrorReply {
            error: error.to_owned(),
            message: message.cloned(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message(), self.status())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %self.message(), "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self.message(), "request refused");
        }
        (status, axum::Json(self.reply())).into_response()
    }
}

impl From<io::Error> for ApiError {
    fn from(e: io::Error) -> ApiError {
        if is_disk_full(&e) {
            ApiError::InsufficientStorage(format!(
                "the receiver's disk is full ({e}); nothing was recorded, retry later"
            ))
        } else {
            ApiError::Internal(format!("i/o error on the receiver: {e}"))
        }
    }
}

impl From<state::StateError> for ApiError {
    fn from(e: state::StateError) -> ApiError {
        if let state::StateError::Sql(rusqlite::Error::SqliteFailure(f, _)) = &e
            && f.code == rusqlite::ErrorCode::DiskFull
        {
            return ApiError::InsufficientStorage(format!(
                "the receiver's disk is full ({e}); retry later"
            ));
        }
        ApiError::Internal(e.to_string())
    }
}

fn open_error(e: paths::OpenError) -> ApiError {
    match e {
        paths::OpenError::NotADirectory(_) => {
            ApiError::InvalidName(format!("{e}; a file cannot be written below it"))
        }
        paths::OpenError::Io(e) => e.into(),
    }
}

fn body_error(e: BodyError, too_long: impl FnOnce(u64) -> ApiError) -> ApiError {
    match e {
        BodyError::TooLong { limit } => too_long(limit),
        BodyError::Timeout(t) => ApiError::Timeout(format!(
            "no body data for {}s; the chunk was not recorded",
            t.as_secs()
        )),
        BodyError::Aborted(m) => ApiError::BadRequest(format!("the request body was cut off: {m}")),
        BodyError::Short { wanted } => ApiError::BadRequest(format!(
            "the body ended before the {wanted}-byte manifest did (X-Manifest-Length)"
        )),
        BodyError::Io(e) => e.into(),
    }
}

/// Adds the CORS headers the original sends, answers preflight requests, and
/// announces the resumable extension on upload routes.
async fn cors(request: Request, next: Next) -> Response {
    let preflight = request.method() == Method::OPTIONS;
    let upload_route = request.uri().path().starts_with("/upload");
    let mut response = if preflight {
        StatusCode::OK.into_response()
    } else {
        next.run(request).await
    };
    crate::metrics::count_receiver_reply(response.status().as_u16());
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(
            "Content-Type, Authorization, X-Chunk-Index, X-File-Name, X-Upload-Id, X-Chunk-Offset, X-Chunk-Sha256, X-File-Size, X-Chunk-Count, X-File-Sha256, X-Manifest-Length",
        ),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("X-IndexedCP-Resumable, X-IndexedCP-Batch"),
    );
    if upload_route {
        h.insert(protocol::RESUMABLE, HeaderValue::from_static("1"));
        h.insert(
            protocol::BATCH,
            HeaderValue::from(protocol::MAX_BATCH_FILES),
        );
    }
    response
}

async fn health() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn upload_status(
    State(receiver): State<Receiver>,
    UrlPath(upload_id): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !receiver.authorized(&headers) {
        return Err(ApiError::Unauthorized);
    }
    if !protocol::is_valid_upload_id(&upload_id) {
        return Err(ApiError::BadRequest(
            "an upload id is 16 to 64 of [A-Za-z0-9_-]".to_owned(),
        ));
    }
    let state = receiver.inner.state.clone();
    let id = upload_id.clone();
    let (upload, chunks) = blocking(move || {
        let upload = state.upload(&id)?;
        let chunks = state.chunks(&id)?;
        Ok::<_, state::StateError>((upload, chunks))
    })
    .await?;
    let Some(mut upload) = upload else {
        return Err(ApiError::NotFound);
    };
    let mut received: Vec<u64> = chunks.iter().map(|c| c.chunk_idx).collect();
    // Everything arrived but completion was interrupted: finish it now, so the
    // client sees the true state instead of re-sending.
    if upload.phase != UploadPhase::Complete && received.len() as u64 == upload.meta.chunk_count
        || upload.phase == UploadPhase::Finalizing
    {
        match receiver.finalize(&upload_id).await {
            Ok(name) => {
                upload.phase = UploadPhase::Complete;
                upload.actual_name = Some(name);
            }
            Err(ApiError::FileMismatch(_)) => received.clear(),
            Err(e) => return Err(e),
        }
    }
    let complete = upload.phase == UploadPhase::Complete;
    if complete {
        received = (0..upload.meta.chunk_count).collect();
    }
    Ok(axum::Json(UploadStatus {
        upload_id,
        received_chunks: received,
        complete,
        actual_filename: if complete { upload.actual_name } else { None },
    })
    .into_response())
}

/// The headers of the resumable extension, parsed and checked against each other.
struct Extension {
    upload_id: String,
    offset: u64,
    chunk_sha256: String,
    meta: FileMeta,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v.as_bytes())
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("header {name} is not valid UTF-8"))),
    }
}

fn required<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    header_str(headers, name)?.ok_or_else(|| {
        ApiError::BadRequest(format!(
            "header {name} is required with X-Upload-Id (the resumable extension)"
        ))
    })
}

fn number(headers: &HeaderMap, name: &str, value: &str) -> Result<u64, ApiError> {
    let _ = headers;
    value.trim().parse::<u64>().map_err(|_| {
        ApiError::BadRequest(format!(
            "header {name} must be a non-negative integer, got {value:?}"
        ))
    })
}

fn parse_extension(
    headers: &HeaderMap,
    upload_id: &str,
    client_name: &str,
    chunk_idx: u64,
) -> Result<Extension, ApiError> {
    if !protocol::is_valid_upload_id(upload_id) {
        return Err(ApiError::BadRequest(
            "header X-Upload-Id must be 16 to 64 of [A-Za-z0-9_-]".to_owned(),
        ));
    }
    let offset = number(
        headers,
        "X-Chunk-Offset",
        required(headers, protocol::CHUNK_OFFSET)?,
    )?;
    let file_size = number(
        headers,
        "X-File-Size",
        required(headers, protocol::FILE_SIZE)?,
    )?;
    let chunk_count = number(
        headers,
        "X-Chunk-Count",
        required(headers, protocol::CHUNK_COUNT)?,
    )?;
    let sha = |name: &str, value: &str| {
        protocol::parse_sha256_hex(value)
            .ok_or_else(|| ApiError::BadRequest(format!("header {name} must be 64 hex digits")))
    };
    let chunk_sha256 = sha("X-Chunk-Sha256", required(headers, protocol::CHUNK_SHA256)?)?;
    let file_sha256 = sha("X-File-Sha256", required(headers, protocol::FILE_SHA256)?)?;
    if chunk_count == 0 {
        return Err(ApiError::BadRequest(
            "header X-Chunk-Count must be at least 1 (an empty file is one empty chunk)".to_owned(),
        ));
    }
    if chunk_idx >= chunk_count {
        return Err(ApiError::BadRequest(format!(
            "X-Chunk-Index {chunk_idx} is not below X-Chunk-Count {chunk_count}"
        )));
    }
    if offset > file_size {
        return Err(ApiError::BadRequest(format!(
            "X-Chunk-Offset {offset} is beyond X-File-Size {file_size}"
        )));
    }
    Ok(Extension {
        upload_id: upload_id.to_owned(),
        offset,
        chunk_sha256,
        meta: FileMeta {
            client_name: client_name.to_owned(),
            file_size,
            chunk_count,
            file_sha256,
        },
    })
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

async fn upload(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !receiver.authorized(&headers) {
        return Err(ApiError::Unauthorized);
    }
    let client_name = header_str(&headers, protocol::FILE_NAME)
        .map_err(|_| ApiError::InvalidName("Filename must be valid UTF-8".to_owned()))?
        .unwrap_or(protocol::DEFAULT_FILE_NAME)
        .to_owned();
    let chunk_idx = match header_str(&headers, protocol::CHUNK_INDEX)? {
        None => 0,
        Some(v) => number(&headers, "X-Chunk-Index", v)?,
    };
    if let Some(len) = content_length(&headers)
        && len > receiver.inner.max_chunk_bytes
    {
        if len - receiver.inner.max_chunk_bytes <= body::DRAIN_BYTES {
            body::drain(body).await;
        }
        return Err(too_large_chunk(receiver.inner.max_chunk_bytes));
    }
    match header_str(&headers, protocol::UPLOAD_ID)? {
        Some(upload_id) => {
            let ext = parse_extension(&headers, upload_id, &client_name, chunk_idx)?;
            receive_resumable(receiver, ext, chunk_idx, content_length(&headers), body).await
        }
        None => receive_v1(receiver, client_name, chunk_idx, body).await,
    }
}

fn too_large_chunk(limit: u64) -> ApiError {
    ApiError::TooLarge(format!(
        "a chunk may be at most {limit} bytes (server max_chunk_bytes); send smaller chunks"
    ))
}

fn too_large_file(limit: u64) -> ApiError {
    ApiError::TooLarge(format!(
        "a file may be at most {limit} bytes (server max_file_bytes)"
    ))
}

async fn receive_resumable(
    receiver: Receiver,
    ext: Extension,
    chunk_idx: u64,
    declared_len: Option<u64>,
    body: Body,
) -> Result<Response, ApiError> {
    let inner = &receiver.inner;
    if inner.max_file_bytes > 0 && ext.meta.file_size > inner.max_file_bytes {
        return Err(too_large_file(inner.max_file_bytes));
    }
    let room = ext.meta.file_size - ext.offset;
    if let Some(len) = declared_len
        && len > room
    {
        return Err(ApiError::BadRequest(format!(
            "the chunk ({len} bytes at offset {}) extends past X-File-Size {}",
            ext.offset, ext.meta.file_size
        )));
    }
    // Refuse a bad name before storing anything.
    receiver.destination(&ext.meta.client_name)?;

    let state = inner.state.clone();
    let (id, meta) = (ext.upload_id.clone(), ext.meta.clone());
    let upload = blocking(move || state.get_or_create_upload(&id, &meta)).await?;
    if upload.meta != ext.meta {
        return Err(ApiError::Conflict(format!(
            "upload id {} is in use for another file ({:?}, {} bytes, {} chunks); use a new upload id",
            ext.upload_id, upload.meta.client_name, upload.meta.file_size, upload.meta.chunk_count
        )));
    }
    let reply = |message: &str, duplicate: bool, actual: Option<String>, received: Option<u64>| {
        let complete = actual.is_some();
        axum::Json(ChunkReply {
            message: message.to_owned(),
            actual_filename: actual,
            chunk_index: chunk_idx,
            client_filename: ext.meta.client_name.clone(),
            upload_id: Some(ext.upload_id.clone()),
            complete: Some(complete),
            duplicate,
            received_chunks: received,
        })
        .into_response()
    };
    let limit = inner.max_chunk_bytes.min(room);
    let too_long = |_| {
        if inner.max_chunk_bytes < room {
            too_large_chunk(inner.max_chunk_bytes)
        } else {
            ApiError::BadRequest(format!(
                "the chunk at offset {} extends past X-File-Size {}",
                ext.offset, ext.meta.file_size
            ))
        }
    };

    let chunk_guard = inner
        .locks
        .lock(format!("{}#{chunk_idx}", ext.upload_id))
        .await;
    // The phase is read under the lock: a batch may have completed the upload
    // while this request waited for it.
    let state = inner.state.clone();
    let id = ext.upload_id.clone();
    let (phase, recorded) = blocking(move || {
        let phase = state.upload(&id)?.map(|u| u.phase);
        Ok::<_, state::StateError>((phase, state.chunk(&id, chunk_idx)?))
    })
    .await?;
    match phase {
        Some(UploadPhase::Receiving) => {}
        Some(_) => {
            // The reply to the last chunk was lost, or the receiver stopped
            // while completing: answer as before, never write a second copy.
            drop(chunk_guard);
            let _ = read_body(body, None, limit, inner.read_timeout).await;
            let name = receiver.finalize(&ext.upload_id).await?;
            return Ok(reply(
                "Upload complete",
                true,
                Some(name),
                Some(ext.meta.chunk_count),
            ));
        }
        None => {
            return Err(ApiError::Internal(format!(
                "upload {} was discarded while this chunk waited; send it again",
                ext.upload_id
            )));
        }
    }
    let (duplicate, received, chunk_guard) = if let Some(recorded) = recorded {
        if recorded.sha256 != ext.chunk_sha256 || recorded.offset != ext.offset {
            return Err(ApiError::Conflict(format!(
                "chunk {chunk_idx} of upload {} was already received with different content",
                ext.upload_id
            )));
        }
        let outcome = read_body(body, None, limit, inner.read_timeout)
            .await
            .map_err(|e| body_error(e, too_long))?;
        if outcome.sha256 != ext.chunk_sha256 {
            return Err(checksum_mismatch(chunk_idx, &outcome.sha256));
        }
        let state = inner.state.clone();
        let id = ext.upload_id.clone();
        let count = blocking(move || state.chunks(&id).map(|c| c.len() as u64)).await?;
        (true, count, chunk_guard)
    } else {
        // From here until the chunk is recorded, leaving early (an error, or
        // the client gone) means bytes of unknown content may have been
        // written: the whole-file hash cannot be trusted. The guard holds the
        // chunk's lock, and goes with the bytes to the thread that writes
        // them, so that neither the lock nor the hash is let go before that
        // thread's last write, even when this request is dropped.
        let unrecorded = Unrecorded {
            receiver: receiver.clone(),
            upload_id: ext.upload_id.clone(),
            chunk_lock: Some(chunk_guard),
            recorded: false,
        };
        let staging_path = inner.staging_path.join(&ext.upload_id);
        let file = blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(staging_path)
        })
        .await?;
        let claim = inner
            .hashes
            .claim(&ext.upload_id, chunk_idx, ext.offset, ext.meta.chunk_count);
        let sink = Sink {
            file,
            offset: ext.offset,
            sync: false,
            claim,
        };
        let (outcome, unrecorded) =
            body::write_body(body, Some(sink), unrecorded, limit, inner.read_timeout)
                .await
                .map_err(|e| body_error(e, too_long))?;
        if outcome.sha256 != ext.chunk_sha256 {
            return Err(checksum_mismatch(chunk_idx, &outcome.sha256));
        }
        let record = ChunkRecord {
            chunk_idx,
            offset: ext.offset,
            length: outcome.length,
            sha256: outcome.sha256,
        };
        let this = receiver.clone();
        let id = ext.upload_id.clone();
        let claim = outcome.claim;
        let count = blocking(move || {
            let count = this.inner.state.record_chunk(&id, &record)?;
            if let Some(claim) = claim {
                this.inner
                    .hashes
                    .extend(&id, claim, record.length, &record.sha256);
            }
            this.catch_up_hash(&id);
            Ok::<_, state::StateError>(count)
        })
        .await?;
        let chunk_guard = unrecorded.disarm();
        tracing::debug!(upload_id = %ext.upload_id, chunk = chunk_idx, bytes = outcome.length, "chunk recorded");
        (false, count, chunk_guard)
    };
    drop(chunk_guard);

    if received == ext.meta.chunk_count {
        let name = receiver.finalize(&ext.upload_id).await?;
        return Ok(reply(
            "Upload complete",
            duplicate,
            Some(name),
            Some(received),
        ));
    }
    Ok(reply("Chunk received", duplicate, None, Some(received)))
}

/// `POST /upload/batch`: whole small files, many per request. The body is a
/// JSON manifest of `X-Manifest-Length` bytes, then the files' bytes back to
/// back. Each file is treated as the single chunk of its upload id, so a file
/// may move between batches and single requests across retries; the reply
/// gives each file the answer a single request would have had. The files that
/// are new share their syncs: one per file's data (started as each file is
/// written), one commit for all their final names, one per directory.
async fn receive_batch(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !receiver.authorized(&headers) {
        return Err(ApiError::Unauthorized);
    }
    let manifest_len = match header_str(&headers, protocol::MANIFEST_LENGTH)? {
        Some(v) => number(&headers, "X-Manifest-Length", v)?,
        None => {
            return Err(ApiError::BadRequest(
                "header X-Manifest-Length is required: a batch body opens with a JSON manifest of that many bytes".to_owned(),
            ));
        }
    };
    if manifest_len == 0 || manifest_len > protocol::MAX_MANIFEST_BYTES {
        return Err(ApiError::BadRequest(format!(
            "X-Manifest-Length must be between 1 and {} bytes, got {manifest_len}",
            protocol::MAX_MANIFEST_BYTES
        )));
    }
    let limit = manifest_len + receiver.inner.max_chunk_bytes;
    if let Some(len) = content_length(&headers)
        && len > limit
    {
        if len - limit <= body::DRAIN_BYTES {
            body::drain(body).await;
        }
        return Err(too_large_batch(receiver.inner.max_chunk_bytes));
    }
    let inner = &receiver.inner;
    let (max_bytes, idle) = (inner.max_chunk_bytes, inner.read_timeout);
    let too_long = |_| too_large_batch(max_bytes);
    let mut body = body;
    let (raw, rest) = body::read_prefix(&mut body, manifest_len as usize, idle)
        .await
        .map_err(|e| body_error(e, too_long))?;
    let entries = blocking(move || parse_manifest(&raw, max_bytes)).await?;

    let guards = inner
        .locks
        .lock_uploads(entries.iter().map(|(e, _)| e.upload_id.as_str()))
        .await;
    let this = receiver.clone();
    let results = stream_body(body, rest, max_bytes, idle, move |frames| {
        let results = this.batch_blocking(&entries, frames);
        drop(guards);
        results
    })
    .await
    .map_err(|e| body_error(e, too_long))??;
    Ok(axum::Json(BatchReply { files: results }).into_response())
}

fn too_large_batch(limit: u64) -> ApiError {
    ApiError::TooLarge(format!(
        "a batch may carry at most {limit} bytes of files (server max_chunk_bytes); send fewer files per batch"
    ))
}

/// What a batch does with one of its files.
enum BatchPlan {
    /// New: to be written to its staging file (open), verified, then
    /// recorded and renamed with the others.
    Write {
        file: File,
        dest: Destination,
    },
    /// Written and verified (the staging file is closed again, so that a batch
    /// holds no descriptor per file).
    New {
        dest: Destination,
    },
    /// Known already (complete, finalizing, or every chunk recorded): `finalize` answers.
    Known,
    Refused(ApiError),
}

impl Receiver {
    /// The blocking half of [`receive_batch`], with the locks of every file
    /// held: reads the files from `frames`, then records and renames the new
    /// ones together.
    fn batch_blocking(
        &self,
        entries: &[(BatchEntry, FileMeta)],
        frames: &mut Frames,
    ) -> Result<Vec<BatchResult>, ApiError> {
        use std::io::Read;
        let mut plans = Vec::with_capacity(entries.len());
        let mut failure = None;
        for (entry, meta) in entries {
            let plan = match self.plan_batch_entry(entry, meta) {
                Ok(plan) => plan,
                Err(e) => BatchPlan::Refused(e),
            };
            let plan = match plan {
                BatchPlan::Write { file, dest } => match receive_batch_file(frames, &file, entry) {
                    Ok(None) => {
                        body::start_writeback(&file, 0, 0);
                        BatchPlan::New { dest }
                    }
                    Ok(Some(refusal)) => {
                        self.discard_staged(&entry.upload_id);
                        BatchPlan::Refused(refusal)
                    }
                    Err(e) => {
                        self.discard_staged(&entry.upload_id);
                        failure = Some(e);
                        BatchPlan::Known
                    }
                },
                other => {
                    if let Err(e) = skip_bytes(frames, entry.size) {
                        failure = Some(e);
                    }
                    other
                }
            };
            plans.push(plan);
            if failure.is_some() {
                break;
            }
        }
        if failure.is_none() && frames.read(&mut [0u8; 1]).unwrap_or(0) != 0 {
            failure = Some(ApiError::BadRequest(
                "the body is longer than the files the manifest lists".to_owned(),
            ));
        }
        // A body cut off (or over its limit) right after the last file is no
        // batch either: its error is the reply, so nothing may be recorded.
        if failure.is_none() && !frames.ended_cleanly() {
            failure = Some(ApiError::BadRequest(
                "the request body did not end cleanly".to_owned(),
            ));
        }
        if let Some(e) = failure {
            for ((entry, _), plan) in entries.iter().zip(&plans) {
                if matches!(plan, BatchPlan::New { .. }) {
                    self.discard_staged(&entry.upload_id);
                }
            }
            return Err(e);
        }

        let mut results: Vec<Option<Result<(String, bool), ApiError>>> = Vec::new();
        let mut known = vec![false; plans.len()];
        let mut fresh = Vec::new();
        for (i, plan) in plans.into_iter().enumerate() {
            match plan {
                BatchPlan::New { dest } | BatchPlan::Write { dest, .. } => {
                    fresh.push((i, dest));
                    results.push(None);
                }
                BatchPlan::Known => {
                    known[i] = true;
                    results.push(None);
                }
                BatchPlan::Refused(e) => results.push(Some(Err(e))),
            }
        }
        for (i, outcome) in self.finalize_batch(entries, fresh) {
            results[i] = Some(outcome.map(|name| (name, false)));
        }
        // Files known before (and new ones whose name was taken) finish one by one.
        for (i, slot) in results.iter_mut().enumerate() {
            if slot.is_none() {
                let id = &entries[i].0.upload_id;
                *slot = Some(self.finalize_blocking(id).map(|name| (name, known[i])));
            }
        }
        Ok(entries
            .iter()
            .zip(results)
            .map(|((entry, _), result)| batch_result(&entry.upload_id, result))
            .collect())
    }

    /// Decides, from the recorded state, what to do with a batch's file.
    fn plan_batch_entry(&self, entry: &BatchEntry, meta: &FileMeta) -> Result<BatchPlan, ApiError> {
        let inner = &self.inner;
        if inner.max_file_bytes > 0 && entry.size > inner.max_file_bytes {
            return Err(too_large_file(inner.max_file_bytes));
        }
        let dest = self.destination(&entry.file_name)?;
        if let Some(upload) = inner.state.upload(&entry.upload_id)? {
            if upload.meta != *meta {
                return Err(ApiError::Conflict(format!(
                    "upload id {} is in use for another file ({:?}, {} bytes, {} chunks); use a new upload id",
                    entry.upload_id,
                    upload.meta.client_name,
                    upload.meta.file_size,
                    upload.meta.chunk_count
                )));
            }
            if upload.phase != UploadPhase::Receiving {
                return Ok(BatchPlan::Known);
            }
            if let Some(chunk) = inner.state.chunk(&entry.upload_id, 0)? {
                if chunk.sha256 != entry.sha256 {
                    return Err(ApiError::Conflict(format!(
                        "chunk 0 of upload {} was already received with different content",
                        entry.upload_id
                    )));
                }
                return Ok(BatchPlan::Known);
            }
        }
        inner.hashes.forget(&entry.upload_id);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(inner.staging_path.join(&entry.upload_id))?;
        Ok(BatchPlan::Write { file, dest })
    }

    fn discard_staged(&self, upload_id: &str) {
        self.inner.hashes.forget(upload_id);
        let _ = rustix::fs::unlinkat(&self.inner.staging, upload_id, rustix::fs::AtFlags::empty());
    }

    /// Extends the upload's whole-file hash over chunks recorded ahead of it.
    fn catch_up_hash(&self, upload_id: &str) {
        let inner = &self.inner;
        inner.hashes.catch_up(
            upload_id,
            || File::open(inner.staging_path.join(upload_id)),
            |idx| {
                inner
                    .state
                    .chunk(upload_id, idx)
                    .map(|c| c.map(|c| (c.offset, c.length)))
            },
        );
    }

    /// Makes the new files of a batch durable and puts them in place: their
    /// data, then the staging directory, then one synced commit of all their
    /// final names, the renames, and one sync per directory. Returns the final
    /// name or the refusal of each file it settled, by position; a file whose
    /// name was taken is left recorded as finalizing, for `finalize`.
    fn finalize_batch(
        &self,
        entries: &[(BatchEntry, FileMeta)],
        fresh: Vec<(usize, Destination)>,
    ) -> Vec<(usize, Result<String, ApiError>)> {
        let inner = &self.inner;
        let mut settled = Vec::new();
        let refuse = |i: usize, e: ApiError, settled: &mut Vec<_>| {
            self.discard_staged(&entries[i].0.upload_id);
            settled.push((i, Err(e)));
        };
        // The data (writeback started as each file was written), and where
        // each file goes (directories created as needed) before anything is
        // recorded.
        let mut parents: HashMap<Vec<String>, OwnedFd> = HashMap::new();
        let mut durable = Vec::new();
        for (i, dest) in fresh {
            let staged = inner.staging_path.join(&entries[i].0.upload_id);
            if let Err(e) = File::open(&staged).and_then(|f| f.sync_data()) {
                refuse(i, e.into(), &mut settled);
                continue;
            }
            if !parents.contains_key(&dest.dirs) {
                match paths::open_parent(&inner.root, &dest) {
                    Ok(fd) => {
                        parents.insert(dest.dirs.clone(), fd);
                    }
                    Err(e) => {
                        refuse(i, open_error(e), &mut settled);
                        continue;
                    }
                }
            }
            durable.push((i, dest));
        }
        if durable.is_empty() {
            return settled;
        }
        let fail_all = |durable: Vec<(usize, Destination)>, e: ApiError, settled: &mut Vec<_>| {
            for (i, _) in durable {
                refuse(i, e.clone(), settled);
            }
        };
        if let Err(e) = paths::fsync_dir(&inner.staging) {
            fail_all(durable, e.into(), &mut settled);
            return settled;
        }
        let records: Vec<_> = durable
            .iter()
            .map(|(i, dest)| {
                let (entry, meta) = &entries[*i];
                let chunk = ChunkRecord {
                    chunk_idx: 0,
                    offset: 0,
                    length: entry.size,
                    sha256: entry.sha256.clone(),
                };
                (entry.upload_id.clone(), meta.clone(), chunk, dest.display())
            })
            .collect();
        if let Err(e) = inner.state.record_finalizing(&records) {
            fail_all(durable, e.into(), &mut settled);
            return settled;
        }
        crate::failpoint::hit(crate::failpoint::SERVER_BEFORE_RENAME);
        let mut renamed = Vec::new();
        for (i, dest) in durable {
            let id = &entries[i].0.upload_id;
            let parent = &parents[&dest.dirs];
            match paths::rename_no_replace(&inner.staging, id, parent, &dest.name) {
                Ok(true) => renamed.push((i, dest.display())),
                // The name is taken: `finalize` picks the next free one.
                Ok(false) => {}
                // Recorded as finalizing: `finalize` tries again.
                Err(e) => settled.push((i, Err(e.into()))),
            }
        }
        let synced = parents
            .values()
            .chain(std::iter::once(&inner.staging))
            .try_for_each(paths::fsync_dir);
        crate::failpoint::hit(crate::failpoint::SERVER_AFTER_RENAME);
        let done: Vec<(String, String)> = renamed
            .iter()
            .map(|(i, name)| (entries[*i].0.upload_id.clone(), name.clone()))
            .collect();
        let completed = synced
            .map_err(ApiError::from)
            .and_then(|()| inner.state.complete_many(&done).map_err(ApiError::from));
        for (i, name) in renamed {
            match &completed {
                Ok(()) => {
                    let (entry, _) = &entries[i];
                    tracing::info!(upload_id = %entry.upload_id, client_name = %entry.file_name, file = %name, size = entry.size, "file complete");
                    settled.push((i, Ok(name)));
                }
                Err(e) => settled.push((i, Err(e.clone()))),
            }
        }
        settled
    }
}

/// Parses a batch manifest and checks it as a whole: entry count, upload ids
/// (valid and distinct), hashes and total size. Returns each entry with its
/// file's metadata.
fn parse_manifest(raw: &[u8], max_bytes: u64) -> Result<Vec<(BatchEntry, FileMeta)>, ApiError> {
    let manifest: BatchManifest = serde_json::from_slice(raw).map_err(|e| {
        ApiError::BadRequest(format!(
            "the batch manifest is not valid JSON of the form {{\"files\": [{{\"uploadId\", \"fileName\", \"size\", \"sha256\"}}]}}: {e}"
        ))
    })?;
    let n = manifest.files.len();
    if n == 0 || n > protocol::MAX_BATCH_FILES {
        return Err(ApiError::BadRequest(format!(
            "a batch lists 1 to {} files, this one {n}",
            protocol::MAX_BATCH_FILES
        )));
    }
    let total: u64 = manifest
        .files
        .iter()
        .map(|f| f.size)
        .fold(0, u64::saturating_add);
    if total > max_bytes {
        return Err(too_large_batch(max_bytes));
    }
    let mut seen = std::collections::HashSet::new();
    let mut entries = Vec::with_capacity(n);
    for mut entry in manifest.files {
        if !protocol::is_valid_upload_id(&entry.upload_id) {
            return Err(ApiError::BadRequest(format!(
                "upload id {:?} in the manifest is not 16 to 64 of [A-Za-z0-9_-]",
                entry.upload_id
            )));
        }
        if !seen.insert(entry.upload_id.clone()) {
            return Err(ApiError::BadRequest(format!(
                "upload id {} appears twice in the manifest",
                entry.upload_id
            )));
        }
        entry.sha256 = protocol::parse_sha256_hex(&entry.sha256).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "sha256 of upload {} in the manifest must be 64 hex digits",
                entry.upload_id
            ))
        })?;
        let meta = FileMeta {
            client_name: entry.file_name.clone(),
            file_size: entry.size,
            chunk_count: 1,
            file_sha256: entry.sha256.clone(),
        };
        entries.push((entry, meta));
    }
    Ok(entries)
}

/// Copies one file of a batch body into its staging file, hashing it.
/// `Ok(Some(_))`: the bytes arrived but the file is refused (hash mismatch,
/// write error); `Err`: the body itself failed, and the batch with it.
fn receive_batch_file(
    frames: &mut Frames,
    file: &File,
    entry: &BatchEntry,
) -> Result<Option<ApiError>, ApiError> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut left = entry.size;
    let mut offset = 0u64;
    let mut write_error = None;
    let mut buf = vec![0u8; left.clamp(1, 64 << 10) as usize];
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = frames.read(&mut buf[..want])?;
        if n == 0 {
            return Err(ApiError::BadRequest(format!(
                "the body ended inside file {} of the batch ({left} of {} bytes missing)",
                entry.upload_id, entry.size
            )));
        }
        hasher.update(&buf[..n]);
        if write_error.is_none()
            && let Err(e) = file.write_all_at(&buf[..n], offset)
        {
            write_error = Some(ApiError::from(e));
        }
        offset += n as u64;
        left -= n as u64;
    }
    if let Some(e) = write_error {
        return Ok(Some(e));
    }
    let actual = hex::encode(hasher.finalize());
    if actual != entry.sha256 {
        return Ok(Some(checksum_mismatch(0, &actual)));
    }
    Ok(None)
}

/// Reads and drops the `size` bytes of a file the batch does not write.
fn skip_bytes(frames: &mut Frames, size: u64) -> Result<(), ApiError> {
    let copied = io::copy(&mut std::io::Read::take(frames, size), &mut io::sink())?;
    if copied < size {
        return Err(ApiError::BadRequest(
            "the body ended before the files the manifest lists".to_owned(),
        ));
    }
    Ok(())
}

fn batch_result(upload_id: &str, result: Option<Result<(String, bool), ApiError>>) -> BatchResult {
    match result {
        Some(Ok((name, duplicate))) => BatchResult {
            upload_id: upload_id.to_owned(),
            complete: true,
            actual_filename: Some(name),
            duplicate,
            status: None,
            error: None,
            message: None,
        },
        Some(Err(e)) => {
            let reply = e.reply();
            BatchResult {
                upload_id: upload_id.to_owned(),
                complete: false,
                actual_filename: None,
                duplicate: false,
                status: Some(e.status().as_u16()),
                error: Some(reply.error),
                message: reply.message,
            }
        }
        None => BatchResult {
            upload_id: upload_id.to_owned(),
            complete: false,
            actual_filename: None,
            duplicate: false,
            status: Some(500),
            error: Some("Internal error".to_owned()),
            message: Some("the receiver did not settle this file; ask GET /upload/<id>".to_owned()),
        },
    }
}

/// Spoils an upload's whole-file hash when dropped before [`Self::disarm`]
/// (a chunk write that is not recorded may have left anything in the file),
/// then releases the chunk's lock.
struct Unrecorded {
    receiver: Receiver,
    upload_id: String,
    chunk_lock: Option<tokio::sync::OwnedMutexGuard<()>>,
    recorded: bool,
}

impl Unrecorded {
    /// The chunk is recorded: hands back its lock.
    fn disarm(mut self) -> tokio::sync::OwnedMutexGuard<()> {
        self.recorded = true;
        self.chunk_lock
            .take()
            .expect("the lock is held until disarmed")
    }
}

impl Drop for Unrecorded {
    fn drop(&mut self) {
        if !self.recorded {
            self.receiver.inner.hashes.spoil(&self.upload_id);
        }
    }
}

fn checksum_mismatch(chunk_idx: u64, actual: &str) -> ApiError {
    ApiError::Unprocessable(format!(
        "chunk {chunk_idx} has SHA-256 {actual}, not the X-Chunk-Sha256 sent; nothing was recorded, send the chunk again"
    ))
}

async fn receive_v1(
    receiver: Receiver,
    client_name: String,
    chunk_idx: u64,
    body: Body,
) -> Result<Response, ApiError> {
    let inner = &receiver.inner;
    let dest = receiver.destination(&client_name)?;
    let _guard = inner.locks.lock(format!("v1:{client_name}")).await;

    let reply = |actual: &str, duplicate: bool| {
        axum::Json(ChunkReply {
            message: "Chunk received".to_owned(),
            actual_filename: Some(actual.to_owned()),
            chunk_index: chunk_idx,
            client_filename: client_name.clone(),
            upload_id: None,
            complete: None,
            duplicate,
            received_chunks: None,
        })
        .into_response()
    };
    let limits = |size: u64| {
        let file_room = if inner.max_file_bytes > 0 {
            inner.max_file_bytes.saturating_sub(size)
        } else {
            u64::MAX
        };
        let too_long = move |_| {
            if inner.max_chunk_bytes <= file_room {
                too_large_chunk(inner.max_chunk_bytes)
            } else {
                too_large_file(inner.max_file_bytes)
            }
        };
        (inner.max_chunk_bytes.min(file_room), too_long)
    };

    if chunk_idx == 0 {
        // Chunk 0 always starts a new file under a unique name, so a later upload
        // of the same name never appends to an earlier file. It is received into
        // staging first: a refused or interrupted chunk leaves nothing behind.
        let staged_name = format!("v1-{}", paths::random_hex(12));
        let this = receiver.clone();
        let staged = staged_name.clone();
        let file = blocking(move || paths::create_new(&this.inner.staging, &staged)).await?;
        let (limit, too_long) = limits(0);
        let outcome = match read_body(
            body,
            Some(Sink {
                file,
                offset: 0,
                sync: true,
                claim: None,
            }),
            limit,
            inner.read_timeout,
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                let _ = rustix::fs::unlinkat(
                    &inner.staging,
                    staged_name.as_str(),
                    rustix::fs::AtFlags::empty(),
                );
                return Err(body_error(e, too_long));
            }
        };
        let this = receiver.clone();
        let name = client_name.clone();
        let session =
            blocking(move || this.start_v1_session(&name, &dest, &staged_name, outcome)).await?;
        tracing::debug!(client_name = %client_name, file = %session.actual_name, bytes = session.size, "v1 upload started");
        return Ok(reply(&session.actual_name, false));
    }

    let state = inner.state.clone();
    let name = client_name.clone();
    let session = blocking(move || state.v1_session(&name))
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "no upload of {client_name:?} is in progress; start with chunk 0"
            ))
        })?;
    let (limit, too_long) = limits(session.size);

    if chunk_idx == session.next_idx {
        let this = receiver.clone();
        let actual = session.actual_name.clone();
        let size = session.size;
        let file = blocking(move || this.reopen_v1_file(&actual, size)).await?;
        let rollback = file.try_clone()?;
        let outcome = match read_body(
            body,
            Some(Sink {
                file,
                offset: size,
                sync: true,
                claim: None,
            }),
            limit,
            inner.read_timeout,
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                // Cut off what the refused chunk wrote, so the file never holds a
                // partial chunk as if it had arrived.
                let _ = tokio::task::spawn_blocking(move || rollback.set_len(size)).await;
                return Err(body_error(e, too_long));
            }
        };
        let updated = V1Session {
            next_idx: session.next_idx + 1,
            size: session.size + outcome.length,
            last_sha256: Some(outcome.sha256),
            ..session.clone()
        };
        let state = inner.state.clone();
        blocking(move || state.put_v1_session(&updated)).await?;
        tracing::debug!(client_name = %client_name, file = %session.actual_name, chunk = chunk_idx, bytes = outcome.length, "v1 chunk appended");
        Ok(reply(&session.actual_name, false))
    } else if chunk_idx + 1 == session.next_idx {
        // The previous reply was lost and the client sent the chunk again.
        let outcome = read_body(body, None, inner.max_chunk_bytes, inner.read_timeout)
            .await
            .map_err(|e| body_error(e, too_long))?;
        if session.last_sha256.as_deref() == Some(outcome.sha256.as_str()) {
            Ok(reply(&session.actual_name, true))
        } else {
            Err(ApiError::Conflict(format!(
                "chunk {chunk_idx} of {client_name:?} was already received with different content; start again with chunk 0"
            )))
        }
    } else {
        Err(ApiError::Conflict(format!(
            "chunk {chunk_idx} of {client_name:?} is out of order: the next expected chunk is {}",
            session.next_idx
        )))
    }
}

impl Receiver {
    /// Moves a received chunk 0 from staging to a free name at `dest` and records
    /// the new session.
    fn start_v1_session(
        &self,
        client_name: &str,
        dest: &Destination,
        staged_name: &str,
        first_chunk: body::BodyOutcome,
    ) -> Result<V1Session, ApiError> {
        let inner = &self.inner;
        let parent = paths::open_parent(&inner.root, dest).map_err(open_error)?;
        let millis = paths::now_millis();
        for attempt in 0..10_000u32 {
            let name = paths::unique_candidate(&dest.name, millis, attempt);
            if paths::rename_no_replace(&inner.staging, staged_name, &parent, &name)? {
                paths::fsync_dir(&parent)?;
                let session = V1Session {
                    client_name: client_name.to_owned(),
                    actual_name: dest.with_name(name).display(),
                    next_idx: 1,
                    size: first_chunk.length,
                    last_sha256: Some(first_chunk.sha256),
                };
                inner.state.put_v1_session(&session)?;
                return Ok(session);
            }
        }
        let _ = rustix::fs::unlinkat(&inner.staging, staged_name, rustix::fs::AtFlags::empty());
        Err(ApiError::Internal(format!(
            "no free name for {} in the output directory",
            dest.display()
        )))
    }

    /// Opens the file of a v1 session and cuts off whatever an interrupted chunk
    /// left after the last recorded byte.
    fn reopen_v1_file(&self, actual_name: &str, size: u64) -> Result<File, ApiError> {
        let dest = destination_from_display(actual_name);
        let parent = paths::open_parent(&self.inner.root, &dest).map_err(open_error)?;
        let file = match paths::open_existing(&parent, &dest.name) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ApiError::Conflict(format!(
                    "{actual_name} was removed from the output directory during its upload; start again with chunk 0"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        file.set_len(size)?;
        Ok(file)
    }
}

/// Async mutexes by key (an upload id, a chunk, a v1 client name), created on
/// demand and dropped when nobody holds them.
#[derive(Default)]
struct KeyedLocks {
    map: std::sync::Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    async fn lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let mutex = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
                map.retain(|_, weak| weak.strong_count() > 0);
            }
            match map.get(&key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key, Arc::downgrade(&m));
                    m
                }
            }
        };
        mutex.lock_owned().await
    }

    /// The locks a single request takes on the way for each of `ids` (its
    /// first chunk, then the upload), held together: taken in id order, so
    /// that two holders of several cannot wait on each other.
    async fn lock_uploads<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mut ids: Vec<&str> = ids.into_iter().collect();
        ids.sort_unstable();
        let mut guards = Vec::with_capacity(ids.len() * 2);
        for id in ids {
            guards.push(self.lock(format!("{id}#0")).await);
            guards.push(self.lock(id.to_owned()).await);
        }
        guards
    }
}

/// Binds the listener for `addr`, with a message that says what to do on failure.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}
