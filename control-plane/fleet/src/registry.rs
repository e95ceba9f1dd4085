//! The fleet registry: latest state per vehicle, liveness, change events, metrics.
//!
//! Invariants:
//! - One [`VehicleRecord`] per vehicle id, created by its first `Hello` and kept
//!   (offline) after it disconnects, so `/fleet` still shows the last known state.
//! - `online` is true iff the vehicle's newest stream is open and not timed out;
//!   `vehicles_online` gauge always equals the number of records with `online`.
//! - Each mutation sends exactly one [`FleetEvent`] after the lock is released.
//! - A vehicle's sidecar list (the clients of its local xDS tier) is only ever
//!   replaced whole: by each `LinkState`, and by a `LinkChange` with
//!   `sidecars_changed` (whose list may be empty); other `LinkChange`s leave it.
//!
//! Locking: one `std::sync::Mutex` around the map; critical sections are short and
//! never await, so a blocking mutex is cheaper than an async one here.

use crate::policy::UpdateKind;
use crate::record::{LinkRecord, Power, QueueRecord, SelectionRecord, SidecarRecord, VehicleState};
use misaki_proto::fleet_v1 as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

/// A vehicle is offline after this many heartbeat intervals without any message.
pub const OFFLINE_AFTER_HEARTBEATS: u32 = 3;

/// Capacity of the event channel; a subscriber that lags further gets
/// `RecvError::Lagged` and must resync from the whole registry.
const EVENT_CAPACITY: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("the first message of a stream must be Hello")]
    HelloFirst,
    #[error("Hello.vehicle_id is empty")]
    EmptyVehicleId,
    #[error("Hello.vehicle_id {0:?} is longer than 128 bytes")]
    VehicleIdTooLong(usize),
    #[error(
        "Hello.vehicle_id {0:?} is not a vehicle id: 1 to 128 of A-Z a-z 0-9 . _ - (not . or ..)"
    )]
    InvalidVehicleId(String),
    #[error("vehicle {0:?} is not registered")]
    UnknownVehicle(String),
}

/// Which vehicle changed and how. The compiler recomputes only that vehicle's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetEvent {
    pub vehicle_id: Arc<str>,
    pub kind: FleetEventKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetEventKind {
    /// Connected (Hello) — possibly a reconnect.
    Online,
    /// Stream ended or heartbeat timeout.
    Offline,
    /// Links, selections, queues, power or sidecars changed (snapshot or delta).
    State,
}

/// One vehicle: what it reported ([`VehicleState`], shown as JSON) and the registry's
/// own bookkeeping of its streams and clock.
#[derive(Debug, Clone)]
struct VehicleRecord {
    state: VehicleState,
    heartbeat_interval: Duration,
    /// Identifies the newest stream; an older stream's end must not mark us offline.
    stream: u64,
    connected_at: SystemTime,
    last_seen: Instant,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Default)]
struct Metrics {
    online: Gauge,
    reports: Family<KindLabel, Counter>,
    link_changes: Counter,
    policy_bytes: Counter,
    policy_updates: Family<KindLabel, Counter>,
    policy_resyncs: Counter,
}

#[derive(Debug)]
struct Inner {
    vehicles: Mutex<BTreeMap<Arc<str>, VehicleRecord>>,
    next_stream: std::sync::atomic::AtomicU64,
    events: broadcast::Sender<FleetEvent>,
    metrics: Metrics,
    closing: watch::Sender<bool>,
}

/// Shared handle to the fleet state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FleetRegistry {
    inner: Arc<Inner>,
}

