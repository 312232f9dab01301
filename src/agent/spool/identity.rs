//! What identifies one version of a source file (device, inode, size and
//! mtime), computed from its metadata in one place, so that the watcher, ingest
//! and the buffer's records all agree on whether a file changed.

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What identifies one version of a source file: a file replaced, rewritten or
/// appended to gets a different identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourceIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

impl SourceIdentity {
    pub fn of(meta: &Metadata) -> SourceIdentity {
        SourceIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
        }
    }

    /// Whether the file was last modified at least `settle` ago. A future mtime
    /// (clock skew) is never old enough.
    pub(super) fn modified_before(&self, settle: Duration) -> bool {
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, saturating_nanos);
        now_ns.saturating_sub(self.mtime_ns) >= saturating_nanos(settle)
    }
}

fn saturating_nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::super::testkit::dirs;
    use super::*;

    #[test]
    fn identity_comes_from_the_metadata() {
        let dirs = dirs();
        let path = dirs.root.join("a.dat");
        fs::write(&path, b"12345").unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        let identity = SourceIdentity::of(&meta);
        let mtime = meta.modified().unwrap().duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(identity.size, 5);
        assert_eq!(identity.ino, meta.ino());
        assert_eq!(identity.dev, meta.dev());
        assert_eq!(identity.mtime_ns, i64::try_from(mtime.as_nanos()).unwrap());
        assert!(!identity.modified_before(Duration::from_secs(60)));
        assert!(identity.modified_before(Duration::ZERO));
    }
}
