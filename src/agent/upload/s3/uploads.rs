//! The multipart uploads a bucket holds open for one file's keys, found with
//! ListMultipartUploads and aborted.
//!
//! A CreateMultipartUpload whose reply was lost, or an agent killed after the
//! store answered it but before the buffer recorded its id, leaves an upload
//! that nothing refers to: the store keeps (and bills) its parts until a
//! lifecycle rule removes it. Such an upload can only be at one of the file's
//! own keys (its object key, or the renamed candidates `on_conflict =
//! "rename"` tries), so before a file without a recorded upload creates one,
//! and when an operator purges it, the uploads open at those keys are listed
//! and aborted. `object_store` has no call for the listing: the request is
//! signed by the crate's presigner (so no signing is written here), sent with
//! reqwest, and its XML answer read for the few elements needed.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3;
use object_store::path::Path;
use object_store::signer::{Method, SignedUrlOptions, Signer};

use super::super::error::UploadError;

/// How long a listing's signature stays valid: it is sent at once.
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(300);

/// Pages of a listing read at most; a key with more than a thousand open
/// uploads per page times this is not one file's doing.
const MAX_PAGES: usize = 20;

/// One open multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OpenUpload {
    pub(super) key: String,
    pub(super) upload_id: String,
}

/// Lists the multipart uploads open under `prefix` (every page of them).
pub(super) async fn list_open(
    store: &Arc<AmazonS3>,
    http: &reqwest::Client,
    url: &str,
    prefix: &str,
) -> Result<Vec<OpenUpload>, UploadError> {
    let mut uploads = Vec::new();
    let mut markers: Option<(String, String)> = None;
    for _ in 0..MAX_PAGES {
        let mut query = vec![
            ("uploads".to_owned(), String::new()),
            ("prefix".to_owned(), prefix.to_owned()),
        ];
        if let Some((key, id)) = &markers {
            query.push(("key-marker".to_owned(), key.clone()));
            query.push(("upload-id-marker".to_owned(), id.clone()));
        }
        let options = SignedUrlOptions::default().with_query(query);
        // The empty path is the bucket itself.
        let signed = store
            .signed_url_opts(Method::GET, &Path::from(""), SIGNATURE_LIFETIME, &options)
            .await
            .map_err(|e| super::client::upload_error(url, &e))?;
        let failed = |message: String| UploadError::Transport {
            url: url.to_owned(),
            message: format!("listing the open multipart uploads: {message}"),
        };
        let response = http
            .get(signed.as_str())
            .send()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        let body = response.text().await.map_err(|e| failed(e.to_string()))?;
        if !status.is_success() {
            let code = element(&body, "Code").unwrap_or_default();
            return Err(UploadError::Status {
                url: url.to_owned(),
                status: status.as_u16(),
                error: code.clone(),
                message: format!("listing the open multipart uploads answered {status} ({code})"),
                retry_after: None,
            });
        }
        let page = parse_listing(&body);
        uploads.extend(page.uploads);
        match page.next {
            Some(next) => markers = Some(next),
            None => return Ok(uploads),
        }
    }
    Ok(uploads)
}

/// One page of a ListMultipartUploads answer.
#[derive(Debug, PartialEq)]
struct Page {
    uploads: Vec<OpenUpload>,
    /// Where the next page starts, when the answer was truncated.
    next: Option<(String, String)>,
}

fn parse_listing(xml: &str) -> Page {
    let mut uploads = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<Upload>") {
        let after = &rest[start + "<Upload>".len()..];
        let end = after.find("</Upload>").unwrap_or(after.len());
        let upload = &after[..end];
        if let (Some(key), Some(upload_id)) = (element(upload, "Key"), element(upload, "UploadId"))
        {
            uploads.push(OpenUpload { key, upload_id });
        }
        rest = &after[end..];
    }
    let truncated = element(xml, "IsTruncated").is_some_and(|t| t == "true");
    let next = match (
        element(xml, "NextKeyMarker"),
        element(xml, "NextUploadIdMarker"),
    ) {
        (Some(key), Some(id)) if truncated && !key.is_empty() => Some((key, id)),
        _ => None,
    };
    Page { uploads, next }
}

/// The text of the first `<name>` element in `xml`, unescaped.
fn element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(unescape(&xml[start..end]))
}

/// XML's predefined entities and numeric character references.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let Some(semi) = after.find(';') else {
            out.push_str(&rest[amp..]);
            return out;
        };
        let entity = &after[..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => entity
                .strip_prefix("#x")
                .map(|hex| u32::from_str_radix(hex, 16))
                .or_else(|| entity.strip_prefix('#').map(str::parse))
                .and_then(Result::ok)
                .and_then(char::from_u32),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &after[semi + 1..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_gives_keys_ids_and_the_next_page() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Bucket>archive</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
<NextKeyMarker>in/b &amp; c.bin</NextKeyMarker><NextUploadIdMarker>id2</NextUploadIdMarker>
<Prefix>in/</Prefix><MaxUploads>2</MaxUploads><IsTruncated>true</IsTruncated>
<Upload><Key>in/a.bin</Key><UploadId>id1</UploadId><Initiated>2024-01-01T00:00:00Z</Initiated></Upload>
<Upload><Key>in/b &amp; c.bin</Key><UploadId>id2</UploadId></Upload>
</ListMultipartUploadsResult>"#;
        let page = parse_listing(xml);
        assert_eq!(
            page.uploads,
            [
                OpenUpload {
                    key: "in/a.bin".into(),
                    upload_id: "id1".into()
                },
                OpenUpload {
                    key: "in/b & c.bin".into(),
                    upload_id: "id2".into()
                }
            ]
        );
        assert_eq!(page.next, Some(("in/b & c.bin".into(), "id2".into())));
        let last = xml.replace(
            "<IsTruncated>true</IsTruncated>",
            "<IsTruncated>false</IsTruncated>",
        );
        assert_eq!(parse_listing(&last).next, None);
        assert_eq!(
            parse_listing("<ListMultipartUploadsResult/>"),
            Page {
                uploads: vec![],
                next: None
            }
        );
    }

    #[test]
    fn entities_are_unescaped() {
        assert_eq!(
            unescape("a&amp;b&lt;&#233;&#x4E2D;&bogus;"),
            "a&b<é中&bogus;"
        );
        assert_eq!(unescape("trailing &"), "trailing &");
    }
}
