//! Ingest: copies complete spool files into the buffer, then disposes of their
//! sources; also buffers single named files for the one-shot commands and the
//! library.
//!
//! Spool files come in batches ([`ingest_candidates`]). Each offer is checked
//! on its own first: a kept source already sent unchanged, or a source whose
//! identity is buffered already (the agent stopped before disposing of it),
//! ends there; a file larger than the buffer, a full buffer, or a disk without
//! room for twice the file plus [`DISK_RESERVE`] leaves the file waiting in the
//! spool; and the file, opened without following symlinks, must still be the
//! regular file with the identity the watcher announced. Every file that
//! passes is then streamed into one store transaction (the file's SHA-256 and
//! each chunk's CRC-32C in one pass, one chunk of memory at a time), whose commit is
//! synced (`synchronous = FULL`): one sync covers the whole batch. A file that
//! could not be read, or whose size, mtime or inode changed while it was read,
//! leaves nothing in that transaction while the rest of the batch is kept; a
//! failure of the store keeps none of them.
//!
//! Only after that synced commit is each kept source disposed of (deleted,
//! moved away, or left in place with its identity remembered by the same
//! transaction), and only if its path still holds the very file that was
//! buffered. A crash between the commit and the disposal is harmless: the next
//! sighting of the same source identity finds the buffered row and only
//! disposes. Ingest never records anything unsynced, since a source may be
//! gone right after its commit.
//!
//! A file of [`STREAM_MIN_CHUNKS`] chunks or more is streamed in on its own
//! instead ([`Store::ingest_streaming`]), after the batch: its chunks are
//! committed unsynced as they are read, so that its upload can start, and the
//! synced commit that seals it (its last chunk and its SHA-256) comes before
//! its source is disposed of, exactly as for a batch.
//!
//! [`ingest_path`] buffers one named file in a transaction of its own and
//! never touches the source. Every function here blocks; the daemon runs them
//! off the async executor. Nothing here knows about HTTP.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::sha256::Sha256Stream;

use crate::agent::spool::{Candidate, SourceIdentity};
use crate::agent::store::{
    ChunkSink, FileRecord, FileState, IngestDecision, NewFile, Store, StoreError,
};
use crate::config::{Disposition, SpoolConfig, TargetConfig};
use crate::protocol;

/// Why a file could not be buffered (or, for a spool file, disposed of).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The file could not be opened, examined or read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A spool file was buffered durably but could not be deleted or moved
    /// away; the next sighting of it only retries the disposal. Files
    /// buffered by name are never disposed of, so the library never sees this.
    #[error(
        "buffered {path} but could not dispose of it ({action}): {source}; it stays in the spool and will not be sent twice"
    )]
    Dispose {
        /// The spool file that stays in place.
        path: PathBuf,
        /// The disposal that failed: `delete` or `move`.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The named path is a directory, FIFO, device or socket (symlinks are
    /// followed first).
    #[error("{path} is not a regular file; only files can be buffered")]
    NotAFile {
        /// The path as it was named.
        path: PathBuf,
    },
    /// The named file's size, mtime or inode changed while it was read;
    /// nothing of it was buffered.
    #[error("{path} changed while it was read; try again once it is complete")]
    Changed {
        /// The path as it was named.
        path: PathBuf,
    },
    /// The name to send has a control character (a newline, a tab, an
    /// ESC...), which every receiver refuses: buffering the file would only
    /// park it. Nothing was buffered.
    #[error(
        "the name {name} (shown escaped) has a control character, which receivers refuse; send the file under another name"
    )]
    ControlCharacter {
        /// The name, its control characters escaped.
        name: String,
    },
    /// The buffer failed; [`IngestError::is_disk_full`] tells a full disk.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl IngestError {
    /// Whether the failure means the buffer's disk is full (ingest should pause).
    pub fn is_disk_full(&self) -> bool {
        match self {
            IngestError::Store(e) => e.is_disk_full(),
            _ => false,
        }
    }
}

/// Free space kept on the buffer's file system beyond what a file needs, so that
/// uploads can still be recorded (and space freed) when ingest has paused.
pub const DISK_RESERVE: u64 = 2 << 20;

