//! A target whose settings the store refuses (a wrong secret key, a bucket
//! that does not exist) is a configuration problem: it is logged as one,
//! naming what to fix, at most once per 10 s however many files fail, and
//! the files wait at the maximum retry delay. Fixing the config file and
//! sending SIGHUP delivers them at once, long before that delay.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::{BUCKET, Kind, Peer, agent_config, failed_chunks};
use crate::fixtures::{drop_file, unsafe_kill};
use crate::support::{eventually, indexedcp, pseudo_random};

const PART: usize = 5 << 20;

/// The configuration-problem line the uploader logs.
const REFUSED: &str = "the target refused this agent's configuration";

/// A retry delay no test waits for: a delivery within it came from the
/// reload.
const MAX_DELAY: &str = "30s";

/// `indexedcp daemon` with its log in `log`.
struct LoggedDaemon(Child);

impl LoggedDaemon {
    fn start(config: &Path, log: &Path) -> LoggedDaemon {
        let log = std::fs::File::create(log).unwrap();
        let child = indexedcp()
            .args(["daemon", "--config"])
            .arg(config)
            .env("INDEXEDCP_LOG_LEVEL", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start indexedcp daemon");
        LoggedDaemon(child)
    }
}

impl Drop for LoggedDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines_with(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// Drops five small files and one multipart-sized one; what the bucket
/// should hold once they are delivered.
fn drop_files(dir: &Path, spool: &Path) -> BTreeMap<String, Vec<u8>> {
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let mut expected = BTreeMap::new();
    for i in 0..6u64 {
        let len = if i == 0 {
            2 * PART + 1
        } else {
            1000 * i as usize
        };
        let data = pseudo_random(len, 60 + i);
        drop_file(&staging, spool, &format!("c{i}.bin"), &data);
        expected.insert(format!("in/c{i}.bin"), data);
    }
    expected
}

/// Runs the agent with `broken` settings until every file failed once, checks
/// the one configuration-problem line (which must contain each of `names`),
/// then applies `fix` to the directory, sends SIGHUP and waits for delivery.
async fn refused_then_fixed(
    peer: &Peer,
    case: &str,
    broken: &dyn Fn(&str) -> String,
    names: &[&str],
    fix: &dyn Fn(&Path, &Path),
) {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let target = peer.target(dir.path(), "");
    let target = target.replace(
        "max_retry_delay = \"1s\"",
        &format!("max_retry_delay = {MAX_DELAY:?}"),
    );
    let config = agent_config(dir.path(), &spool, &broken(&target));
    let log = dir.path().join("agent.log");
    let daemon = LoggedDaemon::start(&config, &log);
    let expected = drop_files(dir.path(), &spool);

    // Every file fails once; one line says why.
    eventually(
        Duration::from_secs(60),
        &format!("{case}: every file to fail once"),
        async || (failed_chunks(dir.path()) >= expected.len() as u64).then_some(()),
    )
    .await;
    let refused = lines_with(&log, REFUSED);
    assert_eq!(
        refused.len(),
        1,
        "{case}: one configuration-problem line for {} failed files, not one per attempt: {refused:#?}",
        expected.len()
    );
    let line = &refused[0];
    assert!(line.contains("ERROR"), "{case}: {line}");
    assert!(
        line.contains(&format!("next_retry_in={MAX_DELAY}")),
        "{case}: retried at the maximum delay: {line}"
    );
    for name in names {
        assert!(
            line.contains(name),
            "{case}: the line names {name:?}: {line}"
        );
    }
    assert!(
        lines_with(&log, "chunk failed; will retry").is_empty(),
        "{case}: the refusals are not logged as transient failures"
    );
    assert!(peer.objects().await.is_empty(), "{case}");

    // Fixed and reloaded: delivered at once, not after the maximum delay.
    fix(dir.path(), &config);
    let reloaded = Instant::now();
    unsafe_kill(daemon.0.id(), 1);
    eventually(
        Duration::from_secs(20),
        &format!("{case}: delivery after the reload"),
        async || (peer.objects().await == expected).then_some(()),
    )
    .await;
    let took = reloaded.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "{case}: {took:?} after SIGHUP"
    );
    assert_eq!(peer.open_uploads().await, [], "{case}");
    println!(
        "s3 config fault, {case}: one log line for {} refused files; delivered {:.1}s after SIGHUP",
        expected.len(),
        took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_are_a_configuration_problem_until_fixed_and_reloaded() {
    for peer in super::peers().await {
        if peer.kind == Kind::Moto {
            // moto accepts any signature.
            eprintln!("Moto: skipped, it does not check credentials");
            continue;
        }
        let case = format!("{:?}, wrong secret key", peer.kind);
        let fix = |dir: &Path, _config: &Path| {
            std::fs::write(dir.join("s3.secret"), format!("{}\n", super::SECRET_KEY)).unwrap();
        };
        // The secret file Peer::target wrote holds the right key: spoil it
        // before the agent starts.
        let spoil = |target: &str| {
            let secret = target
                .lines()
                .find_map(|l| l.strip_prefix("secret_access_key_file = "))
                .unwrap()
                .trim_matches('"')
                .to_owned();
            std::fs::write(secret, "not-the-secret\n").unwrap();
            target.to_owned()
        };
        refused_then_fixed(&peer, &case, &spoil, &["s3://archive/in/", "403"], &fix).await;
        // The next case starts from an empty bucket.
        assert!(!peer.objects().await.is_empty());
        let client = peer.client();
        for key in peer.objects().await.keys() {
            object_store::ObjectStoreExt::delete(&*client, &key.as_str().into())
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_bucket_is_a_configuration_problem_naming_the_bucket() {
    for peer in super::peers().await {
        if peer.kind == Kind::S3sFs {
            // s3s-fs 0.14 has no NoSuchBucket for writes: its PUT creates
            // the bucket's folder.
            eprintln!("S3sFs: skipped, a PUT into a missing bucket creates it");
            continue;
        }
        let case = format!("{:?}, missing bucket", peer.kind);
        let missing =
            |target: &str| target.replace(&format!("s3://{BUCKET}/"), "s3://no-such-bucket/");
        let fix = |_dir: &Path, config: &Path| {
            let text = std::fs::read_to_string(config).unwrap();
            std::fs::write(
                config,
                text.replace("s3://no-such-bucket/", &format!("s3://{BUCKET}/")),
            )
            .unwrap();
        };
        refused_then_fixed(
            &peer,
            &case,
            &missing,
            &["s3://no-such-bucket/in/", "NoSuchBucket"],
            &fix,
        )
        .await;
    }
}
