//! Every default value of the configuration, written once. The types' `new`
//! and `Default` constructors, the checker (which falls back to them when a key
//! is absent or invalid) and other modules that offer the same settings
//! outside a configuration file (the one-shot commands, the library client)
//! all read these constants, so that a default cannot drift between them. The
//! reference file `config/indexedcp.toml` shows the same values, and a test
//! holds it to them.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use super::s3::OnConflict;
use super::types::{Disposition, LogFormat, PathMode};
use super::units::{GIB, MIB};

/// Where the daemon looks for its configuration unless told otherwise.
pub const CONFIG_PATH: &str = "/etc/indexedcp/indexedcp.toml";

/// Environment variable holding the API key when the configuration names none.
pub const API_KEY_ENV: &str = "INDEXEDCP_API_KEY";

// [daemon]

/// `daemon.state_dir`: the buffer lives in `<state_dir>/buffer.db` and
/// `buffer-bulk.db`.
pub const STATE_DIR: &str = "/var/lib/indexedcp";
/// `daemon.log_level`.
pub const LOG_LEVEL: &str = "info";
/// `daemon.log_format`.
pub const LOG_FORMAT: LogFormat = LogFormat::Auto;
/// `daemon.check_interval`.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// `daemon.max_buffer_bytes`.
pub const MAX_BUFFER_BYTES: u64 = 10 * GIB;
/// `daemon.shutdown_grace`.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// `daemon.metrics_listen`: metrics are off unless an address is given.
pub const METRICS_LISTEN: Option<SocketAddr> = None;
/// `daemon.on_buffer_corrupt`: a damaged buffer stops the daemon.
pub const ON_BUFFER_CORRUPT: super::types::OnBufferCorrupt = super::types::OnBufferCorrupt::Exit;

// [[target]]

/// `target.chunk_size`.
pub const CHUNK_SIZE: u64 = MIB;
/// `target.concurrency`: files in flight at once.
pub const CONCURRENCY: usize = 4;
/// `target.max_retries`: `None` retries forever.
pub const MAX_RETRIES: Option<u32> = None;
/// `target.initial_retry_delay`.
pub const INITIAL_RETRY_DELAY: Duration = Duration::from_secs(1);
/// `target.max_retry_delay`.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// `target.retry_multiplier`.
pub const RETRY_MULTIPLIER: f64 = 2.0;
/// `target.timeout`, per request.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// `target.kind`: this project's own receiver.
pub const KIND: &str = "indexedcp";
/// `target.part_size` (kind `s3`): files up to this size go as one PUT,
/// larger ones as multipart uploads of parts this large.
pub const PART_SIZE: u64 = 8 * MIB;
/// The smallest `target.part_size` object storage accepts for a part that is
/// not a file's last.
pub const MIN_PART_SIZE: u64 = 5 * MIB;
/// The largest `target.part_size` object storage accepts.
pub const MAX_PART_SIZE: u64 = 5 * GIB;
/// `target.on_conflict` (kind `s3`).
pub const ON_CONFLICT: OnConflict = OnConflict::Rename;
/// The region when neither `target.region` nor `AWS_REGION` names one.
pub const S3_REGION: &str = "us-east-1";

// [[spool]]

/// `spool.recursive`.
pub const RECURSIVE: bool = true;
/// `spool.include`: every file.
pub const INCLUDE: &[&str] = &["*"];
/// `spool.exclude`: nothing beyond the built-in temporary and hidden patterns.
pub const EXCLUDE: &[&str] = &[];
/// `spool.settle`.
pub const SETTLE: Duration = Duration::from_secs(2);
/// `spool.disposition`.
pub const DISPOSITION: Disposition = Disposition::Delete;
/// `spool.remote_prefix`.
pub const REMOTE_PREFIX: &str = "";

// [server]

/// `server.listen`: loopback only, so that a receiver is never exposed by accident.
pub const LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 3000));
/// `server.path_mode`.
pub const PATH_MODE: PathMode = PathMode::Sanitize;
/// `server.max_chunk_bytes`.
pub const MAX_CHUNK_BYTES: u64 = 64 * MIB;
/// `server.max_file_bytes`; 0 means unlimited.
pub const MAX_FILE_BYTES: u64 = 0;
/// `server.incomplete_expiry`.
pub const INCOMPLETE_EXPIRY: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// `server.max_connections`: each connection costs a socket and, while it
/// uploads, an open file (two descriptors), so 400 of them with the
/// receiver's own files stay under the common limit of 1,024 descriptors.
/// In memory a connection holds at most 136 KiB of its own (53 MiB for 400);
/// request bodies share one budget of 8 MiB for the whole receiver.
pub const MAX_CONNECTIONS: usize = 400;
/// `server.tus_path`: the tus endpoint is on unless set to "".
pub const TUS_PATH: &str = "/files/";
/// `server.state_dir` is `<output_dir>/.indexedcp` by default, so that the
/// final rename from staging into place never crosses a filesystem.
pub const SERVER_STATE_SUBDIR: &str = ".indexedcp";

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, DaemonConfig, ServerConfig, TargetConfig};

    #[test]
    fn reference_config_shows_the_defaults() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/indexedcp.toml"
        ));
        let config = Config::load(path).unwrap();
        assert_eq!(config.daemon, DaemonConfig::default());
        let target = &config.targets[0];
        assert_eq!(
            *target,
            TargetConfig::new("central", "https://upload.example.org/upload")
        );
        assert_eq!(config.server, Some(ServerConfig::new("/srv/indexedcp")));
    }
}
