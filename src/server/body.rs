//! Streaming a request body to disk (or only through the hasher) with bounded
//! memory and a bounded number of threads. The network side reads frames on
//! the executor and queues a few of them; whenever frames are queued and no
//! writer is busy with this body, the queued frames go, together with the
//! body's [`Intake`] (the open file, the hasher, whatever the caller holds),
//! to one of at most [`WRITERS`] writer threads, and come back when written.
//! So neither hashing nor file I/O runs on the executor, and a client that
//! sends slowly costs a queued frame, not a thread: a thousand slow uploads
//! hold no thread at all between their frames.
//!
//! The memory of the bodies in flight is one budget for the whole process,
//! not a share per request: every frame takes one of [`BODY_FRAMES`] grants
//! before it is read from the connection and gives it back once written, so
//! the frames held (queued, or at a writer) never pass `BODY_FRAMES` x
//! [`READ_BUFFER`] bytes (8 MiB) whatever the number of connections, while
//! a single fast upload may hold [`QUEUE_FRAMES`] frames (1 MiB) queued
//! and as much again being written. A request waits for a grant only while
//! its writer is busy or nothing of it is queued: queued frames never wait
//! for a grant to be written, so grants always come back. What a connection
//! costs besides (hyper's read buffer, at most [`READ_BUFFER`] plus the one
//! frame hyper reads ahead, and its own state) is in `admission`.
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
use crate::disk::start_writeback;
use crate::sha256::Sha256Stream;
use axum::body::{Body, Bytes};
use futures::FutureExt;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::sync::{Semaphore, SemaphorePermit, oneshot};
use tokio::time::Instant;

/// The most hyper reads from a connection at once, and so the largest frame
/// of a body (hyper's `max_buf_size`; its default is about 400 KiB). hyper
/// keeps its last buffer between requests, so this is what an idle or slow
/// connection pins: with hyper's default, 100 agents (about 400 connections)
/// took the receiver to 136-143 MiB; with 64 KiB to 64-78 MiB (with 32 KiB
/// about 8 MiB less, but then hyper closed some keep-alive connections while a
/// resumable client was sending its next chunk, which the resumable tests
/// caught). A single upload still moves large batches to its writer (see
/// [`HANDOFF_BYTES`]), which is what small reads cost before.
pub(super) const READ_BUFFER: usize = 64 << 10;

/// Frames of request bodies held at once by the whole process, queued or
/// being written: with [`READ_BUFFER`] frames, 8 MiB. A frame may pin a
/// whole read buffer of hyper however small it is, so each counts as one.
/// With 256 frames, 100 agents took the receiver to 64-78 MiB; with 128 to
/// 54-62 MiB, and 16 connections of 1 MiB chunks went as fast (bench
/// scenarios 10 and 6): a single upload holds at most 32 of them.
pub(super) const BODY_FRAMES: usize = 128;

static BODY_GRANTS: Semaphore = Semaphore::const_new(BODY_FRAMES);

/// Frames and bytes queued between the network and the writers, per request,
/// after which no more are read until the writer is back: a single upload
/// holds at most about twice this (queued, and being written). The bytes
/// bound only a prefix of bytes read before the body's frames.
const QUEUE_FRAMES: usize = 16;
const QUEUE_BYTES: usize = 1 << 20;

/// Queued bytes that go to a writer at once even while more are ready to be
/// read: below it, frames go only when no more are ready (the client is
/// slower than the writer) or the body ended. Each hand-off wakes a thread,
/// and one per 64 KiB frame cost a fast tus upload a quarter of its speed.
const HANDOFF_BYTES: usize = 512 << 10;

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
    /// Work out the chunk's own SHA-256 as it is written. `false` for a
    /// chunk checked by its CRC alone, and for one its caller hashes later
    /// (read back, together with the file's hash once the chunks in front
    /// are in it); the outcome's hash is then empty, and a claim's file hash
    /// still takes the bytes. A chunk that is the whole file is hashed
    /// whatever this says: its hash is the file's.
    pub(super) hash: bool,
}

