//! When to renew and when to retry: pure decisions over wall-clock instants (no I/O,
//! no clock of their own).
//!
//! Renewal is due at a random point between 40 % and 60 % of the certificate's
//! lifetime. Half-life keeps half the lifetime as margin for the cloud being away
//! (retries keep the old certificate in use until it expires); the jitter spreads the
//! renewals of vehicles enrolled together (a production line, a fleet re-issued after
//! a CA rotation) so they do not reach the CA at once. Istio renews at 50 % with jitter
//! for the same reasons.

use std::ops::RangeInclusive;
use std::time::{Duration, SystemTime};

/// Where in its lifetime a certificate is renewed (drawn once per certificate).
pub(crate) const RENEW_FRACTION: RangeInclusive<f64> = 0.4..=0.6;
/// Failed attempts back off from this, doubling...
pub(crate) const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// ...up to this: a fleet whose control plane comes back must not wait long, and must
/// not hammer it while it is away.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The longest single sleep: the wall clock is read again after it. A vehicle that was
/// suspended (the monotonic clock stops) or whose clock was set after boot (NTP, GNSS)
/// sees its certificates' times move, and must act on them within this.
pub(crate) const RECHECK: Duration = Duration::from_secs(30);

/// Where a certificate's renewal schedule starts. `not_before` alone would be early: a
/// CA backdates it for clients whose clocks lag (misaki's by 5 minutes), which would put
/// a short-lived certificate's half-life after its expiry. When it was received (or,
/// read from disk, when its file was written) is closer to its issue; never later than
/// `now`, never earlier than `not_before`.
pub(crate) fn start(
    not_before: SystemTime,
    received: Option<SystemTime>,
    now: SystemTime,
) -> SystemTime {
    received.map_or(not_before, |r| r.min(now).max(not_before))
}

/// When to renew: `fraction` of the way from `start` to `not_after`.
pub(crate) fn renew_at(start: SystemTime, not_after: SystemTime, fraction: f64) -> SystemTime {
    let life = not_after.duration_since(start).unwrap_or(Duration::ZERO);
    start + life.mul_f64(fraction.clamp(0.0, 1.0))
}

/// What the credential manager does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing until then (the current certificate is good and not yet due).
    Wait(Duration),
    /// Renew, presenting the current certificate.
    Renew,
    /// The current certificate expired: drop it.
    Expired,
    /// No usable certificate: enrol with the claim credential.
    Enrol,
    /// No usable certificate and no claim: look at the files again (an operator may
    /// install a certificate).
    Reload,
}

/// The renewal time and expiry of the certificate held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Due {
    pub renew_at: SystemTime,
    pub not_after: SystemTime,
}

pub(crate) fn next_step(held: Option<Due>, now: SystemTime, has_claim: bool) -> Step {
    match held {
        Some(d) if now >= d.not_after => Step::Expired,
        Some(d) => match d.renew_at.duration_since(now) {
            Ok(wait) if !wait.is_zero() => Step::Wait(wait),
            _ => Step::Renew,
        },
        None if has_claim => Step::Enrol,
        None => Step::Reload,
    }
}

/// How long to wait after a failed renewal: the backoff, but never past the
/// certificate's expiry (then it is dropped and the claim takes over at once).
pub(crate) fn retry_after(backoff: Duration, now: SystemTime, not_after: SystemTime) -> Duration {
    backoff.min(not_after.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Capped exponential backoff; each delay drawn from [d/2, d] so vehicles that failed
/// together do not retry together.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The next delay; `draw` is uniform in [0, 1].
    pub(crate) fn next_delay(&mut self, draw: f64) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d.mul_f64(0.5 + 0.5 * draw.clamp(0.0, 1.0))
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn renewal_is_due_between_40_and_60_percent_of_the_lifetime() {
        let (start, end) = (at(1_000), at(1_000 + 100));
        assert_eq!(renew_at(start, end, *RENEW_FRACTION.start()), at(1_040));
        assert_eq!(renew_at(start, end, *RENEW_FRACTION.end()), at(1_060));
        for _ in 0..1_000 {
            let f = rand::random_range(RENEW_FRACTION);
            let t = renew_at(start, end, f);
            assert!(t >= at(1_040) && t <= at(1_060), "{f}");
        }
        // A certificate already past its end: due at once, not in the past's future.
        assert_eq!(renew_at(end, start, 0.5), end);
    }

    #[test]
    fn the_schedule_starts_when_the_certificate_arrived_not_at_its_backdated_not_before() {
        // misaki's CA backdates 5 minutes; a 20 s certificate received at 1_300.
        let (nb, received, now) = (at(1_000), at(1_300), at(1_300));
        let s = start(nb, Some(received), now);
        assert_eq!(s, at(1_300));
        let due = renew_at(s, at(1_320), 0.5);
        assert_eq!(due, at(1_310), "half of the 20 s, not of 320 s");
        // Unknown arrival: not_before. A file written before not_before (a clock set
        // later): not_before. A file from the future (clock set back): now.
        assert_eq!(start(nb, None, now), nb);
        assert_eq!(start(nb, Some(at(10)), now), nb);
        assert_eq!(start(nb, Some(at(9_999)), now), now);
    }

    #[test]
    fn next_step_follows_the_certificate_held() {
        let due = Due {
            renew_at: at(50),
            not_after: at(100),
        };
        assert_eq!(
            next_step(Some(due), at(10), true),
            Step::Wait(Duration::from_secs(40))
        );
        assert_eq!(next_step(Some(due), at(50), false), Step::Renew);
        assert_eq!(next_step(Some(due), at(99), true), Step::Renew);
        assert_eq!(next_step(Some(due), at(100), true), Step::Expired);
        assert_eq!(next_step(None, at(100), true), Step::Enrol);
        assert_eq!(next_step(None, at(100), false), Step::Reload);
    }

    #[test]
    fn retries_back_off_up_to_a_cap_but_never_past_expiry() {
        let mut b = Backoff::default();
        let full: Vec<Duration> = (0..9).map(|_| b.next_delay(1.0)).collect();
        let s = |n| Duration::from_secs(n);
        assert_eq!(
            full,
            [s(1), s(2), s(4), s(8), s(16), s(32), s(60), s(60), s(60)]
        );
        assert_eq!(b.next_delay(0.0), s(30), "jitter: down to half");
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(500));
        assert_eq!(retry_after(s(60), at(90), at(100)), s(10));
        assert_eq!(retry_after(s(4), at(90), at(100)), s(4));
        assert_eq!(retry_after(s(4), at(200), at(100)), Duration::ZERO);
    }
}
