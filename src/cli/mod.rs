//! The command line: parsing (in `args`), dispatch to the commands, and
//! the mapping of every failure to a sysexits exit code, which is decided
//! here and nowhere else. No SQL and no protocol logic lives in the command
//! line: the one-shot commands (`oneshot`) drive the library's `Client`,
//! the status commands (`status`) read the agent's `Store`, and `daemon` and
//! `server` hand over to the `daemon` module.
//!
//! # The one-shot commands in detail
//!
//! - Each file is first buffered (chunked, hashed, in one SQLite transaction), then
//!   sent under its base name with the daemon's engine and protocol; the source is
//!   left alone. A URL without a path gets `/upload`. One line per delivered file,
//!   `FILE -> NAME ON THE SERVER` (the receiver may pick another name when one is
//!   taken), goes to stdout; on a terminal, progress bars (one per file and a
//!   total) are drawn on stderr.
//! - The buffer is `~/.indexcp/db/client.db` (created on first use) unless
//!   `--storage PATH` names another, or a config file (`--config`, or
//!   `/etc/indexedcp/indexedcp.toml` when it exists) points at a daemon's.
//!   `status`, `retry` and `purge` work on the same buffer.
//! - An unreachable receiver is retried `--max-retries` times (default 3), after
//!   `--retry-delay` (default 1s) doubling up to 30s; then the command exits 69
//!   and the files stay buffered, and running the same command again resumes
//!   them. Ctrl-C does the same (exit 130). Running it again never sends a file
//!   twice: a file still waiting in the buffer unchanged is not buffered a second
//!   time. Once a file was delivered, copying it again sends a new copy, as `cp`
//!   would. A file the receiver refuses (too large, an invalid name) is parked;
//!   `status` shows why and `retry` re-queues it after the cause is fixed.
//!
//! Exit codes: 0 all delivered (or nothing was waiting); 64 usage error (unknown
//! option, no `--server`, no API key via `--api-key` or `INDEXEDCP_API_KEY`, a
//! non-http(s) URL); 65 a named file is missing, a directory or unreadable
//! (nothing is buffered then), or a file was refused (parked); 69 the receiver
//! stayed unreachable (files stay buffered); 74 the buffer cannot be created or
//! written; 78 the receiver refused the key or URL (401, 403, 404, 405); 130
//! interrupted (the rest stays buffered).
//!
//! The daemon exits 65 when its buffer is damaged (SQLite reports
//! `SQLITE_CORRUPT` or `SQLITE_NOTADB`, at start or later) unless
//! `daemon.on_buffer_corrupt = "stop-ingest"`; `status` exits 65 when the
//! buffer is known to be damaged. `doctor` exits 0 when the buffer was sound
//! or every waiting file was saved, 65 when a waiting file was lost, 75
//! (EX_TEMPFAIL) when another process has the buffer open, 74 when it cannot
//! write the fresh buffer.
//!

mod args;
mod doctor;
mod oneshot;
mod status;

use clap::{CommandFactory, Parser};
use tokio_util::sync::CancellationToken;

use crate::agent::AgentError;
use crate::config::{Config, LogFormat};
use crate::daemon::{self, DaemonError};
use crate::logging;
use crate::server::{ReceiverOptions, ServerError};
use args::{Cli, Command};

/// Exit codes (sysexits.h).
pub(crate) mod exit {
    pub(crate) const OK: i32 = 0;
    pub(crate) const USAGE: i32 = 64;
    pub(crate) const DATA_ERR: i32 = 65;
    pub(crate) const UNAVAILABLE: i32 = 69;
    pub(crate) const SOFTWARE: i32 = 70;
    pub(crate) const IO_ERR: i32 = 74;
    /// Try again later (EX_TEMPFAIL): `doctor` found the buffer in use.
    pub(crate) const TEMP_FAIL: i32 = 75;
    pub(crate) const CONFIG: i32 = 78;
    /// The agent's buffer is damaged (EX_DATAERR): `daemon` stops with it
    /// (unless `daemon.on_buffer_corrupt = "stop-ingest"`), `status` reports
    /// it, and `doctor` returns it when a waiting file could not be saved.
    pub(crate) const BUFFER_CORRUPT: i32 = DATA_ERR;
    /// Interrupted by Ctrl-C (128 + SIGINT), as shells report it.
    pub(crate) const INTERRUPTED: i32 = 130;
}

/// A failure that ends the process: the message for stderr and the exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) code: i32,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn config(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::CONFIG,
            message: message.into(),
        }
    }
    pub(crate) fn io(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::IO_ERR,
            message: message.into(),
        }
    }
    pub(crate) fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::USAGE,
            message: message.into(),
        }
    }
    pub(crate) fn software(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::SOFTWARE,
            message: message.into(),
        }
    }
    pub(crate) fn data(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::DATA_ERR,
            message: message.into(),
        }
    }
}

