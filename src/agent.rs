//! The agent role: spool watchers feed complete files to one ingest worker,
//! which buffers them in the store and wakes the uploader; a housekeeping timer
//! resumes a paused ingest and forgets old confirmed files.
//!
//! This module only wires the parts together (`spool`, `ingest`, `store`,
//! `upload`); each owns its own logic. Ingest runs one file at a time on a
//! blocking thread, so memory stays at one chunk for ingest plus one chunk per
//! file in flight, whatever the file sizes or the queue length.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SpoolConfig, TargetConfig};
use crate::ingest::{self, IngestOutcome};
use crate::spool::{self, Candidate, SpoolHandle};
use crate::store::{self, Store, StoreError};
use crate::upload::{self, NoObserver, TargetRuntime};

/// How long confirmed files stay listed in the buffer (with their server name).
pub const CONFIRMED_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Candidates queued between the watchers and the ingest worker.
const CANDIDATE_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "cannot create the state directory {path}: {source}; create it or set daemon.state_dir"
    )]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("spool {path}: {message}")]
    Spool { path: PathBuf, message: String },
    #[error("target {name}: {message}")]
    Target { name: String, message: String },
}

/// A started agent: watchers running, the rest started by [`Agent::run`].
pub struct Agent {
    store: Store,
    spools: Vec<(SpoolConfig, SpoolHandle)>,
    targets: HashMap<String, Arc<TargetRuntime>>,
    candidates: mpsc::Receiver<Candidate>,
    tasks: JoinSet<()>,
    wake: Arc<Notify>,
    check_interval: Duration,
    max_buffer_bytes: u64,
    grace: Duration,
    shutdown: CancellationToken,
}

