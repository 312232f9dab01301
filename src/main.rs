//! The `indexedcp` binary: everything is in the library; this only hands the
//! arguments to the CLI and turns its result into the exit code.

fn main() {
    limit_malloc_arenas();
    ignore_sigio();
    std::process::exit(indexedcp::cli::main_with_args(std::env::args_os()));
}

/// glibc gives every thread that allocates under contention an arena of its
/// own, up to eight per core, and keeps what each arena once held. The daemon
/// runs SQLite, file and hashing work on many short-lived blocking threads, so
/// with many small files its resident memory grew by about 15 MiB of arenas
/// (50-61 MiB against 40-42 MiB with two). Two arenas keep it near what is in
/// use; `MALLOC_ARENA_MAX` in the environment still decides when set.
///
/// glibc also serves large blocks from mmap only until one is freed: then it
/// raises that threshold to the freed block's size (up to 32 MiB), and later
/// buffers of that size come from the heap arenas, which keep the memory after
/// they are freed. An agent sending a 1 GiB file to S3 (8 MiB parts) peaked
/// at 93 MiB that way. The threshold is therefore fixed, at 4 MiB: S3 parts
/// still come from mmap and go back when freed, while 1 MiB chunk buffers
/// come from the heap. With the threshold at 256 KiB every chunk buffer (the
/// bytes bound to SQLite, the record it builds, the chunk read back) was a
/// fresh mapping, faulted in page by page and unmapped again: a fifth of
/// ingest's CPU went to page faults, and ingest of 1 GiB took 3.9 s of CPU
/// instead of 2.6 s. For the same reason the heap's top is given back only
/// past 8 MiB free (`M_TRIM_THRESHOLD`), not at glibc's 128 KiB.
/// `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` in the environment
/// still decide when set.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only changes allocator settings; it is called
            // before any other thread exists.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            }
        }
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
            }
        }
    }
}

/// The spool's settle rule asks the kernel whether a file is still open for
/// writing by taking a read lease on it for a moment (`F_SETLEASE`). Should
/// another process open the file for writing in that moment, the kernel
/// breaks the lease by sending SIGIO to the holder, and SIGIO's default
/// action terminates the process. The lease is released at once and the
/// settle rule looks again later, so the signal carries nothing the daemon
/// needs: it is ignored for the whole process, before any thread exists.
fn ignore_sigio() {
    // SAFETY: signal() with SIG_IGN installs no handler and touches no memory.
    unsafe {
        libc::signal(libc::SIGIO, libc::SIG_IGN);
    }
}
