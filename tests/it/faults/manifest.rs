//! The manifest check every scenario ends with: the SHA-256 of every source file
//! against every file in the receiver's output tree, counted as lost,
//! duplicated (a second copy under a suffixed name such as `name_<millis>.ext`,
//! or the bytes written twice), corrupted (a copy whose bytes differ) and
//! unexpected (a file that maps to no source), plus `PRAGMA integrity_check` on
//! the agent's and the receiver's SQLite files. The receiver's own `.indexedcp`
//! directory is not part of the output.
//!
//! [`PartialWatch`] polls an output directory while a scenario runs and records
//! every file that is visible under a final name without being a complete,
//! byte-identical copy of its source.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::fixtures::sha256_hex;

/// What a source file was: its size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub size: u64,
    pub sha256: String,
}

/// The expected content of the output: relative path -> source.
#[derive(Debug, Clone, Default)]
pub struct Manifest {
    sources: BTreeMap<String, Source>,
    /// Output paths that are not the receiver's doing (a filler file, say).
    ignored: Vec<String>,
}

/// What an output file is, relative to the manifest.
#[derive(Debug, PartialEq, Eq)]
enum Copy {
    /// A byte-identical copy of this source.
    Exact(String),
    /// The source's bytes twice in a row.
    Doubled(String),
    /// Under a name of this source (or its suffixed variant), other bytes.
    Corrupt(String),
    /// No source has this name.
    Unexpected,
}

impl Manifest {
    pub fn from_files(files: &BTreeMap<String, Vec<u8>>) -> Manifest {
        Manifest {
            sources: files
                .iter()
                .map(|(name, data)| {
                    (
                        name.clone(),
                        Source {
                            size: data.len() as u64,
                            sha256: sha256_hex(data),
                        },
                    )
                })
                .collect(),
            ignored: Vec::new(),
        }
    }

    /// The same manifest, not counting `rel` in the output.
    pub fn ignoring(mut self, rel: &str) -> Manifest {
        self.ignored.push(rel.to_owned());
        self
    }

    fn outputs(&self, output: &Path) -> BTreeMap<String, PathBuf> {
        let mut files = output_files(output);
        files.retain(|rel, _| !self.ignored.contains(rel));
        files
    }

    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// The source an output path belongs to: the same path, or the same path
    /// with the receiver's unique suffix (`stem_<millis>[_<n>].ext`).
    fn source_of(&self, rel: &str) -> Option<&str> {
        let name = source_name(rel, |n| self.sources.contains_key(n))?;
        self.sources.get_key_value(&name).map(|(k, _)| k.as_str())
    }

    fn classify(&self, rel: &str, data: &[u8]) -> Copy {
        let Some(name) = self.source_of(rel) else {
            return Copy::Unexpected;
        };
        let source = &self.sources[name];
        let len = data.len() as u64;
        if len == source.size && sha256_hex(data) == source.sha256 {
            return Copy::Exact(name.to_owned());
        }
        if source.size > 0 && len == 2 * source.size {
            let (a, b) = data.split_at(source.size as usize);
            if sha256_hex(a) == source.sha256 && sha256_hex(b) == source.sha256 {
                return Copy::Doubled(name.to_owned());
            }
        }
        Copy::Corrupt(name.to_owned())
    }

    /// Sources with no byte-identical copy in `output` yet (cheap enough to poll:
    /// only files of the right size are hashed).
    pub fn missing(&self, output: &Path) -> Vec<String> {
        let present = self.outputs(output);
        let mut found: HashMap<&str, bool> = HashMap::new();
        for rel in present.keys() {
            if let Some(name) = self.source_of(rel) {
                let entry = found.entry(name).or_default();
                if *entry {
                    continue;
                }
                let source = &self.sources[name];
                let path = output.join(rel);
                if std::fs::metadata(&path).is_ok_and(|m| m.len() == source.size)
                    && std::fs::read(&path).is_ok_and(|d| sha256_hex(&d) == source.sha256)
                {
                    *entry = true;
                }
            }
        }
        self.sources
            .keys()
            .filter(|name| !found.get(name.as_str()).copied().unwrap_or(false))
            .cloned()
            .collect()
    }