/// What happened to a candidate.
#[derive(Debug, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Buffered as file `file_id` and disposed of.
    Buffered { file_id: i64, bytes: u64 },
    /// Buffered earlier (the agent stopped before disposing); disposed of now.
    AlreadyBuffered { file_id: i64 },
    /// A kept source that was already sent unchanged.
    AlreadyKept,
    /// The file changed or vanished while being read; it will be offered again.
    Changed,
    /// The same file came again later in the same batch, and that offer is
    /// the one read.
    OfferedAgain,
    /// The buffer is above `max_buffer_bytes`; the file waits in the spool.
    BufferFull,
    /// The buffer's disk has too little room left (`free` bytes) for this file
    /// and the reserve; the file waits in the spool.
    DiskFull { free: u64 },
    /// The file alone is larger than `max_buffer_bytes` and can never be buffered.
    TooLarge { size: u64, limit: u64 },
    /// Not a regular file (any more), or unreadable; skipped with this reason.
    Skipped(String),
}

/// The name sent as `X-File-Name`: the spool's `remote_prefix`, then the relative path.
fn remote_name(prefix: &str, relative: &str) -> String {
    if prefix.is_empty() {
        relative.to_owned()
    } else if prefix.ends_with('/') {
        format!("{prefix}{relative}")
    } else {
        format!("{prefix}/{relative}")
    }
}

/// A spool file to buffer, with the settings of its spool and its target.
#[derive(Debug, Clone)]
pub struct Offer {
    pub candidate: Candidate,
    pub spool: SpoolConfig,
    pub target: TargetConfig,
}

/// A candidate that passed the checks and is open for reading.
struct Prepared {
    at: usize,
    file: File,
    new_file: NewFile,
    expected: SourceIdentity,
}

/// Buffers several candidates in one transaction (one sync for all of them),
/// then disposes of each one kept; then streams in each large one
/// ([`STREAM_MIN_CHUNKS`] chunks or more) in commits of its own, calling
/// `committed` after each, and disposes of it once it is sealed. Returns an
/// outcome per offer, in order. An error of the batch (the store failed)
/// keeps none of its files: they stay in the spool.
pub fn ingest_candidates(
    store: &Store,
    offers: &[Offer],
    max_buffer_bytes: u64,
    committed: &dyn Fn(),
) -> Result<Vec<Result<IngestOutcome, IngestError>>, IngestError> {
    let mut outcomes: Vec<Option<Result<IngestOutcome, IngestError>>> =
        offers.iter().map(|_| None).collect();
    let mut buffered = store.buffered_bytes()?;
    let mut free = store.free_bytes();
    let (mut prepared, mut streamed) = (Vec::new(), Vec::new());
    // The same file may be offered twice in one batch (two events of one
    // rename, 0.1 ms apart, were seen): only its last offer is read. The
    // check for a source buffered already runs before the batch's
    // transaction, so both would pass it and the file would go twice.
    let last: std::collections::HashMap<_, usize> = offers
        .iter()
        .enumerate()
        .map(|(at, o)| ((&o.candidate.spool, &o.candidate.relative), at))
        .collect();
    for (at, offer) in offers.iter().enumerate() {
        if last[&(&offer.candidate.spool, &offer.candidate.relative)] != at {
            outcomes[at] = Some(Ok(IngestOutcome::OfferedAgain));
            continue;
        }
        match prepare(store, offer, max_buffer_bytes, &mut buffered, &mut free) {
            Ok(Ok((file, new_file, expected))) if chunk_count(&new_file) >= STREAM_MIN_CHUNKS => {
                streamed.push(Prepared {
                    at,
                    file,
                    new_file,
                    expected,
                })
            }
            Ok(Ok((file, new_file, expected))) => prepared.push(Prepared {
                at,
                file,
                new_file,
                expected,
            }),
            Ok(Err(outcome)) => outcomes[at] = Some(Ok(outcome)),
            Err(e) => outcomes[at] = Some(Err(e)),
        }
    }

    let kept = store.ingest_batch(|batch| -> Result<Vec<(usize, i64)>, IngestError> {
        let mut kept = Vec::new();
        for p in &prepared {
            let offer = &offers[p.at];
            let added = batch.add(&p.new_file, |sink| {
                fill_chunks(
                    sink,
                    &p.new_file,
                    &p.file,
                    &offer.candidate.path,
                    p.expected,
                    PathCheck::NoFollow,
                )
            });
            match added {
                Ok(Some(file_id)) => kept.push((p.at, file_id)),
                Ok(None) => outcomes[p.at] = Some(Ok(IngestOutcome::Changed)),
                // This file could not be read; the rest of the batch goes on.
                Err(e @ IngestError::Read { .. }) => outcomes[p.at] = Some(Err(e)),
                Err(e) => return Err(e),
            }
        }
        Ok(kept)
    })?;
    if !kept.is_empty() {
        crate::failpoint::hit(crate::failpoint::INGEST_AFTER_COMMIT);
    }
    let dispose_kept = |at: usize, file_id: i64| {
        let (candidate, spool) = (&offers[at].candidate, &offers[at].spool);
        let expected = candidate.identity;
        dispose(
            &candidate.path,
            &candidate.relative,
            expected,
            &spool.disposition,
        )
        .map(|()| {
            crate::failpoint::hit(crate::failpoint::INGEST_AFTER_DISPOSE);
            IngestOutcome::Buffered {
                file_id,
                bytes: expected.size,
            }
        })
    };
    for (at, file_id) in kept {
        outcomes[at] = Some(dispose_kept(at, file_id));
    }
    for p in &streamed {
        let path = &offers[p.at].candidate.path;
        let added =
            store.ingest_streaming(&p.new_file, chunk_count(&p.new_file), committed, |sink| {
                fill_chunks(
                    sink,
                    &p.new_file,
                    &p.file,
                    path,
                    p.expected,
                    PathCheck::NoFollow,
                )
            });
        outcomes[p.at] = Some(match added {
            Ok(Some(file_id)) => {
                crate::failpoint::hit(crate::failpoint::INGEST_AFTER_COMMIT);
                dispose_kept(p.at, file_id)
            }
            Ok(None) => Ok(IngestOutcome::Changed),
            // This file stays in the spool and is offered again; the store
            // error is reported with it.
            Err(e) => Err(e),
        });
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Ok(IngestOutcome::Changed)))
        .collect())
}

