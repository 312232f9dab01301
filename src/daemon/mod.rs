//! The supervisor: runs the roles a configuration enables, turns signals into
//! cancellation, and tells systemd where it stands (`sd_notify`). It owns no domain
//! logic: the receiver lives in `server`.
//!
//! Shutdown is cancel, then wait with a grace period, then exit. A second
//! SIGTERM/SIGINT exits at once; that is safe because every durable step is a
//! committed SQLite transaction or an atomic rename.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::agent;
use crate::config::{Config, ServerConfig};
use crate::logging;
use crate::server::{self, Receiver, ReceiverOptions};

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
pub fn spawn_signal_handler(
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
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                    shutdown.cancel();
                }
            }
        }
    }))
}

/// Runs the receiver alone (the `server` command) until `shutdown`.
pub async fn run_receiver(
    cfg: &ServerConfig,
    options: &ReceiverOptions,
    generated_key: Option<&str>,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), DaemonError> {
    let receiver = open_receiver(cfg, options).await?;
    let listener = bind_and_announce(cfg, generated_key).await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    server::serve(listener, receiver, shutdown, grace).await;
    tracing::info!("receiver stopped");
    Ok(())
}

/// `indexedcp daemon`: the roles of the config file at `path`, reloaded on SIGHUP.
pub async fn run(path: &Path, config: Config) -> Result<(), DaemonError> {
    let shutdown = CancellationToken::new();
    let (reload_tx, mut reload_rx) = mpsc::channel(4);
    let signals = spawn_signal_handler(shutdown.clone(), Some(reload_tx))?;
    let config = Arc::new(config);
    let (config_tx, config_rx) = watch::channel(config.clone());
    let mut roles: JoinSet<Result<(), DaemonError>> = JoinSet::new();

    let mut server = match &config.server {
        Some(cfg) => {
            Some(ServerRole::start(cfg, config.daemon.shutdown_grace, &mut roles, &shutdown).await?)
        }
        None => None,
    };
    let mut probe = None;
    if !config.spools.is_empty() || !config.targets.is_empty() {
        let agent = agent::Agent::start(&config, shutdown.child_token()).await?;
        probe = Some(agent.probe());
        roles.spawn(async move {
            agent.run(config_rx).await;
            Ok(())
        });
    }
    if roles.is_empty() {
        return Err(DaemonError::NoRole {
            path: path.to_owned(),
        });
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(config = %path.display(), "indexedcp daemon running");
    if let Some(addr) = config.daemon.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::MetricsListen { addr, source })?;
        tracing::info!(%addr, "serving metrics at /metrics");
        let (probe, token) = (probe.clone(), shutdown.clone());
        roles.spawn(async move {
            serve_metrics(listener, probe, token).await;
            Ok(())
        });
    }
    let status = tokio::spawn(report_status(
        probe,
        config.daemon.check_interval,
        shutdown.clone(),
    ));

    let mut current = config;
    let mut result = Ok(());
    loop {
        tokio::select! {
            Some(()) = reload_rx.recv() => {
                if let Some(next) = reload(path, &current, &mut server, &mut roles, &shutdown).await {
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

/// Re-reads the config file. Invalid: every error is logged and `None` keeps the
/// running config. Valid: the receiver and the log level are updated here, and
/// the new config is returned for the agent to apply.
async fn reload(
    path: &Path,
    current: &Arc<Config>,
    server: &mut Option<ServerRole>,
    roles: &mut JoinSet<Result<(), DaemonError>>,
    shutdown: &CancellationToken,
) -> Option<Arc<Config>> {
    let mut reloading = vec![sd_notify::NotifyState::Reloading];
    reloading.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
    let _ = sd_notify::notify(false, &reloading);
    let owned = path.to_owned();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&owned)).await;
    let outcome = match loaded {
        Ok(Ok(new)) => {
            let mut changes = Vec::new();
            if new.daemon.log_level != current.daemon.log_level {
                let level = logging::set_level(&new.daemon.log_level);
                changes.push(format!("log level {level}"));
            }
            if current.spools.is_empty() && current.targets.is_empty() && !new.spools.is_empty() {
                tracing::warn!(
                    "reload: [[spool]] sections were added to a receiver-only daemon; restart it to start the agent role"
                );
            }
            match (server.as_mut(), &new.server) {
                (Some(role), Some(cfg)) => changes.extend(
                    role.reload(cfg, new.daemon.shutdown_grace, roles, shutdown)
                        .await,
                ),
                (Some(role), None) => {
                    role.accepting.cancel();
                    *server = None;
                    changes.push("receiver stopped".into());
                }
                (None, Some(cfg)) => {
                    match ServerRole::start(cfg, new.daemon.shutdown_grace, roles, shutdown).await {
                        Ok(role) => {
                            *server = Some(role);
                            changes.push("receiver started".into());
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reload: cannot start the receiver")
                        }
                    }
                }
                (None, None) => {}
            }
            tracing::info!(config = %path.display(), changes = %changes.join("; "), "configuration reloaded");
            Some(Arc::new(new))
        }
        Ok(Err(e)) => {
            for line in e.messages() {
                tracing::error!(config = %path.display(), "reload refused, running configuration kept: {line}");
            }
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "reload task failed; running configuration kept");
            None
        }
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    outcome
}

/// The receiver role of a daemon: the config in force, the receiver new
/// connections get, and the token that stops accepting on the current listener.
struct ServerRole {
    config: ServerConfig,
    receivers: watch::Sender<Receiver>,
    accepting: CancellationToken,
}

impl ServerRole {
    async fn start(
        cfg: &ServerConfig,
        grace: Duration,
        roles: &mut JoinSet<Result<(), DaemonError>>,
        shutdown: &CancellationToken,
    ) -> Result<ServerRole, DaemonError> {
        let (cfg, generated) = with_api_keys(cfg.clone());
        let receiver = open_receiver(&cfg, &ReceiverOptions::default()).await?;
        let listener = bind_and_announce(&cfg, generated.as_deref()).await?;
        let (receivers, rx) = watch::channel(receiver);
        let accepting = shutdown.child_token();
        let token = accepting.clone();
        roles.spawn(async move {
            server::serve_reloadable(listener, rx, token, grace).await;
            Ok(())
        });
        Ok(ServerRole {
            config: cfg,
            receivers,
            accepting,
        })
    }

    /// Applies a changed `[server]`: new connections get the new settings; a new
    /// listen address gets a new listener before the old one stops accepting.
    /// Requests in flight finish on the settings they started with.
    async fn reload(
        &mut self,
        new: &ServerConfig,
        grace: Duration,
        roles: &mut JoinSet<Result<(), DaemonError>>,
        shutdown: &CancellationToken,
    ) -> Vec<String> {
        let mut new = new.clone();
        if new.api_keys.is_empty() {
            // Keep the key from the environment or the one generated at start.
            new.api_keys = self.config.api_keys.clone();
        }
        if new == self.config {
            return Vec::new();
        }
        let receiver = match open_receiver(&new, &ReceiverOptions::default()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "reload: receiver settings kept");
                return Vec::new();
            }
        };
        let mut changes = vec!["receiver settings".to_string()];
        if new.listen != self.config.listen {
            let listener = match bind_and_announce(&new, None).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "reload: still listening on {}", self.config.listen);
                    return Vec::new();
                }
            };
            let accepting = shutdown.child_token();
            let (token, rx) = (accepting.clone(), self.receivers.subscribe());
            roles.spawn(async move {
                server::serve_reloadable(listener, rx, token, grace).await;
                Ok(())
            });
            self.accepting.cancel();
            self.accepting = accepting;
            changes.push(format!("listening on {}", new.listen));
        }
        self.receivers.send_replace(receiver);
        self.config = new;
        changes
    }
}

