//! The pure compiler: (policy, node) → xDS snapshot.
//!
//! Invariant: no I/O, no clocks, no tonic. Same inputs ⇒ byte-identical output.
#![deny(rust_2018_idioms, unsafe_code)]
#![warn(missing_debug_implementations)]

pub mod node;
pub mod snapshot;
