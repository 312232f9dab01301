//! The resumable extension: chunks in any order, duplicates, corruption,
//! conflicts, status queries and SIGKILL of the receiver between chunks.

use std::time::Duration;

use crate::fixtures::*;
use crate::support::*;

const CHUNK: usize = 64 * 1024;

async fn send(
    client: &reqwest::Client,
    url: &str,
    chunk: &ResumableChunk<'_>,
) -> (u16, serde_json::Value) {
    announced(chunk.request(client, url), "x-indexedcp-resumable").await
}

/// The reply to `request`, which must carry `announcement: 1`.
async fn announced(
    request: reqwest::RequestBuilder,
    announcement: &str,
) -> (u16, serde_json::Value) {
    let response = request.send().await.unwrap();
    assert_eq!(
        response
            .headers()
            .get(announcement)
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    json(response).await
}

fn chunk<'a>(id: &'a str, name: &'a str, file: &'a [u8], index: usize) -> ResumableChunk<'a> {
    ResumableChunk {
        upload_id: id,
        name,
        file,
        chunk_size: CHUNK,
        index,
    }
}

#[tokio::test]
async fn out_of_order_duplicated_and_corrupted_chunks_give_one_identical_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let url = server.upload_url();
    let file = pseudo_random(5 * CHUNK + 123, 7);
    let id = "resumable-test-000001";
    let n = 6;

    for index in [4, 1, 5, 0] {
        let (status, reply) = send(&client, &url, &chunk(id, "data.bin", &file, index)).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["complete"], false);
        assert_eq!(reply["duplicate"], serde_json::Value::Null);
    }
    // Nothing is visible before the last chunk.
    assert!(visible_files(&out).is_empty());

    // The same chunk again: acknowledged as a duplicate.
    let (status, reply) = send(&client, &url, &chunk(id, "data.bin", &file, 1)).await;
    assert_eq!((status, reply["duplicate"].as_bool()), (200, Some(true)));

    // A corrupted body (header hash of the real bytes): 422, nothing recorded.
    let good = chunk(id, "data.bin", &file, 2);
    let mut bad_body = good.body().to_vec();
    bad_body[100] ^= 0x01;
    let response = good
        .request(&client, &url)
        .body(bad_body.clone())
        .send()
        .await
        .unwrap();
    let (status, reply) = json(response).await;
    assert_eq!(status, 422, "{reply}");
    let status_url = format!("{}/upload/{id}", server.url);
    let (_, report) = json(
        client
            .get(&status_url)
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(report["receivedChunks"], serde_json::json!([0, 1, 4, 5]));
    assert_eq!(report["complete"], false);

    // Another body declared with its own hash for a recorded chunk: 409.
    let overrides = [
        ("X-Chunk-Index", "1".to_string()),
        ("X-Chunk-Offset", CHUNK.to_string()),
        ("X-Chunk-Sha256", sha256_hex(&bad_body)),
    ];
    let conflicting = good
        .request_with(&client, &url, &overrides)
        .body(bad_body)
        .send()
        .await
        .unwrap();
    assert_eq!(conflicting.status(), 409);

    for index in [2, 3] {
        let (status, reply) = send(&client, &url, &chunk(id, "data.bin", &file, index)).await;
        assert_eq!(status, 200, "{reply}");
        if index == 3 {
            assert_eq!(reply["complete"], true);
            assert_eq!(reply["actualFilename"], "data.bin");
        }
    }
    // A chunk repeated after completion (its reply was lost): the same answer.
    for index in [3, 0] {
        let (status, reply) = send(&client, &url, &chunk(id, "data.bin", &file, index)).await;
        assert_eq!((status, reply["complete"].as_bool()), (200, Some(true)));
        assert_eq!(reply["actualFilename"], "data.bin");
    }
    let (_, report) = json(
        client
            .get(&status_url)
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(report["complete"], true);
    assert_eq!(report["actualFilename"], "data.bin");
    assert_eq!(report["receivedChunks"].as_array().unwrap().len(), n);
    assert_eq!(visible_files(&out), [("data.bin".to_string(), file)].into());
}

#[tokio::test]
async fn a_whole_file_mismatch_is_refused_and_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let file = pseudo_random(1000, 3);
    let id = "mismatch-upload-0001";
    let one = chunk(id, "m.bin", &file, 0);
    let response = one
        .request_with(
            &client,
            &server.upload_url(),
            &[("X-File-Sha256", "ab".repeat(32))],
        )
        .send()
        .await
        .unwrap();
    let (status, reply) = json(response).await;
    assert_eq!(status, 422, "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("discarded"),
        "{reply}"
    );
    assert!(visible_files(&out).is_empty());
    assert_eq!(
        std::fs::read_dir(out.join(".indexedcp/staging"))
            .unwrap()
            .count(),
        0
    );
    // The upload id is free again: the correct file goes through.
    let (status, reply) = send(&client, &server.upload_url(), &one).await;
    assert_eq!((status, reply["complete"].as_bool()), (200, Some(true)));
    assert_eq!(visible_files(&out)["m.bin"], file);
}

