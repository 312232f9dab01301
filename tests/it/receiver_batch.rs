//! The batch extension: many whole small files in one `POST /upload/batch`,
//! each answered as a single request for it would be, exactly once.

use std::collections::BTreeMap;

use crate::fixtures::*;
use crate::support::*;

/// One file of a batch: upload id, client name, bytes, and the SHA-256 the
/// manifest declares (the real one unless a test lies).
struct Entry<'a> {
    id: &'a str,
    name: &'a str,
    bytes: &'a [u8],
    sha256: String,
}

fn entry<'a>(id: &'a str, name: &'a str, bytes: &'a [u8]) -> Entry<'a> {
    Entry {
        id,
        name,
        bytes,
        sha256: sha256_hex(bytes),
    }
}

/// The manifest's length and the whole body.
fn batch_body(entries: &[Entry<'_>]) -> (usize, Vec<u8>) {
    let files: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            serde_json::json!({"uploadId": e.id, "fileName": e.name,
                "size": e.bytes.len(), "sha256": e.sha256})
        })
        .collect();
    let mut body = serde_json::to_vec(&serde_json::json!({ "files": files })).unwrap();
    let manifest_len = body.len();
    for e in entries {
        body.extend_from_slice(e.bytes);
    }
    (manifest_len, body)
}

async fn post_batch(
    client: &reqwest::Client,
    server: &Server,
    manifest_len: Option<usize>,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let mut request = client
        .post(format!("{}/upload/batch", server.url))
        .bearer_auth(KEY)
        .body(body);
    if let Some(len) = manifest_len {
        request = request.header("X-Manifest-Length", len);
    }
    json(request.send().await.unwrap()).await
}

