//! IndexedCP: files dropped into a folder on one machine reach where they
//! belong exactly once, byte-identical, whatever happens in between (offline
//! for days, reboots, crashes, flaky networks, full disks).
//!
//! One binary, `indexedcp`, plays two roles, alone or together. The
//! **agent** watches spool folders, buffers every complete file in a local
//! SQLite store, and drains that buffer to a target with retries. The
//! **receiver** accepts files over HTTP, verifies them and renames each into
//! its output folder once. The crate is also a **library**: [`client`] is the
//! original IndexedCP client's API on the same engine.
//!
//! # Bird's-eye view
//!
//! ```text
//!              SIGHUP / SIGTERM                    sd_notify
//!                    |                                 ^
//!               daemon (supervisor, reload) -----------+
//!              /                    \
//!        agent                        server (receiver, axum)
//!   spool -> ingest -> store -> upload ----HTTP----> /upload, /upload/batch,
//!   (notify,  (hash,   (SQLite  (uploader,            /upload/<id>; staging,
//!    settle)  dispose)  buffer)  Delivery kinds)      verify, rename into place
//! ```
//!
//! A file moves left to right. The spool watcher offers it once it is
//! complete; ingest copies it into the buffer in chunks with their SHA-256
//! and a synced commit, and only then disposes of the source; the uploader
//! sends it through the target's `Delivery` kind
//! and removes it from the buffer only when the peer confirmed the whole
//! file. The receiver writes into a staging folder, checks every byte against
//! the client's hashes and renames the file into place without ever
//! replacing one. The wire protocol is specified in [`protocol`].
//!
//! # The life of a file
//!
//! - A file in a spool is **complete** when it was renamed or moved in (the
//!   recommended way: write elsewhere on the same file system, then `mv`), closed
//!   after writing and then left alone for 25 ms (and not open for writing again,
//!   which the kernel tells by refusing a read lease), or unchanged in size and
//!   mtime for the spool's `settle`. Hidden and temporary names (`.*`, `*.tmp`,
//!   `*.part`, `*.swp`, `*~`), symlinks, FIFOs and devices are never sent.
//! - **Ingest** streams the file into 1 MiB (configurable) chunk rows with a
//!   CRC-32C per chunk and a SHA-256 for the file, in one SQLite transaction committed with
//!   `synchronous=FULL` (files that arrive together share one transaction, up to
//!   256 files or 16 MiB), and only then disposes of the source (`delete`, `move`
//!   to `move_to`, or `keep`). A file that changes while it is read is rolled back
//!   and taken again once it settles. A crash between commit and disposal never
//!   buffers the same file twice (its device, inode, size and mtime are recorded).
//!   A file of four chunks or more is **streamed in** instead: its chunks are
//!   committed (unsynced) every 8 MiB as they are read, so that a receiver that
//!   announces streaming gets them at once, without the file's hash; the last
//!   chunk and the hash come with the synced commit that seals the file, and
//!   only then is the source disposed of and the last chunk sent. A stop before
//!   the seal leaves the source in the spool; the next start removes the
//!   unsealed file and buffers it again.
//!   With `max_buffer_bytes` reached (or the buffer's disk full), ingest pauses:
//!   files wait in the spool, and ingest resumes as uploads free space.
//! - The **uploader** wakes every `check_interval` and right after each ingest,
//!   keeps `concurrency` files per target in flight, and sends each file's chunks
//!   in order to a v1 receiver, up to four at a time to a resumable one (never
//!   more than `chunk_size x concurrency` bytes in flight per target); small files
//!   that are due together share batch requests. A failed chunk waits
//!   `min(initial * multiplier^(n-1), max)` plus up to 10 % jitter (1 s, 2 s,
//!   4 s ... 60 s by default); network errors, timeouts, 5xx, 408, 429
//!   (honouring `Retry-After`) and 422 are retried; 401/403/404/405 are logged as
//!   configuration problems and retried at the maximum delay; other 4xx park the
//!   file as `failed` with the reason until `indexedcp retry`. A file's data
//!   leaves the buffer only when the receiver confirmed the whole file (every
//!   status and what the client does with it: the `protocol` module docs).
//!
//!
//! # Code map
//!
//! Only `client`, `config`, `protocol`, `logging`, `failpoint` and `cli`'s
//! entry point are public; the others are internal, and
//! `cargo doc --document-private-items --open` shows their docs too.
//!
//! - `cli` (`args`, `oneshot` with `oneshot::bucket` for `s3://`, `status`,
//!   `doctor`):
//!   clap types, dispatch, and the one
//!   place where errors become exit codes (sysexits).
//! - `daemon` (`roles`, `reload`, `notify`, `metrics`): the supervisor.
//!   Signals, cancellation, running the roles a config enables, SIGHUP
//!   reloads, sd_notify and the metrics listener. Owns no domain logic.
//! - `agent`: wires spool -> ingest -> store -> upload and applies reloaded
//!   settings to them (the diff of spools and targets).
//!   - `agent::spool` (`watch`, `scan`, `settle`, `filter`, `identity`):
//!     notify watchers, start-up and overflow scans, the settle rule; emits
//!     complete regular files. Never touches SQLite or HTTP.
//!   - `agent::ingest`: streams a complete file into the store, checks it did
//!     not change while read, disposes of the source after the synced commit.
//!     Knows no HTTP.
//!   - `agent::store` (`schema`, `ingest`, `queue`, `admin`, `corrupt`,
//!     `doctor`): the buffer. All the agent's SQL, migrations, the r2d2 pool;
//!     blocking methods that know nothing of tokio, HTTP or the config file;
//!     noticing damage (`corrupt`) and salvaging a damaged buffer (`doctor`).
//!   - `agent::upload`: the uploader (`uploader`, `file`, `batch`, `once`,
//!     `target`), the retry schedule (`backoff`), retry-or-park (`error`), and
//!     the `Delivery` trait with one folder per
//!     kind (`indexedcp`, `s3`, `tus`). The uploader writes no SQL and speaks no HTTP.
//! - `server`: the receiver. `serve` (routes, auth, CORS, shutdown), `v1`,
//!   `resumable`, `batch`, `tus` (tus 1.0.0 at `/files/`), `tls` (HTTPS,
//!   rotation, client certificates), `finalize` (verify, sync, rename into place,
//!   recovery, expiry), `paths` (path modes, writes that stay inside the output
//!   folder), `state` (its own SQLite file), `hashes`, `sha256`, `body`,
//!   `headers`, `errors`, `locks`, `admission` (the connection cap, accept
//!   failures), `audit` (refused keys, logged per address and interval).
//!   Never imports the agent.
//! - [`client`]: the library API (`Client`, callbacks, background uploads) on
//!   the agent's ingest, store and upload; [`client::storage`] is the
//!   original's key-value `Storage`, not the upload buffer.
//! - [`config`]: the TOML file, from raw serde types to a validated, immutable
//!   [`Config`](config::Config); every default lives in [`config::defaults`].
//!   Binds no ports, creates no folders.
//! - [`protocol`]: header names, JSON shapes and the wire spec. No I/O.
//! - Shared and flat: `sqlite` (pool settings, migrations), `metrics`,
//!   [`logging`], `clock`, [`failpoint`] (crash points for the fault tests).
//! - `fuzzing` (public but hidden, not API): the parsers that take untrusted
//!   input, with their invariants, for the fuzz targets in tests/fuzz and the
//!   property tests.
//!
//! # Where things live
//!
//! | concern | module |
//! | --- | --- |
//! | when a spool file counts as complete (the settle rule) | `agent::spool::settle` |
//! | the retry schedule | `agent::upload::backoff` |
//! | retry or park, and parking itself | `agent::upload::error`, `agent::upload::file` |
//! | what leaves the buffer when | `agent::upload::file`, `agent::store::queue` |
//! | staging, verification and the rename into place | `server::finalize`, `server::paths` |
//! | path modes (`sanitize`, `ignore`, `allow-paths`) | `server::paths` |
//! | the reload diff | `daemon::reload` (file, log level, receiver), `agent` (spools, targets) |
//! | sd_notify (READY, RELOADING, STATUS, WATCHDOG) | `daemon::notify` |
//! | exit codes | `cli` |
//! | a damaged buffer: noticing it, stopping ingest, `indexedcp doctor` | `agent::store::corrupt`, `agent` (stop or exit), `agent::store::doctor` |
//!
//! # Invariants
//!
//! - Dependencies point one way: `cli` -> `daemon` -> `agent` / `server` ->
//!   `store` / `protocol` / `config`. Nothing below `cli` imports it; the
//!   agent and the receiver never import each other.
//! - Blocking SQLite, file and hashing work never runs on the async executor
//!   threads (`spawn_blocking` or a dedicated thread).
//! - Memory is bounded by piece size times concurrency, whatever the file
//!   sizes or the length of the queue.
//! - A source is disposed of only after its buffered copy is durable; a
//!   file leaves the buffer only after its peer confirmed all of it.
//! - The receiver writes nothing outside its output folder and never
//!   replaces a file there.
//! - Deliberately absent: the uploader has no HTTP and no `match` on the
//!   kind of target; the spool has no SQL; the store has no tokio; `config`
//!   has no I/O beyond reading its file, key files and certificate files.

#![warn(missing_docs)]

pub(crate) mod agent;
pub mod cli;
pub mod client;
mod clock;
pub mod config;
pub(crate) mod daemon;
mod disk;
pub mod failpoint;
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub(crate) mod metrics;
pub mod protocol;
pub(crate) mod server;
mod sha256;
pub(crate) mod sqlite;
