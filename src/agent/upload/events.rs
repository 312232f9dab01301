//! Progress as observers (the log, library callbacks) see it.

use std::time::Duration;

use crate::agent::store::FileRecord;

use super::error::UploadError;

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
