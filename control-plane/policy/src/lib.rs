//! Mesh policy: the YAML format (version 1), its strict parser/validator, and the
//! validated domain model.
//!
//! Invariant: the only way to get a [`Policy`] from text is [`parse`] /
//! [`load_path`], which check everything once, here at the boundary, and report
//! every error with file, line, column and field path. No I/O except `load_path`;
//! no Envoy or tonic types.
//!
//! Code map:
//! - `model` — the validated domain types everyone else uses.
//! - `parse` — public entry points; directory loading.
//! - `schema` — one file's YAML tree → drafts (per-item checks).
//! - `validate` — drafts of all files → `Policy` (cross-item checks).
//! - [`located`] — the YAML reader (positions, typed getters, located issues), public:
//!   edge-netd reads its config with it too.
//! - `values`, `duration` — string syntaxes, durations.
//!
//! The format reference for operators is `docs/policy.md`.

mod duration;
mod error;
pub mod located;
mod model;
mod parse;
mod schema;
mod validate;
mod values;

#[cfg(test)]
mod tests;

pub use duration::{DurationError, format_duration, parse_duration};
pub use located::ErrorKind;
pub use model::*;
pub use parse::{PolicyError, PolicyErrors, load_path, parse};
pub use schema::{DEFAULT_TIMEOUT, MAX_RETRIES};
pub use validate::FORMAT_VERSION;
