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
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator settings; it is called
        // before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
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
