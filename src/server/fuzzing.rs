//! The receiver's request parsers as plain functions for [`crate::fuzzing`],
//! which exists only for the fuzz targets under tests/fuzz and the property
//! tests. Each runs the same functions, in the same order, as the handler it
//! stands for; errors come back as their message text, so no receiver type
//! leaks out.

use axum::http::HeaderMap;

use super::errors::ApiError;
use super::{batch, headers, paths};
use crate::config::PathMode;
use crate::protocol;

pub(crate) use super::tus::fuzzing::{metadata as tus_metadata, request as tus_request};

fn message(error: ApiError) -> String {
    format!("{} {}", error.status().as_u16(), error.message())
}

/// The headers of `POST /upload` as its handler reads them: the file name,
/// the chunk index and, with `X-Upload-Id`, the resumable extension.
pub(crate) fn upload(headers: &HeaderMap) -> Result<Upload, String> {
    let file_name = headers::header_str(headers, protocol::FILE_NAME)
        .map_err(message)?
        .unwrap_or(protocol::DEFAULT_FILE_NAME)
        .to_owned();
    let chunk_index = match headers::header_str(headers, protocol::CHUNK_INDEX).map_err(message)? {
        None => 0,
        Some(v) => headers::number("X-Chunk-Index", v).map_err(message)?,
    };
    let extension = match headers::header_str(headers, protocol::UPLOAD_ID).map_err(message)? {
        None => None,
        Some(id) => {
            let ext =
                headers::parse_extension(headers, id, &file_name, chunk_index).map_err(message)?;
            Some(Extension {
                upload_id: ext.upload_id,
                offset: ext.offset,
                chunk_sha256: ext.chunk_sha256,
                chunk_crc32c: ext.chunk_crc32c,
                file_size: ext.meta.file_size,
                chunk_count: ext.meta.chunk_count,
                file_sha256: ext.meta.file_sha256,
            })
        }
    };
    Ok(Upload {
        file_name,
        chunk_index,
        extension,
        content_length: headers::content_length(headers),
    })
}

/// What `POST /upload` read from its headers.
#[derive(Debug)]
pub(crate) struct Upload {
    pub(crate) file_name: String,
    pub(crate) chunk_index: u64,
    pub(crate) extension: Option<Extension>,
    pub(crate) content_length: Option<u64>,
}

/// The resumable extension's headers, checked against each other.
#[derive(Debug)]
pub(crate) struct Extension {
    pub(crate) upload_id: String,
    pub(crate) offset: u64,
    pub(crate) chunk_sha256: Option<String>,
    pub(crate) chunk_crc32c: Option<u32>,
    pub(crate) file_size: u64,
    pub(crate) chunk_count: u64,
    pub(crate) file_sha256: String,
}

/// `X-Manifest-Length` of `POST /upload/batch`, as its handler reads it.
pub(crate) fn manifest_length(headers: &HeaderMap) -> Result<Option<u64>, String> {
    match headers::header_str(headers, protocol::MANIFEST_LENGTH).map_err(message)? {
        None => Ok(None),
        Some(v) => headers::number("X-Manifest-Length", v)
            .map(Some)
            .map_err(message),
    }
}

/// A batch manifest parsed and checked: each file's upload id, name, size
/// and SHA-256.
pub(crate) fn manifest(raw: &[u8], max_bytes: u64) -> Result<Vec<protocol::BatchEntry>, String> {
    batch::parse_manifest(raw, max_bytes)
        .map(|entries| entries.into_iter().map(|(entry, _)| entry).collect())
        .map_err(message)
}

/// Where a client's file name goes by `mode`: the components below the
/// output directory (directories, then the file name).
pub(crate) fn destination(
    mode: PathMode,
    client_name: &str,
    reserved: Option<&str>,
) -> Result<Vec<String>, String> {
    paths::destination_for(mode, client_name, reserved)
        .map(|dest| {
            let mut parts = dest.dirs;
            parts.push(dest.name);
            parts
        })
        .map_err(|e| e.0)
}

/// The ignore mode's flat name for fixed time and random parts.
pub(crate) fn ignore_mode_name(client_name: &str, millis: u128, random: &str) -> String {
    paths::ignore_mode_name(client_name, millis, random)
}

/// The `attempt`-th alternative to a taken name.
pub(crate) fn unique_candidate(name: &str, millis: u128, attempt: u32) -> String {
    paths::unique_candidate(name, millis, attempt)
}

/// The longest accepted component and allow-paths name, in bytes.
pub(crate) const LIMITS: (usize, usize) = (paths::MAX_COMPONENT_BYTES, paths::MAX_PATH_BYTES);
