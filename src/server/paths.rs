//! Path modes and the file-system operations that keep every write inside the
//! output directory.
//!
//! A client's `X-File-Name` is turned into a [`Destination`] (a list of plain path
//! components) by the configured [`PathMode`]; nothing here ever joins an
//! untrusted string onto a path. Files are then created with `openat` relative to
//! a directory descriptor of the output directory, walking one component at a time
//! with `O_NOFOLLOW`, so a symlink planted inside the output directory cannot lead
//! a write outside it, and no final name is ever overwritten.
//!
//! The output and staging directories are held open from the start, so a file
//! system mounted over one of them later (a data disk or a share that mounts
//! late), or a directory deleted and made again, would leave the receiver
//! writing where nobody looks. Every write and rename through a held directory
//! therefore first checks that its path still names it (device and inode): if
//! the path names another directory, that one is opened and used, and the log
//! says so; if it names nothing, or the two are on different file systems
//! now, the request is refused with 503 and the log names the directory.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};

use crate::config::PathMode;

/// Longest accepted component, the common file-system limit.
pub(super) const MAX_COMPONENT_BYTES: usize = 255;
/// Longest accepted `X-File-Name` in allow-paths mode.
pub(super) const MAX_PATH_BYTES: usize = 4096;

/// Why a client's file name was refused; the text goes into the 400 reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(super) struct InvalidName(pub String);

fn invalid(msg: impl Into<String>) -> InvalidName {
    InvalidName(msg.into())
}

/// Where a file goes, relative to the output directory: zero or more directories,
/// then the file name. Every component is non-empty, not `.`/`..`, free of `/`,
/// NUL and control characters, and at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Destination {
    pub(super) dirs: Vec<String>,
    pub(super) name: String,
}

impl Destination {
    /// The path relative to the output directory, as reported in `actualFilename`.
    pub(super) fn display(&self) -> String {
        let mut out = String::new();
        for dir in &self.dirs {
            out.push_str(dir);
            out.push('/');
        }
        out.push_str(&self.name);
        out
    }

    /// The destination a recorded final name ([`Destination::display`]) stands for.
    pub(super) fn from_display(display: &str) -> Destination {
        let mut parts: Vec<String> = display.split('/').map(str::to_owned).collect();
        let name = parts.pop().unwrap_or_default();
        Destination { dirs: parts, name }
    }

    /// The same directories with another file name (for unique suffixes).
    pub(super) fn with_name(&self, name: String) -> Destination {
        Destination {
            dirs: self.dirs.clone(),
            name,
        }
    }
}

/// Turns a client file name into a destination by `mode`. `reserved` is the first
/// component of the receiver's own state directory when it lies inside the output
/// directory (by default `.indexedcp`); no client may write below it.
pub(super) fn destination_for(
    mode: PathMode,
    client_name: &str,
    reserved: Option<&str>,
) -> Result<Destination, InvalidName> {
    match mode {
        PathMode::Sanitize => sanitize(client_name, reserved),
        PathMode::Ignore => Ok(Destination {
            dirs: Vec::new(),
            name: ignore_mode_name(client_name, now_millis(), &random_hex(4)),
        }),
        PathMode::AllowPaths => allow_paths(client_name, reserved),
    }
}

fn strip_dot_prefix(name: &str) -> &str {
    name.strip_prefix("./")
        .or_else(|| name.strip_prefix(".\\"))
        .unwrap_or(name)
}

fn has_drive_letter(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':'
}

fn check_component(
    component: &str,
    reserved: Option<&str>,
    first: bool,
) -> Result<(), InvalidName> {
    if component.is_empty() || component == "." || component == ".." {
        return Err(invalid(
            "Filename must not be empty or contain '.' or '..' components",
        ));
    }
    if component.len() > MAX_COMPONENT_BYTES {
        return Err(invalid(format!(
            "Filename components must be at most {MAX_COMPONENT_BYTES} bytes"
        )));
    }
    if component.chars().any(char::is_control) {
        return Err(invalid(
            "Filename must not contain NUL or control characters",
        ));
    }
    if first && reserved == Some(component) {
        return Err(invalid(format!(
            "Filename must not point into the receiver's state directory '{component}'"
        )));
    }
    Ok(())
}

