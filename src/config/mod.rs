//! Configuration: the TOML file described in DESIGN.md section 3, turned into an
//! immutable, validated [`Config`]. Raw serde types (`deny_unknown_fields`, every
//! value wrapped in [`Spanned`]) mirror the file; [`Config::parse`] checks them all
//! and reports every problem at once, each with file, line, column and key, so an
//! operator fixes a broken file in one pass. This module does not bind ports,
//! create directories or know about tasks: relative paths stay relative, and the
//! only files it reads are the configuration itself and the API key files it names.

use std::fmt;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::{Spanned, Value};

/// Where the daemon looks for its configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/indexedcp/indexedcp.toml";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

const DEFAULT_STATE_DIR: &str = "/var/lib/indexedcp";
const DEFAULT_LOG_LEVEL: &str = "info";
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_MAX_BUFFER_BYTES: u64 = 10 * GIB;
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

const DEFAULT_CHUNK_SIZE: u64 = MIB;
const DEFAULT_CONCURRENCY: usize = 4;
const DEFAULT_INITIAL_RETRY_DELAY: Duration = Duration::from_secs(1);
const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
const DEFAULT_RETRY_MULTIPLIER: f64 = 2.0;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

const DEFAULT_SETTLE: Duration = Duration::from_secs(2);

const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 3000));
const DEFAULT_MAX_CHUNK_BYTES: u64 = 64 * MIB;
const DEFAULT_INCOMPLETE_EXPIRY: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// The server's state lives under its output directory by default so that the
/// final rename from staging into place never crosses a filesystem.
const SERVER_STATE_SUBDIR: &str = ".indexedcp";

/// What `to_effective_toml` prints instead of any API key.
const REDACTED: &str = "<redacted>";

/// The validated configuration of one `indexedcp` process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this configuration was loaded from.
    pub source: PathBuf,
    pub daemon: DaemonConfig,
    pub targets: Vec<TargetConfig>,
    pub spools: Vec<SpoolConfig>,
    /// `None` when the file has no `[server]` section: the receiver role is off.
    pub server: Option<ServerConfig>,
}

/// `[daemon]`: process-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// The buffer lives in `<state_dir>/buffer.db`.
    pub state_dir: PathBuf,
    /// A level or an `EnvFilter`-style directive list; `INDEXEDCP_LOG_LEVEL` overrides it.
    pub log_level: String,
    pub log_format: LogFormat,
    pub check_interval: Duration,
    /// Ingest pauses while the buffer holds more than this.
    pub max_buffer_bytes: u64,
    /// How long shutdown waits for work in flight before abandoning it.
    pub shutdown_grace: Duration,
    /// Where Prometheus metrics are served (`/metrics`); `None` = off.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            log_level: DEFAULT_LOG_LEVEL.to_owned(),
            log_format: LogFormat::default(),
            check_interval: DEFAULT_CHECK_INTERVAL,
            max_buffer_bytes: DEFAULT_MAX_BUFFER_BYTES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            metrics_listen: None,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// journald when stderr is connected to the journal, text otherwise.
    #[default]
    Auto,
    Journald,
    Text,
    Json,
}

impl LogFormat {
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
    pub name: String,
    pub url: String,
    /// `None` when neither `api_key` nor `api_key_file` is set (`INDEXEDCP_API_KEY` is the fallback).
    pub api_key: Option<String>,
    pub chunk_size: u64,
    /// Files in flight at once.
    pub concurrency: usize,
    /// `None` retries forever; otherwise the file is parked as failed after this many retries.
    pub max_retries: Option<u32>,
    pub initial_retry_delay: Duration,
    pub max_retry_delay: Duration,
    pub retry_multiplier: f64,
    /// Per request.
    pub timeout: Duration,
}

impl TargetConfig {
    /// A target with every optional key at its default, as a config file
    /// naming only `name` and `url` would give (used by the one-shot commands).
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
            api_key: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            concurrency: DEFAULT_CONCURRENCY,
            max_retries: None,
            initial_retry_delay: DEFAULT_INITIAL_RETRY_DELAY,
            max_retry_delay: DEFAULT_MAX_RETRY_DELAY,
            retry_multiplier: DEFAULT_RETRY_MULTIPLIER,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// `[[spool]]`: a directory whose complete files are buffered and sent to a target.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolConfig {
    pub path: PathBuf,
    /// The name of an existing [`TargetConfig`].
    pub target: String,
    pub recursive: bool,
    /// Valid globs (checked with `globset`).
    pub include: Vec<String>,
    /// Valid globs, added to the built-in temporary/hidden patterns.
    pub exclude: Vec<String>,
    pub settle: Duration,
    pub disposition: Disposition,
    /// Prepended to the relative path sent as `X-File-Name`.
    pub remote_prefix: String,
}

/// What happens to a spool file once its buffered copy is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Delete,
    Keep,
    /// Moved into `to`, which is never inside a spool.
    Move {
        to: PathBuf,
    },
}

impl Disposition {
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
    pub listen: SocketAddr,
    pub output_dir: PathBuf,
    pub api_keys: Vec<String>,
    pub path_mode: PathMode,
    pub max_chunk_bytes: u64,
    /// 0 means unlimited.
    pub max_file_bytes: u64,
    pub incomplete_expiry: Duration,
    /// Resolved: `<output_dir>/.indexedcp` unless set.
    pub state_dir: PathBuf,
}

impl ServerConfig {
    /// A server with every optional key at its default, as a `[server]`
    /// section naming only `output_dir` would give (used by `indexedcp server`).
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        let output_dir = output_dir.into();
        Self {
            listen: DEFAULT_LISTEN,
            state_dir: output_dir.join(SERVER_STATE_SUBDIR),
            output_dir,
            api_keys: Vec::new(),
            path_mode: PathMode::default(),
            max_chunk_bytes: DEFAULT_MAX_CHUNK_BYTES,
            max_file_bytes: 0,
            incomplete_expiry: DEFAULT_INCOMPLETE_EXPIRY,
        }
    }
}

/// How the receiver turns a client's `X-File-Name` into a path (DESIGN.md section 5.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PathMode {
    #[default]
    Sanitize,
    Ignore,
    AllowPaths,
}

impl PathMode {
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

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The I/O error is part of the message rather than a `#[source]` so that
    // printing the error chain does not repeat it.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Every problem found, in file order.
    #[error("{}", join_lines(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// One human-readable line per problem.
    pub fn messages(&self) -> Vec<String> {
        match self {
            Self::Read { .. } => vec![self.to_string()],
            Self::Invalid(problems) => problems.iter().map(Problem::to_string).collect(),
        }
    }
}

