//! The path modes: the first byte picks the mode, whether the state
//! directory `.indexedcp` is reserved, and the attempt number of a unique
//! name; the rest is the client's file name (a name that is not UTF-8 is
//! refused before any path mode sees it).
#![no_main]

use indexedcp::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, name)) = data.split_first() else {
        return;
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    let mode = fuzzing::PATH_MODES[usize::from(first) % 3];
    let reserved = (first & 0x04 != 0).then_some(".indexedcp");
    let _ = fuzzing::check_destination(mode, name, reserved);
    let millis = 1_700_000_000_000 + u64::from(first);
    fuzzing::check_generated_names(name, millis, u32::from(first >> 3) % 4);
});