impl Default for FleetRegistry {
    fn default() -> Self {
        Self::new()
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl FleetRegistry {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (closing, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                vehicles: Mutex::new(BTreeMap::new()),
                next_stream: 1.into(),
                events,
                metrics: Metrics::default(),
                closing,
            }),
        }
    }

    /// Events naming the vehicle that changed. On `Lagged`, resync from [`Self::to_json`]
    /// or treat every vehicle as changed.
    pub fn subscribe(&self) -> broadcast::Receiver<FleetEvent> {
        self.inner.events.subscribe()
    }

    /// Register `misaki_fleet_vehicles_online`, `misaki_fleet_reports_total{kind}`,
    /// `misaki_fleet_link_changes_total`, `misaki_fleet_policy_bytes_total`,
    /// `misaki_fleet_policy_updates_total{kind=full|delta}` and
    /// `misaki_fleet_policy_resyncs_total`.
    pub fn register_metrics(&self, metrics: &mut prometheus_client::registry::Registry) {
        let m = &self.inner.metrics;
        metrics.register(
            "misaki_fleet_vehicles_online",
            "Vehicles with an open, live report stream",
            m.online.clone(),
        );
        metrics.register(
            "misaki_fleet_reports",
            "Reports received from vehicles, by kind",
            m.reports.clone(),
        );
        metrics.register(
            "misaki_fleet_link_changes",
            "Link records changed by LinkChange deltas",
            m.link_changes.clone(),
        );
        metrics.register(
            "misaki_fleet_policy_bytes",
            "Bytes of PolicyUpdate messages sent to vehicles (encoded, before zstd)",
            m.policy_bytes.clone(),
        );
        // The bytes counter keeps no label (dashboards and bench/config_scale.sh read
        // it as one series); the split is in the message count.
        metrics.register(
            "misaki_fleet_policy_updates",
            "PolicyUpdate messages sent to vehicles, by kind (full or delta)",
            m.policy_updates.clone(),
        );
        metrics.register(
            "misaki_fleet_policy_resyncs",
            "Policy deltas vehicles rejected (LinkChange.policy_resync)",
            m.policy_resyncs.clone(),
        );
    }

    /// Count a policy update of `bytes` sent to one vehicle.
    pub(crate) fn sent_policy(&self, kind: UpdateKind, bytes: usize) {
        let m = &self.inner.metrics;
        m.policy_bytes
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
        m.policy_updates
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// End every open report stream (UNAVAILABLE, so vehicles reconnect elsewhere).
    /// Call on control-plane shutdown so the gRPC server can drain.
    /// End every report stream with UNAVAILABLE and refuse new ones (shutdown, or a
    /// shared-mode replica that lost its lease), until [`reopen_streams`](Self::reopen_streams).
    pub fn close_streams(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Take report streams again after [`close_streams`](Self::close_streams).
    pub fn reopen_streams(&self) {
        self.inner.closing.send_replace(false);
    }

    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.inner.closing.subscribe()
    }

    fn emit(&self, vehicle_id: Arc<str>, kind: FleetEventKind) {
        // No subscriber is fine: nobody needs to hear about it.
        let _ = self.inner.events.send(FleetEvent { vehicle_id, kind });
    }

    fn count(&self, kind: &'static str) {
        self.inner
            .metrics
            .reports
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// A stream said Hello, over a connection whose certificate proved `identity` (a
    /// SPIFFE ID; None over plaintext). Returns the vehicle's interned id and the
    /// stream token to pass to later calls.
    pub(crate) fn hello(
        &self,
        hello: &pb::Hello,
        identity: Option<String>,
    ) -> Result<(Arc<str>, u64), RegistryError> {
        if hello.vehicle_id.is_empty() {
            return Err(RegistryError::EmptyVehicleId);
        }
        if hello.vehicle_id.len() > 128 {
            return Err(RegistryError::VehicleIdTooLong(hello.vehicle_id.len()));
        }
        // The spelling a certificate can carry; the gateway's routes key on it too.
        if !misaki_identity::valid_name(&hello.vehicle_id) {
            return Err(RegistryError::InvalidVehicleId(hello.vehicle_id.clone()));
        }
        self.count("hello");
        let stream = self
            .inner
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let heartbeat_interval =
            Duration::from_millis(u64::from(hello.heartbeat_interval_ms.clamp(100, 60_000)));
        let id: Arc<str> = {
            let mut vehicles = self.inner.vehicles.lock().expect("registry lock");
            // A lookup, not a scan: 10,000 vehicles reconnecting at once made a scan
            // here quadratic.
            let id = vehicles
                .get_key_value(hello.vehicle_id.as_str())
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| Arc::from(hello.vehicle_id.as_str()));
            let rec = vehicles.entry(id.clone()).or_insert_with(|| VehicleRecord {
                state: VehicleState::default(),
                heartbeat_interval,
                stream,
                connected_at: SystemTime::now(),
                last_seen: Instant::now(),
            });
            rec.state.identity = identity;
            rec.state.daemon_version = hello.daemon_version.clone();
            rec.state.policy_version = hello.policy_version.clone();
            // The gauge moves with the only two transitions (here and `disconnected`),
            // under the lock: no recount over the fleet per Hello.
            if !rec.state.online {
                self.inner.metrics.online.inc();
            }
            rec.state.online = true;
            rec.heartbeat_interval = heartbeat_interval;
            rec.stream = stream;
            rec.connected_at = SystemTime::now();
            rec.last_seen = Instant::now();
            id
        };
        self.emit(id.clone(), FleetEventKind::Online);
        Ok((id, stream))
    }

    /// How long `vehicle` may stay silent before it is offline.
    pub(crate) fn offline_after(&self, vehicle: &str) -> Duration {
        let vehicles = self.inner.vehicles.lock().expect("registry lock");
        vehicles
            .get(vehicle)
            .map(|v| v.heartbeat_interval * OFFLINE_AFTER_HEARTBEATS)
            .unwrap_or(Duration::from_secs(3))
    }

    /// Apply one non-Hello report. Returns false if it was a Hello (protocol error).
    pub(crate) fn apply(&self, vehicle: &Arc<str>, report: &pb::VehicleReport) -> bool {
        use pb::vehicle_report::Report;
        let Some(r) = &report.report else {
            // Unknown oneof variant from a newer vehicle: still proof of life.
            self.touch(vehicle, report.observed_unix_ms);
            return true;
        };
        let changed = {
            let mut vehicles = self.inner.vehicles.lock().expect("registry lock");
            let Some(rec) = vehicles.get_mut(vehicle) else {
                return true;
            };
            rec.last_seen = Instant::now();
            rec.state.last_observed_unix_ms = report.observed_unix_ms;
            match r {
                Report::Hello(_) => return false,
                Report::Heartbeat(_) => {
                    self.count("heartbeat");
                    false
                }
                Report::LinkState(s) => {
                    self.count("link_state");
                    apply_state(&mut rec.state, s);
                    true
                }
                Report::LinkChange(c) => {
                    self.count("link_change");
                    let n = u64::try_from(c.links.len() + c.removed_links.len()).unwrap_or(0);
                    self.inner.metrics.link_changes.inc_by(n);
                    if c.policy_resync.is_some() {
                        self.inner.metrics.policy_resyncs.inc();
                    }
                    apply_change(&mut rec.state, c, n);
                    true
                }
            }
        };
        if changed {
            self.emit(vehicle.clone(), FleetEventKind::State);
        }
        true
    }

    fn touch(&self, vehicle: &str, observed_unix_ms: u64) {
        let mut vehicles = self.inner.vehicles.lock().expect("registry lock");
        if let Some(rec) = vehicles.get_mut(vehicle) {
            rec.last_seen = Instant::now();
            rec.state.last_observed_unix_ms = observed_unix_ms;
        }
    }

    /// The stream `stream` of `vehicle` ended (or timed out): offline, unless a newer
    /// stream has taken over.
    pub(crate) fn disconnected(&self, vehicle: &Arc<str>, stream: u64) {
        let went_offline = {
            let mut vehicles = self.inner.vehicles.lock().expect("registry lock");
            match vehicles.get_mut(vehicle) {
                Some(rec) if rec.stream == stream && rec.state.online => {
                    rec.state.online = false;
                    self.inner.metrics.online.dec();
                    true
                }
                _ => false,
            }
        };
        if went_offline {
            self.emit(vehicle.clone(), FleetEventKind::Offline);
        }
    }

    /// Ids of the vehicles known, online or not.
    pub fn vehicle_ids(&self) -> Vec<String> {
        let vehicles = self.inner.vehicles.lock().expect("registry lock");
        vehicles.keys().map(|k| k.to_string()).collect()
    }

    /// Whether the vehicle is online (`None`: never seen).
    pub fn is_online(&self, vehicle: &str) -> Option<bool> {
        let vehicles = self.inner.vehicles.lock().expect("registry lock");
        vehicles.get(vehicle).map(|v| v.state.online)
    }

    /// Whether the vehicle is online and the power it last reported (`None`: never seen).
    /// What `vehicle` last reported, and whether it is online here.
    pub fn state(&self, vehicle: &str) -> Option<VehicleState> {
        let vehicles = self.inner.vehicles.lock().expect("registry lock");
        vehicles.get(vehicle).map(|v| v.state.clone())
    }

    /// Ids of the vehicles online here.
    pub fn online_ids(&self) -> Vec<Arc<str>> {
        let vehicles = self.inner.vehicles.lock().expect("registry lock");
        vehicles
            .iter()
            .filter(|(_, v)| v.state.online)
            .map(|(k, _)| k.clone())
            .collect()
    }

    pub fn presence(&self, vehicle: &str) -> Option<(bool, Power)> {
        let vehicles = self.inner.vehicles.lock().expect("registry lock");
        vehicles
            .get(vehicle)
            .map(|v| (v.state.online, v.state.power))
    }

    /// The uplink the vehicle last reported for `class` (`Some("")`: none eligible).
    pub fn selection(&self, vehicle: &str, class: &str) -> Option<String> {
        let vehicles = self.inner.vehicles.lock().expect("registry lock");
        vehicles
            .get(vehicle)?
            .state
            .selections
            .get(class)
            .map(|s| s.uplink.clone().unwrap_or_default())
    }

    /// The whole fleet, for the admin route `GET /fleet`:
    /// `{"online": n, "total": n, "vehicles": [<vehicle_json>...]}` sorted by id.
    pub fn to_json(&self) -> Value {
        let vehicles = self.inner.vehicles.lock().expect("registry lock");
        let list: Vec<Value> = vehicles.iter().map(|(id, v)| record_json(id, v)).collect();
        json!({
            "online": vehicles.values().filter(|v| v.state.online).count(),
            "total": vehicles.len(),
            "vehicles": list,
        })
    }

    /// One vehicle, for `GET /fleet/{vehicle}`; `None` → 404.
    pub fn vehicle_json(&self, vehicle: &str) -> Option<Value> {
        let vehicles = self.inner.vehicles.lock().expect("registry lock");
        vehicles
            .get_key_value(vehicle)
            .map(|(id, v)| record_json(id, v))
    }
}