fn join_lines(problems: &[Problem]) -> String {
    let lines: Vec<String> = problems.iter().map(Problem::to_string).collect();
    lines.join("\n")
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based line and column; `None` for problems about the file as a whole.
    pub position: Option<(usize, usize)>,
    /// Dotted key such as `target.url`; `None` when no key is to blame.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, "{line}:{column}:")?;
        }
        if let Some(key) = &self.key {
            write!(f, " `{key}`:")?;
        }
        write!(f, " {}", self.message)
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text`. `source` names the file in messages, and
    /// relative `api_key_file`/`api_keys_file` paths are read from its directory.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| {
            let offset = error.span().map(|span| span.start);
            let key = offset.and_then(|offset| key_path_at(text, offset));
            let message = match key.as_deref().and_then(section_shape) {
                // serde's wording for a section of the wrong shape names internal types.
                Some(shape) if error.message().starts_with("invalid type") => shape.to_owned(),
                _ => error.message().trim().to_owned(),
            };
            ConfigError::Invalid(vec![Problem {
                file: source.to_owned(),
                position: offset.map(|offset| position_of(text, offset)),
                key,
                message,
            }])
        })?;
        let mut checker = Checker {
            text,
            source,
            problems: Vec::new(),
        };
        let config = checker.check(raw);
        if checker.problems.is_empty() {
            Ok(config)
        } else {
            let mut problems = checker.problems;
            problems.sort_by_key(|problem| problem.position.unwrap_or((usize::MAX, 0)));
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The target called `name`, if any.
    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|target| target.name == name)
    }

    /// The effective configuration as TOML, every default filled in and every
    /// API key shown as `"<redacted>"`; parsing it again gives the same
    /// configuration apart from the keys.
    pub fn to_effective_toml(&self) -> String {
        let mut out = TomlWriter::default();
        out.comment(&format!(
            "effective configuration of {} (defaults filled in, API keys redacted)",
            self.source.display()
        ));

        let daemon = &self.daemon;
        out.section("[daemon]");
        out.string("state_dir", &path_text(&daemon.state_dir));
        out.string("log_level", &daemon.log_level);
        out.string("log_format", daemon.log_format.as_str());
        out.string("check_interval", &format_duration(daemon.check_interval));
        out.string("max_buffer_bytes", &format_size(daemon.max_buffer_bytes));
        out.string("shutdown_grace", &format_duration(daemon.shutdown_grace));
        if let Some(addr) = daemon.metrics_listen {
            out.string("metrics_listen", &addr.to_string());
        }

        for target in &self.targets {
            out.section("[[target]]");
            out.string("name", &target.name);
            out.string("url", &target.url);
            match target.api_key {
                Some(_) => out.string("api_key", REDACTED),
                None => out.comment("api_key not set: INDEXEDCP_API_KEY is the fallback"),
            }
            out.string("chunk_size", &format_size(target.chunk_size));
            out.value(
                "concurrency",
                Value::Integer(saturating_i64(target.concurrency)),
            );
            match target.max_retries {
                Some(n) => out.value("max_retries", Value::Integer(n.into())),
                None => out.string("max_retries", "infinite"),
            }
            out.string(
                "initial_retry_delay",
                &format_duration(target.initial_retry_delay),
            );
            out.string("max_retry_delay", &format_duration(target.max_retry_delay));
            out.value("retry_multiplier", Value::Float(target.retry_multiplier));
            out.string("timeout", &format_duration(target.timeout));
        }

        for spool in &self.spools {
            out.section("[[spool]]");
            out.string("path", &path_text(&spool.path));
            out.string("target", &spool.target);
            out.value("recursive", Value::Boolean(spool.recursive));
            out.value("include", string_array(spool.include.iter()));
            out.value("exclude", string_array(spool.exclude.iter()));
            out.string("settle", &format_duration(spool.settle));
            out.string("disposition", spool.disposition.as_str());
            if let Disposition::Move { to } = &spool.disposition {
                out.string("move_to", &path_text(to));
            }
            out.string("remote_prefix", &spool.remote_prefix);
        }

        if let Some(server) = &self.server {
            out.section("[server]");
            out.string("listen", &server.listen.to_string());
            out.string("output_dir", &path_text(&server.output_dir));
            out.value(
                "api_keys",
                string_array(server.api_keys.iter().map(|_| REDACTED)),
            );
            out.string("path_mode", server.path_mode.as_str());
            out.string("max_chunk_bytes", &format_size(server.max_chunk_bytes));
            out.string("max_file_bytes", &format_size(server.max_file_bytes));
            out.string(
                "incomplete_expiry",
                &format_duration(server.incomplete_expiry),
            );
            out.string("state_dir", &path_text(&server.state_dir));
        }
        out.text
    }
}

/// Parses a duration: an unsigned integer followed by `ms`, `s`, `m`, `h` or
/// `d`, or a bare integer meaning seconds (`"250ms"`, `"5s"`, `"7d"`, `"10"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "invalid duration {s:?}: use a whole number with a unit ms, s, m, h or d \
             (e.g. \"250ms\", \"5s\", \"2m\") or a number of seconds"
        )
    };
    let (number, unit) = split_number(s).ok_or_else(invalid)?;
    let seconds_per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(number)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => 24 * 60 * 60,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// Parses a size: an unsigned integer of bytes, optionally followed by a
/// binary (`KiB`, `MiB`, `GiB`, `TiB`) or decimal (`KB`, `MB`, `GB`, `TB`)
/// unit or `B`; units are case-insensitive (`"1MiB"`, `"1KB"`, `"0"`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let invalid = || {
        format!(
            "invalid size {s:?}: use a whole number of bytes, optionally with a unit \
             KiB, MiB, GiB, TiB (binary) or KB, MB, GB, TB (decimal), e.g. \"1MiB\""
        )
    };
    let (number, unit) = split_number(s).ok_or_else(invalid)?;
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "tib" => TIB,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Splits `" 12 MiB "` into `(12, "MiB")`; `None` unless it starts with digits
/// that fit a `u64` (so signs and fractions are refused).
fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let number = s[..digits_end].parse().ok()?;
    Some((number, s[digits_end..].trim_start()))
}

/// The shortest exact spelling that `parse_duration` reads back.
fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    let units = [
        (24 * 60 * 60 * 1000, "d"),
        (60 * 60 * 1000, "h"),
        (60 * 1000, "m"),
        (1000, "s"),
    ];
    for (unit_millis, unit) in units {
        if millis.is_multiple_of(unit_millis) {
            return format!("{}{unit}", millis / unit_millis);
        }
    }
    format!("{millis}ms")
}

/// The shortest exact spelling that `parse_size` reads back.
fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_owned();
    }
    for (unit_bytes, unit) in [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes.is_multiple_of(unit_bytes) {
            return format!("{}{unit}", bytes / unit_bytes);
        }
    }
    bytes.to_string()
}

// Raw types: the file exactly as written. Every field is optional so that
// missing keys are reported by the checker together with everything else, and
// spanned so that each report points at the value (or, when the key is absent,
// at its section header). Durations and sizes stay `toml::Value`s because they
// may be written as strings or integers.

type Field<T> = Option<Spanned<T>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: Field<RawDaemon>,
    #[serde(default)]
    target: Vec<Spanned<RawTarget>>,
    #[serde(default)]
    spool: Vec<Spanned<RawSpool>>,
    server: Field<RawServer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    state_dir: Field<String>,
    log_level: Field<String>,
    log_format: Field<String>,
    check_interval: Field<Value>,
    max_buffer_bytes: Field<Value>,
    shutdown_grace: Field<Value>,
    metrics_listen: Field<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: Field<String>,
    url: Field<String>,
    api_key: Field<String>,
    api_key_file: Field<String>,
    chunk_size: Field<Value>,
    concurrency: Field<i64>,
    max_retries: Field<Value>,
    initial_retry_delay: Field<Value>,
    max_retry_delay: Field<Value>,
    retry_multiplier: Field<f64>,
    timeout: Field<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpool {
    path: Field<String>,
    target: Field<String>,
    recursive: Field<bool>,
    include: Field<Vec<Spanned<String>>>,
    exclude: Field<Vec<Spanned<String>>>,
    settle: Field<Value>,
    disposition: Field<String>,
    move_to: Field<String>,
    remote_prefix: Field<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Field<String>,
    output_dir: Field<String>,
    api_keys: Field<Vec<Spanned<String>>>,
    api_keys_file: Field<String>,
    path_mode: Field<String>,
    max_chunk_bytes: Field<Value>,
    max_file_bytes: Field<Value>,
    incomplete_expiry: Field<Value>,
    state_dir: Field<String>,
}

/// Where a validated spool came from, for the checks that compare spools.
struct SpoolSpans {
    path: Range<usize>,
    move_to: Option<Range<usize>>,
}

