//! IndexedCP v1 compatibility: the original's headers, replies and behaviour.

use serde_json::json;

use crate::fixtures::*;
use crate::support::*;

#[tokio::test]
async fn multi_chunk_v1_upload_matches_the_original_server() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let data = pseudo_random(3 * 1000 + 17, 1);
    for (i, chunk) in data.chunks(1000).enumerate() {
        let response = post_v1(&client, &server.upload_url(), "report.bin", i, chunk).await;
        let (status, body) = json(response).await;
        assert_eq!(status, 200);
        // Exactly the original's reply, field for field.
        assert_eq!(
            body,
            json!({"message": "Chunk received", "actualFilename": "report.bin",
                   "chunkIndex": i, "clientFilename": "report.bin"})
        );
    }
    assert_eq!(
        visible_files(&out),
        [("report.bin".to_string(), data)].into()
    );
}

#[tokio::test]
async fn a_second_upload_of_the_same_name_starts_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    for chunk in [b"first-0".as_slice(), b"first-1"].iter().enumerate() {
        post_v1(&client, &server.upload_url(), "same.txt", chunk.0, chunk.1).await;
    }
    let (status, body) =
        json(post_v1(&client, &server.upload_url(), "same.txt", 0, b"second-0").await).await;
    assert_eq!(status, 200);
    let second = body["actualFilename"].as_str().unwrap().to_owned();
    assert_ne!(second, "same.txt");
    assert!(
        second.starts_with("same_") && second.ends_with(".txt"),
        "{second}"
    );
    let (_, body) =
        json(post_v1(&client, &server.upload_url(), "same.txt", 1, b"second-1").await).await;
    assert_eq!(body["actualFilename"], second.as_str());
    let files = visible_files(&out);
    assert_eq!(files.len(), 2);
    assert_eq!(files["same.txt"], b"first-0first-1");
    assert_eq!(files[&second], b"second-0second-1");
}

#[tokio::test]
async fn v1_repeated_out_of_order_and_orphan_chunks_never_corrupt_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let url = server.upload_url();

    // A chunk > 0 without a session is refused: there is no file to append to.
    let (status, body) = json(post_v1(&client, &url, "orphan.txt", 3, b"x").await).await;
    assert_eq!(status, 409);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("start with chunk 0"),
        "{body}"
    );

    assert_eq!(
        post_v1(&client, &url, "f.txt", 0, b"AAAA").await.status(),
        200
    );
    assert_eq!(
        post_v1(&client, &url, "f.txt", 1, b"BBBB").await.status(),
        200
    );
    // The reply to chunk 1 was lost and the client sends it again: not appended twice.
    let (status, body) = json(post_v1(&client, &url, "f.txt", 1, b"BBBB").await).await;
    assert_eq!(status, 200);
    assert_eq!(body["duplicate"], true);
    // The same index with other bytes is a conflict, not silently appended.
    assert_eq!(
        post_v1(&client, &url, "f.txt", 1, b"CCCC").await.status(),
        409
    );
    // A gap is refused with the expected index.
    let (status, body) = json(post_v1(&client, &url, "f.txt", 5, b"DDDD").await).await;
    assert_eq!(status, 409);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("next expected chunk is 2"),
        "{body}"
    );
    assert_eq!(
        post_v1(&client, &url, "f.txt", 2, b"EE").await.status(),
        200
    );
    assert_eq!(visible_files(&out)["f.txt"], b"AAAABBBBEE");
    assert!(!out.join("orphan.txt").exists());
}

#[tokio::test]
async fn v1_sessions_survive_a_receiver_restart() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    post_v1(&client, &server.upload_url(), "long.log", 0, b"part0;").await;
    server.restart().await;
    let (status, body) =
        json(post_v1(&client, &server.upload_url(), "long.log", 1, b"part1;").await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(visible_files(&out)["long.log"], b"part0;part1;");
}

#[tokio::test]
async fn missing_or_wrong_keys_get_the_originals_401() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &["-k", "second-key-abcdef"]).await;
    let client = reqwest::Client::new();
    let url = server.upload_url();
    let attempts = [
        client.post(&url).header("X-File-Name", "a.txt").body("x"),
        client
            .post(&url)
            .bearer_auth("wrong")
            .header("X-File-Name", "a.txt")
            .body("x"),
        client
            .post(&url)
            .bearer_auth(&KEY[..KEY.len() - 1])
            .header("X-File-Name", "a.txt")
            .body("x"),
        client
            .post(&url)
            .header("Authorization", KEY)
            .header("X-File-Name", "a.txt")
            .body("x"),
        client
            .post(&url)
            .header("Authorization", format!("Basic {KEY}"))
            .body("x"),
        client.get(format!("{}/upload/abcdefghijklmnopq", server.url)),
    ];
    for request in attempts {
        let (status, body) = json(request.send().await.unwrap()).await;
        assert_eq!(status, 401);
        assert_eq!(body, json!({"error": "Invalid or missing API key"}));
    }
    assert!(visible_files(&out).is_empty());
    // Both configured keys work.
    for key in [KEY, "second-key-abcdef"] {
        let r = client
            .post(&url)
            .bearer_auth(key)
            .header("X-File-Name", format!("{key}.txt"))
            .body("x");
        assert_eq!(r.send().await.unwrap().status(), 200);
    }
    assert_eq!(visible_files(&out).len(), 2);
}

#[tokio::test]
async fn health_cors_preflight_and_unknown_routes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("out"), &[]).await;
    let client = reqwest::Client::new();
    let (status, body) = json(
        client
            .get(format!("{}/health", server.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));

    let preflight = client
        .request(reqwest::Method::OPTIONS, server.upload_url())
        .header("Origin", "http://example.test")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    for name in [
        "Authorization",
        "X-File-Name",
        "X-Chunk-Index",
        "X-Upload-Id",
    ] {
        assert!(allowed.contains(name), "{name} missing from {allowed}");
    }

    for path in ["/nope", "/upload/a/b", "/.indexedcp/uploads.db"] {
        let r = client
            .get(format!("{}{path}", server.url))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let r = client
        .get(server.upload_url())
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn a_missing_file_name_uses_the_originals_default() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let r = client
        .post(server.upload_url())
        .bearer_auth(KEY)
        .body("data")
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, 200);
    assert_eq!(body["actualFilename"], "uploaded_file.txt");
    assert_eq!(body["chunkIndex"], 0);
    assert_eq!(visible_files(&out)["uploaded_file.txt"], b"data");
}
