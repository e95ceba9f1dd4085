//! The mesh policy in the form vehicles receive it: the whole policy (edge-netd compiles
//! its own sidecar's configuration from it), with a content-derived version. The
//! conversion itself is `misaki-policy-wire`'s.
//!
//! Invariant: the version is a hash of the encoded content, so equal policies have
//! equal versions across control-plane restarts and a vehicle that already has the
//! current policy is not sent it again.

use misaki_policy::Policy;
use misaki_proto::fleet_v1 as pb;

/// A `PolicyUpdate` together with its version (also in `update.version`).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyVersioned {
    pub version: String,
    pub update: pb::PolicyUpdate,
}

/// Convert a validated policy to the message pushed to vehicles.
pub fn policy_update(policy: &Policy) -> PolicyVersioned {
    let update = misaki_policy_wire::to_wire(policy);
    PolicyVersioned {
        version: update.version.clone(),
        update,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use misaki_policy::{
        Endpoint, Location, MeshSettings, Protocol, RoutePriority, Service, TrafficClass, Uplink,
        UplinkKind,
    };
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
                    consumes: None,
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