/// Validates raw sections into the public types, collecting problems instead
/// of stopping at the first; an invalid value is replaced by its default so
/// that the checks after it still run.
struct Checker<'a> {
    text: &'a str,
    source: &'a Path,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.source.to_owned(),
            position: Some(position_of(self.text, span.start)),
            key: Some(key.to_owned()),
            message: message.into(),
        });
    }

    fn line_of(&self, span: &Range<usize>) -> usize {
        position_of(self.text, span.start).0
    }

    /// Converts an optional field, reporting a failed conversion at its value.
    fn field<R, T>(
        &mut self,
        field: Field<R>,
        key: &str,
        default: T,
        convert: impl FnOnce(&R) -> Result<T, String>,
    ) -> T {
        let Some(field) = field else { return default };
        match convert(field.get_ref()) {
            Ok(value) => value,
            Err(message) => {
                self.problem(field.span(), key, message);
                default
            }
        }
    }

    /// A required field: reported at the section header when absent.
    fn required<R, T>(
        &mut self,
        field: Field<R>,
        section: &Range<usize>,
        key: &str,
        missing: &str,
        convert: impl FnOnce(&R) -> Result<T, String>,
    ) -> Option<T> {
        let Some(field) = field else {
            self.problem(section.clone(), key, format!("missing; {missing}"));
            return None;
        };
        match convert(field.get_ref()) {
            Ok(value) => Some(value),
            Err(message) => {
                self.problem(field.span(), key, message);
                None
            }
        }
    }

    fn check(&mut self, raw: RawConfig) -> Config {
        let daemon = match raw.daemon {
            Some(daemon) => self.check_daemon(daemon.into_inner()),
            None => DaemonConfig::default(),
        };

        let mut targets: Vec<TargetConfig> = Vec::new();
        let mut name_spans: Vec<Range<usize>> = Vec::new();
        for raw_target in raw.target {
            let (target, name_span) = self.check_target(raw_target);
            // An empty name was reported already; it need not be reported twice.
            let first = targets
                .iter()
                .position(|t| !t.name.is_empty() && t.name == target.name);
            if let Some(first) = first {
                let line = self.line_of(&name_spans[first]);
                self.problem(
                    name_span.clone(),
                    "target.name",
                    format!(
                        "a target named {:?} is already defined at line {line}; give each target a unique name",
                        target.name
                    ),
                );
            }
            targets.push(target);
            name_spans.push(name_span);
        }

        let target_names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        let mut spools = Vec::new();
        let mut spool_spans = Vec::new();
        for raw_spool in raw.spool {
            let (spool, spans) = self.check_spool(raw_spool, &target_names);
            spools.push(spool);
            spool_spans.push(spans);
        }
        self.check_spool_overlaps(&spools, &spool_spans);

        let server = raw
            .server
            .map(|server| self.check_server(server.span(), server.into_inner()));

        if spools.is_empty() && targets.is_empty() && server.is_none() {
            self.problems.push(Problem {
                file: self.source.to_owned(),
                position: None,
                key: None,
                message: "nothing to do: enable at least one role with a [[spool]] and its \
                          [[target]] (agent) or a [server] section (receiver)"
                    .to_owned(),
            });
        }

        Config {
            source: self.source.to_owned(),
            daemon,
            targets,
            spools,
            server,
        }
    }

    fn check_daemon(&mut self, raw: RawDaemon) -> DaemonConfig {
        let defaults = DaemonConfig::default();
        DaemonConfig {
            state_dir: self.field(
                raw.state_dir,
                "daemon.state_dir",
                defaults.state_dir,
                |dir| non_empty_path(dir, "the directory that holds the buffer"),
            ),
            log_level: self.field(
                raw.log_level,
                "daemon.log_level",
                defaults.log_level,
                |level| check_log_level(level).map(|()| level.clone()),
            ),
            log_format: self.field(
                raw.log_format,
                "daemon.log_format",
                defaults.log_format,
                |format| format.parse(),
            ),
            check_interval: self.field(
                raw.check_interval,
                "daemon.check_interval",
                defaults.check_interval,
                |value| {
                    positive_duration(value, "the uploader wakes this often to retry, e.g. \"5s\"")
                },
            ),
            max_buffer_bytes: self.field(
                raw.max_buffer_bytes,
                "daemon.max_buffer_bytes",
                defaults.max_buffer_bytes,
                |value| {
                    positive_size(
                        value,
                        "ingest pauses while the buffer holds more than this, e.g. \"10GiB\"",
                    )
                },
            ),
            shutdown_grace: self.field(
                raw.shutdown_grace,
                "daemon.shutdown_grace",
                defaults.shutdown_grace,
                duration_value,
            ),
            metrics_listen: self.field(
                raw.metrics_listen,
                "daemon.metrics_listen",
                defaults.metrics_listen,
                |listen| {
                    listen.parse().map(Some).map_err(|_| {
                        format!(
                            "invalid address {listen:?}: use an IP address and port such as \"127.0.0.1:9464\""
                        )
                    })
                },
            ),
        }
    }

    /// Returns the target and the span of its name (or header) for duplicate reports.
    fn check_target(&mut self, raw: Spanned<RawTarget>) -> (TargetConfig, Range<usize>) {
        let section = raw.span();
        let raw = raw.into_inner();
        let name_span = raw.name.as_ref().map_or(section.clone(), Spanned::span);
        let defaults = TargetConfig::new("", "");

        let name = self
            .required(
                raw.name,
                &section,
                "target.name",
                "give the target a name such as name = \"central\" for spools to refer to",
                |name| {
                    if name.trim().is_empty() {
                        Err("must not be empty; give the target a name such as \"central\"".into())
                    } else {
                        Ok(name.clone())
                    }
                },
            )
            .unwrap_or_default();
        let url = self
            .required(
                raw.url,
                &section,
                "target.url",
                "set url = \"https://host/upload\" (the receiver's upload endpoint)",
                |url| check_url(url).map(|()| url.clone()),
            )
            .unwrap_or_default();
        let api_key = self.check_target_api_key(raw.api_key, raw.api_key_file);

        let initial_span = raw.initial_retry_delay.as_ref().map(Spanned::span);
        let max_span = raw.max_retry_delay.as_ref().map(Spanned::span);
        let target = TargetConfig {
            name,
            url,
            api_key,
            chunk_size: self.field(
                raw.chunk_size,
                "target.chunk_size",
                defaults.chunk_size,
                |value| positive_size(value, "use e.g. \"1MiB\""),
            ),
            concurrency: self.field(
                raw.concurrency,
                "target.concurrency",
                defaults.concurrency,
                |&n| match usize::try_from(n) {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!(
                        "must be at least 1 (the number of files uploaded at once), not {n}; use e.g. 4"
                    )),
                },
            ),
            max_retries: self.field(
                raw.max_retries,
                "target.max_retries",
                defaults.max_retries,
                max_retries_value,
            ),
            initial_retry_delay: self.field(
                raw.initial_retry_delay,
                "target.initial_retry_delay",
                defaults.initial_retry_delay,
                |value| positive_duration(value, "the first retry waits this long, e.g. \"1s\""),
            ),
            max_retry_delay: self.field(
                raw.max_retry_delay,
                "target.max_retry_delay",
                defaults.max_retry_delay,
                duration_value,
            ),
            retry_multiplier: self.field(
                raw.retry_multiplier,
                "target.retry_multiplier",
                defaults.retry_multiplier,
                |&multiplier| {
                    if multiplier.is_finite() && multiplier >= 1.0 {
                        Ok(multiplier)
                    } else {
                        Err(format!(
                            "must be a finite number of at least 1.0 (each retry waits this many \
                             times longer than the last), not {multiplier}; use e.g. 2.0"
                        ))
                    }
                },
            ),
            timeout: self.field(raw.timeout, "target.timeout", defaults.timeout, |value| {
                positive_duration(value, "each request may take this long, e.g. \"30s\"")
            }),
        };

        if target.initial_retry_delay > target.max_retry_delay {
            let span = initial_span.or(max_span).unwrap_or(section);
            self.problem(
                span,
                "target.initial_retry_delay",
                format!(
                    "{} is longer than max_retry_delay ({}); lower initial_retry_delay or raise max_retry_delay",
                    format_duration(target.initial_retry_delay),
                    format_duration(target.max_retry_delay)
                ),
            );
        }
        (target, name_span)
    }

    fn check_target_api_key(
        &mut self,
        api_key: Field<String>,
        api_key_file: Field<String>,
    ) -> Option<String> {
        match (api_key, api_key_file) {
            (None, None) => None,
            (Some(_), Some(file)) => {
                self.problem(
                    file.span(),
                    "target.api_key_file",
                    "api_key is set too; set either api_key or api_key_file, not both",
                );
                None
            }
            (Some(key), None) => self.field(Some(key), "target.api_key", None, |key| {
                check_api_key(key).map(|()| Some(key.clone()))
            }),
            (None, Some(file)) => {
                let source = self.source;
                self.field(Some(file), "target.api_key_file", None, |file| {
                    let path = resolve_key_file(source, file);
                    let text = read_key_file(&path)?;
                    let key = text.trim();
                    if key.is_empty() {
                        return Err(format!(
                            "{} is empty; put the key on its first line",
                            path.display()
                        ));
                    }
                    if key.lines().count() > 1 {
                        return Err(format!(
                            "{} has more than one line; it must hold just the key",
                            path.display()
                        ));
                    }
                    check_api_key(key)
                        .map(|()| Some(key.to_owned()))
                        .map_err(|message| format!("the key in {}: {message}", path.display()))
                })
            }
        }
    }

    fn check_spool(
        &mut self,
        raw: Spanned<RawSpool>,
        target_names: &[&str],
    ) -> (SpoolConfig, SpoolSpans) {
        let section = raw.span();
        let raw = raw.into_inner();
        let path_span = raw.path.as_ref().map_or(section.clone(), Spanned::span);
        let move_to_span = raw.move_to.as_ref().map(Spanned::span);

        let path = self
            .required(
                raw.path,
                &section,
                "spool.path",
                "set path = \"/var/spool/indexedcp/outbox\" (the directory to watch)",
                |path| non_empty_path(path, "the directory to watch"),
            )
            .unwrap_or_default();
        let target = self.check_spool_target(raw.target, &section, target_names);
        let disposition = self.check_disposition(raw.disposition, raw.move_to, &section);

        let spool = SpoolConfig {
            path,
            target,
            recursive: self.field(raw.recursive, "spool.recursive", true, |&r| Ok(r)),
            include: self.check_include(raw.include),
            exclude: self.check_globs(raw.exclude, "spool.exclude", Vec::new()),
            settle: self.field(raw.settle, "spool.settle", DEFAULT_SETTLE, duration_value),
            disposition,
            remote_prefix: self.field(
                raw.remote_prefix,
                "spool.remote_prefix",
                String::new(),
                |prefix| check_remote_prefix(prefix).map(|()| prefix.clone()),
            ),
        };
        let spans = SpoolSpans {
            path: path_span,
            move_to: move_to_span,
        };
        (spool, spans)
    }

    fn check_spool_target(
        &mut self,
        target: Field<String>,
        section: &Range<usize>,
        target_names: &[&str],
    ) -> String {
        let known = || {
            let quoted: Vec<String> = target_names.iter().map(|n| format!("{n:?}")).collect();
            quoted.join(", ")
        };
        match target {
            Some(target) if target_names.contains(&target.get_ref().as_str()) => {
                target.into_inner()
            }
            Some(target) => {
                let message = if target_names.is_empty() {
                    format!(
                        "no [[target]] named {:?}: none is defined; add a [[target]] section with that name",
                        target.get_ref()
                    )
                } else {
                    format!(
                        "no [[target]] named {:?}; use one of {}",
                        target.get_ref(),
                        known()
                    )
                };
                self.problem(target.span(), "spool.target", message);
                target.into_inner()
            }
            // With a single target there is nothing to choose, so the key may be left out.
            None if target_names.len() == 1 => target_names[0].to_owned(),
            None if target_names.is_empty() => {
                self.problem(
                    section.clone(),
                    "spool.target",
                    "a spool needs a target but no [[target]] is defined; add a [[target]] section",
                );
                String::new()
            }
            None => {
                let message = format!("missing; set target to one of {}", known());
                self.problem(section.clone(), "spool.target", message);
                String::new()
            }
        }
    }

    fn check_disposition(
        &mut self,
        disposition: Field<String>,
        move_to: Field<String>,
        section: &Range<usize>,
    ) -> Disposition {
        let disposition_span = disposition.as_ref().map_or(section.clone(), Spanned::span);
        let kind = self.field(disposition, "spool.disposition", "delete", |d| {
            match d.as_str() {
                "delete" => Ok("delete"),
                "keep" => Ok("keep"),
                "move" => Ok("move"),
                _ => Err(format!(
                    "unknown disposition {d:?}: use \"delete\", \"keep\" or \"move\" (with move_to = \"...\")"
                )),
            }
        });
        match (kind, move_to) {
            ("move", Some(to)) => {
                let to = self.field(Some(to), "spool.move_to", None, |to| {
                    non_empty_path(to, "the directory processed files are moved to").map(Some)
                });
                // An invalid move_to was reported; keep the files rather than guess.
                to.map_or(Disposition::Keep, |to| Disposition::Move { to })
            }
            ("move", None) => {
                self.problem(
                    disposition_span,
                    "spool.move_to",
                    "missing; disposition \"move\" needs move_to = \"/dir\" (outside every spool)",
                );
                Disposition::Keep
            }
            (kind, Some(to)) => {
                self.problem(
                    to.span(),
                    "spool.move_to",
                    format!(
                        "only used with disposition = \"move\" but disposition is {kind:?}; \
                         remove move_to or set disposition = \"move\""
                    ),
                );
                if kind == "keep" {
                    Disposition::Keep
                } else {
                    Disposition::Delete
                }
            }
            ("keep", None) => Disposition::Keep,
            _ => Disposition::Delete,
        }
    }

    fn check_include(&mut self, include: Field<Vec<Spanned<String>>>) -> Vec<String> {
        if let Some(include) = include.as_ref().filter(|list| list.get_ref().is_empty()) {
            self.problem(
                include.span(),
                "spool.include",
                "is empty, so no file would ever be sent; use [\"*\"] for every file",
            );
        }
        self.check_globs(include, "spool.include", vec!["*".to_owned()])
    }

    fn check_globs(
        &mut self,
        globs: Field<Vec<Spanned<String>>>,
        key: &str,
        default: Vec<String>,
    ) -> Vec<String> {
        let Some(globs) = globs else { return default };
        let mut valid = Vec::new();
        for glob in globs.into_inner() {
            match globset::Glob::new(glob.get_ref()) {
                Ok(_) => valid.push(glob.into_inner()),
                Err(error) => {
                    self.problem(glob.span(), key, format!("{error}; fix the pattern"));
                }
            }
        }
        valid
    }

    /// A file must belong to exactly one spool, and a spool must never pick up
    /// files that it (or another spool) moved away after processing.
    fn check_spool_overlaps(&mut self, spools: &[SpoolConfig], spans: &[SpoolSpans]) {
        let roots: Vec<PathBuf> = spools.iter().map(|s| normalize(&s.path)).collect();
        for (i, spool) in spools.iter().enumerate() {
            if spool.path.as_os_str().is_empty() {
                continue;
            }
            for j in 0..i {
                if spools[j].path.as_os_str().is_empty() || !overlaps(&roots[i], &roots[j]) {
                    continue;
                }
                let relation = if roots[i] == roots[j] {
                    "is the same directory as"
                } else if roots[i].starts_with(&roots[j]) {
                    "is inside"
                } else {
                    "contains"
                };
                let line = self.line_of(&spans[j].path);
                self.problem(
                    spans[i].path.clone(),
                    "spool.path",
                    format!(
                        "{} {relation} the spool {} at line {line}; spools must not overlap, \
                         give each its own directory",
                        spool.path.display(),
                        spools[j].path.display()
                    ),
                );
            }
            if let (Disposition::Move { to }, Some(move_span)) =
                (&spool.disposition, &spans[i].move_to)
            {
                let to = normalize(to);
                for (j, other) in spools.iter().enumerate() {
                    if other.path.as_os_str().is_empty() || !inside(&to, &roots[j]) {
                        continue;
                    }
                    let whose = if i == j {
                        "its own spool".to_owned()
                    } else {
                        format!("the spool at line {}", self.line_of(&spans[j].path))
                    };
                    self.problem(
                        move_span.clone(),
                        "spool.move_to",
                        format!(
                            "{} is inside {whose} ({}), so moved files would be sent again; \
                             choose a directory outside every spool",
                            to.display(),
                            other.path.display()
                        ),
                    );
                }
            }
        }
    }

    fn check_server(&mut self, section: Range<usize>, raw: RawServer) -> ServerConfig {
        let output_dir = self
            .required(
                raw.output_dir,
                &section,
                "server.output_dir",
                "set output_dir = \"/srv/indexedcp\" (where received files are written)",
                |dir| non_empty_path(dir, "the directory received files are written to"),
            )
            .unwrap_or_default();
        let defaults = ServerConfig::new(&output_dir);
        let api_keys = self.check_server_api_keys(raw.api_keys, raw.api_keys_file);
        ServerConfig {
            listen: self.field(raw.listen, "server.listen", defaults.listen, |listen| {
                listen.parse().map_err(|_| {
                    format!(
                        "invalid address {listen:?}: use an IP address and port such as \
                         \"127.0.0.1:3000\" or \"[::]:3000\""
                    )
                })
            }),
            api_keys,
            path_mode: self.field(
                raw.path_mode,
                "server.path_mode",
                defaults.path_mode,
                |mode| mode.parse(),
            ),
            max_chunk_bytes: self.field(
                raw.max_chunk_bytes,
                "server.max_chunk_bytes",
                defaults.max_chunk_bytes,
                |value| positive_size(value, "larger chunks are refused, e.g. \"64MiB\""),
            ),
            max_file_bytes: self.field(
                raw.max_file_bytes,
                "server.max_file_bytes",
                defaults.max_file_bytes,
                size_value,
            ),
            incomplete_expiry: self.field(
                raw.incomplete_expiry,
                "server.incomplete_expiry",
                defaults.incomplete_expiry,
                |value| {
                    positive_duration(
                        value,
                        "abandoned partial uploads are kept this long, e.g. \"7d\"",
                    )
                },
            ),
            // An empty state_dir means the default, as the reference file documents.
            state_dir: match raw.state_dir {
                Some(dir) if !dir.get_ref().is_empty() => PathBuf::from(dir.into_inner()),
                _ => defaults.state_dir,
            },
            output_dir,
        }
    }

    fn check_server_api_keys(
        &mut self,
        api_keys: Field<Vec<Spanned<String>>>,
        api_keys_file: Field<String>,
    ) -> Vec<String> {
        match (api_keys, api_keys_file) {
            (None, None) => Vec::new(),
            (Some(_), Some(file)) => {
                self.problem(
                    file.span(),
                    "server.api_keys_file",
                    "api_keys is set too; set either api_keys or api_keys_file, not both",
                );
                Vec::new()
            }
            (Some(keys), None) => {
                let mut valid = Vec::new();
                for key in keys.into_inner() {
                    match check_api_key(key.get_ref()) {
                        Ok(()) => valid.push(key.into_inner()),
                        Err(message) => self.problem(key.span(), "server.api_keys", message),
                    }
                }
                valid
            }
            (None, Some(file)) => {
                let source = self.source;
                self.field(Some(file), "server.api_keys_file", Vec::new(), |file| {
                    let path = resolve_key_file(source, file);
                    let keys = parse_key_list(&read_key_file(&path)?)
                        .map_err(|message| format!("{}: {message}", path.display()))?;
                    if keys.is_empty() {
                        return Err(format!(
                            "{} holds no keys; add one key per line",
                            path.display()
                        ));
                    }
                    Ok(keys)
                })
            }
        }
    }
}

