//! Mesh policy: the YAML format (version 1), its strict parser/validator, and the
//! validated domain model. No I/O except `load_path`; no Envoy or tonic types.
#![deny(rust_2018_idioms, unsafe_code)]
#![warn(missing_debug_implementations)]

mod model;
mod parse;

pub use model::*;
pub use parse::{PolicyError, PolicyErrors, load_path, parse};
