//! Durations as users write them in Deputy's resources: `90s`, `15m`, `1h30m`.
//!
//! The grammar is deliberately small — one to three `<digits><h|m|s>` parts — so that every
//! accepted value is also a Go duration (what CEL's `duration()` in the CRD rules parses)
//! and means the same there. The arithmetic itself is jiff's.

use jiff::SignedDuration;

/// Why a string is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a duration such as 90s, 15m or 1h30m")]
pub struct DurationError {
    value: String,
}

/// Parses `90s`, `15m`, `1h30m`, `2h` … into a positive duration.
pub fn parse(value: &str) -> Result<SignedDuration, DurationError> {
    let err = || DurationError { value: value.chars().take(32).collect() };
    let mut parts = 0;
    let mut digits = 0;
    let mut total: i64 = 0;
    let mut current: i64 = 0;
    for b in value.bytes() {
        match b {
            b'0'..=b'9' => {
                digits += 1;
                if digits > 6 {
                    return Err(err());
                }
                current = current * 10 + i64::from(b - b'0');
            }
            b'h' | b'm' | b's' if digits > 0 => {
                let unit = match b {
                    b'h' => 3600,
                    b'm' => 60,
                    _ => 1,
                };
                total += current * unit;
                current = 0;
                digits = 0;
                parts += 1;
                if parts > 3 {
                    return Err(err());
                }
            }
            _ => return Err(err()),
        }
    }
    if digits != 0 || parts == 0 || total == 0 {
        return Err(err());
    }
    Ok(SignedDuration::from_secs(total))
}

/// Formats a duration in the same grammar (`1h30m`, `45s`).
pub fn format(d: SignedDuration) -> String {
    let secs = d.as_secs().max(0);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_grammar() {
        let table = [("90s", 90), ("15m", 900), ("1h30m", 5400), ("2h", 7200), ("1h1m1s", 3661), ("0h10m", 600)];
        for (s, secs) in table {
            assert_eq!(parse(s), Ok(SignedDuration::from_secs(secs)), "{s}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for s in ["", "0s", "10", "m", "1.5h", "-1m", "1d", "1h 30m", "1H", "1h1m1s1s", "9999999s", "15 m", "1µs"] {
            assert!(parse(s).is_err(), "{s:?} should be rejected");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in ["90s", "15m", "1h30m", "2h", "1h1m1s"] {
            let d = parse(s).unwrap();
            assert_eq!(parse(&format(d)), Ok(d));
        }
        assert_eq!(format(SignedDuration::from_secs(90)), "1m30s");
    }
}