    /// Compares `output` with the manifest, and checks the given SQLite files.
    pub fn check(&self, output: &Path, databases: &[&Path]) -> Report {
        let mut report = Report {
            sources: self.sources.len(),
            ..Report::default()
        };
        let mut copies: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (rel, path) in self.outputs(output) {
            let data = match std::fs::read(&path) {
                Ok(data) => data,
                Err(e) => {
                    report.unexpected.push(format!("{rel} (unreadable: {e})"));
                    continue;
                }
            };
            match self.classify(&rel, &data) {
                Copy::Exact(name) => {
                    let name = self.sources.get_key_value(&name).unwrap().0.as_str();
                    copies.entry(name).or_default().push(rel);
                }
                Copy::Doubled(name) => report
                    .duplicated
                    .push(format!("{rel}: the bytes of {name} twice")),
                Copy::Corrupt(name) => report.corrupted.push(format!(
                    "{rel}: {} bytes, SHA-256 {}, but {name} has {} bytes, SHA-256 {}",
                    data.len(),
                    sha256_hex(&data),
                    self.sources[&name].size,
                    self.sources[&name].sha256
                )),
                Copy::Unexpected => report
                    .unexpected
                    .push(format!("{rel} ({} bytes)", data.len())),
            }
        }
        for name in self.sources.keys() {
            match copies.get(name.as_str()) {
                None => report.lost.push(name.clone()),
                Some(list) => {
                    report.delivered += 1;
                    if list.len() > 1 {
                        report
                            .duplicated
                            .push(format!("{name}: {} copies {list:?}", list.len()));
                    }
                }
            }
        }
        for db in databases {
            let result = integrity_check(db);
            if result.as_deref() != Ok("ok") {
                report.integrity.push(format!(
                    "{}: {}",
                    db.display(),
                    result.unwrap_or_else(|e| e)
                ));
            }
        }
        report
    }
}

/// The source name an output path `rel` stands for, given which names are
/// sources: `rel` itself, or `rel` without the receiver's unique suffix
/// (`stem_<millis>.ext` or `stem_<millis>_<n>.ext`).
pub fn source_name(rel: &str, is_source: impl Fn(&str) -> bool) -> Option<String> {
    if is_source(rel) {
        return Some(rel.to_owned());
    }
    let (dir, file) = match rel.rfind('/') {
        Some(slash) => (&rel[..=slash], &rel[slash + 1..]),
        None => ("", rel),
    };
    let (mut stem, ext) = split_extension(file);
    for _ in 0..2 {
        let underscore = stem.rfind('_')?;
        let digits = &stem[underscore + 1..];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        stem = &stem[..underscore];
        let candidate = format!("{dir}{stem}{ext}");
        if is_source(&candidate) {
            return Some(candidate);
        }
    }
    None
}

/// Splits `name.ext` as the receiver does: a leading dot is no extension, and an
/// "extension" of more than 32 bytes is part of the stem.
fn split_extension(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(dot) if dot > 0 && name.len() - dot <= 32 => name.split_at(dot),
        _ => (name, ""),
    }
}

/// Every regular file (or symlink, which is never expected) below `output`
/// except the receiver's `.indexedcp` directory: relative path -> full path.
pub fn output_files(output: &Path) -> BTreeMap<String, PathBuf> {
    crate::support::walk(output)
        .into_iter()
        .filter(|entry| !entry.kind.is_dir() && !crate::support::is_receiver_state(&entry.rel))
        .map(|entry| (entry.rel, entry.path))
        .collect()
}

/// `PRAGMA integrity_check` on a SQLite file opened read-only: `Ok("ok")` when
/// sound, else the first problem (or why it could not be checked).
pub fn integrity_check(db: &Path) -> Result<String, String> {
    if !db.exists() {
        return Err("missing".into());
    }
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("cannot open read-only: {e}"))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    conn.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
        .map_err(|e| format!("integrity_check failed: {e}"))
}

/// The outcome of [`Manifest::check`].
#[derive(Debug, Default)]
pub struct Report {
    pub sources: usize,
    /// Sources with at least one byte-identical copy.
    pub delivered: usize,
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
    pub corrupted: Vec<String>,
    pub unexpected: Vec<String>,
    /// Databases whose integrity check did not answer "ok".
    pub integrity: Vec<String>,
}

impl Report {
    /// "lost 0, duplicated 0, corrupted 0" (plus unexpected files and integrity
    /// problems when there are any).
    pub fn figure(&self) -> String {
        let mut s = format!(
            "lost {}, duplicated {}, corrupted {}",
            self.lost.len(),
            self.duplicated.len(),
            self.corrupted.len()
        );
        if !self.unexpected.is_empty() {
            let _ = write!(s, ", unexpected {}", self.unexpected.len());
        }
        if self.integrity.is_empty() {
            s.push_str(", integrity ok");
        } else {
            let _ = write!(s, ", integrity problems {}", self.integrity.len());
        }
        s
    }

    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.corrupted.is_empty()
            && self.unexpected.is_empty()
            && self.integrity.is_empty()
    }

    /// Panics with a readable report unless everything arrived exactly once,
    /// byte-identical, nothing else appeared and both databases are sound.
    #[track_caller]
    pub fn assert_clean(&self, context: &str) {
        if self.is_clean() {
            return;
        }
        let mut text = format!(
            "{context}: {} of {} sources delivered; {}\n",
            self.delivered,
            self.sources,
            self.figure()
        );
        for (what, list) in [
            ("lost", &self.lost),
            ("duplicated", &self.duplicated),
            ("corrupted", &self.corrupted),
            ("unexpected", &self.unexpected),
            ("integrity", &self.integrity),
        ] {
            if list.is_empty() {
                continue;
            }
            let _ = writeln!(text, "  {what} ({}):", list.len());
            for item in list.iter().take(20) {
                let _ = writeln!(text, "    {item}");
            }
            if list.len() > 20 {
                let _ = writeln!(text, "    ... and {} more", list.len() - 20);
            }
        }
        panic!("{text}");
    }
}

