//! Scenario 8: the order of durable steps, read from `strace` traces of a real
//! agent and a real receiver delivering a few files (skipped, with a message,
//! when strace is not installed: `apt-get install -y strace`).
//!
//! - Agent: every source file is unlinked only after the thread that unlinks it
//!   wrote the file's rows to the buffer's WAL and then fsync'ed (or
//!   fdatasync'ed) the WAL: the source is never disposed of before its buffered
//!   copy is durable. Files that arrive together are committed as one batch
//!   and then unlinked back to back.
//! - Receiver: for every finished upload, the staged file is fsync'ed and then
//!   the state database (its WAL) is synced, holding the final name, before the
//!   file is renamed into place; the destination directory is fsync'ed after
//!   the rename, and only then is a reply saying `"complete":true` for that
//!   upload written to a socket. (The completion record itself is not synced:
//!   after a power cut, the synced final name and the durable rename let the
//!   receiver's recovery finish it.) Files of a batch follow the same rule
//!   with shared syncs; the scenario makes sure some completions were
//!   answered in a batch reply.
//!
//! What the traces prove, and what they do not:
//! - They show the order in which the processes issued system calls and when
//!   those returned, which is the program's side of durability. Whether the
//!   storage honours an fsync (a disk cache that lies, a tmpfs) is not visible.
//! - Events of different threads are compared by their position in strace's
//!   output. strace handles one ptrace stop at a time and a traced thread stays
//!   stopped until its stop is printed, so a syscall that returned before
//!   another thread was woken to issue the next one is printed first: causally
//!   ordered calls appear in causal order. Concurrent unrelated calls may
//!   interleave in any order, which is why the agent's check stays on one
//!   thread (ingest commits and disposes on the same blocking thread).
//! - The WAL sync is attributed to a file's ingest because it follows, on the
//!   same thread, the last WAL write before the unlink; that those frames hold
//!   the file's committed transaction is SQLite's `synchronous = FULL`
//!   contract, not something the trace shows. Writes through mmap (the WAL
//!   index) are invisible to strace.
//! - Only the paths this run takes are traced: an ordinary ingest and an
//!   ordinary completion. Recovery after a crash (a finalize resumed at start,
//!   a source found already buffered) is exercised by scenarios 1 and 2, not
//!   traced here.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::manifest::Manifest;
use super::*;
use crate::fixtures::drop_file;

const TRACED: &str = "fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,pwrite64,write,writev,sendto,sendmsg";

fn strace_available() -> bool {
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `strace ... -o trace -- indexedcp args`, stderr to `log`.
fn spawn_traced(trace: &Path, args: &[OsString], log: &Path) -> Child {
    let mut full: Vec<OsString> = vec![
        "-f".into(),
        "-tt".into(),
        "-y".into(),
        "-s".into(),
        "65536".into(),
        "-e".into(),
        format!("trace={TRACED}").into(),
        "-o".into(),
        trace.as_os_str().to_owned(),
        "--".into(),
        crate::support::BIN.into(),
    ];
    full.extend(args.iter().cloned());
    let log = std::fs::File::create(log).unwrap();
    crate::support::clear_inherited_env(&mut Command::new("strace"))
        .args(&full)
        .env("INDEXEDCP_LOG_LEVEL", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start strace")
}

/// SIGKILLs the process strace started (its only child), which ends strace too.
fn stop_traced(strace: &mut Child) {
    let pid = strace.id();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    for child in children.split_whitespace() {
        crate::fixtures::unsafe_kill(child.parse().unwrap(), 9);
    }
    let exited = crate::support::wait_until(
        "strace to exit",
        Duration::from_millis(20),
        Duration::from_secs(20),
        || Ok(strace.try_wait()?.is_some()),
    );
    if exited.is_err() {
        let _ = strace.kill();
    }
    let _ = strace.wait();
}

/// One system call from a trace: who made it, where it starts and ends in the
/// trace (line numbers; different for a call strace printed as unfinished and
/// resumed), its name, its arguments as printed and its result.
#[derive(Debug, Clone)]
struct Call {
    tid: u32,
    start: usize,
    end: usize,
    name: String,
    args: String,
    result: String,
}

impl Call {
    /// The path strace printed for the first argument (`-y`: `7</a/b>`).
    fn fd_path(&self) -> Option<&str> {
        fd_path_at(&self.args, 0)
    }

    fn ok(&self) -> bool {
        self.result.trim_start().starts_with('0')
            || self.result.trim().parse::<i64>().is_ok_and(|n| n >= 0)
    }
}

/// The `-y` path of the `n`-th fd-looking argument.
fn fd_path_at(args: &str, n: usize) -> Option<&str> {
    let mut rest = args;
    let mut seen = 0;
    while let Some(open) = rest.find('<') {
        let after = &rest[open + 1..];
        let close = after.find('>')?;
        if seen == n {
            return Some(&after[..close]);
        }
        seen += 1;
        rest = &after[close + 1..];
    }
    None
}

/// The quoted string arguments of a call, unescaped only as far as needed here.
fn quoted(args: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = args.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut s = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        s.push('\\');
                        s.push(n);
                    }
                }
                '"' => break,
                c => s.push(c),
            }
        }
        out.push(s);
    }
    out
}

