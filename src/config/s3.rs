//! The settings of an object storage target (`kind = "s3"`): the bucket URL,
//! the endpoint of an S3-compatible service, credentials, the part size of
//! multipart uploads and what to do when another object already holds a
//! file's key. The checker's part that validates them lives here too, so
//! that each key's problems name the key and what to write instead. Only the
//! secret key file is read; nothing here talks to the store.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;

use toml::Value;

use super::check::Checker;
use super::defaults;
use super::raw::Field;
use super::units::format_size;
use super::values::{check_api_key, check_url, read_key_file, resolve_key_file, size_value};

/// How a target's files reach it.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetKind {
    /// This project's receiver protocol, at an `http://` or `https://` URL.
    IndexedCp,
    /// An S3 or S3-compatible bucket, written to directly.
    S3(S3Target),
    /// A server speaking tus 1.0.0 (the open resumable-upload protocol), at
    /// its creation URL (`http://` or `https://`).
    Tus,
}

impl TargetKind {
    /// The kind's name, as the config spells it.
    pub fn name(&self) -> &'static str {
        match self {
            TargetKind::IndexedCp => "indexedcp",
            TargetKind::S3(_) => "s3",
            TargetKind::Tus => "tus",
        }
    }
}

/// A bucket and how to reach it.
#[derive(Debug, Clone, PartialEq)]
pub struct S3Target {
    /// From `url = "s3://BUCKET/prefix/"`.
    pub bucket: String,
    /// From the URL: empty, or ending with `/`. Object keys are the prefix
    /// followed by the file's remote name.
    pub prefix: String,
    /// An S3-compatible service (path-style requests); `None` for AWS.
    pub endpoint: Option<String>,
    /// `None`: `AWS_REGION`, else [`defaults::S3_REGION`].
    pub region: Option<String>,
    /// `None`: `AWS_ACCESS_KEY_ID`, else the standard AWS credential chain.
    pub access_key_id: Option<String>,
    /// The key read from `secret_access_key_file`; `None`:
    /// `AWS_SECRET_ACCESS_KEY`, else the standard AWS credential chain.
    pub secret_access_key: Option<String>,
    /// Where the secret key was read from, as written.
    pub secret_access_key_file: Option<PathBuf>,
    /// Files up to this size go as one PUT; larger ones as parts this large.
    pub part_size: u64,
    /// What to do when another object with other bytes holds a file's key.
    pub on_conflict: OnConflict,
}

impl S3Target {
    /// A target for `url` (`s3://BUCKET/prefix/`) with every optional key at
    /// its default, as the one-shot command uses.
    pub fn new(url: &str) -> Result<S3Target, String> {
        let (bucket, prefix) = parse_s3_url(url)?;
        Ok(S3Target::at(bucket, prefix))
    }

    fn at(bucket: String, prefix: String) -> S3Target {
        S3Target {
            bucket,
            prefix,
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            secret_access_key_file: None,
            part_size: defaults::PART_SIZE,
            on_conflict: defaults::ON_CONFLICT,
        }
    }
}

/// What happens when another object with other bytes already holds a file's
/// key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnConflict {
    /// The file goes to `name_<millis>.ext` instead, as the receiver's
    /// sanitize mode does.
    Rename,
    /// The file is parked as failed; the object stays.
    Fail,
    /// The file replaces the object.
    Overwrite,
}

impl OnConflict {
    /// The value as the configuration file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rename => "rename",
            Self::Fail => "fail",
            Self::Overwrite => "overwrite",
        }
    }
}

impl FromStr for OnConflict {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rename" => Ok(Self::Rename),
            "fail" => Ok(Self::Fail),
            "overwrite" => Ok(Self::Overwrite),
            _ => Err(format!(
                "unknown value {s:?}: use \"rename\", \"fail\" or \"overwrite\""
            )),
        }
    }
}