/// A whole `LinkState` replaces what the vehicle reported before.
fn apply_state(state: &mut VehicleState, s: &pb::LinkState) {
    state.links = s
        .links
        .iter()
        .map(|l| (l.name.clone(), LinkRecord::from(l)))
        .collect();
    state.selections = s
        .selections
        .iter()
        .map(|c| (c.class.clone(), SelectionRecord::from(c)))
        .collect();
    state.queues = s
        .queues
        .iter()
        .map(|q| (q.class.clone(), QueueRecord::from(q)))
        .collect();
    state.power = s.power().into();
    state.policy_version = s.policy_version.clone();
    state.sidecars = s.sidecars.iter().map(SidecarRecord::from).collect();
}

/// A `LinkChange` (`n` link records changed) merges into what the vehicle reported.
fn apply_change(state: &mut VehicleState, c: &pb::LinkChange, n: u64) {
    state.link_changes += n;
    for l in &c.links {
        state.links.insert(l.name.clone(), LinkRecord::from(l));
    }
    for name in &c.removed_links {
        state.links.remove(name);
    }
    for s in &c.selections {
        state
            .selections
            .insert(s.class.clone(), SelectionRecord::from(s));
    }
    for q in &c.queues {
        state.queues.insert(q.class.clone(), QueueRecord::from(q));
    }
    if c.power.is_some() {
        state.power = c.power().into();
    }
    if let Some(v) = &c.policy_version {
        state.policy_version = v.clone();
    }
    if let Some(r) = &c.policy_resync {
        // It kept this one: what it holds, whatever was sent since.
        state.policy_version = r.held_version.clone();
    }
    if c.sidecars_changed {
        state.sidecars = c.sidecars.iter().map(SidecarRecord::from).collect();
    }
}

