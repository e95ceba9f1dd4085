//! The mesh policy in the form vehicles receive it: every uplink and traffic class,
//! with a content-derived version.
//!
//! Invariant: the version is a hash of the encoded content, so equal policies have
//! equal versions across control-plane restarts and a vehicle that already has the
//! current policy is not sent it again.

use misaki_policy::{Policy, UplinkKind};
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
                ttl_ms: c
                    .ttl
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
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
    use misaki_policy::{MeshSettings, RoutePriority, TrafficClass, Uplink};
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
            services: BTreeMap::new(),
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
    }
}