fn sanitize(client_name: &str, reserved: Option<&str>) -> Result<Destination, InvalidName> {
    let cleaned = strip_dot_prefix(client_name);
    if cleaned.contains('/')
        || cleaned.contains('\\')
        || client_name.contains("..")
        || client_name.starts_with('/')
        || has_drive_letter(client_name)
        || has_drive_letter(cleaned)
    {
        return Err(invalid(
            "Filename must not contain path separators or traversal sequences",
        ));
    }
    // The state directory is a directory of that name, so in sanitize mode a file of
    // the same name simply gets a unique suffix; only allow-paths could enter it.
    let _ = reserved;
    check_component(cleaned, None, false)?;
    Ok(Destination {
        dirs: Vec::new(),
        name: cleaned.to_owned(),
    })
}

fn allow_paths(client_name: &str, reserved: Option<&str>) -> Result<Destination, InvalidName> {
    if client_name.len() > MAX_PATH_BYTES {
        return Err(invalid(format!(
            "Filename must be at most {MAX_PATH_BYTES} bytes"
        )));
    }
    let cleaned = strip_dot_prefix(client_name);
    if cleaned.starts_with('/') || cleaned.starts_with('\\') || has_drive_letter(cleaned) {
        return Err(invalid(
            "Filename must not contain traversal sequences or absolute paths",
        ));
    }
    // Backslashes separate directories, as in the original server; empty and `.`
    // components (`a//b`, `a/./b`) collapse, `..` anywhere is refused.
    let mut parts: Vec<&str> = cleaned
        .split(['/', '\\'])
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    // A drive letter may also come first only once `.` components collapse
    // (`.\./C:/x`).
    if parts.contains(&"..") || parts.first().is_some_and(|first| has_drive_letter(first)) {
        return Err(invalid(
            "Filename must not contain traversal sequences or absolute paths",
        ));
    }
    let Some(name) = parts.pop() else {
        return Err(invalid("Filename must name a file"));
    };
    for (i, dir) in parts.iter().enumerate() {
        check_component(dir, reserved, i == 0)?;
    }
    check_component(name, reserved, parts.is_empty())?;
    Ok(Destination {
        dirs: parts.into_iter().map(str::to_owned).collect(),
        name: name.to_owned(),
    })
}

/// The original's ignore-mode name: `<millis>_<random>_<path with separators as _>`,
/// every character outside `[A-Za-z0-9._-]` replaced by `-`, cut to 255 bytes.
pub(super) fn ignore_mode_name(client_name: &str, millis: u128, random: &str) -> String {
    let cleaned = strip_dot_prefix(client_name);
    let mut flat = String::with_capacity(cleaned.len());
    let mut last_sep = false;
    for c in cleaned.chars() {
        if c == '/' || c == '\\' {
            if !last_sep {
                flat.push('_');
            }
            last_sep = true;
        } else {
            last_sep = false;
            flat.push(
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                },
            );
        }
    }
    let (stem, ext) = split_extension(&flat);
    let prefix = format!("{millis}_{random}_");
    // Everything is ASCII now, so byte and char lengths agree.
    let room = MAX_COMPONENT_BYTES.saturating_sub(prefix.len() + ext.len());
    let stem = &stem[..stem.len().min(room)];
    format!("{prefix}{stem}{ext}")
}

/// Splits `name.ext` like Node's `path.extname`: a leading dot is not an extension,
/// and an implausibly long "extension" is treated as part of the stem.
fn split_extension(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(dot) if dot > 0 && name.len() - dot <= 32 => name.split_at(dot),
        _ => (name, ""),
    }
}

