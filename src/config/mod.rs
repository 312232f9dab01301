//! Configuration: the TOML file an `indexedcp` process is started with, turned
//! into an immutable, validated [`Config`]. [`Config::load`] reads the file,
//! deserialises it into raw types that mirror it and refuse unknown keys, and
//! checks every value, reporting every problem at once with file, line, column
//! and key, so that an operator fixes a broken file in one pass.
//! [`Config::to_effective_toml`] prints the result back with the defaults
//! filled in and the API keys redacted, for `check-config`.
//!
//! The work is split by job: [`types`] holds the validated values, [`defaults`]
//! every default value (once), `units` the duration and size spellings, `raw`
//! the file as written, `check` and `values` the validation, `diagnostics` the
//! error type and its rendering, and `effective` the TOML writer. The paths
//! other modules use are re-exported here.

mod check;
mod clients;
pub mod defaults;
mod diagnostics;
mod effective;
mod headers;
mod raw;
mod s3;
mod tls;
pub mod types;
mod units;
mod values;

pub use clients::{NamedClient, OutputLayout, key_sha256, normalize_subject};
pub use defaults::{API_KEY_ENV, CONFIG_PATH as DEFAULT_CONFIG_PATH};
pub use diagnostics::{ConfigError, Problem};
pub use s3::{OnConflict, S3Target, TargetKind, parse_s3_url};
pub use tls::{PemFile, ServerTls, TargetTls};
pub use types::OnBufferCorrupt;
pub use types::{
    Config, DaemonConfig, Disposition, LogFormat, PathMode, ServerConfig, SpoolConfig, TargetConfig,
};
pub use units::{parse_duration, parse_size};

/// The API key from the environment variable [`API_KEY_ENV`], trimmed; `None`
/// when it is unset, not valid UTF-8, or blank. This is the one fallback used
/// wherever no key is configured, so that every role treats a blank variable
/// the same way (as no key at all).
pub fn api_key_from_env() -> Option<String> {
    nonblank_key(std::env::var(API_KEY_ENV).ok())
}

/// The trimmed key, or `None` for a missing or blank one.
fn nonblank_key(key: Option<String>) -> Option<String> {
    let key = key?;
    let key = key.trim();
    (!key.is_empty()).then(|| key.to_owned())
}

/// What the unit tests of several modules here share.
#[cfg(test)]
mod testing {
    use std::path::Path;

    use super::{Config, ConfigError};

    /// A minimal valid target section.
    pub(super) const TARGET: &str =
        "[[target]]\nname = \"central\"\nurl = \"https://example.org/upload\"\n";

    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    pub(super) fn messages(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(config) => panic!("expected an error, got {config:#?}"),
            Err(error) => error.messages(),
        }
    }

    /// Asserts that exactly one message is reported and that it contains `expected`.
    pub(super) fn assert_single_error(text: &str, expected: &str) {
        let messages = messages(text);
        assert_eq!(messages.len(), 1, "expected one message: {messages:#?}");
        assert!(
            messages[0].contains(expected),
            "{:?} does not contain {expected:?}",
            messages[0]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The variable itself is not set here: tests run in parallel in one process.
    #[test]
    fn api_key_from_the_environment_is_trimmed_and_blank_is_none() {
        assert_eq!(nonblank_key(None), None);
        assert_eq!(nonblank_key(Some(" \t\n".to_owned())), None);
        assert_eq!(
            nonblank_key(Some(" key\n".to_owned())),
            Some("key".to_owned())
        );
    }
}
