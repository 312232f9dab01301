//! Running the roles a configuration enables: the receiver (`[server]`) and
//! the agent (`[[spool]]` and `[[target]]`), each as a task of the daemon's
//! role set, and the receiver alone for the `server` command (whose SIGHUP
//! rotates its certificate). Also where the
//! receiver's listener is bound and announced on stdout and its keys are
//! filled in, because the daemon and the `server` command share both.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{DaemonError, notify};
use crate::agent::{Agent, AgentProbe};
use crate::config::{Config, ServerConfig};
use crate::server::{self, Receiver, ReceiverOptions};

/// The daemon's running roles. One ending with an error stops the daemon.
pub(super) type RoleSet = JoinSet<Result<(), DaemonError>>;

/// Starts every role `config` enables on `roles`: the receiver first, then
/// the agent, which applies each configuration sent on `configs`. Returns the
/// receiver role (for reloads) and a probe of the agent (for status and
/// metrics); a configuration that enables neither is refused.
pub(super) async fn start(
    path: &Path,
    config: &Config,
    configs: watch::Receiver<Arc<Config>>,
    roles: &mut RoleSet,
    shutdown: &CancellationToken,
) -> Result<(Option<ServerRole>, Option<AgentProbe>), DaemonError> {
    let server = match &config.server {
        Some(cfg) => {
            Some(ServerRole::start(cfg, config.daemon.shutdown_grace, roles, shutdown).await?)
        }
        None => None,
    };
    let mut probe = None;
    if !config.spools.is_empty() || !config.targets.is_empty() {
        let agent = Agent::start(config, shutdown.child_token()).await?;
        probe = Some(agent.probe());
        roles.spawn(async move { Ok(agent.run(configs).await?) });
    }
    if roles.is_empty() {
        return Err(DaemonError::NoRole {
            path: path.to_owned(),
        });
    }
    Ok((server, probe))
}

/// Runs the receiver alone (the `server` command) until `shutdown`. Each
/// message on `reloads` (a SIGHUP) re-reads its certificate files, as the
/// daemon's reload does, since a renewal replaces them in place.
pub(crate) async fn run_receiver(
    cfg: &ServerConfig,
    options: &ReceiverOptions,
    generated_key: Option<&str>,
    shutdown: CancellationToken,
    grace: Duration,
    mut reloads: mpsc::Receiver<()>,
) -> Result<(), DaemonError> {
    let receiver = open_receiver(cfg, options).await?;
    let listener = bind_and_announce(cfg, generated_key).await?;
    let (receivers, rx) = watch::channel(receiver);
    notify::ready();
    let serving = server::serve_reloadable(listener, rx, shutdown, grace);
    tokio::pin!(serving);
    let mut cfg = cfg.clone();
    loop {
        tokio::select! {
            () = &mut serving => break,
            Some(()) = reloads.recv() => {
                super::reload::reload_certificate(&mut cfg, options, &receivers).await;
            }
        }
    }
    tracing::info!("receiver stopped");
    Ok(())
}

/// The receiver role of a daemon: the config in force, the receiver new
/// connections get, and the token that stops accepting on the current listener.
pub(super) struct ServerRole {
    pub(super) config: ServerConfig,
    pub(super) receivers: watch::Sender<Receiver>,
    pub(super) accepting: CancellationToken,
}

impl ServerRole {
    pub(super) async fn start(
        cfg: &ServerConfig,
        grace: Duration,
        roles: &mut RoleSet,
        shutdown: &CancellationToken,
    ) -> Result<ServerRole, DaemonError> {
        let (cfg, generated) = with_api_keys(cfg.clone());
        let receiver = open_receiver(&cfg, &ReceiverOptions::default()).await?;
        let listener = bind_and_announce(&cfg, generated.as_deref()).await?;
        let (receivers, rx) = watch::channel(receiver);
        let accepting = shutdown.child_token();
        spawn_listener(listener, rx, accepting.clone(), grace, roles);
        Ok(ServerRole {
            config: cfg,
            receivers,
            accepting,
        })
    }
}

/// Serves `listener` as one of the roles until `accepting` is cancelled, each
/// new connection getting the receiver `receivers` holds at that moment.
pub(super) fn spawn_listener(
    listener: TcpListener,
    receivers: watch::Receiver<Receiver>,
    accepting: CancellationToken,
    grace: Duration,
    roles: &mut RoleSet,
) {
    roles.spawn(async move {
        server::serve_reloadable(listener, receivers, accepting, grace).await;
        Ok(())
    });
}

/// Opens the receiver's directories and state on a blocking thread.
pub(super) async fn open_receiver(
    cfg: &ServerConfig,
    options: &ReceiverOptions,
) -> Result<Receiver, DaemonError> {
    let (cfg, options) = (cfg.clone(), options.clone());
    Ok(tokio::task::spawn_blocking(move || Receiver::open(&cfg, &options)).await??)
}

/// Binds the receiver's address and prints where it listens (and the key when it
/// generated one) on stdout, as the original does.
pub(super) async fn bind_and_announce(
    cfg: &ServerConfig,
    generated_key: Option<&str>,
) -> Result<TcpListener, DaemonError> {
    let listener = server::bind(cfg.listen).await?;
    let addr = listener.local_addr().map_err(DaemonError::ListenAddress)?;
    // Written without println!, which panics on EPIPE: a receiver whose
    // stdout was a pipe that closed (`indexedcp server | head -1`) keeps
    // serving.
    let mut stdout = std::io::stdout().lock();
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let _ = writeln!(stdout, "Server listening on {scheme}://{addr}");
    if let Some(key) = generated_key {
        let _ = writeln!(stdout, "API Key: {key}");
    }
    let _ = stdout.flush();
    drop(stdout);
    tracing::info!(%addr, output_dir = %cfg.output_dir.display(), path_mode = %cfg.path_mode, tls = cfg.tls.is_some(), client_certificates = cfg.tls.as_ref().is_some_and(|t| t.client_ca.is_some()), "receiver started");
    Ok(listener)
}

/// Fills in the receiver's keys: configured ones, else `INDEXEDCP_API_KEY`, else a
/// generated key (returned so that it can be printed once).
pub(crate) fn with_api_keys(mut cfg: ServerConfig) -> (ServerConfig, Option<String>) {
    // Named clients are keys enough: no unnamed key is generated beside them.
    if !cfg.api_keys.is_empty() || !cfg.clients.is_empty() {
        return (cfg, None);
    }
    if let Some(key) = crate::config::api_key_from_env() {
        cfg.api_keys.push(key);
        return (cfg, None);
    }
    let key = server::generate_api_key();
    cfg.api_keys.push(key.clone());
    (cfg, Some(key))
}
