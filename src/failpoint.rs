//! Crash points for the fault-injection tests: named places at the step
//! boundaries where a crash is most dangerous (after the buffer commit and
//! before disposal, after a 2xx and before the chunk is marked, after the
//! receiver's fsync and before the rename, ...), and places where a task can
//! be made to panic, to prove the daemon notices.
//!
//! They exist only in a build with the `failpoints` cargo feature, which
//! `cargo test` turns on (the crate is its own dev-dependency with that
//! feature) and `cargo build --release` does not: an environment variable
//! must never be able to crash a production daemon. Without the feature
//! [`hit`] is an empty function and the variable is ignored.
//!
//! With the feature, `INDEXEDCP_FAILPOINTS=name[,name...]` makes the process
//! abort (as abruptly as SIGKILL: no destructors, no flushing) the first time
//! it reaches one of the names, and `name=panic` makes the task that reaches
//! it panic, once (later hits pass). Unset, a failpoint costs one load of an
//! initialised `OnceLock`. The names are the constants below; tests use them
//! to prove that a crash at each boundary loses, duplicates and corrupts
//! nothing, and that a panicked task is seen.

/// The environment variable that arms failpoints.
pub const ENV: &str = "INDEXEDCP_FAILPOINTS";

/// Whether this build has failpoints (the `failpoints` feature).
pub const COMPILED: bool = cfg!(feature = "failpoints");

/// Ingest: the buffered copy is committed, the source not yet disposed of.
pub const INGEST_AFTER_COMMIT: &str = "ingest-after-commit";
/// Ingest: a large file streamed into the buffer is read whole, its chunks
/// but the last committed (and perhaps sent), the file not yet sealed.
pub const INGEST_BEFORE_SEAL: &str = "ingest-before-seal";
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

/// Receiver: a tus upload's last bytes are recorded, the upload is not yet
/// sealed for completion (not in [`ALL`]: only tus uploads reach it).
pub const SERVER_TUS_AFTER_LAST_RECORD: &str = "server-tus-after-last-record";

/// Every crash point between two durable steps, for tests that try them all.
pub const ALL: [&str; 7] = [
    INGEST_AFTER_COMMIT,
    INGEST_BEFORE_SEAL,
    INGEST_AFTER_DISPOSE,
    UPLOAD_AFTER_ACK,
    UPLOAD_AFTER_COMPLETE,
    SERVER_BEFORE_RENAME,
    SERVER_AFTER_RENAME,
];

/// Upload: an attempt's task starts, before it sends anything (arm it with
/// `=panic` to panic an attempt).
pub const UPLOAD_ATTEMPT: &str = "upload-attempt";
/// Upload: the uploader loop goes round (arm it with `=panic` to kill the
/// loop).
pub const UPLOADER_LOOP: &str = "uploader-loop";
/// Ingest: the agent's ingest loop takes a batch of files from the spools
/// (arm it with `=panic` to kill the loop).
pub const INGEST_LOOP: &str = "ingest-loop";

/// Aborts the process, or panics, if the failpoint `name` is armed; does
/// nothing in a build without the `failpoints` feature.
#[inline(always)]
pub fn hit(name: &str) {
    #[cfg(feature = "failpoints")]
    armed::hit(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(feature = "failpoints")]
mod armed {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// One armed failpoint: its name, and for a panic point whether it fired.
    struct Armed {
        name: String,
        panic: Option<AtomicBool>,
    }

    fn armed() -> &'static [Armed] {
        static ARMED: OnceLock<Vec<Armed>> = OnceLock::new();
        ARMED.get_or_init(|| {
            std::env::var(super::ENV)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| match s.strip_suffix("=panic") {
                            Some(name) => Armed {
                                name: name.to_owned(),
                                panic: Some(AtomicBool::new(false)),
                            },
                            None => Armed {
                                name: s.to_owned(),
                                panic: None,
                            },
                        })
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    pub(super) fn hit(name: &str) {
        for armed in armed().iter().filter(|a| a.name == name) {
            match &armed.panic {
                None => {
                    eprintln!("indexedcp: failpoint {name} reached: aborting");
                    std::process::abort();
                }
                Some(fired) => {
                    if !fired.swap(true, Ordering::SeqCst) {
                        panic!("failpoint {name} reached: panicking");
                    }
                }
            }
        }
    }
}