/// The checks before reading an offer: already buffered or kept, room in the
/// buffer (`buffered` bytes so far) and on its disk (`free` bytes), and the
/// file still the one announced. `Ok(Err(outcome))` ends the offer there.
fn prepare(
    store: &Store,
    offer: &Offer,
    max_buffer_bytes: u64,
    buffered: &mut u64,
    free: &mut Option<u64>,
) -> Result<Result<(File, NewFile, SourceIdentity), IngestOutcome>, IngestError> {
    let Offer {
        candidate,
        spool,
        target,
    } = offer;
    let spool_key = spool.path.display().to_string();
    let expected = candidate.identity;
    let keep = matches!(spool.disposition, Disposition::Keep);
    if keep && store.is_kept(&spool_key, &candidate.relative, expected)? {
        return Ok(Err(IngestOutcome::AlreadyKept));
    }
    if !keep && let Some(file_id) = store.find_by_source(&spool_key, expected)? {
        dispose(
            &candidate.path,
            &candidate.relative,
            expected,
            &spool.disposition,
        )?;
        return Ok(Err(IngestOutcome::AlreadyBuffered { file_id }));
    }
    if expected.size > max_buffer_bytes {
        return Ok(Err(IngestOutcome::TooLarge {
            size: expected.size,
            limit: max_buffer_bytes,
        }));
    }
    if *buffered + expected.size > max_buffer_bytes {
        return Ok(Err(IngestOutcome::BufferFull));
    }
    // The file goes through the WAL and then into the database, and the uploader
    // needs room to record its progress: never fill the disk to the last byte.
    let needed = expected.size.saturating_mul(2);
    if let Some(room) = *free
        && room < needed + DISK_RESERVE
    {
        return Ok(Err(IngestOutcome::DiskFull { free: room }));
    }

    // O_NOFOLLOW: a symlink swapped in is refused; O_NONBLOCK: a FIFO swapped in
    // never blocks the open.
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(&candidate.path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err(IngestOutcome::Changed)),
        Err(e) => {
            return Ok(Err(IngestOutcome::Skipped(format!(
                "cannot open {}: {e}",
                candidate.path.display()
            ))));
        }
    };
    let meta = file.metadata().map_err(|source| IngestError::Read {
        path: candidate.path.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Ok(Err(IngestOutcome::Skipped(format!(
            "{} is not a regular file",
            candidate.path.display()
        ))));
    }
    if SourceIdentity::of(&meta) != expected {
        return Ok(Err(IngestOutcome::Changed));
    }
    *buffered += expected.size;
    if let Some(room) = free {
        *room -= needed;
    }
    let new_file = NewFile {
        spool: spool_key,
        rel_path: candidate.relative.clone(),
        remote_name: remote_name(&spool.remote_prefix, &candidate.relative),
        target: target.name.clone(),
        chunk_size: target.chunk_size,
        upload_id: protocol::new_upload_id(),
        src_path: candidate.path.display().to_string(),
        identity: expected,
        remember_kept: keep,
    };
    Ok(Ok((file, new_file, expected)))
}

