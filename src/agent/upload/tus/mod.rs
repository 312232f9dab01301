//! The `tus` kind: each file goes to a server speaking tus 1.0.0, the open
//! protocol for resumable uploads (tusd, @tus/server, hosted services, our
//! own receiver). A file is created with a POST (`Upload-Length`, and
//! `Upload-Metadata` with `filename` = the remote name, `sha256` and
//! `filetype` when known), then its chunks are PATCHed strictly in order,
//! one at a time, each with `Upload-Offset` (and `Upload-Checksum: sha256`
//! when the server's OPTIONS announces the checksum extension).
//!
//! Exactly once: the upload's URL is recorded in the buffer (synced) before
//! the first byte is sent, so an agent killed at any moment asks that same
//! upload how far it got instead of creating a second one. A tus server
//! accepts bytes only at its current offset, so what it holds is always a
//! prefix of the file, and the file counts as delivered only when the server
//! says its offset equals its length (a PATCH reply, or a HEAD after a
//! reply was lost). An upload the server forgot (404 or 410) is created
//! again, which is the documented at-least-once boundary: a server that
//! deletes uploads once they are complete can receive a file twice.
//!
//! Resuming: a HEAD gives the server's offset, which may fall inside a
//! chunk (a PATCH cut off in the middle). A chunk counts as received only
//! when it lies wholly below the offset; the offset is kept as a hint, and
//! the first chunk to send starts at the hint, so only its missing tail is
//! sent. Chunk boundaries are derived from the file's size and chunk count,
//! taking the largest chunk size those allow, so that a chunk is never
//! counted as received too early; a whole chunk below the offset that this
//! misses is recognised from the hint without sending it. A PATCH answered
//! 409 (the offset was not the server's) is followed by a HEAD and goes on
//! from the server's offset; a server behind what the buffer recorded fails
//! the attempt, and the next one starts from the server's offset.
//!
//! An empty file is complete the moment it is created, so a crash before its
//! URL is recorded would leave a complete copy behind: where the server has
//! `creation-defer-length`, it is created without a length, and the length
//! (0) follows in a PATCH once the URL is recorded. Without that extension,
//! an empty file is at least once.
//!
//! Not used, on purpose: `creation-with-upload` would send bytes before the
//! upload's URL is recorded, so a crash right after could leave a second
//! complete copy.
//!
//! Purging a file (`indexedcp purge`) deletes its upload on the server
//! (the termination extension) when the server announces that extension;
//! otherwise the incomplete upload is left to the server's expiration.

mod client;

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::agent::store::FileRecord;
use crate::config::TargetConfig;

use super::delivery::{Delivery, Finished, Piece, Resume, Sent, checked_chunk_sha256};
use super::error::UploadError;
use client::{Capabilities, Client, Patched, Progress};

/// PATCHes of one piece at most, when the server takes part of each or
/// answers 409: more means it is not making progress.
const MAX_ROUNDS: usize = 8;

/// Offset hints kept at most; beyond, they are dropped (a hint only saves
/// a request or a resent chunk).
const MAX_HINTS: usize = 4096;

/// A tus server as a delivery.
pub struct Tus {
    client: Client,
    /// Asked once per target (per reload): what the server announces.
    capabilities: tokio::sync::OnceCell<Capabilities>,
    /// The offset each upload's server last reported, by upload URL.
    hints: Mutex<HashMap<String, u64>>,
}

/// A file's resume state, recorded before its first byte is sent.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct State {
    v: u32,
    /// The creation URL the upload was made at: when the target's URL
    /// changes, the file starts again at the new server.
    endpoint: String,
    /// The upload's absolute URL (`Location`).
    url: String,
}

impl Tus {
    pub fn new(config: &TargetConfig) -> Result<Tus, UploadError> {
        Ok(Tus {
            client: Client::new(config)?,
            capabilities: tokio::sync::OnceCell::new(),
            hints: Mutex::new(HashMap::new()),
        })
    }

    /// The recorded state if it is a tus upload made at this target's URL.
    fn state(&self, state: Option<&str>) -> Option<State> {
        let state: State = serde_json::from_str(state?).ok()?;
        (state.v == 1 && state.endpoint == self.client.url).then_some(state)
    }

