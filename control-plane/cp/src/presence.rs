//! Shared mode, fleet presence (`serve --store`): each replica writes a compact record
//! per vehicle whose report stream it holds, under its own etcd lease, and follows
//! every replica's records, so `/fleet` shows the whole fleet on every replica and the
//! cloud sidecars of every replica know which vehicles are online.
//!
//! Keys:
//!
//! | key                                  | value                                         |
//! |--------------------------------------|-----------------------------------------------|
//! | `/misaki/fleet/vehicles/{vehicle}`   | a JSON [`Presence`], under its owner's lease  |
//! | `/misaki/fleet/replicas/{replica}`   | `{"replica", "started_unix_ms", "peer"}`, under its lease (`peer`: its peer port, or null) |
//!
//! Invariants:
//! - A replica writes a vehicle's record while the vehicle is online here, without
//!   condition (it claims a vehicle that moved from another replica), and an offline
//!   record only while the key is still under this replica's lease: the replica a
//!   vehicle left never marks it offline over its new owner's record.
//! - Writes are coalesced on the leading edge: a vehicle's change is written at once;
//!   its further changes within [`COALESCE`] are merged into one write at its end.
//! - A replica's lease (`--lease-ttl`) deletes its records when it dies; every
//!   follower then keeps the vehicle listed, offline with owner unknown.
//! - A replica that cannot show etcd a live lease for a whole TTL (no keep-alive
//!   answered) fences itself: it closes its vehicles' report streams and refuses new
//!   ones, so they move to another replica, until it holds a lease again; then it
//!   writes the vehicles online here again. Its xDS streams keep serving the last
//!   policy throughout.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use misaki_fleet::{FleetRegistry, Power, VehicleState};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::cli::StoreTls;
use crate::cli::StoreUrl;
use crate::store::{Store, StoreError, retrying};

/// Prefix of the vehicles' records.
pub const VEHICLES: &str = "/misaki/fleet/vehicles/";
/// Prefix of the replicas' own keys.
pub const REPLICAS: &str = "/misaki/fleet/replicas/";
/// Further changes of a vehicle within this long after a write are merged into one.
pub const COALESCE: Duration = Duration::from_secs(1);
/// Puts per etcd transaction (etcd refuses more than 128 by default).
const TXN_OPS: usize = 100;

/// What every replica knows of a vehicle: the owner's compact record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The replica holding its report stream (`None`: its owner's lease is gone).
    pub owner: Option<String>,
    pub online: bool,
    /// As `/fleet/{vehicle}` shows it: `on`, `low`, ...
    pub power: Power,
    /// Selected uplink per traffic class (`None`: no usable uplink).
    pub uplinks: BTreeMap<String, Option<String>>,
    pub policy_version: String,
    pub queued_messages: u64,
    pub queued_bytes: u64,
    pub written_unix_ms: u64,
}

impl Presence {
    fn of(state: &VehicleState, owner: &str) -> Presence {
        Presence {
            owner: Some(owner.to_string()),
            online: state.online,
            power: state.power,
            uplinks: state
                .selections
                .iter()
                .map(|(class, s)| (class.clone(), s.uplink.clone()))
                .collect(),
            policy_version: state.policy_version.clone(),
            queued_messages: state.queues.values().map(|q| q.depth_messages).sum(),
            queued_bytes: state.queues.values().map(|q| q.depth_bytes).sum(),
            written_unix_ms: unix_ms(SystemTime::now()),
        }
    }

    /// Low power as the cache takes it (the registry's rule).
    pub fn low_power(&self) -> bool {
        self.power.is_low()
    }

    fn json(&self, vehicle: &str) -> Value {
        let mut v = serde_json::to_value(self).expect("Presence serialises");
        v["vehicle_id"] = vehicle.into();
        v
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// This replica's name in etcd: the host name (the pod's, on Kubernetes) and pid.
pub fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!(
        "{}-{}",
        if host.is_empty() { "misaki-cp" } else { &host },
        std::process::id()
    )
}

/// Every replica's records as this replica last saw them. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FleetView {
    inner: Arc<Mutex<BTreeMap<String, Presence>>>,
    /// Vehicles whose record changed (for the cache).
    events: broadcast::Sender<Arc<str>>,
    synced: watch::Sender<bool>,
}

