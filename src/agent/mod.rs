//! The agent role: spool watchers feed complete files to one ingest worker,
//! which buffers them in the store and wakes the uploader; a housekeeping timer
//! resumes a paused ingest and forgets old confirmed files.
//!
//! This module only wires the parts together (`spool`, `ingest`, `store`,
//! `upload`); each owns its own logic. Ingest runs one file at a time on a
//! blocking thread, so memory stays at one chunk for ingest plus one chunk per
//! file in flight, whatever the file sizes or the queue length.
//!
//! The watcher offers each file once; a file whose ingest failed for any
//! reason is offered again on its target's retry schedule (`Backoff`), and a
//! reload that raises `max_buffer_bytes` or adds or changes a target rescans
//! the spools, so that the files refused under the old settings go too.

pub mod ingest;
pub mod spool;
pub mod store;
pub mod upload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, OnBufferCorrupt, SpoolConfig, TargetConfig};
use ingest::{IngestError, IngestOutcome};
use spool::{Candidate, SpoolHandle};
use store::{CorruptionFlag, Store, StoreError};
use upload::{Backoff, NoObserver, TargetRuntime, UploaderShared};

/// How long confirmed files stay listed in the buffer (with their server name).
pub(crate) const CONFIRMED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Candidates queued between the watchers and the ingest worker.
const CANDIDATE_QUEUE: usize = 1024;

/// At most this many files, or about this many bytes, are buffered in one
/// transaction when they arrive together: one sync covers them all, each
/// commit writes the record pages it touched once for all of them (1,000
/// files of 4 KiB in batches of 256 wrote 4 % more than in one), and the
/// uploader does not wait long for the first of them.
const INGEST_BATCH_FILES: usize = 1024;
const INGEST_BATCH_BYTES: u64 = 16 << 20;

/// Why the agent could not start, or stopped: once started it fails only when
/// one of its loops died (see `Agent::run`); a reload that cannot be applied
/// is logged instead.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory cannot be created: the file system refuses it.
    #[error(
        "cannot create the state directory {path}: {source}; create it or set daemon.state_dir"
    )]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The buffer database cannot be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A spool folder cannot be watched (missing, unreadable, no watches left).
    #[error("spool {path}: {source}")]
    Spool {
        path: PathBuf,
        // Boxed because a spool error (a notify or glob error and its paths)
        // is large, and every result of the agent's start would carry its size.
        #[source]
        source: Box<spool::SpoolError>,
    },
    /// A target's settings cannot make an HTTP client (its URL, TLS or key
    /// file): the configuration has to change.
    #[error("target {name}: {source}")]
    Target {
        name: String,
        #[source]
        source: upload::UploadError,
    },
    /// One of the agent's loops (ingest, uploader, a spool watcher) ended
    /// while the agent was running: a bug. The agent stops so that the
    /// service manager restarts the daemon, which resumes from the buffer.
    #[error(
        "the agent's {task} stopped unexpectedly ({reason}); stopping so that the daemon is restarted"
    )]
    LoopDied { task: String, reason: String },
    /// A statement met damage in the buffer while the agent ran, and
    /// `daemon.on_buffer_corrupt` is `exit`. The message names the file and
    /// says to run `indexedcp doctor`.
    #[error("{message}")]
    BufferCorrupt { message: String },
}

/// A spool being watched, with the token that stops just this watcher.
struct RunningSpool {
    config: SpoolConfig,
    handle: SpoolHandle,
    token: CancellationToken,
}

/// A spool file whose ingest failed: which attempt failed last, and when it
/// is offered again (`None` while that offer is on its way, since
/// `reoffered`).
struct IngestRetry {
    attempts: u64,
    due: Option<tokio::time::Instant>,
    reoffered: tokio::time::Instant,
}

/// How long a file offered again may go without an outcome before it is
/// forgotten: the watcher offers nothing for a file gone meanwhile, and
/// a file that comes back starts its schedule afresh.
const RETRY_FORGET_AFTER: Duration = Duration::from_secs(3600);

