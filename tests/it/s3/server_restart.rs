//! The S3 server dies in the middle of multipart uploads and comes back on
//! the same port with the same data (s3s-fs, whose state is its folder; moto
//! keeps everything in memory, so a restart is a different, empty store).
//! Every file must still end up in the bucket exactly once, byte-identical
//! on the server's disk, with no multipart upload left open.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{BUCKET, Kind, agent_config};
use crate::fixtures::{Daemon, drop_file, status_json};
use crate::support::{eventually, pseudo_random};

const PART: usize = 5 << 20;

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_of_the_s3_server_during_uploads_delivers_everything_once() {
    let Some(mut peer) = super::peers()
        .await
        .into_iter()
        .find(|p| p.kind == Kind::S3sFs)
    else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (spool, staging) = (dir.path().join("spool"), dir.path().join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let config = agent_config(dir.path(), &spool, &peer.target(dir.path(), ""));
    let _daemon = Daemon::start(&config);
    let mut expected = BTreeMap::new();
    for (i, len) in [2 * PART + 1, 3 * PART, 4 * PART + 17, 1000, 0, PART]
        .into_iter()
        .enumerate()
    {
        let data = pseudo_random(len, 40 + i as u64);
        drop_file(&staging, &spool, &format!("f{i}.bin"), &data);
        expected.insert(format!("in/f{i}.bin"), data);
    }

    // Down while multipart uploads are open.
    eventually(
        Duration::from_secs(60),
        "a multipart upload to be open",
        async || (!peer.open_uploads().await.is_empty()).then_some(()),
    )
    .await;
    peer.kill();
    let down = Instant::now();
    // Up again once the agent has met the dead server.
    eventually(
        Duration::from_secs(60),
        "the agent to record a failed attempt",
        async || (super::failed_chunks(dir.path()) > 0).then_some(()),
    )
    .await;
    let downtime = down.elapsed();
    peer.restart().await;

    eventually(
        Duration::from_secs(120),
        "every file in the bucket",
        async || (peer.objects().await == expected).then_some(()),
    )
    .await;
    let on_disk = peer.root.as_ref().unwrap().join(BUCKET);
    for (key, data) in &expected {
        assert_eq!(&std::fs::read(on_disk.join(key)).unwrap(), data, "{key}");
    }
    eventually(
        Duration::from_secs(10),
        "the buffer to be confirmed",
        async || {
            status_json(&config)
                .iter()
                .all(|f| f["state"] == "confirmed")
                .then_some(())
        },
    )
    .await;
    // An upload without a key is one s3s-fs did not finish creating when
    // it was stopped (it writes the id, then the metadata naming the key):
    // its creation was never answered, so no client could know or abort it.
    let open: Vec<_> = peer
        .open_uploads()
        .await
        .into_iter()
        .filter(|(key, _)| !key.is_empty() || peer.lists_uploads())
        .collect();
    assert_eq!(open, [], "multipart uploads left open");
    assert_eq!(peer.objects().await.len(), expected.len());
    println!(
        "s3 server restart: {} files ({} bytes), server down {:.1}s, all delivered once in {:.1}s",
        expected.len(),
        expected.values().map(Vec::len).sum::<usize>(),
        downtime.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
