//! The mesh policy on the wire: [`Policy`] ⇄ fleet `PolicyUpdate`, and the policy's
//! version. This crate is the only place that converts between the two, so misaki-cp
//! (which sends) and edge-netd (which receives, stores and compiles from it) cannot
//! drift apart.
//!
//! Invariants:
//! - `from_wire(&to_wire(p)) == Ok(p)` for every valid policy (property-tested): the
//!   vehicle compiles from exactly the policy the operator wrote.
//! - A received update is validated by the policy crate's own checks, not a copy of
//!   them: it is rendered as a policy document ([`render`]) and parsed with
//!   [`misaki_policy::parse`], so a bad update is rejected with the same field paths
//!   and messages as a bad file, and a `Policy` keeps its "always valid" promise.
//! - The version is a hash of the encoded content ([`version`]): equal policies have
//!   equal versions on every host and across restarts, and it is the one version
//!   string shown everywhere (misaki-cp `/policy`, `/fleet/{vehicle}`, edge-netd
//!   `/links`).
//! - Uplink kinds, locations, protocols, priorities, mTLS modes and low-power actions
//!   are mapped in one table each.
//! - Incremental updates are made and applied here too ([`diff`], [`apply`]), at the
//!   wire level: a delta applied gives the whole update, which is then validated by
//!   [`from_wire`] like any other, so there is one validation path.

use std::fmt::Write as _;
use std::time::Duration;

use misaki_policy::{
    Endpoint, Location, LowPowerAction, MeshSettings, MtlsMode, Policy, PolicyErrors, Protocol,
    RoutePriority, TrustDomain, UplinkKind,
};
use misaki_proto::fleet_v1 as pb;
use prost::Message;

mod delta;

pub use delta::{DeltaError, apply, diff, is_delta};

/// Uplink kinds: policy ⇄ wire.
const KINDS: [(UplinkKind, pb::UplinkKind); 6] = [
    (UplinkKind::Lte, pb::UplinkKind::Lte),
    (UplinkKind::FiveG, pb::UplinkKind::FiveG),
    (UplinkKind::ThreeG, pb::UplinkKind::ThreeG),
    (UplinkKind::Wifi, pb::UplinkKind::Wifi),
    (UplinkKind::Dsrc, pb::UplinkKind::Dsrc),
    (UplinkKind::Lpwa, pb::UplinkKind::Lpwa),
];
const LOCATIONS: [(Location, pb::Location); 3] = [
    (Location::Vehicle, pb::Location::Vehicle),
    (Location::Edge, pb::Location::Edge),
    (Location::Cloud, pb::Location::Cloud),
];
const PROTOCOLS: [(Protocol, pb::Protocol); 2] = [
    (Protocol::Http, pb::Protocol::Http),
    (Protocol::Grpc, pb::Protocol::Grpc),
];
const PRIORITIES: [(RoutePriority, pb::RoutePriority); 2] = [
    (RoutePriority::Default, pb::RoutePriority::Default),
    (RoutePriority::High, pb::RoutePriority::High),
];
const MTLS_MODES: [(MtlsMode, pb::mesh_settings::MtlsMode); 3] = [
    (MtlsMode::Off, pb::mesh_settings::MtlsMode::Off),
    (
        MtlsMode::Permissive,
        pb::mesh_settings::MtlsMode::Permissive,
    ),
    (MtlsMode::Strict, pb::mesh_settings::MtlsMode::Strict),
];
const LOW_POWER_ACTIONS: [(LowPowerAction, pb::service::LowPowerAction); 2] = [
    (LowPowerAction::Stay, pb::service::LowPowerAction::Stay),
    (LowPowerAction::Cloud, pb::service::LowPowerAction::Cloud),
];

fn to_pb<D: PartialEq + Copy, W: Copy + Into<i32>>(table: &[(D, W)], d: D) -> i32 {
    table
        .iter()
        .find(|(x, _)| *x == d)
        .map(|(_, w)| (*w).into())
        .expect("every domain value has a wire value")
}

fn from_pb<D: Copy, W: Copy + Into<i32>>(table: &[(D, W)], v: i32) -> Option<D> {
    table
        .iter()
        .find(|(_, w)| (*w).into() == v)
        .map(|(d, _)| *d)
}

/// The wire value of an uplink kind.
pub fn kind_to_wire(k: UplinkKind) -> pb::UplinkKind {
    pb::UplinkKind::try_from(to_pb(&KINDS, k)).expect("the table holds wire values")
}

