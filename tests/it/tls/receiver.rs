//! The receiver over HTTPS: every client delivers byte-identical files,
//! plain HTTP and TLS 1.1 are refused, and SIGHUP rotates the certificate
//! (of the daemon, and of `indexedcp server` started with flags only)
//! without breaking an upload in flight.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::pki::{Ca, install};
use super::{TlsReceiver, run, served_serial};
use crate::fixtures::*;
use crate::support::*;

fn tls_lines(cert: &super::pki::CertFiles) -> String {
    format!(
        "tls_cert = {:?}\ntls_key = {:?}\n",
        cert.cert.display().to_string(),
        cert.key.display().to_string()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn https_receiver_serves_agent_cli_and_curl_and_refuses_plain_http_and_tls_1_1() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(&dir.path().join("pki"), "test-ca");
    let cert = ca.server("server", 1);
    let receiver = TlsReceiver::start(&dir.path().join("r"), &tls_lines(&cert));
    assert!(receiver.url.starts_with("https://"), "{}", receiver.url);
    let mut expected = BTreeMap::new();

    // The agent, trusting the test CA through ca_file.
    let agent_dir = dir.path().join("a");
    let (spool, staging) = (agent_dir.join("spool"), agent_dir.join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let extra = format!("ca_file = {:?}\n", ca.ca_pem.display().to_string());
    let config = agent_config(
        &agent_dir,
        &receiver.upload_url("127.0.0.1"),
        &spool,
        "",
        &extra,
    );
    let mut agent = Daemon::start(&config);
    let from_agent = pseudo_random(3 << 20, 1);
    drop_file(&staging, &spool, "from-agent.bin", &from_agent);
    expected.insert("from-agent.bin".to_string(), from_agent);
    wait_for_files(&receiver.out, &expected, Duration::from_secs(30)).await;
    assert_eq!(
        agent.signal_and_wait(15, Duration::from_secs(20)).code(),
        Some(0)
    );

    // The one-shot command, with curl's --cacert, by host name.
    let file = dir.path().join("from-cli.bin");
    let from_cli = pseudo_random(5 << 20, 2);
    std::fs::write(&file, &from_cli).unwrap();
    let output = indexedcp()
        .args([
            "upload",
            "--server",
            &receiver.upload_url("localhost"),
            "-k",
            KEY,
        ])
        .arg("--cacert")
        .arg(&ca.ca_pem)
        .arg("--storage")
        .arg(dir.path().join("cli.db"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "upload failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    expected.insert("from-cli.bin".to_string(), from_cli);
    wait_for_files(&receiver.out, &expected, Duration::from_secs(10)).await;

    // A client that connects and never speaks stalls nobody: its handshake
    // waits in its own task.
    let _silent: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", receiver.port)).unwrap())
        .collect();

    // curl with --cacert, a v1 upload.
    let body = dir.path().join("from-curl.txt");
    std::fs::write(&body, b"sent by curl over TLS").unwrap();
    let auth = format!("Authorization: Bearer {KEY}");
    let at_body = format!("@{}", body.display());
    let ca_pem = ca.ca_pem.display().to_string();
    let curl = run(
        "curl",
        &[
            "-sS",
            "--fail",
            "--cacert",
            &ca_pem,
            "-H",
            &auth,
            "-H",
            "X-File-Name: from-curl.txt",
            "--data-binary",
            &at_body,
            &receiver.upload_url("localhost"),
        ],
    );
    assert!(
        curl.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    expected.insert(
        "from-curl.txt".to_string(),
        b"sent by curl over TLS".to_vec(),
    );
    wait_for_files(&receiver.out, &expected, Duration::from_secs(10)).await;

    // Plain HTTP on the same port is not served: the connection fails
    // without an HTTP reply.
    let plain = format!("http://127.0.0.1:{}/health", receiver.port);
    let curl = run(
        "curl",
        &["-sS", "-o", "/dev/null", "-w", "%{http_code}", &plain],
    );
    assert!(!curl.status.success(), "plain HTTP was answered");
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "000");
    // Without the CA, curl refuses the receiver's certificate.
    let health = format!("https://localhost:{}/health", receiver.port);
    assert!(!run("curl", &["-sS", &health]).status.success());

    // TLS 1.1 is refused by the receiver: this openssl offers it only at
    // security level 0, and the receiver answers with a handshake_failure
    // alert (the 7 bytes read). TLS 1.2 and 1.3 are accepted.
    let connect = format!("127.0.0.1:{}", receiver.port);
    let handshake = |extra: &[&str]| {
        let mut args = vec!["s_client", "-connect", &connect, "-CAfile", &ca_pem];
        args.extend_from_slice(extra);
        let output = run("openssl", &args);
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    };
    let (_, text) = handshake(&["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]);
    assert!(
        text.contains("Cipher is (NONE)") && text.contains("alert handshake failure"),
        "TLS 1.1 accepted:\n{text}"
    );
    for version in ["-tls1_2", "-tls1_3"] {
        let (ok, text) = handshake(&[version]);
        assert!(
            ok && text.contains("Verify return code: 0 (ok)"),
            "{version} refused:\n{text}"
        );
    }
    assert_eq!(
        visible_files(&receiver.out),
        expected,
        "nothing else was written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rotates_the_certificate_during_a_large_upload() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(&dir.path().join("pki"), "test-ca");
    let live = ca.server("live", 1);
    let renewed = ca.server("renewed", 2);
    let receiver = TlsReceiver::start(&dir.path().join("r"), &tls_lines(&live));
    assert_eq!(served_serial(receiver.port), "serial=01");

    // A 200 MiB upload, rate-limited so that it is still running when the
    // certificate changes.
    let big = dir.path().join("big.bin");
    let data = pseudo_random(200 << 20, 3);
    std::fs::write(&big, &data).unwrap();
    let auth = format!("Authorization: Bearer {KEY}");
    let mut curl = std::process::Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "--limit-rate",
            "40M",
            "-X",
            "POST",
            "-H",
            "Expect:",
        ])
        .args(["--cacert", &ca.ca_pem.display().to_string()])
        .args(["-H", &auth, "-H", "X-File-Name: big.bin", "-T"])
        .arg(&big)
        .arg(receiver.upload_url("localhost"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run curl");
    let started = Instant::now();
    // Once some bytes reached the receiver, rotate.
    let received = dir.path().join("r/out");
    wait_until(
        "the upload to start",
        Duration::from_millis(20),
        Duration::from_secs(20),
        || {
            Ok(walk(&received)
                .iter()
                .filter_map(|e| std::fs::metadata(&e.path).ok())
                .any(|m| m.is_file() && m.len() > 1 << 20))
        },
    )
    .unwrap();

    // A broken renewal first: a key that is not the certificate's. The
    // running certificate stays.
    std::fs::copy(&renewed.cert, &live.cert).unwrap();
    let log = receiver.reload();
    assert!(log.contains("reload: receiver settings kept"), "{log}");
    assert!(log.contains("do not make a usable certificate"), "{log}");
    assert_eq!(served_serial(receiver.port), "serial=01");

    install(&renewed, &live);
    let log = receiver.reload();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert_eq!(served_serial(receiver.port), "serial=02");
    assert!(
        curl.try_wait().unwrap().is_none(),
        "the upload ended before the rotation ({:?}); nothing was tested",
        started.elapsed()
    );
    let status = curl.wait().unwrap();
    assert!(status.success(), "the upload in flight failed: {status}");
    let got = std::fs::read(receiver.out.join("big.bin")).unwrap();
    assert!(got == data, "big.bin differs after the rotation");
}

/// `indexedcp server --tls-cert --tls-key`, without a config file: SIGHUP
/// re-reads the same files. A broken renewal (a key that is not the
/// certificate's) is logged and the running certificate stays; a good one
/// is served to the next connection, and uploads keep working.
#[tokio::test(flavor = "multi_thread")]
async fn server_command_started_with_flags_rotates_its_certificate_on_sighup() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(&dir.path().join("pki"), "test-ca");
    let live = ca.server("live", 1);
    let renewed = ca.server("renewed", 2);
    let out = dir.path().join("out");
    let log = dir.path().join("server.log");
    let mut child = indexedcp()
        .args(["server", "--port", "0", "-k", KEY, "--output-dir"])
        .arg(&out)
        .arg("--tls-cert")
        .arg(&live.cert)
        .arg("--tls-key")
        .arg(&live.key)
        .env("INDEXEDCP_LOG_LEVEL", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start indexedcp server");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(url) = line.strip_prefix("Server listening on ") {
                    break url.trim().to_owned();
                }
            }
            _ => panic!(
                "no listening line; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(served_serial(port), "serial=01");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let hup = |expect: &str| {
        let before = log_text().len();
        unsafe_kill(child.id(), super::SIGHUP);
        let mut new = String::new();
        wait_until(
            "the reload's log line",
            Duration::from_millis(20),
            Duration::from_secs(20),
            || {
                new = log_text()[before..].to_owned();
                Ok(new.contains(expect))
            },
        )
        .unwrap_or_else(|e| panic!("{e}; log since the SIGHUP:\n{new}"));
        new
    };

    // A broken renewal: the new certificate with the old key.
    std::fs::copy(&renewed.cert, &live.cert).unwrap();
    let new = hup("certificate kept");
    assert!(new.contains("do not make a usable certificate"), "{new}");
    assert_eq!(served_serial(port), "serial=01");

    install(&renewed, &live);
    hup("certificate reloaded");
    assert_eq!(served_serial(port), "serial=02");
    // The same files again: nothing to do.
    hup("certificate files unchanged");

    let curl = run(
        "curl",
        &[
            "-sS",
            "--fail",
            "--cacert",
            &ca.ca_pem.display().to_string(),
            "-H",
            &format!("Authorization: Bearer {KEY}"),
            "-H",
            "X-File-Name: after.txt",
            "--data-binary",
            "after the rotation",
            &format!("https://localhost:{port}/upload"),
        ],
    );
    assert!(
        curl.status.success(),
        "{}",
        String::from_utf8_lossy(&curl.stderr)
    );
    assert_eq!(
        std::fs::read(out.join("after.txt")).unwrap(),
        b"after the rotation"
    );
    assert_eq!(
        signal_and_wait(&mut child, 15, Duration::from_secs(20)).code(),
        Some(0)
    );
}
