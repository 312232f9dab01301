//! Hostile file names in all three path modes: nothing is ever created, changed
//! or appended outside the output directory, and nothing unexpected inside it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::symlink;

use crate::fixtures::*;
use crate::support::*;

pub(crate) fn hostile_names() -> Vec<Vec<u8>> {
    let mut names: Vec<Vec<u8>> = [
        "../escape.txt",
        "../../escape.txt",
        "..",
        ".",
        "",
        "/etc/passwd",
        "/tmp/indexedcp-abs.txt",
        "..\\escape.txt",
        "a/../../escape.txt",
        "a/b/../../../escape.txt",
        "./../escape.txt",
        "%2e%2e/escape.txt",
        "%2e%2e%2fescape.txt",
        "..%2fescape.txt",
        "..%5cescape.txt",
        "C:\\Windows\\evil.txt",
        "C:evil.txt",
        "c:/evil.txt",
        "\\\\server\\share\\evil.txt",
        "//server/share/evil.txt",
        "\\evil.txt",
        "a\\..\\..\\evil.txt",
        "tab\there.txt",
        "link/inside-symlink.txt",
        "link/../escape.txt",
        "evil.txt",
        ".indexedcp/uploads.db",
        ".indexedcp/staging/x",
        "./.indexedcp/x",
        ".indexedcp",
        "...",
        "....//escape.txt",
        ".../escape.txt",
        "a/./b.txt",
        "sub/dir/ok.txt",
        "plain.txt",
        "spaces in name.txt",
        "ünïcödé-名前.txt",
        "-dash.txt",
        "~tilde",
        ".hidden",
        "a:b.txt",
        "name.",
        " lead space.txt",
        "a//b.txt",
        "./",
        "/",
        "x/",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // Bytes no HTTP library would send, and names over 255 bytes.
    for raw in [
        b"nul\0byte.txt".as_slice(),
        b"new\nline.txt",
        b"cr\rreturn.txt",
        b"esc\x1b[31m.txt",
        b"del\x7f.txt",
        b"bad-utf8-\xff\xfe.txt",
        b"..\xc0\xaf..\xc0\xafescape.txt",
    ] {
        names.push(raw.to_vec());
    }
    names.push("x".repeat(256).into_bytes());
    names.push(format!("d/{}", "y".repeat(256)).into_bytes());
    names.push("é".repeat(128).into_bytes());
    names
}

/// Names that must be refused in sanitize and allow-paths modes.
pub(crate) fn must_refuse(name: &[u8]) -> bool {
    let s = String::from_utf8_lossy(name);
    let traversal = s.split(['/', '\\']).any(|c| c == "..");
    let absolute =
        s.starts_with('/') || s.starts_with('\\') || (s.len() >= 2 && s.as_bytes()[1] == b':');
    traversal || absolute || name.iter().any(|b| *b < 0x20 || *b == 0x7f) || s.is_empty()
}

async fn check_mode(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = root.join("out");
    let outside = root.join("outside");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("target.txt"), b"sentinel").unwrap();
    symlink("../outside", out.join("link")).unwrap();
    symlink("../outside/target.txt", out.join("evil.txt")).unwrap();
    let before_outside = tree(&outside);

    let server = Server::start(&out, &["--path-mode", mode]).await;
    let mut accepted: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (i, name) in hostile_names().iter().enumerate() {
        for resumable in [false, true] {
            let body = format!(
                "case {i} resumable {resumable} of {}",
                String::from_utf8_lossy(name)
            )
            .into_bytes();
            let id = format!("hostile-name-{i:04}-{resumable}");
            let (status, reply) =
                raw_upload(&server.url, name, &body, resumable.then_some(id.as_str()));
            let shown = String::from_utf8_lossy(name);
            match status {
                200 => {
                    assert!(
                        !(mode != "ignore" && must_refuse(name)),
                        "{mode}: {shown:?} was accepted as {reply}"
                    );
                    let actual = reply["actualFilename"].as_str().unwrap().to_owned();
                    assert!(
                        !accepted.contains_key(&actual),
                        "{mode}: {actual} written twice"
                    );
                    if mode == "ignore" {
                        assert!(!actual.contains('/'), "{mode}: {actual}");
                    }
                    accepted.insert(actual, body);
                }
                400 => {
                    // Either our refusal (JSON) or the HTTP layer's (bytes no header may hold).
                    if !reply.is_null() {
                        assert!(
                            reply["error"] == "Invalid filename" || reply["error"] == "Bad request",
                            "{mode}: {shown:?}: {reply}"
                        );
                    }
                }
                other => panic!("{mode}: {shown:?} got status {other}: {reply}"),
            }
        }
    }

    // Outside the output directory: exactly what was there before.
    assert_eq!(
        tree(&outside),
        before_outside,
        "{mode}: something changed outside"
    );
    let top: BTreeSet<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(top, ["out".to_string(), "outside".to_string()].into());
    assert!(!std::path::Path::new("/tmp/indexedcp-abs.txt").exists());

    // Inside: the planted symlinks untouched, and exactly the accepted files.
    let mut expected: BTreeMap<String, Vec<u8>> = accepted.clone();
    expected.insert("link".into(), b"-> ../outside".to_vec());
    expected.insert("evil.txt".into(), b"-> ../outside/target.txt".to_vec());
    assert_eq!(
        visible_files(&out),
        expected,
        "{mode}: unexpected output tree"
    );
    for (path, content) in tree(&out) {
        if content.is_none() {
            let meta = std::fs::symlink_metadata(out.join(&path)).unwrap();
            assert!(
                meta.is_dir() && !meta.file_type().is_symlink(),
                "{mode}: {path}"
            );
        }
    }
    // Every mode accepted a reasonable share of the table.
    assert!(
        accepted.len() >= 20,
        "{mode}: only {} accepted",
        accepted.len()
    );
}

#[tokio::test]
async fn hostile_names_in_sanitize_mode() {
    check_mode("sanitize").await;
}

#[tokio::test]
async fn hostile_names_in_ignore_mode() {
    check_mode("ignore").await;
}

#[tokio::test]
async fn hostile_names_in_allow_paths_mode() {
    check_mode("allow-paths").await;
}

#[tokio::test]
async fn allow_paths_keeps_sub_directories_and_refuses_symlinked_ones() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(dir.path().join("elsewhere")).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    symlink("../elsewhere", out.join("sneaky")).unwrap();
    let server = Server::start(&out, &["--path-mode", "allow-paths"]).await;
    let (status, reply) = raw_upload(&server.url, b"2026/11/25/scan 1.tif", b"tif", None);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["actualFilename"], "2026/11/25/scan 1.tif");
    let (status, reply) = raw_upload(
        &server.url,
        b"sneaky/x.txt",
        b"no",
        Some("sneaky-symlink-0001"),
    );
    assert_eq!(
        (status, reply["error"].as_str()),
        (400, Some("Invalid filename"))
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("elsewhere"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        std::fs::read(out.join("2026/11/25/scan 1.tif")).unwrap(),
        b"tif"
    );
}
