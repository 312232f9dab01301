//! tus requests: the input's first line is an `Upload-Metadata` value, and
//! the whole input, one `name: value` per line, the headers of a request.
#![no_main]

use indexedcp::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let first = data.split(|&b| b == b'\n').next().unwrap_or_default();
    if let Ok(raw) = std::str::from_utf8(first) {
        let _ = fuzzing::check_tus_metadata(raw);
    }
    fuzzing::check_tus_headers(&fuzzing::header_lines(data));
});
