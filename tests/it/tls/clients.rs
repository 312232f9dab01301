//! Named clients: each file lands in its client's folder (`by-client`), the
//! client is named in the receiver's log, a removed client is refused after
//! SIGHUP while its files stay, a certificate with another subject is
//! refused, a run of bad keys from one address is answered 429 with a
//! handful of log lines while good clients keep working, and the receiver's
//! state records which client started each upload.

use std::collections::BTreeMap;
use std::time::Duration;

use super::pki::Ca;
use super::{TlsReceiver, run};
use crate::fixtures::*;
use crate::support::*;

fn sha256_of(text: &str) -> String {
    sha256_hex(text.as_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn named_clients_by_client_layout_revocation_and_brute_force() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let ca = Ca::new(&pki, "server-ca");
    let clients = Ca::new(&pki, "client-ca");
    let cert = ca.server("server", 1);
    let clinic = clients.client("clinic-12", "clinic-12");
    let lab = clients.client("lab-3", "lab-3");
    std::fs::write(pki.join("clinic-12.apikey"), "clinic-12-key\n").unwrap();
    let tls = format!(
        "tls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\noutput_layout = \"by-client\"\n",
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
        clients.ca_pem.display().to_string()
    );
    let clinic_section = format!(
        "[[server.client]]\nname = \"clinic-12\"\napi_key_file = {:?}\ncert_subject = \"CN=clinic-12\"\n",
        pki.join("clinic-12.apikey").display().to_string()
    );
    let lab_section = format!(
        "[[server.client]]\nname = \"lab-3\"\napi_key_sha256 = \"{}\"\n",
        sha256_of("lab-3-key")
    );
    let rdir = dir.path().join("r");
    let receiver = TlsReceiver::start(&rdir, &format!("{tls}{clinic_section}{lab_section}"));

    let ca_pem = ca.ca_pem.display().to_string();
    let post = |key: &str, who: &super::pki::CertFiles, name: &str, body: &str| {
        let auth = format!("Authorization: Bearer {key}");
        let file_header = format!("X-File-Name: {name}");
        let (cert, key_file) = (
            who.cert.display().to_string(),
            who.key.display().to_string(),
        );
        let output = run(
            "curl",
            &[
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                &ca_pem,
                "--cert",
                &cert,
                "--key",
                &key_file,
                "-H",
                &auth,
                "-H",
                &file_header,
                "--data-binary",
                body,
                &receiver.upload_url("localhost"),
            ],
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert_eq!(
        post("clinic-12-key", &clinic, "report.pdf", "from the clinic"),
        "200"
    );
    assert_eq!(post("lab-3-key", &lab, "result.csv", "from the lab"), "200");
    assert_eq!(post(KEY, &lab, "shared.txt", "from an unnamed key"), "200");
    // The clinic's key with the lab's certificate: the subject does not match.
    assert_eq!(post("clinic-12-key", &lab, "stolen.txt", "x"), "401");

    // The lab's agent, over the resumable protocol, in several chunks.
    let agent_dir = dir.path().join("a");
    let (spool, staging) = (agent_dir.join("spool"), agent_dir.join("staging"));
    std::fs::create_dir_all(&staging).unwrap();
    let target = format!(
        "ca_file = {ca_pem:?}\nclient_cert = {:?}\nclient_key = {:?}\nchunk_size = \"256KiB\"\n",
        lab.cert.display().to_string(),
        lab.key.display().to_string()
    );
    let config = agent_config(
        &agent_dir,
        &receiver.upload_url("127.0.0.1"),
        &spool,
        "",
        &target,
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(KEY, "lab-3-key");
    std::fs::write(&config, text).unwrap();
    let mut agent = Daemon::start(&config);
    let scan = pseudo_random(1 << 20, 9);
    drop_file(&staging, &spool, "scan.bin", &scan);

    let mut expected = BTreeMap::new();
    expected.insert(
        "clinic-12/report.pdf".to_string(),
        b"from the clinic".to_vec(),
    );
    expected.insert("lab-3/result.csv".to_string(), b"from the lab".to_vec());
    expected.insert("shared.txt".to_string(), b"from an unnamed key".to_vec());
    expected.insert("lab-3/scan.bin".to_string(), scan);
    wait_for_files(&receiver.out, &expected, Duration::from_secs(30)).await;
    assert_eq!(
        agent.signal_and_wait(15, Duration::from_secs(20)).code(),
        Some(0)
    );
    let log = receiver.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("client=lab-3") && l.contains("scan.bin")),
        "no log line names the lab with its upload:\n{log}"
    );

    // Revocation: the clinic's section removed, SIGHUP, refused at once;
    // what it sent stays.
    TlsReceiver::write_config(&rdir, &format!("{tls}{lab_section}"));
    let reload = receiver.reload();
    assert!(reload.contains("configuration reloaded"), "{reload}");
    assert_eq!(post("clinic-12-key", &clinic, "after.pdf", "x"), "401");
    assert_eq!(post("lab-3-key", &lab, "still.csv", "still in"), "200");
    expected.insert("lab-3/still.csv".to_string(), b"still in".to_vec());
    assert_eq!(visible_files(&receiver.out), expected);

    // 1,000 bad keys from 127.0.0.2, while the lab keeps sending from 127.0.0.1.
    let log_before = receiver.log_text().len();
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let identity = |c: &super::pki::CertFiles| {
        reqwest::Identity::from_pem(&[read(&c.cert), read(&c.key)].concat()).unwrap()
    };
    let client = |from: &str, who: &super::pki::CertFiles| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&read(&ca.ca_pem)).unwrap())
            .identity(identity(who))
            .local_address(Some(from.parse().unwrap()))
            .build()
            .unwrap()
    };
    let (attacker, good) = (client("127.0.0.2", &lab), client("127.0.0.1", &lab));
    let url = format!(
        "https://localhost:{}/upload/0123456789abcdef",
        receiver.port
    );
    let mut statuses = BTreeMap::<u16, u32>::new();
    for i in 0..1000 {
        let status = attacker
            .get(&url)
            .bearer_auth(format!("guess-{i}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        *statuses.entry(status).or_default() += 1;
        if i % 100 == 0 {
            let reply = good
                .get(&url)
                .bearer_auth("lab-3-key")
                .send()
                .await
                .unwrap();
            assert_eq!(
                reply.status().as_u16(),
                404,
                "the good client was refused at bad key {i}"
            );
        }
    }
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![401, 429],
        "{statuses:?}"
    );
    assert!(statuses[&429] > 900, "{statuses:?}");
    let log = receiver.log_text()[log_before..].to_owned();
    let lines = log.lines().filter(|l| l.contains("127.0.0.2")).count();
    assert!(
        (1..=8).contains(&lines),
        "{lines} log lines for 1,000 bad keys:\n{log}"
    );
}

