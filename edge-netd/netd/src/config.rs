//! edge-netd's YAML configuration: parsed strictly, validated once, here.
//!
//! Invariants:
//! - Unknown fields are errors (a typo must not silently fall back to a default).
//! - A [`Config`] value is always valid: at least one uplink, unique uplink names and
//!   interfaces, probe targets as `IP:port`, the local API and the store-and-forward
//!   ingest on loopback, durations > 0, sizes > 0 with `max_body` ≤ `budget`,
//!   destination URLs `http://host:port[/base]`.
//! - Every error names the field (`uplinks[1].interface`) and why.
//!
//! Durations are written `150ms`, `5s`, `2m` (an integer and a unit); sizes `65536`,
//! `64KiB`, `8MiB`, `1GiB` (binary units; `KB`/`MB`/`GB` are decimal).

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

/// Kind of an uplink: the mesh policy's own type, spelled as in policy files
/// (`lte`, `5g`, `3g`, `wifi`, `dsrc`, `lpwa`).
pub use misaki_policy::UplinkKind;

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
    #[serde(default)]
    store_forward: Option<RawStoreForward>,
    #[serde(default)]
    xds: Option<String>,
    #[serde(default)]
    factory_policy: Option<PathBuf>,
    #[serde(default)]
    cross_uplink_retry: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStoreForward {
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    queue_dir: Option<PathBuf>,
    #[serde(default)]
    budget: Option<String>,
    #[serde(default)]
    max_body: Option<String>,
    cloud_url: String,
    #[serde(default)]
    http_version: Option<HttpVersionName>,
    #[serde(default)]
    max_in_flight: Option<u32>,
    #[serde(default)]
    destinations: Option<std::collections::BTreeMap<String, RawDestination>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    url: String,
    #[serde(default)]
    http_version: Option<HttpVersionName>,
}

/// How the forwarder talks to a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersionName {
    /// HTTP/2 cleartext with prior knowledge (h2c): the cloud Envoy speaks it.
    Http2,
    Http1,
}

impl HttpVersionName {
    fn saf(self) -> misaki_saf::HttpVersion {
        match self {
            HttpVersionName::Http2 => misaki_saf::HttpVersion::Http2,
            HttpVersionName::Http1 => misaki_saf::HttpVersion::Http1,
        }
    }
}

/// Where one service's deferred messages go instead of `cloud_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationConfig {
    pub url: String,
    pub http_version: HttpVersionName,
}

/// The optional `store_forward:` section: the durable ingest endpoint and forwarder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreForwardConfig {
    /// Loopback address apps send deferrable requests to.
    pub listen: SocketAddr,
    /// Queue directory (default `<state_dir>/queue`); one edge-netd per directory.
    pub queue_dir: PathBuf,
    /// Bytes of queued messages kept at most; lower classes are evicted first.
    pub budget_bytes: u64,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// The cloud sidecar's `cloud_inbound` listener, `http://host:port`.
    pub cloud_url: String,
    pub http_version: HttpVersionName,
    /// Deliveries in flight at once.
    pub max_in_flight: usize,
    /// Per-service destinations overriding `cloud_url`.
    pub destinations: std::collections::BTreeMap<String, DestinationConfig>,
}

pub const DEFAULT_SAF_LISTEN: &str = "127.0.0.1:15080";
pub const DEFAULT_SAF_BUDGET: u64 = 512 << 20;
pub const DEFAULT_SAF_MAX_BODY: usize = 8 << 20;
pub const DEFAULT_SAF_MAX_IN_FLIGHT: usize = 64;

impl StoreForwardConfig {
    /// The store-and-forward runtime settings (timeouts and backoff at their defaults).
    pub fn saf_config(&self) -> misaki_saf::SafConfig {
        misaki_saf::SafConfig {
            destinations: self
                .destinations
                .iter()
                .map(|(n, d)| {
                    (
                        n.clone(),
                        misaki_saf::DestinationConfig::new(&d.url, d.http_version.saf()),
                    )
                })
                .collect(),
            default_destination: Some(misaki_saf::DestinationConfig::new(
                &self.cloud_url,
                self.http_version.saf(),
            )),
            max_body_bytes: self.max_body_bytes,
            max_in_flight: self.max_in_flight,
            ..misaki_saf::SafConfig::default()
        }
    }

