//! The mesh policy in the form vehicles receive it: the whole policy (edge-netd compiles
//! its own sidecar's configuration from it) with a content-derived version, or a delta
//! from a recent version. Conversion and deltas themselves are `misaki-policy-wire`'s.
//!
//! Invariants:
//! - The version is a hash of the encoded content, so equal policies have equal
//!   versions across control-plane restarts and a vehicle that already has the current
//!   policy is not sent it again.
//! - [`PolicyHistory`] remembers the last [`HISTORY_LEN`] whole policies. A new policy's
//!   deltas from each of them are built once, when it arrives, and shared by every
//!   vehicle stream: 10,000 vehicles at one base cost one diff, not 10,000.
//! - A delta is kept only when it is smaller than the whole policy; otherwise (and for
//!   a base not remembered) the vehicle gets the whole policy.
//!
//! Why 16 versions: each entry is one whole policy (~180 KB for 3,000 services), so
//! the history and its deltas stay under ~6 MB; edits arrive at operator pace, so 16
//! covers a vehicle that was offline through a day of edits, and one further behind
//! gets the whole policy, which is then barely larger than the delta would be.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use misaki_policy::Policy;
use misaki_proto::fleet_v1 as pb;
use prost::Message;

/// How many recent whole policies deltas are built from.
pub const HISTORY_LEN: usize = 16;

/// Whether a sent `PolicyUpdate` is the whole policy or a delta (the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpdateKind {
    Full,
    Delta,
}

impl UpdateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateKind::Full => "full",
            UpdateKind::Delta => "delta",
        }
    }
}

/// A whole `PolicyUpdate` with its version (also in `update.version`), and the deltas
/// to it from recent versions.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyVersioned {
    pub version: String,
    pub update: Arc<pb::PolicyUpdate>,
    /// By base version; only deltas smaller than `update`.
    deltas: BTreeMap<String, Arc<pb::PolicyUpdate>>,
}

impl PolicyVersioned {
    /// What to send a vehicle holding version `held`: the delta from it if the vehicle
    /// takes deltas and one was built, else the whole policy.
    pub fn update_for(&self, held: &str, deltas: bool) -> (UpdateKind, &Arc<pb::PolicyUpdate>) {
        match self.deltas.get(held).filter(|_| deltas) {
            Some(d) => (UpdateKind::Delta, d),
            None => (UpdateKind::Full, &self.update),
        }
    }

    /// The base versions a delta exists from.
    pub fn delta_bases(&self) -> impl Iterator<Item = &str> {
        self.deltas.keys().map(String::as_str)
    }
}

/// Convert a validated policy to the whole message pushed to vehicles (no deltas).
pub fn policy_update(policy: &Policy) -> PolicyVersioned {
    let update = misaki_policy_wire::to_wire(policy);
    PolicyVersioned {
        version: update.version.clone(),
        update: Arc::new(update),
        deltas: BTreeMap::new(),
    }
}

/// The last [`HISTORY_LEN`] whole policies, oldest first.
#[derive(Debug, Default)]
pub struct PolicyHistory {
    recent: VecDeque<Arc<pb::PolicyUpdate>>,
}

