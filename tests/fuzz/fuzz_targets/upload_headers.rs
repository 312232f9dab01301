//! The headers of `POST /upload` (v1 and resumable) and of `POST
//! /upload/batch`, one `name: value` per line of the input.
#![no_main]

use indexedcp::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::check_upload_headers(&fuzzing::header_lines(data));
});