/// How the path is checked after reading: a spool path must still be the very
/// inode that was read (a symlink is never followed there); a path a user named
/// may be a symlink to the file, as with `cp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathCheck {
    NoFollow,
    Follow,
}

/// Streams the open `file` into the store as `new_file` in one transaction.
/// Returns the new file's id and chunk count, or `None` (nothing kept) when the
/// file was not exactly `expected` before and after reading.
fn stream_into_store(
    store: &Store,
    new_file: &NewFile,
    file: &File,
    path: &Path,
    expected: SourceIdentity,
    path_check: PathCheck,
) -> Result<Option<(i64, u64)>, IngestError> {
    let mut n_chunks = 0u64;
    let committed = store.ingest(new_file, |sink| {
        let decision = fill_chunks(sink, new_file, file, path, expected, path_check);
        n_chunks = sink.chunks();
        decision
    })?;
    Ok(committed.map(|file_id| (file_id, n_chunks)))
}

/// Pushes the open `file` into `sink` as `new_file`'s chunks, with one
/// chunk's buffer reused throughout: the whole file's SHA-256, and each
/// chunk's CRC-32C (a tenth of the cost of a second SHA-256). A chunk's own
/// SHA-256 is kept only when the chunk is the whole file (it is then the
/// file's); for the chunks of a larger file it is worked out when a peer
/// needs it (see [`ChunkMeta::sha256`]). Decides to abort when the file was
/// not exactly `expected` before and after reading.
///
/// [`ChunkMeta::sha256`]: crate::agent::store::ChunkMeta::sha256
fn fill_chunks(
    sink: &mut ChunkSink<'_>,
    new_file: &NewFile,
    file: &File,
    path: &Path,
    expected: SourceIdentity,
    path_check: PathCheck,
) -> Result<IngestDecision, IngestError> {
    let read_err = |source| IngestError::Read {
        path: path.to_owned(),
        source,
    };
    let chunk_size = new_file.chunk_size as usize;
    let mut whole = Sha256Stream::new();
    let mut buf = vec![0u8; (expected.size.min(chunk_size as u64)) as usize];
    // Reads exactly the announced size (an empty file is one empty chunk, so
    // that it is delivered too); a file that grew or shrank meanwhile fails
    // the identity check below.
    let mut reader = file;
    let mut total = 0u64;
    loop {
        let want = (expected.size - total).min(chunk_size as u64) as usize;
        let n = fill(&mut reader, &mut buf[..want]).map_err(read_err)?;
        let chunk = &buf[..n];
        whole.update(chunk);
        let crc32c = Some(crc32c::crc32c(chunk));
        if total == 0 && n as u64 == expected.size {
            sink.push(chunk, &whole.clone().finalize_hex(), crc32c)?;
        } else {
            sink.push(chunk, "", crc32c)?;
        }
        total += n as u64;
        if n < want || total == expected.size {
            break;
        }
    }
    // The file must be exactly what was announced, before and after reading:
    // same size and mtime through the open handle, same inode at the path.
    let after = file.metadata().map_err(read_err)?;
    let at_path = match path_check {
        PathCheck::NoFollow => std::fs::symlink_metadata(path),
        PathCheck::Follow => std::fs::metadata(path),
    }
    .ok()
    .map(|m| SourceIdentity::of(&m));
    if SourceIdentity::of(&after) != expected || at_path != Some(expected) || total != expected.size
    {
        return Ok(IngestDecision::Abort);
    }
    Ok(IngestDecision::Commit {
        sha256: whole.finalize_hex(),
    })
}

