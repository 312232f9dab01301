//! SIGKILL of the receiver in the middle of tus uploads: after each restart
//! HEAD gives an offset no lower than the bytes acknowledged (and no higher
//! than the bytes sent), nothing is under a final name before the upload is
//! complete, and a real client resumes to a byte-identical file.

use std::time::Duration;

use super::{create, metadata, node_modules, offset, patch, require, tus};
use crate::fixtures::{KEY, Server};
use crate::support::{pseudo_random, visible_files};

const SIZE: usize = 6 << 20;
const PIECE: usize = 512 << 10;

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_patches_loses_no_acknowledged_byte() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let data = pseudo_random(SIZE, 42);
    let url = create(
        &client,
        &server.url,
        SIZE as u64,
        &metadata(&[("filename", b"killed.bin")]),
    )
    .await;
    let path = url.trim_start_matches(&server.url).to_owned();
    let mut acknowledged = 0u64;
    for round in 0..4u64 {
        let url = format!("{}{path}", server.url);
        // A whole piece, acknowledged.
        let (status, new) = patch(
            &client,
            &url,
            acknowledged,
            data[acknowledged as usize..][..PIECE].to_vec(),
        )
        .await;
        assert_eq!(
            (status, new),
            (204, Some(acknowledged + PIECE as u64)),
            "round {round}"
        );
        acknowledged += PIECE as u64;
        // Half a piece sent, then the receiver dies while the PATCH waits
        // for the rest.
        let start = acknowledged as usize;
        let half = data[start..start + PIECE / 2].to_vec();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
        tx.send(Ok(half)).await.unwrap();
        let body = reqwest::Body::wrap_stream(tokio_stream(rx));
        let pending = tokio::spawn(
            tus(&client, "PATCH", &url)
                .header("Content-Type", "application/offset+octet-stream")
                .header("Upload-Offset", acknowledged.to_string())
                .header("Content-Length", PIECE.to_string())
                .body(body)
                .send(),
        );
        // Every other round, give the receiver time to write what it got;
        // otherwise kill it at once.
        if round % 2 == 1 {
            let staged = out
                .join(".indexedcp/staging")
                .join(path.rsplit('/').next().unwrap());
            crate::support::eventually(
                Duration::from_secs(10),
                "the half piece to be written",
                async || {
                    let len = std::fs::metadata(&staged).ok()?.len();
                    (len >= acknowledged + (PIECE / 2) as u64).then_some(())
                },
            )
            .await;
        }
        server.kill();
        drop(tx);
        // The PATCH fails with the connection; its outcome is what HEAD says next.
        let _ = pending.await;
        server.restart().await;
        let url = format!("{}{path}", server.url);
        let (status, at) = offset(&client, &url).await;
        assert_eq!(status, 200, "round {round}");
        let at = at.unwrap();
        assert!(
            at >= acknowledged && at <= acknowledged + (PIECE / 2) as u64,
            "round {round}: offset {at}, acknowledged {acknowledged}"
        );
        acknowledged = at;
        assert!(
            visible_files(&out).is_empty(),
            "a partial file under a final name"
        );
    }

    // A real client finishes the upload from its URL.
    let Some(modules) = node_modules() else {
        require(false, "tus-js-client (target/tus-node)");
        return;
    };
    let file = dir.path().join("killed.bin");
    std::fs::write(&file, &data).unwrap();
    let script = dir.path().join("resume.js");
    std::fs::write(&script, RESUME_JS).unwrap();
    let url = format!("{}{path}", server.url);
    let status = std::process::Command::new("node")
        .arg(&script)
        .args([&url, KEY, file.to_str().unwrap()])
        .env("NODE_PATH", modules)
        .status()
        .unwrap();
    assert!(status.success(), "tus-js-client could not resume");
    let got = visible_files(&out);
    assert_eq!(got.len(), 1, "{:?}", got.keys());
    assert!(got["killed.bin"] == data, "the resumed file differs");
}

const RESUME_JS: &str = r#"
const tus = require('tus-js-client');
const fs = require('fs');
const [url, key, file] = process.argv.slice(2);
new tus.Upload(fs.readFileSync(file), {
  uploadUrl: url,
  chunkSize: 1 << 20,
  headers: { Authorization: 'Bearer ' + key },
  storeFingerprintForResuming: false,
  onError(e) { console.error(String(e)); process.exit(1); },
  onSuccess() { process.exit(0); },
}).start();
"#;

/// The receiver of `rx` as a stream, for a request body sent piece by piece.
fn tokio_stream(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
