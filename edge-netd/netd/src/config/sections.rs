//! The config file, section by section: each function reads one section, records
//! every problem it finds, and returns what it could read. Cross-section checks (a
//! port used twice, `blackhole_after` against `probe.window`) run where the later
//! section is read, against what the earlier ones gave.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use misaki_saf::{DestinationConfig, HttpVersion, SafConfig};

use misaki_policy::located::{ErrorKind, Fields, Node, Reader, is_mapping};

use super::{
    ClaimConfig, Config, DEFAULT_BLACKHOLE_AFTER, DEFAULT_DWELL, DEFAULT_HEARTBEAT,
    DEFAULT_LOW_BELOW, DEFAULT_POWER_INTERVAL, DEFAULT_PROBE_INTERVAL, DEFAULT_PROBE_TIMEOUT,
    DEFAULT_RECOVER_ABOVE, DEFAULT_SAF_BUDGET, DEFAULT_SAF_LISTEN, DEFAULT_SAF_MAX_BODY,
    DEFAULT_SAF_MAX_IN_FLIGHT, DEFAULT_WINDOW, DEFAULT_XDS, PowerConfig, ProbeConfig,
    SelectionConfig, StoreForwardConfig, TlsConfig, UplinkConfig, XdsConfig, XdsSocket, parse_size,
};

const TOP: &[&str] = &[
    "vehicle_id",
    "control_plane",
    "api",
    "state_dir",
    "heartbeat_interval",
    "uplinks",
    "probe",
    "selection",
    "store_forward",
    "xds",
    "factory_policy",
    "cross_uplink_retry",
    "tls",
    "power",
];
const POWER: &[&str] = &["file", "interval", "low_below", "recover_above"];
const TLS: &[&str] = &["cert", "key", "ca", "claim_cert", "claim_key"];
const XDS: &[&str] = &["listen", "socket", "socket_group"];
const UPLINK: &[&str] = &[
    "name",
    "interface",
    "kind",
    "metered",
    "cost",
    "probe_targets",
];
const PROBE: &[&str] = &["targets", "interval", "timeout", "window"];
const SELECTION: &[&str] = &["blackhole_after", "dwell"];
const STORE_FORWARD: &[&str] = &[
    "listen",
    "queue_dir",
    "budget",
    "max_body",
    "cloud_url",
    "http_version",
    "max_in_flight",
    "destinations",
];
const DESTINATION: &[&str] = &["url", "http_version"];
const HTTP_VERSIONS: [(&str, HttpVersion); 2] =
    [("http2", HttpVersion::Http2), ("http1", HttpVersion::Http1)];

/// The one document of `text`; `None` (the reader says why) if it is not YAML, or empty.
pub(super) fn root<'y>(r: &mut Reader, text: &'y str) -> Option<Node<'y>> {
    let loaded = r.load(text)?;
    let Some(doc) = loaded.document else {
        let message = "the file is empty; expected a mapping";
        r.error_at(0, 0, "", ErrorKind::Structure, message);
        return None;
    };
    if let Some(extra) = &loaded.second {
        let message = "a config file holds one YAML document; remove the `---`";
        r.error(extra, "", ErrorKind::Structure, message);
    }
    Some(doc)
}

