//! Scenario 2: the receiver is SIGKILLed at random moments while an agent
//! delivers 200 files of 0 B to 8 MiB (500 kills and 500 files in the long run),
//! and restarted on the same port each time. Every file must arrive exactly once
//! and byte-identical, and, polled throughout, no file may ever be visible under
//! a final name unless it is complete and identical to its source (the receiver
//! renames files into place only once verified).

use std::time::{Duration, Instant};

use super::manifest::{Manifest, PartialWatch};
use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn scenario_2_receiver_sigkilled_at_random_moments() {
    let started = Instant::now();
    let seed = seed(0x2_5EED);
    let (kills, n_files, big) = if long_run() {
        (500, 500, 8)
    } else {
        (50, 200, 4)
    };
    println!(
        "scenario 2: seed {seed:#x} (INDEXEDCP_FAULT_SEED replays), {kills} kills, {n_files} files"
    );
    let fx = Fixture::new();
    let mut receiver = ReceiverProc::start(&fx, free_port(), &[]).await;
    let config = agent_config_with(
        &fx,
        &receiver.upload_url(),
        "disposition = \"delete\"",
        "chunk_size = \"256KiB\"\ninitial_retry_delay = \"20ms\"\nmax_retry_delay = \"300ms\"\ntimeout = \"5s\"",
        "",
    );
    let files = file_set(n_files, big, seed);
    let manifest = Manifest::from_files(&files);
    let watch = PartialWatch::start(&fx.out, &manifest);
    let mut rng = Rng::new(seed);
    let (min_life, max_life) = (30, 500);

    // Files are dropped over most of the killing period, so that kills hit
    // uploads in every phase (chunks, completion, status queries).
    let dropping_period = Duration::from_millis(kills * (min_life + max_life) / 2) * 10 / 10;
    let dropper = spawn_dropper(&fx, &files, dropping_period, seed ^ 0xD809);
    let _agent = AgentProc::start(&fx, &config);
    let mut during_upload = 0;
    for _ in 0..kills {
        tokio::time::sleep(rng.millis(min_life, max_life)).await;
        // Prefer moments with uploads in flight: while files are still being
        // dropped, give the agent a little time to have something queued
        // (small files are delivered within milliseconds of their arrival,
        // hence the close look).
        let deadline = Instant::now() + Duration::from_secs(2);
        while buffer_counts(&fx.buffer_db()).is_none_or(|c| c.0 == 0)
            && Instant::now() < deadline
            && !dropper.is_finished()
        {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        if buffer_counts(&fx.buffer_db()).is_some_and(|c| c.0 > 0) {
            during_upload += 1;
        }
        receiver.restart().await;
    }
    dropper.join().unwrap();
    let killing = started.elapsed();
    let drain = wait_until_drained(&fx, &manifest, Duration::from_secs(180)).await;
    let (polls, partial) = watch.stop();
    let report = manifest.check(&fx.out, &[&fx.buffer_db(), &fx.uploads_db()]);
    // Kills during a completion show up as uploads finished at the next start.
    let recovered = fx.log_count("receiver", "recovered upload completed");
    println!(
        "scenario 2: {kills} kills ({during_upload} with files queued for upload, {recovered} uploads completed by recovery at a restart), {n_files} files ({} bytes): {}; {} partial or wrong files seen in {polls} polls of the output; killing {:.1}s, draining {:.1}s, total {:.1}s",
        files.values().map(Vec::len).sum::<usize>(),
        report.figure(),
        partial.len(),
        killing.as_secs_f64(),
        drain.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        partial.is_empty(),
        "files visible under a final name before they were complete (seed {seed:#x}): {partial:#?}"
    );
    report.assert_clean(&format!("scenario 2 (seed {seed:#x})"));
    assert!(polls > 100, "the output was polled only {polls} times");
    assert!(
        during_upload * 2 >= kills,
        "only {during_upload} of {kills} kills hit the receiver while files were queued"
    );
}