/// The chunk's own checks, worked out as its bytes arrive.
#[derive(Debug, Clone, Copy)]
pub(super) struct Checks {
    /// The SHA-256, of a body read without a sink (a sink says it in
    /// [`Sink::hash`]).
    pub(super) sha256: bool,
    /// The CRC-32C.
    pub(super) crc32c: bool,
}

impl Checks {
    /// The SHA-256 alone, as a v1 chunk or one with `X-Chunk-Sha256` needs.
    pub(super) const SHA256: Checks = Checks {
        sha256: true,
        crc32c: false,
    };
}

pub(super) struct BodyOutcome {
    pub(super) length: u64,
    /// Hex; empty when the sink asked for no hash.
    pub(super) sha256: String,
    /// When asked for ([`Checks::crc32c`]).
    pub(super) crc32c: Option<u32>,
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
    write_body(body, sink, Checks::SHA256, (), limit, idle)
        .await
        .map(|(outcome, ())| outcome)
}

/// [`read_body`], with `held` kept with the bytes until their last write, then
/// handed back. If the caller stops waiting (the request is dropped when its
/// client goes), `held` is let go on the writer thread after that last write.
pub(super) async fn write_body<H: Send + 'static>(
    body: Body,
    sink: Option<Sink>,
    checks: Checks,
    held: H,
    limit: u64,
    idle: Duration,
) -> Result<(BodyOutcome, H), BodyError> {
    let hashed = match &sink {
        None => checks.sha256,
        Some(s) => s.hash || s.claim.as_ref().is_some_and(Claim::is_whole),
    };
    let intake = ChunkIntake {
        sink,
        held,
        hasher: hashed.then(Sha256Stream::new),
        crc32c: checks.crc32c.then_some(0),
        length: 0,
        error: None,
    };
    Ok(stream_body(body, Bytes::new(), limit, idle, intake).await??)
}

