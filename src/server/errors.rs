//! What the receiver answers when it cannot do what was asked: [`ServerError`]
//! for a receiver that cannot start, and [`ApiError`] for a refused request,
//! with its status code and its `{"error", "message"}` JSON body (the same
//! shape inside a batch reply). The conversions from I/O, database, body and
//! path errors live here, as do the refusals several handlers share, so that a
//! given failure reads the same whichever protocol met it.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::body::{BodyError, is_disk_full};
use super::paths::{self, Destination};
use super::state::{self, FileMeta};
use crate::protocol::{self, ErrorReply};

/// Errors that stop the receiver from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create {what} {path}: {source}")]
    CreateDir {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "server.state_dir {state_dir} is not on the same file system as server.output_dir {output_dir}; finished files are renamed into place, so put the state directory on the output directory's file system"
    )]
    CrossDevice {
        state_dir: PathBuf,
        output_dir: PathBuf,
    },
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("{0}")]
    Settings(String),
    #[error("cannot listen on {addr}: {source}; choose another address or port")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A reply other than success: status plus `{"error", "message"}`.
#[derive(Debug, Clone)]
pub(super) enum ApiError {
    Unauthorized,
    BadRequest(String),
    InvalidName(String),
    NotFound,
    Conflict(String),
    Timeout(String),
    TooLarge(String),
    Unprocessable(String),
    /// The whole file did not verify; the upload was discarded.
    FileMismatch(String),
    InsufficientStorage(String),
    /// The output or staging directory is missing or no longer reachable
    /// (`paths::DirUnavailable`); retrying later loses nothing.
    Unavailable(String),
    Internal(String),
}

