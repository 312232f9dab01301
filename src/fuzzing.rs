//! Entry points for the fuzz targets under tests/fuzz and for the property
//! tests; this module exists only for them and is not part of the library's
//! API (it is hidden from the docs and may change at any time).
//!
//! The parsers a client or an operator can feed arbitrary input reach them
//! here as thin wrappers: the headers of `POST /upload` (v1 and resumable) and
//! of `POST /upload/batch`, the batch manifest, the path modes, the
//! configuration file and the tus headers with `Upload-Metadata`. Each
//! `check_*` function runs one parser on its input and panics when the result
//! breaks that parser's invariant, so the fuzz targets and the property tests
//! assert the same thing. A refused input is never a failure; a panic inside
//! a parser, or an accepted result that breaks the invariant, is.

use std::path::{Component, Path};

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Config, ConfigError, PathMode};
use crate::protocol;
use crate::server::fuzzing as server;

/// The request headers the receiver's parsers read, for building inputs.
pub const UPLOAD_HEADERS: &[&str] = &[
    protocol::FILE_NAME,
    protocol::CHUNK_INDEX,
    protocol::UPLOAD_ID,
    protocol::CHUNK_OFFSET,
    protocol::FILE_SIZE,
    protocol::CHUNK_COUNT,
    protocol::CHUNK_SHA256,
    protocol::CHUNK_CRC32C,
    protocol::FILE_SHA256,
    protocol::MANIFEST_LENGTH,
    "content-length",
];

/// The tus request headers the receiver reads, for building inputs.
pub const TUS_HEADERS: &[&str] = &[
    "tus-resumable",
    "upload-length",
    "upload-defer-length",
    "upload-offset",
    "upload-checksum",
    "upload-metadata",
    "content-type",
];

/// A header map of the pairs whose value HTTP allows (the others never reach
/// a handler: the HTTP parser refuses them first). Repeated names are kept
/// as repeated values, in order.
pub fn header_map(pairs: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

/// Header pairs from text as a request writes them: one `name: value` per
/// line, the name folded to lowercase; a line without a colon is skipped.
/// The fuzz targets read their inputs this way so that the corpus stays
/// readable.
pub fn header_lines(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    data.split(|&b| b == b'\n')
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
            let value = line[colon + 1..]
                .strip_prefix(b" ")
                .unwrap_or(&line[colon + 1..]);
            Some((name, value.to_vec()))
        })
        .collect()
}

/// The reply status a refused request gets, from a wrapper's message.
fn status_of(message: &str) -> &str {
    message.split(' ').next().unwrap_or_default()
}

