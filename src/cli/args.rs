//! The command line's shape: the clap types of every command and their
//! options, what a few options mean once parsed (which buffer file `--config`
//! or `--storage` names, the receiver's listen address and settings), and the
//! rewriting of the cp-style `indexedcp FILE... URL` (an `http(s)://` receiver
//! or an `s3://` bucket) into an `upload`.

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};

use super::{Failure, exit};
use crate::agent::store::Store;
use crate::config::{self, PathMode, ServerConfig};

#[derive(Debug, Parser)]
#[command(
    name = "indexedcp",
    version,
    about = "Files dropped into a folder reach a central receiver exactly once, byte-identical",
    override_usage = "indexedcp <COMMAND>\n       indexedcp [OPTIONS] FILE... URL   (cp-style: the same as `indexedcp upload --server URL FILE...`)",
    after_help = "Examples:\n  indexedcp report.pdf data.csv http://central:3000/upload    copy files: buffer, then upload\n  indexedcp *.log s3://archive/logs/ --endpoint http://127.0.0.1:9000   straight into a bucket\n  indexedcp upload --server http://central:3000/upload -k KEY *.log\n  indexedcp add *.log                                          buffer only; works offline\n  indexedcp upload --server http://central:3000/upload         send what is buffered\n  indexedcp status\n  indexedcp daemon --config config/quickstart.toml\n  indexedcp server --port 3000 --output-dir ./received --api-key SECRET\n  indexedcp check-config --config /etc/indexedcp/indexedcp.toml\n  indexedcp completions bash > ~/.local/share/bash-completion/completions/indexedcp\n\nWithout a config file the one-shot commands keep their buffer in ~/.indexcp/db/client.db."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Buffer FILEs, then upload everything buffered to a receiver, with retries.
    #[command(
        after_help = "Examples:\n  indexedcp upload --server http://central:3000/upload --api-key KEY report.pdf data.csv\n  indexedcp upload --server http://central:3000/upload           # what is buffered (after add, or an interrupted upload)\n  INDEXEDCP_API_KEY=KEY indexedcp upload --server https://central/upload --max-retries 10 *.log\n  indexedcp report.pdf http://central:3000/upload                 # cp-style shorthand\n  AWS_ACCESS_KEY_ID=ID AWS_SECRET_ACCESS_KEY=SECRET indexedcp upload --server s3://archive/in/ --endpoint http://127.0.0.1:9000 *.log\n\nPrints `FILE -> NAME ON THE SERVER` (the object key for s3://) for each file delivered (with progress bars on a terminal).\nAn s3:// URL signs with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, else the standard AWS credential chain.\nExit status: 0 when every file was delivered; 65 when a file is missing or the receiver refused one;\n69 when the receiver stayed unreachable (the files stay buffered; run the same command again);\n78 when the receiver refused the API key or URL (or the store the bucket or credentials); 130 on Ctrl-C (the rest stays buffered)."
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
    /// Check the buffer for damage; if damaged, set it aside and keep every intact file.
    #[command(
        after_help = "Examples:\n  indexedcp doctor --config /etc/indexedcp/indexedcp.toml\n  indexedcp doctor --storage ~/.indexcp/db/client.db\n\nRuns SQLite's integrity_check. A damaged buffer is renamed to buffer.db.damaged-<unix time>\n(and buffer-bulk.db.damaged-<unix time>), and every waiting file whose chunks all read back and match their SHA-256 is copied into a fresh buffer.db.\nStop the daemon first: doctor refuses while another process has the buffer open.\nExit status: 0 sound, or every waiting file saved; 65 when a waiting file was lost; 75 when the buffer is in use."
    )]
    Doctor(DoctorArgs),
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
pub(crate) struct UploadArgs {
    /// The receiver's upload URL (a URL without a path gets /upload), or a
    /// bucket as s3://BUCKET/optional/prefix/.
    #[arg(long, short, value_name = "URL")]
    pub(crate) server: String,
    /// API key sent as `Authorization: Bearer` (not for s3:// URLs).
    #[arg(long, short = 'k', env = crate::config::API_KEY_ENV, hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// With an s3:// URL: an S3-compatible service (path-style requests); omit for AWS.
    #[arg(long, value_name = "URL")]
    pub(crate) endpoint: Option<String>,
    /// With an s3:// URL: the bucket's region (default AWS_REGION, else us-east-1).
    #[arg(long, value_name = "REGION")]
    pub(crate) region: Option<String>,
    #[command(flatten)]
    pub(crate) buffer: BufferArg,
    /// Retries of an unreachable receiver before giving up (the files stay buffered).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub(crate) max_retries: u32,
    /// The first retry's delay; each next one doubles (at most 30s).
    #[arg(long, default_value = "1s", value_parser = config::parse_duration, value_name = "DURATION")]
    pub(crate) retry_delay: Duration,
    /// Trust the CAs in this PEM file besides the system's (as curl's --cacert).
    #[arg(long, value_name = "FILE")]
    pub(crate) cacert: Option<PathBuf>,
    /// Client certificate (PEM) for a receiver that requires one; needs --key.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub(crate) cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub(crate) key: Option<PathBuf>,
    /// Files to buffer and send; without any, what is buffered is sent.
    #[arg(value_name = "FILE")]
    pub(crate) files: Vec<PathBuf>,
}