impl PolicyHistory {
    /// `whole` (from `misaki_policy_wire::to_wire`) with its deltas from every
    /// remembered version; then `whole` is remembered as the newest.
    pub fn push(&mut self, whole: pb::PolicyUpdate) -> PolicyVersioned {
        let update = Arc::new(whole);
        // A policy edited back to an earlier version becomes the newest entry, once.
        self.recent.retain(|p| p.version != update.version);
        let size = update.encoded_len();
        let deltas = self
            .recent
            .iter()
            .filter_map(|base| misaki_policy_wire::diff(base, &update))
            .filter(|d| d.encoded_len() < size)
            .map(|d| (d.base_version.clone(), Arc::new(d)))
            .collect();
        self.recent.push_back(Arc::clone(&update));
        if self.recent.len() > HISTORY_LEN {
            self.recent.pop_front();
        }
        PolicyVersioned {
            version: update.version.clone(),
            update,
            deltas,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use misaki_policy::{
        Endpoint, Location, LowPowerAction, MeshSettings, Protocol, RoutePriority, Service,
        TrafficClass, Uplink, UplinkKind,
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
                    cloud_replica: Vec::new(),
                    on_low_power: LowPowerAction::Stay,
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

    fn whole(rtt_ms: u64) -> pb::PolicyUpdate {
        misaki_policy_wire::to_wire(&demo_policy(Some(rtt_ms)))
    }

    #[test]
    fn deltas_are_built_from_the_last_versions_only_and_shared() {
        let mut history = PolicyHistory::default();
        let olds: Vec<pb::PolicyUpdate> = (1..=HISTORY_LEN as u64 + 1).map(whole).collect();
        for w in &olds {
            history.push(w.clone());
        }
        let newest = history.push(whole(1000));
        assert_eq!(newest.delta_bases().count(), HISTORY_LEN);
        // The oldest fell out of the history: the whole policy for it.
        let (kind, u) = newest.update_for(&olds[0].version, true);
        assert_eq!((kind, &**u), (UpdateKind::Full, &*newest.update));
        for base in &olds[1..] {
            let (kind, d) = newest.update_for(&base.version, true);
            assert_eq!(kind, UpdateKind::Delta);
            assert_eq!(
                misaki_policy_wire::apply(base, d).as_ref(),
                Ok(&*newest.update)
            );
            // Every stream at this base gets the same bytes, built once.
            assert!(Arc::ptr_eq(d, newest.update_for(&base.version, true).1));
            // A vehicle that does not take deltas gets the whole policy.
            assert_eq!(newest.update_for(&base.version, false).0, UpdateKind::Full);
        }
        assert_eq!(newest.update_for("", true).0, UpdateKind::Full);
    }

    #[test]
    fn a_policy_edited_back_is_remembered_once_and_has_no_delta_from_itself() {
        let mut history = PolicyHistory::default();
        let (a, b) = (whole(1), whole(2));
        history.push(a.clone());
        history.push(b.clone());
        let again = history.push(a.clone());
        assert_eq!(
            again.delta_bases().collect::<Vec<_>>(),
            [b.version.as_str()]
        );
        let next = history.push(whole(3));
        let mut bases: Vec<&str> = next.delta_bases().collect();
        bases.sort_unstable();
        let mut want = [a.version.as_str(), b.version.as_str()];
        want.sort_unstable();
        assert_eq!(bases, want);
    }

    #[test]
    fn a_delta_no_smaller_than_the_whole_policy_is_not_kept() {
        // Every item renamed: the delta would repeat the whole policy plus removals.
        let mut other = demo_policy(Some(1));
        let renamed = |n: &str| format!("{n}-2");
        other.uplinks = std::mem::take(&mut other.uplinks)
            .into_values()
            .map(|mut u| {
                u.name = renamed(&u.name);
                (u.name.clone(), u)
            })
            .collect();
        other.classes = std::mem::take(&mut other.classes)
            .into_values()
            .map(|mut c| {
                c.name = renamed(&c.name);
                c.uplinks = c.uplinks.iter().map(|u| renamed(u)).collect();
                (c.name.clone(), c)
            })
            .collect();
        other.services = std::mem::take(&mut other.services)
            .into_values()
            .map(|mut s| {
                s.name = renamed(&s.name);
                s.class = renamed(&s.class);
                (s.name.clone(), s)
            })
            .collect();
        let (a, b) = (whole(1), misaki_policy_wire::to_wire(&other));
        let d = misaki_policy_wire::diff(&a, &b).unwrap();
        assert!(d.encoded_len() > b.encoded_len());
        let mut history = PolicyHistory::default();
        history.push(a.clone());
        let pushed = history.push(b.clone());
        assert_eq!(pushed.delta_bases().count(), 0);
        assert_eq!(pushed.update_for(&a.version, true).0, UpdateKind::Full);
    }
}
