//! Format version 1, one file at a time: YAML tree → drafts.
//!
//! Invariant: whenever a draft field holds a placeholder instead of a value read
//! from the file, an error has been recorded — so a draft is only ever turned into
//! a [`Policy`](crate::Policy) when the error list is empty (see `validate`).
//!
//! Everything checkable within one item (types, ranges, enums, name syntax,
//! durations, endpoints, duplicates inside one list) is checked here. Checks that
//! relate items — possibly across files — are in `validate`, which needs the
//! positions kept in [`Named`] and friends.

use std::rc::Rc;
use std::time::Duration;

use saphyr::YamlData;

use crate::error::{ErrorKind, Errors, Loc};
use crate::located::{Dialect, Fields, Node, Reader};
use crate::model::{
    Endpoint, Location, LowPowerAction, MeshSettings, MtlsMode, Protocol, RoutePriority, Service,
    TrafficClass, TrustDomain, Uplink, UplinkKind,
};
use crate::values::{check_bare_host, check_name, check_route, parse_endpoint};

const TOP_FIELDS: &[&str] = &["version", "mesh", "uplinks", "classes", "services"];
/// The mesh ports, in the order `MeshDraft::explicit` holds them.
pub(crate) const MESH_PORTS: [&str; 5] = [
    "vehicle_outbound_port",
    "vehicle_inbound_port",
    "cloud_inbound_port",
    "vehicle_gateway_port",
    "vehicle_tunnel_port",
];
/// Every field of `mesh`: the ports, data-plane mTLS, then the vehicle gateway.
const MESH_FIELDS: [&str; 9] = [
    MESH_PORTS[0],
    MESH_PORTS[1],
    MESH_PORTS[2],
    "mtls",
    "trust_domain",
    MESH_PORTS[3],
    MESH_PORTS[4],
    "vehicle_gateways",
    "vehicle_tunnel_class",
];
const UPLINK_FIELDS: &[&str] = &["name", "kind", "metered", "cost"];
const CLASS_FIELDS: &[&str] = &[
    "name",
    "priority",
    "timeout",
    "retries",
    "uplinks",
    "deferrable",
    "dscp",
    "max_rtt",
    "max_loss_percent",
    "ttl",
];
const SERVICE_FIELDS: &[&str] = &[
    "name",
    "location",
    "protocol",
    "port",
    "endpoints",
    "routes",
    "class",
    "consumes",
    "cloud_replica",
    "on_low_power",
];

/// Default whole-request timeout of a class.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound on `retries`: beyond this a class retries for longer than any
/// sensible timeout and multiplies load on a struggling uplink.
pub const MAX_RETRIES: u32 = 10;

/// A string from the file and where it was, for uniqueness and reference checks.
#[derive(Debug, Clone)]
pub(crate) struct Named {
    pub text: String,
    pub loc: Loc,
    pub path: String,
}

/// Everything one file contributed.
#[derive(Debug)]
pub(crate) struct FileDraft {
    /// Where the top-level mapping starts (line 1 if it could not be read).
    pub root: Loc,
    /// False when the file could not be read as a policy at all (syntax error,
    /// empty, not a mapping): cross-file checks would then only produce noise.
    pub complete: bool,
    pub version: Option<(i64, Loc, String)>,
    pub mesh: Option<MeshDraft>,
    pub uplinks: Section<UplinkDraft>,
    pub classes: Section<ClassDraft>,
    pub services: Section<ServiceDraft>,
}

/// One list section of one file.
#[derive(Debug)]
pub(crate) struct Section<T> {
    /// Where the list is, if the file has the section.
    pub loc: Option<Loc>,
    /// Items in the file, including ones too broken to draft; an empty-section
    /// error would be wrong when the operator did write items.
    pub items_seen: usize,
    pub items: Vec<T>,
}

impl<T> Default for Section<T> {
    fn default() -> Self {
        Self {
            loc: None,
            items_seen: 0,
            items: Vec::new(),
        }
    }
}

#[derive(Debug)]
pub(crate) struct MeshDraft {
    pub loc: Loc,
    pub value: MeshSettings,
    /// Where each of [`MESH_PORTS`] was set explicitly (`None`: default).
    pub explicit: [Option<(Loc, String)>; MESH_PORTS.len()],
    /// `vehicle_tunnel_class` where it was written (checked against the classes later).
    pub tunnel_class: Option<Named>,
}

