//! What only the vehicle knows: its interfaces and which uplink each class uses now.
//! edge-netd fills it in for its local xDS tier; misaki-cp, serving a vehicle that runs
//! no edge-netd, compiles without it (plain clusters that follow the routing table).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::mtls::VehicleCredential;

/// The vehicle's own state, an input of [`crate::compile_vehicle`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VehicleState {
    /// Kernel interface of each uplink this vehicle has, by policy uplink name. An
    /// uplink the vehicle lacks gets no clusters.
    pub interfaces: BTreeMap<String, String>,
    /// The uplink selected for each class now. A class that is absent, or `None`, has
    /// no usable uplink.
    pub selected: BTreeMap<String, Option<String>>,
    /// Where a deferrable class's requests go while it has no usable uplink: edge-netd's
    /// store-and-forward ingest. `None`: they get the no-uplink 503 like any other.
    pub defer_to: Option<SocketAddr>,
    /// Let a failed attempt cross to the class's next uplink inside Envoy: the class's
    /// routes go to an aggregate cluster (the selected uplink first, then the others in
    /// the class's order) and each retry moves down one priority
    /// (`previous_priorities`), with a per-try timeout of the class's timeout shared
    /// among its tries. Off: a request stays on the uplink it started on.
    pub cross_uplink_retry: bool,
    /// The vehicle's certificate, key and fleet CA, served to its Envoy by SDS over the
    /// local ADS stream when the policy turns data-plane mTLS on. `None` (not enrolled
    /// yet): no secrets, so Envoy's TLS clusters wait for them and calls to cloud and
    /// edge services fail until the vehicle has a credential.
    pub credential: Option<Arc<VehicleCredential>>,
    /// The vehicle is low on power (or shutting down): callers of its `on_low_power:
    /// cloud` services go to their cloud replicas.
    pub low_power: bool,
}

impl VehicleState {
    /// The uplink `class` should use now, if it is one the class allows and the vehicle has.
    pub fn uplink_for<'a>(&'a self, class: &str, allowed: &[String]) -> Option<&'a str> {
        let u = self.selected.get(class)?.as_deref()?;
        (allowed.iter().any(|a| a == u) && self.interfaces.contains_key(u)).then_some(u)
    }
}
