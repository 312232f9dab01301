//! The HTTP requests of the IndexedCP protocol, and what the receiver's
//! replies announce about it (the resumable extension, batches, streaming,
//! chunks checked by CRC-32C).

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::agent::store::{ChunkMeta, FileRecord};
use crate::agent::upload::UploadError;
use crate::agent::upload::delivery::checked_chunk_sha256;
use crate::agent::upload::error::certificate_problem;
use crate::config::{TargetConfig, TargetTls};
use crate::protocol::{self, BatchReply, ChunkReply, ErrorReply, UploadStatus};

const RESUMABLE_UNKNOWN: u8 = 0;
const RESUMABLE_YES: u8 = 1;
const RESUMABLE_NO: u8 = 2;

/// The IndexedCP delivery: an HTTP client for one receiver, and what its
/// replies announced.
pub struct IndexedCp {
    http: reqwest::Client,
    pub(super) url: String,
    api_key: Option<String>,
    resumable: AtomicU8,
    /// Whether the receiver takes chunks before the file's hash
    /// ([`protocol::STREAMING`]), with the same three values.
    streaming: AtomicU8,
    /// Held while asking the receiver what it speaks (`ask_capabilities`),
    /// so that files that start together ask once.
    asking: tokio::sync::Mutex<()>,
    /// The most files the receiver takes in one batch; 0 when it announced none.
    batch: AtomicUsize,
    /// Whether the receiver checks chunks by `X-Chunk-Crc32c` instead of
    /// `X-Chunk-Sha256` ([`protocol::CRC32C`]), as its last reply said.
    crc32c: AtomicBool,
    /// The receiver was asked what it speaks before a first chunk.
    asked_before_sending: AtomicBool,
    /// The batch route was refused (a receiver or proxy that predates it):
    /// batches stay off for this client, whatever later replies announce.
    batch_refused: AtomicBool,
    /// The client certificate settings, for asking a receiver that hung up
    /// why (see `probe`).
    tls: TargetTls,
}

impl IndexedCp {
    pub fn new(target: &TargetConfig) -> Result<IndexedCp, UploadError> {
        let builder = reqwest::Client::builder()
            .timeout(target.timeout)
            .connect_timeout(target.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("indexedcp/", env!("CARGO_PKG_VERSION")))
            .default_headers(target.headers.clone());
        let http = with_tls(builder, &target.tls)?
            .build()
            .map_err(|e| UploadError::Request {
                what: "an HTTP client".into(),
                message: e.to_string(),
            })?;
        let api_key = target
            .api_key
            .clone()
            .or_else(crate::config::api_key_from_env);
        Ok(IndexedCp {
            http,
            url: target.url.clone(),
            api_key,
            resumable: AtomicU8::new(RESUMABLE_UNKNOWN),
            streaming: AtomicU8::new(RESUMABLE_UNKNOWN),
            asking: tokio::sync::Mutex::new(()),
            batch: AtomicUsize::new(0),
            crc32c: AtomicBool::new(false),
            asked_before_sending: AtomicBool::new(false),
            batch_refused: AtomicBool::new(false),
            tls: target.tls.clone(),
        })
    }

    /// Whether the receiver announced the resumable extension (`None`: not yet known).
    pub fn resumable(&self) -> Option<bool> {
        match self.resumable.load(Ordering::Relaxed) {
            RESUMABLE_YES => Some(true),
            RESUMABLE_NO => Some(false),
            _ => None,
        }
    }

    /// Whether the receiver takes chunks before the file's hash is known
    /// (`None`: not yet known).
    pub fn streaming(&self) -> Option<bool> {
        match self.streaming.load(Ordering::Relaxed) {
            RESUMABLE_YES => Some(true),
            RESUMABLE_NO => Some(false),
            _ => None,
        }
    }

    /// Asks the receiver what it speaks without sending a file: a CORS
    /// preflight (`OPTIONS`, no key needed) gets the same announcements as
    /// any reply under the upload route. A reply without them says the
    /// receiver does not stream, unless it is a 5xx (a proxy in front of a
    /// receiver that is away), which is an error to retry.
    pub(super) async fn ask_capabilities(&self) -> Result<(), UploadError> {
        let _asking = self.asking.lock().await;
        // Another file asked while this one waited: its answer will do.
        if self.streaming().is_some() {
            return Ok(());
        }
        let sent = self
            .http
            .request(reqwest::Method::OPTIONS, &self.url)
            .send()
            .await;
        let response = self.checked(sent).await?;
        if self.note_announced(response.headers()) {
            return Ok(());
        }
        if response.status().is_server_error() {
            return Err(self.refusal(response).await);
        }
        self.streaming.store(RESUMABLE_NO, Ordering::Relaxed);
        Ok(())
    }

