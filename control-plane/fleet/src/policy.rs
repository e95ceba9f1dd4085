//! The mesh policy in the form vehicles receive it: every uplink, traffic class and
//! service (edge-netd's store-and-forward maps requests to services and their classes),
//! with a content-derived version.
//!
//! Invariant: the version is a hash of the encoded content, so equal policies have
//! equal versions across control-plane restarts and a vehicle that already has the
//! current policy is not sent it again.

use misaki_policy::{Location, Policy, Protocol, RoutePriority, UplinkKind};
use misaki_proto::fleet_v1 as pb;
use prost::Message;

/// A `PolicyUpdate` together with its version (also in `update.version`).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyVersioned {
    pub version: String,
    pub update: pb::PolicyUpdate,
}

fn kind(k: UplinkKind) -> pb::UplinkKind {
    match k {
        UplinkKind::Lte => pb::UplinkKind::Lte,
        UplinkKind::FiveG => pb::UplinkKind::FiveG,
        UplinkKind::ThreeG => pb::UplinkKind::ThreeG,
        UplinkKind::Wifi => pb::UplinkKind::Wifi,
        UplinkKind::Dsrc => pb::UplinkKind::Dsrc,
        UplinkKind::Lpwa => pb::UplinkKind::Lpwa,
    }
}

fn location(l: Location) -> pb::Location {
    match l {
        Location::Vehicle => pb::Location::Vehicle,
        Location::Edge => pb::Location::Edge,
        Location::Cloud => pb::Location::Cloud,
    }
}

fn protocol(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Http => pb::Protocol::Http,
        Protocol::Grpc => pb::Protocol::Grpc,
    }
}

fn priority(p: RoutePriority) -> pb::RoutePriority {
    match p {
        RoutePriority::Default => pb::RoutePriority::Default,
        RoutePriority::High => pb::RoutePriority::High,
    }
}

fn millis_u64(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn millis_u32(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Convert a validated policy to the message pushed to vehicles.
pub fn policy_update(policy: &Policy) -> PolicyVersioned {
    let mut update = pb::PolicyUpdate {
        version: String::new(),
        uplinks: policy
            .uplinks
            .values()
            .map(|u| pb::Uplink {
                name: u.name.clone(),
                kind: kind(u.kind) as i32,
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
                max_rtt_ms: c.max_rtt.map(millis_u32),
                max_loss_percent: c.max_loss_percent.map(u32::from),
                deferrable: c.deferrable,
                dscp: u32::from(c.dscp),
                ttl_ms: c.ttl.map(millis_u64),
                priority: priority(c.priority) as i32,
                timeout_ms: Some(millis_u64(c.timeout)),
                retries: c.retries,
            })
            .collect(),
        services: policy
            .services
            .values()
            .map(|s| pb::Service {
                name: s.name.clone(),
                location: location(s.location) as i32,
                protocol: protocol(s.protocol) as i32,
                port: u32::from(s.port),
                endpoints: s
                    .endpoints
                    .iter()
                    .map(|e| pb::Endpoint {
                        host: e.host.clone(),
                        port: u32::from(e.port),
                    })
                    .collect(),
                routes: s.routes.clone(),
                class: s.class.clone(),
            })
            .collect(),
    };
    // BTreeMap iteration makes the encoding deterministic, hence the hash.
    let version = format!(
        "{:016x}",
        xxhash_rust::xxh3::xxh3_64(&update.encode_to_vec())
    );
    update.version = version.clone();
    PolicyVersioned { version, update }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use misaki_policy::{Endpoint, MeshSettings, Service, TrafficClass, Uplink};
    use std::collections::BTreeMap;
    use std::time::Duration;

    pub(crate) fn demo_policy(max_rtt_ms: Option<u64>) -> Policy {
        let uplinks: BTreeMap<_, _> = [("wifi", UplinkKind::Wifi, 1), ("lte", UplinkKind::Lte, 5)]
            .into_iter()
            .map(|(n, k, c)| {
                (
                    n.to_string(),
                    Uplink {
                        name: n.into(),
                        kind: k,
                        metered: c > 1,
                        cost: c,
                    },
                )
            })
            .collect();
        let class = TrafficClass {
            name: "critical".into(),
            priority: RoutePriority::High,
            timeout: Duration::from_secs(1),
            retries: 2,
            uplinks: vec!["wifi".into(), "lte".into()],
            deferrable: false,
            dscp: 46,
            max_rtt: max_rtt_ms.map(Duration::from_millis),
            max_loss_percent: Some(5),
            ttl: None,
        };
        Policy {
            mesh: MeshSettings::default(),
            uplinks,
            classes: [("critical".to_string(), class)].into_iter().collect(),
            services: [(
                "telemetry".to_string(),
                Service {
                    name: "telemetry".into(),
                    location: Location::Cloud,
                    protocol: Protocol::Http,
                    port: 8080,
                    endpoints: vec![Endpoint {
                        host: "198.18.0.1".into(),
                        port: 8080,
                    }],
                    routes: vec!["/telemetry".into()],
                    class: "critical".into(),
                },
            )]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn equal_policies_have_equal_versions_and_different_ones_differ() {
        let a = policy_update(&demo_policy(Some(100)));
        let b = policy_update(&demo_policy(Some(100)));
        let c = policy_update(&demo_policy(Some(200)));
        assert_eq!(a.version, b.version);
        assert_ne!(a.version, c.version);
        assert_eq!(a.update.version, a.version);
        let class = &a.update.classes[0];
        assert_eq!(class.uplinks, vec!["wifi", "lte"]);
        assert_eq!(class.max_rtt_ms, Some(100));
        assert_eq!(class.max_loss_percent, Some(5));
        assert_eq!(a.update.uplinks.len(), 2);
        assert_eq!(class.priority, pb::RoutePriority::High as i32);
        assert_eq!(class.timeout_ms, Some(1000));
        assert_eq!(class.retries, 2);
    }

    #[test]
    fn services_reach_the_vehicle_with_their_class_and_routes() {
        let a = policy_update(&demo_policy(None));
        let s = &a.update.services[0];
        assert_eq!(s.name, "telemetry");
        assert_eq!(s.location, pb::Location::Cloud as i32);
        assert_eq!(s.protocol, pb::Protocol::Http as i32);
        assert_eq!(s.port, 8080);
        assert_eq!(s.routes, vec!["/telemetry"]);
        assert_eq!(s.class, "critical");
        assert_eq!(s.endpoints[0].host, "198.18.0.1");
        assert_eq!(s.endpoints[0].port, 8080);
    }
}
