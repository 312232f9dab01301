//! The receiver: an axum application that accepts files on `POST /upload`
//! and `POST /upload/batch`, verifies them and puts finished files into the
//! output directory, never replacing a file already there.
//!
//! Three kinds of request share it. A v1 request (no `X-Upload-Id`, see
//! `v1`) appends to the file of its client file name's current session, as
//! the original servers do, but with sessions kept in SQLite and a new file
//! for every chunk 0; each chunk's bytes are synced, then its session is
//! recorded with a synced commit, and only then is it acknowledged. A
//! resumable request (see `resumable`) writes its chunk at its offset into a
//! staging file under the state directory and records it, neither synced: a
//! crash of the process loses neither, and what a power cut loses is sent
//! again or caught by the whole-file check. A batch (see `batch`) carries
//! whole small files, each the single chunk of its own upload id.
//!
//! A resumable upload or a file of a batch reaches its final name only whole
//! and verified (see `finalize`): its data and the staging directory are
//! synced; its final name is recorded, in phase finalizing, with a synced
//! commit; it is renamed without replacing anything; the destination and
//! staging directories are synced; and only then is it recorded complete, in
//! a commit that need not be synced, since the finalizing record and the
//! missing staged file let recovery record it again. So a SIGKILL or a power
//! cut at any moment never leaves a partial file under a final name, and a
//! file the client was told is complete is still there after a power cut. A
//! batch takes those steps for all its new files together: one sync per
//! file's data, one synced commit for all their final names, one sync per
//! directory, and one unsynced commit for their completion.
//!
//! This module holds the [`Receiver`] (configuration, state database,
//! directory descriptors, and the hashes and locks shared by every receiver
//! of the process) and the helpers every protocol uses. `serve` owns the
//! routes, the key check and the listener; `tls` the HTTPS settings and
//! handshakes; `admission` the connection slots
//! (`max_connections`) and accept failures; `audit` the log of refused keys;
//! `errors` the replies to refused requests; `headers` the parsing of request
//! headers; `locks` the keyed locks; `paths` the file names and directory
//! operations; `state` the SQLite records; `body` (the bounded writer
//! threads), `hashes` and `sha256` the streaming of bodies to disk and their
//! hashes. None of it imports the sending side (`agent`, `client`).

mod admission;
mod audit;
mod batch;
mod body;
mod errors;
mod finalize;
#[doc(hidden)]
pub(crate) mod fuzzing;
mod hashes;
mod headers;
mod locks;
mod paths;
mod resumable;
mod serve;
mod state;
mod tls;
mod tus;
mod v1;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{NamedClient, OutputLayout, PathMode, ServerConfig};
use errors::ApiError;
use hashes::FileHashes;
use locks::{KeyedLocks, UPLOAD_LOCKS};
use paths::{Destination, InvalidName};
use state::UploadState;

pub use errors::ServerError;
pub use serve::{bind, serve_reloadable};

/// How long a client may take to send its request headers, and to send each
/// piece of a body, before the connection is closed.
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Run-time options of the receiver that are not part of the config file.
#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    pub read_timeout: Duration,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            read_timeout: DEFAULT_READ_TIMEOUT,
        }
    }
}

/// Generates a random 256-bit API key as 64 hex characters, as the original does
/// when no key is configured.
pub fn generate_api_key() -> String {
    paths::random_hex(32)
}

/// The receiver's shared state, cheap to clone into handlers.
#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Inner>,
}

struct Inner {
    keys: Vec<Vec<u8>>,
    path_mode: PathMode,
    max_chunk_bytes: u64,
    max_file_bytes: u64,
    incomplete_expiry: Duration,
    read_timeout: Duration,
    max_connections: usize,
    tus_path: String,
    /// HTTPS only, when `[server] tls_cert` is set.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Named clients (`[[server.client]]`); a reload that drops one revokes
    /// it for every request from then on.
    clients: Vec<NamedClient>,
    output_layout: OutputLayout,
    state: UploadState,
    root: OwnedFd,
    staging: OwnedFd,
    staging_path: PathBuf,
    /// The state directory's first component when it lies inside the output
    /// directory: no client file may be written there.
    reserved: Option<String>,
    /// Whole-file hashes of uploads in progress, advanced as chunks arrive;
    /// shared by every `Receiver` of the process with this staging directory,
    /// since requests still running on a receiver replaced by a reload write
    /// the same files.
    hashes: Arc<FileHashes>,
    /// Shared by every `Receiver` of the process: after a reload, the new
    /// receiver's recovery waits for requests still running on the old one.
    locks: &'static KeyedLocks,
}