fn is_lower_sha256(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The headers of `POST /upload` (v1 and resumable) and `POST /upload/batch`.
/// Invariants: a refusal is a 400 with a message; an accepted resumable
/// chunk has a valid upload id, at least one chunk, its index below the
/// count, its offset within the file and both hashes as 64 lowercase hex
/// digits; a present chunk index is what its header says. Returns the
/// resumable chunk, if the headers declared one.
pub fn check_upload_headers(pairs: &[(String, Vec<u8>)]) -> Result<Option<Chunk>, String> {
    let headers = header_map(pairs);
    let result = server::upload(&headers);
    match &result {
        Ok(upload) => {
            let name = headers.get(protocol::FILE_NAME).map(|v| v.as_bytes());
            let name = name.unwrap_or(protocol::DEFAULT_FILE_NAME.as_bytes());
            assert_eq!(upload.file_name.as_bytes(), name);
            if let Some(ext) = &upload.extension {
                assert!(protocol::is_valid_upload_id(&ext.upload_id), "{upload:?}");
                assert!(ext.chunk_count >= 1, "{upload:?}");
                assert!(upload.chunk_index < ext.chunk_count, "{upload:?}");
                assert!(ext.offset <= ext.file_size, "{upload:?}");
                // At least one check of the chunk's bytes, each as its header gave it.
                assert!(
                    ext.chunk_sha256.is_some() || ext.chunk_crc32c.is_some(),
                    "{upload:?}"
                );
                let chunk_sha = headers.get(protocol::CHUNK_SHA256);
                assert_eq!(
                    chunk_sha.is_some(),
                    ext.chunk_sha256.is_some(),
                    "{upload:?}"
                );
                if let Some(sha) = &ext.chunk_sha256 {
                    assert!(is_lower_sha256(sha), "{upload:?}");
                }
                let chunk_crc = headers.get(protocol::CHUNK_CRC32C);
                assert_eq!(
                    chunk_crc.is_some(),
                    ext.chunk_crc32c.is_some(),
                    "{upload:?}"
                );
                // Left out by a client still reading the file: empty.
                let file_sha = headers.get(protocol::FILE_SHA256);
                assert_eq!(file_sha.is_none(), ext.file_sha256.is_empty(), "{upload:?}");
                if file_sha.is_some() {
                    assert!(is_lower_sha256(&ext.file_sha256), "{upload:?}");
                }
            }
            if let Some(raw) = headers.get(protocol::CHUNK_INDEX) {
                let text = std::str::from_utf8(raw.as_bytes()).expect("accepted as UTF-8");
                assert_eq!(text.trim().parse::<u64>(), Ok(upload.chunk_index));
            }
            if let Some(len) = upload.content_length {
                let raw = headers
                    .get("content-length")
                    .expect("parsed from the header");
                assert_eq!(raw.to_str().ok().and_then(|v| v.parse().ok()), Some(len));
            }
        }
        Err(message) => assert_eq!(status_of(message), "400", "{message}"),
    }
    match server::manifest_length(&headers) {
        Ok(_) => {}
        Err(message) => assert_eq!(status_of(&message), "400", "{message}"),
    }
    result.map(|upload| {
        upload.extension.map(|ext| Chunk {
            upload_id: ext.upload_id,
            index: upload.chunk_index,
            offset: ext.offset,
            file_size: ext.file_size,
            count: ext.chunk_count,
            sha256: ext.chunk_sha256.unwrap_or_default(),
            crc32c: ext.chunk_crc32c,
            file_sha256: ext.file_sha256,
        })
    })
}

/// An accepted chunk of the resumable extension, as its headers declared it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// `X-Upload-Id`.
    pub upload_id: String,
    /// `X-Chunk-Index`.
    pub index: u64,
    /// `X-Chunk-Offset`.
    pub offset: u64,
    /// `X-File-Size`.
    pub file_size: u64,
    /// `X-Chunk-Count`.
    pub count: u64,
    /// `X-Chunk-Sha256`, lowercase; empty when the header was left out.
    pub sha256: String,
    /// `X-Chunk-Crc32c`, when given.
    pub crc32c: Option<u32>,
    /// `X-File-Sha256`, lowercase; empty when the header was left out.
    pub file_sha256: String,
}

/// One file of an accepted batch manifest.
pub use protocol::BatchEntry;

/// A batch manifest, parsed and checked against `max_bytes`. Invariants: an
/// accepted manifest lists 1 to [`protocol::MAX_BATCH_FILES`] files with
/// valid, distinct upload ids, hashes as 64 lowercase hex digits and sizes
/// adding up to at most `max_bytes`; a refused one is a 400, or a 413 only
/// when the sizes add up to more than `max_bytes` (or more than 64 bits hold).
pub fn check_manifest(raw: &[u8], max_bytes: u64) -> Result<Vec<BatchEntry>, String> {
    let result = server::manifest(raw, max_bytes);
    match &result {
        Ok(entries) => {
            assert!((1..=protocol::MAX_BATCH_FILES).contains(&entries.len()));
            let mut ids = std::collections::HashSet::new();
            let mut total: u64 = 0;
            for entry in entries {
                assert!(protocol::is_valid_upload_id(&entry.upload_id), "{entry:?}");
                assert!(ids.insert(entry.upload_id.as_str()), "{entry:?} twice");
                assert!(is_lower_sha256(&entry.sha256), "{entry:?}");
                total = total.checked_add(entry.size).expect("sizes overflow");
            }
            assert!(total <= max_bytes, "{total} > {max_bytes}");
        }
        Err(message) => {
            let status = status_of(message);
            assert!(status == "400" || status == "413", "{message}");
            if status == "413" {
                let manifest: protocol::BatchManifest =
                    serde_json::from_slice(raw).expect("a 413 manifest parsed");
                let total = manifest
                    .files
                    .iter()
                    .try_fold(0u64, |sum, f| sum.checked_add(f.size));
                assert!(
                    total.is_none_or(|total| total > max_bytes),
                    "413 for {total:?} <= {max_bytes}"
                );
            }
        }
    }
    result
}

