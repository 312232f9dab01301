//! The `s3` kind against two independent S3 implementations on 127.0.0.1,
//! each started by the test: `s3s-fs` (objects are plain files under
//! `ROOT/bucket/key`) and moto's server. Every behaviour test runs against
//! both, to catch dialect differences. A server that is not installed skips
//! its half with a message, except under `CI=true`, where it fails.

mod behaviour;
mod config_faults;
mod kill_loop;
mod leftovers;
mod proxy_faults;
mod server_restart;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
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
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("INDEXEDCP_FAULTS_KEEP").is_some() {
            let dir = std::mem::replace(&mut self._dir, tempfile::tempdir().unwrap());
            eprintln!(
                "s3: {:?}'s directory (server.log) kept at {}",
                self.kind,
                dir.keep().display()
            );
        }
    }
}

/// The peers to run a test against: both where installed. Under `CI=true` a
/// missing one fails the test.
pub async fn peers() -> Vec<Peer> {
    let mut peers = Vec::new();
    for (kind, program) in [(Kind::S3sFs, "s3s-fs"), (Kind::Moto, "moto_server")] {
        let hint = format!("the {kind:?} half of the S3 tests");
        if !crate::support::require_tool(program, &hint) {
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
        let (child, root) = Peer::spawn(kind, dir.path(), port);
        let peer = Peer {
            kind,
            endpoint,
            root,
            port,
            child,
            _dir: dir,
        };
        peer.wait_up().await;
        if kind == Kind::Moto {
            // moto does not check signatures: a plain CreateBucket does.
            let created = reqwest::Client::new()
                .put(format!("{}/{BUCKET}", peer.endpoint))
                .send()
                .await
                .unwrap();
            assert!(created.status().is_success(), "{created:?}");
        }
        peer
    }

    /// SIGKILLs the server and starts it again on the same port, with the
    /// same root (s3s-fs keeps everything there; moto keeps nothing, so only
    /// s3s-fs is restarted by the tests).
    pub async fn restart(&mut self) {
        assert_eq!(self.kind, Kind::S3sFs, "moto forgets its buckets");
        self.kill();
        let (child, _) = Peer::spawn(self.kind, self._dir.path(), self.port);
        self.child = child;
        self.wait_up().await;
    }

    /// SIGKILLs the server (and waits for it to be gone).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn spawn(kind: Kind, dir: &Path, port: u16) -> (Child, Option<PathBuf>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .unwrap();
        match kind {
            Kind::S3sFs => {
                let root = dir.join("root");
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
        }
    }

    async fn wait_up(&self) {
        let client = reqwest::Client::new();
        let up = poll_every(
            Duration::from_millis(50),
            Duration::from_secs(30),
            async || client.get(&self.endpoint).send().await.ok().map(|_| ()),
        )
        .await;
        assert!(
            up.is_some(),
            "{:?} did not start on {}",
            self.kind,
            self.endpoint
        );
    }

    /// Whether the server answers ListMultipartUploads (s3s-fs 0.14 does
    /// not: it answers 501).
    pub fn lists_uploads(&self) -> bool {
        self.kind == Kind::Moto
    }

    /// The multipart uploads open in the bucket: (key, upload id) pairs,
    /// sorted. From ListMultipartUploads where the server has it; s3s-fs,
    /// which has not, keeps each open upload as `.upload-ID.json` in its
    /// root, next to the upload's metadata file that names the key.
    pub async fn open_uploads(&self) -> Vec<(String, String)> {
        if let Some(root) = &self.root {
            return s3s_fs_open_uploads(root);
        }
        use object_store::signer::{Method, SignedUrlOptions, Signer};
        let options = SignedUrlOptions::default().with_query([("uploads", "")]);
        let url = self
            .client()
            .signed_url_opts(Method::GET, &"".into(), Duration::from_secs(60), &options)
            .await
            .unwrap();
        let response = reqwest::get(url.as_str()).await.unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(status.is_success(), "ListMultipartUploads: {status} {body}");
        let text = |xml: &str, name: &str| -> Option<String> {
            let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
            let end = xml[start..].find(&format!("</{name}>"))? + start;
            Some(xml[start..end].to_owned())
        };
        assert_ne!(
            text(&body, "IsTruncated").as_deref(),
            Some("true"),
            "more open uploads than one page: {body}"
        );
        body.split("<Upload>")
            .skip(1)
            .map(|upload| {
                (
                    text(upload, "Key").unwrap(),
                    text(upload, "UploadId").unwrap(),
                )
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
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

/// Waits (up to `timeout`) until the bucket holds exactly `expected`'s keys
/// and the agent's buffer at `buffer_db` has nothing queued or parked;
/// `None` when it did not happen in time.
pub async fn wait_drained(
    peer: &Peer,
    expected: &std::collections::BTreeMap<String, Vec<u8>>,
    buffer_db: &Path,
    timeout: Duration,
) -> Option<()> {
    poll_every(Duration::from_millis(200), timeout, async || {
        (peer.objects().await.keys().eq(expected.keys())
            && crate::faults::buffer_counts(buffer_db)
                .is_some_and(|(queued, failed, _)| queued == 0 && failed == 0))
        .then_some(())
    })
    .await
}

/// Checks that the bucket's `objects` are exactly `expected`, byte for byte
/// (also as files on s3s-fs's disk), and, on a server that lists them, that
/// no multipart upload is left open; returns the open uploads.
pub async fn assert_exactly(
    peer: &Peer,
    objects: &std::collections::BTreeMap<String, Vec<u8>>,
    expected: &std::collections::BTreeMap<String, Vec<u8>>,
    case: &str,
) -> Vec<(String, String)> {
    let corrupted: Vec<&String> = expected
        .iter()
        .filter(|(key, data)| objects.get(*key) != Some(data))
        .map(|(key, _)| key)
        .collect();
    assert!(corrupted.is_empty(), "{case}: corrupted {corrupted:?}");
    assert_eq!(objects.len(), expected.len(), "{case}: extra objects");
    if let Some(root) = &peer.root {
        for (key, data) in expected {
            let on_disk = std::fs::read(root.join(BUCKET).join(key)).unwrap();
            assert!(&on_disk == data, "{case}: {key} differs on disk");
        }
    }
    let open = peer.open_uploads().await;
    if peer.lists_uploads() {
        assert_eq!(open, [], "{case}: multipart uploads left open");
    }
    open
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

/// s3s-fs's open uploads, read from its root (see [`Peer::open_uploads`]).
fn s3s_fs_open_uploads(root: &Path) -> Vec<(String, String)> {
    let names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut open = std::collections::BTreeSet::new();
    for name in &names {
        let Some(id) = name
            .strip_prefix(".upload-")
            .and_then(|rest| rest.strip_suffix(".json"))
        else {
            continue;
        };
        let suffix = format!(".upload-{id}.metadata.json");
        // s3s-fs writes an upload's id first and its metadata (which names
        // the key) second, and stops between the two when the client hangs
        // up, as a killed agent does: such an upload has no known key.
        let key = names
            .iter()
            .find_map(|n| {
                let object = n.strip_suffix(&suffix)?.split_once(".object-")?.1;
                Some(String::from_utf8(base64url_decode(object)).unwrap())
            })
            .unwrap_or_default();
        open.insert((key, id.to_owned()));
    }
    open.into_iter().collect()
}

/// Unpadded URL-safe base64, as s3s-fs names its metadata files.
fn base64url_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("not base64url: {c:?}"),
        }
    };
    let mut out = Vec::new();
    let (mut bits, mut n_bits) = (0u32, 0);
    for c in text.bytes() {
        bits = (bits << 6) | value(c);
        n_bits += 6;
        if n_bits >= 8 {
            n_bits -= 8;
            out.push((bits >> n_bits) as u8);
            bits &= (1 << n_bits) - 1;
        }
    }
    out
}

/// How many of the buffer's chunks have had a failed attempt (0 while the
/// buffer cannot be read), read from the agent's `state/buffer.db` under
/// `dir` as [`agent_config`] places it.
pub fn failed_chunks(dir: &Path) -> u64 {
    let Ok(conn) = rusqlite::Connection::open_with_flags(
        dir.join("state/buffer.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) else {
        return 0;
    };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    conn.query_row(
        "SELECT count(*) FROM chunks WHERE retry_count > 0",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map_or(0, |n| n as u64)
}
