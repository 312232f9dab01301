//! Scenario 6: full disks, made with small tmpfs mounts (root only; skipped with
//! a message otherwise).
//!
//! - The agent's buffer on an 8 MiB tmpfs while the spool holds about three
//!   times that and the receiver is down: ingest must pause on ENOSPC with the
//!   sources left in the spool, untouched, and delivery must complete once the
//!   receiver is back and uploads free space in the buffer.
//! - The receiver's output directory (and its state directory inside) on a
//!   tmpfs that a filler file nearly fills: the agent must be told 507 (or 503),
//!   nothing may appear partial under a final name, and delivery must complete
//!   once the filler is deleted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::manifest::{Manifest, PartialWatch};
use super::proxy::{FaultProxy, Profile};
use super::*;
use crate::fixtures::drop_file;
use crate::support::eventually;

/// A tmpfs mounted for the length of a test; unmounted on drop.
pub(crate) struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "8m") on `path`, or says why it cannot.
    pub(crate) fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid());
        if uid != 0 {
            return Err(format!("not running as root (uid {uid})"));
        }
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let output = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }

    /// Bytes still available to an unprivileged writer.
    fn available(&self) -> u64 {
        rustix::fs::statvfs(&self.path).map_or(0, |s| s.f_bavail * s.f_frsize)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Bytes of the spool files that are no longer identical to their source.
fn spool_damage(fx: &Fixture, files: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    files_below(&fx.spool)
        .into_iter()
        // A file gone between the listing and the read was buffered and
        // disposed of meanwhile: not damage (delivery is checked later).
        .filter(|rel| {
            std::fs::read(fx.spool.join(rel))
                .ok()
                .is_some_and(|bytes| Some(&bytes) != files.get(rel))
        })
        .collect()
}

/// The first half of the buffer scenario: an 8 MiB tmpfs as the agent's
/// state_dir, about 24 MiB in the spool and the receiver down, until ingest
/// pauses on the full disk. Returns `None` (after printing why) when no tmpfs
/// can be mounted.
struct FullBuffer {
    // Dropped in this order: the agent, then the mount, then the directories.
    agent: AgentProc,
    _tmpfs: Tmpfs,
    fx: Fixture,
    files: BTreeMap<String, Vec<u8>>,
    port: u16,
}

/// Says why a scenario is skipped where no tmpfs can be mounted (not root);
/// under `CI=true`, which runs as root, that is a failure instead.
fn cannot_mount(what: &str, for_what: &str, why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what}: cannot mount a tmpfs for {for_what} under CI=true: {why}"
    );
    println!("{what}: SKIPPED: cannot mount a tmpfs for {for_what}: {why}");
}