/// A spool file: the spool root as configured and the path relative to it.
type SpoolFile = (PathBuf, String);

/// A started agent: watchers running, the rest started by [`Agent::run`].
pub(crate) struct Agent {
    store: Store,
    spools: Vec<RunningSpool>,
    shared: Arc<UploaderShared>,
    tx: mpsc::Sender<Candidate>,
    candidates: mpsc::Receiver<Candidate>,
    /// The spool watchers; each ends with `Err` (naming its spool and why)
    /// when it stopped without being asked to.
    tasks: JoinSet<Result<(), AgentError>>,
    wake: Arc<Notify>,
    ingest_heartbeat: Arc<AtomicI64>,
    max_buffer_bytes: u64,
    grace: Duration,
    shutdown: CancellationToken,
    /// Spool files whose ingest failed, offered again on the spool's
    /// target's retry schedule: the watcher offers a file once, so without
    /// this a failure that passes (too many open files, a busy buffer) would
    /// leave the file in the spool until a restart.
    retries: HashMap<SpoolFile, IngestRetry>,
    /// What to do once the buffer is found damaged (`daemon.on_buffer_corrupt`).
    on_corrupt: OnBufferCorrupt,
    /// The damage seen in the buffer, if any; set by the store's listener.
    corruption: CorruptionFlag,
    /// Woken when the store meets damage.
    corruption_seen: Arc<Notify>,
    /// Ingest stopped for good because the buffer is damaged: new files
    /// stay in the spool untouched.
    ingest_stopped: bool,
}

/// What the supervisor can read about a running agent (for sd_notify).
#[derive(Clone)]
pub(crate) struct AgentProbe {
    pub(crate) store: Store,
    pub(crate) shared: Arc<UploaderShared>,
    ingest_heartbeat: Arc<AtomicI64>,
    /// Damage seen in the buffer, for sd_notify and the metrics.
    pub(crate) corruption: CorruptionFlag,
}

impl AgentProbe {
    /// Whether the ingest loop and the uploader loop both went round lately.
    /// Each goes round at least every check_interval when idle; the margin
    /// covers a slow round (a large buffer to query, a busy disk). The ingest
    /// loop also beats while it waits for a batch being buffered, however
    /// long a big file takes, so only a loop that is stuck elsewhere (or
    /// gone) counts as dead.
    pub(crate) fn loops_alive(&self) -> bool {
        let stale = (self.shared.check_interval() * 3 + Duration::from_secs(30)).as_millis() as i64;
        let now = crate::clock::now_ms();
        now - self.shared.last_heartbeat() < stale
            && now - self.ingest_heartbeat.load(Ordering::Relaxed) < stale
    }
}

