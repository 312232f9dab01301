//! The wall clock as every part of the crate reads it: time since the Unix
//! epoch, never failing (a clock set before 1970 reads as the epoch).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch.
pub(crate) fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// Milliseconds since the Unix epoch: the buffer's timestamps, retry times
/// and heartbeats.
pub(crate) fn now_ms() -> i64 {
    since_epoch().as_millis() as i64
}

/// Whole seconds since the Unix epoch.
pub(crate) fn now_secs() -> i64 {
    since_epoch().as_secs() as i64
}
