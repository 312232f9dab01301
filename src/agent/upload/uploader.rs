//! The daemon's uploader loop: wakes on a timer, after an ingest and when the
//! earliest retry is due, and keeps up to `concurrency` attempts per target in
//! flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::store::{Store, StoreError};

use super::batch::{BATCH_FILES, plan_attempts, run_attempt};
use super::events::UploadObserver;
use super::target::TargetRuntime;

/// What the uploader loop reads on every round, replaceable on reload: the
/// targets (an upload in flight keeps the target it started with), the check
/// interval, and a heartbeat the supervisor reads for the systemd watchdog.
pub struct UploaderShared {
    targets: std::sync::RwLock<Vec<Arc<TargetRuntime>>>,
    check_interval_ms: std::sync::atomic::AtomicU64,
    heartbeat_ms: std::sync::atomic::AtomicI64,
}

impl UploaderShared {
    pub fn new(targets: Vec<Arc<TargetRuntime>>, check_interval: Duration) -> UploaderShared {
        UploaderShared {
            targets: std::sync::RwLock::new(targets),
            check_interval_ms: std::sync::atomic::AtomicU64::new(check_interval.as_millis() as u64),
            heartbeat_ms: std::sync::atomic::AtomicI64::new(crate::clock::now_ms()),
        }
    }

    pub fn targets(&self) -> Vec<Arc<TargetRuntime>> {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_targets(&self, targets: Vec<Arc<TargetRuntime>>) {
        *self.targets.write().unwrap_or_else(|p| p.into_inner()) = targets;
    }

    pub fn check_interval(&self) -> Duration {
        Duration::from_millis(self.check_interval_ms.load(Ordering::Relaxed))
    }

    pub fn set_check_interval(&self, interval: Duration) {
        self.check_interval_ms
            .store(interval.as_millis() as u64, Ordering::Relaxed);
    }

    /// When the uploader loop last went round (ms since the epoch).
    pub fn last_heartbeat(&self) -> i64 {
        self.heartbeat_ms.load(Ordering::Relaxed)
    }
}

/// Drains the buffer for the targets in `shared` until `shutdown`: wakes every
/// `check_interval`, when `wake` is notified (after an ingest), and when the
/// earliest retry is due; keeps up to `concurrency` files per target in flight.
/// On shutdown, chunks in flight get `grace` to finish and are then abandoned
/// (safely: an unacknowledged chunk is simply sent again).
pub async fn run_uploader(
    store: Store,
    shared: Arc<UploaderShared>,
    wake: Arc<Notify>,
    observer: Arc<dyn UploadObserver>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    // Each attempt's task returns whether it failed; its target and files
    // are kept here by task id, because a task that panics returns nothing
    // and its files must still be released.
    let mut in_flight: JoinSet<bool> = JoinSet::new();
    let mut attempt_files: HashMap<tokio::task::Id, (String, Vec<i64>)> = HashMap::new();
    // The attempts in flight per target, each with the ids of its files.
    let mut busy: HashMap<String, Vec<Vec<i64>>> = HashMap::new();
    let mut cooling: HashMap<i64, (String, std::time::Instant)> = HashMap::new();
    loop {
        crate::failpoint::hit(crate::failpoint::UPLOADER_LOOP);
        shared
            .heartbeat_ms
            .store(crate::clock::now_ms(), Ordering::Relaxed);
        let check_interval = shared.check_interval();
        let mut earliest: Option<i64> = None;
        for target in &shared.targets() {
            let name = target.config.name.clone();
            let attempts = busy.entry(name.clone()).or_default();
            let room = target.config.concurrency.saturating_sub(attempts.len());
            let mut taken: Vec<i64> = attempts.iter().flatten().copied().collect();
            taken.extend(
                cooling
                    .iter()
                    .filter(|(_, (t, _))| *t == name)
                    .map(|(id, _)| *id),
            );
            let s = store.clone();
            let n = name.clone();
            // With batches, one slot may take many small files.
            let batch_limit = target.delivery.batches().map_or(1, |b| b.max_files());
            let wanted = room.saturating_mul(batch_limit.clamp(1, BATCH_FILES));
            // Files still being buffered go to a target that takes them
            // (or may: the first such file's attempt finds out).
            let buffering = target.delivery.streams() != Some(false);
            let found = tokio::task::spawn_blocking(move || {
                if room == 0 {
                    // A finished upload wakes the loop.
                    return Ok((Vec::new(), None));
                }
                let due = s.due_files(&n, crate::clock::now_ms(), &taken, wanted, buffering)?;
                // With every slot filled, a finished upload wakes the loop;
                // otherwise it sleeps until the next file is due.
                let next = if due.len() < wanted {
                    s.next_due(&n)?
                } else {
                    None
                };
                Ok::<_, StoreError>((due, next))
            })
            .await;
            let (due, next) = match found {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot read the buffer; retrying");
                    (Vec::new(), Some(crate::clock::now_ms() + 1000))
                }
                Err(e) => {
                    tracing::error!(error = %e, "buffer query task failed");
                    (Vec::new(), None)
                }
            };
            if let Some(next) = next {
                earliest = Some(earliest.map_or(next, |e: i64| e.min(next)));
            }
            for attempt in plan_attempts(target, due, room) {
                let ids = attempt.ids();
                busy.entry(name.clone()).or_default().push(ids.clone());
                let (store, target, observer) = (store.clone(), target.clone(), observer.clone());
                let task = in_flight.spawn(async move {
                    crate::failpoint::hit(crate::failpoint::UPLOAD_ATTEMPT);
                    let mut failed = false;
                    for (file, outcome) in run_attempt(&store, &target, attempt, observer.as_ref()).await {
                        if let Err((error, _)) = outcome {
                            tracing::error!(file = %file.remote_name, %error, "upload attempt failed; retrying after check_interval");
                            failed = true;
                        }
                    }
                    failed
                });
                attempt_files.insert(task.id(), (name.clone(), ids));
            }
        }
        let now = crate::clock::now_ms();
        let until_due = earliest
            .filter(|t| *t > now)
            .map(|t| Duration::from_millis((t - now) as u64))
            .unwrap_or(check_interval);
        let sleep = until_due.min(check_interval).max(Duration::from_millis(10));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            Some(done) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                finish(done, &mut attempt_files, &mut busy, &mut cooling, check_interval);
            }
        }
        // Collect every other finished task without waiting.
        while let Some(done) = in_flight.try_join_next_with_id() {
            finish(
                done,
                &mut attempt_files,
                &mut busy,
                &mut cooling,
                check_interval,
            );
        }
        // Files whose attempt failed outside the retry schedule (the store
        // could not record it, e.g. a full disk) wait a check_interval.
        let now = std::time::Instant::now();
        cooling.retain(|_, (_, until)| *until > now);
    }
    if !in_flight.is_empty() {
        let n = in_flight.len();
        let finished = tokio::time::timeout(grace, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                files = n,
                ?grace,
                "uploads still in flight after the grace period; abandoning them (they resume at the next start)"
            );
            in_flight.abort_all();
        }
    }
}

