//! The vehicle's power state: what the power manager says (a file edge-netd reads, the
//! `power:` section, or `PUT /power` on the local API), decided here, owned by the
//! engine ([`PowerTracker`]) and reported to the control plane (`LinkState.power`,
//! `LinkChange.power`).
//!
//! Invariants:
//! - Without a `power:` section and without `PUT /power` the state is `on`.
//! - The newest report wins, whichever its source: the file is read every
//!   `power.interval`, but only a reading that differs from the file's previous one
//!   counts as a report ([`FileWatch`]), so an unchanged file does not undo a `PUT`.
//! - A percentage is `low` below `low_below` and `on` above `recover_above`; in between
//!   the state stays `low` if it was `low`, else `on` (hysteresis, [`decide`]).
//! - An unreadable or garbled file changes nothing but its error: the last state is
//!   kept, the error is logged once per change, every failed read is counted
//!   (`edge_netd_power_file_errors_total`) and `GET /power` shows it.
//!
//! Pure except [`run_file_reader`] (the file, the clock) and the metrics.

use misaki_proto::fleet_v1 as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::path::PathBuf;
use tokio::sync::mpsc;

use crate::config::PowerConfig;

/// A file longer than this is not a power state (sysfs values are a few bytes).
const MAX_FILE_BYTES: usize = 64;

/// The vehicle's power state (`misaki.fleet.v1.PowerState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Power {
    /// Engine running / mains: no restriction.
    #[default]
    On,
    /// Engine off, on battery.
    Accessory,
    /// Battery low.
    Low,
    /// Shutting down now.
    ShuttingDown,
}

impl Power {
    /// Whether services that move on low power (`on_low_power: cloud`) move now.
    pub fn is_low(self) -> bool {
        matches!(self, Power::Low | Power::ShuttingDown)
    }

    pub const ALL: [Power; 4] = [Power::On, Power::Accessory, Power::Low, Power::ShuttingDown];
    const WORDS: &'static str = "on, accessory, low, shutting_down";

    pub fn as_str(self) -> &'static str {
        match self {
            Power::On => "on",
            Power::Accessory => "accessory",
            Power::Low => "low",
            Power::ShuttingDown => "shutting_down",
        }
    }

    /// One word, surrounding whitespace ignored (`echo low > file` ends in a newline).
    pub fn parse(text: &str) -> Result<Power, String> {
        let word = text.trim();
        Power::ALL
            .into_iter()
            .find(|p| p.as_str() == word)
            .ok_or_else(|| format!("{word:?} is not a power state (one of {})", Power::WORDS))
    }

    pub fn to_pb(self) -> pb::PowerState {
        match self {
            Power::On => pb::PowerState::On,
            Power::Accessory => pb::PowerState::Accessory,
            Power::Low => pb::PowerState::Low,
            Power::ShuttingDown => pb::PowerState::ShuttingDown,
        }
    }
}

/// What the power file holds: a word, or a battery percentage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    Word(Power),
    Percent(u8),
}

impl Reading {
    /// The file's content: one word or an integer 0–100, whitespace around ignored.
    pub fn parse(text: &str) -> Result<Reading, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("the file is empty".into());
        }
        if t.bytes().all(|b| b.is_ascii_digit()) {
            return match t.parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Reading::Percent(p)),
                _ => Err(format!("{t:?} is not a percentage 0-100")),
            };
        }
        Power::parse(t).map(Reading::Word).map_err(|_| {
            format!(
                "{t:?} is neither a power state ({}) nor a battery percentage 0-100",
                Power::WORDS
            )
        })
    }

    pub fn to_json(self) -> serde_json::Value {
        match self {
            Reading::Word(p) => p.as_str().into(),
            Reading::Percent(n) => n.into(),
        }
    }
}

/// The percentage thresholds of `power:` (`low_below` ≤ `recover_above`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub low_below: u8,
    pub recover_above: u8,
}

pub const DEFAULT_THRESHOLDS: Thresholds = Thresholds {
    low_below: crate::config::DEFAULT_LOW_BELOW,
    recover_above: crate::config::DEFAULT_RECOVER_ABOVE,
};