impl fmt::Display for OnConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Splits `s3://BUCKET/optional/prefix/` into the bucket and the prefix.
pub fn parse_s3_url(url: &str) -> Result<(String, String), String> {
    let example = "use e.g. \"s3://my-bucket/incoming/\"";
    let Some(rest) = url.strip_prefix("s3://") else {
        return Err(format!("{url:?} is not an s3:// URL; {example}"));
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !bucket_ok {
        return Err(format!(
            "{url:?}: {bucket:?} is not a valid bucket name (3 to 63 lower-case letters, digits, \
             '-' and '.', starting and ending with a letter or digit); {example}"
        ));
    }
    if !prefix.is_empty() && !prefix.ends_with('/') {
        return Err(format!(
            "{url:?}: the prefix {prefix:?} must end with \"/\" (keys are the prefix followed by \
             the file's name); {example}"
        ));
    }
    if prefix
        .split('/')
        .any(|segment| segment == "." || segment == "..")
        || prefix.contains("//")
        || prefix.chars().any(|c| c.is_control() || c == '\\')
    {
        return Err(format!(
            "{url:?}: the prefix {prefix:?} has an empty, \".\" or \"..\" segment or a control \
             character; {example}"
        ));
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

/// A target's kind-specific keys as written.
pub(super) struct RawKindKeys {
    pub(super) endpoint: Field<String>,
    pub(super) region: Field<String>,
    pub(super) access_key_id: Field<String>,
    pub(super) secret_access_key_file: Field<String>,
    pub(super) part_size: Field<Value>,
    pub(super) on_conflict: Field<String>,
}

impl RawKindKeys {
    /// The keys that are set, with where they were written.
    fn present(&self) -> Vec<(&'static str, Range<usize>)> {
        let mut present = Vec::new();
        let mut note = |key, span: Option<Range<usize>>| {
            if let Some(span) = span {
                present.push((key, span));
            }
        };
        note("endpoint", self.endpoint.as_ref().map(|f| f.span()));
        note("region", self.region.as_ref().map(|f| f.span()));
        note(
            "access_key_id",
            self.access_key_id.as_ref().map(|f| f.span()),
        );
        note(
            "secret_access_key_file",
            self.secret_access_key_file.as_ref().map(|f| f.span()),
        );
        note("part_size", self.part_size.as_ref().map(|f| f.span()));
        note("on_conflict", self.on_conflict.as_ref().map(|f| f.span()));
        present
    }
}

/// Whether `kind` names object storage; an error for an unknown kind.
pub(super) fn is_s3_kind(kind: &str) -> Result<bool, String> {
    match kind {
        "indexedcp" => Ok(false),
        "s3" => Ok(true),
        "tus" => Ok(false),
        _ => Err(format!(
            "unknown kind {kind:?}: use \"indexedcp\", \"s3\" or \"tus\""
        )),
    }
}

/// Checks a target's URL for its kind (`None`: an unknown kind, reported
/// already, so any kind's URL passes).
pub(super) fn check_target_url(url: &str, is_s3: Option<bool>) -> Result<(), String> {
    match is_s3 {
        Some(true) => parse_s3_url(url).map(|_| ()),
        Some(false) => check_url(url),
        None => parse_s3_url(url).map(|_| ()).or_else(|_| check_url(url)),
    }
}

impl Checker<'_> {
    /// Validates the keys of the target's kind; reports keys of another kind.
    pub(super) fn check_target_kind(
        &mut self,
        is_s3: bool,
        url: &str,
        api_key: Option<Range<usize>>,
        raw: RawKindKeys,
    ) -> TargetKind {
        if !is_s3 {
            for (key, span) in raw.present() {
                self.problem(
                    span,
                    &format!("target.{key}"),
                    "is a key of object storage targets; add kind = \"s3\" or remove it",
                );
            }
            return TargetKind::IndexedCp;
        }
        if let Some(span) = api_key {
            self.problem(
                span,
                "target.api_key",
                "an s3 target signs its requests with access_key_id and secret_access_key_file; \
                 remove api_key",
            );
        }
        // A bad URL was reported already; its checks need not run twice.
        let (bucket, prefix) = parse_s3_url(url).unwrap_or_default();
        let mut target = S3Target::at(bucket, prefix);
        target.endpoint = self.field(raw.endpoint, "target.endpoint", None, |endpoint| {
            check_url(endpoint)
                .map(|()| Some(endpoint.trim_end_matches('/').to_owned()))
                .map_err(|message| {
                    format!("{message}; the S3-compatible service's address, e.g. \"http://127.0.0.1:9000\"")
                })
        });
        target.region = self.field(raw.region, "target.region", None, |region| {
            if !region.is_empty()
                && region
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                Ok(Some(region.clone()))
            } else {
                Err(format!(
                    "invalid region {region:?}: use e.g. \"{}\"",
                    defaults::S3_REGION
                ))
            }
        });
        target.access_key_id = self.field(raw.access_key_id, "target.access_key_id", None, |key| {
            check_api_key(key).map(|()| Some(key.clone()))
        });
        if let Some(file) = raw.secret_access_key_file {
            let source = self.source;
            let written = PathBuf::from(file.get_ref());
            target.secret_access_key =
                self.field(Some(file), "target.secret_access_key_file", None, |file| {
                    let path = resolve_key_file(source, file);
                    let text = read_key_file(&path)?;
                    let key = text.trim();
                    if key.is_empty() || key.lines().count() > 1 {
                        return Err(format!(
                            "{} must hold just the secret access key, on one line",
                            path.display()
                        ));
                    }
                    check_api_key(key)
                        .map(|()| Some(key.to_owned()))
                        .map_err(|message| format!("the key in {}: {message}", path.display()))
                });
            target.secret_access_key_file = Some(written);
        }
        target.part_size = self.field(
            raw.part_size,
            "target.part_size",
            defaults::PART_SIZE,
            |value| {
                let size = size_value(value)?;
                if (defaults::MIN_PART_SIZE..=defaults::MAX_PART_SIZE).contains(&size) {
                    Ok(size)
                } else {
                    Err(format!(
                        "{} is out of range: object storage takes parts of {} to {}; use e.g. \"{}\"",
                        format_size(size),
                        format_size(defaults::MIN_PART_SIZE),
                        format_size(defaults::MAX_PART_SIZE),
                        format_size(defaults::PART_SIZE)
                    ))
                }
            },
        );
        target.on_conflict = self.field(
            raw.on_conflict,
            "target.on_conflict",
            defaults::ON_CONFLICT,
            |value| value.parse(),
        );
        TargetKind::S3(target)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::config::testing::{assert_single_error, messages, parse};

    const S3: &str = "[[target]]\nname = \"archive\"\nkind = \"s3\"\nurl = \"s3://bucket-1/in/\"\n";

    fn s3_target(text: &str) -> S3Target {
        match &parse(text).unwrap().targets[0].kind {
            TargetKind::S3(target) => target.clone(),
            other => panic!("not an s3 target: {other:?}"),
        }
    }

    #[test]
    fn s3_defaults_are_filled_in() {
        let target = s3_target(S3);
        assert_eq!(target, S3Target::new("s3://bucket-1/in/").unwrap());
        assert_eq!(
            (target.bucket.as_str(), target.prefix.as_str()),
            ("bucket-1", "in/")
        );
        assert_eq!(target.part_size, 8 << 20);
        assert_eq!(target.on_conflict, OnConflict::Rename);
        assert_eq!((target.endpoint, target.region), (None, None));
        let target = s3_target(&S3.replace("/in/", ""));
        assert_eq!(target.prefix, "");
    }

    #[test]
    fn s3_keys_are_read() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("s3.secret"), " the-secret \n").unwrap();
        let source = dir.path().join("indexedcp.toml");
        let text = format!(
            "{S3}endpoint = \"http://127.0.0.1:9000/\"\nregion = \"eu-west-1\"\n\
             access_key_id = \"AKID\"\nsecret_access_key_file = \"s3.secret\"\n\
             part_size = \"5MiB\"\non_conflict = \"fail\"\n"
        );
        let config = crate::config::Config::parse(&text, &source).unwrap();
        let TargetKind::S3(target) = &config.targets[0].kind else {
            panic!("not s3")
        };
        assert_eq!(target.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(target.region.as_deref(), Some("eu-west-1"));
        assert_eq!(target.access_key_id.as_deref(), Some("AKID"));
        assert_eq!(target.secret_access_key.as_deref(), Some("the-secret"));
        assert_eq!(target.part_size, 5 << 20);
        assert_eq!(target.on_conflict, OnConflict::Fail);
    }

    #[test]
    fn bad_bucket_urls_name_the_key() {
        for (url, expected) in [
            ("https://bucket/in/", "is not an s3:// URL"),
            ("s3://Bucket/", "is not a valid bucket name"),
            ("s3://b/", "is not a valid bucket name"),
            ("s3://bucket/in", "must end with \"/\""),
            ("s3://bucket/a//b/", "has an empty"),
            ("s3://bucket/../", "has an empty"),
        ] {
            let text = S3.replace("s3://bucket-1/in/", url);
            assert_single_error(&text, &format!("`target.url`: \"{url}\""));
            assert_single_error(&text, expected);
        }
    }

    #[test]
    fn part_size_out_of_range_is_reported() {
        for size in ["\"4MiB\"", "\"6GiB\"", "0"] {
            assert_single_error(&format!("{S3}part_size = {size}\n"), "`target.part_size`: ");
            assert_single_error(
                &format!("{S3}part_size = {size}\n"),
                "is out of range: object storage takes parts of 5MiB to 5GiB",
            );
        }
        assert_eq!(
            s3_target(&format!("{S3}part_size = \"5GiB\"\n")).part_size,
            5 << 30
        );
    }

    #[test]
    fn missing_secret_file_names_key_and_path() {
        let text = format!("{S3}secret_access_key_file = \"/nonexistent/s3.secret\"\n");
        assert_single_error(
            &text,
            "test.toml:5:26: `target.secret_access_key_file`: cannot read /nonexistent/s3.secret: ",
        );
    }

    #[test]
    fn kinds_and_their_keys_are_checked() {
        assert_single_error(
            &S3.replace("\"s3\"", "\"gcs\""),
            "`target.kind`: unknown kind \"gcs\": use \"indexedcp\", \"s3\" or \"tus\"",
        );
        assert_single_error(
            &format!("{S3}on_conflict = \"keep\"\n"),
            "`target.on_conflict`: unknown value \"keep\": use \"rename\", \"fail\" or \"overwrite\"",
        );
        assert_single_error(
            &format!("{S3}endpoint = \"127.0.0.1:9000\"\n"),
            "`target.endpoint`: \"127.0.0.1:9000\" is not an HTTP URL",
        );
        assert_single_error(
            &format!("{S3}api_key = \"k\"\n"),
            "`target.api_key`: an s3 target signs its requests",
        );
        let http = "[[target]]\nname = \"t\"\nurl = \"https://h/upload\"\npart_size = \"8MiB\"\n\
                    region = \"us-east-1\"\n";
        let messages = messages(http);
        assert_eq!(messages.len(), 2, "{messages:#?}");
        assert!(
            messages[0].contains(
                "`target.part_size`: is a key of object storage targets; add kind = \"s3\""
            )
        );
        assert!(messages[1].contains("`target.region`"));
        // An s3:// URL without the kind is not an HTTP URL.
        assert_single_error(
            "[[target]]\nname = \"t\"\nurl = \"s3://bucket/\"\n",
            "is not an HTTP URL",
        );
    }
}
