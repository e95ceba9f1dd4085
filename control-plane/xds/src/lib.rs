//! misaki's xDS server: ADS, state-of-the-world and delta, on one gRPC service.
//!
//! The server knows nothing of policy: it asks a [`SnapshotSource`] for a node's
//! snapshot and follows it as it changes.
//!
//! Invariants:
//! - one tokio task per stream owns that stream's protocol state (`sotw`, `delta`);
//!   the state machines are synchronous and do no I/O, the task does the waiting;
//! - snapshots are shared (`Arc`), and so are resource bodies: a stream holds `Arc`s,
//!   and each resource is encoded once (its wire form is part of the snapshot): the
//!   ADS service writes a response's own fields around the shared bytes and sends
//!   big ones as they are, without a copy or a per-stream encode buffer (`wire`);
//! - a slow stream only slows itself: each stream has a small bounded queue and the
//!   snapshot `watch` coalesces changes while the stream is busy;
//! - the rules Envoy's `xds_protocol.rst` sets (nonces, ACK/NACK, wildcard, warming,
//!   push order, removal of stale clusters last) live in `machine.rs` where both
//!   variants share them (the request and push logic, written once) and in `sotw.rs`
//!   and `delta.rs` where they differ, each listed at the top of its module;
//! - every stream ends when the server drains.
//!
//! Code map: `serve` (the connection loop: [`serve`], transport settings, connection
//! age) → `server` (the ADS tonic service) → `stream`
//! (the per-stream task) → `machine` (the protocol state machine both variants share)
//! → `sotw` / `delta` (each variant's rules and state) → `wire` (hand encoding of
//! responses around pre-encoded resources); `status` (the `/nodes`
//! registry) and `metrics` (Prometheus) are fed by the stream task.

mod delta;
mod machine;
mod metrics;
mod serve;
mod server;
mod sotw;
mod status;
mod stream;
mod wire;

use std::sync::Arc;

use misaki_compiler::node::NodeInfo;
use misaki_compiler::snapshot::Snapshot;
use tokio::sync::watch;

pub use serve::{ServeConfig, serve, serve_incoming, tcp_incoming};
pub use server::{MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, XdsServer};
pub use status::{NackRecord, StreamHandle, StreamKind, StreamRegistry, StreamStatus, TypeStatus};
pub use stream::ResponseStream;

/// A version prefix no earlier run of this server used: start time in ms plus random
/// bits, so even two servers started in the same millisecond differ, and a restarted
/// server never reuses a version a client still holds (an xDS rule).
pub fn version_prefix() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{ms:x}{:04x}-", rand::random::<u16>())
}

/// Supplies each node's snapshot and tells the server when it changes.
///
/// The server calls `watch` once per stream, after the first request names the node.
/// The receiver's current value is the snapshot to serve now; every later value is a
/// push. Unchanged resources (same version) are not resent.
pub trait SnapshotSource: Send + Sync + 'static {
    fn watch(&self, node: &NodeInfo) -> watch::Receiver<Arc<Snapshot>>;
}
