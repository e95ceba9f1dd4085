//! misaki control plane runtime: policy watcher, admin HTTP, and the glue that feeds
//! compiled snapshots to the xDS server.
#![deny(rust_2018_idioms, unsafe_code)]
#![warn(missing_debug_implementations)]
