//! Durations as written in policy files: an unsigned integer and one unit.
//!
//! Invariant: `parse_duration(&format_duration(d)) == Ok(d)` for every `d` that is a
//! whole number of milliseconds (the format's precision).
//!
//! Grammar: `<digits><unit>`, unit one of `ms`, `s`, `m`, `h` — e.g. `250ms`, `2s`,
//! `1m`, `24h`. No fractions, no spaces, no compound forms (`1m30s` is `90s`): one
//! spelling per value keeps diffs and reviews simple.

use std::time::Duration;

/// Units, longest suffix first so `ms` is not read as `m` + garbage.
const UNITS: [(&str, u64); 4] = [("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration; expected e.g. `250ms`, `2s`, `1m` or `1h`")]
    Empty,
    #[error("`{0}` has no number; expected e.g. `250ms`, `2s`, `1m` or `1h`")]
    NoNumber(String),
    #[error("`{0}` has no unit; add one of ms, s, m, h (e.g. `{0}s`)")]
    NoUnit(String),
    #[error("`{text}`: unknown unit `{unit}`; expected one of ms, s, m, h")]
    BadUnit { text: String, unit: String },
    #[error("`{0}`: fractions are not supported; use a smaller unit (e.g. `1500ms`, `90m`)")]
    Fraction(String),
    #[error("`{0}` is too large")]
    TooLarge(String),
}

/// Parses `250ms`, `2s`, `1m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(DurationError::NoNumber(text.to_owned()));
    }
    if unit.is_empty() {
        return Err(DurationError::NoUnit(text.to_owned()));
    }
    if unit.starts_with('.') {
        return Err(DurationError::Fraction(text.to_owned()));
    }
    let Some(&(_, millis_per_unit)) = UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(DurationError::BadUnit {
            text: text.to_owned(),
            unit: unit.to_owned(),
        });
    };
    // Digits only, so the only possible parse failure is overflow.
    let n: u64 = digits
        .parse()
        .map_err(|_| DurationError::TooLarge(text.to_owned()))?;
    let millis = n
        .checked_mul(millis_per_unit)
        .ok_or_else(|| DurationError::TooLarge(text.to_owned()))?;
    Ok(Duration::from_millis(millis))
}

/// Formats with the largest unit that represents `d` exactly (`90s`, not `1m30s`).
/// Sub-millisecond parts are truncated: policy durations are whole milliseconds.
pub fn format_duration(d: Duration) -> String {
    // u128 -> u64 saturates only beyond 584 million years.
    let millis = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 {
        return "0s".to_owned();
    }
    let (name, per) = UNITS
        .iter()
        .rev()
        .copied()
        .find(|(_, per)| millis % per == 0)
        .unwrap_or(UNITS[0]);
    format!("{}{}", millis / per, name)
}
