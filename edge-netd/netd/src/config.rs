//! edge-netd's YAML configuration: read strictly, validated once, here.
//!
//! Invariants:
//! - Unknown fields are errors (a typo must not silently fall back to a default).
//! - A [`Config`] value is always valid: at least one uplink, unique uplink names and
//!   interfaces, probe targets as `IP:port`, the local API and the store-and-forward
//!   ingest on loopback, durations > 0, sizes > 0 with `max_body` ≤ `budget`,
//!   destination URLs `http://host:port[/base]`; `control_plane` (one URL or a list, all
//!   of one scheme) is `https://` exactly
//!   when a `tls:` section is given, whose two written files (`cert`, `key`) are
//!   distinct from each other and from the files it only reads.
//! - Every problem in the file is reported at once, each as
//!   `file:line:column: field.path: what` (`edge-netd.yaml:12:16: uplinks[1].interface:
//!   "wlan0" is already used by uplinks[0]`), as the mesh policy's errors are.
//!
//! `sections` reads the file one section at a time with the mesh policy's YAML reader,
//! [`misaki_policy::located`], in its [`Dialect::AsWritten`](misaki_policy::located::Dialect)
//! dialect: scalars as written (`vehicle_id: 0001` is `0001`, not 1), integers that may be
//! quoted, YAML 1.1 booleans (`yes`/`no`/`on`/`off`). Durations and uplink kinds are the
//! mesh policy's own (`misaki_policy::parse_duration`, [`UplinkKind`]): `150ms`, `5s`,
//! `2m`, `1h`; `lte`, `5g`, `3g`, `wifi`, `dsrc`, `lpwa`. Sizes are `65536`, `64KiB`,
//! `8MiB`, `1GiB` (binary units; `KB`/`MB`/`GB` are decimal).

mod sections;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use misaki_policy::UplinkKind;
use misaki_policy::located::{Dialect, Reader};
use misaki_saf::{DestinationConfig, HttpVersion};

/// One problem in a config file, displayed as `file:line:column: path: message` (the
/// position left out for the whole file, e.g. when it is empty): the mesh policy's
/// located issue, one type for both.
pub type ConfigIssue = misaki_policy::located::Issue;

/// Why there is no [`Config`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// Every problem in the file, in file order; displayed one per line.
    #[error("{}", display_lines(.0))]
    Invalid(Vec<ConfigIssue>),
}

impl ConfigError {
    /// The problems found (none for a file that could not be read).
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid(issues) => issues,
        }
    }
}

fn display_lines(issues: &[ConfigIssue]) -> String {
    let lines: Vec<String> = issues.iter().map(ToString::to_string).collect();
    lines.join("\n")
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
    /// Towards `cloud_url` (`http2`, h2c with prior knowledge, or `http1`).
    pub http_version: HttpVersion,
    /// Deliveries in flight at once.
    pub max_in_flight: usize,
    /// Per-service destinations overriding `cloud_url`.
    pub destinations: BTreeMap<String, DestinationConfig>,
}

pub const DEFAULT_SAF_LISTEN: &str = "127.0.0.1:15080";
pub const DEFAULT_SAF_BUDGET: u64 = 512 << 20;
pub const DEFAULT_SAF_MAX_BODY: usize = 8 << 20;
pub const DEFAULT_SAF_MAX_IN_FLIGHT: usize = 64;