impl Default for FleetView {
    fn default() -> Self {
        FleetView {
            inner: Arc::default(),
            events: broadcast::channel(4096).0,
            synced: watch::channel(false).0,
        }
    }
}

impl FleetView {
    pub fn get(&self, vehicle: &str) -> Option<Presence> {
        self.inner.lock().expect("view lock").get(vehicle).cloned()
    }

    pub fn ids(&self) -> Vec<String> {
        self.inner
            .lock()
            .expect("view lock")
            .keys()
            .cloned()
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.events.subscribe()
    }

    /// Resolves once the view has read etcd's records (readiness waits for it).
    pub async fn synced(&self) {
        let _ = self.synced.subscribe().wait_for(|s| *s).await;
    }

    fn set(&self, vehicle: &str, p: Option<Presence>) {
        let mut map = self.inner.lock().expect("view lock");
        let next = match p {
            Some(p) => p,
            // Gone with its owner's lease (or deleted): listed offline, owner unknown.
            None => match map.get(vehicle) {
                Some(old) => Presence {
                    owner: None,
                    online: false,
                    ..old.clone()
                },
                None => return,
            },
        };
        if map.get(vehicle) != Some(&next) {
            map.insert(vehicle.to_string(), next);
            drop(map);
            let _ = self.events.send(Arc::from(vehicle));
        }
    }

    /// `/fleet` for the whole fleet: vehicles online here in full (the local registry's
    /// record), every other one as its owner wrote it.
    pub fn fleet_json(&self, fleet: &FleetRegistry, replica: &str) -> Value {
        let mut ids: BTreeSet<String> = self.ids().into_iter().collect();
        ids.extend(fleet.vehicle_ids());
        let list: Vec<Value> = ids
            .iter()
            .filter_map(|id| self.vehicle_json(fleet, replica, id))
            .collect();
        let online = list.iter().filter(|v| v["online"] == true).count();
        json!({ "replica": replica, "online": online, "total": list.len(), "vehicles": list })
    }

    /// `/fleet/{vehicle}`: here in full if it reports here, else its owner's record.
    pub fn vehicle_json(&self, fleet: &FleetRegistry, replica: &str, id: &str) -> Option<Value> {
        let local = fleet.vehicle_json(id);
        let here = local.as_ref().is_some_and(|v| v["online"] == true);
        match (local, self.get(id)) {
            (Some(mut v), _) if here => {
                v["owner"] = replica.into();
                Some(v)
            }
            (_, Some(p)) => Some(p.json(id)),
            (Some(mut v), None) => {
                v["owner"] = Value::Null;
                Some(v)
            }
            (None, None) => None,
        }
    }

    /// Follow `/misaki/fleet/vehicles/` until `shutdown`: read it, then watch it from
    /// the next revision; after an error, start over (records deleted meanwhile go
    /// offline, owner unknown).
    pub async fn follow(self, client: Client, url: StoreUrl, shutdown: impl Future<Output = ()>) {
        let attempt = || self.follow_once(client.clone(), &url);
        retrying(shutdown, Duration::from_secs(5), attempt, |error, backoff| {
            tracing::warn!(%error, ?backoff, "following the fleet in etcd; retrying (the last view keeps serving)");
        })
        .await;
    }

    async fn follow_once(
        &self,
        mut client: Client,
        url: &StoreUrl,
    ) -> Result<std::convert::Infallible, StoreError> {
        let etcd = |source| StoreError::Etcd {
            endpoints: url.to_string(),
            source,
        };
        let resp = client
            .get(VEHICLES, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd)?;
        let at = resp.header().map_or(0, |h| h.revision());
        let mut present = BTreeSet::new();
        for kv in resp.kvs() {
            if let Some((id, p)) = decode(kv.key(), kv.value()) {
                present.insert(id.clone());
                self.set(&id, Some(p));
            }
        }
        for id in self.ids() {
            if !present.contains(&id) {
                self.set(&id, None);
            }
        }
        self.synced.send_replace(true);
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(at + 1);
        let mut stream = client.watch(VEHICLES, Some(options)).await.map_err(etcd)?;
        loop {
            let Some(resp) = stream.message().await.map_err(etcd)? else {
                return Err(StoreError::WatchEnded("etcd closed the stream".into()));
            };
            if resp.canceled() {
                return Err(StoreError::WatchEnded(resp.cancel_reason().to_string()));
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => {
                        if let Some((id, p)) = decode(kv.key(), kv.value()) {
                            self.set(&id, Some(p));
                        }
                    }
                    EventType::Delete => {
                        if let Some(id) = vehicle_of(kv.key()) {
                            self.set(&id, None);
                        }
                    }
                }
            }
        }
    }
}