/// The uplink kind of a wire value (`None` for unspecified or unknown values).
pub fn kind_from_wire(v: i32) -> Option<UplinkKind> {
    from_pb(&KINDS, v)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn endpoints_to_wire(endpoints: &[Endpoint]) -> Vec<pb::Endpoint> {
    endpoints
        .iter()
        .map(|e| pb::Endpoint {
            host: e.host.clone(),
            port: u32::from(e.port),
        })
        .collect()
}

/// A port that travels as 0 (absent) when it is the default, so a policy that does not
/// set it encodes (and so versions) as it did before the field existed.
fn port_unless_default(port: u16, default: u16) -> u32 {
    if port == default { 0 } else { u32::from(port) }
}

/// The policy as sent to vehicles, with its version filled in.
pub fn to_wire(policy: &Policy) -> pb::PolicyUpdate {
    let m = &policy.mesh;
    let mut update = pb::PolicyUpdate {
        version: String::new(),
        uplinks: policy
            .uplinks
            .values()
            .map(|u| pb::Uplink {
                name: u.name.clone(),
                kind: to_pb(&KINDS, u.kind),
                metered: u.metered,
                cost: u.cost,
            })
            .collect(),
        classes: policy
            .classes
            .values()
            .map(|c| pb::TrafficClass {
                name: c.name.clone(),
                uplinks: c.uplinks.clone(),
                max_rtt_ms: c.max_rtt.map(millis),
                max_loss_percent: c.max_loss_percent.map(u32::from),
                deferrable: c.deferrable,
                dscp: u32::from(c.dscp),
                ttl_ms: c.ttl.map(millis),
                priority: to_pb(&PRIORITIES, c.priority),
                timeout_ms: Some(millis(c.timeout)),
                retries: c.retries,
            })
            .collect(),
        services: policy
            .services
            .values()
            .map(|s| pb::Service {
                name: s.name.clone(),
                location: to_pb(&LOCATIONS, s.location),
                protocol: to_pb(&PROTOCOLS, s.protocol),
                port: u32::from(s.port),
                endpoints: endpoints_to_wire(&s.endpoints),
                routes: s.routes.clone(),
                class: s.class.clone(),
                consumes: s.consumes.as_ref().map(|names| pb::ServiceNames {
                    names: names.clone(),
                }),
                cloud_replica: endpoints_to_wire(&s.cloud_replica),
                on_low_power: to_pb(&LOW_POWER_ACTIONS, s.on_low_power),
            })
            .collect(),
        mesh: Some(pb::MeshSettings {
            vehicle_outbound_port: u32::from(m.vehicle_outbound_port),
            vehicle_inbound_port: u32::from(m.vehicle_inbound_port),
            cloud_inbound_port: u32::from(m.cloud_inbound_port),
            mtls: to_pb(&MTLS_MODES, m.mtls),
            // The default travels as empty: a policy that does not set it encodes (and
            // so versions) as it did before the field existed.
            trust_domain: if m.trust_domain == TrustDomain::default() {
                String::new()
            } else {
                m.trust_domain.to_string()
            },
            vehicle_gateway_port: port_unless_default(
                m.vehicle_gateway_port,
                MeshSettings::default().vehicle_gateway_port,
            ),
            vehicle_tunnel_port: port_unless_default(
                m.vehicle_tunnel_port,
                MeshSettings::default().vehicle_tunnel_port,
            ),
            vehicle_gateways: m.vehicle_gateways.clone(),
            vehicle_tunnel_class: m.vehicle_tunnel_class.clone().unwrap_or_default(),
        }),
        // A whole policy: no delta fields.
        ..Default::default()
    };
    update.version = content_version(&update);
    update
}

/// The version of a policy: the same string on misaki-cp and on every vehicle.
pub fn version(policy: &Policy) -> String {
    to_wire(policy).version
}

/// A hash of the update's content (its `version` field excluded). Meant for whole
/// updates, whose delta fields are empty and so encode to nothing.
fn content_version(update: &pb::PolicyUpdate) -> String {
    let mut unversioned = update.clone();
    unversioned.version.clear();
    // Maps iterate in order (BTreeMap), so equal policies encode to equal bytes.
    format!(
        "{:016x}",
        xxhash_rust::xxh3::xxh3_64(&unversioned.encode_to_vec())
    )
}

/// The validated policy of a received update. Errors are the policy parser's, located
/// in the document [`render`] makes of the update (named `policy update <version>`).
pub fn from_wire(update: &pb::PolicyUpdate) -> Result<Policy, PolicyErrors> {
    misaki_policy::parse(
        &format!("policy update {}", update.version),
        &render(update),
    )
}

fn quoted(s: &str) -> String {
    // A JSON string is a valid YAML 1.2 double-quoted scalar.
    serde_json::to_string(s).expect("strings serialise")
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    let items: Vec<String> = items.into_iter().collect();
    format!("[{}]", items.join(", "))
}

/// The spelling of a wire enum value in policy files, or a token the parser rejects
/// with its list of allowed values.
fn spelled<D: Copy, W: Copy + Into<i32>>(
    table: &[(D, W)],
    v: i32,
    as_str: impl Fn(D) -> &'static str,
) -> String {
    quoted(&from_pb(table, v).map_or_else(|| format!("wire value {v}"), |d| as_str(d).to_string()))
}

/// The `mesh:` line of [`render`]. Defaults (an empty trust domain or tunnel class, a 0
/// gateway or tunnel port, no gateways) are not written.
fn render_mesh(m: &pb::MeshSettings) -> String {
    let mut f = vec![
        format!("vehicle_outbound_port: {}", m.vehicle_outbound_port),
        format!("vehicle_inbound_port: {}", m.vehicle_inbound_port),
        format!("cloud_inbound_port: {}", m.cloud_inbound_port),
        format!("mtls: {}", spelled(&MTLS_MODES, m.mtls, MtlsMode::as_str)),
    ];
    if !m.trust_domain.is_empty() {
        f.push(format!("trust_domain: {}", quoted(&m.trust_domain)));
    }
    if m.vehicle_gateway_port != 0 {
        f.push(format!("vehicle_gateway_port: {}", m.vehicle_gateway_port));
    }
    if m.vehicle_tunnel_port != 0 {
        f.push(format!("vehicle_tunnel_port: {}", m.vehicle_tunnel_port));
    }
    if !m.vehicle_gateways.is_empty() {
        f.push(format!(
            "vehicle_gateways: {}",
            list(m.vehicle_gateways.iter().map(|h| quoted(h)))
        ));
    }
    if !m.vehicle_tunnel_class.is_empty() {
        f.push(format!(
            "vehicle_tunnel_class: {}",
            quoted(&m.vehicle_tunnel_class)
        ));
    }
    format!("mesh: {{ {} }}\n", f.join(", "))
}

/// The update as a policy document (version 1), one item per line. Values are written
/// as received, so anything out of range reaches the parser and is reported there.
pub fn render(update: &pb::PolicyUpdate) -> String {
    let mut out = String::from("version: 1\n");
    if let Some(m) = &update.mesh {
        out.push_str(&render_mesh(m));
    }
    out.push_str("uplinks:");
    if update.uplinks.is_empty() {
        out.push_str(" []");
    }
    out.push('\n');
    for u in &update.uplinks {
        let _ = writeln!(
            out,
            "  - {{ name: {}, kind: {}, metered: {}, cost: {} }}",
            quoted(&u.name),
            spelled(&KINDS, u.kind, UplinkKind::as_str),
            u.metered,
            u.cost
        );
    }
    out.push_str("classes:");
    if update.classes.is_empty() {
        out.push_str(" []");
    }
    out.push('\n');
    for c in &update.classes {
        let mut f = vec![
            format!("name: {}", quoted(&c.name)),
            format!(
                "priority: {}",
                spelled(&PRIORITIES, c.priority, RoutePriority::as_str)
            ),
            format!("retries: {}", c.retries),
            format!("uplinks: {}", list(c.uplinks.iter().map(|u| quoted(u)))),
            format!("deferrable: {}", c.deferrable),
            format!("dscp: {}", c.dscp),
        ];
        let ms = |name: &str, v: Option<u64>| v.map(|v| format!("{name}: {v}ms"));
        f.extend(ms("timeout", c.timeout_ms));
        f.extend(ms("max_rtt", c.max_rtt_ms));
        f.extend(ms("ttl", c.ttl_ms));
        f.extend(c.max_loss_percent.map(|v| format!("max_loss_percent: {v}")));
        let _ = writeln!(out, "  - {{ {} }}", f.join(", "));
    }
    if !update.services.is_empty() {
        out.push_str("services:\n");
    }
    for s in &update.services {
        let mut f = vec![
            format!("name: {}", quoted(&s.name)),
            format!(
                "location: {}",
                spelled(&LOCATIONS, s.location, Location::as_str)
            ),
            format!(
                "protocol: {}",
                spelled(&PROTOCOLS, s.protocol, Protocol::as_str)
            ),
            format!("port: {}", s.port),
            format!("routes: {}", list(s.routes.iter().map(|r| quoted(r)))),
            format!("class: {}", quoted(&s.class)),
        ];
        if let Some(c) = &s.consumes {
            f.push(format!(
                "consumes: {}",
                list(c.names.iter().map(|n| quoted(n)))
            ));
        }
        if !s.endpoints.is_empty() {
            f.push(format!("endpoints: {}", render_endpoints(&s.endpoints)));
        }
        if !s.cloud_replica.is_empty() {
            f.push(format!(
                "cloud_replica: {}",
                render_endpoints(&s.cloud_replica)
            ));
        }
        // The zero value (stay) is the default: not written, so that edge and cloud
        // services (which may not have the field) render as before.
        if s.on_low_power != 0 {
            f.push(format!(
                "on_low_power: {}",
                spelled(&LOW_POWER_ACTIONS, s.on_low_power, LowPowerAction::as_str)
            ));
        }
        let _ = writeln!(out, "  - {{ {} }}", f.join(", "));
    }
    out
}

/// Endpoints as a flow list of `host:port` strings.
fn render_endpoints(endpoints: &[pb::Endpoint]) -> String {
    list(endpoints.iter().map(|e| {
        // IPv6 addresses travel without brackets; the file format wants them.
        if e.host.contains(':') {
            quoted(&format!("[{}]:{}", e.host, e.port))
        } else {
            quoted(&format!("{}:{}", e.host, e.port))
        }
    }))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod delta_tests;
