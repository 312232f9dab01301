//! IndexedCP: files dropped into a folder on one machine reach a central receiver
//! exactly once, byte-identical, whatever happens in between.
//!
//! Code map (DESIGN.md section 2):
//!
//! - [`config`]: raw TOML types (unknown keys refused) validated into an immutable
//!   `Config`. Binds no ports, creates no directories, knows nothing of tasks.
//! - [`protocol`]: header names and JSON shapes shared by client and receiver. No I/O.
//! - [`server`]: the receiver (axum): authentication, path modes, v1 append
//!   sessions, resumable staging and finalize, its own SQLite state. It never
//!   imports the client side.
//! - [`logging`]: the `tracing` subscriber (journald, text or JSON).
//! - [`daemon`]: signals, cancellation, sd_notify and running the roles a config
//!   enables. Owns no domain logic.
//! - [`failpoint`]: named crash points armed by `INDEXEDCP_FAILPOINTS`, for the
//!   fault-injection tests; inert otherwise.
//! - [`cli`]: clap types, dispatch and the mapping of failures to sysexits codes.
//!   Contains no SQL and no protocol logic.
//!
//! Invariants kept on purpose: blocking SQLite and file work never runs on the
//! async executor threads; memory is bounded by chunk size times concurrency, not
//! by file size; nothing is written outside the receiver's output directory.

pub mod agent;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod failpoint;
pub mod ingest;
pub mod logging;
pub mod protocol;
pub mod server;
pub mod spool;
pub mod store;
pub mod upload;