/// One chunk's bytes, written at the sink's offset onwards and hashed.
struct ChunkIntake<H> {
    sink: Option<Sink>,
    held: H,
    /// The chunk's own hash; `None` when the caller hashes it later, or when
    /// only its CRC is checked.
    hasher: Option<Sha256Stream>,
    crc32c: Option<u32>,
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
        let claim = self.sink.as_mut().and_then(|s| s.claim.as_mut());
        match (claim, self.hasher.as_mut()) {
            (Some(claim), Some(hasher)) => claim.update(hasher, &bytes),
            (Some(claim), None) => claim.update_file(&bytes),
            (None, Some(hasher)) => hasher.update(&bytes),
            (None, None) => {}
        }
        if let Some(crc) = &mut self.crc32c {
            *crc = crc32c::crc32c_append(*crc, &bytes);
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
            sha256: self
                .hasher
                .map(Sha256Stream::finalize_hex)
                .unwrap_or_default(),
            crc32c: self.crc32c,
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

/// Frames read and not yet handed to a writer, with the grants they hold.
#[derive(Default)]
struct Queue {
    frames: Vec<Bytes>,
    grants: Vec<SemaphorePermit<'static>>,
    bytes: usize,
}

impl Queue {
    fn push(&mut self, frame: Bytes, grant: Option<SemaphorePermit<'static>>) {
        self.bytes += frame.len();
        self.frames.push(frame);
        self.grants.extend(grant);
    }

    fn has_room(&self) -> bool {
        self.frames.len() < QUEUE_FRAMES && self.bytes < QUEUE_BYTES
    }
}

/// What woke a body's loop.
enum Event<I> {
    Written(Result<(I, bool), oneshot::error::RecvError>),
    Granted(SemaphorePermit<'static>),
    Frame(Result<Option<Result<Frame<Bytes>, axum::Error>>, tokio::time::error::Elapsed>),
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
    let mut queue = Queue::default();
    if !prefix.is_empty() {
        // Already read (and bounded by its reader): it takes no grant.
        queue.push(prefix, None);
    }
    let mut writing: Option<oneshot::Receiver<(I, bool)>> = None;
    let mut wants_more = true;
    // Set once the body ended (`Ok`) or reading it failed.
    let mut read: Option<Result<(), BodyError>> = None;
    // The grant for the next frame, taken before it is read.
    let mut grant: Option<SemaphorePermit<'static>> = None;
    let mut total = 0u64;
    let mut deadline = Instant::now() + idle;
    loop {
        let mut event = None;
        if writing.is_none() && wants_more && !queue.frames.is_empty() {
            // A small batch waits for frames that are already there, so that
            // a fast client's frames go to the writer together; it goes at
            // once when none is ready or no grant is free.
            if read.is_none() && queue.has_room() && queue.bytes < HANDOFF_BYTES {
                if grant.is_none() {
                    grant = BODY_GRANTS.try_acquire().ok();
                }
                if grant.is_some() {
                    event = body.frame().now_or_never().map(|f| Event::Frame(Ok(f)));
                }
            }
            if event.is_none() {
                let Some(mut intake) = parked.0.take() else {
                    unreachable!("the intake is parked while no writer has it");
                };
                let Queue { frames, grants, .. } = std::mem::take(&mut queue);
                writing = Some(on_writer(
                    move || {
                        let more = frames.into_iter().all(|frame| intake.take(frame));
                        // The frames are written (or dropped): their memory
                        // is free for other requests.
                        drop(grants);
                        (intake, more)
                    },
                    |(intake, _)| drop(intake.finish(false)),
                ));
            }
        }
        if event.is_none() && writing.is_none() && read.is_some() {
            break;
        }
        // While the queue is full, nothing is read: the client waits on TCP.
        let room = read.is_none() && queue.has_room();
        let event = match event {
            Some(event) => event,
            None => tokio::select! {
                written = async { writing.as_mut().expect("enabled only while writing").await }, if writing.is_some() => Event::Written(written),
                granted = BODY_GRANTS.acquire(), if room && grant.is_none() => {
                    let Ok(granted) = granted else {
                        unreachable!("the body grants are never closed");
                    };
                    Event::Granted(granted)
                }
                frame = tokio::time::timeout_at(deadline, body.frame()), if room && grant.is_some() => Event::Frame(frame),
            },
        };
        match event {
            Event::Written(written) => {
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
                    queue = Queue::default();
                    if read.is_none() {
                        drain(std::mem::replace(&mut body, Body::empty())).await;
                        read = Some(Ok(()));
                    }
                }
            }
            Event::Granted(granted) => {
                grant = Some(granted);
                // Nor is time spent waiting for memory.
                deadline = Instant::now() + idle;
            }
            Event::Frame(frame) => {
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
                                queue.push(data, grant.take());
                            }
                        }
                    }
                }
                if matches!(read, Some(Err(_))) {
                    queue = Queue::default();
                }
            }
        }
    }
    drop(grant);
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

/// Whether an I/O error means the disk (or quota) is full.
pub(super) fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error()
            || code == rustix::io::Errno::DQUOT.raw_os_error()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts what it is given.
    struct Count(u64);

    impl Intake for Count {
        type Output = u64;
        fn take(&mut self, bytes: Bytes) -> bool {
            self.0 += bytes.len() as u64;
            true
        }
        fn finish(self, _clean: bool) -> u64 {
            self.0
        }
    }

    /// Far more bodies at once than the process-wide budget has frames for:
    /// each waits its turn for grants and none is stuck, because frames
    /// already read never wait for a grant to be written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bodies_beyond_the_budget_all_arrive_whole() {
        const BODIES: usize = 3 * BODY_FRAMES;
        const FRAMES: usize = 8;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..BODIES {
            let frames =
                (0..FRAMES).map(|_| Ok::<_, io::Error>(Bytes::from(vec![7u8; READ_BUFFER])));
            let body = Body::from_stream(futures::stream::iter(frames));
            tasks.spawn(stream_body(
                body,
                Bytes::new(),
                u64::MAX,
                Duration::from_secs(60),
                Count(0),
            ));
        }
        let all = tokio::time::timeout(Duration::from_secs(120), tasks.join_all())
            .await
            .expect("bodies were still waiting for the budget after two minutes");
        assert_eq!(all.len(), BODIES);
        for got in all {
            assert_eq!(got.unwrap(), (FRAMES * READ_BUFFER) as u64);
        }
    }
}
