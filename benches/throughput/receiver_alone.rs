//! Scenario 6: the receiver alone under 16 connections sending 1 MiB chunks of
//! the resumable protocol, against 16 threads writing and syncing the same.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use sha2::{Digest, Sha256};

use super::processes::{RunDir, file_len, start_receiver};
use super::support::Rng;
use super::table::median_of;
use super::{KEY, MIB, Settings};

const RECEIVER_CONNECTIONS: u64 = 16;
const CHUNKS_PER_FILE: u64 = 64;

pub(super) struct ReceiverAlone {
    pub(super) chunks_per_s: f64,
    pub(super) disk_chunks_per_s: f64,
    pub(super) peak_rss_mib: f64,
}

/// One file's chunks, computed before the clock starts. Every file of the
/// scenario has the same content under its own upload id and name.
pub(super) struct ChunkSet {
    /// 'static so that a request body borrows them instead of copying 1 MiB;
    /// leaked once per suite.
    pub(super) bodies: Vec<&'static [u8]>,
    pub(super) shas: Vec<String>,
    pub(super) file_sha: String,
    pub(super) file_size: u64,
}

impl ChunkSet {
    pub(super) fn create(n_chunks: u64) -> ChunkSet {
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

pub(super) fn receiver_alone(settings: &Settings) -> Result<ReceiverAlone> {
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

pub(super) fn upload_name(connection: u64, file: u64) -> String {
    format!("conn{connection:02}-file{file:03}.bin")
}

/// Sends every file from 16 connections at once (each connection its own
/// client, its files one after another, each file's chunks in order) and
/// returns the wall time.
pub(super) async fn load_receiver(
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

pub(super) async fn upload_file(
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
pub(super) fn disk_baseline(
    run: &RunDir,
    chunks: &ChunkSet,
    files_per_connection: u64,
) -> Result<f64> {
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
