//! The performance suite behind the README's figures, measured on the real
//! binary (`env!("CARGO_BIN_EXE_indexedcp")`) on 127.0.0.1 with temp folders.
//!
//! `cargo bench --bench throughput` prints the machine first, progress on
//! stderr while it runs, and at the end one Markdown table on stdout: scenario,
//! figure, baseline, ratio, target, result. Every figure is the median of
//! INDEXEDCP_BENCH_RUNS runs (default 3), and every speed that has a baseline
//! is also given as a ratio to it, measured in the same run on the same machine,
//! so that the figures can be compared across machines.
//!
//! 1. Large file end to end: one file of random bytes renamed into the spool of
//!    a daemon that is agent and receiver at once, until it is complete in the
//!    output directory. Baseline: curl sending the same file to the same
//!    receiver as one v1 request.
//! 2. Ingest alone: the same file into the buffer of an agent whose receiver is
//!    down, until the source leaves the spool (it is deleted only after the
//!    buffer's commit). Baseline: `sha256sum` of the file.
//! 3. Many small files: 4 KiB files renamed into the spool at once, until all
//!    are in the output directory.
//! 4. Latency: one 4 KiB file written into the spool by a plain program
//!    (create, write, close) of an idle daemon, until it is in the output
//!    directory; median and p99 over many drops, `settle` at its default.
//! 5. Memory (VmHWM): the daemon of 1 and of 3; scenario 1 again with agent and
//!    receiver as two processes; an agent holding many small files while its
//!    receiver is down.
//! 6. Receiver alone: 1 MiB chunks of the resumable protocol from 16
//!    connections. Baseline: 16 threads writing 1 MiB and `fdatasync`ing it,
//!    the least a receiver that acknowledges only durable chunks must do.
//!
//! Sizes come from the environment, so the suite can be smoke-tested quickly:
//! INDEXEDCP_BENCH_MIB (1024), INDEXEDCP_BENCH_SMALL_FILES (10000),
//! INDEXEDCP_BENCH_QUEUED_FILES (100000), INDEXEDCP_BENCH_LATENCY_DROPS (200),
//! INDEXEDCP_BENCH_ONLY (scenario numbers, e.g. "1,4"; default all) and
//! INDEXEDCP_BENCH_DIR (where the temp folders go; default the system temp
//! dir). The daemons run with their default settings except for paths, ports
//! and keys, and log at their default level into files that are summarised on
//! stderr when a process stops.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use sha2::{Digest, Sha256};

// The harness the integration tests use. The bench needs only part of it
// (starting the binary, free ports, the generator, the blocking wait); the
// async polling and the tree listing serve the tests alone, hence the allow.
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use support::{BIN, Rng, free_port, indexedcp, wait_until};

const KEY: &str = "bench-key-0123456789";
const MIB: u64 = 1 << 20;
const SMALL_FILE_BYTES: usize = 4096;
const QUEUED_FILE_BYTES: usize = 1024;
const RECEIVER_CONNECTIONS: u64 = 16;
const CHUNKS_PER_FILE: u64 = 64;

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary
    // without it, and should not start a half-hour benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("throughput: run it with `cargo bench --bench throughput`");
        return ExitCode::SUCCESS;
    }
    match run_suite() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("throughput: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_suite() -> Result<()> {
    let started = Instant::now();
    let settings = Settings::from_env()?;
    println!("Machine: {}", machine());
    println!(
        "Median of {} run(s); large file {} MiB, {} small files, {} queued files, {} latency drops.",
        settings.runs,
        settings.large_mib,
        settings.small_files,
        settings.queued_files,
        settings.latency_drops
    );
    println!();
    let suite = tempfile::Builder::new()
        .prefix("indexedcp-bench-")
        .tempdir_in(&settings.base_dir)
        .with_context(|| {
            format!(
                "cannot create a temp dir in {}",
                settings.base_dir.display()
            )
        })?;
    let large = if [1, 2, 5].iter().any(|&n| settings.wants(n)) {
        Some(LargeFile::create(suite.path(), settings.large_mib << 20)?)
    } else {
        None
    };

    let mut table = Table::default();
    let mut memory = Vec::new();
    let mib = settings.large_mib;
    if let (true, Some(large)) = (settings.wants(1), &large) {
        let name = format!("1. large file end to end, one daemon ({mib} MiB)");
        match end_to_end(&settings, large) {
            Ok(result) => {
                table.speed(&name, result.mb_per_s, "MB/s", &result.curl, 0.5);
                memory.push(Row::report(
                    "5. peak RSS, one daemon, during 1",
                    format_mib(result.peak_rss_mib),
                ));
            }
            Err(e) => table.push(Row::error(&name, "ratio >= 0.5", &e)),
        }
    }
    if let (true, Some(large)) = (settings.wants(2), &large) {
        let name = format!("2. ingest alone: hash + SQLite ({mib} MiB)");
        match ingest_alone(&settings, large) {
            Ok(result) => table.speed(&name, result.mb_per_s, "MB/s", &result.sha256sum, 0.5),
            Err(e) => table.push(Row::error(&name, "ratio >= 0.5", &e)),
        }
    }
    if settings.wants(3) {
        let name = format!(
            "3. many small files, one daemon ({} x 4 KiB)",
            settings.small_files
        );
        match small_files(&settings) {
            Ok(result) => {
                table.push(Row::at_least(
                    &name,
                    result.files_per_s,
                    "files/s",
                    1000.0,
                    0,
                ));
                memory.push(Row::report(
                    "5. peak RSS, one daemon, during 3",
                    format_mib(result.peak_rss_mib),
                ));
            }
            Err(e) => table.push(Row::error(&name, ">= 1000 files/s", &e)),
        }
    }
    if settings.wants(4) {
        let drops = settings.latency_drops;
        let median = format!("4. latency, 4 KiB file, idle daemon: median ({drops} drops)");
        let p99 = format!("4. latency, 4 KiB file, idle daemon: p99 ({drops} drops)");
        match latency(&settings) {
            Ok(result) => {
                table.push(Row::at_most(&median, result.median_ms, "ms", 50.0, 1));
                table.push(Row::at_most(&p99, result.p99_ms, "ms", 250.0, 1));
            }
            Err(e) => {
                table.push(Row::error(&median, "< 50 ms", &e));
                table.push(Row::error(&p99, "< 250 ms", &e));
            }
        }
    }
    if settings.wants(5) {
        for row in memory {
            table.push(row);
        }
        if let Some(large) = &large {
            let agent = "5. peak RSS, agent process, 1 as two processes";
            let receiver = "5. peak RSS, receiver process, 1 as two processes";
            match two_processes(&settings, large) {
                Ok(result) => {
                    table.push(Row::at_most(agent, result.agent_rss_mib, "MiB", 64.0, 1));
                    table.push(Row::at_most(
                        receiver,
                        result.receiver_rss_mib,
                        "MiB",
                        64.0,
                        1,
                    ));
                }
                Err(e) => {
                    table.push(Row::error(agent, "<= 64 MiB", &e));
                    table.push(Row::error(receiver, "<= 64 MiB", &e));
                }
            }
        }
        let name = format!(
            "5. peak RSS, agent, {} x 1 KiB queued, receiver down",
            settings.queued_files
        );
        match queued_files(&settings) {
            Ok(rss) => table.push(Row::at_most(&name, rss, "MiB", 128.0, 1)),
            Err(e) => table.push(Row::error(&name, "<= 128 MiB", &e)),
        }
    }
    if settings.wants(6) {
        let name = "6. receiver alone, 16 connections x 1 MiB chunks";
        match receiver_alone(&settings) {
            Ok(result) => {
                let mut row = Row::at_least(name, result.chunks_per_s, "chunks/s", 500.0, 0);
                row.baseline = format!(
                    "disk, 16 writers, 1 MiB write + fdatasync: {:.0} chunks/s",
                    result.disk_chunks_per_s
                );
                row.ratio = format!("{:.2}", result.chunks_per_s / result.disk_chunks_per_s);
                table.push(row);
                table.push(Row::report(
                    "6. peak RSS, receiver alone, during 6",
                    format_mib(result.peak_rss_mib),
                ));
            }
            Err(e) => table.push(Row::error(name, ">= 500 chunks/s", &e)),
        }
    }

    let took = started.elapsed();
    eprintln!("suite finished in {:.1} min", took.as_secs_f64() / 60.0);
    table.print();
    println!();
    println!("Suite run time: {:.1} min.", took.as_secs_f64() / 60.0);
    Ok(())
}

