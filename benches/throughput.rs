//! Throughput and memory figures for the README, measured on the real binary.
//!
//! `cargo bench --bench throughput` prints, for each scenario, the bytes moved,
//! the wall time, MB/s and the peak resident memory (VmHWM) of the indexedcp
//! process. Sizes can be changed with INDEXEDCP_BENCH_MIB (default 1024).
//!
//! 1. receiver: one file uploaded with the resumable protocol in 64 MiB chunks,
//!    each streamed (the receiver must not hold a chunk in memory);
//! 2. agent + receiver in one daemon: files dropped into a spool until they are
//!    all in the output directory (buffer, upload, verify, rename).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const BIN: &str = env!("CARGO_BIN_EXE_indexedcp");
const KEY: &str = "bench-key-0123456789";

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Deterministic bytes for chunk `idx`: cheap to generate twice (hash, then send).
fn chunk_bytes(idx: u64, len: usize) -> Vec<u8> {
    let mut x = idx.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

// The caller owns the child and kills and reaps it when its scenario ends.
#[allow(clippy::zombie_processes)]
fn start(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("INDEXEDCP_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start indexedcp");
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if let Some(url) = line.trim().strip_prefix("Server listening on ") {
            return (child, url.to_owned());
        }
    }
}

fn report(name: &str, bytes: u64, elapsed: Duration, rss: f64) {
    let mib = bytes as f64 / (1 << 20) as f64;
    println!(
        "{name:<44} {mib:>8.0} MiB in {:>6.2} s = {:>7.1} MB/s, peak RSS {rss:>6.1} MiB",
        elapsed.as_secs_f64(),
        bytes as f64 / 1e6 / elapsed.as_secs_f64()
    );
}

async fn receiver_bench(dir: &Path, total_mib: u64) {
    let chunk = 64usize << 20;
    let n_chunks = (total_mib << 20).div_ceil(chunk as u64);
    let size = n_chunks * chunk as u64;
    // The whole file's hash first (the client knows it before sending).
    // A chunk is 64 pieces of 1 MiB, each generated from its own seed, so the
    // client can produce any piece cheaply while streaming.
    let piece = |i: u64, p: u64| chunk_bytes(i * 64 + p, 1 << 20);
    let mut whole = Sha256::new();
    let mut chunk_sha = Vec::new();
    for i in 0..n_chunks {
        let mut hasher = Sha256::new();
        for p in 0..64 {
            let data = piece(i, p);
            whole.update(&data);
            hasher.update(&data);
        }
        chunk_sha.push(hex::encode(hasher.finalize()));
    }
    let file_sha = hex::encode(whole.finalize());
    let out = dir.join("receiver-out");
    let (mut child, url) = start(&[
        "server",
        "--port",
        "0",
        "--output-dir",
        out.to_str().unwrap(),
        "-k",
        KEY,
    ]);
    let client = reqwest::Client::new();
    let started = Instant::now();
    for i in 0..n_chunks {
        // Stream the body in 1 MiB pieces so the client holds little either.
        let pieces = (0..64u64).map(move |p| Ok::<_, std::io::Error>(piece(i, p)));
        let body = reqwest::Body::wrap_stream(futures::stream::iter(pieces));
        let response = client
            .post(format!("{url}/upload"))
            .bearer_auth(KEY)
            .header("X-File-Name", "big.bin")
            .header("X-Chunk-Index", i.to_string())
            .header("X-Upload-Id", "bench-upload-000000001")
            .header("X-Chunk-Offset", (i * chunk as u64).to_string())
            .header("X-Chunk-Sha256", &chunk_sha[i as usize])
            .header("X-File-Size", size.to_string())
            .header("X-Chunk-Count", n_chunks.to_string())
            .header("X-File-Sha256", &file_sha)
            .header("Content-Length", chunk.to_string())
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{}",
            response.text().await.unwrap()
        );
    }
    let elapsed = started.elapsed();
    let rss = peak_rss_mib(child.id());
    assert_eq!(std::fs::metadata(out.join("big.bin")).unwrap().len(), size);
    report("receiver, resumable, 64 MiB chunks", size, elapsed, rss);
    let _ = child.kill();
    let _ = child.wait();
}

fn agent_bench(dir: &Path, total_mib: u64, files: u64, chunk: &str) {
    let root = dir.join(format!("agent-{files}-{chunk}"));
    let (spool, out, staging) = (root.join("spool"), root.join("out"), root.join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = root.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstate_dir = {:?}\ncheck_interval = \"1s\"\nmax_buffer_bytes = \"64GiB\"\n\n\
             [[target]]\nname = \"local\"\nurl = \"http://127.0.0.1:{port}/upload\"\napi_key = \"{KEY}\"\nchunk_size = \"{chunk}\"\n\n\
             [[spool]]\npath = {:?}\ntarget = \"local\"\nsettle = \"200ms\"\n\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\noutput_dir = {:?}\napi_keys = [\"{KEY}\"]\n",
            root.join("state").display().to_string(),
            spool.display().to_string(),
            out.display().to_string()
        ),
    )
    .unwrap();
    let (mut child, _url) = start(&["daemon", "--config", config.to_str().unwrap()]);
    let per_file = (total_mib << 20) / files;
    // Write the files outside the spool first, so only the daemon is timed.
    for f in 0..files {
        std::fs::write(
            staging.join(format!("f{f}")),
            chunk_bytes(f, per_file as usize),
        )
        .unwrap();
    }
    let started = Instant::now();
    for f in 0..files {
        std::fs::rename(staging.join(format!("f{f}")), spool.join(format!("f{f}"))).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let done = (0..files).all(|f| {
            std::fs::metadata(out.join(format!("f{f}"))).is_ok_and(|m| m.len() == per_file)
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "agent bench did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let rss = peak_rss_mib(child.id());
    report(
        &format!("agent+receiver, {files} file(s), {chunk} chunks"),
        per_file * files,
        elapsed,
        rss,
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing useful.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let total_mib: u64 = std::env::var("INDEXEDCP_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir_in(
        std::env::var("INDEXEDCP_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(receiver_bench(dir.path(), total_mib));
    agent_bench(dir.path(), total_mib, 1, "1MiB");
    agent_bench(dir.path(), total_mib / 4, 1000, "1MiB");
}
