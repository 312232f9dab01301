//! `indexedcp doctor`: checks the buffer a config (or `--storage`) names
//! and, when it is damaged, salvages it (the work is the store's
//! `doctor`); this module prints the report and picks the exit code.
//!
//! A damaged buffer (SQLite reports `SQLITE_CORRUPT` or `SQLITE_NOTADB`, in
//! the check the agent runs when it opens the buffer or in any later
//! statement) stops ingest, so new files stay in the spool untouched, and
//! says "buffer corrupt" with the file and what to do in the log, `indexedcp
//! status` (exit 65), the sd_notify STATUS line and the
//! `indexedcp_buffer_corrupt` gauge. The daemon then exits 65, or keeps
//! sending what it can read with `on_buffer_corrupt = "stop-ingest"`.
//!
//! Stop it and run `indexedcp doctor --config FILE`: it prints SQLite's
//! `integrity_check` findings, renames the damaged files to
//! `buffer.db.damaged-<unix time>` and `buffer-bulk.db.damaged-<unix time>`,
//! and copies every waiting file whose
//! chunks all read back and match their SHA-256 into a fresh `buffer.db`,
//! listing what it saved and what it lost. Exit 0, or 65 when a file was
//! lost, or 75 while a daemon has the buffer open.
//!
//! The start-up check (`PRAGMA quick_check`) reads the whole file: 1 GiB of
//! queued chunks took 0.26 s from the page cache and 1.8 s after evicting it
//! (a shared, noisy machine).

use std::fmt::Write;

use super::args::DoctorArgs;
use super::{Failure, exit};
use crate::agent::spool::escape_name;
use crate::agent::store::{self, DoctorReport, StoreError};

/// `indexedcp doctor [--config FILE | --storage PATH] [--json]`.
pub(super) fn doctor(args: DoctorArgs) -> Result<(), Failure> {
    let path = args.buffer.path()?;
    if !path.exists() {
        return Err(Failure::data(format!(
            "no buffer at {}: nothing to check; pass the daemon's --config or --storage",
            path.display()
        )));
    }
    let report = store::doctor(&path).map_err(|e| match e {
        StoreError::InUse { .. } => Failure {
            code: exit::TEMP_FAIL,
            message: format!("{e}; nothing was changed"),
        },
        e => Failure::io(format!("{e}; the buffer was left as it was")),
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("the report serializes")
        );
    } else {
        print!("{}", render(&report));
    }
    if report.lost.is_empty() {
        Ok(())
    } else {
        Err(Failure {
            code: exit::BUFFER_CORRUPT,
            message: format!(
                "{} waiting file(s) could not be saved; their sources were already disposed of, \
                 so send them again from where they came from",
                report.lost.len()
            ),
        })
    }
}

/// The human-readable report.
fn render(report: &DoctorReport) -> String {
    let mut out = String::new();
    let path = report.path.display();
    if report.healthy {
        let _ = writeln!(out, "{path}: integrity_check ok; nothing to do");
        return out;
    }
    let _ = writeln!(out, "{path}: damaged; integrity_check says:");
    for problem in &report.problems {
        let _ = writeln!(out, "  {}", escape_name(problem));
    }
    if let Some(aside) = &report.damaged_copy {
        let _ = writeln!(out, "the damaged file was set aside as {}", aside.display());
    }
    if let Some(aside) = &report.damaged_bulk_copy {
        let _ = writeln!(out, "its bulk file was set aside as {}", aside.display());
    }
    let _ = writeln!(
        out,
        "saved {} waiting file(s) into a fresh {path} ({} confirmed record(s) kept as history):",
        report.saved.len(),
        report.confirmed_kept
    );
    for file in &report.saved {
        let _ = writeln!(
            out,
            "  saved {:>5}  {:<9} {:>12} bytes  {}",
            file.id,
            file.state,
            file.size,
            escape_name(&file.name)
        );
    }
    let _ = writeln!(out, "lost {} waiting file(s):", report.lost.len());
    for file in &report.lost {
        let name = file
            .name
            .as_deref()
            .map_or_else(|| "(name unreadable)".into(), escape_name);
        let _ = writeln!(out, "  lost  {:>5}  {name}: {}", file.id, file.reason);
    }
    if report.saved.is_empty() && report.lost.is_empty() {
        let _ = writeln!(
            out,
            "no file record could be read: files the buffer held, if any, are unknown"
        );
    }
    let _ = writeln!(
        out,
        "start the daemon again: it sends the saved files and ingests what waits in the spool"
    );
    out
}