/// Files of at least this many chunks are streamed into the buffer
/// ([`Store::ingest_streaming`]): a target that takes chunks before the
/// file's hash starts sending them while the rest is read. Smaller files
/// share one transaction (and one sync) with the others offered together.
pub const STREAM_MIN_CHUNKS: u64 = 4;

/// How many chunks `file` is cut into: at least one (an empty file is one
/// empty chunk).
fn chunk_count(file: &NewFile) -> u64 {
    file.identity.size.div_ceil(file.chunk_size.max(1)).max(1)
}

/// The `spool` key of files buffered by [`ingest_path`] (the one-shot commands
/// and the library's `Client::add_file`); a spool path is always absolute, so
/// the two never mix.
const PATH_SPOOL: &str = "(path)";

/// A file buffered by name (`ingest_path`): what
/// [`Client::buffer_file`](crate::client::Client::buffer_file) returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathIngest {
    /// The file's id in the buffer, as [`Store::file`] takes it and
    /// `indexedcp status` shows it.
    pub file_id: i64,
    /// How many chunks the file was cut into; at least 1, since an empty file
    /// is one empty chunk.
    pub chunk_count: u64,
    /// The file's size in bytes.
    pub bytes: u64,
    /// The same unchanged file was already waiting in the buffer (an earlier
    /// `add` or an interrupted upload); it was not buffered a second time.
    pub already_buffered: bool,
}

/// Buffers the file at `path` for `target`, sent as `remote_name`, and leaves
/// the source alone. The file's absolute path is its client name (`rel_path`).
///
/// A file already waiting in the buffer unchanged (same path, inode, size, mtime
/// or, failing that, same content) is not buffered again, so repeating an
/// interrupted `indexedcp upload FILE` never delivers the file twice. Once the
/// earlier copy is confirmed, adding the file again sends it again, like `cp`.
pub fn ingest_path(
    store: &Store,
    path: &Path,
    remote_name: &str,
    target: &TargetConfig,
) -> Result<PathIngest, IngestError> {
    if remote_name.chars().any(char::is_control) {
        return Err(IngestError::ControlCharacter {
            name: crate::agent::spool::escape_name(remote_name).into_owned(),
        });
    }
    let read_err = |source| IngestError::Read {
        path: path.to_owned(),
        source,
    };
    let absolute = std::path::absolute(path).map_err(read_err)?;
    // O_NONBLOCK: a FIFO never blocks the open. Symlinks are followed, as `cp` does
    // for the files it is given.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(IngestError::NotAFile {
            path: path.to_owned(),
        });
    }
    let expected = SourceIdentity::of(&meta);
    let client_name = absolute.display().to_string();
    if let Some(found) = find_waiting(store, &client_name, &file, expected, target)? {
        return Ok(PathIngest {
            file_id: found.id,
            chunk_count: found.chunk_count,
            bytes: found.size,
            already_buffered: true,
        });
    }
    let new_file = NewFile {
        spool: PATH_SPOOL.to_owned(),
        rel_path: client_name,
        remote_name: remote_name.to_owned(),
        target: target.name.clone(),
        chunk_size: target.chunk_size,
        upload_id: protocol::new_upload_id(),
        src_path: absolute.display().to_string(),
        identity: expected,
        remember_kept: false,
    };
    match stream_into_store(store, &new_file, &file, path, expected, PathCheck::Follow)? {
        Some((file_id, chunk_count)) => Ok(PathIngest {
            file_id,
            chunk_count,
            bytes: expected.size,
            already_buffered: false,
        }),
        None => Err(IngestError::Changed {
            path: path.to_owned(),
        }),
    }
}