/// Keys from an `api_keys_file`: one per line, blank lines and `#` comments skipped.
fn parse_key_list(text: &str) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    for (line_idx, line) in text.lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        check_api_key(key).map_err(|message| format!("line {}: {message}", line_idx + 1))?;
        keys.push(key.to_owned());
    }
    Ok(keys)
}

/// Relative key files are read from the configuration file's directory, so a
/// config and its keys can be moved together.
fn resolve_key_file(source: &Path, file: &str) -> PathBuf {
    let file = Path::new(file);
    match source.parent() {
        Some(dir) if file.is_relative() => dir.join(file),
        _ => file.to_owned(),
    }
}

fn read_key_file(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|error| {
        format!(
            "cannot read {}: {error}; create it or fix the path",
            path.display()
        )
    })
}

/// A key travels in an `Authorization` header, so it must be printable ASCII
/// without spaces. The key itself is never echoed into a message.
fn check_api_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        Err("is empty; set a key or remove the setting".to_owned())
    } else if !key.chars().all(|c| c.is_ascii_graphic()) {
        Err(
            "contains spaces or characters not allowed in an HTTP header; use printable ASCII"
                .to_owned(),
        )
    } else {
        Ok(())
    }
}

fn check_url(url: &str) -> Result<(), String> {
    let lower = url.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
    else {
        return Err(format!(
            "{url:?} is not an HTTP URL; use http:// or https://, e.g. \"https://host/upload\""
        ));
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!(
            "{url:?} has no host; use e.g. \"https://host/upload\""
        ));
    }
    if url.chars().any(char::is_whitespace) {
        return Err(format!(
            "{url:?} contains whitespace; percent-encode it or remove it"
        ));
    }
    Ok(())
}

