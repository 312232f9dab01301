//! Logger set-up: `tracing` to journald when running under systemd, to stderr as
//! text (or JSON) otherwise. The level comes from `INDEXEDCP_LOG_LEVEL`, then the
//! configuration, then `info`; it accepts the original's level names (`fatal` means
//! `error`) or any `RUST_LOG`-style filter.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

/// Environment variable that overrides the configured log level.
pub const LOG_LEVEL_ENV: &str = "INDEXEDCP_LOG_LEVEL";

/// Turns a level or filter string into a filter, mapping `fatal` to `error`.
pub fn filter_from(level: &str) -> EnvFilter {
    let level = level.trim();
    let level = if level.eq_ignore_ascii_case("fatal") {
        "error"
    } else {
        level
    };
    EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The effective level: the environment wins over `configured`.
pub fn effective_level(configured: Option<&str>) -> String {
    std::env::var(LOG_LEVEL_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| configured.map(str::to_owned))
        .unwrap_or_else(|| "info".to_owned())
}

fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

/// Installs the global subscriber. Safe to call once per process; later calls
/// are ignored (tests in one process may call it repeatedly).
pub fn init(configured_level: Option<&str>, format: LogFormat) {
    let filter = filter_from(&effective_level(configured_level));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = RELOAD.set(handle);
    let registry = tracing_subscriber::registry().with(filter);
    let want_journald = match format {
        LogFormat::Journald => true,
        LogFormat::Auto => under_systemd(),
        LogFormat::Text | LogFormat::Json => false,
    };
    if want_journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                let _ = registry
                    .with(layer.with_syslog_identifier("indexedcp".into()))
                    .try_init();
                return;
            }
            Err(e) => eprintln!("indexedcp: journald is not reachable ({e}); logging to stderr"),
        }
    }
    if format == LogFormat::Json {
        let _ = registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init();
    } else {
        let _ = registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_writer(std::io::stderr),
            )
            .try_init();
    }
}

static RELOAD: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Changes the level of the running subscriber (on SIGHUP); the environment
/// variable still wins. Returns the level now in force.
pub fn set_level(configured_level: &str) -> String {
    let level = effective_level(Some(configured_level));
    if let Some(handle) = RELOAD.get() {
        let _ = handle.modify(|filter| *filter = filter_from(&level));
    }
    level
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_maps_to_error_and_filters_pass_through() {
        assert_eq!(filter_from("fatal").to_string(), "error");
        assert_eq!(
            filter_from("indexedcp=debug,info").to_string(),
            "indexedcp=debug,info"
        );
        assert_eq!(filter_from("not a filter ===").to_string(), "info");
    }
}
