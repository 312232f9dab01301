//! v1 uploads, the original servers' protocol (no `X-Upload-Id`): chunks of
//! a client file name arrive in order and are appended to one file, whose
//! session (final name, next chunk, size, last chunk's hash) is kept in SQLite
//! under the client name, one chunk at a time under that name's lock.
//!
//! Each chunk's bytes are synced before its session is recorded (a synced
//! commit), and the reply is sent after both: a chunk acknowledged is
//! durable. Chunk 0 is received into a staging file, synced, and renamed
//! without replacing anything to a free name next to the client's name (a
//! later upload of the same name never appends to an earlier file), and that
//! directory is synced before the new session is recorded. A later chunk is
//! written after the recorded size, cutting off first whatever an interrupted
//! chunk left there, and cut back again when it is refused. Unlike a
//! resumable upload, a v1 file grows under its final name chunk by chunk, as
//! it does on the original servers.

use std::fs::File;
use std::io;

use axum::body::Body;
use axum::response::{IntoResponse, Response};

use super::body::{self, Sink, read_body};
use super::errors::{
    ApiError, body_error, no_free_name, open_error, too_large_chunk, too_large_file,
};
use super::paths::{self, Destination};
use super::state::V1Session;
use super::{Receiver, blocking};
use crate::protocol::ChunkReply;

/// One chunk of a v1 upload (no `X-Upload-Id`): chunk 0 starts a new file,
/// each later chunk must be the next one, or the last one again.
pub(super) async fn receive_v1(
    receiver: Receiver,
    client_name: String,
    chunk_idx: u64,
    body: Body,
) -> Result<Response, ApiError> {
    let inner = &receiver.inner;
    let dest = receiver.destination(&client_name)?;
    let _guard = inner.locks.lock(format!("v1:{client_name}")).await;

    let reply = |actual: &str, duplicate: bool| {
        axum::Json(ChunkReply {
            message: "Chunk received".to_owned(),
            actual_filename: Some(actual.to_owned()),
            chunk_index: chunk_idx,
            client_filename: client_name.clone(),
            upload_id: None,
            complete: None,
            duplicate,
            received_chunks: None,
        })
        .into_response()
    };
    let limits = |size: u64| {
        let file_room = if inner.max_file_bytes > 0 {
            inner.max_file_bytes.saturating_sub(size)
        } else {
            u64::MAX
        };
        let too_long = move |_| {
            if inner.max_chunk_bytes <= file_room {
                too_large_chunk(inner.max_chunk_bytes)
            } else {
                too_large_file(inner.max_file_bytes)
            }
        };
        (inner.max_chunk_bytes.min(file_room), too_long)
    };

    if chunk_idx == 0 {
        // Chunk 0 always starts a new file under a unique name, so a later upload
        // of the same name never appends to an earlier file. It is received into
        // staging first: a refused or interrupted chunk leaves nothing behind.
        let staged_name = format!("v1-{}", paths::random_hex(12));
        let this = receiver.clone();
        let staged = staged_name.clone();
        let file = blocking(move || paths::create_new(&this.inner.staging, &staged)).await?;
        let (limit, too_long) = limits(0);
        let outcome = match read_body(
            body,
            Some(Sink {
                file,
                offset: 0,
                sync: true,
                claim: None,
                hash: true,
            }),
            limit,
            inner.read_timeout,
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                let _ = rustix::fs::unlinkat(
                    &inner.staging,
                    staged_name.as_str(),
                    rustix::fs::AtFlags::empty(),
                );
                return Err(body_error(e, too_long));
            }
        };
        let this = receiver.clone();
        let name = client_name.clone();
        let session =
            blocking(move || this.start_v1_session(&name, &dest, &staged_name, outcome)).await?;
        tracing::debug!(client_name = %client_name, file = %session.actual_name, bytes = session.size, "v1 upload started");
        return Ok(reply(&session.actual_name, false));
    }

    let state = inner.state.clone();
    let name = client_name.clone();
    let session = blocking(move || state.v1_session(&name))
        .await?
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "no upload of {client_name:?} is in progress; start with chunk 0"
            ))
        })?;
    let (limit, too_long) = limits(session.size);

    if chunk_idx == session.next_idx {
        let this = receiver.clone();
        let actual = session.actual_name.clone();
        let size = session.size;
        let file = blocking(move || this.reopen_v1_file(&actual, size)).await?;
        let rollback = file.try_clone()?;
        let outcome = match read_body(
            body,
            Some(Sink {
                file,
                offset: size,
                sync: true,
                claim: None,
                hash: true,
            }),
            limit,
            inner.read_timeout,
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(e) => {
                // Cut off what the refused chunk wrote, so the file never holds a
                // partial chunk as if it had arrived.
                let _ = blocking(move || rollback.set_len(size)).await;
                return Err(body_error(e, too_long));
            }
        };
        let updated = V1Session {
            next_idx: session.next_idx + 1,
            size: session.size + outcome.length,
            last_sha256: Some(outcome.sha256),
            ..session.clone()
        };
        let state = inner.state.clone();
        blocking(move || state.put_v1_session(&updated)).await?;
        tracing::debug!(client_name = %client_name, file = %session.actual_name, chunk = chunk_idx, bytes = outcome.length, "v1 chunk appended");
        Ok(reply(&session.actual_name, false))
    } else if chunk_idx + 1 == session.next_idx {
        // The previous reply was lost and the client sent the chunk again.
        let outcome = read_body(body, None, inner.max_chunk_bytes, inner.read_timeout)
            .await
            .map_err(|e| body_error(e, too_long))?;
        if session.last_sha256.as_deref() == Some(outcome.sha256.as_str()) {
            Ok(reply(&session.actual_name, true))
        } else {
            Err(ApiError::Conflict(format!(
                "chunk {chunk_idx} of {client_name:?} was already received with different content; start again with chunk 0"
            )))
        }
    } else {
        Err(ApiError::Conflict(format!(
            "chunk {chunk_idx} of {client_name:?} is out of order: the next expected chunk is {}",
            session.next_idx
        )))
    }
}