/// Serves `/metrics` (Prometheus text) until `shutdown`.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    probe: Option<agent::AgentProbe>,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let probe = probe.clone();
            async move {
                let queues = match probe {
                    Some(probe) => tokio::task::spawn_blocking(move || probe.store.target_queues())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default(),
                    None => Vec::new(),
                };
                let now = crate::agent::store::now_ms();
                let gauges: Vec<crate::metrics::QueueGauge> = queues
                    .into_iter()
                    .map(|q| crate::metrics::QueueGauge {
                        oldest_queued_age_secs: q
                            .oldest_queued_at
                            .map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0),
                        target: q.target,
                        queued_files: q.queued_files,
                        queued_bytes: q.queued_bytes,
                        failed_files: q.failed_files,
                    })
                    .collect();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    crate::metrics::render(&gauges),
                )
            }
        }),
    );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
}

/// Tells systemd how the agent is doing (STATUS=) and, when a watchdog is set,
/// pings it only while the uploader loop is alive.
async fn report_status(
    probe: Option<agent::AgentProbe>,
    check_interval: Duration,
    shutdown: CancellationToken,
) {
    let watchdog = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    );
    let period = match watchdog {
        Some(interval) => interval / 2,
        None => check_interval.max(Duration::from_secs(5)),
    };
    let watchdog = watchdog.is_some();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let mut alive = true;
        if let Some(probe) = &probe {
            let store = probe.store.clone();
            let counts = tokio::task::spawn_blocking(move || {
                Ok::<_, crate::agent::store::StoreError>((
                    store.counts()?,
                    store.buffered_bytes()?,
                    store.last_error()?,
                ))
            })
            .await;
            if let Ok(Ok(((queued, failed, _), bytes, last_error))) = counts {
                let mut line = format!("{queued} queued ({bytes} bytes), {failed} failed");
                if let Some(error) = last_error {
                    line.push_str("; last error: ");
                    line.push_str(&error);
                }
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&line)]);
            }
            let stale = probe.shared.check_interval() * 3 + Duration::from_secs(30);
            alive = crate::agent::store::now_ms() - probe.shared.last_heartbeat()
                < stale.as_millis() as i64;
        }
        if watchdog && alive {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
        }
    }
}