/// `/fleet/{vehicle}`: the vehicle's [`VehicleState`] plus the registry's own fields.
fn record_json(id: &str, v: &VehicleRecord) -> Value {
    let mut json = serde_json::to_value(&v.state).expect("VehicleState serialises");
    let fields = json
        .as_object_mut()
        .expect("a struct serialises as an object");
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    fields.insert("vehicle_id".into(), id.into());
    fields.insert(
        "heartbeat_interval_ms".into(),
        ms(v.heartbeat_interval).into(),
    );
    fields.insert(
        "connected_at_unix_ms".into(),
        unix_ms(v.connected_at).into(),
    );
    fields.insert("last_seen_ms_ago".into(), ms(v.last_seen.elapsed()).into());
    json
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::vehicle_report::Report;

    #[test]
    fn a_hello_must_name_a_vehicle_id_a_certificate_could_carry() {
        let registry = FleetRegistry::new();
        let hello = |id: &str| pb::Hello {
            vehicle_id: id.to_string(),
            ..Default::default()
        };
        assert_eq!(
            registry.hello(&hello(""), None),
            Err(RegistryError::EmptyVehicleId)
        );
        for bad in ["!online", "car 1", "car/1", "..", "car-1\n"] {
            assert_eq!(
                registry.hello(&hello(bad), None),
                Err(RegistryError::InvalidVehicleId(bad.to_string())),
                "{bad:?}"
            );
        }
        assert!(registry.hello(&hello("car-1.eu_2"), None).is_ok());
        assert_eq!(registry.vehicle_ids(), ["car-1.eu_2"]);
    }

    #[test]
    fn the_online_gauge_follows_hellos_and_ends_of_the_current_stream_only() {
        let registry = FleetRegistry::new();
        let online = || registry.inner.metrics.online.get();
        let hello = |id: &str| pb::Hello {
            vehicle_id: id.to_string(),
            ..Default::default()
        };
        let (a, first) = registry.hello(&hello("car-a"), None).unwrap();
        let (_, _) = registry.hello(&hello("car-b"), None).unwrap();
        assert_eq!(online(), 2);
        // car-a reconnects before its old stream ends: still one vehicle online.
        let (a2, second) = registry.hello(&hello("car-a"), None).unwrap();
        assert!(Arc::ptr_eq(&a, &a2), "the id is interned once");
        assert_eq!(online(), 2);
        registry.disconnected(&a, first);
        assert_eq!(online(), 2, "the old stream's end is not the vehicle's");
        registry.disconnected(&a, second);
        registry.disconnected(&a, second);
        assert_eq!(online(), 1);
        registry.hello(&hello("car-a"), None).unwrap();
        assert_eq!(online(), 2);
    }

    fn report(r: Report) -> pb::VehicleReport {
        pb::VehicleReport {
            seq: 0,
            observed_unix_ms: 1,
            report: Some(r),
        }
    }

    fn xds_type(t: &str, acked: Option<&str>) -> pb::SidecarXdsType {
        pb::SidecarXdsType {
            xds_type: t.into(),
            sent_version: acked.map(str::to_string),
            acked_version: acked.map(str::to_string),
            last_nack: None,
        }
    }

    fn sidecar(node_id: &str, kind: &str, acked: Option<&str>) -> pb::Sidecar {
        pb::Sidecar {
            node_id: node_id.into(),
            kind: kind.into(),
            proxyless: false,
            connected_since_unix_ms: 1_000,
            types: ["cds", "eds", "lds", "rds"]
                .map(|t| xds_type(t, acked))
                .to_vec(),
        }
    }

    fn online(registry: &FleetRegistry) -> Arc<str> {
        registry
            .hello(
                &pb::Hello {
                    vehicle_id: "car-1".into(),
                    heartbeat_interval_ms: 1000,
                    ..Default::default()
                },
                None,
            )
            .unwrap()
            .0
    }

    /// The `/fleet/{vehicle}` field names are an interface: exactly these.
    #[test]
    fn a_vehicle_shows_the_documented_fields() {
        let registry = FleetRegistry::new();
        let car = online(&registry);
        let link = pb::Link {
            name: "wifi".into(),
            kind: pb::UplinkKind::Wifi as i32,
            ..Default::default()
        };
        let state = pb::LinkState {
            links: vec![link],
            sidecars: vec![sidecar("envoy-1", "delta", Some("v1"))],
            ..Default::default()
        };
        assert!(registry.apply(&car, &report(Report::LinkState(state))));
        let v = registry.vehicle_json("car-1").unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "connected_at_unix_ms",
                "daemon_version",
                "heartbeat_interval_ms",
                "identity",
                "last_observed_unix_ms",
                "last_seen_ms_ago",
                "link_changes",
                "links",
                "online",
                "policy_version",
                "power",
                "queues",
                "selections",
                "sidecars",
                "vehicle_id",
            ]
        );
        assert_eq!(v["links"][0]["kind"], "wifi");
        assert_eq!(v["power"], "unspecified");
        assert_eq!(v["sidecars"][0]["types"]["cds"]["acked_version"], "v1");
        assert_eq!(v["sidecars"][0]["types"]["cds"]["last_nack"], Value::Null);
    }

    #[test]
    fn sidecars_are_replaced_whole_and_shown_per_type() {
        let registry = FleetRegistry::new();
        let car = online(&registry);
        assert_eq!(
            registry.vehicle_json("car-1").unwrap()["sidecars"],
            json!([])
        );

        assert!(registry.apply(
            &car,
            &report(Report::LinkState(pb::LinkState {
                sidecars: vec![sidecar("vehicle-sidecar", "sotw", Some("v1"))],
                ..Default::default()
            })),
        ));
        let v = registry.vehicle_json("car-1").unwrap();
        assert_eq!(
            v["sidecars"],
            json!([{
                "node_id": "vehicle-sidecar",
                "kind": "sotw",
                "proxyless": false,
                "connected_since_unix_ms": 1000,
                "types": {
                    "cds": {"sent_version": "v1", "acked_version": "v1", "last_nack": null},
                    "eds": {"sent_version": "v1", "acked_version": "v1", "last_nack": null},
                    "lds": {"sent_version": "v1", "acked_version": "v1", "last_nack": null},
                    "rds": {"sent_version": "v1", "acked_version": "v1", "last_nack": null},
                },
            }])
        );

        // A LinkChange without the flag leaves the list alone.
        let mut events = registry.subscribe();
        assert!(registry.apply(
            &car,
            &report(Report::LinkChange(pb::LinkChange {
                selections: vec![pb::ClassSelection {
                    class: "default".into(),
                    uplink: "wifi".into(),
                    reason: "initial".into(),
                }],
                ..Default::default()
            })),
        ));
        assert_eq!(events.try_recv().unwrap().kind, FleetEventKind::State);
        let v = registry.vehicle_json("car-1").unwrap();
        assert_eq!(v["sidecars"][0]["node_id"], "vehicle-sidecar");

        // A policy applied mid-stream is reported in a LinkChange.
        assert!(registry.apply(
            &car,
            &report(Report::LinkChange(pb::LinkChange {
                policy_version: Some("p2".into()),
                ..Default::default()
            })),
        ));
        assert_eq!(events.try_recv().unwrap().kind, FleetEventKind::State);
        assert_eq!(
            registry.vehicle_json("car-1").unwrap()["policy_version"],
            "p2"
        );

        // With the flag, the list is replaced whole: a NACK on one, a second client.
        let mut nacked = sidecar("vehicle-sidecar", "sotw", Some("v1"));
        nacked.types[2].sent_version = Some("v2".into());
        nacked.types[2].last_nack = Some(pb::XdsNack {
            version: Some("v2".into()),
            message: "Error adding/updating listener(s) vehicle_outbound".into(),
            at_unix_ms: 5_000,
        });
        let mut grpc = sidecar("app-grpc", "delta", None);
        grpc.proxyless = true;
        assert!(registry.apply(
            &car,
            &report(Report::LinkChange(pb::LinkChange {
                sidecars_changed: true,
                sidecars: vec![grpc, nacked],
                ..Default::default()
            })),
        ));
        assert_eq!(events.try_recv().unwrap().kind, FleetEventKind::State);
        let v = registry.vehicle_json("car-1").unwrap();
        let s = &v["sidecars"];
        assert_eq!(s.as_array().unwrap().len(), 2);
        assert_eq!(
            (&s[0]["node_id"], &s[0]["kind"], &s[0]["proxyless"]),
            (&json!("app-grpc"), &json!("delta"), &json!(true))
        );
        assert_eq!(
            s[0]["types"]["cds"],
            json!({"sent_version": null, "acked_version": null, "last_nack": null})
        );
        let lds = &s[1]["types"]["lds"];
        assert_eq!(lds["sent_version"], "v2");
        assert_eq!(lds["acked_version"], "v1");
        assert_eq!(
            lds["last_nack"],
            json!({
                "version": "v2",
                "message": "Error adding/updating listener(s) vehicle_outbound",
                "at_unix_ms": 5000,
            })
        );
        // Shown on /fleet too.
        assert_eq!(
            registry.to_json()["vehicles"][0]["sidecars"][1]["node_id"],
            "vehicle-sidecar"
        );

        // An empty list with the flag: every client went away.
        assert!(registry.apply(
            &car,
            &report(Report::LinkChange(pb::LinkChange {
                sidecars_changed: true,
                ..Default::default()
            })),
        ));
        assert_eq!(
            registry.vehicle_json("car-1").unwrap()["sidecars"],
            json!([])
        );

        // A new LinkState (e.g. after a reconnect) replaces the list too.
        assert!(registry.apply(
            &car,
            &report(Report::LinkState(pb::LinkState {
                sidecars: vec![sidecar("vehicle-sidecar", "delta", Some("v3"))],
                ..Default::default()
            })),
        ));
        let v = registry.vehicle_json("car-1").unwrap();
        assert_eq!(v["sidecars"][0]["kind"], "delta");
        assert_eq!(v["sidecars"][0]["types"]["rds"]["acked_version"], "v3");
        assert!(registry.apply(&car, &report(Report::LinkState(pb::LinkState::default())),));
        assert_eq!(
            registry.vehicle_json("car-1").unwrap()["sidecars"],
            json!([])
        );
    }
}