impl StoreForwardConfig {
    /// The store-and-forward runtime settings (timeouts and backoff at their defaults).
    pub fn saf_config(&self) -> misaki_saf::SafConfig {
        misaki_saf::SafConfig {
            destinations: self.destinations.clone(),
            default_destination: Some(DestinationConfig::new(&self.cloud_url, self.http_version)),
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

/// The `tls:` section: the vehicle's credential files for mutual TLS to misaki-cp
/// (docs/security.md). edge-netd writes `cert` and `key` (enrolment, renewal) and only
/// reads the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The operational certificate (PEM, leaf first), `spiffe://TD/vehicle/<vehicle_id>`.
    pub cert: PathBuf,
    /// Its private key (PKCS#8 PEM), mode 0600.
    pub key: PathBuf,
    /// The fleet CA (PEM) that misaki-cp's certificate must chain to. Provisioned at the
    /// factory, never written by edge-netd.
    pub ca: PathBuf,
    /// The factory claim credential, used to enrol while no usable certificate is held.
    pub claim: Option<ClaimConfig>,
}

/// A claim credential (`spiffe://TD/claim/<vehicle_id>`): certificate and key, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The optional `power:` section: where the vehicle's power manager writes its state
/// (`crate::power`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerConfig {
    /// A sysfs-style file: one word (`on`, `accessory`, `low`, `shutting_down`) or a
    /// battery percentage 0-100.
    pub file: PathBuf,
    /// How often the file is read.
    pub interval: Duration,
    /// A percentage below this is `low`.
    pub low_below: u8,
    /// A `low` vehicle is `on` again only above this percentage (≥ `low_below`).
    pub recover_above: u8,
}

pub const DEFAULT_POWER_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_LOW_BELOW: u8 = 20;
pub const DEFAULT_RECOVER_ABOVE: u8 = 30;

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
    /// `http://host:port` or (with `tls`) `https://host:port` of the control plane's
    /// gRPC port.
    /// The first of `control_planes`.
    pub control_plane: http::Uri,
    /// Every control-plane address (misaki-cp replicas), at least one, all of
    /// `control_plane`'s scheme: the reporter and enrolment use one at a time and move
    /// to the next (round robin) when it fails.
    pub control_planes: Vec<http::Uri>,
    /// Mutual TLS to the control plane; present exactly when `control_plane` is https.
    pub tls: Option<TlsConfig>,
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
    /// Where the local xDS tier (ADS for the vehicle's sidecars) listens.
    pub xds: XdsConfig,
    /// A policy file shipped in the vehicle's image, used while nothing is stored.
    pub factory_policy: Option<PathBuf>,
    /// The vehicle Envoy retries a failed attempt over the class's next uplink
    /// (aggregate clusters), besides following the selection. On by default: it turned
    /// every request caught by a silent blackhole from a failure into a late success
    /// (bench/results-vehicle-loop.md).
    pub cross_uplink_retry: bool,
    /// `power:`; without it the power state is `on` unless `PUT /power` says otherwise.
    pub power: Option<PowerConfig>,
}

/// Where the local xDS tier listens unless `xds:` says otherwise.
pub const DEFAULT_XDS: &str = "127.0.0.1:15010";

/// The local xDS tier's listeners: `xds: ADDR | off`, or
/// `xds: { listen: ADDR | off, socket: PATH, socket_group: NAME }`. Neither: off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsConfig {
    /// Loopback TCP. Any local process can connect, so the vehicle's certificate and
    /// key are never served here.
    pub listen: Option<SocketAddr>,
    /// A Unix socket, reachable only by whom its file permissions let in: the only
    /// listener that serves the vehicle's credential (SDS) to its Envoy.
    pub socket: Option<XdsSocket>,
}

impl XdsConfig {
    /// The default: loopback TCP at [`DEFAULT_XDS`], no socket.
    pub fn tcp(addr: SocketAddr) -> Self {
        XdsConfig {
            listen: Some(addr),
            socket: None,
        }
    }

    pub fn off() -> Self {
        XdsConfig {
            listen: None,
            socket: None,
        }
    }
}

/// The local xDS tier's Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsSocket {
    pub path: PathBuf,
    /// Group that may connect (file mode 0660, this group); `None`: mode 0600, only
    /// edge-netd's own user.
    pub group: Option<String>,
}

pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(100);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(200);
pub const DEFAULT_WINDOW: usize = 20;
pub const DEFAULT_BLACKHOLE_AFTER: u32 = 3;
pub const DEFAULT_DWELL: Duration = Duration::from_secs(5);
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

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

    /// Parse and validate YAML text, reporting every problem; `file` is only used in
    /// messages.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let mut r = Reader::new(file, Dialect::AsWritten);
        let config = sections::root(&mut r, text).and_then(|root| sections::config(&mut r, &root));
        match config {
            Some(c) if r.is_clean() => Ok(c),
            _ => Err(ConfigError::Invalid(r.into_issues())),
        }
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

    /// The problems of `text`, which must not parse.
    fn issues(text: &str) -> Vec<ConfigIssue> {
        Config::parse("t.yaml", text).unwrap_err().issues().to_vec()
    }

    /// `text` fails with a problem at `field`, placed in the file
    /// (`t.yaml:L:C: field: ...`).
    fn assert_names(text: &str, field: &str) {
        let all = issues(text);
        let found = all.iter().find(|i| i.path == field);
        assert!(
            found.is_some_and(|i| i.line > 0 && i.column > 0),
            "{field}: {all:#?}"
        );
        let shown = found.unwrap().to_string();
        let prefix = format!(
            "t.yaml:{}:{}: {field}: ",
            found.unwrap().line,
            found.unwrap().column
        );
        assert!(shown.starts_with(&prefix), "{shown}");
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
        assert_each_names(
            GOOD,
            &[
                ("wwan0", "wlan0", "uplinks[1].interface"),
                ("name: lte", "name: wifi", "uplinks[1].name"),
                ("127.0.0.1:9470", "0.0.0.0:9470", "api"),
                ("interval: 150ms", "interval: 150", "probe.interval"),
                ("interval: 150ms", "interval: 0ms", "probe.interval"),
                ("dwell: 3s", "dwell: 3 parsecs", "selection.dwell"),
                ("198.18.0.1:18001", "cloud.example:7", "probe.targets[0]"),
                (
                    "http://198.18.0.1:18000",
                    "198.18.0.1:18000",
                    "control_plane",
                ),
                ("car-0001", "car 1", "vehicle_id"),
                (
                    "interface: wlan0",
                    "interface: averyveryverylongname",
                    "uplinks[0].interface",
                ),
                (
                    "dwell: 3s",
                    "blackhole_after: 0",
                    "selection.blackhole_after",
                ),
            ],
        );
    }

    /// Each edit (`from` → `to`) of `base` fails naming `field`.
    fn assert_each_names(base: &str, edits: &[(&str, &str, &str)]) {
        for (from, to, field) in edits {
            assert!(base.contains(from), "{from}");
            assert_names(&base.replace(from, to), field);
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
        assert_eq!(sf.http_version, HttpVersion::Http2);
        assert_eq!(sf.max_in_flight, DEFAULT_SAF_MAX_IN_FLIGHT);
        assert_eq!(sf.destinations["logs"].version, HttpVersion::Http1);
        let saf = sf.saf_config();
        saf.validate().unwrap();
        assert_eq!(saf.destinations.len(), 1);
        assert_eq!(sf.queue_config().budget_bytes, 64 << 20);
    }

    #[test]
    fn invalid_store_forward_settings_name_the_field() {
        let g = format!("{GOOD}{SAF}");
        let listen = |addr: &str| format!("budget: 64MiB\n  listen: {addr}");
        assert_each_names(
            &g,
            &[
                (
                    "cloud_url: http://198.18.0.1:15443",
                    "cloud_url: ftp://x:1",
                    "store_forward.cloud_url",
                ),
                (
                    "budget: 64MiB",
                    "budget: 64 parsecs",
                    "store_forward.budget",
                ),
                ("budget: 64MiB", "budget: 0", "store_forward.budget"),
                ("max_body: 1MiB", "max_body: 1GiB", "store_forward.max_body"),
                (
                    "budget: 64MiB",
                    &listen("0.0.0.0:15080"),
                    "store_forward.listen",
                ),
                (
                    "budget: 64MiB",
                    &listen("127.0.0.1:9470"),
                    "store_forward.listen",
                ),
                (
                    "\"http://198.18.0.7:8080/base\"",
                    "\"ftp://x\"",
                    "store_forward.destinations.logs.url",
                ),
                (
                    "budget: 64MiB",
                    "budget: 64MiB\n  max_in_flight: 0",
                    "store_forward.max_in_flight",
                ),
            ],
        );
        let e = err(&g.replace("budget: 64MiB", "budget: 64MiB\n  colour: red"));
        assert!(e.contains("colour"), "{e}");
        let e = err(&format!("{GOOD}store_forward:\n  budget: 1MiB\n"));
        assert!(e.contains("cloud_url"), "{e}");
    }

    const TLS: &str = "tls:\n  cert: /var/lib/misaki/tls/cert.pem\n  key: /var/lib/misaki/tls/key.pem\n  ca: /etc/misaki/ca.pem\n  claim_cert: /etc/misaki/claim/cert.pem\n  claim_key: /etc/misaki/claim/key.pem\n";

    /// GOOD over https with the `tls:` section.
    fn good_tls() -> String {
        let https = GOOD.replace("http://198.18.0.1:18000", "https://cp.fleet.example:18000");
        format!("{https}{TLS}")
    }

    const CP: &str = "control_plane: http://198.18.0.1:18000\n";

    #[test]
    fn control_plane_is_one_url_or_a_list() {
        let one = Config::parse("t.yaml", GOOD).unwrap();
        assert_eq!(one.control_planes, vec![one.control_plane.clone()]);
        let list = GOOD.replace(
            CP,
            "control_plane: [http://198.18.0.1:18000, http://198.18.0.2:18000]\n",
        );
        let c = Config::parse("t.yaml", &list).unwrap();
        let shown: Vec<String> = c.control_planes.iter().map(|u| u.to_string()).collect();
        assert_eq!(
            shown,
            ["http://198.18.0.1:18000/", "http://198.18.0.2:18000/"]
        );
        assert_eq!(c.control_plane, c.control_planes[0]);
        // A block list, over TLS: `tls:` goes with every address.
        let block = good_tls().replace(
            "control_plane: https://cp.fleet.example:18000\n",
            "control_plane:\n  - https://cp-a.fleet.example:18000\n  - https://cp-b.fleet.example:18000\n",
        );
        let c = Config::parse("t.yaml", &block).unwrap();
        assert_eq!(c.control_planes.len(), 2);
        assert!(c.tls.is_some());
    }

    #[test]
    fn control_plane_list_problems_are_located() {
        let bad = GOOD.replace(
            CP,
            "control_plane: [http://198.18.0.1:18000, 198.18.0.2:18000]\n",
        );
        assert_names(&bad, "control_plane[1]");
        let mixed = GOOD.replace(
            CP,
            "control_plane:\n  - http://198.18.0.1:18000\n  - https://198.18.0.2:18000\n",
        );
        assert_names(&mixed, "control_plane[1]");
        let e = err(&mixed);
        assert!(e.contains("t.yaml:5:5: control_plane[1]: "), "{e}");
        assert!(e.contains("share one scheme"), "{e}");
        assert_names(&GOOD.replace(CP, "control_plane: []\n"), "control_plane");
        // The tls check follows the list's scheme.
        let tls_with_http = format!(
            "{}{TLS}",
            GOOD.replace(CP, "control_plane: [http://a:1, http://b:1]\n")
        );
        assert_names(&tls_with_http, "control_plane");
    }

    #[test]
    fn tls_goes_with_an_https_control_plane() {
        assert_eq!(Config::parse("t.yaml", GOOD).unwrap().tls, None);
        let c = Config::parse("t.yaml", &good_tls()).unwrap();
        assert_eq!(c.control_plane.scheme_str(), Some("https"));
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert, Path::new("/var/lib/misaki/tls/cert.pem"));
        assert_eq!(tls.key, Path::new("/var/lib/misaki/tls/key.pem"));
        assert_eq!(tls.ca, Path::new("/etc/misaki/ca.pem"));
        let claim = tls.claim.unwrap();
        assert_eq!(
            (claim.cert.as_path(), claim.key.as_path()),
            (
                Path::new("/etc/misaki/claim/cert.pem"),
                Path::new("/etc/misaki/claim/key.pem")
            )
        );
        // The claim is optional.
        let no_claim = good_tls()
            .replace("  claim_cert: /etc/misaki/claim/cert.pem\n", "")
            .replace("  claim_key: /etc/misaki/claim/key.pem\n", "");
        let c = Config::parse("t.yaml", &no_claim).unwrap();
        assert_eq!(c.tls.unwrap().claim, None);
    }

    #[test]
    fn tls_problems_are_all_reported_at_their_field() {
        // https without tls: at `tls`; tls with http: at `control_plane`.
        let https = GOOD.replace("http://198.18.0.1:18000", "https://198.18.0.1:18000");
        assert_names(&https, "tls");
        let e = err(&https);
        assert!(e.contains("missing required section `tls`"), "{e}");
        assert_names(&format!("{GOOD}{TLS}"), "control_plane");
        let e = err(&format!("{GOOD}{TLS}"));
        assert!(e.contains("must be https://"), "{e}");
        assert_each_names(
            &good_tls(),
            &[
                ("  ca: /etc/misaki/ca.pem\n", "", "tls.ca"),
                ("  cert: /var/lib/misaki/tls/cert.pem\n", "", "tls.cert"),
                (
                    "  claim_key: /etc/misaki/claim/key.pem\n",
                    "",
                    "tls.claim_key",
                ),
                (
                    "  claim_cert: /etc/misaki/claim/cert.pem\n",
                    "",
                    "tls.claim_cert",
                ),
                ("claim_key: ", "claim_kye: ", "tls.claim_kye"),
                // edge-netd writes cert and key: never over a file it only reads.
                (
                    "ca: /etc/misaki/ca.pem",
                    "ca: /var/lib/misaki/tls/cert.pem",
                    "tls.cert",
                ),
                (
                    "key: /var/lib/misaki/tls/key.pem",
                    "key: /etc/misaki/claim/key.pem",
                    "tls.key",
                ),
                (
                    "key: /var/lib/misaki/tls/key.pem",
                    "key: /var/lib/misaki/tls/cert.pem",
                    "tls.key",
                ),
                (
                    "https://cp.fleet.example:18000",
                    "ftp://cp:1",
                    "control_plane",
                ),
            ],
        );
        // Every problem at once: a bad claim and a missing ca in one go.
        let text = good_tls()
            .replace("  ca: /etc/misaki/ca.pem\n", "")
            .replace("  claim_key: /etc/misaki/claim/key.pem\n", "")
            .replace("interval: 150ms", "interval: 0ms");
        let paths: Vec<String> = issues(&text).into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            ["probe.interval", "tls.ca", "tls.claim_key"],
            "{paths:?}"
        );
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

    const POWER: &str = "power:\n  file: /run/vehicle/power\n";

    #[test]
    fn power_is_optional_and_parses_with_defaults() {
        assert_eq!(Config::parse("t.yaml", GOOD).unwrap().power, None);
        let c = Config::parse("t.yaml", &format!("{GOOD}{POWER}")).unwrap();
        assert_eq!(
            c.power,
            Some(PowerConfig {
                file: PathBuf::from("/run/vehicle/power"),
                interval: DEFAULT_POWER_INTERVAL,
                low_below: 20,
                recover_above: 30,
            })
        );
        let text = format!("{GOOD}{POWER}  interval: 5s\n  low_below: 10\n  recover_above: 10\n");
        let p = Config::parse("t.yaml", &text).unwrap().power.unwrap();
        assert_eq!(
            (p.interval, p.low_below, p.recover_above),
            (Duration::from_secs(5), 10, 10)
        );
    }

    #[test]
    fn power_problems_are_all_reported_at_their_field() {
        let g = format!("{GOOD}{POWER}  interval: 2s\n  low_below: 20\n  recover_above: 30\n");
        assert_each_names(
            &g,
            &[
                ("interval: 2s", "interval: 0s", "power.interval"),
                ("low_below: 20", "low_below: 101", "power.low_below"),
                ("low_below: 20", "low_below: -1", "power.low_below"),
                (
                    "recover_above: 30",
                    "recover_above: many",
                    "power.recover_above",
                ),
                (
                    "recover_above: 30",
                    "recover_above: 10",
                    "power.recover_above",
                ),
                ("  file: /run/vehicle/power\n", "", "power.file"),
                ("file: /run/vehicle/power", "file: \"\"", "power.file"),
                ("low_below: 20", "low_belwo: 20", "power.low_belwo"),
            ],
        );
        let e = err(&g.replace("recover_above: 30", "recover_above: 10"));
        assert!(e.contains("below power.low_below (20)"), "{e}");
        // All at once, with the rest of the file's.
        let text = g
            .replace("  file: /run/vehicle/power\n", "")
            .replace("low_below: 20", "low_below: 200")
            .replace("dwell: 3s", "dwell: 3 parsecs");
        let paths: Vec<String> = issues(&text).into_iter().map(|i| i.path).collect();
        assert_eq!(
            paths,
            ["selection.dwell", "power.file", "power.low_below"],
            "{paths:?}"
        );
    }

    #[test]
    fn durations_are_the_policys() {
        let c = Config::parse("t.yaml", &GOOD.replace("dwell: 3s", "dwell: 2m")).unwrap();
        assert_eq!(c.selection.dwell, Duration::from_secs(120));
        for bad in ["ms", "5", "5d", "1.5s"] {
            let text = GOOD.replace("dwell: 3s", &format!("dwell: {bad}"));
            let i = issues(&text);
            let want = misaki_policy::parse_duration(bad).unwrap_err().to_string();
            assert_eq!(
                (i.len(), i[0].path.as_str(), i[0].message.as_str()),
                (1, "selection.dwell", want.as_str()),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_at_once_in_file_order() {
        let text = GOOD
            .replace("car-0001", "car 1")
            .replace("kind: lte", "kind: carrier-pigeon")
            .replace("cost: 1\n", "cost: 1\n    colour: red\n")
            .replace("interval: 150ms", "interval: 150");
        let all = issues(&text);
        let shown: Vec<String> = all.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "t.yaml:2:13: vehicle_id: \"car 1\" must be 1..=128 characters of A-Z a-z 0-9 . _ -",
                "t.yaml:11:5: uplinks[0].colour: unknown field `colour`; allowed fields here: \
                 name, interface, kind, metered, cost, probe_targets",
                "t.yaml:14:11: uplinks[1].kind: unknown uplink kind \"carrier-pigeon\"; \
                 expected one of: lte, 5g, 3g, wifi, dsrc, lpwa",
                "t.yaml:20:13: probe.interval: `150` has no unit; add one of ms, s, m, h (e.g. `150s`)",
            ]
        );
        // One per line, as main prints them.
        assert_eq!(err(&text), shown.join("\n"));
    }

    #[test]
    fn a_duplicate_uplink_is_found_even_when_the_uplink_has_other_faults() {
        let text = GOOD
            .replace("interface: wwan0", "interface: wlan0")
            .replace("kind: lte", "kind: lt");
        let paths: Vec<String> = issues(&text).into_iter().map(|i| i.path).collect();
        assert_eq!(paths, ["uplinks[1].interface", "uplinks[1].kind"]);
    }

    #[test]
    fn a_missing_field_is_reported_where_its_mapping_starts() {
        let all = issues(&GOOD.replace("    interface: wwan0\n", ""));
        assert_eq!(all.len(), 1, "{all:#?}");
        assert_eq!(
            all[0].to_string(),
            "t.yaml:11:5: uplinks[1].interface: missing required field `interface` \
             (a Linux interface name)"
        );
        let all = issues("vehicle_id: car-1\n");
        let paths: Vec<&str> = all.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            ["control_plane", "api", "state_dir", "probe", "uplinks"]
        );
    }

    #[test]
    fn scalars_keep_the_spellings_accepted_before() {
        // Text stays as written; integers may be quoted; YAML 1.1 booleans.
        let text = GOOD
            .replace("car-0001", "0001")
            .replace("cost: 10", "cost: \"10\"")
            .replace("metered: true", "metered: yes");
        let c = Config::parse("t.yaml", &text).unwrap();
        assert_eq!(c.vehicle_id, "0001");
        assert_eq!((c.uplinks[1].cost, c.uplinks[1].metered), (10, true));
        let c = Config::parse("t.yaml", &format!("{GOOD}cross_uplink_retry: off\nxds:\n")).unwrap();
        assert!(!c.cross_uplink_retry);
        assert_eq!(
            c.xds,
            XdsConfig::tcp(DEFAULT_XDS.parse().unwrap()),
            "empty is absent"
        );
    }

    #[test]
    fn broken_yaml_and_empty_files_are_located_problems() {
        let i = issues("vehicle_id: [car\n");
        assert_eq!(i.len(), 1);
        assert!(i[0].message.starts_with("invalid YAML"), "{i:?}");
        assert!(i[0].line > 0, "{i:?}");
        let i = issues(&format!("{GOOD}api: 127.0.0.1:1\n"));
        assert!(i[0].message.contains("duplicated key"), "{i:?}");
        assert_eq!(err(""), "t.yaml: the file is empty; expected a mapping");
        assert_eq!(issues(&format!("{GOOD}---\nvehicle_id: x\n")).len(), 1);
        assert!(err("- a list\n").contains("expected a mapping, found a list"));
    }

    #[test]
    fn the_local_xds_tier_may_listen_on_a_unix_socket_instead() {
        let c = Config::parse(
            "c.yaml",
            &format!("{GOOD}xds: {{ socket: /run/misaki/xds.sock, socket_group: misaki-xds }}\n"),
        )
        .unwrap();
        let socket = XdsSocket {
            path: "/run/misaki/xds.sock".into(),
            group: Some("misaki-xds".into()),
        };
        assert_eq!(
            c.xds,
            XdsConfig {
                listen: None,
                socket: Some(socket.clone()),
            },
            "a mapping without `listen` has no TCP listener"
        );
        let c = Config::parse(
            "c.yaml",
            &format!("{GOOD}xds:\n  listen: 127.0.0.1:15010\n  socket: /run/misaki/xds.sock\n"),
        )
        .unwrap();
        assert_eq!(c.xds.listen, Some(DEFAULT_XDS.parse().unwrap()));
        assert_eq!(c.xds.socket.unwrap().group, None);
    }

    #[test]
    fn the_local_xds_tier_is_on_by_default_on_loopback() {
        let c = Config::parse("c.yaml", GOOD).unwrap();
        assert_eq!(c.xds, XdsConfig::tcp(DEFAULT_XDS.parse().unwrap()));
        assert_eq!(c.factory_policy, None);
        assert!(c.cross_uplink_retry, "on by default");
        let c = Config::parse(
            "c.yaml",
            &format!("{GOOD}xds: off\nfactory_policy: /usr/share/misaki/mesh.yaml\n"),
        )
        .unwrap();
        assert_eq!(c.xds, XdsConfig::off());
        assert_eq!(
            c.factory_policy.as_deref(),
            Some(Path::new("/usr/share/misaki/mesh.yaml"))
        );
        for (extra, needle) in [
            ("xds: 0.0.0.0:15010\n", "not a loopback address"),
            ("xds: 127.0.0.1:9470\n", "also the local API"),
            ("xds: nowhere\n", "xds"),
            ("xds: { socket: \"\" }\n", "xds.socket"),
            ("xds: { socket: run/xds.sock }\n", "absolute"),
            (
                "xds: { listen: 0.0.0.0:1, socket: /run/x.sock }\n",
                "xds.listen",
            ),
            (
                "xds: { socket: /run/x.sock, group: misaki }\n",
                "unknown field `group`",
            ),
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
        let tls = c.tls.expect("the example documents tls");
        assert!(tls.claim.is_some(), "and the claim credential");
    }
}