/// Parses `strace -f -tt -y` output into calls, in order of their start.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut calls: Vec<Call> = Vec::new();
    let mut pending: BTreeMap<u32, usize> = BTreeMap::new();
    for (line_no, line) in text.lines().enumerate() {
        let mut parts = line.splitn(3, ' ');
        let Some(tid) = parts.next().and_then(|t| t.trim().parse::<u32>().ok()) else {
            continue;
        };
        // strace pads the tid column: skip empty pieces.
        let rest: String = parts.collect::<Vec<_>>().join(" ");
        let rest = rest.trim_start();
        let Some((_time, body)) = rest.split_once(' ') else {
            continue;
        };
        if let Some(resumed) = body.strip_prefix("<... ") {
            let Some(&idx) = pending.get(&tid) else {
                continue;
            };
            pending.remove(&tid);
            let after = resumed.split_once("resumed>").map_or("", |(_, a)| a);
            let call = &mut calls[idx];
            call.end = line_no;
            match after.rsplit_once(" = ") {
                Some((args, result)) => {
                    call.args.push_str(args);
                    call.result = result.to_owned();
                }
                None => call.args.push_str(after),
            }
            continue;
        }
        let Some(paren) = body.find('(') else {
            continue;
        };
        let name = body[..paren].to_owned();
        if name.starts_with("---") || name.starts_with("+++") {
            continue;
        }
        let inner = &body[paren + 1..];
        if let Some(args) = inner.strip_suffix(" <unfinished ...>") {
            pending.insert(tid, calls.len());
            calls.push(Call {
                tid,
                start: line_no,
                end: usize::MAX,
                name,
                args: args.to_owned(),
                result: String::new(),
            });
        } else if let Some((args, result)) = inner.rsplit_once(" = ") {
            calls.push(Call {
                tid,
                start: line_no,
                end: line_no,
                name,
                args: args.to_owned(),
                result: result.to_owned(),
            });
        }
    }
    calls
}

fn is_sync(call: &Call) -> bool {
    call.name == "fsync" || call.name == "fdatasync"
}

fn is_write(call: &Call) -> bool {
    matches!(call.name.as_str(), "write" | "pwrite64" | "writev")
}

/// The path an `unlink`/`unlinkat` removed (joined to its directory fd's path
/// when relative).
fn unlinked_path(call: &Call) -> Option<String> {
    if call.name != "unlink" && call.name != "unlinkat" {
        return None;
    }
    let path = quoted(&call.args).into_iter().next()?;
    if path.starts_with('/') {
        return Some(path);
    }
    let dir = fd_path_at(&call.args, 0)?;
    Some(format!("{dir}/{path}"))
}

