//! The client side: sending a buffered file's chunks to a receiver, the retry
//! schedule, and the uploader loop that drains the buffer.
//!
//! Every chunk carries the resumable extension headers; a v1 receiver ignores
//! them and gets a file's chunks in order, one at a time. When a receiver
//! announces the extension (`X-IndexedCP-Resumable: 1`) a file's chunks go a
//! few at a time, and a resumed file first asks `GET /upload/<id>` and skips
//! what arrived. When it also announces batches (`X-IndexedCP-Batch`), small
//! files that are due together share one request ([`plan_attempts`],
//! [`upload_batch`]). A file's data leaves the buffer only when the receiver
//! confirmed the whole file. [`UploadError::retry`] is the
//! one place that decides between retrying and parking. No SQL here: the store
//! does that, always off the executor.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::store::{self, ChunkMeta, Durability, FileRecord, Store, StoreError};
use crate::config::TargetConfig;
use crate::protocol::{
    self, BatchEntry, BatchManifest, BatchReply, ChunkReply, ErrorReply, UploadStatus,
};

/// The retry schedule: `min(initial * multiplier^(n-1), max)` for the n-th retry,
/// plus up to 10 % jitter (never beyond `max`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BackoffError {
    #[error("initial retry delay {initial:?} is larger than the maximum {max:?}")]
    InitialAboveMax { initial: Duration, max: Duration },
    #[error("retry multiplier {0} must be a finite number of at least 1")]
    Multiplier(f64),
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, multiplier: f64) -> Result<Backoff, BackoffError> {
        if initial > max {
            return Err(BackoffError::InitialAboveMax { initial, max });
        }
        if !multiplier.is_finite() || multiplier < 1.0 {
            return Err(BackoffError::Multiplier(multiplier));
        }
        Ok(Backoff {
            initial,
            max,
            multiplier,
        })
    }

    pub fn of(target: &TargetConfig) -> Backoff {
        Backoff {
            initial: target.initial_retry_delay,
            max: target.max_retry_delay,
            multiplier: target.retry_multiplier,
        }
    }

    /// The delay before retry number `n` (1-based), without jitter.
    pub fn delay(&self, n: u64) -> Duration {
        let exponent = n.saturating_sub(1).min(1_000) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// [`Backoff::delay`] plus `jitter` (in [0, 1)) times 10 %, capped at the maximum.
    pub fn delay_with_jitter(&self, n: u64, jitter: f64) -> Duration {
        let base = self.delay(n);
        base.mul_f64(1.0 + 0.1 * jitter.clamp(0.0, 1.0))
            .min(self.max.max(base))
    }
}

