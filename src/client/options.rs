//! The client's options and the original's defaults.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::defaults;
use crate::logging;

use super::events::{ClientError, CompleteCallback, ErrorCallback, ProgressCallback};

/// The target name under which the client (and the one-shot commands) buffer
/// files; the daemon's uploader never sends them.
///
/// ```
/// assert_eq!(indexedcp::client::DEFAULT_TARGET, "cli");
/// ```
pub const DEFAULT_TARGET: &str = "cli";

/// The default chunk size, 1 MiB, as in the original.
///
/// ```
/// assert_eq!(indexedcp::client::DEFAULT_CHUNK_SIZE, 1024 * 1024);
/// ```
pub const DEFAULT_CHUNK_SIZE: u64 = defaults::CHUNK_SIZE;

/// Environment variable holding the API key when none is given.
///
/// ```
/// assert_eq!(indexedcp::client::API_KEY_ENV, "INDEXEDCP_API_KEY");
/// ```
pub use crate::config::API_KEY_ENV;

/// The default buffer, `~/.indexcp/db/client.db` (the original's), or
/// `.indexcp/db/client.db` in the current directory when `HOME` is not set.
///
/// ```
/// let path = indexedcp::client::default_storage_path();
/// assert!(path.ends_with(".indexcp/db/client.db"));
/// ```
pub fn default_storage_path() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(".indexcp/db/client.db")
}

/// The client's options, with the original's defaults.
///
/// `Default` reads `INDEXEDCP_API_KEY` into `api_key` and `INDEXEDCP_LOG_LEVEL`
/// into `log_level`, as the original falls back to them.
///
/// ```
/// use indexedcp::client::{ClientOptions, DEFAULT_CHUNK_SIZE};
/// use std::time::Duration;
///
/// let options = ClientOptions::default();
/// assert_eq!(options.server_url, None);
/// assert_eq!(options.chunk_size, DEFAULT_CHUNK_SIZE);
/// assert_eq!(options.max_retries, None); // retry forever
/// assert_eq!(options.initial_retry_delay, Duration::from_secs(1));
/// assert_eq!(options.max_retry_delay, Duration::from_secs(60));
/// assert_eq!(options.retry_multiplier, 2.0);
/// assert!(options.storage_path.ends_with(".indexcp/db/client.db"));
/// ```
#[derive(Clone)]
pub struct ClientOptions {
    /// The receiver's upload URL, e.g. `http://host:3000/upload`; a URL without
    /// a path gets `/upload`. Needed to upload, not to buffer.
    pub server_url: Option<String>,
    /// The API key sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// The buffer database (created with its parent directories), with
    /// every file's bytes; an empty second file is created next to it
    /// (`client.db` gives `client-bulk.db`), used by the daemon's buffers.
    pub storage_path: PathBuf,
    /// Bytes per chunk for files added from now on.
    pub chunk_size: u64,
    /// After this many failed retries of a chunk the file is parked; `None`
    /// retries forever.
    pub max_retries: Option<u32>,
    /// How long a failed chunk waits before its first retry; at most
    /// `max_retry_delay`.
    pub initial_retry_delay: Duration,
    /// The longest wait between two retries of a chunk.
    pub max_retry_delay: Duration,
    /// Each retry waits this many times longer than the one before; finite
    /// and at least 1.0.
    pub retry_multiplier: f64,
    /// When set, [`Client::new`](crate::client::Client::new) installs the
    /// crate's logger (stderr, or journald under systemd) at this level:
    /// `trace`, `debug`, `info`, `warn`, `error` or `fatal`;
    /// `INDEXEDCP_LOG_LEVEL` still wins, as in [`crate::logging`]. When `None`, the application's own `tracing`
    /// subscriber (if any) sees the client's logs.
    pub log_level: Option<String>,
    /// Called with every chunk attempt's
    /// [`ProgressEvent`](crate::client::ProgressEvent);
    /// [`Client::on_upload_progress`](crate::client::Client::on_upload_progress)
    /// sets it later.
    pub on_upload_progress: Option<ProgressCallback>,
    /// Called with the errors of background upload rounds, including files
    /// not delivered ([`ClientError::Undelivered`]).
    pub on_upload_error: Option<ErrorCallback>,
    /// Called with the [`UploadSummary`](crate::client::UploadSummary) of each
    /// background round that delivered at least one file.
    pub on_upload_complete: Option<CompleteCallback>,
    /// For `https://` URLs: CAs trusted besides the system's roots, and the
    /// client certificate for a receiver that requires one.
    pub tls: crate::config::TargetTls,
}

impl Default for ClientOptions {
    fn default() -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        ClientOptions {
            server_url: None,
            api_key: crate::config::api_key_from_env(),
            storage_path: default_storage_path(),
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_retries: defaults::MAX_RETRIES,
            initial_retry_delay: defaults::INITIAL_RETRY_DELAY,
            max_retry_delay: defaults::MAX_RETRY_DELAY,
            retry_multiplier: defaults::RETRY_MULTIPLIER,
            log_level: env(logging::LOG_LEVEL_ENV),
            on_upload_progress: None,
            on_upload_error: None,
            on_upload_complete: None,
            tls: crate::config::TargetTls::default(),
        }
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("server_url", &self.server_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("storage_path", &self.storage_path)
            .field("chunk_size", &self.chunk_size)
            .field("max_retries", &self.max_retries)
            .field("initial_retry_delay", &self.initial_retry_delay)
            .field("max_retry_delay", &self.max_retry_delay)
            .field("retry_multiplier", &self.retry_multiplier)
            .field("log_level", &self.log_level)
            .finish_non_exhaustive()
    }
}

impl ClientOptions {
    /// The defaults with `server_url` set.
    ///
    /// ```
    /// use indexedcp::client::ClientOptions;
    /// let options = ClientOptions::new("http://127.0.0.1:3000/upload");
    /// assert_eq!(options.server_url.as_deref(), Some("http://127.0.0.1:3000/upload"));
    /// ```
    pub fn new(server_url: impl Into<String>) -> ClientOptions {
        ClientOptions {
            server_url: Some(server_url.into()),
            ..ClientOptions::default()
        }
    }
}

/// `http(s)://host[:port]/path`, with `/upload` when the path is empty.
pub(super) fn normalize_url(url: &str) -> Result<String, ClientError> {
    let invalid = |why: &str| {
        ClientError::InvalidOptions(format!(
            "server_url {url:?} {why}; use for example http://host:3000/upload"
        ))
    };
    let mut parsed =
        reqwest::Url::parse(url).map_err(|e| invalid(&format!("is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("is not an http:// or https:// URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("has no host"));
    }
    if parsed.path().is_empty() || parsed.path() == "/" {
        parsed.set_path("/upload");
    }
    Ok(parsed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_an_upload_path_only_when_they_have_none() {
        assert_eq!(
            normalize_url("http://127.0.0.1:3000").unwrap(),
            "http://127.0.0.1:3000/upload"
        );
        assert_eq!(
            normalize_url("https://host/").unwrap(),
            "https://host/upload"
        );
        assert_eq!(
            normalize_url("http://host:1/in/upload").unwrap(),
            "http://host:1/in/upload"
        );
        for bad in ["ftp://host/upload", "host:3000/upload", "", "http://"] {
            assert!(normalize_url(bad).is_err(), "{bad}");
        }
    }
}