/// The n-th alternative name for `name` when it is taken: `base_<millis>.ext`, then
/// `base_<millis>_<n>.ext`, always within 255 bytes.
pub(super) fn unique_candidate(name: &str, millis: u128, attempt: u32) -> String {
    if attempt == 0 {
        return name.to_owned();
    }
    let (stem, ext) = split_extension(name);
    let suffix = if attempt == 1 {
        format!("_{millis}")
    } else {
        format!("_{millis}_{attempt}")
    };
    let room = MAX_COMPONENT_BYTES.saturating_sub(suffix.len() + ext.len());
    let mut cut = stem.len().min(room);
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}{ext}", &stem[..cut])
}

pub(super) fn now_millis() -> u128 {
    crate::clock::since_epoch().as_millis()
}

/// `n` random bytes as lowercase hex.
pub(super) fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).expect("the operating system's random source failed");
    hex::encode(buf)
}

/// Why a destination could not be opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    /// A path component exists but is not a real directory (a file or a symlink).
    #[error("'{0}' exists in the output directory and is not a directory")]
    NotADirectory(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Opens the output (or staging) directory itself (following a symlink is the
/// operator's choice), and remembers the path it was opened by, so that later
/// writes through it can check that the path still names it ([`current`]).
pub(super) fn open_root(dir: &Path) -> io::Result<OwnedFd> {
    let fd = open_dir(dir)?;
    let path = std::path::absolute(dir)?;
    let held = Held {
        fd: fd.as_raw_fd(),
        opened: identity(&fd)?,
        path,
        reported: None,
    };
    let mut all = HELD.lock().unwrap_or_else(|e| e.into_inner());
    // A number used before belonged to a descriptor closed since.
    all.retain(|h| h.fd != held.fd);
    all.push(held);
    Ok(fd)
}

fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        dir,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// A directory opened by [`open_root`]: its descriptor number, its device and
/// inode then, the absolute path it was opened by, and the last change of
/// that path already logged (so that a change is logged once).
struct Held {
    fd: RawFd,
    opened: (u64, u64),
    path: PathBuf,
    reported: Option<Reported>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reported {
    /// The path names the directory of this device and inode instead.
    Replaced((u64, u64)),
    /// The path names nothing (or cannot be examined).
    Missing,
}

/// The directories the receivers of this process hold open. A process-wide
/// list, because the descriptors live in the receiver's state, which knows
/// nothing of paths; it holds two entries per receiver opened (one more pair
/// after each reload that opens a new receiver).
static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

fn identity(fd: impl AsFd) -> io::Result<(u64, u64)> {
    let st = rustix::fs::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// Why a held directory cannot be written through; a request that meets it
/// is refused with 503 (see `errors`), since waiting for the operator (to
/// mount the file system, or restart the receiver) loses nothing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct DirUnavailable(pub(super) String);

fn unavailable(message: String) -> io::Error {
    io::Error::other(DirUnavailable(message))
}

/// The directory a held descriptor stands for now: the held one while its
/// path still names it, else the one the path names now.
pub(super) enum CurrentDir<'a> {
    Held(&'a OwnedFd),
    Reopened(OwnedFd),
}

impl AsFd for CurrentDir<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            CurrentDir::Held(fd) => fd.as_fd(),
            CurrentDir::Reopened(fd) => fd.as_fd(),
        }
    }
}

/// Checks that the path `held` was opened by still names it, and returns the
/// directory to write through: `held` itself, or the directory now at that
/// path (logged once per change). A path that names nothing gives a
/// [`DirUnavailable`] error naming it. A descriptor not opened by
/// [`open_root`] (a sub-directory) is returned as it is.
pub(super) fn current(held: &OwnedFd) -> io::Result<CurrentDir<'_>> {
    let opened = identity(held)?;
    let Some(path) = held_path(held).filter(|_| is_registered(held, opened)) else {
        return Ok(CurrentDir::Held(held));
    };
    // The lock is not held across these calls: a stat on a hung network
    // file system must not hold up the requests for other directories.
    let now = rustix::fs::stat(&path).map(|st| (st.st_dev, st.st_ino));
    let found = match now {
        Ok(now) if now == opened => None,
        Ok(now) => Some(open_dir(&path).and_then(|fd| Ok((identity(&fd)? == now, fd)))),
        Err(e) => Some(Err(io::Error::from(e))),
    };
    let (result, reported) = match found {
        None => (Ok(CurrentDir::Held(held)), None),
        Some(Ok((true, fd))) => {
            let now = identity(&fd)?;
            (Ok(CurrentDir::Reopened(fd)), Some(Reported::Replaced(now)))
        }
        // Replaced again between the look and the open: the next request
        // looks again.
        Some(Ok((false, _))) => {
            return Err(unavailable(format!(
                "the receiver's directory {} is changing (mounted or replaced right now); nothing was written, retry later",
                path.display()
            )));
        }
        Some(Err(e)) => {
            let message = format!(
                "the receiver's directory {} is gone ({e}); nothing was written: its operator must create it or mount its file system, retry later",
                path.display()
            );
            (Err(unavailable(message)), Some(Reported::Missing))
        }
    };
    report_change(held, opened, &path, reported);
    result
}

