//! SIGKILL of the receiver in the middle of tus uploads: after each restart
//! HEAD gives an offset no lower than the bytes acknowledged (and no higher
//! than the bytes sent), nothing is under a final name before the upload is
//! complete, and a real client resumes to a byte-identical file. A receiver
//! that dies after the last bytes are recorded (before the upload is sealed
//! for completion, or before or right after the rename into place)
//! completes the upload when it starts again, without any request: the file
//! is there once, byte-identical, and HEAD says the upload is complete.

use std::time::Duration;

use indexedcp::failpoint;

use super::{create, metadata, node_modules, offset, patch, require, tus};
use crate::fixtures::{KEY, Server};
use crate::support::{eventually, pseudo_random, visible_files, wait_until};

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

#[tokio::test(flavor = "multi_thread")]
async fn a_tus_upload_interrupted_around_its_rename_is_completed_at_restart() {
    for point in [
        failpoint::SERVER_TUS_AFTER_LAST_RECORD,
        failpoint::SERVER_BEFORE_RENAME,
        failpoint::SERVER_AFTER_RENAME,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let args: Vec<String> = [
            "server",
            "--port",
            "0",
            "--output-dir",
            out.to_str().unwrap(),
            "-k",
            KEY,
        ]
        .map(String::from)
        .to_vec();
        let mut server =
            Server::spawn_with_env(args.clone(), &out, &[(failpoint::ENV, point)]).await;
        let client = reqwest::Client::new();
        let data = pseudo_random(3 * PIECE + 17, 7);
        let len = data.len() as u64;
        let url = create(
            &client,
            &server.url,
            len,
            &metadata(&[("filename", b"last.bin")]),
        )
        .await;
        let path = url.trim_start_matches(&server.url).to_owned();
        let (status, at) = patch(&client, &url, 0, data[..PIECE].to_vec()).await;
        assert_eq!((status, at), (204, Some(PIECE as u64)), "{point}");
        // The last PATCH: its bytes are recorded, then the receiver aborts at
        // the failpoint and the client gets no reply.
        let last = tus(&client, "PATCH", &url)
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", PIECE.to_string())
            .body(data[PIECE..].to_vec())
            .send()
            .await;
        assert!(last.is_err(), "{point}: the PATCH was answered: {last:?}");
        wait_until(
            "the receiver to crash at its failpoint",
            Duration::from_millis(20),
            Duration::from_secs(30),
            || Ok(server.child.try_wait()?.is_some()),
        )
        .unwrap();
        if point != failpoint::SERVER_AFTER_RENAME {
            assert!(
                visible_files(&out).is_empty(),
                "{point}: a file under its final name before the rename"
            );
        }

        server = Server::spawn(args, &out).await;
        // Completed at start-up, without a request.
        let got = eventually(Duration::from_secs(20), "the file in place", async || {
            let files = visible_files(&out);
            (!files.is_empty()).then_some(files)
        })
        .await;
        assert_eq!(got.len(), 1, "{point}: {:?}", got.keys());
        assert!(
            got["last.bin"] == data,
            "{point}: the completed file differs"
        );
        // The client's HEAD learns that it is done, and nothing is renamed twice.
        let url = format!("{}{path}", server.url);
        assert_eq!(offset(&client, &url).await, (200, Some(len)), "{point}");
        let r = tus(&client, "HEAD", &url).send().await.unwrap();
        assert_eq!(r.headers()["upload-length"], len.to_string().as_str());
        let (status, _) = patch(&client, &url, len, Vec::new()).await;
        assert_eq!(status, 204, "{point}: an empty PATCH at the end");
        assert_eq!(visible_files(&out).len(), 1, "{point}: completed twice");
        server.kill();
    }
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
