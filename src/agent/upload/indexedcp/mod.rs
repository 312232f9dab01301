//! The `indexedcp` kind: this project's own receiver protocol (see
//! [`crate::protocol`]), spoken to the original v1 servers and to our
//! receiver with its resumable and batch extensions.
//!
//! Exactly once: every file carries an upload id chosen once and kept in the
//! buffer, and a resumable receiver records each chunk and each completed
//! upload under that id, so a chunk sent twice is recognised, never stored
//! twice. A file with progress first asks `GET /upload/<id>`: a completion
//! whose reply was lost is confirmed without sending anything, and only the
//! chunks the receiver lacks are sent. A v1 receiver cannot be asked, so its
//! chunks go strictly in order, one at a time, and each acknowledgement is
//! synced before the next chunk leaves.

mod client;
mod probe;

pub use client::IndexedCp;

use crate::agent::store::{Durability, FileRecord};
use crate::protocol::{self, BatchEntry, BatchManifest};

use super::delivery::{BatchFile, BatchSent, Batches, Delivery, Finished, Piece, Resume, Sent};
use super::error::UploadError;

/// Chunks of one file in flight at once to a resumable receiver, as far as the
/// target's byte budget allows.
const CHUNK_WINDOW: usize = 4;

/// Manifest bytes a batch may use: half of what a receiver reads, so that
/// names full of characters JSON escapes still fit.
const MANIFEST_BUDGET: usize = (protocol::MAX_MANIFEST_BYTES / 2) as usize;

#[async_trait::async_trait]
impl Delivery for IndexedCp {
    fn kind(&self) -> &'static str {
        "indexedcp"
    }

    fn endpoint(&self) -> &str {
        &self.url
    }

    // A resumable receiver takes chunks in any order: keep a few in flight,
    // so that reading the buffer, the network and the receiver's writes
    // overlap. A v1 receiver gets them one by one, in order, and so does one
    // not known yet, until its first reply says what it is (the first file a
    // daemon sends learns it with its first chunk).
    fn window(&self) -> usize {
        if self.resumable() == Some(true) {
            CHUNK_WINDOW
        } else {
            1
        }
    }

    /// How progress with this receiver is recorded. A resumable receiver
    /// remembers what it received and completed, so a record lost to a power
    /// cut only costs a question (`GET /upload/<id>`) or a duplicate chunk it
    /// recognises; with a v1 receiver a lost record would send data twice.
    fn durability(&self) -> Durability {
        if self.resumable() == Some(true) {
            Durability::Unsynced
        } else {
            Durability::Synced
        }
    }

    fn batches(&self) -> Option<&dyn Batches> {
        Some(self)
    }

    fn streams(&self) -> Option<bool> {
        self.streaming()
    }

    async fn learn_streaming(&self) -> Result<bool, UploadError> {
        if self.streaming().is_none() {
            self.ask_capabilities().await?;
        }
        Ok(self.streaming() == Some(true))
    }

    async fn resume(&self, file: &FileRecord, _state: Option<&str>) -> Result<Resume, UploadError> {
        if self.resumable() == Some(false) {
            return Ok(Resume::Unknown);
        }
        Ok(match self.status(&file.upload_id).await? {
            Some(status) if status.complete => Resume::Complete {
                server_name: status.actual_filename,
            },
            Some(status) => {
                let mut received = status.received_chunks;
                // Every chunk arrived, yet the upload is not complete (its
                // completion failed): sending the last chunk again makes the
                // receiver complete it and answer with the completed reply.
                if received.len() as u64 >= file.chunk_count {
                    let last = file.chunk_count.saturating_sub(1);
                    received.retain(|idx| *idx != last);
                }
                Resume::Received(received)
            }
            None if self.resumable() == Some(true) => Resume::Forgotten,
            None => Resume::Unknown,
        })
    }

    async fn send(
        &self,
        file: &FileRecord,
        _state: Option<&str>,
        piece: &Piece,
        data: Vec<u8>,
    ) -> Result<Sent, UploadError> {
        let chunk = &piece.chunks[0];
        let reply = self.send_chunk(file, chunk, data).await?;
        // A v1 reply has no `complete`: its last chunk completes the file.
        let complete = reply.complete == Some(true)
            || (reply.complete.is_none()
                && self.resumable() != Some(true)
                && chunk.idx == file.chunk_count.saturating_sub(1));
        Ok(if complete {
            Sent::Complete {
                server_name: reply.actual_filename,
            }
        } else {
            Sent::Acknowledged { ack: None }
        })
    }

    /// The receiver answers the chunk that completes a file with the
    /// completed reply. When none did (the completing reply was lost on a
    /// connection dropped with the others in flight), the receiver is asked.
    async fn finish(
        &self,
        file: &FileRecord,
        _state: Option<&str>,
        _acks: &[(Piece, Option<String>)],
    ) -> Result<Finished, UploadError> {
        if self.resumable() != Some(true) {
            return Ok(Finished::NotYet);
        }
        Ok(match self.status(&file.upload_id).await? {
            Some(status) if status.complete => Finished::Complete {
                server_name: status.actual_filename,
            },
            _ => Finished::NotYet,
        })
    }
}