/// Whether `held` is the very descriptor [`open_root`] registered.
fn is_registered(held: &OwnedFd, opened: (u64, u64)) -> bool {
    let all = HELD.lock().unwrap_or_else(|e| e.into_inner());
    all.iter()
        .any(|h| h.fd == held.as_raw_fd() && h.opened == opened)
}

/// Logs a change of what a held directory's path names, once per change.
fn report_change(held: &OwnedFd, opened: (u64, u64), path: &Path, now: Option<Reported>) {
    let mut all = HELD.lock().unwrap_or_else(|e| e.into_inner());
    let Some(entry) = all
        .iter_mut()
        .find(|h| h.fd == held.as_raw_fd() && h.opened == opened)
    else {
        return;
    };
    if entry.reported == now {
        return;
    }
    entry.reported = now;
    match now {
        None => {
            tracing::info!(directory = %path.display(), "the directory is the one the receiver opened again");
        }
        Some(Reported::Replaced(_)) => tracing::warn!(
            directory = %path.display(),
            "the directory's path now names another directory than the one the receiver opened (a file system was mounted over it, or it was deleted and made again); writing to the one the path names"
        ),
        Some(Reported::Missing) => tracing::error!(
            directory = %path.display(),
            "the receiver's directory is gone: uploads are refused with 503 until it is back; create it or mount its file system, or restart the receiver if it held the receiver's state"
        ),
    }
}

/// The path `fd` was opened by, when [`open_root`] opened it.
fn held_path(fd: &OwnedFd) -> Option<PathBuf> {
    let all = HELD.lock().unwrap_or_else(|e| e.into_inner());
    all.iter()
        .find(|h| h.fd == fd.as_raw_fd())
        .map(|h| h.path.clone())
}

/// Opens (creating as needed) the directories of `dest` below `root`, never
/// following a symlink.
pub(super) fn open_parent(root: &OwnedFd, dest: &Destination) -> Result<OwnedFd, OpenError> {
    let root = current(root)?;
    let mut current = rustix::fs::openat(
        &root,
        ".",
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)?;
    for dir in &dest.dirs {
        match rustix::fs::mkdirat(&current, dir.as_str(), Mode::from_raw_mode(0o755)) {
            // A new directory's entry is made durable with it, so that a file
            // reported complete below it survives a power cut.
            Ok(()) => rustix::fs::fsync(&current).map_err(io::Error::from)?,
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io::Error::from(e).into()),
        }
        current = match rustix::fs::openat(
            &current,
            dir.as_str(),
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => {
                return Err(OpenError::NotADirectory(dir.clone()));
            }
            Err(e) => return Err(io::Error::from(e).into()),
        };
    }
    Ok(current)
}

/// Creates `name` in `dir` only if nothing of that name exists (a symlink counts).
pub(super) fn create_new(dir: &OwnedFd, name: &str) -> io::Result<File> {
    let dir = current(dir)?;
    let fd = rustix::fs::openat(
        &dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )?;
    Ok(File::from(fd))
}

/// Opens an existing regular file for writing, refusing a symlink.
pub(super) fn open_existing(dir: &OwnedFd, name: &str) -> io::Result<File> {
    let dir = current(dir)?;
    let fd = rustix::fs::openat(
        &dir,
        name,
        OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{name}' is not a regular file"),
        ));
    }
    Ok(file)
}