impl MeshDraft {
    /// The values of [`MESH_PORTS`], in that order.
    pub fn ports(&self) -> [u16; MESH_PORTS.len()] {
        mesh_ports(&self.value)
    }
}

/// The values of [`MESH_PORTS`] of `mesh`, in that order.
pub(crate) fn mesh_ports(mesh: &MeshSettings) -> [u16; MESH_PORTS.len()] {
    [
        mesh.vehicle_outbound_port,
        mesh.vehicle_inbound_port,
        mesh.cloud_inbound_port,
        mesh.vehicle_gateway_port,
        mesh.vehicle_tunnel_port,
    ]
}

#[derive(Debug)]
pub(crate) struct UplinkDraft {
    pub name: Option<Named>,
    pub value: Uplink,
}

#[derive(Debug)]
pub(crate) struct ClassDraft {
    pub name: Option<Named>,
    pub uplinks: Vec<Named>,
    pub value: TrafficClass,
}

#[derive(Debug)]
pub(crate) struct ServiceDraft {
    pub name: Option<Named>,
    pub location: Option<Location>,
    pub port: Option<(u16, Loc, String)>,
    pub routes: Vec<Named>,
    pub class: Option<Named>,
    /// `consumes`, each name where it was written (checked against the services later).
    pub consumes: Vec<Named>,
    pub value: Service,
}

/// Reads one file. Errors go to `errors`; the draft holds whatever was readable.
pub(crate) fn read_file(file: Rc<str>, text: &str, errors: &mut Errors) -> FileDraft {
    let mut draft = FileDraft {
        root: Loc {
            file: Rc::clone(&file),
            line: 1,
            column: 1,
        },
        complete: false,
        version: None,
        mesh: None,
        uplinks: Section::default(),
        classes: Section::default(),
        services: Section::default(),
    };
    let mut r = Reader::new(file, Dialect::Core);
    read_document(&mut r, text, &mut draft);
    errors.0.extend(r.into_issues());
    draft
}

fn read_document(r: &mut Reader, text: &str, draft: &mut FileDraft) {
    let Some(loaded) = r.load(text) else {
        return;
    };
    // `---` alone loads as a null document: as empty as an empty file.
    let Some(doc) = loaded
        .document
        .filter(|d| !matches!(d.data, YamlData::BadValue))
    else {
        let (line, column) = (draft.root.line, draft.root.column);
        r.error_at(
            line,
            column,
            "",
            ErrorKind::Structure,
            "the policy file is empty; expected a mapping with `version`, `uplinks` and `classes`",
        );
        return;
    };
    if let Some(extra) = &loaded.second {
        r.error(
            extra,
            "",
            ErrorKind::Structure,
            "a policy file holds one YAML document, but a second one starts here; \
             remove the `---` or put it in its own file of a policy directory",
        );
    }
    draft.root = Loc::at(r, &doc);
    if !matches!(doc.data, YamlData::Mapping(_)) {
        let found = r.describe(&doc);
        r.error(
            &doc,
            "",
            ErrorKind::Structure,
            format!(
                "expected the policy to be a mapping with `version`, `uplinks`, `classes` (and optionally `mesh`, `services`), found {found}"
            ),
        );
        return;
    }
    let Some(top) = r.map(&doc, "", "the policy (a mapping)", TOP_FIELDS) else {
        return;
    };
    draft.complete = true;
    if let Some(n) = top.get("version") {
        let path = top.path("version");
        if let Some(v) = r.int(n, &path, 0..=i64::MAX) {
            draft.version = Some((v, Loc::at(r, n), path));
        }
    }
    if let Some(n) = top.get("mesh") {
        draft.mesh = read_mesh(r, n);
    }
    draft.uplinks = read_section(r, &top, "uplinks", "uplinks", read_uplink);
    draft.classes = read_section(r, &top, "classes", "traffic classes", read_class);
    draft.services = read_section(r, &top, "services", "services", read_service);
}

