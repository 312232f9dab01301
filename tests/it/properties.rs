//! Property tests of the parsers that take untrusted input, through
//! `indexedcp::fuzzing`: the same invariants the fuzz targets in tests/fuzz
//! check, on a few hundred generated inputs each, so that `cargo test` (and
//! CI) keeps them. Inputs are biased towards what breaks parsers: separators,
//! dots, drive letters, control characters, digits at the edge of 64 bits.
//! Each property also checks that well-formed input is accepted and means
//! what it says, so an invariant that refuses everything would fail here.

use std::path::Path;

use indexedcp::config::PathMode;
use indexedcp::fuzzing;
use indexedcp::protocol::{BatchEntry, BatchManifest};
use proptest::prelude::*;

/// Characters that matter to the path modes, plus some that do not.
fn name_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => prop::sample::select(vec!['/', '\\', '.', ':', 'C', 'a', '_', ' ', '~', '-']),
        1 => prop::sample::select(vec!['\0', '\n', '\u{7f}', '\u{85}', 'é', '\u{202e}', '日']),
        1 => any::<char>(),
    ]
}

fn client_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(name_char(), 0..40).prop_map(|c| c.into_iter().collect()),
        // Long names, near the 255-byte component limit.
        (250usize..262, prop::sample::select(vec!["a", "é", "/x"]))
            .prop_map(|(n, s)| s.repeat(n / s.len())),
    ]
}

fn mode() -> impl Strategy<Value = PathMode> {
    prop::sample::select(fuzzing::PATH_MODES.to_vec())
}

/// A component every path mode keeps as it is.
fn plain_component() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9_. -]{0,20}".prop_filter("not dots only", |c| {
        !c.trim_start_matches('.').is_empty() && !c.contains("..")
    })
}

fn sha_hex() -> impl Strategy<Value = String> {
    prop::array::uniform32(any::<u8>()).prop_map(hex_upper_or_lower)
}

fn hex_upper_or_lower(bytes: [u8; 32]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if bytes[0] & 1 == 0 {
        hex.to_ascii_uppercase()
    } else {
        hex
    }
}

fn upload_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{16,64}"
}

/// A header value as a client might send it: a number (also past 64 bits),
/// a hash, an upload id, or anything.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string().into_bytes()),
        Just(b"18446744073709551616".to_vec()),
        "[ 0-9+-]{0,24}".prop_map(String::into_bytes),
        sha_hex().prop_map(String::into_bytes),
        upload_id().prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

fn header_pairs(names: &'static [&'static str]) -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    prop::collection::vec(
        (prop::sample::select(names.to_vec()), header_value())
            .prop_map(|(name, value)| (name.to_owned(), value)),
        0..12,
    )
}

const CONFIG: &str = r#"
[[spool]]
path = "/var/spool/indexedcp/out"
target = "central"
settle = "2s"

[[target]]
name = "central"
url = "https://receiver.example.org/upload"
concurrency = 4
chunk_size = "1MiB"

[server]
listen = "127.0.0.1:3000"
output_dir = "/srv/indexedcp"
path_mode = "allow-paths"
"#;

/// TOML-ish text: fragments of a real configuration and of TOML syntax, in
/// any order.
fn config_text() -> impl Strategy<Value = String> {
    let fragments = prop::sample::select(vec![
        "[[spool]]\n",
        "[[target]]\n",
        "[server]\n",
        "[daemon]\n",
        "path = \"/tmp/x\"\n",
        "target = \"central\"\n",
        "name = \"central\"\n",
        "url = \"https://example.org/upload\"\n",
        "url = \"s3://bucket/prefix\"\n",
        "settle = \"-1s\"\n",
        "chunk_size = \"9999999999999999999TiB\"\n",
        "concurrency = 0\n",
        "listen = \"[::1]:99999\"\n",
        "output_dir = \"\"\n",
        "path_mode = \"nope\"\n",
        "api_keys = [\"\", \"k\"]\n",
        "api_key_file = \"missing.key\"\n",
        "headers = { X = \"\\u0000\" }\n",
        "= \n",
        "\"\n",
        "[",
        "]]\n",
        "# é\n",
        "\t",
        "x.y.z = 1\n",
        "\u{feff}",
    ]);
    prop::collection::vec(fragments, 0..12).prop_map(|f| f.concat())
}

/// A real configuration with one character inserted, removed or replaced.
fn mutated_config() -> impl Strategy<Value = String> {
    (0..CONFIG.len(), 0u8..3, name_char()).prop_map(|(at, how, c)| {
        let mut at = at;
        while !CONFIG.is_char_boundary(at) {
            at -= 1;
        }
        let mut text = CONFIG.to_owned();
        match how {
            0 => text.insert(at, c),
            1 => {
                text.remove(at);
            }
            _ => {
                text.remove(at);
                text.insert(at, c);
            }
        }
        text
    })
}

