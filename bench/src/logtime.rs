//! Timestamps out of misaki-cp's log, to split an edit's latency into "control plane
//! has the new policy" and "Envoy serves it".

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// When each `policy in force` line was logged (tracing's default format: an
/// RFC 3339 UTC timestamp with microseconds first, possibly wrapped in ANSI colours).
pub fn policy_in_force(log: &str) -> Vec<SystemTime> {
    log.lines()
        .filter(|l| l.contains("policy in force"))
        .filter_map(|l| parse_rfc3339_utc(misaki_harness::strip_ansi(l).split_whitespace().next()?))
        .collect()
}

/// For each save time, how long until the first of `events` at or after it.
pub fn time_to_next(saves: &[SystemTime], events: &[SystemTime]) -> Vec<Option<Duration>> {
    saves
        .iter()
        .map(|s| events.iter().find_map(|e| e.duration_since(*s).ok()))
        .collect()
}

/// `2026-11-28T00:20:51.914992Z`.
fn parse_rfc3339_utc(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, mi, sec) = (
        t.next()?.parse::<u64>().ok()?,
        t.next()?.parse::<u64>().ok()?,
        t.next()?,
    );
    let (whole, frac) = sec.split_once('.').unwrap_or((sec, "0"));
    let nanos: u32 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    let days = u64::try_from(days_from_civil(y, m, day)).ok()?;
    let secs = days * 86_400 + h * 3600 + mi * 60 + whole.parse::<u64>().ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_timestamp_of_a_coloured_tracing_line() {
        let line = "\u{1b}[2m2026-11-28T00:20:51.914992Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \
                    misaki_cp::policy_state: policy in force version=a8 changed_keys=1";
        let t = policy_in_force(line);
        let since = t[0].duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(since, Duration::new(1_795_825_251, 914_992_000));
    }

    #[test]
    fn each_save_is_matched_to_the_first_event_after_it() {
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        let got = time_to_next(&[at(100), at(500)], &[at(50), at(106), at(507)]);
        assert_eq!(
            got,
            vec![
                Some(Duration::from_millis(6)),
                Some(Duration::from_millis(7))
            ]
        );
        assert_eq!(time_to_next(&[at(600)], &[at(507)]), vec![None]);
    }
}