/// A not yet confirmed buffered copy of this very file, if there is one.
fn find_waiting(
    store: &Store,
    client_name: &str,
    file: &File,
    expected: SourceIdentity,
    target: &TargetConfig,
) -> Result<Option<FileRecord>, IngestError> {
    let waiting = |r: &FileRecord| {
        r.state != FileState::Confirmed && r.target == target.name && r.rel_path == client_name
    };
    let Some(id) = store.find_by_source(PATH_SPOOL, expected)? else {
        return Ok(None);
    };
    let first = store.file(id)?;
    if waiting(&first) {
        return Ok(Some(first));
    }
    // The identity lookup found an older, confirmed copy; a newer one may still
    // be waiting. Compare content, which the identity cannot do here.
    let candidates: Vec<FileRecord> = store
        .list()?
        .into_iter()
        .filter(|r| r.spool == PATH_SPOOL && waiting(r) && r.size == expected.size)
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    let read_err = |source| IngestError::Read {
        path: PathBuf::from(client_name),
        source,
    };
    let mut whole = Sha256::new();
    let mut reader = file;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = fill(&mut reader, &mut buf).map_err(read_err)?;
        whole.update(&buf[..n]);
        if n < buf.len() {
            break;
        }
    }
    // Rewind, so that the caller streams the file from its start.
    std::io::Seek::rewind(&mut reader).map_err(read_err)?;
    let sha256 = hex::encode(whole.finalize());
    Ok(candidates.into_iter().find(|r| r.sha256 == sha256))
}

fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Disposes of a buffered source, but only if the path still holds the file that
/// was buffered: a new file written under the same name is left for its own ingest.
fn dispose(
    path: &Path,
    relative: &str,
    buffered: SourceIdentity,
    disposition: &Disposition,
) -> Result<(), IngestError> {
    let still_same = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| SourceIdentity::of(&m))
        == Some(buffered);
    if !still_same {
        return Ok(());
    }
    match disposition {
        Disposition::Keep => Ok(()),
        Disposition::Delete => std::fs::remove_file(path)
            .or_else(ignore_not_found)
            .map_err(|source| IngestError::Dispose {
                path: path.to_owned(),
                action: "delete",
                source,
            }),
        Disposition::Move { to } => move_without_overwrite(path, &to.join(relative))
            .map(drop)
            .map_err(|source| IngestError::Dispose {
                path: path.to_owned(),
                action: "move",
                source,
            }),
    }
}

