//! Scenario 10, a fleet: one receiver (`indexedcp server`) and many agent
//! daemons (`INDEXEDCP_BENCH_FLEET_AGENTS`, 100), each its own process with
//! its own spool and buffer, all sending at once: every agent gets
//! `INDEXEDCP_BENCH_FLEET_FILES` (20) files, small ones and one of 2 MiB
//! (several chunks, so resumable uploads run side by side with batches), all
//! renamed into the spools together. The figure is the receiver's peak RSS,
//! which must not grow with the number of clients; files per second end to
//! end are printed beside it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::processes::{RunDir, Running, rename_all, start_receiver, utf8};
use super::support::{Rng, wait_until};
use super::{KEY, Settings};

pub(super) struct Fleet {
    pub(super) agents: usize,
    pub(super) files: usize,
    pub(super) files_per_s: f64,
    pub(super) receiver_peak_rss_mib: f64,
}

/// Every regular file below `dir`, counted, except in hidden folders (the
/// receiver's own state and staging live in `.indexedcp`).
fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(t) if t.is_file() => 1,
            _ => 0,
        })
        .sum()
}

pub(super) fn fleet(settings: &Settings) -> Result<Fleet> {
    let (agents, per_agent) = (settings.fleet_agents, settings.fleet_files);
    let run = RunDir::create(settings)?;
    let (mut receiver, port) = start_receiver(&run)?;
    let mut rng = Rng::new(10);
    let mut daemons = Vec::with_capacity(agents);
    let mut drops = Vec::with_capacity(agents);
    let mut total_bytes = 0u64;
    for i in 0..agents {
        let dir = run.root.join(format!("agent-{i}"));
        let (spool, staging, state) = (dir.join("spool"), dir.join("staging"), dir.join("state"));
        for d in [&spool, &staging] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nstate_dir = {state:?}\nlog_format = \"text\"\n\n\
                 [[target]]\nname = \"central\"\nurl = \"http://127.0.0.1:{port}/upload\"\napi_key = \"{KEY}\"\n\n\
                 [[spool]]\npath = {spool:?}\ntarget = \"central\"\n",
                state = utf8(&state)?,
                spool = utf8(&spool)?,
            ),
        )?;
        let mut names = Vec::with_capacity(per_agent);
        for f in 0..per_agent {
            let len = if f == 0 {
                2 << 20
            } else {
                rng.below(64 << 10) as usize
            };
            // The receiver keeps one flat folder: names are unique per agent.
            let name = format!("a{i}-f{f}.bin");
            std::fs::write(staging.join(&name), rng.bytes(len))?;
            total_bytes += len as u64;
            names.push(name);
        }
        daemons.push(Running::start(
            &format!("agent-{i}"),
            &dir,
            &["daemon", "--config", utf8(&config)?],
        )?);
        drops.push((staging, spool, names));
    }
    let expected = agents * per_agent;
    eprintln!(
        "  {agents} agents started; dropping {expected} files ({:.1} MiB)",
        total_bytes as f64 / (1 << 20) as f64
    );
    rustix::fs::sync();
    let started = Instant::now();
    for (staging, spool, names) in &drops {
        rename_all(staging, spool, names)?;
    }
    let done = wait_until(
        &format!("{expected} files in the receiver's output"),
        Duration::from_millis(100),
        Duration::from_secs(600),
        || {
            receiver.ensure_alive()?;
            Ok(count_files(&run.out) >= expected)
        },
    )
    .with_context(|| {
        let parked: usize = daemons
            .iter()
            .map(|d| {
                std::fs::read_to_string(&d.log)
                    .unwrap_or_default()
                    .matches("file parked as failed")
                    .count()
            })
            .sum();
        format!(
            "{} of {expected} files arrived; the agents parked {parked}",
            count_files(&run.out)
        )
    })?;
    let files_per_s = expected as f64 / (done - started).as_secs_f64();
    let peak = receiver.peak_rss_mib()?;
    ensure!(
        count_files(&run.out) == expected,
        "the receiver holds {} files, not {expected}",
        count_files(&run.out)
    );
    for daemon in &mut daemons {
        daemon.ensure_alive()?;
    }
    eprintln!("  {files_per_s:.0} files/s; receiver peak RSS {peak:.1} MiB");
    Ok(Fleet {
        agents,
        files: expected,
        files_per_s,
        receiver_peak_rss_mib: peak,
    })
}
