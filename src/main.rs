//! The `indexedcp` binary: everything is in the library; this only hands the
//! arguments to the CLI and turns its result into the exit code.

fn main() {
    limit_malloc_arenas();
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
