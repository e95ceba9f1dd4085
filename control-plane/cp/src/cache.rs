//! The snapshot cache: compiled snapshots per compile key, followed by xDS streams.
//!
//! Invariants:
//! - nodes with the same [`CompileKey`] share one `Arc<Snapshot>`, so a fleet of
//!   identical vehicles costs one compilation and one copy of every resource, not one
//!   per vehicle;
//! - a policy change recompiles only keys that are followed, and a node is woken only
//!   if its snapshot actually changed (by versions), so only the nodes a change affects
//!   get pushes;
//! - per-vehicle state enters only where a snapshot depends on it: a vehicle's low
//!   power is part of its key only when the policy has an `on_low_power: cloud`
//!   service (vehicles in the same state still share); the gateway's per-vehicle
//!   scopes only in cloud snapshots; a vehicle's own tunnel listeners only on top of its
//!   key's shared snapshot (every other type stays shared, see
//!   [`misaki_compiler::with_vehicle_id`]). A vehicle's state change touches its
//!   gateway scope (one resource) and that vehicle's own snapshot, nothing else;
//! - the cache never holds a snapshot compiled from an invalid policy: it only ever
//!   sees validated [`Policy`] values.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use misaki_compiler::gateway::{self, Reach, VehicleConditions};
use misaki_compiler::node::{NodeInfo, Role};
use misaki_compiler::snapshot::{Resource, Resources, Snapshot};
use misaki_policy::{Location, LowPowerAction, Policy};
use misaki_xds::SnapshotSource;
use tokio::sync::watch;

/// What a node's snapshot depends on besides the policy: the role, whether the client
/// is proxyless gRPC, whether it speaks delta xDS (vehicle Envoys on delta take
/// undeclared services on demand), where its certificates are (data-plane mTLS names
/// its file-based SDS files; the same for a whole fleet unless set per node), and, for
/// a vehicle, its low power when the policy makes that matter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompileKey {
    pub role: Role,
    pub proxyless: bool,
    pub delta: bool,
    pub tls_dir: Option<String>,
    pub low_power: bool,
}

impl CompileKey {
    pub fn of(node: &NodeInfo) -> Self {
        CompileKey {
            role: node.role,
            proxyless: node.proxyless,
            delta: node.delta,
            tls_dir: node.tls_dir.clone(),
            low_power: false,
        }
    }

    /// A representative node for compiling this key.
    fn node(&self) -> NodeInfo {
        NodeInfo {
            id: String::new(),
            role: self.role,
            vehicle_id: None,
            proxyless: self.proxyless,
            delta: self.delta,
            tls_dir: self.tls_dir.clone(),
        }
    }

    fn compile(&self, policy: &Policy, prefix: &str) -> Snapshot {
        let conditions = VehicleConditions {
            low_power: self.low_power,
        };
        misaki_compiler::compile_in(policy, &self.node(), conditions, prefix)
    }
}

/// What the fleet registry says of a vehicle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VehicleFacts {
    pub online: bool,
    pub low_power: bool,
}

impl VehicleFacts {
    fn reach(self) -> Reach {
        match (self.online, self.low_power) {
            (false, _) => Reach::Offline,
            (true, true) => Reach::LowPower,
            (true, false) => Reach::Online,
        }
    }
}

/// A vehicle node's own channel: its key's shared snapshot, in its conditions, plus its
/// tunnel listeners.
#[derive(Debug)]
struct Relay {
    /// The node's key with `low_power` false; the vehicle's facts set it.
    base: CompileKey,
    tx: watch::Sender<Arc<Snapshot>>,
}

#[derive(Debug)]
struct Inner {
    policy: Arc<Policy>,
    /// Whether vehicles' low power changes their own snapshots under `policy`.
    power_matters: bool,
    /// Compiled snapshots per key; nodes without a vehicle id follow these channels
    /// directly, vehicles through their relays.
    entries: HashMap<CompileKey, watch::Sender<Arc<Snapshot>>>,
    relays: HashMap<String, Vec<Relay>>,
    fleet: BTreeMap<String, VehicleFacts>,
    /// The gateway's scope of each vehicle in `fleet` (by scope name) and its anchors,
    /// and all of them as cloud sidecars' SRDS content.
    scopes: BTreeMap<String, Arc<Resource>>,
    scope_resources: Arc<Resources>,
    /// `scope_resources` lags `scopes`: no cloud snapshot was followed when they
    /// changed, so the rebuild (over the whole fleet) waits until one is compiled.
    scopes_stale: bool,
}

