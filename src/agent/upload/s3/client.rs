//! The bucket as the `s3` kind sees it: the `object_store` client built from
//! a target's settings, what a HEAD tells (size and our `sha256` metadata),
//! object keys (valid ones, and the renamed candidates `on_conflict =
//! "rename"` tries), and the translation of the crate's errors into
//! [`UploadError`]s, whose `retry` decides what happens next.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, Checksum};
use object_store::path::Path;
use object_store::{Attribute, Attributes, ClientOptions, GetOptions, ObjectStore, RetryConfig};

use crate::agent::store::FileRecord;
use crate::config::{S3Target, TargetConfig};

use super::super::error::UploadError;

/// The user metadata every object carries: the whole file's SHA-256 (hex) and
/// the name it had in the spool.
pub(super) const SHA256_METADATA: &str = "sha256";
pub(super) const SOURCE_NAME_METADATA: &str = "source-name";

/// The longest key S3 accepts, in bytes.
const MAX_KEY_BYTES: usize = 1024;

/// Builds the client. Requests are not retried inside the crate: the
/// uploader's schedule retries them, so that a configuration problem is
/// logged once and a SIGHUP takes effect at once.
pub(super) fn build(config: &TargetConfig, s3: &S3Target) -> Result<AmazonS3, UploadError> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&s3.bucket)
        .with_checksum_algorithm(Checksum::SHA256)
        .with_retry(RetryConfig {
            max_retries: 0,
            retry_timeout: config.timeout,
            ..RetryConfig::default()
        });
    let mut options = ClientOptions::new()
        .with_timeout(config.timeout)
        .with_connect_timeout(config.timeout.min(Duration::from_secs(10)));
    if let Some(endpoint) = &s3.endpoint {
        // Path-style requests: S3-compatible services rarely have a DNS name
        // per bucket.
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
        if endpoint.to_ascii_lowercase().starts_with("http://") {
            options = options.with_allow_http(true);
            if !is_loopback(endpoint) {
                tracing::warn!(target = %config.name, %endpoint, "the s3 endpoint is plain http: credentials are signed, but the data travels unencrypted; use https://");
            }
        }
    }
    // The CAs of `ca_file` (the one-shot command's `--cacert`) are trusted
    // besides the system's, for an endpoint with a private CA.
    if let Some(ca) = &config.tls.ca_file {
        let certificates = object_store::Certificate::from_pem_bundle(&ca.pem).map_err(|e| {
            UploadError::Request {
                what: format!("to target {:?}", config.name),
                message: format!("cannot use the CAs of {}: {e}", ca.path.display()),
            }
        })?;
        for certificate in certificates {
            options = options.with_root_certificate(certificate);
        }
    }
    if let Some(region) = &s3.region {
        builder = builder.with_region(region);
    } else if std::env::var_os("AWS_REGION").is_none()
        && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        builder = builder.with_region(crate::config::defaults::S3_REGION);
    }
    if let Some(id) = &s3.access_key_id {
        builder = builder.with_access_key_id(id);
    }
    if let Some(secret) = &s3.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    builder
        .with_client_options(options)
        .build()
        .map_err(|e| UploadError::Request {
            what: format!("to target {:?}", config.name),
            message: format!("cannot set up the s3 client: {e}"),
        })
}

