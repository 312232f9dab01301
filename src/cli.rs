//! The command line (DESIGN.md section 4): clap types, dispatch, and the mapping
//! of failures to sysexits exit codes. No SQL and no protocol logic lives here.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, LogFormat, PathMode, ServerConfig};
use crate::daemon;
use crate::logging;
use crate::server::ReceiverOptions;
use crate::store::{FileRecord, Store};

/// Exit codes (sysexits.h).
pub mod exit {
    pub const OK: i32 = 0;
    pub const USAGE: i32 = 64;
    pub const DATA_ERR: i32 = 65;
    pub const UNAVAILABLE: i32 = 69;
    pub const SOFTWARE: i32 = 70;
    pub const IO_ERR: i32 = 74;
    pub const CONFIG: i32 = 78;
}

/// A failure that ends the process: the message for stderr and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn config(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::CONFIG,
            message: message.into(),
        }
    }
    pub fn io(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::IO_ERR,
            message: message.into(),
        }
    }
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::USAGE,
            message: message.into(),
        }
    }
    pub fn software(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::SOFTWARE,
            message: message.into(),
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "indexedcp",
    version,
    about = "Files dropped into a folder reach a central receiver exactly once, byte-identical",
    after_help = "Examples:\n  indexedcp daemon --config config/quickstart.toml\n  indexedcp server --port 3000 --output-dir ./received --api-key SECRET\n  indexedcp check-config --config /etc/indexedcp/indexedcp.toml"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the roles the configuration enables (the systemd service's ExecStart).
    #[command(after_help = "Example:\n  indexedcp daemon --config /etc/indexedcp/indexedcp.toml")]
    Daemon(ConfigArg),
    /// Run the receiver alone: accept uploads on POST /upload into a directory.
    #[command(
        after_help = "Examples:\n  indexedcp server --port 3000 --output-dir /srv/incoming --api-key SECRET\n  indexedcp server --listen 0.0.0.0 --port 8080 --output-dir ./in --path-mode allow-paths\n\nWithout --api-key or INDEXEDCP_API_KEY a random key is generated and printed once."
    )]
    Server(ServerArgs),
    /// List what is buffered, in flight, failed (and why) and confirmed.
    #[command(
        visible_alias = "ls",
        after_help = "Examples:\n  indexedcp status\n  indexedcp status --json --config /etc/indexedcp/indexedcp.toml"
    )]
    Status(StatusArgs),
    /// Put parked (failed) files back in the upload queue.
    #[command(after_help = "Examples:\n  indexedcp retry 42\n  indexedcp retry --all")]
    Retry(RetryArgs),
    /// Delete a file and its buffered data from the buffer.
    #[command(after_help = "Example:\n  indexedcp purge 42 --yes")]
    Purge(PurgeArgs),
    /// Validate a configuration file and print the effective configuration.
    #[command(
        after_help = "Example:\n  indexedcp check-config --config /etc/indexedcp/indexedcp.toml"
    )]
    CheckConfig(ConfigArg),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(long, short, env = "INDEXEDCP_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

/// Which buffer a command works on.
#[derive(Debug, Args)]
pub struct BufferArg {
    /// Configuration file whose daemon.state_dir holds the buffer.
    #[arg(long, short, env = "INDEXEDCP_CONFIG", conflicts_with = "storage")]
    pub config: Option<PathBuf>,
    /// The buffer file itself (default without a config: ~/.indexcp/db/client.db).
    #[arg(long)]
    pub storage: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub buffer: BufferArg,
    /// Machine-readable output: a JSON array of files.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    #[command(flatten)]
    pub buffer: BufferArg,
    /// The id shown by `indexedcp status`.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub id: Option<i64>,
    /// Every parked file.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub buffer: BufferArg,
    /// The id shown by `indexedcp status`.
    pub id: i64,
    /// Do not ask for confirmation.
    #[arg(long, short)]
    pub yes: bool,
}

impl BufferArg {
    /// The buffer file: `--storage`, else the config's state directory (an
    /// explicit `--config`, or the default config file when it exists), else the
    /// one-shot commands' `~/.indexcp/db/client.db`.
    fn path(&self) -> Result<PathBuf, Failure> {
        if let Some(path) = &self.storage {
            return Ok(path.clone());
        }
        let default = PathBuf::from(config::DEFAULT_CONFIG_PATH);
        let config_path = match &self.config {
            Some(path) => Some(path.clone()),
            None if default.exists() => Some(default),
            None => None,
        };
        if let Some(path) = config_path {
            return Ok(load_config(&path)?.daemon.state_dir.join("buffer.db"));
        }
        let home = std::env::var_os("HOME").ok_or_else(|| {
            Failure::usage("HOME is not set; pass --storage PATH or --config FILE")
        })?;
        Ok(PathBuf::from(home).join(".indexcp/db/client.db"))
    }

    fn open(&self) -> Result<Store, Failure> {
        let path = self.path()?;
        if !path.exists() {
            return Err(Failure {
                code: exit::DATA_ERR,
                message: format!(
                    "no buffer at {}: nothing has been buffered yet, or pass --config/--storage",
                    path.display()
                ),
            });
        }
        Store::open(&path).map_err(|e| Failure::io(e.to_string()))
    }
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// TCP port to listen on (0 picks a free one).
    #[arg(long, short, default_value_t = 3000)]
    pub port: u16,
    /// Address to listen on: an IP address, or IP:PORT (then --port is ignored).
    #[arg(long, default_value = "127.0.0.1")]
    pub listen: String,
    /// Directory that receives the files.
    #[arg(long, short)]
    pub output_dir: PathBuf,
    /// Accepted API key; repeat for several. Falls back to INDEXEDCP_API_KEY.
    #[arg(long = "api-key", short = 'k')]
    pub api_keys: Vec<String>,
    /// How client file names map to output paths: sanitize, ignore or allow-paths.
    #[arg(long, default_value = "sanitize", value_parser = parse_path_mode)]
    pub path_mode: PathMode,
    /// Largest accepted chunk body (e.g. 64MiB).
    #[arg(long, default_value = "64MiB", value_parser = config::parse_size)]
    pub max_chunk_bytes: u64,
    /// Largest accepted file; 0 means unlimited.
    #[arg(long, default_value = "0", value_parser = config::parse_size)]
    pub max_file_bytes: u64,
    /// Remove partial uploads untouched for this long (e.g. 7d).
    #[arg(long, default_value = "7d", value_parser = config::parse_duration)]
    pub incomplete_expiry: Duration,
    /// Upload state and staging; default <output-dir>/.indexedcp.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Time a client may take to send its headers, and between pieces of a body.
    #[arg(long, default_value = "30s", value_parser = config::parse_duration)]
    pub read_timeout: Duration,
    /// Time in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = config::parse_duration)]
    pub shutdown_grace: Duration,
}

fn parse_path_mode(s: &str) -> Result<PathMode, String> {
    s.parse::<PathMode>().map_err(|e| e.to_string())
}

impl ServerArgs {
    fn listen_addr(&self) -> Result<SocketAddr, Failure> {
        if let Ok(addr) = self.listen.parse::<SocketAddr>() {
            return Ok(addr);
        }
        self.listen
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map(|ip| SocketAddr::new(ip, self.port))
            .map_err(|_| {
                Failure::usage(format!(
                    "--listen {:?} is not an IP address or IP:PORT (for example 127.0.0.1 or 0.0.0.0:3000)",
                    self.listen
                ))
            })
    }

    fn server_config(&self) -> Result<ServerConfig, Failure> {
        Ok(ServerConfig {
            listen: self.listen_addr()?,
            output_dir: self.output_dir.clone(),
            api_keys: self.api_keys.clone(),
            path_mode: self.path_mode,
            max_chunk_bytes: self.max_chunk_bytes,
            max_file_bytes: self.max_file_bytes,
            incomplete_expiry: self.incomplete_expiry,
            state_dir: self
                .state_dir
                .clone()
                .unwrap_or_else(|| self.output_dir.join(".indexedcp")),
        })
    }
}

/// Parses the arguments, runs the command, and returns the process exit code.
pub fn main_with_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
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
    match run(cli) {
        Ok(()) => exit::OK,
        Err(failure) => {
            eprintln!("indexedcp: {}", failure.message);
            failure.code
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::io(format!("cannot start the async runtime: {e}")))
}

fn load_config(path: &std::path::Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| Failure::config(e.to_string()))
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::CheckConfig(arg) => {
            let config = load_config(&arg.config)?;
            print!("{}", config.to_effective_toml());
            eprintln!("indexedcp: {} is valid", arg.config.display());
            Ok(())
        }
        Command::Status(args) => {
            let store = args.buffer.open()?;
            let files = store.list().map_err(|e| Failure::io(e.to_string()))?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&files).expect("file records serialize")
                );
            } else {
                print!("{}", status_table(&files));
            }
            Ok(())
        }
        Command::Retry(args) => {
            let store = args.buffer.open()?;
            let n = store
                .retry(if args.all { None } else { args.id })
                .map_err(|e| Failure::io(e.to_string()))?;
            if n == 0 && !args.all {
                return Err(Failure {
                    code: exit::DATA_ERR,
                    message: format!(
                        "no parked file with id {}; `indexedcp status` lists them",
                        args.id.unwrap_or_default()
                    ),
                });
            }
            println!("{n} file(s) queued again; a running daemon picks them up at its next check");
            Ok(())
        }
        Command::Purge(args) => {
            let store = args.buffer.open()?;
            let file = store.file(args.id).map_err(|_| Failure {
                code: exit::DATA_ERR,
                message: format!(
                    "no buffered file with id {}; `indexedcp status` lists them",
                    args.id
                ),
            })?;
            if !args.yes
                && !confirm(&format!(
                    "delete {} ({} bytes, {}) from the buffer? its data is lost unless it was delivered [y/N] ",
                    file.remote_name, file.size, file.state
                ))
            {
                return Err(Failure::usage("not purged (confirm with --yes)"));
            }
            store
                .purge(args.id)
                .map_err(|e| Failure::io(e.to_string()))?;
            println!("purged {} ({})", file.remote_name, file.id);
            Ok(())
        }
        Command::Daemon(arg) => {
            let config = load_config(&arg.config)?;
            logging::init(Some(&config.daemon.log_level), config.daemon.log_format);
            runtime()?.block_on(daemon::run(&arg.config, config))
        }
        Command::Server(args) => {
            let cfg = args.server_config()?;
            logging::init(None, LogFormat::Auto);
            let rt = runtime()?;
            rt.block_on(async {
                let shutdown = CancellationToken::new();
                let signals = daemon::spawn_signal_handler(shutdown.clone(), None)?;
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
                )
                .await;
                signals.abort();
                result
            })
        }
    }
}

