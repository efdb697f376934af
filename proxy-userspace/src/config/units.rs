//! Duration and size strings, NGINX style, as pure functions so every edge case is testable.

use std::time::Duration;

/// Duration units in the order they must appear in a combined value such as `1h30m`.
const DURATION_UNITS: [(&str, u64); 6] = [
    ("w", 7 * 24 * 3600 * 1000),
    ("d", 24 * 3600 * 1000),
    ("h", 3600 * 1000),
    ("m", 60 * 1000),
    ("s", 1000),
    ("ms", 1),
];

/// Parses `"500ms"`, `"10s"`, `"10m"`, `"1h"`, `"1d"`, `"1w"`, combinations such as `"1m30s"`
/// (largest unit first, as NGINX requires) and a bare number of seconds such as `"30"`.
///
/// Returns a reason, not a full error, so the caller can attach the key path and line.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration (write e.g. \"10s\")".into());
    }
    if s.starts_with('-') {
        return Err(format!("negative duration {text:?}"));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s
            .parse()
            .map_err(|_| format!("duration {text:?} is too large"))?;
        return secs
            .checked_mul(1000)
            .map(Duration::from_millis)
            .ok_or_else(|| format!("duration {text:?} is too large"));
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total_ms: u64 = 0;
    // Index into DURATION_UNITS of the last unit seen; the next must be strictly smaller.
    let mut last_unit: Option<usize> = None;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if start == i {
            return Err(format!(
                "invalid duration {text:?}: expected a number at {:?}",
                &s[start..]
            ));
        }
        let number: u64 = s[start..i]
            .parse()
            .map_err(|_| format!("duration {text:?} is too large"))?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let unit = &s[unit_start..i];
        if unit.is_empty() {
            return Err(if i < bytes.len() && bytes[i] == b'.' {
                format!(
                    "invalid duration {text:?}: fractions are not supported (use e.g. \"1500ms\")"
                )
            } else {
                format!("invalid duration {text:?}: missing unit after {number}")
            });
        }
        let Some(index) = DURATION_UNITS.iter().position(|(name, _)| *name == unit) else {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {unit:?} (use ms, s, m, h, d or w)"
            ));
        };
        if last_unit.is_some_and(|last| index <= last) {
            return Err(format!(
                "invalid duration {text:?}: units must go from largest to smallest, each once"
            ));
        }
        last_unit = Some(index);
        total_ms = number
            .checked_mul(DURATION_UNITS[index].1)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| format!("duration {text:?} is too large"))?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Parses `"64KiB"`, `"1MiB"`, `"1GiB"`, NGINX's `"16k"`/`"16K"`/`"1m"`/`"1M"`/`"1g"`/`"1G"`
/// (all powers of 1024) and a plain number of bytes such as `"4096"` or `"4096B"`.
///
/// Decimal units (`"KB"`, `"MB"`) are refused rather than guessed, since the two conventions differ.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty size (write e.g. \"16KiB\")".into());
    }
    if s.starts_with('-') {
        return Err(format!("negative size {text:?}"));
    }
    let digits_end = s
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    if digits_end == 0 {
        return Err(format!("invalid size {text:?}: expected a number first"));
    }
    let number: u64 = s[..digits_end]
        .parse()
        .map_err(|_| format!("size {text:?} is too large"))?;
    let unit = s[digits_end..].trim_start();
    let multiplier: u64 = match unit {
        "" | "B" | "b" => 1,
        "k" | "K" | "KiB" => 1 << 10,
        "m" | "M" | "MiB" => 1 << 20,
        "g" | "G" | "GiB" => 1 << 30,
        _ if unit.starts_with('.') => {
            return Err(format!(
                "invalid size {text:?}: fractions are not supported (use a smaller unit)"
            ));
        }
        _ => {
            return Err(format!(
                "invalid size {text:?}: unknown unit {unit:?} (use KiB/k, MiB/m or GiB/g, or bytes)"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn durations_single_units() {
        assert_eq!(parse_duration("500ms"), Ok(ms(500)));
        assert_eq!(parse_duration("10s"), Ok(ms(10_000)));
        assert_eq!(parse_duration("10m"), Ok(ms(600_000)));
        assert_eq!(parse_duration("1h"), Ok(ms(3_600_000)));
        assert_eq!(parse_duration("1d"), Ok(ms(86_400_000)));
        assert_eq!(parse_duration("1w"), Ok(ms(7 * 86_400_000)));
        assert_eq!(parse_duration("0s"), Ok(ms(0)));
    }

    #[test]
    fn durations_bare_number_is_seconds() {
        assert_eq!(parse_duration("30"), Ok(ms(30_000)));
        assert_eq!(parse_duration(" 30 "), Ok(ms(30_000)));
        assert_eq!(parse_duration("0"), Ok(ms(0)));
    }

    #[test]
    fn durations_combined() {
        assert_eq!(parse_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(parse_duration("1h 30m"), Ok(ms(5_400_000)));
        assert_eq!(parse_duration("1d2h3m4s5ms"), Ok(ms(93_784_005)));
    }

    #[test]
    fn durations_rejected() {
        for (input, needle) in [
            ("", "empty"),
            ("   ", "empty"),
            ("-5s", "negative"),
            ("-5", "negative"),
            ("10x", "unknown unit \"x\""),
            ("10 s", "missing unit"),
            ("1.5s", "fractions"),
            ("s", "expected a number"),
            ("30s1m", "largest to smallest"),
            ("1s1s", "largest to smallest"),
            ("10S", "unknown unit"),
            ("99999999999999999999s", "too large"),
            ("99999999999999999999", "too large"),
            ("18446744073709551615", "too large"),
            ("18446744073709551w", "too large"),
            ("18446744073709551000ms1", "missing unit"),
        ] {
            let err = parse_duration(input).expect_err(input);
            assert!(err.contains(needle), "{input:?}: {err}");
        }
    }

    #[test]
    fn durations_sum_overflow() {
        let err = parse_duration("18446744073709551w18446744073709551ms").unwrap_err();
        assert!(err.contains("too large"), "{err}");
        let max_ms = u64::MAX.to_string() + "ms";
        assert_eq!(parse_duration(&max_ms), Ok(ms(u64::MAX)));
        let err = parse_duration(&format!("1s{max_ms}")).unwrap_err();
        assert!(err.contains("too large"), "{err}");
    }

    #[test]
    fn sizes_accepted() {
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("16KiB"), Ok(16 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("16k"), Ok(16 * 1024));
        assert_eq!(parse_size("16K"), Ok(16 * 1024));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("16 KiB"), Ok(16 * 1024));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn sizes_rejected() {
        for (input, needle) in [
            ("", "empty"),
            (" ", "empty"),
            ("-1", "negative"),
            ("-1k", "negative"),
            ("KiB", "expected a number"),
            ("16KB", "unknown unit \"KB\""),
            ("16kb", "unknown unit"),
            ("16Mi", "unknown unit"),
            ("1.5M", "fractions"),
            ("99999999999999999999", "too large"),
            ("18446744073709551615k", "too large"),
            ("17179869184GiB", "too large"),
        ] {
            let err = parse_size(input).expect_err(input);
            assert!(err.contains(needle), "{input:?}: {err}");
        }
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }
}