impl Agent {
    /// Opens the buffer and starts a watcher per spool (each scans at once).
    pub(crate) async fn start(
        config: &Config,
        shutdown: CancellationToken,
    ) -> Result<Agent, AgentError> {
        let state_dir = config.daemon.state_dir.clone();
        let store = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&state_dir).map_err(|source| AgentError::StateDir {
                path: state_dir.clone(),
                source,
            })?;
            let path = state_dir.join("buffer.db");
            let store = Store::open(&path).inspect_err(|e| {
                if e.is_corrupt() {
                    store::write_notice(&path, &e.to_string());
                }
            })?;
            let started = std::time::Instant::now();
            let checked = store.quick_check();
            tracing::info!(
                buffer = %path.display(),
                millis = started.elapsed().as_millis() as u64,
                ok = checked.is_ok(),
                "buffer checked (quick_check)"
            );
            // Large files whose streaming-in a stop interrupted: their
            // sources are still in the spools and are buffered again (under
            // a new upload id; a receiver expires what it got of the old).
            if checked.is_ok() {
                match store.forget_unfinished() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(files = n, "removed files whose buffering was interrupted; they are buffered again from their spools"),
                    Err(e) => tracing::warn!(error = %e, "could not remove files whose buffering was interrupted"),
                }
            }
            Ok::<_, AgentError>((store, checked))
        })
        .await
        .map_err(|e| AgentError::StateDir {
            path: config.daemon.state_dir.clone(),
            source: std::io::Error::other(e),
        })??;
        let (store, checked) = store;
        let corruption = CorruptionFlag::default();
        match checked {
            Ok(()) => store::clear_notice(store.path()),
            Err(e) if e.is_corrupt() => {
                store::write_notice(store.path(), &e.to_string());
                if config.daemon.on_buffer_corrupt == OnBufferCorrupt::Exit {
                    tracing::error!(error = %e, "the buffer is damaged; not starting (daemon.on_buffer_corrupt = \"exit\"); new files wait in the spool");
                    return Err(e.into());
                }
                corruption.set(&e.to_string());
            }
            Err(e) => return Err(e.into()),
        }
        let corruption_seen = Arc::new(Notify::new());
        {
            let (flag, seen, path) = (
                corruption.clone(),
                corruption_seen.clone(),
                store.path().to_owned(),
            );
            store::on_corruption(move |detail| {
                flag.set(&store::corrupt_message(&path, detail));
                seen.notify_one();
            });
        }

        let targets = build_targets(&config.targets, &[])?;
        let (tx, candidates) = mpsc::channel(CANDIDATE_QUEUE);
        let mut agent = Agent {
            store,
            spools: Vec::new(),
            shared: Arc::new(UploaderShared::new(targets, config.daemon.check_interval)),
            tx,
            candidates,
            tasks: JoinSet::new(),
            wake: Arc::new(Notify::new()),
            ingest_heartbeat: Arc::new(AtomicI64::new(crate::clock::now_ms())),
            max_buffer_bytes: config.daemon.max_buffer_bytes,
            grace: config.daemon.shutdown_grace,
            shutdown,
            retries: HashMap::new(),
            on_corrupt: config.daemon.on_buffer_corrupt,
            ingest_stopped: corruption.get().is_some(),
            corruption,
            corruption_seen,
        };
        for spool_cfg in &config.spools {
            agent.start_spool(spool_cfg.clone())?;
        }
        Ok(agent)
    }

    pub(crate) fn probe(&self) -> AgentProbe {
        AgentProbe {
            store: self.store.clone(),
            shared: self.shared.clone(),
            ingest_heartbeat: self.ingest_heartbeat.clone(),
            corruption: self.corruption.clone(),
        }
    }

    fn start_spool(&mut self, spool_cfg: SpoolConfig) -> Result<(), AgentError> {
        let token = self.shutdown.child_token();
        let (handle, task) = spool::spawn(spool_cfg.clone(), self.tx.clone(), token.clone())
            .map_err(|source| AgentError::Spool {
                path: spool_cfg.path.clone(),
                source: Box::new(source),
            })?;
        let (path, stopped) = (spool_cfg.path.clone(), token.clone());
        self.tasks.spawn(async move {
            let reason = match task.await {
                Err(e) if e.is_panic() => panic_message(e),
                _ if stopped.is_cancelled() => return Ok(()),
                Err(e) => e.to_string(),
                Ok(()) => "it returned".to_owned(),
            };
            Err(AgentError::LoopDied {
                task: format!("watcher of spool {}", path.display()),
                reason,
            })
        });
        tracing::info!(spool = %spool_cfg.path.display(), target = %spool_cfg.target, "watching spool");
        self.spools.push(RunningSpool {
            config: spool_cfg,
            handle,
            token,
        });
        Ok(())
    }

    /// Applies a reloaded configuration: spools added start (and scan), spools
    /// removed stop (their buffered files still upload), changed spools restart;
    /// target settings take effect for the next request. Returns what changed.
    fn apply(&mut self, config: &Config) -> Vec<String> {
        let mut changes = Vec::new();
        let mut changed_targets: Vec<String> = Vec::new();
        let old_targets = self.shared.targets();
        match build_targets(&config.targets, &old_targets) {
            Ok(targets) => {
                for t in &targets {
                    match old_targets.iter().find(|o| o.config.name == t.config.name) {
                        None => changes.push(format!("target {} added", t.config.name)),
                        Some(o) if !Arc::ptr_eq(o, t) => {
                            changes.push(format!("target {} changed", t.config.name));
                            changed_targets.push(t.config.name.clone());
                            o.retire();
                        }
                        Some(_) => {}
                    }
                }
                for o in &old_targets {
                    if !targets.iter().any(|t| t.config.name == o.config.name) {
                        changes.push(format!(
                            "target {} removed (its buffered files wait until it returns)",
                            o.config.name
                        ));
                    }
                }
                self.shared.set_targets(targets);
            }
            Err(e) => tracing::error!(error = %e, "reload: targets kept unchanged"),
        }
        if self.shared.check_interval() != config.daemon.check_interval {
            changes.push(format!("check_interval {:?}", config.daemon.check_interval));
            self.shared.set_check_interval(config.daemon.check_interval);
        }
        // Files refused as larger than the buffer, or left for a target
        // that was missing or wrong, are offered again under the new settings.
        let mut offer_again = changes
            .iter()
            .any(|c| c.ends_with(" added") || c.ends_with(" changed"));
        if self.max_buffer_bytes != config.daemon.max_buffer_bytes {
            changes.push(format!(
                "max_buffer_bytes {}",
                config.daemon.max_buffer_bytes
            ));
            offer_again |= config.daemon.max_buffer_bytes > self.max_buffer_bytes;
            self.max_buffer_bytes = config.daemon.max_buffer_bytes;
        }
        self.grace = config.daemon.shutdown_grace;
        if !changed_targets.is_empty() {
            // Files waiting out a delay earned under the old settings (a wrong
            // key, say) are tried again at once.
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || {
                for name in changed_targets {
                    if let Err(e) = store.reschedule_now(&name) {
                        tracing::warn!(target = %name, error = %e, "cannot reschedule the target's files");
                    }
                }
            });
        }

        let mut kept = Vec::new();
        for running in std::mem::take(&mut self.spools) {
            match config.spools.iter().find(|s| s.path == running.config.path) {
                Some(new) if *new == running.config => kept.push(running),
                other => {
                    running.token.cancel();
                    if other.is_none() {
                        changes.push(format!("spool {} removed", running.config.path.display()));
                    }
                }
            }
        }
        self.spools = kept;
        if offer_again {
            // Restarted and new spools scan when they start.
            self.spools.iter().for_each(|s| s.handle.rescan());
        }
        for spool_cfg in &config.spools {
            if self.spools.iter().any(|s| s.config.path == spool_cfg.path) {
                continue;
            }
            let verb = if changes
                .iter()
                .any(|c| c == &format!("spool {} removed", spool_cfg.path.display()))
            {
                "added"
            } else {
                "started"
            };
            match self.start_spool(spool_cfg.clone()) {
                Ok(()) => changes.push(format!("spool {} {verb}", spool_cfg.path.display())),
                Err(e) => tracing::error!(error = %e, "reload: cannot watch the spool"),
            }
        }
        self.wake.notify_one();
        changes
    }

    /// Runs ingest, upload and housekeeping until shutdown, applying every
    /// configuration that arrives on `reloads`.
    ///
    /// Nothing it meets in the world stops it: a failed ingest leaves the
    /// files in the spool for the next scan, a failed upload is retried on
    /// its schedule, a full buffer pauses ingest, and a reload that cannot be
    /// applied keeps the settings in force. Each of these is logged where it
    /// happens. It returns an error only when one of its loops died (a bug):
    /// a daemon that goes on without its uploader or a spool watcher would
    /// look healthy while delivering nothing, so it stops the rest and lets
    /// the service manager restart it.
    pub(crate) async fn run(
        mut self,
        mut reloads: tokio::sync::watch::Receiver<Arc<Config>>,
    ) -> Result<(), AgentError> {
        let mut uploader = tokio::spawn(upload::run_uploader(
            self.store.clone(),
            self.shared.clone(),
            self.wake.clone(),
            Arc::new(NoObserver),
            self.shutdown.clone(),
            self.grace,
        ));
        reloads.borrow_and_update();
        let mut paused = false;
        let mut housekeeping = tokio::time::interval(self.shared.check_interval());
        let mut last_forget = std::time::Instant::now() - Duration::from_secs(3600);
        let mut uploader_done = false;
        let mut died = None;
        if let Some(damage) = self.corruption.get() {
            tracing::error!(error = %damage, "ingest stopped (daemon.on_buffer_corrupt = \"stop-ingest\"): new files wait in the spool; files in the buffer are still sent");
        }
        loop {
            self.beat();
            let next_retry = self.next_retry();
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                () = self.corruption_seen.notified(), if !self.ingest_stopped => {
                    if let Some(e) = self.buffer_damaged() {
                        died = Some(e);
                        break;
                    }
                }
                ended = &mut uploader => {
                    uploader_done = true;
                    // On shutdown the uploader may end before this loop sees
                    // the cancellation: that is the normal end.
                    if self.shutdown.is_cancelled() && ended.is_ok() {
                        break;
                    }
                    died = Some(AgentError::LoopDied {
                        task: "uploader loop".to_owned(),
                        reason: match ended {
                            Err(e) if e.is_panic() => panic_message(e),
                            Err(e) => e.to_string(),
                            Ok(()) => "it returned".to_owned(),
                        },
                    });
                    break;
                }
                // A watcher stopped by a reload ends with Ok and is just
                // collected here.
                Some(Ok(Err(e))) = self.tasks.join_next() => {
                    died = Some(e);
                    break;
                }
                changed = reloads.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let config = reloads.borrow_and_update().clone();
                    let changes = self.apply(&config);
                    housekeeping = tokio::time::interval(self.shared.check_interval());
                    if changes.is_empty() {
                        tracing::info!("reload: agent settings unchanged");
                    } else {
                        tracing::info!(changes = %changes.join("; "), "reload: agent updated");
                    }
                }
                () = sleep_until_some(next_retry) => self.offer_due_retries(),
                _ = housekeeping.tick() => {
                    if paused && !self.ingest_stopped && self.buffer_has_room().await {
                        paused = false;
                        tracing::info!("buffer below max_buffer_bytes again; resuming ingest");
                        self.spools.iter().for_each(|s| s.handle.rescan());
                    }
                    if last_forget.elapsed() >= Duration::from_secs(3600) {
                        last_forget = std::time::Instant::now();
                        self.forget_old_confirmed().await;
                    }
                }
                Some(candidate) = self.candidates.recv() => {
                    if paused || self.ingest_stopped {
                        continue; // It stays in the spool; the rescan on resume offers it again.
                    }
                    // Files that arrived together are buffered together: one
                    // transaction, one sync.
                    let mut batch = vec![candidate];
                    let mut bytes = batch[0].identity.size;
                    while batch.len() < INGEST_BATCH_FILES && bytes < INGEST_BATCH_BYTES {
                        let Ok(next) = self.candidates.try_recv() else { break };
                        bytes += next.identity.size;
                        batch.push(next);
                    }
                    crate::failpoint::hit(crate::failpoint::INGEST_LOOP);
                    paused = self.ingest_beating(batch).await;
                }
            }
        }
        if let Some(e) = &died {
            if !matches!(e, AgentError::BufferCorrupt { .. }) {
                tracing::error!(error = %e, "agent loop died; stopping the agent");
            }
            self.shutdown.cancel();
        }
        // Dropping the receiver stops watchers blocked on a full queue.
        drop(self.candidates);
        if !uploader_done {
            let _ = uploader.await;
        }
        while self.tasks.join_next().await.is_some() {}
        tracing::info!("agent stopped");
        died.map_or(Ok(()), Err)
    }

    /// The store met damage: ingest stops for good, the notice for
    /// `status` is written, and with `on_buffer_corrupt = "exit"` the error
    /// that stops the daemon is returned.
    fn buffer_damaged(&mut self) -> Option<AgentError> {
        self.ingest_stopped = true;
        let message = self.corruption.get().unwrap_or_default();
        let (path, notice) = (self.store.path().to_owned(), message.clone());
        tokio::task::spawn_blocking(move || store::write_notice(&path, &notice));
        match self.on_corrupt {
            OnBufferCorrupt::Exit => {
                tracing::error!(error = %message, "ingest stopped, new files wait in the spool; stopping the daemon (daemon.on_buffer_corrupt = \"exit\")");
                Some(AgentError::BufferCorrupt { message })
            }
            OnBufferCorrupt::StopIngest => {
                tracing::error!(error = %message, "ingest stopped (daemon.on_buffer_corrupt = \"stop-ingest\"): new files wait in the spool; files in the buffer are still sent");
                None
            }
        }
    }

    /// Records that the ingest loop is alive, for the systemd watchdog.
    fn beat(&self) {
        self.ingest_heartbeat
            .store(crate::clock::now_ms(), Ordering::Relaxed);
    }

    /// Ingests a batch, beating meanwhile: buffering a big file takes as long
    /// as reading it, and the loop is busy, not hung, while it waits.
    async fn ingest_beating(&mut self, batch: Vec<Candidate>) -> bool {
        let heartbeat = self.ingest_heartbeat.clone();
        let ingest = self.ingest(batch);
        tokio::pin!(ingest);
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                paused = &mut ingest => return paused,
                _ = beat.tick() => heartbeat.store(crate::clock::now_ms(), Ordering::Relaxed),
            }
        }
    }

    /// When the next failed file is due to be offered again.
    fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.retries.values().filter_map(|r| r.due).min()
    }

    /// Asks the watchers to offer again the failed files now due.
    fn offer_due_retries(&mut self) {
        let now = tokio::time::Instant::now();
        for ((spool, relative), retry) in &mut self.retries {
            if retry.due.is_none_or(|due| due > now) {
                continue;
            }
            retry.due = None;
            retry.reoffered = now;
            if let Some(running) = self.spools.iter().find(|s| s.config.path == *spool) {
                running.handle.reoffer(relative.clone());
            }
        }
        // Files of spools removed by a reload stay where they are.
        let spools: Vec<PathBuf> = self.spools.iter().map(|s| s.config.path.clone()).collect();
        self.retries.retain(|(spool, _), retry| {
            spools.contains(spool)
                && (retry.due.is_some() || now.duration_since(retry.reoffered) < RETRY_FORGET_AFTER)
        });
    }

    /// Records that a file's ingest failed and schedules its next offer on
    /// its target's retry schedule; returns how many attempts failed so far.
    fn schedule_retry(&mut self, file: SpoolFile, backoff: Backoff) -> u64 {
        let now = tokio::time::Instant::now();
        let retry = self.retries.entry(file).or_insert(IngestRetry {
            attempts: 0,
            due: None,
            reoffered: now,
        });
        retry.attempts += 1;
        retry.due = Some(now + backoff.delay(retry.attempts));
        retry.attempts
    }

    async fn buffer_has_room(&self) -> bool {
        let store = self.store.clone();
        let max = self.max_buffer_bytes;
        let has_room = move || {
            // A WAL left large by a failed write holds space the database could use.
            store.trim_wal();
            // A file whose streaming-in a full disk cut short, and which
            // could not be removed then, holds room until it is.
            match store.forget_unfinished() {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(
                        files = n,
                        "removed files whose buffering a full disk stopped half-way; they are buffered again from their spools"
                    );
                    store.trim_wal();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not yet remove a file whose buffering stopped half-way")
                }
            }
            let disk_ok = || {
                store
                    .free_bytes()
                    .is_none_or(|free| free > 2 * ingest::DISK_RESERVE)
            };
            // Delivered files' data kept for a cheaper deletion later gives
            // way when the disk is short.
            let disk_ok = disk_ok()
                || match store.release_confirmed_data() {
                    Ok(0) => false,
                    Ok(_) => disk_ok(),
                    Err(e) => {
                        tracing::debug!(error = %e, "could not delete delivered files' data");
                        false
                    }
                };
            store.buffered_bytes().map(|n| n < max && disk_ok)
        };
        matches!(tokio::task::spawn_blocking(has_room).await, Ok(Ok(true)))
    }

    async fn forget_old_confirmed(&self) {
        let store = self.store.clone();
        let cutoff = crate::clock::now_ms() - CONFIRMED_RETENTION.as_millis() as i64;
        match tokio::task::spawn_blocking(move || store.forget_confirmed_before(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(files = n, "forgot confirmed files past their retention"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot forget old confirmed files"),
            Err(_) => {}
        }
    }

    /// Ingests candidates in one batch; returns whether ingest must pause
    /// (buffer or disk full). A file whose ingest failed is offered again
    /// later, on its target's retry schedule.
    async fn ingest(&mut self, candidates: Vec<Candidate>) -> bool {
        let mut offers = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            let Some(spool_cfg) = self
                .spools
                .iter()
                .map(|s| &s.config)
                .find(|s| s.path == candidate.spool)
            else {
                continue; // The spool was removed by a reload; the file stays where it is.
            };
            let Some(target) = self
                .shared
                .targets()
                .into_iter()
                .find(|t| t.config.name == spool_cfg.target)
            else {
                tracing::warn!(spool = %spool_cfg.path.display(), target = %spool_cfg.target, "the spool's target is not configured; the file waits in the spool");
                continue;
            };
            offers.push(ingest::Offer {
                candidate,
                spool: spool_cfg.clone(),
                target: target.config.clone(),
            });
        }
        if offers.is_empty() {
            return false;
        }
        let (store, max) = (self.store.clone(), self.max_buffer_bytes);
        let files = offers.len();
        let batch: Vec<(SpoolFile, Backoff)> = offers
            .iter()
            .map(|o| {
                let file = (o.candidate.spool.clone(), o.candidate.relative.clone());
                (file, Backoff::of(&o.target))
            })
            .collect();
        // The offers go to the blocking task and come back with their outcomes.
        // A large file's first commit wakes the uploader, which may send it
        // while the rest is read (the file's own upload then follows its
        // commits through the store).
        let wake = self.wake.clone();
        let result = tokio::task::spawn_blocking(move || {
            let committed = || wake.notify_one();
            ingest::ingest_candidates(&store, &offers, max, &committed)
                .map(|outcomes| (offers, outcomes))
        })
        .await;
        let (offers, outcomes) = match result {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                let pause = e.is_disk_full();
                if pause {
                    tracing::error!(files, error = %e, "the buffer's disk is full: ingest paused, files wait in the spool");
                } else {
                    tracing::error!(files, error = %e, "ingest failed; the files stay in the spool and are tried again later");
                    batch.into_iter().for_each(|(f, b)| {
                        self.schedule_retry(f, b);
                    });
                }
                return pause;
            }
            Err(e) => {
                tracing::error!(files, error = %e, "ingest task failed; the files stay in the spool and are tried again later");
                batch.into_iter().for_each(|(f, b)| {
                    self.schedule_retry(f, b);
                });
                return false;
            }
        };
        let mut pause = false;
        let mut buffered = false;
        for ((offer, outcome), (file, backoff)) in offers.iter().zip(outcomes).zip(batch) {
            buffered |= matches!(outcome, Ok(IngestOutcome::Buffered { .. }));
            let failed = matches!(outcome, Ok(IngestOutcome::Skipped(_)) | Err(_))
                && !outcome.as_ref().is_err_and(IngestError::is_disk_full);
            // A failure is logged at its level the first time, and quietly
            // on each retry that fails the same way, so that a file that
            // stays unreadable does not fill the log.
            let attempts = if failed {
                self.schedule_retry(file, backoff)
            } else {
                self.retries.remove(&file);
                0
            };
            pause |= self.report(&offer.candidate, outcome, attempts);
        }
        if buffered {
            self.wake.notify_one();
            let store = self.store.clone();
            let _ = tokio::task::spawn_blocking(move || store.trim_wal_if_tight()).await;
        }
        pause
    }

    /// Logs what became of one candidate; returns whether ingest must pause.
    /// `attempts` counts the failed attempts for this file so far.
    fn report(
        &self,
        candidate: &Candidate,
        outcome: Result<IngestOutcome, IngestError>,
        attempts: u64,
    ) -> bool {
        let file = spool::escape_name(&candidate.relative);
        let file = file.as_ref();
        let spool = candidate.spool.display().to_string();
        match outcome {
            Ok(IngestOutcome::Buffered { file_id, bytes }) => {
                crate::metrics::INGESTED_FILES.add(1);
                crate::metrics::INGESTED_BYTES.add(bytes);
                tracing::info!(%spool, file, file_id, bytes, "buffered");
                false
            }
            Ok(IngestOutcome::AlreadyBuffered { file_id }) => {
                tracing::info!(%spool, file, file_id, "already buffered before a restart; source disposed of now");
                false
            }
            Ok(IngestOutcome::AlreadyKept | IngestOutcome::OfferedAgain) => false,
            Ok(IngestOutcome::Changed) => {
                tracing::debug!(%spool, file, "changed while being read; waiting for it to settle again");
                false
            }
            Ok(IngestOutcome::DiskFull { free }) => {
                tracing::error!(%spool, file, free_bytes = free, "the buffer's disk is full: ingest paused, files wait in the spool until uploads free space");
                true
            }
            Ok(IngestOutcome::BufferFull) => {
                tracing::warn!(%spool, file, max_buffer_bytes = self.max_buffer_bytes, "buffer full: ingest paused, files wait in the spool until uploads free space");
                true
            }
            Ok(IngestOutcome::TooLarge { size, limit }) => {
                tracing::error!(%spool, file, size, max_buffer_bytes = limit, "file is larger than daemon.max_buffer_bytes and stays in the spool; raise max_buffer_bytes");
                false
            }
            Ok(IngestOutcome::Skipped(reason)) => {
                let reason = spool::escape_name(&reason);
                if attempts > 1 {
                    tracing::debug!(%spool, file, %reason, attempts, "skipped again; tried again later");
                } else {
                    tracing::warn!(%spool, file, %reason, "skipped for now; tried again later");
                }
                false
            }
            Err(e) if e.is_disk_full() => {
                tracing::error!(%spool, file, error = %e, "the buffer's disk is full: ingest paused, files wait in the spool");
                true
            }
            Err(e) => {
                let error = spool::escape_name(&e.to_string()).into_owned();
                if attempts > 1 {
                    tracing::debug!(%spool, file, %error, attempts, "ingest failed again; tried again later");
                } else {
                    tracing::error!(%spool, file, %error, "ingest failed; the file stays in the spool and is tried again later");
                }
                false
            }
        }
    }
}

