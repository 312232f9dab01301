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
            mtime_ns: nanos_since_epoch(meta.mtime(), meta.mtime_nsec()),
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

/// An mtime as nanoseconds since the Unix epoch, from `stat`'s two parts.
///
/// The kernel keeps the nanosecond part in `0..1_000_000_000` and counts it
/// forward from the (floored) seconds, also before 1970: 1.25 s before the
/// epoch is `-2` seconds and `750_000_000` nanoseconds, so the sum of the two,
/// not a concatenation or a signed nanosecond part, is the time. The sum is
/// done in 128 bits and clamped, so that an mtime beyond the ±292 years an
/// `i64` holds (possible on file systems with 64-bit seconds) saturates the
/// same way wherever it is computed, instead of wrapping or panicking.
fn nanos_since_epoch(secs: i64, nsec: i64) -> i64 {
    let nanos = i128::from(secs) * 1_000_000_000 + i128::from(nsec);
    i64::try_from(nanos).unwrap_or(if nanos < 0 { i64::MIN } else { i64::MAX })
}

fn saturating_nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::MetadataExt;

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

    /// Sets the mtime of a new file to `mtime` and returns its identity, or
    /// `None` when the file system cannot store that time (it then keeps
    /// another, which the caller must not judge).
    fn identity_at(mtime: SystemTime, secs: i64) -> Option<SourceIdentity> {
        let dirs = dirs();
        let path = dirs.root.join("a.dat");
        let file = fs::File::create(&path).unwrap();
        file.set_modified(mtime).unwrap();
        drop(file);
        let meta = fs::symlink_metadata(&path).unwrap();
        (meta.mtime() == secs).then(|| SourceIdentity::of(&meta))
    }

    #[test]
    fn mtime_counts_nanoseconds_since_the_epoch_before_and_after_1970() {
        // After 1970, with a nanosecond part.
        let after = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        let identity = identity_at(after, 1_700_000_000).expect("file system keeps the mtime");
        assert_eq!(identity.mtime_ns, 1_700_000_000_123_456_789);

        // 1.25 s before the epoch: stat says -2 s and 750_000_000 ns.
        let before = UNIX_EPOCH - Duration::new(1, 250_000_000);
        let identity = identity_at(before, -2).expect("file system keeps pre-1970 mtimes");
        assert_eq!(identity.mtime_ns, -1_250_000_000);

        // Years before 1970, where the seconds alone are far from the nanoseconds.
        let long_before = UNIX_EPOCH - Duration::new(1_000_000_000, 1);
        let identity =
            identity_at(long_before, -1_000_000_001).expect("file system keeps pre-1970 mtimes");
        assert_eq!(identity.mtime_ns, -1_000_000_000_000_000_001);

        // Past what an i64 of nanoseconds holds (year 2286): saturated, where
        // the file system can store it at all.
        let far = UNIX_EPOCH + Duration::new(10_000_000_000, 5);
        if let Some(identity) = identity_at(far, 10_000_000_000) {
            assert_eq!(identity.mtime_ns, i64::MAX);
        }
    }

    #[test]
    fn mtime_arithmetic_saturates_outside_the_i64_range() {
        assert_eq!(nanos_since_epoch(0, 0), 0);
        assert_eq!(nanos_since_epoch(-1, 999_999_999), -1);
        assert_eq!(nanos_since_epoch(9_223_372_036, 854_775_807), i64::MAX);
        assert_eq!(nanos_since_epoch(9_223_372_036, 854_775_808), i64::MAX);
        assert_eq!(nanos_since_epoch(-9_223_372_037, 145_224_192), i64::MIN);
        // Below the range with a nanosecond part: still the least value, not
        // the least value plus the nanoseconds.
        assert_eq!(nanos_since_epoch(-20_000_000_000, 500_000_000), i64::MIN);
        assert_eq!(nanos_since_epoch(i64::MAX, 999_999_999), i64::MAX);
        assert_eq!(nanos_since_epoch(i64::MIN, 0), i64::MIN);
    }
}