impl Agent {
    /// Opens the buffer and starts a watcher per spool (each scans at once).
    pub async fn start(config: &Config, shutdown: CancellationToken) -> Result<Agent, AgentError> {
        let state_dir = config.daemon.state_dir.clone();
        let store = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&state_dir).map_err(|source| AgentError::StateDir {
                path: state_dir.clone(),
                source,
            })?;
            Ok::<_, AgentError>(Store::open(&state_dir.join("buffer.db"))?)
        })
        .await
        .map_err(|e| AgentError::StateDir {
            path: config.daemon.state_dir.clone(),
            source: std::io::Error::other(e),
        })??;

        let mut targets = HashMap::new();
        for target in &config.targets {
            let runtime = TargetRuntime::new(target.clone()).map_err(|e| AgentError::Target {
                name: target.name.clone(),
                message: e.to_string(),
            })?;
            if target.api_key.is_none() && std::env::var_os("INDEXEDCP_API_KEY").is_none() {
                tracing::warn!(target = %target.name, "no api_key, api_key_file or INDEXEDCP_API_KEY: uploads will be refused with 401 by receivers that require a key");
            }
            targets.insert(target.name.clone(), Arc::new(runtime));
        }

        let (tx, candidates) = mpsc::channel(CANDIDATE_QUEUE);
        let mut tasks = JoinSet::new();
        let mut spools = Vec::new();
        for spool_cfg in &config.spools {
            let (handle, task) =
                spool::spawn(spool_cfg.clone(), tx.clone(), shutdown.child_token()).map_err(
                    |e| AgentError::Spool {
                        path: spool_cfg.path.clone(),
                        message: e.to_string(),
                    },
                )?;
            tasks.spawn(async move {
                let _ = task.await;
            });
            tracing::info!(spool = %spool_cfg.path.display(), target = %spool_cfg.target, "watching spool");
            spools.push((spool_cfg.clone(), handle));
        }
        Ok(Agent {
            store,
            spools,
            targets,
            candidates,
            tasks,
            wake: Arc::new(Notify::new()),
            check_interval: config.daemon.check_interval,
            max_buffer_bytes: config.daemon.max_buffer_bytes,
            grace: config.daemon.shutdown_grace,
            shutdown,
        })
    }

    /// Runs ingest, upload and housekeeping until shutdown.
    pub async fn run(mut self) -> Result<(), crate::cli::Failure> {
        let uploader = tokio::spawn(upload::run_uploader(
            self.store.clone(),
            self.targets.values().cloned().collect(),
            self.check_interval,
            self.wake.clone(),
            Arc::new(NoObserver),
            self.shutdown.clone(),
            self.grace,
        ));
        let mut paused = false;
        let mut housekeeping = tokio::time::interval(self.check_interval);
        let mut last_forget = std::time::Instant::now() - Duration::from_secs(3600);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = housekeeping.tick() => {
                    if paused && self.buffer_has_room().await {
                        paused = false;
                        tracing::info!("buffer below max_buffer_bytes again; resuming ingest");
                        self.spools.iter().for_each(|(_, h)| h.rescan());
                    }
                    if last_forget.elapsed() >= Duration::from_secs(3600) {
                        last_forget = std::time::Instant::now();
                        self.forget_old_confirmed().await;
                    }
                }
                Some(candidate) = self.candidates.recv() => {
                    if paused {
                        continue; // It stays in the spool; the rescan on resume offers it again.
                    }
                    paused = self.ingest(candidate).await;
                }
            }
        }
        // Dropping the receiver stops watchers blocked on a full queue.
        drop(self.candidates);
        let _ = uploader.await;
        while self.tasks.join_next().await.is_some() {}
        tracing::info!("agent stopped");
        Ok(())
    }

    async fn buffer_has_room(&self) -> bool {
        let store = self.store.clone();
        let max = self.max_buffer_bytes;
        matches!(tokio::task::spawn_blocking(move || store.buffered_bytes()).await, Ok(Ok(n)) if n < max)
    }

    async fn forget_old_confirmed(&self) {
        let store = self.store.clone();
        let cutoff = store::now_ms() - CONFIRMED_RETENTION.as_millis() as i64;
        match tokio::task::spawn_blocking(move || store.forget_confirmed_before(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(files = n, "forgot confirmed files past their retention"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot forget old confirmed files"),
            Err(_) => {}
        }
    }

    /// Ingests one candidate; returns whether ingest must pause (buffer full).
    async fn ingest(&self, candidate: Candidate) -> bool {
        let Some((spool_cfg, _)) = self.spools.iter().find(|(s, _)| s.path == candidate.spool)
        else {
            return false;
        };
        let Some(target) = self.targets.get(&spool_cfg.target) else {
            return false;
        };
        let (store, spool_cfg, target_cfg): (Store, SpoolConfig, TargetConfig) =
            (self.store.clone(), spool_cfg.clone(), target.config.clone());
        let max = self.max_buffer_bytes;
        let c = candidate.clone();
        let result = tokio::task::spawn_blocking(move || {
            ingest::ingest_candidate(&store, &c, &spool_cfg, &target_cfg, max)
        })
        .await;
        let file = candidate.relative.as_str();
        let spool = candidate.spool.display().to_string();
        match result {
            Ok(Ok(IngestOutcome::Buffered { file_id, bytes })) => {
                tracing::info!(%spool, file, file_id, bytes, "buffered");
                self.wake.notify_one();
                false
            }
            Ok(Ok(IngestOutcome::AlreadyBuffered { file_id })) => {
                tracing::info!(%spool, file, file_id, "already buffered before a restart; source disposed of now");
                false
            }
            Ok(Ok(IngestOutcome::AlreadyKept)) => false,
            Ok(Ok(IngestOutcome::Changed)) => {
                tracing::debug!(%spool, file, "changed while being read; waiting for it to settle again");
                false
            }
            Ok(Ok(IngestOutcome::BufferFull)) => {
                tracing::warn!(%spool, file, max_buffer_bytes = self.max_buffer_bytes, "buffer full: ingest paused, files wait in the spool until uploads free space");
                true
            }
            Ok(Ok(IngestOutcome::TooLarge { size, limit })) => {
                tracing::error!(%spool, file, size, max_buffer_bytes = limit, "file is larger than daemon.max_buffer_bytes and stays in the spool; raise max_buffer_bytes");
                false
            }
            Ok(Ok(IngestOutcome::Skipped(reason))) => {
                tracing::warn!(%spool, file, %reason, "skipped");
                false
            }
            Ok(Err(e)) if e.is_disk_full() => {
                tracing::error!(%spool, file, error = %e, "the buffer's disk is full: ingest paused, files wait in the spool");
                true
            }
            Ok(Err(e)) => {
                tracing::error!(%spool, file, error = %e, "ingest failed; the file stays in the spool");
                false
            }
            Err(e) => {
                tracing::error!(%spool, file, error = %e, "ingest task failed");
                false
            }
        }
    }
}
