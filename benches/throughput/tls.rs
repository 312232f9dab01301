//! Scenario 8: the large file end to end over HTTPS against the same over
//! plain HTTP, in the same run: an agent daemon sending to `indexedcp server`
//! (two processes, as in scenario 5), once with `--tls-cert`/`--tls-key` and
//! `ca_file`, once without. The certificate is made with rcgen for
//! 127.0.0.1. The figure is the TLS speed, the baseline the plain one.

use anyhow::{Context, Result, anyhow};

use super::processes::{RunDir, Running, start_daemon, start_receiver, utf8};
use super::scenarios::LargeFile;
use super::table::{Named, mb_per_s, median_of};
use super::{KEY, Settings};

pub(super) struct TlsVsPlain {
    pub(super) tls_mb_per_s: f64,
    pub(super) plain_mb_per_s: f64,
}

/// Writes a CA and a server certificate for 127.0.0.1 into `dir`; returns
/// (CA file, certificate file, key file).
fn certificates(dir: &std::path::Path) -> Result<(String, String, String)> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &issuer)?;
    let paths = [
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    ];
    for (path, pem) in paths
        .iter()
        .zip([issuer.pem(), leaf.pem(), key.serialize_pem()])
    {
        std::fs::write(path, pem).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let [ca, cert, key] = paths;
    Ok((
        utf8(&ca)?.to_owned(),
        utf8(&cert)?.to_owned(),
        utf8(&key)?.to_owned(),
    ))
}

/// One TLS run: the receiver with a certificate, the agent trusting its CA.
fn over_tls(settings: &Settings, large: &LargeFile) -> Result<f64> {
    let run = RunDir::create(settings)?;
    let (ca, cert, key) = certificates(&run.root)?;
    let args = [
        "server",
        "--port",
        "0",
        "--output-dir",
        utf8(&run.out)?,
        "-k",
        KEY,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ];
    let receiver = Running::start("receiver", &run.root, &args)?;
    let url = receiver.server_url()?;
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("no port in the receiver's address {url}"))?;
    let config = format!(
        "[daemon]\nstate_dir = {state:?}\nlog_format = \"text\"\n\n\
         [[target]]\nname = \"receiver\"\nurl = \"https://127.0.0.1:{port}/upload\"\napi_key = \"{KEY}\"\nca_file = {ca:?}\n\n\
         [[spool]]\npath = {spool:?}\ntarget = \"receiver\"\n",
        state = utf8(&run.state)?,
        spool = utf8(&run.spool)?,
    );
    std::fs::write(&run.config, config)?;
    let agent = Running::start(
        "agent",
        &run.root,
        &["daemon", "--config", utf8(&run.config)?],
    )?;
    deliver("TLS", &run, large, agent, receiver)
}

/// The same without TLS.
fn plain(settings: &Settings, large: &LargeFile) -> Result<f64> {
    let run = RunDir::create(settings)?;
    let (receiver, port) = start_receiver(&run)?;
    let agent = start_daemon(&run, "agent", port, None)?;
    deliver("plain", &run, large, agent, receiver)
}

/// Drops the file into the running agent's spool, waits for it at the
/// receiver and stops both; MB/s, printed with both processes' CPU time.
fn deliver(
    label: &str,
    run: &RunDir,
    large: &LargeFile,
    mut agent: Running,
    mut receiver: Running,
) -> Result<f64> {
    let elapsed = large.drop_and_wait(run, &mut receiver)?;
    agent.ensure_alive()?;
    let (agent_cpu, receiver_cpu) = (agent.cpu_seconds()?, receiver.cpu_seconds()?);
    agent.stop();
    receiver.stop();
    let speed = mb_per_s(large.size, elapsed);
    eprintln!(
        "  {label}: {speed:.1} MB/s in {:.2} s; CPU agent {agent_cpu:.1} s, receiver {receiver_cpu:.1} s",
        elapsed.as_secs_f64()
    );
    Ok(speed)
}

pub(super) fn tls_vs_plain(settings: &Settings, large: &LargeFile) -> Result<TlsVsPlain> {
    let runs = settings.repeat("8. large file over TLS and over plain HTTP", || {
        Ok((over_tls(settings, large)?, plain(settings, large)?))
    })?;
    Ok(TlsVsPlain {
        tls_mb_per_s: median_of(&runs, |r| r.0),
        plain_mb_per_s: median_of(&runs, |r| r.1),
    })
}

impl TlsVsPlain {
    pub(super) fn baseline(&self) -> Named {
        Named {
            label: "same over plain HTTP",
            value: self.plain_mb_per_s,
        }
    }
}