// ---------------------------------------------------------------------------
// Settings and the machine

struct Settings {
    runs: usize,
    large_mib: u64,
    small_files: usize,
    queued_files: usize,
    latency_drops: usize,
    /// Scenario numbers to run; `None` runs them all.
    only: Option<BTreeSet<u32>>,
    base_dir: PathBuf,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let only = match std::env::var("INDEXEDCP_BENCH_ONLY") {
            Ok(list) if !list.trim().is_empty() => Some(parse_scenarios(&list)?),
            _ => None,
        };
        Ok(Settings {
            runs: env_number("INDEXEDCP_BENCH_RUNS", 3)?,
            large_mib: env_number("INDEXEDCP_BENCH_MIB", 1024)?,
            small_files: env_number("INDEXEDCP_BENCH_SMALL_FILES", 10_000)?,
            queued_files: env_number("INDEXEDCP_BENCH_QUEUED_FILES", 100_000)?,
            latency_drops: env_number("INDEXEDCP_BENCH_LATENCY_DROPS", 200)?,
            only,
            base_dir: std::env::var_os("INDEXEDCP_BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        })
    }

    fn wants(&self, scenario: u32) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.contains(&scenario))
    }

    /// Runs `one_run` INDEXEDCP_BENCH_RUNS times, announcing each run on stderr.
    fn repeat<T>(&self, what: &str, mut one_run: impl FnMut() -> Result<T>) -> Result<Vec<T>> {
        (1..=self.runs)
            .map(|run| {
                eprintln!("{what}: run {run}/{}", self.runs);
                one_run().with_context(|| format!("{what}, run {run}"))
            })
            .collect()
    }
}

/// INDEXEDCP_BENCH_ONLY: scenario numbers separated by commas.
fn parse_scenarios(list: &str) -> Result<BTreeSet<u32>> {
    list.split(',')
        .map(|n| {
            n.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=6).contains(n))
                .ok_or_else(|| {
                    anyhow!("INDEXEDCP_BENCH_ONLY={list}: expected scenario numbers 1 to 6, separated by commas")
                })
        })
        .collect()
}

/// A positive number from the environment variable `name`, or `default`.
fn env_number<T: FromStr + PartialOrd + Default + Copy>(name: &str, default: T) -> Result<T> {
    let Ok(text) = std::env::var(name) else {
        return Ok(default);
    };
    text.trim()
        .parse::<T>()
        .ok()
        .filter(|n| *n > T::default())
        .ok_or_else(|| anyhow!("{name}={text}: expected a positive whole number"))
}

/// The CPU model, the CPUs this process may use, and the memory.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / (1024.0 * 1024.0));
    format!("{model}, {cores} cores, {memory_gib:.0} GiB RAM")
}

// ---------------------------------------------------------------------------
// The results table

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

struct Row {
    scenario: String,
    figure: String,
    baseline: String,
    ratio: String,
    target: String,
    result: &'static str,
}

impl Row {
    /// A figure that must be at least `target`.
    fn at_least(scenario: &str, value: f64, unit: &str, target: f64, decimals: usize) -> Row {
        Row {
            scenario: scenario.to_owned(),
            figure: format!("{value:.decimals$} {unit}"),
            baseline: "-".into(),
            ratio: "-".into(),
            target: format!(">= {target} {unit}"),
            result: pass_fail(value >= target),
        }
    }