/// The receiver follows each file's SHA-256 as its chunks arrive instead of
/// reading the file back; a refused chunk that wrote over bytes already
/// received must still be caught by the whole-file check.
#[tokio::test]
async fn a_refused_chunk_written_over_received_bytes_is_caught_at_completion() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let url = server.upload_url();
    let file = pseudo_random(3 * CHUNK, 11);
    let id = "overwritten-upload-01";

    let (status, reply) = send(&client, &url, &chunk(id, "o.bin", &file, 0)).await;
    assert_eq!(status, 200, "{reply}");
    // Chunk 1 declared at offset 0 with a body that does not match its hash:
    // refused, but only after its bytes went over chunk 0's.
    let second = chunk(id, "o.bin", &file, 1);
    let response = second
        .request_with(&client, &url, &[("X-Chunk-Offset", "0".to_string())])
        .body(vec![0xEE; CHUNK])
        .send()
        .await
        .unwrap();
    let (status, reply) = json(response).await;
    assert_eq!(status, 422, "{reply}");

    let (status, reply) = send(&client, &url, &second).await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = send(&client, &url, &chunk(id, "o.bin", &file, 2)).await;
    assert_eq!(status, 422, "the damaged file must not complete: {reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("discarded"),
        "{reply}"
    );
    assert!(visible_files(&out).is_empty());

    // Sent again from its first chunk, the file arrives intact.
    for index in 0..3 {
        let (status, reply) = send(&client, &url, &chunk(id, "o.bin", &file, index)).await;
        assert_eq!(status, 200, "{reply}");
    }
    assert_eq!(visible_files(&out), [("o.bin".to_string(), file)].into());
}

#[tokio::test]
async fn an_upload_id_reused_for_another_file_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("out"), &[]).await;
    let client = reqwest::Client::new();
    let a = pseudo_random(3 * CHUNK, 1);
    let b = pseudo_random(3 * CHUNK, 2);
    assert_eq!(
        send(
            &client,
            &server.upload_url(),
            &chunk("reused-id-000000001", "a", &a, 0)
        )
        .await
        .0,
        200
    );
    let (status, reply) = json(
        chunk("reused-id-000000001", "a", &b, 1)
            .request(&client, &server.upload_url())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409, "{reply}");
}

#[tokio::test]
async fn empty_files_and_existing_names_in_resumable_mode() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let (status, reply) = send(
        &client,
        &server.upload_url(),
        &chunk("empty-file-00000001", "empty.txt", b"", 0),
    )
    .await;
    assert_eq!((status, reply["complete"].as_bool()), (200, Some(true)));
    let (_, reply) = send(
        &client,
        &server.upload_url(),
        &chunk("empty-file-00000002", "empty.txt", b"x", 0),
    )
    .await;
    let second = reply["actualFilename"].as_str().unwrap().to_owned();
    assert_ne!(second, "empty.txt");
    let files = visible_files(&out);
    assert_eq!(files["empty.txt"], b"");
    assert_eq!(files[&second], b"x");
}

#[tokio::test]
async fn sigkill_between_chunks_loses_nothing_and_shows_nothing_partial() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let file = pseudo_random(8 * CHUNK + 5, 11);
    let id = "killed-receiver-00001";
    for index in [0, 2, 4, 6, 8] {
        assert_eq!(
            send(
                &client,
                &server.upload_url(),
                &chunk(id, "k.bin", &file, index)
            )
            .await
            .0,
            200
        );
    }
    server.kill(); // SIGKILL
    assert!(visible_files(&out).is_empty());
    server.restart().await;
    let (_, report) = json(
        client
            .get(format!("{}/upload/{id}", server.url))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(report["receivedChunks"], serde_json::json!([0, 2, 4, 6, 8]));
    for index in [1, 3, 5] {
        assert_eq!(
            send(
                &client,
                &server.upload_url(),
                &chunk(id, "k.bin", &file, index)
            )
            .await
            .0,
            200
        );
    }
    server.kill();
    server.restart().await;
    assert!(visible_files(&out).is_empty());
    let (status, reply) = send(&client, &server.upload_url(), &chunk(id, "k.bin", &file, 7)).await;
    assert_eq!(
        (status, reply["complete"].as_bool()),
        (200, Some(true)),
        "{reply}"
    );
    server.kill();
    server.restart().await;
    // After yet another restart the completed id is remembered: no second copy.
    let (status, reply) = send(&client, &server.upload_url(), &chunk(id, "k.bin", &file, 7)).await;
    assert_eq!((status, reply["complete"].as_bool()), (200, Some(true)));
    assert_eq!(visible_files(&out), [("k.bin".to_string(), file)].into());
}

