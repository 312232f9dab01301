//! Checks of single values, shared by the checker: API keys and the files
//! that hold them, URLs, log levels, remote prefixes, durations, sizes and
//! retry counts as written in TOML, and the lexical path comparisons that
//! keep spools from overlapping. Each check returns the message to show the
//! operator, phrased to say what to write instead; where the value was is the
//! checker's business.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use toml::Value;

use super::units::{parse_duration, parse_size};

/// Keys from an `api_keys_file`: one per line, blank lines and `#` comments skipped.
pub(super) fn parse_key_list(text: &str) -> Result<Vec<String>, String> {
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
pub(super) fn resolve_key_file(source: &Path, file: &str) -> PathBuf {
    let file = Path::new(file);
    match source.parent() {
        Some(dir) if file.is_relative() => dir.join(file),
        _ => file.to_owned(),
    }
}

pub(super) fn read_key_file(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|error| {
        format!(
            "cannot read {}: {error}; create it or fix the path",
            path.display()
        )
    })
}

/// A key travels in an `Authorization` header, so it must be printable ASCII
/// without spaces. The key itself is never echoed into a message.
pub(super) fn check_api_key(key: &str) -> Result<(), String> {
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

pub(super) fn check_url(url: &str) -> Result<(), String> {
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
pub(super) fn check_log_level(level: &str) -> Result<(), String> {
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
pub(super) fn check_remote_prefix(prefix: &str) -> Result<(), String> {
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

pub(super) fn non_empty_path(path: &str, what: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        Err(format!("must not be empty; set {what}"))
    } else {
        Ok(PathBuf::from(path))
    }
}

pub(super) fn duration_value(value: &Value) -> Result<Duration, String> {
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

pub(super) fn positive_duration(value: &Value, hint: &str) -> Result<Duration, String> {
    match duration_value(value)? {
        Duration::ZERO => Err(format!("must be greater than 0; {hint}")),
        duration => Ok(duration),
    }
}

pub(super) fn size_value(value: &Value) -> Result<u64, String> {
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

pub(super) fn positive_size(value: &Value, hint: &str) -> Result<u64, String> {
    match size_value(value)? {
        0 => Err(format!("must be greater than 0; {hint}")),
        size => Ok(size),
    }
}

pub(super) fn max_retries_value(value: &Value) -> Result<Option<u32>, String> {
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
pub(super) fn normalize(path: &Path) -> PathBuf {
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
pub(super) fn inside(path: &Path, root: &Path) -> bool {
    path.is_absolute() == root.is_absolute() && path.starts_with(root)
}

pub(super) fn overlaps(a: &Path, b: &Path) -> bool {
    inside(a, b) || inside(b, a)
}

/// `server.tus_path`: "" (tus off), or a path such as "/files/" whose
/// segments are plain URL characters, outside the receiver's own routes.
pub(super) fn check_tus_path(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Ok(String::new());
    }
    let hint = "use a path such as \"/files/\", or \"\" to turn tus off";
    let Some(inner) = path
        .strip_prefix('/')
        .and_then(|p| p.strip_suffix('/'))
        .filter(|p| !p.is_empty())
    else {
        return Err(format!(
            "{path:?} must start and end with \"/\" and name at least one segment; {hint}"
        ));
    };
    for segment in inner.split('/') {
        let plain = segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
        if segment.is_empty() || segment == "." || segment == ".." || !plain {
            return Err(format!(
                "{path:?} has the segment {segment:?}; segments are letters, digits, \"-\", \".\", \"_\" and \"~\" (not \".\" or \"..\"); {hint}"
            ));
        }
    }
    let first = inner.split('/').next().unwrap_or_default();
    if ["upload", "health"].contains(&first) {
        return Err(format!(
            "{path:?} is inside the receiver's own /{first} routes; {hint}"
        ));
    }
    Ok(path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tus_paths_are_plain_and_apart_from_the_receivers_routes() {
        assert_eq!(check_tus_path("/files/").unwrap(), "/files/");
        assert_eq!(check_tus_path("/api/v2/tus/").unwrap(), "/api/v2/tus/");
        assert_eq!(check_tus_path("").unwrap(), "");
        for bad in [
            "files/",
            "/files",
            "/",
            "//",
            "/a//b/",
            "/../",
            "/a b/",
            "/{id}/",
            "/upload/",
            "/health/x/",
        ] {
            assert!(check_tus_path(bad).is_err(), "{bad:?} was accepted");
        }
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