fn is_loopback(endpoint: &str) -> bool {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let host = rest.split(['/', ':']).next().unwrap_or_default();
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The metadata written with every object of `file`.
pub(super) fn attributes(file: &FileRecord) -> Attributes {
    let mut attributes = Attributes::new();
    attributes.insert(
        Attribute::Metadata(SHA256_METADATA.into()),
        file.sha256.clone().into(),
    );
    // Metadata travels in headers: anything but printable ASCII is
    // percent-encoded so that every name fits.
    attributes.insert(
        Attribute::Metadata(SOURCE_NAME_METADATA.into()),
        header_safe(&file.rel_path).into(),
    );
    attributes
}

fn header_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// What a HEAD of a key showed.
#[derive(Debug)]
pub(super) struct Head {
    pub(super) size: u64,
    pub(super) sha256: Option<String>,
    pub(super) e_tag: Option<String>,
}

impl Head {
    /// Whether the object is `file`: same size and our SHA-256.
    pub(super) fn is(&self, file: &FileRecord) -> bool {
        self.size == file.size && self.sha256.as_deref() == Some(file.sha256.as_str())
    }
}

/// HEADs `key`: `None` when no object is there.
pub(super) async fn head(
    store: &Arc<AmazonS3>,
    url: &str,
    key: &str,
) -> Result<Option<Head>, UploadError> {
    let options = GetOptions {
        head: true,
        ..GetOptions::default()
    };
    match store.get_opts(&location(key), options).await {
        Ok(result) => Ok(Some(Head {
            size: result.meta.size,
            sha256: result
                .attributes
                .get(&Attribute::Metadata(SHA256_METADATA.into()))
                .map(|v| v.to_string()),
            e_tag: result.meta.e_tag,
        })),
        Err(object_store::Error::NotFound { source, .. })
            if !chain_text(source.as_ref()).contains("NoSuchBucket") =>
        {
            Ok(None)
        }
        Err(e) => Err(upload_error(url, &e)),
    }
}

/// The MD5 of `data` as lowercase hex, as S3 gives a plain ETag.
pub(super) fn md5_hex(data: &[u8]) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(data))
}

/// Whether an ETag shows that the store holds other bytes than those whose
/// MD5 is `md5`. Only a plain MD5 (32 hex digits, quoted or not) tells: a
/// multipart object's ETag (`…-N`) or one of an encrypted object is no MD5
/// of the bytes, and says nothing either way.
pub(super) fn e_tag_differs(e_tag: Option<&str>, md5: &str) -> bool {
    let Some(e_tag) = e_tag else { return false };
    let e_tag = bare_e_tag(e_tag);
    e_tag.len() == 32 && e_tag.bytes().all(|b| b.is_ascii_hexdigit()) && e_tag != md5
}

/// An ETag without its quotes (plain or as XML escapes them), lowercase.
fn bare_e_tag(e_tag: &str) -> String {
    e_tag
        .replace("&quot;", "\"")
        .trim()
        .trim_matches('"')
        .to_ascii_lowercase()
}

/// The ETag S3 gives the object completed from parts with these ETags: the
/// MD5 of their MD5s, then `-` and how many. `None` when a part's ETag is no
/// plain MD5 (an encrypted upload), which leaves nothing to compare.
pub(super) fn multipart_e_tag<'a>(parts: impl IntoIterator<Item = &'a str>) -> Option<String> {
    use md5::{Digest, Md5};
    let mut md5s = Md5::new();
    let mut n = 0;
    for part in parts {
        let bare = bare_e_tag(part);
        let digest = hex::decode(&bare).ok().filter(|d| d.len() == 16)?;
        md5s.update(&digest);
        n += 1;
    }
    Some(format!("{}-{n}", hex::encode(md5s.finalize())))
}

/// Whether an object's ETag is not `expected` (both as [`bare_e_tag`]
/// gives them). A missing ETag says nothing.
pub(super) fn e_tag_is_not(e_tag: Option<&str>, expected: &str) -> bool {
    e_tag.is_some_and(|e_tag| bare_e_tag(e_tag) != bare_e_tag(expected))
}

/// The ETag in a part's id: with checksums on, the crate keeps the part's
/// ETag and checksums together as `<PartMetadata><e_tag>…</e_tag>…` (the
/// element named after its field; `<ETag>` is accepted too).
pub(super) fn part_e_tag(content_id: &str) -> &str {
    for name in ["e_tag", "ETag"] {
        let (open, close) = (format!("<{name}>"), format!("</{name}>"));
        if let Some(start) = content_id.find(&open) {
            let rest = &content_id[start + open.len()..];
            return rest.find(&close).map_or(rest, |end| &rest[..end]);
        }
    }
    content_id
}

