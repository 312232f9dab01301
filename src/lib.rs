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
//! - [`spool`]: notify watchers, start-up/overflow scans and the settle rule; emits
//!   complete regular files. Never touches SQLite or HTTP.
//! - [`ingest`]: streams a complete file into the store (one transaction, SHA-256
//!   per chunk and per file), then disposes of the source. Knows no HTTP.
//! - [`store`]: the agent's SQLite buffer (r2d2 pool, WAL, migrations): every SQL
//!   statement of the agent. Blocking methods; knows nothing of tokio or HTTP.
//! - [`upload`]: the HTTP client side, the retry schedule, retry-or-park
//!   decisions and the uploader loop. Writes no SQL.
//! - [`agent`]: wires spool -> ingest -> store -> upload for the daemon, and
//!   applies reloaded configs to them.
//! - [`sqlite`]: the pool settings (WAL, `synchronous=FULL` with an explicit
//!   unsynced mode for records a peer can tell again, busy timeout, page size,
//!   automatic checkpoints or not) and `user_version` migrations every
//!   database here shares; no SQL of its own.
//! - [`metrics`]: process-wide counters and the Prometheus text for `/metrics`.
//! - [`client`]: the original's library API (`Client`: add files, upload them
//!   with retries, callbacks, a background uploader) on `ingest`, `store` and
//!   `upload`; the one-shot CLI commands are built on it.
//! - [`storage`]: the original's async key-value `Storage` trait and its SQLite
//!   backend, for applications; not the upload buffer (that is `store`).
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
pub mod client;
pub mod config;
pub mod daemon;
pub mod failpoint;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod sqlite;
