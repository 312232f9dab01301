//! Large files are sent while they are still being buffered, to a receiver
//! that announces streaming: the receiver holds the file's first chunks
//! while its source is still in the spool (the source goes only once the
//! whole file is durable in the buffer), and the file still arrives once,
//! byte-identical. A crash before the file is sealed is in the failpoint
//! suite (`ingest-before-seal`); a v1 receiver gets every chunk with the
//! file's hash, after buffering (`agent::a_v1_only_receiver_...`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::fixtures::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_large_file_reaches_the_receiver_before_its_source_leaves_the_spool() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(
        dir.path(),
        &server.upload_url(),
        &spool,
        "",
        "chunk_size = \"1MiB\"",
    );
    let _daemon = Daemon::start(&config);
    // Something small first: the agent learns what the receiver speaks.
    let mut files = BTreeMap::from([("small.txt".to_string(), b"hello".to_vec())]);
    drop_file(&staging, &spool, "small.txt", b"hello");
    wait_for_files(&out, &files, Duration::from_secs(30)).await;

    let big = pseudo_random(48 << 20, 42);
    files.insert("big.bin".into(), big.clone());
    drop_file(&staging, &spool, "big.bin", &big);
    let source = spool.join("big.bin");
    // Watched from outside: bytes staged at the receiver while the source
    // is still there, i.e. before the agent finished buffering the file.
    let mut early = 0u64;
    let delivered = wait_until(
        "big.bin delivered",
        Duration::from_millis(1),
        Duration::from_secs(120),
        || {
            let staged = largest_file_len(&out.join(".indexedcp/staging"));
            if source.exists() {
                early = early.max(staged);
            }
            Ok(visible_files(&out) == files)
        },
    );
    assert!(
        delivered.is_ok(),
        "{}",
        tree_diff(&files, &visible_files(&out))
    );
    assert!(
        early >= 1 << 20,
        "the receiver held {early} bytes of the file while its source was in the spool; \
         the first chunks should go while the rest is buffered"
    );
    eventually(Duration::from_secs(30), "an empty spool", async || {
        files_below(&spool).is_empty().then_some(())
    })
    .await;
    // Delivered once: nothing else in the output, the agent's record confirmed.
    assert_eq!(visible_files(&out), files);
    let status = status_json(&config);
    let big_status = status
        .iter()
        .find(|f| f["remote_name"] == "big.bin")
        .expect("big.bin in status");
    assert_eq!(big_status["state"], "confirmed", "{big_status}");
}
