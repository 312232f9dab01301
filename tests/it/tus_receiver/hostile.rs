//! Hostile and broken tus requests: each gets the status the tus spec names
//! (or 400 for a malformed header), changes nothing it should not, and
//! nothing is ever written outside the output directory.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::symlink;
use std::time::Duration;

use super::{TUS, create, metadata, offset, patch, tus};
use crate::fixtures::{KEY, Server, sha256_hex};
use crate::receiver_names::{hostile_names, must_refuse};
use crate::support::{eventually, pseudo_random, tree, visible_files};

/// Every hostile name of the receiver's table as the tus `filename`, in each
/// path mode: refused with 400 where the mode refuses it, and either way
/// nothing outside the output directory.
#[tokio::test]
async fn hostile_filenames_stay_inside_the_output_directory() {
    for mode in ["sanitize", "ignore", "allow-paths"] {
        let dir = tempfile::tempdir().unwrap();
        let (out, outside) = (dir.path().join("out"), dir.path().join("outside"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("target.txt"), b"sentinel").unwrap();
        symlink("../outside", out.join("link")).unwrap();
        symlink("../outside/target.txt", out.join("evil.txt")).unwrap();
        let before = tree(&outside);
        let server = Server::start(&out, &["--path-mode", mode]).await;
        let client = reqwest::Client::new();
        let mut accepted = BTreeSet::new();
        for (i, name) in hostile_names().iter().enumerate() {
            let body = format!("{mode} case {i}").into_bytes();
            let r = tus(&client, "POST", &format!("{}/files/", server.url))
                .header("Upload-Length", body.len().to_string())
                .header("Upload-Metadata", metadata(&[("filename", name)]))
                .header("Content-Type", "application/offset+octet-stream")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let shown = String::from_utf8_lossy(name);
            match r.status().as_u16() {
                201 => {
                    assert!(
                        !(mode != "ignore" && must_refuse(name)),
                        "{mode}: {shown:?} was accepted"
                    );
                    assert_eq!(
                        r.headers()["upload-offset"],
                        body.len().to_string().as_str()
                    );
                    accepted.insert(body);
                }
                400 => {}
                other => panic!("{mode}: {shown:?} got {other}: {:?}", r.text().await),
            }
        }
        assert_eq!(tree(&outside), before, "{mode}: something changed outside");
        let top: BTreeSet<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(top, ["out".to_string(), "outside".to_string()].into());
        // Inside: the planted links untouched, and each accepted file once.
        let mut got: BTreeMap<String, Vec<u8>> = visible_files(&out);
        assert_eq!(got.remove("link").as_deref(), Some(&b"-> ../outside"[..]));
        assert_eq!(
            got.remove("evil.txt").as_deref(),
            Some(&b"-> ../outside/target.txt"[..])
        );
        let contents: Vec<Vec<u8>> = got.into_values().collect();
        assert_eq!(contents.len(), accepted.len(), "{mode}: files written");
        assert_eq!(contents.into_iter().collect::<BTreeSet<_>>(), accepted);
        assert!(
            accepted.len() >= 10,
            "{mode}: only {} accepted",
            accepted.len()
        );
    }
}

/// The headers the spec requires, the statuses it names, and an upload left
/// as it was by every refused request.
#[tokio::test]
async fn bad_requests_get_the_spec_statuses_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(
        &out,
        &["--max-chunk-bytes", "64KiB", "--max-file-bytes", "1MiB"],
    )
    .await;
    let client = reqwest::Client::new();
    let base = server.url.clone();
    let files = format!("{base}/files/");

    // OPTIONS needs neither key nor version, and tells the limits.
    let r = client
        .request(reqwest::Method::OPTIONS, &files)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["tus-version"], TUS);
    assert_eq!(r.headers()["tus-max-size"], "1048576");
    assert_eq!(r.headers()["tus-checksum-algorithm"], "sha1,sha256");
    let extensions = r.headers()["tus-extension"].to_str().unwrap().to_owned();
    for e in [
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "termination",
        "expiration",
        "checksum",
    ] {
        assert!(extensions.split(',').any(|x| x == e), "{e} in {extensions}");
    }
    // A browser's preflight.
    let r = client
        .request(
            reqwest::Method::OPTIONS,
            format!("{files}0123456789abcdef0123"),
        )
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "PATCH")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    for h in [
        "Location",
        "Upload-Offset",
        "Upload-Length",
        "Tus-Resumable",
        "Upload-Expires",
    ] {
        assert!(exposed.contains(h), "{h} not exposed: {exposed}");
    }

    // Tus-Resumable missing or of another version: 412 with Tus-Version.
    for version in [None, Some("0.2.2"), Some("2.0.0")] {
        let mut request = client
            .post(&files)
            .header("Authorization", format!("Bearer {KEY}"))
            .header("Upload-Length", "5");
        if let Some(v) = version {
            request = request.header("Tus-Resumable", v);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), 412, "{version:?}");
        assert_eq!(r.headers()["tus-version"], TUS);
    }
    // No key: 401.
    let r = client
        .post(&files)
        .header("Tus-Resumable", TUS)
        .header("Upload-Length", "5")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Upload-Length: negative, not a number, missing: 400; over the maximum
    // or beyond 64 bits: 413.
    for (length, status) in [
        ("-1", 400),
        ("abc", 400),
        ("1.5", 400),
        ("1048577", 413),
        ("99999999999999999999999", 413),
    ] {
        let r = tus(&client, "POST", &files)
            .header("Upload-Length", length)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "Upload-Length {length}");
    }
    let r = tus(&client, "POST", &files).send().await.unwrap();
    assert_eq!(r.status(), 400, "no Upload-Length");
    let r = tus(&client, "POST", &files)
        .header("Upload-Length", "5")
        .header("Upload-Concat", "partial")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "concatenation");

    let data = pseudo_random(1000, 9);
    let url = create(
        &client,
        &base,
        1000,
        &metadata(&[("filename", b"kept.bin")]),
    )
    .await;
    assert_eq!(
        patch(&client, &url, 0, data[..100].to_vec()).await,
        (204, Some(100))
    );

    // Each refused PATCH leaves the offset at 100.
    let refused: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        (
            "offset behind",
            patch_req(&client, &url, "0", &data[..10]),
            409,
        ),
        (
            "offset ahead",
            patch_req(&client, &url, "500", &data[..10]),
            409,
        ),
        (
            "negative offset",
            patch_req(&client, &url, "-5", &data[..10]),
            400,
        ),
        (
            "offset not a number",
            patch_req(&client, &url, "1e2", &data[..10]),
            400,
        ),
        (
            "past the length",
            patch_req(&client, &url, "100", &pseudo_random(901, 1)),
            413,
        ),
        (
            "over max_chunk_bytes",
            {
                let big = create(&client, &base, 200_000, "").await;
                patch_req(&client, &big, "0", &pseudo_random(70_000, 2))
            },
            413,
        ),
        (
            "checksum mismatch",
            patch_req(&client, &url, "100", &data[100..200]).header(
                "Upload-Checksum",
                format!("sha256 {}", b64(&sha256(&data[..100]))),
            ),
            460,
        ),
        (
            "unsupported checksum",
            patch_req(&client, &url, "100", &data[100..200])
                .header("Upload-Checksum", "md5 AAAAAAAAAAAAAAAAAAAAAA=="),
            400,
        ),
        (
            "no Tus-Resumable",
            client
                .patch(&url)
                .header("Authorization", format!("Bearer {KEY}"))
                .header("Content-Type", "application/offset+octet-stream")
                .header("Upload-Offset", "100")
                .body(data[100..200].to_vec()),
            412,
        ),
        (
            "wrong content type",
            tus(&client, "PATCH", &url)
                .header("Content-Type", "application/octet-stream")
                .header("Upload-Offset", "100")
                .body(data[100..200].to_vec()),
            415,
        ),
        (
            "no Upload-Offset",
            tus(&client, "PATCH", &url)
                .header("Content-Type", "application/offset+octet-stream")
                .body(data[100..200].to_vec()),
            400,
        ),
    ];
    for (what, request, status) in refused {
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), status, "{what}: {:?}", r.text().await);
        assert_eq!(
            offset(&client, &url).await,
            (200, Some(100)),
            "after {what}"
        );
    }
    // A good sha1 checksum, then the rest through X-HTTP-Method-Override.
    let r = patch_req(&client, &url, "100", &data[100..600])
        .header(
            "Upload-Checksum",
            format!("sha1 {}", b64(&sha1(&data[100..600]))),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = tus(&client, "POST", &url)
        .header("X-HTTP-Method-Override", "PATCH")
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Offset", "600")
        .body(data[600..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["upload-offset"], "1000");
    assert!(
        r.headers().get("upload-expires").is_none(),
        "a complete upload does not expire"
    );
    // Complete: HEAD says so, and a PATCH past the end is refused.
    assert_eq!(offset(&client, &url).await, (200, Some(1000)));
    assert_eq!(patch(&client, &url, 1000, vec![1]).await.0, 413);

    // The metadata's sha256, checked before the rename: 460, nothing kept.
    let wrong = sha256_hex(b"something else");
    let bad = create(
        &client,
        &base,
        10,
        &metadata(&[("filename", b"bad.bin"), ("sha256", wrong.as_bytes())]),
    )
    .await;
    assert_eq!(patch(&client, &bad, 0, vec![7; 10]).await.0, 460);
    assert_eq!(offset(&client, &bad).await.0, 404);
    let right = sha256_hex(&[7; 10]);
    let good = create(
        &client,
        &base,
        10,
        &metadata(&[("filename", b"good.bin"), ("sha256", right.as_bytes())]),
    )
    .await;
    assert_eq!(patch(&client, &good, 0, vec![7; 10]).await, (204, Some(10)));

    // Termination: 204, then the upload is gone for every method.
    let doomed = create(
        &client,
        &base,
        50,
        &metadata(&[("filename", b"doomed.bin")]),
    )
    .await;
    assert_eq!(patch(&client, &doomed, 0, vec![1; 20]).await.0, 204);
    let r = tus(&client, "DELETE", &doomed).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(patch(&client, &doomed, 20, vec![1; 30]).await.0, 404);
    assert_eq!(offset(&client, &doomed).await.0, 404);
    assert_eq!(
        tus(&client, "DELETE", &doomed)
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // Unknown and malformed ids.
    for id in ["0123456789abcdef0123", "..", "%2e%2e%2fetc", "short"] {
        assert_eq!(
            offset(&client, &format!("{files}{id}")).await.0,
            404,
            "{id}"
        );
    }

    // A deferred length, given with a later PATCH.
    let r = tus(&client, "POST", &files)
        .header("Upload-Defer-Length", "1")
        .header(
            "Upload-Metadata",
            metadata(&[("filename", b"deferred.bin")]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let deferred = format!("{base}{}", r.headers()["location"].to_str().unwrap());
    let r = tus(&client, "HEAD", &deferred).send().await.unwrap();
    assert_eq!(r.headers()["upload-defer-length"], "1");
    assert_eq!(
        patch(&client, &deferred, 0, vec![3; 40]).await,
        (204, Some(40))
    );
    let r = patch_req(&client, &deferred, "40", &[4; 60])
        .header("Upload-Length", "100")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(offset(&client, &deferred).await, (200, Some(100)));

    let mut deferred_bytes = vec![3u8; 40];
    deferred_bytes.extend([4u8; 60]);
    let expected: BTreeMap<String, Vec<u8>> = [
        ("kept.bin".to_owned(), data),
        ("good.bin".to_owned(), vec![7; 10]),
        ("deferred.bin".to_owned(), deferred_bytes),
    ]
    .into();
    assert_eq!(visible_files(&out), expected);
}

/// An upload untouched for `incomplete_expiry` is gone with its staged bytes,
/// after it announced when with `Upload-Expires`.
#[tokio::test]
async fn an_abandoned_upload_expires() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &["--incomplete-expiry", "2s"]).await;
    let client = reqwest::Client::new();
    let r = tus(&client, "POST", &format!("{}/files/", server.url))
        .header("Upload-Length", "100")
        .send()
        .await
        .unwrap();
    let expires = r.headers()["upload-expires"].to_str().unwrap().to_owned();
    assert!(expires.ends_with(" GMT"), "{expires}");
    let url = format!(
        "{}{}",
        server.url,
        r.headers()["location"].to_str().unwrap()
    );
    assert_eq!(patch(&client, &url, 0, vec![1; 10]).await.0, 204);
    let staging = out.join(".indexedcp/staging");
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 1);
    eventually(
        Duration::from_secs(20),
        "the upload to expire",
        async || (offset(&client, &url).await.0 == 404).then_some(()),
    )
    .await;
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 0);
    assert!(visible_files(&out).is_empty());
}

fn patch_req(
    client: &reqwest::Client,
    url: &str,
    at: &str,
    bytes: &[u8],
) -> reqwest::RequestBuilder {
    tus(client, "PATCH", url)
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Offset", at)
        .body(bytes.to_vec())
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).to_vec()
}

fn sha1(bytes: &[u8]) -> Vec<u8> {
    use sha1::Digest;
    sha1::Sha1::digest(bytes).to_vec()
}
