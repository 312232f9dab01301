//! The receiver as a process: keys, usage errors, the config file, signals.

use std::time::Duration;

use crate::fixtures::*;
use crate::support::*;

#[tokio::test]
async fn without_a_key_one_is_generated_printed_and_required() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &["--no-key"]).await;
    let line = server
        .stdout_lines
        .iter()
        .find_map(|l| l.strip_prefix("API Key: "))
        .expect("key printed");
    assert_eq!(line.len(), 64);
    assert!(line.bytes().all(|b| b.is_ascii_hexdigit()));
    let client = reqwest::Client::new();
    let ok = client
        .post(server.upload_url())
        .bearer_auth(line)
        .header("X-File-Name", "a")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let refused = client
        .post(server.upload_url())
        .bearer_auth(KEY)
        .header("X-File-Name", "b")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
}

#[test]
fn usage_errors_exit_64_with_a_message() {
    let cases: [(&[&str], &str); 3] = [
        (&["server", "--port", "0"], "--output-dir"),
        (
            &["server", "--output-dir", "x", "--path-mode", "bogus"],
            "allow-paths",
        ),
        (
            &["server", "--output-dir", "x", "--listen", "nowhere"],
            "--listen",
        ),
    ];
    for (args, needle) in cases {
        let output = indexedcp().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let help = indexedcp().args(["server", "--help"]).output().unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Examples:"));
}

#[tokio::test]
async fn a_busy_port_exits_74_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let output = indexedcp()
        .args(["server", "--port", &port, "--output-dir"])
        .arg(dir.path())
        .args(["-k", KEY])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(74), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}

#[tokio::test]
async fn the_daemon_runs_the_receiver_from_the_server_section() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("received");
    let config = dir.path().join("indexedcp.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = {state:?}\n\n[server]\nlisten = \"127.0.0.1:0\"\noutput_dir = {out:?}\napi_keys = [\"{KEY}\"]\npath_mode = \"allow-paths\"\n",
            state = dir.path().join("state").display().to_string(),
            out = out.display().to_string(),
        ),
    )
    .unwrap();
    let mut server = Server::spawn(
        vec![
            "daemon".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &out,
    )
    .await;
    let client = reqwest::Client::new();
    let (status, reply) =
        json(post_v1(&client, &server.upload_url(), "a/b.txt", 0, b"via config").await).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(visible_files(&out)["a/b.txt"], b"via config");
    let status = server.signal_and_wait(15, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut server = Server::start(&out, &[]).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let client = reqwest::Client::new();
    let request = client
        .post(server.upload_url())
        .bearer_auth(KEY)
        .header("X-File-Name", "inflight.bin")
        .body(body);
    let in_flight = tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) });
    tx.send(Ok(vec![1u8; 1000])).await.unwrap();
    // Wait until the receiver is writing the chunk (into staging), then stop it.
    let staging = out.join(".indexedcp/staging");
    eventually(Duration::from_secs(10), "the in-flight chunk", async || {
        (std::fs::read_dir(&staging).ok()?.count() == 1).then_some(())
    })
    .await;
    assert!(visible_files(&out).is_empty(), "a partial chunk is visible");
    unsafe_kill(server.child.id(), 15);
    // New connections are refused once it stops accepting.
    let health = format!("{}/health", server.url);
    eventually(
        Duration::from_secs(10),
        "the listener to close",
        async || reqwest::get(&health).await.is_err().then_some(()),
    )
    .await;
    tx.send(Ok(vec![2u8; 1000])).await.unwrap();
    drop(tx);
    assert_eq!(in_flight.await.unwrap().unwrap(), 200);
    let status = server.signal_and_wait(0, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    let mut expected = vec![1u8; 1000];
    expected.extend(vec![2u8; 1000]);
    assert_eq!(visible_files(&out)["inflight.bin"], expected);
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn the_key_can_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut child = indexedcp()
        .args(["server", "--port", "0", "--output-dir"])
        .arg(&out)
        .env("INDEXEDCP_API_KEY", "from-the-environment")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("Server listening on ")
        .unwrap()
        .to_owned();
    let client = reqwest::Client::new();
    let ok = client
        .post(format!("{url}/upload"))
        .bearer_auth("from-the-environment")
        .header("X-File-Name", "e")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn abandoned_partial_uploads_expire() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &["--incomplete-expiry", "1s"]).await;
    let client = reqwest::Client::new();
    let file = pseudo_random(3000, 9);
    let first = ResumableChunk {
        upload_id: "abandoned-upload-001",
        name: "a.bin",
        file: &file,
        chunk_size: 1000,
        index: 0,
    };
    assert_eq!(
        first
            .request(&client, &server.upload_url())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let staging = out.join(".indexedcp/staging");
    assert_eq!(std::fs::read_dir(&staging).unwrap().count(), 1);
    let status_url = format!("{}/upload/abandoned-upload-001", server.url);
    eventually(
        Duration::from_secs(15),
        "the abandoned upload to expire",
        async || {
            let gone = std::fs::read_dir(&staging).unwrap().count() == 0;
            let r = client.get(&status_url).bearer_auth(KEY).send().await.ok()?;
            (gone && r.status() == 404).then_some(())
        },
    )
    .await;
    assert!(visible_files(&out).is_empty());
}
