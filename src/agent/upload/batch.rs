//! Small files in batches: planning which due files share a request, and
//! recording a batch's outcome file by file, as single attempts would have.

#[cfg(test)]
use crate::agent::store::FileState;
use crate::agent::store::{ChunkMeta, FileRecord, Store};

use super::delivery::{BatchFile, BatchSent};
use super::error::{Retry, UploadError};
use super::events::{EventStatus, UploadEvent, UploadObserver};
use super::file::{FileOutcome, blocking, confirmed, fail, upload_file};
use super::target::TargetRuntime;

/// Files per batch request at most (also bounded by the receiver's announced
/// limit and, in bytes, by the target's `chunk_size`).
pub(super) const BATCH_FILES: usize = 256;

/// What one uploader task attempts: a file on its own, or several small files
/// (each a single chunk) in one batch request.
#[derive(Debug)]
pub enum Attempt {
    One(Box<FileRecord>),
    Batch(Vec<FileRecord>),
}

impl Attempt {
    pub fn ids(&self) -> Vec<i64> {
        match self {
            Attempt::One(file) => vec![file.id],
            Attempt::Batch(files) => files.iter().map(|f| f.id).collect(),
        }
    }
}

/// Groups `files` (in order) into at most `slots` attempts: when the receiver
/// takes batches, runs of files that fit in one chunk share a batch of up to
/// `BATCH_FILES` files and `chunk_size` bytes. Files beyond the slots are
/// left for the next round.
pub fn plan_attempts(target: &TargetRuntime, files: Vec<FileRecord>, slots: usize) -> Vec<Attempt> {
    let batches = target.delivery.batches();
    let max_files = batches.map_or(0, |b| b.max_files()).min(BATCH_FILES);
    let max_overhead = batches.map_or(0, |b| b.max_overhead());
    let max_bytes = target.config.chunk_size.max(1);
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut batch: Vec<FileRecord> = Vec::new();
    let mut batch_bytes = 0u64;
    let mut manifest_bytes = 0usize;
    let close = |batch: &mut Vec<FileRecord>, attempts: &mut Vec<Attempt>| match batch.len() {
        0 => {}
        1 => attempts.push(Attempt::One(Box::new(batch.remove(0)))),
        _ => attempts.push(Attempt::Batch(std::mem::take(batch))),
    };
    for file in files {
        let batchable = max_files > 1 && file.chunk_count == 1 && file.size <= max_bytes;
        if batchable {
            let entry_bytes = batches.map_or(0, |b| b.overhead(&file));
            if !batch.is_empty()
                && (batch.len() >= max_files
                    || batch_bytes + file.size > max_bytes
                    || manifest_bytes + entry_bytes > max_overhead)
            {
                close(&mut batch, &mut attempts);
                batch_bytes = 0;
                manifest_bytes = 0;
            }
            // An open batch holds a slot of its own.
            if batch.is_empty() && attempts.len() >= slots {
                break;
            }
            batch_bytes += file.size;
            manifest_bytes += entry_bytes;
            batch.push(file);
        } else {
            close(&mut batch, &mut attempts);
            batch_bytes = 0;
            manifest_bytes = 0;
            if attempts.len() >= slots {
                break;
            }
            attempts.push(Attempt::One(Box::new(file)));
        }
    }
    close(&mut batch, &mut attempts);
    attempts
}

