//! Ingest: streams a complete spool file into the buffer (one transaction per
//! file, SHA-256 per chunk and for the whole file), then disposes of the source.
//!
//! The order is the guarantee: the buffered copy is committed durably before the
//! source is touched, and a file whose size, mtime or inode changed while it was
//! read is rolled back and offered again later. A crash between the commit and
//! the disposal is harmless: the next sighting of the same source identity finds
//! the buffered row and only disposes. Every function here blocks; the daemon
//! runs them off the async executor. Nothing here knows about HTTP.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::{Disposition, SpoolConfig, TargetConfig};
use crate::protocol;
use crate::spool::Candidate;
use crate::store::{Identity, IngestDecision, NewFile, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "buffered {path} but could not dispose of it ({action}): {source}; it stays in the spool and will not be sent twice"
    )]
    Dispose {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
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
    /// The buffer is above `max_buffer_bytes`; the file waits in the spool.
    BufferFull,
    /// The file alone is larger than `max_buffer_bytes` and can never be buffered.
    TooLarge { size: u64, limit: u64 },
    /// Not a regular file (any more), or unreadable; skipped with this reason.
    Skipped(String),
}

impl From<crate::spool::SourceIdentity> for Identity {
    fn from(s: crate::spool::SourceIdentity) -> Identity {
        Identity {
            dev: s.dev,
            ino: s.ino,
            size: s.size,
            mtime_ns: s.mtime_ns,
        }
    }
}

fn identity_of(meta: &std::fs::Metadata) -> Identity {
    Identity {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
    }
}

/// The name sent as `X-File-Name`: the spool's `remote_prefix`, then the relative path.
pub fn remote_name(prefix: &str, relative: &str) -> String {
    if prefix.is_empty() {
        relative.to_owned()
    } else if prefix.ends_with('/') {
        format!("{prefix}{relative}")
    } else {
        format!("{prefix}/{relative}")
    }
}

/// Buffers one candidate from `spool` for `target`, then disposes of it.
pub fn ingest_candidate(
    store: &Store,
    candidate: &Candidate,
    spool: &SpoolConfig,
    target: &TargetConfig,
    max_buffer_bytes: u64,
) -> Result<IngestOutcome, IngestError> {
    let spool_key = spool.path.display().to_string();
    let expected: Identity = candidate.identity.into();
    let keep = matches!(spool.disposition, Disposition::Keep);
    if keep && store.is_kept(&spool_key, &candidate.relative, expected)? {
        return Ok(IngestOutcome::AlreadyKept);
    }
    if !keep && let Some(file_id) = store.find_by_source(&spool_key, expected)? {
        dispose(
            &candidate.path,
            &candidate.relative,
            expected,
            &spool.disposition,
        )?;
        return Ok(IngestOutcome::AlreadyBuffered { file_id });
    }
    if expected.size > max_buffer_bytes {
        return Ok(IngestOutcome::TooLarge {
            size: expected.size,
            limit: max_buffer_bytes,
        });
    }
    if store.buffered_bytes()? + expected.size > max_buffer_bytes {
        return Ok(IngestOutcome::BufferFull);
    }

    // O_NOFOLLOW: a symlink swapped in is refused; O_NONBLOCK: a FIFO swapped in
    // never blocks the open.
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(&candidate.path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(IngestOutcome::Changed),
        Err(e) => {
            return Ok(IngestOutcome::Skipped(format!(
                "cannot open {}: {e}",
                candidate.path.display()
            )));
        }
    };
    let meta = file.metadata().map_err(|source| IngestError::Read {
        path: candidate.path.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Ok(IngestOutcome::Skipped(format!(
            "{} is not a regular file",
            candidate.path.display()
        )));
    }
    if identity_of(&meta) != expected {
        return Ok(IngestOutcome::Changed);
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
    let path = candidate.path.clone();
    let committed = store.ingest(&new_file, |sink| -> Result<IngestDecision, IngestError> {
        let read_err = |source| IngestError::Read {
            path: path.clone(),
            source,
        };
        let mut reader = &file;
        let mut whole = Sha256::new();
        let mut buf = vec![0u8; target.chunk_size as usize];
        let mut total = 0u64;
        loop {
            let n = fill(&mut reader, &mut buf).map_err(read_err)?;
            if n == 0 && total > 0 {
                break;
            }
            let chunk = &buf[..n];
            whole.update(chunk);
            sink.push(chunk, &hex::encode(Sha256::digest(chunk)))?;
            total += n as u64;
            if n < buf.len() {
                break;
            }
        }
        // The file must be exactly what was announced, before and after reading:
        // same size and mtime through the open handle, same inode at the path.
        let after = file.metadata().map_err(read_err)?;
        let at_path = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| identity_of(&m));
        if identity_of(&after) != expected || at_path != Some(expected) || total != expected.size {
            return Ok(IngestDecision::Abort);
        }
        Ok(IngestDecision::Commit {
            sha256: hex::encode(whole.finalize()),
        })
    })?;
    let Some(file_id) = committed else {
        return Ok(IngestOutcome::Changed);
    };
    crate::failpoint::hit(crate::failpoint::INGEST_AFTER_COMMIT);
    dispose(
        &candidate.path,
        &candidate.relative,
        expected,
        &spool.disposition,
    )?;
    crate::failpoint::hit(crate::failpoint::INGEST_AFTER_DISPOSE);
    Ok(IngestOutcome::Buffered {
        file_id,
        bytes: expected.size,
    })
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
    buffered: Identity,
    disposition: &Disposition,
) -> Result<(), IngestError> {
    let still_same = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| identity_of(&m))
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
pub fn move_without_overwrite(from: &Path, to: &Path) -> io::Result<PathBuf> {
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
