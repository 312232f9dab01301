//! The resumable extension (requests with `X-Upload-Id`): each chunk is
//! written at its offset into one staging file per upload and recorded with
//! its hash, in any order and any number of times; `GET /upload/{id}` tells a
//! client which chunks are recorded. A chunk is recorded only after its bytes
//! are written and match `X-Chunk-Sha256` (or `X-Chunk-Crc32c`, which costs
//! the receiver a pass of SHA-256 less: the file's hash is still checked
//! whole at completion), but neither is synced: against a
//! crash of the process both survive (the page cache and the database's WAL
//! keep them), while after a power cut a lost record is a chunk the client
//! sends again and a record that outlived its bytes fails the whole-file
//! check at completion, which discards the upload for a fresh start.
//! Completion itself (see `finalize`) syncs before anything is renamed.

use std::fs::File;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};

use super::body::{self, BodyOutcome, Checks, Sink, read_body};
use super::errors::{
    ApiError, body_error, checksum_mismatch, chunk_differs, crc32c_mismatch, too_large_chunk,
    too_large_file, upload_id_in_use,
};
use super::hashes;
use super::headers::{Extension, checks_differ};
use super::serve::Authorized;
use super::state::{self, ChunkRecord, UploadPhase};
use super::{Receiver, blocking};
use crate::protocol::{self, ChunkReply, UploadStatus};

/// How long a chunk written ahead of its upload's hashed prefix waits for the
/// chunks in front of it before it is hashed on its own (see
/// [`receive_resumable`]). They were sent before it, so they normally arrive
/// within milliseconds; one that lags (its connection slower, or gone) costs
/// this chunk's reply at most this much, and a second pass of SHA-256.
const PREFIX_WAIT: Duration = Duration::from_millis(100);

/// `GET /upload/{upload_id}`: the chunks recorded for an upload, or its final
/// name once complete. An upload found fully received but not complete is
/// completed first, so the answer never asks for chunks already there.
pub(super) async fn upload_status(
    State(receiver): State<Receiver>,
    UrlPath(upload_id): UrlPath<String>,
    _: Authorized,
) -> Result<Response, ApiError> {
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
    // (Not before the file's hash is known: a chunk sent again with it
    // completes the upload.)
    if upload.phase != UploadPhase::Complete
        && received.len() as u64 == upload.meta.chunk_count
        && !upload.meta.file_sha256.is_empty()
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
        client: upload.named_client,
    })
    .into_response())
}

