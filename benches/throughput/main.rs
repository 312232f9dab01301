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
//! 1. Large files end to end, as deployed: one file of random bytes (a quarter
//!    of INDEXEDCP_BENCH_MIB, then all of it) renamed into the spool of an
//!    agent whose receiver is a second process, until it is complete under its
//!    final name. Baseline: curl sending the same file to the same receiver as
//!    one v1 request (`-T`, `Expect:` empty). Each run syncs the disk before
//!    each timed step and alternates which of the two goes first. Alongside,
//!    for the large size: the time from the drop until the receiver holds the
//!    first chunk (its staging file, polled from outside), the bytes the agent
//!    wrote (`/proc/PID/io` write_bytes) per byte delivered, also for 1,000
//!    files of 4 KiB renamed in at once and (without a target) for 200 renamed
//!    in one at a time, each after the one before was delivered, and the
//!    buffer's size before, at its peak and after.
//! 2. Ingest alone: the large file into the buffer of an agent whose receiver
//!    is down, until the source leaves the spool (it is deleted only after the
//!    buffer's commit). Baseline: `dd if=FILE of=COPY bs=1M conv=fdatasync`
//!    on the same disk, the two alternating, each after a `sync`.
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
//! 7. Object storage: the large file from its drop until the agent confirmed
//!    it in an `s3s-fs` bucket on 127.0.0.1, with the agent's peak RSS, and
//!    many 4 KiB files the same way. Baselines: `rclone copyto` of the same
//!    file and `rclone copy` of the same files to the same server.
//! 8. TLS: the large file from an agent daemon to `indexedcp server` over
//!    HTTPS (`--tls-cert`, `ca_file`). Baseline: the same two processes over
//!    plain HTTP, in the same run.
//! 9. tus: the large file sent by tus-js-client (Node) to the receiver's tus
//!    endpoint, with the receiver's peak RSS. Baseline: the same client, chunk
//!    size and file to @tus/server with @tus/file-store.
//! 10. A fleet: one receiver and INDEXEDCP_BENCH_FLEET_AGENTS (100) agent
//!     daemons, each its own process, sending INDEXEDCP_BENCH_FLEET_FILES (20)
//!     files each at once; the receiver's peak RSS, which must not grow with
//!     the number of clients, and files per second.
//!
//! Sizes come from the environment, so the suite can be smoke-tested quickly:
//! INDEXEDCP_BENCH_MIB (1024), INDEXEDCP_BENCH_SMALL_FILES (10000),
//! INDEXEDCP_BENCH_QUEUED_FILES (100000), INDEXEDCP_BENCH_LATENCY_DROPS (200),
//! INDEXEDCP_BENCH_S3_FILES (1000), INDEXEDCP_BENCH_FLEET_AGENTS (100),
//! INDEXEDCP_BENCH_FLEET_FILES (20), INDEXEDCP_BENCH_ONLY (scenario numbers, e.g. "1,4"; default all) and
//! INDEXEDCP_BENCH_DIR (where the temp folders go; default the system temp
//! dir). The daemons run with their default settings except for paths, ports
//! and keys, and log at their default level into files that are summarised on
//! stderr when a process stops.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};

// The harness the integration tests use. The bench needs only part of it
// (starting the binary, free ports, the generator, the blocking wait); the
// async polling and the tree listing serve the tests alone, hence the allow.
#[path = "../../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

mod fleet;
mod large;
mod processes;
mod receiver_alone;
mod s3;
mod scenarios;
mod table;
mod tls;
mod tus;

use large::{ONE_AT_A_TIME_FILES, SMALL_FILES, large_end_to_end, small_write_amplification};
use receiver_alone::receiver_alone;
use scenarios::{LargeFile, ingest_alone, latency, queued_files, small_files, two_processes};
use table::{Row, Table, format_mib};

