//! The effective configuration as TOML, for `check-config`: every default
//! filled in, durations and sizes in their shortest exact spelling, keys in
//! the order of the reference file, and every API key replaced by
//! `"<redacted>"` so that the output can be shared without leaking a secret. Parsing
//! the output again gives the same configuration apart from the keys.

use std::path::Path;

use toml::Value;

use super::defaults::{self, API_KEY_ENV};
use super::s3::{S3Target, TargetKind};
use super::types::{Config, Disposition};
use super::units::{format_duration, format_size};

/// What `to_effective_toml` prints instead of any API key.
pub(super) const REDACTED: &str = "<redacted>";

impl Config {
    /// The effective configuration as TOML, every default filled in and every
    /// API key shown as `"<redacted>"`; parsing it again gives the same
    /// configuration apart from the keys.
    pub fn to_effective_toml(&self) -> String {
        let mut out = TomlWriter::default();
        out.comment(&format!(
            "effective configuration of {} (defaults filled in, API keys redacted)",
            self.source.display()
        ));

        let daemon = &self.daemon;
        out.section("[daemon]");
        out.string("state_dir", &path_text(&daemon.state_dir));
        out.string("log_level", &daemon.log_level);
        out.string("log_format", daemon.log_format.as_str());
        out.string("check_interval", &format_duration(daemon.check_interval));
        out.string("max_buffer_bytes", &format_size(daemon.max_buffer_bytes));
        out.string("shutdown_grace", &format_duration(daemon.shutdown_grace));
        if let Some(addr) = daemon.metrics_listen {
            out.string("metrics_listen", &addr.to_string());
        }
        out.string("on_buffer_corrupt", daemon.on_buffer_corrupt.as_str());

        for target in &self.targets {
            out.section("[[target]]");
            out.string("name", &target.name);
            out.string("kind", target.kind.name());
            out.string("url", &target.url);
            match &target.kind {
                TargetKind::IndexedCp => match target.api_key {
                    Some(_) => out.string("api_key", REDACTED),
                    None => out.comment(&format!("api_key not set: {API_KEY_ENV} is the fallback")),
                },
                TargetKind::S3(s3) => s3_keys(&mut out, s3),
                TargetKind::Tus => match target.api_key {
                    Some(_) => out.string("api_key", REDACTED),
                    None => out.comment("api_key not set: no Authorization unless headers has one"),
                },
            }
            if let Some(headers) = super::headers::redacted_headers(&target.headers) {
                out.value("headers", headers);
            }
            out.string("chunk_size", &format_size(target.chunk_size));
            out.value(
                "concurrency",
                Value::Integer(saturating_i64(target.concurrency)),
            );
            match target.max_retries {
                Some(n) => out.value("max_retries", Value::Integer(n.into())),
                None => out.string("max_retries", "infinite"),
            }
            out.string(
                "initial_retry_delay",
                &format_duration(target.initial_retry_delay),
            );
            out.string("max_retry_delay", &format_duration(target.max_retry_delay));
            out.value("retry_multiplier", Value::Float(target.retry_multiplier));
            out.string("timeout", &format_duration(target.timeout));
            for (key, file) in [
                ("ca_file", &target.tls.ca_file),
                ("client_cert", &target.tls.client_cert),
                ("client_key", &target.tls.client_key),
            ] {
                if let Some(file) = file {
                    out.string(key, &pem_path_text(file));
                }
            }
        }

        for spool in &self.spools {
            out.section("[[spool]]");
            out.string("path", &path_text(&spool.path));
            out.string("target", &spool.target);
            out.value("recursive", Value::Boolean(spool.recursive));
            out.value("include", string_array(spool.include.iter()));
            out.value("exclude", string_array(spool.exclude.iter()));
            out.string("settle", &format_duration(spool.settle));
            out.string("disposition", spool.disposition.as_str());
            if let Disposition::Move { to } = &spool.disposition {
                out.string("move_to", &path_text(to));
            }
            out.string("remote_prefix", &spool.remote_prefix);
        }

        if let Some(server) = &self.server {
            out.section("[server]");
            out.string("listen", &server.listen.to_string());
            out.string("output_dir", &path_text(&server.output_dir));
            out.value(
                "api_keys",
                string_array(server.api_keys.iter().map(|_| REDACTED)),
            );
            out.string("path_mode", server.path_mode.as_str());
            out.string("max_chunk_bytes", &format_size(server.max_chunk_bytes));
            out.string("max_file_bytes", &format_size(server.max_file_bytes));
            out.string(
                "incomplete_expiry",
                &format_duration(server.incomplete_expiry),
            );
            out.string("state_dir", &path_text(&server.state_dir));
            out.value(
                "max_connections",
                Value::Integer(saturating_i64(server.max_connections)),
            );
            out.string("tus_path", &server.tus_path);
            out.string("output_layout", server.output_layout.as_str());
            if let Some(tls) = &server.tls {
                out.string("tls_cert", &pem_path_text(&tls.cert));
                out.string("tls_key", &pem_path_text(&tls.key));
                if let Some(ca) = &tls.client_ca {
                    out.string("tls_client_ca", &pem_path_text(ca));
                }
            }
            // Only the key's hash is kept, so that is what is shown.
            for client in &server.clients {
                out.section("[[server.client]]");
                out.string("name", &client.name);
                out.string("api_key_sha256", &hex::encode(client.key_sha256));
                if let Some(subject) = &client.cert_subject {
                    out.string("cert_subject", subject);
                }
            }
        }
        out.text
    }
}

