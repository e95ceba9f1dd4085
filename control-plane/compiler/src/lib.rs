//! The pure compiler: (policy, node[, vehicle state]) → xDS snapshot.
//!
//! Invariants: no I/O, no clocks, no tonic. Same inputs ⇒ byte-identical output.
//! misaki-cp's [`compile`] never puts a private key in a snapshot; only
//! [`compile_vehicle`] serves one, the vehicle's own (see `mtls`).

mod compile;
mod envoy;
pub mod gateway;
mod local;
mod mtls;
pub mod node;
mod on_demand;
mod scope;
pub mod snapshot;

pub use compile::{
    CLASS_HEADER, CLOUD_INBOUND, DEFER_CLUSTER, NOT_IN_SCOPE, REASON_HEADER, VEHICLE_INBOUND,
    VEHICLE_OUTBOUND, compile, compile_in, compile_vehicle, failover_cluster, inbound_cluster,
    outbound_cluster, uplink_cluster, with_vehicle_id,
};
pub use gateway::{Reach, VehicleConditions};
pub use local::VehicleState;
pub use mtls::{
    CLOUD_CERT, FLEET_CA, GRPC_CERT_PROVIDER, MAX_TLS_CONNECTION_AGE, VEHICLE_CERT, VEHICLE_HEADER,
    VehicleCredential,
};
pub use on_demand::{BUCKET_HEADER, BUCKETS, KEY_HEADER, bucket as scope_bucket};
