//! The receiver's tus 1.0.0 endpoint (`/files/`) against real tus clients
//! (tus-js-client in Node, tuspy) and hostile requests, with the real binary
//! on 127.0.0.1. `.ci/run` installs the clients (the Node packages under
//! `target/tus-node`, tuspy with pip); where one is missing its test says so
//! and passes, except under `CI=true`, where it fails.

mod clients;
mod crash;
mod hostile;

use std::path::PathBuf;
use std::process::Command;

use base64::Engine;

use crate::fixtures::KEY;

pub const TUS: &str = "1.0.0";

/// `Upload-Metadata` for `pairs` of key and raw value.
pub fn metadata(pairs: &[(&str, &[u8])]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} {}",
                base64::engine::general_purpose::STANDARD.encode(v)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A request with the key and `Tus-Resumable`.
pub fn tus(client: &reqwest::Client, method: &str, url: &str) -> reqwest::RequestBuilder {
    client
        .request(method.parse().unwrap(), url)
        .header("Authorization", format!("Bearer {KEY}"))
        .header("Tus-Resumable", TUS)
}

/// Creates an upload of `length` bytes; returns its absolute URL.
pub async fn create(client: &reqwest::Client, base: &str, length: u64, meta: &str) -> String {
    let r = tus(client, "POST", &format!("{base}/files/"))
        .header("Upload-Length", length.to_string())
        .header("Upload-Metadata", meta)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/files/"), "{location}");
    format!("{base}{location}")
}

/// `HEAD` of an upload: status and `Upload-Offset`.
pub async fn offset(client: &reqwest::Client, url: &str) -> (u16, Option<u64>) {
    let r = tus(client, "HEAD", url).send().await.unwrap();
    let offset = r
        .headers()
        .get("upload-offset")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (r.status().as_u16(), offset)
}

/// `PATCH` of `bytes` at `at`: status and the new `Upload-Offset`.
pub async fn patch(
    client: &reqwest::Client,
    url: &str,
    at: u64,
    bytes: Vec<u8>,
) -> (u16, Option<u64>) {
    let r = tus(client, "PATCH", url)
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Offset", at.to_string())
        .body(bytes)
        .send()
        .await
        .unwrap();
    let offset = r
        .headers()
        .get("upload-offset")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (r.status().as_u16(), offset)
}

/// Where `.ci/run` installs the Node packages, if tus-js-client is there.
pub fn node_modules() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tus-node/node_modules");
    let present = dir.join("tus-js-client").is_dir()
        && Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    present.then_some(dir)
}

/// Whether tuspy imports.
pub fn tuspy_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import tusclient.client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `false` (with a note) when a client is missing; a failure under `CI=true`.
#[track_caller]
pub fn require(present: bool, what: &str) -> bool {
    crate::support::require(
        present,
        what,
        "npm install --prefix target/tus-node tus-js-client@4, pip install tuspy",
    )
}