/// The keys of an object storage target; the secret key is shown by the
/// file it is read from, never by its value.
fn s3_keys(out: &mut TomlWriter, s3: &S3Target) {
    match &s3.endpoint {
        Some(endpoint) => out.string("endpoint", endpoint),
        None => out.comment("endpoint not set: AWS S3"),
    }
    match &s3.region {
        Some(region) => out.string("region", region),
        None => out.comment(&format!(
            "region not set: AWS_REGION, else {}",
            defaults::S3_REGION
        )),
    }
    match &s3.access_key_id {
        Some(id) => out.string("access_key_id", id),
        None => {
            out.comment("access_key_id not set: AWS_ACCESS_KEY_ID, else the AWS credential chain")
        }
    }
    match &s3.secret_access_key_file {
        Some(file) => out.string("secret_access_key_file", &path_text(file)),
        None => out.comment(
            "secret_access_key_file not set: AWS_SECRET_ACCESS_KEY, else the AWS credential chain",
        ),
    }
    out.string("part_size", &format_size(s3.part_size));
    out.string("on_conflict", s3.on_conflict.as_str());
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// A PEM file's path, made absolute: it was resolved against the
/// configuration file's directory, and would be resolved again if relative.
fn pem_path_text(file: &crate::config::PemFile) -> String {
    path_text(&std::path::absolute(&file.path).unwrap_or_else(|_| file.path.clone()))
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn string_array<S: AsRef<str>>(items: impl Iterator<Item = S>) -> Value {
    Value::Array(
        items
            .map(|s| Value::String(s.as_ref().to_owned()))
            .collect(),
    )
}

/// Writes TOML in the order of the reference file, which a serialised table
/// would not keep.
#[derive(Default)]
struct TomlWriter {
    text: String,
}

impl TomlWriter {
    fn comment(&mut self, comment: &str) {
        self.text.push_str("# ");
        self.text.push_str(comment);
        self.text.push('\n');
    }

    fn section(&mut self, header: &str) {
        self.text.push('\n');
        self.text.push_str(header);
        self.text.push('\n');
    }

    fn value(&mut self, key: &str, value: Value) {
        self.text.push_str(&format!("{key} = {value}\n"));
    }

    fn string(&mut self, key: &str, value: &str) {
        self.value(key, Value::String(value.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn effective_toml_redacts_keys_and_parses_back() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("b.key"), "from-file\n").unwrap();
        fs::write(dir.path().join("d.secret"), "s3-secret\n").unwrap();
        let source = dir.path().join("indexedcp.toml");
        let text = "[daemon]\nstate_dir = \"state\"\nlog_level = \"indexedcp=debug,info\"\n\
                    log_format = \"json\"\ncheck_interval = \"1500ms\"\nmax_buffer_bytes = 12345\n\
                    [[target]]\nname = \"a\"\nurl = \"http://a/upload\"\napi_key = \"inline-secret\"\n\
                    max_retries = 7\nretry_multiplier = 1.5\n\
                    [[target]]\nname = \"b\"\nurl = \"https://b/upload\"\napi_key_file = \"b.key\"\n\
                    [[target]]\nname = \"c\"\nurl = \"https://c/upload\"\n\
                    [[target]]\nname = \"d\"\nkind = \"s3\"\nurl = \"s3://bucket/in/\"\n\
                    endpoint = \"http://127.0.0.1:9000\"\naccess_key_id = \"AKID\"\n\
                    secret_access_key_file = \"d.secret\"\npart_size = \"16MiB\"\non_conflict = \"overwrite\"\n\
                    [[spool]]\npath = \"in\"\ntarget = \"b\"\nrecursive = false\n\
                    include = [\"*.dat\", \"*.csv\"]\nexclude = [\"skip-*\"]\ndisposition = \"move\"\n\
                    move_to = \"done\"\nremote_prefix = \"site-a/\"\n\
                    [server]\noutput_dir = \"out\"\napi_keys = [\"k1\", \"k2\"]\nmax_file_bytes = \"1GB\"\n";
        let config = Config::parse(text, &source).unwrap();
        let effective = config.to_effective_toml();

        for secret in [
            "inline-secret",
            "from-file",
            "s3-secret",
            "\"k1\"",
            "\"k2\"",
        ] {
            assert!(!effective.contains(secret), "{secret} leaked:\n{effective}");
        }
        assert!(
            effective.contains("api_keys = [\"<redacted>\", \"<redacted>\"]"),
            "{effective}"
        );
        assert!(
            effective.contains("state_dir = \"out/.indexedcp\""),
            "{effective}"
        );
        for line in [
            "kind = \"s3\"\nurl = \"s3://bucket/in/\"\nendpoint = \"http://127.0.0.1:9000\"\n\
             # region not set: AWS_REGION, else us-east-1\naccess_key_id = \"AKID\"\n\
             secret_access_key_file = \"d.secret\"\npart_size = \"16MiB\"\non_conflict = \"overwrite\"\n",
            "name = \"c\"\nkind = \"indexedcp\"\n",
        ] {
            assert!(effective.contains(line), "{line} missing in:\n{effective}");
        }

        let reparsed = Config::parse(&effective, &source).unwrap();
        let mut expected = config.clone();
        for target in &mut expected.targets {
            if target.api_key.is_some() {
                target.api_key = Some(REDACTED.to_owned());
            }
        }
        let server = expected.server.as_mut().unwrap();
        server.api_keys = vec![REDACTED.to_owned(); 2];
        assert_eq!(reparsed, expected);
        assert_eq!(reparsed.to_effective_toml(), effective);
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config"));
        let mut n_parsed = 0;
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                let config = Config::load(&path).unwrap_or_else(|error| panic!("{error}"));
                // The effective form of every example must be valid too.
                Config::parse(&config.to_effective_toml(), &path).unwrap();
                n_parsed += 1;
            }
        }
        assert!(
            n_parsed >= 2,
            "expected indexedcp.toml and quickstart.toml in {}",
            dir.display()
        );
    }
}