#[async_trait::async_trait]
impl Batches for IndexedCp {
    fn max_files(&self) -> usize {
        self.batch_limit()
    }

    fn overhead(&self, file: &FileRecord) -> usize {
        file.remote_name.len() + file.upload_id.len() + 160
    }

    fn max_overhead(&self) -> usize {
        MANIFEST_BUDGET
    }

    async fn send_batch(&self, files: Vec<BatchFile<'_>>) -> Result<BatchSent, UploadError> {
        let entries = files
            .iter()
            .map(|f| BatchEntry {
                upload_id: f.file.upload_id.clone(),
                file_name: f.file.remote_name.clone(),
                size: f.chunk.length,
                sha256: f.chunk.sha256.clone(),
            })
            .collect();
        let mut body =
            serde_json::to_vec(&BatchManifest { files: entries }).expect("a manifest serialises");
        let manifest_len = body.len();
        body.reserve(files.iter().map(|f| f.data.len()).sum());
        for f in &files {
            body.extend_from_slice(&f.data);
        }
        let reply = match self.send_batch_request(manifest_len, body).await {
            Ok(reply) => reply,
            Err(UploadError::Status {
                status: 404 | 405, ..
            }) => {
                self.forget_batches();
                tracing::info!(url = %self.url, "the receiver does not take batches; sending files one by one");
                return Ok(BatchSent::Refused);
            }
            // A batch refused whole says nothing about its files (the
            // receiver's limits are tighter than this agent's chunk_size,
            // say): they go one by one, where each gets its own answer.
            Err(
                e @ UploadError::Status {
                    status: 400 | 413, ..
                },
            ) => {
                self.forget_batches();
                tracing::warn!(url = %self.url, error = %e, "the receiver refused a batch; sending files one by one from now on");
                return Ok(BatchSent::Refused);
            }
            Err(e) => return Err(e),
        };
        let in_order = reply.files.len() == files.len()
            && reply
                .files
                .iter()
                .zip(&files)
                .all(|(r, f)| r.upload_id == f.file.upload_id);
        if !in_order {
            return Err(UploadError::Protocol {
                url: self.url.clone(),
                message: "the batch reply does not list the files of the request in order".into(),
            });
        }
        Ok(BatchSent::Answered(
            reply
                .files
                .into_iter()
                .map(|result| {
                    if result.complete {
                        Ok(result.actual_filename)
                    } else {
                        Err(UploadError::Status {
                            url: self.url.clone(),
                            status: result.status.unwrap_or(500),
                            error: result.error.unwrap_or_default(),
                            message: result.message.unwrap_or_default(),
                            retry_after: None,
                        })
                    }
                })
                .collect(),
        ))
    }
}
