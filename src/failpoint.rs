//! Crash points for the fault-injection tests: named places at the step
//! boundaries where a crash is most dangerous (after the buffer commit and
//! before disposal, after a 2xx and before the chunk is marked, after the
//! receiver's fsync and before the rename, ...).
//!
//! `INDEXEDCP_FAILPOINTS=name[,name...]` makes the process abort (as abruptly as
//! SIGKILL: no destructors, no flushing) the first time it reaches one of the
//! names. Unset, a failpoint costs one load of an initialised `OnceLock`. The
//! names are the constants below; tests use them to prove that a crash at each
//! boundary loses, duplicates and corrupts nothing.

use std::sync::OnceLock;

/// The environment variable that arms failpoints.
pub const ENV: &str = "INDEXEDCP_FAILPOINTS";

/// Ingest: the buffered copy is committed, the source not yet disposed of.
pub const INGEST_AFTER_COMMIT: &str = "ingest-after-commit";
/// Ingest: the source is disposed of, nothing else recorded yet.
pub const INGEST_AFTER_DISPOSE: &str = "ingest-after-dispose";
/// Upload: the receiver acknowledged a chunk, the store does not know yet.
pub const UPLOAD_AFTER_ACK: &str = "upload-after-ack";
/// Upload: the receiver confirmed the file, the store does not know yet.
pub const UPLOAD_AFTER_COMPLETE: &str = "upload-after-complete";
/// Receiver: the staged file is verified and synced, not yet renamed.
pub const SERVER_BEFORE_RENAME: &str = "server-before-rename";
/// Receiver: the file is renamed into place, its completion not yet recorded.
pub const SERVER_AFTER_RENAME: &str = "server-after-rename";

/// Every failpoint, for tests that try them all.
pub const ALL: [&str; 6] = [
    INGEST_AFTER_COMMIT,
    INGEST_AFTER_DISPOSE,
    UPLOAD_AFTER_ACK,
    UPLOAD_AFTER_COMPLETE,
    SERVER_BEFORE_RENAME,
    SERVER_AFTER_RENAME,
];

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(ENV)
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Aborts the process if the failpoint `name` is armed.
pub fn hit(name: &str) {
    if armed().iter().any(|armed| armed == name) {
        eprintln!("indexedcp: failpoint {name} reached: aborting");
        std::process::abort();
    }
}
