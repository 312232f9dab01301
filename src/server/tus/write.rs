//! The bytes of a tus upload: one PATCH (or the body of a creating POST)
//! written at the upload's offset into its staging file, and the upload's
//! completion once its offset reaches its length.
//!
//! A PATCH holds its upload's `<id>#0` lock from before it reads the offset
//! until its bytes are recorded, so PATCHes of one upload never interleave
//! and expiry, termination and the staging sweep wait for it. The bytes go
//! through the receiver's bounded writer threads (see `body`); the intake that
//! writes them also ends the PATCH on a writer thread, even when the client
//! went away: it syncs the bytes, then records them as the upload's next
//! chunk with a synced commit, so that the offset a client is told (or finds
//! with HEAD after any crash) never counts a byte that could be lost. Bytes
//! of a body cut off are kept too, as tus asks, unless the client sent an
//! `Upload-Checksum`, which only the whole body can match.
//!
//! While a body arrives, every few MiB written are handed to the kernel's
//! writeback at once: tus clients send large PATCHes (tus-js-client's
//! `chunkSize`, often tens of MiB), and a sync that found them all dirty
//! would keep the client waiting for the whole chunk's disk write after it
//! sent the last byte, instead of overlapping the two.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use sha1::Digest;
use tokio::sync::OwnedMutexGuard;

use super::TusError;
use super::headers::Checksum;
use crate::server::body::{self, BodyError, Intake};
use crate::server::errors::{ApiError, body_error};
use crate::server::hashes::{self, Claim, Known};
use crate::server::state::{ChunkRecord, OPEN_CHUNK_COUNT, TusUpload, UploadPhase};
use crate::server::{Receiver, blocking};
use crate::sha256::Sha256Stream;

/// Bytes written between two hand-overs to the kernel's writeback.
const WRITEBACK_STEP: u64 = 4 << 20;

/// How far a PATCH got.
pub(super) struct Written {
    /// The upload's offset after it.
    pub(super) offset: u64,
    /// The `<id>#0` lock, still held.
    pub(super) lock: OwnedMutexGuard<()>,
}

/// Writes `body` at `offset` of the upload, which the caller checked is the
/// upload's offset, under `lock`; `declared_len` is the body's
/// `Content-Length`.
pub(super) async fn write_patch(
    receiver: &Receiver,
    upload_id: &str,
    upload: &TusUpload,
    lock: OwnedMutexGuard<()>,
    checksum: Option<Checksum>,
    declared_len: Option<u64>,
    body: Body,
) -> Result<Written, TusError> {
    let inner = &receiver.inner;
    let offset = upload.offset;
    // With a deferred length the body may go up to the largest file allowed.
    let end = match upload.length {
        Some(length) => length,
        None if inner.max_file_bytes > 0 => inner.max_file_bytes,
        None => i64::MAX as u64,
    };
    let room = end.saturating_sub(offset);
    let past_end = |len: u64| {
        TusError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            match upload.length {
                Some(length) => format!(
                    "{len} bytes at Upload-Offset {offset} go past Upload-Length {length}; nothing was written"
                ),
                None => format!(
                    "{len} bytes at Upload-Offset {offset} go past the largest file allowed ({end} bytes, server max_file_bytes)"
                ),
            },
        )
    };
    if let Some(len) = declared_len
        && len > room
    {
        if len - room <= body::DRAIN_BYTES {
            body::drain(body).await;
        }
        return Err(past_end(len));
    }
    if upload.phase != UploadPhase::Receiving || declared_len == Some(0) {
        return Ok(Written { offset, lock });
    }
    let staging_path = inner.staging_path.join(upload_id);
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
        .claim(upload_id, upload.chunks, offset, OPEN_CHUNK_COUNT);
    // The PATCH's own SHA-256 is only worked out when the client asks for
    // it to be checked, or when it is the file's: a quarter of the
    // receiver's CPU went to hashing every byte twice.
    let chunk_hash = matches!(checksum, Some(Checksum::Sha256(_)))
        || claim.as_ref().is_some_and(Claim::is_whole);
    let intake = PatchIntake {
        receiver: receiver.clone(),
        upload_id: upload_id.to_owned(),
        chunk_idx: upload.chunks,
        offset,
        upload_length: upload.length,
        claim,
        chunk_hash,
        file,
        chunk_sha256: Sha256Stream::new(),
        sha1: matches!(checksum, Some(Checksum::Sha1(_))).then(sha1::Sha1::new),
        checksum,
        length: 0,
        written_back: 0,
        error: None,
        lock,
    };
    let limit = inner.max_chunk_bytes.min(room);
    let result = body::stream_body(body, Bytes::new(), limit, inner.read_timeout, intake).await;
    let too_long = |_| {
        if inner.max_chunk_bytes < room {
            TusError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "a PATCH body may be at most {} bytes (server max_chunk_bytes); the bytes before that limit were kept, send the rest in smaller requests",
                    inner.max_chunk_bytes
                ),
            )
        } else {
            past_end(limit + 1)
        }
    };
    match result {
        Err(BodyError::TooLong { limit }) => Err(too_long(limit)),
        Err(e) => Err(body_error(e, |_| ApiError::Internal(String::new())).into()),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(done)) if done.checksum_failed => Err(TusError::new(
            StatusCode::from_u16(460).expect("460 is a valid status"),
            format!(
                "the body does not match its Upload-Checksum; nothing of it was kept, send it again from Upload-Offset {offset}"
            ),
        )),
        Ok(Ok(done)) => Ok(Written {
            offset: done.offset,
            lock: done.lock,
        }),
    }
}

