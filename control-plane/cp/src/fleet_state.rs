//! The fleet drives the cache: each vehicle's presence and power become
//! [`VehicleFacts`] (gateway scopes in cloud snapshots, the vehicle's own low-power
//! routes). The source is the local registry and, in shared mode, the other
//! replicas' records in etcd ([`FleetView`]): a vehicle online here is taken from the
//! registry (it is fresher), any other one from the view when it has it.

use std::collections::BTreeSet;
use std::sync::Arc;

use misaki_fleet::FleetRegistry;
use tokio::sync::broadcast::{
    self,
    error::{RecvError, TryRecvError},
};

use crate::cache::{SnapshotCache, VehicleFacts};
use crate::presence::FleetView;

/// What is known of `vehicle` now, as the cache takes it.
fn facts(fleet: &FleetRegistry, view: Option<&FleetView>, vehicle: &str) -> Option<VehicleFacts> {
    let local = fleet.presence(vehicle).map(|(online, power)| VehicleFacts {
        online,
        low_power: power.is_low(),
    });
    if local.is_some_and(|f| f.online) {
        return local;
    }
    view.and_then(|v| v.get(vehicle))
        .map(|p| VehicleFacts {
            online: p.online,
            low_power: p.low_power(),
        })
        .or(local)
}

/// The next batch of changed vehicle ids from `rx` (waiting for the first, then taking
/// what queued up meanwhile; `id` names an event's vehicle); every id in `all()` after
/// a lag; `None` once closed.
async fn batch<T: Clone>(
    rx: &mut broadcast::Receiver<T>,
    id: impl Fn(T) -> Arc<str>,
    all: impl Fn() -> Vec<String>,
) -> Option<BTreeSet<String>> {
    let mut ids = match rx.recv().await {
        Ok(e) => BTreeSet::from([id(e).to_string()]),
        Err(RecvError::Lagged(n)) => {
            tracing::warn!(missed = n, "fleet events lagged; resyncing every vehicle");
            all().into_iter().collect()
        }
        Err(RecvError::Closed) => return None,
    };
    loop {
        match rx.try_recv() {
            Ok(e) => {
                ids.insert(id(e).to_string());
            }
            Err(TryRecvError::Lagged(_)) => ids.extend(all()),
            Err(TryRecvError::Empty | TryRecvError::Closed) => return Some(ids),
        }
    }
}

/// Follow the registry (and `view`, in shared mode) until they are dropped. Events
/// that queued up meanwhile are taken as one batch (one cloud snapshot rebuild).
pub async fn follow(fleet: FleetRegistry, view: Option<FleetView>, cache: SnapshotCache) {
    let mut local = fleet.subscribe();
    let mut remote = match &view {
        Some(v) => v.subscribe(),
        None => broadcast::channel(1).1,
    };
    let all = || {
        let mut ids = fleet.vehicle_ids();
        ids.extend(view.iter().flat_map(FleetView::ids));
        ids
    };
    loop {
        let ids = tokio::select! {
            ids = batch(&mut local, |e| e.vehicle_id, all) => ids,
            ids = batch(&mut remote, |v| v, all), if view.is_some() => ids,
        };
        let Some(ids) = ids else { return };
        let n = ids.len();
        let known = ids
            .into_iter()
            .filter_map(|v| facts(&fleet, view.as_ref(), &v).map(|f| (v, f)));
        let changed = cache.set_vehicles(known);
        if changed > 0 {
            tracing::debug!(vehicles = n, changed, "fleet state pushed");
        }
    }
}
