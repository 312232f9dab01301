//! The `s3` kind against two independent S3 implementations on 127.0.0.1,
//! each started by the test: `s3s-fs` (objects are plain files under
//! `ROOT/bucket/key`) and moto's server. Every behaviour test runs against
//! both, to catch dialect differences. A server that is not installed skips
//! its half with a message, except under `CI=true`, where it fails.

mod behaviour;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::{Attribute, GetOptions, ObjectStore, ObjectStoreExt};

use crate::support::{free_port, poll_every};

pub const BUCKET: &str = "archive";
pub const ACCESS_KEY: &str = "AKIDTEST";
pub const SECRET_KEY: &str = "secret-key-for-tests";

/// Which implementation a peer is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    S3sFs,
    Moto,
}

/// A running S3 server with the bucket [`BUCKET`] created.
pub struct Peer {
    pub kind: Kind,
    pub endpoint: String,
    /// s3s-fs: where the objects are, as files.
    pub root: Option<PathBuf>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn installed(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The peers to run a test against: both where installed. Under `CI=true` a
/// missing one fails the test.
pub async fn peers() -> Vec<Peer> {
    let mut peers = Vec::new();
    for (kind, program) in [(Kind::S3sFs, "s3s-fs"), (Kind::Moto, "moto_server")] {
        if !installed(program) {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{program} is not installed; .ci/run installs it"
            );
            eprintln!("skipping the {kind:?} half: {program} is not installed (see .ci/run)");
            continue;
        }
        peers.push(Peer::start(kind).await);
    }
    peers
}

impl Peer {
    pub async fn start(kind: Kind) -> Peer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let (child, root) = match kind {
            Kind::S3sFs => {
                let root = dir.path().join("root");
                std::fs::create_dir_all(root.join(BUCKET)).unwrap();
                let child = Command::new("s3s-fs")
                    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                    .arg(&root)
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .expect("start s3s-fs");
                (child, Some(root))
            }
            Kind::Moto => {
                let child = Command::new("moto_server")
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .expect("start moto_server");
                (child, None)
            }
        };
        let peer = Peer {
            kind,
            endpoint,
            root,
            child,
            _dir: dir,
        };
        let client = reqwest::Client::new();
        let up = poll_every(
            Duration::from_millis(50),
            Duration::from_secs(30),
            async || client.get(&peer.endpoint).send().await.ok().map(|_| ()),
        )
        .await;
        assert!(up.is_some(), "{kind:?} did not start on {}", peer.endpoint);
        if kind == Kind::Moto {
            // moto does not check signatures: a plain CreateBucket does.
            let created = client
                .put(format!("{}/{BUCKET}", peer.endpoint))
                .send()
                .await
                .unwrap();
            assert!(created.status().is_success(), "{created:?}");
        }
        peer
    }

    /// A client of the bucket, for the test's own reads and writes.
    pub fn client(&self) -> Arc<AmazonS3> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_region("us-east-1")
                .with_bucket_name(BUCKET)
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .build()
                .unwrap(),
        )
    }

    /// Every object in the bucket: key -> bytes.
    pub async fn objects(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        use futures::TryStreamExt;
        let client = self.client();
        let metas: Vec<_> = client.list(None).try_collect().await.unwrap();
        let mut objects = std::collections::BTreeMap::new();
        for meta in metas {
            let bytes = client
                .get(&meta.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            objects.insert(meta.location.to_string(), bytes.to_vec());
        }
        objects
    }

    /// The `sha256` user metadata of `key`.
    pub async fn sha256_metadata(&self, key: &str) -> Option<String> {
        let options = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        let result = self.client().get_opts(&key.into(), options).await.unwrap();
        result
            .attributes
            .get(&Attribute::Metadata("sha256".into()))
            .map(|v| v.to_string())
    }

    /// The target section for this peer.
    pub fn target(&self, dir: &Path, extra: &str) -> String {
        let secret = dir.join("s3.secret");
        std::fs::write(&secret, format!("{SECRET_KEY}\n")).unwrap();
        format!(
            "[[target]]\nname = \"archive\"\nkind = \"s3\"\nurl = \"s3://{BUCKET}/in/\"\n\
             endpoint = {endpoint:?}\nregion = \"us-east-1\"\naccess_key_id = \"{ACCESS_KEY}\"\n\
             secret_access_key_file = {secret:?}\npart_size = \"5MiB\"\n\
             initial_retry_delay = \"100ms\"\nmax_retry_delay = \"1s\"\n{extra}\n",
            endpoint = self.endpoint,
            secret = secret.display().to_string(),
        )
    }
}

/// An agent config for `target` (from [`Peer::target`]) with one spool.
pub fn agent_config(dir: &Path, spool: &Path, target: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    let text = format!(
        "[daemon]\nstate_dir = {state:?}\ncheck_interval = \"300ms\"\n\n{target}\n\
         [[spool]]\npath = {spool:?}\ntarget = \"archive\"\nsettle = \"200ms\"\n",
        state = dir.join("state").display().to_string(),
        spool = spool.display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    path
}
