//! The agent with a tus target, SIGKILLed at random moments while it
//! uploads (30 times; 60 with `INDEXEDCP_LONG_FAULTS=1`), and the tus server
//! SIGKILLed and restarted once in the middle: every source file must be
//! among the server's completed uploads exactly once, byte-identical. Kills
//! land inside PATCHes too, so the server often holds part of a chunk when
//! the agent asks how far it got.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::{TusServer, tus_config};
use crate::faults::{
    AgentProc, Fixture, Rng, buffer_counts, files_below, long_run, parked_files, seed,
};
use crate::fixtures::{drop_file, status_json};
use crate::support::{eventually, poll_every, pseudo_random};

#[tokio::test(flavor = "multi_thread")]
async fn agent_sigkilled_during_tus_uploads_and_server_restarted_once() {
    let started = Instant::now();
    let seed = seed(0x7D5_A6E7);
    let kills: usize = if long_run() { 60 } else { 30 };
    let fx = Fixture::new();
    let Some(mut server) = TusServer::start(&fx.root.join("tus")).await else {
        return;
    };
    let config = tus_config(&fx.root, &server.url(), &fx.spool, super::TOKEN, "");
    println!("tus kill loop: seed {seed:#x} (INDEXEDCP_FAULT_SEED replays), {kills} kills");

    // One batch of files per life of the agent: a large file of many chunks
    // (so that a kill finds an upload under way, yet small enough that 30
    // lives stay quick) and a few small ones,
    // some empty, with names that need metadata encoding.
    let mut rng = Rng::new(seed);
    let mut batches: Vec<BTreeMap<String, Vec<u8>>> = Vec::new();
    for life in 0..kills + 1 {
        let mut batch = BTreeMap::new();
        let big = rng.range(1 << 20, 3 << 20) as usize;
        batch.insert(
            format!("big-{life}.bin"),
            pseudo_random(big, seed ^ life as u64),
        );
        for i in 0..4 {
            let len = if i == 0 && life % 3 == 0 {
                0
            } else {
                rng.below(200 << 10) as usize
            };
            let name = match i {
                0 => format!("small-{life}-{i}"),
                1 => format!("dir {life}/ünï-{i}.txt"),
                2 => format!("日本/{life}-{i}.csv"),
                _ => format!("a,b {life}-{i}"),
            };
            batch.insert(
                name,
                pseudo_random(len, seed ^ ((life * 10 + i) as u64 + 1000)),
            );
        }
        batches.push(batch);
    }
    let mut batches = batches.into_iter();
    let mut sources: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut drop_batch = |sources: &mut BTreeMap<String, Vec<u8>>| {
        if let Some(batch) = batches.next() {
            for (name, data) in &batch {
                drop_file(&fx.staging, &fx.spool, name, data);
            }
            sources.extend(batch);
        }
    };

    drop_batch(&mut sources);
    let mut agent = AgentProc::start(&fx, &config);
    let mut during_upload = 0;
    let mut attempts = 0;
    let mut server_restarted = false;
    while during_upload < kills {
        attempts += 1;
        assert!(
            attempts < kills * 4,
            "the kills kept missing uploads:\n{}",
            fx.log_tails(30)
        );
        // Kill only once this life has sent something, a random moment later.
        let patches = server.requests("PATCH");
        eventually(
            Duration::from_secs(60),
            "a PATCH from the agent",
            async || (server.requests("PATCH") > patches).then_some(()),
        )
        .await;
        if !server_restarted && during_upload == kills / 2 {
            // The server dies under the agent, which retries until it is back.
            server.kill();
            eventually(
                Duration::from_secs(30),
                "the agent to see the server gone",
                async || {
                    status_json(&config)
                        .iter()
                        .any(|f| {
                            f["last_error"]
                                .as_str()
                                .is_some_and(|e| e.contains("cannot reach"))
                        })
                        .then_some(())
                },
            )
            .await;
            server.restart().await;
            server_restarted = true;
            continue;
        }
        tokio::time::sleep(rng.millis(0, 250)).await;
        if buffer_counts(&fx.buffer_db()).is_some_and(|(queued, _, _)| queued > 0) {
            during_upload += 1;
        }
        agent.kill();
        drop_batch(&mut sources);
        agent.restart();
    }
    let killing = started.elapsed();

    // Drained: nothing in the spool, nothing queued, nothing parked.
    let drained = poll_every(
        Duration::from_millis(100),
        Duration::from_secs(180),
        async || {
            let counts = buffer_counts(&fx.buffer_db())?;
            assert_eq!(counts.1, 0, "parked: {:?}", parked_files(&fx.buffer_db()));
            (files_below(&fx.spool).is_empty() && counts.0 == 0).then_some(())
        },
    )
    .await;
    assert!(
        drained.is_some(),
        "not drained after 180 s:\n{}",
        fx.log_tails(30)
    );
    let draining = started.elapsed() - killing;

    // Each source exactly once among the completed uploads, byte-identical.
    let completed = server.completed();
    let (mut lost, mut duplicated, mut corrupted) = (Vec::new(), Vec::new(), Vec::new());
    for (name, data) in &sources {
        match completed.get(name).map(Vec::as_slice) {
            None | Some([]) => lost.push(name),
            Some(copies) => {
                if copies.len() > 1 {
                    duplicated.push(name);
                }
                if copies.iter().any(|copy| copy != data) {
                    corrupted.push(name);
                }
            }
        }
    }
    let unexpected: Vec<&String> = completed
        .keys()
        .filter(|n| !sources.contains_key(*n))
        .collect();
    let incomplete = server.uploads().iter().filter(|u| !u.complete()).count();
    // PATCHes that began inside a chunk: the tail of one a kill cut off.
    let tails = server
        .patch_offsets(204)
        .iter()
        .filter(|offset| *offset % (64 << 10) != 0)
        .count();
    println!(
        "tus kill loop: {kills} kills during uploads ({attempts} tries), the server restarted once, \
         {} files ({} bytes), {} POSTs, {} PATCHes ({tails} of a chunk's tail, {} refused with \
         409), {} HEADs, {incomplete} incomplete uploads left on the server; lost {}, duplicated {}, corrupted {}, unexpected {}; killing {:.1}s, \
         draining {:.1}s",
        sources.len(),
        sources.values().map(Vec::len).sum::<usize>(),
        server.requests("POST"),
        server.requests("PATCH"),
        server.patch_offsets(409).len(),
        server.requests("HEAD"),
        lost.len(),
        duplicated.len(),
        corrupted.len(),
        unexpected.len(),
        killing.as_secs_f64(),
        draining.as_secs_f64(),
    );
    assert!(
        lost.is_empty() && duplicated.is_empty() && corrupted.is_empty() && unexpected.is_empty(),
        "lost {lost:?}, duplicated {duplicated:?}, corrupted {corrupted:?}, unexpected {unexpected:?}\n{}",
        fx.log_tails(30)
    );
    assert!(server_restarted);
}
