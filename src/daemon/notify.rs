//! What the daemon tells systemd (`sd_notify`): READY once the roles run,
//! RELOADING around a SIGHUP, STOPPING on the first stop signal, a STATUS line
//! with the agent's queue, and WATCHDOG pings while the agent's ingest and uploader loops are alive.
//! A damaged buffer replaces the queue in the STATUS line with
//! "buffer corrupt", the file and what to do, and a daemon that stops on an
//! error leaves that error as its last STATUS.
//! Every message is best effort: without a notify socket they go nowhere,
//! and a daemon started by hand must run the same.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentProbe};

/// READY=1: start-up is over, or a reload is finished.
pub(super) fn ready() {
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
}

/// RELOADING=1 with the monotonic time systemd asks to go with it.
pub(super) fn reloading() {
    let mut reloading = vec![NotifyState::Reloading];
    reloading.extend(NotifyState::monotonic_usec_now().ok());
    let _ = sd_notify::notify(false, &reloading);
}

/// STATUS=: a line of our own, such as the error the daemon stops with.
pub(super) fn status(line: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Status(line)]);
}

/// STOPPING=1: the first stop signal arrived.
pub(super) fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// Tells systemd how the agent is doing (STATUS=) and, when a watchdog is set,
/// pings it only while the agent's ingest and uploader loops are alive
/// (a loop that died stops the daemon instead, see `agent::Agent::run`).
pub(super) async fn report_status(
    probe: Option<AgentProbe>,
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
        if let Some(damage) = probe.as_ref().and_then(|p| p.corruption.get()) {
            // The queue's figures would come from the damaged file: the
            // damage is what the operator needs to read.
            status(&damage);
        } else if let Some(probe) = &probe {
            let store = probe.store.clone();
            let counts = tokio::task::spawn_blocking(move || {
                Ok::<_, agent::store::StoreError>((
                    store.counts()?,
                    store.buffered_bytes()?,
                    store.last_error()?,
                ))
            });
            // A slow buffer query (a busy disk, a long transaction) costs
            // this STATUS line, never the ping after it: a late ping would
            // get a healthy daemon killed.
            if let Ok(Ok(Ok(((queued, failed, _), bytes, last_error)))) =
                tokio::time::timeout(period / 2, counts).await
            {
                let mut line = format!("{queued} queued ({bytes} bytes), {failed} failed");
                if let Some(error) = last_error {
                    line.push_str("; last error: ");
                    line.push_str(&error);
                }
                let _ = sd_notify::notify(false, &[NotifyState::Status(&line)]);
            }
        }
        let alive = probe.as_ref().is_none_or(AgentProbe::loops_alive);
        if watchdog && alive {
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        }
    }
}

/// The watchdog interval systemd asked for, read as libsystemd's
/// `sd_watchdog_enabled` does: `WATCHDOG_USEC` set and positive, and
/// `WATCHDOG_PID`, when present, naming this process.
///
/// The `sd-notify` crate's `sd_notify::watchdog_enabled` is not used because
/// (in 0.4.5, the version locked) it differs from libsystemd in two ways: it
/// reports no watchdog when `WATCHDOG_PID` is unset, where libsystemd accepts
/// `WATCHDOG_USEC` alone (a wrapper or another supervisor may set only that),
/// so the daemon would never ping and the watchdog would kill it; and it
/// accepts `WATCHDOG_USEC=0`, which libsystemd reads as no watchdog, so the
/// daemon would ping in a loop without pause.
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    match pid {
        Some(pid) if pid.trim().parse::<u32>().ok() != Some(me) => None,
        _ => Some(Duration::from_micros(usec)),
    }
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