/// Books a finished attempt: its files are free again, or cooling down when
/// the attempt failed without being recorded. An attempt that panicked (a
/// bug) is logged and its files cool down too, so they are tried again after
/// a check_interval instead of staying busy until a restart.
fn finish(
    done: Result<(tokio::task::Id, bool), tokio::task::JoinError>,
    attempt_files: &mut HashMap<tokio::task::Id, (String, Vec<i64>)>,
    busy: &mut HashMap<String, Vec<Vec<i64>>>,
    cooling: &mut HashMap<i64, (String, std::time::Instant)>,
    check_interval: Duration,
) {
    let (id, failed) = match done {
        Ok((id, failed)) => (id, failed),
        Err(e) => {
            if let Some((name, ids)) = attempt_files.get(&e.id()).filter(|_| e.is_panic()) {
                tracing::error!(target = %name, file_ids = ?ids, error = %e, "upload attempt panicked; its files are tried again after check_interval");
            }
            (e.id(), true)
        }
    };
    let Some((name, ids)) = attempt_files.remove(&id) else {
        return;
    };
    let attempts = busy.entry(name.clone()).or_default();
    if let Some(at) = attempts.iter().position(|a| *a == ids) {
        attempts.swap_remove(at);
    }
    if failed {
        let until = std::time::Instant::now() + check_interval;
        for id in ids {
            cooling.insert(id, (name.clone(), until));
        }
    }
}
