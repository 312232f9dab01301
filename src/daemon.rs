//! The supervisor: runs the roles a configuration enables, turns signals into
//! cancellation, and tells systemd where it stands (`sd_notify`). It owns no domain
//! logic: the receiver lives in `server`.
//!
//! Shutdown is cancel, then wait with a grace period, then exit. A second
//! SIGTERM/SIGINT exits at once; that is safe because every durable step is a
//! committed SQLite transaction or an atomic rename.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent;
use crate::cli::Failure;
use crate::config::{Config, ServerConfig};
use crate::server::{self, Receiver, ReceiverOptions};

/// Grace period for in-flight requests when the config does not say.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What to do on SIGHUP.
pub enum OnReload {
    /// Nothing to re-read (the `server` command).
    Ignore,
    /// Re-read and validate this file, reporting the result.
    Validate(Arc<Path>),
}

/// Cancels `shutdown` on the first SIGTERM/SIGINT and exits the process on the
/// second; handles SIGHUP by `on_reload`.
pub fn spawn_signal_handler(
    shutdown: CancellationToken,
    on_reload: OnReload,
) -> Result<tokio::task::JoinHandle<()>, Failure> {
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| Failure::io(format!("cannot install signal handlers: {e}")))?;
    Ok(tokio::spawn(async move {
        while let Some(signal) = signals.next().await {
            match signal {
                SIGHUP => match &on_reload {
                    OnReload::Ignore => tracing::info!("SIGHUP received; nothing to reload"),
                    OnReload::Validate(path) => match Config::load(path) {
                        Ok(_) => tracing::warn!(
                            config = %path.display(),
                            "SIGHUP: the configuration is valid; this version applies changes at the next restart"
                        ),
                        Err(e) => {
                            for line in e.messages() {
                                tracing::error!(config = %path.display(), "SIGHUP: invalid configuration kept out: {line}");
                            }
                        }
                    },
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
) -> Result<(), Failure> {
    let receiver = open_receiver(cfg, options).await?;
    let listener = bind_and_announce(cfg, generated_key).await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    server::serve(listener, receiver, shutdown, grace).await;
    tracing::info!("receiver stopped");
    Ok(())
}

/// `indexedcp daemon`: the roles of the config file at `path`.
pub async fn run(path: &Path, config: Config) -> Result<(), Failure> {
    let shutdown = CancellationToken::new();
    let signals = spawn_signal_handler(shutdown.clone(), OnReload::Validate(Arc::from(path)))?;
    let grace = config.daemon.shutdown_grace;
    let mut roles: JoinSet<Result<(), Failure>> = JoinSet::new();

    if let Some(server_cfg) = config.server.clone() {
        let (server_cfg, generated) = with_api_keys(server_cfg);
        let receiver = open_receiver(&server_cfg, &ReceiverOptions::default()).await?;
        let listener = bind_and_announce(&server_cfg, generated.as_deref()).await?;
        let token = shutdown.child_token();
        roles.spawn(async move {
            server::serve(listener, receiver, token, grace).await;
            tracing::info!("receiver stopped");
            Ok(())
        });
    }
    if !config.spools.is_empty() {
        let agent = agent::Agent::start(&config, shutdown.child_token())
            .await
            .map_err(|e| match e {
                agent::AgentError::Target { .. } => Failure::config(e.to_string()),
                other => Failure::io(other.to_string()),
            })?;
        roles.spawn(async move { agent.run().await });
    }
    if roles.is_empty() {
        return Err(Failure::config(format!(
            "{}: no role enabled: add [[spool]] sections (agent) or a [server] section (receiver)",
            path.display()
        )));
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(config = %path.display(), "indexedcp daemon running");

    let mut result = Ok(());
    while let Some(done) = roles.join_next().await {
        let outcome =
            done.unwrap_or_else(|e| Err(Failure::software(format!("a role panicked: {e}"))));
        if let Err(failure) = outcome {
            // One role failing stops the others: the service manager restarts us.
            tracing::error!(error = %failure.message, "stopping");
            shutdown.cancel();
            result = Err(failure);
        }
    }
    signals.abort();
    result
}

async fn open_receiver(cfg: &ServerConfig, options: &ReceiverOptions) -> Result<Receiver, Failure> {
    let (cfg, options) = (cfg.clone(), options.clone());
    tokio::task::spawn_blocking(move || Receiver::open(&cfg, &options))
        .await
        .map_err(|e| Failure::software(e.to_string()))?
        .map_err(|e| match e {
            server::ServerError::CrossDevice { .. } => Failure::config(e.to_string()),
            other => Failure::io(other.to_string()),
        })
}

/// Binds the receiver's address and prints where it listens (and the key when it
/// generated one) on stdout, as the original does.
async fn bind_and_announce(
    cfg: &ServerConfig,
    generated_key: Option<&str>,
) -> Result<tokio::net::TcpListener, Failure> {
    let listener = server::bind(cfg.listen)
        .await
        .map_err(|e| Failure::io(e.to_string()))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::io(format!("cannot read the listening address: {e}")))?;
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
