//! SIGHUP: re-read the configuration file, validate it, and apply what
//! changed. An invalid file changes nothing (every error is logged and the
//! running configuration is kept). A valid one updates the log level and the
//! receiver here; the agent applies its part itself when the new
//! configuration reaches it. The `server` command, started with flags and no
//! file, has only its certificate files to re-read: [`reload_certificate`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::notify;
use super::roles::{RoleSet, ServerRole, bind_and_announce, open_receiver, spawn_listener};
use crate::config::{Config, ServerConfig, ServerTls};
use crate::logging;
use crate::server::{Receiver, ReceiverOptions};

/// SIGHUP for the `server` command: re-reads `--tls-cert`, `--tls-key` and
/// `--tls-client-ca` from the paths it was started with, and serves new
/// connections with them. Files that cannot be read, hold no certificate or
/// key, or do not make a usable pair (a renewal caught half-copied) are
/// logged and change nothing: the running certificate stays.
pub(crate) async fn reload_certificate(
    cfg: &mut ServerConfig,
    options: &ReceiverOptions,
    receivers: &watch::Sender<Receiver>,
) {
    let Some(tls) = &cfg.tls else {
        tracing::info!("SIGHUP received; nothing to reload (no --tls-cert, and no config file)");
        return;
    };
    notify::reloading();
    let (cert, key) = (tls.cert.path.clone(), tls.key.path.clone());
    let client_ca = tls.client_ca.as_ref().map(|ca| ca.path.clone());
    let read = tokio::task::spawn_blocking(move || {
        ServerTls::from_files(&cert, &key, client_ca.as_deref())
    })
    .await;
    match read {
        Ok(Ok(new_tls)) if Some(&new_tls) == cfg.tls.as_ref() => {
            tracing::info!("certificate files unchanged; nothing reloaded");
        }
        Ok(Ok(new_tls)) => {
            let mut new = cfg.clone();
            new.tls = Some(new_tls);
            match open_receiver(&new, options).await {
                Ok(receiver) => {
                    receivers.send_replace(receiver);
                    *cfg = new;
                    tracing::info!("certificate reloaded; new connections use it");
                }
                Err(e) => {
                    tracing::error!(error = %e, "reload: certificate kept")
                }
            }
        }
        Ok(Err(e)) => tracing::error!("reload: certificate kept: {e}"),
        Err(e) => tracing::error!(error = %e, "reload task failed; certificate kept"),
    }
    notify::ready();
}

/// Re-reads the config file. Invalid: every error is logged and `None` keeps the
/// running config. Valid: the receiver and the log level are updated here, and
/// the new config is returned for the agent to apply.
pub(super) async fn reload(
    path: &Path,
    current: &Arc<Config>,
    server: &mut Option<ServerRole>,
    roles: &mut RoleSet,
    shutdown: &CancellationToken,
) -> Option<Arc<Config>> {
    notify::reloading();
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
    notify::ready();
    outcome
}

impl ServerRole {
    /// Applies a changed `[server]`: new connections get the new settings; a new
    /// listen address gets a new listener before the old one stops accepting.
    /// Requests in flight finish on the settings they started with.
    async fn reload(
        &mut self,
        new: &ServerConfig,
        grace: Duration,
        roles: &mut RoleSet,
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
            spawn_listener(
                listener,
                self.receivers.subscribe(),
                accepting.clone(),
                grace,
                roles,
            );
            self.accepting.cancel();
            self.accepting = accepting;
            changes.push(format!("listening on {}", new.listen));
        }
        self.receivers.send_replace(receiver);
        self.config = new;
        changes
    }
}