/// The path modes, for building inputs.
pub const PATH_MODES: [PathMode; 3] = [PathMode::Sanitize, PathMode::Ignore, PathMode::AllowPaths];

/// Where `client_name` goes by `mode`, as a path relative to the output
/// directory. Invariant: either an error, or a relative path of plain
/// components (no `..`, `.`, root, drive or empty part, no separator, NUL or
/// control character inside one, none over 255 bytes) that stays inside the
/// output directory, whose first component is never `reserved` (the state
/// directory); sanitize and ignore give a single component, and ignore never
/// refuses.
pub fn check_destination(
    mode: PathMode,
    client_name: &str,
    reserved: Option<&str>,
) -> Result<String, String> {
    let (max_component, _) = server::LIMITS;
    let parts = match server::destination(mode, client_name, reserved) {
        Ok(parts) => parts,
        Err(message) => {
            assert!(
                mode != PathMode::Ignore,
                "ignore mode refused {client_name:?}"
            );
            assert!(!message.is_empty());
            return Err(message);
        }
    };
    assert!(!parts.is_empty());
    if mode != PathMode::AllowPaths {
        assert_eq!(parts.len(), 1, "{mode:?} gave directories: {parts:?}");
    }
    for part in &parts {
        assert!(!part.is_empty() && part != "." && part != "..", "{parts:?}");
        assert!(part.len() <= max_component, "{parts:?}");
        assert!(!part.contains(['/', '\\']), "{parts:?}");
        assert!(!part.chars().any(char::is_control), "{parts:?}");
    }
    let first = parts[0].as_bytes();
    assert!(
        !(first.len() >= 2 && first[0].is_ascii_alphabetic() && first[1] == b':'),
        "a drive letter: {parts:?}"
    );
    if mode == PathMode::AllowPaths {
        assert!(
            reserved != Some(parts[0].as_str()),
            "{parts:?} enters {reserved:?}"
        );
    }
    let relative = parts.join("/");
    let path = Path::new(&relative);
    assert!(path.is_relative(), "{relative:?}");
    assert!(
        path.components().all(|c| matches!(c, Component::Normal(_))),
        "{relative:?}"
    );
    assert_eq!(path.components().count(), parts.len(), "{relative:?}");
    let output = Path::new("/srv/output");
    assert!(output.join(path).starts_with(output), "{relative:?}");
    Ok(relative)
}

/// The ignore mode's name and the unique alternatives to a taken name.
/// Invariant: every name is one component of at most 255 bytes that keeps
/// the original's extension, and the ignore-mode name uses only
/// `[A-Za-z0-9._-]`.
pub fn check_generated_names(client_name: &str, millis: u64, attempt: u32) {
    let (max_component, _) = server::LIMITS;
    let random = format!("{:08x}", millis as u32);
    let flat = server::ignore_mode_name(client_name, u128::from(millis), &random);
    assert!(flat.len() <= max_component, "{flat:?}");
    assert!(
        flat.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')),
        "{flat:?}"
    );
    assert!(flat.starts_with(&format!("{millis}_{random}_")), "{flat:?}");
    let candidate = server::unique_candidate(client_name, u128::from(millis), attempt);
    if attempt == 0 {
        assert_eq!(candidate, client_name);
    } else {
        if client_name.len() <= max_component {
            assert!(candidate.len() <= max_component, "{candidate:?}");
        }
        assert_ne!(candidate, client_name);
    }
}