    /// The queue settings (segment size, shares and group commit at their defaults).
    pub fn queue_config(&self) -> misaki_queue::QueueConfig {
        let mut q = misaki_queue::QueueConfig::new(&self.queue_dir);
        q.budget_bytes = self.budget_bytes;
        q.max_body_bytes = self.max_body_bytes;
        q
    }
}

/// Parse `65536`, `64KiB`, `8MiB`, `1GiB`, `500MB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not an integer optionally followed by a unit"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    name: String,
    interface: String,
    /// Checked against [`UplinkKind::ALL`] so the error names the field.
    kind: String,
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
    /// Store-and-forward; off when the section is absent.
    pub store_forward: Option<StoreForwardConfig>,
    /// Loopback address of the local xDS tier (ADS for the vehicle's sidecars);
    /// `xds: off` turns it off.
    pub xds: Option<SocketAddr>,
    /// A policy file shipped in the vehicle's image, used while nothing is stored.
    pub factory_policy: Option<PathBuf>,
    /// The vehicle Envoy retries a failed attempt over the class's next uplink
    /// (aggregate clusters), besides following the selection. On by default: it turned
    /// every request caught by a silent blackhole from a failure into a late success
    /// (bench/results-vehicle-loop.md).
    pub cross_uplink_retry: bool,
}

