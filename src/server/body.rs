//! Streaming a request body to disk (or only through the hasher) with bounded
//! memory and a bounded number of threads. The network side reads frames on
//! the executor and queues a few of them; whenever frames are queued and no
//! writer is busy with this body, the queued frames go, together with the
//! body's [`Intake`] (the open file, the hasher, whatever the caller holds),
//! to one of at most [`WRITERS`] writer threads, and come back when written.
//! So neither hashing nor file I/O runs on the executor, at most a few frames
//! per request are held at once whatever the chunk size, and a client that
//! sends slowly costs a queued frame, not a thread: a thousand slow uploads
//! hold no thread at all between their frames.
//!
//! An intake is always finished ([`Intake::finish`]) on a writer thread after
//! its last write, even when the request is dropped (its client gone): the
//! writer that has it finishes it instead of handing it back, and one parked
//! in a dropped request is sent to a writer to be finished. So whatever an
//! intake holds (a chunk's lock, the guard that spoils an upload's hash) is
//! let go only after the last write of its bytes. Frames read but not yet
//! handed to a writer when a request is dropped are never written.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use super::hashes::Claim;
use super::sha256::Sha256Stream;
use axum::body::{Body, Bytes};
use http_body_util::BodyExt;
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;

/// Frames queued between the network and the writers, per request, and the
/// bytes after which no more are read: a frame is at most hyper's read buffer
/// (about 400 KiB), so a request holds about 1 MiB of body at most, queued or
/// being written.
const QUEUE_FRAMES: usize = 16;
const QUEUE_BYTES: usize = 256 << 10;

/// Writer threads busy at once, for every receiver of the process. Writes go
/// to the page cache and hashing runs at about 2 GB/s per core, so a few
/// threads keep up with any network; more are allowed so that v1 chunks, each
/// synced before its reply, do not wait on each other's syncs for long.
pub(super) const WRITERS: usize = 32;

static WRITER_SLOTS: Semaphore = Semaphore::const_new(WRITERS);

/// What a request body's bytes are handed to. Every method runs on a writer
/// thread, so it may block on files and the database.
pub(super) trait Intake: Send + 'static {
    type Output: Send + 'static;
    /// Takes the next bytes of the body; `false` when it wants no more (the
    /// rest of the body is read and dropped).
    fn take(&mut self, bytes: Bytes) -> bool;
    /// The body ended: `clean` when it ended as the client sent it (not cut
    /// off, timed out or over its limit). An error reading the body wins over
    /// what this returns.
    fn finish(self, clean: bool) -> Self::Output;
}

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

/// [`read_body`], with `held` kept with the bytes until their last write, then
/// handed back. If the caller stops waiting (the request is dropped when its
/// client goes), `held` is let go on the writer thread after that last write.
pub(super) async fn write_body<H: Send + 'static>(
    body: Body,
    sink: Option<Sink>,
    held: H,
    limit: u64,
    idle: Duration,
) -> Result<(BodyOutcome, H), BodyError> {
    let intake = ChunkIntake {
        sink,
        held,
        hasher: Sha256Stream::new(),
        length: 0,
        error: None,
    };
    Ok(stream_body(body, Bytes::new(), limit, idle, intake).await??)
}

/// One chunk's bytes, written at the sink's offset onwards and hashed.
struct ChunkIntake<H> {
    sink: Option<Sink>,
    held: H,
    hasher: Sha256Stream,
    length: u64,
    error: Option<io::Error>,
}

impl<H: Send + 'static> Intake for ChunkIntake<H> {
    type Output = io::Result<(BodyOutcome, H)>;

    fn take(&mut self, bytes: Bytes) -> bool {
        if let Some(sink) = &self.sink
            && let Err(e) = sink.file.write_all_at(&bytes, sink.offset + self.length)
        {
            self.error = Some(e);
            return false;
        }
        match self.sink.as_mut().and_then(|s| s.claim.as_mut()) {
            Some(claim) => claim.update(&mut self.hasher, &bytes),
            None => self.hasher.update(&bytes),
        }
        self.length += bytes.len() as u64;
        true
    }

    fn finish(self, clean: bool) -> Self::Output {
        if let Some(e) = self.error {
            return Err(e);
        }
        match &self.sink {
            // A body cut off is refused whatever was written: no sync for it.
            _ if !clean => {}
            Some(sink) if sink.sync => sink.file.sync_data()?,
            // The sync after the last chunk then finds the data mostly on
            // disk already, rather than waiting for the whole file.
            Some(sink) => start_writeback(&sink.file, sink.offset, self.length),
            None => {}
        }
        let outcome = BodyOutcome {
            length: self.length,
            sha256: self.hasher.finalize_hex(),
            claim: self.sink.and_then(|s| s.claim),
        };
        Ok((outcome, self.held))
    }
}