const KEY: &str = "bench-key-0123456789";
const MIB: u64 = 1 << 20;

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
    let large = if [1, 2, 5, 7, 8, 9].iter().any(|&n| settings.wants(n)) {
        Some(LargeFile::create(
            suite.path(),
            "large.bin",
            settings.large_mib << 20,
        )?)
    } else {
        None
    };

    let mut table = Table::default();
    let mut memory = Vec::new();
    let mib = settings.large_mib;
    if let (true, Some(large)) = (settings.wants(1), &large) {
        scenario_1(&settings, suite.path(), large, &mut table, &mut memory)?;
    }
    if let (true, Some(large)) = (settings.wants(2), &large) {
        let name = format!("2. ingest alone: hash + SQLite ({mib} MiB)");
        match ingest_alone(&settings, large) {
            Ok(result) => table.speed(&name, result.mb_per_s, "MB/s", &result.dd, 0.7),
            Err(e) => table.push(Row::error(&name, "ratio >= 0.7", &e)),
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
    if let (true, Some(large)) = (settings.wants(7), &large) {
        let name = format!("7. S3: large file drop to confirmed, s3s-fs ({mib} MiB)");
        let rss = "7. peak RSS, agent, during 7 (s3 target)";
        match s3::large_to_bucket(&settings, large) {
            Ok(result) => {
                table.speed(&name, result.mb_per_s, "MB/s", &result.rclone, 0.8);
                table.push(Row::at_most(rss, result.peak_rss_mib, "MiB", 64.0, 1));
            }
            Err(e) => {
                table.push(Row::error(&name, "ratio >= 0.8", &e));
                table.push(Row::error(rss, "<= 64 MiB", &e));
            }
        }
        let name = format!(
            "7. S3: many small files into the bucket ({} x 4 KiB)",
            settings.s3_files
        );
        match s3::small_to_bucket(&settings) {
            Ok(result) => {
                let mut row = Row::report(&name, format!("{:.0} files/s", result.files_per_s));
                match &result.rclone {
                    Ok(base) => {
                        row.baseline = format!("{}: {:.0} files/s", base.label, base.value);
                        row.ratio = format!("{:.2}", result.files_per_s / base.value);
                    }
                    Err(reason) => row.baseline = format!("n/a ({reason})"),
                }
                table.push(row);
            }
            Err(e) => table.push(Row::error(&name, "-", &e)),
        }
    }
    if let (true, Some(large)) = (settings.wants(9), &large) {
        let name = format!("9. tus: tus-js-client to the receiver ({mib} MiB)");
        let rss = "9. peak RSS, receiver, during 9 (tus)";
        match tus::tus_js_client(&settings, large) {
            Ok(result) => {
                table.speed(&name, result.mb_per_s, "MB/s", &Ok(result.tus_server), 1.0);
                table.push(Row::at_most(rss, result.peak_rss_mib, "MiB", 64.0, 1));
            }
            Err(e) => {
                table.push(Row::error(&name, "ratio >= 1.0", &e));
                table.push(Row::error(rss, "<= 64 MiB", &e));
            }
        }
    }

    if let (true, Some(large)) = (settings.wants(8), &large) {
        let name = format!("8. TLS: large file agent -> server over HTTPS ({mib} MiB)");
        match tls::tls_vs_plain(&settings, large) {
            Ok(result) => table.speed(
                &name,
                result.tls_mb_per_s,
                "MB/s",
                &Ok(result.baseline()),
                0.8,
            ),
            Err(e) => table.push(Row::error(&name, "ratio >= 0.8", &e)),
        }
    }

    if settings.wants(10) {
        let agents = settings.fleet_agents;
        let name = format!("10. peak RSS, receiver, {agents} agent processes at once");
        match fleet::fleet(&settings) {
            Ok(result) => {
                table.push(Row::at_most(
                    &name,
                    result.receiver_peak_rss_mib,
                    "MiB",
                    64.0,
                    1,
                ));
                table.push(Row::report(
                    &format!(
                        "10. {} agents, {} files end to end",
                        result.agents, result.files
                    ),
                    format!("{:.0} files/s", result.files_per_s),
                ));
            }
            Err(e) => table.push(Row::error(&name, "<= 64 MiB", &e)),
        }
    }

    let took = started.elapsed();
    eprintln!("suite finished in {:.1} min", took.as_secs_f64() / 60.0);
    table.print();
    println!();
    println!("Suite run time: {:.1} min.", took.as_secs_f64() / 60.0);
    Ok(())
}

/// Scenario 1's rows: a quarter of the large file and the large file, each
/// against curl; for the large one the first chunk's delay, the write
/// amplification and the buffer's size; the write amplification of small files.
fn scenario_1(
    settings: &Settings,
    dir: &std::path::Path,
    large: &LargeFile,
    table: &mut Table,
    memory: &mut Vec<Row>,
) -> Result<()> {
    let quarter = LargeFile::create(dir, "quarter.bin", large.size / 4)?;
    for file in [&quarter, large] {
        let mib = file.size >> 20;
        let name = format!("1. large file, agent and receiver as two processes ({mib} MiB)");
        let result = match large_end_to_end(settings, file) {
            Ok(result) => result,
            Err(e) => {
                table.push(Row::error(&name, "ratio >= 0.5", &e));
                continue;
            }
        };
        table.speed(&name, result.mb_per_s, "MB/s", &result.curl, 0.5);
        if file.size != large.size {
            continue;
        }
        table.push(Row::at_most(
            &format!("1. first chunk at the receiver after the drop ({mib} MiB)"),
            result.ttfb_ms,
            "ms",
            300.0,
            0,
        ));
        table.push(Row::at_most(
            &format!("1. agent's bytes written per byte delivered ({mib} MiB)"),
            result.write_amplification,
            "x",
            1.3,
            2,
        ));
        let buffer = result.buffer;
        let mut row = Row::report(
            &format!("1. buffer file before / peak / after delivery ({mib} MiB)"),
            format!(
                "{} / {} / {}",
                format_mib(buffer.before as f64 / MIB as f64),
                format_mib(buffer.peak as f64 / MIB as f64),
                format_mib(buffer.after as f64 / MIB as f64)
            ),
        );
        row.target = "after - before <= 10 % of peak - before".into();
        row.result = table::pass_fail(buffer.returned());
        table.push(row);
        memory.push(Row::report(
            &format!("5. peak RSS, agent, during 1 ({mib} MiB)"),
            format_mib(result.agent_rss_mib),
        ));
    }
    let name = format!("1. agent's bytes written per byte delivered ({SMALL_FILES} x 4 KiB)");
    match small_write_amplification(settings, SMALL_FILES, false) {
        Ok(amplification) => table.push(Row::at_most(&name, amplification, "x", 2.0, 2)),
        Err(e) => table.push(Row::error(&name, "<= 2 x", &e)),
    }
    let name = format!(
        "1. agent's bytes written per byte delivered ({ONE_AT_A_TIME_FILES} x 4 KiB, one at a time)"
    );
    match small_write_amplification(settings, ONE_AT_A_TIME_FILES, true) {
        Ok(amplification) => table.push(Row::report(&name, format!("{amplification:.2} x"))),
        Err(e) => table.push(Row::error(&name, "-", &e)),
    }
    std::fs::remove_file(&quarter.path)?;
    Ok(())
}

// Settings and the machine

struct Settings {
    runs: usize,
    large_mib: u64,
    small_files: usize,
    queued_files: usize,
    latency_drops: usize,
    s3_files: usize,
    fleet_agents: usize,
    fleet_files: usize,
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
            s3_files: env_number("INDEXEDCP_BENCH_S3_FILES", 1000)?,
            fleet_agents: env_number("INDEXEDCP_BENCH_FLEET_AGENTS", 100)?,
            fleet_files: env_number("INDEXEDCP_BENCH_FLEET_FILES", 20)?,
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
                .filter(|n| (1..=10).contains(n))
                .ok_or_else(|| {
                    anyhow!("INDEXEDCP_BENCH_ONLY={list}: expected scenario numbers 1 to 10, separated by commas")
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
