//! Disk helpers shared by the agent and the receiver.

use std::fs::File;

/// Starts writing `len` bytes of `file` from `offset` (all of it when `len` is
/// 0) to disk without waiting for them, so that a later sync finds them
/// (mostly) written: data otherwise stays dirty until the sync, or until the
/// kernel's background threshold, a tenth of memory.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the duration of the call; the call
    // only schedules writeback and touches no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}
