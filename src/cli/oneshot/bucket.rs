//! The one-shot upload into a bucket, `indexedcp FILE... s3://BUCKET/prefix/`:
//! the same buffer, the same ingest and the same one-attempt-per-file
//! uploader as the receiver form, with the agent's `s3` delivery where the
//! library's `Client` (which speaks only to receivers) would be. Files are
//! buffered under the one-shot commands' target, so `indexedcp add` followed
//! by an upload to a bucket sends what `add` buffered, as it does for a
//! receiver. Every blocking call (SQLite, reading files) runs on tokio's
//! blocking pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::agent::ingest::{self, PathIngest};
use crate::agent::store::{FileRecord, Layout, Store};
use crate::agent::upload::{
    self, EventStatus, FileOutcome, Retry, TargetRuntime, UploadEvent, UploadObserver,
};
use crate::client::{
    ChunkStatus, ClientError, DEFAULT_CHUNK_SIZE, DEFAULT_TARGET, FailedFile, ProgressCallback,
    ProgressEvent,
};
use crate::config::{S3Target, TargetConfig, TargetKind, TargetTls};

use super::Failure;

/// A bucket and the buffer whose files go into it.
pub(super) struct Bucket {
    store: Store,
    target: TargetRuntime,
    progress: std::sync::RwLock<Option<ProgressCallback>>,
}

/// The target the one-shot command sends to: `url` (`s3://BUCKET/prefix/`)
/// with the endpoint and region given, credentials from the environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, else the standard AWS
/// chain), the CAs of `--cacert` trusted for an `https://` endpoint, and
/// every other setting at its default. `--cert`/`--key` are refused: the
/// S3 client (object_store's `ClientOptions`) has no setting for a client
/// certificate, and ignoring them would send without the identity asked for.
pub(super) fn target(
    url: &str,
    endpoint: Option<&str>,
    region: Option<&str>,
    tls: TargetTls,
) -> Result<TargetConfig, Failure> {
    if tls.client_cert.is_some() {
        return Err(Failure::usage(format!(
            "--cert and --key are not supported for s3:// destinations ({url}): the S3 client \
             cannot present a client certificate; leave them out, or send to an indexedcp receiver"
        )));
    }
    if tls.ca_file.is_some()
        && !endpoint.is_some_and(|e| e.to_ascii_lowercase().starts_with("https://"))
    {
        return Err(Failure::usage(format!(
            "--cacert is used only with an https:// --endpoint, and {}; \
             give the bucket's https:// endpoint or leave --cacert out",
            match endpoint {
                Some(e) => format!("--endpoint is {e:?}"),
                None => "no --endpoint was given (AWS itself needs no extra CA)".to_owned(),
            }
        )));
    }
    let mut s3 = S3Target::new(url).map_err(|e| Failure::usage(format!("--server {e}")))?;
    if let Some(endpoint) = endpoint {
        let parsed = reqwest::Url::parse(endpoint).ok().filter(|u| {
            matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
        });
        if parsed.is_none() {
            return Err(Failure::usage(format!(
                "--endpoint {endpoint:?} is not an http:// or https:// URL with a host, \
                 for example http://127.0.0.1:9000"
            )));
        }
        s3.endpoint = Some(endpoint.trim_end_matches('/').to_owned());
    }
    s3.region = region.map(str::to_owned);
    let mut target = TargetConfig::new(DEFAULT_TARGET, url);
    target.chunk_size = DEFAULT_CHUNK_SIZE;
    target.kind = TargetKind::S3(s3);
    target.tls = tls;
    Ok(target)
}

async fn blocking<T: Send + 'static, E: Into<ClientError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ClientError::Task(e.to_string()))?
        .map_err(Into::into)
}

