#![doc = include_str!("protocol.md")]

use serde::{Deserialize, Serialize};

/// `Authorization: Bearer <key>` carries the API key.
pub const AUTHORIZATION: &str = "authorization";
/// The client's name for the file (may contain `/` in allow-paths mode).
pub const FILE_NAME: &str = "x-file-name";
/// 0-based chunk number.
pub const CHUNK_INDEX: &str = "x-chunk-index";

// Resumable extension (5.2). A v1 server ignores these.
pub const UPLOAD_ID: &str = "x-upload-id";
pub const CHUNK_OFFSET: &str = "x-chunk-offset";
pub const CHUNK_SHA256: &str = "x-chunk-sha256";
pub const FILE_SIZE: &str = "x-file-size";
pub const CHUNK_COUNT: &str = "x-chunk-count";
pub const FILE_SHA256: &str = "x-file-sha256";
/// Reply header by which a receiver announces the resumable extension.
pub const RESUMABLE: &str = "x-indexedcp-resumable";

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

/// `error` of a 422 reply: the chunk body did not match `X-Chunk-Sha256` (resend it).
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

/// Reply to an accepted chunk, v1 and resumable alike. The v1 fields come first and
/// keep the original's names; the resumable fields are absent in v1 replies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ChunkReply {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_filename: Option<String>,
    pub chunk_index: u64,
    pub client_filename: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete: Option<bool>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_chunks: Option<u64>,
}

/// Reply to `GET /upload/<upload-id>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UploadStatus {
    pub upload_id: String,
    pub received_chunks: Vec<u64>,
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_filename: Option<String>,
}

/// One whole file of a batch, as the manifest declares it: the file is its
/// own single chunk (index 0, offset 0), with the upload id it keeps across
/// retries, single requests included.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BatchEntry {
    pub upload_id: String,
    pub file_name: String,
    pub size: u64,
    pub sha256: String,
}

/// The JSON that opens a batch body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchManifest {
    pub files: Vec<BatchEntry>,
}

/// What became of one file of a batch: complete under `actualFilename`, or
/// refused with the `status`, `error` and `message` a single request for it
/// would have received.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BatchResult {
    pub upload_id: String,
    pub complete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_filename: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Reply to an accepted batch: one result per manifest entry, in its order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchReply {
    pub files: Vec<BatchResult>,
}

/// Body of every error reply: `error` is a short category, `message` says what to do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorReply {
    pub error: String,
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
