//! The command line (DESIGN.md section 4): clap types, dispatch, and the mapping
//! of failures to sysexits exit codes. No SQL and no protocol logic lives here:
//! the one-shot commands (`upload`, `add`, and the cp-style `indexedcp FILE...
//! URL`) drive the library's [`Client`], the status commands read the [`Store`].

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::agent::AgentError;
use crate::agent::ingest::IngestError;
use crate::agent::store::{FileRecord, Store};
use crate::agent::upload::Retry;
use crate::client::{Client, ClientError, ClientOptions, FailedFile, ProgressEvent};
use crate::config::{self, Config, LogFormat, PathMode, ServerConfig};
use crate::daemon::{self, DaemonError};
use crate::logging;
use crate::server::{ReceiverOptions, ServerError};

/// Exit codes (sysexits.h).
pub mod exit {
    pub const OK: i32 = 0;
    pub const USAGE: i32 = 64;
    pub const DATA_ERR: i32 = 65;
    pub const UNAVAILABLE: i32 = 69;
    pub const SOFTWARE: i32 = 70;
    pub const IO_ERR: i32 = 74;
    pub const CONFIG: i32 = 78;
    /// Interrupted by Ctrl-C (128 + SIGINT), as shells report it.
    pub const INTERRUPTED: i32 = 130;
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
    pub fn data(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::DATA_ERR,
            message: message.into(),
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "indexedcp",
    version,
    about = "Files dropped into a folder reach a central receiver exactly once, byte-identical",
    override_usage = "indexedcp <COMMAND>\n       indexedcp [OPTIONS] FILE... URL   (cp-style: the same as `indexedcp upload --server URL FILE...`)",
    after_help = "Examples:\n  indexedcp report.pdf data.csv http://central:3000/upload    copy files: buffer, then upload\n  indexedcp upload --server http://central:3000/upload -k KEY *.log\n  indexedcp add *.log                                          buffer only; works offline\n  indexedcp upload --server http://central:3000/upload         send what is buffered\n  indexedcp status\n  indexedcp daemon --config config/quickstart.toml\n  indexedcp server --port 3000 --output-dir ./received --api-key SECRET\n  indexedcp check-config --config /etc/indexedcp/indexedcp.toml\n  indexedcp completions bash > ~/.local/share/bash-completion/completions/indexedcp\n\nWithout a config file the one-shot commands keep their buffer in ~/.indexcp/db/client.db."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Buffer FILEs, then upload everything buffered to a receiver, with retries.
    #[command(
        after_help = "Examples:\n  indexedcp upload --server http://central:3000/upload --api-key KEY report.pdf data.csv\n  indexedcp upload --server http://central:3000/upload           # what is buffered (after add, or an interrupted upload)\n  INDEXEDCP_API_KEY=KEY indexedcp upload --server https://central/upload --max-retries 10 *.log\n  indexedcp report.pdf http://central:3000/upload                 # cp-style shorthand\n\nPrints `FILE -> NAME ON THE SERVER` for each file delivered (with progress bars on a terminal).\nExit status: 0 when every file was delivered; 65 when a file is missing or the receiver refused one;\n69 when the receiver stayed unreachable (the files stay buffered; run the same command again);\n78 when the receiver refused the API key or URL; 130 on Ctrl-C (the rest stays buffered)."
    )]
    Upload(UploadArgs),
    /// Buffer FILEs for a later `indexedcp upload` (works offline).
    #[command(
        after_help = "Examples:\n  indexedcp add report.pdf data.csv\n  indexedcp add --storage ./buffer.db *.log\n  indexedcp upload --server http://central:3000/upload    # later, to send them"
    )]
    Add(AddArgs),
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  indexedcp completions bash > ~/.local/share/bash-completion/completions/indexedcp\n  indexedcp completions zsh > ~/.zfunc/_indexedcp\n  indexedcp completions fish > ~/.config/fish/completions/indexedcp.fish"
    )]
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The receiver's upload URL (a URL without a path gets /upload).
    #[arg(long, short, value_name = "URL")]
    pub server: String,
    /// API key sent as `Authorization: Bearer`.
    #[arg(long, short = 'k', env = "INDEXEDCP_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[command(flatten)]
    pub buffer: BufferArg,
    /// Retries of an unreachable receiver before giving up (the files stay buffered).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub max_retries: u32,
    /// The first retry's delay; each next one doubles (at most 30s).
    #[arg(long, default_value = "1s", value_parser = config::parse_duration, value_name = "DURATION")]
    pub retry_delay: Duration,
    /// Files to buffer and send; without any, what is buffered is sent.
    #[arg(value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    #[command(flatten)]
    pub buffer: BufferArg,
    /// Files to buffer.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    pub shell: clap_complete::Shell,
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
    /// Upload state and staging; default OUTPUT_DIR/.indexedcp.
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

