//! How much the receiver's paired SHA-256 saves. A chunk that extends its
//! upload's hashed prefix feeds the same bytes to two hashes (the chunk's and
//! the file's); `update_both` compresses the two together with the x86 SHA
//! extensions. This bench hashes a 1 MiB buffer for about a second in each of
//! three ways and prints the data rate (bytes of input per second, each byte
//! counted once even when it goes into two hashes):
//!
//! - paired: both hashes through `update_both`, as the receiver does;
//! - sequential: the same two hashes, one `update` after the other, which is
//!   what the receiver would do without the paired path;
//! - `sha2::Sha256` alone: one hash, for reference (sequential should be
//!   about half of it).
//!
//! and the ratio paired / sequential. `cargo bench --bench sha256` runs it.
//! The module is included by path rather than made public: it only needs
//! `sha2` and `hex`, and nothing outside the receiver should call it.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

// Cargo builds bench targets with `cfg(test)`, so the module's unit tests
// are compiled here too; without the test harness their `#[test]` functions
// are dropped and the helpers they share would warn as unused.
#[path = "../src/sha256.rs"]
#[allow(dead_code, unused_imports)]
mod sha256;

use sha256::{Sha256Stream, update_both};

const MIB: usize = 1 << 20;
/// How long each way of hashing runs.
const RUN_FOR: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary
    // without it, and should not spend seconds hashing.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("sha256: run it with `cargo bench --bench sha256`");
        return ExitCode::SUCCESS;
    }
    // SHA-256 takes the same time whatever the bytes are, so any content will
    // do; a pattern that is not all zeros keeps the digests telling.
    let data: Vec<u8> = (0..MIB).map(|i| (i * 131 % 251) as u8).collect();
    if let Err(e) = check_digests(&data) {
        eprintln!("sha256: {e}");
        return ExitCode::FAILURE;
    }

    let paired = data_rate(&data, |data| {
        let (mut chunk, mut file) = (Sha256Stream::new(), Sha256Stream::new());
        update_both(&mut chunk, &mut file, data);
        black_box((chunk.finalize(), file.finalize()));
    });
    let sequential = data_rate(&data, |data| {
        let (mut chunk, mut file) = (Sha256Stream::new(), Sha256Stream::new());
        chunk.update(data);
        file.update(data);
        black_box((chunk.finalize(), file.finalize()));
    });
    let single = data_rate(&data, |data| {
        black_box(Sha256::digest(data));
    });

    println!("SHA-256 of a 1 MiB buffer, about {RUN_FOR:?} each (GB/s of input data):");
    println!("  paired (update_both, two hashes)   {paired:6.3} GB/s");
    println!("  sequential (two hashes, one by one) {sequential:6.3} GB/s");
    println!("  sha2::Sha256 alone (one hash)      {single:6.3} GB/s");
    println!(
        "  ratio paired / sequential          {:6.2}",
        paired / sequential
    );
    ExitCode::SUCCESS
}

/// Both paths must give `sha2`'s digest, or the figures measure nothing.
fn check_digests(data: &[u8]) -> Result<(), String> {
    let expected = hex::encode(Sha256::digest(data));
    let (mut chunk, mut file) = (Sha256Stream::new(), Sha256Stream::new());
    update_both(&mut chunk, &mut file, data);
    let mut alone = Sha256Stream::new();
    alone.update(data);
    for (what, got) in [
        ("paired, first", chunk.finalize_hex()),
        ("paired, second", file.finalize_hex()),
        ("sequential", alone.finalize_hex()),
    ] {
        if got != expected {
            return Err(format!("{what}: {got}, sha2 says {expected}"));
        }
    }
    Ok(())
}

/// Runs `hash` on `data` until [`RUN_FOR`] has passed (after one untimed
/// warm-up run) and returns the input hashed per second, in GB/s.
fn data_rate(data: &[u8], mut hash: impl FnMut(&[u8])) -> f64 {
    hash(black_box(data));
    let started = Instant::now();
    let mut runs = 0u64;
    while started.elapsed() < RUN_FOR {
        hash(black_box(data));
        runs += 1;
    }
    (runs * data.len() as u64) as f64 / 1e9 / started.elapsed().as_secs_f64()
}