    /// The most files the receiver takes in one batch request (`POST
    /// <url>/batch`); 0 until a reply announced batches.
    pub fn batch_limit(&self) -> usize {
        if self.resumable() == Some(true) && !self.batch_refused.load(Ordering::Relaxed) {
            self.batch.load(Ordering::Relaxed)
        } else {
            0
        }
    }

    pub(crate) fn note_resumable(&self, headers: &HeaderMap) {
        let yes = headers
            .get(protocol::RESUMABLE)
            .is_some_and(|v| v.as_bytes() == b"1");
        self.resumable.store(
            if yes { RESUMABLE_YES } else { RESUMABLE_NO },
            Ordering::Relaxed,
        );
        let streams = yes
            && headers
                .get(protocol::STREAMING)
                .is_some_and(|v| v.as_bytes() == b"1");
        self.streaming.store(
            if streams { RESUMABLE_YES } else { RESUMABLE_NO },
            Ordering::Relaxed,
        );
        let batch = headers
            .get(protocol::BATCH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        self.batch.store(batch, Ordering::Relaxed);
        let crc32c = yes
            && headers
                .get(protocol::CRC32C)
                .is_some_and(|v| v.as_bytes() == b"1");
        self.crc32c.store(crc32c, Ordering::Relaxed);
    }

    /// Notes what a reply announces, if it carries the announcements at all
    /// (a reply from a proxy in front of the receiver does not); whether it did.
    fn note_announced(&self, headers: &HeaderMap) -> bool {
        let announced = headers.contains_key(protocol::RESUMABLE);
        if announced {
            self.note_resumable(headers);
        }
        announced
    }

    /// Whether the receiver announced that it checks chunks by their CRC-32C.
    pub fn takes_crc32c(&self) -> bool {
        self.resumable() == Some(true) && self.crc32c.load(Ordering::Relaxed)
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// `result`, with a failed request's error made an [`UploadError`].
    async fn checked<T>(&self, result: Result<T, reqwest::Error>) -> Result<T, UploadError> {
        match result {
            Ok(value) => Ok(value),
            Err(e) => Err(self.transport(e).await),
        }
    }

    async fn transport(&self, e: reqwest::Error) -> UploadError {
        // A receiver that refused our client certificate may have hung up
        // before its reason reached the HTTP client: ask it again, once,
        // when the failure says nothing (not a timeout, not a refused
        // connection, which a down receiver gives).
        let mut reason = certificate_problem(&e);
        if reason.is_none()
            && !e.is_timeout()
            && !e.is_connect()
            && self.url.starts_with("https://")
        {
            reason = super::probe::refusal_reason(&self.url, &self.tls).await;
        }
        if let Some(reason) = reason {
            let host = reqwest::Url::parse(&self.url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_else(|| self.url.clone());
            return UploadError::Certificate {
                url: self.url.clone(),
                host,
                reason,
            };
        }
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(inner) = source {
            message.push_str(": ");
            message.push_str(&inner.to_string());
            source = inner.source();
        }
        UploadError::Transport {
            url: self.url.clone(),
            message,
        }
    }

    async fn refusal(&self, response: reqwest::Response) -> UploadError {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        let (error, message) = match serde_json::from_str::<ErrorReply>(&text) {
            Ok(reply) => (reply.error.clone(), reply.message.unwrap_or(reply.error)),
            Err(_) => (String::new(), text.chars().take(200).collect()),
        };
        UploadError::Status {
            url: self.url.clone(),
            status,
            error,
            message,
            retry_after,
        }
    }

    /// Sends one chunk.
    pub async fn send_chunk(
        &self,
        file: &FileRecord,
        chunk: &ChunkMeta,
        data: Vec<u8>,
    ) -> Result<ChunkReply, UploadError> {
        // The first chunk since the start: what the receiver speaks decides
        // how the chunk is checked, so it is asked first, once (a receiver
        // that cannot say gets the chunk with its SHA-256).
        if self.resumable().is_none() && !self.asked_before_sending.swap(true, Ordering::Relaxed) {
            let _ = self.ask_capabilities().await;
        }
        let data = bytes::Bytes::from(data);
        let by_crc32c = self.takes_crc32c() && chunk.crc32c.is_some();
        let response = self
            .post_chunk(file, chunk, data.clone(), by_crc32c)
            .await?;
        // A receiver that no longer announces CRC-32C checks (an older
        // version now answers at this address) refuses a chunk without
        // X-Chunk-Sha256: the same chunk once more, with it.
        if by_crc32c
            && response.status() == StatusCode::BAD_REQUEST
            && !response.headers().contains_key(protocol::CRC32C)
        {
            self.crc32c.store(false, Ordering::Relaxed);
            tracing::info!(url = %self.url, "the receiver no longer takes X-Chunk-Crc32c; chunks go with X-Chunk-Sha256");
            let response = self.post_chunk(file, chunk, data, false).await?;
            return self.reply::<ChunkReply>(response).await;
        }
        self.reply::<ChunkReply>(response).await
    }

    /// Posts one chunk, checked by its CRC-32C or by its SHA-256.
    async fn post_chunk(
        &self,
        file: &FileRecord,
        chunk: &ChunkMeta,
        data: bytes::Bytes,
        by_crc32c: bool,
    ) -> Result<reqwest::Response, UploadError> {
        let mut headers = HeaderMap::new();
        let name = HeaderValue::from_bytes(file.remote_name.as_bytes()).map_err(|_| UploadError::Request {
            what: format!("{:?}", file.remote_name),
            message: "the file name contains characters an HTTP header cannot carry (control characters); rename the file".into(),
        })?;
        headers.insert(HeaderName::from_static(protocol::FILE_NAME), name);
        let mut put = |name: &'static str, value: String| {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_str(&value).expect("ASCII header value"),
            );
        };
        put(protocol::CHUNK_INDEX, chunk.idx.to_string());
        put(protocol::UPLOAD_ID, file.upload_id.clone());
        put(protocol::CHUNK_OFFSET, chunk.offset.to_string());
        let data = match chunk.crc32c {
            Some(crc) if by_crc32c => {
                put(protocol::CHUNK_CRC32C, protocol::crc32c_hex(crc));
                data
            }
            _ if !chunk.sha256.is_empty() => {
                put(protocol::CHUNK_SHA256, chunk.sha256.clone());
                data
            }
            _ => {
                let (data, sha256) = checked_chunk_sha256(file, chunk, data).await?;
                put(protocol::CHUNK_SHA256, hex::encode(sha256));
                data
            }
        };
        put(protocol::FILE_SIZE, file.size.to_string());
        put(protocol::CHUNK_COUNT, file.chunk_count.to_string());
        // Unknown while the file is still being buffered: only sent that
        // way to a receiver that announced streaming (see `upload::file`).
        if !file.sha256.is_empty() {
            put(protocol::FILE_SHA256, file.sha256.clone());
        }
        let request = self
            .authorize(self.http.post(&self.url))
            .headers(headers)
            .body(data);
        self.checked(request.send().await).await
    }

    /// A reply to an upload request: its JSON body when it succeeded, else the
    /// refusal; either way what it announces about the receiver's extensions.
    async fn reply<T: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<T, UploadError> {
        if !response.status().is_success() {
            // A refusal from a proxy in front of the receiver (502, 503) says
            // nothing about the receiver: only a reply that carries the header counts.
            self.note_announced(response.headers());
            return Err(self.refusal(response).await);
        }
        self.note_resumable(response.headers());
        let text = self.checked(response.text().await).await?;
        serde_json::from_str::<T>(&text).map_err(|e| UploadError::Protocol {
            url: self.url.clone(),
            message: format!("{e} in {:?}", text.chars().take(200).collect::<String>()),
        })
    }

    /// Sends a batch: `body` is the JSON manifest (`manifest_len` bytes) and
    /// then the files' bytes.
    pub async fn send_batch_request(
        &self,
        manifest_len: usize,
        body: Vec<u8>,
    ) -> Result<BatchReply, UploadError> {
        let url = self.below("batch");
        let sent = self
            .authorize(self.http.post(&url))
            .header(protocol::MANIFEST_LENGTH, manifest_len)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body)
            .send()
            .await;
        let response = self.checked(sent).await?;
        self.reply::<BatchReply>(response).await
    }