/// Cheap to clone.
#[derive(Debug, Clone)]
pub struct SnapshotCache {
    prefix: Arc<str>,
    inner: Arc<Mutex<Inner>>,
}

fn power_matters(policy: &Policy) -> bool {
    policy
        .services
        .values()
        .any(|s| s.location == Location::Vehicle && s.on_low_power == LowPowerAction::Cloud)
}

impl Inner {
    /// The snapshot of `key` under the current policy and fleet, compiled if needed.
    fn snapshot(&mut self, key: &CompileKey, prefix: &str) -> Arc<Snapshot> {
        if let Some(tx) = self.entries.get(key) {
            return tx.borrow().clone();
        }
        self.fresh_scopes(prefix);
        let snap = Arc::new(self.compile(key, prefix));
        let (tx, _) = watch::channel(snap.clone());
        self.entries.insert(key.clone(), tx);
        snap
    }

    fn compile(&self, key: &CompileKey, prefix: &str) -> Snapshot {
        let snap = key.compile(&self.policy, prefix);
        self.with_scopes(key, snap)
    }

    /// Bring `scope_resources` up to `scopes` (see `scopes_stale`).
    fn fresh_scopes(&mut self, prefix: &str) {
        if self.scopes_stale {
            let all = self.scopes.values().cloned().collect::<Vec<_>>();
            self.scope_resources = Arc::new(Resources::from_items(prefix, all));
            self.scopes_stale = false;
        }
    }

    /// A cloud snapshot gets the gateway's per-vehicle scopes (when it has a gateway).
    fn with_scopes(&self, key: &CompileKey, snap: Snapshot) -> Snapshot {
        if key.role == Role::Cloud && !self.policy.mesh.vehicle_gateways.is_empty() {
            snap.with_scoped_routes(self.scope_resources.clone())
        } else {
            snap
        }
    }

    /// The key a vehicle's relay follows now.
    fn vehicle_key(&self, base: &CompileKey, vehicle: &str) -> CompileKey {
        let low_power = self.power_matters
            && base.role == Role::Vehicle
            && self.fleet.get(vehicle).is_some_and(|f| f.low_power);
        CompileKey {
            low_power,
            ..base.clone()
        }
    }

    fn relay_snapshot(&mut self, base: &CompileKey, vehicle: &str, prefix: &str) -> Arc<Snapshot> {
        let key = self.vehicle_key(base, vehicle);
        let shared = self.snapshot(&key, prefix);
        misaki_compiler::with_vehicle_id(&shared, &self.policy, vehicle, prefix)
    }

    /// Re-send every relay of `vehicle`; how many changed.
    fn refresh_relays(&mut self, vehicle: &str, prefix: &str) -> usize {
        let Some(mut relays) = self.relays.remove(vehicle) else {
            return 0;
        };
        // A relay nobody follows any more (its stream ended) is dropped, not updated.
        relays.retain(|r| r.tx.receiver_count() > 0);
        if relays.is_empty() {
            return 0;
        }
        let mut changed = 0;
        for r in &relays {
            let snap = self.relay_snapshot(&r.base, vehicle, prefix);
            changed += usize::from(send(&r.tx, snap));
        }
        self.relays.insert(vehicle.to_string(), relays);
        changed
    }
}

/// Replace the channel's snapshot unless it has the same versions; whether it did.
fn send(tx: &watch::Sender<Arc<Snapshot>>, next: Arc<Snapshot>) -> bool {
    tx.send_if_modified(|cur| {
        if cur.same_versions(&next) {
            false
        } else {
            *cur = next;
            true
        }
    })
}