/// The named client is part of each upload's record in the receiver's
/// state: `GET /upload/<id>` names it (an unnamed key's upload names none),
/// and an upload completed by recovery after a crash is logged with its
/// client, which no request of the new process could have told. The
/// per-client request counter of `/metrics` counts the client's requests.
#[tokio::test(flavor = "multi_thread")]
async fn the_named_client_is_recorded_with_each_upload_and_outlives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let rdir = dir.path().join("r");
    let metrics_port = free_port();
    let daemon_extra = format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\n");
    let lab_section = format!(
        "[[server.client]]\nname = \"lab-3\"\napi_key_sha256 = \"{}\"\n",
        sha256_of("lab-3-key")
    );
    let start =
        |env: &[(&str, &str)]| TlsReceiver::start_with(&rdir, &daemon_extra, &lab_section, env);
    let mut receiver = start(&[]);
    let http = reqwest::Client::new();
    let lab_auth = ("Authorization", "Bearer lab-3-key".to_string());
    let data = pseudo_random(3000, 12);
    let chunk = |index| ResumableChunk {
        upload_id: "lab3-upload-0000000001",
        name: "sample.bin",
        file: &data,
        chunk_size: 2000,
        index,
    };
    let upload_url = format!("{}/upload", receiver.url);
    let sent = chunk(0)
        .request_with(&http, &upload_url, std::slice::from_ref(&lab_auth))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status().as_u16(), 200);
    let status = |url: String, key: &'static str| {
        let http = http.clone();
        async move { json(http.get(url).bearer_auth(key).send().await.unwrap()).await }
    };
    let (code, reply) = status(
        format!("{}/upload/lab3-upload-0000000001", receiver.url),
        "lab-3-key",
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(reply["client"], "lab-3", "{reply}");
    assert_eq!(reply["receivedChunks"], serde_json::json!([0]), "{reply}");

    // An unnamed key's upload has no client.
    let unnamed = ResumableChunk {
        upload_id: "anon-upload-0000000001",
        name: "anon.bin",
        file: b"from an unnamed key",
        chunk_size: 1000,
        index: 0,
    };
    let sent = unnamed.request(&http, &upload_url).send().await.unwrap();
    assert_eq!(sent.status().as_u16(), 200);
    let (code, reply) = status(
        format!("{}/upload/anon-upload-0000000001", receiver.url),
        KEY,
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(reply["complete"], true, "{reply}");
    assert!(reply.get("client").is_none(), "{reply}");

    // The lab's two requests (a chunk and a status), none of the unnamed key's.
    let metrics = http
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "indexedcp_receiver_client_requests_total{client=\"lab-3\"} 2"),
        "{metrics}"
    );

    // The last chunk kills the receiver between recording the final name and
    // the rename; the restarted receiver completes the upload on its own and
    // says whose it was.
    receiver.child.kill().unwrap();
    receiver.child.wait().unwrap();
    let crashing = start(&[("INDEXEDCP_FAILPOINTS", "server-before-rename")]);
    let upload_url = format!("{}/upload", crashing.url);
    let sent = chunk(1)
        .request_with(&http, &upload_url, std::slice::from_ref(&lab_auth))
        .send()
        .await;
    assert!(sent.is_err(), "the receiver answered: {sent:?}");
    let mut crashing = crashing;
    let exit = crashing.child.wait().unwrap();
    assert!(!exit.success(), "{exit}");
    receiver = start(&[]);
    let mut recovered = String::new();
    wait_until(
        "the recovery's log line",
        Duration::from_millis(20),
        Duration::from_secs(20),
        || {
            recovered = receiver
                .log_text()
                .lines()
                .filter(|l| l.contains("recovered upload completed"))
                .collect();
            Ok(!recovered.is_empty())
        },
    )
    .unwrap();
    assert!(
        recovered.contains("client=lab-3") && recovered.contains("lab3-upload-0000000001"),
        "{recovered}"
    );
    assert_eq!(std::fs::read(rdir.join("out/sample.bin")).unwrap(), data);
    let (code, reply) = status(
        format!("{}/upload/lab3-upload-0000000001", receiver.url),
        "lab-3-key",
    )
    .await;
    assert_eq!(code, 200, "{reply}");
    assert_eq!(
        (&reply["complete"], &reply["client"]),
        (&serde_json::json!(true), &serde_json::json!("lab-3")),
        "{reply}"
    );
    drop(crashing);
}
