//! The tus 1.0.0 requests of the `tus` kind (OPTIONS, POST, HEAD, PATCH,
//! DELETE),
//! what a server announces, the `Upload-Metadata` a file is created with,
//! and the translation of replies into [`UploadError`]s, whose `retry`
//! decides what happens next.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};

use crate::agent::store::FileRecord;
use crate::config::TargetConfig;

use super::super::error::UploadError;

/// The protocol version every request announces.
const TUS_VERSION: &str = "1.0.0";
const TUS_RESUMABLE: &str = "tus-resumable";
const TUS_EXTENSION: &str = "tus-extension";
const TUS_CHECKSUM_ALGORITHM: &str = "tus-checksum-algorithm";
const UPLOAD_OFFSET: &str = "upload-offset";
const UPLOAD_LENGTH: &str = "upload-length";
const UPLOAD_DEFER_LENGTH: &str = "upload-defer-length";
const UPLOAD_METADATA: &str = "upload-metadata";
const UPLOAD_CHECKSUM: &str = "upload-checksum";
/// The body type of every PATCH.
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";
/// The status a tus server answers a PATCH whose checksum did not match.
const CHECKSUM_MISMATCH: u16 = 460;

/// What a server's OPTIONS reply announced that the kind uses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Capabilities {
    /// The checksum extension with sha256: every PATCH carries its body's
    /// SHA-256, and the server refuses a body damaged on the way.
    pub(super) checksum_sha256: bool,
    /// The creation-defer-length extension: an upload can be created before
    /// its length is told.
    pub(super) defer_length: bool,
    /// The termination extension: an upload that will not be finished can
    /// be deleted, rather than left to the server's expiry.
    pub(super) termination: bool,
}

/// What a HEAD of an upload showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Progress {
    pub(super) offset: u64,
    /// `None` when the server did not say (a deferred length).
    pub(super) length: Option<u64>,
}

/// How a PATCH was answered.
#[derive(Debug, PartialEq)]
pub(super) enum Patched {
    /// Accepted: the upload's offset now.
    Offset(u64),
    /// 409: the offset sent is not the server's.
    Conflict,
    /// 404 or 410: the server no longer knows the upload.
    Gone,
}

/// An HTTP client for one tus server.
pub(super) struct Client {
    http: reqwest::Client,
    /// The creation URL (the target's `url`).
    pub(super) url: String,
}

impl Client {
    /// The client sends the target's `headers`, and its `api_key` as
    /// `Authorization: Bearer`, with every request. No `INDEXEDCP_API_KEY`
    /// fallback: a third-party server never gets this agent's key unasked.
    pub(super) fn new(target: &TargetConfig) -> Result<Client, UploadError> {
        let mut headers = target.headers.clone();
        if let Some(key) = &target.api_key {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                UploadError::Request {
                    what: format!("to target {:?}", target.name),
                    message: "the api_key holds characters a header cannot carry".into(),
                }
            })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        headers.insert(TUS_RESUMABLE, HeaderValue::from_static(TUS_VERSION));
        let http = reqwest::Client::builder()
            .timeout(target.timeout)
            .connect_timeout(target.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("indexedcp/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .build()
            .map_err(|e| UploadError::Request {
                what: "an HTTP client".into(),
                message: e.to_string(),
            })?;
        Ok(Client {
            http,
            url: target.url.clone(),
        })
    }

    /// OPTIONS on the creation URL: which extensions the server has. A
    /// server that does not answer OPTIONS announces none.
    pub(super) async fn options(&self) -> Result<Capabilities, UploadError> {
        let response = self
            .http
            .request(reqwest::Method::OPTIONS, &self.url)
            .send()
            .await
            .map_err(|e| transport(&self.url, &e))?;
        match response.status() {
            s if s.is_success() => Ok(capabilities(response.headers())),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(refusal(&self.url, response).await)
            }
            s if s.is_server_error() => Err(refusal(&self.url, response).await),
            _ => Ok(Capabilities::default()),
        }
    }