impl SnapshotCache {
    /// `prefix` makes resource versions unique to this server instance.
    pub fn new(policy: Arc<Policy>, prefix: impl Into<Arc<str>>) -> Self {
        let prefix: Arc<str> = prefix.into();
        SnapshotCache {
            inner: Arc::new(Mutex::new(Inner {
                power_matters: power_matters(&policy),
                policy,
                entries: HashMap::new(),
                relays: HashMap::new(),
                fleet: BTreeMap::new(),
                scopes: gateway::anchors(&prefix)
                    .into_iter()
                    .map(|r| (r.name.to_string(), r))
                    .collect(),
                scope_resources: Arc::new(gateway::scopes(&prefix, &BTreeMap::new())),
                scopes_stale: false,
            })),
            prefix,
        }
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.inner.lock().expect("cache lock").policy.clone()
    }

    /// Put a new policy in force; returns how many channels (compile keys and vehicles'
    /// own) got a changed snapshot.
    pub fn set_policy(&self, policy: Arc<Policy>) -> usize {
        let mut inner = self.inner.lock().expect("cache lock");
        inner.power_matters = power_matters(&policy);
        inner.policy = policy;
        // Forget vehicles and keys nobody follows any more rather than recompiling them.
        inner.relays.retain(|_, rs| {
            rs.retain(|r| r.tx.receiver_count() > 0);
            !rs.is_empty()
        });
        // Keys only relays use are compiled again when a relay asks.
        inner.entries.retain(|_, tx| tx.receiver_count() > 0);
        let followed: Vec<CompileKey> = inner.entries.keys().cloned().collect();
        inner.fresh_scopes(&self.prefix);
        let mut changed = 0;
        for key in followed {
            let snap = Arc::new(inner.compile(&key, &self.prefix));
            changed += usize::from(send(&inner.entries[&key], snap));
        }
        let vehicles: Vec<String> = inner.relays.keys().cloned().collect();
        for v in vehicles {
            changed += inner.refresh_relays(&v, &self.prefix);
        }
        changed
    }

    /// What the fleet registry says of `vehicle` now. Updates its gateway scope in
    /// every cloud snapshot when its reach changed, and its own snapshot when its power
    /// matters; returns how many channels changed.
    pub fn set_vehicle(&self, vehicle: &str, facts: VehicleFacts) -> usize {
        self.set_vehicles([(vehicle.to_string(), facts)])
    }

    /// [`set_vehicle`](Self::set_vehicle) for several vehicles at once: cloud snapshots
    /// are rebuilt once for all of them (a fleet's first reports arrive in bursts, and
    /// each rebuild is O(vehicles)).
    pub fn set_vehicles(&self, batch: impl IntoIterator<Item = (String, VehicleFacts)>) -> usize {
        let mut inner = self.inner.lock().expect("cache lock");
        let (mut reach_changed, mut powered) = (false, Vec::new());
        for (vehicle, facts) in batch {
            let before = inner.fleet.insert(vehicle.clone(), facts);
            if before == Some(facts) {
                continue;
            }
            if before.map(VehicleFacts::reach) != Some(facts.reach()) {
                let scope = gateway::scope(&self.prefix, &vehicle, facts.reach());
                inner.scopes.insert(scope.name.to_string(), scope);
                reach_changed = true;
            }
            if inner.power_matters && before.map(|f| f.low_power) != Some(facts.low_power) {
                powered.push(vehicle);
            }
        }
        let mut changed = 0;
        if reach_changed {
            let clouds: Vec<CompileKey> = inner
                .entries
                .keys()
                .filter(|k| k.role == Role::Cloud)
                .cloned()
                .collect();
            // A replica without cloud sidecars skips the rebuild over the whole fleet
            // (a reconnect storm brings a batch per few ms).
            inner.scopes_stale = true;
            if !clouds.is_empty() {
                inner.fresh_scopes(&self.prefix);
            }
            for key in clouds {
                let cur = inner.entries[&key].borrow().clone();
                let next = inner.with_scopes(&key, (*cur).clone());
                changed += usize::from(send(&inner.entries[&key], Arc::new(next)));
            }
        }
        for vehicle in powered {
            changed += inner.refresh_relays(&vehicle, &self.prefix);
        }
        changed
    }
}