impl ApiError {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadRequest(_) | ApiError::InvalidName(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) | ApiError::FileMismatch(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(super) fn message(&self) -> String {
        match self {
            ApiError::Unauthorized => protocol::INVALID_KEY_ERROR.to_owned(),
            ApiError::NotFound => "Not found".to_owned(),
            ApiError::BadRequest(m)
            | ApiError::InvalidName(m)
            | ApiError::Conflict(m)
            | ApiError::Timeout(m)
            | ApiError::TooLarge(m)
            | ApiError::Unprocessable(m)
            | ApiError::FileMismatch(m)
            | ApiError::InsufficientStorage(m)
            | ApiError::Unavailable(m)
            | ApiError::Internal(m) => m.clone(),
        }
    }

    pub(super) fn reply(&self) -> ErrorReply {
        let (error, message) = match self {
            ApiError::Unauthorized => (protocol::INVALID_KEY_ERROR, None),
            ApiError::NotFound => ("Not found", None),
            ApiError::BadRequest(m) => ("Bad request", Some(m)),
            ApiError::InvalidName(m) => ("Invalid filename", Some(m)),
            ApiError::Conflict(m) => ("Conflict", Some(m)),
            ApiError::Timeout(m) => ("Request timeout", Some(m)),
            ApiError::TooLarge(m) => ("Payload too large", Some(m)),
            ApiError::Unprocessable(m) => (protocol::CHUNK_MISMATCH_ERROR, Some(m)),
            ApiError::FileMismatch(m) => (protocol::FILE_MISMATCH_ERROR, Some(m)),
            ApiError::InsufficientStorage(m) => ("Insufficient storage", Some(m)),
            ApiError::Unavailable(m) => ("Service unavailable", Some(m)),
            ApiError::Internal(m) => ("Internal error", Some(m)),
        };
        ErrorReply {
            error: error.to_owned(),
            message: message.cloned(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message(), self.status())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // A full disk or a directory gone is the operator's to fix, not a
        // fault of the receiver (and the directory's fate is logged loudly
        // once where it is found).
        if matches!(
            status,
            StatusCode::INSUFFICIENT_STORAGE | StatusCode::SERVICE_UNAVAILABLE
        ) {
            tracing::warn!(status = status.as_u16(), error = %self.message(), "request refused");
        } else if status.is_server_error() {
            tracing::error!(status = status.as_u16(), error = %self.message(), "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self.message(), "request refused");
        }
        (status, axum::Json(self.reply())).into_response()
    }
}

impl From<io::Error> for ApiError {
    fn from(e: io::Error) -> ApiError {
        if let Some(gone) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<paths::DirUnavailable>())
        {
            ApiError::Unavailable(gone.0.clone())
        } else if is_disk_full(&e) {
            ApiError::InsufficientStorage(format!(
                "the receiver's disk is full ({e}); nothing was recorded, retry later"
            ))
        } else if e.raw_os_error() == Some(rustix::io::Errno::FBIG.raw_os_error()) {
            ApiError::TooLarge(format!(
                "the receiver's file system refuses a file this large ({e}); nothing was recorded"
            ))
        } else {
            ApiError::Internal(format!("i/o error on the receiver: {e}"))
        }
    }
}

impl From<state::StateError> for ApiError {
    fn from(e: state::StateError) -> ApiError {
        if let state::StateError::Sql(rusqlite::Error::SqliteFailure(f, _)) = &e
            && f.code == rusqlite::ErrorCode::DiskFull
        {
            return ApiError::InsufficientStorage(format!(
                "the receiver's disk is full ({e}); retry later"
            ));
        }
        ApiError::Internal(e.to_string())
    }
}

pub(super) fn open_error(e: paths::OpenError) -> ApiError {
    match e {
        paths::OpenError::NotADirectory(_) => {
            ApiError::InvalidName(format!("{e}; a file cannot be written below it"))
        }
        paths::OpenError::Io(e) => e.into(),
    }
}

pub(super) fn body_error(e: BodyError, too_long: impl FnOnce(u64) -> ApiError) -> ApiError {
    match e {
        BodyError::TooLong { limit } => too_long(limit),
        BodyError::Timeout(t) => ApiError::Timeout(format!(
            "no body data for {}s; the chunk was not recorded",
            t.as_secs()
        )),
        BodyError::Aborted(m) => ApiError::BadRequest(format!("the request body was cut off: {m}")),
        BodyError::Short { wanted } => ApiError::BadRequest(format!(
            "the body ended before the {wanted}-byte manifest did (X-Manifest-Length)"
        )),
        BodyError::Io(e) => e.into(),
    }
}

pub(super) fn too_large_chunk(limit: u64) -> ApiError {
    ApiError::TooLarge(format!(
        "a chunk may be at most {limit} bytes (server max_chunk_bytes); send smaller chunks"
    ))
}

pub(super) fn too_large_file(limit: u64) -> ApiError {
    ApiError::TooLarge(format!(
        "a file may be at most {limit} bytes (server max_file_bytes)"
    ))
}

pub(super) fn too_large_batch(limit: u64) -> ApiError {
    ApiError::TooLarge(format!(
        "a batch may carry at most {limit} bytes of files (server max_chunk_bytes); send fewer files per batch"
    ))
}

pub(super) fn checksum_mismatch(chunk_idx: u64, actual: &str) -> ApiError {
    ApiError::Unprocessable(format!(
        "chunk {chunk_idx} has SHA-256 {actual}, not the X-Chunk-Sha256 sent; nothing was recorded, send the chunk again"
    ))
}

/// A chunk whose bytes do not have the CRC-32C its header declared.
pub(super) fn crc32c_mismatch(chunk_idx: u64, actual: u32) -> ApiError {
    ApiError::Unprocessable(format!(
        "chunk {chunk_idx} has CRC-32C {}, not the X-Chunk-Crc32c sent; nothing was recorded, send the chunk again",
        crate::protocol::crc32c_hex(actual)
    ))
}

/// An upload id sent again with another file's metadata.
pub(super) fn upload_id_in_use(upload_id: &str, recorded: &FileMeta) -> ApiError {
    ApiError::Conflict(format!(
        "upload id {upload_id} is in use for another file ({:?}, {} bytes, {} chunks); use a new upload id",
        recorded.client_name, recorded.file_size, recorded.chunk_count
    ))
}

/// A chunk sent again with content other than what was recorded for it.
pub(super) fn chunk_differs(upload_id: &str, chunk_idx: u64) -> ApiError {
    ApiError::Conflict(format!(
        "chunk {chunk_idx} of upload {upload_id} was already received with different content"
    ))
}

/// Every unique name tried for `dest` was taken.
pub(super) fn no_free_name(dest: &Destination) -> ApiError {
    ApiError::Internal(format!(
        "no free name for {} in the output directory",
        dest.display()
    ))
}
