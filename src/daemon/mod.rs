//! The supervisor: runs the roles a configuration enables (`roles`), turns
//! signals into cancellation and SIGHUP into a reload (`reload`), tells
//! systemd where it stands (`notify`) and serves `/metrics` when asked to
//! (`metrics`). It owns no domain logic: the receiver lives in `server`, the
//! agent in `agent`, and the exit codes in `cli`.
//!
//! Shutdown is cancel, then wait with a grace period, then exit. A second
//! SIGTERM/SIGINT exits at once; that is safe because every durable step is a
//! committed SQLite transaction or an atomic rename.

mod metrics;
mod notify;
mod reload;
mod roles;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinError;
use tokio_util::sync::CancellationToken;

use crate::agent;
use crate::config::Config;
use crate::server;

pub(crate) use roles::{run_receiver, with_api_keys};

/// Why the daemon, or the receiver run alone, stopped or could not start. The
/// variants say what went wrong, not how the process exits: the command line
/// maps them to exit codes.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration file enables no role: only editing it helps.
    #[error(
        "{}: no role enabled: add [[spool]] sections (agent) or a [server] section (receiver)",
        path.display()
    )]
    NoRole { path: PathBuf },
    /// The agent role could not start; its variant says whether the
    /// configuration or the file system is to blame.
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
    /// The receiver role could not open its directories and state, or bind
    /// its address.
    #[error(transparent)]
    Receiver(#[from] server::ServerError),
    /// The operating system refused the signal handlers.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// The metrics address cannot be bound (in use, or not ours).
    #[error("cannot listen on daemon.metrics_listen {addr}: {source}; choose another address")]
    MetricsListen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The bound listener cannot tell its own address.
    #[error("cannot read the listening address: {0}")]
    ListenAddress(#[source] std::io::Error),
    /// A role's task panicked: a bug, which stops the other roles too.
    #[error("a role panicked: {0}")]
    RolePanicked(#[source] JoinError),
    /// A blocking start-up task panicked: a bug.
    #[error(transparent)]
    Task(#[from] JoinError),
}

/// Cancels `shutdown` on the first SIGTERM/SIGINT and exits the process on the
/// second; forwards SIGHUP to `reloads` (or logs that there is nothing to reload).
pub(crate) fn spawn_signal_handler(
    shutdown: CancellationToken,
    reloads: Option<mpsc::Sender<()>>,
) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
    let mut signals =
        signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(DaemonError::Signals)?;
    Ok(tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            match signal {
                SIGHUP => match &reloads {
                    None => tracing::info!("SIGHUP received; nothing to reload (no config file)"),
                    Some(tx) => {
                        let _ = tx.try_send(());
                    }
                },
                _ if shutdown.is_cancelled() => {
                    tracing::warn!("second stop signal: exiting now");
                    std::process::exit(0);
                }
                _ => {
                    tracing::info!(signal, "stop signal received; shutting down");
                    notify::stopping();
                    shutdown.cancel();
                }
            }
        }
    }))
}

/// `indexedcp daemon`: the roles of the config file at `path`, reloaded on SIGHUP.
pub(crate) async fn run(path: &Path, config: Config) -> Result<(), DaemonError> {
    if !crate::failpoint::COMPILED && std::env::var_os(crate::failpoint::ENV).is_some() {
        tracing::warn!(
            "{} is set, but this build has no failpoints (they are for the test suite); ignored",
            crate::failpoint::ENV
        );
    }
    let shutdown = CancellationToken::new();
    let (reload_tx, mut reload_rx) = mpsc::channel(4);
    let signals = spawn_signal_handler(shutdown.clone(), Some(reload_tx))?;
    let config = Arc::new(config);
    let (config_tx, config_rx) = watch::channel(config.clone());
    let mut roles = roles::RoleSet::new();

    let (mut server, probe) = roles::start(path, &config, config_rx, &mut roles, &shutdown)
        .await
        .inspect_err(|e| notify::status(&e.to_string()))?;
    notify::ready();
    tracing::info!(config = %path.display(), "indexedcp daemon running");
    if let Some(addr) = config.daemon.metrics_listen {
        metrics::spawn(addr, probe.clone(), &mut roles, shutdown.clone()).await?;
    }
    let status = tokio::spawn(notify::report_status(
        probe,
        config.daemon.check_interval,
        shutdown.clone(),
    ));

    let mut current = config;
    let mut result = Ok(());
    loop {
        tokio::select! {
            Some(()) = reload_rx.recv() => {
                if let Some(next) = reload::reload(path, &current, &mut server, &mut roles, &shutdown).await {
                    current = next.clone();
                    let _ = config_tx.send(next);
                }
            }
            done = roles.join_next() => {
                let Some(done) = done else { break };
                let outcome = done.unwrap_or_else(|e| Err(DaemonError::RolePanicked(e)));
                if let Err(failure) = outcome {
                    // One role failing stops the others: the service manager restarts us.
                    tracing::error!(error = %failure, "stopping");
                    notify::status(&failure.to_string());
                    shutdown.cancel();
                    result = Err(failure);
                }
            }
        }
    }
    status.abort();
    signals.abort();
    result
}