/// The configuration file `text`, named `source` in messages. Invariant: it
/// is accepted (and then prints back as effective TOML), or refused with at
/// least one problem, each naming `source` and, unless it is about the file
/// as a whole, the line and column inside `text` where it is.
pub fn check_config(text: &str, source: &Path) {
    match Config::parse(text, source) {
        Ok(config) => {
            let _ = config.to_effective_toml();
        }
        Err(ConfigError::Read { .. }) => panic!("parse does not read the file"),
        Err(ConfigError::Invalid(problems)) => {
            assert!(!problems.is_empty(), "refused without a problem");
            let lines = text.split('\n').count();
            for problem in &problems {
                assert_eq!(problem.file, source, "{problem}");
                assert!(!problem.message.trim().is_empty(), "{problem:?}");
                match problem.position {
                    Some((line, column)) => {
                        assert!((1..=lines).contains(&line), "{problem} of {lines} lines");
                        let this = text.split('\n').nth(line - 1).unwrap_or_default();
                        assert!(
                            (1..=this.chars().count() + 1).contains(&column),
                            "{problem}: column past {this:?}"
                        );
                    }
                    None => assert!(problem.key.is_none(), "{problem} has a key but no line"),
                }
                let shown = problem.to_string();
                assert!(
                    shown.starts_with(&format!("{}:", source.display())),
                    "{shown}"
                );
            }
        }
    }
}

/// `Upload-Metadata` parsed: its `filename` and `sha256`. Invariants: the
/// sha256 is 64 lowercase hex digits; a refusal is a 400; an accepted
/// filename, written back as tus clients write it, parses to itself.
pub fn check_tus_metadata(raw: &str) -> Result<(Option<String>, Option<String>), String> {
    let result = server::tus_metadata(raw);
    match &result {
        Ok((filename, sha256)) => {
            if let Some(sha256) = sha256 {
                assert!(is_lower_sha256(sha256), "{sha256:?}");
            }
            if let Some(name) = filename {
                let again = server::tus_metadata(&tus_metadata_pair("filename", name.as_bytes()));
                assert_eq!(again, Ok((Some(name.clone()), None)));
            }
        }
        Err(message) => assert_eq!(status_of(message), "400", "{message}"),
    }
    result
}

/// One `Upload-Metadata` pair as tus clients write it: the key, a space and
/// the padded standard base64 of the value.
pub fn tus_metadata_pair(key: &str, value: &[u8]) -> String {
    use base64::Engine;
    format!(
        "{key} {}",
        base64::engine::general_purpose::STANDARD.encode(value)
    )
}

/// The headers of a tus request. Invariants: a refusal is a 400 or, for the
/// version, a 412; an accepted checksum has a digest of its algorithm's
/// length; an accepted offset is the header's digits.
pub fn check_tus_headers(pairs: &[(String, Vec<u8>)]) {
    let headers = header_map(pairs);
    match server::tus_request(&headers) {
        Ok(request) => {
            match request.checksum {
                None | Some(("sha1", 20)) | Some(("sha256", 32)) => {}
                Some(other) => panic!("checksum {other:?}"),
            }
            if let Err(message) = &request.length {
                assert_eq!(status_of(message), "400", "{message}");
            }
            if let Some(offset) = request.offset {
                let raw = headers
                    .get("upload-offset")
                    .expect("parsed from the header");
                let digits = raw.to_str().expect("digits");
                assert_eq!(digits.parse::<u64>().unwrap_or(u64::MAX), offset);
            }
            let _ = request.carries_bytes;
        }
        Err(message) => {
            let status = status_of(&message);
            assert!(status == "400" || status == "412", "{message}");
        }
    }
}