    /// The target URL with one more path segment (before any query string):
    /// `https://h/upload?k=v` and `batch` give `https://h/upload/batch?k=v`.
    fn below(&self, segment: &str) -> String {
        let mut url = match reqwest::Url::parse(&self.url) {
            Ok(url) => url,
            Err(_) => return format!("{}/{segment}", self.url.trim_end_matches('/')),
        };
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push(segment);
        }
        url.into()
    }

    /// The receiver refused batches (an older receiver): send files one by one.
    pub(crate) fn forget_batches(&self) {
        self.batch_refused.store(true, Ordering::Relaxed);
    }

    /// `GET /upload/<id>`: what the receiver has of an upload (`None`: nothing).
    pub async fn status(&self, upload_id: &str) -> Result<Option<UploadStatus>, UploadError> {
        let url = self.below(upload_id);
        let sent = self.authorize(self.http.get(&url)).send().await;
        let response = self.checked(sent).await?;
        // The first request for a file: what the receiver announces decides
        // how its chunks are checked.
        self.note_announced(response.headers());
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => {
                let text = self.checked(response.text().await).await?;
                serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| UploadError::Protocol {
                        url,
                        message: e.to_string(),
                    })
            }
            _ => Err(self.refusal(response).await),
        }
    }
}

/// Adds a target's TLS settings to an HTTP client: the system's roots plus
/// the CAs of `ca_file`, and the client certificate for mTLS. There is no
/// switch that turns verification off.
pub(crate) fn with_tls(
    mut builder: reqwest::ClientBuilder,
    tls: &TargetTls,
) -> Result<reqwest::ClientBuilder, UploadError> {
    let invalid = |path: &std::path::Path, e: reqwest::Error| UploadError::Request {
        what: format!("TLS settings from {}", path.display()),
        message: e.to_string(),
    };
    if let Some(ca) = &tls.ca_file {
        for cert in
            reqwest::Certificate::from_pem_bundle(&ca.pem).map_err(|e| invalid(&ca.path, e))?
        {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        let mut pem = cert.pem.clone();
        pem.push(b'\n');
        pem.extend_from_slice(&key.pem);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| invalid(&key.path, e))?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_and_status_urls_keep_the_query_string() {
        let client = |url: &str| IndexedCp::new(&TargetConfig::new("t", url)).unwrap();
        assert_eq!(
            client("http://h:1/upload").below("batch"),
            "http://h:1/upload/batch"
        );
        assert_eq!(
            client("https://h/in/upload/?tenant=a").below("batch"),
            "https://h/in/upload/batch?tenant=a"
        );
        assert_eq!(
            client("http://h/upload?k=v").below("abcdefabcdefabcdef"),
            "http://h/upload/abcdefabcdefabcdef?k=v"
        );
    }

    #[test]
    fn only_a_receiver_that_announces_it_gets_crc32c_checks() {
        let client = IndexedCp::new(&TargetConfig::new("t", "http://h:1/upload")).unwrap();
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_static(value));
            }
            map
        };
        client.note_resumable(&headers(&[("x-indexedcp-resumable", "1")]));
        assert!(!client.takes_crc32c());
        client.note_resumable(&headers(&[
            ("x-indexedcp-resumable", "1"),
            ("x-indexedcp-crc32c", "1"),
        ]));
        assert!(client.takes_crc32c());
        // A later reply without it (the receiver was replaced by an older
        // version) turns it off again.
        client.note_resumable(&headers(&[("x-indexedcp-resumable", "1")]));
        assert!(!client.takes_crc32c());
    }

    #[tokio::test]
    async fn a_chunk_is_hashed_for_an_older_receiver_only_when_its_bytes_match_their_crc32c() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::agent::store::Store::open(&dir.path().join("b.db")).unwrap();
        let mut target = TargetConfig::new("t", "http://127.0.0.1:9/upload");
        target.chunk_size = 4;
        let ingest = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let added = crate::agent::ingest::ingest_path(&store, &path, name, &target).unwrap();
            let file = store.file(added.file_id).unwrap();
            let chunks = store.chunks(added.file_id).unwrap();
            (file, chunks)
        };
        // A file of one chunk keeps its SHA-256 (the file's); the chunks of
        // a larger one keep their CRC-32C only.
        let (small, chunks) = ingest("s.txt", b"abc");
        assert_eq!(chunks[0].sha256, small.sha256);
        assert_eq!(chunks[0].crc32c, Some(crc32c::crc32c(b"abc")));
        let (file, chunks) = ingest("a.txt", b"0123456789");
        assert!(chunks.iter().all(|c| c.sha256.is_empty()), "{chunks:?}");
        assert_eq!(chunks[1].crc32c, Some(crc32c::crc32c(b"4567")));

        let data = bytes::Bytes::from(store.chunk_data(file.id, 1).unwrap());
        let (data, sha256) = checked_chunk_sha256(&file, &chunks[1], data).await.unwrap();
        assert_eq!(&data[..], b"4567");
        assert_eq!(sha256[..], sha2::Sha256::digest(b"4567")[..]);
        // Bytes damaged in the buffer are not hashed and sent.
        let damaged = checked_chunk_sha256(&file, &chunks[1], bytes::Bytes::from_static(b"4568"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            damaged.contains("chunk 1 of \"a.txt\"")
                && damaged.contains(&format!(
                    "CRC-32C {:08x}, not the {:08x}",
                    crc32c::crc32c(b"4568"),
                    crc32c::crc32c(b"4567")
                ))
                && damaged.contains("indexedcp doctor"),
            "{damaged}"
        );
    }
}
