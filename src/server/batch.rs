//! Batches (`POST /upload/batch`): many whole small files in one request,
//! each the single chunk of its own upload id, so that a file may move between
//! batches and single resumable requests across retries and gets the answer a
//! single request would have had.
//!
//! The new files of a batch share their syncs. Each is written to its staging
//! file and checked against its hash as the body streams in, with writeback
//! started at once; nothing is recorded until the whole body has arrived
//! cleanly (a batch cut off records nothing and removes its staging files).
//! Then: each file's data is synced, the staging directory once, and one
//! synced commit records every file with its chunk and chosen final name in
//! phase finalizing (no upload of a batch is ever recorded while receiving);
//! the files are renamed without replacing anything; each destination
//! directory and the staging directory are synced once; and one unsynced
//! commit records them all complete. A crash anywhere is finished by the same
//! recovery as a resumable upload's completion. Files known before the batch,
//! and new ones whose name was taken meanwhile, are completed one by one.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::body::{self, stream_body};
use super::errors::{
    ApiError, body_error, checksum_mismatch, chunk_differs, open_error, too_large_batch,
    too_large_file, upload_id_in_use,
};
use super::headers::{header_str, number, within_declared_limit};
use super::paths::{self, Destination};
use super::serve::Authorized;
use super::state::{ChunkRecord, FileMeta, UploadPhase};
use super::{Receiver, blocking};
use crate::protocol::{self, BatchEntry, BatchManifest, BatchReply, BatchResult};