/// One PATCH body on its way to the staging file (see the module doc).
struct PatchIntake {
    receiver: Receiver,
    upload_id: String,
    chunk_idx: u64,
    offset: u64,
    /// The upload's length, when known: the PATCH that reaches it is the last.
    upload_length: Option<u64>,
    claim: Option<Claim>,
    /// Whether the PATCH's own SHA-256 is needed (see `patch`); when not,
    /// its record carries none.
    chunk_hash: bool,
    file: File,
    chunk_sha256: Sha256Stream,
    sha1: Option<sha1::Sha1>,
    checksum: Option<Checksum>,
    length: u64,
    /// How much of `length` was handed to the kernel's writeback.
    written_back: u64,
    error: Option<io::Error>,
    lock: OwnedMutexGuard<()>,
}

struct Done {
    offset: u64,
    checksum_failed: bool,
    lock: OwnedMutexGuard<()>,
}

impl Intake for PatchIntake {
    type Output = Result<Done, ApiError>;

    fn take(&mut self, bytes: Bytes) -> bool {
        if let Err(e) = self.file.write_all_at(&bytes, self.offset + self.length) {
            self.error = Some(e);
            return false;
        }
        match (&mut self.claim, self.chunk_hash) {
            (Some(claim), true) => claim.update(&mut self.chunk_sha256, &bytes),
            (Some(claim), false) => claim.update_file(&bytes),
            (None, true) => self.chunk_sha256.update(&bytes),
            (None, false) => {}
        }
        if let Some(sha1) = &mut self.sha1 {
            sha1.update(&bytes);
        }
        self.length += bytes.len() as u64;
        if self.length - self.written_back >= WRITEBACK_STEP {
            crate::disk::start_writeback(
                &self.file,
                self.offset + self.written_back,
                self.length - self.written_back,
            );
            self.written_back = self.length;
        }
        true
    }