/// The agent's rule: each source unlink follows, on its thread, a write to
/// the buffer's WAL and then a sync of it; and when the thread also wrote the
/// bulk file's WAL (a file streamed in), a sync of that one after its last
/// write too (the unlinks of one batch follow its commit back to back).
/// Returns the number of source unlinks checked, how many of them followed
/// bulk writes, and the violations.
fn check_agent(calls: &[Call], spool: &Path) -> (usize, usize, Vec<String>) {
    let spool = spool.display().to_string();
    let wal = |c: &Call| c.fd_path().is_some_and(|p| p.ends_with("/buffer.db-wal"));
    let bulk_wal = |c: &Call| {
        c.fd_path()
            .is_some_and(|p| p.ends_with("/buffer-bulk.db-wal"))
    };
    let mut checked = 0;
    let mut bulk_checked = 0;
    let mut problems = Vec::new();
    for (i, unlink) in calls.iter().enumerate() {
        if !unlink.ok() {
            continue;
        }
        let Some(path) = unlinked_path(unlink) else {
            continue;
        };
        if !path.starts_with(&spool) {
            continue;
        }
        checked += 1;
        let mine: Vec<&Call> = calls[..i]
            .iter()
            .filter(|c| c.tid == unlink.tid && c.end < unlink.start)
            .collect();
        let source_unlink = |c: &&Call| unlinked_path(c).is_some_and(|p| p.starts_with(&spool));
        // Files buffered in one batch share its commit and are disposed of back
        // to back: skip the batch's earlier unlinks, then this batch's part of
        // the thread runs from the previous batch's last unlink.
        let batch_start = mine.len() - mine.iter().rev().take_while(|c| source_unlink(c)).count();
        let mine = &mine[..batch_start];
        let since = mine.iter().rposition(source_unlink).map_or(0, |p| p + 1);
        let mine = &mine[since..];
        let Some(last_write) = mine.iter().rposition(|c| is_write(c) && wal(c)) else {
            problems.push(format!(
                "{path}: unlinked (trace line {}) by thread {} with no WAL write before it on that thread",
                unlink.start + 1,
                unlink.tid
            ));
            continue;
        };
        let synced = mine[last_write + 1..]
            .iter()
            .any(|c| is_sync(c) && wal(c) && c.ok());
        if !synced {
            problems.push(format!(
                "{path}: unlinked (trace line {}) after the WAL write at line {} without an fsync/fdatasync of the WAL in between",
                unlink.start + 1,
                mine[last_write].start + 1
            ));
        }
        // The bulk WAL's sync must also come before the last write to the
        // buffer's WAL (the commit that seals the file names bytes that are
        // durable already).
        if let Some(last_bulk) = mine.iter().rposition(|c| is_write(c) && bulk_wal(c)) {
            bulk_checked += 1;
            let synced = mine[last_bulk + 1..]
                .iter()
                .position(|c| is_sync(c) && bulk_wal(c) && c.ok())
                .map(|at| last_bulk + 1 + at);
            match synced {
                None => problems.push(format!(
                    "{path}: unlinked (trace line {}) after the bulk WAL write at line {} without an fsync/fdatasync of that WAL in between",
                    unlink.start + 1,
                    mine[last_bulk].start + 1
                )),
                Some(at) if at > last_write => problems.push(format!(
                    "{path}: the bulk WAL was synced (trace line {}) after the last write to the buffer's WAL (line {})",
                    mine[at].start + 1,
                    mine[last_write].start + 1
                )),
                Some(_) => {}
            }
        }
    }
    (checked, bulk_checked, problems)
}