    /// A figure that must stay below (`ms`) or at most (`MiB`) `target`.
    fn at_most(scenario: &str, value: f64, unit: &str, target: f64, decimals: usize) -> Row {
        // Latencies have strict targets ("< 50 ms"), memory inclusive ones.
        let (relation, ok) = if unit == "ms" {
            ("<", value < target)
        } else {
            ("<=", value <= target)
        };
        Row {
            scenario: scenario.to_owned(),
            figure: format!("{value:.decimals$} {unit}"),
            baseline: "-".into(),
            ratio: "-".into(),
            target: format!("{relation} {target} {unit}"),
            result: pass_fail(ok),
        }
    }

    /// A figure reported for information, without a target.
    fn report(scenario: &str, figure: String) -> Row {
        Row {
            scenario: scenario.to_owned(),
            figure,
            baseline: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            result: "-",
        }
    }

    /// A scenario that could not be measured.
    fn error(scenario: &str, target: &str, error: &anyhow::Error) -> Row {
        eprintln!("{scenario}: FAILED: {error:#}");
        let mut message = format!("error: {error:#}");
        if message.chars().count() > 160 {
            message = message.chars().take(157).chain("...".chars()).collect();
        }
        Row {
            scenario: scenario.to_owned(),
            figure: message,
            baseline: "-".into(),
            ratio: "-".into(),
            target: target.to_owned(),
            result: "FAIL",
        }
    }
}

