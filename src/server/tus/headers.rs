//! The tus request headers, parsed with the status each mistake earns:
//! `Tus-Resumable` (412 unless 1.0.0), the lengths and offsets (400 unless a
//! non-negative integer), `Upload-Metadata` (its `filename` and `sha256`) and
//! `Upload-Checksum` (sha1 or sha256, 400 for another algorithm).

use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use super::TusError;

/// The only protocol version spoken.
pub(super) const VERSION: &str = "1.0.0";
pub(super) const TUS_RESUMABLE: &str = "tus-resumable";
pub(super) const TUS_VERSION: &str = "tus-version";
pub(super) const TUS_EXTENSION: &str = "tus-extension";
pub(super) const TUS_MAX_SIZE: &str = "tus-max-size";
pub(super) const TUS_CHECKSUM_ALGORITHM: &str = "tus-checksum-algorithm";
pub(super) const UPLOAD_OFFSET: &str = "upload-offset";
pub(super) const UPLOAD_LENGTH: &str = "upload-length";
pub(super) const UPLOAD_DEFER_LENGTH: &str = "upload-defer-length";
pub(super) const UPLOAD_METADATA: &str = "upload-metadata";
pub(super) const UPLOAD_EXPIRES: &str = "upload-expires";
pub(super) const UPLOAD_CHECKSUM: &str = "upload-checksum";
pub(super) const UPLOAD_CONCAT: &str = "upload-concat";
pub(super) const METHOD_OVERRIDE: &str = "x-http-method-override";
/// The body type of PATCH requests (and of a POST that carries bytes).
pub(super) const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";

/// Base64 as tus clients write it: the standard alphabet, padded or not.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, TusError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| TusError::bad_request(format!("header {name} is not ASCII text"))),
    }
}

/// Refuses (412) a request without `Tus-Resumable: 1.0.0`.
pub(super) fn check_version(headers: &HeaderMap) -> Result<(), TusError> {
    match text(headers, TUS_RESUMABLE).ok().flatten() {
        Some(VERSION) => Ok(()),
        Some(other) => Err(TusError::new(
            StatusCode::PRECONDITION_FAILED,
            format!("Tus-Resumable {other:?} is not supported; this server speaks tus {VERSION}"),
        )),
        None => Err(TusError::new(
            StatusCode::PRECONDITION_FAILED,
            format!("header Tus-Resumable is required (this server speaks tus {VERSION})"),
        )),
    }
}

/// A header that must be a non-negative integer, if present. Digits beyond
/// what 64 bits hold read as `u64::MAX`, which every limit refuses.
pub(super) fn number(headers: &HeaderMap, name: &str) -> Result<Option<u64>, TusError> {
    let Some(value) = text(headers, name)? else {
        return Ok(None);
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TusError::bad_request(format!(
            "header {name} must be a non-negative integer, got {value:?}"
        )));
    }
    Ok(Some(value.parse().unwrap_or(u64::MAX)))
}

/// The declared length of a new upload: `Some` from `Upload-Length`, `None`
/// for `Upload-Defer-Length: 1`.
pub(super) fn new_upload_length(headers: &HeaderMap) -> Result<Option<u64>, TusError> {
    let length = number(headers, UPLOAD_LENGTH)?;
    let deferred = text(headers, UPLOAD_DEFER_LENGTH)?;
    match (length, deferred) {
        (Some(length), None) => Ok(Some(length)),
        (None, Some("1")) => Ok(None),
        (None, Some(other)) => Err(TusError::bad_request(format!(
            "header Upload-Defer-Length must be 1, got {other:?}"
        ))),
        (Some(_), Some(_)) => Err(TusError::bad_request(
            "send either Upload-Length or Upload-Defer-Length, not both".to_owned(),
        )),
        (None, None) => Err(TusError::bad_request(
            "header Upload-Length is required (or Upload-Defer-Length: 1 when the length is not known yet)"
                .to_owned(),
        )),
    }
}

/// What `Upload-Metadata` tells the receiver; other keys are kept as sent.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Metadata {
    /// The client's file name, which the path mode turns into a destination.
    pub(super) filename: Option<String>,
    /// The file's SHA-256 as 64 lowercase hex digits.
    pub(super) sha256: Option<String>,
}

/// Parses `Upload-Metadata`: comma-separated pairs of a key and a base64
/// value (or a key alone), each key once.
pub(super) fn metadata(raw: &str) -> Result<Metadata, TusError> {
    let mut out = Metadata::default();
    let mut seen: Vec<&str> = Vec::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = match pair.split_once(' ') {
            Some((key, value)) => (key, Some(value.trim())),
            None => (pair, None),
        };
        if seen.contains(&key) {
            return Err(TusError::bad_request(format!(
                "Upload-Metadata has the key {key:?} twice"
            )));
        }
        seen.push(key);
        let decoded = match value {
            None => Vec::new(),
            Some(v) => BASE64.decode(v).map_err(|_| {
                TusError::bad_request(format!(
                    "Upload-Metadata: the value of {key:?} is not base64 ({v:?})"
                ))
            })?,
        };
        match key {
            "filename" => {
                let name = String::from_utf8(decoded).map_err(|_| {
                    TusError::bad_request(
                        "Upload-Metadata: filename is not UTF-8 text once decoded".to_owned(),
                    )
                })?;
                out.filename = Some(name);
            }
            "sha256" => out.sha256 = Some(sha256_value(&decoded)?),
            _ => {}
        }
    }
    Ok(out)
}

