//! A certificate the client does not accept (unknown CA, expired, another
//! host's) is a configuration problem: the agent logs the host and the
//! reason and waits at its longest retry delay until a SIGHUP brings a fixed
//! configuration, which sends the waiting files at once.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::pki::{Ca, Leaf, install};
use super::{SIGHUP, TlsReceiver};
use crate::fixtures::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn unknown_ca_is_logged_with_host_and_reason_and_a_fixed_config_delivers_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(&dir.path().join("pki"), "test-ca");
    let cert = ca.server("server", 1);
    let receiver = TlsReceiver::start(
        &dir.path().join("r"),
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            cert.cert.display().to_string(),
            cert.key.display().to_string()
        ),
    );
    let agent_dir = dir.path().join("a");
    let (spool, staging) = (agent_dir.join("spool"), agent_dir.join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    // Retries every 10 minutes at most: only the reload can deliver in time.
    let slow = "initial_retry_delay = \"10m\"\nmax_retry_delay = \"10m\"\n";
    let url = receiver.upload_url("127.0.0.1");
    let config = agent_config(&agent_dir, &url, &spool, "", slow);
    let log = agent_dir.join("agent.log");
    let mut agent = indexedcp()
        .args(["daemon", "--config"])
        .arg(&config)
        .env("INDEXEDCP_LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    drop_file(&staging, &spool, "waiting.txt", b"sent once trusted");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(
        "the refusal in the agent's log",
        Duration::from_millis(50),
        Duration::from_secs(20),
        || Ok(read_log().contains("TLS with 127.0.0.1 failed")),
    )
    .unwrap();
    let text = read_log();
    let line = text
        .lines()
        .find(|l| l.contains("TLS with 127.0.0.1 failed"))
        .unwrap();
    assert!(line.contains("UnknownIssuer"), "no reason in: {line}");
    assert!(
        line.contains("fix the [[target]] and send SIGHUP"),
        "not a configuration problem: {line}"
    );
    assert!(visible_files(&receiver.out).is_empty());

    let fixed = format!("{slow}ca_file = {:?}\n", ca.ca_pem.display().to_string());
    agent_config(&agent_dir, &url, &spool, "", &fixed);
    let reloaded = Instant::now();
    unsafe_kill(agent.id(), SIGHUP);
    let mut expected = BTreeMap::new();
    expected.insert("waiting.txt".to_string(), b"sent once trusted".to_vec());
    wait_for_files(&receiver.out, &expected, Duration::from_secs(15)).await;
    eprintln!("delivered {:?} after the reload", reloaded.elapsed());
    assert_eq!(
        signal_and_wait(&mut agent, 15, Duration::from_secs(20)).code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_and_wrong_host_certificates_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(&dir.path().join("pki"), "test-ca");
    let live = ca.server("live", 1);
    let expired = ca.issue(
        "expired",
        Leaf::Server(&["127.0.0.1", "localhost"]),
        2,
        true,
    );
    let elsewhere = ca.issue("elsewhere", Leaf::Server(&["files.example.org"]), 3, false);
    let receiver = TlsReceiver::start(
        &dir.path().join("r"),
        &format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            live.cert.display().to_string(),
            live.key.display().to_string()
        ),
    );
    let file = dir.path().join("a.txt");
    std::fs::write(&file, b"never sent").unwrap();
    let upload = |n: u32| {
        indexedcp()
            .args([
                "upload",
                "--server",
                &receiver.upload_url("localhost"),
                "-k",
                KEY,
            ])
            .arg("--cacert")
            .arg(&ca.ca_pem)
            .args(["--max-retries", "0", "--storage"])
            .arg(dir.path().join(format!("cli-{n}.db")))
            .arg(&file)
            .output()
            .unwrap()
    };
    for (n, (cert, reason)) in [(&expired, "expired"), (&elsewhere, "not valid for name")]
        .into_iter()
        .enumerate()
    {
        install(cert, &live);
        let log = receiver.reload();
        assert!(log.contains("configuration reloaded"), "{log}");
        let output = upload(n as u32);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "sent despite {reason}");
        assert!(stderr.contains("TLS with localhost failed"), "{stderr}");
        assert!(
            stderr.to_lowercase().contains(reason),
            "{reason} not named in: {stderr}"
        );
    }
    assert!(visible_files(&receiver.out).is_empty());
}