    fn forgotten(&self, url: &str, message: &str) -> UploadError {
        self.forget_hint(url);
        UploadError::Forgotten {
            url: url.to_owned(),
            message: message.to_owned(),
        }
    }

    fn hint(&self, url: &str) -> Option<u64> {
        self.hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(url)
            .copied()
    }

    fn set_hint(&self, url: &str, offset: u64) {
        let mut hints = self.hints.lock().unwrap_or_else(|p| p.into_inner());
        if hints.len() >= MAX_HINTS && !hints.contains_key(url) {
            hints.clear();
        }
        hints.insert(url.to_owned(), offset);
    }

    fn forget_hint(&self, url: &str) {
        self.hints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(url);
    }

    async fn capabilities(&self) -> Result<Capabilities, UploadError> {
        self.capabilities
            .get_or_try_init(|| self.client.options())
            .await
            .copied()
    }

    /// HEADs the upload after a reply left its offset unclear; the file is
    /// complete when the offset reached its size.
    async fn progress(&self, file: &FileRecord, url: &str) -> Result<Progress, UploadError> {
        let progress = self
            .client
            .head(url)
            .await?
            .ok_or_else(|| self.forgotten(url, "the server no longer knows the upload"))?;
        check_progress(file, url, &progress).map_err(|message| self.forgotten(url, &message))?;
        self.set_hint(url, progress.offset);
        Ok(progress)
    }

    fn complete(&self, url: &str) -> Sent {
        self.forget_hint(url);
        Sent::Complete {
            server_name: Some(url.to_owned()),
        }
    }
}

/// Whether the server holds all of `file`: its offset reached the length,
/// which is known (an upload created with its length deferred is not
/// complete until the length is told, even with nothing to send).
fn is_complete(file: &FileRecord, progress: &Progress) -> bool {
    progress.offset == file.size && progress.length == Some(file.size)
}

/// Whether a HEAD shows an upload of `file`; why not, else.
fn check_progress(file: &FileRecord, url: &str, progress: &Progress) -> Result<(), String> {
    if progress.length.is_some_and(|length| length != file.size) || progress.offset > file.size {
        return Err(format!(
            "{url} holds an upload of {:?} bytes at offset {}, not of this file's {} bytes",
            progress.length, progress.offset, file.size
        ));
    }
    Ok(())
}

/// The chunks (by index) wholly below `offset`. The chunk size is not in
/// the file's record: the largest one its size and chunk count allow is
/// taken, which never counts a chunk too early (at most one that did
/// arrive is missed, and the hint skips it).
fn received_below(file: &FileRecord, offset: u64) -> Vec<u64> {
    if file.chunk_count < 2 || offset >= file.size {
        return Vec::new();
    }
    let widest = (file.size - 1) / (file.chunk_count - 1);
    (0..file.chunk_count - 1)
        .take_while(|idx| (idx + 1) * widest <= offset)
        .collect()
}

