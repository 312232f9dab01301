#![doc = include_str!("protocol.md")]

use serde::{Deserialize, Serialize};

/// `Authorization: Bearer <key>` carries the API key.
pub const AUTHORIZATION: &str = "authorization";
/// The client's name for the file (may contain `/` in allow-paths mode).
pub const FILE_NAME: &str = "x-file-name";
/// 0-based chunk number.
pub const CHUNK_INDEX: &str = "x-chunk-index";

// The resumable extension. A v1 server ignores these.
/// The upload's id ([`is_valid_upload_id`]), picked once per file and kept
/// across retries and restarts; a chunk that carries it is resumable.
pub const UPLOAD_ID: &str = "x-upload-id";
/// Where the chunk starts in the file, in bytes.
pub const CHUNK_OFFSET: &str = "x-chunk-offset";
/// The SHA-256 of this chunk's bytes, 64 hex digits in either case.
pub const CHUNK_SHA256: &str = "x-chunk-sha256";
/// The CRC-32C (Castagnoli) of this chunk's bytes, 8 hex digits in either
/// case; to a receiver that announced [`CRC32C`], in place of
/// [`CHUNK_SHA256`]: the whole file is still checked against
/// [`FILE_SHA256`].
pub const CHUNK_CRC32C: &str = "x-chunk-crc32c";
/// The whole file's size in bytes.
pub const FILE_SIZE: &str = "x-file-size";
/// How many chunks the file has, at least 1 (an empty file is one empty chunk).
pub const CHUNK_COUNT: &str = "x-chunk-count";
/// The SHA-256 of the whole file, 64 hex digits in either case.
pub const FILE_SHA256: &str = "x-file-sha256";
/// Reply header by which a receiver announces the resumable extension.
pub const RESUMABLE: &str = "x-indexedcp-resumable";
/// Reply header by which a receiver announces that resumable chunks may leave
/// out [`FILE_SHA256`] until the file's hash is known: a client may send a
/// file's first chunks while it is still reading the rest.
pub const STREAMING: &str = "x-indexedcp-streaming";
/// Reply header by which a receiver announces that resumable chunks may be
/// checked by [`CHUNK_CRC32C`] instead of [`CHUNK_SHA256`].
pub const CRC32C: &str = "x-indexedcp-crc32c";

// Batch extension: whole small files, many per request (`POST <url>/batch`).
/// Reply header by which a receiver announces batches: the most files it takes
/// in one batch request.
pub const BATCH: &str = "x-indexedcp-batch";
/// Request header of a batch: the length in bytes of the JSON manifest that
/// opens the body; the files' bytes follow it back to back, in manifest order.
pub const MANIFEST_LENGTH: &str = "x-manifest-length";
/// The longest manifest a receiver reads.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// The most files a receiver takes in one batch.
pub const MAX_BATCH_FILES: usize = 1024;

/// `error` of a 422 reply: the chunk body did not match `X-Chunk-Sha256` or
/// `X-Chunk-Crc32c` (resend it).
pub const CHUNK_MISMATCH_ERROR: &str = "Chunk checksum mismatch";
/// `error` of a 422 reply: the whole file did not verify and was discarded (resend all).
pub const FILE_MISMATCH_ERROR: &str = "File checksum mismatch";

/// The name the original server uses when a request carries no `X-File-Name`.
pub const DEFAULT_FILE_NAME: &str = "uploaded_file.txt";

/// Body of a 401 reply, byte-compatible with the original servers.
pub const INVALID_KEY_ERROR: &str = "Invalid or missing API key";

