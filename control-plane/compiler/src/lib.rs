//! The pure compiler: (policy, node) → xDS snapshot.
//!
//! Invariant: no I/O, no clocks, no tonic. Same inputs ⇒ byte-identical output.
#![deny(rust_2018_idioms, unsafe_code)]
#![warn(missing_debug_implementations)]

mod compile;
pub mod node;
pub mod snapshot;

pub use compile::{
    CLASS_HEADER, CLOUD_INBOUND, VEHICLE_INBOUND, VEHICLE_OUTBOUND, compile, inbound_cluster,
    outbound_cluster,
};
