//! Durations as every lbd file writes them (health checks, VRRP, persistence): `"500ms"`, `"2s"`,
//! `"1.5s"`, `"1m30s"`, `"250us"`. One parser and one formatter, so a duration means the same in
//! every section and `lbd check --dump`-style output reads back as it was written.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?}: expected a number and a unit (us, ms, s, m or h), like \"1s\", \"500ms\" or \"1m30s\"")]
    Syntax(String),
    #[error("duration {0:?} needs a unit: write \"{0}s\" or \"{0}ms\"")]
    NoUnit(String),
    #[error("duration {0:?} is too long")]
    Overflow(String),
    #[error("duration {0:?} is finer than a nanosecond")]
    TooFine(String),
}

/// Parses `"500ms"`, `"1s"`, `"1.5s"`, `"2m"`, `"1h"`, `"1m30s"` (units `ms`, `s`, `m`, `h`; `us`
/// or `µs` for microseconds too), exactly (no floating point). Spaces around the whole are allowed,
/// inside are not.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(DurationError::NoUnit(s.to_owned()));
    }
    let syntax = || DurationError::Syntax(text.to_owned());
    if s.is_empty() {
        return Err(syntax());
    }
    let mut rest = s;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        let unit_len = after.find(|c: char| !c.is_alphabetic()).unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1 {
            return Err(syntax());
        }
        let scale: u128 = match unit {
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(syntax()),
        };
        let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
        if whole.len() > 12 || frac.len() > 9 {
            return Err(DurationError::Overflow(text.to_owned()));
        }
        let whole: u128 = whole.parse().map_err(|_| syntax())?;
        let mut nanos = whole * scale;
        if !frac.is_empty() {
            let digits: u128 = frac.parse().map_err(|_| syntax())?;
            let divisor = 10u128.pow(frac.len() as u32);
            if !(digits * scale).is_multiple_of(divisor) {
                return Err(DurationError::TooFine(text.to_owned()));
            }
            nanos += digits * scale / divisor;
        }
        total_nanos += nanos;
        rest = after;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| DurationError::Overflow(text.to_owned()))?;
    Ok(Duration::new(secs, (total_nanos % 1_000_000_000) as u32))
}

/// The text [`parse_duration`] reads back as `d`, in the largest unit of `s`, `ms` and `us` that
/// `d` reaches, with a decimal fraction if needed: `"500ms"`, `"2s"`, `"1.5s"`, `"250us"`, `"0s"`.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    let (scale, digits, unit): (u128, usize, &str) = if nanos == 0 || nanos >= 1_000_000_000 {
        (1_000_000_000, 9, "s")
    } else if nanos >= 1_000_000 {
        (1_000_000, 6, "ms")
    } else {
        (1_000, 3, "us")
    };
    let (whole, frac) = (nanos / scale, nanos % scale);
    if frac == 0 {
        format!("{whole}{unit}")
    } else {
        let frac = format!("{frac:0digits$}");
        format!("{whole}.{}{unit}", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("1s", ms(1000)),
            ("500ms", ms(500)),
            ("2m", ms(120_000)),
            ("1h", ms(3_600_000)),
            ("1.5s", ms(1500)),
            ("0.1s", ms(100)),
            ("1m30s", ms(90_000)),
            ("0.25s", ms(250)),
            (" 3s ", ms(3000)),
            ("0s", ms(0)),
            ("250us", Duration::from_micros(250)),
            ("1.5µs", Duration::from_nanos(1500)),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        assert_eq!(parse_duration("5").unwrap_err().to_string(), "duration \"5\" needs a unit: write \"5s\" or \"5ms\"");
        for bad in ["", "s", "5x", "1.s", ".5s", "1..2s", "5 s", "-1s", "1s2", "1e3s", "fast"] {
            assert_eq!(
                parse_duration(bad).unwrap_err().to_string(),
                format!(
                    "invalid duration {bad:?}: expected a number and a unit (us, ms, s, m or h), like \"1s\", \"500ms\" or \
                     \"1m30s\""
                ),
            );
        }
        assert!(matches!(parse_duration("99999999999999h"), Err(DurationError::Overflow(_))));
        assert!(matches!(parse_duration("1.0000000001s"), Err(DurationError::Overflow(_))));
        assert_eq!(parse_duration("0.0001us").unwrap_err().to_string(), "duration \"0.0001us\" is finer than a nanosecond");
    }

    #[test]
    fn formatted_durations_read_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(2000), "2s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(1250), "1.25s"),
            (Duration::from_micros(1500), "1.5ms"),
            (Duration::from_micros(250), "250us"),
            (Duration::from_nanos(1500), "1.5us"),
            (Duration::from_nanos(7), "0.007us"),
            (Duration::new(90, 1), "90.000000001s"),
        ] {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d), "{text}");
        }
    }
}