impl From<&PowerConfig> for Thresholds {
    fn from(c: &PowerConfig) -> Self {
        Thresholds {
            low_below: c.low_below,
            recover_above: c.recover_above,
        }
    }
}

/// The state a battery `percent` gives, coming from `current`: `low` below
/// `low_below`, `on` above `recover_above`, and in between `low` only if it was.
pub fn decide(current: Power, percent: u8, t: Thresholds) -> Power {
    if percent < t.low_below || (current == Power::Low && percent <= t.recover_above) {
        Power::Low
    } else {
        Power::On
    }
}

/// Where the current state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// Nothing reported yet (`on`).
    #[default]
    Default,
    File,
    Api,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Default => "default",
            Source::File => "file",
            Source::Api => "api",
        }
    }
}

/// One report to the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PowerUpdate {
    /// `PUT /power`.
    Api(Power),
    /// A new reading of the file (clears its error).
    File(Reading),
    /// The file's error changed (`None`: readable again, with the reading it had).
    FileError(Option<String>),
}

/// The power state as published in the engine's view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PowerView {
    pub state: Power,
    pub source: Source,
    /// `power.file`, when configured.
    pub file: Option<PathBuf>,
    /// The file's last good reading.
    pub reading: Option<Reading>,
    /// Why the file could not be read or understood, until it can again.
    pub file_error: Option<String>,
}

/// The engine's power state: applies [`PowerUpdate`]s (pure).
#[derive(Debug, Clone)]
pub struct PowerTracker {
    view: PowerView,
    thresholds: Thresholds,
}

impl PowerTracker {
    pub fn new(config: Option<&PowerConfig>) -> Self {
        PowerTracker {
            view: PowerView {
                file: config.map(|c| c.file.clone()),
                ..PowerView::default()
            },
            thresholds: config.map_or(DEFAULT_THRESHOLDS, Thresholds::from),
        }
    }

    pub fn view(&self) -> &PowerView {
        &self.view
    }

    /// Apply `u`; the previous state when the state changed.
    pub fn apply(&mut self, u: PowerUpdate) -> Option<Power> {
        let before = self.view.state;
        let v = &mut self.view;
        match u {
            PowerUpdate::Api(p) => (v.state, v.source) = (p, Source::Api),
            PowerUpdate::File(reading) => {
                v.state = match reading {
                    Reading::Word(p) => p,
                    Reading::Percent(n) => decide(v.state, n, self.thresholds),
                };
                (v.source, v.reading, v.file_error) = (Source::File, Some(reading), None);
            }
            PowerUpdate::FileError(e) => v.file_error = e,
        }
        (v.state != before).then_some(before)
    }
}

/// What the file reader remembers between reads, to report only news.
#[derive(Debug, Default)]
pub struct FileWatch {
    last: Option<Reading>,
    error: Option<String>,
}

