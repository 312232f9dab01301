//! The uploader's work done once, for the one-shot CLI and the library's
//! `Client`: one attempt at each due file, recorded exactly as the daemon
//! records it, with the error behind each failure handed back to the caller.

use std::collections::HashMap;

use crate::agent::store::{FileRecord, Store};

use super::batch::{plan_attempts, run_attempt};
use super::error::{Retry, UploadError};
use super::events::{UploadEvent, UploadObserver};
use super::file::FileOutcome;
use super::target::TargetRuntime;

/// One attempt at a queued file, as [`upload_files_once`] reports it.
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

/// One attempt at each of `files` (buffered files of `target`), with up to
/// the target's `concurrency` attempts in flight. Every outcome is recorded in
/// the store exactly as the daemon's [`run_uploader`](super::run_uploader)
/// records it. The attempts are returned in buffer order (oldest first).
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