#[tokio::test]
async fn concurrent_chunks_of_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let file = std::sync::Arc::new(pseudo_random(32 * CHUNK, 5));
    let url = server.upload_url();
    let mut tasks = Vec::new();
    for index in 0..32 {
        let (client, url, file) = (client.clone(), url.clone(), file.clone());
        // Every chunk twice, at the same time.
        for _ in 0..2 {
            let (client, url, file) = (client.clone(), url.clone(), file.clone());
            tasks.push(tokio::spawn(async move {
                let c = chunk("concurrent-upload-01", "c.bin", &file, index);
                c.request(&client, &url)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    let expected = file.to_vec();
    eventually(Duration::from_secs(5), "the file", async || {
        (visible_files(&out).get("c.bin") == Some(&expected)).then_some(())
    })
    .await;
    assert_eq!(visible_files(&out).len(), 1);
}

#[tokio::test]
async fn chunks_may_come_before_the_file_hash_and_the_upload_completes_once_it_is_known() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let url = server.upload_url();
    let client = reqwest::Client::new();
    let file = pseudo_random(3 * CHUNK + 100, 5);
    let id = "streaming-0123456789abcdef";
    let reply = |r: reqwest::Response| async move {
        assert_eq!(
            r.headers()
                .get("x-indexedcp-streaming")
                .map(|v| v.to_str().unwrap()),
            Some("1")
        );
        json(r).await
    };
    // Every chunk without the file's hash: all recorded, not complete.
    for index in 0..4 {
        let c = chunk(id, "streamed.bin", &file, index);
        let (status, body) = reply(
            c.request_without_file_hash(&client, &url)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["complete"], false, "{body}");
    }
    assert!(!dir.path().join("streamed.bin").exists());
    let status = client
        .get(format!("{url}/{id}"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let (code, body) = json(status).await;
    assert_eq!(code, 200);
    assert_eq!(body["complete"], false, "{body}");
    assert_eq!(body["receivedChunks"], serde_json::json!([0, 1, 2, 3]));

    // The last chunk again, with the file's hash: recorded, and the upload
    // completes in the same request.
    let last = chunk(id, "streamed.bin", &file, 3);
    let (code, body) = send(&client, &url, &last).await;
    assert_eq!(
        (code, &body["complete"]),
        (200, &serde_json::json!(true)),
        "{body}"
    );
    assert_eq!(body["duplicate"], true, "{body}");
    assert_eq!(
        std::fs::read(dir.path().join("streamed.bin")).unwrap(),
        file
    );
    let other = "ab".repeat(32);
    let response = last
        .request_with(&client, &url, &[("X-File-Sha256", other)])
        .send()
        .await
        .unwrap();
    // Another file under the same id: a conflict, and the file stays.
    assert_eq!(response.status().as_u16(), 409);
    assert_eq!(
        std::fs::read(dir.path().join("streamed.bin")).unwrap(),
        file
    );

    // A second upload: the hash comes with its first chunk, a different one
    // with a later chunk is a conflict, and the right one completes it.
    let id2 = "streaming-second-0123456789";
    let first = chunk(id2, "second.bin", &file, 0);
    let (code, _) = send(&client, &url, &first).await;
    assert_eq!(code, 200);
    let wrong = chunk(id2, "second.bin", &file, 1)
        .request_with(&client, &url, &[("X-File-Sha256", "cd".repeat(32))])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 409);
    for index in 1..4 {
        let c = chunk(id2, "second.bin", &file, index);
        let (code, body) = json(
            c.request_without_file_hash(&client, &url)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["complete"], index == 3, "{body}");
    }
    assert_eq!(std::fs::read(dir.path().join("second.bin")).unwrap(), file);
}

/// Sends `chunk` checked by its CRC-32C alone; the reply must announce that
/// the receiver takes such chunks.
async fn send_crc32c(
    client: &reqwest::Client,
    url: &str,
    chunk: &ResumableChunk<'_>,
) -> (u16, serde_json::Value) {
    announced(chunk.request_crc32c(client, url), "x-indexedcp-crc32c").await
}

#[tokio::test]
async fn chunks_checked_by_crc32c_alone_give_one_identical_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let url = server.upload_url();
    let status_url = |id: &str| format!("{}/upload/{id}", server.url);
    let file = pseudo_random(5 * CHUNK + 123, 11);
    let id = "crc32c-upload-00000001";

    // Out of order: chunks ahead of the hashed prefix, and the prefix's own.
    for index in [3, 1, 0, 5] {
        let (status, reply) = send_crc32c(&client, &url, &chunk(id, "c.bin", &file, index)).await;
        assert_eq!(
            (status, &reply["complete"]),
            (200, &serde_json::json!(false)),
            "{reply}"
        );
    }
    // A body damaged on the way (the header has the real bytes' CRC): 422,
    // nothing recorded.
    let good = chunk(id, "c.bin", &file, 2);
    let mut bad_body = good.body().to_vec();
    bad_body[CHUNK / 2] ^= 0x10;
    let response = good
        .request_crc32c(&client, &url)
        .body(bad_body.clone())
        .send()
        .await
        .unwrap();
    let (status, reply) = json(response).await;
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["error"], "Chunk checksum mismatch", "{reply}");
    let message = reply["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("CRC-32C {:08x}", crc32c::crc32c(&bad_body)))
            && message.contains("X-Chunk-Crc32c")
            && message.contains("send the chunk again"),
        "{message}"
    );
    let (_, report) = json(
        client
            .get(status_url(id))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(report["receivedChunks"], serde_json::json!([0, 1, 3, 5]));

    // A recorded chunk again with its CRC: a duplicate. With the SHA-256 (a
    // check of the other kind): checked against it, and a duplicate too.
    let again = chunk(id, "c.bin", &file, 1);
    let (status, reply) = send_crc32c(&client, &url, &again).await;
    assert_eq!(
        (status, reply["duplicate"].as_bool()),
        (200, Some(true)),
        "{reply}"
    );
    let (status, reply) = send(&client, &url, &again).await;
    assert_eq!(
        (status, reply["duplicate"].as_bool()),
        (200, Some(true)),
        "{reply}"
    );
    // Another body with its own CRC for a recorded chunk: 409.
    let other = pseudo_random(CHUNK, 99);
    let crc = format!("{:08x}", crc32c::crc32c(&other));
    let mut request = again
        .request_with(&client, &url, &[("X-Chunk-Crc32c", crc)])
        .body(other)
        .build()
        .unwrap();
    request.headers_mut().remove("x-chunk-sha256");
    assert_eq!(client.execute(request).await.unwrap().status(), 409);

    for index in [2, 4] {
        let (status, reply) = send_crc32c(&client, &url, &chunk(id, "c.bin", &file, index)).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["complete"], index == 4, "{reply}");
    }
    assert_eq!(visible_files(&out), [("c.bin".to_string(), file)].into());
}

#[tokio::test]
async fn a_file_checked_by_crc32c_is_still_verified_whole() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let url = server.upload_url();
    // One chunk: its SHA-256 is the file's, worked out although the chunk
    // is checked by its CRC.
    let small = pseudo_random(1000, 12);
    let (status, reply) = send_crc32c(
        &client,
        &url,
        &chunk("crc32c-single-0001", "s.bin", &small, 0),
    )
    .await;
    assert_eq!(
        (status, &reply["complete"]),
        (200, &serde_json::json!(true)),
        "{reply}"
    );
    // Every chunk matches its CRC, but the file is not the declared one.
    let file = pseudo_random(3 * CHUNK, 13);
    let id = "crc32c-wrong-file-0001";
    let wrong = "ab".repeat(32);
    let mut last = (0, serde_json::Value::Null);
    for index in 0..3 {
        let c = chunk(id, "w.bin", &file, index);
        let mut request = c.request_crc32c(&client, &url).build().unwrap();
        request
            .headers_mut()
            .insert("x-file-sha256", wrong.parse().unwrap());
        last = json(client.execute(request).await.unwrap()).await;
        if index < 2 {
            assert_eq!(last.0, 200, "{}", last.1);
        }
    }
    let (status, reply) = last;
    assert_eq!(
        (status, &reply["error"]),
        (422, &serde_json::json!("File checksum mismatch")),
        "{reply}"
    );
    assert_eq!(visible_files(&out), [("s.bin".to_string(), small)].into());
}

#[tokio::test]
async fn a_chunk_without_a_check_or_with_a_malformed_crc_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let client = reqwest::Client::new();
    let url = server.upload_url();
    let file = pseudo_random(100, 14);
    let c = chunk("crc32c-bad-header-01", "b.bin", &file, 0);
    let mut request = c.request(&client, &url).build().unwrap();
    request.headers_mut().remove("x-chunk-sha256");
    let (status, reply) = json(client.execute(request).await.unwrap()).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("X-Chunk-Sha256 (or X-Chunk-Crc32c) is required"),
        "{reply}"
    );
    let mut request = c.request_crc32c(&client, &url).build().unwrap();
    request
        .headers_mut()
        .insert("x-chunk-crc32c", "0x1234".parse().unwrap());
    let (status, reply) = json(client.execute(request).await.unwrap()).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap()
            .contains("X-Chunk-Crc32c must be 8 hex digits"),
        "{reply}"
    );
    assert!(visible_files(dir.path()).is_empty());
}