fn read_section<T>(
    r: &mut Reader,
    top: &Fields<'_, '_>,
    field: &str,
    what: &str,
    read_item: fn(&mut Reader, &Node<'_>, String) -> Option<T>,
) -> Section<T> {
    let mut section = Section::default();
    let Some(node) = top.get(field) else {
        return section;
    };
    section.loc = Some(Loc::at(r, node));
    if let Some(items) = r.seq(node, field, &format!("a list of {what}")) {
        section.items_seen = items.len();
        for (i, item) in items.iter().enumerate() {
            if let Some(d) = read_item(r, item, format!("{field}[{i}]")) {
                section.items.push(d);
            }
        }
    } else {
        // Wrong type was reported; don't also claim the section is empty.
        section.items_seen = 1;
    }
    section
}

fn read_mesh(r: &mut Reader, node: &Node<'_>) -> Option<MeshDraft> {
    let f = r.map(node, "mesh", "mesh settings (a mapping)", &MESH_FIELDS)?;
    let mut mesh = MeshDraft {
        loc: Loc::at(r, node),
        value: MeshSettings::default(),
        explicit: Default::default(),
        tunnel_class: None,
    };
    for (i, field) in MESH_PORTS.iter().enumerate() {
        let Some(n) = f.get(field) else { continue };
        let path = f.path(field);
        let Some(port) = r
            .int(n, &path, 1..=65535)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        match i {
            0 => mesh.value.vehicle_outbound_port = port,
            1 => mesh.value.vehicle_inbound_port = port,
            2 => mesh.value.cloud_inbound_port = port,
            3 => mesh.value.vehicle_gateway_port = port,
            _ => mesh.value.vehicle_tunnel_port = port,
        }
        mesh.explicit[i] = Some((Loc::at(r, n), path));
    }
    if let Some(n) = f.get("mtls") {
        let modes = &MtlsMode::ALL;
        if let Some(m) = r.choice(n, &f.path("mtls"), "mtls mode", modes) {
            mesh.value.mtls = m;
        }
    }
    if let Some(n) = f.get("trust_domain") {
        let path = f.path("trust_domain");
        if let Some(td) = r.text(n, &path, "a trust domain such as `misaki.local`") {
            match TrustDomain::new(td) {
                Ok(td) => mesh.value.trust_domain = td,
                Err(_) => r.error(
                    n,
                    &path,
                    ErrorKind::InvalidValue,
                    format!(
                        "invalid trust domain `{}`; expected 1 to 255 characters of lowercase letters, digits, `.`, `-` and `_` (e.g. `misaki.local`), the fleet CA's `ca init --trust-domain`",
                        td.escape_debug()
                    ),
                ),
            }
        }
    }
    read_vehicle_gateways(r, &f, &mut mesh);
    Some(mesh)
}

/// `vehicle_gateways` and `vehicle_tunnel_class`: each needs the other.
fn read_vehicle_gateways(r: &mut Reader, f: &Fields<'_, '_>, mesh: &mut MeshDraft) {
    let gateways_node = f.get("vehicle_gateways");
    if let Some(n) = gateways_node {
        let path = f.path("vehicle_gateways");
        let hosts = read_string_list(
            r,
            n,
            &path,
            "hosts (IP address or DNS name, no port)",
            |r, item, p, text| match check_bare_host(text) {
                Ok(()) => true,
                Err(msg) => {
                    r.error(item, p, ErrorKind::InvalidValue, msg);
                    false
                }
            },
        );
        mesh.value.vehicle_gateways = hosts
            .unwrap_or_default()
            .into_iter()
            .map(|n| n.text)
            .collect();
    }
    let class_node = f.get("vehicle_tunnel_class");
    if let Some(n) = class_node {
        let path = f.path("vehicle_tunnel_class");
        if let Some(text) = r.text(n, &path, "the name of a traffic class") {
            mesh.value.vehicle_tunnel_class = Some(text.to_owned());
            mesh.tunnel_class = Some(Named {
                text: text.to_owned(),
                loc: Loc::at(r, n),
                path,
            });
        }
    }
    // Judged by what was written, so invalid hosts don't add a second error.
    let has_gateways = match gateways_node.map(|n| &n.data) {
        None => false,
        Some(YamlData::Sequence(s)) => !s.is_empty(),
        // Wrong type, reported: don't guess.
        Some(_) => return,
    };
    match (gateways_node, class_node) {
        (Some(g), None) if has_gateways => r.error(
            g,
            &f.path("vehicle_gateways"),
            ErrorKind::MissingField,
            "`vehicle_gateways` needs `vehicle_tunnel_class`: the traffic class whose uplinks carry the vehicles' reverse tunnels",
        ),
        (_, Some(c)) if !has_gateways => r.error(
            c,
            &f.path("vehicle_tunnel_class"),
            ErrorKind::InvalidValue,
            "`vehicle_tunnel_class` without `vehicle_gateways`: there are no tunnels for it to carry; list the gateway hosts in `vehicle_gateways` or remove it",
        ),
        _ => {}
    }
}

/// The required, unique `name` of an item. Returned even when its syntax is
/// wrong, so references to it still resolve and don't add noise.
fn read_name(r: &mut Reader, f: &Fields<'_, '_>, example: &str) -> Option<Named> {
    let path = f.path("name");
    let n = f.required(r, "name", &format!("a name such as `{example}`"))?;
    let text = r.text(n, &path, "a name (lowercase letters, digits and `-`)")?;
    if let Err(msg) = check_name(text) {
        r.error(n, &path, ErrorKind::InvalidValue, msg);
    }
    Some(Named {
        text: text.to_owned(),
        loc: Loc::at(r, n),
        path,
    })
}

/// A list of strings, each read by `item`, with duplicates reported at the later one.
fn read_string_list(
    r: &mut Reader,
    node: &Node<'_>,
    path: &str,
    what: &str,
    mut check: impl FnMut(&mut Reader, &Node<'_>, &str, &str) -> bool,
) -> Option<Vec<Named>> {
    let items = r.seq(node, path, &format!("a list of {what}"))?;
    let mut out: Vec<Named> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        let Some(text) = r.text(item, &item_path, what) else {
            continue;
        };
        if !check(r, item, &item_path, text) {
            continue;
        }
        if let Some(first) = out.iter().find(|n| n.text == text) {
            let msg = format!("`{text}` is listed twice; first as {}", first.path);
            r.error(item, &item_path, ErrorKind::Duplicate, msg);
            continue;
        }
        out.push(Named {
            text: text.to_owned(),
            loc: Loc::at(r, item),
            path: item_path,
        });
    }
    Some(out)
}

fn read_uplink(r: &mut Reader, node: &Node<'_>, path: String) -> Option<UplinkDraft> {
    let f = r.map(node, &path, "an uplink (a mapping)", UPLINK_FIELDS)?;
    let name = read_name(r, &f, "wifi");
    let kinds = UplinkKind::ALL.map(|(s, _)| s).join(", ");
    let kind = f
        .required(r, "kind", &format!("one of: {kinds}"))
        .and_then(|n| r.choice(n, &f.path("kind"), "uplink kind", &UplinkKind::ALL));
    let metered = f
        .get("metered")
        .and_then(|n| r.boolean(n, &f.path("metered")));
    let cost = f
        .get("cost")
        .and_then(|n| r.int(n, &f.path("cost"), 0..=i64::from(u32::MAX)))
        .and_then(|c| u32::try_from(c).ok());
    Some(UplinkDraft {
        value: Uplink {
            name: name.as_ref().map(|n| n.text.clone()).unwrap_or_default(),
            // Placeholder when missing or invalid: an error was recorded.
            kind: kind.unwrap_or(UplinkKind::Wifi),
            metered: metered.unwrap_or(false),
            cost: cost.unwrap_or(0),
        },
        name,
    })
}

fn read_class(r: &mut Reader, node: &Node<'_>, path: String) -> Option<ClassDraft> {
    let f = r.map(node, &path, "a traffic class (a mapping)", CLASS_FIELDS)?;
    let name = read_name(r, &f, "critical");
    let priority = f
        .get("priority")
        .and_then(|n| r.choice(n, &f.path("priority"), "priority", &RoutePriority::ALL));
    let timeout = f
        .get("timeout")
        .and_then(|n| r.duration(n, &f.path("timeout")));
    let retries = f
        .get("retries")
        .and_then(|n| r.int(n, &f.path("retries"), 0..=i64::from(MAX_RETRIES)))
        .and_then(|v| u32::try_from(v).ok());
    let uplinks_path = f.path("uplinks");
    let uplinks = f
        .required(r, "uplinks", "a list of uplink names, most preferred first")
        .and_then(|n| {
            let list = read_string_list(r, n, &uplinks_path, "uplink names", |_, _, _, _| true)?;
            if matches!(&n.data, YamlData::Sequence(s) if s.is_empty()) {
                r.error(
                    n,
                    &uplinks_path,
                    ErrorKind::InvalidValue,
                    "a class must allow at least one uplink, e.g. `[wifi, lte]`",
                );
            }
            Some(list)
        })
        .unwrap_or_default();
    let deferrable = f
        .get("deferrable")
        .and_then(|n| r.boolean(n, &f.path("deferrable")));
    let dscp = f
        .get("dscp")
        .and_then(|n| r.int(n, &f.path("dscp"), 0..=63))
        .and_then(|v| u8::try_from(v).ok());
    let max_rtt = f
        .get("max_rtt")
        .and_then(|n| r.duration(n, &f.path("max_rtt")));
    let max_loss_percent = f
        .get("max_loss_percent")
        .and_then(|n| r.int(n, &f.path("max_loss_percent"), 0..=100))
        .and_then(|v| u8::try_from(v).ok());
    let ttl = f.get("ttl").and_then(|n| r.duration(n, &f.path("ttl")));
    Some(ClassDraft {
        value: TrafficClass {
            name: name.as_ref().map(|n| n.text.clone()).unwrap_or_default(),
            priority: priority.unwrap_or(RoutePriority::Default),
            timeout: timeout.unwrap_or(DEFAULT_TIMEOUT),
            retries: retries.unwrap_or(0),
            uplinks: uplinks.iter().map(|n| n.text.clone()).collect(),
            deferrable: deferrable.unwrap_or(false),
            dscp: dscp.unwrap_or(0),
            max_rtt,
            max_loss_percent,
            ttl,
        },
        uplinks,
        name,
    })
}

fn read_service(r: &mut Reader, node: &Node<'_>, path: String) -> Option<ServiceDraft> {
    let f = r.map(node, &path, "a service (a mapping)", SERVICE_FIELDS)?;
    let name = read_name(r, &f, "telemetry");
    let locations = Location::ALL.map(|(s, _)| s).join(", ");
    let location = f
        .required(r, "location", &format!("one of: {locations}"))
        .and_then(|n| r.choice(n, &f.path("location"), "location", &Location::ALL));
    let protocol = f
        .get("protocol")
        .and_then(|n| r.choice(n, &f.path("protocol"), "protocol", &Protocol::ALL));
    let port_path = f.path("port");
    let port = f
        .required(r, "port", "the port the service listens on, 1 to 65535")
        .and_then(|n| {
            let p = r.int(n, &port_path, 1..=65535)?;
            Some((u16::try_from(p).ok()?, Loc::at(r, n), port_path.clone()))
        });

    let endpoints_path = f.path("endpoints");
    let endpoints_node = f.get("endpoints");
    let endpoints = endpoints_node
        .map(|n| read_endpoints(r, n, &endpoints_path))
        .unwrap_or_default();
    let remote = matches!(location, Some(Location::Edge | Location::Cloud));
    match endpoints_node {
        None if remote => r.error(
            f.mapping(),
            &endpoints_path,
            ErrorKind::MissingField,
            "missing required field `endpoints`: edge and cloud services need at least one `host:port`",
        ),
        Some(n) if remote && matches!(&n.data, YamlData::Sequence(s) if s.is_empty()) => r.error(
            n,
            &endpoints_path,
            ErrorKind::InvalidValue,
            "edge and cloud services need at least one endpoint `host:port`",
        ),
        _ => {}
    }

    let routes_path = f.path("routes");
    let routes = f
        .required(r, "routes", "a list of path prefixes such as `[\"/maps\"]`")
        .and_then(|n| {
            let list =
                read_string_list(r, n, &routes_path, "route prefixes", |r, item, p, text| {
                    match check_route(text) {
                        Ok(()) => true,
                        Err(msg) => {
                            r.error(item, p, ErrorKind::InvalidValue, msg);
                            false
                        }
                    }
                })?;
            if matches!(&n.data, YamlData::Sequence(s) if s.is_empty()) {
                r.error(
                    n,
                    &routes_path,
                    ErrorKind::InvalidValue,
                    "a service needs at least one route prefix, e.g. `[\"/maps\"]`",
                );
            }
            Some(list)
        })
        .unwrap_or_default();
    let class_path = f.path("class");
    let class = f
        .required(r, "class", "the name of a traffic class such as `standard`")
        .and_then(|n| {
            let text = r.text(n, &class_path, "the name of a traffic class")?;
            Some(Named {
                text: text.to_owned(),
                loc: Loc::at(r, n),
                path: class_path.clone(),
            })
        });
    let consumes = read_consumes(r, &f, location);
    let (cloud_replica, on_low_power) = read_low_power(r, &f, location);
    Some(ServiceDraft {
        value: Service {
            name: name.as_ref().map(|n| n.text.clone()).unwrap_or_default(),
            // Placeholders when missing or invalid: an error was recorded.
            location: location.unwrap_or(Location::Vehicle),
            protocol: protocol.unwrap_or(Protocol::Http),
            port: port.as_ref().map_or(0, |p| p.0),
            endpoints,
            routes: routes.iter().map(|n| n.text.clone()).collect(),
            class: class.as_ref().map(|n| n.text.clone()).unwrap_or_default(),
            consumes: consumes
                .as_ref()
                .map(|c| c.iter().map(|n| n.text.clone()).collect()),
            cloud_replica,
            on_low_power,
        },
        name,
        location,
        port,
        routes,
        class,
        consumes: consumes.unwrap_or_default(),
    })
}

/// `consumes`: the services a vehicle service calls, which scopes what the vehicle's
/// sidecar holds. Only vehicle services have one: other sidecars serve their own.
fn read_consumes(
    r: &mut Reader,
    f: &Fields<'_, '_>,
    location: Option<Location>,
) -> Option<Vec<Named>> {
    let node = f.get("consumes")?;
    let path = f.path("consumes");
    if matches!(location, Some(Location::Edge | Location::Cloud)) {
        r.error(
            node,
            &path,
            ErrorKind::InvalidValue,
            "`consumes` is for vehicle services (it scopes the vehicle sidecar); edge and cloud sidecars serve only their own services",
        );
        return None;
    }
    read_string_list(r, node, &path, "service names", |_, _, _, _| true)
}

/// A list of `host:port` endpoints (`endpoints`, `cloud_replica`): each checked, no
/// address twice.
fn read_endpoints(r: &mut Reader, node: &Node<'_>, path: &str) -> Vec<Endpoint> {
    read_string_list(
        r,
        node,
        path,
        "endpoints (`host:port`)",
        |r, item, p, text| match parse_endpoint(text) {
            Ok(_) => true,
            Err(msg) => {
                r.error(item, p, ErrorKind::InvalidValue, msg);
                false
            }
        },
    )
    .unwrap_or_default()
    .iter()
    // Parsed a second time rather than threaded through: they are few and
    // already known to be valid.
    .filter_map(|n| parse_endpoint(&n.text).ok())
    .collect()
}

/// `cloud_replica` and `on_low_power`: where a vehicle service's calls go while the
/// vehicle is offline or low on power. Only vehicle services have them.
fn read_low_power(
    r: &mut Reader,
    f: &Fields<'_, '_>,
    location: Option<Location>,
) -> (Vec<Endpoint>, LowPowerAction) {
    let remote = matches!(location, Some(Location::Edge | Location::Cloud));
    let replica_node = f.get("cloud_replica");
    let replica_path = f.path("cloud_replica");
    let mut replica = Vec::new();
    if let Some(n) = replica_node {
        if remote {
            r.error(
                n,
                &replica_path,
                ErrorKind::InvalidValue,
                "`cloud_replica` is for vehicle services; an edge or cloud service lists all its instances in `endpoints`",
            );
        } else {
            replica = read_endpoints(r, n, &replica_path);
        }
    }
    let mut action = LowPowerAction::Stay;
    let Some(n) = f.get("on_low_power") else {
        return (replica, action);
    };
    let path = f.path("on_low_power");
    if remote {
        r.error(
            n,
            &path,
            ErrorKind::InvalidValue,
            "`on_low_power` is for vehicle services: it says where their calls go while the vehicle is low on power",
        );
        return (replica, action);
    }
    let Some(a) = r.choice(n, &path, "low-power action", &LowPowerAction::ALL) else {
        return (replica, action);
    };
    action = a;
    // Judged by what was written, so invalid endpoints don't add a second error.
    let no_replica = match replica_node.map(|n| &n.data) {
        None => true,
        Some(YamlData::Sequence(s)) => s.is_empty(),
        Some(_) => false,
    };
    if action == LowPowerAction::Cloud && no_replica {
        r.error(
            n,
            &path,
            ErrorKind::InvalidValue,
            "`on_low_power: cloud` sends calls to the service's cloud instances, but it has none; add `cloud_replica` (a list of `host:port`)",
        );
    }
    (replica, action)
}
