//! Real tus clients upload to the receiver: tus-js-client in Node and tuspy,
//! each with files of 0 B, 1 B, 5 MiB and 100 MiB, the larger ones aborted
//! in the middle by the client and resumed by a new process from the upload's
//! URL. Every file arrives byte-identical, under its name, once.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use super::{node_modules, require, tuspy_installed};
use crate::fixtures::{KEY, Server};
use crate::support::{pseudo_random, visible_files};

/// tus-js-client in Node: `upload ENDPOINT KEY FILE NAME CHUNK ABORT_AT` or
/// `resume - KEY FILE NAME CHUNK 0 URL`. Prints one JSON line; exits 3 once
/// aborted, 0 once done.
const TUS_JS: &str = r#"
const tus = require('tus-js-client');
const fs = require('fs');
const [mode, endpoint, key, file, name, chunkSize, abortAt, uploadUrl] = process.argv.slice(2);
let aborted = false;
const upload = new tus.Upload(fs.readFileSync(file), {
  endpoint: mode === 'upload' ? endpoint : undefined,
  uploadUrl: mode === 'resume' ? uploadUrl : undefined,
  chunkSize: Number(chunkSize),
  headers: { Authorization: 'Bearer ' + key },
  metadata: { filename: name },
  retryDelays: [0, 250, 1000],
  storeFingerprintForResuming: false,
  onProgress(sent) {
    if (mode === 'upload' && Number(abortAt) > 0 && !aborted && sent >= Number(abortAt)) {
      aborted = true;
      upload.abort().then(() => {
        console.log(JSON.stringify({ aborted: true, url: upload.url, sent }));
        process.exit(3);
      });
    }
  },
  onError(e) { console.error(String(e)); process.exit(1); },
  onSuccess() { console.log(JSON.stringify({ done: true, url: upload.url })); process.exit(0); },
});
upload.start();
"#;

/// tuspy with sha1 `Upload-Checksum`s, same arguments; `upload` stops once
/// the offset reaches ABORT_AT (between chunks).
const TUSPY: &str = r#"
import json, sys
from tusclient import client
mode, endpoint, key, path, name, chunk, stop_at, url = (sys.argv[1:] + [''])[:8]
c = client.TusClient(endpoint, headers={'Authorization': 'Bearer ' + key})
kw = dict(file_path=path, chunk_size=int(chunk), metadata={'filename': name},
          upload_checksum=True, retries=3, retry_delay=0)
if mode == 'resume':
    kw['url'] = url
u = c.uploader(**kw)
if mode == 'upload' and int(stop_at) > 0:
    u.upload(stop_at=int(stop_at))
    print(json.dumps({'aborted': True, 'url': u.url, 'sent': u.offset}))
    sys.exit(3)
u.upload()
print(json.dumps({'done': True, 'url': u.url}))
"#;

const MIB: usize = 1 << 20;
const CHUNK: usize = 4 * MIB;

/// The files each client sends: name, size, and where to abort (0: never).
fn cases(prefix: &str) -> Vec<(String, usize, usize)> {
    vec![
        (format!("{prefix}-empty.bin"), 0, 0),
        (format!("{prefix}-one.bin"), 1, 0),
        (format!("{prefix}-five.bin"), 5 * MIB, 3 * MIB + 12_345),
        (format!("{prefix}-hundred.bin"), 100 * MIB, 50 * MIB + 777),
    ]
}

fn run(
    program: &str,
    script: &Path,
    args: &[&str],
    node_path: Option<&Path>,
) -> (i32, serde_json::Value) {
    let mut command = Command::new(program);
    command.arg(script).args(args);
    if let Some(p) = node_path {
        command.env("NODE_PATH", p);
    }
    let out = command.output().expect("start the tus client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let code = out.status.code().unwrap_or(-1);
    let reply = serde_json::from_str(last).unwrap_or_else(|_| {
        panic!(
            "{program} {args:?} exited {code} without a JSON line: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, reply)
}

/// Sends every case with the client, aborting and resuming where the case says.
async fn deliver(program: &str, source: &str, prefix: &str, node_path: Option<&Path>) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let server = Server::start(&out, &["--max-chunk-bytes", "8MiB"]).await;
    let script = dir.path().join("client");
    std::fs::write(&script, source).unwrap();
    let endpoint = format!("{}/files/", server.url);
    let mut expected = BTreeMap::new();
    for (seed, (name, size, abort_at)) in cases(prefix).into_iter().enumerate() {
        let data = pseudo_random(size, 0x75 + seed as u64);
        let file = dir.path().join(&name);
        std::fs::write(&file, &data).unwrap();
        let (chunk, abort) = (CHUNK.to_string(), abort_at.to_string());
        let file_arg = file.to_str().unwrap();
        let (code, reply) = run(
            program,
            &script,
            &["upload", &endpoint, KEY, file_arg, &name, &chunk, &abort],
            node_path,
        );
        if abort_at > 0 {
            assert_eq!(code, 3, "{name}: {reply}");
            let url = reply["url"].as_str().expect("the upload's URL").to_owned();
            // Nothing under a final name before the upload is complete.
            assert!(
                !out.join(&name).exists(),
                "{name} appeared before it was complete"
            );
            let (code, reply) = run(
                program,
                &script,
                &["resume", "-", KEY, file_arg, &name, &chunk, "0", &url],
                node_path,
            );
            assert_eq!(code, 0, "{name}: {reply}");
            assert_eq!(
                reply["url"].as_str(),
                Some(url.as_str()),
                "{name} resumed elsewhere"
            );
        } else {
            assert_eq!(code, 0, "{name}: {reply}");
        }
        std::fs::remove_file(&file).unwrap();
        expected.insert(name, data);
    }
    let got = visible_files(&out);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "files in the output directory"
    );
    for (name, data) in &expected {
        assert!(got[name] == *data, "{name} differs from what was sent");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tus_js_client_uploads_aborts_and_resumes_byte_identical_files() {
    let Some(modules) = node_modules() else {
        require(false, "tus-js-client (target/tus-node)");
        return;
    };
    deliver("node", TUS_JS, "js", Some(&modules)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tuspy_uploads_stops_and_resumes_byte_identical_files() {
    if !require(tuspy_installed(), "tuspy") {
        return;
    }
    deliver("python3", TUSPY, "py", None).await;
}
