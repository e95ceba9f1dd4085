//! Benchmarks for misaki, each against a peer measured in the same run.
//!
//! `edit-latency`: the time from saving a config edit (atomic rename) to the first
//! request through one real Envoy that reaches the newly configured upstream, for
//! misaki (SotW and delta ADS), for Envoy's own watched-file config (the floor), and
//! for sovereign (a Python control plane Envoy polls over REST).
//!
//! Invariant: every process a setup starts is owned by a guard that kills it on drop,
//! also when the setup fails; every port is a fresh ephemeral one (Envoy and gunicorn
//! bind with SO_REUSEPORT, so a clash would silently split traffic).

pub mod envoy_files;
pub mod logtime;
pub mod measure;
pub mod misaki;
pub mod peer;
pub mod probe;
pub mod rss;
pub mod sovereign;
pub mod stats;
