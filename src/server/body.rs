//! Streaming a request body to disk (or only through the hasher) with bounded
//! memory: frames go through a small channel to a blocking thread that hashes and
//! writes them, so neither hashing nor file I/O runs on the executor and at most a
//! few frames are held at once, whatever the chunk size.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

/// Frames queued between the network and the writer thread.
const QUEUE_FRAMES: usize = 4;

/// Where the body's bytes go: `file` at `offset` onwards.
pub struct Sink {
    pub file: File,
    pub offset: u64,
    /// Sync the bytes before returning: v1 replies promise durability chunk by
    /// chunk. A resumable upload is synced once, whole, after it is verified.
    pub sync: bool,
}

#[derive(Debug)]
pub struct BodyOutcome {
    pub length: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is longer than {limit} bytes")]
    TooLong { limit: u64 },
    #[error("no request body data for {0:?}")]
    Timeout(Duration),
    #[error("request body could not be read: {0}")]
    Aborted(String),
    #[error("writing the chunk failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads `body` to its end (at most `limit` bytes, each frame within `idle`),
/// hashing it and writing it through `sink` when given.
pub async fn read_body(
    body: Body,
    sink: Option<Sink>,
    limit: u64,
    idle: Duration,
) -> Result<BodyOutcome, BodyError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUE_FRAMES);
    let writer = tokio::task::spawn_blocking(move || -> io::Result<BodyOutcome> {
        let mut hasher = Sha256::new();
        let mut length = 0u64;
        while let Some(buf) = rx.blocking_recv() {
            hasher.update(&buf);
            if let Some(sink) = &sink {
                sink.file.write_all_at(&buf, sink.offset + length)?;
            }
            length += buf.len() as u64;
        }
        if let Some(sink) = sink.as_ref().filter(|s| s.sync) {
            sink.file.sync_data()?;
        }
        Ok(BodyOutcome {
            length,
            sha256: hex::encode(hasher.finalize()),
        })
    });

    let mut body = body;
    let mut total = 0u64;
    let read_result: Result<(), BodyError> = loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => break Err(BodyError::Timeout(idle)),
            Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => break Err(BodyError::Aborted(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total > limit {
            drain(body).await;
            break Err(BodyError::TooLong { limit });
        }
        if tx.send(data).await.is_err() {
            // The writer stopped early; its own error says why.
            break Ok(());
        }
    };
    drop(tx);
    let written = writer
        .await
        .map_err(|e| BodyError::Io(io::Error::other(e.to_string())))?;
    read_result?;
    Ok(written?)
}

/// Bytes of a refused body that are read and thrown away before replying, so the
/// client (which is usually still sending) sees the reply instead of a reset.
pub const DRAIN_BYTES: u64 = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Reads and discards up to [`DRAIN_BYTES`] of `body` for at most a second.
pub async fn drain(mut body: Body) {
    let mut left = DRAIN_BYTES;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                match left.checked_sub(data.len() as u64) {
                    Some(rest) => left = rest,
                    None => break,
                }
            }
        }
    })
    .await;
}

/// Whether an I/O error means the disk (or quota) is full.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error()
            || code == rustix::io::Errno::DQUOT.raw_os_error()
    )
}
