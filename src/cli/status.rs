//! The commands that read or edit the buffer without uploading: `status`
//! (alias `ls`) with its per-target summary and file table, `retry` and
//! `purge`. They work on the buffer file directly, so they also inspect the
//! buffer of a daemon that is running. The configuration, when one is named
//! (or the default file exists), tells each target's kind and, for a bucket,
//! the part size that turns a large file's acknowledged chunks into parts
//! sent; the one-shot commands' buffer has no fixed target, so it shows
//! neither.
//!
//! A damaged buffer is reported first, whether the daemon left its notice
//! (`buffer.db.corrupt`) or a query here meets the damage: "buffer corrupt",
//! the file, and `indexedcp doctor` as the way out, with exit code 65.

use std::collections::HashMap;

use super::args::{PurgeArgs, RetryArgs, StatusArgs};
use super::{Failure, exit};
use crate::agent::spool::escape_name;
use crate::agent::store::{self, ChunkMeta, FileRecord, FileState, Store, StoreError};
use crate::config::{Config, TargetKind};

/// What the configuration says of one target, for `status`.
struct TargetInfo {
    /// `indexedcp` or `s3`.
    kind: &'static str,
    /// The receiver's URL or the bucket's `s3://` URL.
    url: String,
    /// A bucket's part size: larger files go as multipart uploads.
    part_size: Option<u64>,
}

/// A large file's multipart upload: parts acknowledged and parts in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Parts {
    sent: u64,
    count: u64,
}

