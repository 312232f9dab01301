//! The fault proxy between the agent and the bucket: requests to the S3
//! server are cut, reset, delayed, stalled past the agent's timeout, answered
//! 500 or 503 by the proxy itself, have their reply lost after the server
//! acted on them (a lost answer to CreateMultipartUpload, UploadPart, a
//! single PUT or CompleteMultipartUpload), or have one bit of their body
//! flipped. Small files (one PUT each) and multipart files go through it
//! until the proxy has faulted 150 requests (3,000 with
//! `INDEXEDCP_LONG_FAULTS=1`). At the end the bucket holds every file once,
//! byte-identical, and nothing else; on moto, which lists multipart uploads,
//! none is left open. (On s3s-fs, which cannot list them, an upload whose
//! creation lost its reply stays open until the bucket's lifecycle rule
//! removes it; the run prints how many.)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Peer, agent_config};
use crate::faults::proxy::{FaultProxy, Profile};
use crate::faults::{AgentProc, Fixture, Rng, buffer_counts, long_run, seed};
use crate::fixtures::drop_file;
use crate::support::{poll_every, pseudo_random};

const MIB: usize = 1 << 20;

/// About 40 % of requests are faulted, one in twenty with a bit of its body
/// flipped. s3s-fs (like AWS) checks each body against the SHA-256 the agent
/// sends (`x-amz-checksum-sha256`, and the signed payload hash) and refuses
/// a changed one; moto stores whatever bytes arrive, so there the agent's
/// own check (the returned ETag against the MD5 of the bytes it sent) is
/// what keeps a changed body from being kept.
fn hostile_network() -> Profile {
    Profile {
        delay: 60,
        cut: 60,
        reset: 50,
        lose_reply: 90,
        stall: 10,
        refuse_500: 40,
        refuse_503: 40,
        refuse_429: 0,
        flip: 50,
        max_delay: Duration::from_millis(300),
        // Some stalls outlast the agent's 3 s request timeout, some do not.
        max_stall: Duration::from_millis(4000),
        fault_budget: u64::MAX,
    }
}

/// File `i` of a run: one in six a multipart upload (part_size 5 MiB: a
/// part and a bit, or two parts exactly), the others small or empty.
fn file(i: usize, rng: &mut Rng, seed: u64) -> (String, Vec<u8>) {
    let len = match i % 12 {
        0 => 5 * MIB + rng.below(MIB as u64) as usize,
        6 => 10 * MIB,
        1 | 7 => 0,
        _ => rng.below(200 << 10) as usize,
    };
    let name = if i.is_multiple_of(2) {
        format!("n/{i}.bin")
    } else {
        format!("ü {i}.dat")
    };
    (name, pseudo_random(len, seed ^ (i as u64 + 1)))
}

async fn through_the_proxy(peer: &Peer) {
    let started = Instant::now();
    let seed = seed(0x53_F1EE);
    let faulted_target: u64 = if long_run() { 3_000 } else { 150 };
    let case = format!("{:?} (seed {seed:#x})", peer.kind);
    let fx = Fixture::new();
    let upstream = peer.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = FaultProxy::start(upstream, seed, hostile_network()).await;
    let through = format!("http://{}", proxy.addr);
    let target = peer
        .target(
            &fx.root,
            "chunk_size = \"1MiB\"\ntimeout = \"3s\"\nconcurrency = 4",
        )
        .replace(&format!("{:?}", peer.endpoint), &format!("{through:?}"))
        .replace(
            "initial_retry_delay = \"100ms\"",
            "initial_retry_delay = \"20ms\"",
        )
        .replace("max_retry_delay = \"1s\"", "max_retry_delay = \"300ms\"");
    assert!(target.contains(&through), "{target}");
    // Besides the random faults, the first three CompleteMultipartUpload
    // requests lose their reply after the store has completed the upload.
    proxy.lose_replies_to("POST ", "uploadId=", 3);
    let config = agent_config(&fx.root, &fx.spool, &target);
    let _agent = AgentProc::start(&fx, &config);

    // Files go in by batches of six while the agent runs, until the proxy
    // has faulted enough requests.
    let mut rng = Rng::new(seed);
    let mut expected = BTreeMap::new();
    let mut i = 0;
    let faulted = |proxy: &FaultProxy| {
        let snapshot = proxy.snapshot();
        snapshot.requests - snapshot.count("pass")
    };
    let deadline = Instant::now() + Duration::from_secs(240);
    while faulted(&proxy) < faulted_target {
        assert!(
            Instant::now() < deadline,
            "{case}: only {} faulted requests in 240 s: {}\n{}",
            faulted(&proxy),
            proxy.snapshot(),
            fx.log_tails(30)
        );
        for _ in 0..6 {
            let (name, data) = file(i, &mut rng, seed);
            drop_file(&fx.staging, &fx.spool, &name, &data);
            expected.insert(format!("in/{name}"), data);
            i += 1;
        }
        // Let the agent work through the batch before the next one.
        poll_every(
            Duration::from_millis(50),
            Duration::from_secs(60),
            async || {
                buffer_counts(&fx.buffer_db())
                    .is_some_and(|(queued, _, _)| queued <= 2)
                    .then_some(())
            },
        )
        .await;
    }
    let dropping = started.elapsed();

    let drained = Instant::now();
    let arrived =
        super::wait_drained(peer, &expected, &fx.buffer_db(), Duration::from_secs(240)).await;
    let objects = peer.objects().await;
    assert!(
        arrived.is_some(),
        "{case}: not drained after 240 s: {} of {} objects, buffer {:?}; {}\n{}",
        objects.len(),
        expected.len(),
        buffer_counts(&fx.buffer_db()),
        proxy.snapshot(),
        fx.log_tails(30)
    );
    let drain = drained.elapsed();
    let open = super::assert_exactly(peer, &objects, &expected, &case).await;
    let snapshot = proxy.snapshot();
    println!(
        "s3 fault proxy, {case}: {} files ({} bytes), {snapshot}: lost 0, duplicated 0, corrupted 0, open uploads left {}; dropping {:.1}s, draining {:.1}s",
        expected.len(),
        expected.values().map(Vec::len).sum::<usize>(),
        open.len(),
        dropping.as_secs_f64(),
        drain.as_secs_f64()
    );
    let lost_completes = snapshot
        .notes
        .iter()
        .filter(|n| n.starts_with("lost the reply to POST ") && n.contains("uploadId="))
        .count();
    assert!(
        lost_completes >= 3,
        "{case}: {lost_completes} CompleteMultipartUpload replies lost"
    );
    for kind in [
        "cut",
        "reset",
        "lost-reply",
        "answer-500",
        "answer-503",
        "flip",
    ] {
        assert!(
            snapshot.count(kind) > 0,
            "{case}: no request got the {kind} fault: {snapshot}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_network_to_the_bucket_loses_duplicates_and_corrupts_nothing() {
    for peer in super::peers().await {
        through_the_proxy(&peer).await;
    }
}
