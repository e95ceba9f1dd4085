//! edge-netd's YAML configuration: parsed strictly, validated once, here.
//!
//! Invariants:
//! - Unknown fields are errors (a typo must not silently fall back to a default).
//! - A [`Config`] value is always valid: at least one uplink, unique uplink names and
//!   interfaces, probe targets as `IP:port`, the local API on loopback, durations > 0.
//! - Every error names the field (`uplinks[1].interface`) and why.
//!
//! Durations are written `150ms`, `5s`, `2m` (an integer and a unit).

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a config error is and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Yaml { file: String, message: String },
    #[error("{file}: {field}: {message}")]
    Invalid {
        file: String,
        field: String,
        message: String,
    },
}

/// Kind of an uplink (as in the mesh policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UplinkKind {
    Lte,
    #[serde(rename = "5g")]
    FiveG,
    #[serde(rename = "3g")]
    ThreeG,
    Wifi,
    Dsrc,
    Lpwa,
}

impl UplinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UplinkKind::Lte => "lte",
            UplinkKind::FiveG => "5g",
            UplinkKind::ThreeG => "3g",
            UplinkKind::Wifi => "wifi",
            UplinkKind::Dsrc => "dsrc",
            UplinkKind::Lpwa => "lpwa",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    vehicle_id: String,
    control_plane: String,
    api: String,
    state_dir: PathBuf,
    #[serde(default)]
    heartbeat_interval: Option<String>,
    uplinks: Vec<RawUplink>,
    probe: RawProbe,
    #[serde(default)]
    selection: Option<RawSelection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    name: String,
    interface: String,
    kind: UplinkKind,
    #[serde(default)]
    metered: bool,
    #[serde(default)]
    cost: u32,
    #[serde(default)]
    probe_targets: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    targets: Vec<String>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    window: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelection {
    #[serde(default)]
    blackhole_after: Option<u32>,
    #[serde(default)]
    dwell: Option<String>,
}

/// One uplink of this vehicle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkConfig {
    /// Name used by the policy (e.g. `wifi`).
    pub name: String,
    /// Kernel interface (e.g. `wlan0`); probes are bound to it.
    pub interface: String,
    pub kind: UplinkKind,
    pub metered: bool,
    pub cost: u32,
    /// Where this uplink's probes go; non-empty.
    pub probe_targets: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    pub interval: Duration,
    /// A probe not answered within this is lost.
    pub timeout: Duration,
    /// Probes kept for RTT/loss/jitter.
    pub window: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectionConfig {
    /// Consecutive lost probes that make a link a blackhole.
    pub blackhole_after: u32,
    /// How long a more preferred link must be eligible before we move back to it.
    pub dwell: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub vehicle_id: String,
    /// `http://host:port` of the control plane's gRPC port.
    pub control_plane: http::Uri,
    /// Loopback address of the local HTTP API.
    pub api: SocketAddr,
    /// Holds the last received policy.
    pub state_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub uplinks: Vec<UplinkConfig>,
    pub probe: ProbeConfig,
    pub selection: SelectionConfig,
}

pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(100);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(200);
pub const DEFAULT_WINDOW: usize = 20;
pub const DEFAULT_BLACKHOLE_AFTER: u32 = 3;
pub const DEFAULT_DWELL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// Parse `150ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit (write e.g. 200ms or 5s)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not an integer followed by a unit"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Ok(d)
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::parse(&file, &text)
    }

    /// Parse and validate YAML text; `file` is only used in messages.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| ConfigError::Yaml {
            file: file.into(),
            message: e.to_string(),
        })?;
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            file: file.into(),
            field: field.into(),
            message,
        };
        let dur = |field: &str, v: Option<&String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => match parse_duration(s) {
                Ok(d) if d.is_zero() => Err(invalid(field, "must be greater than 0".into())),
                Ok(d) => Ok(d),
                Err(m) => Err(invalid(field, m)),
            },
        };
        let addr = |field: &str, s: &str| {
            s.parse::<SocketAddr>().map_err(|_| {
                invalid(field, format!("{s:?} is not an IP:port (DNS names are not allowed: probes must not depend on a resolver)"))
            })
        };

        if raw.vehicle_id.is_empty()
            || raw.vehicle_id.len() > 128
            || !raw
                .vehicle_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(invalid(
                "vehicle_id",
                format!(
                    "{:?} must be 1..=128 characters of A-Z a-z 0-9 . _ -",
                    raw.vehicle_id
                ),
            ));
        }
        let control_plane: http::Uri = raw
            .control_plane
            .parse()
            .map_err(|e| invalid("control_plane", format!("{:?}: {e}", raw.control_plane)))?;
        if control_plane.scheme_str() != Some("http") || control_plane.authority().is_none() {
            return Err(invalid(
                "control_plane",
                format!("{:?} must be http://host:port", raw.control_plane),
            ));
        }
        let api = addr("api", &raw.api)?;
        if !api.ip().is_loopback() {
            return Err(invalid(
                "api",
                format!("{api} is not a loopback address: the local API has no authentication"),
            ));
        }
        if raw.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "must not be empty".into()));
        }
        let heartbeat_interval = dur(
            "heartbeat_interval",
            raw.heartbeat_interval.as_ref(),
            DEFAULT_HEARTBEAT,
        )?;

        if raw.probe.targets.is_empty() {
            return Err(invalid(
                "probe.targets",
                "needs at least one IP:port".into(),
            ));
        }
        let targets = raw
            .probe
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| addr(&format!("probe.targets[{i}]"), t))
            .collect::<Result<Vec<_>, _>>()?;
        let probe = ProbeConfig {
            interval: dur(
                "probe.interval",
                raw.probe.interval.as_ref(),
                DEFAULT_PROBE_INTERVAL,
            )?,
            timeout: dur(
                "probe.timeout",
                raw.probe.timeout.as_ref(),
                DEFAULT_PROBE_TIMEOUT,
            )?,
            window: match raw.probe.window {
                None => DEFAULT_WINDOW,
                Some(w @ 1..=1000) => w as usize,
                Some(w) => return Err(invalid("probe.window", format!("{w} is not in 1..=1000"))),
            },
        };
        let sel = raw.selection.as_ref();
        let selection = SelectionConfig {
            blackhole_after: match sel.and_then(|s| s.blackhole_after) {
                None => DEFAULT_BLACKHOLE_AFTER,
                Some(k) if k >= 1 && (k as usize) <= probe.window => k,
                Some(k) => {
                    return Err(invalid(
                        "selection.blackhole_after",
                        format!("{k} is not in 1..=probe.window ({})", probe.window),
                    ));
                }
            },
            dwell: dur(
                "selection.dwell",
                sel.and_then(|s| s.dwell.as_ref()),
                DEFAULT_DWELL,
            )?,
        };

        if raw.uplinks.is_empty() {
            return Err(invalid("uplinks", "needs at least one uplink".into()));
        }
        let mut uplinks = Vec::with_capacity(raw.uplinks.len());
        for (i, u) in raw.uplinks.iter().enumerate() {
            let field = |f: &str| format!("uplinks[{i}].{f}");
            if u.name.is_empty()
                || !u
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
            {
                return Err(invalid(
                    &field("name"),
                    format!("{:?} must be non-empty A-Z a-z 0-9 _ -", u.name),
                ));
            }
            // IFNAMSIZ is 16 including the NUL.
            if u.interface.is_empty() || u.interface.len() > 15 || u.interface.contains(['/', ' '])
            {
                return Err(invalid(
                    &field("interface"),
                    format!(
                        "{:?} is not a Linux interface name (1..=15 bytes, no '/' or spaces)",
                        u.interface
                    ),
                ));
            }
            if let Some(prev) = uplinks.iter().position(|p: &UplinkConfig| p.name == u.name) {
                return Err(invalid(
                    &field("name"),
                    format!("{:?} is already used by uplinks[{prev}]", u.name),
                ));
            }
            if let Some(prev) = uplinks
                .iter()
                .position(|p: &UplinkConfig| p.interface == u.interface)
            {
                return Err(invalid(
                    &field("interface"),
                    format!("{:?} is already used by uplinks[{prev}]", u.interface),
                ));
            }
            let probe_targets = match &u.probe_targets {
                None => targets.clone(),
                Some(ts) if ts.is_empty() => {
                    return Err(invalid(
                        &field("probe_targets"),
                        "must not be empty when given".into(),
                    ));
                }
                Some(ts) => ts
                    .iter()
                    .enumerate()
                    .map(|(j, t)| addr(&field(&format!("probe_targets[{j}]")), t))
                    .collect::<Result<Vec<_>, _>>()?,
            };
            uplinks.push(UplinkConfig {
                name: u.name.clone(),
                interface: u.interface.clone(),
                kind: u.kind,
                metered: u.metered,
                cost: u.cost,
                probe_targets,
            });
        }
        Ok(Config {
            vehicle_id: raw.vehicle_id,
            control_plane,
            api,
            state_dir: raw.state_dir,
            heartbeat_interval,
            uplinks,
            probe,
            selection,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
vehicle_id: car-0001
control_plane: http://198.18.0.1:18000
api: 127.0.0.1:9470
state_dir: /var/lib/misaki/edge-netd
uplinks:
  - name: wifi
    interface: wlan0
    kind: wifi
    cost: 1
  - name: lte
    interface: wwan0
    kind: lte
    metered: true
    cost: 10
    probe_targets: ["198.18.0.9:7"]
probe:
  targets: ["198.18.0.1:18001"]
  interval: 150ms
selection:
  dwell: 3s
"#;

    fn err(text: &str) -> String {
        Config::parse("t.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn a_good_config_parses_with_defaults_filled_in() {
        let c = Config::parse("t.yaml", GOOD).unwrap();
        assert_eq!(c.vehicle_id, "car-0001");
        assert_eq!(c.uplinks.len(), 2);
        assert_eq!(
            c.uplinks[0].probe_targets,
            vec!["198.18.0.1:18001".parse().unwrap()]
        );
        assert_eq!(
            c.uplinks[1].probe_targets,
            vec!["198.18.0.9:7".parse().unwrap()]
        );
        assert!(c.uplinks[1].metered);
        assert_eq!(c.probe.interval, Duration::from_millis(150));
        assert_eq!(c.probe.timeout, DEFAULT_PROBE_TIMEOUT);
        assert_eq!(c.probe.window, DEFAULT_WINDOW);
        assert_eq!(c.selection.dwell, Duration::from_secs(3));
        assert_eq!(c.selection.blackhole_after, 3);
        assert_eq!(c.heartbeat_interval, DEFAULT_HEARTBEAT);
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let e = err(&GOOD.replace("cost: 1\n", "cost: 1\n    colour: red\n"));
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            (GOOD.replace("wwan0", "wlan0"), "uplinks[1].interface"),
            (GOOD.replace("name: lte", "name: wifi"), "uplinks[1].name"),
            (GOOD.replace("127.0.0.1:9470", "0.0.0.0:9470"), "api"),
            (
                GOOD.replace("interval: 150ms", "interval: 150"),
                "probe.interval",
            ),
            (
                GOOD.replace("interval: 150ms", "interval: 0ms"),
                "probe.interval",
            ),
            (
                GOOD.replace("dwell: 3s", "dwell: 3 parsecs"),
                "selection.dwell",
            ),
            (
                GOOD.replace("198.18.0.1:18001", "cloud.example:7"),
                "probe.targets[0]",
            ),
            (
                GOOD.replace("http://198.18.0.1:18000", "198.18.0.1:18000"),
                "control_plane",
            ),
            (GOOD.replace("car-0001", "car 1"), "vehicle_id"),
            (
                GOOD.replace("interface: wlan0", "interface: averyveryverylongname"),
                "uplinks[0].interface",
            ),
            (
                GOOD.replace("dwell: 3s", "blackhole_after: 0"),
                "selection.blackhole_after",
            ),
        ];
        for (text, field) in cases {
            let e = err(&text);
            assert!(e.contains(&format!("t.yaml: {field}: ")), "{field}: {e}");
        }
    }

    #[test]
    fn unknown_uplink_kind_is_rejected() {
        let e = err(&GOOD.replace("kind: lte", "kind: carrier-pigeon"));
        assert!(e.contains("carrier-pigeon"), "{e}");
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
    }
}

#[cfg(test)]
mod example_file {
    #[test]
    fn the_documented_example_config_is_valid() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/edge-netd.yaml");
        let c = super::Config::load(&path).unwrap();
        assert_eq!(c.uplinks.len(), 3);
    }
}
