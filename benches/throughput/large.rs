//! Scenario 1 as a deployment sees it: the agent and the receiver are two
//! processes on 127.0.0.1, and the agent's time from the drop to the file
//! under its final name is compared with one curl POST of the same file to the
//! same receiver. Runs alternate which of the two goes first, and the disk is
//! synced before each timed step, so that neither pays for the other's
//! writeback. Alongside: the time to the receiver's first chunk, the bytes
//! the agent process wrote per byte delivered (`/proc/PID/io` write_bytes)
//! and the buffer file's size before, at its peak and after delivery.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::processes::{
    Pending, RunDir, Running, file_len, program_available, rename_all, start_daemon,
    start_receiver_with, write_files,
};
use super::scenarios::{LargeFile, curl_upload};
use super::support::{largest_file_len, wait_until};
use super::table::{Baseline, Named, mb_per_s, median, median_of};
use super::{MIB, Settings};

/// The agent's default chunk size: the receiver holds the first chunk once
/// its staging file is this long (or the whole file, if shorter).
const FIRST_CHUNK_BYTES: u64 = MIB;

/// Small files for the write amplification row.
pub(super) const SMALL_FILES: usize = 1000;

/// Small files renamed in one at a time, each after the one before it was
/// delivered, for the row without a target.
pub(super) const ONE_AT_A_TIME_FILES: usize = 200;
const SMALL_FILE_BYTES: usize = 4096;

pub(super) struct LargeEndToEnd {
    pub(super) mb_per_s: f64,
    pub(super) curl: Baseline,
    pub(super) agent_rss_mib: f64,
    /// From the drop to the receiver holding the first chunk.
    pub(super) ttfb_ms: f64,
    /// Bytes the agent wrote per byte delivered.
    pub(super) write_amplification: f64,
    pub(super) buffer: BufferSizes,
}

/// The buffer's files (`buffer.db`, `buffer-bulk.db` and their WALs) before the drop, at their
/// largest while the file was buffered, and once the agent is idle again
/// after delivery; medians over the runs.
#[derive(Clone, Copy)]
pub(super) struct BufferSizes {
    pub(super) before: u64,
    pub(super) peak: u64,
    pub(super) after: u64,
}

impl BufferSizes {
    /// Whether the buffer gave back at least 90 % of what the file took.
    pub(super) fn returned(&self) -> bool {
        let grew = self.peak.saturating_sub(self.before);
        self.after.saturating_sub(self.before) as f64 <= 0.1 * grew as f64
    }
}

struct AgentRun {
    mb_per_s: f64,
    ttfb_ms: f64,
    write_amplification: f64,
    buffer: BufferSizes,
    agent_rss_mib: f64,
}

pub(super) fn large_end_to_end(settings: &Settings, large: &LargeFile) -> Result<LargeEndToEnd> {
    let curl = program_available("curl");
    let what = format!("1. large file end to end ({} MiB)", large.size >> 20);
    let mut run_no = 0;
    let runs = settings.repeat(&what, || {
        run_no += 1;
        let run = RunDir::create(settings)?;
        // Larger than the file, for curl's single v1 request.
        let (mut receiver, port) = start_receiver_with(&run, large.size + MIB)?;
        let mut agent = start_daemon(&run, "agent", port, None)?;
        let url = format!("http://127.0.0.1:{port}/upload");
        let curl_first = run_no % 2 == 0;
        let mut curl_mb_per_s = None;
        if curl_first && curl.is_ok() {
            curl_mb_per_s = Some(curl_step(&run, &url, large)?);
        }
        let agent_run = agent_step(&run, large, &mut agent, &mut receiver)?;
        if !curl_first && curl.is_ok() {
            curl_mb_per_s = Some(curl_step(&run, &url, large)?);
        }
        agent.stop();
        receiver.stop();
        Ok((agent_run, curl_mb_per_s))
    })?;
    let curl = curl.map(|()| Named {
        label: "curl, one v1 request",
        value: median(runs.iter().filter_map(|r| r.1).collect()),
    });
    let agent: Vec<&AgentRun> = runs.iter().map(|r| &r.0).collect();
    Ok(LargeEndToEnd {
        mb_per_s: median_of(&agent, |r| r.mb_per_s),
        curl,
        agent_rss_mib: median_of(&agent, |r| r.agent_rss_mib),
        ttfb_ms: median_of(&agent, |r| r.ttfb_ms),
        write_amplification: median_of(&agent, |r| r.write_amplification),
        buffer: BufferSizes {
            before: median_of(&agent, |r| r.buffer.before as f64) as u64,
            peak: median_of(&agent, |r| r.buffer.peak as f64) as u64,
            after: median_of(&agent, |r| r.buffer.after as f64) as u64,
        },
    })
}

/// One timed curl POST of the file, checked in the output; MB/s.
fn curl_step(run: &RunDir, url: &str, large: &LargeFile) -> Result<f64> {
    let name = format!("curl-{}", large.name);
    large.warm()?;
    rustix::fs::sync();
    let elapsed = curl_upload(url, &large.path, &name)?;
    let received = file_len(&run.out.join(&name));
    ensure!(
        received == Some(large.size),
        "curl's upload left {received:?} bytes in the output, not {}",
        large.size
    );
    // Not part of any later step's disk.
    std::fs::remove_file(run.out.join(&name))?;
    let speed = mb_per_s(large.size, elapsed);
    eprintln!("  curl: {speed:.1} MB/s in {:.2} s", elapsed.as_secs_f64());
    Ok(speed)
}