fn tus_key() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.-]{1,12}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn path_modes_give_a_relative_path_inside_the_output_or_an_error(
        mode in mode(),
        name in client_name(),
        reserved in prop::option::of(Just(".indexedcp")),
        millis in any::<u64>(),
        attempt in 0u32..5,
    ) {
        let _ = fuzzing::check_destination(mode, &name, reserved);
        fuzzing::check_generated_names(&name, millis, attempt);
    }

    #[test]
    fn plain_names_keep_their_components(
        parts in prop::collection::vec(plain_component(), 1..5),
        dot_prefix in any::<bool>(),
    ) {
        let joined = parts.join("/");
        let sent = if dot_prefix { format!("./{joined}") } else { joined.clone() };
        let kept = fuzzing::check_destination(PathMode::AllowPaths, &sent, Some(".indexedcp"));
        prop_assert_eq!(kept, Ok(joined));
        let single = fuzzing::check_destination(PathMode::Sanitize, &parts[0], None);
        prop_assert_eq!(single, Ok(parts[0].clone()));
        let nested = fuzzing::check_destination(PathMode::Sanitize, &parts.join("/"), None);
        prop_assert_eq!(nested.is_err(), parts.len() > 1);
    }

    #[test]
    fn upload_headers_are_checked_against_each_other(
        pairs in header_pairs(fuzzing::UPLOAD_HEADERS),
    ) {
        let _ = fuzzing::check_upload_headers(&pairs);
    }

    #[test]
    fn well_formed_resumable_headers_are_accepted(
        id in upload_id(),
        size in any::<u64>(),
        count in 1u64..1_000_000,
        index_seed in any::<u64>(),
        offset_seed in any::<u64>(),
        chunk in sha_hex(),
        file in sha_hex(),
    ) {
        let index = index_seed % count;
        let offset = if size == 0 { 0 } else { offset_seed % size };
        let pairs: Vec<(String, Vec<u8>)> = [
            ("x-file-name", "report.csv".to_owned()),
            ("x-upload-id", id),
            ("x-chunk-index", index.to_string()),
            ("x-chunk-offset", format!(" {offset} ")),
            ("x-file-size", size.to_string()),
            ("x-chunk-count", count.to_string()),
            ("x-chunk-sha256", chunk),
            ("x-file-sha256", file),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.into_bytes()))
        .collect();
        let chunk = fuzzing::check_upload_headers(&pairs).unwrap().unwrap();
        prop_assert_eq!(chunk.upload_id, pairs[1].1.iter().map(|&b| char::from(b)).collect::<String>());
        prop_assert_eq!((chunk.index, chunk.offset, chunk.file_size, chunk.count), (index, offset, size, count));
        prop_assert_eq!(chunk.sha256.as_bytes(), pairs[6].1.to_ascii_lowercase());
        prop_assert_eq!(chunk.file_sha256.as_bytes(), pairs[7].1.to_ascii_lowercase());
    }

    #[test]
    fn resumable_headers_without_the_file_hash_are_accepted_for_streaming(
        id in upload_id(),
        count in 1u64..1_000,
        chunk in sha_hex(),
    ) {
        let pairs: Vec<(String, Vec<u8>)> = [
            ("x-file-name", "stream.bin".to_owned()),
            ("x-upload-id", id),
            ("x-chunk-index", "0".to_owned()),
            ("x-chunk-offset", "0".to_owned()),
            ("x-file-size", (count * 1024).to_string()),
            ("x-chunk-count", count.to_string()),
            ("x-chunk-sha256", chunk),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.into_bytes()))
        .collect();
        let chunk = fuzzing::check_upload_headers(&pairs).unwrap().unwrap();
        prop_assert_eq!(chunk.file_sha256, "");
        prop_assert_eq!(chunk.count, count);
    }

    #[test]
    fn resumable_headers_with_a_crc32c_instead_of_the_chunk_hash_are_accepted(
        id in upload_id(),
        crc in any::<u32>(),
        upper in any::<bool>(),
    ) {
        let hex = if upper { format!("{crc:08X}") } else { format!("{crc:08x}") };
        let pairs: Vec<(String, Vec<u8>)> = [
            ("x-file-name", "crc.bin".to_owned()),
            ("x-upload-id", id),
            ("x-chunk-index", "0".to_owned()),
            ("x-chunk-offset", "0".to_owned()),
            ("x-file-size", "10".to_owned()),
            ("x-chunk-count", "1".to_owned()),
            ("x-chunk-crc32c", hex),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.into_bytes()))
        .collect();
        let chunk = fuzzing::check_upload_headers(&pairs).unwrap().unwrap();
        prop_assert_eq!((chunk.crc32c, chunk.sha256.as_str()), (Some(crc), ""));
        // Without either check of the chunk's bytes: refused.
        let without: Vec<_> = pairs.into_iter().filter(|(n, _)| n != "x-chunk-crc32c").collect();
        prop_assert!(fuzzing::check_upload_headers(&without).unwrap_err().contains("X-Chunk-Sha256"));
    }

    #[test]
    fn manifests_are_checked_as_a_whole(
        raw in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            manifest().prop_map(|m| serde_json::to_vec(&m).unwrap()),
            manifest().prop_map(|m| {
                let text = serde_json::to_string(&m).unwrap();
                text.replace("\"size\":", "\"size\":-").into_bytes()
            }),
        ],
        max_bytes in prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>(), 0u64..4096],
    ) {
        let _ = fuzzing::check_manifest(&raw, max_bytes);
    }

    #[test]
    fn a_valid_manifest_is_accepted_with_its_entries(m in manifest()) {
        let ids: std::collections::HashSet<_> = m.files.iter().map(|f| &f.upload_id).collect();
        prop_assume!(ids.len() == m.files.len());
        let total = m.files.iter().fold(0u64, |s, f| s.saturating_add(f.size));
        let raw = serde_json::to_vec(&m).unwrap();
        let got = fuzzing::check_manifest(&raw, u64::MAX);
        if m.files.iter().map(|f| f.size).try_fold(0u64, u64::checked_add).is_none() {
            // Sizes whose sum does not fit 64 bits are too large for any limit.
            prop_assert!(got.unwrap_err().starts_with("413 "));
        } else {
            let expected: Vec<BatchEntry> = m
                .files
                .iter()
                .cloned()
                .map(|mut f| {
                    f.sha256 = f.sha256.to_ascii_lowercase();
                    f
                })
                .collect();
            prop_assert_eq!(got, Ok(expected));
        }
        if total > 0 {
            let refused = fuzzing::check_manifest(&raw, total - 1).unwrap_err();
            prop_assert!(refused.starts_with("413 "), "{}", refused);
        }
    }

    #[test]
    fn config_text_is_accepted_or_refused_with_a_location(text in config_text()) {
        fuzzing::check_config(&text, Path::new("/nonexistent/indexedcp.toml"));
    }

    #[test]
    fn a_damaged_config_is_accepted_or_refused_with_a_location(text in mutated_config()) {
        fuzzing::check_config(&text, Path::new("/nonexistent/indexedcp.toml"));
    }

    #[test]
    fn tus_metadata_round_trips(
        filename in any::<String>(),
        sha in prop::array::uniform32(any::<u8>()),
        sha_as_hex in any::<bool>(),
        extra in prop::collection::vec((tus_key(), prop::collection::vec(any::<u8>(), 0..20)), 0..4),
        padded in any::<bool>(),
    ) {
        let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
        let mut pairs = vec![fuzzing::tus_metadata_pair("filename", filename.as_bytes())];
        let sha_value: Vec<u8> = if sha_as_hex {
            hex.to_ascii_uppercase().into_bytes()
        } else {
            fuzzing::tus_metadata_pair("", &sha).trim().as_bytes().to_vec()
        };
        pairs.push(fuzzing::tus_metadata_pair("sha256", &sha_value));
        for (key, value) in &extra {
            if key != "filename" && key != "sha256" && !pairs.iter().any(|p| p.split(' ').next() == Some(key)) {
                pairs.push(fuzzing::tus_metadata_pair(key, value));
            }
        }
        let mut raw = pairs.join(",");
        if !padded {
            raw = raw.replace('=', "");
        }
        let parsed = fuzzing::check_tus_metadata(&raw);
        prop_assert_eq!(parsed, Ok((Some(filename), Some(hex))));
    }

    #[test]
    fn tus_metadata_and_headers_never_break_their_invariants(
        raw in prop::collection::vec(
            prop::sample::select(vec!["filename", "sha256", " ", ",", "=", "a", "Zm9v", "YQ", "é", "\t"]),
            0..16,
        ),
        pairs in header_pairs(fuzzing::TUS_HEADERS),
    ) {
        let _ = fuzzing::check_tus_metadata(&raw.concat());
        fuzzing::check_tus_headers(&pairs);
    }
}

fn manifest() -> impl Strategy<Value = BatchManifest> {
    prop::collection::vec(
        (
            upload_id(),
            client_name(),
            prop_oneof![0u64..10_000, any::<u64>()],
            sha_hex(),
        )
            .prop_map(|(upload_id, file_name, size, sha256)| BatchEntry {
                upload_id,
                file_name,
                size,
                sha256,
            }),
        1..6,
    )
    .prop_map(|files| BatchManifest { files })
}