/// One chunk of a resumable upload: written at its offset into the upload's
/// staging file under the chunk's lock, checked against `X-Chunk-Sha256` and
/// `X-Chunk-Crc32c` (each one sent), then
/// recorded; the chunk that completes the set completes the upload.
pub(super) async fn receive_resumable(
    receiver: Receiver,
    sender: Authorized,
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

    let this = receiver.clone();
    let (id, meta) = (ext.upload_id.clone(), ext.meta.clone());
    let upload = blocking(move || {
        let state = &this.inner.state;
        // A new upload must fit in the free space before anything of it is
        // created: a file system refuses (or sparsely allocates) a file far
        // larger than it, and the declared size is the client's to choose.
        if state.upload(&id)?.is_none() {
            this.check_room(meta.file_size)?;
        }
        Ok::<_, ApiError>(state.get_or_create_upload(&id, &meta, sender.client.as_deref())?)
    })
    .await?;
    if !upload.meta.admits(&ext.meta) {
        return Err(upload_id_in_use(&ext.upload_id, &upload.meta));
    }
    // The first chunk that brings the file's hash to an upload created
    // without it records it; the upload completes only once it is known.
    let mut sha_known = !upload.meta.file_sha256.is_empty();
    if !sha_known && !ext.meta.file_sha256.is_empty() {
        let state = inner.state.clone();
        let (id, sha) = (ext.upload_id.clone(), ext.meta.file_sha256.clone());
        let recorded = blocking(move || state.learn_file_sha256(&id, &sha)).await?;
        if recorded != ext.meta.file_sha256 {
            let mut meta = upload.meta.clone();
            meta.file_sha256 = recorded;
            return Err(upload_id_in_use(&ext.upload_id, &meta));
        }
        sha_known = true;
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
    // The chunk's own checks, each one its headers declare.
    let checks = Checks {
        sha256: ext.chunk_sha256.is_some(),
        crc32c: ext.chunk_crc32c.is_some(),
    };
    let check = ext.recorded_check();
    let (duplicate, received, chunk_guard) = if let Some(recorded) = recorded {
        // A check of the other kind (the client changed how it checks
        // chunks) is still checked against the bytes below.
        if recorded.offset != ext.offset || checks_differ(&recorded.sha256, &check) {
            return Err(chunk_differs(&ext.upload_id, chunk_idx));
        }
        let (outcome, ()) = body::write_body(body, None, checks, (), limit, inner.read_timeout)
            .await
            .map_err(|e| body_error(e, too_long))?;
        verify_chunk(&ext, chunk_idx, &outcome)?;
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
        let this = receiver.clone();
        let file = blocking(move || {
            // A staging directory mounted over or gone is a 503, not a 500.
            super::paths::current(&this.inner.staging)?;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(staging_path)
        })
        .await?;
        let claim = inner
            .hashes
            .claim(&ext.upload_id, chunk_idx, ext.offset, ext.meta.chunk_count);
        // A chunk that arrives while the ones in front of it are still on
        // their way (a client sends several at once) is hashed after its
        // write, read back, once they are in the file's hash: then its bytes
        // go through SHA-256 once for both hashes, not once for the chunk now
        // and again for the file later.
        let deferred = claim.is_none() && inner.hashes.ahead_of_prefix(&ext.upload_id, ext.offset);
        let reader = if deferred {
            Some(file.try_clone()?)
        } else {
            None
        };
        let sink = Sink {
            file,
            offset: ext.offset,
            sync: false,
            claim,
            hash: checks.sha256 && reader.is_none(),
        };
        let (mut outcome, unrecorded) = body::write_body(
            body,
            Some(sink),
            checks,
            unrecorded,
            limit,
            inner.read_timeout,
        )
        .await
        .map_err(|e| body_error(e, too_long))?;
        if let Some(reader) = reader {
            inner
                .hashes
                .wait_for_prefix(&ext.upload_id, ext.offset, PREFIX_WAIT)
                .await;
            let this = receiver.clone();
            let id = ext.upload_id.clone();
            let (offset, length, count) = (ext.offset, outcome.length, ext.meta.chunk_count);
            let own = checks.sha256;
            let (sha256, claim) = blocking(move || {
                let mut claim = this.inner.hashes.claim(&id, chunk_idx, offset, count);
                // A chunk checked by its CRC alone (worked out as it was
                // written) is read back only for the file's hash, and not
                // at all without the claim: the prefix catches up with it.
                let sha256 = if own || claim.is_some() {
                    hashes::hash_chunk(&reader, offset, length, claim.as_mut(), own)?
                } else {
                    String::new()
                };
                Ok::<_, std::io::Error>((sha256, claim))
            })
            .await?;
            if claim.is_none() && own {
                tracing::debug!(upload_id = %ext.upload_id, chunk = chunk_idx, "chunk hashed alone: the chunks in front of it did not arrive in time");
            }
            outcome.sha256 = sha256;
            outcome.claim = claim;
        }
        verify_chunk(&ext, chunk_idx, &outcome)?;
        let record = ChunkRecord {
            chunk_idx,
            offset: ext.offset,
            length: outcome.length,
            sha256: check,
        };
        let this = receiver.clone();
        let id = ext.upload_id.clone();
        let claim = outcome.claim;
        // The chunk's hash, which is the file's when the chunk is all of it.
        let chunk_sha256 = outcome.sha256;
        let count = blocking(move || {
            let count = this.inner.state.record_chunk(&id, &record)?;
            if let Some(claim) = claim {
                this.inner
                    .hashes
                    .extend(&id, claim, record.length, &chunk_sha256);
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

    // Another chunk may have brought the file's hash meanwhile.
    if received == ext.meta.chunk_count && !sha_known {
        let state = inner.state.clone();
        let id = ext.upload_id.clone();
        sha_known = blocking(move || state.upload(&id))
            .await?
            .is_some_and(|u| !u.meta.file_sha256.is_empty());
    }
    if received == ext.meta.chunk_count && sha_known {
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

/// Checks the chunk's bytes against each check its headers declared.
fn verify_chunk(ext: &Extension, chunk_idx: u64, outcome: &BodyOutcome) -> Result<(), ApiError> {
    if let Some(sha256) = &ext.chunk_sha256
        && outcome.sha256 != *sha256
    {
        return Err(checksum_mismatch(chunk_idx, &outcome.sha256));
    }
    if let Some(crc) = ext.chunk_crc32c
        && outcome.crc32c != Some(crc)
    {
        return Err(crc32c_mismatch(
            chunk_idx,
            outcome.crc32c.unwrap_or_default(),
        ));
    }
    Ok(())
}

impl Receiver {
    /// Refuses (507) a new upload of `file_size` bytes that cannot fit in the
    /// space left on the staging directory's file system.
    pub(super) fn check_room(&self, file_size: u64) -> Result<(), ApiError> {
        let fs = rustix::fs::fstatvfs(&self.inner.staging).map_err(std::io::Error::from)?;
        let free = fs.f_bavail.saturating_mul(fs.f_frsize);
        if file_size > free {
            return Err(ApiError::InsufficientStorage(format!(
                "X-File-Size {file_size} is more than the {free} bytes free on the receiver's disk; nothing was stored, send the file once space is freed"
            )));
        }
        Ok(())
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
