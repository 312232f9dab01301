//! The agent is SIGKILLed at random moments while it uploads files of tens
//! of MiB as multipart uploads (part_size 5 MiB) into a bucket, and started
//! again each time; 30 kills by default, 300 with `INDEXEDCP_LONG_FAULTS=1`
//! (`INDEXEDCP_FAULT_SEED` replays a run). At the end the bucket holds every
//! file exactly once, byte-identical (on s3s-fs's disk as well), and nothing
//! else, and no multipart upload is left open.
//!
//! s3s-fs cannot list multipart uploads, so the agent cannot find there an
//! upload whose id a kill kept from its buffer (the window between
//! CreateMultipartUpload's answer and the synced commit); those are counted
//! and printed for s3s-fs, and must be zero on moto, which lists them: there
//! the agent finds and aborts them, and the run prints how many (about as
//! many as s3s-fs keeps, with the same seed). The run also prints how many
//! uploads were created (from the agent's debug log): one per multipart file
//! is the ideal, and the run fails with more than one per five kills on top
//! (an ingest that streams a large file in lets the uploader's record go
//! first at its next commit, so the id is recorded within milliseconds).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{Peer, agent_config};
use crate::faults::{AgentProc, Fixture, Rng, buffer_counts, long_run, seed, spawn_dropper};
use crate::support::{poll_every, pseudo_random};

const MIB: usize = 1 << 20;

/// `n` files, most of them multipart uploads of 5 to 31 MiB (including a
/// part and a half, exactly two parts, and a 0-byte final part), a few
/// small; names with folders, spaces and non-ASCII characters.
fn files(n: usize, seed: u64) -> BTreeMap<String, Vec<u8>> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let len = match i % 6 {
                0 => 2 * 5 * MIB,
                1 => 5 * MIB + MIB / 2,
                2 => rng.range(20 * MIB as u64, 31 * MIB as u64) as usize,
                3 => rng.below(64 << 10) as usize,
                4 => 5 * MIB,
                _ => rng.range(10 * MIB as u64, 16 * MIB as u64) as usize,
            };
            let name = match i % 3 {
                0 => format!("f{i}.bin"),
                1 => format!("dir {}/ünï-{i}.dat", i % 4),
                _ => format!("日本/{i}"),
            };
            (name, pseudo_random(len, seed ^ (i as u64 + 1)))
        })
        .collect()
}

/// How many files of the agent's buffer have a multipart upload recorded
/// and are not confirmed yet (0 while the buffer cannot be read).
fn multipart_under_way(db: &std::path::Path) -> u64 {
    let Ok(conn) = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) else {
        return 0;
    };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    conn.query_row(
        "SELECT count(*) FROM files WHERE state = 'queued' AND delivery_state LIKE '%\"multipart\":\"%'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map_or(0, |n| n as u64)
}

async fn kill_loop(peer: &Peer) {
    let started = Instant::now();
    let seed = seed(0x53_4B11);
    let (kills, n_files) = if long_run() { (300, 60) } else { (30, 12) };
    let case = format!("{:?} (seed {seed:#x})", peer.kind);
    let fx = Fixture::new();
    let target = peer.target(&fx.root, "chunk_size = \"1MiB\"");
    let config = agent_config(&fx.root, &fx.spool, &target);
    let files = files(n_files, seed);
    let expected: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|(name, data)| (format!("in/{name}"), data.clone()))
        .collect();
    let bytes: usize = files.values().map(Vec::len).sum();
    let mut rng = Rng::new(seed ^ 0x4B11);
    let (min_life, max_life) = (100, 800);
    let dropping = Duration::from_millis(kills * (min_life + max_life) / 2) / 2;
    let dropper = spawn_dropper(&fx, &files, dropping, seed ^ 0xD809);
    let mut agent =
        AgentProc::start_with_level(&fx, &config, "info,indexedcp::agent::upload::s3=debug");
    let mut during_multipart = 0;
    for kill in 0..kills {
        // Two kills in three wait for a multipart upload under way (its id
        // recorded, the file not yet confirmed) and strike shortly after;
        // the others strike at any moment. The wait is long, so that a
        // slow machine still gets its aimed kills; it ends early once every
        // file is dropped and nothing is left to send.
        let aim = kill % 3 != 2;
        let life = rng.millis(min_life, max_life);
        let under_way = if aim {
            poll_every(
                Duration::from_millis(10),
                Duration::from_secs(20),
                async || {
                    if multipart_under_way(&fx.buffer_db()) > 0 {
                        return Some(true);
                    }
                    let idle = dropper.is_finished()
                        && buffer_counts(&fx.buffer_db()).is_some_and(|(queued, _, _)| queued == 0);
                    idle.then_some(false)
                },
            )
            .await
            .unwrap_or(false)
        } else {
            false
        };
        tokio::time::sleep(if under_way { rng.millis(0, 300) } else { life }).await;
        if multipart_under_way(&fx.buffer_db()) > 0 {
            during_multipart += 1;
        }
        agent.restart();
    }
    let killing = started.elapsed();
    dropper.join().unwrap();

    let drained = Instant::now();
    let arrived =
        super::wait_drained(peer, &expected, &fx.buffer_db(), Duration::from_secs(300)).await;
    let objects = peer.objects().await;
    assert!(
        arrived.is_some(),
        "{case}: not drained after 300 s: {:?} of {} objects, buffer {:?}",
        objects.keys().collect::<Vec<_>>(),
        expected.len(),
        buffer_counts(&fx.buffer_db())
    );
    let drain = drained.elapsed();
    let open = super::assert_exactly(peer, &objects, &expected, &case).await;
    if !peer.lists_uploads() {
        // An empty key is an upload s3s-fs did not finish creating (the
        // agent was killed during the request).
        for (key, _) in &open {
            assert!(
                key.is_empty() || expected.contains_key(key),
                "{case}: an upload at {key:?}"
            );
        }
    }
    let leftovers_aborted = fx.log_count("agent", "aborted a multipart upload left open");
    let creates = fx.log_count("agent", "multipart upload created");
    println!(
        "s3 kill loop, {case}: {kills} kills ({during_multipart} with a multipart upload open), {n_files} files ({bytes} bytes): lost 0, duplicated 0, corrupted 0, open uploads left {} {open:?}, multipart uploads created {creates}, leftovers the agent aborted {leftovers_aborted}; killing {:.1}s, draining {:.1}s, total {:.1}s",
        open.len(),
        killing.as_secs_f64(),
        drain.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        during_multipart > 0,
        "{case}: no kill hit an open multipart upload"
    );
    // Each multipart file is created once, bar kills that hit the moment
    // between CreateMultipartUpload's answer and its record. That moment
    // used to last seconds (the record waited for the ingest's write lock)
    // and was hit again after most restarts: 15 to 40 creates for 8 files.
    let multipart_files = expected.values().filter(|d| d.len() > 5 * MIB).count();
    assert!(
        creates <= multipart_files + kills as usize / 5,
        "{case}: {creates} multipart uploads created for {multipart_files} multipart files in {kills} kills"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_sigkilled_during_multipart_uploads_delivers_each_file_once() {
    for peer in super::peers().await {
        kill_loop(&peer).await;
    }
}
