//! The tus header parsers as plain functions for [`crate::fuzzing`], which
//! exists only for the fuzz targets under tests/fuzz and the property tests.
//! Errors come back as their message text, so no receiver type leaks out.

use axum::http::HeaderMap;

use super::TusError;
use super::headers;

fn message(error: TusError) -> String {
    format!("{} {}", error.status.as_u16(), error.message)
}

/// `Upload-Metadata` parsed: the `filename` and the `sha256` (64 lowercase
/// hex digits), or the 400 message.
pub(crate) fn metadata(raw: &str) -> Result<(Option<String>, Option<String>), String> {
    headers::metadata(raw)
        .map(|m| (m.filename, m.sha256))
        .map_err(message)
}

/// What the tus routes read from a request's headers, in the order they read
/// them: the version, a new upload's length, `Upload-Offset` and
/// `Upload-Checksum` (its algorithm and digest length).
pub(crate) fn request(headers: &HeaderMap) -> Result<TusRequest, String> {
    headers::check_version(headers).map_err(message)?;
    let length = headers::new_upload_length(headers).map_err(message);
    let offset = headers::number(headers, headers::UPLOAD_OFFSET).map_err(message)?;
    let checksum = headers::checksum(headers)
        .map_err(message)?
        .map(|c| match c {
            headers::Checksum::Sha1(d) => ("sha1", d.len()),
            headers::Checksum::Sha256(d) => ("sha256", d.len()),
        });
    if let Some(raw) = headers.get(headers::UPLOAD_METADATA)
        && let Ok(raw) = raw.to_str()
    {
        metadata(raw)?;
    }
    Ok(TusRequest {
        length,
        offset,
        checksum,
        carries_bytes: headers::carries_bytes(headers),
    })
}

/// The parsed tus headers of one request.
#[derive(Debug)]
pub(crate) struct TusRequest {
    /// A new upload's length (`None` when deferred), or why it is refused.
    pub(crate) length: Result<Option<u64>, String>,
    pub(crate) offset: Option<u64>,
    /// The checksum's algorithm and digest length in bytes.
    pub(crate) checksum: Option<(&'static str, usize)>,
    pub(crate) carries_bytes: bool,
}
