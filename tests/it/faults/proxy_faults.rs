//! Scenario 4: the network between agent and receiver misbehaves on a large
//! share of requests (cuts, resets, lost acknowledgements, stalls, delays,
//! 500/503/429 answered by the proxy, flipped bits in chunk bodies) for at least
//! 1,000 requests (10,000 in the long run). Every file must still arrive exactly
//! once and byte-identical, and every flipped body must have been refused by the
//! chunk checksum (422) and sent again.

use std::time::{Duration, Instant};

use super::manifest::Manifest;
use super::proxy::{FaultProxy, Profile};
use super::*;
use crate::fixtures::drop_file;

/// About 38 % of requests are faulted.
fn hostile_network() -> Profile {
    Profile {
        delay: 60,
        cut: 60,
        reset: 50,
        lose_reply: 70,
        stall: 12,
        refuse_500: 30,
        refuse_503: 20,
        refuse_429: 20,
        flip: 60,
        max_delay: Duration::from_millis(300),
        // Some stalls outlast the agent's 2 s request timeout, some do not.
        max_stall: Duration::from_millis(2500),
        fault_budget: u64::MAX,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_4_a_hostile_network_loses_duplicates_and_corrupts_nothing() {
    let started = Instant::now();
    let seed = seed(0x4_F1EE);
    let target = if long_run() { 10_000 } else { 1_000 };
    println!(
        "scenario 4: seed {seed:#x} (INDEXEDCP_FAULT_SEED replays), at least {target} requests"
    );
    let fx = Fixture::new();
    let port = free_port();
    let receiver = ReceiverProc::start(&fx, port, &["--read-timeout", "2s"]).await;
    let upstream = format!("127.0.0.1:{}", receiver.port).parse().unwrap();
    let proxy = FaultProxy::start(upstream, seed, hostile_network()).await;
    let config = agent_config_with(
        &fx,
        &proxy.upload_url(),
        "",
        "chunk_size = \"16KiB\"\nconcurrency = 4\ninitial_retry_delay = \"10ms\"\nmax_retry_delay = \"200ms\"\ntimeout = \"2s\"",
        "",
    );
    let _agent = AgentProc::start(&fx, &config);

    // Files go in by batches of 10 (0 to 200 KiB, about 7 chunks each) while the
    // agent runs low, until the proxy has seen enough requests.
    let mut rng = Rng::new(seed);
    let mut files = std::collections::BTreeMap::new();
    let mut batch = 0u64;
    let feed_deadline = Instant::now() + Duration::from_secs(if long_run() { 1200 } else { 150 });
    while proxy.requests() < target {
        assert!(
            Instant::now() < feed_deadline,
            "only {} requests after {:?}: {}",
            proxy.requests(),
            started.elapsed(),
            proxy.snapshot()
        );
        let queued = buffer_counts(&fx.buffer_db()).map_or(0, |c| c.0);
        if queued < 8 && files_below(&fx.spool).is_empty() {
            for i in 0..10 {
                let name = format!("batch{batch}/file-{i}.bin");
                let size = if i == 0 {
                    0
                } else {
                    rng.below(200 << 10) as usize
                };
                let data = pseudo_random(size, seed ^ (batch << 8) ^ i);
                drop_file(&fx.staging, &fx.spool, &name, &data);
                files.insert(name, data);
            }
            batch += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let manifest = Manifest::from_files(&files);
    let drain_timeout = Duration::from_secs(if long_run() { 600 } else { 120 });
    wait_until_drained(&fx, &manifest, drain_timeout).await;
    let report = manifest.check(&fx.out, &[&fx.buffer_db(), &fx.uploads_db()]);
    let stats = proxy.snapshot();
    let flips = stats.count("flip");
    let caught = stats.upstream("flip", 422);
    // Chunks are checked by their CRC-32C, the files of a batch by SHA-256.
    let logged = fx.log_count("receiver", "not the X-Chunk-Crc32c sent")
        + fx.log_count("receiver", "not the X-Chunk-Sha256 sent");
    println!(
        "scenario 4: {} requests through the proxy, {} files ({} bytes): {}; {flips} bodies flipped, {caught} refused with 422 (receiver log: {logged} checksum refusals); {:.1}s",
        stats.requests,
        files.len(),
        files.values().map(|d| d.len()).sum::<usize>(),
        report.figure(),
        started.elapsed().as_secs_f64()
    );
    println!("scenario 4: {stats}");
    report.assert_clean(&format!("scenario 4 (seed {seed:#x})"));
    assert!(stats.requests >= target, "{stats}");
    for kind in [
        "delay",
        "cut",
        "reset",
        "lost-reply",
        "stall",
        "answer-500",
        "answer-503",
        "answer-429",
        "flip",
    ] {
        assert!(
            stats.count(kind) > 0,
            "no {kind} fault was injected: {stats}"
        );
    }
    // Every flipped body the receiver saw was refused by the chunk checksum,
    // except when its upload was complete already (the body is then ignored and
    // the completed reply repeated).
    let completed_repeats = stats
        .notes
        .iter()
        .filter(|n| n.contains(" answered 200: ") && n.contains("\"complete\":true"))
        .count() as u64;
    // A flip inside a batch's JSON manifest (rather than in a file's bytes)
    // makes the manifest unreadable: the whole batch is refused with 400 and
    // its files go again one by one.
    let broken_manifests = stats
        .notes
        .iter()
        .filter(|n| {
            n.contains("/upload/batch") && n.contains(" answered 400: ") && n.contains("manifest")
        })
        .count() as u64;
    assert!(caught > 0, "no flipped body reached the receiver: {stats}");
    assert_eq!(
        caught + completed_repeats + broken_manifests,
        stats.upstream_total("flip"),
        "flipped bodies not refused with 422 (seed {seed:#x}): {:#?}",
        stats.notes
    );
    assert!(
        logged as u64 >= caught,
        "the receiver logged {logged} checksum refusals for {caught} 422 replies"
    );
}