/// The whole file; `None` when anything is missing or wrong (the reader says what).
pub(super) fn config(r: &mut Reader, root: &Node<'_>) -> Option<Config> {
    let f = r.map(root, "", "a mapping", TOP)?;
    let vehicle_id = f
        .required(r, "vehicle_id", "the vehicle's id in the fleet")
        .and_then(|n| vehicle_id(r, n));
    let control_planes = f
        .required(
            r,
            "control_plane",
            "http(s)://host:port of misaki-cp, or a list of them",
        )
        .and_then(|n| control_planes(r, n));
    let tls = tls(r, &f, control_planes.as_ref().map(|c| &c[0]));
    let api = f
        .required(r, "api", "a loopback IP:port")
        .and_then(|n| loopback(r, n, "api", "the local API has no authentication"));
    let state_dir = f
        .required(r, "state_dir", "a directory")
        .and_then(|n| r.nonempty(n, "state_dir"))
        .map(PathBuf::from);
    let heartbeat_interval = f.or(r, "heartbeat_interval", DEFAULT_HEARTBEAT, Reader::duration);
    let probe = f
        .required(r, "probe", "a mapping with `targets`")
        .and_then(|n| probe(r, n));
    let window = probe.as_ref().map_or(DEFAULT_WINDOW, |(p, _)| p.window);
    let selection = selection(r, f.get("selection"), window);
    let uplinks = f
        .required(r, "uplinks", "a list of uplinks")
        .and_then(|n| uplinks(r, n, probe.as_ref().map(|(_, t)| t.as_slice())));
    let store_forward = match f.get("store_forward") {
        Some(n) => store_forward(r, n, api, state_dir.as_deref()).map(Some),
        None => Some(None),
    };
    let saf_listen = store_forward
        .as_ref()
        .and_then(|sf| sf.as_ref().map(|s| s.listen));
    let xds = xds(r, f.get("xds"), [api, saf_listen]);
    let factory_policy = match f.get("factory_policy") {
        Some(n) => r
            .nonempty(n, "factory_policy")
            .map(|p| Some(PathBuf::from(p))),
        None => Some(None),
    };
    let cross_uplink_retry = f.or(r, "cross_uplink_retry", true, Reader::boolean);
    let power = match f.get("power") {
        Some(n) => power(r, n).map(Some),
        None => Some(None),
    };
    Some(Config {
        vehicle_id: vehicle_id?,
        control_plane: control_planes.as_ref().map(|c| c[0].clone())?,
        control_planes: control_planes?,
        tls: tls?,
        api: api?,
        state_dir: state_dir?,
        heartbeat_interval,
        uplinks: uplinks?,
        probe: probe?.0,
        selection,
        store_forward: store_forward?,
        xds: xds?,
        factory_policy: factory_policy?,
        cross_uplink_retry,
        power: power?,
    })
}

/// `power:`: the power manager's file, how often it is read, and the percentage
/// thresholds (`low_below` ≤ `recover_above`).
fn power(r: &mut Reader, node: &Node<'_>) -> Option<PowerConfig> {
    let f = r.map(node, "power", "a mapping with `file`", POWER)?;
    let file = f
        .required(
            r,
            "file",
            "the file the power manager writes (a word or a percentage)",
        )
        .and_then(|n| r.nonempty(n, "power.file"))
        .map(PathBuf::from);
    let interval = f.or(r, "interval", DEFAULT_POWER_INTERVAL, Reader::duration);
    let percent = |r: &mut Reader, n: &Node<'_>, p: &str| r.int(n, p, 0..=100).map(|v| v as u8);
    let low_below = f.or(r, "low_below", DEFAULT_LOW_BELOW, percent);
    let recover_above = f.or(r, "recover_above", DEFAULT_RECOVER_ABOVE, percent);
    if recover_above < low_below {
        let message = format!(
            "{recover_above} is below power.low_below ({low_below}): a low vehicle would \
             never recover"
        );
        let path = f.path("recover_above");
        r.error(f.at("recover_above"), &path, ErrorKind::Conflict, message);
        return None;
    }
    Some(PowerConfig {
        file: file?,
        interval,
        low_below,
        recover_above,
    })
}

fn vehicle_id(r: &mut Reader, node: &Node<'_>) -> Option<String> {
    let id = r.text(node, "vehicle_id", "the vehicle's id")?;
    let ok = (1..=128).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        let message = format!("{id:?} must be 1..=128 characters of A-Z a-z 0-9 . _ -");
        r.error(node, "vehicle_id", ErrorKind::InvalidValue, message);
    }
    ok.then(|| id.to_owned())
}