async fn fill_the_buffer_disk(what: &str) -> Option<FullBuffer> {
    let fx = Fixture::new();
    let tmpfs = match Tmpfs::mount(&fx.state, "8m") {
        Ok(t) => t,
        Err(why) => {
            cannot_mount(what, "the buffer", &why);
            return None;
        }
    };
    // The receiver is down at first, so nothing leaves the buffer.
    let port = free_port();
    let config = agent_config_with(
        &fx,
        &format!("http://127.0.0.1:{port}/upload"),
        "",
        "chunk_size = \"256KiB\"\ninitial_retry_delay = \"50ms\"\nmax_retry_delay = \"500ms\"",
        "",
    );
    // About 24 MiB for an 8 MiB buffer disk: twelve files of 1.5 MiB and some
    // small ones.
    let mut files = BTreeMap::new();
    for i in 0..12u64 {
        files.insert(format!("big-{i}.bin"), pseudo_random(3 << 19, 600 + i));
    }
    for i in 0..20u64 {
        files.insert(
            format!("small-{i}.txt"),
            pseudo_random(i as usize * 1000, 700 + i),
        );
    }
    let mut agent = AgentProc::start(&fx, &config);
    for (rel, data) in &files {
        drop_file(&fx.staging, &fx.spool, rel, data);
    }
    // Ingest fills the disk, then pauses with files still in the spool.
    eventually(
        Duration::from_secs(60),
        "the agent to report a full buffer disk",
        async || (fx.log_count("agent", "disk is full") > 0).then_some(()),
    )
    .await;
    let waiting = files_below(&fx.spool).len();
    let buffered = buffer_counts(&fx.buffer_db()).map_or(0, |c| c.0);
    assert!(waiting > 0, "every file was buffered on an 8 MiB disk?");
    assert!(agent.alive(), "the agent died on a full disk");
    let damaged = spool_damage(&fx, &files);
    assert!(damaged.is_empty(), "spool files changed: {damaged:?}");
    println!(
        "{what}: ingest paused with {waiting} of {} files waiting in the spool, intact, {buffered} buffered, {} bytes free on the buffer disk",
        files.len(),
        tmpfs.available()
    );
    Some(FullBuffer {
        agent,
        _tmpfs: tmpfs,
        fx,
        files,
        port,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_6_a_full_buffer_disk_pauses_ingest_and_keeps_the_sources() {
    let started = Instant::now();
    let what = "scenario 6 (buffer disk full, pause)";
    let Some(mut full) = fill_the_buffer_disk(what).await else {
        return;
    };
    // Buffered so far plus the spool: nothing lost. The buffer stays sound.
    let manifest = Manifest::from_files(&full.files);
    let in_spool = files_below(&full.fx.spool).len() as u64;
    let buffered = buffer_counts(&full.fx.buffer_db()).map_or(0, |c| c.0);
    let integrity = super::manifest::integrity_check(&full.fx.buffer_db());
    println!(
        "{what}: {} files: {in_spool} in the spool + {buffered} buffered, lost {}; buffer integrity {integrity:?}; {:.1}s",
        manifest.len(),
        manifest.len() as u64 - in_spool - buffered,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(in_spool + buffered, manifest.len() as u64);
    assert_eq!(integrity.as_deref(), Ok("ok"));
    full.agent.kill();
}

/// Found by this scenario. Once ingest has filled the buffer's disk, the
/// uploader cannot record anything (`mark_uploaded`, `record_failure` and
/// `confirm` all need a few pages of WAL, and a checkpoint needs the database
/// to grow), so no file is ever confirmed, no space is freed and delivery never
/// completes; meanwhile every buffered file is retried in a tight loop (the
/// failed attempt cannot schedule its next one), re-sending its first chunk.
/// Fixed: ingest keeps a reserve of free space, a failed attempt cools down for
/// a check_interval, the WAL is truncated after each ingest and confirmation,
/// and chunk bytes live in their own table, so that recording a retry or an
/// acknowledgement no longer rewrites a 1 MiB row into the WAL.
#[tokio::test(flavor = "multi_thread")]
async fn scenario_6_delivery_completes_after_the_buffer_disk_filled() {
    let started = Instant::now();
    let what = "scenario 6 (buffer disk full, delivery)";
    let Some(mut full) = fill_the_buffer_disk(what).await else {
        return;
    };
    let manifest = Manifest::from_files(&full.files);
    // The receiver comes up; uploads should free space and the rest follow.
    let _receiver = ReceiverProc::start(&full.fx, full.port, &[]).await;
    let drained = try_wait_until_drained(&full.fx, &manifest, Duration::from_secs(60)).await;
    let report = manifest.check(&full.fx.out, &[&full.fx.buffer_db(), &full.fx.uploads_db()]);
    let spins = full.fx.log_count("agent", "upload attempt failed");
    println!(
        "{what}: {} files ({} bytes) through an 8 MiB buffer: {} delivered ({}); {spins} failed upload attempts logged; {} after the receiver started; total {:.1}s",
        full.files.len(),
        full.files.values().map(Vec::len).sum::<usize>(),
        report.delivered,
        report.figure(),
        match &drained {
            Ok(d) => format!("drained in {:.1}s", d.as_secs_f64()),
            Err(why) => why.clone(),
        },
        started.elapsed().as_secs_f64()
    );
    drained.unwrap();
    report.assert_clean(what);
    full.agent.kill();
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_6_a_full_receiver_disk_is_refused_cleanly_and_recovers() {
    let started = Instant::now();
    let fx = Fixture::new();
    let tmpfs = match Tmpfs::mount(&fx.out, "16m") {
        Ok(t) => t,
        Err(why) => {
            cannot_mount("scenario 6 (receiver disk full)", "the output", &why);
            return;
        }
    };
    // A filler leaves about 3 MiB; the agent brings 12 MiB.
    let filler = fx.out.join("filler.bin");
    let room = 3u64 << 20;
    let filler_len = tmpfs.available().saturating_sub(room);
    std::fs::write(&filler, vec![0xAAu8; filler_len as usize]).unwrap();
    let mut receiver = ReceiverProc::start(&fx, free_port(), &[]).await;
    let upstream = format!("127.0.0.1:{}", receiver.port).parse().unwrap();
    let proxy = FaultProxy::start(upstream, 6, Profile::pass_through()).await;
    let config = agent_config_with(
        &fx,
        &proxy.upload_url(),
        "",
        "chunk_size = \"256KiB\"\ninitial_retry_delay = \"50ms\"\nmax_retry_delay = \"500ms\"",
        "",
    );
    let mut files = BTreeMap::new();
    for i in 0..12u64 {
        files.insert(format!("big-{i}.bin"), pseudo_random(1 << 20, 800 + i));
    }
    for i in 0..10u64 {
        files.insert(
            format!("small-{i}.txt"),
            pseudo_random(i as usize * 700, 900 + i),
        );
    }
    let manifest = Manifest::from_files(&files).ignoring("filler.bin");
    let watch = PartialWatch::start(&fx.out, &manifest);
    let _agent = AgentProc::start(&fx, &config);
    for (rel, data) in &files {
        drop_file(&fx.staging, &fx.spool, rel, data);
    }
    // The receiver runs out of space and says so.
    let refused = eventually(
        Duration::from_secs(60),
        "the receiver to refuse chunks with 507 or 503",
        async || {
            let s = proxy.snapshot();
            let n = s.status(507) + s.status(503);
            (n >= 5).then_some(n)
        },
    )
    .await;
    let stuck = manifest.missing(&fx.out).len();
    assert!(stuck > 0, "everything fit on the full disk?");
    assert!(receiver.alive(), "the receiver died on a full disk");
    let before = proxy.snapshot();
    println!(
        "scenario 6 (receiver disk full): {refused} chunks refused with 507/503, {stuck} files waiting; {before}"
    );
    // Space comes back.
    std::fs::remove_file(&filler).unwrap();
    let drain = wait_until_drained(&fx, &manifest, Duration::from_secs(120)).await;
    let (polls, partial) = watch.stop();
    let report = manifest.check(&fx.out, &[&fx.buffer_db(), &fx.uploads_db()]);
    let stats = proxy.snapshot();
    println!(
        "scenario 6 (receiver disk full): {} files ({} bytes) through a full receiver disk: {}; {} partial files seen in {polls} polls; {} replies 507 and {} replies 503 in all; drained in {:.1}s after space came back, total {:.1}s",
        files.len(),
        files.values().map(Vec::len).sum::<usize>(),
        report.figure(),
        partial.len(),
        stats.status(507),
        stats.status(503),
        drain.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        partial.is_empty(),
        "partial files under a final name: {partial:#?}"
    );
    report.assert_clean("scenario 6 (receiver disk full)");
    let others: u64 = stats
        .upstream
        .iter()
        .filter(|((_, s), _)| ![200, 404, 503, 507].contains(s))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        others, 0,
        "the receiver answered with unexpected statuses on a full disk: {stats}"
    );
    receiver.kill();
    drop(tmpfs);
}