/// One chunk sent as a single request: status and JSON reply.
async fn send_single(
    client: &reqwest::Client,
    server: &Server,
    chunk: &ResumableChunk<'_>,
) -> (u16, serde_json::Value) {
    json(
        chunk
            .request(client, &server.upload_url())
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// The status of `GET /upload/<id>`.
async fn status_of(client: &reqwest::Client, server: &Server, id: &str) -> u16 {
    client
        .get(format!("{}/upload/{id}", server.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn staging_entries(out: &std::path::Path) -> usize {
    std::fs::read_dir(out.join(".indexedcp/staging"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_batch_delivers_each_file_once_and_answers_each_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();

    // The receiver announces batches on its upload routes.
    let probe = client
        .get(format!("{}/upload/batch-probe-00000000", server.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        probe
            .headers()
            .get("x-indexedcp-batch")
            .map(|v| v.to_str().unwrap()),
        Some("1024")
    );

    let a = pseudo_random(4096, 1);
    let b = pseudo_random(1, 2);
    let empty: Vec<u8> = Vec::new();
    let damaged = pseudo_random(3000, 3);
    let mut lie = entry("batch-test-damaged-0001", "damaged.bin", &damaged);
    lie.sha256 = sha256_hex(b"something else");
    let entries = [
        entry("batch-test-file-a-00001", "a.bin", &a),
        lie,
        entry("batch-test-bad-name-001", "../escape.bin", &b),
        entry("batch-test-file-b-00001", "b.bin", &b),
        entry("batch-test-empty-00001", "empty.txt", &empty),
    ];
    let (len, body) = batch_body(&entries);
    let (status, reply) = post_batch(&client, &server, Some(len), body.clone()).await;
    assert_eq!(status, 200, "{reply}");
    let results = reply["files"].as_array().unwrap();
    assert_eq!(results.len(), 5, "{reply}");
    let ids: Vec<&str> = results
        .iter()
        .map(|r| r["uploadId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, entries.iter().map(|e| e.id).collect::<Vec<_>>());
    assert_eq!(
        (
            results[0]["complete"].as_bool(),
            results[0]["actualFilename"].as_str()
        ),
        (Some(true), Some("a.bin"))
    );
    assert_eq!(
        (
            results[1]["complete"].as_bool(),
            results[1]["status"].as_u64()
        ),
        (Some(false), Some(422)),
        "{reply}"
    );
    assert_eq!(
        (results[2]["status"].as_u64(), results[2]["error"].as_str()),
        (Some(400), Some("Invalid filename")),
        "{reply}"
    );
    assert_eq!(results[3]["actualFilename"], "b.bin");
    assert_eq!(results[4]["actualFilename"], "empty.txt");
    let expected: BTreeMap<String, Vec<u8>> = [
        ("a.bin".to_owned(), a.clone()),
        ("b.bin".to_owned(), b.clone()),
        ("empty.txt".to_owned(), empty.clone()),
    ]
    .into();
    assert_eq!(visible_files(&out), expected);
    assert_eq!(
        staging_entries(&out),
        0,
        "the refused files left staging data"
    );

    // The same batch again (its reply was lost): the same answers, no copies.
    let (status, again) = post_batch(&client, &server, Some(len), body).await;
    assert_eq!(status, 200, "{again}");
    for i in [0, 3, 4] {
        assert_eq!(
            again["files"][i]["actualFilename"],
            reply["files"][i]["actualFilename"]
        );
        assert_eq!(again["files"][i]["duplicate"], true, "{again}");
    }
    assert_eq!(again["files"][1]["status"], 422);
    assert_eq!(visible_files(&out), expected);

    // A file of the batch sent again as a single request: the same answer.
    let single = ResumableChunk {
        upload_id: "batch-test-file-a-00001",
        name: "a.bin",
        file: &a,
        chunk_size: 1 << 20,
        index: 0,
    };
    let (status, one) = send_single(&client, &server, &single).await;
    assert_eq!(
        (status, one["complete"].as_bool()),
        (200, Some(true)),
        "{one}"
    );
    assert_eq!(one["actualFilename"], "a.bin");

    // And the status route knows every file of the batch.
    let (status, report) = json(
        client
            .get(format!("{}/upload/batch-test-file-b-00001", server.url))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, report["complete"].as_bool()), (200, Some(true)));
    assert_eq!(report["actualFilename"], "b.bin");
    assert_eq!(visible_files(&out), expected);
}

#[tokio::test]
async fn a_file_first_sent_alone_and_a_taken_name_are_settled_in_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    let first = pseudo_random(5000, 10);
    let (status, _) = send_single(
        &client,
        &server,
        &ResumableChunk {
            upload_id: "batch-alone-first-0001",
            name: "report.csv",
            file: &first,
            chunk_size: 1 << 20,
            index: 0,
        },
    )
    .await;
    assert_eq!(status, 200);

    let second = pseudo_random(6000, 11);
    let entries = [
        entry("batch-alone-first-0001", "report.csv", &first),
        entry("batch-other-report-001", "report.csv", &second),
    ];
    let (len, body) = batch_body(&entries);
    let (status, reply) = post_batch(&client, &server, Some(len), body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["files"][0]["actualFilename"], "report.csv");
    assert_eq!(reply["files"][0]["duplicate"], true);
    let renamed = reply["files"][1]["actualFilename"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(renamed, "report.csv", "{reply}");
    assert_eq!(reply["files"][1]["duplicate"], serde_json::Value::Null);
    let expected: BTreeMap<String, Vec<u8>> =
        [("report.csv".to_owned(), first), (renamed, second)].into();
    assert_eq!(visible_files(&out), expected);
}

#[tokio::test]
async fn malformed_batches_are_refused_whole_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &["--max-chunk-bytes", "8KiB"]).await;
    let client = reqwest::Client::new();
    let a = pseudo_random(3000, 20);
    let b = pseudo_random(3000, 21);
    let good = [
        entry("malformed-batch-a-0001", "a.bin", &a),
        entry("malformed-batch-b-0001", "b.bin", &b),
    ];
    let (len, body) = batch_body(&good);

    // No key.
    let response = client
        .post(format!("{}/upload/batch", server.url))
        .header("X-Manifest-Length", len)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let cases = [
        (
            "no manifest length",
            None,
            body.clone(),
            "X-Manifest-Length",
        ),
        (
            "manifest not JSON",
            Some(5),
            b"nope!".to_vec(),
            "not valid JSON",
        ),
        (
            "body ends inside a file",
            Some(len),
            body[..body.len() - 10].to_vec(),
            "ended inside file",
        ),
        (
            "body longer than the files",
            Some(len),
            [body.as_slice(), b"extra"].concat(),
            "longer than the files",
        ),
        (
            "manifest longer than the body",
            Some(body.len() + 100),
            body.clone(),
            "before the",
        ),
    ];
    for (what, manifest_len, body, says) in cases {
        let (status, reply) = post_batch(&client, &server, manifest_len, body).await;
        assert_eq!(status, 400, "{what}: {reply}");
        let message = reply["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{what}: {reply}");
    }

    let twice = [
        entry("malformed-batch-a-0001", "a.bin", &a),
        entry("malformed-batch-a-0001", "b.bin", &b),
    ];
    let (len, body) = batch_body(&twice);
    let (status, reply) = post_batch(&client, &server, Some(len), body).await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("appears twice"));

    // More bytes of files than max_chunk_bytes (8 KiB).
    let big = pseudo_random(6000, 22);
    let too_much = [
        entry("malformed-batch-a-0001", "a.bin", &a),
        entry("malformed-batch-c-0001", "c.bin", &big),
    ];
    let (len, body) = batch_body(&too_much);
    let (status, reply) = post_batch(&client, &server, Some(len), body).await;
    assert_eq!(status, 413, "{reply}");

    assert!(visible_files(&out).is_empty());
    assert_eq!(staging_entries(&out), 0);
    // None of it was recorded: the ids are unknown to the status route.
    assert_eq!(
        status_of(&client, &server, "malformed-batch-a-0001").await,
        404
    );

    // The well-formed batch still goes through afterwards.
    let (len, body) = batch_body(&good);
    let (status, reply) = post_batch(&client, &server, Some(len), body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        visible_files(&out),
        [("a.bin".to_owned(), a), ("b.bin".to_owned(), b)].into()
    );
}

#[tokio::test]
async fn a_batch_body_cut_at_its_limit_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &["--max-chunk-bytes", "8KiB"]).await;
    let client = reqwest::Client::new();
    // A file as large as the limit: every byte the manifest promises, then
    // more, sent without a length so that only reading the body finds out.
    // The receiver stops reading at the limit, right where the file ends.
    let a = pseudo_random(8 << 10, 30);
    let (len, body) = batch_body(&[entry("cut-at-limit-a-000001", "a.bin", &a)]);
    let frames: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(body[..len].to_vec()),
        Ok(body[len..].to_vec()),
        Ok(vec![0u8; 1000]),
    ];
    let response = client
        .post(format!("{}/upload/batch", server.url))
        .bearer_auth(KEY)
        .header("X-Manifest-Length", len)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(frames)))
        .send()
        .await
        .unwrap();
    let (status, reply) = json(response).await;
    assert_eq!(status, 413, "{reply}");
    assert!(visible_files(&out).is_empty());
    assert_eq!(staging_entries(&out), 0);
    assert_eq!(
        status_of(&client, &server, "cut-at-limit-a-000001").await,
        404,
        "the file was recorded"
    );
}

#[tokio::test]
async fn staging_files_of_no_upload_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut server = Server::start(&out, &[]).await;
    let client = reqwest::Client::new();
    // An upload in progress: its staging file must survive a restart.
    let file = pseudo_random(3 * 1024, 40);
    let first = ResumableChunk {
        upload_id: "sweep-in-progress-0001",
        name: "kept.bin",
        file: &file,
        chunk_size: 1024,
        index: 0,
    };
    let (status, _) = send_single(&client, &server, &first).await;
    assert_eq!(status, 200);
    // What a batch stopped before recording its files leaves behind.
    let staging = out.join(".indexedcp/staging");
    std::fs::write(staging.join("sweep-orphan-000000001"), b"orphan").unwrap();
    server.restart().await;
    let names: Vec<String> = eventually(
        std::time::Duration::from_secs(10),
        "the orphan to be removed",
        async || {
            let names: Vec<String> = std::fs::read_dir(&staging)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            (!names.iter().any(|n| n.starts_with("sweep-orphan"))).then_some(names)
        },
    )
    .await;
    assert_eq!(names, ["sweep-in-progress-0001"]);
    // The upload goes on after the restart.
    for index in 1..3 {
        let chunk = ResumableChunk { index, ..first };
        let (status, reply) = send_single(&client, &server, &chunk).await;
        assert_eq!(status, 200, "{reply}");
    }
    assert_eq!(visible_files(&out), [("kept.bin".to_owned(), file)].into());
}