impl SnapshotSource for SnapshotCache {
    fn watch(&self, node: &NodeInfo) -> watch::Receiver<Arc<Snapshot>> {
        let key = CompileKey::of(node);
        let mut inner = self.inner.lock().expect("cache lock");
        match (&node.vehicle_id, node.role) {
            (Some(vehicle), Role::Vehicle) => {
                let snap = inner.relay_snapshot(&key, vehicle, &self.prefix);
                let relays = inner.relays.entry(vehicle.clone()).or_default();
                if let Some(r) = relays.iter().find(|r| r.base == key) {
                    return r.tx.subscribe();
                }
                let (tx, rx) = watch::channel(snap);
                relays.push(Relay { base: key, tx });
                rx
            }
            _ => {
                inner.snapshot(&key, &self.prefix);
                inner.entries[&key].subscribe()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use misaki_compiler::snapshot::ResourceType;

    /// Gateways on; `diag` moves to its replica on low power when `diag_low_power` is
    /// `on_low_power: cloud` (the policy is then power-dependent).
    fn policy_text(gateway_port: u16, diag_low_power: &str) -> String {
        format!(
            "version: 1
mesh: {{ vehicle_gateways: [gw-1.cloud.example], vehicle_tunnel_class: std, vehicle_gateway_port: {gateway_port} }}
uplinks:
  - {{ name: wifi, kind: wifi }}
classes:
  - {{ name: std, uplinks: [wifi] }}
services:
  - {{ name: maps, location: cloud, port: 8080, endpoints: [\"10.0.0.1:8080\"], routes: [/maps], class: std }}
  - {{ name: diag, location: vehicle, port: 7070, routes: [/diag], class: std, cloud_replica: [\"10.20.0.30:7070\"]{diag_low_power} }}
"
        )
    }

    fn parse(text: &str) -> Arc<Policy> {
        Arc::new(misaki_policy::parse("mesh.yaml", text).unwrap_or_else(|e| panic!("{e}")))
    }

    fn power_policy() -> Arc<Policy> {
        parse(&policy_text(15444, ", on_low_power: cloud"))
    }

    fn steady_policy() -> Arc<Policy> {
        parse(&policy_text(15444, ""))
    }

    fn no_gateway_policy() -> Arc<Policy> {
        parse(
            "version: 1
uplinks:
  - { name: wifi, kind: wifi }
classes:
  - { name: std, uplinks: [wifi] }
services:
  - { name: diag, location: vehicle, port: 7070, routes: [/diag], class: std, cloud_replica: [\"10.20.0.30:7070\"], on_low_power: cloud }
",
        )
    }

    fn vehicle(id: Option<&str>) -> NodeInfo {
        NodeInfo {
            id: id.unwrap_or("anonymous").into(),
            role: Role::Vehicle,
            vehicle_id: id.map(str::to_string),
            proxyless: false,
            delta: false,
            tls_dir: None,
        }
    }

    fn cloud() -> NodeInfo {
        NodeInfo {
            id: "cloud-1".into(),
            role: Role::Cloud,
            vehicle_id: None,
            proxyless: false,
            delta: false,
            tls_dir: None,
        }
    }

    const ONLINE: VehicleFacts = VehicleFacts {
        online: true,
        low_power: false,
    };
    const LOW_POWER: VehicleFacts = VehicleFacts {
        online: true,
        low_power: true,
    };
    const OFFLINE: VehicleFacts = VehicleFacts {
        online: false,
        low_power: false,
    };

    /// Resource names of type `t`, without the gateway's anchor scopes (`!` keys).
    fn names(s: &Snapshot, t: ResourceType) -> Vec<String> {
        s.get(t)
            .items
            .keys()
            .filter(|n| !n.contains('!'))
            .cloned()
            .collect()
    }

    fn scope_names(rx: &watch::Receiver<Arc<Snapshot>>) -> Vec<String> {
        names(&rx.borrow(), ResourceType::ScopedRoute)
    }

    fn changed_types(a: &Snapshot, b: &Snapshot) -> Vec<ResourceType> {
        ResourceType::PUSH_ORDER
            .into_iter()
            .filter(|t| a.get(*t).version != b.get(*t).version)
            .collect()
    }

    fn tunnel_listeners(s: &Snapshot) -> Vec<String> {
        names(s, ResourceType::Listener)
            .into_iter()
            .filter(|l| l.starts_with("vehicle_tunnel|"))
            .collect()
    }

    #[test]
    fn vehicles_with_the_same_key_share_everything_but_their_tunnel_listeners() {
        let cache = SnapshotCache::new(power_policy(), "p-");
        let car1 = cache.watch(&vehicle(Some("car-1")));
        let car2 = cache.watch(&vehicle(Some("car-2")));
        let anon = cache.watch(&vehicle(None));
        let (a, b, shared) = (
            car1.borrow().clone(),
            car2.borrow().clone(),
            anon.borrow().clone(),
        );
        for t in ResourceType::PUSH_ORDER {
            let same = std::ptr::eq(a.get(t), b.get(t)) && std::ptr::eq(a.get(t), shared.get(t));
            assert_eq!(same, t != ResourceType::Listener, "{t:?}");
        }
        assert_eq!(tunnel_listeners(&a), ["vehicle_tunnel|gw-1.cloud.example"]);
        assert_eq!(tunnel_listeners(&b), ["vehicle_tunnel|gw-1.cloud.example"]);
        assert!(tunnel_listeners(&shared).is_empty());
        assert_ne!(
            a.get(ResourceType::Listener).version,
            b.get(ResourceType::Listener).version,
            "each announces its own id"
        );
        // A second stream of the same vehicle follows the same relay.
        let again = cache.watch(&vehicle(Some("car-1")));
        assert!(Arc::ptr_eq(&again.borrow(), &a));
        // The same as compiling for the vehicle.
        let direct = misaki_compiler::compile(&power_policy(), &vehicle(Some("car-1")), "p-");
        assert!(a.same_versions(&direct));
    }

    #[test]
    fn a_cloud_snapshot_gets_a_scope_per_vehicle() {
        let cache = SnapshotCache::new(power_policy(), "p-");
        // Known before the cloud sidecar connects (the scope set is built only then).
        cache.set_vehicle("car-1", ONLINE);
        cache.set_vehicle("car-3", ONLINE);
        cache.set_vehicle("car-3", OFFLINE);
        let rx = cache.watch(&cloud());
        assert_eq!(
            scope_names(&rx),
            ["vehicle_gateway/car-1", "vehicle_gateway/car-3"]
        );
        assert_eq!(cache.set_vehicle("car-2", OFFLINE), 1);
        assert_eq!(
            scope_names(&rx),
            [
                "vehicle_gateway/car-1",
                "vehicle_gateway/car-2",
                "vehicle_gateway/car-3"
            ]
        );
        // Vehicles never get the gateway's scopes.
        let car = cache.watch(&vehicle(Some("car-1")));
        assert!(car.borrow().get(ResourceType::ScopedRoute).items.is_empty());
    }

    #[test]
    fn going_offline_changes_the_cloud_channel_and_no_vehicles_relay() {
        let cache = SnapshotCache::new(power_policy(), "p-");
        let mut cloud_rx = cache.watch(&cloud());
        let mut car1 = cache.watch(&vehicle(Some("car-1")));
        let mut car2 = cache.watch(&vehicle(Some("car-2")));
        cache.set_vehicle("car-1", ONLINE);
        cache.set_vehicle("car-2", ONLINE);
        let before = cloud_rx.borrow_and_update().clone();
        car1.mark_unchanged();
        car2.mark_unchanged();

        assert_eq!(cache.set_vehicle("car-1", OFFLINE), 1, "the cloud key only");
        assert!(cloud_rx.has_changed().expect("open"));
        assert!(!car2.has_changed().expect("open"));
        assert!(
            !car1.has_changed().expect("open"),
            "its own snapshot does not depend on reach"
        );
        let after = cloud_rx.borrow_and_update().clone();
        assert_eq!(changed_types(&before, &after), [ResourceType::ScopedRoute]);
        let scopes = |s: &Snapshot, v: &str| {
            s.get(ResourceType::ScopedRoute).items[&gateway::scope_name(v)].clone()
        };
        assert_ne!(
            scopes(&before, "car-1").version,
            scopes(&after, "car-1").version
        );
        assert!(Arc::ptr_eq(
            &scopes(&before, "car-2"),
            &scopes(&after, "car-2")
        ));
        assert_eq!(
            *scopes(&after, "car-1"),
            *gateway::scope("p-", "car-1", Reach::Offline)
        );
        // Everything but SRDS is the same allocation.
        for t in ResourceType::PUSH_ORDER {
            if t != ResourceType::ScopedRoute {
                assert!(std::ptr::eq(before.get(t), after.get(t)), "{t:?}");
            }
        }
    }

    #[test]
    fn low_power_changes_only_that_vehicles_relay_when_the_policy_makes_it_matter() {
        let cache = SnapshotCache::new(power_policy(), "p-");
        let mut cloud_rx = cache.watch(&cloud());
        let mut car1 = cache.watch(&vehicle(Some("car-1")));
        let mut car2 = cache.watch(&vehicle(Some("car-2")));
        cache.set_vehicle("car-1", ONLINE);
        cache.set_vehicle("car-2", ONLINE);
        cloud_rx.mark_unchanged();
        let before = car1.borrow_and_update().clone();
        car2.mark_unchanged();

        assert_eq!(
            cache.set_vehicle("car-1", LOW_POWER),
            2,
            "cloud key and car-1"
        );
        assert!(
            cloud_rx.has_changed().expect("open"),
            "its scope names low-power"
        );
        assert!(car1.has_changed().expect("open"));
        assert!(!car2.has_changed().expect("open"));
        let after = car1.borrow_and_update().clone();
        assert_eq!(changed_types(&before, &after), [ResourceType::Route]);
        // car-1 in low power shares the low-power key's resources with a vehicle in
        // the same state.
        let mut car3 = cache.watch(&vehicle(Some("car-3")));
        cache.set_vehicle("car-3", LOW_POWER);
        assert!(car3.has_changed().expect("open"));
        let c3 = car3.borrow_and_update().clone();
        assert!(std::ptr::eq(
            c3.get(ResourceType::Route),
            after.get(ResourceType::Route)
        ));
        // Back to normal: the snapshot it had.
        cloud_rx.mark_unchanged();
        assert_eq!(cache.set_vehicle("car-1", ONLINE), 2);
        assert!(car1.borrow_and_update().same_versions(&before));
        assert!(!car2.has_changed().expect("open"));
    }

    #[test]
    fn low_power_touches_only_the_gateway_scope_when_the_policy_does_not_make_it_matter() {
        let cache = SnapshotCache::new(steady_policy(), "p-");
        let mut cloud_rx = cache.watch(&cloud());
        let mut car1 = cache.watch(&vehicle(Some("car-1")));
        cache.set_vehicle("car-1", ONLINE);
        cloud_rx.mark_unchanged();
        car1.mark_unchanged();
        assert_eq!(cache.set_vehicle("car-1", LOW_POWER), 1);
        assert!(cloud_rx.has_changed().expect("open"));
        assert!(!car1.has_changed().expect("open"));
    }

    #[test]
    fn unchanged_facts_change_nothing() {
        let cache = SnapshotCache::new(power_policy(), "p-");
        let mut cloud_rx = cache.watch(&cloud());
        let mut car1 = cache.watch(&vehicle(Some("car-1")));
        assert_eq!(cache.set_vehicle("car-1", LOW_POWER), 2);
        cloud_rx.mark_unchanged();
        car1.mark_unchanged();
        assert_eq!(cache.set_vehicle("car-1", LOW_POWER), 0);
        assert!(!cloud_rx.has_changed().expect("open"));
        assert!(!car1.has_changed().expect("open"));
        // Offline with and without low power: the same reach; the vehicle's own
        // snapshot still follows its power.
        assert_eq!(
            cache.set_vehicle(
                "car-1",
                VehicleFacts {
                    online: false,
                    low_power: true
                }
            ),
            1
        );
        cloud_rx.mark_unchanged();
        assert_eq!(cache.set_vehicle("car-1", OFFLINE), 1, "car-1's relay only");
        assert!(!cloud_rx.has_changed().expect("open"));
    }

    #[test]
    fn without_gateways_fleet_facts_touch_no_cloud_snapshot() {
        let cache = SnapshotCache::new(no_gateway_policy(), "p-");
        let mut cloud_rx = cache.watch(&cloud());
        let mut car2 = cache.watch(&vehicle(Some("car-2")));
        cloud_rx.mark_unchanged();
        car2.mark_unchanged();
        assert_eq!(cache.set_vehicle("car-1", ONLINE), 0);
        assert_eq!(cache.set_vehicle("car-1", OFFLINE), 0);
        assert!(!cloud_rx.has_changed().expect("open"));
        assert!(
            cloud_rx
                .borrow()
                .get(ResourceType::ScopedRoute)
                .items
                .is_empty()
        );
        // Power still moves the vehicle's own callers.
        let mut car1 = cache.watch(&vehicle(Some("car-1")));
        car1.mark_unchanged();
        assert_eq!(cache.set_vehicle("car-1", LOW_POWER), 1);
        assert!(car1.has_changed().expect("open"));
        assert!(!car2.has_changed().expect("open"));
        // No gateways: the relay is the key's snapshot itself.
        let anon = cache.watch(&vehicle(None));
        assert!(
            !Arc::ptr_eq(&car1.borrow(), &anon.borrow()),
            "car-1 is low power"
        );
        assert!(Arc::ptr_eq(&car2.borrow(), &anon.borrow()));
    }

    #[test]
    fn set_policy_keeps_receivers_working() {
        let cache = SnapshotCache::new(power_policy(), "p-");
        let mut cloud_rx = cache.watch(&cloud());
        let mut car1 = cache.watch(&vehicle(Some("car-1")));
        let mut car2 = cache.watch(&vehicle(Some("car-2")));
        cache.set_vehicle("car-1", LOW_POWER);
        cache.set_vehicle("car-2", ONLINE);
        let cloud_before = cloud_rx.borrow_and_update().clone();
        let car1_before = car1.borrow_and_update().clone();
        car2.mark_unchanged();

        // The gateway moves to another port: cloud listeners change, vehicles' do not.
        let next = parse(&policy_text(16444, ", on_low_power: cloud"));
        assert_eq!(cache.set_policy(next.clone()), 1);
        assert!(cloud_rx.has_changed().expect("open"));
        assert!(!car1.has_changed().expect("open"));
        let cloud_after = cloud_rx.borrow_and_update().clone();
        assert_eq!(
            changed_types(&cloud_before, &cloud_after),
            [ResourceType::Listener]
        );
        // The fleet's scopes survive a policy change.
        assert_eq!(
            names(&cloud_after, ResourceType::ScopedRoute),
            ["vehicle_gateway/car-1", "vehicle_gateway/car-2"]
        );
        let expected =
            misaki_compiler::compile_in(&next, &cloud(), VehicleConditions::default(), "p-");
        assert_eq!(
            cloud_after.get(ResourceType::Listener),
            expected.get(ResourceType::Listener)
        );

        // Power no longer matters: car-1 goes back to the vehicle's own instance, and
        // no vehicle keeps the replica's clusters (they existed for low power only).
        assert_eq!(
            cache.set_policy(steady_policy()),
            3,
            "the cloud key, car-1 and car-2"
        );
        assert!(car1.has_changed().expect("open"));
        assert!(car2.has_changed().expect("open"));
        let car1_after = car1.borrow_and_update().clone();
        assert_eq!(
            changed_types(&car1_before, &car1_after),
            [
                ResourceType::Cluster,
                ResourceType::Endpoint,
                ResourceType::Route
            ]
        );
        // Both vehicles are in the same key again: shared resources.
        for t in ResourceType::PUSH_ORDER {
            if t != ResourceType::Listener {
                assert!(
                    std::ptr::eq(car1_after.get(t), car2.borrow().get(t)),
                    "{t:?}"
                );
            }
        }
        // Old receivers still follow fleet changes.
        cloud_rx.mark_unchanged();
        assert_eq!(cache.set_vehicle("car-2", OFFLINE), 1);
        assert!(cloud_rx.has_changed().expect("open"));

        // The same policy again: nothing to push.
        assert_eq!(cache.set_policy(steady_policy()), 0);
    }

    #[test]
    fn a_policy_that_makes_power_matter_moves_vehicles_already_in_low_power() {
        let cache = SnapshotCache::new(steady_policy(), "p-");
        let mut car1 = cache.watch(&vehicle(Some("car-1")));
        let mut car2 = cache.watch(&vehicle(Some("car-2")));
        cache.set_vehicle("car-1", LOW_POWER);
        cache.set_vehicle("car-2", ONLINE);
        assert!(
            !car1.has_changed().expect("open"),
            "power does not matter yet"
        );
        let car1_before = car1.borrow_and_update().clone();
        car2.mark_unchanged();
        cache.set_policy(power_policy());
        assert!(car1.has_changed().expect("open"));
        assert!(
            car2.has_changed().expect("open"),
            "the replica's clusters appear"
        );
        let (a, b) = (car1.borrow().clone(), car2.borrow().clone());
        assert_ne!(
            a.get(ResourceType::Route).version,
            b.get(ResourceType::Route).version,
            "car-1 is low power, car-2 is not"
        );
        assert_eq!(
            a.get(ResourceType::Cluster).version,
            b.get(ResourceType::Cluster).version
        );
        let low = misaki_compiler::compile_in(
            &power_policy(),
            &vehicle(Some("car-1")),
            VehicleConditions { low_power: true },
            "p-",
        );
        assert!(a.same_versions(&low));
        assert_ne!(
            car1_before.get(ResourceType::Route).version,
            a.get(ResourceType::Route).version
        );
    }

    #[test]
    fn a_batch_is_one_cloud_change_and_ends_where_single_steps_end() {
        let one_by_one = SnapshotCache::new(power_policy(), "p-");
        let batched = SnapshotCache::new(power_policy(), "p-");
        let (single_rx, batch_rx) = (one_by_one.watch(&cloud()), batched.watch(&cloud()));
        let mut car1 = batched.watch(&vehicle(Some("car-1")));
        car1.mark_unchanged();
        let batch = [("car-1", LOW_POWER), ("car-2", ONLINE), ("car-3", OFFLINE)];
        for (v, f) in batch {
            one_by_one.set_vehicle(v, f);
        }
        let owned = batch.map(|(v, f)| (v.to_string(), f));
        assert_eq!(
            batched.set_vehicles(owned.clone()),
            2,
            "the cloud key once, car-1"
        );
        assert!(car1.has_changed().expect("open"), "low power");
        assert!(batch_rx.borrow().same_versions(&single_rx.borrow()));
        assert_eq!(batched.set_vehicles(owned), 0, "nothing new");
    }

    #[test]
    fn incremental_scopes_equal_scopes_of_the_final_fleet() {
        let cache = SnapshotCache::new(power_policy(), "p-");
        let early = cache.watch(&cloud());
        let steps = [
            ("car-1", ONLINE),
            ("car-2", OFFLINE),
            ("car-3", LOW_POWER),
            ("car-1", LOW_POWER),
            ("car-2", ONLINE),
            ("car-1", OFFLINE),
            (
                "car-3",
                VehicleFacts {
                    online: false,
                    low_power: true,
                },
            ),
            ("car-4", ONLINE),
            ("car-4", ONLINE),
            ("car-2", LOW_POWER),
        ];
        let mut fleet = BTreeMap::new();
        for (i, (v, f)) in steps.into_iter().enumerate() {
            cache.set_vehicle(v, f);
            fleet.insert(v.to_string(), f.reach());
            let full = gateway::scopes("p-", &fleet);
            assert_eq!(
                *early.borrow().get(ResourceType::ScopedRoute),
                full,
                "step {i}"
            );
        }
        // A cloud key compiled now (another tls_dir) agrees.
        let mut other = cloud();
        other.tls_dir = Some("/var/lib/misaki/tls".into());
        let late = cache.watch(&other);
        assert_eq!(
            *late.borrow().get(ResourceType::ScopedRoute),
            gateway::scopes("p-", &fleet)
        );
        assert_eq!(
            fleet.values().copied().collect::<Vec<_>>(),
            [
                Reach::Offline,
                Reach::LowPower,
                Reach::Offline,
                Reach::Online
            ]
        );
    }
}