/// Asks on the terminal; anything but yes (or no terminal) is no.
fn confirm(question: &str) -> bool {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).is_ok()
        && matches!(answer.trim(), "y" | "Y" | "yes" | "YES")
}

fn human_time(ms: i64) -> String {
    let delta = ms - crate::store::now_ms();
    if delta <= 0 {
        "now".to_owned()
    } else {
        format!("in {:.1}s", delta as f64 / 1000.0)
    }
}

/// The human-readable `status` listing.
fn status_table(files: &[FileRecord]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if files.is_empty() {
        out.push_str("the buffer is empty\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:>5}  {:<9}  {:>12}  {:>9}  {:>7}  {:<9}  name",
        "id", "state", "bytes", "chunks", "retries", "next"
    );
    for f in files {
        let next = f.next_attempt.map(human_time).unwrap_or_else(|| "-".into());
        let _ = write!(
            out,
            "{:>5}  {:<9}  {:>12}  {:>4}/{:<4}  {:>7}  {:<9}  {}",
            f.id, f.state, f.size, f.chunks_uploaded, f.chunk_count, f.retries, next, f.remote_name
        );
        if let Some(server_name) = &f.server_name {
            let _ = write!(out, " -> {server_name}");
        }
        out.push('\n');
        if let Some(reason) = f
            .failure
            .as_ref()
            .or(f.last_error.as_ref().filter(|_| f.state != "confirmed"))
        {
            let _ = writeln!(out, "{:>7}{reason}", "");
        }
    }
    out
}
