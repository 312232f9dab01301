//! v1 after a crash in the middle of a chunk: a v1 file grows under its final
//! name, so a chunk cut off by SIGKILL leaves bytes that were never
//! acknowledged; the restarted receiver cuts the file back to what it
//! acknowledged, and the client continues where it was.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::fixtures::*;
use crate::receiver_load::LoggedServer;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_chunk_cut_by_sigkill_is_cut_off_the_file_at_restart() {
    const CHUNK: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let mut server = LoggedServer::start(dir.path(), &[], None).await;
    let file = pseudo_random(5 * CHUNK, 18);
    let client = reqwest::Client::new();
    for idx in 0..3 {
        let body = &file[idx * CHUNK..(idx + 1) * CHUNK];
        let (status, reply) =
            json(post_v1(&client, &server.upload_url(), "log.bin", idx, body).await).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["actualFilename"], "log.bin", "{reply}");
    }
    let path = server.output_dir.join("log.bin");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * CHUNK as u64);

    // Chunk 3: its headers and half its body, then the receiver is killed.
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: receiver\r\nAuthorization: Bearer {KEY}\r\nX-File-Name: log.bin\r\nX-Chunk-Index: 3\r\nContent-Length: {CHUNK}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
        .write_all(&file[3 * CHUNK..3 * CHUNK + CHUNK / 2])
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the half chunk to reach the file",
        async || (std::fs::metadata(&path).ok()?.len() > 3 * CHUNK as u64).then_some(()),
    )
    .await;
    server.kill_and_restart().await;
    drop(stream);

    eventually(
        Duration::from_secs(10),
        "the file to be cut back to its acknowledged 3000 bytes",
        async || (std::fs::metadata(&path).ok()?.len() == 3 * CHUNK as u64).then_some(()),
    )
    .await;
    assert_eq!(std::fs::read(&path).unwrap(), &file[..3 * CHUNK]);
    assert!(
        server
            .log_text()
            .contains("cut the bytes of an unacknowledged v1 chunk"),
        "the cut is not logged:\n{}",
        server.log_text()
    );

    // The client sends chunk 3 again, and the rest.
    for idx in 3..5 {
        let body = &file[idx * CHUNK..(idx + 1) * CHUNK];
        let (status, reply) =
            json(post_v1(&client, &server.upload_url(), "log.bin", idx, body).await).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["actualFilename"], "log.bin", "{reply}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), file, "log.bin differs");
}