/// `control_plane:`, one URL or a non-empty list of them (misaki-cp replicas, tried in
/// turn); all of one scheme, so `tls:` applies to every one.
fn control_planes(r: &mut Reader, node: &Node<'_>) -> Option<Vec<http::Uri>> {
    if !node.data.is_sequence() {
        return control_plane(r, node, "control_plane").map(|u| vec![u]);
    }
    let items = r.seq(node, "control_plane", "a list of URLs")?;
    if items.is_empty() {
        let message = "needs at least one http(s)://host:port";
        r.error(node, "control_plane", ErrorKind::InvalidValue, message);
        return None;
    }
    let read: Vec<Option<http::Uri>> = items
        .iter()
        .enumerate()
        .map(|(i, item)| control_plane(r, item, &format!("control_plane[{i}]")))
        .collect();
    let uris: Vec<http::Uri> = read.into_iter().collect::<Option<_>>()?;
    let first = uris[0].scheme_str();
    if let Some(i) = uris.iter().position(|u| u.scheme_str() != first) {
        let message = format!(
            "is {}:// but control_plane[0] is {}://: all control planes share one scheme \
             (and `tls:`)",
            uris[i].scheme_str().unwrap_or(""),
            first.unwrap_or("")
        );
        let path = format!("control_plane[{i}]");
        r.error(&items[i], &path, ErrorKind::Conflict, message);
        return None;
    }
    Some(uris)
}

fn control_plane(r: &mut Reader, node: &Node<'_>, path: &str) -> Option<http::Uri> {
    let text = r.text(node, path, "http://host:port or https://host:port")?;
    let problem = match text.parse::<http::Uri>() {
        Err(e) => format!("{text:?}: {e}"),
        Ok(uri)
            if matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some() =>
        {
            return Some(uri);
        }
        Ok(_) => format!("{text:?} must be http://host:port or https://host:port"),
    };
    r.error(node, path, ErrorKind::InvalidValue, problem);
    None
}

/// `tls:`, which goes with an `https://` control plane (`None` if either is wrong):
/// without it the certificate would go nowhere, and https without it has no identity
/// to present.
fn tls(
    r: &mut Reader,
    top: &Fields<'_, '_>,
    control_plane: Option<&http::Uri>,
) -> Option<Option<TlsConfig>> {
    let https = control_plane.map(|u| u.scheme_str() == Some("https"));
    let Some(node) = top.get("tls") else {
        if https == Some(true) {
            let message = "missing required section `tls` (cert, key, ca): an https:// \
                           control plane needs the vehicle's credential and the fleet CA";
            r.error(top.at("tls"), "tls", ErrorKind::MissingField, message);
            return None;
        }
        return Some(None);
    };
    if https == Some(false) {
        let message = "must be https://host:port when `tls:` is given (http:// would not use it)";
        r.error(
            top.at("control_plane"),
            "control_plane",
            ErrorKind::Conflict,
            message,
        );
    }
    let f = r.map(node, "tls", "a mapping", TLS)?;
    let file = |r: &mut Reader, field: &str, hint: &str| {
        f.required(r, field, hint)
            .and_then(|n| r.nonempty(n, &f.path(field)))
            .map(PathBuf::from)
    };
    let cert = file(
        r,
        "cert",
        "where the vehicle's certificate is (and will be) kept",
    );
    let key = file(r, "key", "where its private key is (and will be) kept");
    let ca = file(r, "ca", "the fleet CA certificate, PEM");
    let claim = claim(r, &f);
    let (cert, key, ca, claim) = (cert?, key?, ca?, claim?);
    // The two files edge-netd writes must not be each other or a file it only reads.
    let mut read_only = vec![("ca", &ca)];
    if let Some(c) = &claim {
        read_only.extend([("claim_cert", &c.cert), ("claim_key", &c.key)]);
    }
    let mut ok = true;
    for (field, written, also) in [("cert", &cert, None), ("key", &key, Some(("cert", &cert)))] {
        for (name, path) in read_only.iter().copied().chain(also) {
            if written == path {
                let message = format!(
                    "{} is also tls.{name}: edge-netd writes tls.{field} on enrolment and renewal",
                    written.display()
                );
                r.error(f.at(field), &f.path(field), ErrorKind::Conflict, message);
                ok = false;
            }
        }
    }
    (https != Some(false) && ok).then_some(Some(TlsConfig {
        cert,
        key,
        ca,
        claim,
    }))
}

