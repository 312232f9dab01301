//! Reading request headers: text and numbers with the error each one earns,
//! the resumable extension's headers checked against each other
//! ([`Extension`]), and the declared `Content-Length`, by which a body over
//! its limit is refused before any of it is read.

use axum::body::Body;
use axum::http::{HeaderMap, header};

use super::body;
use super::errors::ApiError;
use super::state::FileMeta;
use crate::protocol;

/// The headers of the resumable extension, parsed and checked against each other.
pub(super) struct Extension {
    pub(super) upload_id: String,
    pub(super) offset: u64,
    /// What the chunk's bytes are checked against: at least one is given.
    pub(super) chunk_sha256: Option<String>,
    pub(super) chunk_crc32c: Option<u32>,
    pub(super) meta: FileMeta,
}

impl Extension {
    /// The chunk's check as the receiver records it: the SHA-256 (hex) when
    /// the chunk carries one, else `crc32c:` and the CRC's 8 hex digits.
    pub(super) fn recorded_check(&self) -> String {
        match (&self.chunk_sha256, self.chunk_crc32c) {
            (Some(sha256), _) => sha256.clone(),
            (None, Some(crc)) => format!("{CRC32C_PREFIX}{}", protocol::crc32c_hex(crc)),
            (None, None) => unreachable!("parse_extension demands one of the two"),
        }
    }
}

/// How a chunk checked by CRC-32C alone is recorded: `crc32c:` and 8 hex digits.
pub(super) const CRC32C_PREFIX: &str = "crc32c:";

/// Whether a chunk's recorded check and the one declared for it again say
/// that the bytes differ: two of the same kind (two SHA-256s, or two
/// CRC-32Cs) that are not equal. Checks of two kinds cannot be compared; the
/// bytes recorded first stay, and completion checks the file's SHA-256.
pub(super) fn checks_differ(recorded: &str, declared: &str) -> bool {
    recorded.starts_with(CRC32C_PREFIX) == declared.starts_with(CRC32C_PREFIX)
        && recorded != declared
}

pub(super) fn header_str<'a>(
    headers: &'a HeaderMap,
    name: &str,
) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v.as_bytes())
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("header {name} is not valid UTF-8"))),
    }
}

fn required<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    header_str(headers, name)?.ok_or_else(|| {
        ApiError::BadRequest(format!(
            "header {name} is required with X-Upload-Id (the resumable extension)"
        ))
    })
}

pub(super) fn number(name: &str, value: &str) -> Result<u64, ApiError> {
    value.trim().parse::<u64>().map_err(|_| {
        ApiError::BadRequest(format!(
            "header {name} must be a non-negative integer, got {value:?}"
        ))
    })
}

pub(super) fn parse_extension(
    headers: &HeaderMap,
    upload_id: &str,
    client_name: &str,
    chunk_idx: u64,
) -> Result<Extension, ApiError> {
    if !protocol::is_valid_upload_id(upload_id) {
        return Err(ApiError::BadRequest(
            "header X-Upload-Id must be 16 to 64 of [A-Za-z0-9_-]".to_owned(),
        ));
    }
    let offset = number("X-Chunk-Offset", required(headers, protocol::CHUNK_OFFSET)?)?;
    let file_size = number("X-File-Size", required(headers, protocol::FILE_SIZE)?)?;
    let chunk_count = number("X-Chunk-Count", required(headers, protocol::CHUNK_COUNT)?)?;
    let sha = |name: &str, value: &str| {
        protocol::parse_sha256_hex(value)
            .ok_or_else(|| ApiError::BadRequest(format!("header {name} must be 64 hex digits")))
    };
    let chunk_sha256 = match header_str(headers, protocol::CHUNK_SHA256)? {
        Some(value) => Some(sha("X-Chunk-Sha256", value)?),
        None => None,
    };
    let chunk_crc32c = match header_str(headers, protocol::CHUNK_CRC32C)? {
        Some(value) => Some(protocol::parse_crc32c_hex(value).ok_or_else(|| {
            ApiError::BadRequest("header X-Chunk-Crc32c must be 8 hex digits".to_owned())
        })?),
        None => None,
    };
    if chunk_sha256.is_none() && chunk_crc32c.is_none() {
        return Err(ApiError::BadRequest(
            "header X-Chunk-Sha256 (or X-Chunk-Crc32c) is required with X-Upload-Id (the resumable extension)"
                .to_owned(),
        ));
    }
    // Left out while the client does not know the file's hash yet (it is
    // still reading the file): the upload completes once a chunk brings it.
    let file_sha256 = match header_str(headers, protocol::FILE_SHA256)? {
        Some(value) => sha("X-File-Sha256", value)?,
        None => String::new(),
    };
    if chunk_count == 0 {
        return Err(ApiError::BadRequest(
            "header X-Chunk-Count must be at least 1 (an empty file is one empty chunk)".to_owned(),
        ));
    }
    if chunk_idx >= chunk_count {
        return Err(ApiError::BadRequest(format!(
            "X-Chunk-Index {chunk_idx} is not below X-Chunk-Count {chunk_count}"
        )));
    }
    if offset > file_size {
        return Err(ApiError::BadRequest(format!(
            "X-Chunk-Offset {offset} is beyond X-File-Size {file_size}"
        )));
    }
    Ok(Extension {
        upload_id: upload_id.to_owned(),
        offset,
        chunk_sha256,
        chunk_crc32c,
        meta: FileMeta {
            client_name: client_name.to_owned(),
            file_size,
            chunk_count,
            file_sha256,
        },
    })
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The body, unless its declared `Content-Length` is over `limit`. A body
/// refused that way is read and dropped first when it is at most
/// [`body::DRAIN_BYTES`] over, so that the client, still sending, reads the
/// reply instead of a reset connection.
pub(super) async fn within_declared_limit(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Option<Body> {
    match content_length(headers) {
        Some(len) if len > limit => {
            if len - limit <= body::DRAIN_BYTES {
                body::drain(body).await;
            }
            None
        }
        _ => Some(body),
    }
}