/// Renames `from` (in `from_dir`) to `to` (in `to_dir`) unless `to` exists.
/// Returns `Ok(false)` when the name is taken. Both directories are checked
/// first ([`current`]); two directories now on different file systems (one
/// of them mounted over since the start) give a [`DirUnavailable`] error.
pub(super) fn rename_no_replace(
    from_dir: &OwnedFd,
    from: &str,
    to_dir: &OwnedFd,
    to: &str,
) -> io::Result<bool> {
    let (held_from, held_to) = (from_dir, to_dir);
    let (from_dir, to_dir) = (current(held_from)?, current(held_to)?);
    match rustix::fs::renameat_with(&from_dir, from, &to_dir, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::EXIST) => Ok(false),
        Err(rustix::io::Errno::XDEV) => {
            let name =
                |fd| held_path(fd).map_or_else(|| "?".to_owned(), |p| p.display().to_string());
            let message = format!(
                "the staging directory {} and the output directory are on different file systems now (a file system was mounted over one of them after the receiver started); nothing was written: restart the receiver so that it opens its directories again, retry later",
                name(held_from)
            );
            tracing::error!(staging = %name(held_from), "cannot rename a finished upload into the output directory: {message}");
            Err(unavailable(message))
        }
        // File systems without RENAME_NOREPLACE: link (which never replaces), then
        // unlink the staging name.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            match rustix::fs::linkat(&from_dir, from, &to_dir, to, AtFlags::empty()) {
                Ok(()) => {
                    rustix::fs::unlinkat(&from_dir, from, AtFlags::empty())?;
                    Ok(true)
                }
                Err(rustix::io::Errno::EXIST) => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether `name` exists in `dir` (without following a symlink).
pub(super) fn exists_in(dir: &OwnedFd, name: &str) -> io::Result<bool> {
    let dir = current(dir)?;
    match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Ok(true),
        Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether `a` in `a_dir` and `b` in `b_dir` are the same file (one inode
/// under two names); `false` when either is missing.
pub(super) fn same_file(a_dir: &OwnedFd, a: &str, b_dir: &OwnedFd, b: &str) -> io::Result<bool> {
    let stat = |dir: &OwnedFd, name: &str| match rustix::fs::statat(
        current(dir)?,
        name,
        AtFlags::SYMLINK_NOFOLLOW,
    ) {
        Ok(st) => Ok(Some((st.st_dev, st.st_ino))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(io::Error::from(e)),
    };
    Ok(match (stat(a_dir, a)?, stat(b_dir, b)?) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    })
}

/// Syncs `dir`, or the directory its path names now when that changed (so
/// that a rename made there is durable). A path that names nothing falls back
/// to the held directory: a sync must not fail a rename that happened.
pub(super) fn fsync_dir(dir: &OwnedFd) -> io::Result<()> {
    match current(dir) {
        Ok(now) => rustix::fs::fsync(&now)?,
        Err(_) => rustix::fs::fsync(dir)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(mode: PathMode, name: &str) -> Result<String, InvalidName> {
        destination_for(mode, name, Some(".indexedcp")).map(|d| d.display())
    }

    #[test]
    fn sanitize_keeps_plain_names_and_refuses_paths() {
        assert_eq!(dest(PathMode::Sanitize, "a b é.txt").unwrap(), "a b é.txt");
        assert_eq!(dest(PathMode::Sanitize, "./x.bin").unwrap(), "x.bin");
        for bad in [
            "a/b",
            "a\\b",
            "../x",
            "..",
            ".",
            "",
            "/etc/passwd",
            "C:x",
            "c:\\x",
            "\\\\srv\\s",
            "a\0b",
            "a\nb",
            "x..y",
        ] {
            assert!(dest(PathMode::Sanitize, bad).is_err(), "{bad:?} accepted");
        }
        assert!(dest(PathMode::Sanitize, &"a".repeat(256)).is_err());
        assert!(dest(PathMode::Sanitize, &"a".repeat(255)).is_ok());
    }

    #[test]
    fn allow_paths_keeps_sub_directories_inside() {
        assert_eq!(
            dest(PathMode::AllowPaths, "a/b/c.txt").unwrap(),
            "a/b/c.txt"
        );
        assert_eq!(dest(PathMode::AllowPaths, "a\\b//./c").unwrap(), "a/b/c");
        assert_eq!(dest(PathMode::AllowPaths, "./d/e").unwrap(), "d/e");
        for bad in [
            "../x",
            "a/../../x",
            "a/..",
            "/abs",
            "\\abs",
            "C:/x",
            "\\\\unc\\share",
            "",
            "/",
            "a/\u{1}/b",
            ".indexedcp/uploads.db",
            "./.indexedcp/staging/x",
        ] {
            assert!(dest(PathMode::AllowPaths, bad).is_err(), "{bad:?} accepted");
        }
        assert!(dest(PathMode::AllowPaths, "sub/.indexedcp").is_ok());
    }

    // Found by the path_modes fuzz target: a drive letter behind `.`
    // components that collapse, or behind the `./` that is stripped.
    #[test]
    fn a_drive_letter_behind_dot_components_is_refused() {
        for name in [".\\./C://", "./C:/x", "././C:x", ".//C:"] {
            assert!(dest(PathMode::AllowPaths, name).is_err(), "{name:?}");
        }
        assert!(dest(PathMode::Sanitize, "./C:x").is_err());
        assert_eq!(dest(PathMode::AllowPaths, "./a/C:x").unwrap(), "a/C:x");
    }

    #[test]
    fn ignore_mode_matches_the_original_format() {
        let name = ignore_mode_name("./dir/sub\\my file (1).tar.gz", 1700000000000, "deadbeef");
        assert_eq!(name, "1700000000000_deadbeef_dir_sub_my-file--1-.tar.gz");
        let long = ignore_mode_name(&"x".repeat(1000), 1, "00000000");
        assert_eq!(long.len(), 255);
        let hostile = ignore_mode_name("../../etc/\0passwd\n", 1, "00");
        assert!(!hostile.contains('/') && !hostile.chars().any(char::is_control));
    }

    #[test]
    fn unique_candidates_keep_the_extension() {
        assert_eq!(unique_candidate("a.txt", 5, 0), "a.txt");
        assert_eq!(unique_candidate("a.txt", 5, 1), "a_5.txt");
        assert_eq!(unique_candidate("a.txt", 5, 2), "a_5_2.txt");
        assert_eq!(unique_candidate(".bashrc", 5, 1), ".bashrc_5");
        let long = format!("{}.txt", "é".repeat(125));
        assert!(unique_candidate(&long, 5, 3).len() <= 255);
    }

    #[test]
    fn a_held_directory_is_checked_against_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let held = open_root(&out).unwrap();
        assert!(matches!(current(&held).unwrap(), CurrentDir::Held(_)));

        // Deleted: refused, naming the directory.
        std::fs::remove_dir(&out).unwrap();
        let Err(gone) = current(&held) else {
            panic!("a deleted directory was written through")
        };
        let message = gone
            .get_ref()
            .and_then(|e| e.downcast_ref::<DirUnavailable>())
            .expect("a DirUnavailable error")
            .to_string();
        assert!(message.contains(&out.display().to_string()), "{message}");
        assert!(create_new(&held, "x").is_err());

        // Made again: the new directory is the one written to.
        std::fs::create_dir(&out).unwrap();
        assert!(matches!(current(&held).unwrap(), CurrentDir::Reopened(_)));
        drop(create_new(&held, "x").unwrap());
        assert!(out.join("x").is_file());
        let dest = Destination {
            dirs: vec!["sub".to_owned()],
            name: "y".to_owned(),
        };
        let parent = open_parent(&held, &dest).unwrap();
        assert!(rename_no_replace(&held, "x", &parent, "y").unwrap());
        assert!(out.join("sub/y").is_file());

        // A sub-directory's descriptor is not checked.
        assert!(matches!(current(&parent).unwrap(), CurrentDir::Held(_)));
    }
}
