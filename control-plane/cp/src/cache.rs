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
    /// The gateway's scope of each vehicle in `fleet`, and all of them as cloud
    /// sidecars' SRDS content.
    scopes: BTreeMap<String, Arc<Resource>>,
    scope_resources: Resources,
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
        let snap = Arc::new(self.compile(key, prefix));
        let (tx, _) = watch::channel(snap.clone());
        self.entries.insert(key.clone(), tx);
        snap
    }

    fn compile(&self, key: &CompileKey, prefix: &str) -> Snapshot {
        let snap = key.compile(&self.policy, prefix);
        self.with_scopes(key, snap)
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
        let Some(relays) = self.relays.remove(vehicle) else {
            return 0;
        };
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
                scopes: BTreeMap::new(),
                scope_resources: Resources::from_items(&prefix, []),
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
        let mut inner = self.inner.lock().expect("cache lock");
        let before = inner.fleet.insert(vehicle.to_string(), facts);
        if before == Some(facts) {
            return 0;
        }
        let mut changed = 0;
        if before.map(VehicleFacts::reach) != Some(facts.reach()) {
            let scope = gateway::scope(&self.prefix, vehicle, facts.reach());
            inner.scopes.insert(vehicle.to_string(), scope);
            let all = inner.scopes.values().cloned().collect::<Vec<_>>();
            inner.scope_resources = Resources::from_items(&self.prefix, all);
            let clouds: Vec<CompileKey> = inner
                .entries
                .keys()
                .filter(|k| k.role == Role::Cloud)
                .cloned()
                .collect();
            for key in clouds {
                let cur = inner.entries[&key].borrow().clone();
                let next = inner.with_scopes(&key, (*cur).clone());
                changed += usize::from(send(&inner.entries[&key], Arc::new(next)));
            }
        }
        if inner.power_matters && before.map(|f| f.low_power) != Some(facts.low_power) {
            changed += inner.refresh_relays(vehicle, &self.prefix);
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