/// Runs one attempt: the outcome of every file in it, or why it could not be
/// recorded (the buffer failed) and what the retry rule says about that.
pub(super) async fn run_attempt(
    store: &Store,
    target: &TargetRuntime,
    attempt: Attempt,
    observer: &dyn UploadObserver,
) -> Vec<(FileRecord, Result<FileOutcome, (String, Retry)>)> {
    let unrecorded = |e: UploadError| (e.to_string(), e.retry());
    match attempt {
        Attempt::One(file) => {
            let outcome = upload_file(store, target, &file, observer).await;
            vec![(*file, outcome.map_err(unrecorded))]
        }
        Attempt::Batch(files) => match upload_batch(store, target, &files, observer).await {
            Ok(Some(outcomes)) => files
                .into_iter()
                .zip(outcomes.into_iter().map(Ok))
                .collect(),
            // The receiver refused batches: the same files, one by one.
            Ok(None) => {
                let mut out = Vec::with_capacity(files.len());
                for file in files {
                    let outcome = upload_file(store, target, &file, observer).await;
                    out.push((file, outcome.map_err(unrecorded)));
                }
                out
            }
            Err(e) => {
                let e = unrecorded(e);
                files.into_iter().map(|f| (f, Err(e.clone()))).collect()
            }
        },
    }
}

/// One attempt at several small files, each the single chunk of its file, in
/// one batch request. Each file gets the outcome (and the record in the store)
/// a single attempt would have had; the confirmations share one commit.
/// `None`: the peer refused the batch, nothing was recorded, and the files are
/// to be sent one by one.
async fn upload_batch(
    store: &Store,
    target: &TargetRuntime,
    files: &[FileRecord],
    observer: &dyn UploadObserver,
) -> Result<Option<Vec<FileOutcome>>, UploadError> {
    let Some(batches) = target.delivery.batches() else {
        return Ok(None);
    };
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    let _in_flight = target.reserve(bytes).await;
    let s = store.clone();
    let ids: Vec<i64> = files.iter().map(|f| f.id).collect();
    let read = blocking(move || {
        let mut read = Vec::with_capacity(ids.len());
        for id in ids {
            let chunk = s.chunks(id)?.into_iter().next().unwrap_or(ChunkMeta {
                idx: 0,
                offset: 0,
                length: 0,
                sha256: String::new(),
                crc32c: None,
                uploaded: false,
                retry_count: 0,
                ack: None,
            });
            let data = s.chunk_data(id, 0)?;
            read.push((chunk, data));
        }
        Ok(read)
    })
    .await?;
    let chunks: Vec<ChunkMeta> = read.iter().map(|(chunk, _)| chunk.clone()).collect();
    let request = files
        .iter()
        .zip(&chunks)
        .zip(read.into_iter().map(|(_, data)| data))
        .map(|((file, chunk), data)| BatchFile { file, chunk, data })
        .collect();
    let started = std::time::Instant::now();
    let sent = batches.send_batch(request).await;
    crate::metrics::observe_upload_latency(started.elapsed());
    let answers = match sent {
        Ok(BatchSent::Answered(answers)) if answers.len() == files.len() => answers,
        Ok(BatchSent::Answered(_)) => {
            let e = UploadError::Protocol {
                url: target.delivery.endpoint().to_owned(),
                message: "the batch reply does not answer every file of the request".into(),
            };
            return fail_all(store, target, files, &chunks, &e, observer)
                .await
                .map(Some);
        }
        Ok(BatchSent::Refused) => return Ok(None),
        Err(e) => {
            return fail_all(store, target, files, &chunks, &e, observer)
                .await
                .map(Some);
        }
    };

    let mut outcomes: Vec<Option<FileOutcome>> = vec![None; files.len()];
    let mut done = Vec::new();
    for (i, answer) in answers.into_iter().enumerate() {
        let (file, chunk) = (&files[i], &chunks[i]);
        match answer {
            Ok(server_name) => {
                crate::metrics::UPLOADED_CHUNKS.add(1);
                crate::metrics::UPLOADED_BYTES.add(chunk.length);
                observer.on_event(&UploadEvent {
                    file_id: file.id,
                    file_name: file.remote_name.clone(),
                    chunk_index: 0,
                    status: EventStatus::Success,
                    retry_count: chunk.retry_count,
                    next_retry_in: None,
                    error: None,
                });
                done.push((i, server_name));
            }
            Err(e) => {
                outcomes[i] = Some(fail(store, target, file, chunk, e, observer).await?);
            }
        }
    }
    if !done.is_empty() {
        let s = store.clone();
        let confirmations: Vec<(i64, Option<String>)> = done
            .iter()
            .map(|(i, name)| (files[*i].id, name.clone()))
            .collect();
        let durability = target.delivery.durability();
        blocking(move || s.confirm_many(&confirmations, durability)).await?;
        crate::metrics::BATCHED_FILES.add(done.len() as u64);
        for (i, server_name) in done {
            confirmed(&files[i], server_name.clone(), observer);
            outcomes[i] = Some(FileOutcome::Confirmed { server_name });
        }
    }
    Ok(Some(
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(FileOutcome::RetryLater))
            .collect(),
    ))
}

