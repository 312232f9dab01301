//! Scenario 1: the agent is SIGKILLed at random moments while it ingests and
//! uploads 200 files of 0 B to 8 MiB (500 kills and 500 files in the long run),
//! and restarted each time. Every file must arrive exactly once and
//! byte-identical, the spool must end empty (disposition delete) and both
//! SQLite files must pass their integrity check.

use std::time::{Duration, Instant};

use super::manifest::Manifest;
use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn scenario_1_agent_sigkilled_at_random_moments() {
    let started = Instant::now();
    let seed = seed(0x1_A6E7);
    let (kills, n_files, big) = if long_run() {
        (500, 500, 8)
    } else {
        (50, 200, 4)
    };
    println!(
        "scenario 1: seed {seed:#x} (INDEXEDCP_FAULT_SEED replays), {kills} kills, {n_files} files"
    );
    let fx = Fixture::new();
    let receiver = ReceiverProc::start(&fx, free_port(), &[]).await;
    let config = agent_config_with(
        &fx,
        &receiver.upload_url(),
        "disposition = \"delete\"",
        "chunk_size = \"256KiB\"\ninitial_retry_delay = \"50ms\"\nmax_retry_delay = \"500ms\"",
        "",
    );
    let files = file_set(n_files, big, seed);
    let manifest = Manifest::from_files(&files);
    let mut rng = Rng::new(seed);
    let (min_life, max_life) = (20, 600);

    // Files are dropped over most of the killing period, in a random order, so
    // that kills hit start-up scans, ingests and uploads alike.
    let dropping_period = Duration::from_millis(kills * (min_life + max_life) / 2) * 6 / 10;
    let dropper = spawn_dropper(&fx, &files, dropping_period, seed ^ 0xD809);
    let mut agent = AgentProc::start(&fx, &config);
    let (mut during_ingest, mut during_upload) = (0, 0);
    for kill in 0..kills {
        // One kill in three waits for files queued for upload, one for files
        // waiting in the spool (up to 10 s each, so that a loaded machine
        // still gets both; no longer once everything is dropped and
        // delivered), and strikes soon after; the rest at any moment.
        let aim = match kill % 3 {
            0 => Some(true),
            1 => Some(false),
            _ => None,
        };
        let aimed = match aim {
            Some(upload) => poll_every(
                Duration::from_millis(5),
                Duration::from_secs(10),
                async || {
                    let queued = buffer_counts(&fx.buffer_db()).is_some_and(|c| c.0 > 0);
                    let waiting = !files_below(&fx.spool).is_empty();
                    if (upload && queued) || (!upload && waiting) {
                        return Some(true);
                    }
                    // Everything dropped and nothing left to do: no aim.
                    (dropper.is_finished() && !queued && !waiting).then_some(false)
                },
            )
            .await
            .unwrap_or(false),
            None => false,
        };
        let life = if aimed {
            rng.millis(0, min_life)
        } else {
            rng.millis(min_life, max_life)
        };
        tokio::time::sleep(life).await;
        if !files_below(&fx.spool).is_empty() {
            during_ingest += 1;
        }
        if buffer_counts(&fx.buffer_db()).is_some_and(|c| c.0 > 0) {
            during_upload += 1;
        }
        agent.restart();
    }
    let killing = started.elapsed();
    dropper.join().unwrap();
    let drain = wait_until_drained(&fx, &manifest, Duration::from_secs(180)).await;
    let report = manifest.check(&fx.out, &[&fx.buffer_db(), &fx.uploads_db()]);
    // Kills between a buffer commit and the source's disposal show up as
    // sources found already buffered at the next start.
    let between = fx.log_count("agent", "already buffered before a restart");
    println!(
        "scenario 1: {kills} kills ({during_ingest} with files waiting in the spool, {during_upload} with files queued for upload, {between} between a commit and the disposal), {n_files} files ({} bytes): {}; killing {:.1}s, draining {:.1}s, total {:.1}s",
        files.values().map(Vec::len).sum::<usize>(),
        report.figure(),
        killing.as_secs_f64(),
        drain.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    report.assert_clean(&format!("scenario 1 (seed {seed:#x})"));
    assert!(files_below(&fx.spool).is_empty(), "the spool is not empty");
    assert!(
        during_ingest > 0 && during_upload > 0,
        "the kills did not hit both ingest ({during_ingest}) and upload ({during_upload})"
    );
}
