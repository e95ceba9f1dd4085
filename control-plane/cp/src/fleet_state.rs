//! The fleet registry drives the cache: each vehicle's presence and power, as the
//! registry's events report them, become [`VehicleFacts`] (gateway scopes in cloud
//! snapshots, the vehicle's own low-power routes).

use misaki_fleet::{FleetRegistry, Power};
use std::collections::BTreeSet;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::cache::{SnapshotCache, VehicleFacts};

/// What the registry knows of `vehicle` now, as the cache takes it.
fn facts(fleet: &FleetRegistry, vehicle: &str) -> Option<VehicleFacts> {
    let (online, power) = fleet.presence(vehicle)?;
    Some(VehicleFacts {
        online,
        low_power: matches!(power, Power::Low | Power::ShuttingDown),
    })
}

/// Follow the registry until it is dropped; on lag, resync every vehicle. Events that
/// queued up meanwhile are taken as one batch (one cloud snapshot rebuild for all).
pub async fn follow(fleet: FleetRegistry, cache: SnapshotCache) {
    let mut events = fleet.subscribe();
    loop {
        let first = match events.recv().await {
            Ok(e) => e.vehicle_id,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "fleet events lagged; resyncing every vehicle");
                cache.set_vehicles(known(&fleet, fleet.vehicle_ids()));
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let mut ids = BTreeSet::from([first.to_string()]);
        loop {
            match events.try_recv() {
                Ok(e) => {
                    ids.insert(e.vehicle_id.to_string());
                }
                Err(TryRecvError::Lagged(_)) => ids.extend(fleet.vehicle_ids()),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        let n = ids.len();
        let changed = cache.set_vehicles(known(&fleet, ids));
        if changed > 0 {
            tracing::debug!(vehicles = n, changed, "fleet state pushed");
        }
    }
}

/// `ids` with what the registry knows of each (vehicles it forgot are skipped).
fn known<'a>(
    fleet: &'a FleetRegistry,
    ids: impl IntoIterator<Item = String> + 'a,
) -> impl Iterator<Item = (String, VehicleFacts)> + 'a {
    ids.into_iter()
        .filter_map(move |v| facts(fleet, &v).map(|f| (v, f)))
}