impl UploadArgs {
    /// The TLS settings of --cacert, --cert and --key, read from their files.
    pub(super) fn tls(&self) -> Result<config::TargetTls, Failure> {
        let read =
            |path: &Option<PathBuf>,
             what: fn(&std::path::Path) -> Result<config::PemFile, String>| {
                path.as_deref()
                    .map(what)
                    .transpose()
                    .map_err(Failure::config)
            };
        Ok(config::TargetTls {
            ca_file: read(&self.cacert, config::PemFile::certificates)?,
            client_cert: read(&self.cert, config::PemFile::certificates)?,
            client_key: read(&self.key, config::PemFile::private_key)?,
        })
    }
}

#[derive(Debug, Args)]
pub(crate) struct AddArgs {
    #[command(flatten)]
    pub(crate) buffer: BufferArg,
    /// Files to buffer.
    #[arg(required = true, value_name = "FILE")]
    pub(crate) files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell to complete for.
    pub(crate) shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub(crate) struct ConfigArg {
    /// Configuration file.
    #[arg(long, short, env = "INDEXEDCP_CONFIG", default_value = config::DEFAULT_CONFIG_PATH)]
    pub(crate) config: PathBuf,
}

/// Which buffer a command works on.
#[derive(Debug, Args)]
pub(crate) struct BufferArg {
    /// Configuration file whose daemon.state_dir holds the buffer.
    #[arg(long, short, env = "INDEXEDCP_CONFIG", conflicts_with = "storage")]
    pub(crate) config: Option<PathBuf>,
    /// The buffer file itself (default without a config: ~/.indexcp/db/client.db).
    #[arg(long)]
    pub(crate) storage: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    pub(crate) buffer: BufferArg,
    /// Machine-readable output: a JSON array of files.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RetryArgs {
    #[command(flatten)]
    pub(crate) buffer: BufferArg,
    /// The id shown by `indexedcp status`.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub(crate) id: Option<i64>,
    /// Every parked file.
    #[arg(long)]
    pub(crate) all: bool,
}

#[derive(Debug, Args)]
pub(crate) struct PurgeArgs {
    #[command(flatten)]
    pub(crate) buffer: BufferArg,
    /// The id shown by `indexedcp status`.
    pub(crate) id: i64,
    /// Do not ask for confirmation.
    #[arg(long, short)]
    pub(crate) yes: bool,
}

#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    #[command(flatten)]
    pub(crate) buffer: BufferArg,
    /// Machine-readable output: the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

impl BufferArg {
    /// The buffer file: `--storage`, else the config's state directory (an
    /// explicit `--config`, or the default config file when it exists), else the
    /// one-shot commands' `~/.indexcp/db/client.db`.
    pub(super) fn path(&self) -> Result<PathBuf, Failure> {
        if let Some(path) = &self.storage {
            return Ok(path.clone());
        }
        if let Some(path) = self.config_path() {
            return Ok(super::load_config(&path)?
                .daemon
                .state_dir
                .join("buffer.db"));
        }
        let home = std::env::var_os("HOME").ok_or_else(|| {
            Failure::usage("HOME is not set; pass --storage PATH or --config FILE")
        })?;
        Ok(PathBuf::from(home).join(".indexcp/db/client.db"))
    }

    /// The configuration named by `--config` (or the default file when it
    /// exists), if any.
    pub(super) fn config(&self) -> Result<Option<config::Config>, Failure> {
        self.config_path()
            .map(|path| super::load_config(&path))
            .transpose()
    }

    /// `--config`, or the default file when it exists.
    fn config_path(&self) -> Option<PathBuf> {
        let default = PathBuf::from(config::DEFAULT_CONFIG_PATH);
        match &self.config {
            Some(path) => Some(path.clone()),
            None if default.exists() => Some(default),
            None => None,
        }
    }

