//! The configuration file, as `indexedcp --config` reads it. Relative key
//! file paths resolve below a folder that does not exist.
#![no_main]

use std::path::Path;

use indexedcp::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    fuzzing::check_config(text, Path::new("/nonexistent/indexedcp/fuzz.toml"));
});