/// Whether `id` is a valid upload id: 16 to 64 of `[A-Za-z0-9_-]`.
pub fn is_valid_upload_id(id: &str) -> bool {
    (16..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A fresh upload id: 32 random hex characters from the operating system.
pub fn new_upload_id() -> String {
    let mut buf = [0u8; 16];
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    hex::encode(buf)
}

/// Parses a lowercase or uppercase hex SHA-256 into its canonical lowercase form.
pub fn parse_sha256_hex(value: &str) -> Option<String> {
    (value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| value.to_ascii_lowercase())
}

/// Parses a CRC-32C of 8 hex digits in either case.
pub fn parse_crc32c_hex(value: &str) -> Option<u32> {
    (value.len() == 8 && value.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u32::from_str_radix(value, 16).ok())
        .flatten()
}

/// A CRC-32C as [`CHUNK_CRC32C`] carries it: 8 lowercase hex digits.
pub fn crc32c_hex(crc: u32) -> String {
    format!("{crc:08x}")
}

/// Reply to an accepted chunk, v1 and resumable alike. The v1 fields come first and
/// keep the original's names; the resumable fields are absent in v1 replies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ChunkReply {
    /// `Chunk received`, or `Upload complete` when the chunk completed a
    /// resumable upload.
    pub message: String,
    /// The file's path in the output directory, relative to it with `/`
    /// separators: in every v1 reply, and in a resumable one once complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_filename: Option<String>,
    /// The request's `X-Chunk-Index`, repeated.
    pub chunk_index: u64,
    /// The request's `X-File-Name`, repeated.
    pub client_filename: String,
    /// The request's `X-Upload-Id`, repeated; absent in v1 replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// Whether the whole file is verified, synced and in place under
    /// `actualFilename`; absent in v1 replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete: Option<bool>,
    /// Whether the chunk (or the whole upload) had been recorded before, so
    /// nothing was written again; left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// How many chunks of the upload are recorded so far; absent in v1
    /// replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_chunks: Option<u64>,
}

/// Reply to `GET /upload/<upload-id>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UploadStatus {
    /// The upload id asked about.
    pub upload_id: String,
    /// The indexes of the recorded chunks, ascending; all of them once
    /// complete.
    pub received_chunks: Vec<u64>,
    /// Whether the file is delivered under `actualFilename`.
    pub complete: bool,
    /// The file's path in the output directory; present only when complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_filename: Option<String>,
    /// The named client (`[[server.client]]`) that started the upload;
    /// absent for an unnamed key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

/// One whole file of a batch, as the manifest declares it: the file is its
/// own single chunk (index 0, offset 0), with the upload id it keeps across
/// retries, single requests included.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BatchEntry {
    /// The file's upload id, distinct within the batch.
    pub upload_id: String,
    /// The client's name for the file, as `X-File-Name` would carry it.
    pub file_name: String,
    /// The file's size in bytes, which is also how many bytes of the body
    /// it takes.
    pub size: u64,
    /// The SHA-256 of the file, 64 hex digits.
    pub sha256: String,
}

/// The JSON that opens a batch body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchManifest {
    /// The files, 1 to the receiver's announced maximum, in the order their
    /// bytes follow the manifest.
    pub files: Vec<BatchEntry>,
}

/// What became of one file of a batch: complete under `actualFilename`, or
/// refused with the `status`, `error` and `message` a single request for it
/// would have received.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BatchResult {
    /// The manifest entry's upload id.
    pub upload_id: String,
    /// Whether the file is delivered under `actualFilename`, with the same
    /// promise as a resumable `complete: true`.
    pub complete: bool,
    /// The file's path in the output directory; present only when complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_filename: Option<String>,
    /// Whether the upload was complete, or its chunk recorded, before this
    /// batch; left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    /// For a refused file, the HTTP status a single request for it would
    /// have got; `500` means the file was not settled (ask
    /// `GET /upload/<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// For a refused file, the category as in [`ErrorReply::error`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a refused file, what went wrong and what to do, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Reply to an accepted batch: one result per manifest entry, in its order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchReply {
    /// One result per manifest entry, in manifest order.
    pub files: Vec<BatchResult>,
}

/// Body of every error reply: `error` is a short category, `message` says what to do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorReply {
    /// A fixed category per kind of refusal, such as `Bad request` or
    /// `Conflict`.
    pub error: String,
    /// What went wrong and what to do, for people (its wording may change);
    /// absent in 401 and 404 replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_id_rules() {
        assert!(is_valid_upload_id("abcdefghijklmnop"));
        assert!(is_valid_upload_id(&"A_-9".repeat(16)));
        assert!(!is_valid_upload_id("short"));
        assert!(!is_valid_upload_id(&"a".repeat(65)));
        assert!(!is_valid_upload_id("abcdefghijklmnop/"));
        assert!(!is_valid_upload_id("abcdefgh.ijklmnop"));
    }

    #[test]
    fn sha_hex_is_canonicalised() {
        let upper = "AB".repeat(32);
        assert_eq!(parse_sha256_hex(&upper), Some("ab".repeat(32)));
        assert_eq!(parse_sha256_hex("abc"), None);
        assert_eq!(parse_sha256_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn v1_reply_has_the_original_field_names_only() {
        let reply = ChunkReply {
            message: "Chunk received".into(),
            actual_filename: Some("a.txt".into()),
            chunk_index: 3,
            client_filename: "a.txt".into(),
            upload_id: None,
            complete: None,
            duplicate: false,
            received_chunks: None,
        };
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"message": "Chunk received", "actualFilename": "a.txt",
                "chunkIndex": 3, "clientFilename": "a.txt"})
        );
    }
}
