//! The measurement every setup shares: save an edit that moves the service from
//! upstream A to B (or back), then poll the Envoy listener until the new upstream
//! answers.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;

use crate::probe::{Hit, Probe};

/// How the loop runs; the same for every setup.
#[derive(Debug, Clone)]
pub struct Plan {
    pub edits: usize,
    /// Edits made and waited for, but not counted (first connections, lazy init).
    pub warmup: usize,
    pub poll_interval: Duration,
    /// Pause before each edit: `gap_min + U(0, gap_jitter)`. The jitter spreads the
    /// edits over the phase of a polling peer's refresh cycle, so a REST poller is
    /// not measured at one lucky or unlucky phase.
    pub gap_min: Duration,
    pub gap_jitter: Duration,
    pub timeout: Duration,
}

/// One edit as measured.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Wall clock just before the rename, to line up with the logs of the processes.
    pub saved_at: SystemTime,
    pub latency: Duration,
    pub polls: u32,
    /// Save → the control plane logged the new config in force, where it says so.
    pub cp_applied: Option<Duration>,
}

/// The two upstreams a service flips between.
#[derive(Debug, Clone, Copy)]
pub struct Sides {
    pub a: u16,
    pub b: u16,
}

/// Write `text` to a temp file beside `path`, then rename it over `path` (as editors
/// and `mv` do). Returns the instant just before the rename: the edit is "saved" at
/// the rename, since that is when a watcher can first see the new content.
pub fn save(path: &Path, text: &str) -> std::io::Result<(Instant, SystemTime)> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp~");
    fs::write(&tmp, text)?;
    let (t0, wall) = (Instant::now(), SystemTime::now());
    fs::rename(&tmp, path)?;
    Ok((t0, wall))
}

/// Run `plan` against a listener on `port`: `apply(upstream_port)` saves an edit that
/// routes `path` to that upstream and returns when it was saved. The service must be
/// on upstream A when this starts.
pub fn run(
    plan: &Plan,
    port: u16,
    path: &str,
    sides: Sides,
    mut apply: impl FnMut(u16) -> anyhow::Result<(Instant, SystemTime)>,
) -> anyhow::Result<Vec<Sample>> {
    let mut probe = Probe::new(port, path);
    probe
        .until("A", plan.poll_interval, plan.timeout)
        .map_err(|hit| {
            anyhow::anyhow!("the listener never answered from upstream A (last: {hit:?})")
        })?;
    let mut rng = rand::rng();
    let mut samples = Vec::with_capacity(plan.edits);
    let mut on_a = true;
    for i in 0..plan.warmup + plan.edits {
        let jitter = rng.random_range(0..=plan.gap_jitter.as_micros() as u64);
        thread::sleep(plan.gap_min + Duration::from_micros(jitter));
        let (want, port) = if on_a { ("B", sides.b) } else { ("A", sides.a) };
        let (t0, saved_at) = apply(port)?;
        let (done, polls) = probe
            .until(want, plan.poll_interval, plan.timeout)
            .map_err(|hit: Hit| {
                anyhow::anyhow!(
                    "edit {i}: upstream {want} not live after {:?} (last poll: {hit:?})",
                    plan.timeout
                )
            })?;
        on_a = !on_a;
        if i >= plan.warmup {
            samples.push(Sample {
                saved_at,
                latency: done - t0,
                polls,
                cp_applied: None,
            });
        }
    }
    Ok(samples)
}
