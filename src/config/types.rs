//! The validated configuration: immutable values that the rest of the program
//! reads, with no trace of TOML left in them. Durations are [`Duration`]s,
//! sizes are byte counts, paths stay as written (relative ones are resolved
//! by whoever uses them), and each optional setting already holds its default
//! from [`super::defaults`]. The constructors here give the same values a
//! configuration file naming only the required keys would, for the commands
//! that run without one.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::clients::{NamedClient, OutputLayout};
use super::defaults;
use super::s3::TargetKind;
use super::tls::{ServerTls, TargetTls};

/// The validated configuration of one `indexedcp` process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this configuration was loaded from.
    pub source: PathBuf,
    /// `[daemon]`, at its defaults when the file has no such section.
    pub daemon: DaemonConfig,
    /// Every `[[target]]`, in file order; their names are unique.
    pub targets: Vec<TargetConfig>,
    /// Every `[[spool]]`, in file order; each names one of `targets`, and no
    /// two overlap.
    pub spools: Vec<SpoolConfig>,
    /// `None` when the file has no `[server]` section: the receiver role is off.
    pub server: Option<ServerConfig>,
}

impl Config {
    /// The target called `name`, if any.
    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|target| target.name == name)
    }
}

/// `[daemon]`: process-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// The buffer lives in `<state_dir>/buffer.db` and `buffer-bulk.db`.
    pub state_dir: PathBuf,
    /// A level or an `EnvFilter`-style directive list; `INDEXEDCP_LOG_LEVEL` overrides it.
    pub log_level: String,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// How often the uploader wakes to look for due files when nothing else
    /// woke it, and how often the agent's housekeeping runs (resuming a paused
    /// ingest, forgetting old confirmed records).
    pub check_interval: Duration,
    /// Ingest pauses while the files not yet confirmed in the buffer take more
    /// than this many bytes.
    pub max_buffer_bytes: u64,
    /// How long shutdown waits for work in flight before abandoning it.
    pub shutdown_grace: Duration,
    /// Where Prometheus metrics are served (`/metrics`); `None` = off.
    pub metrics_listen: Option<SocketAddr>,
    /// What the daemon does when its buffer turns out to be damaged.
    pub on_buffer_corrupt: OnBufferCorrupt,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(defaults::STATE_DIR),
            log_level: defaults::LOG_LEVEL.to_owned(),
            log_format: LogFormat::default(),
            check_interval: defaults::CHECK_INTERVAL,
            max_buffer_bytes: defaults::MAX_BUFFER_BYTES,
            shutdown_grace: defaults::SHUTDOWN_GRACE,
            metrics_listen: defaults::METRICS_LISTEN,
            on_buffer_corrupt: defaults::ON_BUFFER_CORRUPT,
        }
    }
}

/// `daemon.on_buffer_corrupt`: what the daemon does once SQLite reports
/// its buffer damaged (at start or later). Either way ingest stops, so
/// that no source is deleted after being written into a damaged file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBufferCorrupt {
    /// Stop with exit code 65, so that the operator runs `indexedcp doctor`.
    Exit,
    /// Keep running without ingesting: the uploader goes on sending what
    /// it can read, `status` and sd_notify say the buffer is corrupt.
    StopIngest,
}

impl OnBufferCorrupt {
    /// The value as written in the file: `exit` or `stop-ingest`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exit => "exit",
            Self::StopIngest => "stop-ingest",
        }
    }
}

impl FromStr for OnBufferCorrupt {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "exit" => Ok(Self::Exit),
            "stop-ingest" => Ok(Self::StopIngest),
            _ => Err(format!(
                "unknown action {s:?}: use \"exit\" or \"stop-ingest\""
            )),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// journald when stderr is connected to the journal, text otherwise.
    Auto,
    /// Structured entries sent to the systemd journal.
    Journald,
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
}

impl Default for LogFormat {
    fn default() -> Self {
        defaults::LOG_FORMAT
    }
}