    pub(super) fn open(&self) -> Result<Store, Failure> {
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
        // A storage named by --storage (or the default one in $HOME) is the
        // library's; one found through a config file is the daemon's.
        let layout = if self.storage.is_some() || self.config_path().is_none() {
            crate::agent::store::Layout::ByName
        } else {
            crate::agent::store::Layout::Spool
        };
        Store::open_as(&path, layout).map_err(|e| Failure {
            code: if e.is_corrupt() {
                exit::BUFFER_CORRUPT
            } else {
                exit::IO_ERR
            },
            message: e.to_string(),
        })
    }
}

#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    /// TCP port to listen on (0 picks a free one).
    #[arg(long, short, default_value_t = 3000)]
    pub(crate) port: u16,
    /// Address to listen on: an IP address, or IP:PORT (then --port is ignored).
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) listen: String,
    /// Directory that receives the files.
    #[arg(long, short)]
    pub(crate) output_dir: PathBuf,
    /// Accepted API key; repeat for several. Falls back to INDEXEDCP_API_KEY.
    #[arg(long = "api-key", short = 'k')]
    pub(crate) api_keys: Vec<String>,
    /// How client file names map to output paths: sanitize, ignore or allow-paths.
    #[arg(long, default_value = "sanitize", value_parser = parse_path_mode)]
    pub(crate) path_mode: PathMode,
    /// Largest accepted chunk body (e.g. 64MiB).
    #[arg(long, default_value = "64MiB", value_parser = config::parse_size)]
    pub(crate) max_chunk_bytes: u64,
    /// Largest accepted file; 0 means unlimited.
    #[arg(long, default_value = "0", value_parser = config::parse_size)]
    pub(crate) max_file_bytes: u64,
    /// Remove partial uploads untouched for this long (e.g. 7d).
    #[arg(long, default_value = "7d", value_parser = config::parse_duration)]
    pub(crate) incomplete_expiry: Duration,
    /// Upload state and staging; default OUTPUT_DIR/.indexedcp.
    #[arg(long)]
    pub(crate) state_dir: Option<PathBuf>,
    /// Time a client may take to send its headers, and between pieces of a body.
    #[arg(long, default_value = "30s", value_parser = config::parse_duration)]
    pub(crate) read_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    #[arg(long, default_value_t = config::defaults::MAX_CONNECTIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub(crate) max_connections: usize,
    /// Time in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = config::parse_duration)]
    pub(crate) shutdown_grace: Duration,
    /// Serve HTTPS only, with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Require a client certificate signed by a CA in this PEM file (mTLS).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<PathBuf>,
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

    /// The receiver's settings: a `[server]` section naming only the output
    /// folder, with what the flags say. The flags' defaults are written for
    /// `--help`; a test checks that they are the configuration's.
    pub(super) fn server_config(&self) -> Result<ServerConfig, Failure> {
        let mut cfg = ServerConfig::new(&self.output_dir);
        cfg.listen = self.listen_addr()?;
        cfg.api_keys = self.api_keys.clone();
        cfg.path_mode = self.path_mode;
        cfg.max_chunk_bytes = self.max_chunk_bytes;
        cfg.max_file_bytes = self.max_file_bytes;
        cfg.incomplete_expiry = self.incomplete_expiry;
        cfg.max_connections = self.max_connections;
        if let Some(state_dir) = &self.state_dir {
            cfg.state_dir = state_dir.clone();
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            cfg.tls = Some(
                config::ServerTls::from_files(cert, key, self.tls_client_ca.as_deref())
                    .map_err(Failure::config)?,
            );
        }
        Ok(cfg)
    }
}

/// `indexedcp FILE... URL` (an http(s) or s3 URL among the arguments, usually
/// the last, and a first argument that is not a command) becomes
/// `indexedcp upload --server URL FILE...`; anything else is left alone. Options
/// may stand anywhere (`indexedcp -k KEY a.txt URL`, `indexedcp a.txt URL -k KEY`,
/// `indexedcp a.txt s3://bucket/ --endpoint http://127.0.0.1:9000`).
pub(super) fn expand_cp_style(args: Vec<OsString>) -> Vec<OsString> {
    let Some(first) = args.get(1) else {
        return args;
    };
    let is_url = |a: &OsString| {
        let a = a.to_string_lossy();
        a.starts_with("http://") || a.starts_with("https://") || a.starts_with("s3://")
    };
    // The value of `--endpoint` is a URL too, but never the destination.
    let Some(url_at) = (2..args.len())
        .rev()
        .find(|&i| is_url(&args[i]) && args[i - 1] != "--endpoint")
    else {
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::defaults;

    #[test]
    fn the_server_flags_default_to_the_configuration_defaults() {
        let cli = Cli::try_parse_from(["indexedcp", "server", "--output-dir", "/srv/in"]).unwrap();
        let Command::Server(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.server_config().unwrap(), ServerConfig::new("/srv/in"));
        assert_eq!(args.shutdown_grace, defaults::SHUTDOWN_GRACE);
        assert_eq!(
            args.read_timeout,
            crate::server::ReceiverOptions::default().read_timeout
        );
    }

    #[test]
    fn a_bucket_url_is_the_destination_and_the_endpoint_stays_an_option() {
        let expanded = expand_cp_style(
            [
                "indexedcp",
                "a.txt",
                "s3://archive/in/",
                "--endpoint",
                "http://127.0.0.1:9000",
                "b.txt",
            ]
            .map(OsString::from)
            .to_vec(),
        );
        assert_eq!(
            expanded,
            [
                "indexedcp",
                "upload",
                "--server",
                "s3://archive/in/",
                "a.txt",
                "--endpoint",
                "http://127.0.0.1:9000",
                "b.txt"
            ]
            .map(OsString::from)
        );
    }
}
