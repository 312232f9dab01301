//! Scenarios 2 to 5: ingest alone (dd baseline), many small files, the
//! latency of one small file, and the memory rows measured alongside; plus the
//! large file they share with scenario 1 (`large`) and curl's upload.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use super::processes::{
    Pending, RunDir, Running, file_len, program_available, rename_all, start_daemon,
    start_receiver, write_files,
};
use super::support::{Rng, free_port, indexedcp, wait_until};
use super::table::{Baseline, Named, mb_per_s, median, median_of, percentile};
use super::{KEY, MIB, Settings};

const SMALL_FILE_BYTES: usize = 4096;
const QUEUED_FILE_BYTES: usize = 1024;

/// Sends `file` as one v1 request (chunk 0, no resumable headers) and returns
/// curl's wall time.
pub(super) fn curl_upload(url: &str, file: &Path, name: &str) -> Result<Duration> {
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

pub(super) struct IngestAlone {
    pub(super) mb_per_s: f64,
    pub(super) dd: Baseline,
}

/// The agent buffering the file (receiver down) until the source leaves the
/// spool, against `dd ... conv=fdatasync` copying it on the same disk: the
/// least a buffer that holds a durable copy before the source goes must do.
/// The two alternate which goes first, each after a `sync`.
pub(super) fn ingest_alone(settings: &Settings, large: &LargeFile) -> Result<IngestAlone> {
    let dd = program_available("dd");
    // The file's hash, to check what the buffer recorded (not timed).
    let expected_sha = program_available("sha256sum")
        .ok()
        .map(|()| sha256sum_of(&large.path).map(|(sha, _)| sha))
        .transpose()?;
    let mut run_no = 0;
    let runs = settings.repeat("2. ingest alone", || {
        run_no += 1;
        let run = RunDir::create(settings)?;
        let dd_first = run_no % 2 == 0;
        let mut baseline = None;
        if dd_first && dd.is_ok() {
            baseline = Some(dd_step(&run, large)?);
        }
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
        if let Some(sha) = &expected_sha {
            ensure!(
                *sha == buffered_sha,
                "the buffer recorded sha256 {buffered_sha}, sha256sum says {sha}"
            );
        }
        let speed = mb_per_s(large.size, elapsed);
        eprintln!(
            "  ingest: {speed:.1} MB/s in {:.2} s",
            elapsed.as_secs_f64()
        );
        if !dd_first && dd.is_ok() {
            baseline = Some(dd_step(&run, large)?);
        }
        Ok((speed, baseline))
    })?;
    let dd = dd.map(|()| Named {
        label: "dd bs=1M conv=fdatasync",
        value: median(runs.iter().filter_map(|r| r.1).collect()),
    });
    Ok(IngestAlone {
        mb_per_s: median_of(&runs, |r| r.0),
        dd,
    })
}

/// `dd if=FILE of=COPY bs=1M conv=fdatasync` into the run's folder, after a
/// `sync`; MB/s. The copy is removed again.
fn dd_step(run: &RunDir, large: &LargeFile) -> Result<f64> {
    let copy = run.root.join("dd-copy.bin");
    large.warm()?;
    rustix::fs::sync();
    let started = Instant::now();
    let output = Command::new("dd")
        .arg(format!("if={}", large.path.display()))
        .arg(format!("of={}", copy.display()))
        .args(["bs=1M", "conv=fdatasync"])
        .output()
        .context("cannot run dd")?;
    let elapsed = started.elapsed();
    ensure!(
        output.status.success(),
        "dd failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    ensure!(
        file_len(&copy) == Some(large.size),
        "dd left {:?} bytes, not {}",
        file_len(&copy),
        large.size
    );
    std::fs::remove_file(&copy)?;
    let speed = mb_per_s(large.size, elapsed);
    eprintln!("  dd: {speed:.1} MB/s");
    Ok(speed)
}

/// Checks with `indexedcp status --json` that the buffer holds exactly one
/// file of `size` bytes, and returns the SHA-256 it recorded.
pub(super) fn buffered_sha256(run: &RunDir, size: u64) -> Result<String> {
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

pub(super) fn sha256sum_of(path: &Path) -> Result<(String, Duration)> {
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

pub(super) struct SmallFiles {
    pub(super) files_per_s: f64,
    pub(super) peak_rss_mib: f64,
}

pub(super) fn small_files(settings: &Settings) -> Result<SmallFiles> {
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

pub(super) struct Latency {
    pub(super) median_ms: f64,
    pub(super) p99_ms: f64,
}

pub(super) fn latency(settings: &Settings) -> Result<Latency> {
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

pub(super) struct TwoProcesses {
    pub(super) agent_rss_mib: f64,
    pub(super) receiver_rss_mib: f64,
}

/// Scenario 1 with the agent and the receiver in two processes.
pub(super) fn two_processes(settings: &Settings, large: &LargeFile) -> Result<TwoProcesses> {
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
pub(super) fn queued_files(settings: &Settings) -> Result<f64> {
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

pub(super) struct LargeFile {
    pub(super) path: PathBuf,
    /// The name it gets in the spool and in the output directory.
    pub(super) name: String,
    pub(super) size: u64,
}

impl LargeFile {
    /// Writes `size` random bytes once as `name`, on the disk the runs use.
    pub(super) fn create(dir: &Path, name: &str, size: u64) -> Result<LargeFile> {
        let started = Instant::now();
        let path = dir.join(name);
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
            name: name.into(),
            size,
        })
    }

    /// Reads the whole file once, so that its pages are in the page cache, as
    /// those of a file its producer has just written are. Called before every
    /// timed step that reads it (the agent's drop and each baseline), outside
    /// the timing: this machine pages out memory left cold, and a step that
    /// found the file paged out read it from the disk (1 GiB: 268-307 instead
    /// of 350-369 MB/s for the agent by hand), whichever of the two it was.
    pub(super) fn warm(&self) -> Result<()> {
        let mut file = File::open(&self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        std::io::copy(&mut file, &mut std::io::sink())?;
        Ok(())
    }

    /// Drops the file into the run's spool as recommended (in a staging folder
    /// on the same file system, then a rename) and returns when it was renamed.
    /// The staging copy is a hard link: nothing is copied, and the agent's
    /// deleting the spool's link leaves the original for the next run.
    pub(super) fn drop_into_spool(&self, run: &RunDir) -> Result<Instant> {
        let staged = run.staging.join(&self.name);
        self.warm()?;
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
    pub(super) fn drop_and_wait(&self, run: &RunDir, receiver: &mut Running) -> Result<Duration> {
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
    pub(super) fn timeout(&self) -> Duration {
        Duration::from_secs(60 + self.size / 1_000_000)
    }
}