/// `tls.claim_cert` and `tls.claim_key`: both or neither.
fn claim(r: &mut Reader, f: &Fields<'_, '_>) -> Option<Option<ClaimConfig>> {
    let read = |r: &mut Reader, field: &str| {
        f.get(field)
            .map(|n| r.nonempty(n, &f.path(field)).map(PathBuf::from))
    };
    match (read(r, "claim_cert"), read(r, "claim_key")) {
        (None, None) => Some(None),
        (Some(cert), Some(key)) => Some(Some(ClaimConfig {
            cert: cert?,
            key: key?,
        })),
        (Some(_), None) | (None, Some(_)) => {
            let (given, missing) = if f.get("claim_cert").is_some() {
                ("claim_cert", "claim_key")
            } else {
                ("claim_key", "claim_cert")
            };
            let message = format!(
                "missing `{missing}`: tls.{given} is given, and a claim credential is a \
                 certificate and its key"
            );
            r.error(
                f.at(missing),
                &f.path(missing),
                ErrorKind::MissingField,
                message,
            );
            None
        }
    }
}

/// An `IP:port` on loopback; `why` says what an outside address would expose.
fn loopback(r: &mut Reader, node: &Node<'_>, path: &str, why: &str) -> Option<SocketAddr> {
    let addr = addr(r, node, path)?;
    if !addr.ip().is_loopback() {
        r.error(
            node,
            path,
            ErrorKind::InvalidValue,
            format!("{addr} is not a loopback address: {why}"),
        );
        return None;
    }
    Some(addr)
}

/// `IP:port`; no names, so nothing here depends on a resolver.
fn addr(r: &mut Reader, node: &Node<'_>, path: &str) -> Option<SocketAddr> {
    let text = r.text(node, path, "an IP:port")?;
    let parsed = text.parse::<SocketAddr>();
    if parsed.is_err() {
        r.error(
            node,
            path,
            ErrorKind::InvalidValue,
            format!("{text:?} is not an IP:port (DNS names are not allowed: probes must not depend on a resolver)"),
        );
    }
    parsed.ok()
}

/// A non-empty list of `IP:port`.
fn targets(r: &mut Reader, node: &Node<'_>, path: &str, empty: &str) -> Option<Vec<SocketAddr>> {
    let items = r.seq(node, path, "a list")?;
    if items.is_empty() {
        r.error(node, path, ErrorKind::InvalidValue, empty);
        return None;
    }
    let addrs: Vec<Option<SocketAddr>> = items
        .iter()
        .enumerate()
        .map(|(i, t)| addr(r, t, &format!("{path}[{i}]")))
        .collect();
    addrs.into_iter().collect()
}

/// `probe:`, and its targets (the uplinks' default targets).
fn probe(r: &mut Reader, node: &Node<'_>) -> Option<(ProbeConfig, Vec<SocketAddr>)> {
    let f = r.map(node, "probe", "a mapping", PROBE)?;
    let targets = f
        .required(r, "targets", "a list of IP:port")
        .and_then(|n| targets(r, n, "probe.targets", "needs at least one IP:port"));
    let config = ProbeConfig {
        interval: f.or(r, "interval", DEFAULT_PROBE_INTERVAL, Reader::duration),
        timeout: f.or(r, "timeout", DEFAULT_PROBE_TIMEOUT, Reader::duration),
        window: f.or(r, "window", DEFAULT_WINDOW, |r, n, p| {
            r.int(n, p, 1..=1000).map(|w| w as usize)
        }),
    };
    Some((config, targets?))
}

fn selection(r: &mut Reader, node: Option<&Node<'_>>, window: usize) -> SelectionConfig {
    let defaults = SelectionConfig {
        blackhole_after: DEFAULT_BLACKHOLE_AFTER,
        dwell: DEFAULT_DWELL,
    };
    let Some(f) = node.and_then(|n| r.map(n, "selection", "a mapping", SELECTION)) else {
        return defaults;
    };
    SelectionConfig {
        blackhole_after: f.or(r, "blackhole_after", DEFAULT_BLACKHOLE_AFTER, |r, n, p| {
            let k = r.int(n, p, 0..=i64::from(u32::MAX))?;
            if k == 0 || k as usize > window {
                r.error(
                    n,
                    p,
                    ErrorKind::OutOfRange,
                    format!("{k} is not in 1..=probe.window ({window})"),
                );
                return None;
            }
            Some(k as u32)
        }),
        dwell: f.or(r, "dwell", DEFAULT_DWELL, Reader::duration),
    }
}