fn vehicle_of(key: &[u8]) -> Option<String> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix(VEHICLES)
        .map(str::to_string)
}

fn decode(key: &[u8], value: &[u8]) -> Option<(String, Presence)> {
    let id = vehicle_of(key)?;
    match serde_json::from_slice(value) {
        Ok(p) => Some((id, p)),
        Err(error) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), %error, "not a vehicle presence record; ignored");
            None
        }
    }
}

/// The writer: this replica's lease, its vehicles' records, and fencing.
#[derive(Clone)]
pub struct Publisher {
    pub client: Client,
    pub url: StoreUrl,
    /// For the lease's own connection (see [`LeaseThread`]).
    pub tls: StoreTls,
    pub replica: String,
    pub ttl: Duration,
    pub fleet: FleetRegistry,
    /// Where other replicas reach this one's peer port (`--peer-advertise`).
    pub peer: Option<String>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("replica", &self.replica)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Per-vehicle write pacing (leading edge, then one merged write per [`COALESCE`]).
#[derive(Debug, Default)]
struct Pacing {
    last: HashMap<Arc<str>, Instant>,
    due: BTreeMap<Arc<str>, Instant>,
}

impl Pacing {
    /// `vehicle` changed at `now`: whether to write it at once (else it is due later).
    fn changed(&mut self, vehicle: Arc<str>, now: Instant) -> bool {
        match self.last.get(&vehicle) {
            Some(t) if now < *t + COALESCE => {
                let at = *t + COALESCE;
                self.due.entry(vehicle).or_insert(at);
                false
            }
            _ => {
                self.last.insert(vehicle, now);
                true
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    /// The vehicles due by `now`, marked written.
    fn take_due(&mut self, now: Instant) -> Vec<Arc<str>> {
        let ready: Vec<Arc<str>> = self
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(v, _)| v.clone())
            .collect();
        for v in &ready {
            self.due.remove(v);
            self.last.insert(v.clone(), now);
        }
        // Forget vehicles quiet for longer than the window (bounded memory).
        self.last.retain(|_, t| now < *t + COALESCE);
        ready
    }
}

impl Publisher {
    fn etcd(&self) -> impl Fn(etcd_client::Error) -> StoreError + '_ {
        |source| StoreError::Etcd {
            endpoints: self.url.to_string(),
            source,
        }
    }

    /// Hold a lease and keep this replica's vehicles in etcd until `shutdown` (then
    /// revoke the lease, so the others see at once that its vehicles are gone).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let (valid_tx, valid_rx) = watch::channel(Instant::now() + self.ttl);
        let lease_thread = LeaseThread::start();
        let fence = lease_thread
            .handle
            .spawn(fence(self.fleet.clone(), valid_rx, self.ttl));
        let mut events = self.fleet.subscribe();
        let mut pacing = Pacing::default();
        let mut backoff = Duration::from_millis(200);
        let mut lease = None;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                result = self.session(&lease_thread, &valid_tx, &mut events, &mut pacing, &mut lease) => {
                    let Err(error) = result;
                    tracing::warn!(%error, ?backoff, "fleet presence in etcd; retrying (this replica fences itself once its lease may have expired)");
                }
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        fence.abort();
        if let Some(id) = lease {
            let mut client = self.client.clone();
            let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(id)).await;
        }
    }