impl Bucket {
    /// Opens (creating) the buffer at `storage` and sets up the client of
    /// the bucket; nothing is sent yet.
    pub(super) async fn open(
        storage: PathBuf,
        target: TargetConfig,
    ) -> Result<Bucket, ClientError> {
        let target = TargetRuntime::new(target)?;
        let store = blocking(move || {
            if let Some(parent) = storage.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| ClientError::StorageDir {
                    path: parent.to_owned(),
                    source,
                })?;
            }
            Ok::<_, ClientError>(Store::open_as(&storage, Layout::ByName)?)
        })
        .await?;
        Ok(Bucket {
            store,
            target,
            progress: std::sync::RwLock::new(None),
        })
    }

    pub(super) fn on_upload_progress(&self, callback: ProgressCallback) {
        *self.progress.write().unwrap_or_else(|p| p.into_inner()) = Some(callback);
    }

    /// Buffers `path` under its base name, which becomes its key after the
    /// prefix.
    pub(super) async fn buffer_file(&self, path: &Path) -> Result<PathIngest, ClientError> {
        let (store, path) = (self.store.clone(), path.to_owned());
        let target = self.target.config.clone();
        let remote_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| ingest::IngestError::NotAFile { path: path.clone() })?;
        blocking(move || ingest::ingest_path(&store, &path, &remote_name, &target)).await
    }

    /// The one-shot commands' files in the buffer, oldest first.
    pub(super) async fn buffered_files(&self) -> Result<Vec<FileRecord>, ClientError> {
        let store = self.store.clone();
        let files = blocking(move || store.list()).await?;
        Ok(files
            .into_iter()
            .filter(|f| f.target == DEFAULT_TARGET)
            .collect())
    }

    /// One attempt at every queued file, whatever its retry schedule: the
    /// files confirmed (client name -> object key) and those not.
    pub(super) async fn upload_round(
        &self,
    ) -> Result<(HashMap<String, String>, Vec<FailedFile>), ClientError> {
        let store = self.store.clone();
        let files =
            blocking(move || store.due_files(DEFAULT_TARGET, i64::MAX, &[], usize::MAX, false))
                .await?;
        let observer = Progress {
            callback: self
                .progress
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            files: files.iter().map(|f| (f.id, f.clone())).collect(),
        };
        let attempts = upload::upload_files_once(&self.store, &self.target, &observer, files).await;
        let mut delivered = HashMap::new();
        let mut failed = Vec::new();
        for attempt in attempts {
            let file = attempt.file;
            match attempt.outcome {
                FileOutcome::Confirmed { server_name } => {
                    let key = server_name.unwrap_or_else(|| file.remote_name.clone());
                    delivered.insert(file.rel_path, key);
                }
                outcome => {
                    let (error, retry) = attempt
                        .error
                        .unwrap_or_else(|| ("not delivered".to_owned(), Retry::Backoff));
                    failed.push(FailedFile {
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
        Ok((delivered, failed))
    }

    /// Releases the buffer; closing its connections may checkpoint the WAL,
    /// so that happens off the executor.
    pub(super) async fn close(self) {
        let store = self.store;
        let _ = tokio::task::spawn_blocking(move || drop(store)).await;
    }
}

/// Turns the uploader's events into the progress events the one-shot
/// reporter draws its bars from.
struct Progress {
    callback: Option<ProgressCallback>,
    files: HashMap<i64, FileRecord>,
}

impl UploadObserver for Progress {
    fn on_event(&self, event: &UploadEvent) {
        let (Some(callback), Some(file)) = (&self.callback, self.files.get(&event.file_id)) else {
            return;
        };
        let status = match event.status {
            EventStatus::Success => ChunkStatus::Success,
            EventStatus::Failed | EventStatus::Parked { .. } => ChunkStatus::Failed,
            EventStatus::Complete { .. } => return,
        };
        callback(&ProgressEvent {
            file_name: file.rel_path.clone(),
            remote_name: file.remote_name.clone(),
            chunk_index: event.chunk_index,
            chunk_count: file.chunk_count,
            file_size: file.size,
            status,
            retry_count: event.retry_count,
            next_retry_in: event.next_retry_in,
            error: event.error.clone(),
        });
    }
}