/// Sleeps until `at`, or for ever when there is nothing to wait for.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a panicked task said, for the log line that reports its death.
fn panic_message(error: tokio::task::JoinError) -> String {
    let payload = error.into_panic();
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned());
    format!("panicked: {message}")
}

/// Target runtimes for `configs`, reusing an old runtime (and its HTTP client
/// and protocol knowledge) when the target's settings did not change.
fn build_targets(
    configs: &[TargetConfig],
    old: &[Arc<TargetRuntime>],
) -> Result<Vec<Arc<TargetRuntime>>, AgentError> {
    let mut out = Vec::new();
    for target in configs {
        if let Some(same) = old.iter().find(|o| o.config == *target) {
            out.push(same.clone());
            continue;
        }
        let runtime = TargetRuntime::new(target.clone()).map_err(|source| AgentError::Target {
            name: target.name.clone(),
            source,
        })?;
        if target.kind == crate::config::TargetKind::IndexedCp
            && target.api_key.is_none()
            && crate::config::api_key_from_env().is_none()
        {
            tracing::warn!(target = %target.name, "no api_key, api_key_file or INDEXEDCP_API_KEY: uploads will be refused with 401 by receivers that require a key");
        }
        out.push(Arc::new(runtime));
    }
    Ok(out)
}
