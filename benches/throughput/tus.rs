//! Scenario 9, tus: the large file sent by tus-js-client 4 in Node (an
//! `fs.ReadStream` of the file, so the client reads each chunk from disk) to
//! the receiver's tus endpoint, with the receiver's peak RSS. Baseline in the
//! same run, on the same disk, with the same client and chunk size: the
//! official Node server, @tus/server 2 with @tus/file-store 2. Each upload is
//! timed from the client's start to its exit, and what arrived is checked on
//! disk before a figure counts.
//!
//! The two servers do not promise the same thing: the receiver syncs each
//! PATCH's bytes before it acknowledges them and renames the finished file
//! into place after checking its hash, while the file-store acknowledges what
//! it handed to the kernel. The comparison is the price a tus client pays for
//! that. Everything on disk is synced before each upload, so neither pays for
//! the other's writeback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::processes::{RunDir, file_len, start_receiver, utf8};
use super::scenarios::LargeFile;
use super::support::{free_port, wait_until};
use super::table::{Named, mb_per_s, median_of};
use super::{KEY, MIB, Settings};

/// The `chunkSize` tus-js-client uses with both servers: one PATCH per
/// chunk, under the receiver's default `max_chunk_bytes` (64 MiB).
pub(super) const CHUNK_BYTES: u64 = 32 * MIB;

/// How to get the Node packages, said when they are missing.
const NODE_HINT: &str = "node with tus-js-client, @tus/server and @tus/file-store not found: \
     npm install --prefix target/tus-node tus-js-client@4 @tus/server@2 @tus/file-store@2 \
     (.ci/run does it)";

/// tus-js-client: `ENDPOINT KEY FILE NAME CHUNK`; exits 0 once the server
/// confirmed the whole file, 1 (with the error on stderr) otherwise.
const CLIENT_SCRIPT: &str = r#"
const tus = require('tus-js-client');
const fs = require('fs');
const [endpoint, key, file, name, chunkSize] = process.argv.slice(2);
const upload = new tus.Upload(fs.createReadStream(file), {
  endpoint,
  chunkSize: Number(chunkSize),
  headers: { Authorization: 'Bearer ' + key },
  metadata: { filename: name },
  retryDelays: [],
  storeFingerprintForResuming: false,
  onError(e) { console.error(String(e)); process.exit(1); },
  onSuccess() { console.log(upload.url); process.exit(0); },
});
upload.start();
"#;

/// @tus/server with a file-store: `PORT DIRECTORY`.
const SERVER_SCRIPT: &str = r#"
import http from 'node:http';
import { Server } from '@tus/server';
import { FileStore } from '@tus/file-store';
const [port, directory] = process.argv.slice(2);
const tus = new Server({ path: '/files', datastore: new FileStore({ directory }) });
http.createServer((req, res) => tus.handle(req, res)).listen(Number(port), '127.0.0.1');
"#;

/// Where the Node packages are: an entry of `NODE_PATH` holding all three,
/// else `target/tus-node/node_modules`.
fn node_modules() -> Result<PathBuf> {
    let from_env = std::env::var_os("NODE_PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tus-node/node_modules");
    let found = from_env.into_iter().chain([default]).find(|dir| {
        ["tus-js-client", "@tus/server", "@tus/file-store"]
            .iter()
            .all(|package| dir.join(package).join("package.json").is_file())
    });
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match found {
        Some(dir) if node => Ok(dir),
        _ => bail!(NODE_HINT),
    }
}

/// @tus/server on 127.0.0.1; killed when dropped.
struct TusServer {
    child: Child,
    store: PathBuf,
    endpoint: String,
}

impl Drop for TusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TusServer {
    fn start(run: &RunDir) -> Result<TusServer> {
        let store = run.root.join("tus-store");
        std::fs::create_dir_all(&store)?;
        let port = free_port();
        let log = std::fs::File::create(run.root.join("tus-server.log"))?;
        let child = Command::new("node")
            .arg(run.root.join("server.mjs"))
            .arg(port.to_string())
            .arg(&store)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start @tus/server with node")?;
        let server = TusServer {
            child,
            store,
            endpoint: format!("http://127.0.0.1:{port}/files/"),
        };
        wait_until(
            "@tus/server listening",
            Duration::from_millis(20),
            Duration::from_secs(30),
            || Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
        )?;
        Ok(server)
    }

