//! HTTPS end to end: a receiver with a certificate made by rcgen, and the
//! agent, the one-shot command, curl and openssl as its clients. `pki` makes
//! the certificates; the receiver runs as `indexedcp daemon` so that SIGHUP
//! reloads it, with its log in a file that the tests read.

mod agent;
mod bucket;
mod clients;
mod mtls;
mod pki;
mod receiver;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::fixtures::{KEY, unsafe_kill};
use crate::support::*;

pub const SIGHUP: i32 = 1;

/// A receiver (`indexedcp daemon` with a `[server]` section) on 127.0.0.1.
pub struct TlsReceiver {
    pub child: Child,
    /// `https://127.0.0.1:PORT` (or `http://` without a certificate).
    pub url: String,
    pub port: u16,
    pub log: PathBuf,
    pub out: PathBuf,
}

impl TlsReceiver {
    /// Starts a receiver whose `[server]` section is the defaults plus `extra`
    /// (TOML lines such as `tls_cert = "..."`), writing into `dir/out`.
    pub fn start(dir: &Path, extra: &str) -> TlsReceiver {
        TlsReceiver::start_with(dir, "", extra, &[])
    }

    /// [`TlsReceiver::start`] with `daemon_extra` lines in `[daemon]` and
    /// `env` set for the process; its log is appended to, so that a
    /// restart in the same `dir` keeps what the previous run wrote.
    pub fn start_with(
        dir: &Path,
        daemon_extra: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> TlsReceiver {
        let config = dir.join("receiver.toml");
        let out = dir.join("out");
        std::fs::create_dir_all(dir).unwrap();
        TlsReceiver::write_config_with(dir, daemon_extra, extra);
        let log = dir.join("receiver.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut child = indexedcp()
            .args(["daemon", "--config"])
            .arg(&config)
            .env("INDEXEDCP_LOG_LEVEL", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .expect("start indexedcp daemon");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("Server listening on ") {
                        break url.trim().to_owned();
                    }
                }
                _ => panic!(
                    "the receiver printed no listening line; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        };
        // Keep reading so that a later line never blocks the receiver.
        std::thread::spawn(move || for _ in lines {});
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        TlsReceiver {
            child,
            url,
            port,
            log,
            out,
        }
    }

    /// (Re)writes the configuration; [`TlsReceiver::reload`] applies it.
    pub fn write_config(dir: &Path, extra: &str) {
        TlsReceiver::write_config_with(dir, "", extra)
    }

    /// [`TlsReceiver::write_config`] with `daemon_extra` lines in `[daemon]`.
    pub fn write_config_with(dir: &Path, daemon_extra: &str, extra: &str) {
        let text = format!(
            "[daemon]\nstate_dir = {state:?}\nshutdown_grace = \"30s\"\n{daemon_extra}\n[server]\nlisten = \"127.0.0.1:0\"\n\
             output_dir = {out:?}\napi_keys = [\"{KEY}\"]\nmax_chunk_bytes = \"256MiB\"\n{extra}\n",
            state = dir.join("state").display().to_string(),
            out = dir.join("out").display().to_string(),
        );
        std::fs::write(dir.join("receiver.toml"), text).unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGHUP and waits until the log says the reload was applied
    /// (`configuration reloaded`) or refused; returns the new log lines.
    pub fn reload(&self) -> String {
        let before = self.log_text().len();
        unsafe_kill(self.child.id(), SIGHUP);
        let mut new = String::new();
        wait_until(
            "the receiver's reload",
            Duration::from_millis(20),
            Duration::from_secs(20),
            || {
                new = self.log_text()[before..].to_owned();
                Ok(new.contains("configuration reloaded") || new.contains("reload refused"))
            },
        )
        .unwrap();
        new
    }

    /// The upload URL with `localhost` or `127.0.0.1` as the host.
    pub fn upload_url(&self, host: &str) -> String {
        format!("https://{host}:{}/upload", self.port)
    }
}

impl Drop for TlsReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a tool (curl, openssl) that must be installed, with stdin closed.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (install it): {e}"))
}

/// The serial number of the certificate the receiver on `port` presents to
/// a new connection, as `openssl x509 -serial` prints it (`serial=02`).
pub fn served_serial(port: u16) -> String {
    let connect = format!("127.0.0.1:{port}");
    let hello = run(
        "openssl",
        &["s_client", "-connect", &connect, "-servername", "localhost"],
    );
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run openssl");
    use std::io::Write;
    x509.stdin.take().unwrap().write_all(&hello.stdout).unwrap();
    let output = x509.wait_with_output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
