//! The checker: turns the raw file into a [`Config`], validating every value
//! and every relation between sections (unique target names, spools naming a
//! defined target, spools that do not overlap, a `move_to` outside every
//! spool). It collects problems instead of stopping at the first, so that an
//! operator fixes a broken file in one pass; an invalid value is replaced by
//! its default so that the checks after it still run. It does not bind ports,
//! create directories or know about tasks: relative paths stay relative, and
//! the only files it reads are the configuration itself and the API key files
//! it names.

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::defaults;
use super::diagnostics::{ConfigError, Problem, position_of, toml_problem};
use super::raw::{Field, RawConfig, RawDaemon, RawServer, RawSpool, RawTarget};
use super::s3::{RawKindKeys, TargetKind, check_target_url, is_s3_kind};
use super::tls::{RawServerTls, RawTargetTls};
use super::types::{Config, DaemonConfig, Disposition, ServerConfig, SpoolConfig, TargetConfig};
use super::units::format_duration;
use super::values::{
    check_api_key, check_log_level, check_remote_prefix, duration_value, inside, max_retries_value,
    non_empty_path, normalize, overlaps, parse_key_list, positive_duration, positive_size,
    read_key_file, resolve_key_file, size_value,
};

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
        let raw: RawConfig = toml::from_str(text)
            .map_err(|error| ConfigError::Invalid(vec![toml_problem(text, source, &error)]))?;
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
}

/// Where a validated spool came from, for the checks that compare spools.
struct SpoolSpans {
    path: Range<usize>,
    move_to: Option<Range<usize>>,
}

/// Validates raw sections into the public types, collecting problems instead
/// of stopping at the first; an invalid value is replaced by its default so
/// that the checks after it still run.
pub(super) struct Checker<'a> {
    text: &'a str,
    pub(super) source: &'a Path,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    pub(super) fn problem(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
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
    pub(super) fn field<R, T>(
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
            on_buffer_corrupt: self.field(
                raw.on_buffer_corrupt,
                "daemon.on_buffer_corrupt",
                defaults.on_buffer_corrupt,
                |action| action.parse(),
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
        // An unknown kind is reported once; the URL is then checked against
        // every kind, so that it is not reported for the wrong one.
        let kind_written = raw.kind.is_some();
        let is_tus = raw
            .kind
            .as_ref()
            .is_some_and(|kind| kind.get_ref() == "tus");
        let is_s3 = self.field(raw.kind, "target.kind", None, |kind| {
            is_s3_kind(kind).map(Some)
        });
        let is_s3 = if kind_written { is_s3 } else { Some(false) };
        let url = self
            .required(
                raw.url,
                &section,
                "target.url",
                "set url = \"https://host/upload\" (the receiver's upload endpoint)",
                |url| check_target_url(url, is_s3).map(|()| url.clone()),
            )
            .unwrap_or_default();
        let api_key_span = raw.api_key.as_ref().map(Spanned::span);
        let api_key_written = api_key_span
            .clone()
            .or(raw.api_key_file.as_ref().map(Spanned::span));
        let api_key = self.check_target_api_key(raw.api_key, raw.api_key_file);
        let kind_keys = RawKindKeys {
            endpoint: raw.endpoint,
            region: raw.region,
            access_key_id: raw.access_key_id,
            secret_access_key_file: raw.secret_access_key_file,
            part_size: raw.part_size,
            on_conflict: raw.on_conflict,
        };
        let kind = self.check_target_kind(is_s3 == Some(true), &url, api_key_span, kind_keys);
        let kind = if is_tus { TargetKind::Tus } else { kind };
        let headers = self.check_target_headers(raw.headers, &kind, api_key_written);
        let tls = RawTargetTls {
            ca_file: raw.ca_file,
            client_cert: raw.client_cert,
            client_key: raw.client_key,
        };
        let tls = self.check_target_tls(&section, &url, tls);

        let initial_span = raw.initial_retry_delay.as_ref().map(Spanned::span);
        let max_span = raw.max_retry_delay.as_ref().map(Spanned::span);
        let target = TargetConfig {
            tls,
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
            kind,
            headers,
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
        let defaults = SpoolConfig::new("", "");

        let spool = SpoolConfig {
            path,
            target,
            recursive: self.field(raw.recursive, "spool.recursive", defaults.recursive, |&r| {
                Ok(r)
            }),
            include: self.check_include(raw.include, defaults.include),
            exclude: self.check_globs(raw.exclude, "spool.exclude", defaults.exclude),
            settle: self.field(raw.settle, "spool.settle", defaults.settle, duration_value),
            disposition,
            remote_prefix: self.field(
                raw.remote_prefix,
                "spool.remote_prefix",
                defaults.remote_prefix,
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
        let kind = self.field(disposition, "spool.disposition", defaults::DISPOSITION.as_str(), |d| {
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

    fn check_include(
        &mut self,
        include: Field<Vec<Spanned<String>>>,
        default: Vec<String>,
    ) -> Vec<String> {
        if let Some(include) = include.as_ref().filter(|list| list.get_ref().is_empty()) {
            self.problem(
                include.span(),
                "spool.include",
                "is empty, so no file would ever be sent; use [\"*\"] for every file",
            );
        }
        self.check_globs(include, "spool.include", default)
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
        let tls = RawServerTls {
            tls_cert: raw.tls_cert,
            tls_key: raw.tls_key,
            tls_client_ca: raw.tls_client_ca,
        };
        let tls = self.check_server_tls(&section, tls);
        let client_ca = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        let clients = self.check_clients(raw.client, client_ca);
        let output_layout = self.check_output_layout(raw.output_layout);
        ServerConfig {
            tls,
            clients,
            output_layout,
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
            max_connections: self.field(
                raw.max_connections,
                "server.max_connections",
                defaults.max_connections,
                |&n| match usize::try_from(n) {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!(
                        "must be at least 1 (connections served at once), not {n}; use e.g. 400"
                    )),
                },
            ),
            tus_path: self.field(raw.tus_path, "server.tus_path", defaults.tus_path, |path| {
                super::values::check_tus_path(path)
            }),
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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;
    use crate::config::testing::{TARGET, assert_single_error, messages, parse};
    use crate::config::{LogFormat, PathMode};

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
}
