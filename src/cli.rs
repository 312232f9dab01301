//! The command line (DESIGN.md section 4): clap types, dispatch, and the mapping
//! of failures to sysexits exit codes. No SQL and no protocol logic lives here.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, LogFormat, PathMode, ServerConfig};
use crate::daemon::{self, OnReload};
use crate::logging;
use crate::server::ReceiverOptions;

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
                let signals = daemon::spawn_signal_handler(shutdown.clone(), OnReload::Ignore)?;
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
