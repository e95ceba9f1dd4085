//! The fleet registry drives the cache: each vehicle's presence and power, as the
//! registry's events report them, become [`VehicleFacts`] (gateway scopes in cloud
//! snapshots, the vehicle's own low-power routes).

use misaki_fleet::{FleetRegistry, Power};
use tokio::sync::broadcast::error::RecvError;

use crate::cache::{SnapshotCache, VehicleFacts};

/// What the registry knows of `vehicle` now, as the cache takes it.
fn facts(fleet: &FleetRegistry, vehicle: &str) -> Option<VehicleFacts> {
    let (online, power) = fleet.presence(vehicle)?;
    Some(VehicleFacts {
        online,
        low_power: matches!(power, Power::Low | Power::ShuttingDown),
    })
}

/// Follow the registry until it is dropped; on lag, resync every vehicle.
pub async fn follow(fleet: FleetRegistry, cache: SnapshotCache) {
    let mut events = fleet.subscribe();
    loop {
        match events.recv().await {
            Ok(e) => {
                if let Some(f) = facts(&fleet, &e.vehicle_id) {
                    let changed = cache.set_vehicle(&e.vehicle_id, f);
                    if changed > 0 {
                        tracing::debug!(vehicle = %e.vehicle_id, ?f, changed, "fleet state pushed");
                    }
                }
            }
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "fleet events lagged; resyncing every vehicle");
                for v in fleet.vehicle_ids() {
                    if let Some(f) = facts(&fleet, &v) {
                        cache.set_vehicle(&v, f);
                    }
                }
            }
            Err(RecvError::Closed) => return,
        }
    }
}