/// `uplinks:`; `default_targets` are `probe.targets` (`None` if those were wrong).
fn uplinks(
    r: &mut Reader,
    node: &Node<'_>,
    default_targets: Option<&[SocketAddr]>,
) -> Option<Vec<UplinkConfig>> {
    let items = r.seq(node, "uplinks", "a list")?;
    if items.is_empty() {
        r.error(
            node,
            "uplinks",
            ErrorKind::InvalidValue,
            "needs at least one uplink",
        );
        return None;
    }
    let mut taken = Taken::default();
    let uplinks: Vec<Option<UplinkConfig>> = items
        .iter()
        .enumerate()
        .map(|(i, item)| uplink(r, item, i, default_targets, &mut taken))
        .collect();
    uplinks.into_iter().collect()
}

/// The names and interfaces of the uplinks read so far, with their index.
#[derive(Default)]
struct Taken {
    names: Vec<(String, usize)>,
    interfaces: Vec<(String, usize)>,
}

/// `value` of uplink `index`, if no earlier uplink has it (else reported at `node`).
/// Checked per field, so a duplicate is found even in an uplink with other faults.
fn unique(
    r: &mut Reader,
    node: &Node<'_>,
    path: &str,
    (value, index): (String, usize),
    taken: &mut Vec<(String, usize)>,
) -> Option<String> {
    if let Some((_, prev)) = taken.iter().find(|(v, _)| *v == value) {
        r.error(
            node,
            path,
            ErrorKind::Duplicate,
            format!("{value:?} is already used by uplinks[{prev}]"),
        );
        return None;
    }
    taken.push((value.clone(), index));
    Some(value)
}

fn uplink(
    r: &mut Reader,
    node: &Node<'_>,
    index: usize,
    default_targets: Option<&[SocketAddr]>,
    taken: &mut Taken,
) -> Option<UplinkConfig> {
    let f = r.map(node, &format!("uplinks[{index}]"), "a mapping", UPLINK)?;
    let (name_path, interface_path) = (f.path("name"), f.path("interface"));
    let name = f
        .required(r, "name", "the uplink's name in the policy")
        .and_then(|n| {
            let name = uplink_name(r, n, &name_path)?;
            unique(r, n, &name_path, (name, index), &mut taken.names)
        });
    let interface = f
        .required(r, "interface", "a Linux interface name")
        .and_then(|n| {
            let interface = interface_name(r, n, &interface_path)?;
            unique(
                r,
                n,
                &interface_path,
                (interface, index),
                &mut taken.interfaces,
            )
        });
    let kind = f
        .required(r, "kind", "lte, 5g, 3g, wifi, dsrc or lpwa")
        .and_then(|n| {
            r.choice(
                n,
                &f.path("kind"),
                "uplink kind",
                &misaki_policy::UplinkKind::ALL,
            )
        });
    let metered = f.or(r, "metered", false, Reader::boolean);
    let cost = f.or(r, "cost", 0, |r, n, p| {
        r.int(n, p, 0..=i64::from(u32::MAX)).map(|c| c as u32)
    });
    let probe_targets = match f.get("probe_targets") {
        Some(n) => targets(
            r,
            n,
            &f.path("probe_targets"),
            "must not be empty when given",
        ),
        None => default_targets.map(<[_]>::to_vec),
    };
    Some(UplinkConfig {
        name: name?,
        interface: interface?,
        kind: kind?,
        metered,
        cost,
        probe_targets: probe_targets?,
    })
}

fn uplink_name(r: &mut Reader, node: &Node<'_>, path: &str) -> Option<String> {
    let name = r.text(node, path, "a name")?;
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c));
    if !ok {
        r.error(
            node,
            path,
            ErrorKind::InvalidValue,
            format!("{name:?} must be non-empty A-Z a-z 0-9 _ -"),
        );
    }
    ok.then(|| name.to_owned())
}

