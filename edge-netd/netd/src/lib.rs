//! edge-netd: the per-vehicle network daemon. It measures every uplink, picks one
//! per traffic class, reports link state to the control plane, and (with a
//! `store_forward:` section) queues deferrable requests durably and forwards them over
//! the uplink their class may use (crate `misaki-saf`).
//!
//! Invariants:
//! - The selector is pure (`selector`): no I/O and no clock; everything with side
//!   effects lives around it (`monitor`, `probe`, `reporter`, `api`).
//! - One engine task owns all mutable link/selection state (`engine`); the others
//!   read the published [`EngineView`]s or send it inputs.
//! - The daemon works without the cloud: it starts from the stored policy (or the
//!   built-in `default` class) and keeps selecting — and accepting and forwarding
//!   deferred traffic — while the control plane is away.
//! - Store-and-forward sends a class only over the uplink the engine selected for it,
//!   bound to that uplink's interface (`store_forward`). A queue directory that cannot
//!   be opened (e.g. locked by another edge-netd) stops the start-up.
//!
//! Code map: `config` (YAML) → `monitor` (netlink carrier events) + `probe` (UDP
//! probes per interface) → `engine` (+ `selector`) → `reporter` (gRPC to the control
//! plane) and `api` (local HTTP). `policy` converts and persists the received policy.
//! `store_forward` adapts the engine's selection for `misaki-saf` (ingest endpoint,
//! durable queue, forwarder), which `run` starts when configured. `local_xds` is the
//! vehicle's own xDS tier (loopback TCP, and `xds_socket`, the Unix socket that alone
//! serves the vehicle's credential to its Envoy). `identity` keeps the vehicle's certificate (enrolment with
//! the claim credential, renewal, crash-safe files) for mutual TLS to the control plane;
//! `channel` is the connection both it and the reporter open. `power` decides the
//! vehicle's power state (the `power:` file, `PUT /power`), which the engine
//! publishes. `run` wires them together (as misaki-cp's `run.rs` does).

/// Register metrics, one `name, help => metric` per line (each metric cloned: the
/// registry and the owner share it).
macro_rules! register_metrics {
    ($registry:expr; $($name:literal, $help:literal => $metric:expr;)+) => {
        $($registry.register($name, $help, $metric.clone());)+
    };
}
pub(crate) use register_metrics;

pub mod api;
pub mod channel;
pub mod config;
pub mod engine;
pub mod identity;
pub mod local_xds;
pub mod monitor;
pub mod policy;
pub mod power;
pub mod probe;
pub mod reporter;
mod run;
pub mod selector;
pub mod store_forward;
pub mod xds_socket;

pub use config::{Config, ConfigError, ConfigIssue};
pub use engine::{Engine, EngineView, Input};
pub use run::{RunError, run};