fn random_unit() -> f64 {
    let mut buf = [0u8; 8];
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    (u64::from_le_bytes(buf) >> 11) as f64 / (1u64 << 53) as f64
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        error: String,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{url} sent an unexpected reply: {message}")]
    Protocol { url: String, message: String },
    #[error("cannot send {what}: {message}")]
    Request { what: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Retry {
    /// Retry on the backoff schedule.
    Backoff,
    /// Retry on the schedule, but not before this (429/503 `Retry-After`).
    NotBefore(Duration),
    /// A configuration problem (key, URL): retry at the maximum delay, so that
    /// fixing the config and reloading resumes delivery.
    AtMaximum,
    /// Like `Backoff`, and the receiver discarded the file: send every chunk again.
    Restart,
    /// Permanent: park the file as failed until an operator retries it.
    Never,
}

impl UploadError {
    /// The same error again, for each file of a batch it ended. (A buffer
    /// error never comes from the receiver; it is copied as its message.)
    fn same(&self) -> UploadError {
        match self {
            UploadError::Transport { url, message } => UploadError::Transport {
                url: url.clone(),
                message: message.clone(),
            },
            UploadError::Status {
                url,
                status,
                error,
                message,
                retry_after,
            } => UploadError::Status {
                url: url.clone(),
                status: *status,
                error: error.clone(),
                message: message.clone(),
                retry_after: *retry_after,
            },
            UploadError::Protocol { url, message } => UploadError::Protocol {
                url: url.clone(),
                message: message.clone(),
            },
            UploadError::Request { what, message } => UploadError::Request {
                what: what.clone(),
                message: message.clone(),
            },
            UploadError::Store(e) => UploadError::Protocol {
                url: String::new(),
                message: e.to_string(),
            },
        }
    }

    /// The one place that decides retry versus park.
    pub fn retry(&self) -> Retry {
        match self {
            UploadError::Transport { .. }
            | UploadError::Protocol { .. }
            | UploadError::Store(_) => Retry::Backoff,
            UploadError::Request { .. } => Retry::Never,
            UploadError::Status {
                status,
                error,
                retry_after,
                ..
            } => match *status {
                401 | 403 | 404 | 405 => Retry::AtMaximum,
                408 => Retry::Backoff,
                422 if error == protocol::FILE_MISMATCH_ERROR => Retry::Restart,
                // A chunk damaged in transit: send it again.
                422 => Retry::Backoff,
                429 | 503 => retry_after.map_or(Retry::Backoff, Retry::NotBefore),
                500..=599 => Retry::Backoff,
                _ => Retry::Never,
            },
        }
    }
}

/// Progress reported to observers (the log, library callbacks).
#[derive(Debug, Clone, PartialEq)]
pub struct UploadEvent {
    pub file_id: i64,
    pub file_name: String,
    pub chunk_index: u64,
    pub status: EventStatus,
    pub retry_count: u64,
    pub next_retry_in: Option<Duration>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventStatus {
    /// A chunk was acknowledged.
    Success,
    /// A chunk failed; it will be retried after `next_retry_in`.
    Failed,
    /// The receiver confirmed the whole file under this name.
    Complete { server_name: Option<String> },
    /// The file was parked as failed with this reason.
    Parked { reason: String },
}

/// Receives [`UploadEvent`]s; the default does nothing.
pub trait UploadObserver: Send + Sync {
    fn on_event(&self, _event: &UploadEvent) {}
    /// The error behind a failed attempt at `file`, before it is recorded (for
    /// callers that decide on its [`UploadError::retry`], like the one-shot CLI).
    fn on_failure(&self, _file: &FileRecord, _error: &UploadError) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl UploadObserver for NoObserver {}

const RESUMABLE_UNKNOWN: u8 = 0;
const RESUMABLE_YES: u8 = 1;
const RESUMABLE_NO: u8 = 2;

/// An HTTP client for one target.
pub struct TargetClient {
    http: reqwest::Client,
    url: String,
    api_key: Option<String>,
    resumable: AtomicU8,
    /// The most files the receiver takes in one batch; 0 when it announced none.
    batch: AtomicUsize,
    /// The batch route was refused (a receiver or proxy that predates it):
    /// batches stay off for this client, whatever later replies announce.
    batch_refused: std::sync::atomic::AtomicBool,
}

impl TargetClient {
    pub fn new(target: &TargetConfig) -> Result<TargetClient, UploadError> {
        let http = reqwest::Client::builder()
            .timeout(target.timeout)
            .connect_timeout(target.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("indexedcp/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UploadError::Request {
                what: "an HTTP client".into(),
                message: e.to_string(),
            })?;
        let api_key = target.api_key.clone().or_else(|| {
            std::env::var("INDEXEDCP_API_KEY")
                .ok()
                .filter(|k| !k.trim().is_empty())
        });
        Ok(TargetClient {
            http,
            url: target.url.clone(),
            api_key,
            resumable: AtomicU8::new(RESUMABLE_UNKNOWN),
            batch: AtomicUsize::new(0),
            batch_refused: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether the receiver announced the resumable extension (`None`: not yet known).
    pub fn resumable(&self) -> Option<bool> {
        match self.resumable.load(Ordering::Relaxed) {
            RESUMABLE_YES => Some(true),
            RESUMABLE_NO => Some(false),
            _ => None,
        }
    }

    /// How progress with this receiver is recorded. A resumable receiver
    /// remembers what it received and completed, so a record lost to a power
    /// cut only costs a question (`GET /upload/<id>`) or a duplicate chunk it
    /// recognises; with a v1 receiver a lost record would send data twice.
    pub fn durability(&self) -> Durability {
        if self.resumable() == Some(true) {
            Durability::Unsynced
        } else {
            Durability::Synced
        }
    }

    /// The most files the receiver takes in one batch request (`POST
    /// <url>/batch`); 0 until a reply announced batches.
    pub fn batch_limit(&self) -> usize {
        if self.resumable() == Some(true) && !self.batch_refused.load(Ordering::Relaxed) {
            self.batch.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    fn note_resumable(&self, headers: &HeaderMap) {
        let yes = headers
            .get(protocol::RESUMABLE)
            .is_some_and(|v| v.as_bytes() == b"1");
        self.resumable.store(
            if yes { RESUMABLE_YES } else { RESUMABLE_NO },
            Ordering::Relaxed,
        );
        let batch = headers
            .get(protocol::BATCH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        self.batch.store(batch, Ordering::Relaxed);
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    fn transport(&self, e: reqwest::Error) -> UploadError {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(inner) = source {
            message.push_str(": ");
            message.push_str(&inner.to_string());
            source = inner.source();
        }
        UploadError::Transport {
            url: self.url.clone(),
            message,
        }
    }

    async fn refusal(&self, response: reqwest::Response) -> UploadError {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        let (error, message) = match serde_json::from_str::<ErrorReply>(&text) {
            Ok(reply) => (reply.error.clone(), reply.message.unwrap_or(reply.error)),
            Err(_) => (String::new(), text.chars().take(200).collect()),
        };
        UploadError::Status {
            url: self.url.clone(),
            status,
            error,
            message,
            retry_after,
        }
    }

    /// Sends one chunk.
    pub async fn send_chunk(
        &self,
        file: &FileRecord,
        chunk: &ChunkMeta,
        data: Vec<u8>,
    ) -> Result<ChunkReply, UploadError> {
        let mut headers = HeaderMap::new();
        let name = HeaderValue::from_bytes(file.remote_name.as_bytes()).map_err(|_| UploadError::Request {
            what: format!("{:?}", file.remote_name),
            message: "the file name contains characters an HTTP header cannot carry (control characters); rename the file".into(),
        })?;
        headers.insert(HeaderName::from_static(protocol::FILE_NAME), name);
        let mut put = |name: &'static str, value: String| {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_str(&value).expect("ASCII header value"),
            );
        };
        put(protocol::CHUNK_INDEX, chunk.idx.to_string());
        put(protocol::UPLOAD_ID, file.upload_id.clone());
        put(protocol::CHUNK_OFFSET, chunk.offset.to_string());
        put(protocol::CHUNK_SHA256, chunk.sha256.clone());
        put(protocol::FILE_SIZE, file.size.to_string());
        put(protocol::CHUNK_COUNT, file.chunk_count.to_string());
        put(protocol::FILE_SHA256, file.sha256.clone());
        let request = self
            .authorize(self.http.post(&self.url))
            .headers(headers)
            .body(data);
        let response = request.send().await.map_err(|e| self.transport(e))?;
        self.reply::<ChunkReply>(response).await
    }

    /// A reply to an upload request: its JSON body when it succeeded, else the
    /// refusal; either way what it announces about the receiver's extensions.
    async fn reply<T: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<T, UploadError> {
        if !response.status().is_success() {
            // A refusal from a proxy in front of the receiver (502, 503) says
            // nothing about the receiver: only a reply that carries the header counts.
            if response.headers().contains_key(protocol::RESUMABLE) {
                self.note_resumable(response.headers());
            }
            return Err(self.refusal(response).await);
        }
        self.note_resumable(response.headers());
        let text = response.text().await.map_err(|e| self.transport(e))?;
        serde_json::from_str::<T>(&text).map_err(|e| UploadError::Protocol {
            url: self.url.clone(),
            message: format!("{e} in {:?}", text.chars().take(200).collect::<String>()),
        })
    }

    /// Sends a batch: `body` is the JSON manifest (`manifest_len` bytes) and
    /// then the files' bytes.
    pub async fn send_batch(
        &self,
        manifest_len: usize,
        body: Vec<u8>,
    ) -> Result<BatchReply, UploadError> {
        let url = self.below("batch");
        let response = self
            .authorize(self.http.post(&url))
            .header(protocol::MANIFEST_LENGTH, manifest_len)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        self.reply::<BatchReply>(response).await
    }

    /// The target URL with one more path segment (before any query string):
    /// `https://h/upload?k=v` and `batch` give `https://h/upload/batch?k=v`.
    fn below(&self, segment: &str) -> String {
        let mut url = match reqwest::Url::parse(&self.url) {
            Ok(url) => url,
            Err(_) => return format!("{}/{segment}", self.url.trim_end_matches('/')),
        };
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push(segment);
        }
        url.into()
    }

    /// The receiver refused batches (an older receiver): send files one by one.
    fn forget_batches(&self) {
        self.batch_refused.store(true, Ordering::Relaxed);
    }

    /// `GET /upload/<id>`: what the receiver has of an upload (`None`: nothing).
    pub async fn status(&self, upload_id: &str) -> Result<Option<UploadStatus>, UploadError> {
        let url = self.below(upload_id);
        let response = self
            .authorize(self.http.get(&url))
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let text = response.text().await.map_err(|e| self.transport(e))?;
                serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| UploadError::Protocol {
                        url,
                        message: e.to_string(),
                    })
            }
            _ => Err(self.refusal(response).await),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, UploadError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| UploadError::Protocol {
            url: String::new(),
            message: format!("blocking task failed: {e}"),
        })?
        .map_err(UploadError::from)
}

/// How one attempt at a file ended.
#[derive(Debug, Clone, PartialEq)]
pub enum FileOutcome {
    Confirmed {
        server_name: Option<String>,
    },
    /// A chunk failed; the file is scheduled for a retry.
    RetryLater,
    Parked {
        reason: String,
    },
}

/// Chunks of one file in flight at once to a resumable receiver, as far as the
/// target's byte budget ([`TargetRuntime::budget`]) allows.
const CHUNK_WINDOW: usize = 4;

/// The unit of a target's byte budget: a chunk in flight holds one permit
/// per started unit of its length.
const BUDGET_UNIT: u64 = 4096;

/// Everything one target's uploads need.
pub struct TargetRuntime {
    pub config: TargetConfig,
    pub client: TargetClient,
    /// Chunk bytes in flight for this target at most: `chunk_size x
    /// concurrency`, whatever the number of files or the chunk window, so that
    /// memory stays bounded by that product.
    budget: Arc<tokio::sync::Semaphore>,
    /// When a failed attempt was last logged at warning level, and how many
    /// were logged at debug level since.
    last_warning: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
    /// Replaced by a reload: a failure of an attempt still running with these
    /// settings says nothing about the new ones.
    retired: std::sync::atomic::AtomicBool,
}

/// Failed attempts of one target are logged as warnings at most this often:
/// with a receiver down and thousands of files waiting, one line per attempt
/// would bury the journal. The others go to the debug level.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

impl TargetRuntime {
    pub fn new(config: TargetConfig) -> Result<TargetRuntime, UploadError> {
        let client = TargetClient::new(&config)?;
        let units = (config.chunk_size.max(1).div_ceil(BUDGET_UNIT)
            * config.concurrency.max(1) as u64)
            .min(tokio::sync::Semaphore::MAX_PERMITS as u64);
        Ok(TargetRuntime {
            config,
            client,
            budget: Arc::new(tokio::sync::Semaphore::new(units as usize)),
            last_warning: std::sync::Mutex::new(None),
            retired: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Marks these settings as replaced by a reload: attempts still running
    /// with them retry at once when they fail.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// Waits until `length` more chunk bytes may be in flight; they may until
    /// the returned permit is dropped.
    async fn reserve(&self, length: u64) -> tokio::sync::SemaphorePermit<'_> {
        let units = length
            .div_ceil(BUDGET_UNIT)
            .clamp(1, self.config.chunk_size.max(1).div_ceil(BUDGET_UNIT))
            as u32;
        self.budget
            .acquire_many(units)
            .await
            .expect("the budget semaphore is never closed")
    }

    /// Whether a failed attempt should be logged as a warning now; if so, also
    /// how many were logged at debug level since the last one.
    fn warning_due(&self) -> Option<u64> {
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match &mut *last {
            Some((at, quiet)) if now.duration_since(*at) < WARNING_INTERVAL => {
                *quiet += 1;
                None
            }
            _ => {
                let quiet = last.map_or(0, |(_, quiet)| quiet);
                *last = Some((now, 0));
                Some(quiet)
            }
        }
    }
}

/// Sends the rest of one buffered file; records every outcome in the store.
pub async fn upload_file(
    store: &Store,
    target: &TargetRuntime,
    file: &FileRecord,
    observer: &dyn UploadObserver,
) -> Result<FileOutcome, UploadError> {
    let client = &target.client;
    let s = store.clone();
    let id = file.id;
    let mut chunks = blocking(move || s.chunks(id)).await?;

    // A file with progress on a resumable receiver: ask what arrived, so that
    // nothing is sent twice and a lost completion is recognised.
    let has_progress = chunks.iter().any(|c| c.uploaded || c.retry_count > 0);
    if has_progress && client.resumable() != Some(false) {
        match client.status(&file.upload_id).await {
            Ok(Some(status)) if status.complete => {
                return confirm(store, client, file, status.actual_filename, observer).await;
            }
            Ok(Some(status)) => {
                let received: Vec<u64> = status.received_chunks;
                let s = store.clone();
                blocking(move || {
                    s.reset_chunks(id)?;
                    s.mark_uploaded(id, &received, Durability::Unsynced)
                })
                .await?;
                let s = store.clone();
                chunks = blocking(move || s.chunks(id)).await?;
            }
            Ok(None) => {
                if chunks.iter().any(|c| c.uploaded) && client.resumable() == Some(true) {
                    // The receiver forgot the upload (expired): start it again.
                    let s = store.clone();
                    blocking(move || s.reset_chunks(id)).await?;
                    chunks.iter_mut().for_each(|c| c.uploaded = false);
                }
            }
            Err(e) => {
                let first = chunks
                    .iter()
                    .find(|c| !c.uploaded)
                    .unwrap_or(&chunks[0])
                    .clone();
                return fail(store, target, file, &first, e, observer).await;
            }
        }
    }

    let last_idx = file.chunk_count.saturating_sub(1);
    let mut pending: Vec<ChunkMeta> = chunks.iter().filter(|c| !c.uploaded).cloned().collect();
    if pending.is_empty() {
        // Every chunk was acknowledged but completion was never seen: sending the
        // last chunk again makes the receiver answer with the completed reply.
        pending.extend(chunks.last().cloned());
    }
    let send = |chunk: ChunkMeta| {
        let s = store.clone();
        async move {
            let idx = chunk.idx;
            let _in_flight = target.reserve(chunk.length).await;
            let data = blocking(move || s.chunk_data(id, idx)).await?;
            let started = std::time::Instant::now();
            let sent = client.send_chunk(file, &chunk, data).await;
            crate::metrics::observe_upload_latency(started.elapsed());
            Ok::<_, UploadError>((chunk, sent))
        }
    };
    let mut pending = pending.into_iter();
    let mut sends = futures::stream::FuturesUnordered::new();
    loop {
        // A resumable receiver takes chunks in any order: keep a few in
        // flight, so that reading the buffer, the network and the receiver's
        // writes overlap. A v1 receiver gets them one by one, in order, and so
        // does one not known yet, until its first reply says what it is (the
        // first file a daemon sends learns it with its first chunk).
        let window = if client.resumable() == Some(true) {
            CHUNK_WINDOW
        } else {
            1
        };
        while sends.len() < window {
            let Some(chunk) = pending.next() else { break };
            sends.push(send(chunk));
        }
        let Some(done) = sends.next().await else {
            break;
        };
        let (chunk, sent) = done?;
        let idx = chunk.idx;
        match sent {
            Ok(reply) => {
                crate::failpoint::hit(if reply.complete == Some(true) {
                    crate::failpoint::UPLOAD_AFTER_COMPLETE
                } else {
                    crate::failpoint::UPLOAD_AFTER_ACK
                });
                let complete = reply.complete == Some(true)
                    || (reply.complete.is_none()
                        && client.resumable() != Some(true)
                        && idx == last_idx);
                // The confirmation below covers the last chunk.
                if !complete {
                    let s = store.clone();
                    let durability = client.durability();
                    blocking(move || s.mark_uploaded(id, &[idx], durability)).await?;
                }
                crate::metrics::UPLOADED_CHUNKS.add(1);
                crate::metrics::UPLOADED_BYTES.add(chunk.length);
                observer.on_event(&UploadEvent {
                    file_id: file.id,
                    file_name: file.remote_name.clone(),
                    chunk_index: idx,
                    status: EventStatus::Success,
                    retry_count: chunk.retry_count,
                    next_retry_in: None,
                    error: None,
                });
                tracing::debug!(file = %file.remote_name, chunk = idx, of = file.chunk_count, "chunk sent");
                if complete {
                    return confirm(store, client, file, reply.actual_filename, observer).await;
                }
            }
            // Chunks still in flight are dropped with the stream; an
            // acknowledgement lost that way only means a duplicate later.
            Err(e) => return fail(store, target, file, &chunk, e, observer).await,
        }
    }
    drop(sends);
    // The receiver is resumable and has every chunk, yet did not say complete:
    // ask it next time.
    let s = store.clone();
    let next = store::now_ms() + target.config.initial_retry_delay.as_millis() as i64;
    let last = chunks.last().map(|c| c.idx).unwrap_or(0);
    blocking(move || {
        s.reset_chunks(id).and(s.record_failure(
            id,
            last,
            "the receiver did not confirm the file",
            next,
        ))
    })
    .await?;
    Ok(FileOutcome::RetryLater)
}

async fn confirm(
    store: &Store,
    client: &TargetClient,
    file: &FileRecord,
    server_name: Option<String>,
    observer: &dyn UploadObserver,
) -> Result<FileOutcome, UploadError> {
    let s = store.clone();
    let (id, name) = (file.id, server_name.clone());
    let durability = client.durability();
    blocking(move || s.confirm(id, name.as_deref(), durability)).await?;
    confirmed(file, server_name.clone(), observer);
    Ok(FileOutcome::Confirmed { server_name })
}

/// Reports a file whose confirmation is recorded.
fn confirmed(file: &FileRecord, server_name: Option<String>, observer: &dyn UploadObserver) {
    crate::metrics::CONFIRMED_FILES.add(1);
    crate::metrics::CONFIRMED_BYTES.add(file.size);
    tracing::info!(file = %file.remote_name, server_name = server_name.as_deref().unwrap_or(""), target = %file.target, size = file.size, "file delivered");
    observer.on_event(&UploadEvent {
        file_id: file.id,
        file_name: file.remote_name.clone(),
        chunk_index: file.chunk_count.saturating_sub(1),
        status: EventStatus::Complete { server_name },
        retry_count: 0,
        next_retry_in: None,
        error: None,
    });
}

async fn fail(
    store: &Store,
    target: &TargetRuntime,
    file: &FileRecord,
    chunk: &ChunkMeta,
    error: UploadError,
    observer: &dyn UploadObserver,
) -> Result<FileOutcome, UploadError> {
    observer.on_failure(file, &error);
    let backoff = Backoff::of(&target.config);
    let message = error.to_string();
    let retry = error.retry();
    let park = |reason: String| async move {
        let s = store.clone();
        let (id, r) = (file.id, reason.clone());
        blocking(move || s.park(id, &r)).await?;
        crate::metrics::PARKED_FILES.add(1);
        tracing::error!(file = %file.remote_name, target = %file.target, reason = %reason, "file parked as failed; fix the cause, then run `indexedcp retry`");
        observer.on_event(&UploadEvent {
            file_id: file.id,
            file_name: file.remote_name.clone(),
            chunk_index: chunk.idx,
            status: EventStatus::Parked {
                reason: reason.clone(),
            },
            retry_count: chunk.retry_count,
            next_retry_in: None,
            error: Some(reason.clone()),
        });
        Ok::<_, UploadError>(FileOutcome::Parked { reason })
    };
    if retry == Retry::Never {
        return park(format!("refused: {message}")).await;
    }
    let n = chunk.retry_count + 1;
    let delay = match retry {
        // The attempt ran with settings a reload has replaced (which may fix
        // what failed): the new ones get their try at once.
        _ if target.retired.load(Ordering::Relaxed) => Duration::ZERO,
        Retry::AtMaximum => backoff.max,
        Retry::NotBefore(at_least) => backoff.delay_with_jitter(n, random_unit()).max(at_least),
        _ => backoff.delay_with_jitter(n, random_unit()),
    };
    let s = store.clone();
    let (id, idx, msg) = (file.id, chunk.idx, message.clone());
    let next_attempt = store::now_ms() + delay.as_millis() as i64;
    let restart = retry == Retry::Restart;
    let count = blocking(move || {
        if restart {
            s.reset_chunks(id)?;
        }
        s.record_failure(id, idx, &msg, next_attempt)
    })
    .await?;
    crate::metrics::RETRIES.add(1);
    if let Some(max) = target.config.max_retries
        && count > u64::from(max)
    {
        return park(format!("gave up after {max} retries: {message}")).await;
    }
    match (retry, target.warning_due()) {
        (Retry::AtMaximum, Some(more_failures)) => {
            tracing::error!(file = %file.remote_name, target = %file.target, url = %target.config.url, error = %message, next_retry_in = ?delay, more_failures, "the receiver refused this agent's configuration (API key or URL); fix the [[target]] and send SIGHUP");
        }
        (_, Some(more_failures)) => {
            tracing::warn!(file = %file.remote_name, target = %file.target, chunk = chunk.idx, retry_count = count, next_retry_in = ?delay, error = %message, more_failures, "chunk failed; will retry (more_failures: failed attempts since the last warning, logged at debug level)");
        }
        (_, None) => {
            tracing::debug!(file = %file.remote_name, target = %file.target, chunk = chunk.idx, retry_count = count, next_retry_in = ?delay, error = %message, "chunk failed; will retry");
        }
    }
    observer.on_event(&UploadEvent {
        file_id: file.id,
        file_name: file.remote_name.clone(),
        chunk_index: chunk.idx,
        status: EventStatus::Failed,
        retry_count: count,
        next_retry_in: Some(delay),
        error: Some(message),
    });
    Ok(FileOutcome::RetryLater)
}

/// Files per batch request at most (also bounded by the receiver's announced
/// limit and, in bytes, by the target's `chunk_size`).
const BATCH_FILES: usize = 256;

/// Manifest bytes a batch may use: half of what a receiver reads, so that
/// names full of characters JSON escapes still fit.
const MANIFEST_BUDGET: usize = (protocol::MAX_MANIFEST_BYTES / 2) as usize;

/// A generous estimate of a file's entry in a batch manifest.
fn manifest_entry_bytes(file: &FileRecord) -> usize {
    file.remote_name.len() + file.upload_id.len() + 160
}

/// What one uploader task attempts: a file on its own, or several small files
/// (each a single chunk) in one batch request.
#[derive(Debug)]
pub enum Attempt {
    One(Box<FileRecord>),
    Batch(Vec<FileRecord>),
}

impl Attempt {
    pub fn ids(&self) -> Vec<i64> {
        match self {
            Attempt::One(file) => vec![file.id],
            Attempt::Batch(files) => files.iter().map(|f| f.id).collect(),
        }
    }
}

/// Groups `files` (in order) into at most `slots` attempts: when the receiver
/// takes batches, runs of files that fit in one chunk share a batch of up to
/// [`BATCH_FILES`] files and `chunk_size` bytes. Files beyond the slots are
/// left for the next round.
pub fn plan_attempts(target: &TargetRuntime, files: Vec<FileRecord>, slots: usize) -> Vec<Attempt> {
    let max_files = target.client.batch_limit().min(BATCH_FILES);
    let max_bytes = target.config.chunk_size.max(1);
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut batch: Vec<FileRecord> = Vec::new();
    let mut batch_bytes = 0u64;
    let mut manifest_bytes = 0usize;
    let close = |batch: &mut Vec<FileRecord>, attempts: &mut Vec<Attempt>| match batch.len() {
        0 => {}
        1 => attempts.push(Attempt::One(Box::new(batch.remove(0)))),
        _ => attempts.push(Attempt::Batch(std::mem::take(batch))),
    };
    for file in files {
        let batchable = max_files > 1 && file.chunk_count == 1 && file.size <= max_bytes;
        if batchable {
            let entry_bytes = manifest_entry_bytes(&file);
            if !batch.is_empty()
                && (batch.len() >= max_files
                    || batch_bytes + file.size > max_bytes
                    || manifest_bytes + entry_bytes > MANIFEST_BUDGET)
            {
                close(&mut batch, &mut attempts);
                batch_bytes = 0;
                manifest_bytes = 0;
            }
            // An open batch holds a slot of its own.
            if batch.is_empty() && attempts.len() >= slots {
                break;
            }
            batch_bytes += file.size;
            manifest_bytes += entry_bytes;
            batch.push(file);
        } else {
            close(&mut batch, &mut attempts);
            batch_bytes = 0;
            manifest_bytes = 0;
            if attempts.len() >= slots {
                break;
            }
            attempts.push(Attempt::One(Box::new(file)));
        }
    }
    close(&mut batch, &mut attempts);
    attempts
}

/// Runs one attempt: the outcome of every file in it, or why it could not be
/// recorded (the buffer failed) and what the retry rule says about that.
async fn run_attempt(
    store: &Store,
    target: &TargetRuntime,
    attempt: Attempt,
    observer: &dyn UploadObserver,
) -> Vec<(FileRecord, Result<FileOutcome, (String, Retry)>)> {
    let unrecorded = |e: UploadError| (e.to_string(), e.retry());
    match attempt {
        Attempt::One(file) => {
            let outcome = upload_file(store, target, &file, observer).await;
            vec![(*file, outcome.map_err(unrecorded))]
        }
        Attempt::Batch(files) => match upload_batch(store, target, &files, observer).await {
            Ok(Some(outcomes)) => files
                .into_iter()
                .zip(outcomes.into_iter().map(Ok))
                .collect(),
            // The receiver refused batches: the same files, one by one.
            Ok(None) => {
                let mut out = Vec::with_capacity(files.len());
                for file in files {
                    let outcome = upload_file(store, target, &file, observer).await;
                    out.push((file, outcome.map_err(unrecorded)));
                }
                out
            }
            Err(e) => {
                let e = unrecorded(e);
                files.into_iter().map(|f| (f, Err(e.clone()))).collect()
            }
        },
    }
}

/// One attempt at several small files, each the single chunk of its file, in
/// one batch request. Each file gets the outcome (and the record in the store)
/// a single attempt would have had; the confirmations share one commit.
/// `None`: the receiver refused the batch route (it predates batches), nothing
/// was recorded, and the files are to be sent one by one.
pub async fn upload_batch(
    store: &Store,
    target: &TargetRuntime,
    files: &[FileRecord],
    observer: &dyn UploadObserver,
) -> Result<Option<Vec<FileOutcome>>, UploadError> {
    let client = &target.client;
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    let _in_flight = target.reserve(bytes).await;
    let s = store.clone();
    let ids: Vec<(i64, String, String)> = files
        .iter()
        .map(|f| (f.id, f.upload_id.clone(), f.remote_name.clone()))
        .collect();
    let (chunks, manifest_len, body) = blocking(move || {
        let mut chunks = Vec::with_capacity(ids.len());
        let mut entries = Vec::with_capacity(ids.len());
        for (id, upload_id, name) in &ids {
            let chunk = s.chunks(*id)?.into_iter().next().unwrap_or(ChunkMeta {
                idx: 0,
                offset: 0,
                length: 0,
                sha256: String::new(),
                uploaded: false,
                retry_count: 0,
            });
            entries.push(BatchEntry {
                upload_id: upload_id.clone(),
                file_name: name.clone(),
                size: chunk.length,
                sha256: chunk.sha256.clone(),
            });
            chunks.push(chunk);
        }
        let mut body =
            serde_json::to_vec(&BatchManifest { files: entries }).expect("a manifest serialises");
        let manifest_len = body.len();
        body.reserve(bytes as usize);
        for (id, _, _) in &ids {
            body.extend_from_slice(&s.chunk_data(*id, 0)?);
        }
        Ok((chunks, manifest_len, body))
    })
    .await?;
    let started = std::time::Instant::now();
    let sent = client.send_batch(manifest_len, body).await;
    crate::metrics::observe_upload_latency(started.elapsed());
    let reply = match sent {
        Ok(reply)
            if reply.files.len() == files.len()
                && reply
                    .files
                    .iter()
                    .zip(files)
                    .all(|(r, f)| r.upload_id == f.upload_id) =>
        {
            reply
        }
        Ok(_) => {
            let e = UploadError::Protocol {
                url: client.url.clone(),
                message: "the batch reply does not list the files of the request in order".into(),
            };
            return fail_all(store, target, files, &chunks, &e, observer)
                .await
                .map(Some);
        }
        Err(UploadError::Status {
            status: 404 | 405, ..
        }) => {
            client.forget_batches();
            tracing::info!(target = %target.config.name, "the receiver does not take batches; sending files one by one");
            return Ok(None);
        }
        // A batch refused whole says nothing about its files (the receiver's
        // limits are tighter than this agent's chunk_size, say): they go one
        // by one, where each gets its own answer.
        Err(
            e @ UploadError::Status {
                status: 400 | 413, ..
            },
        ) => {
            client.forget_batches();
            tracing::warn!(target = %target.config.name, error = %e, "the receiver refused a batch; sending files one by one from now on");
            return Ok(None);
        }
        Err(e) => {
            return fail_all(store, target, files, &chunks, &e, observer)
                .await
                .map(Some);
        }
    };

    let mut outcomes: Vec<Option<FileOutcome>> = vec![None; files.len()];
    let mut done = Vec::new();
    for (i, result) in reply.files.into_iter().enumerate() {
        let (file, chunk) = (&files[i], &chunks[i]);
        if result.complete {
            crate::metrics::UPLOADED_CHUNKS.add(1);
            crate::metrics::UPLOADED_BYTES.add(chunk.length);
            observer.on_event(&UploadEvent {
                file_id: file.id,
                file_name: file.remote_name.clone(),
                chunk_index: 0,
                status: EventStatus::Success,
                retry_count: chunk.retry_count,
                next_retry_in: None,
                error: None,
            });
            done.push((i, result.actual_filename));
        } else {
            let e = UploadError::Status {
                url: client.url.clone(),
                status: result.status.unwrap_or(500),
                error: result.error.unwrap_or_default(),
                message: result.message.unwrap_or_default(),
                retry_after: None,
            };
            outcomes[i] = Some(fail(store, target, file, chunk, e, observer).await?);
        }
    }
    if !done.is_empty() {
        let s = store.clone();
        let confirmations: Vec<(i64, Option<String>)> = done
            .iter()
            .map(|(i, name)| (files[*i].id, name.clone()))
            .collect();
        let durability = client.durability();
        blocking(move || s.confirm_many(&confirmations, durability)).await?;
        crate::metrics::BATCHED_FILES.add(done.len() as u64);
        for (i, server_name) in done {
            confirmed(&files[i], server_name.clone(), observer);
            outcomes[i] = Some(FileOutcome::Confirmed { server_name });
        }
    }
    Ok(Some(
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(FileOutcome::RetryLater))
            .collect(),
    ))
}

/// Records the same failure for every file of a batch.
async fn fail_all(
    store: &Store,
    target: &TargetRuntime,
    files: &[FileRecord],
    chunks: &[ChunkMeta],
    error: &UploadError,
    observer: &dyn UploadObserver,
) -> Result<Vec<FileOutcome>, UploadError> {
    let mut outcomes = Vec::with_capacity(files.len());
    for (file, chunk) in files.iter().zip(chunks) {
        outcomes.push(fail(store, target, file, chunk, error.same(), observer).await?);
    }
    Ok(outcomes)
}

/// One attempt at a queued file, as [`upload_queued_once`] reports it.
#[derive(Debug, Clone)]
pub struct FileAttempt {
    /// The file as it was before the attempt.
    pub file: FileRecord,
    pub outcome: FileOutcome,
    /// Why the attempt did not confirm the file, and what the retry rule says
    /// about it; `None` when it was confirmed.
    pub error: Option<(String, Retry)>,
}

/// Forwards events and remembers the error behind each file's failed attempt.
struct FailureRecorder<'a> {
    inner: &'a dyn UploadObserver,
    errors: std::sync::Mutex<HashMap<i64, (String, Retry)>>,
}

impl UploadObserver for FailureRecorder<'_> {
    fn on_event(&self, event: &UploadEvent) {
        self.inner.on_event(event);
    }
    fn on_failure(&self, file: &FileRecord, error: &UploadError) {
        self.inner.on_failure(file, error);
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(file.id, (error.to_string(), error.retry()));
    }
}

/// One attempt at every queued file of `target` whose retry is due at `due_at`
/// (ms since the epoch; `i64::MAX` takes them all, whatever their schedule),
/// with up to the target's `concurrency` files in flight. Every outcome is
/// recorded in the store exactly as the daemon's [`run_uploader`] records it;
/// this is the same work done once, for the one-shot CLI and the library's
/// `Client`. The attempts are returned in buffer order (oldest first).
pub async fn upload_queued_once(
    store: &Store,
    target: &TargetRuntime,
    observer: &dyn UploadObserver,
    due_at: i64,
) -> Result<Vec<FileAttempt>, UploadError> {
    let s = store.clone();
    let name = target.config.name.clone();
    let files = blocking(move || s.due_files(&name, due_at, &[], usize::MAX)).await?;
    Ok(upload_files_once(store, target, observer, files).await)
}

/// One attempt at each of `files` (buffered files of `target`), as
/// [`upload_queued_once`] makes them, for a caller that already listed them.
pub async fn upload_files_once(
    store: &Store,
    target: &TargetRuntime,
    observer: &dyn UploadObserver,
    files: Vec<FileRecord>,
) -> Vec<FileAttempt> {
    use futures::StreamExt;
    let recorder = FailureRecorder {
        inner: observer,
        errors: std::sync::Mutex::new(HashMap::new()),
    };
    let recorder = &recorder;
    let planned = plan_attempts(target, files, usize::MAX);
    let mut attempts: Vec<FileAttempt> = futures::stream::iter(planned)
        .map(|attempt| run_attempt(store, target, attempt, recorder))
        .buffer_unordered(target.config.concurrency.max(1))
        .flat_map(futures::stream::iter)
        .map(|(file, outcome)| {
            let (outcome, error) = match outcome {
                Ok(FileOutcome::Confirmed { server_name }) => {
                    (FileOutcome::Confirmed { server_name }, None)
                }
                Ok(outcome) => {
                    let recorded = recorder
                        .errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&file.id);
                    let error = recorded.unwrap_or_else(|| match &outcome {
                        FileOutcome::Parked { reason } => (reason.clone(), Retry::Never),
                        _ => (
                            "the receiver did not confirm the file".to_owned(),
                            Retry::Backoff,
                        ),
                    });
                    (outcome, Some(error))
                }
                // The buffer itself failed (not the receiver): the file stays
                // queued and the caller hears why.
                Err(error) => (FileOutcome::RetryLater, Some(error)),
            };
            FileAttempt {
                file,
                outcome,
                error,
            }
        })
        .collect()
        .await;
    attempts.sort_by_key(|a| a.file.id);
    attempts
}

/// What the uploader loop reads on every round, replaceable on reload: the
/// targets (an upload in flight keeps the target it started with), the check
/// interval, and a heartbeat the supervisor reads for the systemd watchdog.
pub struct UploaderShared {
    targets: std::sync::RwLock<Vec<Arc<TargetRuntime>>>,
    check_interval_ms: std::sync::atomic::AtomicU64,
    heartbeat_ms: std::sync::atomic::AtomicI64,
}

impl UploaderShared {
    pub fn new(targets: Vec<Arc<TargetRuntime>>, check_interval: Duration) -> UploaderShared {
        UploaderShared {
            targets: std::sync::RwLock::new(targets),
            check_interval_ms: std::sync::atomic::AtomicU64::new(check_interval.as_millis() as u64),
            heartbeat_ms: std::sync::atomic::AtomicI64::new(store::now_ms()),
        }
    }

    pub fn targets(&self) -> Vec<Arc<TargetRuntime>> {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_targets(&self, targets: Vec<Arc<TargetRuntime>>) {
        *self.targets.write().unwrap_or_else(|p| p.into_inner()) = targets;
    }

    pub fn check_interval(&self) -> Duration {
        Duration::from_millis(self.check_interval_ms.load(Ordering::Relaxed))
    }

    pub fn set_check_interval(&self, interval: Duration) {
        self.check_interval_ms
            .store(interval.as_millis() as u64, Ordering::Relaxed);
    }

    /// When the uploader loop last went round (ms since the epoch).
    pub fn last_heartbeat(&self) -> i64 {
        self.heartbeat_ms.load(Ordering::Relaxed)
    }
}

/// Drains the buffer for the targets in `shared` until `shutdown`: wakes every
/// `check_interval`, when `wake` is notified (after an ingest), and when the
/// earliest retry is due; keeps up to `concurrency` files per target in flight.
/// On shutdown, chunks in flight get `grace` to finish and are then abandoned
/// (safely: an unacknowledged chunk is simply sent again).
pub async fn run_uploader(
    store: Store,
    shared: Arc<UploaderShared>,
    wake: Arc<Notify>,
    observer: Arc<dyn UploadObserver>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut in_flight: JoinSet<(String, Vec<i64>, bool)> = JoinSet::new();
    // The attempts in flight per target, each with the ids of its files.
    let mut busy: HashMap<String, Vec<Vec<i64>>> = HashMap::new();
    let mut cooling: HashMap<i64, (String, std::time::Instant)> = HashMap::new();
    loop {
        shared
            .heartbeat_ms
            .store(store::now_ms(), Ordering::Relaxed);
        let check_interval = shared.check_interval();
        let mut earliest: Option<i64> = None;
        for target in &shared.targets() {
            let name = target.config.name.clone();
            let attempts = busy.entry(name.clone()).or_default();
            let room = target.config.concurrency.saturating_sub(attempts.len());
            let mut taken: Vec<i64> = attempts.iter().flatten().copied().collect();
            taken.extend(
                cooling
                    .iter()
                    .filter(|(_, (t, _))| *t == name)
                    .map(|(id, _)| *id),
            );
            let s = store.clone();
            let n = name.clone();
            // With batches, one slot may take many small files.
            let wanted = room.saturating_mul(target.client.batch_limit().clamp(1, BATCH_FILES));
            let found = tokio::task::spawn_blocking(move || {
                if room == 0 {
                    // A finished upload wakes the loop.
                    return Ok((Vec::new(), None));
                }
                let due = s.due_files(&n, store::now_ms(), &taken, wanted)?;
                // With every slot filled, a finished upload wakes the loop;
                // otherwise it sleeps until the next file is due.
                let next = if due.len() < wanted {
                    s.next_due(&n)?
                } else {
                    None
                };
                Ok::<_, StoreError>((due, next))
            })
            .await;
            let (due, next) = match found {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the buffer; retrying");
                    (Vec::new(), Some(store::now_ms() + 1000))
                }
                Err(e) => {
                    tracing::error!(error = %e, "buffer query task failed");
                    (Vec::new(), None)
                }
            };
            if let Some(next) = next {
                earliest = Some(earliest.map_or(next, |e: i64| e.min(next)));
            }
            for attempt in plan_attempts(target, due, room) {
                let ids = attempt.ids();
                busy.entry(name.clone()).or_default().push(ids.clone());
                let (store, target, observer, name) = (
                    store.clone(),
                    target.clone(),
                    observer.clone(),
                    name.clone(),
                );
                in_flight.spawn(async move {
                    let mut failed = false;
                    for (file, outcome) in run_attempt(&store, &target, attempt, observer.as_ref()).await {
                        if let Err((error, _)) = outcome {
                            tracing::error!(file = %file.remote_name, %error, "upload attempt failed; retrying after check_interval");
                            failed = true;
                        }
                    }
                    (name, ids, failed)
                });
            }
        }
        let now = store::now_ms();
        let until_due = earliest
            .filter(|t| *t > now)
            .map(|t| Duration::from_millis((t - now) as u64))
            .unwrap_or(check_interval);
        let sleep = until_due.min(check_interval).max(Duration::from_millis(10));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Ok(done) = done {
                    finish(done, &mut busy, &mut cooling, check_interval);
                }
            }
        }
        // Collect every other finished task without waiting.
        while let Some(done) = in_flight.try_join_next() {
            if let Ok(done) = done {
                finish(done, &mut busy, &mut cooling, check_interval);
            }
        }
        // Files whose attempt failed outside the retry schedule (the store
        // could not record it, e.g. a full disk) wait a check_interval.
        let now = std::time::Instant::now();
        cooling.retain(|_, (_, until)| *until > now);
    }
    if !in_flight.is_empty() {
        let n = in_flight.len();
        let finished = tokio::time::timeout(grace, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                files = n,
                ?grace,
                "uploads still in flight after the grace period; abandoning them (they resume at the next start)"
            );
            in_flight.abort_all();
        }
    }
}

/// Books a finished attempt: the file is free again, or cooling down when the
/// attempt failed without being recorded.
fn finish(
    (name, ids, failed): (String, Vec<i64>, bool),
    busy: &mut HashMap<String, Vec<Vec<i64>>>,
    cooling: &mut HashMap<i64, (String, std::time::Instant)>,
    check_interval: Duration,
) {
    let attempts = busy.entry(name.clone()).or_default();
    if let Some(at) = attempts.iter().position(|a| *a == ids) {
        attempts.swap_remove(at);
    }
    if failed {
        let until = std::time::Instant::now() + check_interval;
        for id in ids {
            cooling.insert(id, (name.clone(), until));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_in_flight_stay_within_chunk_size_times_concurrency() {
        let mut config = TargetConfig::new("t", "http://127.0.0.1:9/upload");
        config.chunk_size = 1 << 20;
        config.concurrency = 2;
        let target = TargetRuntime::new(config).unwrap();
        let wait = Duration::from_millis(50);
        let first = target.reserve(1 << 20).await;
        let small = target.reserve(4096).await;
        // A whole chunk more does not fit until something is released.
        assert!(
            tokio::time::timeout(wait, target.reserve(1 << 20))
                .await
                .is_err()
        );
        drop(small);
        let second = tokio::time::timeout(wait, target.reserve(1 << 20)).await;
        assert!(second.is_ok());
        drop(first);
        // A chunk larger than chunk_size (buffered before a reload) still fits.
        drop(second);
        assert!(
            tokio::time::timeout(wait, target.reserve(8 << 20))
                .await
                .is_ok()
        );
    }

    fn queued(id: i64, size: u64, chunk_size: u64) -> FileRecord {
        FileRecord {
            id,
            spool: "s".into(),
            rel_path: format!("f{id}"),
            remote_name: format!("f{id}"),
            target: "t".into(),
            size,
            sha256: String::new(),
            chunk_count: size.div_ceil(chunk_size).max(1),
            upload_id: format!("upload-id-for-test-{id:04}"),
            state: "queued",
            failure: None,
            server_name: None,
            created_at: 0,
            confirmed_at: None,
            chunks_uploaded: 0,
            retries: 0,
            next_attempt: None,
            last_error: None,
        }
    }

    fn shapes(attempts: &[Attempt]) -> Vec<Vec<i64>> {
        attempts.iter().map(Attempt::ids).collect()
    }

    #[test]
    fn small_files_share_batches_within_the_file_byte_and_slot_limits() {
        let mut config = TargetConfig::new("t", "http://127.0.0.1:9/upload");
        config.chunk_size = 10_000;
        let target = TargetRuntime::new(config).unwrap();
        let files = |sizes: &[u64]| -> Vec<FileRecord> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, size)| queued(i as i64 + 1, *size, 10_000))
                .collect()
        };
        // Batches not announced: one file per attempt, as many as there are slots.
        let plan = plan_attempts(&target, files(&[10, 10, 10]), 2);
        assert_eq!(shapes(&plan), [vec![1], vec![2]]);

        let mut headers = HeaderMap::new();
        headers.insert(protocol::RESUMABLE, HeaderValue::from_static("1"));
        headers.insert(protocol::BATCH, HeaderValue::from_static("3"));
        target.client.note_resumable(&headers);
        assert_eq!(target.client.batch_limit(), 3);
        // At most 3 files (the receiver's limit) and 10,000 bytes per batch; a
        // file of several chunks goes alone and splits the run; a lone small
        // file is sent as a single request.
        let plan = plan_attempts(
            &target,
            files(&[10, 10, 10, 10, 6_000, 5_000, 25_000, 10, 10]),
            10,
        );
        assert_eq!(
            shapes(&plan),
            [vec![1, 2, 3], vec![4, 5], vec![6], vec![7], vec![8, 9]]
        );
        assert!(matches!(plan[2], Attempt::One(_)));
        // Slots bound the attempts; the files beyond wait for the next round.
        let plan = plan_attempts(&target, files(&[10; 10]), 2);
        assert_eq!(shapes(&plan), [vec![1, 2, 3], vec![4, 5, 6]]);

        // Once the batch route was refused, later announcements are ignored.
        target.client.forget_batches();
        target.client.note_resumable(&headers);
        assert_eq!(target.client.batch_limit(), 0);
    }

    #[test]
    fn batch_and_status_urls_keep_the_query_string() {
        let client = |url: &str| TargetClient::new(&TargetConfig::new("t", url)).unwrap();
        assert_eq!(
            client("http://h:1/upload").below("batch"),
            "http://h:1/upload/batch"
        );
        assert_eq!(
            client("https://h/in/upload/?tenant=a").below("batch"),
            "https://h/in/upload/batch?tenant=a"
        );
        assert_eq!(
            client("http://h/upload?k=v").below("abcdefabcdefabcdef"),
            "http://h/upload/abcdefabcdefabcdef?k=v"
        );
    }

    #[test]
    fn the_schedule_doubles_from_one_second_and_caps_at_sixty() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), 2.0).unwrap();
        let secs: Vec<u64> = (1..=8).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.delay(10_000), Duration::from_secs(60));
        let jittered = b.delay_with_jitter(3, 0.999);
        assert!(jittered >= Duration::from_secs(4) && jittered <= Duration::from_millis(4400));
        assert_eq!(b.delay_with_jitter(9, 0.9), Duration::from_secs(60));
    }

    #[test]
    fn backoff_is_validated() {
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1), 2.0).is_err());
        assert!(Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 0.5).is_err());
        assert!(Backoff::new(Duration::from_secs(1), Duration::from_secs(1), f64::NAN).is_err());
    }

    fn status(code: u16, error: &str, retry_after: Option<u64>) -> UploadError {
        UploadError::Status {
            url: "u".into(),
            status: code,
            error: error.into(),
            message: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    #[test]
    fn retry_decisions() {
        assert_eq!(status(500, "", None).retry(), Retry::Backoff);
        assert_eq!(status(507, "", None).retry(), Retry::Backoff);
        assert_eq!(status(408, "", None).retry(), Retry::Backoff);
        assert_eq!(
            status(429, "", Some(7)).retry(),
            Retry::NotBefore(Duration::from_secs(7))
        );
        assert_eq!(status(429, "", None).retry(), Retry::Backoff);
        assert_eq!(status(401, "", None).retry(), Retry::AtMaximum);
        assert_eq!(status(403, "", None).retry(), Retry::AtMaximum);
        assert_eq!(
            status(422, protocol::CHUNK_MISMATCH_ERROR, None).retry(),
            Retry::Backoff
        );
        assert_eq!(
            status(422, protocol::FILE_MISMATCH_ERROR, None).retry(),
            Retry::Restart
        );
        assert_eq!(status(400, "Invalid filename", None).retry(), Retry::Never);
        assert_eq!(status(413, "", None).retry(), Retry::Never);
        assert_eq!(status(409, "", None).retry(), Retry::Never);
        let transport = UploadError::Transport {
            url: "u".into(),
            message: "refused".into(),
        };
        assert_eq!(transport.retry(), Retry::Backoff);
    }
}