fn interface_name(r: &mut Reader, node: &Node<'_>, path: &str) -> Option<String> {
    let name = r.text(node, path, "an interface name")?;
    // IFNAMSIZ is 16 including the NUL.
    let ok = (1..=15).contains(&name.len()) && !name.contains(['/', ' ']);
    if !ok {
        let message =
            format!("{name:?} is not a Linux interface name (1..=15 bytes, no '/' or spaces)");
        r.error(node, path, ErrorKind::InvalidValue, message);
    }
    ok.then(|| name.to_owned())
}

/// `store_forward:`; `api` is the local API's address (the ingest must differ);
/// `state_dir` holds the default queue directory (`None` if it was wrong).
fn store_forward(
    r: &mut Reader,
    node: &Node<'_>,
    api: Option<SocketAddr>,
    state_dir: Option<&Path>,
) -> Option<StoreForwardConfig> {
    let f = r.map(node, "store_forward", "a mapping", STORE_FORWARD)?;
    let listen = ingest_listen(r, &f, api);
    let (budget_bytes, max_body) = budget(r, &f);
    let queue_dir = match f.get("queue_dir") {
        Some(n) => r.nonempty(n, &f.path("queue_dir")).map(PathBuf::from),
        None => state_dir.map(|d| d.join("queue")),
    };
    let max_in_flight = f.or(r, "max_in_flight", DEFAULT_SAF_MAX_IN_FLIGHT, |r, n, p| {
        r.int(n, p, 1..=4096).map(|n| n as usize)
    });
    let cloud_url = f
        .required(r, "cloud_url", "http://host:port of the cloud sidecar")
        .and_then(|n| url(r, n, &f.path("cloud_url")));
    let http_version = f.or(r, "http_version", HttpVersion::Http2, http_version);
    let destinations = match f.get("destinations") {
        Some(n) => destinations(r, n),
        None => Some(BTreeMap::new()),
    };
    let c = StoreForwardConfig {
        listen: listen?,
        queue_dir: queue_dir?,
        budget_bytes,
        max_body_bytes: max_body? as usize,
        cloud_url: cloud_url?,
        http_version,
        max_in_flight,
        destinations: destinations?,
    };
    // Each URL and limit was checked above; this is the runtime's own word on the whole.
    if let Err(e) = c.saf_config().validate() {
        r.error(
            node,
            "store_forward",
            ErrorKind::InvalidValue,
            e.to_string(),
        );
        return None;
    }
    Some(c)
}

fn ingest_listen(
    r: &mut Reader,
    f: &Fields<'_, '_>,
    api: Option<SocketAddr>,
) -> Option<SocketAddr> {
    let why = "the ingest endpoint has no authentication";
    let path = f.path("listen");
    let listen = match f.get("listen") {
        Some(n) => loopback(r, n, &path, why)?,
        None => DEFAULT_SAF_LISTEN.parse().expect("a valid default"),
    };
    if Some(listen) == api {
        let message = format!("{listen} is also the local API's address");
        r.error(f.at("listen"), &path, ErrorKind::Conflict, message);
        return None;
    }
    Some(listen)
}

/// `budget` and `max_body` (`None` when `max_body` does not fit the budget).
fn budget(r: &mut Reader, f: &Fields<'_, '_>) -> (u64, Option<u64>) {
    let budget = f.or(r, "budget", DEFAULT_SAF_BUDGET, size);
    let max_body = f.or(r, "max_body", DEFAULT_SAF_MAX_BODY as u64, size);
    let problem = if max_body > budget {
        format!("{max_body} bytes is more than the budget ({budget} bytes)")
    } else if max_body > u64::from(u32::MAX) {
        // The queue stores a body length as u32.
        format!("{max_body} bytes is over 4 GiB")
    } else {
        return (budget, Some(max_body));
    };
    r.error(
        f.at("max_body"),
        &f.path("max_body"),
        ErrorKind::OutOfRange,
        problem,
    );
    (budget, None)
}

