//! One attempt at one file: resume where the peer got to, send the missing
//! pieces through the target's delivery, and record every outcome in the
//! store (acknowledgements, confirmation, failures with their next attempt,
//! parking).

use std::time::Duration;

use futures::StreamExt;

use crate::agent::store::{ChunkMeta, FileRecord, Store, StoreError};

use super::backoff::{Backoff, random_unit};
use super::delivery::{Finished, Piece, Resume, Sent, pieces};
use super::error::{Retry, UploadError};
use super::events::{EventStatus, UploadEvent, UploadObserver};
use super::target::TargetRuntime;

/// Runs blocking store work off the executor.
pub(super) async fn blocking<T: Send + 'static>(
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
    /// A piece failed; the file is scheduled for a retry.
    RetryLater,
    Parked {
        reason: String,
    },
}

/// Sends the rest of one buffered file; records every outcome in the store.
pub async fn upload_file(
    store: &Store,
    target: &TargetRuntime,
    file: &FileRecord,
    observer: &dyn UploadObserver,
) -> Result<FileOutcome, UploadError> {
    let delivery = target.delivery.as_ref();
    // Subscribed before the chunks are read, so that no commit of a file
    // still being buffered is missed.
    let mut commits = store.watch_commits();
    let s = store.clone();
    let id = file.id;
    let mut chunks = blocking(move || s.chunks(id)).await?;
    if chunks.is_empty() {
        // Its buffering stopped meanwhile and it was removed: it is
        // buffered again from its source.
        return Ok(FileOutcome::RetryLater);
    }
    let mut state = file.delivery_state.clone();
    let mut buffering = file.is_buffering();
    if buffering {
        match delivery.learn_streaming().await {
            Ok(true) => {}
            // The uploader no longer offers it until it is sealed.
            Ok(false) => return Ok(FileOutcome::RetryLater),
            Err(e) => return fail(store, target, file, &chunks[0], e, observer).await,
        }
    }

    // A file with progress: ask the peer what arrived, so that nothing is
    // sent twice and a lost completion is recognised.
    let has_progress = state.is_some() || chunks.iter().any(|c| c.uploaded || c.retry_count > 0);
    if has_progress {
        match delivery.resume(file, state.as_deref()).await {
            Ok(Resume::Complete { server_name }) => {
                return confirm(store, target, file, server_name, observer).await;
            }
            Ok(Resume::Received(received)) => {
                let s = store.clone();
                let durability = delivery.durability();
                blocking(move || {
                    s.reset_chunks(id)?;
                    s.mark_uploaded(id, &received, None, durability)
                })
                .await?;
                let s = store.clone();
                chunks = blocking(move || s.chunks(id)).await?;
            }
            Ok(Resume::Forgotten) => {
                // The peer forgot the upload (it expired): start it again.
                let s = store.clone();
                blocking(move || s.forget_upload(id)).await?;
                chunks.iter_mut().for_each(|c| {
                    c.uploaded = false;
                    c.ack = None;
                });
                state = None;
            }
            Ok(Resume::Unknown) => {}
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

    // A kind that creates its upload before the first byte records where it
    // is before sending anything to it.
    let first_pending = chunks
        .iter()
        .find(|c| !c.uploaded)
        .unwrap_or(&chunks[0])
        .clone();
    match delivery.begin(file, state.as_deref()).await {
        Ok(begun) if begun != state => {
            let s = store.clone();
            let recorded = begun.clone();
            blocking(move || s.set_delivery_state(id, recorded.as_deref())).await?;
            state = begun;
        }
        Ok(_) => {}
        Err(e) => return fail(store, target, file, &first_pending, e, observer).await,
    }
    let state = state.as_deref();

    // After a failed attempt, one piece goes first, and the others follow
    // once it is acknowledged: a peer that still fails gets one request per
    // attempt, not a window of them.
    let mut probing = chunks.iter().any(|c| !c.uploaded && c.retry_count > 0);
    // The chunks read so far end before this index.
    let mut seen = chunks.last().map_or(0, |c| c.idx + 1);
    let all = pieces(chunks, delivery.min_piece_bytes());
    let mut acks: Vec<(Piece, Option<String>)> = Vec::with_capacity(all.len());
    let mut pending = std::collections::VecDeque::new();
    for piece in all {
        if piece.chunks.iter().all(|c| c.uploaded) {
            let ack = piece.chunks[0].ack.clone();
            acks.push((piece, ack));
        } else {
            pending.push_back(piece);
        }
    }
    // The record the pieces are sent with: while the file is buffered it
    // has no SHA-256, and gets it once sealed, before its last chunk goes.
    let mut current = std::sync::Arc::new(file.clone());
    // Acknowledgements of a file still being buffered are recorded once it
    // is sealed, in one commit: the ingest holds the buffer's write lock
    // meanwhile, and a stop before sealing removes the file anyway.
    let mut held_acks: Vec<u64> = Vec::new();
    let send = |piece: Piece, file: std::sync::Arc<FileRecord>| {
        let s = store.clone();
        async move {
            let _in_flight = target.reserve(piece.length()).await;
            let (idxs, piece_length) = (piece.idxs(), piece.length());
            let data = blocking(move || {
                // A piece of one chunk (every piece of the indexedcp kind)
                // is that chunk's bytes as read, without a copy.
                if let [idx] = idxs[..] {
                    return s.chunk_data(id, idx);
                }
                let mut data = Vec::with_capacity(piece_length as usize);
                for idx in idxs {
                    s.append_chunk_data(id, idx, &mut data)?;
                }
                Ok(data)
            })
            .await?;
            let started = std::time::Instant::now();
            let sent = delivery.send(&file, state, &piece, data).await;
            crate::metrics::observe_upload_latency(started.elapsed());
            Ok::<_, UploadError>((piece, sent))
        }
    };
    let mut sends = futures::stream::FuturesUnordered::new();
    // The first chunk of each piece sent and not yet acknowledged. A failed
    // attempt counts against the lowest of them, whichever piece failed
    // first: with several pieces in flight that order is chance, and the
    // same failure must count against the same chunk attempt after attempt
    // (for the backoff and `max_retries`).
    let mut unacknowledged = std::collections::BTreeMap::new();
    loop {
        let window = if probing { 1 } else { delivery.window().max(1) };
        while sends.len() < window {
            let Some(piece) = pending.pop_front() else {
                break;
            };
            unacknowledged.insert(piece.first_idx(), piece.chunks[0].clone());
            sends.push(send(piece, current.clone()));
        }
        if sends.is_empty() && !buffering {
            break;
        }
        let done = tokio::select! {
            Some(done) = sends.next(), if !sends.is_empty() => done,
            // More chunks, or the seal (a missed wake-up costs a second).
            _ = tokio::time::timeout(std::time::Duration::from_secs(1), commits.changed()), if buffering => {
                let s = store.clone();
                let from = seen;
                let (record, mut more) = blocking(move || {
                    // Chunks first: a record found sealed means every chunk
                    // is in, and the rest is read again below.
                    let more = s.chunks_from(id, from)?;
                    Ok((s.file(id), more))
                })
                .await?;
                let record = match record {
                    Ok(record) => record,
                    // Its buffering stopped (the source changed or could
                    // not be read): it is buffered again from the spool.
                    Err(StoreError::NoSuchFile(_)) => return Ok(FileOutcome::RetryLater),
                    Err(e) => return Err(e.into()),
                };
                // Stopped without being removed (see `Store::is_ingesting`).
                if record.is_buffering() && !store.is_ingesting(id) {
                    return Ok(FileOutcome::RetryLater);
                }
                if !record.is_buffering() {
                    buffering = false;
                    let s = store.clone();
                    let from = more.last().map_or(seen, |c| c.idx + 1);
                    more.extend(blocking(move || s.chunks_from(id, from)).await?);
                    current = std::sync::Arc::new(record);
                    if !held_acks.is_empty() {
                        let s = store.clone();
                        let durability = delivery.durability();
                        let idxs = std::mem::take(&mut held_acks);
                        blocking(move || s.mark_uploaded(id, &idxs, None, durability)).await?;
                    }
                }
                seen = more.last().map_or(seen, |c| c.idx + 1);
                pending.extend(pieces(more, delivery.min_piece_bytes()));
                continue;
            }
        };
        let (piece, sent) = done?;
        match sent {
            Ok(sent) => {
                unacknowledged.remove(&piece.first_idx());
                probing = false;
                let complete = matches!(sent, Sent::Complete { .. });
                crate::failpoint::hit(if complete {
                    crate::failpoint::UPLOAD_AFTER_COMPLETE
                } else {
                    crate::failpoint::UPLOAD_AFTER_ACK
                });
                crate::metrics::UPLOADED_CHUNKS.add(piece.chunks.len() as u64);
                crate::metrics::UPLOADED_BYTES.add(piece.length());
                let last_idx = piece.chunks.last().map_or(0, |c| c.idx);
                match sent {
                    Sent::Complete { server_name } => {
                        // The confirmation covers the piece.
                        acknowledged(file, &piece, last_idx, observer);
                        return confirm(store, target, file, server_name, observer).await;
                    }
                    Sent::Acknowledged { ack } if buffering && ack.is_none() => {
                        held_acks.extend(piece.idxs());
                        acknowledged(file, &piece, last_idx, observer);
                        acks.push((piece, ack));
                    }
                    Sent::Acknowledged { ack } => {
                        let s = store.clone();
                        let durability = delivery.durability();
                        let (idxs, recorded) = (piece.idxs(), ack.clone());
                        blocking(move || {
                            s.mark_uploaded(id, &idxs, recorded.as_deref(), durability)
                        })
                        .await?;
                        acknowledged(file, &piece, last_idx, observer);
                        acks.push((piece, ack));
                    }
                }
            }
            // Pieces still in flight are dropped with the stream; an
            // acknowledgement lost that way only means a duplicate later.
            Err(e) => {
                let chunk = unacknowledged
                    .into_values()
                    .next()
                    .unwrap_or_else(|| piece.chunks[0].clone());
                return fail(store, target, file, &chunk, e, observer).await;
            }
        }
    }
    drop(sends);
    acks.sort_by_key(|(piece, _)| piece.first_idx());
    let last = acks
        .last()
        .and_then(|(piece, _)| piece.chunks.last().cloned())
        .expect("a file has at least one chunk");
    match delivery.finish(file, state, &acks).await {
        Ok(Finished::Complete { server_name }) => {
            confirm(store, target, file, server_name, observer).await
        }
        // The peer has every piece, yet did not say the file is complete:
        // ask it next time.
        Ok(Finished::NotYet) => {
            let s = store.clone();
            let next =
                crate::clock::now_ms() + target.config.initial_retry_delay.as_millis() as i64;
            blocking(move || {
                s.reset_chunks(id).and(s.record_failure(
                    id,
                    last.idx,
                    "the receiver did not confirm the file",
                    next,
                ))
            })
            .await?;
            Ok(FileOutcome::RetryLater)
        }
        Err(e) => fail(store, target, file, &last, e, observer).await,
    }
}

/// Reports an acknowledged piece.
fn acknowledged(file: &FileRecord, piece: &Piece, last_idx: u64, observer: &dyn UploadObserver) {
    observer.on_event(&UploadEvent {
        file_id: file.id,
        file_name: file.remote_name.clone(),
        chunk_index: last_idx,
        status: EventStatus::Success,
        retry_count: piece.retry_count(),
        next_retry_in: None,
        error: None,
    });
    tracing::debug!(file = %file.remote_name, chunk = last_idx, of = file.chunk_count, "chunk sent");
}

async fn confirm(
    store: &Store,
    target: &TargetRuntime,
    file: &FileRecord,
    server_name: Option<String>,
    observer: &dyn UploadObserver,
) -> Result<FileOutcome, UploadError> {
    let s = store.clone();
    let (id, name) = (file.id, server_name.clone());
    let durability = target.delivery.durability();
    blocking(move || s.confirm(id, name.as_deref(), durability)).await?;
    confirmed(file, server_name.clone(), observer);
    Ok(FileOutcome::Confirmed { server_name })
}

/// Reports a file whose confirmation is recorded.
pub(super) fn confirmed(
    file: &FileRecord,
    server_name: Option<String>,
    observer: &dyn UploadObserver,
) {
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

pub(super) async fn fail(
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
        _ if target.is_retired() => Duration::ZERO,
        Retry::AtMaximum => backoff.max,
        Retry::NotBefore(at_least) => backoff.delay_with_jitter(n, random_unit()).max(at_least),
        _ => backoff.delay_with_jitter(n, random_unit()),
    };
    let s = store.clone();
    let (id, idx, msg) = (file.id, chunk.idx, message.clone());
    let next_attempt = crate::clock::now_ms() + delay.as_millis() as i64;
    let restart = retry == Retry::Restart;
    let count = blocking(move || {
        if restart {
            s.forget_upload(id)?;
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
            tracing::error!(file = %file.remote_name, target = %file.target, kind = target.delivery.kind(), url = %target.delivery.endpoint(), error = %message, next_retry_in = ?delay, more_failures, "the target refused this agent's configuration (API key or URL; for s3: credentials, bucket or region; for tus: headers or api_key); fix the [[target]] and send SIGHUP");
        }
        (_, Some(more_failures)) => {
            tracing::warn!(file = %file.remote_name, target = %file.target, kind = target.delivery.kind(), chunk = chunk.idx, retry_count = count, next_retry_in = ?delay, error = %message, more_failures, "chunk failed; will retry (more_failures: failed attempts since the last warning, logged at debug level)");
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::agent::spool::SourceIdentity;
    use crate::agent::store::{FileState, IngestDecision, NewFile};
    use crate::agent::upload::delivery::Delivery;
    use crate::agent::upload::events::NoObserver;
    use crate::config::TargetConfig;

    /// A kind shaped like object storage's multipart uploads: the upload is
    /// created before its first byte, pieces are runs of three chunks, each
    /// acknowledgement carries a tag that finishing needs, and the peer
    /// cannot be asked what it holds.
    #[derive(Default)]
    struct Multipart {
        created: Mutex<u32>,
        /// Bytes received per upload, by offset.
        stored: Mutex<BTreeMap<String, BTreeMap<u64, Vec<u8>>>>,
        /// Successful sends, by first chunk index.
        sent: Mutex<Vec<u64>>,
        /// A piece (by first chunk index) whose first send fails.
        fail_once: Mutex<Option<u64>>,
    }

    #[async_trait::async_trait]
    impl Delivery for Multipart {
        fn kind(&self) -> &'static str {
            "test-multipart"
        }
        fn endpoint(&self) -> &str {
            "memory"
        }
        fn min_piece_bytes(&self) -> u64 {
            12
        }
        async fn begin(
            &self,
            _file: &FileRecord,
            state: Option<&str>,
        ) -> Result<Option<String>, UploadError> {
            Ok(Some(match state {
                Some(id) => id.to_owned(),
                None => {
                    let mut created = self.created.lock().unwrap();
                    *created += 1;
                    format!("upload-{created}")
                }
            }))
        }
        async fn resume(
            &self,
            _file: &FileRecord,
            _state: Option<&str>,
        ) -> Result<Resume, UploadError> {
            Ok(Resume::Unknown)
        }
        async fn send(
            &self,
            _file: &FileRecord,
            state: Option<&str>,
            piece: &Piece,
            data: Vec<u8>,
        ) -> Result<Sent, UploadError> {
            if *self.fail_once.lock().unwrap() == Some(piece.first_idx()) {
                *self.fail_once.lock().unwrap() = None;
                return Err(UploadError::Transport {
                    url: "memory".into(),
                    message: "connection reset".into(),
                });
            }
            assert_eq!(data.len() as u64, piece.length());
            self.stored
                .lock()
                .unwrap()
                .entry(state.expect("begun before the first piece").to_owned())
                .or_default()
                .insert(piece.chunks[0].offset, data);
            self.sent.lock().unwrap().push(piece.first_idx());
            Ok(Sent::Acknowledged {
                ack: Some(format!("tag-{}", piece.first_idx())),
            })
        }
        async fn finish(
            &self,
            _file: &FileRecord,
            state: Option<&str>,
            acks: &[(Piece, Option<String>)],
        ) -> Result<Finished, UploadError> {
            let tags: Vec<String> = acks.iter().map(|(_, a)| a.clone().unwrap()).collect();
            assert_eq!(tags, ["tag-0", "tag-3", "tag-6", "tag-9"]);
            Ok(Finished::Complete {
                server_name: state.map(str::to_owned),
            })
        }
    }

    #[tokio::test]
    async fn a_kind_with_large_pieces_and_resume_state_resumes_without_sending_a_piece_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("buffer.db")).unwrap();
        let content: Vec<u8> = (0..40u8).collect();
        let new = NewFile {
            spool: "/spool".into(),
            rel_path: "f".into(),
            remote_name: "f".into(),
            target: "t".into(),
            chunk_size: 4,
            upload_id: "upload-f-0123456789".into(),
            src_path: "/spool/f".into(),
            identity: SourceIdentity {
                dev: 1,
                ino: 1,
                size: 40,
                mtime_ns: 1,
            },
            remember_kept: false,
        };
        let id = store
            .ingest(&new, |sink| -> Result<IngestDecision, StoreError> {
                for chunk in content.chunks(4) {
                    sink.push(chunk, "00", None)?;
                }
                Ok(IngestDecision::Commit {
                    sha256: "ff".into(),
                })
            })
            .unwrap()
            .unwrap();
        let mut config = TargetConfig::new("t", "memory");
        config.chunk_size = 4;
        let kind = Arc::new(Multipart::default());
        *kind.fail_once.lock().unwrap() = Some(6);
        let target = TargetRuntime::with_delivery(config, kind.clone());

        // The third piece fails: the first two stay recorded with their tags.
        let file = store.file(id).unwrap();
        let outcome = upload_file(&store, &target, &file, &NoObserver)
            .await
            .unwrap();
        assert_eq!(outcome, FileOutcome::RetryLater);
        let file = store.file(id).unwrap();
        assert_eq!(file.delivery_state.as_deref(), Some("upload-1"));
        let acks: Vec<Option<String>> = store
            .chunks(id)
            .unwrap()
            .into_iter()
            .map(|c| c.ack)
            .collect();
        let tag = |t: &str| Some(t.to_owned());
        assert_eq!(
            acks,
            [
                tag("tag-0"),
                tag("tag-0"),
                tag("tag-0"),
                tag("tag-3"),
                tag("tag-3"),
                tag("tag-3"),
                None,
                None,
                None,
                None
            ]
        );

        // The next attempt (as after a restart: everything comes from the
        // buffer) continues the same upload with the missing pieces only.
        let outcome = upload_file(&store, &target, &file, &NoObserver)
            .await
            .unwrap();
        assert_eq!(
            outcome,
            FileOutcome::Confirmed {
                server_name: Some("upload-1".into())
            }
        );
        assert_eq!(*kind.created.lock().unwrap(), 1);
        assert_eq!(*kind.sent.lock().unwrap(), [0, 3, 6, 9]);
        let stored = kind.stored.lock().unwrap();
        let bytes: Vec<u8> = stored["upload-1"].values().flatten().copied().collect();
        assert_eq!(bytes, content);
        assert_eq!(store.file(id).unwrap().state, FileState::Confirmed);
    }
}