    /// POST: creates the upload of `file`, with its length deferred when
    /// `defer` is set; returns its absolute URL.
    pub(super) async fn create(
        &self,
        file: &FileRecord,
        defer: bool,
    ) -> Result<String, UploadError> {
        let request = self.http.post(&self.url);
        let request = if defer {
            request.header(UPLOAD_DEFER_LENGTH, 1)
        } else {
            request.header(UPLOAD_LENGTH, file.size)
        };
        let response = request
            .header(UPLOAD_METADATA, metadata(file))
            .header(reqwest::header::CONTENT_LENGTH, 0)
            .send()
            .await
            .map_err(|e| transport(&self.url, &e))?;
        match response.status() {
            StatusCode::CREATED => {}
            StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(too_large(
                    &self.url,
                    format!(
                        "the server takes no upload of {} bytes (its Tus-Max-Size); raise its \
                         limit, then run `indexedcp retry`",
                        file.size
                    ),
                ));
            }
            _ => return Err(refusal(&self.url, response).await),
        }
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| UploadError::Protocol {
                url: self.url.clone(),
                message: "201 Created without a Location header".into(),
            })?;
        // A relative Location is resolved against the creation URL, so that
        // the recorded URL works on its own after a restart.
        reqwest::Url::parse(&self.url)
            .and_then(|base| base.join(location))
            .map(String::from)
            .map_err(|e| UploadError::Protocol {
                url: self.url.clone(),
                message: format!("unusable Location {location:?}: {e}"),
            })
    }

    /// HEAD: how far an upload got; `None` when the server no longer knows
    /// it (404, 410).
    pub(super) async fn head(&self, url: &str) -> Result<Option<Progress>, UploadError> {
        let response = self
            .http
            .head(url)
            .send()
            .await
            .map_err(|e| transport(url, &e))?;
        match response.status() {
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(None),
            s if s.is_success() => {
                let offset = number(url, response.headers(), UPLOAD_OFFSET)?.ok_or_else(|| {
                    UploadError::Protocol {
                        url: url.to_owned(),
                        message: "HEAD answered without Upload-Offset".into(),
                    }
                })?;
                let length = number(url, response.headers(), UPLOAD_LENGTH)?;
                Ok(Some(Progress { offset, length }))
            }
            _ => Err(refusal(url, response).await),
        }
    }

    /// PATCH: `body` at `offset`, with its SHA-256 (base64) when given, and
    /// the upload's length when it was deferred.
    pub(super) async fn patch(
        &self,
        url: &str,
        offset: u64,
        body: bytes::Bytes,
        sha256: Option<String>,
        upload_length: Option<u64>,
    ) -> Result<Patched, UploadError> {
        let length = body.len();
        let mut request = self
            .http
            .patch(url)
            .header(UPLOAD_OFFSET, offset)
            .header(reqwest::header::CONTENT_TYPE, OFFSET_OCTET_STREAM)
            .body(body);
        if let Some(upload_length) = upload_length {
            request = request.header(UPLOAD_LENGTH, upload_length);
        }
        if let Some(sha256) = sha256 {
            request = request.header(UPLOAD_CHECKSUM, format!("sha256 {sha256}"));
        }
        let response = request.send().await.map_err(|e| transport(url, &e))?;
        match response.status() {
            StatusCode::CONFLICT => Ok(Patched::Conflict),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(Patched::Gone),
            StatusCode::PAYLOAD_TOO_LARGE => Err(too_large(
                url,
                format!(
                    "the server takes less than {length} bytes in one request; lower the \
                     target's chunk_size (files buffered from then on are cut to it), then run \
                     `indexedcp retry`"
                ),
            )),
            s if s.as_u16() == CHECKSUM_MISMATCH => Err(UploadError::Protocol {
                url: url.to_owned(),
                message: "the server found the bytes damaged on the way (checksum mismatch); \
                          sending them again"
                    .into(),
            }),
            s if s.is_success() => {
                let offset = number(url, response.headers(), UPLOAD_OFFSET)?.ok_or_else(|| {
                    UploadError::Protocol {
                        url: url.to_owned(),
                        message: "PATCH answered without Upload-Offset".into(),
                    }
                })?;
                Ok(Patched::Offset(offset))
            }
            _ => Err(refusal(url, response).await),
        }
    }
}

impl Client {
    /// DELETE (termination): the server forgets the upload and its bytes.
    /// An upload it no longer knows (404, 410) is as good as deleted.
    pub(super) async fn delete(&self, url: &str) -> Result<(), UploadError> {
        let response = self
            .http
            .delete(url)
            .send()
            .await
            .map_err(|e| transport(url, &e))?;
        match response.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(()),
            _ => Err(refusal(url, response).await),
        }
    }
}

