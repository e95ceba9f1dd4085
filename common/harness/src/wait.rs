//! Polling until a deadline.

use std::thread;
use std::time::{Duration, Instant};

/// Call `f` every `every` until it returns `Ok(Some(_))` (that value), fails (that
/// error), or `timeout` has passed (`Ok(None)`). `f` is always called at least once.
pub fn poll<T, E>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(every);
    }
}

/// Poll `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let Ok(v) = poll::<T, std::convert::Infallible>(timeout, Duration::from_millis(20), || Ok(f()));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_the_first_value_or_none_at_the_deadline() {
        let mut n = 0;
        assert_eq!(
            wait_for(Duration::from_secs(5), || {
                n += 1;
                (n == 3).then_some(n)
            }),
            Some(3)
        );
        assert_eq!(wait_for(Duration::ZERO, || None::<()>), None);
        let e: Result<Option<()>, &str> = poll(Duration::from_secs(5), Duration::ZERO, || Err("x"));
        assert_eq!(e, Err("x"));
    }
}
