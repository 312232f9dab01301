//! Which files of a spool are sent, decided on the relative path alone: hidden
//! and temporary names never, then the spool's include and exclude globs.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::{Glob, GlobSet, GlobSetBuilder};

use super::SpoolError;
use crate::config::SpoolConfig;

/// Name endings that common tools use while a file is still being written.
const TEMPORARY_SUFFIXES: [&str; 4] = [".tmp", ".part", ".swp", "~"];

/// Which files of a spool are sent, decided on the relative path alone.
///
/// Hidden names (a component starting with `.`) and temporary names (`*.tmp`,
/// `*.part`, `*.swp`, `*~`) are always skipped; then the path must match an
/// `include` glob and no `exclude` glob. Globs use globset's defaults, so `*`
/// also matches `/`.
#[derive(Debug, Clone)]
pub(super) struct Filter {
    include: GlobSet,
    exclude: GlobSet,
}

impl Filter {
    pub(super) fn new(spool: &SpoolConfig) -> Result<Filter, SpoolError> {
        Ok(Filter {
            include: build_globs(&spool.path, &spool.include)?,
            exclude: build_globs(&spool.path, &spool.exclude)?,
        })
    }

    /// Whether the file at `relative` (`/`-separated) is to be sent.
    pub(super) fn accepts(&self, relative: &str) -> bool {
        if is_hidden(relative) {
            return false;
        }
        let name = relative.rsplit('/').next().unwrap_or(relative);
        if TEMPORARY_SUFFIXES
            .iter()
            .any(|suffix| name.ends_with(suffix))
        {
            return false;
        }
        self.include.is_match(relative) && !self.exclude.is_match(relative)
    }
}

fn build_globs(spool: &Path, patterns: &[String]) -> Result<GlobSet, SpoolError> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = Glob::new(pattern).map_err(|source| SpoolError::Pattern {
            spool: spool.to_owned(),
            pattern: pattern.clone(),
            source,
        })?;
        set.add(glob);
    }
    set.build().map_err(|source| SpoolError::Pattern {
        spool: spool.to_owned(),
        pattern: patterns.join(", "),
        source,
    })
}

/// Whether a relative path is, or lies inside, a hidden file or directory.
pub(super) fn is_hidden(relative: &str) -> bool {
    relative
        .split('/')
        .any(|component| component.starts_with('.'))
}

/// [`is_hidden`] for a path that is not valid UTF-8.
pub(super) fn has_hidden_component(relative: &Path) -> bool {
    relative
        .components()
        .any(|component| component.as_os_str().as_bytes().starts_with(b"."))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::testkit::config;
    use super::*;

    #[test]
    fn filter_skips_hidden_and_temporary_names() {
        let filter = Filter::new(&config(Path::new("/in"))).unwrap();
        for accepted in [
            "a.dat",
            "sub/deep/b.dat",
            "no-extension",
            "tmp",
            "x.tmp.dat",
            "a.b/c",
        ] {
            assert!(filter.accepts(accepted), "{accepted} should be accepted");
        }
        for skipped in [
            ".hidden",
            "x.tmp",
            "x.part",
            "x.swp",
            "x.dat~",
            "sub/.hidden",
            ".git/config",
            "sub/.cache/deep/file.dat",
            "sub/upload.part",
        ] {
            assert!(!filter.accepts(skipped), "{skipped} should be skipped");
        }
    }

    #[test]
    fn filter_matches_include_and_exclude_against_the_relative_path() {
        let mut spool = config(Path::new("/in"));
        spool.include = vec!["*.dat".to_owned(), "logs/*".to_owned()];
        spool.exclude = vec!["skip-*".to_owned(), "*/private/*".to_owned()];
        let filter = Filter::new(&spool).unwrap();
        // `*` matches across `/`.
        assert!(filter.accepts("a.dat"));
        assert!(filter.accepts("deep/down/a.dat"));
        assert!(filter.accepts("logs/2024/app.log"));
        assert!(!filter.accepts("notes.txt"));
        assert!(!filter.accepts("skip-1.dat"));
        assert!(!filter.accepts("sub/private/a.dat"));

        spool.include = vec!["[broken".to_owned()];
        let message = Filter::new(&spool).unwrap_err().to_string();
        assert!(
            message.contains("[broken")
                && message.contains("/in")
                && message.contains("fix the pattern"),
            "{message}"
        );
    }
}
