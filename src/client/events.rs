//! What the client tells its caller: progress events, summaries, errors, and
//! the callbacks that receive them.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::agent::ingest::IngestError;
use crate::agent::store::{FileRecord, StoreError};
use crate::agent::upload::{
    EventStatus, FileAttempt, FileOutcome, Retry, UploadError, UploadEvent, UploadObserver,
};

/// Whether a chunk was acknowledged or failed.
///
/// ```
/// use indexedcp::client::ChunkStatus;
/// assert_eq!(ChunkStatus::Success.as_str(), "success");
/// assert_eq!(ChunkStatus::Failed.as_str(), "failed");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStatus {
    /// The receiver acknowledged the chunk.
    Success,
    /// The attempt failed, or the file was parked; the event's `error` says
    /// why and `next_retry_in` when the chunk is tried again.
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
    /// (the key of
    /// [`Client::upload_buffered_files`](crate::client::Client::upload_buffered_files)'s
    /// map).
    pub file_name: String,
    /// The name sent to the receiver (`X-File-Name`): the file's base name.
    pub remote_name: String,
    /// The chunk's 0-based index; when one request carried several chunks,
    /// the last of them (0 for a file sent in a batch).
    pub chunk_index: u64,
    /// How many chunks the file has in all.
    pub chunk_count: u64,
    /// The whole file's size in bytes.
    pub file_size: u64,
    /// Whether this attempt succeeded.
    pub status: ChunkStatus,
    /// Failed attempts at this chunk so far (including this one when it failed).
    pub retry_count: u64,
    /// When the chunk is tried again (`None` after a success, or when the file
    /// was given up on).
    pub next_retry_in: Option<Duration>,
    /// Why the attempt failed, or why the file was parked; `None` after a
    /// success.
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
    /// Files the receiver confirmed in this round.
    pub succeeded: usize,
    /// Files of this round that were not delivered: still queued for a retry,
    /// or parked.
    pub failed: usize,
    /// Files attempted in this round: `succeeded + failed`.
    pub total: usize,
}

/// A file an upload could not deliver, and why.
///
/// ```
/// use indexedcp::client::FailedFile;
/// use indexedcp::client::Retry;
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
    /// The client's name for the file: its absolute path when it was added.
    pub file_name: String,
    /// The name sent to the receiver (`X-File-Name`).
    pub remote_name: String,
    /// What went wrong with the attempt, as a message.
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
    /// An upload was asked for, but
    /// [`ClientOptions::server_url`](crate::client::ClientOptions::server_url)
    /// is not set.
    #[error(
        "server_url required for upload: set ClientOptions::server_url (for example http://host:3000/upload)"
    )]
    NoServerUrl,
    /// An upload was asked for, but no API key is set, neither in
    /// [`ClientOptions::api_key`](crate::client::ClientOptions::api_key) nor
    /// in `INDEXEDCP_API_KEY`.
    #[error("api_key required for upload: set ClientOptions::api_key or INDEXEDCP_API_KEY")]
    NoApiKey,
    /// An option is out of range (the retry delays or multiplier, or
    /// `chunk_size`), or `server_url` is not an `http://` or `https://` URL;
    /// the message says which.
    #[error("invalid client options: {0}")]
    InvalidOptions(String),
    /// The client was closed with
    /// [`Client::close`](crate::client::Client::close); nothing more can be
    /// buffered or sent through it.
    #[error("the client is closed")]
    Closed,
    /// The parent directory of
    /// [`ClientOptions::storage_path`](crate::client::ClientOptions::storage_path)
    /// could not be created.
    #[error("cannot create the directory {path} for the buffer: {source}")]
    StorageDir {
        /// The directory that could not be created.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The buffer failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A file could not be buffered.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// The upload engine could not be set up (its HTTP client could not be
    /// built). Failed upload attempts are reported as
    /// [`ClientError::Undelivered`] instead.
    #[error(transparent)]
    Upload(#[from] UploadError),
    /// Some files of an upload round were not delivered; they stay in the
    /// buffer, queued for a retry or parked.
    #[error("{}", undelivered_message(failed))]
    Undelivered {
        /// What was delivered before the failures (client name -> server name).
        delivered: HashMap<String, String>,
        /// The files that were not delivered, each with why.
        failed: Vec<FailedFile>,
    },
    /// A task on tokio's blocking pool panicked or was cancelled; the message
    /// is tokio's.
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

#[derive(Default)]
pub(super) struct Callbacks {
    pub(super) progress: RwLock<Option<ProgressCallback>>,
    pub(super) error: RwLock<Option<ErrorCallback>>,
    pub(super) complete: RwLock<Option<CompleteCallback>>,
}

/// Runs a user callback; a panic in it is logged, never propagated into the
/// upload engine.
pub(super) fn call<T: ?Sized>(slot: &RwLock<Option<Arc<T>>>, run: impl FnOnce(&T)) {
    let callback = slot.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(callback) = callback
        && std::panic::catch_unwind(AssertUnwindSafe(|| run(&callback))).is_err()
    {
        tracing::error!("an upload callback panicked; the upload goes on");
    }
}

/// Turns the engine's events into the original's progress events.
pub(super) struct CallbackObserver<'a> {
    pub(super) callbacks: &'a Callbacks,
    pub(super) files: HashMap<i64, FileRecord>,
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
pub(super) struct Round {
    pub(super) delivered: HashMap<String, String>,
    pub(super) failed: Vec<FailedFile>,
}

pub(super) fn round_of(attempts: Vec<FileAttempt>) -> Round {
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

#[cfg(test)]
mod tests {
    use super::*;

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
