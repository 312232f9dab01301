//! Client certificates: with `tls_client_ca` the receiver completes a
//! handshake only with a certificate that CA signed; the agent and the
//! one-shot command present theirs with `client_cert`/`--cert`.

use std::collections::BTreeMap;
use std::time::Duration;

use super::pki::Ca;
use super::{TlsReceiver, run};
use crate::fixtures::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn mtls_accepts_only_certificates_from_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(&dir.path().join("pki"), "server-ca");
    let clients = Ca::new(&dir.path().join("pki"), "client-ca");
    let other = Ca::new(&dir.path().join("pki"), "other-ca");
    let cert = ca.server("server", 1);
    let good = clients.client("clinic-12", "clinic-12");
    let stranger = other.client("stranger", "clinic-12");
    let extra = format!(
        "tls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\n",
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
        clients.ca_pem.display().to_string()
    );
    let receiver = TlsReceiver::start(&dir.path().join("r"), &extra);
    let ca_pem = ca.ca_pem.display().to_string();
    let health = format!("https://localhost:{}/health", receiver.port);
    let curl = |extra: &[&str]| {
        let mut args = vec!["-sS", "--fail", "--cacert", &ca_pem];
        args.extend_from_slice(extra);
        args.push(&health);
        run("curl", &args)
    };
    let (good_cert, good_key) = (
        good.cert.display().to_string(),
        good.key.display().to_string(),
    );
    let (bad_cert, bad_key) = (
        stranger.cert.display().to_string(),
        stranger.key.display().to_string(),
    );
    assert!(
        !curl(&[]).status.success(),
        "served without a client certificate"
    );
    assert!(
        !curl(&["--cert", &bad_cert, "--key", &bad_key])
            .status
            .success(),
        "served a certificate from another CA"
    );
    let accepted = curl(&["--cert", &good_cert, "--key", &good_key]);
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    assert!(String::from_utf8_lossy(&accepted.stdout).contains("ok"));

    // The one-shot command: refused without --cert, delivered with it.
    let file = dir.path().join("report.pdf");
    std::fs::write(&file, pseudo_random(300_000, 4)).unwrap();
    let upload = |with_cert: bool| {
        let mut command = indexedcp();
        command
            .args([
                "upload",
                "--server",
                &receiver.upload_url("localhost"),
                "-k",
                KEY,
            ])
            .args(["--cacert", &ca_pem, "--max-retries", "0", "--storage"])
            .arg(dir.path().join(format!("cli-{with_cert}.db")));
        if with_cert {
            command.args(["--cert", &good_cert, "--key", &good_key]);
        }
        command.arg(&file).output().unwrap()
    };
    let refused = upload(false);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("TLS with localhost failed"), "{stderr}");
    assert!(visible_files(&receiver.out).is_empty());
    let sent = upload(true);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );

    // The agent with client_cert and client_key.
    let agent_dir = dir.path().join("a");
    let (spool, staging) = (agent_dir.join("spool"), agent_dir.join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let target =
        format!("ca_file = {ca_pem:?}\nclient_cert = {good_cert:?}\nclient_key = {good_key:?}\n");
    let config = agent_config(
        &agent_dir,
        &receiver.upload_url("127.0.0.1"),
        &spool,
        "",
        &target,
    );
    let _agent = Daemon::start(&config);
    let scan = pseudo_random(2 << 20, 5);
    drop_file(&staging, &spool, "scan.dcm", &scan);
    let mut expected = BTreeMap::new();
    expected.insert("report.pdf".to_string(), std::fs::read(&file).unwrap());
    expected.insert("scan.dcm".to_string(), scan);
    wait_for_files(&receiver.out, &expected, Duration::from_secs(30)).await;
}

/// A TLS 1.3 client finishes its side of the handshake before the receiver
/// has checked its certificate, and may send a whole request at once. The
/// refusal must still reach it as the alert that says why ("certificate
/// required"), not as a reset or a bare end of file: the receiver reads and
/// discards what was sent before it closes. Python's `ssl` writes the
/// request in one blocking `sendall`, the way that lost the alert.
#[test]
fn a_client_that_sends_before_the_refusal_still_hears_why() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(&dir.path().join("pki"), "server-ca");
    let clients = Ca::new(&dir.path().join("pki"), "client-ca");
    let cert = ca.server("server", 1);
    let extra = format!(
        "tls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\n",
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
        clients.ca_pem.display().to_string()
    );
    let receiver = TlsReceiver::start(&dir.path().join("r"), &extra);
    let probe = format!(
        r#"
import socket, ssl
ctx = ssl.create_default_context(cafile={ca:?})
for attempt in range(10):
    tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="localhost")
    try:
        tls.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 2000000)
        tls.recv(100)
        print("attempt", attempt, "was answered")
    except Exception as e:
        print("attempt", attempt, type(e).__name__, e)
    tls.close()
"#,
        ca = ca.ca_pem.display().to_string(),
        port = receiver.port
    );
    let output = run("python3", &["-c", &probe]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout.matches("CERTIFICATE_REQUIRED").count(),
        10,
        "each attempt must end with the certificate-required alert:\n{stdout}"
    );
}