/// Accepts a level name or anything shaped like an `EnvFilter` directive list;
/// the logging set-up has the final word on the directives themselves.
fn check_log_level(level: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_:=,.-".contains(c);
    if !level.is_empty() && level.chars().all(allowed) {
        Ok(())
    } else {
        Err(format!(
            "invalid log level {level:?}: use trace, debug, info, warn, error, fatal or a filter \
             such as \"indexedcp=debug,info\""
        ))
    }
}

/// Receivers refuse absolute and traversing names, so such a prefix would park every file.
fn check_remote_prefix(prefix: &str) -> Result<(), String> {
    let path = Path::new(prefix);
    if prefix.starts_with(['/', '\\']) || path.components().any(|c| c == Component::ParentDir) {
        Err(format!(
            "{prefix:?} must be a relative path without \"..\", because receivers refuse \
             absolute and traversing names; use e.g. \"site-a/\""
        ))
    } else {
        Ok(())
    }
}

fn non_empty_path(path: &str, what: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        Err(format!("must not be empty; set {what}"))
    } else {
        Ok(PathBuf::from(path))
    }
}

fn duration_value(value: &Value) -> Result<Duration, String> {
    match value {
        Value::String(s) => parse_duration(s),
        Value::Integer(n) => u64::try_from(*n)
            .map(Duration::from_secs)
            .map_err(|_| format!("must not be negative, not {n}; use e.g. \"5s\"")),
        other => Err(format!(
            "expected a duration such as \"5s\" or a number of seconds, found {}",
            other.type_str()
        )),
    }
}

fn positive_duration(value: &Value, hint: &str) -> Result<Duration, String> {
    match duration_value(value)? {
        Duration::ZERO => Err(format!("must be greater than 0; {hint}")),
        duration => Ok(duration),
    }
}

fn size_value(value: &Value) -> Result<u64, String> {
    match value {
        Value::String(s) => parse_size(s),
        Value::Integer(n) => u64::try_from(*n)
            .map_err(|_| format!("must not be negative, not {n}; use e.g. \"1MiB\"")),
        other => Err(format!(
            "expected a size such as \"1MiB\" or a number of bytes, found {}",
            other.type_str()
        )),
    }
}

fn positive_size(value: &Value, hint: &str) -> Result<u64, String> {
    match size_value(value)? {
        0 => Err(format!("must be greater than 0; {hint}")),
        size => Ok(size),
    }
}

fn max_retries_value(value: &Value) -> Result<Option<u32>, String> {
    let invalid = || "use \"infinite\" or a number of retries such as 10".to_owned();
    match value {
        Value::String(s) if s == "infinite" => Ok(None),
        Value::String(s) => Err(format!("invalid value {s:?}: {}", invalid())),
        Value::Integer(n) => u32::try_from(*n)
            .map(Some)
            .map_err(|_| format!("{n} is out of range: {}", invalid())),
        other => Err(format!(
            "expected a string or an integer, found {}: {}",
            other.type_str(),
            invalid()
        )),
    }
}

/// Lexical normalisation: drops `.` and trailing slashes and resolves `..`
/// against the preceding component, without touching the filesystem.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => match out.components().next_back() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // `/..` is `/`.
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(".."),
            },
            other => out.push(other),
        }
    }
    out
}

/// Whether normalised `path` is `root` or below it. Relative and absolute
/// paths are never compared, since that would need the working directory.
fn inside(path: &Path, root: &Path) -> bool {
    path.is_absolute() == root.is_absolute() && path.starts_with(root)
}

fn overlaps(a: &Path, b: &Path) -> bool {
    inside(a, b) || inside(b, a)
}

