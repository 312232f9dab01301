//! The batch manifest: the first byte picks the receiver's byte limit, the
//! rest is the JSON a client sends.
#![no_main]

use indexedcp::fuzzing;
use libfuzzer_sys::fuzz_target;

const LIMITS: [u64; 5] = [0, 1, 1000, 64 << 20, u64::MAX];

fuzz_target!(|data: &[u8]| {
    let Some((&first, json)) = data.split_first() else {
        return;
    };
    let _ = fuzzing::check_manifest(json, LIMITS[usize::from(first) % LIMITS.len()]);
});
