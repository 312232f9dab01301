//! Scenario 7, object storage: the large file from its drop into the spool
//! of an agent whose target is an `s3` bucket until the agent confirmed it,
//! and many small files the same way, against `s3s-fs` on 127.0.0.1 (objects
//! as plain files, so the sizes can be checked on disk). Baselines in the same
//! run, to the same server: `rclone copyto` of the same large file and
//! `rclone copy` of a folder holding the same small files, rclone configured
//! through environment variables only (provider Other, path-style).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::Settings;
use super::processes::{RunDir, Running, file_len, rename_all, utf8, write_files};
use super::scenarios::LargeFile;
use super::support::{free_port, wait_until};
use super::table::{Baseline, Named, mb_per_s, median, median_of};

const BUCKET: &str = "bench";
const ACCESS_KEY: &str = "AKIDBENCH";
const SECRET_KEY: &str = "bench-secret-key";
const SMALL_FILE_BYTES: usize = 4096;

/// How to get the programs, said when one is missing.
const S3S_FS_HINT: &str =
    "s3s-fs not found: cargo install s3s-fs --version 0.14.1 --locked --features binary";
const RCLONE_HINT: &str = "rclone not found: apt-get install -y rclone";

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `s3s-fs` serving the bucket from a folder of the run; killed when dropped.
struct S3sFs {
    child: Child,
    root: PathBuf,
    endpoint: String,
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3sFs {
    fn start(run: &RunDir) -> Result<S3sFs> {
        ensure!(installed("s3s-fs"), S3S_FS_HINT);
        let root = run.root.join("s3");
        std::fs::create_dir_all(root.join(BUCKET))?;
        let port = free_port();
        let log = std::fs::File::create(run.root.join("s3s-fs.log"))?;
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start s3s-fs")?;
        let server = S3sFs {
            child,
            root,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        wait_until(
            "s3s-fs listening",
            Duration::from_millis(20),
            Duration::from_secs(30),
            || Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
        )?;
        Ok(server)
    }

    /// Where the object `key` is, as a file.
    fn object(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }

    /// Starts an agent sending the run's spool to the bucket under `agent/`,
    /// every other setting at its default (part size, concurrency, ...).
    fn start_agent(&self, run: &RunDir) -> Result<Running> {
        let secret = run.root.join("s3.secret");
        std::fs::write(&secret, SECRET_KEY)?;
        let config = format!(
            "[daemon]\nstate_dir = {state:?}\nlog_format = \"text\"\n\n\
             [[target]]\nname = \"bucket\"\nkind = \"s3\"\nurl = \"s3://{BUCKET}/agent/\"\n\
             endpoint = {endpoint:?}\naccess_key_id = \"{ACCESS_KEY}\"\n\
             secret_access_key_file = {secret:?}\n\n\
             [[spool]]\npath = {spool:?}\ntarget = \"bucket\"\n",
            state = utf8(&run.state)?,
            endpoint = self.endpoint,
            secret = utf8(&secret)?,
            spool = utf8(&run.spool)?,
        );
        std::fs::write(&run.config, config)?;
        Running::start(
            "agent",
            &run.root,
            &["daemon", "--config", utf8(&run.config)?],
        )
    }

    /// `rclone ARGS` with the remote `bench:` pointing at this server, and
    /// the time it took.
    fn rclone(&self, args: &[&str]) -> Result<Duration> {
        let started = Instant::now();
        // A CA bundle in the environment (AWS_CA_BUNDLE) means nothing to a
        // plain http:// endpoint, but rclone 1.60 fails to set up its
        // transport with one.
        let output = Command::new("rclone")
            .args(args)
            .env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_CONFIG", "/dev/null")
            .env("RCLONE_CONFIG_BENCH_TYPE", "s3")
            .env("RCLONE_CONFIG_BENCH_PROVIDER", "Other")
            .env("RCLONE_CONFIG_BENCH_ENDPOINT", &self.endpoint)
            .env("RCLONE_CONFIG_BENCH_REGION", "us-east-1")
            .env("RCLONE_CONFIG_BENCH_ACCESS_KEY_ID", ACCESS_KEY)
            .env("RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE", "true")
            .env("RCLONE_CONFIG_BENCH_NO_CHECK_BUCKET", "true")
            .output()
            .context("cannot run rclone")?;
        let elapsed = started.elapsed();
        ensure!(
            output.status.success(),
            "rclone {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(elapsed)
    }
}

/// How many "file delivered" lines the agent has logged.
fn delivered(agent: &Running) -> usize {
    std::fs::read_to_string(&agent.log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains("file delivered"))
        .count()
}

/// Waits until the agent confirmed `count` files, and returns when it did.
fn wait_delivered(agent: &mut Running, count: usize, timeout: Duration) -> Result<Instant> {
    wait_until(
        &format!("{count} file(s) confirmed by the agent"),
        Duration::from_millis(5),
        timeout,
        || {
            agent.ensure_alive()?;
            Ok(delivered(agent) >= count)
        },
    )
}

pub(super) struct LargeToBucket {
    pub(super) mb_per_s: f64,
    pub(super) rclone: Baseline,
    pub(super) peak_rss_mib: f64,
}

pub(super) fn large_to_bucket(settings: &Settings, large: &LargeFile) -> Result<LargeToBucket> {
    let rclone = installed("rclone");
    let runs = settings.repeat("7. large file into a bucket", || {
        let run = RunDir::create(settings)?;
        let s3 = S3sFs::start(&run)?;
        let mut agent = s3.start_agent(&run)?;
        let dropped = large.drop_into_spool(&run)?;
        let confirmed = wait_delivered(&mut agent, 1, large.timeout())?;
        let elapsed = confirmed - dropped;
        let peak_rss = agent.peak_rss_mib()?;
        agent.stop();
        let stored = file_len(&s3.object(&format!("agent/{}", large.name)));
        ensure!(
            stored == Some(large.size),
            "the bucket holds {stored:?} bytes of the agent's object, not {}",
            large.size
        );
        eprintln!(
            "  agent: {:.1} MB/s in {:.2} s, peak RSS {peak_rss:.1} MiB",
            mb_per_s(large.size, elapsed),
            elapsed.as_secs_f64()
        );
        let rclone_speed = if rclone {
            let target = format!("bench:{BUCKET}/rclone/{}", large.name);
            large.warm()?;
            let elapsed = s3.rclone(&["copyto", utf8(&large.path)?, &target])?;
            let stored = file_len(&s3.object(&format!("rclone/{}", large.name)));
            ensure!(
                stored == Some(large.size),
                "rclone left {stored:?} bytes in the bucket, not {}",
                large.size
            );
            let speed = mb_per_s(large.size, elapsed);
            eprintln!(
                "  rclone copyto: {speed:.1} MB/s in {:.2} s",
                elapsed.as_secs_f64()
            );
            Some(speed)
        } else {
            None
        };
        Ok((mb_per_s(large.size, elapsed), rclone_speed, peak_rss))
    })?;
    let rclone = if rclone {
        Ok(Named {
            label: "rclone copyto",
            value: median(runs.iter().filter_map(|r| r.1).collect()),
        })
    } else {
        Err(RCLONE_HINT.to_owned())
    };
    Ok(LargeToBucket {
        mb_per_s: median_of(&runs, |r| r.0),
        rclone,
        peak_rss_mib: median_of(&runs, |r| r.2),
    })
}

pub(super) struct SmallToBucket {
    pub(super) files_per_s: f64,
    pub(super) rclone: Baseline,
}

pub(super) fn small_to_bucket(settings: &Settings) -> Result<SmallToBucket> {
    let count = settings.s3_files;
    let rclone = installed("rclone");
    let runs = settings.repeat("7. small files into a bucket", || {
        let run = RunDir::create(settings)?;
        let names = write_files(&run.staging, "small-", count, SMALL_FILE_BYTES)?;
        // The same files for rclone, which the agent's deletions leave alone.
        let copies = run.root.join("rclone-source");
        std::fs::create_dir_all(&copies)?;
        for name in &names {
            std::fs::hard_link(run.staging.join(name), copies.join(name))?;
        }
        let s3 = S3sFs::start(&run)?;
        let mut agent = s3.start_agent(&run)?;
        rustix::fs::sync();
        let dropped = Instant::now();
        rename_all(&run.staging, &run.spool, &names)?;
        let timeout = Duration::from_secs(120) + Duration::from_millis(100) * count as u32;
        let confirmed = wait_delivered(&mut agent, count, timeout)?;
        let files_per_s = count as f64 / (confirmed - dropped).as_secs_f64();
        agent.stop();
        check_all_stored(&s3, "agent", &names)?;
        eprintln!("  agent: {files_per_s:.0} files/s");
        let rclone_speed = if rclone {
            let elapsed =
                s3.rclone(&["copy", utf8(&copies)?, &format!("bench:{BUCKET}/rclone/")])?;
            check_all_stored(&s3, "rclone", &names)?;
            let speed = count as f64 / elapsed.as_secs_f64();
            eprintln!("  rclone copy: {speed:.0} files/s");
            Some(speed)
        } else {
            None
        };
        Ok((files_per_s, rclone_speed))
    })?;
    let rclone = if rclone {
        Ok(Named {
            label: "rclone copy",
            value: median(runs.iter().filter_map(|r| r.1).collect()),
        })
    } else {
        Err(RCLONE_HINT.to_owned())
    };
    Ok(SmallToBucket {
        files_per_s: median_of(&runs, |r| r.0),
        rclone,
    })
}

fn check_all_stored(s3: &S3sFs, prefix: &str, names: &[String]) -> Result<()> {
    for name in names {
        let path = s3.object(&format!("{prefix}/{name}"));
        if file_len(&path) != Some(SMALL_FILE_BYTES as u64) {
            bail!(
                "{} is not in the bucket with its {SMALL_FILE_BYTES} bytes",
                path.display()
            );
        }
    }
    Ok(())
}