impl Receiver {
    /// Opens (creating as needed) the output and state directories and the state
    /// database. `api_keys` must not be empty; see [`generate_api_key`].
    pub fn open(cfg: &ServerConfig, options: &ReceiverOptions) -> Result<Receiver, ServerError> {
        create_dir(&cfg.output_dir, "the output directory")?;
        let staging_path = cfg.state_dir.join("staging");
        create_dir(&staging_path, "the staging directory")?;
        let dev = |p: &Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::dev(&m));
        if let (Ok(a), Ok(b)) = (dev(&cfg.output_dir), dev(&staging_path))
            && a != b
        {
            return Err(ServerError::CrossDevice {
                state_dir: cfg.state_dir.clone(),
                output_dir: cfg.output_dir.clone(),
            });
        }
        let state = UploadState::open(&cfg.state_dir.join("uploads.db"))?;
        let root = paths::open_root(&cfg.output_dir).map_err(|source| ServerError::CreateDir {
            what: "the output directory",
            path: cfg.output_dir.clone(),
            source,
        })?;
        let staging = paths::open_root(&staging_path).map_err(|source| ServerError::CreateDir {
            what: "the staging directory",
            path: staging_path.clone(),
            source,
        })?;
        let hashes = hashes::for_staging_dir(&staging_path);
        let tls = cfg.tls.as_ref().map(tls::acceptor).transpose()?;
        let reserved = reserved_component(&cfg.output_dir, &cfg.state_dir);
        if cfg.output_layout == OutputLayout::ByClient
            && let Some(clash) = cfg
                .clients
                .iter()
                .find(|c| Some(&c.name) == reserved.as_ref())
        {
            return Err(ServerError::Settings(format!(
                "client {:?} would share its folder with the receiver's state directory {}; rename the client or move server.state_dir",
                clash.name,
                cfg.state_dir.display()
            )));
        }
        Ok(Receiver {
            inner: Arc::new(Inner {
                keys: cfg.api_keys.iter().map(|k| k.as_bytes().to_vec()).collect(),
                path_mode: cfg.path_mode,
                max_chunk_bytes: cfg.max_chunk_bytes,
                max_file_bytes: cfg.max_file_bytes,
                incomplete_expiry: cfg.incomplete_expiry,
                read_timeout: options.read_timeout,
                max_connections: cfg.max_connections,
                tus_path: cfg.tus_path.clone(),
                tls,
                clients: cfg.clients.clone(),
                output_layout: cfg.output_layout,
                state,
                root,
                staging,
                staging_path,
                reserved,
                hashes,
                locks: &UPLOAD_LOCKS,
            }),
        })
    }

    /// The name an upload is recorded under: with the `by-client` layout,
    /// the file name behind the sending client's name and a `/` (nothing
    /// before the `/` for an unnamed key), so that the record says whose it
    /// is and [`Receiver::destination`] puts it in that client's folder.
    fn recorded_name(&self, sender: &serve::Authorized, file_name: &str) -> String {
        match self.inner.output_layout {
            OutputLayout::Flat => file_name.to_owned(),
            OutputLayout::ByClient => {
                format!("{}/{file_name}", sender.client.as_deref().unwrap_or(""))
            }
        }
    }

    /// Where a recorded name goes in the output directory, by the configured
    /// path mode (and, with the `by-client` layout, in its client's folder);
    /// a name the mode refuses is a 400 reply.
    fn destination(&self, recorded_name: &str) -> Result<Destination, ApiError> {
        let (client, file_name) = match self.inner.output_layout {
            OutputLayout::ByClient => match recorded_name.split_once('/') {
                Some((client, file_name)) => (client, file_name),
                None => ("", recorded_name),
            },
            OutputLayout::Flat => ("", recorded_name),
        };
        let mut dest = paths::destination_for(
            self.inner.path_mode,
            file_name,
            self.inner.reserved.as_deref(),
        )
        .map_err(|InvalidName(message)| ApiError::InvalidName(message))?;
        if !client.is_empty() {
            dest.dirs.insert(0, client.to_owned());
        }
        Ok(dest)
    }

    /// Removes an upload's staging file and forgets its whole-file hash.
    fn discard_staged(&self, upload_id: &str) {
        self.inner.hashes.forget(upload_id);
        let _ = rustix::fs::unlinkat(&self.inner.staging, upload_id, rustix::fs::AtFlags::empty());
    }
}

fn create_dir(path: &Path, what: &'static str) -> Result<(), ServerError> {
    std::fs::create_dir_all(path).map_err(|source| ServerError::CreateDir {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The first component of `state_dir` below `output_dir`, if it lies inside.
fn reserved_component(output_dir: &Path, state_dir: &Path) -> Option<String> {
    let out = std::fs::canonicalize(output_dir).ok()?;
    let state = std::fs::canonicalize(state_dir).ok()?;
    let rest = state.strip_prefix(&out).ok()?;
    rest.components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
}

/// Short blocking calls (database, file system) of every receiver of the
/// process running at once. With the writers' limit (see `body`) this bounds
/// the receiver's threads however many requests arrive together: a burst of a
/// thousand requests waits for slots rather than starting a thread each.
const BLOCKING_SLOTS: usize = 64;

static BLOCKING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BLOCKING_SLOTS);

/// Runs `f` on the blocking pool, since database and file-system calls must not
/// hold up the executor, once one of the [`BLOCKING_SLOTS`] is free; a panic
/// in `f` becomes a 500 reply.
async fn blocking<T: Send + 'static, E: Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    ApiError: From<E>,
{
    let Ok(slot) = BLOCKING.acquire().await else {
        unreachable!("the blocking slots are never closed");
    };
    // The request's span (which names its client) goes along, so that the
    // blocking work's log lines say whose upload they are about.
    let span = tracing::Span::current();
    let task = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let _span = span.enter();
        f()
    });
    match task.await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::Internal(format!("blocking task failed: {e}"))),
    }
}