/// What the headers of an OPTIONS reply announce.
fn capabilities(headers: &HeaderMap) -> Capabilities {
    let list = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|item| item.trim().to_ascii_lowercase())
            .collect()
    };
    let extensions = list(TUS_EXTENSION);
    Capabilities {
        checksum_sha256: extensions.iter().any(|e| e == "checksum")
            && list(TUS_CHECKSUM_ALGORITHM).iter().any(|a| a == "sha256"),
        defer_length: extensions.iter().any(|e| e == "creation-defer-length"),
        termination: extensions.iter().any(|e| e == "termination"),
    }
}

/// `Upload-Metadata`: the remote name as `filename`, the whole file's
/// SHA-256 (hex) as `sha256`, and `filetype` when the name's extension
/// tells it; every value base64, as the protocol wants.
pub(super) fn metadata(file: &FileRecord) -> String {
    let mut pairs = vec![
        format!("filename {}", BASE64.encode(&file.remote_name)),
        format!("sha256 {}", BASE64.encode(&file.sha256)),
    ];
    if let Some(filetype) = filetype(&file.remote_name) {
        pairs.push(format!("filetype {}", BASE64.encode(filetype)));
    }
    pairs.join(",")
}

/// The media type of a name's extension, for the common ones; the buffer
/// records none, and tus clients in browsers send theirs, which servers use
/// to serve the file back.
fn filetype(name: &str) -> Option<&'static str> {
    let base = name.rsplit('/').next().unwrap_or(name);
    let (stem, ext) = base.rsplit_once('.')?;
    if stem.is_empty() {
        return None;
    }
    Some(match ext.to_ascii_lowercase().as_str() {
        "txt" | "log" => "text/plain",
        "csv" => "text/csv",
        "json" => "application/json",
        "xml" => "application/xml",
        "html" | "htm" => "text/html",
        "pdf" => "application/pdf",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "mp4" => "video/mp4",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        _ => return None,
    })
}

/// A decimal header, `None` when absent.
fn number(url: &str, headers: &HeaderMap, name: &str) -> Result<Option<u64>, UploadError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| UploadError::Protocol {
            url: url.to_owned(),
            message: format!("{name} is not a number: {value:?}"),
        })
}

fn transport(url: &str, e: &reqwest::Error) -> UploadError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        source = inner.source();
    }
    UploadError::Transport {
        url: url.to_owned(),
        message,
    }
}

/// 413: parks the file (a retry cannot succeed) with what to change.
fn too_large(url: &str, message: String) -> UploadError {
    UploadError::Status {
        url: url.to_owned(),
        status: StatusCode::PAYLOAD_TOO_LARGE.as_u16(),
        error: String::new(),
        message,
        retry_after: None,
    }
}

/// Any other refusal, with the start of its body: 401 and 403 are a
/// configuration problem (retried at the longest delay), 5xx and 429 are
/// retried on the schedule, the rest park the file.
async fn refusal(url: &str, response: reqwest::Response) -> UploadError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let text: String = response
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    let mut message = status.canonical_reason().unwrap_or("").to_owned();
    if !text.trim().is_empty() {
        message = format!("{message} ({})", text.trim());
    }
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        message.push_str("; check the target's headers or api_key");
    }
    UploadError::Status {
        url: url.to_owned(),
        status: status.as_u16(),
        error: String::new(),
        message,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_announce_sha256_checksums_only_with_the_extension_and_the_algorithm() {
        let announce = |extensions: &str, algorithms: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(TUS_EXTENSION, extensions.parse().unwrap());
            headers.insert(TUS_CHECKSUM_ALGORITHM, algorithms.parse().unwrap());
            capabilities(&headers).checksum_sha256
        };
        assert!(announce("creation, checksum,termination", "sha1,sha256"));
        assert!(!announce("creation,termination", "sha256"));
        assert!(!announce("creation,checksum", "sha1,md5"));
        assert!(!capabilities(&HeaderMap::new()).checksum_sha256);
        let mut headers = HeaderMap::new();
        headers.insert(
            TUS_EXTENSION,
            "creation,creation-defer-length".parse().unwrap(),
        );
        assert!(capabilities(&headers).defer_length);
        assert!(!capabilities(&HeaderMap::new()).defer_length);
    }

    #[test]
    fn filetypes_come_from_known_extensions_only() {
        assert_eq!(filetype("in/report.PDF"), Some("application/pdf"));
        assert_eq!(filetype("a.tar.gz"), Some("application/gzip"));
        assert_eq!(filetype("dir.d/noext"), None);
        assert_eq!(filetype(".csv"), None);
        assert_eq!(filetype("data.bin"), None);
    }
}