    /// One lease: grant it, write what is online here, keep it alive and write changes
    /// until etcd fails or the lease is lost.
    async fn session(
        &self,
        lease_thread: &LeaseThread,
        valid: &watch::Sender<Instant>,
        events: &mut broadcast::Receiver<misaki_fleet::FleetEvent>,
        pacing: &mut Pacing,
        lease: &mut Option<i64>,
    ) -> Result<std::convert::Infallible, StoreError> {
        let mut client = self.client.clone();
        let ttl_secs = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let asked = Instant::now();
        let id = client
            .lease_grant(ttl_secs, None)
            .await
            .map_err(self.etcd())?
            .id();
        *lease = Some(id);
        // Keep-alives run on the lease thread: a busy runtime (a fleet reconnecting)
        // must not hold them up, or the replica would fence itself while etcd is fine.
        valid.send_replace(asked + self.ttl);
        let mut keepalive = lease_thread
            .handle
            .spawn(keep_alive(self.clone(), id, valid.clone()));
        let _stop = AbortOnDrop(keepalive.abort_handle());
        let me = json!({
            "replica": self.replica,
            "started_unix_ms": unix_ms(SystemTime::now()),
            "peer": self.peer,
        });
        client
            .put(
                format!("{REPLICAS}{}", self.replica),
                me.to_string(),
                Some(PutOptions::new().with_lease(id)),
            )
            .await
            .map_err(self.etcd())?;
        self.write(id, &self.fleet.online_ids()).await?;
        tracing::info!(replica = %self.replica, lease = id, ttl = ?self.ttl, "fleet presence in etcd");
        loop {
            let next_due = pacing.next_due();
            tokio::select! {
                ended = &mut keepalive => {
                    return Err(match ended {
                        Ok(Err(why)) => why,
                        Ok(Ok(never)) => match never {},
                        Err(e) => StoreError::WatchEnded(format!("keep-alive task: {e}")),
                    });
                }
                event = events.recv() => {
                    let now = Instant::now();
                    // This event and whatever queued up meanwhile: one write for all.
                    let mut changed = BTreeSet::new();
                    let mut next = Some(event);
                    while let Some(e) = next.take() {
                        match e {
                            Ok(e) => {
                                changed.insert(e.vehicle_id);
                            }
                            // Missed some: every vehicle online here may have changed.
                            Err(broadcast::error::RecvError::Lagged(_)) => {
                                changed.extend(self.fleet.online_ids());
                            }
                            Err(broadcast::error::RecvError::Closed) => {}
                        }
                        next = match events.try_recv() {
                            Ok(e) => Some(Ok(e)),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                Some(Err(broadcast::error::RecvError::Lagged(n)))
                            }
                            Err(_) => None,
                        };
                    }
                    let now_ones: Vec<Arc<str>> =
                        changed.into_iter().filter(|v| pacing.changed(v.clone(), now)).collect();
                    self.write(id, &now_ones).await?;
                }
                _ = sleep_until_opt(next_due) => {
                    let due = pacing.take_due(Instant::now());
                    self.write(id, &due).await?;
                }
            }
        }
    }

    /// Write the records of `vehicles` under `lease` (see the module invariants).
    async fn write(&self, lease: i64, vehicles: &[Arc<str>]) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        let mut claims = Vec::new();
        for v in vehicles {
            let Some(state) = self.fleet.state(v) else {
                continue;
            };
            let key = format!("{VEHICLES}{v}");
            let value = serde_json::to_string(&Presence::of(&state, &self.replica))
                .expect("Presence serialises");
            let put = TxnOp::put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            );
            if state.online {
                claims.push(put);
            } else {
                let txn = Txn::new()
                    .when([Compare::lease(key, CompareOp::Equal, lease)])
                    .and_then([put]);
                kv.txn(txn).await.map_err(self.etcd())?;
            }
        }
        while !claims.is_empty() {
            let batch: Vec<TxnOp> = claims.drain(..claims.len().min(TXN_OPS)).collect();
            kv.txn(Txn::new().and_then(batch))
                .await
                .map_err(self.etcd())?;
        }
        Ok(())
    }
}

/// Keep `lease` alive every third of the TTL; each answer moves `valid` on (from when
/// the keep-alive was sent). Ends with why once etcd fails or the lease is gone.
async fn keep_alive(
    p: Publisher,
    lease: i64,
    valid: watch::Sender<Instant>,
) -> Result<std::convert::Infallible, StoreError> {
    // Its own connection, made here: its I/O runs on this (the lease) thread.
    let (mut client, _) = Store::connect(&p.url, &p.tls).await?.client();
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.map_err(p.etcd())?;
    let mut tick = tokio::time::interval(p.ttl / 3);
    loop {
        tick.tick().await;
        let sent = Instant::now();
        keeper.keep_alive().await.map_err(p.etcd())?;
        match answers.message().await.map_err(p.etcd())? {
            Some(a) if a.ttl() > 0 => {
                let ttl = Duration::from_secs(u64::try_from(a.ttl()).unwrap_or(0));
                valid.send_replace(sent + ttl);
            }
            Some(_) => return Err(StoreError::WatchEnded(format!("lease {lease} expired"))),
            None => {
                return Err(StoreError::WatchEnded(
                    "etcd closed the lease keep-alive stream".into(),
                ));
            }
        }
    }
}