/// The crate's path for a key, unchanged. `Path::from` would percent-encode
/// every byte outside printable ASCII (and `%`, `#`, `[`...), so that a file
/// named `日本.txt` became the object `%E6%97%A5%E6%9C%AC.txt`; `Path::parse`
/// keeps the key as it is. Every key here passed [`object_key`] (or is a
/// renamed candidate of one), which `Path::parse` accepts; the fallback only
/// keeps the type total.
pub(super) fn location(key: &str) -> Path {
    Path::parse(key).unwrap_or_else(|_| Path::from(key))
}

/// The key `file` is stored under: the target's prefix and the file's remote
/// name. A name that is no valid key is refused (the file is parked).
pub(super) fn object_key(prefix: &str, file: &FileRecord) -> Result<String, UploadError> {
    let key = format!("{prefix}{}", file.remote_name);
    let refused = |why: &str| UploadError::Request {
        what: file.remote_name.clone(),
        message: format!("{key:?} is not a valid object key: {why}"),
    };
    if key.len() > MAX_KEY_BYTES {
        return Err(refused("longer than 1024 bytes; shorten the name"));
    }
    if key.chars().any(char::is_control) {
        return Err(refused("it contains control characters; rename the file"));
    }
    match Path::parse(&key) {
        Ok(path) if path.as_ref() == key => Ok(key),
        _ => Err(refused(
            "empty, \".\" or \"..\" segments, or a leading or trailing \"/\"; rename the file",
        )),
    }
}

/// The `attempt`-th key tried for `key` under `on_conflict = "rename"`:
/// `name_<millis>.ext`, then `name_<millis>_<n>.ext`. The millis are the
/// file's ingest time, not the clock's, so that every attempt (after a
/// crash too) tries the same keys in the same order and recognises its own
/// object instead of writing a second one.
pub(super) fn renamed_key(key: &str, millis: i64, attempt: u32) -> String {
    let (dir, name) = match key.rsplit_once('/') {
        Some((dir, name)) => (format!("{dir}/"), name),
        None => (String::new(), key),
    };
    let (stem, ext) = match name.rfind('.') {
        Some(dot) if dot > 0 => name.split_at(dot),
        _ => (name, ""),
    };
    let suffix = if attempt <= 1 {
        format!("_{millis}")
    } else {
        format!("_{millis}_{attempt}")
    };
    format!("{dir}{stem}{suffix}{ext}")
}

/// The text of an error and all its sources.
fn chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The S3 error code (`<Code>…</Code>`) in an error's text, if any.
fn error_code(text: &str) -> Option<String> {
    let start = text.find("<Code>")? + "<Code>".len();
    let end = text[start..].find("</Code>")? + start;
    Some(text[start..end].to_owned())
}

/// The HTTP status in the crate's error text ("status code: 503 …").
fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text[at..].get(..3)?.parse().ok()
}

