//! The one-shot commands as a person runs them: `indexedcp upload`, the cp-style
//! `indexedcp FILE... URL`, `add`, then `status`, `retry`, `purge`,
//! `completions`, `--help` and `--version`; the real binary against a real
//! receiver, checking output, exit codes and the files that arrive.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::fixtures::*;
use crate::support::*;

/// A user's world: a home directory (so the default buffer is
/// `~/.indexcp/db/client.db` inside the test) and a folder of files.
struct User {
    _dir: tempfile::TempDir,
    home: PathBuf,
    files: PathBuf,
}

impl User {
    fn new() -> User {
        let dir = tempfile::tempdir().unwrap();
        let (home, files) = (dir.path().join("home"), dir.path().join("files"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&files).unwrap();
        User {
            _dir: dir,
            home,
            files,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = indexedcp();
        command
            .args(args)
            .current_dir(&self.files)
            .env("HOME", &self.home)
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn file(&self, name: &str, content: &[u8]) -> String {
        let path = self.files.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }

    fn status(&self) -> Vec<serde_json::Value> {
        let out = self.run(&["status", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    fn default_buffer(&self) -> PathBuf {
        self.home.join(".indexcp/db/client.db")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Exit code, stdout, stderr.
fn outcome(out: &Output) -> (Option<i32>, String, String) {
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

fn lines(s: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = s.lines().collect();
    lines.sort();
    lines
}

/// A loopback URL where nothing listens.
fn dead_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}/upload")
}

#[tokio::test]
async fn upload_sends_the_files_and_prints_where_each_landed() {
    let user = User::new();
    let out_dir = user.files.parent().unwrap().join("out");
    let server = Server::start(&out_dir, &[]).await;
    let big = pseudo_random((5 << 20) / 2, 1);
    let small = user.file("notes.txt", b"hello\n");
    let spaced = user.file("sub dir/my report.pdf", &pseudo_random(70_000, 2));
    let large = user.file("large.bin", &big);
    let empty = user.file("empty", b"");

    let url = server.upload_url();
    let out = user.run(&[
        "upload",
        "--server",
        &url,
        "--api-key",
        KEY,
        &small,
        &spaced,
        &large,
        &empty,
    ]);
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        lines(&stdout),
        lines(&format!(
            "{small} -> notes.txt\n{spaced} -> my report.pdf\n{large} -> large.bin\n{empty} -> empty\n"
        ))
    );
    assert_eq!(
        visible_files(&out_dir),
        BTreeMap::from([
            ("notes.txt".to_owned(), b"hello\n".to_vec()),
            ("my report.pdf".to_owned(), pseudo_random(70_000, 2)),
            ("large.bin".to_owned(), big),
            ("empty".to_owned(), Vec::new()),
        ])
    );
    // The buffer was created in the default place, and remembers the deliveries.
    assert!(user.default_buffer().exists());
    let status = user.status();
    assert_eq!(status.len(), 4);
    assert!(status.iter().all(|f| f["state"] == "confirmed"
        && f["server_name"] == f["remote_name"]
        && f["target"] == "cli"));
    // The sources are left alone, as `cp` leaves them.
    assert!(Path::new(&large).exists());
}

#[tokio::test]
async fn cp_style_copies_and_reports_the_name_the_receiver_chose() {
    let user = User::new();
    let out_dir = user.files.parent().unwrap().join("out");
    let server = Server::start(&out_dir, &[]).await;
    let url = server.upload_url();
    let first = user.file("a/report.txt", b"first");
    let second = user.file("b/report.txt", b"second");

    let out = user.run(&[&first, &url, "-k", KEY]);
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!(
        (code, stdout),
        (Some(0), format!("{first} -> report.txt\n")),
        "{stderr}"
    );

    // Options first, and a relative path, printed as typed; the name is taken,
    // so the receiver picks another and the output says which.
    let out = user.run(&["--api-key", KEY, "b/report.txt", &url]);
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!(code, Some(0), "{stderr}");
    let landed = stdout
        .strip_prefix("b/report.txt -> ")
        .unwrap_or_else(|| panic!("{stdout:?}"))
        .trim();
    assert!(
        landed.starts_with("report_") && landed.ends_with(".txt"),
        "{landed}"
    );
    let files = visible_files(&out_dir);
    assert_eq!(files["report.txt"], b"first");
    assert_eq!(files[landed], b"second");
    assert_eq!(files.len(), 2);
    assert!(Path::new(&second).exists());
}

#[tokio::test]
async fn add_buffers_offline_and_upload_sends_the_buffer_once() {
    let user = User::new();
    let one = user.file("one.txt", b"1");
    let two = user.file("two.txt", b"22");

    // No receiver at all: add works.
    let out = user.run(&["add", &one, &two]);
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!("buffered {one} (1 bytes, 1 chunk(s), id 1)")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("buffered {two} (2 bytes, 1 chunk(s), id 2)")),
        "{stdout}"
    );
    assert!(stderr.contains("indexedcp upload --server URL"), "{stderr}");
    let out = user.run(&["add", &one]);
    assert_eq!(
        outcome(&out).1,
        format!("{one} is already buffered (id 1)\n")
    );
    let status = user.status();
    assert_eq!(status.len(), 2);
    assert!(status.iter().all(|f| f["state"] == "queued"));
    let table = text(&user.run(&["ls"]).stdout);
    assert!(
        table.contains("one.txt") && table.contains("queued"),
        "{table}"
    );

    let out_dir = user.files.parent().unwrap().join("out");
    let server = Server::start(&out_dir, &[]).await;
    let url = server.upload_url();
    let out = user.run(&["upload", "--server", &url, "-k", KEY]);
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        lines(&stdout),
        lines(&format!("{one} -> one.txt\n{two} -> two.txt\n"))
    );
    assert_eq!(
        visible_files(&out_dir),
        BTreeMap::from([
            ("one.txt".to_owned(), b"1".to_vec()),
            ("two.txt".to_owned(), b"22".to_vec()),
        ])
    );

    let out = user.run(&["upload", "--server", &url, "-k", KEY]);
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!((code, stdout.as_str()), (Some(0), ""), "{stderr}");
    assert!(stderr.contains("nothing to upload"), "{stderr}");
}

#[tokio::test]
async fn missing_or_unreadable_inputs_exit_65_and_buffer_nothing() {
    let user = User::new();
    let out_dir = user.files.parent().unwrap().join("out");
    let server = Server::start(&out_dir, &[]).await;
    let url = server.upload_url();
    let good = user.file("good.txt", b"good");
    let missing = user.files.join("missing.txt").display().to_string();
    let dir = user.files.display().to_string();

    let out = user.run(&["upload", "--server", &url, "-k", KEY, &good, &missing]);
    let (code, _, stderr) = outcome(&out);
    assert_eq!(code, Some(65), "{stderr}");
    assert!(
        stderr.contains(&format!("{missing}: no such file")),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was buffered"), "{stderr}");
    let out = user.run(&["add", &dir]);
    let (code, _, stderr) = outcome(&out);
    assert_eq!(code, Some(65), "{stderr}");
    assert!(stderr.contains("is a directory"), "{stderr}");
    let out = user.run(&[&missing, &url, "-k", KEY]);
    assert_eq!(out.status.code(), Some(65));
    assert!(visible_files(&out_dir).is_empty());
    assert!(!user.default_buffer().exists());
}

#[test]
fn usage_errors_exit_64() {
    let user = User::new();
    let file = user.file("a.txt", b"a");
    let cases: [(&[&str], &str); 5] = [
        (
            &["upload", "--server", "http://127.0.0.1:9/upload", &file],
            "--api-key",
        ),
        (&["upload", "-k", KEY, &file], "--server"),
        (&["add"], "FILE"),
        (
            &[
                "upload",
                "--server",
                "ftp://nowhere/upload",
                "-k",
                KEY,
                &file,
            ],
            "http://",
        ),
        (&["completions", "nosh"], "bash"),
    ];
    for (args, needle) in cases {
        let out = user.run(args);
        let (code, _, stderr) = outcome(&out);
        assert_eq!(code, Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn an_unreachable_receiver_exits_69_and_the_same_command_resumes() {
    let user = User::new();
    let file = user.file("later.txt", b"sent later");
    let dead = dead_url();
    let out = user.run(&[
        "upload",
        "--server",
        &dead,
        "-k",
        KEY,
        "--max-retries",
        "2",
        "--retry-delay",
        "50ms",
        &file,
    ]);
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!((code, stdout.as_str()), (Some(69), ""), "{stderr}");
    assert!(
        stderr.contains("retry 1 of 2") && stderr.contains("retry 2 of 2"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "1 file(s) stay buffered; `indexedcp upload --server {dead}` resumes them"
        )),
        "{stderr}"
    );
    let status = user.status();
    assert_eq!(
        (status[0]["state"].as_str(), status[0]["retries"].as_u64()),
        (Some("queued"), Some(3))
    );
    assert!(
        status[0]["last_error"]
            .as_str()
            .unwrap()
            .contains("cannot reach"),
        "{status:?}"
    );

    let out_dir = user.files.parent().unwrap().join("out");
    let server = Server::start(&out_dir, &[]).await;
    let out = user.run(&["upload", "--server", &server.upload_url(), "-k", KEY]);
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!(
        (code, stdout),
        (Some(0), format!("{file} -> later.txt\n")),
        "{stderr}"
    );
    assert_eq!(
        visible_files(&out_dir),
        BTreeMap::from([("later.txt".to_owned(), b"sent later".to_vec())])
    );
}

#[tokio::test]
async fn a_refused_key_exits_78_without_waiting_out_the_retries() {
    let user = User::new();
    let out_dir = user.files.parent().unwrap().join("out");
    let server = Server::start(&out_dir, &[]).await;
    let file = user.file("a.txt", b"a");
    let started = std::time::Instant::now();
    let out = user.run(&[
        "upload",
        "--server",
        &server.upload_url(),
        "-k",
        "wrong-key",
        "--retry-delay",
        "10s",
        &file,
    ]);
    let (code, _, stderr) = outcome(&out);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "no retry for a refused key"
    );
    assert!(
        stderr.contains("401") && stderr.contains("--api-key"),
        "{stderr}"
    );
    assert_eq!(user.status()[0]["state"], "queued");
    assert!(visible_files(&out_dir).is_empty());
}

#[tokio::test]
async fn a_refused_file_is_parked_then_retry_and_purge_manage_it() {
    let user = User::new();
    let out_dir = user.files.parent().unwrap().join("out");
    let strict = Server::start(&out_dir, &["--max-file-bytes", "10"]).await;
    let big = user.file("big.txt", b"more than ten bytes");
    let small = user.file("small.txt", b"tiny");

    let out = user.run(&[
        "upload",
        "--server",
        &strict.upload_url(),
        "-k",
        KEY,
        &big,
        &small,
    ]);
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!(code, Some(65), "{stderr}");
    assert_eq!(stdout, format!("{small} -> small.txt\n"));
    assert!(
        stderr.contains("413") && stderr.contains("indexedcp retry"),
        "{stderr}"
    );
    let status = user.status();
    let parked = status
        .iter()
        .find(|f| f["remote_name"] == "big.txt")
        .unwrap();
    assert_eq!(parked["state"], "failed");
    assert!(
        parked["failure"].as_str().unwrap().contains("413"),
        "{parked}"
    );
    let table = text(&user.run(&["status"]).stdout);
    assert!(table.contains("failed") && table.contains("413"), "{table}");

    // Parked files are not sent by a plain upload; `retry` queues them again.
    let out = user.run(&["upload", "--server", &strict.upload_url(), "-k", KEY]);
    let (code, _, stderr) = outcome(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("1 file(s) parked earlier"), "{stderr}");
    let id = parked["id"].to_string();
    let out = user.run(&["retry", &id]);
    assert_eq!(outcome(&out).0, Some(0));
    assert!(text(&out.stdout).starts_with("1 file(s) queued again"));
    let out = user.run(&["retry", &id]);
    assert_eq!(out.status.code(), Some(65), "nothing parked any more");

    let lenient_dir = user.files.parent().unwrap().join("lenient");
    let lenient = Server::start(&lenient_dir, &[]).await;
    let out = user.run(&["upload", "--server", &lenient.upload_url(), "-k", KEY]);
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!(
        (code, stdout),
        (Some(0), format!("{big} -> big.txt\n")),
        "{stderr}"
    );
    assert_eq!(
        visible_files(&lenient_dir)["big.txt"],
        b"more than ten bytes"
    );

    // Purge: refused without --yes when nobody can confirm, done with it.
    let extra = user.file("extra.txt", b"extra");
    user.run(&["add", &extra]);
    let id = user
        .status()
        .iter()
        .find(|f| f["remote_name"] == "extra.txt")
        .unwrap()["id"]
        .to_string();
    let out = user.run(&["purge", &id]);
    assert_eq!(outcome(&out).0, Some(64));
    let out = user.run(&["purge", &id, "--yes"]);
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, format!("purged extra.txt ({id})\n"));
    assert!(
        user.status()
            .iter()
            .all(|f| f["remote_name"] != "extra.txt")
    );
}

#[tokio::test]
async fn ctrl_c_leaves_the_rest_buffered_for_the_next_upload() {
    let user = User::new();
    let file = user.file("interrupted.txt", b"still here");
    let dead = dead_url();
    let mut child = user
        .command(&[
            "upload",
            "--server",
            &dead,
            "-k",
            KEY,
            "--max-retries",
            "5",
            "--retry-delay",
            "60s",
            &file,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("retry 1 of 5") {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "{seen}");
        seen.push_str(&line);
    }
    unsafe_kill(child.id(), 2);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(
        rest.contains(&format!("interrupted; what was not delivered stays buffered, and `indexedcp upload --server {dead}` resumes it")),
        "{rest}"
    );
    assert_eq!(user.status()[0]["state"], "queued");

    let out_dir = user.files.parent().unwrap().join("out");
    let server = Server::start(&out_dir, &[]).await;
    let out = user.run(&["upload", "--server", &server.upload_url(), "-k", KEY]);
    assert_eq!(outcome(&out).0, Some(0), "{}", text(&out.stderr));
    assert_eq!(visible_files(&out_dir)["interrupted.txt"], b"still here");
}

#[tokio::test]
async fn storage_flag_and_api_key_environment_are_honoured() {
    let user = User::new();
    let out_dir = user.files.parent().unwrap().join("out");
    let server = Server::start(&out_dir, &[]).await;
    let storage = user
        .files
        .parent()
        .unwrap()
        .join("elsewhere/deep/buffer.db");
    let storage = storage.display().to_string();
    let file = user.file("env.txt", b"env");
    let out = user
        .command(&[
            "upload",
            "--server",
            &server.url,
            "--storage",
            &storage,
            &file,
        ])
        .env("INDEXEDCP_API_KEY", KEY)
        .output()
        .unwrap();
    let (code, stdout, stderr) = outcome(&out);
    assert_eq!(
        (code, stdout),
        (Some(0), format!("{file} -> env.txt\n")),
        "{stderr}"
    );
    assert!(Path::new(&storage).exists());
    assert!(!user.default_buffer().exists());
    let listed = text(
        &user
            .run(&["status", "--json", "--storage", &storage])
            .stdout,
    );
    assert!(listed.contains("\"env.txt\""), "{listed}");
}

#[test]
fn help_version_and_completions() {
    let user = User::new();
    let out = user.run(&["--help"]);
    let (code, stdout, _) = outcome(&out);
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("FILE... URL") && stdout.contains("Examples:"),
        "{stdout}"
    );
    for command in [
        "upload",
        "add",
        "status",
        "retry",
        "purge",
        "daemon",
        "server",
        "check-config",
        "completions",
    ] {
        let out = user.run(&[command, "--help"]);
        let (code, stdout, _) = outcome(&out);
        assert_eq!(code, Some(0), "{command}");
        assert!(
            stdout.contains("Example"),
            "{command} --help has no example:\n{stdout}"
        );
    }
    let out = user.run(&["--version"]);
    assert_eq!(
        outcome(&out).1,
        format!("indexedcp {}\n", env!("CARGO_PKG_VERSION"))
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = user.run(&["completions", shell]);
        let (code, stdout, _) = outcome(&out);
        assert_eq!(code, Some(0), "{shell}");
        assert!(
            stdout.contains("indexedcp") && stdout.contains("upload"),
            "{shell}"
        );
    }
}