impl LogFormat {
    /// The value as written in the file: `auto`, `journald`, `text` or `json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Journald => "journald",
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "journald" => Ok(Self::Journald),
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!(
                "unknown log format {s:?}: use \"auto\", \"journald\", \"text\" or \"json\""
            )),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[target]]`: a receiver that spools upload to.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetConfig {
    /// The name spools refer to the target by; unique in a configuration.
    pub name: String,
    /// The receiver's upload URL (`http://` or `https://`), such as
    /// `http://central:3000/upload`.
    pub url: String,
    /// `None` when neither `api_key` nor `api_key_file` is set (`INDEXEDCP_API_KEY` is the fallback).
    pub api_key: Option<String>,
    /// Bytes per chunk, and so per request, for files buffered from now on; a
    /// buffered file keeps the chunk size it was cut with.
    pub chunk_size: u64,
    /// Files in flight at once.
    pub concurrency: usize,
    /// `None` retries forever; otherwise the file is parked as failed after this many retries.
    pub max_retries: Option<u32>,
    /// How long a failed chunk waits before its first retry; at most
    /// `max_retry_delay`.
    pub initial_retry_delay: Duration,
    /// The longest wait between two retries of a chunk.
    pub max_retry_delay: Duration,
    /// Each retry waits this many times longer than the one before; finite
    /// and at least 1.0.
    pub retry_multiplier: f64,
    /// How long one request may take before it fails (and is retried).
    pub timeout: Duration,
    /// How files reach the target, with the settings of its kind.
    pub kind: TargetKind,
    /// Extra headers sent with every request (`headers`), values marked
    /// sensitive; empty unless set. Only the HTTP kinds have them.
    pub headers: reqwest::header::HeaderMap,
    /// Trusted CAs and the client certificate, for `https://` URLs.
    pub tls: TargetTls,
}

impl TargetConfig {
    /// A target with every optional key at its default, as a config file
    /// naming only `name` and `url` would give (used by the one-shot commands).
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
            api_key: None,
            chunk_size: defaults::CHUNK_SIZE,
            concurrency: defaults::CONCURRENCY,
            max_retries: defaults::MAX_RETRIES,
            initial_retry_delay: defaults::INITIAL_RETRY_DELAY,
            max_retry_delay: defaults::MAX_RETRY_DELAY,
            retry_multiplier: defaults::RETRY_MULTIPLIER,
            timeout: defaults::TIMEOUT,
            kind: TargetKind::IndexedCp,
            headers: reqwest::header::HeaderMap::new(),
            tls: TargetTls::default(),
        }
    }
}

/// `[[spool]]`: a directory whose complete files are buffered and sent to a target.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolConfig {
    /// The watched directory, as written; it overlaps no other spool.
    pub path: PathBuf,
    /// The name of an existing [`TargetConfig`].
    pub target: String,
    /// Whether sub-directories are watched too; their files are sent with
    /// their paths relative to `path`.
    pub recursive: bool,
    /// Valid globs (checked with `globset`) that a file's path relative to
    /// `path` must match.
    pub include: Vec<String>,
    /// Valid globs, added to the built-in temporary/hidden patterns.
    pub exclude: Vec<String>,
    /// How long a file must stay unchanged in size and mtime before it counts
    /// as complete.
    pub settle: Duration,
    /// What happens to a file once its buffered copy is durable.
    pub disposition: Disposition,
    /// Prepended to the relative path sent as `X-File-Name`.
    pub remote_prefix: String,
}

impl SpoolConfig {
    /// A spool with every optional key at its default, as a `[[spool]]`
    /// section naming only `path` and `target` would give.
    pub fn new(path: impl Into<PathBuf>, target: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            target: target.into(),
            recursive: defaults::RECURSIVE,
            include: defaults::INCLUDE
                .iter()
                .map(|&glob| glob.to_owned())
                .collect(),
            exclude: defaults::EXCLUDE
                .iter()
                .map(|&glob| glob.to_owned())
                .collect(),
            settle: defaults::SETTLE,
            disposition: defaults::DISPOSITION,
            remote_prefix: defaults::REMOTE_PREFIX.to_owned(),
        }
    }
}

/// What happens to a spool file once its buffered copy is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// The file is deleted.
    Delete,
    /// The file stays; its identity (device, inode, size, mtime) is
    /// remembered, so it is sent again only once it changes.
    Keep,
    /// Moved into `to`, which is never inside a spool.
    Move {
        /// The directory the file is moved into (`move_to`), keeping its
        /// relative path.
        to: PathBuf,
    },
}

impl Disposition {
    /// The value as written in the file: `delete`, `keep` or `move`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::Keep => "keep",
            Self::Move { .. } => "move",
        }
    }
}