/// Parses the arguments, runs the command, and returns the process exit code.
pub fn main_with_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let args = args::expand_cp_style(args.into_iter().collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    if !matches!(cli.command, Command::Daemon(_) | Command::Server(_)) {
        die_quietly_on_broken_pipe();
    }
    match run(cli) {
        Ok(()) => exit::OK,
        Err(failure) => {
            eprintln!("indexedcp: {}", failure.message);
            failure.code
        }
    }
}

/// Gives SIGPIPE back its default action, so that a command whose reader went
/// away (`indexedcp status | head -1`) ends quietly, as `ls` or `cat` do,
/// instead of panicking in `println!` on EPIPE. The Rust runtime ignores
/// SIGPIPE before `main`; the short commands that print are safe to stop at
/// any write (the buffer's changes are SQLite transactions). The daemon and
/// the receiver keep it ignored: they must outlive a closed stdout or
/// journald stream, and they print through writes that tolerate EPIPE.
fn die_quietly_on_broken_pipe() {
    // SAFETY: signal() with SIG_DFL installs no handler and touches no memory.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The exit code for a daemon or receiver that stopped or could not start:
/// the configuration has to change (78), the machine refused a resource (74),
/// the agent's buffer is damaged (65, `exit::BUFFER_CORRUPT`: run
/// `indexedcp doctor`), or a task panicked or one of the agent's loops died,
/// which is a bug (70).
fn daemon_failure(error: DaemonError) -> Failure {
    let code = match &error {
        DaemonError::Agent(AgentError::BufferCorrupt { .. }) => exit::BUFFER_CORRUPT,
        DaemonError::Agent(AgentError::Store(e)) if e.is_corrupt() => exit::BUFFER_CORRUPT,
        DaemonError::NoRole { .. } => exit::CONFIG,
        DaemonError::Agent(AgentError::Target { .. }) => exit::CONFIG,
        DaemonError::Agent(
            AgentError::StateDir { .. } | AgentError::Store(_) | AgentError::Spool { .. },
        ) => exit::IO_ERR,
        DaemonError::Receiver(ServerError::CrossDevice { .. } | ServerError::Settings(_)) => {
            exit::CONFIG
        }
        DaemonError::Receiver(_) => exit::IO_ERR,
        DaemonError::Signals(_)
        | DaemonError::MetricsListen { .. }
        | DaemonError::ListenAddress(_) => exit::IO_ERR,
        DaemonError::RolePanicked(_)
        | DaemonError::Task(_)
        | DaemonError::Agent(AgentError::LoopDied { .. }) => exit::SOFTWARE,
    };
    Failure {
        code,
        message: error.to_string(),
    }
}

/// The runtime of the commands that need one; a runtime that cannot start
/// (no threads or file descriptors left) is an I/O failure.
fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::io(format!("cannot start the async runtime: {e}")))
}

/// Loads and validates a config file; every way it can be wrong is a
/// configuration failure.
fn load_config(path: &std::path::Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| Failure::config(e.to_string()))
}

/// Runs one parsed command to its end.
fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Upload(args) => oneshot::upload(args),
        Command::Add(args) => oneshot::add(args),
        Command::Completions(args) => {
            let mut command = Cli::command();
            clap_complete::generate(
                args.shell,
                &mut command,
                "indexedcp",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::CheckConfig(arg) => {
            let config = load_config(&arg.config)?;
            print!("{}", config.to_effective_toml());
            eprintln!("indexedcp: {} is valid", arg.config.display());
            Ok(())
        }
        Command::Status(args) => status::status(args),
        Command::Retry(args) => status::retry(args),
        Command::Purge(args) => status::purge(args),
        Command::Doctor(args) => doctor::doctor(args),
        Command::Daemon(arg) => {
            let config = load_config(&arg.config)?;
            logging::init(Some(&config.daemon.log_level), config.daemon.log_format);
            runtime()?
                .block_on(daemon::run(&arg.config, config))
                .map_err(daemon_failure)
        }
        Command::Server(args) => {
            let cfg = args.server_config()?;
            logging::init(None, LogFormat::Auto);
            let rt = runtime()?;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                let (reload_tx, reloads) = tokio::sync::mpsc::channel(4);
                let signals = daemon::spawn_signal_handler(shutdown.clone(), Some(reload_tx))
                    .map_err(daemon_failure)?;
                let (cfg, generated) = daemon::with_api_keys(cfg);
                let options = ReceiverOptions {
                    read_timeout: args.read_timeout,
                };
                let result = daemon::run_receiver(
                    &cfg,
                    &options,
                    generated.as_deref(),
                    shutdown,
                    args.shutdown_grace,
                    reloads,
                )
                .await;
                signals.abort();
                result.map_err(daemon_failure)
            })
        }
    }
}