/// The watchdog interval systemd asked for, read as libsystemd's
/// `sd_watchdog_enabled` does: `WATCHDOG_USEC` set and positive, and
/// `WATCHDOG_PID`, when present, naming this process.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    match pid {
        Some(pid) if pid.trim().parse::<u32>().ok() != Some(me) => None,
        _ => Some(Duration::from_micros(usec)),
    }
}

async fn open_receiver(
    cfg: &ServerConfig,
    options: &ReceiverOptions,
) -> Result<Receiver, DaemonError> {
    let (cfg, options) = (cfg.clone(), options.clone());
    Ok(tokio::task::spawn_blocking(move || Receiver::open(&cfg, &options)).await??)
}

/// Binds the receiver's address and prints where it listens (and the key when it
/// generated one) on stdout, as the original does.
async fn bind_and_announce(
    cfg: &ServerConfig,
    generated_key: Option<&str>,
) -> Result<tokio::net::TcpListener, DaemonError> {
    let listener = server::bind(cfg.listen).await?;
    let addr = listener.local_addr().map_err(DaemonError::ListenAddress)?;
    println!("Server listening on http://{addr}");
    if let Some(key) = generated_key {
        println!("API Key: {key}");
    }
    tracing::info!(%addr, output_dir = %cfg.output_dir.display(), path_mode = %cfg.path_mode, "receiver started");
    Ok(listener)
}

/// Fills in the receiver's keys: configured ones, else `INDEXEDCP_API_KEY`, else a
/// generated key (returned so that it can be printed once).
pub fn with_api_keys(mut cfg: ServerConfig) -> (ServerConfig, Option<String>) {
    if !cfg.api_keys.is_empty() {
        return (cfg, None);
    }
    if let Ok(key) = std::env::var("INDEXEDCP_API_KEY")
        && !key.trim().is_empty()
    {
        cfg.api_keys.push(key.trim().to_owned());
        return (cfg, None);
    }
    let key = server::generate_api_key();
    cfg.api_keys.push(key.clone());
    (cfg, Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_follows_libsystemd_rules() {
        let second = Some(Duration::from_secs(1));
        assert_eq!(watchdog_interval(Some("1000000"), None, 7), second);
        assert_eq!(watchdog_interval(Some("1000000"), Some("7"), 7), second);
        assert_eq!(watchdog_interval(Some("1000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("1000000"), Some("x"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }
}