impl FileWatch {
    /// The report one read gives, if any: a reading that differs from the last good
    /// one, or an error that differs from the last (a recovery with the same reading
    /// only clears the error).
    pub fn observe(&mut self, read: Result<Reading, String>) -> Option<PowerUpdate> {
        match read {
            Ok(r) => {
                let had_error = self.error.take().is_some();
                if self.last != Some(r) {
                    self.last = Some(r);
                    Some(PowerUpdate::File(r))
                } else {
                    had_error.then_some(PowerUpdate::FileError(None))
                }
            }
            Err(e) if self.error.as_ref() != Some(&e) => {
                self.error = Some(e.clone());
                Some(PowerUpdate::FileError(Some(e)))
            }
            Err(_) => None,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabel {
    pub(crate) state: &'static str,
}

/// `edge_netd_power_state{state}` and `edge_netd_power_file_errors_total`.
#[derive(Debug, Default, Clone)]
pub struct PowerMetrics {
    pub(crate) state: Family<StateLabel, Gauge>,
    pub(crate) file_errors: Counter,
}

impl PowerMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        crate::register_metrics!(r;
            "edge_netd_power_state", "1 for the vehicle's current power state (on, accessory, low, shutting_down)" => self.state;
            "edge_netd_power_file_errors", "Reads of power.file that failed or held no power state" => self.file_errors;
        );
    }

    /// 1 for `current`, 0 for the others.
    pub fn set_state(&self, current: Power) {
        for p in Power::ALL {
            let label = StateLabel { state: p.as_str() };
            self.state
                .get_or_create(&label)
                .set(i64::from(p == current));
        }
    }
}

/// Read the file (at most [`MAX_FILE_BYTES`]) and parse it.
async fn read(path: &std::path::Path) -> Result<Reading, String> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(format!(
            "{} holds {} bytes; a power state is one word or a percentage",
            path.display(),
            bytes.len()
        ));
    }
    let text =
        std::str::from_utf8(&bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    Reading::parse(text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Read `power.file` every `power.interval` until `inputs` closes or `shutdown`
/// completes, sending the engine each new reading and each change of error.
pub async fn run_file_reader<E: From<PowerUpdate>>(
    config: PowerConfig,
    inputs: mpsc::Sender<E>,
    file_errors: Counter,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut watch = FileWatch::default();
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let result = read(&config.file).await;
        if result.is_err() {
            file_errors.inc();
        }
        let Some(update) = watch.observe(result) else {
            continue;
        };
        match &update {
            PowerUpdate::FileError(Some(e)) => {
                tracing::warn!(error = %e, "power file unusable; keeping the last power state");
            }
            PowerUpdate::FileError(None) => tracing::info!("power file readable again"),
            PowerUpdate::File(r) => tracing::debug!(reading = ?r, "power file read"),
            PowerUpdate::Api(_) => {}
        }
        if inputs.send(update.into()).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn words_and_percentages_parse_and_anything_else_says_why() {
        for p in Power::ALL {
            assert_eq!(
                Reading::parse(&format!("{}\n", p.as_str())),
                Ok(Reading::Word(p))
            );
            assert_eq!(Power::parse(p.as_str()), Ok(p));
        }
        assert_eq!(Reading::parse(" 0\n"), Ok(Reading::Percent(0)));
        assert_eq!(Reading::parse("100"), Ok(Reading::Percent(100)));
        assert_eq!(Reading::parse("007"), Ok(Reading::Percent(7)));
        for bad in [
            "101",
            "256",
            "99999999999",
            "-1",
            "2.5",
            "",
            "  \n",
            "LOW",
            "on low",
        ] {
            assert!(Reading::parse(bad).is_err(), "{bad:?}");
        }
        let e = Reading::parse("garbled").unwrap_err();
        assert!(
            e.contains("\"garbled\"") && e.contains("shutting_down"),
            "{e}"
        );
        assert!(Reading::parse("101").unwrap_err().contains("0-100"));
        assert!(Power::parse("off").unwrap_err().contains("on, accessory"));
        assert_eq!(Power::Low.to_pb(), pb::PowerState::Low);
        assert_eq!(Power::ShuttingDown.to_pb(), pb::PowerState::ShuttingDown);
    }

    #[test]
    fn percentages_go_low_below_and_recover_only_above_the_band() {
        let t = DEFAULT_THRESHOLDS;
        let mut state = Power::On;
        let mut seen = vec![];
        for p in [50, 20, 19, 21, 25, 30, 31, 29, 20, 19, 0, 100] {
            state = decide(state, p, t);
            seen.push((p, state));
        }
        use Power::{Low, On};
        assert_eq!(
            seen,
            [
                (50, On),
                (20, On),
                (19, Low),
                (21, Low),
                (25, Low),
                (30, Low),
                (31, On),
                (29, On),
                (20, On),
                (19, Low),
                (0, Low),
                (100, On)
            ]
        );
        // A word state other than low leaves the band as on.
        assert_eq!(decide(Power::Accessory, 25, t), On);
        assert_eq!(decide(Power::ShuttingDown, 10, t), Low);
        // No band at all.
        let flat = Thresholds {
            low_below: 20,
            recover_above: 20,
        };
        assert_eq!(decide(Low, 20, flat), Low);
        assert_eq!(decide(Low, 21, flat), On);
    }

    #[test]
    fn the_tracker_takes_the_newest_report_and_keeps_the_state_on_file_errors() {
        let mut t = PowerTracker::new(None);
        assert_eq!(
            (t.view().state, t.view().source),
            (Power::On, Source::Default)
        );
        assert_eq!(
            t.apply(PowerUpdate::File(Reading::Percent(15))),
            Some(Power::On)
        );
        assert_eq!(t.view().state, Power::Low);
        assert_eq!(t.apply(PowerUpdate::Api(Power::On)), Some(Power::Low));
        assert_eq!(t.view().source, Source::Api);
        // Hysteresis from the state the API set.
        assert_eq!(t.apply(PowerUpdate::File(Reading::Percent(25))), None);
        assert_eq!((t.view().state, t.view().source), (Power::On, Source::File));
        let e = "cannot read /x: gone".to_string();
        assert_eq!(t.apply(PowerUpdate::FileError(Some(e.clone()))), None);
        assert_eq!(t.view().file_error.as_ref(), Some(&e));
        assert_eq!(t.view().state, Power::On);
        assert_eq!(t.view().reading, Some(Reading::Percent(25)));
        t.apply(PowerUpdate::File(Reading::Word(Power::Accessory)));
        assert_eq!(
            (t.view().state, &t.view().file_error),
            (Power::Accessory, &None)
        );
    }

    #[test]
    fn the_file_is_news_only_when_its_reading_or_error_changes() {
        let mut w = FileWatch::default();
        let low = Reading::Word(Power::Low);
        assert_eq!(w.observe(Ok(low)), Some(PowerUpdate::File(low)));
        assert_eq!(w.observe(Ok(low)), None, "unchanged: not a new report");
        let gone = || Err("cannot read: gone".to_string());
        assert_eq!(
            w.observe(gone()),
            Some(PowerUpdate::FileError(Some("cannot read: gone".into())))
        );
        assert_eq!(w.observe(gone()), None, "logged once per change");
        assert_eq!(
            w.observe(Err("garbled".into())),
            Some(PowerUpdate::FileError(Some("garbled".into())))
        );
        // Back with the reading it had: only the error clears.
        assert_eq!(w.observe(Ok(low)), Some(PowerUpdate::FileError(None)));
        let p = Reading::Percent(40);
        assert_eq!(w.observe(Ok(p)), Some(PowerUpdate::File(p)));
    }

    #[test]
    fn the_state_gauge_is_one_for_the_current_state_only() {
        let m = PowerMetrics::default();
        let mut r = prometheus_client::registry::Registry::default();
        m.register(&mut r);
        m.set_state(Power::Low);
        m.file_errors.inc();
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &r).unwrap();
        assert!(s.contains("edge_netd_power_state{state=\"low\"} 1"), "{s}");
        assert!(s.contains("edge_netd_power_state{state=\"on\"} 0"), "{s}");
        assert!(s.contains("edge_netd_power_file_errors_total 1"), "{s}");
    }

    #[tokio::test]
    async fn the_reader_reports_the_file_and_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("power");
        let config = PowerConfig {
            file: file.clone(),
            interval: Duration::from_millis(10),
            low_below: 20,
            recover_above: 30,
        };
        let errors = Counter::default();
        let (tx, mut rx) = mpsc::channel::<PowerUpdate>(4);
        let never = std::future::pending();
        let task = tokio::spawn(run_file_reader(config, tx, errors.clone(), never));
        let Some(PowerUpdate::FileError(Some(e))) = rx.recv().await else {
            panic!("a missing file is an error");
        };
        assert!(e.contains("cannot read"), "{e}");
        std::fs::write(&file, "12\n").unwrap();
        assert_eq!(
            rx.recv().await,
            Some(PowerUpdate::File(Reading::Percent(12)))
        );
        std::fs::write(&file, "x".repeat(100)).unwrap();
        let Some(PowerUpdate::FileError(Some(e))) = rx.recv().await else {
            panic!("an oversized file is an error");
        };
        assert!(e.contains("100 bytes"), "{e}");
        assert!(errors.get() >= 2);
        drop(rx);
        std::fs::write(&file, "on").unwrap();
        task.await.unwrap();
    }
}