    /// The size of the one upload in the store (the file next to its
    /// `.json`).
    fn stored_len(&self) -> Result<Option<u64>> {
        let mut sizes = Vec::new();
        for entry in std::fs::read_dir(&self.store)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                sizes.push(file_len(&path));
            }
        }
        ensure!(
            sizes.len() <= 1,
            "@tus/server's store holds {} uploads, not one",
            sizes.len()
        );
        Ok(sizes.into_iter().next().flatten())
    }
}

/// Runs the client script against `endpoint`; returns how long it took.
fn upload(run: &RunDir, modules: &Path, endpoint: &str, large: &LargeFile) -> Result<Duration> {
    large.warm()?;
    rustix::fs::sync();
    let started = Instant::now();
    let output = Command::new("node")
        .arg(run.root.join("client.cjs"))
        .args([endpoint, KEY, utf8(&large.path)?, &large.name])
        .arg(CHUNK_BYTES.to_string())
        .env("NODE_PATH", modules)
        .output()
        .context("cannot run tus-js-client with node")?;
    let elapsed = started.elapsed();
    ensure!(
        output.status.success(),
        "tus-js-client to {endpoint} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(elapsed)
}

pub(super) struct TusUpload {
    pub(super) mb_per_s: f64,
    pub(super) tus_server: Named,
    pub(super) peak_rss_mib: f64,
}

pub(super) fn tus_js_client(settings: &Settings, large: &LargeFile) -> Result<TusUpload> {
    let modules = node_modules()?;
    let runs = settings.repeat("9. tus-js-client", || {
        let run = RunDir::create(settings)?;
        std::fs::write(run.root.join("client.cjs"), CLIENT_SCRIPT)?;
        std::fs::write(run.root.join("server.mjs"), SERVER_SCRIPT)?;
        // An ES module finds its packages in a node_modules folder next to
        // it (NODE_PATH is for CommonJS only).
        std::os::unix::fs::symlink(&modules, run.root.join("node_modules"))?;

        let (receiver, port) = start_receiver(&run)?;
        let endpoint = format!("http://127.0.0.1:{port}/files/");
        let elapsed = upload(&run, &modules, &endpoint, large)?;
        let peak_rss = receiver.peak_rss_mib()?;
        receiver.stop();
        let received = file_len(&run.out.join(&large.name));
        ensure!(
            received == Some(large.size),
            "the receiver's output holds {received:?} bytes of {}, not {}",
            large.name,
            large.size
        );
        let ours = mb_per_s(large.size, elapsed);
        eprintln!(
            "  receiver: {ours:.1} MB/s in {:.2} s, peak RSS {peak_rss:.1} MiB",
            elapsed.as_secs_f64()
        );
        // The receiver's copy is no longer needed: the disk holds one at a time.
        std::fs::remove_file(run.out.join(&large.name))?;

        let server = TusServer::start(&run)?;
        let elapsed = upload(&run, &modules, &server.endpoint, large)?;
        let stored = server.stored_len()?;
        ensure!(
            stored == Some(large.size),
            "@tus/server's store holds {stored:?} bytes, not {}",
            large.size
        );
        let theirs = mb_per_s(large.size, elapsed);
        eprintln!(
            "  @tus/server: {theirs:.1} MB/s in {:.2} s",
            elapsed.as_secs_f64()
        );
        Ok((ours, theirs, peak_rss))
    })?;
    Ok(TusUpload {
        mb_per_s: median_of(&runs, |r| r.0),
        tus_server: Named {
            label: "@tus/server + file-store",
            value: median_of(&runs, |r| r.1),
        },
        peak_rss_mib: median_of(&runs, |r| r.2),
    })
}
