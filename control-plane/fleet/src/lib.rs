//! Fleet registry: the control plane's digital twin of every vehicle, fed by the
//! `misaki.fleet.v1.FleetService/Report` stream that each vehicle's edge-netd holds open.
//!
//! Invariants:
//! - The registry holds the *latest* reported state per vehicle and nothing else: a
//!   `LinkState` replaces the vehicle's links/selections/queues/sidecars whole, a
//!   `LinkChange` replaces the named records (and the sidecar list when it says so).
//! - A vehicle is online while its stream is open and it sent something within
//!   [`OFFLINE_AFTER_HEARTBEATS`] × its heartbeat interval. It goes offline when its
//!   (newest) stream ends or that timeout passes; an older stream ending never marks
//!   offline a vehicle that already reconnected.
//! - Every state change is announced on [`FleetRegistry::subscribe`] with the vehicle's id,
//!   so the compiler can recompute just that node.
//! - No policy logic here: the policy is only converted to its wire form, whole or
//!   as deltas from recent versions ([`PolicyHistory`], by `misaki-policy-wire`), and
//!   pushed.
//!
//! Code map: `record` (what is kept of a vehicle: domain types from the wire, serde for
//! `/fleet`), `registry` (state, liveness, metrics, events), `service` (gRPC server),
//! `policy` (Policy → `PolicyUpdate`, history and deltas), `echo` (UDP probe responder).

mod echo;
mod policy;
mod record;
mod registry;
mod service;

pub use echo::run_probe_echo;
pub use policy::{HISTORY_LEN, PolicyHistory, PolicyVersioned, UpdateKind, policy_update};
pub use record::{
    LinkRecord, NackRecord, Power, QueueRecord, SelectionRecord, SidecarRecord, VehicleState,
    XdsTypeRecord,
};
pub use registry::{
    FleetEvent, FleetEventKind, FleetRegistry, OFFLINE_AFTER_HEARTBEATS, RegistryError,
};
pub use service::{FleetApi, MAX_DELTA_RESYNCS, service};