impl Receiver {
    /// Cuts every v1 file back to its acknowledged size: a chunk cut off by a
    /// crash (or SIGKILL) left its bytes after it, since later chunks are
    /// written in place. Run at start and after a reload, under each client
    /// name's lock, so never under a chunk being written.
    pub(super) async fn trim_v1_files(&self) {
        let state = self.inner.state.clone();
        let sessions = match blocking(move || state.v1_sessions()).await {
            Ok(sessions) => sessions,
            Err(e) => {
                tracing::warn!(error = %e.message(), "cannot list the v1 sessions to trim their files");
                return;
            }
        };
        for (client_name, actual_name, size) in sessions {
            let _guard = self.inner.locks.lock(format!("v1:{client_name}")).await;
            let this = self.clone();
            let name = actual_name.clone();
            match blocking(move || this.trim_v1_file(&name, size)).await {
                Ok(Some(was)) => tracing::info!(
                    file = %actual_name,
                    acknowledged = size,
                    cut = was - size,
                    "cut the bytes of an unacknowledged v1 chunk off a file"
                ),
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    file = %actual_name,
                    error = %e.message(),
                    "cannot cut a v1 file back to its acknowledged size"
                ),
            }
        }
    }

    /// Cuts `actual_name` to `size` bytes if it is longer; its former size
    /// then. A file removed meanwhile is left alone.
    fn trim_v1_file(&self, actual_name: &str, size: u64) -> Result<Option<u64>, ApiError> {
        let dest = Destination::from_display(actual_name);
        let parent = paths::open_parent(&self.inner.root, &dest).map_err(open_error)?;
        let file = match paths::open_existing(&parent, &dest.name) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let was = file.metadata()?.len();
        if was <= size {
            return Ok(None);
        }
        file.set_len(size)?;
        file.sync_all()?;
        Ok(Some(was))
    }

    /// Moves a received chunk 0 from staging to a free name at `dest` and records
    /// the new session.
    fn start_v1_session(
        &self,
        client_name: &str,
        dest: &Destination,
        staged_name: &str,
        first_chunk: body::BodyOutcome,
    ) -> Result<V1Session, ApiError> {
        let inner = &self.inner;
        let parent = paths::open_parent(&inner.root, dest).map_err(open_error)?;
        let millis = paths::now_millis();
        for attempt in 0..10_000u32 {
            let name = paths::unique_candidate(&dest.name, millis, attempt);
            if paths::rename_no_replace(&inner.staging, staged_name, &parent, &name)? {
                paths::fsync_dir(&parent)?;
                let session = V1Session {
                    client_name: client_name.to_owned(),
                    actual_name: dest.with_name(name).display(),
                    next_idx: 1,
                    size: first_chunk.length,
                    last_sha256: Some(first_chunk.sha256),
                };
                inner.state.put_v1_session(&session)?;
                return Ok(session);
            }
        }
        let _ = rustix::fs::unlinkat(&inner.staging, staged_name, rustix::fs::AtFlags::empty());
        Err(no_free_name(dest))
    }

    /// Opens the file of a v1 session and cuts off whatever an interrupted chunk
    /// left after the last recorded byte.
    fn reopen_v1_file(&self, actual_name: &str, size: u64) -> Result<File, ApiError> {
        let dest = Destination::from_display(actual_name);
        let parent = paths::open_parent(&self.inner.root, &dest).map_err(open_error)?;
        let file = match paths::open_existing(&parent, &dest.name) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ApiError::Conflict(format!(
                    "{actual_name} was removed from the output directory during its upload; start again with chunk 0"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        file.set_len(size)?;
        Ok(file)
    }
}