fn ignore_not_found(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// Moves `from` to `to`, or to `to` with a numeric suffix when taken; never
/// replaces an existing file. Works across file systems (copy, sync, link).
fn move_without_overwrite(from: &Path, to: &Path) -> io::Result<PathBuf> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    for attempt in 0..10_000u32 {
        let candidate = numbered(to, attempt);
        match std::fs::hard_link(from, &candidate) {
            Ok(()) => {
                std::fs::remove_file(from).or_else(ignore_not_found)?;
                return Ok(candidate);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
                return copy_then_link(from, to);
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("no free name for {}", to.display()),
    ))
}

fn copy_then_link(from: &Path, to: &Path) -> io::Result<PathBuf> {
    let parent = to.parent().unwrap_or(Path::new("."));
    let tmp = parent.join(format!(".indexedcp-move-{}", protocol::new_upload_id()));
    std::fs::copy(from, &tmp)?;
    File::open(&tmp)?.sync_all()?;
    let result = (|| {
        for attempt in 0..10_000u32 {
            let candidate = numbered(to, attempt);
            match std::fs::hard_link(&tmp, &candidate) {
                Ok(()) => return Ok(candidate),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("no free name for {}", to.display()),
        ))
    })();
    let _ = std::fs::remove_file(&tmp);
    let moved = result?;
    std::fs::remove_file(from).or_else(ignore_not_found)?;
    Ok(moved)
}

/// `dir/name.ext`, then `dir/name.1.ext`, `dir/name.2.ext`, ...
fn numbered(path: &Path, attempt: u32) -> PathBuf {
    if attempt == 0 {
        return path.to_owned();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.{attempt}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{attempt}"),
    };
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_names_join_the_prefix() {
        assert_eq!(remote_name("", "a/b.txt"), "a/b.txt");
        assert_eq!(remote_name("site1", "a/b.txt"), "site1/a/b.txt");
        assert_eq!(remote_name("site1/", "b.txt"), "site1/b.txt");
    }

    #[test]
    fn a_file_offered_twice_in_one_batch_is_buffered_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let root = dir.path().join("spool");
        std::fs::create_dir(&root).unwrap();
        let path = root.join("a.bin");
        std::fs::write(&path, b"0123456789").unwrap();
        let offer = Offer {
            candidate: Candidate {
                spool: root.clone(),
                path: path.clone(),
                relative: "a.bin".to_owned(),
                identity: SourceIdentity::of(&std::fs::metadata(&path).unwrap()),
            },
            spool: SpoolConfig::new(&root, "t"),
            target: TargetConfig::new("t", "http://127.0.0.1:9/upload"),
        };
        let outcomes =
            ingest_candidates(&store, &[offer.clone(), offer], u64::MAX, &|| {}).unwrap();
        assert!(
            matches!(outcomes[0], Ok(IngestOutcome::OfferedAgain)),
            "{:?}",
            outcomes[0]
        );
        assert!(
            matches!(outcomes[1], Ok(IngestOutcome::Buffered { bytes: 10, .. })),
            "{:?}",
            outcomes[1]
        );
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(!path.exists(), "the source is disposed of once");
    }

    #[test]
    fn a_named_file_waiting_in_the_buffer_is_not_buffered_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("b.db")).unwrap();
        let mut target = TargetConfig::new("cli", "http://127.0.0.1:9/upload");
        target.chunk_size = 4;
        let path = dir.path().join("a.txt");
        std::fs::write(&path, b"0123456789").unwrap();

        let first = ingest_path(&store, &path, "a.txt", &target).unwrap();
        assert_eq!(
            (first.chunk_count, first.bytes, first.already_buffered),
            (3, 10, false)
        );
        let record = store.file(first.file_id).unwrap();
        assert_eq!(record.rel_path, path.display().to_string());
        assert_eq!(
            (record.remote_name.as_str(), record.spool.as_str()),
            ("a.txt", PATH_SPOOL)
        );
        let again = ingest_path(&store, &path, "a.txt", &target).unwrap();
        assert_eq!(
            (again.file_id, again.already_buffered),
            (first.file_id, true)
        );

        // Delivered: the next add is a new copy, and that copy is then the one
        // found, although the identity lookup meets the confirmed one first.
        store
            .confirm(
                first.file_id,
                Some("a.txt"),
                crate::agent::store::Durability::Synced,
            )
            .unwrap();
        let second = ingest_path(&store, &path, "a.txt", &target).unwrap();
        assert!(!second.already_buffered && second.file_id != first.file_id);
        let third = ingest_path(&store, &path, "a.txt", &target).unwrap();
        assert_eq!(
            (third.file_id, third.already_buffered),
            (second.file_id, true)
        );

        // Changed content is a new file.
        std::fs::write(&path, b"abc").unwrap();
        let changed = ingest_path(&store, &path, "a.txt", &target).unwrap();
        assert!(!changed.already_buffered);
        assert_eq!(store.chunk_data(changed.file_id, 0).unwrap(), b"abc");

        assert!(matches!(
            ingest_path(&store, dir.path(), "x", &target),
            Err(IngestError::NotAFile { .. })
        ));
        let refused = ingest_path(&store, &path, "a\nb.txt", &target).unwrap_err();
        assert!(matches!(refused, IngestError::ControlCharacter { .. }));
        assert!(refused.to_string().contains("a\\nb.txt"), "{refused}");
        assert!(matches!(
            ingest_path(&store, &dir.path().join("missing"), "x", &target),
            Err(IngestError::Read { .. })
        ));
        assert_eq!(store.list().unwrap().len(), 3);
    }

    #[test]
    fn moves_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out/sub/x.txt");
        for content in ["one", "two"] {
            let src = dir.path().join("x.txt");
            std::fs::write(&src, content).unwrap();
            move_without_overwrite(&src, &dest).unwrap();
            assert!(!src.exists());
        }
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "one");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out/sub/x.1.txt")).unwrap(),
            "two"
        );
    }
}
