//! The one-shot command into a bucket behind HTTPS with a private CA:
//! moto's server with a certificate from the test CA. Without `--cacert` the
//! certificate is refused and nothing is stored; with it the file arrives
//! byte-identical. `--cert`/`--key` (which the S3 client cannot present) and
//! `--cacert` without an https endpoint are refused with a usage error
//! instead of being ignored.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::pki::Ca;
use crate::support::*;

const BUCKET: &str = "archive";

fn upload(home: &std::path::Path, args: &[&str]) -> Output {
    indexedcp()
        .args(args)
        .env("HOME", home)
        .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
        .env("AWS_SECRET_ACCESS_KEY", "secret-key-for-tests")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_to_an_https_bucket_trusts_cacert_and_refuses_a_client_certificate() {
    let installed = Command::new("sh")
        .args(["-c", "command -v moto_server"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "moto_server is not installed; .ci/run installs it"
        );
        eprintln!("skipping: moto_server is not installed (see .ci/run)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(&dir.path().join("pki"), "test-ca");
    let cert = ca.server("s3", 1);
    let port = free_port();
    let mut moto = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .arg("-c")
        .arg(&cert.cert)
        .arg("-k")
        .arg(&cert.key)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("moto.log")).unwrap())
        .spawn()
        .expect("start moto_server");
    let endpoint = format!("https://127.0.0.1:{port}");
    let trusting = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&ca.ca_pem).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let up = poll_every(
        Duration::from_millis(50),
        Duration::from_secs(30),
        async || trusting.get(&endpoint).send().await.ok().map(|_| ()),
    )
    .await;
    assert!(up.is_some(), "moto_server did not start on {endpoint}");
    // moto does not check signatures: a plain CreateBucket does.
    let created = trusting
        .put(format!("{endpoint}/{BUCKET}"))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{created:?}");

    let file = dir.path().join("scan.bin");
    let data = pseudo_random(300_000, 5);
    std::fs::write(&file, &data).unwrap();
    let file_arg = file.display().to_string();
    let destination = format!("s3://{BUCKET}/in/");
    let ca_pem = ca.ca_pem.display().to_string();
    let object = format!("{endpoint}/{BUCKET}/in/scan.bin");
    let run = |home: &str, extra: &[&str]| {
        let mut args = vec![file_arg.as_str(), destination.as_str()];
        args.extend_from_slice(extra);
        upload(&dir.path().join(home), &args)
    };

    // Without --cacert: the private CA is not trusted, nothing is stored.
    let out = run("h1", &["--endpoint", &endpoint]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    let absent = trusting.get(&object).send().await.unwrap();
    assert_eq!(absent.status().as_u16(), 404);

    // --cert/--key: refused before anything is sent, not ignored.
    let (client_cert, client_key) = (
        cert.cert.display().to_string(),
        cert.key.display().to_string(),
    );
    let out = run(
        "h2",
        &[
            "--endpoint",
            &endpoint,
            "--cacert",
            &ca_pem,
            "--cert",
            &client_cert,
            "--key",
            &client_key,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--cert and --key are not supported for s3://"),
        "{stderr}"
    );
    // --cacert with a plain http endpoint would trust nothing: refused.
    let out = run(
        "h2",
        &[
            "--endpoint",
            &format!("http://127.0.0.1:{port}"),
            "--cacert",
            &ca_pem,
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--cacert is used only with an https:// --endpoint"),
        "{stderr}"
    );
    assert_eq!(
        trusting
            .get(&object)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );

    // With --cacert: delivered, byte-identical.
    let out = run("h3", &["--endpoint", &endpoint, "--cacert", &ca_pem]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(stdout.trim(), format!("{file_arg} -> in/scan.bin"));
    // Read back with a signed request (moto refuses an anonymous GET of an
    // object that exists), trusting the same CA.
    use object_store::ObjectStoreExt;
    let ca_cert = object_store::Certificate::from_pem(&std::fs::read(&ca.ca_pem).unwrap()).unwrap();
    let bucket = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&endpoint)
        .with_region("us-east-1")
        .with_bucket_name(BUCKET)
        .with_access_key_id("AKIDTEST")
        .with_secret_access_key("secret-key-for-tests")
        .with_client_options(object_store::ClientOptions::new().with_root_certificate(ca_cert))
        .build()
        .unwrap();
    let got = bucket
        .get(&object_store::path::Path::from("in/scan.bin"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got == data, "the object differs from scan.bin");
    let _ = moto.kill();
    let _ = moto.wait();
}
