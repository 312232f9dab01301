//! The commands that read or edit the buffer without uploading: `status`
//! (alias `ls`) with its per-target summary and file table, `retry` and
//! `purge`. They work on the buffer file directly, so they also inspect the
//! buffer of a daemon that is running.

use super::args::{PurgeArgs, RetryArgs, StatusArgs};
use super::{Failure, exit};
use crate::agent::store::{FileRecord, FileState};

/// `indexedcp status`: the buffer's files as a table, or as JSON.
pub(super) fn status(args: StatusArgs) -> Result<(), Failure> {
    let store = args.buffer.open()?;
    let files = store.list().map_err(|e| Failure::io(e.to_string()))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&files).expect("file records serialize")
        );
    } else {
        print!("{}", status_table(&files));
    }
    Ok(())
}

/// `indexedcp retry ID|--all`: parked files back in the upload queue.
pub(super) fn retry(args: RetryArgs) -> Result<(), Failure> {
    let store = args.buffer.open()?;
    let n = store
        .retry(if args.all { None } else { args.id })
        .map_err(|e| Failure::io(e.to_string()))?;
    if n == 0 && !args.all {
        return Err(Failure {
            code: exit::DATA_ERR,
            message: format!(
                "no parked file with id {}; `indexedcp status` lists them",
                args.id.unwrap_or_default()
            ),
        });
    }
    println!("{n} file(s) queued again; a running daemon picks them up at its next check");
    Ok(())
}

/// `indexedcp purge ID`: a file and its data out of the buffer, after asking.
pub(super) fn purge(args: PurgeArgs) -> Result<(), Failure> {
    let store = args.buffer.open()?;
    let file = store.file(args.id).map_err(|_| Failure {
        code: exit::DATA_ERR,
        message: format!(
            "no buffered file with id {}; `indexedcp status` lists them",
            args.id
        ),
    })?;
    if !args.yes
        && !confirm(&format!(
            "delete {} ({} bytes, {}) from the buffer? its data is lost unless it was delivered [y/N] ",
            file.remote_name, file.size, file.state
        ))
    {
        return Err(Failure::usage("not purged (confirm with --yes)"));
    }
    abort_at_target(&args, &file);
    store
        .purge(args.id)
        .map_err(|e| Failure::io(e.to_string()))?;
    println!("purged {} ({})", file.remote_name, file.id);
    Ok(())
}

/// Releases what the file's target holds of an unfinished upload (an S3
/// multipart upload), when the configuration names the target. A failure
/// does not keep the file: the operator asked for it to go, and is told what
/// is left behind.
fn abort_at_target(args: &PurgeArgs, file: &FileRecord) {
    if file.delivery_state.is_none() {
        return;
    }
    let Some(target) = args
        .buffer
        .config()
        .ok()
        .flatten()
        .and_then(|config| config.target(&file.target).cloned())
    else {
        return;
    };
    let aborted = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|runtime| {
            runtime.block_on(async {
                let target =
                    crate::agent::upload::TargetRuntime::new(target).map_err(|e| e.to_string())?;
                target.abort(file).await.map_err(|e| e.to_string())
            })
        });
    if let Err(error) = aborted {
        eprintln!(
            "warning: cannot abort the unfinished upload of {} at target {:?}: {error};              the store keeps it until its lifecycle rule removes it",
            file.remote_name, file.target
        );
    }
}

/// Asks on the terminal; anything but yes (or no terminal) is no.
fn confirm(question: &str) -> bool {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return false;
    }
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).is_ok()
        && matches!(answer.trim(), "y" | "Y" | "yes" | "YES")
}

/// When a file is tried next, relative to now, for the `next` column.
fn human_time(ms: i64) -> String {
    let delta = ms - crate::clock::now_ms();
    if delta <= 0 {
        "now".to_owned()
    } else {
        format!("in {:.1}s", delta as f64 / 1000.0)
    }
}

/// One line per target: queued files and bytes, in progress, failed, the age
/// of the oldest queued file, and the last error.
fn target_summary(files: &[FileRecord]) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write;
    #[derive(Default)]
    struct Summary<'a> {
        queued: u64,
        bytes: u64,
        in_progress: u64,
        failed: u64,
        oldest: Option<i64>,
        last_error: Option<&'a str>,
    }
    let mut targets: BTreeMap<&str, Summary> = BTreeMap::new();
    for f in files {
        let t = targets.entry(f.target.as_str()).or_default();
        match f.state {
            FileState::Queued => {
                t.queued += 1;
                t.bytes += f.size;
                t.in_progress += u64::from(f.chunks_uploaded > 0);
                t.oldest = Some(t.oldest.map_or(f.created_at, |o| o.min(f.created_at)));
                if let Some(e) = &f.last_error {
                    t.last_error = Some(e);
                }
            }
            FileState::Failed => {
                t.failed += 1;
                t.last_error = f.failure.as_deref().or(t.last_error);
            }
            _ => {}
        }
    }
    let now = crate::clock::now_ms();
    let mut out = String::new();
    for (name, t) in targets {
        let _ = write!(
            out,
            "target {name}: {} queued ({} bytes), {} in progress, {} failed",
            t.queued, t.bytes, t.in_progress, t.failed
        );
        if let Some(oldest) = t.oldest {
            let _ = write!(
                out,
                ", oldest waiting {:.0}s",
                (now - oldest).max(0) as f64 / 1000.0
            );
        }
        if let Some(e) = t.last_error {
            let _ = write!(out, "; last error: {e}");
        }
        out.push('\n');
    }
    out
}

/// The human-readable `status` listing.
fn status_table(files: &[FileRecord]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if files.is_empty() {
        out.push_str("the buffer is empty\n");
        return out;
    }
    out.push_str(&target_summary(files));
    out.push('\n');
    let _ = writeln!(
        out,
        "{:>5}  {:<9}  {:>12}  {:>9}  {:>7}  {:<9}  name",
        "id", "state", "bytes", "chunks", "retries", "next"
    );
    for f in files {
        let next = f.next_attempt.map(human_time).unwrap_or_else(|| "-".into());
        let _ = write!(
            out,
            "{:>5}  {:<9}  {:>12}  {:>4}/{:<4}  {:>7}  {:<9}  {}",
            f.id, f.state, f.size, f.chunks_uploaded, f.chunk_count, f.retries, next, f.remote_name
        );
        if let Some(server_name) = &f.server_name {
            let _ = write!(out, " -> {server_name}");
        }
        out.push('\n');
        if let Some(reason) = f.failure.as_ref().or(f
            .last_error
            .as_ref()
            .filter(|_| f.state != FileState::Confirmed))
        {
            let _ = writeln!(out, "{:>7}{reason}", "");
        }
    }
    out
}