/// `indexedcp FILE... URL` (an http(s) URL among the arguments, usually the
/// last, and a first argument that is not a command) becomes
/// `indexedcp upload --server URL FILE...`; anything else is left alone. Options
/// may stand anywhere (`indexedcp -k KEY a.txt URL`, `indexedcp a.txt URL -k KEY`).
fn expand_cp_style(args: Vec<OsString>) -> Vec<OsString> {
    let Some(first) = args.get(1) else {
        return args;
    };
    let is_url = |a: &OsString| {
        let a = a.to_string_lossy();
        a.starts_with("http://") || a.starts_with("https://")
    };
    let Some(url_at) = args.iter().skip(2).rposition(is_url).map(|i| i + 2) else {
        return args;
    };
    let first = first.to_string_lossy();
    let command = Cli::command();
    let is_command = first == "help"
        || command
            .get_subcommands()
            .any(|c| c.get_name() == first || c.get_all_aliases().any(|a| a == first));
    if is_command {
        return args;
    }
    let mut expanded = vec![
        args[0].clone(),
        "upload".into(),
        "--server".into(),
        args[url_at].clone(),
    ];
    expanded.extend(
        args.iter()
            .enumerate()
            .skip(1)
            .filter(|(i, _)| *i != url_at)
            .map(|(_, a)| a.clone()),
    );
    expanded
}

/// Parses the arguments, runs the command, and returns the process exit code.
pub fn main_with_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> i32 {
    let args = expand_cp_style(args.into_iter().collect());
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

/// The exit code for a daemon or receiver that stopped or could not start:
/// the configuration has to change (78), the machine refused a resource (74),
/// or a task panicked, which is a bug (70).
fn daemon_failure(error: DaemonError) -> Failure {
    let code = match &error {
        DaemonError::NoRole { .. } => exit::CONFIG,
        DaemonError::Agent(AgentError::Target { .. }) => exit::CONFIG,
        DaemonError::Agent(
            AgentError::StateDir { .. } | AgentError::Store(_) | AgentError::Spool { .. },
        ) => exit::IO_ERR,
        DaemonError::Receiver(ServerError::CrossDevice { .. }) => exit::CONFIG,
        DaemonError::Receiver(_) => exit::IO_ERR,
        DaemonError::Signals(_)
        | DaemonError::MetricsListen { .. }
        | DaemonError::ListenAddress(_) => exit::IO_ERR,
        DaemonError::RolePanicked(_) | DaemonError::Task(_) => exit::SOFTWARE,
    };
    Failure {
        code,
        message: error.to_string(),
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
        Command::Upload(args) => upload(args),
        Command::Add(args) => add(args),
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
                let signals =
                    daemon::spawn_signal_handler(shutdown.clone(), None).map_err(daemon_failure)?;
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
                result.map_err(daemon_failure)
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
    let delta = ms - crate::agent::store::now_ms();
    if delta <= 0 {
        "now".to_owned()
    } else {
        format!("in {:.1}s", delta as f64 / 1000.0)
    }
}

/// One line per target: queued files and bytes, in progress, failed, the age
/// of the oldest queued file, and the last error.
fn target_summary(files: &[FileRecord]) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    #[derive(Default)]
    struct Summary<'a> {
        queued: u64,
        bytes: u64,
        in_progress: u64,
        failed: u64,
        oldest: Option<i64>,
        last_error: Option<&'a str>,
    }
    let mut targets: BTreeMap<&str, Summary> = BTreeMap::new();
    for f in files {
        let t = targets.entry(f.target.as_str()).or_default();
        match f.state {
            "queued" => {
                t.queued += 1;
                t.bytes += f.size;
                t.in_progress += u64::from(f.chunks_uploaded > 0);
                t.oldest = Some(t.oldest.map_or(f.created_at, |o| o.min(f.created_at)));
                if let Some(e) = &f.last_error {
                    t.last_error = Some(e);
                }
            }
            "failed" => {
                t.failed += 1;
                t.last_error = f.failure.as_deref().or(t.last_error);
            }
            _ => {}
        }
    }
    let now = crate::agent::store::now_ms();
    let mut out = String::new();
    for (name, t) in targets {
        let _ = write!(
            out,
            "target {name}: {} queued ({} bytes), {} in progress, {} failed",
            t.queued, t.bytes, t.in_progress, t.failed
        );
        if let Some(oldest) = t.oldest {
            let _ = write!(
                out,
                ", oldest waiting {:.0}s",
                (now - oldest).max(0) as f64 / 1000.0
            );
        }
        if let Some(e) = t.last_error {
            let _ = write!(out, "; last error: {e}");
        }
        out.push('\n');
    }
    out
}