/// `[server]`: the receiver role.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// The address and port the receiver listens on.
    pub listen: SocketAddr,
    /// Where finished files are renamed into place; the receiver never
    /// writes outside it.
    pub output_dir: PathBuf,
    /// The keys a request may carry as `Authorization: Bearer`; when empty,
    /// the daemon falls back to `INDEXEDCP_API_KEY`, or generates a key and
    /// prints it.
    pub api_keys: Vec<String>,
    /// How a client's `X-File-Name` becomes a path under `output_dir`.
    pub path_mode: PathMode,
    /// The largest request body in bytes: one chunk, or a batch's files
    /// together.
    pub max_chunk_bytes: u64,
    /// The largest file in bytes the receiver accepts; 0 means unlimited.
    pub max_file_bytes: u64,
    /// How long an upload may go untouched before it is removed with its
    /// staging data; completed uploads and v1 sessions are forgotten after
    /// the same time.
    pub incomplete_expiry: Duration,
    /// Resolved: `<output_dir>/.indexedcp` unless set.
    pub state_dir: PathBuf,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Where the tus 1.0.0 endpoint lives (`/files/`): starts and ends with
    /// `/`; empty when tus is turned off.
    pub tus_path: String,
    /// HTTPS only, with this certificate, when set.
    pub tls: Option<ServerTls>,
    /// Clients known by name, besides the unnamed `api_keys`.
    pub clients: Vec<NamedClient>,
    /// Where files go below `output_dir`: flat, or by client name.
    pub output_layout: OutputLayout,
}

impl ServerConfig {
    /// A server with every optional key at its default, as a `[server]`
    /// section naming only `output_dir` would give (used by `indexedcp server`).
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        let output_dir = output_dir.into();
        Self {
            listen: defaults::LISTEN,
            state_dir: output_dir.join(defaults::SERVER_STATE_SUBDIR),
            output_dir,
            api_keys: Vec::new(),
            path_mode: PathMode::default(),
            max_chunk_bytes: defaults::MAX_CHUNK_BYTES,
            max_file_bytes: defaults::MAX_FILE_BYTES,
            incomplete_expiry: defaults::INCOMPLETE_EXPIRY,
            max_connections: defaults::MAX_CONNECTIONS,
            tus_path: defaults::TUS_PATH.to_owned(),
            tls: None,
            clients: Vec::new(),
            output_layout: OutputLayout::Flat,
        }
    }
}

/// How the receiver turns a client's `X-File-Name` into a path: `Sanitize`
/// accepts a plain file name and refuses paths, `Ignore` replaces the name with
/// a generated unique one, and `AllowPaths` keeps sub-directories below the
/// output directory. `crate::server::paths` carries out each mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathMode {
    /// A plain file name only; names with directories, `..` or control
    /// characters are refused. The default.
    Sanitize,
    /// Every upload gets a fresh unique flat name built from the time, random
    /// digits and the cleaned client name.
    Ignore,
    /// The client's relative path, with sub-directories created below the
    /// output directory; absolute paths and `..` are refused.
    AllowPaths,
}

impl Default for PathMode {
    fn default() -> Self {
        defaults::PATH_MODE
    }
}

impl PathMode {
    /// The value as written in the file: `sanitize`, `ignore` or `allow-paths`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sanitize => "sanitize",
            Self::Ignore => "ignore",
            Self::AllowPaths => "allow-paths",
        }
    }
}

impl FromStr for PathMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sanitize" => Ok(Self::Sanitize),
            "ignore" => Ok(Self::Ignore),
            "allow-paths" => Ok(Self::AllowPaths),
            _ => Err(format!(
                "unknown path mode {s:?}: use \"sanitize\", \"ignore\" or \"allow-paths\""
            )),
        }
    }
}

impl fmt::Display for PathMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_mode_round_trips_through_strings() {
        for mode in [PathMode::Sanitize, PathMode::Ignore, PathMode::AllowPaths] {
            assert_eq!(mode.to_string().parse::<PathMode>(), Ok(mode));
        }
        assert_eq!(PathMode::default(), PathMode::Sanitize);
        let error = "paths".parse::<PathMode>().unwrap_err();
        assert!(
            error.contains("\"sanitize\", \"ignore\" or \"allow-paths\""),
            "{error}"
        );
    }
}
