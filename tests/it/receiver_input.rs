//! Hostile or unlucky client input against the real receiver: a declared file
//! size beyond the disk gets a clear 507 that stores nothing and logs no
//! ERROR; wrong API keys by the thousand leave an audit trail of a few lines
//! naming the address and the count, while good requests keep working.

use std::time::Duration;

use crate::fixtures::*;
use crate::receiver_load::LoggedServer;
use crate::support::*;

/// Bytes free for an unprivileged user on the file system of `path`.
fn free_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string and a zeroed struct for the call to fill in.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut s), 0);
        s.f_bavail * s.f_frsize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_size_beyond_the_disk_gets_507_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = LoggedServer::start(dir.path(), &[], None).await;
    let client = reqwest::Client::new();
    let body = b"0123456789";
    let free = free_bytes(dir.path());
    // 2^62 (beyond what the file system allows in one file) and 1 TiB (or
    // twice the free space, if more is free here): each with its last chunk.
    for (i, size) in [1u64 << 62, (1u64 << 40).max(free * 2)]
        .into_iter()
        .enumerate()
    {
        let upload_id = format!("too-big-for-disk-{i:04}");
        let offset = size - body.len() as u64;
        let response = client
            .post(server.upload_url())
            .bearer_auth(KEY)
            .header("X-File-Name", "huge.bin")
            .header("X-Upload-Id", &upload_id)
            .header("X-Chunk-Index", "1")
            .header("X-Chunk-Count", "2")
            .header("X-Chunk-Offset", offset.to_string())
            .header("X-File-Size", size.to_string())
            .header("X-Chunk-Sha256", sha256_hex(body))
            .header("X-File-Sha256", "00".repeat(32))
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let (status, reply) = json(response).await;
        assert_eq!(status, 507, "X-File-Size {size}: {reply}");
        assert_eq!(reply["error"], "Insufficient storage", "{reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("X-File-Size {size}")) && message.contains("free"),
            "{reply}"
        );
        // No record: the upload is unknown.
        let status = client
            .get(format!("{}/{upload_id}", server.upload_url()))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 404, "upload {upload_id} was recorded");
    }
    assert_eq!(
        files_below(&server.staging_dir()),
        Vec::<String>::new(),
        "staging files were left"
    );
    assert!(visible_files(&server.output_dir).is_empty());
    let log = server.log_text();
    assert!(!log.contains("ERROR"), "ERROR lines:\n{log}");
    assert!(log.contains("WARN"), "the refusal is not logged:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_wrong_keys_leave_a_few_audit_lines_with_address_and_count() {
    const BAD: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let server = LoggedServer::start(dir.path(), &[], None).await;
    let client = reqwest::Client::new();
    let url = server.upload_url();
    assert_eq!(
        post_v1(&client, &url, "before.txt", 0, b"before")
            .await
            .status(),
        200
    );
    for i in 0..BAD {
        let status = client
            .post(&url)
            .bearer_auth(format!("wrong-key-{i}"))
            .header("X-File-Name", "guess.txt")
            .body("x")
            .send()
            .await
            .unwrap()
            .status();
        // After each run of bad keys the address is braked (429) for a while.
        assert!(status == 401 || status == 429, "{status}");
    }
    // Once the last penalty (a few seconds) is served, a good key works
    // again; each 429 on the way says how long to wait, and is counted.
    let mut braked = 0;
    loop {
        let reply = post_v1(&client, &url, "after.txt", 0, b"after").await;
        if reply.status() == 200 {
            break;
        }
        assert_eq!(reply.status(), 429);
        braked += 1;
        assert!(braked < 10, "still braked after {braked} waits");
        let wait: u64 = reply.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }

    // The first refusal at once, the other 999 counted in one line within
    // the interval (10 s).
    let summary = format!("refused {} more requests", BAD - 1 + braked);
    eventually(
        Duration::from_secs(30),
        "the count of refusals",
        async || server.log_text().contains(&summary).then_some(()),
    )
    .await;
    let log = server.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("without a valid API key"))
        .collect();
    assert!(
        (2..=3).contains(&lines.len()),
        "{} audit lines for {BAD} refusals:\n{log}",
        lines.len()
    );
    for line in &lines {
        assert!(line.contains("INFO"), "not at info: {line}");
        assert!(line.contains("127.0.0.1"), "no peer address: {line}");
    }
    assert_eq!(
        visible_files(&server.output_dir),
        [
            ("after.txt".to_string(), b"after".to_vec()),
            ("before.txt".to_string(), b"before".to_vec())
        ]
        .into()
    );
}