/// A size > 0 (`65536`, `64KiB`, `500MB`).
fn size(r: &mut Reader, node: &Node<'_>, path: &str) -> Option<u64> {
    let text = r.text(node, path, "a size such as `64KiB` or `8MiB`")?;
    match parse_size(text) {
        Ok(0) => r.error(node, path, ErrorKind::OutOfRange, "must be greater than 0"),
        Ok(n) => return Some(n),
        Err(m) => r.error(node, path, ErrorKind::InvalidValue, m),
    }
    None
}

fn http_version(r: &mut Reader, node: &Node<'_>, path: &str) -> Option<HttpVersion> {
    r.choice(node, path, "HTTP version", &HTTP_VERSIONS)
}

/// A destination URL, checked as the forwarder will use it.
fn url(r: &mut Reader, node: &Node<'_>, path: &str) -> Option<String> {
    let url = r.text(node, path, "an http:// URL")?;
    let one = SafConfig {
        default_destination: Some(DestinationConfig::new(url, HttpVersion::Http2)),
        ..SafConfig::default()
    };
    if let Err(e) = one.validate() {
        r.error(node, path, ErrorKind::InvalidValue, e.to_string());
        return None;
    }
    Some(url.to_owned())
}

fn destinations(r: &mut Reader, node: &Node<'_>) -> Option<BTreeMap<String, DestinationConfig>> {
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (name, d) in r.entries(node, "store_forward.destinations", "a mapping")? {
        let path = format!("store_forward.destinations.{name}");
        let Some(f) = r.map(d, &path, "a mapping", DESTINATION) else {
            ok = false;
            continue;
        };
        let url = f
            .required(r, "url", "an http:// URL")
            .and_then(|n| url(r, n, &f.path("url")));
        let version = f.or(r, "http_version", HttpVersion::Http2, http_version);
        match url {
            Some(url) => {
                out.insert(name.to_owned(), DestinationConfig::new(url, version));
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// `xds:` (`ADDR`, `off`, or a mapping); `taken` are the local API's and the
/// ingest's addresses.
fn xds(
    r: &mut Reader,
    node: Option<&Node<'_>>,
    taken: [Option<SocketAddr>; 2],
) -> Option<XdsConfig> {
    let Some(node) = node else {
        return Some(XdsConfig::tcp(
            DEFAULT_XDS.parse().expect("a valid default"),
        ));
    };
    if !is_mapping(node) {
        return xds_listen(r, node, "xds", taken).map(|listen| XdsConfig {
            listen,
            socket: None,
        });
    }
    let f = r.map(node, "xds", "a mapping", XDS)?;
    let listen = match f.get("listen") {
        Some(n) => xds_listen(r, n, &f.path("listen"), taken),
        None => Some(None),
    };
    let socket = match f.get("socket") {
        Some(n) => xds_socket(r, n, f.get("socket_group")).map(Some),
        None => Some(None),
    };
    Some(XdsConfig {
        listen: listen?,
        socket: socket?,
    })
}

/// A loopback `IP:port` for the local tier, or `off`.
fn xds_listen(
    r: &mut Reader,
    node: &Node<'_>,
    path: &str,
    taken: [Option<SocketAddr>; 2],
) -> Option<Option<SocketAddr>> {
    if r.text(node, path, "a loopback IP:port or `off`")? == "off" {
        return Some(None);
    }
    let why = "the local xDS tier serves this vehicle's sidecars only";
    let addr = loopback(r, node, path, why)?;
    if taken.contains(&Some(addr)) {
        r.error(
            node,
            path,
            ErrorKind::Conflict,
            format!("{addr} is also the local API's or the ingest's address"),
        );
        return None;
    }
    Some(Some(addr))
}

/// `xds.socket` (an absolute path) and `xds.socket_group` (a group name).
fn xds_socket(r: &mut Reader, node: &Node<'_>, group: Option<&Node<'_>>) -> Option<XdsSocket> {
    let path = r.nonempty(node, "xds.socket")?;
    if !Path::new(path).is_absolute() {
        let message = format!("{path:?} must be an absolute path");
        r.error(node, "xds.socket", ErrorKind::InvalidValue, message);
        return None;
    }
    let group = match group {
        Some(g) => Some(r.nonempty(g, "xds.socket_group")?.to_owned()),
        None => None,
    };
    Some(XdsSocket {
        path: PathBuf::from(path),
        group,
    })
}
