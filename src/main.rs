//! The `indexedcp` binary: everything is in the library; this only hands the
//! arguments to the CLI and turns its result into the exit code.

fn main() {
    std::process::exit(indexedcp::cli::main_with_args(std::env::args_os()));
}
