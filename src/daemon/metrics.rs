//! The daemon's metrics listener: `GET /metrics` in the Prometheus text
//! format, the process-wide counters of [`crate::metrics`] plus per-target
//! queue gauges read from the agent's buffer when the agent role runs, and
//! `indexedcp_buffer_corrupt` (1 once the buffer was found damaged).

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use super::{DaemonError, roles::RoleSet};
use crate::agent::AgentProbe;
use crate::metrics::{self, QueueGauge};

/// Binds `addr` and serves `/metrics` on it as one of the daemon's roles,
/// until `shutdown`.
pub(super) async fn spawn(
    addr: SocketAddr,
    probe: Option<AgentProbe>,
    roles: &mut RoleSet,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::MetricsListen { addr, source })?;
    tracing::info!(%addr, "serving metrics at /metrics");
    roles.spawn(async move {
        serve(listener, probe, shutdown).await;
        Ok(())
    });
    Ok(())
}

/// Serves `/metrics` (Prometheus text) until `shutdown`.
async fn serve(
    listener: tokio::net::TcpListener,
    probe: Option<AgentProbe>,
    shutdown: CancellationToken,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let probe = probe.clone();
            async move {
                let corrupt = probe.as_ref().map(|p| p.corruption.get().is_some());
                let queues = match probe {
                    Some(probe) if corrupt != Some(true) => {
                        tokio::task::spawn_blocking(move || probe.store.target_queues())
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .unwrap_or_default()
                    }
                    _ => Vec::new(),
                };
                let now = crate::clock::now_ms();
                let gauges: Vec<QueueGauge> = queues
                    .into_iter()
                    .map(|q| QueueGauge {
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
                    metrics::render(&gauges) + &corrupt_gauge(corrupt),
                )
            }
        }),
    );
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
}

/// The `indexedcp_buffer_corrupt` gauge, when the agent role runs: 1 once a
/// statement met damage in the buffer (or its check at start found some),
/// which stops ingest until `indexedcp doctor` repaired it.
fn corrupt_gauge(corrupt: Option<bool>) -> String {
    match corrupt {
        Some(corrupt) => format!(
            "# HELP indexedcp_buffer_corrupt 1 when the agent's buffer is damaged: ingest is stopped; run indexedcp doctor.\n\
             # TYPE indexedcp_buffer_corrupt gauge\n\
             indexedcp_buffer_corrupt {}\n",
            u8::from(corrupt)
        ),
        None => String::new(),
    }
}