/// The receiver's rule, per finished upload. Returns the uploads checked, how
/// many of them were answered in a batch reply, and the violations.
fn check_receiver(calls: &[Call], out: &Path) -> (usize, usize, Vec<String>) {
    let out = out.display().to_string();
    let staging = format!("{out}/.indexedcp/staging");
    let mut checked = 0;
    let mut batched = 0;
    let mut problems = Vec::new();
    for rename in calls.iter().filter(|c| {
        c.name.starts_with("rename") && c.ok() && fd_path_at(&c.args, 0) == Some(&staging)
    }) {
        let names = quoted(&rename.args);
        let (Some(id), Some(final_name)) = (names.first(), names.get(1)) else {
            continue;
        };
        let Some(dest_dir) = fd_path_at(&rename.args, 1) else {
            continue;
        };
        if id.starts_with("v1-") {
            continue;
        }
        checked += 1;
        let what = format!("upload {id} -> {final_name}");
        let staged = format!("{staging}/{id}");
        if !calls
            .iter()
            .any(|c| is_sync(c) && c.ok() && c.fd_path() == Some(&staged) && c.end < rename.start)
        {
            problems.push(format!(
                "{what}: renamed (line {}) without an fsync of the staged file before",
                rename.start + 1
            ));
        }
        let staged_sync = calls
            .iter()
            .filter(|c| {
                is_sync(c) && c.ok() && c.fd_path() == Some(&staged) && c.end < rename.start
            })
            .map(|c| c.end)
            .max();
        let state_sync = calls.iter().find(|c| {
            is_sync(c)
                && c.ok()
                && c.fd_path().is_some_and(|p| p.ends_with("/uploads.db-wal"))
                && staged_sync.is_some_and(|end| c.start > end)
                && c.end < rename.start
        });
        if state_sync.is_none() {
            problems.push(format!(
                "{what}: renamed (line {}) without a sync of the state database (the final name) after the staged file's fsync",
                rename.start + 1
            ));
        }
        let Some(dir_sync) = calls.iter().find(|c| {
            is_sync(c) && c.ok() && c.fd_path() == Some(dest_dir) && c.start > rename.end
        }) else {
            problems.push(format!(
                "{what}: no fsync of {dest_dir} after the rename (line {})",
                rename.start + 1
            ));
            continue;
        };
        let reply = calls.iter().find(|c| {
            matches!(c.name.as_str(), "write" | "writev" | "sendto" | "sendmsg")
                && c.fd_path()
                    .is_some_and(|p| p.starts_with("socket:") || p.starts_with("TCP"))
                && c.args.contains(&format!("\\\"uploadId\\\":\\\"{id}\\\""))
                && c.args.contains("\\\"complete\\\":true")
        });
        let Some(reply) = reply else {
            problems.push(format!("{what}: no complete reply found in the trace"));
            continue;
        };
        if reply.args.contains("{\\\"files\\\":[") {
            batched += 1;
        }
        if reply.start < dir_sync.end {
            problems.push(format!(
                "{what}: complete reply (line {}) before the directory fsync finished (line {})",
                reply.start + 1,
                dir_sync.end + 1
            ));
        }
        // No complete reply for this upload before the rename either.
        if let Some(early) = calls.iter().find(|c| {
            matches!(c.name.as_str(), "write" | "writev" | "sendto" | "sendmsg")
                && c.start < rename.end
                && c.args.contains(&format!("\\\"uploadId\\\":\\\"{id}\\\""))
                && c.args.contains("\\\"complete\\\":true")
        }) {
            problems.push(format!(
                "{what}: complete reply at line {} before the rename",
                early.start + 1
            ));
        }
    }
    (checked, batched, problems)
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_8_sources_and_replies_wait_for_fsync() {
    let started = Instant::now();
    if !crate::support::require(strace_available(), "strace", "apt-get install strace") {
        return;
    }
    let fx = Fixture::new();
    let port = free_port();
    let receiver_trace = fx.logs.join("receiver.strace");
    let agent_trace = fx.logs.join("agent.strace");
    let receiver_args: Vec<OsString> = vec![
        "server".into(),
        "--port".into(),
        port.to_string().into(),
        "--output-dir".into(),
        fx.out.as_os_str().to_owned(),
        "-k".into(),
        crate::fixtures::KEY.into(),
        "--path-mode".into(),
        "allow-paths".into(),
    ];
    let mut receiver = spawn_traced(
        &receiver_trace,
        &receiver_args,
        &fx.logs.join("receiver.log"),
    );
    let health = format!("http://127.0.0.1:{port}/health");
    crate::support::eventually(Duration::from_secs(60), "the traced receiver", async || {
        let r = reqwest::get(&health).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    let config = agent_config_with(
        &fx,
        &format!("http://127.0.0.1:{port}/upload"),
        "disposition = \"delete\"",
        "chunk_size = \"256KiB\"",
        "",
    );
    // Small files waiting before the start: after the first few, which learn
    // that the receiver takes batches, they travel in a batch.
    let mut files = BTreeMap::new();
    for i in 0..12usize {
        let name = format!("waiting-{i}.bin");
        let data = pseudo_random(100 * i, 900 + i as u64);
        std::fs::write(fx.spool.join(&name), &data).unwrap();
        files.insert(name, data);
    }
    let agent_args: Vec<OsString> = vec!["daemon".into(), "--config".into(), config.into()];
    let mut agent = spawn_traced(&agent_trace, &agent_args, &fx.logs.join("agent.log"));
    for (i, size) in [0usize, 1000, 300_000, (1 << 20) + 1, 70_000]
        .into_iter()
        .enumerate()
    {
        let name = format!("traced-{i}.bin");
        let data = pseudo_random(size, 800 + i as u64);
        drop_file(&fx.staging, &fx.spool, &name, &data);
        files.insert(name, data);
    }
    let manifest = Manifest::from_files(&files);
    let drained = try_wait_until_drained(&fx, &manifest, Duration::from_secs(120)).await;
    stop_traced(&mut agent);
    stop_traced(&mut receiver);
    drained.unwrap();
    let report = manifest.check(&fx.out, &[&fx.buffer_db(), &fx.uploads_db()]);
    report.assert_clean("scenario 8");

    let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let agent_calls = parse_trace(&read(&agent_trace));
    let receiver_calls = parse_trace(&read(&receiver_trace));
    let (unlinks, streamed, agent_problems) = check_agent(&agent_calls, &fx.spool);
    let (uploads, batched, receiver_problems) = check_receiver(&receiver_calls, &fx.out);
    println!(
        "scenario 8: {} files; agent: {} traced calls, {unlinks} source unlinks, {} before a WAL sync; receiver: {} traced calls, {uploads} completions ({batched} in batches), {} out of order; {:.1}s",
        files.len(),
        agent_calls.len(),
        agent_problems.len(),
        receiver_calls.len(),
        receiver_problems.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        agent_problems.is_empty(),
        "agent ordering (trace {}): {agent_problems:#?}",
        agent_trace.display()
    );
    assert!(
        receiver_problems.is_empty(),
        "receiver ordering (trace {}): {receiver_problems:#?}",
        receiver_trace.display()
    );
    assert_eq!(unlinks, files.len(), "every source unlink was traced");
    // The streamed file's unlink, and any other on a thread that wrote the
    // bulk WAL earlier (deleting a delivered file's bytes).
    assert!(
        streamed >= 1,
        "the file of 5 chunks was streamed into the bulk file"
    );
    assert_eq!(uploads, files.len(), "every completion was traced");
    assert!(batched > 0, "no completion was answered in a batch");
}

#[test]
fn an_unlink_after_an_unsynced_or_late_synced_bulk_write_is_caught() {
    let text = "\
101   12:00:00.000001 pwrite64(6</s/buffer-bulk.db-wal>, \"x\", 1, 0) = 1
101   12:00:00.000002 pwrite64(5</s/buffer.db-wal>, \"x\", 1, 0) = 1
101   12:00:00.000003 fdatasync(5</s/buffer.db-wal>) = 0
101   12:00:00.000004 unlink(\"/sp/a.bin\") = 0
102   12:00:00.000005 pwrite64(6</s/buffer-bulk.db-wal>, \"x\", 1, 0) = 1
102   12:00:00.000006 fdatasync(6</s/buffer-bulk.db-wal>) = 0
102   12:00:00.000007 pwrite64(5</s/buffer.db-wal>, \"x\", 1, 0) = 1
102   12:00:00.000008 fdatasync(5</s/buffer.db-wal>) = 0
102   12:00:00.000009 unlink(\"/sp/b.bin\") = 0
103   12:00:00.000010 pwrite64(6</s/buffer-bulk.db-wal>, \"x\", 1, 0) = 1
103   12:00:00.000011 pwrite64(5</s/buffer.db-wal>, \"x\", 1, 0) = 1
103   12:00:00.000012 fdatasync(6</s/buffer-bulk.db-wal>) = 0
103   12:00:00.000013 fdatasync(5</s/buffer.db-wal>) = 0
103   12:00:00.000014 unlink(\"/sp/c.bin\") = 0
";
    let (checked, streamed, problems) = check_agent(&parse_trace(text), Path::new("/sp"));
    assert_eq!((checked, streamed), (3, 3));
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("/sp/a.bin") && problems[0].contains("bulk WAL"));
    assert!(problems[1].contains("/sp/c.bin") && problems[1].contains("after the last write"));
}

#[test]
fn traces_are_parsed_across_unfinished_calls() {
    let text = "\
101   12:00:00.000001 pwrite64(5</s/buffer.db-wal>, \"x\", 1, 0) = 1
102   12:00:00.000002 fdatasync(5</s/buffer.db-wal> <unfinished ...>
101   12:00:00.000003 fdatasync(5</s/buffer.db-wal>) = 0
102   12:00:00.000004 <... fdatasync resumed>) = 0
101   12:00:00.000005 unlink(\"/sp/a.bin\") = 0
102   12:00:00.000006 unlink(\"/sp/b.bin\") = 0
";
    let calls = parse_trace(text);
    assert_eq!(calls.len(), 5);
    assert_eq!((calls[1].start, calls[1].end), (1, 3));
    assert_eq!(calls[1].fd_path(), Some("/s/buffer.db-wal"));
    let (checked, _, problems) = check_agent(&calls, Path::new("/sp"));
    assert_eq!(checked, 2);
    // Thread 102 synced, but never wrote the WAL itself.
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("/sp/b.bin"));
}

#[test]
fn a_reply_before_the_directory_sync_or_a_rename_before_the_state_sync_is_caught() {
    let reply = "writev(12<socket:[1]>, [{iov_base=\"HTTP/1.1 200 OK\\r\\n\\r\\n\", iov_len=19}, {iov_base=\"{\\\"uploadId\\\":\\\"abcdefabcdefabcdef\\\",\\\"complete\\\":true}\", iov_len=50}], 2) = 69";
    let staged = "201 12:00:00.000001 fsync(9</o/.indexedcp/staging/abcdefabcdefabcdef>) = 0\n";
    let state = "201 12:00:00.000002 fdatasync(5</o/.indexedcp/uploads.db-wal>) = 0\n";
    let rename = "201 12:00:00.000003 renameat2(8</o/.indexedcp/staging>, \"abcdefabcdefabcdef\", 7</o>, \"a.bin\", RENAME_NOREPLACE) = 0\n";
    let dir = "201 12:00:00.000005 fsync(7</o>) = 0\n";
    let check = |trace: String| {
        let (checked, _, problems) = check_receiver(&parse_trace(&trace), Path::new("/o"));
        assert_eq!(checked, 1);
        problems
    };
    let early_reply = check(format!(
        "{staged}{state}{rename}202 12:00:00.000004 {reply}\n{dir}"
    ));
    assert_eq!(early_reply.len(), 1, "{early_reply:#?}");
    assert!(
        early_reply[0].contains("before the directory fsync"),
        "{early_reply:#?}"
    );
    let unsynced_name = check(format!(
        "{staged}{rename}{dir}{state}202 12:00:00.000006 {reply}\n"
    ));
    assert_eq!(unsynced_name.len(), 1, "{unsynced_name:#?}");
    assert!(
        unsynced_name[0].contains("without a sync of the state database"),
        "{unsynced_name:#?}"
    );
    let good = check(format!(
        "{staged}{state}{rename}{dir}202 12:00:00.000006 {reply}\n"
    ));
    assert!(good.is_empty(), "{good:#?}");
}