/// The targets the configuration names, by name.
fn targets(config: Option<&Config>) -> HashMap<String, TargetInfo> {
    config
        .map(|config| {
            config
                .targets
                .iter()
                .map(|target| {
                    let info = TargetInfo {
                        kind: target.kind.name(),
                        url: target.url.clone(),
                        part_size: match &target.kind {
                            TargetKind::S3(s3) => Some(s3.part_size),
                            TargetKind::IndexedCp | TargetKind::Tus => None,
                        },
                    };
                    (target.name.clone(), info)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Cuts a file's chunks into parts as the `s3` delivery does (runs of
/// consecutive chunks of at least `part_size` bytes, the last one taking the
/// rest) and counts the parts whose chunks were all acknowledged.
fn parts_sent(chunks: &[ChunkMeta], part_size: u64) -> Parts {
    let parts = crate::agent::upload::pieces(chunks.to_vec(), part_size);
    Parts {
        sent: parts
            .iter()
            .filter(|part| part.chunks.iter().all(|c| c.uploaded))
            .count() as u64,
        count: parts.len() as u64,
    }
}

/// The parts of every queued file larger than its bucket's part size.
fn multipart_progress(
    store: &Store,
    files: &[FileRecord],
    targets: &HashMap<String, TargetInfo>,
) -> Result<HashMap<i64, Parts>, Failure> {
    let mut parts = HashMap::new();
    for file in files.iter().filter(|f| f.state == FileState::Queued) {
        let Some(part_size) = targets.get(&file.target).and_then(|t| t.part_size) else {
            continue;
        };
        if file.size > part_size {
            let chunks = store.chunks(file.id).map_err(|e| store_failure(store, e))?;
            parts.insert(file.id, parts_sent(&chunks, part_size));
        }
    }
    Ok(parts)
}

/// `indexedcp status`: the buffer's files as a table, or as JSON.
pub(super) fn status(args: StatusArgs) -> Result<(), Failure> {
    let notice = store::read_notice(&args.buffer.path()?);
    let store = args.buffer.open()?;
    let files = store.list().map_err(|e| store_failure(&store, e))?;
    let config = if args.buffer.storage.is_some() {
        None
    } else {
        args.buffer.config()?
    };
    let targets = targets(config.as_ref());
    let parts = multipart_progress(&store, &files, &targets)?;
    if args.json {
        println!("{}", status_json(&files, &targets, &parts));
    } else {
        if let Some(notice) = &notice {
            println!("{}\n", escape_name(notice));
        }
        print!("{}", status_table(&files, &targets, &parts));
    }
    match notice {
        Some(notice) => Err(Failure {
            code: exit::BUFFER_CORRUPT,
            message: notice,
        }),
        None => Ok(()),
    }
}

/// A store error met while reading the buffer: damage gets the corrupt
/// message and exit code, anything else is an I/O failure.
fn store_failure(store: &Store, error: StoreError) -> Failure {
    if error.is_corrupt() {
        Failure {
            code: exit::BUFFER_CORRUPT,
            message: store::corrupt_message(store.path(), &error.to_string()),
        }
    } else {
        Failure::io(error.to_string())
    }
}

/// The JSON form: the file records, each with its target's kind when the
/// configuration tells it, and a large file's parts when it goes to a bucket.
fn status_json(
    files: &[FileRecord],
    targets: &HashMap<String, TargetInfo>,
    parts: &HashMap<i64, Parts>,
) -> String {
    let files: Vec<serde_json::Value> = files
        .iter()
        .map(|file| {
            let mut value = serde_json::to_value(file).expect("file records serialize");
            let object = value.as_object_mut().expect("a record is an object");
            if let Some(target) = targets.get(&file.target) {
                object.insert("target_kind".into(), target.kind.into());
            }
            if let Some(parts) = parts.get(&file.id) {
                object.insert("parts_sent".into(), parts.sent.into());
                object.insert("part_count".into(), parts.count.into());
            }
            value
        })
        .collect();
    serde_json::to_string_pretty(&files).expect("JSON values serialize")
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
            escape_name(&file.remote_name),
            file.size,
            file.state
        ))
    {
        return Err(Failure::usage("not purged (confirm with --yes)"));
    }
    abort_at_target(&args, &file);
    store
        .purge(args.id)
        .map_err(|e| Failure::io(e.to_string()))?;
    println!("purged {} ({})", escape_name(&file.remote_name), file.id);
    Ok(())
}

/// Releases what the file's target holds of an unfinished upload (an S3
/// multipart upload), when the configuration names the target. A failure
/// does not keep the file: the operator asked for it to go, and is told what
/// is left behind.
fn abort_at_target(args: &PurgeArgs, file: &FileRecord) {
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
            "warning: cannot abort the unfinished upload of {} at target {:?}: {error}; \
             the store keeps it until its lifecycle rule removes it",
            escape_name(&file.remote_name),
            file.target
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
/// of the oldest queued file, and the last error; then its kind and URL when
/// the configuration tells them.
fn target_summary(files: &[FileRecord], configured: &HashMap<String, TargetInfo>) -> String {
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
            let _ = write!(out, "; last error: {}", escape_name(e));
        }
        out.push('\n');
        if let Some(info) = configured.get(name) {
            let _ = writeln!(out, "  kind {}, {}", info.kind, info.url);
        }
    }
    out
}

/// The human-readable `status` listing.
fn status_table(
    files: &[FileRecord],
    targets: &HashMap<String, TargetInfo>,
    parts: &HashMap<i64, Parts>,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if files.is_empty() {
        out.push_str("the buffer is empty\n");
        return out;
    }
    out.push_str(&target_summary(files, targets));
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
            f.id,
            // A large file still being read into the buffer (its first
            // chunks may be on their way already).
            if f.is_buffering() {
                "buffering"
            } else {
                f.state.as_str()
            },
            f.size,
            f.chunks_uploaded,
            f.chunk_count,
            f.retries,
            next,
            escape_name(&f.remote_name)
        );
        if let Some(server_name) = &f.server_name {
            let _ = write!(out, " -> {}", escape_name(server_name));
        }
        out.push('\n');
        if let Some(parts) = parts.get(&f.id) {
            let _ = writeln!(
                out,
                "{:>7}multipart upload: {} of {} parts sent",
                "", parts.sent, parts.count
            );
        }
        if let Some(reason) = f.failure.as_ref().or(f
            .last_error
            .as_ref()
            .filter(|_| f.state != FileState::Confirmed))
        {
            let _ = writeln!(out, "{:>7}{}", "", escape_name(reason));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(idx: u64, length: u64, uploaded: bool) -> ChunkMeta {
        ChunkMeta {
            idx,
            offset: idx * 4,
            length,
            sha256: String::new(),
            crc32c: None,
            uploaded,
            retry_count: 0,
            ack: None,
        }
    }

    #[test]
    fn parts_are_runs_of_chunks_of_the_part_size_and_count_once_all_acknowledged() {
        // Chunks of 4 bytes, parts of at least 8: [0 1] [2 3] [4], the last
        // taking what is left.
        let chunks = [
            chunk(0, 4, true),
            chunk(1, 4, true),
            chunk(2, 4, true),
            chunk(3, 4, false),
            chunk(4, 1, true),
        ];
        assert_eq!(parts_sent(&chunks, 8), Parts { sent: 2, count: 3 });
        assert_eq!(parts_sent(&chunks[..4], 8), Parts { sent: 1, count: 2 });
        let none: Vec<ChunkMeta> = (0..6).map(|i| chunk(i, 4, false)).collect();
        assert_eq!(parts_sent(&none, 12), Parts { sent: 0, count: 2 });
    }
}