/// Records the same failure for every file of a batch.
async fn fail_all(
    store: &Store,
    target: &TargetRuntime,
    files: &[FileRecord],
    chunks: &[ChunkMeta],
    error: &UploadError,
    observer: &dyn UploadObserver,
) -> Result<Vec<FileOutcome>, UploadError> {
    let mut outcomes = Vec::with_capacity(files.len());
    for (file, chunk) in files.iter().zip(chunks) {
        outcomes.push(fail(store, target, file, chunk, error.same(), observer).await?);
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use reqwest::header::{HeaderMap, HeaderValue};

    use super::*;
    use crate::agent::upload::indexedcp::IndexedCp;
    use crate::config::TargetConfig;
    use crate::protocol;

    fn queued(id: i64, size: u64, chunk_size: u64) -> FileRecord {
        FileRecord {
            id,
            spool: "s".into(),
            rel_path: format!("f{id}"),
            remote_name: format!("f{id}"),
            target: "t".into(),
            size,
            sha256: String::new(),
            chunk_count: size.div_ceil(chunk_size).max(1),
            upload_id: format!("upload-id-for-test-{id:04}"),
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

    fn shapes(attempts: &[Attempt]) -> Vec<Vec<i64>> {
        attempts.iter().map(Attempt::ids).collect()
    }

    #[test]
    fn small_files_share_batches_within_the_file_byte_and_slot_limits() {
        let mut config = TargetConfig::new("t", "http://127.0.0.1:9/upload");
        config.chunk_size = 10_000;
        let client = Arc::new(IndexedCp::new(&config).unwrap());
        let target = TargetRuntime::with_delivery(config, client.clone());
        let files = |sizes: &[u64]| -> Vec<FileRecord> {
            sizes
                .iter()
                .enumerate()
                .map(|(i, size)| queued(i as i64 + 1, *size, 10_000))
                .collect()
        };
        // Batches not announced: one file per attempt, as many as there are slots.
        let plan = plan_attempts(&target, files(&[10, 10, 10]), 2);
        assert_eq!(shapes(&plan), [vec![1], vec![2]]);

        let mut headers = HeaderMap::new();
        headers.insert(protocol::RESUMABLE, HeaderValue::from_static("1"));
        headers.insert(protocol::BATCH, HeaderValue::from_static("3"));
        client.note_resumable(&headers);
        assert_eq!(client.batch_limit(), 3);
        // At most 3 files (the receiver's limit) and 10,000 bytes per batch; a
        // file of several chunks goes alone and splits the run; a lone small
        // file is sent as a single request.
        let plan = plan_attempts(
            &target,
            files(&[10, 10, 10, 10, 6_000, 5_000, 25_000, 10, 10]),
            10,
        );
        assert_eq!(
            shapes(&plan),
            [vec![1, 2, 3], vec![4, 5], vec![6], vec![7], vec![8, 9]]
        );
        assert!(matches!(plan[2], Attempt::One(_)));
        // Slots bound the attempts; the files beyond wait for the next round.
        let plan = plan_attempts(&target, files(&[10; 10]), 2);
        assert_eq!(shapes(&plan), [vec![1, 2, 3], vec![4, 5, 6]]);

        // Once the batch route was refused, later announcements are ignored.
        client.forget_batches();
        client.note_resumable(&headers);
        assert_eq!(client.batch_limit(), 0);
    }
}