/// Polls an output directory on a thread and records every file visible under a
/// final name that is not a complete, byte-identical copy of a source. Files are
/// looked at once per identity (inode, size, mtime), so polling stays cheap.
pub struct PartialWatch {
    stop: Arc<AtomicBool>,
    polls: Arc<AtomicU64>,
    violations: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PartialWatch {
    pub fn start(output: &Path, manifest: &Manifest) -> PartialWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(AtomicU64::new(0));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let (output, manifest) = (output.to_owned(), manifest.clone());
        let (s, p, v) = (stop.clone(), polls.clone(), violations.clone());
        let thread = std::thread::spawn(move || {
            let mut seen: HashMap<String, (u64, u64, i64, i64)> = HashMap::new();
            while !s.load(Ordering::Relaxed) {
                for (rel, path) in manifest.outputs(&output) {
                    let Ok(meta) = std::fs::symlink_metadata(&path) else {
                        continue;
                    };
                    let identity = (meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec());
                    if seen.get(&rel) == Some(&identity) {
                        continue;
                    }
                    seen.insert(rel.clone(), identity);
                    if !meta.is_file() {
                        v.lock().unwrap().push(format!("{rel}: not a regular file"));
                        continue;
                    }
                    // Read through one handle and check that the file did not
                    // change meanwhile (it never should under a final name).
                    let Ok(data) = std::fs::read(&path) else {
                        continue;
                    };
                    match manifest.classify(&rel, &data) {
                        Copy::Exact(_) => {}
                        other => v.lock().unwrap().push(format!(
                            "{rel}: {} bytes visible, {other:?} (SHA-256 {})",
                            data.len(),
                            hex::encode(Sha256::digest(&data))
                        )),
                    }
                }
                p.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        PartialWatch {
            stop,
            polls,
            violations,
            thread: Some(thread),
        }
    }

    /// Stops polling; returns the number of polls and the violations seen.
    pub fn stop(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.polls.load(Ordering::Relaxed),
            self.violations.lock().unwrap().clone(),
        )
    }
}

impl Drop for PartialWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_counts_lost_duplicated_corrupted_and_unexpected_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let mut files = BTreeMap::new();
        for (name, data) in [
            ("a.txt", &b"alpha"[..]),
            ("sub/b.bin", b"bravo"),
            ("c", b"charlie"),
            ("d.log", b"delta"),
            ("e", b""),
        ] {
            files.insert(name.to_string(), data.to_vec());
        }
        let manifest = Manifest::from_files(&files);
        std::fs::create_dir_all(out.join("sub")).unwrap();
        std::fs::create_dir_all(out.join(".indexedcp/staging")).unwrap();
        std::fs::write(out.join(".indexedcp/staging/x"), b"ignored").unwrap();
        std::fs::write(out.join("a.txt"), b"alpha").unwrap();
        std::fs::write(out.join("a_1700000000000.txt"), b"alpha").unwrap();
        std::fs::write(out.join("sub/b.bin"), b"bravobravo").unwrap();
        std::fs::write(out.join("sub/b_1700000000000_2.bin"), b"bravo").unwrap();
        std::fs::write(out.join("c"), b"charlie").unwrap();
        std::fs::write(out.join("d.log"), b"delta!").unwrap();
        std::fs::write(out.join("zulu"), b"?").unwrap();
        let report = manifest.check(out, &[]);
        // A source whose only copy is corrupt counts as lost too.
        assert_eq!(report.lost, ["d.log", "e"]);
        assert_eq!(report.duplicated.len(), 2, "{report:?}");
        assert_eq!(report.corrupted.len(), 1, "{report:?}");
        assert_eq!(report.unexpected.len(), 1, "{report:?}");
        assert_eq!(report.delivered, 3);
        assert_eq!(
            report.figure(),
            "lost 2, duplicated 2, corrupted 1, unexpected 1, integrity ok"
        );
        assert_eq!(manifest.missing(out), ["d.log", "e"]);
        let missing_db = out.join("none.db");
        assert_eq!(
            manifest.check(out, &[&missing_db]).integrity,
            [format!("{}: missing", missing_db.display())]
        );
    }
}