/// Where the local xDS tier listens unless `xds:` says otherwise.
pub const DEFAULT_XDS: &str = "127.0.0.1:15010";

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
            let kind = UplinkKind::ALL
                .iter()
                .find(|(spelling, _)| *spelling == u.kind)
                .map(|(_, k)| *k)
                .ok_or_else(|| {
                    let allowed = UplinkKind::ALL.map(|(s, _)| s).join(", ");
                    invalid(
                        &field("kind"),
                        format!(
                            "unknown uplink kind {:?}; expected one of: {allowed}",
                            u.kind
                        ),
                    )
                })?;
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
                kind,
                metered: u.metered,
                cost: u.cost,
                probe_targets,
            });
        }
        let store_forward = match &raw.store_forward {
            None => None,
            Some(sf) => {
                let listen = addr(
                    "store_forward.listen",
                    sf.listen.as_deref().unwrap_or(DEFAULT_SAF_LISTEN),
                )?;
                if !listen.ip().is_loopback() {
                    return Err(invalid(
                        "store_forward.listen",
                        format!(
                            "{listen} is not a loopback address: the ingest endpoint has no authentication"
                        ),
                    ));
                }
                if listen == api {
                    return Err(invalid(
                        "store_forward.listen",
                        format!("{listen} is also the local API's address"),
                    ));
                }
                let size = |field: &str, v: Option<&String>, default: u64| match v {
                    None => Ok(default),
                    Some(s) => match parse_size(s) {
                        Ok(0) => Err(invalid(field, "must be greater than 0".into())),
                        Ok(n) => Ok(n),
                        Err(m) => Err(invalid(field, m)),
                    },
                };
                let budget_bytes = size(
                    "store_forward.budget",
                    sf.budget.as_ref(),
                    DEFAULT_SAF_BUDGET,
                )?;
                let max_body = size(
                    "store_forward.max_body",
                    sf.max_body.as_ref(),
                    DEFAULT_SAF_MAX_BODY as u64,
                )?;
                if max_body > budget_bytes {
                    return Err(invalid(
                        "store_forward.max_body",
                        format!("{max_body} bytes is more than the budget ({budget_bytes} bytes)"),
                    ));
                }
                // The queue stores a body length as u32.
                if max_body > u64::from(u32::MAX) {
                    return Err(invalid(
                        "store_forward.max_body",
                        format!("{max_body} bytes is over 4 GiB"),
                    ));
                }
                let queue_dir = match &sf.queue_dir {
                    Some(d) if d.as_os_str().is_empty() => {
                        return Err(invalid(
                            "store_forward.queue_dir",
                            "must not be empty".into(),
                        ));
                    }
                    Some(d) => d.clone(),
                    None => raw.state_dir.join("queue"),
                };
                let max_in_flight = match sf.max_in_flight {
                    None => DEFAULT_SAF_MAX_IN_FLIGHT,
                    Some(n @ 1..=4096) => n as usize,
                    Some(n) => {
                        return Err(invalid(
                            "store_forward.max_in_flight",
                            format!("{n} is not in 1..=4096"),
                        ));
                    }
                };
                let mut destinations = std::collections::BTreeMap::new();
                for (name, d) in sf.destinations.iter().flatten() {
                    destinations.insert(
                        name.clone(),
                        DestinationConfig {
                            url: d.url.clone(),
                            http_version: d.http_version.unwrap_or(HttpVersionName::Http2),
                        },
                    );
                }
                let c = StoreForwardConfig {
                    listen,
                    queue_dir,
                    budget_bytes,
                    max_body_bytes: max_body as usize,
                    cloud_url: sf.cloud_url.clone(),
                    http_version: sf.http_version.unwrap_or(HttpVersionName::Http2),
                    max_in_flight,
                    destinations,
                };
                // Name the field of a bad URL: check each one on its own.
                let check = |field: String, url: &str| {
                    let one = misaki_saf::SafConfig {
                        default_destination: Some(misaki_saf::DestinationConfig::new(
                            url,
                            misaki_saf::HttpVersion::Http2,
                        )),
                        ..misaki_saf::SafConfig::default()
                    };
                    one.validate().map_err(|e| invalid(&field, e.to_string()))
                };
                check("store_forward.cloud_url".into(), &c.cloud_url)?;
                for (name, d) in &c.destinations {
                    check(format!("store_forward.destinations.{name}.url"), &d.url)?;
                }
                c.saf_config()
                    .validate()
                    .map_err(|e| invalid("store_forward", e.to_string()))?;
                Some(c)
            }
        };
        let xds = match raw.xds.as_deref().unwrap_or(DEFAULT_XDS) {
            "off" => None,
            text => {
                let xds = addr("xds", text)?;
                if !xds.ip().is_loopback() {
                    return Err(invalid(
                        "xds",
                        format!(
                            "{xds} is not a loopback address: the local xDS tier serves this vehicle's sidecars only"
                        ),
                    ));
                }
                let taken = [Some(api), store_forward.as_ref().map(|sf| sf.listen)];
                if taken.contains(&Some(xds)) {
                    return Err(invalid(
                        "xds",
                        format!("{xds} is also the local API's or the ingest's address"),
                    ));
                }
                Some(xds)
            }
        };
        if raw
            .factory_policy
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid("factory_policy", "must not be empty".into()));
        }
        Ok(Config {
            store_forward,
            xds,
            factory_policy: raw.factory_policy,
            cross_uplink_retry: raw.cross_uplink_retry.unwrap_or(true),
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

    const SAF: &str = "store_forward:\n  cloud_url: http://198.18.0.1:15443\n  budget: 64MiB\n  max_body: 1MiB\n  destinations:\n    logs: { url: \"http://198.18.0.7:8080/base\", http_version: http1 }\n";

    #[test]
    fn store_forward_is_off_by_default_and_parses_with_defaults() {
        assert!(
            Config::parse("t.yaml", GOOD)
                .unwrap()
                .store_forward
                .is_none()
        );
        let c = Config::parse("t.yaml", &format!("{GOOD}{SAF}")).unwrap();
        let sf = c.store_forward.unwrap();
        assert_eq!(sf.listen, DEFAULT_SAF_LISTEN.parse().unwrap());
        assert_eq!(sf.queue_dir, Path::new("/var/lib/misaki/edge-netd/queue"));
        assert_eq!(sf.budget_bytes, 64 << 20);
        assert_eq!(sf.max_body_bytes, 1 << 20);
        assert_eq!(sf.http_version, HttpVersionName::Http2);
        assert_eq!(sf.max_in_flight, DEFAULT_SAF_MAX_IN_FLIGHT);
        assert_eq!(sf.destinations["logs"].http_version, HttpVersionName::Http1);
        let saf = sf.saf_config();
        saf.validate().unwrap();
        assert_eq!(saf.destinations.len(), 1);
        assert_eq!(sf.queue_config().budget_bytes, 64 << 20);
    }

    #[test]
    fn invalid_store_forward_settings_name_the_field() {
        let g = format!("{GOOD}{SAF}");
        let cases = [
            (
                g.replace(
                    "cloud_url: http://198.18.0.1:15443",
                    "cloud_url: https://x:1",
                ),
                "store_forward.cloud_url",
            ),
            (
                g.replace("budget: 64MiB", "budget: 64 parsecs"),
                "store_forward.budget",
            ),
            (
                g.replace("budget: 64MiB", "budget: 0"),
                "store_forward.budget",
            ),
            (
                g.replace("max_body: 1MiB", "max_body: 1GiB"),
                "store_forward.max_body",
            ),
            (
                g.replace("budget: 64MiB", "budget: 64MiB\n  listen: 0.0.0.0:15080"),
                "store_forward.listen",
            ),
            (
                g.replace("budget: 64MiB", "budget: 64MiB\n  listen: 127.0.0.1:9470"),
                "store_forward.listen",
            ),
            (
                g.replace("\"http://198.18.0.7:8080/base\"", "\"ftp://x\""),
                "store_forward.destinations.logs.url",
            ),
            (
                g.replace("budget: 64MiB", "budget: 64MiB\n  max_in_flight: 0"),
                "store_forward.max_in_flight",
            ),
        ];
        for (text, field) in cases {
            let e = err(&text);
            assert!(e.contains(&format!("t.yaml: {field}: ")), "{field}: {e}");
        }
        let e = err(&g.replace("budget: 64MiB", "budget: 64MiB\n  colour: red"));
        assert!(e.contains("colour"), "{e}");
        let e = err(&format!("{GOOD}store_forward:\n  budget: 1MiB\n"));
        assert!(e.contains("cloud_url"), "{e}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("5 TiB").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }

    #[test]
    fn unknown_uplink_kind_is_rejected() {
        let e = err(&GOOD.replace("kind: lte", "kind: carrier-pigeon"));
        assert!(e.contains("carrier-pigeon"), "{e}");
        assert!(e.contains("uplinks[1].kind"), "{e}");
        assert!(e.contains("lte, 5g, 3g, wifi, dsrc, lpwa"), "{e}");
        // Spellings are exact, as in policy files.
        let e = err(&GOOD.replace("kind: lte", "kind: LTE"));
        assert!(e.contains("uplinks[1].kind"), "{e}");
    }

    #[test]
    fn every_policy_uplink_kind_spelling_is_accepted() {
        for (spelling, kind) in UplinkKind::ALL {
            let c = Config::parse(
                "t.yaml",
                &GOOD.replace("kind: lte", &format!("kind: {spelling}")),
            )
            .unwrap();
            assert_eq!(c.uplinks[1].kind, kind, "{spelling}");
        }
        let c = Config::parse("t.yaml", GOOD).unwrap();
        assert_eq!(c.uplinks[0].kind, UplinkKind::Wifi);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn the_local_xds_tier_is_on_by_default_on_loopback() {
        let c = Config::parse("c.yaml", GOOD).unwrap();
        assert_eq!(c.xds, Some(DEFAULT_XDS.parse().unwrap()));
        assert_eq!(c.factory_policy, None);
        assert!(c.cross_uplink_retry, "on by default");
        let c = Config::parse(
            "c.yaml",
            &format!("{GOOD}xds: off\nfactory_policy: /usr/share/misaki/mesh.yaml\n"),
        )
        .unwrap();
        assert_eq!(c.xds, None);
        assert_eq!(
            c.factory_policy.as_deref(),
            Some(Path::new("/usr/share/misaki/mesh.yaml"))
        );
        for (extra, needle) in [
            ("xds: 0.0.0.0:15010\n", "not a loopback address"),
            ("xds: 127.0.0.1:9470\n", "also the local API"),
            ("xds: nowhere\n", "xds"),
        ] {
            let e = Config::parse("c.yaml", &format!("{GOOD}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{extra}: {e}");
        }
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
        assert!(
            c.store_forward.is_some(),
            "the example documents store_forward"
        );
    }
}
