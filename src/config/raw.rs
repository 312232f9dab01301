//! The configuration file exactly as written, as serde types. Each struct
//! refuses unknown keys (`deny_unknown_fields`) so that a misspelt key is an
//! error rather than a silently ignored setting. Every field is optional, so
//! that a missing key is reported by the checker together with every other
//! problem instead of stopping deserialisation, and wrapped in [`Spanned`], so
//! that each report can point at the value (or, when the key is absent, at its
//! section header). Durations and sizes stay [`Value`]s because they may be
//! written as strings or as integers.

use serde::Deserialize;
use toml::{Spanned, Value};

/// An optional key and where its value was written.
pub(super) type Field<T> = Option<Spanned<T>>;

/// The whole file: its four sections.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) daemon: Field<RawDaemon>,
    #[serde(default)]
    pub(super) target: Vec<Spanned<RawTarget>>,
    #[serde(default)]
    pub(super) spool: Vec<Spanned<RawSpool>>,
    pub(super) server: Field<RawServer>,
}

/// `[daemon]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    pub(super) state_dir: Field<String>,
    pub(super) log_level: Field<String>,
    pub(super) log_format: Field<String>,
    pub(super) check_interval: Field<Value>,
    pub(super) max_buffer_bytes: Field<Value>,
    pub(super) shutdown_grace: Field<Value>,
    pub(super) metrics_listen: Field<String>,
    pub(super) on_buffer_corrupt: Field<String>,
}

/// One `[[target]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    pub(super) name: Field<String>,
    pub(super) url: Field<String>,
    pub(super) api_key: Field<String>,
    pub(super) api_key_file: Field<String>,
    pub(super) chunk_size: Field<Value>,
    pub(super) concurrency: Field<i64>,
    pub(super) max_retries: Field<Value>,
    pub(super) initial_retry_delay: Field<Value>,
    pub(super) max_retry_delay: Field<Value>,
    pub(super) retry_multiplier: Field<f64>,
    pub(super) timeout: Field<Value>,
    // The keys of object storage targets (`kind = "s3"`).
    pub(super) kind: Field<String>,
    pub(super) endpoint: Field<String>,
    pub(super) region: Field<String>,
    pub(super) access_key_id: Field<String>,
    pub(super) secret_access_key_file: Field<String>,
    pub(super) part_size: Field<Value>,
    pub(super) on_conflict: Field<String>,
    // Extra HTTP headers for the HTTP kinds (`indexedcp`, `tus`).
    pub(super) headers: Field<std::collections::BTreeMap<String, Spanned<Value>>>,
    // TLS for https:// URLs (config::tls).
    pub(super) ca_file: Field<String>,
    pub(super) client_cert: Field<String>,
    pub(super) client_key: Field<String>,
}

/// One `[[spool]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSpool {
    pub(super) path: Field<String>,
    pub(super) target: Field<String>,
    pub(super) recursive: Field<bool>,
    pub(super) include: Field<Vec<Spanned<String>>>,
    pub(super) exclude: Field<Vec<Spanned<String>>>,
    pub(super) settle: Field<Value>,
    pub(super) disposition: Field<String>,
    pub(super) move_to: Field<String>,
    pub(super) remote_prefix: Field<String>,
}

/// `[server]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Field<String>,
    pub(super) output_dir: Field<String>,
    pub(super) api_keys: Field<Vec<Spanned<String>>>,
    pub(super) api_keys_file: Field<String>,
    pub(super) path_mode: Field<String>,
    pub(super) max_chunk_bytes: Field<Value>,
    pub(super) max_file_bytes: Field<Value>,
    pub(super) incomplete_expiry: Field<Value>,
    pub(super) state_dir: Field<String>,
    pub(super) max_connections: Field<i64>,
    pub(super) tus_path: Field<String>,
    // HTTPS (config::tls).
    pub(super) tls_cert: Field<String>,
    pub(super) tls_key: Field<String>,
    pub(super) tls_client_ca: Field<String>,
    // Named clients (config::clients).
    pub(super) client: Field<Vec<Spanned<super::clients::RawClient>>>,
    pub(super) output_layout: Field<String>,
}
