//! Streaming a request body to disk (or only through the hasher) with bounded
//! memory: frames go through a small channel to a blocking thread that hashes and
//! writes them, so neither hashing nor file I/O runs on the executor and at most a
//! few frames are held at once, whatever the chunk size.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::hashes::Claim;
use super::sha256::Sha256Stream;
use axum::body::{Body, Bytes};
use http_body_util::BodyExt;

/// Frames queued between the network and the writer thread.
const QUEUE_FRAMES: usize = 4;

/// Where the body's bytes go: `file` at `offset` onwards.
pub(super) struct Sink {
    pub(super) file: File,
    pub(super) offset: u64,
    /// Sync the bytes before returning: v1 replies promise durability chunk by
    /// chunk. A resumable upload is synced once, whole, after it is verified.
    pub(super) sync: bool,
    /// The upload's whole-file hash, when this chunk extends it.
    pub(super) claim: Option<Claim>,
}

pub(super) struct BodyOutcome {
    pub(super) length: u64,
    pub(super) sha256: String,
    /// The sink's claim, fed with every byte written.
    pub(super) claim: Option<Claim>,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum BodyError {
    #[error("request body is longer than {limit} bytes")]
    TooLong { limit: u64 },
    #[error("no request body data for {0:?}")]
    Timeout(Duration),
    #[error("request body could not be read: {0}")]
    Aborted(String),
    #[error("the request body ended before its first {wanted} bytes")]
    Short { wanted: usize },
    #[error("writing the chunk failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads `body` to its end (at most `limit` bytes, each frame within `idle`),
/// hashing it and writing it through `sink` when given.
pub(super) async fn read_body(
    body: Body,
    sink: Option<Sink>,
    limit: u64,
    idle: Duration,
) -> Result<BodyOutcome, BodyError> {
    write_body(body, sink, (), limit, idle)
        .await
        .map(|(outcome, ())| outcome)
}

/// [`read_body`], with `held` kept by the thread that writes until its last
/// write, then handed back. If the caller stops waiting (the request is
/// dropped when its client goes), the writer still drains the frames already
/// queued: whatever `held` guards (a lock, a spoiled hash) is released only
/// after that.
pub(super) async fn write_body<H: Send + 'static>(
    body: Body,
    sink: Option<Sink>,
    held: H,
    limit: u64,
    idle: Duration,
) -> Result<(BodyOutcome, H), BodyError> {
    let written = stream_body(
        body,
        Bytes::new(),
        limit,
        idle,
        move |frames| -> io::Result<(BodyOutcome, H)> {
            let held = held;
            let mut sink = sink;
            let mut hasher = Sha256Stream::new();
            let mut length = 0u64;
            while let Some(buf) = frames.next_frame() {
                if let Some(sink) = &sink {
                    sink.file.write_all_at(&buf, sink.offset + length)?;
                }
                match sink.as_mut().and_then(|s| s.claim.as_mut()) {
                    Some(claim) => claim.update(&mut hasher, &buf),
                    None => hasher.update(&buf),
                }
                length += buf.len() as u64;
            }
            match &sink {
                Some(sink) if sink.sync => sink.file.sync_data()?,
                // The sync after the last chunk then finds the data mostly on
                // disk already, rather than waiting for the whole file.
                Some(sink) => start_writeback(&sink.file, sink.offset, length),
                None => {}
            }
            let outcome = BodyOutcome {
                length,
                sha256: hasher.finalize_hex(),
                claim: sink.and_then(|s| s.claim),
            };
            Ok((outcome, held))
        },
    )
    .await?;
    Ok(written?)
}

/// A request body as a blocking thread sees it: frames as they arrive, or a
/// byte stream ([`io::Read`]). The end comes when the body ends, or early when
/// reading it failed (the error is the caller's of [`stream_body`];
/// [`Frames::ended_cleanly`] tells the two apart).
pub(super) struct Frames {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
    clean_end: Arc<AtomicBool>,
}

impl Frames {
    /// After the last frame: whether the body ended as the client sent it
    /// (not cut off, timed out or over its limit).
    pub(super) fn ended_cleanly(&self) -> bool {
        self.clean_end.load(Ordering::Acquire)
    }

    /// The next bytes of the body; `None` at its end.
    pub(super) fn next_frame(&mut self) -> Option<Bytes> {
        if !self.current.is_empty() {
            return Some(std::mem::take(&mut self.current));
        }
        self.rx.blocking_recv()
    }
}

impl io::Read for Frames {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(frame) => self.current = frame,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Runs `work` on a blocking thread over `prefix` (bytes already read) and
/// then the frames of `body` (at most `limit` bytes, each frame within
/// `idle`); at most a few frames wait between the network and `work`. An error
/// reading the body wins over what `work` returned (`work` saw the body end
/// early).
pub(super) async fn stream_body<T: Send + 'static>(
    body: Body,
    prefix: Bytes,
    limit: u64,
    idle: Duration,
    work: impl FnOnce(&mut Frames) -> T + Send + 'static,
) -> Result<T, BodyError> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUE_FRAMES);
    let clean_end = Arc::new(AtomicBool::new(false));
    let worker_end = clean_end.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let mut frames = Frames {
            rx,
            current: prefix,
            clean_end: worker_end,
        };
        work(&mut frames)
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
            // The worker stopped early; its own result says why. Reading a
            // little more lets the client see that reply rather than a reset.
            drain(body).await;
            break Ok(());
        }
    };
    if read_result.is_ok() {
        clean_end.store(true, Ordering::Release);
    }
    drop(tx);
    let done = worker
        .await
        .map_err(|e| BodyError::Io(io::Error::other(e.to_string())))?;
    read_result?;
    Ok(done)
}

/// Reads the first `n` bytes of `body` (each frame within `idle`); returns
/// them and whatever else the last frame held.
pub(super) async fn read_prefix(
    body: &mut Body,
    n: usize,
    idle: Duration,
) -> Result<(Vec<u8>, Bytes), BodyError> {
    let mut prefix = Vec::with_capacity(n);
    while prefix.len() < n {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout(idle)),
            Ok(None) => return Err(BodyError::Short { wanted: n }),
            Ok(Some(Err(e))) => return Err(BodyError::Aborted(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(mut data) = frame.into_data() else {
            continue;
        };
        let take = (n - prefix.len()).min(data.len());
        prefix.extend_from_slice(&data.split_to(take));
        if prefix.len() == n {
            return Ok((prefix, data));
        }
    }
    Ok((prefix, Bytes::new()))
}

/// Bytes of a refused body that are read and thrown away before replying, so the
/// client (which is usually still sending) sees the reply instead of a reset.
pub(super) const DRAIN_BYTES: u64 = 1 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Reads and discards up to [`DRAIN_BYTES`] of `body` for at most a second.
pub(super) async fn drain(mut body: Body) {
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

/// Starts writing `len` bytes of `file` from `offset` (all of it when `len` is
/// 0) to disk without waiting for them, so that a later sync finds them
/// (mostly) written: data otherwise stays dirty until the sync, or until the
/// kernel's background threshold, a tenth of memory.
pub(super) fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call; the call
    // only schedules writeback and touches no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Whether an I/O error means the disk (or quota) is full.
pub(super) fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error()
            || code == rustix::io::Errno::DQUOT.raw_os_error()
    )
}
