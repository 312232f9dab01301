//! Limits and malformed requests: clear 4xx replies that change nothing.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use crate::fixtures::*;
use crate::support::*;

#[tokio::test]
async fn oversized_chunks_and_files_get_413_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(
        &out,
        &["--max-chunk-bytes", "1KiB", "--max-file-bytes", "3000"],
    )
    .await;
    let client = reqwest::Client::new();
    let url = server.upload_url();

    // Declared too large: refused before the body is read.
    let (status, reply) = json(post_v1(&client, &url, "big.bin", 0, &vec![1u8; 1025]).await).await;
    assert_eq!(status, 413, "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("1024"),
        "{reply}"
    );

    // Streamed without a length: cut off at the limit.
    let stream = futures::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![7u8; 512])));
    let response = client
        .post(&url)
        .bearer_auth(KEY)
        .header("X-File-Name", "streamed.bin")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    // A resumable file declared larger than max_file_bytes.
    let file = vec![9u8; 3001];
    let c = ResumableChunk {
        upload_id: "too-big-file-000001",
        name: "f.bin",
        file: &file,
        chunk_size: 1000,
        index: 0,
    };
    assert_eq!(c.request(&client, &url).send().await.unwrap().status(), 413);

    // v1 chunks that together exceed max_file_bytes.
    for i in 0..3 {
        assert_eq!(
            post_v1(&client, &url, "grow.bin", i, &[1u8; 1000])
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        post_v1(&client, &url, "grow.bin", 3, &[1u8; 1])
            .await
            .status(),
        413
    );
    let files = visible_files(&out);
    assert_eq!(files.keys().collect::<Vec<_>>(), ["grow.bin"]);
    assert_eq!(files["grow.bin"].len(), 3000);
}

#[tokio::test]
async fn malformed_extension_headers_get_400() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let url = server.upload_url();
    let file = pseudo_random(2000, 1);
    let base = ResumableChunk {
        upload_id: "malformed-base-00001",
        name: "x.bin",
        file: &file,
        chunk_size: 1000,
        index: 0,
    };
    let cases: Vec<(&str, &str, String)> = vec![
        ("short id", "X-Upload-Id", "short".into()),
        (
            "id with a slash",
            "X-Upload-Id",
            "abcdefgh/ijklmnopq".into(),
        ),
        ("bad chunk sha", "X-Chunk-Sha256", "xyz".into()),
        ("bad file sha", "X-File-Sha256", "12".repeat(31)),
        ("negative offset", "X-Chunk-Offset", "-1".into()),
        ("offset past the end", "X-Chunk-Offset", "2001".into()),
        (
            "chunk extends past the end",
            "X-Chunk-Offset",
            "1500".into(),
        ),
        ("index beyond count", "X-Chunk-Index", "2".into()),
        ("index not a number", "X-Chunk-Index", "one".into()),
        ("zero chunks", "X-Chunk-Count", "0".into()),
        ("size not a number", "X-File-Size", "2k".into()),
    ];
    for (what, header, value) in cases {
        let response = base
            .request_with(&client, &url, &[(header, value)])
            .send()
            .await
            .unwrap();
        let (status, reply) = json(response).await;
        assert_eq!(status, 400, "{what}: {reply}");
        assert!(
            reply["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {reply}"
        );
    }
    // A missing extension header is named in the reply.
    let response = client
        .post(&url)
        .bearer_auth(KEY)
        .header("X-File-Name", "x.bin")
        .header("X-Upload-Id", "missing-headers-0001")
        .body("abc")
        .send()
        .await
        .unwrap();
    let (status, reply) = json(response).await;
    assert_eq!(status, 400);
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("x-chunk-offset"),
        "{reply}"
    );
    assert!(visible_files(&out).is_empty());
    assert_eq!(
        std::fs::read_dir(out.join(".indexedcp/staging"))
            .unwrap()
            .count(),
        0
    );
}

fn wait_closed(stream: &mut std::net::TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    (start.elapsed(), got)
}

#[tokio::test]
async fn slow_clients_cannot_hold_connections() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &["--read-timeout", "1s"]).await;
    let addr = server.url.trim_start_matches("http://").to_owned();

    // Headers that never finish.
    let mut slow_headers = std::net::TcpStream::connect(&addr).unwrap();
    slow_headers
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // A body that stalls after ten bytes.
    let mut slow_body = std::net::TcpStream::connect(&addr).unwrap();
    slow_body
        .write_all(format!("POST /upload HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nX-File-Name: stalled.bin\r\nContent-Length: 100\r\n\r\n0123456789").as_bytes())
        .unwrap();

    let (elapsed, _) = tokio::task::spawn_blocking(move || {
        wait_closed(&mut slow_headers, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert!(
        elapsed < Duration::from_secs(10),
        "header stall held for {elapsed:?}"
    );
    let (elapsed, reply) =
        tokio::task::spawn_blocking(move || wait_closed(&mut slow_body, Duration::from_secs(20)))
            .await
            .unwrap();
    assert!(
        elapsed < Duration::from_secs(10),
        "body stall held for {elapsed:?}"
    );
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    // The stalled v1 chunk left an empty file at most, never the ten bytes as if complete.
    let files = visible_files(&out);
    assert!(files.values().all(|c| c.is_empty()), "{files:?}");
    // The receiver still serves.
    assert_eq!(
        post_v1(
            &reqwest::Client::new(),
            &server.upload_url(),
            "after.txt",
            0,
            b"ok"
        )
        .await
        .status(),
        200
    );
}