/// The `sha256` of the metadata, written as 64 hex digits or as the base64
/// of the 32 bytes.
fn sha256_value(decoded: &[u8]) -> Result<String, TusError> {
    let text = std::str::from_utf8(decoded).unwrap_or_default();
    if let Some(hex) = crate::protocol::parse_sha256_hex(text) {
        return Ok(hex);
    }
    match BASE64.decode(text) {
        Ok(bytes) if bytes.len() == 32 => Ok(hex::encode(bytes)),
        _ => Err(TusError::bad_request(format!(
            "Upload-Metadata: sha256 must be 64 hex digits or the base64 of 32 bytes, got {text:?}"
        ))),
    }
}

/// A checksum the client sent for a request body (`Upload-Checksum`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Checksum {
    Sha1([u8; 20]),
    Sha256([u8; 32]),
}

/// Parses `Upload-Checksum: <algorithm> <base64 digest>`, if present.
pub(super) fn checksum(headers: &HeaderMap) -> Result<Option<Checksum>, TusError> {
    let Some(value) = text(headers, UPLOAD_CHECKSUM)? else {
        return Ok(None);
    };
    let (algorithm, digest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let digest = BASE64.decode(digest.trim()).ok();
    let bad_digest = |n: usize| {
        TusError::bad_request(format!(
            "Upload-Checksum: the {algorithm} digest must be the base64 of {n} bytes"
        ))
    };
    match algorithm {
        "sha1" => digest
            .and_then(|d| <[u8; 20]>::try_from(d).ok())
            .map(|d| Some(Checksum::Sha1(d)))
            .ok_or_else(|| bad_digest(20)),
        "sha256" => digest
            .and_then(|d| <[u8; 32]>::try_from(d).ok())
            .map(|d| Some(Checksum::Sha256(d)))
            .ok_or_else(|| bad_digest(32)),
        other => Err(TusError::bad_request(format!(
            "Upload-Checksum: algorithm {other:?} is not supported; use sha1 or sha256"
        ))),
    }
}

/// Whether the request carries bytes for the upload (`Content-Type:
/// application/offset+octet-stream`).
pub(super) fn carries_bytes(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(OFFSET_OCTET_STREAM))
        })
}

/// An HTTP date (`Upload-Expires`) for a time in unix seconds.
pub(super) fn http_date(unix_secs: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_secs.max(0) as u64);
    httpdate::fmt_http_date(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn metadata_gives_the_filename_and_the_sha256_in_hex_or_base64() {
        let hex = "ab".repeat(32);
        let raw = format!(
            "filename {},filetype dGV4dC9wbGFpbg==, is_confidential ,sha256 {}",
            BASE64.encode("ré sumé.txt"),
            BASE64.encode(&hex)
        );
        let m = metadata(&raw).unwrap();
        assert_eq!(m.filename.as_deref(), Some("ré sumé.txt"));
        assert_eq!(m.sha256.as_deref(), Some(hex.as_str()));
        let b64 = BASE64.encode([0xabu8; 32]);
        let m = metadata(&format!("sha256 {}", BASE64.encode(b64))).unwrap();
        assert_eq!(m.sha256.as_deref(), Some(hex.as_str()));
        assert_eq!(metadata("").unwrap(), Metadata::default());
        // Unpadded base64, as some clients write it.
        assert_eq!(
            metadata("filename YQ").unwrap().filename.as_deref(),
            Some("a")
        );
    }

    #[test]
    fn bad_metadata_is_refused_with_the_key_named() {
        for (raw, needle) in [
            ("filename !!!", "filename"),
            ("filename YQ==,filename Yg==", "twice"),
            ("sha256 YWJj", "sha256"),
            ("filename /w==", "UTF-8"),
        ] {
            let e = metadata(raw).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains(needle), "{raw}: {}", e.message);
        }
    }

    #[test]
    fn numbers_versions_lengths_and_checksums() {
        assert_eq!(
            number(&headers(&[("upload-offset", "42")]), UPLOAD_OFFSET).unwrap(),
            Some(42)
        );
        for bad in ["-1", "", "+3", " 1", "1.0", "0x10"] {
            assert!(
                number(&headers(&[("upload-offset", bad)]), UPLOAD_OFFSET).is_err(),
                "{bad:?}"
            );
        }
        let huge = headers(&[("upload-length", "99999999999999999999999")]);
        assert_eq!(new_upload_length(&huge).unwrap(), Some(u64::MAX));
        assert_eq!(
            new_upload_length(&headers(&[("upload-defer-length", "1")])).unwrap(),
            None
        );
        assert!(new_upload_length(&headers(&[])).is_err());
        assert!(new_upload_length(&headers(&[("upload-defer-length", "0")])).is_err());

        assert!(check_version(&headers(&[("tus-resumable", "1.0.0")])).is_ok());
        for h in [headers(&[]), headers(&[("tus-resumable", "0.2.2")])] {
            assert_eq!(
                check_version(&h).unwrap_err().status,
                StatusCode::PRECONDITION_FAILED
            );
        }

        let sha1 = format!("sha1 {}", BASE64.encode([7u8; 20]));
        assert_eq!(
            checksum(&headers(&[("upload-checksum", &sha1)])).unwrap(),
            Some(Checksum::Sha1([7; 20]))
        );
        for bad in ["md5 AAAA", "sha256 AAAA", "sha1", "crc32 AAAAAA=="] {
            let e = checksum(&headers(&[("upload-checksum", bad)])).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    }
}
