//! A file system mounted over a directory the daemon already uses (a data
//! disk or a share that mounts late), or the directory deleted and made
//! again: the receiver must never answer 200 for a file written where nobody
//! sees it, must work again once the path names a usable directory, and the
//! agent must watch the spool the path names now. Needs root to mount a
//! tmpfs; without it the tests say so and pass, except under `CI=true`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::faults::full_disk::Tmpfs;
use crate::fixtures::*;
use crate::support::*;

/// A tmpfs on `path`, or `None` (after saying why) where none can be
/// mounted; under `CI=true` that is a failure.
fn tmpfs_or_skip(path: &Path, test: &str) -> Option<Tmpfs> {
    match Tmpfs::mount(path, "8m") {
        Ok(tmpfs) => Some(tmpfs),
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: cannot mount a tmpfs under CI=true: {why}")
        }
        Err(why) => {
            println!("{test}: SKIPPED: cannot mount a tmpfs: {why}");
            None
        }
    }
}

/// Sends `content` as `name` in one resumable chunk; returns the status and
/// the reply's text.
async fn upload(server: &Server, upload_id: &str, name: &str, content: &[u8]) -> (u16, String) {
    let chunk = ResumableChunk {
        upload_id,
        name,
        file: content,
        chunk_size: content.len().max(1),
        index: 0,
    };
    let response = chunk
        .request(&reqwest::Client::new(), &server.upload_url())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The default layout, the receiver's state inside its output directory: a
/// tmpfs mounted over the output directory hides the state too, so the
/// receiver refuses with 503 (naming the directory) instead of writing under
/// the mount, and a restart writes into the mounted file system.
#[tokio::test]
async fn an_output_directory_mounted_over_is_never_written_underneath() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut server = Server::start(&out, &[]).await;
    assert_eq!(
        upload(&server, "before-mount-0001", "before.txt", b"one")
            .await
            .0,
        200
    );

    let Some(tmpfs) = tmpfs_or_skip(&out, "mounted_over") else {
        return;
    };
    let (status, reply) = upload(&server, "during-mount-0001", "during.txt", b"two").await;
    let visible = std::fs::read(out.join("during.txt")).ok();
    assert!(
        status == 503 || (status == 200 && visible.as_deref() == Some(&b"two"[..])),
        "answered {status} ({reply}); visible at the path: {visible:?}"
    );
    assert_eq!(status, 503, "{reply}");
    assert!(reply.contains(&out.display().to_string()), "{reply}");

    // Restarted, the receiver makes its state in the mounted file system
    // and the file lands there.
    server.restart().await;
    assert_eq!(
        upload(&server, "after-restart-01", "during.txt", b"two")
            .await
            .0,
        200
    );
    assert_eq!(std::fs::read(out.join("during.txt")).unwrap(), b"two");
    server.kill();
    drop(tmpfs);
    // Underneath: only what was written before the mount.
    assert_eq!(
        visible_files(&out),
        BTreeMap::from([("before.txt".to_owned(), b"one".to_vec())])
    );
}

/// The state elsewhere: an output directory deleted and made again is used
/// again without a restart; while it is missing, and while a tmpfs over it
/// puts it on another file system than the staging directory, uploads are
/// refused with 503.
#[tokio::test]
async fn an_output_directory_made_again_is_used_again() {
    let dir = tempfile::tempdir().unwrap();
    let (out, state) = (dir.path().join("out"), dir.path().join("state"));
    let state_arg = state.display().to_string();
    let server = Server::start(&out, &["--state-dir", &state_arg]).await;
    assert_eq!(
        upload(&server, "first-upload-0001", "a.txt", b"a").await.0,
        200
    );

    std::fs::remove_dir_all(&out).unwrap();
    let (status, reply) = upload(&server, "while-missing-01", "b.txt", b"b").await;
    assert_eq!(status, 503, "{reply}");
    assert!(reply.contains(&out.display().to_string()), "{reply}");

    std::fs::create_dir(&out).unwrap();
    let (status, reply) = upload(&server, "made-again-00001", "b.txt", b"b").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        visible_files(&out),
        BTreeMap::from([("b.txt".to_owned(), b"b".to_vec())])
    );

    let Some(tmpfs) = tmpfs_or_skip(&out, "made_again") else {
        return;
    };
    let (status, reply) = upload(&server, "over-a-mount-001", "c.txt", b"c").await;
    let visible = std::fs::read(out.join("c.txt")).ok();
    assert!(
        status == 503 || (status == 200 && visible.as_deref() == Some(&b"c"[..])),
        "answered {status} ({reply}); visible at the path: {visible:?}"
    );
    drop(server);
    drop(tmpfs);
    assert!(
        !out.join("c.txt").exists(),
        "c.txt was written under the mount"
    );
}

/// A tmpfs mounted over a spool the agent watches: a file dropped into it is
/// delivered within seconds, not at the safety scan a minute later.
#[tokio::test]
async fn a_spool_mounted_over_is_watched_again() {
    let (dir, out, spool, staging) = agent_dirs();
    let server = Server::start(&out, &[]).await;
    let config = agent_config(dir.path(), &server.upload_url(), &spool, "", "");
    let daemon = Daemon::start(&config);
    drop_file(&staging, &spool, "before.txt", b"before");
    let mut expected = BTreeMap::from([("before.txt".to_owned(), b"before".to_vec())]);
    wait_for_files(&out, &expected, Duration::from_secs(30)).await;

    let Some(tmpfs) = tmpfs_or_skip(&spool, "spool_mounted_over") else {
        return;
    };
    // Written under a temporary name and renamed, inside the new file system.
    let dropped = std::time::Instant::now();
    std::fs::write(spool.join("after.txt.part"), b"after").unwrap();
    std::fs::rename(spool.join("after.txt.part"), spool.join("after.txt")).unwrap();
    expected.insert("after.txt".to_owned(), b"after".to_vec());
    wait_for_files(&out, &expected, Duration::from_secs(20)).await;
    println!(
        "spool mounted over: a file dropped into the new file system delivered in {} ms (the safety scan comes every 60 s)",
        dropped.elapsed().as_millis()
    );
    drop(daemon);
    drop(tmpfs);
}