/// Runs `job` on a writer thread once one of the [`WRITERS`] is free, and
/// sends back its result; if nobody waits for it any more, `undelivered`
/// gets it on the same thread.
fn on_writer<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
    undelivered: impl FnOnce(T) + Send + 'static,
) -> oneshot::Receiver<T> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let Ok(slot) = WRITER_SLOTS.acquire().await else {
            unreachable!("the writer slots are never closed");
        };
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            if let Err(result) = tx.send(job()) {
                undelivered(result);
            }
        });
    });
    rx
}

/// An intake between two writes, owned by its request. Dropped with the
/// request, it is finished on a writer thread (see the module doc).
struct Parked<I: Intake>(Option<I>);

impl<I: Intake> Drop for Parked<I> {
    fn drop(&mut self) {
        if let Some(intake) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                drop(on_writer(move || intake.finish(false), drop));
            } else {
                drop(intake.finish(false));
            }
        }
    }
}

fn writer_failed() -> BodyError {
    BodyError::Io(io::Error::other("a writer thread of the receiver failed"))
}

/// Hands `prefix` (bytes already read) and then the frames of `body` (at most
/// `limit` bytes, each frame within `idle`) to `intake` on the writer threads,
/// then finishes it there. An error reading the body wins over what `intake`
/// returned (it saw the body end early).
pub(super) async fn stream_body<I: Intake>(
    mut body: Body,
    prefix: Bytes,
    limit: u64,
    idle: Duration,
    intake: I,
) -> Result<I::Output, BodyError> {
    let mut parked = Parked(Some(intake));
    let mut queued: Vec<Bytes> = Vec::new();
    let mut queued_bytes = 0usize;
    if !prefix.is_empty() {
        queued_bytes = prefix.len();
        queued.push(prefix);
    }
    let mut writing: Option<oneshot::Receiver<(I, bool)>> = None;
    let mut wants_more = true;
    // Set once the body ended (`Ok`) or reading it failed.
    let mut read: Option<Result<(), BodyError>> = None;
    let mut total = 0u64;
    let mut deadline = Instant::now() + idle;
    loop {
        if writing.is_none() && wants_more && !queued.is_empty() {
            let Some(mut intake) = parked.0.take() else {
                unreachable!("the intake is parked while no writer has it");
            };
            let frames = std::mem::take(&mut queued);
            queued_bytes = 0;
            writing = Some(on_writer(
                move || {
                    let more = frames.into_iter().all(|frame| intake.take(frame));
                    (intake, more)
                },
                |(intake, _)| drop(intake.finish(false)),
            ));
        }
        if writing.is_none() && read.is_some() {
            break;
        }
        // While the queue is full, nothing is read: the client waits on TCP.
        let room = read.is_none() && queued.len() < QUEUE_FRAMES && queued_bytes < QUEUE_BYTES;
        tokio::select! {
            written = async { writing.as_mut().expect("enabled only while writing").await }, if writing.is_some() => {
                writing = None;
                let (intake, more) = written.map_err(|_| writer_failed())?;
                parked.0 = Some(intake);
                // Time spent waiting for the writer is not the client's.
                deadline = Instant::now() + idle;
                if !more && wants_more {
                    // The intake stopped early; its own result says why.
                    // Reading a little more lets the client see that reply
                    // rather than a reset.
                    wants_more = false;
                    queued.clear();
                    if read.is_none() {
                        drain(std::mem::replace(&mut body, Body::empty())).await;
                        read = Some(Ok(()));
                    }
                }
            }
            frame = tokio::time::timeout_at(deadline, body.frame()), if room => {
                match frame {
                    Err(_) => read = Some(Err(BodyError::Timeout(idle))),
                    Ok(None) => read = Some(Ok(())),
                    Ok(Some(Err(e))) => read = Some(Err(BodyError::Aborted(e.to_string()))),
                    Ok(Some(Ok(frame))) => {
                        if let Ok(data) = frame.into_data() {
                            total += data.len() as u64;
                            if total > limit {
                                drain(std::mem::replace(&mut body, Body::empty())).await;
                                read = Some(Err(BodyError::TooLong { limit }));
                            } else if wants_more && !data.is_empty() {
                                deadline = Instant::now() + idle;
                                queued_bytes += data.len();
                                queued.push(data);
                            }
                        }
                    }
                }
                if matches!(read, Some(Err(_))) {
                    queued.clear();
                }
            }
        }
    }
    let read = read.unwrap_or(Ok(()));
    let clean = read.is_ok();
    let Some(intake) = parked.0.take() else {
        unreachable!("the intake is parked once the last write is done");
    };
    let output = on_writer(move || intake.finish(clean), drop)
        .await
        .map_err(|_| writer_failed())?;
    read?;
    Ok(output)
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