/// The crate's error as an [`UploadError`]: a status with the S3 error code
/// where the store answered, a transport error where it did not.
pub(super) fn upload_error(url: &str, error: &object_store::Error) -> UploadError {
    let text = chain_text(error);
    let code = error_code(&text).unwrap_or_default();
    let status = match error {
        object_store::Error::NotFound { .. } => Some(404),
        object_store::Error::PermissionDenied { .. } => Some(403),
        object_store::Error::Unauthenticated { .. } => Some(401),
        object_store::Error::Precondition { .. } => Some(412),
        object_store::Error::AlreadyExists { .. } => Some(409),
        _ => status_in(&text),
    };
    // The crate's text carries the whole XML body; the code says it all.
    let message = match text.find("<?xml").or_else(|| text.find("<Error>")) {
        Some(at) => format!("{} ({code})", text[..at].trim_end_matches([':', ' '])),
        None => text,
    };
    match status {
        Some(status) => UploadError::Status {
            url: url.to_owned(),
            status,
            error: code,
            message,
            retry_after: None,
        },
        None => UploadError::Transport {
            url: url.to_owned(),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renamed_keys_keep_the_extension_and_the_folder() {
        assert_eq!(renamed_key("in/a.tar.gz", 7, 1), "in/a.tar_7.gz");
        assert_eq!(renamed_key("in/a.csv", 7, 2), "in/a_7_2.csv");
        assert_eq!(renamed_key("noext", 7, 1), "noext_7");
        assert_eq!(renamed_key("d.x/.hidden", 7, 1), "d.x/.hidden_7");
    }

    #[test]
    fn error_texts_give_status_and_code() {
        let text = "Error performing PUT http://h/b/k in 2ms - Server returned non-2xx status code: 503 Service Unavailable: <?xml version=\"1.0\"?><Error><Code>SlowDown</Code></Error>";
        assert_eq!(status_in(text), Some(503));
        assert_eq!(error_code(text).as_deref(), Some("SlowDown"));
        assert_eq!(status_in("connection refused"), None);
    }

    #[test]
    fn keys_reach_the_crate_unchanged() {
        for key in ["in/日本/2", "in/dir 0/ünï-4.dat", "in/100%#[x].txt"] {
            assert_eq!(location(key).as_ref(), key);
        }
    }

    #[test]
    fn only_a_plain_md5_e_tag_can_differ() {
        let md5 = md5_hex(b"abc");
        assert_eq!(md5, "900150983cd24fb0d6963f7d28e17f72");
        assert!(!e_tag_differs(Some(&format!("\"{md5}\"")), &md5));
        assert!(!e_tag_differs(Some(&md5.to_uppercase()), &md5));
        assert!(e_tag_differs(
            Some("\"900150983cd24fb0d6963f7d28e17f73\""),
            &md5
        ));
        assert!(e_tag_differs(
            Some("&quot;900150983cd24fb0d6963f7d28e17f73&quot;"),
            &md5
        ));
        assert!(!e_tag_differs(
            Some("\"900150983cd24fb0d6963f7d28e17f73-2\""),
            &md5
        ));
        assert!(!e_tag_differs(Some("opaque"), &md5));
        assert!(!e_tag_differs(None, &md5));
        assert_eq!(
            part_e_tag(
                "<PartMetadata><ETag>\"abc\"</ETag><ChecksumSHA256>x</ChecksumSHA256></PartMetadata>"
            ),
            "\"abc\""
        );
        assert_eq!(
            part_e_tag("<PartMetadata><e_tag>\"abc\"</e_tag></PartMetadata>"),
            "\"abc\""
        );
        assert_eq!(part_e_tag("\"abc\""), "\"abc\"");
    }

    #[test]
    fn a_multipart_e_tag_is_the_md5_of_the_parts_md5s() {
        let (a, b) = (md5_hex(b"a"), md5_hex(b"b"));
        let mut both = hex::decode(&a).unwrap();
        both.extend(hex::decode(&b).unwrap());
        let expected = format!("{}-2", md5_hex(&both));
        let quoted = [format!("\"{a}\""), format!("&quot;{b}&quot;")];
        assert_eq!(
            multipart_e_tag(quoted.iter().map(String::as_str)).as_deref(),
            Some(expected.as_str())
        );
        assert_eq!(multipart_e_tag([a.as_str(), "opaque"]), None);
        assert!(!e_tag_is_not(Some(&format!("\"{expected}\"")), &expected));
        assert!(e_tag_is_not(Some("\"x-2\""), &expected));
        assert!(!e_tag_is_not(None, &expected));
    }

    #[test]
    fn header_safe_names_are_percent_encoded() {
        assert_eq!(header_safe("a b/ü%"), "a b/%C3%BC%25");
    }
}