#[async_trait::async_trait]
impl Delivery for Tus {
    fn kind(&self) -> &'static str {
        "tus"
    }

    fn endpoint(&self) -> &str {
        &self.client.url
    }

    // A tus server takes bytes only at its current offset: one PATCH at a
    // time, in order (the default window of 1).

    /// Creates the upload, so that its URL is recorded before the first
    /// byte; a file whose upload was made at this target keeps it.
    async fn begin(
        &self,
        file: &FileRecord,
        state: Option<&str>,
    ) -> Result<Option<String>, UploadError> {
        if self.state(state).is_some() {
            return Ok(state.map(str::to_owned));
        }
        // An empty upload is complete once created, unless its length is
        // deferred until its URL is recorded.
        let defer = file.size == 0 && self.capabilities().await?.defer_length;
        let url = self.client.create(file, defer).await?;
        self.set_hint(&url, 0);
        let state = State {
            v: 1,
            endpoint: self.client.url.clone(),
            url,
        };
        Ok(Some(
            serde_json::to_string(&state).expect("a state serialises"),
        ))
    }

    async fn resume(&self, file: &FileRecord, state: Option<&str>) -> Result<Resume, UploadError> {
        // No upload of ours (none yet, or one of another kind or server
        // before a reload): whatever the buffer marked means nothing here.
        let Some(state) = self.state(state) else {
            return Ok(Resume::Forgotten);
        };
        let Some(progress) = self.client.head(&state.url).await? else {
            self.forget_hint(&state.url);
            return Ok(Resume::Forgotten);
        };
        if let Err(message) = check_progress(file, &state.url, &progress) {
            tracing::warn!(file = %file.remote_name, url = %state.url, %message, "starting the upload again");
            self.forget_hint(&state.url);
            return Ok(Resume::Forgotten);
        }
        if is_complete(file, &progress) {
            self.forget_hint(&state.url);
            return Ok(Resume::Complete {
                server_name: Some(state.url),
            });
        }
        self.set_hint(&state.url, progress.offset);
        Ok(Resume::Received(received_below(file, progress.offset)))
    }

    async fn send(
        &self,
        file: &FileRecord,
        state: Option<&str>,
        piece: &Piece,
        data: Vec<u8>,
    ) -> Result<Sent, UploadError> {
        let Some(state) = self.state(state) else {
            return Err(self.forgotten(&self.client.url, "no upload was created for the file"));
        };
        let url = state.url.as_str();
        let checksums = self.capabilities().await?.checksum_sha256;
        let start = piece.chunks[0].offset;
        let end = start + data.len() as u64;
        let data = bytes::Bytes::from(data);
        // Where the server is, as far as its last reply said: inside the
        // piece, only the tail is sent; at or past its end, nothing.
        let mut at = match self.hint(url) {
            Some(hint) if hint > start => hint,
            _ => start,
        };
        for _ in 0..MAX_ROUNDS {
            if at >= end {
                if at < file.size {
                    return Ok(Sent::Acknowledged { ack: None });
                }
                // Only the server says the file is complete.
                let progress = self.progress(file, url).await?;
                if is_complete(file, &progress) {
                    return Ok(self.complete(url));
                }
                if progress.length.is_some() || progress.offset != file.size {
                    at = progress.offset.max(start);
                    continue;
                }
                // All there, but the length was deferred: told below, with
                // an empty PATCH.
            }
            let body = data.slice((at - start).min(end - start) as usize..);
            // Only an empty file is created with its length deferred.
            let upload_length = (file.size == 0).then_some(0);
            let sha256 = if !checksums {
                None
            } else if at == start && piece.chunks.len() == 1 && !piece.chunks[0].sha256.is_empty() {
                // The buffer knows the chunk's hash already.
                hex::decode(&piece.chunks[0].sha256)
                    .ok()
                    .map(|digest| BASE64.encode(digest))
            } else if at == start && piece.chunks.len() == 1 {
                // Buffered with its CRC-32C only: hashed from the bytes read
                // back once they match it.
                let (_, sha256) =
                    checked_chunk_sha256(file, &piece.chunks[0], body.clone()).await?;
                Some(BASE64.encode(sha256))
            } else {
                let tail = body.clone();
                Some(
                    tokio::task::spawn_blocking(move || {
                        use sha2::Digest;
                        BASE64.encode(sha2::Sha256::digest(&tail))
                    })
                    .await
                    .map_err(|e| UploadError::Protocol {
                        url: url.to_owned(),
                        message: format!("hashing failed: {e}"),
                    })?,
                )
            };
            match self
                .client
                .patch(url, at, body, sha256, upload_length)
                .await?
            {
                Patched::Offset(offset) if offset == file.size => return Ok(self.complete(url)),
                Patched::Offset(offset) if offset > at => {
                    self.set_hint(url, offset);
                    if offset >= end {
                        return Ok(Sent::Acknowledged { ack: None });
                    }
                    // The server took part of the body: the rest follows.
                    at = offset;
                }
                Patched::Offset(offset) => {
                    self.forget_hint(url);
                    return Err(UploadError::Protocol {
                        url: url.to_owned(),
                        message: format!(
                            "a PATCH at offset {at} was answered with offset {offset}"
                        ),
                    });
                }
                Patched::Conflict => {
                    let progress = self.progress(file, url).await?;
                    if is_complete(file, &progress) {
                        return Ok(self.complete(url));
                    }
                    if progress.offset < start {
                        // The buffer recorded more than the server holds:
                        // the next attempt's HEAD sets the record right.
                        return Err(UploadError::Protocol {
                            url: url.to_owned(),
                            message: format!(
                                "the server holds {} bytes, fewer than the {start} recorded as \
                                 sent; resuming from its offset",
                                progress.offset
                            ),
                        });
                    }
                    at = progress.offset;
                }
                Patched::Gone => {
                    return Err(self.forgotten(url, "the server no longer knows the upload"));
                }
            }
        }
        Err(UploadError::Protocol {
            url: url.to_owned(),
            message: format!("no progress after {MAX_ROUNDS} PATCH requests"),
        })
    }

    /// Deletes the file's unfinished upload, where the server has
    /// termination. A delivered file's upload is left alone: a tus server
    /// may serve the finished file from it, and termination would delete
    /// it. So is one the server holds complete although the buffer has not
    /// recorded it yet (a crash before the confirmation).
    async fn abort(&self, file: &FileRecord, state: Option<&str>) -> Result<(), UploadError> {
        let Some(state) = self.state(state) else {
            return Ok(());
        };
        self.forget_hint(&state.url);
        if file.state == crate::agent::store::FileState::Confirmed {
            return Ok(());
        }
        if !self.capabilities().await?.termination {
            tracing::info!(file = %file.remote_name, url = %state.url, "the server has no termination extension: its expiry removes the upload");
            return Ok(());
        }
        match self.client.head(&state.url).await? {
            None => Ok(()),
            Some(progress) if is_complete(file, &progress) => Ok(()),
            Some(_) => self.client.delete(&state.url).await,
        }
    }

    async fn finish(
        &self,
        file: &FileRecord,
        state: Option<&str>,
        _acks: &[(Piece, Option<String>)],
    ) -> Result<Finished, UploadError> {
        let Some(state) = self.state(state) else {
            return Err(self.forgotten(&self.client.url, "no upload was created for the file"));
        };
        let progress = self.progress(file, &state.url).await?;
        if is_complete(file, &progress) {
            self.forget_hint(&state.url);
            return Ok(Finished::Complete {
                server_name: Some(state.url),
            });
        }
        Ok(Finished::NotYet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::store::FileState;

    fn file(size: u64, chunk_count: u64) -> FileRecord {
        FileRecord {
            id: 1,
            spool: String::new(),
            rel_path: "f".into(),
            remote_name: "f".into(),
            target: "t".into(),
            size,
            sha256: String::new(),
            chunk_count,
            upload_id: String::new(),
            state: FileState::Queued,
            failure: None,
            server_name: None,
            created_at: 0,
            confirmed_at: None,
            chunks_uploaded: 0,
            retries: 0,
            next_attempt: None,
            last_error: None,
            delivery_state: None,
        }
    }

    #[test]
    fn a_chunk_counts_as_received_only_when_wholly_below_the_offset() {
        // 10 chunks of 100 bytes: any chunk size from 100 to 111 cuts 1000
        // bytes into 10 chunks, so 111 is assumed.
        let f = file(1000, 10);
        assert_eq!(received_below(&f, 0), Vec::<u64>::new());
        assert_eq!(received_below(&f, 110), Vec::<u64>::new());
        assert_eq!(received_below(&f, 111), [0]);
        assert_eq!(received_below(&f, 350), [0, 1, 2]);
        assert_eq!(received_below(&f, 999), [0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(received_below(&f, 1000), Vec::<u64>::new());
        // A short last chunk leaves less doubt.
        assert_eq!(received_below(&file(301, 4), 300), [0, 1, 2]);
        // For every possible chunk size, no chunk is counted before it
        // arrived, and at most one chunk that did arrive is missed.
        for size in 1..200u64 {
            for chunk_size in 1..=size {
                let count = size.div_ceil(chunk_size);
                for offset in 0..size {
                    let received = received_below(&file(size, count), offset);
                    for &idx in &received {
                        assert!((idx + 1) * chunk_size <= offset);
                    }
                    let arrived = (offset / chunk_size).min(count - 1);
                    assert!(
                        arrived - received.len() as u64 <= 1,
                        "{size} {chunk_size} {offset}"
                    );
                }
            }
        }
        // One chunk, or none: nothing to count.
        assert_eq!(received_below(&file(0, 1), 0), Vec::<u64>::new());
        assert_eq!(received_below(&file(5, 1), 3), Vec::<u64>::new());
    }
}