/// The human-readable `status` listing.
fn status_table(files: &[FileRecord]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if files.is_empty() {
        out.push_str("the buffer is empty\n");
        return out;
    }
    out.push_str(&target_summary(files));
    out.push('\n');
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

/// Refuses, before anything is buffered, names that are not readable regular
/// files, naming each.
fn check_files(files: &[PathBuf]) -> Result<(), Failure> {
    let problems: Vec<String> = files
        .iter()
        .filter_map(|path| match std::fs::metadata(path) {
            Ok(meta) if meta.is_file() => None,
            Ok(meta) if meta.is_dir() => Some(format!(
                "{} is a directory; name the files in it (for example {}/*)",
                path.display(),
                path.display()
            )),
            Ok(_) => Some(format!("{} is not a regular file", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Some(format!("{}: no such file", path.display()))
            }
            Err(e) => Some(format!("cannot read {}: {e}", path.display())),
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::data(format!(
            "{}\nindexedcp: nothing was buffered",
            problems.join("\nindexedcp: ")
        )))
    }
}

fn client_failure(error: ClientError) -> Failure {
    let message = error.to_string();
    match error {
        ClientError::InvalidOptions(_) | ClientError::NoServerUrl | ClientError::NoApiKey => {
            Failure::usage(message)
        }
        ClientError::Ingest(IngestError::Store(_)) => Failure::io(message),
        ClientError::Ingest(_) => Failure::data(message),
        ClientError::StorageDir { .. } | ClientError::Store(_) => Failure::io(message),
        _ => Failure::software(message),
    }
}

/// The flags that name the buffer, to repeat in hints.
fn buffer_flags(buffer: &BufferArg) -> String {
    match (&buffer.storage, &buffer.config) {
        (Some(path), _) => format!(" --storage {}", path.display()),
        (None, Some(path)) => format!(" --config {}", path.display()),
        (None, None) => String::new(),
    }
}

fn absolute_name(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_owned())
        .display()
        .to_string()
}

fn ingest_failure(path: &Path, error: ClientError) -> Failure {
    let failure = client_failure(error);
    if failure.message.contains(&path.display().to_string()) {
        failure
    } else {
        Failure {
            code: failure.code,
            message: format!("{}: {}", path.display(), failure.message),
        }
    }
}

/// `indexedcp add FILE...`: buffers only.
fn add(args: AddArgs) -> Result<(), Failure> {
    check_files(&args.files)?;
    let storage = args.buffer.path()?;
    logging::init(Some("off"), LogFormat::Text);
    let rt = runtime()?;
    let result = rt.block_on(async {
        let client = Client::new(ClientOptions {
            storage_path: storage,
            log_level: None,
            ..ClientOptions::default()
        })
        .await
        .map_err(client_failure)?;
        for path in &args.files {
            let added = client
                .buffer_file(path)
                .await
                .map_err(|e| ingest_failure(path, e))?;
            if added.already_buffered {
                println!(
                    "{} is already buffered (id {})",
                    path.display(),
                    added.file_id
                );
            } else {
                println!(
                    "buffered {} ({} bytes, {} chunk(s), id {})",
                    path.display(),
                    added.bytes,
                    added.chunk_count,
                    added.file_id
                );
            }
        }
        client.close().await;
        eprintln!(
            "indexedcp: send with `indexedcp upload --server URL{}`",
            buffer_flags(&args.buffer)
        );
        Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

/// `indexedcp upload --server URL [FILE...]`: buffers the files, then sends
/// everything queued, retrying an unreachable receiver a few times.
fn upload(args: UploadArgs) -> Result<(), Failure> {
    check_files(&args.files)?;
    let api_key = args
        .api_key
        .clone()
        .filter(|k| !k.trim().is_empty())
        .ok_or_else(|| Failure::usage("no API key: pass --api-key KEY or set INDEXEDCP_API_KEY"))?;
    let storage = args.buffer.path()?;
    logging::init(Some("off"), LogFormat::Text);
    let resume = format!(
        "indexedcp upload --server {}{}",
        args.server,
        buffer_flags(&args.buffer)
    );
    let rt = runtime()?;
    let reporter = Arc::new(Reporter::new());
    let result = rt.block_on(async {
        tokio::select! {
            result = upload_files(&args, api_key, storage, &resume, reporter.clone()) => result,
            _ = tokio::signal::ctrl_c() => Err(Failure {
                code: exit::INTERRUPTED,
                message: format!("interrupted; what was not delivered stays buffered, and `{resume}` resumes it"),
            }),
        }
    });
    reporter.finish();
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn upload_files(
    args: &UploadArgs,
    api_key: String,
    storage: PathBuf,
    resume: &str,
    reporter: Arc<Reporter>,
) -> Result<(), Failure> {
    let client = Client::new(ClientOptions {
        server_url: Some(args.server.clone()),
        api_key: Some(api_key),
        storage_path: storage,
        log_level: None,
        ..ClientOptions::default()
    })
    .await
    .map_err(client_failure)?;
    for path in &args.files {
        client
            .buffer_file(path)
            .await
            .map_err(|e| ingest_failure(path, e))?;
        reporter.name(absolute_name(path), path.display().to_string());
    }
    let queued = |files: Vec<FileRecord>| -> Vec<FileRecord> {
        files.into_iter().filter(|f| f.state == "queued").collect()
    };
    let all = client.buffered_files().await.map_err(client_failure)?;
    let parked_before = all.iter().filter(|f| f.state == "failed").count();
    if parked_before > 0 {
        reporter.note(&format!(
            "{parked_before} file(s) parked earlier are not sent; `indexedcp status` shows why, `indexedcp retry --all` re-queues them"
        ));
    }
    if queued(all).is_empty() {
        reporter.note("nothing to upload: no file is waiting in the buffer");
        return Ok(());
    }
    let progress = reporter.clone();
    client.on_upload_progress(move |event| progress.progress(event));

    let mut parked: Vec<FailedFile> = Vec::new();
    let mut retries = 0u32;
    let mut delay = args.retry_delay;
    loop {
        let waiting = queued(client.buffered_files().await.map_err(client_failure)?);
        reporter.prepare(&waiting);
        let failed = match client.upload_buffered_files().await {
            Ok(delivered) => {
                reporter.delivered(&delivered);
                Vec::new()
            }
            Err(ClientError::Undelivered { delivered, failed }) => {
                reporter.delivered(&delivered);
                failed
            }
            Err(e) => return Err(client_failure(e)),
        };
        let (now_parked, pending): (Vec<FailedFile>, Vec<FailedFile>) =
            failed.into_iter().partition(|f| f.parked);
        for f in &now_parked {
            reporter.note(&format!(
                "{}: refused, not retried: {}",
                reporter.display(&f.file_name),
                f.error
            ));
        }
        parked.extend(now_parked);
        if pending.is_empty() {
            break;
        }
        let refused = pending.iter().find(|f| f.retry == Retry::AtMaximum);
        if let Some(refused) = refused {
            return Err(Failure {
                code: exit::CONFIG,
                message: format!(
                    "the receiver refused the request: {}; check --server and --api-key. {} file(s) stay buffered; `{resume}` sends them",
                    refused.error,
                    pending.len()
                ),
            });
        }
        if retries >= args.max_retries {
            return Err(Failure {
                code: exit::UNAVAILABLE,
                message: format!(
                    "gave up after {retries} retries: {}. {} file(s) stay buffered; `{resume}` resumes them",
                    pending[0].error,
                    pending.len()
                ),
            });
        }
        retries += 1;
        reporter.note(&format!(
            "{} file(s) not delivered yet ({}); retry {retries} of {} in {:.1}s",
            pending.len(),
            pending[0].error,
            args.max_retries,
            delay.as_secs_f64()
        ));
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
    client.close().await;
    if let Some(first) = parked.first() {
        return Err(Failure::data(format!(
            "the receiver refused {} file(s) ({}: {}); they are parked in the buffer: `indexedcp status` shows them, `indexedcp retry --all` re-queues them once the cause is fixed",
            parked.len(),
            reporter.display(&first.file_name),
            first.error
        )));
    }
    Ok(())
}

/// What the one-shot upload shows: progress bars (one per file and a total) on
/// a terminal, otherwise one `FILE -> SERVER NAME` line per delivered file.
struct Reporter {
    bars: Option<Bars>,
    /// Client name (absolute path) -> the path as typed on the command line.
    typed: Mutex<HashMap<String, String>>,
}

struct Bars {
    multi: MultiProgress,
    total: ProgressBar,
    files: Mutex<HashMap<String, ProgressBar>>,
    style: ProgressStyle,
}

impl Reporter {
    fn new() -> Reporter {
        use std::io::IsTerminal;
        let bars = std::io::stderr().is_terminal().then(|| {
            let multi = MultiProgress::new();
            let total = multi.add(ProgressBar::new(0));
            total.set_style(
                ProgressStyle::with_template(
                    "{msg:>30!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            total.set_message("total");
            Bars {
                multi,
                total,
                files: Mutex::new(HashMap::new()),
                style: ProgressStyle::with_template("{msg:>30!} [{bar:30}] {bytes}/{total_bytes}")
                    .expect("valid template")
                    .progress_chars("=> "),
            }
        });
        Reporter {
            bars,
            typed: Mutex::new(HashMap::new()),
        }
    }

    fn name(&self, client_name: String, typed: String) {
        self.typed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_name, typed);
    }

    fn display(&self, client_name: &str) -> String {
        self.typed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(client_name)
            .cloned()
            .unwrap_or_else(|| client_name.to_owned())
    }

    /// Prints a line on stdout, above the bars when there are any.
    fn line(&self, text: &str) {
        match &self.bars {
            Some(bars) => bars.multi.suspend(|| println!("{text}")),
            None => println!("{text}"),
        }
    }

    /// Prints a note on stderr, above the bars when there are any.
    fn note(&self, text: &str) {
        match &self.bars {
            Some(bars) => bars.multi.suspend(|| eprintln!("indexedcp: {text}")),
            None => eprintln!("indexedcp: {text}"),
        }
    }

    /// Adds a bar for every file about to be sent that has none yet.
    fn prepare(&self, files: &[FileRecord]) {
        let Some(bars) = &self.bars else { return };
        let mut map = bars.files.lock().unwrap_or_else(|p| p.into_inner());
        for file in files {
            if map.contains_key(&file.rel_path) {
                continue;
            }
            let bar = bars
                .multi
                .insert_before(&bars.total, ProgressBar::new(file.size));
            bar.set_style(bars.style.clone());
            bar.set_message(file.remote_name.clone());
            bars.total.inc_length(file.size);
            map.insert(file.rel_path.clone(), bar);
        }
    }

    fn progress(&self, event: &ProgressEvent) {
        let Some(bars) = &self.bars else { return };
        if event.status != crate::client::ChunkStatus::Success || event.chunk_count == 0 {
            return;
        }
        let map = bars.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bar) = map.get(&event.file_name) {
            let done = (u128::from(event.file_size) * u128::from(event.chunk_index + 1)
                / u128::from(event.chunk_count)) as u64;
            let before = bar.position();
            if done > before {
                bar.set_position(done);
                bars.total.inc(done - before);
            }
        }
    }

    fn delivered(&self, delivered: &HashMap<String, String>) {
        let mut names: Vec<(&String, &String)> = delivered.iter().collect();
        names.sort();
        for (client_name, server_name) in names {
            if let Some(bars) = &self.bars
                && let Some(bar) = bars
                    .files
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(client_name)
            {
                bars.total.inc(bar.length().unwrap_or(0) - bar.position());
                bar.finish_and_clear();
                bars.multi.remove(&bar);
            }
            self.line(&format!("{} -> {server_name}", self.display(client_name)));
        }
    }

    fn finish(&self) {
        if let Some(bars) = &self.bars {
            for (_, bar) in bars.files.lock().unwrap_or_else(|p| p.into_inner()).drain() {
                bar.abandon();
            }
            bars.total.finish_and_clear();
        }
    }
}