/// 1-based line and column (in characters) of a byte offset.
fn position_of(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Best-effort dotted key (`section.key`) for a toml error at `offset`, found
/// from the text because toml's errors carry only a span: the nearest table
/// header above, plus the nearest `key =` at or above the error's line (an
/// element of a multi-line array has its key a few lines up).
fn key_path_at(text: &str, offset: usize) -> Option<String> {
    let line_end = text
        .get(offset..)?
        .find('\n')
        .map_or(text.len(), |i| offset + i);
    let header_name = |header: &str| {
        let name = header.trim_start_matches('[');
        name[..name.find(']').unwrap_or(name.len())]
            .trim()
            .to_owned()
    };
    let mut key = None;
    for line in text[..line_end].lines().rev().map(str::trim) {
        if line.starts_with('[') {
            let section = header_name(line);
            return Some(match key {
                Some(key) => format!("{section}.{key}"),
                None => section,
            });
        }
        if key.is_none() {
            key = line
                .split_once('=')
                .map(|(key, _)| key.trim().to_owned())
                .filter(|key| !key.is_empty());
        }
    }
    key
}

/// How each top-level section must be written, for type errors about the section itself.
fn section_shape(key: &str) -> Option<&'static str> {
    match key {
        "daemon" => Some("must be a table: write a single [daemon] section"),
        "server" => Some("must be a table: write a single [server] section, not [[server]]"),
        "target" => {
            Some("must be an array of tables: write [[target]] (double brackets) for each target")
        }
        "spool" => {
            Some("must be an array of tables: write [[spool]] (double brackets) for each spool")
        }
        _ => None,
    }
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn string_array<S: AsRef<str>>(items: impl Iterator<Item = S>) -> Value {
    Value::Array(
        items
            .map(|s| Value::String(s.as_ref().to_owned()))
            .collect(),
    )
}

/// Writes TOML in the order of the reference file, which a serialised table
/// would not keep.
#[derive(Default)]
struct TomlWriter {
    text: String,
}

impl TomlWriter {
    fn comment(&mut self, comment: &str) {
        self.text.push_str("# ");
        self.text.push_str(comment);
        self.text.push('\n');
    }

    fn section(&mut self, header: &str) {
        self.text.push('\n');
        self.text.push_str(header);
        self.text.push('\n');
    }

    fn value(&mut self, key: &str, value: Value) {
        self.text.push_str(&format!("{key} = {value}\n"));
    }

    fn string(&mut self, key: &str, value: &str) {
        self.value(key, Value::String(value.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: &str = "[[target]]\nname = \"central\"\nurl = \"https://example.org/upload\"\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn messages(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(config) => panic!("expected an error, got {config:#?}"),
            Err(error) => error.messages(),
        }
    }

    /// Asserts that exactly one message is reported and that it contains `expected`.
    fn assert_single_error(text: &str, expected: &str) {
        let messages = messages(text);
        assert_eq!(messages.len(), 1, "expected one message: {messages:#?}");
        assert!(
            messages[0].contains(expected),
            "{:?} does not contain {expected:?}",
            messages[0]
        );
    }

    #[test]
    fn defaults_are_filled_in() {
        let text = format!("{TARGET}[[spool]]\npath = \"/in\"\n[server]\noutput_dir = \"/out\"\n");
        let config = parse(&text).unwrap();

        assert_eq!(config.source, Path::new("test.toml"));
        assert_eq!(config.daemon, DaemonConfig::default());
        assert_eq!(config.daemon.state_dir, Path::new("/var/lib/indexedcp"));
        assert_eq!(config.daemon.log_level, "info");
        assert_eq!(config.daemon.log_format, LogFormat::Auto);
        assert_eq!(config.daemon.check_interval, Duration::from_secs(5));
        assert_eq!(config.daemon.max_buffer_bytes, 10 * 1024 * 1024 * 1024);
        assert_eq!(config.daemon.shutdown_grace, Duration::from_secs(10));

        let target = &config.targets[0];
        assert_eq!(target.name, "central");
        assert_eq!(target.url, "https://example.org/upload");
        assert_eq!(target.api_key, None);
        assert_eq!(target.chunk_size, 1024 * 1024);
        assert_eq!(target.concurrency, 4);
        assert_eq!(target.max_retries, None);
        assert_eq!(target.initial_retry_delay, Duration::from_secs(1));
        assert_eq!(target.max_retry_delay, Duration::from_secs(60));
        assert_eq!(target.retry_multiplier, 2.0);
        assert_eq!(target.timeout, Duration::from_secs(30));
        assert_eq!(
            *target,
            TargetConfig::new("central", "https://example.org/upload")
        );

        let spool = &config.spools[0];
        assert_eq!(spool.path, Path::new("/in"));
        assert_eq!(spool.target, "central", "the only target is the default");
        assert!(spool.recursive);
        assert_eq!(spool.include, ["*"]);
        assert!(spool.exclude.is_empty());
        assert_eq!(spool.settle, Duration::from_secs(2));
        assert_eq!(spool.disposition, Disposition::Delete);
        assert_eq!(spool.remote_prefix, "");

        let server = config.server.as_ref().unwrap();
        assert_eq!(server.listen, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(server.output_dir, Path::new("/out"));
        assert!(server.api_keys.is_empty());
        assert_eq!(server.path_mode, PathMode::Sanitize);
        assert_eq!(server.max_chunk_bytes, 64 * 1024 * 1024);
        assert_eq!(server.max_file_bytes, 0);
        assert_eq!(server.incomplete_expiry, Duration::from_secs(7 * 86_400));
        assert_eq!(server.state_dir, Path::new("/out/.indexedcp"));
        assert_eq!(*server, ServerConfig::new("/out"));
    }

    #[test]
    fn server_only_and_target_only_configs_are_valid() {
        let config = parse("[server]\noutput_dir = \"received\"\nstate_dir = \"\"\n").unwrap();
        assert!(config.targets.is_empty() && config.spools.is_empty());
        let server = config.server.unwrap();
        assert_eq!(server.state_dir, Path::new("received/.indexedcp"));

        let config = parse(TARGET).unwrap();
        assert_eq!(config.targets.len(), 1);
        assert!(config.server.is_none());
    }

    #[test]
    fn durations_and_sizes_accept_strings_and_integers() {
        let text = format!(
            "[daemon]\ncheck_interval = 10\nshutdown_grace = \"250ms\"\nmax_buffer_bytes = 4096\n\
             {TARGET}chunk_size = \"512KiB\"\ntimeout = \"2m\"\nmax_retry_delay = \"1h\"\n\
             [server]\noutput_dir = \"/out\"\nincomplete_expiry = \"7d\"\nmax_chunk_bytes = \"1MB\"\n\
             max_file_bytes = \"10GiB\"\n"
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.daemon.check_interval, Duration::from_secs(10));
        assert_eq!(config.daemon.shutdown_grace, Duration::from_millis(250));
        assert_eq!(config.daemon.max_buffer_bytes, 4096);
        let target = &config.targets[0];
        assert_eq!(target.chunk_size, 512 * 1024);
        assert_eq!(target.timeout, Duration::from_secs(120));
        assert_eq!(target.max_retry_delay, Duration::from_secs(3600));
        let server = config.server.unwrap();
        assert_eq!(server.incomplete_expiry, Duration::from_secs(7 * 86_400));
        assert_eq!(server.max_chunk_bytes, 1_000_000);
        assert_eq!(server.max_file_bytes, 10 << 30);
    }

    #[test]
    fn parse_duration_accepts_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration(" 3 s "), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn parse_duration_rejects_negative_and_garbage() {
        for bad in [
            "",
            "-5s",
            "5x",
            "1.5s",
            "s",
            "five",
            "5 seconds",
            "99999999999999999999d",
        ] {
            let error = parse_duration(bad).unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
        assert!(
            parse_duration("5x")
                .unwrap_err()
                .contains("ms, s, m, h or d")
        );
        assert!(
            parse_duration("999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn parse_size_accepts_binary_and_decimal_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1KB"), Ok(1_000));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("2 mib"), Ok(2 << 20));
    }

    #[test]
    fn parse_size_rejects_negative_and_garbage() {
        for bad in ["", "-1", "1.5MiB", "MiB", "1XB", "lots"] {
            let error = parse_size(bad).unwrap_err();
            assert!(error.contains("KiB, MiB, GiB"), "{error}");
        }
        assert!(parse_size("99999999TiB").unwrap_err().contains("too large"));
    }

    #[test]
    fn formatted_durations_and_sizes_parse_back() {
        for millis in [0, 1, 250, 1000, 1500, 60_000, 90_000, 3_600_000, 86_400_000] {
            let duration = Duration::from_millis(millis);
            assert_eq!(parse_duration(&format_duration(duration)), Ok(duration));
        }
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400)), "7d");
        for bytes in [0, 1, 1000, 1024, 1536, 1 << 20, 10 << 30, 3 << 40] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }
        assert_eq!(format_size(64 << 20), "64MiB");
    }

    #[test]
    fn negative_and_mistyped_durations_are_reported() {
        assert_single_error(
            &format!("[daemon]\ncheck_interval = -3\n{TARGET}"),
            "test.toml:2:18: `daemon.check_interval`: must not be negative",
        );
        assert_single_error(
            &format!("[daemon]\nshutdown_grace = true\n{TARGET}"),
            "test.toml:2:18: `daemon.shutdown_grace`: expected a duration such as \"5s\" or a number of seconds, found boolean",
        );
        assert_single_error(
            &format!("[daemon]\nmax_buffer_bytes = \"lots\"\n{TARGET}"),
            "test.toml:2:20: `daemon.max_buffer_bytes`: invalid size \"lots\"",
        );
    }

    #[test]
    fn unknown_key_reports_line_and_column() {
        let text = format!("{TARGET}\n[daemon]\nstate_dir = \"/x\"\n  bogus = 1\n");
        assert_single_error(
            &text,
            "test.toml:7:3: `daemon.bogus`: unknown field `bogus`, expected one of `state_dir`",
        );
        assert_single_error(
            "colour = \"blue\"\n",
            "test.toml:1:1: `colour`: unknown field `colour`",
        );
        let text = format!("{TARGET}api_token = \"x\"\n");
        assert_single_error(
            &text,
            "test.toml:4:1: `target.api_token`: unknown field `api_token`",
        );
    }

    #[test]
    fn wrong_type_reports_line_and_column() {
        let text = format!("{TARGET}concurrency = \"four\"\n");
        assert_single_error(
            &text,
            "test.toml:4:15: `target.concurrency`: invalid type: string \"four\", expected i64",
        );
        assert_single_error(
            "[server]\noutput_dir = \"/out\"\napi_keys = \"k\"\n",
            "test.toml:3:12: `server.api_keys`: invalid type: string \"k\", expected a sequence",
        );
    }

    #[test]
    fn error_inside_multi_line_array_names_its_key() {
        let text =
            format!("{TARGET}[[spool]]\npath = \"/in\"\ninclude = [\n  \"*.dat\",\n  3,\n]\n");
        assert_single_error(
            &text,
            "test.toml:8:3: `spool.include`: invalid type: integer `3`, expected a string",
        );
    }

    #[test]
    fn sections_of_the_wrong_shape_say_how_to_write_them() {
        assert_single_error(
            "[target]\nname = \"x\"\n",
            "test.toml:1:1: `target`: must be an array of tables: write [[target]]",
        );
        assert_single_error(
            "[[server]]\noutput_dir = \"/x\"\n",
            "test.toml:1:1: `server`: must be a table: write a single [server] section",
        );
        assert_single_error("daemon = 3\n", "test.toml:1:10: `daemon`: must be a table");
    }

    #[test]
    fn toml_syntax_error_reports_line() {
        let messages = messages("[daemon]\nstate_dir = \"/x\nlog_level = \"info\"\n");
        assert_eq!(messages.len(), 1);
        assert!(messages[0].starts_with("test.toml:2:"), "{messages:?}");
    }

    #[test]
    fn spool_naming_unknown_target_is_reported() {
        let text = format!("{TARGET}[[spool]]\npath = \"/in\"\ntarget = \"centrl\"\n");
        assert_single_error(
            &text,
            "test.toml:6:10: `spool.target`: no [[target]] named \"centrl\"; use one of \"central\"",
        );
    }

    #[test]
    fn spool_needs_a_target() {
        assert_single_error(
            "[[spool]]\npath = \"/in\"\n",
            "test.toml:1:1: `spool.target`: a spool needs a target but no [[target]] is defined",
        );
        let two = format!("{TARGET}[[target]]\nname = \"b\"\nurl = \"http://b/upload\"\n");
        let text = format!("{two}[[spool]]\npath = \"/in\"\n");
        assert_single_error(
            &text,
            "test.toml:7:1: `spool.target`: missing; set target to one of \"central\", \"b\"",
        );
    }

    #[test]
    fn duplicate_target_names_are_reported() {
        let text = format!("{TARGET}\n{TARGET}");
        assert_single_error(
            &text,
            "test.toml:6:8: `target.name`: a target named \"central\" is already defined at line 2",
        );
    }

    #[test]
    fn missing_target_name_and_url_are_reported_at_the_header() {
        let messages = messages("[daemon]\n\n[[target]]\nconcurrency = 2\n");
        assert_eq!(messages.len(), 2, "{messages:#?}");
        assert!(messages[0].starts_with("test.toml:3:1: `target.name`: missing;"));
        assert!(messages[1].starts_with("test.toml:3:1: `target.url`: missing;"));
    }

    #[test]
    fn overlapping_spools_are_reported() {
        let same = format!(
            "{TARGET}[[spool]]\npath = \"/data/in/\"\n[[spool]]\npath = \"/data/./x/../in\"\n"
        );
        assert_single_error(
            &same,
            "test.toml:7:8: `spool.path`: /data/./x/../in is the same directory as the spool /data/in/ at line 5",
        );
        let nested =
            format!("{TARGET}[[spool]]\npath = \"spool\"\n[[spool]]\npath = \"./spool/sub\"\n");
        assert_single_error(
            &nested,
            "test.toml:7:8: `spool.path`: ./spool/sub is inside the spool spool at line 5",
        );
        let containing = format!("{TARGET}[[spool]]\npath = \"/a/b\"\n[[spool]]\npath = \"/a\"\n");
        assert_single_error(
            &containing,
            "test.toml:7:8: `spool.path`: /a contains the spool /a/b at line 5",
        );
        let siblings = format!("{TARGET}[[spool]]\npath = \"/a/b\"\n[[spool]]\npath = \"/a/bc\"\n");
        assert!(parse(&siblings).is_ok());
    }

    #[test]
    fn move_to_is_checked() {
        let spool = format!("{TARGET}[[spool]]\npath = \"/in\"\n");
        assert_single_error(
            &format!("{spool}disposition = \"move\"\n"),
            "test.toml:6:15: `spool.move_to`: missing; disposition \"move\" needs move_to",
        );
        assert_single_error(
            &format!("{spool}disposition = \"move\"\nmove_to = \"/in/done\"\n"),
            "test.toml:7:11: `spool.move_to`: /in/done is inside its own spool (/in)",
        );
        assert_single_error(
            &format!("{spool}move_to = \"/done\"\n"),
            "test.toml:6:11: `spool.move_to`: only used with disposition = \"move\" but disposition is \"delete\"",
        );
        assert_single_error(
            &format!("{spool}disposition = \"archive\"\n"),
            "test.toml:6:15: `spool.disposition`: unknown disposition \"archive\"",
        );
        let config = parse(&format!(
            "{spool}disposition = \"move\"\nmove_to = \"/done\"\n"
        ))
        .unwrap();
        assert_eq!(
            config.spools[0].disposition,
            Disposition::Move {
                to: PathBuf::from("/done")
            }
        );
        let keep = parse(&format!("{spool}disposition = \"keep\"\n")).unwrap();
        assert_eq!(keep.spools[0].disposition, Disposition::Keep);
    }

    #[test]
    fn move_to_inside_another_spool_is_reported() {
        let text = format!(
            "{TARGET}[[spool]]\npath = \"/a\"\ndisposition = \"move\"\nmove_to = \"/b/done\"\n\
             [[spool]]\npath = \"/b\"\n"
        );
        assert_single_error(
            &text,
            "test.toml:7:11: `spool.move_to`: /b/done is inside the spool at line 9 (/b)",
        );
    }

    #[test]
    fn retry_settings_are_checked() {
        let text = format!("{TARGET}initial_retry_delay = \"2m\"\nmax_retry_delay = \"1m\"\n");
        assert_single_error(
            &text,
            "test.toml:4:23: `target.initial_retry_delay`: 2m is longer than max_retry_delay (1m)",
        );
        let text = format!("{TARGET}max_retry_delay = \"500ms\"\n");
        assert_single_error(
            &text,
            "test.toml:4:19: `target.initial_retry_delay`: 1s is longer than max_retry_delay (500ms)",
        );
        for (multiplier, shown) in [("0.5", "0.5"), ("inf", "inf"), ("nan", "NaN")] {
            let text = format!("{TARGET}retry_multiplier = {multiplier}\n");
            assert_single_error(
                &text,
                &format!(
                    "test.toml:4:20: `target.retry_multiplier`: must be a finite number of at least 1.0 (each retry waits this many times longer than the last), not {shown}"
                ),
            );
        }
        let config = parse(&format!("{TARGET}retry_multiplier = 1\nmax_retries = 0\n")).unwrap();
        assert_eq!(config.targets[0].retry_multiplier, 1.0);
        assert_eq!(config.targets[0].max_retries, Some(0));
        assert_single_error(
            &format!("{TARGET}max_retries = \"forever\"\n"),
            "test.toml:4:15: `target.max_retries`: invalid value \"forever\": use \"infinite\" or a number",
        );
        assert_single_error(
            &format!("{TARGET}max_retries = -1\n"),
            "test.toml:4:15: `target.max_retries`: -1 is out of range",
        );
    }

    #[test]
    fn zero_values_are_reported() {
        assert_single_error(
            &format!("{TARGET}chunk_size = 0\n"),
            "test.toml:4:14: `target.chunk_size`: must be greater than 0",
        );
        assert_single_error(
            &format!("{TARGET}concurrency = 0\n"),
            "test.toml:4:15: `target.concurrency`: must be at least 1",
        );
        assert_single_error(
            &format!("[daemon]\ncheck_interval = \"0s\"\n{TARGET}"),
            "test.toml:2:18: `daemon.check_interval`: must be greater than 0",
        );
        assert_single_error(
            "[server]\noutput_dir = \"/out\"\nmax_chunk_bytes = \"0\"\n",
            "test.toml:3:19: `server.max_chunk_bytes`: must be greater than 0",
        );
    }

    #[test]
    fn target_url_must_be_http() {
        for url in ["ftp://example.org/upload", "example.org/upload", ""] {
            let text = format!("[[target]]\nname = \"t\"\nurl = \"{url}\"\n");
            assert_single_error(
                &text,
                &format!(
                    "test.toml:3:7: `target.url`: \"{url}\" is not an HTTP URL; use http:// or https://"
                ),
            );
        }
        assert_single_error(
            "[[target]]\nname = \"t\"\nurl = \"https:///upload\"\n",
            "test.toml:3:7: `target.url`: \"https:///upload\" has no host",
        );
        assert!(parse("[[target]]\nname = \"t\"\nurl = \"HTTP://10.0.0.1:3000\"\n").is_ok());
    }

    #[test]
    fn invalid_globs_are_reported() {
        let text = format!(
            "{TARGET}[[spool]]\npath = \"/in\"\ninclude = [\"*.dat\", \"[a\"]\nexclude = [\"{{x\"]\n"
        );
        let messages = messages(&text);
        assert_eq!(messages.len(), 2, "{messages:#?}");
        assert!(
            messages[0].starts_with("test.toml:6:21: `spool.include`: error parsing glob '[a'"),
            "{messages:#?}"
        );
        assert!(
            messages[1].starts_with("test.toml:7:12: `spool.exclude`: error parsing glob '{x'")
        );
        assert_single_error(
            &format!("{TARGET}[[spool]]\npath = \"/in\"\ninclude = []\n"),
            "test.toml:6:11: `spool.include`: is empty, so no file would ever be sent",
        );
    }

    #[test]
    fn server_settings_are_checked() {
        assert_single_error(
            "[server]\noutput_dir = \"\"\n",
            "test.toml:2:14: `server.output_dir`: must not be empty",
        );
        assert_single_error(
            "[server]\nlisten = \"127.0.0.1:3000\"\n",
            "test.toml:1:1: `server.output_dir`: missing; set output_dir",
        );
        assert_single_error(
            "[server]\noutput_dir = \"/out\"\nlisten = \"localhost:3000\"\n",
            "test.toml:3:10: `server.listen`: invalid address \"localhost:3000\"",
        );
        assert_single_error(
            "[server]\noutput_dir = \"/out\"\npath_mode = \"paths\"\n",
            "test.toml:3:13: `server.path_mode`: unknown path mode \"paths\": use \"sanitize\", \"ignore\" or \"allow-paths\"",
        );
        let config =
            parse("[server]\noutput_dir = \"/out\"\nlisten = \"[::]:8080\"\npath_mode = \"allow-paths\"\n")
                .unwrap();
        let server = config.server.unwrap();
        assert_eq!(server.listen, "[::]:8080".parse().unwrap());
        assert_eq!(server.path_mode, PathMode::AllowPaths);
    }

    #[test]
    fn log_level_is_checked() {
        for level in [
            "trace",
            "fatal",
            "indexedcp=debug,info",
            "indexedcp::upload=trace,warn",
        ] {
            let text = format!("[daemon]\nlog_level = \"{level}\"\n{TARGET}");
            assert_eq!(parse(&text).unwrap().daemon.log_level, level);
        }
        assert_single_error(
            &format!("[daemon]\nlog_level = \"info debug\"\n{TARGET}"),
            "test.toml:2:13: `daemon.log_level`: invalid log level \"info debug\": use trace, debug, info, warn, error",
        );
        assert_single_error(
            &format!("[daemon]\nlog_format = \"xml\"\n{TARGET}"),
            "test.toml:2:14: `daemon.log_format`: unknown log format \"xml\"",
        );
    }

    #[test]
    fn remote_prefix_must_stay_relative() {
        let spool = format!("{TARGET}[[spool]]\npath = \"/in\"\n");
        for prefix in ["/abs", "../up", "a/../../b"] {
            assert_single_error(
                &format!("{spool}remote_prefix = \"{prefix}\"\n"),
                "test.toml:6:17: `spool.remote_prefix`",
            );
        }
        let config = parse(&format!("{spool}remote_prefix = \"site-a/\"\n")).unwrap();
        assert_eq!(config.spools[0].remote_prefix, "site-a/");
    }

    #[test]
    fn empty_config_has_nothing_to_do() {
        assert_single_error("", "test.toml: nothing to do: enable at least one role");
        assert_single_error(
            "[daemon]\nlog_level = \"debug\"\n",
            "test.toml: nothing to do: enable at least one role",
        );
    }

    #[test]
    fn all_problems_are_reported_in_file_order() {
        let text = "[daemon]\ncheck_interval = 0\n\n[[target]]\nname = \"t\"\nurl = \"ftp://x\"\n\
                    chunk_size = 0\n\n[[spool]]\npath = \"/in\"\ntarget = \"nope\"\n";
        let error = parse(text).unwrap_err();
        let messages = error.messages();
        let lines: Vec<&str> = messages
            .iter()
            .map(|message| message.split(':').nth(1).unwrap())
            .collect();
        assert_eq!(lines, ["2", "6", "7", "11"], "{error}");
        assert_eq!(error.to_string().lines().count(), 4);
    }

    #[test]
    fn api_key_and_api_key_file_are_exclusive() {
        let text = format!("{TARGET}api_key = \"k\"\napi_key_file = \"/k\"\n");
        assert_single_error(
            &text,
            "test.toml:5:16: `target.api_key_file`: api_key is set too; set either api_key or api_key_file, not both",
        );
        let text = "[server]\noutput_dir = \"/o\"\napi_keys = [\"a\"]\napi_keys_file = \"/k\"\n";
        assert_single_error(
            text,
            "test.toml:4:17: `server.api_keys_file`: api_keys is set too; set either api_keys or api_keys_file",
        );
    }

    #[test]
    fn api_keys_must_be_header_safe() {
        assert_single_error(
            &format!("{TARGET}api_key = \"\"\n"),
            "test.toml:4:11: `target.api_key`: is empty",
        );
        assert_single_error(
            "[server]\noutput_dir = \"/o\"\napi_keys = [\"good\", \"has space\"]\n",
            "test.toml:3:21: `server.api_keys`: contains spaces or characters not allowed",
        );
    }

    #[test]
    fn api_key_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("central.key");
        fs::write(&key_path, "  s3cret-key \n\n").unwrap();
        let text = format!("{TARGET}api_key_file = \"{}\"\n", key_path.display());
        let config = parse(&text).unwrap();
        assert_eq!(config.targets[0].api_key.as_deref(), Some("s3cret-key"));

        // A relative key file is read next to the configuration file.
        let source = dir.path().join("indexedcp.toml");
        let text = format!("{TARGET}api_key_file = \"central.key\"\n");
        let config = Config::parse(&text, &source).unwrap();
        assert_eq!(config.targets[0].api_key.as_deref(), Some("s3cret-key"));

        fs::write(&key_path, "\n \n").unwrap();
        let message = Config::parse(&text, &source).unwrap_err().to_string();
        assert!(
            message.contains("`target.api_key_file`:") && message.contains("is empty"),
            "{message}"
        );
    }

    #[test]
    fn unreadable_api_key_file_names_key_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.key");
        let text = format!("{TARGET}api_key_file = \"{}\"\n", missing.display());
        assert_single_error(
            &text,
            &format!(
                "test.toml:4:16: `target.api_key_file`: cannot read {}: ",
                missing.display()
            ),
        );
    }

    #[test]
    fn api_keys_file_skips_blank_lines_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let keys_path = dir.path().join("server.keys");
        fs::write(
            &keys_path,
            "# agents\nkey-one\n\n  key-two  \n   # retired: key-zero\n",
        )
        .unwrap();
        let text = format!(
            "[server]\noutput_dir = \"/o\"\napi_keys_file = \"{}\"\n",
            keys_path.display()
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.server.unwrap().api_keys, ["key-one", "key-two"]);

        fs::write(&keys_path, "# nothing yet\n").unwrap();
        assert_single_error(&text, "`server.api_keys_file`: ");
        assert!(messages(&text)[0].contains("holds no keys"));
    }

    #[test]
    fn effective_toml_redacts_keys_and_parses_back() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b.key"), "from-file\n").unwrap();
        let source = dir.path().join("indexedcp.toml");
        let text = "[daemon]\nstate_dir = \"state\"\nlog_level = \"indexedcp=debug,info\"\n\
                    log_format = \"json\"\ncheck_interval = \"1500ms\"\nmax_buffer_bytes = 12345\n\
                    [[target]]\nname = \"a\"\nurl = \"http://a/upload\"\napi_key = \"inline-secret\"\n\
                    max_retries = 7\nretry_multiplier = 1.5\n\
                    [[target]]\nname = \"b\"\nurl = \"https://b/upload\"\napi_key_file = \"b.key\"\n\
                    [[target]]\nname = \"c\"\nurl = \"https://c/upload\"\n\
                    [[spool]]\npath = \"in\"\ntarget = \"b\"\nrecursive = false\n\
                    include = [\"*.dat\", \"*.csv\"]\nexclude = [\"skip-*\"]\ndisposition = \"move\"\n\
                    move_to = \"done\"\nremote_prefix = \"site-a/\"\n\
                    [server]\noutput_dir = \"out\"\napi_keys = [\"k1\", \"k2\"]\nmax_file_bytes = \"1GB\"\n";
        let config = Config::parse(text, &source).unwrap();
        let effective = config.to_effective_toml();

        for secret in ["inline-secret", "from-file", "\"k1\"", "\"k2\""] {
            assert!(!effective.contains(secret), "{secret} leaked:\n{effective}");
        }
        assert!(
            effective.contains("api_keys = [\"<redacted>\", \"<redacted>\"]"),
            "{effective}"
        );
        assert!(
            effective.contains("state_dir = \"out/.indexedcp\""),
            "{effective}"
        );

        let reparsed = Config::parse(&effective, &source).unwrap();
        let mut expected = config.clone();
        for target in &mut expected.targets {
            if target.api_key.is_some() {
                target.api_key = Some(REDACTED.to_owned());
            }
        }
        let server = expected.server.as_mut().unwrap();
        server.api_keys = vec![REDACTED.to_owned(); 2];
        assert_eq!(reparsed, expected);
        assert_eq!(reparsed.to_effective_toml(), effective);
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config"));
        let mut n_parsed = 0;
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                let config = Config::load(&path).unwrap_or_else(|error| panic!("{error}"));
                // The effective form of every example must be valid too.
                Config::parse(&config.to_effective_toml(), &path).unwrap();
                n_parsed += 1;
            }
        }
        assert!(
            n_parsed >= 2,
            "expected indexedcp.toml and quickstart.toml in {}",
            dir.display()
        );
    }

    #[test]
    fn reference_config_shows_the_defaults() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/indexedcp.toml"
        ));
        let config = Config::load(path).unwrap();
        assert_eq!(config.daemon, DaemonConfig::default());
        let target = &config.targets[0];
        assert_eq!(
            *target,
            TargetConfig::new("central", "https://upload.example.org/upload")
        );
        assert_eq!(config.server, Some(ServerConfig::new("/srv/indexedcp")));
    }

    #[test]
    fn quickstart_runs_both_roles_locally() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/quickstart.toml"
        ));
        let config = Config::load(path).unwrap();
        assert_eq!(config.spools[0].path, Path::new("./spool"));
        assert_eq!(config.spools[0].settle, Duration::from_millis(500));
        let server = config.server.unwrap();
        assert_eq!(server.path_mode, PathMode::AllowPaths);
        assert_eq!(server.api_keys, ["quickstart-key"]);
        assert_eq!(config.targets[0].api_key.as_deref(), Some("quickstart-key"));
    }

    #[test]
    fn load_reports_unreadable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let error = Config::load(&path).unwrap_err();
        assert!(matches!(error, ConfigError::Read { .. }));
        assert_eq!(error.messages(), [error.to_string()]);
        assert!(
            error
                .to_string()
                .starts_with(&format!("cannot read {}: ", path.display())),
            "{error}"
        );
    }

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

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(normalize(Path::new("/a/./b/../c/")), Path::new("/a/c"));
        assert_eq!(normalize(Path::new("/../a")), Path::new("/a"));
        assert_eq!(normalize(Path::new("./a/..")), Path::new(""));
        assert_eq!(normalize(Path::new("../a")), Path::new("../a"));
        assert!(overlaps(
            &normalize(Path::new(".")),
            &normalize(Path::new("x/y"))
        ));
        assert!(!overlaps(Path::new("/x"), Path::new("x")));
    }
}