/// A thread of its own running a single-threaded runtime for the lease's keep-alives
/// and the fence: tokio does not preempt, so on the main runtime, thousands of vehicle
/// streams at once (a fleet reconnecting) delayed keep-alive answers past the TTL and
/// the replica fenced itself while etcd was fine (found by bench/shared_fleet.sh).
struct LeaseThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl LeaseThread {
    fn start() -> LeaseThread {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a single-threaded tokio runtime");
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("misaki-lease".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })
            .expect("spawning the lease thread");
        LeaseThread {
            handle,
            stop: Some(stop),
        }
    }
}

impl Drop for LeaseThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Aborts its task when dropped (a session that ends takes its keep-alives along).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Fence `fleet` whenever the lease may have expired (`valid` passed without a newer
/// keep-alive answer); reopen when a newer answer or lease arrives.
async fn fence(fleet: FleetRegistry, mut valid: watch::Receiver<Instant>, ttl: Duration) {
    let mut fenced = false;
    loop {
        let until = *valid.borrow_and_update();
        if fenced && Instant::now() < until {
            fenced = false;
            fleet.reopen_streams();
            tracing::info!("holding a lease in etcd again: taking vehicles");
        }
        tokio::select! {
            _ = tokio::time::sleep_until(until), if !fenced => {
                fenced = true;
                fleet.close_streams();
                tracing::warn!(?ttl, "no lease in etcd for a whole TTL: fenced (vehicles' report streams closed, new ones refused; xDS keeps serving)");
            }
            changed = valid.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_writes_the_first_change_at_once_and_merges_the_rest() {
        let mut p = Pacing::default();
        let t0 = Instant::now();
        let car: Arc<str> = Arc::from("car-1");
        assert!(p.changed(car.clone(), t0), "leading edge");
        assert!(!p.changed(car.clone(), t0 + Duration::from_millis(100)));
        assert!(!p.changed(car.clone(), t0 + Duration::from_millis(900)));
        assert_eq!(p.next_due(), Some(t0 + COALESCE), "one merged write");
        assert!(p.take_due(t0 + Duration::from_millis(999)).is_empty());
        assert_eq!(p.take_due(t0 + COALESCE), std::slice::from_ref(&car));
        assert_eq!(p.next_due(), None);
        // Within a second of the merged write: merged again; later: at once.
        assert!(!p.changed(car.clone(), t0 + Duration::from_millis(1500)));
        assert_eq!(p.take_due(t0 + 2 * COALESCE), std::slice::from_ref(&car));
        assert!(p.changed(car.clone(), t0 + Duration::from_secs(4)));
        assert!(p.changed(Arc::from("car-2"), t0 + Duration::from_secs(4)));
    }

    #[test]
    fn a_vehicle_whose_owner_is_gone_stays_listed_offline_with_owner_unknown() {
        let view = FleetView::default();
        let mut events = view.subscribe();
        let p = Presence {
            owner: Some("a-1".into()),
            online: true,
            power: Power::Low,
            uplinks: BTreeMap::from([("standard".into(), Some("wwan0".into()))]),
            policy_version: "v1".into(),
            queued_messages: 3,
            queued_bytes: 300,
            written_unix_ms: 1,
        };
        assert!(p.low_power());
        view.set("car-1", Some(p.clone()));
        view.set("car-1", None);
        let gone = view.get("car-1").expect("still listed");
        assert_eq!((gone.owner, gone.online), (None, false));
        assert_eq!(gone.uplinks, p.uplinks, "the last known state stays");
        view.set("car-1", None);
        view.set("unknown", None);
        assert_eq!(view.ids(), ["car-1"]);
        let seen: Vec<Arc<str>> = std::iter::from_fn(|| events.try_recv().ok()).collect();
        assert_eq!(seen.len(), 2, "one event per change, none for no-ops");
        let fleet = FleetRegistry::new();
        let shown = view.fleet_json(&fleet, "b-2");
        assert_eq!(shown["total"], 1);
        assert_eq!(shown["vehicles"][0]["owner"], Value::Null);
        assert_eq!(shown["vehicles"][0]["vehicle_id"], "car-1");
    }
}