fn pass_fail(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// A baseline speed, or why there is none.
type Baseline = Result<Named, String>;

/// A baseline speed and what it measured.
struct Named {
    label: &'static str,
    value: f64,
}

impl Table {
    fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// A speed whose target is a minimum ratio to `baseline`.
    fn speed(&mut self, scenario: &str, value: f64, unit: &str, baseline: &Baseline, min: f64) {
        let figure = format!("{value:.1} {unit}");
        let target = format!("ratio >= {min}");
        let row = match baseline {
            Ok(base) => Row {
                scenario: scenario.to_owned(),
                figure,
                baseline: format!("{}: {:.1} {unit}", base.label, base.value),
                ratio: format!("{:.2}", value / base.value),
                target,
                result: pass_fail(value / base.value >= min),
            },
            Err(reason) => Row {
                scenario: scenario.to_owned(),
                figure,
                baseline: format!("n/a ({reason})"),
                ratio: "n/a".into(),
                target,
                result: "FAIL",
            },
        };
        self.rows.push(row);
    }

    /// Prints the rows as a Markdown table, columns padded for the terminal.
    fn print(&self) {
        let header = [
            "scenario", "figure", "baseline", "ratio", "target", "result",
        ];
        let cells: Vec<[String; 6]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    &r.scenario,
                    &r.figure,
                    &r.baseline,
                    &r.ratio,
                    &r.target,
                    &r.result.to_owned(),
                ]
                .map(|cell| cell.replace('|', "\\|"))
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: &[&str]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            println!("| {} |", padded.join(" | "));
        };
        line(&header);
        let rules: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
        line(&rules.iter().map(String::as_str).collect::<Vec<_>>());
        for row in &cells {
            line(&row.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}

fn format_mib(mib: f64) -> String {
    format!("{mib:.1} MiB")
}

/// The median over runs of one figure of each run.
fn median_of<T>(runs: &[T], figure: impl Fn(&T) -> f64) -> f64 {
    median(runs.iter().map(figure).collect())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The nearest-rank percentile `p` (0 to 100) of `values`.
fn percentile(mut values: Vec<f64>, p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

// ---------------------------------------------------------------------------
// Scenario 1: large file end to end, with the curl baseline

struct EndToEnd {
    mb_per_s: f64,
    curl: Baseline,
    peak_rss_mib: f64,
}

fn end_to_end(settings: &Settings, large: &LargeFile) -> Result<EndToEnd> {
    let curl = program_available("curl");
    let runs = settings.repeat("1. large file end to end", || {
        let run = RunDir::create(settings)?;
        let port = free_port();
        // Larger than the file, for curl's single v1 request.
        let max_chunk = large.size + MIB;
        let mut daemon = start_daemon(&run, "daemon", port, Some((port, Some(max_chunk))))?;
        let elapsed = large.drop_and_wait(&run, &mut daemon)?;
        let peak_rss = daemon.peak_rss_mib()?;
        eprintln!(
            "  daemon: {:.1} MB/s in {:.2} s, peak RSS {peak_rss:.1} MiB",
            mb_per_s(large.size, elapsed),
            elapsed.as_secs_f64()
        );
        let curl_mb_per_s = match &curl {
            Ok(()) => {
                let url = format!("http://127.0.0.1:{port}/upload");
                let elapsed = curl_upload(&url, &large.path, "curl-large.bin")?;
                let received = file_len(&run.out.join("curl-large.bin"));
                ensure!(
                    received == Some(large.size),
                    "curl's upload left {received:?} bytes in the output, not {}",
                    large.size
                );
                let speed = mb_per_s(large.size, elapsed);
                eprintln!("  curl: {speed:.1} MB/s in {:.2} s", elapsed.as_secs_f64());
                Some(speed)
            }
            Err(_) => None,
        };
        daemon.stop();
        Ok((mb_per_s(large.size, elapsed), curl_mb_per_s, peak_rss))
    })?;
    let curl = curl.map(|()| Named {
        label: "curl, one v1 request",
        value: median(runs.iter().filter_map(|r| r.1).collect()),
    });
    Ok(EndToEnd {
        mb_per_s: median_of(&runs, |r| r.0),
        curl,
        peak_rss_mib: median_of(&runs, |r| r.2),
    })
}

/// Sends `file` as one v1 request (chunk 0, no resumable headers) and returns
/// curl's wall time.
fn curl_upload(url: &str, file: &Path, name: &str) -> Result<Duration> {
    let started = Instant::now();
    let output = Command::new("curl")
        .args([
            "-sS",
            "--fail-with-body",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
        ])
        .args(["-X", "POST", "-H", "Expect:"])
        .arg("-T")
        .arg(file)
        .arg("-H")
        .arg(format!("Authorization: Bearer {KEY}"))
        .arg("-H")
        .arg(format!("X-File-Name: {name}"))
        .args(["-H", "X-Chunk-Index: 0", url])
        .output()
        .context("cannot run curl")?;
    let elapsed = started.elapsed();
    ensure!(
        output.status.success(),
        "curl failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(elapsed)
}

// ---------------------------------------------------------------------------
// Scenario 2: ingest alone, with the sha256sum baseline

struct IngestAlone {
    mb_per_s: f64,
    sha256sum: Baseline,
}

fn ingest_alone(settings: &Settings, large: &LargeFile) -> Result<IngestAlone> {
    let sha256sum = program_available("sha256sum");
    let runs = settings.repeat("2. ingest alone", || {
        let run = RunDir::create(settings)?;
        // Nothing listens on the target's port: the agent buffers and waits.
        let mut agent = start_daemon(&run, "agent", free_port(), None)?;
        let dropped = large.drop_into_spool(&run)?;
        let in_spool = run.spool.join(&large.name);
        let committed = wait_until(
            "the source to leave the spool (buffer committed)",
            Duration::from_millis(2),
            large.timeout(),
            || {
                agent.ensure_alive()?;
                Ok(std::fs::symlink_metadata(&in_spool).is_err())
            },
        )?;
        let elapsed = committed - dropped;
        agent.stop();
        let buffered_sha = buffered_sha256(&run, large.size)?;
        let speed = mb_per_s(large.size, elapsed);
        eprintln!(
            "  ingest: {speed:.1} MB/s in {:.2} s",
            elapsed.as_secs_f64()
        );
        let baseline = match &sha256sum {
            Ok(()) => {
                let (sha, elapsed) = sha256sum_of(&large.path)?;
                ensure!(
                    sha == buffered_sha,
                    "the buffer recorded sha256 {buffered_sha}, sha256sum says {sha}"
                );
                let speed = mb_per_s(large.size, elapsed);
                eprintln!("  sha256sum: {speed:.1} MB/s");
                Some(speed)
            }
            Err(_) => None,
        };
        Ok((speed, baseline))
    })?;
    let sha256sum = sha256sum.map(|()| Named {
        label: "sha256sum",
        value: median(runs.iter().filter_map(|r| r.1).collect()),
    });
    Ok(IngestAlone {
        mb_per_s: median_of(&runs, |r| r.0),
        sha256sum,
    })
}

/// Checks with `indexedcp status --json` that the buffer holds exactly one
/// file of `size` bytes, and returns the SHA-256 it recorded.
fn buffered_sha256(run: &RunDir, size: u64) -> Result<String> {
    let output = indexedcp()
        .args(["status", "--json", "--config"])
        .arg(&run.config)
        .output()
        .context("cannot run indexedcp status")?;
    ensure!(
        output.status.success(),
        "indexedcp status failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let files: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("indexedcp status --json: not JSON")?;
    let [file] = files.as_array().map(Vec::as_slice).unwrap_or_default() else {
        bail!("expected one buffered file, indexedcp status --json says: {files}");
    };
    ensure!(
        file["size"].as_u64() == Some(size),
        "the buffered file is not {size} bytes: {file}"
    );
    file["sha256"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no sha256 in {file}"))
}

fn sha256sum_of(path: &Path) -> Result<(String, Duration)> {
    let started = Instant::now();
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("cannot run sha256sum")?;
    let elapsed = started.elapsed();
    ensure!(
        output.status.success(),
        "sha256sum failed: {}",
        output.status
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let sha = text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    Ok((sha, elapsed))
}

// ---------------------------------------------------------------------------
// Scenario 3: many small files

struct SmallFiles {
    files_per_s: f64,
    peak_rss_mib: f64,
}

fn small_files(settings: &Settings) -> Result<SmallFiles> {
    let count = settings.small_files;
    let runs = settings.repeat("3. many small files", || {
        let run = RunDir::create(settings)?;
        let written = Instant::now();
        let names = write_files(&run.staging, "small-", count, SMALL_FILE_BYTES)?;
        eprintln!(
            "  wrote {count} files in staging in {:.2} s",
            written.elapsed().as_secs_f64()
        );
        let port = free_port();
        let mut daemon = start_daemon(&run, "daemon", port, Some((port, None)))?;
        rustix::fs::sync();
        let dropped = Instant::now();
        rename_all(&run.staging, &run.spool, &names)?;
        let timeout = Duration::from_secs(120) + Duration::from_millis(100) * count as u32;
        let mut pending = Pending::new(&names);
        let arrived = wait_until(
            "every small file in the output",
            Duration::from_millis(10),
            timeout,
            || {
                daemon.ensure_alive()?;
                Ok(pending
                    .advance(|name| file_len(&run.out.join(name)) == Some(SMALL_FILE_BYTES as u64)))
            },
        )?;
        let elapsed = arrived - dropped;
        let peak_rss = daemon.peak_rss_mib()?;
        daemon.stop();
        let files_per_s = count as f64 / elapsed.as_secs_f64();
        eprintln!(
            "  {files_per_s:.0} files/s ({:.2} s), peak RSS {peak_rss:.1} MiB",
            elapsed.as_secs_f64()
        );
        Ok((files_per_s, peak_rss))
    })?;
    Ok(SmallFiles {
        files_per_s: median_of(&runs, |r| r.0),
        peak_rss_mib: median_of(&runs, |r| r.1),
    })
}

// ---------------------------------------------------------------------------
// Scenario 4: latency of one small file

struct Latency {
    median_ms: f64,
    p99_ms: f64,
}

fn latency(settings: &Settings) -> Result<Latency> {
    let drops = settings.latency_drops;
    let content = Rng::new(4).bytes(SMALL_FILE_BYTES);
    let runs = settings.repeat("4. latency", || {
        let run = RunDir::create(settings)?;
        let port = free_port();
        let mut daemon = start_daemon(&run, "daemon", port, Some((port, None)))?;
        let mut latencies_ms = Vec::with_capacity(drops);
        for drop_idx in 0..drops {
            // An idle daemon: whatever the previous drop left to do is done.
            std::thread::sleep(Duration::from_millis(50));
            let name = format!("drop-{drop_idx:05}");
            let in_output = run.out.join(&name);
            let written = Instant::now();
            // As a plain program writes a file: the agent sees the close.
            let mut file = File::create(run.spool.join(&name))
                .with_context(|| format!("cannot create {name} in the spool"))?;
            file.write_all(&content)?;
            drop(file);
            let arrived = wait_until(
                &format!("{name} in the output"),
                Duration::from_millis(1),
                Duration::from_secs(60),
                || {
                    daemon.ensure_alive()?;
                    Ok(file_len(&in_output) == Some(SMALL_FILE_BYTES as u64))
                },
            )?;
            latencies_ms.push((arrived - written).as_secs_f64() * 1e3);
        }
        daemon.stop();
        let run_median = median(latencies_ms.clone());
        let run_p99 = percentile(latencies_ms, 99.0);
        eprintln!("  median {run_median:.1} ms, p99 {run_p99:.1} ms");
        Ok((run_median, run_p99))
    })?;
    Ok(Latency {
        median_ms: median_of(&runs, |r| r.0),
        p99_ms: median_of(&runs, |r| r.1),
    })
}

// ---------------------------------------------------------------------------
// Scenario 5: memory (the rows from 1 and 3 are measured there)

struct TwoProcesses {
    agent_rss_mib: f64,
    receiver_rss_mib: f64,
}

/// Scenario 1 with the agent and the receiver in two processes.
fn two_processes(settings: &Settings, large: &LargeFile) -> Result<TwoProcesses> {
    let runs = settings.repeat("5. large file, agent and receiver as two processes", || {
        let run = RunDir::create(settings)?;
        let (mut receiver, port) = start_receiver(&run)?;
        let mut agent = start_daemon(&run, "agent", port, None)?;
        let elapsed = large.drop_and_wait(&run, &mut receiver)?;
        agent.ensure_alive()?;
        let (agent_rss, receiver_rss) = (agent.peak_rss_mib()?, receiver.peak_rss_mib()?);
        agent.stop();
        receiver.stop();
        eprintln!(
            "  {:.1} MB/s in {:.2} s; peak RSS agent {agent_rss:.1} MiB, receiver {receiver_rss:.1} MiB",
            mb_per_s(large.size, elapsed),
            elapsed.as_secs_f64()
        );
        Ok((agent_rss, receiver_rss))
    })?;
    Ok(TwoProcesses {
        agent_rss_mib: median_of(&runs, |r| r.0),
        receiver_rss_mib: median_of(&runs, |r| r.1),
    })
}

/// Peak RSS of an agent that buffered many small files while its receiver is
/// down.
fn queued_files(settings: &Settings) -> Result<f64> {
    let count = settings.queued_files;
    let runs = settings.repeat("5. small files queued, receiver down", || {
        let run = RunDir::create(settings)?;
        let written = Instant::now();
        let names = write_files(&run.staging, "queued-", count, QUEUED_FILE_BYTES)?;
        eprintln!(
            "  wrote {count} files in staging in {:.2} s",
            written.elapsed().as_secs_f64()
        );
        let mut agent = start_daemon(&run, "agent", free_port(), None)?;
        rustix::fs::sync();
        let dropped = Instant::now();
        rename_all(&run.staging, &run.spool, &names)?;
        let timeout = Duration::from_secs(120) + Duration::from_millis(100) * count as u32;
        let mut pending = Pending::new(&names);
        let buffered =
            wait_until(
                "the spool to be empty (everything buffered)",
                Duration::from_millis(100),
                timeout,
                || {
                    agent.ensure_alive()?;
                    Ok(pending
                        .advance(|name| std::fs::symlink_metadata(run.spool.join(name)).is_err()))
                },
            )?;
        let peak_rss = agent.peak_rss_mib()?;
        agent.stop();
        let elapsed = buffered - dropped;
        eprintln!(
            "  buffered in {:.1} s ({:.0} files/s), peak RSS {peak_rss:.1} MiB",
            elapsed.as_secs_f64(),
            count as f64 / elapsed.as_secs_f64()
        );
        Ok(peak_rss)
    })?;
    Ok(median(runs))
}

// ---------------------------------------------------------------------------
// Scenario 6: the receiver alone under 16 connections

struct ReceiverAlone {
    chunks_per_s: f64,
    disk_chunks_per_s: f64,
    peak_rss_mib: f64,
}

/// One file's chunks, computed before the clock starts. Every file of the
/// scenario has the same content under its own upload id and name.
struct ChunkSet {
    /// 'static so that a request body borrows them instead of copying 1 MiB;
    /// leaked once per suite.
    bodies: Vec<&'static [u8]>,
    shas: Vec<String>,
    file_sha: String,
    file_size: u64,
}

impl ChunkSet {
    fn create(n_chunks: u64) -> ChunkSet {
        let mut prng = Rng::new(6);
        let mut whole = Sha256::new();
        let (mut bodies, mut shas) = (Vec::new(), Vec::new());
        for _ in 0..n_chunks {
            let body: &'static [u8] = prng.bytes(MIB as usize).leak();
            whole.update(body);
            shas.push(hex::encode(Sha256::digest(body)));
            bodies.push(body);
        }
        ChunkSet {
            bodies,
            shas,
            file_sha: hex::encode(whole.finalize()),
            file_size: n_chunks * MIB,
        }
    }
}

fn receiver_alone(settings: &Settings) -> Result<ReceiverAlone> {
    // INDEXEDCP_BENCH_MIB MiB in all (at least one chunk per connection):
    // files of up to 64 chunks, as many per connection as needed.
    let total = settings.large_mib.max(RECEIVER_CONNECTIONS);
    let chunks_per_file = (total / RECEIVER_CONNECTIONS).min(CHUNKS_PER_FILE);
    let files_per_connection = total.div_ceil(RECEIVER_CONNECTIONS * chunks_per_file);
    let n_chunks = RECEIVER_CONNECTIONS * files_per_connection * chunks_per_file;
    eprintln!(
        "6. receiver alone: {RECEIVER_CONNECTIONS} connections x {files_per_connection} file(s) x {chunks_per_file} chunks of 1 MiB"
    );
    let chunks = ChunkSet::create(chunks_per_file);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let runs = settings.repeat("6. receiver alone", || {
        let run = RunDir::create(settings)?;
        let (mut receiver, port) = start_receiver(&run)?;
        let url = format!("http://127.0.0.1:{port}/upload");
        rustix::fs::sync();
        let elapsed = runtime.block_on(load_receiver(&url, &chunks, files_per_connection))?;
        receiver.ensure_alive()?;
        let peak_rss = receiver.peak_rss_mib()?;
        let cpu_ms_per_chunk = receiver.cpu_seconds()? * 1000.0 / n_chunks as f64;
        receiver.stop();
        for name in (0..RECEIVER_CONNECTIONS)
            .flat_map(|conn| (0..files_per_connection).map(move |f| upload_name(conn, f)))
        {
            let len = file_len(&run.out.join(&name));
            ensure!(
                len == Some(chunks.file_size),
                "{name} in the output has {len:?} bytes, not {}",
                chunks.file_size
            );
        }
        let chunks_per_s = n_chunks as f64 / elapsed.as_secs_f64();
        let disk = disk_baseline(&run, &chunks, files_per_connection)?;
        eprintln!(
            "  {chunks_per_s:.0} chunks/s ({:.2} s), receiver CPU {cpu_ms_per_chunk:.2} ms per chunk, peak RSS {peak_rss:.1} MiB; disk {disk:.0} chunks/s",
            elapsed.as_secs_f64()
        );
        Ok((chunks_per_s, disk, peak_rss))
    })?;
    Ok(ReceiverAlone {
        chunks_per_s: median_of(&runs, |r| r.0),
        disk_chunks_per_s: median_of(&runs, |r| r.1),
        peak_rss_mib: median_of(&runs, |r| r.2),
    })
}

fn upload_name(connection: u64, file: u64) -> String {
    format!("conn{connection:02}-file{file:03}.bin")
}

/// Sends every file from 16 connections at once (each connection its own
/// client, its files one after another, each file's chunks in order) and
/// returns the wall time.
async fn load_receiver(
    url: &str,
    chunks: &ChunkSet,
    files_per_connection: u64,
) -> Result<Duration> {
    let clients = (0..RECEIVER_CONNECTIONS)
        .map(|_| reqwest::Client::builder().no_proxy().build())
        .collect::<Result<Vec<_>, _>>()
        .context("cannot build an HTTP client")?;
    let started = Instant::now();
    let uploads = clients.iter().enumerate().map(|(conn, client)| async move {
        for file in 0..files_per_connection {
            let name = upload_name(conn as u64, file);
            let upload_id = format!("bench-conn{conn:02}-file{file:03}");
            upload_file(client, url, &name, &upload_id, chunks).await?;
        }
        Ok::<_, anyhow::Error>(())
    });
    for result in futures::future::join_all(uploads).await {
        result?;
    }
    Ok(started.elapsed())
}

async fn upload_file(
    client: &reqwest::Client,
    url: &str,
    name: &str,
    upload_id: &str,
    chunks: &ChunkSet,
) -> Result<()> {
    let n_chunks = chunks.bodies.len();
    for (chunk_idx, body) in chunks.bodies.iter().enumerate() {
        let response = client
            .post(url)
            .bearer_auth(KEY)
            .header("X-File-Name", name)
            .header("X-Chunk-Index", chunk_idx)
            .header("X-Upload-Id", upload_id)
            .header("X-Chunk-Offset", chunk_idx as u64 * MIB)
            .header("X-Chunk-Sha256", &chunks.shas[chunk_idx])
            .header("X-File-Size", chunks.file_size)
            .header("X-Chunk-Count", n_chunks)
            .header("X-File-Sha256", &chunks.file_sha)
            .body(reqwest::Body::from(*body))
            .send()
            .await
            .with_context(|| format!("{name} chunk {chunk_idx}: request failed"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        ensure!(
            status.is_success(),
            "{name} chunk {chunk_idx}: HTTP {status}: {text}"
        );
        if chunk_idx + 1 == n_chunks {
            let reply: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{name}: last chunk's reply is not JSON: {text}"))?;
            ensure!(
                reply["complete"] == true,
                "{name}: not complete after its last chunk: {text}"
            );
        }
    }
    Ok(())
}

/// The least a receiver that acknowledges only durable chunks does: 16
/// threads, each writing the same number of 1 MiB chunks into its own file and
/// syncing each one. Returns chunks per second.
fn disk_baseline(run: &RunDir, chunks: &ChunkSet, files_per_connection: u64) -> Result<f64> {
    let dir = run.root.join("disk-baseline");
    std::fs::create_dir_all(&dir)?;
    rustix::fs::sync();
    let started = Instant::now();
    std::thread::scope(|scope| {
        let writers: Vec<_> = (0..RECEIVER_CONNECTIONS)
            .map(|writer| {
                let path = dir.join(format!("writer-{writer:02}"));
                scope.spawn(move || -> Result<()> {
                    let file = File::create(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut offset = 0;
                    for _ in 0..files_per_connection {
                        for body in &chunks.bodies {
                            file.write_all_at(body, offset)?;
                            file.sync_data()?;
                            offset += body.len() as u64;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        writers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| anyhow!("a disk writer panicked"))?)
    })?;
    let n_chunks = RECEIVER_CONNECTIONS * files_per_connection * chunks.bodies.len() as u64;
    Ok(n_chunks as f64 / started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------
// The large file shared by scenarios 1, 2 and 5

struct LargeFile {
    path: PathBuf,
    /// The name it gets in the spool and in the output directory.
    name: String,
    size: u64,
}

impl LargeFile {
    /// Writes `size` random bytes once, on the disk the runs use.
    fn create(dir: &Path, size: u64) -> Result<LargeFile> {
        let started = Instant::now();
        let path = dir.join("large.bin");
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut prng = Rng::new(1);
        let mut block = vec![0; MIB as usize];
        let mut written = 0;
        while written < size {
            let len = (size - written).min(MIB) as usize;
            prng.fill(&mut block[..len]);
            file.write_all_at(&block[..len], written)?;
            written += len as u64;
        }
        file.sync_all()?;
        eprintln!(
            "generated {} MiB of random data in {:.1} s",
            size >> 20,
            started.elapsed().as_secs_f64()
        );
        Ok(LargeFile {
            path,
            name: "large.bin".into(),
            size,
        })
    }

    /// Drops the file into the run's spool as recommended (in a staging folder
    /// on the same file system, then a rename) and returns when it was renamed.
    /// The staging copy is a hard link: nothing is copied, and the agent's
    /// deleting the spool's link leaves the original for the next run.
    fn drop_into_spool(&self, run: &RunDir) -> Result<Instant> {
        let staged = run.staging.join(&self.name);
        std::fs::hard_link(&self.path, &staged)
            .with_context(|| format!("cannot link {} into the staging folder", self.name))?;
        rustix::fs::sync();
        let dropped = Instant::now();
        std::fs::rename(&staged, run.spool.join(&self.name))
            .with_context(|| format!("cannot rename {} into the spool", self.name))?;
        Ok(dropped)
    }

    /// Drops the file and waits until it is complete in the output directory,
    /// which `receiver` writes; returns the time from the rename to then.
    fn drop_and_wait(&self, run: &RunDir, receiver: &mut Running) -> Result<Duration> {
        let dropped = self.drop_into_spool(run)?;
        let in_output = run.out.join(&self.name);
        let arrived = wait_until(
            &format!("{} in the output", self.name),
            Duration::from_millis(2),
            self.timeout(),
            || {
                receiver.ensure_alive()?;
                Ok(file_len(&in_output) == Some(self.size))
            },
        )?;
        Ok(arrived - dropped)
    }

    /// Generous: a minute plus the file at 1 MB/s.
    fn timeout(&self) -> Duration {
        Duration::from_secs(60 + self.size / 1_000_000)
    }
}

// ---------------------------------------------------------------------------
// Folders, configuration and processes

/// The folders of one run, removed when it ends.
struct RunDir {
    _temp: tempfile::TempDir,
    root: PathBuf,
    spool: PathBuf,
    staging: PathBuf,
    out: PathBuf,
    state: PathBuf,
    /// The daemon's config file, once written.
    config: PathBuf,
}

impl RunDir {
    fn create(settings: &Settings) -> Result<RunDir> {
        let temp = tempfile::Builder::new()
            .prefix("indexedcp-bench-run-")
            .tempdir_in(&settings.base_dir)
            .with_context(|| {
                format!(
                    "cannot create a temp dir in {}",
                    settings.base_dir.display()
                )
            })?;
        let root = temp.path().to_owned();
        let run = RunDir {
            spool: root.join("spool"),
            staging: root.join("staging"),
            out: root.join("out"),
            state: root.join("state"),
            config: root.join("indexedcp.toml"),
            root,
            _temp: temp,
        };
        for dir in [&run.spool, &run.staging, &run.out] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(run)
    }
}

/// Starts `indexedcp daemon` with an agent sending the run's spool to
/// 127.0.0.1:`target_port`, and with `server = Some((port, max_chunk_bytes))`
/// also a receiver writing into the run's output directory. Everything else
/// keeps its default (`settle`, `check_interval`, `chunk_size`, ...).
fn start_daemon(
    run: &RunDir,
    name: &str,
    target_port: u16,
    server: Option<(u16, Option<u64>)>,
) -> Result<Running> {
    let mut config = format!(
        "[daemon]\nstate_dir = {state:?}\nlog_format = \"text\"\n\n\
         [[target]]\nname = \"receiver\"\nurl = \"http://127.0.0.1:{target_port}/upload\"\napi_key = \"{KEY}\"\n\n\
         [[spool]]\npath = {spool:?}\ntarget = \"receiver\"\n",
        state = utf8(&run.state)?,
        spool = utf8(&run.spool)?,
    );
    if let Some((port, max_chunk_bytes)) = server {
        config.push_str(&format!(
            "\n[server]\nlisten = \"127.0.0.1:{port}\"\noutput_dir = {out:?}\napi_keys = [\"{KEY}\"]\n",
            out = utf8(&run.out)?,
        ));
        if let Some(bytes) = max_chunk_bytes {
            config.push_str(&format!("max_chunk_bytes = {bytes}\n"));
        }
    }
    std::fs::write(&run.config, config)
        .with_context(|| format!("cannot write {}", run.config.display()))?;
    Running::start(name, &run.root, &["daemon", "--config", utf8(&run.config)?])
}

/// Starts `indexedcp server` on a free port writing into the run's output
/// directory; returns it and its port.
fn start_receiver(run: &RunDir) -> Result<(Running, u16)> {
    let args = [
        "server",
        "--port",
        "0",
        "--output-dir",
        utf8(&run.out)?,
        "-k",
        KEY,
    ];
    let receiver = Running::start("receiver", &run.root, &args)?;
    let url = receiver.server_url()?;
    let port = url
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| anyhow!("no port in the receiver's address {url}"))?;
    Ok((receiver, port))
}

/// A running indexedcp process; killed and reaped when dropped.
struct Running {
    name: String,
    child: Child,
    stdout: PathBuf,
    log: PathBuf,
}

impl Running {
    /// Starts `indexedcp args` with its stdout and stderr in files in `dir`,
    /// and waits for the READY=1 it sends (sd_notify) once it watches its
    /// spools and serves.
    fn start(name: &str, dir: &Path, args: &[&str]) -> Result<Running> {
        let socket_path = dir.join(format!("{name}.notify"));
        let socket = UnixDatagram::bind(&socket_path)
            .with_context(|| format!("cannot bind {}", socket_path.display()))?;
        let stdout = dir.join(format!("{name}.stdout"));
        let log = dir.join(format!("{name}.log"));
        let child = indexedcp()
            .args(args)
            .env("NOTIFY_SOCKET", &socket_path)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {BIN}"))?;
        let mut running = Running {
            name: name.to_owned(),
            child,
            stdout,
            log,
        };
        running.wait_ready(&socket, Duration::from_secs(60))?;
        // Later STATUS= lines would queue up unread; with the socket gone the
        // process's notifications fail at once, which it ignores.
        drop(socket);
        let _ = std::fs::remove_file(&socket_path);
        Ok(running)
    }

    fn wait_ready(&mut self, socket: &UnixDatagram, timeout: Duration) -> Result<()> {
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let deadline = Instant::now() + timeout;
        let mut message = [0; 4096];
        loop {
            match socket.recv(&mut message) {
                Ok(len) => {
                    if String::from_utf8_lossy(&message[..len])
                        .lines()
                        .any(|line| line == "READY=1")
                    {
                        return Ok(());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("cannot read sd_notify messages"),
            }
            self.ensure_alive()?;
            ensure!(
                Instant::now() < deadline,
                "{} not ready after {timeout:?}; its log ends: {}",
                self.name,
                self.log_tail()
            );
        }
    }

    /// An error naming the exit status and the log's end once the process exited.
    fn ensure_alive(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited ({status}); its log ends: {}",
                self.name,
                self.log_tail()
            ),
        }
    }

    /// The receiver's URL from its "Server listening on URL" line.
    fn server_url(&self) -> Result<String> {
        let stdout = std::fs::read_to_string(&self.stdout)?;
        stdout
            .lines()
            .find_map(|line| line.strip_prefix("Server listening on "))
            .map(|url| url.trim().to_owned())
            .ok_or_else(|| anyhow!("{} did not print `Server listening on`", self.name))
    }

    /// The peak resident memory so far (VmHWM), in MiB.
    fn peak_rss_mib(&self) -> Result<f64> {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .ok_or_else(|| anyhow!("no VmHWM in /proc/{pid}/status"))
    }

    /// CPU time (user + system) the process has used so far.
    fn cpu_seconds(&self) -> Result<f64> {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces) in parentheses;
        // utime and stime are the 14th and 15th fields, in clock ticks.
        let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        let (Some(utime), Some(stime)) = (ticks(11), ticks(12)) else {
            bail!("cannot parse /proc/{pid}/stat");
        };
        let per_second = rustix::param::clock_ticks_per_second() as f64;
        Ok((utime + stime) / per_second)
    }

    /// Kills and reaps the process, then says on stderr how many warnings and
    /// errors it logged.
    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let kinds = warnings_by_kind(&log);
        if !kinds.is_empty() {
            let total: usize = kinds.iter().map(|(_, n)| n).sum();
            eprintln!("  {} logged {total} warning/error line(s):", self.name);
            for (kind, n) in kinds.iter().take(4) {
                eprintln!("    {n} x {}", shorten(kind, 200));
            }
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" / ")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The WARN and ERROR lines of a text-format log, grouped by level, module and
/// message (without the timestamp and the `key=value` fields), most frequent
/// first.
fn warnings_by_kind(log: &str) -> Vec<(String, usize)> {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for line in log.lines() {
        let Some(start) = line.find(" WARN ").or_else(|| line.find(" ERROR ")) else {
            continue;
        };
        let kind = line[start..]
            .split_whitespace()
            .take_while(|word| !word.contains('='))
            .collect::<Vec<_>>()
            .join(" ");
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    kinds.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    kinds
}

fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_owned()
    } else {
        text.chars().take(max_chars).chain("...".chars()).collect()
    }
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8; set INDEXEDCP_BENCH_DIR", path.display()))
}

fn program_available(program: &'static str) -> Result<(), String> {
    match Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => Ok(()),
        _ => Err(format!("{program} not found")),
    }
}

// ---------------------------------------------------------------------------
// Files and waiting

/// Writes `count` files of `size` random bytes named `<prefix><number>` into
/// `dir`; returns their names.
fn write_files(dir: &Path, prefix: &str, count: usize, size: usize) -> Result<Vec<String>> {
    let mut prng = Rng::new(3);
    let mut content = vec![0; size];
    (0..count)
        .map(|i| {
            let name = format!("{prefix}{i:06}");
            prng.fill(&mut content);
            std::fs::write(dir.join(&name), &content)
                .with_context(|| format!("cannot write {name} in {}", dir.display()))?;
            Ok(name)
        })
        .collect()
}

fn rename_all(from: &Path, to: &Path, names: &[String]) -> Result<()> {
    for name in names {
        std::fs::rename(from.join(name), to.join(name))
            .with_context(|| format!("cannot rename {name} into {}", to.display()))?;
    }
    Ok(())
}

/// Files waited for one by one, in order: each check resumes at the first
/// that had not arrived, so waiting for N files costs about N checks in all
/// (listing a folder of 100,000 files every few milliseconds would take the
/// CPU the daemon is being measured on).
struct Pending<'a> {
    names: &'a [String],
    next: usize,
}

impl<'a> Pending<'a> {
    fn new(names: &'a [String]) -> Pending<'a> {
        Pending { names, next: 0 }
    }

    /// Moves past the files for which `arrived` holds; true once all did.
    fn advance(&mut self, mut arrived: impl FnMut(&str) -> bool) -> bool {
        while self.names.get(self.next).is_some_and(|name| arrived(name)) {
            self.next += 1;
        }
        self.next == self.names.len()
    }
}

fn file_len(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}