    fn finish(self, clean: bool) -> Result<Done, ApiError> {
        let inner = &self.receiver.inner;
        let id = self.upload_id.as_str();
        // Bytes written but not recorded leave the file's hash unknown.
        let spoil = || inner.hashes.spoil(id);
        if let Some(e) = self.error {
            spoil();
            return Err(e.into());
        }
        let chunk_sha256 = if self.chunk_hash {
            self.chunk_sha256.finalize_hex()
        } else {
            String::new()
        };
        let checksum_ok = self.checksum.as_ref().map(|expected| match expected {
            Checksum::Sha256(digest) => hex::encode(digest) == chunk_sha256,
            Checksum::Sha1(digest) => self
                .sha1
                .map(|h| h.finalize().as_slice() == digest)
                .unwrap_or(false),
        });
        let keep = self.length > 0
            && match checksum_ok {
                None => true,
                Some(ok) => clean && ok,
            };
        if !keep {
            if self.length > 0 {
                spoil();
            }
            return Ok(Done {
                offset: self.offset,
                checksum_failed: clean && checksum_ok == Some(false),
                lock: self.lock,
            });
        }
        let record = ChunkRecord {
            chunk_idx: self.chunk_idx,
            offset: self.offset,
            length: self.length,
            sha256: chunk_sha256,
        };
        let recorded = self
            .file
            .sync_data()
            .map_err(ApiError::from)
            .and_then(|()| Ok(inner.state.record_tus_chunk(id, &record)?));
        if let Err(e) = recorded {
            spoil();
            return Err(e);
        }
        if let Some(claim) = self.claim {
            inner
                .hashes
                .extend(id, claim, record.length, &record.sha256);
        }
        if self.upload_length == Some(record.offset + record.length) {
            crate::failpoint::hit(crate::failpoint::SERVER_TUS_AFTER_LAST_RECORD);
        }
        tracing::debug!(
            upload_id = id,
            offset = record.offset,
            bytes = record.length,
            "tus bytes recorded"
        );
        Ok(Done {
            offset: record.offset + record.length,
            checksum_failed: false,
            lock: self.lock,
        })
    }
}

/// Completes an upload whose offset reached its length, or finishes one a
/// crash left half-way through completion; returns the final name. The
/// caller holds the upload's `<id>#0` lock.
pub(super) async fn complete(receiver: &Receiver, upload_id: &str) -> Result<String, TusError> {
    let this = receiver.clone();
    let id = upload_id.to_owned();
    let upload = blocking(move || {
        let Some(upload) = this.inner.state.tus_upload(&id)? else {
            return Err(ApiError::NotFound);
        };
        if upload.phase == UploadPhase::Receiving {
            let length = upload.length.unwrap_or(upload.offset);
            // A declared SHA-256 is what completion checks the file against;
            // otherwise the file's own hash is recorded, worked out here (from
            // what was followed while bytes arrived) and handed to completion.
            let sha256 = match &upload.declared_sha256 {
                Some(declared) => declared.clone(),
                None => {
                    let sha256 = this.file_sha256(&id, length)?;
                    this.inner.hashes.settle(&id, sha256.clone());
                    sha256
                }
            };
            this.inner.state.seal_tus(&id, upload.chunks, &sha256)?;
        }
        Ok(upload)
    })
    .await?;
    match receiver.finalize(upload_id).await {
        Ok(name) => Ok(name),
        Err(ApiError::FileMismatch(why)) => Err(TusError::new(
            StatusCode::from_u16(460).expect("460 is a valid status"),
            format!(
                "the received file does not match the sha256 of its Upload-Metadata ({}): {why}",
                upload.declared_sha256.as_deref().unwrap_or("none")
            ),
        )),
        Err(e) => Err(e.into()),
    }
}

impl Receiver {
    /// The SHA-256 of the first `length` bytes of a staged upload, reading
    /// back only what the followed hash does not cover.
    fn file_sha256(&self, upload_id: &str, length: u64) -> Result<String, ApiError> {
        let inner = &self.inner;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(inner.staging_path.join(upload_id))?;
        Ok(match inner.hashes.take(upload_id) {
            Known::Whole(sha256) => sha256,
            known => {
                let (mut hasher, len) = match known {
                    Known::Prefix { hasher, len } if len <= length => (hasher, len),
                    _ => (Sha256Stream::new(), 0),
                };
                hashes::hash_range(&file, len, length - len, &mut hasher)?;
                hasher.finalize_hex()
            }
        })
    }
}