/// Drops the file into the agent's spool and watches, from outside, the
/// receiver's staging folder (first chunk), the buffer's size and the output.
fn agent_step(
    run: &RunDir,
    large: &LargeFile,
    agent: &mut Running,
    receiver: &mut Running,
) -> Result<AgentRun> {
    let staging = run.out.join(".indexedcp").join("staging");
    let first_chunk = large.size.min(FIRST_CHUNK_BYTES);
    let in_output = run.out.join(&large.name);
    let before = buffer_size(&run.state);
    let written_before = agent.write_bytes()?;
    let dropped = large.drop_into_spool(run)?;
    let mut first = None;
    let mut peak = before;
    let arrived = wait_until(
        &format!("{} in the output", large.name),
        Duration::from_millis(1),
        large.timeout(),
        || {
            receiver.ensure_alive()?;
            if first.is_none() && largest_file_len(&staging) >= first_chunk {
                first = Some(Instant::now());
            }
            peak = peak.max(buffer_size(&run.state));
            Ok(file_len(&in_output) == Some(large.size))
        },
    )?;
    let elapsed = arrived - dropped;
    // A chunk staged and renamed between two polls: the rename is the bound.
    let ttfb = first.unwrap_or(arrived) - dropped;
    // The agent checkpoints and trims after the receiver confirmed: what it
    // writes then counts, so wait until it has stopped writing.
    let written = idle_write_bytes(agent)? - written_before;
    let after = buffer_size(&run.state);
    let agent_rss_mib = agent.peak_rss_mib()?;
    let speed = mb_per_s(large.size, elapsed);
    let write_amplification = written as f64 / large.size as f64;
    eprintln!(
        "  agent: {speed:.1} MB/s in {:.2} s; first chunk after {:.0} ms; wrote {:.2} x the file; \
         buffer {:.1} -> {:.1} -> {:.1} MiB; peak RSS {agent_rss_mib:.1} MiB",
        elapsed.as_secs_f64(),
        ttfb.as_secs_f64() * 1e3,
        write_amplification,
        before as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        after as f64 / MIB as f64,
    );
    Ok(AgentRun {
        mb_per_s: speed,
        ttfb_ms: ttfb.as_secs_f64() * 1e3,
        write_amplification,
        buffer: BufferSizes {
            before,
            peak,
            after,
        },
        agent_rss_mib,
    })
}

/// Bytes the agent wrote per byte delivered for `count` files of 4 KiB,
/// agent and receiver as two processes: renamed into its spool at once, or
/// `one_at_a_time`, each once the one before it was delivered (every file
/// then has a commit and a confirmation of its own).
pub(super) fn small_write_amplification(
    settings: &Settings,
    count: usize,
    one_at_a_time: bool,
) -> Result<f64> {
    let label = if one_at_a_time {
        "1. write amplification, small files one at a time"
    } else {
        "1. write amplification, small files"
    };
    let runs = settings.repeat(label, || {
        let run = RunDir::create(settings)?;
        let names = write_files(&run.staging, "small-", count, SMALL_FILE_BYTES)?;
        let (mut receiver, port) = start_receiver_with(&run, 64 * MIB)?;
        let mut agent = start_daemon(&run, "agent", port, None)?;
        rustix::fs::sync();
        let written_before = agent.write_bytes()?;
        // Renames `batch` into the spool and waits until it is all in the
        // output, polling every `every`.
        let mut deliver = |batch: &[String], what: &str, every: Duration, within: Duration| {
            rename_all(&run.staging, &run.spool, batch)?;
            let mut pending = Pending::new(batch);
            wait_until(what, every, within, || {
                receiver.ensure_alive()?;
                Ok(pending
                    .advance(|name| file_len(&run.out.join(name)) == Some(SMALL_FILE_BYTES as u64)))
            })
        };
        if one_at_a_time {
            for name in &names {
                deliver(
                    std::slice::from_ref(name),
                    "the small file in the output",
                    Duration::from_millis(2),
                    Duration::from_secs(60),
                )?;
            }
        } else {
            deliver(
                &names,
                "every small file in the output",
                Duration::from_millis(10),
                Duration::from_secs(300),
            )?;
        }
        let written = idle_write_bytes(&mut agent)? - written_before;
        agent.stop();
        receiver.stop();
        let amplification = written as f64 / (count * SMALL_FILE_BYTES) as f64;
        eprintln!(
            "  agent wrote {:.1} MiB for {:.1} MiB delivered: {amplification:.2} x",
            written as f64 / MIB as f64,
            (count * SMALL_FILE_BYTES) as f64 / MIB as f64
        );
        Ok(amplification)
    })?;
    Ok(median(runs))
}

/// The agent's write_bytes once they stopped growing for a second.
fn idle_write_bytes(agent: &mut Running) -> Result<u64> {
    let mut last = agent.write_bytes()?;
    let mut since = Instant::now();
    wait_until(
        "the agent to stop writing",
        Duration::from_millis(50),
        Duration::from_secs(120),
        || {
            agent.ensure_alive()?;
            let now = agent.write_bytes()?;
            if now != last {
                (last, since) = (now, Instant::now());
            }
            Ok(since.elapsed() >= Duration::from_secs(1))
        },
    )?;
    Ok(last)
}

/// The buffer's bytes on disk: `buffer.db`, `buffer-bulk.db` and their WALs.
fn buffer_size(state: &Path) -> u64 {
    [
        "buffer.db",
        "buffer.db-wal",
        "buffer-bulk.db",
        "buffer-bulk.db-wal",
    ]
    .iter()
    .filter_map(|name| file_len(&state.join(name)))
    .sum()
}

/// Reads a `/proc/PID/io` field of `pid`.
pub(super) fn proc_io(pid: u32, field: &str) -> Result<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .with_context(|| format!("cannot read /proc/{pid}/io"))?;
    io.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/io"))
}