/// `POST /upload/batch`: whole small files, many per request. The body is a
/// JSON manifest of `X-Manifest-Length` bytes, then the files' bytes back to
/// back. Each file is treated as the single chunk of its upload id, so a file
/// may move between batches and single requests across retries; the reply
/// gives each file the answer a single request would have had.
pub(super) async fn receive_batch(
    State(receiver): State<Receiver>,
    sender: Authorized,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let manifest_len = match header_str(&headers, protocol::MANIFEST_LENGTH)? {
        Some(v) => number("X-Manifest-Length", v)?,
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
    let limit = manifest_len.saturating_add(receiver.inner.max_chunk_bytes);
    let Some(body) = within_declared_limit(&headers, body, limit).await else {
        return Err(too_large_batch(receiver.inner.max_chunk_bytes));
    };
    let inner = &receiver.inner;
    let (max_bytes, idle) = (inner.max_chunk_bytes, inner.read_timeout);
    let too_long = |_| too_large_batch(max_bytes);
    let mut body = body;
    let (raw, rest) = body::read_prefix(&mut body, manifest_len as usize, idle)
        .await
        .map_err(|e| body_error(e, too_long))?;
    let mut entries = blocking(move || parse_manifest(&raw, max_bytes)).await?;
    for (entry, meta) in &mut entries {
        entry.file_name = receiver.recorded_name(&sender, &entry.file_name);
        meta.client_name = entry.file_name.clone();
    }

    let guards = inner
        .locks
        .lock_uploads(entries.iter().map(|(e, _)| e.upload_id.as_str()))
        .await;
    let intake = BatchIntake {
        receiver: receiver.clone(),
        named_client: sender.client.clone(),
        entries,
        plans: Vec::new(),
        current: None,
        failure: None,
        _guards: guards,
    };
    let results = stream_body(body, rest, max_bytes, idle, intake)
        .await
        .map_err(|e| body_error(e, too_long))??;
    Ok(axum::Json(BatchReply { files: results }).into_response())
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

/// A batch's body as it arrives, on the writer threads: each file is planned
/// when its first byte (or, empty, its turn) comes, written to its staging
/// file and checked, or skipped; at the end the new files are recorded and
/// renamed together. The locks of every file are held until it is finished.
struct BatchIntake {
    receiver: Receiver,
    /// The named client sending the batch, recorded with its new uploads.
    named_client: Option<String>,
    entries: Vec<(BatchEntry, FileMeta)>,
    /// One per file already read, in manifest order.
    plans: Vec<BatchPlan>,
    /// The file being read.
    current: Option<Incoming>,
    /// The body itself failed: the batch is refused as a whole.
    failure: Option<ApiError>,
    _guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
}

/// A file of a batch being read: its plan, and for a new file its hash and
/// the first write error.
struct Incoming {
    plan: BatchPlan,
    left: u64,
    offset: u64,
    hasher: Sha256,
    write_error: Option<ApiError>,
}

impl BatchIntake {
    /// Plans the next file of the manifest, if any is left.
    fn open_next(&mut self) -> bool {
        let Some((entry, meta)) = self.entries.get(self.plans.len()) else {
            return false;
        };
        let plan = self
            .receiver
            .plan_batch_entry(entry, meta)
            .unwrap_or_else(BatchPlan::Refused);
        self.current = Some(Incoming {
            plan,
            left: entry.size,
            offset: 0,
            hasher: Sha256::new(),
            write_error: None,
        });
        true
    }

    /// Settles the current file once all its bytes are read.
    fn close_if_read(&mut self) {
        if self.current.as_ref().is_none_or(|c| c.left > 0) {
            return;
        }
        let Some(incoming) = self.current.take() else {
            return;
        };
        let entry = &self.entries[self.plans.len()].0;
        let plan = match incoming.plan {
            BatchPlan::Write { file, dest } => {
                let actual = hex::encode(incoming.hasher.finalize());
                let refusal = match incoming.write_error {
                    Some(e) => Some(e),
                    None if actual != entry.sha256 => Some(checksum_mismatch(0, &actual)),
                    None => None,
                };
                match refusal {
                    Some(refusal) => {
                        self.receiver.discard_staged(&entry.upload_id);
                        BatchPlan::Refused(refusal)
                    }
                    None => {
                        crate::disk::start_writeback(&file, 0, 0);
                        BatchPlan::New { dest }
                    }
                }
            }
            other => other,
        };
        self.plans.push(plan);
    }

    /// The body ended before the file being read, or before the manifest's
    /// last files: the batch fails.
    fn ended_early(&mut self) -> ApiError {
        let idx = self.plans.len();
        if let Some(incoming) = self.current.take() {
            let entry = &self.entries[idx].0;
            if matches!(incoming.plan, BatchPlan::Write { .. }) {
                self.receiver.discard_staged(&entry.upload_id);
            }
            if incoming.offset > 0 {
                return ApiError::BadRequest(format!(
                    "the body ended inside file {} of the batch ({} of {} bytes missing)",
                    entry.upload_id, incoming.left, entry.size
                ));
            }
        }
        ApiError::BadRequest("the body ended before the files the manifest lists".to_owned())
    }
}

impl body::Intake for BatchIntake {
    type Output = Result<Vec<BatchResult>, ApiError>;

    fn take(&mut self, mut bytes: Bytes) -> bool {
        use std::os::unix::fs::FileExt;
        while !bytes.is_empty() {
            if self.current.is_none() && !self.open_next() {
                self.failure = Some(ApiError::BadRequest(
                    "the body is longer than the files the manifest lists".to_owned(),
                ));
                return false;
            }
            let Some(incoming) = self.current.as_mut() else {
                return false;
            };
            let piece = bytes.split_to(incoming.left.min(bytes.len() as u64) as usize);
            if let BatchPlan::Write { file, .. } = &incoming.plan {
                incoming.hasher.update(&piece);
                if incoming.write_error.is_none()
                    && let Err(e) = file.write_all_at(&piece, incoming.offset)
                {
                    incoming.write_error = Some(ApiError::from(e));
                }
            }
            incoming.offset += piece.len() as u64;
            incoming.left -= piece.len() as u64;
            self.close_if_read();
        }
        true
    }

    fn finish(mut self, clean: bool) -> Self::Output {
        // Empty files after the last byte need no bytes; any other file left
        // means the body ended early.
        while self.failure.is_none() && self.plans.len() < self.entries.len() {
            if self.current.is_none() {
                self.open_next();
            }
            self.close_if_read();
            if self.current.is_some() {
                self.failure = Some(self.ended_early());
            }
        }
        // A body cut off (or over its limit) right after the last file is no
        // batch either: its error is the reply, so nothing may be recorded.
        if self.failure.is_none() && !clean {
            self.failure = Some(ApiError::BadRequest(
                "the request body did not end cleanly".to_owned(),
            ));
        }
        if let Some(e) = self.failure.take() {
            if self.current.is_some() {
                self.ended_early();
            }
            for ((entry, _), plan) in self.entries.iter().zip(&self.plans) {
                if matches!(plan, BatchPlan::New { .. }) {
                    self.receiver.discard_staged(&entry.upload_id);
                }
            }
            return Err(e);
        }
        let plans = std::mem::take(&mut self.plans);
        self.receiver
            .settle_batch(&self.entries, plans, self.named_client.as_deref())
    }
}

impl Receiver {
    /// Once a batch's body has arrived cleanly: records and renames its new
    /// files together, and completes the others one by one.
    fn settle_batch(
        &self,
        entries: &[(BatchEntry, FileMeta)],
        plans: Vec<BatchPlan>,
        named_client: Option<&str>,
    ) -> Result<Vec<BatchResult>, ApiError> {
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
        for (i, outcome) in self.finalize_batch(entries, fresh, named_client) {
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
                return Err(upload_id_in_use(&entry.upload_id, &upload.meta));
            }
            if upload.phase != UploadPhase::Receiving {
                return Ok(BatchPlan::Known);
            }
            if let Some(chunk) = inner.state.chunk(&entry.upload_id, 0)? {
                // One recorded from a single request checked by its CRC-32C
                // is not compared: completion checks the file's SHA-256.
                if super::headers::checks_differ(&chunk.sha256, &entry.sha256) {
                    return Err(chunk_differs(&entry.upload_id, 0));
                }
                return Ok(BatchPlan::Known);
            }
        }
        inner.hashes.forget(&entry.upload_id);
        // Opened by path: a staging directory mounted over or gone answers
        // 503 naming it, as the resumable path does, rather than 500.
        paths::current(&inner.staging)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(inner.staging_path.join(&entry.upload_id))?;
        Ok(BatchPlan::Write { file, dest })
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
        named_client: Option<&str>,
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
        if let Err(e) = inner.state.record_finalizing(&records, named_client) {
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
pub(super) fn parse_manifest(
    raw: &[u8],
    max_bytes: u64,
) -> Result<Vec<(BatchEntry, FileMeta)>, ApiError> {
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
    // Sizes whose sum does not fit 64 bits are too large whatever the limit.
    let total = manifest
        .files
        .iter()
        .try_fold(0u64, |sum, f| sum.checked_add(f.size));
    if total.is_none_or(|total| total > max_bytes) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: char, size: u64) -> serde_json::Value {
        serde_json::json!({
            "uploadId": id.to_string().repeat(16),
            "fileName": "a.bin",
            "size": size,
            "sha256": "0".repeat(64),
        })
    }

    // Found while writing the batch_manifest fuzz invariant: sizes that add up past 64 bits
    // saturated to u64::MAX and so fit a limit of u64::MAX.
    #[test]
    fn sizes_that_overflow_together_are_too_large_for_any_limit() {
        let raw = serde_json::json!({ "files": [entry('a', u64::MAX), entry('b', 1)] });
        let raw = serde_json::to_vec(&raw).unwrap();
        let error = parse_manifest(&raw, u64::MAX).unwrap_err();
        assert_eq!(error.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        let raw = serde_json::json!({ "files": [entry('a', u64::MAX - 1), entry('b', 1)] });
        let entries = parse_manifest(&serde_json::to_vec(&raw).unwrap(), u64::MAX).unwrap();
        assert_eq!(entries.len(), 2);
    }
}
