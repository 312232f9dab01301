//! A target's `headers` key: extra HTTP headers sent with every request to
//! the target (`headers = { Authorization = "Bearer ..." }`), for the HTTP
//! kinds (`indexedcp` and `tus`). The checker's part lives here so that each
//! bad header names the key and what to write instead, and so that the
//! headers the agent sets itself (the framing, the tus and IndexedCP
//! protocol headers) can never be replaced by a configuration. Every value is
//! marked sensitive, since headers carry credentials: it never shows in a
//! debug print, and `check-config` redacts it.

use std::collections::BTreeMap;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use toml::{Spanned, Value};

use super::check::Checker;
use super::effective::REDACTED;
use super::raw::Field;
use super::s3::TargetKind;

/// Header names the agent sets itself: HTTP framing, and the protocol
/// headers of the kinds that send `headers`.
const RESERVED: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "expect",
    "te",
    "upgrade",
];

/// Name prefixes of protocol headers: tus (`Tus-Resumable`, `Upload-Offset`,
/// `Upload-Length`, `Upload-Metadata`, `Upload-Checksum`...) and IndexedCP
/// (`X-File-Name`, `X-Chunk-Index`, `X-Upload-Id`...).
const RESERVED_PREFIXES: &[&str] = &[
    "tus-",
    "upload-",
    "x-file-",
    "x-chunk-",
    "x-upload-",
    "x-indexedcp-",
    "x-manifest-",
];

/// Checks one header; the name and value it becomes.
fn check_header(name: &str, value: &Value) -> Result<(HeaderName, HeaderValue), String> {
    let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        format!(
            "{name:?} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only); \
             use e.g. \"Authorization\""
        )
    })?;
    let lower = header.as_str();
    if RESERVED.contains(&lower) || RESERVED_PREFIXES.iter().any(|p| lower.starts_with(p)) {
        return Err(format!(
            "{name:?} is set by the agent itself for each request; remove it from headers"
        ));
    }
    let Value::String(text) = value else {
        return Err(format!(
            "the value of {name:?} must be a string, e.g. {name} = \"...\""
        ));
    };
    let unfit = || {
        format!(
            "the value of {name:?} holds characters a header cannot carry (control characters \
             or non-ASCII); write it in printable ASCII"
        )
    };
    // Bytes above ASCII are legal in a header (as opaque bytes) but read
    // differently by every server: only printable ASCII is taken.
    if !text.is_ascii() {
        return Err(unfit());
    }
    let mut value = HeaderValue::from_str(text).map_err(|_| unfit())?;
    value.set_sensitive(true);
    Ok((header, value))
}

impl Checker<'_> {
    /// Validates `headers` for a target of `kind`; `api_key` is where the
    /// target's `api_key` or `api_key_file` was written, if it was.
    pub(super) fn check_target_headers(
        &mut self,
        raw: Field<BTreeMap<String, Spanned<Value>>>,
        kind: &TargetKind,
        api_key: Option<std::ops::Range<usize>>,
    ) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let Some(raw) = raw else { return headers };
        if let TargetKind::S3(_) = kind {
            self.problem(
                raw.span(),
                "target.headers",
                "an s3 target's requests are signed by the store's client, which sends no extra \
                 headers; remove headers",
            );
            return headers;
        }
        for (name, value) in raw.into_inner() {
            match check_header(&name, value.get_ref()) {
                Ok((header, _)) if headers.contains_key(&header) => self.problem(
                    value.span(),
                    "target.headers",
                    format!("{name:?} is set twice (header names ignore case); keep one"),
                ),
                Ok((header, _)) if header == AUTHORIZATION && api_key.is_some() => self.problem(
                    value.span(),
                    "target.headers",
                    "Authorization is set by api_key (or api_key_file) too; set one of them",
                ),
                Ok((header, value)) => {
                    headers.insert(header, value);
                }
                Err(message) => self.problem(value.span(), "target.headers", message),
            }
        }
        headers
    }
}

/// `headers` as `check-config` prints it: every value redacted.
pub(super) fn redacted_headers(headers: &HeaderMap) -> Option<Value> {
    if headers.is_empty() {
        return None;
    }
    let table = headers
        .keys()
        .map(|name| (name.to_string(), Value::String(REDACTED.to_owned())))
        .collect::<toml::Table>();
    Some(Value::Table(table))
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{TARGET, assert_single_error, parse};

    #[test]
    fn headers_are_read_and_their_values_kept_out_of_debug_prints() {
        let text = format!(
            "{TARGET}headers = {{ Authorization = \"Bearer t0ken\", X-Tenant = \"site-a\" }}\n"
        );
        let config = parse(&text).unwrap();
        let headers = &config.targets[0].headers;
        assert_eq!(headers.len(), 2);
        assert_eq!(headers["authorization"], "Bearer t0ken");
        assert_eq!(headers["x-tenant"], "site-a");
        assert!(!format!("{:?}", config.targets[0]).contains("t0ken"));
        let effective = config.to_effective_toml();
        assert!(!effective.contains("t0ken"), "{effective}");
        assert!(
            effective.contains(
                "headers = { authorization = \"<redacted>\", x-tenant = \"<redacted>\" }"
            ),
            "{effective}"
        );
        let reparsed =
            crate::config::Config::parse(&effective, std::path::Path::new("test.toml")).unwrap();
        assert_eq!(reparsed.targets[0].headers["x-tenant"], "<redacted>");
        let tus = "[[target]]\nname = \"t\"\nkind = \"tus\"\nurl = \"http://h/files/\"\n\
                   headers = { X-Tenant = \"a\" }\n";
        assert_eq!(parse(tus).unwrap().targets[0].headers["x-tenant"], "a");
    }

    #[test]
    fn bad_headers_name_the_key_and_the_header() {
        for (headers, expected) in [
            (
                "{ \"Bad Name\" = \"x\" }",
                "\"Bad Name\" is not a valid header name",
            ),
            (
                "{ Upload-Offset = \"0\" }",
                "\"Upload-Offset\" is set by the agent itself",
            ),
            (
                "{ Tus-Resumable = \"1.0.0\" }",
                "\"Tus-Resumable\" is set by the agent",
            ),
            (
                "{ X-File-Name = \"a\" }",
                "\"X-File-Name\" is set by the agent",
            ),
            ("{ Content-Length = \"1\" }", "\"Content-Length\" is set by"),
            (
                "{ X-Count = 3 }",
                "the value of \"X-Count\" must be a string",
            ),
            (
                "{ X-Name = \"caf\u{e9}\" }",
                "the value of \"X-Name\" holds characters a header cannot carry",
            ),
            (
                "{ Authorization = \"a\", authorization = \"b\" }",
                "\"authorization\" is set twice (header names ignore case)",
            ),
        ] {
            assert_single_error(
                &format!("{TARGET}headers = {headers}\n"),
                &format!("`target.headers`: {expected}"),
            );
        }
        assert_single_error(
            &format!("{TARGET}api_key = \"k\"\nheaders = {{ Authorization = \"Bearer b\" }}\n"),
            "`target.headers`: Authorization is set by api_key (or api_key_file) too",
        );
        assert_single_error(
            "[[target]]\nname = \"a\"\nkind = \"s3\"\nurl = \"s3://bucket/\"\n\
             headers = { X-A = \"b\" }\n",
            "`target.headers`: an s3 target's requests are signed",
        );
    }
}
