//! Durations and sizes as operators write them (`"250ms"`, `"7d"`, `"1MiB"`,
//! `"1GB"`), parsed and printed back. Hand-written rather than taken from a
//! crate because the accepted spellings are part of the file format: the
//! command line, the configuration file and `check-config`'s output must agree
//! on them exactly, and the printer must give the shortest spelling that the
//! parser reads back to the same value.

use std::time::Duration;

pub(super) const KIB: u64 = 1 << 10;
pub(super) const MIB: u64 = 1 << 20;
pub(super) const GIB: u64 = 1 << 30;
pub(super) const TIB: u64 = 1 << 40;

/// Parses a duration: an unsigned integer followed by `ms`, `s`, `m`, `h` or
/// `d`, or a bare integer meaning seconds (`"250ms"`, `"5s"`, `"7d"`, `"10"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "invalid duration {s:?}: use a whole number with a unit ms, s, m, h or d \
             (e.g. \"250ms\", \"5s\", \"2m\") or a number of seconds"
        )
    };
    let (number, unit) = split_number(s).ok_or_else(invalid)?;
    let seconds_per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(number)),
        "" | "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => 24 * 60 * 60,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// Parses a size: an unsigned integer of bytes, optionally followed by a
/// binary (`KiB`, `MiB`, `GiB`, `TiB`) or decimal (`KB`, `MB`, `GB`, `TB`)
/// unit or `B`; units are case-insensitive (`"1MiB"`, `"1KB"`, `"0"`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let invalid = || {
        format!(
            "invalid size {s:?}: use a whole number of bytes, optionally with a unit \
             KiB, MiB, GiB, TiB (binary) or KB, MB, GB, TB (decimal), e.g. \"1MiB\""
        )
    };
    let (number, unit) = split_number(s).ok_or_else(invalid)?;
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "tib" => TIB,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Splits `" 12 MiB "` into `(12, "MiB")`; `None` unless it starts with digits
/// that fit a `u64` (so signs and fractions are refused).
fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let number = s[..digits_end].parse().ok()?;
    Some((number, s[digits_end..].trim_start()))
}

/// The shortest exact spelling that `parse_duration` reads back.
pub(super) fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    let units = [
        (24 * 60 * 60 * 1000, "d"),
        (60 * 60 * 1000, "h"),
        (60 * 1000, "m"),
        (1000, "s"),
    ];
    for (unit_millis, unit) in units {
        if millis.is_multiple_of(unit_millis) {
            return format!("{}{unit}", millis / unit_millis);
        }
    }
    format!("{millis}ms")
}

/// The shortest exact spelling that `parse_size` reads back.
pub(super) fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_owned();
    }
    for (unit_bytes, unit) in [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")] {
        if bytes.is_multiple_of(unit_bytes) {
            return format!("{}{unit}", bytes / unit_bytes);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_duration_accepts_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration(" 3 s "), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn parse_duration_rejects_negative_and_garbage() {
        for bad in [
            "",
            "-5s",
            "5x",
            "1.5s",
            "s",
            "five",
            "5 seconds",
            "99999999999999999999d",
        ] {
            let error = parse_duration(bad).unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
        assert!(
            parse_duration("5x")
                .unwrap_err()
                .contains("ms, s, m, h or d")
        );
        assert!(
            parse_duration("999999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn parse_size_accepts_binary_and_decimal_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1KB"), Ok(1_000));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("2 mib"), Ok(2 << 20));
    }

    #[test]
    fn parse_size_rejects_negative_and_garbage() {
        for bad in ["", "-1", "1.5MiB", "MiB", "1XB", "lots"] {
            let error = parse_size(bad).unwrap_err();
            assert!(error.contains("KiB, MiB, GiB"), "{error}");
        }
        assert!(parse_size("99999999TiB").unwrap_err().contains("too large"));
    }

    #[test]
    fn formatted_durations_and_sizes_parse_back() {
        for millis in [0, 1, 250, 1000, 1500, 60_000, 90_000, 3_600_000, 86_400_000] {
            let duration = Duration::from_millis(millis);
            assert_eq!(parse_duration(&format_duration(duration)), Ok(duration));
        }
        assert_eq!(format_duration(Duration::from_secs(7 * 86_400)), "7d");
        for bytes in [0, 1, 1000, 1024, 1536, 1 << 20, 10 << 30, 3 << 40] {
            assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
        }
        assert_eq!(format_size(64 << 20), "64MiB");
    }
}
